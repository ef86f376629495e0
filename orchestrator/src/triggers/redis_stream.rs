//! `kind = "redis_stream"`: a Redis Streams consumer group.
//!
//! `XREADGROUP` reads at most the room left in the graph (and `batch`) at a time, only while the
//! graph admits work; each entry is `XACK`ed after its job is durably accepted. Entries this
//! consumer read and did not acknowledge (it was killed, or the graph refused them for a while)
//! are read again from its pending list when it starts; entries another consumer left pending
//! longer than `claim_after` are claimed (`XAUTOCLAIM`). An entry that cannot become a job is
//! retried until `max_deliveries`, then added to the `dead_letter` stream with its fields, the
//! reason (`cascade_reason`), its deliveries (`cascade_deliveries`) and its id
//! (`cascade_source_id`), and acknowledged.

use std::sync::Arc;
use std::time::Duration;

use redis::AsyncTypedCommands;
use redis::streams::{StreamAutoClaimOptions, StreamId, StreamReadOptions};
use serde_json::{Value, json};
use tokio::sync::watch;

use super::{Event, Outcome, RedisSpec, Trigger};
use crate::Orchestrator;

/// How long one read waits for new entries.
const BLOCK: Duration = Duration::from_secs(1);

pub async fn run(
    orch: Arc<Orchestrator>,
    t: Arc<Trigger>,
    spec: RedisSpec,
    mut stop: watch::Receiver<bool>,
) {
    let mut attempt = 0u32;
    loop {
        match session(&orch, &t, &spec, &mut stop, &mut attempt).await {
            Ok(()) => return,
            Err(e) => {
                t.set_status("failing", format!("Redis: {e}"));
                attempt = attempt.saturating_add(1);
                if !super::sleep_or_stop(super::reconnect_delay(attempt), &mut stop).await {
                    return;
                }
            }
        }
    }
}

/// `url` with the password from its secret reference, when one is set.
fn url_with_password(spec: &RedisSpec) -> Result<String, String> {
    crate::quota::shared::url_with_password(&spec.url, spec.password.as_ref())
}

fn err(e: redis::RedisError) -> String {
    e.to_string()
}

async fn session(
    orch: &Orchestrator,
    t: &Trigger,
    spec: &RedisSpec,
    stop: &mut watch::Receiver<bool>,
    attempt: &mut u32,
) -> Result<(), String> {
    let client = redis::Client::open(url_with_password(spec)?).map_err(err)?;
    let cmd_config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(Duration::from_secs(5)));
    let mut con = client
        .get_multiplexed_async_connection_with_config(&cmd_config)
        .await
        .map_err(err)?;
    // A blocking read holds its connection: it gets one of its own.
    let block_config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(5)))
        .set_response_timeout(Some(BLOCK + Duration::from_secs(5)));
    let mut blocking = client
        .get_multiplexed_async_connection_with_config(&block_config)
        .await
        .map_err(err)?;
    match con
        .xgroup_create_mkstream(&spec.stream, &spec.group, "0")
        .await
    {
        Ok(()) => {}
        Err(e) if e.code() == Some("BUSYGROUP") => {}
        Err(e) => return Err(err(e)),
    }
    tracing::info!(graph = %t.model.graph, trigger = %t.model.name, stream = %spec.stream, group = %spec.group, consumer = %spec.consumer, "Redis stream consumer connected");
    *attempt = 0;
    t.set_status("", "");
    let backlog = metrics::gauge!(crate::metrics::TRIGGER_BACKLOG, "graph" => t.model.graph.to_string(), "trigger" => t.model.name.to_string());
    // Our own pending entries first (read before a restart, never acknowledged).
    let mut own_pending = true;
    let mut last_claim = tokio::time::Instant::now() - spec.claim_after;
    let mut last_info = tokio::time::Instant::now() - Duration::from_secs(10);
    loop {
        if last_info.elapsed() >= Duration::from_secs(1) {
            last_info = tokio::time::Instant::now();
            if let Some(lag) = group_lag(&mut con, spec).await {
                backlog.set(lag as f64);
            }
        }
        let Some(room) = super::wait_for_room(orch, t, stop).await else {
            return Ok(());
        };
        let n = room.min(spec.batch);
        let entries: Vec<StreamId> = if own_pending {
            let opts = StreamReadOptions::default()
                .group(&spec.group, &spec.consumer)
                .count(n);
            let reply = con
                .xread_options(&[&spec.stream], &["0"], &opts)
                .await
                .map_err(err)?;
            let ids: Vec<StreamId> = reply
                .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
                .unwrap_or_default();
            // Past the end of our list: new entries from now on.
            if ids.is_empty() {
                own_pending = false;
            }
            ids
        } else if last_claim.elapsed() >= spec.claim_after / 2 {
            last_claim = tokio::time::Instant::now();
            let claimed = con
                .xautoclaim_options(
                    &spec.stream,
                    &spec.group,
                    &spec.consumer,
                    spec.claim_after.as_millis() as u64,
                    "0-0",
                    StreamAutoClaimOptions::default().count(n),
                )
                .await
                .map_err(err)?;
            if !claimed.claimed.is_empty() {
                tracing::info!(graph = %t.model.graph, trigger = %t.model.name, entries = claimed.claimed.len(), "claimed entries another consumer left pending");
            }
            claimed.claimed
        } else {
            let opts = StreamReadOptions::default()
                .group(&spec.group, &spec.consumer)
                .count(n)
                .block(BLOCK.as_millis() as usize);
            let reply = blocking
                .xread_options(&[&spec.stream], &[">"], &opts)
                .await
                .map_err(err)?;
            reply
                .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
                .unwrap_or_default()
        };
        // Entries read together are submitted at once: the store commits their jobs together.
        let handled = futures::future::join_all(
            entries
                .into_iter()
                .map(|entry| handle(orch, t, spec, con.clone(), entry, stop.clone())),
        )
        .await;
        for h in handled {
            match h? {
                Handled::Done => {}
                Handled::Again => own_pending = true,
                Handled::Stopped => return Ok(()),
            }
        }
    }
}

/// The group's lag (entries not yet delivered to it) plus its pending entries, from `XINFO
/// GROUPS` (Redis 7).
async fn group_lag(con: &mut redis::aio::MultiplexedConnection, spec: &RedisSpec) -> Option<u64> {
    let v: redis::Value = redis::cmd("XINFO")
        .arg("GROUPS")
        .arg(&spec.stream)
        .query_async(con)
        .await
        .ok()?;
    let redis::Value::Array(groups) = v else {
        return None;
    };
    for g in groups {
        let fields: Vec<(String, redis::Value)> = match g {
            redis::Value::Array(items) => items
                .chunks(2)
                .filter_map(|c| {
                    let k: String = redis::from_redis_value_ref(&c[0]).ok()?;
                    Some((k, c.get(1)?.clone()))
                })
                .collect(),
            redis::Value::Map(items) => items
                .into_iter()
                .filter_map(|(k, v)| Some((redis::from_redis_value_ref(&k).ok()?, v)))
                .collect(),
            _ => continue,
        };
        let get = |name: &str| {
            fields
                .iter()
                .find(|(k, _)| k == name)
                .and_then(|(_, v)| redis::from_redis_value_ref::<u64>(v).ok())
        };
        let name = fields
            .iter()
            .find(|(k, _)| k == "name")
            .and_then(|(_, v)| redis::from_redis_value_ref::<String>(v).ok());
        if name.as_deref() == Some(spec.group.as_str()) {
            return Some(get("lag").unwrap_or(0) + get("pending").unwrap_or(0));
        }
    }
    None
}

enum Handled {
    Done,
    /// It goes back to this consumer's pending list, to be read again.
    Again,
    Stopped,
}

fn event_of(spec: &RedisSpec, entry: &StreamId) -> Event {
    let body = match entry.map.get(&spec.field) {
        Some(v) => match redis::from_redis_value_ref::<Vec<u8>>(v) {
            Ok(bytes) => super::payload_value(&bytes),
            Err(_) => Value::Null,
        },
        None => Value::Object(
            entry
                .map
                .iter()
                .filter_map(|(k, v)| {
                    Some((
                        k.clone(),
                        json!(redis::from_redis_value_ref::<String>(v).ok()?),
                    ))
                })
                .collect(),
        ),
    };
    let mut meta = serde_json::Map::new();
    meta.insert("stream".into(), json!(spec.stream));
    Event {
        body,
        headers: Default::default(),
        id: Some(entry.id.clone()),
        meta,
    }
}

async fn handle(
    orch: &Orchestrator,
    t: &Trigger,
    spec: &RedisSpec,
    mut con: redis::aio::MultiplexedConnection,
    entry: StreamId,
    mut stop: watch::Receiver<bool>,
) -> Result<Handled, String> {
    // An entry deleted or trimmed from the stream while pending comes back without its fields:
    // nothing to start.
    if entry.map.is_empty() {
        con.xack(&spec.stream, &spec.group, &[&entry.id])
            .await
            .map_err(err)?;
        return Ok(Handled::Done);
    }
    let mut again = false;
    loop {
        match t.fire(orch, event_of(spec, &entry), again).await {
            Outcome::Started(_) | Outcome::Deduplicated(_) | Outcome::Dropped => {
                con.xack(&spec.stream, &spec.group, &[&entry.id])
                    .await
                    .map_err(err)?;
                return Ok(Handled::Done);
            }
            Outcome::Retry(wait, why) => {
                again = true;
                t.set_status("waiting", why);
                if !super::sleep_or_stop(wait, &mut stop).await {
                    return Ok(Handled::Stopped);
                }
            }
            Outcome::Invalid(reason) => {
                let delivered = con
                    .xpending_count(&spec.stream, &spec.group, &entry.id, &entry.id, 1)
                    .await
                    .map_err(err)?
                    .ids
                    .first()
                    .map_or(1, |p| p.times_delivered);
                if delivered >= spec.dead_letter.max_deliveries as usize {
                    if let Some(target) = &spec.dead_letter.target {
                        let mut fields: Vec<(String, Vec<u8>)> = entry
                            .map
                            .iter()
                            .filter_map(|(k, v)| {
                                Some((k.clone(), redis::from_redis_value_ref::<Vec<u8>>(v).ok()?))
                            })
                            .collect();
                        fields.push(("cascade_reason".into(), reason.clone().into_bytes()));
                        fields.push((
                            "cascade_deliveries".into(),
                            delivered.to_string().into_bytes(),
                        ));
                        fields.push(("cascade_source_id".into(), entry.id.clone().into_bytes()));
                        fields.push((
                            "cascade_trigger".into(),
                            format!("{}/{}", t.model.graph, t.model.name).into_bytes(),
                        ));
                        con.xadd(target, "*", &fields).await.map_err(err)?;
                    }
                    tracing::warn!(graph = %t.model.graph, trigger = %t.model.name, id = %entry.id, delivered, %reason, dead_letter = ?spec.dead_letter.target, "an entry that cannot become a job was dead-lettered");
                    t.count_dead_letter();
                    con.xack(&spec.stream, &spec.group, &[&entry.id])
                        .await
                        .map_err(err)?;
                    return Ok(Handled::Done);
                }
                // Left pending: read again from this consumer's pending list after a pause
                // (each read counts a delivery).
                if !super::sleep_or_stop(Duration::from_secs(1), &mut stop).await {
                    return Ok(Handled::Stopped);
                }
                return Ok(Handled::Again);
            }
        }
    }
}
