//! The activity SDK: [`ActivityContext`], what an activity function sees of its attempt.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use baton_transport::Payload;
use serde::{Serialize, de::DeserializeOwned};

/// Which attempt of which activity is running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ActivityInfo {
    /// The workflow ID.
    pub workflow_id: String,
    /// The run ID.
    pub run_id: String,
    /// The activity name.
    pub activity: String,
    /// The activity's sequence number in the run.
    pub seq: u32,
    /// The attempt, from 1.
    pub attempt: u32,
}

type HeartbeatSink = Arc<dyn Fn(Option<Payload>) + Send + Sync>;

/// Passed to every activity function.
#[derive(Clone)]
pub struct ActivityContext {
    info: ActivityInfo,
    heartbeat: HeartbeatSink,
    details: Option<Payload>,
    cancelled: Arc<AtomicBool>,
}

impl ActivityContext {
    /// A context whose heartbeats go to `sink` (the runner's pool, or a test probe).
    pub fn new(info: ActivityInfo, sink: impl Fn(Option<Payload>) + Send + Sync + 'static) -> Self {
        ActivityContext {
            info,
            heartbeat: Arc::new(sink),
            details: None,
            cancelled: Arc::default(),
        }
    }

    /// The same context, whose cancellation is read from `flag` (set by the worker when the
    /// workflow asks the activity to stop).
    pub fn with_cancel_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancelled = flag;
        self
    }

    /// Whether the workflow has asked this activity to stop (learnt at a heartbeat). A
    /// cooperative activity then returns [`crate::ActivityError::cancelled`].
    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Acquire)
    }

    /// The same context, resuming from `details`: the last heartbeat details an earlier
    /// attempt (or an earlier delivery of this one) recorded.
    pub fn with_details(mut self, details: Option<Payload>) -> Self {
        self.details = details;
        self
    }

    /// The last heartbeat details recorded for this activity by an earlier attempt or
    /// delivery, if any: where to resume from (a checkpoint reference, an epoch).
    pub fn heartbeat_details<T: DeserializeOwned>(&self) -> Option<T> {
        self.details.as_ref().and_then(|p| p.decode().ok())
    }

    /// The attempt's identity.
    pub fn info(&self) -> &ActivityInfo {
        &self.info
    }

    /// Tells the worker the activity is alive. Activities with a heartbeat timeout must call
    /// this more often than the timeout, or their attempt is killed and reported failed.
    pub fn heartbeat(&self) {
        (self.heartbeat)(None)
    }

    /// A heartbeat carrying progress details (e.g. a checkpoint reference).
    pub fn heartbeat_with<T: Serialize>(&self, details: &T) {
        (self.heartbeat)(Payload::encode(details).ok())
    }
}
