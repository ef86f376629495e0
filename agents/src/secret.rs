//! Secrets are referenced, never written in configuration: `env:NAME` reads an environment
//! variable, `file:PATH` a file (trailing newline trimmed). A value is resolved when it is needed
//! and is never logged, displayed or stored.

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
        if s.starts_with("exec:") {
            return Err("`exec:` secret references are not supported by this version; use \"env:NAME\" or \"file:PATH\"".into());
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
    pub fn new(value: Vec<u8>) -> Self {
        Self(value)
    }

    pub fn expose(&self) -> &[u8] {
        &self.0
    }

    /// The value as text (a header value, a password); `None` if it is not UTF-8.
    pub fn expose_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// A secret an agent uses at every call: resolved when the agent is built (so that a missing
/// secret is a load error), and a `file:` secret read again when its file's modification time
/// changes (a mounted Kubernetes or Vault-agent secret rotates in place).
pub struct SecretCell {
    reference: SecretRef,
    state: std::sync::Mutex<(String, Option<std::time::SystemTime>)>,
}

impl SecretCell {
    pub fn load(reference: SecretRef) -> Result<Self, String> {
        let (value, mtime) = Self::read(&reference)?;
        Ok(Self {
            reference,
            state: std::sync::Mutex::new((value, mtime)),
        })
    }

    fn read(reference: &SecretRef) -> Result<(String, Option<std::time::SystemTime>), String> {
        let mtime = match reference {
            SecretRef::File(p) => std::fs::metadata(p).and_then(|m| m.modified()).ok(),
            SecretRef::Env(_) => None,
        };
        let value = reference.resolve()?;
        let text = value
            .expose_str()
            .ok_or_else(|| format!("secret {reference} is not UTF-8 text"))?
            .to_string();
        Ok((text, mtime))
    }

    /// The value now.
    pub fn get(&self) -> Result<String, crate::AgentError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let SecretRef::File(p) = &self.reference {
            let now = std::fs::metadata(p).and_then(|m| m.modified()).ok();
            if now != state.1 {
                // A rotation in progress may leave the file briefly missing or empty: keep the
                // value we have and look again at the next call.
                match Self::read(&self.reference) {
                    Ok(fresh) => *state = fresh,
                    Err(e) => {
                        tracing::warn!(secret = %self.reference, error = %e, "could not re-read a rotated secret; using the previous value")
                    }
                }
            }
        }
        Ok(state.0.clone())
    }

    /// `text` with this secret's value replaced by `[redacted]`.
    pub fn redact(&self, text: &str) -> String {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.0.len() >= 4 {
            text.replace(&state.0, "[redacted]")
        } else {
            text.to_string()
        }
    }
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
    fn a_file_secret_is_read_again_when_it_changes() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("token");
        std::fs::write(&p, "first-token\n").unwrap();
        let cell = SecretCell::load(SecretRef::File(p.clone())).unwrap();
        assert_eq!(cell.get().unwrap(), "first-token");
        // A new modification time: the new value.
        std::fs::write(&p, "second-token\n").unwrap();
        let f = std::fs::File::options().write(true).open(&p).unwrap();
        f.set_modified(std::time::SystemTime::now() + std::time::Duration::from_secs(5))
            .unwrap();
        assert_eq!(cell.get().unwrap(), "second-token");
        assert_eq!(cell.redact("Bearer second-token!"), "Bearer [redacted]!");
        // Missing for a moment during a rotation: the previous value holds.
        std::fs::remove_file(&p).unwrap();
        assert_eq!(cell.get().unwrap(), "second-token");
        assert!(SecretCell::load(SecretRef::File(p)).is_err());
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
}
