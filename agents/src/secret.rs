//! Secrets are referenced, never written in configuration: `env:NAME` reads an environment
//! variable, `file:PATH` a file (trailing newline trimmed; read again when the file changes),
//! `exec:COMMAND` runs a program that prints the value (the bridge to Vault, AWS Secrets Manager,
//! 1Password or any CLI; run again after 5 minutes, or after `ttl` in the table form
//! `{ exec = "vault kv get -field=key secret/x", ttl = "10m" }`). A value is resolved when it is
//! needed and is never logged, displayed or stored.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer};

/// Where a secret comes from.
#[derive(Clone, PartialEq, Eq)]
pub enum SecretRef {
    Env(String),
    File(std::path::PathBuf),
    /// A shell command whose stdout is the value, and how long a value it printed is used.
    Exec {
        command: String,
        ttl: std::time::Duration,
    },
}

/// How long an `exec:` secret's value is used before the command runs again.
pub const EXEC_DEFAULT_TTL: std::time::Duration = std::time::Duration::from_secs(300);
/// An `exec:` command that has not printed its value by then is killed.
const EXEC_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

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
        if let Some(command) = s.strip_prefix("exec:") {
            if command.trim().is_empty() {
                return Err(
                    "`exec:` needs a command, e.g. \"exec:vault kv get -field=token secret/crm\""
                        .into(),
                );
            }
            return Ok(Self::Exec {
                command: command.to_string(),
                ttl: EXEC_DEFAULT_TTL,
            });
        }
        // The value itself is not echoed: it may be the credential.
        Err("a secret must be a reference, not the value: write \"env:NAME\" or \"file:PATH\" and put the value there".into())
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Form {
            Text(String),
            Exec {
                exec: String,
                #[serde(default)]
                ttl: Option<crate::HumanDuration>,
            },
        }
        match Form::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "a secret reference: \"env:NAME\", \"file:PATH\", \"exec:COMMAND\" or { exec = \"COMMAND\", ttl = \"10m\" }",
            )
        })? {
            Form::Text(s) => s.parse().map_err(serde::de::Error::custom),
            Form::Exec { exec, ttl } => match format!("exec:{exec}").parse::<SecretRef>() {
                Ok(SecretRef::Exec { command, .. }) => Ok(SecretRef::Exec {
                    command,
                    ttl: ttl.map_or(EXEC_DEFAULT_TTL, |t| t.get()),
                }),
                Ok(_) => unreachable!("an exec: reference parses as one"),
                Err(e) => Err(serde::de::Error::custom(e)),
            },
        }
    }
}

/// A field that takes plain text or a secret: a string is a reference when it is written as one
/// (`env:`, `file:`, `exec:`), else text; the `{ exec = "COMMAND", ttl = "10m" }` table is a
/// reference too (a request header, a program's environment variable).
#[derive(Clone, Debug)]
pub enum TextOrSecret {
    Text(String),
    Secret(SecretRef),
}

impl<'de> Deserialize<'de> for TextOrSecret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        match v {
            serde_json::Value::String(s) => match SecretRef::parse_reference(&s) {
                Some(r) => r.map(Self::Secret).map_err(serde::de::Error::custom),
                None => Ok(Self::Text(s)),
            },
            table @ serde_json::Value::Object(_) => SecretRef::deserialize(table)
                .map(Self::Secret)
                .map_err(serde::de::Error::custom),
            _ => Err(serde::de::Error::custom(
                "text, a secret reference (\"env:NAME\", \"file:PATH\", \"exec:COMMAND\") or { exec = \"COMMAND\", ttl = \"10m\" }",
            )),
        }
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
            Self::Exec { command, .. } => write!(f, "exec:{command}"),
        }
    }
}

impl SecretRef {
    /// `s` as a reference when it is written as one (`env:`, `file:`, `exec:`), `None` for a
    /// literal: for fields that take either (a program's environment).
    pub fn parse_reference(s: &str) -> Option<Result<Self, String>> {
        ["env:", "file:", "exec:"]
            .iter()
            .any(|p| s.starts_with(p))
            .then(|| s.parse())
    }

    /// Read the secret's value.
    pub fn resolve(&self) -> Result<Secret, String> {
        let value = match self {
            Self::Env(name) => std::env::var(name)
                .map_err(|_| format!("secret {self}: environment variable {name} is not set"))?,
            Self::File(path) => std::fs::read_to_string(path)
                .map_err(|e| format!("secret {self}: cannot read {}: {e}", path.display()))?
                .trim_end_matches(['\n', '\r'])
                .to_string(),
            Self::Exec { command, .. } => {
                run_exec(command).map_err(|e| format!("secret {self}: {e}"))?
            }
        };
        if value.is_empty() {
            return Err(format!("secret {self} is empty"));
        }
        Ok(Secret(value.into_bytes()))
    }
}

/// Run an `exec:` command with `sh -c`; its stdout, less the trailing newline, is the value.
/// What it writes on stderr is not repeated (it may echo what it printed).
fn run_exec(command: &str) -> Result<String, String> {
    use std::io::Read;
    let mut child = std::process::Command::new("sh")
        .arg("-c")
        .arg(command)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot run the command: {e}"))?;
    let mut stdout = child.stdout.take().expect("piped");
    let (out_tx, out_rx) = std::sync::mpsc::sync_channel(1);
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = stdout.read_to_end(&mut out);
        let _ = out_tx.send(out);
    });
    let deadline = std::time::Instant::now() + EXEC_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break status,
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(10))
            }
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(format!(
                    "the command did not finish within {EXEC_TIMEOUT:?}"
                ));
            }
        }
    };
    // Something the command started may hold its stdout open after it exits: wait a little,
    // not forever.
    let out = out_rx
        .recv_timeout(std::time::Duration::from_secs(2))
        .map_err(|_| {
            "the command exited but its output did not end (a background process holds it?)"
                .to_string()
        })?;
    if !status.success() {
        return Err(format!("the command failed ({status})"));
    }
    let text = String::from_utf8(out)
        .map_err(|_| "the command printed something that is not UTF-8".to_string())?;
    Ok(text.trim_end_matches(['\n', '\r']).to_string())
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

/// Every secret value this process holds — each secret reference's current value, each OAuth2
/// credential's tokens — in one place, so that one pass scrubs them from any text on its way
/// out: log lines, step errors and outputs in job records (and so gRPC answers and the store).
/// The agents scrub their own secrets from their messages too; this is the net under them.
///
/// Values are kept per source (a secret cell, a credential), the latest ones only, so that a
/// rotating secret or a token renewed hourly does not grow it: its size is the secrets and
/// credentials configured. Values shorter than four characters are not scrubbed (they would
/// mangle ordinary text).
pub struct Redactor {
    state: std::sync::RwLock<RedactorState>,
    /// Whether any value is registered: the common case (none) costs one load.
    any: std::sync::atomic::AtomicBool,
}

#[derive(Default)]
struct RedactorState {
    by_source: std::collections::HashMap<u64, Vec<String>>,
    matcher: Option<aho_corasick::AhoCorasick>,
}

const REDACTED: &str = "[redacted]";
const MIN_REDACTED_LEN: usize = 4;

static REDACTOR: std::sync::LazyLock<Redactor> = std::sync::LazyLock::new(|| Redactor {
    state: Default::default(),
    any: std::sync::atomic::AtomicBool::new(false),
});
static NEXT_SOURCE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

/// The process's redactor.
pub fn redactor() -> &'static Redactor {
    &REDACTOR
}

impl Redactor {
    /// A new source id for [`register`](Self::register).
    pub fn source() -> u64 {
        NEXT_SOURCE.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    }

    /// `source`'s values are now `values` (replacing what it registered before).
    pub fn register(&self, source: u64, values: Vec<String>) {
        let values: Vec<String> = values
            .into_iter()
            .filter(|v| v.len() >= MIN_REDACTED_LEN)
            .collect();
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if state.by_source.get(&source) == Some(&values) {
            return;
        }
        if values.is_empty() {
            state.by_source.remove(&source);
        } else {
            state.by_source.insert(source, values);
        }
        self.rebuild(&mut state);
    }

    /// `source` holds no value any more.
    pub fn unregister(&self, source: u64) {
        let mut state = self.state.write().unwrap_or_else(|p| p.into_inner());
        if state.by_source.remove(&source).is_some() {
            self.rebuild(&mut state);
        }
    }

    fn rebuild(&self, state: &mut RedactorState) {
        let mut all: Vec<&str> = state
            .by_source
            .values()
            .flatten()
            .map(String::as_str)
            .collect();
        all.sort_unstable();
        all.dedup();
        state.matcher = if all.is_empty() {
            None
        } else {
            // Leftmost-longest: a value that contains another is scrubbed whole.
            aho_corasick::AhoCorasick::builder()
                .match_kind(aho_corasick::MatchKind::LeftmostLongest)
                .build(&all)
                .ok()
        };
        self.any.store(
            state.matcher.is_some(),
            std::sync::atomic::Ordering::Release,
        );
    }

    /// `text` with every registered value replaced by `[redacted]`.
    pub fn redact<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        if !self.any.load(std::sync::atomic::Ordering::Acquire) {
            return std::borrow::Cow::Borrowed(text);
        }
        let state = self.state.read().unwrap_or_else(|p| p.into_inner());
        match &state.matcher {
            Some(m) if m.is_match(text) => {
                std::borrow::Cow::Owned(m.replace_all(text, &vec![REDACTED; m.patterns_len()]))
            }
            _ => std::borrow::Cow::Borrowed(text),
        }
    }

    /// Scrub every string in `value` (keys included); returns whether anything changed.
    pub fn redact_json(&self, value: &mut serde_json::Value) -> bool {
        if !self.any.load(std::sync::atomic::Ordering::Acquire) {
            return false;
        }
        fn walk(r: &Redactor, v: &mut serde_json::Value) -> bool {
            match v {
                serde_json::Value::String(s) => match r.redact(s) {
                    std::borrow::Cow::Owned(clean) => {
                        *s = clean;
                        true
                    }
                    std::borrow::Cow::Borrowed(_) => false,
                },
                serde_json::Value::Array(items) => {
                    let mut changed = false;
                    for item in items {
                        changed |= walk(r, item);
                    }
                    changed
                }
                serde_json::Value::Object(map) => {
                    let mut changed = false;
                    if map
                        .keys()
                        .any(|k| matches!(r.redact(k), std::borrow::Cow::Owned(_)))
                    {
                        let old = std::mem::take(map);
                        for (k, v) in old {
                            map.insert(r.redact(&k).into_owned(), v);
                        }
                        changed = true;
                    }
                    for item in map.values_mut() {
                        changed |= walk(r, item);
                    }
                    changed
                }
                _ => false,
            }
        }
        walk(self, value)
    }
}

/// A secret an agent uses at every call: resolved when the agent is built (so that a missing
/// secret is a load error), and a `file:` secret read again when its file's modification time
/// changes (a mounted Kubernetes or Vault-agent secret rotates in place).
pub struct SecretCell {
    reference: SecretRef,
    /// Its source in the process's [`Redactor`].
    source: u64,
    /// The value, with the file's modification time (`file:`) or when it was fetched (`exec:`).
    state: std::sync::Mutex<(String, Option<std::time::SystemTime>)>,
    /// Held while the value is read again after a refusal, and when that was last done.
    rereading: tokio::sync::Mutex<()>,
    reread_at: std::sync::Mutex<Option<std::time::Instant>>,
}

impl SecretCell {
    pub fn load(reference: SecretRef) -> Result<Self, String> {
        let (value, mtime) = Self::read(&reference)?;
        let source = Redactor::source();
        redactor().register(source, vec![value.clone()]);
        Ok(Self {
            reference,
            source,
            state: std::sync::Mutex::new((value, mtime)),
            rereading: tokio::sync::Mutex::new(()),
            reread_at: std::sync::Mutex::new(None),
        })
    }

    fn read(reference: &SecretRef) -> Result<(String, Option<std::time::SystemTime>), String> {
        let mtime = match reference {
            SecretRef::File(p) => std::fs::metadata(p).and_then(|m| m.modified()).ok(),
            SecretRef::Exec { .. } => Some(std::time::SystemTime::now()),
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
    ///
    /// An `exec:` value past its ttl is fetched again here, on the caller's thread: the command
    /// runs once per ttl (5 minutes by default), and a lookup CLI takes a fraction of a second,
    /// which an occasional call can afford.
    pub fn get(&self) -> Result<String, crate::AgentError> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let SecretRef::Exec { ttl, .. } = &self.reference
            && state
                .1
                .is_none_or(|at| at.elapsed().unwrap_or_default() >= *ttl)
        {
            match Self::read(&self.reference) {
                Ok(fresh) => self.keep(&mut state, fresh),
                // The previous value may still be good: use it, and try again after another
                // ttl rather than at every call.
                Err(e) => {
                    state.1 = Some(std::time::SystemTime::now());
                    tracing::warn!(secret = %self.reference, error = %e, "could not refresh an exec: secret; using the previous value")
                }
            }
        }
        if let SecretRef::File(p) = &self.reference {
            let now = std::fs::metadata(p).and_then(|m| m.modified()).ok();
            if now != state.1 {
                // A rotation in progress may leave the file briefly missing or empty: keep the
                // value we have and look again at the next call.
                match Self::read(&self.reference) {
                    Ok(fresh) => self.keep(&mut state, fresh),
                    Err(e) => {
                        tracing::warn!(secret = %self.reference, error = %e, "could not re-read a rotated secret; using the previous value")
                    }
                }
            }
        }
        Ok(state.0.clone())
    }

    /// The value now, from async code: an `exec:` value past its ttl is fetched on a blocking
    /// thread, so that a slow command does not hold up the caller's runtime thread (an agent's
    /// call runs its first steps on its graph's scheduler).
    pub async fn current(self: &std::sync::Arc<Self>) -> Result<String, crate::AgentError> {
        if let SecretRef::Exec { ttl, .. } = &self.reference {
            let stale = {
                let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
                state
                    .1
                    .is_none_or(|at| at.elapsed().unwrap_or_default() >= *ttl)
            };
            if stale {
                let cell = self.clone();
                return tokio::task::spawn_blocking(move || cell.get())
                    .await
                    .map_err(|e| {
                        crate::AgentError::transient(format!("reading a secret failed: {e}"))
                    })?;
            }
        }
        self.get()
    }

    /// The value read again from its source now, whatever its age, after the upstream refused
    /// `used` (it may have been rotated at the source since). One read at a time, the command
    /// of an `exec:` secret on a blocking thread, and none while the value already differs from
    /// `used` or was read again less than a second ago (the other calls refused in the same
    /// moment get that read's value). If the source cannot be read, the value we had.
    pub async fn reread(self: &std::sync::Arc<Self>, used: &str) -> String {
        let _one = self.rereading.lock().await;
        let current = || {
            self.state
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .0
                .clone()
        };
        let value = current();
        let recent = self
            .reread_at
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(1));
        if value != used || recent {
            return value;
        }
        let reference = self.reference.clone();
        let read = move || Self::read(&reference);
        let fresh = match &self.reference {
            SecretRef::Exec { .. } => tokio::task::spawn_blocking(read)
                .await
                .unwrap_or_else(|e| Err(e.to_string())),
            _ => read(),
        };
        *self.reread_at.lock().unwrap_or_else(|p| p.into_inner()) = Some(std::time::Instant::now());
        match fresh {
            Ok(fresh) => self.keep(
                &mut self.state.lock().unwrap_or_else(|p| p.into_inner()),
                fresh,
            ),
            Err(e) => {
                tracing::warn!(secret = %self.reference, error = %e, "could not read a refused secret again; using the previous value")
            }
        }
        current()
    }

    /// `fresh` is the value now, known to the redactor.
    fn keep(
        &self,
        state: &mut (String, Option<std::time::SystemTime>),
        fresh: (String, Option<std::time::SystemTime>),
    ) {
        redactor().register(self.source, vec![fresh.0.clone()]);
        *state = fresh;
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

impl Drop for SecretCell {
    fn drop(&mut self) {
        redactor().unregister(self.source);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_text_or_secret_field_takes_text_references_and_the_exec_table() {
        let parse = |v: serde_json::Value| serde_json::from_value::<TextOrSecret>(v);
        assert!(
            matches!(parse(serde_json::json!("plain")).unwrap(), TextOrSecret::Text(t) if t == "plain")
        );
        assert!(matches!(
            parse(serde_json::json!("env:X")).unwrap(),
            TextOrSecret::Secret(SecretRef::Env(n)) if n == "X"
        ));
        assert!(matches!(
            parse(serde_json::json!({"exec": "printf k", "ttl": "10m"})).unwrap(),
            TextOrSecret::Secret(SecretRef::Exec { command, ttl })
                if command == "printf k" && ttl == std::time::Duration::from_secs(600)
        ));
        assert!(parse(serde_json::json!("file:")).is_err());
        assert!(parse(serde_json::json!({"exec": "x", "ttl": "often"})).is_err());
        assert!(parse(serde_json::json!(3)).is_err());
    }

    #[test]
    fn the_redactor_scrubs_every_current_value_and_forgets_old_ones() {
        let r = Redactor {
            state: Default::default(),
            any: std::sync::atomic::AtomicBool::new(false),
        };
        assert_eq!(r.redact("nothing registered"), "nothing registered");
        let (a, b) = (Redactor::source(), Redactor::source());
        r.register(a, vec!["sk-live-123".into(), "abc".into()]);
        r.register(b, vec!["sk-live-123456".into()]);
        // The longest match wins; values under four characters are left alone.
        assert_eq!(
            r.redact("keys sk-live-123456 and sk-live-123, abc"),
            "keys [redacted] and [redacted], abc"
        );
        let mut v = serde_json::json!({"echo": ["Bearer sk-live-123"], "sk-live-123": 1, "n": 2});
        assert!(r.redact_json(&mut v));
        assert_eq!(
            v,
            serde_json::json!({"echo": ["Bearer [redacted]"], "[redacted]": 1, "n": 2})
        );
        // A rotation replaces the source's value; an old one is no longer scrubbed.
        r.register(a, vec!["sk-live-999".into()]);
        assert_eq!(
            r.redact("sk-live-123 sk-live-999"),
            "sk-live-123 [redacted]"
        );
        r.unregister(a);
        r.unregister(b);
        assert_eq!(
            r.redact("sk-live-999 sk-live-123456"),
            "sk-live-999 sk-live-123456"
        );
    }

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
    fn an_exec_secret_runs_its_command_and_again_after_its_ttl() {
        let dir = tempfile::tempdir().unwrap();
        let counter = dir.path().join("n");
        // Each run prints the next value: token-1, token-2, ...
        let command = format!(
            "n=$(cat {c} 2>/dev/null || echo 0); n=$((n+1)); echo $n > {c}; echo token-$n",
            c = counter.display()
        );
        let r: SecretRef =
            serde_json::from_value(serde_json::json!({"exec": command, "ttl": "200ms"})).unwrap();
        let cell = SecretCell::load(r).unwrap();
        assert_eq!(cell.get().unwrap(), "token-1");
        assert_eq!(cell.get().unwrap(), "token-1", "cached within the ttl");
        std::thread::sleep(std::time::Duration::from_millis(250));
        assert_eq!(cell.get().unwrap(), "token-2", "run again after the ttl");
        let short: SecretRef = format!("exec:{command}").parse().unwrap();
        assert!(matches!(short, SecretRef::Exec { ttl, .. } if ttl == EXEC_DEFAULT_TTL));
        let failing: SecretRef = "exec:printf 'oops-%s' value >&2; exit 3".parse().unwrap();
        let e = SecretCell::load(failing).err().unwrap();
        assert!(e.contains("failed") && !e.contains("oops-value"), "{e}");
        assert!("exec:".parse::<SecretRef>().is_err());
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
