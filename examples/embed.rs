//! Embedding Cascade in a Rust program: load a graph, start the orchestrator, submit jobs, follow
//! one job's events, await the rest, shut down. Run it with `cargo run --example embed`.
//!
//! The graph's agents are simulated upstreams (`kind = "sim"`), so this runs offline.

use std::time::Duration;

use cascade_orchestrator::job::EventKind;
use cascade_orchestrator::{Orchestrator, SubmitRequest, config};
use futures::StreamExt;
use serde_json::json;

const GRAPH: &str = r#"
[graph]
name = "enrich-and-summarise"

[agents.lookup]
kind = "sim"                # simulated CRM lookup
latency = "30ms"

[agents.summarise]
kind = "sim"                # simulated LLM call
after = ["lookup"]
latency = "80ms"
usage = { prompt_tokens = 400, completion_tokens = 60 }
cost_per_1k_tokens = 0.002

[agents.report]
kind = "template"
after = ["summarise"]
output = { customer = "{{ input.customer }}", path = "{{= deps.summarise.trace }}" }
"#;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let model = config::parse_graph_str("embedded.toml", GRAPH, &Default::default())?;
    let orch = Orchestrator::builder(model).start().await?;

    // Follow one job event by event.
    let first = orch
        .submit(
            SubmitRequest::new("enrich-and-summarise", json!({"customer": "ada"}))
                .idempotency_key("ada-1"),
        )
        .await?;
    let mut events = orch.subscribe(first.id)?;
    while let Some(e) = events.next().await {
        match &e.kind {
            EventKind::StepSucceeded { agent, usage, .. } => {
                println!(
                    "  step {agent} done ({} tokens)",
                    usage.prompt_tokens + usage.completion_tokens
                )
            }
            EventKind::Finished { state, .. } => println!("  job {} {state}", e.job_id),
            _ => {}
        }
    }
    let job = orch.wait(first.id).await?;
    println!("output: {}", serde_json::to_string(&job.output)?);

    // Submitting with the same idempotency key returns the same job.
    let again = orch
        .submit(
            SubmitRequest::new("enrich-and-summarise", json!({"customer": "ada"}))
                .idempotency_key("ada-1"),
        )
        .await?;
    assert_eq!(again.id, first.id);

    // A batch, awaited together.
    let mut ids = Vec::new();
    for customer in ["bob", "cy", "dee"] {
        ids.push(
            orch.submit(SubmitRequest::new(
                "enrich-and-summarise",
                json!({"customer": customer}),
            ))
            .await?
            .id,
        );
    }
    for id in ids {
        let job = orch.wait(id).await?;
        println!("{} {} cost ${:.4}", job.id, job.state, job.usage.cost_usd);
    }
    orch.shutdown(Duration::from_secs(5)).await;
    Ok(())
}
