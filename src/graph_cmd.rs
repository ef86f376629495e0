use std::path::{Path, PathBuf};
use std::process::ExitCode;

use cascade_orchestrator::agents::Registry;
use cascade_orchestrator::{config, dag};

pub fn check(config_file: Option<&Path>, files: &[PathBuf]) -> anyhow::Result<ExitCode> {
    match config::load(config_file, files, &Registry::default()) {
        Ok(model) => {
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
