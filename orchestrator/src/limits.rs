//! What one caller may hold or send (`[server.limits]`), with defaults that a normal client
//! never meets. Each limit, when met, is a clear error that names it (INVALID_ARGUMENT for a
//! value too big, RESOURCE_EXHAUSTED with a retry delay for a rate or a count of streams), and
//! none of them touches a job already accepted.
//!
//! ```toml
//! [server.limits]
//! connections_per_address = 1024
//! max_message_bytes = 4194304          # a gRPC request
//! max_json_depth = 64                  # nesting of a job's input
//! max_idempotency_key_bytes = 256
//! max_string_bytes = 1024              # graph and tenant names, labels, reasons, approvers
//! max_labels = 64
//! max_page_size = 1000
//! streams_per_connection = 1000        # HTTP/2 streams at once on one gRPC connection
//! watch_streams_per_identity = 10000
//! requests_per_second_per_identity = 50000
//! ```

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

/// `[server.limits]`.
#[derive(Clone, Debug, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ServerLimits {
    /// Connections one remote address may hold at once, across both listeners.
    pub connections_per_address: usize,
    /// Largest gRPC request message.
    pub max_message_bytes: usize,
    /// Deepest nesting of arrays and objects in a job's input.
    pub max_json_depth: usize,
    pub max_idempotency_key_bytes: usize,
    /// Longest graph name, tenant, label key or value, reason or approver.
    pub max_string_bytes: usize,
    /// Most labels on one job.
    pub max_labels: usize,
    /// Largest page a list returns (a larger page size asked for is served at this size).
    pub max_page_size: usize,
    /// HTTP/2 streams (calls) at once on one gRPC connection.
    pub streams_per_connection: u32,
    /// WatchJob and WatchGraph streams one identity holds open at once.
    pub watch_streams_per_identity: usize,
    /// Requests one identity may make a second (gRPC and HTTP), with a burst of one second's
    /// worth. Without authentication there are no identities, and no such limit.
    pub requests_per_second_per_identity: f64,
}

impl Default for ServerLimits {
    fn default() -> Self {
        Self {
            connections_per_address: crate::listen::CONNECTIONS_PER_ADDRESS,
            max_message_bytes: 4 << 20,
            max_json_depth: 64,
            max_idempotency_key_bytes: 256,
            max_string_bytes: 1024,
            max_labels: 64,
            max_page_size: 1000,
            streams_per_connection: 1000,
            watch_streams_per_identity: 10_000,
            requests_per_second_per_identity: 50_000.0,
        }
    }
}

impl ServerLimits {
    /// The first value that cannot work, named: (field, why).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        let positive = [
            ("connections_per_address", self.connections_per_address),
            ("max_message_bytes", self.max_message_bytes),
            ("max_json_depth", self.max_json_depth),
            ("max_idempotency_key_bytes", self.max_idempotency_key_bytes),
            ("max_string_bytes", self.max_string_bytes),
            ("max_page_size", self.max_page_size),
            (
                "streams_per_connection",
                self.streams_per_connection as usize,
            ),
            (
                "watch_streams_per_identity",
                self.watch_streams_per_identity,
            ),
        ];
        if let Some((field, _)) = positive.iter().find(|(_, v)| *v == 0) {
            return Err((field, "must be at least 1".into()));
        }
        let r = self.requests_per_second_per_identity;
        if !(r.is_finite() && r > 0.0) {
            return Err((
                "requests_per_second_per_identity",
                format!("{r} is not a rate above 0"),
            ));
        }
        Ok(())
    }
}

/// Whether `json` nests arrays and objects deeper than `max` (read without parsing it: a
/// thousand nested brackets cost a parser a thousand frames of stack before it says no).
pub fn json_depth_over(json: &[u8], max: usize) -> bool {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in json {
        if in_string {
            match b {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return true;
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    false
}

/// Identities remembered by the request-rate limit at most; past it, those whose bucket is full
/// again (idle a second or more) are forgotten first.
const RATE_IDENTITIES: usize = 100_000;

/// A token bucket per identity: `rate` requests a second, a burst of one second's worth.
/// (Hand-rolled: two numbers per identity under one lock; a rate-limiter crate would add a
/// dependency for a dozen lines.)
pub struct IdentityRate {
    rate: f64,
    buckets: Mutex<HashMap<Arc<str>, (f64, Instant)>>,
}

impl IdentityRate {
    pub fn new(rate: f64) -> Self {
        Self {
            rate,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one request of `who`, or say when the next fits.
    pub fn take(&self, who: &Arc<str>) -> Result<(), Duration> {
        let now = Instant::now();
        let burst = self.rate.max(1.0);
        let mut map = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if map.len() >= RATE_IDENTITIES && !map.contains_key(who) {
            let rate = self.rate;
            map.retain(|_, (tokens, at)| {
                *tokens + now.duration_since(*at).as_secs_f64() * rate < burst
            });
        }
        let (tokens, at) = map.entry(who.clone()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / self.rate).max(Duration::from_millis(1)))
        }
    }
}

/// Watch streams open per identity.
pub struct StreamCounts {
    max: usize,
    open: Arc<Mutex<HashMap<Arc<str>, usize>>>,
}

/// One open stream, given back when dropped (with its stream).
pub struct StreamSlot {
    open: Arc<Mutex<HashMap<Arc<str>, usize>>>,
    who: Arc<str>,
}

impl Drop for StreamSlot {
    fn drop(&mut self) {
        let mut map = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(n) = map.get_mut(&self.who) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.who);
            }
        }
    }
}

impl StreamCounts {
    pub fn new(max: usize) -> Self {
        Self {
            max,
            open: Arc::default(),
        }
    }

    /// A slot for one more stream of `who`, unless it holds `max` already (then how many).
    pub fn open(&self, who: &Arc<str>) -> Result<StreamSlot, usize> {
        let mut map = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let n = map.entry(who.clone()).or_insert(0);
        if *n >= self.max {
            return Err(*n);
        }
        *n += 1;
        Ok(StreamSlot {
            open: self.open.clone(),
            who: who.clone(),
        })
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn depth_is_counted_outside_strings_only() {
        assert!(!json_depth_over(br#"{"a":[1,{"b":2}]}"#, 3));
        assert!(json_depth_over(br#"{"a":[1,{"b":[2]}]}"#, 3));
        assert!(!json_depth_over(br#"{"a":"[[[[[[\"[[[["}"#, 1));
        assert!(json_depth_over(&[b'['; 100_000], 64));
    }

    #[tokio::test(start_paused = true)]
    async fn identities_are_held_to_their_rate_and_streams_to_their_count() {
        let rate = IdentityRate::new(2.0);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert!(rate.take(&a).is_ok() && rate.take(&a).is_ok());
        let wait = rate.take(&a).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(rate.take(&b).is_ok(), "another identity has its own");
        tokio::time::advance(wait).await;
        assert!(rate.take(&a).is_ok());

        let streams = StreamCounts::new(2);
        let s1 = streams.open(&a).unwrap();
        let _s2 = streams.open(&a).unwrap();
        assert_eq!(streams.open(&a).err(), Some(2));
        assert!(streams.open(&b).is_ok());
        drop(s1);
        assert!(
            streams.open(&a).is_ok(),
            "a closed stream gives its slot back"
        );
    }

    #[test]
    fn zero_limits_are_named() {
        let l = ServerLimits {
            max_page_size: 0,
            ..Default::default()
        };
        assert_eq!(l.check().unwrap_err().0, "max_page_size");
        assert!(ServerLimits::default().check().is_ok());
    }
}
