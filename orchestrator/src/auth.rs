//! Who calls, and what they may do: API keys declared in `cascade.toml` by their hashes, each
//! with a name, a tenant, roles and an optional expiry.
//!
//! ```toml
//! [auth]
//! approval_separation = true     # the submitter of a job cannot approve its calls
//! metrics_public = false         # /metrics needs a credential unless true
//!
//! [[auth.api_keys]]
//! name = "billing-service"
//! tenant = "acme"
//! roles = ["submit", "read"]
//! hash = "sha256:9f86d0…"        # or "argon2id:$argon2id$v=19$m=19456,t=2,p=1$…"
//! expires = "2027-06-30T00:00:00Z"
//! ```
//!
//! `cascade keys create --tenant acme --roles submit,read` prints a new key once, with the table
//! to append. A caller sends `authorization: Bearer <key>` (gRPC metadata or an HTTP header).
//! Without any key configured, authentication is off: every caller is the anonymous
//! administrator of every tenant, and the server listens on loopback only unless
//! `allow_unauthenticated = true`.
//!
//! A SHA-256 hash is checked with one lookup (a key is 256 random bits: no dictionary reaches
//! it). An Argon2id hash costs tens of milliseconds to check, so a key checked once is
//! remembered by its SHA-256 (and an unknown one too, in a bounded map), and checks run two at a
//! time off the async threads.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// Every key this server makes starts so (a token without it is never checked against an
/// Argon2id hash).
pub const KEY_PREFIX: &str = "csk_";

/// Unknown tokens remembered as checked against the Argon2id hashes; past it that memory starts
/// again (the keys found valid are kept apart, and never forgotten: there are as many as keys).
const REFUSED_CAPACITY: usize = 10_000;

/// The label that names who submitted a job (with authentication on), for approval separation.
pub const SUBMITTER_LABEL: &str = "cascade.submitter";

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Submit jobs (gRPC, MCP's `run_<graph>`).
    Submit,
    /// Read jobs, graphs, approvals, the dashboard and `/api/*`.
    Read,
    /// Decide proposals.
    Approve,
    /// Everything, every tenant: graph reload, audit export.
    Admin,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Submit, Role::Read, Role::Approve, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Submit => "submit",
            Self::Read => "read",
            Self::Approve => "approve",
            Self::Admin => "admin",
        }
    }

    fn bit(self) -> u8 {
        1 << (self as u8)
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == s.trim())
            .ok_or_else(|| format!("{s:?} is not a role: submit, read, approve or admin"))
    }
}

/// `[[auth.api_keys]]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyConfig {
    pub name: String,
    pub tenant: String,
    pub roles: Vec<Role>,
    /// `sha256:<hex>` or `argon2id:<PHC string>`.
    pub hash: String,
    /// RFC 3339; the key is refused from then on.
    #[serde(default)]
    pub expires: Option<String>,
}

/// `[[auth.client_certs]]`: the identity of a client that shows a certificate signed by
/// `[server.tls] client_ca` (mutual TLS) and sends no bearer token.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ClientCertConfig {
    /// The certificate's subject: its common name (`billing-service` or `CN=billing-service`)
    /// or its whole RFC 4514 subject (`CN=billing-service,O=Acme`).
    pub subject: String,
    pub tenant: String,
    pub roles: Vec<Role>,
}

/// `[auth]`.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuthSettings {
    pub api_keys: Vec<ApiKeyConfig>,
    pub client_certs: Vec<ClientCertConfig>,
    /// `[auth.oidc]`: bearer JWTs of an OIDC provider.
    pub oidc: Option<crate::oidc::OidcConfig>,
    pub allow_unauthenticated: bool,
    pub approval_separation: bool,
    pub metrics_public: bool,
}

impl AuthSettings {
    /// Whether callers must prove who they are.
    pub fn enabled(&self) -> bool {
        !self.api_keys.is_empty() || self.oidc.is_some() || !self.client_certs.is_empty()
    }
}

/// Who made a request.
#[derive(Clone, Debug, PartialEq)]
pub struct Identity {
    pub name: Arc<str>,
    /// `None`: every tenant (the anonymous caller when authentication is off).
    pub tenant: Option<Arc<str>>,
    roles: u8,
    /// When the credential that proved it stops being valid (a key's `expires`, a token's
    /// `exp`), if it does: a session signed in with it ends then too.
    pub expires: Option<SystemTime>,
}

impl Identity {
    /// A caller named `name` of `tenant` holding `roles`.
    pub fn new(name: &str, tenant: &str, roles: &[Role]) -> Self {
        Self {
            name: name.into(),
            tenant: Some(tenant.into()),
            roles: roles.iter().fold(0, |acc, r| acc | r.bit()),
            expires: None,
        }
    }

    /// This identity, proved by a credential valid until `at`.
    pub fn until(mut self, at: SystemTime) -> Self {
        self.expires = Some(at);
        self
    }

    /// The caller when authentication is off: every role, every tenant.
    pub fn anonymous() -> Self {
        Self {
            name: "anonymous".into(),
            tenant: None,
            roles: Role::Admin.bit(),
            expires: None,
        }
    }

    /// A caller with no rights at all (a request that reached a tool host without the identity
    /// the server's authentication gives every request).
    pub fn nobody() -> Self {
        Self {
            name: "unknown".into(),
            tenant: Some("".into()),
            roles: 0,
            expires: None,
        }
    }

    pub fn has(&self, role: Role) -> bool {
        self.roles & (role.bit() | Role::Admin.bit()) != 0
    }

    pub fn is_admin(&self) -> bool {
        self.has(Role::Admin)
    }

    /// The one tenant it may see, for filtering a listing (`None`: every tenant).
    pub fn only_tenant(&self) -> Option<&str> {
        match self.is_admin() {
            true => None,
            false => self.tenant.as_deref(),
        }
    }

    /// Whether it may see what belongs to `tenant`.
    pub fn sees(&self, tenant: &str) -> bool {
        self.is_admin() || self.tenant.as_deref().is_none_or(|t| t == tenant)
    }

    /// The tenant a request of it acts in: the one it names, or its own. Another tenant than
    /// its own is for an administrator only.
    pub fn tenant_for(&self, requested: &str) -> Result<String, AuthError> {
        let own = self.tenant.as_deref().unwrap_or("");
        if requested.is_empty() {
            return Ok(own.to_string());
        }
        if requested == own || self.is_admin() {
            return Ok(requested.to_string());
        }
        Err(AuthError::OtherTenant {
            name: self.name.to_string(),
            tenant: requested.chars().take(64).collect(),
        })
    }
}

#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum AuthError {
    #[error("no credential: send `authorization: Bearer <API key>`")]
    Missing,
    #[error("the credential is not a valid API key (send `authorization: Bearer <API key>`)")]
    Unknown,
    #[error("API key {0:?} has expired; create a new one (`cascade keys create`)")]
    Expired(String),
    #[error("the bearer token is refused: {0}")]
    InvalidToken(String),
    #[error(
        "the client certificate {0:?} names no identity: add [[auth.client_certs]] subject = \"{0}\" with its tenant and roles, or send a bearer token"
    )]
    UnknownCertificate(String),
    #[error("{name:?} may not do this: {what} needs the {needed} role")]
    Forbidden {
        name: String,
        needed: Role,
        what: &'static str,
    },
    #[error(
        "{name:?} acts in its own tenant only, not {tenant:?}: leave the tenant empty, or use an admin key"
    )]
    OtherTenant { name: String, tenant: String },
    /// Too many Argon2id checks under way: the caller tries again shortly.
    #[error("too many API keys are being checked at once; try again in a moment")]
    Busy,
}

impl AuthError {
    /// A missing or bad credential (rather than a missing permission).
    pub fn is_unauthenticated(&self) -> bool {
        matches!(
            self,
            Self::Missing
                | Self::Unknown
                | Self::Expired(_)
                | Self::InvalidToken(_)
                | Self::UnknownCertificate(_)
        )
    }

    /// The server could not check the credential now (not the caller's fault).
    pub fn is_busy(&self) -> bool {
        matches!(self, Self::Busy)
    }
}

enum Stored {
    Sha256([u8; 32]),
    Argon2(String),
}

struct Key {
    name: Arc<str>,
    tenant: Arc<str>,
    roles: u8,
    expires: Option<SystemTime>,
    stored: Stored,
}

/// The server's keys, checked per request.
pub struct Authenticator {
    enabled: bool,
    keys: Vec<Key>,
    by_sha: HashMap<[u8; 32], usize>,
    argon: Vec<usize>,
    /// SHA-256 of a token found to be a key with an Argon2id hash → that key.
    verified: Mutex<HashMap<[u8; 32], usize>>,
    /// SHA-256 of tokens found to be no key (bounded: see [`REFUSED_CAPACITY`]).
    refused: Mutex<std::collections::HashSet<[u8; 32]>>,
    /// Argon2id checks under way at most; more are refused as busy rather than queued.
    verifying: Arc<tokio::sync::Semaphore>,
    oidc: Option<crate::oidc::Oidc>,
    client_certs: Vec<ClientCertConfig>,
}

impl Authenticator {
    /// The keys of `settings`, their hashes and expiries parsed; an error names the key.
    pub fn new(settings: &AuthSettings) -> Result<Self, String> {
        let mut keys = Vec::new();
        let mut by_sha = HashMap::new();
        let mut argon = Vec::new();
        for k in &settings.api_keys {
            check_key(k)?;
            let stored = parse_hash(&k.hash).map_err(|e| format!("API key {:?}: {e}", k.name))?;
            let expires = match &k.expires {
                None => None,
                Some(t) => Some(parse_expiry(t).map_err(|e| format!("API key {:?}: {e}", k.name))?),
            };
            let i = keys.len();
            match &stored {
                Stored::Sha256(d) => {
                    if by_sha.insert(*d, i).is_some() {
                        return Err(format!(
                            "API key {:?} has the hash of another key: each key is its own",
                            k.name
                        ));
                    }
                }
                Stored::Argon2(_) => argon.push(i),
            }
            keys.push(Key {
                name: k.name.as_str().into(),
                tenant: k.tenant.as_str().into(),
                roles: k.roles.iter().fold(0, |acc, r| acc | r.bit()),
                expires,
                stored,
            });
        }
        Ok(Self {
            enabled: settings.enabled(),
            keys,
            by_sha,
            argon,
            verified: Mutex::new(HashMap::new()),
            refused: Mutex::new(std::collections::HashSet::new()),
            verifying: Arc::new(tokio::sync::Semaphore::new(2)),
            oidc: match &settings.oidc {
                Some(c) => Some(crate::oidc::Oidc::new(c)?),
                None => None,
            },
            client_certs: settings.client_certs.clone(),
        })
    }

    /// No keys: every caller is [`Identity::anonymous`].
    pub fn disabled() -> Self {
        Self::new(&AuthSettings::default()).expect("no keys to parse")
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Who sent `authorization` (the header's value, `Bearer <key>`) over a connection whose
    /// verified client certificate is `peer` (mutual TLS). A bearer token, when sent, decides;
    /// else the certificate's `[[auth.client_certs]]` entry.
    pub async fn authenticate(
        &self,
        authorization: Option<&str>,
        peer: Option<&crate::tls::PeerCert>,
    ) -> Result<Identity, AuthError> {
        if !self.enabled {
            return Ok(Identity::anonymous());
        }
        let token = authorization
            .and_then(|h| {
                let (scheme, rest) = h.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim())
            })
            .filter(|t| !t.is_empty());
        let token = match (token, peer) {
            (Some(t), _) => t,
            (None, Some(cert)) => return self.by_certificate(cert),
            (None, None) => return Err(AuthError::Missing),
        };
        // A JWT (header.payload.signature) goes to the OIDC verifier; an API key has no dots.
        if let Some(oidc) = &self.oidc
            && token.matches('.').count() == 2
        {
            return oidc.verify(token).await;
        }
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let found = match self.by_sha.get(&digest) {
            Some(&i) => Some(i),
            None => self.check_argon(token, digest).await?,
        };
        let i = found.ok_or(AuthError::Unknown)?;
        let k = &self.keys[i];
        if k.expires.is_some_and(|t| t <= crate::clock::now()) {
            return Err(AuthError::Expired(k.name.to_string()));
        }
        Ok(Identity {
            name: k.name.clone(),
            tenant: Some(k.tenant.clone()),
            roles: k.roles,
            expires: k.expires,
        })
    }

    /// The identity `[[auth.client_certs]]` gives `cert`'s subject.
    fn by_certificate(&self, cert: &crate::tls::PeerCert) -> Result<Identity, AuthError> {
        let c = self
            .client_certs
            .iter()
            .find(|c| cert.matches(&c.subject))
            .ok_or_else(|| {
                AuthError::UnknownCertificate(crate::text::echo(
                    cert.common_name.as_deref().unwrap_or(&cert.subject),
                ))
            })?;
        Ok(Identity::new(
            cert.common_name.as_deref().unwrap_or(&cert.subject),
            &c.tenant,
            &c.roles,
        ))
    }

    /// Who sent `authorization` (over a connection with client certificate `peer`), if they
    /// hold `role` (for `what`, named in the refusal).
    pub async fn require(
        &self,
        authorization: Option<&str>,
        peer: Option<&crate::tls::PeerCert>,
        role: Role,
        what: &'static str,
    ) -> Result<Identity, AuthError> {
        let who = self.authenticate(authorization, peer).await?;
        if !who.has(role) {
            return Err(AuthError::Forbidden {
                name: who.name.to_string(),
                needed: role,
                what,
            });
        }
        Ok(who)
    }

    /// The key with an Argon2id hash that `token` is, if any. A check holds one of two
    /// permits for as long as it runs (the permit goes with the blocking task, so a caller that
    /// gives up frees nothing early); with both taken, the caller is told to try again.
    async fn check_argon(&self, token: &str, digest: [u8; 32]) -> Result<Option<usize>, AuthError> {
        if self.argon.is_empty() || !token.starts_with(KEY_PREFIX) || token.len() > 256 {
            return Ok(None);
        }
        if let Some(&i) = lock(&self.verified).get(&digest) {
            return Ok(Some(i));
        }
        if lock(&self.refused).contains(&digest) {
            return Ok(None);
        }
        let permit = Arc::clone(&self.verifying)
            .try_acquire_owned()
            .map_err(|_| AuthError::Busy)?;
        let hashes: Vec<(usize, String)> = self
            .argon
            .iter()
            .filter_map(|&i| match &self.keys[i].stored {
                Stored::Argon2(phc) => Some((i, phc.clone())),
                Stored::Sha256(_) => None,
            })
            .collect();
        let token = token.to_string();
        let found = tokio::task::spawn_blocking(move || {
            let _permit = permit;
            use argon2::password_hash::PasswordVerifier;
            use argon2::password_hash::phc::PasswordHash;
            hashes.into_iter().find_map(|(i, phc)| {
                let parsed = PasswordHash::new(&phc).ok()?;
                argon2::Argon2::default()
                    .verify_password(token.as_bytes(), &parsed)
                    .ok()
                    .map(|()| i)
            })
        })
        .await
        .map_err(|_| AuthError::Busy)?;
        match found {
            Some(i) => {
                lock(&self.verified).insert(digest, i);
            }
            None => {
                let mut refused = lock(&self.refused);
                if refused.len() >= REFUSED_CAPACITY {
                    refused.clear();
                }
                refused.insert(digest);
            }
        }
        Ok(found)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn check_key(k: &ApiKeyConfig) -> Result<(), String> {
    if k.name.trim().is_empty() {
        return Err("an API key needs a name (who holds it)".into());
    }
    if k.tenant.trim().is_empty() {
        return Err(format!("API key {:?} needs a tenant", k.name));
    }
    if k.roles.is_empty() {
        return Err(format!(
            "API key {:?} has no roles; give it some of submit, read, approve, admin",
            k.name
        ));
    }
    Ok(())
}

fn parse_hash(s: &str) -> Result<Stored, String> {
    if let Some(hex_digest) = s.strip_prefix("sha256:") {
        let bytes = hex::decode(hex_digest.trim())
            .ok()
            .filter(|b| b.len() == 32)
            .ok_or("a sha256 hash is 64 hex digits after \"sha256:\"")?;
        let mut d = [0u8; 32];
        d.copy_from_slice(&bytes);
        return Ok(Stored::Sha256(d));
    }
    if let Some(phc) = s.strip_prefix("argon2id:") {
        use argon2::password_hash::phc::PasswordHash;
        let parsed = PasswordHash::new(phc.trim())
            .map_err(|e| format!("not an Argon2id PHC string ($argon2id$v=19$…): {e}"))?;
        if parsed.algorithm.as_str() != "argon2id" {
            return Err(format!(
                "the PHC string is {}, not argon2id",
                parsed.algorithm.as_str()
            ));
        }
        return Ok(Stored::Argon2(phc.trim().to_string()));
    }
    Err("hash must be \"sha256:<hex>\" or \"argon2id:<PHC string>\" (the key itself is never written down; `cascade keys create` prints both)".into())
}

fn parse_expiry(s: &str) -> Result<SystemTime, String> {
    humantime::parse_rfc3339_weak(s.trim()).map_err(|e| {
        format!("expires {s:?} is not an RFC 3339 time like 2027-06-30T00:00:00Z: {e}")
    })
}

/// A new key: `csk_` and 256 random bits, base64url.
pub fn generate_key() -> String {
    use base64::Engine;
    use rand::Rng;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!(
        "{KEY_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

/// `sha256:<hex>` of `key`.
pub fn sha256_hash(key: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(key.as_bytes())))
}

/// `argon2id:<PHC string>` of `key`, with a random salt and the default parameters.
pub fn argon2id_hash(key: &str) -> Result<String, String> {
    use argon2::password_hash::PasswordHasher;
    argon2::Argon2::default()
        .hash_password(key.as_bytes())
        .map(|h| format!("argon2id:{h}"))
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(keys: Vec<ApiKeyConfig>) -> AuthSettings {
        AuthSettings {
            api_keys: keys,
            ..Default::default()
        }
    }

    fn key(name: &str, tenant: &str, roles: &[Role], hash: String) -> ApiKeyConfig {
        ApiKeyConfig {
            name: name.into(),
            tenant: tenant.into(),
            roles: roles.to_vec(),
            hash,
            expires: None,
        }
    }

    #[tokio::test]
    async fn keys_by_either_hash_with_their_tenant_roles_and_expiry() {
        let (a, b, c) = (generate_key(), generate_key(), generate_key());
        assert!(a.starts_with(KEY_PREFIX) && a.len() > 40 && a != b);
        let mut expired = key("old", "acme", &[Role::Read], sha256_hash(&c));
        expired.expires = Some("2020-01-01T00:00:00Z".into());
        let auth = Authenticator::new(&settings(vec![
            key("ci", "acme", &[Role::Submit, Role::Read], sha256_hash(&a)),
            key("ops", "globex", &[Role::Admin], argon2id_hash(&b).unwrap()),
            expired,
        ]))
        .unwrap();
        let ci = auth
            .authenticate(Some(&format!("Bearer {a}")), None)
            .await
            .unwrap();
        assert_eq!((&*ci.name, ci.tenant.as_deref()), ("ci", Some("acme")));
        assert!(ci.has(Role::Submit) && ci.has(Role::Read) && !ci.has(Role::Approve));
        assert!(ci.sees("acme") && !ci.sees("globex"));
        let ops = auth
            .authenticate(Some(&format!("bearer {b}")), None)
            .await
            .unwrap();
        assert!(ops.is_admin() && ops.has(Role::Approve) && ops.sees("acme"));
        // Checked once, then remembered.
        assert_eq!(lock(&auth.verified).len(), 1);
        assert_eq!(
            auth.authenticate(Some(&format!("Bearer {c}")), None).await,
            Err(AuthError::Expired("old".into()))
        );
        assert_eq!(auth.authenticate(None, None).await, Err(AuthError::Missing));
        assert_eq!(
            auth.authenticate(Some("Bearer csk_nope"), None).await,
            Err(AuthError::Unknown)
        );
        assert_eq!(
            auth.require(
                Some(&format!("Bearer {a}")),
                None,
                Role::Approve,
                "ResolveApproval"
            )
            .await,
            Err(AuthError::Forbidden {
                name: "ci".into(),
                needed: Role::Approve,
                what: "ResolveApproval"
            })
        );
        assert_eq!(ci.tenant_for("").unwrap(), "acme");
        assert!(ci.tenant_for("globex").is_err());
        assert_eq!(ops.tenant_for("acme").unwrap(), "acme");
    }

    #[tokio::test]
    async fn without_keys_every_caller_is_the_anonymous_administrator() {
        let auth = Authenticator::disabled();
        let who = auth.authenticate(None, None).await.unwrap();
        assert!(who.is_admin() && who.sees("any"));
    }

    #[test]
    fn bad_hashes_and_keys_are_named() {
        let bad = |hash: &str| {
            Authenticator::new(&settings(vec![key("k", "t", &[Role::Read], hash.into())]))
                .err()
                .unwrap()
        };
        assert!(bad("md5:abc").contains("sha256:<hex>"));
        assert!(bad("sha256:abcd").contains("64 hex digits"));
        assert!(bad("argon2id:$argon2i$v=19$m=16,t=2,p=1$c29tZXNhbHQ$aGFzaA").contains("argon2id"));
        let e = Authenticator::new(&settings(vec![key("k", "t", &[], sha256_hash("x"))]))
            .err()
            .unwrap();
        assert!(e.contains("no roles"), "{e}");
    }
}
