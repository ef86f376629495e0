//! Reloading the graphs of a running `cascade serve` (SQLite store): `cascade graph reload` (the
//! ReloadGraphs RPC, admin only) and SIGHUP. Files with errors are refused with their file, line
//! and column, and the running graphs stay; valid files are served after an in-place restart
//! (same process id), and a job that was running when the reload came finishes.

mod common;

use std::time::{Duration, Instant};

use cascade_orchestrator::api::pb;
use cascade_orchestrator::auth;

const SLOW: &str = "[graph]\nname = \"slow\"\n[agents.wait]\nkind = \"sim\"\nlatency = \"2s\"\n";

fn cli(args: &[&str], grpc: u16, token: &str) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(args)
        .args(["--server", &format!("http://127.0.0.1:{grpc}")])
        .env("CASCADE_TOKEN", token)
        .output()
        .unwrap()
}

/// The graphs the server lists now, once it answers (30 s at most).
async fn graphs(grpc: u16, token: &str) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let mut c = common::connect(grpc).await;
            let mut req = tonic::Request::new(pb::ListGraphsRequest {});
            req.metadata_mut()
                .insert("authorization", format!("Bearer {token}").parse().unwrap());
            c.list_graphs(req).await
        };
        if let Ok(Ok(r)) = tokio::time::timeout(Duration::from_secs(5), attempt).await {
            let mut names: Vec<String> =
                r.into_inner().graphs.into_iter().map(|g| g.name).collect();
            names.sort();
            return names;
        }
        assert!(Instant::now() < deadline, "the server did not answer");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// `graphs` (sorted) served within 30 s.
async fn until_serving(grpc: u16, token: &str, want: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while graphs(grpc, token).await != want {
        assert!(Instant::now() < deadline, "never served {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn graphs_reload_on_request_and_on_sighup_and_bad_files_keep_the_running_ones() {
    let (admin, reader) = (auth::generate_key(), auth::generate_key());
    let dir = common::server_dir(
        &[("slow.toml", SLOW)],
        &format!(
            "[[auth.api_keys]]\nname = \"ops\"\ntenant = \"internal\"\nroles = [\"admin\"]\nhash = \"{}\"\n\n\
             [[auth.api_keys]]\nname = \"viewer\"\ntenant = \"acme\"\nroles = [\"read\"]\nhash = \"{}\"\n",
            auth::sha256_hash(&admin),
            auth::sha256_hash(&reader)
        ),
    );
    let d = dir.path();
    let (grpc, http) = (common::free_port(), common::free_port());
    let mut server = common::spawn(d, grpc, http);
    let pid = server.child.id();
    assert_eq!(graphs(grpc, &admin).await, ["slow"]);

    // A job that is still running when the reload comes.
    let mut c = common::connect(grpc).await;
    let mut req = tonic::Request::new(pb::SubmitJobRequest {
        graph: "slow".into(),
        input_json: "{}".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", format!("Bearer {admin}").parse().unwrap());
    let job = c.submit_job(req).await.unwrap().into_inner().job_id;

    // Not an administrator: refused, naming the role.
    let out = cli(&["graph", "reload"], grpc, &reader);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("admin"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // A file with an error: refused where it is, and the running graph stays.
    let bad = d.join("graphs").join("broken.toml");
    std::fs::write(
        &bad,
        "[graph]\nname = \"broken\"\n[agents.a]\nkind = \"sim\"\nafter = [\"nobody\"]\n",
    )
    .unwrap();
    let out = cli(&["graph", "reload"], grpc, &admin);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("broken.toml:5:"), "{err}");
    assert!(err.contains("running graphs stay"), "{err}");
    assert_eq!(graphs(grpc, &admin).await, ["slow"]);

    // Mended, and a second graph: served after the in-place restart.
    std::fs::write(
        &bad,
        "[graph]\nname = \"broken\"\n[agents.a]\nkind = \"sim\"\n",
    )
    .unwrap();

    // But a secret that does not resolve would stop the new server at its start: refused now.
    let server_file = d.join("cascade.toml");
    let original = std::fs::read_to_string(&server_file).unwrap();
    std::fs::write(
        &server_file,
        format!("{original}\n[server]\nwebhook_secret = \"env:CASCADE_RELOAD_TEST_UNSET\"\n"),
    )
    .unwrap();
    let out = cli(&["graph", "reload"], grpc, &admin);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("CASCADE_RELOAD_TEST_UNSET"), "{err}");
    std::fs::write(&server_file, original).unwrap();

    assert_eq!(graphs(grpc, &admin).await, ["slow"]);

    let out = cli(&["graph", "reload"], grpc, &admin);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("broken, slow"));
    until_serving(grpc, &admin, &["broken", "slow"]).await;
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the same process serves on"
    );
    assert_eq!(server.child.id(), pid);

    // The job that was running finished (in the grace, or resumed from the store).
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let mut c = common::connect(grpc).await;
        let mut req = tonic::Request::new(pb::GetJobRequest {
            job_id: job.clone(),
        });
        req.metadata_mut()
            .insert("authorization", format!("Bearer {admin}").parse().unwrap());
        let state = c.get_job(req).await.unwrap().into_inner().state;
        if state == pb::JobState::Succeeded as i32 {
            break;
        }
        assert!(Instant::now() < deadline, "the job never finished: {state}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // SIGHUP: a bad file is logged and refused; a good one is served.
    let third = d.join("graphs").join("third.toml");
    std::fs::write(
        &third,
        "[graph]\nname = \"third\"\n[agents.a]\nkind = \"nope\"\n",
    )
    .unwrap();
    let hup = || {
        assert!(
            std::process::Command::new("kill")
                .args(["-HUP", &pid.to_string()])
                .status()
                .unwrap()
                .success()
        );
    };
    hup();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let log = std::fs::read_to_string(d.join("server.log")).unwrap();
        if log.contains("SIGHUP: reload refused") {
            assert!(log.contains("third.toml:4:"), "{log}");
            break;
        }
        assert!(Instant::now() < deadline, "no refusal logged: {log}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(graphs(grpc, &admin).await, ["broken", "slow"]);
    std::fs::write(
        &third,
        "[graph]\nname = \"third\"\n[agents.a]\nkind = \"sim\"\n",
    )
    .unwrap();
    hup();
    until_serving(grpc, &admin, &["broken", "slow", "third"]).await;
    assert_eq!(server.child.id(), pid);
    let status = server.terminate();
    assert!(status.success(), "{status:?}");
}
