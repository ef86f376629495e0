//! The PostgreSQL store against a real PostgreSQL 15, held to the same contract as the SQLite
//! store (each contract test runs on both): a reopened store has every job, step, event and
//! idempotency key; a full writer refuses new jobs as retryable and loses nothing it accepted.
//! Then what only a shared database does: an idempotency key is unique across two stores (two
//! nodes) on one database, and a restart of PostgreSQL in the middle of submissions loses no
//! acknowledged job.

#[path = "support/postgres.rs"]
mod postgres;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use cascade_orchestrator::job::{JobId, JobState, JobUpdate, StepState};
use cascade_orchestrator::store::{
    JobFilter, JobStore, NewJob, PgOptions, PgStore, SqliteOptions, SqliteStore, StoreError,
};
use serde_json::{Value, json};

fn new_job(key: Option<&str>, input: Value) -> NewJob {
    NewJob {
        id: JobId::new(),
        graph: "g".into(),
        agents: vec!["a".into(), "b".into()].into(),
        input: Arc::new(input),
        labels: BTreeMap::from([("team".to_string(), "blue".to_string())]),
        idempotency_key: key.map(String::from),
        tenant: "t".into(),
        max_pending: 100_000,
        tenant_max_pending: None,
        deadline: Some(Duration::from_secs(30)),
        callback_url: None,
        budget: None,
    }
}

type Opener = Box<dyn Fn() -> Arc<dyn JobStore>>;

/// A store opened again on the same file or database has what the first one wrote.
async fn reopen_keeps_steps_events_and_keys(open: Opener) {
    let (a, b, done);
    {
        let s = open();
        a = s
            .submit(new_job(Some("k1"), json!({"n": 1})))
            .await
            .unwrap()
            .id;
        b = s.submit(new_job(None, json!({"n": 2}))).await.unwrap().id;
        done = s
            .submit(new_job(Some("k3"), json!({"n": 3})))
            .await
            .unwrap()
            .id;
        // a runs one step; b stays pending; done finishes.
        assert_eq!(s.claim_pending("g", 1).unwrap()[0].id, a);
        s.update(a, JobUpdate::Started).unwrap();
        s.update(
            a,
            JobUpdate::StepStarted {
                step: 0,
                attempt: 1,
            },
        )
        .unwrap();
        s.update(
            a,
            JobUpdate::StepSucceeded {
                step: 0,
                attempt: 1,
                output: Arc::new(json!({"ok": true, "z": 1, "a": [1, 2]})),
                usage: Default::default(),
            },
        )
        .unwrap();
        let claimed: Vec<JobId> = s
            .claim_pending("g", 5)
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert!(claimed.contains(&done));
        s.update(done, JobUpdate::Started).unwrap();
        s.update(
            done,
            JobUpdate::Finished {
                state: JobState::Succeeded,
                output: Some(Arc::new(json!({"b": 2}))),
                error: None,
            },
        )
        .unwrap();
        s.flush().await.unwrap();
    }
    let s = open();
    let running = s.running("g").unwrap();
    let r = running.iter().find(|r| r.id == a).expect("a is running");
    assert_eq!(r.steps[0].state, StepState::Succeeded);
    assert_eq!(
        r.steps[0].output.as_deref(),
        Some(&json!({"ok": true, "z": 1, "a": [1, 2]}))
    );
    assert_eq!(r.steps[1].state, StepState::Waiting);
    assert_eq!(r.deadline, Some(Duration::from_secs(30)));
    assert_eq!(r.labels.get("team").map(String::as_str), Some("blue"));
    assert_eq!(s.events(a, 0).unwrap().len(), 4);
    // b was pending, and is pending again; a claimed job that was never started is too.
    let pending: Vec<JobId> = s
        .claim_pending("g", 5)
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    assert!(pending.contains(&b), "{pending:?}");
    // The finished job is read back from the database, and listed by its labels.
    let f = s.get(done).unwrap().unwrap();
    assert_eq!(f.state, JobState::Succeeded);
    assert_eq!(f.output.as_deref(), Some(&json!({"b": 2})));
    assert_eq!(f.steps[1].state, StepState::Cancelled);
    assert!(s.events(done, 0).unwrap().last().unwrap().kind.is_final());
    let listed = s
        .list(&JobFilter {
            graph: Some("g".into()),
            state: Some(JobState::Succeeded),
            labels: BTreeMap::from([("team".to_string(), "blue".to_string())]),
            limit: 10,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(listed.iter().map(|r| r.id).collect::<Vec<_>>(), vec![done]);
    let none = s
        .list(&JobFilter {
            labels: BTreeMap::from([("team".to_string(), "red".to_string())]),
            ..Default::default()
        })
        .unwrap();
    assert!(none.is_empty());
    let all = s.list(&JobFilter::default()).unwrap();
    assert_eq!(all.len(), 3, "newest first, every job");
    assert!(all.windows(2).all(|w| w[0].id > w[1].id));
    // The keys survive: the same input gets the same job, another input a conflict.
    let again = s
        .submit(new_job(Some("k1"), json!({"n": 1})))
        .await
        .unwrap();
    assert_eq!((again.id, again.deduplicated), (a, true));
    let again = s
        .submit(new_job(Some("k3"), json!({"n": 3})))
        .await
        .unwrap();
    assert_eq!((again.id, again.deduplicated), (done, true));
    let conflict = s
        .submit(new_job(Some("k1"), json!({"n": 9})))
        .await
        .unwrap_err();
    assert!(matches!(conflict, StoreError::KeyConflict { .. }));
    assert_eq!(s.tenant_of(done).unwrap().as_deref(), Some("t"));
    assert!(s.get(JobId::new()).unwrap().is_none());
}

/// A writer with more waiting than its capacity refuses new jobs as retryable, and takes them
/// once it caught up; nothing accepted is lost.
/// `stall` makes the writer slow (SQLite: fsync'd commits; PostgreSQL: the server stopped),
/// `resume` lets it catch up.
async fn a_full_writer_refuses_and_loses_nothing(
    s: Arc<dyn JobStore>,
    stall: impl FnOnce(),
    resume: impl FnOnce(),
) {
    let accepted = s
        .submit(new_job(Some("first"), json!({})))
        .await
        .unwrap()
        .id;
    s.claim_pending("g", 1).unwrap();
    stall();
    s.update(accepted, JobUpdate::Started).unwrap();
    for attempt in 1..=2_000 {
        s.update(accepted, JobUpdate::StepStarted { step: 0, attempt })
            .unwrap();
    }
    let refused = s.submit(new_job(Some("second"), json!({}))).await;
    assert!(
        matches!(refused, Err(StoreError::Busy { queued }) if queued >= 4),
        "{refused:?}"
    );
    assert!(refused.unwrap_err().is_retryable());
    resume();
    s.flush().await.unwrap();
    let second = s.submit(new_job(Some("second"), json!({}))).await.unwrap();
    assert!(!second.deduplicated);
    assert_eq!(s.get(accepted).unwrap().unwrap().steps[0].attempts, 2_000);
}

fn sqlite_opener(dir: &tempfile::TempDir) -> Opener {
    let path = dir.path().join("cascade.db");
    Box::new(move || {
        let mut o = SqliteOptions::new(&path);
        o.fsync = false;
        Arc::new(SqliteStore::open(o).unwrap())
    })
}

fn pg_opener(url: String) -> Opener {
    Box::new(move || Arc::new(PgStore::open(PgOptions::new(url.clone())).unwrap()))
}

#[tokio::test]
async fn sqlite_store_keeps_the_contract() {
    let dir = tempfile::tempdir().unwrap();
    reopen_keeps_steps_events_and_keys(sqlite_opener(&dir)).await;
    let dir = tempfile::tempdir().unwrap();
    let mut o = SqliteOptions::new(dir.path().join("cascade.db"));
    o.queue_capacity = 4;
    a_full_writer_refuses_and_loses_nothing(Arc::new(SqliteStore::open(o).unwrap()), || (), || ())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn postgres_store_keeps_the_contract() {
    let pg = postgres::Postgres::start();
    reopen_keeps_steps_events_and_keys(pg_opener(pg.database("contract").await)).await;
    let mut o = PgOptions::new(pg.database("full_writer").await);
    o.queue_capacity = 4;
    a_full_writer_refuses_and_loses_nothing(
        Arc::new(PgStore::open(o).unwrap()),
        || pg.stop(),
        || pg.start_again(),
    )
    .await;
}

/// Two stores on one database are two nodes: a key taken on one is the same job on the other
/// (or a conflict), never a second job, even when both submit it at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn an_idempotency_key_names_one_job_across_nodes() {
    let pg = postgres::Postgres::start();
    let url = pg.database("keys").await;
    let one = Arc::new(PgStore::open(PgOptions::new(url.clone())).unwrap());
    let two = Arc::new(PgStore::open(PgOptions::new(url.clone())).unwrap());
    let first = one
        .submit(new_job(Some("order-1"), json!({"o": 1})))
        .await
        .unwrap();
    let seen = two
        .submit(new_job(Some("order-1"), json!({"o": 1})))
        .await
        .unwrap();
    assert_eq!((seen.id, seen.deduplicated), (first.id, true));
    let conflict = two
        .submit(new_job(Some("order-1"), json!({"o": 2})))
        .await
        .unwrap_err();
    assert!(
        matches!(&conflict, StoreError::KeyConflict { existing, .. } if *existing == first.id),
        "{conflict:?}"
    );
    // 200 keys, each submitted by both nodes at the same moment: one job per key. Each node's
    // scheduler claims what it can meanwhile, as a server's does: the job of a node that loses
    // its key's race must never be claimable (its calls would carry another job's keys).
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let claimer = |store: Arc<PgStore>| {
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut claimed = Vec::new();
            loop {
                let done = stop.load(std::sync::atomic::Ordering::SeqCst);
                claimed.extend(
                    store
                        .claim_pending("g", 1000)
                        .unwrap()
                        .into_iter()
                        .map(|r| r.id),
                );
                if done {
                    return claimed;
                }
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        })
    };
    let claimers = [claimer(one.clone()), claimer(two.clone())];
    let mut racing = Vec::new();
    for i in 0..200 {
        let key = format!("race-{i}");
        let (a, b) = tokio::join!(
            one.submit(new_job(Some(&key), json!({"i": i}))),
            two.submit(new_job(Some(&key), json!({"i": i})))
        );
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.id, b.id, "key {key}: two jobs");
        assert!(a.deduplicated != b.deduplicated, "key {key}: {a:?} {b:?}");
        racing.push(a.id);
    }
    one.flush().await.unwrap();
    two.flush().await.unwrap();
    let listed = one
        .list(&JobFilter {
            limit: 1000,
            ..Default::default()
        })
        .unwrap();
    assert_eq!(listed.len(), 201);
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let mut claimed = Vec::new();
    for c in claimers {
        claimed.extend(c.await.unwrap());
    }
    // Each job was claimed once, on the node whose insert won, and no other was claimable.
    let stored: HashSet<JobId> = racing.iter().copied().chain([first.id]).collect();
    let unique: HashSet<JobId> = claimed.iter().copied().collect();
    assert_eq!(unique.len(), claimed.len(), "a job was claimed twice");
    let strays = unique.difference(&stored).count();
    assert_eq!(strays, 0, "jobs that lost their key's race were claimable");
    assert_eq!(unique.len(), stored.len(), "every stored job was claimed");
    assert_eq!(one.pending_count("g") + two.pending_count("g"), 0);

    // A submitter that goes away before the answer (a client's deadline) leaves no keyed job
    // held out of the queue: it is claimable once stored.
    drop(one.submit(new_job(Some("gone"), json!({"g": 1}))));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let claimed = one.claim_pending("g", 10).unwrap();
        if !claimed.is_empty() {
            assert_eq!(claimed.len(), 1);
            assert_eq!(claimed[0].idempotency_key.as_deref(), Some("gone"));
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "a keyed job whose submitter went away was never claimable"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// PostgreSQL restarts while jobs are being submitted: submissions during the outage wait (or
/// are refused as retryable), the writer reconnects, and every acknowledged job is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn a_postgres_restart_loses_no_acknowledged_job() {
    let before = reconnects();
    let pg = postgres::Postgres::start();
    let url = pg.database("restart").await;
    let store: Arc<dyn JobStore> = Arc::new(PgStore::open(PgOptions::new(url.clone())).unwrap());
    let submitter = {
        let store = store.clone();
        tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut refused = 0;
            for i in 0..600 {
                match store
                    .submit(new_job(Some(&format!("r-{i}")), json!({"i": i})))
                    .await
                {
                    Ok(s) => {
                        // A batch committed again after the restart is not its own duplicate.
                        assert!(!s.deduplicated, "{s:?}");
                        acked.push(s.id)
                    }
                    Err(e) => {
                        assert!(e.is_retryable(), "{e}");
                        refused += 1;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            (acked, refused)
        })
    };
    tokio::time::sleep(Duration::from_millis(800)).await;
    let stopper = tokio::task::spawn_blocking(move || {
        pg.stop();
        std::thread::sleep(Duration::from_secs(2));
        pg.start_again();
        pg
    });
    let (acked, refused) = submitter.await.unwrap();
    let _pg = stopper.await.unwrap();
    store.flush().await.unwrap();
    eprintln!(
        "{} acknowledged, {refused} refused as retryable",
        acked.len()
    );
    assert_eq!(
        store.pending_count("g"),
        acked.len(),
        "each acknowledged job waits to run here"
    );
    assert!(
        acked.len() >= 300,
        "most submissions were held, not refused"
    );
    // A fresh store (another node, or this one restarted) reads every acknowledged job.
    let fresh = PgStore::open(PgOptions::new(url)).unwrap();
    let stored: HashSet<JobId> = fresh
        .list(&JobFilter {
            limit: 10_000,
            ..Default::default()
        })
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    let lost: Vec<&JobId> = acked.iter().filter(|id| !stored.contains(id)).collect();
    assert!(lost.is_empty(), "{} acknowledged jobs lost", lost.len());
    let after = reconnects();
    assert!(after > before, "the writer reconnected: {before} → {after}");
}

/// Node A stops renewing its heartbeat (it is gone); node B takes its unfinished jobs over once
/// A's lease ran out: the pending ones queue, the running ones are handed to the scheduler to
/// resume, and the graph is woken. A node whose job was taken over writes nothing more to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn a_dead_nodes_jobs_are_taken_over_and_a_late_write_is_fenced() {
    let pg = postgres::Postgres::start();
    let url = pg.database("takeover").await;
    let options = |node: &str| {
        let mut o = PgOptions::new(url.clone());
        o.node_id = node.into();
        o.lease = Duration::from_secs(1);
        o
    };
    let a = PgStore::open(options("a")).unwrap();
    let mut ids = Vec::new();
    for i in 0..20 {
        ids.push(a.submit(new_job(None, json!({"i": i}))).await.unwrap().id);
    }
    let running: Vec<JobId> = a
        .claim_pending("g", 5)
        .unwrap()
        .iter()
        .map(|r| r.id)
        .collect();
    for id in &running {
        a.update(*id, JobUpdate::Started).unwrap();
    }
    a.flush().await.unwrap();
    drop(a);

    // B starts while A's heartbeat is fresh: A's jobs are A's.
    let b = PgStore::open(options("b")).unwrap();
    assert!(b.running("g").unwrap().is_empty());
    assert_eq!(b.pending_count("g"), 0);
    let woken = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let w = woken.clone();
    b.set_waker(Arc::new(move |g: &str| {
        w.lock().unwrap().push(g.to_string())
    }));
    let t = std::time::Instant::now();
    while woken.lock().unwrap().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "A's jobs were not taken over"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("taken over {:?} after A stopped", t.elapsed());
    assert_eq!(woken.lock().unwrap().as_slice(), ["g"]);
    let mut resumed: Vec<JobId> = b.adopted("g", 100).iter().map(|r| r.id).collect();
    resumed.sort();
    let mut expected = running.clone();
    expected.sort();
    assert_eq!(resumed, expected, "the running jobs, to resume");
    assert!(b.adopted("g", 100).is_empty(), "each is handed over once");
    assert_eq!(b.pending_count("g"), 15);

    // C takes one of them from B (as after a heartbeat of B's came too late): B's later
    // change to it is not written.
    let sql = cascade_orchestrator::store::pg_schema::connect(&url, None)
        .await
        .unwrap();
    let taken = running[0].to_string();
    sql.execute("UPDATE jobs SET lease_owner = 'c' WHERE id = $1", &[&taken])
        .await
        .unwrap();
    b.update(
        running[0],
        JobUpdate::StepStarted {
            step: 0,
            attempt: 1,
        },
    )
    .unwrap();
    b.update(
        running[1],
        JobUpdate::StepStarted {
            step: 0,
            attempt: 1,
        },
    )
    .unwrap();
    b.flush().await.unwrap();
    let step_state = |id: JobId| {
        let sql = &sql;
        async move {
            sql.query_one(
                "SELECT state FROM steps WHERE job_id = $1 AND idx = 0",
                &[&id.to_string()],
            )
            .await
            .unwrap()
            .get::<_, String>(0)
        }
    };
    assert_eq!(step_state(running[0]).await, "waiting", "fenced");
    assert_eq!(step_state(running[1]).await, "running", "B's own job");
    let owner: Option<String> = sql
        .query_one("SELECT lease_owner FROM jobs WHERE id = $1", &[&taken])
        .await
        .unwrap()
        .get(0);
    assert_eq!(owner.as_deref(), Some("c"));
}

/// A node that stops (SIGTERM) hands its unfinished jobs back and says so: another node takes
/// them at once, long before the stopped node's lease would have run out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn a_stopping_node_hands_its_jobs_back_at_once() {
    let pg = postgres::Postgres::start();
    let url = pg.database("handback").await;
    let options = |node: &str| {
        let mut o = PgOptions::new(url.clone());
        o.node_id = node.into();
        o.lease = Duration::from_secs(60);
        o
    };
    let a = PgStore::open(options("a")).unwrap();
    // B listens; it would look again only in 15 s (a quarter of its lease).
    let b = PgStore::open(options("b")).unwrap();
    for i in 0..10 {
        a.submit(new_job(None, json!({"i": i}))).await.unwrap();
    }
    let running = a.claim_pending("g", 3).unwrap();
    for r in &running {
        a.update(r.id, JobUpdate::Started).unwrap();
    }
    a.flush().await.unwrap();
    a.release().await.unwrap();
    // A's lease (a minute) has not run out; B is told and takes everything A held.
    let t = std::time::Instant::now();
    while b.pending_count("g") < 7 {
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "B was not told of the jobs handed back"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("taken {:?} after the hand-back", t.elapsed());
    assert_eq!(b.adopted("g", 10).len(), 3, "the running ones, to resume");
    let nodes = b.nodes().unwrap().unwrap();
    let gone = nodes.iter().find(|n| n.id == "a").unwrap();
    assert!(!gone.alive && gone.jobs_leased == 0, "{nodes:?}");
    let me = nodes.iter().find(|n| n.this_node).unwrap();
    assert_eq!((me.id.as_str(), me.jobs_leased), ("b", 10));
}

/// `cascade_store_reconnects_total` as this process's recorder sees it.
fn reconnects() -> f64 {
    cascade_orchestrator::metrics::install()
        .render()
        .lines()
        .find(|l| l.starts_with("cascade_store_reconnects_total"))
        .and_then(|l| l.split_whitespace().last()?.parse().ok())
        .unwrap_or(0.0)
}

/// A new database `name` with Cascade's schema, and a connection to it.
async fn migrated(
    pg: &postgres::Postgres,
    name: &str,
) -> (String, cascade_orchestrator::store::pg_schema::Client) {
    let url = pg.database(name).await;
    let mut c = cascade_orchestrator::store::pg_schema::connect(&url, None)
        .await
        .unwrap();
    cascade_orchestrator::store::pg_schema::migrate(&mut c)
        .await
        .unwrap();
    (url, c)
}

/// Two nodes' audit logs on one database: appended at once from both, every record takes its
/// place in one sequence without gaps, one node at a time signs checkpoints (the other takes
/// over when the signer's session ends), and `verify` reads the whole log from PostgreSQL: it
/// holds, it extends a checkpoint saved earlier, and it names a record altered by hand.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn the_audit_log_keeps_one_order_and_one_signer_across_nodes() {
    use cascade_orchestrator::audit::checkpoint::Signer;
    use cascade_orchestrator::audit::log::{AuditLog, Source, verify};
    use cascade_orchestrator::audit::pg::PgAuditOptions;

    let pg = postgres::Postgres::start();
    let (url, c) = migrated(&pg, "audit").await;
    let origin = "cascade.test/audit";
    let signer = || Signer::from_seed(origin, &[7u8; 32]).unwrap();
    let key = signer().verifier_key();
    let open = |node: &str| {
        let o = PgAuditOptions {
            url: url.clone(),
            password: None,
            node_id: node.into(),
        };
        Arc::new(AuditLog::open_postgres(o, Some(signer()), origin).unwrap())
    };
    let (a, b) = tokio::task::block_in_place(|| (open("node-a"), open("node-b")));

    // Four writers, two per node, 40 batches of 25 records each, all at once.
    const BATCHES: usize = 40;
    const PER_BATCH: usize = 25;
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let log = if w % 2 == 0 { a.clone() } else { b.clone() };
            std::thread::spawn(move || {
                for batch in 0..BATCHES {
                    let records: Vec<(&str, &str, Value)> = (0..PER_BATCH)
                        .map(|i| {
                            (
                                "acme",
                                "decision",
                                json!({"writer": w, "n": batch * PER_BATCH + i}),
                            )
                        })
                        .collect();
                    log.append_all(records).unwrap();
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let total = (4 * BATCHES * PER_BATCH) as u64;

    // One signer: the first to try takes the lock; the other reads the latest checkpoint.
    let (first, second) = tokio::task::block_in_place(|| (a.checkpoint(), b.checkpoint()));
    let saved = first.unwrap().expect("node a signs");
    assert_eq!(second.unwrap().as_deref(), Some(saved.as_str()));
    assert!(a.signs() && !b.signs(), "one node signs");
    tokio::task::block_in_place(|| {
        b.append("acme", "decision", json!({"after": "checkpoint"}))
            .unwrap();
        b.checkpoint().unwrap();
        a.checkpoint().unwrap();
    });
    let source = b.source();
    let v = tokio::task::block_in_place(|| verify(&source, &key, Some(&saved))).unwrap();
    assert_eq!(v.records, total + 1);
    assert_eq!(v.checkpoints, 2);
    assert_eq!(v.extends, Some(total));

    // One order: the sequence is each record's place; each writer's records keep their order,
    // and the two nodes' records are interleaved in it.
    let entries =
        tokio::task::block_in_place(|| cascade_orchestrator::audit::log::records(&source)).unwrap();
    let mut last_n: BTreeMap<u64, i64> = BTreeMap::new();
    let mut nodes_seen = HashSet::new();
    let mut switches = 0;
    let mut previous_node = String::new();
    for (i, (seq, text, _)) in entries.iter().enumerate() {
        assert_eq!(*seq, i as u64 + 1);
        let r: Value = serde_json::from_str(text).unwrap();
        assert_eq!(r["seq"], *seq);
        let node = r["node"].as_str().unwrap().to_string();
        if node != previous_node {
            switches += 1;
            previous_node = node.clone();
        }
        nodes_seen.insert(node);
        if let Some(w) = r["body"]["writer"].as_u64() {
            let n = r["body"]["n"].as_i64().unwrap();
            let before = last_n.insert(w, n).unwrap_or(-1);
            assert!(
                n > before,
                "writer {w}'s record {n} came after its {before}"
            );
        }
    }
    assert_eq!(nodes_seen.len(), 2);
    assert!(
        switches > 2,
        "the nodes' batches did not interleave ({switches})"
    );

    // The signer goes (its session ends): the other node signs the next checkpoint.
    let signers = |log: &AuditLog| match log.source() {
        Source::Postgres(pg) => pg.signers().unwrap(),
        Source::Sqlite(_) => unreachable!(),
    };
    assert!(
        tokio::task::block_in_place(|| signers(&b))
            .iter()
            .all(|(_, n)| n.starts_with("node-a/"))
    );
    drop(a);
    tokio::task::block_in_place(|| {
        b.append("acme", "decision", json!({"after": "signer left"}))
            .unwrap();
        let t0 = std::time::Instant::now();
        while !b.signs() {
            assert!(
                t0.elapsed() < Duration::from_secs(10),
                "node b never took over signing"
            );
            b.checkpoint().unwrap();
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let by = tokio::task::block_in_place(|| signers(&b));
    let (size, last) = by.last().unwrap();
    assert!(*size == total + 2 && last.starts_with("node-b/"), "{by:?}");
    let v = tokio::task::block_in_place(|| verify(&source, &key, Some(&saved))).unwrap();
    assert_eq!((v.records, v.checkpoints), (total + 2, 3));

    // History cannot be rewritten through the database's front door...
    for statement in [
        "UPDATE audit_log SET record = 'x' WHERE seq = 1",
        "DELETE FROM audit_log WHERE seq = 1",
        "TRUNCATE audit_log",
        "DELETE FROM audit_checkpoints",
    ] {
        let e = c.batch_execute(statement).await.unwrap_err();
        assert!(
            cascade_orchestrator::store::pg_schema::describe(&e).contains("append-only"),
            "{statement}: {e}"
        );
    }
    // ...and a superuser's edit behind it is named.
    c.batch_execute(
        "ALTER TABLE audit_log DISABLE TRIGGER USER;
         UPDATE audit_log SET record = replace(record, 'decision', 'approval') WHERE seq = 7;",
    )
    .await
    .unwrap();
    let e = tokio::task::block_in_place(|| verify(&source, &key, None)).unwrap_err();
    assert!(e.contains("audit record 7 does not match"), "{e}");
    // Each checkpoint keeps the tree's frontier, where the next signer goes on from.
    let bare: i64 = c
        .query_one(
            "SELECT count(*) FROM audit_checkpoints WHERE frontier IS NULL",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(bare, 0);
}

/// PostgreSQL stops while a node appends audit records: the append waits and lands once it is
/// back, once (not twice), in the one sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn an_audit_append_waits_out_a_postgres_restart() {
    use cascade_orchestrator::audit::log::{AuditLog, records};
    use cascade_orchestrator::audit::pg::PgAuditOptions;

    let pg = postgres::Postgres::start();
    let (url, _) = migrated(&pg, "audit_restart").await;
    let o = PgAuditOptions {
        url: url.clone(),
        password: None,
        node_id: "node-a".into(),
    };
    let log = Arc::new(tokio::task::block_in_place(|| {
        AuditLog::open_postgres(o, None, "cascade").unwrap()
    }));
    tokio::task::block_in_place(|| log.append("acme", "decision", json!({"n": 0})).unwrap());
    tokio::task::block_in_place(|| pg.stop());
    let writer = {
        let log = log.clone();
        std::thread::spawn(move || {
            (1..=3)
                .map(|n| log.append("acme", "decision", json!({ "n": n })))
                .collect::<Vec<_>>()
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    assert!(
        !writer.is_finished(),
        "an append returned while PostgreSQL was down"
    );
    tokio::task::block_in_place(|| pg.start_again());
    let seqs: Vec<u64> = writer
        .join()
        .unwrap()
        .into_iter()
        .map(Result::unwrap)
        .collect();
    assert_eq!(seqs, vec![2, 3, 4]);
    let all = tokio::task::block_in_place(|| records(&log.source())).unwrap();
    let ns: Vec<i64> = all
        .iter()
        .map(|(_, text, _)| {
            serde_json::from_str::<Value>(text).unwrap()["body"]["n"]
                .as_i64()
                .unwrap()
        })
        .collect();
    assert_eq!(ns, vec![0, 1, 2, 3]);
}
