//! Serde mirrors of the small nested tables (retry, circuit breaker), read as one value each.

use std::num::NonZeroU32;

use cascade_agents::HumanDuration;
use serde::Deserialize;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRetry {
    pub max_attempts: Option<NonZeroU32>,
    pub initial_delay: Option<HumanDuration>,
    pub max_delay: Option<HumanDuration>,
    pub multiplier: Option<f64>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCircuitBreaker {
    pub failure_ratio: f64,
    pub min_calls: NonZeroU32,
    pub window: HumanDuration,
    pub open_for: HumanDuration,
}
