//! The `cascade` command line, run as a user runs it: the real binary, its exit codes, its text and
//! its `--json`, against graph files on disk and a real `cascade serve`.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn cascade(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_cascade"))
        .args(args)
        .output()
        .expect("the cascade binary runs")
}

/// `cascade serve` on `dir` (see `common::server_dir`), up and answering, and the CLI pointed
/// at it.
struct Served {
    _server: common::Server,
    address: String,
}

impl Served {
    fn start(dir: &std::path::Path) -> Self {
        let (grpc, http) = (common::free_port(), common::free_port());
        let server = common::spawn(dir, grpc, http);
        let rt = tokio::runtime::Runtime::new().unwrap();
        rt.block_on(common::connect(grpc));
        Self {
            _server: server,
            address: format!("http://127.0.0.1:{grpc}"),
        }
    }

    /// `cascade --server <it> ARGS…`.
    fn cli(&self, args: &[&str]) -> Output {
        let mut all = vec!["--server", self.address.as_str()];
        all.extend_from_slice(args);
        cascade(&all)
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// `cascade run FILE --json ARGS…`: the summary, whatever the exit code (2 when a job failed).
fn run_json(file: &Path, args: &[&str]) -> Value {
    let mut all = vec!["run", file.to_str().unwrap(), "--json"];
    all.extend_from_slice(args);
    let o = cascade(&all);
    assert!(
        matches!(o.status.code(), Some(0 | 2)),
        "cascade run failed: {}\n{}",
        o.status,
        stderr(&o)
    );
    serde_json::from_slice(&o.stdout)
        .unwrap_or_else(|e| panic!("the summary is not JSON ({e}): {}", stdout(&o)))
}

fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

const FLAKY: &str = r#"
[graph]
name = "flaky"
max_in_flight_jobs = 64

[agents.fetch]
kind = "sim"                 # simulated
seed = 11
latency = { uniform = ["0ms", "2ms"] }
transient_failure_rate = 0.1
retry = { max_attempts = 2, initial_delay = "1ms", max_delay = "2ms" }

[agents.score]
kind = "sim"                 # simulated
seed = 12
after = ["fetch"]
latency = { uniform = ["0ms", "2ms"] }
transient_failure_rate = 0.1
retry = { max_attempts = 2, initial_delay = "1ms", max_delay = "2ms" }
"#;

#[test]
fn run_summary_counts_throughput_over_succeeded_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "flaky.toml", FLAKY);
    let s = run_json(&file, &["--jobs", "1500"]);
    let n = |k: &str| {
        s[k].as_f64()
            .unwrap_or_else(|| panic!("{k} missing: {s:#}"))
    };
    let (ok, failed, wall) = (n("succeeded"), n("failed"), n("wall_seconds"));
    assert_eq!(ok + failed, 1500.0);
    assert!(failed > 0.0, "the run should have failures: {s:#}");
    assert!((n("jobs_per_second") - ok / wall).abs() < 1e-6 * ok / wall + 1e-9);
    assert!((n("failed_per_second") - failed / wall).abs() < 1e-6 * failed / wall + 1e-9);
    // Latencies of both kinds are reported apart, p50 ≤ p99.
    assert!(n("latency_p50_ms") <= n("latency_p99_ms"));
    assert!(n("failed_latency_p50_ms") <= n("failed_latency_p99_ms"));
    // Every failed job's key, sorted: job n's is `run-<n>`.
    let keys: Vec<&str> = s["failed_keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k.as_str().unwrap())
        .collect();
    assert_eq!(keys.len() as f64, failed);
    assert!(keys.is_sorted(), "{keys:?}");
    assert!(keys.iter().all(|k| k.starts_with("run-")), "{keys:?}");
}

#[test]
fn seeded_runs_fail_the_same_keys_whatever_the_timing() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "flaky.toml", FLAKY);
    // One job at a time, then 64 at once with random latencies: the calls arrive in other orders.
    let one = run_json(&file, &["--jobs", "600", "--concurrency", "1"]);
    let many = run_json(&file, &["--jobs", "600", "--concurrency", "64"]);
    assert!(
        !one["failed_keys"].as_array().unwrap().is_empty(),
        "the run should have failures: {one:#}"
    );
    assert_eq!(one["failed_keys"], many["failed_keys"]);
    // Another seed fails other jobs.
    let reseeded = write(
        dir.path(),
        "reseeded.toml",
        &FLAKY.replace("seed = 11", "seed = 21"),
    );
    let other = run_json(&reseeded, &["--jobs", "600", "--concurrency", "64"]);
    assert_ne!(one["failed_keys"], other["failed_keys"]);
}

#[test]
fn naive_mode_lists_each_agents_copy_of_a_quota_under_its_own_name() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(
        dir.path(),
        "shared.toml",
        r#"
[graph]
name = "shared"
[quotas.llm]
requests_per_second = 1000
[agents.classify]
kind = "sim"
quota = "llm"
[agents.draft]
kind = "sim"
quota = "llm"
after = ["classify"]
"#,
    );
    let s = run_json(&file, &["--jobs", "20", "--no-cascade"]);
    let mut names: Vec<&str> = s["quotas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["llm@shared.classify", "llm@shared.draft"]);
    // With the cascade, one quota.
    let s = run_json(&file, &["--jobs", "20"]);
    let names: Vec<&str> = s["quotas"]
        .as_array()
        .unwrap()
        .iter()
        .map(|q| q["name"].as_str().unwrap())
        .filter(|n| !n.starts_with("upstream:"))
        .collect();
    assert_eq!(names, ["llm"]);
}

#[test]
fn run_prints_a_readable_summary() {
    let dir = tempfile::tempdir().unwrap();
    let file = write(dir.path(), "flaky.toml", FLAKY);
    let o = cascade(&["run", file.to_str().unwrap(), "--jobs", "200", "--quiet"]);
    assert_eq!(
        o.status.code(),
        Some(2),
        "failed jobs exit 2: {}",
        stderr(&o)
    );
    let text = stdout(&o);
    assert!(text.contains("flaky: 200 jobs in"), "{text}");
    assert!(text.contains("jobs/s succeeded"), "{text}");
    assert!(text.contains("jobs/s failed"), "{text}");
    assert!(text.contains("fetch") && text.contains("score"), "{text}");
}

#[test]
fn graph_check_and_dot() {
    let dir = tempfile::tempdir().unwrap();
    let good = write(dir.path(), "flaky.toml", FLAKY);
    let o = cascade(&["graph", "check", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("ok: flaky"), "{}", stdout(&o));
    // A bad file: exit 1, the file, line and column, and what to do.
    let bad = write(
        dir.path(),
        "bad.toml",
        "[graph]\nname = \"bad\"\n[agents.a]\nkind = \"sim\"\nafter = [\"nobody\"]\n",
    );
    let o = cascade(&["graph", "check", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("bad.toml:5:"), "{err}");
    assert!(err.contains("nobody"), "{err}");
    let o = cascade(&["graph", "dot", good.to_str().unwrap()]);
    assert!(o.status.success(), "{}", stderr(&o));
    let dot = stdout(&o);
    assert!(dot.starts_with("digraph"), "{dot}");
    assert!(dot.contains("fetch") && dot.contains("score"), "{dot}");
}

/// The client commands against a real `cascade serve`.
#[test]
fn client_commands_against_a_server() {
    let graph = r#"
[graph]
name = "triage"
[agents.classify]
kind = "sim"
[agents.post]
kind = "sim"
after = ["classify"]
[agents.slow]
kind = "sim"
latency = "1h"
"#;
    let dir = common::server_dir(&[("triage.toml", graph)], "");
    let served = Served::start(dir.path());
    let cli = |args: &[&str]| served.cli(args);

    // `slow` sleeps an hour: this job runs until it is cancelled below.
    let o = cli(&["--json", "submit", "triage", "--input", r#"{"n": 1}"#]);
    assert!(o.status.success(), "{}", stderr(&o));
    let submitted: Value = serde_json::from_slice(&o.stdout).unwrap();
    let id = submitted["job_id"].as_str().unwrap().to_string();

    let o = cli(&["--json", "jobs", "get", &id]);
    assert!(o.status.success(), "{}", stderr(&o));
    let job: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(job["job_id"], id.as_str());

    let o = cli(&["--json", "jobs", "list", "--graph", "triage"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains(&id), "{}", stdout(&o));

    let o = cli(&["graph", "status", "triage"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let status = stdout(&o);
    assert!(
        status.contains("classify") && status.contains("slow"),
        "{status}"
    );

    // The job cannot finish (`slow` waits an hour): cancel it; watch then ends at once.
    let o = cli(&["jobs", "cancel", &id, "--reason", "test"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(&["jobs", "watch", &id]);
    assert_ne!(o.status.code(), Some(0), "a cancelled job does not exit 0");
    assert!(
        stdout(&o).to_lowercase().contains("cancel"),
        "{}",
        stdout(&o)
    );

    // An unknown state is refused with the valid ones, not answered with every job.
    let o = cli(&["jobs", "list", "--state", "sleeping"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("succeeded"), "{}", stderr(&o));
}

#[test]
fn submit_wait_follows_a_job_to_its_end() {
    let graph = "[graph]\nname = \"quick\"\n[agents.a]\nkind = \"sim\"\n[agents.b]\nkind = \"sim\"\nafter = [\"a\"]\n";
    let dir = common::server_dir(&[("quick.toml", graph)], "");
    let served = Served::start(dir.path());
    let o = served.cli(&["submit", "quick", "--wait"]);
    assert!(o.status.success(), "{}\n{}", stdout(&o), stderr(&o));
    let text = stdout(&o).to_lowercase();
    assert!(text.contains("succeeded"), "{text}");
    // An unreachable server: a clear error, not a hang.
    let dead = format!("http://127.0.0.1:{}", common::free_port());
    let o = cascade(&["--server", &dead, "submit", "quick"]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("cannot reach"), "{}", stderr(&o));
}

#[test]
fn demo_reports_the_submission_burst_as_a_burst() {
    let dir = tempfile::tempdir().unwrap();
    let (grpc, http) = (common::free_port(), common::free_port());
    let o = cascade(&[
        "demo",
        "--jobs",
        "40",
        "--grpc-addr",
        &format!("127.0.0.1:{grpc}"),
        "--http-addr",
        &format!("127.0.0.1:{http}"),
        "--data-dir",
        dir.path().join("data").to_str().unwrap(),
    ]);
    let text = stdout(&o);
    assert!(
        matches!(o.status.code(), Some(0 | 2)),
        "{text}\n{}",
        stderr(&o)
    );
    assert!(text.contains("support-triage: 40 jobs over gRPC"), "{text}");
    assert!(
        text.contains("a burst of 40 submissions, 40 at a time: all accepted within"),
        "{text}"
    );
    assert!(!text.contains("submit latency"), "{text}");
}

/// `cascade audit new-key NAME`: (signing key, verification key).
fn new_audit_key(name: &str) -> (String, String) {
    let out = cascade(&["audit", "new-key", name]);
    assert!(out.status.success(), "{out:?}");
    let text = stdout(&out);
    let field = |label: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(label))
            .unwrap_or_else(|| panic!("no {label} in {text}"))
            .trim()
            .to_string()
    };
    (field("signing key (secret):"), field("verification key:"))
}

/// `cascade audit`: a new key, its verification key, and `verify` on a data directory's audit
/// log — passing on a clean log, failing with the record named after a hand edit.
#[test]
fn audit_keys_and_verify_from_the_command_line() {
    use cascade_orchestrator::audit::{checkpoint::Signer, log::AuditLog};
    let (private, public) = new_audit_key("cascade.test/audit");
    assert!(
        private.starts_with("PRIVATE+KEY+cascade.test/audit+"),
        "{private}"
    );
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("signing.key"), &private).unwrap();
    std::fs::write(dir.path().join("audit.pub"), &public).unwrap();
    let key_ref = format!("file:{}", dir.path().join("signing.key").display());
    let out = cascade(&["audit", "public-key", "--signing-key", &key_ref]);
    assert_eq!(String::from_utf8(out.stdout).unwrap().trim(), public);

    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    let log = AuditLog::open(
        &data.join("cascade.db"),
        Some(Signer::from_key(&private).unwrap()),
        "cascade.test/audit",
    )
    .unwrap();
    for i in 0..3 {
        log.append("acme", "config_loaded", serde_json::json!({"file": i}))
            .unwrap();
    }
    let saved = log.checkpoint().unwrap().unwrap();
    std::fs::write(dir.path().join("saved.checkpoint"), saved).unwrap();
    drop(log);
    let verify = || {
        cascade(&[
            "audit",
            "verify",
            "--data-dir",
            data.to_str().unwrap(),
            "--public-key",
            dir.path().join("audit.pub").to_str().unwrap(),
            "--checkpoint",
            dir.path().join("saved.checkpoint").to_str().unwrap(),
        ])
    };
    let out = verify();
    assert!(out.status.success(), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("ok: 3 records, 1 signed checkpoints"),
        "{out:?}"
    );
    // The checkpoint to keep elsewhere, a proof for one record, and the export.
    let data_arg = data.to_str().unwrap();
    let out = cascade(&["audit", "checkpoint", "--data-dir", data_arg]);
    assert!(
        stdout(&out).starts_with("cascade.test/audit\n3\n"),
        "{out:?}"
    );
    let out = cascade(&[
        "audit",
        "prove",
        "2",
        "--data-dir",
        data_arg,
        "--public-key",
        dir.path().join("audit.pub").to_str().unwrap(),
    ]);
    let proof: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(
        (proof["seq"].as_u64(), proof["tree_size"].as_u64()),
        (Some(2), Some(3))
    );
    assert_eq!(proof["inclusion_proof"].as_array().unwrap().len(), 2);
    let out = cascade(&["audit", "export", "--data-dir", data_arg]);
    let lines: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[1]["leaf_hash"], proof["leaf_hash"]);
    let out = cascade(&[
        "audit",
        "export",
        "--tenant",
        "acme",
        "--data-dir",
        data_arg,
        "--public-key",
        dir.path().join("audit.pub").to_str().unwrap(),
    ]);
    let export: Value = serde_json::from_str(&stdout(&out)).unwrap();
    assert_eq!(export["records"].as_array().unwrap().len(), 3, "{export}");
    assert_eq!(
        export["records"][1]["inclusion_proof"],
        proof["inclusion_proof"]
    );
    let c = rusqlite::Connection::open(data.join("cascade.db")).unwrap();
    c.execute_batch(
        "DROP TRIGGER audit_log_no_update;
         UPDATE audit_log SET record = replace(record, '\"file\":1', '\"file\":9') WHERE seq = 2;",
    )
    .unwrap();
    let out = verify();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("audit record 2 does not match"),
        "{out:?}"
    );
}

/// `cascade serve` with `[audit] signing_key` records the configuration it loaded (each file
/// with its SHA-256) and signs checkpoints; after it stops, `cascade audit verify` checks its
/// files.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_served_config_load_is_audited_and_verifies() {
    let (private, public) = new_audit_key("cascade.test/served");
    let graph = "[graph]\nname = \"audited\"\n[agents.a]\nkind = \"sim\"\n";
    let keys = tempfile::tempdir().unwrap();
    std::fs::write(keys.path().join("signing.key"), private).unwrap();
    std::fs::write(keys.path().join("audit.pub"), &public).unwrap();
    let dir = common::server_dir(
        &[("audited.toml", graph)],
        &format!(
            "[audit]\nsigning_key = \"file:{}\"\ncheckpoint_every = \"1s\"\n",
            keys.path().join("signing.key").display()
        ),
    );
    let (grpc, http) = (common::free_port(), common::free_port());
    let mut server = common::spawn(dir.path(), grpc, http);
    let mut client = common::connect(grpc).await;
    // The same over gRPC: the signed checkpoint with its key, a proof, a page of records.
    use cascade_orchestrator::api::pb;
    let cp = client
        .get_audit_checkpoint(pb::GetAuditCheckpointRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(cp.tree_size, 1);
    assert_eq!(cp.verifier_key, public);
    let checked =
        cascade_orchestrator::audit::checkpoint::verify(&cp.note, &cp.verifier_key).unwrap();
    assert_eq!(checked.root.to_vec(), cp.root_hash);
    let proof = client
        .prove_audit_record(pb::ProveAuditRecordRequest { seq: 1 })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(proof.root_hash, cp.root_hash);
    let leaf = cascade_orchestrator::audit::merkle::leaf_hash(proof.record.as_bytes());
    assert_eq!(leaf.to_vec(), proof.leaf_hash);
    let e = client
        .prove_audit_record(pb::ProveAuditRecordRequest { seq: 9 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::FailedPrecondition, "{e}");
    let page = client
        .export_audit(pb::ExportAuditRequest {
            after_seq: 0,
            page_size: 0,
            tenant: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(page.records.len(), 1);
    assert_eq!(page.next_after_seq, 0);
    assert!(server.terminate().success());
    let data = dir.path().join("data");
    let out = cascade(&[
        "audit",
        "verify",
        "--data-dir",
        data.to_str().unwrap(),
        "--public-key",
        keys.path().join("audit.pub").to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("ok: 1 records"), "{}", stdout(&out));
    // With serve's flags alone: the key comes from the config's [audit] signing_key.
    let out = cascade(&[
        "audit",
        "verify",
        "--config",
        dir.path().join("cascade.toml").to_str().unwrap(),
        "--data-dir",
        data.to_str().unwrap(),
    ]);
    assert!(stdout(&out).contains("ok: 1 records"), "{out:?}");
    // The record names the files loaded, with the hashes of their contents.
    let c = rusqlite::Connection::open(data.join("cascade.db")).unwrap();
    let record: String = c
        .query_row("SELECT record FROM audit_log WHERE seq = 1", [], |r| {
            r.get(0)
        })
        .unwrap();
    let record: Value = serde_json::from_str(&record).unwrap();
    assert_eq!(record["kind"], "config_loaded");
    let files = record["body"]["files"].as_array().unwrap();
    let graph_sha = cascade_orchestrator::audit::sha256_hex(graph.as_bytes());
    assert!(
        files
            .iter()
            .any(|f| f["path"].as_str().unwrap().ends_with("audited.toml")
                && f["sha256"] == graph_sha.as_str()),
        "{files:?}"
    );
    assert!(
        files
            .iter()
            .any(|f| f["path"].as_str().unwrap().ends_with("cascade.toml")),
        "{files:?}"
    );
}

/// `cascade approvals` and `cascade jobs raise-budget` against a real server.
#[test]
fn approvals_and_budgets_from_the_command_line() {
    let graph = r#"
[graph]
name = "guarded"
budget = { max_tokens = 100 }
[agents.pay]
kind = "sim"
approval = "required"
[agents.report]
kind = "sim"
after = ["pay"]
usage = { prompt_tokens = 80, completion_tokens = 40 }
"#;
    let dir = common::server_dir(&[("guarded.toml", graph)], "");
    let served = Served::start(dir.path());
    let cli = |args: &[&str]| served.cli(args);
    let o = cli(&[
        "--json",
        "submit",
        "guarded",
        "--input",
        r#"{"amount": 12}"#,
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    let id = serde_json::from_slice::<Value>(&o.stdout).unwrap()["job_id"]
        .as_str()
        .unwrap()
        .to_string();
    let approval = format!("{id}/pay");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let listed = loop {
        let o = cli(&["--json", "approvals", "list", "--graph", "guarded"]);
        assert!(o.status.success(), "{}", stderr(&o));
        let v: Value = serde_json::from_slice(&o.stdout).unwrap();
        if v["approvals"].as_array().is_some_and(|a| !a.is_empty()) {
            break v;
        }
        assert!(std::time::Instant::now() < deadline, "no approval listed");
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(listed["approvals"][0]["approval_id"], approval.as_str());
    let o = cli(&["approvals", "show", &approval]);
    assert!(o.status.success(), "{}", stderr(&o));
    let shown = stdout(&o);
    assert!(shown.contains("\"amount\": 12"), "the proposal: {shown}");
    let sha = listed["approvals"][0]["proposal_sha256"].as_str().unwrap();
    assert!(shown.contains(sha), "{shown}");

    // A wrong hash is refused with what to do; the right one approves.
    let o = cli(&[
        "approvals",
        "approve",
        &approval,
        "--sha256",
        &"a".repeat(64),
        "--as",
        "ops",
    ]);
    assert!(!o.status.success());
    assert!(stderr(&o).contains("stale or wrong"), "{}", stderr(&o));
    let o = cli(&[
        "approvals",
        "approve",
        &approval,
        "--sha256",
        sha,
        "--as",
        "ops",
    ]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(stdout(&o).contains("approved by ops"), "{}", stdout(&o));

    // `report` (120 tokens) does not fit the 100-token budget: the job stops there.
    let stopped = loop {
        let o = cli(&["--json", "jobs", "get", &id]);
        let j: Value = serde_json::from_slice(&o.stdout).unwrap();
        if j["state"] == "budget_exceeded" {
            break j;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job never stopped: {j}"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert!(
        stopped["error"].as_str().unwrap().contains("max_tokens"),
        "{stopped}"
    );
    let o = cli(&["jobs", "raise-budget", &id, "--max-tokens", "500"]);
    assert!(o.status.success(), "{}", stderr(&o));
    let o = cli(&["jobs", "watch", &id]);
    assert!(o.status.success(), "the job succeeded: {}", stdout(&o));
    let o = cli(&["--json", "jobs", "get", &id]);
    let j: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(j["budget"]["max_tokens"], 500);
    assert_eq!(j["steps"][0]["attempts"], 1, "pay ran once: {j}");
}
