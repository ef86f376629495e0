//! OAuth2 for the `http` kind (and, later, MCP servers over HTTP): the client-credentials grant,
//! and the refresh-token grant for delegated tokens.
//!
//! A token is cached per credential and shared by every agent that uses the same credential
//! (same token URL, client, scopes and audience). It is fetched again shortly before it expires
//! (a fifth of its lifetime, at most a minute, early), by one call only: a hundred concurrent
//! calls that find it stale wait for the same refresh. A call the upstream answers with 401 asks
//! for a new token once ([`Credential::refresh_after_refusal`]), and a refusal of a fresh token
//! pauses the credential ([`Credential::refused_fresh`]). A rotated refresh token replaces the
//! old one, in memory and in the server's store ([`TokenVault`]), so that a restart does not
//! go back to a refresh token the authorization server has already retired. A credential
//! that cannot get a token pauses its agents rather than failing their jobs (see
//! [`Credential::token`]).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;

use crate::AgentError;
use crate::secret::{SecretCell, SecretRef};

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Config {
    pub token_url: String,
    pub client_id: String,
    pub client_secret: SecretRef,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub audience: Option<String>,
    /// For a delegated token: the refresh-token grant instead of client credentials.
    #[serde(default)]
    pub refresh_token: Option<SecretRef>,
    /// The credential's name, in pause causes (`credential:<name>`), metrics and logs: the
    /// `NAME` of `[credentials.NAME]`; an inline credential is named after its agent
    /// (`graph.agent`).
    #[serde(default)]
    pub name: Option<String>,
    /// A CA (PEM) the token endpoint's certificate may chain to, beside the system roots: an
    /// internal authorization server. An inline credential of an `http` agent takes the agent's
    /// `ca_file` unless set here; a `[credentials.NAME]` shared by several agents sets its own.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

use super::health::CredentialHealth;
pub use super::health::REFRESH_FAILURES;

struct Token {
    value: String,
    /// When to fetch the next one (before it expires).
    renew_at: Instant,
}

/// One credential's token, shared by the agents that use it.
pub struct Credential {
    /// Its source in the process's redactor (its tokens).
    source: u64,
    /// The digest of the configured refresh token (for the vault).
    origin: Option<String>,
    vault: Option<Arc<dyn TokenVault>>,
    token_url: reqwest::Url,
    client_id: String,
    client_secret: SecretCell,
    scopes: Vec<String>,
    audience: Option<String>,
    refresh_token: Mutex<Option<String>>,
    /// Held while a token is fetched: the single flight.
    token: tokio::sync::Mutex<Option<Token>>,
    client: reqwest::Client,
    fetches: AtomicU64,
    /// Failed fetches and refused fresh tokens hold its calls for a growing wait.
    health: CredentialHealth,
}

/// Where a credential's rotated refresh token outlives the process: the server's store. What
/// it holds is sealed ([`seal`]): useless without the credential's client secret, which the
/// store never sees.
pub trait TokenVault: Send + Sync {
    /// The sealed state saved for `credential`, if any.
    fn load(&self, credential: &str) -> Option<String>;
    /// Replace `credential`'s sealed state.
    fn save(&self, credential: &str, sealed: String);
}

/// The registry's vault, set by the server before its agents are built (none: tokens rotate in
/// memory only).
#[derive(Default)]
pub struct Vault(Mutex<Option<Arc<dyn TokenVault>>>);

impl Vault {
    pub fn set(&self, vault: Arc<dyn TokenVault>) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(vault);
    }

    fn get(&self) -> Option<Arc<dyn TokenVault>> {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// What a vault keeps for a credential: the rotated refresh token, and a digest of the
/// configured one it descends from (an operator who configures a new refresh token means it).
#[derive(serde::Serialize, Deserialize)]
struct Kept {
    origin: String,
    refresh_token: String,
}

fn digest(text: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, text.as_bytes())
        .as_ref()
        .iter()
        .take(16)
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The key that seals `credential`'s state: HKDF-SHA256 of its client secret.
fn sealing_key(client_secret: &str, credential: &str) -> ring::aead::LessSafeKey {
    use ring::{aead, hkdf};
    let salt = hkdf::Salt::new(hkdf::HKDF_SHA256, b"cascade/oauth2/refresh-token/v1");
    let info = [credential.as_bytes()];
    let prk = salt.extract(client_secret.as_bytes());
    let okm = prk
        .expand(&info, &aead::CHACHA20_POLY1305)
        .expect("32 bytes is a valid HKDF output length");
    aead::LessSafeKey::new(aead::UnboundKey::from(okm))
}

/// `plain` sealed for `credential` (ChaCha20-Poly1305, a random nonce, the credential's name as
/// associated data), as base64 of nonce and ciphertext.
fn seal(client_secret: &str, credential: &str, plain: &[u8]) -> Option<String> {
    use base64::Engine;
    use ring::aead::{Aad, NONCE_LEN, Nonce};
    use ring::rand::SecureRandom;
    let mut nonce = [0u8; NONCE_LEN];
    ring::rand::SystemRandom::new().fill(&mut nonce).ok()?;
    let mut data = plain.to_vec();
    sealing_key(client_secret, credential)
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(credential.as_bytes()),
            &mut data,
        )
        .ok()?;
    let mut out = nonce.to_vec();
    out.extend_from_slice(&data);
    Some(base64::engine::general_purpose::STANDARD.encode(out))
}

/// The inverse of [`seal`]; `None` for anything not sealed by this secret for this credential.
fn unseal(client_secret: &str, credential: &str, sealed: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    use ring::aead::{Aad, NONCE_LEN, Nonce};
    let raw = base64::engine::general_purpose::STANDARD
        .decode(sealed)
        .ok()?;
    if raw.len() < NONCE_LEN {
        return None;
    }
    let (nonce, data) = raw.split_at(NONCE_LEN);
    let mut data = data.to_vec();
    let plain = sealing_key(client_secret, credential)
        .open_in_place(
            Nonce::try_assume_unique_for_key(nonce).ok()?,
            Aad::from(credential.as_bytes()),
            &mut data,
        )
        .ok()?;
    Some(plain.to_vec())
}

/// Every credential of a registry, by what identifies it.
#[derive(Default)]
pub struct Credentials {
    by_key: Mutex<HashMap<String, Arc<Credential>>>,
}

impl Credentials {
    /// The credential `config` describes, made on first use; its rotated refresh token is kept
    /// in `vault`.
    pub fn get(&self, config: &OAuth2Config, vault: &Vault) -> Result<Arc<Credential>, String> {
        // The references, not their values, tell credentials apart: two delegated tokens of
        // one client (two users' refresh tokens) are two credentials.
        let key = format!(
            "{}\n{}\n{}\n{}\n{}\n{}\n{}\n{}",
            config.name.as_deref().unwrap_or(""),
            config.token_url,
            config.client_id,
            config.client_secret,
            config.scopes.join(" "),
            config.audience.as_deref().unwrap_or(""),
            config
                .refresh_token
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            config
                .ca_file
                .as_ref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        );
        let mut map = self.by_key.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = map.get(&key) {
            return Ok(c.clone());
        }
        let token_url = reqwest::Url::parse(&config.token_url)
            .map_err(|e| format!("token_url is not a URL: {e}"))?;
        if !matches!(token_url.scheme(), "http" | "https") {
            return Err("token_url must be http or https".into());
        }
        let client_secret = SecretCell::load(config.client_secret.clone())
            .map_err(|e| format!("client_secret: {e}"))?;
        let name: Arc<str> = config.name.as_deref().unwrap_or("oauth2").into();
        let configured = match &config.refresh_token {
            Some(r) => Some(
                SecretCell::load(r.clone())
                    .and_then(|c| c.get().map_err(|e| e.message))
                    .map_err(|e| format!("refresh_token: {e}"))?,
            ),
            None => None,
        };
        let vault = vault.get().filter(|_| configured.is_some());
        let origin = configured.as_deref().map(digest);
        // A token rotated by an earlier run, if it descends from the configured one.
        let refresh_token = match (&configured, &vault, client_secret.get()) {
            (Some(configured), Some(vault), Ok(secret)) => vault
                .load(&name)
                .and_then(|sealed| unseal(&secret, &name, &sealed))
                .and_then(|plain| serde_json::from_slice::<Kept>(&plain).ok())
                .filter(|kept| Some(&kept.origin) == origin.as_ref())
                .map(|kept| kept.refresh_token)
                .or_else(|| Some(configured.clone())),
            (configured, _, _) => configured.clone(),
        };
        let source = crate::secret::Redactor::source();
        if let Some(r) = &refresh_token {
            crate::secret::redactor().register(source, vec![r.clone()]);
        }
        let c = Arc::new(Credential {
            source,
            origin,
            vault,
            token_url,
            client_id: config.client_id.clone(),
            client_secret,
            scopes: config.scopes.clone(),
            audience: config.audience.clone(),
            refresh_token: Mutex::new(refresh_token),
            token: tokio::sync::Mutex::new(None),
            client: super::trusting(
                reqwest::Client::builder()
                    .connect_timeout(Duration::from_secs(10))
                    .timeout(Duration::from_secs(30)),
                config.ca_file.as_ref(),
            )
            .map_err(|e| format!("ca_file: {e}"))?
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?,
            fetches: AtomicU64::new(0),
            health: CredentialHealth::new(name),
        });
        map.insert(key, c.clone());
        Ok(c)
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<f64>,
    #[serde(default)]
    refresh_token: Option<String>,
}

impl Credential {
    /// Tokens fetched so far (for tests and metrics).
    pub fn fetches(&self) -> u64 {
        self.fetches.load(Ordering::Relaxed)
    }

    /// A valid token: the cached one, or a new one fetched by this call while others wait.
    ///
    /// A credential that cannot get a token (the authorization server is down, or turns the
    /// client away) is not the step's fault: the call is refused as rate-limited, with a wait
    /// that doubles from 1 s to 60 s, so that its agent and everything downstream pause on the
    /// agent's upstream quota instead of failing their jobs one by one, and the next call after
    /// the wait is the probe. Each failure is logged at error level.
    pub async fn token(&self) -> Result<String, AgentError> {
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_ref()
            && Instant::now() < t.renew_at
        {
            return Ok(t.value.clone());
        }
        self.not_blocked()?;
        let fresh = self.fetch().await.map_err(|e| self.dead(e))?;
        let value = fresh.value.clone();
        *slot = Some(fresh);
        Ok(value)
    }

    /// Refused at once while a failed fetch's wait runs.
    fn not_blocked(&self) -> Result<(), AgentError> {
        self.health.check(|| {
            format!(
                "credential {} (client {}) cannot get a token",
                self.health.name(),
                self.client_id
            )
        })
    }

    fn dead(&self, e: AgentError) -> AgentError {
        self.health.failed(
            format!(
                "credential {} (client {}) cannot get a token: {}",
                self.health.name(),
                self.client_id,
                e.message
            ),
            e.retry_after,
        )
    }

    /// The upstream refused a token that was just fetched: the credential is dead for now (its
    /// permissions were revoked, its client disabled). The cached token is dropped and the
    /// credential pauses like one that cannot get a token, probing with the same growing wait,
    /// rather than fetching a token for every call.
    pub async fn refused_fresh(&self, message: &str) -> AgentError {
        *self.token.lock().await = None;
        self.dead(AgentError::unauthorized(format!(
            "a fresh token was refused: {message}"
        )))
    }

    /// The upstream refused `refused` with 401: a new token, unless another call has already
    /// replaced it.
    pub async fn refresh_after_refusal(&self, refused: &str) -> Result<String, AgentError> {
        let mut slot = self.token.lock().await;
        if let Some(t) = slot.as_ref()
            && t.value != refused
        {
            return Ok(t.value.clone());
        }
        self.not_blocked()?;
        let fresh = self.fetch().await.map_err(|e| self.dead(e))?;
        let value = fresh.value.clone();
        *slot = Some(fresh);
        Ok(value)
    }

    /// The upstream accepted this credential's token: it works (a failure after this waits the
    /// shortest time again). Not when a token is fetched: a fresh token the upstream refuses is
    /// a failure all the same, and its waits must keep growing.
    pub fn accepted(&self) {
        self.health.recovered();
    }

    /// `text` with this credential's secrets and tokens scrubbed.
    pub fn redact(&self, text: &str) -> String {
        let mut out = self.client_secret.redact(text);
        if let Some(r) = self
            .refresh_token
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_deref()
            && r.len() >= 4
        {
            out = out.replace(r, "[redacted]");
        }
        if let Ok(slot) = self.token.try_lock()
            && let Some(t) = slot.as_ref()
        {
            out = out.replace(&t.value, "[redacted]");
        }
        out
    }

    /// Save a rotated refresh token, sealed, in the vault.
    fn keep(&self, secret: &str, rotated: &str) {
        let (Some(vault), Some(origin)) = (&self.vault, &self.origin) else {
            return;
        };
        let kept = Kept {
            origin: origin.clone(),
            refresh_token: rotated.to_string(),
        };
        match serde_json::to_vec(&kept)
            .ok()
            .and_then(|plain| seal(secret, self.health.name(), &plain))
        {
            Some(sealed) => vault.save(self.health.name(), sealed),
            None => {
                tracing::error!(credential = %self.health.name(), "cannot seal a rotated refresh token; a restart will use the configured one")
            }
        }
    }

    async fn fetch(&self) -> Result<Token, AgentError> {
        let secret = self.client_secret.get()?;
        let refresh = self
            .refresh_token
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let mut form: Vec<(&str, String)> = Vec::new();
        match &refresh {
            Some(r) => {
                form.push(("grant_type", "refresh_token".into()));
                form.push(("refresh_token", r.clone()));
            }
            None => form.push(("grant_type", "client_credentials".into())),
        }
        if !self.scopes.is_empty() {
            form.push(("scope", self.scopes.join(" ")));
        }
        if let Some(a) = &self.audience {
            form.push(("audience", a.clone()));
        }
        let started = Instant::now();
        // The client authenticates with HTTP basic auth (client_secret_basic, RFC 6749 2.3.1).
        let resp = self
            .client
            .post(self.token_url.clone())
            .basic_auth(&self.client_id, Some(&secret))
            .form(&form)
            .send()
            .await
            .map_err(|e| {
                let e = super::transport_error(e);
                AgentError::transient(format!("the token endpoint: {}", self.redact(&e.message)))
            })?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        if !(200..300).contains(&status) {
            let body = super::read_prefix(resp, 64 << 10).await;
            let mut e = super::classify::classify(status, &headers, &body, &|s| self.redact(s));
            // The token endpoint turning the client down is a dead credential, not a bad call.
            if matches!(status, 400 | 401 | 403) {
                e = AgentError::unauthorized(e.message);
            }
            e.message = format!("the token endpoint: {}", e.message);
            return Err(e);
        }
        let body = super::read_capped(resp, 1 << 20).await?;
        let t: TokenResponse = serde_json::from_slice(&body).map_err(|e| {
            AgentError::transient(format!("the token endpoint's answer is not a token: {e}"))
        })?;
        self.fetches.fetch_add(1, Ordering::Relaxed);
        if let Some(rotated) = t.refresh_token
            && refresh.is_some()
        {
            self.keep(&secret, &rotated);
            *self.refresh_token.lock().unwrap_or_else(|p| p.into_inner()) = Some(rotated);
        }
        // The process's redactor scrubs this credential's current token and refresh token.
        let mut values = vec![t.access_token.clone()];
        values.extend(
            self.refresh_token
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clone(),
        );
        crate::secret::redactor().register(self.source, values);
        let lifetime = Duration::from_secs_f64(t.expires_in.unwrap_or(3600.0).clamp(1.0, 86_400.0));
        let early = (lifetime / 5).min(Duration::from_secs(60));
        Ok(Token {
            value: t.access_token,
            renew_at: started + lifetime - early,
        })
    }
}

impl Drop for Credential {
    fn drop(&mut self) {
        crate::secret::redactor().unregister(self.source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_token_opens_only_with_its_secret_and_credential() {
        let sealed = seal("client-secret", "crm", b"rt-2").unwrap();
        assert!(!sealed.contains("rt-2"));
        assert_eq!(unseal("client-secret", "crm", &sealed).unwrap(), b"rt-2");
        assert_eq!(unseal("another-secret", "crm", &sealed), None);
        assert_eq!(unseal("client-secret", "erp", &sealed), None);
        assert_eq!(unseal("client-secret", "crm", "not base64!"), None);
        // A fresh nonce each time.
        assert_ne!(sealed, seal("client-secret", "crm", b"rt-2").unwrap());
    }
}
