//! A credential's health: whether its agents may call now.
//!
//! A credential that cannot prove who its agents are — an OAuth2 client that cannot get a
//! token, a fresh token the upstream refuses, an API key or password answered with 401 even
//! after it was read again — is not the step's fault. Its calls are refused as rate-limited for
//! a wait that doubles from 1 s to 60 s (longer if the server asked for it, up to 10 minutes),
//! naming the credential, so that the engine holds the credential's quota
//! (`credential:<name>`): its agents and everything downstream pause with that cause instead of
//! failing their jobs one by one, and the first call after the wait is the probe. Each failure
//! is logged at error level and counted in [`REFRESH_FAILURES`], the metric the alert reads.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::AgentError;

/// Failures of a credential (a token fetch that failed, a fresh token or a key refused), by
/// credential: the alert for a credential that went dead.
pub const REFRESH_FAILURES: &str = "cascade_credential_refresh_failures_total";

/// One credential's failures in a row and the wait they set.
pub struct CredentialHealth {
    name: Arc<str>,
    /// Failures in a row: the wait before the next try doubles with each.
    failures: AtomicU64,
    /// After a failure, no call until then: the calls queued behind the failed one are
    /// answered with the same wait instead of each trying (and failing) in turn.
    blocked_until: Mutex<Option<Instant>>,
}

impl CredentialHealth {
    pub fn new(name: Arc<str>) -> Self {
        Self {
            name,
            failures: AtomicU64::new(0),
            blocked_until: Mutex::new(None),
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Refused at once, with `what` as the reason, while a failure's wait runs.
    pub fn check(&self, what: impl FnOnce() -> String) -> Result<(), AgentError> {
        let until = *self.blocked_until.lock().unwrap_or_else(|p| p.into_inner());
        match until {
            Some(t) if Instant::now() < t => Err(AgentError::credential_unavailable(
                self.name.clone(),
                format!("{}; the next try is due", what()),
                t - Instant::now(),
            )),
            _ => Ok(()),
        }
    }

    /// The credential failed (`message` says how, secrets already scrubbed): hold it for the
    /// next wait and answer the call with the refusal that pauses its agents.
    pub fn failed(&self, message: String, asked: Option<Duration>) -> AgentError {
        let n = self.failures.fetch_add(1, Ordering::Relaxed);
        // The longer of the backoff and what the server asked for.
        let wait = Duration::from_secs(1 << n.min(6))
            .min(Duration::from_secs(60))
            .max(asked.unwrap_or_default().min(Duration::from_secs(600)));
        *self.blocked_until.lock().unwrap_or_else(|p| p.into_inner()) = Some(Instant::now() + wait);
        metrics::counter!(REFRESH_FAILURES, "credential" => self.name.to_string()).increment(1);
        tracing::error!(
            credential = %self.name,
            failures = n + 1,
            retry_in = ?wait,
            error = %message,
            "a credential failed; its agents pause until it works again"
        );
        AgentError::credential_unavailable(self.name.clone(), message, wait)
    }

    /// The credential worked: the next failure waits the shortest time again.
    pub fn recovered(&self) {
        if self.failures.load(Ordering::Relaxed) == 0 {
            return;
        }
        *self.blocked_until.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if self.failures.swap(0, Ordering::Relaxed) > 0 {
            tracing::info!(credential = %self.name, "a credential works again");
        }
    }
}

/// The health of the credentials that are a fixed value (a bearer token, an API key, a
/// password), by name, shared by every agent that uses the same one.
#[derive(Default)]
pub struct KeyHealth {
    by_name: Mutex<HashMap<String, Arc<CredentialHealth>>>,
}

impl KeyHealth {
    pub fn get(&self, name: &str) -> Arc<CredentialHealth> {
        let mut map = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_string())
            .or_insert_with(|| Arc::new(CredentialHealth::new(name.into())))
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorClass;

    #[test]
    fn a_failed_credential_refuses_calls_for_a_doubling_wait_until_it_recovers() {
        let h = CredentialHealth::new("crm".into());
        assert!(h.check(|| "x".into()).is_ok());
        let e = h.failed("credentials refused".into(), None);
        assert_eq!(e.class, ErrorClass::RateLimited);
        assert_eq!(e.credential.as_deref(), Some("crm"));
        assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
        let refused = h.check(|| "crm is refused".into()).unwrap_err();
        assert_eq!(refused.credential.as_deref(), Some("crm"));
        assert!(refused.message.starts_with("crm is refused"), "{refused}");
        assert_eq!(
            h.failed("again".into(), None).retry_after,
            Some(Duration::from_secs(2))
        );
        // What the server asked for, when longer; never past ten minutes.
        assert_eq!(
            h.failed("again".into(), Some(Duration::from_secs(30)))
                .retry_after,
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            h.failed("again".into(), Some(Duration::from_secs(3600)))
                .retry_after,
            Some(Duration::from_secs(600))
        );
        h.recovered();
        assert!(h.check(|| "x".into()).is_ok());
        assert_eq!(
            h.failed("after".into(), None).retry_after,
            Some(Duration::from_secs(1))
        );
    }

    #[test]
    fn one_health_per_credential_name() {
        let k = KeyHealth::default();
        assert!(Arc::ptr_eq(&k.get("a"), &k.get("a")));
        assert!(!Arc::ptr_eq(&k.get("a"), &k.get("b")));
    }
}
