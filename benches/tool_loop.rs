//! What a journaled sub-step costs: tool-using `llm` agents against a zero-latency MCP server
//! (an rmcp server in this process, over streamable HTTP, with one read-only `echo` tool) and a
//! zero-latency simulated model (axum, in this process) that asks for one tool call a turn until
//! it has `TOOL_BENCH_CALLS` results, then answers.
//!
//! `cargo bench --bench tool_loop` (`TOOL_BENCH_JOBS`, default 200; `TOOL_BENCH_CALLS` per job,
//! default 20; `TOOL_BENCH_CONCURRENCY`, default 16). In one run, side by side:
//!
//! - **direct**: the tool called with rmcp (Cascade's MCP client, one shared session), one call
//!   at a time — the latency of a bare tool call;
//! - **by hand**: the same conversation driven by a plain loop (a `reqwest` POST to the model,
//!   then an rmcp call, and again), with nothing recorded;
//! - **Cascade**: the same jobs through the engine, every turn and call a journaled sub-step,
//!   with the in-memory store and with the SQLite store (each sub-step committed before the
//!   next: `fsync` off, as on a disk with a write cache).
//!
//! Sub-steps per second (turns and tool calls) with `TOOL_BENCH_CONCURRENCY` jobs at once, and
//! the added latency per sub-step of a single job over the hand loop. Then each kind of sub-step
//! on its own, from the journals of `TOOL_BENCH_ALONE` jobs (default 10) run one at a time: the
//! start times of consecutive sub-steps split a job's time into its sub-steps, so a tool call's
//! share runs from its start in the journal to the next turn's start (its journal entries, both
//! committed, the quota grant, the call, the conversation rebuilt) and is set against a direct
//! rmcp call of the same tool; a turn's share runs from its start to its first call's start and
//! is set against the hand loop's POST to the model. Medians, with means beside them.

use std::sync::Arc;
use std::time::{Duration, Instant};

use cascade_orchestrator::agents::mcp::{McpServerConfig, McpServers};
use cascade_orchestrator::agents::mcp_host::{
    OfferedTool, ToolAnnotations, ToolHost, service, tool,
};
use cascade_orchestrator::{Orchestrator, SubmitRequest, config};
use futures::StreamExt;
use serde_json::{Map, Value, json};

mod common;

struct Echo;

#[async_trait::async_trait]
impl ToolHost for Echo {
    fn tools(&self) -> Vec<OfferedTool> {
        vec![
            tool(
                "echo",
                "Echo the arguments",
                json!({"type": "object", "properties": {"i": {"type": "integer"}}}),
            )
            .annotate(ToolAnnotations::default().read_only(true)),
        ]
    }

    async fn call(&self, _: &str, arguments: Map<String, Value>) -> Result<Value, String> {
        Ok(Value::Object(arguments))
    }
}

/// Tool results in a conversation (OpenAI's shape).
fn results(body: &Value) -> usize {
    body["messages"]
        .as_array()
        .map_or(0, |m| m.iter().filter(|m| m["role"] == "tool").count())
}

async fn serve(app: axum::Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

async fn simulated_model(calls: usize) -> u16 {
    let app = axum::Router::new().route(
        "/v1/chat/completions",
        axum::routing::post(move |axum::Json(body): axum::Json<Value>| async move {
            let done = results(&body);
            let message = if done < calls {
                json!({"role": "assistant", "content": null, "tool_calls": [{
                    "id": format!("c{done}"), "type": "function",
                    "function": {"name": "bench__echo", "arguments": json!({"i": done}).to_string()}
                }]})
            } else {
                json!({"role": "assistant", "content": "done"})
            };
            axum::Json(json!({
                "id": "c", "object": "chat.completion", "model": "bench",
                "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 12, "completion_tokens": 3}
            }))
        }),
    );
    serve(app).await
}

/// How long each model turn (the POST and its JSON) and each tool call took.
#[derive(Default)]
struct Times {
    turns: Vec<Duration>,
    calls: Vec<Duration>,
}

/// The conversation driven by hand: POST, call the tool it asks for, append both, again.
async fn by_hand(
    http: &reqwest::Client,
    url: &str,
    server: &cascade_orchestrator::agents::mcp::McpServer,
    key: &str,
    times: &mut Times,
) -> usize {
    let mut messages = vec![json!({"role": "user", "content": "go"})];
    let mut sub_steps = 0;
    loop {
        let start = Instant::now();
        let reply: Value = http
            .post(url)
            .json(&json!({"model": "bench", "messages": messages, "tools": [{"type": "function", "function": {"name": "bench__echo", "parameters": {"type": "object"}}}]}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        times.turns.push(start.elapsed());
        sub_steps += 1;
        let message = reply["choices"][0]["message"].clone();
        let Some(calls) = message["tool_calls"].as_array().cloned() else {
            return sub_steps;
        };
        messages.push(message);
        for c in calls {
            let args: Value =
                serde_json::from_str(c["function"]["arguments"].as_str().unwrap()).unwrap();
            let start = Instant::now();
            let r = server
                .call("echo", args.as_object().unwrap().clone(), key)
                .await
                .unwrap();
            times.calls.push(start.elapsed());
            sub_steps += 1;
            messages.push(json!({"role": "tool", "tool_call_id": c["id"], "content": cascade_orchestrator::agents::mcp::result_value(&r).to_string()}));
        }
    }
}

fn model(
    dir: &std::path::Path,
    llm: u16,
    mcp: u16,
    calls: usize,
) -> cascade_orchestrator::model::ServerModel {
    std::fs::write(
        dir.join("g.toml"),
        format!(
            r#"
[graph]
name = "bench"
max_in_flight_jobs = 256

[agents.agent]
kind = "llm"
base_url = "http://127.0.0.1:{llm}/v1"
api_key = "env:TOOL_BENCH_KEY"
model = "bench"
prompt = "go"
tools = ["bench.echo"]
max_turns = {turns}
max_concurrency = 256
timeout = "30s"
"#,
            turns = calls + 1
        ),
    )
    .unwrap();
    std::fs::write(
        dir.join("cascade.toml"),
        format!(
            "graphs = [\"g.toml\"]\n[mcp_servers.bench]\nurl = \"http://127.0.0.1:{mcp}/mcp\"\n"
        ),
    )
    .unwrap();
    config::load(Some(&dir.join("cascade.toml")), &[], &Default::default()).unwrap()
}

/// Run `jobs` jobs, `concurrency` at a time; the wall time and the jobs' records.
async fn through_cascade(
    orch: &Arc<Orchestrator>,
    jobs: usize,
    concurrency: usize,
) -> (Duration, Vec<cascade_orchestrator::job::JobRecord>) {
    let start = Instant::now();
    let records = futures::stream::iter(0..jobs)
        .map(|i| {
            let orch = orch.clone();
            async move {
                let id = orch
                    .submit(SubmitRequest::new("bench", json!({"i": i})))
                    .await
                    .unwrap()
                    .id;
                let job = orch.wait(id).await.unwrap();
                assert_eq!(
                    job.state,
                    cascade_orchestrator::job::JobState::Succeeded,
                    "{:?}",
                    job.error
                );
                job
            }
        })
        .buffer_unordered(concurrency)
        .collect::<Vec<_>>()
        .await;
    (start.elapsed(), records)
}

/// Each sub-step's share of its job's time, by kind: from its start in the journal to the next
/// sub-step's start (the last one's to its end).
fn shares(records: &[cascade_orchestrator::job::JobRecord]) -> Times {
    use cascade_orchestrator::job::SubStepKind;
    let mut out = Times::default();
    for r in records {
        let subs = &r.steps[0].sub_steps;
        for (i, s) in subs.iter().enumerate() {
            let end = subs
                .get(i + 1)
                .map(|next| next.started_at)
                .or(s.finished_at)
                .unwrap();
            let d = end.duration_since(s.started_at).unwrap_or_default();
            match s.kind {
                SubStepKind::Turn => out.turns.push(d),
                SubStepKind::ToolCall => out.calls.push(d),
            }
        }
    }
    out
}

/// Median and mean, in µs.
fn stats(samples: &[Duration]) -> (f64, f64) {
    let mut v: Vec<f64> = samples.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    v.sort_by(f64::total_cmp);
    let median = v[v.len() / 2];
    (median, v.iter().sum::<f64>() / v.len() as f64)
}

fn main() {
    let jobs: usize = common::env_or("TOOL_BENCH_JOBS", 200);
    let calls: usize = common::env_or("TOOL_BENCH_CALLS", 20);
    let concurrency: usize = common::env_or("TOOL_BENCH_CONCURRENCY", 16);
    let alone: usize = common::env_or("TOOL_BENCH_ALONE", 10);
    // SAFETY: set before the runtime starts any thread.
    unsafe { std::env::set_var("TOOL_BENCH_KEY", "sk-bench") };
    let per_job = 2 * calls + 1;
    common::runtime().block_on(async move {
        let mcp = serve(axum::Router::new().nest_service("/mcp", service(Arc::new(Echo), Vec::new()))).await;
        let llm = simulated_model(calls).await;
        let url = format!("http://127.0.0.1:{llm}/v1/chat/completions");
        let servers = McpServers::default();
        let config: McpServerConfig =
            serde_json::from_value(json!({"url": format!("http://127.0.0.1:{mcp}/mcp")})).unwrap();
        let refused = servers.declare(
            [("bench".to_string(), config)],
            &cascade_orchestrator::agents::Resources::default(),
        );
        assert!(refused.is_empty());
        let server = servers.get("bench").unwrap();
        server.tools().await.unwrap();
        let http = reqwest::Client::new();

        // Direct rmcp calls, one at a time.
        let n = 2_000;
        let mut direct_calls = Vec::with_capacity(n);
        let start = Instant::now();
        for i in 0..n {
            let mut args = Map::new();
            args.insert("i".into(), json!(i));
            let call = Instant::now();
            server.call("echo", args, "k").await.unwrap();
            direct_calls.push(call.elapsed());
        }
        let direct = start.elapsed() / n as u32;

        // The same conversations by hand: one job alone, then `concurrency` at a time.
        let mut hand_times = Times::default();
        let start = Instant::now();
        let subs = by_hand(&http, &url, &server, "k", &mut hand_times).await;
        assert_eq!(subs, per_job);
        let hand_one = start.elapsed();
        for _ in 1..alone {
            by_hand(&http, &url, &server, "k", &mut hand_times).await;
        }
        let start = Instant::now();
        futures::stream::iter(0..jobs)
            .map(|_| async { by_hand(&http, &url, &server, "k", &mut Times::default()).await })
            .buffer_unordered(concurrency)
            .collect::<Vec<_>>()
            .await;
        let hand_all = start.elapsed();

        let mut rows = Vec::new();
        for store in ["memory", "sqlite"] {
            let dir = tempfile::tempdir().unwrap();
            let mut builder = Orchestrator::builder(model(dir.path(), llm, mcp, calls));
            if store == "sqlite" {
                let mut o = cascade_orchestrator::store::SqliteOptions::new(dir.path().join("cascade.db"));
                o.fsync = false;
                builder = builder.store(Arc::new(cascade_orchestrator::store::SqliteStore::open(o).unwrap()));
            }
            let orch = Arc::new(builder.start().await.unwrap());
            // Warm up (connections, the server's tool list), then one job alone.
            through_cascade(&orch, 2, 2).await;
            let (one, _) = through_cascade(&orch, 1, 1).await;
            // Jobs alone for their journals, each beside as many direct calls and a hand-loop
            // job, so that what they are set against ran on the machine as it was then.
            let (mut records, mut near, mut hand) = (Vec::new(), Vec::new(), Times::default());
            for _ in 0..alone {
                for i in 0..calls {
                    let mut args = Map::new();
                    args.insert("i".into(), json!(i));
                    let call = Instant::now();
                    server.call("echo", args, "k").await.unwrap();
                    near.push(call.elapsed());
                }
                by_hand(&http, &url, &server, "k", &mut hand).await;
                records.extend(through_cascade(&orch, 1, 1).await.1);
            }
            let (all, _) = through_cascade(&orch, jobs, concurrency).await;
            rows.push((store, one, all, shares(&records), near, hand.turns));
        }

        let rate = |d: Duration, n: usize| n as f64 / d.as_secs_f64();
        println!("tool loop: {jobs} jobs × {per_job} sub-steps ({calls} tool calls, {} turns), {concurrency} jobs at a time", calls + 1);
        println!("direct rmcp call: {:.0} µs", direct.as_secs_f64() * 1e6);
        println!(
            "by hand: {:.0} sub-steps/s; one job {:.1} ms ({:.0} µs a sub-step)",
            rate(hand_all, jobs * per_job),
            hand_one.as_secs_f64() * 1e3,
            hand_one.as_secs_f64() * 1e6 / per_job as f64
        );
        let (direct_median, direct_mean) = stats(&direct_calls);
        let (hand_call_median, hand_call_mean) = stats(&hand_times.calls);
        let (hand_turn_median, hand_turn_mean) = stats(&hand_times.turns);
        println!(
            "direct rmcp call: median {direct_median:.0} µs (mean {direct_mean:.0}) over {n}; in the hand loop {hand_call_median:.0} µs (mean {hand_call_mean:.0}); the hand loop's POST to the model {hand_turn_median:.0} µs (mean {hand_turn_mean:.0})"
        );
        for (store, _, _, shares, near, hand_turns) in &rows {
            let (call_median, call_mean) = stats(&shares.calls);
            let (turn_median, turn_mean) = stats(&shares.turns);
            let (near_median, near_mean) = stats(near);
            let (hand_median, hand_mean) = stats(hand_turns);
            println!(
                "cascade ({store} store), {alone} jobs alone, {} tool calls: a tool call sub-step {call_median:.0} µs (mean {call_mean:.0}); direct rmcp calls beside them {near_median:.0} µs (mean {near_mean:.0}): {:+.0} µs a tool call (mean {:+.0})",
                shares.calls.len(),
                call_median - near_median,
                call_mean - near_mean,
            );
            println!(
                "cascade ({store} store), {alone} jobs alone, {} model turns: a turn sub-step {turn_median:.0} µs (mean {turn_mean:.0}); the hand loop's POSTs beside them {hand_median:.0} µs (mean {hand_mean:.0}): {:+.0} µs a turn (mean {:+.0})",
                shares.turns.len(),
                turn_median - hand_median,
                turn_mean - hand_mean,
            );
        }
        for (store, one, all, ..) in rows {
            let added = (one.as_secs_f64() - hand_one.as_secs_f64()) * 1e6 / per_job as f64;
            println!(
                "cascade ({store} store): {:.0} sub-steps/s ({:.2}× the hand loop's time); one job {:.1} ms, {:+.0} µs a sub-step over the hand loop ({:.1}× a direct call's latency)",
                rate(all, jobs * per_job),
                all.as_secs_f64() / hand_all.as_secs_f64(),
                one.as_secs_f64() * 1e3,
                added,
                (added / 1e6 + direct.as_secs_f64()) / direct.as_secs_f64(),
            );
        }
    });
}
