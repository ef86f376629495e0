//! `cascade demo`: a real server on the example graphs embedded in the binary (every upstream
//! simulated), and a real gRPC client that submits jobs to it and follows them to the end.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cascade_orchestrator::agents::Registry;
use cascade_orchestrator::api::pb;
use cascade_orchestrator::model::ServerModel;
use cascade_orchestrator::server::{self, ServerOptions};
use cascade_orchestrator::{Orchestrator, config};
use clap::Args;
use futures::StreamExt;
use indicatif::{ProgressBar, ProgressStyle};

use crate::client_cmd::{connect, explain};
use crate::serve_cmd::{StoreChoice, open_store};

const GRAPHS: &[(&str, &str)] = &[
    (
        "support_triage.toml",
        include_str!("../examples/graphs/support_triage.toml"),
    ),
    (
        "fanout.toml",
        include_str!("../examples/graphs/fanout.toml"),
    ),
    (
        "quota_storm.toml",
        include_str!("../examples/graphs/quota_storm.toml"),
    ),
];

#[derive(Args)]
pub struct DemoArgs {
    /// How many support-triage jobs to submit.
    #[arg(long, default_value_t = 1000)]
    jobs: usize,
    #[arg(long, default_value = "127.0.0.1:50051")]
    grpc_addr: std::net::SocketAddr,
    #[arg(long, default_value = "127.0.0.1:8080")]
    http_addr: std::net::SocketAddr,
    /// Where the durable store lives.
    #[arg(long, default_value = "cascade-data")]
    data_dir: PathBuf,
    /// Keep serving after the jobs finish (try `cascade jobs list` in another terminal).
    #[arg(long)]
    serve: bool,
}

/// The embedded example graphs as one server model.
pub fn embedded_model() -> anyhow::Result<ServerModel> {
    let mut model = ServerModel::default();
    for (name, text) in GRAPHS {
        let m = config::parse_graph_str(name, text, &Registry::default())
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        model.graphs.extend(m.graphs);
        model.quotas.extend(m.quotas);
    }
    Ok(model)
}

pub fn run(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(demo(a))
}

async fn demo(a: DemoArgs) -> anyhow::Result<ExitCode> {
    let model = embedded_model()?;
    let store = open_store(&model, &StoreChoice::Sqlite(a.data_dir.clone()))?;
    let orch = Arc::new(
        Orchestrator::builder(model)
            .store(store.clone())
            .start()
            .await?,
    );
    let options = ServerOptions {
        grpc_addr: a.grpc_addr,
        http_addr: a.http_addr,
        ..Default::default()
    };
    let server = server::start(orch.clone(), options).await?;
    let target = format!("http://{}", server.grpc_addr);
    eprintln!(
        "cascade serving support-triage, fanout and quota-storm (simulated upstreams) on grpc://{} and http://{}; store {}",
        server.grpc_addr,
        server.http_addr,
        a.data_dir.join("cascade.db").display()
    );
    let client = connect(&crate::client_cmd::Conn::local(target)).await?;
    let bar = ProgressBar::new(a.jobs as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {bar:40} {pos}/{len} jobs over gRPC  {per_sec}  {msg}",
        )
        .expect("valid template"),
    );
    let start = Instant::now();
    let results: Vec<anyhow::Result<(Duration, pb::Job)>> = futures::stream::iter(0..a.jobs)
        .map(|i| {
            let mut c = client.clone();
            async move {
                let req = pb::SubmitJobRequest {
                    graph: "support-triage".into(),
                    input_json: serde_json::json!({"ticket_id": i, "body": "I was charged twice this month"}).to_string(),
                    idempotency_key: format!("demo-ticket-{i}-{}", std::process::id()),
                    ..Default::default()
                };
                let id = c.submit_job(req).await.map_err(explain)?.into_inner().job_id;
                // When it was accepted, counted from the start of the burst.
                let submit = start.elapsed();
                let mut events = c
                    .watch_job(pb::WatchJobRequest { job_id: id.clone() })
                    .await
                    .map_err(explain)?
                    .into_inner();
                while events.message().await.map_err(explain)?.is_some() {}
                let job = c.get_job(pb::GetJobRequest { job_id: id }).await.map_err(explain)?.into_inner();
                Ok((submit, job))
            }
        })
        .buffer_unordered(1024)
        .inspect(|_| bar.inc(1))
        .collect()
        .await;
    bar.finish_and_clear();
    let wall = start.elapsed();
    let mut accepted_by = Duration::ZERO;
    let mut latencies = Vec::new();
    let (mut ok, mut failed, mut cost, mut tokens) = (0, 0, 0.0, 0);
    for r in results {
        let (submit, job) = r?;
        accepted_by = accepted_by.max(submit);
        if job.state == pb::JobState::Succeeded as i32 {
            ok += 1;
        } else {
            failed += 1;
        }
        // Job latency is over the jobs that succeeded.
        if job.state == pb::JobState::Succeeded as i32
            && let (Some(s), Some(f)) = (&job.started_at, &job.finished_at)
        {
            latencies.push(Duration::from_secs_f64(
                (f.seconds - s.seconds) as f64 + (f.nanos - s.nanos) as f64 / 1e9,
            ));
        }
        if let Some(u) = job.usage {
            cost += u.cost_usd;
            tokens += u.prompt_tokens + u.completion_tokens;
        }
    }
    latencies.sort();
    // Nearest rank: sorted[ceil(p·n) − 1].
    let pct = |v: &[Duration], p: f64| {
        let rank = (p * v.len() as f64).ceil() as usize;
        v.get(rank.max(1) - 1).copied().unwrap_or_default()
    };
    println!(
        "support-triage: {} jobs over gRPC in {:.1}s — {ok} succeeded, {failed} failed",
        a.jobs,
        wall.as_secs_f64()
    );
    // Every job is submitted at once, up to 1,024 in flight: what that measures is how fast a
    // burst is accepted, not one request's latency.
    println!(
        "  a burst of {} submissions, {} at a time: all accepted within {:.0} ms; job latency p50 {:.0} ms, p99 {:.0} ms (succeeded jobs)",
        a.jobs,
        a.jobs.min(1024),
        accepted_by.as_secs_f64() * 1e3,
        pct(&latencies, 0.5).as_secs_f64() * 1e3,
        pct(&latencies, 0.99).as_secs_f64() * 1e3
    );
    println!("  {tokens} tokens, ${cost:.2} (simulated)");
    if let Some(stats) = orch.stats("support-triage") {
        for s in &stats.agents {
            println!(
                "  {:<10} calls {:>6}  retries {:>4}  failures {:>3}  restarts {:>2}",
                s.name, s.calls, s.retries, s.failures, s.restarts
            );
        }
    }
    if a.serve {
        eprintln!(
            "still serving; try `cascade jobs list` or `cascade graph status support-triage`; Ctrl-C to stop"
        );
        let _ = tokio::signal::ctrl_c().await;
    }
    server.stop().await;
    orch.shutdown(Duration::from_secs(10)).await;
    store.flush().await?;
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}
