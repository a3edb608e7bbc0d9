//! The coordinator's error type and its one mapping to gRPC statuses.

use tonic::{Code, Status};

use crate::events::{Failure, FailureKind};
use crate::plan::PlanError;

/// What can go wrong in the coordinator.
#[derive(Debug, thiserror::Error)]
pub enum CoordinatorError {
    /// A worker could not be reached at start.
    #[error("worker {address} is unreachable: {reason}")]
    WorkerUnreachable { address: String, reason: String },
    /// A call to a stage's worker failed.
    #[error("stage {stage} (worker {address}) failed: {message}")]
    Stage {
        stage: usize,
        address: String,
        code: Code,
        message: String,
    },
    /// A worker holds another model than the coordinator.
    #[error("worker {address} holds model {theirs} but the coordinator has {ours} ({path}); start every worker with the same model file")]
    ModelMismatch {
        address: String,
        theirs: String,
        ours: String,
        path: String,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Model(#[from] strata_model::ModelError),
    /// TLS or token setup is wrong.
    #[error(transparent)]
    Transport(#[from] strata_transport::TransportError),
    /// The client's request is not valid.
    #[error("{0}")]
    InvalidRequest(String),
    /// Too much work queued.
    #[error("{0}")]
    Overloaded(String),
    /// A worker answered something that breaks the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// A stage is down and no request can run until it is back.
    #[error("{0}")]
    Unavailable(String),
    /// The coordinator is stopping.
    #[error("the coordinator is shutting down")]
    ShuttingDown,
    /// A bug: a task of the coordinator failed.
    #[error("internal error: {0}")]
    Internal(String),
}

/// Why a stage refused a whole step (see [`CoordinatorError::refusal`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its limits (RESOURCE_EXHAUSTED): no room for the step's positions or sequences.
    NoRoom,
    /// A prefix source the step was to copy from is gone (ABORTED): the worker evicted it while
    /// the step was on its way.
    PrefixGone,
}

impl CoordinatorError {
    pub(crate) fn stage(stage: usize, address: &str, status: Status) -> Self {
        Self::Stage {
            stage,
            address: address.to_string(),
            code: status.code(),
            message: status.message().to_string(),
        }
    }

    /// Whether the failure means a worker is gone (as opposed to a request it refused): it cannot
    /// be reached, it broke off, it hung, or it answers but has lost its stage (it was restarted).
    pub fn is_worker_loss(&self) -> bool {
        matches!(
            self,
            Self::Stage {
                code: Code::Unavailable
                    | Code::Unknown
                    | Code::Cancelled
                    | Code::DeadlineExceeded
                    | Code::FailedPrecondition,
                ..
            }
        )
    }

    /// Why a stage refused a step before changing anything (a worker checks a whole step first),
    /// and which stage it was; `None` for any other failure.
    pub fn refusal(&self) -> Option<(Refusal, usize)> {
        match self {
            Self::Stage {
                stage,
                code: Code::ResourceExhausted,
                ..
            } => Some((Refusal::NoRoom, *stage)),
            Self::Stage {
                stage,
                code: Code::Aborted,
                ..
            } => Some((Refusal::PrefixGone, *stage)),
            _ => None,
        }
    }

    /// The stage a failure happened at.
    pub fn stage_index(&self) -> Option<usize> {
        match self {
            Self::Stage { stage, .. } => Some(*stage),
            _ => None,
        }
    }
}

impl CoordinatorError {
    /// What kind of failure this is for a client: the one mapping both APIs' codes come from.
    pub fn kind(&self) -> FailureKind {
        match self {
            Self::InvalidRequest(_) => FailureKind::InvalidRequest,
            Self::Overloaded(_) => FailureKind::Overloaded,
            Self::WorkerUnreachable { .. } | Self::Unavailable(_) | Self::ShuttingDown => {
                FailureKind::Unavailable
            }
            e @ Self::Stage { code, .. } => {
                if e.is_worker_loss() {
                    FailureKind::Unavailable
                } else if *code == Code::ResourceExhausted {
                    FailureKind::Overloaded
                } else {
                    FailureKind::Internal
                }
            }
            Self::ModelMismatch { .. } | Self::Plan(_) | Self::Model(_) | Self::Transport(_) => {
                FailureKind::FailedPrecondition
            }
            Self::Protocol(_) | Self::Internal(_) => FailureKind::Internal,
        }
    }

    /// A stage found lost (by the health checks) while a step was out on it.
    pub(crate) fn stage_lost(stage: usize, address: String, reason: &str) -> Self {
        Self::Stage {
            stage,
            address,
            code: Code::Unavailable,
            message: format!("lost while the step was out: {reason}"),
        }
    }
}

impl From<CoordinatorError> for Failure {
    fn from(e: CoordinatorError) -> Self {
        Failure::new(e.kind(), e.to_string())
    }
}

/// The gRPC code of a kind of failure.
pub fn grpc_code(kind: FailureKind) -> Code {
    match kind {
        FailureKind::InvalidRequest => Code::InvalidArgument,
        FailureKind::Overloaded => Code::ResourceExhausted,
        FailureKind::Unavailable => Code::Unavailable,
        FailureKind::DeadlineExceeded => Code::DeadlineExceeded,
        FailureKind::FailedPrecondition => Code::FailedPrecondition,
        FailureKind::Internal => Code::Internal,
    }
}

impl From<Failure> for Status {
    fn from(f: Failure) -> Self {
        Status::new(grpc_code(f.kind), f.message)
    }
}

impl From<CoordinatorError> for Status {
    fn from(e: CoordinatorError) -> Self {
        Failure::from(e).into()
    }
}

#[cfg(test)]
mod tests {
    use tonic::{Code, Status};

    use super::CoordinatorError;

    #[test]
    fn each_error_reaches_a_client_as_the_code_it_can_act_on() {
        let stage = |code| CoordinatorError::Stage {
            stage: 1,
            address: "w:1".into(),
            code,
            message: "m".into(),
        };
        for (error, code) in [
            (
                CoordinatorError::InvalidRequest("x".into()),
                Code::InvalidArgument,
            ),
            (
                CoordinatorError::Overloaded("x".into()),
                Code::ResourceExhausted,
            ),
            (CoordinatorError::Unavailable("x".into()), Code::Unavailable),
            (CoordinatorError::ShuttingDown, Code::Unavailable),
            // A worker gone is a retryable outage; a worker out of room is the client's to retry
            // later; anything else a worker says is our bug.
            (stage(Code::Unavailable), Code::Unavailable),
            (stage(Code::DeadlineExceeded), Code::Unavailable),
            (stage(Code::ResourceExhausted), Code::ResourceExhausted),
            (stage(Code::InvalidArgument), Code::Internal),
            (
                CoordinatorError::stage_lost(0, "w:0".into(), "gone"),
                Code::Unavailable,
            ),
            (CoordinatorError::Protocol("x".into()), Code::Internal),
        ] {
            let message = error.to_string();
            let status = Status::from(error);
            assert_eq!(status.code(), code, "{message}");
            assert_eq!(status.message(), message);
        }
    }
}
