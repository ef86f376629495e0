//! `cascade.v1.Cascade`: each method validates its request, calls the library API, and maps the
//! answer and errors (canonical codes with `google.rpc` details).

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::{Stream, StreamExt};
use tokio_stream::wrappers::BroadcastStream;
use tonic::{Code, Request, Response, Status};
use tonic_types::{ErrorDetails, StatusExt};

use super::convert::{
    approval_to_pb, budget_from_pb, cause_to_pb, event_to_pb, graph_event_to_pb, job_state_from_pb,
    job_to_pb, ts,
};
use super::pb;
use crate::approval::ApprovalError;
use crate::auth::{AuthError, Authenticator, Identity, Role};
use crate::config::nearest;
use crate::job::JobId;
use crate::runtime::GraphState;
use crate::store::{JobFilter, StoreError};
use crate::{Orchestrator, RaiseBudgetError, SubmitError, SubmitRequest};

const DEFAULT_PAGE_SIZE: usize = 50;

pub struct CascadeService {
    orch: Arc<Orchestrator>,
    max_input_bytes: usize,
    /// Flips to `true` when the server stops: watch streams end then.
    stopping: Option<tokio::sync::watch::Receiver<bool>>,
    audit: Option<Arc<crate::audit::log::AuditLog>>,
    /// Who may call: every RPC asks it for its role.
    auth: Arc<Authenticator>,
    limits: crate::limits::ServerLimits,
    /// Requests per identity (with authentication on).
    rate: Option<Arc<crate::limits::IdentityRate>>,
    /// Watch streams open per identity (with authentication on).
    streams: Option<Arc<crate::limits::StreamCounts>>,
    reload: Option<crate::server::Reloader>,
}

impl CascadeService {
    pub fn new(orch: Arc<Orchestrator>, max_input_bytes: usize) -> Self {
        Self {
            orch,
            max_input_bytes,
            stopping: None,
            audit: None,
            auth: Arc::new(Authenticator::disabled()),
            limits: crate::limits::ServerLimits::default(),
            rate: None,
            streams: None,
            reload: None,
        }
    }

    /// Answer ReloadGraphs with `reload`.
    pub fn with_reload(mut self, reload: Option<crate::server::Reloader>) -> Self {
        self.reload = reload;
        self
    }

    /// Hold callers to `limits`; with `rate` and `streams` (shared with the HTTP routes), to a
    /// request rate and a number of watch streams per identity.
    pub fn with_limits(
        mut self,
        limits: crate::limits::ServerLimits,
        rate: Option<Arc<crate::limits::IdentityRate>>,
        streams: Option<Arc<crate::limits::StreamCounts>>,
    ) -> Self {
        self.streams = streams;
        self.rate = rate;
        self.limits = limits;
        self
    }

    /// A watch stream of `who` (held until the stream is dropped), unless it holds its
    /// `watch_streams_per_identity` already.
    fn watch_slot(&self, who: &Identity) -> Result<Option<crate::limits::StreamSlot>, Status> {
        let Some(streams) = &self.streams else {
            return Ok(None);
        };
        streams.open(&who.name).map(Some).map_err(|n| {
            Status::with_error_details(
                Code::ResourceExhausted,
                format!(
                    "{:?} holds {n} watch streams, [server.limits] watch_streams_per_identity; close one first",
                    &*who.name
                ),
                ErrorDetails::with_retry_info(Some(Duration::from_secs(1))),
            )
        })
    }

    /// `value` of `field`, unless it is longer than `max_string_bytes`.
    fn short<'a>(&self, field: &str, value: &'a str) -> Result<&'a str, Status> {
        let max = self.limits.max_string_bytes;
        if value.len() > max {
            return Err(bad_request(
                field,
                format!(
                    "{} bytes, over [server.limits] max_string_bytes ({max})",
                    value.len()
                ),
            ));
        }
        Ok(value)
    }

    /// Check callers against `auth`.
    pub fn with_auth(mut self, auth: Arc<Authenticator>) -> Self {
        self.auth = auth;
        self
    }

    /// The caller of `req`, if it holds `role` (`what` names the RPC in the refusal).
    async fn who<T>(
        &self,
        req: &Request<T>,
        role: Role,
        what: &'static str,
    ) -> Result<Identity, Status> {
        let header = req
            .metadata()
            .get("authorization")
            .and_then(|v| v.to_str().ok());
        let peer = req
            .extensions()
            .get::<crate::listen::ConnInfo>()
            .and_then(|c| c.peer.as_deref());
        let who = self
            .auth
            .require(header, peer, role, what)
            .await
            .map_err(auth_status)?;
        if let Some(rate) = &self.rate
            && let Err(wait) = rate.take(&who.name)
        {
            return Err(Status::with_error_details(
                Code::ResourceExhausted,
                format!(
                    "{:?} calls faster than [server.limits] requests_per_second_per_identity ({}/s) allows",
                    &*who.name, self.limits.requests_per_second_per_identity
                ),
                ErrorDetails::with_retry_info(Some(wait)),
            ));
        }
        Ok(who)
    }

    /// Job `id`, if `who` may see it: another tenant's job is not found, exactly like an
    /// unknown id.
    /// Whether `who` may see job `id` (as [`Self::visible_job`], reading its tenant only).
    fn check_visible(&self, who: &Identity, id: JobId) -> Result<(), Status> {
        match self.orch.tenant_of(id).map_err(store_status)? {
            Some(t) if who.sees(&t) => Ok(()),
            _ => Err(Status::not_found(format!("job {id} not found"))),
        }
    }

    fn visible_job(&self, who: &Identity, id: JobId) -> Result<crate::job::JobRecord, Status> {
        match self.orch.get(id).map_err(store_status)? {
            Some(r) if who.sees(&r.tenant) => Ok(r),
            _ => Err(Status::not_found(format!("job {id} not found"))),
        }
    }

    /// Answer the audit RPCs from `audit`.
    pub fn with_audit(mut self, audit: Option<Arc<crate::audit::log::AuditLog>>) -> Self {
        self.audit = audit;
        self
    }

    fn audit(&self) -> Result<&Arc<crate::audit::log::AuditLog>, Status> {
        self.audit.as_ref().ok_or_else(|| {
            Status::failed_precondition(
                "this server keeps no audit log: it runs with --memory (serve with a data directory)",
            )
        })
    }

    /// The key that signs `log`'s checkpoints.
    fn verifier_key(&self, log: &crate::audit::log::AuditLog) -> Result<String, Status> {
        log.verifier_key().ok_or_else(|| {
            Status::failed_precondition(
                "the audit log signs no checkpoints: set [audit] signing_key (cascade audit new-key NAME)",
            )
        })
    }

    /// The latest checkpoint and the key that signed it.
    async fn signed_checkpoint(
        &self,
    ) -> Result<(String, String, crate::audit::checkpoint::Checkpoint), Status> {
        let log = self.audit()?;
        let key = self.verifier_key(log)?;
        let source = log.source();
        let note = blocking(move || crate::audit::log::latest_checkpoint(&source))
            .await?
            .map_err(Status::unavailable)?
            .ok_or_else(|| Status::failed_precondition("no checkpoint signed yet"))?;
        let cp = crate::audit::checkpoint::verify(&note, &key).map_err(Status::data_loss)?;
        Ok((note, key, cp))
    }
}

/// Run a read of the audit log (a file, or a PostgreSQL round trip) off the runtime's workers.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> Result<T, Status> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Status::internal(format!("reading the audit log: {e}")))
}

fn bad_request(field: &str, description: impl Into<String>) -> Status {
    let description = description.into();
    Status::with_error_details(
        Code::InvalidArgument,
        format!("{field}: {description}"),
        ErrorDetails::with_bad_request_violation(field, description),
    )
}

fn parse_job_id(field: &str, s: &str) -> Result<JobId, Status> {
    s.parse().map_err(|e: String| bad_request(field, e))
}

fn store_status(e: StoreError) -> Status {
    match e {
        StoreError::NotFound(id) => Status::not_found(format!("job {id} not found")),
        StoreError::KeyConflict { .. } => Status::already_exists(e.to_string()),
        StoreError::Full { .. } | StoreError::TenantFull { .. } | StoreError::Busy { .. } => {
            Status::resource_exhausted(e.to_string())
        }
        StoreError::Unavailable(m) => Status::unavailable(m),
    }
}

fn approval_status(e: ApprovalError) -> Status {
    match e {
        ApprovalError::InvalidId(m) => bad_request("approval_id", m),
        ApprovalError::InvalidRequest(m) => {
            let (field, description) = m.split_once(": ").unwrap_or(("request", m.as_str()));
            bad_request(field, description)
        }
        ApprovalError::NotFound(_) => Status::not_found(e.to_string()),
        ApprovalError::Stale { .. }
        | ApprovalError::Conflict { .. }
        | ApprovalError::JobEnded { .. } => Status::failed_precondition(e.to_string()),
        ApprovalError::Store(inner) => store_status(inner),
        ApprovalError::Unavailable(_) => Status::unavailable(e.to_string()),
        ApprovalError::Refused(_) => Status::permission_denied(e.to_string()),
    }
}

fn submit_status(e: SubmitError) -> Status {
    match e {
        SubmitError::UnknownGraph { .. } => Status::not_found(e.to_string()),
        SubmitError::TenantNotAllowed { .. } => Status::permission_denied(e.to_string()),
        SubmitError::Overloaded { retry_after, .. }
        | SubmitError::StoreBusy { retry_after, .. }
        | SubmitError::TenantRate { retry_after, .. }
        | SubmitError::TenantFull { retry_after, .. } => Status::with_error_details(
            Code::ResourceExhausted,
            e.to_string(),
            ErrorDetails::with_retry_info(Some(retry_after)),
        ),
        SubmitError::KeyConflict(inner) => Status::already_exists(inner.to_string()),
        SubmitError::ShuttingDown => Status::unavailable(e.to_string()),
        SubmitError::InvalidBudget(m) => bad_request("budget", m),
        SubmitError::Store(inner) => store_status(inner),
    }
}

fn trigger_to_pb(graph: &str, t: crate::triggers::TriggerView) -> pb::Trigger {
    pb::Trigger {
        graph: graph.to_string(),
        name: t.name,
        kind: t.kind.to_string(),
        tenant: t.tenant,
        state: t.state.to_string(),
        detail: t.detail,
        received: t.counts.received,
        started: t.counts.started,
        deduplicated: t.counts.deduplicated,
        dropped: t.counts.dropped,
        refused: t.counts.refused,
        dead_lettered: t.counts.dead_lettered,
    }
}

fn graph_to_pb(g: GraphState) -> pb::Graph {
    let triggers = g
        .triggers
        .iter()
        .map(|t| trigger_to_pb(&g.name, t.clone()))
        .collect();
    pb::Graph {
        name: g.name,
        description: g.description.unwrap_or_default(),
        agents: g
            .agents
            .into_iter()
            .map(|a| pb::Agent {
                name: a.name,
                kind: a.kind,
                after: a.after,
                quotas: a.quotas,
                state: a.state.to_string(),
                pause_reach: a
                    .pause
                    .as_ref()
                    .map(|p| match p.reach {
                        crate::signal::Reach::Direct => "direct",
                        crate::signal::Reach::Upstream => "upstream",
                    })
                    .unwrap_or_default()
                    .to_string(),
                pause_causes: a
                    .pause
                    .map(|p| p.causes.iter().map(cause_to_pb).collect())
                    .unwrap_or_default(),
                queue_depth: a.queue_depth as u64,
                in_flight: a.in_flight,
            })
            .collect(),
        quotas: g
            .quotas
            .into_iter()
            .map(|q| {
                let mut limits = Vec::new();
                if let Some(r) = &q.requests_limit {
                    limits.push(format!("{r} requests"));
                }
                if let Some(t) = &q.tokens_limit {
                    limits.push(format!("{t} tokens"));
                }
                if let Some(c) = &q.cost_limit {
                    limits.push(format!(
                        "{c} (${:.4} spent)",
                        q.cost_used_usd.unwrap_or(0.0)
                    ));
                }
                if let Some(c) = q.max_concurrency {
                    limits.push(format!("{c} concurrent"));
                }
                if let Some(b) = &q.upstream_requests {
                    limits.push(format!(
                        "upstream states {} requests ({:.1}/s)",
                        b.limit, b.per_second
                    ));
                }
                if let Some(b) = &q.upstream_tokens {
                    limits.push(format!(
                        "upstream states {} tokens ({:.0}/s)",
                        b.limit, b.per_second
                    ));
                }
                if let Some(r) = q.learned_requests_per_second {
                    limits.push(format!("{r:.1}/s requests (learned)"));
                } else if q.implicit && q.upstream_requests.is_none() {
                    limits.push("none learned yet".into());
                }
                let mut available = Vec::new();
                if let Some(r) = q.requests_available {
                    available.push(format!("requests {r}"));
                }
                if let Some(t) = q.tokens_available {
                    available.push(format!("tokens {t}"));
                }
                if let Some(c) = q.max_concurrency {
                    available.push(format!("slots {}", c.saturating_sub(q.in_flight)));
                }
                pb::Quota {
                    name: q.name,
                    limits: limits.join(", "),
                    available: available.join(", "),
                    exhausted_until: q
                        .exhausted_for_ms
                        .map(|ms| ts(crate::clock::now() + Duration::from_millis(ms))),
                    circuit: q
                        .circuit
                        .and_then(|c| serde_json::to_value(c).ok())
                        .and_then(|v| v.as_str().map(String::from))
                        .unwrap_or_default(),
                    exhausted_reason: q
                        .exhausted_reason
                        .map(|r| r.to_string())
                        .unwrap_or_default(),
                    effective_rate_multiplier: q.effective_rate_multiplier,
                    implicit: q.implicit,
                    learned_requests_per_second: q.learned_requests_per_second.unwrap_or(0.0),
                    upstream_requests: q.upstream_requests.map(upstream_limit_pb),
                    upstream_tokens: q.upstream_tokens.map(upstream_limit_pb),
                }
            })
            .collect(),
        pending_jobs: g.pending_jobs as u64,
        running_jobs: g.running_jobs as u64,
        triggers,
    }
}

fn upstream_limit_pb(b: crate::quota::UpstreamBucketSnapshot) -> pb::UpstreamLimit {
    pb::UpstreamLimit {
        limit: b.limit,
        available: b.available,
        per_second: b.per_second,
        measured: b.measured,
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

#[tonic::async_trait]
impl pb::cascade_server::Cascade for CascadeService {
    async fn get_audit_checkpoint(
        &self,
        req: Request<pb::GetAuditCheckpointRequest>,
    ) -> Result<Response<pb::AuditCheckpoint>, Status> {
        self.who(&req, Role::Read, "GetAuditCheckpoint").await?;
        let (note, verifier_key, cp) = self.signed_checkpoint().await?;
        Ok(Response::new(pb::AuditCheckpoint {
            note,
            tree_size: cp.size,
            root_hash: cp.root.to_vec(),
            verifier_key,
        }))
    }

    async fn prove_audit_record(
        &self,
        req: Request<pb::ProveAuditRecordRequest>,
    ) -> Result<Response<pb::AuditProof>, Status> {
        self.who(&req, Role::Admin, "ProveAuditRecord").await?;
        let seq = req.into_inner().seq;
        let log = self.audit()?;
        let key = self.verifier_key(log)?;
        let source = log.source();
        let p = blocking(move || crate::audit::log::prove(&source, seq, &key))
            .await?
            .map_err(Status::failed_precondition)?;
        Ok(Response::new(pb::AuditProof {
            seq,
            record: p.record,
            leaf_hash: p.leaf.to_vec(),
            tree_size: p.tree_size,
            root_hash: p.root.to_vec(),
            inclusion_proof: p.path.iter().map(|h| h.to_vec()).collect(),
            checkpoint: p.checkpoint,
        }))
    }

    async fn export_audit(
        &self,
        req: Request<pb::ExportAuditRequest>,
    ) -> Result<Response<pb::ExportAuditResponse>, Status> {
        const MAX_PAGE: usize = 10_000;
        self.who(&req, Role::Admin, "ExportAudit").await?;
        let r = req.into_inner();
        let limit = match r.page_size as usize {
            0 => MAX_PAGE,
            n => n.min(MAX_PAGE),
        };
        let log = self.audit()?.clone();
        let page = blocking(move || {
            log.page(
                r.after_seq,
                limit,
                (!r.tenant.is_empty()).then_some(r.tenant.as_str()),
            )
        })
        .await?
        .map_err(Status::unavailable)?;
        let next_after_seq = if page.len() == limit {
            page.last().map_or(0, |(seq, _, _)| *seq)
        } else {
            0
        };
        Ok(Response::new(pb::ExportAuditResponse {
            records: page
                .into_iter()
                .map(|(seq, record, leaf)| pb::AuditRecord {
                    seq,
                    record,
                    leaf_hash: leaf.to_vec(),
                })
                .collect(),
            next_after_seq,
        }))
    }

    async fn submit_job(
        &self,
        req: Request<pb::SubmitJobRequest>,
    ) -> Result<Response<pb::SubmitJobResponse>, Status> {
        let who = self.who(&req, Role::Submit, "SubmitJob").await?;
        let r = req.into_inner();
        let tenant = who.tenant_for(&r.tenant).map_err(auth_status)?;
        if r.graph.is_empty() {
            return Err(bad_request("graph", "name the graph to run"));
        }
        self.short("graph", &r.graph)?;
        self.short("tenant", &r.tenant)?;
        let max_key = self.limits.max_idempotency_key_bytes;
        if r.idempotency_key.len() > max_key {
            return Err(bad_request(
                "idempotency_key",
                format!(
                    "{} bytes, over [server.limits] max_idempotency_key_bytes ({max_key})",
                    r.idempotency_key.len()
                ),
            ));
        }
        if r.labels.len() > self.limits.max_labels {
            return Err(bad_request(
                "labels",
                format!(
                    "{} labels, over [server.limits] max_labels ({})",
                    r.labels.len(),
                    self.limits.max_labels
                ),
            ));
        }
        for (k, v) in &r.labels {
            self.short("labels", k)?;
            self.short("labels", v)?;
        }
        self.short("callback_url", &r.callback_url)?;
        if crate::limits::json_depth_over(r.input_json.as_bytes(), self.limits.max_json_depth) {
            return Err(bad_request(
                "input_json",
                format!(
                    "nests arrays and objects deeper than [server.limits] max_json_depth ({})",
                    self.limits.max_json_depth
                ),
            ));
        }
        if r.input_json.len() > self.max_input_bytes {
            return Err(bad_request(
                "input_json",
                format!(
                    "input is {} bytes, over the limit of {} bytes; pass a reference (a URL or id) instead of the data",
                    r.input_json.len(),
                    self.max_input_bytes
                ),
            ));
        }
        let input: serde_json::Value = if r.input_json.trim().is_empty() {
            serde_json::Value::Object(Default::default())
        } else {
            serde_json::from_str(&r.input_json)
                .map_err(|e| bad_request("input_json", format!("not valid JSON: {e}")))?
        };
        let deadline = match r.deadline {
            None => None,
            Some(d) => {
                let d = Duration::try_from(d)
                    .map_err(|_| bad_request("deadline", "must be a positive duration"))?;
                if d.is_zero() {
                    return Err(bad_request("deadline", "must be a positive duration"));
                }
                Some(d)
            }
        };
        let callback_url = if r.callback_url.is_empty() {
            None
        } else {
            let u = reqwest::Url::parse(&r.callback_url)
                .map_err(|e| bad_request("callback_url", format!("not a URL: {e}")))?;
            if !matches!(u.scheme(), "http" | "https") {
                return Err(bad_request("callback_url", "must be an http or https URL"));
            }
            Some(r.callback_url)
        };
        let request = SubmitRequest {
            graph: r.graph,
            input,
            idempotency_key: (!r.idempotency_key.is_empty()).then_some(r.idempotency_key),
            tenant,
            labels: {
                let mut labels: std::collections::BTreeMap<String, String> =
                    r.labels.into_iter().collect();
                // Who submitted it, for approval separation (a caller's own label of the name
                // is overwritten: it cannot pose as another).
                if self.auth.enabled() && self.orch.model().auth.approval_separation {
                    labels.insert(crate::auth::SUBMITTER_LABEL.into(), who.name.to_string());
                }
                labels
            },
            deadline,
            callback_url,
            budget: r.budget.as_ref().map(budget_from_pb),
        };
        let s = self.orch.submit(request).await.map_err(submit_status)?;
        Ok(Response::new(pb::SubmitJobResponse {
            job_id: s.id.to_string(),
            deduplicated: s.deduplicated,
        }))
    }

    async fn get_job(&self, req: Request<pb::GetJobRequest>) -> Result<Response<pb::Job>, Status> {
        let who = self.who(&req, Role::Read, "GetJob").await?;
        let id = parse_job_id("job_id", &req.into_inner().job_id)?;
        let r = self.visible_job(&who, id)?;
        Ok(Response::new(job_to_pb(&r)))
    }

    type WatchJobStream = BoxStream<pb::JobEvent>;

    async fn watch_job(
        &self,
        req: Request<pb::WatchJobRequest>,
    ) -> Result<Response<Self::WatchJobStream>, Status> {
        let who = self.who(&req, Role::Read, "WatchJob").await?;
        let id = parse_job_id("job_id", &req.into_inner().job_id)?;
        // An administrator (everyone, without authentication) sees every job: no record is
        // read for it on this per-job path (an unknown id is refused by the subscription).
        if !who.is_admin() {
            self.check_visible(&who, id)?;
        }
        let slot = self.watch_slot(&who)?;
        let events = self.orch.subscribe(id).map_err(store_status)?;
        Ok(Response::new(self.until_stopped(Box::pin(events.map(
            move |e| {
                // The stream's slot goes with it.
                let _held = &slot;
                Ok(event_to_pb(&e))
            },
        )))))
    }

    async fn list_jobs(
        &self,
        req: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::ListJobsResponse>, Status> {
        let who = self.who(&req, Role::Read, "ListJobs").await?;
        let r = req.into_inner();
        // A value this server does not know is a mistake to report, not "no filter".
        let state = pb::JobState::try_from(r.state).map_err(|_| {
            bad_request(
                "state",
                format!(
                    "{} is not a JobState; use JOB_STATE_PENDING (1) … JOB_STATE_CANCELLED, or 0 for any state",
                    r.state
                ),
            )
        })?;
        let mut filter = JobFilter {
            graph: (!r.graph.is_empty()).then_some(r.graph),
            state: job_state_from_pb(state),
            // A tenant's caller lists its tenant's jobs only.
            tenant: (!who.is_admin())
                .then(|| who.tenant.as_deref().map(str::to_string))
                .flatten(),
            ..Default::default()
        };
        for pair in r.label_selector.split(',').filter(|p| !p.trim().is_empty()) {
            let (k, v) = pair.split_once('=').ok_or_else(|| {
                bad_request(
                    "label_selector",
                    format!("{} is not key=value", crate::text::echo(pair)),
                )
            })?;
            filter
                .labels
                .insert(k.trim().to_string(), v.trim().to_string());
        }
        if !r.page_token.is_empty() {
            filter.before = Some(parse_job_id("page_token", &r.page_token)?);
        }
        let size = match r.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(self.limits.max_page_size),
        };
        filter.limit = size + 1;
        let mut jobs = self.orch.list(&filter).map_err(store_status)?;
        let next = if jobs.len() > size {
            jobs.truncate(size);
            jobs.last().map(|j| j.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListJobsResponse {
            jobs: jobs.iter().map(job_to_pb).collect(),
            next_page_token: next,
        }))
    }

    async fn cancel_job(
        &self,
        req: Request<pb::CancelJobRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let who = self.who(&req, Role::Submit, "CancelJob").await?;
        let r = req.into_inner();
        let id = parse_job_id("job_id", &r.job_id)?;
        self.check_visible(&who, id)?;
        let reason = if r.reason.is_empty() {
            "cancelled by request"
        } else {
            self.short("reason", &r.reason)?
        };
        let job = self.orch.cancel(id, reason).await.map_err(store_status)?;
        Ok(Response::new(job_to_pb(&job)))
    }

    async fn raise_job_budget(
        &self,
        req: Request<pb::RaiseJobBudgetRequest>,
    ) -> Result<Response<pb::Job>, Status> {
        let who = self.who(&req, Role::Approve, "RaiseJobBudget").await?;
        let r = req.into_inner();
        let id = parse_job_id("job_id", &r.job_id)?;
        self.check_visible(&who, id)?;
        let budget = r
            .budget
            .as_ref()
            .map(budget_from_pb)
            .ok_or_else(|| bad_request("budget", "set max_tokens, max_cost_usd or both"))?;
        let job = self
            .orch
            .raise_budget(id, budget)
            .await
            .map_err(|e| match e {
                RaiseBudgetError::Invalid(m) => {
                    let (field, description) = m.split_once(": ").unwrap_or(("budget", m.as_str()));
                    bad_request(field, description)
                }
                RaiseBudgetError::Ended(..) => Status::failed_precondition(e.to_string()),
                RaiseBudgetError::Unavailable => Status::unavailable(e.to_string()),
                RaiseBudgetError::Store(inner) => store_status(inner),
            })?;
        Ok(Response::new(job_to_pb(&job)))
    }

    async fn list_approvals(
        &self,
        req: Request<pb::ListApprovalsRequest>,
    ) -> Result<Response<pb::ListApprovalsResponse>, Status> {
        let who = self.who(&req, Role::Read, "ListApprovals").await?;
        let r = req.into_inner();
        let size = match r.page_size as usize {
            0 => DEFAULT_PAGE_SIZE,
            n => n.min(self.limits.max_page_size),
        };
        let graph = (!r.graph.is_empty()).then_some(r.graph.as_str());
        if let Some(g) = graph
            && !self.orch.graph_names().iter().any(|n| &**n == g)
        {
            let names: Vec<String> = self
                .orch
                .graph_names()
                .iter()
                .map(|n| n.to_string())
                .collect();
            let hint = (g.len() <= 256)
                .then(|| nearest(g, names.iter().map(String::as_str)))
                .flatten()
                .map(|n| format!("; did you mean {n:?}?"))
                .unwrap_or_default();
            return Err(Status::not_found(format!(
                "graph {} not found{hint}",
                crate::text::echo(g)
            )));
        }
        // The caller's tenant's approvals only (filtered in the store, before the page).
        let after = (!r.page_token.is_empty()).then_some(r.page_token.as_str());
        let mut list = self
            .orch
            .approvals_of(graph, after, size + 1, who.only_tenant())
            .map_err(store_status)?;
        let next = if list.len() > size {
            list.truncate(size);
            list.last()
                .map(|v| v.approval.id.clone())
                .unwrap_or_default()
        } else {
            String::new()
        };
        Ok(Response::new(pb::ListApprovalsResponse {
            approvals: list.iter().map(approval_to_pb).collect(),
            next_page_token: next,
        }))
    }

    async fn get_approval(
        &self,
        req: Request<pb::GetApprovalRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        let who = self.who(&req, Role::Read, "GetApproval").await?;
        let r = req.into_inner();
        let view = self
            .orch
            .approval(&r.approval_id)
            .ok()
            .filter(|v| who.sees(&v.tenant));
        match view {
            Some(view) => Ok(Response::new(approval_to_pb(&view))),
            None => Err(approval_status(
                self.orch.approval(&r.approval_id).err().unwrap_or(
                    crate::approval::ApprovalError::NotFound(
                        r.approval_id.chars().take(200).collect(),
                    ),
                ),
            )),
        }
    }

    async fn resolve_approval(
        &self,
        req: Request<pb::ResolveApprovalRequest>,
    ) -> Result<Response<pb::Approval>, Status> {
        let who = self.who(&req, Role::Approve, "ResolveApproval").await?;
        let r = req.into_inner();
        self.short("reason", &r.reason)?;
        self.short("approver", &r.approver)?;
        // With authentication on, the approver is who the credential says.
        let approver = if self.auth.enabled() {
            who.name.to_string()
        } else {
            r.approver.clone()
        };
        let approve = match pb::ApprovalDecision::try_from(r.decision) {
            Ok(pb::ApprovalDecision::Approve) => true,
            Ok(pb::ApprovalDecision::Reject) => false,
            _ => return Err(bad_request("decision", "APPROVE or REJECT")),
        };
        let resolved = self
            .orch
            .resolve_approval_as(
                &who,
                &r.approval_id,
                &r.proposal_sha256,
                approve,
                &approver,
                &r.reason,
            )
            .await
            .map_err(approval_status)?;
        Ok(Response::new(approval_to_pb(&resolved.approval)))
    }

    async fn list_graphs(
        &self,
        req: Request<pb::ListGraphsRequest>,
    ) -> Result<Response<pb::ListGraphsResponse>, Status> {
        self.who(&req, Role::Read, "ListGraphs").await?;
        let mut graphs = Vec::new();
        for name in self.orch.graph_names() {
            if let Some(g) = self.orch.graph_state(&name).await {
                graphs.push(graph_to_pb(g));
            }
        }
        Ok(Response::new(pb::ListGraphsResponse { graphs }))
    }

    async fn get_graph(
        &self,
        req: Request<pb::GetGraphRequest>,
    ) -> Result<Response<pb::Graph>, Status> {
        self.who(&req, Role::Read, "GetGraph").await?;
        let name = req.into_inner().name;
        match self.orch.graph_state(&name).await {
            Some(g) => Ok(Response::new(graph_to_pb(g))),
            None => Err(self.unknown_graph(&name)),
        }
    }

    async fn reload_graphs(
        &self,
        req: Request<pb::ReloadGraphsRequest>,
    ) -> Result<Response<pb::ReloadGraphsResponse>, Status> {
        self.who(&req, Role::Admin, "ReloadGraphs").await?;
        let Some(reload) = self.reload.clone() else {
            return Err(Status::failed_precondition(
                "this server cannot reload its graphs in place: it keeps jobs in memory only (--memory), or runs inside another program; restart it instead",
            ));
        };
        match tokio::task::spawn_blocking(move || (reload.0)()).await {
            Ok(Ok(graphs)) => Ok(Response::new(pb::ReloadGraphsResponse { graphs })),
            Ok(Err(errors)) => {
                // The whole list, unless it would pass what a client takes in a status.
                let mut message =
                    format!("the files were not reloaded (the running graphs stay):\n{errors}");
                if message.len() > 4096 {
                    let cut = message.floor_char_boundary(4000);
                    message.truncate(cut);
                    message.push_str("\n… (run `cascade graph check` for every error)");
                }
                Err(Status::invalid_argument(message))
            }
            Err(_) => Err(Status::internal("reading the files failed")),
        }
    }

    async fn list_triggers(
        &self,
        req: Request<pb::ListTriggersRequest>,
    ) -> Result<Response<pb::ListTriggersResponse>, Status> {
        self.who(&req, Role::Read, "ListTriggers").await?;
        let graph = req.into_inner().graph;
        if !graph.is_empty() && self.orch.pending_room(&graph).is_none() {
            return Err(self.unknown_graph(&graph));
        }
        let triggers = self
            .orch
            .triggers()
            .all()
            .iter()
            .filter(|t| graph.is_empty() || *t.model.graph == *graph)
            .map(|t| trigger_to_pb(&t.model.graph, t.view()))
            .collect();
        Ok(Response::new(pb::ListTriggersResponse { triggers }))
    }

    async fn pause_trigger(
        &self,
        req: Request<pb::TriggerRequest>,
    ) -> Result<Response<pb::Trigger>, Status> {
        self.who(&req, Role::Admin, "PauseTrigger").await?;
        self.set_trigger_paused(req.into_inner(), true)
    }

    async fn resume_trigger(
        &self,
        req: Request<pb::TriggerRequest>,
    ) -> Result<Response<pb::Trigger>, Status> {
        self.who(&req, Role::Admin, "ResumeTrigger").await?;
        self.set_trigger_paused(req.into_inner(), false)
    }

    async fn list_nodes(
        &self,
        req: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::ListNodesResponse>, Status> {
        self.who(&req, Role::Read, "ListNodes").await?;
        let ms = |t: std::time::SystemTime| {
            t.duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64)
        };
        let nodes = match self.orch.store().nodes().map_err(store_status)? {
            Some(nodes) => nodes
                .into_iter()
                .map(|n| pb::Node {
                    id: n.id,
                    address: n.address,
                    last_heartbeat_ms: ms(n.last_heartbeat),
                    started_ms: ms(n.started),
                    jobs_leased: n.jobs_leased,
                    alive: n.alive,
                    this_node: n.this_node,
                })
                .collect(),
            // A store of its own: this process is the whole cluster, and holds every
            // unfinished job it has.
            None => {
                let mut held = 0;
                for g in self.orch.graph_names() {
                    held += self.orch.store().pending_count(&g) as u64;
                    held += self
                        .orch
                        .scheduler_snapshot(&g)
                        .await
                        .map_or(0, |s| s.jobs_in_flight as u64);
                }
                let now = ms(crate::clock::now());
                vec![pb::Node {
                    id: crate::store::host_name(),
                    address: String::new(),
                    last_heartbeat_ms: now,
                    started_ms: now,
                    jobs_leased: held,
                    alive: true,
                    this_node: true,
                }]
            }
        };
        Ok(Response::new(pb::ListNodesResponse { nodes }))
    }

    type WatchGraphStream = BoxStream<pb::GraphEvent>;

    async fn watch_graph(
        &self,
        req: Request<pb::WatchGraphRequest>,
    ) -> Result<Response<Self::WatchGraphStream>, Status> {
        let who = self.who(&req, Role::Read, "WatchGraph").await?;
        let slot = self.watch_slot(&who)?;
        let name = req.into_inner().name;
        let Some(state) = self.orch.graph_state(&name).await else {
            return Err(self.unknown_graph(&name));
        };
        let quotas: Vec<String> = state.quotas.iter().map(|q| q.name.clone()).collect();
        let stream = BroadcastStream::new(self.orch.watch_graphs()).filter_map(move |e| {
            let keep = match &e {
                Ok(ev) => match ev.graph.as_deref() {
                    Some(g) => g == name,
                    // Quota events concern every graph drawing on the quota.
                    None => match &ev.kind {
                        crate::signal::GraphEventKind::QuotaExhausted { quota, .. }
                        | crate::signal::GraphEventKind::QuotaAvailable { quota }
                        | crate::signal::GraphEventKind::CircuitChanged { quota, .. } => {
                            quotas.iter().any(|q| **q == **quota)
                        }
                        _ => false,
                    },
                },
                Err(_) => true,
            };
            // The stream's slot goes with it.
            let _held = &slot;
            let out = match e {
                Ok(ev) if keep => Some(Ok(graph_event_to_pb(&ev))),
                Ok(_) => None,
                Err(lagged) => Some(Err(Status::data_loss(format!(
                    "the watcher fell behind and missed events ({lagged}); call GetGraph and watch again"
                )))),
            };
            futures::future::ready(out)
        });
        Ok(Response::new(self.until_stopped(Box::pin(stream))))
    }
}

impl CascadeService {
    /// End every watch stream with UNAVAILABLE when `stopping` turns `true`: a watch of a job
    /// that runs for hours must not hold the server's shutdown.
    pub fn with_stop(mut self, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stopping = Some(stopping);
        self
    }

    /// `stream`, ended by the server's stop with an UNAVAILABLE status the client can act on.
    fn until_stopped<T: Send + 'static>(&self, stream: BoxStream<T>) -> BoxStream<T> {
        let Some(stopping) = self.stopping.clone() else {
            return stream;
        };
        Box::pin(futures::stream::unfold(
            Some((stream, stopping)),
            |state| async move {
                let (mut stream, mut stopping) = state?;
                // `None`: the server stops (a dropped sender means it is gone too).
                let next = tokio::select! {
                    item = stream.next() => Some(item),
                    _ = stopping.wait_for(|s| *s) => None,
                };
                match next {
                    Some(item) => item.map(|i| (i, Some((stream, stopping)))),
                    None => Some((
                        Err(Status::unavailable(
                            "the server is shutting down; watch again once it is back",
                        )),
                        None,
                    )),
                }
            },
        ))
    }

    fn set_trigger_paused(
        &self,
        req: pb::TriggerRequest,
        paused: bool,
    ) -> Result<Response<pb::Trigger>, Status> {
        if self.orch.pending_room(&req.graph).is_none() {
            return Err(self.unknown_graph(&req.graph));
        }
        let t = self
            .orch
            .triggers()
            .set_paused(self.orch.store().as_ref(), &req.graph, &req.trigger, paused)
            .map_err(|e| Status::not_found(e.to_string()))?;
        Ok(Response::new(trigger_to_pb(&t.model.graph, t.view())))
    }

    fn unknown_graph(&self, name: &str) -> Status {
        let names = self.orch.graph_names();
        // (A name far longer than any graph's is nearest to none.)
        let hint = (name.len() <= 256)
            .then(|| nearest(name, names.iter().map(|n| &**n)))
            .flatten()
            .map(|n| format!("; did you mean {n:?}?"))
            .unwrap_or_default();
        Status::not_found(format!("unknown graph {}{hint}", crate::text::echo(name)))
    }
}

/// A refused credential is UNAUTHENTICATED; a missing role or another tenant, PERMISSION_DENIED.
pub(crate) fn auth_status(e: AuthError) -> Status {
    if e.is_busy() {
        return Status::unavailable(e.to_string());
    }
    if e.is_unauthenticated() {
        Status::unauthenticated(e.to_string())
    } else {
        Status::permission_denied(e.to_string())
    }
}
