//! End to end over 127.0.0.1: a real server (gRPC + HTTP, SQLite store in a temporary directory)
//! and the generated tonic client.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cascade_orchestrator::agents::sim;
use cascade_orchestrator::api::pb;
use cascade_orchestrator::api::pb::cascade_client::CascadeClient;
use cascade_orchestrator::secret::{SecretRef, sign_keyed, verify_keyed};
use cascade_orchestrator::server::{self, RunningServer, ServerOptions};
use cascade_orchestrator::store::{SqliteOptions, SqliteStore};
use cascade_orchestrator::{Orchestrator, config};
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

mod common;

const GRAPHS: &str = r#"
[graph]
name = "triage"
max_in_flight_jobs = 2
max_pending_jobs = 5
[agents.classify]
kind = "sim"
latency = "30ms"
upstream = "grpc-classify"
record_keys = true
[agents.reply]
kind = "template"
after = ["classify"]
output = { ticket = "{{ input.ticket }}", path = "{{= deps.classify.trace }}" }
"#;

struct Harness {
    _dir: tempfile::TempDir,
    orch: Arc<Orchestrator>,
    server: RunningServer,
    client: CascadeClient<Channel>,
}

async fn start() -> Harness {
    start_with(GRAPHS, ServerOptions::default()).await
}

async fn start_with(graphs: &str, mut options: ServerOptions) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let model = config::parse_graph_str("graphs.toml", graphs, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let store =
        Arc::new(SqliteStore::open(SqliteOptions::new(dir.path().join("cascade.db"))).unwrap());
    let orch = Arc::new(
        Orchestrator::builder(model)
            .store(store)
            .start()
            .await
            .unwrap(),
    );
    options.grpc_addr = "127.0.0.1:0".parse().unwrap();
    options.http_addr = "127.0.0.1:0".parse().unwrap();
    options.max_input_bytes = 4096;
    let server = server::start(orch.clone(), options).await.unwrap();
    let client = CascadeClient::connect(format!("http://{}", server.grpc_addr))
        .await
        .unwrap();
    Harness {
        _dir: dir,
        orch,
        server,
        client,
    }
}

impl Harness {
    async fn stop(self) {
        self.server.stop().await;
        self.orch.shutdown(Duration::from_secs(5)).await;
    }

    async fn submit(
        &mut self,
        input: &str,
        key: &str,
    ) -> Result<pb::SubmitJobResponse, tonic::Status> {
        self.client
            .submit_job(pb::SubmitJobRequest {
                graph: "triage".into(),
                input_json: input.into(),
                idempotency_key: key.into(),
                ..Default::default()
            })
            .await
            .map(|r| r.into_inner())
    }

    async fn watch(&mut self, id: &str) -> Vec<pb::JobEvent> {
        let mut s = self
            .client
            .watch_job(pb::WatchJobRequest { job_id: id.into() })
            .await
            .unwrap()
            .into_inner();
        let mut out = Vec::new();
        while let Some(e) = s.message().await.unwrap() {
            out.push(e);
        }
        out
    }
}

#[tokio::test]
async fn submit_get_watch_list_cancel() {
    let mut h = start().await;
    let id = h.submit(r#"{"ticket": 7}"#, "").await.unwrap().job_id;
    let events = h.watch(&id).await;
    let kinds: Vec<&str> = events.iter().map(|e| e.kind.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "submitted",
            "started",
            "step_started",
            "step_succeeded",
            "step_started",
            "step_succeeded",
            "finished"
        ]
    );
    assert_eq!(events.last().unwrap().state, pb::JobState::Succeeded as i32);
    let job = h
        .client
        .get_job(pb::GetJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(job.state, pb::JobState::Succeeded as i32);
    let out: serde_json::Value = serde_json::from_str(&job.output_json).unwrap();
    assert_eq!(
        out,
        serde_json::json!({"reply": {"ticket": "7", "path": ["classify"]}})
    );
    assert_eq!(job.steps.len(), 2);
    assert_eq!(job.steps[0].attempts, 1);

    // Labels filter the list; pages follow the token.
    for i in 0..3 {
        h.client
            .submit_job(pb::SubmitJobRequest {
                graph: "triage".into(),
                input_json: format!(r#"{{"ticket": {i}}}"#),
                labels: [("team".to_string(), "blue".to_string())].into(),
                ..Default::default()
            })
            .await
            .unwrap();
    }
    let page = h
        .client
        .list_jobs(pb::ListJobsRequest {
            graph: "triage".into(),
            label_selector: "team=blue".into(),
            page_size: 2,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.jobs.len(), 2);
    assert!(!page.next_page_token.is_empty());
    let rest = h
        .client
        .list_jobs(pb::ListJobsRequest {
            label_selector: "team=blue".into(),
            page_size: 2,
            page_token: page.next_page_token.clone(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(rest.jobs.len(), 1);
    assert!(rest.next_page_token.is_empty());
    // A state value the server does not know is refused, not read as "any state".
    let err = h
        .client
        .list_jobs(pb::ListJobsRequest {
            state: 42,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("42"), "{}", err.message());

    // Cancel a job that is still pending or running.
    let slow = common::submit(&mut h.client, "triage", "{}").await;
    let cancelled = h
        .client
        .cancel_job(pb::CancelJobRequest {
            job_id: slow.clone(),
            reason: "not needed".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cancelled.state, pb::JobState::Cancelled as i32);
    assert!(cancelled.error.contains("not needed"));
    h.stop().await;
}

#[tokio::test]
async fn a_late_watch_sees_every_event_in_order() {
    let mut h = start().await;
    let id = h.submit("{}", "").await.unwrap().job_id;
    // Join while the job runs, and once it is over.
    tokio::time::sleep(Duration::from_millis(10)).await;
    let during = h.watch(&id).await;
    let after = h.watch(&id).await;
    for events in [&during, &after] {
        let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, (1..=7).collect::<Vec<u64>>());
        assert_eq!(events.last().unwrap().kind, "finished");
    }
    h.stop().await;
}

#[tokio::test]
async fn idempotent_resubmission_returns_the_same_job_and_runs_it_once() {
    let mut h = start().await;
    let first = h.submit(r#"{"ticket": 1}"#, "order-42").await.unwrap();
    assert!(!first.deduplicated);
    let again = h.submit(r#"{"ticket": 1}"#, "order-42").await.unwrap();
    assert_eq!(
        (again.job_id.as_str(), again.deduplicated),
        (first.job_id.as_str(), true)
    );
    h.watch(&first.job_id).await;
    let again = h.submit(r#"{"ticket": 1}"#, "order-42").await.unwrap();
    assert_eq!(again.job_id, first.job_id);
    let keys = sim::upstream(h.orch.registry(), "grpc-classify").calls_by_key();
    assert_eq!(
        keys.get(&format!("{}/classify", first.job_id)),
        Some(&1),
        "ran once"
    );
    h.stop().await;
}

fn violation(status: &tonic::Status) -> (String, String) {
    let br = status.get_error_details();
    let v = &br
        .bad_request()
        .expect("BadRequest details")
        .field_violations[0];
    (v.field.clone(), v.description.clone())
}

#[tokio::test]
async fn errors_have_canonical_codes_and_details() {
    let mut h = start().await;
    let err = h
        .client
        .submit_job(pb::SubmitJobRequest {
            graph: "triag".into(),
            input_json: "{}".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    assert!(
        err.message().contains("did you mean \"triage\""),
        "{}",
        err.message()
    );

    let err = h.submit("{not json", "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    let (field, desc) = violation(&err);
    assert_eq!(field, "input_json");
    assert!(desc.contains("not valid JSON"), "{desc}");

    let big = format!(r#"{{"blob": "{}"}}"#, "x".repeat(5000));
    let err = h.submit(&big, "").await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violation(&err).0, "input_json");
    assert!(violation(&err).1.contains("over the limit of 4096 bytes"));

    let err = h
        .client
        .submit_job(pb::SubmitJobRequest {
            graph: "triage".into(),
            input_json: "{}".into(),
            deadline: Some(prost_types::Duration {
                seconds: -5,
                nanos: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violation(&err).0, "deadline");

    let err = h
        .client
        .submit_job(pb::SubmitJobRequest {
            graph: "triage".into(),
            input_json: "{}".into(),
            callback_url: "ftp://example.com/x".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(violation(&err).0, "callback_url");

    h.submit(r#"{"a": 1}"#, "k").await.unwrap();
    let err = h.submit(r#"{"a": 2}"#, "k").await.unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);

    let err = h
        .client
        .get_job(pb::GetJobRequest {
            job_id: "nope".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert_eq!(violation(&err).0, "job_id");
    let err = h
        .client
        .get_job(pb::GetJobRequest {
            job_id: "01a2242e-a356-7127-9eab-237794befbec".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);

    // Admission: 2 in flight, 5 pending; the next submissions are refused with a retry delay.
    let mut refused = None;
    for i in 0..20 {
        match h.submit(&format!(r#"{{"n": {i}}}"#), "").await {
            Ok(_) => {}
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let err = refused.expect("the backlog fills up");
    assert_eq!(err.code(), Code::ResourceExhausted);
    let delay = err
        .get_error_details()
        .retry_info()
        .and_then(|r| r.retry_delay)
        .expect("RetryInfo");
    assert!(
        delay >= Duration::from_millis(50) && delay <= Duration::from_secs(300),
        "{delay:?}"
    );

    let err = h
        .client
        .get_graph(pb::GetGraphRequest { name: "x".into() })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    h.stop().await;
}

#[tokio::test]
async fn health_reflection_and_graph_state_answer() {
    let mut h = start().await;
    let channel = Channel::from_shared(format!("http://{}", h.server.grpc_addr))
        .unwrap()
        .connect()
        .await
        .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "cascade.v1.Cascade".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        status.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1 as refl;
    let mut reflection = refl::server_reflection_client::ServerReflectionClient::new(channel);
    let request = refl::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(
            refl::server_reflection_request::MessageRequest::ListServices(String::new()),
        ),
    };
    let mut responses = reflection
        .server_reflection_info(futures::stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(refl::server_reflection_response::MessageResponse::ListServicesResponse(list)) =
        response.message_response
    else {
        panic!("unexpected reflection response");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"cascade.v1.Cascade".to_string()),
        "{names:?}"
    );

    let g = h
        .client
        .get_graph(pb::GetGraphRequest {
            name: "triage".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let agents: Vec<(&str, &str)> = g
        .agents
        .iter()
        .map(|a| (a.name.as_str(), a.kind.as_str()))
        .collect();
    assert_eq!(agents, [("classify", "sim"), ("reply", "template")]);
    assert_eq!(g.agents[1].after, ["classify"]);
    // classify names no quota: it draws on its upstream's implicit one, listed like any quota;
    // the template calls nothing outside the process.
    assert_eq!(g.agents[0].quotas, ["upstream:grpc-classify"]);
    assert!(g.agents[1].quotas.is_empty());
    let q = g
        .quotas
        .iter()
        .find(|q| q.name == "upstream:grpc-classify")
        .expect("implicit quota in GetGraph");
    assert!(q.implicit);
    assert_eq!(q.limits, "none learned yet");
    let list = h
        .client
        .list_graphs(pb::ListGraphsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(list.graphs.len(), 1);

    let http = reqwest::Client::new();
    let r = http
        .get(format!("http://{}/healthz", h.server.http_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = http
        .get(format!("http://{}/readyz", h.server.http_addr))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    h.stop().await;
}

/// A request the callback receiver got: its headers and body.
type Received = (HashMap<String, String>, Vec<u8>);

#[tokio::test]
async fn webhooks_must_be_signed_and_callbacks_are_signed() {
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join("secret");
    std::fs::write(&secret_file, "s3cret-for-tests\n").unwrap();
    let secret = SecretRef::File(secret_file).resolve().unwrap();

    // A callback receiver on loopback that records what it gets.
    let received: Arc<Mutex<Vec<Received>>> = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/done",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    let h = headers
                        .iter()
                        .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_string()))
                        .collect();
                    sink.lock().unwrap().push((h, body.to_vec()));
                    "ok"
                }
            },
        ),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let options = ServerOptions {
        webhook_secret: Some(secret.clone()),
        callback_secret: Some(secret.clone()),
        ..Default::default()
    };
    let mut h = start_with(GRAPHS, options).await;
    let http = reqwest::Client::new();
    let url = format!("http://{}/hooks/triage", h.server.http_addr);
    let body = br#"{"ticket": 99}"#.to_vec();

    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    // A request signed at `ts`, with an idempotency key.
    let signed = |ts: u64, key: &str| {
        http.post(&url)
            .header("x-cascade-timestamp", ts.to_string())
            .header(
                "x-cascade-signature",
                sign_keyed(&secret, ts, Some(key), &body),
            )
            .header("idempotency-key", key)
            .body(body.clone())
    };
    let r = http
        .post(&url)
        .header("x-cascade-timestamp", now.to_string())
        .header("x-cascade-signature", "v1=00")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "a bad signature is refused");
    let r = http.post(&url).body(body.clone()).send().await.unwrap();
    assert_eq!(r.status(), 401, "a missing signature is refused");
    assert!(r.text().await.unwrap().contains("X-Cascade-Timestamp"));
    // Signed, but ten minutes old: outside the window.
    let r = signed(now - 600, "hook-old").send().await.unwrap();
    assert_eq!(r.status(), 401, "a stale timestamp is refused");
    assert!(
        r.text()
            .await
            .unwrap()
            .contains("away from the server's clock")
    );

    let r = signed(now, "hook-1").send().await.unwrap();
    assert_eq!(r.status(), 202);
    let accepted: serde_json::Value = r.json().await.unwrap();
    let hook_job = accepted["job_id"].as_str().unwrap().to_string();
    let events = h.watch(&hook_job).await;
    assert_eq!(events.last().unwrap().state, pb::JobState::Succeeded as i32);
    // The captured request again: a replay, refused.
    let replay = signed(now, "hook-1").send().await.unwrap();
    assert_eq!(replay.status(), 409, "a replayed signature is refused");
    assert!(replay.text().await.unwrap().contains("replay"));
    // Its signature under another idempotency key: the key is signed, so this is a forgery.
    let moved = http
        .post(&url)
        .header("x-cascade-timestamp", now.to_string())
        .header(
            "x-cascade-signature",
            sign_keyed(&secret, now, Some("hook-1"), &body),
        )
        .header("idempotency-key", "hook-other")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    assert_eq!(
        moved.status(),
        401,
        "a key the signature does not cover is refused"
    );
    // The sender's retry, signed anew, is the same job by its key.
    let again = signed(now + 1, "hook-1").send().await.unwrap();
    let again: serde_json::Value = again.json().await.unwrap();
    assert_eq!(again["job_id"], accepted["job_id"]);
    assert_eq!(again["deduplicated"], true);

    // A job with a callback URL: its outcome arrives signed, and the delivery is recorded.
    let id = h
        .client
        .submit_job(pb::SubmitJobRequest {
            graph: "triage".into(),
            input_json: r#"{"ticket": 5}"#.into(),
            callback_url: format!("http://{receiver}/done"),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    h.watch(&id).await;
    let mut delivered = None;
    for _ in 0..100 {
        let job = h
            .client
            .get_job(pb::GetJobRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        if job.callback.as_ref().is_some_and(|c| c.delivered) {
            delivered = job.callback;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let delivered = delivered.expect("the callback was delivered and recorded");
    assert_eq!(delivered.attempts, 1);
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    let (headers, body) = &got[0];
    let signed_at: u64 = headers["x-cascade-timestamp"].parse().unwrap();
    assert!(signed_at.abs_diff(now) < 60, "signed now");
    assert!(
        verify_keyed(
            &secret,
            &headers["x-cascade-timestamp"],
            &headers["x-cascade-signature"],
            headers.get("idempotency-key").map(String::as_str),
            body,
            signed_at
        )
        .is_ok(),
        "the callback is signed"
    );
    let payload: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(payload["job_id"], id.as_str());
    assert_eq!(payload["state"], "succeeded");
    h.stop().await;
}

/// A job that finished just before the server stopped, with its callback never attempted, gets
/// its callback when the server starts again.
#[tokio::test]
async fn callbacks_left_from_before_a_restart_are_delivered() {
    use cascade_orchestrator::job::{JobId, JobState, JobUpdate};
    use cascade_orchestrator::store::{JobStore, NewJob};
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cascade.db");

    let received: Arc<Mutex<Vec<Vec<u8>>>> = Arc::default();
    let sink = received.clone();
    let app = axum::Router::new().route(
        "/done",
        axum::routing::post(move |body: axum::body::Bytes| {
            let sink = sink.clone();
            async move {
                sink.lock().unwrap().push(body.to_vec());
                "ok"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let receiver = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    // The previous life: a job finished, then the process stopped before its callback went out.
    let id = JobId::new();
    {
        let store = SqliteStore::open(SqliteOptions::new(&path)).unwrap();
        store
            .submit(NewJob {
                id,
                graph: "triage".into(),
                agents: vec!["classify".into(), "reply".into()].into(),
                input: Arc::new(serde_json::json!({"ticket": 1})),
                labels: Default::default(),
                idempotency_key: None,
                tenant: String::new(),
                max_pending: 10,
                tenant_max_pending: None,
                deadline: None,
                callback_url: Some(format!("http://{receiver}/done")),
                budget: None,
            })
            .await
            .unwrap();
        store.claim_pending("triage", 1).unwrap();
        store.update(id, JobUpdate::Started).unwrap();
        store
            .update(
                id,
                JobUpdate::Finished {
                    state: JobState::Succeeded,
                    output: Some(Arc::new(serde_json::json!({"ok": true}))),
                    error: None,
                },
            )
            .unwrap();
        store.flush().await.unwrap();
        assert_eq!(store.undelivered_callbacks(10).unwrap(), vec![id]);
    }

    let model = config::parse_graph_str("graphs.toml", GRAPHS, &Default::default()).unwrap();
    let store = Arc::new(SqliteStore::open(SqliteOptions::new(&path)).unwrap());
    let orch = Arc::new(
        Orchestrator::builder(model)
            .store(store.clone())
            .start()
            .await
            .unwrap(),
    );
    let options = ServerOptions {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let server = server::start(orch.clone(), options).await.unwrap();
    let mut delivered = false;
    for _ in 0..100 {
        if orch
            .get(id)
            .unwrap()
            .unwrap()
            .callback
            .is_some_and(|c| c.delivered)
        {
            delivered = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        delivered,
        "the left-over callback was delivered and recorded"
    );
    let got = received.lock().unwrap().clone();
    assert_eq!(got.len(), 1);
    let payload: serde_json::Value = serde_json::from_slice(&got[0]).unwrap();
    assert_eq!(payload["job_id"], id.to_string());
    store.flush().await.unwrap();
    assert!(
        store.undelivered_callbacks(10).unwrap().is_empty(),
        "not delivered twice"
    );
    server.stop().await;
    orch.shutdown(Duration::from_secs(1)).await;
}

/// `cascade top --once` against a real server shows the paused agents and why.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn top_shows_which_agent_is_paused_and_why() {
    let graphs = r#"
    [graph]
    name = "topped"
    [quotas.topped-llm]
    requests_per_second = 10
    [agents.classify]
    kind = "sim"
    quota = "topped-llm"
    [agents.reply]
    kind = "sim"
    after = ["classify"]
    [agents.audit]
    kind = "sim"
    "#;
    let h = start_with(graphs, ServerOptions::default()).await;
    h.orch
        .exhaust_quota("topped-llm", Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let addr = format!("http://{}", h.server.grpc_addr);
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
            .args(["--server", &addr, "top", "topped", "--once"])
            .output()
            .unwrap()
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let line = |agent: &str| {
        text.lines()
            .find(|l| l.trim_start().starts_with(agent))
            .unwrap_or_else(|| panic!("{text}"))
    };
    assert!(
        line("classify").contains("paused") && line("classify").contains("direct topped-llm"),
        "{text}"
    );
    assert!(
        line("reply").contains("paused") && line("reply").contains("upstream topped-llm"),
        "{text}"
    );
    assert!(line("audit").contains("idle"), "{text}");
    assert!(
        text.contains("EXHAUSTED (upstream rate limit (429))"),
        "{text}"
    );
    assert!(text.contains("paused agents 2"), "{text}");
    h.stop().await;
}

/// An open WatchJob stream on a job that runs for an hour does not hold the server's stop: the
/// stream ends with UNAVAILABLE (not as if the job's events were over).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_open_watch_stream_does_not_hold_the_shutdown() {
    let graphs = r#"
    [graph]
    name = "long"
    [agents.wait]
    kind = "sim"
    latency = "1h"
    "#;
    let mut h = start_with(graphs, ServerOptions::default()).await;
    let id = h
        .client
        .submit_job(pb::SubmitJobRequest {
            graph: "long".into(),
            input_json: "{}".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let mut events = h
        .client
        .watch_job(pb::WatchJobRequest { job_id: id })
        .await
        .unwrap()
        .into_inner();
    assert!(
        events.message().await.unwrap().is_some(),
        "the watch is live"
    );
    let watcher = tokio::spawn(async move {
        loop {
            match events.message().await {
                Ok(Some(_)) => continue,
                ended => return ended.map(|_| ()),
            }
        }
    });
    let stopped = tokio::time::timeout(server::STOP_GRACE * 3, h.server.stop()).await;
    assert!(stopped.is_ok(), "stop() waited on the open stream");
    let ended = tokio::time::timeout(Duration::from_secs(10), watcher)
        .await
        .expect("the watcher's stream did not end with the server")
        .unwrap();
    let status = ended.expect_err("a stop is not a clean end of the job's events");
    assert_eq!(status.code(), Code::Unavailable, "{status:?}");
    h.orch.shutdown(Duration::ZERO).await;
}

/// What a caller sent comes back cut in an error (a 4 KB job id, a 64 KB graph name would push
/// the status past a client's 8 KiB metadata limit, and the caller would read "Stream removed"
/// instead of the error), and a callback URL's credentials are never shown.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn errors_quote_the_callers_text_cut_and_callback_credentials_stay_hidden() {
    let mut h = start().await;
    let err = h
        .client
        .get_job(pb::GetJobRequest {
            job_id: "j".repeat(4096),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{err:?}");
    assert!(err.message().len() < 512, "{} bytes", err.message().len());
    assert!(err.message().contains("(4096 bytes)"), "{}", err.message());
    for err in [
        h.client
            .submit_job(pb::SubmitJobRequest {
                graph: "g".repeat(65_536),
                input_json: "{}".into(),
                ..Default::default()
            })
            .await
            .unwrap_err(),
        h.client
            .get_graph(pb::GetGraphRequest {
                name: "g".repeat(65_536),
            })
            .await
            .unwrap_err(),
        h.client
            .get_approval(pb::GetApprovalRequest {
                approval_id: "a".repeat(10_000),
            })
            .await
            .unwrap_err(),
    ] {
        assert!(
            matches!(err.code(), Code::NotFound | Code::InvalidArgument),
            "{err:?}"
        );
        assert!(err.message().len() < 512, "{} bytes", err.message().len());
    }
    let id = h
        .client
        .submit_job(pb::SubmitJobRequest {
            graph: "triage".into(),
            input_json: r#"{"ticket": 1}"#.into(),
            callback_url: "http://ops:hunter2@127.0.0.1:9/done".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id;
    let job = h
        .client
        .get_job(pb::GetJobRequest { job_id: id })
        .await
        .unwrap()
        .into_inner();
    let url = job.callback.unwrap().url;
    assert_eq!(url, "http://***@127.0.0.1:9/done");
}

/// A request over the server's message limit is RESOURCE_EXHAUSTED (what gRPC clients expect of
/// a limit), not OUT_OF_RANGE; one over `max_input_bytes` but within the limit names the field.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversize_message_is_resource_exhausted() {
    let mut h = start().await;
    let huge = format!(r#"{{"blob": "{}"}}"#, "x".repeat(5 << 20));
    let err = h.submit(&huge, "").await.unwrap_err();
    assert_eq!(err.code(), Code::ResourceExhausted, "{err:?}");
    assert!(err.message().contains("too large"), "{}", err.message());
    // The server goes on.
    h.submit(r#"{"ticket": 1}"#, "").await.unwrap();
}
