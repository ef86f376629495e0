//! `cascade`: the command-line front of the orchestrator.

mod approvals_cmd;
mod audit_cmd;
mod client_cmd;
mod demo_cmd;
mod graph_cmd;
mod keys_cmd;
mod nodes_cmd;
mod run_cmd;
mod serve_cmd;
mod triggers_cmd;

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
    #[command(flatten)]
    conn: client_cmd::Conn,
    /// Log format on stderr: text for people, json for log pipelines (level from RUST_LOG).
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"])]
    log_format: String,
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
    /// Serve the gRPC API and HTTP endpoints over the durable store.
    Serve(serve_cmd::ServeArgs),
    /// A server on the embedded example graphs plus a gRPC client that runs jobs through it.
    Demo(demo_cmd::DemoArgs),
    /// Submit a job to a server.
    Submit(client_cmd::SubmitArgs),
    /// A live terminal view of a server's graphs: which agent is paused, why, until when.
    Top(client_cmd::TopArgs),
    /// List, inspect, follow or cancel jobs on a server.
    Jobs {
        #[command(subcommand)]
        command: client_cmd::JobsCommand,
    },
    /// Proposals waiting for a person: list, show, approve, reject.
    Approvals {
        #[command(subcommand)]
        command: approvals_cmd::ApprovalsCommand,
    },
    /// A server's triggers (webhooks, bus consumers, schedules): list, pause, resume.
    Triggers {
        #[command(subcommand)]
        command: triggers_cmd::TriggersCommand,
    },
    /// The nodes sharing the server's store (several on PostgreSQL): heartbeats and leases.
    Nodes,
    /// The audit log: signing keys, and verification from a server's files.
    Audit {
        #[command(subcommand)]
        command: audit_cmd::AuditCommand,
    },
    /// API keys: make one for cascade.toml's [[auth.api_keys]].
    Keys {
        #[command(subcommand)]
        command: keys_cmd::KeysCommand,
    },
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
        /// Start (or reach) the config's MCP servers and check the tools the graphs call.
        #[arg(long)]
        connect: bool,
    },
    /// Print a graph as Graphviz DOT (quotas as boxes, agents as ellipses).
    Dot {
        file: PathBuf,
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// A running graph's agents (paused? why? until when?) and quotas, from a server.
    Status { name: String },
    /// Have the server read its config and graph files again (admin): a file with errors keeps
    /// the running graphs; valid ones are served after an in-place restart of the engine.
    Reload,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let json_logs = cli.log_format == "json";
    // `serve` and `run` install their own, once the config says whether traces go out too.
    if !matches!(cli.command, Command::Serve(_) | Command::Run(_))
        && let Err(e) = cascade_orchestrator::telemetry::init(json_logs, None)
    {
        eprintln!("error: {e:#}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Graph { command } => match command {
            GraphCommand::Check {
                files,
                config,
                connect,
            } => graph_cmd::check(config.as_deref(), &files, connect),
            GraphCommand::Dot { file, config } => graph_cmd::dot(config.as_deref(), &file),
            GraphCommand::Status { name } => client_cmd::graph_status(cli.conn, name),
            GraphCommand::Reload => client_cmd::graph_reload(cli.conn),
        },
        Command::Run(args) => run_cmd::run(args, json_logs),
        Command::Serve(args) => serve_cmd::run(args, json_logs),
        Command::Demo(args) => demo_cmd::run(args),
        Command::Submit(args) => client_cmd::submit(cli.conn, args),
        Command::Jobs { command } => client_cmd::jobs(cli.conn, command),
        Command::Top(args) => client_cmd::top(cli.conn, args),
        Command::Approvals { command } => approvals_cmd::run(cli.conn, command),
        Command::Triggers { command } => triggers_cmd::run(cli.conn, command),
        Command::Nodes => nodes_cmd::run(cli.conn),
        Command::Audit { command } => audit_cmd::run(command),
        Command::Keys { command } => keys_cmd::run(command),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Run `work` on a multi-threaded runtime with the log subscriber installed, and the OTLP export
/// too when `telemetry` names an endpoint. The export's channel lives on that runtime, and the
/// spans still queued are sent once `work` has finished, so those of the last jobs go too.
fn block_on_traced<F>(
    json_logs: bool,
    telemetry: &cascade_orchestrator::model::TelemetrySettings,
    work: F,
) -> anyhow::Result<ExitCode>
where
    F: Future<Output = anyhow::Result<ExitCode>>,
{
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let installed = {
        let _in_runtime = runtime.enter();
        cascade_orchestrator::telemetry::init(json_logs, Some(telemetry))?
    };
    let result = runtime.block_on(work);
    installed.shutdown();
    result
}
