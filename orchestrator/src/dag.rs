//! The graph of a server as petgraph sees it: quotas upstream of the agents that draw on them,
//! agents upstream of the agents that consume their output. Used to validate dependencies (cycles,
//! order) and to draw graphs; the signal plane computes reachability on it when graphs load.

use std::collections::{BTreeSet, VecDeque};
use std::fmt::Write;

use petgraph::Direction;
use petgraph::algo::tarjan_scc;
use petgraph::graph::{DiGraph, NodeIndex};
use petgraph::visit::EdgeRef;

use crate::model::{GraphModel, ServerModel};

/// Every dependency cycle among `n` nodes with edges `dep → dependent`, each as the list of nodes
/// along it, starting from its smallest node (the closing node is not repeated).
pub fn cycles(n: usize, edges: &[(usize, usize)]) -> Vec<Vec<usize>> {
    let mut g: DiGraph<usize, ()> = DiGraph::with_capacity(n, edges.len());
    for i in 0..n {
        g.add_node(i);
    }
    for &(a, b) in edges {
        g.add_edge(NodeIndex::new(a), NodeIndex::new(b), ());
    }
    let mut out = Vec::new();
    for scc in tarjan_scc(&g) {
        let self_loop = scc.len() == 1 && g.contains_edge(scc[0], scc[0]);
        if scc.len() < 2 && !self_loop {
            continue;
        }
        let members: BTreeSet<NodeIndex> = scc.iter().copied().collect();
        let start = *members.iter().next().expect("non-empty scc");
        out.push(
            cycle_through(&g, &members, start)
                .into_iter()
                .map(|i| i.index())
                .collect(),
        );
    }
    out.sort();
    out
}

/// A shortest cycle from `start` back to itself that stays inside `members` (breadth-first).
fn cycle_through(
    g: &DiGraph<usize, ()>,
    members: &BTreeSet<NodeIndex>,
    start: NodeIndex,
) -> Vec<NodeIndex> {
    let mut prev = vec![None; g.node_count()];
    let mut queue = VecDeque::from([start]);
    while let Some(node) = queue.pop_front() {
        for e in g.edges_directed(node, Direction::Outgoing) {
            let next = e.target();
            if !members.contains(&next) {
                continue;
            }
            if next == start {
                let mut path = vec![node];
                let mut cur = node;
                while let Some(p) = prev[cur.index()] {
                    path.push(p);
                    cur = p;
                }
                path.reverse();
                return path;
            }
            if prev[next.index()].is_none() && next != start {
                prev[next.index()] = Some(node);
                queue.push_back(next);
            }
        }
    }
    vec![start]
}

/// A topological order of `n` nodes (ties broken by index), or `None` if there is a cycle.
pub fn topo_order(n: usize, edges: &[(usize, usize)]) -> Option<Vec<usize>> {
    let mut indegree = vec![0usize; n];
    let mut out = vec![Vec::new(); n];
    for &(a, b) in edges {
        indegree[b] += 1;
        out[a].push(b);
    }
    let mut ready: BTreeSet<usize> = (0..n).filter(|&i| indegree[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_first() {
        order.push(i);
        for &j in &out[i] {
            indegree[j] -= 1;
            if indegree[j] == 0 {
                ready.insert(j);
            }
        }
    }
    (order.len() == n).then_some(order)
}

/// Graphviz DOT of one graph: quotas as grey boxes feeding the agents that draw on them, agents
/// as ellipses labelled with their kind, dependency edges between agents.
pub fn to_dot(server: &ServerModel, graph: &GraphModel) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "digraph {:?} {{", &*graph.name);
    let _ = writeln!(s, "  rankdir=LR;");
    let _ = writeln!(s, "  node [fontname=\"Helvetica\"];");
    let quotas: BTreeSet<&str> = graph
        .agents
        .iter()
        .flat_map(|a| a.quotas.iter().map(|q| &**q))
        .collect();
    for q in &quotas {
        let mut label = format!("quota {q}");
        if let Some(m) = server.quotas.get(*q) {
            if let Some(r) = m.requests {
                let _ = write!(label, "\\n{r} requests");
            }
            if let Some(t) = m.tokens {
                let _ = write!(label, "\\n{t} tokens");
            }
            if let Some(c) = m.max_concurrency {
                let _ = write!(label, "\\n{c} concurrent");
            }
        }
        let _ = writeln!(
            s,
            "  {:?} [shape=box, style=\"rounded,filled\", fillcolor=\"#e8e8e8\", label=\"{label}\"];",
            format!("quota:{q}")
        );
    }
    for a in &graph.agents {
        let mut attrs = format!("shape=ellipse, label=\"{}\\n({})\"", a.name, a.kind);
        if a.irreversible || a.approval.needed(a.irreversible) {
            attrs.push_str(", peripheries=2");
        }
        let _ = writeln!(s, "  {:?} [{attrs}];", &*a.name);
    }
    for a in &graph.agents {
        for q in &a.quotas {
            let _ = writeln!(
                s,
                "  {:?} -> {:?} [style=dashed];",
                format!("quota:{q}"),
                &*a.name
            );
        }
        for &d in &a.after {
            let _ = writeln!(s, "  {:?} -> {:?};", &*graph.agents[d].name, &*a.name);
        }
    }
    s.push_str("}\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_every_cycle_with_its_path() {
        // 0 → 1 → 2 → 0, and 3 → 3, and 4 → 5 (no cycle).
        let edges = [(0, 1), (1, 2), (2, 0), (3, 3), (4, 5), (2, 4)];
        assert_eq!(cycles(6, &edges), vec![vec![0, 1, 2], vec![3]]);
        assert_eq!(topo_order(6, &edges), None);
    }

    #[test]
    fn shortest_cycle_inside_a_larger_component() {
        // 0 → 1 → 0 and 1 → 2 → 3 → 0 are one component; the cycle reported is the short one.
        let edges = [(0, 1), (1, 0), (1, 2), (2, 3), (3, 0)];
        assert_eq!(cycles(4, &edges), vec![vec![0, 1]]);
    }

    #[test]
    fn topo_order_respects_edges_and_index_ties() {
        let edges = [(2, 0), (2, 1), (0, 3), (1, 3)];
        assert_eq!(topo_order(4, &edges), Some(vec![2, 0, 1, 3]));
        assert!(cycles(4, &edges).is_empty());
    }
}
