//! The running orchestrator and its library API: start it from a model, submit jobs, await or
//! follow them, cancel them, shut it down.
//!
//! ```no_run
//! # async fn demo() -> Result<(), Box<dyn std::error::Error>> {
//! use cascade_orchestrator::{Orchestrator, SubmitRequest, config};
//! let model = config::load_graph_files(&["examples/graphs/fanout.toml".into()], &Default::default())?;
//! let orch = Orchestrator::builder(model).start().await?;
//! let job = orch.submit(SubmitRequest::new("fanout", serde_json::json!({"n": 1}))).await?;
//! let done = orch.wait(job.id).await?;
//! println!("{}: {:?}", done.state, done.output);
//! orch.shutdown(std::time::Duration::from_secs(5)).await;
//! # Ok(()) }
//! ```

mod agent_actor;
mod broker;
mod commands;
mod context;
mod protocol;
mod scheduler;
mod stats;
mod step;
mod supervisor;
mod tool_loop;
mod view;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use cascade_agents::Registry;
use futures::Stream;
use ractor::{Actor, ActorRef};
use serde_json::Value;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;

use crate::approval::ApprovalError;
use crate::config::nearest;
use crate::job::{JobEvent, JobId, JobRecord};
use crate::model::ServerModel;
use crate::quota::QuotaSnapshot;
use crate::signal::{AgentPause, GraphEvent};
use crate::store::{JobFilter, JobStore, MemoryStore, NewJob, StoreError, Submitted};

pub use context::ApprovalNotice;
pub use protocol::{AgentSlotSnapshot, SchedulerSnapshot};
pub use stats::{AgentHealth, AgentStatsSnapshot, GraphStats, GraphStatsSnapshot};
pub use view::{Activity, AgentState, GraphState};

use context::JobFeeds;
use context::QuotaIndex;
pub(crate) use context::{GraphCtx, RateMeter, Shared};
use protocol::{BrokerMsg, SchedMsg};
use supervisor::{RootMsg, RootSupervisor};

/// A request to run a graph once.
#[derive(Clone, Debug)]
pub struct SubmitRequest {
    pub graph: String,
    pub input: Value,
    pub idempotency_key: Option<String>,
    pub tenant: String,
    pub labels: BTreeMap<String, String>,
    /// This job's deadline, overriding the graph's.
    pub deadline: Option<Duration>,
    /// POSTed, signed, when the job ends.
    pub callback_url: Option<String>,
    /// Lowers the graph's budget for this job.
    pub budget: Option<crate::job::Budget>,
}

impl SubmitRequest {
    pub fn new(graph: impl Into<String>, input: Value) -> Self {
        Self {
            graph: graph.into(),
            input,
            idempotency_key: None,
            tenant: String::new(),
            labels: BTreeMap::new(),
            deadline: None,
            callback_url: None,
            budget: None,
        }
    }

    pub fn idempotency_key(mut self, key: impl Into<String>) -> Self {
        self.idempotency_key = Some(key.into());
        self
    }

    pub fn label(mut self, k: impl Into<String>, v: impl Into<String>) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SubmitError {
    #[error("unknown graph {graph:?}{}", .suggestion.as_ref().map(|s| format!("; did you mean {s:?}?")).unwrap_or_default())]
    UnknownGraph {
        graph: String,
        suggestion: Option<String>,
    },
    /// Too many jobs wait already: the caller must slow down and try again after `retry_after`.
    #[error("graph {graph:?} has {pending} jobs waiting; retry in {}", humantime::format_duration(*.retry_after))]
    Overloaded {
        graph: String,
        pending: usize,
        retry_after: Duration,
    },
    /// The store's writer is behind: the caller must slow down and try again after
    /// `retry_after`; nothing accepted before is affected.
    #[error("the store has {queued} changes waiting to be written; retry in {}", humantime::format_duration(*.retry_after))]
    StoreBusy {
        queued: usize,
        retry_after: Duration,
    },
    /// The graph takes jobs of other tenants only (`[graph] tenants`). (Which ones is not said:
    /// a tenant learns no other tenant's name.)
    #[error(
        "graph {graph:?} does not take jobs of tenant {tenant:?} (its [graph] tenants list others)"
    )]
    TenantNotAllowed { graph: String, tenant: String },
    /// The tenant submits faster than its `submissions_per_second`.
    #[error("tenant {tenant:?} submits more than its {rate} jobs a second ([tenants.{tenant}] submissions_per_second); retry in {}", humantime::format_duration(*.retry_after))]
    TenantRate {
        tenant: String,
        rate: f64,
        retry_after: Duration,
    },
    /// The tenant has its `max_pending_jobs` queued or running.
    #[error("tenant {tenant:?} has {pending} jobs queued or running, its limit ([tenants.{tenant}] max_pending_jobs); retry in {}", humantime::format_duration(*.retry_after))]
    TenantFull {
        tenant: String,
        pending: usize,
        retry_after: Duration,
    },
    #[error(transparent)]
    KeyConflict(StoreError),
    #[error("the orchestrator is shutting down and accepts no new jobs")]
    ShuttingDown,
    /// The submission's budget raises the graph's (or is not a budget).
    #[error("{0}")]
    InvalidBudget(String),
    #[error(transparent)]
    Store(StoreError),
}

impl SubmitError {
    /// Whether submitting again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Overloaded { .. }
                | Self::StoreBusy { .. }
                | Self::TenantRate { .. }
                | Self::TenantFull { .. }
                | Self::Store(StoreError::Unavailable(_))
        )
    }

    /// When a refused submitter should try again, for a refusal that says.
    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Overloaded { retry_after, .. }
            | Self::StoreBusy { retry_after, .. }
            | Self::TenantRate { retry_after, .. }
            | Self::TenantFull { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }
}

/// How long a tenant refused at its `max_pending_jobs` waits: its jobs must finish first.
const TENANT_FULL_RETRY: Duration = Duration::from_secs(1);

/// The submissions each tenant with a `submissions_per_second` may make: a token bucket per
/// tenant holding one second's worth. (Hand-rolled rather than a rate-limiter crate: a number
/// and an instant per configured tenant, taken under the one lock the check needs anyway.)
#[derive(Default)]
struct TenantGate {
    buckets: Mutex<HashMap<String, (f64, tokio::time::Instant)>>,
}

impl TenantGate {
    /// Take one submission of `tenant` at `rate` a second, or say when the next fits.
    fn take(&self, tenant: &str, rate: f64) -> Result<(), Duration> {
        let now = tokio::time::Instant::now();
        let burst = rate.max(1.0);
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        let (tokens, at) = buckets.entry(tenant.to_string()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * rate).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - *tokens) / rate).max(Duration::from_millis(1)))
        }
    }

    /// Give back the submission taken for `tenant` (at `rate`): it started no job (a duplicate
    /// of a known key, or refused further on).
    fn give_back(&self, tenant: &str, rate: f64) {
        let mut buckets = self.buckets.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((tokens, _)) = buckets.get_mut(tenant) {
            *tokens = (*tokens + 1.0).min(rate.max(1.0));
        }
    }
}

/// How long a submitter waits when the store's writer is behind: a few of its batches.
const STORE_BUSY_RETRY: Duration = Duration::from_millis(250);

/// Configures and starts an [`Orchestrator`].
pub struct OrchestratorBuilder {
    model: ServerModel,
    registry: Registry,
    store: Option<Arc<dyn JobStore>>,
    cascade: bool,
    metrics: bool,
    audit: Option<Arc<crate::audit::log::AuditLog>>,
    shared_quotas: Option<Arc<crate::quota::shared::SharedQuotas>>,
}

impl OrchestratorBuilder {
    /// Keep every quota's state in the cluster's shared backend (`[server] quota_backend`), so
    /// that a quota is one quota across every node. Needs propagation on (else ignored).
    pub fn shared_quotas(mut self, backend: Arc<crate::quota::shared::SharedQuotas>) -> Self {
        self.shared_quotas = Some(backend);
        self
    }

    /// Agent kinds beyond the built-in ones.
    pub fn registry(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }

    /// Turn pause propagation off (naive mode): each agent keeps a local copy of its quotas'
    /// limits, nothing pauses downstream, and 429s are retried by each agent's retry policy —
    /// the way most frameworks behave. For comparisons; the default is on.
    pub fn cascade(mut self, on: bool) -> Self {
        self.cascade = on;
        self
    }

    /// Install the Prometheus recorder (default on). Its handles are taken when the actors
    /// start, so it must be there before; a process that installs another recorder turns this off.
    pub fn metrics(mut self, on: bool) -> Self {
        self.metrics = on;
        self
    }

    /// Where jobs are kept (in memory by default).
    pub fn store(mut self, store: Arc<dyn JobStore>) -> Self {
        self.store = Some(store);
        self
    }

    /// Where proposals, decisions and irreversible calls are recorded (none by default).
    pub fn audit(mut self, log: Arc<crate::audit::log::AuditLog>) -> Self {
        self.audit = Some(log);
        self
    }

    pub async fn start(self) -> Result<Orchestrator, StartError> {
        if self.metrics {
            crate::metrics::install();
        }
        let cascade = self.cascade && self.model.server.cascade;
        // The agents read their prices when they are built.
        self.registry
            .resources()
            .get::<cascade_agents::llm::Prices>()
            .set(self.model.prices.clone());
        // The MCP servers the `mcp` agents name (their graphs were checked against the same).
        self.registry
            .resources()
            .get::<cascade_agents::mcp::McpServers>()
            .declare(self.model.mcp_servers.clone(), self.registry.resources());
        let McpCheck {
            unreachable,
            errors,
        } = connect_mcp_servers(&self.registry, &self.model).await;
        if !errors.is_empty() {
            return Err(StartError(errors.join("\n")));
        }
        let store: Arc<dyn JobStore> = self.store.unwrap_or_else(|| Arc::new(MemoryStore::new()));
        // OAuth2 credentials keep their rotated refresh tokens in the store.
        self.registry
            .resources()
            .get::<cascade_agents::http::oauth2::Vault>()
            .set(Arc::new(StoreVault(store.clone())));
        let quotas = Arc::new(QuotaIndex::new(&self.model, cascade));
        let audit = match self.audit {
            Some(log) => Some(
                crate::audit::sink::AuditSink::start(log)
                    .map_err(|e| StartError(format!("cannot start the audit writer: {e}")))?,
            ),
            None => None,
        };
        let shared = Arc::new(Shared {
            audit,
            model: self.model,
            registry: self.registry,
            store,
            cascade,
            quotas: quotas.clone(),
            next_seq: AtomicU64::new(0),
            broker: RwLock::new(None),
            events: broadcast::channel(4096).0,
            job_feeds: JobFeeds::default(),
            graph_events: broadcast::channel(4096).0,
            waiters: Mutex::new(HashMap::new()),
            watchers: AtomicUsize::new(0),
            shutting_down: AtomicBool::new(false),
            callbacks: RwLock::new(None),
            approval_notices: RwLock::new(None),
            cluster: self.shared_quotas.filter(|_| cascade).map(|backend| {
                // In the order of the broker's cores: a call's quota indices name both.
                use crate::quota::shared::SharedSpec;
                let specs = quotas
                    .specs
                    .iter()
                    .map(|q| Arc::new(SharedSpec::new(q, backend.prefix())))
                    .chain(
                        quotas
                            .shares
                            .iter()
                            .map(|q| Arc::new(SharedSpec::new_share(q, backend.prefix()))),
                    )
                    .collect();
                context::ClusterQuotas { backend, specs }
            }),
        });
        if let Some(c) = &shared.cluster {
            let weak = Arc::downgrade(&shared);
            c.backend.attach(
                c.specs.clone(),
                Arc::new(move |signal| {
                    if let Some(broker) = weak.upgrade().and_then(|s| s.broker()) {
                        broker.signal(signal);
                    }
                }),
            );
        }
        let graphs: Vec<Arc<GraphCtx>> = shared
            .model
            .graphs
            .iter()
            .enumerate()
            .map(|(index, m)| {
                Arc::new(GraphCtx {
                    shared: shared.clone(),
                    index,
                    model: m.clone(),
                    quotas: quotas.clone(),
                    paused_agents: std::sync::atomic::AtomicUsize::new(0),
                    names: m.agents.iter().map(|a| a.name.clone()).collect(),
                    stats: Arc::new(GraphStats::new(m)),
                    scheduler: RwLock::new(None),
                    wake_pending: AtomicBool::new(false),
                    drain_rate: Mutex::new(RateMeter::default()),
                    submitted: metrics::counter!(crate::metrics::JOBS_SUBMITTED, "graph" => m.name.to_string()),
                    refused: metrics::counter!(crate::metrics::ADMISSION_REFUSALS, "graph" => m.name.to_string()),
                })
            })
            .collect();
        follow_remote_changes(&shared);
        // Jobs taken over from another node reach their graph's scheduler through this.
        let by_name: HashMap<Arc<str>, std::sync::Weak<GraphCtx>> = graphs
            .iter()
            .map(|g| (g.model.name.clone(), Arc::downgrade(g)))
            .collect();
        shared.store.set_waker(Arc::new(move |graph: &str| {
            if let Some(g) = by_name.get(graph).and_then(std::sync::Weak::upgrade) {
                g.wake();
            }
        }));
        let (root, handle) = Actor::spawn(None, RootSupervisor, (shared.clone(), graphs.clone()))
            .await
            .map_err(|e| StartError(e.to_string()))?;
        pause_unreachable(&shared, unreachable).await;
        let triggers = crate::triggers::Triggers::new(&shared.model);
        Ok(Orchestrator {
            shared,
            graphs: graphs
                .into_iter()
                .map(|g| (g.model.name.clone(), g))
                .collect(),
            root,
            root_handle: Mutex::new(Some(handle)),
            tenant_gate: TenantGate::default(),
            triggers,
        })
    }
}

#[derive(Debug, thiserror::Error)]
#[error("the orchestrator could not start: {0}")]
pub struct StartError(String);

/// Why a budget was not set.
#[derive(Debug, thiserror::Error)]
pub enum RaiseBudgetError {
    #[error("{0}")]
    Invalid(String),
    #[error("job {0} has ended ({1}); its budget no longer matters")]
    Ended(JobId, crate::job::JobState),
    #[error("the job's graph is not running now (the server is stopping); try again")]
    Unavailable,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A running orchestrator.
pub struct Orchestrator {
    shared: Arc<Shared>,
    graphs: HashMap<Arc<str>, Arc<GraphCtx>>,
    root: ActorRef<RootMsg>,
    root_handle: Mutex<Option<tokio::task::JoinHandle<()>>>,
    tenant_gate: TenantGate,
    triggers: crate::triggers::Triggers,
}

impl Drop for Orchestrator {
    fn drop(&mut self) {
        // The broker and the shared context hold each other; the broker lets go when it stops,
        // which it does not when the orchestrator is dropped without `shutdown`.
        self.shared.set_broker(None);
    }
}

impl Orchestrator {
    pub fn builder(model: ServerModel) -> OrchestratorBuilder {
        OrchestratorBuilder {
            model,
            registry: Registry::default(),
            store: None,
            cascade: true,
            metrics: true,
            audit: None,
            shared_quotas: None,
        }
    }

    pub fn model(&self) -> &ServerModel {
        &self.shared.model
    }

    pub fn store(&self) -> &Arc<dyn JobStore> {
        &self.shared.store
    }

    fn graph(&self, name: &str) -> Result<&Arc<GraphCtx>, SubmitError> {
        self.graphs
            .get(name)
            .ok_or_else(|| SubmitError::UnknownGraph {
                // Quoted back cut (the message is `{graph:?}`, so without the quotes here).
                graph: name.chars().take(crate::text::ECHO_CHARS).collect(),
                suggestion: (name.len() <= 256)
                    .then(|| nearest(name, self.graphs.keys().map(|k| &**k)))
                    .flatten()
                    .map(String::from),
            })
    }

    /// Accept a job. It is pending until its graph has room for it.
    pub async fn submit(&self, req: SubmitRequest) -> Result<Submitted, SubmitError> {
        if self.shared.is_shutting_down() {
            return Err(SubmitError::ShuttingDown);
        }
        let g = self.graph(&req.graph)?.clone();
        if let Some(allowed) = &g.model.tenants
            && !allowed.iter().any(|t| **t == *req.tenant)
        {
            return Err(SubmitError::TenantNotAllowed {
                graph: req.graph,
                tenant: req.tenant.chars().take(crate::text::ECHO_CHARS).collect(),
            });
        }
        let tenant_limits = self.shared.model.tenants.get(&req.tenant);
        let tenant_rate = tenant_limits.and_then(|t| t.submissions_per_second);
        if let Some(rate) = tenant_rate
            && let Err(retry_after) = self.tenant_gate.take(&req.tenant, rate)
        {
            metrics::counter!(crate::metrics::TENANT_REFUSALS, "tenant" => req.tenant.clone(), "reason" => "submissions_per_second").increment(1);
            return Err(SubmitError::TenantRate {
                tenant: req.tenant,
                rate,
                retry_after,
            });
        }
        let tenant = req.tenant.clone();
        let submitted = self.submit_to(&g, req, tenant_limits).await;
        // A submission that started no job does not count against the tenant's rate.
        if let Some(rate) = tenant_rate
            && match &submitted {
                Ok(s) => s.deduplicated,
                Err(_) => true,
            }
        {
            self.tenant_gate.give_back(&tenant, rate);
        }
        submitted
    }

    /// [`Orchestrator::submit`] past the tenant's rate: to the store.
    async fn submit_to(
        &self,
        g: &Arc<GraphCtx>,
        req: SubmitRequest,
        tenant_limits: Option<&crate::model::TenantSettings>,
    ) -> Result<Submitted, SubmitError> {
        let budget = req
            .budget
            .unwrap_or_default()
            .within(g.model.budget)
            .map_err(SubmitError::InvalidBudget)?;
        let job = NewJob {
            budget: (!budget.is_empty()).then_some(budget),
            id: JobId::new(),
            graph: g.model.name.clone(),
            agents: g.names.clone(),
            input: Arc::new(req.input),
            labels: req.labels,
            idempotency_key: req.idempotency_key,
            tenant: req.tenant,
            max_pending: g.model.max_pending_jobs.get(),
            tenant_max_pending: tenant_limits
                .and_then(|t| t.max_pending_jobs)
                .map(|n| n.get()),
            deadline: req.deadline,
            callback_url: req.callback_url,
        };
        match self.shared.store.submit(job).await {
            Ok(s) => {
                if !s.deduplicated {
                    g.submitted.increment(1);
                    g.wake();
                }
                Ok(s)
            }
            Err(StoreError::Full { pending, .. }) => {
                g.refused.increment(1);
                Err(SubmitError::Overloaded {
                    retry_after: self.retry_after(g, pending).await,
                    graph: req.graph,
                    pending,
                })
            }
            Err(StoreError::Busy { queued }) => {
                g.refused.increment(1);
                Err(SubmitError::StoreBusy {
                    queued,
                    retry_after: STORE_BUSY_RETRY,
                })
            }
            Err(StoreError::TenantFull { tenant, pending }) => {
                metrics::counter!(crate::metrics::TENANT_REFUSALS, "tenant" => tenant.to_string(), "reason" => "max_pending_jobs").increment(1);
                Err(SubmitError::TenantFull {
                    tenant: tenant.to_string(),
                    pending,
                    retry_after: TENANT_FULL_RETRY,
                })
            }
            Err(e @ StoreError::KeyConflict { .. }) => Err(SubmitError::KeyConflict(e)),
            Err(e) => Err(SubmitError::Store(e)),
        }
    }

    /// How long a refused submitter should wait: until the graph's longest pause ends, plus the
    /// time to drain a tenth of its backlog at the rate it has been finishing jobs.
    async fn retry_after(&self, g: &GraphCtx, pending: usize) -> Duration {
        let now_ms = crate::clock::unix_ms(crate::clock::now());
        let pauses = if g.paused_agents.load(Relaxed) > 0 {
            self.pauses(&g.model.name).await.unwrap_or_default()
        } else {
            Vec::new()
        };
        let pause_ms = pauses
            .iter()
            .filter_map(|(_, p)| p.as_ref())
            .flat_map(|p| p.causes.iter())
            // A failed agent has no known end: it is tried again within a restart window.
            .map(|(_, c)| c.until_unix_ms.map_or(1000, |u| u.saturating_sub(now_ms)))
            .max()
            .unwrap_or(0);
        let done = {
            let s = &g.stats;
            s.jobs_succeeded.load(Relaxed)
                + s.jobs_failed.load(Relaxed)
                + s.jobs_cancelled.load(Relaxed)
        };
        let per_sec = g
            .drain_rate
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .observe(tokio::time::Instant::now(), done)
            // Not measured yet: assume the in-flight jobs turn over once a second.
            .unwrap_or(g.model.max_in_flight_jobs.get() as f64);
        let drain = pending as f64 * 0.1 / per_sec.max(0.1);
        (Duration::from_millis(pause_ms) + Duration::from_secs_f64(drain))
            .clamp(Duration::from_millis(50), Duration::from_secs(300))
    }

    /// The job as stored now.
    pub fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        self.shared.store.get(id)
    }

    /// The tenant of job `id`, if it exists.
    pub fn tenant_of(&self, id: JobId) -> Result<Option<Arc<str>>, StoreError> {
        self.shared.store.tenant_of(id)
    }

    pub fn list(&self, filter: &JobFilter) -> Result<Vec<JobRecord>, StoreError> {
        self.shared.store.list(filter)
    }

    /// Wait until the job has finished, and return it.
    pub async fn wait(&self, id: JobId) -> Result<JobRecord, StoreError> {
        self.wait_until(id, |s| s.is_terminal()).await
    }

    /// Wait until job `id` ends or is parked (for a decision or a budget); the job then.
    pub async fn wait_settled(&self, id: JobId) -> Result<JobRecord, StoreError> {
        self.wait_until(id, |s| s.is_terminal() || s.is_parked())
            .await
    }

    async fn wait_until(
        &self,
        id: JobId,
        done: impl Fn(crate::job::JobState) -> bool,
    ) -> Result<JobRecord, StoreError> {
        loop {
            let (tx, rx) = oneshot::channel();
            self.shared
                .waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .entry(id)
                .or_default()
                .push(tx);
            // Checked after registering, so a change in between is not missed.
            let record = self
                .shared
                .store
                .get(id)
                .and_then(|r| r.ok_or(StoreError::NotFound(id)));
            match record {
                Ok(r) if !done(r.state) => {}
                settled => {
                    // Settled already (or unknown): nobody will wake this waiter, so it must
                    // not stay behind — one entry per awaited job would grow without end.
                    drop(rx);
                    self.shared.forget_waiters(id);
                    return settled;
                }
            }
            let _ = rx.await;
        }
    }

    /// The job's events: those recorded so far, then live ones, ending with its final event.
    pub fn subscribe(
        &self,
        id: JobId,
    ) -> Result<impl Stream<Item = JobEvent> + Send + 'static, StoreError> {
        // Subscribed before reading the past, so that nothing falls between the two.
        let mut live = self.shared.job_feeds.subscribe(id);
        let past = match self.shared.store.events(id, 0) {
            Ok(past) => past,
            Err(e) => {
                drop(live);
                self.shared.job_feeds.release(id);
                return Err(e);
            }
        };
        let shared = self.shared.clone();
        let (tx, rx) = mpsc::channel(64);
        let gauge = metrics::gauge!(crate::metrics::WATCHERS);
        shared.watchers.fetch_add(1, Relaxed);
        gauge.increment(1.0);
        tokio::spawn(async move {
            // Until the job's final event, or until the stream is dropped (its client went away,
            // however it went): whichever comes first.
            tokio::select! {
                _ = follow(&shared, id, past, &mut live, &tx) => {}
                _ = tx.closed() => {}
            }
            drop(live);
            shared.job_feeds.release(id);
            shared.watchers.fetch_sub(1, Relaxed);
            gauge.decrement(1.0);
        });
        Ok(ReceiverStream::new(rx))
    }

    /// Cancel a job: a pending job never starts; a running one starts no further step (calls
    /// under way finish, their results are dropped). Returns the job as it ends up.
    pub async fn cancel(&self, id: JobId, reason: &str) -> Result<JobRecord, StoreError> {
        let record = self.shared.store.get(id)?.ok_or(StoreError::NotFound(id))?;
        if record.state.is_terminal() {
            return Ok(record);
        }
        // Another node of the cluster holds it: that node cancels it.
        let command = commands::NodeCommand::Cancel {
            reason: reason.to_string(),
        };
        match self.forward_command(id, &command).await? {
            commands::Forwarded::Here => self.cancel_here(id, reason).await,
            commands::Forwarded::Done { .. } => {
                self.shared.store.get(id)?.ok_or(StoreError::NotFound(id))
            }
            commands::Forwarded::Failed(e) => Err(commands::Forwarded::store_error(e)),
        }
    }

    /// [`cancel`](Self::cancel), on this node.
    async fn cancel_here(&self, id: JobId, reason: &str) -> Result<JobRecord, StoreError> {
        let record = self.shared.store.get(id)?.ok_or(StoreError::NotFound(id))?;
        if record.state.is_terminal() {
            return Ok(record);
        }
        if let Some(ev) = self.shared.store.cancel_pending(id, reason)? {
            self.shared.publish(ev);
            self.shared.job_finished(id);
        } else if let Some(g) = self.graphs.get(&record.graph)
            && let Some(s) = g.scheduler()
        {
            let reason = reason.to_string();
            let _ = ractor::call_t!(
                s,
                |reply| SchedMsg::Cancel {
                    job: id,
                    reason,
                    reply
                },
                5_000
            );
        }
        self.shared.store.get(id)?.ok_or(StoreError::NotFound(id))
    }

    /// Approvals waiting for a decision, oldest job first, of `graph` (or every graph), after
    /// approval id `after`.
    pub fn approvals(
        &self,
        graph: Option<&str>,
        after: Option<&str>,
        limit: usize,
    ) -> Result<Vec<crate::job::ApprovalView>, StoreError> {
        self.shared
            .store
            .pending_approvals(graph, after, limit, None)
    }

    /// [`approvals`](Self::approvals) of one tenant (`None`: every tenant).
    pub fn approvals_of(
        &self,
        graph: Option<&str>,
        after: Option<&str>,
        limit: usize,
        tenant: Option<&str>,
    ) -> Result<Vec<crate::job::ApprovalView>, StoreError> {
        self.shared
            .store
            .pending_approvals(graph, after, limit, tenant)
    }

    /// One approval, pending or decided.
    pub fn approval(&self, id: &str) -> Result<crate::job::ApprovalView, ApprovalError> {
        let (job, agent) =
            crate::approval::parse_approval_id(id).map_err(ApprovalError::InvalidId)?;
        self.shared
            .store
            .get(job)?
            .as_ref()
            .and_then(|r| {
                // A tool-using step holds its latest proposal: an older tool call's id names
                // nothing now (its outcome is in the step's journal).
                crate::job::ApprovalView::of(r).find(|v| &*v.agent == agent && v.approval.id == id)
            })
            .ok_or_else(|| ApprovalError::NotFound(id.to_string()))
    }

    /// A person's decision on approval `id`, whose proposal they saw with hash `sha256`:
    /// approve runs exactly the stored call (once); reject fails the step and its job. The
    /// same decision again is answered from the record; a conflicting one is refused.
    pub async fn resolve_approval(
        &self,
        id: &str,
        sha256: &str,
        approve: bool,
        approver: &str,
        reason: &str,
    ) -> Result<crate::approval::Resolved, ApprovalError> {
        self.resolve_checked(id, sha256, approve, approver, reason, &|_| Ok(()))
            .await
    }

    /// [`resolve_approval`](Self::resolve_approval) by `who`: another tenant's approval is not
    /// found, exactly like an unknown one, and with `[auth] approval_separation` the identity
    /// that submitted the job may not decide its approvals. Both are checked on the approval the
    /// decision is made on, after the request itself (so a refusal tells nothing of others).
    pub async fn resolve_approval_as(
        &self,
        who: &crate::auth::Identity,
        id: &str,
        sha256: &str,
        approve: bool,
        approver: &str,
        reason: &str,
    ) -> Result<crate::approval::Resolved, ApprovalError> {
        let separation = self.shared.model.auth.approval_separation;
        let check = |v: &crate::job::ApprovalView| -> Result<(), ApprovalError> {
            if !who.sees(&v.tenant) {
                return Err(ApprovalError::NotFound(id.chars().take(200).collect()));
            }
            if separation {
                let submitter = self
                    .shared
                    .store
                    .get(v.job_id)?
                    .and_then(|r| r.labels.get(crate::auth::SUBMITTER_LABEL).cloned());
                if submitter.as_deref() == Some(&*who.name) {
                    return Err(ApprovalError::Refused(format!(
                        "{:?} submitted job {} and may not decide its approvals ([auth] approval_separation): another identity with the approve role decides",
                        who.name, v.job_id
                    )));
                }
            }
            Ok(())
        };
        self.resolve_checked(id, sha256, approve, approver, reason, &check)
            .await
    }

    async fn resolve_checked(
        &self,
        id: &str,
        sha256: &str,
        approve: bool,
        approver: &str,
        reason: &str,
        check: &(dyn Fn(&crate::job::ApprovalView) -> Result<(), ApprovalError> + Sync),
    ) -> Result<crate::approval::Resolved, ApprovalError> {
        if approver.trim().is_empty() {
            return Err(ApprovalError::InvalidRequest(
                "approver: say who decides (until requests are authenticated, the approver is named in the request)".into(),
            ));
        }
        if !approve && reason.trim().is_empty() {
            return Err(ApprovalError::InvalidRequest(
                "reason: a rejection says why (it becomes the job's error)".into(),
            ));
        }
        let sha256 = sha256.trim().to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ApprovalError::InvalidRequest(
                "proposal_sha256: the 64 hex digits of the proposal's SHA-256, as GetApproval shows it".into(),
            ));
        }
        let view = self.approval(id)?;
        check(&view)?;
        // Another node of the cluster holds the job: that node decides.
        let command = commands::NodeCommand::Decide {
            approval: id.to_string(),
            sha256: sha256.clone(),
            approve,
            approver: approver.to_string(),
            reason: reason.to_string(),
        };
        match self.forward_command(view.job_id, &command).await? {
            commands::Forwarded::Here => {
                self.decide_here(id, &sha256, approve, approver, reason)
                    .await
            }
            commands::Forwarded::Done { repeated } => Ok(crate::approval::Resolved {
                approval: self.approval(id)?,
                repeated,
            }),
            commands::Forwarded::Failed(e) => {
                Err(commands::Forwarded::approval_error(e, id, view.job_id))
            }
        }
    }

    /// The decision of [`resolve_approval`](Self::resolve_approval), checked already, on this
    /// node.
    async fn decide_here(
        &self,
        id: &str,
        sha256: &str,
        approve: bool,
        approver: &str,
        reason: &str,
    ) -> Result<crate::approval::Resolved, ApprovalError> {
        let sha256 = sha256.to_string();
        let view = self.approval(id)?;
        let unavailable = || ApprovalError::Unavailable(id.to_string());
        let g = self.graphs.get(&view.graph).ok_or_else(unavailable)?;
        let s = g.scheduler().ok_or_else(unavailable)?;
        let decision = crate::job::ApprovalDecision {
            outcome: if approve {
                crate::job::ApprovalOutcome::Approved
            } else {
                crate::job::ApprovalOutcome::Rejected
            },
            approver: approver.trim().to_string(),
            reason: reason.trim().to_string(),
            at: crate::clock::now(),
        };
        let answer = ractor::call_t!(
            s,
            |reply| SchedMsg::Decide {
                job: view.job_id,
                step: view.step,
                sha256,
                decision,
                reply
            },
            10_000
        )
        .map_err(|_| unavailable())??;
        // The decision is in the store and, with an audit log, queued for it: on disk before the
        // answer, so what was answered is what a restart finds.
        self.shared.store.flush().await?;
        if let Some(a) = &self.shared.audit {
            a.flush().await;
        }
        Ok(answer)
    }

    /// Set job `id`'s budget: each limit `raise` sets replaces the job's (those it leaves unset
    /// stay). A job stopped by its budget goes on from where it stopped; nothing done re-runs.
    /// Returns the job as it is then.
    pub async fn raise_budget(
        &self,
        id: JobId,
        raise: crate::job::Budget,
    ) -> Result<JobRecord, RaiseBudgetError> {
        if raise.is_empty() {
            return Err(RaiseBudgetError::Invalid(
                "budget: set max_tokens, max_cost_usd or both".into(),
            ));
        }
        if raise
            .max_cost_usd
            .is_some_and(|c| !c.is_finite() || c < 0.0)
        {
            return Err(RaiseBudgetError::Invalid(
                "budget.max_cost_usd: a non-negative number of dollars".into(),
            ));
        }
        let record = self.shared.store.get(id)?.ok_or(StoreError::NotFound(id))?;
        if record.state.is_terminal() {
            return Err(RaiseBudgetError::Ended(id, record.state));
        }
        // Another node of the cluster holds it: that node raises it.
        let command = commands::NodeCommand::RaiseBudget { budget: raise };
        match self.forward_command(id, &command).await? {
            commands::Forwarded::Here => self.raise_budget_here(id, raise).await,
            commands::Forwarded::Done { .. } => {
                Ok(self.shared.store.get(id)?.ok_or(StoreError::NotFound(id))?)
            }
            commands::Forwarded::Failed(commands::RemoteError::JobEnded { state }) => {
                Err(RaiseBudgetError::Ended(id, state))
            }
            commands::Forwarded::Failed(e) => {
                Err(RaiseBudgetError::Store(commands::Forwarded::store_error(e)))
            }
        }
    }

    /// [`raise_budget`](Self::raise_budget), checked already, on this node.
    async fn raise_budget_here(
        &self,
        id: JobId,
        raise: crate::job::Budget,
    ) -> Result<JobRecord, RaiseBudgetError> {
        let record = self.shared.store.get(id)?.ok_or(StoreError::NotFound(id))?;
        if record.state.is_terminal() {
            return Err(RaiseBudgetError::Ended(id, record.state));
        }
        let old = record.budget.unwrap_or_default();
        let budget = crate::job::Budget {
            max_tokens: raise.max_tokens.or(old.max_tokens),
            max_cost_usd: raise.max_cost_usd.or(old.max_cost_usd),
        };
        let g = self
            .graphs
            .get(&record.graph)
            .and_then(|g| g.scheduler())
            .ok_or(RaiseBudgetError::Unavailable)?;
        ractor::call_t!(
            g,
            |reply| SchedMsg::RaiseBudget {
                job: id,
                budget,
                reply
            },
            10_000
        )
        .map_err(|_| RaiseBudgetError::Unavailable)??;
        self.shared.store.flush().await?;
        Ok(self.shared.store.get(id)?.ok_or(StoreError::NotFound(id))?)
    }

    /// Send new proposals of agents with an `approval_webhook` here (the server's notifier).
    pub fn set_approval_sink(&self, tx: mpsc::Sender<context::ApprovalNotice>) {
        *self
            .shared
            .approval_notices
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    /// Wait until every audit record queued so far is written (before a final checkpoint).
    pub async fn flush_audit(&self) {
        if let Some(a) = &self.shared.audit {
            a.flush().await;
        }
    }

    /// Send finished jobs that have a callback URL here (the server's deliverer).
    pub fn set_callback_sink(&self, tx: mpsc::Sender<JobId>) {
        *self
            .shared
            .callbacks
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(tx);
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shared.is_shutting_down()
    }

    /// Whether pause propagation is on.
    pub fn cascade(&self) -> bool {
        self.shared.cascade
    }

    /// Every quota's state now.
    pub async fn quotas(&self) -> Vec<QuotaSnapshot> {
        match self.shared.broker() {
            Some(b) => ractor::call_t!(b.actor, BrokerMsg::Snapshot, 5_000).unwrap_or_default(),
            None => Vec::new(),
        }
    }

    /// Each agent of a graph with its pause (if paused): reach and every cause with its end.
    pub async fn pauses(&self, graph: &str) -> Option<Vec<(Arc<str>, Option<AgentPause>)>> {
        let g = self.graphs.get(graph)?;
        let broker = self.shared.broker()?;
        let index = g.index;
        let board =
            ractor::call_t!(broker.actor, |reply| BrokerMsg::Pauses(index, reply), 5_000).ok()?;
        Some(g.names.iter().cloned().zip(board).collect())
    }

    /// The graphs' triggers (started by [`crate::triggers::Triggers::start`]).
    pub fn triggers(&self) -> &crate::triggers::Triggers {
        &self.triggers
    }

    /// A graph's pending jobs and its `max_pending_jobs` (none: no such graph).
    pub fn pending_room(&self, graph: &str) -> Option<(usize, usize)> {
        let g = self.graphs.get(graph)?;
        Some((
            self.shared.store.pending_count(graph),
            g.model.max_pending_jobs.get(),
        ))
    }

    /// How many agents of a graph its scheduler holds paused right now (no message needed).
    pub fn paused_agents(&self, graph: &str) -> usize {
        self.graphs
            .get(graph)
            .map_or(0, |g| g.paused_agents.load(Relaxed))
    }

    /// Jobs someone awaits through [`wait`](Self::wait) now.
    pub fn awaited_jobs(&self) -> usize {
        self.shared.waiting()
    }

    /// Event streams open now ([`subscribe`](Self::subscribe)).
    pub fn watchers(&self) -> usize {
        self.shared.watchers.load(Relaxed)
    }

    /// Jobs whose events someone follows live through [`subscribe`](Self::subscribe) now.
    pub fn watched_jobs(&self) -> usize {
        self.shared.job_feeds.len()
    }

    /// Every job event of the server, live (for callbacks and dashboards; filter by job id).
    pub fn watch_jobs(&self) -> broadcast::Receiver<JobEvent> {
        self.shared.events.subscribe()
    }

    /// The registry that builds this orchestrator's agents, with the state they share (a
    /// simulated upstream's counters: `sim::upstream(orch.registry(), name)`).
    pub fn registry(&self) -> &Registry {
        &self.shared.registry
    }

    /// The graphs this orchestrator runs.
    pub fn graph_names(&self) -> Vec<Arc<str>> {
        self.shared
            .model
            .graphs
            .iter()
            .map(|g| g.name.clone())
            .collect()
    }

    /// Pause, resume, quota and circuit events of every graph, live.
    pub fn watch_graphs(&self) -> broadcast::Receiver<GraphEvent> {
        self.shared.graph_events.subscribe()
    }

    /// Treat `quota` as refused by its upstream for `duration`: it pauses what it reaches as a
    /// real 429 would. For operators (maintenance windows), benchmarks and tests. Returns whether
    /// the quota exists.
    pub async fn exhaust_quota(&self, quota: &str, duration: Duration) -> bool {
        let Some(b) = self.shared.broker() else {
            return false;
        };
        let quota = quota.to_string();
        ractor::call_t!(
            b.actor,
            |reply| BrokerMsg::Exhaust {
                quota,
                duration,
                reply
            },
            5_000
        )
        .unwrap_or(false)
    }

    /// Counters of a graph.
    pub fn stats(&self, graph: &str) -> Option<GraphStatsSnapshot> {
        self.graphs.get(graph).map(|g| g.stats.snapshot())
    }

    /// What a graph's scheduler holds right now.
    pub async fn scheduler_snapshot(&self, graph: &str) -> Option<SchedulerSnapshot> {
        let s = self.graphs.get(graph)?.scheduler()?;
        ractor::call_t!(s, SchedMsg::Snapshot, 5_000).ok()
    }

    /// Stop accepting jobs, let in-flight jobs finish for up to `grace`, then stop every actor.
    /// Jobs not finished by then stay in the store (a durable store resumes them on restart).
    pub async fn shutdown(&self, grace: Duration) {
        self.shared.shutting_down.store(true, Relaxed);
        for g in self.graphs.values() {
            if let Some(s) = g.scheduler() {
                let _ = s.cast(SchedMsg::Drain);
            }
        }
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let mut busy = 0;
            for name in self.graphs.keys() {
                busy += self
                    .scheduler_snapshot(name)
                    .await
                    .map_or(0, |s| s.jobs_in_flight);
            }
            if busy == 0 || tokio::time::Instant::now() >= deadline {
                if busy > 0 {
                    tracing::warn!(
                        jobs = busy,
                        "grace period over; stopping with jobs in flight"
                    );
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.root.stop(Some("shutdown".into()));
        let handle = self
            .root_handle
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(h) = handle {
            let _ = h.await;
        }
    }
}

/// Send a watcher the job's past events, then its live ones, until its final event.
async fn follow(
    shared: &Shared,
    id: JobId,
    past: Vec<JobEvent>,
    live: &mut broadcast::Receiver<JobEvent>,
    tx: &mpsc::Sender<JobEvent>,
) {
    let mut last = 0;
    for e in past {
        last = e.seq;
        let fin = e.kind.is_final();
        if tx.send(e).await.is_err() || fin {
            return;
        }
    }
    loop {
        match live.recv().await {
            Ok(e) if e.seq > last => {
                last = e.seq;
                let fin = e.kind.is_final();
                if tx.send(e).await.is_err() || fin {
                    return;
                }
            }
            Ok(_) => {}
            // Fell behind the live stream: catch up from the store.
            Err(broadcast::error::RecvError::Lagged(_)) => {
                let Ok(missed) = shared.store.events(id, last) else {
                    return;
                };
                for e in missed {
                    last = e.seq;
                    let fin = e.kind.is_final();
                    if tx.send(e).await.is_err() || fin {
                        return;
                    }
                }
            }
            Err(broadcast::error::RecvError::Closed) => return,
        }
    }
}

/// Changes other nodes make to jobs someone here watches or awaits reach them through the
/// store's announcements, handled in order by one task. The queue is bounded: when it is full,
/// the next handling looks at every followed job again instead of at the announced one.
fn follow_remote_changes(shared: &Arc<Shared>) {
    use crate::store::{RemoteChange, RemoteEvents};
    let (tx, mut rx) = mpsc::channel::<RemoteChange>(4096);
    let overflowed = Arc::new(AtomicBool::new(false));
    let (weak, weak_task) = (Arc::downgrade(shared), Arc::downgrade(shared));
    let missed = overflowed.clone();
    shared.store.set_remote_events(RemoteEvents {
        interested: Arc::new(move |id| weak.upgrade().is_some_and(|s| s.follows(id))),
        announce: Arc::new(move |change| {
            if tx.try_send(change).is_err() {
                missed.store(true, Relaxed);
            }
        }),
    });
    tokio::spawn(async move {
        while let Some(change) = rx.recv().await {
            let Some(shared) = weak_task.upgrade() else {
                return;
            };
            let ids = match (change, overflowed.swap(false, Relaxed)) {
                (RemoteChange::Job(id), false) => vec![id],
                _ => shared.followed(),
            };
            for id in ids {
                shared.remote_changed(id);
            }
        }
    });
}

/// The message a panic was raised with.
pub(crate) fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic with a non-string payload".to_string())
}

/// The store as the vault of OAuth2 credentials' rotated refresh tokens.
struct StoreVault(Arc<dyn JobStore>);

impl cascade_agents::http::oauth2::TokenVault for StoreVault {
    fn load(&self, credential: &str) -> Option<String> {
        self.0
            .credential_state(credential)
            .inspect_err(|e| tracing::warn!(credential, error = %e, "cannot read a credential's kept refresh token; using the configured one"))
            .ok()
            .flatten()
    }

    fn save(&self, credential: &str, sealed: String) {
        self.0.save_credential_state(credential, sealed);
    }
}

/// Connect every declared MCP server (at once, together) to read its tools, which its agents'
/// approvals go by, and check each `mcp` agent's tool and fixed arguments against them. An unreachable server is a
/// warning, not a failed start: its quota is exhausted for a while once the broker runs (see
/// [`pause_unreachable`]), which pauses its agents and their downstream, and the next call tries
/// it again.
pub async fn connect_mcp_servers(registry: &Registry, model: &ServerModel) -> McpCheck {
    let servers = registry
        .resources()
        .get::<cascade_agents::mcp::McpServers>();
    let connects = model.mcp_servers.keys().filter_map(|name| {
        let server = servers.get(name)?;
        Some(async move {
            match server.tools().await {
                Ok(_) => None,
                Err(e) => {
                    tracing::warn!(server = %server.name(), error = %e, "MCP server unreachable at start; its agents pause until it answers");
                    Some(server.name().to_string())
                }
            }
        })
    });
    let unreachable: Vec<String> = futures::future::join_all(connects)
        .await
        .into_iter()
        .flatten()
        .collect();
    // Every `mcp` agent's tool exists on its server, and fixed arguments fit its inputSchema;
    // every tool pattern of a tool-using agent matches a tool.
    let mut errors = Vec::new();
    for g in &model.graphs {
        for a in g
            .agents
            .iter()
            .filter(|a| a.kind == "mcp" || a.uses_tools())
        {
            let checked = if a.kind == "mcp" {
                cascade_agents::mcp::check_agent(&servers, &a.fields)
            } else {
                cascade_agents::tools::check_agent(&servers, &a.fields)
            };
            if let Err(e) = checked {
                errors.push(format!(
                    "{}: graph {:?}, agent {:?}: {e}",
                    g.source.display(),
                    g.name,
                    a.name
                ));
            }
        }
    }
    McpCheck {
        unreachable,
        errors,
    }
}

/// What [`connect_mcp_servers`] found.
#[derive(Debug, Default)]
pub struct McpCheck {
    /// Servers that could not be reached (their agents' tools are not checked).
    pub unreachable: Vec<String>,
    /// Agents whose tool or arguments do not fit their server.
    pub errors: Vec<String>,
}

/// Exhaust the quotas of MCP servers unreachable at start (`upstream:mcp:<name>`) for a while.
async fn pause_unreachable(shared: &Shared, servers: Vec<String>) {
    let Some(b) = shared.broker() else {
        return;
    };
    for name in servers {
        let quota = format!("{}mcp:{name}", crate::model::QuotaModel::IMPLICIT_PREFIX);
        let _ = ractor::call_t!(
            b.actor,
            |reply| BrokerMsg::Exhaust {
                quota,
                duration: Duration::from_secs(5),
                reply
            },
            5_000
        );
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use serde_json::json;

    use super::protocol::BrokerMsg;
    use super::{Orchestrator, SubmitRequest};
    use crate::job::JobState;

    #[tokio::test(start_paused = true)]
    async fn a_failed_broker_is_replaced_and_no_step_or_slot_is_lost() {
        let toml = "[graph]\nname = \"g\"\nmax_in_flight_jobs = 64\n\
                    [quotas.slots]\nmax_concurrency = 4\n\
                    [agents.a]\nkind = \"sim\"\nlatency = \"5ms\"\nquota = \"slots\"\n\
                    [agents.b]\nkind = \"sim\"\nafter = [\"a\"]\nquota = \"slots\"\n";
        let model = crate::config::parse_graph_str("test.toml", toml, &Default::default())
            .unwrap_or_else(|e| panic!("{e}"));
        let orch = Orchestrator::builder(model).start().await.unwrap();
        let mut ids = Vec::new();
        for n in 0..200 {
            let req = SubmitRequest::new("g", json!({ "n": n }));
            ids.push(orch.submit(req).await.unwrap().id);
        }
        // Some jobs through, many waiting at the quota: the broker fails.
        tokio::time::sleep(Duration::from_millis(50)).await;
        let first = orch.shared.broker().expect("a broker");
        let _ = first
            .actor
            .cast(BrokerMsg::Fail("failed by the test".into()));
        for id in &ids {
            let job = tokio::time::timeout(Duration::from_secs(60), orch.wait(*id))
                .await
                .expect("every job finishes after the broker's restart")
                .unwrap();
            assert_eq!(job.state, JobState::Succeeded);
        }
        let second = orch.shared.broker().expect("a new broker");
        assert!(
            !Arc::ptr_eq(&first, &second),
            "the failed broker was replaced"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
        let q = orch
            .quotas()
            .await
            .into_iter()
            .find(|q| q.name == "slots")
            .expect("listed");
        assert_eq!(q.in_flight, 0, "slots held when idle: {q:?}");
        orch.shutdown(Duration::from_secs(1)).await;
    }
}
