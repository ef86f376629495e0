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
    // One process serves both agents (and served the tool check at start).
    assert_eq!(server.starts(), 1, "one shared process");
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

/// kill -9 of a stdio server while nothing calls it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs @modelcontextprotocol/server-everything from npm: .ci/run installs it (npm ci --prefix tests/js) and runs this test"]
async fn a_killed_server_is_started_again_after_its_backoff_with_no_call_waiting() {
    let dir = tempfile::tempdir().unwrap();
    let orch = Orchestrator::builder(load(dir.path(), GRAPH))
        .start()
        .await
        .unwrap();
    let server = orch
        .registry()
        .resources()
        .get::<cascade_orchestrator::agents::mcp::McpServers>()
        .get("everything")
        .unwrap();
    // Started once, at start, to read its tools; no job has run.
    assert_eq!(server.starts(), 1);
    let pid = server.pid().expect("a server process runs");
    let killed = std::time::Instant::now();
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap()
            .success()
    );
    // Its watcher sees it exit, waits the first backoff (1 s) and starts it again.
    while server.starts() < 2 {
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "not started again within 15 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let after = killed.elapsed();
    assert!(
        after >= Duration::from_millis(900),
        "started again {after:?} after the kill: sooner than its backoff"
    );
    let new = server.pid().expect("a server process runs again");
    assert_ne!(new, pid);
    // A process that runs: signal 0 reaches it.
    assert!(
        std::process::Command::new("kill")
            .args(["-0", &new.to_string()])
            .status()
            .unwrap()
            .success()
    );
    // The next job uses it: no start more.
    let job = common::run_one(&orch, "tools", json!({"a": 6, "b": 1})).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(server.starts(), 2);
    assert_eq!(server.pid(), Some(new));
}

/// A server that starts, answers, and dies two seconds later, again and again, under a steady
/// stream of jobs: it is started again each time (by its watcher or a call), no sooner than
/// the doubling backoff allows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs @modelcontextprotocol/server-everything from npm: .ci/run installs it (npm ci --prefix tests/js) and runs this test"]
async fn a_server_that_dies_after_each_start_is_started_again_with_a_doubling_backoff() {
    let dir = tempfile::tempdir().unwrap();
    let spawns = dir.path().join("spawns");
    let servers = format!(
        "[mcp_servers.everything]\ncommand = \"sh\"\nargs = ['-c', 'echo started >> \"{}\"; exec timeout -s KILL 2 node \"{}\" stdio']\n",
        spawns.display(),
        everything().display()
    );
    let graph = GRAPH.replace(
        "retry = { max_attempts = 5, initial_delay = \"100ms\", max_delay = \"2s\" }",
        "retry = { max_attempts = 2, initial_delay = \"50ms\" }",
    );
    let started = std::time::Instant::now();
    let orch = Orchestrator::builder(load_with(dir.path(), &graph, &servers))
        .start()
        .await
        .unwrap();
    let count = || {
        std::fs::read_to_string(&spawns)
            .unwrap_or_default()
            .lines()
            .count()
    };
    let server = orch
        .registry()
        .resources()
        .get::<cascade_orchestrator::agents::mcp::McpServers>()
        .get("everything")
        .unwrap();
    let mut jobs = Vec::new();
    // Two seconds up (less node's start-up on a loaded machine), then down for 1, 2, 4 s.
    while started.elapsed() < Duration::from_secs(15) {
        jobs.push(
            orch.submit(SubmitRequest::new("tools", json!({"a": 1, "b": 1})))
                .await
                .unwrap()
                .id,
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let spawned = count();
    let elapsed = started.elapsed().as_secs_f64();
    // Started at 0 s, then each time no sooner than 1, 2, 4, 8 s after the last death: within t
    // seconds at most 1 + log2(t + 1) starts.
    let bound = 1 + (elapsed + 1.0).log2().floor() as usize;
    assert!(
        (3..=bound).contains(&spawned),
        "{spawned} starts in {elapsed:.1} s (at most {bound})"
    );
    assert!(server.starts() >= 2, "{}", server.starts());
    // Some jobs found it up.
    let mut succeeded = 0;
    for id in jobs {
        if orch.get(id).unwrap().unwrap().state == JobState::Succeeded {
            succeeded += 1;
        }
    }
    assert!(succeeded > 0);
}

/// `cascade run --config cascade.toml graph.toml` with `[mcp_servers]`: the job runs on the
/// stdio server it starts, and what the server writes to stderr is in the run's log (at the
/// default level).
#[test]
#[ignore = "needs @modelcontextprotocol/server-everything from npm: .ci/run installs it (npm ci --prefix tests/js) and runs this test"]
fn cascade_run_with_a_config_calls_a_stdio_server_and_logs_its_stderr() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    // server-everything behind a wrapper that says a line of its own on stderr first.
    let wrapper = dir.path().join("everything.sh");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho 'wrapper-7f3: starting server-everything' >&2\nexec node {:?} stdio\n",
            everything().display().to_string()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::write(
        dir.path().join("cascade.toml"),
        format!(
            "[mcp_servers.everything]\ncommand = {:?}\n",
            wrapper.display().to_string()
        ),
    )
    .unwrap();
    let graph = dir.path().join("graph.toml");
    std::fs::write(
        &graph,
        "[graph]\nname = \"tools\"\n[agents.sum]\nkind = \"mcp\"\nserver = \"everything\"\ntool = \"get-sum\"\narguments = { a = \"{{= input.a }}\", b = \"{{= input.b }}\" }\n",
    )
    .unwrap();
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
        .arg("run")
        .arg(&graph)
        .arg("--config")
        .arg(dir.path().join("cascade.toml"))
        .args(["--input", r#"{"a": 2, "b": 3}"#, "--json", "--quiet"])
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{}\n{log}", o.status);
    let summary: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(summary["succeeded"], 1, "{summary}\n{log}");
    assert_eq!(summary["failed"], 0, "{summary}");
    // The wrapper's line and the server's own, each named with the server.
    for said in [
        "wrapper-7f3: starting server-everything",
        "Starting default (STDIO) server...",
    ] {
        assert!(
            log.lines()
                .any(|l| l.contains(said) && l.contains("server=everything")),
            "{said:?} is not in the log:\n{log}"
        );
    }
}

/// A server that exits as soon as it starts, under a run of jobs: every call fails as
/// transient, the server's implicit quota opens its circuit and pauses the agent and its
/// downstream, and the server is started no more often than its backoff allows (1 s, 2 s, 4 s…).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_keeps_dying_opens_its_circuit_and_is_not_restarted_in_a_storm() {
    use cascade_orchestrator::signal::{CauseKey, Reach};
    let dir = tempfile::tempdir().unwrap();
    let spawns = dir.path().join("spawns");
    let servers = format!(
        "[mcp_servers.dying]\ncommand = \"sh\"\nargs = ['-c', 'echo started >> \"{}\"; exit 3']\n",
        spawns.display()
    );
    let graph = "[graph]\nname = \"dying\"\n[agents.call]\nkind = \"mcp\"\nserver = \"dying\"\ntool = \"anything\"\napproval = \"never\"\nretry = { max_attempts = 3, initial_delay = \"100ms\", max_delay = \"300ms\" }\n[agents.after]\nkind = \"sim\"\nafter = [\"call\"]\n";
    let started = std::time::Instant::now();
    // Unreachable at start: a warning and a pause, not a failed start.
    let orch = Orchestrator::builder(load_with(dir.path(), graph, &servers))
        .start()
        .await
        .unwrap();
    let count = || {
        std::fs::read_to_string(&spawns)
            .unwrap_or_default()
            .lines()
            .count()
    };
    assert_eq!(count(), 1, "started once, at start");
    for n in 0..40 {
        orch.submit(SubmitRequest::new("dying", json!({"n": n})))
            .await
            .unwrap();
    }
    // Once the pause of the start is over, the calls fail until the circuit opens.
    let circuit = loop {
        let pauses = orch.pauses("dying").await.unwrap();
        let call = pauses
            .iter()
            .find(|(a, _)| &**a == "call")
            .and_then(|(_, p)| p.clone());
        if let Some(p) = call.filter(|p| {
            p.causes.iter().any(|(k, info)| {
                matches!(k, CauseKey::Quota { quota } if &**quota == "upstream:mcp:dying")
                    && info.reason.contains("circuit")
            })
        }) {
            break (p, pauses);
        }
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "the circuit did not open: {pauses:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let (call, pauses) = circuit;
    assert_eq!(call.reach, Reach::Direct);
    let after = pauses
        .iter()
        .find(|(a, _)| &**a == "after")
        .and_then(|(_, p)| p.clone())
        .expect("the downstream agent is paused too");
    assert_eq!(after.reach, Reach::Upstream);
    let q = common::quota(&orch, "upstream:mcp:dying").await;
    assert!(q.exhausted_reason.is_some(), "{q:?}");
    // Starts at 0 s, then no sooner than 1 s, 3 s, 7 s, 15 s… after it: within t seconds at most
    // 1 + log2(t + 1) of them, however many calls there were.
    let spawned = count();
    let elapsed = started.elapsed().as_secs_f64();
    let bound = 1 + (elapsed + 1.0).log2().floor() as usize;
    assert!(
        (2..=bound).contains(&spawned),
        "{spawned} starts in {elapsed:.1} s (at most {bound})"
    );
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
        super::common::serve_http(app(ledger, accept)).await
    }

    /// Serve it on `port` of 127.0.0.1, answering only `Authorization: Bearer <token>`.
    pub async fn serve_on(ledger: Ledger, token: &'static str, port: u16) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
            .await
            .unwrap();
        let app = app(ledger, move |h| bearer(h) == Some(token));
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    }

    fn app(
        ledger: Ledger,
        accept: impl Fn(&axum::http::HeaderMap) -> bool + Clone + Send + Sync + 'static,
    ) -> axum::Router {
        axum::Router::new()
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
            ))
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

/// `cascade serve` with a server at a closed port and one whose command is not there yet: it
/// starts, says so in its log, and GetGraph shows their agents (and the downstream) paused on
/// `upstream:mcp:<name>`; once the servers are there, jobs go through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs @modelcontextprotocol/server-everything from npm: .ci/run installs it (npm ci --prefix tests/js) and runs this test"]
async fn servers_unreachable_at_start_pause_their_agents_until_they_answer() {
    use cascade_orchestrator::api::pb;
    use std::os::unix::fs::PermissionsExt;
    let ledger_port = common::free_port();
    let bin = tempfile::tempdir().unwrap();
    let wrapper = bin.path().join("everything.sh");
    let books = "[graph]\nname = \"books\"\n[agents.post]\nkind = \"mcp\"\nserver = \"ledger\"\ntool = \"post_entry\"\narguments = { amount = \"{{= input.amount }}\" }\napproval = \"never\"\n[agents.file]\nkind = \"sim\"\nafter = [\"post\"]\n";
    let tools = "[graph]\nname = \"tools\"\n[agents.sum]\nkind = \"mcp\"\nserver = \"everything\"\ntool = \"get-sum\"\narguments = { a = \"{{= input.a }}\", b = \"{{= input.b }}\" }\napproval = \"never\"\n";
    let dir = common::server_dir(
        &[("books.toml", books), ("tools.toml", tools)],
        &format!(
            "[mcp_servers.ledger]\nurl = \"http://127.0.0.1:{ledger_port}/mcp\"\nauth = {{ bearer = \"env:CASCADE_TEST_LEDGER_LATE_TOKEN\" }}\n\
             [mcp_servers.everything]\ncommand = {:?}\n",
            wrapper.display().to_string()
        ),
    );
    let (grpc, http) = (common::free_port(), common::free_port());
    let _server = common::spawn_with_env(
        dir.path(),
        grpc,
        http,
        &[("CASCADE_TEST_LEDGER_LATE_TOKEN", "late-token-4")],
    );
    let mut client = common::connect(grpc).await;
    // Paused, each agent on its server's quota, the downstream behind it.
    for (graph, agent, quota, downstream) in [
        ("books", "post", "upstream:mcp:ledger", Some("file")),
        ("tools", "sum", "upstream:mcp:everything", None),
    ] {
        let g = client
            .get_graph(pb::GetGraphRequest { name: graph.into() })
            .await
            .unwrap()
            .into_inner();
        let of = |name: &str| g.agents.iter().find(|a| a.name == name).unwrap();
        let a = of(agent);
        assert_eq!(a.state, "paused", "{a:?}");
        assert!(a.pause_causes.iter().any(|c| c.quota == quota), "{a:?}");
        if let Some(d) = downstream {
            assert_eq!(of(d).state, "paused", "{:?}", of(d));
            assert!(of(d).pause_causes.iter().any(|c| c.quota == quota));
        }
    }
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    for name in ["ledger", "everything"] {
        assert!(
            log.lines().any(|l| l.contains("WARN")
                && l.contains("unreachable at start")
                && l.contains(&format!("server={name}"))),
            "no warning for {name}:\n{log}"
        );
    }
    // The servers come up.
    let ledger = ledger::Ledger::default();
    ledger::serve_on(ledger.clone(), "late-token-4", ledger_port).await;
    // Its pid (the shell's, which exec hands to node) goes to a file, a line per start.
    let pids = bin.path().join("pids");
    std::fs::write(
        &wrapper,
        format!(
            "#!/bin/sh\necho $$ >> {:?}\nexec node {:?} stdio\n",
            pids.display().to_string(),
            everything().display().to_string()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut ids = Vec::new();
    for n in 0..3 {
        ids.push(common::submit(&mut client, "books", &format!(r#"{{"amount": {n}}}"#)).await);
        ids.push(common::submit(&mut client, "tools", &format!(r#"{{"a": {n}, "b": 1}}"#)).await);
    }
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    for id in ids {
        loop {
            let j = client
                .get_job(pb::GetJobRequest { job_id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            if j.state == pb::JobState::Succeeded as i32 {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline
                    && ![pb::JobState::Failed as i32, pb::JobState::Cancelled as i32]
                        .contains(&j.state),
                "job {id}: {:?} {}",
                pb::JobState::try_from(j.state),
                j.error
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    assert_eq!(ledger.calls.load(std::sync::atomic::Ordering::SeqCst), 3);

    // kill -9 of the stdio server: its exit is in the log with its status, and it is started
    // again with no call waiting.
    let started = || -> Vec<String> {
        std::fs::read_to_string(&pids)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect()
    };
    let before = started();
    assert_eq!(before.len(), 1, "started once for the jobs: {before:?}");
    assert!(
        std::process::Command::new("kill")
            .args(["-9", &before[0]])
            .status()
            .unwrap()
            .success()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    while started().len() < 2 {
        assert!(std::time::Instant::now() < deadline, "not started again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        log.lines().any(|l| l.contains("MCP server exited")
            && l.contains("server=everything")
            && l.contains("killed by signal 9")),
        "{log}"
    );
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
