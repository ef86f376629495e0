//! A graph's live state in one value: its agents with their pause, queue and health, and the
//! quotas they draw on. The gRPC API and the dashboard both serve it.

use serde::Serialize;

use ::metrics::{counter, gauge};

use super::Orchestrator;
use crate::metrics::{
    AGENT_FAILED, AGENT_IN_FLIGHT, AGENT_PAUSE_CAUSE, AGENT_PAUSED, AGENT_QUEUE_DEPTH,
    AGENT_RESTARTS, CREDENTIAL_REFRESH_FAILURES, GRAPH_COST, JOBS_IN_FLIGHT, JOBS_PENDING,
    QUOTA_CIRCUIT, QUOTA_EXHAUSTED, QUOTA_EXHAUSTIONS, QUOTA_RATE_MULTIPLIER, QUOTA_REFUSALS,
    QUOTA_REQUESTS, QUOTA_REQUESTS_AVAILABLE, QUOTA_REQUESTS_LIMIT, QUOTA_TOKENS,
    QUOTA_TOKENS_LIMIT, QUOTA_TOKENS_USED, QUOTA_UPSTREAM_AVAILABLE, QUOTA_UPSTREAM_LIMIT,
    QUOTA_UPSTREAM_RATE,
};
use crate::quota::CircuitState;
use crate::quota::QuotaSnapshot;
use crate::runtime::AgentHealth;
use crate::signal::AgentPause;
use crate::signal::CauseKey;

#[derive(Clone, Debug, Serialize)]
pub struct GraphState {
    pub name: String,
    pub description: Option<String>,
    pub agents: Vec<AgentState>,
    pub quotas: Vec<QuotaSnapshot>,
    pub pending_jobs: usize,
    pub running_jobs: usize,
    /// Its triggers, with their state and counts.
    pub triggers: Vec<crate::triggers::TriggerView>,
}

/// What an agent is doing now, serialised as `failed`, `paused`, `running` or `idle`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Activity {
    /// Restarted too often: marked failed, its jobs wait.
    Failed,
    /// Held by a pause (its own quota, or one upstream of it in the graph).
    Paused,
    /// Calls in flight.
    Running,
    Idle,
}

impl Activity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Failed => "failed",
            Self::Paused => "paused",
            Self::Running => "running",
            Self::Idle => "idle",
        }
    }
}

impl std::fmt::Display for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct AgentState {
    pub name: String,
    pub kind: String,
    pub after: Vec<String>,
    pub quotas: Vec<String>,
    pub state: Activity,
    pub pause: Option<AgentPause>,
    pub queue_depth: usize,
    pub in_flight: u32,
    pub calls: u64,
    pub retries: u64,
    pub failures: u64,
    pub restarts: u64,
}

impl Orchestrator {
    /// The live state of a graph, or `None` if there is no such graph.
    pub async fn graph_state(&self, name: &str) -> Option<GraphState> {
        let g = self.graphs.get(name)?;
        let model = &g.model;
        let snapshot = self.scheduler_snapshot(name).await;
        let pauses = self.pauses(name).await.unwrap_or_default();
        let stats = g.stats.snapshot();
        let used: Vec<&str> = {
            let mut q: Vec<&str> = model
                .agents
                .iter()
                .flat_map(|a| a.quotas.iter().map(|q| &**q))
                .collect();
            q.sort_unstable();
            q.dedup();
            q
        };
        let quotas = self
            .quotas()
            .await
            .into_iter()
            .filter(|q| used.contains(&q.name.as_str()))
            .collect();
        let agents = model
            .agents
            .iter()
            .map(|a| {
                let slot = snapshot.as_ref().map(|s| &s.agents[a.index]);
                let pause = pauses.get(a.index).and_then(|(_, p)| p.clone());
                let st = &stats.agents[a.index];
                let in_flight = slot.map_or(0, |s| s.in_flight + s.awaiting_quota);
                AgentState {
                    name: a.name.to_string(),
                    kind: a.kind.clone(),
                    after: a
                        .after
                        .iter()
                        .map(|&d| model.agents[d].name.to_string())
                        .collect(),
                    quotas: a.quotas.iter().map(|q| q.to_string()).collect(),
                    state: if st.health == AgentHealth::Failed {
                        Activity::Failed
                    } else if pause.is_some() {
                        Activity::Paused
                    } else if in_flight > 0 {
                        Activity::Running
                    } else {
                        Activity::Idle
                    },
                    pause,
                    queue_depth: slot.map_or(0, |s| s.queued),
                    in_flight,
                    calls: st.calls,
                    retries: st.retries,
                    failures: st.failures,
                    restarts: st.restarts,
                }
            })
            .collect();
        Some(GraphState {
            name: model.name.to_string(),
            description: model.description.clone(),
            agents,
            quotas,
            pending_jobs: self.shared.store.pending_count(name),
            running_jobs: snapshot.map_or(0, |s| s.jobs_in_flight),
            triggers: self.triggers().of_graph(name).map(|t| t.view()).collect(),
        })
    }

    /// Set every state gauge from the orchestrator's live state. Counters kept elsewhere (quota
    /// grants, tokens, refusals, restarts) are exported here as absolute values.
    pub async fn sample_metrics(&self) {
        for name in self.graph_names() {
            let Some(state) = self.graph_state(&name).await else {
                continue;
            };
            let g = name.to_string();
            gauge!(JOBS_IN_FLIGHT, "graph" => g.clone()).set(state.running_jobs as f64);
            gauge!(JOBS_PENDING, "graph" => g.clone()).set(state.pending_jobs as f64);
            if let Some(stats) = self.stats(&name) {
                let cost: f64 = stats.agents.iter().map(|a| a.cost_usd).sum();
                gauge!(GRAPH_COST, "graph" => g.clone()).set(cost);
            }
            for a in &state.agents {
                let labels = [("graph", g.clone()), ("agent", a.name.clone())];
                gauge!(AGENT_QUEUE_DEPTH, &labels).set(a.queue_depth as f64);
                gauge!(AGENT_IN_FLIGHT, &labels).set(a.in_flight as f64);
                gauge!(AGENT_PAUSED, &labels).set(if a.pause.is_some() { 1.0 } else { 0.0 });
                gauge!(AGENT_FAILED, &labels).set(if a.state == Activity::Failed {
                    1.0
                } else {
                    0.0
                });
                counter!(AGENT_RESTARTS, &labels).absolute(a.restarts);
                // Every possible cause of this agent is exported, 0 or 1, so a cleared cause reads 0.
                let mut causes: Vec<String> = a.quotas.iter().map(|q| q.to_string()).collect();
                causes.extend(a.after.iter().map(|d| format!("agent:{d}")));
                for (k, _) in a.pause.iter().flat_map(|p| p.causes.iter()) {
                    let c = match k {
                        CauseKey::Quota { quota } => quota.to_string(),
                        CauseKey::AgentFailed { agent, .. } => format!("agent:{agent}"),
                    };
                    if !causes.contains(&c) {
                        causes.push(c);
                    }
                }
                for c in causes {
                    let active =
                        a.pause
                            .iter()
                            .flat_map(|p| p.causes.iter())
                            .any(|(k, _)| match k {
                                CauseKey::Quota { quota } => **quota == *c,
                                CauseKey::AgentFailed { agent, .. } => {
                                    c.strip_prefix("agent:") == Some(&**agent)
                                }
                            });
                    gauge!(AGENT_PAUSE_CAUSE, "graph" => g.clone(), "agent" => a.name.clone(), "cause" => c)
                        .set(if active { 1.0 } else { 0.0 });
                }
            }
        }
        for q in self.quotas().await {
            let n = q.name.clone();
            counter!(QUOTA_REQUESTS, "quota" => n.clone()).absolute(q.granted);
            counter!(QUOTA_TOKENS, "quota" => n.clone(), "kind" => "prompt")
                .absolute(q.prompt_tokens);
            counter!(QUOTA_TOKENS, "quota" => n.clone(), "kind" => "completion")
                .absolute(q.completion_tokens);
            counter!(QUOTA_EXHAUSTIONS, "quota" => n.clone()).absolute(q.exhaustions);
            counter!(QUOTA_REFUSALS, "quota" => n.clone()).absolute(q.refusals);
            gauge!(QUOTA_EXHAUSTED, "quota" => n.clone()).set(if q.exhausted_reason.is_some() {
                1.0
            } else {
                0.0
            });
            gauge!(QUOTA_RATE_MULTIPLIER, "quota" => n.clone()).set(q.effective_rate_multiplier);
            if let Some(a) = q.requests_available {
                gauge!(QUOTA_REQUESTS_AVAILABLE, "quota" => n.clone()).set(a as f64);
            }
            if let Some(r) = q.requests_per_second {
                gauge!(QUOTA_REQUESTS_LIMIT, "quota" => n.clone()).set(r);
            }
            if let (Some(used), Some(limit)) = (q.tokens_used, q.tokens_window_limit) {
                gauge!(QUOTA_TOKENS_USED, "quota" => n.clone()).set(used as f64);
                gauge!(QUOTA_TOKENS_LIMIT, "quota" => n.clone()).set(limit as f64);
            }
            // A credential's failure count exists from the start, so that an alert on its
            // increase sees the first failure.
            if let Some(name) = n.strip_prefix(crate::model::QuotaModel::CREDENTIAL_PREFIX) {
                counter!(CREDENTIAL_REFRESH_FAILURES, "credential" => name.to_string())
                    .increment(0);
            }
            for (kind, b) in [
                ("requests", q.upstream_requests),
                ("tokens", q.upstream_tokens),
            ] {
                let Some(b) = b else { continue };
                gauge!(QUOTA_UPSTREAM_LIMIT, "quota" => n.clone(), "kind" => kind)
                    .set(b.limit as f64);
                gauge!(QUOTA_UPSTREAM_AVAILABLE, "quota" => n.clone(), "kind" => kind)
                    .set(b.available);
                gauge!(QUOTA_UPSTREAM_RATE, "quota" => n.clone(), "kind" => kind).set(b.per_second);
            }
            if let Some(c) = q.circuit {
                let v = match c {
                    CircuitState::Closed => 0.0,
                    CircuitState::HalfOpen => 1.0,
                    CircuitState::Open => 2.0,
                };
                gauge!(QUOTA_CIRCUIT, "quota" => n.clone()).set(v);
            }
        }
    }
}
