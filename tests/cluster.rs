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
    let model = config::parse_graph_str("chain.toml", GRAPH, &Default::default()).unwrap();
    let mut o = PgOptions::new(url);
    o.node_id = id.into();
    o.lease = Duration::from_secs(2);
    let store = Arc::new(PgStore::open(o).unwrap());
    Arc::new(
        Orchestrator::builder(model)
            .store(store)
            .start()
            .await
            .unwrap(),
    )
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
