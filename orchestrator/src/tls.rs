//! TLS for both listeners, with rustls: a certificate and key from PEM files, re-read when the
//! files change (a renewed certificate is served to new connections without a restart), and
//! optionally client certificates checked against a CA (mutual TLS: a service client's
//! certificate subject becomes its identity, see `[[auth.client_certs]]`).
//!
//! ```toml
//! [server.tls]
//! cert = "/etc/cascade/tls.crt"       # the chain, leaf first
//! key = "/etc/cascade/tls.key"        # PKCS#8, PKCS#1 or SEC1
//! client_ca = "/etc/cascade/ca.crt"   # optional: ask clients for a certificate signed by it
//! require_client_cert = false         # true: refuse a handshake without one
//! ```

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use serde::{Deserialize, Serialize};

/// `[server.tls]`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsSettings {
    /// PEM certificate chain, leaf first.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
    /// PEM CA certificates that sign client certificates (mutual TLS).
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// With `client_ca`: refuse a handshake without a client certificate (default: a client
    /// without one is asked for another credential, as a browser is).
    #[serde(default)]
    pub require_client_cert: bool,
}

/// How often the certificate files are looked at for a change. (Polled rather than watched with
/// inotify: a renewal tool replaces the files by rename, often through a symlink swap as
/// Kubernetes does with mounted secrets, which a file watch misses; a stat every few seconds
/// costs nothing.)
pub const RELOAD_EVERY: Duration = Duration::from_secs(2);

/// The verified client certificate of a connection, as the server's identities see it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerCert {
    /// The subject, RFC 4514 (`CN=billing,O=Acme`).
    pub subject: String,
    /// Its common name, if it has one.
    pub common_name: Option<String>,
}

impl PeerCert {
    /// The subject of a DER certificate (rustls has verified it before this reads it).
    pub fn from_der(der: &[u8]) -> Option<Self> {
        use x509_cert::der::Decode;
        let cert = x509_cert::Certificate::from_der(der).ok()?;
        let subject = cert.tbs_certificate().subject();
        let common_name = subject
            .common_name()
            .ok()
            .flatten()
            .map(|cn| cn.value().into_owned());
        Some(Self {
            subject: subject.to_string(),
            common_name,
        })
    }

    /// Whether `pattern` (a `[[auth.client_certs]]` subject) names this certificate: its whole
    /// RFC 4514 subject, or `CN=<name>` / the bare common name.
    pub fn matches(&self, pattern: &str) -> bool {
        let pattern = pattern.trim();
        if pattern == self.subject {
            return true;
        }
        let cn = pattern
            .strip_prefix("CN=")
            .or_else(|| pattern.strip_prefix("cn="))
            .unwrap_or(pattern);
        !cn.contains('=') && self.common_name.as_deref() == Some(cn)
    }
}

/// The server's TLS configuration, swapped when its files change.
pub struct Tls {
    settings: TlsSettings,
    current: RwLock<Arc<rustls::ServerConfig>>,
    /// Modification times of the files as last read (whether they could be used or not: a
    /// broken file is reported once, and read again when it changes).
    stamps: RwLock<Vec<Option<SystemTime>>>,
}

impl Tls {
    /// Read the files; an error names the file and what is wrong with it.
    pub fn load(settings: &TlsSettings) -> Result<Self, String> {
        let config = build(settings)?;
        Ok(Self {
            settings: settings.clone(),
            current: RwLock::new(Arc::new(config)),
            stamps: RwLock::new(stamps(settings)),
        })
    }

    /// An acceptor with the configuration of now.
    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.current.read().expect("not poisoned").clone())
    }

    /// Re-read the files if any changed since the last read: `Ok(true)` when the new ones are in
    /// use. A bad new file keeps the old configuration, and is reported once; any later change
    /// (the rest of a file written in two steps, a fix) reads the files again.
    pub fn reload_if_changed(&self) -> Result<bool, String> {
        let now = stamps(&self.settings);
        if *self.stamps.read().expect("not poisoned") == now {
            return Ok(false);
        }
        // Remembered before the read: a file still being written changes its time again, and
        // is read again then.
        *self.stamps.write().expect("not poisoned") = now;
        let config = build(&self.settings)?;
        *self.current.write().expect("not poisoned") = Arc::new(config);
        Ok(true)
    }

    /// Look at the files every [`RELOAD_EVERY`] until `stop`.
    pub fn watch(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_EVERY);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => {}
                    _ = stop.wait_for(|s| *s) => return,
                }
                let this = self.clone();
                let result = tokio::task::spawn_blocking(move || this.reload_if_changed()).await;
                match result {
                    Ok(Ok(true)) => {
                        metrics::counter!(crate::metrics::TLS_RELOADS, "result" => "ok")
                            .increment(1);
                        tracing::info!(cert = %self.settings.cert.display(), "TLS certificate reloaded");
                    }
                    Ok(Ok(false)) => {}
                    Ok(Err(e)) => {
                        metrics::counter!(crate::metrics::TLS_RELOADS, "result" => "error")
                            .increment(1);
                        tracing::error!(error = %e, "TLS files changed but cannot be used; still serving the previous certificate");
                    }
                    Err(_) => return,
                }
            }
        });
    }
}

fn stamps(s: &TlsSettings) -> Vec<Option<SystemTime>> {
    [Some(&s.cert), Some(&s.key), s.client_ca.as_ref()]
        .into_iter()
        .flatten()
        .map(|p| std::fs::metadata(p).and_then(|m| m.modified()).ok())
        .collect()
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

fn certs(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|i| i.collect::<Result<Vec<_>, _>>())
        .map_err(|e| format!("{what} {}: {}", path.display(), pem_error(&e)))?;
    if certs.is_empty() {
        return Err(format!(
            "{what} {}: no PEM certificate (-----BEGIN CERTIFICATE-----) in it",
            path.display()
        ));
    }
    Ok(certs)
}

/// A PEM reading error in words (rustls prints a missing end marker as bytes).
fn pem_error(e: &rustls::pki_types::pem::Error) -> String {
    use rustls::pki_types::pem::Error;
    match e {
        Error::MissingSectionEnd { end_marker } => format!(
            "a PEM section has no end line ({})",
            String::from_utf8_lossy(end_marker)
        ),
        Error::IllegalSectionStart { .. } => "a PEM section's first line is malformed".into(),
        Error::NoItemsFound => "nothing of the expected kind in it".into(),
        other => other.to_string(),
    }
}

/// The rustls configuration of `s`: safe defaults, ALPN for HTTP/2 (gRPC) and HTTP/1.1.
pub fn build(s: &TlsSettings) -> Result<rustls::ServerConfig, String> {
    let chain = certs(&s.cert, "[server.tls] cert")?;
    let key = PrivateKeyDer::from_pem_file(&s.key).map_err(|e| {
        format!(
            "[server.tls] key {}: {} (a PEM private key: PKCS#8, PKCS#1 or SEC1)",
            s.key.display(),
            pem_error(&e)
        )
    })?;
    let builder = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("[server.tls]: {e}"))?;
    let builder = match &s.client_ca {
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            for c in certs(ca, "[server.tls] client_ca")? {
                roots
                    .add(c)
                    .map_err(|e| format!("[server.tls] client_ca {}: {e}", ca.display()))?;
            }
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                roots.into(),
                provider(),
            );
            let verifier = if s.require_client_cert {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            builder.with_client_cert_verifier(
                verifier
                    .build()
                    .map_err(|e| format!("[server.tls] client_ca {}: {e}", ca.display()))?,
            )
        }
        None if s.require_client_cert => {
            return Err(
                "[server.tls] require_client_cert needs client_ca: the CA that signs client certificates"
                    .into(),
            );
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(chain, key).map_err(|e| {
        format!(
            "[server.tls] cert {} and key {}: {e}",
            s.cert.display(),
            s.key.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_subject_names_a_certificate_by_common_name_or_whole() {
        let cert = PeerCert {
            subject: "CN=billing,O=Acme".into(),
            common_name: Some("billing".into()),
        };
        for yes in ["billing", "CN=billing", " CN=billing,O=Acme "] {
            assert!(cert.matches(yes), "{yes}");
        }
        for no in ["bill", "CN=billing,O=Globex", "O=Acme", "CN=other"] {
            assert!(!cert.matches(no), "{no}");
        }
    }

    #[test]
    fn bad_files_are_named_with_what_is_wrong() {
        let dir = tempfile::tempdir().unwrap();
        let cert = dir.path().join("c.pem");
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\nAAAA\n").unwrap();
        let s = TlsSettings {
            cert: cert.clone(),
            key: dir.path().join("missing.key"),
            client_ca: None,
            require_client_cert: false,
        };
        let e = build(&s).unwrap_err();
        assert!(e.contains("c.pem") && e.contains("no end line"), "{e}");
        std::fs::write(&cert, "").unwrap();
        let e = build(&s).unwrap_err();
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
