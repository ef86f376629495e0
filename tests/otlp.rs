//! OpenTelemetry export: the real `cascade` binary, configured with `[telemetry] otlp_endpoint`,
//! sends each job as one trace — a `job` span carrying the job id, its `step` spans as children —
//! to an OTLP/gRPC collector. The collector here is a stand-in built from the OTLP protobuf
//! definitions (opentelemetry-proto) that records what it receives, on 127.0.0.1.

use std::collections::HashMap;
use std::time::Duration;

use cascade_orchestrator::api::pb;
use common::{connect, free_port, server_dir, spawn_with_env, submit};
use futures::StreamExt;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue};
use opentelemetry_proto::tonic::trace::v1::status::StatusCode;

mod common;
#[path = "support/otlp_collector.rs"]
mod otlp_collector;
use otlp_collector::Collector;

/// No export on the batch timer (5 s by default): spans leave only when the server stops, so the
/// tests see the flush on shutdown and nothing else.
const EXPORT_ONLY_ON_STOP: &[(&str, &str)] = &[("OTEL_BSP_SCHEDULE_DELAY", "600000")];

/// A span as the collector saw it, with its attributes as strings.
#[derive(Debug)]
struct Seen {
    name: String,
    trace_id: Vec<u8>,
    span_id: Vec<u8>,
    parent: Vec<u8>,
    attrs: HashMap<String, String>,
    error: bool,
}

fn text(v: &Option<AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn attrs(kvs: &[KeyValue]) -> HashMap<String, String> {
    kvs.iter()
        .map(|kv| (kv.key.clone(), text(&kv.value)))
        .collect()
}

impl Collector {
    /// Every span received, checking each export's header and resource.
    fn spans(&self, api_key: Option<&str>, service: &str) -> Vec<Seen> {
        let exports = self.exports.lock().unwrap().clone();
        assert!(!exports.is_empty(), "the collector received nothing");
        let mut spans = Vec::new();
        for (key, req) in &exports {
            assert_eq!(key.as_deref(), api_key, "the export's x-api-key");
            for rs in &req.resource_spans {
                let resource = attrs(&rs.resource.as_ref().unwrap().attributes);
                assert_eq!(resource["service.name"], service);
                for s in rs.scope_spans.iter().flat_map(|ss| &ss.spans) {
                    spans.push(Seen {
                        name: s.name.clone(),
                        trace_id: s.trace_id.clone(),
                        span_id: s.span_id.clone(),
                        parent: s.parent_span_id.clone(),
                        attrs: attrs(&s.attributes),
                        error: s
                            .status
                            .as_ref()
                            .is_some_and(|st| st.code == StatusCode::Error as i32),
                    });
                }
            }
        }
        spans
    }
}

/// Submit `n` jobs of `graph` and wait until each has ended; returns their ids.
async fn run_jobs(
    client: &mut pb::cascade_client::CascadeClient<tonic::transport::Channel>,
    graph: &str,
    n: usize,
) -> Vec<String> {
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(submit(client, graph, &format!("{{\"n\": {i}}}")).await);
    }
    for id in &ids {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let job = client
                .get_job(pb::GetJobRequest { job_id: id.clone() })
                .await
                .unwrap()
                .into_inner();
            let state = pb::JobState::try_from(job.state).unwrap();
            if matches!(state, pb::JobState::Succeeded | pb::JobState::Failed) {
                break;
            }
            assert!(tokio::time::Instant::now() < deadline, "job {id} stuck");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    ids
}

const TRACED_GRAPH: &str = r#"
[graph]
name = "traced"
[agents.fetch]
kind = "sim"
latency = "5ms"
[agents.write]
kind = "sim"
after = ["fetch"]
latency = "5ms"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_are_exported_as_traces_to_an_otlp_collector() {
    let collector = Collector::default();
    let otlp_port = collector.start().await;
    let key_file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(key_file.path(), "test-key-123\n").unwrap();
    let dir = server_dir(
        &[
            ("traced.toml", TRACED_GRAPH),
            (
                "broken.toml",
                "[graph]\nname = \"broken\"\n[agents.refuse]\nkind = \"sim\"\npermanent_failure_rate = 1.0\n",
            ),
        ],
        &format!(
            r#"[telemetry]
otlp_endpoint = "http://127.0.0.1:{otlp_port}"
service_name = "cascade-under-test"
headers = {{ x-api-key = "file:{}" }}
"#,
            key_file.path().display()
        ),
    );

    let (grpc, http) = (free_port(), free_port());
    let mut server = spawn_with_env(dir.path(), grpc, http, EXPORT_ONLY_ON_STOP);
    let mut client = connect(grpc).await;
    let ids = run_jobs(&mut client, "traced", 3).await;
    let failed_id = run_jobs(&mut client, "broken", 1).await.remove(0);
    // A stop sends what is still queued (here, everything: the timer never fires).
    let exit = server.terminate();
    assert!(exit.success(), "exit status {exit}");

    let spans = collector.spans(Some("test-key-123"), "cascade-under-test");

    let mut traces = std::collections::HashSet::new();
    for id in &ids {
        let jobs: Vec<&Seen> = spans
            .iter()
            .filter(|s| s.name == "job" && s.attrs.get("job_id") == Some(id))
            .collect();
        assert_eq!(jobs.len(), 1, "one job span for {id}: {spans:#?}");
        let job = jobs[0];
        assert!(job.parent.is_empty(), "a job span is the root of its trace");
        assert_eq!(job.attrs["graph"], "traced");
        assert_eq!(job.attrs["outcome"], "succeeded");
        assert!(!job.error);
        assert!(traces.insert(job.trace_id.clone()), "one trace per job");
        let mut steps: Vec<(&str, &str, &str)> = spans
            .iter()
            .filter(|s| s.name == "step" && s.parent == job.span_id)
            .map(|s| {
                assert_eq!(s.trace_id, job.trace_id);
                (
                    s.attrs["agent"].as_str(),
                    s.attrs["attempt"].as_str(),
                    s.attrs["outcome"].as_str(),
                )
            })
            .collect();
        steps.sort();
        assert_eq!(steps, [("fetch", "1", "ok"), ("write", "1", "ok")], "{id}");
    }
    let failed = spans
        .iter()
        .find(|s| s.name == "job" && s.attrs.get("job_id") == Some(&failed_id))
        .expect("the failed job is exported too");
    assert_eq!(failed.attrs["outcome"], "failed");
    assert!(failed.error, "a failed job's span has the error status");
    let refused = spans
        .iter()
        .find(|s| s.name == "step" && s.parent == failed.span_id)
        .expect("its step");
    assert_eq!(refused.attrs["outcome"], "permanent");

    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    assert!(
        !log.contains("test-key-123"),
        "the header's secret is not logged"
    );
}

/// A collector that accepts connections and never answers must neither hold up jobs nor a stop:
/// the server logs the failed export and exits within the export timeout.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_collector_that_never_answers_does_not_hold_a_stop() {
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let otlp_port = silent.local_addr().unwrap().port();
    let held = std::thread::spawn(move || {
        // Hold every connection open, unread, until the test ends.
        silent.incoming().take(8).collect::<Vec<_>>()
    });
    let dir = server_dir(
        &[(
            "one.toml",
            "[graph]\nname = \"one\"\n[agents.only]\nkind = \"sim\"\n",
        )],
        &format!(
            "[telemetry]\notlp_endpoint = \"http://127.0.0.1:{otlp_port}\"\ntimeout = \"1s\"\n"
        ),
    );
    let (grpc, http) = (free_port(), free_port());
    let mut server = spawn_with_env(dir.path(), grpc, http, EXPORT_ONLY_ON_STOP);
    let mut client = connect(grpc).await;
    let id = submit(&mut client, "one", "{}").await;
    let done = client
        .watch_job(pb::WatchJobRequest { job_id: id })
        .await
        .unwrap()
        .into_inner()
        .filter_map(|e| async move { e.ok() })
        .any(|e| async move { e.state == pb::JobState::Succeeded as i32 })
        .await;
    assert!(done, "the job succeeds while its trace cannot be sent");
    let t = std::time::Instant::now();
    let exit = server.terminate();
    assert!(exit.success(), "exit status {exit}");
    // The stop waits for the export at most the 1 s timeout; generous bound for a loaded machine.
    assert!(t.elapsed() < Duration::from_secs(15), "{:?}", t.elapsed());
    let log = std::fs::read_to_string(dir.path().join("server.log")).unwrap();
    // Whichever gives up first, the stop's wait or the export's own timeout, says so.
    assert!(
        log.contains("trace export did not finish")
            || log.contains("BatchSpanProcessor.ExportError"),
        "the lost spans are reported: {log}"
    );
    drop(held);
}

/// `sample_ratio = 0.5` with every DEBUG span of every crate let through: about half the jobs
/// are exported, each whole (its job span, every step, and the spans the agents open inside their
/// steps), and nothing of the others — no span without its job, and none of the export's own
/// transport.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sampling_exports_whole_jobs_and_nothing_of_the_others() {
    let collector = Collector::default();
    let otlp_port = collector.start().await;
    let dir = server_dir(
        &[("traced.toml", TRACED_GRAPH)],
        &format!(
            "[telemetry]\notlp_endpoint = \"http://127.0.0.1:{otlp_port}\"\nsample_ratio = 0.5\nfilter = \"debug\"\n"
        ),
    );
    let (grpc, http) = (free_port(), free_port());
    let mut server = spawn_with_env(dir.path(), grpc, http, EXPORT_ONLY_ON_STOP);
    let mut client = connect(grpc).await;
    const JOBS: usize = 60;
    let ids = run_jobs(&mut client, "traced", JOBS).await;
    assert!(server.terminate().success());

    let spans = collector.spans(None, "cascade");
    let jobs: Vec<&Seen> = spans.iter().filter(|s| s.name == "job").collect();
    // Binomial(60, 0.5): outside 10..=50 with probability below 1e-7.
    assert!(
        (10..=50).contains(&jobs.len()),
        "{} of {JOBS} jobs exported",
        jobs.len()
    );
    for job in &jobs {
        assert!(ids.contains(&job.attrs["job_id"]), "{job:?}");
        let steps: Vec<&Seen> = spans
            .iter()
            .filter(|s| s.name == "step" && s.parent == job.span_id)
            .collect();
        assert_eq!(steps.len(), 2, "every step of a sampled job: {job:?}");
        for step in steps {
            let inner = spans
                .iter()
                .filter(|s| s.name == "upstream_wait" && s.parent == step.span_id)
                .count();
            assert_eq!(inner, 1, "the agent's span inside the step: {step:?}");
        }
    }
    let names: std::collections::BTreeSet<&str> = spans.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        ["job", "step", "upstream_wait"].into(),
        "nothing but jobs, steps and the agents' spans"
    );
    assert_eq!(
        spans.len(),
        jobs.len() * 5,
        "no span of an unsampled job reaches the collector"
    );
}
