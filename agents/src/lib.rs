//! The agent side of Cascade: the [`Agent`] trait every kind implements, the classified errors
//! agents return, and the built-in kinds (`template`, `sim`).
//!
//! This crate does not depend on the orchestrator: the orchestrator validates a graph file, hands
//! each agent's kind-specific fields to the [`Registry`], and calls the agents it gets back.

mod agent;
pub mod command;
mod duration;
pub mod http;
pub mod llm;
pub mod mcp;
pub mod mcp_host;
mod rate;
mod registry;
pub mod secret;
pub mod sim;
pub mod template;
pub mod tools;

pub use agent::{
    Agent, AgentError, AgentOutput, CallContext, ErrorClass, LimitReading, StepInput,
    UpstreamLimits, Usage,
};
pub use duration::HumanDuration;
pub use rate::{Gcra, Rate};
pub use registry::{
    AgentSpec, BuildFn, FieldError, KindSpec, Registry, Resources, UpstreamFn, no_upstream,
};
