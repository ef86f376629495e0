//! Budgets: a job stops at the step its budget would not cover, waits (parked, resumable), and
//! goes on from there when an operator raises it, re-running nothing.

mod common;

use std::time::Duration;

use cascade_orchestrator::job::{Budget, JobState, StepState};
use cascade_orchestrator::{Orchestrator, SubmitError, SubmitRequest};
use serde_json::json;

/// a → b → c, each a simulated call of exactly 100 + 50 tokens at $1 per 1,000 tokens.
fn chain(budget: &str) -> String {
    let agent = |name: &str, after: Option<&str>| {
        format!(
            "[agents.{name}]\nkind = \"sim\"\nusage = {{ prompt_tokens = 100, completion_tokens = 50 }}\ncost_per_1k_tokens = 1.0\n{}\n",
            after
                .map(|a| format!("after = [\"{a}\"]"))
                .unwrap_or_default()
        )
    };
    format!(
        "[graph]\nname = \"chain\"\nbudget = {budget}\n\n{}{}{}",
        agent("a", None),
        agent("b", Some("a")),
        agent("c", Some("b"))
    )
}

async fn wait_state(orch: &Orchestrator, id: cascade_orchestrator::job::JobId, state: JobState) {
    for _ in 0..10_000 {
        if orch.get(id).unwrap().unwrap().state == state {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("job never reached {state}: {:?}", orch.get(id).unwrap());
}

#[tokio::test(start_paused = true)]
async fn a_token_budget_stops_the_job_at_the_step_it_would_not_cover_and_a_raise_resumes_it() {
    let orch = common::start(&chain("{ max_tokens = 400 }")).await;
    let id = orch
        .submit(SubmitRequest::new("chain", json!({})))
        .await
        .unwrap()
        .id;
    wait_state(&orch, id, JobState::BudgetExceeded).await;
    let r = orch.get(id).unwrap().unwrap();
    // a and b spent 300 tokens; c may spend 150 more: 450 > 400.
    assert_eq!(r.steps[0].state, StepState::Succeeded);
    assert_eq!(r.steps[1].state, StepState::Succeeded);
    assert_eq!(r.steps[2].state, StepState::Waiting, "c never started");
    assert_eq!(r.steps[2].attempts, 0);
    assert_eq!(r.usage.total_tokens(), 300);
    let error = r.error.clone().unwrap();
    for part in [
        "max_tokens",
        "400 tokens",
        "300 tokens spent",
        "\"c\"",
        "150 tokens more",
    ] {
        assert!(error.contains(part), "{part} in {error}");
    }
    let snap = orch.scheduler_snapshot("chain").await.unwrap();
    assert_eq!(snap.jobs_in_flight, 0, "a stopped job holds no place");

    let raised = orch
        .raise_budget(
            id,
            Budget {
                max_tokens: Some(500),
                max_cost_usd: None,
            },
        )
        .await
        .unwrap();
    assert_eq!(raised.budget.unwrap().max_tokens, Some(500));
    let done = tokio::time::timeout(Duration::from_secs(60), orch.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert_eq!(done.error, None);
    for s in &done.steps {
        assert_eq!(s.attempts, 1, "{} ran once: nothing re-ran", s.agent);
    }
    assert_eq!(done.usage.total_tokens(), 450);
    let events = orch.store().events(id, 0).unwrap();
    let kinds: Vec<String> = events
        .iter()
        .map(|e| {
            serde_json::to_value(e).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    for k in ["budget_exceeded", "budget_raised", "finished"] {
        assert!(kinds.iter().any(|x| x == k), "{k} in {kinds:?}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_cost_budget_and_a_job_budget_below_the_graphs() {
    let orch = common::start(&chain("{ max_cost_usd = 0.35, max_tokens = 1000 }")).await;
    // $0.15 a step: a and b spend $0.30, c would pass $0.35.
    let id = orch
        .submit(SubmitRequest::new("chain", json!({})))
        .await
        .unwrap()
        .id;
    wait_state(&orch, id, JobState::BudgetExceeded).await;
    let r = orch.get(id).unwrap().unwrap();
    assert!(
        r.error
            .as_deref()
            .unwrap()
            .contains("max_cost_usd of $0.3500"),
        "{:?}",
        r.error
    );
    assert_eq!(r.steps[2].attempts, 0);

    // A job may lower its graph's budget: 200 tokens stop it before b.
    let mut req = SubmitRequest::new("chain", json!({}));
    req.budget = Some(Budget {
        max_tokens: Some(200),
        max_cost_usd: None,
    });
    let low = orch.submit(req).await.unwrap().id;
    wait_state(&orch, low, JobState::BudgetExceeded).await;
    let r = orch.get(low).unwrap().unwrap();
    assert_eq!(r.steps[1].attempts, 0);
    assert_eq!(r.budget.unwrap().max_tokens, Some(200));
    assert_eq!(
        r.budget.unwrap().max_cost_usd,
        Some(0.35),
        "the graph's other limit holds"
    );
    // ... and cancelling it ends it.
    let cancelled = orch.cancel(low, "not worth it").await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);

    // Never raise it.
    let mut req = SubmitRequest::new("chain", json!({}));
    req.budget = Some(Budget {
        max_tokens: Some(5000),
        max_cost_usd: None,
    });
    match orch.submit(req).await {
        Err(SubmitError::InvalidBudget(m)) => assert!(m.contains("not raise"), "{m}"),
        other => panic!("{other:?}"),
    }
    // A raise of a finished job is refused.
    let finished = orch.cancel(id, "done").await.unwrap().id;
    let e = orch
        .raise_budget(
            finished,
            Budget {
                max_tokens: Some(1),
                max_cost_usd: None,
            },
        )
        .await
        .unwrap_err();
    assert!(e.to_string().contains("has ended"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn over_grpc_a_stopped_job_shows_its_usage_and_resumes_when_raised() {
    use cascade_orchestrator::api::pb;
    let model = cascade_orchestrator::config::parse_graph_str(
        "chain.toml",
        &chain("{ max_tokens = 400 }"),
        &Default::default(),
    )
    .unwrap();
    let (_orch, server) = common::serve_in_process(model).await;
    let mut client = common::connect(server.grpc_addr.port()).await;
    let too_much = client
        .submit_job(pb::SubmitJobRequest {
            graph: "chain".into(),
            budget: Some(pb::Budget {
                max_tokens: Some(401),
                max_cost_usd: None,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(too_much.code(), tonic::Code::InvalidArgument);
    let id = common::submit(&mut client, "chain", "{}").await;
    let job = loop {
        let j = client
            .get_job(pb::GetJobRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if j.state == pb::JobState::BudgetExceeded as i32 {
            break j;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    let usage = job.usage.unwrap();
    assert_eq!(usage.prompt_tokens + usage.completion_tokens, 300);
    assert_eq!(job.budget.unwrap().max_tokens, Some(400));
    let raised = client
        .raise_job_budget(pb::RaiseJobBudgetRequest {
            job_id: id.clone(),
            budget: Some(pb::Budget {
                max_tokens: Some(450),
                max_cost_usd: None,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(raised.budget.unwrap().max_tokens, Some(450));
    loop {
        let j = client
            .get_job(pb::GetJobRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if j.state == pb::JobState::Succeeded as i32 {
            break;
        }
        assert_ne!(j.state, pb::JobState::Failed as i32, "{}", j.error);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let empty = client
        .raise_job_budget(pb::RaiseJobBudgetRequest {
            job_id: id,
            budget: None,
        })
        .await
        .unwrap_err();
    assert_eq!(empty.code(), tonic::Code::InvalidArgument);
}

#[tokio::test(start_paused = true)]
async fn a_spend_quota_pauses_the_agents_that_spend_it_until_its_window_allows_more() {
    use cascade_orchestrator::quota::Limit;
    // $0.15 a call, $0.30 an hour: two calls, then the quota is exhausted for the hour.
    let orch = common::start(
        r#"
[graph]
name = "spend"

[quotas.provider-spend]
cost_usd_per_hour = 0.30

[agents.draft]
kind = "sim"
quota = "provider-spend"
usage = { prompt_tokens = 100, completion_tokens = 50 }
cost_per_1k_tokens = 1.0

[agents.send]
kind = "sim"
after = ["draft"]
"#,
    )
    .await;
    let mut ids = Vec::new();
    for n in 0..3 {
        let req = SubmitRequest::new("spend", json!({ "n": n }));
        ids.push(orch.submit(req).await.unwrap().id);
    }
    for id in &ids[..2] {
        let job = tokio::time::timeout(Duration::from_secs(5), orch.wait(*id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(job.state, JobState::Succeeded);
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let q = common::quota(&orch, "provider-spend").await;
    assert_eq!(q.exhausted_reason, Some(Limit::CostBudget), "{q:?}");
    assert_eq!(q.cost_limit.as_deref(), Some("$0.3/hour"));
    assert!((q.cost_used_usd.unwrap() - 0.30).abs() < 1e-9, "{q:?}");
    // The agent that spends it pauses with the quota as its cause, and its downstream too.
    let pauses = orch.pauses("spend").await.unwrap();
    for (agent, pause) in &pauses {
        let pause = pause
            .as_ref()
            .unwrap_or_else(|| panic!("{agent} is paused"));
        assert_eq!(&*pause.causes[0].1.reason, "cost budget spent", "{agent}");
    }
    let third = orch.get(ids[2]).unwrap().unwrap();
    assert_eq!(
        third.steps[0].attempts, 0,
        "no call that the quota cannot pay for starts"
    );

    // An hour later the window allows more: the third job runs.
    tokio::time::sleep(Duration::from_secs(3600)).await;
    let job = tokio::time::timeout(Duration::from_secs(5), orch.wait(ids[2]))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state, JobState::Succeeded);
    assert!(
        orch.pauses("spend")
            .await
            .unwrap()
            .iter()
            .all(|(_, p)| p.is_none())
    );
}

#[tokio::test(start_paused = true)]
async fn a_budget_set_on_a_running_job_counts_what_it_spent_already() {
    // No graph budget; b takes ten seconds, during which the job is given one.
    let graph = chain("{ max_tokens = 1 }")
        .replace("budget = { max_tokens = 1 }\n", "")
        .replace(
            "[agents.b]\nkind = \"sim\"\n",
            "[agents.b]\nkind = \"sim\"\nlatency = \"10s\"\n",
        );
    assert!(
        !graph.contains("budget") && graph.contains("10s"),
        "{graph}"
    );
    let orch = common::start(&graph).await;
    let id = orch
        .submit(SubmitRequest::new("chain", json!({})))
        .await
        .unwrap()
        .id;
    tokio::time::sleep(Duration::from_secs(1)).await;
    // a spent 150; b may spend 150; c would pass 400.
    orch.raise_budget(
        id,
        Budget {
            max_tokens: Some(400),
            max_cost_usd: None,
        },
    )
    .await
    .unwrap();
    wait_state(&orch, id, JobState::BudgetExceeded).await;
    let r = orch.get(id).unwrap().unwrap();
    assert_eq!(r.steps[1].state, StepState::Succeeded);
    assert_eq!(r.steps[2].attempts, 0);
    assert!(r.error.unwrap().contains("300 tokens spent"));
}
