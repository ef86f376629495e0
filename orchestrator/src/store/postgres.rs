//! The PostgreSQL store: the [`JobStore`] of several nodes sharing one database.
//!
//! It has the SQLite store's shape: live jobs are held in a [`MemoryStore`] that answers the
//! scheduler's per-step calls, every change is queued to one writer, and the writer commits what
//! is queued in one transaction (group commit, here with one multi-row statement per table:
//! `unnest` of arrays). A submission is acknowledged only after its transaction committed.
//!
//! The database does what one process's memory cannot do for a cluster:
//! - an idempotency key is unique per tenant across every node (a partial unique index); a
//!   submission whose key another node stored first is answered with that node's job;
//! - the writer survives a restart of PostgreSQL: a batch that meets a lost connection is kept,
//!   the writer reconnects with backoff (100 ms to 5 s, `cascade_store_reconnects_total`) and
//!   commits it again (every statement is an upsert, so a commit whose answer was lost is
//!   harmless); new submissions wait for it in the bounded queue (past `queue_capacity` they are
//!   refused as retryable), and nothing acknowledged is lost.
//!
//! tokio-postgres is asynchronous and the store's reads are synchronous: the store runs its own
//! thread with a current-thread runtime that owns the connections; a read is sent there and the
//! caller waits for its answer, as it waits on the SQLite store's read lock.

use std::collections::{BTreeSet, HashMap, HashSet, VecDeque};
use std::error::Error as _;
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::{Duration, Instant, SystemTime};

use serde_json::Value;
use tokio::sync::{Mutex as AsyncMutex, mpsc, oneshot};
use tokio_postgres::Client;

use super::batch::{
    Inserted, JobWrites, Op, from_micros, group_batch, json, micros, parse_json, parse_state,
    parse_step_state,
};
use super::pg_schema::{self, Connection};
use super::{
    JobFilter, JobStore, MemoryStore, NewJob, NodeInfo, RemoteChange, RemoteEvents, StoreError,
    StoreFuture, Submitted, Waker,
};
use crate::job::{
    ApprovalView, CallbackDelivery, JobEvent, JobId, JobRecord, JobState, StepRecord,
};
use crate::secret::Secret;

/// Where and how the PostgreSQL store keeps its rows.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// `postgres://user@host:port/database` (a password in it is refused at load; it comes from
    /// `password`).
    pub url: String,
    pub password: Option<Secret>,
    /// Finished jobs and their idempotency keys are kept this long (default 24 h).
    pub retention: Duration,
    /// Changes that may wait for the writer; beyond it, submissions are refused (`Busy`).
    pub queue_capacity: usize,
    /// Events kept per job (its final event always).
    pub max_events_per_job: usize,
    /// This node's name in the cluster (`cascade serve --node-id`; default: host name and port).
    /// A node started again under the same name takes its leases back at once.
    pub node_id: String,
    /// Where other nodes reach this one (its gRPC address), shown by `cascade nodes`.
    pub address: String,
    /// A node renews its leases (its heartbeat) every quarter of this; a node silent for longer
    /// is dead, and another node takes its unfinished jobs over.
    pub lease: Duration,
}

impl PgOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            password: None,
            retention: Duration::from_secs(24 * 3600),
            queue_capacity: super::SqliteOptions::DEFAULT_QUEUE_CAPACITY,
            max_events_per_job: super::memory::DEFAULT_MAX_EVENTS_PER_JOB,
            node_id: format!("{}-{}", host_name(), std::process::id()),
            address: String::new(),
            lease: Duration::from_secs(10),
        }
    }
}

/// This machine's host name (Linux), or "cascade".
pub fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "cascade".into())
}

/// How long a synchronous read waits for the database before it answers `Unavailable`.
const READ_TIMEOUT: Duration = Duration::from_secs(15);

/// Jobs written in one transaction, at most (a batch holds up to 8,192 changes, most of them
/// several changes of one job).
const MAX_BATCH: usize = 8192;

/// Finished jobs deleted per retention statement, so a clean-up never holds a long lock.
const RETENTION_CHUNK: i64 = 10_000;

/// The advisory lock a node holds while it deletes expired jobs (one node at a time does).
const RETENTION_LOCK: i64 = 0x43_41_53_43_52_45_54;

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn db(e: tokio_postgres::Error) -> StoreError {
    StoreError::Unavailable(pg_schema::describe(&e))
}

/// Whether an error is the connection's (lost, refused, the server shutting down) rather than
/// the statement's: those are retried on a new connection, the others are not.
fn is_connection_error(e: &tokio_postgres::Error) -> bool {
    if e.is_closed() || e.source().is_some_and(|s| s.is::<std::io::Error>()) {
        return true;
    }
    e.code().is_some_and(|c| {
        let c = c.code();
        // 08: connection exception; 57P0x: the server shutting down or starting; 53300: too
        // many connections; 40001/40P01: a serialization failure or deadlock, retried as a whole.
        c.starts_with("08") || c.starts_with("57P0") || matches!(c, "53300" | "40001" | "40P01")
    })
}

/// Jobs this node took over from a dead one, and how to tell their graphs.
#[derive(Default)]
struct Adoption {
    /// Running jobs taken over, per graph, that their scheduler has not resumed yet.
    running: Mutex<HashMap<Arc<str>, VecDeque<JobId>>>,
    waker: RwLock<Option<Waker>>,
    /// Where changes other nodes made are announced.
    remote: RwLock<Option<RemoteEvents>>,
    /// The node handed its jobs back: it renews no lease and takes over nothing any more.
    released: std::sync::atomic::AtomicBool,
    /// Another node handed jobs back: look for them now, not at the next tick.
    claim_now: tokio::sync::Notify,
    /// Nodes whose heartbeat is within the lease, at the last round (0: none read yet).
    live_nodes: std::sync::atomic::AtomicUsize,
    /// Runs the commands other nodes send for jobs this node holds.
    commands: RwLock<Option<super::CommandHandler>>,
    /// Look for commands now (a handler was just set).
    commands_now: tokio::sync::Notify,
    /// Commands this node sent, waiting for their answer, by id: woken when it is announced.
    answers: Mutex<HashMap<i64, Arc<tokio::sync::Notify>>>,
    /// Held by a lease round and by the hand-back, so a round under way cannot take back (or
    /// renew) what the hand-back gives up.
    round: AsyncMutex<()>,
    /// When this node last renewed its leases ([`mono_ms`] at the round's start; 0: never).
    renewed_ms: std::sync::atomic::AtomicU64,
    /// Jobs this node was running that another node holds now, per graph, for their scheduler
    /// to forget (see [`JobStore::lost_leases`]).
    lost: Mutex<HashMap<Arc<str>, Vec<JobId>>>,
    /// Jobs taken over again: the writer writes their changes again (it stopped when it lost
    /// them).
    readopted: Mutex<Vec<JobId>>,
}

impl Adoption {
    fn wake(&self, graph: &str) {
        if let Some(w) = &*self.waker.read().unwrap_or_else(|p| p.into_inner()) {
            w(graph);
        }
    }

    /// Hand jobs another node holds now to their schedulers, to forget.
    fn lose(&self, jobs: impl IntoIterator<Item = (Arc<str>, JobId)>) {
        let mut graphs = BTreeSet::new();
        {
            let mut lost = self.lost.lock().unwrap_or_else(|p| p.into_inner());
            for (graph, id) in jobs {
                lost.entry(graph.clone()).or_default().push(id);
                graphs.insert(graph);
            }
        }
        for g in graphs {
            self.wake(&g);
        }
    }

    /// Whether this node's leases may have run out: its last renewal is older than
    /// [`fence_after`] of `lease`.
    fn fenced(&self, lease: Duration) -> bool {
        let renewed = self.renewed_ms.load(Ordering::Acquire);
        mono_ms().saturating_sub(renewed) > fence_after(lease).as_millis() as u64
    }
}

/// Milliseconds on this process's monotonic clock (from its first use).
fn mono_ms() -> u64 {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    // From 1, so that 0 means "never".
    START.get_or_init(Instant::now).elapsed().as_millis() as u64 + 1
}

/// How long after its last renewal a node stops starting calls: three quarters of the lease.
/// Another node takes its jobs over one lease after the renewal at the earliest (the
/// database's clock counts from the renewal's commit, after this node's clock started the
/// round), so a call this node starts is never one another node may start too.
fn fence_after(lease: Duration) -> Duration {
    lease * 3 / 4
}

pub struct PgStore {
    mem: Arc<MemoryStore>,
    adoption: Arc<Adoption>,
    /// Unbounded by type, bounded by admission as in the SQLite store: `queued` counts what
    /// waits, and submissions are refused at `queue_capacity`.
    tx: mpsc::UnboundedSender<Op>,
    queued: Arc<AtomicUsize>,
    queue_capacity: usize,
    reader: Arc<Connection>,
    node_id: String,
    lease: Duration,
    /// Orders a new job's insert before its claim (see `submit`).
    order: Mutex<()>,
    /// The store thread's runtime, where the connections live.
    rt: tokio::runtime::Handle,
}

impl PgStore {
    /// Connect, migrate the schema, load the jobs left pending, running or parked, and start the
    /// writer. Fails when the database cannot be reached or its schema is newer than this
    /// binary's.
    pub fn open(options: PgOptions) -> Result<Self, StoreError> {
        // Unbounded by type, bounded by admission: see `PgStore::tx`.
        let (tx, rx) = mpsc::unbounded_channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let (init_tx, init_rx) = std::sync::mpsc::channel();
        let mem = Arc::new(
            MemoryStore::with_retention(10_000)
                .with_max_events_per_job(options.max_events_per_job)
                .with_key_ttl(options.retention),
        );
        let adoption = Arc::new(Adoption::default());
        let (weak_mem, lease_adoption) = (Arc::downgrade(&mem), adoption.clone());
        let depth = queued.clone();
        let opts = options.clone();
        std::thread::Builder::new()
            .name("cascade-store-pg".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = init_tx.send(Err(err(e)));
                        return;
                    }
                };
                let handle = rt.handle().clone();
                rt.block_on(async move {
                    let reader = Arc::new(Connection::new(&opts.url, opts.password.clone()));
                    let started = mono_ms();
                    match init(&opts, &reader).await {
                        Ok(loaded) => {
                            lease_adoption.renewed_ms.store(started, Ordering::Release);
                            let _ = init_tx.send(Ok((handle, reader, loaded)));
                            tokio::spawn(listen_loop(
                                opts.clone(),
                                weak_mem.clone(),
                                lease_adoption.clone(),
                            ));
                            tokio::spawn(commands_loop(
                                opts.clone(),
                                weak_mem.clone(),
                                lease_adoption.clone(),
                            ));
                            tokio::spawn(lease_loop(
                                opts.clone(),
                                weak_mem,
                                lease_adoption.clone(),
                            ));
                            writer_loop(opts, rx, &depth, &lease_adoption).await;
                        }
                        Err(e) => {
                            let _ = init_tx.send(Err(e));
                        }
                    }
                });
            })
            .map_err(err)?;
        let (rt, reader, loaded) = init_rx
            .recv()
            .map_err(|_| err("the PostgreSQL store's thread stopped while opening"))??;
        let count = loaded.len();
        for (record, events) in loaded {
            mem.insert_recovered(record, events);
        }
        if count > 0 {
            tracing::info!(jobs = count, "loaded unfinished jobs from PostgreSQL");
        }
        Ok(Self {
            mem,
            adoption,
            tx,
            queued,
            queue_capacity: options.queue_capacity.max(1),
            reader,
            node_id: options.node_id.clone(),
            lease: options.lease,
            order: Mutex::new(()),
            rt,
        })
    }

    fn send(&self, op: Op) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        if self.tx.send(op).is_err() {
            tracing::error!("the PostgreSQL store's writer is gone; changes are not persisted");
        }
    }

    /// Run a read on the store's thread and wait for its answer. A read that meets a lost
    /// connection is tried once more on a new one.
    fn read<T, F, Fut>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: Fn(Arc<Client>) -> Fut + Send + 'static,
        Fut: Future<Output = Result<T, StoreError>> + Send,
    {
        pg_schema::run_blocking(&self.rt, &self.reader, READ_TIMEOUT, err, f)
    }

    fn load(&self, ids: Vec<String>) -> Result<Vec<JobRecord>, StoreError> {
        self.read(move |c| {
            let ids = ids.clone();
            async move { load_jobs(&c, &ids).await }
        })
    }
}

/// Migrate, announce this node, and take the unfinished jobs it leased before a restart and those
/// nobody holds (a dead node's, or all of them on a first start).
async fn init(
    o: &PgOptions,
    reader: &Connection,
) -> Result<Vec<(JobRecord, Vec<JobEvent>)>, StoreError> {
    let mut admin = pg_schema::connect(&o.url, o.password.as_ref())
        .await
        .map_err(|e| {
            err(format!(
                "cannot connect to PostgreSQL at {}: {}",
                o.url,
                pg_schema::describe(&e)
            ))
        })?;
    pg_schema::migrate(&mut admin).await.map_err(err)?;
    drop(admin);
    let c = reader.client().await.map_err(db)?;
    heartbeat(&c, o).await.map_err(db)?;
    // This node's own leases (a restart under the same name), and the jobs nobody holds.
    let ids = claim(&c, o, true).await.map_err(db)?;
    load_with_events(&c, &ids).await
}

/// The jobs of `ids` with their events.
async fn load_with_events(
    c: &Client,
    ids: &[String],
) -> Result<Vec<(JobRecord, Vec<JobEvent>)>, StoreError> {
    let mut out = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(1000) {
        let records = load_jobs(c, chunk).await?;
        let mut events = load_events_of(c, chunk).await?;
        for r in records {
            let e = events.remove(&r.id).unwrap_or_default();
            out.push((r, e));
        }
    }
    Ok(out)
}

/// Renew this node's heartbeat (its leases).
async fn heartbeat(c: &Client, o: &PgOptions) -> Result<(), tokio_postgres::Error> {
    c.execute(
        "INSERT INTO nodes (id, address) VALUES ($1, $2)
         ON CONFLICT (id) DO UPDATE SET heartbeat_at = now(), address = excluded.address,
             draining = false",
        &[&o.node_id, &o.address],
    )
    .await
    .map(drop)
}

/// Lease to this node the unfinished jobs nobody holds: no owner (handed back) or an owner whose
/// heartbeat is older than the lease; with `own`, also the jobs this node's name holds (taken
/// back after a restart). Oldest first; `FOR UPDATE SKIP LOCKED`, so two nodes taking over at
/// once split the jobs instead of waiting on each other. Returns the ids.
async fn claim(c: &Client, o: &PgOptions, own: bool) -> Result<Vec<String>, tokio_postgres::Error> {
    let mut ids: Vec<String> = Vec::new();
    loop {
        // Past the last id taken: a job this node already holds still matches with `own`.
        let after = ids.last().cloned().unwrap_or_default();
        let rows = c
            .query(
                "UPDATE jobs SET lease_owner = $1, leased_at = now()
                 WHERE id IN (
                     SELECT id FROM jobs j
                     WHERE j.id > $5
                       AND j.state IN ('pending', 'running', 'awaiting_approval', 'budget_exceeded')
                       AND ((j.lease_owner = $1 AND $3)
                         OR j.lease_owner IS NULL
                         OR (j.lease_owner <> $1 AND NOT EXISTS (
                             SELECT 1 FROM nodes n WHERE n.id = j.lease_owner AND NOT n.draining
                               AND n.heartbeat_at >= now() - make_interval(secs => $2))))
                     ORDER BY id LIMIT $4
                     FOR UPDATE SKIP LOCKED)
                 RETURNING id",
                &[
                    &o.node_id,
                    &o.lease.as_secs_f64(),
                    &own,
                    &CLAIM_BATCH,
                    &after,
                ],
            )
            .await?;
        let n = rows.len();
        let mut batch: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
        batch.sort();
        ids.extend(batch);
        if n < CLAIM_BATCH as usize {
            return Ok(ids);
        }
    }
}

/// Give the leases of `ids` that `node` holds back, for the next node to look to take.
async fn hand_back(c: &Client, ids: &[String], node: &str) -> Result<u64, tokio_postgres::Error> {
    c.execute(
        "UPDATE jobs SET lease_owner = NULL, leased_at = NULL
         WHERE id = ANY($1) AND lease_owner = $2",
        &[&ids, &node],
    )
    .await
}

/// Jobs leased per statement when taking over.
const CLAIM_BATCH: i64 = 1000;

/// Every quarter lease: renew this node's heartbeat, and take over the jobs of nodes that
/// stopped renewing theirs. Ends with the store.
async fn lease_loop(o: PgOptions, mem: Weak<MemoryStore>, adoption: Arc<Adoption>) {
    let conn = Connection::new(&o.url, o.password.clone());
    let failures = metrics::counter!(crate::metrics::CLUSTER_HEARTBEAT_FAILURES);
    let taken = metrics::counter!(crate::metrics::CLUSTER_TAKEOVERS);
    // Exported at 0 from the start (the dashboard's cluster row reads them).
    metrics::counter!(crate::metrics::CLUSTER_LEASES_LOST).increment(0);
    failures.increment(0);
    taken.increment(0);
    let alive = metrics::gauge!(crate::metrics::CLUSTER_NODES);
    let fenced = metrics::gauge!(crate::metrics::CLUSTER_FENCED);
    fenced.set(0.0);
    let mut was_fenced = false;
    // A takeover was cut off: claim this node's own leases too at the next round.
    let mut reclaim_own = false;
    let leased = metrics::gauge!(crate::metrics::CLUSTER_JOBS_LEASED);
    let mut last_prune = Instant::now();
    let mut tick = tokio::time::interval((o.lease / 4).max(Duration::from_millis(100)));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // When the first other node's lease runs out if it renews nothing more: a round then takes
    // a dead node's jobs over as soon as they are free, not up to a quarter lease later.
    let mut next_expiry: Option<tokio::time::Instant> = None;
    loop {
        let expiry = next_expiry.unwrap_or_else(|| tokio::time::Instant::now() + o.lease);
        tokio::select! {
            _ = tick.tick() => {}
            _ = adoption.claim_now.notified() => {}
            () = tokio::time::sleep_until(expiry), if next_expiry.is_some() => {}
        }
        let Some(mem) = mem.upgrade() else { return };
        let _round = adoption.round.lock().await;
        if adoption.released.load(Ordering::SeqCst) {
            return;
        }
        let started = mono_ms();
        let renewal = async {
            let c = conn.client().await?;
            heartbeat(&c, &o).await?;
            // Back from a time without renewals (PostgreSQL away, this process stalled):
            // another node may hold some of this node's jobs now. Their schedulers forget
            // them before this node starts calls again.
            if adoption.fenced(o.lease) {
                let held = mem.unfinished();
                let ids: Vec<String> = held.iter().map(|(_, id)| id.to_string()).collect();
                let elsewhere: HashSet<String> = c
                    .query(
                        "SELECT id FROM jobs WHERE id = ANY($1) AND lease_owner IS DISTINCT FROM $2",
                        &[&ids, &o.node_id],
                    )
                    .await?
                    .iter()
                    .map(|r| r.get(0))
                    .collect();
                if !elsewhere.is_empty() {
                    metrics::counter!(crate::metrics::CLUSTER_LEASES_LOST)
                        .increment(elsewhere.len() as u64);
                    tracing::warn!(
                        jobs = elsewhere.len(),
                        "this node renewed its leases too late: other nodes hold some of its jobs now, and it forgets them"
                    );
                    adoption.lose(
                        held.into_iter()
                            .filter(|(_, id)| elsewhere.contains(&id.to_string())),
                    );
                }
            }
            Ok::<_, tokio_postgres::Error>(c)
        };
        // A round that hangs (a connection that neither answers nor breaks) must not keep
        // the node from noticing: it is given up on at half a lease, and the connection with it.
        let renewal = match tokio::time::timeout(o.lease / 2, renewal).await {
            Ok(outcome) => outcome.map_err(|e| pg_schema::describe(&e)),
            Err(_) => {
                conn.reset().await;
                Err("PostgreSQL did not answer within half a lease".to_string())
            }
        };
        if renewal.is_ok() {
            adoption.renewed_ms.store(started, Ordering::Release);
        }
        let now_fenced = adoption.fenced(o.lease);
        if now_fenced != was_fenced {
            was_fenced = now_fenced;
            fenced.set(f64::from(u8::from(now_fenced)));
            if now_fenced {
                tracing::error!(
                    lease = ?o.lease,
                    "this node could not renew its leases for three quarters of a lease: it starts no call until it can (another node may take its jobs over)"
                );
            } else {
                tracing::warn!("this node renewed its leases again: it starts calls again");
            }
        }
        let c = match renewal {
            Ok(c) => c,
            Err(e) => {
                // Not looked at again before the next tick (a PostgreSQL away would make a
                // passed expiry a busy loop).
                next_expiry = None;
                failures.increment(1);
                tracing::warn!(error = %e, "cannot renew this node's leases in PostgreSQL; trying again");
                continue;
            }
        };
        // Taking over is given a whole lease (a dead node may leave many jobs). A claim cut
        // off may have leased jobs to this node that it never loaded: the next round claims
        // this node's own leases too, and loads those it does not hold.
        let reclaim = std::mem::take(&mut reclaim_own);
        let takeover = async {
            let ids = claim(&c, &o, reclaim).await?;
            let row = c
                .query_one(
                    "SELECT count(*) FILTER (WHERE heartbeat_at >= now() - make_interval(secs => $1)
                             AND NOT draining),
                         (SELECT count(*) FROM jobs WHERE lease_owner = $2
                            AND state IN ('pending', 'running', 'awaiting_approval', 'budget_exceeded')),
                         extract(epoch FROM min(heartbeat_at) FILTER (WHERE id <> $2
                             AND heartbeat_at >= now() - make_interval(secs => $1) AND NOT draining)
                           + make_interval(secs => $1) - now())::float8
                     FROM nodes",
                    &[&o.lease.as_secs_f64(), &o.node_id],
                )
                .await?;
            next_expiry = row.get::<_, Option<f64>>(2).map(|secs| {
                tokio::time::Instant::now()
                    + Duration::from_secs_f64(secs.max(0.0))
                    + Duration::from_millis(20)
            });
            alive.set(row.get::<_, i64>(0) as f64);
            adoption
                .live_nodes
                .store(row.get::<_, i64>(0).max(0) as usize, Ordering::Relaxed);
            leased.set(row.get::<_, i64>(1) as f64);
            // A node gone for a day that holds nothing is forgotten, and so are old commands.
            if last_prune.elapsed() > Duration::from_secs(600) {
                last_prune = Instant::now();
                c.execute(
                    "DELETE FROM nodes WHERE heartbeat_at < now() - interval '1 day'
                       AND NOT EXISTS (SELECT 1 FROM jobs WHERE lease_owner = nodes.id
                         AND state IN ('pending', 'running', 'awaiting_approval', 'budget_exceeded'))",
                    &[],
                )
                .await?;
                // Commands are answered within seconds; an hour on, nobody reads them.
                c.execute(
                    "DELETE FROM node_commands WHERE created_at < now() - interval '1 hour'",
                    &[],
                )
                .await?;
            }
            Ok::<_, tokio_postgres::Error>(ids)
        };
        let mut ids = match tokio::time::timeout(o.lease, takeover).await {
            Ok(Ok(ids)) => ids,
            failed => {
                reclaim_own = true;
                next_expiry = None;
                let e = match failed {
                    Ok(Err(e)) => pg_schema::describe(&e),
                    _ => {
                        conn.reset().await;
                        "PostgreSQL did not answer within the lease".to_string()
                    }
                };
                tracing::warn!(error = %e, "cannot take over the jobs of dead nodes now; trying again");
                continue;
            }
        };
        if reclaim {
            // Only those not held here already.
            ids.retain(|id| {
                id.parse::<JobId>()
                    .is_ok_and(|id| mem.get(id).ok().flatten().is_none())
            });
        }
        // A job this node lost and whose scheduler has not forgotten it yet is not taken back
        // now (its stale copy is still here): it is handed back, for a later round.
        let forgetting: HashSet<String> = adoption
            .lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .flatten()
            .map(JobId::to_string)
            .collect();
        if !forgetting.is_empty() {
            let (back, keep): (Vec<String>, Vec<String>) =
                ids.into_iter().partition(|id| forgetting.contains(id));
            ids = keep;
            if !back.is_empty() {
                let _ = hand_back(&c, &back, &o.node_id).await;
            }
        }
        if ids.is_empty() {
            continue;
        }
        match load_with_events(&c, &ids).await {
            Ok(loaded) => {
                taken.increment(loaded.len() as u64);
                tracing::info!(
                    jobs = loaded.len(),
                    "took over the jobs of a node that stopped renewing its leases"
                );
                adopt(&mem, &adoption, loaded);
            }
            Err(e) => {
                // Handed back at once, for this node's next round or another node to take.
                let back = hand_back(&c, &ids, &o.node_id).await;
                tracing::error!(error = %e, jobs = ids.len(), handed_back = back.is_ok(), "took over jobs but cannot read them; they are handed back and taken again");
            }
        }
    }
}

/// The channel each committed batch names its changed jobs on.
const EVENTS_CHANNEL: &str = "cascade_events";

/// The channel a stopping node names itself on once it handed its jobs back.
const HANDBACK_CHANNEL: &str = "cascade_handback";

/// The channel a node names another on when it wrote a command for it.
const COMMANDS_CHANNEL: &str = "cascade_commands";

/// The channel a node names a command's id on when it wrote its answer.
const ANSWERS_CHANNEL: &str = "cascade_answers";

/// How long a command waits for the holder's answer; one older is not run any more.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// Commands waiting for an answer from other nodes, at most (more are refused as retryable).
const MAX_FORWARDED: usize = 1024;

/// Notifications read ahead of the listener, at most.
const NOTIFICATION_QUEUE: usize = 1024;

/// A notification's payload stays under PostgreSQL's 8,000 bytes: about 200 job ids.
const NOTIFY_BYTES: usize = 7_800;

/// Listen for the batches other nodes commit, and announce the jobs this node follows but does
/// not hold (a watcher here of a job running there). After a lost connection, announce a
/// resync: changes made meanwhile were not heard.
async fn listen_loop(o: PgOptions, mem: Weak<MemoryStore>, adoption: Arc<Adoption>) {
    use futures::StreamExt;
    let mut delay = Duration::from_millis(100);
    let mut first = true;
    loop {
        if mem.strong_count() == 0 {
            return;
        }
        let (client, mut connection) = match pg_schema::connect_raw(&o.url, o.password.as_ref())
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %pg_schema::describe(&e), "cannot listen for other nodes' changes; trying again");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(5));
                continue;
            }
        };
        // Bounded: when the notifications come faster than they are looked at, the connection
        // is read no further and PostgreSQL holds them (its queue is bounded too).
        let (tx, mut rx) = mpsc::channel(NOTIFICATION_QUEUE);
        let driver = tokio::spawn(async move {
            let mut messages = futures::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(m)) = messages.next().await {
                if tx.send(m).await.is_err() {
                    return;
                }
            }
        });
        if let Err(e) = client
            .batch_execute(&format!(
                "LISTEN {EVENTS_CHANNEL}; LISTEN {HANDBACK_CHANNEL}; LISTEN {COMMANDS_CHANNEL}; LISTEN {ANSWERS_CHANNEL}"
            ))
            .await
        {
            tracing::warn!(error = %pg_schema::describe(&e), "cannot listen for other nodes' changes; trying again");
            driver.abort();
            tokio::time::sleep(delay).await;
            continue;
        }
        delay = Duration::from_millis(100);
        if !std::mem::take(&mut first) {
            announce(&adoption, RemoteChange::Resync);
        }
        // Commands written for this node while it was not listening.
        adoption.commands_now.notify_one();
        while let Some(message) = rx.recv().await {
            let tokio_postgres::AsyncMessage::Notification(n) = message else {
                continue;
            };
            if n.channel() == HANDBACK_CHANNEL {
                adoption.claim_now.notify_one();
                continue;
            }
            if n.channel() == COMMANDS_CHANNEL {
                if n.payload() == o.node_id {
                    adoption.commands_now.notify_one();
                }
                continue;
            }
            if n.channel() == ANSWERS_CHANNEL {
                let waiter = n.payload().parse::<i64>().ok().and_then(|id| {
                    adoption
                        .answers
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&id)
                        .cloned()
                });
                if let Some(w) = waiter {
                    w.notify_one();
                }
                continue;
            }
            let Some(mem) = mem.upgrade() else { return };
            let Some(sink) = adoption
                .remote
                .read()
                .unwrap_or_else(|p| p.into_inner())
                .clone()
            else {
                continue;
            };
            for id in n
                .payload()
                .split(',')
                .filter_map(|i| i.parse::<JobId>().ok())
            {
                // A job held here announced its changes itself.
                if (sink.interested)(id) && mem.tenant_of(id).ok().flatten().is_none() {
                    (sink.announce)(RemoteChange::Job(id));
                }
            }
        }
        driver.abort();
        tracing::warn!(
            "the connection listening for other nodes' changes was lost; listening again"
        );
    }
}

/// Runs the commands other nodes write for this one: a round when told (a notification, a
/// reconnect, a handler set) and every few seconds in case a notification was missed. One
/// worker, one connection: the commands wait in the table, not in tasks.
async fn commands_loop(o: PgOptions, mem: Weak<MemoryStore>, adoption: Arc<Adoption>) {
    let conn = Connection::new(&o.url, o.password.clone());
    loop {
        tokio::select! {
            () = adoption.commands_now.notified() => {}
            () = tokio::time::sleep(Duration::from_secs(5)) => {}
        }
        if mem.strong_count() == 0 {
            return;
        }
        commands_round(&o, &adoption, &conn).await;
    }
}

/// Run the commands other nodes wrote for this one, oldest first, and answer each (one older
/// than [`COMMAND_TIMEOUT`] is answered `expired`: its sender gave up on it; one that runs
/// longer than that is answered as failed).
async fn commands_round(o: &PgOptions, adoption: &Adoption, conn: &Connection) {
    let Some(handler) = adoption
        .commands
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()
    else {
        return;
    };
    let c = match conn.client().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(error = %pg_schema::describe(&e), "cannot read the commands other nodes sent; they wait");
            return;
        }
    };
    loop {
        let rows = match c
            .query(
                "SELECT id, job_id, command, created_at < now() - make_interval(secs => $2)
                 FROM node_commands WHERE node = $1 AND answered_at IS NULL ORDER BY id LIMIT 100",
                &[&o.node_id, &COMMAND_TIMEOUT.as_secs_f64()],
            )
            .await
        {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %pg_schema::describe(&e), "cannot read the commands other nodes sent; they wait");
                return;
            }
        };
        if rows.is_empty() {
            return;
        }
        for r in rows {
            let (id, job, command, expired): (i64, String, String, bool) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            let answer = match job.parse::<JobId>() {
                _ if expired => r#"{"answer":"expired"}"#.to_string(),
                Ok(job) => tokio::time::timeout(COMMAND_TIMEOUT, handler(job, command))
                    .await
                    .unwrap_or_else(|_| {
                        r#"{"answer":"failed","error":{"kind":"unavailable","message":"the node that holds the job did not carry the command out in time; read the job again before asking again"}}"#.to_string()
                    }),
                Err(_) => r#"{"answer":"not_held"}"#.to_string(),
            };
            let written = async {
                c.execute(
                    "UPDATE node_commands SET answer = $2, answered_at = now() WHERE id = $1",
                    &[&id, &answer],
                )
                .await?;
                c.execute(
                    "SELECT pg_notify($1, $2)",
                    &[&ANSWERS_CHANNEL, &id.to_string()],
                )
                .await
            };
            if let Err(e) = written.await {
                tracing::warn!(error = %pg_schema::describe(&e), "cannot answer a command another node sent");
                return;
            }
        }
    }
}

/// Write `command` for `node` and wait for its answer (woken by its announcement, and looking
/// again every second in case one was missed).
async fn forward_to(
    reader: &Connection,
    adoption: &Adoption,
    node: &str,
    id: JobId,
    command: &str,
) -> Result<String, StoreError> {
    if adoption
        .answers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .len()
        >= MAX_FORWARDED
    {
        return Err(StoreError::Unavailable(format!(
            "{MAX_FORWARDED} commands already wait for other nodes' answers; try again"
        )));
    }
    let c = reader.client().await.map_err(|e| {
        err(format!(
            "cannot reach PostgreSQL: {}",
            pg_schema::describe(&e)
        ))
    })?;
    let row = c
        .query_one(
            "INSERT INTO node_commands (node, job_id, command) VALUES ($1, $2, $3) RETURNING id",
            &[&node, &id.to_string(), &command],
        )
        .await
        .map_err(db)?;
    let cid: i64 = row.get(0);
    let woken = Arc::new(tokio::sync::Notify::new());
    adoption
        .answers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .insert(cid, woken.clone());
    let answer = async {
        c.execute("SELECT pg_notify($1, $2)", &[&COMMANDS_CHANNEL, &node])
            .await
            .map_err(db)?;
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            if let Some(r) = c
                .query_opt(
                    "SELECT answer FROM node_commands WHERE id = $1 AND answered_at IS NOT NULL",
                    &[&cid],
                )
                .await
                .map_err(db)?
            {
                return Ok(r.get::<_, String>(0));
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(StoreError::Unavailable(format!(
                    "node {node}, which holds job {id}, did not answer within {} s; it may still act on the request: read the job again before asking again",
                    COMMAND_TIMEOUT.as_secs()
                )));
            }
            let _ = tokio::time::timeout(
                (deadline - now).min(Duration::from_secs(1)),
                woken.notified(),
            )
            .await;
        }
    }
    .await;
    adoption
        .answers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .remove(&cid);
    answer
}

fn announce(adoption: &Adoption, change: RemoteChange) {
    if let Some(sink) = &*adoption.remote.read().unwrap_or_else(|p| p.into_inner()) {
        (sink.announce)(change);
    }
}

/// Hold jobs taken over: pending ones queue, parked ones wait for their decision, running ones
/// wait for their scheduler to resume them; each graph is told.
fn adopt(mem: &MemoryStore, adoption: &Adoption, loaded: Vec<(JobRecord, Vec<JobEvent>)>) {
    let mut graphs = BTreeSet::new();
    let mut readopted = Vec::new();
    {
        let mut running = adoption.running.lock().unwrap_or_else(|p| p.into_inner());
        for (record, events) in loaded {
            if mem.get(record.id).ok().flatten().is_some() {
                continue;
            }
            graphs.insert(record.graph.clone());
            readopted.push(record.id);
            if record.state == JobState::Running {
                running
                    .entry(record.graph.clone())
                    .or_default()
                    .push_back(record.id);
            }
            mem.insert_recovered(record, events);
        }
    }
    adoption
        .readopted
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .extend(readopted);
    for g in graphs {
        adoption.wake(&g);
    }
}

const JOB_COLUMNS: &str =
    "id, graph, state, input, output, error, labels::text, tenant, idempotency_key,
    deadline_ms, callback_url, callback, created_at, started_at, finished_at, updated_at,
    prompt_tokens, completion_tokens, cost_usd, events, budget";

fn job_from_row(r: &tokio_postgres::Row) -> Result<JobRecord, StoreError> {
    let id: JobId = r.get::<_, String>(0).parse().map_err(err)?;
    let mut rec = JobRecord::new(
        id,
        r.get::<_, String>(1).into(),
        &[],
        Arc::new(serde_json::from_str(r.get(3)).unwrap_or(Value::Null)),
        from_micros(r.get(12)),
    );
    rec.state = parse_state(r.get(2));
    rec.output = parse_json(r.get(4));
    rec.error = r.get(5);
    rec.labels = serde_json::from_str(r.get(6)).unwrap_or_default();
    rec.tenant = r.get(7);
    rec.idempotency_key = r.get(8);
    rec.deadline = r
        .get::<_, Option<i64>>(9)
        .map(|ms| Duration::from_millis(ms.max(0) as u64));
    rec.callback_url = r.get(10);
    rec.callback = r
        .get::<_, Option<String>>(11)
        .and_then(|c| serde_json::from_str::<CallbackDelivery>(&c).ok())
        .map(Box::new);
    rec.started_at = r.get::<_, Option<i64>>(13).map(from_micros);
    rec.finished_at = r.get::<_, Option<i64>>(14).map(from_micros);
    rec.updated_at = from_micros(r.get(15));
    rec.usage.prompt_tokens = r.get::<_, i64>(16) as u64;
    rec.usage.completion_tokens = r.get::<_, i64>(17) as u64;
    rec.usage.cost_usd = r.get(18);
    rec.events = r.get::<_, i64>(19) as u64;
    rec.budget = r
        .get::<_, Option<String>>(20)
        .and_then(|b| serde_json::from_str(&b).ok());
    Ok(rec)
}

/// The jobs of `ids` with their steps, in the order of `ids` (missing ones left out).
async fn load_jobs(c: &Client, ids: &[String]) -> Result<Vec<JobRecord>, StoreError> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = c
        .query(
            &format!("SELECT {JOB_COLUMNS} FROM jobs WHERE id = ANY($1)"),
            &[&ids],
        )
        .await
        .map_err(db)?;
    let mut jobs: HashMap<JobId, JobRecord> = HashMap::with_capacity(rows.len());
    for r in &rows {
        let rec = job_from_row(r)?;
        jobs.insert(rec.id, rec);
    }
    let steps = c
        .query(
            "SELECT job_id, agent, state, attempts, output, error, started_at, finished_at,
                 prompt_tokens, completion_tokens, cost_usd, approval, sub_steps
             FROM steps WHERE job_id = ANY($1) ORDER BY job_id, idx",
            &[&ids],
        )
        .await
        .map_err(db)?;
    for r in &steps {
        let id: JobId = r.get::<_, String>(0).parse().map_err(err)?;
        let Some(job) = jobs.get_mut(&id) else {
            continue;
        };
        // A journal that cannot be read is an error, not an empty journal (whose tool calls
        // would be made again).
        let sub_steps = match r.get::<_, Option<String>>(12) {
            None => Vec::new(),
            Some(text) => serde_json::from_str(&text)
                .map_err(|e| err(format!("job {id}: unreadable tool-call journal: {e}")))?,
        };
        job.steps.push(StepRecord {
            agent: r.get::<_, String>(1).into(),
            state: parse_step_state(r.get(2)),
            attempts: r.get::<_, i32>(3).max(0) as u32,
            output: parse_json(r.get(4)),
            error: r.get(5),
            started_at: r.get::<_, Option<i64>>(6).map(from_micros),
            finished_at: r.get::<_, Option<i64>>(7).map(from_micros),
            usage: cascade_agents::Usage {
                prompt_tokens: r.get::<_, i64>(8) as u64,
                completion_tokens: r.get::<_, i64>(9) as u64,
                cost_usd: r.get(10),
            },
            approval: r
                .get::<_, Option<String>>(11)
                .and_then(|a| serde_json::from_str(&a).ok())
                .map(Box::new),
            sub_steps,
        });
    }
    let mut out = Vec::with_capacity(jobs.len());
    for id in ids {
        if let Some(job) = id.parse().ok().and_then(|id: JobId| jobs.remove(&id)) {
            out.push(job);
        }
    }
    Ok(out)
}

async fn load_events(c: &Client, id: &str, after: u64) -> Result<Vec<JobEvent>, StoreError> {
    c.query(
        "SELECT body FROM events WHERE job_id = $1 AND seq > $2 ORDER BY seq",
        &[&id, &(after as i64)],
    )
    .await
    .map_err(db)?
    .iter()
    .map(|r| serde_json::from_str(r.get(0)).map_err(err))
    .collect()
}

async fn load_events_of(
    c: &Client,
    ids: &[String],
) -> Result<HashMap<JobId, Vec<JobEvent>>, StoreError> {
    let mut out: HashMap<JobId, Vec<JobEvent>> = HashMap::new();
    let rows = c
        .query(
            "SELECT body FROM events WHERE job_id = ANY($1) ORDER BY job_id, seq",
            &[&ids],
        )
        .await
        .map_err(db)?;
    for r in &rows {
        let e: JobEvent = serde_json::from_str(r.get(0)).map_err(err)?;
        out.entry(e.job_id).or_default().push(e);
    }
    Ok(out)
}

impl JobStore for PgStore {
    fn submit(&self, job: NewJob) -> StoreFuture<'_, Submitted> {
        let key = job.idempotency_key.clone();
        let input = job.input.clone();
        let graph = job.graph.clone();
        let result = (|| {
            let queued = self.queued.load(Ordering::Relaxed);
            if queued >= self.queue_capacity {
                return Err(StoreError::Busy { queued });
            }
            // The job's insert is queued before any change to it can be: a claim waits for it
            // (a change written before its row would find no row, as if the job were another
            // node's).
            let _order = self.order.lock().unwrap_or_else(|p| p.into_inner());
            // A key this node holds is answered from memory; one held only in the database (by
            // another node, or from before a restart) is found by the insert itself. Until the
            // insert says the key is this job's, a keyed job is not claimable: another node may
            // have taken the key a moment earlier, and a call made meanwhile would carry the
            // idempotency key of a job that will not exist (a second write upstream).
            let (submitted, created) = if job.idempotency_key.is_some() {
                self.mem.submit_held(job)?
            } else {
                self.mem.submit_now(job)?
            };
            Ok(match created {
                None => (submitted, None),
                Some((record, event)) => {
                    let (ack, done) = oneshot::channel();
                    let id = record.id;
                    self.send(Op::Insert { record, event, ack });
                    (submitted, Some((id, done)))
                }
            })
        })();
        // What the insert's answer means is carried out on the store's thread, not in this
        // future: a caller that goes away (a client's deadline) must not leave a keyed job held
        // out of the queue, or a refused one in memory.
        let (submitted, created) = match result {
            Ok(r) => r,
            Err(e) => return Box::pin(async move { Err(e) }),
        };
        let Some((id, done)) = created else {
            return Box::pin(async move { Ok(submitted) });
        };
        let (answer, answered) = oneshot::channel();
        let (mem, adoption) = (self.mem.clone(), self.adoption.clone());
        self.rt.spawn(async move {
            let outcome = match done.await {
                Ok(Ok(Inserted::Stored)) => {
                    if key.is_some() {
                        mem.release_held(id);
                        // Its graph claims it even if the submitter is gone (and so will not
                        // wake it).
                        adoption.wake(&graph);
                    }
                    Ok(submitted)
                }
                Ok(Ok(Inserted::Known {
                    existing,
                    input: stored,
                })) => {
                    mem.remove(id);
                    let same = serde_json::from_str::<Value>(&stored).is_ok_and(|v| v == *input);
                    Submitted::known_key(key.as_deref().unwrap_or_default(), existing, same)
                }
                Ok(Err(e)) => {
                    mem.remove(id);
                    Err(StoreError::Unavailable(format!(
                        "the job could not be stored: {e}"
                    )))
                }
                Err(_) => {
                    mem.remove(id);
                    Err(StoreError::Unavailable("the store's writer stopped".into()))
                }
            };
            let _ = answer.send(outcome);
        });
        Box::pin(async move {
            answered.await.unwrap_or_else(|_| {
                Err(StoreError::Unavailable("the store's writer stopped".into()))
            })
        })
    }

    fn claim_pending(&self, graph: &str, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        let _order = self.order.lock().unwrap_or_else(|p| p.into_inner());
        self.mem.claim_pending(graph, limit)
    }

    fn running(&self, graph: &str) -> Result<Vec<JobRecord>, StoreError> {
        // Every running job, those taken over included: none is left to resume twice.
        self.adoption
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(graph);
        self.mem.running(graph)
    }

    fn adopted(&self, graph: &str, limit: usize) -> Vec<JobRecord> {
        let mut running = self
            .adoption
            .running
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        let Some(queue) = running.get_mut(graph) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        while out.len() < limit {
            let Some(id) = queue.pop_front() else { break };
            if let Ok(Some(r)) = self.mem.get(id)
                && r.state == JobState::Running
            {
                out.push(r);
            }
        }
        out
    }

    fn fenced(&self) -> bool {
        self.adoption.fenced(self.lease)
    }

    fn lost_leases(&self, graph: &str) -> Vec<JobId> {
        let ids = self
            .adoption
            .lost
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(graph)
            .unwrap_or_default();
        for id in &ids {
            self.mem.remove(*id);
        }
        ids
    }

    fn remote_holder(&self, id: JobId) -> Result<Option<String>, StoreError> {
        // A job held here needs no look.
        if self.mem.tenant_of(id)?.is_some() {
            return Ok(None);
        }
        let (me, lease, id) = (
            self.node_id.clone(),
            self.lease.as_secs_f64(),
            id.to_string(),
        );
        self.read(move |c| {
            let (me, id) = (me.clone(), id.clone());
            async move {
                Ok(c.query_opt(
                    "SELECT j.lease_owner FROM jobs j JOIN nodes n ON n.id = j.lease_owner
                     WHERE j.id = $1 AND j.lease_owner <> $2
                       AND n.heartbeat_at >= now() - make_interval(secs => $3)
                       AND j.state IN ('pending', 'running', 'awaiting_approval', 'budget_exceeded')",
                    &[&id, &me, &lease],
                )
                .await
                .map_err(db)?
                .map(|r| r.get::<_, String>(0)))
            }
        })
    }

    fn forward(&self, node: &str, id: JobId, command: String) -> StoreFuture<'_, String> {
        let (tx, rx) = oneshot::channel();
        let (reader, adoption, node) =
            (self.reader.clone(), self.adoption.clone(), node.to_string());
        self.rt.spawn(async move {
            let _ = tx.send(forward_to(&reader, &adoption, &node, id, &command).await);
        });
        Box::pin(async move { rx.await.map_err(|_| err("the store stopped"))? })
    }

    fn set_command_handler(&self, handler: super::CommandHandler) {
        *self
            .adoption
            .commands
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(handler);
        self.adoption.commands_now.notify_one();
    }

    fn live_nodes(&self) -> Option<usize> {
        Some(self.adoption.live_nodes.load(Ordering::Relaxed)).filter(|&n| n > 0)
    }

    fn nodes(&self) -> Result<Option<Vec<NodeInfo>>, StoreError> {
        let (me, lease) = (self.node_id.clone(), self.lease.as_secs_f64());
        self.read(move |c| {
            let me = me.clone();
            async move {
                let rows = c
                    .query(
                        "SELECT n.id, n.address,
                             (extract(epoch FROM n.heartbeat_at) * 1000000)::int8,
                             (extract(epoch FROM n.started_at) * 1000000)::int8,
                             n.heartbeat_at >= now() - make_interval(secs => $1) AND NOT n.draining,
                             (SELECT count(*) FROM jobs j WHERE j.lease_owner = n.id
                                AND j.state IN ('pending', 'running', 'awaiting_approval', 'budget_exceeded'))
                         FROM nodes n ORDER BY n.id",
                        &[&lease],
                    )
                    .await
                    .map_err(db)?;
                Ok(Some(
                    rows.iter()
                        .map(|r| NodeInfo {
                            id: r.get(0),
                            address: r.get(1),
                            last_heartbeat: from_micros(r.get(2)),
                            started: from_micros(r.get(3)),
                            alive: r.get(4),
                            jobs_leased: r.get::<_, i64>(5).max(0) as u64,
                            this_node: r.get::<_, &str>(0) == me,
                        })
                        .collect(),
                ))
            }
        })
    }

    fn set_remote_events(&self, sink: RemoteEvents) {
        *self
            .adoption
            .remote
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(sink);
    }

    fn set_waker(&self, waker: Waker) {
        *self
            .adoption
            .waker
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Some(waker);
    }

    fn update(
        &self,
        id: JobId,
        update: crate::job::JobUpdate,
    ) -> Result<Option<JobEvent>, StoreError> {
        let send = |mut changed: Vec<(JobEvent, bool, JobRecord)>| {
            if let Some((event, logged, record)) = changed.pop() {
                self.send(Op::Update {
                    record,
                    event,
                    logged,
                });
            }
        };
        match self.mem.update_snapshots(id, [update.clone()], send) {
            Ok(mut events) => Ok(events.pop().flatten()),
            // A finished job evicted from memory can still get its callback's outcome.
            Err(StoreError::NotFound(_))
                if matches!(update, crate::job::JobUpdate::Callback(_)) =>
            {
                let Some(mut record) = self.get(id)? else {
                    return Err(StoreError::NotFound(id));
                };
                Ok(record.apply(update, crate::clock::now()).inspect(|event| {
                    self.send(Op::Update {
                        record: record.clone(),
                        event: event.clone(),
                        logged: true,
                    });
                }))
            }
            Err(e) => Err(e),
        }
    }

    fn update_all(
        &self,
        id: JobId,
        updates: Vec<crate::job::JobUpdate>,
    ) -> Result<Vec<Option<JobEvent>>, StoreError> {
        self.mem.update_snapshots(id, updates, |changed| {
            self.send(Op::Updates(
                changed
                    .into_iter()
                    .map(|(event, logged, record)| (record, event, logged))
                    .collect(),
            ))
        })
    }

    fn cancel_pending(&self, id: JobId, reason: &str) -> Result<Option<JobEvent>, StoreError> {
        let Some(event) = self.mem.cancel_pending(id, reason)? else {
            return Ok(None);
        };
        if let Some(record) = self.mem.get(id)? {
            self.send(Op::Update {
                record,
                event: event.clone(),
                logged: true,
            });
        }
        Ok(Some(event))
    }

    fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        if let Some(r) = self.mem.get(id)? {
            return Ok(Some(r));
        }
        Ok(self.load(vec![id.to_string()])?.pop())
    }

    fn tenant_of(&self, id: JobId) -> Result<Option<Arc<str>>, StoreError> {
        if let Some(t) = self.mem.tenant_of(id)? {
            return Ok(Some(t));
        }
        let id = id.to_string();
        self.read(move |c| {
            let id = id.clone();
            async move {
                Ok(c.query_opt("SELECT tenant FROM jobs WHERE id = $1", &[&id])
                    .await
                    .map_err(db)?
                    .map(|r| Arc::from(r.get::<_, &str>(0))))
            }
        })
    }

    fn events(&self, id: JobId, after_seq: u64) -> Result<Vec<JobEvent>, StoreError> {
        match self.mem.events(id, after_seq) {
            Err(StoreError::NotFound(_)) => {
                let key = id.to_string();
                let found = self.read(move |c| {
                    let key = key.clone();
                    async move {
                        let exists = c
                            .query_opt("SELECT 1 FROM jobs WHERE id = $1", &[&key])
                            .await
                            .map_err(db)?
                            .is_some();
                        match exists {
                            true => load_events(&c, &key, after_seq).await.map(Some),
                            false => Ok(None),
                        }
                    }
                })?;
                found.ok_or(StoreError::NotFound(id))
            }
            other => other,
        }
    }

    fn list(&self, filter: &JobFilter) -> Result<Vec<JobRecord>, StoreError> {
        let mut sql = String::from("SELECT id FROM jobs WHERE true");
        let mut args: Vec<String> = Vec::new();
        let mut arg = |sql: &mut String, clause: &str, value: String| {
            args.push(value);
            *sql += &clause.replace("$?", &format!("${}", args.len()));
        };
        if let Some(g) = &filter.graph {
            arg(&mut sql, " AND graph = $?", g.clone());
        }
        if let Some(t) = &filter.tenant {
            arg(&mut sql, " AND tenant = $?", t.clone());
        }
        if let Some(s) = filter.state {
            arg(&mut sql, " AND state = $?", s.as_str().to_string());
        }
        if let Some(b) = filter.before {
            arg(&mut sql, " AND id < $?", b.to_string());
        }
        if !filter.labels.is_empty() {
            let labels = serde_json::to_string(&filter.labels).map_err(err)?;
            arg(&mut sql, " AND labels @> $?::text::jsonb", labels);
        }
        sql += " ORDER BY id DESC";
        if filter.limit > 0 {
            sql += &format!(" LIMIT {}", filter.limit);
        }
        let ids = self.read(move |c| {
            let (sql, args) = (sql.clone(), args.clone());
            async move {
                let params: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = args
                    .iter()
                    .map(|a| a as &(dyn tokio_postgres::types::ToSql + Sync))
                    .collect();
                let rows = c.query(&sql, &params).await.map_err(db)?;
                Ok(rows
                    .iter()
                    .map(|r| r.get::<_, String>(0))
                    .collect::<Vec<_>>())
            }
        })?;
        // Memory holds the freshest state of a live job.
        let mut from_db: HashMap<JobId, JobRecord> = HashMap::new();
        let missing: Vec<String> = ids
            .iter()
            .filter(|id| {
                id.parse::<JobId>()
                    .ok()
                    .is_none_or(|id| self.mem.get(id).ok().flatten().is_none())
            })
            .cloned()
            .collect();
        for r in self.load(missing)? {
            from_db.insert(r.id, r);
        }
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let id: JobId = id.parse().map_err(err)?;
            if let Some(r) = self.mem.get(id)?.or_else(|| from_db.remove(&id)) {
                out.push(r);
            }
        }
        Ok(out)
    }

    fn pending_count(&self, graph: &str) -> usize {
        self.mem.pending_count(graph)
    }

    fn tenant_live_count(&self, tenant: &str) -> usize {
        self.mem.tenant_live_count(tenant)
    }

    // Every unfinished job is held in memory too (loaded at open), so approvals waiting for a
    // decision are all there.
    fn pending_approvals(
        &self,
        graph: Option<&str>,
        after: Option<&str>,
        limit: usize,
        tenant: Option<&str>,
    ) -> Result<Vec<ApprovalView>, StoreError> {
        self.mem.pending_approvals(graph, after, limit, tenant)
    }

    fn expired_approvals(&self, graph: &str, now: SystemTime) -> Vec<JobId> {
        self.mem.expired_approvals(graph, now)
    }

    fn pending_approval_count(&self, graph: &str) -> usize {
        self.mem.pending_approval_count(graph)
    }

    fn undelivered_callbacks(&self, limit: usize) -> Result<Vec<JobId>, StoreError> {
        let ids = self.read(move |c| async move {
            let rows = c
                .query(
                    "SELECT id FROM jobs WHERE callback_url IS NOT NULL AND callback IS NULL
                         AND state IN ('succeeded', 'failed', 'cancelled') ORDER BY id LIMIT $1",
                    &[&(limit as i64)],
                )
                .await
                .map_err(db)?;
            Ok(rows
                .iter()
                .map(|r| r.get::<_, String>(0))
                .collect::<Vec<_>>())
        })?;
        ids.into_iter().map(|id| id.parse().map_err(err)).collect()
    }

    fn credential_state(&self, name: &str) -> Result<Option<String>, StoreError> {
        let name = name.to_string();
        self.read(move |c| {
            let name = name.clone();
            async move {
                Ok(c.query_opt(
                    "SELECT sealed FROM credential_state WHERE name = $1",
                    &[&name],
                )
                .await
                .map_err(db)?
                .map(|r| r.get(0)))
            }
        })
    }

    fn save_credential_state(&self, name: &str, sealed: String) {
        self.send(Op::CredentialState {
            name: name.to_string(),
            sealed,
        });
    }

    fn trigger_state(&self, key: &str) -> Result<Option<String>, StoreError> {
        let key = key.to_string();
        self.read(move |c| {
            let key = key.clone();
            async move {
                Ok(
                    c.query_opt("SELECT state FROM trigger_state WHERE key = $1", &[&key])
                        .await
                        .map_err(db)?
                        .map(|r| r.get(0)),
                )
            }
        })
    }

    fn save_trigger_state(&self, key: &str, state: String) {
        self.send(Op::TriggerState {
            key: key.to_string(),
            state,
        });
    }

    fn release(&self) -> StoreFuture<'_, ()> {
        let me = self.node_id.clone();
        let adoption = self.adoption.clone();
        let result = self.read(move |c| {
            let (me, adoption) = (me.clone(), adoption.clone());
            async move {
                let _round = adoption.round.lock().await;
                adoption.released.store(true, Ordering::SeqCst);
                // Unleased jobs are taken by the next node to look, and the others are told to
                // look now; a draining node counts as gone.
                let handed = c
                    .execute(
                        "UPDATE jobs SET lease_owner = NULL, leased_at = NULL
                         WHERE lease_owner = $1
                           AND state IN ('pending', 'running', 'awaiting_approval', 'budget_exceeded')",
                        &[&me],
                    )
                    .await
                    .map_err(db)?;
                c.execute("UPDATE nodes SET draining = true WHERE id = $1", &[&me])
                    .await
                    .map_err(db)?;
                c.execute("SELECT pg_notify($1, $2)", &[&HANDBACK_CHANNEL, &me])
                    .await
                    .map_err(db)?;
                Ok(handed)
            }
        });
        Box::pin(async move {
            let handed = result?;
            if handed > 0 {
                tracing::info!(
                    jobs = handed,
                    "handed this node's unfinished jobs back to the cluster"
                );
            }
            Ok(())
        })
    }

    fn flush(&self) -> StoreFuture<'_, ()> {
        let (ack, done) = oneshot::channel();
        self.send(Op::Flush(ack));
        Box::pin(async move {
            done.await
                .map_err(|_| StoreError::Unavailable("the store's writer stopped".into()))
        })
    }
}

/// The writer: takes what is queued (up to [`MAX_BATCH`] changes), commits it in one
/// transaction, answers the submissions in it, and keeps a batch through a lost connection
/// until it is committed.
async fn writer_loop(
    o: PgOptions,
    mut rx: mpsc::UnboundedReceiver<Op>,
    queued: &AtomicUsize,
    adoption: &Adoption,
) {
    let depth = metrics::gauge!(crate::metrics::STORE_QUEUE_DEPTH);
    let reconnects = metrics::counter!(crate::metrics::STORE_RECONNECTS);
    let mut client: Option<Client> = None;
    // New jobs whose key another node held: their later changes are not written.
    let mut ghosts: HashSet<JobId> = HashSet::new();
    let mut last_cleanup = Instant::now();
    let mut batch = Vec::new();
    while rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
        for id in std::mem::take(&mut *adoption.readopted.lock().unwrap_or_else(|p| p.into_inner()))
        {
            ghosts.remove(&id);
        }
        let mut delay = Duration::from_millis(100);
        let outcome = loop {
            let c = match client.as_mut() {
                Some(c) if !c.is_closed() => c,
                _ => {
                    client = None;
                    match pg_schema::connect(&o.url, o.password.as_ref()).await {
                        Ok(c) => client.insert(c),
                        Err(e) => {
                            tracing::warn!(error = %e, retry_in = ?delay, "PostgreSQL is unreachable; the store's writer holds its batch and tries again");
                            tokio::time::sleep(delay).await;
                            delay = (delay * 2).min(Duration::from_secs(5));
                            reconnects.increment(1);
                            continue;
                        }
                    }
                }
            };
            match write_batch(c, &batch, &o, &mut ghosts, adoption).await {
                Err(e) if is_connection_error(&e) => {
                    tracing::warn!(error = %e, retry_in = ?delay, "a store batch met a lost connection; writing it again");
                    client = None;
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    reconnects.increment(1);
                }
                other => break other,
            }
        };
        let left = queued.fetch_sub(batch.len(), Ordering::Relaxed) - batch.len();
        depth.set(left as f64);
        let mut outcome = outcome.map_err(|e| e.to_string());
        if let Err(e) = &outcome {
            tracing::error!(error = %e, ops = batch.len(), "store write failed");
        }
        for op in batch.drain(..) {
            match op {
                Op::Insert { ack, record, .. } => {
                    let answer = match &mut outcome {
                        Err(e) => Err(e.clone()),
                        Ok(done) => done.remove(&record.id).unwrap_or_else(|| {
                            Err("its row was not written (another node holds its id)".into())
                        }),
                    };
                    let _ = ack.send(answer);
                }
                Op::Flush(ack) => {
                    let _ = ack.send(());
                }
                Op::CredentialState { .. }
                | Op::TriggerState { .. }
                | Op::Update { .. }
                | Op::Updates(_) => {}
            }
        }
        if ghosts.len() > 100_000 {
            ghosts.clear();
        }
        if last_cleanup.elapsed() > Duration::from_secs(600)
            && let Some(c) = client.as_mut()
        {
            last_cleanup = Instant::now();
            if let Err(e) = clean_up(c, o.retention).await {
                tracing::warn!(error = %e, "store clean-up failed");
            }
        }
    }
}

/// Delete the jobs finished before the retention, in chunks, on one node at a time.
async fn clean_up(c: &mut Client, retention: Duration) -> Result<(), tokio_postgres::Error> {
    let cutoff = micros(crate::clock::now() - retention);
    loop {
        let tx = c.transaction().await?;
        let locked: bool = tx
            .query_one("SELECT pg_try_advisory_xact_lock($1)", &[&RETENTION_LOCK])
            .await?
            .get(0);
        if !locked {
            return Ok(());
        }
        let deleted = tx
            .execute(
                "DELETE FROM jobs WHERE id IN (
                     SELECT id FROM jobs WHERE finished_at < $1 LIMIT $2)",
                &[&cutoff, &RETENTION_CHUNK],
            )
            .await?;
        tx.commit().await?;
        if deleted < RETENTION_CHUNK as u64 {
            return Ok(());
        }
    }
}

/// What the writer tells each new job of a batch: stored, or answered by another job's key, or
/// its own error.
type Answers = HashMap<JobId, Result<Inserted, String>>;

/// Write one batch: in one transaction, or, when a statement fails (a value PostgreSQL refuses),
/// job by job, each in its own, so one job's rows never fail the others'. Connection errors are
/// returned for the caller to retry the whole batch.
async fn write_batch(
    c: &mut Client,
    batch: &[Op],
    o: &PgOptions,
    ghosts: &mut HashSet<JobId>,
    adoption: &Adoption,
) -> Result<Answers, tokio_postgres::Error> {
    let mut jobs = group_batch(batch);
    jobs.retain(|(id, _)| !ghosts.contains(id));
    // One order for every writer's row locks, so two nodes' batches never deadlock.
    jobs.sort_by_key(|(id, _)| *id);
    let mut answers = match write_jobs(c, &jobs, o, ghosts, adoption).await {
        Ok(answers) => answers,
        Err(e) if is_connection_error(&e) => return Err(e),
        Err(e) => {
            tracing::warn!(error = %e, "a store batch failed; writing its jobs one by one");
            let mut answers = Answers::new();
            for job in &jobs {
                match write_jobs(c, std::slice::from_ref(job), o, ghosts, adoption).await {
                    Ok(a) => answers.extend(a),
                    Err(e) if is_connection_error(&e) => return Err(e),
                    Err(e) => {
                        tracing::error!(job_id = %job.0, error = %e, "a job's rows could not be written; the rest of its batch was");
                        answers.insert(job.0, Err(e.to_string()));
                    }
                }
            }
            answers
        }
    };
    for op in batch {
        let r = match op {
            Op::CredentialState { name, sealed } => c
                .execute(
                    "INSERT INTO credential_state (name, sealed, updated_at) VALUES ($1, $2, $3)
                     ON CONFLICT (name) DO UPDATE SET sealed = excluded.sealed, updated_at = excluded.updated_at",
                    &[name, sealed, &micros(crate::clock::now())],
                )
                .await
                .map(drop),
            Op::TriggerState { key, state } => c
                .execute(
                    "INSERT INTO trigger_state (key, state, updated_at) VALUES ($1, $2, $3)
                     ON CONFLICT (key) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
                    &[key, state, &micros(crate::clock::now())],
                )
                .await
                .map(drop),
            _ => Ok(()),
        };
        if let Err(e) = r {
            if is_connection_error(&e) {
                return Err(e);
            }
            tracing::error!(error = %e, "a credential's or trigger's state could not be saved");
        }
    }
    answers.shrink_to_fit();
    Ok(answers)
}

/// The grouped jobs' rows in one transaction: new jobs (inserted unless their key is taken),
/// every job's row, the changed steps and the events.
async fn write_jobs(
    c: &mut Client,
    jobs: &[(JobId, JobWrites<'_>)],
    o: &PgOptions,
    ghosts: &mut HashSet<JobId>,
    adoption: &Adoption,
) -> Result<Answers, tokio_postgres::Error> {
    let tx = c.transaction().await?;
    let mut answers = Answers::new();
    let new: Vec<&JobRecord> = jobs.iter().filter(|(_, w)| w.1).map(|(_, w)| w.0).collect();
    let mut skip: HashSet<JobId> = HashSet::new();
    if !new.is_empty() {
        let (tenants, keys): (Vec<&str>, Vec<&str>) = new
            .iter()
            .filter_map(|r| r.idempotency_key.as_deref().map(|k| (r.tenant.as_str(), k)))
            .unzip();
        if !keys.is_empty() {
            // A key held by a job finished before the retention is free again (the clean-up
            // has not deleted that job yet).
            let cutoff = micros(crate::clock::now() - o.retention);
            tx.execute(
                "UPDATE jobs SET idempotency_key = NULL
                 WHERE finished_at < $3
                   AND (tenant, idempotency_key) IN (SELECT * FROM unnest($1::text[], $2::text[]))",
                &[&tenants, &keys, &cutoff],
            )
            .await?;
        }
        let ids: Vec<String> = new.iter().map(|r| r.id.to_string()).collect();
        let inserted: HashSet<String> = tx
            .query(
                "INSERT INTO jobs (id, graph, state, input, labels, tenant, idempotency_key,
                     deadline_ms, callback_url, created_at, updated_at, events, lease_owner,
                     leased_at)
                 SELECT u.id, u.graph, u.state, u.input, u.labels::jsonb, u.tenant, u.key,
                     u.deadline_ms, u.callback_url, u.created_at, u.updated_at, u.events, $13,
                     now()
                 FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[],
                     $6::text[], $7::text[], $8::int8[], $9::text[], $10::int8[], $11::int8[],
                     $12::int8[])
                     AS u(id, graph, state, input, labels, tenant, key, deadline_ms,
                          callback_url, created_at, updated_at, events)
                 ON CONFLICT DO NOTHING
                 RETURNING id",
                &[
                    &ids,
                    &new.iter().map(|r| &*r.graph).collect::<Vec<_>>(),
                    &new.iter().map(|r| r.state.as_str()).collect::<Vec<_>>(),
                    &new.iter().map(|r| r.input.to_string()).collect::<Vec<_>>(),
                    &new.iter()
                        .map(|r| serde_json::to_string(&r.labels).unwrap_or_else(|_| "{}".into()))
                        .collect::<Vec<_>>(),
                    &new.iter().map(|r| r.tenant.as_str()).collect::<Vec<_>>(),
                    &new.iter()
                        .map(|r| r.idempotency_key.as_deref())
                        .collect::<Vec<_>>(),
                    &new.iter()
                        .map(|r| r.deadline.map(|d| d.as_millis() as i64))
                        .collect::<Vec<_>>(),
                    &new.iter()
                        .map(|r| r.callback_url.as_deref())
                        .collect::<Vec<_>>(),
                    &new.iter().map(|r| micros(r.created_at)).collect::<Vec<_>>(),
                    &new.iter().map(|r| micros(r.updated_at)).collect::<Vec<_>>(),
                    &new.iter().map(|r| r.events as i64).collect::<Vec<_>>(),
                    &o.node_id,
                ],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for r in &new {
            if inserted.contains(&r.id.to_string()) {
                answers.insert(r.id, Ok(Inserted::Stored));
                continue;
            }
            // Not inserted: the row is there already (this batch committed before, and its answer
            // was lost), or its key names a job another node stored first.
            let own = tx
                .query_opt("SELECT 1 FROM jobs WHERE id = $1", &[&r.id.to_string()])
                .await?
                .is_some();
            if own {
                answers.insert(r.id, Ok(Inserted::Stored));
                continue;
            }
            skip.insert(r.id);
            let known = match &r.idempotency_key {
                Some(key) => tx
                    .query_opt(
                        "SELECT id, input FROM jobs WHERE tenant = $1 AND idempotency_key = $2",
                        &[&r.tenant, key],
                    )
                    .await?
                    .and_then(|row| {
                        let existing = row.get::<_, String>(0).parse().ok()?;
                        Some(Inserted::Known {
                            existing,
                            input: row.get(1),
                        })
                    }),
                None => None,
            };
            answers.insert(
                r.id,
                known.ok_or_else(|| format!("job {} is already stored", r.id)),
            );
        }
    }
    let rows: Vec<&JobRecord> = jobs
        .iter()
        .map(|(_, w)| w.0)
        .filter(|r| !skip.contains(&r.id))
        .collect();
    // The fence: a job's row changes only while this node holds its lease (kept after the job
    // finished, for its callback's outcome). A node that lost a job to a takeover, or handed it
    // back, writes nothing more to it.
    let mut applied: HashSet<JobId> = HashSet::with_capacity(rows.len());
    if !rows.is_empty() {
        let done = tx
            .query(
                "UPDATE jobs SET state = u.state, output = u.output, error = u.error,
                 started_at = u.started_at, finished_at = u.finished_at, updated_at = u.updated_at,
                 prompt_tokens = u.prompt_tokens, completion_tokens = u.completion_tokens,
                 cost_usd = u.cost_usd, events = u.events, callback = u.callback, budget = u.budget
             FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::int8[], $6::int8[],
                 $7::int8[], $8::int8[], $9::int8[], $10::float8[], $11::int8[], $12::text[],
                 $13::text[])
                 AS u(id, state, output, error, started_at, finished_at, updated_at, prompt_tokens,
                      completion_tokens, cost_usd, events, callback, budget)
             WHERE jobs.id = u.id AND jobs.lease_owner = $14
             RETURNING jobs.id",
                &[
                    &rows.iter().map(|r| r.id.to_string()).collect::<Vec<_>>(),
                    &rows.iter().map(|r| r.state.as_str()).collect::<Vec<_>>(),
                    &rows.iter().map(|r| json(&r.output)).collect::<Vec<_>>(),
                    &rows.iter().map(|r| r.error.as_deref()).collect::<Vec<_>>(),
                    &rows
                        .iter()
                        .map(|r| r.started_at.map(micros))
                        .collect::<Vec<_>>(),
                    &rows
                        .iter()
                        .map(|r| r.finished_at.map(micros))
                        .collect::<Vec<_>>(),
                    &rows
                        .iter()
                        .map(|r| micros(r.updated_at))
                        .collect::<Vec<_>>(),
                    &rows
                        .iter()
                        .map(|r| r.usage.prompt_tokens as i64)
                        .collect::<Vec<_>>(),
                    &rows
                        .iter()
                        .map(|r| r.usage.completion_tokens as i64)
                        .collect::<Vec<_>>(),
                    &rows.iter().map(|r| r.usage.cost_usd).collect::<Vec<_>>(),
                    &rows.iter().map(|r| r.events as i64).collect::<Vec<_>>(),
                    &rows
                        .iter()
                        .map(|r| {
                            r.callback
                                .as_ref()
                                .and_then(|c| serde_json::to_string(c).ok())
                        })
                        .collect::<Vec<_>>(),
                    &rows
                        .iter()
                        .map(|r| r.budget.and_then(|b| serde_json::to_string(&b).ok()))
                        .collect::<Vec<_>>(),
                    &o.node_id,
                ],
            )
            .await?;
        applied.extend(
            done.iter()
                .filter_map(|r| r.get::<_, &str>(0).parse::<JobId>().ok()),
        );
    }
    let mut lost = Vec::new();
    for r in &rows {
        if !applied.contains(&r.id) {
            skip.insert(r.id);
            lost.push((r.graph.clone(), r.id));
        }
    }
    write_steps(&tx, jobs, &skip).await?;
    write_events(&tx, jobs, &skip).await?;
    // The jobs with new events, for the watchers other nodes hold (delivered at the commit).
    let mut payload = String::new();
    for (id, (_, _, _, events)) in jobs {
        if events.is_empty() || skip.contains(id) {
            continue;
        }
        if payload.len() + 37 > NOTIFY_BYTES {
            tx.execute("SELECT pg_notify($1, $2)", &[&EVENTS_CHANNEL, &payload])
                .await?;
            payload.clear();
        }
        if !payload.is_empty() {
            payload.push(',');
        }
        payload += &id.to_string();
    }
    if !payload.is_empty() {
        tx.execute("SELECT pg_notify($1, $2)", &[&EVENTS_CHANNEL, &payload])
            .await?;
    }
    tx.commit().await?;
    if !lost.is_empty() {
        metrics::counter!(crate::metrics::CLUSTER_LEASES_LOST).increment(lost.len() as u64);
        tracing::warn!(jobs = lost.len(), first = %lost[0].1, "another node took over jobs this node was running (its heartbeat was late); their changes here are not written, and this node forgets them");
        adoption.lose(lost);
    }
    ghosts.extend(skip);
    Ok(answers)
}

async fn write_steps(
    tx: &tokio_postgres::Transaction<'_>,
    jobs: &[(JobId, JobWrites<'_>)],
    skip: &HashSet<JobId>,
) -> Result<(), tokio_postgres::Error> {
    let steps: Vec<(String, i32, &StepRecord)> = jobs
        .iter()
        .filter(|(id, _)| !skip.contains(id))
        .flat_map(|(id, (r, _, changed, _))| {
            changed
                .iter()
                .map(move |&i| (id.to_string(), i as i32, &r.steps[i]))
        })
        .collect();
    // A journal that cannot be serialized leaves its step's row as it was (an empty one would
    // make its tool calls again); the step is logged.
    let mut journals = Vec::with_capacity(steps.len());
    let steps: Vec<(String, i32, &StepRecord)> = steps
        .into_iter()
        .filter(|(job, _, s)| {
            let journal = match s.sub_steps.is_empty() {
                true => Ok(None),
                false => serde_json::to_string(&s.sub_steps).map(Some),
            };
            match journal {
                Ok(j) => {
                    journals.push(j);
                    true
                }
                Err(e) => {
                    tracing::error!(job_id = %job, agent = %s.agent, error = %e, "a step's tool-call journal could not be written");
                    false
                }
            }
        })
        .collect();
    if steps.is_empty() {
        return Ok(());
    }
    tx.execute(
        "INSERT INTO steps (job_id, idx, agent, state, attempts, output, error, started_at,
             finished_at, prompt_tokens, completion_tokens, cost_usd, approval, sub_steps)
         SELECT * FROM unnest($1::text[], $2::int4[], $3::text[], $4::text[], $5::int4[],
             $6::text[], $7::text[], $8::int8[], $9::int8[], $10::int8[], $11::int8[],
             $12::float8[], $13::text[], $14::text[])
         ON CONFLICT (job_id, idx) DO UPDATE SET state = excluded.state,
             attempts = excluded.attempts, output = excluded.output, error = excluded.error,
             started_at = excluded.started_at, finished_at = excluded.finished_at,
             prompt_tokens = excluded.prompt_tokens,
             completion_tokens = excluded.completion_tokens, cost_usd = excluded.cost_usd,
             approval = excluded.approval, sub_steps = excluded.sub_steps",
        &[
            &steps.iter().map(|(j, _, _)| j.as_str()).collect::<Vec<_>>(),
            &steps.iter().map(|(_, i, _)| *i).collect::<Vec<_>>(),
            &steps.iter().map(|(_, _, s)| &*s.agent).collect::<Vec<_>>(),
            &steps
                .iter()
                .map(|(_, _, s)| s.state.as_str())
                .collect::<Vec<_>>(),
            &steps
                .iter()
                .map(|(_, _, s)| s.attempts.min(i32::MAX as u32) as i32)
                .collect::<Vec<_>>(),
            &steps
                .iter()
                .map(|(_, _, s)| json(&s.output))
                .collect::<Vec<_>>(),
            &steps
                .iter()
                .map(|(_, _, s)| s.error.as_deref())
                .collect::<Vec<_>>(),
            &steps
                .iter()
                .map(|(_, _, s)| s.started_at.map(micros))
                .collect::<Vec<_>>(),
            &steps
                .iter()
                .map(|(_, _, s)| s.finished_at.map(micros))
                .collect::<Vec<_>>(),
            &steps
                .iter()
                .map(|(_, _, s)| s.usage.prompt_tokens as i64)
                .collect::<Vec<_>>(),
            &steps
                .iter()
                .map(|(_, _, s)| s.usage.completion_tokens as i64)
                .collect::<Vec<_>>(),
            &steps
                .iter()
                .map(|(_, _, s)| s.usage.cost_usd)
                .collect::<Vec<_>>(),
            &steps
                .iter()
                .map(|(_, _, s)| {
                    s.approval
                        .as_ref()
                        .and_then(|a| serde_json::to_string(a).ok())
                })
                .collect::<Vec<_>>(),
            &journals,
        ],
    )
    .await?;
    Ok(())
}

async fn write_events(
    tx: &tokio_postgres::Transaction<'_>,
    jobs: &[(JobId, JobWrites<'_>)],
    skip: &HashSet<JobId>,
) -> Result<(), tokio_postgres::Error> {
    // One row per (job, seq), the last written: a repeated event folds into its first one, whose
    // body changes (an upsert may not touch a row twice in one statement).
    let mut rows: HashMap<(JobId, u64), &JobEvent> = HashMap::new();
    for (id, (_, _, _, events)) in jobs {
        if skip.contains(id) {
            continue;
        }
        for e in events {
            rows.insert((*id, e.seq), e);
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    let mut rows: Vec<_> = rows.into_iter().collect();
    rows.sort_by_key(|(k, _)| *k);
    tx.execute(
        "INSERT INTO events (job_id, seq, body)
         SELECT * FROM unnest($1::text[], $2::int8[], $3::text[])
         ON CONFLICT (job_id, seq) DO UPDATE SET body = excluded.body",
        &[
            &rows
                .iter()
                .map(|((id, _), _)| id.to_string())
                .collect::<Vec<_>>(),
            &rows
                .iter()
                .map(|((_, seq), _)| *seq as i64)
                .collect::<Vec<_>>(),
            &rows
                .iter()
                .map(|(_, e)| serde_json::to_string(e).unwrap_or_default())
                .collect::<Vec<_>>(),
        ],
    )
    .await?;
    Ok(())
}
