//! The SDK's error types.

use baton_transport::wire::Failure;
use serde::{Deserialize, Serialize};

/// An error returned by an activity, or delivered to a workflow when an activity failed
/// for good.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct ActivityError {
    /// The error type, matched against the retry policy's non-retryable types.
    pub kind: String,
    /// A sentence for humans.
    pub message: String,
    /// Whether another attempt could succeed.
    pub retryable: bool,
}

impl ActivityError {
    /// A failure another attempt may cure (I/O, timeouts, overload).
    pub fn retryable(kind: impl Into<String>, message: impl Into<String>) -> Self {
        ActivityError {
            kind: kind.into(),
            message: message.into(),
            retryable: true,
        }
    }

    /// The failure kind of everything a cancellation resolves.
    pub const CANCELLED: &'static str = "Cancelled";

    /// Cancelled: the workflow's cancellation reached this activity, timer or child.
    pub fn cancelled(message: impl Into<String>) -> Self {
        ActivityError::non_retryable(Self::CANCELLED, message)
    }

    /// Whether this is a cancellation.
    pub fn is_cancelled(&self) -> bool {
        self.kind == Self::CANCELLED
    }

    /// A failure no retry can cure (bad input).
    pub fn non_retryable(kind: impl Into<String>, message: impl Into<String>) -> Self {
        ActivityError {
            kind: kind.into(),
            message: message.into(),
            retryable: false,
        }
    }
}

impl From<ActivityError> for Failure {
    fn from(e: ActivityError) -> Failure {
        Failure {
            kind: e.kind,
            message: e.message,
            retryable: e.retryable,
        }
    }
}

impl From<Failure> for ActivityError {
    fn from(f: Failure) -> ActivityError {
        ActivityError {
            kind: f.kind,
            message: f.message,
            retryable: f.retryable,
        }
    }
}

/// An error returned by a workflow: the run closes as failed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{kind}: {message}")]
pub struct WorkflowError {
    /// The error type.
    pub kind: String,
    /// A sentence for humans.
    pub message: String,
}

impl WorkflowError {
    /// Builds a workflow error.
    pub fn new(kind: impl Into<String>, message: impl Into<String>) -> Self {
        WorkflowError {
            kind: kind.into(),
            message: message.into(),
        }
    }
}

impl From<ActivityError> for WorkflowError {
    fn from(e: ActivityError) -> WorkflowError {
        WorkflowError {
            kind: e.kind,
            message: e.message,
        }
    }
}

impl From<WorkflowError> for Failure {
    fn from(e: WorkflowError) -> Failure {
        Failure {
            kind: e.kind,
            message: e.message,
            retryable: false,
        }
    }
}

/// The workflow code no longer matches its journal. The execution stays open (deploy the
/// right code and it resumes); it never silently diverges.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("non-determinism: {0}")]
pub struct Nondeterminism(pub String);
