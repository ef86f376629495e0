//! A graph's live state in one value: its agents with their pause, queue and health, and the
//! quotas they draw on. The gRPC API and the dashboard both serve it.

use serde::Serialize;

use super::Orchestrator;
use crate::quota::QuotaSnapshot;
use crate::runtime::AgentHealth;
use crate::signal::AgentPause;

#[derive(Clone, Debug, Serialize)]
pub struct GraphState {
    pub name: String,
    pub description: Option<String>,
    pub agents: Vec<AgentState>,
    pub quotas: Vec<QuotaSnapshot>,
    pub pending_jobs: usize,
    pub running_jobs: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct AgentState {
    pub name: String,
    pub kind: String,
    pub after: Vec<String>,
    pub quotas: Vec<String>,
    /// `failed`, `paused`, `running` (calls in flight) or `idle`.
    pub state: &'static str,
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
                        "failed"
                    } else if pause.is_some() {
                        "paused"
                    } else if in_flight > 0 {
                        "running"
                    } else {
                        "idle"
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
        })
    }
}
