//! Triggers: events that start jobs (`[[graph.triggers]]` in a graph file).
//!
//! Four kinds: `webhook` (a provider's signed POST at `/hooks/{graph}/{trigger}`), `nats` (a
//! JetStream durable pull consumer), `redis_stream` (a Redis Streams consumer group) and
//! `schedule` (cron or a fixed period). Each one maps its event to a job the same way
//! ([`Triggers::fire`]): an optional `when` expression drops events nobody asked for, the `input`
//! template (the `template` kind's rules, over `event`, `headers` and `trigger`) makes the job
//! input, and the idempotency key (the `idempotency_key` template, else the provider's event or
//! message id) makes a redelivered event the job it already started.
//!
//! Bus consumers pull only while their graph admits work ([`admission`]): when the graph's
//! pending jobs reach `max_pending_jobs` or one of its agents is paused by the cascade, they stop
//! fetching, and the backlog waits in the bus. A message is acknowledged only after its job is
//! durably accepted.

pub mod nats;
pub mod redis_stream;
pub mod schedule;
pub mod verify;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::watch;

use crate::secret::SecretRef;
use crate::{Orchestrator, SubmitError, SubmitRequest};

/// One `[[graph.triggers]]` entry, validated.
#[derive(Clone, Debug)]
pub struct TriggerModel {
    pub name: Arc<str>,
    pub graph: Arc<str>,
    /// The tenant its jobs belong to.
    pub tenant: Arc<str>,
    /// Maps the event to the job input (none: the event itself).
    pub input: Option<Value>,
    /// A minijinja expression; an event for which it is false is dropped.
    pub when: Option<String>,
    /// A template for the job's idempotency key (none: the provider's event or message id).
    pub idempotency_key: Option<String>,
    pub source: TriggerSource,
}

impl TriggerModel {
    pub fn kind(&self) -> &'static str {
        match &self.source {
            TriggerSource::Webhook(_) => "webhook",
            TriggerSource::Nats(_) => "nats",
            TriggerSource::RedisStream(_) => "redis_stream",
            TriggerSource::Schedule(_) => "schedule",
        }
    }
}

#[derive(Clone, Debug)]
pub enum TriggerSource {
    Webhook(WebhookSpec),
    Nats(NatsSpec),
    RedisStream(RedisSpec),
    Schedule(ScheduleSpec),
}

/// `kind = "webhook"`.
#[derive(Clone, Debug)]
pub struct WebhookSpec {
    pub verify: verify::Provider,
    /// The signing secret (for `verify = "cascade"`, default: `[server] webhook_secret`).
    pub secret: Option<SecretRef>,
    /// How far a signed timestamp may be from the server's clock.
    pub tolerance: Duration,
}

/// What a bus consumer does with a message it cannot turn into a job.
#[derive(Clone, Debug)]
pub struct DeadLetter {
    /// The subject (NATS) or stream (Redis) poison messages go to, with the reason; none: they
    /// are dropped with a log line after `max_deliveries`.
    pub target: Option<String>,
    /// Deliveries of a poison message before it is dead-lettered.
    pub max_deliveries: u32,
}

/// `kind = "nats"`: a JetStream durable pull consumer.
#[derive(Clone, Debug)]
pub struct NatsSpec {
    pub url: String,
    pub stream: String,
    pub subject: String,
    pub consumer: String,
    pub user: Option<SecretRef>,
    pub password: Option<SecretRef>,
    pub token: Option<SecretRef>,
    pub dead_letter: DeadLetter,
    /// Messages fetched at most per request (fewer when the graph has less room).
    pub batch: usize,
    /// How long the server waits for an acknowledgement before it redelivers.
    pub ack_wait: Duration,
}

/// `kind = "redis_stream"`: a consumer group.
#[derive(Clone, Debug)]
pub struct RedisSpec {
    pub url: String,
    pub password: Option<SecretRef>,
    pub stream: String,
    pub group: String,
    /// This node's name in the group (default: `cascade-<host name>`).
    pub consumer: String,
    /// The entry field holding the payload (JSON, else text); without it in an entry, the event
    /// is the entry's fields.
    pub field: String,
    /// Entries another consumer left unacknowledged this long are claimed.
    pub claim_after: Duration,
    pub dead_letter: DeadLetter,
    pub batch: usize,
}

/// `kind = "schedule"`.
#[derive(Clone, Debug)]
pub struct ScheduleSpec {
    pub every: schedule::Every,
    pub catch_up: schedule::CatchUp,
}

/// What became of one event.
#[derive(Debug)]
pub enum Outcome {
    /// A job started.
    Started(crate::job::JobId),
    /// Its key names a job already accepted.
    Deduplicated(crate::job::JobId),
    /// `when` was false.
    Dropped,
    /// The graph cannot take it now: deliver it again after the delay.
    Retry(Duration, String),
    /// It can never become a job (its input template failed, or it was refused as invalid).
    Invalid(String),
}

/// An event, as a trigger's templates see it.
pub struct Event {
    /// The parsed JSON body or payload (a string when it is not JSON).
    pub body: Value,
    /// Header names in lower case.
    pub headers: BTreeMap<String, String>,
    /// The provider's event or message id: the default idempotency key is
    /// `<graph>/<trigger>/<id>`.
    pub id: Option<String>,
    /// More about the delivery, under `trigger.*` (a schedule's `scheduled_at`).
    pub meta: serde_json::Map<String, Value>,
}

/// A trigger's counters and state, as GetGraph, `/metrics` and the dashboard show them.
#[derive(Clone, Debug, Default, Serialize, PartialEq, Eq)]
pub struct TriggerCounts {
    pub received: u64,
    pub started: u64,
    pub deduplicated: u64,
    pub dropped: u64,
    pub refused: u64,
    pub dead_lettered: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct TriggerView {
    pub name: String,
    pub kind: &'static str,
    pub tenant: String,
    /// `running`, `paused` (by an operator), `waiting` (the graph is full or paused: not pulling),
    /// `failing` (its source is unreachable).
    pub state: &'static str,
    /// Why, for `waiting` and `failing`.
    pub detail: String,
    pub counts: TriggerCounts,
}

/// A trigger at run time: its compiled templates, counters and state.
pub struct Trigger {
    pub model: Arc<TriggerModel>,
    input: Option<cascade_agents::template::JsonTemplate>,
    key: Option<cascade_agents::template::JsonTemplate>,
    /// `when`, as a template that renders `1` when the expression is true.
    when: Option<minijinja::Environment<'static>>,
    received: AtomicU64,
    started: AtomicU64,
    deduplicated: AtomicU64,
    dropped: AtomicU64,
    refused: AtomicU64,
    dead_lettered: AtomicU64,
    /// Paused by an operator (kept in the store across restarts).
    paused: watch::Sender<bool>,
    /// `waiting` or `failing` with why; empty while it runs.
    status: Mutex<(&'static str, String)>,
    /// Whether a consumer or schedule task runs for it.
    pub(crate) active: AtomicBool,
}

/// A trigger's compiled `input`, `idempotency_key` and `when`.
type Templates = (
    Option<cascade_agents::template::JsonTemplate>,
    Option<cascade_agents::template::JsonTemplate>,
    Option<minijinja::Environment<'static>>,
);

/// Compile a trigger's templates; an error names the field.
pub fn compile_templates(
    input: Option<&Value>,
    key: Option<&str>,
    when: Option<&str>,
) -> Result<Templates, (&'static str, String)> {
    use cascade_agents::template::JsonTemplate;
    let input = input
        .map(|v| JsonTemplate::compile(v, &["input"]))
        .transpose()
        .map_err(|e| ("input", e.message))?;
    let key = key
        .map(|k| JsonTemplate::compile(&Value::String(k.to_string()), &["idempotency_key"]))
        .transpose()
        .map_err(|e| ("idempotency_key", e.message))?;
    let when = match when {
        None => None,
        Some(expr) => {
            let mut env = minijinja::Environment::new();
            env.set_undefined_behavior(minijinja::UndefinedBehavior::Chainable);
            env.add_template_owned("when", format!("{{% if {expr} %}}1{{% endif %}}"))
                .map_err(|e| ("when", format!("invalid expression: {e}")))?;
            Some(env)
        }
    };
    Ok((input, key, when))
}

/// Compile a trigger for running; an error names the field.
pub fn compile(model: &TriggerModel) -> Result<Trigger, (&'static str, String)> {
    let (input, key, when) = compile_templates(
        model.input.as_ref(),
        model.idempotency_key.as_deref(),
        model.when.as_deref(),
    )?;
    let (paused, _) = watch::channel(false);
    Ok(Trigger {
        model: Arc::new(model.clone()),
        input,
        key,
        when,
        received: AtomicU64::new(0),
        started: AtomicU64::new(0),
        deduplicated: AtomicU64::new(0),
        dropped: AtomicU64::new(0),
        refused: AtomicU64::new(0),
        dead_lettered: AtomicU64::new(0),
        paused,
        status: Mutex::new(("", String::new())),
        active: AtomicBool::new(false),
    })
}

impl Trigger {
    pub fn counts(&self) -> TriggerCounts {
        TriggerCounts {
            received: self.received.load(Relaxed),
            started: self.started.load(Relaxed),
            deduplicated: self.deduplicated.load(Relaxed),
            dropped: self.dropped.load(Relaxed),
            refused: self.refused.load(Relaxed),
            dead_lettered: self.dead_lettered.load(Relaxed),
        }
    }

    pub fn view(&self) -> TriggerView {
        let (state, detail) = if self.is_paused() {
            ("paused", String::new())
        } else {
            let s = self.status.lock().unwrap_or_else(|p| p.into_inner());
            match s.0 {
                "" => ("running", String::new()),
                other => (other, s.1.clone()),
            }
        };
        TriggerView {
            name: self.model.name.to_string(),
            kind: self.model.kind(),
            tenant: self.model.tenant.to_string(),
            state,
            detail,
            counts: self.counts(),
        }
    }

    pub fn is_paused(&self) -> bool {
        *self.paused.borrow()
    }

    /// Wait until an operator resumes it (at once if it is not paused).
    pub async fn resumed(&self) {
        let mut rx = self.paused.subscribe();
        let _ = rx.wait_for(|p| !*p).await;
    }

    /// Say what holds it (`waiting`, `failing`), or that it runs again (`""`).
    pub(crate) fn set_status(&self, state: &'static str, detail: impl Into<String>) {
        let detail = detail.into();
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        if s.0 != state || s.1 != detail {
            if state == "failing" {
                tracing::warn!(graph = %self.model.graph, trigger = %self.model.name, %detail, "trigger failing");
            } else if s.0 == "failing" {
                tracing::info!(graph = %self.model.graph, trigger = %self.model.name, "trigger recovered");
            }
            metrics::gauge!(crate::metrics::TRIGGER_WAITING, "graph" => self.model.graph.to_string(), "trigger" => self.model.name.to_string())
                .set(if state == "waiting" { 1.0 } else { 0.0 });
            metrics::gauge!(crate::metrics::TRIGGER_FAILING, "graph" => self.model.graph.to_string(), "trigger" => self.model.name.to_string())
                .set(if state == "failing" { 1.0 } else { 0.0 });
            *s = (state, detail);
        }
    }

    pub(crate) fn count_dead_letter(&self) {
        self.dead_lettered.fetch_add(1, Relaxed);
        self.metric("dead_lettered");
    }

    fn metric(&self, outcome: &'static str) {
        metrics::counter!(
            crate::metrics::TRIGGER_EVENTS,
            "graph" => self.model.graph.to_string(),
            "trigger" => self.model.name.to_string(),
            "outcome" => outcome
        )
        .increment(1);
    }

    fn view_of(&self, event: &Event) -> minijinja::Value {
        let mut trigger = serde_json::Map::new();
        trigger.insert("name".into(), json!(&*self.model.name));
        trigger.insert("graph".into(), json!(&*self.model.graph));
        trigger.insert("kind".into(), json!(self.model.kind()));
        if let Some(id) = &event.id {
            trigger.insert("id".into(), json!(id));
        }
        for (k, v) in &event.meta {
            trigger.insert(k.clone(), v.clone());
        }
        minijinja::Value::from(minijinja::value::Serde(json!({
            "event": event.body,
            "headers": event.headers,
            "trigger": trigger,
        })))
    }

    /// Map an event to a job and submit it (see the module's documentation). `again`: the same
    /// delivery submitted anew after a refusal to retry (not counted as received or refused a
    /// second time).
    pub async fn fire(&self, orch: &Orchestrator, event: Event, again: bool) -> Outcome {
        if !again {
            self.received.fetch_add(1, Relaxed);
            self.metric("received");
        }
        let view = self.view_of(&event);
        if let Some(env) = &self.when {
            let fired = env
                .get_template("when")
                .and_then(|t| t.render(&view))
                .map_err(|e| format!("`when` failed: {e}"));
            match fired {
                Ok(s) if s == "1" => {}
                Ok(_) => {
                    self.dropped.fetch_add(1, Relaxed);
                    self.metric("dropped");
                    return Outcome::Dropped;
                }
                Err(e) => return self.invalid(e),
            }
        }
        let input = match &self.input {
            None => event.body.clone(),
            Some(t) => match t.render_view(&view) {
                Ok(v) => v,
                Err(e) => {
                    return self.invalid(format!("`input` failed: {}", first_line(&e.message)));
                }
            },
        };
        let key = match &self.key {
            Some(t) => match t.render_view(&view) {
                Ok(Value::String(s)) if !s.is_empty() => Some(s),
                Ok(_) => {
                    return self.invalid("`idempotency_key` rendered an empty key".into());
                }
                Err(e) => {
                    return self.invalid(format!(
                        "`idempotency_key` failed: {}",
                        first_line(&e.message)
                    ));
                }
            },
            // Scoped to the trigger: two triggers' message ids never name each other's jobs.
            None => event
                .id
                .as_ref()
                .map(|id| format!("{}/{}/{id}", self.model.graph, self.model.name)),
        };
        let max_key = orch.model().server.limits.max_idempotency_key_bytes;
        if let Some(k) = &key
            && k.len() > max_key
        {
            return self.invalid(format!(
                "the idempotency key is {} bytes, over [server.limits] max_idempotency_key_bytes ({max_key})",
                k.len()
            ));
        }
        let mut req = SubmitRequest::new(self.model.graph.to_string(), input);
        req.idempotency_key = key;
        req.tenant = self.model.tenant.to_string();
        req.labels.insert("source".into(), "trigger".into());
        req.labels
            .insert("trigger".into(), self.model.name.to_string());
        match orch.submit(req).await {
            Ok(s) if s.deduplicated => {
                self.deduplicated.fetch_add(1, Relaxed);
                self.metric("deduplicated");
                Outcome::Deduplicated(s.id)
            }
            Ok(s) => {
                self.started.fetch_add(1, Relaxed);
                self.metric("started");
                Outcome::Started(s.id)
            }
            Err(e) => {
                if !again {
                    self.refused.fetch_add(1, Relaxed);
                    self.metric("refused");
                }
                match &e {
                    SubmitError::InvalidBudget(_)
                    | SubmitError::KeyConflict(_)
                    | SubmitError::TenantNotAllowed { .. } => Outcome::Invalid(e.to_string()),
                    _ => Outcome::Retry(
                        e.retry_after().unwrap_or(Duration::from_secs(1)),
                        e.to_string(),
                    ),
                }
            }
        }
    }

    fn invalid(&self, reason: String) -> Outcome {
        self.refused.fetch_add(1, Relaxed);
        self.metric("refused");
        Outcome::Invalid(reason)
    }
}

/// A template error's first line: the reason, without the debug dump of the variables it saw
/// (an event's whole content, which a dead-letter record or a log must not carry).
fn first_line(message: &str) -> &str {
    message.lines().next().unwrap_or("").trim_end()
}

/// Every trigger of a server's graphs.
#[derive(Default)]
pub struct Triggers {
    list: Vec<Arc<Trigger>>,
}

#[derive(Debug, thiserror::Error)]
pub enum TriggerError {
    #[error("graph {graph:?} has no trigger {trigger:?}{}", if .known.is_empty() { "; it declares none ([[graph.triggers]])".to_string() } else { format!("; its triggers: {}", .known.join(", ")) })]
    Unknown {
        graph: String,
        trigger: String,
        known: Vec<String>,
    },
}

impl Triggers {
    /// Compile every graph's triggers (the loader checked them already).
    pub fn new(model: &crate::model::ServerModel) -> Self {
        let mut list = Vec::new();
        for g in &model.graphs {
            for t in &g.triggers {
                match compile(t) {
                    Ok(t) => list.push(Arc::new(t)),
                    Err((field, e)) => {
                        tracing::error!(graph = %g.name, trigger = %t.name, field, error = %e, "trigger not started")
                    }
                }
            }
        }
        Self { list }
    }

    pub fn all(&self) -> &[Arc<Trigger>] {
        &self.list
    }

    pub fn of_graph<'a>(&'a self, graph: &'a str) -> impl Iterator<Item = &'a Arc<Trigger>> {
        self.list.iter().filter(move |t| &*t.model.graph == graph)
    }

    pub fn get(&self, graph: &str, name: &str) -> Result<&Arc<Trigger>, TriggerError> {
        self.list
            .iter()
            .find(|t| &*t.model.graph == graph && &*t.model.name == name)
            .ok_or_else(|| TriggerError::Unknown {
                graph: graph.chars().take(crate::text::ECHO_CHARS).collect(),
                trigger: name.chars().take(crate::text::ECHO_CHARS).collect(),
                known: self
                    .of_graph(graph)
                    .map(|t| t.model.name.to_string())
                    .collect(),
            })
    }

    /// Pause or resume a trigger; kept in the store, so that a restart keeps it.
    pub fn set_paused(
        &self,
        store: &dyn crate::store::JobStore,
        graph: &str,
        name: &str,
        paused: bool,
    ) -> Result<Arc<Trigger>, TriggerError> {
        let t = self.get(graph, name)?.clone();
        t.paused.send_replace(paused);
        save_state(store, &t, &load_state(store, &t));
        tracing::info!(graph, trigger = name, paused, "trigger paused or resumed");
        metrics::gauge!(crate::metrics::TRIGGER_PAUSED, "graph" => graph.to_string(), "trigger" => name.to_string())
            .set(if paused { 1.0 } else { 0.0 });
        Ok(t)
    }

    /// Start every consumer and schedule (webhooks are answered by the HTTP server): each
    /// runs until `stop` turns true.
    pub fn start(orch: &Arc<Orchestrator>, stop: watch::Receiver<bool>) {
        for t in orch.triggers().all() {
            let state = load_state(orch.store().as_ref(), t);
            t.paused.send_replace(state.paused);
            metrics::gauge!(crate::metrics::TRIGGER_PAUSED, "graph" => t.model.graph.to_string(), "trigger" => t.model.name.to_string())
                .set(if state.paused { 1.0 } else { 0.0 });
            // Exported at 0 from the start: a query or an alert finds the series before any failure.
            metrics::gauge!(crate::metrics::TRIGGER_FAILING, "graph" => t.model.graph.to_string(), "trigger" => t.model.name.to_string())
                .set(0.0);
            let (orch, t2, stop) = (orch.clone(), t.clone(), stop.clone());
            match &t.model.source {
                TriggerSource::Webhook(_) => {}
                TriggerSource::Nats(spec) => {
                    let spec = spec.clone();
                    t.active.store(true, Relaxed);
                    tokio::spawn(nats::run(orch, t2, spec, stop));
                }
                TriggerSource::RedisStream(spec) => {
                    let spec = spec.clone();
                    t.active.store(true, Relaxed);
                    tokio::spawn(redis_stream::run(orch, t2, spec, stop));
                }
                TriggerSource::Schedule(spec) => {
                    let spec = spec.clone();
                    t.active.store(true, Relaxed);
                    tokio::spawn(schedule::run(
                        orch,
                        t2,
                        spec,
                        schedule::WallClock::system(),
                        stop,
                    ));
                }
            }
        }
    }
}

/// What a trigger keeps across restarts.
#[derive(Clone, Debug, Default, serde::Serialize, serde::Deserialize)]
pub struct TriggerState {
    #[serde(default)]
    pub paused: bool,
    /// A schedule's last slot fired (unix milliseconds).
    #[serde(default)]
    pub last_slot_ms: Option<i64>,
}

fn state_key(t: &Trigger) -> String {
    format!("{}/{}", t.model.graph, t.model.name)
}

pub(crate) fn load_state(store: &dyn crate::store::JobStore, t: &Trigger) -> TriggerState {
    match store.trigger_state(&state_key(t)) {
        Ok(Some(text)) => serde_json::from_str(&text).unwrap_or_default(),
        Ok(None) => TriggerState::default(),
        Err(e) => {
            tracing::error!(trigger = %t.model.name, error = %e, "could not read the trigger's state");
            TriggerState::default()
        }
    }
}

/// Save a trigger's state; its pause is always the one in force now (a schedule saving its last
/// slot must not write back a pause it read before an operator changed it).
pub(crate) fn save_state(store: &dyn crate::store::JobStore, t: &Trigger, state: &TriggerState) {
    let state = TriggerState {
        paused: t.is_paused(),
        ..state.clone()
    };
    store.save_trigger_state(
        &state_key(t),
        serde_json::to_string(&state).expect("a trigger state serialises"),
    );
}

/// How many more jobs `tenant` may have queued or running (its `[tenants.NAME]
/// max_pending_jobs`), if it has a limit.
fn tenant_room(orch: &Orchestrator, tenant: &str) -> Option<usize> {
    let max = orch.model().tenants.get(tenant)?.max_pending_jobs?.get();
    Some(max.saturating_sub(orch.store().tenant_live_count(tenant)))
}

/// Whether `graph` takes more work of `tenant` now: `None` when it does, else how long to wait
/// and why. A consumer fetches only while this is `None`, so that when the graph (or the
/// tenant) is full, or the graph paused, the backlog stays in the bus.
pub async fn admission(
    orch: &Orchestrator,
    graph: &str,
    tenant: &str,
) -> Option<(Duration, String)> {
    let (pending, max) = orch.pending_room(graph)?;
    if pending >= max {
        return Some((
            Duration::from_millis(100),
            format!("the graph has {pending} jobs pending, its max_pending_jobs"),
        ));
    }
    if tenant_room(orch, tenant) == Some(0) {
        return Some((
            Duration::from_millis(100),
            format!("tenant {tenant:?} has its max_pending_jobs queued or running"),
        ));
    }
    if orch.paused_agents(graph) > 0 {
        let now_ms = crate::clock::unix_ms(crate::clock::now());
        let until = orch
            .pauses(graph)
            .await
            .unwrap_or_default()
            .iter()
            .filter_map(|(_, p)| p.as_ref())
            .flat_map(|p| p.causes.iter())
            .map(|(_, c)| c.until_unix_ms.map_or(1000, |u| u.saturating_sub(now_ms)))
            .max()
            .unwrap_or(100);
        return Some((
            Duration::from_millis(until.clamp(20, 1000)),
            "an agent of the graph is paused by the cascade".into(),
        ));
    }
    None
}

/// Wait until the trigger may take more events: not paused by an operator, and its graph admits
/// work. Returns how many events fit in the graph now (at least 1), or `None` once `stop` is
/// set.
pub(crate) async fn wait_for_room(
    orch: &Orchestrator,
    t: &Trigger,
    stop: &mut watch::Receiver<bool>,
) -> Option<usize> {
    loop {
        if *stop.borrow() {
            return None;
        }
        if t.is_paused() {
            tokio::select! {
                _ = t.resumed() => continue,
                _ = stop.wait_for(|s| *s) => return None,
            }
        }
        match admission(orch, &t.model.graph, &t.model.tenant).await {
            None => {
                t.set_status("", "");
                let (pending, max) = orch.pending_room(&t.model.graph).unwrap_or((0, 1));
                let room = max.saturating_sub(pending);
                let room = tenant_room(orch, &t.model.tenant).map_or(room, |r| r.min(room));
                return Some(room.max(1));
            }
            Some((wait, why)) => {
                t.set_status("waiting", why);
                tokio::select! {
                    _ = tokio::time::sleep(wait) => {}
                    _ = stop.wait_for(|s| *s) => return None,
                }
            }
        }
    }
}

/// Sleep for `d` unless `stop` turns true first (then `false`).
pub(crate) async fn sleep_or_stop(d: Duration, stop: &mut watch::Receiver<bool>) -> bool {
    tokio::select! {
        _ = tokio::time::sleep(d) => true,
        _ = stop.wait_for(|s| *s) => false,
    }
}

/// A message payload as an event body: JSON when it parses, else text (lossy UTF-8).
pub(crate) fn payload_value(bytes: &[u8]) -> Value {
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

/// The backoff between attempts to reach an unreachable source: doubling from 500 ms to 30 s.
pub(crate) fn reconnect_delay(attempt: u32) -> Duration {
    Duration::from_millis(500u64.saturating_mul(1 << attempt.min(6))).min(Duration::from_secs(30))
}
