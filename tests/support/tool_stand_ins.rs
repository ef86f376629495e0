//! Stand-ins for the tool-using agent tests: a help-desk MCP server (rmcp, over streamable
//! HTTP) that counts every call, and a simulated model that answers with tool calls from a
//! script; the graph and server config that connect them.
// Each test binary that includes this module uses only some of it.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cascade_orchestrator::config;
use serde_json::{Map, Value, json};

/// The help desk: `lookup_customer` and `search_tickets` (read-only), `close_ticket` (no
/// annotations: destructive by the MCP defaults). Counts calls per tool and keeps the
/// idempotency keys they came with.
pub mod desk {
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
        /// The next close takes 3 s (longer than a test agent's timeout).
        pub slow_close: Arc<AtomicBool>,
        /// The first lookup is held this long after its sibling search started (a crash
        /// test's window, while the search's result is in).
        pub hold_first_lookup: Arc<Mutex<Option<Duration>>>,
        /// Set when the held lookup is being held.
        pub lookup_held: Arc<AtomicBool>,
        /// Searches answer with this many tickets (one when 0): a long result.
        pub search_results: Arc<AtomicU32>,
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
                            let hold = self.hold_first_lookup.lock().unwrap().take();
                            if let Some(d) = hold {
                                self.lookup_held.store(true, Ordering::SeqCst);
                                tokio::time::sleep(d).await;
                            }
                            return Ok(json!({"customer": "C-1", "email": arguments["email"]}));
                        }
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                    Err("search_tickets never started while lookup_customer ran: the calls were not parallel".into())
                }
                "search_tickets" => {
                    self.search_started.store(true, Ordering::SeqCst);
                    let many = self.search_results.load(Ordering::SeqCst).max(1);
                    let tickets: Vec<String> = (0..many).map(|i| format!("T-{}", 7 + i)).collect();
                    Ok(json!({"tickets": tickets, "query": arguments.get("query")}))
                }
                "close_ticket" => {
                    if self.slow_close.swap(false, Ordering::SeqCst) {
                        tokio::time::sleep(Duration::from_secs(3)).await;
                    }
                    Ok(json!({"closed": arguments["ticket"]}))
                }
                other => Err(format!("no tool {other}")),
            }
        }
    }

    pub async fn serve(desk: Desk) -> u16 {
        let app = axum::Router::new().nest_service("/mcp", service(Arc::new(desk), Vec::new()));
        crate::common::serve_http(app).await
    }
}

/// A simulated model speaking OpenAI's chat completions (`/v1/chat/completions`) and
/// Anthropic's messages (`/v1/messages`), answering from a script over the conversation it is
/// sent: first both lookups at once, then closing the ticket, then a final answer that says
/// whether the close went through.
pub mod model {
    use super::*;
    use axum::extract::State;
    use axum::routing::post;

    #[derive(Clone, Default)]
    pub struct Model {
        pub requests: Arc<Mutex<Vec<Value>>>,
        /// Hold the first request of the second turn this long (a crash test's window).
        pub hold_second_turn: Arc<Mutex<Option<Duration>>>,
        pub second_turns: Arc<AtomicU32>,
        /// With `gate_second_turn` set, the first request of the second turn is answered only
        /// once `release_second_turn` is notified.
        pub gate_second_turn: Arc<AtomicBool>,
        pub release_second_turn: Arc<tokio::sync::Notify>,
        /// Answer the first request of the second turn 429, retry after a second.
        pub refuse_second_turn: Arc<AtomicBool>,
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
        Refused,
    }

    fn refused() -> axum::response::Response {
        use axum::response::IntoResponse;
        (
            axum::http::StatusCode::TOO_MANY_REQUESTS,
            [("retry-after", "1")],
            "rate limited: slow down",
        )
            .into_response()
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
                if m.refuse_second_turn.swap(false, Ordering::SeqCst) {
                    return Step::Refused;
                }
                if m.second_turns.fetch_add(1, Ordering::SeqCst) == 0 {
                    let hold = *m.hold_second_turn.lock().unwrap();
                    if let Some(d) = hold {
                        tokio::time::sleep(d).await;
                    }
                    if m.gate_second_turn.load(Ordering::SeqCst) {
                        m.release_second_turn.notified().await;
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
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
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
            Step::Refused => return refused(),
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
        .into_response()
    }

    async fn anthropic(
        State(m): State<Model>,
        axum::Json(body): axum::Json<Value>,
    ) -> axum::response::Response {
        use axum::response::IntoResponse;
        let (content, stop) = match script(&m, &body).await {
            Step::Calls(calls) => (
                calls
                    .iter()
                    .map(|(id, name, args)| json!({"type": "tool_use", "id": id, "name": name, "input": args}))
                    .collect::<Vec<_>>(),
                "tool_use",
            ),
            Step::Answer(text) => (vec![json!({"type": "text", "text": text})], "end_turn"),
            Step::Refused => return refused(),
        };
        axum::Json(json!({
            "id": "msg_sim", "type": "message", "role": "assistant", "model": "sim-claude",
            "content": content, "stop_reason": stop,
            "usage": {"input_tokens": 100, "output_tokens": 20},
        }))
        .into_response()
    }

    pub async fn serve(m: Model) -> u16 {
        let app = axum::Router::new()
            .route("/v1/chat/completions", post(openai))
            .route("/v1/messages", post(anthropic))
            .with_state(m);
        crate::common::serve_http(app).await
    }
}

pub fn graph(llm_port: u16, provider: &str, extra: &str) -> String {
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

pub fn servers(desk_port: u16) -> String {
    format!("[mcp_servers.desk]\nurl = \"http://127.0.0.1:{desk_port}/mcp\"\n")
}

pub fn load(
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

pub fn set_key() {
    // SAFETY: every test here sets the same value.
    unsafe { std::env::set_var("TOOL_LOOP_TEST_KEY", "sk-sim-tool-loop-7") };
}
