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
    /// A signal reached the run; the code waiting for it (or the next to wait) gets it.
    SignalReceived {
        /// The signal's name.
        name: String,
        /// Its payload.
        input: Payload,
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
            EventKind::SignalReceived { name, input } => {
                json!({"name": name, "input": input.to_json()})
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
        }
        assert!(
            Event::from_json(&serde_json::json!({"type": "nope", "event_id": 1, "at_ms": 1}))
                .is_err()
        );
    }
}
