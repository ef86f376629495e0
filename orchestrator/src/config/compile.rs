//! Raw TOML → validated model. Each file is read field by field with spans; references between
//! agents and quotas are resolved once every file has been read, so quotas may be declared in
//! `cascade.toml` or in any graph file.

use std::collections::{BTreeMap, HashMap};
use std::num::{NonZeroU32, NonZeroU64, NonZeroUsize};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use cascade_agents::{AgentSpec, HumanDuration, Registry};
use toml::Spanned;
use toml::de::{DeTable, DeValue};

use super::error::{ConfigError, ConfigErrors, Source, suggestion};
use super::raw::{RawCircuitBreaker, RawRetry};
use super::table::{TableReader, deserialize, span_at};
use crate::dag;
use crate::model::{
    AgentModel, Approval, CircuitBreakerSpec, GraphModel, OnUpstreamPause, QuotaModel, Rate,
    RestartPolicy, RetryPolicy, ServerModel, ServerSettings, TelemetrySettings,
};

const GRAPH_FILE_SECTIONS: &[&str] = &["graph", "quotas", "agents"];
const SERVER_FILE_SECTIONS: &[&str] = &["graphs", "server", "quotas", "telemetry"];
const GRAPH_FIELDS: &[&str] = &[
    "name",
    "description",
    "max_in_flight_jobs",
    "max_pending_jobs",
    "deadline",
];
const SERVER_FIELDS: &[&str] = &[
    "grpc_addr",
    "http_addr",
    "data_dir",
    "cascade",
    "webhook_secret",
    "callback_secret",
    "max_input_bytes",
    "retention",
    "shutdown_grace",
    "max_events_per_job",
    "store_queue_capacity",
];
const TELEMETRY_FIELDS: &[&str] = &[
    "otlp_endpoint",
    "service_name",
    "sample_ratio",
    "filter",
    "headers",
    "timeout",
];
const QUOTA_FIELDS: &[&str] = &[
    "description",
    "requests_per_second",
    "requests_per_minute",
    "tokens_per_minute",
    "tokens_per_hour",
    "burst",
    "max_concurrency",
    "circuit_breaker",
    "pause_threshold",
];
/// Fields every agent has, whatever its kind.
pub(crate) const AGENT_FIELDS: &[&str] = &[
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
    "max_restarts",
    "restart_window",
];

const DEFAULT_MAX_IN_FLIGHT_JOBS: usize = 1000;
const DEFAULT_MAX_PENDING_JOBS: usize = 100_000;
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);
const DEFAULT_MAX_CONCURRENCY: u32 = 64;
const DEFAULT_PAUSE_THRESHOLD: Duration = Duration::from_millis(250);

/// Load a server: an optional `cascade.toml` (whose `graphs` list names graph files or
/// directories) and any further graph files.
pub fn load(
    config: Option<&Path>,
    graph_files: &[PathBuf],
    registry: &Registry,
) -> Result<ServerModel, ConfigErrors> {
    let mut loader = Loader::new(registry);
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(path) = config
        && let Some(src) = loader.read_file(path)
    {
        files.extend(loader.server_file(&src));
        loader.sources.push(src);
    }
    files.extend(graph_files.iter().cloned());
    // The same file named twice (by a directory in cascade.toml and on the command line) is read once.
    let mut seen = std::collections::HashSet::new();
    files.retain(|f| seen.insert(f.canonicalize().unwrap_or_else(|_| f.clone())));
    for f in files {
        if let Some(src) = loader.read_file(&f) {
            loader.graph_file(&src);
            loader.sources.push(src);
        }
    }
    loader.finish()
}

/// Load graph files with no server config.
pub fn load_graph_files(
    paths: &[PathBuf],
    registry: &Registry,
) -> Result<ServerModel, ConfigErrors> {
    load(None, paths, registry)
}

/// Compile one graph file's text (`label` names it in messages).
pub fn parse_graph_str(
    label: &str,
    text: &str,
    registry: &Registry,
) -> Result<ServerModel, ConfigErrors> {
    let mut loader = Loader::new(registry);
    let src = Source::new(label, text.to_string());
    loader.graph_file(&src);
    loader.sources.push(src);
    loader.finish()
}

struct PendingGraph {
    src: PathBuf,
    name: String,
    name_err: (usize, Range<usize>),
    description: Option<String>,
    max_in_flight_jobs: NonZeroUsize,
    max_pending_jobs: NonZeroUsize,
    deadline: Option<Duration>,
    agents: Vec<PendingAgent>,
}

struct PendingAgent {
    name_span: Range<usize>,
    after: Vec<(String, Range<usize>)>,
    quotas: Vec<(String, Range<usize>)>,
    /// The upstream its kind calls, for an implicit quota when it names none.
    upstream: Option<String>,
    model: AgentModel,
}

struct Loader<'r> {
    registry: &'r Registry,
    sources: Vec<Source>,
    errs: Vec<ConfigError>,
    quotas: BTreeMap<String, QuotaModel>,
    graphs: Vec<(usize, PendingGraph)>,
    server: ServerSettings,
    telemetry: TelemetrySettings,
    /// Source index of errors found while resolving, which need a file's text to locate.
    resolve_errs: Vec<(usize, Range<usize>, String, String, String)>,
}

impl<'r> Loader<'r> {
    fn new(registry: &'r Registry) -> Self {
        Self {
            registry,
            sources: Vec::new(),
            errs: Vec::new(),
            quotas: BTreeMap::new(),
            graphs: Vec::new(),
            server: ServerSettings::default(),
            telemetry: TelemetrySettings::default(),
            resolve_errs: Vec::new(),
        }
    }

    fn read_file(&mut self, path: &Path) -> Option<Source> {
        match std::fs::read_to_string(path) {
            Ok(text) => Some(Source::new(path, text)),
            Err(e) => {
                self.errs.push(
                    ConfigError::file(path, format!("cannot read file: {e}"))
                        .with_help("check the path; graph files are TOML files such as examples/graphs/fanout.toml"),
                );
                None
            }
        }
    }

    /// Parse a file into its spanned table, reporting syntax errors.
    /// `None` when the file has syntax errors: what a parser recovers from a broken file would
    /// only add confusing errors to the real one.
    fn parse<'s>(&mut self, src: &'s Source) -> Option<Spanned<DeTable<'s>>> {
        let (table, errors) = DeTable::parse_recoverable(&src.text);
        let broken = !errors.is_empty();
        for e in errors {
            let span = e.span().unwrap_or(0..0);
            self.errs.push(
                src.error(
                    span,
                    "",
                    format!("TOML syntax error: {}", e.message().trim()),
                )
                .with_help("see https://toml.io for the syntax"),
            );
        }
        (!broken).then_some(table)
    }

    /// `cascade.toml`: server settings, shared quotas and the list of graph files.
    fn server_file(&mut self, src: &Source) -> Vec<PathBuf> {
        let Some(doc) = self.parse(src) else {
            return Vec::new();
        };
        let mut r = TableReader::new(src, "", 0..0, doc.get_ref());
        let base = src.path.parent().map(Path::to_path_buf).unwrap_or_default();
        let mut files = Vec::new();
        if let Some(list) = r.take::<Vec<String>>("graphs", &mut self.errs) {
            for entry in list {
                let p = base.join(&entry);
                if p.is_dir() {
                    match std::fs::read_dir(&p) {
                        Ok(rd) => {
                            let mut found: Vec<PathBuf> = rd
                                .filter_map(|e| e.ok().map(|e| e.path()))
                                .filter(|f| {
                                    f.extension().is_some_and(|x| x == "toml") && f != &src.path
                                })
                                .collect();
                            found.sort();
                            files.extend(found);
                        }
                        Err(e) => self
                            .errs
                            .push(ConfigError::file(&p, format!("cannot list directory: {e}"))),
                    }
                } else {
                    files.push(p);
                }
            }
        }
        if let Some((k, v)) = r.entry("server") {
            r.skip("server");
            if let Some(t) = self.expect_table(src, "server", k.span(), v) {
                let mut s = TableReader::new(src, "server", k.span(), t);
                self.server.grpc_addr = s.take("grpc_addr", &mut self.errs);
                self.server.http_addr = s.take("http_addr", &mut self.errs);
                self.server.data_dir = s.take("data_dir", &mut self.errs);
                if let Some(on) = s.take("cascade", &mut self.errs) {
                    self.server.cascade = on;
                }
                self.server.webhook_secret = s.take("webhook_secret", &mut self.errs);
                self.server.callback_secret = s.take("callback_secret", &mut self.errs);
                self.server.max_input_bytes = s.take("max_input_bytes", &mut self.errs);
                self.server.retention = s
                    .take::<HumanDuration>("retention", &mut self.errs)
                    .map(HumanDuration::get);
                self.server.shutdown_grace = s
                    .take::<HumanDuration>("shutdown_grace", &mut self.errs)
                    .map(HumanDuration::get);
                self.server.max_events_per_job = s
                    .take::<std::num::NonZeroUsize>("max_events_per_job", &mut self.errs)
                    .map(std::num::NonZeroUsize::get);
                self.server.store_queue_capacity = s
                    .take::<std::num::NonZeroUsize>("store_queue_capacity", &mut self.errs)
                    .map(std::num::NonZeroUsize::get);
                s.deny_unknown(SERVER_FIELDS, "[server]", &mut self.errs);
            }
        }
        if let Some((k, v)) = r.entry("telemetry") {
            r.skip("telemetry");
            if let Some(t) = self.expect_table(src, "telemetry", k.span(), v) {
                let mut s = TableReader::new(src, "telemetry", k.span(), t);
                self.telemetry(src, &mut s);
                s.deny_unknown(TELEMETRY_FIELDS, "[telemetry]", &mut self.errs);
            }
        }
        if let Some((k, v)) = r.entry("quotas") {
            r.skip("quotas");
            self.quotas_table(src, k.span(), v);
        }
        r.deny_unknown(SERVER_FILE_SECTIONS, "the server config", &mut self.errs);
        files
    }

    /// `[telemetry]`: OTLP trace export. Every value is checked here, so a server never starts
    /// with an exporter that cannot work.
    fn telemetry(&mut self, src: &Source, s: &mut TableReader<'_, '_>) {
        let t = &mut self.telemetry;
        if let Some((url, span)) = s.take_spanned::<String>("otlp_endpoint", &mut self.errs) {
            match url.parse::<tonic::transport::Uri>() {
                Ok(u)
                    if matches!(u.scheme_str(), Some("http" | "https"))
                        && u.host().is_some() =>
                {
                    t.otlp_endpoint = Some(url);
                }
                _ => self.errs.push(
                    src.error(
                        span,
                        "telemetry.otlp_endpoint",
                        format!("{url:?} is not an http:// or https:// URL"),
                    )
                    .with_help(
                        "give the collector's OTLP/gRPC address, for example: otlp_endpoint = \"http://127.0.0.1:4317\"",
                    ),
                ),
            }
        }
        if let Some(name) = s.take::<String>("service_name", &mut self.errs) {
            t.service_name = name;
        }
        if let Some((ratio, span)) = s.take_spanned::<f64>("sample_ratio", &mut self.errs) {
            if (0.0..=1.0).contains(&ratio) {
                t.sample_ratio = ratio;
            } else {
                self.errs.push(
                    src.error(
                        span,
                        "telemetry.sample_ratio",
                        format!("{ratio} is not between 0.0 and 1.0"),
                    )
                    .with_help("the share of jobs whose trace is exported: 1.0 for all, 0.1 for one in ten"),
                );
            }
        }
        if let Some((filter, span)) = s.take_spanned::<String>("filter", &mut self.errs) {
            match tracing_subscriber::EnvFilter::builder().parse(&filter) {
                Ok(_) => t.filter = filter,
                Err(e) => self.errs.push(
                    src.error(span, "telemetry.filter", format!("not a valid filter: {e}"))
                        .with_help(format!(
                            "use RUST_LOG syntax, for example: filter = \"{}\"",
                            TelemetrySettings::DEFAULT_FILTER
                        )),
                ),
            }
        }
        if let Some((k, v)) = s.entry("headers") {
            s.skip("headers");
            if let Some(table) = self.expect_table(src, "telemetry.headers", k.span(), v) {
                let mut entries: Vec<_> = table.iter().collect();
                entries.sort_by_key(|(k, _)| k.span().start);
                for (k, v) in entries {
                    let name: &str = k.get_ref();
                    let path = format!("telemetry.headers.{name}");
                    if name.ends_with("-bin") {
                        self.errs.push(
                            src.error(
                                k.span(),
                                path,
                                format!("{name:?} is a binary header, which is not supported"),
                            )
                            .with_help("header values here are text: drop the -bin suffix"),
                        );
                        continue;
                    }
                    if tonic::metadata::AsciiMetadataKey::from_bytes(name.as_bytes()).is_err() {
                        self.errs.push(
                            src.error(k.span(), path, format!("{name:?} is not a valid gRPC metadata name"))
                                .with_help("use lowercase letters, digits and dashes, for example: headers = { x-api-key = \"env:OTLP_API_KEY\" }"),
                        );
                        continue;
                    }
                    match deserialize::<crate::secret::SecretRef>(v) {
                        Ok(r) => {
                            self.telemetry.headers.insert(name.to_ascii_lowercase(), r);
                        }
                        Err(e) => self.errs.push(
                            src.error(v.span(), path, e.message().trim().to_string())
                                .with_help(format!("for example: {name} = \"env:OTLP_API_KEY\"")),
                        ),
                    }
                }
            }
        }
        if let Some((d, span)) = s.take_spanned::<HumanDuration>("timeout", &mut self.errs) {
            if d.get().is_zero() {
                self.errs.push(
                    src.error(
                        span,
                        "telemetry.timeout",
                        "a zero timeout fails every export",
                    )
                    .with_help("give an export time to finish, for example: timeout = \"10s\""),
                );
            } else {
                self.telemetry.timeout = d.get();
            }
        }
    }

    fn expect_table<'a, 'i>(
        &mut self,
        src: &Source,
        path: &str,
        span: Range<usize>,
        v: &'a Spanned<DeValue<'i>>,
    ) -> Option<&'a DeTable<'i>> {
        match v.get_ref() {
            DeValue::Table(t) => Some(t),
            other => {
                self.errs.push(
                    src.error(
                        span,
                        path,
                        format!("expected a table, found {}", other.type_str()),
                    )
                    .with_help(format!("write it as a [{path}] section")),
                );
                None
            }
        }
    }

    fn quotas_table(&mut self, src: &Source, span: Range<usize>, v: &Spanned<DeValue<'_>>) {
        let Some(t) = self.expect_table(src, "quotas", span, v) else {
            return;
        };
        let mut entries: Vec<_> = t.iter().collect();
        entries.sort_by_key(|(k, _)| k.span().start);
        for (k, v) in entries {
            let name: &str = k.get_ref();
            let path = format!("quotas.{name}");
            if !self.check_name(src, k.span(), &path, name) {
                continue;
            }
            let Some(table) = self.expect_table(src, &path, k.span(), v) else {
                continue;
            };
            if let Some(q) = self.quota(src, name, k.span(), table) {
                if let Some(prev) = self.quotas.get(name) {
                    let at = prev.declared_at.clone();
                    self.errs.push(
                        src.error(k.span(), path, format!("quota {name:?} is declared twice (first at {at})"))
                            .with_help("quotas are shared by every graph of a server: declare each once, for example in cascade.toml"),
                    );
                } else {
                    self.quotas.insert(name.to_string(), q);
                }
            }
        }
    }

    fn quota(
        &mut self,
        src: &Source,
        name: &str,
        span: Range<usize>,
        t: &DeTable<'_>,
    ) -> Option<QuotaModel> {
        let errs_before = self.errs.len();
        let path = format!("quotas.{name}");
        let mut r = TableReader::new(src, path.clone(), span.clone(), t);
        let _: Option<String> = r.take("description", &mut self.errs);
        let rate = |r: &mut TableReader, errs: &mut Vec<ConfigError>, key: &str, period: u64| {
            r.take::<NonZeroU64>(key, errs).map(|amount| Rate {
                amount,
                period: Duration::from_secs(period),
            })
        };
        let rps = rate(&mut r, &mut self.errs, "requests_per_second", 1);
        let rpm = rate(&mut r, &mut self.errs, "requests_per_minute", 60);
        let tpm = rate(&mut r, &mut self.errs, "tokens_per_minute", 60);
        let tph = rate(&mut r, &mut self.errs, "tokens_per_hour", 3600);
        let burst: Option<NonZeroU32> = r.take("burst", &mut self.errs);
        let max_concurrency: Option<NonZeroU32> = r.take("max_concurrency", &mut self.errs);
        let pause_threshold: Option<HumanDuration> = r.take("pause_threshold", &mut self.errs);
        let cb: Option<RawCircuitBreaker> = r.take("circuit_breaker", &mut self.errs);
        r.deny_unknown(QUOTA_FIELDS, &format!("quota {name:?}"), &mut self.errs);
        if rps.is_some() && rpm.is_some() {
            self.errs.push(
                src.error(
                    span.clone(),
                    path.clone(),
                    "both requests_per_second and requests_per_minute are set",
                )
                .with_help("keep one of them"),
            );
        }
        if tpm.is_some() && tph.is_some() {
            self.errs.push(
                src.error(
                    span.clone(),
                    path.clone(),
                    "both tokens_per_minute and tokens_per_hour are set",
                )
                .with_help("keep one of them"),
            );
        }
        let requests = rps.or(rpm);
        let tokens = tpm.or(tph);
        if requests.is_none()
            && tokens.is_none()
            && max_concurrency.is_none()
            && !r.has("requests_per_second")
            && !r.has("requests_per_minute")
            && !r.has("tokens_per_minute")
            && !r.has("tokens_per_hour")
            && !r.has("max_concurrency")
        {
            self.errs.push(
                src.error(span.clone(), path.clone(), "a quota needs at least one limit")
                    .with_help("set requests_per_second, requests_per_minute, tokens_per_minute, tokens_per_hour or max_concurrency"),
            );
        }
        let circuit_breaker = match cb {
            None => None,
            Some(cb) => {
                if !(cb.failure_ratio > 0.0 && cb.failure_ratio <= 1.0) {
                    let s = r
                        .entry("circuit_breaker")
                        .map(|(_, v)| span_at(v, &["failure_ratio".into()]));
                    self.errs.push(
                        src.error(
                            s.unwrap_or(span.clone()),
                            format!("{path}.circuit_breaker.failure_ratio"),
                            format!("failure_ratio {} is out of range", cb.failure_ratio),
                        )
                        .with_help("use a ratio above 0 and at most 1, e.g. 0.5"),
                    );
                }
                Some(CircuitBreakerSpec {
                    failure_ratio: cb.failure_ratio,
                    min_calls: cb.min_calls,
                    window: cb.window.get(),
                    open_for: cb.open_for.get(),
                })
            }
        };
        if self.errs.len() > errs_before {
            return None;
        }
        let (line, col) = src.line_col(span.start);
        Some(QuotaModel {
            name: name.into(),
            requests,
            tokens,
            burst,
            max_concurrency,
            circuit_breaker,
            pause_threshold: pause_threshold.map_or(DEFAULT_PAUSE_THRESHOLD, HumanDuration::get),
            declared_at: format!("{}:{line}:{col}", src.path.display()),
            implicit: false,
        })
    }

    /// The implicit quota of `upstream`, created when an agent first calls it.
    fn implicit_quota(
        &mut self,
        src_idx: usize,
        span: &Range<usize>,
        agent: &str,
        upstream: &str,
    ) -> Arc<str> {
        let name = format!("{}{upstream}", QuotaModel::IMPLICIT_PREFIX);
        if !self.quotas.contains_key(&name) {
            let src = &self.sources[src_idx];
            let (line, col) = src.line_col(span.start);
            let at = format!(
                "{}:{line}:{col} (upstream of agent {agent:?}, which names no quota)",
                src.path.display()
            );
            self.quotas.insert(
                name.clone(),
                QuotaModel::implicit(upstream, at, DEFAULT_PAUSE_THRESHOLD),
            );
        }
        name.into()
    }

    /// Names end up in URLs, metric labels and file names: keep them plain.
    fn check_name(&mut self, src: &Source, span: Range<usize>, path: &str, name: &str) -> bool {
        let ok = !name.is_empty()
            && name.len() <= 64
            && name.starts_with(|c: char| c.is_ascii_alphabetic())
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
        if !ok {
            self.errs.push(
                src.error(span, path, format!("invalid name {name:?}"))
                    .with_help("names start with a letter and use only letters, digits, '_' and '-' (at most 64)"),
            );
        }
        ok
    }

    fn graph_file(&mut self, src: &Source) {
        let Some(doc) = self.parse(src) else { return };
        let mut r = TableReader::new(src, "", 0..0, doc.get_ref());
        if let Some((k, v)) = r.entry("quotas") {
            r.skip("quotas");
            self.quotas_table(src, k.span(), v);
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

    fn graph_header(
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
        let deadline: Option<HumanDuration> = r.take("deadline", &mut self.errs);
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
            deadline: deadline.map(HumanDuration::get),
            agents: Vec::new(),
        })
    }

    /// A string or a list of strings, each with its span.
    fn names(&mut self, r: &mut TableReader<'_, '_>, key: &str) -> Vec<(String, Range<usize>)> {
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

    fn agent(
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
        let irreversible: Option<bool> = r.take("irreversible", &mut self.errs);
        let approval: Option<Approval> = r.take("approval", &mut self.errs);
        let max_restarts: Option<u32> = r.take("max_restarts", &mut self.errs);
        let restart_window: Option<HumanDuration> = r.take("restart_window", &mut self.errs);

        // The kind's own fields.
        let mut fields = serde_json::Map::new();
        let mut upstream = None;
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
            model: AgentModel {
                index: 0,
                name: name.into(),
                kind: kind.map(|k| k.0).unwrap_or_default(),
                description,
                after: Vec::new(),
                dependents: Vec::new(),
                quotas: Vec::new(),
                retry: retry.unwrap_or_default(),
                timeout: timeout.map_or(DEFAULT_TIMEOUT, HumanDuration::get),
                max_concurrency: max_concurrency
                    .unwrap_or(NonZeroU32::new(DEFAULT_MAX_CONCURRENCY).expect("non-zero")),
                on_upstream_pause: on_upstream_pause.unwrap_or_default(),
                irreversible: irreversible.unwrap_or(false),
                approval: approval.unwrap_or_default(),
                restart: RestartPolicy {
                    max_restarts: max_restarts.unwrap_or(RestartPolicy::default().max_restarts),
                    window: restart_window
                        .map_or(RestartPolicy::default().window, HumanDuration::get),
                },
                fields,
            },
        })
    }

    fn retry(&mut self, r: &mut TableReader<'_, '_>) -> Option<RetryPolicy> {
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

    /// Resolve names across files, order agents, and report everything found.
    fn finish(mut self) -> Result<ServerModel, ConfigErrors> {
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
        })
    }

    fn resolve_graph(
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
            m.quotas = qs;
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
            deadline: g.deadline,
            agents,
        })
    }
}

#[cfg(test)]
mod tests;
