//! Errors of the jobs layer.

use crate::engine::error::EngineError;
use crate::jobs::StopReason;

/// Why a job did not complete.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The job was stopped.
    #[error("job stopped: {0:?}")]
    Stopped(StopReason),
    /// The queue is full.
    #[error("the queue is full ({0} jobs queued or running); retry later")]
    QueueFull(usize),
    /// The server is not accepting work.
    #[error("the server is shutting down")]
    ShuttingDown,
    /// Another job in flight has this client job id.
    #[error("client_job_id {0:?} is already in use by a job in flight")]
    DuplicateClientJobId(String),
    /// The engine failed.
    #[error(transparent)]
    Engine(#[from] EngineError),
}

impl JobError {
    /// A stable snake_case name for metrics labels and ErrorInfo reasons.
    pub fn error_type(&self) -> &'static str {
        match self {
            JobError::Stopped(StopReason::Cancelled) => "cancelled",
            JobError::Stopped(StopReason::DeadlineExceeded) => "deadline_exceeded",
            JobError::Stopped(StopReason::ClientGone) => "client_gone",
            JobError::Stopped(StopReason::ShuttingDown) => "shutting_down",
            JobError::QueueFull(_) => "queue_full",
            JobError::ShuttingDown => "shutting_down",
            JobError::DuplicateClientJobId(_) => "duplicate_client_job_id",
            JobError::Engine(e) => e.error_type(),
        }
    }
}
