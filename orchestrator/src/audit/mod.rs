//! The audit log's verifiable structure: a Merkle tree over its records (RFC 9162) and signed
//! checkpoints in the C2SP signed-note format.

pub mod checkpoint;
pub mod log;
pub mod merkle;
pub mod pg;
pub mod sink;

/// The SHA-256 of `bytes`, in hex (files named in audit records).
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

/// `bytes` in lower-case hex (hashes in audit records, proofs and key hashes).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}
