//! Cascade's graphs as MCP tools (`/mcp`): `run_<graph>` starts a job and answers with its
//! output if it ends within `wait_seconds`, else with its id and state; `get_job`, `await_job`,
//! `cancel_job` and `list_approvals` follow it. Human gates are never skipped: a job that waits
//! for approval says so, with the approvals it waits for.
//!
//! Each caller sees and acts as who it is (the identity the server's authentication put in the
//! request): the `run_` tools of the graphs its tenant may run, if it may submit; the jobs and
//! approvals of its tenant only (another tenant's job is "not found", as an unknown one is).

use std::sync::Arc;
use std::time::Duration;

use cascade_agents::mcp_host::{ToolHost, tool};
use serde_json::{Map, Value, json};

use crate::auth::{Identity, Role};
use crate::job::{ApprovalView, JobId, JobRecord};
use crate::{Orchestrator, SubmitRequest};

/// Who calls: the identity the HTTP authentication found; without authentication, the
/// anonymous administrator; with it, a request that came without one has no rights.
fn who(caller: &http::Extensions, authenticated: bool) -> Identity {
    match caller.get::<Identity>() {
        Some(who) => who.clone(),
        None if authenticated => Identity::nobody(),
        None => Identity::anonymous(),
    }
}

/// Refused for want of `role`, in the words the other edges use.
fn needs(who: &Identity, role: Role, what: &str) -> Result<(), String> {
    if who.has(role) {
        Ok(())
    } else {
        Err(format!(
            "{:?} may not do this: {what} needs the {role} role",
            &*who.name
        ))
    }
}

/// How long a tool call waits for its job by default, and at most.
const DEFAULT_WAIT: Duration = Duration::from_secs(30);
const MAX_WAIT: Duration = Duration::from_secs(300);

/// The tools of an orchestrator's graphs.
pub struct GraphTools {
    pub orch: Arc<Orchestrator>,
    /// The server authenticates its callers (so a call without an identity has no rights).
    pub authenticated: bool,
}

fn job_id_schema() -> Value {
    json!({"type": "object", "properties": {"job_id": {"type": "string", "description": "as run_<graph> returned it"}}, "required": ["job_id"]})
}

fn job_json(r: &JobRecord) -> Value {
    let waiting: Vec<Value> = ApprovalView::of(r)
        .filter(|v| v.approval.is_pending() && !r.state.is_terminal())
        .map(|v| {
            json!({"approval_id": v.approval.id, "agent": &*v.agent, "proposal_sha256": v.approval.sha256})
        })
        .collect();
    json!({
        "job_id": r.id.to_string(),
        "graph": &*r.graph,
        "state": r.state,
        "output": r.output.as_deref(),
        "error": r.error,
        "usage": r.usage,
        "awaiting_approval": waiting,
    })
}

fn wait_of(args: &Map<String, Value>) -> Result<Duration, String> {
    match args.get("wait_seconds") {
        None | Some(Value::Null) => Ok(DEFAULT_WAIT),
        Some(v) => v
            .as_f64()
            .filter(|s| s.is_finite() && *s >= 0.0)
            .map(|s| Duration::from_secs_f64(s).min(MAX_WAIT))
            .ok_or_else(|| "wait_seconds: a number of seconds, 0 to 300".to_string()),
    }
}

fn job_id_of(args: &Map<String, Value>) -> Result<JobId, String> {
    args.get("job_id")
        .and_then(Value::as_str)
        .ok_or_else(|| "job_id: the id run_<graph> returned".to_string())?
        .parse()
}

impl GraphTools {
    /// Job `id` once it ends or parks, or as it is after `wait`.
    async fn settle(&self, id: JobId, wait: Duration) -> Result<Value, String> {
        let record = match tokio::time::timeout(wait, self.orch.wait_settled(id)).await {
            Ok(r) => r.map_err(|e| e.to_string())?,
            Err(_) => self
                .orch
                .get(id)
                .map_err(|e| e.to_string())?
                .ok_or_else(|| format!("job {id} not found"))?,
        };
        Ok(job_json(&record))
    }

    /// Job `id`, if `who` may see it (another tenant's: not found, as an unknown one).
    fn visible(&self, who: &Identity, id: JobId) -> Result<JobRecord, String> {
        match self.orch.get(id).map_err(|e| e.to_string())? {
            Some(r) if who.sees(&r.tenant) => Ok(r),
            _ => Err(format!("job {id} not found")),
        }
    }

    /// The tools `who` is offered.
    fn offered(&self, who: &Identity) -> Vec<cascade_agents::mcp_host::OfferedTool> {
        let tenant = who.tenant_for("").unwrap_or_default();
        let mut tools: Vec<_> = self
            .orch
            .model()
            .graphs
            .iter()
            .filter(|g| {
                who.has(Role::Submit)
                    && (who.is_admin()
                        || g.tenants
                            .as_ref()
                            .is_none_or(|ts| ts.iter().any(|t| **t == *tenant)))
            })
            .map(|g| {
                tool(
                    &format!("run_{}", g.name),
                    &format!(
                        "Run graph {:?}{}: start a job on `input` and answer with its output if it ends within wait_seconds (default 30), else with its id and state (then get_job / await_job). A job that waits for a person's approval says so.",
                        g.name,
                        g.description.as_deref().map(|d| format!(" ({d})")).unwrap_or_default()
                    ),
                    json!({
                        "type": "object",
                        "properties": {
                            "input": g.input_schema.clone().unwrap_or_else(|| json!({"type": "object", "description": "the job input"})),
                            "idempotency_key": {"type": "string", "description": "the same key returns the same job"},
                            "tenant": {"type": "string", "description": "the tenant the job belongs to (administrators only; others act in their own)"},
                            "wait_seconds": {"type": "number", "minimum": 0, "maximum": 300}
                        },
                        "required": ["input"]
                    }),
                )
            })
            .collect();
        tools.push(tool(
            "get_job",
            "A job's state, output and the approvals it waits for.",
            job_id_schema(),
        ));
        let mut await_schema = job_id_schema();
        await_schema["properties"]["wait_seconds"] =
            json!({"type": "number", "minimum": 0, "maximum": 300});
        tools.push(tool(
            "await_job",
            "Wait up to wait_seconds (default 30) for a job to end or to wait for approval; the job then.",
            await_schema,
        ));
        tools.push(tool("cancel_job", "Cancel a job.", job_id_schema()));
        tools.push(tool(
            "list_approvals",
            "Approvals waiting for a person's decision (of one graph, or all).",
            json!({"type": "object", "properties": {"graph": {"type": "string"}}}),
        ));
        tools
    }

    /// Call tool `name` as `who`.
    async fn call_by(
        &self,
        who: &Identity,
        name: &str,
        args: Map<String, Value>,
    ) -> Result<Value, String> {
        match name {
            "get_job" => {
                needs(who, Role::Read, "get_job")?;
                Ok(job_json(&self.visible(who, job_id_of(&args)?)?))
            }
            "await_job" => {
                needs(who, Role::Read, "await_job")?;
                let id = job_id_of(&args)?;
                self.visible(who, id)?;
                self.settle(id, wait_of(&args)?).await
            }
            "cancel_job" => {
                needs(who, Role::Submit, "cancel_job")?;
                let id = job_id_of(&args)?;
                self.visible(who, id)?;
                let r = self
                    .orch
                    .cancel(id, "cancelled over MCP")
                    .await
                    .map_err(|e| e.to_string())?;
                Ok(job_json(&r))
            }
            "list_approvals" => {
                needs(who, Role::Read, "list_approvals")?;
                let graph = args.get("graph").and_then(Value::as_str);
                let list = self
                    .orch
                    .approvals_of(graph, None, 500, who.only_tenant())
                    .map_err(|e| e.to_string())?;
                Ok(json!({"approvals": list.iter().map(|v| json!({
                    "approval_id": v.approval.id,
                    "job_id": v.job_id.to_string(),
                    "graph": &*v.graph,
                    "agent": &*v.agent,
                    "proposal": &*v.approval.proposal,
                    "proposal_sha256": v.approval.sha256,
                })).collect::<Vec<_>>()}))
            }
            run if run.starts_with("run_") => {
                needs(who, Role::Submit, "running a graph")?;
                let graph = &run["run_".len()..];
                let input = args.get("input").cloned().unwrap_or(json!({}));
                let mut req = SubmitRequest::new(graph, input);
                let tenant = args.get("tenant").and_then(Value::as_str).unwrap_or("");
                req.tenant = who.tenant_for(tenant).map_err(|e| e.to_string())?;
                if let Some(key) = args.get("idempotency_key").and_then(Value::as_str) {
                    req = req.idempotency_key(key);
                }
                let wait = wait_of(&args)?;
                let submitted = self.orch.submit(req).await.map_err(|e| e.to_string())?;
                self.settle(submitted.id, wait).await
            }
            other => Err(format!(
                "no tool {other:?}: the tools are run_<graph>, get_job, await_job, cancel_job, list_approvals"
            )),
        }
    }
}

#[async_trait::async_trait]
impl ToolHost for GraphTools {
    fn tools(&self) -> Vec<cascade_agents::mcp_host::OfferedTool> {
        self.offered(&who(&http::Extensions::new(), self.authenticated))
    }

    async fn call(&self, name: &str, args: Map<String, Value>) -> Result<Value, String> {
        let who = who(&http::Extensions::new(), self.authenticated);
        self.call_by(&who, name, args).await
    }

    fn tools_for(&self, caller: &http::Extensions) -> Vec<cascade_agents::mcp_host::OfferedTool> {
        self.offered(&who(caller, self.authenticated))
    }

    async fn call_as(
        &self,
        name: &str,
        args: Map<String, Value>,
        _idempotency_key: Option<&str>,
        caller: &http::Extensions,
    ) -> Result<Value, String> {
        self.call_by(&who(caller, self.authenticated), name, args)
            .await
    }
}
