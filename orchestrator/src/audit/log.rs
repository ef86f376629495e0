//! The audit log: append-only records (triggers refuse updates and deletes, and retention never
//! touches them), each a leaf of the Merkle tree, and signed checkpoints of that tree. It lives
//! in the server's SQLite file, or, for a cluster, in the PostgreSQL store shared by every node
//! (one global order, one signer at a time: see [`super::pg`]). [`verify`] reads a (stopped or
//! running) server's log and checks it all: every record against its leaf hash, every
//! checkpoint's signature and root, and that the log extends a checkpoint saved elsewhere
//! earlier.
//!
//! A record is stored as the exact JSON text its leaf hashes, so that verification hashes what
//! is stored, byte for byte, with no canonicalisation to get wrong.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, OptionalExtension, params};
use serde_json::{Value, json};

use super::checkpoint::{self, Checkpoint, Signer};
use super::hex;
use super::merkle::{self, Frontier, Hash};
use super::pg::{PgAudit, PgAuditOptions, StoredEntry};

const SCHEMA: &str = r#"
CREATE TABLE IF NOT EXISTS audit_log (
    seq INTEGER PRIMARY KEY,
    record TEXT NOT NULL,
    leaf BLOB NOT NULL
);
CREATE TABLE IF NOT EXISTS audit_checkpoints (
    size INTEGER PRIMARY KEY,
    note TEXT NOT NULL
);
CREATE TRIGGER IF NOT EXISTS audit_log_no_update BEFORE UPDATE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_log_no_delete BEFORE DELETE ON audit_log
    BEGIN SELECT RAISE(ABORT, 'audit records are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_update BEFORE UPDATE ON audit_checkpoints
    BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_checkpoints_no_delete BEFORE DELETE ON audit_checkpoints
    BEGIN SELECT RAISE(ABORT, 'audit checkpoints are append-only'); END;
"#;

/// The audit log of one server (or one node of a cluster).
pub struct AuditLog {
    backend: Backend,
    signer: Option<Arc<Signer>>,
    origin: String,
}

enum Backend {
    Sqlite { state: Mutex<State>, path: PathBuf },
    Postgres(Arc<PgAudit>),
}

impl std::fmt::Debug for AuditLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut d = f.debug_struct("AuditLog");
        match &self.backend {
            Backend::Sqlite { path, .. } => d.field("path", path),
            Backend::Postgres(pg) => d.field("postgres", pg),
        };
        d.field("origin", &self.origin)
            .field("signed", &self.signer.is_some())
            .finish()
    }
}

/// Where an audit log is read from: a server's SQLite file, or a cluster's PostgreSQL store.
#[derive(Clone, Debug)]
pub enum Source {
    Sqlite(PathBuf),
    Postgres(Arc<PgAudit>),
}

impl Source {
    fn open(path: &Path) -> Result<Connection, String> {
        Connection::open_with_flags(path, OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| format!("cannot open {}: {e}", path.display()))
    }

    /// Every record in order, with the leaf hash stored beside it.
    fn entries(&self) -> Result<Vec<StoredEntry>, String> {
        match self {
            Self::Sqlite(path) => {
                let conn = Self::open(path)?;
                let mut stmt = conn
                    .prepare("SELECT seq, record, leaf FROM audit_log ORDER BY seq")
                    .map_err(sql)?;
                stmt.query_map([], |r| {
                    Ok((
                        r.get::<_, i64>(0)? as u64,
                        r.get::<_, String>(1)?,
                        r.get::<_, Vec<u8>>(2)?,
                    ))
                })
                .map_err(sql)?
                .collect::<Result<_, _>>()
                .map_err(sql)
            }
            Self::Postgres(pg) => pg.entries(),
        }
    }

    /// Every stored checkpoint (size, note), by size.
    fn checkpoints(&self) -> Result<Vec<(u64, String)>, String> {
        match self {
            Self::Sqlite(path) => {
                let conn = Self::open(path)?;
                let mut stmt = conn
                    .prepare("SELECT size, note FROM audit_checkpoints ORDER BY size")
                    .map_err(sql)?;
                stmt.query_map([], |r| Ok((r.get::<_, i64>(0)? as u64, r.get(1)?)))
                    .map_err(sql)?
                    .collect::<Result<_, _>>()
                    .map_err(sql)
            }
            Self::Postgres(pg) => pg.checkpoints(),
        }
    }

    /// The latest signed checkpoint, if any.
    pub fn latest_checkpoint(&self) -> Result<Option<String>, String> {
        match self {
            Self::Sqlite(path) => Self::open(path)?
                .query_row(
                    "SELECT note FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
                    [],
                    |r| r.get(0),
                )
                .optional()
                .map_err(sql),
            Self::Postgres(pg) => pg.latest_checkpoint(),
        }
    }
}

struct State {
    conn: Connection,
    tree: Frontier,
}

fn sql(e: rusqlite::Error) -> String {
    format!("the audit log: {e}")
}

impl AuditLog {
    /// Open (or create) the audit log in the SQLite file at `path`. With a `signer`,
    /// [`checkpoint`](Self::checkpoint) signs the tree for `origin`.
    pub fn open(path: &Path, signer: Option<Signer>, origin: &str) -> Result<Self, String> {
        let conn = Connection::open(path).map_err(sql)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(sql)?;
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(sql)?;
        // Every commit reaches the disk before `append` returns: a decision recorded is one
        // that a power cut does not take back.
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(sql)?;
        conn.execute_batch(SCHEMA).map_err(sql)?;
        let mut tree = Frontier::default();
        {
            let mut stmt = conn
                .prepare("SELECT leaf FROM audit_log ORDER BY seq")
                .map_err(sql)?;
            let leaves = stmt
                .query_map([], |r| r.get::<_, Vec<u8>>(0))
                .map_err(sql)?;
            for leaf in leaves {
                let leaf: Hash = leaf
                    .map_err(sql)?
                    .try_into()
                    .map_err(|_| "the audit log holds a leaf that is not a SHA-256 hash")?;
                tree.push(leaf);
            }
        }
        Ok(Self {
            backend: Backend::Sqlite {
                state: Mutex::new(State { conn, tree }),
                path: path.to_path_buf(),
            },
            signer: signer.map(Arc::new),
            origin: origin.to_string(),
        })
    }

    /// Open the audit log of a cluster's PostgreSQL store (its tables come with the store's
    /// migrations): every node appends to one sequence, and one node at a time signs.
    pub fn open_postgres(
        options: PgAuditOptions,
        signer: Option<Signer>,
        origin: &str,
    ) -> Result<Self, String> {
        Ok(Self {
            backend: Backend::Postgres(Arc::new(PgAudit::open(options)?)),
            signer: signer.map(Arc::new),
            origin: origin.to_string(),
        })
    }

    /// Append a record of `kind` for `tenant`, durably; returns its sequence number (from 1).
    pub fn append(&self, tenant: &str, kind: &str, body: Value) -> Result<u64, String> {
        self.append_all([(tenant, kind, body)])
    }

    /// Append records in one transaction; returns the last one's sequence number.
    pub fn append_all<'a>(
        &self,
        records: impl IntoIterator<Item = (&'a str, &'a str, Value)>,
    ) -> Result<u64, String> {
        let state = match &self.backend {
            Backend::Sqlite { state, .. } => state,
            Backend::Postgres(pg) => {
                return pg.append_all(
                    records
                        .into_iter()
                        .map(|(t, k, b)| (t.to_string(), k.to_string(), b))
                        .collect(),
                );
            }
        };
        let mut s = state.lock().unwrap_or_else(|p| p.into_inner());
        let at = crate::clock::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut seq = s.tree.size();
        let mut leaves = Vec::new();
        {
            let tx = s.conn.unchecked_transaction().map_err(sql)?;
            let mut insert = tx
                .prepare_cached("INSERT INTO audit_log (seq, record, leaf) VALUES (?1, ?2, ?3)")
                .map_err(sql)?;
            for (tenant, kind, body) in records {
                seq += 1;
                let record = json!({"seq": seq, "at_unix_ms": at, "tenant": tenant, "kind": kind, "body": body})
                    .to_string();
                let leaf = merkle::leaf_hash(record.as_bytes());
                insert
                    .execute(params![seq as i64, record, leaf.as_slice()])
                    .map_err(sql)?;
                leaves.push(leaf);
            }
            drop(insert);
            tx.commit().map_err(sql)?;
        }
        // The tree grows only once the records are committed.
        for leaf in leaves {
            s.tree.push(leaf);
        }
        Ok(seq)
    }

    /// Where the log is read from (for [`verify`], [`prove`], [`records`]).
    pub fn source(&self) -> Source {
        match &self.backend {
            Backend::Sqlite { path, .. } => Source::Sqlite(path.clone()),
            Backend::Postgres(pg) => Source::Postgres(pg.clone()),
        }
    }

    /// Whether this node signs the checkpoints: always with a signing key on SQLite; in a
    /// cluster, while it holds the signer's lock.
    pub fn signs(&self) -> bool {
        self.signer.is_some()
            && match &self.backend {
                Backend::Sqlite { .. } => true,
                Backend::Postgres(pg) => pg.signs(),
            }
    }

    /// The checkpoints' verification key, when the log signs them.
    pub fn verifier_key(&self) -> Option<String> {
        self.signer.as_ref().map(|s| s.verifier_key())
    }

    /// Up to `limit` records after `after`: (sequence number, exact text, leaf hash).
    pub fn page(
        &self,
        after: u64,
        limit: usize,
        tenant: Option<&str>,
    ) -> Result<Vec<Entry>, String> {
        let state = match &self.backend {
            Backend::Sqlite { state, .. } => state,
            Backend::Postgres(pg) => {
                return pg
                    .page(after, limit, tenant)?
                    .into_iter()
                    .map(stored_hash)
                    .collect();
            }
        };
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        let mut stmt = s
            .conn
            .prepare_cached(
                "SELECT seq, record, leaf FROM audit_log
                 WHERE seq > ?1 AND (?3 IS NULL OR json_extract(record, '$.tenant') = ?3)
                 ORDER BY seq LIMIT ?2",
            )
            .map_err(sql)?;
        let rows = stmt
            .query_map(params![after as i64, limit as i64, tenant], |r| {
                Ok((
                    r.get::<_, i64>(0)? as u64,
                    r.get::<_, String>(1)?,
                    r.get::<_, Vec<u8>>(2)?,
                ))
            })
            .map_err(sql)?;
        rows.map(|row| {
            let (seq, record, leaf) = row.map_err(sql)?;
            let leaf: Hash = leaf
                .try_into()
                .map_err(|_| format!("audit record {seq}'s leaf is not a SHA-256 hash"))?;
            Ok((seq, record, leaf))
        })
        .collect()
    }

    /// Sign and store a checkpoint of the tree as it is, unless the latest one already covers
    /// it; returns the latest signed checkpoint (`None` without a signer or records).
    pub fn checkpoint(&self) -> Result<Option<String>, String> {
        let Some(signer) = &self.signer else {
            return Ok(None);
        };
        let state = match &self.backend {
            Backend::Sqlite { state, .. } => state,
            Backend::Postgres(pg) => return pg.checkpoint(signer, &self.origin),
        };
        let s = state.lock().unwrap_or_else(|p| p.into_inner());
        let size = s.tree.size();
        if size == 0 {
            return Ok(None);
        }
        let latest: Option<(i64, String)> = s
            .conn
            .query_row(
                "SELECT size, note FROM audit_checkpoints ORDER BY size DESC LIMIT 1",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
            .map_err(sql)?;
        if let Some((at, note)) = latest
            && at as u64 == size
        {
            return Ok(Some(note));
        }
        let note = signer.sign(&Checkpoint {
            origin: self.origin.clone(),
            size,
            root: s.tree.root(),
        });
        s.conn
            .execute(
                "INSERT INTO audit_checkpoints (size, note) VALUES (?1, ?2)",
                params![size as i64, note],
            )
            .map_err(sql)?;
        Ok(Some(note))
    }
}

/// Every record of the audit log at `source`: (sequence number, record JSON, leaf hash of the
/// text), in order.
pub fn records(source: &Source) -> Result<Vec<Entry>, String> {
    Ok(source
        .entries()?
        .into_iter()
        .map(|(seq, record, _)| {
            let leaf = merkle::leaf_hash(record.as_bytes());
            (seq, record, leaf)
        })
        .collect())
}

/// The latest signed checkpoint of the log at `source`, if any.
pub fn latest_checkpoint(source: &Source) -> Result<Option<String>, String> {
    source.latest_checkpoint()
}

/// A stored entry with its stored leaf checked to be a hash.
fn stored_hash((seq, record, leaf): StoredEntry) -> Result<Entry, String> {
    let leaf: Hash = leaf
        .try_into()
        .map_err(|_| format!("audit record {seq}'s leaf is not a SHA-256 hash"))?;
    Ok((seq, record, leaf))
}

/// One record: its sequence number, exact text and leaf hash.
pub type Entry = (u64, String, Hash);

/// The latest signed checkpoint (its note, what it says) and the records, checked to hold at
/// least as many as it covers and to give its root: what proofs are made against.
fn signed_tree(
    source: &Source,
    verifier_key: &str,
) -> Result<(String, Checkpoint, Vec<Entry>), String> {
    let note =
        latest_checkpoint(source)?.ok_or("no signed checkpoint yet: nothing to prove against")?;
    let cp = checkpoint::verify(&note, verifier_key)?;
    let mut all = records(source)?;
    if (all.len() as u64) < cp.size {
        return Err(format!(
            "the log holds {} records, fewer than its checkpoint's {}: run `cascade audit verify`",
            all.len(),
            cp.size
        ));
    }
    all.truncate(cp.size as usize);
    let leaves: Vec<Hash> = all.iter().map(|r| r.2).collect();
    if merkle::root(&leaves) != cp.root {
        return Err(
            "the records do not match the signed checkpoint: run `cascade audit verify`".into(),
        );
    }
    Ok((note, cp, all))
}

/// One record's inclusion proof in a signed checkpoint.
#[derive(Clone, Debug)]
pub struct Proof {
    pub seq: u64,
    /// The record's exact text.
    pub record: String,
    pub leaf: Hash,
    pub tree_size: u64,
    pub root: Hash,
    /// Sibling hashes from the leaf up.
    pub path: Vec<Hash>,
    /// The signed checkpoint it is against.
    pub checkpoint: String,
}

impl Proof {
    /// As JSON, hashes in hex.
    pub fn to_json(&self) -> Value {
        json!({
            "seq": self.seq,
            "record": self.record,
            "leaf_hash": hex(&self.leaf),
            "tree_size": self.tree_size,
            "root_hash": hex(&self.root),
            "inclusion_proof": self.path.iter().map(|h| hex(h)).collect::<Vec<_>>(),
            "checkpoint": self.checkpoint,
        })
    }
}

/// An inclusion proof of record `seq` in the tree of the latest signed checkpoint (which must
/// cover it).
pub fn prove(source: &Source, seq: u64, verifier_key: &str) -> Result<Proof, String> {
    let (note, cp, all) = signed_tree(source, verifier_key)?;
    if seq == 0 || seq > cp.size {
        return Err(format!(
            "record {seq} is not in the latest checkpoint (records 1 to {})",
            cp.size
        ));
    }
    let leaves: Vec<Hash> = all.iter().map(|r| r.2).collect();
    let index = (seq - 1) as usize;
    Ok(Proof {
        seq,
        record: all[index].1.clone(),
        leaf: leaves[index],
        tree_size: cp.size,
        root: cp.root,
        path: merkle::inclusion_proof(&leaves, index),
        checkpoint: note,
    })
}

/// A tenant's records in the latest signed checkpoint, each with its inclusion proof: what a
/// tenant's auditor can check against the signed root without seeing another tenant's records
/// (they appear only as hashes in the proofs). Records after the checkpoint are left out until
/// the next one is signed.
pub fn export_tenant(source: &Source, tenant: &str, verifier_key: &str) -> Result<Value, String> {
    let (note, cp, all) = signed_tree(source, verifier_key)?;
    let leaves: Vec<Hash> = all.iter().map(|r| r.2).collect();
    let mut out = Vec::new();
    for (i, (seq, record, leaf)) in all.iter().enumerate() {
        let parsed: Value =
            serde_json::from_str(record).map_err(|e| format!("audit record {seq}: {e}"))?;
        if parsed["tenant"] != tenant {
            continue;
        }
        out.push(json!({
            "seq": seq,
            "record": record,
            "leaf_hash": hex(leaf),
            "inclusion_proof": merkle::inclusion_proof(&leaves, i).iter().map(|h| hex(h)).collect::<Vec<_>>(),
        }));
    }
    Ok(json!({
        "tenant": tenant,
        "tree_size": cp.size,
        "root_hash": hex(&cp.root),
        "checkpoint": note,
        "records": out,
    }))
}

/// What [`verify`] checked.
#[derive(Debug, PartialEq, Eq)]
pub struct Verified {
    pub records: u64,
    pub checkpoints: usize,
    /// The size of the saved checkpoint the log was shown to extend.
    pub extends: Option<u64>,
}

/// Check the audit log at `source`: every record against its stored leaf hash (and the
/// sequence without gaps), every stored checkpoint's signature by `verifier_key` and its root
/// against the records, and, given `saved` (a checkpoint kept outside the server earlier), that
/// the log is an append-only extension of it. The error names the first record or checkpoint
/// that does not match.
pub fn verify(
    source: &Source,
    verifier_key: &str,
    saved: Option<&str>,
) -> Result<Verified, String> {
    let mut leaves: Vec<Hash> = Vec::new();
    for (seq, record, leaf) in source.entries()? {
        let expected = leaves.len() as u64 + 1;
        if seq != expected {
            return Err(format!(
                "audit record {expected} is missing (the next one is {seq}): records were deleted"
            ));
        }
        let computed = merkle::leaf_hash(record.as_bytes());
        if leaf != computed {
            return Err(format!(
                "audit record {seq} does not match its leaf hash: it was altered after it was written"
            ));
        }
        leaves.push(computed);
    }
    let notes = source.checkpoints()?;
    // Each checkpoint against the tree grown to its size: one pass over the leaves.
    let mut tree = Frontier::default();
    let mut checked_up_to = 0u64;
    for (size, note) in &notes {
        let cp = checkpoint::verify(note, verifier_key)
            .map_err(|e| format!("the checkpoint at size {size}: {e}"))?;
        if cp.size != *size {
            return Err(format!(
                "the checkpoint stored at size {size} is signed for size {}",
                cp.size
            ));
        }
        if cp.size > leaves.len() as u64 {
            return Err(format!(
                "the checkpoint at size {} covers more records than the log holds ({}): records were deleted",
                cp.size,
                leaves.len()
            ));
        }
        while tree.size() < cp.size {
            tree.push(leaves[tree.size() as usize]);
        }
        if tree.root() != cp.root {
            return Err(format!(
                "the checkpoint at size {} does not match the records: a record after {checked_up_to} and up to {} was altered along with its leaf hash",
                cp.size, cp.size
            ));
        }
        checked_up_to = cp.size;
    }
    let extends = match saved {
        None => None,
        Some(note) => {
            let cp = checkpoint::verify(note, verifier_key)
                .map_err(|e| format!("the saved checkpoint: {e}"))?;
            let n = leaves.len() as u64;
            if cp.size > n {
                return Err(format!(
                    "the log holds {n} records, fewer than the saved checkpoint's {}: records were deleted",
                    cp.size
                ));
            }
            let proof = merkle::consistency_proof(&leaves, cp.size.max(1) as usize);
            let ok = cp.size == 0
                || merkle::verify_consistency(cp.size, n, &proof, &cp.root, &merkle::root(&leaves));
            if !ok {
                return Err(format!(
                    "the log is not an append-only extension of the saved checkpoint (size {}): records up to {} were altered",
                    cp.size, cp.size
                ));
            }
            Some(cp.size)
        }
    };
    Ok(Verified {
        records: leaves.len() as u64,
        checkpoints: notes.len(),
        extends,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn src(path: &Path) -> Source {
        Source::Sqlite(path.to_path_buf())
    }

    fn signer() -> Signer {
        Signer::from_seed("cascade.test/audit", &[7u8; 32]).unwrap()
    }

    fn log_with(dir: &Path, n: u64) -> (AuditLog, String) {
        let log = AuditLog::open(
            &dir.join("cascade.db"),
            Some(signer()),
            "cascade.test/audit",
        )
        .unwrap();
        for i in 0..n {
            log.append(
                "acme",
                "config_loaded",
                json!({"file": format!("g{i}.toml")}),
            )
            .unwrap();
        }
        let note = log.checkpoint().unwrap().unwrap();
        (log, note)
    }

    /// Tamper with the file by hand, as someone with write access would: the triggers first.
    fn by_hand(path: &Path, sql: &str) {
        let c = Connection::open(path).unwrap();
        c.execute_batch(&format!(
            "DROP TRIGGER audit_log_no_update; DROP TRIGGER audit_log_no_delete;
             DROP TRIGGER audit_checkpoints_no_delete; {sql}"
        ))
        .unwrap();
    }

    #[test]
    fn a_clean_log_verifies_and_extends_its_earlier_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cascade.db");
        let (log, early) = log_with(dir.path(), 5);
        for _ in 0..4 {
            log.append("acme", "decision", json!({"approve": true}))
                .unwrap();
        }
        log.checkpoint().unwrap();
        drop(log);
        // Reopened, the tree goes on where it was.
        let log = AuditLog::open(&path, Some(signer()), "cascade.test/audit").unwrap();
        assert_eq!(records(&src(&path)).unwrap().len(), 9);
        log.append("acme", "decision", json!({"approve": false}))
            .unwrap();
        log.checkpoint().unwrap();
        let key = signer().verifier_key();
        assert_eq!(
            verify(&src(&path), &key, Some(&early)).unwrap(),
            Verified {
                records: 10,
                checkpoints: 3,
                extends: Some(5)
            }
        );
        // The store refuses to rewrite history.
        let c = Connection::open(&path).unwrap();
        let e = c
            .execute("UPDATE audit_log SET record = 'x' WHERE seq = 1", [])
            .unwrap_err();
        assert!(e.to_string().contains("append-only"), "{e}");
        assert!(c.execute("DELETE FROM audit_log", []).is_err());
    }

    #[test]
    fn a_record_is_proved_against_the_signed_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cascade.db");
        let (_log, _) = log_with(dir.path(), 7);
        let key = signer().verifier_key();
        let p = prove(&src(&path), 3, &key).unwrap().to_json();
        assert_eq!(p["tree_size"], 7);
        let unhex = |s: &str| -> Hash {
            (0..32)
                .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
                .collect::<Vec<u8>>()
                .try_into()
                .unwrap()
        };
        let proof: Vec<Hash> = p["inclusion_proof"]
            .as_array()
            .unwrap()
            .iter()
            .map(|h| unhex(h.as_str().unwrap()))
            .collect();
        // Anyone can check it from the record's text and the signed root alone.
        let leaf = merkle::leaf_hash(p["record"].as_str().unwrap().as_bytes());
        let root = checkpoint::verify(p["checkpoint"].as_str().unwrap(), &key)
            .unwrap()
            .root;
        assert!(merkle::verify_inclusion(&leaf, 2, 7, &proof, &root));
        assert!(
            prove(&src(&path), 8, &key)
                .unwrap_err()
                .contains("not in the latest checkpoint")
        );
        assert_eq!(records(&src(&path)).unwrap().len(), 7);
    }

    #[test]
    fn a_tenants_export_proves_its_records_and_shows_no_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cascade.db");
        let log = AuditLog::open(&path, Some(signer()), "cascade.test/audit").unwrap();
        for i in 0..6 {
            let tenant = if i % 2 == 0 { "acme" } else { "globex" };
            log.append(tenant, "decision", json!({"secret_of": tenant, "n": i}))
                .unwrap();
        }
        log.checkpoint().unwrap();
        let key = signer().verifier_key();
        let e = export_tenant(&src(&path), "acme", &key).unwrap();
        let text = e.to_string();
        assert!(!text.contains("globex"), "{text}");
        let root = checkpoint::verify(e["checkpoint"].as_str().unwrap(), &key)
            .unwrap()
            .root;
        let recs = e["records"].as_array().unwrap();
        assert_eq!(recs.len(), 3);
        for r in recs {
            let proof: Vec<Hash> = r["inclusion_proof"]
                .as_array()
                .unwrap()
                .iter()
                .map(|h| {
                    let s = h.as_str().unwrap();
                    (0..32)
                        .map(|i| u8::from_str_radix(&s[2 * i..2 * i + 2], 16).unwrap())
                        .collect::<Vec<u8>>()
                        .try_into()
                        .unwrap()
                })
                .collect();
            let leaf = merkle::leaf_hash(r["record"].as_str().unwrap().as_bytes());
            let index = r["seq"].as_u64().unwrap() - 1;
            assert!(merkle::verify_inclusion(&leaf, index, 6, &proof, &root));
        }
    }

    #[test]
    fn an_altered_record_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cascade.db");
        let (_log, _) = log_with(dir.path(), 6);
        by_hand(
            &path,
            "UPDATE audit_log SET record = replace(record, 'g3.toml', 'evil.toml') WHERE seq = 4;",
        );
        let e = verify(&src(&path), &signer().verifier_key(), None).unwrap_err();
        assert!(e.contains("audit record 4 does not match"), "{e}");
    }

    #[test]
    fn a_record_rewritten_with_its_leaf_fails_the_signed_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cascade.db");
        let (_log, _) = log_with(dir.path(), 6);
        let forged = json!({"seq": 4, "at_unix_ms": 0, "tenant": "acme", "kind": "config_loaded", "body": {"file": "evil.toml"}}).to_string();
        let leaf = hex(&merkle::leaf_hash(forged.as_bytes()));
        by_hand(
            &path,
            &format!("UPDATE audit_log SET record = '{forged}', leaf = X'{leaf}' WHERE seq = 4;"),
        );
        let e = verify(&src(&path), &signer().verifier_key(), None).unwrap_err();
        assert!(
            e.contains("checkpoint at size 6 does not match the records"),
            "{e}"
        );
    }

    #[test]
    fn deleted_records_fail_against_a_saved_checkpoint_and_a_bad_signature_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cascade.db");
        let (log, saved) = log_with(dir.path(), 8);
        drop(log);
        // The last three records and every checkpoint go: the file alone looks consistent.
        by_hand(
            &path,
            "DELETE FROM audit_log WHERE seq > 5; DELETE FROM audit_checkpoints;",
        );
        let key = signer().verifier_key();
        assert_eq!(verify(&src(&path), &key, None).unwrap().records, 5);
        let e = verify(&src(&path), &key, Some(&saved)).unwrap_err();
        assert!(e.contains("fewer than the saved checkpoint's 8"), "{e}");
        // A checkpoint signed by another key, or edited, is refused.
        let other = Signer::from_seed("cascade.test/audit", &[9u8; 32]).unwrap();
        let e = verify(&src(&path), &other.verifier_key(), Some(&saved)).unwrap_err();
        assert!(e.contains("no valid signature"), "{e}");
        let edited = saved.replacen("\n8\n", "\n5\n", 1);
        assert!(verify(&src(&path), &key, Some(&edited)).is_err());
    }
}
