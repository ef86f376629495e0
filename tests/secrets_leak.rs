//! No secret value leaks: a server whose graphs use every kind of secret reference (`env:`,
//! `file:`, `exec:`) in every agent kind that takes one, run with trace-level JSON logs, and an
//! upstream that echoes the credentials it is sent in its error answers. Then every log line,
//! `/metrics`, the SQLite files and every gRPC answer are searched for the values.

mod common;

use std::time::{Duration, Instant};

use cascade_orchestrator::api::pb;

const BEARER: &str = "leak-bearer-Zq81e";
const FILED: &str = "leak-file-Yx72f";
const EXECED: &str = "leak-exec-Wv63g";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_secret_value_appears_anywhere() {
    // An upstream that answers /ok and echoes every credential it got in a 401 on /deny.
    let app = axum::Router::new()
        .route(
            "/ok",
            axum::routing::get(|| async { axum::Json(serde_json::json!({"ok": true})) }),
        )
        .route(
            "/deny",
            axum::routing::get(|headers: axum::http::HeaderMap| async move {
                let echo: Vec<String> = headers
                    .iter()
                    .map(|(k, v)| format!("{k}={}", v.to_str().unwrap_or("")))
                    .collect();
                (
                    axum::http::StatusCode::UNAUTHORIZED,
                    format!("refused: {}", echo.join(" ")),
                )
            }),
        );
    let up = common::serve_http(app).await;

    let secret_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(secret_file.path(), format!("{FILED}\n")).unwrap();
    // One graph per agent: a failed step cancels the rest of its job, and each must run.
    let agent =
        |name: &str, body: String| format!("[graph]\nname = \"{name}\"\n[agents.call]\n{body}\n");
    let graphs = [
        (
            "bearer",
            format!(
                "kind = \"http\"\nurl = \"http://127.0.0.1:{up}/ok\"\nauth = {{ bearer = \"env:CASCADE_LEAK_BEARER\" }}"
            ),
        ),
        (
            "apikey",
            format!(
                "kind = \"http\"\nurl = \"http://127.0.0.1:{up}/deny\"\nauth = {{ api_key = {{ header = \"X-API-Key\", value = \"file:{}\" }} }}",
                secret_file.path().display()
            ),
        ),
        (
            "basic",
            format!(
                "kind = \"http\"\nurl = \"http://127.0.0.1:{up}/deny\"\nauth = {{ basic = {{ username = \"svc\", password = \"exec:printf {EXECED}\" }} }}"
            ),
        ),
        (
            "cmd",
            format!(
                "kind = \"command\"\nprogram = \"sh\"\nargs = [\"-c\", \"echo \\\"token $TOKEN\\\" >&2; exit 3\"]\nenv = {{ TOKEN = \"exec:printf {EXECED}\" }}"
            ),
        ),
        (
            "denied",
            format!(
                "kind = \"http\"\nurl = \"http://127.0.0.1:{up}/deny\"\nauth = {{ bearer = \"env:CASCADE_LEAK_BEARER\" }}"
            ),
        ),
    ];
    let files: Vec<(String, String)> = graphs
        .iter()
        .map(|(name, body)| (format!("{name}.toml"), agent(name, body.clone())))
        .collect();
    let files: Vec<(&str, &str)> = files
        .iter()
        .map(|(f, t)| (f.as_str(), t.as_str()))
        .collect();
    let dir = common::server_dir(&files, "");
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
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let mut server = common::Server { child };
    let mut client = common::connect(grpc).await;

    let mut answers = Vec::new();
    for (name, _) in &graphs {
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
            assert!(Instant::now() < deadline, "{job:?}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let expected = if *name == "bearer" {
            pb::JobState::Succeeded
        } else {
            pb::JobState::Failed
        };
        assert_eq!(job.state, expected as i32, "{job:?}");
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
    let api = reqwest::get(format!("http://127.0.0.1:{http}/api/graphs"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    server.terminate();

    let all_answers = answers.join("\n");
    // The refusals were there to be leaked: the upstream echoed what it got, four times over.
    assert!(
        all_answers.matches("[redacted]").count() >= 4,
        "{all_answers}"
    );
    let mut places: Vec<(String, Vec<u8>)> = vec![
        ("gRPC answers".into(), all_answers.into_bytes()),
        ("/metrics".into(), metrics.into_bytes()),
        ("/api/graphs".into(), api.into_bytes()),
        (
            "server log".into(),
            std::fs::read(dir.path().join("server.log")).unwrap(),
        ),
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
        for secret in [BEARER, FILED, EXECED] {
            let hit = bytes.windows(secret.len()).any(|w| w == secret.as_bytes());
            assert!(!hit, "the secret {secret:?} appears in {place}");
        }
    }
}
