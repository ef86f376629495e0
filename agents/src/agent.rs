use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use serde::ser::SerializeMap;
use serde_json::Value;

/// Who is calling and why: one attempt of one step of one job.
#[derive(Clone, Debug)]
pub struct CallContext {
    pub job_id: Arc<str>,
    pub graph: Arc<str>,
    pub agent: Arc<str>,
    /// 1 for the first attempt; retries count up, pauses and restarts do not.
    pub attempt: u32,
    /// Stable across retries and restarts: derived from (job id, agent). Write-capable agents pass
    /// it to the system they write to so that a repeated call is not a repeated write.
    pub idempotency_key: Arc<str>,
    /// When the job's deadline runs out, if it has one.
    pub deadline: Option<tokio::time::Instant>,
    /// The idempotency key the job was submitted with, if any (the step's own key is
    /// `idempotency_key`).
    pub job_key: Option<Arc<str>>,
}

/// The input of a step: the job input and the outputs of the step's dependencies.
///
/// Values are shared (`Arc`) rather than copied: a step's input is assembled for every call, and
/// deep-copying JSON there would dominate the cost of a cheap agent.
#[derive(Clone, Debug, Default)]
pub struct StepInput {
    pub input: Arc<Value>,
    pub deps: Vec<(Arc<str>, Arc<Value>)>,
}

impl StepInput {
    /// The output of dependency `agent`, if this step depends on it.
    pub fn dep(&self, agent: &str) -> Option<&Value> {
        self.deps
            .iter()
            .find(|(name, _)| &**name == agent)
            .map(|(_, v)| &**v)
    }

    /// The documented step input object: `{"input", "deps", "job": {"id", "graph", "attempt"}}`.
    pub fn view<'a>(&'a self, ctx: &'a CallContext) -> StepView<'a> {
        StepView { step: self, ctx }
    }
}

/// A borrowed, serializable view of a step input; serializes as the documented JSON object.
pub struct StepView<'a> {
    step: &'a StepInput,
    ctx: &'a CallContext,
}

impl Serialize for StepView<'_> {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        struct Deps<'a>(&'a [(Arc<str>, Arc<Value>)]);
        impl Serialize for Deps<'_> {
            fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
                let mut m = s.serialize_map(Some(self.0.len()))?;
                for (k, v) in self.0 {
                    m.serialize_entry(&**k, &**v)?;
                }
                m.end()
            }
        }
        #[derive(Serialize)]
        struct Job<'a> {
            id: &'a str,
            graph: &'a str,
            attempt: u32,
        }
        let mut m = s.serialize_map(Some(3))?;
        m.serialize_entry("input", &*self.step.input)?;
        m.serialize_entry("deps", &Deps(&self.step.deps))?;
        m.serialize_entry(
            "job",
            &Job {
                id: &self.ctx.job_id,
                graph: &self.ctx.graph,
                attempt: self.ctx.attempt,
            },
        )?;
        m.end()
    }
}

/// What a call spent upstream. Token counts feed token quotas; cost adds up per job and graph.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, serde::Deserialize)]
pub struct Usage {
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost_usd: f64,
}

impl Usage {
    pub fn total_tokens(&self) -> u64 {
        self.prompt_tokens + self.completion_tokens
    }

    pub fn add(&mut self, other: &Usage) {
        self.prompt_tokens += other.prompt_tokens;
        self.completion_tokens += other.completion_tokens;
        self.cost_usd += other.cost_usd;
    }
}

/// What an upstream said about its own rate limits in one answer (OpenAI's `x-ratelimit-*`,
/// Anthropic's `anthropic-ratelimit-*`, the IETF `ratelimit-*` headers). A quota that learns from
/// its upstream mirrors the upstream's buckets from these.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct UpstreamLimits {
    pub requests: Option<LimitReading>,
    pub tokens: Option<LimitReading>,
}

impl UpstreamLimits {
    pub fn is_empty(&self) -> bool {
        self.requests.is_none() && self.tokens.is_none()
    }
}

/// One of an upstream's buckets as an answer describes it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LimitReading {
    /// The bucket's size (for OpenAI and Anthropic: per minute).
    pub limit: u64,
    pub remaining: u64,
    /// How long until the bucket is full again, when the upstream says.
    pub reset: Option<Duration>,
}

/// A successful call: the step's JSON output and what it spent.
#[derive(Clone, Debug)]
pub struct AgentOutput {
    pub value: Value,
    pub usage: Usage,
    /// The upstream's own rate limits, when its answer stated them.
    pub limits: Option<UpstreamLimits>,
}

impl AgentOutput {
    /// An output that spent nothing and says nothing about limits.
    pub fn new(value: Value) -> Self {
        Self {
            value,
            usage: Usage::default(),
            limits: None,
        }
    }
}

/// How a failed call should be treated by the orchestrator.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorClass {
    /// The upstream refused for rate (HTTP 429, gRPC RESOURCE_EXHAUSTED). Not the step's fault:
    /// it waits for `retry_after` and does not spend an attempt.
    RateLimited,
    /// May succeed if tried again (timeouts, 5xx, connection resets).
    Transient,
    /// Will fail the same way again (4xx other than 408/429, invalid output).
    Permanent,
    /// Credentials were refused; retrying without new credentials is pointless.
    Unauthorized,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::RateLimited => "rate_limited",
            Self::Transient => "transient",
            Self::Permanent => "permanent",
            Self::Unauthorized => "unauthorized",
        }
    }
}

/// A classified call failure. The message is the upstream's, and must not contain secrets.
#[derive(Clone, Debug, PartialEq)]
pub struct AgentError {
    pub class: ErrorClass,
    pub message: String,
    /// For rate-limited refusals: how long the upstream asked us to wait (Retry-After).
    pub retry_after: Option<Duration>,
    /// The upstream's own rate limits, when its answer stated them (boxed: errors travel in
    /// every `Result`, and most carry none).
    pub limits: Option<Box<UpstreamLimits>>,
    /// For a rate-limited refusal: the call never left, because the named credential cannot
    /// get a token (or its fresh token was refused). It is the credential that waits, not the
    /// upstream: the orchestrator pauses the credential's agents with cause
    /// `credential:<name>`.
    pub credential: Option<Arc<str>>,
}

impl AgentError {
    pub fn transient(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Transient,
            message: message.into(),
            retry_after: None,
            limits: None,
            credential: None,
        }
    }

    pub fn permanent(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Permanent,
            message: message.into(),
            retry_after: None,
            limits: None,
            credential: None,
        }
    }

    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self {
            class: ErrorClass::Unauthorized,
            message: message.into(),
            retry_after: None,
            limits: None,
            credential: None,
        }
    }

    pub fn rate_limited(message: impl Into<String>, retry_after: Option<Duration>) -> Self {
        Self {
            class: ErrorClass::RateLimited,
            message: message.into(),
            retry_after,
            limits: None,
            credential: None,
        }
    }

    /// A rate-limited refusal because credential `name` cannot be used for `wait`.
    pub fn credential_unavailable(
        name: Arc<str>,
        message: impl Into<String>,
        wait: Duration,
    ) -> Self {
        Self {
            credential: Some(name),
            ..Self::rate_limited(message, Some(wait))
        }
    }

    /// This error, with the limits the upstream's answer stated.
    pub fn with_limits(self, limits: Option<UpstreamLimits>) -> Self {
        Self {
            limits: limits.map(Box::new),
            ..self
        }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        matches!(self.class, ErrorClass::RateLimited | ErrorClass::Transient)
    }
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.class.as_str(), self.message)?;
        if let Some(d) = self.retry_after {
            write!(f, " (retry after {d:?})")?;
        }
        Ok(())
    }
}

impl std::error::Error for AgentError {}

/// One kind of work a graph node does. Instances are built from the node's configuration by the
/// [`Registry`](crate::Registry), shared by all concurrent calls of that node, and rebuilt when the
/// node's actor is restarted.
#[async_trait::async_trait]
pub trait Agent: Send + Sync + 'static {
    /// Run one attempt of one step.
    ///
    /// The engine polls a call once on the graph's scheduler before it hands a call that waits
    /// to a task of its own, so that a call that finishes at once costs no task: whatever a call
    /// does before its first `.await` holds up the whole graph. Blocking or CPU-heavy work
    /// belongs in `tokio::task::spawn_blocking`.
    async fn call(&self, ctx: &CallContext, input: &StepInput) -> Result<AgentOutput, AgentError>;

    /// Tokens this call will spend at most, reserved against token quotas before it starts
    /// (prompt estimate + `max_tokens` for an LLM). Agents that spend no tokens return zero.
    fn estimated_usage(&self, _input: &StepInput) -> Usage {
        Usage::default()
    }

    /// The exact call this step would make, rendered once so that a person can approve it
    /// before anything happens: what is sent, and where, with no credential in it (credentials
    /// are added again when it runs). [`Agent::execute`] makes exactly this call later, however
    /// the step's input would render by then. By default the call is the step's input itself
    /// (`{"input", "deps"}`), which is all `sim` and `template` act on.
    fn prepare(&self, _ctx: &CallContext, input: &StepInput) -> Result<Value, AgentError> {
        let deps: serde_json::Map<String, Value> = input
            .deps
            .iter()
            .map(|(k, v)| (k.to_string(), (**v).clone()))
            .collect();
        Ok(serde_json::json!({"input": &*input.input, "deps": deps}))
    }

    /// Whether its next call may act irreversibly, for kinds whose agents know it only at run
    /// time ([`KindSpec::may_be_irreversible`](crate::KindSpec::may_be_irreversible): an MCP tool
    /// says so in its annotations). Asked before each call; others are never asked.
    fn irreversible(&self) -> bool {
        false
    }

    /// The agent lets a model call tools: the orchestrator runs its loop, one journaled sub-step
    /// per model turn and per tool call, instead of [`Agent::call`].
    fn tool_user(&self) -> Option<&dyn crate::tools::ToolUser> {
        None
    }

    /// Make the call that [`Agent::prepare`] rendered, exactly: nothing is rendered again from
    /// the step's input. By default, `call` on the prepared step input.
    async fn execute(
        &self,
        ctx: &CallContext,
        prepared: &Value,
    ) -> Result<AgentOutput, AgentError> {
        self.call(ctx, &StepInput::from_prepared(prepared)?).await
    }
}

impl StepInput {
    /// The step input that the default [`Agent::prepare`] wrote.
    pub fn from_prepared(prepared: &Value) -> Result<Self, AgentError> {
        let input = prepared.get("input").cloned().ok_or_else(|| {
            AgentError::permanent(
                "the prepared call has no input (it was not prepared by this kind)",
            )
        })?;
        let deps = prepared
            .get("deps")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .map(|(k, v)| (Arc::from(k.as_str()), Arc::new(v.clone())))
                    .collect()
            })
            .unwrap_or_default();
        Ok(Self {
            input: Arc::new(input),
            deps,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn step_view_serializes_documented_shape() {
        let input = StepInput {
            input: Arc::new(json!({"body": "hi"})),
            deps: vec![("classify".into(), Arc::new(json!({"label": "bug"})))],
        };
        let ctx = CallContext {
            job_id: "j1".into(),
            graph: "g".into(),
            agent: "a".into(),
            attempt: 2,
            idempotency_key: "k".into(),
            deadline: None,
            job_key: None,
        };
        let v = serde_json::to_value(input.view(&ctx)).unwrap();
        assert_eq!(
            v,
            json!({"input": {"body": "hi"}, "deps": {"classify": {"label": "bug"}},
                   "job": {"id": "j1", "graph": "g", "attempt": 2}})
        );
        assert_eq!(input.dep("classify"), Some(&json!({"label": "bug"})));
        assert_eq!(input.dep("other"), None);
    }

    #[test]
    fn only_rate_limited_and_transient_are_retryable() {
        assert!(AgentError::transient("x").is_retryable());
        assert!(AgentError::rate_limited("x", None).is_retryable());
        assert!(!AgentError::permanent("x").is_retryable());
        assert!(!AgentError::unauthorized("x").is_retryable());
    }
}
