//! Counters per graph and agent, shared by the scheduler and the supervisor without messages.
//! They feed the `cascade run` summary, the API's graph state and, later, metrics.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering::Relaxed};

use serde::Serialize;

use crate::model::GraphModel;

#[derive(Debug)]
pub struct GraphStats {
    pub jobs_started: AtomicU64,
    pub jobs_succeeded: AtomicU64,
    pub jobs_failed: AtomicU64,
    pub jobs_cancelled: AtomicU64,
    pub agents: Vec<AgentStats>,
}

#[derive(Debug)]
pub struct AgentStats {
    pub name: std::sync::Arc<str>,
    /// Attempts started.
    pub calls: AtomicU64,
    pub succeeded: AtomicU64,
    /// Attempts that failed and were tried again.
    pub retries: AtomicU64,
    /// Steps that failed for good.
    pub failures: AtomicU64,
    /// Refusals as rate-limited (not counted as attempts).
    pub rate_limited: AtomicU64,
    pub panics: AtomicU64,
    pub restarts: AtomicU64,
    pub prompt_tokens: AtomicU64,
    pub completion_tokens: AtomicU64,
    /// Cost in micro-dollars (integer so that it can be an atomic).
    pub cost_micros: AtomicU64,
    /// Time spent in calls that returned, in microseconds.
    pub call_micros: AtomicU64,
    state: AtomicU8,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum AgentHealth {
    Running,
    /// Restarted too often within its window; its steps wait until it is started again.
    Failed,
}

impl GraphStats {
    pub fn new(model: &GraphModel) -> Self {
        Self {
            jobs_started: AtomicU64::new(0),
            jobs_succeeded: AtomicU64::new(0),
            jobs_failed: AtomicU64::new(0),
            jobs_cancelled: AtomicU64::new(0),
            agents: model
                .agents
                .iter()
                .map(|a| AgentStats {
                    name: a.name.clone(),
                    calls: AtomicU64::new(0),
                    succeeded: AtomicU64::new(0),
                    retries: AtomicU64::new(0),
                    failures: AtomicU64::new(0),
                    rate_limited: AtomicU64::new(0),
                    panics: AtomicU64::new(0),
                    restarts: AtomicU64::new(0),
                    prompt_tokens: AtomicU64::new(0),
                    completion_tokens: AtomicU64::new(0),
                    cost_micros: AtomicU64::new(0),
                    call_micros: AtomicU64::new(0),
                    state: AtomicU8::new(0),
                })
                .collect(),
        }
    }

    pub fn snapshot(&self) -> GraphStatsSnapshot {
        GraphStatsSnapshot {
            jobs_started: self.jobs_started.load(Relaxed),
            jobs_succeeded: self.jobs_succeeded.load(Relaxed),
            jobs_failed: self.jobs_failed.load(Relaxed),
            jobs_cancelled: self.jobs_cancelled.load(Relaxed),
            agents: self.agents.iter().map(AgentStats::snapshot).collect(),
        }
    }
}

impl AgentStats {
    pub fn set_health(&self, h: AgentHealth) {
        self.state.store(h as u8, Relaxed);
    }

    pub fn health(&self) -> AgentHealth {
        match self.state.load(Relaxed) {
            0 => AgentHealth::Running,
            _ => AgentHealth::Failed,
        }
    }

    fn snapshot(&self) -> AgentStatsSnapshot {
        AgentStatsSnapshot {
            name: self.name.to_string(),
            health: self.health(),
            calls: self.calls.load(Relaxed),
            succeeded: self.succeeded.load(Relaxed),
            retries: self.retries.load(Relaxed),
            failures: self.failures.load(Relaxed),
            rate_limited: self.rate_limited.load(Relaxed),
            panics: self.panics.load(Relaxed),
            restarts: self.restarts.load(Relaxed),
            prompt_tokens: self.prompt_tokens.load(Relaxed),
            completion_tokens: self.completion_tokens.load(Relaxed),
            cost_usd: self.cost_micros.load(Relaxed) as f64 / 1e6,
            mean_call_ms: {
                let returned = self.calls.load(Relaxed).max(1);
                self.call_micros.load(Relaxed) as f64 / 1e3 / returned as f64
            },
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct GraphStatsSnapshot {
    pub jobs_started: u64,
    pub jobs_succeeded: u64,
    pub jobs_failed: u64,
    pub jobs_cancelled: u64,
    pub agents: Vec<AgentStatsSnapshot>,
}

#[derive(Clone, Debug, Serialize)]
pub struct AgentStatsSnapshot {
    pub name: String,
    pub health: AgentHealth,
    pub calls: u64,
    pub succeeded: u64,
    pub retries: u64,
    pub failures: u64,
    pub rate_limited: u64,
    pub panics: u64,
    pub restarts: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
    pub mean_call_ms: f64,
}
