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
    let db = dir.path().join("data/cascade.db");
    sigkill_mid_run(dir, "", spawn, move || finished_steps(&db)).await;
}

/// The same on PostgreSQL: the store is a database, not a file in the data directory.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn postgres_sigkill_mid_run_loses_no_job_and_reruns_no_finished_step() {
    let pg = postgres::Postgres::start();
    let url = pg.database("crash").await;
    let dir = tempfile::tempdir().unwrap();
    let config = format!("[server]\nstore = \"{url}\"\n");
    let finished = move || {
        let url = url.clone();
        tokio::task::block_in_place(|| {
            tokio::runtime::Handle::current().block_on(async move {
                let c = cascade_orchestrator::store::pg_schema::connect(&url, None)
                    .await
                    .unwrap();
                c.query(
                    "SELECT job_id || '/' || agent FROM steps WHERE state = 'succeeded'",
                    &[],
                )
                .await
                .unwrap()
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect()
            })
        })
    };
    sigkill_mid_run(dir, &config, spawn_configured_store, finished).await;
    drop(pg);
}

/// 2,000 jobs of three steps on the server of `dir` (its store set by `config`), SIGKILL once
/// a quarter of the steps ran, a restart: every acknowledged job succeeds, every step reached
/// the upstream, no step stored as finished ran again, and the steps cut by the kill ran
/// again with their keys.
async fn sigkill_mid_run(
    dir: tempfile::TempDir,
    config: &str,
    spawn: fn(&Path, u16, u16) -> common::Server,
    finished_steps: impl Fn() -> HashSet<String>,
) {
    let keys = dir.path().join("keys.log");
    let mut graph = String::from(
        "[graph]\nname = \"durable\"\nmax_in_flight_jobs = 64\nmax_pending_jobs = 10000\n",
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
    std::fs::write(
        dir.path().join("cascade.toml"),
        format!("graphs = [\"graphs\"]\n{config}"),
    )
    .unwrap();

    let t0 = Instant::now();
    let (grpc, http) = (free_port(), free_port());
    let mut server = spawn(dir.path(), grpc, http);
    let client = connect(grpc).await;
    let ids: Vec<String> = futures::stream::iter(0..JOBS)
        .map(|i| {
            let mut c = client.clone();
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

    // Let a good part of the work happen, then SIGKILL (no shutdown of any kind).
    let deadline = Instant::now() + Duration::from_secs(60);
    while key_lines(&keys).len() < JOBS * AGENTS.len() / 4 {
        assert!(Instant::now() < deadline, "the server made no progress");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    server.child.kill().unwrap();
    server.child.wait().unwrap();
    drop(client);

    let done_before = finished_steps();
    let lines_before = key_lines(&keys).len();
    assert!(
        !done_before.is_empty(),
        "some steps had finished before the kill"
    );
    assert!(
        done_before.len() < JOBS * AGENTS.len(),
        "the kill came mid-run"
    );

    eprintln!("killed at {:?}", t0.elapsed());
    let _server = spawn(dir.path(), grpc, http);
    let mut client = connect(grpc).await;
    eprintln!("restarted at {:?}", t0.elapsed());
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
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap_or_default();
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
