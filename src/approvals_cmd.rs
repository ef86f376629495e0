//! `cascade approvals`: list, show, approve and reject proposals on a server.

use std::process::ExitCode;

use cascade_orchestrator::api::pb;
use clap::Subcommand;

use crate::client_cmd::{Conn, connect, explain, runtime};

#[derive(Subcommand)]
pub enum ApprovalsCommand {
    /// Proposals waiting for a decision, oldest job first.
    List {
        /// Only this graph's.
        #[arg(long)]
        graph: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
    },
    /// One approval: the proposed call exactly as its hash covers it, and its decision if any.
    Show { approval_id: String },
    /// Approve a proposal: the server runs exactly the call shown, once.
    Approve {
        approval_id: String,
        /// The proposal's SHA-256 as `show` printed it: the decision is bound to that text.
        #[arg(long)]
        sha256: String,
        /// Who decides.
        #[arg(long = "as", value_name = "NAME")]
        approver: String,
        #[arg(long, default_value = "")]
        reason: String,
    },
    /// Reject a proposal: its step and job fail with the reason.
    Reject {
        approval_id: String,
        #[arg(long)]
        sha256: String,
        #[arg(long = "as", value_name = "NAME")]
        approver: String,
        #[arg(long)]
        reason: String,
    },
}

pub fn run(conn: Conn, cmd: ApprovalsCommand) -> anyhow::Result<ExitCode> {
    runtime()?.block_on(async move {
        let mut client = connect(&conn).await?;
        match cmd {
            ApprovalsCommand::List { graph, limit } => {
                let resp = client
                    .list_approvals(pb::ListApprovalsRequest {
                        graph: graph.unwrap_or_default(),
                        page_size: limit,
                        page_token: String::new(),
                    })
                    .await
                    .map_err(explain)?
                    .into_inner();
                if conn.json {
                    let list: Vec<_> = resp.approvals.iter().map(approval_json).collect();
                    println!("{}", serde_json::to_string_pretty(&serde_json::json!({"approvals": list, "next_page_token": resp.next_page_token}))?);
                } else if resp.approvals.is_empty() {
                    println!("no approvals waiting");
                } else {
                    for a in &resp.approvals {
                        println!("{}  {:<16} sha256 {}", a.approval_id, a.graph, a.proposal_sha256);
                    }
                }
            }
            ApprovalsCommand::Show { approval_id } => {
                let a = client
                    .get_approval(pb::GetApprovalRequest { approval_id })
                    .await
                    .map_err(explain)?
                    .into_inner();
                if conn.json {
                    println!("{}", serde_json::to_string_pretty(&approval_json(&a))?);
                } else {
                    print_approval(&a);
                }
            }
            ApprovalsCommand::Approve { approval_id, sha256, approver, reason } => {
                return resolve(&mut client, conn.json, approval_id, sha256, true, approver, reason).await;
            }
            ApprovalsCommand::Reject { approval_id, sha256, approver, reason } => {
                return resolve(&mut client, conn.json, approval_id, sha256, false, approver, reason).await;
            }
        }
        Ok(ExitCode::SUCCESS)
    })
}

async fn resolve(
    client: &mut crate::client_cmd::Client,
    json: bool,
    approval_id: String,
    sha256: String,
    approve: bool,
    approver: String,
    reason: String,
) -> anyhow::Result<ExitCode> {
    let decision = if approve {
        pb::ApprovalDecision::Approve
    } else {
        pb::ApprovalDecision::Reject
    };
    let a = client
        .resolve_approval(pb::ResolveApprovalRequest {
            approval_id,
            proposal_sha256: sha256,
            decision: decision as i32,
            reason,
            approver,
        })
        .await
        .map_err(explain)?
        .into_inner();
    if json {
        println!("{}", serde_json::to_string_pretty(&approval_json(&a))?);
    } else {
        println!(
            "{} {} by {}",
            a.approval_id,
            state_name(a.state),
            a.approver
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn state_name(s: i32) -> &'static str {
    match pb::ApprovalState::try_from(s).unwrap_or(pb::ApprovalState::Unspecified) {
        pb::ApprovalState::Unspecified => "unknown",
        pb::ApprovalState::Pending => "pending",
        pb::ApprovalState::Approved => "approved",
        pb::ApprovalState::Rejected => "rejected",
        pb::ApprovalState::Expired => "expired",
    }
}

fn time(t: &Option<prost_types::Timestamp>) -> Option<String> {
    t.as_ref().map(|t| {
        humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH
                + std::time::Duration::new(t.seconds.max(0) as u64, t.nanos.max(0) as u32),
        )
        .to_string()
    })
}

fn approval_json(a: &pb::Approval) -> serde_json::Value {
    serde_json::json!({
        "approval_id": a.approval_id,
        "job_id": a.job_id,
        "graph": a.graph,
        "agent": a.agent,
        "state": state_name(a.state),
        "proposal": a.proposal_json,
        "proposal_sha256": a.proposal_sha256,
        "created_at": time(&a.created_at),
        "expires_at": time(&a.expires_at),
        "approver": a.approver,
        "reason": a.reason,
        "decided_at": time(&a.decided_at),
    })
}

fn print_approval(a: &pb::Approval) {
    println!("approval {} ({})", a.approval_id, state_name(a.state));
    println!(
        "  job      {} (graph {}, agent {})",
        a.job_id, a.graph, a.agent
    );
    if let Some(t) = time(&a.expires_at) {
        println!("  expires  {t}");
    }
    if !a.approver.is_empty() {
        println!(
            "  decided  by {} at {}: {}",
            a.approver,
            time(&a.decided_at).unwrap_or_default(),
            a.reason
        );
    }
    let pretty = serde_json::from_str::<serde_json::Value>(&a.proposal_json)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| a.proposal_json.clone());
    println!("  proposal (sha256 {}):", a.proposal_sha256);
    for line in pretty.lines() {
        println!("    {line}");
    }
    if state_name(a.state) == "pending" {
        println!(
            "  decide with: cascade approvals approve {} --sha256 {} --as NAME",
            a.approval_id, a.proposal_sha256
        );
    }
}
