//! Where jobs live: accepted jobs wait here until a graph has room for them, and every change to
//! a job is recorded here before it is announced. The runtime talks to a [`JobStore`]; the
//! in-memory store serves tests, benchmarks and `cascade run`, a durable one serves `cascade serve`.

mod batch;
mod memory;
pub mod pg_schema;
mod postgres;
mod sqlite;

use std::collections::BTreeMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use serde_json::Value;

use crate::job::{ApprovalView, JobEvent, JobId, JobRecord, JobState, JobUpdate};

pub use memory::MemoryStore;
pub use postgres::{PgOptions, PgStore, host_name};
pub use sqlite::{SqliteOptions, SqliteStore};

/// Changes another node made, announced to this one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RemoteChange {
    /// Job `0` has new events.
    Job(JobId),
    /// Announcements may have been missed (the listening connection was lost): look at every
    /// job followed again.
    Resync,
}

/// Where a store announces [`RemoteChange`]s: `interested(id)` tells whether this node follows
/// a job (someone watches or awaits it), `announce` takes the change.
#[derive(Clone)]
pub struct RemoteEvents {
    pub interested: Arc<dyn Fn(JobId) -> bool + Send + Sync>,
    pub announce: Arc<dyn Fn(RemoteChange) + Send + Sync>,
}

/// Wakes the scheduler of the graph it is given.
pub type Waker = Arc<dyn Fn(&str) + Send + Sync>;

pub type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

/// Runs a command another node sent for a job this node holds (`command` and the answer are
/// JSON text; see `Orchestrator::serve_commands`).
pub type CommandHandler =
    Arc<dyn Fn(JobId, String) -> Pin<Box<dyn Future<Output = String> + Send>> + Send + Sync>;

/// A node of a cluster, as its store sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub id: String,
    pub address: String,
    pub last_heartbeat: std::time::SystemTime,
    pub started: std::time::SystemTime,
    /// Unfinished jobs it holds the lease of.
    pub jobs_leased: u64,
    /// Its heartbeat is within the lease.
    pub alive: bool,
    /// The node asking.
    pub this_node: bool,
}

/// A job to accept.
#[derive(Clone, Debug)]
pub struct NewJob {
    pub id: JobId,
    pub graph: Arc<str>,
    /// The graph's agents in order, one step each (shared by every job of the graph).
    pub agents: Arc<[Arc<str>]>,
    pub input: Arc<Value>,
    pub labels: BTreeMap<String, String>,
    /// With a tenant, deduplicates submissions: the same key returns the original job.
    pub idempotency_key: Option<String>,
    pub tenant: String,
    /// Refuse the job if this many jobs of its graph are already pending.
    pub max_pending: usize,
    /// Refuse the job if its tenant has this many jobs queued or running already
    /// (`[tenants.NAME] max_pending_jobs`).
    pub tenant_max_pending: Option<usize>,
    pub deadline: Option<std::time::Duration>,
    pub callback_url: Option<String>,
    pub budget: Option<crate::job::Budget>,
}

/// The outcome of a submission.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Submitted {
    pub id: JobId,
    /// The idempotency key was known: this is the job it named before, not a new one.
    pub deduplicated: bool,
}

impl Submitted {
    /// A submission whose idempotency key names the job `existing` already: that job again when
    /// the input is the same, a conflict when it is not.
    pub(crate) fn known_key(
        key: &str,
        existing: JobId,
        same_input: bool,
    ) -> Result<Self, StoreError> {
        if !same_input {
            return Err(StoreError::KeyConflict {
                key: key.to_string(),
                existing,
            });
        }
        Ok(Self {
            id: existing,
            deduplicated: true,
        })
    }
}

#[derive(Debug, thiserror::Error, Clone, PartialEq)]
pub enum StoreError {
    #[error("{pending} jobs of graph {graph:?} are already pending; submit again later")]
    Full { graph: Arc<str>, pending: usize },
    #[error(
        "tenant {tenant:?} has {pending} jobs queued or running, its limit ([tenants.{tenant}] max_pending_jobs); submit again later"
    )]
    TenantFull { tenant: Arc<str>, pending: usize },
    #[error(
        "idempotency key {key:?} was already used for job {existing} with a different input; use a new key for a new job"
    )]
    KeyConflict { key: String, existing: JobId },
    #[error("job {0} not found")]
    NotFound(JobId),
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The durable store's writer has this many changes waiting (its `store_queue_capacity`):
    /// new jobs wait until it catches up.
    #[error("the store has {queued} changes waiting to be written; submit again later")]
    Busy { queued: usize },
}

impl StoreError {
    /// Whether trying again later may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(
            self,
            Self::Full { .. } | Self::TenantFull { .. } | Self::Unavailable(_) | Self::Busy { .. }
        )
    }
}

/// Which jobs to list.
#[derive(Clone, Debug, Default)]
pub struct JobFilter {
    pub graph: Option<String>,
    pub state: Option<JobState>,
    /// Every label here must match.
    pub labels: BTreeMap<String, String>,
    /// List jobs created before this one (newest first); for paging.
    pub before: Option<JobId>,
    pub limit: usize,
    /// Only this tenant's jobs.
    pub tenant: Option<String>,
}

impl JobFilter {
    pub fn matches(&self, r: &JobRecord) -> bool {
        self.graph.as_deref().is_none_or(|g| *r.graph == *g)
            && self.state.is_none_or(|s| r.state == s)
            && self.labels.iter().all(|(k, v)| r.labels.get(k) == Some(v))
            && self.before.is_none_or(|b| r.id < b)
            && self.tenant.as_deref().is_none_or(|t| r.tenant == t)
    }
}

/// The store behind the runtime. Reads and step updates are synchronous (they sit on the
/// per-step path and must be cheap); accepting a job is asynchronous because a durable store
/// answers only after its commit.
pub trait JobStore: Send + Sync + 'static {
    /// Accept a job as pending, or return the job its idempotency key already names.
    fn submit(&self, job: NewJob) -> StoreFuture<'_, Submitted>;

    /// Move up to `limit` pending jobs of `graph` to running, oldest first, and return them.
    fn claim_pending(&self, graph: &str, limit: usize) -> Result<Vec<JobRecord>, StoreError>;

    /// Jobs of `graph` left running (after a restart of their scheduler or of the process).
    fn running(&self, graph: &str) -> Result<Vec<JobRecord>, StoreError>;

    /// Record a change to a job; returns the event it made, if it applied.
    fn update(&self, id: JobId, update: JobUpdate) -> Result<Option<JobEvent>, StoreError>;

    /// Record two changes to a job in turn (a step's start and its result, when its call finished
    /// at once); returns the events they made, in order.
    fn update_two(
        &self,
        id: JobId,
        first: JobUpdate,
        second: JobUpdate,
    ) -> Result<[Option<JobEvent>; 2], StoreError> {
        Ok([self.update(id, first)?, self.update(id, second)?])
    }

    /// Record changes to a job that must be durable together (a rejection: the decision, the
    /// step's failure and the job's end), in turn; the events they made.
    fn update_all(
        &self,
        id: JobId,
        updates: Vec<JobUpdate>,
    ) -> Result<Vec<Option<JobEvent>>, StoreError> {
        updates.into_iter().map(|u| self.update(id, u)).collect()
    }

    /// Cancel a job that is still pending. Returns its event, or `None` if it is not pending.
    fn cancel_pending(&self, id: JobId, reason: &str) -> Result<Option<JobEvent>, StoreError>;

    fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError>;

    /// The tenant of job `id`, if the store holds it: what a visibility check needs, without
    /// building the whole record.
    fn tenant_of(&self, id: JobId) -> Result<Option<Arc<str>>, StoreError> {
        Ok(self.get(id)?.map(|r| Arc::from(r.tenant.as_str())))
    }

    /// The events of a job after `after_seq`, in order.
    fn events(&self, id: JobId, after_seq: u64) -> Result<Vec<JobEvent>, StoreError>;

    /// Jobs matching `filter`, newest first.
    fn list(&self, filter: &JobFilter) -> Result<Vec<JobRecord>, StoreError>;

    fn pending_count(&self, graph: &str) -> usize;

    /// Jobs of `tenant` queued or running (what `[tenants.NAME] max_pending_jobs` counts).
    fn tenant_live_count(&self, _tenant: &str) -> usize {
        0
    }

    /// Approvals waiting for a decision, ordered by approval id, of `graph` (or every graph),
    /// after approval id `after` (paging); at most `limit`.
    fn pending_approvals(
        &self,
        graph: Option<&str>,
        after: Option<&str>,
        limit: usize,
        tenant: Option<&str>,
    ) -> Result<Vec<ApprovalView>, StoreError>;

    /// Jobs of `graph` with an approval nobody decided by its expiry, `now` or before.
    fn expired_approvals(&self, graph: &str, now: std::time::SystemTime) -> Vec<JobId>;

    /// Approvals of `graph` waiting for a decision.
    fn pending_approval_count(&self, graph: &str) -> usize;

    /// Finished jobs with a callback URL whose delivery was never attempted (the process stopped
    /// between the job's end and its callback): the server delivers them when it starts.
    fn undelivered_callbacks(&self, _limit: usize) -> Result<Vec<JobId>, StoreError> {
        Ok(Vec::new())
    }

    /// The sealed state kept for OAuth2 credential `name` (its rotated refresh token), if any.
    /// A store that keeps nothing across restarts keeps none.
    fn credential_state(&self, _name: &str) -> Result<Option<String>, StoreError> {
        Ok(None)
    }

    /// Replace the sealed state of credential `name`. One row per configured credential.
    fn save_credential_state(&self, _name: &str, _sealed: String) {}

    /// The state kept for trigger `key` (`graph/trigger`): a schedule's last slot fired, an
    /// operator's pause.
    fn trigger_state(&self, _key: &str) -> Result<Option<String>, StoreError> {
        Ok(None)
    }

    /// Replace the state of trigger `key`. One row per configured trigger.
    fn save_trigger_state(&self, _key: &str, _state: String) {}

    /// Running jobs of `graph` this node took over from a dead node since they were last asked
    /// for (at most `limit`): their scheduler resumes them as it resumes jobs left running.
    fn adopted(&self, _graph: &str, _limit: usize) -> Vec<JobRecord> {
        Vec::new()
    }

    /// Tell the store how to wake a graph's scheduler when work arrives that no submission to
    /// this process announced (jobs taken over from another node).
    fn set_waker(&self, _waker: Waker) {}

    /// Tell the store where to announce changes other nodes made to jobs this one does not hold
    /// (for its watchers and waiters); `interested` says which jobs this node follows.
    fn set_remote_events(&self, _sink: RemoteEvents) {}

    /// The nodes sharing this store, for a store several nodes share (`None`: this process
    /// alone).
    fn nodes(&self) -> Result<Option<Vec<NodeInfo>>, StoreError> {
        Ok(None)
    }

    /// How many nodes share this store and are alive, as last seen (`None`: this process alone,
    /// or not known yet).
    fn live_nodes(&self) -> Option<usize> {
        None
    }

    /// The other node that holds job `id`'s lease, while it is alive (`None`: this node holds
    /// it, nobody does, or the store is this process's own).
    fn remote_holder(&self, _id: JobId) -> Result<Option<String>, StoreError> {
        Ok(None)
    }

    /// Send `command` (JSON text) for job `id` to `node`, which holds it, and wait for its
    /// answer (JSON text). Only a store several nodes share has other nodes.
    fn forward(&self, _node: &str, id: JobId, _command: String) -> StoreFuture<'_, String> {
        Box::pin(async move { Err(StoreError::NotFound(id)) })
    }

    /// Where the commands other nodes send to this one go.
    fn set_command_handler(&self, _handler: CommandHandler) {}

    /// Whether this node must start no call now: its leases may have run out (it could not
    /// renew them for most of a lease), so another node may be taking its jobs over.
    fn fenced(&self) -> bool {
        false
    }

    /// Jobs of `graph` this node was running that another node holds now (it took them over
    /// while this node could not renew its leases): the scheduler forgets them. Each is
    /// returned once; the store forgets them too.
    fn lost_leases(&self, _graph: &str) -> Vec<JobId> {
        Vec::new()
    }

    /// This node stops: hand back the jobs it still holds so that other nodes take them at
    /// once, without waiting for its lease to run out (a store nobody shares keeps them for
    /// the next start). Called after [`JobStore::flush`], when nothing more is written.
    fn release(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }

    /// Wait until every change made so far is durable (no-op for a store that is not).
    fn flush(&self) -> StoreFuture<'_, ()> {
        Box::pin(async { Ok(()) })
    }
}
