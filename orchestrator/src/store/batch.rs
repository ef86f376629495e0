//! The changes a durable store's writer commits, and their grouping per job: shared by the
//! SQLite and PostgreSQL stores, which write the same rows.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::Value;

use tokio::sync::oneshot;

use crate::job::{EventKind, JobEvent, JobId, JobRecord, JobState, StepState};

/// What became of a new job's row.
#[derive(Debug)]
pub(super) enum Inserted {
    Stored,
    /// Its idempotency key already names another job in the database (written by another
    /// node): that one, with its input as stored.
    Known {
        existing: JobId,
        input: String,
    },
}

pub(super) type Ack = oneshot::Sender<Result<Inserted, String>>;

pub(super) enum Op {
    Insert {
        record: JobRecord,
        event: JobEvent,
        ack: Ack,
    },
    Update {
        record: JobRecord,
        event: JobEvent,
        /// The event is in the job's log (`false`: past `max_events_per_job`, rows only).
        logged: bool,
    },
    /// Changes to one job that must reach the disk together (one transaction): each with the
    /// record after it, as [`Op::Update`].
    Updates(Vec<(JobRecord, JobEvent, bool)>),
    Flush(oneshot::Sender<()>),
    CredentialState {
        name: String,
        sealed: String,
    },
    TriggerState {
        key: String,
        state: String,
    },
}

/// Per job of a batch: its latest record, whether it is new, which steps changed, and its events.
pub(super) type JobWrites<'a> = (&'a JobRecord, bool, BTreeSet<usize>, Vec<&'a JobEvent>);

pub(super) fn group_batch(batch: &[Op]) -> Vec<(JobId, JobWrites<'_>)> {
    let mut index: HashMap<JobId, usize> = HashMap::new();
    let mut jobs: Vec<(JobId, JobWrites<'_>)> = Vec::new();
    let changes = batch.iter().flat_map(|op| {
        let one = |r, e, inserted, logged| std::iter::once((r, e, inserted, logged));
        let many: Box<dyn Iterator<Item = (&JobRecord, &JobEvent, bool, bool)>> = match op {
            Op::Insert { record, event, .. } => Box::new(one(record, event, true, true)),
            Op::Update {
                record,
                event,
                logged,
            } => Box::new(one(record, event, false, *logged)),
            Op::Updates(list) => Box::new(list.iter().map(|(r, e, l)| (r, e, false, *l))),
            Op::Flush(_) | Op::CredentialState { .. } | Op::TriggerState { .. } => {
                Box::new(std::iter::empty())
            }
        };
        many
    });
    for (record, event, inserted, logged) in changes {
        let i = *index.entry(record.id).or_insert_with(|| {
            jobs.push((record.id, (record, inserted, BTreeSet::new(), Vec::new())));
            jobs.len() - 1
        });
        let entry = &mut jobs[i].1;
        entry.0 = record;
        entry.1 |= inserted;
        if logged {
            entry.3.push(event);
        }
        match &event.kind {
            EventKind::StepStarted { agent, .. }
            | EventKind::StepRetrying { agent, .. }
            | EventKind::StepSucceeded { agent, .. }
            | EventKind::StepFailed { agent, .. }
            | EventKind::ApprovalRequested { agent, .. }
            | EventKind::ApprovalDecided { agent, .. }
            | EventKind::SubStep { agent, .. } => {
                if let Some(i) = record.steps.iter().position(|s| s.agent == *agent) {
                    entry.2.insert(i);
                }
            }
            // A new job writes all its steps; a finished one marks the rest cancelled.
            EventKind::Submitted | EventKind::Finished { .. } => {
                entry.2.extend(0..record.steps.len())
            }
            _ => {}
        }
    }
    jobs
}

pub(super) fn micros(t: SystemTime) -> i64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

pub(super) fn from_micros(v: i64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(v.max(0) as u64)
}

pub(super) fn json(v: &Option<Arc<Value>>) -> Option<String> {
    v.as_ref().map(|v| v.to_string())
}

pub(super) fn parse_state(s: &str) -> JobState {
    match s {
        "pending" => JobState::Pending,
        "running" => JobState::Running,
        "awaiting_approval" => JobState::AwaitingApproval,
        "budget_exceeded" => JobState::BudgetExceeded,
        "succeeded" => JobState::Succeeded,
        "cancelled" => JobState::Cancelled,
        _ => JobState::Failed,
    }
}

pub(super) fn parse_step_state(s: &str) -> StepState {
    match s {
        "waiting" => StepState::Waiting,
        "running" => StepState::Running,
        "retrying" => StepState::Retrying,
        "succeeded" => StepState::Succeeded,
        "failed" => StepState::Failed,
        "awaiting_approval" => StepState::AwaitingApproval,
        _ => StepState::Cancelled,
    }
}

pub(super) fn parse_json(s: Option<String>) -> Option<Arc<Value>> {
    s.and_then(|t| serde_json::from_str(&t).ok()).map(Arc::new)
}
