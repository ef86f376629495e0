//! `kind = "llm"` against provider stand-ins written here, served on 127.0.0.1 by the test: an
//! OpenAI-compatible chat completions endpoint and an Anthropic-style Messages endpoint. They
//! check what a real provider checks (the key, the version header, the body's shape) and answer
//! what the tests need (scripted failures, 429s with the providers' headers).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use cascade_orchestrator::Orchestrator;
use cascade_orchestrator::job::JobState;
use serde_json::{Value, json};

mod common;

/// Requests the stand-in received: (path, headers, body).
type Log = Arc<Mutex<Vec<(String, axum::http::HeaderMap, Value)>>>;

/// The stand-in. The model name scripts the answer: "flaky" fails its first call with a 500,
/// "limited" answers its first call 429 with OpenAI's and the standard headers, "sleepy" takes
/// two seconds over its first call, "babbler" never answers with JSON; any other model answers
/// well.
async fn provider() -> (u16, Log) {
    let log: Log = Arc::default();
    let seen = log.clone();
    let app = axum::Router::new().fallback(
        move |uri: axum::http::Uri, headers: axum::http::HeaderMap, body: axum::body::Bytes| {
            let seen = seen.clone();
            async move {
                let body: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
                let model = body["model"].as_str().unwrap_or("").to_string();
                let n = {
                    let mut s = seen.lock().unwrap();
                    s.push((uri.path().to_string(), headers.clone(), body.clone()));
                    s.iter().filter(|(_, _, b)| b["model"] == model.as_str()).count()
                };
                let reply = |status: u16, extra: Vec<(&'static str, &'static str)>, v: Value| {
                    let mut r = axum::response::Response::builder()
                        .status(status)
                        .header("content-type", "application/json");
                    for (k, val) in extra {
                        r = r.header(k, val);
                    }
                    r.body(axum::body::Body::from(v.to_string())).unwrap()
                };
                let anthropic = uri.path() == "/v1/messages";
                if anthropic {
                    if headers.get("x-api-key").and_then(|v| v.to_str().ok()) != Some("anthropic-test-key")
                        || headers.get("anthropic-version").is_none()
                    {
                        return reply(401, vec![], json!({"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}));
                    }
                } else if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer openai-test-key") {
                    return reply(401, vec![], json!({"error": {"message": "Incorrect API key provided"}}));
                }
                match (model.as_str(), n) {
                    ("flaky", 1) => return reply(500, vec![], json!({"error": {"message": "internal"}})),
                    ("sleepy", 1) => tokio::time::sleep(Duration::from_secs(2)).await,
                    ("limited", 1) => {
                        return reply(
                            429,
                            vec![("retry-after-ms", "300"), ("x-ratelimit-reset-requests", "250ms")],
                            json!({"error": {"message": "Rate limit reached for requests"}}),
                        );
                    }
                    _ => {}
                }
                let prompt = if anthropic {
                    body["messages"][0]["content"].as_str().unwrap_or("").to_string()
                } else {
                    body["messages"].as_array().and_then(|m| m.last()).and_then(|m| m["content"].as_str()).unwrap_or("").to_string()
                };
                let text = if model == "babbler" {
                    "Sure! The label is billing.".to_string()
                } else if body["response_format"]["type"] == "json_object" || prompt.contains("JSON") {
                    r#"{"label": "billing"}"#.to_string()
                } else {
                    format!("Reply to: {prompt}")
                };
                let prompt_tokens = (prompt.len() / 4) as u64 + 1;
                if anthropic {
                    reply(200, vec![], json!({
                        "id": "msg_1", "type": "message", "role": "assistant", "model": model,
                        "content": [{"type": "text", "text": text}],
                        "stop_reason": "end_turn",
                        "usage": {"input_tokens": prompt_tokens, "output_tokens": 7}
                    }))
                } else {
                    reply(200, vec![], json!({
                        "id": "chatcmpl-1", "object": "chat.completion", "model": model,
                        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": 5, "total_tokens": prompt_tokens + 5}
                    }))
                }
            }
        },
    );
    let port = common::serve_http(app).await;
    (port, log)
}

fn keys() {
    // SAFETY: set before any orchestrator starts; every test sets the same values.
    unsafe {
        std::env::set_var("CASCADE_TEST_OPENAI_KEY", "openai-test-key");
        std::env::set_var("CASCADE_TEST_ANTHROPIC_KEY", "anthropic-test-key");
    }
}

/// classify (a JSON reply) feeds draft (text): the requests carry the key, the system message
/// and the rendered prompt; the outputs have the documented shape; usage adds up on the job.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_openai_compatible_chain_classifies_and_drafts() {
    keys();
    let (port, log) = provider().await;
    let mut model = cascade_orchestrator::config::parse_graph_str(
        "support.toml",
        &format!(
            r#"
        [graph]
        name = "support"
        [agents.classify]
        kind = "llm"
        base_url = "http://127.0.0.1:{port}/v1"
        api_key = "env:CASCADE_TEST_OPENAI_KEY"
        model = "gpt-test"
        system = "You label support tickets."
        prompt = "Label this ticket: {{{{ input.body }}}}"
        response = "json"
        max_tokens = 20
        temperature = 0.0
        [agents.draft]
        kind = "llm"
        after = ["classify"]
        base_url = "http://127.0.0.1:{port}/v1"
        api_key = "env:CASCADE_TEST_OPENAI_KEY"
        model = "gpt-test"
        prompt = "Write to a {{{{ deps.classify.json.label }}}} customer"
        "#
        ),
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    // As `[prices."gpt-test"]` in cascade.toml would set it.
    model.prices.insert(
        "gpt-test".into(),
        cascade_agents::llm::Price {
            prompt_per_million: 2.0,
            completion_per_million: 8.0,
        },
    );
    let orch = Orchestrator::builder(model).start().await.unwrap();
    let job = common::run_one(&orch, "support", json!({"body": "I was charged twice"})).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    let step = |n: &str| {
        job.steps
            .iter()
            .find(|s| &*s.agent == n)
            .unwrap()
            .output
            .clone()
            .unwrap()
    };
    let classify = step("classify");
    assert_eq!(classify["json"], json!({"label": "billing"}));
    assert_eq!(classify["model"], "gpt-test");
    assert_eq!(classify["finish_reason"], "stop");
    assert_eq!(classify["usage"]["completion_tokens"], 5);
    assert_eq!(
        step("draft")["text"],
        "Reply to: Write to a billing customer"
    );
    assert_eq!(job.usage.completion_tokens, 10);
    assert!(job.usage.prompt_tokens > 2);
    let expected = (job.usage.prompt_tokens as f64 * 2.0 + 10.0 * 8.0) / 1e6;
    assert!(
        (job.usage.cost_usd - expected).abs() < 1e-12,
        "{:?}",
        job.usage
    );
    // Each step carries its own call's cost; the job's is their sum.
    for record in &job.steps {
        let u = &record.usage;
        let own = (u.prompt_tokens as f64 * 2.0 + u.completion_tokens as f64 * 8.0) / 1e6;
        assert!(
            u.cost_usd > 0.0 && (u.cost_usd - own).abs() < 1e-12,
            "{u:?}"
        );
    }
    let graph_cost = orch
        .stats("support")
        .unwrap()
        .agents
        .iter()
        .map(|a| a.cost_usd)
        .sum::<f64>();
    assert!((graph_cost - expected).abs() < 1e-12, "{graph_cost}");
    let log = log.lock().unwrap().clone();
    assert_eq!(log.len(), 2);
    let (path, _, body) = &log[0];
    assert_eq!(path, "/v1/chat/completions");
    assert_eq!(
        body["messages"],
        json!([{"role": "system", "content": "You label support tickets."}, {"role": "user", "content": "Label this ticket: I was charged twice"}])
    );
    assert_eq!(body["response_format"], json!({"type": "json_object"}));
    assert_eq!(
        (body["max_tokens"].clone(), body["temperature"].clone()),
        (json!(20), json!(0.0))
    );
    orch.shutdown(Duration::from_secs(1)).await;
}

/// A 429 with the providers' headers pauses and the call succeeds after it with no attempt
/// spent; a 500 is retried; a reply that is not the JSON asked for is retried, then fails naming
/// why; a refused key pauses the agent on its credential, the job waiting, nothing recorded
/// holding the key.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn provider_answers_are_classified() {
    keys();
    let (port, log) = provider().await;
    let graph = |name: &str, model: &str, extra: &str| {
        format!(
            "[graph]\nname = \"{name}\"\n[agents.ask]\nkind = \"llm\"\nbase_url = \"http://127.0.0.1:{port}/v1\"\napi_key = \"env:CASCADE_TEST_OPENAI_KEY\"\nmodel = \"{model}\"\nprompt = \"hi\"\nretry = {{ max_attempts = 3, initial_delay = \"10ms\", max_delay = \"20ms\" }}\n{extra}"
        )
    };
    let orch = common::start_many(
        &[
            graph("limited", "limited", ""),
            graph("flaky", "flaky", ""),
            graph("babbler", "babbler", "response = \"json\"\n"),
            graph("sleepy", "sleepy", "timeout = \"300ms\"\n"),
            // The stand-in answers {"label": "billing"}: one schema it meets, one it breaks.
            graph(
                "schema-ok",
                "any",
                "response = \"json\"\nschema = { type = \"object\", required = [\"label\"], properties = { label = { enum = [\"billing\", \"bug\"] } } }\n",
            ),
            graph(
                "schema-broken",
                "any",
                "response = \"json\"\nschema = { type = \"object\", required = [\"label\", \"urgency\"], properties = { label = { enum = [\"bug\", \"question\"] } } }\n",
            ),
            graph("badkey", "any", "")
                .replace("CASCADE_TEST_OPENAI_KEY", "CASCADE_TEST_ANTHROPIC_KEY"),
        ]
        .into_iter()
        .map(|t| t.to_string())
        .collect::<Vec<_>>(),
    )
    .await;

    let t = std::time::Instant::now();
    let job = common::run_one(&orch, "limited", json!({})).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert!(
        t.elapsed() >= Duration::from_millis(250),
        "the delay was honoured"
    );
    assert_eq!(job.steps[0].attempts, 1, "a 429 spends no attempt");
    let q = common::quota(&orch, &format!("upstream:http://127.0.0.1:{port}")).await;
    assert!(q.refusals >= 1, "{q:?}");

    let job = common::run_one(&orch, "flaky", json!({})).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(job.steps[0].attempts, 2);

    let job = common::run_one(&orch, "babbler", json!({})).await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(
        job.steps[0].attempts, 3,
        "retried as transient up to the attempt limit"
    );
    assert!(
        job.error
            .as_deref()
            .unwrap()
            .contains("not the JSON asked for"),
        "{:?}",
        job.error
    );

    // A timeout is transient: retried, and the second call answers in time.
    let job = common::run_one(&orch, "sleepy", json!({})).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(job.steps[0].attempts, 2);

    let job = common::run_one(&orch, "schema-ok", json!({})).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    assert_eq!(
        job.steps[0].output.as_ref().unwrap()["json"],
        json!({"label": "billing"})
    );
    // A reply against the schema is retried as transient, then fails naming each violation.
    let job = common::run_one(&orch, "schema-broken", json!({})).await;
    assert_eq!(job.state, JobState::Failed);
    assert_eq!(job.steps[0].attempts, 3, "{:?}", job.error);
    let err = job.error.unwrap();
    assert!(
        err.contains("does not match the schema")
            && err.contains("at /label")
            && err.contains("\"urgency\" is a required property"),
        "{err}"
    );

    // A refused key pauses the agent on its credential (`credential:<graph>.<agent>`); the job
    // waits, spending no attempt, and nothing recorded holds the key.
    let id = orch
        .submit(cascade_orchestrator::SubmitRequest::new(
            "badkey",
            json!({}),
        ))
        .await
        .unwrap()
        .id;
    common::wait_until(Duration::from_secs(10), || orch.paused_agents("badkey") > 0).await;
    common::wait_paused_on(&orch, "badkey", "ask", "credential:badkey.ask").await;
    let job = orch.get(id).unwrap().unwrap();
    assert!(!job.state.is_terminal(), "{job:?}");
    assert_eq!(job.steps[0].attempts, 1);
    let record = serde_json::to_string(&job).unwrap()
        + &serde_json::to_string(&orch.store().events(id, 0).unwrap()).unwrap();
    assert!(!record.contains("anthropic-test-key"), "{record}");
    orch.cancel(id, "the test is done").await.unwrap();
    assert!(log.lock().unwrap().len() >= 7);
    orch.shutdown(Duration::from_secs(1)).await;
}

/// The Messages API: x-api-key and anthropic-version, the system prompt apart, max_tokens always
/// sent, input/output tokens read as usage.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_anthropic_messages_call() {
    keys();
    let (port, log) = provider().await;
    let orch = common::start(&format!(
        r#"
        [graph]
        name = "claude"
        [agents.draft]
        kind = "llm"
        provider = "anthropic"
        base_url = "http://127.0.0.1:{port}"
        api_key = "env:CASCADE_TEST_ANTHROPIC_KEY"
        model = "claude-test"
        system = "Be brief."
        prompt = "Answer {{{{ input.q }}}}"
        "#
    ))
    .await;
    let job = common::run_one(&orch, "claude", json!({"q": "why"})).await;
    assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    let out = job.steps[0].output.clone().unwrap();
    assert_eq!(out["text"], "Reply to: Answer why");
    assert_eq!(out["finish_reason"], "end_turn");
    assert_eq!(out["usage"]["completion_tokens"], 7);
    let log = log.lock().unwrap().clone();
    let (path, headers, body) = &log[0];
    assert_eq!(path, "/v1/messages");
    assert_eq!(headers["anthropic-version"], "2023-06-01");
    assert_eq!(body["system"], "Be brief.");
    assert_eq!(body["max_tokens"], 1024);
    assert_eq!(
        body["messages"],
        json!([{"role": "user", "content": "Answer why"}])
    );
    orch.shutdown(Duration::from_secs(1)).await;
}

/// `examples/graphs/support_llm.toml` as a user runs it (`cascade run`), its LLM pointed at the
/// provider stand-in through OPENAI_BASE_URL and its CRM and ticketing calls at a recorder.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_support_llm_example_runs_against_local_stand_ins() {
    let (port, log) = provider().await;
    let posted: Arc<Mutex<Vec<Value>>> = Arc::default();
    let sink = posted.clone();
    let crm = axum::Router::new()
        .route(
            "/customers/42",
            axum::routing::get(|| async { axum::Json(json!({"id": 42, "name": "Ada"})) }),
        )
        .route(
            "/replies",
            axum::routing::post(move |axum::Json(body): axum::Json<Value>| {
                let sink = sink.clone();
                async move {
                    sink.lock().unwrap().push(body);
                    (
                        axum::http::StatusCode::CREATED,
                        axum::Json(json!({"id": 1})),
                    )
                }
            }),
        );
    let crm_port = common::serve_http(crm).await;

    let example =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/graphs/support_llm.toml");
    let input = json!({
        "ticket_id": 7, "customer_id": 42, "body": "I was charged twice",
        "crm": format!("http://127.0.0.1:{crm_port}"), "tickets": format!("http://127.0.0.1:{crm_port}")
    });
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
            .args([
                "run",
                example.to_str().unwrap(),
                "--json",
                "--input",
                &input.to_string(),
            ])
            .env("OPENAI_BASE_URL", format!("http://127.0.0.1:{port}/v1"))
            .env("OPENAI_API_KEY", "openai-test-key")
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    let summary: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(summary["succeeded"], 1, "{summary:#}");
    let posted = posted.lock().unwrap().clone();
    assert_eq!(posted.len(), 1);
    assert_eq!(posted[0]["ticket_id"], 7);
    assert!(
        posted[0]["text"]
            .as_str()
            .unwrap()
            .contains("Write a reply to Ada about their billing ticket"),
        "{posted:?}"
    );
    let calls = log.lock().unwrap().clone();
    assert_eq!(calls.len(), 2, "classify and draft");
    assert_eq!(calls[0].1["authorization"], "Bearer openai-test-key");
}
