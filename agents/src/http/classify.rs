//! An HTTP upstream's answer as a classified error: what the signal plane acts on. Shared by the
//! `http` and `llm` kinds.

use std::time::{Duration, SystemTime};

use crate::{AgentError, LimitReading, UpstreamLimits};

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

/// The upstream's own rate limits as its answer states them, requests and tokens:
/// - OpenAI and compatible gateways: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`
///   (the reset in OpenAI's `1s` / `6m0s` form);
/// - Anthropic: `anthropic-ratelimit-{requests,tokens,input-tokens}-{limit,remaining,reset}` (the
///   reset an RFC 3339 time);
/// - any other API (requests only): the IETF draft's `ratelimit-{limit,remaining,reset}` or the
///   common `x-ratelimit-{limit,remaining,reset}` (reset in seconds, or a Unix time).
///
/// `None` when the answer states none. A remaining count above its limit is read as the limit.
pub fn upstream_limits(headers: &reqwest::header::HeaderMap) -> Option<UpstreamLimits> {
    upstream_limits_at(headers, SystemTime::now())
}

fn upstream_limits_at(
    headers: &reqwest::header::HeaderMap,
    now: SystemTime,
) -> Option<UpstreamLimits> {
    let get = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::trim)
    };
    let reading = |limit: &str, remaining: &str, reset: Option<Duration>| {
        let limit = get(limit)?.parse::<u64>().ok().filter(|&l| l > 0)?;
        let remaining = get(remaining)?.parse::<u64>().ok()?.min(limit);
        Some(LimitReading {
            limit,
            remaining,
            reset,
        })
    };
    let openai = |kind: &str| {
        reading(
            &format!("x-ratelimit-limit-{kind}"),
            &format!("x-ratelimit-remaining-{kind}"),
            get(&format!("x-ratelimit-reset-{kind}"))
                .and_then(openai_duration_with_unit)
                .map(midpoint),
        )
    };
    let anthropic = |kind: &str| {
        let reset = get(&format!("anthropic-ratelimit-{kind}-reset")).and_then(|v| {
            let at = humantime::parse_rfc3339_weak(v).ok()?;
            let unit = Duration::from_secs_f64(10f64.powi(-decimals(v)));
            Some(midpoint((at.duration_since(now).unwrap_or_default(), unit)))
        });
        reading(
            &format!("anthropic-ratelimit-{kind}-limit"),
            &format!("anthropic-ratelimit-{kind}-remaining"),
            reset,
        )
    };
    let generic = |prefix: &str| {
        let reset = get(&format!("{prefix}reset")).and_then(|v| {
            let s = v
                .parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0)?;
            let unit = Duration::from_secs_f64(10f64.powi(-decimals(v)));
            // Past a billion it is a Unix time (GitHub's form), not a delay.
            let d = if s > 1e9 {
                (SystemTime::UNIX_EPOCH + Duration::from_secs_f64(s))
                    .duration_since(now)
                    .unwrap_or_default()
            } else {
                Duration::from_secs_f64(s.min(86_400.0))
            };
            Some(midpoint((d, unit)))
        });
        reading(
            &format!("{prefix}limit"),
            &format!("{prefix}remaining"),
            reset,
        )
    };
    let limits = UpstreamLimits {
        requests: openai("requests")
            .or_else(|| anthropic("requests"))
            .or_else(|| generic("ratelimit-"))
            .or_else(|| generic("x-ratelimit-")),
        tokens: openai("tokens")
            .or_else(|| anthropic("tokens"))
            .or_else(|| anthropic("input-tokens")),
    };
    (!limits.is_empty()).then_some(limits)
}

/// OpenAI's reset form: `1s`, `6m0s`, `1h2m3.5s`, `20ms`.
fn openai_duration(v: &str) -> Option<Duration> {
    openai_duration_with_unit(v).map(|(d, _)| d)
}

/// A stated reset read as the middle of what it may mean: a value written to the millisecond
/// (`20ms`) is anywhere in [20, 21) ms when the upstream truncates, so half a unit is added.
/// Rates measured from short resets would otherwise come out high.
fn midpoint((d, unit): (Duration, Duration)) -> Duration {
    d + unit / 2
}

/// The number of digits after the decimal point in `v`'s first number.
fn decimals(v: &str) -> i32 {
    v.split_once('.').map_or(0, |(_, frac)| {
        frac.chars().take_while(char::is_ascii_digit).count() as i32
    })
}

/// An OpenAI duration and the unit of its last digit.
fn openai_duration_with_unit(v: &str) -> Option<(Duration, Duration)> {
    let mut total = 0.0f64;
    let mut last_unit = 1.0f64;
    let mut number = String::new();
    let mut chars = v.chars().peekable();
    let mut any = false;
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let n: f64 = number.parse().ok()?;
        let digits = decimals(&number);
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
        last_unit = unit * 10f64.powi(-digits);
        any = true;
    }
    if !number.is_empty() || !any || !total.is_finite() {
        return None;
    }
    Some((
        Duration::from_secs_f64(total.min(86_400.0)),
        Duration::from_secs_f64(last_unit),
    ))
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
    fn limits_are_read_from_each_providers_headers() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let read = |p: &[(&'static str, &str)]| upstream_limits_at(&headers(p), now);
        assert_eq!(read(&[("retry-after", "1")]), None);
        let openai = read(&[
            ("x-ratelimit-limit-requests", "500"),
            ("x-ratelimit-remaining-requests", "499"),
            ("x-ratelimit-reset-requests", "120ms"),
            ("x-ratelimit-limit-tokens", "30000"),
            ("x-ratelimit-remaining-tokens", "29000"),
            ("x-ratelimit-reset-tokens", "2s"),
        ])
        .unwrap();
        assert_eq!(
            openai.requests,
            Some(LimitReading {
                limit: 500,
                remaining: 499,
                reset: Some(Duration::from_micros(120_500))
            })
        );
        assert_eq!(openai.tokens.unwrap().remaining, 29000);
        // Read as the middle of what a truncated value may mean.
        assert_eq!(
            openai.tokens.unwrap().reset,
            Some(Duration::from_millis(2500))
        );
        let anthropic = read(&[
            ("anthropic-ratelimit-requests-limit", "50"),
            ("anthropic-ratelimit-requests-remaining", "0"),
            (
                "anthropic-ratelimit-requests-reset",
                "2023-11-14T22:13:21.5Z",
            ),
            ("anthropic-ratelimit-input-tokens-limit", "40000"),
            ("anthropic-ratelimit-input-tokens-remaining", "39000"),
        ])
        .unwrap();
        assert_eq!(
            anthropic.requests.unwrap().reset,
            Some(Duration::from_millis(1550))
        );
        assert_eq!(anthropic.tokens.unwrap().limit, 40000);
        assert_eq!(anthropic.tokens.unwrap().reset, None);
        // A generic API: a delay in seconds, or a Unix time; a remaining count over the limit
        // is the limit; a zero limit or a number that is not one says nothing.
        let github = read(&[
            ("x-ratelimit-limit", "5000"),
            ("x-ratelimit-remaining", "6000"),
            ("x-ratelimit-reset", "1700000060"),
        ])
        .unwrap();
        assert_eq!(
            github.requests,
            Some(LimitReading {
                limit: 5000,
                remaining: 5000,
                reset: Some(Duration::from_millis(60_500))
            })
        );
        assert_eq!(
            read(&[
                ("ratelimit-limit", "10"),
                ("ratelimit-remaining", "3"),
                ("ratelimit-reset", "4")
            ])
            .unwrap()
            .requests
            .unwrap()
            .reset,
            Some(Duration::from_millis(4500))
        );
        assert_eq!(
            read(&[
                ("x-ratelimit-limit-requests", "0"),
                ("x-ratelimit-remaining-requests", "0")
            ]),
            None
        );
        assert_eq!(
            read(&[
                ("x-ratelimit-limit-requests", "many"),
                ("x-ratelimit-remaining-requests", "1")
            ]),
            None
        );
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
