//! Load generator for the gRPC API: N concurrent clients submit to a 5-step zero-latency graph
//! and wait for each job's completion (WatchJob), against a real server on 127.0.0.1 with the
//! durable SQLite store, then with the in-memory store, in one run.
//!
//! Phase 1 (closed loop) measures the throughput. Phase 2 submits at half that rate (open loop)
//! and measures submit latency there.
//!
//! `cargo bench --bench grpc_load` (`GRPC_LOAD_SECS`, `GRPC_LOAD_CLIENTS` to change the run).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use cascade_orchestrator::api::pb;
use cascade_orchestrator::api::pb::cascade_client::CascadeClient;
use cascade_orchestrator::server::{self, ServerOptions};
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

async fn one_job(c: &mut CascadeClient<Channel>, n: u64) -> Duration {
    let t = Instant::now();
    let id = c
        .submit_job(pb::SubmitJobRequest {
            graph: "pipeline".into(),
            input_json: format!(r#"{{"n": {n}}}"#),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .job_id;
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

async fn run(label: &str, store: Arc<dyn JobStore>, clients: usize, secs: u64) {
    let model = config::parse_graph_str("load.toml", GRAPH, &Default::default()).expect("graph");
    let orch = Arc::new(
        Orchestrator::builder(model)
            .store(store.clone())
            .start()
            .await
            .expect("start"),
    );
    let options = ServerOptions {
        grpc_addr: "127.0.0.1:0".parse().expect("addr"),
        http_addr: "127.0.0.1:0".parse().expect("addr"),
        ..Default::default()
    };
    let server = server::start(orch.clone(), options).await.expect("server");
    let channel = Channel::from_shared(format!("http://{}", server.grpc_addr))
        .expect("uri")
        .connect()
        .await
        .expect("connect");

    // Phase 1: closed loop, as fast as the clients can go.
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..clients {
        let mut c = CascadeClient::new(channel.clone());
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
        let mut c = CascadeClient::new(channel.clone());
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

fn main() {
    let secs: u64 = common::env_or("GRPC_LOAD_SECS", 10);
    let clients: usize = common::env_or("GRPC_LOAD_CLIENTS", 64);
    let rt = common::runtime();
    rt.block_on(async {
        println!("gRPC load: 5-step zero-latency graph, server and clients in one process on 2 worker threads, {secs} s per phase");
        let dir = tempfile::tempdir().expect("tempdir");
        let sqlite = SqliteStore::open(SqliteOptions::new(dir.path().join("load.db"))).expect("store");
        run("sqlite", Arc::new(sqlite), clients, secs).await;
        run("memory", Arc::new(MemoryStore::new()), clients, secs).await;
    });
}
