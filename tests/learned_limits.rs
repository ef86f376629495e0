//! Quotas learned from the upstream: `llm` agents sharing a quota declared with only
//! `learn_from_upstream = true`, in a storm against a simulated provider that enforces its own
//! request and token limits and states them in its headers (OpenAI's and Anthropic's forms).
//! The provider starts drained, as if other clients of the account had spent it: the first calls
//! are refused, the chain pauses, and once the quota mirrors the provider's buckets the storm
//! runs at the provider's pace with next to no refusals.

use std::time::Duration;

use cascade_orchestrator::job::JobState;
use cascade_orchestrator::signal::{CauseKey, GraphEventKind, Reach};
use serde_json::json;

mod common;
#[path = "support/limited_provider.rs"]
mod limited_provider;

use limited_provider::{Limits, Provider, Style};

const LIMITS: Limits = Limits {
    requests: 50,
    requests_per_sec: 200.0,
    tokens: 1500,
    tokens_per_sec: 3000.0,
};

fn storm_graph(p: &Provider) -> String {
    storm_graph_with(p, "learn_from_upstream = true")
}

/// The provider's storm graph with `quota` as the body of its shared quota, and `post` after
/// `draft`: an agent that calls nothing, paused only through its upstream.
fn storm_graph_with(p: &Provider, quota: &str) -> String {
    p.storm_graph(quota, "env:CASCADE_TEST_LIMITED_KEY")
        + r#"
        [agents.post]
        kind = "template"
        after = ["draft"]
        output = { reply = "{{ deps.draft.text }}" }
        "#
}

async fn storm(style: Style, jobs: usize) {
    // SAFETY: set before the orchestrator starts; every test sets the same value.
    unsafe { std::env::set_var("CASCADE_TEST_LIMITED_KEY", "test-key") };
    let provider = Provider::start(style, LIMITS).await;
    let orch = common::start(&storm_graph(&provider)).await;
    let mut events = orch.watch_graphs();
    provider.drain();
    provider.reset_counts();
    let mut ids = Vec::with_capacity(jobs);
    for i in 0..jobs {
        let req = cascade_orchestrator::SubmitRequest::new(
            "storm",
            json!({"body": format!("ticket {i}: I was charged twice")}),
        );
        ids.push(orch.submit(req).await.unwrap().id);
    }
    for id in &ids {
        let job = tokio::time::timeout(Duration::from_secs(120), orch.wait(*id))
            .await
            .expect("every job ends")
            .unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
        // A refusal is not the step's fault: no attempt spent on it.
        assert!(job.steps.iter().all(|s| s.attempts == 1), "{:?}", job.steps);
    }
    let counts = provider.counts();
    let calls = counts.answered + counts.refused;
    assert_eq!(counts.answered, 2 * jobs as u64, "{counts:?}");
    // The drained start is refused; once the first answer could have reached the quota, fewer
    // than one call in a thousand is.
    assert!(
        counts.refused >= 1,
        "the drained provider refused nothing: {counts:?}"
    );
    assert!(
        counts.refused_after_first_answer * 1000 < calls,
        "{} refusals after the limits were known, in {calls} calls: {counts:?}",
        counts.refused_after_first_answer
    );
    // The refusals paused the chain: the agents on the quota directly, `post` behind them.
    let mut paused = std::collections::BTreeMap::new();
    while let Ok(e) = events.try_recv() {
        if let GraphEventKind::AgentPaused {
            agent,
            reach,
            causes,
        } = e.kind
            && causes
                .iter()
                .any(|(k, _)| matches!(k, CauseKey::Quota { quota } if &**quota == "provider"))
        {
            paused.entry(agent.to_string()).or_insert(reach);
        }
    }
    assert_eq!(paused.get("classify"), Some(&Reach::Direct), "{paused:?}");
    assert_eq!(paused.get("draft"), Some(&Reach::Direct), "{paused:?}");
    assert_eq!(paused.get("post"), Some(&Reach::Upstream), "{paused:?}");
    // The quota knows the provider's limits and rates.
    let q = common::quota(&orch, "provider").await;
    let requests = q.upstream_requests.expect("request limit learned");
    let tokens = q.upstream_tokens.expect("token limit learned");
    assert_eq!((requests.limit, tokens.limit), (50, 1500), "{q:?}");
    assert!(requests.measured && tokens.measured, "{q:?}");
    assert!(
        (requests.per_second / 200.0 - 1.0).abs() < 0.2,
        "{}",
        requests.per_second
    );
    assert!(
        (tokens.per_second / 3000.0 - 1.0).abs() < 0.2,
        "{}",
        tokens.per_second
    );
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_learns_an_openai_style_providers_limits() {
    storm(Style::OpenAi, 600).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_storm_learns_an_anthropic_style_providers_limits() {
    storm(Style::Anthropic, 600).await;
}

/// A quota declared far above the provider's limits, learning from it, is held to the
/// provider's limits before any 429: against a provider with its buckets full, not one call is
/// refused. The learned limits show in GetGraph and `/metrics`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_declared_limit_above_the_providers_is_held_to_it_and_shown() {
    use cascade_orchestrator::api::pb;
    // SAFETY: set before the orchestrator starts; every test sets the same value.
    unsafe { std::env::set_var("CASCADE_TEST_LIMITED_KEY", "test-key") };
    let provider = Provider::start(Style::OpenAi, LIMITS).await;
    let toml = storm_graph_with(
        &provider,
        "requests_per_second = 1000\ntokens_per_minute = 10000000\nlearn_from_upstream = true",
    );
    let model =
        cascade_orchestrator::config::parse_graph_str("storm.toml", &toml, &Default::default())
            .unwrap_or_else(|e| panic!("{e}"));
    let (orch, server) = common::serve_in_process(model).await;
    let mut ids = Vec::new();
    for i in 0..300 {
        let req = cascade_orchestrator::SubmitRequest::new(
            "storm",
            json!({"body": format!("ticket {i}")}),
        );
        ids.push(orch.submit(req).await.unwrap().id);
    }
    for id in ids {
        let job = tokio::time::timeout(Duration::from_secs(120), orch.wait(id))
            .await
            .expect("every job ends")
            .unwrap();
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    }
    let counts = provider.counts();
    assert_eq!((counts.answered, counts.refused), (600, 0), "{counts:?}");
    let mut client = common::connect(server.grpc_addr.port()).await;
    let g = client
        .get_graph(pb::GetGraphRequest {
            name: "storm".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let q = g
        .quotas
        .iter()
        .find(|q| q.name == "provider")
        .expect("quota listed");
    let requests = q
        .upstream_requests
        .expect("upstream request limit in GetGraph");
    let tokens = q.upstream_tokens.expect("upstream token limit in GetGraph");
    assert_eq!((requests.limit, tokens.limit), (50, 1500), "{q:?}");
    assert!(
        requests.measured && (requests.per_second / 200.0 - 1.0).abs() < 0.2,
        "{q:?}"
    );
    assert!(
        q.limits.contains("upstream states 50 requests"),
        "{}",
        q.limits
    );
    // The dashboard draws the same from /api/graphs ("upstream states 50 req (…/s), 1500 tok").
    let api: serde_json::Value = reqwest::get(format!("http://{}/api/graphs", server.http_addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let drawn = api
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|g| g["quotas"].as_array().into_iter().flatten())
        .find(|q| q["name"] == "provider")
        .cloned()
        .unwrap_or_else(|| panic!("no provider quota in /api/graphs: {api}"));
    assert_eq!(
        (
            drawn["upstream_requests"]["limit"].clone(),
            drawn["upstream_tokens"]["limit"].clone()
        ),
        (json!(50), json!(1500)),
        "{drawn}"
    );
    // Gauges are sampled once a second.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let text = reqwest::get(format!("http://{}/metrics", server.http_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        let has = |needle: &str| text.lines().any(|l| l.starts_with(needle));
        if has(r#"cascade_quota_upstream_limit{quota="provider",kind="requests"} 50"#)
            && has(r#"cascade_quota_upstream_limit{quota="provider",kind="tokens"} 1500"#)
            && has(r#"cascade_quota_upstream_refill_per_second{quota="provider",kind="tokens"}"#)
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no learned limits in /metrics:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    server.stop().await;
}
