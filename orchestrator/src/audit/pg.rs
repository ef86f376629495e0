//! The audit log in PostgreSQL, shared by the nodes of a cluster: one global order of records
//! and one signer of checkpoints at a time.
//!
//! - **Order.** An append takes a transaction-scoped advisory lock, reads the last sequence
//!   number and writes its records after it, so the records of every node form one sequence
//!   without gaps. (A sequence object would leave a gap at every rolled-back insert, and a gap is
//!   what `verify` reports as deleted records.) The lock covers one multi-row insert, and the
//!   audit writer's batches (up to 1,024 records) keep the appends few.
//! - **Signing.** A node signs checkpoints only while its session holds an advisory lock; the
//!   others try to take it at each checkpoint tick, so when the signer stops or dies (its session
//!   ends) another node signs the next checkpoint. The signer keeps the tree's frontier and reads
//!   only the leaves appended since its last checkpoint.
//! - **A PostgreSQL restart** does not lose a batch: an append is tried again on a new
//!   connection for up to [`APPEND_PATIENCE`]. A batch whose commit may have landed before the
//!   connection went is looked up by its token first, so it is never written twice.
//!
//! Each node has one connection for its audit log, on a thread of its own; the calls are
//! synchronous (the audit writer's thread appends, as it does to the SQLite file).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Mutex as AsyncMutex, oneshot};
use tokio_postgres::Client;

use super::checkpoint::{Checkpoint, Signer};
use super::merkle::{self, Frontier, Hash};
use crate::secret::Secret;
use crate::store::pg_schema;

/// How long an append keeps trying to reach PostgreSQL before the batch is reported lost.
pub const APPEND_PATIENCE: Duration = Duration::from_secs(60);

/// How long a read or a checkpoint waits for PostgreSQL.
const READ_TIMEOUT: Duration = Duration::from_secs(30);

/// How long one attempt to connect or to append may take before it is tried again on a new
/// connection.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(20);

/// The advisory lock every append holds for its transaction ("AUDITSQ").
const APPEND_LOCK: i64 = 0x41_55_44_49_54_53_51;

/// The advisory lock the node that signs checkpoints holds for its session ("AUDITSG").
const SIGNER_LOCK: i64 = 0x41_55_44_49_54_53_47;

/// Leaves read per statement when the signer catches up.
const CATCH_UP_CHUNK: i64 = 10_000;

/// Where a node's audit log is in PostgreSQL.
#[derive(Clone, Debug)]
pub struct PgAuditOptions {
    /// `postgres://user@host:port/database`, without a password.
    pub url: String,
    pub password: Option<Secret>,
    /// The node that writes (named in its records and checkpoints).
    pub node_id: String,
}

/// One node's access to the cluster's audit log.
pub struct PgAudit {
    rt: tokio::runtime::Handle,
    state: Arc<AsyncMutex<State>>,
    node: String,
    /// This process's token: a batch's token is `<token>/<n>`.
    token: String,
    batches: AtomicU64,
    /// Dropped with the log: its thread ends.
    _stop: oneshot::Sender<()>,
}

impl std::fmt::Debug for PgAudit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgAudit").field("node", &self.node).finish()
    }
}

struct State {
    options: PgAuditOptions,
    client: Option<Client>,
    /// This client's session holds the signer's lock.
    signs: bool,
    /// The tree up to the last leaf the signer read.
    tree: Frontier,
}

type Op<T> = Box<
    dyn for<'a> FnOnce(
            &'a mut State,
        ) -> Pin<Box<dyn Future<Output = Result<T, String>> + Send + 'a>>
        + Send,
>;

fn describe(e: &tokio_postgres::Error) -> String {
    format!("the audit log in PostgreSQL: {}", pg_schema::describe(e))
}

/// Whether `e` is the connection's or a wait's (the next attempt, on a new connection, may
/// succeed) rather than the statement's: a lost connection, the server shutting down, a lock
/// or statement timeout (another node's append held the lock too long), a session the server
/// ended.
fn lost(e: &tokio_postgres::Error) -> bool {
    use std::error::Error as _;
    e.is_closed()
        || e.source().is_some_and(|s| s.is::<std::io::Error>())
        || e.code().is_some_and(|c| {
            let c = c.code();
            c.starts_with("08")
                || c.starts_with("57P0")
                || matches!(c, "53300" | "55P03" | "57014" | "25P03")
        })
}

impl PgAudit {
    /// Connect to the audit log at `options.url`. Its tables come with the store's migrations
    /// (schema version 4); a database without them is refused.
    pub fn open(options: PgAuditOptions) -> Result<Self, String> {
        let (stop, stopped) = oneshot::channel::<()>();
        // One message: the runtime's handle, or why there is none.
        let (ready_tx, ready_rx) = std::sync::mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name("cascade-audit-pg".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.to_string()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok(rt.handle().clone()));
                rt.block_on(async {
                    let _ = stopped.await;
                });
            })
            .map_err(|e| format!("cannot start the audit log's thread: {e}"))?;
        let rt = ready_rx
            .recv()
            .map_err(|_| "the audit log's thread stopped while starting".to_string())??;
        // Exported at 0 on every node from the start (the dashboard's cluster row reads it).
        metrics::gauge!(crate::metrics::AUDIT_SIGNER).set(0.0);
        let token = format!(
            "{}/{}",
            options.node_id,
            crate::clock::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let log = Self {
            rt,
            node: options.node_id.clone(),
            state: Arc::new(AsyncMutex::new(State {
                options,
                client: None,
                signs: false,
                tree: Frontier::default(),
            })),
            token,
            batches: AtomicU64::new(0),
            _stop: stop,
        };
        log.call(
            READ_TIMEOUT,
            Box::new(|s| {
                Box::pin(async move {
                    let c = s.client().await?;
                    let present: bool = c
                        .query_one("SELECT to_regclass('audit_log') IS NOT NULL", &[])
                        .await
                        .map_err(|e| describe(&e))?
                        .get(0);
                    if present {
                        Ok(())
                    } else {
                        Err("this database holds no audit log: it is not a Cascade store, or one older than schema version 4 (start `cascade serve` on it once to migrate it)".into())
                    }
                })
            }),
        )?;
        Ok(log)
    }

    /// The node this log writes as.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// Run `op` on the log's thread with the connection, and wait up to `limit` for it.
    fn call<T: Send + 'static>(&self, limit: Duration, op: Op<T>) -> Result<T, String> {
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        let state = self.state.clone();
        self.rt.spawn(async move {
            let mut s = state.lock().await;
            let _ = tx.send(op(&mut s).await);
        });
        rx.recv_timeout(limit)
            .map_err(|_| "the audit log in PostgreSQL did not answer in time".to_string())?
    }

    /// Append `records` (tenant, kind, body) after every record any node appended before, in
    /// one transaction; returns the last one's sequence number.
    pub fn append_all(&self, records: Vec<(String, String, Value)>) -> Result<u64, String> {
        if records.is_empty() {
            return Ok(0);
        }
        let token = format!("{}/{}", self.token, self.batches.fetch_add(1, Relaxed));
        let node = self.node.clone();
        self.call(
            APPEND_PATIENCE + READ_TIMEOUT,
            Box::new(move |s| Box::pin(async move { s.append(&node, &token, &records).await })),
        )
    }

    /// Sign a checkpoint of the whole log when this node is (or can become) the signer and the
    /// latest checkpoint does not cover it; returns the latest signed checkpoint.
    pub fn checkpoint(&self, signer: &Arc<Signer>, origin: &str) -> Result<Option<String>, String> {
        let (signer, origin, me) = (signer.clone(), origin.to_string(), self.token.clone());
        self.call(
            READ_TIMEOUT,
            Box::new(move |s| Box::pin(async move { s.checkpoint(&signer, &origin, &me).await })),
        )
    }

    /// Whether this node signs the checkpoints (it held the signer's lock at its last try).
    pub fn signs(&self) -> bool {
        self.state.try_lock().is_ok_and(|s| s.signs)
    }

    /// Up to `limit` records after `after` (of `tenant` only, if given).
    pub fn page(
        &self,
        after: u64,
        limit: usize,
        tenant: Option<&str>,
    ) -> Result<Vec<StoredEntry>, String> {
        let tenant = tenant.map(str::to_string);
        self.call(
            READ_TIMEOUT,
            Box::new(move |s| {
                Box::pin(async move {
                    let c = s.client().await?;
                    let rows = c
                        .query(
                            "SELECT seq, record, leaf FROM audit_log
                             WHERE seq > $1 AND ($3::text IS NULL OR tenant = $3)
                             ORDER BY seq LIMIT $2",
                            &[&(after as i64), &(limit as i64), &tenant],
                        )
                        .await
                        .map_err(|e| describe(&e))?;
                    Ok(rows
                        .iter()
                        .map(|r| (r.get::<_, i64>(0) as u64, r.get(1), r.get(2)))
                        .collect())
                })
            }),
        )
    }

    /// Every record, in order, with the leaf hash stored beside it.
    pub fn entries(&self) -> Result<Vec<StoredEntry>, String> {
        let mut all = Vec::new();
        loop {
            let after = all.last().map_or(0, |e: &StoredEntry| e.0);
            let page = self.page(after, CATCH_UP_CHUNK as usize, None)?;
            let done = page.len() < CATCH_UP_CHUNK as usize;
            all.extend(page);
            if done {
                return Ok(all);
            }
        }
    }

    /// Every stored checkpoint (size, note), by size.
    pub fn checkpoints(&self) -> Result<Vec<(u64, String)>, String> {
        self.by_size("SELECT size, note FROM audit_checkpoints ORDER BY size")
    }

    /// Rows of (size, text) that `sql` selects.
    fn by_size(&self, sql: &'static str) -> Result<Vec<(u64, String)>, String> {
        self.call(
            READ_TIMEOUT,
            Box::new(move |s| {
                Box::pin(async move {
                    let c = s.client().await?;
                    let rows = c.query(sql, &[]).await.map_err(|e| describe(&e))?;
                    Ok(rows
                        .iter()
                        .map(|r| (r.get::<_, i64>(0) as u64, r.get(1)))
                        .collect())
                })
            }),
        )
    }

    /// The latest signed checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<String>, String> {
        self.call(
            READ_TIMEOUT,
            Box::new(|s| {
                Box::pin(async move {
                    let c = s.client().await?;
                    latest(c).await.map(|l| l.map(|(_, note)| note))
                })
            }),
        )
    }

    /// Which process signed each checkpoint (size, `<node id>/<start time in ns>`), by size:
    /// who held the signer's lock.
    pub fn signers(&self) -> Result<Vec<(u64, String)>, String> {
        self.by_size("SELECT size, signer FROM audit_checkpoints ORDER BY size")
    }
}

/// A stored record: sequence number, exact text, the leaf hash stored beside it.
pub type StoredEntry = (u64, String, Vec<u8>);

async fn latest(c: &Client) -> Result<Option<(u64, String)>, String> {
    let row = c
        .query_opt(
            "SELECT size, note FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| describe(&e))?;
    Ok(row.map(|r| (r.get::<_, i64>(0) as u64, r.get(1))))
}

impl State {
    /// The open connection, made again when it was lost (the signer's lock goes with it).
    async fn client(&mut self) -> Result<&mut Client, String> {
        if self.client.as_ref().is_none_or(Client::is_closed) {
            self.client = None;
            if self.signs {
                self.signs = false;
                metrics::gauge!(crate::metrics::AUDIT_SIGNER).set(0.0);
                tracing::warn!(
                    "the audit log's connection was lost: this node no longer signs its checkpoints"
                );
            }
            let unreachable = |e: tokio_postgres::Error| {
                format!(
                    "cannot reach the audit log in PostgreSQL: {}",
                    pg_schema::describe(&e)
                )
            };
            let connect = pg_schema::connect(&self.options.url, self.options.password.as_ref());
            let c = tokio::time::timeout(ATTEMPT_TIMEOUT, connect)
                .await
                .map_err(|_| "the audit log's database did not answer in time".to_string())?
                .map_err(unreachable)?;
            // Every node waits on one lock to append: a session that stops (a node frozen or
            // cut off in the middle of an append) is ended by the server, and its lock with it,
            // rather than holding every node's appends until TCP gives up.
            c.batch_execute(
                "SET idle_in_transaction_session_timeout = '15s';
                 SET lock_timeout = '10s';
                 SET statement_timeout = '30s'",
            )
            .await
            .map_err(unreachable)?;
            self.client = Some(c);
        }
        Ok(self.client.as_mut().expect("connected above"))
    }

    async fn append(
        &mut self,
        node: &str,
        token: &str,
        records: &[(String, String, Value)],
    ) -> Result<u64, String> {
        let deadline = tokio::time::Instant::now() + APPEND_PATIENCE;
        let mut delay = Duration::from_millis(100);
        let mut retried = false;
        loop {
            let outcome = match self.client().await {
                Ok(c) => {
                    tokio::time::timeout(ATTEMPT_TIMEOUT, insert(c, node, token, retried, records))
                        .await
                        .unwrap_or_else(|_| {
                            Err(Failure::Lost(
                                "the audit log's database did not answer in time".into(),
                            ))
                        })
                }
                Err(e) => Err(Failure::Lost(e)),
            };
            match outcome {
                Ok(seq) => return Ok(seq),
                Err(Failure::Statement(e)) => return Err(e),
                Err(Failure::Lost(e)) if tokio::time::Instant::now() >= deadline => {
                    return Err(e);
                }
                Err(Failure::Lost(e)) => {
                    tracing::warn!(error = %e, "appending audit records: PostgreSQL is unreachable; trying again");
                    self.client = None;
                    retried = true;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(2));
                }
            }
        }
    }

    async fn checkpoint(
        &mut self,
        signer: &Signer,
        origin: &str,
        me: &str,
    ) -> Result<Option<String>, String> {
        self.client().await?;
        if !self.signs {
            let c = self.client.as_ref().expect("connected above");
            let got: bool = c
                .query_one("SELECT pg_try_advisory_lock($1)", &[&SIGNER_LOCK])
                .await
                .map_err(|e| describe(&e))?
                .get(0);
            if !got {
                return latest(c).await.map(|l| l.map(|(_, note)| note));
            }
            self.signs = true;
            metrics::gauge!(crate::metrics::AUDIT_SIGNER).set(1.0);
            tracing::info!("this node signs the audit log's checkpoints");
            // Go on from the latest checkpoint's frontier, checked against its signed root,
            // rather than reading every leaf again.
            if let Some(f) = saved_frontier(c, signer).await?
                && f.size() > self.tree.size()
            {
                self.tree = f;
            }
        }
        let c = self.client.as_ref().expect("connected above");
        // Catch up with every node's appends since the last checkpoint this node signed.
        loop {
            let rows = c
                .query(
                    "SELECT seq, leaf FROM audit_log WHERE seq > $1 ORDER BY seq LIMIT $2",
                    &[&(self.tree.size() as i64), &CATCH_UP_CHUNK],
                )
                .await
                .map_err(|e| describe(&e))?;
            for r in &rows {
                let seq = r.get::<_, i64>(0) as u64;
                if seq != self.tree.size() + 1 {
                    return Err(format!(
                        "audit record {} is missing (the next one is {seq}): records were deleted; run `cascade audit verify`",
                        self.tree.size() + 1
                    ));
                }
                let leaf: Hash = r
                    .get::<_, Vec<u8>>(1)
                    .try_into()
                    .map_err(|_| format!("audit record {seq}'s leaf is not a SHA-256 hash"))?;
                self.tree.push(leaf);
            }
            if (rows.len() as i64) < CATCH_UP_CHUNK {
                break;
            }
        }
        let size = self.tree.size();
        let previous = latest(c).await?;
        match &previous {
            Some((at, note)) if *at == size => return Ok(Some(note.clone())),
            Some((at, _)) if *at > size => {
                return Err(format!(
                    "the latest checkpoint covers {at} records, more than the log holds ({size}): records were deleted; run `cascade audit verify`"
                ));
            }
            _ if size == 0 => return Ok(None),
            _ => {}
        }
        let note = signer.sign(&Checkpoint {
            origin: origin.to_string(),
            size,
            root: self.tree.root(),
        });
        c.execute(
            "INSERT INTO audit_checkpoints (size, note, signer, frontier) VALUES ($1, $2, $3, $4)
             ON CONFLICT (size) DO NOTHING",
            &[&(size as i64), &note, &me, &self.tree.to_bytes()],
        )
        .await
        .map_err(|e| describe(&e))?;
        Ok(Some(note))
    }
}

/// The frontier kept with the latest checkpoint, if it is there and gives that checkpoint's
/// signed size and root.
async fn saved_frontier(c: &Client, signer: &Signer) -> Result<Option<Frontier>, String> {
    let row = c
        .query_opt(
            "SELECT note, frontier FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
            &[],
        )
        .await
        .map_err(|e| describe(&e))?;
    let Some(row) = row else { return Ok(None) };
    let (note, bytes): (String, Option<Vec<u8>>) = (row.get(0), row.get(1));
    let Some(f) = bytes.as_deref().and_then(Frontier::from_bytes) else {
        return Ok(None);
    };
    let Ok(cp) = super::checkpoint::verify(&note, &signer.verifier_key()) else {
        return Ok(None);
    };
    Ok((cp.size == f.size() && cp.root == f.root()).then_some(f))
}

enum Failure {
    /// The connection went: try again on a new one.
    Lost(String),
    /// The statement was refused: trying again would not help.
    Statement(String),
}

impl From<tokio_postgres::Error> for Failure {
    fn from(e: tokio_postgres::Error) -> Self {
        if lost(&e) {
            Self::Lost(describe(&e))
        } else {
            Self::Statement(describe(&e))
        }
    }
}

/// One batch in one transaction, after the last record of any node. `retried`: a commit
/// may have landed before the connection went, so look for the batch's token first.
async fn insert(
    c: &mut Client,
    node: &str,
    token: &str,
    retried: bool,
    records: &[(String, String, Value)],
) -> Result<u64, Failure> {
    let tx = c.transaction().await?;
    tx.execute("SELECT pg_advisory_xact_lock($1)", &[&APPEND_LOCK])
        .await?;
    if retried
        && let Some(row) = tx
            .query_opt("SELECT seq FROM audit_log WHERE batch = $1", &[&token])
            .await?
    {
        let first: i64 = row.get(0);
        return Ok(first as u64 + records.len() as u64 - 1);
    }
    let last: i64 = tx
        .query_one("SELECT COALESCE(max(seq), 0) FROM audit_log", &[])
        .await?
        .get(0);
    let at = crate::clock::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let n = records.len();
    let (mut seqs, mut texts, mut leaves, mut tenants) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
        Vec::with_capacity(n),
    );
    let mut batches: Vec<Option<&str>> = vec![None; n];
    batches[0] = Some(token);
    for (i, (tenant, kind, body)) in records.iter().enumerate() {
        let seq = last + 1 + i as i64;
        let text = json!({"seq": seq, "at_unix_ms": at, "node": node, "tenant": tenant, "kind": kind, "body": body})
            .to_string();
        leaves.push(super::hex(&merkle::leaf_hash(text.as_bytes())));
        seqs.push(seq);
        texts.push(text);
        tenants.push(tenant.as_str());
    }
    tx.execute(
        "INSERT INTO audit_log (seq, record, leaf, tenant, batch)
         SELECT s, r, decode(l, 'hex'), t, b
         FROM unnest($1::int8[], $2::text[], $3::text[], $4::text[], $5::text[]) AS u(s, r, l, t, b)",
        &[&seqs, &texts, &leaves, &tenants, &batches],
    )
    .await?;
    tx.commit().await?;
    Ok((last + n as i64) as u64)
}
