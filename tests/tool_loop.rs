//! Tool-using `llm` agents: the loop runs in the engine, each model turn and each tool call a
//! journaled sub-step. Against a simulated OpenAI-compatible (and Anthropic) model in this
//! process that answers with tool calls from a script, and a help-desk MCP server (rmcp, over
//! streamable HTTP) that counts every call it gets.

mod common;
#[path = "support/tool_stand_ins.rs"]
mod stand_ins;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use cascade_orchestrator::api::pb;
use cascade_orchestrator::job::{JobState, SubStepKind, SubStepState};
use cascade_orchestrator::{Orchestrator, SubmitRequest};
use serde_json::{Value, json};
use stand_ins::{desk, graph, load, model, servers, set_key};

async fn settled(
    orch: &Orchestrator,
    id: cascade_orchestrator::job::JobId,
) -> cascade_orchestrator::job::JobRecord {
    tokio::time::timeout(Duration::from_secs(30), orch.wait_settled(id))
        .await
        .expect("the job settles")
        .unwrap()
}

/// A job of the support graph for Ada: its id.
async fn submit_support(orch: &Orchestrator) -> cascade_orchestrator::job::JobId {
    orch.submit(SubmitRequest::new(
        "support",
        json!({"email": "ada@example.com"}),
    ))
    .await
    .unwrap()
    .id
}

/// What [`until_parked`] started: the stand-ins, the orchestrator, and the job, parked.
struct Parked {
    sim: model::Model,
    orch: Orchestrator,
    id: cascade_orchestrator::job::JobId,
    job: cascade_orchestrator::job::JobRecord,
    _dir: tempfile::TempDir,
}

/// The desk and a simulated model speaking `provider`, an orchestrator on the support graph
/// (with `extra` lines for its agent), and one job of it, run until it parks for the close's
/// approval.
async fn until_parked(provider: &str, extra: &str, desk: &desk::Desk) -> Parked {
    set_key();
    let desk_port = desk::serve(desk.clone()).await;
    let sim = model::Model::default();
    let llm_port = model::serve(sim.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let orch = Orchestrator::builder(load(
        dir.path(),
        &graph(llm_port, provider, extra),
        &servers(desk_port),
    ))
    .start()
    .await
    .unwrap();
    let id = submit_support(&orch).await;
    let job = settled(&orch, id).await;
    assert_eq!(job.state, JobState::AwaitingApproval, "{:?}", job.error);
    Parked {
        sim,
        orch,
        id,
        job,
        _dir: dir,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_calls_then_an_approved_close_each_journaled_and_made_once() {
    let desk = desk::Desk::default();
    let Parked {
        sim,
        orch,
        id,
        job: parked,
        ..
    } = until_parked("openai", "", &desk).await;
    // Both lookups ran, side by side, with the model's arguments, each once; the close waits.
    assert_eq!(
        (desk.count("lookup_customer"), desk.count("search_tickets")),
        (1, 1)
    );
    assert_eq!(desk.count("close_ticket"), 0);
    let args = desk.arguments.lock().unwrap().clone();
    assert!(
        args.contains(&(
            "lookup_customer".into(),
            json!({"email": "ada@example.com"})
        )),
        "{args:?}"
    );
    assert!(
        args.contains(&("search_tickets".into(), json!({"query": "refund"}))),
        "{args:?}"
    );
    // Each call came with its own idempotency key, <job>/<agent>/<n>.
    let keys = desk.keys.lock().unwrap().clone();
    let mut expected = vec![format!("{id}/triage/2"), format!("{id}/triage/3")];
    let mut got = keys.clone();
    got.sort();
    expected.sort();
    assert_eq!(got, expected);
    // The journal so far: the turn, its two calls, the next turn, and the close waiting.
    let journal = &parked.steps[0].sub_steps;
    let shape: Vec<(u32, SubStepKind, SubStepState)> =
        journal.iter().map(|s| (s.n, s.kind, s.state)).collect();
    assert_eq!(
        shape,
        vec![
            (1, SubStepKind::Turn, SubStepState::Succeeded),
            (2, SubStepKind::ToolCall, SubStepState::Succeeded),
            (3, SubStepKind::ToolCall, SubStepState::Succeeded),
            (4, SubStepKind::Turn, SubStepState::Succeeded),
            (5, SubStepKind::ToolCall, SubStepState::AwaitingApproval),
        ]
    );
    assert_eq!(journal[0].usage.prompt_tokens, 100);
    // The approval names the exact call.
    let approval_id = format!("{id}/triage/5");
    let v = orch.approval(&approval_id).unwrap();
    let proposal: Value = serde_json::from_str(&v.approval.proposal).unwrap();
    assert_eq!(
        proposal,
        json!({"server": "desk", "tool": "close_ticket", "arguments": {"ticket": "T-7", "note": "refund issued"}, "sub_step": 5})
    );
    let done = common::approve_and_wait(&orch, &approval_id, "lead").await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert_eq!(desk.count("close_ticket"), 1);
    let out = done.steps[0].output.as_ref().unwrap();
    assert!(
        out["text"]
            .as_str()
            .unwrap()
            .starts_with("Closed T-7 for C-1"),
        "{out}"
    );
    assert_eq!(
        (out["turns"].clone(), out["tool_calls"].clone()),
        (json!(3), json!(3))
    );
    // Three turns of 100 + 20 tokens: the step's usage and the job's.
    assert_eq!(done.steps[0].usage.prompt_tokens, 300);
    assert_eq!(done.usage.completion_tokens, 60);
    // The model read each tool's result as a tool message answering its call.
    let requests = sim.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 3);
    let second = &requests[1]["messages"];
    assert_eq!(second[2]["role"], "assistant");
    assert_eq!(
        second[2]["tool_calls"][0]["function"]["name"],
        "desk__lookup_customer"
    );
    assert_eq!(second[3]["role"], "tool");
    assert_eq!(second[3]["tool_call_id"], "call_lookup");
    assert!(second[3]["content"].as_str().unwrap().contains("C-1"));
    assert_eq!(requests[0]["tools"].as_array().unwrap().len(), 3);
    assert!(
        !serde_json::to_string(&done)
            .unwrap()
            .contains("sk-sim-tool-loop-7")
    );
    // Each sub-step spent its own upstream's quota: three turns the model's (with their
    // tokens), three calls the desk's.
    let quotas = orch.quotas().await;
    let desk_quota = quotas
        .iter()
        .find(|q| q.name == "upstream:mcp:desk")
        .unwrap();
    assert_eq!(desk_quota.granted, 3, "{desk_quota:?}");
    let llm_quota = quotas
        .iter()
        .find(|q| q.name.starts_with("upstream:") && q.name != "upstream:mcp:desk")
        .unwrap();
    assert_eq!(
        (
            llm_quota.granted,
            llm_quota.prompt_tokens,
            llm_quota.completion_tokens
        ),
        (3, 300, 60),
        "{llm_quota:?}"
    );
    // The dashboard's job page reads the journal from /api/jobs/{id}.
    let server = cascade_orchestrator::server::start(
        Arc::new(orch),
        cascade_orchestrator::server::ServerOptions {
            grpc_addr: "127.0.0.1:0".parse().unwrap(),
            http_addr: "127.0.0.1:0".parse().unwrap(),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let page: Value = reqwest::get(format!("http://{}/api/jobs/{id}", server.http_addr))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let journal = page["job"]["steps"][0]["sub_steps"].as_array().unwrap();
    assert_eq!(journal.len(), 6);
    assert_eq!(journal[4]["tool"], "desk.close_ticket");
    assert_eq!(journal[4]["arguments"]["ticket"], "T-7");
    assert_eq!(
        journal[0]["tool_calls"],
        json!(["desk__lookup_customer", "desk__search_tickets"])
    );
    assert_eq!(journal[5]["usage"]["prompt_tokens"], 100);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_tool_call_is_what_the_model_reads_and_the_step_goes_on() {
    let desk = desk::Desk::default();
    let Parked { sim, orch, id, .. } = until_parked("anthropic", "", &desk).await;
    let v = orch.approval(&format!("{id}/triage/5")).unwrap();
    orch.resolve_approval(
        &v.approval.id,
        &v.approval.sha256,
        false,
        "lead",
        "refunds over $100 need a manager",
    )
    .await
    .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), orch.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert_eq!(
        desk.count("close_ticket"),
        0,
        "a rejected call is never made"
    );
    let text = done.steps[0].output.as_ref().unwrap()["text"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(text.starts_with("Left T-7 open"), "{text}");
    assert!(text.contains("refunds over $100 need a manager"), "{text}");
    let close = &done.steps[0].sub_steps[4];
    assert_eq!(close.state, SubStepState::Rejected);
    // Anthropic's shape: the results of one turn's calls in one user message of tool_result
    // blocks, answering the tool_use blocks of the assistant's.
    let requests = sim.requests.lock().unwrap().clone();
    let second = &requests[1]["messages"];
    assert_eq!(second[1]["content"][0]["type"], "tool_use");
    assert_eq!(second[2]["role"], "user");
    let blocks = second[2]["content"].as_array().unwrap();
    assert_eq!(blocks.len(), 2, "{second}");
    assert!(blocks.iter().all(|b| b["type"] == "tool_result"));
    assert_eq!(requests[0]["tools"][0]["input_schema"]["type"], "object");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_budget_stops_the_loop_between_turns_and_a_raise_resumes_it_from_the_journal() {
    set_key();
    let desk = desk::Desk::default();
    let desk_port = desk::serve(desk.clone()).await;
    let llm_port = model::serve(model::Model::default()).await;
    let dir = tempfile::tempdir().unwrap();
    // Each turn is estimated at its conversation (about 35 tokens, growing by about 40 a turn)
    // plus max_tokens (300), and spends 120: the first turn starts with nothing spent, the
    // second with 120 (120 + ~410 < 600), the third would not fit (240 + ~460 > 600). The
    // close needs no approval here, so that only the budget stops the loop.
    let g = graph(
        llm_port,
        "openai",
        "max_tokens = 300\ntool_approval = { \"desk.close_ticket\" = \"never\" }",
    );
    let orch = Orchestrator::builder(load(dir.path(), &g, &servers(desk_port)))
        .start()
        .await
        .unwrap();
    let mut req = SubmitRequest::new("support", json!({"email": "ada@example.com"}));
    req.budget = Some(cascade_orchestrator::job::Budget {
        max_tokens: Some(600),
        max_cost_usd: None,
    });
    let id = orch.submit(req).await.unwrap().id;
    let stopped = settled(&orch, id).await;
    assert_eq!(
        stopped.state,
        JobState::BudgetExceeded,
        "{:?}",
        stopped.error
    );
    let turns_before = stopped.steps[0]
        .sub_steps
        .iter()
        .filter(|s| s.kind == SubStepKind::Turn)
        .count();
    assert_eq!(turns_before, 2, "{:?}", stopped.steps[0].sub_steps);
    // The turns' tokens are the job's as soon as they are journaled.
    assert_eq!(stopped.usage.prompt_tokens, 200);
    assert_eq!(
        desk.count("close_ticket"),
        1,
        "the second turn's call was made"
    );
    orch.raise_budget(
        id,
        cascade_orchestrator::job::Budget {
            max_tokens: Some(100_000),
            max_cost_usd: None,
        },
    )
    .await
    .unwrap();
    let done = tokio::time::timeout(Duration::from_secs(30), orch.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    // Nothing done before the stop was done again.
    assert_eq!(
        (
            desk.count("lookup_customer"),
            desk.count("search_tickets"),
            desk.count("close_ticket")
        ),
        (1, 1, 1)
    );
    assert_eq!(done.steps[0].usage.prompt_tokens, 300);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_loop_resumes_from_the_journal_and_every_tool_call_is_made_once() {
    set_key();
    let desk = desk::Desk::default();
    let desk_port = desk::serve(desk.clone()).await;
    let sim = model::Model::default();
    *sim.hold_second_turn.lock().unwrap() = Some(Duration::from_secs(60));
    let llm_port = model::serve(sim.clone()).await;
    let dir = common::server_dir(
        &[("support.toml", &graph(llm_port, "openai", ""))],
        &servers(desk_port),
    );
    let env = [("TOOL_LOOP_TEST_KEY", "sk-sim-tool-loop-7")];
    let (grpc, http) = (common::free_port(), common::free_port());
    let mut server = common::spawn_with_env(dir.path(), grpc, http, &env);
    let mut client = common::connect(grpc).await;
    let id = common::submit(&mut client, "support", r#"{"email": "ada@example.com"}"#).await;
    // The first turn and both its calls are done; the second turn is with the model.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while sim.second_turns.load(Ordering::SeqCst) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the loop never reached its second turn"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        (desk.count("lookup_customer"), desk.count("search_tickets")),
        (1, 1)
    );
    let status = std::process::Command::new("kill")
        .args(["-9", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = server.child.wait();
    drop(server);
    let _server = common::spawn_with_env(dir.path(), grpc, http, &env);
    let mut client = common::connect(grpc).await;
    // The loop goes on from its journal: the second turn is asked again (it was not recorded),
    // and its close waits for approval.
    let approval_id = format!("{id}/triage/5");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let approval = loop {
        if let Ok(a) = client
            .get_approval(pb::GetApprovalRequest {
                approval_id: approval_id.clone(),
            })
            .await
        {
            break a.into_inner();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the close was never proposed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    // And once more while the close waits for its approval (dropping the server is SIGKILL).
    drop(_server);
    let _server = common::spawn_with_env(dir.path(), grpc, http, &env);
    let mut client = common::connect(grpc).await;
    client
        .resolve_approval(pb::ResolveApprovalRequest {
            approval_id,
            proposal_sha256: approval.proposal_sha256,
            decision: pb::ApprovalDecision::Approve as i32,
            reason: String::new(),
            approver: "lead".into(),
        })
        .await
        .unwrap();
    let job = loop {
        let job = client
            .get_job(pb::GetJobRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if job.state == pb::JobState::Succeeded as i32 || job.state == pb::JobState::Failed as i32 {
            break job;
        }
        assert!(
            std::time::Instant::now() < deadline + Duration::from_secs(30),
            "the job never ended"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{}", job.error);
    // Every tool call was made exactly once, counted at the tool server.
    assert_eq!(
        (
            desk.count("lookup_customer"),
            desk.count("search_tickets"),
            desk.count("close_ticket")
        ),
        (1, 1, 1)
    );
    // GetJob shows the journal: three turns and three tool calls, with their arguments.
    let subs = &job.steps[0].sub_steps;
    let kinds: Vec<&str> = subs.iter().map(|s| s.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "turn",
            "tool_call",
            "tool_call",
            "turn",
            "tool_call",
            "turn"
        ]
    );
    assert_eq!(subs[4].tool, "desk.close_ticket");
    assert_eq!(
        serde_json::from_str::<Value>(&subs[4].arguments_json).unwrap(),
        json!({"ticket": "T-7", "note": "refund issued"})
    );
    assert!(subs[4].result_bytes > 0);
    assert_eq!(
        subs[0].tool_calls,
        ["desk__lookup_customer", "desk__search_tickets"]
    );
    assert!(subs.iter().all(|s| s.state != "running"));
    // Neither the crash nor the runs that ended in a proposal spent an attempt.
    assert_eq!(job.steps[0].attempts, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_approved_call_that_timed_out_is_made_again_with_its_key_without_asking_again() {
    let desk = desk::Desk::default();
    desk.slow_close.store(true, Ordering::SeqCst);
    let Parked { orch, id, .. } = until_parked(
        "openai",
        "timeout = \"1s\"\nretry = { max_attempts = 3, initial_delay = \"50ms\" }",
        &desk,
    )
    .await;
    let done = common::approve_and_wait(&orch, &format!("{id}/triage/5"), "lead").await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    // The first close timed out (the desk got it); the step's retry made it again under the
    // same key, with no second proposal.
    assert_eq!(desk.count("close_ticket"), 2);
    let keys = desk.keys.lock().unwrap().clone();
    let closes: Vec<&String> = keys.iter().filter(|k| k.ends_with("/triage/5")).collect();
    assert_eq!(closes.len(), 2, "{keys:?}");
    let events = orch.store().events(id, 0).unwrap();
    let proposals = events
        .iter()
        .filter(|e| {
            matches!(
                e.kind,
                cascade_orchestrator::job::EventKind::ApprovalRequested { .. }
            )
        })
        .count();
    assert_eq!(proposals, 1);
    assert_eq!(done.steps[0].sub_steps[4].state, SubStepState::Succeeded);
}

/// Poll GetJob until `done` says the job is where the test wants it (30 s at most).
async fn poll_job(
    client: &mut cascade_orchestrator::api::pb::cascade_client::CascadeClient<
        tonic::transport::Channel,
    >,
    id: &str,
    what: &str,
    done: impl Fn(&pb::Job) -> bool,
) -> pb::Job {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(job) = client
            .get_job(pb::GetJobRequest { job_id: id.into() })
            .await
        {
            let job = job.into_inner();
            if done(&job) {
                return job;
            }
        }
        assert!(std::time::Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_a_slow_parallel_call_runs_keeps_the_result_of_the_fast_one() {
    set_key();
    let desk = desk::Desk::default();
    // The turn's lookup is held after its sibling search answered: the crash comes while one
    // call of the turn is done and the other under way.
    *desk.hold_first_lookup.lock().unwrap() = Some(Duration::from_secs(60));
    let desk_port = desk::serve(desk.clone()).await;
    let sim = model::Model::default();
    let llm_port = model::serve(sim.clone()).await;
    let g = graph(
        llm_port,
        "openai",
        "tool_approval = { \"desk.close_ticket\" = \"never\" }",
    );
    let dir = common::server_dir(&[("support.toml", &g)], &servers(desk_port));
    let env = [("TOOL_LOOP_TEST_KEY", "sk-sim-tool-loop-7")];
    let (grpc, http) = (common::free_port(), common::free_port());
    let mut server = common::spawn_with_env(dir.path(), grpc, http, &env);
    let mut client = common::connect(grpc).await;
    let id = common::submit(&mut client, "support", r#"{"email": "ada@example.com"}"#).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !desk.lookup_held.load(Ordering::SeqCst) {
        assert!(
            std::time::Instant::now() < deadline,
            "the lookup was never held"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(desk.count("search_tickets"), 1);
    // Give the search's result time to reach the journal while the lookup is held (it does at
    // once now; before, a turn's results were journaled only when all its calls had returned).
    let in_journal = |job: &pb::Job| {
        job.steps.first().is_some_and(|s| {
            s.sub_steps
                .iter()
                .any(|x| x.tool == "desk.search_tickets" && x.state == "succeeded")
        })
    };
    let wait = tokio::time::timeout(
        Duration::from_secs(5),
        poll_job(&mut client, &id, "", in_journal),
    )
    .await;
    let journaled_before_the_crash = wait.is_ok();
    // GetJob answers from memory; wait for the row on disk (the kill must not beat the commit).
    if journaled_before_the_crash {
        let db = dir.path().join("data").join("cascade.db");
        let on_disk = || {
            let c = rusqlite::Connection::open_with_flags(
                &db,
                rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
            )
            .ok()?;
            c.query_row(
                "SELECT sub_steps FROM steps WHERE job_id = ?1 AND idx = 0",
                [&id],
                |r| r.get::<_, Option<String>>(0),
            )
            .ok()
            .flatten()
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !on_disk().is_some_and(|j| {
            serde_json::from_str::<Vec<serde_json::Value>>(&j)
                .unwrap_or_default()
                .iter()
                .any(|x| {
                    x["server"] == "desk"
                        && x["tool"] == "search_tickets"
                        && x["state"] == "succeeded"
                })
        }) {
            assert!(
                std::time::Instant::now() < deadline,
                "the search's result never reached the file: {:?}",
                on_disk()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    assert!(desk.lookup_held.load(Ordering::SeqCst));
    let status = std::process::Command::new("kill")
        .args(["-9", &server.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let _ = server.child.wait();
    drop(server);
    let _server = common::spawn_with_env(dir.path(), grpc, http, &env);
    let mut client = common::connect(grpc).await;
    let job = poll_job(&mut client, &id, "the job never ended", |j| {
        j.state == pb::JobState::Succeeded as i32 || j.state == pb::JobState::Failed as i32
    })
    .await;
    assert_eq!(job.state, pb::JobState::Succeeded as i32, "{}", job.error);
    // The search, done before the crash, was not made again; the lookup, under way at the
    // crash, was made again with its key.
    assert_eq!(
        desk.count("search_tickets"),
        1,
        "the fast call's result was lost with the crash"
    );
    assert!(journaled_before_the_crash);
    assert_eq!(desk.count("lookup_customer"), 2);
    assert_eq!(desk.count("close_ticket"), 1);
    let keys = desk.keys.lock().unwrap().clone();
    let lookups: Vec<&String> = keys.iter().filter(|k| k.ends_with("/triage/2")).collect();
    assert_eq!(
        lookups,
        [&format!("{id}/triage/2"), &format!("{id}/triage/2")]
    );
    // No turn was asked twice, and the model read the turn's results in the order it asked
    // for the calls, whichever returned first.
    let requests = sim.requests.lock().unwrap().clone();
    assert_eq!(requests.len(), 3);
    let second = &requests[1]["messages"];
    assert_eq!(second[3]["tool_call_id"], "call_lookup");
    assert_eq!(second[4]["tool_call_id"], "call_search");
    let kinds: Vec<(u32, &str)> = job.steps[0]
        .sub_steps
        .iter()
        .map(|s| (s.n, s.kind.as_str()))
        .collect();
    assert_eq!(
        kinds,
        [
            (1, "turn"),
            (2, "tool_call"),
            (3, "tool_call"),
            (4, "turn"),
            (5, "tool_call"),
            (6, "turn")
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_model_that_keeps_calling_tools_fails_the_step_at_max_turns() {
    set_key();
    let desk = desk::Desk::default();
    let desk_port = desk::serve(desk.clone()).await;
    let sim = model::Model::default();
    let llm_port = model::serve(sim.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    // The model calls tools in its first two turns: with two turns allowed, there is no third.
    let g = graph(
        llm_port,
        "openai",
        "tool_approval = { \"desk.close_ticket\" = \"never\" }\nretry = { max_attempts = 3, initial_delay = \"50ms\" }",
    )
    .replace("max_turns = 5", "max_turns = 2");
    let orch = Orchestrator::builder(load(dir.path(), &g, &servers(desk_port)))
        .start()
        .await
        .unwrap();
    let id = submit_support(&orch).await;
    let job = settled(&orch, id).await;
    assert_eq!(job.state, JobState::Failed, "{:?}", job.error);
    let error = job.steps[0].error.clone().unwrap_or_default();
    assert!(
        error.contains("the model still called tools after 2 turns (max_turns = 2)"),
        "{error}"
    );
    // Permanent: no retry, and no model turn beyond the two allowed.
    assert_eq!(job.steps[0].attempts, 1);
    assert_eq!(sim.requests.lock().unwrap().len(), 2);
    let turns = job.steps[0]
        .sub_steps
        .iter()
        .filter(|s| s.kind == SubStepKind::Turn)
        .count();
    assert_eq!(turns, 2);
    // The second turn's call was made before the loop stopped.
    assert_eq!(desk.count("close_ticket"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_tool_marked_required_waits_for_approval_and_runs_once_approved() {
    let desk = desk::Desk::default();
    let Parked { orch, id, job, .. } = until_parked(
        "openai",
        "tool_approval = { \"desk.lookup_customer\" = \"required\", \"desk.close_ticket\" = \"never\" }",
        &desk,
    )
    .await;
    // The search (read-only, not named) ran; the lookup (read-only, but required) waits.
    assert_eq!(
        (desk.count("lookup_customer"), desk.count("search_tickets")),
        (0, 1)
    );
    let waiting = job.steps[0]
        .sub_steps
        .iter()
        .find(|s| s.state == SubStepState::AwaitingApproval)
        .expect("a sub-step awaits approval");
    assert_eq!(
        (waiting.server.as_str(), waiting.tool.as_str()),
        ("desk", "lookup_customer")
    );
    let approval_id = format!("{id}/triage/{}", waiting.n);
    let v = orch.approval(&approval_id).unwrap();
    let proposal: Value = serde_json::from_str(&v.approval.proposal).unwrap();
    assert_eq!(
        proposal,
        json!({"server": "desk", "tool": "lookup_customer", "arguments": {"email": "ada@example.com"}, "sub_step": waiting.n})
    );
    let done = common::approve_and_wait(&orch, &approval_id, "lead").await;
    assert_eq!(done.state, JobState::Succeeded, "{:?}", done.error);
    assert_eq!(
        (
            desk.count("lookup_customer"),
            desk.count("search_tickets"),
            desk.count("close_ticket")
        ),
        (1, 1, 1)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_pattern_that_matches_no_tool_of_its_server_fails_the_start_listing_its_tools() {
    set_key();
    let desk_port = desk::serve(desk::Desk::default()).await;
    let g = graph(1, "openai", "").replace(
        r#"tools = ["desk.*"]"#,
        r#"tools = ["desk.lookup_*", "desk.reopen_*"]"#,
    );
    let expected = r#"no tool of MCP server "desk" matches "desk.reopen_*"; its tools: close_ticket, lookup_customer, search_tickets"#;
    let dir = tempfile::tempdir().unwrap();
    let Err(e) = Orchestrator::builder(load(dir.path(), &g, &servers(desk_port)))
        .start()
        .await
    else {
        panic!("the orchestrator started with a pattern that matches no tool");
    };
    let e = e.to_string();
    assert!(e.contains(expected), "{e}");
    assert!(e.contains(r#"agent "triage""#), "{e}");
    // `cascade serve` stops with the same message.
    let dir = common::server_dir(&[("support.toml", &g)], &servers(desk_port));
    let mut server = common::spawn(dir.path(), common::free_port(), common::free_port());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "cascade serve kept running"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(!status.success());
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(log.contains(expected), "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_tool_result_is_cut_for_the_model_and_its_full_size_journaled() {
    set_key();
    let desk = desk::Desk::default();
    desk.search_results.store(300, Ordering::SeqCst);
    let desk_port = desk::serve(desk.clone()).await;
    let sim = model::Model::default();
    let llm_port = model::serve(sim.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let g = graph(
        llm_port,
        "openai",
        "max_tool_result_bytes = 64\ntool_approval = { \"desk.close_ticket\" = \"never\" }",
    );
    let orch = Orchestrator::builder(load(dir.path(), &g, &servers(desk_port)))
        .start()
        .await
        .unwrap();
    let id = submit_support(&orch).await;
    let job = settled(&orch, id).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    let search = job.steps[0]
        .sub_steps
        .iter()
        .find(|s| s.tool == "search_tickets")
        .unwrap();
    // 300 tickets of 5 or 7 bytes each: the whole result is past 2 KB, and its size is
    // journaled, not the cut's.
    let full = search.result_bytes;
    assert!(full > 2000, "{full}");
    let cut = format!("… [cut: 64 of {full} bytes shown]");
    assert!(search.text.ends_with(&cut), "{}", search.text);
    assert_eq!(search.text.len(), 64 + cut.len());
    // What the model read is the cut text.
    let requests = sim.requests.lock().unwrap().clone();
    let read = requests[1]["messages"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["tool_call_id"] == "call_search")
        .unwrap()["content"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(read, search.text);
    assert!(read.contains("T-7"), "{read}");
    // A short result is passed whole.
    let lookup = job.steps[0]
        .sub_steps
        .iter()
        .find(|s| s.tool == "lookup_customer")
        .unwrap();
    assert_eq!(lookup.result_bytes, lookup.text.len() as u64);
    assert!(!lookup.text.contains("[cut:"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_refused_with_429_pauses_the_loop_which_goes_on_after_the_wait_repeating_nothing() {
    set_key();
    let desk = desk::Desk::default();
    let desk_port = desk::serve(desk.clone()).await;
    let sim = model::Model::default();
    sim.refuse_second_turn.store(true, Ordering::SeqCst);
    let llm_port = model::serve(sim.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let g = graph(
        llm_port,
        "openai",
        "tool_approval = { \"desk.close_ticket\" = \"never\" }",
    );
    let orch = Orchestrator::builder(load(dir.path(), &g, &servers(desk_port)))
        .start()
        .await
        .unwrap();
    let started = std::time::Instant::now();
    let id = submit_support(&orch).await;
    let job = settled(&orch, id).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    // The second turn was refused (retry after 1 s); the loop waited, then asked it again.
    assert!(started.elapsed() >= Duration::from_secs(1));
    assert_eq!(sim.requests.lock().unwrap().len(), 4);
    let llm_quota = orch
        .quotas()
        .await
        .into_iter()
        .find(|q| q.name.starts_with("upstream:") && q.name != "upstream:mcp:desk")
        .unwrap();
    assert_eq!(llm_quota.refusals, 1, "{llm_quota:?}");
    // Nothing journaled before the refusal was made again.
    each_call_once_in_one_journal(&desk, &job);
    assert_eq!(job.steps[0].usage.prompt_tokens, 300);
}

/// Every tool of the support loop was called once, and its journal is the whole loop once: a
/// turn asking for the lookup and the search, both calls, a turn asking for the close, the
/// close, the answer.
fn each_call_once_in_one_journal(desk: &desk::Desk, job: &cascade_orchestrator::job::JobRecord) {
    assert_eq!(
        (
            desk.count("lookup_customer"),
            desk.count("search_tickets"),
            desk.count("close_ticket")
        ),
        (1, 1, 1)
    );
    let shape: Vec<(u32, SubStepKind, SubStepState)> = job.steps[0]
        .sub_steps
        .iter()
        .map(|s| (s.n, s.kind, s.state))
        .collect();
    assert_eq!(
        shape,
        vec![
            (1, SubStepKind::Turn, SubStepState::Succeeded),
            (2, SubStepKind::ToolCall, SubStepState::Succeeded),
            (3, SubStepKind::ToolCall, SubStepState::Succeeded),
            (4, SubStepKind::Turn, SubStepState::Succeeded),
            (5, SubStepKind::ToolCall, SubStepState::Succeeded),
            (6, SubStepKind::Turn, SubStepState::Succeeded),
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tool_servers_quota_paused_mid_loop_holds_the_call_until_the_pause_ends() {
    set_key();
    let desk = desk::Desk::default();
    let desk_port = desk::serve(desk.clone()).await;
    let sim = model::Model::default();
    sim.gate_second_turn.store(true, Ordering::SeqCst);
    let llm_port = model::serve(sim.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let g = graph(
        llm_port,
        "openai",
        "tool_approval = { \"desk.close_ticket\" = \"never\" }",
    );
    let orch = Orchestrator::builder(load(dir.path(), &g, &servers(desk_port)))
        .start()
        .await
        .unwrap();
    let id = submit_support(&orch).await;
    // While the model thinks over its second turn, the desk's quota is refused for 3 s (longer
    // than a sub-step waits for its quota inside the loop): the close the turn asks for waits.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while sim.second_turns.load(Ordering::SeqCst) == 0 {
        assert!(std::time::Instant::now() < deadline, "no second turn");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let paused = std::time::Instant::now();
    assert!(
        orch.exhaust_quota("upstream:mcp:desk", Duration::from_secs(3))
            .await
    );
    // The model answers the turn only now, with the pause in place.
    sim.release_second_turn.notify_one();
    let job = settled(&orch, id).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert!(
        paused.elapsed() >= Duration::from_millis(2900),
        "the close was made during its server's pause: {:?}",
        paused.elapsed()
    );
    // The turn that asked for the close was not asked again, and nothing was made twice.
    assert_eq!(sim.requests.lock().unwrap().len(), 3);
    each_call_once_in_one_journal(&desk, &job);
}
