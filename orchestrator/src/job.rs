//! Jobs, steps and their events: the records the store keeps and the API returns. State changes
//! are applied by one pure function ([`JobRecord::apply`]) so that every store agrees on them.

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use cascade_agents::Usage;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use smallvec::SmallVec;
use uuid::Uuid;

/// A job's id: a UUIDv7, so ids sort by creation time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub Uuid);

impl JobId {
    pub fn new() -> Self {
        Self(Uuid::now_v7())
    }
}

impl Default for JobId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for JobId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Uuid::parse_str(s.trim()).map(Self).map_err(|e| {
            format!(
                "invalid job id {}: {e}; job ids are UUIDs as returned by submit",
                crate::text::echo(s)
            )
        })
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    Pending,
    Running,
    AwaitingApproval,
    Succeeded,
    Failed,
    Cancelled,
    /// Its next step would spend more than its budget: parked until the budget is raised (or
    /// the job cancelled).
    BudgetExceeded,
}

impl JobState {
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Cancelled)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Running => "running",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::BudgetExceeded => "budget_exceeded",
        }
    }

    /// Waiting out of its graph's run for a person: a decision or a larger budget.
    pub fn is_parked(self) -> bool {
        matches!(self, Self::AwaitingApproval | Self::BudgetExceeded)
    }
}

impl fmt::Display for JobState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepState {
    /// Its dependencies have not all succeeded yet.
    Waiting,
    Running,
    /// Failed an attempt and waits to try again.
    Retrying,
    Succeeded,
    Failed,
    /// The job ended before this step could run.
    Cancelled,
    /// Its call is prepared and waits for a person's decision.
    AwaitingApproval,
}

impl StepState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Waiting => "waiting",
            Self::Running => "running",
            Self::Retrying => "retrying",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::AwaitingApproval => "awaiting_approval",
        }
    }
}

/// What a job may spend: tokens (prompt + completion) and dollars, across all its steps.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Budget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost_usd: Option<f64>,
}

impl Budget {
    pub fn is_empty(&self) -> bool {
        self.max_tokens.is_none() && self.max_cost_usd.is_none()
    }

    /// A job's budget within its graph's: each limit the job sets must not be above the
    /// graph's (a job may lower its graph's budget, never raise it).
    pub fn within(self, graph: Budget) -> Result<Budget, String> {
        if let (Some(j), Some(g)) = (self.max_tokens, graph.max_tokens)
            && j > g
        {
            return Err(format!(
                "budget.max_tokens {j} is above the graph's {g}: a job may lower its graph's budget, not raise it"
            ));
        }
        if let (Some(j), Some(g)) = (self.max_cost_usd, graph.max_cost_usd)
            && j > g
        {
            return Err(format!(
                "budget.max_cost_usd {j} is above the graph's {g}: a job may lower its graph's budget, not raise it"
            ));
        }
        if self.max_cost_usd.is_some_and(|c| !c.is_finite() || c < 0.0) {
            return Err("budget.max_cost_usd must be a non-negative number of dollars".into());
        }
        Ok(Budget {
            max_tokens: self.max_tokens.or(graph.max_tokens),
            max_cost_usd: self.max_cost_usd.or(graph.max_cost_usd),
        })
    }

    /// The limit a step expected to spend `next` would pass, with `spent` spent (or reserved)
    /// already.
    pub fn breach(&self, spent: &Usage, next: &Usage) -> Option<Breach> {
        if let Some(max) = self.max_tokens {
            let (s, n) = (spent.total_tokens(), next.total_tokens());
            if s.saturating_add(n) > max {
                return Some(Breach {
                    budget: "max_tokens",
                    limit: max as f64,
                    spent: s as f64,
                    next: n as f64,
                });
            }
        }
        if let Some(max) = self.max_cost_usd
            && spent.cost_usd + next.cost_usd > max + 1e-12
        {
            return Some(Breach {
                budget: "max_cost_usd",
                limit: max,
                spent: spent.cost_usd,
                next: next.cost_usd,
            });
        }
        None
    }
}

/// A budget a step would pass.
#[derive(Clone, Debug, PartialEq)]
pub struct Breach {
    /// `"max_tokens"` or `"max_cost_usd"`.
    pub budget: &'static str,
    pub limit: f64,
    /// Spent (and reserved by calls under way) so far.
    pub spent: f64,
    /// What the step would spend at most.
    pub next: f64,
}

impl Breach {
    /// What the job's record says, naming the budget, its limit and the usage so far.
    pub fn message(&self, agent: &str) -> String {
        let fmt = |v: f64| {
            if self.budget == "max_cost_usd" {
                format!("${v:.4}")
            } else {
                format!("{v:.0} tokens")
            }
        };
        format!(
            "budget {} of {} exceeded: {} spent so far, and step {agent:?} may spend up to {} more; raise it (cascade jobs raise-budget, RaiseJobBudget) or cancel the job",
            self.budget,
            fmt(self.limit),
            fmt(self.spent),
            fmt(self.next)
        )
    }
}

/// A step's prepared call waiting for, or decided by, a person (semantics 10). It belongs to its
/// step's record, so it is stored, recovered and kept exactly as long as its job.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Approval {
    /// `<job>/<agent>`.
    pub id: String,
    /// The prepared call as canonical JSON (keys sorted, no whitespace): exactly the text an
    /// approver is shown, and what runs once approved.
    pub proposal: Arc<str>,
    /// Lower-case hex SHA-256 of `proposal`'s bytes.
    pub sha256: String,
    pub created_at: SystemTime,
    /// When it is rejected if nobody decided (`approval_timeout`).
    pub expires_at: Option<SystemTime>,
    pub decision: Option<ApprovalDecision>,
    /// The tool call of a tool-using step's journal (its `n`) this approval is for; a rejection
    /// of one goes back to the model as the tool's result instead of failing the step.
    #[serde(default)]
    pub sub_step: Option<u32>,
}

impl Approval {
    pub fn is_pending(&self) -> bool {
        self.decision.is_none()
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ApprovalOutcome {
    Approved,
    Rejected,
    /// Nobody decided within `approval_timeout`: a rejection, never an approval.
    Expired,
}

impl ApprovalOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Approved => "approved",
            Self::Rejected => "rejected",
            Self::Expired => "expired",
        }
    }
}

impl fmt::Display for ApprovalOutcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ApprovalDecision {
    pub outcome: ApprovalOutcome,
    /// Who decided (`"timeout"` for an expiry).
    pub approver: String,
    pub reason: String,
    pub at: SystemTime,
}

/// An approval with the job and step it belongs to.
#[derive(Clone, Debug, PartialEq)]
pub struct ApprovalView {
    pub job_id: JobId,
    pub graph: Arc<str>,
    pub agent: Arc<str>,
    pub step: usize,
    pub tenant: String,
    pub job_state: JobState,
    pub approval: Approval,
}

impl ApprovalView {
    /// Every approval a job's record holds, in step order.
    pub fn of(r: &JobRecord) -> impl Iterator<Item = ApprovalView> + '_ {
        r.steps.iter().enumerate().filter_map(|(i, s)| {
            s.approval.as_ref().map(|a| ApprovalView {
                job_id: r.id,
                graph: r.graph.clone(),
                agent: s.agent.clone(),
                step: i,
                tenant: r.tenant.clone(),
                job_state: r.state,
                approval: (**a).clone(),
            })
        })
    }
}

/// One agent's work for one job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StepRecord {
    pub agent: Arc<str>,
    pub state: StepState,
    pub attempts: u32,
    pub output: Option<Arc<Value>>,
    pub error: Option<String>,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub usage: Usage,
    /// Its prepared call's approval, for an agent that needs one. Always written (a frozen job is
    /// encoded by position); absent in older documents.
    #[serde(default)]
    pub approval: Option<Box<Approval>>,
    /// A tool-using step's journal: each model turn and each tool call, in order.
    #[serde(default)]
    pub sub_steps: Vec<SubStep>,
}

/// What one entry of a tool-using step's journal is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubStepKind {
    /// A model turn.
    Turn,
    /// A tool call the model asked for.
    ToolCall,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubStepState {
    Running,
    Succeeded,
    /// The call answered an error, which the model reads as the tool's result.
    Failed,
    AwaitingApproval,
    /// A person rejected it (or nobody decided in time); the model reads that as its result.
    Rejected,
}

impl SubStepState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Running => "running",
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::AwaitingApproval => "awaiting_approval",
            Self::Rejected => "rejected",
        }
    }

    /// Whether the model has its result (it will not be made again).
    pub fn is_done(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed | Self::Rejected)
    }
}

impl SubStepKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Turn => "turn",
            Self::ToolCall => "tool_call",
        }
    }
}

/// One entry of a tool-using step's journal, recorded before the next one starts. Its
/// idempotency key is `<job>/<agent>/<n>`. Flat, with no tagged enum, because a frozen job is
/// encoded by position.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SubStep {
    /// From 1, in the order they were made.
    pub n: u32,
    pub kind: SubStepKind,
    pub state: SubStepState,
    pub started_at: SystemTime,
    pub finished_at: Option<SystemTime>,
    /// A turn: what the model said. A tool call: its result as the model reads it (cut to the
    /// agent's `max_tool_result_bytes`).
    pub text: String,
    /// A turn: the tool calls it asked for.
    pub tool_calls: Vec<cascade_agents::tools::ToolCall>,
    /// A tool call: the model's call (its id, the tool's name as the model saw it, arguments).
    pub call: Option<cascade_agents::tools::ToolCall>,
    /// A tool call: its MCP server and tool.
    pub server: String,
    pub tool: String,
    /// A tool call: the result's size before it was cut, in bytes.
    pub result_bytes: u64,
    /// A turn: the tokens it spent and what they cost.
    pub usage: Usage,
    /// Why it failed or was rejected.
    pub error: Option<String>,
}

/// The stored event that repeats of a step's start or retry fold into.
#[derive(Clone, Debug, PartialEq)]
pub struct Repeat {
    pub seq: u64,
    pub first_at: SystemTime,
    pub count: u32,
    pub retrying: bool,
    pub attempt: u32,
}

/// What the store keeps of a job.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobRecord {
    pub id: JobId,
    pub graph: Arc<str>,
    pub state: JobState,
    pub input: Arc<Value>,
    pub output: Option<Arc<Value>>,
    pub error: Option<String>,
    /// One per agent of the graph, in the graph's (topological) order.
    pub steps: Vec<StepRecord>,
    pub labels: BTreeMap<String, String>,
    pub idempotency_key: Option<String>,
    pub created_at: SystemTime,
    pub started_at: Option<SystemTime>,
    pub finished_at: Option<SystemTime>,
    pub updated_at: SystemTime,
    pub usage: Usage,
    /// Number of events recorded so far (the last event's `seq`).
    pub events: u64,
    /// Events not kept in the job's log because it held `max_events_per_job` already.
    /// Always written (a frozen job is encoded by position, where a skipped field would shift
    /// the rest); absent in older documents.
    #[serde(default)]
    pub events_dropped: u64,
    /// This job's own deadline, overriding the graph's.
    pub deadline: Option<Duration>,
    /// Where to POST the outcome when the job ends, and how that went.
    pub callback_url: Option<String>,
    /// Boxed: most jobs have none, and every job in flight would carry its room.
    pub callback: Option<Box<CallbackDelivery>>,
    /// Scope of the idempotency key.
    pub tenant: String,
    /// What it may spend (its graph's, lowered by the submission, raised by an operator).
    /// Always written (a frozen job is encoded by position); absent in older documents.
    #[serde(default)]
    pub budget: Option<Budget>,
    /// Each step's last event, while repeats of it are folded into it (a refused call that
    /// starts again at the same attempt, a retry of the same attempt): not stored, rebuilt as it
    /// goes. Only steps that started or retry have one, so it is kept here rather than on every
    /// step (it was 200 bytes of every job in flight).
    #[serde(skip)]
    pub repeats: SmallVec<[(usize, Repeat); 1]>,
}

/// The delivery of a job's completion callback.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct CallbackDelivery {
    pub attempts: u32,
    pub delivered: bool,
    pub last_error: Option<String>,
    pub delivered_at: Option<SystemTime>,
}

impl JobRecord {
    /// A new pending job of a graph whose agents are `agents`.
    pub fn new(
        id: JobId,
        graph: Arc<str>,
        agents: &[Arc<str>],
        input: Arc<Value>,
        now: SystemTime,
    ) -> Self {
        Self {
            id,
            graph,
            state: JobState::Pending,
            input,
            output: None,
            error: None,
            steps: agents
                .iter()
                .map(|a| StepRecord {
                    agent: a.clone(),
                    state: StepState::Waiting,
                    attempts: 0,
                    output: None,
                    error: None,
                    started_at: None,
                    finished_at: None,
                    usage: Usage::default(),
                    approval: None,
                    sub_steps: Vec::new(),
                })
                .collect(),
            labels: BTreeMap::new(),
            idempotency_key: None,
            created_at: now,
            started_at: None,
            finished_at: None,
            updated_at: now,
            usage: Usage::default(),
            events: 0,
            events_dropped: 0,
            deadline: None,
            callback_url: None,
            callback: None,
            tenant: String::new(),
            budget: None,
            repeats: SmallVec::new(),
        }
    }

    /// The event that repeats of step `i` fold into, if any.
    pub fn repeat_of(&self, i: usize) -> Option<&Repeat> {
        self.repeats.iter().find(|(s, _)| *s == i).map(|(_, r)| r)
    }

    fn set_repeat(&mut self, i: usize, r: Option<Repeat>) {
        let at = self.repeats.iter().position(|(s, _)| *s == i);
        match (at, r) {
            (Some(k), Some(r)) => self.repeats[k].1 = r,
            (Some(k), None) => {
                self.repeats.swap_remove(k);
            }
            (None, Some(r)) => self.repeats.push((i, r)),
            (None, None) => {}
        }
    }

    /// Whether a step's approval waits for a decision.
    pub fn awaits_decision(&self) -> bool {
        !self.state.is_terminal()
            && self
                .steps
                .iter()
                .any(|s| s.approval.as_ref().is_some_and(|a| a.is_pending()))
    }

    /// Approvals of the job waiting for a decision.
    pub fn pending_approvals(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| s.approval.as_ref().is_some_and(|a| a.is_pending()))
            .count()
    }

    /// The earliest time an undecided approval of the job expires.
    pub fn approval_expiry(&self) -> Option<SystemTime> {
        self.steps
            .iter()
            .filter_map(|s| s.approval.as_ref())
            .filter(|a| a.is_pending())
            .filter_map(|a| a.expires_at)
            .min()
    }

    /// Wall-clock time from start to finish, once finished.
    pub fn run_time(&self) -> Option<Duration> {
        self.finished_at?.duration_since(self.started_at?).ok()
    }

    /// Apply an update and return the event it makes. Updates that no longer apply (a step
    /// result for a job already finished) return `None` and change nothing.
    pub fn apply(&mut self, update: JobUpdate, now: SystemTime) -> Option<JobEvent> {
        // A finished job takes no more changes but the record of its callback's delivery.
        if let JobUpdate::Callback(delivery) = update {
            self.callback = Some(Box::new(delivery.clone()));
            self.updated_at = now;
            self.events += 1;
            return Some(JobEvent {
                job_id: self.id,
                seq: self.events,
                at: now,
                count: 1,
                last_at: None,
                kind: EventKind::CallbackDelivered {
                    delivered: delivery.delivered,
                    attempts: delivery.attempts,
                    error: delivery.last_error,
                },
            });
        }
        if self.state.is_terminal() {
            return None;
        }
        // Which step the update is about, and whether it repeats that step's last event.
        let (step, repeat) = match &update {
            JobUpdate::StepStarted { step, attempt } => (Some(*step), Some((false, *attempt))),
            JobUpdate::StepRetrying { step, attempt, .. } => (Some(*step), Some((true, *attempt))),
            JobUpdate::StepSucceeded { step, .. } | JobUpdate::StepFailed { step, .. } => {
                (Some(*step), None)
            }
            _ => (None, None),
        };
        let folded = match (step, repeat) {
            (Some(i), Some((retrying, attempt))) => self
                .repeat_of(i)
                .filter(|r| r.retrying == retrying && r.attempt == attempt)
                .cloned(),
            _ => None,
        };
        let kind = match update {
            JobUpdate::Started => {
                self.state = JobState::Running;
                self.started_at.get_or_insert(now);
                EventKind::Started
            }
            JobUpdate::StepStarted { step, attempt } => {
                let s = self.steps.get_mut(step)?;
                s.state = StepState::Running;
                s.attempts = attempt;
                s.started_at.get_or_insert(now);
                EventKind::StepStarted {
                    agent: s.agent.clone(),
                    attempt,
                }
            }
            JobUpdate::StepRetrying {
                step,
                attempt,
                delay,
                error,
            } => {
                let s = self.steps.get_mut(step)?;
                s.state = StepState::Retrying;
                s.error = Some(error.clone());
                EventKind::StepRetrying {
                    agent: s.agent.clone(),
                    attempt,
                    delay_ms: delay.as_millis() as u64,
                    error,
                }
            }
            JobUpdate::StepSucceeded {
                step,
                attempt,
                output,
                usage,
            } => {
                let s = self.steps.get_mut(step)?;
                s.state = StepState::Succeeded;
                s.attempts = attempt;
                s.output = Some(output);
                s.error = None;
                s.finished_at = Some(now);
                s.usage = usage;
                // A tool loop's turns were counted in the job's usage as they were journaled.
                if s.sub_steps.is_empty() {
                    self.usage.add(&usage);
                }
                EventKind::StepSucceeded {
                    agent: s.agent.clone(),
                    attempt,
                    usage,
                }
            }
            JobUpdate::StepFailed {
                step,
                attempt,
                error,
            } => {
                let s = self.steps.get_mut(step)?;
                s.state = StepState::Failed;
                s.attempts = attempt;
                s.error = Some(error.clone());
                s.finished_at = Some(now);
                EventKind::StepFailed {
                    agent: s.agent.clone(),
                    attempt,
                    error,
                }
            }
            JobUpdate::Finished {
                state,
                output,
                error,
            } => {
                self.state = state;
                self.output = output;
                self.error = error.clone();
                self.finished_at = Some(now);
                self.started_at.get_or_insert(now);
                for s in &mut self.steps {
                    if !matches!(s.state, StepState::Succeeded | StepState::Failed) {
                        s.state = StepState::Cancelled;
                    }
                }
                EventKind::Finished { state, error }
            }
            JobUpdate::Proposed { step, approval } => {
                let s = self.steps.get_mut(step)?;
                s.state = StepState::AwaitingApproval;
                let event = EventKind::ApprovalRequested {
                    agent: s.agent.clone(),
                    approval_id: approval.id.clone(),
                    sha256: approval.sha256.clone(),
                };
                s.approval = Some(approval);
                event
            }
            JobUpdate::Parked => {
                let waiting: Vec<&str> = self
                    .steps
                    .iter()
                    .filter(|s| s.state == StepState::AwaitingApproval)
                    .map(|s| &*s.agent)
                    .collect();
                if waiting.is_empty() {
                    return None;
                }
                self.state = JobState::AwaitingApproval;
                EventKind::Parked {
                    reason: format!("awaiting approval of {}", waiting.join(", ")),
                }
            }
            JobUpdate::BudgetExceeded { agent, message } => {
                self.state = JobState::BudgetExceeded;
                self.error = Some(message.clone());
                EventKind::BudgetExceeded { agent, message }
            }
            JobUpdate::BudgetRaised { budget } => {
                self.budget = Some(budget);
                if self.state == JobState::BudgetExceeded {
                    self.error = None;
                    self.state = if self
                        .steps
                        .iter()
                        .any(|s| s.state == StepState::AwaitingApproval)
                    {
                        JobState::AwaitingApproval
                    } else {
                        JobState::Pending
                    };
                }
                EventKind::BudgetRaised {
                    max_tokens: budget.max_tokens,
                    max_cost_usd: budget.max_cost_usd,
                }
            }
            JobUpdate::Decided { step, decision } => {
                let s = self.steps.get_mut(step)?;
                let a = s.approval.as_mut().filter(|a| a.is_pending())?;
                a.decision = Some(decision.clone());
                // A tool call's rejection goes back to the model: its step goes on either way.
                let goes_on = decision.outcome == ApprovalOutcome::Approved || a.sub_step.is_some();
                if goes_on {
                    s.state = StepState::Waiting;
                }
                let event = EventKind::ApprovalDecided {
                    agent: s.agent.clone(),
                    outcome: decision.outcome,
                    approver: decision.approver,
                    reason: decision.reason,
                };
                // A parked job with nothing left to decide waits for its graph again.
                if self.state == JobState::AwaitingApproval
                    && goes_on
                    && !self
                        .steps
                        .iter()
                        .any(|s| s.state == StepState::AwaitingApproval)
                {
                    self.state = JobState::Pending;
                }
                event
            }
            JobUpdate::SubStep { step, sub } => {
                let s = self.steps.get_mut(step)?;
                let event = EventKind::SubStep {
                    agent: s.agent.clone(),
                    n: sub.n,
                    kind: sub.kind,
                    state: sub.state,
                    tool: (sub.kind == SubStepKind::ToolCall)
                        .then(|| format!("{}.{}", sub.server, sub.tool)),
                };
                match s.sub_steps.iter_mut().find(|x| x.n == sub.n) {
                    Some(x) => *x = *sub,
                    None => {
                        // A model turn's tokens are the job's as soon as it answered (and its
                        // budget's, whatever happens to the step).
                        if sub.kind == SubStepKind::Turn {
                            self.usage.add(&sub.usage);
                        }
                        s.sub_steps.push(*sub)
                    }
                }
                event
            }
            JobUpdate::Callback(_) => unreachable!("handled above"),
        };
        self.updated_at = now;
        // A storm of refusals or retries of one step is one record, however long it lasts: the
        // repeat keeps the first event's seq and time and counts the rest.
        if let (Some(i), Some(mut r)) = (step, folded) {
            r.count = r.count.saturating_add(1);
            let event = JobEvent {
                job_id: self.id,
                seq: r.seq,
                at: r.first_at,
                count: r.count,
                last_at: Some(now),
                kind,
            };
            self.set_repeat(i, Some(r));
            return Some(event);
        }
        self.events += 1;
        if let Some(i) = step.filter(|&i| i < self.steps.len()) {
            let r = repeat.map(|(retrying, attempt)| Repeat {
                seq: self.events,
                first_at: now,
                count: 1,
                retrying,
                attempt,
            });
            self.set_repeat(i, r);
        }
        Some(JobEvent {
            job_id: self.id,
            seq: self.events,
            at: now,
            count: 1,
            last_at: None,
            kind,
        })
    }
}

/// A change to a job, applied by the store.
#[derive(Clone, Debug)]
pub enum JobUpdate {
    Started,
    StepStarted {
        step: usize,
        attempt: u32,
    },
    StepRetrying {
        step: usize,
        attempt: u32,
        delay: Duration,
        error: String,
    },
    StepSucceeded {
        step: usize,
        attempt: u32,
        output: Arc<Value>,
        usage: Usage,
    },
    StepFailed {
        step: usize,
        attempt: u32,
        error: String,
    },
    Finished {
        state: JobState,
        output: Option<Arc<Value>>,
        error: Option<String>,
    },
    /// The outcome of delivering the completion callback (also on a finished job).
    Callback(CallbackDelivery),
    /// Step `step`'s call is prepared and waits for a decision.
    Proposed {
        step: usize,
        approval: Box<Approval>,
    },
    /// Nothing of the job can go on until a decision: it leaves its graph's run (awaiting
    /// approval, holding no slot). Does not apply if no step awaits a decision.
    Parked,
    /// Step `agent` would pass the job's budget: the job leaves its graph's run until the
    /// budget is raised.
    BudgetExceeded {
        agent: Arc<str>,
        message: String,
    },
    /// The job's budget is now `budget`; a job stopped by its budget is pending again.
    BudgetRaised {
        budget: Budget,
    },
    /// A decision on step `step`'s pending approval (none if it was decided already). An
    /// approval of a parked job's last pending one makes the job pending again.
    Decided {
        step: usize,
        decision: ApprovalDecision,
    },
    /// An entry of step `step`'s journal, new or changed (by its `n`).
    SubStep {
        step: usize,
        sub: Box<SubStep>,
    },
}

/// Something that happened to a job; `seq` counts from 1 per job, so a watcher can replay the
/// stored events and then follow live ones without gaps or repeats.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct JobEvent {
    pub job_id: JobId,
    pub seq: u64,
    /// When it happened first.
    pub at: SystemTime,
    /// How many times it happened: repeats of a step's start (a refused call started again) or
    /// of its retry fold into one event, which keeps its `seq`.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub count: u32,
    /// When it happened last, if more than once.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_at: Option<SystemTime>,
    #[serde(flatten)]
    pub kind: EventKind,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum EventKind {
    Submitted,
    Started,
    StepStarted {
        agent: Arc<str>,
        attempt: u32,
    },
    StepRetrying {
        agent: Arc<str>,
        attempt: u32,
        delay_ms: u64,
        error: String,
    },
    StepSucceeded {
        agent: Arc<str>,
        attempt: u32,
        usage: Usage,
    },
    StepFailed {
        agent: Arc<str>,
        attempt: u32,
        error: String,
    },
    Finished {
        state: JobState,
        error: Option<String>,
    },
    CallbackDelivered {
        delivered: bool,
        attempts: u32,
        error: Option<String>,
    },
    ApprovalRequested {
        agent: Arc<str>,
        approval_id: String,
        sha256: String,
    },
    Parked {
        reason: String,
    },
    ApprovalDecided {
        agent: Arc<str>,
        outcome: ApprovalOutcome,
        approver: String,
        reason: String,
    },
    BudgetExceeded {
        agent: Arc<str>,
        message: String,
    },
    BudgetRaised {
        max_tokens: Option<u64>,
        max_cost_usd: Option<f64>,
    },
    /// An entry of a tool-using step's journal started, ended or waits.
    SubStep {
        agent: Arc<str>,
        n: u32,
        kind: SubStepKind,
        state: SubStepState,
        /// A tool call's `server.tool`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        tool: Option<String>,
    },
}

impl EventKind {
    pub fn is_final(&self) -> bool {
        matches!(self, Self::Finished { .. })
    }
}

fn one() -> u32 {
    1
}

fn is_one(n: &u32) -> bool {
    *n == 1
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn apply_walks_a_job_through_its_states() {
        let now = crate::clock::now();
        let mut r = JobRecord::new(
            JobId::new(),
            "g".into(),
            &["a".into(), "b".into()],
            Arc::new(json!({})),
            now,
        );
        assert_eq!(r.apply(JobUpdate::Started, now).unwrap().seq, 1);
        r.apply(
            JobUpdate::StepStarted {
                step: 0,
                attempt: 1,
            },
            now,
        )
        .unwrap();
        let usage = Usage {
            prompt_tokens: 3,
            completion_tokens: 4,
            cost_usd: 0.5,
        };
        let e = r
            .apply(
                JobUpdate::StepSucceeded {
                    step: 0,
                    attempt: 1,
                    output: Arc::new(json!(1)),
                    usage,
                },
                now,
            )
            .unwrap();
        assert!(matches!(e.kind, EventKind::StepSucceeded { ref agent, .. } if &**agent == "a"));
        assert_eq!(r.usage.total_tokens(), 7);
        let e = r
            .apply(
                JobUpdate::Finished {
                    state: JobState::Cancelled,
                    output: None,
                    error: Some("stop".into()),
                },
                now,
            )
            .unwrap();
        assert!(e.kind.is_final());
        assert_eq!(e.seq, 4);
        assert_eq!(r.steps[0].state, StepState::Succeeded);
        assert_eq!(r.steps[1].state, StepState::Cancelled);
        // Nothing applies to a finished job.
        assert!(
            r.apply(
                JobUpdate::StepStarted {
                    step: 1,
                    attempt: 1
                },
                now
            )
            .is_none()
        );
        assert_eq!(r.events, 4);
    }

    #[test]
    fn job_id_parses_and_refuses_garbage() {
        let id = JobId::new();
        assert_eq!(id.to_string().parse::<JobId>().unwrap(), id);
        assert!(
            "nope"
                .parse::<JobId>()
                .unwrap_err()
                .contains("invalid job id")
        );
    }
}
