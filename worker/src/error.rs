//! The worker's error type and its one mapping to gRPC statuses.

use tonic::{Code, Status};

/// Everything that can go wrong in a worker, by what the caller should do about it.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// The request is malformed: bad shape, dtype, positions, duplicated ids. Fix the request.
    #[error("{0}")]
    InvalidArgument(String),
    /// The request names a sequence this worker does not hold.
    #[error("{0}")]
    NotFound(String),
    /// The worker is not in a state to do this: no stage loaded, another model.
    #[error("{0}")]
    FailedPrecondition(String),
    /// The micro-batch names a prefix source (`copy_prefix_from`) the worker no longer holds; nothing
    /// changed, and the same step without it would run.
    #[error("{0}")]
    Aborted(String),
    /// Too many sequences or cached positions.
    #[error("{0}")]
    ResourceExhausted(String),
    /// Bytes in the worker's weight cache do not match their digest (the entry is dropped, so the
    /// coordinator can send it again).
    #[error("{0}")]
    DataLoss(String),
    /// The model file could not be read.
    #[error(transparent)]
    Model(#[from] strata_model::ModelError),
    /// A tensor operation failed. Not the caller's fault.
    #[error("tensor operation failed: {0}")]
    Candle(#[from] candle_core::Error),
    /// The compute thread is gone (it panicked or the worker is shutting down).
    #[error("the worker's compute thread is not running")]
    ComputeThreadGone,
    /// A bug: an invariant did not hold.
    #[error("internal error: {0}")]
    Internal(String),
}

impl WorkerError {
    pub(crate) fn invalid(message: impl Into<String>) -> Self {
        Self::InvalidArgument(message.into())
    }
}

impl From<WorkerError> for Status {
    fn from(e: WorkerError) -> Self {
        let code = match &e {
            WorkerError::InvalidArgument(_) => Code::InvalidArgument,
            WorkerError::NotFound(_) => Code::NotFound,
            WorkerError::FailedPrecondition(_) | WorkerError::Model(_) => Code::FailedPrecondition,
            WorkerError::ResourceExhausted(_) => Code::ResourceExhausted,
            WorkerError::Aborted(_) => Code::Aborted,
            WorkerError::DataLoss(_) => Code::DataLoss,
            WorkerError::ComputeThreadGone => Code::Unavailable,
            WorkerError::Candle(_) | WorkerError::Internal(_) => Code::Internal,
        };
        Status::new(code, e.to_string())
    }
}
