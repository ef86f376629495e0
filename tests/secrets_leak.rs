//! No secret value leaks: a server whose graphs use every kind of secret reference (`env:`,
//! `file:`, `exec:` and the `{ exec, ttl }` table) in every agent kind that takes one (`http`
//! with each auth form, OAuth2 included, `llm` with its key and a secret header, `command`), run
//! with trace-level JSON logs and OTLP export, and an upstream that echoes the credentials it
//! is sent in its error answers. Then every log line, every exported span, `/metrics`, the
//! SQLite files and every gRPC answer are searched for the values.

mod common;
#[path = "support/otlp_collector.rs"]
mod otlp_collector;

use std::time::{Duration, Instant};

use cascade_orchestrator::api::pb;

const BEARER: &str = "leak-bearer-Zq81e";
const FILED: &str = "leak-file-Yx72f";
const EXECED: &str = "leak-exec-Wv63g";
const LLM_KEY: &str = "leak-llm-key-Tu54h";
const ORG: &str = "leak-org-header-Sr45i";
const CLIENT_SECRET: &str = "leak-client-secret-Qp36j";
const ACCESS_TOKEN: &str = "leak-access-token-On27k";

/// Every header of a request, as `name=value` pairs: what a careless upstream echoes.
fn echo(headers: &axum::http::HeaderMap) -> String {
    headers
        .iter()
        .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_value_appears_anywhere() {
    // An upstream that answers /ok, refuses /deny with 401 and /refuse (and the LLM endpoint)
    // with 403, echoing every credential it got, and hands out an OAuth2 token at /token.
    let app = axum::Router::new()
        .route(
            "/ok",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"ok": true})) }),
        )
        .route(
            "/deny",
            axum::routing::get(|headers: axum::http::HeaderMap| async move {
                (
                    axum::http::StatusCode::UNAUTHORIZED,
                    format!("refused: {}", echo(&headers)),
                )
            }),
        )
        .route(
            "/refuse",
            axum::routing::get(|headers: axum::http::HeaderMap| async move {
                (
                    axum::http::StatusCode::FORBIDDEN,
                    format!("forbidden: {}", echo(&headers)),
                )
            }),
        )
        .route(
            "/v1/chat/completions",
            axum::routing::post(|headers: axum::http::HeaderMap| async move {
                (
                    axum::http::StatusCode::FORBIDDEN,
                    axum::Json(serde_json::json!({"error": {"message": format!("forbidden: {}", echo(&headers))}})),
                )
            }),
        )
        .route(
            "/token",
            axum::routing::post(|| async {
                axum::Json(serde_json::json!({
                    "access_token": ACCESS_TOKEN, "token_type": "Bearer", "expires_in": 3600
                }))
            }),
        );
    let up = common::serve_http(app).await;
    let collector = otlp_collector::Collector::default();
    let otlp = collector.start().await;

    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), format!("{FILED}\n")).unwrap();
    // One graph per agent: a failed step cancels the rest of its job, and each must run.
    let agent =
        |name: &str, body: String| format!("[graph]\nname = \"{name}\"\n[agents.call]\n{body}\n");
    // The graph and the state its job reaches: a refused fixed key (401) pauses its credential,
    // so that job waits (and is cancelled); a 403 fails with the upstream's (scrubbed) words.
    let graphs = [
        (
            "bearer",
            format!(
                "kind = \"http\"\nurl = \"http://127.0.0.1:{up}/ok\"\nauth = {{ bearer = \"env:CASCADE_LEAK_BEARER\" }}"
            ),
            pb::JobState::Succeeded,
        ),
        (
            "apikey",
            format!(
                "kind = \"http\"\nurl = \"http://127.0.0.1:{up}/refuse\"\nauth = {{ api_key = {{ header = \"X-API-Key\", value = \"file:{}\" }} }}",
                secret_file.path().display()
            ),
            pb::JobState::Failed,
        ),
        (
            "basic",
            format!(
                "kind = \"http\"\nurl = \"http://127.0.0.1:{up}/refuse\"\nauth = {{ basic = {{ username = \"svc\", password = \"exec:printf {EXECED}\" }} }}"
            ),
            pb::JobState::Failed,
        ),
        (
            "oauth",
            format!(
                "kind = \"http\"\nurl = \"http://127.0.0.1:{up}/refuse\"\nauth = {{ oauth2 = {{ token_url = \"http://127.0.0.1:{up}/token\", client_id = \"svc\", client_secret = \"env:CASCADE_LEAK_CLIENT_SECRET\" }} }}"
            ),
            pb::JobState::Failed,
        ),
        (
            "llm",
            format!(
                "kind = \"llm\"\nbase_url = \"http://127.0.0.1:{up}/v1\"\nmodel = \"gpt-4o-mini\"\nprompt = \"hi\"\n\
                 api_key = {{ exec = \"printf {LLM_KEY}\", ttl = \"10m\" }}\n\
                 headers = {{ X-Org = \"env:CASCADE_LEAK_ORG\" }}"
            ),
            pb::JobState::Failed,
        ),
        (
            "cmd",
            format!(
                "kind = \"command\"\nprogram = \"sh\"\nargs = [\"-c\", \"echo \\\"token $TOKEN\\\" >&2; exit 3\"]\nenv = {{ TOKEN = {{ exec = \"printf {EXECED}\", ttl = \"1m\" }} }}"
            ),
            pb::JobState::Failed,
        ),
        (
            "denied",
            format!(
                "kind = \"http\"\nurl = \"http://127.0.0.1:{up}/deny\"\nauth = {{ bearer = \"env:CASCADE_LEAK_BEARER\" }}"
            ),
            pb::JobState::Running,
        ),
    ];
    let files: Vec<(String, String)> = graphs
        .iter()
        .map(|(name, body, _)| (format!("{name}.toml"), agent(name, body.clone())))
        .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(f, t)| (f.as_str(), t.as_str()))
        .collect();
    let dir = common::server_dir(
        &files,
        &format!("[telemetry]\notlp_endpoint = \"http://127.0.0.1:{otlp}\"\n"),
    );
    let (grpc, http) = (common::free_port(), common::free_port());
    let log = std::fs::File::create(dir.path().join("server.log")).unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(["--log-format", "json", "serve", "--config"])
        .arg(dir.path().join("cascade.toml"))
        .arg("--data-dir")
        .arg(dir.path().join("data"))
        .args(["--grpc-addr", &format!("127.0.0.1:{grpc}")])
        .args(["--http-addr", &format!("127.0.0.1:{http}")])
        .env("RUST_LOG", "trace")
        .env("CASCADE_LEAK_BEARER", BEARER)
        .env("CASCADE_LEAK_CLIENT_SECRET", CLIENT_SECRET)
        .env("CASCADE_LEAK_ORG", ORG)
        // Spans leave when the server stops (the batch timer never fires).
        .env("OTEL_BSP_SCHEDULE_DELAY", "600000")
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server = common::Server { child };
    let mut client = common::connect(grpc).await;

    let mut answers = Vec::new();
    for (name, _, expected) in &graphs {
        let id = common::submit(&mut client, name, "{}").await;
        let deadline = Instant::now() + Duration::from_secs(60);
        let job = loop {
            let job = client
                .get_job(pb::GetJobRequest { job_id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            if job.state >= pb::JobState::Succeeded as i32 {
                break job;
            }
            if *expected == pb::JobState::Running {
                // Waiting on its credential: seen paused (GetGraph), then cancelled.
                let graph = client
                    .get_graph(pb::GetGraphRequest {
                        name: name.to_string(),
                    })
                    .await
                    .unwrap()
                    .into_inner();
                let paused = graph.agents.iter().any(|a| {
                    a.pause_causes
                        .iter()
                        .any(|c| c.quota == format!("credential:{name}.call"))
                });
                if paused {
                    answers.push(format!("{graph:?}"));
                    client
                        .cancel_job(pb::CancelJobRequest {
                            job_id: id.clone(),
                            reason: "the test is done".into(),
                        })
                        .await
                        .unwrap();
                    break job;
                }
            }
            assert!(Instant::now() < deadline, "{job:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_eq!(job.state, *expected as i32, "{job:?}");
        answers.push(format!("{job:?}"));
        let mut events = client
            .watch_job(pb::WatchJobRequest { job_id: id.clone() })
            .await
            .unwrap()
            .into_inner();
        while let Some(e) = events.message().await.unwrap() {
            answers.push(format!("{e:?}"));
        }
        answers.push(format!(
            "{:?}",
            client
                .get_graph(pb::GetGraphRequest {
                    name: name.to_string()
                })
                .await
                .unwrap()
                .into_inner()
        ));
    }
    answers.push(format!(
        "{:?}",
        client
            .list_jobs(pb::ListJobsRequest::default())
            .await
            .unwrap()
            .into_inner()
    ));
    let metrics = reqwest::get(format!("http://127.0.0.1:{http}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    // The refused key counts as a failure of its credential, the alert's metric.
    let failures = metrics
        .lines()
        .find(|l| {
            l.starts_with("cascade_credential_refresh_failures_total")
                && l.contains("credential=\"denied.call\"")
        })
        .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok());
    assert!(failures.is_some_and(|n| n >= 1.0), "{metrics}");
    let api = reqwest::get(format!("http://127.0.0.1:{http}/api/graphs"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    server.terminate();

    let all_answers = answers.join("\n");
    // The refusals were there to be leaked: the upstream echoed what it got, five times over.
    assert!(
        all_answers.matches("[redacted]").count() >= 5,
        "{all_answers}"
    );
    // Every exported span with its attributes and events, strings as they were sent.
    let spans = format!("{:?}", collector.exports.lock().unwrap());
    assert!(
        spans.contains("name: \"step\"") && spans.contains("name: \"job\""),
        "the spans were exported: {spans}"
    );
    let spans = spans.into_bytes();
    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("gRPC answers".into(), all_answers.into_bytes()),
        ("/metrics".into(), metrics.into_bytes()),
        ("/api/graphs".into(), api.into_bytes()),
        (
            "server log".into(),
            std::fs::read(dir.path().join("server.log")).unwrap(),
        ),
        ("exported spans".into(), spans),
    ];
    for entry in std::fs::read_dir(dir.path().join("data")).unwrap() {
        let p = entry.unwrap().path();
        places.push((p.display().to_string(), std::fs::read(&p).unwrap()));
    }
    let log = String::from_utf8_lossy(&places[3].1).into_owned();
    assert!(
        log.lines().count() > 20 && log.contains("TRACE"),
        "trace logging was on"
    );
    for (place, bytes) in &places {
        for secret in [
            BEARER,
            FILED,
            EXECED,
            LLM_KEY,
            ORG,
            CLIENT_SECRET,
            ACCESS_TOKEN,
        ] {
            let hit = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!hit, "the secret {secret:?} appears in {place}");
        }
    }
}
