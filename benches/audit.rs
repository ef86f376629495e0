//! The audit log: appending records (in transactions of `AUDIT_BENCH_BATCH`, default 1,000, each
//! synced to disk) to a real SQLite file, and `verify` (every record hashed again, the tree
//! rebuilt, each checkpoint's signature and root checked) over all of them.
//!
//! `cargo bench --bench audit` (`AUDIT_BENCH_RECORDS`, default 1,000,000).

use std::time::Instant;

use cascade_orchestrator::audit::checkpoint::Signer;
use cascade_orchestrator::audit::log::{AuditLog, Source, verify};
use serde_json::json;

mod common;

fn main() {
    let records: u64 = common::env_or("AUDIT_BENCH_RECORDS", 1_000_000);
    let batch: u64 = common::env_or("AUDIT_BENCH_BATCH", 1_000);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("cascade.db");
    let signer = Signer::from_seed("bench.cascade/audit", &[3u8; 32]).unwrap();
    let key = signer.verifier_key();
    let log = AuditLog::open(&path, Some(signer), "bench.cascade/audit").unwrap();
    let t = Instant::now();
    let mut written = 0;
    while written < records {
        let n = batch.min(records - written);
        log.append_all((0..n).map(|i| {
            (
                "acme",
                "decision",
                json!({"approval_id": format!("job-{}/pay", written + i), "decision": "approve", "approver": "ana", "proposal_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"}),
            )
        }))
        .unwrap();
        written += n;
        // A checkpoint every 100,000 records, as a server signing once a minute at ~1,700/s.
        if written % 100_000 == 0 {
            log.checkpoint().unwrap();
        }
    }
    log.checkpoint().unwrap();
    let append = t.elapsed().as_secs_f64();
    drop(log);
    let t = Instant::now();
    let v = verify(&Source::Sqlite(path.clone()), &key, None).unwrap();
    let check = t.elapsed().as_secs_f64();
    let bytes = std::fs::metadata(&path).unwrap().len();
    println!(
        "audit: {records} records in transactions of {batch}: append {append:.2} s ({:.0} records/s), verify {check:.2} s ({:.0} records/s) over {} checkpoints; file {:.0} MiB",
        records as f64 / append,
        records as f64 / check,
        v.checkpoints,
        bytes as f64 / (1 << 20) as f64
    );
}
