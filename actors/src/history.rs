//! The journal's events. Every execution's history is an append-only list of these,
//! numbered from 1; it is the single source of truth that replay rebuilds state from.

use baton_transport::{Payload, wire::Failure};
use serde::{Deserialize, Serialize};

use crate::options::ActivityOptions;

/// One journal entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Position in the run's history, from 1.
    pub id: u32,
    /// When it was recorded, Unix milliseconds.
    pub at_ms: u64,
    /// What happened.
    pub kind: EventKind,
}

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// The run was created (always event 1).
    WorkflowStarted {
        /// The workflow type.
        workflow_type: String,
        /// The workflow ID.
        workflow_id: String,
        /// The input.
        input: Payload,
    },
    /// The workflow scheduled an activity (its first attempt is dispatched after this is
    /// durable).
    ActivityScheduled {
        /// The activity's sequence number in the run, from 0, in the order the workflow
        /// code scheduled them.
        seq: u32,
        /// The activity name.
        activity: String,
        /// The input.
        input: Payload,
        /// The options in force (queue, timeouts, retry policy).
        options: ActivityOptions,
    },
    /// An attempt completed; its result is delivered to the workflow.
    ActivityCompleted {
        /// The activity's sequence number.
        seq: u32,
        /// The attempt that completed.
        attempt: u32,
        /// The worker that ran it.
        worker: String,
        /// The result.
        result: Payload,
    },
    /// An attempt failed. With `retry_in_ms` the next attempt is dispatched that long after
    /// this event; without, the failure is final and delivered to the workflow.
    ActivityFailed {
        /// The activity's sequence number.
        seq: u32,
        /// The attempt that failed.
        attempt: u32,
        /// The worker that reported it.
        worker: String,
        /// Why.
        failure: Failure,
        /// Delay before the next attempt; `None` when the failure is final.
        retry_in_ms: Option<u64>,
    },
    /// The workflow started a durable timer.
    TimerStarted {
        /// Sequence number (shared with activities).
        seq: u32,
        /// When it fires, Unix milliseconds.
        fire_at_ms: u64,
    },
    /// A durable timer fired; the workflow's sleep returns.
    TimerFired {
        /// Sequence number of the timer.
        seq: u32,
    },
    /// The workflow returned a value; the run is closed.
    WorkflowCompleted {
        /// The output.
        output: Payload,
    },
    /// The workflow returned an error; the run is closed.
    WorkflowFailed {
        /// The failure.
        failure: Failure,
    },
}

impl EventKind {
    /// The event's type name, as shown in histories.
    pub fn name(&self) -> &'static str {
        match self {
            EventKind::WorkflowStarted { .. } => "workflow_started",
            EventKind::ActivityScheduled { .. } => "activity_scheduled",
            EventKind::ActivityCompleted { .. } => "activity_completed",
            EventKind::ActivityFailed { .. } => "activity_failed",
            EventKind::TimerStarted { .. } => "timer_started",
            EventKind::TimerFired { .. } => "timer_fired",
            EventKind::WorkflowCompleted { .. } => "workflow_completed",
            EventKind::WorkflowFailed { .. } => "workflow_failed",
        }
    }

    /// Whether this event closes the run.
    pub fn is_close(&self) -> bool {
        matches!(
            self,
            EventKind::WorkflowCompleted { .. } | EventKind::WorkflowFailed { .. }
        )
    }
}

impl Event {
    /// The event as JSON, payloads decoded (for `baton history` and the API).
    pub fn to_json(&self) -> serde_json::Value {
        use serde_json::json;
        let mut v = match &self.kind {
            EventKind::WorkflowStarted {
                workflow_type,
                workflow_id,
                input,
            } => {
                json!({"workflow_type": workflow_type, "workflow_id": workflow_id, "input": input.to_json()})
            }
            EventKind::ActivityScheduled {
                seq,
                activity,
                input,
                options,
            } => json!({
                "seq": seq, "activity": activity, "queue": options.task_queue, "input": input.to_json(),
                "start_to_close_ms": options.start_to_close_ms,
                "heartbeat_timeout_ms": options.heartbeat_timeout_ms,
                "maximum_attempts": options.retry.maximum_attempts,
            }),
            EventKind::ActivityCompleted {
                seq,
                attempt,
                worker,
                result,
            } => {
                json!({"seq": seq, "attempt": attempt, "worker": worker, "result": result.to_json()})
            }
            EventKind::ActivityFailed {
                seq,
                attempt,
                worker,
                failure,
                retry_in_ms,
            } => json!({
                "seq": seq, "attempt": attempt, "worker": worker, "failure": failure, "retry_in_ms": retry_in_ms,
            }),
            EventKind::TimerStarted { seq, fire_at_ms } => {
                json!({"seq": seq, "fire_at_ms": fire_at_ms})
            }
            EventKind::TimerFired { seq } => json!({"seq": seq}),
            EventKind::WorkflowCompleted { output } => json!({"output": output.to_json()}),
            EventKind::WorkflowFailed { failure } => json!({"failure": failure}),
        };
        let obj = v.as_object_mut().expect("event json is an object");
        obj.insert("event_id".into(), json!(self.id));
        obj.insert("at_ms".into(), json!(self.at_ms));
        obj.insert("type".into(), json!(self.kind.name()));
        v
    }
}
