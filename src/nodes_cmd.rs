//! `cascade nodes`: the nodes sharing a server's store, their heartbeats and leases.

use std::process::ExitCode;

use cascade_orchestrator::api::pb;

use crate::client_cmd::{Conn, connect, explain, runtime};

pub fn run(conn: Conn) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut client = connect(&conn).await?;
        let nodes = client
            .list_nodes(pb::ListNodesRequest {})
            .await
            .map_err(explain)?
            .into_inner()
            .nodes;
        if conn.json {
            let items: Vec<_> = nodes
                .iter()
                .map(|n| {
                    serde_json::json!({
                        "id": n.id, "address": n.address, "alive": n.alive,
                        "last_heartbeat_ms": n.last_heartbeat_ms, "started_ms": n.started_ms,
                        "jobs_leased": n.jobs_leased, "this_node": n.this_node,
                    })
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&serde_json::json!({ "nodes": items }))?
            );
            return Ok(ExitCode::SUCCESS);
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        println!(
            "{:<32} {:<22} {:<6} {:>14} {:>7}",
            "NODE", "ADDRESS", "STATE", "HEARTBEAT", "LEASED"
        );
        for n in &nodes {
            let ago = (now - n.last_heartbeat_ms).max(0) as f64 / 1000.0;
            println!(
                "{:<32} {:<22} {:<6} {:>13.1}s {:>7}{}",
                n.id,
                n.address,
                if n.alive { "alive" } else { "dead" },
                ago,
                n.jobs_leased,
                if n.this_node { "  (this node)" } else { "" }
            );
        }
        Ok(ExitCode::SUCCESS)
    })
}
