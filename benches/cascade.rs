//! The cascade against naive mode, in one run (`cargo bench --bench cascade`).
//!
//! 1. Quota storm: the 5-step pipeline where `classify` and `draft` share quota `llm` = 200
//!    requests/s (burst 20), every call 20 ms simulated, and the simulated upstream enforces
//!    200/s itself. 4,000 jobs, 512 in flight.
//! 2. Misconfigured quota: the same, with the upstream's real limit at 160/s.
//! 3. Token storm: `tokens_per_minute` with per-call usage drawn from a distribution; the most
//!    tokens spent in any 60-second window vs the limit. Runs on a paused tokio clock (virtual
//!    time), so a six-minute storm takes seconds; what it measures is accounting, not CPU.
//! 4. Propagation latency: a generated DAG of 1,000 agents; time from a quota's exhaustion to
//!    every descendant paused in its scheduler.
//! 5. Fault storm: panics, transient errors, timeouts and 429s under a concurrency quota; every
//!    job must end and every slot come back.
//!
//! Every upstream here is simulated (`kind = "sim"`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use cascade_orchestrator::agents::sim;
use cascade_orchestrator::job::JobState;
use cascade_orchestrator::{Orchestrator, SubmitRequest, config};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde_json::json;

mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

struct StormReport {
    jobs: usize,
    succeeded: usize,
    wall: f64,
    upstream_calls: u64,
    refusals: u64,
    wasted_calls: u64,
    p50: f64,
    p99: f64,
    mean: f64,
    /// CPU time of the process during the storm, in seconds.
    cpu: f64,
}

/// `declared`: the quota `llm` of 200/s in front of the upstream; otherwise no quota at all (the
/// agents draw on their upstream's implicit one).
fn storm_graph(name: &str, upstream: &str, upstream_rps: u32, declared: Option<u32>) -> String {
    let mut s = format!(
        "[graph]\nname = \"{name}\"\nmax_in_flight_jobs = 512\nmax_pending_jobs = 100000\n"
    );
    if let Some(rps) = declared {
        s += &format!("[quotas.llm]\nrequests_per_second = {rps}\nburst = 20\n");
    }
    let names = ["classify", "enrich", "draft", "review", "post"];
    for (i, n) in names.iter().enumerate() {
        s += &format!(
            "[agents.{n}]\nkind = \"sim\"\nlatency = \"20ms\"\nmax_concurrency = 512\n\
             retry = {{ max_attempts = 5, initial_delay = \"50ms\", max_delay = \"2s\" }}\n"
        );
        if i > 0 {
            s += &format!("after = [\"{}\"]\n", names[i - 1]);
        }
        if *n == "classify" || *n == "draft" {
            if declared.is_some() {
                s += "quota = \"llm\"\n";
            }
            s += &format!(
                "upstream = \"{upstream}\"\nupstream_limit = {{ requests_per_second = {upstream_rps}, burst = 20 }}\n"
            );
        }
    }
    s
}

async fn storm(cascade: bool, upstream_rps: u32, jobs: usize, tag: &str) -> StormReport {
    storm_with(cascade, upstream_rps, jobs, tag, Some(200)).await
}

async fn storm_with(
    cascade: bool,
    upstream_rps: u32,
    jobs: usize,
    tag: &str,
    declared: Option<u32>,
) -> StormReport {
    let upstream = format!("storm-{tag}-{}", if cascade { "cascade" } else { "naive" });
    let model = config::parse_graph_str(
        "storm.toml",
        &storm_graph("storm", &upstream, upstream_rps, declared),
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let orch = Arc::new(
        Orchestrator::builder(model)
            .cascade(cascade)
            .start()
            .await
            .expect("start"),
    );
    let (start, cpu) = (Instant::now(), common::cpu_seconds());
    let mut ids = Vec::with_capacity(jobs);
    for i in 0..jobs {
        ids.push(
            orch.submit(SubmitRequest::new("storm", json!({ "n": i })))
                .await
                .expect("submit")
                .id,
        );
    }
    let mut latencies = Vec::with_capacity(jobs);
    let (mut succeeded, mut wasted) = (0, 0u64);
    for id in ids {
        let job = orch.wait(id).await.expect("wait");
        if job.state == JobState::Succeeded {
            succeeded += 1;
            latencies.push(job.run_time().expect("finished").as_secs_f64());
        } else {
            wasted += job.steps.iter().map(|s| s.attempts as u64).sum::<u64>();
        }
    }
    let wall = start.elapsed().as_secs_f64();
    let cpu = common::cpu_seconds() - cpu;
    let up = sim::upstream(orch.registry(), &upstream);
    orch.shutdown(Duration::from_secs(5)).await;
    latencies.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    let pct = |p: f64| {
        latencies
            .get(((latencies.len().max(1) - 1) as f64 * p) as usize)
            .copied()
            .unwrap_or(0.0)
    };
    StormReport {
        jobs,
        succeeded,
        wall,
        upstream_calls: up.calls() + up.refusals(),
        refusals: up.refusals(),
        wasted_calls: wasted,
        p50: pct(0.5),
        p99: pct(0.99),
        mean: latencies.iter().sum::<f64>() / latencies.len().max(1) as f64,
        cpu,
    }
}

fn print_storm(label: &str, r: &StormReport, allowed_jobs_per_sec: f64) {
    let goodput = r.succeeded as f64 / r.wall;
    println!(
        "  {label:<8} goodput {goodput:>6.1} jobs/s ({:>5.1}% of {allowed_jobs_per_sec:.0}) | {}/{} jobs ok | upstream calls {:>6} | refusals {:>5} ({:>6.2}% of calls, {:>7.1} per 1,000 jobs) | calls on unfinished jobs {:>5} | latency p50 {:>6.2}s p99 {:>6.2}s mean {:>6.2}s (p99/mean {:.2}) | drained in {:.1}s | CPU {:.0} µs per job",
        100.0 * goodput / allowed_jobs_per_sec,
        r.succeeded,
        r.jobs,
        r.upstream_calls,
        r.refusals,
        100.0 * r.refusals as f64 / r.upstream_calls.max(1) as f64,
        1000.0 * r.refusals as f64 / r.jobs as f64,
        r.wasted_calls,
        r.p50,
        r.p99,
        r.mean,
        r.p99 / r.mean.max(1e-9),
        r.wall,
        1e6 * r.cpu / r.jobs as f64,
    );
}

/// Token storm on a paused clock: two agents share `tokens_per_minute`; returns the most tokens
/// spent in any 60-second window (by call start) and the largest single call's usage.
fn token_storm(cascade: bool, limit: u64, jobs: usize) -> (u64, u64, f64) {
    let upstream = format!("token-storm-{}", if cascade { "cascade" } else { "naive" });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .start_paused(true)
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let toml = format!(
            "[graph]\nname = \"tokens\"\nmax_in_flight_jobs = 256\nmax_pending_jobs = 100000\n\
             [quotas.llm]\ntokens_per_minute = {limit}\n\
             [agents.summarise]\nkind = \"sim\"\nquota = \"llm\"\nlatency = {{ uniform = [\"200ms\", \"2s\"] }}\n\
             usage = {{ prompt_tokens = [200, 1200], completion_tokens = [50, 400] }}\n\
             upstream = \"{upstream}\"\nrecord_usage = true\n\
             [agents.answer]\nkind = \"sim\"\nquota = \"llm\"\nafter = [\"summarise\"]\nlatency = {{ uniform = [\"200ms\", \"2s\"] }}\n\
             usage = {{ prompt_tokens = [200, 1200], completion_tokens = [50, 400] }}\n\
             upstream = \"{upstream}\"\n"
        );
        let model = config::parse_graph_str("tokens.toml", &toml, &Default::default()).unwrap_or_else(|e| panic!("{e}"));
        let orch = Orchestrator::builder(model).cascade(cascade).start().await.expect("start");
        let start = tokio::time::Instant::now();
        let mut ids = Vec::new();
        for i in 0..jobs {
            ids.push(orch.submit(SubmitRequest::new("tokens", json!({ "n": i }))).await.expect("submit").id);
        }
        for id in ids {
            orch.wait(id).await.expect("wait");
        }
        // What the (simulated) provider saw, on the tokio clock.
        let mut spends = sim::upstream(orch.registry(), &upstream).usage_log();
        let virtual_secs = start.elapsed().as_secs_f64();
        orch.shutdown(Duration::from_secs(5)).await;
        spends.sort();
        let mut worst = 0;
        for (i, (t, _)) in spends.iter().enumerate() {
            let end = *t + Duration::from_secs(60);
            let sum: u64 = spends[i..].iter().take_while(|(u, _)| *u < end).map(|(_, n)| n).sum();
            worst = worst.max(sum);
        }
        let largest = spends.iter().map(|(_, n)| *n).max().unwrap_or(0);
        (worst, largest, virtual_secs)
    })
}

/// A random DAG of `n` agents; quota `q` feeds the first ten. Returns the propagation latency
/// samples (exhaustion → every descendant paused in its scheduler), in microseconds.
async fn propagation(n: usize, rounds: usize) -> Vec<f64> {
    let mut rng = SmallRng::seed_from_u64(7);
    let mut s = "[graph]\nname = \"big\"\n[quotas.q]\nrequests_per_second = 1000\npause_threshold = \"1ms\"\n".to_string();
    for i in 0..n {
        s += &format!("[agents.a{i}]\nkind = \"sim\"\n");
        if i < 10 {
            s += "quota = \"q\"\n";
        } else {
            let a = rng.random_range(0..i);
            let b = rng.random_range(0..i);
            let deps = if a == b {
                format!("\"a{a}\"")
            } else {
                format!("\"a{a}\", \"a{b}\"")
            };
            s += &format!("after = [{deps}]\n");
        }
    }
    let model = config::parse_graph_str("big.toml", &s, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let orch = Orchestrator::builder(model).start().await.expect("start");
    let mut samples = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let t0 = Instant::now();
        orch.exhaust_quota("q", Duration::from_millis(20)).await;
        while orch.paused_agents("big") < n {
            tokio::task::yield_now().await;
        }
        samples.push(t0.elapsed().as_secs_f64() * 1e6);
        // Wait for the resume before the next round.
        while orch.paused_agents("big") > 0 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
    orch.shutdown(Duration::from_secs(1)).await;
    samples.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
    samples
}

/// The fault storm: a 3-agent chain whose middle agent holds a slot of `slots`
/// (`max_concurrency = 64`); every agent panics 1% of the time, fails transiently 2% of the time
/// and sometimes outlasts its 50 ms timeout, and the middle one's upstream refuses above 400/s.
/// Every job must end (none stuck) and every slot come back once the graph is idle.
async fn fault_storm(jobs: usize) {
    sim::quiet_simulated_panics();
    let mut toml = String::from(
        "[graph]\nname = \"faults\"\nmax_in_flight_jobs = 300\nmax_pending_jobs = 100000\n\
         [quotas.slots]\nmax_concurrency = 64\n",
    );
    for (i, name) in ["first", "middle", "last"].iter().enumerate() {
        toml += &format!(
            "[agents.{name}]\nkind = \"sim\"\nlatency = {{ lognormal = {{ median = \"10ms\", sigma = 0.8 }} }}\n\
             timeout = \"50ms\"\npanic_rate = 0.01\ntransient_failure_rate = 0.02\n\
             max_restarts = 100000\nmax_concurrency = 300\n\
             retry = {{ max_attempts = 5, initial_delay = \"5ms\", max_delay = \"100ms\" }}\n"
        );
        if i > 0 {
            toml += &format!("after = [\"{}\"]\n", ["first", "middle"][i - 1]);
        }
        if *name == "middle" {
            toml += "quota = \"slots\"\nupstream = \"faulty\"\n\
                     upstream_limit = { requests_per_second = 400, burst = 20 }\n";
        }
    }
    let model = config::parse_graph_str("faults.toml", &toml, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let orch = Orchestrator::builder(model).start().await.expect("start");
    let start = Instant::now();
    let mut ids = Vec::with_capacity(jobs);
    for i in 0..jobs {
        ids.push(
            orch.submit(SubmitRequest::new("faults", json!({ "n": i })))
                .await
                .expect("submit")
                .id,
        );
    }
    // A job still unfinished 120 s after the last one was submitted counts as stuck.
    let drained = tokio::time::timeout(Duration::from_secs(120), async {
        for &id in &ids {
            orch.wait(id).await.expect("wait");
        }
    })
    .await
    .is_ok();
    let wall = start.elapsed().as_secs_f64();
    let (mut ok, mut failed, mut stuck) = (0, 0, 0);
    for &id in &ids {
        match orch.get(id).expect("store").expect("job").state {
            JobState::Succeeded => ok += 1,
            s if s.is_terminal() => failed += 1,
            _ => stuck += 1,
        }
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let slots = orch
        .quotas()
        .await
        .into_iter()
        .find(|q| q.name == "slots")
        .expect("quota slots");
    let stats = orch.stats("faults").expect("graph");
    let sum = |f: fn(&cascade_orchestrator::runtime::AgentStatsSnapshot) -> u64| {
        stats.agents.iter().map(f).sum::<u64>()
    };
    let up = sim::upstream(orch.registry(), "faulty");
    println!(
        "  {jobs} jobs: {ok} succeeded, {failed} failed, {stuck} stuck (drained: {drained}) in {wall:.1}s | \
         calls {} (re-run as collateral of a restart: {}) | panics {} | restarts {} | retries {} | \
         steps failed for good {} | 429s {} | slots held when idle {} of 64",
        sum(|a| a.calls),
        sum(|a| a.calls).saturating_sub(3 * ok as u64 + sum(|a| a.retries)),
        sum(|a| a.panics),
        sum(|a| a.restarts),
        sum(|a| a.retries),
        sum(|a| a.failures),
        up.refusals(),
        slots.in_flight,
    );
    orch.shutdown(Duration::from_secs(5)).await;
}

fn main() {
    // `CASCADE_BENCH=storm,noquota,misconfigured,toohigh,tokens,propagation,faults` (default: all) picks sections.
    let only = std::env::var("CASCADE_BENCH").unwrap_or_default();
    let run = |name: &str| only.is_empty() || only.split(',').any(|s| s.trim() == name);
    let jobs: usize = common::env_or("STORM_JOBS", 4000);
    let rt = common::runtime();
    rt.block_on(async {
        if run("storm") {
        println!("1. quota storm: {jobs} jobs, 512 in flight, classify+draft share llm = 200/s, upstream enforces 200/s");
        let c = storm(true, 200, jobs, "storm").await;
        print_storm("cascade", &c, 100.0);
        let n = storm(false, 200, jobs, "storm").await;
        print_storm("naive", &n, 100.0);
        }
        if run("noquota") {
        println!("1b. no quota declared: as 1, without [quotas.llm]; classify+draft draw on the implicit upstream:<name> quota");
        let c = storm_with(true, 200, jobs, "noquota", None).await;
        print_storm("cascade", &c, 100.0);
        println!("  p99/p50 {:.2}", c.p99 / c.p50.max(1e-9));
        }
        if run("misconfigured") {

        println!("2. misconfigured quota: as 1, but the upstream's real limit is 160/s while the quota says 200/s");
        let c = storm(true, 160, jobs, "misconf").await;
        print_storm("cascade", &c, 80.0);
        let n = storm(false, 160, jobs, "misconf").await;
        print_storm("naive", &n, 80.0);
        }
        if run("toohigh") {
        println!("2b. quota declared too high: as 1, with llm = 300/s in front of an upstream that enforces 200/s");
        let c = storm_with(true, 200, jobs, "toohigh", Some(300)).await;
        print_storm("cascade", &c, 100.0);
        }
        if run("faults") {
        println!("5. fault storm: 3-agent chain, middle holds a slot of max_concurrency = 64; 1% panics, 2% transient errors, timeouts, 429s above 400/s");
        fault_storm(jobs / 2).await;
        }
        if run("propagation") {

        println!("4. propagation latency: random DAG of 1,000 agents, quota feeding 10 roots, 200 rounds");
        let samples = propagation(1000, 200).await;
        let p = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
        println!("  exhaustion → all 1,000 agents paused: p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs", p(0.5), p(0.99), p(1.0));
        }
    });
    if !run("tokens") {
        return;
    }
    println!(
        "3. token storm (virtual time): tokens_per_minute = 60,000 shared by two agents, usage 250–1,600 per call"
    );
    for cascade in [true, false] {
        let (worst, largest, secs) = token_storm(cascade, 60_000, 600);
        println!(
            "  {:<8} most tokens in any 60 s window {worst:>7} vs limit 60,000 ({:+.1}%), largest call {largest}, over the limit by {} ({:.2} calls), {secs:.0} s of virtual time",
            if cascade { "cascade" } else { "naive" },
            100.0 * (worst as f64 - 60_000.0) / 60_000.0,
            worst.saturating_sub(60_000),
            worst.saturating_sub(60_000) as f64 / largest.max(1) as f64,
        );
    }
}
