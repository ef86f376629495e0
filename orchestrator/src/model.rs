//! The validated model of a server's graphs and quotas. Everything here holds its invariants in
//! its types: indices are resolved, durations parsed, limits non-zero. The runtime is built only
//! from this model, never from raw TOML.

use std::collections::BTreeMap;
use std::num::{NonZeroU32, NonZeroUsize};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;

/// Everything a server runs: its graphs and the quotas they share.
#[derive(Clone, Debug, Default)]
pub struct ServerModel {
    pub graphs: Vec<Arc<GraphModel>>,
    pub quotas: BTreeMap<Arc<str>, Arc<QuotaModel>>,
    pub server: ServerSettings,
    pub telemetry: TelemetrySettings,
    /// `[prices."MODEL"]`: what an `llm` agent's tokens cost.
    pub prices: BTreeMap<String, cascade_agents::llm::Price>,
    /// `[audit]`: how the audit log signs its checkpoints.
    pub audit: AuditSettings,
    /// `[auth]`: who may call (no keys: nobody needs to prove it).
    pub auth: crate::auth::AuthSettings,
    /// `[mcp_servers.NAME]`: the MCP servers agents call (`kind = "mcp"`).
    pub mcp_servers: BTreeMap<String, cascade_agents::mcp::McpServerConfig>,
    /// `[tenants.NAME]`: what each tenant may submit (a tenant without a table: no limit of
    /// its own).
    pub tenants: BTreeMap<String, TenantSettings>,
}

/// `[tenants.NAME]`: admission per tenant, so that one tenant's storm of submissions leaves
/// room for the others' jobs.
#[derive(Clone, Debug, Default, serde::Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantSettings {
    /// Jobs of the tenant queued or running at once (parked ones, waiting for a decision or a
    /// budget, do not count); past it, submissions are RESOURCE_EXHAUSTED.
    pub max_pending_jobs: Option<NonZeroUsize>,
    /// Submissions a second, with a burst of one second's worth; past it, RESOURCE_EXHAUSTED
    /// with the time until the next is let in.
    pub submissions_per_second: Option<f64>,
}

/// `[audit]` of `cascade.toml`.
#[derive(Clone, Debug)]
pub struct AuditSettings {
    /// The checkpoint signing key (`cascade audit new-key`), a secret reference; without one
    /// records are kept and hashed but no checkpoint is signed.
    pub signing_key: Option<crate::secret::SecretRef>,
    /// How often a checkpoint is signed while records arrive.
    pub checkpoint_every: Duration,
}

impl Default for AuditSettings {
    fn default() -> Self {
        Self {
            signing_key: None,
            checkpoint_every: Duration::from_secs(60),
        }
    }
}

impl ServerModel {
    pub fn graph(&self, name: &str) -> Option<&Arc<GraphModel>> {
        self.graphs.iter().find(|g| &*g.name == name)
    }
}

/// Server settings from `cascade.toml` (`[server]`); command-line flags override them.
#[derive(Clone, Debug)]
pub struct ServerSettings {
    pub grpc_addr: Option<String>,
    pub http_addr: Option<String>,
    pub data_dir: Option<PathBuf>,
    /// Where jobs are kept (`store`): an SQLite file in `data_dir` (the default), memory, or a
    /// PostgreSQL database shared by several nodes.
    pub store: StoreSetting,
    /// The PostgreSQL password (a secret reference; never in the URL).
    pub store_password: Option<crate::secret::SecretRef>,
    /// How long a node's leases on its jobs last without a heartbeat (PostgreSQL store): a node
    /// silent for longer is dead and its jobs are taken over.
    pub lease: Option<Duration>,
    /// Where the cluster keeps every quota's state (`redis://` or `rediss://`, no password):
    /// one quota across every node.
    pub quota_backend: Option<String>,
    /// Its password (a secret reference).
    pub quota_backend_password: Option<crate::secret::SecretRef>,
    /// What a node does while the backend is unreachable.
    pub quota_fallback: crate::quota::shared::QuotaFallback,
    /// Pause propagation through the DAG (`false`: naive mode, for comparisons).
    pub cascade: bool,
    /// Verifies webhook signatures (a reference: `env:NAME` or `file:PATH`).
    pub webhook_secret: Option<crate::secret::SecretRef>,
    /// Signs completion callbacks.
    pub callback_secret: Option<crate::secret::SecretRef>,
    /// Largest job input accepted, in bytes.
    pub max_input_bytes: Option<usize>,
    /// How long finished jobs and idempotency keys are kept.
    pub retention: Option<Duration>,
    /// How long a graceful shutdown lets in-flight jobs finish.
    pub shutdown_grace: Option<Duration>,
    /// Events kept per job (repeats fold into one; the final event is always kept).
    pub max_events_per_job: Option<usize>,
    /// Changes that may wait for the durable store's writer before submissions are refused.
    pub store_queue_capacity: Option<usize>,
    /// How long one callback request may take.
    pub callback_timeout: Option<Duration>,
    /// Callbacks in flight at once to one destination (scheme, host and port).
    pub callback_concurrency_per_host: Option<usize>,
    /// `Host` names `/mcp` answers besides loopback (against DNS rebinding).
    pub mcp_allowed_hosts: Vec<String>,
    /// `[server.tls]`: TLS on both listeners.
    pub tls: Option<crate::tls::TlsSettings>,
    /// `[server.limits]`: what one caller may hold or send.
    pub limits: ServerLimits,
}

pub use crate::limits::ServerLimits;

/// `[server] store`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum StoreSetting {
    #[default]
    Sqlite,
    Memory,
    /// A `postgres://` URL without a password.
    Postgres(String),
}

/// Whether `url` may be a `quota_backend`: `redis://` or `rediss://`, a host, no password (it is
/// shown in logs and errors; the password goes in `quota_backend_password`).
pub fn check_redis_url(url: &str) -> Result<(), String> {
    let Some((scheme, rest)) = url.split_once("://") else {
        return Err("not a URL: it needs redis:// or rediss://".into());
    };
    if scheme != "redis" && scheme != "rediss" {
        return Err(format!(
            "unknown scheme {scheme:?}: it needs redis:// or rediss://"
        ));
    }
    let authority = rest.split('/').next().unwrap_or_default();
    if let Some((userinfo, _)) = authority.rsplit_once('@')
        && userinfo.contains(':')
    {
        return Err(
            "the URL holds a password: keep it in quota_backend_password (a secret reference) only"
                .into(),
        );
    }
    if authority.rsplit('@').next().unwrap_or_default().is_empty() {
        return Err("the URL names no host".into());
    }
    Ok(())
}

impl StoreSetting {
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "sqlite" => Ok(Self::Sqlite),
            "memory" => Ok(Self::Memory),
            url if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                let config: tokio_postgres::Config = url
                    .parse()
                    .map_err(|e| format!("not a PostgreSQL URL: {e}"))?;
                if config.get_password().is_some() {
                    // The URL is shown in logs and errors; the password must not be.
                    return Err(
                        "the URL holds a password: keep it in store_password (a secret reference) only"
                            .into(),
                    );
                }
                if config.get_dbname().is_none() {
                    return Err("the URL names no database (add /DATABASE)".into());
                }
                Ok(Self::Postgres(url.to_string()))
            }
            // Only the scheme is echoed: the rest may hold a password.
            other => Err(format!(
                "unknown store {:?}",
                other.split(':').next().unwrap_or_default()
            )),
        }
    }
}

impl Default for ServerSettings {
    fn default() -> Self {
        Self {
            grpc_addr: None,
            http_addr: None,
            data_dir: None,
            store: StoreSetting::Sqlite,
            store_password: None,
            lease: None,
            quota_backend: None,
            quota_backend_password: None,
            quota_fallback: Default::default(),
            cascade: true,
            webhook_secret: None,
            callback_secret: None,
            max_input_bytes: None,
            retention: None,
            shutdown_grace: None,
            max_events_per_job: None,
            store_queue_capacity: None,
            callback_timeout: None,
            callback_concurrency_per_host: None,
            mcp_allowed_hosts: Vec::new(),
            tls: None,
            limits: ServerLimits::default(),
        }
    }
}

/// Trace export from `cascade.toml` (`[telemetry]`): the job and step spans, sent over OTLP/gRPC
/// to a collector (OpenTelemetry Collector, Jaeger, Tempo, Honeycomb…). Off unless an endpoint is
/// set.
#[derive(Clone, Debug)]
pub struct TelemetrySettings {
    /// The collector's OTLP/gRPC endpoint, e.g. `http://127.0.0.1:4317`.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported resource.
    pub service_name: String,
    /// Share of jobs whose trace is exported, 0.0 to 1.0 (a job's steps follow its job).
    pub sample_ratio: f64,
    /// Which spans and events are exported, in `RUST_LOG` syntax; independent of the log level.
    pub filter: String,
    /// gRPC metadata sent with every export (API keys of hosted backends): secret references.
    pub headers: BTreeMap<String, crate::secret::SecretRef>,
    /// How long one export may take.
    pub timeout: Duration,
}

impl TelemetrySettings {
    /// Job spans (INFO) and step spans (DEBUG) of the engine and agents, nothing else.
    pub const DEFAULT_FILTER: &str = "cascade_orchestrator=debug,cascade_agents=debug";
}

impl Default for TelemetrySettings {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            service_name: "cascade".into(),
            sample_ratio: 1.0,
            filter: Self::DEFAULT_FILTER.into(),
            headers: BTreeMap::new(),
            timeout: Duration::from_secs(10),
        }
    }
}

/// One graph: named agents with dependency edges.
#[derive(Clone, Debug)]
pub struct GraphModel {
    pub name: Arc<str>,
    pub description: Option<String>,
    pub source: PathBuf,
    pub max_in_flight_jobs: NonZeroUsize,
    pub max_pending_jobs: NonZeroUsize,
    /// `[graph] tenants`: the only tenants whose jobs it takes (none: every tenant's).
    pub tenants: Option<Vec<Arc<str>>>,
    pub deadline: Option<Duration>,
    /// What each job may spend at most (a submission may lower it).
    pub budget: crate::job::Budget,
    /// The job input's JSON Schema, offered to MCP clients with `run_<graph>`.
    pub input_schema: Option<serde_json::Value>,
    /// `[[graph.triggers]]`: events that start its jobs.
    pub triggers: Vec<Arc<crate::triggers::TriggerModel>>,
    /// Agents in topological order: every agent comes after all of its dependencies.
    pub agents: Vec<AgentModel>,
}

impl GraphModel {
    pub fn agent(&self, name: &str) -> Option<&AgentModel> {
        self.agents.iter().find(|a| &*a.name == name)
    }

    /// Agents no other agent depends on; their outputs make the job's output.
    pub fn sinks(&self) -> impl Iterator<Item = &AgentModel> {
        self.agents.iter().filter(|a| a.dependents.is_empty())
    }
}

/// One node of a graph.
#[derive(Clone, Debug)]
pub struct AgentModel {
    /// Position in [`GraphModel::agents`].
    pub index: usize,
    pub name: Arc<str>,
    pub kind: String,
    pub description: Option<String>,
    /// Indices of the agents this one waits for.
    pub after: Vec<usize>,
    /// Indices of the agents that wait for this one.
    pub dependents: Vec<usize>,
    pub quotas: Vec<Arc<str>>,
    /// A tool-using agent's MCP servers, each with the quota its tool calls draw on (its
    /// upstream's implicit one, `upstream:mcp:<server>`); its model turns draw on `quotas`.
    pub tool_quotas: Vec<(Arc<str>, Arc<str>)>,
    pub retry: RetryPolicy,
    pub timeout: Duration,
    pub max_concurrency: NonZeroU32,
    pub on_upstream_pause: OnUpstreamPause,
    pub irreversible: bool,
    /// The graph leaves it to the agent whether a call is irreversible (its kind knows only at
    /// run time, as an MCP tool's annotations tell, and the graph does not say `irreversible`).
    pub asks_agent: bool,
    pub approval: Approval,
    /// With `approval = "auto"`: a person approves the steps whose input makes this hold,
    /// whether or not the agent is irreversible (autonomy tuned per workflow).
    pub approval_when: Option<Arc<crate::approval::Condition>>,
    /// A proposal nobody decided within this is rejected (never approved).
    pub approval_timeout: Option<Duration>,
    /// POSTed a Slack-compatible, signed notice of each new proposal.
    pub approval_webhook: Option<String>,
    pub restart: RestartPolicy,
    /// The kind's own fields, handed to the kind's constructor.
    pub fields: serde_json::Map<String, serde_json::Value>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum OnUpstreamPause {
    /// Finish steps whose inputs are already there, then idle.
    #[default]
    Drain,
    /// Start nothing more until the pause clears.
    Stop,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Approval {
    /// Approval when the agent is irreversible; `"none"` is its former name.
    #[default]
    #[serde(alias = "none")]
    Auto,
    Required,
    /// Never, even when irreversible: the graph's author runs it unapproved knowingly.
    Never,
}

impl AgentModel {
    /// Whether a model calls tools in this agent's steps: the engine runs its loop, one
    /// journaled sub-step per turn and per tool call.
    pub fn uses_tools(&self) -> bool {
        self.kind == "llm"
            && self
                .fields
                .get("tools")
                .and_then(serde_json::Value::as_array)
                .is_some_and(|t| !t.is_empty())
    }

    /// Whether this agent's steps may need a person's approval (all of them, or those its
    /// `approval_when` picks).
    pub fn may_need_approval(&self) -> bool {
        match self.approval {
            Approval::Never => false,
            Approval::Required => true,
            Approval::Auto => self.irreversible || self.asks_agent || self.approval_when.is_some(),
        }
    }
}

impl Approval {
    /// Whether an agent with this setting needs a person's approval before it acts.
    pub fn needed(self, irreversible: bool) -> bool {
        match self {
            Self::Auto => irreversible,
            Self::Required => true,
            Self::Never => false,
        }
    }
}

/// Per-agent retry policy: exponential backoff with full jitter.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RetryPolicy {
    pub max_attempts: NonZeroU32,
    pub initial_delay: Duration,
    pub max_delay: Duration,
    pub multiplier: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            max_attempts: NonZeroU32::new(3).expect("non-zero"),
            initial_delay: Duration::from_millis(100),
            max_delay: Duration::from_secs(30),
            multiplier: 2.0,
        }
    }
}

/// How often an agent's actor may be restarted before the agent is marked failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RestartPolicy {
    pub max_restarts: u32,
    pub window: Duration,
}

impl Default for RestartPolicy {
    fn default() -> Self {
        Self {
            max_restarts: 10,
            window: Duration::from_secs(60),
        }
    }
}

pub use cascade_agents::Rate;

/// A named budget shared by every agent that names it, across all graphs of a server.
#[derive(Clone, Debug, PartialEq)]
pub struct QuotaModel {
    pub name: Arc<str>,
    pub requests: Option<Rate>,
    pub tokens: Option<Rate>,
    /// Dollars spent per window, in micro-dollars (`cost_usd_per_hour|day`).
    pub cost: Option<Rate>,
    /// How many requests may arrive back to back; defaults to a tenth of a second's worth.
    pub burst: Option<NonZeroU32>,
    pub max_concurrency: Option<NonZeroU32>,
    pub circuit_breaker: Option<CircuitBreakerSpec>,
    /// A quota that can serve the next call within this long paces it; beyond it, it is exhausted.
    pub pause_threshold: Duration,
    /// Where it was declared, for messages.
    pub declared_at: String,
    /// Not declared: the quota of an upstream that agents call without naming a quota
    /// (`upstream:<name>`). It starts with no limit and learns the upstream's from its refusals.
    pub implicit: bool,
    /// It mirrors the limits its upstream's answers state (rate-limit headers), under its own:
    /// always for an implicit quota, `learn_from_upstream = true` for a declared one.
    pub learn_from_upstream: bool,
    /// The quota of a credential (`credential:<name>`), which its agents draw on beside their
    /// upstream's: no limit, exhausted while the credential cannot get a token or is refused.
    pub credential: bool,
    /// `tenant_share = { acme = 0.5 }`: the most of each limit a tenant's calls may hold, by
    /// tenant, sorted (a tenant not named may use what the others leave).
    pub tenant_share: Vec<(Arc<str>, f64)>,
}

impl QuotaModel {
    /// The prefix of implicit quotas' names (declared names cannot contain `:`).
    pub const IMPLICIT_PREFIX: &str = "upstream:";

    /// The implicit quota of `upstream`, first seen on `agent` at `declared_at`: no limits, the
    /// default circuit breaker, the default pause threshold.
    pub fn implicit(upstream: &str, declared_at: String, pause_threshold: Duration) -> Self {
        Self {
            name: format!("{}{upstream}", Self::IMPLICIT_PREFIX).into(),
            requests: None,
            tokens: None,
            cost: None,
            burst: None,
            max_concurrency: None,
            circuit_breaker: Some(CircuitBreakerSpec::default()),
            pause_threshold,
            declared_at,
            implicit: true,
            learn_from_upstream: true,
            credential: false,
            tenant_share: Vec::new(),
        }
    }

    /// The share of this quota that `tenant` may hold, `share` of each of its limits (at least
    /// one of each): the limiter a tenant's calls pass beside the whole quota's.
    pub fn share_for(&self, tenant: &str, share: f64) -> Self {
        let scale_rate = |r: &Rate| Rate {
            amount: std::num::NonZeroU64::new(((r.amount.get() as f64) * share).floor() as u64)
                .unwrap_or(std::num::NonZeroU64::MIN),
            period: r.period,
        };
        let scale = |n: u32| {
            std::num::NonZeroU32::new(((n as f64) * share).floor() as u32)
                .unwrap_or(std::num::NonZeroU32::MIN)
        };
        Self {
            name: format!("{}[tenant={tenant}]", self.name).into(),
            requests: self.requests.as_ref().map(scale_rate),
            tokens: self.tokens.as_ref().map(scale_rate),
            cost: self.cost.as_ref().map(scale_rate),
            burst: self.burst.map(|b| scale(b.get())),
            max_concurrency: self.max_concurrency.map(|c| scale(c.get())),
            circuit_breaker: None,
            pause_threshold: self.pause_threshold,
            declared_at: self.declared_at.clone(),
            implicit: false,
            learn_from_upstream: false,
            credential: false,
            tenant_share: Vec::new(),
        }
    }

    /// The prefix of credentials' quotas.
    pub const CREDENTIAL_PREFIX: &str = "credential:";

    /// The quota of credential `name`, first used by an agent at `declared_at`.
    pub fn credential(name: &str, declared_at: String, pause_threshold: Duration) -> Self {
        Self {
            name: format!("{}{name}", Self::CREDENTIAL_PREFIX).into(),
            circuit_breaker: None,
            implicit: false,
            learn_from_upstream: false,
            credential: true,
            ..Self::implicit(name, declared_at, pause_threshold)
        }
    }

    /// Whether it mirrors its upstream's stated limits.
    pub fn learns(&self) -> bool {
        self.implicit || self.learn_from_upstream
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct CircuitBreakerSpec {
    pub failure_ratio: f64,
    pub min_calls: NonZeroU32,
    pub window: Duration,
    pub open_for: Duration,
}

impl Default for CircuitBreakerSpec {
    /// The breaker of implicit upstream quotas: half the calls of the last 30 s failed, over at
    /// least 20 calls, opens it for 15 s.
    fn default() -> Self {
        Self {
            failure_ratio: 0.5,
            min_calls: NonZeroU32::new(20).expect("non-zero"),
            window: Duration::from_secs(30),
            open_for: Duration::from_secs(15),
        }
    }
}
