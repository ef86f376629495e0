//! Domain ↔ protobuf conversions, all in one place.

use std::time::SystemTime;

use cascade_agents::Usage;
use prost_types::Timestamp;

use super::pb;
use crate::job::{
    ApprovalOutcome, ApprovalView, Budget, CallbackDelivery, EventKind, JobEvent, JobRecord,
    JobState, StepRecord, StepState,
};
use crate::signal::{CauseInfo, CauseKey, GraphEvent, GraphEventKind};

pub(crate) fn ts(t: SystemTime) -> Timestamp {
    Timestamp::from(t)
}

fn ts_ms(ms: u64) -> Timestamp {
    Timestamp {
        seconds: (ms / 1000) as i64,
        nanos: ((ms % 1000) * 1_000_000) as i32,
    }
}

pub fn job_state_to_pb(s: JobState) -> pb::JobState {
    match s {
        JobState::Pending => pb::JobState::Pending,
        JobState::Running => pb::JobState::Running,
        JobState::AwaitingApproval => pb::JobState::AwaitingApproval,
        JobState::Succeeded => pb::JobState::Succeeded,
        JobState::Failed => pb::JobState::Failed,
        JobState::Cancelled => pb::JobState::Cancelled,
        JobState::BudgetExceeded => pb::JobState::BudgetExceeded,
    }
}

pub fn job_state_from_pb(s: pb::JobState) -> Option<JobState> {
    Some(match s {
        pb::JobState::Unspecified => return None,
        pb::JobState::Pending => JobState::Pending,
        pb::JobState::Running => JobState::Running,
        pb::JobState::AwaitingApproval => JobState::AwaitingApproval,
        pb::JobState::Succeeded => JobState::Succeeded,
        pb::JobState::Failed => JobState::Failed,
        pb::JobState::Cancelled => JobState::Cancelled,
        pb::JobState::BudgetExceeded => JobState::BudgetExceeded,
    })
}

fn step_state_to_pb(s: StepState) -> pb::StepState {
    match s {
        StepState::Waiting => pb::StepState::Waiting,
        StepState::Running => pb::StepState::Running,
        StepState::Retrying => pb::StepState::Retrying,
        StepState::Succeeded => pb::StepState::Succeeded,
        StepState::Failed => pb::StepState::Failed,
        StepState::Cancelled => pb::StepState::Cancelled,
        StepState::AwaitingApproval => pb::StepState::AwaitingApproval,
    }
}

fn usage(u: &Usage) -> pb::Usage {
    pb::Usage {
        prompt_tokens: u.prompt_tokens,
        completion_tokens: u.completion_tokens,
        cost_usd: u.cost_usd,
    }
}

fn step(s: &StepRecord) -> pb::Step {
    pb::Step {
        agent: s.agent.to_string(),
        state: step_state_to_pb(s.state) as i32,
        attempts: s.attempts,
        output_json: s.output.as_ref().map(|v| v.to_string()).unwrap_or_default(),
        error: s.error.clone().unwrap_or_default(),
        started_at: s.started_at.map(ts),
        finished_at: s.finished_at.map(ts),
        usage: Some(usage(&s.usage)),
        sub_steps: s.sub_steps.iter().map(sub_step_to_pb).collect(),
    }
}

fn callback(url: &str, c: Option<&CallbackDelivery>) -> pb::CallbackDelivery {
    pb::CallbackDelivery {
        url: url.to_string(),
        attempts: c.map_or(0, |c| c.attempts),
        delivered: c.is_some_and(|c| c.delivered),
        last_error: c.and_then(|c| c.last_error.clone()).unwrap_or_default(),
        delivered_at: c.and_then(|c| c.delivered_at).map(ts),
    }
}

pub fn job_to_pb(r: &JobRecord) -> pb::Job {
    pb::Job {
        job_id: r.id.to_string(),
        graph: r.graph.to_string(),
        state: job_state_to_pb(r.state) as i32,
        input_json: r.input.to_string(),
        output_json: r.output.as_ref().map(|v| v.to_string()).unwrap_or_default(),
        error: r.error.clone().unwrap_or_default(),
        steps: r.steps.iter().map(step).collect(),
        created_at: Some(ts(r.created_at)),
        updated_at: Some(ts(r.updated_at)),
        labels: r.labels.clone().into_iter().collect(),
        usage: Some(usage(&r.usage)),
        idempotency_key: r.idempotency_key.clone().unwrap_or_default(),
        started_at: r.started_at.map(ts),
        finished_at: r.finished_at.map(ts),
        callback: r
            .callback_url
            .as_deref()
            .map(|u| callback(&crate::text::without_credentials(u), r.callback.as_deref())),
        budget: r.budget.map(budget_to_pb),
        tenant: r.tenant.clone(),
    }
}

pub(crate) fn budget_to_pb(b: Budget) -> pb::Budget {
    pb::Budget {
        max_tokens: b.max_tokens,
        max_cost_usd: b.max_cost_usd,
    }
}

pub(crate) fn budget_from_pb(b: &pb::Budget) -> Budget {
    Budget {
        max_tokens: b.max_tokens,
        max_cost_usd: b.max_cost_usd,
    }
}

pub(crate) fn event_to_pb(e: &JobEvent) -> pb::JobEvent {
    let mut out = pb::JobEvent {
        job_id: e.job_id.to_string(),
        seq: e.seq,
        at: Some(ts(e.at)),
        ..Default::default()
    };
    match &e.kind {
        EventKind::Submitted => out.kind = "submitted".into(),
        EventKind::Started => out.kind = "started".into(),
        EventKind::StepStarted { agent, attempt } => {
            out.kind = "step_started".into();
            out.agent = agent.to_string();
            out.attempt = *attempt;
        }
        EventKind::StepRetrying {
            agent,
            attempt,
            delay_ms,
            error,
        } => {
            out.kind = "step_retrying".into();
            out.agent = agent.to_string();
            out.attempt = *attempt;
            out.retry_delay_ms = *delay_ms;
            out.error = error.clone();
        }
        EventKind::StepSucceeded {
            agent,
            attempt,
            usage: u,
        } => {
            out.kind = "step_succeeded".into();
            out.agent = agent.to_string();
            out.attempt = *attempt;
            out.usage = Some(usage(u));
        }
        EventKind::StepFailed {
            agent,
            attempt,
            error,
        } => {
            out.kind = "step_failed".into();
            out.agent = agent.to_string();
            out.attempt = *attempt;
            out.error = error.clone();
        }
        EventKind::Finished { state, error } => {
            out.kind = "finished".into();
            out.state = job_state_to_pb(*state) as i32;
            out.error = error.clone().unwrap_or_default();
        }
        EventKind::CallbackDelivered {
            attempts, error, ..
        } => {
            out.kind = "callback_delivered".into();
            out.attempt = *attempts;
            out.error = error.clone().unwrap_or_default();
        }
        EventKind::ApprovalRequested {
            agent,
            approval_id,
            sha256,
        } => {
            out.kind = "approval_requested".into();
            out.agent = agent.to_string();
            out.approval_id = approval_id.clone();
            out.proposal_sha256 = sha256.clone();
        }
        EventKind::Parked { reason } => {
            out.kind = "parked".into();
            out.reason = reason.clone();
        }
        EventKind::BudgetExceeded { agent, message } => {
            out.kind = "budget_exceeded".into();
            out.agent = agent.to_string();
            out.reason = message.clone();
        }
        EventKind::BudgetRaised {
            max_tokens,
            max_cost_usd,
        } => {
            out.kind = "budget_raised".into();
            out.reason = serde_json::to_string(&Budget {
                max_tokens: *max_tokens,
                max_cost_usd: *max_cost_usd,
            })
            .unwrap_or_default();
        }
        EventKind::ApprovalDecided {
            agent,
            outcome,
            approver,
            reason,
        } => {
            out.kind = "approval_decided".into();
            out.agent = agent.to_string();
            out.outcome = outcome.as_str().into();
            out.approver = approver.clone();
            out.reason = reason.clone();
        }
        EventKind::SubStep {
            agent,
            n,
            kind,
            state,
            tool,
        } => {
            out.kind = "sub_step".into();
            out.agent = agent.to_string();
            out.sub_step = *n;
            out.sub_step_kind = kind.as_str().into();
            out.sub_step_state = state.as_str().into();
            out.reason = tool.clone().unwrap_or_default();
        }
    }
    out
}

pub(crate) fn sub_step_to_pb(s: &crate::job::SubStep) -> pb::SubStep {
    pb::SubStep {
        n: s.n,
        kind: s.kind.as_str().into(),
        state: s.state.as_str().into(),
        started_at: Some(ts(s.started_at)),
        finished_at: s.finished_at.map(ts),
        text: s.text.clone(),
        tool: if s.server.is_empty() {
            String::new()
        } else {
            format!("{}.{}", s.server, s.tool)
        },
        arguments_json: s
            .call
            .as_ref()
            .map(|c| c.arguments.to_string())
            .unwrap_or_default(),
        tool_calls: s.tool_calls.iter().map(|c| c.name.clone()).collect(),
        result_bytes: s.result_bytes,
        usage: Some(usage(&s.usage)),
        error: s.error.clone().unwrap_or_default(),
    }
}

pub(crate) fn approval_to_pb(v: &ApprovalView) -> pb::Approval {
    let a = &v.approval;
    let state = match a.decision.as_ref().map(|d| d.outcome) {
        None => pb::ApprovalState::Pending,
        Some(ApprovalOutcome::Approved) => pb::ApprovalState::Approved,
        Some(ApprovalOutcome::Rejected) => pb::ApprovalState::Rejected,
        Some(ApprovalOutcome::Expired) => pb::ApprovalState::Expired,
    };
    pb::Approval {
        approval_id: a.id.clone(),
        job_id: v.job_id.to_string(),
        graph: v.graph.to_string(),
        agent: v.agent.to_string(),
        state: state as i32,
        proposal_json: a.proposal.to_string(),
        proposal_sha256: a.sha256.clone(),
        created_at: Some(ts(a.created_at)),
        expires_at: a.expires_at.map(ts),
        approver: a
            .decision
            .as_ref()
            .map(|d| d.approver.clone())
            .unwrap_or_default(),
        reason: a
            .decision
            .as_ref()
            .map(|d| d.reason.clone())
            .unwrap_or_default(),
        decided_at: a.decision.as_ref().map(|d| ts(d.at)),
        job_state: job_state_to_pb(v.job_state) as i32,
        tenant: v.tenant.clone(),
    }
}

pub(crate) fn cause_to_pb((key, info): &(CauseKey, CauseInfo)) -> pb::PauseCause {
    pb::PauseCause {
        quota: match key {
            CauseKey::Quota { quota } => quota.to_string(),
            CauseKey::AgentFailed { agent, .. } => format!("agent:{agent}"),
        },
        until: info.until_unix_ms.map(ts_ms),
        reason: info.reason.to_string(),
    }
}

pub(crate) fn graph_event_to_pb(e: &GraphEvent) -> pb::GraphEvent {
    let mut out = pb::GraphEvent {
        graph: e.graph.as_deref().unwrap_or_default().to_string(),
        at: Some(ts(e.at)),
        ..Default::default()
    };
    match &e.kind {
        GraphEventKind::AgentPaused { agent, causes, .. } => {
            out.kind = "agent_paused".into();
            out.agent = agent.to_string();
            out.causes = causes.iter().map(cause_to_pb).collect();
        }
        GraphEventKind::AgentResumed { agent } => {
            out.kind = "agent_resumed".into();
            out.agent = agent.to_string();
        }
        GraphEventKind::QuotaExhausted {
            quota,
            until_unix_ms,
            reason,
        } => {
            out.kind = "quota_exhausted".into();
            out.quota = quota.to_string();
            out.until = Some(ts_ms(*until_unix_ms));
            out.reason = reason.clone();
        }
        GraphEventKind::QuotaAvailable { quota } => {
            out.kind = "quota_available".into();
            out.quota = quota.to_string();
        }
        GraphEventKind::CircuitChanged { quota, state } => {
            out.kind = "circuit_changed".into();
            out.quota = quota.to_string();
            out.circuit = serde_json::to_value(state)
                .ok()
                .and_then(|v| v.as_str().map(String::from))
                .unwrap_or_default();
        }
        GraphEventKind::AgentFailed { agent } => {
            out.kind = "agent_failed".into();
            out.agent = agent.to_string();
        }
        GraphEventKind::AgentRestarted { agent } => {
            out.kind = "agent_restarted".into();
            out.agent = agent.to_string();
        }
    }
    out
}
