//! Cascade's own `/mcp`, driven by an MCP client nobody here wrote: the Python `mcp` SDK from
//! PyPI (`pip install mcp==2.3.0`, which `.ci/run` does).

mod common;

use serde_json::{Value, json};

const GRAPHS: &str = r#"
[graph]
name = "quick"
input_schema = { type = "object", properties = { n = { type = "integer" } }, required = ["n"] }
[agents.echo]
kind = "template"
output = { doubled = "{{= input.n * 2 }}" }
"#;

const GATED: &str = r#"
[graph]
name = "gated"
[agents.pay]
kind = "sim"
approval_when = "input.amount > 1000"
"#;

/// A job that takes 3 s: longer than a short `wait_seconds`.
const SLOW: &str = r#"
[graph]
name = "slow"
[agents.work]
kind = "sim"
latency = "3s"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the Python mcp SDK from PyPI: .ci/run installs it (pip install mcp==2.3.0) and runs this test"]
async fn graphs_are_mcp_tools_for_a_python_client() {
    let mut model =
        cascade_orchestrator::config::parse_graph_str("quick.toml", GRAPHS, &Default::default())
            .unwrap();
    let gated =
        cascade_orchestrator::config::parse_graph_str("gated.toml", GATED, &Default::default())
            .unwrap();
    model.graphs.extend(gated.graphs);
    model.quotas.extend(gated.quotas);
    let slow =
        cascade_orchestrator::config::parse_graph_str("slow.toml", SLOW, &Default::default())
            .unwrap();
    model.graphs.extend(slow.graphs);
    model.quotas.extend(slow.quotas);
    let (orch, server) = common::serve_in_process(model).await;
    let url = format!("http://127.0.0.1:{}/mcp", server.http_addr.port());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/mcp_client.py");
    let out = tokio::process::Command::new("python3")
        .arg(script)
        .arg(&url)
        .output()
        .await
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the Python MCP client failed (is `mcp` installed? pip install mcp==2.3.0): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Every graph is a tool with its schema, beside the job tools.
    let tools = &seen["tools"];
    for t in [
        "run_quick",
        "run_gated",
        "get_job",
        "await_job",
        "cancel_job",
        "list_approvals",
    ] {
        assert!(tools.get(t).is_some(), "{t} in {tools}");
    }
    assert_eq!(tools["run_quick"]["required"], json!(["input"]));
    // The graph's input_schema is the tool's input's.
    assert_eq!(
        tools["run_quick"]["properties"]["input"]["required"],
        json!(["n"])
    );
    // A graph run to completion answers with its output.
    let run = &seen["run_quick"]["structured"];
    assert_eq!(run["state"], "succeeded", "{seen}");
    assert_eq!(run["output"]["echo"]["doubled"], 14);
    // A job that needs a person says so: it is not run past its gate.
    let gated = &seen["run_gated"]["structured"];
    assert_eq!(gated["state"], "awaiting_approval", "{seen}");
    let job = gated["job_id"].as_str().unwrap();
    assert_eq!(
        gated["awaiting_approval"][0]["approval_id"],
        format!("{job}/pay")
    );
    let approvals = &seen["list_approvals"]["structured"]["approvals"];
    assert_eq!(approvals[0]["approval_id"], format!("{job}/pay"), "{seen}");
    // A bad call is the tool's error, in words.
    assert_eq!(seen["get_job"]["is_error"], true);
    assert!(
        seen["get_job"]["text"][0]
            .as_str()
            .unwrap()
            .contains("invalid job id"),
        "{seen}"
    );

    // A job that outlasts wait_seconds: its id and a state that is not final.
    let slow = &seen["run_slow"]["structured"];
    let slow_id = slow["job_id"].as_str().expect("a job id");
    assert!(
        ["pending", "running"].contains(&slow["state"].as_str().unwrap()),
        "{seen}"
    );
    assert_eq!(slow["output"], Value::Null);
    // get_job on it: the same job, still under way.
    let got = &seen["get_job_slow"]["structured"];
    assert_eq!(got["job_id"], slow_id, "{seen}");
    assert_eq!(got["graph"], "slow");
    assert!(
        ["pending", "running"].contains(&got["state"].as_str().unwrap()),
        "{seen}"
    );
    // await_job waits for its end and answers with its output.
    let awaited = &seen["await_job_slow"]["structured"];
    assert_eq!(awaited["job_id"], slow_id, "{seen}");
    assert_eq!(awaited["state"], "succeeded", "{seen}");
    assert_eq!(
        awaited["output"]["work"]["input"],
        json!({"n": 1}),
        "{seen}"
    );
    let record = orch.get(slow_id.parse().unwrap()).unwrap().unwrap();
    assert_eq!(record.state, cascade_orchestrator::job::JobState::Succeeded);

    // The same idempotency key twice: the same job.
    let keyed = &seen["run_slow_keyed"];
    let keyed_id = keyed[0]["structured"]["job_id"].as_str().unwrap();
    assert_ne!(keyed_id, slow_id);
    assert_eq!(keyed[1]["structured"]["job_id"], keyed_id, "{seen}");
    // cancel_job on it while it runs: cancelled, as get_job and the orchestrator then say.
    assert_eq!(seen["cancel_job"]["is_error"], false, "{seen}");
    assert_eq!(seen["cancel_job"]["structured"]["job_id"], keyed_id);
    assert_eq!(
        seen["cancel_job"]["structured"]["state"], "cancelled",
        "{seen}"
    );
    assert_eq!(
        seen["get_job_cancelled"]["structured"]["state"], "cancelled",
        "{seen}"
    );
    let record = orch.get(keyed_id.parse().unwrap()).unwrap().unwrap();
    assert_eq!(record.state, cascade_orchestrator::job::JobState::Cancelled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_answers_loopback_and_allowed_hosts_only() {
    let model =
        cascade_orchestrator::config::parse_graph_str("quick.toml", GRAPHS, &Default::default())
            .unwrap();
    let orch = std::sync::Arc::new(
        cascade_orchestrator::Orchestrator::builder(model)
            .start()
            .await
            .unwrap(),
    );
    let options = cascade_orchestrator::server::ServerOptions {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        mcp_allowed_hosts: vec!["cascade.internal".into()],
        ..Default::default()
    };
    let server = cascade_orchestrator::server::start(orch, options)
        .await
        .unwrap();
    let url = format!("http://{}/mcp", server.http_addr);
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}});
    let post = |host: &'static str| {
        reqwest::Client::new()
            .post(&url)
            .header("host", host)
            .header("accept", "application/json, text/event-stream")
            .json(&initialize)
            .send()
    };
    for host in ["127.0.0.1", "localhost", "cascade.internal"] {
        let r = post(host).await.unwrap();
        assert!(r.status().is_success(), "{host}: {}", r.status());
    }
    // A name this server was not told about (a DNS-rebound page) is refused.
    let r = post("evil.example").await.unwrap();
    assert!(r.status().is_client_error(), "{}", r.status());
}

/// With keys on, `/mcp` acts as its caller: a tenant's key is offered the `run_` tools of the
/// graphs its tenant may run, its jobs land in its tenant, and another tenant's job is "not
/// found", exactly as an unknown one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs the Python mcp SDK from PyPI: .ci/run installs it (pip install mcp==2.3.0) and runs this test"]
async fn the_mcp_endpoint_acts_as_its_caller_in_its_tenant() {
    use cascade_orchestrator::auth;
    let (acme, globex) = (auth::generate_key(), auth::generate_key());
    let dir = common::server_dir(
        &[
            ("quick.toml", GRAPHS),
            (
                "ledger.toml",
                "[graph]\nname = \"ledger\"\ntenants = [\"globex\"]\n[agents.a]\nkind = \"sim\"\n",
            ),
        ],
        &format!(
            "[[auth.api_keys]]\nname = \"acme-app\"\ntenant = \"acme\"\nroles = [\"submit\", \"read\"]\nhash = \"{}\"\n\n\
             [[auth.api_keys]]\nname = \"globex-app\"\ntenant = \"globex\"\nroles = [\"submit\", \"read\"]\nhash = \"{}\"\n",
            auth::sha256_hash(&acme),
            auth::sha256_hash(&globex)
        ),
    );
    let model = cascade_orchestrator::config::load(
        Some(&dir.path().join("cascade.toml")),
        &[],
        &Default::default(),
    )
    .unwrap();
    let (orch, server) = common::serve_in_process(model).await;
    let mut req = cascade_orchestrator::SubmitRequest::new("ledger", json!({}));
    req.tenant = "globex".into();
    let foreign = orch.submit(req).await.unwrap().id.to_string();
    let url = format!("http://127.0.0.1:{}/mcp", server.http_addr.port());
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/py/mcp_tenant_client.py");
    let out = tokio::process::Command::new("python3")
        .args([script, &url, &acme, &foreign])
        .output()
        .await
        .expect("python3 runs");
    assert!(
        out.status.success(),
        "the Python MCP client failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: Value = serde_json::from_slice(&out.stdout).unwrap();
    // Offered: the open graph, not globex's ledger.
    assert_eq!(
        seen["tools"],
        json!([
            "await_job",
            "cancel_job",
            "get_job",
            "list_approvals",
            "run_quick"
        ]),
        "{seen}"
    );
    let run = &seen["run_quick"]["structured"];
    assert_eq!(run["state"], "succeeded", "{seen}");
    let mine = orch
        .get(run["job_id"].as_str().unwrap().parse().unwrap())
        .unwrap()
        .unwrap();
    assert_eq!(mine.tenant, "acme");
    for tool in ["get_job", "cancel_job"] {
        assert_eq!(seen[tool]["is_error"], true, "{seen}");
        assert_eq!(
            seen[tool]["text"][0],
            format!("job {foreign} not found"),
            "{seen}"
        );
    }
    // Named anyway, the ledger refuses acme's job.
    assert_eq!(seen["run_ledger"]["is_error"], true, "{seen}");
    assert!(
        seen["run_ledger"]["text"][0]
            .as_str()
            .unwrap()
            .contains("does not take jobs of tenant \"acme\""),
        "{seen}"
    );
    let other = orch.get(foreign.parse().unwrap()).unwrap().unwrap();
    assert_ne!(other.state, cascade_orchestrator::job::JobState::Cancelled);
    // Without a key: refused at the door.
    let r = reqwest::Client::new()
        .post(&url)
        .header("content-type", "application/json")
        .body("{}")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
}
