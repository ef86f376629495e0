//! A signed request, any bytes: the timestamp, signature, idempotency key and body a webhook
//! sender controls. Verification answers yes or no (never panics), a forged signature is never
//! accepted, and a real one is accepted once. The same bytes as each provider's headers (Slack,
//! GitHub, Stripe, Zendesk): no panic, and nothing a second secret would also accept.
#![no_main]

use cascade_orchestrator::secret::{ReplayGuard, Secret, sign_keyed, verify_keyed};
use cascade_orchestrator::triggers::verify::{Provider, verify};
use libfuzzer_sys::fuzz_target;

const NOW: u64 = 1_800_000_000;

fuzz_target!(|data: &[u8]| {
    let secret = Secret::new(b"whsec_fuzz".to_vec());
    let mut parts = data.splitn(4, |b| *b == 0);
    let ts = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let sig = String::from_utf8_lossy(parts.next().unwrap_or_default()).into_owned();
    let key = parts
        .next()
        .map(|k| String::from_utf8_lossy(k).into_owned());
    let body = parts.next().unwrap_or_default();
    if let Ok(mac) = verify_keyed(&secret, &ts, &sig, key.as_deref(), body, NOW) {
        // Only a signature made with the secret verifies.
        let t: u64 = ts.trim().parse().expect("a verified timestamp parses");
        let made = sign_keyed(&secret, t, key.as_deref(), body);
        assert!(sig.contains(&made), "a forged signature verified");
        let mut guard = ReplayGuard::new(4);
        assert_eq!(guard.first_time(mac, NOW), Some(true));
        assert_eq!(guard.first_time(mac, NOW), Some(false), "a replay passed");
    }
    let headers = |name: &str| -> Option<&str> {
        match name {
            "x-slack-request-timestamp" | "x-zendesk-webhook-signature-timestamp" => Some(&ts),
            "x-slack-signature" | "x-hub-signature-256" | "stripe-signature"
            | "x-zendesk-webhook-signature" => Some(&sig),
            _ => key.as_deref(),
        }
    };
    for provider in [Provider::Slack, Provider::Github, Provider::Stripe, Provider::Zendesk] {
        let window = std::time::Duration::from_secs(300);
        if verify(provider, b"whsec_fuzz", headers, body, NOW, window).is_ok() {
            assert!(
                verify(provider, b"another", headers, body, NOW, window).is_err(),
                "{provider:?} accepted a signature under two secrets"
            );
        }
    }
    // The genuine signature of these bytes verifies.
    let made = sign_keyed(&secret, NOW, key.as_deref(), body);
    assert!(verify_keyed(&secret, &NOW.to_string(), &made, key.as_deref(), body, NOW).is_ok());
});
