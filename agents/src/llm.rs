//! `kind = "llm"`: a chat completion from an OpenAI-compatible server (OpenAI, Azure-style
//! gateways, LiteLLM, vLLM, llama.cpp's server, Ollama's `/v1`) or Anthropic's Messages API.
//!
//! ```toml
//! [agents.classify]
//! kind = "llm"
//! provider = "openai"                 # default; or "anthropic"
//! base_url = "http://127.0.0.1:11434/v1"   # default: $OPENAI_BASE_URL, else the provider's public URL
//! api_key = "env:OPENAI_API_KEY"      # default (env:ANTHROPIC_API_KEY for anthropic); a secret reference
//! model = "gpt-4o-mini"
//! system = "You label support tickets."
//! prompt = "Label this ticket: {{ input.body }}"   # templates over input, deps, job
//! temperature = 0.0
//! max_tokens = 64
//! response = "json"                   # default "text"; "json" parses the reply (a bad one is retried)
//! schema = { type = "object", required = ["label"], properties = { label = { enum = ["billing", "bug"] } } }
//!                                     # with "json": a JSON Schema every reply is checked against
//! headers = { "OpenAI-Organization" = "env:OPENAI_ORG" }   # values may be secret references
//! ```
//!
//! Output: `{"text"` (or `"json"`)`, "model", "finish_reason", "usage": {"prompt_tokens",
//! "completion_tokens"}}`. Before a call the agent estimates what it will spend so that token
//! quotas can reserve it: its messages, rendered, counted with the model's own tokenizer where
//! the model is an OpenAI one (tiktoken's `o200k_base` for gpt-4o, gpt-4.1, gpt-5, o1/o3/o4;
//! `cl100k_base` for gpt-4 and gpt-3.5, chosen by model name) and at one token per four
//! characters otherwise (Anthropic's models and open-weight ones publish no tokenizer this
//! crate can run; English prose averages about four characters a token), plus a few tokens of
//! message framing, plus `max_tokens` (256 when unset); the quota settles on the usage the reply
//! reports. Answers are classified as the `http` kind's are: 429 pauses with
//! the longest delay the provider's headers give, 408/5xx/529 retry, 401 is a refused key. A
//! reply that is not the JSON asked for, or breaks the `schema`, is retried as transient (the
//! model may answer well next time) until the attempts run out; the step then fails naming the
//! violation.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use crate::http::{HttpClients, Upstream, classify, read_capped, transport_error};
use crate::secret::{SecretCell, SecretRef, TextOrSecret};
use crate::template::JsonTemplate;
use crate::tools::{Message, Opening, ToolApproval, ToolDef, ToolUse, ToolUser, Turn};
use crate::{
    Agent, AgentError, AgentOutput, AgentSpec, CallContext, FieldError, KindSpec, StepInput,
    UpstreamLimits, Usage,
};

pub const KIND: KindSpec = KindSpec {
    name: "llm",
    fields: &[
        "provider",
        "base_url",
        "api_key",
        "model",
        "system",
        "prompt",
        "temperature",
        "max_tokens",
        "response",
        "schema",
        "headers",
        "upstream",
        "tools",
        "max_turns",
        "tool_approval",
        "max_tool_result_bytes",
    ],
    required: &["model", "prompt"],
    build,
    upstream: upstream_name,
    credential: credential_name,
    may_be_irreversible: false,
};

/// The reply of a provider is small; a runaway one is cut here.
const MAX_REPLY_BYTES: u64 = 16 << 20;
/// Anthropic requires `max_tokens`; OpenAI-compatible servers take none by default.
const ANTHROPIC_DEFAULT_MAX_TOKENS: u64 = 1024;
const ANTHROPIC_VERSION: &str = "2023-06-01";

#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Provider {
    Openai,
    Anthropic,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "lowercase")]
enum Response {
    #[default]
    Text,
    Json,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default)]
    provider: Option<Provider>,
    #[serde(default)]
    base_url: Option<String>,
    #[serde(default)]
    api_key: Option<SecretRef>,
    model: String,
    #[serde(default)]
    system: Option<String>,
    prompt: String,
    #[serde(default)]
    temperature: Option<f64>,
    #[serde(default)]
    max_tokens: Option<u64>,
    #[serde(default)]
    response: Response,
    #[serde(default)]
    schema: Option<Value>,
    #[serde(default)]
    headers: std::collections::BTreeMap<String, TextOrSecret>,
    #[serde(default)]
    #[allow(dead_code)] // read by `upstream_name`
    upstream: Option<String>,
    #[serde(default)]
    tools: Vec<String>,
    #[serde(default)]
    max_turns: Option<u32>,
    #[serde(default)]
    tool_approval: std::collections::BTreeMap<String, ToolApproval>,
    #[serde(default)]
    max_tool_result_bytes: Option<usize>,
}

/// The server the agent calls: `base_url` (a URL, or `env:NAME` holding one), else
/// `$OPENAI_BASE_URL` / `$ANTHROPIC_BASE_URL`, else the provider's public URL.
fn base_url(provider: Provider, configured: Option<&str>) -> Result<String, String> {
    let url = match configured {
        Some(v) if v.starts_with("env:") => {
            let name = &v[4..];
            std::env::var(name).map_err(|_| format!("environment variable {name} is not set"))?
        }
        Some(v) => v.to_string(),
        None => {
            let (var, public) = match provider {
                Provider::Openai => ("OPENAI_BASE_URL", "https://api.openai.com/v1"),
                Provider::Anthropic => ("ANTHROPIC_BASE_URL", "https://api.anthropic.com"),
            };
            std::env::var(var).unwrap_or_else(|_| public.to_string())
        }
    };
    let parsed = reqwest::Url::parse(&url)
        .map_err(|e| format!("{url:?} is not a URL ({e}); e.g. \"http://127.0.0.1:11434/v1\""))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err("the scheme must be http or https".into());
    }
    Ok(url.trim_end_matches('/').to_string())
}

fn provider_of(spec: &AgentSpec<'_>) -> Provider {
    match spec.fields.get("provider").and_then(Value::as_str) {
        Some("anthropic") => Provider::Anthropic,
        _ => Provider::Openai,
    }
}

/// The upstream: `upstream`, else the origin of the base URL.
fn upstream_name(spec: &AgentSpec<'_>) -> Option<String> {
    if let Some(Value::String(name)) = spec.fields.get("upstream") {
        return Some(name.clone());
    }
    let configured = spec.fields.get("base_url").and_then(Value::as_str);
    base_url(provider_of(spec), configured)
        .ok()
        .and_then(|u| crate::http::origin_of(&u))
        .or_else(|| Some(format!("{}.{}", spec.graph, spec.name)))
}

/// The credential: the agent's API key (`graph.agent`), when it has one. A key refused with 401
/// even after it was read again from its source pauses the agent and its downstream with cause
/// `credential:<graph.agent>` (see [`crate::http::health`]).
fn credential_name(spec: &AgentSpec<'_>) -> Option<String> {
    let default = match provider_of(spec) {
        Provider::Openai => "OPENAI_API_KEY",
        Provider::Anthropic => "ANTHROPIC_API_KEY",
    };
    (spec.fields.contains_key("api_key") || std::env::var_os(default).is_some())
        .then(|| format!("{}.{}", spec.graph, spec.name))
}

enum HeaderValue {
    Literal(String),
    Secret(SecretCell),
}

pub struct LlmAgent {
    provider: Provider,
    endpoint: String,
    api_key: Option<Arc<SecretCell>>,
    /// The key and its health, shared by the agents of its credential.
    fixed: Option<crate::http::health::FixedKey>,
    model: String,
    /// `{"system": …, "prompt": …}`, rendered per call.
    messages: JsonTemplate,
    temperature: Option<f64>,
    max_tokens: Option<u64>,
    response: Response,
    /// Checked on every JSON reply.
    schema: Option<jsonschema::Validator>,
    /// The model's tokenizer, for estimates; `None`: the heuristic.
    tokenizer: Option<&'static tiktoken_rs::CoreBPE>,
    headers: Vec<(reqwest::header::HeaderName, HeaderValue)>,
    upstream: Upstream,
    prices: Arc<Prices>,
    /// With `tools`: the orchestrator runs a tool loop over [`ToolUser`].
    tool_use: Option<ToolUse>,
    servers: Arc<crate::mcp::McpServers>,
}

fn build(spec: &AgentSpec<'_>) -> Result<Arc<dyn Agent>, FieldError> {
    let c: Config = spec.parse()?;
    let servers = spec.resources.get::<crate::mcp::McpServers>();
    let tool_use = tool_use(&c, &servers)?;
    let provider = c.provider.unwrap_or(Provider::Openai);
    let base =
        base_url(provider, c.base_url.as_deref()).map_err(|e| FieldError::new("base_url", e))?;
    let endpoint = match provider {
        Provider::Openai => format!("{base}/chat/completions"),
        Provider::Anthropic => format!("{base}/v1/messages"),
    };
    let api_key = match c.api_key {
        Some(r) => Some(Arc::new(
            SecretCell::load(r).map_err(|e| FieldError::new("api_key", e))?,
        )),
        // The default reference is optional: a local server (Ollama, llama.cpp) needs no key.
        None => {
            let var = match provider {
                Provider::Openai => "OPENAI_API_KEY",
                Provider::Anthropic => "ANTHROPIC_API_KEY",
            };
            std::env::var_os(var)
                .and_then(|_| SecretCell::load(SecretRef::Env(var.into())).ok())
                .map(Arc::new)
        }
    };
    if c.model.trim().is_empty() {
        return Err(FieldError::new(
            "model",
            "name the model, e.g. \"gpt-4o-mini\"",
        ));
    }
    if let Some(t) = c.temperature
        && !(0.0..=2.0).contains(&t)
    {
        return Err(FieldError::new("temperature", "between 0.0 and 2.0"));
    }
    if c.max_tokens == Some(0) {
        return Err(FieldError::new("max_tokens", "at least 1"));
    }
    let mut templates = serde_json::Map::new();
    templates.insert("prompt".into(), Value::String(c.prompt));
    if let Some(system) = c.system {
        templates.insert("system".into(), Value::String(system));
    }
    let messages = JsonTemplate::compile(&Value::Object(templates), &[])?;
    let mut headers = Vec::new();
    for (k, v) in c.headers {
        let name =
            reqwest::header::HeaderName::from_bytes(k.as_bytes()).map_err(|_| FieldError {
                path: vec!["headers".into(), k.clone()],
                message: "not a valid header name".into(),
            })?;
        let value = match v {
            TextOrSecret::Secret(r) => {
                HeaderValue::Secret(SecretCell::load(r).map_err(|e| FieldError {
                    path: vec!["headers".into(), k.clone()],
                    message: e,
                })?)
            }
            TextOrSecret::Text(t) => HeaderValue::Literal(t),
        };
        headers.push((name, value));
    }
    let name = upstream_name(spec).unwrap_or_default();
    let upstream = spec
        .resources
        .get::<HttpClients>()
        .get(&name, None)
        .map_err(|e| FieldError::new("base_url", e))?;
    let schema = match &c.schema {
        None => None,
        Some(_) if c.response != Response::Json => {
            return Err(FieldError::new(
                "schema",
                "a schema checks JSON replies: set response = \"json\" too",
            ));
        }
        Some(s) => Some(
            jsonschema::validator_for(s)
                .map_err(|e| FieldError::new("schema", format!("not a valid JSON Schema: {e}")))?,
        ),
    };
    let tokenizer = tokenizer_for(provider, &c.model);
    let fixed = api_key.as_ref().and_then(|cell| {
        Some(crate::http::health::FixedKey {
            cell: cell.clone(),
            health: spec
                .resources
                .get::<crate::http::health::KeyHealth>()
                .get(&credential_name(spec)?),
        })
    });
    Ok(Arc::new(LlmAgent {
        provider,
        tokenizer,
        endpoint,
        api_key,
        fixed,
        model: c.model,
        messages,
        temperature: c.temperature,
        max_tokens: c.max_tokens,
        response: c.response,
        schema,
        headers,
        upstream,
        prices: spec.resources.get::<Prices>(),
        tool_use,
        servers,
    }))
}

/// The agent's tool settings, checked: each pattern is `server.tool` on a declared server, and
/// the tool settings without `tools` are refused.
fn tool_use(c: &Config, servers: &crate::mcp::McpServers) -> Result<Option<ToolUse>, FieldError> {
    if c.tools.is_empty() {
        for (field, set) in [
            ("max_turns", c.max_turns.is_some()),
            ("tool_approval", !c.tool_approval.is_empty()),
            ("max_tool_result_bytes", c.max_tool_result_bytes.is_some()),
        ] {
            if set {
                return Err(FieldError::new(
                    field,
                    "a tool setting without tools: add tools = [\"server.tool\", …]",
                ));
            }
        }
        return Ok(None);
    }
    let declared = servers.names();
    for (i, pattern) in c.tools.iter().enumerate() {
        let at = |message: String| FieldError {
            path: vec!["tools".into(), i.to_string()],
            message,
        };
        let Some((server, tool)) = pattern.split_once('.') else {
            return Err(at(format!(
                "{pattern:?} is not server.tool; write e.g. \"crm.lookup_customer\" or \"crm.*\""
            )));
        };
        if tool.is_empty() {
            return Err(at(format!(
                "{pattern:?} names no tool; write \"{server}.*\" for all of them"
            )));
        }
        if !declared.iter().any(|d| d == server) {
            return Err(at(if declared.is_empty() {
                format!(
                    "no MCP server {server:?} is declared; declare it in cascade.toml ([mcp_servers.{server}]) and pass --config"
                )
            } else {
                format!(
                    "no MCP server {server:?} is declared; the declared ones: {}",
                    declared.join(", ")
                )
            }));
        }
    }
    if c.max_turns == Some(0) {
        return Err(FieldError::new("max_turns", "at least 1"));
    }
    if c.max_tool_result_bytes.is_some_and(|b| b < 64) {
        return Err(FieldError::new("max_tool_result_bytes", "at least 64"));
    }
    let t = ToolUse {
        tools: c.tools.clone(),
        max_turns: c.max_turns.unwrap_or(crate::tools::DEFAULT_MAX_TURNS),
        tool_approval: c.tool_approval.clone(),
        max_result_bytes: c
            .max_tool_result_bytes
            .unwrap_or(crate::tools::DEFAULT_MAX_RESULT_BYTES),
    };
    if let Some(name) = t
        .tool_approval
        .keys()
        .find(|n| !t.tools.iter().any(|p| crate::tools::glob_match(p, n)))
    {
        return Err(FieldError {
            path: vec!["tool_approval".into(), name.clone()],
            message: format!(
                "{name:?} is not among the tools; tools offers {:?}",
                t.tools
            ),
        });
    }
    Ok(Some(t))
}

/// What a model's tokens cost, from `[prices."MODEL"]` in `cascade.toml`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub prompt_per_million: f64,
    pub completion_per_million: f64,
}

/// The price table of a registry's agents, set by the orchestrator before it builds them. A
/// model without a price costs nothing (its tokens still count).
#[derive(Debug, Default)]
pub struct Prices(std::sync::RwLock<std::collections::HashMap<String, Price>>);

impl Prices {
    pub fn set(&self, table: impl IntoIterator<Item = (String, Price)>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = table.into_iter().collect();
    }

    /// The cost of `usage` on the first of `models` that has a price (the reply's model, then
    /// the configured one: a provider may answer with a dated version of the model asked for).
    pub fn cost(&self, models: &[&str], usage: &Usage) -> f64 {
        let table = self.0.read().unwrap_or_else(|p| p.into_inner());
        models.iter().find_map(|m| table.get(*m)).map_or(0.0, |p| {
            (usage.prompt_tokens as f64 * p.prompt_per_million
                + usage.completion_tokens as f64 * p.completion_per_million)
                / 1e6
        })
    }
}

/// The documented prompt estimate: one token per four characters, rounded up.
pub fn estimate_tokens(text: &str) -> u64 {
    (text.chars().count() as u64).div_ceil(4)
}

/// What a chat request adds to its messages' text: a few tokens per message and the reply's
/// priming (OpenAI documents 3 per message and 3 for the reply).
const MESSAGE_FRAMING_TOKENS: u64 = 10;

/// The tokenizer of an OpenAI model, by its name (`ft:` fine-tunes by their base); `None` for
/// any other model. Loaded once per process (a few hundred milliseconds, at the first agent
/// that needs it: when its graph is loaded, not on a call's path).
fn tokenizer_for(provider: Provider, model: &str) -> Option<&'static tiktoken_rs::CoreBPE> {
    use tiktoken_rs::tokenizer::{Tokenizer, get_tokenizer};
    if provider != Provider::Openai {
        return None;
    }
    Some(match get_tokenizer(model)? {
        Tokenizer::O200kBase => tiktoken_rs::o200k_base_singleton(),
        Tokenizer::O200kHarmony => tiktoken_rs::o200k_harmony_singleton(),
        Tokenizer::Cl100kBase => tiktoken_rs::cl100k_base_singleton(),
        Tokenizer::P50kBase => tiktoken_rs::p50k_base_singleton(),
        Tokenizer::P50kEdit => tiktoken_rs::p50k_edit_singleton(),
        Tokenizer::R50kBase | Tokenizer::Gpt2 => tiktoken_rs::r50k_base_singleton(),
    })
}

impl LlmAgent {
    fn redact(&self, s: &str) -> String {
        let mut out = s.to_string();
        if let Some(k) = &self.api_key {
            out = k.redact(&out);
        }
        for (_, v) in &self.headers {
            if let HeaderValue::Secret(cell) = v {
                out = cell.redact(&out);
            }
        }
        out
    }

    /// `text`'s tokens: the model's tokenizer, or the four-characters heuristic.
    fn count_tokens(&self, text: &str) -> u64 {
        match self.tokenizer {
            Some(bpe) => bpe.encode_ordinary(text).len() as u64,
            None => estimate_tokens(text),
        }
    }

    fn max_tokens(&self) -> Option<u64> {
        match self.provider {
            Provider::Anthropic => Some(self.max_tokens.unwrap_or(ANTHROPIC_DEFAULT_MAX_TOKENS)),
            Provider::Openai => self.max_tokens,
        }
    }

    fn body(&self, system: Option<&str>, prompt: &str) -> Value {
        self.body_with(system, prompt, &[], &[])
    }

    /// The request body: the opening messages, then the conversation so far in the provider's
    /// own shape (OpenAI's `tool_calls` and `tool` messages; Anthropic's `tool_use` blocks and
    /// `tool_result` blocks in a user message), and the tools offered.
    fn body_with(
        &self,
        system: Option<&str>,
        prompt: &str,
        history: &[Message],
        tools: &[ToolDef],
    ) -> Value {
        let mut body = match self.provider {
            Provider::Openai => {
                let mut messages = Vec::new();
                if let Some(s) = system {
                    messages.push(json!({"role": "system", "content": s}));
                }
                messages.push(json!({"role": "user", "content": prompt}));
                for m in history {
                    messages.push(match m {
                        Message::Assistant { text, tool_calls } => {
                            let mut a = json!({"role": "assistant", "content": if text.is_empty() { Value::Null } else { json!(text) }});
                            if !tool_calls.is_empty() {
                                a["tool_calls"] = tool_calls
                                    .iter()
                                    .map(|c| json!({"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments.to_string()}}))
                                    .collect();
                            }
                            a
                        }
                        Message::Tool {
                            call_id, content, ..
                        } => json!({"role": "tool", "tool_call_id": call_id, "content": content}),
                    });
                }
                let mut b = json!({"model": self.model, "messages": messages});
                if self.response == Response::Json {
                    b["response_format"] = json!({"type": "json_object"});
                }
                if !tools.is_empty() {
                    b["tools"] = tools
                        .iter()
                        .map(|t| json!({"type": "function", "function": {"name": t.name, "description": t.description, "parameters": t.input_schema}}))
                        .collect();
                }
                b
            }
            Provider::Anthropic => {
                let mut messages = vec![json!({"role": "user", "content": prompt})];
                for m in history {
                    match m {
                        Message::Assistant { text, tool_calls } => {
                            let mut content = Vec::new();
                            if !text.is_empty() {
                                content.push(json!({"type": "text", "text": text}));
                            }
                            for c in tool_calls {
                                content.push(json!({"type": "tool_use", "id": c.id, "name": c.name, "input": c.arguments}));
                            }
                            messages.push(json!({"role": "assistant", "content": content}));
                        }
                        Message::Tool {
                            call_id,
                            content,
                            is_error,
                            ..
                        } => {
                            let block = json!({"type": "tool_result", "tool_use_id": call_id, "content": content, "is_error": is_error});
                            // The results of one turn's calls go back in one user message.
                            match messages.last_mut() {
                                Some(last)
                                    if last["role"] == "user" && last["content"].is_array() =>
                                {
                                    last["content"]
                                        .as_array_mut()
                                        .expect("an array")
                                        .push(block)
                                }
                                _ => messages.push(json!({"role": "user", "content": [block]})),
                            }
                        }
                    }
                }
                let mut b = json!({
                    "model": self.model,
                    "messages": messages,
                });
                if let Some(s) = system {
                    b["system"] = json!(s);
                }
                if !tools.is_empty() {
                    b["tools"] = tools
                        .iter()
                        .map(|t| json!({"name": t.name, "description": t.description, "input_schema": t.input_schema}))
                        .collect();
                }
                b
            }
        };
        if let Some(t) = self.temperature {
            body["temperature"] = json!(t);
        }
        if let Some(m) = self.max_tokens() {
            body["max_tokens"] = json!(m);
        }
        body
    }

    /// The reply's text, finish reason, model and usage.
    fn parse_reply(&self, reply: &Value) -> Result<(String, Value, Value, Usage), AgentError> {
        let bad = |what: &str| AgentError::transient(format!("the provider's reply has no {what}"));
        match self.provider {
            Provider::Openai => {
                let choice = reply
                    .pointer("/choices/0")
                    .ok_or_else(|| bad("choices[0]"))?;
                let text = choice
                    .pointer("/message/content")
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string();
                let usage = Usage {
                    prompt_tokens: reply
                        .pointer("/usage/prompt_tokens")
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                    completion_tokens: reply
                        .pointer("/usage/completion_tokens")
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                    cost_usd: 0.0,
                };
                Ok((
                    text,
                    choice.get("finish_reason").cloned().unwrap_or(Value::Null),
                    reply
                        .get("model")
                        .cloned()
                        .unwrap_or_else(|| json!(self.model)),
                    usage,
                ))
            }
            Provider::Anthropic => {
                let blocks = reply
                    .get("content")
                    .and_then(Value::as_array)
                    .ok_or_else(|| bad("content"))?;
                let text: String = blocks
                    .iter()
                    .filter(|b| b.get("type").and_then(Value::as_str) == Some("text"))
                    .filter_map(|b| b.get("text").and_then(Value::as_str))
                    .collect();
                let usage = Usage {
                    prompt_tokens: reply
                        .pointer("/usage/input_tokens")
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                    completion_tokens: reply
                        .pointer("/usage/output_tokens")
                        .and_then(Value::as_u64)
                        .unwrap_or(0),
                    cost_usd: 0.0,
                };
                Ok((
                    text,
                    reply.get("stop_reason").cloned().unwrap_or(Value::Null),
                    reply
                        .get("model")
                        .cloned()
                        .unwrap_or_else(|| json!(self.model)),
                    usage,
                ))
            }
        }
    }
}

/// The tools a reply asks to call: OpenAI's `message.tool_calls` (arguments as a JSON string; one
/// that does not parse is kept as the string, and refused to the model by the loop) or
/// Anthropic's `tool_use` content blocks.
fn parse_tool_calls(provider: Provider, reply: &Value) -> Vec<crate::tools::ToolCall> {
    let str_of = |v: &Value, k: &str| {
        v.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    match provider {
        Provider::Openai => reply
            .pointer("/choices/0/message/tool_calls")
            .and_then(Value::as_array)
            .map(|calls| {
                calls
                    .iter()
                    .map(|c| {
                        let raw = c.pointer("/function/arguments");
                        let arguments = match raw {
                            Some(Value::String(s)) if s.trim().is_empty() => json!({}),
                            Some(Value::String(s)) => {
                                serde_json::from_str(s).unwrap_or_else(|_| Value::String(s.clone()))
                            }
                            Some(v) => v.clone(),
                            None => json!({}),
                        };
                        crate::tools::ToolCall {
                            id: str_of(c, "id"),
                            name: c
                                .pointer("/function/name")
                                .and_then(Value::as_str)
                                .unwrap_or_default()
                                .to_string(),
                            arguments,
                        }
                    })
                    .collect()
            })
            .unwrap_or_default(),
        Provider::Anthropic => reply
            .get("content")
            .and_then(Value::as_array)
            .map(|blocks| {
                blocks
                    .iter()
                    .filter(|b| b.get("type").and_then(Value::as_str) == Some("tool_use"))
                    .map(|b| crate::tools::ToolCall {
                        id: str_of(b, "id"),
                        name: str_of(b, "name"),
                        arguments: b.get("input").cloned().unwrap_or_else(|| json!({})),
                    })
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// A JSON reply, with a Markdown code fence around it tolerated (models add them).
fn parse_json_reply(text: &str) -> Result<Value, serde_json::Error> {
    let t = text.trim();
    let t = t
        .strip_prefix("```json")
        .or_else(|| t.strip_prefix("```"))
        .and_then(|r| r.strip_suffix("```"))
        .unwrap_or(t);
    serde_json::from_str(t.trim())
}

impl LlmAgent {
    /// One request of `body` with `key`, as sent (no answer read yet).
    async fn send(&self, body: &Value, key: Option<&str>) -> Result<reqwest::Response, AgentError> {
        let mut req = self.upstream.client.post(&self.endpoint).json(body);
        match (self.provider, key) {
            (Provider::Openai, Some(k)) => req = req.bearer_auth(k),
            (Provider::Anthropic, Some(k)) => req = req.header("x-api-key", k),
            (_, None) => {}
        }
        if self.provider == Provider::Anthropic {
            req = req.header("anthropic-version", ANTHROPIC_VERSION);
        }
        for (name, v) in &self.headers {
            let value = match v {
                HeaderValue::Literal(s) => s.clone(),
                HeaderValue::Secret(cell) => cell.get()?,
            };
            req = req.header(name.clone(), value);
        }
        req.send().await.map_err(|e| {
            let e = transport_error(e);
            AgentError {
                message: self.redact(&e.message),
                ..e
            }
        })
    }

    /// Send `body` to the provider: its reply as JSON and the limits its headers told, or the
    /// classified refusal (with those limits).
    async fn post(&self, body: &Value) -> Result<(Value, Option<UpstreamLimits>), AgentError> {
        // The key, unless it was refused a moment ago (then its calls wait with it).
        let key = match &self.fixed {
            Some(k) => Some(k.value().await?),
            None => None,
        };
        let _slot = self.upstream.slot().await?;
        let mut resp = self.send(body, key.as_deref()).await?;
        if let (Some(k), Some(used)) = (&self.fixed, &key) {
            let again = |fresh: String| async move { self.send(body, Some(&fresh)).await };
            resp = k.answer(resp, used, again, &|t| self.redact(t)).await?;
        }
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let limits = classify::upstream_limits(&headers);
        if !(200..300).contains(&status) {
            // An error answer is classified from its first bytes, whatever its size.
            let body = crate::http::read_prefix(resp, 64 << 10).await;
            return Err(
                classify::classify(status, &headers, &body, &|s| self.redact(s))
                    .with_limits(limits),
            );
        }
        let body = read_capped(resp, MAX_REPLY_BYTES)
            .await
            .map_err(|e| e.with_limits(limits))?;
        let reply: Value = serde_json::from_slice(&body).map_err(|e| {
            AgentError::transient(format!("the provider's reply is not JSON: {e}"))
                .with_limits(limits)
        })?;
        Ok((reply, limits))
    }

    /// The step output from the provider's reply.
    fn answer(&self, reply: &Value) -> Result<AgentOutput, AgentError> {
        let (text, finish_reason, model, mut usage) = self.parse_reply(reply)?;
        usage.cost_usd = self.prices.cost(
            &[model.as_str().unwrap_or(&self.model), &self.model],
            &usage,
        );
        let value = self.output_value(text, finish_reason, model, &usage)?;
        Ok(AgentOutput {
            value,
            usage,
            limits: None,
        })
    }

    /// `{"text" | "json", "model", "finish_reason", "usage"}`.
    fn output_value(
        &self,
        text: String,
        finish_reason: Value,
        model: Value,
        usage: &Usage,
    ) -> Result<Value, AgentError> {
        let mut out = serde_json::Map::new();
        match self.response {
            Response::Text => {
                out.insert("text".into(), Value::String(text));
            }
            Response::Json => {
                // A model that answered with something else may answer right next time; one cut
                // off at max_tokens would be cut off again.
                let cut_off = matches!(finish_reason.as_str(), Some("length" | "max_tokens"));
                let v = parse_json_reply(&text).map_err(|e| {
                    let msg = format!(
                        "the model's reply is not the JSON asked for ({e}){}: {}",
                        if cut_off {
                            "; it was cut off at max_tokens: raise max_tokens"
                        } else {
                            ""
                        },
                        text.chars().take(200).collect::<String>()
                    );
                    if cut_off {
                        AgentError::permanent(msg)
                    } else {
                        AgentError::transient(msg)
                    }
                })?;
                if let Some(schema) = &self.schema {
                    check_schema(schema, &v)?;
                }
                out.insert("json".into(), v);
            }
        }
        out.insert("model".into(), model);
        out.insert("finish_reason".into(), finish_reason);
        out.insert(
            "usage".into(),
            json!({"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}),
        );
        Ok(Value::Object(out))
    }
}

/// A JSON reply against the agent's schema: the violations (the first three, each at its path
/// in the reply) as a transient error, since the model may answer well next time.
fn check_schema(schema: &jsonschema::Validator, reply: &Value) -> Result<(), AgentError> {
    let Some(violations) = schema_violations(schema, reply) else {
        return Ok(());
    };
    let text: String = reply.to_string().chars().take(200).collect();
    Err(AgentError::transient(format!(
        "the model's reply does not match the schema: {violations}; the reply: {text}"
    )))
}

/// What in `value` breaks `schema`: the first three violations, each at its path, and how many
/// more; `None` when it fits.
pub(crate) fn schema_violations(schema: &jsonschema::Validator, value: &Value) -> Option<String> {
    let mut errors = schema.iter_errors(value).peekable();
    errors.peek()?;
    let all: Vec<String> = errors
        .map(|e| {
            let at = e.instance_path().to_string();
            let at = if at.is_empty() { "/".to_string() } else { at };
            format!("at {at}: {e}")
        })
        .collect();
    let shown = all.iter().take(3).cloned().collect::<Vec<_>>().join("; ");
    let more = if all.len() > 3 {
        format!(" (and {} more)", all.len() - 3)
    } else {
        String::new()
    };
    Some(format!("{shown}{more}"))
}

#[async_trait::async_trait]
impl Agent for LlmAgent {
    async fn call(&self, ctx: &CallContext, input: &StepInput) -> Result<AgentOutput, AgentError> {
        let prepared = self.prepare(ctx, input)?;
        self.execute(ctx, &prepared).await
    }

    /// `{"url", "body"}`: the endpoint and the request body exactly as sent (model, messages,
    /// temperature, max_tokens, response format); the API key and headers are added when it runs.
    fn prepare(&self, ctx: &CallContext, input: &StepInput) -> Result<Value, AgentError> {
        let rendered = self.messages.render(ctx, input)?;
        let prompt = rendered["prompt"].as_str().unwrap_or_default();
        let system = rendered.get("system").and_then(Value::as_str);
        Ok(json!({"url": self.endpoint, "body": self.body(system, prompt)}))
    }

    async fn execute(
        &self,
        _ctx: &CallContext,
        prepared: &Value,
    ) -> Result<AgentOutput, AgentError> {
        if prepared["url"].as_str() != Some(self.endpoint.as_str()) {
            return Err(AgentError::permanent(format!(
                "the prepared call goes to {} and this agent now calls {}: its configuration changed since the call was prepared",
                prepared["url"], self.endpoint
            )));
        }
        let (reply, limits) = self.post(&prepared["body"]).await?;
        match self.answer(&reply) {
            Ok(out) => Ok(AgentOutput { limits, ..out }),
            Err(e) => Err(e.with_limits(limits)),
        }
    }

    fn tool_user(&self) -> Option<&dyn ToolUser> {
        match self.tool_use {
            Some(_) => Some(self),
            None => None,
        }
    }

    fn estimated_usage(&self, input: &StepInput) -> Usage {
        // The messages as the call will render them (the job's id and attempt aside, which are
        // not known here and weigh a few tokens).
        let ctx = CallContext {
            job_id: "".into(),
            graph: "".into(),
            agent: "".into(),
            attempt: 1,
            idempotency_key: "".into(),
            deadline: None,
            job_key: None,
        };
        let prompt_tokens = match self.messages.render(&ctx, input) {
            Ok(rendered) => {
                let count = |key: &str| {
                    rendered
                        .get(key)
                        .and_then(Value::as_str)
                        .map_or(0, |text| self.count_tokens(text))
                };
                count("system") + count("prompt") + MESSAGE_FRAMING_TOKENS
            }
            // The call will fail the same way; the input's size stands in.
            Err(_) => estimate_tokens(&input.input.to_string()) + MESSAGE_FRAMING_TOKENS,
        };
        let mut u = Usage {
            prompt_tokens,
            completion_tokens: self.max_tokens().unwrap_or(256),
            cost_usd: 0.0,
        };
        u.cost_usd = self.prices.cost(&[&self.model], &u);
        u
    }
}

#[async_trait::async_trait]
impl ToolUser for LlmAgent {
    fn tool_use(&self) -> &ToolUse {
        self.tool_use
            .as_ref()
            .expect("asked only of an agent with tools")
    }

    fn mcp_servers(&self) -> &Arc<crate::mcp::McpServers> {
        &self.servers
    }

    fn opening(&self, ctx: &CallContext, input: &StepInput) -> Result<Opening, AgentError> {
        let rendered = self.messages.render(ctx, input)?;
        Ok(Opening {
            system: rendered
                .get("system")
                .and_then(Value::as_str)
                .map(str::to_string),
            prompt: rendered["prompt"].as_str().unwrap_or_default().to_string(),
        })
    }

    fn estimate_turn(&self, opening: &Opening, history: &[Message]) -> Usage {
        let mut prompt_tokens = opening
            .system
            .as_deref()
            .map_or(0, |s| self.count_tokens(s))
            + self.count_tokens(&opening.prompt)
            + MESSAGE_FRAMING_TOKENS;
        for m in history {
            prompt_tokens += MESSAGE_FRAMING_TOKENS
                + match m {
                    Message::Assistant { text, tool_calls } => {
                        self.count_tokens(text)
                            + tool_calls
                                .iter()
                                .map(|c| {
                                    self.count_tokens(&c.name)
                                        + self.count_tokens(&c.arguments.to_string())
                                })
                                .sum::<u64>()
                    }
                    Message::Tool { content, .. } => self.count_tokens(content),
                };
        }
        let mut u = Usage {
            prompt_tokens,
            completion_tokens: self.max_tokens().unwrap_or(256),
            cost_usd: 0.0,
        };
        u.cost_usd = self.prices.cost(&[&self.model], &u);
        u
    }

    async fn turn(
        &self,
        _ctx: &CallContext,
        opening: &Opening,
        history: &[Message],
        tools: &[ToolDef],
    ) -> Result<Turn, AgentError> {
        let body = self.body_with(opening.system.as_deref(), &opening.prompt, history, tools);
        let (reply, limits) = self.post(&body).await?;
        let (text, finish_reason, model, mut usage) = self
            .parse_reply(&reply)
            .map_err(|e| e.with_limits(limits))?;
        usage.cost_usd = self.prices.cost(
            &[model.as_str().unwrap_or(&self.model), &self.model],
            &usage,
        );
        Ok(Turn {
            text,
            tool_calls: parse_tool_calls(self.provider, &reply),
            finish_reason,
            model,
            usage,
            limits,
        })
    }

    fn final_output(&self, turn: &Turn) -> Result<Value, AgentError> {
        self.output_value(
            turn.text.clone(),
            turn.finish_reason.clone(),
            turn.model.clone(),
            &turn.usage,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fenced_json_reply_parses() {
        assert_eq!(
            parse_json_reply("```json\n{\"a\": 1}\n```").unwrap(),
            json!({"a": 1})
        );
        assert_eq!(parse_json_reply(" {\"a\": 1} ").unwrap(), json!({"a": 1}));
        assert!(parse_json_reply("sure! here it is").is_err());
    }

    #[test]
    fn estimates_round_up() {
        assert_eq!(estimate_tokens(""), 0);
        assert_eq!(estimate_tokens("abcde"), 2);
    }

    fn build_with(fields: Value) -> Result<Arc<dyn Agent>, FieldError> {
        let Value::Object(map) = fields else {
            unreachable!()
        };
        build(&AgentSpec {
            graph: "g",
            name: "l",
            fields: &map,
            resources: &Default::default(),
        })
    }

    #[test]
    fn estimates_count_the_rendered_messages_with_the_models_tokenizer() {
        let estimate = |fields: Value| {
            let agent = build_with(fields).unwrap();
            let input = StepInput {
                input: Arc::new(json!({"who": "world"})),
                deps: vec![],
            };
            agent.estimated_usage(&input)
        };
        let base = |model: &str, provider: &str| {
            json!({"model": model, "provider": provider, "base_url": "http://127.0.0.1:1/v1",
                   "system": "Be brief.", "prompt": "Hello {{ input.who }}", "max_tokens": 7})
        };
        // o200k_base: "Be brief." is 3 tokens ("Be", " brief", "."), "Hello world" 2.
        let u = estimate(base("gpt-4o-mini", "openai"));
        assert_eq!(
            (u.prompt_tokens, u.completion_tokens),
            (3 + 2 + MESSAGE_FRAMING_TOKENS, 7)
        );
        // cl100k_base for gpt-4 counts the same words alike.
        assert_eq!(
            estimate(base("gpt-4-0613", "openai")).prompt_tokens,
            3 + 2 + MESSAGE_FRAMING_TOKENS
        );
        // A model with no tokenizer here: four characters a token (9 and 11 characters).
        assert_eq!(
            estimate(base("llama3.1:8b", "openai")).prompt_tokens,
            3 + 3 + MESSAGE_FRAMING_TOKENS
        );
        assert_eq!(
            estimate(base("claude-sonnet-4", "anthropic")).prompt_tokens,
            3 + 3 + MESSAGE_FRAMING_TOKENS
        );
    }

    #[test]
    fn a_prepared_call_is_the_endpoint_and_the_request_body_without_the_key() {
        // SAFETY: this variable is read by this test only.
        unsafe { std::env::set_var("CASCADE_TEST_LLM_KEY", "sk-test-prepared-123") };
        let agent = build_with(json!({"model": "gpt-4o-mini", "base_url": "http://127.0.0.1:1/v1",
            "api_key": "env:CASCADE_TEST_LLM_KEY", "system": "Be brief.", "prompt": "Refund {{ input.order }}?",
            "max_tokens": 20, "temperature": 0.0}))
        .unwrap();
        let ctx = CallContext {
            job_id: "j".into(),
            graph: "g".into(),
            agent: "l".into(),
            attempt: 1,
            idempotency_key: "j/l".into(),
            deadline: None,
            job_key: None,
        };
        let input = StepInput {
            input: Arc::new(json!({"order": 7})),
            deps: vec![],
        };
        let p = agent.prepare(&ctx, &input).unwrap();
        assert_eq!(p["url"], "http://127.0.0.1:1/v1/chat/completions");
        assert_eq!(p["body"]["model"], "gpt-4o-mini");
        assert_eq!(p["body"]["max_tokens"], 20);
        assert_eq!(
            p["body"]["messages"],
            json!([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Refund 7?"}])
        );
        assert!(!p.to_string().contains("sk-test-prepared-123"), "{p}");
    }

    #[test]
    fn bad_fields_are_named() {
        let base = |extra: Value| {
            let mut v = json!({"model": "m", "prompt": "p", "base_url": "http://127.0.0.1:1/v1"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            build_with(v).err().map(|e| e.path)
        };
        assert_eq!(
            base(json!({"provider": "bard"})),
            Some(vec!["provider".to_string()])
        );
        assert_eq!(
            base(json!({"base_url": "localhost:11434"})),
            Some(vec!["base_url".to_string()])
        );
        assert_eq!(
            base(json!({"temperature": 3.0})),
            Some(vec!["temperature".to_string()])
        );
        assert_eq!(
            base(json!({"api_key": "sk-live"})),
            Some(vec!["api_key".to_string()])
        );
        assert_eq!(
            base(json!({"response": "yaml"})),
            Some(vec!["response".to_string()])
        );
        // A schema needs JSON replies, and must be a schema.
        assert_eq!(
            base(json!({"schema": {"type": "object"}})),
            Some(vec!["schema".to_string()])
        );
        assert_eq!(
            base(json!({"response": "json", "schema": {"type": "objekt"}})),
            Some(vec!["schema".to_string()])
        );
        assert_eq!(
            base(json!({"response": "json", "schema": {"type": "object"}})),
            None
        );
        assert_eq!(
            base(json!({"prompt": "{{ input.x "})),
            Some(vec!["prompt".to_string()])
        );
        assert_eq!(base(json!({})), None);
        // Tools: server.tool on a declared server; their settings only with tools.
        assert_eq!(
            base(json!({"tools": ["crm.lookup"]})),
            Some(vec!["tools".to_string(), "0".to_string()])
        );
        assert_eq!(
            base(json!({"max_turns": 3})),
            Some(vec!["max_turns".to_string()])
        );
    }

    #[test]
    fn tool_patterns_name_declared_servers_and_approvals_name_offered_tools() {
        let resources = crate::Resources::default();
        let refused = resources.get::<crate::mcp::McpServers>().declare(
            [(
                "crm".to_string(),
                serde_json::from_value(json!({"url": "http://127.0.0.1:1/mcp"})).unwrap(),
            )],
            &resources,
        );
        assert!(refused.is_empty());
        let build = |extra: Value| {
            let mut v = json!({"model": "m", "prompt": "p", "base_url": "http://127.0.0.1:1/v1"});
            v.as_object_mut()
                .unwrap()
                .extend(extra.as_object().unwrap().clone());
            let Value::Object(map) = v else {
                unreachable!()
            };
            build(&AgentSpec {
                graph: "g",
                name: "l",
                fields: &map,
                resources: &resources,
            })
            .err()
            .map(|e| (e.path, e.message))
        };
        assert_eq!(build(json!({"tools": ["crm.*"], "max_turns": 4})), None);
        let (path, message) = build(json!({"tools": ["crm"]})).unwrap();
        assert_eq!(path, ["tools", "0"]);
        assert!(message.contains("server.tool"), "{message}");
        let (path, message) = build(json!({"tools": ["erp.*"]})).unwrap();
        assert_eq!(path, ["tools", "0"]);
        assert!(message.contains("the declared ones: crm"), "{message}");
        let (path, _) =
            build(json!({"tools": ["crm.lookup_*"], "tool_approval": {"crm.close": "required"}}))
                .unwrap();
        assert_eq!(path, ["tool_approval", "crm.close"]);
        assert_eq!(
            build(json!({"tools": ["crm.*"], "max_turns": 0}))
                .unwrap()
                .0,
            ["max_turns"]
        );
    }

    #[test]
    fn tool_calls_are_read_from_either_providers_reply() {
        let openai = json!({"choices": [{"message": {"tool_calls": [
            {"id": "a", "type": "function", "function": {"name": "crm__lookup", "arguments": "{\"email\":\"x\"}"}},
            {"id": "b", "type": "function", "function": {"name": "crm__list", "arguments": ""}},
            {"id": "c", "type": "function", "function": {"name": "crm__bad", "arguments": "{not json"}}
        ]}}]});
        let calls = parse_tool_calls(Provider::Openai, &openai);
        assert_eq!(calls.len(), 3);
        assert_eq!(calls[0].arguments, json!({"email": "x"}));
        assert_eq!(calls[1].arguments, json!({}));
        // Kept as the string: the loop tells the model its arguments were not an object.
        assert_eq!(calls[2].arguments, json!("{not json"));
        let anthropic = json!({"content": [
            {"type": "text", "text": "Looking."},
            {"type": "tool_use", "id": "t1", "name": "crm__lookup", "input": {"email": "y"}}
        ]});
        let calls = parse_tool_calls(Provider::Anthropic, &anthropic);
        assert_eq!(
            calls,
            vec![crate::tools::ToolCall {
                id: "t1".into(),
                name: "crm__lookup".into(),
                arguments: json!({"email": "y"})
            }]
        );
    }
}
