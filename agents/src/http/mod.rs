//! `kind = "http"`: a REST call to an enterprise system (a CRM, an ERP, a ticketing API).
//!
//! ```toml
//! [agents.lookup]
//! kind = "http"
//! method = "GET"                                   # default GET
//! url = "https://crm.example.com/api/customers/{{ input.customer_id }}"
//! query = { expand = "orders" }                    # templates
//! headers = { "X-Tenant" = "{{ input.tenant }}" }  # templates
//! body = { note = "{{ deps.classify.label }}" }    # the template kind's rules, sent as JSON
//! output = "body"                                  # or a dotted path: "data.customer"
//! ok_status = [200, 201]                           # default: any 2xx
//! max_response_bytes = 10_485_760                  # default 10 MiB
//! idempotency_header = "Idempotency-Key"           # sent on every call but GET and HEAD
//! auth = { bearer = "env:CRM_TOKEN" }              # or api_key = { header, value }, basic = { username, password }
//! ca_file = "/etc/ssl/internal-ca.pem"             # an internal CA, beside the system roots
//! upstream = "crm"                                 # default: the URL's scheme://host[:port]
//! ```
//!
//! A non-GET call carries the step's idempotency key (`<job id>/<agent>`, the same across retries,
//! restarts and a crash of the server), so that the system written to can drop a repeat. Answers
//! are classified as in [`classify`]: 429 pauses, 5xx retries, 401 is a refused credential.

pub mod classify;
pub mod health;
pub mod oauth2;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::Semaphore;

use crate::secret::{SecretCell, SecretRef};
use crate::template::JsonTemplate;
use crate::{
    Agent, AgentError, AgentOutput, AgentSpec, CallContext, FieldError, KindSpec, StepInput, Usage,
};

pub const KIND: KindSpec = KindSpec {
    name: "http",
    fields: &[
        "method",
        "url",
        "query",
        "headers",
        "body",
        "output",
        "ok_status",
        "max_response_bytes",
        "idempotency_header",
        "auth",
        "ca_file",
        "upstream",
    ],
    required: &["url"],
    build,
    upstream: upstream_name,
    credential: credential_name,
    may_be_irreversible: false,
};

/// The credential an agent's `auth` is: its `name` (the `NAME` of `[credentials.NAME]`, set by
/// the loader), else the agent's own (`graph.agent`, an inline credential).
pub fn credential_name(spec: &AgentSpec<'_>) -> Option<String> {
    let auth = spec.fields.get("auth")?;
    let named = auth
        .get("name")
        .or_else(|| auth.pointer("/oauth2/name"))
        .and_then(Value::as_str);
    Some(
        named
            .map(str::to_string)
            .unwrap_or_else(|| format!("{}.{}", spec.graph, spec.name)),
    )
}

const DEFAULT_MAX_RESPONSE: u64 = 10 << 20;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    method: Option<String>,
    url: String,
    #[serde(default)]
    query: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    headers: Option<serde_json::Map<String, Value>>,
    #[serde(default)]
    body: Option<Value>,
    #[serde(default)]
    output: Option<String>,
    #[serde(default)]
    ok_status: Option<Vec<u16>>,
    #[serde(default)]
    max_response_bytes: Option<u64>,
    #[serde(default)]
    idempotency_header: Option<String>,
    #[serde(default)]
    auth: Option<AuthConfig>,
    #[serde(default)]
    ca_file: Option<PathBuf>,
    #[serde(default)]
    #[allow(dead_code)] // read by `upstream_name`
    upstream: Option<String>,
}

/// How a call proves who it is. Every value that is a credential is a secret reference.
enum AuthConfig {
    OAuth2 { oauth2: oauth2::OAuth2Config },
    Bearer { bearer: SecretRef },
    ApiKey { api_key: ApiKeyConfig },
    Basic { basic: BasicConfig },
}

const AUTH_FORMS: &str = "auth must be { bearer = \"env:NAME\" }, { api_key = { header = \"X-API-Key\", value = \"env:NAME\" } }, { basic = { username = \"…\", password = \"env:NAME\" } } or { oauth2 = { token_url, client_id, client_secret = \"env:NAME\", scopes = [\"…\"] } }";

impl<'de> Deserialize<'de> for AuthConfig {
    /// By the form's key, so that an error inside a form (a literal where a secret reference
    /// belongs, a missing field) says what is wrong there. Beside the form, `name` (the
    /// credential's, set by the loader) is allowed.
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = Value::deserialize(d)?;
        let Some(table) = v.as_object() else {
            return Err(D::Error::custom(AUTH_FORMS));
        };
        let forms: Vec<&str> = table
            .keys()
            .map(String::as_str)
            .filter(|k| *k != "name")
            .collect();
        let [form] = forms[..] else {
            return Err(D::Error::custom(AUTH_FORMS));
        };
        let inner = table[form].clone();
        let at = |e: serde_json::Error| D::Error::custom(format!("{form}: {e}"));
        Ok(match form {
            "oauth2" => Self::OAuth2 {
                oauth2: serde_json::from_value(inner).map_err(at)?,
            },
            "bearer" => Self::Bearer {
                bearer: serde_json::from_value(inner).map_err(at)?,
            },
            "api_key" => Self::ApiKey {
                api_key: serde_json::from_value(inner).map_err(at)?,
            },
            "basic" => Self::Basic {
                basic: serde_json::from_value(inner).map_err(at)?,
            },
            _ => return Err(D::Error::custom(AUTH_FORMS)),
        })
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiKeyConfig {
    header: String,
    value: SecretRef,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BasicConfig {
    username: String,
    password: SecretRef,
}

enum Auth {
    Bearer(Arc<SecretCell>),
    ApiKey(reqwest::header::HeaderName, Arc<SecretCell>),
    Basic(String, Arc<SecretCell>),
    OAuth2(Arc<oauth2::Credential>),
}

impl Auth {
    fn secrets(&self) -> Vec<&SecretCell> {
        match self {
            Self::Bearer(s) | Self::ApiKey(_, s) | Self::Basic(_, s) => vec![&**s],
            Self::OAuth2(_) => vec![],
        }
    }
}

/// One pooled client per upstream, shared by every agent of the registry that calls it.
#[derive(Default)]
pub struct HttpClients {
    by_upstream: Mutex<HashMap<(String, Option<PathBuf>), Upstream>>,
}

/// Requests in flight to one upstream at most: an HTTP/1.1 request holds a connection, so this
/// bounds the sockets a burst opens (HTTP/2 multiplexes them on fewer). With the idle
/// connections the pool keeps for reuse (as many), an upstream never has more than twice this
/// open.
pub const MAX_REQUESTS_PER_UPSTREAM: usize = 256;

/// A pooled client and its bound on requests in flight.
#[derive(Clone)]
pub struct Upstream {
    pub client: reqwest::Client,
    pub slots: Arc<Semaphore>,
}

impl Upstream {
    /// A request slot, held while the request is in flight.
    pub async fn slot(&self) -> Result<tokio::sync::SemaphorePermit<'_>, AgentError> {
        self.slots
            .acquire()
            .await
            .map_err(|_| AgentError::transient("the HTTP client is closing"))
    }
}

impl HttpClients {
    /// The client for `upstream` (built on first use), trusting `ca_file` beside the system roots.
    pub fn get(&self, upstream: &str, ca_file: Option<&PathBuf>) -> Result<Upstream, String> {
        let mut map = self.by_upstream.lock().unwrap_or_else(|p| p.into_inner());
        let key = (upstream.to_string(), ca_file.cloned());
        if let Some(u) = map.get(&key) {
            return Ok(u.clone());
        }
        let mut b = reqwest::Client::builder()
            // As many idle connections kept as may be busy: a burst's connections are reused
            // by the next burst instead of closed and opened again.
            .pool_max_idle_per_host(MAX_REQUESTS_PER_UPSTREAM)
            .pool_idle_timeout(Duration::from_secs(90))
            .tcp_nodelay(true)
            // No redirects: a redirect to another host would take the caller's credential
            // headers with it (reqwest strips only Authorization and Cookie).
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("cascade/", env!("CARGO_PKG_VERSION")));
        b = trusting(b, ca_file)?;
        let client = b
            .build()
            .map_err(|e| format!("cannot build an HTTP client: {e}"))?;
        let u = Upstream {
            client,
            slots: Arc::new(Semaphore::new(MAX_REQUESTS_PER_UPSTREAM)),
        };
        map.insert(key, u.clone());
        Ok(u)
    }
}

/// `b` trusting the CA in `ca_file` (PEM) beside the system roots.
pub(crate) fn trusting(
    b: reqwest::ClientBuilder,
    ca_file: Option<&PathBuf>,
) -> Result<reqwest::ClientBuilder, String> {
    let Some(path) = ca_file else {
        return Ok(b);
    };
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let cert = reqwest::Certificate::from_pem(&pem)
        .map_err(|e| format!("{} is not a PEM certificate: {e}", path.display()))?;
    Ok(b.add_root_certificate(cert))
}

/// The upstream a node calls: its `upstream` field, or its URL's origin when the URL's scheme
/// and host are not templated, else `"{graph}.{agent}"`.
fn upstream_name(spec: &AgentSpec<'_>) -> Option<String> {
    if let Some(Value::String(name)) = spec.fields.get("upstream") {
        return Some(name.clone());
    }
    let url = spec.fields.get("url").and_then(Value::as_str).unwrap_or("");
    Some(origin_of(url).unwrap_or_else(|| format!("{}.{}", spec.graph, spec.name)))
}

/// `scheme://host[:port]` of a URL template, when the part before any template names a host.
pub fn origin_of(url: &str) -> Option<String> {
    let fixed = url.split("{{").next().unwrap_or("");
    let parsed = reqwest::Url::parse(fixed).ok()?;
    let host = parsed.host_str()?;
    // A template inside the host ("https://{{ input.region }}.api.example.com") leaves a
    // prefix whose host is cut short: then the origin is not known.
    let after = &fixed[fixed.find(host)? + host.len()..];
    if fixed.len() < url.len() && (after.is_empty() || !after.starts_with(['/', ':'])) {
        return None;
    }
    Some(parsed.origin().ascii_serialization())
}

pub struct HttpAgent {
    method: reqwest::Method,
    /// The URL template's scheme, host and port when they are not templated: a credential goes
    /// there and nowhere else, whatever the input makes of the rest of the URL.
    fixed_origin: Option<String>,
    request: JsonTemplate,
    output: Vec<String>,
    ok_status: Option<Vec<u16>>,
    max_response_bytes: u64,
    idempotency_header: reqwest::header::HeaderName,
    auth: Option<Auth>,
    /// A fixed credential (bearer, API key, basic) and its health: refused with 401 even after
    /// it was read again from its source, it pauses its agents (see [`health`]).
    fixed: Option<health::FixedKey>,
    upstream: Upstream,
}

fn build(spec: &AgentSpec<'_>) -> Result<Arc<dyn Agent>, FieldError> {
    let c: Config = spec.parse()?;
    let method: reqwest::Method = c
        .method
        .as_deref()
        .unwrap_or("GET")
        .to_ascii_uppercase()
        .parse()
        .map_err(|_| {
            FieldError::new(
                "method",
                "not an HTTP method; use GET, POST, PUT, PATCH or DELETE",
            )
        })?;
    if !c.url.contains("{{") {
        let u = reqwest::Url::parse(&c.url).map_err(|e| {
            FieldError::new(
                "url",
                format!(
                    "not a URL ({e}); write it whole, e.g. \"https://api.example.com/v1/items\""
                ),
            )
        })?;
        if !matches!(u.scheme(), "http" | "https") {
            return Err(FieldError::new("url", "the scheme must be http or https"));
        }
    }
    let mut request = serde_json::Map::new();
    request.insert("url".into(), Value::String(c.url.clone()));
    request.insert("query".into(), Value::Object(c.query.unwrap_or_default()));
    let headers = c.headers.unwrap_or_default();
    for (k, v) in &headers {
        reqwest::header::HeaderName::from_bytes(k.as_bytes()).map_err(|_| FieldError {
            path: vec!["headers".into(), k.clone()],
            message: "not a valid header name".into(),
        })?;
        if !v.is_string() {
            return Err(FieldError {
                path: vec!["headers".into(), k.clone()],
                message: "a header value must be a string (a template)".into(),
            });
        }
    }
    request.insert("headers".into(), Value::Object(headers));
    if let Some(body) = c.body {
        request.insert("body".into(), body);
    }
    // One template for the whole request; a bad field is named under its own key.
    let request = JsonTemplate::compile(&Value::Object(request), &[])?;
    let output = match c.output.as_deref() {
        None | Some("body") => Vec::new(),
        Some(path) => {
            let parts: Vec<String> = path.split('.').map(str::to_string).collect();
            if parts.iter().any(String::is_empty) {
                return Err(FieldError::new(
                    "output",
                    "write \"body\" or a dotted path such as \"data.customer.id\"",
                ));
            }
            parts
        }
    };
    if let Some(list) = &c.ok_status
        && (list.is_empty() || list.iter().any(|s| !(100..600).contains(s)))
    {
        return Err(FieldError::new(
            "ok_status",
            "a list of HTTP status codes, e.g. [200, 201]",
        ));
    }
    let idempotency_header = reqwest::header::HeaderName::from_bytes(
        c.idempotency_header
            .as_deref()
            .unwrap_or("Idempotency-Key")
            .as_bytes(),
    )
    .map_err(|_| FieldError::new("idempotency_header", "not a valid header name"))?;
    let auth = match c.auth {
        None => None,
        Some(AuthConfig::Bearer { bearer }) => Some(Auth::Bearer(Arc::new(
            SecretCell::load(bearer).map_err(|e| field(&["auth", "bearer"], e))?,
        ))),
        Some(AuthConfig::ApiKey { api_key }) => Some(Auth::ApiKey(
            reqwest::header::HeaderName::from_bytes(api_key.header.as_bytes()).map_err(|_| {
                field(
                    &["auth", "api_key", "header"],
                    "not a valid header name".into(),
                )
            })?,
            Arc::new(
                SecretCell::load(api_key.value)
                    .map_err(|e| field(&["auth", "api_key", "value"], e))?,
            ),
        )),
        Some(AuthConfig::OAuth2 { mut oauth2 }) => {
            if oauth2.name.is_none() {
                oauth2.name = Some(format!("{}.{}", spec.graph, spec.name));
            }
            // An inline credential is the agent's own and trusts its ca_file; a named one (the
            // loader writes its name beside its form) is shared and says for itself which CA
            // it trusts.
            let named = spec
                .fields
                .get("auth")
                .is_some_and(|a| a.get("name").is_some());
            if !named && oauth2.ca_file.is_none() {
                oauth2.ca_file = c.ca_file.clone();
            }
            Some(Auth::OAuth2(
                spec.resources
                    .get::<oauth2::Credentials>()
                    .get(&oauth2, &spec.resources.get::<oauth2::Vault>())
                    .map_err(|e| field(&["auth", "oauth2"], e))?,
            ))
        }
        Some(AuthConfig::Basic { basic }) => Some(Auth::Basic(
            basic.username,
            Arc::new(
                SecretCell::load(basic.password)
                    .map_err(|e| field(&["auth", "basic", "password"], e))?,
            ),
        )),
    };
    if auth.is_some() && origin_of(&c.url).is_none() {
        return Err(FieldError::new(
            "url",
            "with auth, write the URL's scheme, host and port out (e.g. \"https://api.example.com/items/{{ input.id }}\"): a templated host could send the credential anywhere",
        ));
    }
    let name = upstream_name(spec).unwrap_or_default();
    let upstream = spec
        .resources
        .get::<HttpClients>()
        .get(&name, c.ca_file.as_ref())
        .map_err(|e| FieldError::new("ca_file", e))?;
    if c.max_response_bytes
        .is_some_and(|n| n > RESPONSE_MEMORY_BYTES as u64)
    {
        return Err(FieldError::new(
            "max_response_bytes",
            format!(
                "at most {} MiB, the memory all the responses being read may take",
                RESPONSE_MEMORY_BYTES >> 20
            ),
        ));
    }
    let fixed = match &auth {
        Some(Auth::Bearer(cell) | Auth::ApiKey(_, cell) | Auth::Basic(_, cell)) => {
            credential_name(spec).map(|name| health::FixedKey {
                cell: cell.clone(),
                health: spec.resources.get::<health::KeyHealth>().get(&name),
            })
        }
        _ => None,
    };
    Ok(Arc::new(HttpAgent {
        method,
        fixed_origin: origin_of(&c.url),
        request,
        output,
        ok_status: c.ok_status,
        max_response_bytes: c.max_response_bytes.unwrap_or(DEFAULT_MAX_RESPONSE),
        idempotency_header,
        auth,
        fixed,
        upstream,
    }))
}

fn field(path: &[&str], message: String) -> FieldError {
    FieldError {
        path: path.iter().map(|p| p.to_string()).collect(),
        message,
    }
}

impl HttpAgent {
    /// Strip this agent's secret values from a message, and for basic auth the header's
    /// base64 form as well (an upstream that echoes the headers it got echoes that).
    fn redact(&self, s: &str) -> String {
        let mut out = s.to_string();
        if let Some(auth) = &self.auth {
            for cell in auth.secrets() {
                out = cell.redact(&out);
            }
            if let Auth::OAuth2(c) = auth {
                out = c.redact(&out);
            }
            if let Auth::Basic(user, cell) = auth
                && let Ok(password) = cell.get()
            {
                use base64::Engine;
                let encoded =
                    base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
                out = out.replace(&encoded, "[redacted]");
            }
        }
        out
    }

    fn ok(&self, status: u16) -> bool {
        match &self.ok_status {
            Some(list) => list.contains(&status),
            None => (200..300).contains(&status),
        }
    }
}

/// The memory every response body being read may take at once, across every agent of the
/// process: without it, 256 calls per upstream reading 10 MiB answers could hold gigabytes.
pub const RESPONSE_MEMORY_BYTES: usize = 256 << 20;

/// [`RESPONSE_MEMORY_BYTES`] in KiB permits.
static RESPONSE_MEMORY: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(RESPONSE_MEMORY_BYTES >> 10);

/// Bodies being read now, in bytes (a gauge).
pub const RESPONSE_BUFFERED: &str = "cascade_http_response_buffered_bytes";

/// Read a response body, refusing one larger than `max` bytes.
///
/// The bytes being read count against one budget for the process, [`RESPONSE_MEMORY_BYTES`];
/// a body that would take it past the budget is not waited for (bodies waiting on each other's
/// memory could wait forever): the call fails as transient and is retried with backoff.
pub async fn read_capped(mut resp: reqwest::Response, max: u64) -> Result<Vec<u8>, AgentError> {
    if resp.content_length().is_some_and(|n| n > max) {
        return Err(AgentError::permanent(format!(
            "the response is larger than max_response_bytes ({max})"
        )));
    }
    let mut body = Vec::new();
    let mut held: Option<tokio::sync::SemaphorePermit<'static>> = None;
    let gauge = metrics::gauge!(RESPONSE_BUFFERED);
    let result = async {
        while let Some(chunk) = resp.chunk().await.map_err(|e| {
            AgentError::transient(format!("reading the response failed: {}", e.without_url()))
        })? {
            if body.len() as u64 + chunk.len() as u64 > max {
                return Err(AgentError::permanent(format!(
                    "the response is larger than max_response_bytes ({max})"
                )));
            }
            // Whole KiB for what the body will hold.
            let need = (body.len() + chunk.len()).div_ceil(1024) as u32;
            let have = held.as_ref().map_or(0, |p| p.num_permits() as u32);
            if need > have {
                let more = RESPONSE_MEMORY.try_acquire_many(need - have).map_err(|_| {
                    AgentError::transient(format!(
                        "the responses being read hold the process's response memory ({} MiB); retried later",
                        RESPONSE_MEMORY_BYTES >> 20
                    ))
                })?;
                gauge.increment(f64::from(need - have) * 1024.0);
                match &mut held {
                    Some(p) => p.merge(more),
                    None => held = Some(more),
                }
            }
            body.extend_from_slice(&chunk);
        }
        Ok(())
    }
    .await;
    if let Some(p) = &held {
        gauge.decrement(p.num_permits() as f64 * 1024.0);
    }
    result.map(|()| body)
}

/// The first `max` bytes of a body (what arrived of them), for an error answer.
pub async fn read_prefix(mut resp: reqwest::Response, max: usize) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < max {
        match resp.chunk().await {
            Ok(Some(chunk)) => body.extend_from_slice(&chunk[..chunk.len().min(max - body.len())]),
            _ => break,
        }
    }
    body
}

/// A transport failure: a timeout or a connection that failed is worth another attempt.
/// `e` and the errors under it ("error sending request: client error (Connect): invalid peer
/// certificate: UnknownIssuer"): the top one alone rarely says what went wrong.
fn with_causes(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        let c = cause.to_string();
        if !text.ends_with(&c) {
            text.push_str(": ");
            text.push_str(&c);
        }
        next = cause.source();
    }
    text
}

pub fn transport_error(e: reqwest::Error) -> AgentError {
    let e = e.without_url();
    let text = with_causes(&e);
    if e.is_builder() || e.is_redirect() {
        // A request that cannot be built (a rendered header with a line break, a bad scheme)
        // fails the same way every time.
        AgentError::permanent(format!("the request is not valid: {text}"))
    } else if e.is_timeout() {
        AgentError::transient(format!("the request timed out: {text}"))
    } else if e.is_connect() {
        AgentError::transient(format!("cannot connect to the upstream: {text}"))
    } else {
        AgentError::transient(format!("the request failed: {text}"))
    }
}

#[async_trait::async_trait]
impl Agent for HttpAgent {
    async fn call(&self, ctx: &CallContext, input: &StepInput) -> Result<AgentOutput, AgentError> {
        let prepared = self.prepare(ctx, input)?;
        self.execute(ctx, &prepared).await
    }

    /// `{"method", "url" (its query included), "headers" (the step's idempotency key among
    /// them), "body"?, "auth"?}`: `auth` names the kind of credential that will be added
    /// (`"bearer"`, `"api_key:<header>"`, `"basic:<user>"`, `"oauth2"`), never its value.
    fn prepare(&self, ctx: &CallContext, input: &StepInput) -> Result<Value, AgentError> {
        let rendered = self.request.render(ctx, input)?;
        let url = rendered["url"].as_str().unwrap_or_default();
        let mut url = reqwest::Url::parse(url).map_err(|e| {
            AgentError::permanent(
                self.redact(&format!("the rendered url {url:?} is not a URL: {e}")),
            )
        })?;
        self.check_origin(&url)?;
        if let Some(query) = rendered["query"].as_object()
            && !query.is_empty()
        {
            let mut pairs = url.query_pairs_mut();
            for (k, v) in query {
                match v {
                    Value::String(s) => pairs.append_pair(k, s),
                    other => pairs.append_pair(k, &other.to_string()),
                };
            }
        }
        let mut headers = serde_json::Map::new();
        if let Some(rendered) = rendered["headers"].as_object() {
            for (k, v) in rendered {
                headers.insert(
                    k.to_ascii_lowercase(),
                    Value::String(v.as_str().unwrap_or_default().to_string()),
                );
            }
        }
        if !matches!(self.method, reqwest::Method::GET | reqwest::Method::HEAD) {
            headers.insert(
                self.idempotency_header.as_str().to_string(),
                Value::String(ctx.idempotency_key.to_string()),
            );
        }
        let mut call = serde_json::Map::new();
        call.insert("method".into(), Value::String(self.method.to_string()));
        call.insert("url".into(), Value::String(url.to_string()));
        call.insert("headers".into(), Value::Object(headers));
        if let Some(body) = rendered.get("body") {
            call.insert("body".into(), body.clone());
        }
        if let Some(auth) = &self.auth {
            let kind = match auth {
                Auth::Bearer(_) => "bearer".to_string(),
                Auth::ApiKey(h, _) => format!("api_key:{h}"),
                Auth::Basic(user, _) => format!("basic:{user}"),
                Auth::OAuth2(_) => "oauth2".to_string(),
            };
            call.insert("auth".into(), Value::String(kind));
        }
        Ok(Value::Object(call))
    }

    async fn execute(
        &self,
        _ctx: &CallContext,
        prepared: &Value,
    ) -> Result<AgentOutput, AgentError> {
        let method = prepared["method"].as_str().unwrap_or_default();
        if !method.eq_ignore_ascii_case(self.method.as_str()) {
            return Err(AgentError::permanent(format!(
                "the prepared call is a {method} and this agent now makes {} calls: its configuration changed since the call was prepared",
                self.method
            )));
        }
        let url = prepared["url"].as_str().unwrap_or_default();
        let url = reqwest::Url::parse(url).map_err(|e| {
            AgentError::permanent(
                self.redact(&format!("the prepared url {url:?} is not a URL: {e}")),
            )
        })?;
        self.check_origin(&url)?;
        // Secrets first, off the runtime thread if one must be fetched (`exec:`); a fixed
        // credential refused a moment ago holds its calls.
        let secret = match &self.fixed {
            Some(k) => Some(k.value().await?),
            None => None,
        };
        // `token`: the OAuth2 token or the fixed credential's value.
        let build = |token: Option<&str>| -> Result<reqwest::RequestBuilder, AgentError> {
            let mut req = self
                .upstream
                .client
                .request(self.method.clone(), url.clone());
            if let Some(headers) = prepared["headers"].as_object() {
                for (k, v) in headers {
                    req = req.header(k.as_str(), v.as_str().unwrap_or_default());
                }
            }
            let token = token.unwrap_or_default();
            match &self.auth {
                None => {}
                Some(Auth::Bearer(_)) => req = req.bearer_auth(token),
                Some(Auth::ApiKey(h, _)) => req = req.header(h.clone(), token),
                Some(Auth::Basic(user, _)) => req = req.basic_auth(user, Some(token)),
                Some(Auth::OAuth2(_)) => req = req.bearer_auth(token),
            }
            if let Some(body) = prepared.get("body") {
                req = req.json(body);
            }
            Ok(req)
        };
        // The token before a request slot: a call waiting on the authorization server holds
        // no connection to the upstream.
        let token = match &self.auth {
            Some(Auth::OAuth2(cred)) => Some(cred.token().await?),
            _ => None,
        };
        let _slot = self.upstream.slot().await?;
        let send = |req: reqwest::RequestBuilder| async move {
            req.send().await.map_err(|e| {
                let e = transport_error(e);
                AgentError {
                    message: self.redact(&e.message),
                    ..e
                }
            })
        };
        let resp = match (&self.auth, token) {
            (Some(Auth::OAuth2(cred)), Some(token)) => {
                let resp = send(build(Some(&token))?).await?;
                if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
                    // The token may have been revoked or rotated early: one new token, one
                    // more try; a fresh token refused too pauses the credential.
                    let token = cred.refresh_after_refusal(&token).await?;
                    let again = send(build(Some(&token))?).await?;
                    if again.status() == reqwest::StatusCode::UNAUTHORIZED {
                        let body = read_prefix(again, 4 << 10).await;
                        let why = self.redact(&String::from_utf8_lossy(&body));
                        return Err(cred.refused_fresh(&why).await);
                    }
                    cred.accepted();
                    again
                } else {
                    cred.accepted();
                    resp
                }
            }
            (Some(Auth::Bearer(_) | Auth::ApiKey(..) | Auth::Basic(..)), _) => {
                let secret = secret.unwrap_or_default();
                let resp = send(build(Some(&secret))?).await?;
                match &self.fixed {
                    Some(k) => {
                        let again = |s: String| {
                            let req = build(Some(&s));
                            let send = &send;
                            async move { send(req?).await }
                        };
                        k.answer(resp, &secret, again, &|t| self.redact(t)).await?
                    }
                    None => resp,
                }
            }
            _ => send(build(None)?).await?,
        };
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let limits = classify::upstream_limits(&headers);
        self.answer(resp, status, &headers)
            .await
            .map(|value| AgentOutput {
                value,
                usage: Usage::default(),
                limits,
            })
            .map_err(|e| e.with_limits(limits))
    }
}

impl HttpAgent {
    /// A credential goes only to the origin the configuration names.
    fn check_origin(&self, url: &reqwest::Url) -> Result<(), AgentError> {
        if self.auth.is_some()
            && let Some(origin) = &self.fixed_origin
            && url.origin().ascii_serialization() != *origin
        {
            return Err(AgentError::permanent(format!(
                "the rendered URL leaves {origin} (its input changed the host): a credential is only sent to {origin}"
            )));
        }
        Ok(())
    }
}

impl HttpAgent {
    /// The step output from an answer: its status checked, its body read and parsed, the
    /// `output` path followed.
    async fn answer(
        &self,
        resp: reqwest::Response,
        status: u16,
        headers: &reqwest::header::HeaderMap,
    ) -> Result<Value, AgentError> {
        let json_body = headers
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.contains("json"));
        if !self.ok(status) {
            // An error answer is classified from its first bytes, whatever its size.
            let body = read_prefix(resp, 64 << 10).await;
            return Err(classify::classify(status, headers, &body, &|s| {
                self.redact(s)
            }));
        }
        let body = read_capped(resp, self.max_response_bytes).await?;
        let value = if body.is_empty() {
            Value::Null
        } else if json_body {
            serde_json::from_slice(&body).map_err(|e| {
                AgentError::permanent(format!("the response claims JSON but is not: {e}"))
            })?
        } else {
            serde_json::from_slice(&body)
                .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&body).into_owned()))
        };
        let mut out = &value;
        for (i, part) in self.output.iter().enumerate() {
            let next = match out {
                Value::Object(m) => m.get(part),
                Value::Array(a) => part.parse::<usize>().ok().and_then(|n| a.get(n)),
                _ => None,
            };
            out = next.ok_or_else(|| {
                AgentError::permanent(format!(
                    "the response has no {} (output = \"{}\")",
                    self.output[..=i].join("."),
                    self.output.join(".")
                ))
            })?;
        }
        Ok(out.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_upstream_is_the_urls_origin_when_it_is_fixed() {
        assert_eq!(
            origin_of("https://crm.example.com/api/{{ input.id }}").as_deref(),
            Some("https://crm.example.com")
        );
        assert_eq!(
            origin_of("http://127.0.0.1:8080/x").as_deref(),
            Some("http://127.0.0.1:8080")
        );
        assert_eq!(
            origin_of("https://{{ input.region }}.api.example.com/x"),
            None
        );
        assert_eq!(origin_of("https://api{{ input.n }}.example.com/x"), None);
        assert_eq!(origin_of("{{ input.url }}"), None);
    }

    fn build_with(fields: Value) -> Result<Arc<dyn Agent>, FieldError> {
        let Value::Object(map) = fields else {
            unreachable!()
        };
        build(&AgentSpec {
            graph: "g",
            name: "h",
            fields: &map,
            resources: &Default::default(),
        })
    }

    #[test]
    fn bad_fields_are_named() {
        let e = build_with(serde_json::json!({"url": "ftp://x/y"}))
            .err()
            .unwrap();
        assert_eq!(e.path, ["url"]);
        let e = build_with(serde_json::json!({"url": "https://x/{{ input.a "}))
            .err()
            .unwrap();
        assert_eq!(e.path, ["url"]);
        let e = build_with(serde_json::json!({"url": "https://x/", "method": "FETCH IT"}))
            .err()
            .unwrap();
        assert_eq!(e.path, ["method"]);
        let e =
            build_with(serde_json::json!({"url": "https://x/", "auth": {"bearer": "sk-live-1"}}))
                .err()
                .unwrap();
        assert!(!e.message.contains("sk-live-1"), "{e}");
        let e = build_with(serde_json::json!({"url": "https://x/", "auth": {"bearer": "env:CASCADE_TEST_SURELY_UNSET_9"}}))
            .err()
            .unwrap();
        assert_eq!(e.path, ["auth", "bearer"]);
        assert!(e.message.contains("CASCADE_TEST_SURELY_UNSET_9"), "{e}");
        let e = build_with(serde_json::json!({"url": "https://x/", "headers": {"X-A": 1}}))
            .err()
            .unwrap();
        assert_eq!(e.path, ["headers", "X-A"]);
        let e = build_with(serde_json::json!({"url": "https://api.example.com{{ input.p }}", "auth": {"bearer": "env:PATH"}}))
            .err()
            .unwrap();
        assert_eq!(e.path, ["url"]);
        assert!(e.message.contains("credential"), "{e}");
        let e = build_with(serde_json::json!({"url": "https://x/", "ok_status": [99]}))
            .err()
            .unwrap();
        assert_eq!(e.path, ["ok_status"]);
    }
}
