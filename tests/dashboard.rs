//! The live dashboard in a real browser: headless Chromium (Debian's package) loads the page
//! from a real server; a quota exhaustion must show exactly the expected nodes paused, and later
//! resumed, in the page's DOM. A screenshot is kept as a test artifact.

use std::process::Command;
use std::time::{Duration, Instant};

use cascade_orchestrator::config;

mod common;

const GRAPH: &str = r#"
[graph]
name = "watched"
[quotas.watched-llm]
requests_per_second = 10
[agents.classify]
kind = "sim"
quota = "watched-llm"
[agents.draft]
kind = "sim"
after = ["classify"]
on_upstream_pause = "stop"
[agents.audit]
kind = "sim"
"#;

fn chromium(args: &[&str], url: &str) -> String {
    let profile = tempfile::tempdir().unwrap();
    let out = Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,900",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .arg(url)
        .output()
        .expect("Debian's chromium is installed (apt-get install chromium)");
    assert!(
        out.status.success(),
        "chromium failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Agent name → the state the page shows for it.
fn agent_states(dom: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    // Rendered nodes only (the page's script holds the same attribute names in a template).
    for part in dom.split("<g class=\"node agent state-").skip(1) {
        let part = part.split("data-agent=\"").nth(1).unwrap_or_default();
        let name = part.split('"').next().unwrap().to_string();
        let state = part
            .split("data-state=\"")
            .nth(1)
            .and_then(|s| s.split('"').next())
            .unwrap_or("")
            .to_string();
        // The script's template literal is not a rendered node.
        if !name.contains("${") {
            out.push((name, state));
        }
    }
    out.sort();
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's chromium package: .ci/run installs it and runs this test"]
async fn the_dashboard_shows_exactly_the_paused_nodes_then_their_resume() {
    let model = config::parse_graph_str("watched.toml", GRAPH, &Default::default()).unwrap();
    let (orch, server) = common::serve_in_process(model).await;
    let url = format!("http://{}/", server.http_addr);

    let pause = Duration::from_secs(12);
    assert!(orch.exhaust_quota("watched-llm", pause).await);
    let started = Instant::now();
    let u = url.clone();
    let dom = tokio::task::spawn_blocking(move || chromium(&["--dump-dom"], &u))
        .await
        .unwrap();
    assert!(
        started.elapsed() < pause,
        "the page was read while the pause lasted"
    );
    assert_eq!(
        agent_states(&dom),
        [
            ("audit".to_string(), "idle".to_string()),
            ("classify".to_string(), "paused".to_string()),
            ("draft".to_string(), "paused".to_string()),
        ],
        "page:\n{dom}"
    );
    assert!(
        dom.contains("data-quota=\"watched-llm\" data-state=\"exhausted\""),
        "the quota shows exhausted"
    );
    assert!(
        dom.contains("paused: watched-llm"),
        "the cause is named on the node"
    );

    let artifact = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("dashboard-paused.png");
    let shot = format!("--screenshot={}", artifact.display());
    let u = url.clone();
    tokio::task::spawn_blocking(move || chromium(&[&shot], &u))
        .await
        .unwrap();
    assert!(
        std::fs::metadata(&artifact).unwrap().len() > 10_000,
        "a real screenshot at {}",
        artifact.display()
    );
    eprintln!("screenshot: {}", artifact.display());

    // After the pause, the same page shows everything resumed.
    while orch.paused_agents("watched") > 0 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let u = url.clone();
    let dom = tokio::task::spawn_blocking(move || chromium(&["--dump-dom"], &u))
        .await
        .unwrap();
    let states = agent_states(&dom);
    assert_eq!(states.len(), 3);
    assert!(states.iter().all(|(_, s)| s == "idle"), "{states:?}");
    server.stop().await;
    orch.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's chromium package: .ci/run installs it and runs this test"]
async fn the_dashboard_draws_a_hundred_agents_quickly() {
    let mut toml =
        String::from("[graph]\nname = \"wide\"\n[quotas.wide-q]\nrequests_per_second = 100\n");
    for i in 0..100 {
        toml += &format!("[agents.a{i}]\nkind = \"sim\"\n");
        match i {
            0..10 => toml += "quota = \"wide-q\"\n",
            _ => toml += &format!("after = [\"a{}\", \"a{}\"]\n", i / 2, i - 1),
        }
    }
    let model = config::parse_graph_str("wide.toml", &toml, &Default::default()).unwrap();
    let (orch, server) = common::serve_in_process(model).await;
    orch.exhaust_quota("wide-q", Duration::from_secs(30)).await;
    let url = format!("http://{}/", server.http_addr);
    let dom = tokio::task::spawn_blocking(move || chromium(&["--dump-dom"], &url))
        .await
        .unwrap();
    let states = agent_states(&dom);
    assert_eq!(states.len(), 100, "every agent is drawn");
    // The quota reaches every agent (the first ten directly, the rest downstream).
    assert!(states.iter().all(|(_, s)| s == "paused"), "{states:?}");
    let ms: f64 = dom
        .split("data-render-ms=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|v| v.parse().ok())
        .expect("the page reports its render time");
    // A frame is rebuilt every second; it must take a small part of that.
    assert!(ms < 250.0, "a frame of 100 agents took {ms} ms");
    eprintln!("100 agents drawn in {ms} ms");
    server.stop().await;
    orch.shutdown(Duration::from_millis(10)).await;
}
