//! One step's lifecycle, with no actor, store or clock of its own: the scheduler tells a step what
//! happened (its dependencies succeeded, its quota granted a call, the call answered or failed, its
//! agent was lost, a retry timer rang) and the step answers with a [`Decision`] that the scheduler
//! carries out. Every retry, refusal, restart and backoff rule of the engine is here, so it is
//! tested here, on a paused clock.
//!
//! The call's quota [`Grant`](super::protocol::Grant) is not part of the state: it travels with
//! the call itself, so whatever ends the call (an answer, a panic, a dropped mailbox) releases it.

use std::sync::Arc;
use std::time::Duration;

use cascade_agents::{AgentError, ErrorClass};
use serde_json::Value;
use tokio::time::Instant;

use crate::backoff;
use crate::model::RetryPolicy;

/// How long a rate-limited call waits when the upstream gave no Retry-After.
pub(crate) const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(1);

/// Where a step is. A token exists only while something can answer for the step (its quota's
/// grant, its call, its retry timer): answers carrying an older token are stale and ignored.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Phase {
    /// Dependencies still running.
    Waiting {
        pending_deps: usize,
    },
    /// In its agent's queue.
    Queued,
    /// Sent to the quota broker, waiting for its turn.
    AwaitQuota {
        token: u32,
    },
    /// Its call is at the agent.
    Running {
        token: u32,
    },
    /// Waiting for its retry timer.
    Backoff {
        token: u32,
        until: Instant,
    },
    Done {
        output: Arc<Value>,
    },
    Failed,
    /// Its call is prepared and waits for a person's decision; it holds nothing meanwhile.
    Proposed,
}

/// What the scheduler must do after a failure.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Decision {
    /// Run again after `delay`; attempt `attempt` was spent.
    Retry { delay: Duration, attempt: u32 },
    /// Run again without spending an attempt: `after` `None` means back in the queue now (the
    /// quota that refused paces the next call), `Some` means after this wait.
    Requeue { after: Option<Duration> },
    /// The step failed for good at attempt `attempt`: the job fails.
    Fail { attempt: u32 },
}

/// What a failure decision depends on besides the error.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Rules<'a> {
    pub retry: &'a RetryPolicy,
    /// The agent's calls go through the quota broker, which learns from a refusal and paces the
    /// quota: a refused step only needs to ask for its turn again.
    pub through_quota: bool,
    /// Naive mode (`cascade = false`): a refusal is retried by the retry policy like any
    /// transient error.
    pub naive: bool,
}

#[derive(Clone, Debug)]
pub(crate) struct Step {
    phase: Phase,
    /// Attempts started, the running one included.
    attempts: u32,
    next_token: u32,
}

impl Step {
    /// A step of a job being started. `done` is its output from an earlier run of the job (it
    /// will not run again); `attempts` those an earlier run spent on it, `interrupted` whether
    /// the last of them was cut short by a crash or restart, which is not the step's fault and
    /// does not count.
    pub fn new(done: Option<Arc<Value>>, attempts: u32, interrupted: bool) -> Self {
        let phase = match done {
            Some(output) => Phase::Done { output },
            None => Phase::Waiting { pending_deps: 0 },
        };
        let attempts = if interrupted {
            attempts.saturating_sub(1)
        } else {
            attempts
        };
        Self {
            phase,
            attempts,
            next_token: 0,
        }
    }

    /// A step whose prepared call waits for a decision (an earlier run of the job proposed it).
    pub fn proposed(attempts: u32) -> Self {
        Self {
            phase: Phase::Proposed,
            attempts,
            next_token: 0,
        }
    }

    /// A queued step's call was prepared for approval: it waits for the decision. Returns
    /// whether it was queued.
    pub fn propose(&mut self) -> bool {
        if self.phase != Phase::Queued {
            return false;
        }
        self.phase = Phase::Proposed;
        true
    }

    /// A queued step may not start (its job's budget would not cover it): it waits, ready,
    /// holding nothing, until [`Step::release`]. Returns whether it was queued.
    pub fn hold(&mut self) -> bool {
        if self.phase != Phase::Queued {
            return false;
        }
        self.phase = Phase::Waiting { pending_deps: 0 };
        true
    }

    /// A held step is queued again. Returns whether it was held.
    pub fn release(&mut self) -> bool {
        if self.phase != (Phase::Waiting { pending_deps: 0 }) {
            return false;
        }
        self.phase = Phase::Queued;
        true
    }

    /// Its running call stopped to wait (a tool loop's proposal, or its job's budget): it holds
    /// nothing, and the attempt it started does not count. `proposed`: it waits for a decision
    /// ([`Step::approve`]); else it is held ([`Step::release`]). Returns whether it was running
    /// as `token`.
    pub fn suspend(&mut self, token: u32, proposed: bool) -> bool {
        if !self.is_running(token) {
            return false;
        }
        self.attempts = self.attempts.saturating_sub(1);
        self.phase = if proposed {
            Phase::Proposed
        } else {
            Phase::Waiting { pending_deps: 0 }
        };
        true
    }

    /// Its proposal was approved: it is queued to run. Returns whether it was waiting for that.
    pub fn approve(&mut self) -> bool {
        if self.phase != Phase::Proposed {
            return false;
        }
        self.phase = Phase::Queued;
        true
    }

    /// Whether something of the step is under way or about to be: queued, at the broker,
    /// running, or waiting to retry.
    pub fn is_active(&self) -> bool {
        matches!(
            self.phase,
            Phase::Queued
                | Phase::AwaitQuota { .. }
                | Phase::Running { .. }
                | Phase::Backoff { .. }
        )
    }

    #[cfg(test)]
    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    pub fn attempts(&self) -> u32 {
        self.attempts
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done { .. })
    }

    pub fn is_queued(&self) -> bool {
        self.phase == Phase::Queued
    }

    pub fn output(&self) -> Option<&Arc<Value>> {
        match &self.phase {
            Phase::Done { output } => Some(output),
            _ => None,
        }
    }

    fn token(&mut self) -> u32 {
        self.next_token = self.next_token.wrapping_add(1);
        self.next_token
    }

    /// Sets how many dependencies a waiting step has left; with none, it is queued. Returns
    /// whether it is ready.
    pub fn wait_for(&mut self, pending_deps: usize) -> bool {
        if !matches!(self.phase, Phase::Waiting { .. }) {
            return false;
        }
        self.phase = if pending_deps == 0 {
            Phase::Queued
        } else {
            Phase::Waiting { pending_deps }
        };
        pending_deps == 0
    }

    /// One dependency succeeded. Returns whether the step became ready (queued).
    pub fn dep_done(&mut self) -> bool {
        match &mut self.phase {
            Phase::Waiting { pending_deps } => {
                *pending_deps = pending_deps.saturating_sub(1);
                if *pending_deps == 0 {
                    self.phase = Phase::Queued;
                    return true;
                }
                false
            }
            _ => false,
        }
    }

    /// A queued step goes to its quota's broker; the token identifies the grant that will come.
    pub fn await_quota(&mut self) -> Option<u32> {
        if self.phase != Phase::Queued {
            return None;
        }
        let token = self.token();
        self.phase = Phase::AwaitQuota { token };
        Some(token)
    }

    /// Whether a grant with this token is the one the step is waiting for.
    pub fn awaits_grant(&self, token: u32) -> bool {
        self.phase == Phase::AwaitQuota { token }
    }

    /// The step waiting at the broker goes back to the queue (its agent is down, or the broker
    /// was restarted and forgot it). Returns whether it was waiting there.
    pub fn back_to_queue(&mut self) -> bool {
        if matches!(self.phase, Phase::AwaitQuota { .. }) {
            self.phase = Phase::Queued;
            return true;
        }
        false
    }

    /// The call starts: one more attempt. Returns the attempt number and the call's token, or
    /// `None` when the step is not ready to run.
    pub fn start(&mut self) -> Option<(u32, u32)> {
        if !matches!(self.phase, Phase::Queued | Phase::AwaitQuota { .. }) {
            return None;
        }
        let token = self.token();
        self.attempts += 1;
        self.phase = Phase::Running { token };
        Some((self.attempts, token))
    }

    /// Whether an answer carrying `token` is for the running call.
    pub fn is_running(&self, token: u32) -> bool {
        self.phase == Phase::Running { token }
    }

    /// Whether any call of this step is at its agent.
    pub fn running(&self) -> Option<u32> {
        match self.phase {
            Phase::Running { token } => Some(token),
            _ => None,
        }
    }

    /// The call answered. Returns the attempt that succeeded.
    pub fn on_done(&mut self, output: Arc<Value>) -> u32 {
        self.phase = Phase::Done { output };
        self.attempts
    }

    /// The call failed with `e`; `unit` is a uniform random number in `[0, 1)` for jitter.
    pub fn on_failed(
        &mut self,
        e: &AgentError,
        rules: Rules<'_>,
        unit: f64,
        now: Instant,
    ) -> Decision {
        if e.class == ErrorClass::RateLimited && !rules.naive {
            return self.on_refused(e.retry_after, rules, unit, now);
        }
        let retryable = matches!(e.class, ErrorClass::Transient | ErrorClass::RateLimited);
        if retryable && self.attempts < rules.retry.max_attempts.get() {
            let delay = backoff::delay(rules.retry, self.attempts, unit);
            self.back_off(delay, now);
            return Decision::Retry {
                delay,
                attempt: self.attempts,
            };
        }
        self.phase = Phase::Failed;
        Decision::Fail {
            attempt: self.attempts,
        }
    }

    /// The upstream refused the call as rate-limited. That is not the step's fault: no attempt
    /// is spent. Through a quota, the broker learned of the refusal and paces or pauses the
    /// quota, so the step only asks for its turn again. Without one, it waits as asked plus a
    /// jittered share of that (so that refused waiters do not all come back at the same
    /// instant), at most the retry policy's `max_delay` unless the upstream asked for longer.
    pub fn on_refused(
        &mut self,
        retry_after: Option<Duration>,
        rules: Rules<'_>,
        unit: f64,
        now: Instant,
    ) -> Decision {
        self.attempts -= 1;
        if rules.through_quota {
            self.phase = Phase::Queued;
            return Decision::Requeue { after: None };
        }
        let wait = retry_after.unwrap_or(DEFAULT_RATE_LIMIT_WAIT);
        let delay =
            (wait + wait.mul_f64(unit.clamp(0.0, 1.0) * 0.5)).min(rules.retry.max_delay.max(wait));
        self.back_off(delay, now);
        Decision::Requeue { after: Some(delay) }
    }

    /// The agent's actor died while this step's call was running. If the step's own call caused
    /// it (`charged`), that is a transient failure of the step; otherwise the call was collateral
    /// and runs again with the same key, without spending an attempt.
    pub fn on_agent_lost(
        &mut self,
        charged: Option<&AgentError>,
        rules: Rules<'_>,
        unit: f64,
        now: Instant,
    ) -> Option<Decision> {
        self.running()?;
        Some(match charged {
            Some(e) => self.on_failed(e, rules, unit, now),
            None => {
                self.attempts -= 1;
                self.phase = Phase::Queued;
                Decision::Requeue { after: None }
            }
        })
    }

    /// The retry timer with `token` rang. Returns whether the step is queued again (a timer of an
    /// earlier wait is stale).
    pub fn on_retry_due(&mut self, token: u32, now: Instant) -> bool {
        match self.phase {
            Phase::Backoff { token: t, until } if t == token && now >= until => {
                self.phase = Phase::Queued;
                true
            }
            _ => false,
        }
    }

    /// The token of the retry timer the step waits for.
    pub fn backoff_token(&self) -> Option<u32> {
        match self.phase {
            Phase::Backoff { token, .. } => Some(token),
            _ => None,
        }
    }

    fn back_off(&mut self, delay: Duration, now: Instant) {
        let token = self.token();
        self.phase = Phase::Backoff {
            token,
            until: now + delay,
        };
    }
}

/// The job's error when a step failed for good.
pub(crate) fn failure_message(agent: &str, attempt: u32, e: &AgentError) -> String {
    format!(
        "agent {agent:?} failed after {attempt} attempt{}: {e}",
        if attempt == 1 { "" } else { "s" }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::num::NonZeroU32;

    fn policy(max_attempts: u32) -> RetryPolicy {
        RetryPolicy {
            max_attempts: NonZeroU32::new(max_attempts).unwrap(),
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(2),
            multiplier: 2.0,
        }
    }

    fn rules(p: &RetryPolicy) -> Rules<'_> {
        Rules {
            retry: p,
            through_quota: false,
            naive: false,
        }
    }

    fn running() -> (Step, u32) {
        let mut s = Step::new(None, 0, false);
        assert!(s.wait_for(0));
        let (attempt, token) = s.start().unwrap();
        assert_eq!(attempt, 1);
        (s, token)
    }

    #[test]
    fn a_step_is_queued_when_its_last_dependency_succeeds() {
        let mut s = Step::new(None, 0, false);
        assert!(!s.wait_for(2));
        assert!(!s.dep_done());
        assert!(s.dep_done());
        assert!(s.is_queued());
        // A finished step is never queued again by a late dependency.
        let mut done = Step::new(Some(Arc::new(Value::Null)), 1, false);
        assert!(!done.wait_for(0));
        assert!(!done.dep_done());
        assert!(done.is_done());
    }

    #[test]
    fn an_interrupted_attempt_does_not_count() {
        assert_eq!(Step::new(None, 2, true).attempts(), 1);
        assert_eq!(Step::new(None, 2, false).attempts(), 2);
        assert_eq!(Step::new(None, 0, true).attempts(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_failure_backs_off_and_spends_an_attempt_until_the_limit() {
        let p = policy(3);
        let (mut s, _) = running();
        let now = Instant::now();
        let e = AgentError::transient("flaky");
        let d = s.on_failed(&e, rules(&p), 0.5, now);
        assert_eq!(
            d,
            Decision::Retry {
                delay: Duration::from_millis(50),
                attempt: 1
            }
        );
        let token = s.backoff_token().unwrap();
        // The timer is not due before its time, and a stale timer is ignored.
        assert!(!s.on_retry_due(token, now));
        tokio::time::advance(Duration::from_millis(50)).await;
        assert!(!s.on_retry_due(token.wrapping_add(7), Instant::now()));
        assert!(s.on_retry_due(token, Instant::now()));
        assert_eq!(s.start().unwrap().0, 2);
        let d = s.on_failed(&e, rules(&p), 0.999, Instant::now());
        // Attempt 2's ceiling is 200 ms.
        assert!(
            matches!(d, Decision::Retry { delay, attempt: 2 } if delay < Duration::from_millis(200) && delay > Duration::from_millis(190))
        );
        tokio::time::advance(Duration::from_millis(200)).await;
        assert!(s.on_retry_due(s.backoff_token().unwrap(), Instant::now()));
        s.start().unwrap();
        assert_eq!(
            s.on_failed(&e, rules(&p), 0.5, Instant::now()),
            Decision::Fail { attempt: 3 }
        );
        assert_eq!(s.phase(), &Phase::Failed);
    }

    #[test]
    fn a_permanent_or_unauthorized_failure_is_never_retried() {
        let p = policy(5);
        for e in [
            AgentError::permanent("bad input"),
            AgentError::unauthorized("key revoked"),
        ] {
            let (mut s, _) = running();
            assert_eq!(
                s.on_failed(&e, rules(&p), 0.5, Instant::now()),
                Decision::Fail { attempt: 1 }
            );
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_through_a_quota_asks_for_a_turn_again_without_spending_an_attempt() {
        let p = policy(1);
        let (mut s, _) = running();
        let r = Rules {
            through_quota: true,
            ..rules(&p)
        };
        // Many refusals never exhaust a one-attempt policy: the quota paces them.
        for _ in 0..100 {
            let e = AgentError::rate_limited("429", Some(Duration::from_secs(30)));
            assert_eq!(
                s.on_failed(&e, r, 0.5, Instant::now()),
                Decision::Requeue { after: None }
            );
            assert!(s.is_queued());
            assert_eq!(s.attempts(), 0);
            assert_eq!(s.start().unwrap().0, 1);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_without_a_quota_waits_its_retry_after_with_jitter_and_a_cap() {
        let p = policy(1);
        let now = Instant::now();
        let (mut s, _) = running();
        let e = AgentError::rate_limited("429", Some(Duration::from_secs(1)));
        // Jitter adds up to half the wait; the cap is max_delay (2 s).
        assert_eq!(
            s.on_refused(e.retry_after, rules(&p), 0.0, now),
            Decision::Requeue {
                after: Some(Duration::from_secs(1))
            }
        );
        assert_eq!(s.attempts(), 0);
        s.on_retry_due(s.backoff_token().unwrap(), now + Duration::from_secs(1));
        s.start().unwrap();
        assert_eq!(
            s.on_refused(e.retry_after, rules(&p), 0.999_999, now),
            Decision::Requeue {
                after: Some(Duration::from_secs_f64(1.4999995))
            }
        );
        s.on_retry_due(s.backoff_token().unwrap(), now + Duration::from_secs(2));
        s.start().unwrap();
        // Retry-After 1.8 s with full jitter would be 2.7 s: capped at 2 s.
        assert_eq!(
            s.on_refused(Some(Duration::from_millis(1800)), rules(&p), 0.999, now),
            Decision::Requeue {
                after: Some(Duration::from_secs(2))
            }
        );
        s.on_retry_due(s.backoff_token().unwrap(), now + Duration::from_secs(2));
        s.start().unwrap();
        // The upstream asking for longer than max_delay is obeyed, without jitter above it.
        assert_eq!(
            s.on_refused(Some(Duration::from_secs(60)), rules(&p), 0.9, now),
            Decision::Requeue {
                after: Some(Duration::from_secs(60))
            }
        );
        s.on_retry_due(s.backoff_token().unwrap(), now + Duration::from_secs(60));
        s.start().unwrap();
        // No Retry-After: the default wait.
        assert_eq!(
            s.on_refused(None, rules(&p), 0.0, now),
            Decision::Requeue {
                after: Some(DEFAULT_RATE_LIMIT_WAIT)
            }
        );
    }

    #[test]
    fn naive_mode_spends_attempts_on_refusals() {
        let p = policy(2);
        let (mut s, _) = running();
        let r = Rules {
            naive: true,
            through_quota: true,
            ..rules(&p)
        };
        let e = AgentError::rate_limited("429", Some(Duration::from_secs(1)));
        assert!(matches!(
            s.on_failed(&e, r, 0.5, Instant::now()),
            Decision::Retry { attempt: 1, .. }
        ));
        s.on_retry_due(
            s.backoff_token().unwrap(),
            Instant::now() + Duration::from_secs(9),
        );
        s.start().unwrap();
        assert_eq!(
            s.on_failed(&e, r, 0.5, Instant::now()),
            Decision::Fail { attempt: 2 }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_lost_agent_charges_only_the_call_that_caused_it() {
        let p = policy(2);
        let (mut collateral, _) = running();
        let (mut culprit, _) = running();
        assert_eq!(
            collateral.on_agent_lost(None, rules(&p), 0.5, Instant::now()),
            Some(Decision::Requeue { after: None })
        );
        assert_eq!(collateral.attempts(), 0);
        assert!(collateral.is_queued());
        let panic = AgentError::transient("agent panicked: boom");
        assert!(matches!(
            culprit.on_agent_lost(Some(&panic), rules(&p), 0.5, Instant::now()),
            Some(Decision::Retry { attempt: 1, .. })
        ));
        // A step that was not running is not touched.
        let mut waiting = Step::new(None, 0, false);
        waiting.wait_for(1);
        assert_eq!(
            waiting.on_agent_lost(None, rules(&p), 0.5, Instant::now()),
            None
        );
    }

    #[test]
    fn stale_answers_are_recognised_by_token() {
        let (mut s, token) = running();
        assert!(s.is_running(token));
        assert!(!s.is_running(token.wrapping_sub(1)));
        // Lost with its agent's actor, uncharged: queued again.
        let p = policy(2);
        assert_eq!(
            s.on_agent_lost(None, rules(&p), 0.5, Instant::now()),
            Some(Decision::Requeue { after: None })
        );
        assert!(s.is_queued());
        assert_eq!(s.attempts(), 0);
        let q = s.await_quota().unwrap();
        assert!(s.awaits_grant(q));
        assert!(!s.awaits_grant(token));
        assert!(s.back_to_queue());
        assert!(!s.awaits_grant(q));
        let (_, t2) = s.start().unwrap();
        assert!(!s.is_running(token));
        assert!(s.is_running(t2));
        assert_eq!(s.on_done(Arc::new(Value::Bool(true))), 1);
        assert!(s.start().is_none(), "a finished step never runs again");
    }

    #[test]
    fn a_proposed_or_held_step_holds_nothing_until_approved_or_released() {
        let mut s = Step::new(None, 0, false);
        assert!(s.wait_for(0));
        assert!(s.propose());
        assert!(!s.is_active(), "a proposal waits holding nothing");
        assert!(s.start().is_none(), "and does not start");
        assert!(!s.release(), "only a held step is released");
        assert!(s.approve());
        assert!(s.is_queued() && s.is_active());
        assert!(!s.approve(), "approved once");
        assert!(s.hold());
        assert!(!s.is_active());
        assert!(s.release());
        assert_eq!(s.start(), Some((1, 1)));
        // A step proposed by an earlier run of the job keeps its attempts.
        let p = Step::proposed(2);
        assert_eq!((p.attempts(), p.is_active()), (2, false));
    }

    #[test]
    fn the_failure_message_names_agent_and_attempts() {
        let e = AgentError::transient("timeout");
        assert!(failure_message("draft", 1, &e).contains("after 1 attempt:"));
        assert!(
            failure_message("draft", 3, &e).starts_with("agent \"draft\" failed after 3 attempts")
        );
    }
}
