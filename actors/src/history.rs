//! The journal's events. Every execution's history is an append-only list of these,
//! numbered from 1; it is the single source of truth that replay rebuilds state from.

use baton_transport::{Payload, wire::Failure};
use serde::{Deserialize, Serialize};

use crate::options::{ActivityOptions, ChildOptions};

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
    /// A signal reached the run; the code waiting for it (or the next to wait) gets it.
    SignalReceived {
        /// The signal's name.
        name: String,
        /// Its payload.
        input: Payload,
        /// The sender's idempotency key: a second signal with the same key is not recorded
        /// (a workflow signalling another sets it, so a retried delivery counts once).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        request_id: Option<String>,
    },
    /// Cancellation of the run was requested. Timers and the activities and child workflows
    /// whose cancellation type is `try_cancel` or `abandon` resolve as cancelled at once;
    /// `wait_cancellation_completed` ones resolve when they report. The code decides what
    /// to do (clean up, compensate) and how the run closes.
    WorkflowCancelRequested {
        /// Why, from the requester.
        reason: String,
    },
    /// The workflow cancelled one of its timers before it fired.
    TimerCancelled {
        /// Sequence number of the timer.
        seq: u32,
    },
    /// The workflow took a patched code path (`ctx.patched(id)`): replays of this run take
    /// it too, runs recorded before the patch take the old one.
    MarkerRecorded {
        /// The patch ID.
        patch: String,
    },
    /// The workflow scheduled a child workflow.
    ChildWorkflowScheduled {
        /// Sequence number (shared with activities and timers).
        seq: u32,
        /// The child's workflow type.
        workflow_type: String,
        /// The child's workflow ID.
        workflow_id: String,
        /// The child's input.
        input: Payload,
        /// Retry, timeout and cancellation options.
        options: ChildOptions,
    },
    /// An attempt of a child workflow has its run.
    ChildWorkflowStarted {
        /// Sequence number of the child.
        seq: u32,
        /// The attempt, from 1.
        attempt: u32,
        /// The child's run ID.
        run_id: String,
    },
    /// The child workflow completed; its output is delivered to the parent.
    ChildWorkflowCompleted {
        /// Sequence number of the child.
        seq: u32,
        /// The child's run ID.
        run_id: String,
        /// The child's output.
        result: Payload,
    },
    /// A child workflow failed to start or closed without an output. With `retry_in_ms`
    /// another attempt starts after that delay; without, the failure reaches the parent.
    ChildWorkflowFailed {
        /// Sequence number of the child.
        seq: u32,
        /// The attempt that failed.
        attempt: u32,
        /// The run that failed (none when the start itself failed).
        run_id: Option<String>,
        /// Why.
        failure: Failure,
        /// Delay before the next attempt; `None` when the failure is final.
        retry_in_ms: Option<u64>,
    },
    /// The workflow asked to signal another workflow.
    ExternalSignalScheduled {
        /// Sequence number (shared with activities and timers).
        seq: u32,
        /// The target workflow ID.
        workflow_id: String,
        /// The signal's name.
        name: String,
        /// Its payload.
        input: Payload,
    },
    /// The signal was recorded by its target (no failure) or could not be (a failure such
    /// as `NotFound`).
    ExternalSignalResolved {
        /// Sequence number of the signal.
        seq: u32,
        /// Why it was not delivered.
        failure: Option<Failure>,
    },
    /// The workflow closed this run and started a new run of the same workflow ID with a
    /// fresh history; signals it had not consumed are carried to the new run.
    WorkflowContinuedAsNew {
        /// The new run.
        new_run_id: String,
        /// The new run's input.
        input: Payload,
    },
    /// The run was closed from outside its code: terminated, or past its execution timeout.
    WorkflowTerminated {
        /// `Terminated` or `TimedOut`.
        kind: String,
        /// Why.
        reason: String,
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
            EventKind::SignalReceived { .. } => "signal_received",
            EventKind::WorkflowCancelRequested { .. } => "workflow_cancel_requested",
            EventKind::TimerCancelled { .. } => "timer_cancelled",
            EventKind::MarkerRecorded { .. } => "marker_recorded",
            EventKind::ChildWorkflowScheduled { .. } => "child_workflow_scheduled",
            EventKind::ChildWorkflowStarted { .. } => "child_workflow_started",
            EventKind::ChildWorkflowCompleted { .. } => "child_workflow_completed",
            EventKind::ChildWorkflowFailed { .. } => "child_workflow_failed",
            EventKind::ExternalSignalScheduled { .. } => "external_signal_scheduled",
            EventKind::ExternalSignalResolved { .. } => "external_signal_resolved",
            EventKind::WorkflowContinuedAsNew { .. } => "workflow_continued_as_new",
            EventKind::WorkflowTerminated { .. } => "workflow_terminated",
            EventKind::WorkflowCompleted { .. } => "workflow_completed",
            EventKind::WorkflowFailed { .. } => "workflow_failed",
        }
    }

    /// Whether this event closes the run.
    pub fn is_close(&self) -> bool {
        matches!(
            self,
            EventKind::WorkflowCompleted { .. }
                | EventKind::WorkflowFailed { .. }
                | EventKind::WorkflowContinuedAsNew { .. }
                | EventKind::WorkflowTerminated { .. }
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
            EventKind::SignalReceived {
                name,
                input,
                request_id,
            } => {
                json!({"name": name, "input": input.to_json(), "request_id": request_id})
            }
            EventKind::WorkflowCancelRequested { reason } => json!({"reason": reason}),
            EventKind::TimerCancelled { seq } => json!({"seq": seq}),
            EventKind::MarkerRecorded { patch } => json!({"patch": patch}),
            EventKind::ChildWorkflowScheduled {
                seq,
                workflow_type,
                workflow_id,
                input,
                options,
            } => json!({
                "seq": seq, "workflow_type": workflow_type, "workflow_id": workflow_id,
                "input": input.to_json(), "options": options,
            }),
            EventKind::ChildWorkflowStarted {
                seq,
                attempt,
                run_id,
            } => json!({"seq": seq, "attempt": attempt, "run_id": run_id}),
            EventKind::ChildWorkflowCompleted {
                seq,
                run_id,
                result,
            } => json!({"seq": seq, "run_id": run_id, "result": result.to_json()}),
            EventKind::ChildWorkflowFailed {
                seq,
                attempt,
                run_id,
                failure,
                retry_in_ms,
            } => json!({
                "seq": seq, "attempt": attempt, "run_id": run_id, "failure": failure,
                "retry_in_ms": retry_in_ms,
            }),
            EventKind::ExternalSignalScheduled {
                seq,
                workflow_id,
                name,
                input,
            } => json!({
                "seq": seq, "workflow_id": workflow_id, "name": name, "input": input.to_json(),
            }),
            EventKind::ExternalSignalResolved { seq, failure } => {
                json!({"seq": seq, "failure": failure})
            }
            EventKind::WorkflowContinuedAsNew { new_run_id, input } => {
                json!({"new_run_id": new_run_id, "input": input.to_json()})
            }
            EventKind::WorkflowTerminated { kind, reason } => {
                json!({"kind": kind, "reason": reason})
            }
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

impl Event {
    /// Reads an event back from its JSON form ([`Event::to_json`], what `baton history
    /// --json` and `baton.api.history` show), for replaying recorded histories. Payloads are
    /// re-encoded from their JSON; activity options keep what the JSON shows (queue,
    /// timeouts, maximum attempts).
    pub fn from_json(v: &serde_json::Value) -> Result<Event, String> {
        use crate::options::{ActivityOptions, RetryPolicy};
        let u64_of = |k: &str| {
            v[k].as_u64()
                .ok_or_else(|| format!("event field {k:?} missing or not a number: {v}"))
        };
        let u32_of = |k: &str| u64_of(k).map(|n| n as u32);
        let str_of = |k: &str| {
            v[k].as_str()
                .map(str::to_string)
                .ok_or_else(|| format!("event field {k:?} missing: {v}"))
        };
        let payload = |k: &str| Payload::encode(&v[k]).map_err(|e| e.to_string());
        let failure = || -> Result<Failure, String> {
            serde_json::from_value(v["failure"].clone()).map_err(|e| format!("failure: {e}"))
        };
        let kind = match v["type"].as_str().unwrap_or_default() {
            "workflow_started" => EventKind::WorkflowStarted {
                workflow_type: str_of("workflow_type")?,
                workflow_id: str_of("workflow_id")?,
                input: payload("input")?,
            },
            "activity_scheduled" => {
                let mut options = ActivityOptions::new(
                    &str_of("queue")?,
                    std::time::Duration::from_millis(u64_of("start_to_close_ms")?),
                    RetryPolicy::exponential(
                        std::time::Duration::from_secs(1),
                        2.0,
                        v["maximum_attempts"].as_u64().unwrap_or(0) as u32,
                    ),
                );
                options.heartbeat_timeout_ms = v["heartbeat_timeout_ms"].as_u64();
                EventKind::ActivityScheduled {
                    seq: u32_of("seq")?,
                    activity: str_of("activity")?,
                    input: payload("input")?,
                    options,
                }
            }
            "activity_completed" => EventKind::ActivityCompleted {
                seq: u32_of("seq")?,
                attempt: u32_of("attempt")?,
                worker: str_of("worker")?,
                result: payload("result")?,
            },
            "activity_failed" => EventKind::ActivityFailed {
                seq: u32_of("seq")?,
                attempt: u32_of("attempt")?,
                worker: str_of("worker")?,
                failure: failure()?,
                retry_in_ms: v["retry_in_ms"].as_u64(),
            },
            "timer_started" => EventKind::TimerStarted {
                seq: u32_of("seq")?,
                fire_at_ms: u64_of("fire_at_ms")?,
            },
            "timer_fired" => EventKind::TimerFired {
                seq: u32_of("seq")?,
            },
            "signal_received" => EventKind::SignalReceived {
                name: str_of("name")?,
                input: payload("input")?,
                request_id: v["request_id"].as_str().map(str::to_string),
            },
            "workflow_cancel_requested" => EventKind::WorkflowCancelRequested {
                reason: str_of("reason")?,
            },
            "timer_cancelled" => EventKind::TimerCancelled {
                seq: u32_of("seq")?,
            },
            "marker_recorded" => EventKind::MarkerRecorded {
                patch: str_of("patch")?,
            },
            "child_workflow_scheduled" => EventKind::ChildWorkflowScheduled {
                seq: u32_of("seq")?,
                workflow_type: str_of("workflow_type")?,
                workflow_id: str_of("workflow_id")?,
                input: payload("input")?,
                options: serde_json::from_value(v["options"].clone())
                    .map_err(|e| format!("child options: {e}"))?,
            },
            "child_workflow_started" => EventKind::ChildWorkflowStarted {
                seq: u32_of("seq")?,
                attempt: u32_of("attempt")?,
                run_id: str_of("run_id")?,
            },
            "child_workflow_completed" => EventKind::ChildWorkflowCompleted {
                seq: u32_of("seq")?,
                run_id: str_of("run_id")?,
                result: payload("result")?,
            },
            "child_workflow_failed" => EventKind::ChildWorkflowFailed {
                seq: u32_of("seq")?,
                attempt: u32_of("attempt")?,
                run_id: v["run_id"].as_str().map(str::to_string),
                failure: failure()?,
                retry_in_ms: v["retry_in_ms"].as_u64(),
            },
            "external_signal_scheduled" => EventKind::ExternalSignalScheduled {
                seq: u32_of("seq")?,
                workflow_id: str_of("workflow_id")?,
                name: str_of("name")?,
                input: payload("input")?,
            },
            "external_signal_resolved" => EventKind::ExternalSignalResolved {
                seq: u32_of("seq")?,
                failure: if v["failure"].is_null() {
                    None
                } else {
                    Some(failure()?)
                },
            },
            "workflow_continued_as_new" => EventKind::WorkflowContinuedAsNew {
                new_run_id: str_of("new_run_id")?,
                input: payload("input")?,
            },
            "workflow_terminated" => EventKind::WorkflowTerminated {
                kind: str_of("kind")?,
                reason: str_of("reason")?,
            },
            "workflow_completed" => EventKind::WorkflowCompleted {
                output: payload("output")?,
            },
            "workflow_failed" => EventKind::WorkflowFailed {
                failure: failure()?,
            },
            other => return Err(format!("unknown event type {other:?}")),
        };
        Ok(Event {
            id: u32_of("event_id")?,
            at_ms: u64_of("at_ms")?,
            kind,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::options::{ActivityOptions, RetryPolicy};
    use std::time::Duration;

    #[test]
    fn events_round_trip_through_json() {
        let opts = ActivityOptions::new(
            "gpu",
            Duration::from_secs(120),
            RetryPolicy::exponential(Duration::from_secs(1), 2.0, 2),
        )
        .heartbeat_timeout(Duration::from_secs(30));
        let f = Failure {
            kind: "Boom".into(),
            message: "m".into(),
            retryable: true,
        };
        let kinds = vec![
            EventKind::WorkflowStarted {
                workflow_type: "t".into(),
                workflow_id: "w".into(),
                input: Payload::encode(&serde_json::json!({"text": "hi"})).unwrap(),
            },
            EventKind::ActivityScheduled {
                seq: 0,
                activity: "a".into(),
                input: Payload::encode("hi").unwrap(),
                options: opts,
            },
            EventKind::ActivityFailed {
                seq: 0,
                attempt: 1,
                worker: "w1".into(),
                failure: f.clone(),
                retry_in_ms: Some(2000),
            },
            EventKind::ActivityCompleted {
                seq: 0,
                attempt: 2,
                worker: "w1".into(),
                result: Payload::encode(&vec![0.5f64, 0.25]).unwrap(),
            },
            EventKind::TimerStarted {
                seq: 1,
                fire_at_ms: 99,
            },
            EventKind::TimerFired { seq: 1 },
            EventKind::SignalReceived {
                name: "go".into(),
                input: Payload::encode(&3).unwrap(),
                request_id: Some("r:1".into()),
            },
            EventKind::WorkflowCancelRequested {
                reason: "user".into(),
            },
            EventKind::TimerCancelled { seq: 1 },
            EventKind::MarkerRecorded { patch: "v2".into() },
            EventKind::ChildWorkflowScheduled {
                seq: 2,
                workflow_type: "child".into(),
                workflow_id: "w-child".into(),
                input: Payload::encode(&1).unwrap(),
                options: ChildOptions::default(),
            },
            EventKind::ChildWorkflowStarted {
                seq: 2,
                attempt: 1,
                run_id: "r2".into(),
            },
            EventKind::ChildWorkflowFailed {
                seq: 2,
                attempt: 1,
                run_id: Some("r2".into()),
                failure: f.clone(),
                retry_in_ms: Some(5),
            },
            EventKind::ChildWorkflowCompleted {
                seq: 2,
                run_id: "r3".into(),
                result: Payload::encode(&2).unwrap(),
            },
            EventKind::ExternalSignalScheduled {
                seq: 3,
                workflow_id: "other".into(),
                name: "go".into(),
                input: Payload::encode(&1).unwrap(),
            },
            EventKind::ExternalSignalResolved {
                seq: 3,
                failure: Some(f.clone()),
            },
            EventKind::ExternalSignalResolved {
                seq: 3,
                failure: None,
            },
            EventKind::WorkflowTerminated {
                kind: "TimedOut".into(),
                reason: "r".into(),
            },
            EventKind::WorkflowContinuedAsNew {
                new_run_id: "r9".into(),
                input: Payload::encode(&9).unwrap(),
            },
            EventKind::WorkflowFailed { failure: f },
        ];
        for (i, kind) in kinds.into_iter().enumerate() {
            let e = Event {
                id: i as u32 + 1,
                at_ms: 10 + i as u64,
                kind,
            };
            let back = Event::from_json(&e.to_json()).unwrap();
            assert_eq!(back.to_json(), e.to_json());
            assert_eq!(back.kind.name(), e.kind.name());
        }
        assert!(
            Event::from_json(&serde_json::json!({"type": "nope", "event_id": 1, "at_ms": 1}))
                .is_err()
        );
    }
}
