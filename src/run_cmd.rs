//! `cascade run`: load one graph file, run N jobs of it in this process, report.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use cascade_orchestrator::agents::Registry;
use cascade_orchestrator::job::JobState;
use cascade_orchestrator::model::ServerModel;
use cascade_orchestrator::quota::QuotaSnapshot;
use cascade_orchestrator::runtime::GraphStatsSnapshot;
use cascade_orchestrator::{Orchestrator, SubmitError, SubmitRequest, config};
use clap::Args;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use serde_json::Value;

#[derive(Args)]
pub struct RunArgs {
    /// The graph file to run.
    graph: PathBuf,
    /// The job input: JSON text, or @FILE to read it from a file.
    #[arg(long, default_value = "{}")]
    input: String,
    /// How many jobs to run.
    #[arg(long, default_value_t = 1)]
    jobs: usize,
    /// How many jobs may run at once (overrides the graph's max_in_flight_jobs).
    #[arg(long)]
    concurrency: Option<usize>,
    /// A server config (cascade.toml) whose shared quotas the graph may use.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Naive mode: keep each agent's local rate limits but propagate no pause and retry 429s with
    /// each agent's backoff policy — how most frameworks behave. For comparison.
    #[arg(long)]
    no_cascade: bool,
    /// Print the summary as JSON on stdout.
    #[arg(long)]
    json: bool,
    /// No progress bar.
    #[arg(long)]
    quiet: bool,
}

/// How long `cascade run` waits on a failing credential before it gives up: longer than the
/// first few probes (1, 2, 4, 8 s) and a short outage of an authorization server.
const CREDENTIAL_PATIENCE: Duration = Duration::from_secs(20);

/// An agent of `graph` paused on a credential's quota, said as "agent X is paused on
/// credential:Y (reason)".
async fn failing_credential(orch: &Orchestrator, graph: &str) -> Option<String> {
    use cascade_orchestrator::signal::CauseKey;
    for (agent, pause) in orch.pauses(graph).await? {
        for (key, info) in pause.iter().flat_map(|p| &p.causes) {
            if let CauseKey::Quota { quota } = key
                && quota.starts_with(cascade_orchestrator::model::QuotaModel::CREDENTIAL_PREFIX)
            {
                return Some(format!(
                    "agent {agent} is paused on {quota} ({})",
                    info.reason
                ));
            }
        }
    }
    None
}

pub fn run(args: RunArgs, json_logs: bool) -> anyhow::Result<ExitCode> {
    let input = read_input(&args.input)?;
    if args.jobs == 0 {
        bail!("--jobs must be at least 1");
    }
    let model = match config::load(
        args.config.as_deref(),
        std::slice::from_ref(&args.graph),
        &Registry::default(),
    ) {
        Ok(m) => m,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::FAILURE);
        }
    };
    // A --config with [telemetry] exports the run's traces as `serve` would.
    let telemetry = model.telemetry.clone();
    crate::block_on_traced(json_logs, &telemetry, run_async(args, input, model))
}

fn read_input(arg: &str) -> anyhow::Result<Value> {
    let text = match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read input file {path}"))?,
        None => arg.to_string(),
    };
    serde_json::from_str(&text).context(
        "--input is not valid JSON (pass JSON text such as '{\"ticket_id\": 1}', or @file.json)",
    )
}

async fn run_async(
    args: RunArgs,
    input: Value,
    mut model: ServerModel,
) -> anyhow::Result<ExitCode> {
    let graph_index = model
        .graphs
        .iter()
        .position(|g| g.source == args.graph)
        .context("the file defines no graph")?;
    if let Some(c) = args.concurrency {
        let c = std::num::NonZeroUsize::new(c).context("--concurrency must be at least 1")?;
        Arc::make_mut(&mut model.graphs[graph_index]).max_in_flight_jobs = c;
    }
    let graph = model.graphs[graph_index].clone();
    let orch = Arc::new(
        Orchestrator::builder(model)
            .cascade(!args.no_cascade)
            .start()
            .await?,
    );

    let bar = if args.quiet || args.json {
        ProgressBar::hidden()
    } else {
        ProgressBar::new(args.jobs as u64)
    };
    bar.set_style(
        ProgressStyle::with_template(
            "{spinner} {bar:40} {pos}/{len} jobs  {per_sec}  eta {eta}  {msg}",
        )
        .expect("valid template"),
    );
    let started = Instant::now();
    let (ids_tx, mut ids_rx) = tokio::sync::mpsc::channel(1024);
    let submitter = {
        let orch = orch.clone();
        let name = graph.name.to_string();
        tokio::spawn(async move {
            let mut backoffs = 0u64;
            for n in 0..args.jobs {
                loop {
                    // Job n's key is `run-<n>`: a seeded simulation draws by it, so two runs
                    // fail the same keys whatever the timing (`failed_keys`).
                    let req = SubmitRequest::new(&name, input.clone())
                        .idempotency_key(format!("run-{n}"));
                    match orch.submit(req).await {
                        Ok(s) => {
                            if ids_tx.send(s.id).await.is_err() {
                                return Ok(backoffs);
                            }
                            break;
                        }
                        // The graph's backlog is full: wait as told, like a well-behaved client.
                        Err(SubmitError::Overloaded { retry_after, .. }) => {
                            backoffs += 1;
                            tokio::time::sleep(retry_after.min(Duration::from_millis(200))).await;
                        }
                        Err(e) => return Err(anyhow::Error::new(e)),
                    }
                }
            }
            Ok::<u64, anyhow::Error>(backoffs)
        })
    };
    let mut waits = FuturesUnordered::new();
    let mut latencies = Vec::with_capacity(args.jobs);
    let mut failed_latencies = Vec::new();
    let mut failures: Vec<String> = Vec::new();
    let mut failed_keys: Vec<String> = Vec::new();
    let (mut succeeded, mut failed, mut steps, mut parked) = (0usize, 0usize, 0usize, 0usize);
    let mut open = true;
    // A credential that fails (refused, or unable to get a token) pauses its agents until it
    // works again, which in a one-shot run nobody can bring about: failing this long, with no
    // job succeeding meanwhile, ends the run with an error naming it. (Between its probes the
    // pause lifts for a moment: only five seconds without it count as over.)
    let mut watch = tokio::time::interval(Duration::from_secs(1));
    let mut credential_failing: Option<(Instant, Instant)> = None;
    while open || !waits.is_empty() {
        tokio::select! {
            _ = watch.tick() => {
                match failing_credential(&orch, &graph.name).await {
                    Some(why) => {
                        let now = Instant::now();
                        let (since, _) = *credential_failing.insert(
                            credential_failing.map_or((now, now), |(since, _)| (since, now)),
                        );
                        if since.elapsed() >= CREDENTIAL_PATIENCE {
                            bar.finish_and_clear();
                            orch.shutdown(Duration::from_secs(5)).await;
                            bail!(
                                "{why} for {}s: a one-shot run cannot wait for it to be fixed, so it stops (the log says why the credential failed; under `cascade serve` the jobs would wait and go on once it works)",
                                CREDENTIAL_PATIENCE.as_secs()
                            );
                        }
                    }
                    None => {
                        if credential_failing
                            .is_some_and(|(_, seen)| seen.elapsed() >= Duration::from_secs(5))
                        {
                            credential_failing = None;
                        }
                    }
                }
            }
            id = ids_rx.recv(), if open => match id {
                Some(id) => {
                    let orch = orch.clone();
                    // A job parked for a decision or a budget ends this run's wait: nobody can
                    // decide in a one-shot run.
                    waits.push(async move { orch.wait_settled(id).await });
                }
                None => open = false,
            },
            Some(done) = waits.next() => {
                let job = done?;
                steps += job.steps.iter().filter(|s| s.state == cascade_orchestrator::job::StepState::Succeeded).count();
                let took = job.run_time();
                if job.state.is_parked() {
                    parked += 1;
                    bar.inc(1);
                    continue;
                }
                if job.state == JobState::Succeeded {
                    succeeded += 1;
                    credential_failing = None;
                    latencies.extend(took);
                } else {
                    failed += 1;
                    failed_latencies.extend(took);
                    failed_keys.extend(job.idempotency_key.clone());
                    if failures.len() < 5 {
                        failures.push(format!("{} {}: {}", job.id, job.state, job.error.unwrap_or_default()));
                    }
                    bar.set_message(format!("{failed} failed"));
                }
                bar.inc(1);
            }
        }
    }
    let backoffs = submitter.await??;
    let wall = started.elapsed();
    bar.finish_and_clear();
    let stats = orch.stats(&graph.name).expect("graph exists");
    let quotas = orch.quotas().await;
    orch.shutdown(Duration::from_secs(5)).await;

    failed_keys.sort();
    let ms = |d: Option<Duration>| d.map(|d| d.as_secs_f64() * 1e3);
    let secs = wall.as_secs_f64();
    let summary = Summary {
        graph: graph.name.to_string(),
        jobs: args.jobs,
        succeeded,
        failed,
        parked,
        wall_seconds: secs,
        jobs_per_second: succeeded as f64 / secs,
        failed_per_second: failed as f64 / secs,
        steps_per_second: steps as f64 / secs,
        latency_p50_ms: ms(nearest_rank(&mut latencies, 0.50)),
        latency_p99_ms: ms(nearest_rank(&mut latencies, 0.99)),
        failed_latency_p50_ms: ms(nearest_rank(&mut failed_latencies, 0.50)),
        failed_latency_p99_ms: ms(nearest_rank(&mut failed_latencies, 0.99)),
        submit_backoffs: backoffs,
        failed_keys,
        first_failures: failures,
        cascade: !args.no_cascade,
        stats,
        quotas,
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&summary)?);
    } else {
        print_summary(&summary);
    }
    Ok(if failed == 0 && parked == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

/// The `p` quantile by nearest rank: `sorted[ceil(p·n) − 1]`; none of nothing.
fn nearest_rank(samples: &mut [Duration], p: f64) -> Option<Duration> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let rank = (p * samples.len() as f64).ceil() as usize;
    Some(samples[rank.clamp(1, samples.len()) - 1])
}

#[derive(Serialize)]
struct Summary {
    graph: String,
    jobs: usize,
    succeeded: usize,
    failed: usize,
    /// Jobs left waiting for an approval or a larger budget (a one-shot run decides nothing).
    parked: usize,
    wall_seconds: f64,
    /// Succeeded jobs per second of the run: a failed job is not throughput.
    jobs_per_second: f64,
    failed_per_second: f64,
    /// Steps that succeeded, per second.
    steps_per_second: f64,
    /// Over succeeded jobs (null when none did).
    latency_p50_ms: Option<f64>,
    latency_p99_ms: Option<f64>,
    /// Over failed jobs (null when none failed).
    failed_latency_p50_ms: Option<f64>,
    failed_latency_p99_ms: Option<f64>,
    /// Times the submitter was told to slow down (RESOURCE_EXHAUSTED) and waited.
    submit_backoffs: u64,
    /// Every failed job's idempotency key (job n's is `run-<n>`), sorted.
    failed_keys: Vec<String>,
    first_failures: Vec<String>,
    cascade: bool,
    stats: GraphStatsSnapshot,
    quotas: Vec<QuotaSnapshot>,
}

fn print_summary(s: &Summary) {
    println!(
        "{}: {} jobs in {:.2}s — {} succeeded, {} failed",
        s.graph, s.jobs, s.wall_seconds, s.succeeded, s.failed
    );
    let ms = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.1} ms"));
    println!(
        "  {:.0} jobs/s succeeded, {:.0} steps/s, job latency p50 {}, p99 {}",
        s.jobs_per_second,
        s.steps_per_second,
        ms(s.latency_p50_ms),
        ms(s.latency_p99_ms)
    );
    if s.failed > 0 {
        println!(
            "  {:.1} jobs/s failed, failed job latency p50 {}, p99 {}",
            s.failed_per_second,
            ms(s.failed_latency_p50_ms),
            ms(s.failed_latency_p99_ms)
        );
    }
    if s.parked > 0 {
        println!(
            "  {} jobs stopped for an approval or a budget: a one-shot run cannot decide; serve the graph (cascade serve) to approve, or raise budgets",
            s.parked
        );
    }
    if s.submit_backoffs > 0 {
        println!(
            "  submission was told to slow down {} times (backlog full)",
            s.submit_backoffs
        );
    }
    println!();
    println!(
        "  {:<16} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10} {:>12} {:>10}",
        "agent", "calls", "retries", "failed", "429s", "restarts", "mean ms", "tokens", "cost $"
    );
    for a in &s.stats.agents {
        println!(
            "  {:<16} {:>9} {:>8} {:>8} {:>8} {:>8} {:>10.1} {:>12} {:>10.4}",
            a.name,
            a.calls,
            a.retries,
            a.failures,
            a.rate_limited,
            a.restarts,
            a.mean_call_ms,
            a.prompt_tokens + a.completion_tokens,
            a.cost_usd
        );
    }
    if !s.quotas.is_empty() {
        // Implicit quotas are named after their upstream (`upstream:graph.agent`): make room.
        let w = s
            .quotas
            .iter()
            .map(|q| q.name.len())
            .max()
            .unwrap_or(0)
            .max(16);
        println!();
        println!(
            "  {:<w$} {:>9} {:>9} {:>11} {:>12} {:>10}  (cascade {})",
            "quota",
            "granted",
            "refused",
            "exhausted",
            "tokens",
            "rate ×",
            if s.cascade { "on" } else { "off" }
        );
        for q in &s.quotas {
            println!(
                "  {:<w$} {:>9} {:>9} {:>11} {:>12} {:>10.2}",
                q.name,
                q.granted,
                q.refusals,
                q.exhaustions,
                q.prompt_tokens + q.completion_tokens,
                q.effective_rate_multiplier
            );
        }
    }
    for f in &s.first_failures {
        println!("  failed: {f}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank_picks_the_ceiling_rank() {
        let ms = Duration::from_millis;
        let mut v: Vec<Duration> = (1..=10).rev().map(ms).collect();
        assert_eq!(nearest_rank(&mut v, 0.50), Some(ms(5)));
        assert_eq!(nearest_rank(&mut v, 0.99), Some(ms(10)));
        assert_eq!(nearest_rank(&mut v, 0.0), Some(ms(1)));
        let mut two = vec![ms(7), ms(3)];
        assert_eq!(nearest_rank(&mut two, 0.50), Some(ms(3)));
        assert_eq!(nearest_rank(&mut [], 0.5), None);
    }
}
