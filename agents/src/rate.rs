//! Rates as people write them (`"200/s"`, `"12000/min"`) and the GCRA that enforces one. Both are
//! shared by the orchestrator's quotas and the simulated upstream of `sim`, so that a simulated
//! provider limits exactly as a declared quota does.
//!
//! governor implements GCRA well, but reads its own clock (which a paused tokio clock does not
//! move, so tests could not be exact) and has no variable rate for AIMD: this is small enough to
//! own.

use std::fmt;
use std::num::NonZeroU64;
use std::str::FromStr;
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use tokio::time::Instant;

/// `amount` per `period`, e.g. 500 per minute. Written `"500/min"`; the units are `s`, `min`
/// and `h` (also `sec`, `second`, `m`, `minute`, `hour`) or any duration (`"10/30s"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub amount: NonZeroU64,
    pub period: Duration,
}

impl Rate {
    pub fn new(amount: NonZeroU64, period: Duration) -> Self {
        Self { amount, period }
    }

    pub fn per_second(&self) -> f64 {
        self.amount.get() as f64 / self.period.as_secs_f64()
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let unit = match (self.period.as_secs(), self.period.subsec_nanos()) {
            (1, 0) => "s".to_string(),
            (60, 0) => "min".to_string(),
            (3600, 0) => "h".to_string(),
            _ => humantime::format_duration(self.period).to_string(),
        };
        write!(f, "{}/{}", self.amount, unit)
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let help = "write an amount and a period, e.g. \"200/s\", \"12000/min\" or \"100/h\"";
        let Some((amount, unit)) = s.split_once('/') else {
            return Err(format!("invalid rate {s:?}: no \"/\"; {help}"));
        };
        let amount: NonZeroU64 = amount.trim().replace('_', "").parse().map_err(|_| {
            format!(
                "invalid rate {s:?}: {:?} is not a whole number above 0; {help}",
                amount.trim()
            )
        })?;
        let unit = unit.trim();
        let period = match unit {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_secs(60),
            "h" | "hour" => Duration::from_secs(3600),
            other => humantime::parse_duration(other)
                .map_err(|_| format!("invalid rate {s:?}: unknown period {other:?}; {help}"))?,
        };
        if period.is_zero() {
            return Err(format!("invalid rate {s:?}: the period is zero; {help}"));
        }
        Ok(Self { amount, period })
    }
}

impl Serialize for Rate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Rate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a rate such as \"200/s\" or \"12000/min\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Rate, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// Generic cell rate algorithm: a call conforms if it arrives no earlier than `tat - tolerance`;
/// each call moves the theoretical arrival time `tat` on by one interval. Over any window of
/// length `w`, at most `w / interval + burst` calls conform.
#[derive(Clone, Debug)]
pub struct Gcra {
    base_interval: Duration,
    burst: u32,
    tat: Option<Instant>,
}

impl Gcra {
    pub fn new(per_second: f64, burst: u32) -> Self {
        Self {
            base_interval: Duration::from_secs_f64(1.0 / per_second),
            burst: burst.max(1),
            tat: None,
        }
    }

    /// How many calls may go back to back.
    pub fn burst(&self) -> u32 {
        self.burst
    }

    /// The rate at multiplier 1, per second.
    pub fn base_per_second(&self) -> f64 {
        1.0 / self.base_interval.as_secs_f64()
    }

    /// No call before `at`, and none of the burst at `at` either: after a refusal, calls resume
    /// one interval apart instead of all at once.
    pub fn hold(&mut self, at: Instant, multiplier: f64) {
        let tolerance = self.interval(multiplier) * (self.burst - 1);
        let held = at + tolerance;
        self.tat = Some(self.tat.map_or(held, |t| t.max(held)));
    }

    fn interval(&self, multiplier: f64) -> Duration {
        self.base_interval.div_f64(multiplier)
    }

    /// The earliest instant a call conforms, at rate × `multiplier`.
    pub fn earliest(&self, now: Instant, multiplier: f64) -> Instant {
        let tolerance = self.interval(multiplier) * (self.burst - 1);
        match self.tat {
            Some(tat) => tat.checked_sub(tolerance).map_or(now, |t| t.max(now)),
            None => now,
        }
    }

    pub fn take(&mut self, now: Instant, multiplier: f64) {
        let tat = self.tat.map_or(now, |t| t.max(now));
        self.tat = Some(tat + self.interval(multiplier));
    }

    /// Calls that could go back to back right now.
    pub fn available(&self, now: Instant, multiplier: f64) -> u32 {
        let interval = self.interval(multiplier);
        match self.tat {
            None => self.burst,
            Some(tat) if tat <= now => self.burst,
            Some(tat) => {
                let backlog = (tat - now).as_secs_f64() / interval.as_secs_f64();
                (self.burst as f64 - backlog).floor().max(0.0) as u32
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_display_and_round_trip_through_serde() {
        let r: Rate = "200/s".parse().unwrap();
        assert_eq!(r.per_second(), 200.0);
        assert_eq!(r.to_string(), "200/s");
        assert_eq!(
            "12_000 / min".parse::<Rate>().unwrap().to_string(),
            "12000/min"
        );
        assert_eq!(
            "5/hour".parse::<Rate>().unwrap().period,
            Duration::from_secs(3600)
        );
        assert_eq!("10/30s".parse::<Rate>().unwrap().per_second(), 10.0 / 30.0);
        let json = serde_json::to_string(&r).unwrap();
        assert_eq!(json, "\"200/s\"");
        assert_eq!(serde_json::from_str::<Rate>(&json).unwrap(), r);
        for bad in ["200", "0/s", "-1/s", "x/s", "5/fortnight", "5/0s"] {
            let e = bad.parse::<Rate>().unwrap_err();
            assert!(e.contains("\"200/s\""), "{bad}: {e}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn gcra_spaces_calls_after_the_burst() {
        let t0 = Instant::now();
        let mut g = Gcra::new(10.0, 3);
        for _ in 0..3 {
            assert_eq!(g.earliest(t0, 1.0), t0);
            g.take(t0, 1.0);
        }
        assert_eq!(g.available(t0, 1.0), 0);
        assert_eq!(g.earliest(t0, 1.0), t0 + Duration::from_millis(100));
        // At half the rate (AIMD lowered it) the calls are spaced twice as far.
        let mut g = Gcra::new(10.0, 3);
        for _ in 0..3 {
            g.take(t0, 0.5);
        }
        assert_eq!(g.earliest(t0, 0.5), t0 + Duration::from_millis(200));
    }
}
