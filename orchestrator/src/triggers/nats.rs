//! `kind = "nats"`: a JetStream durable pull consumer.
//!
//! The consumer fetches only while the graph admits work, at most the room left in the graph's
//! `max_pending_jobs` (and `batch`) at a time, so the backlog waits in the stream. Each message is
//! acknowledged after its job is durably accepted (or deduplicated, or dropped by `when`); a
//! refusal the graph says to retry holds the message (its ack timer kept alive with progress
//! acks) and stops the fetching until it is in. A message that cannot become a job is
//! redelivered (nak) until `max_deliveries`, then published to `dead_letter` with the reason in
//! its `Cascade-Dead-Letter-Reason` header and terminated.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::StreamExt;
use serde_json::json;
use tokio::sync::watch;

use super::{Event, NatsSpec, Outcome, Trigger};
use crate::Orchestrator;

/// How long one fetch waits for the first message when the stream is empty.
const FETCH_WAIT: Duration = Duration::from_secs(1);

/// Run the consumer until `stop`, reconnecting with backoff when the server is unreachable.
pub async fn run(
    orch: Arc<Orchestrator>,
    t: Arc<Trigger>,
    spec: NatsSpec,
    mut stop: watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    loop {
        match session(&orch, &t, &spec, &mut stop, &mut attempt).await {
            Ok(()) => return,
            Err(e) => {
                t.set_status("failing", format!("NATS {}: {e}", spec.url));
                attempt = attempt.saturating_add(1);
                if !super::sleep_or_stop(super::reconnect_delay(attempt), &mut stop).await {
                    return;
                }
            }
        }
    }
}

fn secret(r: &Option<crate::secret::SecretRef>) -> Result<Option<String>, String> {
    r.as_ref()
        .map(|r| {
            r.resolve().and_then(|s| {
                s.expose_str()
                    .map(String::from)
                    .ok_or_else(|| format!("secret {r} is not UTF-8 text"))
            })
        })
        .transpose()
}

async fn connect(spec: &NatsSpec) -> Result<(jetstream::Context, pull::Config), String> {
    let mut opts = async_nats::ConnectOptions::new()
        .connection_timeout(Duration::from_secs(5))
        .name("cascade");
    if let Some(token) = secret(&spec.token)? {
        opts = opts.token(token);
    }
    match (secret(&spec.user)?, secret(&spec.password)?) {
        (Some(u), Some(p)) => opts = opts.user_and_password(u, p),
        (None, None) => {}
        _ => return Err("set both user and password, or neither".into()),
    }
    let client = tokio::time::timeout(Duration::from_secs(10), opts.connect(spec.url.as_str()))
        .await
        .map_err(|_| "no answer within 10s".to_string())?
        .map_err(|e| e.to_string())?;
    let mut js = jetstream::new(client);
    js.set_timeout(Duration::from_secs(5));
    let config = pull::Config {
        durable_name: Some(spec.consumer.clone()),
        filter_subject: spec.subject.clone(),
        ack_policy: jetstream::consumer::AckPolicy::Explicit,
        ack_wait: spec.ack_wait,
        // Redelivery is bounded by Cascade (`max_deliveries`, then the dead-letter subject),
        // not by the server, which would drop the message silently.
        max_deliver: -1,
        // Unacknowledged messages out at once: what one fetch brings, twice.
        max_ack_pending: (spec.batch * 2) as i64,
        ..Default::default()
    };
    Ok((js, config))
}

async fn session(
    orch: &Orchestrator,
    t: &Trigger,
    spec: &NatsSpec,
    stop: &mut watch::Receiver<bool>,
    attempt: &mut u32,
) -> Result<(), String> {
    let (js, config) = connect(spec).await?;
    let stream = js
        .get_or_create_stream(jetstream::stream::Config {
            name: spec.stream.clone(),
            subjects: vec![spec.subject.clone()],
            ..Default::default()
        })
        .await
        .map_err(|e| format!("stream {:?}: {e}", spec.stream))?;
    // The stream's creation time goes into a message's default id: a stream deleted and made
    // anew restarts its sequence numbers, and its messages must not name the old ones' jobs.
    let created = stream
        .get_info()
        .await
        .map_err(|e| format!("stream {:?}: {e}", spec.stream))?
        .created
        .unix_timestamp();
    let consumer = stream
        .get_or_create_consumer(&spec.consumer, config)
        .await
        .map_err(|e| format!("consumer {:?}: {e}", spec.consumer))?;
    tracing::info!(graph = %t.model.graph, trigger = %t.model.name, url = %spec.url, stream = %spec.stream, consumer = %spec.consumer, "NATS consumer connected");
    *attempt = 0;
    t.set_status("", "");
    let backlog = metrics::gauge!(crate::metrics::TRIGGER_BACKLOG, "graph" => t.model.graph.to_string(), "trigger" => t.model.name.to_string());
    let mut last_info = tokio::time::Instant::now() - Duration::from_secs(10);
    loop {
        if last_info.elapsed() >= Duration::from_secs(1) {
            last_info = tokio::time::Instant::now();
            if let Ok(info) = consumer.get_info().await {
                backlog.set(info.num_pending as f64);
            }
        }
        let Some(room) = super::wait_for_room(orch, t, stop).await else {
            return Ok(());
        };
        let n = room.min(spec.batch);
        let mut batch = consumer
            .fetch()
            .max_messages(n)
            .expires(FETCH_WAIT)
            .messages()
            .await
            .map_err(|e| format!("fetch: {e}"))?;
        let mut msgs = Vec::with_capacity(n);
        while let Some(msg) = batch.next().await {
            msgs.push(msg.map_err(|e| format!("fetch: {e}"))?);
        }
        // A fetched batch is submitted at once: the store commits its jobs together (one
        // submission at a time would wait a commit each).
        let handled = futures::future::join_all(
            msgs.into_iter()
                .map(|msg| handle(orch, t, spec, &js, created, msg, stop.clone())),
        )
        .await;
        for h in handled {
            if !h? {
                return Ok(());
            }
        }
    }
}

/// Turn one message into a job and settle it with the server; `false` once `stop` is set.
async fn handle(
    orch: &Orchestrator,
    t: &Trigger,
    spec: &NatsSpec,
    js: &jetstream::Context,
    created: i64,
    msg: jetstream::Message,
    mut stop: watch::Receiver<bool>,
) -> Result<bool, String> {
    let (delivered, seq) = msg
        .info()
        .map(|i| (i.delivered, i.stream_sequence))
        .map_err(|e| format!("a message without JetStream metadata: {e}"))?;
    let mut headers = BTreeMap::new();
    if let Some(h) = &msg.headers {
        for (k, v) in h.iter() {
            if let Some(v) = v.first() {
                headers.insert(k.to_string().to_ascii_lowercase(), v.as_str().to_string());
            }
        }
    }
    // Nats-Msg-Id is the publisher's own id (JetStream deduplicates on it too); else the stream
    // (with its creation time) and sequence, which a redelivery keeps.
    let id = headers
        .get("nats-msg-id")
        .cloned()
        .unwrap_or_else(|| format!("{}@{created}:{seq}", spec.stream));
    let mut meta = serde_json::Map::new();
    meta.insert("subject".into(), json!(msg.subject.as_str()));
    meta.insert("sequence".into(), json!(seq));
    meta.insert("delivered".into(), json!(delivered));
    let body = super::payload_value(&msg.payload);
    let mut again = false;
    loop {
        let event = Event {
            body: body.clone(),
            headers: headers.clone(),
            id: Some(id.clone()),
            meta: meta.clone(),
        };
        match t.fire(orch, event, again).await {
            Outcome::Started(_) | Outcome::Deduplicated(_) | Outcome::Dropped => {
                msg.ack().await.map_err(|e| format!("ack: {e}"))?;
                return Ok(true);
            }
            Outcome::Retry(wait, why) => {
                again = true;
                t.set_status("waiting", why);
                // Keep the message ours while the graph makes room.
                let _ = msg.ack_with(AckKind::Progress).await;
                if !super::sleep_or_stop(wait.min(spec.ack_wait / 2), &mut stop).await {
                    return Ok(false);
                }
            }
            Outcome::Invalid(reason) => {
                if delivered >= i64::from(spec.dead_letter.max_deliveries) {
                    if let Some(target) = &spec.dead_letter.target {
                        let mut h = async_nats::HeaderMap::new();
                        h.insert(
                            "Cascade-Dead-Letter-Reason",
                            reason.replace(['\r', '\n'], " "),
                        );
                        h.insert(
                            "Cascade-Trigger",
                            format!("{}/{}", t.model.graph, t.model.name),
                        );
                        h.insert("Cascade-Original-Subject", msg.subject.as_str());
                        h.insert("Cascade-Original-Sequence", seq.to_string());
                        h.insert("Cascade-Deliveries", delivered.to_string());
                        js.publish_with_headers(target.clone(), h, msg.payload.clone())
                            .await
                            .map_err(|e| format!("dead letter to {target:?}: {e}"))?
                            .await
                            .map_err(|e| format!("dead letter to {target:?}: {e}"))?;
                    }
                    tracing::warn!(graph = %t.model.graph, trigger = %t.model.name, sequence = seq, delivered, %reason, dead_letter = ?spec.dead_letter.target, "a message that cannot become a job was dead-lettered");
                    t.count_dead_letter();
                    msg.ack_with(AckKind::Term)
                        .await
                        .map_err(|e| format!("ack: {e}"))?;
                } else {
                    msg.ack_with(AckKind::Nak(Some(Duration::from_secs(1))))
                        .await
                        .map_err(|e| format!("nak: {e}"))?;
                }
                return Ok(true);
            }
        }
    }
}
