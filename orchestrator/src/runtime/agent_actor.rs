//! One actor per agent: it owns the agent instance (built from the agent's config in `pre_start`,
//! so a restart rebuilds it) and runs each call it is given as a task of its own.
//!
//! The scheduler never sends more calls than the agent's concurrency allows, so this mailbox is
//! bounded by that. Results go straight back to the scheduler. A panic inside a call is not
//! swallowed: the call's task reports it here and the actor fails, its supervisor restarts it, and
//! dropping the actor's state aborts the calls still running (the scheduler runs them again with
//! the same idempotency keys).

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use cascade_agents::{Agent, AgentError, AgentSpec};
use futures::FutureExt;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::Instrument;

use super::GraphCtx;
use super::protocol::{AgentMsg, AgentPanic, Call, SchedMsg, StepDone};

pub(crate) struct AgentActor;

pub(crate) struct AgentArgs {
    pub graph: Arc<GraphCtx>,
    pub index: usize,
}

pub(crate) struct AgentState {
    agent: Arc<dyn Agent>,
    timeout: Duration,
    /// The running calls; dropped with the state, which aborts them.
    tasks: JoinSet<()>,
}

impl Actor for AgentActor {
    type Msg = AgentMsg;
    type State = AgentState;
    type Arguments = AgentArgs;

    async fn pre_start(
        &self,
        _me: ActorRef<AgentMsg>,
        args: AgentArgs,
    ) -> Result<AgentState, ActorProcessingErr> {
        let model = &args.graph.model.agents[args.index];
        let agent = args.graph.shared.registry.build(
            &model.kind,
            &AgentSpec {
                graph: &args.graph.model.name,
                name: &model.name,
                fields: &model.fields,
                resources: args.graph.shared.registry.resources(),
            },
        )?;
        Ok(AgentState {
            agent,
            timeout: model.timeout,
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
            AgentMsg::Run(call) => {
                // Reap finished tasks so the set holds only running calls.
                while state.tasks.try_join_next().is_some() {}
                let agent = state.agent.clone();
                let timeout = match call.ctx.deadline {
                    Some(d) => state
                        .timeout
                        .min(d.saturating_duration_since(Instant::now())),
                    None => state.timeout,
                };
                let span = step_span(&call);
                let traced = call.traced;
                let step = run_call(agent, *call, timeout, me, span.clone()).instrument(span);
                if traced {
                    state.tasks.spawn(step);
                } else {
                    state.tasks.spawn(crate::telemetry::unsampled(step));
                }
                Ok(())
            }
            AgentMsg::Panicked(p) => Err(Box::new(p)),
        }
    }
}

/// DEBUG: a span per step costs a fifth of the engine's throughput when recorded; the job's INFO
/// span already puts the job id on every line. Steps of a job not sampled for trace export come
/// from a callsite marked [`UNTRACED`](crate::telemetry::UNTRACED), as their job's span does.
fn step_span(call: &Call) -> tracing::Span {
    use tracing::field::Empty;
    let (agent, attempt) = (&*call.ctx.agent, call.ctx.attempt);
    if call.traced {
        tracing::debug_span!(parent: &call.span, "step", agent = %agent, attempt, outcome = Empty)
    } else {
        tracing::debug_span!(parent: &call.span, "step", agent = %agent, attempt, outcome = Empty, untraced = Empty)
    }
}

async fn run_call(
    agent: Arc<dyn Agent>,
    call: Call,
    timeout: Duration,
    me: ActorRef<AgentMsg>,
    span: tracing::Span,
) {
    let start = Instant::now();
    let attempt = AssertUnwindSafe(tokio::time::timeout(
        timeout,
        agent.call(&call.ctx, &call.input),
    ))
    .catch_unwind()
    .await;
    let result = match attempt {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(AgentError::transient(format!(
            "call timed out after {}",
            humantime::format_duration(timeout)
        ))),
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_else(|| "panic with a non-string payload".to_string());
            span.record("outcome", tracing::field::display("panicked"));
            tracing::warn!(%message, "agent call panicked; failing the agent actor");
            let _ = me.cast(AgentMsg::Panicked(AgentPanic {
                job: call.job,
                step: call.step,
                token: call.token,
                message,
            }));
            return;
        }
    };
    let outcome = match &result {
        Ok(_) => "ok",
        Err(e) => e.class.as_str(),
    };
    span.record("outcome", tracing::field::display(outcome));
    // If the scheduler is gone (shutdown, or restarted), the result is lost and the step runs
    // again with the same key after recovery: at-least-once, as documented.
    let _ = call.reply.cast(SchedMsg::StepDone(Box::new(StepDone {
        job: call.job,
        step: call.step,
        token: call.token,
        incarnation: call.incarnation,
        grant: call.grant,
        result,
        elapsed: start.elapsed(),
    })));
}
