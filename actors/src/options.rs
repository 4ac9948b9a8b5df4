//! Activity options and retry policies: declared per activity in the registry (the central
//! policy), overridable per call.

use std::time::Duration;

use baton_transport::wire::Failure;
use serde::{Deserialize, Serialize};

/// How an activity is retried.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RetryPolicy {
    /// Delay before the first retry, in milliseconds.
    pub initial_interval_ms: u64,
    /// Multiplier applied to the delay after each retry.
    pub backoff_coefficient: f64,
    /// Upper bound of the delay, in milliseconds (0: no bound).
    pub maximum_interval_ms: u64,
    /// Attempts in all, the first included (0: unlimited).
    pub maximum_attempts: u32,
    /// Failure kinds that are never retried.
    pub non_retryable_error_types: Vec<String>,
}

impl RetryPolicy {
    /// A policy with exponential backoff and no non-retryable types.
    pub fn exponential(initial: Duration, coefficient: f64, maximum_attempts: u32) -> Self {
        RetryPolicy {
            initial_interval_ms: initial.as_millis() as u64,
            backoff_coefficient: coefficient,
            maximum_interval_ms: initial.as_millis() as u64 * 100,
            maximum_attempts,
            non_retryable_error_types: Vec::new(),
        }
    }

    /// Adds failure kinds that are never retried.
    pub fn non_retryable(mut self, kinds: &[&str]) -> Self {
        self.non_retryable_error_types
            .extend(kinds.iter().map(|k| k.to_string()));
        self
    }

    /// The delay before the next attempt after `attempt` failed with `failure`, or `None`
    /// when the failure is final (not retryable, a non-retryable kind, or attempts used up).
    pub fn next_delay(&self, attempt: u32, failure: &Failure) -> Option<Duration> {
        if !failure.retryable || self.non_retryable_error_types.contains(&failure.kind) {
            return None;
        }
        if self.maximum_attempts != 0 && attempt >= self.maximum_attempts {
            return None;
        }
        let exp = self
            .backoff_coefficient
            .max(1.0)
            .powi(attempt.saturating_sub(1) as i32);
        let mut ms = self.initial_interval_ms as f64 * exp;
        if self.maximum_interval_ms > 0 {
            ms = ms.min(self.maximum_interval_ms as f64);
        }
        Some(Duration::from_millis(ms as u64))
    }
}

/// Where and how an activity runs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ActivityOptions {
    /// The task queue (`cpu`, `gpu`, or any named queue).
    pub task_queue: String,
    /// Longest one attempt may run, in milliseconds, from pick-up to report.
    pub start_to_close_ms: u64,
    /// Longest an attempt may go without a heartbeat, in milliseconds (None: no heartbeat
    /// required).
    pub heartbeat_timeout_ms: Option<u64>,
    /// The end-to-end deadline of the activity, all attempts and backoffs included, in
    /// milliseconds from its scheduling (None: bounded by the retry policy only). Enforced
    /// by the orchestrator with a durable timer: a task lost anywhere is failed at the
    /// deadline, never waited on forever.
    #[serde(default)]
    pub schedule_to_close_ms: Option<u64>,
    /// Longest an attempt may wait in its queue before a worker starts it, in milliseconds
    /// (detects "no worker polls this queue"). Enforced by the orchestrator; the attempt
    /// fails with `ScheduleToStartTimeout`, which is not retried.
    #[serde(default)]
    pub schedule_to_start_ms: Option<u64>,
    /// The retry policy.
    pub retry: RetryPolicy,
    /// What cancelling the workflow does to this activity.
    #[serde(default)]
    pub cancellation: CancellationType,
}

/// What a workflow's cancellation does to an activity or child workflow it is waiting on
/// (Temporal's three modes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancellationType {
    /// Ask the activity (through its heartbeat) or child to stop, and resolve the workflow's
    /// future as cancelled at once.
    #[default]
    TryCancel,
    /// Ask it to stop, and resolve the future when it reports how it ended.
    WaitCancellationCompleted,
    /// Resolve the future as cancelled at once and leave the activity or child running; its
    /// outcome is dropped.
    Abandon,
}

/// How a child workflow is started.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ChildOptions {
    /// The child's workflow ID (default: `<parent workflow ID>-child-<seq>`).
    #[serde(default)]
    pub workflow_id: Option<String>,
    /// Start a new run when one fails (default: one attempt).
    #[serde(default)]
    pub retry: Option<RetryPolicy>,
    /// Longest each run may take, in milliseconds; a run past it is closed as `TimedOut`.
    #[serde(default)]
    pub execution_timeout_ms: Option<u64>,
    /// What cancelling the parent does to the child.
    #[serde(default)]
    pub cancellation: CancellationType,
}

impl ChildOptions {
    /// Sets the child's workflow ID.
    pub fn workflow_id(mut self, id: impl Into<String>) -> Self {
        self.workflow_id = Some(id.into());
        self
    }

    /// Retries failed runs with `retry`.
    pub fn retry(mut self, retry: RetryPolicy) -> Self {
        self.retry = Some(retry);
        self
    }

    /// Closes a run that takes longer than `timeout` as `TimedOut`.
    pub fn execution_timeout(mut self, timeout: Duration) -> Self {
        self.execution_timeout_ms = Some(timeout.as_millis() as u64);
        self
    }

    /// Sets what cancelling the parent does to the child.
    pub fn cancellation(mut self, cancellation: CancellationType) -> Self {
        self.cancellation = cancellation;
        self
    }
}

impl ActivityOptions {
    /// Options for a queue with a start-to-close timeout and a retry policy.
    pub fn new(task_queue: &str, start_to_close: Duration, retry: RetryPolicy) -> Self {
        ActivityOptions {
            task_queue: task_queue.into(),
            start_to_close_ms: start_to_close.as_millis() as u64,
            heartbeat_timeout_ms: None,
            schedule_to_close_ms: None,
            schedule_to_start_ms: None,
            retry,
            cancellation: CancellationType::default(),
        }
    }

    /// Sets what cancelling the workflow does to this activity.
    pub fn cancellation(mut self, cancellation: CancellationType) -> Self {
        self.cancellation = cancellation;
        self
    }

    /// Sets the end-to-end deadline (schedule-to-close).
    pub fn schedule_to_close(mut self, timeout: Duration) -> Self {
        self.schedule_to_close_ms = Some(timeout.as_millis() as u64);
        self
    }

    /// Fails an attempt that no worker starts within `timeout` (schedule-to-start).
    pub fn schedule_to_start(mut self, timeout: Duration) -> Self {
        self.schedule_to_start_ms = Some(timeout.as_millis() as u64);
        self
    }

    /// Requires heartbeats at least this often.
    pub fn heartbeat_timeout(mut self, timeout: Duration) -> Self {
        self.heartbeat_timeout_ms = Some(timeout.as_millis() as u64);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fail(kind: &str, retryable: bool) -> Failure {
        Failure {
            kind: kind.into(),
            message: String::new(),
            retryable,
        }
    }

    #[test]
    fn backoff_grows_and_stops_at_the_maximum_attempts() {
        let p = RetryPolicy::exponential(Duration::from_secs(1), 2.0, 3);
        assert_eq!(
            p.next_delay(1, &fail("io", true)),
            Some(Duration::from_secs(1))
        );
        assert_eq!(
            p.next_delay(2, &fail("io", true)),
            Some(Duration::from_secs(2))
        );
        assert_eq!(p.next_delay(3, &fail("io", true)), None);
    }

    #[test]
    fn maximum_interval_caps_the_delay() {
        let mut p = RetryPolicy::exponential(Duration::from_secs(1), 10.0, 0);
        p.maximum_interval_ms = 5_000;
        assert_eq!(
            p.next_delay(4, &fail("io", true)),
            Some(Duration::from_secs(5))
        );
    }

    #[test]
    fn non_retryable_failures_are_final() {
        let p = RetryPolicy::exponential(Duration::from_secs(1), 2.0, 5)
            .non_retryable(&["ValidationError"]);
        assert_eq!(p.next_delay(1, &fail("ValidationError", true)), None);
        assert_eq!(p.next_delay(1, &fail("io", false)), None);
    }
}
