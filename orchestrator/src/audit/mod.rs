//! The audit log's verifiable structure: a Merkle tree over its records (RFC 9162) and signed
//! checkpoints in the C2SP signed-note format.

pub mod checkpoint;
pub mod log;
pub mod merkle;
