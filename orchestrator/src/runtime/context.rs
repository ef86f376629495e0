//! What the actors of an orchestrator share: the server-wide [`Shared`] (model, registry, store,
//! quota index, live feeds, waiters), each graph's [`GraphCtx`], and the [`QuotaIndex`] that maps
//! agents to the quota cores they draw on.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

use cascade_agents::Registry;
use ractor::ActorRef;
use tokio::sync::{broadcast, mpsc, oneshot};

use super::broker::BrokerCore;
use super::protocol::SchedMsg;
use super::stats::GraphStats;
use crate::job::{JobEvent, JobId};
use crate::model::{GraphModel, QuotaModel, ServerModel};
use crate::signal::GraphEvent;
use crate::store::JobStore;

/// What every actor of an orchestrator shares.
pub(crate) struct Shared {
    pub model: ServerModel,
    pub registry: Registry,
    pub store: Arc<dyn JobStore>,
    /// Propagation on (the cascade) or off (naive mode: local limits, 429s retried by policy).
    pub cascade: bool,
    pub quotas: Arc<QuotaIndex>,
    /// Job age across the server, so that shared quotas serve the oldest job first.
    pub next_seq: AtomicU64,
    pub(super) broker: RwLock<Option<Arc<BrokerCore>>>,
    /// Every job's events, for whoever follows them all (dashboards); nothing is sent while no
    /// one listens.
    pub(super) events: broadcast::Sender<JobEvent>,
    /// The live feed of each watched job, so that a watcher wakes only for its own job's events.
    pub(super) job_feeds: JobFeeds,
    pub(super) graph_events: broadcast::Sender<GraphEvent>,
    pub(super) waiters: Mutex<HashMap<JobId, Vec<oneshot::Sender<()>>>>,
    /// Event streams open now ([`Orchestrator::subscribe`]).
    pub(super) watchers: AtomicUsize,
    pub(super) shutting_down: AtomicBool,
    /// Where finished jobs with a callback URL go to be delivered (set by the server).
    pub(super) callbacks: RwLock<Option<mpsc::Sender<JobId>>>,
    /// Where new proposals go to be announced at their agent's `approval_webhook` (set by the
    /// server).
    pub(super) approval_notices: RwLock<Option<mpsc::Sender<ApprovalNotice>>>,
    pub audit: Option<crate::audit::sink::AuditSink>,
    /// The cluster's shared quotas (`[server] quota_backend`), with propagation on.
    pub cluster: Option<ClusterQuotas>,
}

/// The quotas shared by the nodes of a cluster: the backend, and each quota's shared form, by
/// its index among the broker's cores (the declared and implicit quotas, then the tenants'
/// shares of them).
pub(crate) struct ClusterQuotas {
    pub backend: Arc<crate::quota::shared::SharedQuotas>,
    pub specs: Vec<Arc<crate::quota::shared::SharedSpec>>,
}

/// A new proposal to announce at its agent's `approval_webhook`.
#[derive(Clone, Debug)]
pub struct ApprovalNotice {
    pub url: String,
    pub approval: crate::job::ApprovalView,
}

impl Shared {
    /// Announce an event to live watchers (stored already): those of its job, and those of all.
    pub fn publish(&self, event: JobEvent) {
        self.job_feeds.publish(&event);
        if self.events.receiver_count() > 0 {
            let _ = self.events.send(event);
        }
    }

    /// Announce a new proposal at its agent's webhook; dropped (with a warning) when the
    /// notifier is far behind, since the proposal itself is stored and listed.
    pub fn notify_approval(&self, notice: ApprovalNotice) {
        let tx = self
            .approval_notices
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        if let Some(tx) = tx
            && tx.try_send(notice).is_err()
        {
            tracing::warn!(
                "approval webhooks are behind: a proposal was not announced (it is listed by ListApprovals)"
            );
        }
    }

    /// Record an audit event, if the server keeps an audit log.
    pub fn audit(&self, tenant: &str, kind: &'static str, body: serde_json::Value) {
        if let Some(a) = &self.audit {
            a.record(tenant, kind, body);
        }
    }

    /// Wake whoever awaits this job.
    pub fn job_finished(&self, id: JobId) {
        let waiters = self
            .waiters
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&id);
        for w in waiters.into_iter().flatten() {
            let _ = w.send(());
        }
    }

    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Relaxed)
    }

    /// Whether someone here watches or awaits job `id`.
    pub(super) fn follows(&self, id: JobId) -> bool {
        self.job_feeds.last_seq(id).is_some()
            || self
                .waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&id)
    }

    /// The jobs someone here watches or awaits.
    pub(super) fn followed(&self) -> Vec<JobId> {
        let mut ids = self.job_feeds.ids();
        ids.extend(
            self.waiters
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .keys()
                .copied(),
        );
        ids.sort();
        ids.dedup();
        ids
    }

    /// Another node changed job `id`: carry its new events to the watchers here, and let the
    /// waiters look at its state again.
    pub(super) fn remote_changed(&self, id: JobId) {
        if let Some(after) = self.job_feeds.last_seq(id) {
            match self.store.events(id, after) {
                Ok(events) => {
                    for e in events {
                        self.publish(e);
                    }
                }
                Err(e) => {
                    tracing::warn!(job_id = %id, error = %e, "cannot read another node's events for a watcher")
                }
            }
        }
        self.job_finished(id);
    }

    /// Drop the waiters of `id` that nobody waits on any more.
    pub(super) fn forget_waiters(&self, id: JobId) {
        let mut waiters = self.waiters.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(list) = waiters.get_mut(&id) {
            list.retain(|w| !w.is_closed());
            if list.is_empty() {
                waiters.remove(&id);
            }
        }
    }

    /// Jobs someone awaits through [`Orchestrator::wait`] now.
    pub(super) fn waiting(&self) -> usize {
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Hand a finished job to the callback deliverer.
    pub fn callback(&self, id: JobId) {
        if let Some(tx) = self
            .callbacks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .as_ref()
            && tx.try_send(id).is_err()
        {
            tracing::error!(job_id = %id, "callback queue full or closed; the callback waits in the store and goes out after the next start");
        }
    }

    pub fn has_graph_watchers(&self) -> bool {
        self.graph_events.receiver_count() > 0
    }

    pub fn publish_graph_event(&self, event: GraphEvent) {
        if self.graph_events.receiver_count() > 0 {
            let _ = self.graph_events.send(event);
        }
    }

    pub fn broker(&self) -> Option<Arc<BrokerCore>> {
        self.broker
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn set_broker(&self, b: Option<Arc<BrokerCore>>) {
        *self.broker.write().unwrap_or_else(|p| p.into_inner()) = b;
    }
}

/// One small broadcast channel per watched job. A job's feed exists while someone watches it; it
/// is dropped with the job's final event or when its last watcher has gone. A watcher that falls
/// more than [`FEED_CAPACITY`](Self::FEED_CAPACITY) events behind is told it lagged and catches up
/// from the store, so a slow watcher holds no memory for others.
#[derive(Default)]
pub(super) struct JobFeeds {
    /// Each watched job's feed, and the seq of the last event it carried.
    feeds: Mutex<HashMap<JobId, (broadcast::Sender<JobEvent>, u64)>>,
    /// Feeds open now: publishing takes no lock while it is zero.
    open: AtomicUsize,
}

impl JobFeeds {
    const FEED_CAPACITY: usize = 64;

    pub(super) fn subscribe(&self, id: JobId) -> broadcast::Receiver<JobEvent> {
        let mut feeds = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        let rx = feeds
            .entry(id)
            .or_insert_with(|| (broadcast::channel(Self::FEED_CAPACITY).0, 0))
            .0
            .subscribe();
        self.open.store(feeds.len(), Relaxed);
        rx
    }

    pub(super) fn publish(&self, event: &JobEvent) {
        if self.open.load(Relaxed) == 0 {
            return;
        }
        let mut feeds = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        let Some((tx, last)) = feeds.get_mut(&event.job_id) else {
            return;
        };
        *last = (*last).max(event.seq);
        let gone = tx.send(event.clone()).is_err() || event.kind.is_final();
        if gone {
            feeds.remove(&event.job_id);
            self.open.store(feeds.len(), Relaxed);
        }
    }

    /// A watcher left: drop its job's feed if it was the last one.
    pub(super) fn release(&self, id: JobId) {
        let mut feeds = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        if feeds
            .get(&id)
            .is_some_and(|(tx, _)| tx.receiver_count() == 0)
        {
            feeds.remove(&id);
            self.open.store(feeds.len(), Relaxed);
        }
    }

    /// The seq of the last event job `id`'s feed carried, if someone watches it.
    pub(super) fn last_seq(&self, id: JobId) -> Option<u64> {
        if self.open.load(Relaxed) == 0 {
            return None;
        }
        let feeds = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        feeds.get(&id).map(|(_, last)| *last)
    }

    /// The jobs watched now.
    pub(super) fn ids(&self) -> Vec<JobId> {
        let feeds = self.feeds.lock().unwrap_or_else(|p| p.into_inner());
        feeds.keys().copied().collect()
    }

    /// Feeds open now. There is one per job some WatchJob stream follows, so the map is bounded
    /// by the watchers the server holds.
    pub(super) fn len(&self) -> usize {
        self.open.load(Relaxed)
    }
}

/// What the actors of one graph share.
pub(crate) struct GraphCtx {
    pub shared: Arc<Shared>,
    /// Position among the server's graphs.
    pub index: usize,
    pub model: Arc<GraphModel>,
    pub quotas: Arc<QuotaIndex>,
    /// How many of its agents the scheduler holds paused now.
    pub paused_agents: std::sync::atomic::AtomicUsize,
    pub names: Arc<[Arc<str>]>,
    pub stats: Arc<GraphStats>,
    /// The current scheduler (it changes if it is restarted).
    pub scheduler: RwLock<Option<ActorRef<SchedMsg>>>,
    /// A `Wake` is on its way to the scheduler: submissions need not send another.
    pub wake_pending: AtomicBool,
    /// Jobs finished per second, for admission's retry estimate.
    pub drain_rate: Mutex<RateMeter>,
    /// Submission counters, registered once (a labelled lookup per job would cost more).
    pub submitted: metrics::Counter,
    pub refused: metrics::Counter,
}

/// A rate measured between looks at least a second apart.
#[derive(Default)]
pub(crate) struct RateMeter {
    last: Option<(tokio::time::Instant, u64)>,
    per_sec: Option<f64>,
}

impl RateMeter {
    pub fn observe(&mut self, now: tokio::time::Instant, total: u64) -> Option<f64> {
        match self.last {
            None => self.last = Some((now, total)),
            Some((at, n)) => {
                let secs = now.duration_since(at).as_secs_f64();
                if secs >= 1.0 {
                    self.per_sec = Some(total.saturating_sub(n) as f64 / secs);
                    self.last = Some((now, total));
                }
            }
        }
        self.per_sec
    }
}

impl GraphCtx {
    pub fn scheduler(&self) -> Option<ActorRef<SchedMsg>> {
        self.scheduler
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub(super) fn wake(&self) {
        if !self.wake_pending.swap(true, Relaxed)
            && let Some(s) = self.scheduler()
            && s.cast(SchedMsg::Wake).is_err()
        {
            self.wake_pending.store(false, Relaxed);
        }
    }
}

/// Which quota cores each agent draws on. With the cascade on, one core per quota, shared by
/// every agent that names it; in naive mode, one core per (agent, declared quota), named
/// `<quota>@<graph>.<agent>`: local limiting only.
pub(crate) struct QuotaIndex {
    pub specs: Vec<Arc<QuotaModel>>,
    /// graph → agent → core indices.
    pub agents: Vec<Vec<Vec<usize>>>,
    /// graph → agent → a tool-using agent's MCP servers and the core indices their calls
    /// draw on.
    pub tools: Vec<Vec<Vec<ServerQuotas>>>,
    /// The tenants some quota gives a share (`tenant_share`): a job of `share_tenants[i]` is
    /// of class `i + 1`; every other tenant's, of class 0.
    pub share_tenants: Vec<Arc<str>>,
    /// The tenants' share limiters, cores `specs.len()..`: each holds a tenant's calls to its
    /// share of one quota. They limit; they pause nothing and are not listed as quotas.
    pub shares: Vec<Arc<QuotaModel>>,
    /// graph → agent → class → the cores a call of that class draws on: the agent's quotas,
    /// and the class's shares of them.
    pub classes: Vec<Vec<Vec<Vec<usize>>>>,
}

/// An MCP server and the quota cores its tool calls draw on.
pub(crate) type ServerQuotas = (Arc<str>, Vec<usize>);

impl QuotaIndex {
    pub fn new(shared_model: &crate::model::ServerModel, cascade: bool) -> Self {
        let mut specs: Vec<Arc<QuotaModel>> = Vec::new();
        let mut by_name: HashMap<Arc<str>, usize> = HashMap::new();
        let mut agents = Vec::new();
        let mut tools = Vec::new();
        for g in &shared_model.graphs {
            let mut per_agent = Vec::new();
            let mut per_agent_tools = Vec::new();
            for a in &g.agents {
                let mut cores = Vec::new();
                for q in &a.quotas {
                    let spec = shared_model.quotas[q].clone();
                    // Naive mode learns nothing from refusals: an implicit quota would only
                    // add a round trip.
                    if !cascade && spec.implicit {
                        continue;
                    }
                    let idx = if cascade {
                        *by_name.entry(q.clone()).or_insert_with(|| {
                            specs.push(spec);
                            specs.len() - 1
                        })
                    } else {
                        // Each agent's local copy is a limiter of its own, and is named so
                        // (`llm@graph.agent`): snapshots and metrics never show two quotas of
                        // one name.
                        let mut own = (*spec).clone();
                        own.name = format!("{q}@{}.{}", g.name, a.name).into();
                        specs.push(Arc::new(own));
                        specs.len() - 1
                    };
                    cores.push(idx);
                }
                per_agent.push(cores);
                let mut servers = Vec::new();
                for (server, q) in &a.tool_quotas {
                    // Naive mode: no implicit quota (as for any agent).
                    let cores = if cascade {
                        let spec = shared_model.quotas[q].clone();
                        vec![*by_name.entry(q.clone()).or_insert_with(|| {
                            specs.push(spec);
                            specs.len() - 1
                        })]
                    } else {
                        Vec::new()
                    };
                    servers.push((server.clone(), cores));
                }
                per_agent_tools.push(servers);
            }
            agents.push(per_agent);
            tools.push(per_agent_tools);
        }
        // Every tenant with a share of any quota is a class; each (quota, tenant) share a core.
        let mut share_tenants: Vec<Arc<str>> = Vec::new();
        for spec in &specs {
            for (t, _) in &spec.tenant_share {
                if !share_tenants.contains(t) {
                    share_tenants.push(t.clone());
                }
            }
        }
        let mut shares = Vec::new();
        let mut share_core: HashMap<(usize, usize), usize> = HashMap::new();
        for (q, spec) in specs.iter().enumerate() {
            for (t, s) in &spec.tenant_share {
                let class = 1 + share_tenants.iter().position(|x| x == t).expect("listed");
                share_core.insert((q, class), specs.len() + shares.len());
                shares.push(Arc::new(spec.share_for(t, *s)));
            }
        }
        let classes = agents
            .iter()
            .map(|g: &Vec<Vec<usize>>| {
                g.iter()
                    .map(|base| {
                        (0..=share_tenants.len())
                            .map(|class| {
                                let mut list = base.clone();
                                list.extend(
                                    base.iter().filter_map(|&q| share_core.get(&(q, class))),
                                );
                                list
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        Self {
            specs,
            agents,
            tools,
            share_tenants,
            shares,
            classes,
        }
    }

    /// The class of `tenant`'s calls: its place among the tenants with a share, or 0.
    pub fn class_of(&self, tenant: &str) -> u16 {
        self.share_tenants
            .iter()
            .position(|t| &**t == tenant)
            .map_or(0, |i| i as u16 + 1)
    }

    /// The cores a call of `agent` for a job of `class` draws on.
    pub fn quotas(&self, agent: (usize, usize), class: u16) -> &[usize] {
        &self.classes[agent.0][agent.1][class as usize]
    }
}
