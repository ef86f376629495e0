//! Secrets are referenced, never written in configuration: `env:NAME` reads an environment
//! variable, `file:PATH` a file (trailing newline trimmed). A value is resolved when the server
//! starts and is never logged, displayed or stored.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// Where a secret comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(std::path::PathBuf),
}

impl FromStr for SecretRef {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(name) = s.strip_prefix("env:") {
            if name.is_empty() {
                return Err(
                    "`env:` needs a variable name, e.g. \"env:CASCADE_WEBHOOK_SECRET\"".into(),
                );
            }
            return Ok(Self::Env(name.to_string()));
        }
        if let Some(path) = s.strip_prefix("file:") {
            if path.is_empty() {
                return Err("`file:` needs a path, e.g. \"file:/run/secrets/webhook\"".into());
            }
            return Ok(Self::File(path.into()));
        }
        // The value itself is not echoed: it may be the credential.
        Err("a secret must be a reference, not the value: write \"env:NAME\" or \"file:PATH\" and put the value there".into())
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl fmt::Debug for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Env(n) => write!(f, "env:{n}"),
            Self::File(p) => write!(f, "file:{}", p.display()),
        }
    }
}

impl SecretRef {
    /// Read the secret's value.
    pub fn resolve(&self) -> Result<Secret, String> {
        let value = match self {
            Self::Env(name) => std::env::var(name)
                .map_err(|_| format!("secret {self}: environment variable {name} is not set"))?,
            Self::File(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("secret {self}: cannot read {}: {e}", path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
        };
        if value.is_empty() {
            return Err(format!("secret {self} is empty"));
        }
        Ok(Secret(value.into_bytes()))
    }
}

/// A resolved secret. Its `Debug` does not show the value.
#[derive(Clone)]
pub struct Secret(Vec<u8>);

impl Secret {
    pub fn expose(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// `sha256=<hex>`: the HMAC-SHA256 of `body` under `secret`, as sent in `X-Cascade-Signature`.
pub fn sign(secret: &Secret, body: &[u8]) -> String {
    use hmac::{KeyInit, Mac};
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.expose())
        .expect("HMAC takes any key length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// Check a `sha256=<hex>` signature in constant time.
pub fn verify(secret: &Secret, body: &[u8], signature: &str) -> bool {
    use hmac::{KeyInit, Mac};
    let Some(hex_sig) = signature.trim().strip_prefix("sha256=") else {
        return false;
    };
    let Ok(expected) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.expose())
        .expect("HMAC takes any key length");
    mac.update(body);
    mac.verify_slice(&expected).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references_parse_and_literals_are_refused_without_echo() {
        assert_eq!(
            "env:X".parse::<SecretRef>().unwrap(),
            SecretRef::Env("X".into())
        );
        assert_eq!(
            "file:/a".parse::<SecretRef>().unwrap(),
            SecretRef::File("/a".into())
        );
        let err = "sk-live-123".parse::<SecretRef>().unwrap_err();
        assert!(!err.contains("sk-live-123"), "{err}");
        assert!(err.contains("env:NAME"));
    }

    #[test]
    fn resolves_from_file_and_never_shows_the_value() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("s");
        std::fs::write(&p, "hunter2\n").unwrap();
        let s = SecretRef::File(p).resolve().unwrap();
        assert_eq!(s.expose(), b"hunter2");
        assert_eq!(format!("{s:?}"), "Secret(<redacted>)");
        let missing = SecretRef::Env("CASCADE_TEST_SURELY_UNSET".into())
            .resolve()
            .unwrap_err();
        assert!(missing.contains("not set"));
    }

    #[test]
    fn signatures_verify_and_tampering_fails() {
        let s = Secret(b"k".to_vec());
        let sig = sign(&s, b"{\"a\":1}");
        assert!(sig.starts_with("sha256="));
        assert!(verify(&s, b"{\"a\":1}", &sig));
        assert!(!verify(&s, b"{\"a\":2}", &sig));
        assert!(!verify(&s, b"{\"a\":1}", "sha256=00"));
        assert!(!verify(&Secret(b"other".to_vec()), b"{\"a\":1}", &sig));
    }
}
