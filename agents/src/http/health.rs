//! A credential's health: whether its agents may call now.
//!
//! A credential that cannot prove who its agents are — an OAuth2 client that cannot get a
//! token, a fresh token the upstream refuses, an API key or password answered with 401 even
//! after it was read again — is not the step's fault. Its calls are refused as rate-limited for
//! a wait that doubles from 1 s to 60 s (longer if the server asked for it, up to 10 minutes),
//! naming the credential, so that the engine holds the credential's quota
//! (`credential:<name>`): its agents and everything downstream pause with that cause instead of
//! failing their jobs one by one, and the first call after the wait is the probe (the others wait
//! for its outcome). Each failed round is logged at error level and counted in
//! [`REFRESH_FAILURES`], the metric the alert reads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::time::Instant;

use crate::AgentError;
use crate::secret::SecretCell;

/// Failures of a credential (a token fetch that failed, a fresh token or a key refused), by
/// credential: the alert for a credential that went dead.
pub const REFRESH_FAILURES: &str = "cascade_credential_refresh_failures_total";

/// How long one probe may take before another call may probe instead (a probe that hangs or is
/// cut short must not hold the credential shut).
const PROBE_GRACE: Duration = Duration::from_secs(10);

/// How soon a call refused while a probe runs may ask again.
const PROBE_RETRY: Duration = Duration::from_secs(1);

/// One credential's failures in a row and the wait they set.
pub struct CredentialHealth {
    name: Arc<str>,
    state: Mutex<Health>,
}

#[derive(Default)]
struct Health {
    /// Rounds that failed in a row: the wait before the next try doubles with each.
    failures: u32,
    /// No call until then: after a failure, its wait; while a probe runs, its grace.
    blocked_until: Option<Instant>,
    /// A call let through after a wait, whose outcome says whether the credential works.
    probing: bool,
}

impl CredentialHealth {
    pub fn new(name: Arc<str>) -> Self {
        Self {
            name,
            state: Mutex::new(Health::default()),
        }
    }

    pub fn name(&self) -> &Arc<str> {
        &self.name
    }

    /// Refused at once, with `what` as the reason, while a failure's wait runs, and while
    /// another call probes after it: one call finds out whether the credential works again,
    /// not every call that was waiting.
    pub fn check(&self, what: impl FnOnce() -> String) -> Result<(), AgentError> {
        let now = Instant::now();
        let mut h = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match h.blocked_until {
            // While a probe runs, ask again soon (a second at most): its outcome may come in
            // milliseconds, and a long hold here would outlast a recovery.
            Some(t) if now < t => Err(AgentError::credential_unavailable(
                self.name.clone(),
                format!("{}; the next try is due", what()),
                if h.probing {
                    (t - now).min(PROBE_RETRY)
                } else {
                    t - now
                },
            )),
            _ if h.failures > 0 => {
                // This call is the probe.
                h.probing = true;
                h.blocked_until = Some(now + PROBE_GRACE);
                Ok(())
            }
            _ => Ok(()),
        }
    }

    /// The credential failed (`message` says how, secrets already scrubbed): hold it for the
    /// next wait and answer the call with the refusal that pauses its agents. The calls that
    /// were already on their way when it failed fail with it, but count as one round: the
    /// wait, the log line and the metric are the round's, not each call's.
    pub fn failed(&self, message: String, asked: Option<Duration>) -> AgentError {
        let now = Instant::now();
        let mut h = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = h.blocked_until
            && now < t
            && !h.probing
        {
            return AgentError::credential_unavailable(self.name.clone(), message, t - now);
        }
        let n = h.failures;
        h.failures += 1;
        h.probing = false;
        // The longer of the backoff and what the server asked for.
        let wait = Duration::from_secs(1 << n.min(6))
            .min(Duration::from_secs(60))
            .max(asked.unwrap_or_default().min(Duration::from_secs(600)));
        h.blocked_until = Some(now + wait);
        drop(h);
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

    /// The credential worked: its calls go through, and the next failure waits the shortest
    /// time again.
    pub fn recovered(&self) {
        let mut h = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if h.failures == 0 && !h.probing {
            return;
        }
        *h = Health::default();
        drop(h);
        tracing::info!(credential = %self.name, "a credential works again");
    }
}

/// A credential that is a fixed value (a bearer token, an API key, a password) and its health.
pub struct FixedKey {
    pub cell: Arc<SecretCell>,
    pub health: Arc<CredentialHealth>,
}

impl FixedKey {
    /// The value to send now, unless the credential is held after a refusal.
    pub async fn value(&self) -> Result<String, AgentError> {
        self.health
            .check(|| format!("credential {} was refused (401)", self.health.name()))?;
        self.cell.current().await
    }

    /// The answer to a call made with `used`. A 401 reads the credential again from its
    /// source (it may have been rotated there) and, if it changed, makes the call `again` with
    /// the new value; refused still, or unchanged, the credential pauses its agents (the
    /// upstream's words, through `redact`, in the error).
    pub async fn answer<F, Fut>(
        &self,
        resp: reqwest::Response,
        used: &str,
        again: F,
        redact: &(dyn Fn(&str) -> String + Sync),
    ) -> Result<reqwest::Response, AgentError>
    where
        F: FnOnce(String) -> Fut,
        Fut: std::future::Future<Output = Result<reqwest::Response, AgentError>>,
    {
        let mut resp = resp;
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            let fresh = self.cell.reread(used).await;
            if fresh != used {
                resp = again(fresh).await?;
            }
        }
        if resp.status() != reqwest::StatusCode::UNAUTHORIZED {
            self.health.recovered();
            return Ok(resp);
        }
        let body = super::read_prefix(resp, 4 << 10).await;
        let why = redact(&String::from_utf8_lossy(&body));
        Err(self.health.failed(
            format!(
                "credential {} was refused (401): {}",
                self.health.name(),
                why.trim()
            ),
            None,
        ))
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

    #[tokio::test(start_paused = true)]
    async fn a_failed_credential_refuses_calls_for_a_doubling_wait_then_lets_one_probe() {
        let h = CredentialHealth::new("crm".into());
        assert!(h.check(|| "x".into()).is_ok());
        let e = h.failed("credentials refused".into(), None);
        assert_eq!(e.class, ErrorClass::RateLimited);
        assert_eq!(e.credential.as_deref(), Some("crm"));
        assert_eq!(e.retry_after, Some(Duration::from_secs(1)));
        // Calls that were on their way fail with it, in the same round: the wait stays.
        let late = h.failed("refused too".into(), None);
        assert!(late.retry_after.unwrap() <= Duration::from_secs(1));
        let refused = h.check(|| "crm is refused".into()).unwrap_err();
        assert_eq!(refused.credential.as_deref(), Some("crm"));
        assert!(refused.message.starts_with("crm is refused"), "{refused}");
        // After the wait one call probes; the others wait for its outcome, asking again soon.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert!(h.check(|| "x".into()).is_ok());
        let waiting = h.check(|| "x".into()).unwrap_err();
        assert_eq!(waiting.retry_after, Some(PROBE_RETRY));
        assert_eq!(
            h.failed("again".into(), None).retry_after,
            Some(Duration::from_secs(2))
        );
        // What the server asked for, when longer; never past ten minutes.
        tokio::time::advance(Duration::from_secs(2)).await;
        assert!(h.check(|| "x".into()).is_ok());
        assert_eq!(
            h.failed("again".into(), Some(Duration::from_secs(3600)))
                .retry_after,
            Some(Duration::from_secs(600))
        );
        // A probe that never comes back holds the others for its grace only.
        tokio::time::advance(Duration::from_secs(600)).await;
        assert!(h.check(|| "x".into()).is_ok());
        tokio::time::advance(PROBE_GRACE).await;
        assert!(h.check(|| "x".into()).is_ok());
        h.recovered();
        assert!(h.check(|| "x".into()).is_ok());
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
