//! MCP servers and `kind = "mcp"`: a tool call on a Model Context Protocol server.
//!
//! ```toml
//! # cascade.toml
//! [mcp_servers.everything]
//! command = "npx"
//! args = ["@modelcontextprotocol/server-everything", "stdio"]
//! env = { API_TOKEN = "env:EVERYTHING_TOKEN" }
//!
//! [mcp_servers.crm]
//! url = "https://crm.example.com/mcp"          # streamable HTTP
//! auth = { bearer = "env:CRM_MCP_TOKEN" }
//!
//! [mcp_servers.erp]
//! url = "https://erp.example.com/mcp"
//! auth = { oauth2 = { token_url = "https://login.example.com/oauth2/token", client_id = "cascade",
//!                     client_secret = "env:ERP_CLIENT_SECRET", scopes = ["erp.tools"] } }
//!
//! # a graph file
//! [agents.lookup]
//! kind = "mcp"
//! server = "crm"
//! tool = "lookup_customer"
//! arguments = { email = "{{ input.email }}" }
//! ```
//!
//! A server is declared once and shared: one process (stdio) or one session (HTTP) serves every
//! agent that names it. It is connected when first needed (and at start, to read its tools), and
//! again after it dies, with a backoff of 1 s doubling to 30 s (back to 1 s once a start has
//! stayed up 30 s); meanwhile calls fail as transient, which the server's implicit quota
//! (`upstream:mcp:<name>`) counts towards its circuit breaker. A stdio server's process is
//! watched: when it exits, its exit status is logged and it is started again after the backoff,
//! whether or not a call waits for it (see [`supervisor`]). A stdio server's stderr goes to
//! Cascade's log, a line at a time, at warn. An OAuth2 credential's token is fetched when
//! the server is connected and renewed before it expires (the connection is made again with the
//! new one) or after the server refuses it.
//!
//! A tool call is irreversible unless the tool says `readOnlyHint = true` or
//! `destructiveHint = false` (the MCP specification's defaults): the engine asks a person before
//! it runs, unless the agent says `approval = "never"` (or `irreversible = false`).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Duration;

use rmcp::ServiceExt;
use rmcp::model::{CallToolRequestParams, CallToolResult, Tool};
use rmcp::service::{RoleClient, RunningService};
use serde::Deserialize;
use serde_json::{Map, Value};
use tokio::time::Instant;

mod supervisor;
use supervisor::RestartBackoff;

use crate::http::oauth2::Credential;
use crate::secret::{SecretCell, SecretRef};
use crate::template::JsonTemplate;
use crate::{
    Agent, AgentError, AgentOutput, AgentSpec, CallContext, FieldError, KindSpec, StepInput, Usage,
};

pub const KIND: KindSpec = KindSpec {
    name: "mcp",
    fields: &["server", "tool", "arguments"],
    required: &["server", "tool"],
    build,
    upstream: upstream_name,
    credential: crate::registry::no_credential,
    may_be_irreversible: true,
};

/// The `_meta` key of a tool call's idempotency key.
pub const IDEMPOTENCY_META_KEY: &str = "io.cascade/idempotency_key";

/// How long connecting (spawning, initializing, listing tools) may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(20);

/// `[mcp_servers.NAME]`: how to reach a server. Exactly one of `command` (stdio) and `url`
/// (streamable HTTP).
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct McpServerConfig {
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub args: Vec<String>,
    /// The server process's environment (nothing else of Cascade's is passed but `PATH`,
    /// `HOME`, `LANG`): literals, or secret references (`env:NAME`, `file:PATH`).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    #[serde(default)]
    pub url: Option<String>,
    #[serde(default)]
    pub auth: Option<McpAuth>,
}

/// How an HTTP server is authenticated, as the `http` kind's calls are: a bearer token, an API
/// key header, basic auth (each value a secret reference), or an OAuth2 credential (client
/// credentials, or a refresh token), whose token is fetched before it expires and renewed after
/// a refusal. (`auth = "NAME"`, a `[credentials.NAME]` of `cascade.toml`, is resolved to one of
/// these when the file is read.)
#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(
    untagged,
    expecting = "auth must be { bearer = \"env:NAME\" }, { api_key = { header = \"X-API-Key\", value = \"env:NAME\" } }, { basic = { username = \"…\", password = \"env:NAME\" } }, { oauth2 = { token_url, client_id, client_secret = \"env:NAME\", scopes = [\"…\"] } } or the name of a [credentials.NAME]"
)]
pub enum McpAuth {
    OAuth2(OAuth2Auth),
    Bearer(BearerAuth),
    ApiKey(ApiKeyAuth),
    Basic(BasicAuth),
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyAuth {
    pub api_key: ApiKeyHeader,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ApiKeyHeader {
    pub header: String,
    pub value: SecretRef,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BasicAuth {
    pub basic: BasicCredentials,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BasicCredentials {
    pub username: String,
    pub password: SecretRef,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OAuth2Auth {
    pub oauth2: crate::http::oauth2::OAuth2Config,
}

#[derive(Clone, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BearerAuth {
    pub bearer: SecretRef,
}

impl McpServerConfig {
    /// What is wrong with it, as (field, message).
    pub fn check(&self) -> Result<(), (&'static str, String)> {
        match (&self.command, &self.url) {
            (Some(_), Some(_)) => Err((
                "url",
                "set command (a server Cascade starts, over stdio) or url (streamable HTTP), not both".into(),
            )),
            (None, None) => Err((
                "command",
                "set command = \"…\" (with args) for a server Cascade starts, or url = \"https://…/mcp\" for one it reaches".into(),
            )),
            (None, Some(url)) => {
                let u = reqwest::Url::parse(url).map_err(|e| ("url", format!("not a URL: {e}")))?;
                if !matches!(u.scheme(), "http" | "https") {
                    return Err(("url", "an http or https URL".into()));
                }
                if !self.args.is_empty() || !self.env.is_empty() || self.cwd.is_some() {
                    return Err(("args", "args, env and cwd are for a server Cascade starts (command)".into()));
                }
                let load = |r: &SecretRef| SecretCell::load(r.clone()).map(drop).map_err(|e| ("auth", e));
                match &self.auth {
                    Some(McpAuth::Bearer(b)) => load(&b.bearer)?,
                    Some(McpAuth::ApiKey(k)) => {
                        reqwest::header::HeaderName::from_bytes(k.api_key.header.as_bytes())
                            .map_err(|_| ("auth", format!("{:?} is not a header name", k.api_key.header)))?;
                        load(&k.api_key.value)?
                    }
                    Some(McpAuth::Basic(b)) => load(&b.basic.password)?,
                    // Checked when its credential is made (`McpServers::declare`).
                    Some(McpAuth::OAuth2(_)) | None => {}
                }
                Ok(())
            }
            (Some(_), None) => {
                if self.auth.is_some() {
                    return Err(("auth", "auth is for a server reached by url".into()));
                }
                for v in self.env.values() {
                    // A value that is a reference must be one that resolves; a literal stays one.
                    if let Some(r) = SecretRef::parse_reference(v) {
                        r.and_then(|r| SecretCell::load(r).map(drop))
                            .map_err(|e| ("env", e))?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// Every declared MCP server of a registry, shared by its agents (one process or session each).
#[derive(Default)]
pub struct McpServers {
    declared: RwLock<BTreeMap<String, McpServerConfig>>,
    running: Mutex<HashMap<String, Arc<McpServer>>>,
    /// The OAuth2 credential of each server that has one.
    credentials: RwLock<HashMap<String, Arc<Credential>>>,
}

impl McpServers {
    /// Declare the servers (the server file's `[mcp_servers]`), with the OAuth2 credentials of
    /// those that have one made from `resources` (shared with the `http` kind's, and so with
    /// their token caches). Returns the servers whose credential could not be made, and why.
    pub fn declare(
        &self,
        servers: impl IntoIterator<Item = (String, McpServerConfig)>,
        resources: &crate::Resources,
    ) -> Vec<(String, String)> {
        let mut errors = Vec::new();
        let servers: Vec<(String, McpServerConfig)> = servers.into_iter().collect();
        for (name, c) in &servers {
            if let Some(McpAuth::OAuth2(OAuth2Auth { oauth2 })) = &c.auth {
                let mut config = oauth2.clone();
                config.name.get_or_insert_with(|| format!("mcp:{name}"));
                match resources
                    .get::<crate::http::oauth2::Credentials>()
                    .get(&config, &resources.get::<crate::http::oauth2::Vault>())
                {
                    Ok(credential) => {
                        self.credentials
                            .write()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(name.clone(), credential);
                    }
                    Err(e) => errors.push((name.clone(), e)),
                }
            }
        }
        let mut d = self.declared.write().unwrap_or_else(|p| p.into_inner());
        d.extend(servers);
        errors
    }

    pub fn names(&self) -> Vec<String> {
        let d = self.declared.read().unwrap_or_else(|p| p.into_inner());
        d.keys().cloned().collect()
    }

    /// Server `name`, if declared (not connected yet: [`McpServer::tools`] or a call does that).
    pub fn get(&self, name: &str) -> Option<Arc<McpServer>> {
        let config = {
            let d = self.declared.read().unwrap_or_else(|p| p.into_inner());
            d.get(name).cloned()?
        };
        let credential = self
            .credentials
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(name)
            .cloned();
        let mut running = self.running.lock().unwrap_or_else(|p| p.into_inner());
        let server = running.entry(name.to_string()).or_insert_with(|| {
            Arc::new_cyclic(|me| McpServer::new(name, config.clone(), credential, me.clone()))
        });
        Some(server.clone())
    }
}

type Client = RunningService<RoleClient, ()>;

/// A live connection to a server.
struct Connection {
    client: Arc<Client>,
    /// Its start number (see [`McpServer::starts`]).
    start: u64,
    /// A stdio server's watcher kills its process when this is dropped (the connection was
    /// dropped or replaced, or the server is gone).
    _stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// One MCP server: its connection (made on demand, and made again after it dies: by the next
/// call, or for a stdio server by the watcher of its process), its tools as last listed, and its
/// restart backoff.
pub struct McpServer {
    /// Itself, for the watcher of its process.
    me: Weak<McpServer>,
    name: String,
    config: McpServerConfig,
    /// With `auth = { oauth2 = … }`: the credential, and the token the connection was made
    /// with (a renewed token makes a new connection; a refused one is renewed first).
    credential: Option<Arc<Credential>>,
    connected_token: Mutex<Option<String>>,
    token_refused: std::sync::atomic::AtomicBool,
    /// Its basic auth header's value in the process's redactor.
    secret_source: u64,
    connection: RwLock<Option<Connection>>,
    /// One connection attempt at a time.
    connecting: tokio::sync::Mutex<()>,
    tools: RwLock<Option<Arc<Vec<Tool>>>>,
    /// When it may be started again (a server that keeps failing waits longer each time).
    backoff: Mutex<RestartBackoff>,
    /// Connections made so far (the first start included).
    starts: std::sync::atomic::AtomicU64,
    /// The process of a stdio server, while it runs (0: none).
    pid: std::sync::atomic::AtomicU32,
}

impl McpServer {
    fn new(
        name: &str,
        config: McpServerConfig,
        credential: Option<Arc<Credential>>,
        me: Weak<McpServer>,
    ) -> Self {
        Self {
            me,
            name: name.to_string(),
            config,
            credential,
            connected_token: Mutex::new(None),
            token_refused: std::sync::atomic::AtomicBool::new(false),
            secret_source: crate::secret::Redactor::source(),
            connection: RwLock::new(None),
            connecting: tokio::sync::Mutex::new(()),
            tools: RwLock::new(None),
            backoff: Mutex::new(RestartBackoff::default()),
            starts: std::sync::atomic::AtomicU64::new(0),
            pid: std::sync::atomic::AtomicU32::new(0),
        }
    }

    /// The process of a stdio server, if one runs.
    pub fn pid(&self) -> Option<u32> {
        match self.pid.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            pid => Some(pid),
        }
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// How many times it was started (or connected) so far.
    pub fn starts(&self) -> u64 {
        self.starts.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The tools as last listed (none before the first connection).
    pub fn cached_tools(&self) -> Option<Arc<Vec<Tool>>> {
        self.tools.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The tools, connecting first if it is not connected.
    pub async fn tools(&self) -> Result<Arc<Vec<Tool>>, AgentError> {
        self.client().await?;
        self.cached_tools().ok_or_else(|| {
            AgentError::transient(format!("MCP server {:?} listed no tools", self.name))
        })
    }

    fn current(&self) -> Option<Arc<Client>> {
        let c = self.connection.read().unwrap_or_else(|p| p.into_inner());
        c.as_ref()
            .map(|c| &c.client)
            .filter(|c| !c.is_closed())
            .cloned()
    }

    /// How long a start must still wait (none: it may start now).
    fn backoff_wait(&self) -> Option<Duration> {
        let b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        b.wait(Instant::now())
    }

    /// A start failed or the server died: the wait before the next start.
    fn backoff_failed(&self) -> Duration {
        let mut b = self.backoff.lock().unwrap_or_else(|p| p.into_inner());
        b.failed(Instant::now())
    }

    /// The live connection, made (again) if there is none and the backoff allows. With an
    /// OAuth2 credential, a connection made with a token the credential has since renewed (it
    /// does so before the token expires) is made again with the new one: rmcp's HTTP transport
    /// sends one fixed `Authorization` header per connection.
    async fn client(&self) -> Result<Arc<Client>, AgentError> {
        if let Some(cred) = &self.credential
            && self.current().is_some()
        {
            let token = cred.token().await?;
            let stale = self
                .connected_token
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_deref()
                != Some(token.as_str());
            if stale {
                tracing::info!(server = %self.name, "OAuth2 token renewed; connecting again with it");
                self.drop_connection(None);
            }
        }
        if let Some(c) = self.current() {
            return Ok(c);
        }
        let _one = self.connecting.lock().await;
        if let Some(c) = self.current() {
            return Ok(c);
        }
        // A stdio server's connection that closed (its process died) and that the watcher has
        // not forgotten yet: a failure all the same, which the backoff counts before a new
        // start. An HTTP session the server closed (an idle one, say) is made again at once.
        if self
            .lost(|c| c.client.is_closed() && c._stop.is_some())
            .is_none()
        {
            self.drop_connection(None);
        }
        if let Some(wait) = self.backoff_wait() {
            return Err(AgentError::transient(format!(
                "MCP server {:?} is down; it is started again in {} ms",
                self.name,
                wait.as_millis()
            )));
        }
        match tokio::time::timeout(CONNECT_TIMEOUT, self.connect()).await {
            Ok(Ok((client, tools, child))) => {
                // Its tools were listed: the server took the token.
                if let Some(c) = &self.credential {
                    c.accepted();
                }
                let client = Arc::new(client);
                *self.tools.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(tools));
                self.backoff
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .started(Instant::now());
                let start = self
                    .starts
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    + 1;
                // The connection is in place before its watcher runs, so that a process that
                // has already exited is forgotten by it.
                let (stop, stopped) = tokio::sync::oneshot::channel();
                self.pid.store(
                    child
                        .as_ref()
                        .and_then(tokio::process::Child::id)
                        .unwrap_or(0),
                    std::sync::atomic::Ordering::Relaxed,
                );
                *self.connection.write().unwrap_or_else(|p| p.into_inner()) = Some(Connection {
                    client: client.clone(),
                    start,
                    _stop: child.is_some().then_some(stop),
                });
                if let Some(child) = child {
                    supervisor::watch(self.me.clone(), start, child, stopped);
                }
                tracing::info!(server = %self.name, pid = ?self.pid(), "MCP server connected");
                Ok(client)
            }
            outcome => {
                let why = match outcome {
                    Ok(Err(e)) => e,
                    _ => format!("no answer within {} s", CONNECT_TIMEOUT.as_secs()),
                };
                let delay = self.backoff_failed();
                tracing::warn!(server = %self.name, error = %why, retry_in_ms = delay.as_millis() as u64, "MCP server could not be started");
                Err(AgentError::transient(format!(
                    "MCP server {:?} could not be started: {why}",
                    self.name
                )))
            }
        }
    }

    /// Connect: spawn the process of a stdio server (returned, for its watcher) or reach the
    /// URL, initialize, and list the tools.
    async fn connect(&self) -> Result<(Client, Vec<Tool>, Option<tokio::process::Child>), String> {
        let mut process = None;
        let client = match (&self.config.command, &self.config.url) {
            (Some(command), _) => {
                let mut cmd = tokio::process::Command::new(command);
                cmd.args(&self.config.args).env_clear();
                for name in ["PATH", "HOME", "LANG"] {
                    if let Some(v) = std::env::var_os(name) {
                        cmd.env(name, v);
                    }
                }
                for (k, v) in &self.config.env {
                    let value = match SecretRef::parse_reference(v) {
                        Some(r) => {
                            let cell = Arc::new(
                                r.and_then(SecretCell::load)
                                    .map_err(|e| format!("env {k}: {e}"))?,
                            );
                            cell.current()
                                .await
                                .map_err(|e| format!("env {k}: {}", e.message))?
                        }
                        None => v.clone(),
                    };
                    cmd.env(k, value);
                }
                if let Some(dir) = &self.config.cwd {
                    cmd.current_dir(dir);
                }
                // Spawned here rather than by rmcp's child-process transport, which keeps the
                // process to itself: the watcher waits on it for its exit status. Dropped before
                // it is handed over (a failed start), it is killed.
                cmd.stdin(Stdio::piped())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .kill_on_drop(true);
                let mut child = cmd
                    .spawn()
                    .map_err(|e| format!("cannot start {command:?}: {e}"))?;
                let (Some(stdin), Some(stdout)) = (child.stdin.take(), child.stdout.take()) else {
                    return Err("the process has no stdin or stdout".into());
                };
                if let Some(stderr) = child.stderr.take() {
                    let name = self.name.clone();
                    tokio::spawn(async move {
                        use tokio::io::AsyncBufReadExt;
                        let mut lines = tokio::io::BufReader::new(stderr).lines();
                        // At warn, the default level: a server writes to stderr what it has
                        // to say besides the protocol, its errors and why it died among them.
                        while let Ok(Some(line)) = lines.next_line().await {
                            tracing::warn!(server = %name, "stderr: {line}");
                        }
                    });
                }
                let client = ().serve((stdout, stdin)).await.map_err(|e| e.to_string())?;
                process = Some(child);
                client
            }
            (None, Some(url)) => {
                use rmcp::transport::streamable_http_client::StreamableHttpClientTransportConfig;
                let mut config = StreamableHttpClientTransportConfig::with_uri(url.as_str());
                match (&self.config.auth, &self.credential) {
                    (Some(McpAuth::Bearer(BearerAuth { bearer })), _) => {
                        let token = SecretCell::load(bearer.clone())?;
                        config = config.auth_header(token.get().map_err(|e| e.message)?);
                    }
                    (Some(McpAuth::ApiKey(ApiKeyAuth { api_key })), _) => {
                        let value = SecretCell::load(api_key.value.clone())?
                            .get()
                            .map_err(|e| e.message)?;
                        let name =
                            reqwest::header::HeaderName::from_bytes(api_key.header.as_bytes())
                                .map_err(|e| e.to_string())?;
                        let mut value = reqwest::header::HeaderValue::from_str(&value)
                            .map_err(|_| "the API key is not a valid header value".to_string())?;
                        value.set_sensitive(true);
                        config = config.custom_headers([(name, value)].into_iter().collect());
                    }
                    (Some(McpAuth::Basic(BasicAuth { basic })), _) => {
                        use base64::Engine;
                        let password = SecretCell::load(basic.password.clone())?
                            .get()
                            .map_err(|e| e.message)?;
                        let encoded = base64::engine::general_purpose::STANDARD
                            .encode(format!("{}:{password}", basic.username));
                        // Known to the redactor, as the http kind's basic header is.
                        crate::secret::redactor()
                            .register(self.secret_source, vec![encoded.clone()]);
                        let mut value =
                            reqwest::header::HeaderValue::from_str(&format!("Basic {encoded}"))
                                .map_err(|_| {
                                    "the basic credentials are not a valid header value".to_string()
                                })?;
                        value.set_sensitive(true);
                        config = config.custom_headers(
                            [(reqwest::header::AUTHORIZATION, value)]
                                .into_iter()
                                .collect(),
                        );
                    }
                    (Some(McpAuth::OAuth2(_)), Some(cred)) => {
                        let refused = self
                            .token_refused
                            .swap(false, std::sync::atomic::Ordering::Relaxed);
                        let last = self
                            .connected_token
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .clone();
                        let token = match (refused, last) {
                            (true, Some(last)) => cred.refresh_after_refusal(&last).await,
                            _ => cred.token().await,
                        }
                        .map_err(|e| e.message)?;
                        *self
                            .connected_token
                            .lock()
                            .unwrap_or_else(|p| p.into_inner()) = Some(token.clone());
                        config = config.auth_header(token);
                    }
                    (Some(McpAuth::OAuth2(_)), None) => {
                        return Err("its OAuth2 credential was not made (declare the server with its registry's resources)".into());
                    }
                    (None, _) => {}
                }
                let transport = rmcp::transport::StreamableHttpClientTransport::from_config(config);
                ().serve(transport).await.map_err(|e| {
                    let e = e.to_string();
                    self.note_refusal(&e);
                    e
                })?
            }
            (None, None) => return Err("neither command nor url".into()),
        };
        let tools = client
            .list_all_tools()
            .await
            .map_err(|e| format!("listing its tools failed: {e}"))?;
        Ok((client, tools, process))
    }

    /// Call `tool` with `arguments`, the call's idempotency key in the request's `_meta` (as
    /// `io.cascade/idempotency_key`, for a server that deduplicates retried calls). A transport
    /// failure or a dead server is transient (the server is started again for the next call);
    /// the tool's own error is the caller's to classify.
    pub async fn call(
        &self,
        tool: &str,
        arguments: Map<String, Value>,
        idempotency_key: &str,
    ) -> Result<CallToolResult, AgentError> {
        let client = self.client().await?;
        let mut params = CallToolRequestParams::new(tool.to_string()).with_arguments(arguments);
        let mut meta = Map::new();
        meta.insert(
            IDEMPOTENCY_META_KEY.into(),
            Value::String(idempotency_key.to_string()),
        );
        params.meta = Some(rmcp::model::RequestMetaObject(meta.into()));
        client.call_tool(params).await.map_err(|e| {
            // A protocol error is the server's answer; anything else (a closed or broken
            // transport, a cancelled service) means the connection is gone, whether or not the
            // service noticed yet: forget it (which ends its process) and start again after the
            // backoff.
            if !matches!(e, rmcp::ServiceError::McpError(_)) {
                tracing::warn!(server = %self.name, error = %e, "MCP server connection lost; it is started again after its backoff");
                if self.note_refusal(&e.to_string()) {
                    // Its token is renewed and the connection made again at once.
                    self.drop_connection(Some(&client));
                } else {
                    self.lost(|c| Arc::ptr_eq(&c.client, &client));
                }
            }
            AgentError::transient(format!("MCP server {:?}: {e}", self.name))
        })
    }
}

impl McpServer {
    /// Forget the connection (`only` that one, if given): the next call makes a new one.
    fn drop_connection(&self, only: Option<&Arc<Client>>) {
        let mut c = self.connection.write().unwrap_or_else(|p| p.into_inner());
        if only.is_none_or(|only| c.as_ref().is_some_and(|c| Arc::ptr_eq(&c.client, only))) {
            *c = None;
            self.pid.store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The connection `which` picks (if it is the one in place) is gone: forget it (a stdio
    /// server's process is killed, if it still runs) and count a failure in the backoff; the
    /// wait before the next start. None when it was forgotten already: each loss is counted
    /// once, whoever (a call, the watcher of the process) notices it first.
    fn lost(&self, which: impl Fn(&Connection) -> bool) -> Option<Duration> {
        let mut c = self.connection.write().unwrap_or_else(|p| p.into_inner());
        if !c.as_ref().is_some_and(which) {
            return None;
        }
        *c = None;
        self.pid.store(0, std::sync::atomic::Ordering::Relaxed);
        Some(self.backoff_failed())
    }

    /// A failure that says the server refused the token: the next connection renews it first.
    /// Whether it was one.
    fn note_refusal(&self, error: &str) -> bool {
        let refused =
            self.credential.is_some() && (error.contains("401") || error.contains("Unauthorized"));
        if refused {
            self.token_refused
                .store(true, std::sync::atomic::Ordering::Relaxed);
        }
        refused
    }
}

/// Check an `mcp` agent's fields (`server`, `tool`, `arguments`) against its server's tools as
/// listed: the tool exists (else the error lists the server's tools), and arguments that are
/// fixed (no template in them) fit the tool's `inputSchema`. `Ok` when the server's tools are
/// not known (it was not reached).
pub fn check_agent(servers: &McpServers, fields: &Map<String, Value>) -> Result<(), String> {
    let (Some(server), Some(tool)) = (
        fields.get("server").and_then(Value::as_str),
        fields.get("tool").and_then(Value::as_str),
    ) else {
        return Ok(());
    };
    let Some(tools) = servers.get(server).and_then(|s| s.cached_tools()) else {
        return Ok(());
    };
    let Some(t) = tools.iter().find(|t| t.name == tool) else {
        let mut names: Vec<&str> = tools.iter().map(|t| &*t.name).collect();
        names.sort_unstable();
        return Err(format!(
            "MCP server {server:?} has no tool {tool:?}; its tools: {}",
            names.join(", ")
        ));
    };
    let arguments = Value::Object(
        fields
            .get("arguments")
            .and_then(Value::as_object)
            .cloned()
            .unwrap_or_default(),
    );
    if arguments.to_string().contains("{{") {
        // Rendered per step: checked by the server when it is called.
        return Ok(());
    }
    let schema = Value::Object((*t.input_schema).clone());
    let validator = jsonschema::validator_for(&schema)
        .map_err(|e| format!("tool {server}.{tool}'s inputSchema is not a JSON Schema: {e}"))?;
    match crate::llm::schema_violations(&validator, &arguments) {
        None => Ok(()),
        Some(v) => Err(format!(
            "the arguments do not fit tool {server}.{tool}'s inputSchema: {v}"
        )),
    }
}

/// Whether a tool with these annotations may act irreversibly: unless it says it is read-only
/// or not destructive (the specification's defaults: not read-only, destructive).
pub fn irreversible(tool: &Tool) -> bool {
    let a = tool.annotations.as_ref();
    let read_only = a.and_then(|a| a.read_only_hint).unwrap_or(false);
    let destructive = a.and_then(|a| a.destructive_hint).unwrap_or(true);
    !read_only && destructive
}

/// A tool result as a step output: its structured content where present, else its text (one
/// block: the text; several: the list of their texts); `isError` is the caller's to classify.
pub fn result_value(result: &CallToolResult) -> Value {
    if let Some(v) = &result.structured_content {
        return v.clone();
    }
    let texts: Vec<&str> = result
        .content
        .iter()
        .filter_map(|c| c.as_text().map(|t| t.text.as_str()))
        .collect();
    match texts.as_slice() {
        [one] => Value::String(one.to_string()),
        many => Value::Array(many.iter().map(|t| Value::String(t.to_string())).collect()),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    server: String,
    tool: String,
    #[serde(default)]
    arguments: Option<Map<String, Value>>,
}

fn upstream_name(spec: &AgentSpec<'_>) -> Option<String> {
    spec.fields
        .get("server")
        .and_then(Value::as_str)
        .map(|s| format!("mcp:{s}"))
}

fn build(spec: &AgentSpec<'_>) -> Result<Arc<dyn Agent>, FieldError> {
    let c: Config = spec.parse()?;
    let servers = spec.resources.get::<McpServers>();
    let server = servers.get(&c.server).ok_or_else(|| {
        let declared = servers.names();
        FieldError::new(
            "server",
            if declared.is_empty() {
                format!(
                    "no MCP server {:?} is declared; declare it in cascade.toml ([mcp_servers.{}] command = \"…\" or url = \"…\") and pass --config",
                    c.server, c.server
                )
            } else {
                format!(
                    "no MCP server {:?} is declared; the declared ones: {}",
                    c.server,
                    declared.join(", ")
                )
            },
        )
    })?;
    let arguments = JsonTemplate::compile(
        &Value::Object(c.arguments.unwrap_or_default()),
        &["arguments"],
    )?;
    Ok(Arc::new(McpAgent {
        server,
        tool: c.tool,
        arguments,
    }))
}

struct McpAgent {
    server: Arc<McpServer>,
    tool: String,
    arguments: JsonTemplate,
}

#[async_trait::async_trait]
impl Agent for McpAgent {
    async fn call(&self, ctx: &CallContext, input: &StepInput) -> Result<AgentOutput, AgentError> {
        let prepared = self.prepare(ctx, input)?;
        self.execute(ctx, &prepared).await
    }

    /// `{"server", "tool", "arguments"}`: the exact tool call.
    fn prepare(&self, ctx: &CallContext, input: &StepInput) -> Result<Value, AgentError> {
        let arguments = self.arguments.render(ctx, input)?;
        Ok(
            serde_json::json!({"server": self.server.name(), "tool": self.tool, "arguments": arguments}),
        )
    }

    async fn execute(
        &self,
        ctx: &CallContext,
        prepared: &Value,
    ) -> Result<AgentOutput, AgentError> {
        if prepared["server"].as_str() != Some(self.server.name())
            || prepared["tool"].as_str() != Some(self.tool.as_str())
        {
            return Err(AgentError::permanent(format!(
                "the prepared call is {}.{} and this agent now calls {}.{}: its configuration changed since the call was prepared",
                prepared["server"],
                prepared["tool"],
                self.server.name(),
                self.tool
            )));
        }
        let arguments = prepared["arguments"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let result = self
            .server
            .call(&self.tool, arguments, &ctx.idempotency_key)
            .await?;
        let value = result_value(&result);
        if result.is_error == Some(true) {
            let text = match &value {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            return Err(AgentError::permanent(format!(
                "tool {}.{} answered an error: {text}",
                self.server.name(),
                self.tool
            )));
        }
        Ok(AgentOutput {
            value,
            usage: Usage::default(),
            limits: None,
        })
    }

    /// Irreversible unless the tool, as its server last listed it, says otherwise; a tool not
    /// listed yet (the server not reached) is taken as irreversible.
    fn irreversible(&self) -> bool {
        match self.server.cached_tools() {
            Some(tools) => tools
                .iter()
                .find(|t| t.name == self.tool)
                .is_none_or(irreversible),
            None => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auth_is_a_bearer_token_or_an_oauth2_credential_and_nothing_else() {
        let parse = |v: serde_json::Value| serde_json::from_value::<McpAuth>(v);
        assert!(matches!(
            parse(serde_json::json!({"bearer": "env:T"})),
            Ok(McpAuth::Bearer(_))
        ));
        assert!(matches!(
            parse(
                serde_json::json!({"oauth2": {"token_url": "http://127.0.0.1:1/token", "client_id": "c", "client_secret": "env:S"}})
            ),
            Ok(McpAuth::OAuth2(_))
        ));
        let e = parse(serde_json::json!({"bearer": "env:T", "scopes": ["x"]})).unwrap_err();
        assert!(e.to_string().contains("auth must be"), "{e}");
    }

    fn tool(annotations: Option<(Option<bool>, Option<bool>)>) -> Tool {
        let mut t: Tool = serde_json::from_value(serde_json::json!({
            "name": "t", "inputSchema": {"type": "object"}
        }))
        .unwrap();
        t.annotations = annotations.map(|(read_only, destructive)| {
            let mut a: rmcp::model::ToolAnnotations =
                serde_json::from_value(serde_json::json!({})).unwrap();
            a.read_only_hint = read_only;
            a.destructive_hint = destructive;
            a
        });
        t
    }

    #[test]
    fn a_tool_is_irreversible_unless_it_says_read_only_or_not_destructive() {
        // The specification's defaults: not read-only, destructive.
        assert!(irreversible(&tool(None)));
        assert!(irreversible(&tool(Some((None, None)))));
        assert!(irreversible(&tool(Some((Some(false), Some(true))))));
        assert!(!irreversible(&tool(Some((Some(true), None)))));
        assert!(!irreversible(&tool(Some((None, Some(false))))));
    }

    #[test]
    fn a_server_is_a_command_or_a_url() {
        let c = |v: serde_json::Value| serde_json::from_value::<McpServerConfig>(v).unwrap();
        assert!(
            c(serde_json::json!({"command": "node", "args": ["s.js"]}))
                .check()
                .is_ok()
        );
        assert!(
            c(serde_json::json!({"url": "https://x.example/mcp"}))
                .check()
                .is_ok()
        );
        assert_eq!(c(serde_json::json!({})).check().unwrap_err().0, "command");
        assert_eq!(
            c(serde_json::json!({"command": "n", "url": "https://x.example/mcp"}))
                .check()
                .unwrap_err()
                .0,
            "url"
        );
        assert_eq!(
            c(serde_json::json!({"url": "ftp://x"}))
                .check()
                .unwrap_err()
                .0,
            "url"
        );
        assert_eq!(
            c(serde_json::json!({"command": "n", "env": {"T": "env:CASCADE_TEST_UNSET_VAR_93"}}))
                .check()
                .unwrap_err()
                .0,
            "env"
        );
        assert!(
            serde_json::from_value::<McpServerConfig>(
                serde_json::json!({"command": "n", "bogus": 1})
            )
            .is_err()
        );
    }
}
