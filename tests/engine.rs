//! End-to-end tests of the engine, in process: real actors, real supervision, the in-memory
//! store. Time-sensitive tests run on a paused tokio clock, so they are exact and do not sleep.

use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Duration;

use cascade_orchestrator::agents::sim;
use cascade_orchestrator::config;
use cascade_orchestrator::job::{EventKind, JobState};
use cascade_orchestrator::{Orchestrator, SubmitError, SubmitRequest};
use futures::StreamExt;
use serde_json::json;
use tokio::time::Instant;

mod common;
use common::{quiet_simulated_panics, start};

async fn start_file(path: &str) -> Orchestrator {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let model = config::load_graph_files(&[root.join(path)], &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    Orchestrator::builder(model).start().await.unwrap()
}

#[tokio::test(start_paused = true)]
async fn data_flows_through_support_triage() {
    let orch = start_file("examples/graphs/support_triage.toml").await;
    let mut ids = Vec::new();
    for i in 0..20 {
        let req = SubmitRequest::new(
            "support-triage",
            json!({"ticket_id": i, "body": "my invoice is wrong"}),
        );
        ids.push(orch.submit(req).await.unwrap().id);
    }
    for (i, id) in ids.into_iter().enumerate() {
        let job = orch.wait(id).await.unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
        let out = job.output.unwrap();
        let post = &out["post"];
        assert_eq!(
            post["trace"],
            json!(["classify", "enrich", "draft", "review", "post"])
        );
        assert_eq!(post["input"]["ticket_id"], json!(i));
        assert_eq!(post["idempotency_key"], json!(format!("{id}/post")));
        assert!(
            job.usage.prompt_tokens >= 250 + 800 + 600,
            "{:?}",
            job.usage
        );
        assert!(job.usage.cost_usd > 0.0);
        // Every step ran, in dependency order.
        let finished: Vec<_> = job.steps.iter().map(|s| s.finished_at.unwrap()).collect();
        assert!(finished.windows(2).all(|w| w[0] <= w[1]));
    }
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn data_flows_through_fanout_and_branches_run_in_parallel() {
    let orch = start_file("examples/graphs/fanout.toml").await;
    let start = Instant::now();
    let id = orch
        .submit(SubmitRequest::new("fanout", json!({"q": "x"})))
        .await
        .unwrap()
        .id;
    let job = orch.wait(id).await.unwrap();
    let elapsed = start.elapsed();
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    let join = &job.output.unwrap()["join"];
    assert_eq!(join["request"], json!({"q": "x"}));
    for b in 1..=5 {
        assert_eq!(
            join["branches"][b - 1],
            json!(["entry", format!("fetch_{b}"), format!("score_{b}")])
        );
    }
    // Sequential would be 5 + 5 × (≥5 + 10) ms ≥ 80 ms; parallel is one branch: ≤ 5 + 25 + 10 ms.
    assert!(elapsed <= Duration::from_millis(41), "{elapsed:?}");
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_jobs_survive_failures_and_panics() {
    quiet_simulated_panics();
    let orch = start(
        r#"
        [graph]
        name = "triage"
        max_in_flight_jobs = 500
        max_pending_jobs = 20000
        [agents.classify]
        kind = "sim"
        transient_failure_rate = 0.05
        retry = { max_attempts = 10, initial_delay = "1ms", max_delay = "5ms" }
        [agents.enrich]
        kind = "sim"
        after = ["classify"]
        transient_failure_rate = 0.05
        retry = { max_attempts = 10, initial_delay = "1ms", max_delay = "5ms" }
        [agents.draft]
        kind = "sim"
        after = ["enrich"]
        transient_failure_rate = 0.05
        panic_rate = 0.01
        max_restarts = 1000
        restart_window = "1m"
        retry = { max_attempts = 10, initial_delay = "1ms", max_delay = "5ms" }
        [agents.review]
        kind = "sim"
        after = ["draft"]
        transient_failure_rate = 0.05
        retry = { max_attempts = 10, initial_delay = "1ms", max_delay = "5ms" }
        [agents.post]
        kind = "sim"
        after = ["review"]
        upstream = "ten-thousand-post"
        record_keys = true
        "#,
    )
    .await;
    let mut ids = Vec::with_capacity(10_000);
    for i in 0..10_000 {
        ids.push(
            orch.submit(SubmitRequest::new("triage", json!({"n": i})))
                .await
                .unwrap()
                .id,
        );
    }
    let mut seen = HashSet::new();
    for id in &ids {
        let job = orch.wait(*id).await.unwrap();
        assert_eq!(job.state, JobState::Succeeded, "job {id}: {:?}", job.error);
        assert!(seen.insert(*id));
        let finished = orch
            .store()
            .events(*id, 0)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind.is_final())
            .count();
        assert_eq!(finished, 1, "job {id} finished {finished} times");
    }
    let stats = orch.stats("triage").unwrap();
    assert_eq!(stats.jobs_succeeded, 10_000);
    assert_eq!(stats.jobs_failed, 0);
    let draft = stats.agents.iter().find(|a| a.name == "draft").unwrap();
    assert!(
        draft.panics >= 50 && draft.restarts == draft.panics,
        "{draft:?}"
    );
    // 5% transient failures were retried in every flaky agent.
    for a in stats.agents.iter().filter(|a| a.name != "post") {
        assert!(a.retries >= 300, "{a:?}");
    }
    // The last write ran once per job, with the job's key: nothing lost, nothing twice.
    let keys = sim::upstream(orch.registry(), "ten-thousand-post").calls_by_key();
    assert_eq!(keys.len(), 10_000);
    for id in &ids {
        assert_eq!(keys.get(&format!("{id}/post")), Some(&1));
    }
    orch.shutdown(Duration::from_secs(5)).await;
}

#[tokio::test(start_paused = true)]
async fn permanent_failure_fails_the_job_naming_the_agent() {
    let orch = start(
        r#"
        [graph]
        name = "g"
        [agents.a]
        kind = "sim"
        [agents.b]
        kind = "sim"
        after = ["a"]
        permanent_failure_rate = 1.0
        [agents.c]
        kind = "sim"
        after = ["b"]
        "#,
    )
    .await;
    let id = orch
        .submit(SubmitRequest::new("g", json!({})))
        .await
        .unwrap()
        .id;
    let job = orch.wait(id).await.unwrap();
    assert_eq!(job.state, JobState::Failed);
    let err = job.error.unwrap();
    assert!(
        err.starts_with("agent \"b\" failed after 1 attempt: permanent:"),
        "{err}"
    );
    assert_eq!(job.steps[1].attempts, 1, "permanent errors are not retried");
    assert_eq!(
        job.steps[2].state,
        cascade_orchestrator::job::StepState::Cancelled
    );
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn retries_back_off_within_bounds() {
    let orch = start(
        r#"
        [graph]
        name = "g"
        [agents.flaky]
        kind = "sim"
        transient_failure_rate = 1.0
        retry = { max_attempts = 4, initial_delay = "100ms", max_delay = "250ms", multiplier = 2.0 }
        "#,
    )
    .await;
    let start = Instant::now();
    let id = orch
        .submit(SubmitRequest::new("g", json!({})))
        .await
        .unwrap()
        .id;
    let job = orch.wait(id).await.unwrap();
    let elapsed = start.elapsed();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.steps[0].attempts, 4);
    let delays: Vec<u64> = orch
        .store()
        .events(id, 0)
        .unwrap()
        .into_iter()
        .filter_map(|e| match e.kind {
            EventKind::StepRetrying { delay_ms, .. } => Some(delay_ms),
            _ => None,
        })
        .collect();
    assert_eq!(delays.len(), 3);
    for (d, ceiling) in delays.iter().zip([100, 200, 250]) {
        assert!(*d <= ceiling, "{delays:?}");
    }
    // The paused clock moved exactly by the waits (events keep whole milliseconds).
    let total: u64 = delays.iter().sum();
    let slack = delays.len() as u64 + 1;
    assert!(
        elapsed >= Duration::from_millis(total) && elapsed <= Duration::from_millis(total + slack),
        "{elapsed:?} vs {total} ms"
    );
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn rate_limited_refusals_do_not_spend_attempts() {
    let orch = start(
        r#"
        [graph]
        name = "g"
        [agents.llm]
        kind = "sim"
        upstream = "strict-upstream"
        upstream_limit = { requests_per_second = 10, burst = 1 }
        retry = { max_attempts = 1 }
        "#,
    )
    .await;
    let mut ids = Vec::new();
    for _ in 0..5 {
        ids.push(
            orch.submit(SubmitRequest::new("g", json!({})))
                .await
                .unwrap()
                .id,
        );
    }
    for id in ids {
        let job = orch.wait(id).await.unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
        assert_eq!(job.steps[0].attempts, 1);
    }
    assert!(sim::upstream(orch.registry(), "strict-upstream").refusals() >= 4);
    assert!(orch.stats("g").unwrap().agents[0].rate_limited >= 4);
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn cancel_stops_pending_steps() {
    let orch = start(
        r#"
        [graph]
        name = "g"
        max_in_flight_jobs = 1
        [agents.slow]
        kind = "sim"
        latency = "10s"
        [agents.after_slow]
        kind = "sim"
        after = ["slow"]
        upstream = "after-slow"
        "#,
    )
    .await;
    let running = orch
        .submit(SubmitRequest::new("g", json!({})))
        .await
        .unwrap()
        .id;
    let pending = orch
        .submit(SubmitRequest::new("g", json!({})))
        .await
        .unwrap()
        .id;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(orch.get(running).unwrap().unwrap().state, JobState::Running);
    assert_eq!(orch.get(pending).unwrap().unwrap().state, JobState::Pending);
    let r = orch.cancel(pending, "not needed").await.unwrap();
    assert_eq!(r.state, JobState::Cancelled);
    let r = orch.cancel(running, "changed my mind").await.unwrap();
    assert_eq!(r.state, JobState::Cancelled);
    assert_eq!(r.error.as_deref(), Some("cancelled: changed my mind"));
    tokio::time::sleep(Duration::from_secs(20)).await;
    assert_eq!(
        sim::upstream(orch.registry(), "after-slow").calls(),
        0,
        "no step after the cancel ran"
    );
    assert_eq!(orch.wait(running).await.unwrap().state, JobState::Cancelled);
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn deadline_fails_a_slow_job() {
    let orch = start("[graph]\nname = \"g\"\ndeadline = \"1s\"\n[agents.slow]\nkind = \"sim\"\nlatency = \"1h\"\n").await;
    let id = orch
        .submit(SubmitRequest::new("g", json!({})))
        .await
        .unwrap()
        .id;
    let start = Instant::now();
    let job = orch.wait(id).await.unwrap();
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.error.as_deref(), Some("deadline of 1s exceeded"));
    assert!(start.elapsed() <= Duration::from_millis(1100));
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn agent_past_restart_intensity_is_failed_and_its_jobs_wait() {
    quiet_simulated_panics();
    let orch = start(
        r#"
        [graph]
        name = "g"
        [agents.crashy]
        kind = "sim"
        panic_rate = 1.0
        max_restarts = 2
        restart_window = "1m"
        retry = { max_attempts = 100, initial_delay = "1ms", max_delay = "1ms" }
        "#,
    )
    .await;
    let id = orch
        .submit(SubmitRequest::new("g", json!({})))
        .await
        .unwrap()
        .id;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let stats = orch.stats("g").unwrap();
    assert_eq!(
        stats.agents[0].health,
        cascade_orchestrator::runtime::AgentHealth::Failed
    );
    assert_eq!(stats.agents[0].restarts, 2);
    assert_eq!(stats.agents[0].panics, 3);
    let job = orch.get(id).unwrap().unwrap();
    assert_eq!(
        job.state,
        JobState::Running,
        "the job waits for the agent, it is not dropped"
    );
    // After one window the agent is tried again.
    tokio::time::sleep(Duration::from_secs(61)).await;
    assert!(orch.stats("g").unwrap().agents[0].panics > 3);
    orch.shutdown(Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn watch_replays_then_follows_to_the_end() {
    let orch = start("[graph]\nname = \"g\"\n[agents.a]\nkind = \"sim\"\nlatency = \"1s\"\n[agents.b]\nkind = \"sim\"\nafter = [\"a\"]\n").await;
    let id = orch
        .submit(SubmitRequest::new("g", json!({})))
        .await
        .unwrap()
        .id;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let events: Vec<_> = orch.subscribe(id).unwrap().collect().await;
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=seqs.len() as u64).collect::<Vec<_>>());
    let kinds: Vec<&str> = events
        .iter()
        .map(|e| match &e.kind {
            EventKind::Submitted => "submitted",
            EventKind::Started => "started",
            EventKind::StepStarted { .. } => "step_started",
            EventKind::StepSucceeded { .. } => "step_succeeded",
            EventKind::Finished { .. } => "finished",
            _ => "other",
        })
        .collect();
    assert_eq!(
        kinds,
        [
            "submitted",
            "started",
            "step_started",
            "step_succeeded",
            "step_started",
            "step_succeeded",
            "finished"
        ]
    );
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn submission_is_idempotent_and_bounded() {
    let orch = start("[graph]\nname = \"g\"\nmax_in_flight_jobs = 1\nmax_pending_jobs = 2\n[agents.a]\nkind = \"sim\"\nlatency = \"1s\"\n").await;
    let a = orch
        .submit(SubmitRequest::new("g", json!(1)).idempotency_key("k1"))
        .await
        .unwrap();
    let again = orch
        .submit(SubmitRequest::new("g", json!(1)).idempotency_key("k1"))
        .await
        .unwrap();
    assert_eq!((again.id, again.deduplicated), (a.id, true));
    let conflict = orch
        .submit(SubmitRequest::new("g", json!(2)).idempotency_key("k1"))
        .await
        .unwrap_err();
    assert!(
        matches!(conflict, SubmitError::KeyConflict(_)),
        "{conflict}"
    );
    tokio::time::sleep(Duration::from_millis(10)).await;
    orch.submit(SubmitRequest::new("g", json!(3)))
        .await
        .unwrap();
    orch.submit(SubmitRequest::new("g", json!(4)))
        .await
        .unwrap();
    let refused = orch
        .submit(SubmitRequest::new("g", json!(5)))
        .await
        .unwrap_err();
    match &refused {
        SubmitError::Overloaded {
            pending,
            retry_after,
            ..
        } => {
            assert_eq!(*pending, 2);
            assert!(
                *retry_after >= Duration::from_millis(100)
                    && *retry_after <= Duration::from_secs(300)
            );
        }
        other => panic!("expected Overloaded, got {other}"),
    }
    assert!(refused.is_retryable());
    let unknown = orch
        .submit(SubmitRequest::new("gg", json!(1)))
        .await
        .unwrap_err();
    assert_eq!(
        unknown.to_string(),
        "unknown graph \"gg\"; did you mean \"g\"?"
    );
    // The refused submissions cost the accepted jobs nothing.
    assert_eq!(orch.wait(a.id).await.unwrap().state, JobState::Succeeded);
    orch.shutdown(Duration::from_secs(5)).await;
}
