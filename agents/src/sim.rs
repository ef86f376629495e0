//! `kind = "sim"`: a **simulated** upstream, for tests, demos and benchmarks.
//!
//! It stands in for an LLM provider or an enterprise API: it waits a modelled latency, fails at
//! configured rates (transient, permanent, or by panicking), reports token usage, and can enforce a
//! rate limit of its own that refuses calls as rate-limited with a retry-after, the way a provider
//! enforces its limits whatever the client believes. Nothing it does leaves the process.
//!
//! ```toml
//! [agents.classify]
//! kind = "sim"                               # simulated upstream
//! latency = { lognormal = { median = "120ms", sigma = 0.4 } }
//! transient_failure_rate = 0.02
//! usage = { prompt_tokens = [200, 400], completion_tokens = 40 }
//! upstream = "llm-provider"                  # agents naming the same upstream share its limit
//! upstream_limit = { requests_per_second = 200, burst = 20 }
//! ```
//!
//! Its output is `{"simulated": true, "agent", "attempt", "idempotency_key", "input", "trace"}`
//! where `input` echoes the job input and `trace` lists every agent the data passed through, so
//! tests can check that data really flowed along the graph.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde::Deserialize;
use serde_json::Value;
#[cfg(test)]
use serde_json::json;
use tokio::time::Instant;
use tracing::Instrument;

use crate::{
    Agent, AgentError, AgentOutput, AgentSpec, CallContext, FieldError, Gcra, HumanDuration,
    KindSpec, Rate, Registry, StepInput, Usage,
};

pub const KIND: KindSpec = KindSpec {
    name: "sim",
    fields: &[
        "latency",
        "seed",
        "transient_failure_rate",
        "permanent_failure_rate",
        "panic_rate",
        "usage",
        "cost_per_1k_tokens",
        "upstream",
        "upstream_limit",
        "record_keys",
        "record_usage",
        "key_log",
    ],
    required: &[],
    build,
    upstream: upstream_name,
    credential: crate::registry::no_credential,
    may_be_irreversible: false,
};

/// Keep this module's simulated panics out of the process's output (tests and benchmarks that
/// panic on purpose); any other panic still reaches the hook installed before. Idempotent.
pub fn quiet_simulated_panics() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(|| {
        let default = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let msg = info
                .payload()
                .downcast_ref::<String>()
                .map(String::as_str)
                .unwrap_or_default();
            if !msg.starts_with("simulated panic") {
                default(info);
            }
        }));
    });
}

/// The simulated upstream a node calls: its `upstream` field, or `"{graph}.{agent}"`.
fn upstream_name(spec: &AgentSpec<'_>) -> Option<String> {
    Some(match spec.fields.get("upstream") {
        Some(Value::String(name)) => name.clone(),
        _ => default_upstream(spec),
    })
}

/// The upstream of a node that names none: its own.
fn default_upstream(spec: &AgentSpec<'_>) -> String {
    format!("{}.{}", spec.graph, spec.name)
}

/// How long a simulated call takes.
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(
    untagged,
    expecting = "a duration (\"20ms\"), { uniform = [\"5ms\", \"50ms\"] } or { lognormal = { median = \"100ms\", sigma = 0.5 } }"
)]
pub enum Latency {
    Fixed(HumanDuration),
    Uniform { uniform: [HumanDuration; 2] },
    LogNormal { lognormal: LogNormal },
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogNormal {
    pub median: HumanDuration,
    pub sigma: f64,
}

/// A token count: fixed, or drawn uniformly from `[low, high]`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(untagged, expecting = "a token count (300) or a range [200, 400]")]
pub enum Tokens {
    Fixed(u64),
    Range([u64; 2]),
}

impl Tokens {
    fn max(self) -> u64 {
        match self {
            Self::Fixed(n) => n,
            Self::Range([_, hi]) => hi,
        }
    }

    fn draw(self, rng: &mut SmallRng) -> u64 {
        match self {
            Self::Fixed(n) => n,
            Self::Range([lo, hi]) => rng.random_range(lo..=hi),
        }
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UsageModel {
    #[serde(default)]
    pub prompt_tokens: Option<Tokens>,
    #[serde(default)]
    pub completion_tokens: Option<Tokens>,
}

/// The simulated upstream's own limit, enforced whatever the caller's quota says. Written like a
/// quota's request rate: `requests_per_second` or `requests_per_minute`, or `rate = "200/s"`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamLimit {
    #[serde(default)]
    pub requests_per_second: Option<NonZeroU64>,
    #[serde(default)]
    pub requests_per_minute: Option<NonZeroU64>,
    #[serde(default)]
    pub rate: Option<Rate>,
    /// How many calls may arrive back to back (default 1).
    #[serde(default)]
    pub burst: Option<u32>,
}

impl UpstreamLimit {
    /// The one rate it gives, or why not.
    fn rate(&self) -> Result<Rate, &'static str> {
        let secs = |n, s| Rate::new(n, Duration::from_secs(s));
        match (
            self.requests_per_second,
            self.requests_per_minute,
            self.rate,
        ) {
            (Some(n), None, None) => Ok(secs(n, 1)),
            (None, Some(n), None) => Ok(secs(n, 60)),
            (None, None, Some(r)) => Ok(r),
            (None, None, None) => {
                Err("give requests_per_second, requests_per_minute or rate (\"200/s\")")
            }
            _ => Err("give one of requests_per_second, requests_per_minute and rate"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    latency: Option<Latency>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    transient_failure_rate: f64,
    #[serde(default)]
    permanent_failure_rate: f64,
    #[serde(default)]
    panic_rate: f64,
    #[serde(default)]
    usage: UsageModel,
    #[serde(default)]
    cost_per_1k_tokens: f64,
    #[serde(default)]
    upstream: Option<String>,
    #[serde(default)]
    upstream_limit: Option<UpstreamLimit>,
    /// Count calls per idempotency key at the upstream (tests of exactly-once effects).
    #[serde(default)]
    record_keys: bool,
    /// Log each accepted call's arrival time and token usage at the upstream (token benchmarks).
    #[serde(default)]
    record_usage: bool,
    /// Append each accepted call's idempotency key to this file, one per line: a record of what
    /// the upstream saw that outlives the process (crash tests).
    #[serde(default)]
    key_log: Option<std::path::PathBuf>,
}

fn check_rate(field: &str, v: f64) -> Result<(), FieldError> {
    if (0.0..=1.0).contains(&v) {
        Ok(())
    } else {
        Err(FieldError::new(
            field,
            format!("{v} is not a probability; use a number from 0.0 to 1.0"),
        ))
    }
}

fn build(spec: &AgentSpec<'_>) -> Result<Arc<dyn Agent>, FieldError> {
    let c: Config = spec.parse()?;
    check_rate("transient_failure_rate", c.transient_failure_rate)?;
    check_rate("permanent_failure_rate", c.permanent_failure_rate)?;
    check_rate("panic_rate", c.panic_rate)?;
    if let Some(Latency::LogNormal { lognormal }) = &c.latency
        && !(lognormal.sigma >= 0.0 && lognormal.sigma.is_finite())
    {
        return Err(FieldError {
            path: vec!["latency".into(), "lognormal".into(), "sigma".into()],
            message: "sigma must be a finite number >= 0".into(),
        });
    }
    if let Some(Latency::Uniform { uniform: [lo, hi] }) = &c.latency
        && lo > hi
    {
        return Err(FieldError::new(
            "latency",
            format!("uniform range [{lo}, {hi}] is reversed; write the smaller bound first"),
        ));
    }
    let limit = match c.upstream_limit {
        None => None,
        Some(l) => {
            let rate = l.rate().map_err(|e| FieldError::new("upstream_limit", e))?;
            Some(Gcra::new(rate.per_second(), l.burst.unwrap_or(1)))
        }
    };
    let name = c.upstream.clone().unwrap_or_else(|| default_upstream(spec));
    let upstream = spec.resources.get::<SimUpstreams>().get(&name);
    if let Some(limit) = limit {
        upstream.set_limit(limit);
    }
    if c.record_keys {
        upstream.record_keys.store(1, Ordering::Relaxed);
    }
    if c.record_usage {
        upstream.record_usage.store(1, Ordering::Relaxed);
    }
    if let Some(path) = &c.key_log {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|e| {
                FieldError::new("key_log", format!("cannot open {}: {e}", path.display()))
            })?;
        *upstream.key_log.lock().unwrap_or_else(|p| p.into_inner()) = Some(file);
    }
    let seed = c.seed.unwrap_or_else(|| {
        // Distinct, stable default seeds per agent so that runs are reproducible.
        spec.name
            .bytes()
            .chain(spec.graph.bytes())
            .fold(0xcbf29ce484222325u64, |h, b| {
                (h ^ b as u64).wrapping_mul(0x100000001b3)
            })
    });
    Ok(Arc::new(SimAgent {
        latency: c.latency,
        transient: c.transient_failure_rate,
        permanent: c.permanent_failure_rate,
        panic: c.panic_rate,
        usage: c.usage,
        cost_per_1k: c.cost_per_1k_tokens,
        upstream,
        seed,
    }))
}

/// A simulated agent; see the module documentation.
pub struct SimAgent {
    latency: Option<Latency>,
    transient: f64,
    permanent: f64,
    panic: f64,
    usage: UsageModel,
    cost_per_1k: f64,
    upstream: Arc<SimUpstream>,
    /// Every call draws from its own generator, seeded by this and what identifies the call
    /// (the job's idempotency key, or its id; the agent; the attempt), so that a seeded run
    /// fails the same calls whatever order they arrive in.
    seed: u64,
}

/// What one call drew from the random models, drawn up front under one lock.
struct Draw {
    latency: Duration,
    outcome: f64,
    prompt: u64,
    completion: u64,
}

/// FNV-1a, 64 bits: stable across Rust versions and platforms, unlike the standard library's
/// hasher, so a seed means the same draws everywhere. Each part ends with a separator byte so
/// that ("ab", "c") and ("a", "bc") differ.
fn fnv1a(mut h: u64, parts: &[&[u8]]) -> u64 {
    for part in parts {
        for &b in part.iter().chain(&[0xff]) {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
    }
    h
}

impl SimAgent {
    /// The draws of one call, from a generator of its own (see [`SimAgent::seed`]).
    fn draw(&self, ctx: &CallContext) -> Draw {
        let job = ctx.job_key.as_deref().unwrap_or(&ctx.job_id);
        let mut rng = SmallRng::seed_from_u64(fnv1a(
            self.seed ^ 0xcbf29ce484222325,
            &[
                job.as_bytes(),
                ctx.agent.as_bytes(),
                &ctx.attempt.to_le_bytes(),
            ],
        ));
        let latency = match &self.latency {
            None => Duration::ZERO,
            Some(Latency::Fixed(d)) => d.get(),
            Some(Latency::Uniform { uniform: [lo, hi] }) => {
                let (lo, hi) = (lo.get().as_nanos() as u64, hi.get().as_nanos() as u64);
                Duration::from_nanos(rng.random_range(lo..=hi))
            }
            Some(Latency::LogNormal { lognormal }) => {
                // Box–Muller: one standard normal from two uniforms. A distribution crate for this
                // one formula would be a dependency without a second use.
                let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
                let u2: f64 = rng.random();
                let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
                lognormal
                    .median
                    .get()
                    .mul_f64((lognormal.sigma * z).exp().min(1e6))
            }
        };
        Draw {
            latency,
            outcome: rng.random(),
            prompt: self.usage.prompt_tokens.map_or(0, |t| t.draw(&mut rng)),
            completion: self.usage.completion_tokens.map_or(0, |t| t.draw(&mut rng)),
        }
    }
}

#[async_trait::async_trait]
impl Agent for SimAgent {
    async fn call(&self, ctx: &CallContext, input: &StepInput) -> Result<AgentOutput, AgentError> {
        let draw = self.draw(ctx);
        // The upstream decides on arrival, as a real provider does.
        if let Err(wait) = self.upstream.admit(Instant::now()) {
            return Err(AgentError::rate_limited(
                "simulated upstream refused the call: rate limit exceeded (429)",
                Some(wait),
            ));
        }
        self.upstream.note_call(&ctx.idempotency_key);
        self.upstream.note_usage(draw.prompt + draw.completion);
        if !draw.latency.is_zero() {
            // The wait on the simulated upstream, as a real client's request span would show it.
            tokio::time::sleep(draw.latency)
                .instrument(tracing::debug_span!("upstream_wait"))
                .await;
        }
        let mut p = draw.outcome;
        if p < self.panic {
            panic!(
                "simulated panic in agent {} (job {})",
                ctx.agent, ctx.job_id
            );
        }
        p -= self.panic;
        if p < self.permanent {
            return Err(AgentError::permanent(format!(
                "simulated permanent failure in agent {}",
                ctx.agent
            )));
        }
        p -= self.permanent;
        if p < self.transient {
            return Err(AgentError::transient(format!(
                "simulated transient failure in agent {}",
                ctx.agent
            )));
        }
        let mut trace: Vec<Value> = Vec::with_capacity(input.deps.len() + 1);
        for (_, dep) in &input.deps {
            if let Some(Value::Array(items)) = dep.get("trace") {
                for item in items {
                    if !trace.contains(item) {
                        trace.push(item.clone());
                    }
                }
            }
        }
        trace.push(Value::String(ctx.agent.to_string()));
        let tokens = draw.prompt + draw.completion;
        // Built field by field: `json!` would serialize the borrowed input, a deep copy through
        // serde that cost more than the rest of a zero-latency call.
        let mut out = serde_json::Map::new();
        out.insert("simulated".into(), Value::Bool(true));
        out.insert("agent".into(), Value::String(ctx.agent.to_string()));
        out.insert("attempt".into(), Value::from(ctx.attempt));
        out.insert(
            "idempotency_key".into(),
            Value::String(ctx.idempotency_key.to_string()),
        );
        out.insert("input".into(), (*input.input).clone());
        out.insert("trace".into(), Value::Array(trace));
        Ok(AgentOutput {
            value: Value::Object(out),
            usage: Usage {
                prompt_tokens: draw.prompt,
                completion_tokens: draw.completion,
                cost_usd: tokens as f64 / 1000.0 * self.cost_per_1k,
            },
            limits: None,
        })
    }

    fn estimated_usage(&self, _input: &StepInput) -> Usage {
        let prompt = self.usage.prompt_tokens.map_or(0, Tokens::max);
        let completion = self.usage.completion_tokens.map_or(0, Tokens::max);
        Usage {
            prompt_tokens: prompt,
            completion_tokens: completion,
            cost_usd: (prompt + completion) as f64 / 1000.0 * self.cost_per_1k,
        }
    }
}

/// A simulated upstream system shared by every sim agent that names it. It survives agent
/// restarts, like a real provider does, and counts what it saw.
#[derive(Debug, Default)]
pub struct SimUpstream {
    limit: Mutex<Option<Gcra>>,
    calls: AtomicU64,
    refusals: AtomicU64,
    record_keys: AtomicU64,
    keys: Mutex<HashMap<String, u32>>,
    record_usage: AtomicU64,
    usage: Mutex<Vec<(Instant, u64)>>,
    key_log: Mutex<Option<std::fs::File>>,
}

impl SimUpstream {
    /// Limit the upstream to `limit` from now on. An agent rebuilt after a restart sets the same
    /// limit again: the upstream keeps the state of the one it has.
    fn set_limit(&self, limit: Gcra) {
        let mut s = self.limit.lock().unwrap_or_else(|p| p.into_inner());
        let same = s.as_ref().is_some_and(|g| {
            g.base_per_second() == limit.base_per_second() && g.burst() == limit.burst()
        });
        if !same {
            *s = Some(limit);
        }
    }

    /// Admit a call now, or say how long until one would be admitted.
    fn admit(&self, now: Instant) -> Result<(), Duration> {
        let mut s = self.limit.lock().unwrap_or_else(|p| p.into_inner());
        let Some(g) = s.as_mut() else { return Ok(()) };
        let at = g.earliest(now, 1.0);
        if at > now {
            drop(s);
            self.refusals.fetch_add(1, Ordering::Relaxed);
            return Err(at - now);
        }
        g.take(now, 1.0);
        Ok(())
    }

    fn note_call(&self, key: &str) {
        self.calls.fetch_add(1, Ordering::Relaxed);
        if let Some(f) = self
            .key_log
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .as_mut()
        {
            use std::io::Write;
            // One write per line with O_APPEND: lines from concurrent calls do not interleave.
            let _ = f.write_all(format!("{key}\n").as_bytes());
        }
        if self.record_keys.load(Ordering::Relaxed) != 0 {
            let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
            *keys.entry(key.to_string()).or_default() += 1;
        }
    }

    fn note_usage(&self, tokens: u64) {
        if self.record_usage.load(Ordering::Relaxed) != 0 {
            self.usage
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .push((Instant::now(), tokens));
        }
    }

    /// Arrival time and tokens of every accepted call (with `record_usage = true`).
    pub fn usage_log(&self) -> Vec<(Instant, u64)> {
        self.usage.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Calls the upstream accepted.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Calls the upstream refused as rate-limited.
    pub fn refusals(&self) -> u64 {
        self.refusals.load(Ordering::Relaxed)
    }

    /// How many accepted calls carried each idempotency key (with `record_keys = true`).
    pub fn calls_by_key(&self) -> HashMap<String, u32> {
        self.keys.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

/// The simulated upstreams of one registry (so of one running orchestrator), by name.
#[derive(Debug, Default)]
pub struct SimUpstreams {
    by_name: Mutex<HashMap<String, Arc<SimUpstream>>>,
}

impl SimUpstreams {
    /// The upstream called `name`, created on first use.
    pub fn get(&self, name: &str) -> Arc<SimUpstream> {
        let mut map = self.by_name.lock().unwrap_or_else(|p| p.into_inner());
        map.entry(name.to_string()).or_default().clone()
    }
}

/// The simulated upstream called `name` of the agents `registry` builds (an orchestrator's:
/// `orch.registry()`), to read what it saw. An agent with no `upstream` field calls
/// `"{graph}.{agent}"`.
pub fn upstream(registry: &Registry, name: &str) -> Arc<SimUpstream> {
    registry.resources().get::<SimUpstreams>().get(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(fields: Value) -> Result<Arc<dyn Agent>, FieldError> {
        sim_in(&Registry::default(), fields)
    }

    fn sim_in(registry: &Registry, fields: Value) -> Result<Arc<dyn Agent>, FieldError> {
        let Value::Object(map) = fields else {
            unreachable!()
        };
        build(&AgentSpec {
            graph: "g",
            name: "s",
            fields: &map,
            resources: registry.resources(),
        })
    }

    fn ctx(agent: &str) -> CallContext {
        CallContext {
            job_id: "j".into(),
            graph: "g".into(),
            agent: agent.into(),
            attempt: 1,
            idempotency_key: format!("j/{agent}").into(),
            deadline: None,
            job_key: None,
        }
    }

    /// Call `n` of a series: another job each time, so another draw.
    fn nth(agent: &str, n: usize) -> CallContext {
        CallContext {
            job_id: format!("j{n}").into(),
            ..ctx(agent)
        }
    }

    #[tokio::test(start_paused = true)]
    async fn fixed_latency_and_output_trace() {
        let a = sim(json!({"latency": "20ms", "usage": {"prompt_tokens": 10, "completion_tokens": 5}, "cost_per_1k_tokens": 2.0})).unwrap();
        let input = StepInput {
            input: Arc::new(json!({"n": 1})),
            deps: vec![
                ("a".into(), Arc::new(json!({"trace": ["root", "a"]}))),
                ("b".into(), Arc::new(json!({"trace": ["root", "b"]}))),
            ],
        };
        let start = Instant::now();
        let out = a.call(&ctx("s"), &input).await.unwrap();
        assert_eq!(start.elapsed(), Duration::from_millis(20));
        assert_eq!(out.value["trace"], json!(["root", "a", "b", "s"]));
        assert_eq!(out.value["input"], json!({"n": 1}));
        assert_eq!(out.value["simulated"], json!(true));
        assert_eq!(out.usage.total_tokens(), 15);
        assert!((out.usage.cost_usd - 0.03).abs() < 1e-9);
    }

    #[tokio::test(start_paused = true)]
    async fn uniform_and_lognormal_latency_stay_in_range() {
        let a = sim(json!({"latency": {"uniform": ["5ms", "10ms"]}, "seed": 1})).unwrap();
        for n in 0..50 {
            let start = Instant::now();
            a.call(&nth("s", n), &StepInput::default()).await.unwrap();
            let e = start.elapsed();
            assert!(
                e >= Duration::from_millis(5) && e <= Duration::from_millis(10),
                "{e:?}"
            );
        }
        let a =
            sim(json!({"latency": {"lognormal": {"median": "100ms", "sigma": 0.5}}, "seed": 3}))
                .unwrap();
        let mut samples = Vec::new();
        for n in 0..400 {
            let start = Instant::now();
            a.call(&nth("s", n), &StepInput::default()).await.unwrap();
            samples.push(start.elapsed());
        }
        samples.sort();
        let median = samples[200].as_secs_f64();
        assert!((0.08..0.125).contains(&median), "median {median}");
    }

    #[tokio::test]
    async fn failure_rates_are_classified() {
        let a = sim(json!({"transient_failure_rate": 1.0})).unwrap();
        let e = a.call(&ctx("s"), &StepInput::default()).await.unwrap_err();
        assert_eq!(e.class, crate::ErrorClass::Transient);
        let a = sim(json!({"permanent_failure_rate": 1.0})).unwrap();
        let e = a.call(&ctx("s"), &StepInput::default()).await.unwrap_err();
        assert_eq!(e.class, crate::ErrorClass::Permanent);
        assert!(e.message.contains("agent s"));
        let a = sim(json!({"transient_failure_rate": 0.3, "seed": 9})).unwrap();
        let mut failures = 0;
        for n in 0..2000 {
            failures += a.call(&nth("s", n), &StepInput::default()).await.is_err() as u32;
        }
        assert!((450..750).contains(&failures), "{failures}");
    }

    #[tokio::test]
    async fn a_call_draws_the_same_whatever_the_order() {
        let a = sim(json!({"transient_failure_rate": 0.5, "seed": 7})).unwrap();
        let mut forward = Vec::new();
        for n in 0..64 {
            forward.push(a.call(&nth("s", n), &StepInput::default()).await.is_ok());
        }
        let mut backward = Vec::new();
        for n in (0..64).rev() {
            backward.push(a.call(&nth("s", n), &StepInput::default()).await.is_ok());
        }
        backward.reverse();
        assert_eq!(forward, backward);
        assert!(forward.contains(&true) && forward.contains(&false));
        // The job's idempotency key decides when it has one, not the job id the server drew.
        let keyed = |id: &str, n: usize| CallContext {
            job_id: id.into(),
            job_key: Some(format!("run-{n}").into()),
            ..ctx("s")
        };
        let (mut first, mut second) = (Vec::new(), Vec::new());
        for n in 0..64 {
            first.push(
                a.call(&keyed("id-a", n), &StepInput::default())
                    .await
                    .is_ok(),
            );
            second.push(
                a.call(&keyed("id-b", n), &StepInput::default())
                    .await
                    .is_ok(),
            );
        }
        assert_eq!(first, second);
        // Another attempt and another seed draw anew.
        let mut retried = Vec::new();
        for n in 0..64 {
            let c = CallContext {
                attempt: 2,
                ..nth("s", n)
            };
            retried.push(a.call(&c, &StepInput::default()).await.is_ok());
        }
        assert_ne!(forward, retried);
        let b = sim(json!({"transient_failure_rate": 0.5, "seed": 8})).unwrap();
        let mut reseeded = Vec::new();
        for n in 0..64 {
            reseeded.push(b.call(&nth("s", n), &StepInput::default()).await.is_ok());
        }
        assert_ne!(forward, reseeded);
    }

    #[tokio::test]
    async fn panic_rate_panics() {
        let a = sim(json!({"panic_rate": 1.0})).unwrap();
        let r = tokio::spawn(async move { a.call(&ctx("s"), &StepInput::default()).await }).await;
        assert!(r.unwrap_err().is_panic());
    }

    #[tokio::test(start_paused = true)]
    async fn upstream_limit_refuses_with_retry_after() {
        let r = Registry::default();
        let a = sim_in(&r, json!({"upstream": "test-limit-10", "upstream_limit": {"requests_per_second": 10, "burst": 2}})).unwrap();
        a.call(&ctx("s"), &StepInput::default()).await.unwrap();
        a.call(&ctx("s"), &StepInput::default()).await.unwrap();
        let e = a.call(&ctx("s"), &StepInput::default()).await.unwrap_err();
        assert_eq!(e.class, crate::ErrorClass::RateLimited);
        assert_eq!(e.retry_after, Some(Duration::from_millis(100)));
        tokio::time::advance(Duration::from_millis(100)).await;
        a.call(&ctx("s"), &StepInput::default()).await.unwrap();
        let up = upstream(&r, "test-limit-10");
        assert_eq!((up.calls(), up.refusals()), (3, 1));
        // Another registry's upstream of the same name is another upstream.
        assert_eq!(upstream(&Registry::default(), "test-limit-10").calls(), 0);
        // The same limit written as a rate.
        let b = sim_in(
            &r,
            json!({"upstream": "test-rate", "upstream_limit": {"rate": "600/min", "burst": 1}}),
        )
        .unwrap();
        b.call(&ctx("s"), &StepInput::default()).await.unwrap();
        let e = b.call(&ctx("s"), &StepInput::default()).await.unwrap_err();
        assert_eq!(e.retry_after, Some(Duration::from_millis(100)));
    }

    #[tokio::test]
    async fn records_idempotency_keys() {
        let r = Registry::default();
        let a = sim_in(&r, json!({"upstream": "test-keys", "record_keys": true})).unwrap();
        a.call(&ctx("x"), &StepInput::default()).await.unwrap();
        a.call(&ctx("x"), &StepInput::default()).await.unwrap();
        a.call(&ctx("y"), &StepInput::default()).await.unwrap();
        let keys = upstream(&r, "test-keys").calls_by_key();
        assert_eq!(keys.get("j/x"), Some(&2));
        assert_eq!(keys.get("j/y"), Some(&1));
    }

    #[test]
    fn bad_config_names_the_field() {
        let e = sim(json!({"panic_rate": 2.0})).err().unwrap();
        assert_eq!(e.path, vec!["panic_rate"]);
        let e = sim(json!({"latency": 5})).err().unwrap();
        assert_eq!(e.path, vec!["latency"]);
        assert!(e.message.contains("\"20ms\""), "{}", e.message);
        let e = sim(json!({"usage": {"prompt_tokens": "many"}}))
            .err()
            .unwrap();
        assert_eq!(e.path, vec!["usage", "prompt_tokens"]);
        let e = sim(json!({"upstream_limit": {"burst": 2}})).err().unwrap();
        assert_eq!(e.path, vec!["upstream_limit"]);
        assert!(e.message.contains("requests_per_second"), "{}", e.message);
        let e = sim(json!({"upstream_limit": {"rate": "fast"}}))
            .err()
            .unwrap();
        assert!(e.message.contains("\"200/s\""), "{}", e.message);
    }
}
