//! The `http` and `llm` kinds against a zero-latency local stand-in (an axum server on
//! 127.0.0.1, in this process), side by side with a bare `reqwest` loop sending the same requests
//! in the same run: calls per second and CPU per call of each, and their ratio.
//!
//! `cargo bench --bench agents` (`AGENTS_BENCH_CALLS`, default 20,000; `AGENTS_BENCH_CONCURRENCY`,
//! default 64). The agents are called directly (`Agent::call`): this measures what a kind adds to
//! a request, not the engine (see `benches/engine.rs` for that).
//!
//! Then a storm through the whole engine: `AGENTS_BENCH_STORM_JOBS` jobs (default 5,000) of two
//! `llm` steps sharing a quota declared with only `learn_from_upstream = true`, against a
//! simulated provider that enforces its own request and token buckets and states them in
//! OpenAI's headers. Goodput is the calls answered over the most the provider could have
//! answered in the run's time (its full buckets at the start plus their refill); refusals are
//! counted per 1,000 jobs.

use std::sync::Arc;
use std::time::Instant;

use cascade_orchestrator::agents::{Agent, AgentSpec, CallContext, Registry, StepInput};
use futures::StreamExt;
use serde_json::{Value, json};

mod common;
#[path = "../tests/support/limited_provider.rs"]
mod limited_provider;

async fn stand_in() -> u16 {
    let app = axum::Router::new()
        .route(
            "/v1/chat/completions",
            axum::routing::post(|| async {
                axum::Json(json!({
                    "id": "c", "object": "chat.completion", "model": "bench",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": 12, "completion_tokens": 1}
                }))
            }),
        )
        .route(
            "/items",
            axum::routing::post(|axum::Json(body): axum::Json<Value>| async move {
                axum::Json(json!({"id": 1, "echo": body}))
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

fn agent(kind: &str, fields: Value) -> Arc<dyn Agent> {
    let Value::Object(map) = fields else {
        unreachable!()
    };
    let registry = Registry::default();
    registry
        .build(
            kind,
            &AgentSpec {
                graph: "bench",
                name: kind,
                fields: &map,
                resources: registry.resources(),
            },
        )
        .unwrap_or_else(|e| panic!("{e}"))
}

/// `calls` calls, `concurrency` at a time; (calls per second, CPU microseconds per call).
async fn measure<F, Fut>(calls: usize, concurrency: usize, call: F) -> (f64, f64)
where
    F: Fn(usize) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let (cpu, t) = (common::cpu_seconds(), Instant::now());
    futures::stream::iter(0..calls)
        .map(&call)
        .buffer_unordered(concurrency)
        .collect::<Vec<()>>()
        .await;
    let wall = t.elapsed().as_secs_f64();
    let cpu = common::cpu_seconds() - cpu;
    (calls as f64 / wall, cpu / calls as f64 * 1e6)
}

fn main() {
    let calls: usize = common::env_or("AGENTS_BENCH_CALLS", 20_000);
    let concurrency: usize = common::env_or("AGENTS_BENCH_CONCURRENCY", 64);
    common::runtime().block_on(async {
        let port = stand_in().await;
        let http = agent(
            "http",
            json!({"method": "POST", "url": format!("http://127.0.0.1:{port}/items"), "body": {"n": "{{= input.n }}"}}),
        );
        let llm = agent(
            "llm",
            json!({"base_url": format!("http://127.0.0.1:{port}/v1"), "model": "bench", "prompt": "Say ok to {{ input.n }}", "max_tokens": 4}),
        );
        let client = reqwest::Client::new();
        let ctx = |i: usize| CallContext {
            job_id: format!("job-{i}").into(),
            graph: "bench".into(),
            agent: "a".into(),
            attempt: 1,
            idempotency_key: format!("job-{i}/a").into(),
            deadline: None,
            job_key: None,
        };
        let input = |i: usize| StepInput {
            input: Arc::new(json!({ "n": i })),
            deps: vec![],
        };
        // Warm both sides' connection pools.
        for i in 0..200 {
            http.call(&ctx(i), &input(i)).await.unwrap();
            llm.call(&ctx(i), &input(i)).await.unwrap();
        }
        let items = format!("http://127.0.0.1:{port}/items");
        let chat = format!("http://127.0.0.1:{port}/v1/chat/completions");
        println!("{calls} calls, {concurrency} at a time, zero-latency stand-in on 127.0.0.1");
        for round in 0..2 {
            let bare_http = measure(calls, concurrency, |i| {
                let (client, url) = (&client, &items);
                async move {
                    let r = client
                        .post(url)
                        .header("idempotency-key", format!("job-{i}/a"))
                        .json(&json!({"n": i}))
                        .send()
                        .await
                        .unwrap();
                    let _: Value = r.json().await.unwrap();
                }
            })
            .await;
            let kind_http = measure(calls, concurrency, |i| {
                let (http, ctx, input) = (&http, ctx(i), input(i));
                async move {
                    http.call(&ctx, &input).await.unwrap();
                }
            })
            .await;
            let bare_llm = measure(calls, concurrency, |i| {
                let (client, url) = (&client, &chat);
                async move {
                    let r = client
                        .post(url)
                        .json(&json!({"model": "bench", "messages": [{"role": "user", "content": format!("Say ok to {i}")}], "max_tokens": 4}))
                        .send()
                        .await
                        .unwrap();
                    let _: Value = r.json().await.unwrap();
                }
            })
            .await;
            let kind_llm = measure(calls, concurrency, |i| {
                let (llm, ctx, input) = (&llm, ctx(i), input(i));
                async move {
                    llm.call(&ctx, &input).await.unwrap();
                }
            })
            .await;
            for (name, bare, kind) in [("http", bare_http, kind_http), ("llm", bare_llm, kind_llm)] {
                println!(
                    "round {round} {name:<4}  bare reqwest {:>8.0} calls/s {:>6.1} µs CPU/call | kind {:>8.0} calls/s {:>6.1} µs CPU/call | wall ratio {:.2}x, CPU ratio {:.2}x",
                    bare.0, bare.1, kind.0, kind.1, bare.0 / kind.0, kind.1 / bare.1
                );
            }
        }
        storm(common::env_or("AGENTS_BENCH_STORM_JOBS", 5_000)).await;
    });
}

/// The storm against the rate-limited provider; prints goodput and refusals.
async fn storm(jobs: usize) {
    use limited_provider::{Limits, Provider, Style};
    let provider = Provider::start(
        Style::OpenAi,
        Limits {
            requests: 200,
            requests_per_sec: 1000.0,
            tokens: 10_000,
            tokens_per_sec: 15_000.0,
        },
    )
    .await;
    let toml = provider.storm_graph("learn_from_upstream = true", "env:AGENTS_BENCH_KEY");
    // SAFETY: set before the orchestrator starts, on the only thread that reads it then.
    unsafe { std::env::set_var("AGENTS_BENCH_KEY", "bench-key") };
    let model =
        cascade_orchestrator::config::parse_graph_str("storm.toml", &toml, &Default::default())
            .unwrap_or_else(|e| panic!("{e}"));
    let orch = cascade_orchestrator::Orchestrator::builder(model)
        .start()
        .await
        .unwrap();
    let (cpu, t) = (common::cpu_seconds(), Instant::now());
    let mut ids = Vec::with_capacity(jobs);
    for i in 0..jobs {
        let req = cascade_orchestrator::SubmitRequest::new(
            "storm",
            json!({"body": format!("ticket {i}: I was charged twice")}),
        );
        ids.push(orch.submit(req).await.unwrap().id);
    }
    let mut failed = 0;
    for id in ids {
        let job = orch.wait(id).await.unwrap();
        if job.state != cascade_orchestrator::job::JobState::Succeeded {
            failed += 1;
        }
    }
    let secs = t.elapsed().as_secs_f64();
    let cpu = common::cpu_seconds() - cpu;
    let c = provider.counts();
    let per_call = c.tokens as f64 / c.answered as f64;
    let capacity = provider.capacity(secs, per_call);
    println!(
        "storm: {jobs} jobs ({failed} failed), {} calls answered in {secs:.2} s ({:.0}/s, {:.1} µs CPU/call), provider capacity {capacity:.0} calls: goodput {:.1}%; {} refusals ({:.2} per 1,000 jobs)",
        c.answered,
        c.answered as f64 / secs,
        cpu / c.answered as f64 * 1e6,
        100.0 * c.answered as f64 / capacity,
        c.refused,
        c.refused as f64 * 1000.0 / jobs as f64,
    );
    orch.shutdown(std::time::Duration::from_secs(1)).await;
}
