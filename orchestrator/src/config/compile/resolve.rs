//! Cross-file resolution, once every file has been read: graph names unique, agents' quotas and
//! dependencies resolved, agents ordered, and every error reported at once.

use super::*;

impl Loader<'_> {
    /// Resolve names across files, order agents, and report everything found.
    pub(super) fn finish(mut self) -> Result<ServerModel, ConfigErrors> {
        let quota_names: Vec<String> = self.quotas.keys().cloned().collect();
        let mut seen_graphs: HashMap<String, String> = HashMap::new();
        let mut graphs = Vec::new();
        let pending = std::mem::take(&mut self.graphs);
        for (src_idx, g) in pending {
            let at = {
                let src = &self.sources[src_idx];
                let (l, c) = src.line_col(g.name_err.1.start);
                format!("{}:{l}:{c}", src.path.display())
            };
            if let Some(prev) = seen_graphs.get(&g.name).filter(|_| !g.name.is_empty()) {
                let msg = format!("graph {:?} is declared twice (first at {prev})", g.name);
                self.resolve_errs.push((
                    src_idx,
                    g.name_err.1.clone(),
                    "graph.name".into(),
                    msg,
                    "give each graph its own name".into(),
                ));
                continue;
            }
            seen_graphs.insert(g.name.clone(), at);
            if let Some(model) = self.resolve_graph(src_idx, g, &quota_names) {
                graphs.push(Arc::new(model));
            }
        }
        for (src_idx, span, path, msg, help) in std::mem::take(&mut self.resolve_errs) {
            self.errs
                .push(self.sources[src_idx].error(span, path, msg).with_help(help));
        }
        if !self.errs.is_empty() {
            self.errs
                .sort_by(|a, b| (&a.file, a.line, a.column).cmp(&(&b.file, b.line, b.column)));
            self.errs.dedup();
            return Err(ConfigErrors(self.errs));
        }
        Ok(ServerModel {
            graphs,
            quotas: self
                .quotas
                .into_iter()
                .map(|(k, v)| (Arc::from(k.as_str()), Arc::new(v)))
                .collect(),
            server: self.server,
            telemetry: self.telemetry,
            prices: self.prices,
            mcp_servers: self.mcp_servers,
            audit: self.audit,
            auth: self.auth,
            tenants: self.tenants,
        })
    }

    pub(super) fn resolve_graph(
        &mut self,
        src_idx: usize,
        g: PendingGraph,
        quota_names: &[String],
    ) -> Option<GraphModel> {
        let owned_names: Vec<Arc<str>> = g.agents.iter().map(|a| a.model.name.clone()).collect();
        let index: HashMap<&str, usize> = owned_names
            .iter()
            .enumerate()
            .map(|(i, n)| (&**n, i))
            .collect();
        let names: Vec<&str> = owned_names.iter().map(|n| &**n).collect();
        let mut edges = Vec::new();
        let mut ok = true;
        for (i, a) in g.agents.iter().enumerate() {
            for (dep, span) in &a.after {
                match index.get(dep.as_str()) {
                    Some(&d) => edges.push((d, i)),
                    None => {
                        ok = false;
                        self.resolve_errs.push((
                            src_idx,
                            span.clone(),
                            format!("agents.{}.after", a.model.name),
                            format!("unknown agent {dep:?} in `after`"),
                            suggestion(dep, names.iter().copied()),
                        ));
                    }
                }
            }
            for (q, span) in &a.quotas {
                if !quota_names.iter().any(|n| n == q) {
                    ok = false;
                    self.resolve_errs.push((
                        src_idx,
                        span.clone(),
                        format!("agents.{}.quota", a.model.name),
                        format!("unknown quota {q:?}"),
                        format!(
                            "{} (declare it as [quotas.{q}] in this file or in cascade.toml)",
                            suggestion(q, quota_names.iter().map(String::as_str))
                        ),
                    ));
                }
            }
        }
        for cycle in dag::cycles(g.agents.len(), &edges) {
            ok = false;
            let mut path: Vec<&str> = cycle.iter().map(|&i| names[i]).collect();
            path.push(names[cycle[0]]);
            // Point at the `after` entry that closes the cycle in its first agent.
            let first = &g.agents[cycle[0]];
            let closing = names[*cycle.last().expect("non-empty cycle")];
            let span = first
                .after
                .iter()
                .find(|(d, _)| d == closing)
                .map_or(first.name_span.clone(), |(_, s)| s.clone());
            self.resolve_errs.push((
                src_idx,
                span,
                format!("agents.{}.after", first.model.name),
                format!("dependency cycle: {}", path.join(" → ")),
                "remove one of these `after` entries so that the graph has a start and an end"
                    .into(),
            ));
        }
        if !ok || g.agents.is_empty() {
            return None;
        }
        let order = dag::topo_order(g.agents.len(), &edges)?;
        let mut new_index = vec![0; order.len()];
        for (new, &old) in order.iter().enumerate() {
            new_index[old] = new;
        }
        let mut pending: Vec<Option<PendingAgent>> = g.agents.into_iter().map(Some).collect();
        let mut agents: Vec<AgentModel> = Vec::with_capacity(order.len());
        for (new, &old) in order.iter().enumerate() {
            let p = pending[old].take().expect("each agent once");
            let mut m = p.model;
            m.index = new;
            m.after = p
                .after
                .iter()
                .map(|(d, _)| new_index[index[d.as_str()]])
                .collect();
            m.after.sort_unstable();
            m.after.dedup();
            let mut qs: Vec<Arc<str>> = Vec::new();
            for (q, _) in p.quotas {
                if !qs.iter().any(|x| **x == *q) {
                    qs.push(q.into());
                }
            }
            // Every upstream is governed: an agent that names no quota draws on its upstream's
            // implicit one, shared by every agent (of every graph) that calls that upstream.
            if qs.is_empty()
                && let Some(upstream) = &p.upstream
            {
                let q = self.implicit_quota(src_idx, &p.name_span, &m.name, upstream);
                qs.push(q);
            }
            // A credential that cannot get a token, or is refused, pauses every agent that uses it.
            if let Some(c) = &p.credential {
                qs.push(self.credential_quota(src_idx, &p.name_span, &m.name, c));
            }
            m.quotas = qs;
            // A tool-using agent's calls of each server's tools draw on that server's quota.
            let mut servers: Vec<&str> = m
                .fields
                .get("tools")
                .and_then(serde_json::Value::as_array)
                .into_iter()
                .flatten()
                .filter_map(|t| t.as_str()?.split_once('.').map(|(s, _)| s))
                .collect();
            servers.sort_unstable();
            servers.dedup();
            let tool_quotas: Vec<(Arc<str>, Arc<str>)> = servers
                .into_iter()
                .map(|s| {
                    let upstream = format!("mcp:{s}");
                    let q = self.implicit_quota(src_idx, &p.name_span, &m.name, &upstream);
                    (Arc::from(s), q)
                })
                .collect();
            m.tool_quotas = tool_quotas;
            agents.push(m);
        }
        for i in 0..agents.len() {
            for d in agents[i].after.clone() {
                agents[d].dependents.push(i);
            }
        }
        Some(GraphModel {
            name: g.name.into(),
            description: g.description,
            source: g.src,
            max_in_flight_jobs: g.max_in_flight_jobs,
            max_pending_jobs: g.max_pending_jobs,
            tenants: g.tenants,
            deadline: g.deadline,
            budget: g.budget,
            input_schema: g.input_schema,
            triggers: g.triggers,
            agents,
        })
    }
}
