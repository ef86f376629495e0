//! Several nodes on one PostgreSQL database, in one test process: each node is an orchestrator
//! on a PostgreSQL store of its own name. A job accepted and run by one node is watched and
//! awaited from another, whose watchers and waiters hear of its changes through the database's
//! notifications (no polling per watcher).

#[path = "support/postgres.rs"]
mod postgres;
#[path = "support/redis.rs"]
mod redis_server;

use std::sync::Arc;
use std::time::Duration;

use cascade_orchestrator::job::JobState;
use cascade_orchestrator::store::{PgOptions, PgStore};
use cascade_orchestrator::{Orchestrator, SubmitRequest, config};
use futures::StreamExt;
use serde_json::json;

const GRAPH: &str = r#"
[graph]
name = "chain"

[agents.fetch]
kind = "sim"
latency = "150ms"

[agents.think]
kind = "sim"
latency = "150ms"
after = ["fetch"]

[agents.write]
kind = "sim"
latency = "150ms"
after = ["think"]
"#;

async fn node(url: &str, id: &str) -> Arc<Orchestrator> {
    node_of(url, id, GRAPH).await
}

/// A node serving `graph`, which runs the commands other nodes send it (as a server does).
async fn node_of(url: &str, id: &str, graph: &str) -> Arc<Orchestrator> {
    let model = config::parse_graph_str("graph.toml", graph, &Default::default()).unwrap();
    let mut o = PgOptions::new(url);
    o.node_id = id.into();
    o.lease = Duration::from_secs(2);
    let store = Arc::new(PgStore::open(o).unwrap());
    let orch = Arc::new(
        Orchestrator::builder(model)
            .store(store)
            .start()
            .await
            .unwrap(),
    );
    orch.serve_commands();
    orch
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn a_job_run_by_one_node_is_watched_and_awaited_from_another() {
    let pg = postgres::Postgres::start();
    let url = pg.database("cluster_watch").await;
    let one = node(&url, "one").await;
    let three = node(&url, "three").await;

    for round in 0..3 {
        let id = one
            .submit(SubmitRequest::new("chain", json!({ "round": round })))
            .await
            .unwrap()
            .id;
        // Node three holds nothing of the job: it reads its past from the database, then hears
        // of each batch node one commits.
        let events = three.subscribe(id).unwrap();
        let waiter = {
            let three = three.clone();
            tokio::spawn(async move { three.wait(id).await })
        };
        let events: Vec<_> =
            tokio::time::timeout(Duration::from_secs(20), events.collect::<Vec<_>>())
                .await
                .expect("the watcher on another node sees the job end");
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(
            seqs,
            (1..=seqs.len() as u64).collect::<Vec<_>>(),
            "every event, in order, none missing: {events:?}"
        );
        assert!(events.last().unwrap().kind.is_final(), "{events:?}");
        assert!(
            seqs.len() >= 8,
            "submitted, started, 3 × (start, success), finished: {seqs:?}"
        );
        let done = tokio::time::timeout(Duration::from_secs(20), waiter)
            .await
            .expect("the waiter on another node wakes")
            .unwrap()
            .unwrap();
        assert_eq!(done.state, JobState::Succeeded);
        assert_eq!(three.get(id).unwrap().unwrap().state, JobState::Succeeded);
    }
    one.shutdown(Duration::from_secs(1)).await;
    three.shutdown(Duration::from_secs(1)).await;
}

/// A cancel, a decision and a budget that reach a node other than the one that holds the job
/// (a load balancer sends each request anywhere) are carried out by the holder, and answered
/// where they came in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn cancels_decisions_and_budgets_reach_the_node_that_holds_the_job() {
    let pg = postgres::Postgres::start();
    let url = pg.database("cluster_commands").await;
    let graph = r#"
[graph]
name = "desk"

[agents.wait]
kind = "sim"
latency = "30s"

[agents.refund]
kind = "sim"
approval = "required"

[agents.report]
kind = "sim"
after = ["refund"]
"#;
    let one = node_of(&url, "one", graph).await;
    let three = node_of(&url, "three", graph).await;

    // A job running on node one, cancelled through node three.
    let id = one
        .submit(SubmitRequest::new("desk", json!({})))
        .await
        .unwrap()
        .id;
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while one.get(id).unwrap().unwrap().state != JobState::Running {
        assert!(std::time::Instant::now() < deadline, "the job never ran");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let record = three.cancel(id, "the customer withdrew").await.unwrap();
    assert_eq!(record.state, JobState::Cancelled, "{record:?}");
    let held = tokio::time::timeout(Duration::from_secs(10), one.wait(id))
        .await
        .expect("node one's job ends")
        .unwrap();
    assert_eq!(held.state, JobState::Cancelled);
    assert!(
        held.error
            .as_deref()
            .unwrap_or("")
            .contains("the customer withdrew"),
        "{:?}",
        held.error
    );

    // A job parked for approval on node one, decided through node three.
    let id = one
        .submit(SubmitRequest::new("desk", json!({ "n": 2 })))
        .await
        .unwrap()
        .id;
    let approval = format!("{id}/refund");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let view = loop {
        if let Ok(v) = three.approval(&approval)
            && v.approval.decision.is_none()
        {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "no proposal");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A stale hash is refused by the holder, and the refusal says so on node three.
    let stale = three
        .resolve_approval(&approval, &"0".repeat(64), true, "ops", "")
        .await
        .unwrap_err();
    assert!(
        matches!(
            stale,
            cascade_orchestrator::approval::ApprovalError::Stale { .. }
        ),
        "{stale:?}"
    );
    let decided = three
        .resolve_approval(&approval, &view.approval.sha256, true, "ops", "")
        .await
        .unwrap();
    assert!(!decided.repeated);
    assert_eq!(
        decided
            .approval
            .approval
            .decision
            .as_ref()
            .unwrap()
            .approver,
        "ops"
    );
    // The same decision again is answered from the record, wherever it comes in.
    let again = three
        .resolve_approval(&approval, &view.approval.sha256, true, "ops", "")
        .await
        .unwrap();
    assert!(again.repeated);
    // The wait step runs 30 s: cancel it too, through node three, once refund has run.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let r = one.get(id).unwrap().unwrap();
        if r.steps.iter().all(|s| {
            &*s.agent == "wait" || s.state == cascade_orchestrator::job::StepState::Succeeded
        }) {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the approved step never ran: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A budget raised through node three on a job node one holds.
    let raised = three
        .raise_budget(
            id,
            cascade_orchestrator::job::Budget {
                max_tokens: Some(5000),
                max_cost_usd: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(raised.budget.unwrap().max_tokens, Some(5000));
    assert_eq!(
        one.get(id).unwrap().unwrap().budget.unwrap().max_tokens,
        Some(5000),
        "the holder's record has it"
    );
    three.cancel(id, "done looking").await.unwrap();
    one.shutdown(Duration::from_secs(1)).await;
    three.shutdown(Duration::from_secs(1)).await;
}

/// A TCP proxy to PostgreSQL that can be frozen: while it is, nothing passes either way and
/// connections neither answer nor break, as in a network partition.
async fn freezable_proxy(target: u16) -> (u16, Arc<std::sync::atomic::AtomicBool>) {
    use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    async fn pipe(
        mut from: tokio::net::tcp::OwnedReadHalf,
        mut to: tokio::net::tcp::OwnedWriteHalf,
        frozen: Arc<AtomicBool>,
    ) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let n = match from.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => n,
            };
            while frozen.load(SeqCst) {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if to.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let frozen = Arc::new(AtomicBool::new(false));
    let f = frozen.clone();
    tokio::spawn(async move {
        while let Ok((client, _)) = listener.accept().await {
            let f = f.clone();
            tokio::spawn(async move {
                let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                    return;
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                tokio::join!(pipe(cr, sw, f.clone()), pipe(sr, cw, f));
            });
        }
    });
    (port, frozen)
}

/// An upstream stand-in (SIMULATED) that answers each call after 300 ms and records when it
/// came (since `t0`) and with which idempotency key.
async fn recording_upstream(
    t0: std::time::Instant,
) -> (u16, Arc<std::sync::Mutex<Vec<(Duration, String)>>>) {
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let s = seen.clone();
    let app = axum::Router::new().route(
        "/call",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let s = s.clone();
            async move {
                let key = headers
                    .get("idempotency-key")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                s.lock().unwrap().push((t0.elapsed(), key));
                tokio::time::sleep(Duration::from_millis(300)).await;
                axum::Json(json!({ "ok": true }))
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    (port, seen)
}

/// A node cut off from PostgreSQL (its connections hang, as in a partition) fences itself:
/// from three quarters of a lease after its last renewal it starts no call, so none of its calls
/// overlaps the other node's, which takes its jobs over once the lease ran out. When the node
/// is back, it forgets the jobs taken from it, and every job finishes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn a_node_cut_off_from_postgres_fences_itself_and_forgets_what_was_taken() {
    let pg = postgres::Postgres::start();
    let url = pg.database("cluster_fence").await;
    let (proxy, frozen) = freezable_proxy(pg.port).await;
    let t0 = std::time::Instant::now();
    // Each node calls an upstream of its own: who made a call is where it arrived.
    let (port_a, seen_a) = recording_upstream(t0).await;
    let (port_b, seen_b) = recording_upstream(t0).await;
    let graph = |port: u16| {
        let mut g = "[graph]\nname = \"calls\"\nmax_in_flight_jobs = 8\n".to_string();
        for (agent, after) in [
            ("one", ""),
            ("two", "after = [\"one\"]\n"),
            ("three", "after = [\"two\"]\n"),
        ] {
            g += &format!(
                "\n[agents.{agent}]\nkind = \"http\"\nmethod = \"POST\"\nurl = \"http://127.0.0.1:{port}/call\"\nbody = {{ n = 1 }}\nmax_concurrency = 8\n{after}"
            );
        }
        g
    };
    let lease = Duration::from_secs(2);
    let a = node_of(
        &format!("postgres://cascade@127.0.0.1:{proxy}/cluster_fence"),
        "a",
        &graph(port_a),
    )
    .await;
    let b = node_of(&url, "b", &graph(port_b)).await;
    const JOBS: usize = 40;
    let ids: Vec<_> = futures::future::join_all(
        (0..JOBS).map(|i| a.submit(SubmitRequest::new("calls", json!({ "i": i })))),
    )
    .await
    .into_iter()
    .map(|s| s.unwrap().id)
    .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let cut = t0.elapsed();
    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    tokio::time::sleep(Duration::from_secs(5)).await;
    frozen.store(false, std::sync::atomic::Ordering::SeqCst);

    // Every job ends, once, as node b or node a finished it.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let db = cascade_orchestrator::store::pg_schema::connect(&url, None)
        .await
        .unwrap();
    loop {
        let done: i64 = db
            .query_one("SELECT count(*) FROM jobs WHERE state = 'succeeded'", &[])
            .await
            .unwrap()
            .get(0);
        if done == JOBS as i64 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{done} of {JOBS} jobs succeeded"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let calls_a = seen_a.lock().unwrap().clone();
    let calls_b = seen_b.lock().unwrap().clone();
    assert!(!calls_b.is_empty(), "node b took nothing over");
    // Node a started no call from three quarters of a lease after the cut (its last renewal
    // was before it) until it was back and had forgotten what node b took.
    let fenced_from = cut + lease * 3 / 4 + Duration::from_millis(100);
    let back = cut + Duration::from_secs(5);
    let late: Vec<_> = calls_a
        .iter()
        .filter(|(at, _)| *at > fenced_from && *at < back)
        .collect();
    assert!(late.is_empty(), "node a called while fenced: {late:?}");
    // Nothing node b took over was called by node a once it was back.
    let taken: std::collections::HashSet<&str> = calls_b
        .iter()
        .map(|(_, k)| k.split('/').next().unwrap())
        .collect();
    let after: Vec<_> = calls_a
        .iter()
        .filter(|(at, k)| *at >= back && taken.contains(k.split('/').next().unwrap()))
        .collect();
    assert!(
        after.is_empty(),
        "node a called jobs node b held: {after:?}"
    );
    // And node a answers for them from the database, as node b finished them.
    for id in &ids {
        assert_eq!(a.get(*id).unwrap().unwrap().state, JobState::Succeeded);
    }
    a.shutdown(Duration::from_secs(1)).await;
    b.shutdown(Duration::from_secs(1)).await;
}

/// A database that hangs does not stall a node: reads that wait for it (a job another node
/// holds) free their runtime worker, and the node's other work goes on meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn reads_waiting_for_a_hung_database_do_not_stall_the_node() {
    let pg = postgres::Postgres::start();
    let url = pg.database("cluster_hung").await;
    let (proxy, frozen) = freezable_proxy(pg.port).await;
    let a = node(
        &format!("postgres://cascade@127.0.0.1:{proxy}/cluster_hung"),
        "a",
    )
    .await;
    let b = node(&url, "b").await;
    let id = b
        .submit(SubmitRequest::new("chain", json!({})))
        .await
        .unwrap()
        .id;
    b.wait(id).await.unwrap();
    // Node a reads it from the database once node b's batch is committed.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while a.get(id).unwrap().unwrap().state != JobState::Succeeded {
        assert!(
            std::time::Instant::now() < deadline,
            "node a never read the job's end"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    frozen.store(true, std::sync::atomic::Ordering::SeqCst);
    // More reads than the runtime has workers, each waiting for the frozen database.
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let a = a.clone();
            tokio::spawn(async move { a.get(id).map(|r| r.map(|r| r.state)) })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let t = std::time::Instant::now();
    tokio::spawn(tokio::time::sleep(Duration::from_millis(20)))
        .await
        .unwrap();
    let took = t.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "the node's runtime stalled {took:?} behind reads waiting for the database"
    );
    frozen.store(false, std::sync::atomic::Ordering::SeqCst);
    for r in readers {
        // Answered once the database is back (or, had it stayed away, refused as unavailable).
        match r.await.unwrap() {
            Ok(state) => assert_eq!(state, Some(JobState::Succeeded)),
            Err(e) => assert!(e.is_retryable(), "{e}"),
        }
    }
    a.shutdown(Duration::from_secs(1)).await;
    b.shutdown(Duration::from_secs(1)).await;
}

/// A tenant's share of a quota holds across the cluster: two nodes, each flooded with the
/// tenant's jobs, together call no faster than its share (a quarter of 40 calls a second), where
/// each node alone would allow the whole share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 and redis-server (Debian); .ci/run installs them and runs this"]
async fn a_tenants_share_of_a_quota_holds_across_the_nodes() {
    use cascade_orchestrator::quota::shared::{SharedQuotaOptions, SharedQuotas};
    let pg = postgres::Postgres::start();
    let redis = redis_server::Redis::start();
    let url = pg.database("cluster_share").await;
    let t0 = std::time::Instant::now();
    let (port, seen) = recording_upstream(t0).await;
    let graph = format!(
        "[quotas.api]\nrequests_per_second = 40\nburst = 4\ntenant_share = {{ acme = 0.25 }}\n\n\
         [graph]\nname = \"calls\"\nmax_in_flight_jobs = 64\n\n\
         [agents.call]\nkind = \"http\"\nmethod = \"POST\"\nurl = \"http://127.0.0.1:{port}/call\"\nbody = {{ n = 1 }}\nquota = \"api\"\nmax_concurrency = 32\n"
    );
    let mut nodes = Vec::new();
    for id in ["a", "b"] {
        let model = config::parse_graph_str("graph.toml", &graph, &Default::default()).unwrap();
        let mut o = PgOptions::new(&url);
        o.node_id = id.into();
        o.lease = Duration::from_secs(2);
        let store = Arc::new(PgStore::open(o).unwrap());
        let shared =
            SharedQuotas::start(SharedQuotaOptions::new(redis.url(), redis.url(), id.into()))
                .await
                .unwrap();
        nodes.push(Arc::new(
            Orchestrator::builder(model)
                .store(store)
                .shared_quotas(shared)
                .start()
                .await
                .unwrap(),
        ));
    }
    // 40 of acme's jobs on each node at once: 80 calls at its share of 10 a second.
    let submit = |o: Arc<Orchestrator>| async move {
        let mut ids = Vec::new();
        for i in 0..40 {
            let mut req = SubmitRequest::new("calls", json!({ "i": i }));
            req.tenant = "acme".into();
            ids.push(o.submit(req).await.unwrap().id);
        }
        (o, ids)
    };
    let (one, two) = tokio::join!(submit(nodes[0].clone()), submit(nodes[1].clone()));
    for (o, ids) in [one, two] {
        for id in ids {
            let done = tokio::time::timeout(Duration::from_secs(60), o.wait(id))
                .await
                .expect("every job ends")
                .unwrap();
            assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
        }
    }
    let mut times: Vec<Duration> = seen.lock().unwrap().iter().map(|(t, _)| *t).collect();
    times.sort();
    assert_eq!(times.len(), 80);
    // The most calls within any second: the share's 10, its burst of one, and one of slack.
    let most = (0..times.len())
        .map(|i| {
            times[i..]
                .iter()
                .take_while(|t| **t < times[i] + Duration::from_secs(1))
                .count()
        })
        .max()
        .unwrap();
    assert!(
        most <= 12,
        "the two nodes made {most} of acme's calls within one second"
    );
    for o in nodes {
        o.shutdown(Duration::from_secs(1)).await;
    }
}

/// Two nodes on one database run the same schedule (every second), each started as `cascade
/// serve` starts its triggers: each slot becomes exactly one job (the other node's firing of it
/// is deduplicated by the slot's key), and no slot between the first and the last is missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs PostgreSQL 15 (Debian's postgresql); .ci/run installs it and runs this"]
async fn each_schedule_slot_fires_one_job_across_two_nodes() {
    const SCHEDULED: &str = r#"
[graph]
name = "reports"

[[graph.triggers]]
name = "tick"
kind = "schedule"
every = "1s"
catch_up = "none"

[agents.report]
kind = "sim"
"#;
    let pg = postgres::Postgres::start();
    let url = pg.database("schedule").await;
    let a = node_of(&url, "a", SCHEDULED).await;
    let b = node_of(&url, "b", SCHEDULED).await;
    let (stop, stopped) = tokio::sync::watch::channel(false);
    cascade_orchestrator::triggers::Triggers::start(&a, stopped.clone());
    cascade_orchestrator::triggers::Triggers::start(&b, stopped);
    tokio::time::sleep(Duration::from_millis(6500)).await;
    let _ = stop.send(true);
    // Let the last slot's jobs finish.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let counts = |o: &Orchestrator| o.triggers().get("reports", "tick").unwrap().counts();
    let (ca, cb) = (counts(&a), counts(&b));

    let jobs = a
        .store()
        .list(&cascade_orchestrator::store::JobFilter {
            graph: Some("reports".into()),
            limit: 1000,
            ..Default::default()
        })
        .unwrap();
    let mut per_slot = std::collections::BTreeMap::<String, usize>::new();
    for j in &jobs {
        let at = j.input["scheduled_at"].as_str().unwrap().to_string();
        *per_slot.entry(at).or_default() += 1;
    }
    eprintln!("slots {per_slot:?}; node a {ca:?}; node b {cb:?}");
    assert!(
        per_slot.values().all(|&n| n == 1),
        "a slot fired more than one job: {per_slot:?}"
    );
    let slots: Vec<chrono::DateTime<chrono::Utc>> =
        per_slot.keys().map(|s| s.parse().unwrap()).collect();
    assert!(slots.len() >= 5, "{per_slot:?}");
    assert!(
        slots
            .windows(2)
            .all(|w| w[1] - w[0] == chrono::Duration::seconds(1)),
        "a slot was missed: {per_slot:?}"
    );
    // Both nodes fired the slots: one started each job, the other's was deduplicated.
    assert_eq!(ca.started + cb.started, slots.len() as u64, "{ca:?} {cb:?}");
    assert!(
        ca.deduplicated + cb.deduplicated + 2 >= slots.len() as u64,
        "{ca:?} {cb:?}"
    );
    for o in [a, b] {
        o.shutdown(Duration::from_secs(1)).await;
    }
}
