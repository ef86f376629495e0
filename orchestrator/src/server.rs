//! `cascade serve`: the gRPC API (with `grpc.health.v1` and reflection) on one port, and HTTP on
//! another: `/healthz`, `/readyz`, `POST /hooks/{graph}` (HMAC-verified webhook ingress) and
//! `POST /hooks/{graph}/{trigger}` (a webhook trigger, verified by its provider's scheme).
//! Completion callbacks are delivered from here too: signed, retried with backoff, and their
//! outcome recorded on the job.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc, watch};
use tokio::task::JoinHandle;

use crate::api::pb::cascade_server::CascadeServer;
use crate::api::{CascadeService, pb};
use crate::job::{CallbackDelivery, JobId, JobUpdate};
use crate::secret::{ReplayGuard, Secret};
use crate::{Orchestrator, SubmitError, SubmitRequest};

/// What ReloadGraphs (and SIGHUP) call: re-read the server's files; the graphs to be served
/// (and the reload is then under way), or the errors that keep the running graphs.
#[derive(Clone)]
pub struct Reloader(pub Arc<dyn Fn() -> Result<Vec<String>, String> + Send + Sync>);

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Reloader")
    }
}

/// How a server listens and what it trusts.
#[derive(Clone, Debug)]
pub struct ServerOptions {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    /// Largest job input accepted (default 1 MiB).
    pub max_input_bytes: usize,
    /// Verifies `X-Cascade-Signature` on webhooks; without it, `/hooks` answers 404.
    pub webhook_secret: Option<Secret>,
    /// Signs completion callbacks.
    pub callback_secret: Option<Secret>,
    /// How long one callback request may take (default 10 s).
    pub callback_timeout: Duration,
    /// Callbacks in flight at once to one destination (default 8): a receiver that never
    /// answers holds this many, and delays no other receiver.
    pub callback_concurrency_per_host: usize,
    /// The audit log the audit RPCs read (none: they answer FAILED_PRECONDITION).
    pub audit: Option<Arc<crate::audit::log::AuditLog>>,
    /// `Host` names `/mcp` answers besides loopback ones (`localhost`, `127.0.0.1`, `::1`).
    pub mcp_allowed_hosts: Vec<String>,
    /// A new connection that has not sent its first request's headers (or the HTTP/2 preface)
    /// within this is closed.
    pub first_request_timeout: Duration,
    /// TLS on both listeners (`[server.tls]`).
    pub tls: Option<crate::tls::TlsSettings>,
    /// `[server.limits]`: what one caller may hold or send.
    pub limits: crate::limits::ServerLimits,
    /// How ReloadGraphs reloads (none: it answers FAILED_PRECONDITION).
    pub reload: Option<Reloader>,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            grpc_addr: ([127, 0, 0, 1], 50051).into(),
            http_addr: ([127, 0, 0, 1], 8080).into(),
            max_input_bytes: 1 << 20,
            webhook_secret: None,
            callback_secret: None,
            callback_timeout: Duration::from_secs(10),
            callback_concurrency_per_host: 8,
            audit: None,
            mcp_allowed_hosts: Vec::new(),
            first_request_timeout: crate::listen::FIRST_REQUEST_TIMEOUT,
            tls: None,
            limits: crate::limits::ServerLimits::default(),
            reload: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} for {what}: {source}; choose another address with --{flag}")]
    Bind {
        what: &'static str,
        flag: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(
        "refusing to serve {what} on {addr} without authentication: anyone who reaches it could submit, read and approve; declare [[auth.api_keys]] in cascade.toml (`cascade keys create`), bind to 127.0.0.1, or set [auth] allow_unauthenticated = true"
    )]
    Unauthenticated {
        what: &'static str,
        addr: SocketAddr,
    },
    #[error("[auth]: {0}")]
    Auth(String),
    #[error("{0}")]
    Tls(String),
    #[error("{0}")]
    Trigger(String),
}

/// A running server. [`stop`](Self::stop) shuts it down.
pub struct RunningServer {
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
}

/// How long [`RunningServer::stop`] lets open calls and streams end on their own.
pub const STOP_GRACE: Duration = Duration::from_secs(5);

impl RunningServer {
    /// Stop accepting requests and wait for the listeners to close: up to [`STOP_GRACE`] for
    /// open calls and streams to end, then their connections are dropped. A WatchJob stream on
    /// a job that runs for hours never ends by itself, and must not hold the shutdown. (The
    /// orchestrator is shut down separately, so that in-flight jobs can finish first.)
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let deadline = tokio::time::Instant::now() + STOP_GRACE;
        for mut t in self.tasks {
            if tokio::time::timeout_at(deadline, &mut t).await.is_err() {
                tracing::warn!(
                    grace = ?STOP_GRACE,
                    "open calls or streams outlived the stop grace; dropping their connections"
                );
                t.abort();
            }
        }
    }
}

#[derive(Clone)]
struct HttpState {
    orch: Arc<Orchestrator>,
    webhook_secret: Option<Secret>,
    /// Webhook signatures accepted within the timestamp window.
    replays: Arc<std::sync::Mutex<ReplayGuard>>,
    limits: crate::limits::ServerLimits,
    /// Watch streams per identity, shared with the gRPC service (with authentication on).
    streams: Option<Arc<crate::limits::StreamCounts>>,
    /// Each webhook trigger's signing secret, by graph and trigger.
    hook_secrets: Arc<HookSecrets>,
    /// Signatures of trigger webhooks being handled now: the same request arriving meanwhile is
    /// told to retry, not that it was taken (the first may yet be refused). At most one entry
    /// per request in flight.
    hooks_in_flight: Arc<std::sync::Mutex<std::collections::HashSet<[u8; 32]>>>,
}

/// Takes a signature out of [`HttpState::hooks_in_flight`] when its request is answered.
struct InFlight<'a>(
    &'a std::sync::Mutex<std::collections::HashSet<[u8; 32]>>,
    [u8; 32],
);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.1);
    }
}

type HookSecrets = std::collections::HashMap<(String, String), Arc<HookSecret>>;

/// A webhook trigger's secret: its own reference (a `file:` one is read again when it
/// changes), or the server's `webhook_secret`.
enum HookSecret {
    Cell(cascade_agents::secret::SecretCell),
    Server(Secret),
}

impl HookSecret {
    fn value(&self) -> Result<Vec<u8>, String> {
        match self {
            Self::Cell(c) => c.get().map(String::into_bytes).map_err(|e| e.message),
            Self::Server(s) => Ok(s.expose().to_vec()),
        }
    }
}

/// Load every webhook trigger's secret (`verify = "cascade"` without one uses `[server]
/// webhook_secret`): a missing one stops the start, naming the trigger.
fn hook_secrets(
    orch: &Orchestrator,
    fallback: Option<&Secret>,
) -> Result<HookSecrets, ServerError> {
    let mut out = HookSecrets::new();
    for t in orch.triggers().all() {
        let crate::triggers::TriggerSource::Webhook(spec) = &t.model.source else {
            continue;
        };
        let key = (t.model.graph.to_string(), t.model.name.to_string());
        let cell = match (&spec.secret, fallback) {
            (Some(r), _) => HookSecret::Cell(
                cascade_agents::secret::SecretCell::load(r.clone()).map_err(|e| {
                    ServerError::Trigger(format!(
                        "trigger {:?} of graph {:?}: {e}",
                        &*t.model.name, &*t.model.graph
                    ))
                })?,
            ),
            (None, Some(s)) => HookSecret::Server(s.clone()),
            (None, None) => {
                return Err(ServerError::Trigger(format!(
                    "trigger {:?} of graph {:?} verifies with the cascade scheme but has no secret: set secret = \"env:NAME\" on the trigger, or [server] webhook_secret",
                    &*t.model.name, &*t.model.graph
                )));
            }
        };
        out.insert(key, Arc::new(cell));
    }
    Ok(out)
}

/// Webhook signatures remembered at most (a live one is never forgotten: past this, webhooks are
/// answered 503 until the oldest leave the window).
const REPLAY_GUARD_CAPACITY: usize = 65_536;

/// A request message over the server's size limit: tonic answers OUT_OF_RANGE, and gRPC
/// clients (and their retry policies) expect RESOURCE_EXHAUSTED for a limit; the answer says so
/// (the message, with the sizes, stays).
fn oversize_is_resource_exhausted(
    mut resp: axum::http::Response<tonic::body::Body>,
) -> axum::http::Response<tonic::body::Body> {
    let h = resp.headers_mut();
    let oversize = h.get("grpc-status").is_some_and(|v| v == "11")
        && h.get("grpc-message")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|m| {
                m.contains("message length too large") || m.contains("length%20too%20large")
            });
    if oversize {
        h.insert("grpc-status", axum::http::HeaderValue::from_static("8"));
    }
    resp
}

/// What the HTTP routes ask of a caller.
#[derive(Clone)]
struct HttpAuth {
    auth: Arc<crate::auth::Authenticator>,
    metrics_public: bool,
    sessions: Arc<crate::session::Sessions>,
    /// `[server.limits] requests_per_second_per_identity` (with authentication on).
    rate: Option<Arc<crate::limits::IdentityRate>>,
}

/// 429 for an identity over its request rate, with when to come back.
fn too_many_requests(who: &crate::auth::Identity, retry_after: Duration) -> Response {
    let secs = retry_after.as_secs_f64().ceil().max(1.0) as u64;
    let mut r = (
        StatusCode::TOO_MANY_REQUESTS,
        axum::Json(json!({"error": format!(
            "{:?} makes requests faster than [server.limits] requests_per_second_per_identity allows; retry in {secs}s",
            &*who.name
        )})),
    )
        .into_response();
    r.headers_mut().insert("retry-after", secs.into());
    r
}

/// The status of a request a credential did not let through: 401, 403 or 503.
fn refusal_status(e: &crate::auth::AuthError) -> StatusCode {
    if e.is_busy() {
        StatusCode::SERVICE_UNAVAILABLE
    } else if e.is_unauthenticated() {
        StatusCode::UNAUTHORIZED
    } else {
        StatusCode::FORBIDDEN
    }
}

/// The refusal of a request a credential did not let through.
fn auth_refusal(e: &crate::auth::AuthError) -> Response {
    (
        refusal_status(e),
        [(axum::http::header::WWW_AUTHENTICATE, "Bearer")],
        axum::Json(json!({"error": e.to_string()})),
    )
        .into_response()
}

/// Whether a request is a person's browser opening a page (sent to `/login` when signed out).
fn is_page(req: &axum::extract::Request) -> bool {
    let path = req.uri().path();
    req.method() == axum::http::Method::GET
        && (path == "/" || path == "/jobs" || path.starts_with("/jobs/"))
        && req
            .headers()
            .get(axum::http::header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|a| a.contains("text/html"))
}

/// The credential each HTTP route needs: none for `/healthz`, `/readyz` and the webhooks (which
/// carry their own signatures) and, with `metrics_public`, `/metrics`; any valid one for
/// `/metrics`; `admin` for the MCP endpoint (its tools run and read jobs of any tenant);
/// `approve` to decide from the dashboard; `read` for the rest. The caller's identity goes with the request to its handler.
async fn http_authorize(
    State(a): State<HttpAuth>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    use crate::auth::Role;
    let path = req.uri().path();
    let needed: Option<Option<(Role, &'static str)>> = match path {
        "/healthz" | "/readyz" | "/login" => None,
        p if p.starts_with("/hooks/") => None,
        "/metrics" if a.metrics_public => None,
        "/metrics" => Some(None),
        // Each tool then acts as the caller, in its tenant (see `mcp_tools`).
        p if p == "/mcp" || p.starts_with("/mcp/") => Some(Some((Role::Read, "the MCP endpoint"))),
        p if p.starts_with("/api/approvals/") && req.method() == axum::http::Method::POST => {
            Some(Some((Role::Approve, "deciding an approval")))
        }
        _ => Some(Some((Role::Read, "reading jobs, graphs and approvals"))),
    };
    let Some(role) = needed else {
        return next.run(req).await;
    };
    let header = req
        .headers()
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    // A browser signed in at /login: its session cookie, and for a change its CSRF token.
    if header.is_none()
        && a.auth.enabled()
        && let Some((who, csrf)) = req
            .headers()
            .get(axum::http::header::COOKIE)
            .and_then(|v| v.to_str().ok())
            .and_then(|c| crate::session::cookie(c, crate::session::SESSION_COOKIE))
            .and_then(|id| a.sessions.get(id))
    {
        let safe = matches!(
            *req.method(),
            axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
        );
        let sent = req
            .headers()
            .get(crate::session::CSRF_HEADER)
            .and_then(|v| v.to_str().ok());
        if !safe && !sent.is_some_and(|s| crate::session::same_token(s, &csrf)) {
            return (
                StatusCode::FORBIDDEN,
                axum::Json(json!({"error": "missing or wrong CSRF token: a request signed in by the session cookie that changes something sends the cascade_csrf cookie's value as X-CSRF-Token"})),
            )
                .into_response();
        }
        if let Some((role, what)) = role
            && !who.has(role)
        {
            return auth_refusal(&crate::auth::AuthError::Forbidden {
                name: who.name.to_string(),
                needed: role,
                what,
            });
        }
        if let Some(rate) = &a.rate
            && let Err(wait) = rate.take(&who.name)
        {
            return too_many_requests(&who, wait);
        }
        req.extensions_mut().insert(who);
        return next.run(req).await;
    }
    let peer = req
        .extensions()
        .get::<axum::extract::ConnectInfo<crate::listen::ConnInfo>>()
        .and_then(|c| c.0.peer.clone());
    let peer = peer.as_deref();
    let who = match role {
        Some((role, what)) => a.auth.require(header, peer, role, what).await,
        None => a.auth.authenticate(header, peer).await,
    };
    match who {
        Ok(who) => {
            if let Some(rate) = &a.rate
                && let Err(wait) = rate.take(&who.name)
            {
                return too_many_requests(&who, wait);
            }
            req.extensions_mut().insert(who);
            next.run(req).await
        }
        // Signed out, opening a page: the sign-in form, then back here.
        Err(e) if e.is_unauthenticated() && is_page(&req) => {
            let back = req
                .uri()
                .path_and_query()
                .map_or("/", |p| p.as_str())
                .to_string();
            axum::response::Redirect::to(&format!("/login?next={}", form_urlencode(&back)))
                .into_response()
        }
        Err(e) => auth_refusal(&e),
    }
}

/// What the sign-in routes need.
#[derive(Clone)]
struct LoginState {
    auth: Arc<crate::auth::Authenticator>,
    sessions: Arc<crate::session::Sessions>,
    /// Served over TLS: the cookies are `Secure`.
    secure: bool,
    /// Sign-ins count against the identity's request rate too.
    rate: Option<Arc<crate::limits::IdentityRate>>,
}

/// `/login` (the form, and its submission) and `/logout`: see [`crate::session`].
fn login_routes(state: LoginState) -> Router {
    Router::new()
        .route("/login", get(login_page).post(login_submit))
        .route("/logout", post(logout))
        .with_state(state)
}

#[derive(serde::Deserialize)]
struct LoginQuery {
    #[serde(default)]
    next: String,
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
    #[serde(default)]
    next: String,
}

/// A local path to go back to after signing in (anything else: the dashboard). Only visible
/// ASCII: a browser drops tabs and newlines from a URL, so `/\t/evil.example` would become
/// `//evil.example`, another site.
fn local_path(next: &str) -> &str {
    let visible = next
        .bytes()
        .all(|b| (0x21..=0x7e).contains(&b) && b != b'\\');
    if visible && next.starts_with('/') && !next.starts_with("//") {
        next
    } else {
        "/"
    }
}

fn form_urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The sign-in page, with `error` shown above the form.
fn login_form(status: StatusCode, next: &str, error: &str) -> Response {
    let esc = |s: &str| {
        s.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let page = include_str!("login.html")
        .replace("<!--ERROR-->", &esc(error))
        .replace("<!--NEXT-->", &esc(local_path(next)));
    (
        status,
        [
            ("content-type", "text/html; charset=utf-8"),
            ("cache-control", "no-store"),
        ],
        page,
    )
        .into_response()
}

async fn login_page(
    State(l): State<LoginState>,
    axum::extract::Query(q): axum::extract::Query<LoginQuery>,
) -> Response {
    if !l.auth.enabled() {
        // Nobody signs in: everyone on this (loopback) server is the administrator.
        return axum::response::Redirect::to(local_path(&q.next)).into_response();
    }
    login_form(StatusCode::OK, &q.next, "")
}

async fn login_submit(
    State(l): State<LoginState>,
    headers: axum::http::HeaderMap,
    axum::Form(f): axum::Form<LoginForm>,
) -> Response {
    if !l.auth.enabled() {
        return axum::response::Redirect::to(local_path(&f.next)).into_response();
    }
    // Another site's page may not sign this browser in (into the other site's account).
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site != "same-origin"
        && site != "none"
    {
        return login_form(
            StatusCode::FORBIDDEN,
            &f.next,
            "sign in from this server's own page",
        );
    }
    let bearer = format!("Bearer {}", f.token.trim());
    let who = match l
        .auth
        .require(
            Some(&bearer),
            None,
            crate::auth::Role::Read,
            "the dashboard",
        )
        .await
    {
        Ok(who) => who,
        Err(e) => return login_form(refusal_status(&e), &f.next, &e.to_string()),
    };
    if let Some(rate) = &l.rate
        && let Err(wait) = rate.take(&who.name)
    {
        return too_many_requests(&who, wait);
    }
    let Some(created) = l.sessions.create(who) else {
        return login_form(
            StatusCode::SERVICE_UNAVAILABLE,
            &f.next,
            "too many sessions are signed in; try again later",
        );
    };
    let secure = if l.secure { "; Secure" } else { "" };
    let max_age = crate::session::SESSION_TTL.as_secs();
    let mut r = axum::response::Redirect::to(local_path(&f.next)).into_response();
    let h = r.headers_mut();
    for cookie in [
        format!(
            "{}={}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}",
            crate::session::SESSION_COOKIE,
            created.id
        ),
        format!(
            "{}={}; Path=/; SameSite=Strict; Max-Age={max_age}{secure}",
            crate::session::CSRF_COOKIE,
            created.csrf
        ),
    ] {
        h.append(
            axum::http::header::SET_COOKIE,
            cookie.parse().expect("cookie values are URL-safe"),
        );
    }
    h.insert("cache-control", "no-store".parse().expect("a header value"));
    r
}

/// End the session (the middleware has checked its CSRF token) and clear the cookies.
async fn logout(State(l): State<LoginState>, headers: axum::http::HeaderMap) -> Response {
    if let Some(id) = headers
        .get(axum::http::header::COOKIE)
        .and_then(|v| v.to_str().ok())
        .and_then(|c| crate::session::cookie(c, crate::session::SESSION_COOKIE))
    {
        l.sessions.end(id);
    }
    let mut r = axum::response::Redirect::to("/login").into_response();
    for name in [crate::session::SESSION_COOKIE, crate::session::CSRF_COOKIE] {
        r.headers_mut().append(
            axum::http::header::SET_COOKIE,
            format!("{name}=; Path=/; Max-Age=0; SameSite=Strict")
                .parse()
                .expect("a header value"),
        );
    }
    r
}

/// Bind both ports and serve until [`RunningServer::stop`].
pub async fn start(
    orch: Arc<Orchestrator>,
    options: ServerOptions,
) -> Result<RunningServer, ServerError> {
    // Cancels, decisions and budgets that reach another node of a cluster for a job held here.
    orch.serve_commands();
    let settings = orch.model().auth.clone();
    let tls = match &options.tls {
        Some(t) => Some(Arc::new(
            crate::tls::Tls::load(t).map_err(ServerError::Tls)?,
        )),
        None => None,
    };
    if !settings.client_certs.is_empty()
        && options.tls.as_ref().is_none_or(|t| t.client_ca.is_none())
    {
        return Err(ServerError::Tls(
            "[[auth.client_certs]] needs [server.tls] client_ca: the CA that signs the client certificates".into(),
        ));
    }
    let auth = Arc::new(crate::auth::Authenticator::new(&settings).map_err(ServerError::Auth)?);
    if !auth.enabled() {
        // Nobody proves who they are: only this machine may call, unless the operator says.
        for (what, addr) in [("gRPC", options.grpc_addr), ("HTTP", options.http_addr)] {
            if !addr.ip().is_loopback() && !settings.allow_unauthenticated {
                return Err(ServerError::Unauthenticated { what, addr });
            }
        }
        if settings.allow_unauthenticated {
            tracing::warn!(
                "no authentication ([auth] allow_unauthenticated = true): every caller may submit, read and approve"
            );
        } else {
            tracing::info!(
                "no authentication configured ([[auth.api_keys]]): serving on loopback only"
            );
        }
    }
    let grpc = TcpListener::bind(options.grpc_addr)
        .await
        .map_err(|source| ServerError::Bind {
            what: "gRPC",
            flag: "grpc-addr",
            addr: options.grpc_addr,
            source,
        })?;
    let http = TcpListener::bind(options.http_addr)
        .await
        .map_err(|source| ServerError::Bind {
            what: "HTTP",
            flag: "http-addr",
            addr: options.http_addr,
            source,
        })?;
    let grpc_addr = grpc.local_addr().unwrap_or(options.grpc_addr);
    let http_addr = http.local_addr().unwrap_or(options.http_addr);
    // Connections within the descriptor limit; see `listen`.
    let nofile = crate::listen::raise_nofile_limit();
    let budget = crate::listen::Budget::from_limit(nofile)
        .per_address(options.limits.connections_per_address);
    tracing::debug!(
        nofile,
        connections = budget.capacity,
        "connection budget from RLIMIT_NOFILE"
    );
    let grpc = crate::listen::Acceptor::new(grpc, budget.clone(), "grpc", false)
        .first_request_within(options.first_request_timeout);
    let http = crate::listen::Acceptor::new(http, budget, "http", true)
        .first_request_within(options.first_request_timeout);
    let (stop, stopped) = watch::channel(false);
    let (orch_for_triggers, stopped_for_triggers) = (orch.clone(), stopped.clone());
    let mut tasks = Vec::new();
    if let Some(tls) = &tls {
        tls.clone().watch(stopped.clone());
    }
    let grpc = grpc.incoming(tls.clone());
    let http = http.incoming(tls.clone());
    crate::metrics::install();

    // Before anything is accepted: a job submitted at once may propose at once.
    let (notices, notice_rx) = mpsc::channel(APPROVAL_NOTICES_WAITING);
    orch.set_approval_sink(notices);
    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<CascadeServer<CascadeService>>().await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(pb::FILE_DESCRIPTOR_SET)
        .build_v1()
        .expect("the generated descriptor set is valid");
    // Per identity: only with authentication on (without it, every caller is one anonymous
    // administrator on loopback).
    let rate = auth.enabled().then(|| {
        Arc::new(crate::limits::IdentityRate::new(
            options.limits.requests_per_second_per_identity,
        ))
    });
    let streams = auth.enabled().then(|| {
        Arc::new(crate::limits::StreamCounts::new(
            options.limits.watch_streams_per_identity,
        ))
    });
    let service = CascadeServer::new(
        CascadeService::new(orch.clone(), options.max_input_bytes)
            .with_stop(stopped.clone())
            .with_audit(options.audit.clone())
            .with_auth(auth.clone())
            .with_limits(options.limits.clone(), rate.clone(), streams.clone())
            .with_reload(options.reload.clone()),
    )
    .max_decoding_message_size(options.limits.max_message_bytes);
    let mut grpc_stop = stopped.clone();
    tasks.push(tokio::spawn(async move {
        let result = tonic::transport::Server::builder()
            // A client that vanished without closing its connection (a cut network, a host
            // that died) is noticed by its missing ping answers, and its streams are dropped.
            .http2_keepalive_interval(Some(Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            // [server.limits] streams_per_connection: calls at once on one connection.
            .max_concurrent_streams(Some(options.limits.streams_per_connection))
            .layer(tower::util::MapResponseLayer::new(
                oversize_is_resource_exhausted,
            ))
            .add_service(health_service)
            .add_service(reflection)
            .add_service(service)
            // The acceptor sets TCP_NODELAY on every socket: small request/response frames must
            // not wait for Nagle's algorithm and the peer's delayed ACK.
            .serve_with_incoming_shutdown(Box::pin(grpc.into_stream()), async move {
                let _ = grpc_stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "gRPC server failed");
        }
    }));

    let sessions = Arc::new(crate::session::Sessions::default());
    let state = HttpState {
        orch: orch.clone(),
        webhook_secret: options.webhook_secret.clone(),
        replays: Arc::new(std::sync::Mutex::new(ReplayGuard::new(
            REPLAY_GUARD_CAPACITY,
        ))),
        limits: options.limits.clone(),
        streams: streams.clone(),
        hook_secrets: Arc::new(hook_secrets(&orch, options.webhook_secret.as_ref())?),
        hooks_in_flight: Default::default(),
    };
    let app = Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .route("/metrics", get(prometheus_metrics))
        .route("/", get(dashboard))
        .route("/api/graphs", get(api_graphs))
        .route("/api/nodes", get(api_nodes))
        .route("/api/events", get(api_events))
        .route("/hooks/{graph}", post(hook))
        .route("/hooks/{graph}/{trigger}", post(trigger_hook))
        // The graphs as MCP tools (streamable HTTP).
        .nest_service(
            "/mcp",
            cascade_agents::mcp_host::service(
                Arc::new(crate::mcp_tools::GraphTools {
                    orch: orch.clone(),
                    authenticated: auth.enabled(),
                }),
                options.mcp_allowed_hosts.clone(),
            ),
        )
        .layer(DefaultBodyLimit::max(options.max_input_bytes))
        .with_state(state)
        .merge(crate::jobs_api::routes(orch.clone()))
        // Every route but the probes and the signed webhooks needs a credential (see
        // `http_authorize`).
        .merge(login_routes(LoginState {
            auth: auth.clone(),
            sessions: sessions.clone(),
            secure: tls.is_some(),
            rate: rate.clone(),
        }))
        .layer(axum::middleware::from_fn_with_state(
            HttpAuth {
                auth: auth.clone(),
                metrics_public: settings.metrics_public,
                sessions,
                rate,
            },
            http_authorize,
        ));
    let mut http_stop = stopped.clone();
    tasks.push(tokio::spawn(async move {
        let result = axum::serve(
            http,
            app.into_make_service_with_connect_info::<crate::listen::ConnInfo>(),
        )
        .with_graceful_shutdown(async move {
            let _ = http_stop.wait_for(|s| *s).await;
        })
        .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "HTTP server failed");
        }
    }));

    let (tx, rx) = mpsc::channel(65_536);
    orch.set_callback_sink(tx.clone());
    // Callbacks of jobs that finished just before the last stop, never attempted: deliver now.
    match orch.store().undelivered_callbacks(10_000) {
        Ok(ids) if !ids.is_empty() => {
            tracing::info!(
                jobs = ids.len(),
                "delivering callbacks left from before the restart"
            );
            tokio::spawn(async move {
                for id in ids {
                    if tx.send(id).await.is_err() {
                        return;
                    }
                }
            });
        }
        Ok(_) => {}
        Err(e) => tracing::error!(error = %e, "could not look for undelivered callbacks"),
    }
    let client = reqwest::Client::builder()
        .timeout(options.callback_timeout)
        .connect_timeout(options.callback_timeout)
        .build()
        .expect("an HTTP client with default TLS settings");
    if options.callback_secret.is_none() {
        tracing::warn!(
            "callbacks go out unsigned: receivers cannot tell them from forgeries; set [server] callback_secret = \"env:NAME\" in cascade.toml"
        );
    }
    tasks.push(tokio::spawn(announce_approvals(
        notice_rx,
        client.clone(),
        options.callback_secret.clone(),
        stopped.clone(),
    )));
    tasks.push(tokio::spawn(deliver_callbacks(
        orch,
        rx,
        client,
        options.callback_secret,
        options.callback_concurrency_per_host.max(1),
        stopped,
    )));

    crate::triggers::Triggers::start(&orch_for_triggers, stopped_for_triggers);
    tracing::info!(%grpc_addr, %http_addr, tls = tls.is_some(), "serving");
    Ok(RunningServer {
        grpc_addr,
        http_addr,
        stop,
        tasks,
    })
}

/// The live dashboard: one self-contained page (no CDN), embedded in the binary, with the
/// state at request time inside it so that the first frame is drawn without a round trip.
async fn dashboard(State(s): State<HttpState>) -> Response {
    let state =
        serde_json::to_string(&graph_states(&s.orch).await).unwrap_or_else(|_| "null".into());
    // JSON inside a <script>: `</` must not close it.
    let page = include_str!("dashboard.html")
        .replace("/*INITIAL_STATE*/null", &state.replace("</", "<\\/"));
    (
        [
            ("content-type", "text/html; charset=utf-8"),
            ("cache-control", "no-cache"),
        ],
        page,
    )
        .into_response()
}

async fn graph_states(orch: &Orchestrator) -> Vec<crate::runtime::GraphState> {
    let mut graphs = Vec::new();
    for name in orch.graph_names() {
        if let Some(g) = orch.graph_state(&name).await {
            graphs.push(g);
        }
    }
    graphs
}

/// Every graph's live state, as the dashboard draws it.
async fn api_graphs(State(s): State<HttpState>) -> Response {
    axum::Json(graph_states(&s.orch).await).into_response()
}

/// The nodes sharing this server's store (`[]` for a server on its own store), for the
/// dashboard: id, address, heartbeat, jobs leased.
async fn api_nodes(State(s): State<HttpState>) -> Response {
    let orch = s.orch.clone();
    let nodes = tokio::task::spawn_blocking(move || orch.store().nodes()).await;
    let ms = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    };
    match nodes {
        Ok(Ok(nodes)) => axum::Json(
            nodes
                .unwrap_or_default()
                .into_iter()
                .map(|n| {
                    serde_json::json!({
                        "id": n.id, "address": n.address, "alive": n.alive,
                        "last_heartbeat_ms": ms(n.last_heartbeat), "jobs_leased": n.jobs_leased,
                        "this_node": n.this_node,
                    })
                })
                .collect::<Vec<_>>(),
        )
        .into_response(),
        Ok(Err(e)) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("cannot list the cluster's nodes: {e}"),
        ),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
    }
}

/// Pause, resume, quota and circuit events as server-sent events.
async fn api_events(
    State(s): State<HttpState>,
    who: Option<axum::Extension<crate::auth::Identity>>,
) -> Response {
    use axum::response::sse::{Event, KeepAlive, Sse};
    use futures::StreamExt;
    // A watch stream like gRPC's WatchGraph: it counts against the caller's
    // `watch_streams_per_identity` for as long as it is open.
    let slot = match (&s.streams, who) {
        (Some(streams), Some(axum::Extension(who))) => match streams.open(&who.name) {
            Ok(slot) => Some(slot),
            Err(n) => {
                let mut r = error(
                    StatusCode::TOO_MANY_REQUESTS,
                    format!(
                        "{:?} holds {n} watch streams, [server.limits] watch_streams_per_identity; close one first",
                        &*who.name
                    ),
                );
                r.headers_mut().insert("retry-after", 1.into());
                return r;
            }
        },
        _ => None,
    };
    let stream =
        tokio_stream::wrappers::BroadcastStream::new(s.orch.watch_graphs()).filter_map(move |e| {
            let _held = &slot;
            async move {
                // A lagging watcher skips what it missed; the page refreshes the full state
                // anyway.
                let e = e.ok()?;
                Some(Ok::<_, std::convert::Infallible>(
                    Event::default().data(serde_json::to_string(&e).ok()?),
                ))
            }
        });
    Sse::new(stream)
        .keep_alive(KeepAlive::default())
        .into_response()
}

/// Prometheus text; state gauges are sampled now, so a scrape sees the current state.
async fn prometheus_metrics(State(s): State<HttpState>) -> Response {
    s.orch.sample_metrics().await;
    let body = crate::metrics::render().unwrap_or_default();
    ([("content-type", "text/plain; version=0.0.4")], body).into_response()
}

async fn ready(State(s): State<HttpState>) -> Response {
    if s.orch.is_shutting_down() {
        (StatusCode::SERVICE_UNAVAILABLE, "shutting down\n").into_response()
    } else {
        (StatusCode::OK, "ready\n").into_response()
    }
}

fn error(status: StatusCode, message: impl Into<String>) -> Response {
    (status, axum::Json(json!({ "error": message.into() }))).into_response()
}

/// `POST /hooks/{graph}`: the body (JSON) becomes a job's input. The body must be signed:
/// `X-Cascade-Timestamp` and `X-Cascade-Signature: v1=<hex HMAC-SHA256 of "<timestamp>.<body>">` (see [`crate::secret::sign`]); `Idempotency-Key` deduplicates, and is signed with the body (`"<timestamp>.<key length>:<key>.<body>"`).
async fn hook(
    State(s): State<HttpState>,
    Path(graph): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    let Some(secret) = &s.webhook_secret else {
        return error(
            StatusCode::NOT_FOUND,
            "webhooks are disabled: set [server] webhook_secret = \"env:NAME\" in cascade.toml",
        );
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let now = unix_now();
    // The key decides which job a delivery is: it is signed with the body.
    let key = match headers.get("idempotency-key").map(|v| v.to_str()) {
        None => None,
        Some(Ok(k)) => Some(k),
        Some(Err(_)) => {
            return error(
                StatusCode::BAD_REQUEST,
                "the Idempotency-Key must be visible ASCII",
            );
        }
    };
    let mac = match crate::secret::verify_keyed(
        secret,
        header("x-cascade-timestamp"),
        header("x-cascade-signature"),
        key,
        &body,
        now,
    ) {
        Ok(mac) => mac,
        Err(e) => return error(StatusCode::UNAUTHORIZED, e.to_string()),
    };
    // Remembered before the job is submitted: a replay racing the original is refused too.
    let first = {
        let mut guard = s.replays.lock().unwrap_or_else(|p| p.into_inner());
        let first = guard.first_time(mac, now);
        metrics::gauge!(crate::metrics::WEBHOOK_SIGNATURES).set(guard.len() as f64);
        first
    };
    match first {
        Some(true) => {}
        Some(false) => {
            return error(
                StatusCode::CONFLICT,
                crate::secret::SignatureError::Replayed.to_string(),
            );
        }
        None => {
            let mut r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "too many signed webhooks within the replay window; retry later",
            );
            r.headers_mut().insert("retry-after", 5.into());
            return r;
        }
    }
    // A request that is not accepted may be sent again as it is (after a Retry-After, or
    // fixed): its signature is forgotten, so that only an accepted one counts as seen.
    let forget = || {
        s.replays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(&mac);
    };
    if let Some(k) = key
        && k.len() > s.limits.max_idempotency_key_bytes
    {
        forget();
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "the Idempotency-Key is {} bytes, over [server.limits] max_idempotency_key_bytes ({})",
                k.len(),
                s.limits.max_idempotency_key_bytes
            ),
        );
    }
    if crate::limits::json_depth_over(&body, s.limits.max_json_depth) {
        forget();
        return error(
            StatusCode::BAD_REQUEST,
            format!(
                "the body nests arrays and objects deeper than [server.limits] max_json_depth ({})",
                s.limits.max_json_depth
            ),
        );
    }
    let input: serde_json::Value = match serde_json::from_slice(&body) {
        Ok(v) => v,
        Err(e) => {
            forget();
            return error(
                StatusCode::BAD_REQUEST,
                format!("the body is not valid JSON: {e}"),
            );
        }
    };
    let mut req = SubmitRequest::new(graph, input);
    req.idempotency_key = key.map(String::from);
    req.labels.insert("source".into(), "webhook".into());
    let submitted = s.orch.submit(req).await;
    if submitted.is_err() {
        forget();
    }
    match submitted {
        Ok(sub) => (
            StatusCode::ACCEPTED,
            axum::Json(json!({ "job_id": sub.id.to_string(), "deduplicated": sub.deduplicated })),
        )
            .into_response(),
        Err(e @ SubmitError::UnknownGraph { .. }) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(e @ SubmitError::KeyConflict(_)) => error(StatusCode::CONFLICT, e.to_string()),
        Err(e @ SubmitError::TenantNotAllowed { .. }) => {
            error(StatusCode::FORBIDDEN, e.to_string())
        }
        Err(
            e @ (SubmitError::Overloaded { .. }
            | SubmitError::TenantRate { .. }
            | SubmitError::TenantFull { .. }),
        ) => {
            let secs = e
                .retry_after()
                .unwrap_or_default()
                .as_secs_f64()
                .ceil()
                .max(1.0) as u64;
            let mut r = error(StatusCode::TOO_MANY_REQUESTS, e.to_string());
            r.headers_mut().insert("retry-after", secs.into());
            r
        }
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
    }
}

const CALLBACK_ATTEMPTS: u32 = 6;

/// Callbacks queued or in flight at most; past it, the deliverer stops taking finished jobs,
/// the hand-off queue fills, and the callbacks left wait in the store for the next start.
const CALLBACKS_WAITING_MAX: usize = 16_384;

/// Destinations remembered with their concurrency limit; idle ones are forgotten past this.
const CALLBACK_HOSTS_MAX: usize = 1_024;

/// One destination of callbacks: scheme, host and port (the URL's origin).
fn callback_origin(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => u.origin().ascii_serialization(),
        Err(_) => String::new(),
    }
}

async fn deliver_callbacks(
    orch: Arc<Orchestrator>,
    mut rx: mpsc::Receiver<JobId>,
    client: reqwest::Client,
    secret: Option<Secret>,
    per_host: usize,
    mut stopped: watch::Receiver<bool>,
) {
    let waiting = Arc::new(Semaphore::new(CALLBACKS_WAITING_MAX));
    let mut hosts: std::collections::HashMap<String, Arc<Semaphore>> = Default::default();
    let gauge = metrics::gauge!(crate::metrics::CALLBACKS_WAITING);
    loop {
        let id = tokio::select! {
            id = rx.recv() => match id { Some(id) => id, None => return },
            _ = stopped.wait_for(|s| *s) => return,
        };
        let Ok(Some(job)) = orch.get(id) else {
            continue;
        };
        let Some(url) = job.callback_url.clone() else {
            continue;
        };
        let Ok(slot) = waiting.clone().acquire_owned().await else {
            return;
        };
        if hosts.len() >= CALLBACK_HOSTS_MAX {
            // Forget destinations nothing waits on.
            hosts.retain(|_, sem| Arc::strong_count(sem) > 1);
        }
        let host = hosts
            .entry(callback_origin(&url))
            .or_insert_with(|| Arc::new(Semaphore::new(per_host)))
            .clone();
        gauge.increment(1.0);
        let (orch, client, secret, gauge) =
            (orch.clone(), client.clone(), secret.clone(), gauge.clone());
        tokio::spawn(async move {
            // Each destination has its own few slots: a receiver that never answers holds
            // its own, and every other receiver's callbacks go on.
            if let Ok(_turn) = host.acquire().await {
                deliver(&orch, &client, secret.as_ref(), job, url).await;
            }
            drop(slot);
            gauge.decrement(1.0);
        });
    }
}

/// Proposals waiting to be announced at most; past it, a proposal is not announced (it is
/// stored and listed all the same) and a warning says so.
const APPROVAL_NOTICES_WAITING: usize = 1_024;

/// Announcements sent at once at most.
const APPROVAL_NOTICES_AT_ONCE: usize = 16;

/// Announce new proposals at their agents' `approval_webhook`: a Slack-compatible body (`text`
/// and `blocks`, which a Slack incoming webhook shows as they are) with the approval's fields
/// beside them for other receivers, signed like callbacks, tried three times.
async fn announce_approvals(
    mut rx: mpsc::Receiver<crate::runtime::ApprovalNotice>,
    client: reqwest::Client,
    secret: Option<Secret>,
    mut stopped: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(APPROVAL_NOTICES_AT_ONCE));
    loop {
        let notice = tokio::select! {
            n = rx.recv() => match n { Some(n) => n, None => return },
            _ = stopped.wait_for(|s| *s) => return,
        };
        let Ok(slot) = slots.clone().acquire_owned().await else {
            return;
        };
        let (client, secret) = (client.clone(), secret.clone());
        tokio::spawn(async move {
            announce(&client, secret.as_ref(), &notice).await;
            drop(slot);
        });
    }
}

/// The body an approval webhook receives.
pub fn approval_notice_body(v: &crate::job::ApprovalView) -> serde_json::Value {
    let a = &v.approval;
    let proposal: serde_json::Value =
        serde_json::from_str(&a.proposal).unwrap_or(serde_json::Value::Null);
    let mut shown = serde_json::to_string_pretty(&proposal).unwrap_or_default();
    // A Slack text block holds 3,000 characters.
    if shown.len() > 2_800 {
        let cut = (0..=2_800)
            .rev()
            .find(|&i| shown.is_char_boundary(i))
            .unwrap_or(0);
        shown.truncate(cut);
        shown.push_str("\n… (cut; the whole proposal: cascade approvals show)");
    }
    let command = format!(
        "cascade approvals approve {} --sha256 {} --as NAME",
        a.id, a.sha256
    );
    let text = format!(
        "Approval needed: {} in graph {} (job {}). Review with `cascade approvals show {}`, approve with `{command}`.",
        v.agent, v.graph, v.job_id, a.id
    );
    json!({
        "text": text,
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": format!("*Approval needed*: `{}` in graph `{}`", v.agent, v.graph)}},
            {"type": "section", "text": {"type": "mrkdwn", "text": format!("```{shown}```")}},
            {"type": "context", "elements": [{"type": "mrkdwn", "text": format!("approval `{}` · sha256 `{}` · `{command}`", a.id, a.sha256)}]},
        ],
        "approval_id": a.id,
        "job_id": v.job_id.to_string(),
        "graph": &*v.graph,
        "agent": &*v.agent,
        "tenant": v.tenant,
        "proposal": proposal,
        "proposal_sha256": a.sha256,
        "expires_at": a.expires_at.map(|t| humantime::format_rfc3339_millis(t).to_string()),
    })
}

async fn announce(
    client: &reqwest::Client,
    secret: Option<&Secret>,
    notice: &crate::runtime::ApprovalNotice,
) {
    let body = serde_json::to_vec(&approval_notice_body(&notice.approval)).unwrap_or_default();
    let id = &notice.approval.approval.id;
    let mut last = String::new();
    for attempt in 1..=3u32 {
        let req = signed_post(
            client,
            &notice.url,
            secret,
            &format!("{id}/proposed"),
            &body,
        )
        .header("x-cascade-approval", id.as_str());
        match req.send().await {
            Ok(r) if r.status().is_success() => return,
            Ok(r) => last = format!("answered HTTP {}", r.status()),
            Err(e) => last = format!("failed: {}", e.without_url()),
        }
        if attempt < 3 {
            tokio::time::sleep(Duration::from_millis(500 << attempt)).await;
        }
    }
    tracing::warn!(approval_id = %id, error = %last, "the approval webhook was not delivered (the approval is listed all the same)");
}

/// A JSON POST of `body` with Idempotency-Key `key`, both signed with `secret` when there is
/// one. Signed anew at every attempt: a receiver that refuses replays takes a retry.
fn signed_post(
    client: &reqwest::Client,
    url: &str,
    secret: Option<&Secret>,
    key: &str,
    body: &[u8],
) -> reqwest::RequestBuilder {
    let mut req = client
        .post(url)
        .header("content-type", "application/json")
        .header("idempotency-key", key)
        .body(body.to_vec());
    if let Some(s) = secret {
        let ts = unix_now();
        req = req.header("x-cascade-timestamp", ts.to_string()).header(
            "x-cascade-signature",
            crate::secret::sign_keyed(s, ts, Some(key), body),
        );
    }
    req
}

fn unix_now() -> u64 {
    crate::clock::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs()
}

/// POST the job's outcome to its callback URL, retrying with backoff; record how it went.
async fn deliver(
    orch: &Orchestrator,
    client: &reqwest::Client,
    secret: Option<&Secret>,
    job: crate::job::JobRecord,
    url: String,
) {
    let id = job.id;
    let body = serde_json::to_vec(&json!({
        "job_id": job.id.to_string(),
        "graph": &*job.graph,
        "state": job.state,
        "output": job.output,
        "error": job.error,
        "usage": job.usage,
    }))
    .unwrap_or_default();
    let mut delivery = CallbackDelivery::default();
    for attempt in 1..=CALLBACK_ATTEMPTS {
        delivery.attempts = attempt;
        let req = signed_post(client, &url, secret, &format!("{id}/callback"), &body)
            .header("x-cascade-job", id.to_string());
        match req.send().await {
            Ok(r) if r.status().is_success() => {
                delivery.delivered = true;
                delivery.delivered_at = Some(crate::clock::now());
                delivery.last_error = None;
                break;
            }
            Ok(r) => delivery.last_error = Some(format!("callback answered HTTP {}", r.status())),
            // Without the URL: it may carry credentials in its query.
            Err(e) => delivery.last_error = Some(format!("callback failed: {}", e.without_url())),
        }
        if attempt < CALLBACK_ATTEMPTS {
            let delay =
                Duration::from_millis(500 * (1 << (attempt - 1))).min(Duration::from_secs(30));
            tokio::time::sleep(delay.mul_f64(0.5 + rand::random::<f64>() * 0.5)).await;
        }
    }
    let outcome = if delivery.delivered {
        "delivered"
    } else {
        "failed"
    };
    metrics::counter!(crate::metrics::CALLBACKS_DELIVERED, "outcome" => outcome).increment(1);
    if !delivery.delivered {
        tracing::warn!(job_id = %id, attempts = delivery.attempts, error = ?delivery.last_error, "callback not delivered");
    }
    if let Err(e) = orch.store().update(id, JobUpdate::Callback(delivery)) {
        tracing::error!(job_id = %id, error = %e, "could not record the callback's delivery");
    }
}

/// A webhook trigger's answer for a graph that cannot take the event now: 503 with
/// `Retry-After` (every provider retries it; Zendesk only under a minute).
fn retry_later(wait: Duration, why: impl Into<String>) -> Response {
    let secs = wait.as_secs_f64().ceil().clamp(1.0, 59.0) as u64;
    let mut r = error(StatusCode::SERVICE_UNAVAILABLE, why);
    r.headers_mut().insert("retry-after", secs.into());
    r
}

/// Headers a trigger's templates see: every one but credentials (lower-case names).
fn visible_headers(headers: &HeaderMap) -> std::collections::BTreeMap<String, String> {
    headers
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "authorization" | "cookie" | "proxy-authorization"
            )
        })
        .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
        .collect()
}

/// A webhook body as an event: JSON, or a form (Slack's slash commands and interactions,
/// whose `payload` field is JSON itself), else text.
fn hook_body(headers: &HeaderMap, body: &[u8]) -> Result<serde_json::Value, String> {
    let form = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|c| c.starts_with("application/x-www-form-urlencoded"));
    if form {
        let mut map = serde_json::Map::new();
        for (k, v) in form_urlencoded::parse(body) {
            let value = if k == "payload" {
                serde_json::from_str(&v).unwrap_or(serde_json::Value::String(v.into_owned()))
            } else {
                serde_json::Value::String(v.into_owned())
            };
            map.insert(k.into_owned(), value);
        }
        return Ok(serde_json::Value::Object(map));
    }
    if body.is_empty() {
        return Ok(serde_json::Value::Null);
    }
    serde_json::from_slice(body).map_err(|e| format!("the body is not valid JSON: {e}"))
}

/// `POST /hooks/{graph}/{trigger}`: a provider's webhook, verified by its own signature scheme
/// (see [`crate::triggers::verify`]), becomes a job by the trigger's rules. The answer comes
/// once the job is durably accepted: 202 with its id, 200 for a duplicate (or a replayed
/// signature: nothing starts), 200 for an event `when` drops, 503 with `Retry-After` while
/// the graph is full or paused or the trigger is paused, 401 for a bad signature, 422 for an
/// event that cannot become a job.
async fn trigger_hook(
    State(s): State<HttpState>,
    Path((graph, trigger)): Path<(String, String)>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Response {
    use crate::triggers::{Event, Outcome, TriggerSource, verify};
    // Unsigned callers learn nothing about which triggers exist.
    let not_found = || {
        error(
            StatusCode::NOT_FOUND,
            format!(
                "no webhook trigger {} on graph {}",
                crate::text::echo(&trigger),
                crate::text::echo(&graph)
            ),
        )
    };
    let Ok(t) = s.orch.triggers().get(&graph, &trigger).cloned() else {
        return not_found();
    };
    let TriggerSource::Webhook(spec) = &t.model.source else {
        return not_found();
    };
    if t.is_paused() {
        return retry_later(
            Duration::from_secs(30),
            format!(
                "trigger {:?} is paused by an operator (cascade triggers resume)",
                &*t.model.name
            ),
        );
    }
    let secret = match s
        .hook_secrets
        .get(&(graph.clone(), trigger.clone()))
        .map(|c| c.value())
    {
        Some(Ok(v)) => v,
        Some(Err(e)) => {
            tracing::error!(%graph, %trigger, error = %e, "a webhook trigger's secret cannot be read");
            return retry_later(
                Duration::from_secs(30),
                "the trigger's secret cannot be read now",
            );
        }
        None => return error(StatusCode::NOT_FOUND, "the trigger has no secret loaded"),
    };
    let lookup = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let now = unix_now();
    let verified = match verify::verify(spec.verify, &secret, lookup, &body, now, spec.tolerance) {
        Ok(v) => v,
        Err(e) => {
            metrics::counter!(crate::metrics::TRIGGER_EVENTS, "graph" => graph.clone(), "trigger" => trigger.clone(), "outcome" => "unauthenticated").increment(1);
            return error(StatusCode::UNAUTHORIZED, e.to_string());
        }
    };
    // A signature seen within the window starts nothing a second time (the provider has its
    // answer already; a captured request replayed by someone else gets nothing).
    let first = {
        let mut guard = s.replays.lock().unwrap_or_else(|p| p.into_inner());
        let first = guard.first_time(verified.mac, now);
        metrics::gauge!(crate::metrics::WEBHOOK_SIGNATURES).set(guard.len() as f64);
        first
    };
    let in_flight = &s.hooks_in_flight;
    let _handling = match first {
        Some(true) => {
            in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(verified.mac);
            InFlight(in_flight, verified.mac)
        }
        Some(false) => {
            let pending = in_flight
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains(&verified.mac);
            if pending {
                return retry_later(
                    Duration::from_secs(1),
                    "the same request is being handled now; retry",
                );
            }
            return (
                StatusCode::OK,
                axum::Json(json!({"deduplicated": true, "replay": true})),
            )
                .into_response();
        }
        None => {
            return retry_later(
                Duration::from_secs(5),
                "too many signed webhooks within the replay window",
            );
        }
    };
    let forget = || {
        s.replays
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .forget(&verified.mac);
    };
    if crate::limits::json_depth_over(&body, s.limits.max_json_depth) {
        forget();
        return error(
            StatusCode::UNPROCESSABLE_ENTITY,
            format!(
                "the body nests arrays and objects deeper than [server.limits] max_json_depth ({})",
                s.limits.max_json_depth
            ),
        );
    }
    let event_body = match hook_body(&headers, &body) {
        Ok(v) => v,
        Err(e) => {
            forget();
            return error(StatusCode::UNPROCESSABLE_ENTITY, e);
        }
    };
    // Slack checks a new Events API URL with a challenge, answered once the signature is good.
    if spec.verify == verify::Provider::Slack
        && event_body.get("type").and_then(|v| v.as_str()) == Some("url_verification")
    {
        let challenge = event_body
            .get("challenge")
            .cloned()
            .unwrap_or(serde_json::Value::Null);
        return (
            StatusCode::OK,
            axum::Json(json!({ "challenge": challenge })),
        )
            .into_response();
    }
    let id = verify::event_id(spec.verify, lookup, &event_body, &verified);
    let mut meta = serde_json::Map::new();
    meta.insert("provider".into(), json!(spec.verify.as_str()));
    let event = Event {
        body: event_body,
        headers: visible_headers(&headers),
        id: Some(id),
        meta,
    };
    match t.fire(&s.orch, event, false).await {
        Outcome::Started(id) => (
            StatusCode::ACCEPTED,
            axum::Json(json!({ "job_id": id.to_string(), "deduplicated": false })),
        )
            .into_response(),
        Outcome::Deduplicated(id) => (
            StatusCode::OK,
            axum::Json(json!({ "job_id": id.to_string(), "deduplicated": true })),
        )
            .into_response(),
        Outcome::Dropped => {
            (StatusCode::OK, axum::Json(json!({ "dropped": true }))).into_response()
        }
        Outcome::Retry(wait, why) => {
            forget();
            retry_later(wait, why)
        }
        Outcome::Invalid(reason) => {
            forget();
            error(StatusCode::UNPROCESSABLE_ENTITY, reason)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::local_path;

    #[test]
    fn sign_in_goes_back_to_local_paths_only() {
        for ok in ["/", "/jobs", "/jobs/0193?graph=a&state=failed"] {
            assert_eq!(local_path(ok), ok);
        }
        for bad in [
            "//evil.example",
            "/\t/evil.example",
            "/\\evil.example",
            "https://evil.example",
            "jobs",
            "/jobs\r\nSet-Cookie: x=1",
            "",
        ] {
            assert_eq!(local_path(bad), "/", "{bad:?}");
        }
    }
}
