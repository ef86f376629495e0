//! What approvals are made of (semantics 10): the condition that asks for one
//! (`approval_when`), the canonical text and hash of a prepared call, and approval ids.

use std::fmt;

use minijinja::{Environment, UndefinedBehavior};
use serde_json::Value;

use crate::job::JobId;

/// An `approval_when` expression: a minijinja expression (without braces) over the step input
/// (`input`, `deps`, `job`); truthy means the step needs a person's approval.
///
/// Kept as a one-template environment, as the `template` kind keeps its templates: a compiled
/// minijinja expression borrows its environment, which a model shared across threads cannot.
pub struct Condition {
    source: String,
    env: Environment<'static>,
}

const WHEN: &str = "approval_when";

impl Condition {
    /// Compile `source`; the error says what is wrong with it.
    pub fn compile(source: &str) -> Result<Self, String> {
        let trimmed = source.trim();
        if trimmed.is_empty() {
            return Err(
                "an empty expression; write a condition such as \"input.amount > 1000\"".into(),
            );
        }
        if trimmed.starts_with("{{") || trimmed.starts_with("{%") {
            return Err("write the expression without braces, e.g. \"input.amount > 1000\"".into());
        }
        let mut env = Environment::new();
        // A name the input does not have is an error, not a silent false: a typo must not run
        // a payment unapproved.
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        env.add_template_owned(WHEN, format!("{{% if ({trimmed}) %}}1{{% endif %}}"))
            .map_err(|e| {
                format!(
                    "not a valid expression: {}",
                    e.detail().unwrap_or(&e.to_string())
                )
            })?;
        Ok(Self {
            source: trimmed.to_string(),
            env,
        })
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Whether the condition holds for this step input (`{"input", "deps", "job"}`). An error
    /// (a missing field, a comparison of unlike types) is returned for the caller to treat as
    /// "approval needed".
    pub fn holds(&self, step: &impl serde::Serialize) -> Result<bool, String> {
        let ctx = minijinja::Value::from(minijinja::value::Serde(step));
        self.env
            .get_template(WHEN)
            .and_then(|t| t.render(ctx))
            .map(|out| out == "1")
            .map_err(|e| e.to_string())
    }
}

impl fmt::Debug for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Condition").field(&self.source).finish()
    }
}

/// The canonical text of a prepared call: object keys sorted (by their UTF-8 bytes), no
/// whitespace. For the strings, integers and finite floats that calls hold, this is the JSON
/// Canonicalization Scheme (RFC 8785) output but for float formatting corner cases, and it is
/// what GetApproval returns, so a client hashes exactly the text it shows.
pub fn canonical(value: &Value) -> String {
    // Sorted explicitly: whether serde_json keeps maps sorted depends on a feature any crate
    // of the build may turn on.
    fn sorted(v: &Value) -> Value {
        match v {
            Value::Object(m) => {
                let mut keys: Vec<&String> = m.keys().collect();
                keys.sort();
                Value::Object(
                    keys.into_iter()
                        .map(|k| (k.clone(), sorted(&m[k])))
                        .collect(),
                )
            }
            Value::Array(a) => Value::Array(a.iter().map(sorted).collect()),
            other => other.clone(),
        }
    }
    serde_json::to_string(&sorted(value)).unwrap_or_else(|_| "null".into())
}

/// The approval id of step `agent` of `job`: `<job>/<agent>`.
pub fn approval_id(job: JobId, agent: &str) -> String {
    format!("{job}/{agent}")
}

/// The job and agent an approval id names: `<job>/<agent>`, or `<job>/<agent>/<n>` for tool
/// call `n` of a tool-using step's journal.
pub fn parse_approval_id(id: &str) -> Result<(JobId, &str), String> {
    let (job, rest) = id.split_once('/').ok_or_else(|| {
        format!("approval id {} is not <job id>/<agent>; copy it from ListApprovals or `cascade approvals list`", crate::text::echo(id))
    })?;
    let job: JobId = job.parse()?;
    let agent = match rest.split_once('/') {
        Some((agent, n)) if n.parse::<u32>().is_ok_and(|n| n > 0) => agent,
        Some(_) => {
            return Err(format!(
                "approval id {} is not <job id>/<agent> or <job id>/<agent>/<n>; copy it from ListApprovals or `cascade approvals list`",
                crate::text::echo(id)
            ));
        }
        None => rest,
    };
    if agent.is_empty() {
        return Err(format!(
            "approval id {} does not name one agent of the job; copy it from ListApprovals or `cascade approvals list`",
            crate::text::echo(id)
        ));
    }
    Ok((job, agent))
}

/// The id of the approval of tool call `n` of a tool-using step.
pub fn sub_step_approval_id(job: JobId, agent: &str, n: u32) -> String {
    format!("{job}/{agent}/{n}")
}

/// The answer to a decision: the approval as recorded, and whether this decision only repeated
/// the one recorded before (and so did nothing).
#[derive(Clone, Debug)]
pub struct Resolved {
    pub approval: crate::job::ApprovalView,
    pub repeated: bool,
}

/// Why a decision or a look-up was refused; each message says what to do instead.
#[derive(Clone, Debug, thiserror::Error)]
pub enum ApprovalError {
    #[error("{0}")]
    InvalidId(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("approval {} not found; `cascade approvals list` shows those waiting", crate::text::echo(.0))]
    NotFound(String),
    #[error(
        "the proposal of {id} has SHA-256 {current}, and the decision names {given}: it was made on a stale or wrong proposal. Read it again (GetApproval, `cascade approvals show {id}`) and decide on what it says now"
    )]
    Stale {
        id: String,
        current: String,
        given: String,
    },
    #[error(
        "approval {id} was already {} by {} ({}); a conflicting decision is refused",
        first.outcome,
        first.approver,
        if first.reason.is_empty() { "no reason given" } else { first.reason.as_str() }
    )]
    Conflict {
        id: String,
        first: crate::job::ApprovalDecision,
    },
    #[error("job {job} has ended ({state}) and its approval {id} can no longer be decided")]
    JobEnded {
        id: String,
        job: JobId,
        state: crate::job::JobState,
    },
    /// The caller may not decide it (approval separation).
    #[error("{0}")]
    Refused(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(
        "the scheduler of approval {0}'s graph did not answer in time (it is busy, or the server is stopping); the decision may still apply: read the approval again before deciding again"
    )]
    Unavailable(String),
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_condition_holds_on_the_step_input() {
        let c = Condition::compile("input.amount > 1000").unwrap();
        assert!(c.holds(&json!({"input": {"amount": 1500}})).unwrap());
        assert!(!c.holds(&json!({"input": {"amount": 10}})).unwrap());
        // A missing field is an error, which the engine treats as "approval needed".
        assert!(c.holds(&json!({"input": {}})).is_err());
        let deps = Condition::compile("deps.classify.label == 'refund'").unwrap();
        assert!(
            deps.holds(&json!({"deps": {"classify": {"label": "refund"}}}))
                .unwrap()
        );
    }

    #[test]
    fn a_bad_condition_says_what_to_write() {
        assert!(
            Condition::compile("{{ input.x }}")
                .unwrap_err()
                .contains("without braces")
        );
        assert!(Condition::compile("  ").unwrap_err().contains("empty"));
        assert!(
            Condition::compile("input.amount >")
                .unwrap_err()
                .contains("not a valid expression")
        );
    }

    #[test]
    fn canonical_text_sorts_keys_and_has_no_whitespace() {
        let v: Value = serde_json::from_str(r#"{ "b": 1, "a": {"d": [1, 2], "c": "x"} }"#).unwrap();
        assert_eq!(canonical(&v), r#"{"a":{"c":"x","d":[1,2]},"b":1}"#);
    }

    #[test]
    fn approval_ids_name_a_job_and_an_agent() {
        let job = JobId::new();
        let id = approval_id(job, "pay");
        assert_eq!(parse_approval_id(&id).unwrap(), (job, "pay"));
        assert!(parse_approval_id("nope").is_err());
        assert_eq!(
            parse_approval_id(&format!("{job}/pay/3")).unwrap(),
            (job, "pay")
        );
        assert!(parse_approval_id(&format!("{job}/pay/0")).is_err());
        assert!(parse_approval_id(&format!("{job}/pay/x")).is_err());
        assert!(parse_approval_id("not-a-uuid/pay").is_err());
    }
}
