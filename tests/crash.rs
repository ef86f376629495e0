//! Durability: the real `cascade` binary is killed with SIGKILL in the middle of 2,000 jobs and
//! started again on the same data directory. Every acknowledged job must succeed; no step that
//! had finished (as stored) may run again; interrupted steps run again with the same idempotency
//! key. The simulated upstream appends every key it accepts to a file, which outlives the
//! process and tells what really ran.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use cascade_orchestrator::api::pb;
use common::{connect, free_port, server_dir, spawn, spawn_configured_store, submit};
use futures::StreamExt;

mod common;
#[path = "support/postgres.rs"]
mod postgres;

const JOBS: usize = 2000;
const AGENTS: [&str; 3] = ["fetch", "think", "write"];

fn key_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(String::from)
        .collect()
}

/// Steps stored as succeeded, read from the SQLite file while no server runs.
fn finished_steps(db: &Path) -> HashSet<String> {
    let conn = rusqlite::Connection::open(db).unwrap();
    let mut stmt = conn
        .prepare("SELECT job_id, agent FROM steps WHERE state = 'succeeded'")
        .unwrap();
    stmt.query_map([], |r| {
        Ok(format!(
            "{}/{}",
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?
        ))
    })
    .unwrap()
    .collect::<Result<_, _>>()
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_mid_run_loses_no_job_and_reruns_no_finished_step() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("node-0/data/cascade.db");
    let setup = Setup {
        nodes: 1,
        config: Box::new(|_| String::new()),
        spawn,
        finished_steps: Box::new(move |_| finished_steps(&db)),
        leased_by: Box::new(|_| 0),
        takeover: Box::new(|_| None),
    };
    sigkill_mid_run(dir, setup).await;
}

/// A query on the test's PostgreSQL database from a synchronous closure.
fn pg_query<T: Send + 'static>(
    url: &str,
    sql: &'static str,
    arg: Option<String>,
    read: fn(&cascade_orchestrator::store::pg_schema::Row) -> T,
) -> Vec<T> {
    let url = url.to_string();
    tokio::task::block_in_place(|| {
        tokio::runtime::Handle::current().block_on(async move {
            let c = cascade_orchestrator::store::pg_schema::connect(&url, None)
                .await
                .unwrap();
            let rows = match &arg {
                Some(a) => c.query(sql, &[a]).await,
                None => c.query(sql, &[]).await,
            };
            rows.unwrap().iter().map(read).collect()
        })
    })
}

/// PostgreSQL servers for [`Setup`]: node `i` of `url` keeps its audit log in its own directory.
fn pg_setup(url: String, dir: &Path, nodes: usize, lease: &str) -> Setup {
    let (config_url, steps_url, lease_url, takeover_url) =
        (url.clone(), url.clone(), url.clone(), url);
    let dir = dir.to_path_buf();
    let lease = lease.to_string();
    Setup {
        nodes,
        config: Box::new(move |i| {
            format!(
                "[server]\nstore = \"{config_url}\"\nlease = \"{lease}\"\ndata_dir = \"{}\"\n",
                dir.join(format!("node-{i}/data")).display()
            )
        }),
        spawn: spawn_configured_store,
        // Steps stored as succeeded, of the jobs node `owner` still leases (all without one).
        finished_steps: Box::new(move |owner| {
            match owner {
                None => pg_query(
                    &steps_url,
                    "SELECT job_id || '/' || agent FROM steps WHERE state = 'succeeded'",
                    None,
                    |r| r.get::<_, String>(0),
                ),
                Some(node) => pg_query(
                    &steps_url,
                    "SELECT s.job_id || '/' || s.agent FROM steps s JOIN jobs j ON j.id = s.job_id
                 WHERE s.state = 'succeeded' AND j.lease_owner = $1",
                    Some(node.to_string()),
                    |r| r.get::<_, String>(0),
                ),
            }
            .into_iter()
            .collect()
        }),
        leased_by: Box::new(move |node| {
            pg_query(
                &lease_url,
                "SELECT count(*) FROM jobs WHERE lease_owner = $1
                   AND state IN ('pending', 'running', 'awaiting_approval', 'budget_exceeded')",
                Some(node.to_string()),
                |r| r.get::<_, i64>(0),
            )[0] as usize
        }),
        // Every job was submitted before the kill: a lease taken after the dead node's last
        // heartbeat is a takeover.
        takeover: Box::new(move |node| {
            pg_query(
                &takeover_url,
                "SELECT extract(epoch FROM max(j.leased_at) - min(n.heartbeat_at))::float8
                 FROM jobs j JOIN nodes n ON n.id = $1
                 WHERE j.leased_at > n.heartbeat_at AND j.lease_owner <> $1",
                Some(node.to_string()),
                |r| r.get::<_, Option<f64>>(0),
            )[0]
        }),
    }
}

/// The same on PostgreSQL: the store is a database, not a file in the data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn postgres_sigkill_mid_run_loses_no_job_and_reruns_no_finished_step() {
    let pg = postgres::Postgres::start();
    let url = pg.database("crash").await;
    let dir = tempfile::tempdir().unwrap();
    let setup = pg_setup(url, dir.path(), 1, "10s");
    sigkill_mid_run(dir, setup).await;
    drop(pg);
}

/// Three nodes on one database; one is killed and not started again: the other two take its
/// jobs over once its lease ran out, and every acknowledged job finishes, none twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn postgres_sigkill_of_one_node_of_three_its_jobs_are_taken_over() {
    let pg = postgres::Postgres::start();
    let url = pg.database("takeover").await;
    let dir = tempfile::tempdir().unwrap();
    let setup = pg_setup(url, dir.path(), 3, "2s");
    sigkill_mid_run(dir, setup).await;
    drop(pg);
}

/// Steps stored as succeeded, of the jobs a node leases (all, without one).
type StepsOf = dyn Fn(Option<&str>) -> HashSet<String>;

/// Seconds from a dead node's last heartbeat to its last job leased again, if any.
type Takeover = dyn Fn(&str) -> Option<f64>;

/// How the servers of [`sigkill_mid_run`] keep their jobs.
struct Setup {
    nodes: usize,
    /// Node `i`'s `cascade.toml` lines after its graphs.
    config: Box<dyn Fn(usize) -> String>,
    spawn: fn(&Path, u16, u16) -> common::Server,
    /// Steps stored as succeeded (of the jobs the named node leases, where the store knows).
    finished_steps: Box<StepsOf>,
    /// Unfinished jobs the named node leases.
    leased_by: Box<dyn Fn(&str) -> usize>,
    /// How long after the named (dead) node's last heartbeat its last job was taken over, by
    /// the database's clock (seconds; `None` without a cluster).
    takeover: Box<Takeover>,
}

/// 2,000 jobs of three steps submitted across the nodes of `setup`, SIGKILL of node 0 once a
/// quarter of the steps ran; then, with one node, a restart; with several, the others take its
/// jobs over. Every acknowledged job succeeds, every step reached the upstream, no step stored
/// as finished ran again, and the steps cut by the kill ran again with their keys.
async fn sigkill_mid_run(dir: tempfile::TempDir, setup: Setup) {
    let keys = dir.path().join("keys.log");
    // 64 jobs in flight across the nodes: the kill comes while many are unfinished.
    let mut graph = format!(
        "[graph]\nname = \"durable\"\nmax_in_flight_jobs = {}\nmax_pending_jobs = 10000\n",
        64 / setup.nodes
    );
    for (i, a) in AGENTS.iter().enumerate() {
        graph += &format!(
            "[agents.{a}]\nkind = \"sim\"\nlatency = \"40ms\"\nupstream = \"crash-upstream\"\nkey_log = \"{}\"\n",
            keys.display()
        );
        if i > 0 {
            graph += &format!("after = [\"{}\"]\n", AGENTS[i - 1]);
        }
    }
    std::fs::create_dir_all(dir.path().join("graphs")).unwrap();
    std::fs::write(dir.path().join("graphs/durable.toml"), graph).unwrap();
    let node_dirs: Vec<std::path::PathBuf> = (0..setup.nodes)
        .map(|i| {
            let d = dir.path().join(format!("node-{i}"));
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(
                d.join("cascade.toml"),
                format!(
                    "graphs = [\"{}\"]\n{}",
                    dir.path().join("graphs").display(),
                    (setup.config)(i)
                ),
            )
            .unwrap();
            d
        })
        .collect();

    let t0 = Instant::now();
    let ports: Vec<(u16, u16)> = (0..setup.nodes)
        .map(|_| (free_port(), free_port()))
        .collect();
    let mut servers: Vec<common::Server> = node_dirs
        .iter()
        .zip(&ports)
        .map(|(d, (grpc, http))| (setup.spawn)(d, *grpc, *http))
        .collect();
    let mut clients = Vec::new();
    for (grpc, _) in &ports {
        clients.push(connect(*grpc).await);
    }
    let ids: Vec<String> = futures::stream::iter(0..JOBS)
        .map(|i| {
            let mut c = clients[i % clients.len()].clone();
            async move {
                c.submit_job(pb::SubmitJobRequest {
                    graph: "durable".into(),
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
        .await;
    assert_eq!(ids.len(), JOBS);
    eprintln!("submitted in {:?}", t0.elapsed());

    // Let a good part of the work happen, then SIGKILL node 0 (no shutdown of any kind).
    let deadline = Instant::now() + Duration::from_secs(60);
    while key_lines(&keys).len() < JOBS * AGENTS.len() / 4 {
        assert!(Instant::now() < deadline, "the server made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    servers[0].child.kill().unwrap();
    servers[0].child.wait().unwrap();
    let killed_at = Instant::now();
    let lines_before = key_lines(&keys).len();
    let node0 = format!(
        "{}:{}",
        cascade_orchestrator::store::host_name(),
        ports[0].0
    );
    drop(clients);
    // The other nodes keep working: only the killed node's jobs are frozen until taken over.
    let several = setup.nodes > 1;
    let done_before = (setup.finished_steps)(several.then_some(node0.as_str()));
    assert!(
        !done_before.is_empty(),
        "some steps had finished before the kill"
    );
    assert!(
        done_before.len() < JOBS * AGENTS.len(),
        "the kill came mid-run"
    );

    eprintln!("killed at {:?}", t0.elapsed());
    let mut client = if several {
        // Its leases run out and the others take its jobs over.
        let held = (setup.leased_by)(&node0);
        assert!(held > 0, "the killed node held unfinished jobs");
        // Its last heartbeat was at most a quarter lease (2 s) before the kill, and the others
        // look again the moment its lease runs out: taken over within the lease, give or take
        // the claim's own time; twice the lease is the bound a slow machine still meets.
        let deadline = killed_at + Duration::from_secs(4);
        while (setup.leased_by)(&node0) > 0 {
            assert!(
                Instant::now() < deadline,
                "the killed node's jobs were not taken over within twice the lease"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "{held} jobs of the killed node taken over {:?} after the kill",
            killed_at.elapsed()
        );
        // Exactly, by the database's clock: from its last heartbeat, the lease (2 s) and the
        // round that claims them.
        let after = (setup.takeover)(&node0).expect("its jobs were leased again");
        eprintln!("taken over {after:.3} s after its last heartbeat");
        assert!(
            (2.0..=2.5).contains(&after),
            "the killed node's last job was taken over {after:.3} s after its last heartbeat (lease: 2 s)"
        );
        let mut c = connect(ports[1].0).await;
        // Every node knows the cluster: the killed one is dead and holds nothing.
        let nodes = c
            .list_nodes(pb::ListNodesRequest {})
            .await
            .unwrap()
            .into_inner()
            .nodes;
        assert_eq!(nodes.len(), setup.nodes, "{nodes:?}");
        let dead: Vec<&pb::Node> = nodes.iter().filter(|n| !n.alive).collect();
        assert_eq!(dead.len(), 1, "{nodes:?}");
        assert_eq!(
            (dead[0].id.as_str(), dead[0].jobs_leased),
            (node0.as_str(), 0)
        );
        let me = nodes.iter().find(|n| n.this_node).expect("the node asked");
        assert_eq!(me.address, format!("127.0.0.1:{}", ports[1].0));
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
            .args([
                "nodes",
                "--server",
                &format!("http://127.0.0.1:{}", ports[2].0),
            ])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "{text}");
        assert!(
            text.lines()
                .any(|l| l.starts_with(&node0) && l.contains("dead")),
            "{text}"
        );
        assert_eq!(text.matches("alive").count(), 2, "{text}");
        c
    } else {
        servers[0] = (setup.spawn)(&node_dirs[0], ports[0].0, ports[0].1);
        eprintln!("restarted at {:?}", t0.elapsed());
        connect(ports[0].0).await
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    for id in &ids {
        loop {
            let job = client
                .get_job(pb::GetJobRequest { job_id: id.clone() })
                .await
                .expect("every acknowledged job is still known")
                .into_inner();
            if job.state == pb::JobState::Succeeded as i32 {
                break;
            }
            assert!(
                job.state != pb::JobState::Failed as i32
                    && job.state != pb::JobState::Cancelled as i32,
                "job {id} ended {}: {}",
                job.state,
                job.error
            );
            assert!(
                Instant::now() < deadline,
                "job {id} did not finish after the restart"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    eprintln!("all done at {:?}", t0.elapsed());
    let log = std::fs::read_to_string(node_dirs[0].join("server.log")).unwrap_or_default();
    eprintln!(
        "{}",
        log.lines().rev().take(15).collect::<Vec<_>>().join("\n")
    );
    let lines = key_lines(&keys);
    let expected: HashSet<String> = ids
        .iter()
        .flat_map(|id| AGENTS.iter().map(move |a| format!("{id}/{a}")))
        .collect();
    let mut counts: HashMap<&str, usize> = HashMap::new();
    for l in &lines {
        assert!(
            expected.contains(l),
            "the upstream saw a key no step should have: {l}"
        );
        *counts.entry(l).or_default() += 1;
    }
    assert_eq!(
        counts.len(),
        expected.len(),
        "every step reached the upstream"
    );
    for l in &lines[lines_before..] {
        assert!(
            !done_before.contains(l),
            "step {l} had finished before the kill and ran again"
        );
    }
    let rerun = counts.values().filter(|&&n| n > 1).count();
    // Calls in flight at the kill (40 ms each, up to 64 jobs at once) reached the upstream and
    // never finished: after the restart they ran again, with the keys they had.
    assert!(
        rerun > 0,
        "no step that was in flight at the kill ran again with its original key"
    );
    let rerun_after: HashSet<&str> = lines[lines_before..]
        .iter()
        .map(String::as_str)
        .filter(|l| lines[..lines_before].iter().any(|b| b == l))
        .collect();
    assert_eq!(
        rerun_after.len(),
        rerun,
        "every key seen twice was a step interrupted by the kill and run again after the restart"
    );
    eprintln!(
        "crash test: {} steps done before the kill, {} calls after the restart, {} steps ran again with their original key",
        done_before.len(),
        lines.len() - lines_before,
        rerun
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_lets_in_flight_jobs_finish_and_exits_cleanly() {
    let dir = server_dir(
        &[(
            "slow.toml",
            "[graph]\nname = \"slow\"\n[agents.wait]\nkind = \"sim\"\nlatency = \"1s\"\n",
        )],
        "[server]\nshutdown_grace = \"10s\"\n",
    );
    let (grpc, http) = (free_port(), free_port());
    let mut server = spawn(dir.path(), grpc, http);
    let mut client = connect(grpc).await;
    let id = submit(&mut client, "slow", "{}").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    // SIGTERM: stop admitting, let the running call finish, exit 0.
    let exit = server.terminate();
    assert!(exit.success(), "exit status {exit}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(500) && took < Duration::from_secs(10),
        "{took:?}"
    );
    let db = rusqlite::Connection::open(dir.path().join("data/cascade.db")).unwrap();
    let state: String = db
        .query_row("SELECT state FROM jobs WHERE id = ?1", [&id], |r| r.get(0))
        .unwrap();
    assert_eq!(
        state, "succeeded",
        "the in-flight job finished during the grace period"
    );
}

/// Ctrl-C (SIGINT) is a graceful stop like SIGTERM: admission stops at once (every submission
/// after the first refused one is refused too, and every one that was accepted is kept), a call
/// that finishes within `shutdown_grace` finishes, one that would not is cut off at the grace
/// and its job is kept unfinished, and it runs again after a restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigint_stops_admission_and_the_grace_cuts_off_what_would_not_finish() {
    let dir = server_dir(
        &[
            (
                "mixed.toml",
                "[graph]\nname = \"quick\"\n[agents.wait]\nkind = \"sim\"\nlatency = \"1500ms\"\n",
            ),
            (
                "stuck.toml",
                "[graph]\nname = \"stuck\"\n[agents.wait]\nkind = \"sim\"\nlatency = \"1h\"\n",
            ),
        ],
        "[server]\nshutdown_grace = \"3s\"\n",
    );
    let (grpc, http) = (free_port(), free_port());
    let mut server = spawn(dir.path(), grpc, http);
    let mut client = connect(grpc).await;
    let quick = submit(&mut client, "quick", "{}").await;
    let stuck = submit(&mut client, "stuck", "{}").await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let t = Instant::now();
    let status = std::process::Command::new("kill")
        .args(["-INT", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // Keep submitting: once one is refused, no later one is accepted.
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..200 {
        let r = client
            .submit_job(pb::SubmitJobRequest {
                graph: "quick".into(),
                input_json: format!(r#"{{"after_signal": {i}}}"#),
                ..Default::default()
            })
            .await;
        match r {
            Ok(r) => {
                assert_eq!(
                    refused, 0,
                    "a submission was accepted after one was refused"
                );
                accepted.push(r.into_inner().job_id);
            }
            Err(e) => {
                // UNAVAILABLE from the service while it stops admitting, or a transport error
                // once the connection closes (GOAWAY, refused): either way, not accepted.
                assert_ne!(e.code(), tonic::Code::InvalidArgument, "{e:?}");
                refused += 1;
                if refused >= 5 {
                    break;
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(refused >= 5, "admission never stopped");
    let exit = server.child.wait().unwrap();
    let took = t.elapsed();
    assert!(exit.success(), "exit status {exit}");
    // The quick call (1.5 s) finished; the stuck one was cut off at the 3 s grace.
    assert!(
        took >= Duration::from_millis(2500) && took < Duration::from_secs(10),
        "{took:?}"
    );
    {
        let db = rusqlite::Connection::open(dir.path().join("data/cascade.db")).unwrap();
        let state = |id: &str| -> String {
            db.query_row("SELECT state FROM jobs WHERE id = ?1", [id], |r| r.get(0))
                .unwrap_or_else(|e| panic!("job {id} is not in the store: {e}"))
        };
        assert_eq!(state(&quick), "succeeded");
        assert_eq!(
            state(&stuck),
            "running",
            "kept unfinished for the next start"
        );
        for id in &accepted {
            state(id);
        }
    }
    let _server = spawn(dir.path(), grpc, http);
    let mut client = connect(grpc).await;
    let job = client
        .get_job(pb::GetJobRequest {
            job_id: stuck.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, pb::JobState::Running as i32, "{job:?}");
    // Every job accepted before admission stopped is run after the restart.
    for id in &accepted {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let job = client
                .get_job(pb::GetJobRequest { job_id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            if job.state == pb::JobState::Succeeded as i32 {
                break;
            }
            assert!(Instant::now() < deadline, "{job:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}
