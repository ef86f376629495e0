//! Cascade's orchestrator: the graph model and its validation, the DAG, the supervised actors that
//! run jobs, and the job store.
//!
//! The data path reads one way: TOML → [`config`] → [`model`] → [`dag`] → supervised actors
//! ([`runtime`]) → [`store`].

pub mod api;
pub mod approval;
pub mod audit;
pub mod auth;
pub mod backoff;
pub mod clock;
pub mod config;
pub mod dag;
pub mod job;
pub mod jobs_api;
pub mod limits;
pub mod listen;
pub mod mcp_tools;
pub mod metrics;
pub mod model;
pub mod oidc;
pub mod quota;
pub mod restart;
pub mod runtime;
pub mod secret;
pub mod server;
pub mod session;
pub mod signal;
pub mod store;
pub mod telemetry;
pub mod text;
pub mod tls;
pub mod triggers;

pub use cascade_agents as agents;

pub use runtime::{
    Orchestrator, OrchestratorBuilder, RaiseBudgetError, SubmitError, SubmitRequest,
};
