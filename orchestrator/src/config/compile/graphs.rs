//! Graph files: the `[graph]` header and each agent's common and kind-specific fields.

use super::*;

const GRAPH_FILE_SECTIONS: &[&str] = &["graph", "quotas", "credentials", "agents"];
const GRAPH_FIELDS: &[&str] = &[
    "name",
    "description",
    "max_in_flight_jobs",
    "max_pending_jobs",
    "tenants",
    "deadline",
    "budget",
    "input_schema",
    "triggers",
];
/// Fields every agent has, whatever its kind.
const AGENT_FIELDS: &[&str] = &[
    "kind",
    "description",
    "after",
    "quota",
    "quotas",
    "retry",
    "timeout",
    "max_concurrency",
    "on_upstream_pause",
    "irreversible",
    "approval",
    "approval_when",
    "approval_timeout",
    "approval_webhook",
    "max_restarts",
    "restart_window",
];
const DEFAULT_MAX_IN_FLIGHT_JOBS: usize = 1000;
const DEFAULT_MAX_PENDING_JOBS: usize = 100_000;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_MAX_CONCURRENCY: u32 = 64;

impl Loader<'_> {
    pub(super) fn graph_file(&mut self, src: &Source) {
        let Some(doc) = self.parse(src) else { return };
        let mut r = TableReader::new(src, "", 0..0, doc.get_ref());
        if let Some((k, v)) = r.entry("quotas") {
            r.skip("quotas");
            self.quotas_table(src, k.span(), v);
        }
        if let Some((k, v)) = r.entry("credentials") {
            r.skip("credentials");
            self.credentials_table(src, k.span(), v);
        }
        let mut graph = None;
        match r.entry("graph") {
            Some((k, v)) => {
                r.skip("graph");
                if let Some(t) = self.expect_table(src, "graph", k.span(), v) {
                    graph = self.graph_header(src, k.span(), t);
                }
            }
            None => self.errs.push(
                src.error(0..0, "graph", "missing [graph] section")
                    .with_help("start the file with [graph] and name = \"my-graph\""),
            ),
        }
        let mut agents = Vec::new();
        match r.entry("agents") {
            Some((k, v)) => {
                r.skip("agents");
                if let Some(t) = self.expect_table(src, "agents", k.span(), v) {
                    let mut entries: Vec<_> = t.iter().collect();
                    entries.sort_by_key(|(k, _)| k.span().start);
                    for (k, v) in entries {
                        if let Some(a) = self.agent(src, graph.as_ref().map_or("", |g: &PendingGraph| &g.name), k, v) {
                            agents.push(a);
                        }
                    }
                    if t.is_empty() {
                        self.errs.push(
                            src.error(k.span(), "agents", "the graph has no agents")
                                .with_help("add at least one [agents.NAME] section with a kind"),
                        );
                    }
                }
            }
            None => self.errs.push(
                src.error(0..0, "agents", "the graph has no agents")
                    .with_help("add at least one [agents.NAME] section, e.g. [agents.classify] with kind = \"sim\""),
            ),
        }
        r.deny_unknown(GRAPH_FILE_SECTIONS, "a graph file", &mut self.errs);
        if let Some(mut g) = graph {
            g.agents = agents;
            let idx = self.sources.len();
            g.name_err.0 = idx;
            self.graphs.push((idx, g));
        }
    }

    pub(super) fn graph_header(
        &mut self,
        src: &Source,
        span: Range<usize>,
        t: &DeTable<'_>,
    ) -> Option<PendingGraph> {
        let mut r = TableReader::new(src, "graph", span.clone(), t);
        let name: Option<(String, Range<usize>)> = if r.has("name") {
            r.take_spanned("name", &mut self.errs)
        } else {
            r.require::<String>(
                "name",
                "name the graph: name = \"support-triage\"",
                &mut self.errs,
            );
            None
        };
        let description = r.take("description", &mut self.errs);
        let max_in_flight_jobs: Option<NonZeroUsize> = r.take("max_in_flight_jobs", &mut self.errs);
        let max_pending_jobs: Option<NonZeroUsize> = r.take("max_pending_jobs", &mut self.errs);
        let tenants_at = r.entry("tenants").map(|(_, v)| v.span());
        let tenants: Option<Vec<String>> = r.take("tenants", &mut self.errs);
        if let (Some(list), Some(at)) = (&tenants, tenants_at) {
            if list.is_empty() {
                self.errs.push(
                    src.error(at, "graph.tenants", "an empty list: no tenant could submit to the graph")
                        .with_help("name the tenants whose jobs it takes, tenants = [\"acme\"], or leave the field out for every tenant's"),
                );
            } else if let Some(bad) = list.iter().find(|t| t.is_empty()) {
                self.errs.push(
                    src.error(at, "graph.tenants", format!("{bad:?} is not a tenant name"))
                        .with_help("tenants = [\"acme\", \"globex\"]"),
                );
            }
        }
        let deadline: Option<HumanDuration> = r.take("deadline", &mut self.errs);
        let budget_span = r.entry("budget").map(|(_, v)| v.span());
        let budget: Option<RawBudget> = r.take("budget", &mut self.errs);
        let budget = match (budget, budget_span) {
            (Some(b), Some(span)) => {
                if b.max_cost_usd.is_some_and(|c| !c.is_finite() || c < 0.0) {
                    self.errs.push(
                        src.error(span.clone(), "graph.budget.max_cost_usd", "a negative or infinite amount")
                            .with_help("write the dollars a job may spend, e.g. budget = { max_cost_usd = 2.5 }"),
                    );
                }
                if b.max_tokens.is_none() && b.max_cost_usd.is_none() {
                    self.errs.push(
                        src.error(span, "graph.budget", "a budget with no limit")
                            .with_help("budget = { max_tokens = 100000, max_cost_usd = 2.5 } (either or both)"),
                    );
                }
                crate::job::Budget {
                    max_tokens: b.max_tokens,
                    max_cost_usd: b.max_cost_usd,
                }
            }
            _ => crate::job::Budget::default(),
        };
        let schema_span = r.entry("input_schema").map(|(_, v)| v.span());
        let input_schema: Option<serde_json::Value> = r.take("input_schema", &mut self.errs);
        if let (Some(schema), Some(span)) = (&input_schema, schema_span)
            && let Err(e) = cascade_agents::mcp_host::check_schema(schema)
        {
            self.errs.push(
                src.error(span, "graph.input_schema", e).with_help(
                    "the job input's JSON Schema, e.g. input_schema = { type = \"object\", properties = { ticket_id = { type = \"integer\" } }, required = [\"ticket_id\"] }",
                ),
            );
        }
        let triggers = match r.entry("triggers") {
            Some((_, v)) => {
                r.skip("triggers");
                let graph_name = name.as_ref().map_or("", |n| n.0.as_str()).to_string();
                let list: Option<Vec<Arc<str>>> = tenants
                    .as_ref()
                    .map(|l| l.iter().map(|t| Arc::from(t.as_str())).collect());
                self.triggers(src, &graph_name, list.as_deref(), v)
            }
            None => Vec::new(),
        };
        r.deny_unknown(GRAPH_FIELDS, "[graph]", &mut self.errs);
        // A graph whose name is missing or bad is still checked, under an empty name.
        let (name, name_span) = name.unwrap_or((String::new(), span));
        if !name.is_empty() && !self.check_name(src, name_span.clone(), "graph.name", &name) {
            return None;
        }
        Some(PendingGraph {
            src: src.path.clone(),
            name,
            name_err: (0, name_span),
            description,
            max_in_flight_jobs: max_in_flight_jobs
                .unwrap_or(NonZeroUsize::new(DEFAULT_MAX_IN_FLIGHT_JOBS).expect("non-zero")),
            max_pending_jobs: max_pending_jobs
                .unwrap_or(NonZeroUsize::new(DEFAULT_MAX_PENDING_JOBS).expect("non-zero")),
            tenants: tenants.map(|l| l.iter().map(|t| Arc::from(t.as_str())).collect()),
            deadline: deadline.map(HumanDuration::get),
            budget,
            input_schema,
            triggers,
            agents: Vec::new(),
        })
    }

    /// A string or a list of strings, each with its span.
    pub(super) fn names(
        &mut self,
        r: &mut TableReader<'_, '_>,
        key: &str,
    ) -> Vec<(String, Range<usize>)> {
        let Some((_, v)) = r.entry(key) else {
            return Vec::new();
        };
        r.skip(key);
        let items: Vec<&Spanned<DeValue<'_>>> = match v.get_ref() {
            DeValue::String(_) => vec![v],
            DeValue::Array(a) => a.iter().collect(),
            other => {
                self.errs.push(
                    r.src
                        .error(
                            v.span(),
                            r.field_path(key),
                            format!(
                                "expected a name or a list of names, found {}",
                                other.type_str()
                            ),
                        )
                        .with_help(format!("write {key} = [\"name\", ...]")),
                );
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        for item in items {
            match deserialize::<String>(item) {
                Ok(s) => out.push((s, item.span())),
                Err(e) => self.errs.push(r.src.error(
                    item.span(),
                    r.field_path(key),
                    e.message().trim().to_string(),
                )),
            }
        }
        out
    }

    pub(super) fn agent(
        &mut self,
        src: &Source,
        graph: &str,
        key: &Spanned<toml::de::DeString<'_>>,
        value: &Spanned<DeValue<'_>>,
    ) -> Option<PendingAgent> {
        let name: &str = key.get_ref();
        let path = format!("agents.{name}");
        self.check_name(src, key.span(), &path, name);
        let table = self.expect_table(src, &path, key.span(), value)?;
        let errs_before = self.errs.len();
        let mut r = TableReader::new(src, path.clone(), key.span(), table);
        let kind: Option<(String, Range<usize>)> = if r.has("kind") {
            r.take_spanned("kind", &mut self.errs)
        } else {
            let kinds: Vec<String> = self.registry.names().map(|k| format!("{k:?}")).collect();
            r.require::<String>(
                "kind",
                &format!("set kind to one of {}", kinds.join(", ")),
                &mut self.errs,
            );
            None
        };
        let description = r.take("description", &mut self.errs);
        let after = self.names(&mut r, "after");
        let mut quotas = self.names(&mut r, "quota");
        quotas.extend(self.names(&mut r, "quotas"));
        let retry = self.retry(&mut r);
        let timeout: Option<HumanDuration> = r.take("timeout", &mut self.errs);
        let max_concurrency: Option<NonZeroU32> = r.take("max_concurrency", &mut self.errs);
        let on_upstream_pause: Option<OnUpstreamPause> =
            r.take("on_upstream_pause", &mut self.errs);
        // A tool-using agent's approvals are its tool calls' (`tool_approval`).
        if kind.as_ref().is_some_and(|(k, _)| k == "llm") && r.has("tools") {
            for field in ["irreversible", "approval", "approval_when"] {
                if let Some((_, v)) = r.entry(field) {
                    self.errs.push(
                        src.error(
                            v.span(),
                            format!("{path}.{field}"),
                            format!("{field} on an llm agent with tools: its approvals are its tool calls'"),
                        )
                        .with_help("say which tool calls need a person with tool_approval = { \"server.tool\" = \"required\" } (or \"never\")"),
                    );
                }
            }
        }
        let irreversible: Option<bool> = r.take("irreversible", &mut self.errs);
        let approval: Option<Approval> = r.take("approval", &mut self.errs);
        let when_span = r.entry("approval_when").map(|(_, v)| v.span());
        let when_src: Option<String> = r.take("approval_when", &mut self.errs);
        let approval_when = match (when_src, when_span) {
            (Some(text), Some(span)) => match crate::approval::Condition::compile(&text) {
                Ok(c) if approval == Some(Approval::Never) => {
                    drop(c);
                    self.errs.push(
                        src.error(
                            span,
                            format!("{path}.approval_when"),
                            "approval = \"never\" and approval_when contradict each other: the condition would never be asked",
                        )
                        .with_help("remove approval_when, or approval = \"never\""),
                    );
                    None
                }
                Ok(c) => Some(Arc::new(c)),
                Err(e) => {
                    self.errs.push(
                        src.error(span, format!("{path}.approval_when"), e).with_help(
                            "a minijinja expression over input, deps and job, e.g. approval_when = \"input.amount > 1000\"",
                        ),
                    );
                    None
                }
            },
            _ => None,
        };
        let approval_timeout: Option<HumanDuration> = r.take("approval_timeout", &mut self.errs);
        let approval_webhook: Option<String> = r.take("approval_webhook", &mut self.errs);
        let max_restarts: Option<u32> = r.take("max_restarts", &mut self.errs);
        let restart_window: Option<HumanDuration> = r.take("restart_window", &mut self.errs);

        // The kind's own fields.
        let mut fields = serde_json::Map::new();
        let mut upstream = None;
        let mut credential = None;
        let kind_spec = match &kind {
            Some((k, span)) => match self.registry.get(k) {
                Some(spec) => Some(*spec),
                None => {
                    self.errs.push(
                        src.error(
                            span.clone(),
                            format!("{path}.kind"),
                            format!("unknown agent kind {k:?}"),
                        )
                        .with_help(suggestion(k, self.registry.names().collect::<Vec<_>>())),
                    );
                    None
                }
            },
            None => None,
        };
        if let Some(spec) = &kind_spec {
            let valid: Vec<&str> = AGENT_FIELDS.iter().chain(spec.fields).copied().collect();
            for (k, v) in r.rest() {
                let field: &str = k.get_ref();
                if spec.fields.contains(&field) {
                    match deserialize::<serde_json::Value>(v) {
                        Ok(j) if field == "auth" => {
                            let path = r.field_path(field);
                            if let Some(auth) = self.auth(src, graph, name, &path, v.span(), j) {
                                fields.insert(field.to_string(), auth);
                            }
                        }
                        Ok(j) => {
                            fields.insert(field.to_string(), j);
                        }
                        Err(e) => self.errs.push(src.error(
                            v.span(),
                            r.field_path(field),
                            e.message().trim().to_string(),
                        )),
                    }
                    r.skip(field);
                }
            }
            r.deny_unknown(
                &valid,
                &format!("an agent of kind {:?}", spec.name),
                &mut self.errs,
            );
            let mut missing = false;
            for req in spec.required {
                if !fields.contains_key(*req) && !r.has(req) {
                    missing = true;
                    self.errs.push(
                        src.error(
                            key.span(),
                            r.field_path(req),
                            format!("missing required field `{req}` for kind {:?}", spec.name),
                        )
                        .with_help(format!("add {req} = ... to [{path}]")),
                    );
                }
            }
            if !missing && self.errs.len() == errs_before {
                let agent_spec = AgentSpec {
                    graph,
                    name,
                    fields: &fields,
                    resources: self.registry.resources(),
                };
                upstream = (spec.upstream)(&agent_spec);
                credential = (spec.credential)(&agent_spec);
                let built = self.registry.build(spec.name, &agent_spec);
                if let Err(e) = built {
                    let span = span_at(value, &e.path);
                    let field = if e.path.is_empty() {
                        path.clone()
                    } else {
                        format!("{path}.{}", e.path.join("."))
                    };
                    self.errs.push(src.error(span, field, e.message));
                }
            }
        }
        // An agent with errors is kept (the load fails anyway) so that references to it still
        // resolve and the rest of the graph is checked too.
        Some(PendingAgent {
            name_span: key.span(),
            after,
            quotas,
            upstream,
            credential,
            model: AgentModel {
                index: 0,
                name: name.into(),
                kind: kind.map(|k| k.0).unwrap_or_default(),
                description,
                after: Vec::new(),
                dependents: Vec::new(),
                quotas: Vec::new(),
                tool_quotas: Vec::new(),
                retry: retry.unwrap_or_default(),
                timeout: timeout.map_or(DEFAULT_TIMEOUT, HumanDuration::get),
                max_concurrency: max_concurrency
                    .unwrap_or(NonZeroU32::new(DEFAULT_MAX_CONCURRENCY).expect("non-zero")),
                on_upstream_pause: on_upstream_pause.unwrap_or_default(),
                irreversible: irreversible.unwrap_or(false),
                asks_agent: irreversible.is_none()
                    && kind_spec.is_some_and(|k| k.may_be_irreversible),
                approval: approval.unwrap_or_default(),
                approval_when,
                approval_timeout: approval_timeout.map(HumanDuration::get),
                approval_webhook,
                restart: RestartPolicy {
                    max_restarts: max_restarts.unwrap_or(RestartPolicy::default().max_restarts),
                    window: restart_window
                        .map_or(RestartPolicy::default().window, HumanDuration::get),
                },
                fields,
            },
        })
    }

    pub(super) fn retry(&mut self, r: &mut TableReader<'_, '_>) -> Option<RetryPolicy> {
        let span = r.entry("retry").map(|(_, v)| v.span());
        let raw: Option<RawRetry> = r.take("retry", &mut self.errs);
        if span.is_some() && raw.is_none() {
            return None;
        }
        let mut p = RetryPolicy::default();
        let Some(raw) = raw else { return Some(p) };
        if let Some(v) = raw.max_attempts {
            p.max_attempts = v;
        }
        if let Some(v) = raw.initial_delay {
            p.initial_delay = v.get();
        }
        if let Some(v) = raw.max_delay {
            p.max_delay = v.get();
        }
        if let Some(v) = raw.multiplier {
            p.multiplier = v;
        }
        let span = span.unwrap_or(0..0);
        let mut ok = true;
        if p.initial_delay > p.max_delay {
            ok = false;
            self.errs.push(
                r.src
                    .error(
                        span.clone(),
                        r.field_path("retry"),
                        format!(
                            "initial_delay ({}) is longer than max_delay ({})",
                            humantime::format_duration(p.initial_delay),
                            humantime::format_duration(p.max_delay)
                        ),
                    )
                    .with_help("make initial_delay at most max_delay"),
            );
        }
        if !(p.multiplier >= 1.0 && p.multiplier.is_finite()) {
            ok = false;
            self.errs.push(
                r.src
                    .error(
                        span,
                        r.field_path("retry.multiplier"),
                        format!("multiplier {} must be at least 1", p.multiplier),
                    )
                    .with_help("use 2.0 to double the delay after each attempt"),
            );
        }
        ok.then_some(p)
    }
}

/// `[graph] budget = { max_tokens, max_cost_usd }`.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct RawBudget {
    max_tokens: Option<u64>,
    max_cost_usd: Option<f64>,
}
