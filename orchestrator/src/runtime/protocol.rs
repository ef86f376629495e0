//! The messages the runtime's actors exchange — scheduler, agent actors, quota broker — and the
//! [`Grant`] a call holds of its quotas. Kept apart from the actors so that none imports another.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use cascade_agents::{Agent, AgentError, AgentOutput, CallContext, StepInput, UpstreamLimits};
use ractor::{ActorRef, RpcReplyPort};
use serde::Serialize;
use serde_json::Value;

use crate::approval::{ApprovalError, Resolved};
use crate::job::{ApprovalDecision, Budget, JobId};
use crate::quota::{Demand, Outcome, QuotaSnapshot};
use crate::signal::{AgentKey, AgentPause, Reach};

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
        actor: Option<AgentHandle>,
        incarnation: u32,
        panic: Option<AgentPanic>,
    },
    /// The broker let a step's call start under `grant`.
    Granted {
        job: JobId,
        step: usize,
        token: u32,
        grant: Grant,
    },
    /// Pause state changes of this graph's agents (`None`: resumed).
    Pause(Vec<(usize, Option<Reach>)>),
    /// The broker was restarted: steps waiting for a grant must ask again.
    BrokerRestarted,
    Cancel {
        job: JobId,
        reason: String,
        reply: RpcReplyPort<bool>,
    },
    /// Job `job`'s budget is now `budget` (a job stopped by it goes on).
    RaiseBudget {
        job: JobId,
        budget: Budget,
        reply: RpcReplyPort<Result<(), crate::store::StoreError>>,
    },
    /// A person's decision on step `step`'s proposal, which they saw with hash `sha256`.
    Decide {
        job: JobId,
        step: usize,
        sha256: String,
        decision: ApprovalDecision,
        reply: RpcReplyPort<Result<Resolved, ApprovalError>>,
    },
    /// Admit no more jobs (shutdown).
    Drain,
    /// Check deadlines.
    Tick,
    Snapshot(RpcReplyPort<SchedulerSnapshot>),
    /// Carry on with calls that finished at once (see the scheduler's `FINISHED_PER_TURN`).
    Continue,
    /// A tool loop's turn of job `job` spent `usage` (counted in the job's budget as it goes).
    LoopSpent {
        job: JobId,
        usage: cascade_agents::Usage,
    },
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
    /// Steps waiting at the quota broker for their turn.
    pub awaiting_quota: u32,
    pub queued: usize,
    pub paused: Option<Reach>,
}

/// A running incarnation of an agent: its actor, and the agent instance it was started with
/// (built afresh for every incarnation).
#[derive(Clone)]
pub(crate) struct AgentHandle {
    pub actor: ActorRef<AgentMsg>,
    pub agent: Arc<dyn Agent>,
}

/// One attempt of one step.
pub(crate) struct Call {
    pub job: JobId,
    pub step: usize,
    /// Which dispatch of the step this is; results of an older dispatch are ignored.
    pub token: u32,
    /// Which incarnation of the agent actor the scheduler counted this call against.
    pub incarnation: u32,
    /// The quota grant this call runs under; it travels with the call and its result, and goes
    /// back to the broker when dropped, whatever ends the call.
    pub grant: Option<Grant>,
    pub ctx: CallContext,
    pub input: StepInput,
    /// The approved call to make, exactly, instead of one rendered from `input`.
    pub prepared: Option<Arc<Value>>,
    /// The job is sampled for trace export; its steps follow it.
    pub traced: bool,
    /// A tool-using agent's step runs its loop, one journaled sub-step at a time, here.
    pub tool_loop: Option<Box<super::tool_loop::LoopEnv>>,
}

/// A call's result, sent to the scheduler.
pub(crate) struct StepDone {
    pub job: JobId,
    pub step: usize,
    pub token: u32,
    pub incarnation: u32,
    pub grant: Option<Grant>,
    pub result: Result<AgentOutput, AgentError>,
    pub elapsed: Duration,
    /// A tool loop stopped to wait (for a person, or a raised budget): the step holds nothing
    /// until then, and `result` is not its end.
    pub park: Option<super::tool_loop::Park>,
    /// The call never left: the cluster's shared quota is spent (`result` is the refusal that
    /// says until when; the quota pauses, and the step waits for it like any refused call).
    pub deferred: bool,
}

/// How a call ended: with a result for the scheduler, or with a panic that fails the actor.
pub(crate) enum CallEnd {
    Done(Box<StepDone>),
    Panicked(AgentPanic),
}

/// A call in progress, owning everything it needs.
pub(crate) type CallFuture = Pin<Box<dyn Future<Output = CallEnd> + Send>>;

/// A call that did not finish on its first poll, with where its end goes.
pub(crate) struct Waiting {
    pub call: CallFuture,
    pub reply: ActorRef<SchedMsg>,
}

pub(crate) enum AgentMsg {
    /// Run a call that did not finish on its first poll, as a task of this actor.
    Run(Box<Waiting>),
    /// A call panicked: fail this actor.
    Panicked(AgentPanic),
}

/// The error an agent actor fails with when a call panicked; the supervisor reads it to charge the
/// panic to that step (a step that always panics must not restart its agent forever).
#[derive(Debug, Clone, thiserror::Error)]
#[error("agent panicked while running job {job}: {message}")]
pub(crate) struct AgentPanic {
    pub job: JobId,
    pub step: usize,
    pub token: u32,
    pub message: String,
}

pub(crate) struct Acquire {
    pub agent: AgentKey,
    pub job: JobId,
    pub step: usize,
    pub token: u32,
    /// Job age across the server: lower goes first.
    pub seq: u64,
    /// Its tokens and cost at most, reserved while it runs.
    pub demand: Demand,
    /// Its job's tenant class (`QuotaIndex::class_of`): which shares it also draws on.
    pub class: u16,
}

pub(crate) enum BrokerMsg {
    /// A granted call ended (or will never run): return its reservations. Sent by [`Grant`] when
    /// it cannot settle at once (the broker is busy on another thread, or the grant is dropped
    /// while the broker works).
    Settle {
        grant: u64,
        end: Settlement,
    },
    Tick(u64),
    /// An agent was marked failed, or runs again.
    AgentHealth {
        agent: AgentKey,
        failed: bool,
    },
    /// Send a scheduler that (re)started the pause state of its graph.
    Resync(usize),
    /// Each agent of a graph with its pause and causes.
    Pauses(usize, RpcReplyPort<Vec<Option<AgentPause>>>),
    /// Treat a quota as refused by its upstream for `duration` (operators, benchmarks, tests).
    Exhaust {
        quota: String,
        duration: Duration,
        reply: RpcReplyPort<bool>,
    },
    Snapshot(RpcReplyPort<Vec<QuotaSnapshot>>),
    /// The broker's code panicked on another actor's thread: fail, so that it is replaced.
    Fail(String),
}

/// What one call holds of its quotas (a concurrency slot, reserved tokens), owned like a permit:
/// [`settle`](Self::settle) returns it with the call's real usage, and dropping it unsettled —
/// the call's task aborted with its actor, a panic, a result or grant message dropped with a dead
/// mailbox, a cancel, a shutdown — returns it as abandoned. So every grant goes back exactly
/// once, and no message that a dying actor may never send is needed for it.
pub(crate) struct Grant {
    id: u64,
    to: Option<Arc<dyn SettleGrant>>,
    /// Its claim on the cluster's shared quotas, when the quotas are shared.
    claim: Option<Box<crate::quota::shared::Claim>>,
}

/// Where a grant goes back to: the broker that made it.
pub(crate) trait SettleGrant: Send + Sync {
    fn settle(&self, grant: u64, end: Settlement);
}

/// How a granted call ended, as its quotas need to know it.
#[derive(Clone, Debug)]
pub(crate) struct Settlement {
    /// Tokens it spent (prompt, completion), when it reported them.
    pub usage: Option<(u64, u64)>,
    /// What it cost, in micro-dollars, when it reported usage.
    pub cost_micros: Option<u64>,
    pub outcome: Outcome,
    /// The limits the upstream's answer stated.
    pub limits: Option<UpstreamLimits>,
    /// This credential cannot get a token, or was refused: the outcome is the credential's
    /// quota's alone, and the call is abandoned for the others.
    pub credential: Option<Arc<str>>,
}

impl Settlement {
    pub fn abandoned() -> Self {
        Self {
            usage: None,
            cost_micros: None,
            outcome: Outcome::Abandoned,
            limits: None,
            credential: None,
        }
    }
}

impl std::fmt::Debug for Grant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("id", &self.id)
            .field("settled", &self.to.is_none())
            .finish()
    }
}

impl Grant {
    pub fn new(id: u64, to: Option<Arc<dyn SettleGrant>>) -> Self {
        Self {
            id,
            to,
            claim: None,
        }
    }

    /// This grant, with a claim on the cluster's shared quotas to pass before the call leaves.
    pub fn with_claim(mut self, claim: Option<crate::quota::shared::Claim>) -> Self {
        self.claim = claim.map(Box::new);
        self
    }

    /// The claim to pass before the call leaves (a cluster's shared quotas).
    pub fn claim_mut(&mut self) -> Option<&mut crate::quota::shared::Claim> {
        self.claim.as_deref_mut()
    }

    /// Return the grant with how its call ended.
    pub fn settle(mut self, end: Settlement) {
        self.send(end);
    }

    fn send(&mut self, end: Settlement) {
        if let Some(mut claim) = self.claim.take() {
            claim.finish(
                end.usage.map(|(p, c)| p + c),
                end.outcome,
                end.credential.as_deref(),
            );
        }
        // A broker that is gone took its reservations with it.
        if let Some(to) = self.to.take() {
            to.settle(self.id, end);
        }
    }
}

impl Drop for Grant {
    fn drop(&mut self) {
        self.send(Settlement::abandoned());
    }
}
