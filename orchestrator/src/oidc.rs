//! OIDC/JWT bearer tokens: a token signed by the configured issuer's keys, for the configured
//! audience, within its validity, its claims naming a tenant and roles.
//!
//! ```toml
//! [auth.oidc]
//! issuer = "https://login.example.com/"
//! audience = "cascade"
//! jwks_url = "https://login.example.com/.well-known/jwks.json"   # or jwks_file = "jwks.json"
//! tenant_claim = "tenant"      # default
//! roles_claim = "roles"        # default: an array of role names, or one space-separated string
//! leeway = "60s"               # default: clock skew allowed on exp and nbf
//! ```
//!
//! Only asymmetric signatures are accepted (RS*, PS*, ES256, ES384, EdDSA): a token with
//! `alg: none` or an HMAC algorithm never verifies. The key set is fetched on first use and
//! again when a token names a key it does not hold (a rotation at the provider), at most once
//! every 10 s. A token verified once is remembered by its SHA-256 until it expires, so a busy
//! caller pays for one signature check.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use jsonwebtoken::jwk::JwkSet;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

use crate::auth::{AuthError, Identity, Role};

/// A key set is fetched again for an unknown key at most this often.
const REFETCH_EVERY: Duration = Duration::from_secs(5);
/// Tokens remembered as verified, at most; past it the memory starts again.
const VERIFIED_CAPACITY: usize = 10_000;

/// `[auth.oidc]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OidcConfig {
    pub issuer: String,
    pub audience: String,
    #[serde(default)]
    pub jwks_url: Option<String>,
    #[serde(default)]
    pub jwks_file: Option<PathBuf>,
    #[serde(default = "default_tenant_claim")]
    pub tenant_claim: String,
    #[serde(default = "default_roles_claim")]
    pub roles_claim: String,
    #[serde(default)]
    pub leeway: Option<cascade_agents::HumanDuration>,
}

fn default_tenant_claim() -> String {
    "tenant".into()
}

fn default_roles_claim() -> String {
    "roles".into()
}

/// The verifier of one issuer's tokens.
pub struct Oidc {
    config: OidcConfig,
    leeway: u64,
    keys: RwLock<Arc<JwkSet>>,
    fetched: tokio::sync::Mutex<Option<Instant>>,
    client: reqwest::Client,
    /// SHA-256 of a verified token → who it is and when it expires (unix seconds).
    verified: Mutex<HashMap<[u8; 32], (Identity, u64)>>,
}

impl Oidc {
    /// The verifier of `config` (a key file is read now; a key URL on first use).
    pub fn new(config: &OidcConfig) -> Result<Self, String> {
        if config.issuer.trim().is_empty() || config.audience.trim().is_empty() {
            return Err("[auth.oidc] needs issuer and audience".into());
        }
        let keys = match (&config.jwks_url, &config.jwks_file) {
            (Some(_), Some(_)) | (None, None) => {
                return Err(
                    "[auth.oidc] takes jwks_url (the provider's key set, fetched and refreshed) or jwks_file, one of them"
                        .into(),
                );
            }
            (Some(url), None) => {
                let u =
                    reqwest::Url::parse(url).map_err(|e| format!("jwks_url is not a URL: {e}"))?;
                if !matches!(u.scheme(), "http" | "https") {
                    return Err("jwks_url must be http or https".into());
                }
                JwkSet { keys: Vec::new() }
            }
            (None, Some(path)) => {
                let text = std::fs::read_to_string(path)
                    .map_err(|e| format!("jwks_file {}: {e}", path.display()))?;
                serde_json::from_str(&text)
                    .map_err(|e| format!("jwks_file {} is not a JWK set: {e}", path.display()))?
            }
        };
        Ok(Self {
            leeway: config.leeway.map_or(60, |d| d.get().as_secs()),
            config: config.clone(),
            keys: RwLock::new(Arc::new(keys)),
            fetched: tokio::sync::Mutex::new(None),
            client: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(10))
                .build()
                .map_err(|e| format!("cannot build an HTTP client: {e}"))?,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// Who `token` says the caller is, if it verifies.
    pub async fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let now = unix_now();
        if let Some((who, exp)) = lock(&self.verified).get(&digest)
            && now < exp.saturating_add(self.leeway)
        {
            return Ok(who.clone());
        }
        let bad = |why: String| AuthError::InvalidToken(why);
        let header =
            jsonwebtoken::decode_header(token).map_err(|e| bad(format!("not a JWT: {e}")))?;
        if !matches!(
            header.alg,
            Algorithm::RS256
                | Algorithm::RS384
                | Algorithm::RS512
                | Algorithm::PS256
                | Algorithm::PS384
                | Algorithm::PS512
                | Algorithm::ES256
                | Algorithm::ES384
                | Algorithm::EdDSA
        ) {
            return Err(bad(format!(
                "{:?} tokens are not accepted: only the issuer's public-key signatures",
                header.alg
            )));
        }
        let key = self.key(header.kid.as_deref()).await?;
        let mut validation = Validation::new(header.alg);
        validation.set_issuer(&[&self.config.issuer]);
        validation.set_audience(&[&self.config.audience]);
        validation.leeway = self.leeway;
        validation.validate_nbf = true;
        let data = jsonwebtoken::decode::<Value>(token, &key, &validation)
            .map_err(|e| bad(format!("the token does not verify: {e}")))?;
        let claims = data.claims;
        let tenant = claims
            .get(&self.config.tenant_claim)
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                bad(format!(
                    "the token has no {:?} claim naming its tenant",
                    self.config.tenant_claim
                ))
            })?;
        let roles: Vec<Role> = match claims.get(&self.config.roles_claim) {
            Some(Value::Array(a)) => a.iter().filter_map(|r| r.as_str()?.parse().ok()).collect(),
            Some(Value::String(s)) => s
                .split_whitespace()
                .filter_map(|r| r.parse().ok())
                .collect(),
            _ => Vec::new(),
        };
        let name = ["sub", "client_id", "azp"]
            .iter()
            .find_map(|c| claims.get(*c).and_then(Value::as_str))
            .unwrap_or("token");
        let exp = claims.get("exp").and_then(Value::as_u64).unwrap_or(now);
        let who = Identity::new(name, tenant, &roles)
            .until(std::time::UNIX_EPOCH + std::time::Duration::from_secs(exp));
        let mut verified = lock(&self.verified);
        if verified.len() >= VERIFIED_CAPACITY {
            verified.retain(|_, (_, exp)| *exp > now);
            if verified.len() >= VERIFIED_CAPACITY {
                verified.clear();
            }
        }
        verified.insert(digest, (who.clone(), exp));
        Ok(who)
    }

    /// The decoding key named `kid` (the only key when the token names none), fetching the key
    /// set again when it is unknown.
    async fn key(&self, kid: Option<&str>) -> Result<DecodingKey, AuthError> {
        for attempt in 0..2 {
            let set = self.keys.read().unwrap_or_else(|p| p.into_inner()).clone();
            let jwk = match kid {
                Some(kid) => set.find(kid),
                None if set.keys.len() == 1 => set.keys.first(),
                None => None,
            };
            if let Some(jwk) = jwk {
                return DecodingKey::from_jwk(jwk).map_err(|e| {
                    AuthError::InvalidToken(format!("the issuer's key is unusable: {e}"))
                });
            }
            if attempt == 0 && !self.refresh().await {
                break;
            }
        }
        Err(AuthError::InvalidToken(format!(
            "no key {} in the issuer's key set",
            kid.map_or("(the token names none)".to_string(), |k| format!("{k:?}"))
        )))
    }

    /// Fetch the key set again, if it comes from a URL and was not fetched within
    /// [`REFETCH_EVERY`]. Returns whether it was.
    async fn refresh(&self) -> bool {
        let Some(url) = &self.config.jwks_url else {
            return false;
        };
        let mut fetched = self.fetched.lock().await;
        if fetched.is_some_and(|t| t.elapsed() < REFETCH_EVERY) {
            return false;
        }
        *fetched = Some(Instant::now());
        let got = async {
            self.client
                .get(url)
                .send()
                .await?
                .error_for_status()?
                .json::<JwkSet>()
                .await
        }
        .await;
        match got {
            Ok(set) => {
                tracing::info!(keys = set.keys.len(), "OIDC key set fetched");
                *self.keys.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(set);
                true
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not fetch the OIDC key set");
                false
            }
        }
    }
}

fn unix_now() -> u64 {
    crate::clock::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}
