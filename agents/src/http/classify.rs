//! An HTTP upstream's answer as a classified error: what the signal plane acts on. Shared by the
//! `http` and `llm` kinds.

use std::time::{Duration, SystemTime};

use crate::AgentError;

/// How much of an upstream's error body a message keeps.
const MESSAGE_BYTES: usize = 500;

/// Classify a non-success answer: 429 → rate-limited with the longest delay its headers give;
/// 408, 5xx and 529 (overloaded) → transient; 401 → unauthorized; 403 → permanent (a permission,
/// not a credential); any other status → permanent. The message carries the upstream's own
/// words, cut short, with `redact` applied (it strips the caller's secrets).
pub fn classify(
    status: u16,
    headers: &reqwest::header::HeaderMap,
    body: &[u8],
    redact: &dyn Fn(&str) -> String,
) -> AgentError {
    // Redacted whole, then cut: a secret across the cut must not leave its first half.
    let text = cut(&redact(&upstream_message(body)));
    let msg = |what: &str| {
        if text.is_empty() {
            format!("upstream answered HTTP {status} ({what})")
        } else {
            format!("upstream answered HTTP {status} ({what}): {text}")
        }
    };
    match status {
        429 => {
            AgentError::rate_limited(msg("rate limited"), retry_after(headers, SystemTime::now()))
        }
        408 | 529 | 500..=599 => AgentError::transient(msg(if status == 529 {
            "overloaded"
        } else {
            "server error"
        })),
        401 => AgentError::unauthorized(msg("credentials refused")),
        403 => AgentError::permanent(msg("forbidden: the credential lacks a permission")),
        _ => AgentError::permanent(msg("refused")),
    }
}

/// `text` cut at [`MESSAGE_BYTES`].
fn cut(text: &str) -> String {
    let mut one_line = text.to_string();
    if one_line.len() > MESSAGE_BYTES {
        let mut at = MESSAGE_BYTES;
        while !one_line.is_char_boundary(at) {
            at -= 1;
        }
        one_line.truncate(at);
        one_line.push('…');
    }
    one_line
}

/// The error body as one line: a JSON error's `error.message` or `message` when there is one,
/// else the text.
fn upstream_message(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(body);
    let from_json = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| {
            v.pointer("/error/message")
                .or_else(|| v.get("message"))
                .or_else(|| v.get("error").filter(|e| e.is_string()))
                .and_then(|m| m.as_str().map(str::to_string))
        });
    from_json
        .unwrap_or_else(|| text.into_owned())
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

/// The longest wait a refusal's headers ask for: `retry-after` (seconds or an HTTP date),
/// `retry-after-ms`, OpenAI's `x-ratelimit-reset-requests` / `-tokens` (`1s`, `6m0s`, `20ms`),
/// Anthropic's `anthropic-ratelimit-*-reset` (an RFC 3339 time).
pub fn retry_after(headers: &reqwest::header::HeaderMap, now: SystemTime) -> Option<Duration> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let mut waits: Vec<Duration> = Vec::new();
    if let Some(v) = get("retry-after") {
        if let Ok(secs) = v.parse::<f64>() {
            if secs.is_finite() && secs >= 0.0 {
                waits.push(Duration::from_secs_f64(secs.min(86_400.0)));
            }
        } else if let Ok(at) = httpdate::parse_http_date(v) {
            waits.push(at.duration_since(now).unwrap_or_default());
        }
    }
    if let Some(ms) = get("retry-after-ms").and_then(|v| v.parse::<f64>().ok())
        && ms.is_finite()
        && ms >= 0.0
    {
        waits.push(Duration::from_secs_f64((ms / 1000.0).min(86_400.0)));
    }
    for name in ["x-ratelimit-reset-requests", "x-ratelimit-reset-tokens"] {
        if let Some(d) = get(name).and_then(openai_duration) {
            waits.push(d);
        }
    }
    for (name, value) in headers {
        let name = name.as_str();
        if name.starts_with("anthropic-ratelimit-")
            && name.ends_with("-reset")
            && let Some(at) = value
                .to_str()
                .ok()
                .and_then(|v| humantime::parse_rfc3339_weak(v.trim()).ok())
        {
            waits.push(at.duration_since(now).unwrap_or_default());
        }
    }
    waits.into_iter().max()
}

/// OpenAI's reset form: `1s`, `6m0s`, `1h2m3.5s`, `20ms`.
fn openai_duration(v: &str) -> Option<Duration> {
    let mut total = 0.0f64;
    let mut number = String::new();
    let mut chars = v.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let n: f64 = number.parse().ok()?;
        number.clear();
        let unit = match c {
            'h' => 3600.0,
            'm' if chars.peek() == Some(&'s') => {
                chars.next();
                0.001
            }
            'm' => 60.0,
            's' => 1.0,
            _ => return None,
        };
        total += n * unit;
        any = true;
    }
    if !number.is_empty() || !any || !total.is_finite() {
        return None;
    }
    Some(Duration::from_secs_f64(total.min(86_400.0)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorClass;
    use reqwest::header::{HeaderMap, HeaderValue};

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn the_longest_wait_any_header_asks_for() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let h = |p: &[(&'static str, &str)]| retry_after(&headers(p), now);
        assert_eq!(h(&[]), None);
        assert_eq!(h(&[("retry-after", "3")]), Some(Duration::from_secs(3)));
        assert_eq!(
            h(&[("retry-after", "1"), ("retry-after-ms", "2500")]),
            Some(Duration::from_millis(2500))
        );
        assert_eq!(
            h(&[
                ("x-ratelimit-reset-requests", "6m0s"),
                ("x-ratelimit-reset-tokens", "20ms")
            ]),
            Some(Duration::from_secs(360))
        );
        assert_eq!(
            h(&[("x-ratelimit-reset-tokens", "1h2m3.5s")]),
            Some(Duration::from_secs_f64(3723.5))
        );
        assert_eq!(
            h(&[("anthropic-ratelimit-requests-reset", "2023-11-14T22:13:30Z")]),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            h(&[("retry-after", "Tue, 14 Nov 2023 22:13:40 GMT")]),
            Some(Duration::from_secs(20))
        );
        // Garbage is ignored, not a zero wait.
        assert_eq!(h(&[("x-ratelimit-reset-requests", "soon")]), None);
    }

    #[test]
    fn statuses_map_to_the_classes_the_signal_plane_acts_on() {
        let none = HeaderMap::new();
        let keep = |s: &str| s.to_string();
        let c = |status| classify(status, &none, b"", &keep).class;
        assert_eq!(c(429), ErrorClass::RateLimited);
        for s in [408, 500, 502, 503, 504, 529] {
            assert_eq!(c(s), ErrorClass::Transient, "{s}");
        }
        assert_eq!(c(401), ErrorClass::Unauthorized);
        assert_eq!(c(403), ErrorClass::Permanent);
        assert_eq!(c(404), ErrorClass::Permanent);
        assert_eq!(c(422), ErrorClass::Permanent);
        let e = classify(
            400,
            &none,
            br#"{"error": {"message": "model   gpt-x\n does not exist; key sk-123"}}"#,
            &|s: &str| s.replace("sk-123", "[redacted]"),
        );
        assert_eq!(
            e.message,
            "upstream answered HTTP 400 (refused): model gpt-x does not exist; key [redacted]"
        );
        let long = vec![b'x'; 2000];
        let e = classify(500, &none, &long, &keep);
        assert!(
            e.message.len() < 600 && e.message.ends_with('…'),
            "{}",
            e.message
        );
        let e = classify(429, &headers(&[("retry-after", "7")]), b"slow down", &keep);
        assert_eq!(e.retry_after, Some(Duration::from_secs(7)));
    }
}
