//! Engine throughput: Cascade vs. the same steps as plain tokio tasks chained by channels.
//!
//! Zero-latency simulated agents, the in-memory store, in-process submission. For the 5-step
//! pipeline and the 12-node fan-out it prints jobs/s and steps/s for both, and their ratio, from one
//! run on one machine (figures on this shared machine are noisy: compare the ratio). It also reports
//! the memory held per in-flight job.
//!
//! `cargo bench --bench engine` (set `ENGINE_BENCH_JOBS` to change the job count,
//! `ENGINE_BENCH=observability` to measure only the cost of observability, `ENGINE_BENCH=engine` only the
//! throughput against plain tokio, `ENGINE_BENCH=rss` only RSS against jobs run, up to `ENGINE_BENCH_RSS_JOBS`, default 1,000,000;
//! to find what grows, `ENGINE_BENCH_RETAIN` sets the store's retention, `ENGINE_BENCH_METRICS=0`
//! and `ENGINE_BENCH_CASCADE=0` turn metrics and the cascade off; `ENGINE_BENCH_NO_IMPLICIT=1` runs
//! the agents without their upstreams' implicit quotas, to see what the broker round trip costs).

use std::alloc::{GlobalAlloc, Layout};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::time::{Duration, Instant};

use cascade_orchestrator::agents::{Agent, AgentSpec, CallContext, Registry, StepInput};
use cascade_orchestrator::model::{GraphModel, ServerModel, TelemetrySettings};
use cascade_orchestrator::store::MemoryStore;
use cascade_orchestrator::{Orchestrator, SubmitRequest, config, telemetry};
use serde_json::{Value, json};
use tokio::sync::mpsc;

mod common;

/// The `cascade` binary's allocator, wrapped to count the bytes in use (for memory per job).
struct CountingAlloc;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);
/// Counting costs a contended atomic per allocation: only while memory is measured.
static COUNTING: AtomicBool = AtomicBool::new(false);

unsafe impl GlobalAlloc for CountingAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if COUNTING.load(Relaxed) {
            ALLOCATED.fetch_add(layout.size(), Relaxed);
        }
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if COUNTING.load(Relaxed) {
            ALLOCATED.fetch_sub(layout.size(), Relaxed);
        }
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if COUNTING.load(Relaxed) {
            ALLOCATED.fetch_add(new_size, Relaxed);
            ALLOCATED.fetch_sub(layout.size(), Relaxed);
        }
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static GLOBAL: CountingAlloc = CountingAlloc;

fn pipeline_toml(latency: Option<&str>) -> String {
    let lat = latency
        .map(|l| format!("latency = \"{l}\"\n"))
        .unwrap_or_default();
    let mut s =
        "[graph]\nname = \"pipeline\"\nmax_in_flight_jobs = 2048\nmax_pending_jobs = 10000000\n"
            .to_string();
    let names = ["classify", "enrich", "draft", "review", "post"];
    for (i, n) in names.iter().enumerate() {
        s += &format!("[agents.{n}]\nkind = \"sim\"\nmax_concurrency = 512\n{lat}");
        if i > 0 {
            s += &format!("after = [\"{}\"]\n", names[i - 1]);
        }
    }
    s
}

fn fanout_toml() -> String {
    let mut s = "[graph]\nname = \"fanout\"\nmax_in_flight_jobs = 2048\nmax_pending_jobs = 10000000\n[agents.entry]\nkind = \"sim\"\nmax_concurrency = 512\n".to_string();
    for b in 1..=5 {
        s += &format!(
            "[agents.fetch_{b}]\nkind = \"sim\"\nmax_concurrency = 512\nafter = [\"entry\"]\n"
        );
        s += &format!(
            "[agents.score_{b}]\nkind = \"sim\"\nmax_concurrency = 512\nafter = [\"fetch_{b}\"]\n"
        );
    }
    s += "[agents.join]\nkind = \"sim\"\nmax_concurrency = 512\nafter = [\"score_1\", \"score_2\", \"score_3\", \"score_4\", \"score_5\"]\n";
    s
}

fn model(toml: &str) -> ServerModel {
    let mut m = config::parse_graph_str("bench.toml", toml, &Registry::default())
        .unwrap_or_else(|e| panic!("{e}"));
    if std::env::var_os("ENGINE_BENCH_NO_IMPLICIT").is_some() {
        for g in &mut m.graphs {
            for a in &mut Arc::make_mut(g).agents {
                a.quotas.retain(|q| !q.starts_with("upstream:"));
            }
        }
    }
    m
}

/// Submit `jobs` jobs and wait until all have finished; returns the wall time.
async fn run_cascade(model: ServerModel, jobs: usize) -> Duration {
    run_cascade_with(model, jobs, true).await
}

async fn run_cascade_with(model: ServerModel, jobs: usize, metrics: bool) -> Duration {
    let graph = model.graphs[0].name.to_string();
    let orch = Orchestrator::builder(model)
        .metrics(metrics)
        .store(Arc::new(MemoryStore::with_retention(10_000)))
        .start()
        .await
        .expect("start");
    let start = Instant::now();
    for i in 0..jobs {
        orch.submit(SubmitRequest::new(&graph, json!({ "n": i })))
            .await
            .expect("submit");
    }
    // A run that stops making progress is a defect to report, not a bench to wait on.
    let (mut last_done, mut last_change) = (0, Instant::now());
    loop {
        let s = orch.stats(&graph).expect("graph");
        let done = s.jobs_succeeded + s.jobs_failed;
        if done as usize >= jobs {
            assert_eq!(s.jobs_failed, 0);
            break;
        }
        if done != last_done {
            (last_done, last_change) = (done, Instant::now());
        } else if last_change.elapsed() > Duration::from_secs(20) {
            panic!("no job finished for 20 s: {done} of {jobs} done; {s:#?}");
        }
        tokio::time::sleep(Duration::from_micros(500)).await;
    }
    let elapsed = start.elapsed();
    orch.shutdown(Duration::from_secs(5)).await;
    elapsed
}

fn sim_agent(graph: &str, name: &str) -> Arc<dyn Agent> {
    let fields = serde_json::Map::new();
    let registry = Registry::default();
    registry
        .build(
            "sim",
            &AgentSpec {
                graph,
                name,
                fields: &fields,
                resources: registry.resources(),
            },
        )
        .expect("sim agent")
}

/// Outputs of a step's dependencies, by agent name.
type Deps = Vec<(Arc<str>, Arc<Value>)>;

struct Msg {
    job: usize,
    input: Arc<Value>,
    deps: Deps,
}

/// One stage: call the agent for every message, send the output on to every next stage.
fn stage(
    graph: &'static str,
    name: &'static str,
    mut rx: mpsc::Receiver<Msg>,
    next: Vec<mpsc::Sender<Msg>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let agent = sim_agent(graph, name);
        let name_arc: Arc<str> = name.into();
        while let Some(m) = rx.recv().await {
            let ctx = CallContext {
                job_id: m.job.to_string().into(),
                graph: graph.into(),
                agent: name_arc.clone(),
                attempt: 1,
                idempotency_key: format!("{}/{name}", m.job).into(),
                deadline: None,
                job_key: None,
            };
            let input = StepInput {
                input: m.input.clone(),
                deps: m.deps,
            };
            let out = Arc::new(agent.call(&ctx, &input).await.expect("sim call").value);
            for tx in &next {
                let _ = tx
                    .send(Msg {
                        job: m.job,
                        input: m.input.clone(),
                        deps: vec![(name_arc.clone(), out.clone())],
                    })
                    .await;
            }
        }
    })
}

/// The 5-step pipeline as five tasks chained by bounded channels.
async fn run_baseline_pipeline(jobs: usize) -> Duration {
    let names = ["classify", "enrich", "draft", "review", "post"];
    let (done_tx, mut done_rx) = mpsc::channel::<Msg>(1024);
    let mut next = vec![done_tx];
    let mut first = None;
    for n in names.iter().rev() {
        let (tx, rx) = mpsc::channel(1024);
        stage("pipeline", n, rx, next);
        next = vec![tx.clone()];
        first = Some(tx);
    }
    feed_and_wait(first.expect("stages"), &mut done_rx, jobs).await
}

/// Send `jobs` jobs into the first stage and wait for as many results; returns the wall time.
async fn feed_and_wait(
    first: mpsc::Sender<Msg>,
    done_rx: &mut mpsc::Receiver<Msg>,
    jobs: usize,
) -> Duration {
    let start = Instant::now();
    let feeder = tokio::spawn(async move {
        for i in 0..jobs {
            first
                .send(Msg {
                    job: i,
                    input: Arc::new(json!({ "n": i })),
                    deps: vec![],
                })
                .await
                .expect("send");
        }
    });
    for _ in 0..jobs {
        done_rx.recv().await.expect("result");
    }
    feeder.await.expect("feeder");
    start.elapsed()
}

/// The fan-out: entry → 5 × (fetch → score) → join, as tasks and channels; the join task gathers
/// the five branch outputs per job.
async fn run_baseline_fanout(jobs: usize) -> Duration {
    let (done_tx, mut done_rx) = mpsc::channel::<Msg>(1024);
    let (join_tx, mut join_rx) = mpsc::channel::<Msg>(4096);
    let join = tokio::spawn(async move {
        let agent = sim_agent("fanout", "join");
        let mut partial: HashMap<usize, Deps> = HashMap::new();
        while let Some(m) = join_rx.recv().await {
            let deps = partial.entry(m.job).or_default();
            deps.extend(m.deps);
            if deps.len() == 5 {
                let deps = partial.remove(&m.job).expect("present");
                let ctx = CallContext {
                    job_id: m.job.to_string().into(),
                    graph: "fanout".into(),
                    agent: "join".into(),
                    attempt: 1,
                    idempotency_key: format!("{}/join", m.job).into(),
                    deadline: None,
                    job_key: None,
                };
                let out = agent
                    .call(
                        &ctx,
                        &StepInput {
                            input: m.input.clone(),
                            deps,
                        },
                    )
                    .await
                    .expect("join");
                let _ = done_tx
                    .send(Msg {
                        job: m.job,
                        input: m.input,
                        deps: vec![("join".into(), Arc::new(out.value))],
                    })
                    .await;
            }
        }
    });
    const FETCH: [&str; 5] = ["fetch_1", "fetch_2", "fetch_3", "fetch_4", "fetch_5"];
    const SCORE: [&str; 5] = ["score_1", "score_2", "score_3", "score_4", "score_5"];
    let mut fetch_txs = Vec::new();
    for b in 0..5 {
        let (score_tx, score_rx) = mpsc::channel(1024);
        stage("fanout", SCORE[b], score_rx, vec![join_tx.clone()]);
        let (fetch_tx, fetch_rx) = mpsc::channel(1024);
        stage("fanout", FETCH[b], fetch_rx, vec![score_tx]);
        fetch_txs.push(fetch_tx);
    }
    drop(join_tx);
    let (entry_tx, entry_rx) = mpsc::channel(1024);
    stage("fanout", "entry", entry_rx, fetch_txs);
    let took = feed_and_wait(entry_tx, &mut done_rx, jobs).await;
    drop(join);
    took
}

/// Memory per in-flight job: hold `n` jobs in flight (agents that sleep) and compare the bytes
/// allocated before and after.
async fn memory_per_in_flight_job(n: usize) -> f64 {
    // Calls that never answer keep an unknown upstream's implicit quota in slow start (16 calls
    // in flight); a declared quota with room for every job holds them all, each with its grant.
    let toml = pipeline_toml(Some("1h"))
        .replace("kind = \"sim\"\n", "kind = \"sim\"\nquota = \"sim\"\n")
        + &format!("[quotas.sim]\nmax_concurrency = {n}\n");
    let mut m = model(&toml);
    let g: &mut GraphModel = Arc::make_mut(&mut m.graphs[0]);
    g.max_in_flight_jobs = std::num::NonZeroUsize::new(n).expect("n > 0");
    for a in &mut g.agents {
        a.max_concurrency = std::num::NonZeroU32::new(n as u32).expect("n > 0");
    }
    let orch = Orchestrator::builder(m).start().await.expect("start");
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Frees of blocks allocated before counting began would make the count wrap: count from a
    // large base and compare.
    ALLOCATED.store(1 << 40, Relaxed);
    COUNTING.store(true, Relaxed);
    let before = ALLOCATED.load(Relaxed);
    for i in 0..n {
        orch.submit(SubmitRequest::new("pipeline", json!({ "n": i })))
            .await
            .expect("submit");
    }
    let waiting = Instant::now();
    loop {
        let snap = orch.scheduler_snapshot("pipeline").await.expect("snapshot");
        if snap.agents[0].in_flight as usize >= n {
            break;
        }
        assert!(
            waiting.elapsed() < Duration::from_secs(60),
            "{n} jobs submitted, not all in flight after 60 s: {snap:#?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = ALLOCATED.load(Relaxed);
    COUNTING.store(false, Relaxed);
    orch.shutdown(Duration::ZERO).await;
    after.saturating_sub(before) as f64 / n as f64
}

/// RSS against jobs run: the zero-latency 5-step pipeline as `cascade run` runs it (in-memory
/// store with its default retention of 100,000 finished jobs, 256 jobs in flight), with RSS read
/// at each checkpoint. Past the retention, RSS must stay flat; below it, the bytes allocated per
/// retained finished job are what a job costs the store.
async fn rss_versus_jobs(checkpoints: &[usize]) {
    let mut m = model(&pipeline_toml(None));
    Arc::make_mut(&mut m.graphs[0]).max_in_flight_jobs =
        std::num::NonZeroUsize::new(256).expect("256");
    let metrics = common::env_or("ENGINE_BENCH_METRICS", 1) != 0;
    let retain = common::env_or("ENGINE_BENCH_RETAIN", 100_000);
    let orch = Orchestrator::builder(m)
        .metrics(metrics)
        .cascade(common::env_or("ENGINE_BENCH_CASCADE", 1) != 0)
        .store(Arc::new(MemoryStore::with_retention(retain)))
        .start()
        .await
        .expect("start");
    let total = *checkpoints.last().expect("checkpoints");
    ALLOCATED.store(1 << 40, Relaxed);
    COUNTING.store(true, Relaxed);
    let base_alloc = ALLOCATED.load(Relaxed);
    let base_rss = common::rss_bytes();
    let mut next = checkpoints.iter().copied().peekable();
    let mut first_rss = None;
    let start = Instant::now();
    // Submissions run ahead of the finished jobs by at most this many (they wait in the store).
    let ahead = 4096;
    let mut submitted = 0;
    let finished = |orch: &Orchestrator| {
        let s = orch.stats("pipeline").expect("graph");
        (s.jobs_succeeded + s.jobs_failed) as usize
    };
    while let Some(&at) = next.peek() {
        let done = finished(&orch);
        while submitted < total && submitted < done + ahead {
            orch.submit(SubmitRequest::new("pipeline", json!({ "n": submitted })))
                .await
                .expect("submit");
            submitted += 1;
        }
        if done >= at {
            next.next();
            let rss = common::rss_bytes();
            let retained = done.min(retain).max(1);
            let per_job =
                (ALLOCATED.load(Relaxed).saturating_sub(base_alloc)) as f64 / retained as f64;
            let first = *first_rss.get_or_insert(rss);
            println!(
                "  {done:>9} jobs  {:>7.0} jobs/s  RSS {:>7.1} MiB ({:+6.1} MiB since 100k)  allocated per retained job {:>6.0} B",
                done as f64 / start.elapsed().as_secs_f64(),
                rss as f64 / 1048576.0,
                (rss as f64 - first as f64) / 1048576.0,
                per_job,
            );
            continue;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    COUNTING.store(false, Relaxed);
    println!(
        "  (RSS before the first job: {:.1} MiB)",
        base_rss as f64 / 1048576.0
    );
    orch.shutdown(Duration::from_secs(5)).await;
}

/// A stand-in OTLP/gRPC collector on 127.0.0.1, on a thread and runtime of its own (as a local
/// collector would be a process of its own); it counts the spans it receives.
fn start_collector() -> (u16, Arc<AtomicUsize>) {
    use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
        TraceService, TraceServiceServer,
    };
    use opentelemetry_proto::tonic::collector::trace::v1::{
        ExportTraceServiceRequest, ExportTraceServiceResponse,
    };
    struct Counter(Arc<AtomicUsize>);
    #[tonic::async_trait]
    impl TraceService for Counter {
        async fn export(
            &self,
            request: tonic::Request<ExportTraceServiceRequest>,
        ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
            let n: usize = request
                .get_ref()
                .resource_spans
                .iter()
                .flat_map(|r| &r.scope_spans)
                .map(|s| s.spans.len())
                .sum();
            self.0.fetch_add(n, Relaxed);
            Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
        }
    }
    let spans = Arc::new(AtomicUsize::new(0));
    let counter = Counter(spans.clone());
    let (port_tx, port_rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("collector runtime");
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            port_tx
                .send(listener.local_addr().expect("addr").port())
                .expect("port");
            tonic::transport::Server::builder()
                .add_service(TraceServiceServer::new(counter))
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .expect("collector");
        });
    });
    (port_rx.recv().expect("collector port"), spans)
}

/// One pipeline run in this process with observability off, on (metrics and INFO job spans to a
/// log subscriber), otlp (metrics, and job and step spans exported to a collector) or
/// otlp-sampled (the same for one job in ten); prints jobs/s and the spans the collector received.
fn observability_child(mode: &str, jobs: usize) {
    let rt = common::runtime();
    let (mut telemetry, mut received) = (None, None);
    let mut settings = TelemetrySettings::default();
    match mode {
        // What `cascade serve` installs, with RUST_LOG=info from the parent: job spans are live.
        "on" => telemetry::init(false, None).expect("telemetry").shutdown(),
        _ if mode.starts_with("otlp") => {
            let (port, spans) = start_collector();
            settings.otlp_endpoint = Some(format!("http://127.0.0.1:{port}"));
            if mode == "otlp-sampled" {
                settings.sample_ratio = 0.1;
            }
            let _in_runtime = rt.enter();
            telemetry = Some(telemetry::init(false, Some(&settings)).expect("telemetry"));
            received = Some(spans);
        }
        _ => {}
    }
    let on = mode != "off";
    // The subscriber and the orchestrator read the same settings, as `cascade serve` does.
    let traced_model = || {
        let mut m = model(&pipeline_toml(None));
        m.telemetry = settings.clone();
        m
    };
    let took = rt.block_on(async {
        run_cascade_with(traced_model(), jobs / 10, on).await;
        run_cascade_with(traced_model(), jobs, on).await
    });
    if let Some(t) = telemetry {
        t.shutdown();
    }
    let spans = received.map_or(0, |r| r.load(Relaxed));
    println!("{} {spans}", jobs as f64 / took.as_secs_f64());
}

/// Rounds of the observability comparison; each runs every mode once, in its own process.
const OBSERVABILITY_ROUNDS: usize = 5;

/// The cost of observability: a recorder, once installed, stays for the process, so each run is
/// a process of its own; the modes alternate round by round.
fn observability_cost(jobs: usize) {
    let exe = std::env::current_exe().expect("bench binary");
    let modes = ["off", "on", "otlp", "otlp-sampled"];
    // (jobs/s, spans received) per mode, one entry per round.
    let mut runs: [Vec<(f64, usize)>; 4] = Default::default();
    for _ in 0..OBSERVABILITY_ROUNDS {
        for (i, mode) in modes.into_iter().enumerate() {
            let out = std::process::Command::new(&exe)
                .env("ENGINE_OBS_CHILD", mode)
                // Job spans live in the logs for "on"; the OTLP runs keep the default log level.
                .env("RUST_LOG", if mode == "on" { "info" } else { "warn" })
                .env("ENGINE_BENCH_JOBS", jobs.to_string())
                .output()
                .expect("child run");
            let text = String::from_utf8_lossy(&out.stdout);
            let last = text.trim().lines().last().unwrap_or_default().to_string();
            let mut fields = last.split_whitespace();
            let rate = fields.next().and_then(|f| f.parse().ok());
            let spans = fields.next().and_then(|f| f.parse().ok());
            let (Some(rate), Some(spans)) = (rate, spans) else {
                panic!(
                    "{mode} run printed no rate: {last:?}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
            };
            runs[i].push((rate, spans));
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|a, b| a.partial_cmp(b).expect("finite"));
        v[v.len() / 2]
    };
    let off = median(runs[0].iter().map(|r| r.0).collect());
    // A round's modes ran back to back, so each round's loss is measured against its own "off":
    // the median of those losses shrugs off the machine's slow and fast spells.
    let report = |i: usize, label: &str| {
        let rate = median(runs[i].iter().map(|r| r.0).collect());
        let loss = median(
            runs[i]
                .iter()
                .zip(&runs[0])
                .map(|(on, off)| 100.0 * (1.0 - on.0 / off.0))
                .collect(),
        );
        let spans = median(runs[i].iter().map(|r| r.1 as f64).collect());
        let losses: Vec<String> = runs[i]
            .iter()
            .zip(&runs[0])
            .map(|(on, off)| format!("{:.1}", 100.0 * (1.0 - on.0 / off.0)))
            .collect();
        println!(
            "{label:<44} {rate:>9.0} jobs/s vs off {off:>9.0} | throughput lost {loss:>5.1}% (median of {OBSERVABILITY_ROUNDS} rounds: {}) | spans received {spans:.0}",
            losses.join(" / ")
        );
    };
    report(1, "metrics + tracing (INFO job spans)");
    report(2, "metrics + OTLP export, every job");
    report(3, "metrics + OTLP export, sample_ratio = 0.1");
    // Each job of the 5-step pipeline is one job span and five step spans.
    println!(
        "(with every job exported, a run sends {} spans)",
        (jobs + jobs / 10) * 6
    );
}

fn main() {
    if let Ok(mode) = std::env::var("ENGINE_OBS_CHILD") {
        let jobs = common::env_or("ENGINE_BENCH_JOBS", 100_000);
        observability_child(&mode, jobs);
        return;
    }
    let jobs: usize = common::env_or("ENGINE_BENCH_JOBS", 200_000);
    println!(
        "engine benchmark: {jobs} jobs per run, zero-latency simulated agents, 2 worker threads"
    );
    let only = std::env::var("ENGINE_BENCH").unwrap_or_default();
    let rt = common::runtime();
    if only == "rss" || only.is_empty() {
        let max: usize = common::env_or("ENGINE_BENCH_RSS_JOBS", 1_000_000);
        let points: Vec<usize> = [100_000, 200_000, 400_000, 1_000_000]
            .into_iter()
            .filter(|&p| p <= max)
            .collect();
        println!(
            "RSS against jobs run (5-step pipeline, zero latency, 256 in flight, default retention 100000):"
        );
        rt.block_on(rss_versus_jobs(&points));
        if only == "rss" {
            return;
        }
    }
    if only == "observability" || only.is_empty() {
        observability_cost(jobs / 2);
        if only == "observability" {
            return;
        }
    }
    if only == "profile" {
        // Cascade alone on the pipeline, for a profiler.
        let took = rt.block_on(run_cascade(model(&pipeline_toml(None)), jobs));
        println!(
            "5-step pipeline, cascade alone: {:.0} steps/s",
            (jobs * 5) as f64 / took.as_secs_f64()
        );
        return;
    }
    rt.block_on(async {
        // Warm up allocators and code paths.
        run_cascade(model(&pipeline_toml(None)), jobs / 20).await;
        run_baseline_pipeline(jobs / 20).await;

        for (label, steps, toml) in [("5-step pipeline", 5usize, pipeline_toml(None)), ("12-node fan-out", 12, fanout_toml())] {
            let cpu = common::cpu_seconds();
            let base = if steps == 5 { run_baseline_pipeline(jobs).await } else { run_baseline_fanout(jobs).await };
            let base_cpu = common::cpu_seconds() - cpu;
            let cpu = common::cpu_seconds();
            let casc = run_cascade(model(&toml), jobs).await;
            let casc_cpu = common::cpu_seconds() - cpu;
            let (cj, bj) = (jobs as f64 / casc.as_secs_f64(), jobs as f64 / base.as_secs_f64());
            let per_step = |cpu: f64| cpu * 1e6 / (jobs * steps) as f64;
            println!(
                "{label:<16} cascade {:>9.0} jobs/s {:>10.0} steps/s | plain tokio {:>9.0} jobs/s {:>10.0} steps/s | overhead {:.2}x",
                cj,
                cj * steps as f64,
                bj,
                bj * steps as f64,
                bj / cj
            );
            // CPU time is steadier than wall time on a shared machine.
            println!(
                "{:<16} CPU per step: cascade {:.2} µs, plain tokio {:.2} µs ({:.2}x)",
                "",
                per_step(casc_cpu),
                per_step(base_cpu),
                casc_cpu / base_cpu
            );
        }
        let per_job = memory_per_in_flight_job(20_000).await;
        println!("memory per in-flight job (5-step pipeline, 20000 in flight): {:.1} KiB ({per_job:.0} bytes)", per_job / 1024.0);
    });
}
