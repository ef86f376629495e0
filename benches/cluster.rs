//! Several nodes: end-to-end durable jobs per second with 1, 2 and 3 `cascade serve` processes
//! on one PostgreSQL database (their quota shared in Redis), beside one node on its SQLite file,
//! in one run; with the servers' CPU time per job (and PostgreSQL's), and the Redis round trips
//! per quota reservation. Then `kill -9` of one node of three mid-run: how long its jobs wait
//! for the others to take them over, and that every job finishes.
//!
//! Starts Debian's PostgreSQL 15 (a scratch cluster on a free port; fsync off, as in the tests:
//! the figure is Cascade's cost, not the disk's) and `redis-server`, and the release `cascade`
//! binary. The graph: three zero-latency `sim` steps, the first drawing on a quota of 100,000
//! requests a second (never the limit), the others on their agents' implicit `upstream:` quotas:
//! every step reserves its turn in Redis. `CLUSTER_BENCH_JOBS` (default 6,000) jobs per run,
//! submitted by 64 clients over gRPC, spread over the nodes; `CLUSTER_BENCH_KILL_JOBS` (default
//! 10,000) for the kill, on the same steps taking 100 ms each.
//!
//! `cargo bench --bench cluster`

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use cascade_orchestrator::api::pb;
use cascade_orchestrator::api::pb::cascade_client::CascadeClient;
use futures::StreamExt;
use tonic::transport::Channel;

mod common;
#[path = "../tests/support/postgres.rs"]
mod postgres;
#[path = "../tests/support/redis.rs"]
mod redis_server;

const GRAPH: &str = r#"
[graph]
name = "pipeline"
max_in_flight_jobs = 512
max_pending_jobs = 1000000
[quotas.api]
requests_per_second = 100000
[agents.classify]
kind = "sim"
quota = "api"
max_concurrency = 256
[agents.enrich]
kind = "sim"
after = ["classify"]
max_concurrency = 256
[agents.post]
kind = "sim"
after = ["enrich"]
max_concurrency = 256
"#;

/// For the kill: the same steps taking 100 ms each and 64 jobs in flight per node, so that the
/// run lasts long enough (about 30 s) to kill a node in the middle of it.
const SLOW_GRAPH: &str = r#"
[graph]
name = "pipeline"
max_in_flight_jobs = 64
max_pending_jobs = 1000000
[quotas.api]
requests_per_second = 100000
[agents.classify]
kind = "sim"
quota = "api"
latency = "100ms"
[agents.enrich]
kind = "sim"
after = ["classify"]
latency = "100ms"
[agents.post]
kind = "sim"
after = ["enrich"]
latency = "100ms"
"#;

struct Node {
    child: std::process::Child,
    grpc: u16,
    http: u16,
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A node serving `dir/cascade.toml` (which names the store).
fn spawn(dir: &Path) -> Node {
    let (grpc, http) = (free_port(), free_port());
    let log = std::fs::File::create(dir.join("server.log")).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(["serve", "--config"])
        .arg(dir.join("cascade.toml"))
        .args([
            "--grpc-addr",
            &format!("127.0.0.1:{grpc}"),
            "--http-addr",
            &format!("127.0.0.1:{http}"),
        ])
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the cascade binary starts");
    Node { child, grpc, http }
}

async fn connect(port: u16) -> CascadeClient<Channel> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        match CascadeClient::connect(format!("http://127.0.0.1:{port}")).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("a node did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// `n` node directories under `root` serving `graph`, with `server` as their `[server]` table
/// body.
fn nodes(root: &Path, n: usize, graph: &str, server: &dyn Fn(&Path) -> String) -> Vec<PathBuf> {
    let graphs = root.join("graphs");
    std::fs::create_dir_all(&graphs).unwrap();
    std::fs::write(graphs.join("pipeline.toml"), graph).unwrap();
    (0..n)
        .map(|i| {
            let d = root.join(format!("node-{i}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("cascade.toml"),
                format!(
                    "graphs = [\"{}\"]\n[server]\ndata_dir = \"{}\"\n{}",
                    graphs.display(),
                    d.join("data").display(),
                    server(&d)
                ),
            )
            .unwrap();
            d
        })
        .collect()
}

/// CPU seconds (user + system) of process `pid` so far.
fn cpu_of(pid: u32) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let f: Vec<&str> = rest.split(' ').collect();
    (f[11].parse::<u64>().unwrap_or(0) + f[12].parse::<u64>().unwrap_or(0)) as f64 / 100.0
}

/// CPU seconds of every `postgres` process so far (the server and its backends).
fn postgres_cpu() -> f64 {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|c| c.trim() == "postgres")
        })
        .map(cpu_of)
        .sum()
}

/// A sample's value from a node's `/metrics` (0 when absent).
async fn metric(node: &Node, name: &str) -> f64 {
    let text = reqwest::get(format!("http://127.0.0.1:{}/metrics", node.http))
        .await
        .and_then(|r| r.error_for_status())
        .expect("/metrics");
    let text = text.text().await.unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
        .unwrap_or(0.0)
}

/// Submit `jobs` over the nodes' clients (64 at a time); their ids.
async fn submit(clients: &[CascadeClient<Channel>], jobs: usize) -> Vec<String> {
    futures::stream::iter(0..jobs)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            async move {
                c.submit_job(pb::SubmitJobRequest {
                    graph: "pipeline".into(),
                    input_json: format!(r#"{{"n": {i}}}"#),
                    ..Default::default()
                })
                .await
                .expect("accepted")
                .into_inner()
                .job_id
            }
        })
        .buffer_unordered(64)
        .collect()
        .await
}

/// Jobs of the graph that succeeded on `node`, from its `/metrics`.
async fn succeeded_on(node: &Node) -> f64 {
    let Ok(r) = reqwest::get(format!("http://127.0.0.1:{}/metrics", node.http)).await else {
        return 0.0;
    };
    let text = r.text().await.unwrap_or_default();
    text.lines()
        .filter(|l| {
            l.starts_with("cascade_jobs_finished_total{")
                && l.contains("graph=\"pipeline\"")
                && l.contains("outcome=\"succeeded\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Wait until `n` jobs succeeded over `nodes` (each counts those that finished there).
async fn await_succeeded(nodes: &[Node], n: f64) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        let mut done = 0.0;
        for node in nodes {
            done += succeeded_on(node).await;
        }
        if done >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{done} of {n} jobs succeeded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

struct Figure {
    label: String,
    jobs_per_second: f64,
    cascade_cpu_ms_per_job: f64,
    postgres_cpu_ms_per_job: f64,
    /// Per step: each of the graph's three steps reserves its turn on one shared quota (the
    /// declared one, or its agent's implicit `upstream:` one).
    round_trips_per_step: Option<f64>,
}

async fn run(label: &str, dirs: &[PathBuf], jobs: usize, shared: bool) -> Figure {
    let nodes: Vec<Node> = dirs.iter().map(|d| spawn(d)).collect();
    let mut clients = Vec::new();
    for n in &nodes {
        clients.push(connect(n.grpc).await);
    }
    // Warm the nodes up (connections, the first lease round) before the clock starts.
    let warm = submit(&clients, 64).await;
    await_succeeded(&nodes, warm.len() as f64).await;
    let cpu0: f64 = nodes.iter().map(|n| cpu_of(n.child.id())).sum();
    let pg0 = postgres_cpu();
    let mut trips0 = 0.0;
    for n in &nodes {
        trips0 += metric(n, "cascade_quota_backend_round_trip_seconds_count").await;
    }
    let t0 = Instant::now();
    let ids = submit(&clients, jobs).await;
    await_succeeded(&nodes, (warm.len() + ids.len()) as f64).await;
    let took = t0.elapsed().as_secs_f64();
    let cpu: f64 = nodes.iter().map(|n| cpu_of(n.child.id())).sum::<f64>() - cpu0;
    let pg = postgres_cpu() - pg0;
    let mut trips = -trips0;
    for n in &nodes {
        trips += metric(n, "cascade_quota_backend_round_trip_seconds_count").await;
    }
    Figure {
        label: label.to_string(),
        jobs_per_second: jobs as f64 / took,
        cascade_cpu_ms_per_job: cpu * 1000.0 / jobs as f64,
        postgres_cpu_ms_per_job: pg * 1000.0 / jobs as f64,
        round_trips_per_step: shared.then(|| trips / (3 * jobs) as f64),
    }
}

fn main() {
    let jobs: usize = common::env_or("CLUSTER_BENCH_JOBS", 6000);
    let kill_jobs: usize = common::env_or("CLUSTER_BENCH_KILL_JOBS", 10_000);
    let rt = common::runtime();
    rt.block_on(async {
        let pg = postgres::Postgres::start();
        let redis = redis_server::Redis::start();
        let root = tempfile::tempdir().unwrap();
        let mut figures = Vec::new();

        let sqlite = nodes(&root.path().join("sqlite"), 1, GRAPH, &|_| String::new());
        figures.push(run("1 node, SQLite", &sqlite, jobs, false).await);
        for n in 1..=3 {
            let url = pg.database(&format!("bench{n}")).await;
            let backend = redis.url();
            let dirs = nodes(&root.path().join(format!("pg{n}")), n, GRAPH, &|_| {
                format!("store = \"{url}\"\nlease = \"5s\"\nquota_backend = \"{backend}\"\n")
            });
            figures.push(run(&format!("{n} node(s), PostgreSQL + Redis"), &dirs, jobs, true).await);
        }
        println!("| setup | jobs/s | cascade CPU ms/job | PostgreSQL CPU ms/job | Redis round trips/step |");
        println!("|---|---|---|---|---|");
        for f in &figures {
            println!(
                "| {} | {:.0} | {:.2} | {:.2} | {} |",
                f.label,
                f.jobs_per_second,
                f.cascade_cpu_ms_per_job,
                f.postgres_cpu_ms_per_job,
                f.round_trips_per_step
                    .map_or("-".to_string(), |r| format!("{r:.3}"))
            );
        }

        // kill -9 of one node of three, mid-run.
        let url = pg.database("benchkill").await;
        let backend = redis.url();
        let dirs = nodes(&root.path().join("kill"), 3, SLOW_GRAPH, &|_| {
            format!("store = \"{url}\"\nlease = \"5s\"\nquota_backend = \"{backend}\"\n")
        });
        let mut nodes: Vec<Node> = dirs.iter().map(|d| spawn(d)).collect();
        let mut clients = Vec::new();
        for n in &nodes {
            clients.push(connect(n.grpc).await);
        }
        let ids = submit(&clients, kill_jobs).await;
        let c = cascade_orchestrator::store::pg_schema::connect(&url, None)
            .await
            .unwrap();
        let count = |sql: &'static str, arg: Option<String>| {
            let c = &c;
            async move {
                match arg {
                    Some(a) => c.query_one(sql, &[&a]).await,
                    None => c.query_one(sql, &[]).await,
                }
                .unwrap()
                .get::<_, i64>(0)
            }
        };
        // A quarter of the way, SIGKILL node 0 (its id: host name and gRPC port).
        while count("SELECT count(*) FROM jobs WHERE state = 'succeeded'", None).await
            < (kill_jobs / 4) as i64
        {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let node0 = format!(
            "{}:{}",
            cascade_orchestrator::store::host_name(),
            nodes[0].grpc
        );
        let leased = "SELECT count(*) FROM jobs WHERE lease_owner = $1
            AND state IN ('pending', 'running', 'awaiting_approval', 'budget_exceeded')";
        drop(nodes.remove(0));
        let kill_at = Instant::now();
        let held = count(leased, Some(node0.clone())).await;
        while count(leased, Some(node0.clone())).await > 0 {
            assert!(
                kill_at.elapsed() < Duration::from_secs(120),
                "the killed node's jobs were not taken over"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let taken_over = kill_at.elapsed();
        let all = "SELECT count(*) FROM jobs WHERE state = 'succeeded'";
        while count(all, None).await < ids.len() as i64 {
            assert!(
                kill_at.elapsed() < Duration::from_secs(600),
                "not every job succeeded after the kill"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let done = kill_at.elapsed();
        let succeeded = count(all, None).await;
        println!(
            "kill -9 of one node of three after {} of {kill_jobs} jobs had succeeded: its {held} unfinished jobs taken over {:.2} s after the kill (lease 5 s); all {succeeded} jobs succeeded {:.1} s after it",
            kill_jobs / 4,
            taken_over.as_secs_f64(),
            done.as_secs_f64()
        );
        assert_eq!(succeeded, kill_jobs as i64);
    });
}
