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
            [
                "graph", "agent", "quota", "outcome", "cause", "kind", "listener", "le", "budget",
                "mode"
            ]
            .contains(l),
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

/// Debian's Prometheus, scraping `target` every 200 ms, on a free port of its own (with the
/// directory that holds its configuration and data).
fn prometheus(target: std::net::SocketAddr) -> ((Prometheus, tempfile::TempDir), u16) {
    let dir = tempfile::tempdir().unwrap();
    let prom_port = common::free_port();
    std::fs::write(
        dir.path().join("prometheus.yml"),
        format!(
            "global:\n  scrape_interval: 200ms\nscrape_configs:\n  - job_name: cascade\n    scrape_interval: 200ms\n    static_configs:\n      - targets: ['{target}']\n"
        ),
    )
    .unwrap();
    let prom = Prometheus(
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
    ((prom, dir), prom_port)
}

/// An instant query's JSON answer, if Prometheus answered.
async fn query(port: u16, q: &str) -> Option<serde_json::Value> {
    let url = format!("http://127.0.0.1:{port}/api/v1/query");
    let url = reqwest::Url::parse_with_params(&url, &[("query", q)]).ok()?;
    let r = reqwest::get(url).await.ok()?;
    r.json().await.ok()
}

/// The metric names a PromQL expression reads: `cascade_…` words, without a histogram's suffix.
fn metric_names(expr: &str) -> BTreeSet<String> {
    expr.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("cascade_"))
        .map(|w| w.trim_end_matches("_bucket").to_string())
        .collect()
}

/// `promtool check rules` passes on the alert rules in `deploy/`, and every query of the Grafana
/// dashboard in `deploy/` is valid PromQL that a real Prometheus runs against a real server's
/// series, over metric families that server exports (there is no Grafana on this machine: the
/// panels' queries are what can go stale).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's prometheus package: .ci/run installs it and runs this test"]
async fn the_alert_rules_and_every_dashboard_query_hold_against_a_live_prometheus() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy");
    // The shipped scrape config, with the credentials file it names (see its comment).
    let copy = tempfile::tempdir().unwrap();
    for f in ["prometheus.yml", "cascade-alerts.yml"] {
        std::fs::copy(root.join(f), copy.path().join(f)).unwrap();
    }
    std::fs::write(copy.path().join("cascade-metrics.key"), "csk_example").unwrap();
    let config = Command::new("promtool")
        .args(["check", "config"])
        .arg(copy.path().join("prometheus.yml"))
        .output()
        .expect("Debian's promtool is installed (apt-get install prometheus)");
    assert!(
        config.status.success(),
        "promtool check config: {}{}",
        String::from_utf8_lossy(&config.stdout),
        String::from_utf8_lossy(&config.stderr)
    );
    let check = Command::new("promtool")
        .args(["check", "rules"])
        .arg(root.join("cascade-alerts.yml"))
        .output()
        .expect("Debian's promtool is installed (apt-get install prometheus)");
    assert!(
        check.status.success(),
        "promtool check rules: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let rules = std::fs::read_to_string(root.join("cascade-alerts.yml")).unwrap();

    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(root.join("grafana-dashboard.json")).unwrap(),
    )
    .expect("the Grafana dashboard is valid JSON");
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().expect("panels") {
        for t in panel["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                exprs.push((
                    panel["title"].as_str().unwrap_or("?").to_string(),
                    e.to_string(),
                ));
            }
        }
    }
    assert!(exprs.len() >= 10, "{exprs:?}");

    // A graph with an OAuth2 credential beside it (never run: its failure count exists from
    // the start, at zero, as the credential alert needs).
    let text = GRAPHS
        .replace("name = \"observed\"", "name = \"paneled\"")
        .replace("llm", "paneled-llm");
    let mut model = config::parse_graph_str("observed.toml", &text, &Default::default())
        .unwrap_or_else(|e| panic!("{e}"));
    let credentialed = config::parse_graph_str(
        "credentialed.toml",
        "[credentials.paneled-crm]\n\
         oauth2 = { token_url = \"http://127.0.0.1:9/token\", client_id = \"c\", client_secret = \"env:PATH\" }\n\
         [graph]\nname = \"credentialed\"\n\
         [agents.lookup]\nkind = \"http\"\nurl = \"http://127.0.0.1:9/customers\"\nauth = \"paneled-crm\"\n",
        &Default::default(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    model.graphs.extend(credentialed.graphs);
    model.quotas.extend(credentialed.quotas);
    let (orch, server) = common::serve_in_process(model).await;
    for i in 0..50 {
        orch.submit(SubmitRequest::new("paneled", json!({ "n": i })))
            .await
            .unwrap();
    }
    orch.exhaust_quota("paneled-llm", Duration::from_secs(60))
        .await;
    let exported = parse(
        &reqwest::get(format!("http://{}/metrics", server.http_addr))
            .await
            .unwrap()
            .text()
            .await
            .unwrap(),
    );
    let families: BTreeSet<String> = exported.types.keys().cloned().collect();
    for name in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .flat_map(metric_names)
    {
        assert!(
            families.contains(&name),
            "an alert rule reads {name}, which the server does not export"
        );
    }
    let (_prom, port) = prometheus(server.http_addr);
    // Wait until Prometheus has scraped the server a few times (rates need two samples).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let v = query(port, "count_over_time(up{job=\"cascade\"}[1m])").await;
        let n: f64 = v
            .as_ref()
            .and_then(|v| v["data"]["result"][0]["value"][1].as_str()?.parse().ok())
            .unwrap_or(0.0);
        if n >= 5.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never scraped the server: {v:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut answered = 0;
    // The cluster row reads families that only nodes on PostgreSQL and Redis export (checked
    // against three such nodes in tests/cluster_nodes.rs); here, only that Prometheus runs it.
    let cluster =
        |title: &str| title.starts_with("Cluster:") || title.starts_with("Shared quotas:");
    let single = exprs.iter().filter(|(t, _)| !cluster(t)).count();
    for (title, expr) in &exprs {
        for name in metric_names(expr).into_iter().filter(|_| !cluster(title)) {
            assert!(
                families.contains(&name),
                "panel {title:?} reads {name}, which the server does not export"
            );
        }
        let q = expr.replace("$graph", ".*");
        let v = query(port, &q).await.expect("Prometheus answers");
        assert_eq!(v["status"], "success", "panel {title:?}: {q}: {v}");
        if !cluster(title)
            && v["data"]["result"]
                .as_array()
                .is_some_and(|r| !r.is_empty())
        {
            answered += 1;
        }
    }
    // Most panels show data after this run (a few need traffic it did not make: token windows,
    // admission refusals, restarts).
    assert!(
        answered * 3 >= single * 2,
        "{answered} of {single} queries had data"
    );
    server.stop().await;
    orch.shutdown(Duration::from_millis(10)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "needs Debian's prometheus package: .ci/run installs it and runs this test"]
async fn a_real_prometheus_sees_the_pause() {
    let (orch, server) = start("scraped").await;
    let (_prom, prom_port) = prometheus(server.http_addr);
    orch.submit(SubmitRequest::new("scraped", json!({})))
        .await
        .unwrap();
    orch.exhaust_quota("scraped-llm", Duration::from_secs(60))
        .await;
    let deadline = Instant::now() + Duration::from_secs(60);
    let paused = loop {
        if let Some(v) = query(prom_port, "cascade_agent_paused{graph=\"scraped\"} == 1").await {
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
    let v = query(prom_port, "cascade_quota_exhausted{quota=\"scraped-llm\"}")
        .await
        .unwrap();
    assert_eq!(v["data"]["result"][0]["value"][1], "1");
    server.stop().await;
    orch.shutdown(Duration::from_millis(10)).await;
}
