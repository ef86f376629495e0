//! Approvals end to end over gRPC: a real `cascade serve` on 127.0.0.1 over its SQLite file, a
//! real upstream on 127.0.0.1 that counts the calls it gets, restarts while a job waits.

mod common;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use cascade_orchestrator::api::pb;
use cascade_orchestrator::api::pb::cascade_client::CascadeClient;
use serde_json::{Value, json};
use tonic::transport::Channel;

type Client = CascadeClient<Channel>;

/// A webhook delivery as received: its headers and body.
type Delivered = (axum::http::HeaderMap, Vec<u8>);

/// What the upstream got: each call's idempotency key and body.
#[derive(Clone, Default)]
struct Upstream {
    calls: Arc<Mutex<Vec<(String, Value)>>>,
}

impl Upstream {
    /// Serve on a free port; the port.
    async fn start(&self) -> u16 {
        let calls = self.calls.clone();
        let app = axum::Router::new().route(
            "/pay",
            axum::routing::post(
                move |headers: axum::http::HeaderMap, body: axum::Json<Value>| {
                    let calls = calls.clone();
                    async move {
                        let key = headers
                            .get("idempotency-key")
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_string();
                        calls.lock().unwrap().push((key, body.0));
                        axum::Json(json!({"paid": true}))
                    }
                },
            ),
        );
        common::serve_http(app).await
    }

    fn calls(&self) -> Vec<(String, Value)> {
        self.calls.lock().unwrap().clone()
    }
}

/// The payments graph: `lookup` renders the payment, `pay` (irreversible) posts it to the
/// upstream; `note` is how v2 of the graph renders the body differently.
fn payments(port: u16, note: &str) -> String {
    format!(
        r#"
[graph]
name = "payments"

[agents.lookup]
kind = "template"
output = {{ amount = "{{{{ input.amount }}}}", to = "{{{{ input.to }}}}" }}

[agents.pay]
kind = "http"
after = ["lookup"]
method = "POST"
url = "http://127.0.0.1:{port}/pay"
body = {{ amount = "{{{{ deps.lookup.amount }}}}", to = "{{{{ deps.lookup.to }}}}", note = "{note}" }}
irreversible = true
"#
    )
}

async fn job(client: &mut Client, id: &str) -> pb::Job {
    client
        .get_job(pb::GetJobRequest { job_id: id.into() })
        .await
        .unwrap()
        .into_inner()
}

/// Wait (30 s at most) until job `id` is in `state`.
async fn wait_state(client: &mut Client, id: &str, state: pb::JobState) -> pb::Job {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let j = job(client, id).await;
        if j.state == state as i32 {
            return j;
        }
        assert!(
            Instant::now() < deadline,
            "job {id} is {:?}, not {state:?}: {}",
            pb::JobState::try_from(j.state),
            j.error
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn approvals(client: &mut Client, graph: &str) -> Vec<pb::Approval> {
    client
        .list_approvals(pb::ListApprovalsRequest {
            graph: graph.into(),
            page_size: 1000,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .approvals
}

async fn resolve(
    client: &mut Client,
    id: &str,
    sha: &str,
    approve: bool,
    who: &str,
    reason: &str,
) -> Result<pb::Approval, tonic::Status> {
    let decision = if approve {
        pb::ApprovalDecision::Approve
    } else {
        pb::ApprovalDecision::Reject
    };
    client
        .resolve_approval(pb::ResolveApprovalRequest {
            approval_id: id.into(),
            proposal_sha256: sha.into(),
            decision: decision as i32,
            reason: reason.into(),
            approver: who.into(),
        })
        .await
        .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn approve_runs_exactly_the_stored_call_once_across_a_restart() {
    let upstream = Upstream::default();
    let port = upstream.start().await;
    let dir = common::server_dir(&[("payments.toml", &payments(port, "v1"))], "");
    let (grpc, http) = (common::free_port(), common::free_port());
    let mut server = common::spawn(dir.path(), grpc, http);
    let mut client = common::connect(grpc).await;

    let id = common::submit(&mut client, "payments", r#"{"amount": 1500, "to": "acme"}"#).await;
    let j = wait_state(&mut client, &id, pb::JobState::AwaitingApproval).await;
    assert_eq!(j.steps[1].state, pb::StepState::AwaitingApproval as i32);
    let list = approvals(&mut client, "payments").await;
    assert_eq!(list.len(), 1);
    let a = &list[0];
    assert_eq!(a.approval_id, format!("{id}/pay"));
    assert_eq!((a.job_id.as_str(), a.agent.as_str()), (id.as_str(), "pay"));
    assert_eq!(a.state, pb::ApprovalState::Pending as i32);
    // The hash is the proposal text's, exactly as it is shown.
    assert_eq!(
        a.proposal_sha256,
        cascade_orchestrator::audit::sha256_hex(a.proposal_json.as_bytes())
    );
    let proposal: Value = serde_json::from_str(&a.proposal_json).unwrap();
    assert_eq!(proposal["method"], "POST");
    assert_eq!(proposal["url"], format!("http://127.0.0.1:{port}/pay"));
    assert_eq!(
        proposal["body"],
        json!({"amount": "1500", "to": "acme", "note": "v1"})
    );
    assert_eq!(proposal["headers"]["idempotency-key"], format!("{id}/pay"));
    assert!(
        upstream.calls().is_empty(),
        "nothing runs before a decision"
    );
    let got = client
        .get_approval(pb::GetApprovalRequest {
            approval_id: a.approval_id.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(got.proposal_json, a.proposal_json);

    // A stale or wrong hash decides nothing.
    let stale = resolve(
        &mut client,
        &a.approval_id,
        &"0".repeat(64),
        true,
        "alice",
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale:?}");
    assert!(stale.message().contains("stale or wrong"), "{stale:?}");
    // Without an approver, nothing either.
    let anonymous = resolve(
        &mut client,
        &a.approval_id,
        &a.proposal_sha256,
        true,
        " ",
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(anonymous.code(), tonic::Code::InvalidArgument);

    // Restart with the graph changed: the body would now render differently.
    assert!(server.terminate().success());
    std::fs::write(
        dir.path().join("graphs/payments.toml"),
        payments(port, "v2"),
    )
    .unwrap();
    let mut server = common::spawn(dir.path(), grpc, http);
    let mut client = common::connect(grpc).await;
    let j = wait_state(&mut client, &id, pb::JobState::AwaitingApproval).await;
    assert_eq!(j.steps[0].state, pb::StepState::Succeeded as i32);
    let again = approvals(&mut client, "payments").await;
    assert_eq!(again.len(), 1);
    assert_eq!(again[0].proposal_sha256, a.proposal_sha256);

    let approved = resolve(
        &mut client,
        &a.approval_id,
        &a.proposal_sha256,
        true,
        "alice",
        "invoice 42 checked",
    )
    .await
    .unwrap();
    assert_eq!(approved.state, pb::ApprovalState::Approved as i32);
    assert_eq!(approved.approver, "alice");
    assert_eq!(approved.reason, "invoice 42 checked");
    wait_state(&mut client, &id, pb::JobState::Succeeded).await;
    let calls = upstream.calls();
    assert_eq!(calls.len(), 1, "one call: {calls:?}");
    assert_eq!(
        calls[0].0,
        format!("{id}/pay"),
        "with the step's idempotency key"
    );
    assert_eq!(
        calls[0].1,
        json!({"amount": "1500", "to": "acme", "note": "v1"}),
        "the approved body, not the one the changed graph renders"
    );

    // The same decision again is answered from the record and does nothing.
    let repeated = resolve(
        &mut client,
        &a.approval_id,
        &a.proposal_sha256,
        true,
        "bob",
        "",
    )
    .await
    .unwrap();
    assert_eq!(repeated.state, pb::ApprovalState::Approved as i32);
    assert_eq!(repeated.approver, "alice");
    // A conflicting one is refused, naming the first.
    let conflict = resolve(
        &mut client,
        &a.approval_id,
        &a.proposal_sha256,
        false,
        "bob",
        "no",
    )
    .await
    .unwrap_err();
    assert_eq!(conflict.code(), tonic::Code::FailedPrecondition);
    assert!(
        conflict.message().contains("approved by alice"),
        "{conflict:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        upstream.calls().len(),
        1,
        "a repeated decision runs nothing"
    );
    assert!(approvals(&mut client, "payments").await.is_empty());

    // The events tell the story.
    let mut events = client
        .watch_job(pb::WatchJobRequest { job_id: id.clone() })
        .await
        .unwrap()
        .into_inner();
    let mut kinds = Vec::new();
    while let Some(e) = events.message().await.unwrap() {
        kinds.push(e.kind);
    }
    for k in [
        "approval_requested",
        "parked",
        "approval_decided",
        "finished",
    ] {
        assert!(kinds.iter().any(|x| x == k), "{k} in {kinds:?}");
    }

    // A tenant's export holds its records only: the server's are the configuration loads.
    let export = client
        .export_audit(pb::ExportAuditRequest {
            after_seq: 0,
            page_size: 0,
            tenant: "server".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(export.records.len(), 2, "one config load per start");
    for r in &export.records {
        let v: Value = serde_json::from_str(&r.record).unwrap();
        assert_eq!(
            (v["tenant"].as_str(), v["kind"].as_str()),
            (Some("server"), Some("config_loaded"))
        );
    }

    // The audit log has the proposal, the decision and the call.
    assert!(server.terminate().success());
    let records = cascade_orchestrator::audit::log::records(
        &cascade_orchestrator::audit::log::Source::Sqlite(dir.path().join("data/cascade.db")),
    )
    .unwrap();
    let kinds: Vec<Value> = records
        .iter()
        .map(|e| serde_json::from_str::<Value>(&e.1).unwrap())
        .filter(|r| r["body"]["job_id"] == json!(id))
        .collect();
    let of = |k: &str| kinds.iter().filter(|r| r["kind"] == k).count();
    assert_eq!(of("approval_proposed"), 1, "{kinds:?}");
    assert_eq!(of("approval_decided"), 1, "{kinds:?}");
    assert_eq!(of("call_executed"), 1, "{kinds:?}");
    let decided = kinds
        .iter()
        .find(|r| r["kind"] == "approval_decided")
        .unwrap();
    assert_eq!(decided["body"]["approver"], "alice");
    assert_eq!(decided["body"]["proposal_sha256"], json!(a.proposal_sha256));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reject_fails_the_job_and_runs_nothing() {
    let upstream = Upstream::default();
    let port = upstream.start().await;
    let dir = common::server_dir(&[("payments.toml", &payments(port, "v1"))], "");
    let (grpc, http) = (common::free_port(), common::free_port());
    let _server = common::spawn(dir.path(), grpc, http);
    let mut client = common::connect(grpc).await;
    let id = common::submit(&mut client, "payments", r#"{"amount": 9, "to": "mallory"}"#).await;
    wait_state(&mut client, &id, pb::JobState::AwaitingApproval).await;
    let a = approvals(&mut client, "payments").await.remove(0);
    // A rejection says why.
    let no_reason = resolve(
        &mut client,
        &a.approval_id,
        &a.proposal_sha256,
        false,
        "carol",
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(no_reason.code(), tonic::Code::InvalidArgument);
    let rejected = resolve(
        &mut client,
        &a.approval_id,
        &a.proposal_sha256,
        false,
        "carol",
        "unknown payee",
    )
    .await
    .unwrap();
    assert_eq!(rejected.state, pb::ApprovalState::Rejected as i32);
    let j = wait_state(&mut client, &id, pb::JobState::Failed).await;
    assert!(
        j.error.contains("rejected by carol: unknown payee"),
        "{}",
        j.error
    );
    assert_eq!(j.steps[1].state, pb::StepState::Failed as i32);
    // Rejected again: the record; approved now: a conflict naming the rejection.
    let again = resolve(
        &mut client,
        &a.approval_id,
        &a.proposal_sha256,
        false,
        "dave",
        "me too",
    )
    .await
    .unwrap();
    assert_eq!(
        (again.state, again.approver.as_str()),
        (pb::ApprovalState::Rejected as i32, "carol")
    );
    let conflict = resolve(
        &mut client,
        &a.approval_id,
        &a.proposal_sha256,
        true,
        "dave",
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(conflict.code(), tonic::Code::FailedPrecondition);
    assert!(
        conflict.message().contains("rejected by carol"),
        "{conflict:?}"
    );
    assert!(upstream.calls().is_empty());
    let unknown = client
        .get_approval(pb::GetApprovalRequest {
            approval_id: format!("{id}/lookup"),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), tonic::Code::NotFound);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_nobody_decides_expires_as_a_rejection() {
    let upstream = Upstream::default();
    let port = upstream.start().await;
    let graph = payments(port, "v1").replace(
        "irreversible = true",
        "irreversible = true\napproval_timeout = \"1s\"",
    );
    let dir = common::server_dir(&[("payments.toml", &graph)], "");
    let (grpc, http) = (common::free_port(), common::free_port());
    let _server = common::spawn(dir.path(), grpc, http);
    let mut client = common::connect(grpc).await;
    let id = common::submit(&mut client, "payments", r#"{"amount": 5, "to": "acme"}"#).await;
    let j = wait_state(&mut client, &id, pb::JobState::Failed).await;
    assert!(j.error.contains("approval_timeout"), "{}", j.error);
    let a = client
        .get_approval(pb::GetApprovalRequest {
            approval_id: format!("{id}/pay"),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(a.state, pb::ApprovalState::Expired as i32);
    assert_eq!(a.approver, "timeout");
    // An expiry is never an approval: approving now conflicts with it.
    let late = resolve(
        &mut client,
        &a.approval_id,
        &a.proposal_sha256,
        true,
        "erin",
        "",
    )
    .await
    .unwrap_err();
    assert_eq!(late.code(), tonic::Code::FailedPrecondition);
    assert!(upstream.calls().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proposal_holds_no_secret_and_the_webhook_is_signed() {
    // A receiver of approval webhooks on loopback.
    let received: Arc<Mutex<Vec<Delivered>>> = Arc::default();
    let sink = received.clone();
    let hook = common::serve_http(axum::Router::new().route(
        "/approvals",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let sink = sink.clone();
                async move {
                    sink.lock().unwrap().push((headers, body.to_vec()));
                    "ok"
                }
            },
        ),
    ))
    .await;
    let upstream = Upstream::default();
    let port = upstream.start().await;
    let token = "tok-5ecret-value-for-approvals";
    let graph = payments(port, "v1").replace(
        "irreversible = true",
        &format!(
            "irreversible = true\nauth = {{ bearer = \"env:PAY_TOKEN\" }}\napproval_webhook = \"http://127.0.0.1:{hook}/approvals\""
        ),
    );
    let dir = common::server_dir(
        &[("payments.toml", &graph)],
        "[server]\ncallback_secret = \"env:CALLBACK_SECRET\"\n",
    );
    let (grpc, http) = (common::free_port(), common::free_port());
    let _server = common::spawn_with_env(
        dir.path(),
        grpc,
        http,
        &[("PAY_TOKEN", token), ("CALLBACK_SECRET", "hook-secret")],
    );
    let mut client = common::connect(grpc).await;
    // The secret reaches the input too: it is not shown to approvers either.
    let input = json!({"amount": 70, "to": format!("acme {token}")}).to_string();
    let id = common::submit(&mut client, "payments", &input).await;
    wait_state(&mut client, &id, pb::JobState::AwaitingApproval).await;
    let a = approvals(&mut client, "payments").await.remove(0);
    assert!(!a.proposal_json.contains(token), "{}", a.proposal_json);
    let proposal: Value = serde_json::from_str(&a.proposal_json).unwrap();
    assert_eq!(
        proposal["auth"], "bearer",
        "the credential is named, not shown"
    );

    let deadline = Instant::now() + Duration::from_secs(10);
    while received.lock().unwrap().is_empty() {
        assert!(Instant::now() < deadline, "the webhook was not called");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (headers, body) = received.lock().unwrap()[0].clone();
    let secret = cascade_orchestrator::secret::Secret::new("hook-secret".into());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    cascade_orchestrator::secret::verify_keyed(
        &secret,
        headers["x-cascade-timestamp"].to_str().unwrap(),
        headers["x-cascade-signature"].to_str().unwrap(),
        Some(headers["idempotency-key"].to_str().unwrap()),
        &body,
        now,
    )
    .expect("the webhook is signed with the callback secret");
    let notice: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(notice["approval_id"], json!(a.approval_id));
    assert_eq!(notice["proposal_sha256"], json!(a.proposal_sha256));
    assert!(
        notice["text"].as_str().unwrap().contains("Approval needed"),
        "{notice}"
    );
    assert!(notice["blocks"].is_array(), "Slack blocks: {notice}");
    assert!(!String::from_utf8_lossy(&body).contains(token));

    // Approved, the call goes out with the credential added again.
    resolve(
        &mut client,
        &a.approval_id,
        &a.proposal_sha256,
        true,
        "frank",
        "",
    )
    .await
    .unwrap();
    wait_state(&mut client, &id, pb::JobState::Succeeded).await;
    assert_eq!(upstream.calls().len(), 1);
}

/// Wait (60 s at most) until `check` holds.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_parked_jobs_leave_the_graph_to_the_jobs_that_flow() {
    use cascade_orchestrator::SubmitRequest;
    use cascade_orchestrator::job::JobState;
    let orch = common::start(
        r#"
[graph]
name = "pay"
max_in_flight_jobs = 64

[agents.check]
kind = "sim"

[agents.pay]
kind = "sim"
after = ["check"]
approval_when = "input.amount > 1000"
"#,
    )
    .await;
    let mut parked = Vec::new();
    for n in 0..10_000 {
        let req = SubmitRequest::new("pay", json!({"amount": 5000 + n}));
        parked.push(orch.submit(req).await.unwrap().id);
    }
    until("10,000 proposals wait", || {
        orch.store().pending_approval_count("pay") == 10_000
    })
    .await;
    until("every parked job left the run", || {
        parked
            .iter()
            .rev()
            .take(64)
            .all(|id| orch.get(*id).unwrap().unwrap().state == JobState::AwaitingApproval)
    })
    .await;
    let snap = orch.scheduler_snapshot("pay").await.unwrap();
    assert_eq!(
        snap.jobs_in_flight, 0,
        "parked jobs hold no place: {snap:?}"
    );

    // Small payments need no approval and flow past them.
    for n in 0..200 {
        let job = common::run_one(&orch, "pay", json!({"amount": n})).await;
        assert_eq!(job.state, JobState::Succeeded, "{:?}", job.error);
    }
    assert_eq!(orch.store().pending_approval_count("pay"), 10_000);

    // The oldest three approved run; one cancelled ends; the rest wait on.
    let page = orch.approvals(Some("pay"), None, 3).unwrap();
    assert_eq!(page[0].job_id, parked[0], "oldest job first");
    for v in &page {
        orch.resolve_approval(&v.approval.id, &v.approval.sha256, true, "ops", "")
            .await
            .unwrap();
    }
    for v in &page {
        let job = tokio::time::timeout(Duration::from_secs(30), orch.wait(v.job_id))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(job.state, JobState::Succeeded);
        // `check` ran once, before the job was parked; nothing done re-ran.
        assert_eq!(job.steps[0].attempts, 1);
        assert_eq!(job.steps[1].attempts, 1);
    }
    let next = orch
        .approvals(Some("pay"), Some(&page[2].approval.id), 1)
        .unwrap();
    assert_eq!(next[0].job_id, parked[3], "paging goes on after the token");
    let cancelled = orch.cancel(parked[3], "changed my mind").await.unwrap();
    assert_eq!(cancelled.state, JobState::Cancelled);
    assert_eq!(orch.store().pending_approval_count("pay"), 9_996);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_is_parked_once_its_other_branches_are_done() {
    use cascade_orchestrator::job::{JobState, StepState};
    let orch = common::start(
        r#"
[graph]
name = "branches"

[agents.start]
kind = "sim"

[agents.pay]
kind = "sim"
after = ["start"]
approval = "required"

[agents.report]
kind = "sim"
after = ["start"]
latency = "400ms"
"#,
    )
    .await;
    let id = orch
        .submit(cascade_orchestrator::SubmitRequest::new(
            "branches",
            json!({}),
        ))
        .await
        .unwrap()
        .id;
    until("pay is proposed", || {
        orch.get(id).unwrap().unwrap().steps[1].state == StepState::AwaitingApproval
    })
    .await;
    // `report` is still running: the job is not parked under it.
    assert_eq!(orch.get(id).unwrap().unwrap().state, JobState::Running);
    until("the job is parked", || {
        orch.get(id).unwrap().unwrap().state == JobState::AwaitingApproval
    })
    .await;
    let r = orch.get(id).unwrap().unwrap();
    assert_eq!(r.steps[2].state, StepState::Succeeded);
    let job = common::approve_and_wait(&orch, &format!("{id}/pay"), "ops").await;
    assert_eq!(job.state, JobState::Succeeded);
    assert_eq!(job.steps[2].attempts, 1, "report did not run again");
    // The approved call ran on the input it was proposed with.
    let out = job.steps[1].output.as_ref().unwrap();
    assert_eq!(out["simulated"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_gated_at_their_first_step_park_a_batch_at_a_time() {
    use cascade_orchestrator::SubmitRequest;
    // Every job parks as it is admitted: admission must not nest one level per job (the stack)
    // nor claim past max_in_flight_jobs.
    let orch = common::start(
        r#"
[graph]
name = "gated"
max_in_flight_jobs = 8
max_pending_jobs = 100000

[agents.pay]
kind = "sim"
approval = "required"

[agents.after]
kind = "sim"
after = ["pay"]
"#,
    )
    .await;
    for n in 0..20_000 {
        orch.submit(SubmitRequest::new("gated", json!({ "n": n })))
            .await
            .unwrap();
    }
    until("20,000 proposals wait", || {
        orch.store().pending_approval_count("gated") == 20_000
    })
    .await;
    let snap = orch.scheduler_snapshot("gated").await.unwrap();
    assert_eq!(snap.jobs_in_flight, 0, "{snap:?}");
    assert_eq!(orch.store().pending_count("gated"), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proposal_expires_at_its_jobs_deadline_and_pages_do_not_repeat() {
    use cascade_orchestrator::job::JobState;
    let orch = common::start(
        r#"
[graph]
name = "deadlined"
deadline = "1s"

[agents.pay]
kind = "sim"
approval = "required"

[agents.email]
kind = "sim"
approval = "required"
"#,
    )
    .await;
    let id = orch
        .submit(cascade_orchestrator::SubmitRequest::new(
            "deadlined",
            json!({}),
        ))
        .await
        .unwrap()
        .id;
    until("both proposals wait", || {
        orch.store().pending_approval_count("deadlined") == 2
    })
    .await;
    // Two approvals of one job, a page of one at a time: each once, by id.
    let first = orch.approvals(Some("deadlined"), None, 1).unwrap();
    let second = orch
        .approvals(Some("deadlined"), Some(&first[0].approval.id), 1)
        .unwrap();
    assert_eq!(first[0].approval.id, format!("{id}/email"));
    assert_eq!(second[0].approval.id, format!("{id}/pay"));
    assert!(
        orch.approvals(Some("deadlined"), Some(&second[0].approval.id), 1)
            .unwrap()
            .is_empty()
    );
    // Nobody approves within the job's deadline: the proposals expire with it.
    let job = tokio::time::timeout(Duration::from_secs(30), orch.wait(id))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(job.state, JobState::Failed);
    let v = orch.approval(&format!("{id}/pay")).unwrap();
    assert_eq!(
        v.approval.decision.map(|d| d.outcome),
        Some(cascade_orchestrator::job::ApprovalOutcome::Expired)
    );
}
