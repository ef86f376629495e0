//! The dashboard's jobs: the `/jobs` and `/jobs/{id}` pages and the JSON they read
//! (`/api/jobs`, `/api/jobs/{id}`, `/api/approvals`), and the approve/reject buttons'
//! `POST /api/approvals/{job}/{agent}` (and `…/{n}` for a tool call of a tool-using step).
//!
//! The POST takes JSON only: a page of another origin cannot send that without a CORS preflight,
//! which this server never answers, so a visited page cannot decide for an operator. (Who may
//! decide at all is the authentication issue's.)

use std::sync::Arc;
use std::time::SystemTime;

use axum::Router;
use axum::extract::{Extension, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::Orchestrator;
use crate::approval::ApprovalError;
use crate::auth::Identity;
use crate::job::{ApprovalView, JobEvent, JobId, JobRecord, JobState};
use crate::store::JobFilter;

const PAGE: &str = include_str!("jobs.html");

/// Jobs a page of `/api/jobs` lists by default, and at most.
const DEFAULT_LIMIT: usize = 50;
const MAX_LIMIT: usize = 500;

/// The routes, over `orch`.
pub(crate) fn routes(orch: Arc<Orchestrator>) -> Router {
    Router::new()
        .route("/jobs", get(page))
        .route("/jobs/{id}", get(page))
        .route("/api/jobs", get(list))
        .route("/api/jobs/{id}", get(one))
        .route("/api/approvals", get(approvals))
        .route("/api/approvals/{job}/{agent}", post(decide))
        .route("/api/approvals/{job}/{agent}/{n}", post(decide_sub_step))
        .with_state(orch)
}

async fn page() -> Html<&'static str> {
    Html(PAGE)
}

fn ms(t: SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({"error": message.into()}))).into_response()
}

fn summary(r: &JobRecord) -> Value {
    json!({
        "job_id": r.id.to_string(),
        "graph": &*r.graph,
        "state": r.state,
        "created_at_ms": ms(r.created_at),
        "updated_at_ms": ms(r.updated_at),
        "error": r.error,
        "usage": r.usage,
        "budget": r.budget,
        "steps_done": r.steps.iter().filter(|s| s.state == crate::job::StepState::Succeeded).count(),
        "steps": r.steps.len(),
    })
}

fn approval_json(v: &ApprovalView) -> Value {
    let a = &v.approval;
    json!({
        "approval_id": a.id,
        "job_id": v.job_id.to_string(),
        "graph": &*v.graph,
        "agent": &*v.agent,
        "state": a.decision.as_ref().map_or("pending", |d| d.outcome.as_str()),
        "proposal": &*a.proposal,
        "proposal_sha256": a.sha256,
        "created_at_ms": ms(a.created_at),
        "expires_at_ms": a.expires_at.map(ms),
        "approver": a.decision.as_ref().map(|d| d.approver.clone()),
        "reason": a.decision.as_ref().map(|d| d.reason.clone()),
        "decided_at_ms": a.decision.as_ref().map(|d| ms(d.at)),
        "job_state": v.job_state,
    })
}

fn event_json(e: &JobEvent) -> Value {
    let mut v = serde_json::to_value(e).unwrap_or(Value::Null);
    if let Value::Object(m) = &mut v {
        m.remove("job_id");
        m.insert("at_ms".into(), json!(ms(e.at)));
        m.remove("at");
        if let Some(last) = e.last_at {
            m.insert("last_at_ms".into(), json!(ms(last)));
        }
        m.remove("last_at");
        m.insert("count".into(), json!(e.count));
    }
    v
}

#[derive(Deserialize)]
struct ListQuery {
    graph: Option<String>,
    state: Option<String>,
    before: Option<String>,
    limit: Option<usize>,
}

fn parse_state(s: &str) -> Option<JobState> {
    serde_json::from_value(Value::String(s.to_string())).ok()
}

/// Jobs, newest first, filtered by graph and state, a page at a time (`before` the last id).
async fn list(
    State(orch): State<Arc<Orchestrator>>,
    who: Option<Extension<Identity>>,
    Query(q): Query<ListQuery>,
) -> Response {
    let who = caller(who);
    let state = match q.state.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(s) => match parse_state(s) {
            Some(st) => Some(st),
            None => {
                return error(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "state {s:?}: use pending, running, awaiting_approval, budget_exceeded, succeeded, failed or cancelled"
                    ),
                );
            }
        },
    };
    let before = match q.before.as_deref().filter(|s| !s.is_empty()) {
        None => None,
        Some(b) => match b.parse::<JobId>() {
            Ok(id) => Some(id),
            Err(e) => return error(StatusCode::BAD_REQUEST, format!("before: {e}")),
        },
    };
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    let filter = JobFilter {
        graph: q.graph.filter(|g| !g.is_empty()),
        state,
        labels: Default::default(),
        before,
        limit: limit + 1,
        // A tenant's caller lists its tenant's jobs only.
        tenant: (!who.is_admin())
            .then(|| who.tenant.as_deref().map(str::to_string))
            .flatten(),
    };
    match orch.list(&filter) {
        Ok(mut jobs) => {
            let next = (jobs.len() > limit).then(|| {
                jobs.truncate(limit);
                jobs.last().map(|j| j.id.to_string())
            });
            axum::Json(json!({
                "jobs": jobs.iter().map(summary).collect::<Vec<_>>(),
                "next": next.flatten(),
            }))
            .into_response()
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

/// One job: its steps (state, attempts, times, tokens, cost), its events as stored (repeats
/// folded), and its approvals with their proposals.
async fn one(
    State(orch): State<Arc<Orchestrator>>,
    who: Option<Extension<Identity>>,
    Path(id): Path<String>,
) -> Response {
    let who = caller(who);
    let id: JobId = match id.parse() {
        Ok(id) => id,
        Err(e) => return error(StatusCode::BAD_REQUEST, e),
    };
    let record = match orch.get(id) {
        // Another tenant's job is not found, exactly like an unknown id.
        Ok(Some(r)) if who.sees(&r.tenant) => r,
        Ok(_) => return error(StatusCode::NOT_FOUND, format!("job {id} not found")),
        Err(e) => return error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    };
    let events = orch.store().events(id, 0).unwrap_or_default();
    let mut job = summary(&record);
    job["input"] = (*record.input).clone();
    job["output"] = record.output.as_deref().cloned().unwrap_or(Value::Null);
    job["steps"] = record
        .steps
        .iter()
        .map(|s| {
            json!({
                "agent": &*s.agent,
                "state": s.state,
                "attempts": s.attempts,
                "started_at_ms": s.started_at.map(ms),
                "finished_at_ms": s.finished_at.map(ms),
                "duration_ms": s.started_at.zip(s.finished_at).and_then(|(a, b)| b.duration_since(a).ok()).map(|d| d.as_millis() as u64),
                "usage": s.usage,
                "error": s.error,
                "sub_steps": s.sub_steps.iter().map(|x| json!({
                    "n": x.n,
                    "kind": x.kind,
                    "state": x.state,
                    "tool": (!x.server.is_empty()).then(|| format!("{}.{}", x.server, x.tool)),
                    "arguments": x.call.as_ref().map(|c| &c.arguments),
                    "tool_calls": x.tool_calls.iter().map(|c| &c.name).collect::<Vec<_>>(),
                    "text": x.text,
                    "result_bytes": x.result_bytes,
                    "usage": x.usage,
                    "duration_ms": x.finished_at.and_then(|b| b.duration_since(x.started_at).ok()).map(|d| d.as_millis() as u64),
                    "error": x.error,
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    axum::Json(json!({
        "job": job,
        "events": events.iter().map(event_json).collect::<Vec<_>>(),
        "approvals": ApprovalView::of(&record).map(|v| approval_json(&v)).collect::<Vec<_>>(),
    }))
    .into_response()
}

#[derive(Deserialize)]
struct ApprovalsQuery {
    graph: Option<String>,
    after: Option<String>,
    limit: Option<usize>,
}

/// Approvals waiting for a decision, oldest job first.
async fn approvals(
    State(orch): State<Arc<Orchestrator>>,
    who: Option<Extension<Identity>>,
    Query(q): Query<ApprovalsQuery>,
) -> Response {
    let who = caller(who);
    let limit = q.limit.unwrap_or(DEFAULT_LIMIT).clamp(1, MAX_LIMIT);
    match orch.approvals_of(
        q.graph.as_deref().filter(|g| !g.is_empty()),
        q.after.as_deref().filter(|a| !a.is_empty()),
        limit,
        who.only_tenant(),
    ) {
        Ok(list) => axum::Json(json!({
            "approvals": list.iter().map(approval_json).collect::<Vec<_>>(),
        }))
        .into_response(),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

#[derive(Deserialize)]
struct Decision {
    decision: String,
    sha256: String,
    /// Who decides (with authentication on, the credential says, and this is not read).
    #[serde(default)]
    approver: String,
    #[serde(default)]
    reason: String,
}

/// A decision from the dashboard's buttons, bound to the hash the page showed.
async fn decide(
    State(orch): State<Arc<Orchestrator>>,
    who: Option<Extension<Identity>>,
    Path((job, agent)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    decide_id(orch, caller(who), format!("{job}/{agent}"), headers, body).await
}

/// A decision on tool call `n` of a tool-using step.
async fn decide_sub_step(
    State(orch): State<Arc<Orchestrator>>,
    who: Option<Extension<Identity>>,
    Path((job, agent, n)): Path<(String, String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    decide_id(
        orch,
        caller(who),
        format!("{job}/{agent}/{n}"),
        headers,
        body,
    )
    .await
}

/// Who the server's authentication said made the request (the anonymous administrator when
/// authentication is off: the server's layer always says).
fn caller(who: Option<Extension<Identity>>) -> Identity {
    who.map_or_else(Identity::anonymous, |Extension(w)| w)
}

async fn decide_id(
    orch: Arc<Orchestrator>,
    who: Identity,
    id: String,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let json_body = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.starts_with("application/json"));
    if !json_body {
        return error(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "send the decision as application/json",
        );
    }
    let d: Decision = match serde_json::from_slice(&body) {
        Ok(d) => d,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                format!(
                    "{e}; send {{\"decision\": \"approve\" | \"reject\", \"sha256\", \"approver\", \"reason\"}}"
                ),
            );
        }
    };
    let approve = match d.decision.as_str() {
        "approve" => true,
        "reject" => false,
        other => {
            return error(
                StatusCode::BAD_REQUEST,
                format!("decision {other:?}: approve or reject"),
            );
        }
    };
    let approver = match &who.tenant {
        Some(_) => who.name.to_string(),
        None => d.approver.clone(),
    };
    match orch
        .resolve_approval_as(&who, &id, &d.sha256, approve, &approver, &d.reason)
        .await
    {
        Ok(r) => axum::Json(approval_json(&r.approval)).into_response(),
        Err(e) => {
            let status = match &e {
                ApprovalError::InvalidId(_) | ApprovalError::InvalidRequest(_) => {
                    StatusCode::BAD_REQUEST
                }
                ApprovalError::NotFound(_) => StatusCode::NOT_FOUND,
                ApprovalError::Stale { .. }
                | ApprovalError::Conflict { .. }
                | ApprovalError::JobEnded { .. } => StatusCode::CONFLICT,
                ApprovalError::Store(_) | ApprovalError::Unavailable(_) => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                ApprovalError::Refused(_) => StatusCode::FORBIDDEN,
            };
            error(status, e.to_string())
        }
    }
}
