//! Webhook signatures as each provider documents them. Every check is HMAC-SHA256 with the
//! trigger's secret, compared in constant time; a scheme with a timestamp also refuses one
//! outside the tolerance window (the receiver then remembers accepted signatures within that
//! window, so that a replay starts nothing).
//!
//! | `verify`  | headers                                                    | signed text                  |
//! |-----------|------------------------------------------------------------|------------------------------|
//! | `slack`   | `X-Slack-Request-Timestamp`, `X-Slack-Signature: v0=<hex>` | `v0:<timestamp>:<body>`      |
//! | `github`  | `X-Hub-Signature-256: sha256=<hex>`, `X-GitHub-Delivery`    | `<body>` (no timestamp)      |
//! | `stripe`  | `Stripe-Signature: t=<ts>,v1=<hex>[,v1=…]`                 | `<t>.<body>`                 |
//! | `zendesk` | `X-Zendesk-Webhook-Signature-Timestamp`, `…-Signature: <base64>` | `<timestamp><body>`    |
//! | `cascade` | `X-Cascade-Timestamp`, `X-Cascade-Signature: v1=<hex>`      | see [`crate::secret::sign`]  |

use std::time::Duration;

use hmac::{KeyInit, Mac};

/// Whose signature scheme a webhook trigger checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Provider {
    Slack,
    Github,
    Stripe,
    Zendesk,
    Cascade,
}

impl Provider {
    pub const NAMES: &[&str] = &["slack", "github", "stripe", "zendesk", "cascade"];

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "slack" => Self::Slack,
            "github" => Self::Github,
            "stripe" => Self::Stripe,
            "zendesk" => Self::Zendesk,
            "cascade" => Self::Cascade,
            _ => return None,
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Slack => "slack",
            Self::Github => "github",
            Self::Stripe => "stripe",
            Self::Zendesk => "zendesk",
            Self::Cascade => "cascade",
        }
    }

    /// The header naming the delivery, the default idempotency key when the body has no id.
    fn delivery_header(self) -> Option<&'static str> {
        match self {
            Self::Github => Some("x-github-delivery"),
            Self::Zendesk => Some("x-zendesk-webhook-invocation-id"),
            Self::Cascade => Some("idempotency-key"),
            Self::Slack | Self::Stripe => None,
        }
    }
}

/// A request whose signature checked out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verified {
    /// The MAC that matched: what the replay guard remembers.
    pub mac: [u8; 32],
    /// Whether the scheme signs a timestamp (a replay is then refused within the window only).
    pub timestamped: bool,
}

/// Why a request was refused; each message says what the sender must fix.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    #[error("missing header {0}: the request is not signed as verify = \"{1}\" expects")]
    Missing(&'static str, &'static str),
    #[error(
        "the signed timestamp is {skew_secs}s away from the server's clock (at most {max_secs}s allowed): the request is stale or replayed, or a clock is wrong"
    )]
    Stale { skew_secs: u64, max_secs: u64 },
    #[error("malformed {0}: {1}")]
    Malformed(&'static str, &'static str),
    #[error(
        "the signature does not match: check the trigger's secret against the one the sender signs with"
    )]
    Mismatch,
}

fn hmac(secret: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac =
        hmac::Hmac::<sha2::Sha256>::new_from_slice(secret).expect("HMAC takes any key length");
    for p in parts {
        mac.update(p);
    }
    mac.finalize().into_bytes().into()
}

/// Constant-time equality (the comparison does not stop at the first differing byte).
fn same(given: &[u8], expected: &[u8; 32]) -> bool {
    given.len() == expected.len()
        && given
            .iter()
            .zip(expected)
            .fold(0u8, |d, (a, b)| d | (a ^ b))
            == 0
}

fn fresh(ts: u64, now: u64, tolerance: Duration) -> Result<(), VerifyError> {
    let skew_secs = now.abs_diff(ts);
    if skew_secs > tolerance.as_secs() {
        return Err(VerifyError::Stale {
            skew_secs,
            max_secs: tolerance.as_secs(),
        });
    }
    Ok(())
}

/// Check a request's signature by `provider`'s scheme at `now` (unix seconds). `header` looks a
/// header up by its lower-case name.
pub fn verify<'h>(
    provider: Provider,
    secret: &[u8],
    header: impl Fn(&str) -> Option<&'h str>,
    body: &[u8],
    now: u64,
    tolerance: Duration,
) -> Result<Verified, VerifyError> {
    let name = provider.as_str();
    let need = |h: &'static str| header(h).ok_or(VerifyError::Missing(h, name));
    match provider {
        Provider::Slack => {
            let ts_text = need("x-slack-request-timestamp")?;
            let ts: u64 = ts_text.trim().parse().map_err(|_| {
                VerifyError::Malformed("X-Slack-Request-Timestamp", "not unix seconds")
            })?;
            fresh(ts, now, tolerance)?;
            let expected = hmac(secret, &[b"v0:", ts_text.trim().as_bytes(), b":", body]);
            let sig = need("x-slack-signature")?;
            let hex_sig = sig
                .trim()
                .strip_prefix("v0=")
                .ok_or(VerifyError::Malformed(
                    "X-Slack-Signature",
                    "expected v0=<hex>",
                ))?;
            match hex::decode(hex_sig) {
                Ok(given) if same(&given, &expected) => Ok(Verified {
                    mac: expected,
                    timestamped: true,
                }),
                _ => Err(VerifyError::Mismatch),
            }
        }
        Provider::Github => {
            let sig = need("x-hub-signature-256")?;
            let hex_sig = sig
                .trim()
                .strip_prefix("sha256=")
                .ok_or(VerifyError::Malformed(
                    "X-Hub-Signature-256",
                    "expected sha256=<hex>",
                ))?;
            let expected = hmac(secret, &[body]);
            match hex::decode(hex_sig) {
                Ok(given) if same(&given, &expected) => Ok(Verified {
                    mac: expected,
                    timestamped: false,
                }),
                _ => Err(VerifyError::Mismatch),
            }
        }
        Provider::Stripe => {
            let sig = need("stripe-signature")?;
            let mut ts = None;
            let mut candidates = Vec::new();
            for part in sig.split(',') {
                match part.trim().split_once('=') {
                    Some(("t", v)) => ts = Some(v),
                    Some(("v1", v)) => candidates.push(v),
                    _ => {}
                }
            }
            let ts_text = ts.ok_or(VerifyError::Malformed(
                "Stripe-Signature",
                "no t=<timestamp>",
            ))?;
            let t: u64 = ts_text.parse().map_err(|_| {
                VerifyError::Malformed("Stripe-Signature", "t= is not unix seconds")
            })?;
            if candidates.is_empty() {
                return Err(VerifyError::Malformed("Stripe-Signature", "no v1=<hex>"));
            }
            fresh(t, now, tolerance)?;
            let expected = hmac(secret, &[ts_text.as_bytes(), b".", body]);
            // Several v1 values while the endpoint's secret is rolled: one match is enough.
            if candidates
                .iter()
                .any(|c| hex::decode(c).is_ok_and(|g| same(&g, &expected)))
            {
                Ok(Verified {
                    mac: expected,
                    timestamped: true,
                })
            } else {
                Err(VerifyError::Mismatch)
            }
        }
        Provider::Zendesk => {
            let ts_text = need("x-zendesk-webhook-signature-timestamp")?;
            let at = chrono::DateTime::parse_from_rfc3339(ts_text.trim()).map_err(|_| {
                VerifyError::Malformed(
                    "X-Zendesk-Webhook-Signature-Timestamp",
                    "not an RFC 3339 time",
                )
            })?;
            fresh(at.timestamp().max(0) as u64, now, tolerance)?;
            let expected = hmac(secret, &[ts_text.as_bytes(), body]);
            let sig = need("x-zendesk-webhook-signature")?;
            use base64::Engine;
            match base64::engine::general_purpose::STANDARD.decode(sig.trim()) {
                Ok(given) if same(&given, &expected) => Ok(Verified {
                    mac: expected,
                    timestamped: true,
                }),
                _ => Err(VerifyError::Mismatch),
            }
        }
        Provider::Cascade => {
            let secret = crate::secret::Secret::new(secret.to_vec());
            let key = header("idempotency-key");
            crate::secret::verify_keyed(
                &secret,
                header("x-cascade-timestamp").unwrap_or(""),
                header("x-cascade-signature").unwrap_or(""),
                key,
                body,
                now,
            )
            .map(|mac| Verified {
                mac,
                timestamped: true,
            })
            .map_err(|e| match e {
                crate::secret::SignatureError::Stale { skew_secs } => VerifyError::Stale {
                    skew_secs,
                    max_secs: crate::secret::SIGNATURE_TOLERANCE.as_secs(),
                },
                crate::secret::SignatureError::BadTimestamp => VerifyError::Malformed(
                    "X-Cascade-Timestamp",
                    "send the current time in unix seconds",
                ),
                _ => VerifyError::Mismatch,
            })
        }
    }
}

/// The provider's id of an event: the default idempotency key. Slack's Events API and Stripe
/// put it in the body (`event_id`, `id`); GitHub and Zendesk in a header; Cascade's scheme
/// signs an `Idempotency-Key`. Without one, the MAC stands in (an identical redelivery is then
/// still the same job).
pub fn event_id<'h>(
    provider: Provider,
    header: impl Fn(&str) -> Option<&'h str>,
    body: &serde_json::Value,
    verified: &Verified,
) -> String {
    let from_body = match provider {
        Provider::Slack => body.get("event_id").and_then(|v| v.as_str()),
        Provider::Stripe => body.get("id").and_then(|v| v.as_str()),
        _ => None,
    };
    from_body
        .or_else(|| provider.delivery_header().and_then(header))
        .filter(|s| !s.is_empty())
        .map(String::from)
        .unwrap_or_else(|| hex::encode(verified.mac))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    const WINDOW: Duration = Duration::from_secs(300);

    fn check(
        p: Provider,
        secret: &[u8],
        headers: &[(&str, &str)],
        body: &[u8],
        now: u64,
    ) -> Result<Verified, VerifyError> {
        let h: HashMap<String, String> = headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        verify(
            p,
            secret,
            |k| h.get(k).map(|s| s.as_str()),
            body,
            now,
            WINDOW,
        )
    }

    /// Slack's own example ("Verifying requests from Slack"): its signing secret, timestamp,
    /// slash-command body and signature.
    #[test]
    fn slack_documented_example() {
        let secret = b"8f742231b10e8888abcd99yyyzzz85a5";
        let body = b"token=xyzz0WbapA4vBCDEFasx0q6G&team_id=T1DC2JH3J&team_domain=testteamnow&channel_id=G8PSS9T3V&channel_name=foobar&user_id=U2CERLKJA&user_name=roadrunner&command=%2Fwebhook-collect&text=&response_url=https%3A%2F%2Fhooks.slack.com%2Fcommands%2FT1DC2JH3J%2F397700885554%2F96rGlfmibIGlgcZRskXaIFfN&trigger_id=398738663015.47445629121.803a0bc887a14d10d2c447fce8b6703c";
        let sig = "v0=a2114d57b48eac39b9ad189dd8316235a7b4a8d21a10bd27519666489c69b503";
        let headers = [
            ("x-slack-request-timestamp", "1531420618"),
            ("x-slack-signature", sig),
        ];
        let ok = check(Provider::Slack, secret, &headers, body, 1531420618 + 30).unwrap();
        assert!(ok.timestamped);
        // One byte of the body changed.
        let mut tampered = body.to_vec();
        tampered[6] ^= 1;
        assert_eq!(
            check(Provider::Slack, secret, &headers, &tampered, 1531420618),
            Err(VerifyError::Mismatch)
        );
        // Ten minutes later: stale, whatever the signature.
        assert!(matches!(
            check(Provider::Slack, secret, &headers, body, 1531420618 + 600),
            Err(VerifyError::Stale { skew_secs: 600, .. })
        ));
        assert_eq!(
            check(Provider::Slack, b"other", &headers, body, 1531420618),
            Err(VerifyError::Mismatch)
        );
        assert_eq!(
            check(Provider::Slack, secret, &headers[..1], body, 1531420618),
            Err(VerifyError::Missing("x-slack-signature", "slack"))
        );
    }

    /// GitHub's example ("Validating webhook deliveries"): secret "It's a Secret to Everybody",
    /// payload "Hello, World!".
    #[test]
    fn github_documented_example() {
        let secret = b"It's a Secret to Everybody";
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        let h = [("x-hub-signature-256", sig), ("x-github-delivery", "d-1")];
        let ok = check(Provider::Github, secret, &h, b"Hello, World!", 0).unwrap();
        assert!(!ok.timestamped);
        assert_eq!(
            check(Provider::Github, secret, &h, b"Hello, World?", 0),
            Err(VerifyError::Mismatch)
        );
        let id = event_id(
            Provider::Github,
            |k| h.iter().find(|(n, _)| *n == k).map(|(_, v)| *v),
            &serde_json::Value::Null,
            &ok,
        );
        assert_eq!(id, "d-1");
    }

    /// Stripe's scheme (`t=`, `v1=` over `"<t>.<body>"`); the expected signature was computed
    /// outside this code (Python's hmac module).
    #[test]
    fn stripe_signature_with_rolled_secrets_and_tolerance() {
        let secret = b"whsec_test_secret";
        let body = br#"{"id":"evt_1","object":"event","type":"customer.created"}"#;
        let good = "7401f12dfbd370e571f0ed15746eb48bff16d798a9b8f1fc8c91034db4bb4698";
        let header = format!("t=1700000000,v1={},v1={good},v0=ignored", "00".repeat(32));
        let h = [("stripe-signature", header.as_str())];
        check(Provider::Stripe, secret, &h, body, 1700000000 + 299).unwrap();
        assert!(matches!(
            check(Provider::Stripe, secret, &h, body, 1700000000 + 301),
            Err(VerifyError::Stale { .. })
        ));
        let wrong = format!("t=1700000001,v1={good}");
        assert_eq!(
            check(
                Provider::Stripe,
                secret,
                &[("stripe-signature", &wrong)],
                body,
                1700000000
            ),
            Err(VerifyError::Mismatch)
        );
        assert!(matches!(
            check(
                Provider::Stripe,
                secret,
                &[("stripe-signature", "v1=ab")],
                body,
                1700000000
            ),
            Err(VerifyError::Malformed(..))
        ));
    }

    /// Zendesk's scheme: base64 HMAC-SHA256 of timestamp + body (expected value computed with
    /// Python's hmac module).
    #[test]
    fn zendesk_signature() {
        let secret = b"dGhpc19zZWNyZXRfaXNfZm9yX3Rlc3Rpbmdfb25seQ==";
        let body = br#"{"ticket":{"id":35436}}"#;
        let h = [
            (
                "x-zendesk-webhook-signature-timestamp",
                "2023-11-14T22:13:20Z",
            ),
            (
                "x-zendesk-webhook-signature",
                "N+0/AbLtmV1kTbVedbbdYvmwUcMGEMxjmAYtgnb/7g0=",
            ),
        ];
        check(Provider::Zendesk, secret, &h, body, 1700000000).unwrap();
        assert!(matches!(
            check(Provider::Zendesk, secret, &h, body, 1700000000 + 3600),
            Err(VerifyError::Stale { .. })
        ));
        assert_eq!(
            check(
                Provider::Zendesk,
                secret,
                &h,
                br#"{"ticket":{"id":1}}"#,
                1700000000
            ),
            Err(VerifyError::Mismatch)
        );
    }

    #[test]
    fn cascade_scheme_signs_the_key() {
        let secret = crate::secret::Secret::new(b"s3cret".to_vec());
        let sig = crate::secret::sign_keyed(&secret, 1000, Some("k-1"), b"{}");
        let h = [
            ("x-cascade-timestamp", "1000"),
            ("x-cascade-signature", sig.as_str()),
            ("idempotency-key", "k-1"),
        ];
        check(Provider::Cascade, b"s3cret", &h, b"{}", 1000).unwrap();
        let mut other = h;
        other[2] = ("idempotency-key", "k-2");
        assert_eq!(
            check(Provider::Cascade, b"s3cret", &other, b"{}", 1000),
            Err(VerifyError::Mismatch)
        );
    }
}
