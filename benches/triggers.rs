//! JetStream → jobs: how fast a `nats` trigger turns messages into durably accepted jobs, and
//! what happens to the bus and to Cascade's memory while the cascade holds the graph paused.
//!
//! Starts Debian's `nats-server` (JetStream, a scratch store directory) on a free port, and an
//! orchestrator in this process on the SQLite store.
//!
//! 1. Throughput: `TRIGGERS_BENCH_MESSAGES` (default 20,000) messages published first, then
//!    drained by (a) a bare consumer that fetches and acknowledges each message and does nothing
//!    else (the bus's own ceiling on this machine), and (b) Cascade's trigger into a zero-latency
//!    graph (every message a durably accepted job). The ratio is the figure to compare.
//! 2. Backlog under a pause: the graph's quota refused upstream for `TRIGGERS_BENCH_PAUSE_SECS`
//!    (default 20) while as many messages are published; every two seconds, the stream's
//!    pending count, the graph's pending jobs and this process's RSS, through the pause and
//!    the drain after it.
//!
//! `cargo bench --bench triggers`

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use cascade_orchestrator::store::{SqliteOptions, SqliteStore};
use cascade_orchestrator::{Orchestrator, config};
use futures::StreamExt;

mod common;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn graph(port: u16, stream: &str, rps: u32) -> String {
    format!(
        r#"
[graph]
name = "ingest"
max_in_flight_jobs = 1000
max_pending_jobs = 2000

[[graph.triggers]]
name = "bus"
kind = "nats"
url = "nats://127.0.0.1:{port}"
stream = "{stream}"
subject = "{stream}.in"
consumer = "cascade"
batch = 500

[quotas.api]
requests_per_second = {rps}

[agents.handle]
kind = "sim"
quota = "api"
"#
    )
}

struct Nats(std::process::Child);

impl Drop for Nats {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn publish(js: &jetstream::Context, subject: &str, n: usize) {
    let mut acks = Vec::with_capacity(1024);
    for i in 0..n {
        acks.push(
            js.publish(subject.to_string(), format!("{{\"n\": {i}}}").into())
                .await
                .unwrap(),
        );
        if acks.len() == 1024 {
            for a in acks.drain(..) {
                a.await.unwrap();
            }
        }
    }
    for a in acks {
        a.await.unwrap();
    }
}

async fn stream(js: &jetstream::Context, name: &str) {
    js.create_stream(jetstream::stream::Config {
        name: name.into(),
        subjects: vec![format!("{name}.in")],
        ..Default::default()
    })
    .await
    .unwrap();
}

async fn pending(js: &jetstream::Context, stream: &str) -> u64 {
    let s = js.get_stream(stream).await.unwrap();
    match s
        .get_consumer::<jetstream::consumer::pull::Config>("cascade")
        .await
    {
        Ok(mut c) => {
            let i = c.info().await.unwrap();
            i.num_pending + i.num_ack_pending as u64
        }
        Err(_) => s.get_info().await.unwrap().state.messages,
    }
}

async fn orchestrator(dir: &std::path::Path, text: &str) -> Arc<Orchestrator> {
    let store = Arc::new(SqliteStore::open(SqliteOptions::new(dir.join("cascade.db"))).unwrap());
    let model = config::parse_graph_str("ingest.toml", text, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    Arc::new(
        Orchestrator::builder(model)
            .store(store)
            .start()
            .await
            .unwrap(),
    )
}

fn started(orch: &Orchestrator) -> u64 {
    let t = orch.triggers().get("ingest", "bus").unwrap();
    let c = t.counts();
    c.started + c.deduplicated
}

fn main() {
    let messages: usize = common::env_or("TRIGGERS_BENCH_MESSAGES", 20_000);
    let pause_secs: u64 = common::env_or("TRIGGERS_BENCH_PAUSE_SECS", 20);
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let scratch = tempfile::tempdir().unwrap();
    let _nats = Nats(
        std::process::Command::new("nats-server")
            .args(["-js", "-a", "127.0.0.1", "-p", &port.to_string(), "-sd"])
            .arg(scratch.path().join("js"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server (apt-get install nats-server)"),
    );
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        std::thread::sleep(Duration::from_millis(50));
    }
    common::runtime().block_on(async move {
        let js = jetstream::new(async_nats::connect(format!("127.0.0.1:{port}")).await.unwrap());

        // 1a. The bare consumer.
        stream(&js, "BARE").await;
        publish(&js, "BARE.in", messages).await;
        let consumer = js
            .get_stream("BARE")
            .await
            .unwrap()
            .get_or_create_consumer(
                "bare",
                jetstream::consumer::pull::Config {
                    durable_name: Some("bare".into()),
                    max_ack_pending: 1000,
                    ..Default::default()
                },
            )
            .await
            .unwrap();
        let t0 = Instant::now();
        let mut got = 0;
        while got < messages {
            let mut batch = consumer
                .fetch()
                .max_messages(500)
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .unwrap();
            while let Some(m) = batch.next().await {
                m.unwrap().ack().await.unwrap();
                got += 1;
            }
        }
        let bare = messages as f64 / t0.elapsed().as_secs_f64();

        // 1b. Cascade: the same messages to durably accepted jobs.
        stream(&js, "JOBS").await;
        publish(&js, "JOBS.in", messages).await;
        let dir = tempfile::tempdir().unwrap();
        let orch = orchestrator(dir.path(), &graph(port, "JOBS", 1_000_000)).await;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let cpu0 = common::cpu_seconds();
        let t0 = Instant::now();
        cascade_orchestrator::triggers::Triggers::start(&orch, stopped.clone());
        while started(&orch) < messages as u64 {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let elapsed = t0.elapsed().as_secs_f64();
        let cascade = messages as f64 / elapsed;
        let cpu_us = (common::cpu_seconds() - cpu0) * 1e6 / messages as f64;
        let _ = stop.send(true);
        orch.shutdown(Duration::from_secs(10)).await;
        println!(
            "throughput, {messages} messages: bare consumer (fetch + ack) {bare:.0} msg/s; \
             Cascade (fetch, durable accept, ack) {cascade:.0} jobs/s = {:.2} of the bare \
             consumer; {cpu_us:.0} µs CPU a message (bus client, jobs and store in one process)",
            cascade / bare
        );

        // 2. The graph paused by the cascade while the backlog arrives.
        stream(&js, "HELD").await;
        let dir = tempfile::tempdir().unwrap();
        let orch = orchestrator(dir.path(), &graph(port, "HELD", 2_000)).await;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        cascade_orchestrator::triggers::Triggers::start(&orch, stopped);
        tokio::time::sleep(Duration::from_secs(2)).await;
        let idle = common::rss_bytes();
        assert!(orch.exhaust_quota("api", Duration::from_secs(pause_secs)).await);
        let t0 = Instant::now();
        publish(&js, "HELD.in", messages).await;
        println!(
            "backlog under a {pause_secs} s pause ({messages} messages published at the start; \
             RSS idle {:.1} MB):",
            idle as f64 / 1e6
        );
        println!("| t (s) | bus pending | graph pending jobs | jobs started | RSS (MB) | RSS − idle (MB) |");
        println!("|---:|---:|---:|---:|---:|---:|");
        loop {
            let bus = pending(&js, "HELD").await;
            let (jobs_pending, _) = orch.pending_room("ingest").unwrap();
            let rss = common::rss_bytes();
            println!(
                "| {:.0} | {bus} | {jobs_pending} | {} | {:.1} | {:+.1} |",
                t0.elapsed().as_secs_f64(),
                started(&orch),
                rss as f64 / 1e6,
                (rss as f64 - idle as f64) / 1e6
            );
            if bus == 0 && jobs_pending == 0 {
                break;
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let _ = stop.send(true);
        orch.shutdown(Duration::from_secs(10)).await;
    });
}
