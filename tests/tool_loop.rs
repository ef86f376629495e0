//! Tool-using `llm` agents: the loop runs in the engine, each model turn and each tool call a
//! journaled sub-step. Against a simulated OpenAI-compatible (and Anthropic) model in this
//! process that answers with tool calls from a script, and a help-desk MCP server (rmcp, over
//! streamable HTTP) that counts every call it gets.

mod common;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cascade_orchestrator::api::pb;
use cascade_orchestrator::job::{JobState, SubStepKind, SubStepState};
use cascade_orchestrator::{Orchestrator, SubmitRequest, config};
use serde_json::{Map, Value, json};

/// The help desk: `lookup_customer` and `search_tickets` (read-only), `close_ticket` (no
/// annotations: destructive by the MCP defaults). Counts calls per tool and keeps the
/// idempotency keys they came with.
mod desk {
    use super::*;
    use cascade_orchestrator::agents::mcp_host::{
        OfferedTool, ToolAnnotations, ToolHost, service, tool,
    };

    #[derive(Clone, Default)]
    pub struct Desk {
        pub calls: Arc<Mutex<HashMap<String, u32>>>,
        pub keys: Arc<Mutex<Vec<String>>>,
        pub arguments: Arc<Mutex<Vec<(String, Value)>>>,
        search_started: Arc<AtomicBool>,
    }

    impl Desk {
        pub fn count(&self, tool: &str) -> u32 {
            self.calls.lock().unwrap().get(tool).copied().unwrap_or(0)
        }
    }

    #[async_trait::async_trait]
    impl ToolHost for Desk {
        fn tools(&self) -> Vec<OfferedTool> {
            let read_only = ToolAnnotations::default().read_only(true);
            vec![
                tool(
                    "lookup_customer",
                    "Find a customer by email",
                    json!({"type": "object", "properties": {"email": {"type": "string"}}, "required": ["email"]}),
                )
                .annotate(read_only.clone()),
                tool(
                    "search_tickets",
                    "Search tickets",
                    json!({"type": "object", "properties": {"query": {"type": "string"}}}),
                )
                .annotate(read_only),
                tool(
                    "close_ticket",
                    "Close a ticket",
                    json!({"type": "object", "properties": {"ticket": {"type": "string"}, "note": {"type": "string"}}, "required": ["ticket"]}),
                ),
            ]
        }

        async fn call(&self, name: &str, arguments: Map<String, Value>) -> Result<Value, String> {
            self.call_keyed(name, arguments, None).await
        }

        async fn call_keyed(
            &self,
            name: &str,
            arguments: Map<String, Value>,
            key: Option<&str>,
        ) -> Result<Value, String> {
            *self
                .calls
                .lock()
                .unwrap()
                .entry(name.to_string())
                .or_default() += 1;
            self.keys
                .lock()
                .unwrap()
                .push(key.unwrap_or("<none>").to_string());
            self.arguments
                .lock()
                .unwrap()
                .push((name.to_string(), Value::Object(arguments.clone())));
            match name {
                "lookup_customer" => {
                    // The model asked for both lookups in one turn: they run side by side, so
                    // this one sees the search start (one after the other, it never would).
                    for _ in 0..500 {
                        if self.search_started.load(Ordering::SeqCst) {
                            return Ok(json!({"customer": "C-1", "email": arguments["email"]}));
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err("search_tickets never started while lookup_customer ran: the calls were not parallel".into())
                }
                "search_tickets" => {
                    self.search_started.store(true, Ordering::SeqCst);
                    Ok(json!({"tickets": ["T-7"], "query": arguments.get("query")}))
                }
                "close_ticket" => Ok(json!({"closed": arguments["ticket"]})),
                other => Err(format!("no tool {other}")),
            }
        }
    }

    pub async fn serve(desk: Desk) -> u16 {
        let app = axum::Router::new().nest_service("/mcp", service(Arc::new(desk), Vec::new()));
        common::serve_http(app).await
    }
}

/// A simulated model speaking OpenAI's chat completions (`/v1/chat/completions`) and
/// Anthropic's messages (`/v1/messages`), answering from a script over the conversation it is
/// sent: first both lookups at once, then closing the ticket, then a final answer that says
/// whether the close went through.
mod model {
    use super::*;
    use axum::extract::State;
    use axum::routing::post;

    #[derive(Clone, Default)]
    pub struct Model {
        pub requests: Arc<Mutex<Vec<Value>>>,
        /// Hold the first request of the second turn this long (a crash test's window).
        pub hold_second_turn: Arc<Mutex<Option<Duration>>>,
        pub second_turns: Arc<AtomicU32>,
    }

    /// The tool results in a conversation, by call id (either provider's shape).
    fn results(body: &Value) -> HashMap<String, String> {
        let mut out = HashMap::new();
        for m in body["messages"].as_array().into_iter().flatten() {
            if m["role"] == "tool" {
                out.insert(
                    m["tool_call_id"].as_str().unwrap_or_default().to_string(),
                    m["content"].as_str().unwrap_or_default().to_string(),
                );
            }
            for b in m["content"].as_array().into_iter().flatten() {
                if b["type"] == "tool_result" {
                    out.insert(
                        b["tool_use_id"].as_str().unwrap_or_default().to_string(),
                        b["content"].as_str().unwrap_or_default().to_string(),
                    );
                }
            }
        }
        out
    }

    enum Step {
        Calls(Vec<(&'static str, &'static str, Value)>),
        Answer(String),
    }

    async fn script(m: &Model, body: &Value) -> Step {
        m.requests.lock().unwrap().push(body.clone());
        let done = results(body);
        if done.is_empty() {
            return Step::Calls(vec![
                (
                    "call_lookup",
                    "desk__lookup_customer",
                    json!({"email": "ada@example.com"}),
                ),
                (
                    "call_search",
                    "desk__search_tickets",
                    json!({"query": "refund"}),
                ),
            ]);
        }
        match done.get("call_close") {
            None => {
                if m.second_turns.fetch_add(1, Ordering::SeqCst) == 0 {
                    let hold = *m.hold_second_turn.lock().unwrap();
                    if let Some(d) = hold {
                        tokio::time::sleep(d).await;
                    }
                }
                Step::Calls(vec![(
                    "call_close",
                    "desk__close_ticket",
                    json!({"ticket": "T-7", "note": "refund issued"}),
                )])
            }
            Some(r) if r.contains("rejected") => Step::Answer(format!("Left T-7 open: {r}")),
            Some(r) => Step::Answer(format!("Closed T-7 for C-1 ({r})")),
        }
    }

    async fn openai(
        State(m): State<Model>,
        axum::Json(body): axum::Json<Value>,
    ) -> axum::Json<Value> {
        let message = match script(&m, &body).await {
            Step::Calls(calls) => json!({
                "role": "assistant",
                "content": null,
                "tool_calls": calls.iter().map(|(id, name, args)| json!({
                    "id": id, "type": "function",
                    "function": {"name": name, "arguments": args.to_string()}
                })).collect::<Vec<_>>(),
            }),
            Step::Answer(text) => json!({"role": "assistant", "content": text}),
        };
        let finish = if message["tool_calls"].is_array() {
            "tool_calls"
        } else {
            "stop"
        };
        axum::Json(json!({
            "id": "chatcmpl-sim", "object": "chat.completion", "model": "sim-model",
            "choices": [{"index": 0, "message": message, "finish_reason": finish}],
            "usage": {"prompt_tokens": 100, "completion_tokens": 20, "total_tokens": 120},
        }))
    }

    async fn anthropic(
        State(m): State<Model>,
        axum::Json(body): axum::Json<Value>,
    ) -> axum::Json<Value> {
        let (content, stop) = match script(&m, &body).await {
            Step::Calls(calls) => (
                calls
                    .iter()
                    .map(|(id, name, args)| json!({"type": "tool_use", "id": id, "name": name, "input": args}))
                    .collect::<Vec<_>>(),
                "tool_use",
            ),
            Step::Answer(text) => (vec![json!({"type": "text", "text": text})], "end_turn"),
        };
        axum::Json(json!({
            "id": "msg_sim", "type": "message", "role": "assistant", "model": "sim-claude",
            "content": content, "stop_reason": stop,
            "usage": {"input_tokens": 100, "output_tokens": 20},
        }))
    }

    pub async fn serve(m: Model) -> u16 {
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(openai))
            .route("/v1/messages", post(anthropic))
            .with_state(m);
        common::serve_http(app).await
    }
}

fn graph(llm_port: u16, provider: &str, extra: &str) -> String {
    let base = match provider {
        "anthropic" => format!("http://127.0.0.1:{llm_port}"),
        _ => format!("http://127.0.0.1:{llm_port}/v1"),
    };
    format!(
        r#"
[graph]
name = "support"

[agents.triage]
kind = "llm"
provider = "{provider}"
base_url = "{base}"
api_key = "env:TOOL_LOOP_TEST_KEY"
model = "sim-model"
system = "You resolve support tickets with the desk's tools."
prompt = "Resolve the refund ticket of {{{{ input.email }}}}"
tools = ["desk.*"]
max_turns = 5
{extra}
"#
    )
}

fn servers(desk_port: u16) -> String {
    format!("[mcp_servers.desk]\nurl = \"http://127.0.0.1:{desk_port}/mcp\"\n")
}

fn load(
    dir: &std::path::Path,
    graph: &str,
    servers: &str,
) -> cascade_orchestrator::model::ServerModel {
    std::fs::write(dir.join("g.toml"), graph).unwrap();
    std::fs::write(
        dir.join("cascade.toml"),
        format!("graphs = [\"g.toml\"]\n{servers}"),
    )
    .unwrap();
    config::load(Some(&dir.join("cascade.toml")), &[], &Default::default())
        .unwrap_or_else(|e| panic!("{e}"))
}

fn set_key() {
    // SAFETY: every test here sets the same value.
    unsafe { std::env::set_var("TOOL_LOOP_TEST_KEY", "sk-sim-tool-loop-7") };
}

async fn settled(
    orch: &Orchestrator,
    id: cascade_orchestrator::job::JobId,
) -> cascade_orchestrator::job::JobRecord {
    tokio::time::timeout(Duration::from_secs(30), orch.wait_settled(id))
        .await
        .expect("the job settles")
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn parallel_calls_then_an_approved_close_each_journaled_and_made_once() {
    set_key();
    let desk = desk::Desk::default();
    let desk_port = desk::serve(desk.clone()).await;
    let sim = model::Model::default();
    let llm_port = model::serve(sim.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let orch = Orchestrator::builder(load(
        dir.path(),
        &graph(llm_port, "openai", ""),
        &servers(desk_port),
    ))
    .start()
    .await
    .unwrap();
    let id = orch
        .submit(SubmitRequest::new(
            "support",
            json!({"email": "ada@example.com"}),
        ))
        .await
        .unwrap()
        .id;
    let parked = settled(&orch, id).await;
    assert_eq!(
        parked.state,
        JobState::AwaitingApproval,
        "{:?}",
        parked.error
    );
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
    set_key();
    let desk = desk::Desk::default();
    let desk_port = desk::serve(desk.clone()).await;
    let sim = model::Model::default();
    let llm_port = model::serve(sim.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let orch = Orchestrator::builder(load(
        dir.path(),
        &graph(llm_port, "anthropic", ""),
        &servers(desk_port),
    ))
    .start()
    .await
    .unwrap();
    let id = orch
        .submit(SubmitRequest::new(
            "support",
            json!({"email": "ada@example.com"}),
        ))
        .await
        .unwrap()
        .id;
    let parked = settled(&orch, id).await;
    assert_eq!(
        parked.state,
        JobState::AwaitingApproval,
        "{:?}",
        parked.error
    );
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
}
