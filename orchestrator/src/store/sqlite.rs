//! The durable store: an SQLite file in WAL mode, written by one thread with group commit.
//!
//! Live jobs (pending, running) are also held in a [`MemoryStore`], which answers the scheduler's
//! per-step calls without touching the disk; every change is queued to the writer thread, which
//! commits everything queued so far in one transaction. A submission is acknowledged only after
//! the transaction holding it committed, so an acknowledged job survives `kill -9`; a step update
//! lost in a crash is harmless (the step runs again with the same idempotency key). On open, jobs
//! left pending or running are loaded back and resume.
//!
//! rusqlite is synchronous; the writer is a plain thread and reads of finished jobs take a short
//! lock on a read connection (WAL lets it read while the writer writes).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use rusqlite::{Connection, OptionalExtension, params};
use serde_json::Value;
use tokio::sync::oneshot;

use super::batch::{
    Inserted, JobWrites, Op, from_micros, group_batch, json, micros, parse_json, parse_state,
    parse_step_state,
};
use super::{JobFilter, JobStore, MemoryStore, NewJob, StoreError, StoreFuture, Submitted};
use crate::job::{
    ApprovalView, CallbackDelivery, JobEvent, JobId, JobRecord, JobUpdate, StepRecord,
};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    graph TEXT NOT NULL,
    state TEXT NOT NULL,
    input TEXT NOT NULL,
    output TEXT,
    error TEXT,
    labels TEXT NOT NULL,
    tenant TEXT NOT NULL,
    idempotency_key TEXT,
    deadline_ms INTEGER,
    callback_url TEXT,
    callback TEXT,
    created_at INTEGER NOT NULL,
    started_at INTEGER,
    finished_at INTEGER,
    updated_at INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    events INTEGER NOT NULL DEFAULT 0,
    budget TEXT
);
CREATE INDEX IF NOT EXISTS jobs_graph_state ON jobs (graph, state);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs (state);
CREATE UNIQUE INDEX IF NOT EXISTS jobs_idempotency ON jobs (tenant, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE TABLE IF NOT EXISTS steps (
    job_id TEXT NOT NULL,
    idx INTEGER NOT NULL,
    agent TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL,
    output TEXT,
    error TEXT,
    started_at INTEGER,
    finished_at INTEGER,
    prompt_tokens INTEGER NOT NULL DEFAULT 0,
    completion_tokens INTEGER NOT NULL DEFAULT 0,
    cost_usd REAL NOT NULL DEFAULT 0,
    approval TEXT,
    sub_steps TEXT,
    PRIMARY KEY (job_id, idx)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS events (
    job_id TEXT NOT NULL,
    seq INTEGER NOT NULL,
    body TEXT NOT NULL,
    PRIMARY KEY (job_id, seq)
) WITHOUT ROWID;
-- OAuth2 credentials' rotated refresh tokens, sealed with a key only the configured client
-- secret gives: one row per credential.
CREATE TABLE IF NOT EXISTS credential_state (
    name TEXT PRIMARY KEY,
    sealed TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
-- Triggers' state (a schedule's last slot fired, an operator's pause): one row per trigger.
CREATE TABLE IF NOT EXISTS trigger_state (
    key TEXT PRIMARY KEY,
    state TEXT NOT NULL,
    updated_at INTEGER NOT NULL
) WITHOUT ROWID;
"#;

/// Where and how the durable store keeps its file.
#[derive(Clone, Debug)]
pub struct SqliteOptions {
    /// The database file (created with its directory if missing).
    pub path: PathBuf,
    /// Finished jobs and their idempotency keys are kept this long (default 24 h).
    pub retention: Duration,
    /// fsync every commit (`synchronous = FULL`): survives power loss, not only a crash.
    pub fsync: bool,
    /// Changes that may wait for the writer; beyond it, submissions are refused (`Busy`) until
    /// it catches up, so a slow disk pushes back on submitters instead of growing memory.
    pub queue_capacity: usize,
    /// Events kept per job (its final event always).
    pub max_events_per_job: usize,
}

impl SqliteOptions {
    pub const DEFAULT_QUEUE_CAPACITY: usize = 100_000;

    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self {
            path: path.into(),
            retention: Duration::from_secs(24 * 3600),
            fsync: true,
            queue_capacity: Self::DEFAULT_QUEUE_CAPACITY,
            max_events_per_job: super::memory::DEFAULT_MAX_EVENTS_PER_JOB,
        }
    }
}

pub struct SqliteStore {
    mem: MemoryStore,
    /// Unbounded by type, bounded by admission: `queued` counts what waits in it, and
    /// submissions are refused at `queue_capacity`. The other ops (step updates) come from jobs
    /// already in flight, whose number `max_in_flight_jobs` bounds.
    tx: Mutex<mpsc::Sender<Op>>,
    queued: Arc<AtomicUsize>,
    queue_capacity: usize,
    read: Mutex<Connection>,
    /// Makes "is this key known (in memory or on disk)? if not, take it" one step.
    submit_lock: Mutex<()>,
    retention: Duration,
}

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// Open (or create) the store and load the jobs left pending or running.
    pub fn open(options: SqliteOptions) -> Result<Self, StoreError> {
        if let Some(dir) = options.path.parent()
            && !dir.as_os_str().is_empty()
        {
            std::fs::create_dir_all(dir).map_err(|e| {
                err(format!(
                    "cannot create data directory {}: {e}",
                    dir.display()
                ))
            })?;
        }
        let open = || -> Result<Connection, StoreError> {
            let c = Connection::open(&options.path)
                .map_err(|e| err(format!("cannot open {}: {e}", options.path.display())))?;
            c.busy_timeout(Duration::from_secs(10)).map_err(err)?;
            c.pragma_update(None, "journal_mode", "WAL").map_err(err)?;
            c.pragma_update(
                None,
                "synchronous",
                if options.fsync { "FULL" } else { "NORMAL" },
            )
            .map_err(err)?;
            Ok(c)
        };
        let writer = open()?;
        writer.execute_batch(SCHEMA).map_err(err)?;
        migrate(&writer)?;
        let read = open()?;
        let mem = MemoryStore::with_retention(10_000)
            .with_max_events_per_job(options.max_events_per_job)
            .with_key_ttl(options.retention);
        let mut loaded = 0;
        {
            let mut stmt = read
                .prepare("SELECT id FROM jobs WHERE state IN ('pending', 'running', 'awaiting_approval', 'budget_exceeded') ORDER BY id")
                .map_err(err)?;
            let ids: Vec<String> = stmt
                .query_map([], |r| r.get(0))
                .map_err(err)?
                .collect::<Result<_, _>>()
                .map_err(err)?;
            for id in ids {
                let id: JobId = id.parse().map_err(err)?;
                if let Some(record) = load_job(&read, id)? {
                    let events = load_events(&read, id, 0)?;
                    mem.insert_recovered(record, events);
                    loaded += 1;
                }
            }
        }
        if loaded > 0 {
            tracing::info!(jobs = loaded, path = %options.path.display(), "loaded unfinished jobs from the store");
        }
        let (tx, rx) = mpsc::channel();
        let retention = options.retention;
        let queued = Arc::new(AtomicUsize::new(0));
        let depth = queued.clone();
        std::thread::Builder::new()
            .name("cascade-store-writer".into())
            .spawn(move || writer_loop(writer, rx, retention, &depth))
            .map_err(err)?;
        Ok(Self {
            mem,
            tx: Mutex::new(tx),
            queued,
            queue_capacity: options.queue_capacity.max(1),
            read: Mutex::new(read),
            submit_lock: Mutex::new(()),
            retention,
        })
    }

    fn send(&self, op: Op) {
        self.queued.fetch_add(1, Ordering::Relaxed);
        let tx = self.tx.lock().unwrap_or_else(|p| p.into_inner());
        if tx.send(op).is_err() {
            tracing::error!("the store's writer thread is gone; changes are not persisted");
        }
    }

    fn read(&self) -> MutexGuard<'_, Connection> {
        self.read.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A key not held in memory may still name a job on disk (within the retention).
    fn key_on_disk(&self, tenant: &str, key: &str) -> Result<Option<(JobId, Value)>, StoreError> {
        let cutoff = micros(crate::clock::now() - self.retention);
        let conn = self.read();
        let row: Option<(String, String)> = conn
            .query_row(
                "SELECT id, input FROM jobs WHERE tenant = ?1 AND idempotency_key = ?2
                     AND (finished_at IS NULL OR finished_at >= ?3)",
                params![tenant, key, cutoff],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(err)?;
        match row {
            None => Ok(None),
            Some((id, input)) => Ok(Some((
                id.parse().map_err(err)?,
                serde_json::from_str(&input).map_err(err)?,
            ))),
        }
    }
}

impl JobStore for SqliteStore {
    fn submit(&self, job: NewJob) -> StoreFuture<'_, Submitted> {
        let result = (|| {
            let queued = self.queued.load(Ordering::Relaxed);
            if queued >= self.queue_capacity {
                return Err(StoreError::Busy { queued });
            }
            let _guard = self.submit_lock.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(key) = &job.idempotency_key
                && self.mem.find_key(&job.tenant, key).is_none()
                && let Some((existing, input)) = self.key_on_disk(&job.tenant, key)?
            {
                return Ok((
                    Submitted::known_key(key, existing, input == *job.input)?,
                    None,
                ));
            }
            self.mem.submit_now(job)
        })();
        Box::pin(async move {
            let (submitted, created) = result?;
            let Some((record, event)) = created else {
                return Ok(submitted);
            };
            let (ack, done) = oneshot::channel();
            let id = record.id;
            self.send(Op::Insert { record, event, ack });
            match done.await {
                Ok(Ok(_)) => Ok(submitted),
                Ok(Err(e)) => {
                    self.mem.remove(id);
                    Err(StoreError::Unavailable(format!(
                        "the job could not be stored: {e}"
                    )))
                }
                Err(_) => {
                    self.mem.remove(id);
                    Err(StoreError::Unavailable("the store's writer stopped".into()))
                }
            }
        })
    }

    fn claim_pending(&self, graph: &str, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        self.mem.claim_pending(graph, limit)
    }

    fn running(&self, graph: &str) -> Result<Vec<JobRecord>, StoreError> {
        self.mem.running(graph)
    }

    fn update(&self, id: JobId, update: JobUpdate) -> Result<Option<JobEvent>, StoreError> {
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
            Err(StoreError::NotFound(_)) if matches!(update, JobUpdate::Callback(_)) => {
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
        updates: Vec<JobUpdate>,
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
        load_job(&self.read(), id)
    }

    fn tenant_of(&self, id: JobId) -> Result<Option<Arc<str>>, StoreError> {
        if let Some(t) = self.mem.tenant_of(id)? {
            return Ok(Some(t));
        }
        Ok(load_job(&self.read(), id)?.map(|r| Arc::from(r.tenant.as_str())))
    }

    fn events(&self, id: JobId, after_seq: u64) -> Result<Vec<JobEvent>, StoreError> {
        match self.mem.events(id, after_seq) {
            Err(StoreError::NotFound(_)) => {
                let conn = self.read();
                if load_job(&conn, id)?.is_none() {
                    return Err(StoreError::NotFound(id));
                }
                load_events(&conn, id, after_seq)
            }
            other => other,
        }
    }

    fn list(&self, filter: &JobFilter) -> Result<Vec<JobRecord>, StoreError> {
        let mut sql = String::from("SELECT id FROM jobs WHERE 1 = 1");
        let mut args: Vec<String> = Vec::new();
        if let Some(g) = &filter.graph {
            args.push(g.clone());
            sql += &format!(" AND graph = ?{}", args.len());
        }
        if let Some(t) = &filter.tenant {
            args.push(t.clone());
            sql += &format!(" AND tenant = ?{}", args.len());
        }
        if let Some(s) = filter.state {
            args.push(s.as_str().to_string());
            sql += &format!(" AND state = ?{}", args.len());
        }
        if let Some(b) = filter.before {
            args.push(b.to_string());
            sql += &format!(" AND id < ?{}", args.len());
        }
        for (k, v) in &filter.labels {
            args.push(format!("$.\"{}\"", k.replace('"', "")));
            args.push(v.clone());
            sql += &format!(
                " AND json_extract(labels, ?{}) = ?{}",
                args.len() - 1,
                args.len()
            );
        }
        sql += " ORDER BY id DESC";
        if filter.limit > 0 {
            sql += &format!(" LIMIT {}", filter.limit);
        }
        let ids: Vec<String> = {
            let conn = self.read();
            let mut stmt = conn.prepare(&sql).map_err(err)?;
            stmt.query_map(rusqlite::params_from_iter(args.iter()), |r| r.get(0))
                .map_err(err)?
                .collect::<Result<_, _>>()
                .map_err(err)?
        };
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            let id: JobId = id.parse().map_err(err)?;
            // Memory holds the freshest state of a live job.
            if let Some(r) = self.get(id)? {
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
        let conn = self.read();
        let mut stmt = conn
            .prepare(
                "SELECT id FROM jobs WHERE callback_url IS NOT NULL AND callback IS NULL
                     AND state IN ('succeeded', 'failed', 'cancelled') ORDER BY id LIMIT ?1",
            )
            .map_err(err)?;
        let ids: Vec<String> = stmt
            .query_map(params![limit as i64], |r| r.get(0))
            .map_err(err)?
            .collect::<Result<_, _>>()
            .map_err(err)?;
        ids.into_iter().map(|id| id.parse().map_err(err)).collect()
    }

    fn credential_state(&self, name: &str) -> Result<Option<String>, StoreError> {
        self.read()
            .query_row(
                "SELECT sealed FROM credential_state WHERE name = ?1",
                params![name],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)
    }

    fn save_credential_state(&self, name: &str, sealed: String) {
        self.send(Op::CredentialState {
            name: name.to_string(),
            sealed,
        });
    }

    fn trigger_state(&self, key: &str) -> Result<Option<String>, StoreError> {
        self.read()
            .query_row(
                "SELECT state FROM trigger_state WHERE key = ?1",
                params![key],
                |r| r.get(0),
            )
            .optional()
            .map_err(err)
    }

    fn save_trigger_state(&self, key: &str, state: String) {
        self.send(Op::TriggerState {
            key: key.to_string(),
            state,
        });
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

fn writer_loop(
    conn: Connection,
    rx: mpsc::Receiver<Op>,
    retention: Duration,
    queued: &AtomicUsize,
) {
    let depth = metrics::gauge!(crate::metrics::STORE_QUEUE_DEPTH);
    let mut last_cleanup = Instant::now();
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        while batch.len() < 8192 {
            match rx.try_recv() {
                Ok(op) => batch.push(op),
                Err(_) => break,
            }
        }
        let result = write_batch(&conn, &batch).map_err(|e| e.to_string());
        let left = queued.fetch_sub(batch.len(), Ordering::Relaxed) - batch.len();
        depth.set(left as f64);
        match &result {
            Err(e) => tracing::error!(error = %e, ops = batch.len(), "store write failed"),
            Ok(failed) => {
                for (job, e) in failed {
                    tracing::error!(job_id = %job, error = %e, "a job's rows could not be written; the rest of its batch was");
                }
            }
        }
        for op in batch {
            match op {
                Op::Insert { ack, record, .. } => {
                    let outcome = match &result {
                        Err(e) => Err(e.clone()),
                        Ok(failed) => failed
                            .get(&record.id)
                            .map_or(Ok(Inserted::Stored), |e| Err(e.clone())),
                    };
                    let _ = ack.send(outcome);
                }
                Op::Flush(ack) => {
                    let _ = ack.send(());
                }
                Op::CredentialState { name, sealed } => {
                    let r = conn.execute(
                        "INSERT INTO credential_state (name, sealed, updated_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT(name) DO UPDATE SET sealed = excluded.sealed, updated_at = excluded.updated_at",
                        params![name, sealed, micros(crate::clock::now())],
                    );
                    if let Err(e) = r {
                        tracing::error!(credential = %name, error = %e, "a rotated refresh token could not be saved; a restart will use the configured one");
                    }
                }
                Op::TriggerState { key, state } => {
                    let r = conn.execute(
                        "INSERT INTO trigger_state (key, state, updated_at) VALUES (?1, ?2, ?3)
                         ON CONFLICT(key) DO UPDATE SET state = excluded.state, updated_at = excluded.updated_at",
                        params![key, state, micros(crate::clock::now())],
                    );
                    if let Err(e) = r {
                        tracing::error!(trigger = %key, error = %e, "a trigger's state could not be saved");
                    }
                }
                Op::Update { .. } | Op::Updates(_) => {}
            }
        }
        if last_cleanup.elapsed() > Duration::from_secs(600) {
            last_cleanup = Instant::now();
            let cutoff = micros(crate::clock::now() - retention);
            let r = conn.execute_batch(&format!(
                "BEGIN;
                 DELETE FROM events WHERE job_id IN (SELECT id FROM jobs WHERE finished_at < {cutoff});
                 DELETE FROM steps WHERE job_id IN (SELECT id FROM jobs WHERE finished_at < {cutoff});
                 DELETE FROM jobs WHERE finished_at < {cutoff};
                 COMMIT;"
            ));
            if let Err(e) = r {
                tracing::warn!(error = %e, "store clean-up failed");
            }
        }
    }
}

/// Write one batch in one transaction. Every event is written; the job and step rows are written
/// once per job, from its latest state in the batch (a fast job's whole life often lands in one
/// or two batches, so this saves most of the row rewrites).
///
/// One job's rows that cannot be written (a constraint, a value SQLite refuses) must not fail the
/// others committed with it: when the batch fails, it is written again with each job under a
/// savepoint of its own, and the jobs that still fail are returned with their errors.
fn write_batch(conn: &Connection, batch: &[Op]) -> rusqlite::Result<HashMap<JobId, String>> {
    let jobs = group_batch(batch);
    match write_jobs(conn, &jobs, false) {
        Ok(failed) => Ok(failed),
        Err(e) => {
            tracing::warn!(error = %e, "a store batch failed; writing its jobs one by one");
            write_jobs(conn, &jobs, true)
        }
    }
}

/// Write the grouped jobs in one transaction; with `isolate`, each under a savepoint, and a job
/// that fails is rolled back alone and returned.
fn write_jobs(
    conn: &Connection,
    jobs: &[(JobId, JobWrites<'_>)],
    isolate: bool,
) -> rusqlite::Result<HashMap<JobId, String>> {
    let mut tx = conn.unchecked_transaction()?;
    let mut failed = HashMap::new();
    for (id, writes) in jobs {
        if isolate {
            let sp = tx.savepoint()?;
            match write_job(&sp, writes) {
                Ok(()) => sp.commit()?,
                // Dropping the savepoint rolls it back.
                Err(e) => {
                    failed.insert(*id, e.to_string());
                }
            }
        } else {
            write_job(&tx, writes)?;
        }
    }
    tx.commit()?;
    Ok(failed)
}

fn write_job(
    tx: &Connection,
    (r, inserted, steps, events): &JobWrites<'_>,
) -> rusqlite::Result<()> {
    for e in events {
        write_event(tx, e)?;
    }
    if *inserted {
        if let Some(key) = &r.idempotency_key {
            // The store only accepts a key that no live job and no job finished within the
            // retention holds; a finished row that still has it is past the retention, waiting
            // for the clean-up. It gives the key up. (A live row never does: a conflict with one
            // fails this job alone, under its savepoint.)
            tx.prepare_cached(
                "UPDATE jobs SET idempotency_key = NULL
                 WHERE tenant = ?1 AND idempotency_key = ?2 AND id <> ?3
                   AND finished_at IS NOT NULL",
            )?
            .execute(params![r.tenant, key, r.id.to_string()])?;
        }
        tx.prepare_cached(
            "INSERT INTO jobs (id, graph, state, input, labels, tenant, idempotency_key, deadline_ms,
                 callback_url, created_at, updated_at, events)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        )?
        .execute(params![
            r.id.to_string(),
            &*r.graph,
            r.state.as_str(),
            r.input.to_string(),
            serde_json::to_string(&r.labels).unwrap_or_default(),
            r.tenant,
            r.idempotency_key,
            r.deadline.map(|d| d.as_millis() as i64),
            r.callback_url,
            micros(r.created_at),
            micros(r.updated_at),
            r.events as i64,
        ])?;
    }
    tx.prepare_cached(
        "UPDATE jobs SET state = ?2, output = ?3, error = ?4, started_at = ?5, finished_at = ?6,
             updated_at = ?7, prompt_tokens = ?8, completion_tokens = ?9, cost_usd = ?10,
             events = ?11, callback = ?12, budget = ?13
         WHERE id = ?1",
    )?
    .execute(params![
        r.id.to_string(),
        r.state.as_str(),
        json(&r.output),
        r.error,
        r.started_at.map(micros),
        r.finished_at.map(micros),
        micros(r.updated_at),
        r.usage.prompt_tokens as i64,
        r.usage.completion_tokens as i64,
        r.usage.cost_usd,
        r.events as i64,
        r.callback
            .as_ref()
            .and_then(|c| serde_json::to_string(c).ok()),
        r.budget.and_then(|b| serde_json::to_string(&b).ok()),
    ])?;
    for &i in steps {
        write_step(tx, r.id, i, &r.steps[i])?;
    }
    Ok(())
}

/// Bring a store written by an earlier version up to this one's tables: the columns added
/// since, each added where it is missing.
fn migrate(conn: &Connection) -> Result<(), StoreError> {
    for (table, column) in [
        ("steps", "approval"),
        ("jobs", "budget"),
        ("steps", "sub_steps"),
    ] {
        let present: i64 = conn
            .query_row(
                &format!("SELECT COUNT(*) FROM pragma_table_info('{table}') WHERE name = ?1"),
                params![column],
                |r| r.get(0),
            )
            .map_err(err)?;
        if present == 0 {
            conn.execute_batch(&format!("ALTER TABLE {table} ADD COLUMN {column} TEXT"))
                .map_err(err)?;
        }
    }
    Ok(())
}

fn write_step(tx: &Connection, job: JobId, i: usize, s: &StepRecord) -> rusqlite::Result<()> {
    // A journal that cannot be written fails the job's write (its batch is written again job by
    // job, and this one's failure is logged): an empty one would make its tool calls again.
    let journal = match s.sub_steps.is_empty() {
        true => None,
        false => Some(
            serde_json::to_string(&s.sub_steps)
                .map_err(|e| rusqlite::Error::ToSqlConversionFailure(Box::new(e)))?,
        ),
    };
    tx.prepare_cached(
        "INSERT INTO steps (job_id, idx, agent, state, attempts, output, error, started_at, finished_at,
             prompt_tokens, completion_tokens, cost_usd, approval, sub_steps)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
         ON CONFLICT (job_id, idx) DO UPDATE SET state = ?4, attempts = ?5, output = ?6, error = ?7,
             started_at = ?8, finished_at = ?9, prompt_tokens = ?10, completion_tokens = ?11, cost_usd = ?12,
             approval = ?13, sub_steps = ?14",
    )?
    .execute(params![
        job.to_string(),
        i as i64,
        &*s.agent,
        s.state.as_str(),
        s.attempts,
        json(&s.output),
        s.error,
        s.started_at.map(micros),
        s.finished_at.map(micros),
        s.usage.prompt_tokens as i64,
        s.usage.completion_tokens as i64,
        s.usage.cost_usd,
        s.approval
            .as_ref()
            .and_then(|a| serde_json::to_string(a).ok()),
        journal,
    ])?;
    Ok(())
}

fn write_event(tx: &Connection, e: &JobEvent) -> rusqlite::Result<()> {
    tx.prepare_cached("INSERT OR REPLACE INTO events (job_id, seq, body) VALUES (?1, ?2, ?3)")?
        .execute(params![
            e.job_id.to_string(),
            e.seq as i64,
            serde_json::to_string(e).unwrap_or_default()
        ])?;
    Ok(())
}

fn load_job(conn: &Connection, id: JobId) -> Result<Option<JobRecord>, StoreError> {
    let key = id.to_string();
    let row = conn
        .prepare_cached(
            "SELECT graph, state, input, output, error, labels, tenant, idempotency_key, deadline_ms, callback_url,
                 callback, created_at, started_at, finished_at, updated_at, prompt_tokens, completion_tokens,
                 cost_usd, events, budget
             FROM jobs WHERE id = ?1",
        )
        .map_err(err)?
        .query_row(params![key], |r| {
            let mut rec = JobRecord::new(
                id,
                r.get::<_, String>(0)?.into(),
                &[],
                Arc::new(serde_json::from_str(&r.get::<_, String>(2)?).unwrap_or(Value::Null)),
                from_micros(r.get(11)?),
            );
            rec.state = parse_state(&r.get::<_, String>(1)?);
            rec.output = parse_json(r.get(3)?);
            rec.error = r.get(4)?;
            rec.labels = serde_json::from_str(&r.get::<_, String>(5)?).unwrap_or_default();
            rec.tenant = r.get(6)?;
            rec.idempotency_key = r.get(7)?;
            rec.deadline = r.get::<_, Option<i64>>(8)?.map(|ms| Duration::from_millis(ms.max(0) as u64));
            rec.callback_url = r.get(9)?;
            rec.callback = r
                .get::<_, Option<String>>(10)?
                .and_then(|c| serde_json::from_str::<CallbackDelivery>(&c).ok())
                .map(Box::new);
            rec.started_at = r.get::<_, Option<i64>>(12)?.map(from_micros);
            rec.finished_at = r.get::<_, Option<i64>>(13)?.map(from_micros);
            rec.updated_at = from_micros(r.get(14)?);
            rec.usage.prompt_tokens = r.get::<_, i64>(15)? as u64;
            rec.usage.completion_tokens = r.get::<_, i64>(16)? as u64;
            rec.usage.cost_usd = r.get(17)?;
            rec.events = r.get::<_, i64>(18)? as u64;
            rec.budget = r
                .get::<_, Option<String>>(19)?
                .and_then(|b| serde_json::from_str(&b).ok());
            Ok(rec)
        })
        .optional()
        .map_err(err)?;
    let Some(mut rec) = row else { return Ok(None) };
    let mut stmt = conn
        .prepare_cached(
            "SELECT agent, state, attempts, output, error, started_at, finished_at, prompt_tokens,
                 completion_tokens, cost_usd, approval, sub_steps
             FROM steps WHERE job_id = ?1 ORDER BY idx",
        )
        .map_err(err)?;
    rec.steps = stmt
        .query_map(params![key], |r| {
            Ok(StepRecord {
                agent: r.get::<_, String>(0)?.into(),
                state: parse_step_state(&r.get::<_, String>(1)?),
                attempts: r.get(2)?,
                output: parse_json(r.get(3)?),
                error: r.get(4)?,
                started_at: r.get::<_, Option<i64>>(5)?.map(from_micros),
                finished_at: r.get::<_, Option<i64>>(6)?.map(from_micros),
                usage: cascade_agents::Usage {
                    prompt_tokens: r.get::<_, i64>(7)? as u64,
                    completion_tokens: r.get::<_, i64>(8)? as u64,
                    cost_usd: r.get(9)?,
                },
                approval: r
                    .get::<_, Option<String>>(10)?
                    .and_then(|a| serde_json::from_str(&a).ok())
                    .map(Box::new),
                // A journal that cannot be read is an error, not an empty journal (whose tool
                // calls would be made again).
                sub_steps: match r.get::<_, Option<String>>(11)? {
                    None => Vec::new(),
                    Some(text) => serde_json::from_str(&text).map_err(|e| {
                        rusqlite::Error::FromSqlConversionFailure(
                            11,
                            rusqlite::types::Type::Text,
                            Box::new(e),
                        )
                    })?,
                },
            })
        })
        .map_err(err)?
        .collect::<Result<_, _>>()
        .map_err(err)?;
    Ok(Some(rec))
}

fn load_events(conn: &Connection, id: JobId, after: u64) -> Result<Vec<JobEvent>, StoreError> {
    let mut stmt = conn
        .prepare_cached("SELECT body FROM events WHERE job_id = ?1 AND seq > ?2 ORDER BY seq")
        .map_err(err)?;
    let bodies: Vec<String> = stmt
        .query_map(params![id.to_string(), after as i64], |r| r.get(0))
        .map_err(err)?
        .collect::<Result<_, _>>()
        .map_err(err)?;
    bodies
        .into_iter()
        .map(|b| serde_json::from_str(&b).map_err(err))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::{EventKind, JobState, StepState};
    use serde_json::json;

    fn new_job(key: Option<&str>, input: Value) -> NewJob {
        NewJob {
            id: JobId::new(),
            graph: "g".into(),
            agents: vec!["a".into(), "b".into()].into(),
            input: Arc::new(input),
            labels: [("team".to_string(), "blue".to_string())].into(),
            idempotency_key: key.map(String::from),
            tenant: "t".into(),
            max_pending: 100,
            tenant_max_pending: None,
            deadline: Some(Duration::from_secs(30)),
            callback_url: None,
            budget: None,
        }
    }

    /// A row that cannot be written (here: its id is already on disk, written by a process this
    /// one knows nothing of) fails its own submission only; the jobs committed in the same
    /// batch are stored.
    #[tokio::test]
    async fn one_bad_row_fails_only_its_own_job() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cascade.db");
        let mut o = SqliteOptions::new(&path);
        o.fsync = false;
        let s = SqliteStore::open(o).unwrap();
        let jobs: Vec<NewJob> = (0..32)
            .map(|i| new_job(Some(&format!("fresh-{i}")), json!({ "i": i })))
            .collect();
        let other = Connection::open(&path).unwrap();
        other
            .execute(
                "INSERT INTO jobs (id, graph, state, input, labels, tenant, created_at, updated_at)
                 VALUES (?1, 'g', 'running', '{}', '{}', 't', 0, 0)",
                [jobs[16].id.to_string()],
            )
            .unwrap();
        let results = futures::future::join_all(jobs.into_iter().map(|j| s.submit(j))).await;
        let (ok, failed): (Vec<_>, Vec<_>) = results
            .into_iter()
            .enumerate()
            .partition(|(_, r)| r.is_ok());
        assert_eq!(failed.len(), 1, "{failed:?}");
        assert_eq!(failed[0].0, 16);
        assert!(
            failed[0]
                .1
                .as_ref()
                .unwrap_err()
                .to_string()
                .contains("UNIQUE")
        );
        s.flush().await.unwrap();
        let stored: i64 = other
            .query_row(
                "SELECT COUNT(*) FROM jobs WHERE idempotency_key LIKE 'fresh-%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(stored, 31);
        assert_eq!(ok.len(), 31);
    }

    #[tokio::test]
    async fn a_storm_of_repeats_is_one_record_and_the_log_is_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cascade.db");
        let mut o = SqliteOptions::new(&path);
        o.fsync = false;
        o.max_events_per_job = 16;
        let s = SqliteStore::open(o).unwrap();
        let id = s.submit(new_job(None, json!({}))).await.unwrap().id;
        s.claim_pending("g", 1).unwrap();
        s.update(id, JobUpdate::Started).unwrap();
        // A step refused 10,000 times starts again at the same attempt each time.
        for _ in 0..10_000 {
            s.update(
                id,
                JobUpdate::StepStarted {
                    step: 0,
                    attempt: 1,
                },
            )
            .unwrap();
        }
        // A step retried past the log's bound: distinct attempts are distinct events.
        for attempt in 1..=100 {
            s.update(
                id,
                JobUpdate::StepRetrying {
                    step: 1,
                    attempt,
                    delay: Duration::from_millis(1),
                    error: "transient".into(),
                },
            )
            .unwrap();
        }
        s.update(
            id,
            JobUpdate::Finished {
                state: JobState::Failed,
                output: None,
                error: Some("gave up".into()),
            },
        )
        .unwrap();
        s.flush().await.unwrap();
        let stored = load_events(&s.read(), id, 0).unwrap();
        assert!(stored.len() <= 17, "{} events stored", stored.len());
        let started = stored
            .iter()
            .find(|e| matches!(e.kind, EventKind::StepStarted { .. }))
            .unwrap();
        assert_eq!(started.count, 10_000);
        assert!(started.last_at.is_some_and(|l| l >= started.at));
        assert!(
            stored.last().unwrap().kind.is_final(),
            "the final event is kept"
        );
        let bytes: i64 = s
            .read()
            .query_row(
                "SELECT SUM(LENGTH(body)) FROM events WHERE job_id = ?1",
                params![id.to_string()],
                |r| r.get(0),
            )
            .unwrap();
        assert!(bytes < 8 * 1024, "{bytes} bytes of events");
        let record = s.get(id).unwrap().unwrap();
        assert!(record.events_dropped > 0);
    }

    #[tokio::test]
    async fn a_full_writer_refuses_submissions_and_loses_nothing_accepted() {
        let dir = tempfile::tempdir().unwrap();
        let mut o = SqliteOptions::new(dir.path().join("cascade.db"));
        o.queue_capacity = 4;
        let s = SqliteStore::open(o).unwrap();
        let accepted = s
            .submit(new_job(Some("first"), json!({})))
            .await
            .unwrap()
            .id;
        s.claim_pending("g", 1).unwrap();
        s.update(accepted, JobUpdate::Started).unwrap();
        // Updates of running jobs always go in (their number is bounded by the jobs in flight);
        // they fill the writer's queue past its capacity faster than fsync'd commits drain it.
        for attempt in 1..=2_000 {
            s.update(accepted, JobUpdate::StepStarted { step: 0, attempt })
                .unwrap();
        }
        let refused = s.submit(new_job(Some("second"), json!({}))).await;
        assert!(
            matches!(refused, Err(StoreError::Busy { queued }) if queued >= 4),
            "{refused:?}"
        );
        assert!(refused.unwrap_err().is_retryable());
        // Once the writer caught up, the same submission is taken; nothing accepted was lost.
        s.flush().await.unwrap();
        let second = s.submit(new_job(Some("second"), json!({}))).await.unwrap();
        assert!(!second.deduplicated);
        let first = s.get(accepted).unwrap().unwrap();
        assert_eq!(first.steps[0].attempts, 2_000);
    }

    #[tokio::test]
    async fn survives_reopen_with_steps_events_and_keys() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cascade.db");
        let (a, b);
        {
            let s = SqliteStore::open(SqliteOptions::new(&path)).unwrap();
            a = s
                .submit(new_job(Some("k1"), json!({"n": 1})))
                .await
                .unwrap()
                .id;
            b = s.submit(new_job(None, json!({"n": 2}))).await.unwrap().id;
            // a runs one step; b stays pending.
            assert_eq!(s.claim_pending("g", 1).unwrap()[0].id, a);
            s.update(a, JobUpdate::Started).unwrap();
            s.update(
                a,
                JobUpdate::StepStarted {
                    step: 0,
                    attempt: 1,
                },
            )
            .unwrap();
            s.update(
                a,
                JobUpdate::StepSucceeded {
                    step: 0,
                    attempt: 1,
                    output: Arc::new(json!({"ok": true})),
                    usage: Default::default(),
                },
            )
            .unwrap();
            s.flush().await.unwrap();
        }
        let s = SqliteStore::open(SqliteOptions::new(&path)).unwrap();
        let running = s.running("g").unwrap();
        assert_eq!(running.len(), 1);
        let r = &running[0];
        assert_eq!(r.id, a);
        assert_eq!(r.steps[0].state, StepState::Succeeded);
        assert_eq!(r.steps[0].output.as_deref(), Some(&json!({"ok": true})));
        assert_eq!(r.steps[1].state, StepState::Waiting);
        assert_eq!(r.deadline, Some(Duration::from_secs(30)));
        assert_eq!(r.labels.get("team").map(String::as_str), Some("blue"));
        assert_eq!(s.events(a, 0).unwrap().len(), 4);
        assert_eq!(
            s.claim_pending("g", 5).unwrap()[0].id,
            b,
            "pending jobs are pending again"
        );
        // The key survives too.
        let again = s
            .submit(new_job(Some("k1"), json!({"n": 1})))
            .await
            .unwrap();
        assert_eq!((again.id, again.deduplicated), (a, true));
        let conflict = s
            .submit(new_job(Some("k1"), json!({"n": 9})))
            .await
            .unwrap_err();
        assert!(matches!(conflict, StoreError::KeyConflict { .. }));
    }

    #[tokio::test]
    async fn finished_jobs_are_read_back_from_disk_and_listed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cascade.db");
        let s = SqliteStore::open(SqliteOptions::new(&path)).unwrap();
        let id = s.submit(new_job(Some("done"), json!(1))).await.unwrap().id;
        s.claim_pending("g", 1).unwrap();
        s.update(id, JobUpdate::Started).unwrap();
        s.update(
            id,
            JobUpdate::Finished {
                state: JobState::Succeeded,
                output: Some(Arc::new(json!({"b": 2}))),
                error: None,
            },
        )
        .unwrap();
        s.flush().await.unwrap();
        drop(s);
        let s = SqliteStore::open(SqliteOptions::new(&path)).unwrap();
        let r = s.get(id).unwrap().unwrap();
        assert_eq!(r.state, JobState::Succeeded);
        assert_eq!(r.output.as_deref(), Some(&json!({"b": 2})));
        assert_eq!(r.steps[1].state, StepState::Cancelled);
        assert!(s.running("g").unwrap().is_empty());
        let listed = s
            .list(&JobFilter {
                graph: Some("g".into()),
                state: Some(JobState::Succeeded),
                labels: [("team".to_string(), "blue".to_string())].into(),
                limit: 10,
                ..Default::default()
            })
            .unwrap();
        assert_eq!(listed.len(), 1);
        let none = s
            .list(&JobFilter {
                labels: [("team".to_string(), "red".to_string())].into(),
                ..Default::default()
            })
            .unwrap();
        assert!(none.is_empty());
        assert!(s.events(id, 0).unwrap().last().unwrap().kind.is_final());
    }
}
