//! `kind = "schedule"`: a job per slot, by a cron expression in a time zone or a fixed period.
//!
//! Each firing's idempotency key is `<graph>/<trigger>/<slot time, RFC 3339 UTC>`, so a restart,
//! a retried submission or a second node never starts a slot twice. The last slot fired is kept
//! in the store; slots missed while the server was down follow `catch_up`: `none` skips them,
//! `last` (the default) fires the latest one, `all` fires each (at most [`MAX_CATCH_UP`]).

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chrono::{DateTime, TimeZone, Utc};
use serde_json::json;
use tokio::sync::watch;

use super::{Event, Outcome, ScheduleSpec, Trigger};
use crate::Orchestrator;

/// Missed slots fired at most by `catch_up = "all"` (the latest ones): a schedule every minute
/// that was down a month must not start 43,200 jobs at once.
pub const MAX_CATCH_UP: usize = 1000;

/// When a schedule fires.
#[derive(Clone, Debug)]
pub enum Every {
    Cron {
        expr: String,
        cron: Box<croner::Cron>,
        tz: chrono_tz::Tz,
    },
    /// Slots at the multiples of the period since the Unix epoch, so that every node (and a
    /// restarted one) agrees on them.
    Period(Duration),
}

impl Every {
    pub fn cron(expr: &str, tz: chrono_tz::Tz) -> Result<Self, String> {
        let cron: croner::Cron = expr
            .parse()
            .map_err(|e: croner::errors::CronError| e.to_string())?;
        Ok(Self::Cron {
            expr: expr.to_string(),
            cron: Box::new(cron),
            tz,
        })
    }

    /// The first slot strictly after `t`.
    pub fn next_after(&self, t: SystemTime) -> Option<SystemTime> {
        match self {
            Self::Period(p) => {
                let p = p.as_millis().max(1);
                let ms = t.duration_since(UNIX_EPOCH).ok()?.as_millis();
                let next = (ms / p + 1) * p;
                Some(UNIX_EPOCH + Duration::from_millis(next as u64))
            }
            Self::Cron { cron, tz, .. } => {
                // croner keeps the sub-second part of its start; slots are whole seconds.
                let at: DateTime<Utc> =
                    chrono::SubsecRound::trunc_subsecs(DateTime::<Utc>::from(t), 0);
                let mut start = tz.from_utc_datetime(&at.naive_utc());
                // A local time that occurs twice (the hour the clocks go back) resolves to its
                // first instant, which is before `t` when `t` is in the second pass: that slot
                // has fired already; look on from just after it.
                for _ in 0..4 {
                    let next = cron.find_next_occurrence(&start, false).ok()?;
                    let next_t: SystemTime = next.with_timezone(&Utc).into();
                    if next_t > t {
                        return Some(next_t);
                    }
                    start = next + chrono::TimeDelta::seconds(1);
                }
                None
            }
        }
    }

    /// The last slot at or before `t`, if it is after `after`.
    fn previous(&self, t: SystemTime, after: SystemTime) -> Option<SystemTime> {
        let prev: SystemTime = match self {
            Self::Period(p) => {
                let p = p.as_millis().max(1);
                let ms = t.duration_since(UNIX_EPOCH).ok()?.as_millis();
                UNIX_EPOCH + Duration::from_millis((ms / p * p) as u64)
            }
            Self::Cron { cron, tz, .. } => {
                let at: DateTime<Utc> =
                    chrono::SubsecRound::trunc_subsecs(DateTime::<Utc>::from(t), 0);
                let start = tz.from_utc_datetime(&at.naive_utc());
                let prev = cron.find_previous_occurrence(&start, true).ok()?;
                prev.with_timezone(&Utc).into()
            }
        };
        (prev > after && prev <= t).then_some(prev)
    }

    /// The slots in `(after, until]`, the latest [`MAX_CATCH_UP`] of them, oldest first. Walked
    /// back from `until`, so a schedule down for years costs no more than one down for a day.
    pub fn slots_between(&self, after: SystemTime, until: SystemTime) -> Vec<SystemTime> {
        let mut out: Vec<SystemTime> = Vec::new();
        let mut t = until;
        while out.len() < MAX_CATCH_UP {
            let Some(prev) = self.previous(t, after) else {
                break;
            };
            // Strictly backwards, whatever a time zone's repeated hour does.
            if out.last().is_some_and(|l| prev >= *l) {
                break;
            }
            out.push(prev);
            t = prev - Duration::from_secs(1);
        }
        out.reverse();
        out
    }

    pub fn describe(&self) -> String {
        match self {
            Self::Cron { expr, tz, .. } => format!("cron {expr:?} ({tz})"),
            Self::Period(p) => format!("every {}", humantime::format_duration(*p)),
        }
    }
}

/// What to fire for slots missed while the server was down.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CatchUp {
    None,
    Last,
    All,
}

impl CatchUp {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => Self::None,
            "last" => Self::Last,
            "all" => Self::All,
            _ => return None,
        })
    }
}

/// The wall clock a schedule reads: a wall time taken once, advanced by tokio's clock. In
/// production that is the system's time; a test pauses tokio's clock and starts the wall where
/// it likes, and the schedule's sleeps and its notion of "now" move together.
#[derive(Clone, Copy, Debug)]
pub struct WallClock {
    wall0: SystemTime,
    t0: tokio::time::Instant,
}

impl WallClock {
    pub fn system() -> Self {
        Self::starting_at(crate::clock::now())
    }

    pub fn starting_at(wall0: SystemTime) -> Self {
        Self {
            wall0,
            t0: tokio::time::Instant::now(),
        }
    }

    pub fn now(&self) -> SystemTime {
        self.wall0 + self.t0.elapsed()
    }
}

fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

fn unix_ms(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Fire slot `slot`: submit until the graph takes it (a refusal is retried after its delay), or
/// until `stop`. `false` when stopped first.
async fn fire(
    orch: &Orchestrator,
    t: &Trigger,
    slot: SystemTime,
    stop: &mut watch::Receiver<bool>,
) -> bool {
    let mut again = false;
    loop {
        let at = rfc3339(slot);
        let mut meta = serde_json::Map::new();
        meta.insert("scheduled_at".into(), json!(at));
        let event = Event {
            body: json!({ "scheduled_at": at }),
            headers: Default::default(),
            id: Some(at.clone()),
            meta,
        };
        match t.fire(orch, event, again).await {
            Outcome::Retry(wait, why) => {
                again = true;
                t.set_status("waiting", why);
                if !super::sleep_or_stop(wait, stop).await {
                    return false;
                }
            }
            Outcome::Invalid(reason) => {
                tracing::error!(graph = %t.model.graph, trigger = %t.model.name, slot = %at, %reason, "a scheduled slot could not start a job");
                return true;
            }
            _ => {
                t.set_status("", "");
                return true;
            }
        }
    }
}

/// Run a schedule until `stop`: catch up on missed slots, then fire each slot as it comes.
pub async fn run(
    orch: Arc<Orchestrator>,
    t: Arc<Trigger>,
    spec: ScheduleSpec,
    clock: WallClock,
    mut stop: watch::Receiver<bool>,
) {
    let store = orch.store().clone();
    let mut state = super::load_state(store.as_ref(), &t);
    // A pause kept in the store holds; so does an operator's pause made since the triggers
    // started (a store that keeps no state would otherwise undo it here).
    if state.paused {
        t.paused.send_replace(true);
    }
    let mut last: Option<SystemTime> = state
        .last_slot_ms
        .map(|ms| UNIX_EPOCH + Duration::from_millis(ms.max(0) as u64));
    if let Some(after) = last
        && !t.is_paused()
    {
        let missed = spec.every.slots_between(after, clock.now());
        let to_fire: &[SystemTime] = match spec.catch_up {
            CatchUp::None => &[],
            CatchUp::Last => missed.last().map_or(&[], std::slice::from_ref),
            CatchUp::All => &missed,
        };
        if !missed.is_empty() {
            tracing::info!(graph = %t.model.graph, trigger = %t.model.name, missed = missed.len(), firing = to_fire.len(), "catching up on slots missed while the server was down");
        }
        for slot in to_fire {
            if !fire(&orch, &t, *slot, &mut stop).await {
                return;
            }
            state.last_slot_ms = Some(unix_ms(*slot));
            super::save_state(store.as_ref(), &t, &state);
        }
        if let Some(latest) = missed.last() {
            last = Some(*latest);
            state.last_slot_ms = Some(unix_ms(*latest));
            super::save_state(store.as_ref(), &t, &state);
        }
    }
    tracing::info!(graph = %t.model.graph, trigger = %t.model.name, schedule = %spec.every.describe(), "schedule started");
    loop {
        if t.is_paused() {
            tokio::select! {
                _ = t.resumed() => {}
                _ = stop.wait_for(|s| *s) => return,
            }
            // Slots that passed while an operator held it paused are not fired, nor caught up
            // after a restart.
            let now = clock.now();
            last = Some(now);
            state.last_slot_ms = Some(unix_ms(now));
            super::save_state(store.as_ref(), &t, &state);
        }
        let now = clock.now();
        let base = last.map_or(now, |l| l.max(now));
        let Some(next) = spec.every.next_after(base) else {
            t.set_status("failing", "the schedule has no further slot");
            return;
        };
        let wait = next.duration_since(clock.now()).unwrap_or_default();
        let mut paused = t.paused.subscribe();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = stop.wait_for(|s| *s) => return,
            _ = paused.wait_for(|p| *p) => continue,
        }
        if !fire(&orch, &t, next, &mut stop).await {
            return;
        }
        last = Some(next);
        state.last_slot_ms = Some(unix_ms(next));
        super::save_state(store.as_ref(), &t, &state);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> SystemTime {
        DateTime::parse_from_rfc3339(s)
            .unwrap()
            .with_timezone(&Utc)
            .into()
    }

    #[test]
    fn cron_in_a_time_zone_skips_weekends() {
        let e = Every::cron("0 7 * * MON-FRI", chrono_tz::Europe::Paris).unwrap();
        // Friday 2026-12-04 08:00 Paris (07:00 UTC) → Monday 07:00 Paris = 06:00 UTC.
        let next = e.next_after(at("2026-12-04T07:00:00Z")).unwrap();
        assert_eq!(rfc3339(next), "2026-12-07T06:00:00.000Z");
        let slots = e.slots_between(at("2026-12-04T00:00:00Z"), at("2026-12-08T12:00:00Z"));
        let got: Vec<String> = slots.into_iter().map(rfc3339).collect();
        assert_eq!(
            got,
            [
                "2026-12-04T06:00:00.000Z",
                "2026-12-07T06:00:00.000Z",
                "2026-12-08T06:00:00.000Z"
            ]
        );
        assert!(Every::cron("61 * * * *", chrono_tz::UTC).is_err());
    }

    /// Paris goes from 03:00 CEST back to 02:00 CET on 2026-10-25 (01:00 UTC): 02:30 local comes
    /// twice. It fires once, at its first instant; from inside the repeated hour the next slot
    /// is the next day's (not the past one, which would fire again and again).
    #[test]
    fn a_repeated_local_hour_fires_once_and_never_goes_back() {
        let e = Every::cron("30 2 * * *", chrono_tz::Europe::Paris).unwrap();
        let first = e.next_after(at("2026-10-24T23:00:00Z")).unwrap();
        assert_eq!(rfc3339(first), "2026-10-25T00:30:00.000Z");
        let second_pass = e.next_after(at("2026-10-25T01:10:00Z")).unwrap();
        assert_eq!(rfc3339(second_pass), "2026-10-26T01:30:00.000Z");
        let slots = e.slots_between(at("2026-10-24T00:00:00Z"), at("2026-10-27T00:00:00Z"));
        let got: Vec<String> = slots.into_iter().map(rfc3339).collect();
        assert_eq!(
            got,
            [
                "2026-10-24T00:30:00.000Z",
                "2026-10-25T00:30:00.000Z",
                "2026-10-26T01:30:00.000Z"
            ]
        );
    }

    #[test]
    fn catching_up_years_of_a_minute_cron_walks_back_from_now() {
        let e = Every::cron("* * * * *", chrono_tz::UTC).unwrap();
        let slots = e.slots_between(at("2024-12-07T00:00:00Z"), at("2026-12-07T00:00:00Z"));
        assert_eq!(slots.len(), MAX_CATCH_UP);
        assert_eq!(rfc3339(*slots.last().unwrap()), "2026-12-07T00:00:00.000Z");
        assert_eq!(rfc3339(slots[0]), "2026-12-06T07:21:00.000Z");
    }

    #[test]
    fn periods_align_to_the_epoch_and_catch_up_is_bounded() {
        let e = Every::Period(Duration::from_secs(900));
        let next = e.next_after(at("2026-12-07T10:07:00Z")).unwrap();
        assert_eq!(rfc3339(next), "2026-12-07T10:15:00.000Z");
        // Exactly on a slot: the next one.
        assert_eq!(
            rfc3339(e.next_after(next).unwrap()),
            "2026-12-07T10:30:00.000Z"
        );
        let every_second = Every::Period(Duration::from_secs(1));
        let slots =
            every_second.slots_between(at("2025-12-07T00:00:00Z"), at("2026-12-07T00:00:00Z"));
        assert_eq!(slots.len(), MAX_CATCH_UP);
        assert_eq!(rfc3339(*slots.last().unwrap()), "2026-12-07T00:00:00.000Z");
    }
}
