//! Several nodes on one PostgreSQL database, in one test process: each node is an orchestrator
//! on a PostgreSQL store of its own name. A job accepted and run by one node is watched and
//! awaited from another, whose watchers and waiters hear of its changes through the database's
//! notifications (no polling per watcher).

#[path = "support/postgres.rs"]
mod postgres;

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
