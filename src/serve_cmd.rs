//! `cascade serve`: the gRPC and HTTP server over the durable store, until SIGTERM or Ctrl-C.
//!
//! SIGHUP and the ReloadGraphs RPC read the config and graph files again. Files with errors keep
//! the running graphs (the errors are logged, or answered). Valid ones are served by restarting
//! the engine in place: the server stops as on SIGTERM (in-flight steps get the shutdown grace,
//! everything accepted is in the durable store) and then replaces itself (`exec`, same process
//! id, same arguments) with a server of the new files, which resumes every unfinished job.
//! (A restart rather than swapping graphs inside a running engine: the new engine starts from
//! exactly what a restart after `kill -9` starts from, a path tested already.)

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use cascade_orchestrator::agents::Registry;
use cascade_orchestrator::audit::checkpoint::Signer;
use cascade_orchestrator::audit::log::AuditLog;
use cascade_orchestrator::audit::pg::PgAuditOptions;
use cascade_orchestrator::model::ServerModel;
use cascade_orchestrator::model::StoreSetting;
use cascade_orchestrator::quota::shared::{SharedQuotaOptions, SharedQuotas};
use cascade_orchestrator::server::{self, ServerOptions};
use cascade_orchestrator::store::{
    JobStore, MemoryStore, PgOptions, PgStore, SqliteOptions, SqliteStore,
};
use cascade_orchestrator::{Orchestrator, config};
use clap::Args;

#[derive(Args, Clone)]
pub struct ServeArgs {
    /// Server config listing the graphs (default: ./cascade.toml).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// gRPC address (default 127.0.0.1:50051, or [server] grpc_addr).
    #[arg(long)]
    pub grpc_addr: Option<SocketAddr>,
    /// HTTP address for health, webhooks, metrics (default 127.0.0.1:8080, or [server] http_addr).
    #[arg(long)]
    pub http_addr: Option<SocketAddr>,
    /// Where the job store lives (default ./cascade-data, or [server] data_dir); overrides
    /// [server] store with an SQLite file there.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// This node's name in a cluster on PostgreSQL (default: host name and gRPC port). A node
    /// started again under its name takes back the jobs it held.
    #[arg(long)]
    pub node_id: Option<String>,
    /// Keep jobs in memory only (nothing survives a restart).
    #[arg(long)]
    pub memory: bool,
    /// Naive mode: no pause propagation; 429s retried by each agent's policy.
    #[arg(long)]
    pub no_cascade: bool,
}

pub fn run(args: ServeArgs, json_logs: bool) -> anyhow::Result<ExitCode> {
    let path = match &args.config {
        Some(p) => p.clone(),
        None if Path::new("cascade.toml").exists() => PathBuf::from("cascade.toml"),
        None => bail!(
            "no server config: pass --config FILE (examples/cascade.toml serves the example graphs)"
        ),
    };
    let model = match config::load(Some(&path), &[], &Registry::default()) {
        Ok(m) => m,
        Err(errors) => {
            eprintln!("{errors}");
            return Ok(ExitCode::FAILURE);
        }
    };
    if model.graphs.is_empty() {
        bail!(
            "{} lists no graphs: add graphs = [\"graphs/\"] (files or directories)",
            path.display()
        );
    }
    let telemetry = model.telemetry.clone();
    let reload = Arc::new(AtomicBool::new(false));
    let code = crate::block_on_traced(
        json_logs,
        &telemetry,
        serve(model, args, path, reload.clone()),
    )?;
    if reload.load(Ordering::SeqCst) {
        return Err(restart_in_place());
    }
    Ok(code)
}

/// Replace this process with `cascade serve` of the same arguments (its files read anew); only
/// returns if that fails (then the process exits with an error, for its supervisor to start it
/// again: everything it accepted is in the store).
fn restart_in_place() -> anyhow::Error {
    use std::os::unix::process::CommandExt;
    // The running program itself, even if a package upgrade replaced its file since.
    let exe = PathBuf::from("/proc/self/exe");
    let exe = if exe.exists() {
        exe
    } else {
        match std::env::current_exe() {
            Ok(exe) => exe,
            Err(e) => return anyhow::anyhow!("cannot find this program to restart it: {e}"),
        }
    };
    eprintln!("reloading: restarting in place");
    let e = std::process::Command::new(&exe)
        .args(std::env::args_os().skip(1))
        .exec();
    anyhow::anyhow!(
        "cannot restart in place ({e}); start `cascade serve` again to serve the new files (nothing accepted is lost: it is in the store)"
    )
}

/// Read the server's files at `path` again and check everything a start checks before it
/// serves (secrets resolve, addresses parse, keys and certificates load): the graphs they
/// list, or every error. So a reload that is let go does not stop at its start.
fn reread(path: &Path, args: &ServeArgs) -> Result<Vec<String>, String> {
    let model = config::load(Some(path), &[], &Registry::default()).map_err(|e| e.to_string())?;
    if model.graphs.is_empty() {
        return Err(format!(
            "{} lists no graphs: add graphs = [\"graphs/\"] (files or directories)",
            path.display()
        ));
    }
    let (options, _) = options(&model, args).map_err(|e| format!("{e:#}"))?;
    let auth = cascade_orchestrator::auth::Authenticator::new(&model.auth)
        .map_err(|e| format!("[auth]: {e}"))?;
    if !auth.enabled() && !model.auth.allow_unauthenticated {
        for addr in [options.grpc_addr, options.http_addr] {
            if !addr.ip().is_loopback() {
                return Err(format!(
                    "{addr} is not loopback and no [[auth.api_keys]] are declared: declare keys, bind to 127.0.0.1, or set [auth] allow_unauthenticated = true"
                ));
            }
        }
    }
    if let Some(tls) = &model.server.tls {
        cascade_orchestrator::tls::Tls::load(tls)?;
    }
    if !model.auth.client_certs.is_empty()
        && model
            .server
            .tls
            .as_ref()
            .is_none_or(|t| t.client_ca.is_none())
    {
        return Err(
            "[[auth.client_certs]] needs [server.tls] client_ca: the CA that signs the client certificates".into(),
        );
    }
    if let Some(reference) = &model.audit.signing_key {
        let key = reference
            .resolve()
            .map_err(|e| format!("[audit] signing_key: {e}"))?;
        let text = key.expose_str().ok_or("[audit] signing_key is not text")?;
        Signer::from_key(text).map_err(|e| format!("[audit] signing_key: {e}"))?;
    }
    if let Some(reference) = &model.server.store_password {
        reference
            .resolve()
            .map_err(|e| format!("[server] store_password: {e}"))?;
    }
    if let Some(reference) = &model.server.quota_backend_password {
        reference
            .resolve()
            .map_err(|e| format!("[server] quota_backend_password: {e}"))?;
    }
    Ok(model.graphs.iter().map(|g| g.name.to_string()).collect())
}

/// Addresses and store from flags, else the config file, else defaults.
pub fn options(
    model: &ServerModel,
    args: &ServeArgs,
) -> anyhow::Result<(ServerOptions, StoreChoice)> {
    let s = &model.server;
    let mut o = ServerOptions::default();
    if let Some(a) = args.grpc_addr.or(s
        .grpc_addr
        .as_deref()
        .map(str::parse)
        .transpose()
        .context("[server] grpc_addr")?)
    {
        o.grpc_addr = a;
    }
    if let Some(a) = args.http_addr.or(s
        .http_addr
        .as_deref()
        .map(str::parse)
        .transpose()
        .context("[server] http_addr")?)
    {
        o.http_addr = a;
    }
    if let Some(n) = s.max_input_bytes {
        o.max_input_bytes = n;
    }
    if let Some(t) = s.callback_timeout {
        o.callback_timeout = t;
    }
    if let Some(n) = s.callback_concurrency_per_host {
        o.callback_concurrency_per_host = n;
    }
    o.mcp_allowed_hosts = s.mcp_allowed_hosts.clone();
    o.tls = s.tls.clone();
    o.limits = s.limits.clone();
    o.webhook_secret = s
        .webhook_secret
        .as_ref()
        .map(|r| r.resolve())
        .transpose()
        .map_err(anyhow::Error::msg)?;
    o.callback_secret = s
        .callback_secret
        .as_ref()
        .map(|r| r.resolve())
        .transpose()
        .map_err(anyhow::Error::msg)?;
    // `--memory` > `--data-dir` > `[server] store` > `[server] data_dir`.
    let dir = || {
        args.data_dir
            .clone()
            .or_else(|| s.data_dir.clone())
            .unwrap_or_else(|| PathBuf::from("cascade-data"))
    };
    let store = match (&s.store, args.memory, &args.data_dir) {
        (_, true, _) | (StoreSetting::Memory, false, None) => StoreChoice::Memory,
        (_, false, Some(_)) | (StoreSetting::Sqlite, false, None) => StoreChoice::Sqlite(dir()),
        (StoreSetting::Postgres(url), false, None) => StoreChoice::Postgres {
            url: url.clone(),
            node_id: args.node_id.clone().unwrap_or_else(|| {
                format!(
                    "{}:{}",
                    cascade_orchestrator::store::host_name(),
                    o.grpc_addr.port()
                )
            }),
            address: o.grpc_addr.to_string(),
        },
    };
    Ok((o, store))
}

/// Where `cascade serve` keeps its jobs.
#[derive(Clone, Debug)]
pub enum StoreChoice {
    Memory,
    /// `cascade.db` in this directory.
    Sqlite(PathBuf),
    /// A PostgreSQL database shared by the nodes of a cluster, audit log included.
    Postgres {
        url: String,
        /// This node's name in the cluster.
        node_id: String,
        /// Its gRPC address, for the other nodes.
        address: String,
    },
}

impl StoreChoice {
    /// Whether jobs outlive the process.
    pub fn durable(&self) -> bool {
        !matches!(self, Self::Memory)
    }

    fn describe(&self) -> String {
        match self {
            Self::Memory => "memory".into(),
            Self::Sqlite(dir) => dir.join("cascade.db").display().to_string(),
            Self::Postgres { url, node_id, .. } => format!("{url}, node {node_id}"),
        }
    }
}

/// The cluster's shared quotas (`[server] quota_backend`, with the PostgreSQL store), told how
/// many nodes are alive as the store's heartbeats show (their share under `local_share`).
async fn start_shared_quotas(
    model: &ServerModel,
    choice: &StoreChoice,
    store: &Arc<dyn JobStore>,
) -> anyhow::Result<Option<Arc<SharedQuotas>>> {
    let (Some(url), StoreChoice::Postgres { node_id, .. }) = (&model.server.quota_backend, choice)
    else {
        if model.server.quota_backend.is_some() {
            eprintln!(
                "warning: [server] quota_backend is for a cluster on PostgreSQL; this node keeps its quotas locally"
            );
        }
        return Ok(None);
    };
    let full = cascade_orchestrator::quota::shared::url_with_password(
        url,
        model.server.quota_backend_password.as_ref(),
    )
    .map_err(|e| anyhow::anyhow!("[server] quota_backend_password: {e}"))?;
    let mut o = SharedQuotaOptions::new(full, url.clone(), node_id.clone());
    o.fallback = model.server.quota_fallback;
    let q = SharedQuotas::start(o).await.map_err(anyhow::Error::msg)?;
    // A call that waited for its turn does not leave once this node's leases are in doubt.
    let fence = Arc::downgrade(store);
    q.set_fence(Arc::new(move || {
        fence.upgrade().is_some_and(|s| s.fenced())
    }));
    let (weak, store) = (Arc::downgrade(&q), store.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            let Some(q) = weak.upgrade() else { return };
            if let Some(n) = store.live_nodes() {
                q.set_live_nodes(n);
            }
        }
    });
    Ok(Some(q))
}

pub fn open_store(model: &ServerModel, choice: &StoreChoice) -> anyhow::Result<Arc<dyn JobStore>> {
    Ok(match choice {
        StoreChoice::Postgres {
            url,
            node_id,
            address,
            ..
        } => {
            let mut o = PgOptions::new(url.clone());
            o.node_id = node_id.clone();
            o.address = address.clone();
            if let Some(lease) = model.server.lease {
                o.lease = lease;
            }
            o.password = model
                .server
                .store_password
                .as_ref()
                .map(|r| r.resolve())
                .transpose()
                .map_err(|e| anyhow::anyhow!("[server] store_password: {e}"))?;
            if let Some(r) = model.server.retention {
                o.retention = r;
            }
            if let Some(n) = model.server.max_events_per_job {
                o.max_events_per_job = n;
            }
            if let Some(n) = model.server.store_queue_capacity {
                o.queue_capacity = n;
            }
            Arc::new(PgStore::open(o)?)
        }
        StoreChoice::Memory => Arc::new(match model.server.max_events_per_job {
            Some(n) => MemoryStore::new().with_max_events_per_job(n),
            None => MemoryStore::new(),
        }),
        StoreChoice::Sqlite(dir) => {
            let mut o = SqliteOptions::new(dir.join("cascade.db"));
            if let Some(r) = model.server.retention {
                o.retention = r;
            }
            if let Some(n) = model.server.max_events_per_job {
                o.max_events_per_job = n;
            }
            if let Some(n) = model.server.store_queue_capacity {
                o.queue_capacity = n;
            }
            Arc::new(SqliteStore::open(o)?)
        }
    })
}

async fn serve(
    model: ServerModel,
    args: ServeArgs,
    config: PathBuf,
    reload: Arc<AtomicBool>,
) -> anyhow::Result<ExitCode> {
    // Before anything is accepted, so a SIGTERM at any later moment is a graceful stop.
    let stop = shutdown_signal()?;
    // A reload asked for (by ReloadGraphs, or SIGHUP) once the files are found valid.
    let (reload_tx, mut reload_rx) = tokio::sync::mpsc::channel::<()>(1);
    watch_sighup(
        config.clone(),
        args.clone(),
        reload_tx.clone(),
        !args.memory,
    )?;
    if let Some(endpoint) = &model.telemetry.otlp_endpoint {
        eprintln!(
            "exporting traces of {:.0}% of jobs to {endpoint} (OTLP/gRPC)",
            model.telemetry.sample_ratio * 100.0
        );
    }
    // Before the store opens: a PostgreSQL store's lease rounds take their metric handles at
    // once, and handles taken before the recorder is installed record nothing.
    cascade_orchestrator::metrics::install();
    let (mut options, store_choice) = options(&model, &args)?;
    // A server on the durable store may restart in place; one in memory would lose its jobs.
    if store_choice.durable() {
        let path = config.clone();
        let again = args.clone();
        options.reload = Some(server::Reloader(Arc::new(move || {
            let graphs = reread(&path, &again)?;
            let _ = reload_tx.try_send(());
            Ok(graphs)
        })));
    }
    let grace = model
        .server
        .shutdown_grace
        .unwrap_or(Duration::from_secs(30));
    let store = open_store(&model, &store_choice)?;
    let audit = match &store_choice {
        StoreChoice::Memory => {
            eprintln!("warning: with --memory there is no audit log");
            None
        }
        choice => Some(open_audit(&model, &config, choice).await?),
    };
    options.audit = audit.clone();
    let checkpoints = audit.clone().map(|log| {
        let every = model.audit.checkpoint_every;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let log = log.clone();
                match tokio::task::spawn_blocking(move || log.checkpoint()).await {
                    Ok(Err(e)) => tracing::error!(error = %e, "cannot sign an audit checkpoint"),
                    Err(e) => tracing::error!(error = %e, "the audit checkpoint task failed"),
                    Ok(Ok(_)) => {}
                }
            }
        })
    });
    let shared_quotas = start_shared_quotas(&model, &store_choice, &store).await?;
    let graphs: Vec<String> = model.graphs.iter().map(|g| g.name.to_string()).collect();
    let mut builder = Orchestrator::builder(model)
        .store(store.clone())
        .cascade(!args.no_cascade);
    if let Some(q) = &shared_quotas {
        builder = builder.shared_quotas(q.clone());
    }
    if let Some(log) = &audit {
        builder = builder.audit(log.clone());
    }
    let orch = Arc::new(builder.start().await?);
    let server = server::start(orch.clone(), options).await?;
    eprintln!(
        "cascade serving {} on grpc://{} and http://{} (store: {})",
        graphs.join(", "),
        server.grpc_addr,
        server.http_addr,
        store_choice.describe()
    );
    let reloading = tokio::select! {
        _ = stop => false,
        Some(()) = reload_rx.recv(), if store_choice.durable() => true,
    };
    reload.store(reloading, Ordering::SeqCst);
    eprintln!(
        "{}: no new jobs; in-flight jobs get up to {}",
        if reloading {
            "reloading the graphs"
        } else {
            "shutting down"
        },
        humantime::format_duration(grace)
    );
    server.stop().await;
    orch.shutdown(grace).await;
    store.flush().await?;
    // A node of a cluster hands back what it still holds; the others take it at once.
    if !reloading {
        store.release().await?;
    }
    orch.flush_audit().await;
    if let Some(task) = checkpoints {
        task.abort();
    }
    if let Some(log) = audit {
        // In a cluster, only the node that signs does; the next signer covers the rest.
        tokio::task::spawn_blocking(move || log.checkpoint())
            .await?
            .map_err(anyhow::Error::msg)?;
    }
    Ok(ExitCode::SUCCESS)
}

/// The audit log in the store (the SQLite file, or the cluster's PostgreSQL database): a
/// `config_loaded` record naming every file this server loaded with its SHA-256, and a
/// checkpoint signed now (with `[audit] signing_key`; in a cluster, by the node that signs).
async fn open_audit(
    model: &ServerModel,
    config: &Path,
    choice: &StoreChoice,
) -> anyhow::Result<Arc<AuditLog>> {
    let signer = match &model.audit.signing_key {
        Some(reference) => {
            let key = reference.resolve().map_err(anyhow::Error::msg)?;
            let text = key
                .expose_str()
                .context("[audit] signing_key is not text")?;
            Some(Signer::from_key(text).map_err(|e| anyhow::anyhow!("[audit] signing_key: {e}"))?)
        }
        None => {
            eprintln!(
                "warning: no [audit] signing_key: audit records are hashed but no checkpoint is signed (make a key with `cascade audit new-key NAME`)"
            );
            None
        }
    };
    let origin = signer
        .as_ref()
        .map_or_else(|| "cascade".to_string(), |s| s.name().to_string());
    let log = match choice {
        StoreChoice::Postgres { url, node_id, .. } => {
            let options = PgAuditOptions {
                url: url.clone(),
                password: model
                    .server
                    .store_password
                    .as_ref()
                    .map(|r| r.resolve())
                    .transpose()
                    .map_err(|e| anyhow::anyhow!("[server] store_password: {e}"))?,
                node_id: node_id.clone(),
            };
            tokio::task::spawn_blocking(move || AuditLog::open_postgres(options, signer, &origin))
                .await?
        }
        StoreChoice::Sqlite(dir) => {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating {} for the audit log", dir.display()))?;
            AuditLog::open(&dir.join("cascade.db"), signer, &origin)
        }
        StoreChoice::Memory => unreachable!("no audit log in memory"),
    }
    .map_err(anyhow::Error::msg)?;
    let mut files = vec![config.to_path_buf()];
    files.extend(model.graphs.iter().map(|g| g.source.clone()));
    files.sort();
    files.dedup();
    let files = files
        .iter()
        .map(|f| {
            let bytes = std::fs::read(f)
                .with_context(|| format!("reading {} for the audit log", f.display()))?;
            let digest = cascade_orchestrator::audit::sha256_hex(&bytes);
            Ok(serde_json::json!({"path": f.display().to_string(), "sha256": digest}))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let log = Arc::new(log);
    let first = log.clone();
    let shared = matches!(choice, StoreChoice::Postgres { .. });
    tokio::task::spawn_blocking(move || {
        first.append(
            "server",
            "config_loaded",
            serde_json::json!({ "files": files }),
        )?;
        match first.checkpoint() {
            // In a cluster the next tick (or another node) signs: the node starts regardless.
            Err(e) if shared => {
                tracing::warn!(error = %e, "cannot sign an audit checkpoint now; the next tick tries again");
                Ok(None)
            }
            other => other,
        }
    })
    .await?
    .map_err(anyhow::Error::msg)?;
    Ok(log)
}

/// On SIGHUP, read the files at `config` again: valid, ask for the reload on `reload`; with
/// errors, log them and keep the running graphs.
fn watch_sighup(
    config: PathBuf,
    args: ServeArgs,
    reload: tokio::sync::mpsc::Sender<()>,
    durable: bool,
) -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup()).context("installing the SIGHUP handler")?;
    tokio::spawn(async move {
        while hup.recv().await.is_some() {
            if !durable {
                tracing::warn!(
                    "SIGHUP: this server keeps jobs in memory only (--memory): a reload would lose them; restart it instead"
                );
                continue;
            }
            let (path, args) = (config.clone(), args.clone());
            match tokio::task::spawn_blocking(move || reread(&path, &args)).await {
                Ok(Ok(graphs)) => {
                    tracing::info!(graphs = %graphs.join(", "), "SIGHUP: the files are valid; reloading");
                    let _ = reload.try_send(());
                }
                Ok(Err(errors)) => {
                    tracing::error!("SIGHUP: reload refused, the running graphs stay:\n{errors}");
                }
                Err(_) => {}
            }
        }
    });
    Ok(())
}

/// Resolves on SIGTERM or Ctrl-C (SIGINT); the handlers are installed when this is called.
fn shutdown_signal() -> anyhow::Result<impl Future<Output = ()>> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
        let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
        Ok(async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
        })
    }
    #[cfg(not(unix))]
    Ok(async {
        let _ = tokio::signal::ctrl_c().await;
    })
}
