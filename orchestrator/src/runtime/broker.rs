//! The quota broker: one per server, it owns every quota and decides which waiting call starts
//! when (see [`BrokerCore`] for how schedulers reach it). Calls wait in job age order (a queue per
//! agent, merged by age), so across every agent (of every graph) that draws on a quota the oldest
//! job goes first, and a half-done job is never starved by newer ones. While a quota can serve its next call within `pause_threshold` the broker paces (a timer
//! grants the call when it fits); beyond that the quota is exhausted, and the broker pauses every
//! agent it reaches through the signal plane until it recovers.
//!
//! A scheduler asks only for steps its agent has a free slot for, so the waiting list is bounded
//! by the agents' concurrency. Steps that draw on no quota never come here.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError, Weak};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use smallvec::SmallVec;
use tokio::time::Instant;

use super::context::{GraphCtx, QuotaIndex, Shared};
use super::protocol::{Acquire, BrokerMsg, Grant, SchedMsg, SettleGrant, Settlement};
use crate::clock;
use crate::job::JobId;
use crate::model::QuotaModel;
use crate::quota::shared::{Claim, QuotaSignal};
use crate::quota::{CircuitState, Demand, Outcome, QuotaCore, Ready, Reservation};
use crate::signal::{
    AgentChange, AgentKey, CauseInfo, GraphEvent, GraphEventKind, Reach, SignalPlane,
};

pub(crate) struct Broker;

/// A call asked for by agent, job, step and token.
type Asked = (AgentKey, JobId, usize, u32);

/// A queue of waiting calls: an agent's, for the jobs of one tenant class.
type QueueKey = (AgentKey, u16);

/// Waiting calls by (job age, arrival).
type Queue = BTreeMap<(u64, u64), Acquire>;

pub(crate) struct BrokerArgs {
    pub shared: Arc<Shared>,
    pub graphs: Vec<Arc<GraphCtx>>,
    pub index: Arc<QuotaIndex>,
}

/// The broker as the runtime reaches it: its actor, for what comes by message (timers, operators,
/// snapshots, a settle that could not be done at once), and its state, which a scheduler locks
/// directly to ask for a grant or to settle one. So a call that may start at once costs a lock
/// rather than three messages between two threads (ask, grant, settle), which was a fifth of the
/// engine's work per step.
pub(crate) struct BrokerCore {
    pub actor: ActorRef<BrokerMsg>,
    state: Mutex<BrokerState>,
    /// Replaced by a new broker (its actor failed or stopped): it grants and settles nothing
    /// more, as a dead actor would have received nothing.
    retired: AtomicBool,
}

impl BrokerCore {
    /// Grant and settle nothing more (see `retired`). Taken under the lock, so that nothing this
    /// broker does is still under way once it returns (a grant sent after the schedulers were
    /// told of the new broker would be counted twice).
    pub fn retire(&self) {
        let _state = self.lock();
        self.retired.store(true, Ordering::Release);
    }

    fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Acquire)
    }

    fn lock(&self) -> MutexGuard<'_, BrokerState> {
        // A lock poisoned by a panic belongs to a broker that is being replaced (see `guarded`),
        // which is retired before anyone reads its state again.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Run `f` on the state, unless the broker is retired. The broker's code also runs on the
    /// threads of the schedulers that call it: a panic there would fail that scheduler and leave
    /// this broker half-written. So it is caught, the broker retired and its actor told to fail,
    /// and its supervisor starts a new one (the schedulers then ask again).
    fn guarded<T>(&self, s: &mut BrokerState, f: impl FnOnce(&mut BrokerState) -> T) -> Option<T> {
        if self.is_retired() {
            return None;
        }
        match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(s))) {
            Ok(v) => Some(v),
            Err(panic) => {
                let message = super::panic_message(&*panic);
                tracing::error!(%message, "the quota broker panicked; replacing it");
                self.retired.store(true, Ordering::Release);
                let _ = self.actor.cast(BrokerMsg::Fail(message));
                None
            }
        }
    }

    /// Ask for a quota grant for a step whose agent has a free slot: the grant when the call may
    /// start now, else `None` — the call then waits its turn, oldest job first, and its grant
    /// comes as [`SchedMsg::Granted`]. A retired broker grants nothing: the step waits, and the
    /// scheduler asks the new broker once told of it.
    pub fn acquire(&self, a: Acquire) -> Option<Grant> {
        let mut s = self.lock();
        self.guarded(&mut s, |s| s.acquire(a)).flatten()
    }

    /// A grant on `quotas` for a call that is not a step of its own (a tool loop's turn or tool
    /// call), if they let it start now and no step waits at them already (which goes first);
    /// else when to ask again (`None`: not known — a concurrency limit, an open circuit, a
    /// pause, or older calls waiting).
    pub fn try_take(&self, quotas: &[usize], demand: Demand) -> Result<Grant, Option<Instant>> {
        let mut s = self.lock();
        self.guarded(&mut s, |s| s.try_take(quotas, demand))
            .unwrap_or(Err(None))
    }

    /// What the cluster's shared quota state says: its health (how the local quotas run), or a
    /// hold on a quota (another node's refusal, a spent shared bucket). Applied at once, so
    /// that a step given back by a spent shared bucket finds its quota paused when it asks again.
    pub fn signal(&self, signal: QuotaSignal) {
        let mut s = self.lock();
        self.guarded(&mut s, |s| s.on_cluster(signal));
    }
}

impl SettleGrant for BrokerCore {
    fn settle(&self, grant: u64, end: Settlement) {
        // (A retired broker took its reservations with it: `guarded` does nothing.)
        match self.state.try_lock() {
            Ok(mut s) => {
                self.guarded(&mut s, |s| s.settle(grant, end));
            }
            Err(TryLockError::Poisoned(p)) => {
                self.guarded(&mut p.into_inner(), |s| s.settle(grant, end));
            }
            // Busy on another thread, or this grant is dropped while the broker itself works
            // (a grant message that could not be delivered): by message, in turn.
            Err(TryLockError::WouldBlock) => {
                let _ = self.actor.cast(BrokerMsg::Settle { grant, end });
            }
        }
    }
}

pub(crate) struct BrokerState {
    me: ActorRef<BrokerMsg>,
    /// This broker, for the grants it makes (they settle through it).
    core: Weak<BrokerCore>,
    shared: Arc<Shared>,
    graphs: Vec<Arc<GraphCtx>>,
    index: Arc<QuotaIndex>,
    cores: Vec<QuotaCore>,
    plane: SignalPlane,
    waiting: Waiting,
    next_req: u64,
    /// What each granted call holds, by grant (one quota in most calls: held inline).
    outstanding: HashMap<u64, SmallVec<[(usize, Reservation); 1]>>,
    next_grant: u64,
    /// Tokens of the last call seen per core: the size of "the next call" when none waits.
    last_demand: Vec<Demand>,
    circuits: Vec<Option<CircuitState>>,
    timer: Option<(Instant, u64)>,
    timer_gen: u64,
    /// Scratch list of the quotas a message touched.
    touched: Vec<usize>,
    /// Scratch list of the quotas a grant pass found blocked.
    blocked: Vec<bool>,
}

impl Actor for Broker {
    type Msg = BrokerMsg;
    type State = Arc<BrokerCore>;
    type Arguments = BrokerArgs;

    async fn pre_start(
        &self,
        me: ActorRef<BrokerMsg>,
        args: BrokerArgs,
    ) -> Result<Arc<BrokerCore>, ActorProcessingErr> {
        let now = Instant::now();
        let cores: Vec<QuotaCore> = args
            .index
            .specs
            .iter()
            .chain(args.index.shares.iter())
            .map(|s| QuotaCore::new(s.clone(), now))
            .collect();
        let mut cores = cores;
        // The cluster's shared quotas: run the local ones as the shared state's health says,
        // and read the holds again (those made while no broker ran were not applied).
        if let Some(c) = &args.shared.cluster {
            let mode = c.backend.mode();
            for core in &mut cores {
                core.set_cluster(mode);
            }
        }
        let models: Vec<_> = args.graphs.iter().map(|g| g.model.clone()).collect();
        let shared = args.shared.clone();
        let core = Arc::new_cyclic(|weak| BrokerCore {
            actor: me.clone(),
            retired: AtomicBool::new(false),
            state: Mutex::new(BrokerState {
                me: me.clone(),
                core: weak.clone(),
                circuits: cores.iter().map(QuotaCore::circuit_state).collect(),
                last_demand: vec![Demand::default(); cores.len()],
                blocked: vec![false; cores.len()],
                cores,
                plane: SignalPlane::new(&models),
                shared: args.shared,
                graphs: args.graphs,
                waiting: Waiting::new(&args.index),
                index: args.index,
                next_req: 0,
                outstanding: HashMap::new(),
                next_grant: 0,
                timer: None,
                timer_gen: 0,
                touched: Vec::new(),
            }),
        });
        // Schedulers ask it for grants from their first step on.
        shared.set_broker(Some(core.clone()));
        // A change of the shared state's health, or a hold, that came while this broker started
        // found none: read both again now that signals reach it.
        if let Some(c) = &shared.cluster {
            core.signal(QuotaSignal::Mode(c.backend.mode()));
            core.signal(QuotaSignal::Nodes(c.backend.live_nodes()));
            c.backend.resync_later();
        }
        Ok(core)
    }

    async fn handle(
        &self,
        _me: ActorRef<BrokerMsg>,
        msg: BrokerMsg,
        core: &mut Arc<BrokerCore>,
    ) -> Result<(), ActorProcessingErr> {
        if let BrokerMsg::Fail(message) = msg {
            return Err(format!("the quota broker panicked: {message}").into());
        }
        let mut state = core.lock();
        if !core.is_retired() {
            state.on_message(msg);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _me: ActorRef<BrokerMsg>,
        core: &mut Arc<BrokerCore>,
    ) -> Result<(), ActorProcessingErr> {
        // The shared context holds the broker and the broker holds the context: let go of it.
        core.retire();
        let shared = core.lock().shared.clone();
        let mut current = shared.broker.write().unwrap_or_else(|p| p.into_inner());
        if current.as_ref().is_some_and(|b| Arc::ptr_eq(b, core)) {
            *current = None;
        }
        Ok(())
    }
}

impl BrokerState {
    fn acquire(&mut self, a: Acquire) -> Option<Grant> {
        let now = Instant::now();
        let mut list = self.scratch();
        let index = Arc::clone(&self.index);
        let quotas = index.quotas(a.agent, a.class);
        // Nothing waits anywhere, so no older call can be passed: a call its quotas let start
        // now goes without joining (and leaving) the waiting list.
        if self.waiting.active.is_empty()
            && quotas
                .iter()
                .all(|&q| self.cores[q].ready(now, a.demand) == Ready::Now)
        {
            let grant = self.take(now, &a, &mut list);
            self.after_change(now, list, true, None);
            return Some(grant);
        }
        self.next_req += 1;
        list.extend_from_slice(quotas);
        let asked = (a.agent, a.job, a.step, a.token);
        self.waiting.insert((a.seq, self.next_req), a);
        self.after_change(now, list, true, Some(asked))
    }

    fn try_take(&mut self, quotas: &[usize], demand: Demand) -> Result<Grant, Option<Instant>> {
        let now = Instant::now();
        let index = Arc::clone(&self.index);
        // An older call waiting at one of these quotas goes first (a call waiting only for its
        // tenant's share does not wait at the quota: it is not passed).
        if quotas.iter().any(|&q| self.waits_at_quota(now, &index, q)) {
            return Err(None);
        }
        let mut at: Option<Instant> = None;
        for &q in quotas {
            match self.cores[q].ready(now, demand) {
                Ready::Now => {}
                Ready::At(t) => at = Some(at.map_or(t, |a| a.max(t))),
                Ready::Blocked => return Err(None),
            }
        }
        if at.is_some() {
            return Err(at);
        }
        let mut list = self.scratch();
        let grant = self.take_on(now, quotas, demand, &mut list);
        self.after_change(now, list, true, None);
        Ok(grant)
    }

    /// Whether a call waits at quota `q` for the quotas themselves (not only for its tenant's
    /// share of them).
    fn waits_at_quota(&mut self, now: Instant, index: &QuotaIndex, q: usize) -> bool {
        let specs = index.specs.len();
        let heads: SmallVec<[(QueueKey, Demand); 4]> = self
            .waiting
            .active
            .iter()
            .filter(|(a, c)| index.quotas(*a, *c).contains(&q))
            .filter_map(|&key| self.waiting.head(key).map(|(_, r)| (key, r.demand)))
            .collect();
        heads.into_iter().any(|((a, c), demand)| {
            let list = index.quotas(a, c);
            !list.iter().any(|&s| s >= specs)
                || list
                    .iter()
                    .any(|&base| base < specs && self.cores[base].ready(now, demand) != Ready::Now)
        })
    }

    /// The state's scratch list of touched quotas, empty: no allocation per call.
    fn scratch(&mut self) -> Vec<usize> {
        let mut list = std::mem::take(&mut self.touched);
        list.clear();
        list
    }

    /// Start the call `req` now: take its share of each of its quotas (at once, so that the next
    /// request sees this one's spend), which it holds as the returned grant. Adds those quotas to
    /// `spent`.
    fn take(&mut self, now: Instant, req: &Acquire, spent: &mut Vec<usize>) -> Grant {
        let index = Arc::clone(&self.index);
        let quotas = index.quotas(req.agent, req.class);
        self.take_on(now, quotas, req.demand, spent)
    }

    fn take_on(
        &mut self,
        now: Instant,
        quotas: &[usize],
        demand: Demand,
        spent: &mut Vec<usize>,
    ) -> Grant {
        let reservations: SmallVec<[(usize, Reservation); 1]> = quotas
            .iter()
            .map(|&q| (q, self.cores[q].take(now, demand)))
            .collect();
        for &q in quotas {
            self.last_demand[q] = demand;
            spent.push(q);
        }
        self.next_grant += 1;
        let grant = self.next_grant;
        self.outstanding.insert(grant, reservations);
        let to = self.core.upgrade().map(|c| c as Arc<dyn SettleGrant>);
        // The cluster's shared quotas, the tenants' shares of them included.
        let claim = self.shared.cluster.as_ref().and_then(|c| {
            let items: SmallVec<[_; 1]> = quotas
                .iter()
                .filter_map(|&q| c.specs.get(q).map(|s| (s.clone(), demand.tokens)))
                .collect();
            (!items.is_empty()).then(|| Claim::new(c.backend.clone(), items))
        });
        Grant::new(grant, to).with_claim(claim)
    }

    /// A change of the shared state, for every quota: the declared and implicit ones and the
    /// tenants' shares of them (shared too, so a tenant's share holds across the cluster).
    fn on_cluster(&mut self, signal: QuotaSignal) {
        let now = Instant::now();
        match signal {
            QuotaSignal::Mode(mode) => {
                for core in &mut self.cores {
                    core.set_cluster(mode);
                }
            }
            QuotaSignal::Nodes(n) => {
                for core in &mut self.cores {
                    core.set_nodes(n);
                }
            }
            QuotaSignal::Learned { quota, per_second } => {
                if let Some(core) = self.cores.iter_mut().find(|c| c.name() == quota) {
                    core.set_cluster_learned(per_second);
                }
            }
            QuotaSignal::Hold {
                quota,
                wait,
                reason,
            } => {
                if let Some(core) = self.cores.iter_mut().find(|c| c.name() == quota) {
                    core.hold_for(now, wait, reason);
                }
            }
        }
        let list = self.scratch();
        self.after_change(now, list, false, None);
    }

    fn settle(&mut self, grant: u64, end: Settlement) {
        let now = Instant::now();
        let mut list = self.scratch();
        if let Some(reservations) = self.outstanding.remove(&grant) {
            // A credential that cannot get a token or is refused: its quota waits; the call
            // counts for none of the others. (Unless none of the call's quotas is the credential's: then they all
            // wait, rather than the call coming straight back.)
            let credential = end.credential.as_deref().and_then(|name| {
                reservations.iter().map(|(q, _)| *q).find(|&q| {
                    let spec = &self.cores[q].spec;
                    spec.credential
                        && spec.name.strip_prefix(QuotaModel::CREDENTIAL_PREFIX) == Some(name)
                })
            });
            for (q, r) in reservations {
                let outcome = match credential {
                    Some(c) if c != q => Outcome::Abandoned,
                    _ => end.outcome,
                };
                self.cores[q].settle_cost(now, &r, end.cost_micros, outcome);
                // A tenant's share learns no limits: it is a fraction of what its quota states.
                let limits = end.limits.as_ref().filter(|_| q < self.index.specs.len());
                let changed = self.cores[q].settle(now, r, end.usage, outcome, limits);
                // A circuit that opened here is open on every node of the cluster.
                if changed
                    && let Some(c) = &self.shared.cluster
                    && let Some(spec) = c.specs.get(q)
                    && let Some(until) = self.cores[q].circuit_open_until(now)
                {
                    c.backend
                        .hold(spec, until - now, crate::quota::Limit::CircuitOpen, false);
                }
                list.push(q);
            }
        }
        self.after_change(now, list, true, None);
    }

    /// Grant what can start now, then re-evaluate the exhaustion of the quotas in `list` (every
    /// quota when not `touched`). The grant for `asked` is returned rather than sent.
    fn after_change(
        &mut self,
        now: Instant,
        mut list: Vec<usize>,
        touched: bool,
        asked: Option<Asked>,
    ) -> Option<Grant> {
        let grant = self.grant_pass(now, &mut list, asked);
        list.sort_unstable();
        list.dedup();
        self.exhaustion_pass(now, touched.then_some(&list[..]));
        self.touched = list;
        grant
    }

    fn on_message(&mut self, msg: BrokerMsg) {
        let now = Instant::now();
        match msg {
            BrokerMsg::Settle { grant, end } => return self.settle(grant, end),
            BrokerMsg::Resync(g) => {
                if let Some(sched) = self.graphs[g].scheduler() {
                    let _ = sched.cast(SchedMsg::Pause(self.plane.graph_state(g)));
                }
                return;
            }
            BrokerMsg::Pauses(g, reply) => {
                let _ = reply.send(self.plane.graph_pauses(g));
                return;
            }
            BrokerMsg::Snapshot(reply) => {
                let specs = self.index.specs.len();
                let _ = reply.send(
                    self.cores[..specs]
                        .iter_mut()
                        .map(|c| c.snapshot(now))
                        .collect(),
                );
                return;
            }
            // Handled by the actor, which fails with it.
            BrokerMsg::Fail(_) => return,
            BrokerMsg::Tick(generation) => {
                // Time passed: any quota's wait may have ended.
                if self.timer.is_some_and(|(_, g)| g == generation) {
                    self.timer = None;
                }
            }
            BrokerMsg::AgentHealth { agent, failed } => {
                let info = failed.then(|| CauseInfo {
                    until_unix_ms: None,
                    reason: "agent restarted too often and is marked failed".into(),
                });
                let changes = self.plane.set_agent_failed(agent, info);
                self.publish(changes);
            }
            BrokerMsg::Exhaust {
                quota,
                duration,
                reply,
            } => {
                let mut found = false;
                // In naive mode every agent holds its own copy, named `<quota>@<graph>.<agent>`.
                let copy = |name: &str| {
                    name.strip_prefix(quota.as_str())
                        .is_some_and(|rest| rest.is_empty() || rest.starts_with('@'))
                };
                for (q, c) in self
                    .cores
                    .iter_mut()
                    .enumerate()
                    .filter(|(_, c)| copy(c.name()))
                {
                    c.hold(now, duration);
                    found = true;
                    // On every node of the cluster.
                    if let Some(cluster) = &self.shared.cluster
                        && let Some(spec) = cluster.specs.get(q)
                    {
                        cluster.backend.hold(
                            spec,
                            duration,
                            crate::quota::Limit::UpstreamRateLimit,
                            false,
                        );
                    }
                }
                let _ = reply.send(found);
            }
        }
        // Time passed, an operator or a failed agent acted: any quota may have changed.
        let list = self.scratch();
        self.after_change(now, list, false, None);
    }

    /// Grant waiting calls, oldest job first. Once a call must wait at a quota, no younger call
    /// may pass it there.
    /// Adds the quotas that granted calls to `spent`. The grant of the call `asked` for, if it
    /// goes now, is returned; the others go to their schedulers.
    fn grant_pass(
        &mut self,
        now: Instant,
        spent: &mut Vec<usize>,
        asked: Option<Asked>,
    ) -> Option<Grant> {
        if self.waiting.active.is_empty() {
            return None;
        }
        let mut kept = None;
        let mut blocked = std::mem::take(&mut self.blocked);
        blocked.clear();
        blocked.resize(self.cores.len(), false);
        let mut wake: Option<Instant> = None;
        // Oldest first across agents: a merge of the agents' queues by their heads. An agent
        // whose head cannot go leaves the merge (the rest of its queue waits at the same quotas),
        // so a pass costs the calls it grants plus the agents that wait, not every waiting call.
        let mut heads = self.waiting.heads();
        let specs = self.index.specs.len();
        while let Some(Reverse((_, agent))) = heads.pop() {
            let quotas = self.index.quotas(agent.0, agent.1);
            if quotas.iter().any(|&q| blocked[q]) {
                // Held back by an older call: it holds back younger ones where it waits. Behind
                // a tenant's spent share only, that is the share, not the quotas (the other
                // tenants' calls pass there).
                let at_quota = quotas.iter().any(|&q| q < specs && blocked[q]);
                for &q in quotas {
                    if at_quota || q >= specs {
                        blocked[q] = true;
                    }
                }
                continue;
            }
            let demand = self
                .waiting
                .head(agent)
                .map_or(Demand::default(), |(_, r)| r.demand);
            // Whether a quota (not only a tenant's share) holds it back.
            let mut ready = true;
            let mut quota_waits = false;
            for &q in quotas {
                let fits = match self.cores[q].ready(now, demand) {
                    Ready::Now => true,
                    Ready::At(t) => {
                        wake = Some(wake.map_or(t, |w| w.min(t)));
                        false
                    }
                    Ready::Blocked => false,
                };
                if !fits {
                    ready = false;
                    quota_waits |= q < specs;
                }
            }
            if !ready {
                // Younger calls may not pass it at its quotas; but a tenant at the end of its
                // share holds back no other tenant's calls: only its share is closed to them.
                for &q in quotas {
                    if quota_waits || q >= specs {
                        blocked[q] = true;
                    }
                }
                continue;
            }
            let req = self.waiting.pop(agent).expect("a head");
            let grant = self.take(now, &req, spent);
            if asked == Some((req.agent, req.job, req.step, req.token)) {
                kept = Some(grant);
            } else if let Some(sched) = self.graphs[req.agent.0].scheduler() {
                // Without a scheduler to run it (restarting), or with a message that is never
                // read, the grant is dropped, and so comes back here as abandoned.
                let _ = sched.cast(SchedMsg::Granted {
                    job: req.job,
                    step: req.step,
                    token: req.token,
                    grant,
                });
            }
            if let Some((key, _)) = self.waiting.head(agent) {
                heads.push(Reverse((key, agent)));
            }
        }
        self.blocked = blocked;
        self.schedule(now, wake);
        kept
    }

    /// Re-evaluate the exhaustion of the quotas in `only` (every quota when `None`: time passed,
    /// or an operator or a failed agent acted); publish pauses and resumes; watch circuits. A
    /// quota nothing touched cannot have changed: its exhaustion ends by time, which a tick
    /// checks. (Re-evaluating every quota on every message cost a tenth of the engine's CPU.)
    fn exhaustion_pass(&mut self, now: Instant, only: Option<&[usize]>) {
        let mut wake: Option<Instant> = None;
        let all: Vec<usize>;
        let cores = match only {
            Some(list) => list,
            None => {
                all = (0..self.index.specs.len()).collect();
                &all
            }
        };
        for &q in cores {
            // A tenant's share pauses nothing: its calls wait, the other tenants' go on.
            if q >= self.index.specs.len() {
                continue;
            }
            let hint = self
                .waiting
                .oldest_at(&self.index, q)
                .map_or(self.last_demand[q], |r| r.demand);
            let change = self.cores[q].update_exhaustion(now, hint);
            if let Some(ex) = self.cores[q].exhausted() {
                wake = Some(wake.map_or(ex.until, |w| w.min(ex.until)));
            }
            let circuit = self.cores[q].circuit_state();
            if circuit != self.circuits[q] {
                self.circuits[q] = circuit;
                if let Some(state) = circuit {
                    self.shared.publish_graph_event(GraphEvent {
                        graph: None,
                        at: clock::now(),
                        kind: GraphEventKind::CircuitChanged {
                            quota: self.cores[q].spec.name.clone(),
                            state,
                        },
                    });
                }
            }
            let Some(state) = change else { continue };
            let name = self.cores[q].spec.name.clone();
            let kind = match &state {
                Some(ex) => {
                    tracing::warn!(quota = %name, reason = ex.reason.as_str(), wait = ?(ex.until - now), "quota exhausted");
                    GraphEventKind::QuotaExhausted {
                        quota: name.clone(),
                        until_unix_ms: clock::unix_ms(clock::at(ex.until)),
                        reason: ex.reason.to_string(),
                    }
                }
                None => {
                    tracing::info!(quota = %name, "quota available again");
                    GraphEventKind::QuotaAvailable {
                        quota: name.clone(),
                    }
                }
            };
            self.shared.publish_graph_event(GraphEvent {
                graph: None,
                at: clock::now(),
                kind,
            });
            if !self.shared.cascade {
                continue;
            }
            let info = state.map(|ex| CauseInfo {
                until_unix_ms: Some(clock::unix_ms(clock::at(ex.until))),
                reason: ex.reason.as_str().into(),
            });
            let changes = self.plane.set_quota(&name, info);
            self.publish(changes);
        }
        self.schedule(now, wake);
    }

    /// Tell each scheduler about its agents' changes (one message per graph) and, when anyone
    /// watches, announce each change with its causes.
    fn publish(&mut self, changes: Vec<AgentChange>) {
        if changes.is_empty() {
            return;
        }
        let mut by_graph: BTreeMap<usize, Vec<(usize, Option<Reach>)>> = BTreeMap::new();
        for c in changes {
            by_graph
                .entry(c.agent.0)
                .or_default()
                .push((c.agent.1, c.pause));
        }
        let watched = self.shared.has_graph_watchers();
        for (g, list) in by_graph {
            let ctx = &self.graphs[g];
            if watched {
                for &(a, _) in &list {
                    let agent = ctx.names[a].clone();
                    let kind = match self.plane.pause_of((g, a)) {
                        Some(p) => GraphEventKind::AgentPaused {
                            agent,
                            reach: p.reach,
                            causes: p.causes,
                        },
                        None => GraphEventKind::AgentResumed { agent },
                    };
                    self.shared.publish_graph_event(GraphEvent {
                        graph: Some(ctx.model.name.clone()),
                        at: clock::now(),
                        kind,
                    });
                }
            }
            if let Some(sched) = ctx.scheduler() {
                let _ = sched.cast(SchedMsg::Pause(list));
            }
        }
    }

    /// Make sure a tick arrives by `at` (one timer at a time, the earliest).
    fn schedule(&mut self, now: Instant, at: Option<Instant>) {
        let Some(at) = at else { return };
        if self.timer.is_some_and(|(t, _)| t <= at && t > now) {
            return;
        }
        self.timer_gen += 1;
        let generation = self.timer_gen;
        self.timer = Some((at, generation));
        ractor::time::send_after(
            at.saturating_duration_since(now),
            self.me.get_cell(),
            move || BrokerMsg::Tick(generation),
        );
    }
}

/// Calls waiting for their quotas: one queue per agent, in job age order (an agent always draws
/// on the same quotas, so its queue waits or goes as one), and the set of agents with a queue.
/// One list of every waiting call made each message cost every call waiting at any quota: 10,000
/// calls held at one upstream made every other graph four times slower.
struct Waiting {
    /// graph → agent → tenant class → its waiting calls by (job age, arrival).
    queues: Vec<Vec<Vec<Queue>>>,
    /// Queues that are not empty.
    active: BTreeSet<QueueKey>,
}

impl Waiting {
    fn new(index: &QuotaIndex) -> Self {
        Self {
            queues: index
                .classes
                .iter()
                .map(|g| {
                    g.iter()
                        .map(|classes| classes.iter().map(|_| BTreeMap::new()).collect())
                        .collect()
                })
                .collect(),
            active: BTreeSet::new(),
        }
    }

    fn insert(&mut self, key: (u64, u64), req: Acquire) {
        let queue = (req.agent, req.class);
        self.queues[req.agent.0][req.agent.1][req.class as usize].insert(key, req);
        self.active.insert(queue);
    }

    fn head(&self, (agent, class): QueueKey) -> Option<((u64, u64), &Acquire)> {
        self.queues[agent.0][agent.1][class as usize]
            .first_key_value()
            .map(|(k, r)| (*k, r))
    }

    fn pop(&mut self, (agent, class): QueueKey) -> Option<Acquire> {
        let queue = &mut self.queues[agent.0][agent.1][class as usize];
        let req = queue.pop_first().map(|(_, r)| r);
        if queue.is_empty() {
            self.active.remove(&(agent, class));
        }
        req
    }

    /// Every waiting queue's oldest call, youngest last: the start of a merge.
    fn heads(&self) -> BinaryHeap<Reverse<((u64, u64), QueueKey)>> {
        self.active
            .iter()
            .filter_map(|&a| self.head(a).map(|(k, _)| Reverse((k, a))))
            .collect()
    }

    /// The oldest call waiting at quota `q`.
    fn oldest_at(&self, index: &QuotaIndex, q: usize) -> Option<&Acquire> {
        self.active
            .iter()
            .filter(|(a, c)| index.quotas(*a, *c).contains(&q))
            .filter_map(|&a| self.head(a))
            .min_by_key(|(k, _)| *k)
            .map(|(_, r)| r)
    }
}
