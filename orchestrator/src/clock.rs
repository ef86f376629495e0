//! The one wall clock. Every timestamp Cascade stores or shows (job and event times, pause
//! deadlines, callback deliveries, retention cut-offs) comes from here, so that they agree with
//! each other and never go backwards within a process: the clock reads the system time once and
//! then advances with the monotonic clock, so an NTP step does not reorder a job's events.
//! Timers and deadlines inside the engine use `tokio::time::Instant` (paused in tests); this
//! clock is for what people read.

use std::sync::OnceLock;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn anchor() -> &'static (SystemTime, Instant) {
    static ANCHOR: OnceLock<(SystemTime, Instant)> = OnceLock::new();
    ANCHOR.get_or_init(|| (SystemTime::now(), Instant::now()))
}

/// The wall time now.
pub fn now() -> SystemTime {
    let (wall, mono) = anchor();
    *wall + mono.elapsed()
}

/// The wall time at an engine instant (a pause's end, a deadline): now plus what remains.
pub fn at(when: tokio::time::Instant) -> SystemTime {
    now() + when.saturating_duration_since(tokio::time::Instant::now())
}

/// Milliseconds since the Unix epoch (0 before it).
pub fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Time passed since `t`, zero if `t` is in the future.
pub fn since(t: SystemTime) -> Duration {
    now().duration_since(t).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_clock_never_goes_backwards_and_tracks_the_system_time() {
        let mut last = now();
        for _ in 0..1000 {
            let t = now();
            assert!(t >= last);
            last = t;
        }
        let drift = SystemTime::now()
            .duration_since(now())
            .unwrap_or_else(|e| e.duration());
        assert!(drift < Duration::from_secs(5), "drift {drift:?}");
        assert_eq!(unix_ms(UNIX_EPOCH + Duration::from_millis(1234)), 1234);
        assert_eq!(since(now() + Duration::from_secs(60)), Duration::ZERO);
    }
}
