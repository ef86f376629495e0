//! The loop of a tool-using `llm` agent, run by the engine one journaled sub-step at a time.
//!
//! A step of such an agent is a conversation: the model's turn, the tool calls it asks for, the
//! next turn with their results, until a turn calls no tool (the step's output) or `max_turns`
//! runs out. Each turn and each tool call is a sub-step with its own idempotency key
//! (`<job>/<agent>/<n>`), written to the store — and, for a durable store, committed — before the
//! next one starts. So the loop is rebuilt from the step's journal whenever the step runs again
//! (after a crash, a pause, a refusal, an approval or a raised budget), and no turn and no tool
//! call recorded as done is made twice:
//!
//! - a turn is recorded once it answered; one cut short is asked again (it changed nothing);
//! - a tool call is recorded as running before it is made and as done with its result as soon
//!   as it returns (the turn's other calls may still run); one left running by a crash is made
//!   again with the same key (in the call's `_meta`, for a server that deduplicates);
//! - a call of a tool that needs approval is recorded as awaiting it and the step parks; the
//!   decision (an approval runs it; a rejection is what the model reads as its result) is taken
//!   from the step's approval when the loop runs again.
//!
//! Each turn takes a grant on the agent's own quotas (its LLM's), each tool call on its server's
//! (`upstream:mcp:<server>`), from the broker, settled with what the call spent and answered,
//! so refusals teach the quota as a step's would. Each turn is checked against the job's budget
//! first.

use std::sync::Arc;
use std::time::Duration;

use cascade_agents::tools::{self, Message, ToolCall, ToolDef, ToolUser, Turn};
use cascade_agents::{AgentError, AgentOutput, CallContext, ErrorClass, StepInput, Usage};
use futures::StreamExt;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::context::Shared;
use super::protocol::{Grant, Settlement};
use crate::job::{ApprovalOutcome, Breach, JobId, JobUpdate, SubStep, SubStepKind, SubStepState};
use crate::quota::{Demand, Outcome};

/// How long a sub-step waits for its quota inside the loop before it gives the step back to
/// the scheduler (which retries it after the wait, holding nothing meanwhile).
const MAX_QUOTA_WAIT: Duration = Duration::from_secs(2);
/// How often a sub-step whose quota is blocked (a concurrency limit, older calls) asks again.
const BLOCKED_POLL: Duration = Duration::from_millis(20);

/// What a run of the loop needs besides the agent: where it records, whose quotas it spends.
pub(crate) struct LoopEnv {
    pub shared: Arc<Shared>,
    pub job: JobId,
    pub step: usize,
    pub tenant: Arc<str>,
    pub graph: Arc<str>,
    pub agent: Arc<str>,
    /// Quota cores a model turn draws on (the agent's own).
    pub turn_quotas: Vec<usize>,
    /// Each server's quota cores, for its tool calls.
    pub tool_quotas: Vec<(Arc<str>, Vec<usize>)>,
    /// Each sub-step's time limit (the agent's `timeout`, within the job's deadline).
    pub timeout: Duration,
    /// Tool calls of one turn run this many at a time (the agent's `max_concurrency`).
    pub parallel: usize,
    /// What the job's other steps under way may spend (their reservations at dispatch); what
    /// the job spent and its budget are read from its record before each turn.
    pub others_reserved: Usage,
    /// Where each turn's spend is told, for the job's budget as the scheduler keeps it.
    pub scheduler: ractor::ActorRef<super::protocol::SchedMsg>,
}

/// Why a run of the loop stopped before the step's end: the step waits, holding nothing.
#[derive(Debug)]
pub(crate) enum Park {
    /// Tool call `n` waits for a person's decision on `proposal`.
    Approval { n: u32, proposal: Value },
    /// The next turn would pass the job's budget.
    Budget(Breach),
}

/// How a run of the loop ended.
pub(crate) type LoopEnd = (Result<AgentOutput, AgentError>, Option<Park>);

/// Run the loop of `user`'s step from its journal until the step's end or a park.
pub(crate) async fn run(
    env: &LoopEnv,
    user: &dyn ToolUser,
    ctx: &CallContext,
    input: &StepInput,
) -> LoopEnd {
    match drive(env, user, ctx, input).await {
        Ok(Ok(out)) => (Ok(out), None),
        Ok(Err(park)) => (
            Err(AgentError::transient("the step waits (parked)")),
            Some(park),
        ),
        Err(e) => (Err(e), None),
    }
}

/// The journal as the loop reads it, and where the next entry goes.
struct Journal {
    entries: Vec<SubStep>,
}

impl Journal {
    fn next_n(&self) -> u32 {
        self.entries.iter().map(|s| s.n).max().unwrap_or(0) + 1
    }

    /// The last turn that answered, by position.
    fn last_turn(&self) -> Option<usize> {
        self.entries
            .iter()
            .rposition(|s| s.kind == SubStepKind::Turn && s.state == SubStepState::Succeeded)
    }

    fn turns(&self) -> u32 {
        self.entries
            .iter()
            .filter(|s| s.kind == SubStepKind::Turn && s.state == SubStepState::Succeeded)
            .count() as u32
    }

    /// The entry of the call with provider id `id` after position `after`.
    fn call_entry(&self, after: usize, id: &str) -> Option<&SubStep> {
        self.entries[after + 1..].iter().find(|s| {
            s.kind == SubStepKind::ToolCall && s.call.as_ref().is_some_and(|c| c.id == id)
        })
    }

    fn spent(&self) -> Usage {
        let mut u = Usage::default();
        for s in &self.entries {
            u.add(&s.usage);
        }
        u
    }

    /// The conversation after the opening messages: each answered turn, then its calls'
    /// results in the order the model asked for them.
    fn history(&self) -> Vec<Message> {
        let mut out = Vec::new();
        for (i, s) in self.entries.iter().enumerate() {
            if s.kind != SubStepKind::Turn || s.state != SubStepState::Succeeded {
                continue;
            }
            out.push(Message::Assistant {
                text: s.text.clone(),
                tool_calls: s.tool_calls.clone(),
            });
            for c in &s.tool_calls {
                if let Some(r) = self.call_entry(i, &c.id).filter(|r| r.state.is_done()) {
                    out.push(Message::Tool {
                        call_id: c.id.clone(),
                        name: c.name.clone(),
                        content: r.text.clone(),
                        is_error: r.state != SubStepState::Succeeded,
                    });
                }
            }
        }
        out
    }

    fn put(&mut self, sub: SubStep) {
        match self.entries.iter_mut().find(|x| x.n == sub.n) {
            Some(x) => *x = sub,
            None => self.entries.push(sub),
        }
    }
}

async fn drive(
    env: &LoopEnv,
    user: &dyn ToolUser,
    ctx: &CallContext,
    input: &StepInput,
) -> Result<Result<AgentOutput, Park>, AgentError> {
    let job_record = env
        .shared
        .store
        .get(env.job)
        .map_err(|e| AgentError::transient(format!("the job's journal could not be read: {e}")))?
        .ok_or_else(|| AgentError::permanent("the job is not in the store"))?;
    let step = job_record
        .steps
        .get(env.step)
        .ok_or_else(|| AgentError::permanent("the step is not in the job's record"))?;
    let mut journal = Journal {
        entries: step.sub_steps.clone(),
    };
    journal.entries.sort_by_key(|s| s.n);
    // The decision on the tool call that parked the step, if any.
    let decision = step
        .approval
        .as_ref()
        .and_then(|a| Some((a.sub_step?, a.decision.clone()?, a.id.clone())));
    let opening = user.opening(ctx, input)?;
    let offered = tools::resolve(user.mcp_servers(), user.tool_use()).await?;
    let settings = user.tool_use();
    let mut current = job_record;
    loop {
        // A job that ended meanwhile (cancelled, past its deadline) makes no more calls: the
        // scheduler no longer waits for this run's end.
        if current.state.is_terminal() {
            return Err(AgentError::permanent(format!(
                "the job ended ({}) while its tool loop ran",
                current.state.as_str()
            )));
        }
        let last = journal.last_turn();
        // The calls of the last turn that have no result yet.
        let pending: Vec<ToolCall> = match last {
            Some(t) => journal.entries[t]
                .tool_calls
                .iter()
                .filter(|c| {
                    !journal
                        .call_entry(t, &c.id)
                        .is_some_and(|r| r.state.is_done())
                })
                .cloned()
                .collect(),
            None => Vec::new(),
        };
        if let Some(t) = last
            && !pending.is_empty()
        {
            // Calls that may run now (no approval needed, or approved), refused ones (the model
            // reads why), and the first that waits for a person.
            let mut runnable: Vec<(u32, ToolCall, ToolDef, Option<String>)> = Vec::new();
            let mut to_propose: Option<(ToolCall, ToolDef)> = None;
            let mut next = journal.next_n();
            for c in pending {
                let existing = journal.call_entry(t, &c.id).cloned();
                let n = existing.as_ref().map_or_else(
                    || {
                        next += 1;
                        next - 1
                    },
                    |e| e.n,
                );
                let Some(def) = offered.iter().find(|d| d.name == c.name).cloned() else {
                    let names: Vec<&str> = offered.iter().map(|d| d.name.as_str()).collect();
                    let text = format!(
                        "there is no tool named {:?}; the tools are: {}",
                        c.name,
                        names.join(", ")
                    );
                    let sub = tool_entry(
                        n,
                        &c,
                        None,
                        SubStepState::Failed,
                        text,
                        Some("unknown tool"),
                    );
                    record(env, &mut journal, sub).await?;
                    continue;
                };
                if !c.arguments.is_object() {
                    let text = format!(
                        "the arguments of {} are not a JSON object: {}",
                        c.name,
                        tools::limit_result(c.arguments.to_string(), 512)
                    );
                    let sub = tool_entry(
                        n,
                        &c,
                        Some(&def),
                        SubStepState::Failed,
                        text,
                        Some("arguments are not an object"),
                    );
                    record(env, &mut journal, sub).await?;
                    continue;
                }
                if !def.needs_approval {
                    runnable.push((n, c, def, None));
                    continue;
                }
                // An approved call that was under way when the run ended (a crash, a dead
                // server): made again, with the same key, without asking again.
                if let Some(e) = existing
                    .as_ref()
                    .filter(|e| e.state == SubStepState::Running)
                {
                    let id = crate::approval::sub_step_approval_id(env.job, &ctx.agent, e.n);
                    runnable.push((n, c, def, Some(id)));
                    continue;
                }
                match (&existing, &decision) {
                    (Some(e), Some((dn, d, id)))
                        if e.state == SubStepState::AwaitingApproval && *dn == e.n =>
                    {
                        if d.outcome == ApprovalOutcome::Approved {
                            runnable.push((n, c, def, Some(id.clone())));
                        } else {
                            let why = match d.outcome {
                                ApprovalOutcome::Expired => format!(
                                    "nobody approved this call in time ({}); it was not made",
                                    d.reason
                                ),
                                _ => format!(
                                    "{} rejected this call: {}; it was not made",
                                    d.approver, d.reason
                                ),
                            };
                            let mut sub = tool_entry(
                                n,
                                &c,
                                Some(&def),
                                SubStepState::Rejected,
                                why.clone(),
                                Some(&why),
                            );
                            sub.started_at = e.started_at;
                            record(env, &mut journal, sub).await?;
                        }
                    }
                    _ if to_propose.is_none() => to_propose = Some((c, def)),
                    // One proposal at a time: the others are proposed after its decision.
                    _ => {}
                }
            }
            if !runnable.is_empty() {
                call_tools(env, user, ctx, &mut journal, runnable).await?;
            }
            current = read_job(env)?;
            if let Some((c, def)) = to_propose {
                // Everything else of the turn is done: the step waits for a person.
                let n = journal
                    .call_entry(t, &c.id)
                    .map_or_else(|| journal.next_n(), |e| e.n);
                let proposal = json!({
                    "server": def.server,
                    "tool": def.tool,
                    "arguments": c.arguments,
                    "sub_step": n,
                });
                let sub = tool_entry(
                    n,
                    &c,
                    Some(&def),
                    SubStepState::AwaitingApproval,
                    String::new(),
                    None,
                );
                record(env, &mut journal, sub).await?;
                return Ok(Err(Park::Approval { n, proposal }));
            }
            continue;
        }
        // The last turn called no tool: its answer is the step's (a run that ended before the
        // step's success was recorded ends here again).
        if let Some(t) = last
            && journal.entries[t].tool_calls.is_empty()
        {
            let s = &journal.entries[t];
            let turn = Turn {
                text: s.text.clone(),
                tool_calls: Vec::new(),
                finish_reason: s
                    .error
                    .as_deref()
                    .map_or(Value::Null, |f| Value::String(f.to_string())),
                model: json!(s.tool),
                usage: s.usage,
                limits: None,
            };
            return match user.final_output(&turn) {
                Ok(mut value) => {
                    if let Value::Object(m) = &mut value {
                        m.insert("turns".into(), json!(journal.turns()));
                        m.insert(
                            "tool_calls".into(),
                            json!(
                                journal
                                    .entries
                                    .iter()
                                    .filter(|s| s.kind == SubStepKind::ToolCall)
                                    .count()
                            ),
                        );
                    }
                    Ok(Ok(AgentOutput {
                        value,
                        usage: journal.spent(),
                        limits: None,
                    }))
                }
                Err(e) => {
                    // The answer is not what was asked for: it leaves the conversation, and the
                    // step's retry asks again.
                    let mut failed = journal.entries[t].clone();
                    failed.state = SubStepState::Failed;
                    failed.error = Some(e.message.clone());
                    record(env, &mut journal, failed).await?;
                    Err(e)
                }
            };
        }
        let turns = journal.turns();
        if turns >= settings.max_turns {
            return Err(AgentError::permanent(format!(
                "the model still called tools after {turns} turns (max_turns = {}); raise max_turns or narrow the task",
                settings.max_turns
            )));
        }
        let history = journal.history();
        let estimate = user.estimate_turn(&opening, &history);
        // The job's budget as it is now (raised meanwhile, perhaps), against what the job spent
        // (its journaled turns included) and what its other steps under way hold.
        if let Some(limit) = &current.budget {
            let mut spent = current.usage;
            spent.add(&env.others_reserved);
            if let Some(breach) = limit.breach(&spent, &estimate) {
                return Ok(Err(Park::Budget(breach)));
            }
        }
        let n = journal.next_n();
        let sub_ctx = sub_context(ctx, n);
        let started_at = crate::clock::now();
        let grant = take(env, &env.turn_quotas, demand(&estimate)).await?;
        let answered = tokio::time::timeout(
            env.timeout,
            user.turn(&sub_ctx, &opening, &history, &offered),
        )
        .await
        .unwrap_or_else(|_| {
            Err(AgentError::transient(format!(
                "the model's turn timed out after {}",
                humantime::format_duration(env.timeout)
            )))
        });
        settle(env, grant, &answered.as_ref().map(|t| (t.usage, t.limits)));
        let mut turn = answered?;
        unique_call_ids(&mut turn.tool_calls, n);
        let sub = SubStep {
            n,
            kind: SubStepKind::Turn,
            state: SubStepState::Succeeded,
            started_at,
            finished_at: Some(crate::clock::now()),
            text: turn.text.clone(),
            tool_calls: turn.tool_calls.clone(),
            call: None,
            server: String::new(),
            // The model that answered, for the step's output.
            tool: turn.model.as_str().unwrap_or_default().to_string(),
            result_bytes: 0,
            usage: turn.usage,
            // The finish reason, for the step's output.
            error: turn.finish_reason.as_str().map(str::to_string),
        };
        record(env, &mut journal, sub).await?;
        let _ = env.scheduler.cast(super::protocol::SchedMsg::LoopSpent {
            job: env.job,
            usage: turn.usage,
        });
        current = read_job(env)?;
    }
}

/// The job's record as the store has it now.
fn read_job(env: &LoopEnv) -> Result<crate::job::JobRecord, AgentError> {
    env.shared
        .store
        .get(env.job)
        .map_err(|e| AgentError::transient(format!("the job's journal could not be read: {e}")))?
        .ok_or_else(|| AgentError::permanent("the job is not in the store"))
}

/// Give the calls of turn `n` ids that are there and differ from each other: some
/// OpenAI-compatible servers send none, or the same for every call, and the journal matches
/// results to calls by id.
fn unique_call_ids(calls: &mut [ToolCall], n: u32) {
    let mut seen = std::collections::HashSet::new();
    for (k, c) in calls.iter_mut().enumerate() {
        if c.id.is_empty() || !seen.insert(c.id.clone()) {
            c.id = format!("cascade_{n}_{k}");
            seen.insert(c.id.clone());
        }
    }
}

/// Run a turn's calls, `env.parallel` at a time; each is recorded as running before it is made
/// and, as soon as it returns, as done with its result, durably, while the turn's other calls
/// still run (a crash after that commit loses no call that answered). A call the server could
/// not answer (a transport failure, a dead server, a refusal) stays recorded as running, and
/// the step ends with its error: the step's next run makes it again with the same key. Once
/// the journal cannot be written, no further call of the turn is made (its result could not be
/// kept), and that failure is the step's error.
async fn call_tools(
    env: &LoopEnv,
    user: &dyn ToolUser,
    ctx: &CallContext,
    journal: &mut Journal,
    calls: Vec<(u32, ToolCall, ToolDef, Option<String>)>,
) -> Result<(), AgentError> {
    let mut started = Vec::with_capacity(calls.len());
    for (n, c, def, approval) in calls {
        let sub = tool_entry(
            n,
            &c,
            Some(&def),
            SubStepState::Running,
            String::new(),
            None,
        );
        let started_at = sub.started_at;
        write(env, journal, sub)?;
        started.push((n, c, def, approval, started_at));
    }
    // Every call's start is durable before any is made.
    durable(env).await?;
    let max_bytes = user.tool_use().max_result_bytes;
    let journal_failed = std::sync::atomic::AtomicBool::new(false);
    let journal_failed = &journal_failed;
    let mut done = futures::stream::iter(started.into_iter().map(
        |(n, c, def, approval, started_at)| {
            let key = format!("{}/{n}", ctx.idempotency_key);
            async move {
                if journal_failed.load(std::sync::atomic::Ordering::Relaxed) {
                    return Err((
                        n,
                        AgentError::transient("not made: the journal could not be written"),
                        false,
                    ));
                }
                let (text, is_error) = call_one(env, user, &def, &c, &key)
                    .await
                    .map_err(|e| (n, e, false))?;
                let bytes = text.len() as u64;
                let text = tools::limit_result(text, max_bytes);
                let (state, error) = if is_error {
                    (SubStepState::Failed, Some(text.clone()))
                } else {
                    (SubStepState::Succeeded, None)
                };
                if let Some(approval_id) = &approval {
                    env.shared.audit(
                        &env.tenant,
                        "call_executed",
                        json!({
                            "job_id": env.job.to_string(),
                            "graph": &*env.graph,
                            "agent": &*ctx.agent,
                            "approval_id": approval_id,
                            "sub_step": n,
                            "server": def.server,
                            "tool": def.tool,
                            "outcome": state.as_str(),
                            "error": error,
                        }),
                    );
                }
                let mut sub = tool_entry(n, &c, Some(&def), state, text, error.as_deref());
                sub.result_bytes = bytes;
                sub.started_at = started_at;
                let kept = match store_write(env, &sub) {
                    Ok(()) => durable(env).await,
                    Err(e) => Err(e),
                };
                if let Err(e) = kept {
                    journal_failed.store(true, std::sync::atomic::Ordering::Relaxed);
                    return Err((n, e, true));
                }
                Ok(sub)
            }
        },
    ))
    .buffer_unordered(env.parallel.max(1));
    // The step's error, when calls failed: the journal's first, else the refusal for rate
    // that asks for the longest wait, else the first to fail. The others are logged.
    let rank = |(_, e, journal): &(u32, AgentError, bool)| {
        (
            *journal,
            e.class == cascade_agents::ErrorClass::RateLimited,
            e.retry_after.unwrap_or_default(),
        )
    };
    let mut error: Option<(u32, AgentError, bool)> = None;
    // The journal in memory takes each result under its own number: the model reads them in
    // the order it asked for the calls, whichever returned first.
    while let Some(r) = done.next().await {
        match r {
            Ok(sub) => journal.put(sub),
            Err(e) => {
                let keep = error.as_ref().is_none_or(|kept| rank(&e) > rank(kept));
                let dropped = if keep { error.replace(e) } else { Some(e) };
                if let Some((n, d, _)) = dropped {
                    tracing::warn!(job = %env.job, sub_step = n, error = %d, "a tool call of the turn failed too");
                }
            }
        }
    }
    match error {
        Some((_, e, _)) => Err(e),
        None => Ok(()),
    }
}

/// One tool call under its server's quota: the result's text and whether the tool said it is
/// an error; `Err` when it was not answered.
async fn call_one(
    env: &LoopEnv,
    user: &dyn ToolUser,
    def: &ToolDef,
    c: &ToolCall,
    key: &str,
) -> Result<(String, bool), AgentError> {
    let server = user
        .mcp_servers()
        .get(&def.server)
        .ok_or_else(|| AgentError::permanent(format!("no MCP server {:?}", def.server)))?;
    let quotas = env
        .tool_quotas
        .iter()
        .find(|(s, _)| **s == *def.server)
        .map(|(_, q)| q.as_slice())
        .unwrap_or_default();
    let grant = take(env, quotas, Demand::default()).await?;
    let arguments = c.arguments.as_object().cloned().unwrap_or_default();
    let answered = tokio::time::timeout(env.timeout, server.call(&def.tool, arguments, key))
        .await
        .unwrap_or_else(|_| {
            Err(AgentError::transient(format!(
                "tool {}.{} timed out after {}",
                def.server,
                def.tool,
                humantime::format_duration(env.timeout)
            )))
        });
    settle(
        env,
        grant,
        &answered.as_ref().map(|_| (Usage::default(), None)),
    );
    let result = answered?;
    let value = cascade_agents::mcp::result_value(&result);
    let text = match value {
        Value::String(s) => s,
        other => other.to_string(),
    };
    // Nothing a tool returns reaches the model, the store or an operator with a secret value
    // in use in it.
    let text = cascade_agents::secret::redactor()
        .redact(&text)
        .into_owned();
    Ok((text, result.is_error == Some(true)))
}

fn tool_entry(
    n: u32,
    c: &ToolCall,
    def: Option<&ToolDef>,
    state: SubStepState,
    text: String,
    error: Option<&str>,
) -> SubStep {
    let now = crate::clock::now();
    SubStep {
        n,
        kind: SubStepKind::ToolCall,
        state,
        started_at: now,
        finished_at: state.is_done().then_some(now),
        text,
        tool_calls: Vec::new(),
        call: Some(c.clone()),
        server: def.map(|d| d.server.clone()).unwrap_or_default(),
        tool: def.map_or_else(|| c.name.clone(), |d| d.tool.clone()),
        result_bytes: 0,
        usage: Usage::default(),
        error: error.map(str::to_string),
    }
}

/// Count a journal entry that ended or waits.
fn count(env: &LoopEnv, sub: &SubStep) {
    if sub.state == SubStepState::Running {
        return;
    }
    metrics::counter!(
        crate::metrics::SUB_STEPS,
        "graph" => env.graph.to_string(),
        "agent" => env.agent.to_string(),
        "kind" => sub.kind.as_str(),
        "state" => sub.state.as_str(),
    )
    .increment(1);
}

/// Record `sub` in the journal and the store, durably, before anything else happens.
async fn record(env: &LoopEnv, journal: &mut Journal, sub: SubStep) -> Result<(), AgentError> {
    write(env, journal, sub)?;
    durable(env).await
}

/// Put `sub` in the journal and the store (not yet durable: see [`durable`]), and count it.
fn write(env: &LoopEnv, journal: &mut Journal, sub: SubStep) -> Result<(), AgentError> {
    store_write(env, &sub)?;
    journal.put(sub);
    Ok(())
}

/// Put `sub` in the store (not yet durable: see [`durable`]), and count it.
fn store_write(env: &LoopEnv, sub: &SubStep) -> Result<(), AgentError> {
    count(env, sub);
    match env.shared.store.update(
        env.job,
        JobUpdate::SubStep {
            step: env.step,
            sub: Box::new(sub.clone()),
        },
    ) {
        Ok(Some(e)) => env.shared.publish(e),
        Ok(None) => {}
        Err(e) => {
            return Err(AgentError::transient(format!(
                "the journal could not be written: {e}"
            )));
        }
    }
    Ok(())
}

async fn durable(env: &LoopEnv) -> Result<(), AgentError> {
    env.shared
        .store
        .flush()
        .await
        .map_err(|e| AgentError::transient(format!("the journal could not be written: {e}")))
}

/// The sub-step's own context: its idempotency key is `<job>/<agent>/<n>`.
fn sub_context(ctx: &CallContext, n: u32) -> CallContext {
    CallContext {
        idempotency_key: format!("{}/{n}", ctx.idempotency_key).into(),
        ..ctx.clone()
    }
}

fn demand(u: &Usage) -> Demand {
    Demand {
        tokens: u.total_tokens(),
        cost_micros: (u.cost_usd * 1e6).round() as u64,
    }
}

/// A grant on `quotas` (none without quotas or a broker). A wait the quota names that is short
/// is waited here; a longer one, or a blocked quota for long, ends the step's run as refused
/// (the scheduler runs it again after the delay, from the journal).
async fn take(
    env: &LoopEnv,
    quotas: &[usize],
    demand: Demand,
) -> Result<Option<Grant>, AgentError> {
    let Some(broker) = env.shared.broker() else {
        return Ok(None);
    };
    if quotas.is_empty() {
        return Ok(None);
    }
    let deadline = Instant::now() + MAX_QUOTA_WAIT;
    loop {
        let wait = match broker.try_take(quotas, demand) {
            Ok(mut grant) => {
                // The cluster's shared quotas: this sub-step's turn, or the step goes on
                // after the wait (the broker was told, and pauses the quota).
                if let Some(claim) = grant.claim_mut()
                    && let Err(d) = claim.pass().await
                {
                    return Err(AgentError::rate_limited(
                        format!(
                            "quota {} is spent across the cluster ({}); the step goes on after the wait",
                            d.quota, d.reason
                        ),
                        Some(d.wait),
                    ));
                }
                return Ok(Some(grant));
            }
            Err(Some(at)) => at,
            Err(None) => Instant::now() + BLOCKED_POLL,
        };
        if wait > deadline {
            let after = wait
                .saturating_duration_since(Instant::now())
                .max(BLOCKED_POLL);
            return Err(AgentError::rate_limited(
                "the sub-step's quota has no room now; the step goes on after the wait",
                Some(after),
            ));
        }
        tokio::time::sleep_until(wait).await;
    }
}

/// Settle a sub-step's grant with what its call answered and spent.
fn settle(
    env: &LoopEnv,
    grant: Option<Grant>,
    result: &Result<(Usage, Option<cascade_agents::UpstreamLimits>), &AgentError>,
) {
    let Some(grant) = grant else { return };
    let (usage, cost_micros, limits, outcome, credential) = match result {
        Ok((u, limits)) => (
            Some((u.prompt_tokens, u.completion_tokens)),
            Some((u.cost_usd * 1e6).round() as u64),
            *limits,
            Outcome::Answered,
            None,
        ),
        Err(e) => (
            None,
            None,
            e.limits.as_deref().copied(),
            match e.class {
                ErrorClass::RateLimited if env.shared.cascade => {
                    Outcome::RateLimited(e.retry_after)
                }
                ErrorClass::RateLimited => Outcome::Abandoned,
                ErrorClass::Transient => Outcome::Failed,
                ErrorClass::Permanent | ErrorClass::Unauthorized => Outcome::Answered,
            },
            e.credential.clone(),
        ),
    };
    grant.settle(Settlement {
        usage,
        cost_micros,
        outcome,
        limits,
        credential,
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_or_repeated_call_ids_are_made_unique() {
        let call = |id: &str| ToolCall {
            id: id.into(),
            name: "t".into(),
            arguments: json!({}),
        };
        let mut calls = vec![call(""), call("a"), call("a"), call("b")];
        unique_call_ids(&mut calls, 7);
        let ids: Vec<&str> = calls.iter().map(|c| c.id.as_str()).collect();
        assert_eq!(ids, ["cascade_7_0", "a", "cascade_7_2", "b"]);
    }
}
