//! One quota: requests (GCRA, scaled by AIMD), tokens (sliding window with reserve-and-settle),
//! concurrency, a circuit breaker, and refusals reported by the upstream. It answers when a call
//! of a given cost could start, takes reservations, settles them, and says whether it is
//! exhausted (cannot serve the next call within `pause_threshold`) and until when.
//!
//! A quota that declares no request rate (every implicit `upstream:<name>` quota, and a declared
//! one with only tokens or concurrency) learns one at the upstream's first refusal: the rate the
//! upstream answered over the last second, just under it, then AIMD. Until then an implicit quota
//! slow-starts its calls in flight, so that a storm does not meet an unknown upstream all at once.
//!
//! A quota that learns from its upstream (every implicit one; a declared one with
//! `learn_from_upstream = true`) also mirrors the buckets the upstream's answers state in their
//! rate-limit headers, and starts no call the mirror says the upstream would refuse: it converges
//! on the provider's real limits from the first answer, before any 429, and a declared limit
//! higher than the provider's is held to the provider's.

use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;

use super::circuit::{CircuitBreaker, CircuitState, Gate};
use super::limits::{
    AcceptMeter, Aimd, Gcra, SlowStart, TokenWindow, UpstreamBucket, UpstreamBucketSnapshot,
};
use super::shared::ClusterMode;
use crate::model::QuotaModel;
use cascade_agents::UpstreamLimits;

/// When a call could start.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    Now,
    At(Instant),
    /// Waits for an event rather than a time: a concurrency slot or the half-open probe.
    Blocked,
}

/// What a call asks of a quota before it starts: its tokens (prompt estimate + `max_tokens`) and
/// its cost, in micro-dollars, at most.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Demand {
    pub tokens: u64,
    pub cost_micros: u64,
}

impl From<u64> for Demand {
    /// A demand of tokens alone.
    fn from(tokens: u64) -> Self {
        Self {
            tokens,
            cost_micros: 0,
        }
    }
}

/// What a started call holds of a quota, to be settled when it ends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reservation {
    token_id: Option<u64>,
    pub tokens: u64,
    cost_id: Option<u64>,
    cost_micros: u64,
    /// The call's place in the order calls were started.
    seq: u64,
    /// Tokens reserved by every call started up to this one.
    tokens_through: u64,
    /// Calls, and their tokens, in flight when this one started.
    ahead: u32,
    tokens_ahead: u64,
}

/// How a call ended, as far as the quota is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The upstream answered (success, or a definite refusal such as a 4xx).
    Answered,
    /// Transient failure or timeout: counts against the circuit breaker.
    Failed,
    /// Refused for rate, asking to wait this long.
    RateLimited(Option<Duration>),
    /// Never reached the upstream (cancelled, aborted).
    Abandoned,
}

/// Why and until when a quota cannot serve calls.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Exhaustion {
    #[serde(skip)]
    pub until: Instant,
    pub reason: Limit,
}

/// Which limit holds a quota's next call back. Serialised (and shown) as the words operators
/// read on the dashboard, in `cascade top` and in GetGraph.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Limit {
    /// The upstream refused with a 429 (and maybe a Retry-After).
    UpstreamRateLimit,
    /// The upstream's own limit, as its answers state it, is spent.
    UpstreamLimit,
    /// A credential cannot get a token, or its token or key is refused.
    Credential,
    CircuitOpen,
    CircuitHalfOpen,
    RequestRate,
    TokenBudget,
    /// Its dollars for the window (`cost_usd_per_hour|day`) are spent.
    CostBudget,
    Concurrency,
    SlowStart,
    /// The cluster's shared quota state cannot be reached, and `quota_fallback = "closed"`.
    QuotaBackend,
    /// This node could not renew its leases: it starts no call until it can.
    Fenced,
}

impl Limit {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UpstreamRateLimit => "upstream rate limit (429)",
            Self::UpstreamLimit => "upstream's stated limit",
            Self::Credential => "credential cannot get a token or is refused",
            Self::CircuitOpen => "circuit open",
            Self::CircuitHalfOpen => "circuit half-open",
            Self::RequestRate => "request rate",
            Self::TokenBudget => "token budget spent",
            Self::CostBudget => "cost budget spent",
            Self::Concurrency => "concurrency",
            Self::SlowStart => "slow start",
            Self::QuotaBackend => "shared quota state unreachable (fallback closed)",
            Self::Fenced => "this node's leases are in doubt (it fenced itself)",
        }
    }
}

impl std::fmt::Display for Limit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Serialize for Limit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

#[derive(Clone, Debug)]
pub struct QuotaCore {
    pub spec: Arc<QuotaModel>,
    requests: Option<Gcra>,
    aimd: Aimd,
    /// Answered calls lately: what a refusal learns the upstream's real rate from.
    answered: AcceptMeter,
    /// The request rate learned from refusals, when the spec declares none.
    learned: Option<f64>,
    slow_start: Option<SlowStart>,
    tokens: Option<TokenWindow>,
    /// Micro-dollars per window (`cost_usd_per_hour|day`), reserved and settled like tokens.
    cost: Option<TokenWindow>,
    /// The upstream's own buckets, mirrored from its answers (quotas that learn from it).
    upstream_requests: Option<UpstreamBucket>,
    upstream_tokens: Option<UpstreamBucket>,
    in_use: u32,
    /// Tokens reserved by the calls in flight.
    tokens_in_flight: u64,
    /// Tokens reserved by every call started so far.
    tokens_granted: u64,
    /// The latest-started call whose answer stated the upstream's limits.
    newest_observed: u64,
    circuit: Option<CircuitBreaker>,
    refused_until: Option<Instant>,
    /// Why `refused_until` holds, when another node said (else a refusal or a credential).
    held_reason: Option<Limit>,
    /// How the cluster's shared state lets this quota run (a single node: `Shared`, no effect).
    cluster: ClusterMode,
    /// A node of a cluster whose quotas are shared (the mode was set once at least).
    in_cluster: bool,
    /// The live nodes of that cluster: each takes its share of the concurrency.
    nodes: u32,
    /// The rate the cluster learned for this quota (it declares none), as last read.
    cluster_learned: Option<f64>,
    exhausted: Option<Exhaustion>,
    pub granted: u64,
    pub refusals: u64,
    pub exhaustions: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
}

impl QuotaCore {
    pub fn new(spec: Arc<QuotaModel>, now: Instant) -> Self {
        let requests = spec.requests.map(|r| {
            let per_sec = r.per_second();
            // Default burst: a tenth of a second's worth, at least one call.
            let burst = spec
                .burst
                .map_or_else(|| ((per_sec / 10.0).round() as u32).max(1), |b| b.get());
            Gcra::new(per_sec, burst)
        });
        let tokens = spec
            .tokens
            .map(|t| TokenWindow::new(t.amount.get(), t.period));
        let cost = spec
            .cost
            .map(|c| TokenWindow::new(c.amount.get(), c.period));
        let circuit = spec.circuit_breaker.map(CircuitBreaker::new);
        // An upstream whose limits are still to be learned: calls in flight open up one answer
        // at a time until its answers state them (a declared rate above the upstream's would
        // otherwise send its whole burst before the first answer).
        let slow_start = spec.learns().then(SlowStart::new);
        Self {
            spec,
            requests,
            aimd: Aimd::new(now),
            answered: AcceptMeter::new(),
            learned: None,
            slow_start,
            tokens,
            cost,
            upstream_requests: None,
            upstream_tokens: None,
            in_use: 0,
            tokens_in_flight: 0,
            tokens_granted: 0,
            newest_observed: 0,
            circuit,
            refused_until: None,
            held_reason: None,
            cluster: ClusterMode::Shared,
            in_cluster: false,
            nodes: 1,
            cluster_learned: None,
            exhausted: None,
            granted: 0,
            refusals: 0,
            exhaustions: 0,
            prompt_tokens: 0,
            completion_tokens: 0,
        }
    }

    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// When a call asking `demand` could start, and which limit decides it.
    fn ready_with_reason(&mut self, now: Instant, demand: Demand) -> (Ready, Option<Limit>) {
        let tokens = demand.tokens;
        let mut at = now;
        let mut reason = None;
        let mut later = |t: Instant, why: Limit, at: &mut Instant| {
            if t > *at {
                *at = t;
                reason = Some(why);
            }
        };
        if let Some(t) = self.refused_until {
            let why = self.held_reason.unwrap_or(if self.spec.credential {
                Limit::Credential
            } else {
                Limit::UpstreamRateLimit
            });
            later(t, why, &mut at);
        }
        if self.cluster == ClusterMode::Closed {
            // Looked at again each second, until the shared state is back.
            later(now + Duration::from_secs(1), Limit::QuotaBackend, &mut at);
        }
        if let Some(c) = &mut self.circuit {
            match c.gate(now) {
                Gate::Pass => {}
                Gate::OpenUntil(t) => later(t, Limit::CircuitOpen, &mut at),
                Gate::ProbeBusy => return (Ready::Blocked, Some(Limit::CircuitHalfOpen)),
            }
        }
        if self.requests.is_some() {
            let m = self.rate_multiplier(now);
            if let Some(g) = &self.requests {
                later(g.earliest(now, m), Limit::RequestRate, &mut at);
            }
        }
        if let Some(w) = &mut self.tokens {
            later(w.earliest(now, tokens), Limit::TokenBudget, &mut at);
        }
        if let Some(w) = &mut self.cost {
            later(
                w.earliest(now, demand.cost_micros),
                Limit::CostBudget,
                &mut at,
            );
        }
        if let Some(b) = &self.upstream_requests {
            later(b.earliest(now, 1), Limit::UpstreamLimit, &mut at);
        }
        if let Some(b) = &self.upstream_tokens {
            later(b.earliest(now, tokens), Limit::UpstreamLimit, &mut at);
        }
        if at > now {
            return (Ready::At(at), reason);
        }
        if let Some(max) = self.max_concurrency()
            && self.in_use >= max
        {
            return (Ready::Blocked, Some(Limit::Concurrency));
        }
        if let Some(s) = &self.slow_start
            && self.in_use >= s.window()
        {
            return (Ready::Blocked, Some(Limit::SlowStart));
        }
        (Ready::Now, None)
    }

    pub fn ready(&mut self, now: Instant, demand: impl Into<Demand>) -> Ready {
        self.ready_with_reason(now, demand.into()).0
    }

    /// Start a call now (after [`ready`](Self::ready) said `Now`).
    pub fn take(&mut self, now: Instant, demand: impl Into<Demand>) -> Reservation {
        let demand = demand.into();
        let tokens = demand.tokens;
        self.granted += 1;
        self.in_use += 1;
        if self.requests.is_some() {
            let m = self.rate_multiplier(now);
            if let Some(g) = &mut self.requests {
                g.take(now, m);
            }
        }
        if let Some(c) = &mut self.circuit {
            c.on_start();
        }
        if let Some(b) = &mut self.upstream_requests {
            b.take(now, 1);
        }
        if let Some(b) = &mut self.upstream_tokens {
            b.take(now, tokens);
        }
        let (ahead, tokens_ahead) = (self.in_use - 1, self.tokens_in_flight);
        self.tokens_granted += tokens;
        self.tokens_in_flight += tokens;
        let token_id = self.tokens.as_mut().map(|w| w.reserve(now, tokens));
        let cost_id = self
            .cost
            .as_mut()
            .map(|w| w.reserve(now, demand.cost_micros));
        Reservation {
            token_id,
            tokens,
            cost_id,
            cost_micros: demand.cost_micros,
            seq: self.granted,
            tokens_through: self.tokens_granted,
            ahead,
            tokens_ahead,
        }
    }

    /// The cost side of a call's end (before [`settle`](Self::settle)): the dollars it spent,
    /// in micro-dollars, replace its reservation in the cost window.
    pub fn settle_cost(
        &mut self,
        now: Instant,
        r: &Reservation,
        spent: Option<u64>,
        outcome: Outcome,
    ) {
        if let (Some(w), Some(id)) = (&mut self.cost, r.cost_id) {
            let actual = match (spent, outcome) {
                (Some(m), _) => m,
                (None, Outcome::RateLimited(_) | Outcome::Abandoned) => 0,
                // A failed call may have cost something; keep the reservation.
                (None, _) => r.cost_micros,
            };
            w.settle(now, id, r.cost_micros, actual);
        }
    }

    /// A call ended, with what it spent, how, and the limits the upstream's answer stated.
    /// Returns whether the circuit changed state.
    pub fn settle(
        &mut self,
        now: Instant,
        r: Reservation,
        used: Option<(u64, u64)>,
        outcome: Outcome,
        limits: Option<&UpstreamLimits>,
    ) -> bool {
        self.in_use = self.in_use.saturating_sub(1);
        self.tokens_in_flight = self.tokens_in_flight.saturating_sub(r.tokens);
        if let Some((prompt, completion)) = used {
            self.prompt_tokens += prompt;
            self.completion_tokens += completion;
        }
        self.mirror(now, r, used, outcome, limits);
        if let (Some(w), Some(id)) = (&mut self.tokens, r.token_id) {
            let actual = match (used, outcome) {
                (Some((p, c)), _) => p + c,
                // A refused or abandoned call spent nothing upstream.
                (None, Outcome::RateLimited(_) | Outcome::Abandoned) => 0,
                // A failed call may have spent tokens; keep the reservation.
                (None, _) => r.tokens,
            };
            w.settle(now, id, r.tokens, actual);
        }
        if outcome == Outcome::Answered {
            self.answered.record(now);
            if let Some(s) = &mut self.slow_start
                && !s.on_answered()
            {
                self.slow_start = None;
            }
        }
        let mut changed = false;
        if let Some(c) = &mut self.circuit {
            changed = match outcome {
                Outcome::Answered => c.on_outcome(now, true),
                Outcome::Failed => c.on_outcome(now, false),
                Outcome::RateLimited(_) | Outcome::Abandoned => {
                    c.on_abandon();
                    false
                }
            };
        }
        if let Outcome::RateLimited(wait) = outcome {
            self.refused(now, wait);
        }
        changed
    }

    /// Keep the mirrors of the upstream's buckets: a call that never reached it gives back what
    /// it took, one that reported its usage settles on it, and stated limits replace the
    /// estimate (the first ones start the mirror and end the slow start).
    fn mirror(
        &mut self,
        now: Instant,
        r: Reservation,
        used: Option<(u64, u64)>,
        outcome: Outcome,
        limits: Option<&UpstreamLimits>,
    ) {
        let reached = !matches!(outcome, Outcome::Abandoned);
        if let Some(b) = &mut self.upstream_requests
            && !reached
        {
            b.settle(1, 0);
        }
        if let Some(b) = &mut self.upstream_tokens {
            match (used, reached) {
                (Some((p, c)), _) => b.settle(r.tokens, p + c),
                (None, false) => b.settle(r.tokens, 0),
                (None, true) => {}
            }
        }
        let Some(limits) = limits.filter(|_| self.spec.learns()) else {
            return;
        };
        let newest = r.seq > self.newest_observed;
        self.newest_observed = self.newest_observed.max(r.seq);
        // What the answer may not count: any call that reached the upstream after this one.
        // Calls do not arrive in the order they start, nor are they answered in it, so that is
        // every call started after this one (in flight or answered already) and every call
        // that was in flight when this one started — a bound, never an undercount.
        let requests = self.granted.saturating_sub(r.seq) + u64::from(r.ahead);
        let tokens = self.tokens_granted.saturating_sub(r.tokens_through) + r.tokens_ahead;
        let observe = |b: &mut Option<UpstreamBucket>, reading, pending| match (b, reading) {
            (Some(b), Some(reading)) => b.observe(now, reading, pending, newest),
            (b @ None, Some(reading)) => *b = Some(UpstreamBucket::new(now, reading, pending)),
            (_, None) => {}
        };
        observe(&mut self.upstream_requests, limits.requests, requests);
        observe(&mut self.upstream_tokens, limits.tokens, tokens);
        // The upstream's limits are known: no more slow start.
        self.slow_start = None;
    }

    /// The upstream refused a call for rate: wait as asked, lower the rate (AIMD) towards the
    /// rate it has been answering — or learn one, if none is declared — and resume without a
    /// burst, one interval after another.
    pub fn refused(&mut self, now: Instant, wait: Option<Duration>) {
        self.refusals += 1;
        if self.spec.credential {
            // No rate to learn: the credential waits for its next try.
            self.hold(now, wait.unwrap_or(Duration::from_secs(1)));
            return;
        }
        let (answered, _) = self.answered.rate(now);
        match &self.requests {
            Some(g) => {
                // A measure over less than a few tenths of a second says more about bursts than
                // about rate. Past that it is a ceiling worth taking at once: waiting for a whole
                // second let a quota declared at 1.5× its upstream's limit be refused on 1% of
                // its calls while it came down by 5% steps.
                let measured = self.answered.measured(now) >= Duration::from_millis(300);
                let base = g.base_per_second() * self.share();
                // While the quota is shared, the decrease is the shared state's (this node's
                // answered rate is a part of the cluster's, and says nothing of the limit).
                if !(self.in_cluster && self.cluster == ClusterMode::Shared) {
                    self.aimd.on_refusal(now, measured.then(|| answered / base));
                }
            }
            // The upstream states its limits: the mirror of them paces, not a guess.
            None if self.upstream_requests.is_some() || self.upstream_tokens.is_some() => {}
            // While the quota is shared, the cluster learns its rate (from every node's calls);
            // this node's share of them says nothing of the limit.
            None if self.in_cluster && self.cluster == ClusterMode::Shared => {}
            None => {
                // Just under what it answered, at least one call a second; the burst is a tenth
                // of a second's worth, as for a declared rate.
                let rate = (answered * 0.97).max(1.0);
                self.requests = Some(Gcra::new(rate, ((rate / 10.0).round() as u32).max(1)));
                self.learned = Some(rate);
                self.aimd = Aimd::learned(now);
                self.slow_start = None;
            }
        }
        // A rate is declared or learned by now: without a Retry-After, wait a tenth of a second
        // and resume paced by it.
        self.hold(now, wait.unwrap_or(Duration::from_millis(100)));
    }

    /// Start no call for `wait` (an upstream's Retry-After, an operator's exhaust): refused until
    /// then, and the rate's burst is not served at once afterwards.
    pub fn hold(&mut self, now: Instant, wait: Duration) {
        let until = now + wait;
        let until = self.refused_until.map_or(until, |t| t.max(until));
        self.refused_until = Some(until);
        self.held_reason = None;
        if self.requests.is_some() {
            let m = self.rate_multiplier(now);
            if let Some(g) = &mut self.requests {
                g.hold(until, m);
            }
        }
    }

    /// Start no call for `wait` because another node of the cluster said so (its upstream
    /// refused, its circuit opened, the shared bucket is spent): shown with that `reason`. A
    /// longer hold already running is kept, with its reason.
    pub fn hold_for(&mut self, now: Instant, wait: Duration, reason: Limit) {
        if self.refused_until.is_some_and(|t| t >= now + wait) {
            return;
        }
        self.hold(now, wait);
        self.held_reason = Some(reason);
    }

    /// How the cluster's shared state lets this quota run: under `LocalShare(s)` its request
    /// rate and its token and cost budgets are `s` of what it declares.
    pub fn set_cluster(&mut self, mode: ClusterMode) {
        self.cluster = mode;
        self.in_cluster = true;
        let share = self.share();
        if let (Some(w), Some(t)) = (&mut self.tokens, self.spec.tokens) {
            w.set_limit(((t.amount.get() as f64 * share) as u64).max(1));
        }
        if let (Some(w), Some(c)) = (&mut self.cost, self.spec.cost) {
            w.set_limit(((c.amount.get() as f64 * share) as u64).max(1));
        }
    }

    /// The rate the cluster learned for this quota, as it paces now (shown, not enforced here:
    /// the shared state paces by it).
    pub fn set_cluster_learned(&mut self, per_second: f64) {
        self.cluster_learned = Some(per_second);
    }

    /// The cluster has `n` live nodes.
    pub fn set_nodes(&mut self, n: usize) {
        self.nodes = u32::try_from(n).unwrap_or(u32::MAX).max(1);
    }

    /// Calls in flight this node may have: the declared number, or in a cluster this node's
    /// share of it, rounded down (the nodes together do not exceed it, unless there are more
    /// nodes than it allows calls), at least one. Kept
    /// locally rather than as a semaphore in the shared state: a slot held by a node that dies
    /// would need a lease of its own, and calls would pay a second round trip to give theirs
    /// back.
    fn max_concurrency(&self) -> Option<u32> {
        let max = self.spec.max_concurrency?.get();
        Some(if self.in_cluster {
            (max / self.nodes).max(1)
        } else {
            max
        })
    }

    fn share(&self) -> f64 {
        match self.cluster {
            ClusterMode::LocalShare(s) => s.clamp(0.0, 1.0),
            ClusterMode::Shared | ClusterMode::Closed => 1.0,
        }
    }

    /// The request rate's multiplier: AIMD's, times the cluster share.
    fn rate_multiplier(&mut self, now: Instant) -> f64 {
        self.aimd.multiplier(now) * self.share()
    }

    /// Until when the circuit is open, if it is.
    pub fn circuit_open_until(&mut self, now: Instant) -> Option<Instant> {
        match self.circuit.as_mut()?.gate(now) {
            Gate::OpenUntil(t) => Some(t),
            Gate::Pass | Gate::ProbeBusy => None,
        }
    }

    /// Re-evaluate exhaustion for a next call of `tokens`, with hysteresis: a quota becomes
    /// exhausted when that call would wait longer than `pause_threshold`, and is available again
    /// only once it could start within half of it. Returns `Some(new state)` when it changed.
    pub fn update_exhaustion(
        &mut self,
        now: Instant,
        demand: impl Into<Demand>,
    ) -> Option<Option<Exhaustion>> {
        let tokens = demand.into();
        if self.refused_until.is_some_and(|t| t <= now) {
            self.refused_until = None;
            self.held_reason = None;
        }
        let (ready, reason) = self.ready_with_reason(now, tokens);
        let threshold = self.spec.pause_threshold;
        let next = match ready {
            Ready::At(t) => {
                let wait = t - now;
                let exhausted = if self.exhausted.is_some() {
                    wait > threshold / 2
                } else {
                    wait > threshold
                };
                reason
                    .filter(|_| exhausted)
                    .map(|reason| Exhaustion { until: t, reason })
            }
            // Waiting for a slot or a probe is pacing, not exhaustion.
            Ready::Now | Ready::Blocked => None,
        };
        let changed = match (&self.exhausted, &next) {
            (None, None) => false,
            (Some(a), Some(b)) => a.until != b.until || a.reason != b.reason,
            _ => true,
        };
        if !changed {
            return None;
        }
        if self.exhausted.is_none() && next.is_some() {
            self.exhaustions += 1;
        }
        self.exhausted = next.clone();
        Some(next)
    }

    pub fn exhausted(&self) -> Option<&Exhaustion> {
        self.exhausted.as_ref()
    }

    pub fn circuit_state(&self) -> Option<CircuitState> {
        self.circuit.as_ref().map(CircuitBreaker::state)
    }

    pub fn snapshot(&mut self, now: Instant) -> QuotaSnapshot {
        let multiplier = self.aimd.multiplier(now);
        QuotaSnapshot {
            name: self.spec.name.to_string(),
            requests_limit: self.spec.requests.map(|r| r.to_string()),
            tokens_limit: self.spec.tokens.map(|r| r.to_string()),
            cost_limit: self.spec.cost.map(|c| cost_text(&c)),
            cost_used_usd: self.cost.as_mut().map(|w| w.used(now) as f64 / 1e6),
            max_concurrency: self.max_concurrency(),
            requests_available: self.requests.as_ref().map(|g| g.available(now, multiplier)),
            requests_per_second: self.spec.requests.map(|r| r.per_second()),
            learned_requests_per_second: match self.cluster {
                ClusterMode::Shared if self.in_cluster => self.cluster_learned,
                _ => self.learned.map(|base| base * multiplier),
            },
            implicit: self.spec.implicit,
            slow_start_window: self.slow_start.as_ref().map(SlowStart::window),
            tokens_window_limit: self.spec.tokens.map(|t| t.amount.get()),
            tokens_used: self.tokens.as_mut().map(|w| w.used(now)),
            tokens_available: self
                .tokens
                .as_mut()
                .map(|w| w.limit().saturating_sub(w.used(now))),
            in_flight: self.in_use,
            effective_rate_multiplier: multiplier,
            exhausted_for_ms: self
                .exhausted
                .as_ref()
                .map(|e| e.until.saturating_duration_since(now).as_millis() as u64),
            exhausted_reason: self.exhausted.as_ref().map(|e| e.reason),
            circuit: self.circuit_state(),
            granted: self.granted,
            refusals: self.refusals,
            exhaustions: self.exhaustions,
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            upstream_requests: self.upstream_requests.as_ref().map(|b| b.snapshot(now)),
            upstream_tokens: self.upstream_tokens.as_ref().map(|b| b.snapshot(now)),
        }
    }
}

/// A cost rate (micro-dollars per window) as people write it: `$50/day`, `$5/hour`.
pub fn cost_text(c: &crate::model::Rate) -> String {
    let usd = c.amount.get() as f64 / 1e6;
    let per = match c.period.as_secs() {
        86_400 => "day".to_string(),
        3_600 => "hour".to_string(),
        s => format!("{s}s"),
    };
    format!("${usd}/{per}")
}

/// A quota's state, for the API, the dashboard and tests.
#[derive(Clone, Debug, Serialize)]
pub struct QuotaSnapshot {
    pub name: String,
    pub requests_limit: Option<String>,
    pub tokens_limit: Option<String>,
    /// `cost_usd_per_hour|day`, as `$5/hour`.
    pub cost_limit: Option<String>,
    /// Dollars spent within the current window (reservations of calls under way included).
    pub cost_used_usd: Option<f64>,
    pub max_concurrency: Option<u32>,
    pub requests_available: Option<u32>,
    pub requests_per_second: Option<f64>,
    /// The rate learned from the upstream's refusals, when none is declared.
    pub learned_requests_per_second: Option<f64>,
    /// Not declared: the quota of an upstream its agents call without naming a quota.
    pub implicit: bool,
    /// Calls allowed in flight while an implicit quota slow-starts.
    pub slow_start_window: Option<u32>,
    pub tokens_used: Option<u64>,
    pub tokens_window_limit: Option<u64>,
    pub tokens_available: Option<u64>,
    pub in_flight: u32,
    /// AIMD's scale on the configured request rate (1.0 = as configured).
    pub effective_rate_multiplier: f64,
    pub exhausted_for_ms: Option<u64>,
    pub exhausted_reason: Option<Limit>,
    pub circuit: Option<CircuitState>,
    pub granted: u64,
    pub refusals: u64,
    pub exhaustions: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// The upstream's request bucket as its answers state it (quotas that learn from it).
    pub upstream_requests: Option<UpstreamBucketSnapshot>,
    /// The upstream's token bucket as its answers state it.
    pub upstream_tokens: Option<UpstreamBucketSnapshot>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Rate;
    use std::num::{NonZeroU32, NonZeroU64};

    fn quota(requests: Option<(u64, u64)>, tokens: Option<u64>, conc: Option<u32>) -> QuotaCore {
        let spec = QuotaModel {
            name: "q".into(),
            requests: requests.map(|(n, secs)| Rate {
                amount: NonZeroU64::new(n).unwrap(),
                period: Duration::from_secs(secs),
            }),
            tokens: tokens.map(|t| Rate {
                amount: NonZeroU64::new(t).unwrap(),
                period: Duration::from_secs(60),
            }),
            cost: None,
            burst: Some(NonZeroU32::new(1).unwrap()),
            max_concurrency: conc.and_then(NonZeroU32::new),
            circuit_breaker: None,
            pause_threshold: Duration::from_millis(250),
            declared_at: String::new(),
            implicit: false,
            learn_from_upstream: false,
            credential: false,
            tenant_share: Vec::new(),
        };
        QuotaCore::new(Arc::new(spec), Instant::now())
    }

    /// A node of a cluster whose shared quota state is unreachable runs on its share: a third of
    /// the rate and of the token budget; `closed` starts nothing; back to shared, the whole.
    #[tokio::test(start_paused = true)]
    async fn a_cluster_fallback_runs_on_a_share_or_closed() {
        let now = Instant::now();
        let mut q = quota(Some((30, 1)), Some(900), None);
        q.set_cluster(ClusterMode::LocalShare(1.0 / 3.0));
        let _ = q.take(now, 100);
        // 30/s is a call every 33 ms; a third of it, every 100 ms.
        let Ready::At(t) = q.ready(now, 100) else {
            panic!("paced")
        };
        assert!((t - now).as_millis().abs_diff(100) <= 1, "{:?}", t - now);
        // 300 tokens of the 900 a minute: 100 spent, 200 fit, 201 do not.
        let later = now + Duration::from_millis(200);
        assert_eq!(q.ready(later, 200), Ready::Now);
        assert_eq!(
            q.ready(later, 201),
            Ready::At(now + Duration::from_secs(60))
        );
        q.set_cluster(ClusterMode::Closed);
        assert_eq!(q.ready(later, 1), Ready::At(later + Duration::from_secs(1)));
        assert_eq!(
            q.update_exhaustion(later, 1),
            Some(Some(Exhaustion {
                until: later + Duration::from_secs(1),
                reason: Limit::QuotaBackend
            }))
        );
        q.set_cluster(ClusterMode::Shared);
        assert_eq!(q.ready(later, 800), Ready::Now);
    }

    /// A hold another node announced shows with its reason, and a shorter one does not cut a
    /// longer one short.
    #[tokio::test(start_paused = true)]
    async fn a_remote_hold_pauses_with_its_reason() {
        let now = Instant::now();
        let mut q = quota(Some((10, 1)), None, None);
        q.hold_for(now, Duration::from_secs(5), Limit::CircuitOpen);
        q.hold_for(now, Duration::from_secs(1), Limit::TokenBudget);
        let e = q.update_exhaustion(now, 0).unwrap().unwrap();
        assert_eq!(e.reason, Limit::CircuitOpen);
        assert_eq!(e.until, now + Duration::from_secs(5));
        // Past it, available again, and a local refusal reads as one.
        let after = now + Duration::from_secs(6);
        assert_eq!(q.update_exhaustion(after, 0), Some(None));
        q.hold(after, Duration::from_secs(2));
        let e = q.update_exhaustion(after, 0).unwrap().unwrap();
        assert_eq!(e.reason, Limit::UpstreamRateLimit);
    }

    #[tokio::test(start_paused = true)]
    async fn request_and_token_limits_both_hold() {
        let now = Instant::now();
        let mut q = quota(Some((10, 1)), Some(1000), None);
        assert_eq!(q.ready(now, 600), Ready::Now);
        let r = q.take(now, 600);
        // The request rate says 100 ms; the tokens say a minute: the later wins.
        assert_eq!(q.ready(now, 600), Ready::At(now + Duration::from_secs(60)));
        assert_eq!(
            q.ready(now, 300),
            Ready::At(now + Duration::from_millis(100))
        );
        // Settled lower: the tokens come back.
        q.settle(now, r, Some((100, 100)), Outcome::Answered, None);
        assert_eq!(
            q.ready(now, 600),
            Ready::At(now + Duration::from_millis(100))
        );
    }

    #[tokio::test(start_paused = true)]
    async fn exhaustion_has_hysteresis_and_a_reason() {
        let now = Instant::now();
        let mut q = quota(None, Some(1000), None);
        q.take(now, 1000);
        let ex = q.update_exhaustion(now, 100).unwrap().unwrap();
        assert_eq!(ex.reason, Limit::TokenBudget);
        assert_eq!(
            serde_json::to_value(&ex).unwrap()["reason"],
            "token budget spent"
        );
        assert_eq!(ex.until, now + Duration::from_secs(60));
        assert_eq!(q.update_exhaustion(now, 100), None, "no change, no event");
        // 200 ms before the window frees: within the threshold (250 ms) but not within half of
        // it, so still exhausted.
        let t = now + Duration::from_millis(59_800);
        assert_eq!(q.update_exhaustion(t, 100), None);
        let t = now + Duration::from_millis(59_900);
        assert_eq!(q.update_exhaustion(t, 100), Some(None));
    }

    #[tokio::test(start_paused = true)]
    async fn refusal_pauses_and_lowers_the_rate() {
        let now = Instant::now();
        let mut q = quota(Some((100, 1)), None, None);
        let r = q.take(now, 0);
        q.settle(
            now,
            r,
            None,
            Outcome::RateLimited(Some(Duration::from_secs(2))),
            None,
        );
        assert_eq!(q.refusals, 1);
        let ex = q.update_exhaustion(now, 0).unwrap().unwrap();
        assert_eq!(
            (ex.until, ex.reason),
            (now + Duration::from_secs(2), Limit::UpstreamRateLimit)
        );
        assert!(q.snapshot(now).effective_rate_multiplier < 1.0);
        assert_eq!(
            q.update_exhaustion(now + Duration::from_secs(2), 0),
            Some(None)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn an_implicit_quota_slow_starts_then_learns_a_rate_at_the_first_refusal() {
        let now = Instant::now();
        let spec = QuotaModel::implicit("up", String::new(), Duration::from_millis(250));
        let mut q = QuotaCore::new(Arc::new(spec), now);
        assert_eq!(&*q.spec.name, "upstream:up");
        assert!(q.spec.circuit_breaker.is_some());
        // A few calls at first, not the whole storm.
        let mut held = Vec::new();
        while q.ready(now, 0) == Ready::Now {
            held.push(q.take(now, 0));
        }
        assert_eq!(held.len(), SlowStart::INITIAL as usize);
        // Each answer lets one more go.
        let t = now + Duration::from_millis(50);
        for r in held.drain(..) {
            q.settle(t, r, None, Outcome::Answered, None);
        }
        assert_eq!(
            q.snapshot(t).slow_start_window,
            Some(SlowStart::INITIAL * 2)
        );
        // Refused: a rate just under what it answered (16 in 100 ms), calls resume paced.
        let r = q.take(t, 0);
        q.settle(
            t,
            r,
            None,
            Outcome::RateLimited(Some(Duration::from_millis(5))),
            None,
        );
        let learned = q.snapshot(t).learned_requests_per_second.unwrap();
        assert!((learned - 0.97 * 160.0).abs() < 1e-6, "{learned}");
        assert_eq!(q.snapshot(t).slow_start_window, None);
        let resume = t + Duration::from_millis(5);
        assert_eq!(q.ready(t, 0), Ready::At(resume));
        q.take(resume, 0);
        // No burst after the refusal: the next call waits one interval.
        assert!(matches!(q.ready(resume, 0), Ready::At(at) if at > resume));
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_blocks_without_exhausting() {
        let now = Instant::now();
        let mut q = quota(None, None, Some(1));
        let r = q.take(now, 0);
        assert_eq!(q.ready(now, 0), Ready::Blocked);
        assert_eq!(q.update_exhaustion(now, 0), None);
        q.settle(now, r, None, Outcome::Answered, None);
        assert_eq!(q.ready(now, 0), Ready::Now);
    }

    /// In a cluster, each node takes its share of a quota's concurrency, rounded down (the
    /// nodes together never exceed it), at least one; a node that goes leaves its share to the
    /// others.
    #[tokio::test(start_paused = true)]
    async fn a_cluster_node_takes_its_share_of_the_concurrency() {
        let now = Instant::now();
        let mut q = quota(None, None, Some(10));
        q.set_cluster(ClusterMode::Shared);
        q.set_nodes(3);
        let held: Vec<_> = (0..3).map(|_| q.take(now, 0)).collect();
        assert_eq!(q.ready(now, 0), Ready::Blocked);
        assert_eq!(q.snapshot(now).max_concurrency, Some(3));
        q.set_nodes(2);
        let _more: Vec<_> = (0..2).map(|_| q.take(now, 0)).collect();
        assert_eq!(q.ready(now, 0), Ready::Blocked);
        q.set_nodes(20);
        for r in held {
            q.settle(now, r, None, Outcome::Answered, None);
        }
        // One each, at least, whatever the count.
        assert_eq!(q.snapshot(now).max_concurrency, Some(1));
    }
}
