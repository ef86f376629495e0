//! The server side of MCP: what a program offers as tools ([`ToolHost`]), served over
//! streamable HTTP ([`service`]) — `cascade serve`'s `/mcp`, where each graph is a tool.

use std::sync::Arc;

use rmcp::model::{
    CallToolRequestParams, CallToolResponse, CallToolResult, ContentBlock, ErrorData,
    Implementation, ListToolsResult, PaginatedRequestParams, ServerCapabilities, ServerConfig,
    Tool,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::LocalSessionManager;
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{RoleServer, ServerHandler};
use serde_json::{Map, Value};

/// A tool as offered (name, description, input schema).
pub use rmcp::model::{Tool as OfferedTool, ToolAnnotations};

/// Tools a program offers over MCP.
#[async_trait::async_trait]
pub trait ToolHost: Send + Sync + 'static {
    /// The tools, with their input schemas.
    fn tools(&self) -> Vec<OfferedTool>;

    /// Call tool `name`: its structured result, or an error the caller reads (the tool result's
    /// `isError`, with this text).
    async fn call(&self, name: &str, arguments: Map<String, Value>) -> Result<Value, String>;

    /// [`ToolHost::call`], with the idempotency key the caller sent in the request's `_meta`
    /// (`io.cascade/idempotency_key`), for a host that deduplicates retried calls.
    async fn call_keyed(
        &self,
        name: &str,
        arguments: Map<String, Value>,
        _idempotency_key: Option<&str>,
    ) -> Result<Value, String> {
        self.call(name, arguments).await
    }

    /// The tools offered to the caller of a request, from the HTTP request's extensions (what
    /// the server's authentication put there: who calls).
    fn tools_for(&self, _caller: &http::Extensions) -> Vec<OfferedTool> {
        self.tools()
    }

    /// [`ToolHost::call_keyed`] for the caller of a request (see [`ToolHost::tools_for`]).
    async fn call_as(
        &self,
        name: &str,
        arguments: Map<String, Value>,
        idempotency_key: Option<&str>,
        _caller: &http::Extensions,
    ) -> Result<Value, String> {
        self.call_keyed(name, arguments, idempotency_key).await
    }
}

/// The HTTP request's extensions of an MCP request (empty when it came another way).
fn caller(context: &RequestContext<RoleServer>) -> &http::Extensions {
    static NONE: std::sync::OnceLock<http::Extensions> = std::sync::OnceLock::new();
    context
        .extensions
        .get::<http::request::Parts>()
        .map_or_else(
            || NONE.get_or_init(http::Extensions::new),
            |p| &p.extensions,
        )
}

/// Whether `schema` is a JSON Schema this server can offer (and check against).
pub fn check_schema(schema: &Value) -> Result<(), String> {
    if !schema.is_object() {
        return Err("a JSON Schema object, e.g. { type = \"object\", properties = { … } }".into());
    }
    jsonschema::validator_for(schema)
        .map(drop)
        .map_err(|e| format!("not a valid JSON Schema: {e}"))
}

/// A tool from its name, description and input schema (a JSON Schema object).
pub fn tool(name: &str, description: &str, input_schema: Value) -> Tool {
    let schema = match input_schema {
        Value::Object(m) => m,
        _ => Map::new(),
    };
    Tool::new(name.to_string(), description.to_string(), schema)
}

#[derive(Clone)]
struct Handler(Arc<dyn ToolHost>);

impl ServerHandler for Handler {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("cascade", env!("CARGO_PKG_VERSION")))
    }

    async fn list_tools(
        &self,
        _: Option<PaginatedRequestParams>,
        context: RequestContext<RoleServer>,
    ) -> Result<ListToolsResult, ErrorData> {
        Ok(ListToolsResult {
            tools: self.0.tools_for(caller(&context)),
            ..Default::default()
        })
    }

    async fn call_tool(
        &self,
        request: CallToolRequestParams,
        context: RequestContext<RoleServer>,
    ) -> Result<CallToolResponse, ErrorData> {
        // rmcp hands the request's `_meta` over in the context (the params keep it only when
        // the transport did not take it out).
        let key = context
            .meta
            .0
            .get(crate::mcp::IDEMPOTENCY_META_KEY)
            .or_else(|| {
                request
                    .meta
                    .as_ref()
                    .and_then(|m| m.0.get(crate::mcp::IDEMPOTENCY_META_KEY))
            })
            .and_then(Value::as_str)
            .map(str::to_string);
        let arguments = request.arguments.unwrap_or_default();
        let result = match self
            .0
            .call_as(&request.name, arguments, key.as_deref(), caller(&context))
            .await
        {
            Ok(value) => CallToolResult::structured(value),
            Err(text) => CallToolResult::error(vec![ContentBlock::text(text)]),
        };
        Ok(CallToolResponse::Complete(result))
    }
}

/// `host`'s tools as a streamable-HTTP MCP endpoint, to mount (at `/mcp`) in an HTTP server.
/// Requests name a loopback `Host` or one of `allowed_hosts` (against DNS rebinding of a server
/// on a workstation); others are refused.
pub fn service(
    host: Arc<dyn ToolHost>,
    allowed_hosts: Vec<String>,
) -> StreamableHttpService<impl ServerHandler, LocalSessionManager> {
    let handler = Handler(host);
    let mut config = StreamableHttpServerConfig::default();
    if !allowed_hosts.is_empty() {
        let mut hosts = config.allowed_hosts.clone();
        hosts.extend(allowed_hosts);
        config = config.with_allowed_hosts(hosts);
    }
    StreamableHttpService::new(
        move || Ok(handler.clone()),
        LocalSessionManager::default().into(),
        config,
    )
}
