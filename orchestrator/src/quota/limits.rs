//! The limits a quota enforces, each a small state machine on `tokio::time`:
//! - [`Gcra`]: requests per period with a burst, whose rate an [`Aimd`] multiplier scales;
//! - [`TokenWindow`]: tokens per period, reserved before a call and settled after it;
//! - [`AcceptMeter`]: the rate at which the upstream answered lately, which refusals learn from;
//! - [`SlowStart`]: how many calls an upstream of unknown limit may have in flight;
//! - [`UpstreamBucket`]: an upstream's own bucket, mirrored from the limits its answers state.
//!
//! governor implements GCRA well, but reads its own clock (which a paused tokio clock does not
//! move, so tests could not be exact) and has no reserve-then-settle for token budgets or a
//! variable rate for AIMD: these are small enough to own.

use std::collections::VecDeque;
use std::time::Duration;

use tokio::time::Instant;

pub use cascade_agents::Gcra;
use cascade_agents::LimitReading;

/// Additive increase, multiplicative decrease of a quota's effective rate. Every refusal by the
/// upstream (at most one per `cooldown`) multiplies the rate by `DECREASE` — or, when the upstream
/// has been answering fewer calls than that, brings it just under the rate it answered, so that a
/// limit configured far too high converges in one step rather than many; every second without a
/// refusal adds `INCREASE` of the configured rate back, up to the configured rate. A limit
/// configured above the upstream's real one thus settles just under the real one.
///
/// A learned rate (a quota that declares none) has no configured ceiling: it climbs by a share
/// of itself per second, so that it also finds an upstream that is faster than its first guess —
/// quickly until its first decrease (the first guess is measured over a short time), slowly
/// after it.
#[derive(Clone, Debug)]
pub struct Aimd {
    multiplier: f64,
    updated: Instant,
    last_decrease: Option<Instant>,
    learned: bool,
    /// A learned rate not decreased yet since it was learned.
    probing: bool,
}

impl Aimd {
    const DECREASE: f64 = 0.95;
    /// How far under the answered rate a decrease lands.
    const UNDER_ANSWERED: f64 = 0.97;
    /// One decrease at most halves the rate, whatever the measure says.
    const MAX_CUT: f64 = 0.5;
    const INCREASE_PER_SEC: f64 = 0.01;
    const LEARNED_GROWTH_PER_SEC: f64 = 0.02;
    const PROBING_GROWTH_PER_SEC: f64 = 0.10;
    const LEARNED_CEILING: f64 = 100.0;
    const FLOOR: f64 = 0.05;
    const COOLDOWN: Duration = Duration::from_millis(250);

    pub fn new(now: Instant) -> Self {
        Self {
            multiplier: 1.0,
            updated: now,
            last_decrease: None,
            learned: false,
            probing: false,
        }
    }

    /// For a rate learned at `now` (the multiplier's 1.0).
    pub fn learned(now: Instant) -> Self {
        Self {
            last_decrease: Some(now),
            learned: true,
            probing: true,
            ..Self::new(now)
        }
    }

    /// The current multiplier, after the increase earned since the last look.
    pub fn multiplier(&mut self, now: Instant) -> f64 {
        let secs = now.saturating_duration_since(self.updated).as_secs_f64();
        self.multiplier = if self.learned {
            let growth = if self.probing {
                Self::PROBING_GROWTH_PER_SEC
            } else {
                Self::LEARNED_GROWTH_PER_SEC
            };
            (self.multiplier * (1.0 + secs * growth)).min(Self::LEARNED_CEILING)
        } else {
            (self.multiplier + secs * Self::INCREASE_PER_SEC).min(1.0)
        };
        self.updated = now;
        self.multiplier
    }

    /// The upstream refused: decrease, unless a decrease happened within the cooldown (one
    /// burst of refusals is one signal). `answered` is the rate the upstream answered lately,
    /// as a multiple of the base rate.
    pub fn on_refusal(&mut self, now: Instant, answered: Option<f64>) -> bool {
        let current = self.multiplier(now);
        if self
            .last_decrease
            .is_some_and(|t| now.duration_since(t) < Self::COOLDOWN)
        {
            return false;
        }
        self.last_decrease = Some(now);
        self.probing = false;
        let mut next = current * Self::DECREASE;
        if let Some(a) = answered {
            next = next.min(a * Self::UNDER_ANSWERED);
        }
        self.multiplier = next.max(current * Self::MAX_CUT).max(Self::FLOOR);
        true
    }
}

/// Two counts over a sliding window, kept in `N` buckets of `window / N`: its memory is fixed
/// whatever the rate of events, and an event leaves the window within one bucket of `window`.
#[derive(Clone, Debug)]
pub struct SlidingCounts<const N: usize> {
    bucket: Duration,
    counts: [[u32; 2]; N],
    /// Index of the current bucket, counted from `started` in `bucket` steps.
    current: u64,
    started: Option<Instant>,
}

impl<const N: usize> SlidingCounts<N> {
    pub fn new(window: Duration) -> Self {
        Self {
            bucket: (window / N as u32).max(Duration::from_micros(1)),
            counts: [[0; 2]; N],
            current: 0,
            started: None,
        }
    }

    fn advance(&mut self, now: Instant) {
        let Some(started) = self.started else { return };
        let index =
            (now.saturating_duration_since(started).as_nanos() / self.bucket.as_nanos()) as u64;
        if index >= self.current + N as u64 {
            self.counts = [[0; 2]; N];
        } else {
            for i in self.current + 1..=index {
                self.counts[(i % N as u64) as usize] = [0; 2];
            }
        }
        self.current = self.current.max(index);
    }

    pub fn add(&mut self, now: Instant, a: u32, b: u32) {
        self.started.get_or_insert(now);
        self.advance(now);
        let c = &mut self.counts[(self.current % N as u64) as usize];
        c[0] = c[0].saturating_add(a);
        c[1] = c[1].saturating_add(b);
    }

    /// The two counts over the window.
    pub fn sum(&mut self, now: Instant) -> (u32, u32) {
        self.advance(now);
        self.counts
            .iter()
            .fold((0, 0), |(a, b), c| (a + c[0], b + c[1]))
    }

    /// How long the window covers now: from the first event, at most the whole window (at least
    /// one bucket), and whether it is whole.
    pub fn span(&self, now: Instant) -> (Duration, bool) {
        let Some(started) = self.started else {
            return (Duration::ZERO, false);
        };
        let since = now.saturating_duration_since(started);
        let in_current = since.saturating_sub(self.bucket * self.current as u32);
        let full = self.bucket * (N as u32 - 1) + in_current;
        (since.min(full).max(self.bucket), since >= full)
    }
}

/// The rate at which an upstream answered calls over the last second, in ten 100 ms buckets.
#[derive(Clone, Debug)]
pub struct AcceptMeter {
    counts: SlidingCounts<10>,
}

impl AcceptMeter {
    pub fn new() -> Self {
        Self {
            counts: SlidingCounts::new(Duration::from_secs(1)),
        }
    }

    pub fn record(&mut self, now: Instant) {
        self.counts.add(now, 1, 0);
    }

    /// Answered calls per second over the last second (or since the first answer, if shorter;
    /// at least one bucket long), and whether a whole second was measured.
    pub fn rate(&mut self, now: Instant) -> (f64, bool) {
        if self.counts.started.is_none() {
            return (0.0, false);
        }
        let (sum, _) = self.counts.sum(now);
        let (window, whole) = self.counts.span(now);
        (f64::from(sum) / window.as_secs_f64(), whole)
    }
}

impl AcceptMeter {
    /// How long the rate has been measured over (at most a second).
    pub fn measured(&self, now: Instant) -> Duration {
        if self.counts.started.is_none() {
            return Duration::ZERO;
        }
        self.counts.span(now).0
    }
}

impl Default for AcceptMeter {
    fn default() -> Self {
        Self::new()
    }
}

/// How many calls an upstream whose limit is unknown may have in flight: a few at first, one
/// more for each call it answers, so that a storm of waiting calls does not all arrive at once
/// at an upstream that would refuse most of them (TCP's slow start, on calls instead of
/// segments). It ends when the window outgrows any concurrency a graph has, or at the first
/// refusal, from which a learned rate governs.
#[derive(Clone, Debug)]
pub struct SlowStart {
    window: u32,
}

impl SlowStart {
    pub const INITIAL: u32 = 16;
    pub const END: u32 = 1 << 16;

    pub fn new() -> Self {
        Self {
            window: Self::INITIAL,
        }
    }

    pub fn window(&self) -> u32 {
        self.window
    }

    /// A call was answered; returns whether slow start goes on.
    pub fn on_answered(&mut self) -> bool {
        self.window += 1;
        self.window < Self::END
    }
}

impl Default for SlowStart {
    fn default() -> Self {
        Self::new()
    }
}

/// Tokens per `period`, as an exact sliding window: the tokens of every call in the last period
/// are kept, so no window of that length ever holds more than `limit` — plus, at most, the
/// overspend of calls that used more than they reserved (debt, which delays later calls).
#[derive(Clone, Debug)]
pub struct TokenWindow {
    limit: u64,
    period: Duration,
    log: VecDeque<Spend>,
    sum: u64,
    next_id: u64,
}

#[derive(Clone, Copy, Debug)]
struct Spend {
    at: Instant,
    tokens: u64,
    id: u64,
}

impl TokenWindow {
    pub fn new(limit: u64, period: Duration) -> Self {
        Self {
            limit,
            period,
            log: VecDeque::new(),
            sum: 0,
            next_id: 0,
        }
    }

    fn prune(&mut self, now: Instant) {
        while let Some(s) = self.log.front() {
            if now.duration_since(s.at) >= self.period {
                self.sum -= s.tokens;
                self.log.pop_front();
            } else {
                break;
            }
        }
    }

    /// Tokens spent within the window ending now.
    pub fn used(&mut self, now: Instant) -> u64 {
        self.prune(now);
        self.sum
    }

    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// A new limit (a node's share of a cluster's quota while the shared state is unreachable);
    /// what the window holds stays.
    pub fn set_limit(&mut self, limit: u64) {
        self.limit = limit;
    }

    /// The earliest instant `cost` tokens fit. A call larger than the whole limit fits once the
    /// window is empty (it goes alone rather than never).
    pub fn earliest(&mut self, now: Instant, cost: u64) -> Instant {
        self.prune(now);
        if self.sum + cost <= self.limit {
            return now;
        }
        if cost > self.limit {
            return self.log.back().map_or(now, |s| s.at + self.period);
        }
        let need = self.sum + cost - self.limit;
        let mut freed = 0;
        for s in &self.log {
            freed += s.tokens;
            if freed >= need {
                return s.at + self.period;
            }
        }
        now
    }

    /// Reserve `cost` tokens now; returns the reservation's id.
    pub fn reserve(&mut self, now: Instant, cost: u64) -> u64 {
        self.prune(now);
        self.next_id += 1;
        self.log.push_back(Spend {
            at: now,
            tokens: cost,
            id: self.next_id,
        });
        self.sum += cost;
        self.next_id
    }

    /// Settle a reservation on the tokens really used. Underspend is given back; overspend is
    /// debt: it stays in the window and delays later calls.
    pub fn settle(&mut self, now: Instant, id: u64, reserved: u64, actual: u64) {
        self.prune(now);
        if let Some(s) = self.log.iter_mut().rev().find(|s| s.id == id) {
            self.sum = self.sum - s.tokens + actual;
            s.tokens = actual;
        } else if actual > reserved {
            // The reservation has left the window already; the overspend is recorded now.
            self.log.push_back(Spend {
                at: now,
                tokens: actual - reserved,
                id: 0,
            });
            self.sum += actual - reserved;
        }
    }
}

/// An upstream's own bucket (requests or tokens), mirrored from what its answers state: the
/// `remaining` of the latest answer, less what calls still in flight may spend; refilled between
/// answers at the rate the answers show (`(limit − remaining) / reset`, averaged), and spent by
/// every call started since. Providers refill continuously up to a per-minute limit, which is
/// the rate assumed until one is measured; an API with fixed windows refills all at once at its
/// reset, which a steady refill undershoots — the mirror errs on the safe side either way.
#[derive(Clone, Debug)]
pub struct UpstreamBucket {
    limit: f64,
    /// Refill per second: `refilled / over` once measured.
    rate: f64,
    /// Averages of what answers said was missing and how long until it is back: their ratio is
    /// the rate, in which answers far from full (whose counts are precise relative to their
    /// size) weigh most.
    refilled: f64,
    over: f64,
    /// Whether `rate` was measured, rather than assumed to be the limit per minute.
    measured: bool,
    /// What the bucket held at `at` (negative: more spent since than it held).
    level: f64,
    at: Instant,
}

/// What a quota knows of one of its upstream's buckets, for the API and the dashboard.
#[derive(Clone, Copy, Debug, serde::Serialize)]
pub struct UpstreamBucketSnapshot {
    pub limit: u64,
    /// Estimated to be left now.
    pub available: f64,
    pub per_second: f64,
    /// Whether the rate was measured from the upstream's resets (else: the limit per minute).
    pub measured: bool,
}

impl UpstreamBucket {
    /// How far one answer's measure moves the rate.
    const SMOOTHING: f64 = 0.25;
    /// A reset shorter than this is too coarse (whole milliseconds) to measure a rate from.
    const MIN_RESET: Duration = Duration::from_millis(20);
    /// The longest a call waits on the mirror before the upstream is asked again.
    const MAX_WAIT: Duration = Duration::from_secs(60);

    pub fn new(now: Instant, reading: LimitReading, pending: u64) -> Self {
        let mut b = Self {
            limit: reading.limit as f64,
            rate: reading.limit as f64 / 60.0,
            refilled: 0.0,
            over: 0.0,
            measured: false,
            level: 0.0,
            at: now,
        };
        b.observe(now, reading, pending, true);
        b
    }

    /// An answer stated the bucket; `pending`: at most what the calls the answer may not count
    /// spend of it, so that what it states less `pending` is a lower bound of the bucket. The
    /// answer to the newest call answered so far replaces the estimate (it also corrects a
    /// refill estimated too fast); an older one, answered late, can only raise it to its bound.
    pub fn observe(&mut self, now: Instant, reading: LimitReading, pending: u64, newest: bool) {
        let limit = reading.limit as f64;
        let remaining = reading.remaining as f64;
        if limit != self.limit {
            self.limit = limit;
            if !self.measured {
                self.rate = limit / 60.0;
            }
        }
        if let Some(reset) = reading.reset
            && reset >= Self::MIN_RESET
            && remaining < limit
        {
            // A remaining count is whole: a bucket refilled continuously holds up to one more.
            let missing = limit - remaining - 0.5;
            let secs = reset.as_secs_f64();
            if self.measured {
                self.refilled += Self::SMOOTHING * (missing - self.refilled);
                self.over += Self::SMOOTHING * (secs - self.over);
            } else {
                (self.refilled, self.over) = (missing, secs);
            }
            self.rate = self.refilled / self.over;
            self.measured = true;
        }
        let stated = remaining - pending as f64;
        self.level = if newest {
            stated
        } else {
            stated.max(self.available(now))
        };
        self.at = now;
    }

    fn available(&self, now: Instant) -> f64 {
        let secs = now.saturating_duration_since(self.at).as_secs_f64();
        (self.level + secs * self.rate).min(self.limit)
    }

    /// What is left unspent in the bucket: answers can overtake each other and requests reach
    /// the upstream in another order than they were started in, so the mirror can be a call or
    /// two ahead of the upstream. A fixed reserve costs a little of a burst and nothing of the
    /// sustained rate.
    fn headroom(&self) -> f64 {
        (self.limit * 0.02).max(2.0).min(self.limit / 10.0)
    }

    /// When `cost` fits (a cost over the whole limit: once the bucket is full).
    pub fn earliest(&self, now: Instant, cost: u64) -> Instant {
        let headroom = self.headroom();
        let missing = (cost as f64).min(self.limit - headroom) + headroom - self.available(now);
        if missing <= 0.0 {
            return now;
        }
        now + Duration::from_secs_f64(missing / self.rate.max(1e-9)).min(Self::MAX_WAIT)
    }

    /// A call started, spending `cost`.
    pub fn take(&mut self, now: Instant, cost: u64) {
        self.level = self.available(now) - cost as f64;
        self.at = now;
    }

    /// A call spent `actual` of the `reserved` it took (a call that never reached the
    /// upstream: zero).
    pub fn settle(&mut self, reserved: u64, actual: u64) {
        self.level += reserved as f64 - actual as f64;
    }

    pub fn snapshot(&self, now: Instant) -> UpstreamBucketSnapshot {
        UpstreamBucketSnapshot {
            limit: self.limit as u64,
            available: self.available(now),
            per_second: self.rate,
            measured: self.measured,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn aimd_decreases_once_per_burst_and_climbs_back() {
        let t0 = Instant::now();
        let mut a = Aimd::new(t0);
        assert!(a.on_refusal(t0, None));
        assert!(
            !a.on_refusal(t0 + Duration::from_millis(100), None),
            "one burst, one decrease"
        );
        assert!((a.multiplier(t0 + Duration::from_millis(100)) - 0.951).abs() < 1e-9);
        assert!((a.multiplier(t0 + Duration::from_secs(3)) - 0.98).abs() < 1e-9);
        assert_eq!(a.multiplier(t0 + Duration::from_secs(60)), 1.0);
    }

    #[tokio::test(start_paused = true)]
    async fn aimd_lands_under_the_answered_rate_and_a_learned_rate_climbs() {
        let t0 = Instant::now();
        let mut a = Aimd::new(t0);
        // Configured 300/s, the upstream answered 200/s: one step to just under 200.
        assert!(a.on_refusal(t0, Some(200.0 / 300.0)));
        let m = a.multiplier(t0);
        assert!((m - 0.97 * 2.0 / 3.0).abs() < 1e-9, "{m}");
        // Never more than halved at once, whatever the measure.
        let mut a = Aimd::new(t0);
        a.on_refusal(t0, Some(0.01));
        assert!((a.multiplier(t0) - 0.5).abs() < 1e-9);
        // A learned rate grows by a share of itself: fast before its first decrease, slow after.
        let mut a = Aimd::learned(t0);
        assert!((a.multiplier(t0 + Duration::from_secs(1)) - 1.1).abs() < 1e-9);
        assert!(a.on_refusal(t0 + Duration::from_secs(1), Some(1.0)));
        let m = a.multiplier(t0 + Duration::from_secs(1));
        assert!((m - 0.97).abs() < 1e-9, "{m}");
        let later = a.multiplier(t0 + Duration::from_secs(2));
        assert!((later - 0.97 * 1.02).abs() < 1e-9, "{later}");
    }

    #[tokio::test(start_paused = true)]
    async fn accept_meter_counts_the_last_second_in_fixed_space() {
        let t0 = Instant::now();
        let mut m = AcceptMeter::new();
        assert_eq!(m.rate(t0), (0.0, false));
        // 200 answers a second for two seconds.
        for i in 0..400u32 {
            m.record(t0 + Duration::from_millis(5) * i);
        }
        let (rate, whole) = m.rate(t0 + Duration::from_millis(2000));
        assert!(whole);
        assert!((rate - 200.0).abs() < 25.0, "{rate}");
        // Early on, the window is what was measured, at least one bucket.
        let mut m = AcceptMeter::new();
        for _ in 0..20 {
            m.record(t0);
        }
        assert_eq!(m.rate(t0), (200.0, false));
        // Silence empties it.
        assert_eq!(m.rate(t0 + Duration::from_secs(5)).0, 0.0);
    }

    #[test]
    fn slow_start_opens_one_call_per_answer_and_ends() {
        let mut s = SlowStart::new();
        assert_eq!(s.window(), SlowStart::INITIAL);
        assert!(s.on_answered());
        assert_eq!(s.window(), SlowStart::INITIAL + 1);
        while s.on_answered() {}
        assert_eq!(s.window(), SlowStart::END);
    }

    #[tokio::test(start_paused = true)]
    async fn token_window_reserves_settles_and_carries_debt() {
        let t0 = Instant::now();
        let mut w = TokenWindow::new(1000, Duration::from_secs(60));
        let a = w.reserve(t0, 600);
        assert_eq!(w.earliest(t0, 400), t0);
        assert_eq!(w.earliest(t0, 500), t0 + Duration::from_secs(60));
        // Used less than reserved: the difference is free again.
        w.settle(t0, a, 600, 300);
        assert_eq!(w.used(t0), 300);
        assert_eq!(w.earliest(t0, 700), t0);
        // Used more than reserved: debt delays the next call.
        let b = w.reserve(t0 + Duration::from_secs(1), 500);
        w.settle(t0 + Duration::from_secs(2), b, 500, 900);
        assert_eq!(w.used(t0 + Duration::from_secs(2)), 1200);
        // 1200 used: the next token fits only once the first call (300) leaves the window.
        assert_eq!(
            w.earliest(t0 + Duration::from_secs(2), 1),
            t0 + Duration::from_secs(60)
        );
        assert_eq!(
            w.earliest(t0 + Duration::from_secs(2), 101),
            t0 + Duration::from_secs(61)
        );
        // A reservation settled after it left the window still records its overspend.
        let c = w.reserve(t0 + Duration::from_secs(61), 100);
        w.settle(t0 + Duration::from_secs(125), c, 100, 150);
        assert_eq!(w.used(t0 + Duration::from_secs(125)), 50);
    }

    #[tokio::test(start_paused = true)]
    async fn an_upstream_bucket_follows_its_answers_and_refills_at_the_measured_rate() {
        let t0 = Instant::now();
        let ms = Duration::from_millis;
        let reading = |limit, remaining, reset: Option<Duration>| LimitReading {
            limit,
            remaining,
            reset,
        };
        // No reset stated: the limit is taken per minute. 2% of the bucket stays unspent.
        let mut b = UpstreamBucket::new(t0, reading(600, 0, None), 0);
        assert!(!b.snapshot(t0).measured);
        assert_eq!(b.earliest(t0, 1), t0 + ms(1300));
        // 40.5 short (a whole count truncates), full again in 405 ms: 100 a second. Calls in
        // flight count against it.
        b.observe(
            t0,
            reading(600, 560, Some(Duration::from_micros(395_000))),
            10,
            true,
        );
        let s = b.snapshot(t0);
        assert!(s.measured && (s.per_second - 100.0).abs() < 1e-9, "{s:?}");
        assert!((s.available - 550.0).abs() < 1e-9);
        // Spent to zero, it refills at the measured rate, to the call's cost and the headroom.
        b.take(t0, 550);
        assert_eq!(b.earliest(t0, 1), t0 + ms(130));
        assert_eq!(b.earliest(t0, 50), t0 + ms(620));
        // Never past its limit, and a cost over the limit waits for a full bucket only.
        assert_eq!(b.snapshot(t0 + Duration::from_secs(60)).available, 600.0);
        assert_eq!(b.earliest(t0, 10_000), t0 + Duration::from_secs(6));
        // A small bucket keeps a tenth of itself, and a full one still serves its whole size.
        let mut small = UpstreamBucket::new(t0, reading(5, 5, None), 0);
        assert_eq!(small.earliest(t0, 5), t0);
        small.take(t0, 5);
        assert_eq!(small.earliest(t0, 1), t0 + ms(18_000));
        // A call that never reached the upstream gives its cost back.
        b.take(t0, 5);
        b.settle(5, 0);
        assert!((b.snapshot(t0).available - 0.0).abs() < 1e-9);
        // A later measure (199.5 in a second) moves both averages a quarter of the way: the
        // larger measure weighs more than the smaller one.
        b.observe(t0, reading(600, 400, Some(ms(1000))), 0, true);
        let moved = (39.5 + 0.25 * 160.0) / (0.395 + 0.25 * 0.605);
        assert!((b.snapshot(t0).per_second - moved).abs() < 1e-9);
        // A reset too short to measure (whole milliseconds) leaves the rate as it was.
        b.observe(t0, reading(600, 599, Some(ms(5))), 0, true);
        assert!((b.snapshot(t0).per_second - moved).abs() < 1e-9);
        // The newest call's answer sets the estimate; an older call's, answered late, only
        // raises it to its bound.
        b.observe(t0, reading(600, 100, None), 0, true);
        assert!((b.snapshot(t0).available - 100.0).abs() < 1e-9);
        b.observe(t0, reading(600, 50, None), 0, false);
        assert!((b.snapshot(t0).available - 100.0).abs() < 1e-9);
        b.observe(t0, reading(600, 500, None), 300, false);
        assert!((b.snapshot(t0).available - 200.0).abs() < 1e-9);
        b.observe(t0, reading(600, 50, None), 0, true);
        assert!((b.snapshot(t0).available - 50.0).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn oversized_call_goes_alone() {
        let t0 = Instant::now();
        let mut w = TokenWindow::new(100, Duration::from_secs(10));
        w.reserve(t0, 10);
        assert_eq!(w.earliest(t0, 500), t0 + Duration::from_secs(10));
    }
}
