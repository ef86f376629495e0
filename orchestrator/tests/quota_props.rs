//! Property: over a long randomized run, a quota never lets more through than its limits allow
//! in any window — requests at most `burst + window × rate`; tokens at most the limit plus the
//! overspend (usage beyond the reservation) of the calls in that window, which is zero when calls
//! use no more than they reserve.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::num::{NonZeroU32, NonZeroU64};
use std::sync::Arc;
use std::time::Duration;

use cascade_orchestrator::model::{QuotaModel, Rate};
use cascade_orchestrator::quota::{Outcome, QuotaCore, Ready};
use proptest::prelude::*;
use tokio::time::Instant;

#[derive(Clone, Debug)]
struct Call {
    gap_ms: u64,
    est: u64,
    actual: u64,
    duration_ms: u64,
}

fn calls(max_overspend: f64) -> impl Strategy<Value = Vec<Call>> {
    prop::collection::vec(
        (0u64..40, 1u64..300, 0.0f64..1.0, 0u64..3000).prop_map(
            move |(gap_ms, est, f, duration_ms)| Call {
                gap_ms,
                est,
                actual: (est as f64 * f * (1.0 + max_overspend)) as u64,
                duration_ms,
            },
        ),
        50..400,
    )
}

struct Granted {
    at: Instant,
    est: u64,
    actual: u64,
}

/// Run the calls through a quota in arrival order (first come, first served) and return when
/// each was granted.
fn simulate(q: &mut QuotaCore, calls: &[Call], base: Instant) -> Vec<Granted> {
    let mut arrivals: VecDeque<(Instant, usize)> = VecDeque::new();
    let mut t = base;
    for (i, c) in calls.iter().enumerate() {
        t += Duration::from_millis(c.gap_ms);
        arrivals.push_back((t, i));
    }
    let mut queue: VecDeque<usize> = VecDeque::new();
    let mut settles: BinaryHeap<Reverse<(Instant, usize)>> = BinaryHeap::new();
    let mut reservations = vec![None; calls.len()];
    let mut granted = Vec::new();
    let mut now = base;
    loop {
        while let Some(Reverse((at, i))) = settles.peek().copied() {
            if at > now {
                break;
            }
            settles.pop();
            let r = reservations[i].take().expect("granted");
            q.settle(at, r, Some((calls[i].actual, 0)), Outcome::Answered, None);
        }
        while arrivals.front().is_some_and(|(at, _)| *at <= now) {
            queue.push_back(arrivals.pop_front().expect("front").1);
        }
        let mut next: Option<Instant> = None;
        while let Some(&i) = queue.front() {
            match q.ready(now, calls[i].est) {
                Ready::Now => {
                    queue.pop_front();
                    reservations[i] = Some(q.take(now, calls[i].est));
                    settles.push(Reverse((
                        now + Duration::from_millis(calls[i].duration_ms),
                        i,
                    )));
                    granted.push(Granted {
                        at: now,
                        est: calls[i].est,
                        actual: calls[i].actual,
                    });
                }
                Ready::At(t) => {
                    next = Some(t);
                    break;
                }
                Ready::Blocked => break,
            }
        }
        if queue.is_empty() && arrivals.is_empty() && settles.is_empty() {
            break;
        }
        let candidates = [
            next,
            arrivals.front().map(|a| a.0),
            settles.peek().map(|s| s.0.0),
        ];
        match candidates.into_iter().flatten().min() {
            Some(t) => now = t.max(now),
            None => break,
        }
    }
    assert_eq!(
        granted.len(),
        calls.len(),
        "every call was granted in the end"
    );
    granted
}

fn quota(rps: u64, burst: u32, tokens_per_min: u64) -> QuotaCore {
    let spec = QuotaModel {
        name: "q".into(),
        requests: Some(Rate {
            amount: NonZeroU64::new(rps).unwrap(),
            period: Duration::from_secs(1),
        }),
        tokens: Some(Rate {
            amount: NonZeroU64::new(tokens_per_min).unwrap(),
            period: Duration::from_secs(60),
        }),
        cost: None,
        burst: NonZeroU32::new(burst),
        max_concurrency: NonZeroU32::new(16),
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

fn check(
    granted: &[Granted],
    rps: u64,
    burst: u32,
    tokens_per_min: u64,
) -> Result<(), TestCaseError> {
    for (i, g) in granted.iter().enumerate() {
        let n = granted[i..]
            .iter()
            .take_while(|h| h.at < g.at + Duration::from_secs(1))
            .count() as u64;
        prop_assert!(
            n <= rps + burst as u64,
            "{} requests in 1 s from grant {}",
            n,
            i
        );
        let in_minute: Vec<&Granted> = granted[i..]
            .iter()
            .take_while(|h| h.at < g.at + Duration::from_secs(60))
            .collect();
        let spent: u64 = in_minute.iter().map(|h| h.actual).sum();
        let overspend: u64 = in_minute
            .iter()
            .map(|h| h.actual.saturating_sub(h.est))
            .sum();
        prop_assert!(
            spent <= tokens_per_min + overspend,
            "{} tokens in the minute from grant {} (limit {}, overspend {})",
            spent,
            i,
            tokens_per_min,
            overspend
        );
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    #[test]
    fn limits_hold_in_every_window_without_overspend(
        calls in calls(0.0), rps in 5u64..50, burst in 1u32..8, tpm in 2_000u64..20_000
    ) {
        let mut q = quota(rps, burst, tpm);
        let granted = simulate(&mut q, &calls, Instant::now());
        check(&granted, rps, burst, tpm)?;
    }

    #[test]
    fn overspend_is_debt_not_a_leak(
        calls in calls(0.5), rps in 5u64..50, burst in 1u32..8, tpm in 2_000u64..20_000
    ) {
        let mut q = quota(rps, burst, tpm);
        let granted = simulate(&mut q, &calls, Instant::now());
        check(&granted, rps, burst, tpm)?;
    }
}
