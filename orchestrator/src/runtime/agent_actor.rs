//! One actor per agent: it holds the calls of its agent instance that did not finish at once, so
//! that a restart aborts them, and it fails when a call panics.
//!
//! The scheduler starts each call itself and polls it once where it stands: a call that finishes
//! on that first poll (a `template` step, a zero-latency `sim`) costs no task, no message and no
//! timer. A call that has to wait is handed to this actor as it is, and runs as a task of its own;
//! its result goes straight back to the scheduler. The scheduler never starts more calls than the
//! agent's concurrency allows, so this mailbox is bounded by that. A panic inside a call is not
//! swallowed: it is reported here and the actor fails, its supervisor restarts it (with a fresh
//! instance), and dropping the actor's state aborts the calls still running (the scheduler runs
//! them again with the same idempotency keys).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use cascade_agents::{Agent, AgentError};
use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use super::protocol::{
    AgentMsg, AgentPanic, Call, CallEnd, CallFuture, Grant, SchedMsg, StepDone, Waiting,
};

pub(crate) struct AgentActor;

pub(crate) struct AgentState {
    /// The running calls; dropped with the state, which aborts them.
    tasks: JoinSet<()>,
}

impl Actor for AgentActor {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = ();

    async fn pre_start(
        &self,
        _me: ActorRef<AgentMsg>,
        _args: (),
    ) -> Result<AgentState, ActorProcessingErr> {
        Ok(AgentState {
            tasks: JoinSet::new(),
        })
    }

    async fn handle(
        &self,
        me: ActorRef<AgentMsg>,
        msg: AgentMsg,
        state: &mut AgentState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            AgentMsg::Run(w) => {
                // Reap finished tasks so the set holds only running calls.
                while state.tasks.try_join_next().is_some() {}
                let Waiting { call, reply } = *w;
                state.tasks.spawn(async move {
                    // If the scheduler is gone (shutdown, or restarted), the result is lost and
                    // the step runs again with the same key after recovery: at-least-once.
                    match call.await {
                        CallEnd::Done(d) => {
                            let _ = reply.cast(SchedMsg::StepDone(d));
                        }
                        CallEnd::Panicked(p) => {
                            let _ = me.cast(AgentMsg::Panicked(p));
                        }
                    }
                });
                Ok(())
            }
            AgentMsg::Panicked(p) => Err(Box::new(p)),
        }
    }
}

/// Build the call's future: the agent's call under its timeout and the step's span, with a
/// panic caught and turned into [`CallEnd::Panicked`].
///
/// `job` is the job's span, the step's parent (not kept by the call: the two copies each waiting
/// call held cost 160 of its 800 bytes).
pub(crate) fn start(
    agent: Arc<dyn Agent>,
    call: Call,
    job: &tracing::Span,
    timeout: Duration,
) -> CallFuture {
    let span = step_span(job, &call);
    let traced = call.traced;
    let run = run_call(agent, call, timeout).instrument(span);
    if traced {
        Box::pin(run)
    } else {
        Box::pin(crate::telemetry::unsampled(run))
    }
}

/// Poll a call once, where the caller stands: its end if it has one already, else the call, to
/// be run as a task (which polls it again with its own waker).
pub(crate) fn poll_once(mut call: CallFuture) -> Result<CallEnd, CallFuture> {
    let mut cx = Context::from_waker(Waker::noop());
    match call.as_mut().poll(&mut cx) {
        Poll::Ready(end) => Ok(end),
        Poll::Pending => Err(call),
    }
}

/// DEBUG: a span per step costs a fifth of the engine's throughput when recorded; the job's INFO
/// span already puts the job id on every line. Steps of a job not sampled for trace export come
/// from a callsite marked [`UNTRACED`](crate::telemetry::UNTRACED), as their job's span does.
fn step_span(job: &tracing::Span, call: &Call) -> tracing::Span {
    use tracing::field::Empty;
    let (agent, attempt) = (&*call.ctx.agent, call.ctx.attempt);
    if call.traced {
        tracing::debug_span!(parent: job, "step", agent = %agent, attempt, outcome = Empty)
    } else {
        tracing::debug_span!(parent: job, "step", agent = %agent, attempt, outcome = Empty, untraced = Empty)
    }
}

/// Runs inside the step's span (see [`start`]): the outcome is recorded on the current span.
async fn run_call(agent: Arc<dyn Agent>, mut call: Call, timeout: Duration) -> CallEnd {
    let start = Instant::now();
    // The cluster's shared quotas: wait for this call's turn, or give the step back when a
    // quota is spent on every node (the broker was told, and pauses it).
    if let Some(claim) = call.grant.as_mut().and_then(Grant::claim_mut)
        && let Err(d) = claim.pass().await
    {
        tracing::Span::current().record("outcome", tracing::field::display("deferred"));
        return CallEnd::Done(Box::new(StepDone {
            job: call.job,
            step: call.step,
            token: call.token,
            incarnation: call.incarnation,
            grant: call.grant,
            result: Err(AgentError::rate_limited(
                format!(
                    "quota {} is spent across the cluster ({}); the call waits",
                    d.quota, d.reason
                ),
                Some(d.wait),
            )),
            elapsed: start.elapsed(),
            park: None,
            deferred: true,
        }));
    }
    let mut park = None;
    // A tool loop limits each of its sub-steps to the timeout instead: a step of several turns
    // and tool calls may take longer than one call.
    let timeout = match (&call.tool_loop, agent.tool_user()) {
        (Some(_), Some(_)) => Duration::MAX,
        _ => timeout,
    };
    // An approved step runs exactly the call that was approved.
    let run = async {
        if let (Some(env), Some(user)) = (&call.tool_loop, agent.tool_user()) {
            let (result, parked) = super::tool_loop::run(env, user, &call.ctx, &call.input).await;
            park = parked;
            return result;
        }
        match &call.prepared {
            Some(prepared) => agent.execute(&call.ctx, prepared).await,
            None => agent.call(&call.ctx, &call.input).await,
        }
    };
    let attempt = AssertUnwindSafe(async {
        if timeout == Duration::MAX {
            Ok(run.await)
        } else {
            tokio::time::timeout(timeout, run).await
        }
    })
    .catch_unwind()
    .await;
    let result = match attempt {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(AgentError::transient(format!(
            "call timed out after {}",
            humantime::format_duration(timeout)
        ))),
        Err(panic) => {
            let message = super::panic_message(&*panic);
            tracing::Span::current().record("outcome", tracing::field::display("panicked"));
            tracing::warn!(%message, "agent call panicked; failing the agent actor");
            return CallEnd::Panicked(AgentPanic {
                job: call.job,
                step: call.step,
                token: call.token,
                message,
            });
        }
    };
    // A refusal for rate holds the cluster's shared quotas at once (see `Claim::refused`).
    if let Err(e) = &result
        && e.class == cascade_agents::ErrorClass::RateLimited
        && e.credential.is_none()
        && let Some(claim) = call.grant.as_mut().and_then(Grant::claim_mut)
    {
        claim.refused(e.retry_after);
    }
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.class.as_str(),
    };
    tracing::Span::current().record("outcome", tracing::field::display(outcome));
    CallEnd::Done(Box::new(StepDone {
        job: call.job,
        step: call.step,
        token: call.token,
        incarnation: call.incarnation,
        grant: call.grant,
        result,
        elapsed: start.elapsed(),
        park,
        deferred: false,
    }))
}
