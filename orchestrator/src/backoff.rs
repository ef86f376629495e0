//! Exponential backoff with full jitter: attempt n waits a uniformly random time in
//! `[0, min(max_delay, initial_delay × multiplier^(n-1))]`. Full jitter spreads retries of many
//! failed calls over the whole window instead of letting them return in lockstep.

use std::time::Duration;

use crate::model::RetryPolicy;

/// The upper bound of the wait after failed attempt `attempt` (1-based).
pub fn ceiling(policy: &RetryPolicy, attempt: u32) -> Duration {
    let exp = attempt.saturating_sub(1).min(64) as i32;
    let secs = policy.initial_delay.as_secs_f64() * policy.multiplier.powi(exp);
    let max = policy.max_delay.as_secs_f64();
    Duration::from_secs_f64(if secs.is_finite() { secs.min(max) } else { max })
}

/// The wait after failed attempt `attempt`, given a uniform random number `unit` in `[0, 1)`.
pub fn delay(policy: &RetryPolicy, attempt: u32, unit: f64) -> Duration {
    ceiling(policy, attempt).mul_f64(unit.clamp(0.0, 1.0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn policy() -> RetryPolicy {
        RetryPolicy {
            max_attempts: NonZeroU32::new(10).unwrap(),
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            multiplier: 2.0,
        }
    }

    #[test]
    fn ceiling_grows_exponentially_then_caps() {
        let p = policy();
        let c: Vec<u128> = (1..=7).map(|a| ceiling(&p, a).as_millis()).collect();
        assert_eq!(c, [100, 200, 400, 800, 1600, 2000, 2000]);
        assert_eq!(ceiling(&p, u32::MAX), Duration::from_secs(2));
    }

    #[test]
    fn jitter_stays_within_zero_and_ceiling() {
        let p = policy();
        assert_eq!(delay(&p, 3, 0.0), Duration::ZERO);
        assert_eq!(delay(&p, 3, 0.5), Duration::from_millis(200));
        assert!(delay(&p, 3, 0.999_999) < Duration::from_millis(400));
        assert_eq!(delay(&p, 3, 7.0), Duration::from_millis(400));
    }
}
