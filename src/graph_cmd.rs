use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cascade_orchestrator::agents::Registry;
use cascade_orchestrator::{config, dag};

pub fn check(
    config_file: Option<&Path>,
    files: &[PathBuf],
    connect: bool,
) -> anyhow::Result<ExitCode> {
    let registry = Registry::default();
    match config::load(config_file, files, &registry) {
        Ok(model) => {
            if connect && !check_mcp(&registry, &model)? {
                return Ok(ExitCode::FAILURE);
            }
            for g in &model.graphs {
                let quotas: std::collections::BTreeSet<&str> = g
                    .agents
                    .iter()
                    .flat_map(|a| a.quotas.iter().map(|q| &**q))
                    .collect();
                println!(
                    "ok: {} ({}): {} agents, {} edges, {} quotas{}",
                    g.name,
                    g.source.display(),
                    g.agents.len(),
                    g.agents.iter().map(|a| a.after.len()).sum::<usize>(),
                    quotas.len(),
                    if quotas.is_empty() {
                        String::new()
                    } else {
                        format!(" ({})", quotas.into_iter().collect::<Vec<_>>().join(", "))
                    }
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            eprintln!("{errors}");
            Ok(ExitCode::FAILURE)
        }
    }
}

/// `--connect`: start (or reach) every declared MCP server and check the `mcp` agents' tools and
/// fixed arguments against what they list. Prints what is wrong; whether all is well.
fn check_mcp(
    registry: &Registry,
    model: &cascade_orchestrator::model::ServerModel,
) -> anyhow::Result<bool> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let found = runtime.block_on(cascade_orchestrator::runtime::connect_mcp_servers(
        registry, model,
    ));
    for name in &found.unreachable {
        eprintln!(
            "error: MCP server {name:?} could not be reached (see the log above); its agents' tools are not checked"
        );
    }
    for e in &found.errors {
        eprintln!("error: {e}");
    }
    Ok(found.unreachable.is_empty() && found.errors.is_empty())
}

pub fn dot(config_file: Option<&Path>, file: &Path) -> anyhow::Result<ExitCode> {
    match config::load(config_file, &[file.to_path_buf()], &Registry::default()) {
        Ok(model) => {
            for g in model.graphs.iter().filter(|g| g.source == file) {
                print!("{}", dag::to_dot(&model, g));
            }
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            eprintln!("{errors}");
            Ok(ExitCode::FAILURE)
        }
    }
}
