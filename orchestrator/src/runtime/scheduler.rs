//! The scheduler of one graph: it admits jobs from the store up to `max_in_flight_jobs`, starts
//! each step when its dependencies have succeeded and its agent has a free slot, retries failed
//! attempts with backoff, and finishes jobs. It is the only owner of in-flight job state, so none
//! of this needs a lock; everything it learns goes to the store before it is announced.
//!
//! Work never queues in a mailbox: jobs wait in the store, ready steps wait in per-agent priority
//! queues here (oldest job first), and an agent actor is sent at most `max_concurrency` calls.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::time::{Duration, SystemTime};

use cascade_agents::{AgentError, AgentOutput, CallContext, ErrorClass, StepInput};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use serde::Serialize;
use serde_json::Value;
use tokio::time::Instant;

use super::GraphCtx;
use super::agent_actor::{AgentMsg, AgentPanic, Call, StepDone};
use crate::backoff;
use crate::job::{JobId, JobRecord, JobState, JobUpdate, StepState};

/// How long a rate-limited call waits when the upstream gave no Retry-After.
const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(1);

pub(crate) enum SchedMsg {
    /// Jobs are waiting in the store.
    Wake,
    StepDone(Box<StepDone>),
    RetryDue {
        job: JobId,
        step: usize,
        token: u32,
    },
    /// An agent actor was (re)started, or given up on (`actor: None`). Steps that were running
    /// on its previous incarnation are dispatched again; `panic` names the step whose call
    /// killed it, which is charged an attempt.
    AgentUp {
        agent: usize,
        actor: Option<ActorRef<AgentMsg>>,
        incarnation: u32,
        panic: Option<AgentPanic>,
    },
    Cancel {
        job: JobId,
        reason: String,
        reply: RpcReplyPort<bool>,
    },
    /// Admit no more jobs (shutdown).
    Drain,
    /// Check deadlines.
    Tick,
    Snapshot(RpcReplyPort<SchedulerSnapshot>),
}

/// What the scheduler holds right now, for tests, shutdown and the API.
#[derive(Clone, Debug, Serialize)]
pub struct SchedulerSnapshot {
    pub jobs_in_flight: usize,
    pub agents: Vec<AgentSlotSnapshot>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AgentSlotSnapshot {
    pub name: String,
    pub up: bool,
    pub in_flight: u32,
    pub queued: usize,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Waiting,
    Queued,
    Running,
    Backoff,
    Done,
    Failed,
}

struct StepRun {
    phase: Phase,
    /// Attempts started, including the running one.
    attempts: u32,
    pending_deps: usize,
    output: Option<Arc<Value>>,
    /// Bumped at every dispatch and retry timer, so late results and timers are recognised.
    token: u32,
    key: Option<Arc<str>>,
}

struct JobRun {
    id_str: Arc<str>,
    /// Admission order: lower is older, and goes first.
    seq: u64,
    input: Arc<Value>,
    steps: Vec<StepRun>,
    remaining: usize,
    deadline: Option<Instant>,
}

struct Slot {
    actor: Option<ActorRef<AgentMsg>>,
    incarnation: u32,
    in_flight: u32,
    max: u32,
    queue: BinaryHeap<Reverse<(u64, JobId)>>,
}

pub(crate) struct Scheduler;

pub(crate) struct SchedState {
    ctx: Arc<GraphCtx>,
    me: ActorRef<SchedMsg>,
    jobs: HashMap<JobId, JobRun>,
    slots: Vec<Slot>,
    next_seq: u64,
    rng: SmallRng,
    draining: bool,
    /// Claim pending jobs in batches of at least this many free places (fewer store round trips).
    admit_batch: usize,
}

impl Actor for Scheduler {
    type Msg = SchedMsg;
    type State = SchedState;
    type Arguments = Arc<GraphCtx>;

    async fn pre_start(
        &self,
        me: ActorRef<SchedMsg>,
        ctx: Arc<GraphCtx>,
    ) -> Result<SchedState, ActorProcessingErr> {
        let slots = ctx
            .model
            .agents
            .iter()
            .map(|a| Slot {
                actor: None,
                incarnation: 0,
                in_flight: 0,
                max: a.max_concurrency.get(),
                queue: BinaryHeap::new(),
            })
            .collect();
        let admit_batch = (ctx.model.max_in_flight_jobs.get() / 8).clamp(1, 32);
        Ok(SchedState {
            ctx,
            me,
            jobs: HashMap::new(),
            slots,
            next_seq: 0,
            rng: SmallRng::seed_from_u64(0x5eed),
            draining: false,
            admit_batch,
        })
    }

    async fn post_start(
        &self,
        me: ActorRef<SchedMsg>,
        s: &mut SchedState,
    ) -> Result<(), ActorProcessingErr> {
        // Jobs left running by a previous scheduler (or process) resume first, oldest first.
        let running = s.ctx.shared.store.running(&s.ctx.model.name)?;
        if !running.is_empty() {
            tracing::info!(graph = %s.ctx.model.name, jobs = running.len(), "resuming jobs left running");
        }
        for r in running {
            s.start_job(r, true);
        }
        s.admit(true);
        if let Some(deadline) = s.ctx.model.deadline {
            let period = (deadline / 10).clamp(Duration::from_millis(10), Duration::from_secs(1));
            ractor::time::send_interval(period, me.get_cell(), || SchedMsg::Tick);
        }
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
                s.admit(true);
            }
            SchedMsg::StepDone(done) => s.on_step_done(*done),
            SchedMsg::RetryDue { job, step, token } => {
                if let Some(j) = s.jobs.get_mut(&job) {
                    let st = &mut j.steps[step];
                    if st.phase == Phase::Backoff && st.token == token {
                        st.phase = Phase::Queued;
                        s.slots[step].queue.push(Reverse((j.seq, job)));
                        s.pump(step);
                    }
                }
            }
            SchedMsg::AgentUp {
                agent,
                actor,
                incarnation,
                panic,
            } => s.on_agent_up(agent, actor, incarnation, panic),
            SchedMsg::Cancel { job, reason, reply } => {
                let found = s.jobs.contains_key(&job);
                if found {
                    s.finish(
                        job,
                        JobState::Cancelled,
                        Some(format!("cancelled: {reason}")),
                    );
                }
                let _ = reply.send(found);
            }
            SchedMsg::Drain => s.draining = true,
            SchedMsg::Tick => s.check_deadlines(),
            SchedMsg::Snapshot(reply) => {
                let _ = reply.send(s.snapshot());
            }
        }
        Ok(())
    }
}

impl SchedState {
    fn record(&self, job: JobId, update: JobUpdate) {
        match self.ctx.shared.store.update(job, update) {
            Ok(Some(event)) => self.ctx.shared.publish(event),
            Ok(None) => {}
            Err(e) => tracing::error!(job_id = %job, error = %e, "could not record job update"),
        }
    }

    /// Claim pending jobs while there is room. With `eager`, claim even a single free place.
    fn admit(&mut self, eager: bool) {
        if self.draining {
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

    fn start_job(&mut self, r: JobRecord, resumed: bool) {
        let model = &self.ctx.model;
        let id = r.id;
        let mut steps: Vec<StepRun> = r
            .steps
            .iter()
            .map(|st| {
                let done = st.state == StepState::Succeeded && st.output.is_some();
                StepRun {
                    phase: if done { Phase::Done } else { Phase::Waiting },
                    // An interrupted attempt was not a failure: it does not count.
                    attempts: if st.state == StepState::Running {
                        st.attempts.saturating_sub(1)
                    } else {
                        st.attempts
                    },
                    pending_deps: 0,
                    output: if done { st.output.clone() } else { None },
                    token: 0,
                    key: None,
                }
            })
            .collect();
        let mut remaining = 0;
        for (i, a) in model.agents.iter().enumerate() {
            if steps[i].phase != Phase::Done {
                remaining += 1;
                steps[i].pending_deps = a
                    .after
                    .iter()
                    .filter(|&&d| steps[d].phase != Phase::Done)
                    .count();
            }
        }
        let deadline = model.deadline.map(|d| {
            let elapsed = r
                .started_at
                .and_then(|t| SystemTime::now().duration_since(t).ok())
                .unwrap_or_default();
            Instant::now() + d.saturating_sub(elapsed)
        });
        let seq = self.next_seq;
        self.next_seq += 1;
        if !resumed {
            self.record(id, JobUpdate::Started);
        }
        self.ctx.stats.jobs_started.fetch_add(1, Relaxed);
        self.jobs.insert(
            id,
            JobRun {
                id_str: id.to_string().into(),
                seq,
                input: r.input,
                steps,
                remaining,
                deadline,
            },
        );
        if remaining == 0 {
            self.finish(id, JobState::Succeeded, None);
            return;
        }
        for i in 0..model.agents.len() {
            let job = self.jobs.get_mut(&id).expect("just inserted");
            let st = &mut job.steps[i];
            if st.phase == Phase::Waiting && st.pending_deps == 0 {
                st.phase = Phase::Queued;
                self.slots[i].queue.push(Reverse((seq, id)));
                self.pump(i);
            }
        }
    }

    /// Send queued steps of agent `i` to its actor while it has free slots.
    fn pump(&mut self, i: usize) {
        let model = &self.ctx.model;
        let agent = &model.agents[i];
        let slot = &mut self.slots[i];
        while slot.in_flight < slot.max {
            let Some(actor) = slot.actor.clone() else {
                return;
            };
            let Some(Reverse((seq, job_id))) = slot.queue.pop() else {
                return;
            };
            let Some(job) = self.jobs.get_mut(&job_id) else {
                continue;
            };
            if job.steps[i].phase != Phase::Queued {
                continue;
            }
            let deps = agent
                .after
                .iter()
                .map(|&d| {
                    let out = job.steps[d]
                        .output
                        .clone()
                        .expect("dependencies of a queued step have succeeded");
                    (self.ctx.names[d].clone(), out)
                })
                .collect();
            let st = &mut job.steps[i];
            st.phase = Phase::Running;
            st.attempts += 1;
            st.token = st.token.wrapping_add(1);
            let key = st
                .key
                .get_or_insert_with(|| format!("{}/{}", job.id_str, agent.name).into())
                .clone();
            let call = Call {
                job: job_id,
                step: i,
                token: st.token,
                incarnation: slot.incarnation,
                ctx: CallContext {
                    job_id: job.id_str.clone(),
                    graph: model.name.clone(),
                    agent: agent.name.clone(),
                    attempt: st.attempts,
                    idempotency_key: key,
                    deadline: job.deadline,
                },
                input: StepInput {
                    input: job.input.clone(),
                    deps,
                },
                reply: self.me.clone(),
            };
            let attempt = st.attempts;
            if actor.cast(AgentMsg::Run(Box::new(call))).is_err() {
                // The actor is gone; its supervisor will announce the next one.
                st.phase = Phase::Queued;
                st.attempts -= 1;
                slot.queue.push(Reverse((seq, job_id)));
                slot.actor = None;
                return;
            }
            slot.in_flight += 1;
            self.ctx.stats.agents[i].calls.fetch_add(1, Relaxed);
            match self
                .ctx
                .shared
                .store
                .update(job_id, JobUpdate::StepStarted { step: i, attempt })
            {
                Ok(Some(event)) => self.ctx.shared.publish(event),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(job_id = %job_id, error = %e, "could not record step start")
                }
            }
        }
    }

    fn on_step_done(&mut self, d: StepDone) {
        let slot = &mut self.slots[d.step];
        if d.incarnation == slot.incarnation {
            slot.in_flight = slot.in_flight.saturating_sub(1);
        }
        self.ctx.stats.agents[d.step]
            .call_micros
            .fetch_add(d.elapsed.as_micros() as u64, Relaxed);
        let current = self.jobs.get(&d.job).is_some_and(|j| {
            j.steps[d.step].phase == Phase::Running && j.steps[d.step].token == d.token
        });
        if current {
            match d.result {
                Ok(out) => self.step_succeeded(d.job, d.step, out),
                Err(e) => self.step_failed(d.job, d.step, e),
            }
        }
        self.pump(d.step);
    }

    fn step_succeeded(&mut self, id: JobId, i: usize, out: AgentOutput) {
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
        let st = &mut job.steps[i];
        st.phase = Phase::Done;
        st.output = Some(output.clone());
        let attempt = st.attempts;
        job.remaining -= 1;
        let remaining = job.remaining;
        let seq = job.seq;
        let mut ready = Vec::new();
        for &d in &self.ctx.model.agents[i].dependents {
            let dep = &mut job.steps[d];
            dep.pending_deps -= 1;
            if dep.pending_deps == 0 && dep.phase == Phase::Waiting {
                dep.phase = Phase::Queued;
                ready.push(d);
            }
        }
        self.record(
            id,
            JobUpdate::StepSucceeded {
                step: i,
                attempt,
                output,
                usage: out.usage,
            },
        );
        if remaining == 0 {
            self.finish(id, JobState::Succeeded, None);
            return;
        }
        for d in ready {
            self.slots[d].queue.push(Reverse((seq, id)));
            self.pump(d);
        }
    }

    fn step_failed(&mut self, id: JobId, i: usize, e: AgentError) {
        let agent = &self.ctx.model.agents[i];
        let stats = &self.ctx.stats.agents[i];
        let Some(job) = self.jobs.get_mut(&id) else {
            return;
        };
        let st = &mut job.steps[i];
        let delay = match e.class {
            // Not the step's fault: wait as asked, without spending an attempt.
            ErrorClass::RateLimited => {
                stats.rate_limited.fetch_add(1, Relaxed);
                st.attempts -= 1;
                Some(e.retry_after.unwrap_or(DEFAULT_RATE_LIMIT_WAIT))
            }
            ErrorClass::Transient if st.attempts < agent.retry.max_attempts.get() => {
                stats.retries.fetch_add(1, Relaxed);
                Some(backoff::delay(&agent.retry, st.attempts, self.rng.random()))
            }
            _ => None,
        };
        let attempt = st.attempts;
        match delay {
            Some(delay) => {
                st.phase = Phase::Backoff;
                st.token = st.token.wrapping_add(1);
                let token = st.token;
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
            None => {
                st.phase = Phase::Failed;
                stats.failures.fetch_add(1, Relaxed);
                let message = format!(
                    "agent {:?} failed after {attempt} attempt{}: {e}",
                    &*agent.name,
                    if attempt == 1 { "" } else { "s" }
                );
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
            }
        }
    }

    fn on_agent_up(
        &mut self,
        i: usize,
        actor: Option<ActorRef<AgentMsg>>,
        incarnation: u32,
        panic: Option<AgentPanic>,
    ) {
        let slot = &mut self.slots[i];
        slot.actor = actor;
        slot.incarnation = incarnation;
        // Calls of the previous incarnation were aborted with it.
        slot.in_flight = 0;
        let mut charged = None;
        for (id, job) in self.jobs.iter_mut() {
            let st = &mut job.steps[i];
            if st.phase != Phase::Running {
                continue;
            }
            if let Some(p) = &panic
                && p.job == *id
                && p.token == st.token
            {
                charged = Some((*id, p.message.clone()));
                continue;
            }
            // Collateral: run again with the same key, without spending an attempt.
            st.phase = Phase::Queued;
            st.attempts -= 1;
            slot.queue.push(Reverse((job.seq, *id)));
        }
        if let Some((id, message)) = charged {
            self.step_failed(
                id,
                i,
                AgentError::transient(format!("agent panicked: {message}")),
            );
        }
        self.pump(i);
    }

    fn finish(&mut self, id: JobId, state: JobState, error: Option<String>) {
        let Some(job) = self.jobs.remove(&id) else {
            return;
        };
        let output = (state == JobState::Succeeded).then(|| {
            let mut map = serde_json::Map::new();
            for a in self.ctx.model.sinks() {
                if let Some(out) = &job.steps[a.index].output {
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
        self.record(
            id,
            JobUpdate::Finished {
                state,
                output,
                error,
            },
        );
        self.ctx.shared.job_finished(id);
        self.admit(false);
    }

    fn check_deadlines(&mut self) {
        let now = Instant::now();
        let expired: Vec<JobId> = self
            .jobs
            .iter()
            .filter(|(_, j)| j.deadline.is_some_and(|d| d <= now))
            .map(|(id, _)| *id)
            .collect();
        let limit = self.ctx.model.deadline.map(humantime::format_duration);
        for id in expired {
            let msg = match &limit {
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
                .zip(&self.ctx.names)
                .map(|(s, n)| AgentSlotSnapshot {
                    name: n.to_string(),
                    up: s.actor.is_some(),
                    in_flight: s.in_flight,
                    queued: s.queue.len(),
                })
                .collect(),
        }
    }
}
