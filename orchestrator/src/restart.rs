//! Restart intensity, as in OTP: an actor may be restarted at most `max_restarts` times within
//! `window`; one failure more and the supervisor gives up on it (the agent is marked failed).

use std::collections::VecDeque;

use tokio::time::Instant;

use crate::model::RestartPolicy;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RestartDecision {
    Restart,
    GiveUp,
}

#[derive(Clone, Debug)]
pub struct RestartIntensity {
    policy: RestartPolicy,
    recent: VecDeque<Instant>,
}

impl RestartIntensity {
    pub fn new(policy: RestartPolicy) -> Self {
        Self {
            policy,
            recent: VecDeque::new(),
        }
    }

    /// Record a failure at `now` and decide what to do about it.
    pub fn on_failure(&mut self, now: Instant) -> RestartDecision {
        while let Some(&t) = self.recent.front() {
            if now.duration_since(t) >= self.policy.window {
                self.recent.pop_front();
            } else {
                break;
            }
        }
        if self.recent.len() as u32 >= self.policy.max_restarts {
            RestartDecision::GiveUp
        } else {
            self.recent.push_back(now);
            RestartDecision::Restart
        }
    }

    /// Forget past failures (after the agent was given up on and started again by hand or timer).
    pub fn reset(&mut self) {
        self.recent.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn gives_up_past_the_intensity_and_forgets_old_failures() {
        let mut r = RestartIntensity::new(RestartPolicy {
            max_restarts: 2,
            window: Duration::from_secs(10),
        });
        let t0 = Instant::now();
        assert_eq!(r.on_failure(t0), RestartDecision::Restart);
        assert_eq!(
            r.on_failure(t0 + Duration::from_secs(1)),
            RestartDecision::Restart
        );
        assert_eq!(
            r.on_failure(t0 + Duration::from_secs(2)),
            RestartDecision::GiveUp
        );
        // The first failure leaves the window at t0 + 10 s.
        assert_eq!(
            r.on_failure(t0 + Duration::from_secs(10)),
            RestartDecision::Restart
        );
        assert_eq!(
            r.on_failure(t0 + Duration::from_secs(10)),
            RestartDecision::GiveUp
        );
        r.reset();
        assert_eq!(
            r.on_failure(t0 + Duration::from_secs(11)),
            RestartDecision::Restart
        );
    }

    #[tokio::test(start_paused = true)]
    async fn zero_restarts_gives_up_at_once() {
        let mut r = RestartIntensity::new(RestartPolicy {
            max_restarts: 0,
            window: Duration::from_secs(1),
        });
        assert_eq!(r.on_failure(Instant::now()), RestartDecision::GiveUp);
    }
}
