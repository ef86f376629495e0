//! The gRPC client commands: `submit`, `jobs list|get|watch|cancel`, `graph status`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use cascade_orchestrator::agents::HumanDuration;
use cascade_orchestrator::api::pb;
use cascade_orchestrator::api::pb::cascade_client::CascadeClient;
use clap::{Args, Subcommand};
use tonic::transport::Channel;
use tonic_types::StatusExt;

#[derive(Args, Clone)]
pub struct Conn {
    /// The server's gRPC address.
    #[arg(
        long,
        env = "CASCADE_SERVER",
        default_value = "http://127.0.0.1:50051",
        global = true
    )]
    pub server: String,
    /// The API key (or token) to call with, sent as `authorization: Bearer …`.
    #[arg(long, env = "CASCADE_TOKEN", hide_env_values = true, global = true)]
    pub token: Option<String>,
    /// Print JSON for scripts instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// PEM CA certificate(s) to verify the server's TLS certificate with (an https:// server
    /// without it is checked against the system's roots).
    #[arg(long, env = "CASCADE_CA_FILE", global = true)]
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate for mutual TLS (with --key).
    #[arg(long, env = "CASCADE_CERT", global = true, requires = "key")]
    pub cert: Option<PathBuf>,
    /// PEM private key of --cert.
    #[arg(long, env = "CASCADE_KEY", global = true, requires = "cert")]
    pub key: Option<PathBuf>,
}

impl Conn {
    /// The server at `server`, reached without TLS or a credential (the demo's own server).
    pub fn local(server: String) -> Self {
        Self {
            server,
            token: None,
            json: false,
            ca_file: None,
            cert: None,
            key: None,
        }
    }
}

#[derive(Args)]
pub struct SubmitArgs {
    pub graph: String,
    /// The job input: JSON text, or @FILE.
    #[arg(long, default_value = "{}")]
    pub input: String,
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// A label, key=value (repeatable).
    #[arg(long = "label")]
    pub labels: Vec<String>,
    /// This job's deadline, e.g. 30s.
    #[arg(long)]
    pub deadline: Option<HumanDuration>,
    /// POSTed (signed) when the job ends.
    #[arg(long)]
    pub callback_url: Option<String>,
    /// The most tokens this job may spend (at most the graph's budget).
    #[arg(long)]
    pub max_tokens: Option<u64>,
    /// The most dollars this job may spend (at most the graph's budget).
    #[arg(long)]
    pub max_cost_usd: Option<f64>,
    /// Follow the job live, step by step, until it ends.
    #[arg(long)]
    pub wait: bool,
}

#[derive(Subcommand)]
pub enum JobsCommand {
    /// Jobs, newest first.
    List {
        #[arg(long)]
        graph: Option<String>,
        /// pending, running, awaiting_approval, budget_exceeded, succeeded, failed, cancelled
        #[arg(long)]
        state: Option<String>,
        /// key=value,key2=value2
        #[arg(long)]
        labels: Option<String>,
        #[arg(long, default_value_t = 20)]
        limit: u32,
    },
    /// A job with its steps.
    Get { job_id: String },
    /// Follow a job's events until it ends.
    Watch { job_id: String },
    /// Cancel a job.
    Cancel {
        job_id: String,
        #[arg(long)]
        reason: Option<String>,
    },
    /// Set a job's budget; a job stopped by its budget goes on from where it stopped.
    RaiseBudget {
        job_id: String,
        #[arg(long)]
        max_tokens: Option<u64>,
        #[arg(long)]
        max_cost_usd: Option<f64>,
    },
}

pub fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?)
}

/// Adds the caller's credential to every request.
#[derive(Clone)]
pub struct Token(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl tonic::service::Interceptor for Token {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

/// A client of the server, with the caller's credential.
pub type Client = CascadeClient<tonic::service::interceptor::InterceptedService<Channel, Token>>;

pub async fn connect(conn: &Conn) -> anyhow::Result<Client> {
    let server = conn.server.as_str();
    let token = match conn
        .token
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        None => Token(None),
        Some(t) => {
            let mut v: tonic::metadata::MetadataValue<tonic::metadata::Ascii> =
                format!("Bearer {t}").parse().map_err(|_| {
                    anyhow::anyhow!("the token (--token or CASCADE_TOKEN) is not printable ASCII")
                })?;
            v.set_sensitive(true);
            Token(Some(v))
        }
    };
    let mut endpoint = tonic::transport::Endpoint::from_shared(server.to_string())
        .with_context(|| {
            format!("{server:?} is not a server address; use http://HOST:PORT or https://HOST:PORT")
        })?
        .connect_timeout(Duration::from_secs(5));
    let tls_asked = conn.ca_file.is_some() || conn.cert.is_some();
    if tls_asked && !server.starts_with("https://") {
        anyhow::bail!(
            "--ca-file, --cert and --key are for a TLS server: use --server https://HOST:PORT"
        );
    }
    if server.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        tls = match &conn.ca_file {
            Some(ca) => tls.ca_certificate(tonic::transport::Certificate::from_pem(
                std::fs::read(ca).with_context(|| format!("--ca-file {}", ca.display()))?,
            )),
            None => tls.with_native_roots(),
        };
        if let (Some(cert), Some(key)) = (&conn.cert, &conn.key) {
            tls = tls.identity(tonic::transport::Identity::from_pem(
                std::fs::read(cert).with_context(|| format!("--cert {}", cert.display()))?,
                std::fs::read(key).with_context(|| format!("--key {}", key.display()))?,
            ));
        }
        endpoint = endpoint
            .tls_config(tls)
            .context("the TLS settings (--ca-file, --cert, --key)")?;
    }
    let channel = endpoint.connect().await.map_err(|e| {
        // tonic's error says "transport error"; the cause (a refused connection, an untrusted
        // certificate) is in its source.
        let mut why = e.to_string();
        let mut source = std::error::Error::source(&e);
        while let Some(s) = source {
            why = format!("{why}: {s}");
            source = s.source();
        }
        anyhow::anyhow!("cannot reach the Cascade server at {server} ({why}); is `cascade serve` running? (--server or CASCADE_SERVER)")
    })?;
    Ok(CascadeClient::with_interceptor(channel, token))
}

/// A gRPC error as a person reads it: the message, the fields at fault, when to retry.
pub fn explain(status: tonic::Status) -> anyhow::Error {
    let mut msg = format!("{}: {}", code_name(status.code()), status.message());
    let details = status.get_error_details();
    if let Some(br) = details.bad_request() {
        for v in &br.field_violations {
            msg += &format!("\n  field {}: {}", v.field, v.description);
        }
    }
    if let Some(ri) = details.retry_info()
        && let Some(d) = ri.retry_delay
    {
        msg += &format!("\n  retry after {}", humantime::format_duration(d));
    }
    anyhow::anyhow!(msg)
}

fn code_name(c: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match c {
        NotFound => "not found",
        InvalidArgument => "invalid argument",
        AlreadyExists => "already exists",
        ResourceExhausted => "resource exhausted",
        Unavailable => "unavailable",
        Unauthenticated => "unauthenticated (send a key: --token or CASCADE_TOKEN)",
        PermissionDenied => "permission denied",
        _ => "error",
    }
}

fn read_input(arg: &str) -> anyhow::Result<String> {
    let text = match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(PathBuf::from(path))
            .with_context(|| format!("cannot read input file {path}"))?,
        None => arg.to_string(),
    };
    serde_json::from_str::<serde_json::Value>(&text).context(
        "--input is not valid JSON (pass JSON text such as '{\"ticket_id\": 1}', or @file.json)",
    )?;
    Ok(text)
}

pub fn state_name(s: i32) -> &'static str {
    match pb::JobState::try_from(s).unwrap_or(pb::JobState::Unspecified) {
        pb::JobState::Unspecified => "unknown",
        pb::JobState::Pending => "pending",
        pb::JobState::Running => "running",
        pb::JobState::AwaitingApproval => "awaiting_approval",
        pb::JobState::Succeeded => "succeeded",
        pb::JobState::Failed => "failed",
        pb::JobState::Cancelled => "cancelled",
        pb::JobState::BudgetExceeded => "budget_exceeded",
    }
}

fn step_state_name(s: i32) -> &'static str {
    match pb::StepState::try_from(s).unwrap_or(pb::StepState::Unspecified) {
        pb::StepState::Unspecified => "unknown",
        pb::StepState::Waiting => "waiting",
        pb::StepState::Running => "running",
        pb::StepState::Retrying => "retrying",
        pb::StepState::Succeeded => "succeeded",
        pb::StepState::Failed => "failed",
        pb::StepState::Cancelled => "cancelled",
        pb::StepState::AwaitingApproval => "awaiting_approval",
    }
}

fn job_json(j: &pb::Job) -> serde_json::Value {
    let parse =
        |s: &str| serde_json::from_str::<serde_json::Value>(s).unwrap_or(serde_json::Value::Null);
    serde_json::json!({
        "job_id": j.job_id,
        "graph": j.graph,
        "state": state_name(j.state),
        "input": parse(&j.input_json),
        "output": parse(&j.output_json),
        "error": (!j.error.is_empty()).then_some(&j.error),
        "labels": j.labels,
        "usage": j.usage.as_ref().map(|u| serde_json::json!({"prompt_tokens": u.prompt_tokens, "completion_tokens": u.completion_tokens, "cost_usd": u.cost_usd})),
        "budget": j.budget.as_ref().map(|b| serde_json::json!({"max_tokens": b.max_tokens, "max_cost_usd": b.max_cost_usd})),
        "steps": j.steps.iter().map(|s| serde_json::json!({
            "agent": s.agent, "state": step_state_name(s.state), "attempts": s.attempts,
            "output": parse(&s.output_json), "error": (!s.error.is_empty()).then_some(&s.error),
        })).collect::<Vec<_>>(),
    })
}

fn print_job(j: &pb::Job) {
    println!(
        "job {}  graph {}  {}",
        j.job_id,
        j.graph,
        state_name(j.state)
    );
    if !j.error.is_empty() {
        println!("  error: {}", j.error);
    }
    for s in &j.steps {
        let mut line = format!(
            "  {:<16} {:<10} attempts {}",
            s.agent,
            step_state_name(s.state),
            s.attempts
        );
        if let Some(u) = &s.usage
            && u.prompt_tokens + u.completion_tokens > 0
        {
            line += &format!("  tokens {}", u.prompt_tokens + u.completion_tokens);
        }
        if !s.error.is_empty() {
            line += &format!("  error: {}", s.error);
        }
        println!("{line}");
    }
    if let Some(u) = &j.usage {
        println!(
            "  usage: {} prompt + {} completion tokens, ${:.4}",
            u.prompt_tokens, u.completion_tokens, u.cost_usd
        );
    }
    if !j.output_json.is_empty() {
        println!("  output: {}", j.output_json);
    }
    if let Some(b) = &j.budget {
        let mut parts = Vec::new();
        if let Some(t) = b.max_tokens {
            parts.push(format!("{t} tokens"));
        }
        if let Some(c) = b.max_cost_usd {
            parts.push(format!("${c:.4}"));
        }
        println!("  budget: {}", parts.join(", "));
    }
}

fn print_event(e: &pb::JobEvent) {
    let detail = match e.kind.as_str() {
        "step_started" => format!("{} (attempt {})", e.agent, e.attempt),
        "step_succeeded" => {
            let tokens = e
                .usage
                .as_ref()
                .map_or(0, |u| u.prompt_tokens + u.completion_tokens);
            format!(
                "✓ {} (attempt {}{})",
                e.agent,
                e.attempt,
                if tokens > 0 {
                    format!(", {tokens} tokens")
                } else {
                    String::new()
                }
            )
        }
        "step_retrying" => format!(
            "↻ {} attempt {} failed, retry in {} ms: {}",
            e.agent, e.attempt, e.retry_delay_ms, e.error
        ),
        "step_failed" => format!("✗ {} after {} attempt(s): {}", e.agent, e.attempt, e.error),
        "approval_requested" => format!(
            "? {} waits for approval: cascade approvals show {}",
            e.agent, e.approval_id
        ),
        "approval_decided" => format!(
            "{} {} by {}{}",
            e.agent,
            e.outcome,
            e.approver,
            if e.reason.is_empty() {
                String::new()
            } else {
                format!(": {}", e.reason)
            }
        ),
        "parked" | "budget_exceeded" | "budget_raised" => e.reason.clone(),
        "finished" => format!(
            "{}{}",
            state_name(e.state),
            if e.error.is_empty() {
                String::new()
            } else {
                format!(": {}", e.error)
            }
        ),
        _ => String::new(),
    };
    println!("  #{:<3} {:<15} {detail}", e.seq, e.kind);
}

pub fn submit(conn: Conn, a: SubmitArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut client = connect(&conn).await?;
        let mut labels = std::collections::HashMap::new();
        for l in &a.labels {
            let (k, v) = l
                .split_once('=')
                .with_context(|| format!("--label {l:?} is not key=value"))?;
            labels.insert(k.to_string(), v.to_string());
        }
        let req = pb::SubmitJobRequest {
            graph: a.graph,
            input_json: read_input(&a.input)?,
            idempotency_key: a.idempotency_key.unwrap_or_default(),
            labels,
            deadline: a
                .deadline
                .map(|d| prost_types::Duration::try_from(d.get()).expect("a duration that fits")),
            callback_url: a.callback_url.unwrap_or_default(),
            tenant: String::new(),
            budget: (a.max_tokens.is_some() || a.max_cost_usd.is_some()).then_some(pb::Budget {
                max_tokens: a.max_tokens,
                max_cost_usd: a.max_cost_usd,
            }),
        };
        let resp = client.submit_job(req).await.map_err(explain)?.into_inner();
        if !a.wait {
            if conn.json {
                println!(
                    "{}",
                    serde_json::json!({"job_id": resp.job_id, "deduplicated": resp.deduplicated})
                );
            } else {
                println!(
                    "{}{}",
                    resp.job_id,
                    if resp.deduplicated {
                        " (already submitted)"
                    } else {
                        ""
                    }
                );
            }
            return Ok(ExitCode::SUCCESS);
        }
        if !conn.json {
            println!(
                "job {}{}",
                resp.job_id,
                if resp.deduplicated {
                    " (already submitted)"
                } else {
                    ""
                }
            );
        }
        follow(&mut client, &resp.job_id, conn.json).await
    })
}

/// Print a job's events as they happen, then the job; exit code 0 if it succeeded.
async fn follow(client: &mut Client, job_id: &str, json: bool) -> anyhow::Result<ExitCode> {
    let mut stream = client
        .watch_job(pb::WatchJobRequest {
            job_id: job_id.to_string(),
        })
        .await
        .map_err(explain)?
        .into_inner();
    while let Some(e) = stream.message().await.map_err(explain)? {
        if !json {
            print_event(&e);
        }
    }
    let job = client
        .get_job(pb::GetJobRequest {
            job_id: job_id.to_string(),
        })
        .await
        .map_err(explain)?
        .into_inner();
    if json {
        println!("{}", serde_json::to_string_pretty(&job_json(&job))?);
    } else {
        print_job(&job);
    }
    Ok(if job.state == pb::JobState::Succeeded as i32 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(2)
    })
}

pub fn jobs(conn: Conn, cmd: JobsCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut client = connect(&conn).await?;
        match cmd {
            JobsCommand::List { graph, state, labels, limit } => {
                let state = match state.as_deref() {
                    None => pb::JobState::Unspecified,
                    Some(s) => pb::JobState::from_str_name(&format!("JOB_STATE_{}", s.to_uppercase())).with_context(|| {
                        format!("unknown state {s:?}: use pending, running, awaiting_approval, budget_exceeded, succeeded, failed or cancelled")
                    })?,
                };
                let resp = client
                    .list_jobs(pb::ListJobsRequest {
                        graph: graph.unwrap_or_default(),
                        state: state as i32,
                        label_selector: labels.unwrap_or_default(),
                        page_size: limit,
                        page_token: String::new(),
                    })
                    .await
                    .map_err(explain)?
                    .into_inner();
                if conn.json {
                    let jobs: Vec<_> = resp.jobs.iter().map(job_json).collect();
                    println!("{}", serde_json::to_string_pretty(&serde_json::json!({"jobs": jobs, "next_page_token": resp.next_page_token}))?);
                } else {
                    for j in &resp.jobs {
                        println!("{}  {:<20} {:<10} {}", j.job_id, j.graph, state_name(j.state), j.error);
                    }
                    if resp.jobs.is_empty() {
                        println!("no jobs");
                    }
                }
            }
            JobsCommand::Get { job_id } => {
                let j = client.get_job(pb::GetJobRequest { job_id }).await.map_err(explain)?.into_inner();
                if conn.json {
                    println!("{}", serde_json::to_string_pretty(&job_json(&j))?);
                } else {
                    print_job(&j);
                }
            }
            JobsCommand::Watch { job_id } => return follow(&mut client, &job_id, conn.json).await,
            JobsCommand::RaiseBudget { job_id, max_tokens, max_cost_usd } => {
                let j = client
                    .raise_job_budget(pb::RaiseJobBudgetRequest {
                        job_id,
                        budget: Some(pb::Budget { max_tokens, max_cost_usd }),
                    })
                    .await
                    .map_err(explain)?
                    .into_inner();
                if conn.json {
                    println!("{}", serde_json::to_string_pretty(&job_json(&j))?);
                } else {
                    println!("{} {}", j.job_id, state_name(j.state));
                }
            }
            JobsCommand::Cancel { job_id, reason } => {
                let j = client
                    .cancel_job(pb::CancelJobRequest {
                        job_id,
                        reason: reason.unwrap_or_default(),
                    })
                    .await
                    .map_err(explain)?
                    .into_inner();
                if conn.json {
                    println!("{}", serde_json::to_string_pretty(&job_json(&j))?);
                } else {
                    println!("{} {}", j.job_id, state_name(j.state));
                }
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

/// `cascade graph reload`: the server reads its files again, and serves them, or says why not.
pub fn graph_reload(conn: Conn) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut client = connect(&conn).await?;
        match client.reload_graphs(pb::ReloadGraphsRequest {}).await {
            Ok(r) => {
                let graphs = r.into_inner().graphs;
                if conn.json {
                    println!("{}", serde_json::json!({ "reloading": graphs }));
                } else {
                    println!(
                        "reloading: the server restarts its engine in place and serves {}",
                        graphs.join(", ")
                    );
                }
                Ok(ExitCode::SUCCESS)
            }
            Err(status) if status.code() == tonic::Code::InvalidArgument => {
                eprintln!("{}", status.message());
                Ok(ExitCode::FAILURE)
            }
            Err(status) => Err(explain(status)),
        }
    })
}

pub fn graph_status(conn: Conn, name: String) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut client = connect(&conn).await?;
        let g = client.get_graph(pb::GetGraphRequest { name }).await.map_err(explain)?.into_inner();
        if conn.json {
            let agents: Vec<_> = g
                .agents
                .iter()
                .map(|a| serde_json::json!({"name": a.name, "kind": a.kind, "state": a.state, "queue_depth": a.queue_depth,
                    "in_flight": a.in_flight, "pause_reach": a.pause_reach,
                    "pause_causes": a.pause_causes.iter().map(|c| serde_json::json!({"quota": c.quota, "reason": c.reason,
                        "until": c.until.as_ref().map(|t| t.to_string())})).collect::<Vec<_>>()}))
                .collect();
            let quotas: Vec<_> = g
                .quotas
                .iter()
                .map(|q| serde_json::json!({"name": q.name, "limits": q.limits, "available": q.available, "circuit": q.circuit,
                    "exhausted_reason": q.exhausted_reason}))
                .collect();
            println!("{}", serde_json::to_string_pretty(&serde_json::json!({"name": g.name, "pending_jobs": g.pending_jobs,
                "running_jobs": g.running_jobs, "agents": agents, "quotas": quotas}))?);
            return Ok(ExitCode::SUCCESS);
        }
        println!("graph {}: {} running, {} pending", g.name, g.running_jobs, g.pending_jobs);
        for a in &g.agents {
            let mut line = format!("  {:<16} {:<8} queue {:<5} in flight {:<4}", a.name, a.state, a.queue_depth, a.in_flight);
            for c in &a.pause_causes {
                line += &format!("  [{} {}: {}]", a.pause_reach, c.quota, c.reason);
            }
            println!("{line}");
        }
        for q in &g.quotas {
            let mut line = format!("  quota {:<10} {} — available: {}", q.name, q.limits, q.available);
            if !q.exhausted_reason.is_empty() {
                line += &format!("  EXHAUSTED ({})", q.exhausted_reason);
            }
            if !q.circuit.is_empty() {
                line += &format!("  circuit {}", q.circuit);
            }
            println!("{line}");
        }
        Ok(ExitCode::SUCCESS)
    })
}

#[derive(Args)]
pub struct TopArgs {
    /// Only this graph (default: every graph).
    pub graph: Option<String>,
    /// Seconds between frames.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Print one frame and exit (for scripts and tests).
    #[arg(long)]
    pub once: bool,
}

/// `cascade top`: the dashboard's live state in a terminal, redrawn every interval.
pub fn top(conn: Conn, a: TopArgs) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut client = connect(&conn).await?;
        let interval = Duration::from_secs_f64(a.interval.max(0.1));
        loop {
            let graphs = match &a.graph {
                Some(name) => vec![
                    client
                        .get_graph(pb::GetGraphRequest { name: name.clone() })
                        .await
                        .map_err(explain)?
                        .into_inner(),
                ],
                None => {
                    client
                        .list_graphs(pb::ListGraphsRequest {})
                        .await
                        .map_err(explain)?
                        .into_inner()
                        .graphs
                }
            };
            let mut frame = String::new();
            // The nodes of a cluster (a server on its own lists itself, with no address).
            let nodes = client
                .list_nodes(pb::ListNodesRequest {})
                .await
                .map(|r| r.into_inner().nodes)
                .unwrap_or_default();
            if nodes.iter().any(|n| !n.address.is_empty()) {
                let alive = nodes.iter().filter(|n| n.alive).count();
                frame += &format!("cluster  {alive} of {} nodes alive\n", nodes.len());
                frame += &format!("  {:<32} {:<6} {:>7}\n", "NODE", "STATE", "LEASED");
                for n in &nodes {
                    frame += &format!(
                        "  {:<32} {:<6} {:>7}{}\n",
                        n.id,
                        if n.alive { "alive" } else { "dead" },
                        n.jobs_leased,
                        if n.this_node { "  (this node)" } else { "" }
                    );
                }
                frame += "\n";
            }
            for g in &graphs {
                let paused = g.agents.iter().filter(|x| x.state == "paused").count();
                frame += &format!(
                    "{}  running {}  pending {}  paused agents {}\n",
                    g.name, g.running_jobs, g.pending_jobs, paused
                );
                frame += &format!(
                    "  {:<18} {:<8} {:>6} {:>9}  {}\n",
                    "AGENT", "STATE", "QUEUE", "IN FLIGHT", "WHY"
                );
                for x in &g.agents {
                    let why: Vec<String> = x
                        .pause_causes
                        .iter()
                        .map(|c| {
                            let left = c
                                .until
                                .as_ref()
                                .map(|t| {
                                    let until = std::time::UNIX_EPOCH
                                        + Duration::new(
                                            t.seconds.max(0) as u64,
                                            t.nanos.max(0) as u32,
                                        );
                                    let secs = until
                                        .duration_since(std::time::SystemTime::now())
                                        .map_or(0.0, |d| d.as_secs_f64());
                                    format!(" {secs:.1}s left")
                                })
                                .unwrap_or_default();
                            format!("{} {}: {}{left}", x.pause_reach, c.quota, c.reason)
                        })
                        .collect();
                    frame += &format!(
                        "  {:<18} {:<8} {:>6} {:>9}  {}\n",
                        x.name,
                        x.state,
                        x.queue_depth,
                        x.in_flight,
                        why.join("; ")
                    );
                }
                for q in &g.quotas {
                    let state = if !q.exhausted_reason.is_empty() {
                        format!("EXHAUSTED ({})", q.exhausted_reason)
                    } else {
                        "ok".to_string()
                    };
                    let circuit = if q.circuit.is_empty() {
                        String::new()
                    } else {
                        format!(", circuit {}", q.circuit)
                    };
                    frame += &format!(
                        "  quota {:<12} {state}{circuit} — {} — available {}\n",
                        q.name, q.limits, q.available
                    );
                }
                frame += "\n";
            }
            if a.once {
                print!("{frame}");
                return Ok(ExitCode::SUCCESS);
            }
            // Clear the screen and draw the frame from the top.
            print!("\x1b[2J\x1b[H{frame}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
            tokio::select! {
                _ = tokio::time::sleep(interval) => {}
                _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
            }
        }
    })
}
