//! The `mcp` kind against a real MCP server nobody here wrote: `@modelcontextprotocol/server-everything`
//! from npm (installed by `.ci/run`: `npm ci --prefix tests/js`), over stdio, started and
//! supervised by Cascade.

mod common;
#[path = "support/oauth2_server.rs"]
mod oauth2_server;

use std::path::PathBuf;
use std::time::Duration;

use cascade_orchestrator::job::JobState;
use cascade_orchestrator::{Orchestrator, SubmitRequest, config};
use serde_json::json;

/// The server's entry point; the test fails (not skips) without it.
fn everything() -> PathBuf {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/js/node_modules/@modelcontextprotocol/server-everything/dist/index.js");
    assert!(
        path.exists(),
        "{} is missing: run `npm ci --prefix tests/js` (.ci/run does)",
        path.display()
    );
    path
}

/// The model of `graph`, with `[mcp_servers.everything]` in its cascade.toml.
fn load(dir: &std::path::Path, graph: &str) -> cascade_orchestrator::model::ServerModel {
    let server = format!(
        "[mcp_servers.everything]\ncommand = \"node\"\nargs = [{:?}, \"stdio\"]\n",
        everything().display().to_string()
    );
    load_with(dir, graph, &server)
}

/// The model of `graph` (written to `dir/g.toml`) and of a cascade.toml that lists it and
/// declares `servers`.
fn load_with(
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

/// The `books` graph: one agent posting to the ledger over HTTP, with the token in `token_var`.
fn books(
    dir: &std::path::Path,
    port: u16,
    token_var: &str,
    extra: &str,
) -> cascade_orchestrator::model::ServerModel {
    let graph = format!(
        "[graph]\nname = \"books\"\n[agents.post]\nkind = \"mcp\"\nserver = \"ledger\"\ntool = \"post_entry\"\narguments = {{ amount = \"{{{{= input.amount }}}}\" }}\n{extra}\n"
    );
    let server = format!(
        "[mcp_servers.ledger]\nurl = \"http://127.0.0.1:{port}/mcp\"\nauth = {{ bearer = \"env:{token_var}\" }}\n"
    );
    load_with(dir, &graph, &server)
}

const GRAPH: &str = r#"
[graph]
name = "tools"

[agents.sum]
kind = "mcp"
server = "everything"
tool = "get-sum"
arguments = { a = "{{= input.a }}", b = "{{= input.b }}" }
retry = { max_attempts = 5, initial_delay = "100ms", max_delay = "2s" }

[agents.weather]
kind = "mcp"
server = "everything"
tool = "get-structured-content"
arguments = { location = "New York" }
after = ["sum"]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs @modelcontextprotocol/server-everything from npm: .ci/run installs it (npm ci --prefix tests/js) and runs this test"]
async fn tool_calls_on_a_real_server_over_stdio() {
    let dir = tempfile::tempdir().unwrap();
    let orch = Orchestrator::builder(load(dir.path(), GRAPH))
        .start()
        .await
        .unwrap();
    let job = common::run_one(&orch, "tools", json!({"a": 2, "b": 3})).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    // Text content becomes the output; structured content where the tool gives it.
    assert_eq!(
        **job.steps[0].output.as_ref().unwrap(),
        json!("The sum of 2 and 3 is 5.")
    );
    let weather = job.steps[1].output.as_ref().unwrap();
    assert!(weather["temperature"].is_number(), "{weather}");
    // Read-only tools (as their annotations say) need no approval: the job above succeeded
    // with nobody deciding.
    // A tool's own error is permanent, with its text.
    let bad = common::run_one(&orch, "tools", json!({"a": "x", "b": 3})).await;
    assert_eq!(bad.state, JobState::Failed);
    assert_eq!(bad.steps[0].attempts, 1, "a tool error is not retried");
    assert!(
        bad.error.as_deref().unwrap().contains("expected number"),
        "{:?}",
        bad.error
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs @modelcontextprotocol/server-everything from npm: .ci/run installs it (npm ci --prefix tests/js) and runs this test"]
async fn a_killed_server_is_started_again_and_no_job_is_lost() {
    let dir = tempfile::tempdir().unwrap();
    let orch = Orchestrator::builder(load(dir.path(), GRAPH))
        .start()
        .await
        .unwrap();
    let first = common::run_one(&orch, "tools", json!({"a": 1, "b": 1})).await;
    assert_eq!(first.state, JobState::Succeeded, "{:?}", first.error);
    let server = orch
        .registry()
        .resources()
        .get::<cascade_orchestrator::agents::mcp::McpServers>()
        .get("everything")
        .unwrap();
    let pid = server.pid().expect("a server process runs");
    // kill -9 the one process every agent shares, with jobs on their way.
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(
            orch.submit(SubmitRequest::new("tools", json!({"a": n, "b": 1})))
                .await
                .unwrap()
                .id,
        );
    }
    let status = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    // And jobs after it: their calls meet the dead server, whatever the first ones did.
    for n in 20..40 {
        ids.push(
            orch.submit(SubmitRequest::new("tools", json!({"a": n, "b": 1})))
                .await
                .unwrap()
                .id,
        );
    }
    for (n, id) in ids.into_iter().enumerate() {
        let job = tokio::time::timeout(Duration::from_secs(60), orch.wait(id))
            .await
            .expect("the job ends")
            .unwrap();
        assert_eq!(job.state, JobState::Succeeded, "job {n}: {:?}", job.error);
        assert_eq!(
            **job.steps[0].output.as_ref().unwrap(),
            json!(format!("The sum of {n} and 1 is {}.", n + 1))
        );
    }
    assert!(server.starts() >= 2, "the server was started again");
    assert_ne!(server.pid(), Some(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs @modelcontextprotocol/server-everything from npm: .ci/run installs it (npm ci --prefix tests/js) and runs this test"]
async fn the_graph_may_ask_for_approval_of_a_tool_and_an_unknown_server_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let graph = GRAPH.replace(
        "tool = \"get-sum\"",
        "tool = \"get-sum\"\nirreversible = true",
    );
    let orch = Orchestrator::builder(load(dir.path(), &graph))
        .start()
        .await
        .unwrap();
    let id = orch
        .submit(SubmitRequest::new("tools", json!({"a": 4, "b": 5})))
        .await
        .unwrap()
        .id;
    let parked = tokio::time::timeout(Duration::from_secs(30), orch.wait_settled(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(parked.state, JobState::AwaitingApproval);
    let v = orch.approval(&format!("{id}/sum")).unwrap();
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&v.approval.proposal).unwrap(),
        json!({"server": "everything", "tool": "get-sum", "arguments": {"a": 4, "b": 5}})
    );
    let job = common::approve_and_wait(&orch, &v.approval.id, "ops").await;
    assert_eq!(
        **job.steps[0].output.as_ref().unwrap(),
        json!("The sum of 4 and 5 is 9.")
    );

    // A graph naming a server nobody declared does not load, and says which ones exist.
    let bad = GRAPH.replace(
        "server = \"everything\"\ntool = \"get-sum\"",
        "server = \"evrything\"\ntool = \"get-sum\"",
    );
    std::fs::write(dir.path().join("g.toml"), bad).unwrap();
    let e = config::load(
        Some(&dir.path().join("cascade.toml")),
        &[],
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("no MCP server \"evrything\"") && e.contains("everything"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs @modelcontextprotocol/server-everything from npm: .ci/run installs it (npm ci --prefix tests/js) and runs this test"]
async fn an_unknown_tool_or_arguments_that_do_not_fit_are_refused_at_start_and_by_check_connect() {
    let dir = tempfile::tempdir().unwrap();
    // A tool the server does not have: the error lists those it has.
    let typo = GRAPH.replace("tool = \"get-sum\"", "tool = \"get-summ\"");
    let e = match Orchestrator::builder(load(dir.path(), &typo)).start().await {
        Err(e) => e.to_string(),
        Ok(_) => panic!("an unknown tool started"),
    };
    assert!(
        e.contains("no tool \"get-summ\"") && e.contains("get-sum") && e.contains("echo"),
        "{e}"
    );
    // Fixed arguments are checked against the tool's inputSchema.
    let fixed = GRAPH.replace(
        "arguments = { a = \"{{= input.a }}\", b = \"{{= input.b }}\" }",
        "arguments = { a = \"two\", b = 3 }",
    );
    let e = match Orchestrator::builder(load(dir.path(), &fixed))
        .start()
        .await
    {
        Err(e) => e.to_string(),
        Ok(_) => panic!("arguments that break the schema started"),
    };
    assert!(e.contains("inputSchema") && e.contains("/a"), "{e}");

    // `graph check --connect` starts the server and says the same; without --connect the
    // tools are not looked at.
    load(dir.path(), &typo);
    let check = |connect: bool| {
        let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_cascade"));
        cmd.args(["graph", "check", "--config"])
            .arg(dir.path().join("cascade.toml"))
            .arg(dir.path().join("g.toml"));
        if connect {
            cmd.arg("--connect");
        }
        cmd.output().unwrap()
    };
    let o = check(true);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("no tool \"get-summ\""), "{err}");
    assert!(check(false).status.success());
    load(dir.path(), GRAPH);
    assert!(
        check(true).status.success(),
        "{}",
        String::from_utf8_lossy(&check(true).stderr)
    );
}

/// A ledger as an MCP server over streamable HTTP (rmcp's, as Cascade's `/mcp` serves it),
/// behind a bearer token: one tool, `post_entry`, with no annotations (so, by the MCP defaults,
/// destructive), counting its calls.
mod ledger {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    use cascade_orchestrator::agents::mcp_host::{OfferedTool, ToolHost, service, tool};
    use serde_json::{Map, Value, json};

    #[derive(Clone, Default)]
    pub struct Ledger {
        pub calls: Arc<AtomicU64>,
    }

    #[async_trait::async_trait]
    impl ToolHost for Ledger {
        fn tools(&self) -> Vec<OfferedTool> {
            vec![tool(
                "post_entry",
                "Post a ledger entry",
                json!({"type": "object", "properties": {"amount": {"type": "number"}}, "required": ["amount"]}),
            )]
        }

        async fn call(&self, _: &str, arguments: Map<String, Value>) -> Result<Value, String> {
            let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
            Ok(json!({"entry": n, "amount": arguments["amount"]}))
        }
    }

    /// Serve it on 127.0.0.1 at `/mcp`, answering only `Authorization: Bearer <token>`; the
    /// port.
    pub async fn serve(ledger: Ledger, token: &'static str) -> u16 {
        serve_with(ledger, move |h| bearer(h) == Some(token)).await
    }

    /// The bearer token of a request.
    pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
        headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
    }

    /// Serve it, answering only requests whose headers `accept` takes (else 401); the port.
    pub async fn serve_with(
        ledger: Ledger,
        accept: impl Fn(&axum::http::HeaderMap) -> bool + Clone + Send + Sync + 'static,
    ) -> u16 {
        let app = axum::Router::new()
            .nest_service("/mcp", service(Arc::new(ledger), Vec::new()))
            .layer(axum::middleware::from_fn(
                move |req: axum::extract::Request, next: axum::middleware::Next| {
                    let accept = accept.clone();
                    async move {
                        let ok = accept(req.headers());
                        if ok {
                            next.run(req).await
                        } else {
                            axum::response::IntoResponse::into_response(
                                axum::http::StatusCode::UNAUTHORIZED,
                            )
                        }
                    }
                },
            ));
        super::common::serve_http(app).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_over_streamable_http_with_a_bearer_token_and_an_unannotated_tool_asks_first() {
    let ledger = ledger::Ledger::default();
    let port = ledger::serve(ledger.clone(), "ledger-token-771").await;
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: this variable is read by this test only.
    unsafe { std::env::set_var("LEDGER_TOKEN", "ledger-token-771") };
    let model = books(dir.path(), port, "LEDGER_TOKEN", "");
    let orch = Orchestrator::builder(model).start().await.unwrap();
    let id = orch
        .submit(SubmitRequest::new("books", json!({"amount": 120.5})))
        .await
        .unwrap()
        .id;
    // The tool says nothing of itself: by the MCP defaults it is destructive, so it waits.
    let parked = tokio::time::timeout(Duration::from_secs(30), orch.wait_settled(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        parked.state,
        JobState::AwaitingApproval,
        "{:?}",
        parked.error
    );
    assert_eq!(ledger.calls.load(std::sync::atomic::Ordering::SeqCst), 0);
    let job = common::approve_and_wait(&orch, &format!("{id}/post"), "controller").await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(
        **job.steps[0].output.as_ref().unwrap(),
        json!({"entry": 1, "amount": 120.5})
    );
    assert_eq!(ledger.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_refuses_the_token_at_start_pauses_its_agents_not_the_start() {
    let port = ledger::serve(ledger::Ledger::default(), "right-token").await;
    let dir = tempfile::tempdir().unwrap();
    // SAFETY: this variable is read by this test only.
    unsafe { std::env::set_var("LEDGER_WRONG_TOKEN", "wrong-token") };
    let model = books(
        dir.path(),
        port,
        "LEDGER_WRONG_TOKEN",
        "approval = \"never\"",
    );
    let orch = Orchestrator::builder(model).start().await.unwrap();
    let q = common::quota(&orch, "upstream:mcp:ledger").await;
    assert!(q.exhausted_reason.is_some(), "{q:?}");
    let pauses = orch.pauses("books").await.unwrap();
    assert!(pauses.iter().all(|(_, p)| p.is_some()), "{pauses:?}");
}

/// An MCP server over HTTP behind OAuth2 (client credentials from oauth2-mock-server, tokens
/// that live 3 s; the server refuses an expired one, as a resource server would): Cascade gets a
/// token at connection, and connects again with a new one once it renewed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs oauth2-mock-server from npm: .ci/run installs it (npm ci --prefix tests/js) and runs this test"]
async fn a_server_behind_oauth2_gets_a_token_and_a_fresh_one_before_it_expires() {
    let auth_port = common::free_port();
    let auth = oauth2_server::auth_server(auth_port, 3);
    let ledger = ledger::Ledger::default();
    let port = ledger::serve_with(ledger.clone(), |headers| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs();
        ledger::bearer(headers)
            .and_then(oauth2_server::jwt_exp)
            .is_some_and(|exp| exp > now)
    })
    .await;
    // SAFETY: this variable is read by this test only.
    unsafe { std::env::set_var("CASCADE_TEST_MCP_OAUTH_SECRET", "mcp-client-secret-3") };
    let dir = tempfile::tempdir().unwrap();
    let graph = "[graph]\nname = \"books\"\n[agents.post]\nkind = \"mcp\"\nserver = \"ledger\"\ntool = \"post_entry\"\narguments = { amount = \"{{= input.amount }}\" }\napproval = \"never\"\nretry = { max_attempts = 5, initial_delay = \"100ms\" }\n";
    let servers = format!(
        "[mcp_servers.ledger]\nurl = \"http://127.0.0.1:{port}/mcp\"\nauth = {{ oauth2 = {{ token_url = \"http://127.0.0.1:{auth_port}/token\", client_id = \"cascade\", client_secret = \"env:CASCADE_TEST_MCP_OAUTH_SECRET\", scopes = [\"ledger\"] }} }}\n"
    );
    let orch = Orchestrator::builder(load_with(dir.path(), graph, &servers))
        .start()
        .await
        .unwrap();
    let first = common::run_one(&orch, "books", json!({"amount": 1})).await;
    assert_eq!(first.state, JobState::Succeeded, "{:?}", first.error);
    let issued = || auth.events.lock().unwrap().len();
    assert_eq!(issued(), 1, "{:?}", auth.events.lock().unwrap());
    assert_eq!(
        auth.events.lock().unwrap()[0]["grant_type"],
        "client_credentials"
    );
    // The first token has expired: the next call connects again with a new one.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let second = common::run_one(&orch, "books", json!({"amount": 2})).await;
    assert_eq!(second.state, JobState::Succeeded, "{:?}", second.error);
    assert!(issued() >= 2, "{:?}", auth.events.lock().unwrap());
    assert_eq!(ledger.calls.load(std::sync::atomic::Ordering::SeqCst), 2);
    let server = orch
        .registry()
        .resources()
        .get::<cascade_orchestrator::agents::mcp::McpServers>()
        .get("ledger")
        .unwrap();
    assert!(server.starts() >= 2, "connected again with the new token");
    // A bad credential is named at load, at the server's auth.
    let bad = "[mcp_servers.ledger]\nurl = \"http://127.0.0.1:1/mcp\"\nauth = { oauth2 = { token_url = \"not a url\", client_id = \"c\", client_secret = \"env:CASCADE_TEST_MCP_OAUTH_SECRET\" } }\n";
    std::fs::write(
        dir.path().join("cascade.toml"),
        format!("graphs = [\"g.toml\"]\n{bad}"),
    )
    .unwrap();
    let err = config::load(
        Some(&dir.path().join("cascade.toml")),
        &[],
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("mcp_servers.ledger"), "{err}");
}

/// The other forms of the `http` kind's `auth`: an API key header, and basic auth through a
/// named `[credentials.NAME]`; an unknown credential is a load error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_takes_an_api_key_or_a_named_basic_credential() {
    use base64::Engine;
    // SAFETY: these variables are read by this test only.
    unsafe {
        std::env::set_var("CASCADE_TEST_LEDGER_KEY", "ledger-key-5");
        std::env::set_var("CASCADE_TEST_LEDGER_PW", "ledger-pw-8");
    }
    let graph = "[graph]\nname = \"books\"\n[agents.post]\nkind = \"mcp\"\nserver = \"ledger\"\ntool = \"post_entry\"\narguments = { amount = \"{{= input.amount }}\" }\napproval = \"never\"\n";

    // One job through `servers`: it succeeds, and its ledger counted one call.
    let one_post = |servers: String, ledger: ledger::Ledger| async move {
        let dir = tempfile::tempdir().unwrap();
        let orch = Orchestrator::builder(load_with(dir.path(), graph, &servers))
            .start()
            .await
            .unwrap();
        let job = common::run_one(&orch, "books", json!({"amount": 3})).await;
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
        assert_eq!(ledger.calls.load(std::sync::atomic::Ordering::SeqCst), 1);
    };

    let keyed = ledger::Ledger::default();
    let port = ledger::serve_with(keyed.clone(), |h| {
        h.get("x-ledger-key").and_then(|v| v.to_str().ok()) == Some("ledger-key-5")
    })
    .await;
    one_post(
        format!(
            "[mcp_servers.ledger]\nurl = \"http://127.0.0.1:{port}/mcp\"\nauth = {{ api_key = {{ header = \"X-Ledger-Key\", value = \"env:CASCADE_TEST_LEDGER_KEY\" }} }}\n"
        ),
        keyed,
    )
    .await;

    let basic = ledger::Ledger::default();
    let expected = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode("books:ledger-pw-8")
    );
    let port = ledger::serve_with(basic.clone(), move |h| {
        h.get("authorization").and_then(|v| v.to_str().ok()) == Some(expected.as_str())
    })
    .await;
    one_post(
        format!(
            "[credentials.ledger_login]\nbasic = {{ username = \"books\", password = \"env:CASCADE_TEST_LEDGER_PW\" }}\n[mcp_servers.ledger]\nurl = \"http://127.0.0.1:{port}/mcp\"\nauth = \"ledger_login\"\n"
        ),
        basic,
    )
    .await;

    let dir = tempfile::tempdir().unwrap();

    let bad = format!(
        "graphs = [\"g.toml\"]\n[mcp_servers.ledger]\nurl = \"http://127.0.0.1:{port}/mcp\"\nauth = \"nope\"\n"
    );
    std::fs::write(dir.path().join("cascade.toml"), bad).unwrap();
    let err = config::load(
        Some(&dir.path().join("cascade.toml")),
        &[],
        &Default::default(),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("unknown credential \"nope\""), "{err}");
}
