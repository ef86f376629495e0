//! Tool-using LLM agents: the provider-neutral pieces of the loop the orchestrator runs (a
//! turn of the model, the tools it may call, what it asked for, what each call answered).
//!
//! ```toml
//! [agents.triage]
//! kind = "llm"
//! model = "gpt-4o-mini"
//! prompt = "Resolve ticket {{ input.ticket }}"
//! tools = ["crm.lookup_customer", "tickets.*"]     # server.tool, globs allowed
//! tool_approval = { "crm.lookup_customer" = "never", "tickets.close" = "required" }
//! max_turns = 8                                     # model turns, at most (default 8)
//! max_tool_result_bytes = 16384                     # a longer tool result is cut (default 16 KiB)
//! ```
//!
//! The model sees each tool as `<server>__<tool>` (provider function names allow only
//! `[a-zA-Z0-9_-]`, at most 64 characters). The loop itself — one journaled sub-step per turn
//! and per tool call — is the orchestrator's; this module holds what it needs of a kind.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::mcp::{self, McpServers};
use crate::{AgentError, CallContext, StepInput, UpstreamLimits, Usage};

pub const DEFAULT_MAX_TURNS: u32 = 8;
pub const DEFAULT_MAX_RESULT_BYTES: usize = 16 << 10;

/// Whether a person approves a tool's calls: `auto` follows the tool's annotations (irreversible
/// unless read-only or not destructive).
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum ToolApproval {
    #[default]
    Auto,
    Required,
    Never,
}

/// An agent's tool settings.
#[derive(Clone, Debug, PartialEq)]
pub struct ToolUse {
    /// `server.tool` patterns (`*` matches any run of characters).
    pub tools: Vec<String>,
    pub max_turns: u32,
    /// Per `server.tool`.
    pub tool_approval: BTreeMap<String, ToolApproval>,
    pub max_result_bytes: usize,
}

impl ToolUse {
    /// The MCP servers its patterns name, each once.
    pub fn servers(&self) -> Vec<String> {
        let mut s: Vec<String> = self
            .tools
            .iter()
            .filter_map(|p| p.split_once('.').map(|(s, _)| s.to_string()))
            .collect();
        s.sort_unstable();
        s.dedup();
        s
    }
}

/// A tool the model may call.
#[derive(Clone, Debug, Serialize)]
pub struct ToolDef {
    /// As the model sees it: `<server>__<tool>`.
    pub name: String,
    pub server: String,
    pub tool: String,
    pub description: String,
    pub input_schema: Value,
    /// Whether its calls wait for a person's approval.
    pub needs_approval: bool,
}

/// What the model asked for: one call of one tool.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ToolCall {
    /// The provider's id of the call, which its result names.
    pub id: String,
    /// The tool as the model named it (`<server>__<tool>`).
    pub name: String,
    pub arguments: Value,
}

/// One entry of the conversation after the opening messages.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "role", rename_all = "snake_case")]
pub enum Message {
    /// The model's turn: its text and the tools it called.
    Assistant {
        text: String,
        tool_calls: Vec<ToolCall>,
    },
    /// A tool call's result, as the model reads it.
    Tool {
        call_id: String,
        name: String,
        content: String,
        is_error: bool,
    },
}

/// The opening messages, rendered from the step input once per run of the loop.
#[derive(Clone, Debug)]
pub struct Opening {
    pub system: Option<String>,
    pub prompt: String,
}

/// One model turn's answer.
#[derive(Clone, Debug)]
pub struct Turn {
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub finish_reason: Value,
    pub model: Value,
    pub usage: Usage,
    pub limits: Option<UpstreamLimits>,
}

/// A kind whose agents may call tools; the orchestrator runs the loop.
#[async_trait::async_trait]
pub trait ToolUser: Send + Sync {
    fn tool_use(&self) -> &ToolUse;

    /// The MCP servers the tools are on.
    fn mcp_servers(&self) -> &Arc<McpServers>;

    /// The opening messages for this step.
    fn opening(&self, ctx: &CallContext, input: &StepInput) -> Result<Opening, AgentError>;

    /// What a turn with this conversation will spend at most (reserved against token quotas).
    fn estimate_turn(&self, opening: &Opening, history: &[Message]) -> Usage;

    /// Ask the model once, offering `tools`.
    async fn turn(
        &self,
        ctx: &CallContext,
        opening: &Opening,
        history: &[Message],
        tools: &[ToolDef],
    ) -> Result<Turn, AgentError>;

    /// The step's output from the last turn (the one that called no tool), as a call without
    /// tools would answer: its text, or its JSON checked against the schema.
    fn final_output(&self, turn: &Turn) -> Result<Value, AgentError>;
}

/// The name the model sees for `server.tool`: `[a-zA-Z0-9_-]` only, at most 64 characters.
pub fn model_name(server: &str, tool: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let mut name = format!("{}__{}", clean(server), clean(tool));
    name.truncate(64);
    name
}

/// Whether `name` matches `pattern`, where `*` matches any run of characters.
pub fn glob_match(pattern: &str, name: &str) -> bool {
    // A pattern is a handful of characters; the classic two-pointer match with backtracking to
    // the last star is all it needs (no crate for this).
    let (p, n) = (pattern.as_bytes(), name.as_bytes());
    let (mut i, mut j) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while j < n.len() {
        if i < p.len() && p[i] == b'*' {
            star = Some((i, j));
            i += 1;
        } else if i < p.len() && p[i] == n[j] {
            i += 1;
            j += 1;
        } else if let Some((si, sj)) = star {
            i = si + 1;
            j = sj + 1;
            star = Some((si, sj + 1));
        } else {
            return false;
        }
    }
    p[i..].iter().all(|&c| c == b'*')
}

/// Check an agent's tool patterns against the servers' tools as listed (those not reached yet
/// are not checked): each pattern must match a tool, else the error lists the server's tools.
pub fn check_patterns(servers: &McpServers, tool_use: &ToolUse) -> Result<(), String> {
    for pattern in &tool_use.tools {
        let (server, tool) = pattern.split_once('.').unwrap_or((pattern, "*"));
        let Some(tools) = servers.get(server).and_then(|s| s.cached_tools()) else {
            continue;
        };
        if !tools.iter().any(|t| glob_match(tool, &t.name)) {
            let mut names: Vec<&str> = tools.iter().map(|t| &*t.name).collect();
            names.sort_unstable();
            return Err(format!(
                "no tool of MCP server {server:?} matches {pattern:?}; its tools: {}",
                names.join(", ")
            ));
        }
    }
    for name in tool_use.tool_approval.keys() {
        if !tool_use.tools.iter().any(|p| glob_match(p, name)) {
            return Err(format!(
                "tool_approval names {name:?}, which no pattern in tools offers"
            ));
        }
    }
    Ok(())
}

/// Check a tool-using `llm` agent's fields (`tools`, `tool_approval`) against its servers'
/// tools as listed, as [`check_patterns`] does; `Ok` for an agent without tools.
pub fn check_agent(
    servers: &McpServers,
    fields: &serde_json::Map<String, Value>,
) -> Result<(), String> {
    let strings = |v: Option<&Value>| -> Vec<String> {
        v.and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default()
    };
    let tools = strings(fields.get("tools"));
    if tools.is_empty() {
        return Ok(());
    }
    let tool_approval = fields
        .get("tool_approval")
        .and_then(|v| serde_json::from_value(v.clone()).ok())
        .unwrap_or_default();
    check_patterns(
        servers,
        &ToolUse {
            tools,
            max_turns: DEFAULT_MAX_TURNS,
            tool_approval,
            max_result_bytes: DEFAULT_MAX_RESULT_BYTES,
        },
    )
}

/// The tools the patterns offer, from their servers' current lists (connecting to each server
/// that is not connected), in a stable order, each with whether its calls need approval.
pub async fn resolve(servers: &McpServers, tool_use: &ToolUse) -> Result<Vec<ToolDef>, AgentError> {
    let mut out: Vec<ToolDef> = Vec::new();
    for server_name in tool_use.servers() {
        let server = servers.get(&server_name).ok_or_else(|| {
            AgentError::permanent(format!("no MCP server {server_name:?} is declared"))
        })?;
        let tools = server.tools().await?;
        for t in tools.iter() {
            let full = format!("{server_name}.{}", t.name);
            if !tool_use.tools.iter().any(|p| glob_match(p, &full)) {
                continue;
            }
            let needs_approval = match tool_use.tool_approval.get(&full).copied() {
                Some(ToolApproval::Never) => false,
                Some(ToolApproval::Required) => true,
                Some(ToolApproval::Auto) | None => mcp::irreversible(t),
            };
            out.push(ToolDef {
                name: model_name(&server_name, &t.name),
                server: server_name.clone(),
                tool: t.name.to_string(),
                description: t.description.as_deref().unwrap_or_default().to_string(),
                input_schema: Value::Object((*t.input_schema).clone()),
                needs_approval,
            });
        }
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out.dedup_by(|a, b| a.name == b.name);
    if out.is_empty() {
        return Err(AgentError::permanent(format!(
            "no tool matches {:?} on the servers' current tool lists",
            tool_use.tools
        )));
    }
    Ok(out)
}

/// A tool result as the model reads it, cut to `max` bytes (on a character boundary) with a
/// note saying how much was left out.
pub fn limit_result(text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}… [cut: {} of {} bytes shown]",
        &text[..end],
        end,
        text.len()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs_match_runs_of_characters() {
        assert!(glob_match("tickets.*", "tickets.close"));
        assert!(glob_match("crm.lookup_*", "crm.lookup_customer"));
        assert!(glob_match("*", "anything"));
        assert!(glob_match("a*c*e", "abcde"));
        assert!(!glob_match("tickets.*", "crm.close"));
        assert!(!glob_match("crm.lookup", "crm.lookup_customer"));
        assert!(glob_match("crm.lookup_customer", "crm.lookup_customer"));
    }

    #[test]
    fn model_names_keep_to_the_providers_alphabet() {
        assert_eq!(model_name("crm", "lookup_customer"), "crm__lookup_customer");
        assert_eq!(model_name("my crm", "get.v2"), "my_crm__get_v2");
        assert_eq!(model_name("s", &"x".repeat(100)).len(), 64);
    }

    #[test]
    fn long_results_are_cut_on_a_character_boundary() {
        let cut = limit_result("é".repeat(10), 5);
        assert!(cut.starts_with("éé…"), "{cut}");
        assert!(cut.contains("4 of 20 bytes"), "{cut}");
        assert_eq!(limit_result("short".into(), 10), "short");
    }
}
