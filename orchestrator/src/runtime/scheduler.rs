//! The scheduler of one graph: it admits jobs from the store up to `max_in_flight_jobs`, starts
//! each step when its dependencies have succeeded and its agent has a free slot, retries failed
//! attempts with backoff, and finishes jobs. It is the only owner of in-flight job state, so none
//! of this needs a lock; everything it learns goes to the store before it is announced.
//!
//! Work never queues in a mailbox: jobs wait in the store, ready steps wait in per-agent priority
//! queues here (oldest job first), and an agent actor is sent at most `max_concurrency` calls.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::Duration;

use cascade_agents::{AgentError, AgentOutput, CallContext, ErrorClass, StepInput, Usage};
use ractor::{Actor, ActorProcessingErr, ActorRef};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde_json::{Value, json};
use tokio::time::Instant;

use super::GraphCtx;
use super::agent_actor;
use super::broker::BrokerCore;
use super::context::ApprovalNotice;
use super::protocol::{
    Acquire, AgentHandle, AgentMsg, AgentPanic, AgentSlotSnapshot, BrokerMsg, Call, CallEnd, Grant,
    SchedMsg, SchedulerSnapshot, Settlement, StepDone, Waiting,
};
use super::step::{Decision, Rules, Step, failure_message};
use super::tool_loop::Park;
use crate::approval::{ApprovalError, Resolved};
use crate::job::{
    Approval, ApprovalDecision, ApprovalOutcome, ApprovalView, Budget, JobEvent, JobId, JobRecord,
    JobState, JobUpdate, StepState,
};
use crate::metrics::{AgentMetrics, GraphMetrics};
use crate::model::{Approval as Setting, OnUpstreamPause};
use crate::quota::{Demand, Outcome};
use crate::signal::Reach;

struct StepRun {
    step: Step,
    /// The step's idempotency key, made at its first call.
    key: Option<Arc<str>>,
    /// The approved call, which it runs exactly (instead of one rendered from its input).
    prepared: Option<Arc<Value>>,
}

struct JobRun {
    id_str: Arc<str>,
    /// The idempotency key it was submitted with, if any.
    key: Option<Arc<str>>,
    /// Admission order: lower is older, and goes first.
    seq: u64,
    /// Its tenant's class at the quotas (`QuotaIndex::class_of`).
    class: u16,
    input: Arc<Value>,
    steps: Vec<StepRun>,
    remaining: usize,
    deadline: Option<Instant>,
    /// The deadline's length, for the message when it passes.
    deadline_len: Option<Duration>,
    /// The job has a callback URL to notify when it ends.
    callback: bool,
    started: Instant,
    /// Every step's span (and so every log line of the job) sits under this one.
    span: tracing::Span,
    /// Sampled for trace export (`[telemetry] sample_ratio`).
    traced: bool,
    /// Scope of its audit records.
    tenant: Arc<str>,
    /// Steps whose prepared call waits for a decision.
    proposals: u16,
    /// Its budget and what it spent, for a job that has one (boxed: most jobs have none).
    budget: Option<Box<BudgetRun>>,
}

/// A job's budget as it runs.
struct BudgetRun {
    limit: Budget,
    /// What its steps spent so far.
    spent: Usage,
    /// What its calls under way may spend, by step.
    reserved: smallvec::SmallVec<[(usize, Usage); 2]>,
    /// A step the budget would not cover (its agent and the message): the job stops once
    /// nothing else of it runs.
    breach: Option<(Arc<str>, String)>,
}

/// The job's span, the root of its trace whatever runs now. A job not sampled for export gets
/// the same span from a callsite marked [`UNTRACED`](crate::telemetry::UNTRACED): the OTLP layer
/// skips it, so an unsampled job costs what logging alone costs; logs keep it.
fn job_span(traced: bool, id: &str, graph: &str) -> tracing::Span {
    use tracing::field::Empty;
    if traced {
        tracing::info_span!(parent: None, "job", job_id = %id, graph = %graph, outcome = Empty, "otel.status_code" = Empty)
    } else {
        tracing::info_span!(parent: None, "job", job_id = %id, graph = %graph, outcome = Empty, "otel.status_code" = Empty, untraced = Empty)
    }
}

struct Slot {
    actor: Option<AgentHandle>,
    incarnation: u32,
    /// Calls on the current actor.
    in_flight: u32,
    /// Steps at the broker; they hold a concurrency slot too.
    awaiting: u32,
    max: u32,
    queue: BinaryHeap<Reverse<(u64, JobId)>>,
    /// Quota cores this agent draws on (empty: no broker round trip).
    quotas: Vec<usize>,
    /// It draws on a token or cost quota: its calls reserve the agent's estimate.
    counts_tokens: bool,
    /// A tool-using agent: each step runs a loop whose turns draw on `turn_quotas` and whose
    /// tool calls on their server's, a grant per sub-step (the step itself takes none).
    tools: Option<Arc<ToolQuotas>>,
    pause: Option<Reach>,
    on_upstream_pause: OnUpstreamPause,
    metrics: AgentMetrics,
}

impl Slot {
    /// Whether this agent may start steps now.
    fn held(&self) -> bool {
        match self.pause {
            None => false,
            Some(Reach::Direct) => true,
            Some(Reach::Upstream) => self.on_upstream_pause == OnUpstreamPause::Stop,
        }
    }
}

pub(crate) struct Scheduler;

/// The quotas of a tool-using agent's sub-steps.
struct ToolQuotas {
    turn: Vec<usize>,
    servers: Vec<(Arc<str>, Vec<usize>)>,
}

pub(crate) struct SchedState {
    ctx: Arc<GraphCtx>,
    me: ActorRef<SchedMsg>,
    /// Boxed: the map's spare room then costs a pointer per slot rather than a job's run. Hashed
    /// with foldhash: the ids are the server's own.
    jobs: foldhash::HashMap<JobId, Box<JobRun>>,
    slots: Vec<Slot>,
    rng: SmallRng,
    draining: bool,
    /// The store said this node must start no call (its leases are in doubt): steps wait in
    /// their queues until a tick finds it renewed them.
    fenced: bool,
    /// Agents of this graph paused now; while any is, no new job starts.
    paused: usize,
    broker: Option<Arc<BrokerCore>>,
    metrics: GraphMetrics,
    /// Claim pending jobs in batches of at least this many free places (fewer store round trips).
    admit_batch: usize,
    /// Calls that finished on their first poll, to be taken in turn (not recursively: a finished
    /// step starts the next, whose call may finish at once too), with the attempt whose start is
    /// recorded together with its result (one store update for both).
    finished: VecDeque<(Box<StepDone>, u32)>,
    /// When approvals were last checked for expiry.
    approvals_checked: Option<Instant>,
    /// Jobs left the run (parked) since the last admission: admit again once the message at
    /// hand is done (never from inside an admission, which would nest one per parked job).
    parked_since_admit: bool,
}

/// Calls finished on their first poll that one message carries out before the scheduler reads its
/// mailbox again (the rest follow a [`SchedMsg::Continue`]), so that a graph of instant agents
/// cannot keep a cancel, a tick or a snapshot waiting.
const FINISHED_PER_TURN: usize = 512;

impl Actor for Scheduler {
    type Msg = SchedMsg;
    type State = SchedState;
    type Arguments = Arc<GraphCtx>;

    async fn pre_start(
        &self,
        me: ActorRef<SchedMsg>,
        ctx: Arc<GraphCtx>,
    ) -> Result<SchedState, ActorProcessingErr> {
        let graph_index = ctx.index;
        let slots = ctx
            .model
            .agents
            .iter()
            .map(|a| {
                let mut quotas = ctx.quotas.agents[graph_index][a.index].clone();
                // A quota that learns from its upstream may learn a token limit.
                let counts_tokens = quotas.iter().any(|&q| {
                    let spec = &ctx.quotas.specs[q];
                    spec.tokens.is_some() || spec.cost.is_some() || spec.learns()
                });
                let tools = a.uses_tools().then(|| {
                    Arc::new(ToolQuotas {
                        turn: std::mem::take(&mut quotas),
                        servers: ctx.quotas.tools[graph_index][a.index].clone(),
                    })
                });
                Slot {
                    actor: None,
                    incarnation: 0,
                    in_flight: 0,
                    awaiting: 0,
                    max: a.max_concurrency.get(),
                    queue: BinaryHeap::new(),
                    quotas,
                    counts_tokens,
                    tools,
                    pause: None,
                    on_upstream_pause: a.on_upstream_pause,
                    metrics: AgentMetrics::new(&ctx.model.name, &a.name),
                }
            })
            .collect();
        let admit_batch = (ctx.model.max_in_flight_jobs.get() / 8).clamp(1, 32);
        let metrics = GraphMetrics::new(&ctx.model.name);
        Ok(SchedState {
            ctx,
            me,
            jobs: Default::default(),
            slots,
            rng: SmallRng::seed_from_u64(0x5eed),
            draining: false,
            fenced: false,
            paused: 0,
            broker: None,
            metrics,
            admit_batch,
            finished: VecDeque::new(),
            approvals_checked: None,
            parked_since_admit: false,
        })
    }

    async fn post_start(
        &self,
        me: ActorRef<SchedMsg>,
        s: &mut SchedState,
    ) -> Result<(), ActorProcessingErr> {
        // Pauses in force: a restarted scheduler must honour them from the start.
        s.broker = s.ctx.shared.broker();
        if let Some(b) = &s.broker {
            let _ = b.actor.cast(BrokerMsg::Resync(s.ctx.index));
        }
        // Jobs left running by a previous scheduler (or process) resume first, oldest first.
        let running = s.ctx.shared.store.running(&s.ctx.model.name)?;
        if !running.is_empty() {
            tracing::info!(graph = %s.ctx.model.name, jobs = running.len(), "resuming jobs left running");
        }
        for r in running {
            s.start_job(r, true);
        }
        s.admit(true);
        // Deadlines are checked on a tick: every job may carry its own.
        let period = s
            .ctx
            .model
            .deadline
            .map_or(Duration::from_millis(250), |d| d / 10)
            .clamp(Duration::from_millis(10), Duration::from_millis(250));
        ractor::time::send_interval(period, me.get_cell(), || SchedMsg::Tick);
        s.carry_out_finished();
        s.readmit();
        Ok(())
    }

    async fn handle(
        &self,
        _me: ActorRef<SchedMsg>,
        msg: SchedMsg,
        s: &mut SchedState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SchedMsg::Wake => {
                s.ctx.wake_pending.store(false, Relaxed);
                s.forget_lost();
                s.admit(true);
            }
            SchedMsg::StepDone(done) => s.on_step_done(*done, None),
            SchedMsg::RetryDue { job, step, token } => {
                if let Some(j) = s.jobs.get_mut(&job)
                    && j.steps[step].step.on_retry_due(token, Instant::now())
                {
                    s.slots[step].queue.push(Reverse((j.seq, job)));
                    s.pump(step);
                }
            }
            SchedMsg::AgentUp {
                agent,
                actor,
                incarnation,
                panic,
            } => s.on_agent_up(agent, actor, incarnation, panic),
            SchedMsg::Granted {
                job,
                step,
                token,
                grant,
            } => s.on_granted(job, step, token, grant),
            SchedMsg::Pause(list) => s.apply_pauses(list),
            SchedMsg::BrokerRestarted => {
                s.broker = s.ctx.shared.broker();
                for i in 0..s.slots.len() {
                    s.slots[i].awaiting = 0;
                    for (id, job) in s.jobs.iter_mut() {
                        if job.steps[i].step.back_to_queue() {
                            s.slots[i].queue.push(Reverse((job.seq, *id)));
                        }
                    }
                    s.pump(i);
                }
            }
            SchedMsg::Cancel { job, reason, reply } => {
                let message = format!("cancelled: {reason}");
                let found = s.jobs.contains_key(&job);
                if found {
                    s.finish(job, JobState::Cancelled, Some(message));
                    let _ = reply.send(true);
                } else {
                    // A parked job is the store's alone: it ends there; one made pending again
                    // meanwhile (approved, raised) is cancelled as pending.
                    let ended = s.end_parked(job, JobState::Cancelled, Vec::new(), message)
                        || s.cancel_pending(job, &reason);
                    let _ = reply.send(ended);
                }
            }
            SchedMsg::RaiseBudget { job, budget, reply } => {
                let _ = reply.send(s.raise_budget(job, budget));
            }
            SchedMsg::Decide {
                job,
                step,
                sha256,
                decision,
                reply,
            } => {
                let _ = reply.send(s.decide(job, step, &sha256, decision));
            }
            SchedMsg::Drain => s.draining = true,
            SchedMsg::Tick => {
                s.check_deadlines();
                s.check_approvals();
                if s.fenced && !s.ctx.shared.store.fenced() {
                    s.unfence();
                }
            }
            SchedMsg::Snapshot(reply) => {
                let _ = reply.send(s.snapshot());
            }
            SchedMsg::Continue => {}
            SchedMsg::LoopSpent { job, usage } => {
                if let Some(b) = s.jobs.get_mut(&job).and_then(|j| j.budget.as_mut()) {
                    b.spent.add(&usage);
                }
            }
        }
        s.carry_out_finished();
        s.readmit();
        Ok(())
    }
}

impl SchedState {
    fn record(&self, job: JobId, update: JobUpdate) {
        let recorded = self.ctx.shared.store.update(job, update).map(|e| [e]);
        self.publish(job, recorded);
    }

    /// Record changes that must be durable together, and announce their events.
    fn record_all(&self, job: JobId, updates: Vec<JobUpdate>) {
        match self.ctx.shared.store.update_all(job, updates) {
            Ok(events) => {
                for event in events.into_iter().flatten() {
                    self.ctx.shared.publish(event);
                }
            }
            Err(e) => tracing::error!(job_id = %job, error = %e, "could not record job update"),
        }
    }

    /// Record a step's start and its result in one store update.
    fn record_two(&self, job: JobId, first: JobUpdate, second: JobUpdate) {
        let recorded = self.ctx.shared.store.update_two(job, first, second);
        self.publish(job, recorded);
    }

    /// Announce the events a store update made.
    fn publish<const N: usize>(
        &self,
        job: JobId,
        recorded: Result<[Option<JobEvent>; N], crate::store::StoreError>,
    ) {
        match recorded {
            Ok(events) => {
                for event in events.into_iter().flatten() {
                    self.ctx.shared.publish(event);
                }
            }
            // A call of a job this node forgot (another node holds it) ended: nothing to record.
            Err(crate::store::StoreError::NotFound(_)) if !self.jobs.contains_key(&job) => {}
            Err(e) => tracing::error!(job_id = %job, error = %e, "could not record job update"),
        }
    }

    /// Admit again if jobs were parked since the last admission (see `parked_since_admit`). An
    /// admission that parks more sends another `Continue`, so a backlog of jobs that park at
    /// once is admitted a batch per message, not in one unbounded turn.
    fn readmit(&mut self) {
        if std::mem::take(&mut self.parked_since_admit) {
            self.admit(true);
        }
    }

    /// Claim pending jobs while there is room. With `eager`, claim even a single free place.
    fn admit(&mut self, eager: bool) {
        if self.draining {
            return;
        }
        if self.fenced || self.ctx.shared.store.fenced() {
            self.fenced = true;
            return;
        }
        // Jobs taken over from a dead node were running: they resume first, paused or not, as
        // jobs left running by a restart do (their steps wait for the broker like any other).
        let room = self
            .ctx
            .model
            .max_in_flight_jobs
            .get()
            .saturating_sub(self.jobs.len());
        if room > 0 {
            for r in self.ctx.shared.store.adopted(&self.ctx.model.name, room) {
                self.start_job(r, true);
            }
        }
        // A job whose path runs through a paused agent could only wait: it stays pending, and
        // spends no upstream call or token meanwhile.
        if self.paused > 0 {
            return;
        }
        let free = self
            .ctx
            .model
            .max_in_flight_jobs
            .get()
            .saturating_sub(self.jobs.len());
        if free == 0 || (!eager && free < self.admit_batch && !self.jobs.is_empty()) {
            return;
        }
        match self
            .ctx
            .shared
            .store
            .claim_pending(&self.ctx.model.name, free)
        {
            Ok(records) => {
                for r in records {
                    self.start_job(r, false);
                }
            }
            Err(e) => {
                tracing::error!(graph = %self.ctx.model.name, error = %e, "could not claim pending jobs")
            }
        }
    }

    /// Forget the jobs another node took over (while this node could not renew its leases):
    /// their steps start nothing more here, and what their running calls return is dropped.
    fn forget_lost(&mut self) {
        for id in self.ctx.shared.store.lost_leases(&self.ctx.model.name) {
            if self.jobs.remove(&id).is_some() {
                tracing::warn!(graph = %self.ctx.model.name, job_id = %id, "another node holds this job now: this node forgets it");
            }
        }
    }

    /// The node renewed its leases again: forget what another node took meanwhile, then start
    /// what waited.
    fn unfence(&mut self) {
        self.fenced = false;
        self.forget_lost();
        for i in 0..self.slots.len() {
            self.pump(i);
        }
        self.admit(true);
    }

    fn start_job(&mut self, r: JobRecord, resumed: bool) {
        let model = &self.ctx.model;
        let id = r.id;
        let mut proposals = 0;
        let mut steps: Vec<StepRun> = r
            .steps
            .iter()
            .map(|st| {
                let done = st
                    .output
                    .clone()
                    .filter(|_| st.state == StepState::Succeeded);
                // An approved call runs as approved, whatever ran before the job was parked.
                // (A tool call's approval is the tool loop's to read from the step's record.)
                let prepared = st
                    .approval
                    .as_ref()
                    .filter(|a| {
                        a.sub_step.is_none()
                            && a.decision
                                .as_ref()
                                .is_some_and(|d| d.outcome == ApprovalOutcome::Approved)
                    })
                    .and_then(|a| serde_json::from_str::<Value>(&a.proposal).ok())
                    .map(Arc::new);
                // A tool loop's run that ended in a proposal was not an attempt, though its start
                // was recorded as one: waiting for the decision, or decided and not run since.
                let tool_park = st.approval.as_ref().is_some_and(|a| a.sub_step.is_some())
                    && matches!(st.state, StepState::AwaitingApproval | StepState::Waiting);
                let attempts = if tool_park {
                    st.attempts.saturating_sub(1)
                } else {
                    st.attempts
                };
                let step = if done.is_none() && st.state == StepState::AwaitingApproval {
                    proposals += 1;
                    Step::proposed(attempts)
                } else {
                    Step::new(done, attempts, st.state == StepState::Running)
                };
                StepRun {
                    step,
                    key: None,
                    prepared,
                }
            })
            .collect();
        let mut remaining = 0;
        let mut ready = Vec::new();
        for (i, a) in model.agents.iter().enumerate() {
            if !steps[i].step.is_done() {
                remaining += 1;
                let pending = a
                    .after
                    .iter()
                    .filter(|&&d| !steps[d].step.is_done())
                    .count();
                if steps[i].step.wait_for(pending) {
                    ready.push(i);
                }
            }
        }
        let deadline_len = r.deadline.or(model.deadline);
        let deadline = deadline_len.map(|d| {
            let elapsed = r.started_at.map(crate::clock::since).unwrap_or_default();
            Instant::now() + d.saturating_sub(elapsed)
        });
        // Job age across the server, so that quotas shared between graphs serve the oldest first:
        // when it was submitted (each graph's scheduler claims its jobs in batches of its own,
        // so the claim order would favour whichever graph claimed first), in microseconds, with
        // a counter's low bits apart jobs submitted in the same microsecond.
        let submitted = r
            .created_at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_micros() as u64);
        let seq = (submitted << 8) | (self.ctx.shared.next_seq.fetch_add(1, Relaxed) & 0xff);
        if !resumed {
            self.record(id, JobUpdate::Started);
        }
        self.ctx.stats.jobs_started.fetch_add(1, Relaxed);
        let ratio = self.ctx.shared.model.telemetry.sample_ratio;
        let traced = ratio >= 1.0 || self.rng.random::<f64>() < ratio;
        // Encoded in place: `to_string` goes through the formatting machinery, a cost per job.
        let id_str: Arc<str> = Arc::from(
            &*id.0
                .hyphenated()
                .encode_lower(&mut uuid::Uuid::encode_buffer()),
        );
        self.jobs.insert(
            id,
            Box::new(JobRun {
                id_str: id_str.clone(),
                key: r.idempotency_key.as_deref().map(Arc::from),
                seq,
                class: self.ctx.quotas.class_of(&r.tenant),
                input: r.input,
                steps,
                remaining,
                deadline,
                deadline_len: r.deadline.or(model.deadline),
                callback: r.callback_url.is_some(),
                started: Instant::now(),
                span: job_span(traced, &id_str, &model.name),
                traced,
                tenant: Arc::from(r.tenant.as_str()),
                proposals,
                budget: r.budget.map(|limit| {
                    Box::new(BudgetRun {
                        limit,
                        spent: r.usage,
                        reserved: Default::default(),
                        breach: None,
                    })
                }),
            }),
        );
        if remaining == 0 {
            self.finish(id, JobState::Succeeded, None);
            return;
        }
        // Its deadline passed while it waited (parked for a decision or a budget): it fails
        // here, before any call starts with no time left.
        if let Some(len) = deadline_len
            && deadline.is_some_and(|d| d <= Instant::now())
        {
            let message = format!(
                "deadline of {} exceeded before the job could go on",
                humantime::format_duration(len)
            );
            self.finish(id, JobState::Failed, Some(message));
            return;
        }
        for i in ready {
            self.slots[i].queue.push(Reverse((seq, id)));
            self.pump(i);
        }
        self.maybe_park(id);
    }

    /// Start queued steps of agent `i` while it has free slots: straight to its actor, or first
    /// to the quota broker when it draws on quotas.
    fn pump(&mut self, i: usize) {
        // While this node's leases are in doubt, another node may be taking its jobs over: a
        // call started now could be started there too.
        // Fenced, it stays so until a tick finds the leases renewed and forgets first what
        // another node took meanwhile.
        if self.fenced || self.ctx.shared.store.fenced() {
            self.fenced = true;
            return;
        }
        loop {
            let slot = &mut self.slots[i];
            if slot.held() || slot.in_flight + slot.awaiting >= slot.max || slot.actor.is_none() {
                return;
            }
            let Some(Reverse((_, job_id))) = slot.queue.pop() else {
                return;
            };
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            if !job.steps[i].step.is_queued() {
                continue;
            }
            // A tool-using agent's approvals are its tool calls'.
            let unapproved = self.ctx.model.agents[i].may_need_approval()
                && job.steps[i].prepared.is_none()
                && slot.tools.is_none();
            let budgeted = job.budget.is_some();
            // Only a step that may need a decision or has a budget looks the job up again.
            let job = if unapproved || budgeted {
                // A step that needs a person's decision is prepared instead, and waits for it.
                if unapproved && self.hold_for_approval(i, job_id) {
                    continue;
                }
                // A step its job's budget would not cover does not start.
                if budgeted && self.over_budget(i, job_id) {
                    continue;
                }
                match self.jobs.get_mut(&job_id) {
                    Some(job) => job,
                    None => continue,
                }
            } else {
                job
            };
            let slot = &mut self.slots[i];
            if slot.quotas.is_empty() {
                self.dispatch(i, job_id, None);
                continue;
            }
            let Some(broker) = &self.broker else {
                self.dispatch(i, job_id, None);
                continue;
            };
            let demand = match &slot.actor {
                // The running instance estimates (the loop starts nothing while it is down).
                Some(handle) if slot.counts_tokens => {
                    let input = step_input(&self.ctx, i, job);
                    let u = handle.agent.estimated_usage(&input);
                    Demand {
                        tokens: u.total_tokens(),
                        cost_micros: micros(u.cost_usd),
                    }
                }
                _ => Demand::default(),
            };
            let Some(token) = job.steps[i].step.await_quota() else {
                continue;
            };
            let granted = broker.acquire(Acquire {
                agent: (self.ctx.index, i),
                job: job_id,
                step: i,
                token,
                seq: job.seq,
                demand,
                class: job.class,
            });
            match granted {
                // It may start now: no round trip.
                Some(grant) => self.dispatch(i, job_id, Some(grant)),
                // It waits its turn at the broker, holding one of the agent's slots.
                None => self.slots[i].awaiting += 1,
            }
        }
    }

    fn on_granted(&mut self, job_id: JobId, i: usize, token: u32, grant: Grant) {
        let slot = &mut self.slots[i];
        slot.awaiting = slot.awaiting.saturating_sub(1);
        let current = self
            .jobs
            .get(&job_id)
            .is_some_and(|j| j.steps[i].step.awaits_grant(token));
        if current && slot.actor.is_some() && (self.fenced || self.ctx.shared.store.fenced()) {
            // Its turn came while the node's leases are in doubt: it waits in the queue, and
            // the grant (dropped here) goes back to the broker.
            self.fenced = true;
            if let Some(job) = self.jobs.get_mut(&job_id) {
                job.steps[i].step.back_to_queue();
                self.slots[i].queue.push(Reverse((job.seq, job_id)));
            }
            return;
        }
        if current && slot.actor.is_some() {
            self.dispatch(i, job_id, Some(grant));
        } else if current && let Some(job) = self.jobs.get_mut(&job_id) {
            // The actor is down: the step waits in the queue for the next one, and the grant
            // (dropped here) goes back to the broker.
            job.steps[i].step.back_to_queue();
            self.slots[i].queue.push(Reverse((job.seq, job_id)));
        }
        self.pump(i);
    }

    /// Start one step's call on agent `i`: polled once here, and handed to the agent's actor to
    /// run as a task only if it has to wait.
    fn dispatch(&mut self, i: usize, job_id: JobId, grant: Option<Grant>) {
        let model = &self.ctx.model;
        let agent = &model.agents[i];
        let slot = &mut self.slots[i];
        let Some(handle) = &slot.actor else {
            return;
        };
        let Some(job) = self.jobs.get_mut(&job_id) else {
            return;
        };
        let st = &mut job.steps[i];
        let Some((attempt, token)) = st.step.start() else {
            return;
        };
        let key = st
            .key
            .get_or_insert_with(|| step_key(&job.id_str, &agent.name))
            .clone();
        let prepared = st.prepared.clone();
        let input = step_input(&self.ctx, i, job);
        let timeout = match job.deadline {
            Some(d) => agent
                .timeout
                .min(d.saturating_duration_since(Instant::now())),
            None => agent.timeout,
        };
        let call = Call {
            job: job_id,
            step: i,
            token,
            incarnation: slot.incarnation,
            grant,
            ctx: CallContext {
                job_id: job.id_str.clone(),
                graph: model.name.clone(),
                agent: agent.name.clone(),
                attempt,
                idempotency_key: key,
                deadline: job.deadline,
                job_key: job.key.clone(),
            },
            tool_loop: slot.tools.as_ref().map(|t| {
                Box::new(super::tool_loop::LoopEnv {
                    shared: self.ctx.shared.clone(),
                    job: job_id,
                    step: i,
                    tenant: job.tenant.clone(),
                    graph: model.name.clone(),
                    agent: agent.name.clone(),
                    turn_quotas: t.turn.clone(),
                    tool_quotas: t.servers.clone(),
                    timeout,
                    parallel: agent.max_concurrency.get() as usize,
                    others_reserved: job.budget.as_ref().map_or_else(Usage::default, |b| {
                        let mut held = Usage::default();
                        for (s, u) in &b.reserved {
                            if *s != i {
                                held.add(u);
                            }
                        }
                        held
                    }),
                    scheduler: self.me.clone(),
                })
            }),
            input,
            prepared,
            traced: job.traced,
        };
        let call = agent_actor::start(handle.agent.clone(), call, &job.span, timeout);
        slot.in_flight += 1;
        self.ctx.stats.agents[i].calls.fetch_add(1, Relaxed);
        match agent_actor::poll_once(call) {
            // Its start is recorded with its result.
            Ok(CallEnd::Done(done)) => return self.finished.push_back((done, attempt)),
            Ok(CallEnd::Panicked(p)) => {
                // The actor fails with it, and its supervisor announces the next one; until
                // then this agent starts nothing more (the step is charged when it comes).
                let _ = handle.actor.cast(AgentMsg::Panicked(p));
                slot.actor = None;
            }
            Err(call) => {
                let waiting = Waiting {
                    call,
                    reply: self.me.clone(),
                };
                if handle.actor.cast(AgentMsg::Run(Box::new(waiting))).is_err() {
                    // The actor is gone, and the call (polled once: it may have reached its
                    // upstream) was dropped with the message, as if aborted with the actor. It
                    // counts as started; the next incarnation's announcement runs it again with
                    // the same key, as every call lost with an actor.
                    slot.actor = None;
                }
            }
        }
        self.record(job_id, JobUpdate::StepStarted { step: i, attempt });
    }

    /// Carry out calls that finished on their first poll, up to a turn's worth.
    fn carry_out_finished(&mut self) {
        for _ in 0..FINISHED_PER_TURN {
            let Some((done, attempt)) = self.finished.pop_front() else {
                return;
            };
            self.on_step_done(*done, Some(attempt));
        }
        if !self.finished.is_empty() {
            let _ = self.me.cast(SchedMsg::Continue);
        }
    }

    /// Pause changes from the broker.
    fn apply_pauses(&mut self, list: Vec<(usize, Option<Reach>)>) {
        let mut resumed = Vec::new();
        for (i, pause) in list {
            let slot = &mut self.slots[i];
            let was = slot.pause.is_some();
            slot.pause = pause;
            match (was, slot.pause.is_some()) {
                (false, true) => self.paused += 1,
                (true, false) => {
                    self.paused -= 1;
                    resumed.push(i);
                }
                _ => {}
            }
        }
        self.ctx.paused_agents.store(self.paused, Relaxed);
        for i in resumed {
            self.pump(i);
        }
        self.admit(true);
    }

    /// A call's end; `unrecorded`: the attempt whose start is to be recorded first.
    fn on_step_done(&mut self, mut d: StepDone, unrecorded: Option<u32>) {
        // Nothing an agent returns reaches a job record (and so the store, gRPC answers and
        // callbacks) with a secret value in use in it.
        let redactor = cascade_agents::secret::redactor();
        match &mut d.result {
            Ok(out) => {
                redactor.redact_json(&mut out.value);
            }
            Err(e) => {
                if let std::borrow::Cow::Owned(clean) = redactor.redact(&e.message) {
                    e.message = clean;
                }
            }
        }
        let slot = &mut self.slots[d.step];
        if d.incarnation == slot.incarnation {
            slot.in_flight = slot.in_flight.saturating_sub(1);
        }
        self.ctx.stats.agents[d.step]
            .call_micros
            .fetch_add(d.elapsed.as_micros() as u64, Relaxed);
        if let Some(park) = d.park.take() {
            // Not the step's end: it waits, and goes on from its journal.
            let current = self
                .jobs
                .get(&d.job)
                .is_some_and(|j| j.steps[d.step].step.is_running(d.token));
            if let Some(attempt) = unrecorded {
                self.record(
                    d.job,
                    JobUpdate::StepStarted {
                        step: d.step,
                        attempt,
                    },
                );
            }
            if current {
                self.on_parked(d.job, d.step, d.token, park);
            }
            self.pump(d.step);
            return;
        }
        let m = &self.slots[d.step].metrics;
        match &d.result {
            // A call that never left (the cluster's quota is spent) is no call.
            _ if d.deferred => {}
            Ok(_) => m.success.increment(1),
            Err(e) => match e.class {
                ErrorClass::Transient => m.transient.increment(1),
                ErrorClass::Permanent => m.permanent.increment(1),
                ErrorClass::Unauthorized => m.unauthorized.increment(1),
                ErrorClass::RateLimited => m.rate_limited.increment(1),
            },
        }
        if !d.deferred {
            m.step_duration.record(d.elapsed.as_secs_f64());
        }
        let current = self
            .jobs
            .get(&d.job)
            .is_some_and(|j| j.steps[d.step].step.is_running(d.token));
        if current && !d.deferred {
            self.audit_call(&d);
        }
        // A tool loop's turns were counted as they were journaled (`LoopSpent`).
        let looped = self.slots[d.step].tools.is_some();
        if let Some(b) = self.jobs.get_mut(&d.job).and_then(|j| j.budget.as_mut()) {
            let reserved = b
                .reserved
                .iter()
                .position(|(s, _)| *s == d.step)
                .map(|k| b.reserved.swap_remove(k).1);
            match &d.result {
                _ if looped => {}
                Ok(out) => b.spent.add(&out.usage),
                // A call that failed on the way (a timeout, a reply that broke its schema) may
                // have been billed: it counts at its estimate, which errs towards stopping. A
                // refusal or a definite 4xx spent nothing.
                Err(e) if e.class == ErrorClass::Transient => {
                    if let Some(u) = reserved {
                        b.spent.add(&u);
                    }
                }
                Err(_) => {}
            }
        }
        if let Some(grant) = d.grant.take() {
            // Every grant is settled, whether or not the result still matters: its reservation
            // must go back to the quota (with the real usage, which may become debt).
            let (limits, credential) = match &d.result {
                Ok(out) => (out.limits, None),
                Err(e) => (e.limits.as_deref().copied(), e.credential.clone()),
            };
            let cost_micros = d.result.as_ref().ok().map(|out| micros(out.usage.cost_usd));
            let (usage, outcome) = match &d.result {
                Ok(out) => (
                    Some((out.usage.prompt_tokens, out.usage.completion_tokens)),
                    Outcome::Answered,
                ),
                Err(_) if d.deferred => (None, Outcome::Abandoned),
                Err(e) => match e.class {
                    ErrorClass::RateLimited if self.ctx.shared.cascade => {
                        (None, Outcome::RateLimited(e.retry_after))
                    }
                    // Naive mode: the refusal teaches nothing; the retry policy handles it.
                    ErrorClass::RateLimited => (None, Outcome::Abandoned),
                    ErrorClass::Transient => (None, Outcome::Failed),
                    ErrorClass::Permanent | ErrorClass::Unauthorized => (None, Outcome::Answered),
                },
            };
            grant.settle(Settlement {
                usage,
                cost_micros,
                outcome,
                limits,
                credential,
            });
        }
        let start = |attempt| JobUpdate::StepStarted {
            step: d.step,
            attempt,
        };
        match d.result {
            Ok(out) if current => self.step_succeeded(d.job, d.step, out, unrecorded.map(start)),
            result => {
                if let Some(attempt) = unrecorded {
                    self.record(d.job, start(attempt));
                }
                if let (Err(e), true) = (result, current) {
                    self.step_failed(d.job, d.step, e, d.deferred);
                }
            }
        }
        self.pump(d.step);
    }

    /// An irreversible or approved call ended: its outcome goes to the audit log (what it did
    /// is in the job's record; the approval's record names the call).
    fn audit_call(&self, d: &StepDone) {
        let agent = &self.ctx.model.agents[d.step];
        let Some(job) = self.jobs.get(&d.job) else {
            return;
        };
        let approved = job.steps[d.step].prepared.is_some();
        if self.ctx.shared.audit.is_none() || !(agent.irreversible || approved) {
            return;
        }
        let (outcome, error) = match &d.result {
            Ok(_) => ("succeeded", None),
            Err(e) => (e.class.as_str(), Some(e.message.clone())),
        };
        self.ctx.shared.audit(
            &job.tenant,
            "call_executed",
            json!({
                "job_id": &*job.id_str,
                "graph": &*self.ctx.model.name,
                "agent": &*agent.name,
                "attempt": job.steps[d.step].step.attempts(),
                "approval_id": approved.then(|| crate::approval::approval_id(d.job, &agent.name)),
                "irreversible": agent.irreversible,
                "outcome": outcome,
                "error": error,
            }),
        );
    }

    /// Step `i` succeeded; `start`, its start's update when that is recorded with the result.
    fn step_succeeded(&mut self, id: JobId, i: usize, out: AgentOutput, start: Option<JobUpdate>) {
        let stats = &self.ctx.stats.agents[i];
        stats.succeeded.fetch_add(1, Relaxed);
        stats
            .prompt_tokens
            .fetch_add(out.usage.prompt_tokens, Relaxed);
        stats
            .completion_tokens
            .fetch_add(out.usage.completion_tokens, Relaxed);
        stats
            .cost_micros
            .fetch_add((out.usage.cost_usd * 1e6) as u64, Relaxed);
        let output = Arc::new(out.value);
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let attempt = job.steps[i].step.on_done(output.clone());
        job.remaining -= 1;
        let remaining = job.remaining;
        let seq = job.seq;
        let mut ready = Vec::new();
        for &d in &self.ctx.model.agents[i].dependents {
            if job.steps[d].step.dep_done() {
                ready.push(d);
            }
        }
        let succeeded = JobUpdate::StepSucceeded {
            step: i,
            attempt,
            output,
            usage: out.usage,
        };
        match start {
            Some(start) => self.record_two(id, start, succeeded),
            None => self.record(id, succeeded),
        }
        if remaining == 0 {
            self.finish(id, JobState::Succeeded, None);
            return;
        }
        for d in ready {
            self.slots[d].queue.push(Reverse((seq, id)));
            self.pump(d);
        }
        self.maybe_park(id);
    }

    /// `deferred`: the call never left (the cluster's shared quota is spent): no refusal.
    fn step_failed(&mut self, id: JobId, i: usize, e: AgentError, deferred: bool) {
        if e.class == ErrorClass::RateLimited && !deferred {
            self.ctx.stats.agents[i].rate_limited.fetch_add(1, Relaxed);
        }
        let unit = self.rng.random::<f64>();
        let rules = rules(&self.ctx, &self.slots[i], self.broker.is_some(), i);
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let decision = job.steps[i].step.on_failed(&e, rules, unit, Instant::now());
        self.carry_out(id, i, &e, decision);
    }

    /// Carries out the step's decision after a failure.
    fn carry_out(&mut self, id: JobId, i: usize, e: &AgentError, decision: Decision) {
        let agent = &self.ctx.model.agents[i];
        let stats = &self.ctx.stats.agents[i];
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let (delay, attempt) = match decision {
            Decision::Requeue { after: None } => {
                self.slots[i].queue.push(Reverse((job.seq, id)));
                return;
            }
            Decision::Requeue { after: Some(delay) } => (delay, job.steps[i].step.attempts()),
            Decision::Retry { delay, attempt } => {
                stats.retries.fetch_add(1, Relaxed);
                self.slots[i].metrics.retries.increment(1);
                (delay, attempt)
            }
            Decision::Fail { attempt } => {
                stats.failures.fetch_add(1, Relaxed);
                let message = failure_message(&agent.name, attempt, e);
                tracing::warn!(job_id = %id, agent = %agent.name, error = %e, "step failed");
                self.record(
                    id,
                    JobUpdate::StepFailed {
                        step: i,
                        attempt,
                        error: e.to_string(),
                    },
                );
                self.finish(id, JobState::Failed, Some(message));
                return;
            }
        };
        let token = job.steps[i]
            .step
            .backoff_token()
            .expect("a step told to wait is backing off");
        tracing::debug!(job_id = %id, agent = %agent.name, attempt, ?delay, error = %e, "step will be retried");
        self.record(
            id,
            JobUpdate::StepRetrying {
                step: i,
                attempt,
                delay,
                error: e.to_string(),
            },
        );
        ractor::time::send_after(delay, self.me.get_cell(), move || SchedMsg::RetryDue {
            job: id,
            step: i,
            token,
        });
    }

    fn on_agent_up(
        &mut self,
        i: usize,
        actor: Option<AgentHandle>,
        incarnation: u32,
        panic: Option<AgentPanic>,
    ) {
        let slot = &mut self.slots[i];
        slot.actor = actor;
        slot.incarnation = incarnation;
        // Calls of the previous incarnation were aborted with it.
        slot.in_flight = 0;
        let now = Instant::now();
        let mut decisions = Vec::new();
        let rules = rules(&self.ctx, slot, self.broker.is_some(), i);
        for (id, job) in self.jobs.iter_mut() {
            let st = &mut job.steps[i].step;
            let Some(token) = st.running() else {
                continue;
            };
            // The call that panicked is charged with a transient failure; the others were
            // collateral and run again with the same key. Their grants went back to the broker
            // when their aborted tasks dropped them.
            let charged = panic
                .as_ref()
                .filter(|p| p.job == *id && p.token == token)
                .map(|p| AgentError::transient(format!("agent panicked: {}", p.message)));
            match (
                st.on_agent_lost(charged.as_ref(), rules, self.rng.random(), now),
                charged,
            ) {
                (Some(Decision::Requeue { after: None }), _) => {
                    slot.queue.push(Reverse((job.seq, *id)));
                }
                (Some(d), Some(e)) => decisions.push((*id, e, d)),
                _ => {}
            }
        }
        for (id, e, d) in decisions {
            self.carry_out(id, i, &e, d);
        }
        self.pump(i);
    }

    fn finish(&mut self, id: JobId, state: JobState, error: Option<String>) {
        self.finish_after(id, state, error, Vec::new());
    }

    /// End job `id`, writing the changes `before` with its end (in one store write).
    fn finish_after(
        &mut self,
        id: JobId,
        state: JobState,
        error: Option<String>,
        before: Vec<JobUpdate>,
    ) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        let output = (state == JobState::Succeeded).then(|| {
            let mut map = serde_json::Map::new();
            for a in self.ctx.model.sinks() {
                if let Some(out) = job.steps[a.index].step.output() {
                    map.insert(a.name.to_string(), (**out).clone());
                }
            }
            Arc::new(Value::Object(map))
        });
        let counter = match state {
            JobState::Succeeded => &self.ctx.stats.jobs_succeeded,
            JobState::Cancelled => &self.ctx.stats.jobs_cancelled,
            _ => &self.ctx.stats.jobs_failed,
        };
        counter.fetch_add(1, Relaxed);
        if job.traced && crate::telemetry::exporting() {
            job.span
                .record("outcome", tracing::field::display(state.as_str()));
            if state == JobState::Failed {
                // An exported trace shows the failed job as an error.
                job.span
                    .record("otel.status_code", tracing::field::display("error"));
            }
        }
        let run_time = job.started.elapsed().as_secs_f64();
        match state {
            JobState::Succeeded => {
                self.metrics.succeeded.increment(1);
                self.metrics.duration_succeeded.record(run_time);
            }
            JobState::Cancelled => self.metrics.cancelled.increment(1),
            _ => {
                self.metrics.failed.increment(1);
                self.metrics.duration_failed.record(run_time);
            }
        }
        let finished = JobUpdate::Finished {
            state,
            output,
            error,
        };
        if before.is_empty() {
            self.record(id, finished);
        } else {
            let mut updates = before;
            updates.push(finished);
            self.record_all(id, updates);
        }
        self.ctx.shared.job_finished(id);
        if job.callback {
            self.ctx.shared.callback(id);
        }
        self.admit(false);
    }

    /// Whether step `i` of job `id` (queued) needs a person's decision; if so, its call is
    /// prepared and stored with its hash, and the step waits (holding no slot and no quota)
    /// while the rest of the job goes on; the job is parked once nothing else of it can.
    /// Returns whether the step was held (or failed, if its call could not be prepared).
    fn hold_for_approval(&mut self, i: usize, id: JobId) -> bool {
        let ctx = self.ctx.clone();
        let agent = &ctx.model.agents[i];
        let Some(handle) = self.slots[i].actor.clone() else {
            return false;
        };
        let Some(job) = self.jobs.get_mut(&id) else {
            return false;
        };
        let key = job.steps[i]
            .key
            .get_or_insert_with(|| step_key(&job.id_str, &agent.name))
            .clone();
        let call = CallContext {
            job_id: job.id_str.clone(),
            graph: ctx.model.name.clone(),
            agent: agent.name.clone(),
            attempt: job.steps[i].step.attempts() + 1,
            idempotency_key: key,
            deadline: job.deadline,
            job_key: job.key.clone(),
        };
        let input = step_input(&ctx, i, job);
        let needed = match agent.approval {
            Setting::Never => false,
            Setting::Required => true,
            Setting::Auto => match &agent.approval_when {
                Some(when) => when.holds(&input.view(&call)).unwrap_or_else(|e| {
                    // Unsure is not "no": a person decides.
                    tracing::warn!(job_id = %id, agent = %agent.name, error = %e, when = when.source(), "approval_when could not be evaluated; the call waits for approval");
                    true
                }),
                None => agent.irreversible || (agent.asks_agent && handle.agent.irreversible()),
            },
        };
        if !needed {
            return false;
        }
        let redactor = cascade_agents::secret::redactor();
        let proposal = match handle.agent.prepare(&call, &input) {
            Ok(mut v) => {
                // Credentials are added when it runs; a secret value that reached the call
                // some other way is not shown to approvers, nor stored.
                redactor.redact_json(&mut v);
                v
            }
            Err(e) => {
                // A call that cannot be prepared could not run either.
                let error = redactor.redact(&e.message).into_owned();
                let attempt = job.steps[i].step.attempts();
                tracing::warn!(job_id = %id, agent = %agent.name, %error, "the call could not be prepared for approval");
                let failed = JobUpdate::StepFailed {
                    step: i,
                    attempt,
                    error: error.clone(),
                };
                let message = format!(
                    "agent {:?}'s call could not be prepared for approval: {error}",
                    agent.name
                );
                self.finish_after(id, JobState::Failed, Some(message), vec![failed]);
                return true;
            }
        };
        let approval = new_approval(
            crate::approval::approval_id(id, &agent.name),
            &proposal,
            agent.approval_timeout,
            job.deadline,
            None,
        );
        job.steps[i].step.propose();
        job.proposals += 1;
        self.announce_proposal(id, i, approval);
        true
    }

    /// Announce step `i`'s new proposal (the step waits for it already): log, audit, webhook,
    /// record, and park the job if nothing else of it goes on.
    fn announce_proposal(&mut self, id: JobId, i: usize, approval: Approval) {
        let ctx = self.ctx.clone();
        let agent = &ctx.model.agents[i];
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let tenant = job.tenant.clone();
        tracing::info!(job_id = %id, agent = %agent.name, approval_id = %approval.id, sha256 = %approval.sha256, "call prepared; it waits for approval");
        self.ctx.shared.audit(
            &tenant,
            "approval_proposed",
            json!({
                "approval_id": approval.id,
                "job_id": id.to_string(),
                "graph": &*ctx.model.name,
                "agent": &*agent.name,
                "proposal_sha256": approval.sha256,
                "proposal": &*approval.proposal,
                "expires_at_unix_ms": approval.expires_at.map(unix_ms),
            }),
        );
        if let Some(url) = &agent.approval_webhook {
            self.ctx.shared.notify_approval(ApprovalNotice {
                url: url.clone(),
                approval: ApprovalView {
                    job_id: id,
                    graph: ctx.model.name.clone(),
                    agent: agent.name.clone(),
                    step: i,
                    tenant: tenant.to_string(),
                    job_state: JobState::Running,
                    approval: approval.clone(),
                },
            });
        }
        self.record(
            id,
            JobUpdate::Proposed {
                step: i,
                approval: Box::new(approval),
            },
        );
        self.metrics.approvals_pending.increment(1.0);
        self.maybe_park(id);
    }

    /// A tool loop stopped to wait: for a decision on one of its tool calls, or for its job's
    /// budget to be raised. The step holds nothing meanwhile, and the run is not an attempt.
    fn on_parked(&mut self, id: JobId, i: usize, token: u32, park: Park) {
        let ctx = self.ctx.clone();
        let agent = &ctx.model.agents[i];
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        if let Some(b) = job.budget.as_mut() {
            b.reserved.retain(|(s, _)| *s != i);
        }
        match park {
            Park::Approval { n, proposal } => {
                if !job.steps[i].step.suspend(token, true) {
                    return;
                }
                let approval = new_approval(
                    crate::approval::sub_step_approval_id(id, &agent.name, n),
                    &proposal,
                    agent.approval_timeout,
                    job.deadline,
                    Some(n),
                );
                job.proposals += 1;
                self.announce_proposal(id, i, approval);
            }
            Park::Budget(breach) => {
                if !job.steps[i].step.suspend(token, false) {
                    return;
                }
                self.note_breach(id, i, breach);
            }
        }
    }

    /// Park job `id` if it waits for a decision and nothing else of it is under way: it leaves
    /// the run (its place goes to the next pending job) and waits in the store.
    fn maybe_park(&mut self, id: JobId) {
        let Some(job) = self.jobs.get(&id) else {
            return;
        };
        let breach = job.budget.as_ref().and_then(|b| b.breach.clone());
        if (job.proposals == 0 && breach.is_none()) || job.steps.iter().any(|s| s.step.is_active())
        {
            return;
        }
        match breach {
            Some((agent, message)) => self.record(id, JobUpdate::BudgetExceeded { agent, message }),
            None => self.record(id, JobUpdate::Parked),
        }
        self.jobs.remove(&id);
        // Whoever waits for the job to settle (a one-shot run) learns it is parked; those
        // waiting for its end wait on.
        self.ctx.shared.job_finished(id);
        // Its place goes to the next pending job, once this message is done (a job parked as it
        // is admitted would otherwise admit the next from inside the admission, and so on).
        if !self.parked_since_admit {
            self.parked_since_admit = true;
            let _ = self.me.cast(SchedMsg::Continue);
        }
    }

    /// Whether step `i` of job `id` (queued) would pass the job's budget, with what its steps
    /// spent and its calls under way may spend: then it is held, the breach is counted and
    /// audited, and the job stops once nothing else of it runs. Otherwise its estimate is
    /// reserved until its call ends.
    fn over_budget(&mut self, i: usize, id: JobId) -> bool {
        let ctx = self.ctx.clone();
        let Some(handle) = self.slots[i].actor.clone() else {
            return false;
        };
        let Some(job) = self.jobs.get_mut(&id) else {
            return false;
        };
        let input = step_input(&ctx, i, job);
        let next = handle.agent.estimated_usage(&input);
        let Some(b) = job.budget.as_mut() else {
            return false;
        };
        b.reserved.retain(|(s, _)| *s != i);
        let mut committed = b.spent;
        for (_, u) in &b.reserved {
            committed.add(u);
        }
        let Some(breach) = b.limit.breach(&committed, &next) else {
            b.reserved.push((i, next));
            return false;
        };
        job.steps[i].step.hold();
        self.note_breach(id, i, breach);
        true
    }

    /// Step `i` of job `id` is held by the job's budget: the first breach is counted, audited
    /// and kept, and the job stops once nothing else of it runs.
    fn note_breach(&mut self, id: JobId, i: usize, breach: crate::job::Breach) {
        let ctx = self.ctx.clone();
        let agent = &ctx.model.agents[i];
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let Some(b) = job.budget.as_mut() else {
            return;
        };
        if b.breach.is_none() {
            let message = breach.message(&agent.name);
            tracing::warn!(job_id = %id, agent = %agent.name, budget = breach.budget, "{message}");
            self.metrics.budget_breaches[usize::from(breach.budget == "max_cost_usd")].increment(1);
            let tenant = job.tenant.clone();
            self.ctx.shared.audit(
                &tenant,
                "budget_exceeded",
                json!({
                    "job_id": id.to_string(),
                    "graph": &*ctx.model.name,
                    "agent": &*agent.name,
                    "budget": breach.budget,
                    "limit": breach.limit,
                    "spent": breach.spent,
                    "next": breach.next,
                }),
            );
            if let Some(b) = self.jobs.get_mut(&id).and_then(|j| j.budget.as_mut()) {
                b.breach = Some((agent.name.clone(), message));
            }
        }
        self.maybe_park(id);
    }

    /// Job `id`'s budget is now `budget`: recorded (a job stopped by its budget is pending
    /// again, and claimed like any), and for a job in the run, its held steps go on.
    fn raise_budget(&mut self, id: JobId, budget: Budget) -> Result<(), crate::store::StoreError> {
        // What it spent so far, for a job in the run that had no budget until now.
        let spent = self
            .ctx
            .shared
            .store
            .get(id)?
            .map(|r| r.usage)
            .unwrap_or_default();
        self.record(id, JobUpdate::BudgetRaised { budget });
        let Some(job) = self.jobs.get_mut(&id) else {
            self.admit(true);
            return Ok(());
        };
        match job.budget.as_mut() {
            Some(b) => {
                b.limit = budget;
                b.breach = None;
            }
            None => {
                job.budget = Some(Box::new(BudgetRun {
                    limit: budget,
                    spent,
                    reserved: Default::default(),
                    breach: None,
                }))
            }
        }
        let seq = job.seq;
        let held: Vec<usize> = job
            .steps
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| s.step.release().then_some(i))
            .collect();
        for i in held {
            self.slots[i].queue.push(Reverse((seq, id)));
            self.pump(i);
        }
        Ok(())
    }

    /// A decision on step `i`'s proposal of job `id`, whose approver saw hash `sha256`.
    fn decide(
        &mut self,
        id: JobId,
        i: usize,
        sha256: &str,
        decision: ApprovalDecision,
    ) -> Result<Resolved, ApprovalError> {
        let store = self.ctx.shared.store.clone();
        let agent = self.ctx.model.agents[i].name.clone();
        // The step's approval and attempts as recorded.
        let current = || -> Result<(ApprovalView, u32), ApprovalError> {
            store
                .get(id)?
                .as_ref()
                .and_then(|r| {
                    let view = ApprovalView::of(r).find(|v| v.step == i)?;
                    Some((view, r.steps[i].attempts))
                })
                .ok_or_else(|| ApprovalError::NotFound(crate::approval::approval_id(id, &agent)))
        };
        let (view, attempts) = current()?;
        let a = &view.approval;
        if let Some(first) = &a.decision {
            // The same decision again is answered from the record; an expiry counts as a
            // rejection.
            let approved = |o: ApprovalOutcome| o == ApprovalOutcome::Approved;
            if approved(first.outcome) == approved(decision.outcome) {
                return Ok(Resolved {
                    approval: view,
                    repeated: true,
                });
            }
            return Err(ApprovalError::Conflict {
                id: a.id.clone(),
                first: first.clone(),
            });
        }
        if view.job_state.is_terminal() {
            return Err(ApprovalError::JobEnded {
                id: a.id.clone(),
                job: id,
                state: view.job_state,
            });
        }
        if a.sha256 != sha256 {
            return Err(ApprovalError::Stale {
                id: a.id.clone(),
                current: a.sha256.clone(),
                given: sha256.to_string(),
            });
        }
        let waited = decision
            .at
            .duration_since(a.created_at)
            .unwrap_or_default()
            .as_secs_f64();
        tracing::info!(job_id = %id, agent = %agent, approval_id = %a.id, outcome = %decision.outcome, approver = %decision.approver, "proposal decided");
        self.ctx.shared.audit(
            &view.tenant,
            "approval_decided",
            json!({
                "approval_id": a.id,
                "job_id": id.to_string(),
                "graph": &*self.ctx.model.name,
                "agent": &*agent,
                "proposal_sha256": a.sha256,
                "outcome": decision.outcome,
                "approver": decision.approver,
                "reason": decision.reason,
            }),
        );
        self.metrics
            .approval_decided(&self.ctx.model.name, decision.outcome.as_str(), waited);
        let proposal = a.proposal.clone();
        let outcome = decision.outcome;
        if a.sub_step.is_some() {
            // A tool call of a tool-using step: approved, the loop makes it; rejected, the model
            // reads why as its result. Either way the step goes on from its journal.
            self.record(id, JobUpdate::Decided { step: i, decision });
            match self.jobs.get_mut(&id) {
                Some(job) => {
                    if job.steps[i].step.approve() {
                        job.proposals = job.proposals.saturating_sub(1);
                        self.slots[i].queue.push(Reverse((job.seq, id)));
                        self.pump(i);
                    }
                }
                // Parked, and pending again if nothing else waits for a decision.
                None => self.admit(true),
            }
            return Ok(Resolved {
                approval: current()?.0,
                repeated: false,
            });
        }
        let message = match outcome {
            ApprovalOutcome::Approved => String::new(),
            ApprovalOutcome::Rejected => format!(
                "{agent}'s call was rejected by {}: {}",
                decision.approver, decision.reason
            ),
            ApprovalOutcome::Expired => {
                format!("{agent}'s call was not approved: {}", decision.reason)
            }
        };
        let decided = JobUpdate::Decided { step: i, decision };
        // A rejection's decision, its step's failure and its job's end reach the store together:
        // a restart never finds a decided rejection with the job still waiting.
        let failed = |attempt| JobUpdate::StepFailed {
            step: i,
            attempt,
            error: message.clone(),
        };
        if outcome == ApprovalOutcome::Approved {
            self.record(id, decided.clone());
        }
        match (self.jobs.get_mut(&id), outcome) {
            (Some(job), ApprovalOutcome::Approved) => {
                let prepared = serde_json::from_str::<Value>(&proposal).map_err(|e| {
                    ApprovalError::InvalidRequest(format!("the stored proposal is not JSON: {e}"))
                })?;
                job.steps[i].prepared = Some(Arc::new(prepared));
                if job.steps[i].step.approve() {
                    job.proposals = job.proposals.saturating_sub(1);
                    self.slots[i].queue.push(Reverse((job.seq, id)));
                    self.pump(i);
                }
            }
            (Some(job), _) => {
                let before = vec![decided, failed(job.steps[i].step.attempts())];
                self.finish_after(id, JobState::Failed, Some(message.clone()), before);
            }
            // Parked, and pending again if nothing else waits for a decision (the store has
            // queued it): it is claimed like any pending job, ahead of newer ones.
            (None, ApprovalOutcome::Approved) => self.admit(true),
            (None, _) => {
                let before = vec![decided, failed(attempts)];
                self.end_parked(id, JobState::Failed, before, message.clone());
            }
        }
        Ok(Resolved {
            approval: current()?.0,
            repeated: false,
        })
    }

    /// End a parked job (the store's alone while it waits): cancelled, or failed by a rejection,
    /// whose changes `before` are written with its end. Returns whether it was parked.
    fn end_parked(
        &mut self,
        id: JobId,
        state: JobState,
        before: Vec<JobUpdate>,
        message: String,
    ) -> bool {
        let store = self.ctx.shared.store.clone();
        let Ok(Some(record)) = store.get(id) else {
            return false;
        };
        if !record.state.is_parked() || *record.graph != *self.ctx.model.name {
            return false;
        }
        match state {
            JobState::Cancelled => {
                self.ctx.stats.jobs_cancelled.fetch_add(1, Relaxed);
                self.metrics.cancelled.increment(1);
            }
            _ => {
                self.ctx.stats.jobs_failed.fetch_add(1, Relaxed);
                self.metrics.failed.increment(1);
            }
        }
        let mut updates = before;
        updates.push(JobUpdate::Finished {
            state,
            output: None,
            error: Some(message),
        });
        self.record_all(id, updates);
        self.ctx.shared.job_finished(id);
        if record.callback_url.is_some() {
            self.ctx.shared.callback(id);
        }
        true
    }

    /// Cancel job `id` if it is pending in the store. Returns whether it was.
    fn cancel_pending(&mut self, id: JobId, reason: &str) -> bool {
        match self.ctx.shared.store.cancel_pending(id, reason) {
            Ok(Some(event)) => {
                self.ctx.shared.publish(event);
                self.ctx.shared.job_finished(id);
                true
            }
            Ok(None) => false,
            Err(e) => {
                tracing::error!(job_id = %id, error = %e, "could not cancel a pending job");
                false
            }
        }
    }

    /// Reject the proposals nobody decided in time (about once a second), and keep the gauge of
    /// proposals waiting in step with the store (parked jobs' proposals included).
    fn check_approvals(&mut self) {
        let now = Instant::now();
        if self
            .approvals_checked
            .is_some_and(|at| now.duration_since(at) < Duration::from_secs(1))
        {
            return;
        }
        self.approvals_checked = Some(now);
        let store = self.ctx.shared.store.clone();
        let graph = self.ctx.model.name.clone();
        let wall = crate::clock::now();
        for id in store.expired_approvals(&graph, wall) {
            let Ok(Some(record)) = store.get(id) else {
                continue;
            };
            let expired: Vec<(usize, String, String)> = ApprovalView::of(&record)
                .filter(|v| {
                    v.approval.is_pending() && v.approval.expires_at.is_some_and(|at| at <= wall)
                })
                .map(|v| {
                    let waited = wall
                        .duration_since(v.approval.created_at)
                        .unwrap_or_default();
                    (
                        v.step,
                        v.approval.sha256,
                        format!(
                            "nobody decided in time ({} after the proposal; approval_timeout or the job's deadline)",
                            humantime::format_duration(Duration::from_secs(waited.as_secs()))
                        ),
                    )
                })
                .collect();
            for (i, sha, reason) in expired {
                let decision = ApprovalDecision {
                    outcome: ApprovalOutcome::Expired,
                    approver: "timeout".into(),
                    reason,
                    at: wall,
                };
                if let Err(e) = self.decide(id, i, &sha, decision) {
                    tracing::warn!(job_id = %id, error = %e, "could not expire an approval");
                }
            }
        }
        self.metrics
            .approvals_pending
            .set(store.pending_approval_count(&graph) as f64);
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        let expired: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let limit = self
                .jobs
                .get(&id)
                .and_then(|j| j.deadline_len)
                .map(humantime::format_duration);
            let msg = match limit {
                Some(l) => format!("deadline of {l} exceeded"),
                None => "deadline exceeded".to_string(),
            };
            self.finish(id, JobState::Failed, Some(msg));
        }
    }

    fn snapshot(&self) -> SchedulerSnapshot {
        SchedulerSnapshot {
            jobs_in_flight: self.jobs.len(),
            agents: self
                .slots
                .iter()
                .zip(self.ctx.names.iter())
                .map(|(s, n)| AgentSlotSnapshot {
                    name: n.to_string(),
                    up: s.actor.is_some(),
                    in_flight: s.in_flight,
                    awaiting_quota: s.awaiting,
                    queued: s.queue.len(),
                    paused: s.pause,
                })
                .collect(),
        }
    }
}

/// What agent `i`'s failure decisions depend on.
/// A new proposal of `proposal`, which expires after `timeout` or at the job's deadline
/// (nobody can approve it usefully past that either).
fn new_approval(
    id: String,
    proposal: &Value,
    timeout: Option<Duration>,
    deadline: Option<Instant>,
    sub_step: Option<u32>,
) -> Approval {
    let text = crate::approval::canonical(proposal);
    let now = crate::clock::now();
    Approval {
        id,
        sha256: crate::audit::sha256_hex(text.as_bytes()),
        proposal: text.into(),
        created_at: now,
        expires_at: [
            timeout.map(|t| now + t),
            deadline.map(|d| now + d.saturating_duration_since(Instant::now())),
        ]
        .into_iter()
        .flatten()
        .min(),
        decision: None,
        sub_step,
    }
}

fn rules<'a>(ctx: &'a GraphCtx, slot: &Slot, broker: bool, i: usize) -> Rules<'a> {
    Rules {
        retry: &ctx.model.agents[i].retry,
        through_quota: !slot.quotas.is_empty() && broker,
        naive: !ctx.shared.cascade,
    }
}

/// A step's idempotency key, `<job>/<agent>`, built without the formatting machinery (once per
/// step).
fn step_key(job: &str, agent: &str) -> Arc<str> {
    let mut key = String::with_capacity(job.len() + 1 + agent.len());
    key.push_str(job);
    key.push('/');
    key.push_str(agent);
    key.into()
}

/// The input of step `i` of `job`: the job input and its dependencies' outputs, shared.
fn step_input(ctx: &GraphCtx, i: usize, job: &JobRun) -> StepInput {
    let deps = ctx.model.agents[i]
        .after
        .iter()
        .map(|&d| {
            let out = job.steps[d]
                .step
                .output()
                .cloned()
                .expect("dependencies of a queued step have succeeded");
            (ctx.names[d].clone(), out)
        })
        .collect();
    StepInput {
        input: job.input.clone(),
        deps,
    }
}

/// Milliseconds since the Unix epoch (times in audit records).
fn unix_ms(t: std::time::SystemTime) -> u64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Dollars in micro-dollars (what cost windows count).
fn micros(usd: f64) -> u64 {
    if usd.is_finite() && usd > 0.0 {
        (usd * 1e6).round() as u64
    } else {
        0
    }
}
