//! Records reach the audit log through one writer thread, a batch per transaction: whoever
//! records (a graph's scheduler deciding, proposing, executing) does not wait for the disk.
//! The queue is bounded: when it is full, recording waits for room, so memory stays bounded and
//! no record is dropped for lack of room. A batch the log's file refuses is lost, loudly: an
//! error in the log and `cascade_audit_write_failures_total`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use serde_json::Value;
use tokio::sync::oneshot;

use super::log::AuditLog;

/// Records waiting for the writer at most.
pub const AUDIT_QUEUE_CAPACITY: usize = 16_384;

/// Records one transaction appends at most.
const BATCH: usize = 1_024;

enum Msg {
    Record {
        tenant: String,
        kind: &'static str,
        body: Value,
    },
    /// Answered once everything sent before it is appended (or failed).
    Flush(oneshot::Sender<()>),
}

/// The sending side of the audit writer.
#[derive(Clone)]
pub struct AuditSink {
    tx: SyncSender<Msg>,
    depth: Arc<AtomicUsize>,
    log: Arc<AuditLog>,
}

impl std::fmt::Debug for AuditSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuditSink")
            .field("log", &self.log)
            .field("queued", &self.depth.load(Relaxed))
            .finish()
    }
}

impl AuditSink {
    /// Start the writer of `log`.
    pub fn start(log: Arc<AuditLog>) -> std::io::Result<Self> {
        let (tx, rx) = sync_channel(AUDIT_QUEUE_CAPACITY);
        let depth = Arc::new(AtomicUsize::new(0));
        let (l, d) = (log.clone(), depth.clone());
        std::thread::Builder::new()
            .name("cascade-audit".into())
            .spawn(move || write(&l, &rx, &d))?;
        Ok(Self { tx, depth, log })
    }

    pub fn log(&self) -> &Arc<AuditLog> {
        &self.log
    }

    /// Queue a record of `kind` for `tenant`; waits for room when the queue is full.
    pub fn record(&self, tenant: &str, kind: &'static str, body: Value) {
        let n = self.depth.fetch_add(1, Relaxed) + 1;
        metrics::gauge!(crate::metrics::AUDIT_QUEUE_DEPTH).set(n as f64);
        let msg = Msg::Record {
            tenant: tenant.to_string(),
            kind,
            body,
        };
        if self.tx.send(msg).is_err() {
            self.depth.fetch_sub(1, Relaxed);
            tracing::error!(
                kind,
                "the audit writer is gone: an audit record was not written"
            );
            metrics::counter!(crate::metrics::AUDIT_WRITE_FAILURES).increment(1);
        }
    }

    /// Wait until every record queued so far is appended.
    pub async fn flush(&self) {
        let (ack, done) = oneshot::channel();
        if self.tx.send(Msg::Flush(ack)).is_ok() {
            let _ = done.await;
        }
    }
}

fn write(log: &AuditLog, rx: &Receiver<Msg>, depth: &AtomicUsize) {
    // Ends when every sender is dropped (the orchestrator is gone).
    while let Ok(first) = rx.recv() {
        let mut batch = Vec::new();
        let mut acks = Vec::new();
        let mut next = Some(first);
        while let Some(msg) = next.take() {
            match msg {
                Msg::Record { tenant, kind, body } => batch.push((tenant, kind, body)),
                Msg::Flush(ack) => acks.push(ack),
            }
            if batch.len() < BATCH {
                next = rx.try_recv().ok();
            }
        }
        let n = batch.len();
        if n > 0 {
            let kinds: Vec<&'static str> = batch.iter().map(|(_, k, _)| *k).collect();
            match log.append_all(batch.iter().map(|(t, k, b)| (t.as_str(), *k, b.clone()))) {
                Ok(_) => {
                    for k in kinds {
                        metrics::counter!(crate::metrics::AUDIT_RECORDS, "kind" => k).increment(1);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, records = n, "could not append audit records");
                    metrics::counter!(crate::metrics::AUDIT_WRITE_FAILURES).increment(1);
                }
            }
            let left = depth.fetch_sub(n, Relaxed).saturating_sub(n);
            metrics::gauge!(crate::metrics::AUDIT_QUEUE_DEPTH).set(left as f64);
        }
        for ack in acks {
            let _ = ack.send(());
        }
    }
}
