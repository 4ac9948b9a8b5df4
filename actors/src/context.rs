//! The workflow SDK: [`WorkflowContext`], through which a deterministic workflow function
//! schedules activities.
//!
//! A workflow must not do I/O, read the clock or draw random numbers except through the
//! context: it is run again, from the start, against its journal whenever its execution is
//! rebuilt, and must issue the same commands in the same order.

use std::{
    collections::{HashMap, HashSet},
    future::Future,
    marker::PhantomData,
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll, Waker},
};

use baton_transport::{Payload, wire::Failure};
use serde::{Serialize, de::DeserializeOwned};

use crate::{
    error::{ActivityError, WorkflowError},
    options::{ActivityOptions, ChildOptions},
    registry::Policies,
};

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
    /// Cancel a timer that has not fired.
    CancelTimer {
        /// Sequence number of the timer.
        seq: u32,
    },
    /// Record that the code took a patched path.
    RecordMarker {
        /// The patch ID.
        patch: String,
    },
    /// Start a child workflow.
    StartChild {
        /// Sequence number (shared with activities).
        seq: u32,
        /// The child's workflow type.
        workflow_type: String,
        /// The child's workflow ID.
        workflow_id: String,
        /// The child's input.
        input: Payload,
        /// Its options.
        options: ChildOptions,
    },
    /// Signal another workflow.
    SignalExternal {
        /// Sequence number (shared with activities).
        seq: u32,
        /// The target workflow ID.
        workflow_id: String,
        /// The signal's name.
        name: String,
        /// Its payload.
        input: Payload,
    },
    /// Close the run and start a new run of the same workflow ID with `input`.
    ContinueAsNew {
        /// The new run's input.
        input: Payload,
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
    /// Cancellation of the run has been requested.
    pub(crate) cancel_requested: bool,
    /// Code waiting for cancellation.
    pub(crate) cancel_wakers: Vec<Waker>,
    /// Timers started and neither fired nor cancelled.
    pub(crate) open_timers: HashSet<u32>,
    /// The code is being replayed over recorded history (for `patched`).
    pub(crate) replaying: bool,
    /// Patch markers anywhere in the recorded history.
    pub(crate) history_markers: HashSet<String>,
    /// Patch markers the code has asked to record.
    pub(crate) markers: HashSet<String>,
    /// The input of the new run, once the code asked to continue as new.
    pub(crate) continue_as_new: Option<Payload>,
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

    /// Runs `main`, the workflow's main code, while a handler runs for every signal named
    /// `name` that arrives until `main` returns: `handler(input)` is started as the signal
    /// is handed to the code and runs concurrently with `main` and with the other
    /// handlers, so it can call activities, sleep or start children. Once `main` returns,
    /// no further signal is taken and the handlers still running are waited for, then
    /// `main`'s result is returned. The first error, from `main` or a handler, is returned
    /// at once (the unfinished handlers are dropped, their activities abandoned).
    ///
    /// Everything is polled in one fixed order (new signals, handlers in arrival order,
    /// `main`), so a replay issues the same commands in the same order.
    pub async fn with_signal_handler<T, H, HF, O>(
        &self,
        name: &str,
        mut handler: H,
        main: impl Future<Output = Result<O, WorkflowError>>,
    ) -> Result<O, WorkflowError>
    where
        T: DeserializeOwned,
        H: FnMut(T) -> HF,
        HF: Future<Output = Result<(), WorkflowError>>,
    {
        let mut main = std::pin::pin!(main);
        let mut next = self.signal::<T>(name);
        let mut running: Vec<Pin<Box<HF>>> = Vec::new();
        let mut returned: Option<O> = None;
        std::future::poll_fn(move |cx| {
            if returned.is_none() {
                while let Poll::Ready(input) = Pin::new(&mut next).poll(cx) {
                    match input {
                        Ok(input) => running.push(Box::pin(handler(input))),
                        Err(e) => return Poll::Ready(Err(e.into())),
                    }
                    next = self.signal::<T>(name);
                }
            }
            let mut i = 0;
            while i < running.len() {
                match running[i].as_mut().poll(cx) {
                    Poll::Ready(Ok(())) => {
                        running.remove(i);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => i += 1,
                }
            }
            if returned.is_none()
                && let Poll::Ready(r) = main.as_mut().poll(cx)
            {
                match r {
                    Ok(out) => returned = Some(out),
                    Err(e) => return Poll::Ready(Err(e)),
                }
            }
            match returned.take() {
                Some(out) if running.is_empty() => Poll::Ready(Ok(out)),
                r => {
                    returned = r;
                    Poll::Pending
                }
            }
        })
        .await
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
    /// `duration` has passed since it was started. Resolves to `Err` (kind `Cancelled`) if
    /// the timer is cancelled ([`WorkflowContext::cancel_timer`], or the run's cancellation).
    pub fn sleep(&self, duration: std::time::Duration) -> TimerFuture {
        let mut shared = self.shared.lock().expect("workflow context lock");
        let seq = shared.next_seq;
        shared.next_seq += 1;
        shared.open_timers.insert(seq);
        shared.commands.push(Command::StartTimer {
            seq,
            duration_ms: duration.as_millis() as u64,
        });
        TimerFuture {
            shared: self.shared.clone(),
            seq,
        }
    }

    /// Cancels a timer that has not fired: its future resolves as cancelled and the
    /// orchestrator never fires it. Cancelling a fired or cancelled timer does nothing.
    pub fn cancel_timer(&self, timer: TimerId) {
        let mut shared = self.shared.lock().expect("workflow context lock");
        if !shared.open_timers.remove(&timer.0) {
            return;
        }
        shared.commands.push(Command::CancelTimer { seq: timer.0 });
        shared.results.insert(
            timer.0,
            Err(ActivityError::cancelled("timer cancelled").into()),
        );
        if let Some(w) = shared.wakers.remove(&timer.0) {
            w.wake();
        }
    }

    /// Whether cancellation of this run has been requested.
    pub fn is_cancel_requested(&self) -> bool {
        self.shared
            .lock()
            .expect("workflow context lock")
            .cancel_requested
    }

    /// Resolves once cancellation of this run has been requested (for code that waits on
    /// nothing cancellable, such as signals).
    pub fn cancelled(&self) -> CancelledFuture {
        CancelledFuture {
            shared: self.shared.clone(),
        }
    }

    /// Versioning: whether this execution runs the code path of patch `id`. True for runs
    /// that reach this point after the patch was deployed (a marker is recorded); false
    /// when replaying a run recorded before it, which took the old path. Lets code change
    /// under running executions without breaking their replay.
    pub fn patched(&self, id: &str) -> bool {
        let mut shared = self.shared.lock().expect("workflow context lock");
        if shared.markers.contains(id) || shared.history_markers.contains(id) {
            if shared.markers.insert(id.to_string()) {
                shared
                    .commands
                    .push(Command::RecordMarker { patch: id.into() });
            }
            return true;
        }
        if shared.replaying {
            return false;
        }
        shared.markers.insert(id.to_string());
        shared
            .commands
            .push(Command::RecordMarker { patch: id.into() });
        true
    }

    /// Closes this run and starts a new run of the same workflow ID with `input` and a
    /// fresh history (for workflows that would otherwise grow without bound). Return the
    /// error this gives from the workflow function: `return Err(ctx.continue_as_new(&x))`.
    /// Signals the run received and did not consume are carried to the new run.
    pub fn continue_as_new<I: Serialize>(&self, input: &I) -> WorkflowError {
        match Payload::encode(input) {
            Ok(p) => {
                self.shared
                    .lock()
                    .expect("workflow context lock")
                    .continue_as_new = Some(p);
                WorkflowError::new(CONTINUE_AS_NEW, "continued as new")
            }
            Err(e) => WorkflowError::new("EncodeError", format!("continue-as-new input: {e}")),
        }
    }

    /// Starts a child workflow of `workflow_type` and resolves to its output, or to its
    /// failure (including a start refused because its workflow ID is running:
    /// `WorkflowAlreadyStarted`). The child is a run of its own, durable and visible like
    /// any other; its outcome is recorded in this run's history.
    pub fn child_workflow<I: Serialize, O: DeserializeOwned>(
        &self,
        workflow_type: &str,
        input: &I,
        options: ChildOptions,
    ) -> ResultFuture<O> {
        let parent = self.workflow_id.clone();
        self.schedule(input, |seq, input| Command::StartChild {
            seq,
            workflow_type: workflow_type.into(),
            workflow_id: options
                .workflow_id
                .clone()
                .unwrap_or_else(|| format!("{parent}-child-{seq}")),
            input,
            options,
        })
    }

    /// Signals another workflow; resolves once the target has recorded it, or to a
    /// `NotFound` / `WorkflowClosed` failure when there is no running workflow of that ID.
    /// Delivered at most once even across restarts of this node.
    pub fn signal_workflow<I: Serialize>(
        &self,
        workflow_id: &str,
        name: &str,
        input: &I,
    ) -> ResultFuture<()> {
        self.schedule(input, |seq, input| Command::SignalExternal {
            seq,
            workflow_id: workflow_id.into(),
            name: name.into(),
            input,
        })
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
        self.schedule(input, |seq, input| Command::ScheduleActivity {
            seq,
            activity: def.name.to_string(),
            input,
            options,
        })
    }

    /// Encodes `input`, takes the next sequence number and issues the command `make` builds
    /// from both; the future resolves to what the journal records for that seq. An input
    /// that does not encode is refused (`EncodeError`) without issuing anything.
    fn schedule<I: Serialize, O>(
        &self,
        input: &I,
        make: impl FnOnce(u32, Payload) -> Command,
    ) -> ResultFuture<O> {
        let input = match Payload::encode(input) {
            Ok(p) => p,
            Err(e) => {
                return self.refuse(ActivityError::non_retryable("EncodeError", e.to_string()));
            }
        };
        let mut shared = self.shared.lock().expect("workflow context lock");
        let seq = shared.next_seq;
        shared.next_seq += 1;
        shared.commands.push(make(seq, input));
        ResultFuture::waiting(self.shared.clone(), seq)
    }

    fn refuse<O>(&self, error: ActivityError) -> ActivityFuture<O> {
        ResultFuture::refused(error)
    }
}

/// The failure kind a workflow returns to continue as new.
pub(crate) const CONTINUE_AS_NEW: &str = "ContinueAsNew";

/// Names a timer, to cancel it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimerId(u32);

/// Resolves once cancellation of the run has been requested.
pub struct CancelledFuture {
    shared: Arc<Mutex<Shared>>,
}

impl Future for CancelledFuture {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let mut shared = self.shared.lock().expect("workflow context lock");
        if shared.cancel_requested {
            return Poll::Ready(());
        }
        shared.cancel_wakers.push(cx.waker().clone());
        Poll::Pending
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

/// Resolves once the timer's firing is recorded in the journal, or to a `Cancelled` error
/// when the timer is cancelled.
pub struct TimerFuture {
    shared: Arc<Mutex<Shared>>,
    seq: u32,
}

impl TimerFuture {
    /// The timer's name, for [`WorkflowContext::cancel_timer`].
    pub fn id(&self) -> TimerId {
        TimerId(self.seq)
    }
}

impl Future for TimerFuture {
    type Output = Result<(), ActivityError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut shared = self.shared.lock().expect("workflow context lock");
        match shared.results.remove(&self.seq) {
            Some(Ok(_)) => Poll::Ready(Ok(())),
            Some(Err(f)) => Poll::Ready(Err(f.into())),
            None => {
                shared.wakers.insert(self.seq, cx.waker().clone());
                Poll::Pending
            }
        }
    }
}

/// An activity's result, once the journal has recorded it.
pub type ActivityFuture<O> = ResultFuture<O>;

/// Resolves to a result (an activity's, a child workflow's, a signal's delivery) once the
/// journal has recorded it.
pub struct ResultFuture<O> {
    shared: Option<Arc<Mutex<Shared>>>,
    seq: u32,
    refused: Option<ActivityError>,
    _out: PhantomData<fn() -> O>,
}

impl<O> ResultFuture<O> {
    fn waiting(shared: Arc<Mutex<Shared>>, seq: u32) -> Self {
        ResultFuture {
            shared: Some(shared),
            seq,
            refused: None,
            _out: PhantomData,
        }
    }

    fn refused(error: ActivityError) -> Self {
        ResultFuture {
            shared: None,
            seq: u32::MAX,
            refused: Some(error),
            _out: PhantomData,
        }
    }
}

impl<O: DeserializeOwned> Future for ResultFuture<O> {
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
                ActivityError::non_retryable(
                    "DecodeError",
                    format!("result of seq {}: {e}", self.seq),
                )
            })),
            Some(Err(failure)) => Poll::Ready(Err(failure.into())),
            None => {
                shared.wakers.insert(self.seq, cx.waker().clone());
                Poll::Pending
            }
        }
    }
}
