//! The in-memory store: everything in one mutex-guarded map. Finished jobs are kept up to a
//! retention count, oldest evicted first, so a long `cascade run` does not grow without bound.
//!
//! A live job (pending, running, awaiting approval) is held as values the scheduler updates in
//! place. A finished job changes no more (but for its callback's outcome), and is read rarely: it
//! is frozen, its record and events kept as one LZ4-compressed MessagePack document, with only what
//! listing filters on (graph, state, labels) beside it. A finished 5-step job then costs well under
//! 2 KB instead of the ~14 KB of its values; reading it back costs a decompression and a parse.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use serde_json::Value;

use super::{JobFilter, JobStore, NewJob, StoreError, StoreFuture, Submitted};
use crate::job::{ApprovalView, EventKind, JobEvent, JobId, JobRecord, JobState, JobUpdate};

const DEFAULT_RETAIN_FINISHED: usize = 100_000;

/// Events kept per job by default (`[server] max_events_per_job`).
pub const DEFAULT_MAX_EVENTS_PER_JOB: usize = 256;

pub struct MemoryStore {
    inner: Arc<Mutex<Inner>>,
    retain_finished: usize,
    max_events: usize,
    /// How long an idempotency key holds (none: as long as its job is held).
    key_ttl: Option<Duration>,
    freezer: Freezer,
}

/// Finished jobs go to the freezer thread this many at a time: one wake-up and one turn of the
/// store's lock per batch rather than per job (a futex wake per job was a tenth of the
/// scheduler's time). Until a batch fills, its jobs stay live: at most `FREEZE_BATCH - 1`.
const FREEZE_BATCH: usize = 32;

/// Batches waiting for the freezer thread at most (4,096 jobs); past that, a batch is frozen
/// where it filled (the scheduler's thread), so the queue bounds memory.
const FREEZE_QUEUE_BATCHES: usize = 128;

/// Finished jobs handed to the freezer together.
type FreezeBatch = Vec<(JobId, Arc<Live>)>;

/// Freezes finished jobs on a thread of its own, so that encoding, compressing and freeing a
/// job's values is off the scheduler's path. A job waiting to be frozen stays live and readable;
/// it is frozen only if nothing changed it since (its shared body is still the one sent).
struct Freezer {
    tx: std::sync::mpsc::SyncSender<FreezeBatch>,
    /// Jobs a batch takes before it is sent.
    batch: usize,
    /// Jobs sent and not yet frozen (the `cascade_store_freeze_queue_depth` gauge).
    depth: Arc<std::sync::atomic::AtomicUsize>,
}

type FreezeQueue = std::sync::mpsc::Receiver<FreezeBatch>;

impl Freezer {
    /// A freezer that sends `batch` jobs at a time through a queue of `capacity` batches, and
    /// the queue's receiving end.
    fn new(batch: usize, capacity: usize) -> (Self, FreezeQueue) {
        let (tx, rx) = std::sync::mpsc::sync_channel(capacity);
        let depth = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        (Self { tx, batch, depth }, rx)
    }

    fn start(inner: std::sync::Weak<Mutex<Inner>>) -> Self {
        use std::sync::atomic::Ordering::Relaxed;
        let (freezer, rx) = Self::new(FREEZE_BATCH, FREEZE_QUEUE_BATCHES);
        let left = freezer.depth.clone();
        let gauge = metrics::gauge!(crate::metrics::STORE_FREEZE_QUEUE_DEPTH);
        let spawned = std::thread::Builder::new()
            .name("cascade-freezer".into())
            .spawn(move || {
                let mut buf = Vec::new();
                // Ends when the store (and so the sender) is dropped.
                while let Ok(batch) = rx.recv() {
                    if let Some(inner) = inner.upgrade() {
                        freeze_sent(&inner, &batch, &mut buf);
                    }
                    let n = batch.len();
                    // The jobs' values are freed here, after the lock, off the scheduler.
                    drop(batch);
                    gauge.set(left.fetch_sub(n, Relaxed).saturating_sub(n) as f64);
                }
            });
        if let Err(e) = spawned {
            // Every job is then frozen where it finishes: slower, never wrong.
            tracing::warn!(error = %e, "could not start the store's freezer thread; finished jobs are frozen inline");
        }
        freezer
    }

    /// Hand a batch to the thread; it comes back when the queue is full (or the thread is gone).
    fn send(&self, batch: FreezeBatch) -> Result<(), FreezeBatch> {
        use std::sync::atomic::Ordering::Relaxed;
        let n = batch.len();
        self.depth.fetch_add(n, Relaxed);
        self.tx.try_send(batch).map_err(|e| {
            self.depth.fetch_sub(n, Relaxed);
            match e {
                std::sync::mpsc::TrySendError::Full(b)
                | std::sync::mpsc::TrySendError::Disconnected(b) => b,
            }
        })
    }
}

/// A graph's jobs with approvals waiting: the earliest expiry and how many wait, by job.
type AwaitingJobs = BTreeMap<JobId, (Option<SystemTime>, usize)>;

/// Whether a job in `state` counts against its tenant's `max_pending_jobs`: queued or running,
/// not parked for a decision or a budget (which may last days and costs nothing meanwhile).
fn counts_live(state: JobState) -> bool {
    !state.is_terminal() && !state.is_parked()
}

/// Job `id` is held no more (released, or forgotten).
fn unhold(inner: &mut Inner, id: JobId) {
    if let Some(graph) = inner.held.remove(&id)
        && let Some(n) = inner.held_by_graph.get_mut(&graph)
    {
        *n -= 1;
        if *n == 0 {
            inner.held_by_graph.remove(&graph);
        }
    }
}

fn count_live(map: &mut foldhash::HashMap<Arc<str>, usize>, tenant: &Arc<str>, by: isize) {
    if by > 0 {
        *map.entry(tenant.clone()).or_insert(0) += by as usize;
    } else if let Some(n) = map.get_mut(tenant) {
        *n = n.saturating_sub(by.unsigned_abs());
        if *n == 0 {
            map.remove(tenant);
        }
    }
}

/// The maps use foldhash, which is faster than SipHash: SipHash's resistance to chosen keys is not
/// needed for ids the server generated and graph names it loaded.
#[derive(Default)]
struct Inner {
    jobs: foldhash::HashMap<JobId, Entry>,
    /// Triggers' state (a schedule's last slot, an operator's pause), by `graph/trigger`: one
    /// entry per configured trigger.
    trigger_state: foldhash::HashMap<String, String>,
    pending: foldhash::HashMap<Arc<str>, VecDeque<JobId>>,
    /// Jobs accepted but held out of `pending` until their durable insert answers (see
    /// `submit_held`), and how many per graph: they count against `max_pending` as queued ones.
    held: foldhash::HashMap<JobId, Arc<str>>,
    held_by_graph: foldhash::HashMap<Arc<str>, usize>,
    /// Jobs queued or running (not parked, not ended), by tenant: `[tenants.NAME]
    /// max_pending_jobs`. A tenant leaves the map with its last such job.
    live_by_tenant: foldhash::HashMap<Arc<str>, usize>,
    /// (tenant, key) → the job that holds it and when that job finished (none while it runs:
    /// a live job's key never expires).
    keys: HashMap<(String, String), (JobId, Option<SystemTime>)>,
    finished: VecDeque<JobId>,
    /// Jobs with an approval waiting for a decision, per graph, with the earliest expiry and
    /// the number of their approvals waiting.
    awaiting: foldhash::HashMap<Arc<str>, AwaitingJobs>,
    /// Scratch space for freezing a job.
    freeze_buf: Vec<u8>,
    /// Finished jobs for the freezer's next batch.
    to_freeze: FreezeBatch,
}

struct Entry {
    graph: Arc<str>,
    /// Its tenant, for listing a tenant's jobs without thawing the others.
    tenant: Arc<str>,
    state: JobState,
    labels: BTreeMap<String, String>,
    /// (tenant, idempotency key), to forget the key with the job.
    key: Option<Box<(String, String)>>,
    /// It is in [`Inner::awaiting`].
    awaiting: bool,
    body: Body,
}

enum Body {
    /// Not claimed yet: what it was submitted with. Its steps and first event are made when it is
    /// claimed, changed or read, so that a backlog of pending jobs holds only this.
    Pending(Box<PendingJob>),
    /// Shared only with the freezer thread, while it freezes the job.
    Live(Arc<Live>),
    /// LZ4-compressed MessagePack of the job's [`Frozen`] form.
    Frozen(Box<[u8]>),
}

#[derive(Clone)]
struct Live {
    record: JobRecord,
    events: Vec<JobEvent>,
}

struct PendingJob {
    id: JobId,
    agents: Arc<[Arc<str>]>,
    input: Arc<Value>,
    /// Its idempotency key is the entry's (`Entry::key`).
    tenant: String,
    created_at: SystemTime,
    deadline: Option<Duration>,
    callback_url: Option<String>,
    budget: Option<crate::job::Budget>,
}

impl PendingJob {
    /// Its record, with the entry's graph, labels and key.
    fn record(
        &self,
        graph: &Arc<str>,
        labels: &BTreeMap<String, String>,
        key: Option<&(String, String)>,
    ) -> JobRecord {
        let mut record = JobRecord::new(
            self.id,
            graph.clone(),
            &self.agents,
            self.input.clone(),
            self.created_at,
        );
        record.labels = labels.clone();
        record.idempotency_key = key.map(|(_, k)| k.clone());
        record.deadline = self.deadline;
        record.callback_url = self.callback_url.clone();
        record.budget = self.budget;
        record.tenant = self.tenant.clone();
        record.events = 1;
        record
    }

    /// Its only event so far.
    fn submitted(&self) -> JobEvent {
        JobEvent {
            job_id: self.id,
            seq: 1,
            at: self.created_at,
            count: 1,
            last_at: None,
            kind: EventKind::Submitted,
        }
    }
}

/// A frozen job as read back.
struct Frozen {
    record: JobRecord,
    events: Vec<JobEvent>,
}

/// An event as a frozen job keeps it: by position, without the job id (the record has it), and
/// without [`JobEvent`]'s flattened kind (serde's `flatten` writes a map through a buffering
/// serialiser): a job's events took 4.0% of the engine bench's samples that way, 2.4% packed.
type PackedEvent = (u64, SystemTime, u32, Option<SystemTime>, EventKind);

struct PackedEvents<'a>(&'a [JobEvent]);

impl serde::Serialize for PackedEvents<'_> {
    fn serialize<S: serde::Serializer>(&self, ser: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeSeq;
        let mut seq = ser.serialize_seq(Some(self.0.len()))?;
        for e in self.0 {
            seq.serialize_element(&(e.seq, e.at, e.count, e.last_at, &e.kind))?;
        }
        seq.end()
    }
}

impl Live {
    /// Log `e`: a repeat replaces the event it folds into; a new event is kept while the job has
    /// fewer than `max` (its final event and its callback's outcome always). Returns whether it
    /// was kept, so that a durable store writes exactly what is kept here.
    fn log(&mut self, e: &JobEvent, max: usize) -> bool {
        if e.count > 1 {
            // A fold: it replaces the event it repeats, if that one was kept. Only folds look
            // back through the log; a new event (every step's path) does not.
            return match self.events.iter().rposition(|x| x.seq == e.seq) {
                Some(pos) => {
                    self.events[pos] = e.clone();
                    true
                }
                None => false,
            };
        }
        let always = e.kind.is_final() || matches!(e.kind, EventKind::CallbackDelivered { .. });
        if self.events.len() >= max && !always {
            self.record.events_dropped += 1;
            return false;
        }
        self.events.push(e.clone());
        true
    }
}

impl Entry {
    fn pending(
        job: PendingJob,
        graph: Arc<str>,
        labels: BTreeMap<String, String>,
        key: Option<(String, String)>,
    ) -> Self {
        Self {
            graph,
            tenant: job.tenant.as_str().into(),
            state: JobState::Pending,
            labels,
            key: key.map(Box::new),
            awaiting: false,
            body: Body::Pending(Box::new(job)),
        }
    }

    fn new(record: JobRecord, events: Vec<JobEvent>, key: Option<(String, String)>) -> Self {
        Self {
            graph: record.graph.clone(),
            tenant: record.tenant.as_str().into(),
            state: record.state,
            labels: record.labels.clone(),
            key: key.map(Box::new),
            awaiting: false,
            body: Body::Live(Arc::new(Live { record, events })),
        }
    }

    /// The job as values to change, thawed first if it was frozen.
    fn live(&mut self) -> &mut Live {
        match &self.body {
            Body::Frozen(bytes) => {
                let f = thaw(bytes);
                self.body = Body::Live(Arc::new(Live {
                    record: f.record,
                    events: f.events,
                }));
            }
            Body::Pending(p) => {
                // Room for what a job in flight logs first (submitted, started, its first step
                // started); its whole log reserved up front was a fifth of what a job in flight
                // holds.
                let mut events = Vec::with_capacity(3);
                events.push(p.submitted());
                self.body = Body::Live(Arc::new(Live {
                    record: p.record(&self.graph, &self.labels, self.key.as_deref()),
                    events,
                }));
            }
            Body::Live(_) => {}
        }
        match &mut self.body {
            // A copy only while the freezer holds it too (a late change of a finished job).
            Body::Live(l) => Arc::make_mut(l),
            Body::Frozen(_) | Body::Pending(_) => unreachable!("made live above"),
        }
    }

    fn record(&self) -> JobRecord {
        match &self.body {
            Body::Pending(p) => p.record(&self.graph, &self.labels, self.key.as_deref()),
            Body::Live(l) => l.record.clone(),
            Body::Frozen(bytes) => thaw(bytes).record,
        }
    }

    /// The job's input (without thawing or building its record where that can be avoided).
    fn same_input(&self, input: &Value) -> bool {
        match &self.body {
            Body::Pending(p) => *p.input == *input,
            Body::Live(l) => *l.record.input == *input,
            Body::Frozen(bytes) => *thaw(bytes).record.input == *input,
        }
    }

    fn events_after(&self, after_seq: u64) -> Vec<JobEvent> {
        let keep = |ev: &JobEvent| ev.seq > after_seq;
        match &self.body {
            Body::Pending(p) => Some(p.submitted()).into_iter().filter(keep).collect(),
            Body::Live(l) => l.events.iter().filter(|e| keep(e)).cloned().collect(),
            Body::Frozen(bytes) => thaw(bytes).events.into_iter().filter(keep).collect(),
        }
    }

    /// Keep the state that filters read in step with the record.
    fn sync(&mut self) {
        if let Body::Live(l) = &self.body {
            self.state = l.record.state;
        }
    }

    /// Compress a finished job, encoding it in `buf` (reused, so that no job grows a buffer of its
    /// own by copies). A job that cannot be serialised (it always can) stays live.
    fn freeze(&mut self, buf: &mut Vec<u8>) {
        let Body::Live(l) = &self.body else {
            return;
        };
        if let Some(bytes) = encode(l, buf) {
            self.state = l.record.state;
            self.body = Body::Frozen(bytes);
        }
    }

    fn matches(&self, id: JobId, filter: &JobFilter) -> bool {
        filter.graph.as_deref().is_none_or(|g| *self.graph == *g)
            && filter.state.is_none_or(|s| self.state == s)
            && filter
                .labels
                .iter()
                .all(|(k, v)| self.labels.get(k) == Some(v))
            && filter.before.is_none_or(|b| id < b)
            && filter.tenant.as_deref().is_none_or(|t| *self.tenant == *t)
    }
}

/// Freeze the jobs the freezer was sent, each unless it changed since (its body is no longer `live`).
fn freeze_sent(inner: &Mutex<Inner>, batch: &FreezeBatch, buf: &mut Vec<u8>) {
    let frozen: Vec<Option<Box<[u8]>>> = batch.iter().map(|(_, live)| encode(live, buf)).collect();
    let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
    for ((id, live), bytes) in batch.iter().zip(frozen) {
        if let Some(bytes) = bytes
            && let Some(e) = g.jobs.get_mut(id)
            && let Body::Live(l) = &e.body
            && Arc::ptr_eq(l, live)
        {
            e.body = Body::Frozen(bytes);
        }
    }
}

/// A job's frozen form, encoded in `buf` (reused, so that no job grows a buffer of its own by
/// copies); `None` if it cannot be serialised (it always can), and the job stays live.
fn encode(l: &Live, buf: &mut Vec<u8>) -> Option<Box<[u8]>> {
    let f = (&l.record, PackedEvents(&l.events));
    buf.clear();
    // MessagePack, structs by position: about 30% cheaper than JSON here in the engine bench's
    // profile (no escaping, no field names, binary numbers and times). It is read back only by
    // this process, so no field is ever skipped when written (see `JobRecord::events_dropped`);
    // the events' kinds stay tagged maps, which MessagePack describes itself.
    match rmp_serde::encode::write(buf, &f) {
        Ok(()) => Some(lz4_flex::compress_prepend_size(buf).into_boxed_slice()),
        Err(e) => {
            tracing::error!(job_id = %l.record.id, error = %e, "could not freeze a finished job; it stays uncompressed");
            None
        }
    }
}

/// A frozen job back as values. Its bytes were written by [`Entry::freeze`] in this process.
fn thaw(bytes: &[u8]) -> Frozen {
    let packed = lz4_flex::decompress_size_prepended(bytes).expect("a frozen job decompresses");
    let (record, events): (JobRecord, Vec<PackedEvent>) =
        rmp_serde::from_slice(&packed).expect("a frozen job parses");
    let events = events
        .into_iter()
        .map(|(seq, at, count, last_at, kind)| JobEvent {
            job_id: record.id,
            seq,
            at,
            count,
            last_at,
            kind,
        })
        .collect();
    Frozen { record, events }
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl MemoryStore {
    pub fn new() -> Self {
        Self::with_retention(DEFAULT_RETAIN_FINISHED)
    }

    /// Keep at most `retain_finished` finished jobs.
    pub fn with_retention(retain_finished: usize) -> Self {
        let inner = Arc::new(Mutex::new(Inner::default()));
        Self {
            freezer: Freezer::start(Arc::downgrade(&inner)),
            inner,
            retain_finished,
            max_events: DEFAULT_MAX_EVENTS_PER_JOB,
            key_ttl: None,
        }
    }

    /// Idempotency keys whose job finished more than `ttl` ago are free to reuse (a new
    /// submission with one starts a new job), whether or not their job is still held.
    pub fn with_key_ttl(mut self, ttl: Duration) -> Self {
        self.key_ttl = Some(ttl);
        self
    }

    /// Whether a key whose job finished at `finished` (none: still running) still holds.
    fn key_live(&self, finished: Option<SystemTime>) -> bool {
        match (self.key_ttl, finished) {
            (Some(ttl), Some(at)) => {
                crate::clock::now().duration_since(at).unwrap_or_default() < ttl
            }
            _ => true,
        }
    }

    /// Keep at most `max` events per job (at least 8; its final event always).
    pub fn with_max_events_per_job(mut self, max: usize) -> Self {
        self.max_events = max.max(8);
        self
    }

    /// Wait until the freezer thread has frozen every job handed to it.
    #[cfg(test)]
    fn settle(&self) {
        let batch = std::mem::take(&mut self.lock().to_freeze);
        if !batch.is_empty() {
            assert!(
                self.freezer.send(batch).is_ok(),
                "the freezer's queue is full"
            );
        }
        let start = std::time::Instant::now();
        while self
            .freezer
            .depth
            .load(std::sync::atomic::Ordering::Relaxed)
            > 0
        {
            assert!(
                start.elapsed() < std::time::Duration::from_secs(10),
                "the freezer is stuck"
            );
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave a record half-updated (updates are applied
        // by one function before anything else runs), so a poisoned lock is still usable.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accept a job; when it is new, also return its record and first event (for persistence).
    pub(crate) fn submit_now(
        &self,
        job: NewJob,
    ) -> Result<(Submitted, Option<(JobRecord, JobEvent)>), StoreError> {
        self.submit_with(job, true, true)
    }

    /// [`submit_now`](Self::submit_now), but the new job is not claimable until
    /// [`release_held`](Self::release_held): it waits for its durable insert, which may find
    /// its idempotency key taken by another node (it must not run meanwhile: its calls would
    /// carry keys of a job that is not the one the key names).
    pub(crate) fn submit_held(
        &self,
        job: NewJob,
    ) -> Result<(Submitted, Option<(JobRecord, JobEvent)>), StoreError> {
        self.submit_with(job, true, false)
    }

    /// Make a held job claimable (its insert is confirmed), unless it ended meanwhile.
    pub(crate) fn release_held(&self, id: JobId) {
        let mut inner = self.lock();
        unhold(&mut inner, id);
        let Some(graph) = inner
            .jobs
            .get(&id)
            .filter(|e| e.state == JobState::Pending)
            .map(|e| e.graph.clone())
        else {
            return;
        };
        inner.pending.entry(graph).or_default().push_back(id);
    }

    /// Accept a job; with `created`, also return its record and first event when it is new;
    /// with `claimable`, put it in its graph's pending queue.
    fn submit_with(
        &self,
        job: NewJob,
        created: bool,
        claimable: bool,
    ) -> Result<(Submitted, Option<(JobRecord, JobEvent)>), StoreError> {
        let mut inner = self.lock();
        if let Some(key) = &job.idempotency_key {
            let k = (job.tenant.clone(), key.clone());
            if let Some(&(existing, at)) = inner.keys.get(&k)
                && self.key_live(at)
            {
                // Keys leave with their jobs; a key found without one has no input to compare.
                let same_input = inner
                    .jobs
                    .get(&existing)
                    .is_none_or(|e| e.same_input(&job.input));
                return Ok((Submitted::known_key(key, existing, same_input)?, None));
            }
        }
        let pending = inner.pending.get(&job.graph).map_or(0, VecDeque::len)
            + inner.held_by_graph.get(&job.graph).copied().unwrap_or(0);
        if pending >= job.max_pending {
            return Err(StoreError::Full {
                graph: job.graph.clone(),
                pending,
            });
        }
        if let Some(max) = job.tenant_max_pending {
            let live = inner
                .live_by_tenant
                .get(job.tenant.as_str())
                .copied()
                .unwrap_or(0);
            if live >= max {
                return Err(StoreError::TenantFull {
                    tenant: job.tenant.as_str().into(),
                    pending: live,
                });
            }
        }
        let key = job
            .idempotency_key
            .as_ref()
            .map(|k| (job.tenant.clone(), k.clone()));
        if let Some(k) = &key {
            // An expired holder keeps its job, not the key.
            inner.keys.insert(k.clone(), (job.id, None));
        }
        if claimable {
            inner
                .pending
                .entry(job.graph.clone())
                .or_default()
                .push_back(job.id);
        } else {
            inner.held.insert(job.id, job.graph.clone());
            *inner.held_by_graph.entry(job.graph.clone()).or_insert(0) += 1;
        }
        let pending = PendingJob {
            id: job.id,
            agents: job.agents,
            input: job.input,
            tenant: job.tenant,
            created_at: crate::clock::now(),
            deadline: job.deadline,
            callback_url: job.callback_url,
            budget: job.budget,
        };
        let created = created.then(|| {
            let record = pending.record(&job.graph, &job.labels, key.as_ref());
            (record, pending.submitted())
        });
        let entry = Entry::pending(pending, job.graph, job.labels, key);
        count_live(&mut inner.live_by_tenant, &entry.tenant, 1);
        inner.jobs.insert(job.id, entry);
        Ok((
            Submitted {
                id: job.id,
                deduplicated: false,
            },
            created,
        ))
    }

    /// Apply an update; return its event and the record after it (for persistence).
    /// Apply `updates` to job `id` in one hold of the lock, and hand what changed (each event,
    /// whether it is kept in the log, and the record after it) to `send` before the lock goes:
    /// so a durable store queues the changes of one job in the order they were made, whichever
    /// threads make them (a tool loop records its journal beside its scheduler).
    pub(crate) fn update_snapshots(
        &self,
        id: JobId,
        updates: impl IntoIterator<Item = JobUpdate>,
        send: impl FnOnce(Vec<(JobEvent, bool, JobRecord)>),
    ) -> Result<Vec<Option<JobEvent>>, StoreError> {
        let mut inner = self.lock();
        let mut events = Vec::new();
        let mut changed = Vec::new();
        for update in updates {
            match Self::snapshot_locked(self, &mut inner, id, update)? {
                Some((event, kept, record)) => {
                    events.push(Some(event.clone()));
                    changed.push((event, kept, record));
                }
                None => events.push(None),
            }
        }
        if !changed.is_empty() {
            send(changed);
        }
        Ok(events)
    }

    fn snapshot_locked(
        &self,
        inner: &mut Inner,
        id: JobId,
        update: JobUpdate,
    ) -> Result<Option<(JobEvent, bool, JobRecord)>, StoreError> {
        let entry = inner.jobs.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        let was = entry.state;
        let live = entry.live();
        let Some(event) = live.record.apply(update, crate::clock::now()) else {
            entry.sync();
            return Ok(None);
        };
        let kept = live.log(&event, self.max_events);
        let record = live.record.clone();
        entry.sync();
        Self::track(inner, id, was);
        if event.kind.is_final() {
            self.finished(inner, id);
        } else if record.state.is_terminal()
            && let Some(entry) = inner.jobs.get_mut(&id)
        {
            // A late event of a finished job (its callback's outcome): frozen again.
            entry.freeze(&mut Vec::new());
        }
        Ok(Some((event, kept, record)))
    }

    /// Apply `updates` to a job in turn, under one lock; the events they made.
    fn apply_all<const N: usize>(
        &self,
        id: JobId,
        updates: [JobUpdate; N],
    ) -> Result<[Option<JobEvent>; N], StoreError> {
        let mut inner = self.lock();
        let entry = inner.jobs.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        let was = entry.state;
        let live = entry.live();
        let now = crate::clock::now();
        let events = updates.map(|u| {
            let event = live.record.apply(u, now);
            if let Some(e) = &event {
                live.log(e, self.max_events);
            }
            event
        });
        let terminal = live.record.state.is_terminal();
        entry.sync();
        Self::track(&mut inner, id, was);
        if events.iter().flatten().any(|e| e.kind.is_final()) {
            self.finished(&mut inner, id);
        } else if terminal && let Some(entry) = inner.jobs.get_mut(&id) {
            // A late event of a finished job (its callback's outcome): frozen again.
            entry.freeze(&mut Vec::new());
        }
        Ok(events)
    }

    /// Load a job recovered from durable storage.
    pub(crate) fn insert_recovered(&self, record: JobRecord, events: Vec<JobEvent>) {
        let mut inner = self.lock();
        let key = record
            .idempotency_key
            .clone()
            .map(|k| (record.tenant.clone(), k));
        if let Some(k) = &key {
            // A key ages from its job's end.
            inner
                .keys
                .insert(k.clone(), (record.id, record.finished_at));
        }
        let id = record.id;
        let terminal = record.state.is_terminal();
        if record.state == JobState::Pending {
            inner
                .pending
                .entry(record.graph.clone())
                .or_default()
                .push_back(record.id);
        }
        let parked = record.state.is_parked();
        let awaiting = record.awaits_decision().then(|| {
            (
                record.graph.clone(),
                (record.approval_expiry(), record.pending_approvals()),
            )
        });
        let mut entry = Entry::new(record, events, key);
        if counts_live(entry.state) {
            count_live(&mut inner.live_by_tenant, &entry.tenant, 1);
        }
        if terminal || parked {
            entry.freeze(&mut inner.freeze_buf);
        }
        if terminal {
            inner.finished.push_back(id);
        }
        if let Some((graph, expiry)) = awaiting {
            entry.awaiting = true;
            inner.awaiting.entry(graph).or_default().insert(id, expiry);
        }
        inner.jobs.insert(id, entry);
    }

    /// After a change to job `id` (whose state was `was`): keep the index of jobs awaiting a
    /// decision in step, queue a job made pending again (an approved parked job, ahead of the
    /// jobs submitted since: it is older), and freeze a job that was parked, for a decision or a
    /// budget (it holds no more than its compressed record while it waits, however long).
    fn track(inner: &mut Inner, id: JobId, was: JobState) {
        let Inner {
            jobs,
            awaiting,
            pending,
            freeze_buf,
            live_by_tenant,
            ..
        } = inner;
        let Some(entry) = jobs.get_mut(&id) else {
            return;
        };
        match (counts_live(was), counts_live(entry.state)) {
            (true, false) => count_live(live_by_tenant, &entry.tenant, -1),
            (false, true) => count_live(live_by_tenant, &entry.tenant, 1),
            _ => {}
        }
        let Body::Live(l) = &entry.body else {
            return;
        };
        let r = &l.record;
        let awaits = r.awaits_decision();
        if awaits || entry.awaiting {
            let index = awaiting.entry(entry.graph.clone()).or_default();
            if awaits {
                index.insert(id, (r.approval_expiry(), r.pending_approvals()));
            } else {
                index.remove(&id);
            }
            entry.awaiting = awaits;
        }
        if r.state == JobState::Pending && was != JobState::Pending {
            pending
                .entry(entry.graph.clone())
                .or_default()
                .push_front(id);
        }
        if r.state.is_parked() && !was.is_parked() {
            entry.freeze(freeze_buf);
        }
    }

    /// Approvals waiting for a decision, by approval id, of `graph` (or every graph), after
    /// approval id `after`; at most `limit`.
    pub(crate) fn pending_approvals_now(
        &self,
        graph: Option<&str>,
        after: Option<&str>,
        limit: usize,
        tenant: Option<&str>,
    ) -> Vec<ApprovalView> {
        let inner = self.lock();
        let from: Option<JobId> = after
            .and_then(|a| a.split('/').next())
            .and_then(|j| j.parse().ok());
        let mut ids: Vec<JobId> = inner
            .awaiting
            .iter()
            .filter(|(g, _)| graph.is_none_or(|want| &***g == want))
            .flat_map(|(_, jobs)| match from {
                Some(f) => jobs.range(f..).map(|(id, _)| *id).collect::<Vec<_>>(),
                None => jobs.keys().copied().collect(),
            })
            .collect();
        ids.sort_unstable();
        let mut out = Vec::new();
        for id in ids {
            let Some(e) = inner.jobs.get(&id) else {
                continue;
            };
            // Another tenant's job is passed over before it is thawed.
            if tenant.is_some_and(|t| *e.tenant != *t) {
                continue;
            }
            let record = e.record();
            // By approval id within the job too, as the page token compares them.
            let mut views: Vec<ApprovalView> = ApprovalView::of(&record).collect();
            views.sort_by(|a, b| a.approval.id.cmp(&b.approval.id));
            for v in views {
                if v.approval.is_pending() && after.is_none_or(|a| v.approval.id.as_str() > a) {
                    out.push(v);
                    if out.len() >= limit {
                        return out;
                    }
                }
            }
        }
        out
    }

    /// Jobs of `graph` with an approval nobody decided by its expiry, `now` or before.
    pub(crate) fn expired_approvals_now(&self, graph: &str, now: SystemTime) -> Vec<JobId> {
        self.lock()
            .awaiting
            .get(graph)
            .map(|jobs| {
                jobs.iter()
                    .filter(|(_, (at, _))| at.is_some_and(|at| at <= now))
                    .map(|(id, _)| *id)
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Approvals of `graph` waiting for a decision.
    pub(crate) fn pending_approval_count_now(&self, graph: &str) -> usize {
        self.lock()
            .awaiting
            .get(graph)
            .map_or(0, |jobs| jobs.values().map(|(_, n)| n).sum())
    }

    /// The jobs not finished yet (pending, running or parked), with their graphs.
    pub(crate) fn unfinished(&self) -> Vec<(Arc<str>, JobId)> {
        self.lock()
            .jobs
            .iter()
            .filter(|(_, e)| !e.state.is_terminal())
            .map(|(id, e)| (e.graph.clone(), *id))
            .collect()
    }

    /// Forget a job (its durable write failed).
    pub(crate) fn remove(&self, id: JobId) {
        let mut inner = self.lock();
        unhold(&mut inner, id);
        if let Some(e) = inner.jobs.remove(&id) {
            if let Some(k) = e.key {
                forget_key(&mut inner.keys, &k, id);
            }
            if let Some(q) = inner.pending.get_mut(&e.graph) {
                q.retain(|j| *j != id);
            }
            if counts_live(e.state) {
                count_live(&mut inner.live_by_tenant, &e.tenant, -1);
            }
        }
    }

    /// The job an idempotency key names, if this store holds it.
    pub(crate) fn find_key(&self, tenant: &str, key: &str) -> Option<JobId> {
        self.lock()
            .keys
            .get(&(tenant.to_string(), key.to_string()))
            .filter(|(_, at)| self.key_live(*at))
            .map(|(id, _)| *id)
    }

    fn finished(&self, inner: &mut Inner, id: JobId) {
        let Inner {
            jobs,
            freeze_buf,
            to_freeze,
            keys,
            ..
        } = inner;
        // From now on the job's key ages towards its expiry.
        if let Some(key) = jobs.get(&id).and_then(|e| e.key.as_deref())
            && let Some((holder, at)) = keys.get_mut(key)
            && *holder == id
        {
            *at = Some(crate::clock::now());
        }
        if let Some(e) = jobs.get_mut(&id)
            && let Body::Live(l) = &e.body
        {
            to_freeze.push((id, l.clone()));
            if to_freeze.len() >= self.freezer.batch
                && let Err(batch) = self.freezer.send(std::mem::take(to_freeze))
            {
                // The freezer is behind by a whole queue: freeze here.
                for (id, _) in batch {
                    if let Some(e) = jobs.get_mut(&id) {
                        e.freeze(freeze_buf);
                    }
                }
            }
        }
        inner.finished.push_back(id);
        while inner.finished.len() > self.retain_finished {
            if let Some(old) = inner.finished.pop_front()
                && let Some(e) = inner.jobs.remove(&old)
                && let Some(key) = e.key
            {
                forget_key(&mut inner.keys, &key, old);
            }
        }
    }
}

/// Forget `key` if `id` still holds it (a newer job may have taken an expired key over).
fn forget_key(
    keys: &mut HashMap<(String, String), (JobId, Option<SystemTime>)>,
    key: &(String, String),
    id: JobId,
) {
    if keys.get(key).is_some_and(|(holder, _)| *holder == id) {
        keys.remove(key);
    }
}

impl JobStore for MemoryStore {
    fn trigger_state(&self, key: &str) -> Result<Option<String>, StoreError> {
        Ok(self.lock().trigger_state.get(key).cloned())
    }

    fn save_trigger_state(&self, key: &str, state: String) {
        self.lock().trigger_state.insert(key.to_string(), state);
    }

    fn submit(&self, job: NewJob) -> StoreFuture<'_, Submitted> {
        // Nothing to persist: no copy of the record.
        let result = self.submit_with(job, false, true).map(|(s, _)| s);
        Box::pin(async move { result })
    }

    fn claim_pending(&self, graph: &str, limit: usize) -> Result<Vec<JobRecord>, StoreError> {
        let mut inner = self.lock();
        let Inner { jobs, pending, .. } = &mut *inner;
        let Some(queue) = pending.get_mut(graph) else {
            return Ok(Vec::new());
        };
        let mut out = Vec::with_capacity(limit.min(queue.len()));
        while out.len() < limit {
            let Some(id) = queue.pop_front() else { break };
            if let Some(e) = jobs.get_mut(&id)
                && e.state == JobState::Pending
            {
                let live = e.live();
                live.record.state = JobState::Running;
                out.push(live.record.clone());
                e.sync();
            }
        }
        Ok(out)
    }

    fn running(&self, graph: &str) -> Result<Vec<JobRecord>, StoreError> {
        let inner = self.lock();
        let mut out: Vec<JobRecord> = inner
            .jobs
            .values()
            .filter(|e| &*e.graph == graph && e.state == JobState::Running)
            .map(Entry::record)
            .collect();
        out.sort_by_key(|r| r.id);
        Ok(out)
    }

    fn update(&self, id: JobId, update: JobUpdate) -> Result<Option<JobEvent>, StoreError> {
        let [event] = self.apply_all(id, [update])?;
        Ok(event)
    }

    fn update_two(
        &self,
        id: JobId,
        first: JobUpdate,
        second: JobUpdate,
    ) -> Result<[Option<JobEvent>; 2], StoreError> {
        // One lock, one look-up and one reading of the clock for both.
        self.apply_all(id, [first, second])
    }

    fn cancel_pending(&self, id: JobId, reason: &str) -> Result<Option<JobEvent>, StoreError> {
        let mut inner = self.lock();
        let entry = inner.jobs.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        if entry.state != JobState::Pending {
            return Ok(None);
        }
        let live = entry.live();
        let event = live.record.apply(
            JobUpdate::Finished {
                state: JobState::Cancelled,
                output: None,
                error: Some(format!("cancelled: {reason}")),
            },
            crate::clock::now(),
        );
        if let Some(e) = &event {
            live.events.push(e.clone());
            entry.sync();
            let graph = entry.graph.clone();
            let tenant = entry.tenant.clone();
            if let Some(q) = inner.pending.get_mut(&graph) {
                q.retain(|j| *j != id);
            }
            count_live(&mut inner.live_by_tenant, &tenant, -1);
            self.finished(&mut inner, id);
        }
        Ok(event)
    }

    fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.lock().jobs.get(&id).map(Entry::record))
    }

    fn tenant_of(&self, id: JobId) -> Result<Option<Arc<str>>, StoreError> {
        Ok(self.lock().jobs.get(&id).map(|e| e.tenant.clone()))
    }

    fn events(&self, id: JobId, after_seq: u64) -> Result<Vec<JobEvent>, StoreError> {
        let inner = self.lock();
        let e = inner.jobs.get(&id).ok_or(StoreError::NotFound(id))?;
        Ok(e.events_after(after_seq))
    }

    fn list(&self, filter: &JobFilter) -> Result<Vec<JobRecord>, StoreError> {
        let inner = self.lock();
        // Newest first; only the page's records are thawed.
        let mut ids: Vec<JobId> = inner
            .jobs
            .iter()
            .filter(|(id, e)| e.matches(**id, filter))
            .map(|(id, _)| *id)
            .collect();
        ids.sort_unstable_by_key(|id| std::cmp::Reverse(*id));
        if filter.limit > 0 {
            ids.truncate(filter.limit);
        }
        Ok(ids.iter().map(|id| inner.jobs[id].record()).collect())
    }

    fn pending_count(&self, graph: &str) -> usize {
        let inner = self.lock();
        inner.pending.get(graph).map_or(0, VecDeque::len)
            + inner.held_by_graph.get(graph).copied().unwrap_or(0)
    }

    fn tenant_live_count(&self, tenant: &str) -> usize {
        self.lock().live_by_tenant.get(tenant).copied().unwrap_or(0)
    }

    fn pending_approvals(
        &self,
        graph: Option<&str>,
        after: Option<&str>,
        limit: usize,
        tenant: Option<&str>,
    ) -> Result<Vec<ApprovalView>, StoreError> {
        Ok(self.pending_approvals_now(graph, after, limit, tenant))
    }

    fn expired_approvals(&self, graph: &str, now: SystemTime) -> Vec<JobId> {
        self.expired_approvals_now(graph, now)
    }

    fn pending_approval_count(&self, graph: &str) -> usize {
        self.pending_approval_count_now(graph)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::StepState;
    use serde_json::json;

    fn new_job(graph: &str, key: Option<&str>, input: serde_json::Value) -> NewJob {
        NewJob {
            id: JobId::new(),
            graph: graph.into(),
            agents: vec!["a".into()].into(),
            input: Arc::new(input),
            labels: Default::default(),
            idempotency_key: key.map(String::from),
            tenant: String::new(),
            max_pending: 2,
            tenant_max_pending: None,
            deadline: None,
            callback_url: None,
            budget: None,
        }
    }

    #[tokio::test]
    async fn idempotent_submit_and_conflict() {
        let s = MemoryStore::new();
        let first = s.submit(new_job("g", Some("k"), json!(1))).await.unwrap();
        let again = s.submit(new_job("g", Some("k"), json!(1))).await.unwrap();
        assert_eq!((again.id, again.deduplicated), (first.id, true));
        let err = s
            .submit(new_job("g", Some("k"), json!(2)))
            .await
            .unwrap_err();
        assert_eq!(
            err,
            StoreError::KeyConflict {
                key: "k".into(),
                existing: first.id
            }
        );
    }

    /// Jobs held for their durable insert count against `max_pending` as queued ones, are not
    /// claimable until released, and leave the count when released or forgotten.
    #[tokio::test]
    async fn held_jobs_count_against_max_pending_until_released() {
        let s = MemoryStore::new();
        let a = s
            .submit_held(new_job("g", Some("a"), json!(1)))
            .unwrap()
            .0
            .id;
        let b = s
            .submit_held(new_job("g", Some("b"), json!(2)))
            .unwrap()
            .0
            .id;
        let err = s.submit(new_job("g", None, json!(3))).await.unwrap_err();
        assert!(
            matches!(err, StoreError::Full { pending: 2, .. }),
            "{err:?}"
        );
        assert_eq!(s.pending_count("g"), 2);
        assert!(
            s.claim_pending("g", 10).unwrap().is_empty(),
            "held: not claimable"
        );
        s.release_held(a);
        let claimed: Vec<JobId> = s
            .claim_pending("g", 10)
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(claimed, vec![a]);
        // The other's insert found its key taken elsewhere: forgotten, it leaves the count.
        s.remove(b);
        assert_eq!(s.pending_count("g"), 0);
        s.submit(new_job("g", None, json!(4))).await.unwrap();
    }

    #[tokio::test]
    async fn refuses_past_max_pending_and_claims_oldest_first() {
        let s = MemoryStore::new();
        let a = s.submit(new_job("g", None, json!(1))).await.unwrap().id;
        let b = s.submit(new_job("g", None, json!(2))).await.unwrap().id;
        let err = s.submit(new_job("g", None, json!(3))).await.unwrap_err();
        assert!(matches!(err, StoreError::Full { pending: 2, .. }));
        assert!(err.is_retryable());
        let claimed: Vec<JobId> = s
            .claim_pending("g", 1)
            .unwrap()
            .iter()
            .map(|r| r.id)
            .collect();
        assert_eq!(claimed, vec![a]);
        assert_eq!(s.pending_count("g"), 1);
        assert_eq!(s.running("g").unwrap()[0].id, a);
        // A cancelled pending job is never claimed.
        assert!(s.cancel_pending(b, "test").unwrap().is_some());
        assert!(s.claim_pending("g", 5).unwrap().is_empty());
        assert_eq!(s.get(b).unwrap().unwrap().state, JobState::Cancelled);
        assert!(
            s.cancel_pending(a, "test").unwrap().is_none(),
            "running jobs are not cancelled here"
        );
    }

    #[tokio::test]
    async fn evicts_oldest_finished_jobs_past_retention() {
        let s = MemoryStore::with_retention(1);
        let mut ids = Vec::new();
        for i in 0..3 {
            let mut j = new_job("g", None, json!(i));
            j.max_pending = 10;
            ids.push(s.submit(j).await.unwrap().id);
        }
        for id in &ids {
            s.cancel_pending(*id, "x").unwrap();
        }
        assert!(s.get(ids[0]).unwrap().is_none());
        assert!(s.get(ids[1]).unwrap().is_none());
        assert!(s.get(ids[2]).unwrap().is_some());
        assert_eq!(s.events(ids[2], 0).unwrap().len(), 2);
    }

    #[tokio::test]
    async fn an_expired_key_starts_a_new_job_and_stays_with_it() {
        let s = MemoryStore::with_retention(1).with_key_ttl(std::time::Duration::from_millis(50));
        let mut j = new_job("g", Some("k"), json!(1));
        j.max_pending = 10;
        let old = s.submit(j).await.unwrap().id;
        s.cancel_pending(old, "x").unwrap();
        let mut j = new_job("g", Some("k"), json!(1));
        j.max_pending = 10;
        let again = s.submit(j).await.unwrap();
        assert_eq!((again.id, again.deduplicated), (old, true));
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert_eq!(s.find_key("", "k"), None, "expired");
        let mut j = new_job("g", Some("k"), json!(2));
        j.max_pending = 10;
        let new = s.submit(j).await.unwrap();
        assert!(new.id != old && !new.deduplicated);
        // The old job leaving the store (retention 1) does not take the new job's key with it.
        s.cancel_pending(new.id, "x").unwrap();
        assert!(s.get(old).unwrap().is_none());
        let holder = s
            .lock()
            .keys
            .get(&(String::new(), "k".to_string()))
            .map(|(id, _)| *id);
        assert_eq!(holder, Some(new.id));
    }

    #[tokio::test]
    async fn a_pending_job_is_held_compact_and_reads_back_whole() {
        let s = MemoryStore::new();
        let mut j = new_job("g", Some("key-p"), json!({"ticket": 7}));
        j.agents = vec!["classify".into(), "draft".into()].into();
        j.labels.insert("team".into(), "ops".into());
        j.deadline = Some(std::time::Duration::from_secs(30));
        j.callback_url = Some("http://127.0.0.1:9/done".into());
        j.tenant = "acme".into();
        let id = s.submit(j).await.unwrap().id;
        assert!(matches!(s.lock().jobs[&id].body, Body::Pending(_)));
        // Read while pending: the whole record and its first event, built on demand.
        let r = s.get(id).unwrap().unwrap();
        assert_eq!(r.state, JobState::Pending);
        let agents: Vec<&str> = r.steps.iter().map(|st| &*st.agent).collect();
        assert_eq!(agents, ["classify", "draft"]);
        assert!(r.steps.iter().all(|st| st.state == StepState::Waiting));
        assert_eq!(r.labels.get("team").map(String::as_str), Some("ops"));
        assert_eq!(r.idempotency_key.as_deref(), Some("key-p"));
        assert_eq!(r.tenant, "acme");
        assert_eq!(r.deadline, Some(std::time::Duration::from_secs(30)));
        assert_eq!(r.callback_url.as_deref(), Some("http://127.0.0.1:9/done"));
        assert_eq!((r.events, r.created_at), (1, r.updated_at));
        let events = s.events(id, 0).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].kind, EventKind::Submitted);
        assert_eq!((events[0].seq, events[0].at), (1, r.created_at));
        assert!(s.events(id, 1).unwrap().is_empty());
        assert_eq!(s.list(&JobFilter::default()).unwrap()[0].id, id);
        // The same key with the same input finds it; with another input it is refused.
        let mut again = new_job("g", Some("key-p"), json!({"ticket": 7}));
        again.tenant = "acme".into();
        assert!(s.submit(again).await.unwrap().deduplicated);
        let mut other = new_job("g", Some("key-p"), json!({"ticket": 8}));
        other.tenant = "acme".into();
        assert!(s.submit(other).await.is_err());
        // Claimed, it is live, and its log goes on from the first event.
        let claimed = s.claim_pending("g", 1).unwrap();
        assert_eq!(claimed[0].steps.len(), 2);
        assert_eq!(claimed[0].state, JobState::Running);
        assert!(matches!(s.lock().jobs[&id].body, Body::Live(_)));
        let started = s.update(id, JobUpdate::Started).unwrap().unwrap();
        assert_eq!(started.seq, 2);
        assert_eq!(s.events(id, 0).unwrap().len(), 2);
    }

    /// Finish a one-step job of `s` (submitted, claimed, run) and return its id.
    async fn finish_one(s: &MemoryStore, n: u64) -> JobId {
        let id = s.submit(new_job("g", None, json!(n))).await.unwrap().id;
        s.claim_pending("g", 1).unwrap();
        s.update(id, JobUpdate::Started).unwrap();
        s.update(
            id,
            JobUpdate::Finished {
                state: JobState::Succeeded,
                output: Some(Arc::new(json!({"n": n}))),
                error: None,
            },
        )
        .unwrap();
        id
    }

    #[tokio::test]
    async fn the_freeze_queue_is_bounded_and_a_late_change_is_not_lost() {
        // A freezer whose thread does not run: the test takes its queue's jobs itself.
        let mut s = MemoryStore::new();
        let (freezer, queue) = Freezer::new(1, 4);
        s.freezer = freezer;
        // A job changed while it waits for the freezer is frozen with the change, not without.
        let id = finish_one(&s, 1).await;
        assert!(matches!(s.lock().jobs[&id].body, Body::Live(_)));
        s.update(
            id,
            JobUpdate::Callback(crate::job::CallbackDelivery {
                attempts: 2,
                delivered: true,
                ..Default::default()
            }),
        )
        .unwrap();
        let batch = queue.try_recv().unwrap();
        assert_eq!(batch.len(), 1);
        freeze_sent(&s.inner, &batch, &mut Vec::new());
        let r = s.get(id).unwrap().unwrap();
        assert_eq!(r.callback.map(|c| c.attempts), Some(2));
        assert_eq!(r.output.as_deref(), Some(&json!({"n": 1})));
        // Past the queue's capacity, jobs are frozen where they finish: nothing waits beyond it.
        let mut ids = Vec::new();
        for n in 0..10 {
            ids.push(finish_one(&s, n).await);
        }
        let queued: Vec<JobId> = queue.try_iter().flatten().map(|(id, _)| id).collect();
        assert_eq!(queued, ids[..4]);
        let inner = s.lock();
        assert!(
            ids[4..]
                .iter()
                .all(|id| matches!(inner.jobs[id].body, Body::Frozen(_)))
        );
        assert!(
            ids[..4]
                .iter()
                .all(|id| matches!(inner.jobs[id].body, Body::Live(_)))
        );
    }

    #[tokio::test]
    async fn two_updates_in_one_make_the_same_events_as_two() {
        let s = MemoryStore::new();
        let id = s.submit(new_job("g", None, json!(1))).await.unwrap().id;
        s.claim_pending("g", 1).unwrap();
        s.update(id, JobUpdate::Started).unwrap();
        let [started, succeeded] = s
            .update_two(
                id,
                JobUpdate::StepStarted {
                    step: 0,
                    attempt: 1,
                },
                JobUpdate::StepSucceeded {
                    step: 0,
                    attempt: 1,
                    output: Arc::new(json!({"ok": true})),
                    usage: Default::default(),
                },
            )
            .unwrap();
        let (started, succeeded) = (started.unwrap(), succeeded.unwrap());
        assert_eq!((started.seq, succeeded.seq), (3, 4));
        assert!(matches!(
            started.kind,
            EventKind::StepStarted { attempt: 1, .. }
        ));
        assert!(matches!(
            succeeded.kind,
            EventKind::StepSucceeded { attempt: 1, .. }
        ));
        let r = s.get(id).unwrap().unwrap();
        assert_eq!(r.steps[0].state, StepState::Succeeded);
        assert_eq!(r.steps[0].started_at, Some(started.at));
        assert_eq!(s.events(id, 2).unwrap().len(), 2);
        // The second finishes the job: it is handed on as finished, like a single update.
        let [_, last] = s
            .update_two(
                id,
                JobUpdate::StepStarted {
                    step: 0,
                    attempt: 2,
                },
                JobUpdate::Finished {
                    state: JobState::Succeeded,
                    output: None,
                    error: None,
                },
            )
            .unwrap();
        assert!(last.unwrap().kind.is_final());
        assert_eq!(s.lock().finished.back(), Some(&id));
    }

    #[tokio::test]
    async fn finished_jobs_reach_the_freezer_a_batch_at_a_time() {
        let mut s = MemoryStore::new();
        let (freezer, queue) = Freezer::new(3, 4);
        s.freezer = freezer;
        let a = finish_one(&s, 1).await;
        let b = finish_one(&s, 2).await;
        // Short of a batch: nothing sent, both live and readable.
        assert!(queue.try_recv().is_err());
        assert_eq!(s.get(a).unwrap().unwrap().state, JobState::Succeeded);
        let c = finish_one(&s, 3).await;
        let batch = queue.try_recv().unwrap();
        let ids: Vec<JobId> = batch.iter().map(|(id, _)| *id).collect();
        assert_eq!(ids, [a, b, c]);
        freeze_sent(&s.inner, &batch, &mut Vec::new());
        let inner = s.lock();
        assert!(
            [a, b, c]
                .iter()
                .all(|id| matches!(inner.jobs[id].body, Body::Frozen(_)))
        );
    }

    #[tokio::test]
    async fn a_finished_job_is_frozen_small_and_reads_back_the_same() {
        let s = MemoryStore::new();
        let mut j = new_job(
            "g",
            Some("key-1"),
            json!({"ticket": 42, "text": "printer on fire"}),
        );
        j.agents = vec!["classify".into(), "draft".into()].into();
        j.labels.insert("team".into(), "ops".into());
        let id = s.submit(j).await.unwrap().id;
        s.claim_pending("g", 1).unwrap();
        s.update(id, JobUpdate::Started).unwrap();
        for step in 0..2 {
            s.update(id, JobUpdate::StepStarted { step, attempt: 1 })
                .unwrap();
            s.update(
                id,
                JobUpdate::StepSucceeded {
                    step,
                    attempt: 1,
                    output: Arc::new(json!({"step": step, "text": "a reply ".repeat(10)})),
                    usage: Default::default(),
                },
            )
            .unwrap();
        }
        let before = s.get(id).unwrap().unwrap();
        let events_before = s.events(id, 0).unwrap();
        s.update(
            id,
            JobUpdate::Finished {
                state: JobState::Succeeded,
                output: Some(Arc::new(json!({"draft": {"ok": true}}))),
                error: None,
            },
        )
        .unwrap();
        s.settle();
        {
            let inner = s.lock();
            let Body::Frozen(bytes) = &inner.jobs[&id].body else {
                panic!("a finished job is frozen");
            };
            assert!(bytes.len() < 1024, "{} bytes", bytes.len());
        }
        let after = s.get(id).unwrap().unwrap();
        assert_eq!(after.state, JobState::Succeeded);
        assert_eq!(after.steps.len(), 2);
        assert_eq!(after.steps[1].output, before.steps[1].output);
        assert_eq!(after.input, before.input);
        assert_eq!(after.labels, before.labels);
        assert_eq!(after.created_at, before.created_at);
        let events = s.events(id, 0).unwrap();
        assert_eq!(events.len(), events_before.len() + 1);
        assert_eq!(
            serde_json::to_value(&events[..events_before.len()]).unwrap(),
            serde_json::to_value(&events_before).unwrap()
        );
        assert_eq!(s.events(id, events.len() as u64 - 1).unwrap().len(), 1);
        // Filters still see it, its key still names it, and a late event thaws and refreezes it.
        let f = JobFilter {
            state: Some(JobState::Succeeded),
            labels: [("team".to_string(), "ops".to_string())].into(),
            ..Default::default()
        };
        assert_eq!(s.list(&f).unwrap().len(), 1);
        assert_eq!(s.find_key("", "key-1"), Some(id));
        let again = s
            .submit(new_job(
                "g",
                Some("key-1"),
                json!({"ticket": 42, "text": "printer on fire"}),
            ))
            .await
            .unwrap();
        assert_eq!((again.id, again.deduplicated), (id, true));
        s.update(
            id,
            JobUpdate::Callback(crate::job::CallbackDelivery {
                attempts: 1,
                delivered: true,
                ..Default::default()
            }),
        )
        .unwrap();
        assert!(matches!(s.lock().jobs[&id].body, Body::Frozen(_)));
        assert!(s.get(id).unwrap().unwrap().callback.unwrap().delivered);
    }

    #[tokio::test]
    async fn a_frozen_job_keeps_its_folded_events_and_dropped_count() {
        let s = MemoryStore::new().with_max_events_per_job(8);
        let mut j = new_job("g", None, json!({}));
        j.max_pending = 10;
        let id = s.submit(j).await.unwrap().id;
        s.claim_pending("g", 1).unwrap();
        s.update(id, JobUpdate::Started).unwrap();
        // A refused call started again at the same attempt folds into one event...
        for _ in 0..3 {
            s.update(
                id,
                JobUpdate::StepStarted {
                    step: 0,
                    attempt: 1,
                },
            )
            .unwrap();
        }
        // ...and retries past the log's bound are counted, not kept.
        for attempt in 2..12 {
            s.update(
                id,
                JobUpdate::StepRetrying {
                    step: 0,
                    attempt,
                    delay: std::time::Duration::from_millis(5),
                    error: "busy".into(),
                },
            )
            .unwrap();
        }
        let live = s.get(id).unwrap().unwrap();
        let live_events = s.events(id, 0).unwrap();
        assert!(live.events_dropped > 0);
        assert!(
            live_events
                .iter()
                .any(|e| e.count == 3 && e.last_at.is_some())
        );
        s.update(
            id,
            JobUpdate::Finished {
                state: JobState::Failed,
                output: None,
                error: Some("gave up".into()),
            },
        )
        .unwrap();
        s.settle();
        assert!(matches!(s.lock().jobs[&id].body, Body::Frozen(_)));
        let frozen = s.get(id).unwrap().unwrap();
        assert_eq!(frozen.events_dropped, live.events_dropped);
        assert_eq!(frozen.error.as_deref(), Some("gave up"));
        let events = s.events(id, 0).unwrap();
        assert_eq!(
            serde_json::to_value(&events[..live_events.len()]).unwrap(),
            serde_json::to_value(&live_events).unwrap()
        );
    }
}
