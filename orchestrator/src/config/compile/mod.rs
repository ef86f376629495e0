//! Raw TOML → validated model. Each file is read field by field with spans; references between
//! agents and quotas are resolved once every file has been read, so quotas may be declared in
//! `cascade.toml` or in any graph file. The server file, quotas, graph files and the resolution
//! across files each have a module of their own.

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
    RestartPolicy, RetryPolicy, ServerModel, ServerSettings, StoreSetting, TelemetrySettings,
};

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

/// A duplicate key, said in the file's own terms: which table or key is defined twice and where
/// it was first. For a repeated table header, also the byte range of the repeated table (its
/// keys are reported with it, not one by one).
fn duplicate_key(src: &Source, span: Range<usize>) -> Option<(ConfigError, Option<Range<usize>>)> {
    let text = &src.text;
    let line_start = text[..span.start].rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[span.start..]
        .find('\n')
        .map_or(text.len(), |i| span.start + i);
    let line = text[line_start..line_end].trim();
    let line_no = |offset: usize| text[..offset].matches('\n').count() + 1;
    if line.starts_with('[') {
        // A table header: the same header earlier in the file.
        let header = line.split('#').next().unwrap_or(line).trim();
        let first = text[..line_start]
            .lines()
            .position(|l| l.split('#').next().unwrap_or(l).trim() == header)?
            + 1;
        let table_end = text[line_end..]
            .find("\n[")
            .map_or(text.len(), |i| line_end + i + 1);
        let inner = header.trim_start_matches('[').trim_end_matches(']').trim();
        let message = match inner.strip_prefix("agents.") {
            Some(agent) => format!(
                "agent {agent:?} is defined twice: [agents.{agent}] first appears at line {first}"
            ),
            None => format!("[{inner}] is defined twice: it first appears at line {first}"),
        };
        let err = src
            .error(span, inner, message)
            .with_help("give each table its own name, or merge the two into one");
        return Some((err, Some(line_end..table_end)));
    }
    // A key set twice in one table: the same key earlier in that table.
    let key = line.split('=').next()?.trim();
    let table_start = text[..line_start].rfind("\n[").map_or(0, |i| i + 1);
    let first = text[table_start..line_start]
        .lines()
        .position(|l| l.split('=').next().is_some_and(|k| k.trim() == key))
        .map(|i| line_no(table_start) + i)?;
    let err = src
        .error(
            span,
            key,
            format!("{key} is set twice in this table: first at line {first}"),
        )
        .with_help("keep one of the two");
    Some((err, None))
}

struct PendingGraph {
    src: PathBuf,
    name: String,
    name_err: (usize, Range<usize>),
    description: Option<String>,
    max_in_flight_jobs: NonZeroUsize,
    max_pending_jobs: NonZeroUsize,
    tenants: Option<Vec<Arc<str>>>,
    deadline: Option<Duration>,
    budget: crate::job::Budget,
    input_schema: Option<serde_json::Value>,
    triggers: Vec<Arc<crate::triggers::TriggerModel>>,
    agents: Vec<PendingAgent>,
}

struct PendingAgent {
    name_span: Range<usize>,
    after: Vec<(String, Range<usize>)>,
    quotas: Vec<(String, Range<usize>)>,
    /// The upstream its kind calls, for an implicit quota when it names none.
    upstream: Option<String>,
    /// The credential it uses (see `KindSpec::credential`), whose quota it also draws on.
    credential: Option<String>,
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
    prices: BTreeMap<String, cascade_agents::llm::Price>,
    audit: crate::model::AuditSettings,
    auth: crate::auth::AuthSettings,
    mcp_servers: BTreeMap<String, cascade_agents::mcp::McpServerConfig>,
    tenants: BTreeMap<String, crate::model::TenantSettings>,
    /// `[credentials.NAME]`: an `auth` table and where it was declared.
    credentials: BTreeMap<String, (serde_json::Value, String)>,
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
            prices: BTreeMap::new(),
            credentials: BTreeMap::new(),
            audit: Default::default(),
            auth: Default::default(),
            mcp_servers: BTreeMap::new(),
            tenants: BTreeMap::new(),
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
        // A table defined twice: its keys are duplicates too, reported once with the table.
        let mut duplicate_tables: Vec<Range<usize>> = Vec::new();
        for e in errors {
            let span = e.span().unwrap_or(0..0);
            if e.message().contains("duplicate key") {
                if duplicate_tables.iter().any(|t| t.contains(&span.start)) {
                    continue;
                }
                if let Some((err, table)) = duplicate_key(src, span.clone()) {
                    self.errs.push(err);
                    duplicate_tables.extend(table);
                    continue;
                }
            }
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
}

mod credentials;
mod graphs;
mod quotas;
mod resolve;
mod server;
#[cfg(test)]
mod tests;
mod triggers;
