//! Baton's durable-execution runtime.
//!
//! # Layout
//! - SDK: [`WorkflowContext`] and [`ActivityDef`] (context.rs), [`ActivityContext`]
//!   (activity.rs), [`ActivityOptions`] and [`RetryPolicy`] (options.rs), the errors
//!   (error.rs), the [`Registry`] (registry.rs).
//! - [`history`]: the journal's events.
//! - [`replay`]: the deterministic replay core ([`Execution`]), pure and I/O-free.
//! - [`journal`]: redb + JetStream, group commit, workflow-ID compare-and-set.
//! - [`storage`]: the journal's file backend, with injectable faults (disk full, failing
//!   calls, power loss with torn writes) for the chaos tests.
//! - execution.rs: one ractor actor per execution under a supervisor.
//! - [`node`]: the orchestrator node: start and API handlers, the report feed, recovery.
//! - [`worker`]: worker pools (ractor) supervising one runner actor per running activity.
//! - [`batching`]: dynamic batching of concurrent activity attempts inside a worker (one
//!   model forward pass for many workflows' activities).

/// Emits a per-stage timing event: target `baton::stage`, level TRACE, the stage's name as
/// its message and the run, step and attempt it concerns as fields. Off unless a
/// subscriber enables it (`RUST_LOG=warn,baton::stage=trace`), when it costs a level check;
/// `baton-loadgen --stages` turns it on in the `baton dev` it spawns and reads the events
/// back to say where each step's time goes.
macro_rules! stage {
    ($name:literal, $($field:tt)+) => {
        tracing::trace!(target: "baton::stage", $($field)+, $name)
    };
}

mod activity;
pub mod batching;
mod context;
mod error;
mod execution;
pub mod history;
pub mod journal;
pub mod node;
mod options;
mod registry;
pub mod replay;
pub mod storage;
pub mod worker;

pub use activity::{ActivityContext, ActivityInfo};
pub use context::{
    ActivityDef, ActivityFuture, CancelledFuture, Command, ResultFuture, TimerFuture, TimerId,
    WorkflowContext,
};
pub use error::{ActivityError, Nondeterminism, WorkflowError};
pub use options::{ActivityOptions, CancellationType, ChildOptions, RetryPolicy};
pub use registry::{ActivityFn, Policies, Registry, WorkflowDef, WorkflowFn};
pub use replay::Execution;

/// Milliseconds since the Unix epoch.
pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}
