//! Operators' view: `/metrics` after a run holds every family, in valid Prometheus text, and a
//! real Prometheus server scraping a real Cascade server sees a quota exhaustion in the
//! paused-agent series.

use std::collections::{BTreeMap, BTreeSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cascade_orchestrator::server::RunningServer;
use cascade_orchestrator::{Orchestrator, SubmitRequest, config};
use serde_json::json;

mod common;

const GRAPHS: &str = r#"
[graph]
name = "observed"
[quotas.llm]
requests_per_second = 50
tokens_per_minute = 100000
circuit_breaker = { failure_ratio = 0.9, min_calls = 100, window = "10s", open_for = "1s" }
[agents.classify]
kind = "sim"
quota = "llm"
latency = "2ms"
usage = { prompt_tokens = 20, completion_tokens = 5 }
cost_per_1k_tokens = 1.0
transient_failure_rate = 0.2
retry = { max_attempts = 10, initial_delay = "1ms", max_delay = "2ms" }
[agents.draft]
kind = "sim"
after = ["classify"]
latency = "2ms"
[agents.audit]
kind = "sim"
latency = "1ms"
"#;

/// The graph under its own name: tests share the process's metrics recorder.
async fn start(name: &str) -> (Arc<Orchestrator>, RunningServer) {
    let text = GRAPHS
        .replace("name = \"observed\"", &format!("name = \"{name}\""))
        .replace("llm", &format!("{name}-llm"));
    let model = config::parse_graph_str("observed.toml", &text, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    common::serve_in_process(model).await
}

/// A tiny Prometheus text parser: families with their TYPE, and samples by name and labels.
struct Scrape {
    types: BTreeMap<String, String>,
    samples: Vec<(String, BTreeMap<String, String>, f64)>,
}

fn parse(text: &str) -> Scrape {
    let mut types = BTreeMap::new();
    let mut samples = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut it = rest.split_whitespace();
            types.insert(
                it.next().unwrap().to_string(),
                it.next().unwrap().to_string(),
            );
            continue;
        }
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let (series, value) = line
            .rsplit_once(' ')
            .unwrap_or_else(|| panic!("bad sample line {line:?}"));
        let value: f64 = value
            .parse()
            .unwrap_or_else(|_| panic!("bad value in {line:?}"));
        let (name, labels) = match series.split_once('{') {
            None => (series.to_string(), BTreeMap::new()),
            Some((n, l)) => {
                let l = l
                    .strip_suffix('}')
                    .unwrap_or_else(|| panic!("unclosed labels in {line:?}"));
                let labels = l
                    .split("\",")
                    .filter(|p| !p.is_empty())
                    .map(|p| {
                        let (k, v) = p
                            .split_once("=\"")
                            .unwrap_or_else(|| panic!("bad label {p:?} in {line:?}"));
                        (k.to_string(), v.trim_end_matches('"').to_string())
                    })
                    .collect();
                (n.to_string(), labels)
            }
        };
        samples.push((name, labels, value));
    }
    Scrape { types, samples }
}

impl Scrape {
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.samples
            .iter()
            .find(|(n, l, _)| {
                n == name
                    && labels
                        .iter()
                        .all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v))
            })
            .map(|(_, _, v)| *v)
    }
}

async fn scrape(server: &RunningServer) -> String {
    reqwest::get(format!("http://{}/metrics", server.http_addr))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_hold_every_family_after_a_run() {
    let (orch, server) = start("observed").await;
    let mut ids = Vec::new();
    for i in 0..60 {
        ids.push(
            orch.submit(SubmitRequest::new("observed", json!({"n": i})))
                .await
                .unwrap()
                .id,
        );
    }
    for id in ids {
        orch.wait(id).await.unwrap();
    }
    orch.exhaust_quota("observed-llm", Duration::from_secs(30))
        .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    let text = scrape(&server).await;
    let s = parse(&text);
    let expect_type = [
        ("cascade_jobs_submitted_total", "counter"),
        ("cascade_jobs_finished_total", "counter"),
        ("cascade_job_duration_seconds", "histogram"),
        ("cascade_step_duration_seconds", "histogram"),
        ("cascade_jobs_in_flight", "gauge"),
        ("cascade_jobs_pending", "gauge"),
        ("cascade_agent_queue_depth", "gauge"),
        ("cascade_agent_in_flight", "gauge"),
        ("cascade_agent_calls_total", "counter"),
        ("cascade_agent_retries_total", "counter"),
        ("cascade_agent_restarts_total", "counter"),
        ("cascade_agent_paused", "gauge"),
        ("cascade_agent_pause_cause", "gauge"),
        ("cascade_agent_failed", "gauge"),
        ("cascade_quota_requests_total", "counter"),
        ("cascade_quota_tokens_total", "counter"),
        ("cascade_quota_requests_available", "gauge"),
        ("cascade_quota_tokens_window_used", "gauge"),
        ("cascade_quota_tokens_window_limit", "gauge"),
        ("cascade_quota_exhausted", "gauge"),
        ("cascade_quota_exhaustions_total", "counter"),
        ("cascade_quota_upstream_refusals_total", "counter"),
        ("cascade_quota_circuit_state", "gauge"),
        ("cascade_graph_cost_usd", "gauge"),
    ];
    for (family, kind) in expect_type {
        assert_eq!(
            s.types.get(family).map(String::as_str),
            Some(kind),
            "family {family} in:\n{text}"
        );
    }
    let g = ("graph", "observed");
    assert_eq!(s.value("cascade_jobs_submitted_total", &[g]), Some(60.0));
    assert_eq!(
        s.value(
            "cascade_jobs_finished_total",
            &[g, ("outcome", "succeeded")]
        ),
        Some(60.0)
    );
    assert_eq!(
        s.value(
            "cascade_job_duration_seconds_count",
            &[g, ("outcome", "succeeded")]
        ),
        Some(60.0)
    );
    assert!(
        s.value(
            "cascade_agent_calls_total",
            &[g, ("agent", "classify"), ("outcome", "transient")]
        )
        .unwrap()
            > 0.0
    );
    assert!(
        s.value("cascade_agent_retries_total", &[g, ("agent", "classify")])
            .unwrap()
            > 0.0
    );
    assert_eq!(
        s.value(
            "cascade_quota_tokens_total",
            &[("quota", "observed-llm"), ("kind", "prompt")]
        ),
        Some(1200.0)
    );
    assert!(s.value("cascade_graph_cost_usd", &[g]).unwrap() > 1.4);
    // The exhaustion shows: the quota, the agents it reaches, and no other.
    assert_eq!(
        s.value("cascade_quota_exhausted", &[("quota", "observed-llm")]),
        Some(1.0)
    );
    assert_eq!(
        s.value("cascade_agent_paused", &[g, ("agent", "classify")]),
        Some(1.0)
    );
    assert_eq!(
        s.value("cascade_agent_paused", &[g, ("agent", "draft")]),
        Some(1.0)
    );
    assert_eq!(
        s.value("cascade_agent_paused", &[g, ("agent", "audit")]),
        Some(0.0)
    );
    assert_eq!(
        s.value(
            "cascade_agent_pause_cause",
            &[g, ("agent", "draft"), ("cause", "observed-llm")]
        ),
        Some(1.0)
    );
    // No job id ever becomes a label.
    let labels: BTreeSet<&str> = s
        .samples
        .iter()
        .flat_map(|(_, l, _)| l.keys().map(String::as_str))
        .collect();
    for l in &labels {
        assert!(
            ["graph", "agent", "quota", "outcome", "cause", "kind", "listener", "le"].contains(l),
            "unbounded label {l}"
        );
    }
    server.stop().await;
    orch.shutdown(Duration::from_secs(1)).await;
}

struct Prometheus(Child);

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's prometheus package: .ci/run installs it and runs this test"]
async fn a_real_prometheus_sees_the_pause() {
    let (orch, server) = start("scraped").await;
    let dir = tempfile::tempdir().unwrap();
    let prom_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 200ms\nscrape_configs:\n  - job_name: cascade\n    scrape_interval: 200ms\n    static_configs:\n      - targets: ['{}']\n",
            server.http_addr
        ),
    )
    .unwrap();
    let _prom = Prometheus(
        Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.path().join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{prom_port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("Debian's prometheus is installed (apt-get install prometheus)"),
    );
    orch.submit(SubmitRequest::new("scraped", json!({})))
        .await
        .unwrap();
    orch.exhaust_quota("scraped-llm", Duration::from_secs(60))
        .await;
    let query = |q: &str| {
        let url = format!("http://127.0.0.1:{prom_port}/api/v1/query");
        let q = q.to_string();
        async move {
            let url = reqwest::Url::parse_with_params(&url, &[("query", q)]).ok()?;
            let r = reqwest::get(url).await.ok()?;
            let v: serde_json::Value = r.json().await.ok()?;
            Some(v)
        }
    };
    let deadline = Instant::now() + Duration::from_secs(60);
    let paused = loop {
        if let Some(v) = query("cascade_agent_paused{graph=\"scraped\"} == 1").await {
            let result = v["data"]["result"].as_array().cloned().unwrap_or_default();
            if result.len() >= 2 {
                break result;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never saw the paused agents"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    let mut agents: Vec<String> = paused
        .iter()
        .map(|r| {
            r["metric"]["agent"]
                .as_str()
                .unwrap_or_default()
                .to_string()
        })
        .collect();
    agents.sort();
    assert_eq!(agents, ["classify", "draft"]);
    let v = query("cascade_quota_exhausted{quota=\"scraped-llm\"}")
        .await
        .unwrap();
    assert_eq!(v["data"]["result"][0]["value"][1], "1");
    server.stop().await;
    orch.shutdown(Duration::from_millis(10)).await;
}
