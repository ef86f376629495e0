//! `kind = "template"`: renders a JSON output from the step input with minijinja.
//!
//! ```toml
//! [agents.summary]
//! kind = "template"
//! after = ["classify"]
//! output = { ticket = "{{ input.ticket_id }}", label = "{{ deps.classify.label }}", n = "{{= input.items | length }}" }
//! ```
//! Every string leaf of `output` is a template rendered to a string. A leaf that starts with
//! `{{=` is an expression whose value keeps its JSON type (number, list, object). Other values are
//! copied as they are. Undefined variables are errors, so a typo fails the step loudly.

use std::sync::Arc;

use minijinja::{Environment, UndefinedBehavior};
use serde::Deserialize;
use serde_json::Value;

use crate::{
    Agent, AgentError, AgentOutput, AgentSpec, CallContext, FieldError, KindSpec, StepInput, Usage,
};

pub const KIND: KindSpec = KindSpec {
    name: "template",
    fields: &["output"],
    required: &["output"],
    build,
    upstream: crate::no_upstream,
    credential: crate::registry::no_credential,
    may_be_irreversible: false,
};

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    output: Value,
}

enum Node {
    Literal(Value),
    /// Name of a compiled template that renders to a string.
    Text(String),
    /// Name of a compiled template that renders to JSON text (an expression piped to `tojson`).
    Typed(String),
    Object(Vec<(String, Node)>),
    Array(Vec<Node>),
}

pub struct TemplateAgent {
    output: JsonTemplate,
}

fn build(spec: &AgentSpec<'_>) -> Result<Arc<dyn Agent>, FieldError> {
    let config: Config = spec.parse()?;
    Ok(Arc::new(TemplateAgent {
        output: JsonTemplate::compile(&config.output, &["output"])?,
    }))
}

/// A JSON value whose string leaves are templates, by the rules of this module: what the
/// `template` kind renders as its output, and what the `http` and `llm` kinds render their
/// requests from (their URL, headers, body, prompt).
pub struct JsonTemplate {
    env: Environment<'static>,
    root: Node,
}

impl JsonTemplate {
    /// Compile `value`; errors name the field under `path` (the field's own path).
    pub fn compile(value: &Value, path: &[&str]) -> Result<Self, FieldError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(UndefinedBehavior::Strict);
        let mut counter = 0usize;
        let mut path: Vec<String> = path.iter().map(|p| p.to_string()).collect();
        let root = compile(&mut env, value, &mut path, &mut counter)?;
        Ok(Self { env, root })
    }

    /// Render over any view (a trigger's `event`, `headers` and `trigger`).
    pub fn render_view(&self, view: &minijinja::Value) -> Result<Value, AgentError> {
        self.render_node(&self.root, view)
    }

    /// Render over the documented step view (`input`, `deps`, `job`).
    pub fn render(&self, ctx: &CallContext, input: &StepInput) -> Result<Value, AgentError> {
        let view = minijinja::Value::from(minijinja::value::Serde(input.view(ctx)));
        self.render_node(&self.root, &view)
    }
}

fn compile(
    env: &mut Environment<'static>,
    value: &Value,
    path: &mut Vec<String>,
    counter: &mut usize,
) -> Result<Node, FieldError> {
    Ok(match value {
        Value::String(s) if s.contains("{{") || s.contains("{%") => {
            *counter += 1;
            let name = format!("t{counter}");
            let (source, typed) = match s.trim().strip_prefix("{{=") {
                Some(rest) => {
                    let expr = rest.strip_suffix("}}").ok_or_else(|| FieldError {
                        path: path.clone(),
                        message: format!("typed expression {s:?} must end with \"}}}}\""),
                    })?;
                    // `tojson` would turn an undefined value (a typo, a field the input lacks)
                    // into null; printing it instead fails, as strict mode does for text.
                    (
                        format!(
                            "{{% set typed = ({}) %}}{{% if typed is undefined %}}{{{{ typed }}}}{{% else %}}{{{{ typed | tojson }}}}{{% endif %}}",
                            expr.trim()
                        ),
                        true,
                    )
                }
                None => (s.clone(), false),
            };
            env.add_template_owned(name.clone(), source)
                .map_err(|e| FieldError {
                    path: path.clone(),
                    message: format!("invalid template: {e}"),
                })?;
            if typed {
                Node::Typed(name)
            } else {
                Node::Text(name)
            }
        }
        Value::Object(map) => {
            let mut fields = Vec::with_capacity(map.len());
            for (k, v) in map {
                path.push(k.clone());
                fields.push((k.clone(), compile(env, v, path, counter)?));
                path.pop();
            }
            Node::Object(fields)
        }
        Value::Array(items) => {
            let mut nodes = Vec::with_capacity(items.len());
            for (i, v) in items.iter().enumerate() {
                path.push(i.to_string());
                nodes.push(compile(env, v, path, counter)?);
                path.pop();
            }
            Node::Array(nodes)
        }
        other => Node::Literal(other.clone()),
    })
}

impl JsonTemplate {
    fn render_node(&self, node: &Node, ctx: &minijinja::Value) -> Result<Value, AgentError> {
        let render = |name: &str| {
            self.env
                .get_template(name)
                .and_then(|t| t.render(ctx))
                .map_err(|e| AgentError::permanent(format!("template failed: {e:#}")))
        };
        Ok(match node {
            Node::Literal(v) => v.clone(),
            Node::Text(name) => Value::String(render(name)?),
            Node::Typed(name) => {
                let text = render(name)?;
                serde_json::from_str(&text).map_err(|e| {
                    AgentError::permanent(format!("expression did not yield JSON: {e}"))
                })?
            }
            Node::Object(fields) => {
                let mut map = serde_json::Map::with_capacity(fields.len());
                for (k, n) in fields {
                    map.insert(k.clone(), self.render_node(n, ctx)?);
                }
                Value::Object(map)
            }
            Node::Array(nodes) => Value::Array(
                nodes
                    .iter()
                    .map(|n| self.render_node(n, ctx))
                    .collect::<Result<_, _>>()?,
            ),
        })
    }
}

#[async_trait::async_trait]
impl Agent for TemplateAgent {
    async fn call(&self, ctx: &CallContext, input: &StepInput) -> Result<AgentOutput, AgentError> {
        Ok(AgentOutput {
            value: self.output.render(ctx, input)?,
            usage: Usage::default(),
            limits: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn agent(fields: Value) -> Result<Arc<dyn Agent>, FieldError> {
        let Value::Object(map) = fields else {
            unreachable!()
        };
        build(&AgentSpec {
            graph: "g",
            name: "t",
            fields: &map,
            resources: &Default::default(),
        })
    }

    fn ctx() -> CallContext {
        CallContext {
            job_id: "job-1".into(),
            graph: "g".into(),
            agent: "t".into(),
            attempt: 1,
            idempotency_key: "k".into(),
            deadline: None,
            job_key: None,
        }
    }

    #[tokio::test]
    async fn renders_text_typed_and_literal_leaves() {
        let a = agent(json!({"output": {
            "greeting": "hello {{ input.name }}",
            "label": "{{ deps.classify.label }}",
            "count": "{{= input.items | length }}",
            "items": "{{= input.items }}",
            "job": "{{ job.id }}",
            "fixed": 7,
            "list": ["{{ input.name }}", true]
        }}))
        .unwrap();
        let input = StepInput {
            input: Arc::new(json!({"name": "ada", "items": [1, 2, 3]})),
            deps: vec![("classify".into(), Arc::new(json!({"label": "billing"})))],
        };
        let out = a.call(&ctx(), &input).await.unwrap();
        assert_eq!(
            out.value,
            json!({"greeting": "hello ada", "label": "billing", "count": 3, "items": [1, 2, 3],
                   "job": "job-1", "fixed": 7, "list": ["ada", true]})
        );
    }

    #[tokio::test]
    async fn a_typed_expression_over_a_missing_field_is_an_error_not_null() {
        let a = agent(json!({"output": {"n": "{{= input.n }}", "z": "{{= input.z }}"}})).unwrap();
        let input = StepInput {
            input: Arc::new(json!({"n": 3, "z": null})),
            deps: vec![],
        };
        // A field that is there and null stays null.
        assert_eq!(
            a.call(&ctx(), &input).await.unwrap().value,
            json!({"n": 3, "z": null})
        );
        let missing = StepInput {
            input: Arc::new(json!({"z": 1})),
            deps: vec![],
        };
        let err = a.call(&ctx(), &missing).await.unwrap_err();
        assert_eq!(err.class, crate::ErrorClass::Permanent);
        assert!(err.message.contains("undefined"), "{}", err.message);
    }

    #[tokio::test]
    async fn undefined_variable_is_a_permanent_error() {
        let a = agent(json!({"output": "{{ deps.missing.label }}"})).unwrap();
        let err = a.call(&ctx(), &StepInput::default()).await.unwrap_err();
        assert_eq!(err.class, crate::ErrorClass::Permanent);
        assert!(err.message.contains("undefined"), "{}", err.message);
    }

    #[test]
    fn syntax_error_names_the_field_path() {
        let err = agent(json!({"output": {"a": {"b": "{{ oops"}}}))
            .err()
            .unwrap();
        assert_eq!(err.path, vec!["output", "a", "b"]);
        assert!(err.message.contains("invalid template"), "{}", err.message);
    }

    #[test]
    fn unknown_field_is_refused() {
        let err = agent(json!({"output": 1, "outptu": 2})).err().unwrap();
        assert!(err.message.contains("outptu"), "{}", err.message);
    }
}
