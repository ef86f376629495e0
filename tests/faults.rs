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
    let q = common::quota(&orch, "slots").await;
    assert_eq!(q.in_flight, 0, "slots still held when idle: {q:?}");
    orch.shutdown(Duration::from_secs(1)).await;
}

/// When an agent panics, its actor restarts and the calls it had in flight are lost with it:
/// each of those steps runs again under its original idempotency key (a write-capable upstream
/// deduplicates it), and no other key ever reaches the upstream.
#[tokio::test(start_paused = true)]
async fn a_panic_restart_reruns_the_agents_in_flight_steps_with_their_keys() {
    quiet_simulated_panics();
    let orch = start(
        r#"
        [graph]
        name = "restarted"
        max_in_flight_jobs = 64
        max_pending_jobs = 10000
        [agents.work]
        kind = "sim"
        latency = "20ms"
        panic_rate = 0.05
        max_restarts = 100000
        max_concurrency = 32
        upstream = "restart-rerun"
        record_keys = true
        retry = { max_attempts = 10, initial_delay = "1ms", max_delay = "5ms" }
        "#,
    )
    .await;
    let ids = run_all(&orch, "restarted", 500, Duration::from_secs(600)).await;
    for &id in &ids {
        assert_eq!(orch.get(id).unwrap().unwrap().state, JobState::Succeeded);
    }
    let stats = orch.stats("restarted").unwrap();
    let panics = stats.agents[0].panics;
    // About 25 expected (500 calls at 5%): fewer than 3 is a one-in-10⁸ run.
    assert!(panics >= 3, "the run must have panicked: {panics}");
    let keys = cascade_orchestrator::agents::sim::upstream(orch.registry(), "restart-rerun")
        .calls_by_key();
    let expected: std::collections::HashSet<String> =
        ids.iter().map(|id| format!("{id}/work")).collect();
    assert_eq!(keys.len(), 500, "every step reached the upstream");
    assert!(
        keys.keys().all(|k| expected.contains(k)),
        "a key no step has"
    );
    // A panic re-runs its own step, and the steps in flight beside it (up to 31 more): more keys
    // were seen twice than there were panics.
    let rerun = keys.values().filter(|&&n| n > 1).count() as u64;
    assert!(
        rerun > panics,
        "{rerun} keys ran again for {panics} panics: the collateral steps were not re-run"
    );
    orch.shutdown(Duration::from_secs(1)).await;
}

/// The 5-step pipeline whose `classify` and `draft` call one simulated provider of
/// `rps` requests/s (burst 20) and name no quota.
fn no_quota_storm(upstream: &str, limit: &str) -> String {
    let mut s = String::from(
        "[graph]\nname = \"storm\"\nmax_in_flight_jobs = 512\nmax_pending_jobs = 100000\n",
    );
    let names = ["classify", "enrich", "draft", "review", "post"];
    for (i, n) in names.iter().enumerate() {
        s += &format!(
            "[agents.{n}]\nkind = \"sim\"\nlatency = \"20ms\"\nmax_concurrency = 512\n\
             retry = {{ max_attempts = 5, initial_delay = \"50ms\", max_delay = \"2s\" }}\n"
        );
        if i > 0 {
            s += &format!("after = [\"{}\"]\n", names[i - 1]);
        }
        if *n == "classify" || *n == "draft" {
            s += &format!("upstream = \"{upstream}\"\nupstream_limit = {limit}\n");
        }
    }
    s
}

/// Run 4,000 jobs of a storm graph on the paused clock; every job must succeed, calling the
/// simulated `upstream` twice. Returns the orchestrator, the calls it answered and refused, and
/// the seconds the storm took.
async fn storm_run(toml: &str, upstream: &str) -> (Orchestrator, u64, u64, f64) {
    let orch = start(toml).await;
    let begin = tokio::time::Instant::now();
    let ids = run_all(&orch, "storm", 4000, Duration::from_secs(600)).await;
    let elapsed = begin.elapsed().as_secs_f64();
    let up = cascade_orchestrator::agents::sim::upstream(orch.registry(), upstream);
    let (calls, refusals) = (up.calls(), up.refusals());
    eprintln!("{upstream}: {calls} calls, {refusals} refusals, {elapsed:.1} s");
    for id in &ids {
        assert_eq!(orch.get(*id).unwrap().unwrap().state, JobState::Succeeded);
    }
    assert_eq!(calls, 8000, "each job calls the upstream twice");
    (orch, calls, refusals, elapsed)
}

#[tokio::test(start_paused = true)]
async fn a_storm_on_an_upstream_without_a_quota_is_paced() {
    let toml = no_quota_storm("faults-storm", "{ requests_per_second = 200, burst = 20 }");
    let (orch, calls, refusals, elapsed) = storm_run(&toml, "faults-storm").await;
    // Refusals per 1,000 jobs stay few: the implicit quota slow-starts, learns the rate at the
    // first refusal and paces every waiter after it (no herd at the end of each Retry-After).
    assert!(refusals < 80, "{refusals} refusals for 4,000 jobs");
    // 8,000 calls at 200/s take 40 s; learning the rate keeps goodput near it.
    let goodput = calls as f64 / elapsed;
    assert!(goodput >= 0.95 * 200.0, "goodput {goodput:.1} calls/s");
    // The implicit quota is a quota like any other: listed, named after the upstream, learned.
    let q = common::quota(&orch, "upstream:faults-storm").await;
    assert!(q.implicit);
    let learned = q.learned_requests_per_second.expect("rate learned");
    assert!((150.0..=230.0).contains(&learned), "learned {learned}/s");
    assert!(q.refusals > 0 && q.refusals <= refusals);
    let agents = &orch.model().graph("storm").unwrap().agents;
    assert_eq!(&*agents[0].quotas[0], "upstream:faults-storm");
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_quota_declared_too_high_is_refused_on_at_most_one_call_in_a_hundred() {
    // A quota of 300/s in front of a provider that enforces 200/s: AIMD must find the real rate
    // from the first refusals rather than creep down to it.
    let mut toml = no_quota_storm(
        "faults-too-high",
        "{ requests_per_second = 200, burst = 20 }",
    );
    toml = toml.replace(
        "upstream = \"faults-too-high\"",
        "quota = \"llm\"\nupstream = \"faults-too-high\"",
    );
    toml += "[quotas.llm]\nrequests_per_second = 300\nburst = 20\n";
    let (orch, calls, refusals, elapsed) = storm_run(&toml, "faults-too-high").await;
    assert!(
        refusals as f64 <= 0.01 * (calls + refusals) as f64,
        "{refusals} refusals for {calls} answered calls"
    );
    let goodput = calls as f64 / elapsed;
    assert!(goodput >= 0.95 * 200.0, "goodput {goodput:.1} calls/s");
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_long_retry_after_from_an_undeclared_upstream_pauses_the_chain() {
    // One call a second with a burst of 5: after the burst, the upstream asks to wait ~1 s,
    // longer than the pause threshold, so its implicit quota is exhausted and pauses downstream.
    let orch = start(&no_quota_storm(
        "faults-slow",
        "{ requests_per_minute = 60, burst = 5 }",
    ))
    .await;
    let mut events = orch.watch_graphs();
    let ids = run_all(&orch, "storm", 40, Duration::from_secs(600)).await;
    let mut paused = std::collections::BTreeMap::new();
    while let Ok(e) = events.try_recv() {
        if let cascade_orchestrator::signal::GraphEventKind::AgentPaused {
            agent,
            reach,
            causes,
        } = e.kind
        {
            assert!(
                causes.iter().any(|(k, _)| matches!(k,
                    cascade_orchestrator::signal::CauseKey::Quota { quota } if &**quota == "upstream:faults-slow")),
                "{causes:?}"
            );
            paused.insert(agent.to_string(), reach);
        }
    }
    use cascade_orchestrator::signal::Reach;
    assert_eq!(paused.get("classify"), Some(&Reach::Direct), "{paused:?}");
    assert_eq!(paused.get("enrich"), Some(&Reach::Upstream), "{paused:?}");
    assert_eq!(paused.get("post"), Some(&Reach::Upstream), "{paused:?}");
    for id in &ids {
        let job = orch.get(*id).unwrap().unwrap();
        assert_eq!(job.state, JobState::Succeeded);
        // Refusals spend no attempt.
        assert!(job.steps.iter().all(|s| s.attempts == 1), "{:?}", job.steps);
    }
    let up = cascade_orchestrator::agents::sim::upstream(orch.registry(), "faults-slow");
    assert_eq!(up.calls(), 80);
    // Paced at the learned rate: refusals stay a small share of the calls.
    assert!(up.refusals() <= 20, "{} refusals", up.refusals());
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn a_watcher_gets_only_its_jobs_events_and_leaves_nothing_behind() {
    use futures::StreamExt;
    let orch = start(
        r#"
        [graph]
        name = "slow"
        max_in_flight_jobs = 500
        [agents.wait]
        kind = "sim"
        latency = "10s"
        "#,
    )
    .await;
    let a = orch
        .submit(SubmitRequest::new("slow", json!({})))
        .await
        .unwrap()
        .id;
    let mut watch = Box::pin(orch.subscribe(a).unwrap());
    assert_eq!(orch.watched_jobs(), 1);
    // Two watchers of one job share its feed.
    let second = orch.subscribe(a).unwrap();
    assert_eq!(orch.watched_jobs(), 1);
    drop(second);
    // Other jobs of the same graph start, run and end (by their own short deadline) meanwhile:
    // none of their events reaches this watcher.
    let mut others = Vec::new();
    for i in 0..200 {
        let mut req = SubmitRequest::new("slow", json!({ "n": i }));
        req.deadline = Some(Duration::from_millis(5));
        others.push(orch.submit(req).await.unwrap().id);
    }
    for id in others {
        assert_eq!(orch.wait(id).await.unwrap().state, JobState::Failed);
    }
    let mut seen = Vec::new();
    while let Some(e) = watch.next().await {
        assert_eq!(e.job_id, a, "an event of another job reached the watcher");
        seen.push(e.seq);
    }
    let stored: Vec<u64> = orch
        .store()
        .events(a, 0)
        .unwrap()
        .iter()
        .map(|e| e.seq)
        .collect();
    assert_eq!(seen, stored, "every event of its own job, in order, once");
    // A finished job's feed is gone.
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(orch.watched_jobs(), 0);
    // Watching a finished job replays it and leaves no feed behind.
    let replay: Vec<_> = orch.subscribe(a).unwrap().collect().await;
    assert_eq!(replay.len(), stored.len());
    tokio::time::sleep(Duration::from_millis(10)).await;
    assert_eq!(orch.watched_jobs(), 0);
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn waiting_on_a_finished_job_leaves_no_waiter_behind() {
    let orch = start("[graph]\nname = \"g\"\n[agents.a]\nkind = \"sim\"\n").await;
    let ids = run_all(&orch, "g", 100, Duration::from_secs(10)).await;
    for _ in 0..10 {
        for &id in &ids {
            orch.wait(id).await.unwrap();
        }
    }
    assert_eq!(orch.awaited_jobs(), 0);
    orch.shutdown(Duration::from_secs(1)).await;
}
