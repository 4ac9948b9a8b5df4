//! The activity SDK: [`ActivityContext`], what an activity function sees of its attempt.

use std::sync::Arc;

use baton_transport::Payload;
use serde::Serialize;

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
}

impl ActivityContext {
    /// A context whose heartbeats go to `sink` (the runner's pool, or a test probe).
    pub fn new(info: ActivityInfo, sink: impl Fn(Option<Payload>) + Send + Sync + 'static) -> Self {
        ActivityContext {
            info,
            heartbeat: Arc::new(sink),
        }
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
