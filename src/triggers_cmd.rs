//! `cascade triggers`: list a server's triggers, pause and resume one.

use std::process::ExitCode;

use cascade_orchestrator::api::pb;
use clap::Subcommand;

use crate::client_cmd::{Conn, connect, explain, runtime};

#[derive(Subcommand)]
pub enum TriggersCommand {
    /// Every trigger (or a graph's), with its state and counts.
    List {
        /// Only this graph's.
        graph: Option<String>,
    },
    /// Stop a trigger taking events: a consumer stops pulling (the backlog waits in its bus), a
    /// schedule skips its slots, a webhook answers 503 with Retry-After. Kept across restarts.
    Pause { graph: String, trigger: String },
    /// Let a paused trigger take events again.
    Resume { graph: String, trigger: String },
}

fn trigger_json(t: &pb::Trigger) -> serde_json::Value {
    serde_json::json!({
        "graph": t.graph, "name": t.name, "kind": t.kind, "tenant": t.tenant,
        "state": t.state, "detail": t.detail,
        "received": t.received, "started": t.started, "deduplicated": t.deduplicated,
        "dropped": t.dropped, "refused": t.refused, "dead_lettered": t.dead_lettered,
    })
}

fn print(list: &[pb::Trigger]) {
    println!(
        "{:<16} {:<16} {:<12} {:<8} {:>9} {:>8} {:>6} {:>7} {:>7} {:>5}",
        "GRAPH",
        "TRIGGER",
        "KIND",
        "STATE",
        "RECEIVED",
        "STARTED",
        "DUP",
        "DROPPED",
        "REFUSED",
        "DEAD"
    );
    for t in list {
        println!(
            "{:<16} {:<16} {:<12} {:<8} {:>9} {:>8} {:>6} {:>7} {:>7} {:>5}{}",
            t.graph,
            t.name,
            t.kind,
            t.state,
            t.received,
            t.started,
            t.deduplicated,
            t.dropped,
            t.refused,
            t.dead_lettered,
            if t.detail.is_empty() {
                String::new()
            } else {
                format!("  ({})", t.detail)
            }
        );
    }
}

pub fn run(conn: Conn, cmd: TriggersCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut client = connect(&conn).await?;
        let list = match cmd {
            TriggersCommand::List { graph } => {
                client
                    .list_triggers(pb::ListTriggersRequest {
                        graph: graph.unwrap_or_default(),
                    })
                    .await
                    .map_err(explain)?
                    .into_inner()
                    .triggers
            }
            TriggersCommand::Pause { graph, trigger } => vec![
                client
                    .pause_trigger(pb::TriggerRequest { graph, trigger })
                    .await
                    .map_err(explain)?
                    .into_inner(),
            ],
            TriggersCommand::Resume { graph, trigger } => vec![
                client
                    .resume_trigger(pb::TriggerRequest { graph, trigger })
                    .await
                    .map_err(explain)?
                    .into_inner(),
            ],
        };
        if conn.json {
            let items: Vec<_> = list.iter().map(trigger_json).collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "triggers": items }))?
            );
        } else if list.is_empty() {
            println!("no triggers ([[graph.triggers]] in a graph file declares one)");
        } else {
            print(&list);
        }
        Ok(ExitCode::SUCCESS)
    })
}
