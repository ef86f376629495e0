//! The gRPC edge: generated code, conversions between the API's messages and the domain, and the
//! service, kept thin. Everything behind it is the library API of [`Orchestrator`](crate::Orchestrator).

mod convert;
mod service;

/// The generated `cascade.v1` messages, server and client.
pub mod pb {
    #![allow(clippy::all, missing_docs)]
    tonic::include_proto!("cascade.v1");

    /// The encoded descriptor set, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] =
        include_bytes!(concat!(env!("OUT_DIR"), "/cascade_descriptor.bin"));
}

pub use convert::{job_state_from_pb, job_state_to_pb, job_to_pb};
pub use service::CascadeService;
