//! The cascade, end to end in process on a paused tokio clock: exhausted quotas pause exactly the
//! agents they reach, work in flight finishes, nothing new starts into a paused path, everything
//! resumes when its last cause clears, and pauses burn no retry attempts.

use std::collections::BTreeMap;
use std::time::Duration;

use cascade_orchestrator::agents::sim;
use cascade_orchestrator::config;
use cascade_orchestrator::job::{EventKind, JobId, JobState};
use cascade_orchestrator::quota::CircuitState;
use cascade_orchestrator::signal::{CauseKey, GraphEventKind, Reach};
use cascade_orchestrator::{Orchestrator, SubmitError, SubmitRequest};
use serde_json::json;
use tokio::time::Instant;

mod common;
use common::start;

async fn reach_of(orch: &Orchestrator, graph: &str) -> BTreeMap<String, Option<Reach>> {
    orch.pauses(graph)
        .await
        .unwrap()
        .into_iter()
        .map(|(a, p)| (a.to_string(), p.map(|p| p.reach)))
        .collect()
}

fn expect(pairs: &[(&str, Option<Reach>)]) -> BTreeMap<String, Option<Reach>> {
    pairs.iter().map(|(n, r)| (n.to_string(), *r)).collect()
}

/// When each agent's step of `job` succeeded, on the paused clock's wall time.
fn step_succeeded(orch: &Orchestrator, job: JobId, agent: &str) -> bool {
    orch.store()
        .events(job, 0)
        .unwrap()
        .iter()
        .any(|e| matches!(&e.kind, EventKind::StepSucceeded { agent: a, .. } if &**a == agent))
}

const TRIAGE: &str = r#"
[graph]
name = "g"
[quotas.llm]
requests_per_second = 100
[agents.classify]
kind = "sim"
quota = "llm"
latency = "100ms"
[agents.draft]
kind = "sim"
after = ["classify"]
latency = "50ms"
[agents.notify]
kind = "sim"
after = ["classify"]
on_upstream_pause = "stop"
latency = "10ms"
[agents.audit]
kind = "sim"
latency = "10ms"
"#;

#[tokio::test(start_paused = true)]
async fn pause_reaches_exactly_the_quota_and_its_descendants() {
    let orch = start(TRIAGE).await;
    let mut watch = orch.watch_graphs();
    // A job whose classify call is in flight when the quota runs out.
    let first = orch
        .submit(SubmitRequest::new("g", json!({"n": 1})))
        .await
        .unwrap()
        .id;
    tokio::time::sleep(Duration::from_millis(20)).await;
    assert!(orch.exhaust_quota("llm", Duration::from_secs(5)).await);
    assert!(!orch.exhaust_quota("nope", Duration::from_secs(5)).await);
    tokio::time::sleep(Duration::from_millis(1)).await;
    assert_eq!(
        reach_of(&orch, "g").await,
        expect(&[
            ("classify", Some(Reach::Direct)),
            ("draft", Some(Reach::Upstream)),
            ("notify", Some(Reach::Upstream)),
            ("audit", None),
        ])
    );
    let (_, pause) = orch
        .pauses("g")
        .await
        .unwrap()
        .into_iter()
        .find(|(a, _)| &**a == "classify")
        .unwrap();
    let causes = pause.unwrap().causes;
    assert_eq!(causes.len(), 1);
    assert_eq!(
        causes[0].0,
        CauseKey::Quota {
            quota: "llm".into()
        }
    );
    assert_eq!(&*causes[0].1.reason, "upstream rate limit (429)");

    // A job submitted now does not start: its path runs through paused agents.
    let second = orch
        .submit(SubmitRequest::new("g", json!({"n": 2})))
        .await
        .unwrap()
        .id;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(orch.get(second).unwrap().unwrap().state, JobState::Pending);

    // The in-flight classify call finished; draft (drain) ran on its output; notify (stop) waits.
    assert!(step_succeeded(&orch, first, "classify"));
    assert!(
        step_succeeded(&orch, first, "draft"),
        "drain finishes steps whose inputs are there"
    );
    assert!(
        !step_succeeded(&orch, first, "notify"),
        "stop starts nothing while paused"
    );
    assert_eq!(orch.get(first).unwrap().unwrap().state, JobState::Running);

    // The pause ends with its cause: everything resumes and both jobs finish.
    let t = Instant::now();
    assert_eq!(orch.wait(second).await.unwrap().state, JobState::Succeeded);
    assert!(
        t.elapsed() >= Duration::from_millis(4400),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(orch.wait(first).await.unwrap().state, JobState::Succeeded);
    assert!(reach_of(&orch, "g").await.values().all(Option::is_none));

    // Watchers saw the quota run out, each pause once, then each resume.
    let mut paused = Vec::new();
    let mut resumed = Vec::new();
    let mut quota_events = Vec::new();
    while let Ok(e) = watch.try_recv() {
        match e.kind {
            GraphEventKind::AgentPaused { agent, .. } => paused.push(agent.to_string()),
            GraphEventKind::AgentResumed { agent } => resumed.push(agent.to_string()),
            GraphEventKind::QuotaExhausted { quota, .. } => {
                quota_events.push(format!("exhausted {quota}"))
            }
            GraphEventKind::QuotaAvailable { quota } => {
                quota_events.push(format!("available {quota}"))
            }
            _ => {}
        }
    }
    paused.sort();
    resumed.sort();
    assert_eq!(paused, ["classify", "draft", "notify"]);
    assert_eq!(resumed, ["classify", "draft", "notify"]);
    assert_eq!(quota_events, ["exhausted llm", "available llm"]);
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn two_quotas_on_one_agent_resume_when_both_clear() {
    let orch = start(
        r#"
        [graph]
        name = "g"
        [quotas.a]
        requests_per_second = 100
        [quotas.b]
        requests_per_second = 100
        [agents.x]
        kind = "sim"
        quotas = ["a", "b"]
        [agents.y]
        kind = "sim"
        after = ["x"]
        "#,
    )
    .await;
    orch.exhaust_quota("a", Duration::from_secs(2)).await;
    orch.exhaust_quota("b", Duration::from_secs(4)).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    let pauses = orch.pauses("g").await.unwrap();
    assert_eq!(pauses[0].1.as_ref().unwrap().causes.len(), 2);
    assert_eq!(
        pauses[1].1.as_ref().unwrap().causes.len(),
        2,
        "y carries both causes too"
    );
    let id = orch
        .submit(SubmitRequest::new("g", json!({})))
        .await
        .unwrap()
        .id;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    // a cleared, b still holds.
    let pauses = orch.pauses("g").await.unwrap();
    let causes = &pauses[0].1.as_ref().unwrap().causes;
    assert_eq!(causes.len(), 1);
    assert_eq!(causes[0].0, CauseKey::Quota { quota: "b".into() });
    assert_eq!(orch.get(id).unwrap().unwrap().state, JobState::Pending);
    let t = Instant::now();
    assert_eq!(orch.wait(id).await.unwrap().state, JobState::Succeeded);
    assert!(t.elapsed() >= Duration::from_millis(1400));
    assert!(
        orch.pauses("g")
            .await
            .unwrap()
            .iter()
            .all(|(_, p)| p.is_none())
    );
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn refusals_pause_the_chain_and_burn_no_attempts() {
    // The upstream's real limit (80/s) is 20% below what the quota says (100/s).
    let orch = start(
        r#"
        [graph]
        name = "g"
        max_in_flight_jobs = 200
        [quotas.llm]
        requests_per_second = 100
        burst = 5
        [agents.classify]
        kind = "sim"
        quota = "llm"
        latency = "20ms"
        upstream = "converge-upstream"
        upstream_limit = { requests_per_second = 80, burst = 5 }
        retry = { max_attempts = 1 }
        [agents.draft]
        kind = "sim"
        quota = "llm"
        after = ["classify"]
        latency = "20ms"
        upstream = "converge-upstream"
        retry = { max_attempts = 1 }
        "#,
    )
    .await;
    let start = Instant::now();
    let mut ids = Vec::new();
    for i in 0..2000 {
        ids.push(
            orch.submit(SubmitRequest::new("g", json!({"n": i})))
                .await
                .unwrap()
                .id,
        );
    }
    for id in &ids {
        let job = orch.wait(*id).await.unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
        // Refusals and pauses never cost an attempt (max_attempts = 1 would have failed them).
        assert!(job.steps.iter().all(|s| s.attempts == 1));
    }
    let elapsed = start.elapsed().as_secs_f64();
    let up = sim::upstream(orch.registry(), "converge-upstream");
    let calls = up.calls() as f64;
    let refusals = up.refusals() as f64;
    assert_eq!(calls, 4000.0);
    assert!(
        refusals / calls < 0.02,
        "{refusals} refusals for {calls} calls"
    );
    // 4000 calls at a real limit of 80/s take at least 50 s; converging on it keeps goodput
    // near that limit.
    let goodput = calls / elapsed;
    eprintln!(
        "converge: {calls} calls, {refusals} refusals, {elapsed:.1} s, goodput {goodput:.1}/s"
    );
    assert!(
        goodput >= 0.9 * 80.0,
        "goodput {goodput:.1} calls/s over {elapsed:.1} s"
    );
    let q = common::quota(&orch, "llm").await;
    assert!(
        q.effective_rate_multiplier < 0.95,
        "AIMD lowered the rate: {}",
        q.effective_rate_multiplier
    );
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn token_budget_reserves_settles_and_paces_across_the_window() {
    let orch = start(
        r#"
        [graph]
        name = "g"
        [quotas.tokens]
        tokens_per_minute = 1000
        [agents.llm]
        kind = "sim"
        quota = "tokens"
        usage = { prompt_tokens = 300, completion_tokens = 100 }
        "#,
    )
    .await;
    let start = Instant::now();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            orch.submit(SubmitRequest::new("g", json!({})))
                .await
                .unwrap()
                .id,
        );
    }
    let mut finished = Vec::new();
    for id in &ids {
        orch.wait(*id).await.unwrap();
        finished.push(start.elapsed());
    }
    // 400 tokens each: two fit the minute, the third waits for the first to leave the window.
    assert!(finished[1] < Duration::from_millis(10), "{finished:?}");
    assert!(
        finished[2] >= Duration::from_secs(60) && finished[2] < Duration::from_millis(60_100),
        "{finished:?}"
    );
    let q = common::quota(&orch, "tokens").await;
    assert_eq!((q.prompt_tokens, q.completion_tokens), (900, 300));
    assert_eq!(
        q.exhaustions, 1,
        "a wait of a minute is exhaustion, not pacing"
    );
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn oldest_job_first_across_agents_sharing_a_quota() {
    // classify and draft share 10 requests/s; jobs must finish in submission order rather than
    // new classify calls overtaking half-done jobs' draft calls.
    let orch = start(
        r#"
        [graph]
        name = "g"
        [quotas.llm]
        requests_per_second = 10
        burst = 1
        [agents.classify]
        kind = "sim"
        quota = "llm"
        [agents.draft]
        kind = "sim"
        quota = "llm"
        after = ["classify"]
        "#,
    )
    .await;
    let mut ids = Vec::new();
    for _ in 0..20 {
        ids.push(
            orch.submit(SubmitRequest::new("g", json!({})))
                .await
                .unwrap()
                .id,
        );
    }
    let mut finished = Vec::new();
    for id in &ids {
        finished.push(orch.wait(*id).await.unwrap().finished_at.unwrap());
    }
    assert!(
        finished.windows(2).all(|w| w[0] <= w[1]),
        "jobs finished out of submission order"
    );
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(start_paused = true)]
async fn open_circuit_pauses_downstream_and_half_open_probe_closes_it() {
    let orch = start(
        r#"
        [graph]
        name = "g"
        [quotas.crm]
        max_concurrency = 4
        circuit_breaker = { failure_ratio = 0.5, min_calls = 4, window = "10s", open_for = "2s" }
        [agents.lookup]
        kind = "sim"
        quota = "crm"
        upstream = "flaky-crm"
        transient_failure_rate = 1.0
        retry = { max_attempts = 2, initial_delay = "1ms", max_delay = "1ms" }
        [agents.after_lookup]
        kind = "sim"
        after = ["lookup"]
        "#,
    )
    .await;
    let mut watch = orch.watch_graphs();
    for _ in 0..4 {
        orch.submit(SubmitRequest::new("g", json!({})))
            .await
            .unwrap();
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
    let q = common::quota(&orch, "crm").await;
    assert_eq!(q.circuit, Some(CircuitState::Open));
    assert_eq!(
        reach_of(&orch, "g").await,
        expect(&[
            ("lookup", Some(Reach::Direct)),
            ("after_lookup", Some(Reach::Upstream))
        ])
    );
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mut states = Vec::new();
    while let Ok(e) = watch.try_recv() {
        if let GraphEventKind::CircuitChanged { state, .. } = e.kind {
            states.push(state);
        }
    }
    // Opened; half-open after 2 s; the probe failed (the upstream still fails): open again.
    assert_eq!(
        &states[..3],
        [
            CircuitState::Open,
            CircuitState::HalfOpen,
            CircuitState::Open
        ]
    );
    orch.shutdown(Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn admission_refusal_during_a_pause_says_when_to_come_back() {
    let orch = start(
        "[graph]\nname = \"g\"\nmax_pending_jobs = 3\n[quotas.q]\nrequests_per_second = 10\n[agents.a]\nkind = \"sim\"\nquota = \"q\"\n",
    )
    .await;
    orch.exhaust_quota("q", Duration::from_secs(30)).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    for _ in 0..3 {
        orch.submit(SubmitRequest::new("g", json!({})))
            .await
            .unwrap();
    }
    match orch.submit(SubmitRequest::new("g", json!({}))).await {
        Err(SubmitError::Overloaded {
            retry_after,
            pending,
            ..
        }) => {
            assert_eq!(pending, 3);
            // About the 30 s pause, plus a little to drain.
            assert!(
                retry_after >= Duration::from_secs(29) && retry_after <= Duration::from_secs(35),
                "{retry_after:?}"
            );
        }
        other => panic!("expected Overloaded, got {other:?}"),
    }
    orch.shutdown(Duration::from_millis(10)).await;
}

#[tokio::test(start_paused = true)]
async fn naive_mode_does_not_propagate_and_retries_refusals() {
    let model = config::parse_graph_str(
        "test.toml",
        r#"
        [graph]
        name = "g"
        [quotas.llm]
        requests_per_second = 100
        [agents.classify]
        kind = "sim"
        quota = "llm"
        upstream = "naive-upstream"
        upstream_limit = { requests_per_second = 50, burst = 1 }
        retry = { max_attempts = 10, initial_delay = "10ms", max_delay = "100ms" }
        [agents.draft]
        kind = "sim"
        after = ["classify"]
        "#,
        &Default::default(),
    )
    .unwrap();
    let orch = Orchestrator::builder(model)
        .cascade(false)
        .start()
        .await
        .unwrap();
    assert!(!orch.cascade());
    orch.exhaust_quota("llm", Duration::from_secs(5)).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    assert!(
        reach_of(&orch, "g").await.values().all(Option::is_none),
        "naive mode pauses nothing"
    );
    let mut ids = Vec::new();
    for _ in 0..50 {
        ids.push(
            orch.submit(SubmitRequest::new("g", json!({})))
                .await
                .unwrap()
                .id,
        );
    }
    for id in ids {
        orch.wait(id).await.unwrap();
    }
    // Refusals were retried by the agent's policy, spending attempts.
    let stats = orch.stats("g").unwrap();
    assert!(
        stats.agents[0].rate_limited > 0 && stats.agents[0].retries > 0,
        "{:?}",
        stats.agents[0]
    );
    orch.shutdown(Duration::from_secs(1)).await;
}

/// Two graphs whose agents share one quota of `cascade.toml`, under real traffic: grants go to
/// the oldest job whichever graph it belongs to, and when the provider behind the quota answers
/// 429 the pause reaches both graphs' agents and their downstream.
#[tokio::test(start_paused = true)]
async fn two_graphs_sharing_a_quota_go_oldest_first_and_pause_together() {
    let dir = tempfile::tempdir().unwrap();
    let keys = dir.path().join("keys.log");
    let graph = |name: &str, provider_limit: &str| {
        format!(
            "[graph]\nname = \"{name}\"\nmax_pending_jobs = 1000\n\
             [agents.call]\nkind = \"sim\"\nquota = \"shared\"\nlatency = \"1ms\"\n\
             upstream = \"shared-provider\"\n{provider_limit}key_log = \"{}\"\n\
             [agents.after]\nkind = \"sim\"\nafter = [\"call\"]\n",
            keys.display()
        )
    };
    let load = |provider_limit: &str| {
        std::fs::write(dir.path().join("a.toml"), graph("ga", provider_limit)).unwrap();
        std::fs::write(dir.path().join("b.toml"), graph("gb", "")).unwrap();
        std::fs::write(
            dir.path().join("cascade.toml"),
            "graphs = [\"a.toml\", \"b.toml\"]\n[quotas.shared]\nrequests_per_second = 20\nburst = 1\n",
        )
        .unwrap();
        config::load(
            Some(&dir.path().join("cascade.toml")),
            &[],
            &Default::default(),
        )
        .unwrap_or_else(|e| panic!("{e}"))
    };

    // Oldest first: 60 jobs alternating between the graphs, all waiting on the quota.
    let orch = Orchestrator::builder(load("")).start().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..60 {
        let g = if i % 2 == 0 { "ga" } else { "gb" };
        ids.push(
            orch.submit(SubmitRequest::new(g, json!({ "n": i })))
                .await
                .unwrap()
                .id,
        );
    }
    for id in &ids {
        assert_eq!(orch.wait(*id).await.unwrap().state, JobState::Succeeded);
    }
    let order: Vec<usize> = std::fs::read_to_string(&keys)
        .unwrap()
        .lines()
        .filter_map(|k| k.strip_suffix("/call"))
        .map(|id| ids.iter().position(|j| j.to_string() == id).unwrap())
        .collect();
    assert_eq!(order.len(), 60);
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "the provider saw the jobs out of submission order across graphs: {order:?}"
    );
    orch.shutdown(Duration::from_secs(1)).await;

    // The provider allows one call in 10 s, the quota claims 20/s: a Retry-After that long is
    // past the quota's pause threshold, so its 429s pause both graphs (a short one paces).
    std::fs::remove_file(&keys).unwrap();
    let orch = Orchestrator::builder(load(
        "upstream_limit = { requests_per_minute = 6, burst = 1 }\n",
    ))
    .start()
    .await
    .unwrap();
    let mut ids = Vec::new();
    for i in 0..6 {
        let g = if i % 2 == 0 { "ga" } else { "gb" };
        ids.push(
            orch.submit(SubmitRequest::new(g, json!({ "n": i })))
                .await
                .unwrap()
                .id,
        );
    }
    let mut seen = std::collections::BTreeSet::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen.len() < 4 {
        for g in ["ga", "gb"] {
            for (agent, pause) in orch.pauses(g).await.unwrap() {
                if let Some(p) = pause
                    && p.causes.iter().any(
                        |(c, _)| matches!(c, CauseKey::Quota { quota } if &**quota == "shared"),
                    )
                {
                    seen.insert(format!("{g}.{agent}:{:?}", p.reach));
                }
            }
        }
        assert!(Instant::now() < deadline, "the 429s paused only {seen:?}");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        [
            "ga.after:Upstream",
            "ga.call:Direct",
            "gb.after:Upstream",
            "gb.call:Direct"
        ]
    );
    for id in &ids {
        assert_eq!(orch.wait(*id).await.unwrap().state, JobState::Succeeded);
    }
    let q = common::quota(&orch, "shared").await;
    assert!(q.refusals > 0, "{q:?}");
    orch.shutdown(Duration::from_secs(1)).await;
}
