//! A simulated LLM provider that enforces its own limits the way OpenAI and Anthropic do: a
//! request bucket and a token bucket, each refilled continuously up to its limit, every answer
//! stating both in the provider's own headers, and a 429 when either is short. Served on
//! 127.0.0.1 by the test or benchmark that starts it; it counts what it answered and refused.

// Shared by a test and a benchmark, each using part of it.
#![allow(dead_code)]

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Value, json};

/// The provider's limits: bucket sizes and refill rates.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    pub requests: u64,
    pub requests_per_sec: f64,
    pub tokens: u64,
    pub tokens_per_sec: f64,
}

/// Whose API and headers it speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Style {
    /// `/v1/chat/completions`, `x-ratelimit-*-requests|tokens` (resets as `250ms` / `1.5s`).
    OpenAi,
    /// `/v1/messages`, `anthropic-ratelimit-*` (resets as RFC 3339 times, to the millisecond),
    /// and `retry-after` in whole seconds on a 429.
    Anthropic,
}

/// Counts of what the provider did.
#[derive(Clone, Copy, Debug, Default)]
pub struct Counts {
    pub answered: u64,
    pub refused: u64,
    /// Refusals of requests that arrived more than 50 ms after the provider sent its first
    /// answer since the last [`Provider::reset_counts`]: once the caller could know its limits.
    pub refused_after_first_answer: u64,
    pub tokens: u64,
}

struct State {
    limits: Limits,
    requests: f64,
    tokens: f64,
    at: Instant,
    counts: Counts,
    first_answer: Option<Instant>,
}

impl State {
    fn refill(&mut self, now: Instant) {
        let secs = now.duration_since(self.at).as_secs_f64();
        let l = self.limits;
        self.requests = (self.requests + secs * l.requests_per_sec).min(l.requests as f64);
        self.tokens = (self.tokens + secs * l.tokens_per_sec).min(l.tokens as f64);
        self.at = now;
    }
}

#[derive(Clone)]
pub struct Provider {
    pub port: u16,
    pub style: Style,
    state: Arc<Mutex<State>>,
}

/// What one call costs: a token per four bytes of prompt, and the completion.
const COMPLETION_TOKENS: u64 = 5;

impl Provider {
    pub async fn start(style: Style, limits: Limits) -> Provider {
        let state = Arc::new(Mutex::new(State {
            limits,
            requests: limits.requests as f64,
            tokens: limits.tokens as f64,
            at: Instant::now(),
            counts: Counts::default(),
            first_answer: None,
        }));
        let s = state.clone();
        let app = axum::Router::new().fallback(move |body: axum::body::Bytes| {
            let s = s.clone();
            async move { answer(&s, style, &body) }
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        Provider { port, style, state }
    }

    /// The base URL an `llm` agent of this style is given.
    pub fn base_url(&self) -> String {
        match self.style {
            Style::OpenAi => format!("http://127.0.0.1:{}/v1", self.port),
            Style::Anthropic => format!("http://127.0.0.1:{}", self.port),
        }
    }

    /// A storm graph against this provider: `classify` then `draft`, two `llm` agents sharing
    /// the quota `provider` whose table body is `quota`, their key from the secret reference
    /// `key`.
    pub fn storm_graph(&self, quota: &str, key: &str) -> String {
        let provider = match self.style {
            Style::OpenAi => "openai",
            Style::Anthropic => "anthropic",
        };
        let base = self.base_url();
        format!(
            r#"
            [quotas.provider]
            {quota}

            [graph]
            name = "storm"
            [agents.classify]
            kind = "llm"
            provider = "{provider}"
            base_url = "{base}"
            api_key = "{key}"
            model = "storm-model"
            prompt = "Label this ticket: {{{{ input.body }}}}"
            max_tokens = 16
            quotas = ["provider"]
            [agents.draft]
            kind = "llm"
            after = ["classify"]
            provider = "{provider}"
            base_url = "{base}"
            api_key = "{key}"
            model = "storm-model"
            prompt = "Draft a reply to ticket {{{{ job.id }}}}, labelled {{{{ deps.classify.text }}}}"
            max_tokens = 16
            quotas = ["provider"]
            "#
        )
    }

    pub fn counts(&self) -> Counts {
        self.state.lock().unwrap().counts
    }

    pub fn reset_counts(&self) {
        let mut s = self.state.lock().unwrap();
        s.counts = Counts::default();
        s.first_answer = None;
    }

    /// Spend both buckets to nothing, as other clients of the same account would.
    pub fn drain(&self) {
        let mut s = self.state.lock().unwrap();
        s.refill(Instant::now());
        s.requests = 0.0;
        s.tokens = 0.0;
    }

    /// The most calls it could have answered in `secs` from full buckets, when every call
    /// costs `tokens_per_call`.
    pub fn capacity(&self, secs: f64, tokens_per_call: f64) -> f64 {
        let l = self.state.lock().unwrap().limits;
        let requests = l.requests as f64 + l.requests_per_sec * secs;
        let tokens = (l.tokens as f64 + l.tokens_per_sec * secs) / tokens_per_call;
        requests.min(tokens)
    }
}

/// The tokens a prompt of `prompt` costs at this provider.
pub fn call_tokens(prompt: &str) -> u64 {
    prompt.len() as u64 / 4 + 1 + COMPLETION_TOKENS
}

fn answer(state: &Mutex<State>, style: Style, body: &[u8]) -> axum::response::Response {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let prompt = body["messages"]
        .as_array()
        .and_then(|m| m.last())
        .and_then(|m| m["content"].as_str())
        .unwrap_or("")
        .to_string();
    let cost = call_tokens(&prompt);
    let now = Instant::now();
    let (ok, requests, tokens, limits) = {
        let mut s = state.lock().unwrap();
        s.refill(now);
        let ok = s.requests >= 1.0 && s.tokens >= cost as f64;
        let informed = s
            .first_answer
            .is_some_and(|t| now.duration_since(t) > Duration::from_millis(50));
        if ok {
            s.requests -= 1.0;
            s.tokens -= cost as f64;
            s.counts.answered += 1;
            s.counts.tokens += cost;
        } else {
            s.counts.refused += 1;
            if informed {
                s.counts.refused_after_first_answer += 1;
            }
        }
        s.first_answer.get_or_insert(now);
        (ok, s.requests, s.tokens, s.limits)
    };
    // Until full again, per bucket.
    let reset_requests =
        Duration::from_secs_f64((limits.requests as f64 - requests) / limits.requests_per_sec);
    let reset_tokens =
        Duration::from_secs_f64((limits.tokens as f64 - tokens) / limits.tokens_per_sec);
    let mut r = axum::response::Response::builder()
        .status(if ok { 200 } else { 429 })
        .header("content-type", "application/json");
    match style {
        Style::OpenAi => {
            let form = |d: Duration| {
                if d < Duration::from_secs(1) {
                    format!("{}ms", d.as_millis())
                } else {
                    format!("{:.3}s", d.as_secs_f64())
                }
            };
            r = r
                .header("x-ratelimit-limit-requests", limits.requests)
                .header("x-ratelimit-remaining-requests", requests.floor() as u64)
                .header("x-ratelimit-reset-requests", form(reset_requests))
                .header("x-ratelimit-limit-tokens", limits.tokens)
                .header("x-ratelimit-remaining-tokens", tokens.floor() as u64)
                .header("x-ratelimit-reset-tokens", form(reset_tokens));
        }
        Style::Anthropic => {
            let at =
                |d: Duration| humantime::format_rfc3339_millis(SystemTime::now() + d).to_string();
            r = r
                .header("anthropic-ratelimit-requests-limit", limits.requests)
                .header(
                    "anthropic-ratelimit-requests-remaining",
                    requests.floor() as u64,
                )
                .header("anthropic-ratelimit-requests-reset", at(reset_requests))
                .header("anthropic-ratelimit-tokens-limit", limits.tokens)
                .header(
                    "anthropic-ratelimit-tokens-remaining",
                    tokens.floor() as u64,
                )
                .header("anthropic-ratelimit-tokens-reset", at(reset_tokens));
            if !ok {
                let wait = reset_requests.max(reset_tokens).as_secs_f64().ceil() as u64;
                r = r.header("retry-after", wait.max(1));
            }
        }
    }
    let model = body["model"].clone();
    let reply = match (style, ok) {
        (Style::OpenAi, false) => {
            json!({"error": {"message": "Rate limit reached", "type": "requests"}})
        }
        (Style::Anthropic, false) => {
            json!({"type": "error", "error": {"type": "rate_limit_error", "message": "Rate limit reached"}})
        }
        (Style::OpenAi, true) => json!({
            "id": "chatcmpl-1", "object": "chat.completion", "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": cost - COMPLETION_TOKENS, "completion_tokens": COMPLETION_TOKENS}
        }),
        (Style::Anthropic, true) => json!({
            "id": "msg_1", "type": "message", "role": "assistant", "model": model,
            "content": [{"type": "text", "text": "ok"}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": cost - COMPLETION_TOKENS, "output_tokens": COMPLETION_TOKENS}
        }),
    };
    r.body(axum::body::Body::from(reply.to_string())).unwrap()
}
