use std::any::{Any, TypeId};
use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::Agent;

/// What a kind constructor is given: where the node lives, its kind-specific fields, and the
/// state its registry's agents share.
#[derive(Clone, Debug)]
pub struct AgentSpec<'a> {
    pub graph: &'a str,
    pub name: &'a str,
    /// The node's fields that are not common to every kind, as JSON.
    pub fields: &'a Map<String, Value>,
    pub resources: &'a Resources,
}

/// State shared by every agent one registry builds, whatever their graph, and across restarts of
/// their actors: what a kind keeps once per process, such as connection pools, token caches, or
/// `sim`'s simulated upstreams. It is owned by the registry (so by the running orchestrator that
/// holds it): two orchestrators with their own registries share nothing, and a test reads the
/// state of the orchestrator it started. One value per type, created on first use.
///
/// A type map is twenty lines; the crates that offer one add a dependency for less.
#[derive(Clone, Default)]
pub struct Resources {
    map: Arc<Mutex<HashMap<TypeId, Arc<dyn Any + Send + Sync>>>>,
}

impl Resources {
    /// The registry's value of type `T`, created with `T::default()` on first use.
    pub fn get<T: Any + Send + Sync + Default>(&self) -> Arc<T> {
        let mut map = self.map.lock().unwrap_or_else(|p| p.into_inner());
        let value = map
            .entry(TypeId::of::<T>())
            .or_insert_with(|| Arc::new(T::default()))
            .clone();
        value
            .downcast::<T>()
            .unwrap_or_else(|_| unreachable!("the map is keyed by the value's type"))
    }
}

impl fmt::Debug for Resources {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.map.lock().map_or(0, |m| m.len());
        f.debug_struct("Resources").field("values", &n).finish()
    }
}

impl AgentSpec<'_> {
    /// Deserialize the kind's fields into its config struct, naming the field path on error.
    pub fn parse<T: DeserializeOwned>(&self) -> Result<T, FieldError> {
        let value = Value::Object(self.fields.clone());
        serde_path_to_error::deserialize(value).map_err(|e| {
            let path: Vec<String> = e
                .path()
                .iter()
                .filter_map(|seg| match seg {
                    serde_path_to_error::Segment::Map { key } => Some(key.clone()),
                    serde_path_to_error::Segment::Seq { index } => Some(index.to_string()),
                    _ => None,
                })
                .collect();
            FieldError {
                path,
                message: e.into_inner().to_string(),
            }
        })
    }
}

/// A bad kind-specific field: its path below the agent (`["latency", "median"]`) and why.
#[derive(Clone, Debug, PartialEq)]
pub struct FieldError {
    pub path: Vec<String>,
    pub message: String,
}

impl FieldError {
    pub fn new(field: &str, message: impl Into<String>) -> Self {
        Self {
            path: vec![field.to_string()],
            message: message.into(),
        }
    }
}

impl std::error::Error for FieldError {}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path.join("."), self.message)
        }
    }
}

/// Builds an agent of one kind from its fields, validating them.
pub type BuildFn = fn(&AgentSpec<'_>) -> Result<Arc<dyn Agent>, FieldError>;

/// Names the upstream a node of a kind calls, from its fields (`None`: it calls nothing outside
/// the process). Nodes that name the same upstream and declare no quota share one implicit quota,
/// `upstream:<name>`, which learns the upstream's limit from its refusals.
pub type UpstreamFn = fn(&AgentSpec<'_>) -> Option<String>;

/// For kinds that call nothing outside the process (`template`).
pub fn no_upstream(_: &AgentSpec<'_>) -> Option<String> {
    None
}

/// For kinds that prove themselves to nothing.
pub fn no_credential(_: &AgentSpec<'_>) -> Option<String> {
    None
}

/// A kind of agent: its name, the fields it accepts, which of them are required, its constructor,
/// and the upstream its nodes call.
#[derive(Clone, Copy)]
pub struct KindSpec {
    pub name: &'static str,
    pub fields: &'static [&'static str],
    pub required: &'static [&'static str],
    pub build: BuildFn,
    pub upstream: UpstreamFn,
    /// Names the credential a node of a kind proves itself with (`None`: none). Its nodes draw
    /// on the credential's quota, `credential:<name>`, which a dead credential exhausts.
    pub credential: UpstreamFn,
    /// Its calls may act irreversibly, as each agent tells at run time
    /// ([`Agent::irreversible`](crate::Agent::irreversible)): the engine asks before each call
    /// whether a person must approve it, unless the graph says `irreversible` or `approval`.
    pub may_be_irreversible: bool,
}

impl fmt::Debug for KindSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KindSpec")
            .field("name", &self.name)
            .field("fields", &self.fields)
            .finish()
    }
}

/// Maps kind names (`kind = "sim"`) to their constructors.
#[derive(Clone, Debug)]
pub struct Registry {
    kinds: BTreeMap<&'static str, KindSpec>,
    resources: Resources,
}

impl Default for Registry {
    /// The built-in kinds.
    fn default() -> Self {
        let mut r = Self::empty();
        r.register(crate::template::KIND);
        r.register(crate::sim::KIND);
        r.register(crate::http::KIND);
        r.register(crate::command::KIND);
        r.register(crate::llm::KIND);
        r.register(crate::mcp::KIND);
        r
    }
}

impl Registry {
    /// A registry with no kinds, for programs that bring only their own.
    pub fn empty() -> Self {
        Self {
            kinds: BTreeMap::new(),
            resources: Resources::default(),
        }
    }

    /// The state shared by the agents this registry builds (clones of a registry share it).
    pub fn resources(&self) -> &Resources {
        &self.resources
    }

    /// Add or replace a kind.
    pub fn register(&mut self, kind: KindSpec) {
        self.kinds.insert(kind.name, kind);
    }

    pub fn get(&self, name: &str) -> Option<&KindSpec> {
        self.kinds.get(name)
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }

    /// Build an agent of `kind` from `spec`.
    pub fn build(&self, kind: &str, spec: &AgentSpec<'_>) -> Result<Arc<dyn Agent>, FieldError> {
        let k = self.get(kind).ok_or_else(|| FieldError {
            path: vec!["kind".into()],
            message: format!("unknown agent kind {kind:?}"),
        })?;
        (k.build)(spec)
    }
}
