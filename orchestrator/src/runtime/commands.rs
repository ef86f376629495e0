//! Commands across the nodes of a cluster: a cancel, a decision on an approval or a raised budget
//! that reaches a node other than the one holding the job (a load balancer sends requests to any
//! node) goes, through the shared store, to the node that holds it, which runs it and answers;
//! the node that took the request answers its caller from that. A node that no longer holds the
//! job says so, and the request runs where it came in.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{Orchestrator, RaiseBudgetError};
use crate::approval::ApprovalError;
use crate::job::{ApprovalDecision, Budget, JobId, JobState};
use crate::store::StoreError;

/// A command for the node that holds a job.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub(super) enum NodeCommand {
    Cancel {
        reason: String,
    },
    Decide {
        approval: String,
        sha256: String,
        approve: bool,
        approver: String,
        reason: String,
    },
    RaiseBudget {
        budget: Budget,
    },
}

/// What the holder answered.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "answer", rename_all = "snake_case")]
pub(super) enum CommandAnswer {
    /// Done (`repeated`: a decision already made, answered from the record).
    Done {
        #[serde(default)]
        repeated: bool,
    },
    /// That node does not hold the job (any more): it runs where the request came in.
    NotHeld,
    /// The holder read it after its sender had given up.
    Expired,
    Failed {
        error: RemoteError,
    },
}

/// Why the holder refused, as the caller must hear it.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub(super) enum RemoteError {
    NotFound,
    Stale { current: String, given: String },
    Conflict { first: ApprovalDecision },
    JobEnded { state: JobState },
    Invalid { message: String },
    Refused { message: String },
    Unavailable { message: String },
}

impl RemoteError {
    fn of_approval(e: ApprovalError) -> Self {
        match e {
            ApprovalError::NotFound(_) => Self::NotFound,
            ApprovalError::Stale { current, given, .. } => Self::Stale { current, given },
            ApprovalError::Conflict { first, .. } => Self::Conflict { first },
            ApprovalError::JobEnded { state, .. } => Self::JobEnded { state },
            ApprovalError::InvalidId(m) | ApprovalError::InvalidRequest(m) => {
                Self::Invalid { message: m }
            }
            ApprovalError::Refused(m) => Self::Refused { message: m },
            ApprovalError::Store(e) => Self::Unavailable {
                message: e.to_string(),
            },
            ApprovalError::Unavailable(id) => Self::Unavailable {
                message: ApprovalError::Unavailable(id).to_string(),
            },
        }
    }

    fn into_approval(self, id: &str, job: JobId) -> ApprovalError {
        match self {
            Self::NotFound => ApprovalError::NotFound(id.to_string()),
            Self::Stale { current, given } => ApprovalError::Stale {
                id: id.to_string(),
                current,
                given,
            },
            Self::Conflict { first } => ApprovalError::Conflict {
                id: id.to_string(),
                first,
            },
            Self::JobEnded { state } => ApprovalError::JobEnded {
                id: id.to_string(),
                job,
                state,
            },
            Self::Invalid { message } => ApprovalError::InvalidRequest(message),
            Self::Refused { message } => ApprovalError::Refused(message),
            Self::Unavailable { message } => ApprovalError::Store(StoreError::Unavailable(message)),
        }
    }

    fn message(&self) -> String {
        match self {
            Self::NotFound => "not found".into(),
            Self::Stale { current, given } => {
                format!("stale: the proposal is {current}, the request named {given}")
            }
            Self::Conflict { first } => format!("already {} by {}", first.outcome, first.approver),
            Self::JobEnded { state } => format!("the job has ended ({state})"),
            Self::Invalid { message }
            | Self::Refused { message }
            | Self::Unavailable { message } => message.clone(),
        }
    }
}

/// How a forwarded command ended, for the node that took the request.
pub(super) enum Forwarded {
    /// The holder did it.
    Done {
        repeated: bool,
    },
    /// Nobody else holds the job: run it here.
    Here,
    Failed(RemoteError),
}

impl Orchestrator {
    /// Run the commands other nodes of the cluster send for jobs this node holds (a store of its
    /// own has no other nodes: nothing comes). Called once the orchestrator is shared (the
    /// server does).
    pub fn serve_commands(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        // Commands come on the store's own runtime; they run on this one, the orchestrator's.
        let rt = tokio::runtime::Handle::current();
        self.shared
            .store
            .set_command_handler(Arc::new(move |job, command| {
                let weak = weak.clone();
                let task = rt.spawn(async move {
                    let answer = match (weak.upgrade(), serde_json::from_str(&command)) {
                        (Some(orch), Ok(command)) => orch.run_command(job, command).await,
                        (None, _) => CommandAnswer::Failed {
                            error: RemoteError::Unavailable {
                                message: "the node that holds the job is stopping".into(),
                            },
                        },
                        (_, Err(e)) => CommandAnswer::Failed {
                            error: RemoteError::Invalid {
                                message: format!("a command this node cannot read: {e}"),
                            },
                        },
                    };
                    serde_json::to_string(&answer).unwrap_or_default()
                });
                Box::pin(async move {
                    task.await.unwrap_or_else(|e| {
                        serde_json::to_string(&CommandAnswer::Failed {
                            error: RemoteError::Unavailable {
                                message: e.to_string(),
                            },
                        })
                        .unwrap_or_default()
                    })
                })
            }));
    }

    /// A command another node sent: run here, unless another node holds the job now.
    async fn run_command(&self, job: JobId, command: NodeCommand) -> CommandAnswer {
        match self.shared.store.remote_holder(job) {
            Ok(None) => {}
            Ok(Some(_)) => return CommandAnswer::NotHeld,
            Err(e) => {
                return CommandAnswer::Failed {
                    error: RemoteError::Unavailable {
                        message: e.to_string(),
                    },
                };
            }
        }
        let failed = |error| CommandAnswer::Failed { error };
        match command {
            NodeCommand::Cancel { reason } => match self.cancel_here(job, &reason).await {
                // Committed before the answer: the node that asked reads the job from the
                // database next.
                Ok(r) if r.state.is_terminal() => match self.shared.store.flush().await {
                    Ok(()) => CommandAnswer::Done { repeated: false },
                    Err(e) => failed(RemoteError::Unavailable {
                        message: e.to_string(),
                    }),
                },
                Ok(r) => failed(RemoteError::Unavailable {
                    message: format!(
                        "the node that holds job {job} could not cancel it now (it is {}); try again",
                        r.state
                    ),
                }),
                Err(e) => failed(RemoteError::Unavailable {
                    message: e.to_string(),
                }),
            },
            NodeCommand::Decide {
                approval,
                sha256,
                approve,
                approver,
                reason,
            } => match self
                .decide_here(&approval, &sha256, approve, &approver, &reason)
                .await
            {
                Ok(r) => CommandAnswer::Done {
                    repeated: r.repeated,
                },
                Err(e) => failed(RemoteError::of_approval(e)),
            },
            NodeCommand::RaiseBudget { budget } => {
                match self.raise_budget_here(job, budget).await {
                    Ok(_) => CommandAnswer::Done { repeated: false },
                    Err(RaiseBudgetError::Ended(_, state)) => {
                        failed(RemoteError::JobEnded { state })
                    }
                    Err(RaiseBudgetError::Invalid(m)) => {
                        failed(RemoteError::Invalid { message: m })
                    }
                    Err(e) => failed(RemoteError::Unavailable {
                        message: e.to_string(),
                    }),
                }
            }
        }
    }

    /// Send `command` for job `id` to the node that holds it, if another one does.
    pub(super) async fn forward_command(
        &self,
        id: JobId,
        command: &NodeCommand,
    ) -> Result<Forwarded, StoreError> {
        // Twice at most: a node that no longer holds the job says so, and the job may have
        // moved to a third one meanwhile.
        for _ in 0..2 {
            let Some(node) = self.shared.store.remote_holder(id)? else {
                return Ok(Forwarded::Here);
            };
            let text = serde_json::to_string(command)
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
            let answer = self.shared.store.forward(&node, id, text).await?;
            let answer: CommandAnswer = serde_json::from_str(&answer).map_err(|e| {
                StoreError::Unavailable(format!(
                    "node {node} answered what this node cannot read: {e}"
                ))
            })?;
            match answer {
                CommandAnswer::Done { repeated } => return Ok(Forwarded::Done { repeated }),
                CommandAnswer::NotHeld => continue,
                CommandAnswer::Expired => {
                    return Err(StoreError::Unavailable(format!(
                        "node {node}, which holds job {id}, answered too late; read the job again before asking again"
                    )));
                }
                CommandAnswer::Failed { error } => return Ok(Forwarded::Failed(error)),
            }
        }
        Ok(Forwarded::Here)
    }
}

impl Forwarded {
    /// A failure of a cancel or a budget raise, as a store error.
    pub(super) fn store_error(error: RemoteError) -> StoreError {
        StoreError::Unavailable(error.message())
    }

    pub(super) fn approval_error(error: RemoteError, id: &str, job: JobId) -> ApprovalError {
        error.into_approval(id, job)
    }
}
