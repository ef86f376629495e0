//! The dashboard's sign-in: a person pastes an API key or an OIDC token once, at `/login`, and
//! the browser then holds a session cookie instead of the credential.
//!
//! - `cascade_session`: 256 random bits, `HttpOnly` (no script reads it), `SameSite=Strict` (no
//!   other site's page sends it), `Secure` under TLS, `Path=/`. The server keeps only its SHA-256,
//!   with the identity the credential proved and an expiry ([`SESSION_TTL`]).
//! - `cascade_csrf`: the session's CSRF token, readable by the page's own script, which sends it
//!   back as `X-CSRF-Token` on every request that changes something; a request authenticated by
//!   the session cookie without the matching header is refused (403). A request with an
//!   `authorization` header carries no ambient credential and needs no CSRF token.
//!
//! Sessions are bounded ([`SESSIONS_MAX`]): expired ones are dropped first, and past the bound a
//! sign-in is refused (503) rather than ending another person's session.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::auth::Identity;

/// How long a session lasts from its sign-in.
pub const SESSION_TTL: Duration = Duration::from_secs(8 * 3600);
/// Sessions held at once at most.
pub const SESSIONS_MAX: usize = 10_000;
/// Sessions of one identity at most: a new sign-in past it ends that identity's oldest (so one
/// key signing in again and again cannot fill [`SESSIONS_MAX`] and lock the others out).
pub const SESSIONS_PER_IDENTITY: usize = 16;
pub const SESSION_COOKIE: &str = "cascade_session";
pub const CSRF_COOKIE: &str = "cascade_csrf";
pub const CSRF_HEADER: &str = "x-csrf-token";

struct Session {
    who: Identity,
    csrf: String,
    expires: Instant,
}

/// The signed-in browsers, by the SHA-256 of their session cookie.
pub struct Sessions {
    map: Mutex<HashMap<[u8; 32], Session>>,
    capacity: usize,
    ttl: Duration,
}

/// A new session: the two cookie values to set.
pub struct Created {
    pub id: String,
    pub csrf: String,
}

impl Default for Sessions {
    fn default() -> Self {
        Self::new(SESSIONS_MAX, SESSION_TTL)
    }
}

impl Sessions {
    pub fn new(capacity: usize, ttl: Duration) -> Self {
        Self {
            map: Mutex::new(HashMap::new()),
            capacity,
            ttl,
        }
    }

    /// Start a session for `who`, until [`SESSION_TTL`] or its credential's expiry, whichever
    /// comes first; `None` when [`SESSIONS_MAX`] live sessions exist already.
    pub fn create(&self, who: Identity) -> Option<Created> {
        let now = Instant::now();
        let mut expires = now + self.ttl;
        if let Some(at) = who.expires {
            let left = at
                .duration_since(crate::clock::now())
                .unwrap_or(Duration::ZERO);
            expires = expires.min(now + left);
        }
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let mut own: Vec<([u8; 32], Instant)> = map
            .iter()
            .filter(|(_, s)| s.who.name == who.name)
            .map(|(k, s)| (*k, s.expires))
            .collect();
        if own.len() >= SESSIONS_PER_IDENTITY {
            own.sort_by_key(|(_, e)| *e);
            for (k, _) in &own[..=own.len() - SESSIONS_PER_IDENTITY] {
                map.remove(k);
            }
        }
        if map.len() >= self.capacity {
            map.retain(|_, s| s.expires > now);
            if map.len() >= self.capacity {
                return None;
            }
        }
        let created = Created {
            id: random_token(),
            csrf: random_token(),
        };
        map.insert(
            digest(&created.id),
            Session {
                who,
                csrf: created.csrf.clone(),
                expires,
            },
        );
        metrics::gauge!(crate::metrics::DASHBOARD_SESSIONS).set(map.len() as f64);
        Some(created)
    }

    /// The identity and CSRF token of session `id`, if it is live.
    pub fn get(&self, id: &str) -> Option<(Identity, String)> {
        let key = digest(id);
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        match map.get(&key) {
            Some(s) if s.expires > Instant::now() => Some((s.who.clone(), s.csrf.clone())),
            Some(_) => {
                map.remove(&key);
                metrics::gauge!(crate::metrics::DASHBOARD_SESSIONS).set(map.len() as f64);
                None
            }
            None => None,
        }
    }

    /// End session `id` (signing out).
    pub fn end(&self, id: &str) {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        map.remove(&digest(id));
        metrics::gauge!(crate::metrics::DASHBOARD_SESSIONS).set(map.len() as f64);
    }
}

fn digest(id: &str) -> [u8; 32] {
    Sha256::digest(id.as_bytes()).into()
}

/// 256 random bits, URL-safe.
fn random_token() -> String {
    use base64::Engine;
    let bytes: [u8; 32] = rand::random();
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Whether two tokens are equal, in time that does not depend on where they differ.
pub fn same_token(a: &str, b: &str) -> bool {
    let (a, b) = (a.as_bytes(), b.as_bytes());
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The value of cookie `name` in a `Cookie` header.
pub fn cookie<'a>(header: &'a str, name: &str) -> Option<&'a str> {
    header.split(';').find_map(|part| {
        let (k, v) = part.trim().split_once('=')?;
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::auth::Role;

    #[tokio::test(start_paused = true)]
    async fn sessions_expire_are_bounded_and_end() {
        let s = Sessions::new(2, Duration::from_secs(60));
        let who = Identity::new("lee", "acme", &[Role::Read]);
        let a = s.create(who.clone()).unwrap();
        let b = s.create(who.clone()).unwrap();
        assert_ne!(a.id, b.id);
        assert_ne!(a.id, a.csrf);
        assert!(
            s.create(who.clone()).is_none(),
            "full: refused, nobody's session ended"
        );
        let (got, csrf) = s.get(&a.id).unwrap();
        assert_eq!((got, csrf), (who.clone(), a.csrf.clone()));
        assert!(s.get("not-a-session").is_none());
        s.end(&b.id);
        assert!(s.get(&b.id).is_none());
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(s.get(&a.id).is_none(), "expired");
        assert!(s.create(who).is_some(), "expired sessions make room");
    }

    #[tokio::test(start_paused = true)]
    async fn a_session_ends_with_its_credential_and_one_identity_holds_few() {
        let s = Sessions::new(1000, Duration::from_secs(3600));
        let soon = Identity::new("short", "acme", &[Role::Read])
            .until(crate::clock::now() + Duration::from_secs(60));
        let a = s.create(soon).unwrap();
        tokio::time::advance(Duration::from_secs(61)).await;
        assert!(s.get(&a.id).is_none(), "ended with its token");

        let lee = Identity::new("lee", "acme", &[Role::Read]);
        let first = s.create(lee.clone()).unwrap();
        let mut last = None;
        for _ in 0..SESSIONS_PER_IDENTITY {
            tokio::time::advance(Duration::from_millis(1)).await;
            last = s.create(lee.clone());
        }
        assert!(s.get(&first.id).is_none(), "the oldest made room");
        assert!(s.get(&last.unwrap().id).is_some());
        let other = s
            .create(Identity::new("kim", "acme", &[Role::Read]))
            .unwrap();
        assert!(s.get(&other.id).is_some(), "others are not held back");
    }

    #[test]
    fn cookies_and_tokens_are_read_exactly() {
        let h = "a=1; cascade_session=abc; cascade_session_x=no";
        assert_eq!(cookie(h, "cascade_session"), Some("abc"));
        assert_eq!(cookie(h, "cascade"), None);
        assert!(same_token("abc", "abc"));
        assert!(!same_token("abc", "abd"));
        assert!(!same_token("abc", "abcd"));
    }
}
