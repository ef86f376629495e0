//! The in-memory store: everything in one mutex-guarded map. Finished jobs are kept up to a
//! retention count, oldest evicted first, so a long `cascade run` does not grow without bound.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use super::{JobFilter, JobStore, NewJob, StoreError, StoreFuture, Submitted};
use crate::job::{EventKind, JobEvent, JobId, JobRecord, JobState, JobUpdate};

const DEFAULT_RETAIN_FINISHED: usize = 100_000;

/// Events kept per job by default (`[server] max_events_per_job`).
pub const DEFAULT_MAX_EVENTS_PER_JOB: usize = 256;

pub struct MemoryStore {
    inner: Mutex<Inner>,
    retain_finished: usize,
    max_events: usize,
}

#[derive(Default)]
struct Inner {
    jobs: HashMap<JobId, Entry>,
    pending: HashMap<Arc<str>, VecDeque<JobId>>,
    keys: HashMap<(String, String), JobId>,
    finished: VecDeque<JobId>,
}

struct Entry {
    record: JobRecord,
    events: Vec<JobEvent>,
    /// (tenant, idempotency key), to forget the key with the job.
    key: Option<(String, String)>,
}

impl Entry {
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
        Self {
            inner: Mutex::new(Inner::default()),
            retain_finished,
            max_events: DEFAULT_MAX_EVENTS_PER_JOB,
        }
    }

    /// Keep at most `max` events per job (at least 8; its final event always).
    pub fn with_max_events_per_job(mut self, max: usize) -> Self {
        self.max_events = max.max(8);
        self
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
        let mut inner = self.lock();
        if let Some(key) = &job.idempotency_key {
            let k = (job.tenant.clone(), key.clone());
            if let Some(&existing) = inner.keys.get(&k) {
                // Keys leave with their jobs; a key found without one has no input to compare.
                let same_input = inner
                    .jobs
                    .get(&existing)
                    .is_none_or(|e| e.record.input == job.input);
                return Ok((Submitted::known_key(key, existing, same_input)?, None));
            }
        }
        let pending = inner.pending.get(&job.graph).map_or(0, VecDeque::len);
        if pending >= job.max_pending {
            return Err(StoreError::Full {
                graph: job.graph.clone(),
                pending,
            });
        }
        let now = crate::clock::now();
        let mut record = JobRecord::new(job.id, job.graph.clone(), &job.agents, job.input, now);
        record.labels = job.labels;
        record.idempotency_key = job.idempotency_key.clone();
        record.deadline = job.deadline;
        record.callback_url = job.callback_url;
        record.tenant = job.tenant.clone();
        record.events = 1;
        let mut events = Vec::with_capacity(3 + 2 * job.agents.len());
        events.push(JobEvent {
            job_id: job.id,
            seq: 1,
            at: now,
            count: 1,
            last_at: None,
            kind: EventKind::Submitted,
        });
        let key = job.idempotency_key.map(|k| (job.tenant, k));
        if let Some(k) = &key {
            inner.keys.insert(k.clone(), job.id);
        }
        inner
            .pending
            .entry(job.graph)
            .or_default()
            .push_back(job.id);
        let created = (record.clone(), events[0].clone());
        inner.jobs.insert(
            job.id,
            Entry {
                record,
                events,
                key,
            },
        );
        Ok((
            Submitted {
                id: job.id,
                deduplicated: false,
            },
            Some(created),
        ))
    }

    /// Apply an update; return its event and the record after it (for persistence).
    pub(crate) fn update_snapshot(
        &self,
        id: JobId,
        update: JobUpdate,
    ) -> Result<Option<(JobEvent, bool, JobRecord)>, StoreError> {
        let mut inner = self.lock();
        let entry = inner.jobs.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        let Some(event) = entry.record.apply(update, crate::clock::now()) else {
            return Ok(None);
        };
        let kept = entry.log(&event, self.max_events);
        let record = entry.record.clone();
        if event.kind.is_final() {
            self.finished(&mut inner, id);
        }
        Ok(Some((event, kept, record)))
    }

    /// Load a job recovered from durable storage.
    pub(crate) fn insert_recovered(&self, record: JobRecord, events: Vec<JobEvent>) {
        let mut inner = self.lock();
        let key = record
            .idempotency_key
            .clone()
            .map(|k| (record.tenant.clone(), k));
        if let Some(k) = &key {
            inner.keys.insert(k.clone(), record.id);
        }
        if record.state == JobState::Pending {
            inner
                .pending
                .entry(record.graph.clone())
                .or_default()
                .push_back(record.id);
        }
        if record.state.is_terminal() {
            inner.finished.push_back(record.id);
        }
        inner.jobs.insert(
            record.id,
            Entry {
                record,
                events,
                key,
            },
        );
    }

    /// Forget a job (its durable write failed).
    pub(crate) fn remove(&self, id: JobId) {
        let mut inner = self.lock();
        if let Some(e) = inner.jobs.remove(&id) {
            if let Some(k) = e.key {
                inner.keys.remove(&k);
            }
            if let Some(q) = inner.pending.get_mut(&e.record.graph) {
                q.retain(|j| *j != id);
            }
        }
    }

    /// The job an idempotency key names, if this store holds it.
    pub(crate) fn find_key(&self, tenant: &str, key: &str) -> Option<JobId> {
        self.lock()
            .keys
            .get(&(tenant.to_string(), key.to_string()))
            .copied()
    }

    fn finished(&self, inner: &mut Inner, id: JobId) {
        inner.finished.push_back(id);
        while inner.finished.len() > self.retain_finished {
            if let Some(old) = inner.finished.pop_front()
                && let Some(e) = inner.jobs.remove(&old)
                && let Some(key) = e.key
            {
                inner.keys.remove(&key);
            }
        }
    }
}

impl JobStore for MemoryStore {
    fn submit(&self, job: NewJob) -> StoreFuture<'_, Submitted> {
        let result = self.submit_now(job).map(|(s, _)| s);
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
                && e.record.state == JobState::Pending
            {
                e.record.state = JobState::Running;
                out.push(e.record.clone());
            }
        }
        Ok(out)
    }

    fn running(&self, graph: &str) -> Result<Vec<JobRecord>, StoreError> {
        let inner = self.lock();
        let mut out: Vec<JobRecord> = inner
            .jobs
            .values()
            .filter(|e| {
                &*e.record.graph == graph
                    && matches!(
                        e.record.state,
                        JobState::Running | JobState::AwaitingApproval
                    )
            })
            .map(|e| e.record.clone())
            .collect();
        out.sort_by_key(|r| r.id);
        Ok(out)
    }

    fn update(&self, id: JobId, update: JobUpdate) -> Result<Option<JobEvent>, StoreError> {
        let mut inner = self.lock();
        let entry = inner.jobs.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        let event = entry.record.apply(update, crate::clock::now());
        if let Some(e) = &event {
            entry.log(e, self.max_events);
            if e.kind.is_final() {
                self.finished(&mut inner, id);
            }
        }
        Ok(event)
    }

    fn cancel_pending(&self, id: JobId, reason: &str) -> Result<Option<JobEvent>, StoreError> {
        let mut inner = self.lock();
        let entry = inner.jobs.get_mut(&id).ok_or(StoreError::NotFound(id))?;
        if entry.record.state != JobState::Pending {
            return Ok(None);
        }
        let event = entry.record.apply(
            JobUpdate::Finished {
                state: JobState::Cancelled,
                output: None,
                error: Some(format!("cancelled: {reason}")),
            },
            crate::clock::now(),
        );
        if let Some(e) = &event {
            entry.events.push(e.clone());
            let graph = entry.record.graph.clone();
            if let Some(q) = inner.pending.get_mut(&graph) {
                q.retain(|j| *j != id);
            }
            self.finished(&mut inner, id);
        }
        Ok(event)
    }

    fn get(&self, id: JobId) -> Result<Option<JobRecord>, StoreError> {
        Ok(self.lock().jobs.get(&id).map(|e| e.record.clone()))
    }

    fn events(&self, id: JobId, after_seq: u64) -> Result<Vec<JobEvent>, StoreError> {
        let inner = self.lock();
        let e = inner.jobs.get(&id).ok_or(StoreError::NotFound(id))?;
        Ok(e.events
            .iter()
            .filter(|ev| ev.seq > after_seq)
            .cloned()
            .collect())
    }

    fn list(&self, filter: &JobFilter) -> Result<Vec<JobRecord>, StoreError> {
        let inner = self.lock();
        let mut out: Vec<JobRecord> = inner
            .jobs
            .values()
            .filter(|e| filter.matches(&e.record))
            .map(|e| e.record.clone())
            .collect();
        out.sort_by_key(|r| std::cmp::Reverse(r.id));
        if filter.limit > 0 {
            out.truncate(filter.limit);
        }
        Ok(out)
    }

    fn pending_count(&self, graph: &str) -> usize {
        self.lock().pending.get(graph).map_or(0, VecDeque::len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn new_job(graph: &str, key: Option<&str>, input: serde_json::Value) -> NewJob {
        NewJob {
            id: JobId::new(),
            graph: graph.into(),
            agents: vec!["a".into()],
            input: Arc::new(input),
            labels: Default::default(),
            idempotency_key: key.map(String::from),
            tenant: String::new(),
            max_pending: 2,
            deadline: None,
            callback_url: None,
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
}
