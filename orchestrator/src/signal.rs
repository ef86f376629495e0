//! The signal plane: which agents a pause reaches, and why each agent is paused.
//!
//! A petgraph DAG spans every graph of the server: quota nodes upstream of the agents that draw
//! on them, agents upstream of the agents that consume their output. Reachability is computed
//! once, when graphs load, so a signal costs a lookup, not a graph walk. Each agent keeps the set
//! of its causes (an exhausted quota, a failed upstream agent) and resumes when the last one
//! clears. This module is pure; the broker actor carries its decisions out.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::Dfs;
use serde::Serialize;

use crate::model::GraphModel;

/// An agent of a server: (graph index, agent index).
pub type AgentKey = (usize, usize);

/// What a pause comes from.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum CauseKey {
    /// A quota that cannot serve calls.
    Quota { quota: Arc<str> },
    /// An agent marked failed after too many restarts.
    AgentFailed { graph: Arc<str>, agent: Arc<str> },
}

/// Until when and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct CauseInfo {
    /// Milliseconds since the Unix epoch; `None` while unknown (a failed agent).
    pub until_unix_ms: Option<u64>,
    /// Shared: one cause is recorded on every agent it reaches.
    pub reason: Arc<str>,
}

/// How a pause reaches an agent.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reach {
    /// It draws on the exhausted quota itself: it starts no call.
    Direct,
    /// It is downstream of a paused agent: it drains or stops by `on_upstream_pause`.
    Upstream,
}

/// An agent's pause: how it is reached (direct wins) and every cause.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AgentPause {
    pub reach: Reach,
    pub causes: Vec<(CauseKey, CauseInfo)>,
}

/// A change to one agent's causes: paused now with this reach, or resumed (`None`). Only the
/// reach travels on the hot path; [`SignalPlane::pause_of`] gives the causes when asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentChange {
    pub agent: AgentKey,
    pub pause: Option<Reach>,
}

/// Something that happened to a graph's agents or to a quota, for WatchGraph and dashboards.
#[derive(Clone, Debug, Serialize)]
pub struct GraphEvent {
    /// The graph it concerns; `None` for a quota, which belongs to the whole server.
    pub graph: Option<Arc<str>>,
    pub at: std::time::SystemTime,
    #[serde(flatten)]
    pub kind: GraphEventKind,
}

#[derive(Clone, Debug, Serialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum GraphEventKind {
    AgentPaused {
        agent: Arc<str>,
        reach: Reach,
        causes: Vec<(CauseKey, CauseInfo)>,
    },
    AgentResumed {
        agent: Arc<str>,
    },
    QuotaExhausted {
        quota: Arc<str>,
        until_unix_ms: u64,
        reason: String,
    },
    QuotaAvailable {
        quota: Arc<str>,
    },
    CircuitChanged {
        quota: Arc<str>,
        state: crate::quota::CircuitState,
    },
    AgentFailed {
        agent: Arc<str>,
    },
    AgentRestarted {
        agent: Arc<str>,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Node {
    Quota,
    Agent(AgentKey),
}

pub struct SignalPlane {
    graph_names: Vec<Arc<str>>,
    agent_names: Vec<Vec<Arc<str>>>,
    /// Quota → every agent it reaches, and how.
    quota_reach: HashMap<Arc<str>, Vec<(AgentKey, Reach)>>,
    /// Agent → its descendants.
    agent_reach: Vec<Vec<Vec<AgentKey>>>,
    /// Agent → its causes and how each reaches it.
    causes: Vec<Vec<BTreeMap<CauseKey, (CauseInfo, Reach)>>>,
}

impl SignalPlane {
    pub fn new(graphs: &[Arc<GraphModel>]) -> Self {
        let mut dag: DiGraph<Node, ()> = DiGraph::new();
        let mut quota_nodes: HashMap<Arc<str>, NodeIndex> = HashMap::new();
        let mut agent_nodes: Vec<Vec<NodeIndex>> = Vec::new();
        for (g, model) in graphs.iter().enumerate() {
            agent_nodes.push(
                model
                    .agents
                    .iter()
                    .map(|a| dag.add_node(Node::Agent((g, a.index))))
                    .collect(),
            );
        }
        for (g, model) in graphs.iter().enumerate() {
            for a in &model.agents {
                for q in &a.quotas {
                    let qn = *quota_nodes
                        .entry(q.clone())
                        .or_insert_with(|| dag.add_node(Node::Quota));
                    dag.add_edge(qn, agent_nodes[g][a.index], ());
                }
                for &d in &a.after {
                    dag.add_edge(agent_nodes[g][d], agent_nodes[g][a.index], ());
                }
            }
        }
        let descendants = |from: NodeIndex| -> Vec<AgentKey> {
            let mut dfs = Dfs::new(&dag, from);
            let mut out = Vec::new();
            while let Some(n) = dfs.next(&dag) {
                if n != from
                    && let Node::Agent(k) = dag[n]
                {
                    out.push(k);
                }
            }
            out.sort_unstable();
            out
        };
        let mut quota_reach = HashMap::new();
        for (name, &qn) in &quota_nodes {
            let direct: Vec<AgentKey> = dag
                .neighbors(qn)
                .filter_map(|n| match dag[n] {
                    Node::Agent(k) => Some(k),
                    Node::Quota => None,
                })
                .collect();
            let reach = descendants(qn)
                .into_iter()
                .map(|k| {
                    (
                        k,
                        if direct.contains(&k) {
                            Reach::Direct
                        } else {
                            Reach::Upstream
                        },
                    )
                })
                .collect();
            quota_reach.insert(name.clone(), reach);
        }
        let agent_reach = agent_nodes
            .iter()
            .map(|nodes| nodes.iter().map(|&n| descendants(n)).collect())
            .collect();
        Self {
            graph_names: graphs.iter().map(|g| g.name.clone()).collect(),
            agent_names: graphs
                .iter()
                .map(|g| g.agents.iter().map(|a| a.name.clone()).collect())
                .collect(),
            quota_reach,
            agent_reach,
            causes: graphs
                .iter()
                .map(|g| vec![BTreeMap::new(); g.agents.len()])
                .collect(),
        }
    }

    /// The agents a quota reaches, and how.
    pub fn quota_reach(&self, quota: &str) -> &[(AgentKey, Reach)] {
        self.quota_reach.get(quota).map_or(&[], Vec::as_slice)
    }

    pub fn pause_of(&self, (g, a): AgentKey) -> Option<AgentPause> {
        let causes = &self.causes[g][a];
        if causes.is_empty() {
            return None;
        }
        let reach = if causes.values().any(|(_, r)| *r == Reach::Direct) {
            Reach::Direct
        } else {
            Reach::Upstream
        };
        Some(AgentPause {
            reach,
            causes: causes
                .iter()
                .map(|(k, (i, _))| (k.clone(), i.clone()))
                .collect(),
        })
    }

    /// A quota became exhausted (`Some`) or available again (`None`).
    pub fn set_quota(&mut self, quota: &str, info: Option<CauseInfo>) -> Vec<AgentChange> {
        let key = CauseKey::Quota {
            quota: quota.into(),
        };
        let targets = self.quota_reach(quota).to_vec();
        self.apply(key, info, targets)
    }

    /// An agent was marked failed (`Some`) or runs again (`None`): its descendants pause.
    pub fn set_agent_failed(
        &mut self,
        (g, a): AgentKey,
        info: Option<CauseInfo>,
    ) -> Vec<AgentChange> {
        let key = CauseKey::AgentFailed {
            graph: self.graph_names[g].clone(),
            agent: self.agent_names[g][a].clone(),
        };
        let targets = self.agent_reach[g][a]
            .iter()
            .map(|&k| (k, Reach::Upstream))
            .collect();
        self.apply(key, info, targets)
    }

    fn apply(
        &mut self,
        key: CauseKey,
        info: Option<CauseInfo>,
        targets: Vec<(AgentKey, Reach)>,
    ) -> Vec<AgentChange> {
        let mut changes = Vec::new();
        for ((g, a), reach) in targets {
            let set = &mut self.causes[g][a];
            let changed = match &info {
                Some(i) => set
                    .insert(key.clone(), (i.clone(), reach))
                    .is_none_or(|old| old != (i.clone(), reach)),
                None => set.remove(&key).is_some(),
            };
            if changed {
                changes.push(AgentChange {
                    agent: (g, a),
                    pause: Self::reach_of(set),
                });
            }
        }
        changes
    }

    fn reach_of(set: &BTreeMap<CauseKey, (CauseInfo, Reach)>) -> Option<Reach> {
        if set.is_empty() {
            None
        } else if set.values().any(|(_, r)| *r == Reach::Direct) {
            Some(Reach::Direct)
        } else {
            Some(Reach::Upstream)
        }
    }

    /// Every agent of graph `g` with its current reach (for a scheduler that starts over).
    pub fn graph_state(&self, g: usize) -> Vec<(usize, Option<Reach>)> {
        self.causes[g]
            .iter()
            .enumerate()
            .map(|(a, set)| (a, Self::reach_of(set)))
            .collect()
    }

    /// Every agent of graph `g` with its pause and causes.
    pub fn graph_pauses(&self, g: usize) -> Vec<Option<AgentPause>> {
        (0..self.causes[g].len())
            .map(|a| self.pause_of((g, a)))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_graph_str;

    fn plane() -> (SignalPlane, Vec<Arc<GraphModel>>) {
        let m = parse_graph_str(
            "g.toml",
            r#"
            [graph]
            name = "g"
            [quotas.llm]
            requests_per_second = 10
            [quotas.crm]
            max_concurrency = 2
            [agents.classify]
            kind = "sim"
            quota = "llm"
            [agents.enrich]
            kind = "sim"
            quota = "crm"
            [agents.draft]
            kind = "sim"
            after = ["classify", "enrich"]
            quota = "llm"
            [agents.post]
            kind = "sim"
            after = ["draft"]
            [agents.audit]
            kind = "sim"
            after = ["enrich"]
            "#,
            &Default::default(),
        )
        .unwrap();
        (SignalPlane::new(&m.graphs), m.graphs)
    }

    fn idx(g: &GraphModel, name: &str) -> usize {
        g.agent(name).unwrap().index
    }

    fn info(r: &str) -> Option<CauseInfo> {
        Some(CauseInfo {
            until_unix_ms: Some(1),
            reason: r.into(),
        })
    }

    #[test]
    fn quota_reaches_exactly_its_agents_and_their_descendants() {
        let (mut p, graphs) = plane();
        let g = &graphs[0];
        let changes = p.set_quota("llm", info("token budget spent"));
        let mut paused: Vec<(&str, Reach)> = changes
            .iter()
            .map(|c| (&*g.agents[c.agent.1].name, c.pause.unwrap()))
            .collect();
        paused.sort();
        assert_eq!(
            paused,
            [
                ("classify", Reach::Direct),
                ("draft", Reach::Direct),
                ("post", Reach::Upstream)
            ]
        );
        assert!(p.pause_of((0, idx(g, "enrich"))).is_none());
        assert!(p.pause_of((0, idx(g, "audit"))).is_none());
    }

    #[test]
    fn resume_only_when_the_last_cause_clears() {
        let (mut p, graphs) = plane();
        let g = &graphs[0];
        let post = (0, idx(g, "post"));
        p.set_quota("llm", info("a"));
        let changes = p.set_quota("crm", info("b"));
        // post was paused already; its causes grew, which is a change.
        assert!(changes.iter().any(|c| c.agent == post));
        assert_eq!(p.pause_of(post).unwrap().causes.len(), 2);
        let changes = p.set_quota("llm", None);
        assert!(p.pause_of(post).is_some(), "crm still holds it");
        assert!(
            changes
                .iter()
                .any(|c| c.agent == (0, idx(g, "classify")) && c.pause.is_none())
        );
        let changes = p.set_quota("crm", None);
        assert!(changes.iter().any(|c| c.agent == post && c.pause.is_none()));
        // Same state again: no change, no event.
        assert!(p.set_quota("crm", None).is_empty());
    }

    #[test]
    fn a_failed_agent_pauses_its_descendants_only() {
        let (mut p, graphs) = plane();
        let g = &graphs[0];
        let changes = p.set_agent_failed((0, idx(g, "enrich")), info("restarted too often"));
        let mut names: Vec<&str> = changes.iter().map(|c| &*g.agents[c.agent.1].name).collect();
        names.sort();
        assert_eq!(names, ["audit", "draft", "post"]);
        assert!(changes.iter().all(|c| c.pause == Some(Reach::Upstream)));
    }
}
