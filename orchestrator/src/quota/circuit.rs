//! A circuit breaker per quota: closed while the upstream mostly answers; open (no calls) for
//! `open_for` once the failure ratio over the sliding `window` reaches `failure_ratio` with at
//! least `min_calls` calls; then half-open, letting one probe call through: its success closes the
//! circuit, its failure opens it again.
//!
//! The window's outcomes are counted in [`WINDOW_BUCKETS`] buckets, so a breaker's memory does
//! not grow with the rate of calls (it once kept every outcome: heaptrack found 31 MB in the
//! breakers of five implicit quotas at ~20k jobs/s with the 30 s default window); an outcome
//! leaves the window within one bucket of `window`.

use serde::Serialize;
use tokio::time::Instant;

use super::limits::SlidingCounts;
use crate::model::CircuitBreakerSpec;

/// Buckets of a breaker's sliding window.
pub const WINDOW_BUCKETS: usize = 20;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum CircuitState {
    Closed,
    Open,
    HalfOpen,
}

#[derive(Clone, Debug)]
pub struct CircuitBreaker {
    spec: CircuitBreakerSpec,
    state: State,
}

#[derive(Clone, Debug)]
enum State {
    Closed {
        /// (calls, failures) over the window.
        outcomes: SlidingCounts<WINDOW_BUCKETS>,
    },
    Open {
        until: Instant,
    },
    HalfOpen {
        probe_in_flight: bool,
    },
}

/// Whether a call may go through now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gate {
    Pass,
    /// Open until then.
    OpenUntil(Instant),
    /// Half-open with its probe under way: wait for its outcome.
    ProbeBusy,
}

impl CircuitBreaker {
    pub fn new(spec: CircuitBreakerSpec) -> Self {
        Self {
            spec,
            state: State::Closed {
                outcomes: SlidingCounts::new(spec.window),
            },
        }
    }

    pub fn state(&self) -> CircuitState {
        match self.state {
            State::Closed { .. } => CircuitState::Closed,
            State::Open { .. } => CircuitState::Open,
            State::HalfOpen { .. } => CircuitState::HalfOpen,
        }
    }

    /// Move from open to half-open once `open_for` has passed. Returns whether the state changed.
    pub fn tick(&mut self, now: Instant) -> bool {
        if let State::Open { until } = self.state
            && now >= until
        {
            self.state = State::HalfOpen {
                probe_in_flight: false,
            };
            return true;
        }
        false
    }

    pub fn gate(&mut self, now: Instant) -> Gate {
        self.tick(now);
        match self.state {
            State::Closed { .. } => Gate::Pass,
            State::Open { until } => Gate::OpenUntil(until),
            State::HalfOpen { probe_in_flight } => {
                if probe_in_flight {
                    Gate::ProbeBusy
                } else {
                    Gate::Pass
                }
            }
        }
    }

    /// A call is let through (after [`gate`](Self::gate) said `Pass`).
    pub fn on_start(&mut self) {
        if let State::HalfOpen { probe_in_flight } = &mut self.state {
            *probe_in_flight = true;
        }
    }

    /// A call's outcome: `true` if the upstream answered (success or a definite answer), `false`
    /// if it failed (transient error, timeout). Returns whether the state changed.
    pub fn on_outcome(&mut self, now: Instant, ok: bool) -> bool {
        match &mut self.state {
            State::Closed { outcomes } => {
                outcomes.add(now, 1, (!ok) as u32);
                let (calls, failures) = outcomes.sum(now);
                if calls >= self.spec.min_calls.get()
                    && failures as f64 >= self.spec.failure_ratio * calls as f64
                {
                    self.state = State::Open {
                        until: now + self.spec.open_for,
                    };
                    return true;
                }
                false
            }
            State::HalfOpen { .. } => {
                self.state = if ok {
                    State::Closed {
                        outcomes: SlidingCounts::new(self.spec.window),
                    }
                } else {
                    State::Open {
                        until: now + self.spec.open_for,
                    }
                };
                true
            }
            // Outcomes of calls started before the circuit opened change nothing.
            State::Open { .. } => false,
        }
    }

    /// A call that was let through ended without an outcome (cancelled): free the probe.
    pub fn on_abandon(&mut self) {
        if let State::HalfOpen { probe_in_flight } = &mut self.state {
            *probe_in_flight = false;
        }
    }

    pub fn open_until(&self) -> Option<Instant> {
        match self.state {
            State::Open { until } => Some(until),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;
    use std::time::Duration;

    fn breaker() -> CircuitBreaker {
        CircuitBreaker::new(CircuitBreakerSpec {
            failure_ratio: 0.5,
            min_calls: NonZeroU32::new(4).unwrap(),
            window: Duration::from_secs(10),
            open_for: Duration::from_secs(5),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn closed_open_half_open_closed() {
        let mut b = breaker();
        let t0 = Instant::now();
        // Three calls, all failing: below min_calls, stays closed.
        for _ in 0..3 {
            assert!(!b.on_outcome(t0, false));
        }
        assert_eq!(b.state(), CircuitState::Closed);
        // The fourth reaches min_calls with ratio 1.0 ≥ 0.5: open.
        assert!(b.on_outcome(t0, false));
        assert_eq!(b.state(), CircuitState::Open);
        assert_eq!(
            b.gate(t0 + Duration::from_secs(4)),
            Gate::OpenUntil(t0 + Duration::from_secs(5))
        );
        // After open_for: half-open, one probe at a time.
        assert_eq!(b.gate(t0 + Duration::from_secs(5)), Gate::Pass);
        assert_eq!(b.state(), CircuitState::HalfOpen);
        b.on_start();
        assert_eq!(b.gate(t0 + Duration::from_secs(5)), Gate::ProbeBusy);
        assert!(b.on_outcome(t0 + Duration::from_secs(6), true));
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn failed_probe_opens_again_and_old_failures_expire() {
        let mut b = breaker();
        let t0 = Instant::now();
        for _ in 0..4 {
            b.on_outcome(t0, false);
        }
        let t1 = t0 + Duration::from_secs(5);
        assert_eq!(b.gate(t1), Gate::Pass);
        b.on_start();
        assert!(b.on_outcome(t1, false));
        assert_eq!(b.open_until(), Some(t1 + Duration::from_secs(5)));

        // Failures outside the window no longer count.
        let mut b = breaker();
        b.on_outcome(t0, false);
        b.on_outcome(t0, false);
        let later = t0 + Duration::from_secs(11);
        for _ in 0..3 {
            b.on_outcome(later, true);
        }
        b.on_outcome(later, false);
        // Within the window: 3 ok, 1 failure → ratio 0.25 < 0.5.
        assert_eq!(b.state(), CircuitState::Closed);
    }

    #[tokio::test(start_paused = true)]
    async fn the_window_holds_fixed_memory_whatever_the_rate() {
        let mut b = breaker();
        let t0 = Instant::now();
        // A million answers within the window, then failures: the ratio still counts them all.
        for i in 0..1_000_000u32 {
            b.on_outcome(t0 + Duration::from_micros(u64::from(i)), true);
        }
        assert_eq!(
            std::mem::size_of_val(&b.state),
            std::mem::size_of::<State>()
        );
        let t1 = t0 + Duration::from_secs(2);
        for _ in 0..1000 {
            assert!(!b.on_outcome(t1, false));
        }
        assert_eq!(b.state(), CircuitState::Closed);
        // Once the answers have left the window, the failures open it.
        let t2 = t0 + Duration::from_secs(11);
        for _ in 0..3 {
            b.on_outcome(t2, false);
        }
        assert_eq!(b.state(), CircuitState::Open);
    }
}
