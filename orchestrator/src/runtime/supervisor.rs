//! The supervision tree: a root supervisor with one supervisor per graph, which owns the graph's
//! scheduler and one actor per agent.
//!
//! Agents are supervised one-for-one with a restart intensity (`max_restarts` within
//! `restart_window`). Past it the agent is marked failed: its steps wait (nothing is dropped) and
//! the supervisor tries it again after one window. A failed scheduler is restarted and resumes its
//! jobs from the store. ractor's default supervision stops the parent when a child dies; both
//! supervisors here override it.

use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;

use cascade_agents::AgentSpec;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};
use tokio::time::Instant;

use super::agent_actor::AgentActor;
use super::broker::{Broker, BrokerArgs};
use super::protocol::{AgentHandle, AgentPanic, BrokerMsg, SchedMsg};
use super::scheduler::Scheduler;
use super::stats::AgentHealth;
use super::{GraphCtx, Shared};
use crate::restart::{RestartDecision, RestartIntensity};
use crate::signal::{GraphEvent, GraphEventKind};

// ---------------------------------------------------------------------------------------------
// Root

pub(crate) struct RootSupervisor;

pub(crate) enum RootMsg {}

pub(crate) struct RootState {
    shared: Arc<Shared>,
    broker: Option<ActorId>,
    graphs: Vec<(Arc<GraphCtx>, Option<ActorId>)>,
}

impl RootState {
    async fn spawn_broker(&mut self, me: &ActorRef<RootMsg>) -> Result<(), ActorProcessingErr> {
        let args = BrokerArgs {
            shared: self.shared.clone(),
            graphs: self.graphs.iter().map(|(g, _)| g.clone()).collect(),
            index: self.shared.quotas.clone(),
        };
        // The broker publishes itself to the schedulers as it starts.
        let (broker, _) = Actor::spawn_linked(None, Broker, args, me.get_cell()).await?;
        self.broker = Some(broker.get_id());
        Ok(())
    }
}

impl Actor for RootSupervisor {
    type Msg = RootMsg;
    type State = RootState;
    type Arguments = (Arc<Shared>, Vec<Arc<GraphCtx>>);

    async fn pre_start(
        &self,
        me: ActorRef<RootMsg>,
        (shared, graphs): Self::Arguments,
    ) -> Result<RootState, ActorProcessingErr> {
        let mut state = RootState {
            shared,
            broker: None,
            graphs: graphs.into_iter().map(|g| (g, None)).collect(),
        };
        // The broker first: schedulers ask it for quota grants from their first step on.
        state.spawn_broker(&me).await?;
        for i in 0..state.graphs.len() {
            let g = state.graphs[i].0.clone();
            let (child, _) = Actor::spawn_linked(None, GraphSupervisor, g, me.get_cell()).await?;
            state.graphs[i].1 = Some(child.get_id());
        }
        Ok(state)
    }

    async fn post_stop(
        &self,
        me: ActorRef<RootMsg>,
        _s: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        me.stop_children_and_wait(None, None).await;
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<RootMsg>,
        evt: SupervisionEvent,
        s: &mut RootState,
    ) -> Result<(), ActorProcessingErr> {
        if let SupervisionEvent::ActorFailed(cell, err) = evt {
            if s.broker == Some(cell.get_id()) {
                tracing::error!(error = %err, "quota broker failed; restarting it, waiting steps ask again");
                if let Some(old) = s.shared.broker() {
                    old.retire();
                }
                s.shared.set_broker(None);
                if s.shared.is_shutting_down() {
                    return Ok(());
                }
                s.spawn_broker(&me).await?;
                for (g, _) in &s.graphs {
                    if let Some(sched) = g.scheduler() {
                        let _ = sched.cast(SchedMsg::BrokerRestarted);
                    }
                }
                return Ok(());
            }
            let Some(pos) = s
                .graphs
                .iter()
                .position(|(_, id)| *id == Some(cell.get_id()))
            else {
                return Ok(());
            };
            let ctx = s.graphs[pos].0.clone();
            tracing::error!(graph = %ctx.model.name, error = %err, "graph supervisor failed; restarting the graph");
            // Its children outlive it unless stopped; the new supervisor starts fresh ones.
            cell.stop_children(None);
            if ctx.shared.is_shutting_down() {
                return Ok(());
            }
            let (child, _) = Actor::spawn_linked(None, GraphSupervisor, ctx, me.get_cell()).await?;
            s.graphs[pos].1 = Some(child.get_id());
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Graph

pub(crate) struct GraphSupervisor;

pub(crate) enum GraphSupMsg {
    /// Try again an agent that was given up on.
    RetryAgent(usize),
}

struct AgentChild {
    id: Option<ActorId>,
    actor: Option<AgentHandle>,
    incarnation: u32,
    intensity: RestartIntensity,
}

pub(crate) struct GraphSupState {
    ctx: Arc<GraphCtx>,
    scheduler: ActorRef<SchedMsg>,
    agents: Vec<AgentChild>,
}

impl GraphSupervisor {
    async fn spawn_scheduler(
        me: &ActorCell,
        ctx: &Arc<GraphCtx>,
    ) -> Result<ActorRef<SchedMsg>, ActorProcessingErr> {
        let (sched, _) = Actor::spawn_linked(None, Scheduler, ctx.clone(), me.clone()).await?;
        *ctx.scheduler.write().unwrap_or_else(|p| p.into_inner()) = Some(sched.clone());
        Ok(sched)
    }

    /// Start agent `i` and tell the scheduler; on failure, mark it failed and try again later.
    async fn start_agent(
        me: &ActorRef<GraphSupMsg>,
        s: &mut GraphSupState,
        i: usize,
        panic: Option<AgentPanic>,
    ) {
        let model = &s.ctx.model.agents[i];
        // A fresh instance per incarnation: a restart starts from a clean agent.
        let built = s.ctx.shared.registry.build(
            &model.kind,
            &AgentSpec {
                graph: &s.ctx.model.name,
                name: &model.name,
                fields: &model.fields,
                resources: s.ctx.shared.registry.resources(),
            },
        );
        let child = &mut s.agents[i];
        child.incarnation += 1;
        let started = match built {
            Ok(agent) => Actor::spawn_linked(None, AgentActor, (), me.get_cell())
                .await
                .map(|(actor, _)| AgentHandle { actor, agent })
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        match started {
            Ok(handle) => {
                child.id = Some(handle.actor.get_id());
                child.actor = Some(handle.clone());
                let was_failed = s.ctx.stats.agents[i].health() == AgentHealth::Failed;
                s.ctx.stats.agents[i].set_health(AgentHealth::Running);
                if was_failed {
                    report_health(&s.ctx, i, false);
                }
                let _ = s.scheduler.cast(SchedMsg::AgentUp {
                    agent: i,
                    actor: Some(handle),
                    incarnation: child.incarnation,
                    panic,
                });
            }
            Err(e) => {
                tracing::error!(graph = %s.ctx.model.name, agent = %s.ctx.names[i], error = %e, "agent could not start");
                Self::give_up(me, s, i, panic);
            }
        }
    }

    fn give_up(
        me: &ActorRef<GraphSupMsg>,
        s: &mut GraphSupState,
        i: usize,
        panic: Option<AgentPanic>,
    ) {
        let model = &s.ctx.model.agents[i];
        tracing::error!(
            graph = %s.ctx.model.name,
            agent = %model.name,
            max_restarts = model.restart.max_restarts,
            window = ?model.restart.window,
            "agent restarted too often: marked failed; its steps wait and it is tried again after one restart window"
        );
        if s.ctx.stats.agents[i].health() != AgentHealth::Failed {
            s.ctx.stats.agents[i].set_health(AgentHealth::Failed);
            report_health(&s.ctx, i, true);
        }
        let child = &mut s.agents[i];
        child.id = None;
        child.actor = None;
        let _ = s.scheduler.cast(SchedMsg::AgentUp {
            agent: i,
            actor: None,
            incarnation: child.incarnation,
            panic,
        });
        me.send_after(model.restart.window, move || GraphSupMsg::RetryAgent(i));
    }
}

impl Actor for GraphSupervisor {
    type Msg = GraphSupMsg;
    type State = GraphSupState;
    type Arguments = Arc<GraphCtx>;

    async fn pre_start(
        &self,
        me: ActorRef<GraphSupMsg>,
        ctx: Arc<GraphCtx>,
    ) -> Result<GraphSupState, ActorProcessingErr> {
        let scheduler = Self::spawn_scheduler(&me.get_cell(), &ctx).await?;
        let agents = ctx
            .model
            .agents
            .iter()
            .map(|a| AgentChild {
                id: None,
                actor: None,
                incarnation: 0,
                intensity: RestartIntensity::new(a.restart),
            })
            .collect();
        let mut s = GraphSupState {
            ctx,
            scheduler,
            agents,
        };
        for i in 0..s.agents.len() {
            Self::start_agent(&me, &mut s, i, None).await;
        }
        Ok(s)
    }

    async fn post_stop(
        &self,
        me: ActorRef<GraphSupMsg>,
        s: &mut GraphSupState,
    ) -> Result<(), ActorProcessingErr> {
        *s.ctx.scheduler.write().unwrap_or_else(|p| p.into_inner()) = None;
        me.stop_children_and_wait(None, None).await;
        Ok(())
    }

    async fn handle(
        &self,
        me: ActorRef<GraphSupMsg>,
        msg: GraphSupMsg,
        s: &mut GraphSupState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            GraphSupMsg::RetryAgent(i) => {
                if s.agents[i].actor.is_none() && !s.ctx.shared.is_shutting_down() {
                    s.agents[i].intensity.reset();
                    Self::start_agent(&me, s, i, None).await;
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        me: ActorRef<GraphSupMsg>,
        evt: SupervisionEvent,
        s: &mut GraphSupState,
    ) -> Result<(), ActorProcessingErr> {
        let SupervisionEvent::ActorFailed(cell, err) = evt else {
            return Ok(());
        };
        if s.ctx.shared.is_shutting_down() {
            return Ok(());
        }
        let id = cell.get_id();
        if id == s.scheduler.get_id() {
            tracing::error!(graph = %s.ctx.model.name, error = %err, "scheduler failed; restarting it, jobs resume from the store");
            s.scheduler = Self::spawn_scheduler(&me.get_cell(), &s.ctx).await?;
            for (i, child) in s.agents.iter().enumerate() {
                let _ = s.scheduler.cast(SchedMsg::AgentUp {
                    agent: i,
                    actor: child.actor.clone(),
                    incarnation: child.incarnation,
                    panic: None,
                });
            }
            return Ok(());
        }
        let Some(i) = s.agents.iter().position(|c| c.id == Some(id)) else {
            return Ok(());
        };
        let panic = err.downcast_ref::<AgentPanic>().cloned();
        let stats = &s.ctx.stats.agents[i];
        if panic.is_some() {
            stats.panics.fetch_add(1, Relaxed);
        }
        tracing::warn!(graph = %s.ctx.model.name, agent = %s.ctx.names[i], error = %err, "agent actor failed");
        match s.agents[i].intensity.on_failure(Instant::now()) {
            RestartDecision::Restart => {
                stats.restarts.fetch_add(1, Relaxed);
                Self::start_agent(&me, s, i, panic).await;
            }
            RestartDecision::GiveUp => Self::give_up(&me, s, i, panic),
        }
        Ok(())
    }
}

/// Tell the broker (which pauses the agent's descendants) and watchers that an agent failed or
/// runs again.
fn report_health(ctx: &GraphCtx, i: usize, failed: bool) {
    if let Some(b) = ctx.shared.broker() {
        let _ = b.actor.cast(BrokerMsg::AgentHealth {
            agent: (ctx.index, i),
            failed,
        });
    }
    let agent = ctx.names[i].clone();
    ctx.shared.publish_graph_event(GraphEvent {
        graph: Some(ctx.model.name.clone()),
        at: crate::clock::now(),
        kind: if failed {
            GraphEventKind::AgentFailed { agent }
        } else {
            GraphEventKind::AgentRestarted { agent }
        },
    });
}
