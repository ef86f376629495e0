//! Off the happy path, in process on a paused tokio clock: panics under a concurrency quota, an
//! upstream's 429s with no quota declared, storms that must not grow a job's record. Every
//! upstream here is simulated (`kind = "sim"`).

use std::time::Duration;

use cascade_orchestrator::job::{JobId, JobState};
use cascade_orchestrator::{Orchestrator, SubmitRequest};
use serde_json::json;

mod common;
use common::{quiet_simulated_panics, start};

/// Submit `n` jobs to `graph` and wait (on the paused clock, at most `limit`) until all finished.
async fn run_all(orch: &Orchestrator, graph: &str, n: usize, limit: Duration) -> Vec<JobId> {
    let mut ids = Vec::with_capacity(n);
    for i in 0..n {
        ids.push(
            orch.submit(SubmitRequest::new(graph, json!({ "n": i })))
                .await
                .unwrap()
                .id,
        );
    }
    let waited = tokio::time::timeout(limit, async {
        for &id in &ids {
            orch.wait(id).await.unwrap();
        }
    })
    .await;
    if waited.is_err() {
        let unfinished = ids
            .iter()
            .filter(|&&id| !orch.get(id).unwrap().unwrap().state.is_terminal())
            .count();
        panic!(
            "{unfinished} of {n} jobs unfinished after {limit:?}; scheduler: {:?}; quotas: {:?}",
            orch.scheduler_snapshot(graph).await,
            orch.quotas().await
        );
    }
    ids
}

#[tokio::test(start_paused = true)]
async fn panics_under_a_concurrency_quota_leak_no_slot() {
    quiet_simulated_panics();
    let mut toml = String::from(
        "[graph]\nname = \"g\"\nmax_in_flight_jobs = 300\nmax_pending_jobs = 10000\n\
         [quotas.slots]\nmax_concurrency = 64\n",
    );
    for (i, name) in ["first", "middle", "last"].iter().enumerate() {
        toml += &format!(
            "[agents.{name}]\nkind = \"sim\"\nlatency = {{ uniform = [\"1ms\", \"9ms\"] }}\n\
             panic_rate = 0.01\nmax_restarts = 100000\nmax_concurrency = 300\n\
             retry = {{ max_attempts = 5, initial_delay = \"1ms\", max_delay = \"10ms\" }}\n"
        );
        if i > 0 {
            toml += &format!("after = [\"{}\"]\n", ["first", "middle"][i - 1]);
        }
        if *name == "middle" {
            toml += "quota = \"slots\"\n";
        }
    }
    let orch = start(&toml).await;
    let ids = run_all(&orch, "g", 2000, Duration::from_secs(600)).await;
    let succeeded = ids
        .iter()
        .filter(|&&id| orch.get(id).unwrap().unwrap().state == JobState::Succeeded)
        .count();
    // Five attempts at 1% panics each: a job fails only by losing all five.
    assert_eq!(succeeded, 2000);
    let stats = orch.stats("g").unwrap();
    let panics: u64 = stats.agents.iter().map(|a| a.panics).sum();
    assert!(panics >= 20, "the run must have panicked often: {panics}");
    // Idle again: every slot is back.
    tokio::time::sleep(Duration::from_millis(100)).await;
    let q = orch
        .quotas()
        .await
        .into_iter()
        .find(|q| q.name == "slots")
        .unwrap();
    assert_eq!(q.in_flight, 0, "slots still held when idle: {q:?}");
    orch.shutdown(Duration::from_secs(1)).await;
}
