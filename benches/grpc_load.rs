//! Load generator for the gRPC API: N concurrent clients submit to a 5-step zero-latency graph
//! and wait for each job's completion (WatchJob), against a real server on 127.0.0.1 with the
//! durable SQLite store, then with the in-memory store, in one run.
//!
//! Phase 1 (closed loop) measures the throughput. Phase 2 submits at half that rate (open loop)
//! and measures submit latency there.
//!
//! Then the cost of watching: the same jobs (5 steps of 20 ms, 512 clients) followed with WatchJob
//! or by polling GetJob, and polled again beside 10,000 idle watchers of jobs that never move; the
//! process's CPU time for each run (server and clients share the process).
//!
//! `cargo bench --bench grpc_load` (`GRPC_LOAD_SECS`, `GRPC_LOAD_CLIENTS` to change the run;
//! `GRPC_LOAD=throughput`, `GRPC_LOAD=approvals`, `GRPC_LOAD=auth` or `GRPC_LOAD=watchers` for one part,
//! `GRPC_WATCH_JOBS` for the watched jobs, `GRPC_IDLE_UNWATCHED=1` to start the idle jobs without
//! watching them, `GRPC_PARKED_JOBS` for the jobs parked beside the approval-free graph).
//!
//! The approvals part: the same closed loop on the SQLite store plain, with the audit log, and
//! with the audit log and 10,000 jobs of another graph parked awaiting approval.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cascade_orchestrator::api::pb;
use cascade_orchestrator::api::pb::cascade_client::CascadeClient;
use cascade_orchestrator::model::ServerModel;
use cascade_orchestrator::server::{self, RunningServer, ServerOptions};
use cascade_orchestrator::store::{JobStore, MemoryStore, SqliteOptions, SqliteStore};
use cascade_orchestrator::{Orchestrator, config};
use tonic::transport::Channel;

mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

const GRAPH: &str = r#"
[graph]
name = "pipeline"
max_in_flight_jobs = 2048
max_pending_jobs = 1000000
[agents.classify]
kind = "sim"
max_concurrency = 512
[agents.enrich]
kind = "sim"
after = ["classify"]
max_concurrency = 512
[agents.draft]
kind = "sim"
after = ["enrich"]
max_concurrency = 512
[agents.review]
kind = "sim"
after = ["draft"]
max_concurrency = 512
[agents.post]
kind = "sim"
after = ["review"]
max_concurrency = 512
"#;

/// Sends a request's credential, if it has one.
#[derive(Clone)]
struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

type Client = CascadeClient<tonic::service::interceptor::InterceptedService<Channel, Bearer>>;

/// A client on `channel` that sends `token` (none: no credential).
fn client_of(channel: Channel, token: Option<&str>) -> Client {
    let header = token.map(|t| format!("Bearer {t}").parse().expect("ASCII"));
    CascadeClient::with_interceptor(channel, Bearer(header))
}

/// Submit `{"n": n}` to `graph`; returns the job id.
async fn submit(c: &mut Client, graph: &str, n: u64) -> String {
    c.submit_job(pb::SubmitJobRequest {
        graph: graph.into(),
        input_json: format!(r#"{{"n": {n}}}"#),
        ..Default::default()
    })
    .await
    .expect("submit")
    .into_inner()
    .job_id
}

async fn one_job(c: &mut Client, n: u64) -> Duration {
    let t = Instant::now();
    let id = submit(c, "pipeline", n).await;
    let submit = t.elapsed();
    let mut events = c
        .watch_job(pb::WatchJobRequest { job_id: id })
        .await
        .expect("watch")
        .into_inner();
    while events.message().await.expect("event").is_some() {}
    submit
}

fn pct(v: &mut [Duration], p: f64) -> f64 {
    v.sort();
    v.get(((v.len().max(1) - 1) as f64 * p) as usize)
        .copied()
        .unwrap_or_default()
        .as_secs_f64()
        * 1e3
}

/// An orchestrator on `store` and a real server on 127.0.0.1 in front of it, with one channel.
async fn serve(
    model: ServerModel,
    store: Arc<dyn JobStore>,
) -> (Arc<Orchestrator>, RunningServer, Channel) {
    let orch = Arc::new(
        Orchestrator::builder(model)
            .store(store)
            .start()
            .await
            .expect("start"),
    );
    let (server, channel) = serve_orchestrator(&orch).await;
    (orch, server, channel)
}

/// A real server on 127.0.0.1 in front of `orch`, with one channel.
async fn serve_orchestrator(orch: &Arc<Orchestrator>) -> (RunningServer, Channel) {
    let options = ServerOptions {
        grpc_addr: "127.0.0.1:0".parse().expect("addr"),
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        ..Default::default()
    };
    let server = server::start(orch.clone(), options).await.expect("server");
    let channel = connect(&server).await;
    (server, channel)
}

async fn connect(server: &RunningServer) -> Channel {
    Channel::from_shared(format!("http://{}", server.grpc_addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect")
}

async fn run(label: &str, store: Arc<dyn JobStore>, clients: usize, secs: u64) {
    let model = config::parse_graph_str("load.toml", GRAPH, &Default::default()).expect("graph");
    let (orch, server, channel) = serve(model, store.clone()).await;

    // Phase 1: closed loop, as fast as the clients can go.
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..clients {
        let mut c = client_of(channel.clone(), None);
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut n = (w as u64) << 32;
            while !stop.load(Ordering::Relaxed) {
                lat.push(one_job(&mut c, n).await);
                n += 1;
            }
            lat
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut lat = Vec::new();
    for t in tasks {
        lat.extend(t.await.expect("client"));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let rate = lat.len() as f64 / elapsed;
    let (p50, p99) = (pct(&mut lat, 0.5), pct(&mut lat, 0.99));

    // Phase 2: open loop at half that rate; submit latency under a load the server can carry.
    let half = rate / 2.0;
    let interval = Duration::from_secs_f64(1.0 / half);
    let n = (half * secs as f64) as u64;
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let mut tasks = Vec::with_capacity(n as usize);
    for i in 0..n {
        ticker.tick().await;
        let mut c = client_of(channel.clone(), None);
        tasks.push(tokio::spawn(async move {
            one_job(&mut c, (1u64 << 62) + i).await
        }));
    }
    let mut half_lat = Vec::new();
    for t in tasks {
        half_lat.push(t.await.expect("job"));
    }
    println!(
        "{label:<8} {clients} clients: {rate:>7.0} jobs/s end-to-end ({:>7.0} steps/s), submit p50 {p50:.2} ms p99 {p99:.2} ms | at {half:.0} jobs/s: submit p50 {:.2} ms p99 {:.2} ms",
        rate * 5.0,
        pct(&mut half_lat, 0.5),
        pct(&mut half_lat, 0.99),
    );
    server.stop().await;
    orch.shutdown(Duration::from_secs(10)).await;
    store.flush().await.expect("flush");
}

const WATCHED: &str = r#"
[graph]
name = "watched"
max_in_flight_jobs = 512
max_pending_jobs = 1000000
[agents.classify]
kind = "sim"
latency = "20ms"
max_concurrency = 512
[agents.enrich]
kind = "sim"
after = ["classify"]
latency = "20ms"
max_concurrency = 512
[agents.draft]
kind = "sim"
after = ["enrich"]
latency = "20ms"
max_concurrency = 512
[agents.review]
kind = "sim"
after = ["draft"]
latency = "20ms"
max_concurrency = 512
[agents.post]
kind = "sim"
after = ["review"]
latency = "20ms"
max_concurrency = 512
"#;

/// Jobs that stay running for the whole run: what idle watchers watch.
const IDLE: &str = r#"
[graph]
name = "idle"
max_in_flight_jobs = 10000
max_pending_jobs = 10000
[agents.wait]
kind = "sim"
latency = "1h"
max_concurrency = 10000
"#;

#[derive(Clone, Copy, PartialEq)]
enum Follow {
    Watch,
    Poll,
}

/// Submit to `watched` and follow the job to its end; returns the number of messages received.
async fn follow_one(c: &mut Client, n: u64, how: Follow) -> u64 {
    let id = submit(c, "watched", n).await;
    let mut received = 0;
    match how {
        Follow::Watch => {
            let mut events = c
                .watch_job(pb::WatchJobRequest { job_id: id })
                .await
                .expect("watch")
                .into_inner();
            while events.message().await.expect("event").is_some() {
                received += 1;
            }
        }
        Follow::Poll => loop {
            let job = c
                .get_job(pb::GetJobRequest { job_id: id.clone() })
                .await
                .expect("get")
                .into_inner();
            received += 1;
            if job.state >= pb::JobState::Succeeded as i32 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        },
    }
    received
}

/// `jobs` jobs, `clients` at a time, each followed as `how` says; returns (CPU s, wall s, messages).
async fn follow_all(channel: &Channel, jobs: u64, clients: u64, how: Follow) -> (f64, f64, u64) {
    let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let (cpu, wall) = (common::cpu_seconds(), Instant::now());
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let mut c = client_of(channel.clone(), None);
        let next = next.clone();
        tasks.push(tokio::spawn(async move {
            let mut received = 0;
            loop {
                let n = next.fetch_add(1, Ordering::Relaxed);
                if n >= jobs {
                    return received;
                }
                received += follow_one(&mut c, n, how).await;
            }
        }));
    }
    let mut received = 0;
    for t in tasks {
        received += t.await.expect("client");
    }
    (
        common::cpu_seconds() - cpu,
        wall.elapsed().as_secs_f64(),
        received,
    )
}

async fn watcher_cost(jobs: u64) {
    let dir = tempfile::tempdir().expect("tempdir");
    let (w, i) = (
        dir.path().join("watched.toml"),
        dir.path().join("idle.toml"),
    );
    std::fs::write(&w, WATCHED).expect("write");
    std::fs::write(&i, IDLE).expect("write");
    let model = config::load_graph_files(&[w, i], &Default::default()).expect("graphs");
    let (orch, server, channel) = serve(model, Arc::new(MemoryStore::new())).await;
    // Warm up, then the two ways of following a job, alternated.
    follow_all(&channel, jobs / 10, 512, Follow::Poll).await;
    let mut rows = Vec::new();
    for how in [Follow::Watch, Follow::Poll, Follow::Watch, Follow::Poll] {
        rows.push((how, follow_all(&channel, jobs, 512, how).await));
    }
    // 10,000 idle watchers, 100 streams per connection, each past its first event.
    let mut idle = Vec::new();
    for k in 0..100 {
        let ch = connect(&server).await;
        for j in 0..100 {
            let mut c = client_of(ch.clone(), None);
            let id = submit(&mut c, "idle", k * 100 + j).await;
            if std::env::var_os("GRPC_IDLE_UNWATCHED").is_some() {
                continue;
            }
            let mut events = c
                .watch_job(pb::WatchJobRequest { job_id: id })
                .await
                .expect("watch")
                .into_inner();
            events.message().await.expect("event").expect("first event");
            idle.push(tokio::spawn(async move {
                let mut more = 0u64;
                while let Ok(Some(_)) = events.message().await {
                    more += 1;
                }
                more
            }));
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let with_idle = follow_all(&channel, jobs, 512, Follow::Poll).await;
    let polls: Vec<f64> = rows
        .iter()
        .filter(|r| r.0 == Follow::Poll)
        .map(|r| r.1.0)
        .collect();
    let watches: Vec<f64> = rows
        .iter()
        .filter(|r| r.0 == Follow::Watch)
        .map(|r| r.1.0)
        .collect();
    for (how, (cpu, wall, msgs)) in &rows {
        println!(
            "  {:<5} {jobs} jobs, 512 at a time: {cpu:>6.2} CPU-s in {wall:>5.1} s, {msgs} messages",
            if *how == Follow::Watch {
                "watch"
            } else {
                "poll"
            },
        );
    }
    let (cpu, wall, msgs) = with_idle;
    println!(
        "  poll beside 10,000 idle watchers: {cpu:>6.2} CPU-s in {wall:>5.1} s, {msgs} messages"
    );
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    println!(
        "  watch / poll CPU {:.2} (aim ≤ 1.3) | beside 10,000 idle watchers / poll alone {:.2}",
        mean(&watches) / mean(&polls),
        cpu / mean(&polls),
    );
    server.stop().await;
    orch.shutdown(Duration::ZERO).await;
    let mut woken = 0;
    for t in idle {
        woken += t.await.unwrap_or(0);
    }
    println!(
        "  messages the idle watchers received after their first: {woken} (while their jobs ran on)"
    );
}

const GUARDED: &str = r#"
[graph]
name = "guarded"
max_pending_jobs = 1000000
[agents.prepare]
kind = "sim"
[agents.pay]
kind = "sim"
after = ["prepare"]
approval = "required"
"#;

/// Jobs of the approval-free pipeline, end to end over gRPC, that `clients` closed-loop clients
/// complete per second for `secs` seconds, and the process's CPU time per job (server and
/// clients), in microseconds: steadier than the rate on a shared machine.
async fn closed_loop(
    channel: &Channel,
    clients: usize,
    secs: u64,
    token: Option<&str>,
) -> (f64, f64) {
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let cpu = common::cpu_seconds();
    let mut tasks = Vec::new();
    for w in 0..clients {
        let mut c = client_of(channel.clone(), token);
        let stop = stop.clone();
        tasks.push(tokio::spawn(async move {
            let mut done = 0u64;
            let mut n = (w as u64) << 32;
            while !stop.load(Ordering::Relaxed) {
                one_job(&mut c, n).await;
                n += 1;
                done += 1;
            }
            done
        }));
    }
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    let mut done = 0;
    for t in tasks {
        done += t.await.expect("client");
    }
    let cpu_us = (common::cpu_seconds() - cpu) * 1e6 / done.max(1) as f64;
    (done as f64 / start.elapsed().as_secs_f64(), cpu_us)
}

/// What the audit log and parked jobs cost a graph that uses neither: the same closed loop on
/// the SQLite store, plain; with the audit log attached; and with the audit log and `parked`
/// jobs of another graph awaiting approval. After a warm-up, the three are measured in turn,
/// `rounds` times in rotating order, and each one's median is kept (the machine is shared and
/// noisy).
async fn approvals_cost(clients: usize, secs: u64, parked: usize, rounds: usize) {
    let variants = [
        ("plain", false, 0),
        ("audit", true, 0),
        ("audit+parked", true, parked),
    ];
    // What parked jobs hold, first, from a fresh process's memory.
    let (_, _, note) = measure_variant(("memory", true, parked), clients, 1).await;
    println!("  parking{note}");
    measure_variant(("warm-up", false, 0), clients, 3).await;
    let mut rates: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    let mut cpus: Vec<Vec<f64>> = vec![Vec::new(); variants.len()];
    for round in 0..rounds {
        // Each round in another order, so that no variant always runs first or last.
        for k in 0..variants.len() {
            let v = (k + round) % variants.len();
            let variant = &variants[v];
            let (rate, cpu, _) = measure_variant(*variant, clients, secs).await;
            println!(
                "  round {round}: {:<14} {rate:>7.0} jobs/s, {cpu:>6.1} µs CPU per job",
                variant.0
            );
            rates[v].push(rate);
            cpus[v].push(cpu);
        }
    }
    let median = |r: &mut Vec<f64>| {
        r.sort_by(f64::total_cmp);
        r[r.len() / 2]
    };
    let m: Vec<f64> = rates.iter_mut().map(median).collect();
    let c: Vec<f64> = cpus.iter_mut().map(median).collect();
    let pct = |a: f64, b: f64| (a / b - 1.0) * 100.0;
    println!(
        "medians: plain {:.0} jobs/s ({:.1} µs CPU/job); audit {:.0} ({:+.1}%; CPU {:+.1}%); audit + {parked} parked jobs {:.0} ({:+.1}%; CPU {:+.1}%)",
        m[0],
        c[0],
        m[1],
        pct(m[1], m[0]),
        pct(c[1], c[0]),
        m[2],
        pct(m[2], m[0]),
        pct(c[2], c[0])
    );
}

/// What authentication costs: the same closed loop (in-memory store, so that the engine's own
/// work is small beside what is measured) without authentication, with an API key (SHA-256),
/// and with an OIDC JWT (ES256, its key set from a file; every client sends the same token, so
/// its signature is checked once and then remembered). Measured `rounds` times in rotating
/// order; the medians.
async fn auth_cost(clients: usize, secs: u64, rounds: usize) {
    use base64::Engine;
    use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair};
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let dir = tempfile::tempdir().expect("tempdir");
    // An issuer's key, its key set, and a token it signed.
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).expect("key");
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8.as_ref(), &rng)
        .expect("key");
    let public = pair.public_key().as_ref();
    let jwks = serde_json::json!({"keys": [{"kty": "EC", "crv": "P-256", "kid": "bench", "alg": "ES256", "use": "sig",
        "x": b64(&public[1..33]), "y": b64(&public[33..65])}]});
    std::fs::write(dir.path().join("jwks.json"), jwks.to_string()).expect("write");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs();
    let signed =
        format!(
        "{}.{}",
        b64(br#"{"alg":"ES256","typ":"JWT","kid":"bench"}"#),
        b64(serde_json::json!({"iss": "https://bench.example/", "aud": "cascade", "sub": "bench",
            "tenant": "bench", "roles": ["submit", "read"], "iat": now, "exp": now + 24 * 3600})
            .to_string()
            .as_bytes())
    );
    let sig = pair.sign(&rng, signed.as_bytes()).expect("sign");
    let jwt = format!("{signed}.{}", b64(sig.as_ref()));
    let key = cascade_orchestrator::auth::generate_key();
    std::fs::write(dir.path().join("load.toml"), GRAPH).expect("write");
    let configs = [
        ("none", String::new(), None),
        (
            "API key (SHA-256)",
            format!(
                "[[auth.api_keys]]\nname = \"bench\"\ntenant = \"bench\"\nroles = [\"submit\", \"read\"]\nhash = \"{}\"\n",
                cascade_orchestrator::auth::sha256_hash(&key)
            ),
            Some(key.clone()),
        ),
        (
            "OIDC JWT (ES256)",
            format!(
                "[auth.oidc]\nissuer = \"https://bench.example/\"\naudience = \"cascade\"\njwks_file = {:?}\n",
                dir.path().join("jwks.json").display().to_string()
            ),
            Some(jwt.clone()),
        ),
    ];
    // What one check costs, alone: `authenticate` on one thread, repeated (a key's SHA-256 and
    // map lookup; a JWT found in the verified-token cache). Steadier than the closed loop's
    // rates, whose spread between runs is as large as the effect.
    let mut per_check = Vec::new();
    for (label, auth, token) in &configs {
        let path = dir.path().join("cascade.toml");
        std::fs::write(&path, format!("graphs = [\"load.toml\"]\n{auth}")).expect("write");
        let model = config::load(Some(&path), &[], &Default::default()).expect("config");
        let authenticator =
            cascade_orchestrator::auth::Authenticator::new(&model.auth).expect("authenticator");
        let header = token.as_ref().map(|t| format!("Bearer {t}"));
        authenticator
            .authenticate(header.as_deref(), None)
            .await
            .expect("the credential is valid");
        let n = 200_000u32;
        let started = std::time::Instant::now();
        for _ in 0..n {
            std::hint::black_box(
                authenticator
                    .authenticate(std::hint::black_box(header.as_deref()), None)
                    .await
                    .is_ok(),
            );
        }
        per_check.push((*label, started.elapsed().as_nanos() as f64 / n as f64));
    }
    let mut results: Vec<Vec<(f64, f64)>> = vec![Vec::new(); configs.len()];
    for round in 0..rounds {
        for k in 0..configs.len() {
            let i = (k + round) % configs.len();
            let (_, auth, token) = &configs[i];
            let path = dir.path().join("cascade.toml");
            std::fs::write(&path, format!("graphs = [\"load.toml\"]\n{auth}")).expect("write");
            let model = config::load(Some(&path), &[], &Default::default()).expect("config");
            let (orch, server, channel) = serve(model, Arc::new(MemoryStore::new())).await;
            // Warm: connections, the first verification.
            closed_loop(&channel, clients, 1, token.as_deref()).await;
            results[i].push(closed_loop(&channel, clients, secs, token.as_deref()).await);
            server.stop().await;
            orch.shutdown(Duration::from_secs(10)).await;
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut base = (0.0, 0.0);
    for (i, (label, _, _)) in configs.iter().enumerate() {
        let mut rates: Vec<f64> = results[i].iter().map(|r| r.0).collect();
        let mut cpus: Vec<f64> = results[i].iter().map(|r| r.1).collect();
        let (rate, cpu) = (median(&mut rates), median(&mut cpus));
        if i == 0 {
            base = (rate, cpu);
            println!("{label:<20} {rate:>8.0} jobs/s   {cpu:>7.1} µs CPU/job");
        } else {
            println!(
                "{label:<20} {rate:>8.0} jobs/s ({:+.1} %)   {cpu:>7.1} µs CPU/job ({:+.1} %)",
                (rate / base.0 - 1.0) * 100.0,
                (cpu / base.1 - 1.0) * 100.0
            );
        }
    }
    // Two authenticated RPCs a job (SubmitJob, WatchJob): their checks against the CPU a job
    // costs without authentication.
    for (label, ns) in &per_check {
        println!(
            "{label:<20} one check {ns:>7.0} ns; two a job: {:.2} % of a job's CPU without authentication",
            2.0 * ns / 1000.0 / base.1 * 100.0
        );
    }
}

/// One measurement of [`approvals_cost`]: a fresh store (and audit log), `park` jobs parked, then
/// the closed loop; the rate and a note on what parking took.
async fn measure_variant(
    (_, audited, park): (&str, bool, usize),
    clients: usize,
    secs: u64,
) -> (f64, f64, String) {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("load.db");
    let store: Arc<dyn JobStore> =
        Arc::new(SqliteStore::open(SqliteOptions::new(&path)).expect("store"));
    let mut model =
        config::parse_graph_str("load.toml", GRAPH, &Default::default()).expect("graph");
    let guarded =
        config::parse_graph_str("guarded.toml", GUARDED, &Default::default()).expect("graph");
    model.graphs.extend(guarded.graphs);
    model.quotas.extend(guarded.quotas);
    let mut builder = Orchestrator::builder(model).store(store.clone());
    if audited {
        let log = cascade_orchestrator::audit::log::AuditLog::open(&path, None, "bench")
            .expect("audit log");
        builder = builder.audit(Arc::new(log));
    }
    let orch = Arc::new(builder.start().await.expect("start"));
    let rss_before = common::rss_bytes();
    let t = Instant::now();
    for n in 0..park {
        let req =
            cascade_orchestrator::SubmitRequest::new("guarded", serde_json::json!({ "n": n }));
        orch.submit(req).await.expect("submit");
    }
    while store.pending_approval_count("guarded") < park {
        assert!(
            t.elapsed() < Duration::from_secs(600),
            "the proposals were not made"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let note = if park > 0 {
        format!(
            " ({park} jobs parked in {:.1} s; RSS grew {:.0} bytes per parked job)",
            t.elapsed().as_secs_f64(),
            common::rss_bytes().saturating_sub(rss_before) as f64 / park as f64
        )
    } else {
        String::new()
    };
    let (server, channel) = serve_orchestrator(&orch).await;
    let (rate, cpu) = closed_loop(&channel, clients, secs, None).await;
    server.stop().await;
    orch.shutdown(Duration::from_secs(10)).await;
    store.flush().await.expect("flush");
    (rate, cpu, note)
}

fn main() {
    let part = std::env::var("GRPC_LOAD").unwrap_or_default();
    let secs: u64 = common::env_or("GRPC_LOAD_SECS", 10);
    let clients: usize = common::env_or("GRPC_LOAD_CLIENTS", 64);
    let rt = common::runtime();
    rt.block_on(async {
        if part.is_empty() || part == "throughput" {
            println!("gRPC load: 5-step zero-latency graph, server and clients in one process on 2 worker threads, {secs} s per phase");
            let dir = tempfile::tempdir().expect("tempdir");
            let sqlite = SqliteStore::open(SqliteOptions::new(dir.path().join("load.db"))).expect("store");
            run("sqlite", Arc::new(sqlite), clients, secs).await;
            run("memory", Arc::new(MemoryStore::new()), clients, secs).await;
        }
        if part.is_empty() || part == "approvals" {
            let parked: usize = common::env_or("GRPC_PARKED_JOBS", 10_000);
            println!("cost of the audit log and of parked jobs to an approval-free graph: 5-step zero-latency graph, SQLite store, {clients} clients, {secs} s each");
            let rounds: usize = common::env_or("GRPC_ROUNDS", 3);
            approvals_cost(clients, secs, parked, rounds).await;
        }
        if part.is_empty() || part == "auth" {
            let rounds: usize = common::env_or("GRPC_ROUNDS", 3);
            println!("cost of authentication: 5-step zero-latency graph, in-memory store, {clients} clients, {secs} s each, {rounds} rounds");
            auth_cost(clients, secs, rounds).await;
        }
        if part.is_empty() || part == "watchers" {
            let jobs: u64 = common::env_or("GRPC_WATCH_JOBS", 20_000);
            println!("watcher cost: 5 steps of 20 ms, in-memory store, WatchJob vs GetJob every 50 ms");
            watcher_cost(jobs).await;
        }
    });
}
