//! Quotas: named budgets shared by every agent that draws on them. Pure state machines on
//! `tokio::time`; the broker actor (`runtime::broker`) owns them and decides who calls when.

mod circuit;
mod core;
mod limits;
pub mod shared;

pub use circuit::{CircuitBreaker, CircuitState, Gate};
pub use core::{
    Demand, Exhaustion, Limit, Outcome, QuotaCore, QuotaSnapshot, Ready, Reservation, cost_text,
};
pub use limits::{Aimd, Gcra, TokenWindow, UpstreamBucket, UpstreamBucketSnapshot};
