//! `cascade`: the command-line front of the orchestrator.

mod graph_cmd;
mod run_cmd;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

// The engine allocates small, short-lived objects on every step from two threads; glibc's malloc
// spent over a third of the engine benchmark's time there. mimalloc is built for that pattern.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "cascade",
    version,
    about = "A multi-agent orchestrator whose quotas pause whole chains of agents"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Check graph files or draw them.
    Graph {
        #[command(subcommand)]
        command: GraphCommand,
    },
    /// Run jobs of a graph in this process, with a progress bar and a summary.
    Run(run_cmd::RunArgs),
}

#[derive(Subcommand)]
enum GraphCommand {
    /// Validate graph files; print every error, or one summary line per graph.
    Check {
        /// Graph files (TOML).
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// A server config (cascade.toml) whose shared quotas the graphs may use.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print a graph as Graphviz DOT (quotas as boxes, agents as ellipses).
    Dot {
        file: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing();
    let result = match cli.command {
        Command::Graph { command } => match command {
            GraphCommand::Check { files, config } => graph_cmd::check(config.as_deref(), &files),
            GraphCommand::Dot { file, config } => graph_cmd::dot(config.as_deref(), &file),
        },
        Command::Run(args) => run_cmd::run(args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs go to stderr; the level comes from `RUST_LOG` (default: warnings).
fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
