//! The PostgreSQL store's schema and its versioned migrations: the groundwork of several nodes
//! on one database (the store, the nodes table and the audit tables come with their own
//! migrations as they land).
//!
//! Every start runs [`migrate`]: under a transaction-scoped advisory lock (two nodes starting at
//! once apply each migration once), it applies the versions the database lacks, in order, in
//! one transaction, and refuses a database whose schema is newer than this binary knows (a
//! rolled-back binary must not write rows a newer one laid out differently).
//!
//! Job ids are TEXT, as in the SQLite store: a UUIDv7's text sorts by creation time.
//! Values that must stay byte-exact (job inputs and outputs, event bodies, audit records) are
//! TEXT, not jsonb, which reorders keys; times are BIGINT microseconds from Cascade's clock,
//! except leases and heartbeats, which use the database's `now()` so that one clock decides
//! expiry across nodes.

pub use tokio_postgres::{Client, Row};

/// The advisory lock key migrations hold ("CASCADE" as ASCII, 7 bytes).
const MIGRATION_LOCK: i64 = 0x43_41_53_43_41_44_45;

/// Each migration: its version and its statements. Append only: a released version is never
/// edited.
pub const MIGRATIONS: &[(i32, &str)] = &[
    (
        1,
        r#"
CREATE TABLE jobs (
    id TEXT PRIMARY KEY,
    graph TEXT NOT NULL,
    state TEXT NOT NULL,
    input TEXT NOT NULL,
    output TEXT,
    error TEXT,
    labels JSONB NOT NULL DEFAULT '{}',
    tenant TEXT NOT NULL,
    idempotency_key TEXT,
    deadline_ms BIGINT,
    callback_url TEXT,
    callback TEXT,
    budget TEXT,
    created_at BIGINT NOT NULL,
    started_at BIGINT,
    finished_at BIGINT,
    updated_at BIGINT NOT NULL,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    events BIGINT NOT NULL DEFAULT 0,
    -- The node that holds the job (NULL: pending for anyone, parked or finished).
    lease_owner TEXT,
    leased_at TIMESTAMPTZ
);
-- An idempotency key names one job in the whole cluster.
CREATE UNIQUE INDEX jobs_key ON jobs (tenant, idempotency_key) WHERE idempotency_key IS NOT NULL;
CREATE INDEX jobs_pending ON jobs (graph, id) WHERE state = 'pending';
CREATE INDEX jobs_live_by_owner ON jobs (lease_owner) WHERE state IN ('pending', 'running');
CREATE INDEX jobs_live_by_tenant ON jobs (tenant) WHERE state IN ('pending', 'running');
CREATE INDEX jobs_finished ON jobs (finished_at) WHERE finished_at IS NOT NULL;
CREATE INDEX jobs_labels ON jobs USING GIN (labels);

-- The same columns as the SQLite store's steps.
CREATE TABLE steps (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    idx INTEGER NOT NULL,
    agent TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    output TEXT,
    error TEXT,
    started_at BIGINT,
    finished_at BIGINT,
    prompt_tokens BIGINT NOT NULL DEFAULT 0,
    completion_tokens BIGINT NOT NULL DEFAULT 0,
    cost_usd DOUBLE PRECISION NOT NULL DEFAULT 0,
    approval TEXT,
    sub_steps TEXT,
    PRIMARY KEY (job_id, idx)
);

CREATE TABLE events (
    job_id TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    seq BIGINT NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
);

CREATE TABLE credential_state (
    name TEXT PRIMARY KEY,
    sealed TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

CREATE TABLE trigger_state (
    key TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated_at BIGINT NOT NULL
);

"#,
    ),
    (
        2,
        r#"
-- The nodes of a cluster: each renews its heartbeat every quarter lease; a node whose heartbeat
-- is older than the lease is dead, and the jobs it leased are taken over.
CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    address TEXT NOT NULL,
    started_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    heartbeat_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    draining BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX jobs_unfinished_by_owner ON jobs (lease_owner)
    WHERE state IN ('pending', 'running', 'awaiting_approval', 'budget_exceeded');
"#,
    ),
    (
        3,
        r#"
-- Commands for the node that holds a job (a cancel, a decision, a budget raised through another
-- node): written by the node that took the request, answered by the holder.
CREATE TABLE node_commands (
    id BIGSERIAL PRIMARY KEY,
    node TEXT NOT NULL,
    job_id TEXT NOT NULL,
    command TEXT NOT NULL,
    created_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    answer TEXT,
    answered_at TIMESTAMPTZ
);
CREATE INDEX node_commands_open ON node_commands (node, id) WHERE answered_at IS NULL;
"#,
    ),
    (
        4,
        r#"
-- The audit log of the cluster: one sequence for every node's records (appended under an
-- advisory lock, without gaps), each record's exact text and its leaf hash; checkpoints signed
-- by one node at a time. Both are append-only: triggers refuse updates, deletes and truncation.
CREATE TABLE audit_log (
    seq BIGINT PRIMARY KEY,
    record TEXT NOT NULL,
    leaf BYTEA NOT NULL,
    tenant TEXT NOT NULL,
    -- The writer's token on the first record of each batch: a batch tried again after a lost
    -- connection is found, not written twice.
    batch TEXT
);
CREATE UNIQUE INDEX audit_log_batch ON audit_log (batch) WHERE batch IS NOT NULL;
CREATE INDEX audit_log_tenant ON audit_log (tenant, seq);
CREATE TABLE audit_checkpoints (
    size BIGINT PRIMARY KEY,
    note TEXT NOT NULL,
    -- The process that signed: its node id and start time.
    signer TEXT NOT NULL,
    signed_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
CREATE FUNCTION cascade_audit_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit records are append-only (% on %)', TG_OP, TG_TABLE_NAME;
END
$$;
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION cascade_audit_append_only();
CREATE TRIGGER audit_log_no_truncate BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION cascade_audit_append_only();
CREATE TRIGGER audit_checkpoints_append_only BEFORE UPDATE OR DELETE ON audit_checkpoints
    FOR EACH ROW EXECUTE FUNCTION cascade_audit_append_only();
CREATE TRIGGER audit_checkpoints_no_truncate BEFORE TRUNCATE ON audit_checkpoints
    FOR EACH STATEMENT EXECUTE FUNCTION cascade_audit_append_only();
"#,
    ),
    (
        5,
        r#"
-- The tree's frontier at each checkpoint (its complete subtrees' roots): a node that becomes
-- the signer goes on from the latest one instead of reading every leaf again.
ALTER TABLE audit_checkpoints ADD COLUMN frontier BYTEA;
"#,
    ),
];

/// The newest schema version this binary knows.
pub fn latest() -> i32 {
    MIGRATIONS.last().map_or(0, |(v, _)| *v)
}

#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    #[error(
        "the database's schema is version {found}, newer than this cascade's {known}: run a cascade at least as new as the one that migrated it (or point [server] store at another database)"
    )]
    Newer { found: i32, known: i32 },
    #[error("migration to schema version {version} failed: {}", describe(source))]
    Failed {
        version: i32,
        source: tokio_postgres::Error,
    },
    #[error("{}", describe(.0))]
    Database(#[from] tokio_postgres::Error),
}

/// Bring the database to [`latest`]; returns the versions applied (none when it was current).
pub async fn migrate(client: &mut Client) -> Result<Vec<i32>, MigrationError> {
    let tx = client.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&MIGRATION_LOCK])
        .await?;
    tx.batch_execute(
        "CREATE TABLE IF NOT EXISTS schema_migrations (
             version INTEGER PRIMARY KEY,
             applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
         )",
    )
    .await?;
    let found: i32 = tx
        .query_one(
            "SELECT COALESCE(max(version), 0) FROM schema_migrations",
            &[],
        )
        .await?
        .get(0);
    let known = latest();
    if found > known {
        return Err(MigrationError::Newer { found, known });
    }
    let mut applied = Vec::new();
    for (version, sql) in MIGRATIONS.iter().filter(|(v, _)| *v > found) {
        tx.batch_execute(sql)
            .await
            .map_err(|source| MigrationError::Failed {
                version: *version,
                source,
            })?;
        tx.execute(
            "INSERT INTO schema_migrations (version) VALUES ($1)",
            &[version],
        )
        .await?;
        applied.push(*version);
    }
    tx.commit().await?;
    if !applied.is_empty() {
        tracing::info!(?applied, "PostgreSQL schema migrated");
    }
    Ok(applied)
}

/// An error in full: tokio-postgres shows a server's error as "db error" alone; this adds its
/// severity, message, detail and hint.
pub fn describe(e: &tokio_postgres::Error) -> String {
    use std::error::Error as _;
    match e.as_db_error() {
        Some(db) => {
            let mut text = format!("{}: {}", db.severity(), db.message());
            if let Some(d) = db.detail() {
                text += &format!(" ({d})");
            }
            if let Some(h) = db.hint() {
                text += &format!("; hint: {h}");
            }
            text
        }
        None => match e.source() {
            Some(cause) => format!("{e}: {cause}"),
            None => e.to_string(),
        },
    }
}

/// A connection whose messages the caller drives itself (to receive notifications).
pub async fn connect_raw(
    url: &str,
    password: Option<&crate::secret::Secret>,
) -> Result<
    (
        Client,
        tokio_postgres::Connection<tokio_postgres::Socket, tokio_postgres::tls::NoTlsStream>,
    ),
    tokio_postgres::Error,
> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if let Some(p) = password {
        config.password(p.expose());
    }
    config.application_name("cascade");
    config.connect_timeout(std::time::Duration::from_secs(10));
    config.connect(tokio_postgres::NoTls).await
}

/// Connect to `url` (a `postgres://` URL without a password) with `password` from its secret
/// reference; the connection runs on its own task.
pub async fn connect(
    url: &str,
    password: Option<&crate::secret::Secret>,
) -> Result<Client, tokio_postgres::Error> {
    let mut config: tokio_postgres::Config = url.parse()?;
    if let Some(p) = password {
        config.password(p.expose());
    }
    config.application_name("cascade");
    config.connect_timeout(std::time::Duration::from_secs(10));
    let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection ended");
        }
    });
    Ok(client)
}

/// One connection that is made again when it was lost.
pub struct Connection {
    url: String,
    password: Option<crate::secret::Secret>,
    client: tokio::sync::Mutex<Option<std::sync::Arc<Client>>>,
}

impl Connection {
    /// A connection to `url`, made at its first use.
    pub fn new(url: &str, password: Option<crate::secret::Secret>) -> Self {
        Self {
            url: url.to_string(),
            password,
            client: tokio::sync::Mutex::new(None),
        }
    }

    /// The open client, connecting again when the last one was lost.
    pub async fn client(&self) -> Result<std::sync::Arc<Client>, tokio_postgres::Error> {
        let mut slot = self.client.lock().await;
        if let Some(c) = &*slot
            && !c.is_closed()
        {
            return Ok(c.clone());
        }
        *slot = None;
        let c = std::sync::Arc::new(connect(&self.url, self.password.as_ref()).await?);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Drop the client (one that stopped answering): the next use connects again.
    pub async fn reset(&self) {
        *self.client.lock().await = None;
    }

    /// Whether the connection is gone (none made yet counts as gone).
    pub async fn lost(&self) -> bool {
        self.client
            .lock()
            .await
            .as_ref()
            .is_none_or(|c| c.is_closed())
    }
}

/// Run `f` on `rt` (a thread's own runtime, where `conn` lives) and wait up to `limit` for its
/// answer, from any thread, inside a runtime or not. An attempt that meets a lost connection is
/// made once more on a new one; `error` turns a message into the caller's error.
pub fn run_blocking<T, E, F, Fut>(
    rt: &tokio::runtime::Handle,
    conn: &std::sync::Arc<Connection>,
    limit: std::time::Duration,
    error: fn(String) -> E,
    f: F,
) -> Result<T, E>
where
    T: Send + 'static,
    E: Send + 'static,
    F: Fn(std::sync::Arc<Client>) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = Result<T, E>> + Send,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    let conn = conn.clone();
    rt.spawn(async move {
        let mut outcome = Err(error("no attempt".into()));
        for _ in 0..2 {
            outcome = match conn.client().await {
                Ok(c) => f(c).await,
                Err(e) => Err(error(format!("cannot reach PostgreSQL: {}", describe(&e)))),
            };
            if outcome.is_ok() || !conn.lost().await {
                break;
            }
        }
        let _ = tx.send(outcome);
    });
    let wait = || {
        rx.recv_timeout(limit)
            .map_err(|_| error("PostgreSQL did not answer in time".into()))
    };
    // On a worker of a multi-threaded runtime (a gRPC handler reading a job another node holds),
    // the worker's other tasks move elsewhere while this one waits for the database, rather than
    // stalling behind it.
    let on_worker = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if on_worker {
        tokio::task::block_in_place(wait)?
    } else {
        wait()?
    }
}
