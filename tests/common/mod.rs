//! Helpers shared by the end-to-end tests.

// Every test binary compiles this module on its own and uses only some of it.
#![allow(dead_code)]

use cascade_orchestrator::{Orchestrator, config};

/// Simulated panics are expected in tests; keep them out of the test output.
pub fn quiet_simulated_panics() {
    cascade_orchestrator::agents::sim::quiet_simulated_panics();
}

/// An orchestrator running the graph in `toml` (panics with the config errors if it is bad).
pub async fn start(toml: &str) -> Orchestrator {
    let model = config::parse_graph_str("test.toml", toml, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    Orchestrator::builder(model).start().await.unwrap()
}

/// An orchestrator running every graph in `tomls` (each a graph file's text).
pub async fn start_many(tomls: &[String]) -> Orchestrator {
    let mut model = cascade_orchestrator::model::ServerModel::default();
    for t in tomls {
        let m = config::parse_graph_str("test.toml", t, &Default::default())
            .unwrap_or_else(|e| panic!("{e}"));
        model.graphs.extend(m.graphs);
        model.quotas.extend(m.quotas);
    }
    Orchestrator::builder(model).start().await.unwrap()
}

/// Submit one job of `graph` and wait (30 s at most) until it ends.
pub async fn run_one(
    orch: &Orchestrator,
    graph: &str,
    input: serde_json::Value,
) -> cascade_orchestrator::job::JobRecord {
    let id = orch
        .submit(cascade_orchestrator::SubmitRequest::new(graph, input))
        .await
        .unwrap()
        .id;
    tokio::time::timeout(std::time::Duration::from_secs(30), orch.wait(id))
        .await
        .expect("the job ends")
        .unwrap()
}

/// Wait until `ready` holds, looking every 20 ms; panics after `limit`.
pub async fn wait_until(limit: std::time::Duration, mut ready: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !ready() {
        assert!(
            std::time::Instant::now() < deadline,
            "not ready within {limit:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// Wait (10 s at most) until `agent` of `graph` is paused with `quota` among its causes.
pub async fn wait_paused_on(orch: &Orchestrator, graph: &str, agent: &str, quota: &str) {
    use cascade_orchestrator::signal::CauseKey;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let pauses = orch.pauses(graph).await.unwrap();
        let pause = pauses
            .iter()
            .find(|(a, _)| &**a == agent)
            .and_then(|(_, p)| p.clone());
        if pause.as_ref().is_some_and(|p| {
            p.causes
                .iter()
                .any(|(k, _)| matches!(k, CauseKey::Quota { quota: q } if &**q == quota))
        }) {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{agent} is not paused on {quota}: {pause:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// The quota called `name` as the orchestrator's broker sees it now (panics if it is not listed).
pub async fn quota(orch: &Orchestrator, name: &str) -> cascade_orchestrator::quota::QuotaSnapshot {
    orch.quotas()
        .await
        .into_iter()
        .find(|q| q.name == name)
        .unwrap_or_else(|| panic!("quota {name:?} is not listed"))
}

/// Serve `app` on a free port of 127.0.0.1 for the rest of the test; the port.
pub async fn serve_http(app: axum::Router) -> u16 {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    port
}

/// A port free on 127.0.0.1 at the time of asking, below the kernel's ephemeral range
/// (32768 and up): a port the kernel handed out could be taken by one of the machine's own
/// outgoing connections before the server binds it, and the server would not come up.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919)
        ^ std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
    for _ in 0..1000 {
        let n = seed.wrapping_add(NEXT.fetch_add(7, Ordering::Relaxed));
        let port = 20_000 + (n % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port between 20000 and 32000 on 127.0.0.1")
}

/// A `cascade serve` process, killed when dropped.
pub struct Server {
    pub child: std::process::Child,
}

impl Server {
    /// SIGTERM, as an orchestrator's stop would send, and wait for the exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM failed");
        self.child.wait().unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The real binary serving `dir/cascade.toml` with its store in `dir/data`; stderr is appended to
/// `dir/server.log`.
pub fn spawn(dir: &std::path::Path, grpc: u16, http: u16) -> Server {
    spawn_with_env(dir, grpc, http, &[])
}

/// [`spawn`], with environment variables for the server.
pub fn spawn_with_env(dir: &std::path::Path, grpc: u16, http: u16, env: &[(&str, &str)]) -> Server {
    spawn_store(dir, grpc, http, env, true)
}

/// The real binary serving `dir/cascade.toml` on the store its `[server] store` names (no
/// `--data-dir`, which would override it).
pub fn spawn_configured_store(dir: &std::path::Path, grpc: u16, http: u16) -> Server {
    spawn_store(dir, grpc, http, &[], false)
}

fn spawn_store(
    dir: &std::path::Path,
    grpc: u16,
    http: u16,
    env: &[(&str, &str)],
    data_dir: bool,
) -> Server {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("server.log"))
        .unwrap();
    let child = std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(["serve", "--config"])
        .arg(dir.join("cascade.toml"))
        .args(
            data_dir
                .then(|| ["--data-dir".into(), dir.join("data").into_os_string()])
                .into_iter()
                .flatten(),
        )
        .args([
            "--grpc-addr",
            &format!("127.0.0.1:{grpc}"),
            "--http-addr",
            &format!("127.0.0.1:{http}"),
        ])
        .envs(env.iter().copied())
        .stdout(std::process::Stdio::null())
        .stderr(log)
        .spawn()
        .expect("the cascade binary starts");
    Server { child }
}

/// A gRPC client, once the server accepts connections (30 s at most).
pub async fn connect(
    grpc: u16,
) -> cascade_orchestrator::api::pb::cascade_client::CascadeClient<tonic::transport::Channel> {
    use cascade_orchestrator::api::pb::cascade_client::CascadeClient;
    use std::time::{Duration, Instant};
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match CascadeClient::connect(format!("http://127.0.0.1:{grpc}")).await {
            Ok(c) => return c,
            Err(e) if Instant::now() > deadline => panic!("the server did not come up: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

/// A server's directory: each `(file, text)` under `graphs/`, and a `cascade.toml` listing that
/// directory followed by `config`.
pub fn server_dir(graphs: &[(&str, &str)], config: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("graphs")).unwrap();
    for (file, text) in graphs {
        std::fs::write(dir.path().join("graphs").join(file), text).unwrap();
    }
    std::fs::write(
        dir.path().join("cascade.toml"),
        format!("graphs = [\"graphs\"]\n{config}"),
    )
    .unwrap();
    dir
}

/// Submit a job of `graph` with `input_json`; its id.
pub async fn submit(
    client: &mut cascade_orchestrator::api::pb::cascade_client::CascadeClient<
        tonic::transport::Channel,
    >,
    graph: &str,
    input_json: &str,
) -> String {
    client
        .submit_job(cascade_orchestrator::api::pb::SubmitJobRequest {
            graph: graph.into(),
            input_json: input_json.into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .job_id
}

/// The gRPC and HTTP server in this process, on free ports of 127.0.0.1, over an orchestrator of
/// `model` with the in-memory store.
pub async fn serve_in_process(
    model: cascade_orchestrator::model::ServerModel,
) -> (
    std::sync::Arc<Orchestrator>,
    cascade_orchestrator::server::RunningServer,
) {
    let orch = std::sync::Arc::new(Orchestrator::builder(model).start().await.unwrap());
    let options = cascade_orchestrator::server::ServerOptions {
        grpc_addr: "127.0.0.1:0".parse().unwrap(),
        http_addr: "127.0.0.1:0".parse().unwrap(),
        ..Default::default()
    };
    let server = cascade_orchestrator::server::start(orch.clone(), options)
        .await
        .unwrap();
    (orch, server)
}

/// Approve approval `id` as `who`, bound to the hash it has now, and wait (30 s at most) until
/// its job ends.
pub async fn approve_and_wait(
    orch: &Orchestrator,
    id: &str,
    who: &str,
) -> cascade_orchestrator::job::JobRecord {
    let v = orch.approval(id).unwrap();
    orch.resolve_approval(&v.approval.id, &v.approval.sha256, true, who, "")
        .await
        .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(30), orch.wait(v.job_id))
        .await
        .expect("the approved job ends")
        .unwrap()
}
