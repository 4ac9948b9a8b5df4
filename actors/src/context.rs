//! The workflow SDK: [`WorkflowContext`], through which a deterministic workflow function
//! schedules activities.
//!
//! A workflow must not do I/O, read the clock or draw random numbers except through the
//! context: it is run again, from the start, against its journal whenever its execution is
//! rebuilt, and must issue the same commands in the same order.

use std::{
    collections::HashMap,
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use baton_transport::{Payload, wire::Failure};
use serde::{Serialize, de::DeserializeOwned};

use crate::{error::ActivityError, options::ActivityOptions, registry::Policies};

/// A typed handle on an activity: its registered name, its input and output types.
pub struct ActivityDef<I, O> {
    /// The registered name.
    pub name: &'static str,
    _types: PhantomData<fn(I) -> O>,
}

impl<I, O> ActivityDef<I, O> {
    /// Declares an activity.
    pub const fn new(name: &'static str) -> Self {
        ActivityDef {
            name,
            _types: PhantomData,
        }
    }
}

/// What the workflow code asked for, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// Schedule an activity.
    ScheduleActivity {
        /// Sequence number, in scheduling order from 0.
        seq: u32,
        /// Activity name.
        activity: String,
        /// Input.
        input: Payload,
        /// Options in force.
        options: ActivityOptions,
    },
    /// Start a durable timer.
    StartTimer {
        /// Sequence number (shared with activities).
        seq: u32,
        /// How long to sleep, in milliseconds.
        duration_ms: u64,
    },
    /// Close the run as completed.
    CompleteWorkflow {
        /// Output.
        output: Payload,
    },
    /// Close the run as failed.
    FailWorkflow {
        /// Why.
        failure: Failure,
    },
}

#[derive(Default)]
pub(crate) struct Shared {
    /// Workflow time: when the latest event the code has seen was recorded.
    pub(crate) now_ms: u64,
    pub(crate) next_seq: u32,
    pub(crate) commands: Vec<Command>,
    pub(crate) results: HashMap<u32, Result<Payload, Failure>>,
    pub(crate) wakers: HashMap<u32, Waker>,
    /// Signals received and not yet taken, by name, in journal order.
    pub(crate) signals: HashMap<String, std::collections::VecDeque<Payload>>,
    /// Workflow code waiting for a signal of a name.
    pub(crate) signal_wakers: HashMap<String, Vec<Waker>>,
    /// Query handlers registered by the workflow code.
    pub(crate) queries: HashMap<String, QueryHandler>,
}

/// A query handler: reads the workflow's state, changes nothing.
pub(crate) type QueryHandler = Arc<dyn Fn() -> Result<Payload, String> + Send + Sync>;

/// The workflow's window on the runtime. Cheap to clone.
#[derive(Clone)]
pub struct WorkflowContext {
    workflow_id: Arc<str>,
    run_id: Arc<str>,
    pub(crate) shared: Arc<Mutex<Shared>>,
    policies: Arc<Policies>,
}

impl WorkflowContext {
    pub(crate) fn new(workflow_id: &str, run_id: &str, policies: Arc<Policies>) -> Self {
        WorkflowContext {
            workflow_id: workflow_id.into(),
            run_id: run_id.into(),
            shared: Arc::default(),
            policies,
        }
    }

    /// The workflow ID.
    pub fn workflow_id(&self) -> &str {
        &self.workflow_id
    }

    /// The run ID.
    pub fn run_id(&self) -> &str {
        &self.run_id
    }

    /// Workflow time, Unix milliseconds: when the event the workflow is reacting to was
    /// recorded. Deterministic under replay, unlike the clock.
    pub fn now_ms(&self) -> u64 {
        self.shared.lock().expect("workflow context lock").now_ms
    }

    /// Waits for the next signal named `name` (signals are journaled when they arrive and
    /// handed to the code in that order; one that arrives before anyone waits is kept).
    pub fn signal<T: DeserializeOwned>(&self, name: &str) -> SignalFuture<T> {
        SignalFuture {
            shared: self.shared.clone(),
            name: name.to_string(),
            _out: PhantomData,
        }
    }

    /// Answers queries named `name` with `handler`, which reads the workflow's state (shared
    /// with the code, e.g. through an `Arc<Mutex<_>>`) and must not change it.
    pub fn on_query<T: Serialize>(
        &self,
        name: &str,
        handler: impl Fn() -> T + Send + Sync + 'static,
    ) {
        let handler: QueryHandler =
            Arc::new(move || Payload::encode(&handler()).map_err(|e| e.to_string()));
        self.shared
            .lock()
            .expect("workflow context lock")
            .queries
            .insert(name.to_string(), handler);
    }

    /// Sleeps on a durable timer: it survives restarts of the orchestrator and fires once
    /// `duration` has passed since it was started.
    pub fn sleep(&self, duration: std::time::Duration) -> TimerFuture {
        let mut shared = self.shared.lock().expect("workflow context lock");
        let seq = shared.next_seq;
        shared.next_seq += 1;
        shared.commands.push(Command::StartTimer {
            seq,
            duration_ms: duration.as_millis() as u64,
        });
        TimerFuture {
            shared: self.shared.clone(),
            seq,
        }
    }

    /// Schedules an activity with the options the registry declares for it.
    pub fn activity<I: Serialize, O: DeserializeOwned>(
        &self,
        def: &ActivityDef<I, O>,
        input: &I,
    ) -> ActivityFuture<O> {
        match self.policies.get(def.name) {
            Some(options) => self.activity_with(def, input, options.clone()),
            None => self.refuse(ActivityError::non_retryable(
                "UnregisteredActivity",
                format!("no options are registered for activity {:?}", def.name),
            )),
        }
    }

    /// Schedules an activity with options given by the caller.
    pub fn activity_with<I: Serialize, O: DeserializeOwned>(
        &self,
        def: &ActivityDef<I, O>,
        input: &I,
        options: ActivityOptions,
    ) -> ActivityFuture<O> {
        let input = match Payload::encode(input) {
            Ok(p) => p,
            Err(e) => {
                return self.refuse(ActivityError::non_retryable("EncodeError", e.to_string()));
            }
        };
        let mut shared = self.shared.lock().expect("workflow context lock");
        let seq = shared.next_seq;
        shared.next_seq += 1;
        shared.commands.push(Command::ScheduleActivity {
            seq,
            activity: def.name.to_string(),
            input,
            options,
        });
        ActivityFuture {
            shared: Some(self.shared.clone()),
            seq,
            refused: None,
            _out: PhantomData,
        }
    }

    fn refuse<O>(&self, error: ActivityError) -> ActivityFuture<O> {
        ActivityFuture {
            shared: None,
            seq: u32::MAX,
            refused: Some(error),
            _out: PhantomData,
        }
    }
}

/// Resolves to the next signal of a name once it is recorded in the journal.
pub struct SignalFuture<T> {
    shared: Arc<Mutex<Shared>>,
    name: String,
    _out: PhantomData<fn() -> T>,
}

impl<T: DeserializeOwned> Future for SignalFuture<T> {
    type Output = Result<T, ActivityError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut shared = self.shared.lock().expect("workflow context lock");
        if let Some(payload) = shared
            .signals
            .get_mut(&self.name)
            .and_then(|q| q.pop_front())
        {
            return Poll::Ready(payload.decode::<T>().map_err(|e| {
                ActivityError::non_retryable("DecodeError", format!("signal {:?}: {e}", self.name))
            }));
        }
        shared
            .signal_wakers
            .entry(self.name.clone())
            .or_default()
            .push(cx.waker().clone());
        Poll::Pending
    }
}

/// Resolves once the timer's firing is recorded in the journal.
pub struct TimerFuture {
    shared: Arc<Mutex<Shared>>,
    seq: u32,
}

impl Future for TimerFuture {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut shared = self.shared.lock().expect("workflow context lock");
        if shared.results.remove(&self.seq).is_some() {
            return Poll::Ready(());
        }
        shared.wakers.insert(self.seq, cx.waker().clone());
        Poll::Pending
    }
}

/// Resolves to the activity's result once the journal has recorded it.
pub struct ActivityFuture<O> {
    shared: Option<Arc<Mutex<Shared>>>,
    seq: u32,
    refused: Option<ActivityError>,
    _out: PhantomData<fn() -> O>,
}

impl<O: DeserializeOwned> Future for ActivityFuture<O> {
    type Output = Result<O, ActivityError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        if let Some(e) = self.refused.take() {
            return Poll::Ready(Err(e));
        }
        let Some(shared) = self.shared.as_ref() else {
            return Poll::Pending;
        };
        let mut shared = shared.lock().expect("workflow context lock");
        match shared.results.remove(&self.seq) {
            Some(Ok(payload)) => Poll::Ready(payload.decode::<O>().map_err(|e| {
                ActivityError::non_retryable("DecodeError", format!("activity result: {e}"))
            })),
            Some(Err(failure)) => Poll::Ready(Err(failure.into())),
            None => {
                shared.wakers.insert(self.seq, cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
