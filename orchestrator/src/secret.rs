//! Secret references (from the agents crate, where the agent kinds resolve theirs) and the
//! signature scheme of webhooks and completion callbacks.

pub use cascade_agents::secret::{Secret, SecretRef};

use std::time::Duration;

/// How far a signed request's timestamp may be from the receiver's clock, either way.
pub const SIGNATURE_TOLERANCE: Duration = Duration::from_secs(300);

/// Cascade's signature scheme, for completion callbacks going out and webhooks coming in:
///
/// ```text
/// X-Cascade-Timestamp: <unix seconds>
/// X-Cascade-Signature: v1=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>
/// ```
///
/// The timestamp is signed with the body, so a captured request cannot be replayed later with
/// a new time; a receiver refuses one outside ±[`SIGNATURE_TOLERANCE`] and remembers the
/// signatures it accepted inside that window (see [`ReplayGuard`]). The signature header may
/// carry several comma-separated `v1=` values (while a secret is rotated): one that matches is
/// enough.
pub fn sign(secret: &Secret, timestamp: u64, body: &[u8]) -> String {
    sign_keyed(secret, timestamp, None, body)
}

/// [`sign`] for a request that carries an `Idempotency-Key`: the key is signed too, as
/// `"<timestamp>.<key length>:<key>.<body>"` (the length makes the key's end unambiguous), so
/// that nobody on the way can change which job a delivery deduplicates against (and so drop it
/// as a duplicate of another).
pub fn sign_keyed(secret: &Secret, timestamp: u64, key: Option<&str>, body: &[u8]) -> String {
    format!("v1={}", hex::encode(mac(secret, timestamp, key, body)))
}

fn mac(secret: &Secret, timestamp: u64, key: Option<&str>, body: &[u8]) -> [u8; 32] {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.expose())
        .expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    if let Some(key) = key {
        mac.update(format!("{}:", key.len()).as_bytes());
        mac.update(key.as_bytes());
        mac.update(b".");
    }
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// Why a signed request was refused; each message says what the sender must do.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing or malformed X-Cascade-Timestamp: send the current time in unix seconds")]
    BadTimestamp,
    #[error(
        "X-Cascade-Timestamp is {skew_secs}s away from the server's clock (at most {}s allowed): sign with the current time, and check the sender's clock",
        SIGNATURE_TOLERANCE.as_secs()
    )]
    Stale { skew_secs: u64 },
    #[error(
        "bad or missing X-Cascade-Signature: send v1=<hex HMAC-SHA256 of \"<timestamp>.<body>\" with the shared secret> (with an Idempotency-Key, of \"<timestamp>.<key length>:<key>.<body>\")"
    )]
    BadSignature,
    #[error(
        "this signed request was already received: a replay is refused (sign each delivery anew)"
    )]
    Replayed,
}

/// Check a request signed by [`sign`] at `now` (unix seconds), in constant time per candidate
/// signature. Returns the MAC that matched (the key under which [`ReplayGuard`] remembers it).
pub fn verify(
    secret: &Secret,
    timestamp: &str,
    signature: &str,
    body: &[u8],
    now: u64,
) -> Result<[u8; 32], SignatureError> {
    verify_keyed(secret, timestamp, signature, None, body, now)
}

/// [`verify`] of a request signed by [`sign_keyed`] with `key` (its `Idempotency-Key`).
pub fn verify_keyed(
    secret: &Secret,
    timestamp: &str,
    signature: &str,
    key: Option<&str>,
    body: &[u8],
    now: u64,
) -> Result<[u8; 32], SignatureError> {
    let ts: u64 = timestamp
        .trim()
        .parse()
        .map_err(|_| SignatureError::BadTimestamp)?;
    let skew_secs = now.abs_diff(ts);
    if skew_secs > SIGNATURE_TOLERANCE.as_secs() {
        return Err(SignatureError::Stale { skew_secs });
    }
    let expected = mac(secret, ts, key, body);
    for candidate in signature.split(',') {
        let Some(hex_sig) = candidate.trim().strip_prefix("v1=") else {
            continue;
        };
        let Ok(given) = hex::decode(hex_sig) else {
            continue;
        };
        // Constant time: the comparison does not stop at the first differing byte.
        if given.len() == expected.len()
            && given
                .iter()
                .zip(&expected)
                .fold(0u8, |d, (a, b)| d | (a ^ b))
                == 0
        {
            return Ok(expected);
        }
    }
    Err(SignatureError::BadSignature)
}

/// The signatures accepted within the tolerance window, so that each is accepted once.
///
/// Bounded: at most `capacity` remembered; expired ones are dropped first, and when every slot
/// holds a live signature the guard refuses (`None`), so that the caller answers "retry later"
/// rather than forgetting a signature that could then be replayed.
pub struct ReplayGuard {
    seen: std::collections::HashMap<[u8; 32], u64>,
    capacity: usize,
}

impl ReplayGuard {
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: std::collections::HashMap::new(),
            capacity: capacity.max(1),
        }
    }

    /// Remember `mac`, seen at `now`: `Some(true)` the first time, `Some(false)` for a replay,
    /// `None` when full of live signatures.
    pub fn first_time(&mut self, mac: [u8; 32], now: u64) -> Option<bool> {
        if self.seen.contains_key(&mac) {
            return Some(false);
        }
        if self.seen.len() >= self.capacity {
            // A signature older than twice the tolerance cannot pass the timestamp check again.
            let horizon = now.saturating_sub(2 * SIGNATURE_TOLERANCE.as_secs());
            self.seen.retain(|_, at| *at >= horizon);
            if self.seen.len() >= self.capacity {
                return None;
            }
        }
        self.seen.insert(mac, now);
        Some(true)
    }

    /// Forget `mac`: the request it signed was not accepted, and may come again.
    pub fn forget(&mut self, mac: &[u8; 32]) {
        self.seen.remove(mac);
    }

    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signed_key_ends_where_its_length_says() {
        let s = Secret::new(b"k".to_vec());
        let a = sign_keyed(&s, 1, Some("a.b"), b"c");
        assert_ne!(a, sign_keyed(&s, 1, Some("a"), b"b.c"));
        assert_ne!(a, sign(&s, 1, b"a.b.c"));
        assert!(verify_keyed(&s, "1", &a, Some("a.b"), b"c", 1).is_ok());
        assert!(verify_keyed(&s, "1", &a, Some("a"), b"b.c", 1).is_err());
    }

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let s = Secret::new(b"k".to_vec());
        let body = b"{\"a\":1}";
        let now = 1_700_000_000;
        let sig = sign(&s, now, body);
        assert!(sig.starts_with("v1=") && sig.len() == 3 + 64, "{sig}");
        let ts = now.to_string();
        assert!(verify(&s, &ts, &sig, body, now).is_ok());
        // Within the window either way; outside it, stale whatever the signature.
        assert!(verify(&s, &ts, &sig, body, now + 300).is_ok());
        assert!(verify(&s, &ts, &sig, body, now - 300).is_ok());
        assert_eq!(
            verify(&s, &ts, &sig, body, now + 301),
            Err(SignatureError::Stale { skew_secs: 301 })
        );
        assert_eq!(
            verify(&s, "yesterday", &sig, body, now),
            Err(SignatureError::BadTimestamp)
        );
        // The timestamp is signed: the same signature under another time fails.
        let later = (now + 10).to_string();
        assert_eq!(
            verify(&s, &later, &sig, body, now),
            Err(SignatureError::BadSignature)
        );
        let bad = SignatureError::BadSignature;
        assert_eq!(verify(&s, &ts, &sig, b"{\"a\":2}", now), Err(bad.clone()));
        assert_eq!(verify(&s, &ts, "sha256=00", body, now), Err(bad.clone()));
        let other = Secret::new(b"other".to_vec());
        assert_eq!(verify(&other, &ts, &sig, body, now), Err(bad));
        // During a rotation the header carries both; one match is enough.
        let both = format!("{}, {sig}", sign(&other, now, body));
        assert!(verify(&s, &ts, &both, body, now).is_ok());
        // The documented construction, computed independently.
        use hmac::{KeyInit, Mac};
        let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(b"k").unwrap();
        m.update(format!("{now}.{{\"a\":1}}").as_bytes());
        assert_eq!(
            sig,
            format!("v1={}", hex::encode(m.finalize().into_bytes()))
        );
    }

    #[test]
    fn the_replay_guard_accepts_once_and_stays_bounded() {
        let mut g = ReplayGuard::new(2);
        let now = 1_700_000_000;
        assert_eq!(g.first_time([1; 32], now), Some(true));
        assert_eq!(g.first_time([1; 32], now + 1), Some(false));
        assert_eq!(g.first_time([2; 32], now), Some(true));
        // Full of live signatures: refuse rather than forget one.
        assert_eq!(g.first_time([3; 32], now + 1), None);
        assert_eq!(g.len(), 2);
        // Once they are past any window, they make room.
        assert_eq!(g.first_time([3; 32], now + 601), Some(true));
        assert_eq!(g.len(), 1);
    }
}
