//! One ractor actor per workflow execution, under a supervisor that restarts a failed
//! execution by replaying its journal.
//!
//! The actor owns its run's state: the replay core ([`Execution`]), the activities in
//! flight and their attempts. Every change goes through the same steps: build the events,
//! append them to the journal (group commit, redb + JetStream), and only then let the
//! effects leave the node (tasks published, waiters woken). Reports of attempts that are
//! no longer current are recognised by attempt number and dropped.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use async_nats::HeaderMap;
use baton_transport::{
    Payload, codec,
    jetstream::{Streams, heartbeat_key, task_msg_id},
    subject,
    wire::{
        ActivityOutcome, ActivityReport, ActivityTask, Failure, IdConflictPolicy, IdReusePolicy,
        Liveness,
    },
};
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use tokio::sync::{broadcast, oneshot};

use crate::{
    Registry,
    context::Command,
    error::ActivityError,
    history::{Event, EventKind},
    journal::{self, IdPolicies, Journal, ParentRef, RunRecord, RunStatus, StartOutcome},
    now_ms,
    options::{ActivityOptions, CancellationType, ChildOptions},
    replay::Execution,
};

/// Services every execution uses.
pub(crate) struct Runtime {
    pub(crate) journal: Journal,
    pub(crate) streams: Streams,
    pub(crate) registry: Arc<Registry>,
    /// Workflow IDs of runs as they close (wakes result waiters).
    pub(crate) closed: broadcast::Sender<String>,
    /// Live executions by run ID.
    pub(crate) executions: Mutex<HashMap<String, ActorRef<ExecMsg>>>,
    /// The supervisor that spawns executions (set once the node has started it).
    pub(crate) supervisor: OnceLock<ActorRef<SupervisorMsg>>,
    /// Evict an execution idle this long (zero: after every step, so each step replays);
    /// `None`: keep every open execution in memory.
    pub(crate) evict_idle: Option<Duration>,
    /// Executions brought back into memory after an eviction, since the node started.
    pub(crate) rehydrations: std::sync::atomic::AtomicU64,
    /// Most executions in memory; beyond it the longest-resident idle ones are evicted.
    pub(crate) max_cached: usize,
}

impl Runtime {
    /// The live execution of a run. A run started a moment ago may be asked for before its
    /// actor is registered, so a running run is looked up a few times.
    /// An open run that is not in memory (evicted) is rehydrated from its journal.
    pub(crate) async fn find_execution(&self, run_id: &str) -> Option<ActorRef<ExecMsg>> {
        let mut asked = false;
        for _ in 0..300 {
            if let Some(a) = self.executions.lock().expect("executions lock").get(run_id) {
                return Some(a.clone());
            }
            match self.journal.run(run_id) {
                Ok(Some(run)) if run.status == RunStatus::Running => {
                    if !asked && let Some(s) = self.supervisor.get() {
                        asked = true;
                        let _ = s.send_message(SupervisorMsg::Rehydrate {
                            run_id: run_id.to_string(),
                        });
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await
                }
                _ => return None,
            }
        }
        None
    }

    /// Starts the execution actor of a run just created in the journal.
    pub(crate) fn spawn_run(self: &Arc<Self>, run: RunRecord, history: Vec<Event>) {
        let Some(supervisor) = self.supervisor.get() else {
            tracing::error!(run_id = %run.run_id, "no supervisor; the run starts at the next restart");
            return;
        };
        let args = ExecArgs {
            rt: self.clone(),
            run,
            history,
            mode: StartMode::New,
            start: None,
        };
        if let Err(e) = supervisor.send_message(SupervisorMsg::Spawn(args)) {
            tracing::error!(error = %e, "supervisor gone; the run starts at the next restart");
        }
    }

    /// Creates a run that is not in the journal yet: its execution runs the workflow's
    /// first activation, then creates the run in the journal (compare-and-set on its
    /// workflow ID, by `policies`) together with the events of what the code did first,
    /// in one commit, and only then lets those effects leave. Answers what the journal
    /// decided; an execution whose start was a duplicate stops without a trace.
    pub(crate) async fn start_run(
        self: &Arc<Self>,
        run: RunRecord,
        history: Vec<Event>,
        policies: IdPolicies,
    ) -> Result<StartOutcome, journal::Error> {
        let not_started = || {
            journal::Error::Invalid(
                "the run's execution did not start; nothing was recorded".into(),
            )
        };
        let supervisor = self.supervisor.get().ok_or_else(not_started)?;
        let (reply, rx) = oneshot::channel();
        let args = ExecArgs {
            rt: self.clone(),
            run,
            history,
            mode: StartMode::New,
            start: Some(StartGate { policies, reply }),
        };
        supervisor
            .send_message(SupervisorMsg::Spawn(args))
            .map_err(|_| not_started())?;
        rx.await.unwrap_or_else(|_| Err(not_started()))
    }
}

/// Why a message for a workflow ID could not be delivered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum DeliveryError {
    /// No workflow of that ID.
    NotFound(String),
    /// The workflow is closed.
    Closed(String),
    /// Not now (the run is restarting, the journal failed): retry.
    Unavailable(String),
}

impl DeliveryError {
    fn failure(&self) -> Failure {
        let (kind, message) = match self {
            DeliveryError::NotFound(m) => ("NotFound", m),
            DeliveryError::Closed(m) => ("WorkflowClosed", m),
            DeliveryError::Unavailable(m) => ("Unavailable", m),
        };
        Failure {
            kind: kind.into(),
            message: message.clone(),
            retryable: matches!(self, DeliveryError::Unavailable(_)),
        }
    }
}

/// Delivers a message to the running run of a workflow ID, following continue-as-new:
/// a run that closes while the message is on its way hands it to the run that follows.
/// `make` builds the message around its reply port. Returns the run that took it.
pub(crate) async fn deliver(
    rt: &Runtime,
    workflow_id: &str,
    make: impl Fn(RpcReplyPort<Result<(), String>>) -> ExecMsg,
) -> Result<RunRecord, DeliveryError> {
    let mut last = String::new();
    for _ in 0..20 {
        let run = match rt.journal.run_of(workflow_id) {
            Ok(Some(run)) => run,
            Ok(None) => {
                return Err(DeliveryError::NotFound(format!(
                    "no workflow {workflow_id:?}"
                )));
            }
            Err(e) => return Err(DeliveryError::Unavailable(e.to_string())),
        };
        if run.status != RunStatus::Running {
            return Err(DeliveryError::Closed(format!(
                "workflow {workflow_id:?} is {}",
                run.status.as_str()
            )));
        }
        if let Some(actor) = rt.find_execution(&run.run_id).await {
            match actor.call(&make, Some(Duration::from_secs(30))).await {
                Ok(ractor::rpc::CallResult::Success(Ok(()))) => return Ok(run),
                Ok(ractor::rpc::CallResult::Success(Err(e))) => last = e,
                Ok(other) => last = format!("{other:?}"),
                Err(e) => last = e.to_string(),
            }
        }
        // The run closed (continue-as-new hands over to its successor) or is restarting.
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(DeliveryError::Unavailable(format!(
        "workflow {workflow_id:?} did not take the message: {last}"
    )))
}

/// How a child workflow's run ended, as its parent learns it.
#[derive(Debug, Clone)]
pub(crate) enum ChildOutcome {
    Completed(Payload),
    Failed(Failure),
    /// The child continued as new: its workflow goes on in this run.
    ContinuedAs(String),
}

impl ChildOutcome {
    /// The outcome a close event gives.
    fn of_close(kind: &EventKind) -> Option<ChildOutcome> {
        Some(match kind {
            EventKind::WorkflowCompleted { output } => ChildOutcome::Completed(output.clone()),
            EventKind::WorkflowFailed { failure } => ChildOutcome::Failed(failure.clone()),
            EventKind::WorkflowTerminated { kind, reason } => ChildOutcome::Failed(Failure {
                kind: kind.clone(),
                message: reason.clone(),
                retryable: kind == "TimedOut",
            }),
            EventKind::WorkflowContinuedAsNew { new_run_id, .. } => {
                ChildOutcome::ContinuedAs(new_run_id.clone())
            }
            _ => return None,
        })
    }
}

/// Messages of an execution actor.
pub(crate) enum ExecMsg {
    /// A worker's report; answered once it is journaled or recognised as stale (then the
    /// report may be acked), or with an error (leave it to be redelivered).
    Report(ActivityReport, RpcReplyPort<Result<(), String>>),
    /// A retry's backoff has elapsed: dispatch this attempt.
    RetryDue { seq: u32, attempt: u32 },
    /// After a restart, once the reports that were waiting have been applied: republish the
    /// tasks of in-flight attempts that JetStream no longer holds.
    Redispatch,
    /// A durable timer is due.
    TimerDue { seq: u32 },
    /// A signal: answered once it is journaled (or known by its request ID).
    Signal {
        name: String,
        input: Payload,
        request_id: Option<String>,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// A query, answered from the workflow's state.
    Query {
        name: String,
        reply: RpcReplyPort<Result<Payload, String>>,
    },
    /// An activity's schedule-to-close deadline is due.
    Deadline { seq: u32 },
    /// Request cancellation of the run: answered once journaled.
    Cancel {
        reason: String,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// Close the run without running its code (`Terminated`, or `TimedOut` from its
    /// execution timeout).
    Terminate {
        kind: String,
        reason: String,
        reply: Option<RpcReplyPort<Result<(), String>>>,
    },
    /// Start (or, after a restart, find) the current attempt of a child workflow.
    ChildStart { seq: u32 },
    /// Look whether a running child has closed (a safety net under `ChildClosed`).
    ChildPoll { seq: u32 },
    /// A child's run closed.
    ChildClosed {
        seq: u32,
        run_id: String,
        outcome: ChildOutcome,
    },
    /// An external signal was delivered (no failure) or could not be.
    ExternalSignalDone { seq: u32, failure: Option<Failure> },
    /// Check an attempt's schedule-to-start and heartbeat timeouts against what its worker
    /// recorded in `BATON_LIVENESS`.
    AttemptCheck { seq: u32, attempt: u32 },
    /// Evict the execution if nothing happened since the step numbered `epoch`.
    EvictCheck { epoch: u64 },
    /// Evict the execution now if it only waits: the node holds more executions than it
    /// may keep in memory.
    EvictNow,
}

/// How long an attempt may go unheard by the orchestrator before it fails it: the heartbeat
/// timeout, plus the second by which the pool batches liveness writes and half a second for
/// their way through JetStream. (The worker's pool enforces the timeout itself and kills the
/// runner; this catches a worker process that is frozen or cut off, before JetStream's ack
/// wait hands its task to another worker under the same attempt number.)
fn heartbeat_limit_ms(timeout_ms: u64) -> u64 {
    timeout_ms + 1_500
}

/// When to first look at a dispatched attempt, if the orchestrator watches it.
fn first_check(options: &ActivityOptions) -> Option<Duration> {
    let sts = options.schedule_to_start_ms;
    let hb = options.heartbeat_timeout_ms.map(heartbeat_limit_ms);
    match (sts, hb) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
    .map(Duration::from_millis)
}

struct Pending {
    activity: String,
    input: Payload,
    options: ActivityOptions,
    /// The current attempt.
    attempt: u32,
    /// When the current attempt may be dispatched (Unix ms), for retries in backoff.
    due_ms: u64,
    /// The schedule-to-close deadline (Unix ms), if the activity has one.
    deadline_ms: Option<u64>,
    /// The workflow's cancellation reached it (`wait_cancellation_completed`): no more
    /// retries; the next report resolves it.
    cancel_requested: bool,
    /// When the current attempt was last dispatched (Unix ms; 0 before), for its
    /// schedule-to-start timeout.
    dispatched_ms: u64,
}

struct Child {
    workflow_type: String,
    workflow_id: String,
    input: Payload,
    options: ChildOptions,
    /// The current attempt, from 1.
    attempt: u32,
    /// The current attempt's run, once started.
    run_id: Option<String>,
    /// When the current attempt may start (Unix ms), for retries in backoff.
    due_ms: u64,
    cancel_requested: bool,
    /// A `ChildPoll` is armed.
    polling: bool,
}

impl Pending {
    /// An activity just scheduled (live, or read back from the journal): attempt 1, its
    /// schedule-to-close deadline counted from `scheduled_ms`.
    fn scheduled(
        activity: &str,
        input: &Payload,
        options: &ActivityOptions,
        scheduled_ms: u64,
    ) -> Pending {
        Pending {
            activity: activity.to_string(),
            input: input.clone(),
            options: options.clone(),
            attempt: 1,
            due_ms: 0,
            deadline_ms: options.schedule_to_close_ms.map(|d| scheduled_ms + d),
            cancel_requested: false,
            dispatched_ms: 0,
        }
    }
}

impl Child {
    /// A child workflow just scheduled (live, or read back from the journal): attempt 1,
    /// not started yet.
    fn scheduled(
        workflow_type: &str,
        workflow_id: &str,
        input: &Payload,
        options: &ChildOptions,
    ) -> Child {
        Child {
            workflow_type: workflow_type.to_string(),
            workflow_id: workflow_id.to_string(),
            input: input.clone(),
            options: options.clone(),
            attempt: 1,
            run_id: None,
            due_ms: 0,
            cancel_requested: false,
            polling: false,
        }
    }
}

struct OutSignal {
    workflow_id: String,
    name: String,
    input: Payload,
}

pub(crate) struct ExecState {
    rt: Arc<Runtime>,
    run: RunRecord,
    exec: Execution,
    next_event_id: u32,
    pending: BTreeMap<u32, Pending>,
    /// Durable timers started and not fired: seq -> fire time (Unix ms).
    timers: BTreeMap<u32, u64>,
    children: BTreeMap<u32, Child>,
    signals_out: BTreeMap<u32, OutSignal>,
    /// Request IDs of the signals recorded (a retried delivery is not recorded twice).
    seen_signals: HashSet<String>,
    cancel_requested: bool,
    /// Set when the code no longer matches the journal: the run stays open, untouched.
    blocked: Option<String>,
    /// Steps handled, for idle eviction.
    epoch: u64,
    /// The messages this execution armed for later (`send_after` tasks). Each holds a
    /// reference to the actor, so they are aborted when it stops: an evicted execution's
    /// memory is freed at once, not when its last timer would have fired.
    armed: Vec<Armed>,
    /// What `post_start` still has to do (taken there).
    startup: Option<Startup>,
    /// A run not in the journal yet: its first events, committed with the first step's.
    unstarted: Option<(Vec<Event>, StartGate)>,
    /// The start was a duplicate: the execution is stopping and does nothing more.
    discarded: bool,
}

/// A message armed with `send_after`.
type Armed = tokio::task::JoinHandle<Result<(), ractor::MessagingErr<ExecMsg>>>;

/// Sends `msg()` to `myself` after `after`, keeping the handle in `armed` (finished ones
/// are dropped as it grows).
fn arm(
    armed: &mut Vec<Armed>,
    myself: &ActorRef<ExecMsg>,
    after: Duration,
    msg: impl FnOnce() -> ExecMsg + Send + 'static,
) {
    if armed.len() >= 32 {
        armed.retain(|h| !h.is_finished());
    }
    armed.push(myself.send_after(after, msg));
}

/// The start of an execution that `post_start` completes: the commands the code issued
/// beyond the journal, how the run came to be started, what a recorded cancellation must
/// still do.
struct Startup {
    ahead: Vec<Command>,
    mode: StartMode,
    cancel_fx: CancelEffects,
}

/// What a cancellation request must still do outside the journal.
#[derive(Default)]
struct CancelEffects {
    /// Activities whose workers are told to stop.
    activities: Vec<u32>,
    /// Activities in backoff waiting for their cancellation to resolve them.
    backoff: Vec<(u32, u32)>,
    /// Child runs asked to cancel.
    child_runs: Vec<String>,
    /// Children not started yet waiting for their cancellation to resolve them.
    unstarted_children: Vec<u32>,
}

/// Applies a cancellation request to the run's in-flight work, the same way live and when
/// rebuilding from the journal (the replay core resolves the same things for the code).
fn apply_cancel(
    pending: &mut BTreeMap<u32, Pending>,
    timers: &mut BTreeMap<u32, u64>,
    children: &mut BTreeMap<u32, Child>,
) -> CancelEffects {
    let mut fx = CancelEffects::default();
    timers.clear();
    pending.retain(|seq, p| match p.options.cancellation {
        CancellationType::Abandon => false,
        CancellationType::TryCancel => {
            fx.activities.push(*seq);
            false
        }
        CancellationType::WaitCancellationCompleted => {
            p.cancel_requested = true;
            fx.activities.push(*seq);
            if p.due_ms > 0 {
                fx.backoff.push((*seq, p.attempt));
            }
            true
        }
    });
    children.retain(|seq, c| {
        if c.options.cancellation != CancellationType::Abandon {
            match &c.run_id {
                Some(r) => fx.child_runs.push(r.clone()),
                None => fx.unstarted_children.push(*seq),
            }
        }
        match c.options.cancellation {
            CancellationType::WaitCancellationCompleted => {
                c.cancel_requested = true;
                true
            }
            _ => false,
        }
    });
    fx
}

fn cancelled_failure(what: &str) -> Failure {
    Failure {
        kind: ActivityError::CANCELLED.into(),
        message: format!("{what} was cancelled with its workflow"),
        retryable: false,
    }
}

pub(crate) struct ExecutionActor;

/// What an execution actor starts from: its run and its journal so far.
pub(crate) struct ExecArgs {
    pub(crate) rt: Arc<Runtime>,
    pub(crate) run: RunRecord,
    pub(crate) history: Vec<Event>,
    /// Why the actor starts.
    pub(crate) mode: StartMode,
    /// Set for a run the journal does not hold yet (see [`Runtime::start_run`]).
    pub(crate) start: Option<StartGate>,
}

/// How a new run's start is decided and answered.
pub(crate) struct StartGate {
    pub(crate) policies: IdPolicies,
    pub(crate) reply: oneshot::Sender<Result<StartOutcome, journal::Error>>,
}

/// Why an execution actor starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum StartMode {
    /// A run just created.
    New,
    /// Rebuilt after a node restart or a failure: in-flight tasks are checked (not blindly
    /// republished) on `Redispatch`; children, external signals and a cancellation resume.
    Recovering,
    /// Brought back into memory after an idle eviction: everything it had started is still
    /// on its way, so nothing is dispatched again; its timers and checks are re-armed.
    Rehydrating,
}

impl Actor for ExecutionActor {
    type Msg = ExecMsg;
    type State = ExecState;
    type Arguments = ExecArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<ExecMsg>,
        args: ExecArgs,
    ) -> Result<ExecState, ActorProcessingErr> {
        let ExecArgs {
            rt,
            run,
            history,
            mode,
            start,
        } = args;
        let def = rt
            .registry
            .workflow_def(&run.workflow_type)
            .ok_or_else(|| {
                format!(
                    "workflow type {:?} is not registered on this node",
                    run.workflow_type
                )
            })?;
        let mut exec = Execution::new(
            def.run.clone(),
            &run.workflow_id,
            &run.run_id,
            rt.registry.policies().clone(),
        );
        let mut pending: BTreeMap<u32, Pending> = BTreeMap::new();
        let mut timers: BTreeMap<u32, u64> = BTreeMap::new();
        let mut children: BTreeMap<u32, Child> = BTreeMap::new();
        let mut signals_out: BTreeMap<u32, OutSignal> = BTreeMap::new();
        let mut seen_signals = HashSet::new();
        let mut cancel_requested = false;
        let mut cancel_fx = CancelEffects::default();
        let mut blocked = None;
        // Rebuild the workflow's state the way it ran; what the code issued beyond the
        // journal (it ran ahead of a crash) is new work.
        let ahead = match exec.replay(&history) {
            Ok(commands) => commands,
            Err(e) => {
                blocked = Some(e.to_string());
                Vec::new()
            }
        };
        for event in &history {
            match &event.kind {
                EventKind::ActivityScheduled {
                    seq,
                    activity,
                    input,
                    options,
                } => {
                    pending.insert(
                        *seq,
                        Pending::scheduled(activity, input, options, event.at_ms),
                    );
                }
                EventKind::TimerStarted { seq, fire_at_ms } => {
                    timers.insert(*seq, *fire_at_ms);
                }
                EventKind::TimerFired { seq } | EventKind::TimerCancelled { seq } => {
                    timers.remove(seq);
                }
                EventKind::ActivityCompleted { seq, .. }
                | EventKind::ActivityFailed {
                    seq,
                    retry_in_ms: None,
                    ..
                } => {
                    pending.remove(seq);
                }
                EventKind::ActivityFailed {
                    seq,
                    attempt,
                    retry_in_ms: Some(delay),
                    ..
                } => {
                    if let Some(p) = pending.get_mut(seq) {
                        p.attempt = attempt + 1;
                        p.due_ms = event.at_ms + delay;
                    }
                }
                EventKind::SignalReceived {
                    request_id: Some(id),
                    ..
                } => {
                    seen_signals.insert(id.clone());
                }
                EventKind::WorkflowCancelRequested { .. } => {
                    cancel_requested = true;
                    cancel_fx = apply_cancel(&mut pending, &mut timers, &mut children);
                }
                EventKind::ChildWorkflowScheduled {
                    seq,
                    workflow_type,
                    workflow_id,
                    input,
                    options,
                } => {
                    children.insert(
                        *seq,
                        Child::scheduled(workflow_type, workflow_id, input, options),
                    );
                }
                EventKind::ChildWorkflowStarted {
                    seq,
                    attempt,
                    run_id,
                } => {
                    if let Some(c) = children.get_mut(seq) {
                        c.attempt = *attempt;
                        c.run_id = Some(run_id.clone());
                    }
                }
                EventKind::ChildWorkflowCompleted { seq, .. }
                | EventKind::ChildWorkflowFailed {
                    seq,
                    retry_in_ms: None,
                    ..
                } => {
                    children.remove(seq);
                }
                EventKind::ChildWorkflowFailed {
                    seq,
                    attempt,
                    retry_in_ms: Some(delay),
                    ..
                } => {
                    if let Some(c) = children.get_mut(seq) {
                        c.attempt = attempt + 1;
                        c.run_id = None;
                        c.due_ms = event.at_ms + delay;
                    }
                }
                EventKind::ExternalSignalScheduled {
                    seq,
                    workflow_id,
                    name,
                    input,
                } => {
                    signals_out.insert(
                        *seq,
                        OutSignal {
                            workflow_id: workflow_id.clone(),
                            name: name.clone(),
                            input: input.clone(),
                        },
                    );
                }
                EventKind::ExternalSignalResolved { seq, .. } => {
                    signals_out.remove(seq);
                }
                _ => {}
            }
        }
        let next_event_id = history.last().map_or(1, |e| e.id + 1);
        // Durable timers and deadlines of the journal resume where they were.
        let now = now_ms();
        let mut armed = Vec::new();
        for (&seq, &fire_at) in &timers {
            armed.push(myself.send_after(
                Duration::from_millis(fire_at.saturating_sub(now)),
                move || ExecMsg::TimerDue { seq },
            ));
        }
        for (&seq, p) in &pending {
            if let Some(deadline) = p.deadline_ms {
                armed.push(myself.send_after(
                    Duration::from_millis(deadline.saturating_sub(now)),
                    move || ExecMsg::Deadline { seq },
                ));
            }
        }
        if let Some(deadline) = run.deadline_ms {
            armed.push(myself.send_after(
                Duration::from_millis(deadline.saturating_sub(now)),
                || ExecMsg::Terminate {
                    kind: "TimedOut".into(),
                    reason: "the workflow ran past its execution timeout".into(),
                    reply: None,
                },
            ));
        }
        let state = ExecState {
            rt,
            run,
            exec,
            next_event_id,
            pending,
            timers,
            children,
            signals_out,
            seen_signals,
            cancel_requested,
            blocked,
            epoch: 0,
            armed,
            startup: Some(Startup {
                ahead,
                mode,
                cancel_fx,
            }),
            unstarted: start.map(|gate| (history, gate)),
            discarded: false,
        };
        Ok(state)
    }

    /// The start's first journal append and the effects it arms run here, in the actor's
    /// own task, not in `pre_start`: the supervisor awaits `pre_start` (the replay) and
    /// nothing more, so it spawns many executions at once and their first appends share
    /// group commits instead of queueing behind one another.
    async fn post_start(
        &self,
        myself: ActorRef<ExecMsg>,
        state: &mut ExecState,
    ) -> Result<(), ActorProcessingErr> {
        let Some(Startup {
            ahead,
            mode,
            cancel_fx,
        }) = state.startup.take()
        else {
            return Ok(());
        };
        let recovering = mode == StartMode::Recovering;
        // A new run's start is committed here, blocked or not (then with no step).
        if state.blocked.is_none() || state.unstarted.is_some() {
            state.record(now_ms(), Vec::new(), ahead, &myself).await?;
            if state.discarded {
                return Ok(());
            }
        }
        if let Some(reason) = &state.blocked {
            tracing::error!(workflow_id = %state.run.workflow_id, run_id = %state.run.run_id, %reason,
                "execution blocked: the workflow code does not match its journal");
        }
        // Retries in backoff resume on their timers; other in-flight attempts are checked
        // on Redispatch (recovery) or were just dispatched (new run).
        let now = now_ms();
        for (seq, p) in &state.pending {
            if p.due_ms > now {
                let (seq, attempt) = (*seq, p.attempt);
                arm(
                    &mut state.armed,
                    &myself,
                    Duration::from_millis(p.due_ms - now),
                    move || ExecMsg::RetryDue { seq, attempt },
                );
            } else if mode == StartMode::New && p.due_ms > 0 {
                myself.send_message(ExecMsg::RetryDue {
                    seq: *seq,
                    attempt: p.attempt,
                })?;
            }
        }
        // Children, external signals and a cancellation resume from the journal too; each
        // step is idempotent (deterministic child run IDs, signal request IDs).
        if recovering {
            for (&seq, c) in &state.children {
                if c.due_ms > now {
                    arm(
                        &mut state.armed,
                        &myself,
                        Duration::from_millis(c.due_ms - now),
                        move || ExecMsg::ChildStart { seq },
                    );
                } else {
                    myself.send_message(ExecMsg::ChildStart { seq })?;
                }
            }
            for &seq in state.signals_out.keys() {
                state.send_external_signal(seq, &myself);
            }
            if state.cancel_requested {
                state.after_cancel(cancel_fx, &myself).await;
            }
        }
        if mode == StartMode::Rehydrating {
            // Evicted only with every attempt dispatched and every child started: their
            // checks and polls are armed again from now.
            let now = now_ms();
            let mut checks = Vec::new();
            for (&seq, p) in state.pending.iter_mut() {
                p.dispatched_ms = now;
                if let Some(first) = first_check(&p.options) {
                    checks.push((seq, p.attempt, first));
                }
            }
            for (seq, attempt, first) in checks {
                arm(&mut state.armed, &myself, first, move || {
                    ExecMsg::AttemptCheck { seq, attempt }
                });
            }
            let mut polls = Vec::new();
            for (&seq, c) in state.children.iter_mut() {
                c.polling = true;
                polls.push(seq);
            }
            for seq in polls {
                arm(&mut state.armed, &myself, CHILD_POLL, move || {
                    ExecMsg::ChildPoll { seq }
                });
            }
            // The message that brought the run back comes next: it is taken before the run
            // may leave again (else a zero cache could evict it before it arrives, forever).
            if let Some(idle) = state.rt.evict_idle {
                arm(
                    &mut state.armed,
                    &myself,
                    idle.max(Duration::from_secs(1)),
                    || ExecMsg::EvictCheck { epoch: 0 },
                );
            }
        } else {
            state.after_step(&myself);
        }
        Ok(())
    }

    async fn post_stop(
        &self,
        _: ActorRef<ExecMsg>,
        state: &mut ExecState,
    ) -> Result<(), ActorProcessingErr> {
        for armed in state.armed.drain(..) {
            armed.abort();
        }
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<ExecMsg>,
        msg: ExecMsg,
        state: &mut ExecState,
    ) -> Result<(), ActorProcessingErr> {
        let msg = match msg {
            // A blocked run can still be terminated; nothing else moves it.
            ExecMsg::Terminate { .. } => msg,
            _ if state.blocked.is_some() => {
                if let ExecMsg::Report(_, reply)
                | ExecMsg::Signal { reply, .. }
                | ExecMsg::Cancel { reply, .. } = msg
                {
                    let _ = reply.send(Err("execution blocked by non-determinism".into()));
                }
                return Ok(());
            }
            _ => msg,
        };
        match msg {
            ExecMsg::Report(report, reply) => {
                let r = state.on_report(report, &myself).await;
                let _ = reply.send(r.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                r?;
            }
            ExecMsg::RetryDue { seq, attempt } => {
                let Some(p) = state.pending.get(&seq).filter(|p| p.attempt == attempt) else {
                    return Ok(());
                };
                if p.cancel_requested {
                    // Cancelled in backoff: there is no attempt to wait for.
                    state.pending.remove(&seq);
                    let kind = EventKind::ActivityFailed {
                        seq,
                        attempt: attempt.saturating_sub(1).max(1),
                        worker: "orchestrator".into(),
                        failure: cancelled_failure("the activity"),
                        retry_in_ms: None,
                    };
                    state.resolve(kind, &myself).await?;
                } else {
                    state.dispatch(&[seq], false, &myself).await?;
                }
            }
            ExecMsg::Signal {
                name,
                input,
                request_id,
                reply,
            } => {
                if let Some(id) = &request_id
                    && state.seen_signals.contains(id)
                {
                    let _ = reply.send(Ok(()));
                    return Ok(());
                }
                if let Some(id) = &request_id {
                    state.seen_signals.insert(id.clone());
                }
                let r = state
                    .resolve(
                        EventKind::SignalReceived {
                            name,
                            input,
                            request_id,
                        },
                        &myself,
                    )
                    .await;
                let _ = reply.send(r.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                r?;
            }
            ExecMsg::Query { name, reply } => {
                let _ = reply.send(state.exec.query(&name));
            }
            ExecMsg::TimerDue { seq } => {
                if state.timers.remove(&seq).is_some() {
                    state
                        .resolve(EventKind::TimerFired { seq }, &myself)
                        .await?;
                }
            }
            ExecMsg::Deadline { seq } => {
                let due = state
                    .pending
                    .get(&seq)
                    .and_then(|p| p.deadline_ms)
                    .is_some_and(|d| d <= now_ms());
                if due {
                    let p = state.pending.remove(&seq).expect("pending activity");
                    tracing::warn!(run_id = %state.run.run_id, seq, activity = %p.activity, "activity failed: schedule-to-close timeout");
                    let failure = Failure {
                        kind: "ScheduleToCloseTimeout".into(),
                        message: format!(
                            "activity {:?} did not complete within its schedule-to-close timeout of {} ms",
                            p.activity,
                            p.options.schedule_to_close_ms.unwrap_or(0)
                        ),
                        retryable: false,
                    };
                    let kind = EventKind::ActivityFailed {
                        seq,
                        attempt: p.attempt,
                        worker: "orchestrator".into(),
                        failure,
                        retry_in_ms: None,
                    };
                    state.resolve(kind, &myself).await?;
                }
            }
            ExecMsg::Redispatch => {
                let now = now_ms();
                let due: Vec<u32> = state
                    .pending
                    .iter()
                    .filter(|(_, p)| p.due_ms <= now && !(p.cancel_requested && p.due_ms > 0))
                    .map(|(s, _)| *s)
                    .collect();
                state.dispatch(&due, true, &myself).await?;
            }
            ExecMsg::Cancel { reason, reply } => {
                let r = state.cancel(reason, &myself).await;
                let _ = reply.send(r.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                r?;
            }
            ExecMsg::Terminate {
                kind,
                reason,
                reply,
            } => {
                let r = state.terminate(kind, reason, &myself).await;
                if let Some(reply) = reply {
                    let _ = reply.send(r.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                }
                r?;
            }
            ExecMsg::ChildStart { seq } => state.start_child(seq, &myself).await?,
            ExecMsg::ChildPoll { seq } => {
                let run_id = match state.children.get_mut(&seq) {
                    Some(c) => {
                        c.polling = false;
                        c.run_id.clone()
                    }
                    None => None,
                };
                if let Some(run_id) = run_id {
                    state.check_child(seq, run_id, &myself).await?;
                }
            }
            ExecMsg::ChildClosed {
                seq,
                run_id,
                outcome,
            } => state.on_child_closed(seq, run_id, outcome, &myself).await?,
            ExecMsg::AttemptCheck { seq, attempt } => {
                state.check_attempt(seq, attempt, &myself).await?
            }
            ExecMsg::EvictCheck { epoch } => {
                if epoch == state.epoch {
                    state.evict_if_idle(&myself);
                }
                return Ok(());
            }
            ExecMsg::EvictNow => {
                state.evict_if_idle(&myself);
                return Ok(());
            }
            ExecMsg::ExternalSignalDone { seq, failure } => {
                if state.signals_out.remove(&seq).is_some() {
                    state
                        .resolve(EventKind::ExternalSignalResolved { seq, failure }, &myself)
                        .await?;
                }
            }
        }
        state.after_step(&myself);
        Ok(())
    }
}

/// Tells the workers running these activities of a run to stop (they see it at their
/// next heartbeat).
async fn mark_cancelled(rt: &Runtime, run_id: &str, seqs: &[u32]) {
    for &seq in seqs {
        let key = heartbeat_key(run_id, seq);
        let put = rt.streams.cancels.put(key, "1".into());
        if let Err(e) = baton_transport::faults::call("cancel mark put", put).await {
            tracing::warn!(run_id, seq, error = %e, "cancellation mark not stored");
        }
    }
}

/// How often a parent looks whether a running child has closed, in case the child's
/// notice was lost (the parent was restarting when it closed).
const CHILD_POLL: Duration = Duration::from_secs(5);

impl ExecState {
    /// Sends `msg()` to this execution after `after`, unless it stops first.
    fn arm(
        &mut self,
        myself: &ActorRef<ExecMsg>,
        after: Duration,
        msg: impl FnOnce() -> ExecMsg + Send + 'static,
    ) {
        arm(&mut self.armed, myself, after, msg);
    }

    /// After each message: arm the idle-eviction check (or, with zero cache, evict now).
    fn after_step(&mut self, myself: &ActorRef<ExecMsg>) {
        let Some(idle) = self.rt.evict_idle else {
            return;
        };
        if self.run.closed_ms.is_some() {
            return;
        }
        self.epoch += 1;
        let epoch = self.epoch;
        if idle.is_zero() {
            // Queued behind the messages already waiting: the run leaves memory once its
            // mailbox is drained. A message that finds it gone is retried by its sender.
            let _ = myself.send_message(ExecMsg::EvictCheck { epoch });
        } else {
            self.arm(myself, idle, move || ExecMsg::EvictCheck { epoch });
        }
    }

    /// Leaves memory if the run only waits (on timers, dispatched activities, started
    /// children, signals): the supervisor keeps its next wake-up time, and a message for the
    /// run or that time brings it back by replaying its journal. A run in the middle of
    /// something the journal cannot resume without it (a retry in backoff, a child not
    /// started yet, a signal on its way out) stays.
    fn evict_if_idle(&mut self, myself: &ActorRef<ExecMsg>) {
        if self.blocked.is_some() || self.run.closed_ms.is_some() {
            return;
        }
        let now = now_ms();
        let busy = self.pending.values().any(|p| p.dispatched_ms == 0)
            || self.children.values().any(|c| c.run_id.is_none())
            || !self.signals_out.is_empty();
        if busy {
            return;
        }
        let mut wake: Vec<u64> = self.timers.values().copied().collect();
        wake.extend(self.run.deadline_ms);
        for p in self.pending.values() {
            wake.extend(p.deadline_ms);
            wake.extend(
                p.options
                    .schedule_to_start_ms
                    .map(|sts| p.dispatched_ms + sts),
            );
            wake.extend(
                p.options
                    .heartbeat_timeout_ms
                    .map(|hb| now + heartbeat_limit_ms(hb)),
            );
        }
        if !self.children.is_empty() {
            // A child's close is delivered by message; look again now and then anyway.
            wake.push(now + CHILD_POLL.as_millis() as u64);
        }
        let Some(supervisor) = self.rt.supervisor.get() else {
            return;
        };
        tracing::debug!(run_id = %self.run.run_id, "execution evicted");
        let _ = supervisor.send_message(SupervisorMsg::Evicted {
            run_id: self.run.run_id.clone(),
            actor: myself.get_id(),
            wake_at_ms: wake.into_iter().min(),
        });
        myself.stop(Some("evicted".into()));
    }

    async fn on_report(
        &mut self,
        report: ActivityReport,
        myself: &ActorRef<ExecMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let Some(p) = self.pending.get_mut(&report.seq) else {
            tracing::info!(run_id = %self.run.run_id, seq = report.seq, attempt = report.attempt, "dropped report of a resolved activity");
            return Ok(());
        };
        if report.attempt != p.attempt {
            tracing::info!(run_id = %self.run.run_id, seq = report.seq, attempt = report.attempt, current = p.attempt,
                "dropped report of a stale attempt");
            return Ok(());
        }
        let (seq, attempt, worker) = (report.seq, report.attempt, report.worker);
        let first = match report.outcome {
            ActivityOutcome::Completed { result } => {
                self.pending.remove(&seq);
                EventKind::ActivityCompleted {
                    seq,
                    attempt,
                    worker,
                    result,
                }
            }
            ActivityOutcome::Failed { failure } => {
                // No retry whose backoff would run past the schedule-to-close deadline, and
                // none once the workflow's cancellation has reached the activity.
                let now = now_ms();
                let retry = p
                    .options
                    .retry
                    .next_delay(attempt, &failure)
                    .filter(|d| {
                        p.deadline_ms
                            .is_none_or(|dl| now + (d.as_millis() as u64) < dl)
                    })
                    .filter(|_| !p.cancel_requested);
                match retry {
                    Some(delay) => {
                        p.attempt += 1;
                        p.due_ms = now + delay.as_millis() as u64;
                        p.dispatched_ms = 0;
                        let next = p.attempt;
                        tracing::warn!(run_id = %self.run.run_id, seq, attempt, kind = %failure.kind, retry_in_ms = delay.as_millis() as u64,
                        "activity attempt failed; retrying");
                        let event = EventKind::ActivityFailed {
                            seq,
                            attempt,
                            worker,
                            failure,
                            retry_in_ms: Some(delay.as_millis() as u64),
                        };
                        self.record(now, vec![event], Vec::new(), myself).await?;
                        self.arm(myself, delay, move || ExecMsg::RetryDue {
                            seq,
                            attempt: next,
                        });
                        return Ok(());
                    }
                    None => {
                        self.pending.remove(&seq);
                        tracing::warn!(run_id = %self.run.run_id, seq, attempt, kind = %failure.kind, "activity failed for good");
                        EventKind::ActivityFailed {
                            seq,
                            attempt,
                            worker,
                            failure,
                            retry_in_ms: None,
                        }
                    }
                }
            }
        };
        self.resolve(first, myself).await
    }

    /// The orchestrator's side of schedule-to-start and heartbeat timeouts: reads what the
    /// worker recorded of the attempt and fails it (as a report from "orchestrator", so the
    /// retry policy applies and a late report of the attempt is dropped) or looks again.
    async fn check_attempt(
        &mut self,
        seq: u32,
        attempt: u32,
        myself: &ActorRef<ExecMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let now = now_ms();
        let Some(p) = self
            .pending
            .get(&seq)
            .filter(|p| p.attempt == attempt && p.due_ms <= now && p.dispatched_ms > 0)
        else {
            return Ok(());
        };
        let (sts, hb, dispatched) = (
            p.options.schedule_to_start_ms,
            p.options.heartbeat_timeout_ms,
            p.dispatched_ms,
        );
        let key = heartbeat_key(&self.run.run_id, seq);
        let entry = match self.rt.streams.liveness.entry(key).await {
            Ok(e) => e,
            Err(e) => {
                tracing::warn!(run_id = %self.run.run_id, seq, error = %e, "liveness not readable; looking again");
                self.arm(myself, Duration::from_secs(1), move || {
                    ExecMsg::AttemptCheck { seq, attempt }
                });
                return Ok(());
            }
        };
        let started_at = entry.and_then(|e| {
            let live: Liveness = codec::decode(&e.value).ok()?;
            (live.attempt == attempt)
                .then(|| (e.created.unix_timestamp_nanos() / 1_000_000).max(0) as u64)
        });
        let (failure, next) = match (started_at, sts, hb) {
            (None, Some(sts), _) if now >= dispatched + sts => (
                Some((
                    "ScheduleToStartTimeout",
                    format!("no worker started the attempt within {sts} ms"),
                    false,
                )),
                None,
            ),
            (None, Some(sts), _) => (None, Some(dispatched + sts - now)),
            // Not started and no schedule-to-start: nothing to enforce until it starts.
            (None, None, Some(hb)) => (None, Some(heartbeat_limit_ms(hb))),
            (Some(at), _, Some(hb)) if now > at + heartbeat_limit_ms(hb) => (
                Some((
                    "HeartbeatTimeout",
                    format!(
                        "the orchestrator heard nothing of the attempt for {} ms (heartbeat timeout {hb} ms)",
                        now - at
                    ),
                    true,
                )),
                None,
            ),
            (Some(at), _, Some(hb)) => (None, Some(at + heartbeat_limit_ms(hb) + 1 - now)),
            _ => (None, None),
        };
        if let Some(wait) = next {
            self.arm(myself, Duration::from_millis(wait.max(1)), move || {
                ExecMsg::AttemptCheck { seq, attempt }
            });
        }
        if let Some((kind, message, retryable)) = failure {
            tracing::warn!(run_id = %self.run.run_id, seq, attempt, kind, "attempt failed by the orchestrator");
            let report = ActivityReport {
                workflow_id: self.run.workflow_id.clone(),
                run_id: self.run.run_id.clone(),
                seq,
                attempt,
                worker: "orchestrator".into(),
                outcome: ActivityOutcome::Failed {
                    failure: Failure {
                        kind: kind.into(),
                        message,
                        retryable,
                    },
                },
            };
            self.on_report(report, myself).await?;
        }
        Ok(())
    }

    /// Journals the cancellation request, hands it to the code, and tells the activities
    /// and children it reaches.
    async fn cancel(
        &mut self,
        reason: String,
        myself: &ActorRef<ExecMsg>,
    ) -> Result<(), ActorProcessingErr> {
        if self.cancel_requested {
            return Ok(());
        }
        self.cancel_requested = true;
        let fx = apply_cancel(&mut self.pending, &mut self.timers, &mut self.children);
        tracing::info!(workflow_id = %self.run.workflow_id, run_id = %self.run.run_id, %reason, "cancellation requested");
        self.resolve(EventKind::WorkflowCancelRequested { reason }, myself)
            .await?;
        self.after_cancel(fx, myself).await;
        Ok(())
    }

    /// The effects of a journaled cancellation request: marks for the workers (read at
    /// the activities' heartbeats), cancellation of child runs, and the resolution of what
    /// waits in backoff. Safe to repeat after a restart.
    async fn after_cancel(&mut self, fx: CancelEffects, myself: &ActorRef<ExecMsg>) {
        mark_cancelled(&self.rt, &self.run.run_id, &fx.activities).await;
        for (seq, attempt) in fx.backoff {
            let _ = myself.send_message(ExecMsg::RetryDue { seq, attempt });
        }
        for seq in fx.unstarted_children {
            let _ = myself.send_message(ExecMsg::ChildStart { seq });
        }
        for run_id in fx.child_runs {
            let rt = self.rt.clone();
            let parent = self.run.workflow_id.clone();
            tokio::spawn(async move {
                let Some(actor) = rt.find_execution(&run_id).await else {
                    return;
                };
                let reason = format!("parent {parent:?} was cancelled");
                let r = ractor::call_t!(
                    actor,
                    |reply| ExecMsg::Cancel {
                        reason: reason.clone(),
                        reply
                    },
                    30_000
                );
                if let Err(e) = r {
                    tracing::warn!(%run_id, error = %e, "child not cancelled");
                }
            });
        }
    }

    /// Closes the run from outside its code.
    async fn terminate(
        &mut self,
        kind: String,
        reason: String,
        myself: &ActorRef<ExecMsg>,
    ) -> Result<(), ActorProcessingErr> {
        if self.run.closed_ms.is_some() {
            return Ok(());
        }
        tracing::warn!(workflow_id = %self.run.workflow_id, run_id = %self.run.run_id, %kind, %reason, "workflow closed from outside");
        let running: Vec<u32> = self.pending.keys().copied().collect();
        let child_runs: Vec<String> = self
            .children
            .values()
            .filter_map(|c| c.run_id.clone())
            .collect();
        self.record(
            now_ms(),
            vec![EventKind::WorkflowTerminated { kind, reason }],
            Vec::new(),
            myself,
        )
        .await?;
        mark_cancelled(&self.rt, &self.run.run_id, &running).await;
        // Children are asked to cancel (Temporal's `request_cancel` parent-close policy).
        let fx = CancelEffects {
            child_runs,
            ..Default::default()
        };
        self.after_cancel(fx, myself).await;
        Ok(())
    }

    /// Starts the current attempt of a child workflow, idempotently: the child's run ID is
    /// derived from this run, the child's seq and the attempt, so a start repeated after a
    /// crash finds the run it created.
    async fn start_child(
        &mut self,
        seq: u32,
        myself: &ActorRef<ExecMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let Some(c) = self.children.get(&seq) else {
            return Ok(());
        };
        if self.run.closed_ms.is_some() {
            return Ok(());
        }
        if let Some(run_id) = c.run_id.clone() {
            return self.check_child(seq, run_id, myself).await;
        }
        let now = now_ms();
        if c.due_ms > now {
            return Ok(());
        }
        let attempt = c.attempt;
        let fail = |failure: Failure| EventKind::ChildWorkflowFailed {
            seq,
            attempt,
            run_id: None,
            failure,
            retry_in_ms: None,
        };
        if c.cancel_requested {
            self.children.remove(&seq);
            return self
                .resolve(fail(cancelled_failure("the child workflow")), myself)
                .await;
        }
        let def = match self.rt.registry.workflow_def(&c.workflow_type) {
            Some(def) => def,
            None => {
                let failure = Failure {
                    kind: "UnknownWorkflowType".into(),
                    message: format!("no workflow type {:?}", c.workflow_type),
                    retryable: false,
                };
                self.children.remove(&seq);
                return self.resolve(fail(failure), myself).await;
            }
        };
        if let Err(e) = def.check_input(&c.input) {
            let failure = Failure {
                kind: "BadInput".into(),
                message: format!("input does not fit workflow {:?}: {e}", c.workflow_type),
                retryable: false,
            };
            self.children.remove(&seq);
            return self.resolve(fail(failure), myself).await;
        }
        let run_id = format!("{}-{seq}-{attempt}", self.run.run_id);
        let record = RunRecord {
            workflow_id: c.workflow_id.clone(),
            run_id: run_id.clone(),
            workflow_type: c.workflow_type.clone(),
            status: RunStatus::Running,
            started_ms: now,
            closed_ms: None,
            last_event_id: 1,
            parent: Some(ParentRef {
                workflow_id: self.run.workflow_id.clone(),
                run_id: self.run.run_id.clone(),
                seq,
            }),
            deadline_ms: c.options.execution_timeout_ms.map(|t| now + t),
        };
        let started = Event {
            id: 1,
            at_ms: now,
            kind: EventKind::WorkflowStarted {
                workflow_type: c.workflow_type.clone(),
                workflow_id: c.workflow_id.clone(),
                input: c.input.clone(),
            },
        };
        let policies = IdPolicies {
            reuse: IdReusePolicy::AllowDuplicate,
            conflict: IdConflictPolicy::Fail,
        };
        let outcome = self
            .rt
            .journal
            .start_with(record.clone(), vec![started.clone()], policies)
            .await?;
        match outcome {
            StartOutcome::Started => {
                tracing::info!(parent = %self.run.workflow_id, workflow_id = %record.workflow_id, %run_id, "child workflow started");
                self.rt.spawn_run(record, vec![started]);
            }
            StartOutcome::Duplicate(r) | StartOutcome::AlreadyRunning(r) if r.run_id == run_id => {
                // Created before a crash: carry on with it.
            }
            StartOutcome::Duplicate(r) | StartOutcome::AlreadyRunning(r) => {
                let failure = Failure {
                    kind: "WorkflowAlreadyStarted".into(),
                    message: format!(
                        "workflow {:?} is already running (run {})",
                        r.workflow_id, r.run_id
                    ),
                    retryable: false,
                };
                self.children.remove(&seq);
                return self.resolve(fail(failure), myself).await;
            }
        }
        if let Some(c) = self.children.get_mut(&seq) {
            c.run_id = Some(run_id.clone());
        }
        self.record(
            now_ms(),
            vec![EventKind::ChildWorkflowStarted {
                seq,
                attempt,
                run_id: run_id.clone(),
            }],
            Vec::new(),
            myself,
        )
        .await?;
        self.check_child(seq, run_id, myself).await
    }

    /// Applies a child's close if its run has closed; otherwise makes sure a poll is armed.
    async fn check_child(
        &mut self,
        seq: u32,
        run_id: String,
        myself: &ActorRef<ExecMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let closed = match self.rt.journal.run(&run_id)? {
            Some(r) if r.status != RunStatus::Running => self
                .rt
                .journal
                .history(&run_id)?
                .last()
                .and_then(|e| ChildOutcome::of_close(&e.kind)),
            _ => None,
        };
        match closed {
            Some(outcome) => self.on_child_closed(seq, run_id, outcome, myself).await,
            None => {
                if let Some(c) = self.children.get_mut(&seq)
                    && !c.polling
                {
                    c.polling = true;
                    self.arm(myself, CHILD_POLL, move || ExecMsg::ChildPoll { seq });
                }
                Ok(())
            }
        }
    }

    async fn on_child_closed(
        &mut self,
        seq: u32,
        run_id: String,
        outcome: ChildOutcome,
        myself: &ActorRef<ExecMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let Some(c) = self.children.get_mut(&seq) else {
            return Ok(());
        };
        if c.run_id.as_deref() != Some(run_id.as_str()) {
            return Ok(());
        }
        match outcome {
            ChildOutcome::Completed(result) => {
                self.children.remove(&seq);
                self.resolve(
                    EventKind::ChildWorkflowCompleted {
                        seq,
                        run_id,
                        result,
                    },
                    myself,
                )
                .await
            }
            ChildOutcome::ContinuedAs(next) => {
                c.run_id = Some(next.clone());
                let attempt = c.attempt;
                self.record(
                    now_ms(),
                    vec![EventKind::ChildWorkflowStarted {
                        seq,
                        attempt,
                        run_id: next.clone(),
                    }],
                    Vec::new(),
                    myself,
                )
                .await?;
                myself.send_message(ExecMsg::ChildStart { seq })?;
                Ok(())
            }
            ChildOutcome::Failed(failure) => {
                // A child's failure is retried by its policy whatever the failure says of
                // itself (a workflow's errors are final for the workflow, not for the
                // parent's retry), except cancellation and termination.
                let mut as_retryable = failure.clone();
                as_retryable.retryable =
                    !matches!(failure.kind.as_str(), "Cancelled" | "Terminated");
                let retry = match (&c.options.retry, c.cancel_requested) {
                    (Some(policy), false) => policy.next_delay(c.attempt, &as_retryable),
                    _ => None,
                };
                let attempt = c.attempt;
                match retry {
                    Some(delay) => {
                        let now = now_ms();
                        c.attempt += 1;
                        c.run_id = None;
                        c.due_ms = now + delay.as_millis() as u64;
                        tracing::warn!(parent = %self.run.workflow_id, seq, attempt, kind = %failure.kind, "child workflow failed; retrying");
                        self.record(
                            now,
                            vec![EventKind::ChildWorkflowFailed {
                                seq,
                                attempt,
                                run_id: Some(run_id),
                                failure,
                                retry_in_ms: Some(delay.as_millis() as u64),
                            }],
                            Vec::new(),
                            myself,
                        )
                        .await?;
                        self.arm(myself, delay, move || ExecMsg::ChildStart { seq });
                        Ok(())
                    }
                    None => {
                        self.children.remove(&seq);
                        self.resolve(
                            EventKind::ChildWorkflowFailed {
                                seq,
                                attempt,
                                run_id: Some(run_id),
                                failure,
                                retry_in_ms: None,
                            },
                            myself,
                        )
                        .await
                    }
                }
            }
        }
    }

    /// Delivers an external signal in the background; the outcome comes back as
    /// `ExternalSignalDone`. The request ID makes a repeated delivery count once.
    fn send_external_signal(&self, seq: u32, myself: &ActorRef<ExecMsg>) {
        let Some(out) = self.signals_out.get(&seq) else {
            return;
        };
        let rt = self.rt.clone();
        let me = myself.clone();
        let (workflow_id, name, input) =
            (out.workflow_id.clone(), out.name.clone(), out.input.clone());
        let request_id = format!("{}:{seq}", self.run.run_id);
        tokio::spawn(async move {
            let r = deliver(&rt, &workflow_id, |reply| ExecMsg::Signal {
                name: name.clone(),
                input: input.clone(),
                request_id: Some(request_id.clone()),
                reply,
            })
            .await;
            let failure = match r {
                Ok(_) => None,
                Err(DeliveryError::Unavailable(m)) => {
                    // Try again later rather than fail the workflow on a passing fault.
                    tracing::warn!(%workflow_id, error = %m, "external signal not delivered yet; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    let _ = me.send_message(ExecMsg::ExternalSignalDone {
                        seq,
                        failure: Some(DeliveryError::Unavailable(m).failure()),
                    });
                    return;
                }
                Err(e) => Some(e.failure()),
            };
            let _ = me.send_message(ExecMsg::ExternalSignalDone { seq, failure });
        });
    }

    /// Hands an event that resolves something (an activity's outcome, a timer's firing) to
    /// the workflow, runs it on, and journals the event with whatever the code did next, in
    /// one append. The event carries one timestamp, seen alike live and in replay.
    async fn resolve(
        &mut self,
        kind: EventKind,
        myself: &ActorRef<ExecMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let at_ms = now_ms();
        let event = Event { id: 0, at_ms, kind };
        self.exec.apply(&event)?;
        let commands = match self.exec.advance() {
            Ok(c) => c,
            Err(e) => {
                tracing::error!(run_id = %self.run.run_id, error = %e, "execution blocked");
                self.blocked = Some(e.to_string());
                return Err(e.into());
            }
        };
        self.record(at_ms, vec![event.kind], commands, myself).await
    }

    /// Journals `kinds` then the events of `commands`, then performs their effects.
    async fn record(
        &mut self,
        at_ms: u64,
        kinds: Vec<EventKind>,
        commands: Vec<Command>,
        myself: &ActorRef<ExecMsg>,
    ) -> Result<(), ActorProcessingErr> {
        if self.run.closed_ms.is_some() {
            // Nothing is recorded after the close (e.g. a child started by code that
            // returned without waiting for it is not started).
            tracing::debug!(run_id = %self.run.run_id, "run closed; nothing more recorded");
            return Ok(());
        }
        let given = kinds.len();
        let mut kinds = kinds;
        let mut to_dispatch = Vec::new();
        let mut timers = Vec::new();
        let mut to_start = Vec::new();
        let mut to_signal = Vec::new();
        let mut continue_as_new = None;
        for command in commands {
            match command {
                Command::ScheduleActivity {
                    seq,
                    activity,
                    input,
                    options,
                } => {
                    self.pending
                        .insert(seq, Pending::scheduled(&activity, &input, &options, at_ms));
                    to_dispatch.push(seq);
                    kinds.push(EventKind::ActivityScheduled {
                        seq,
                        activity,
                        input,
                        options,
                    });
                }
                Command::StartTimer { seq, duration_ms } => {
                    let fire_at_ms = at_ms + duration_ms;
                    self.timers.insert(seq, fire_at_ms);
                    timers.push((seq, duration_ms));
                    kinds.push(EventKind::TimerStarted { seq, fire_at_ms });
                }
                Command::CancelTimer { seq } => {
                    self.timers.remove(&seq);
                    kinds.push(EventKind::TimerCancelled { seq });
                }
                Command::RecordMarker { patch } => {
                    kinds.push(EventKind::MarkerRecorded { patch });
                }
                Command::StartChild {
                    seq,
                    workflow_type,
                    workflow_id,
                    input,
                    options,
                } => {
                    self.children.insert(
                        seq,
                        Child::scheduled(&workflow_type, &workflow_id, &input, &options),
                    );
                    to_start.push(seq);
                    kinds.push(EventKind::ChildWorkflowScheduled {
                        seq,
                        workflow_type,
                        workflow_id,
                        input,
                        options,
                    });
                }
                Command::SignalExternal {
                    seq,
                    workflow_id,
                    name,
                    input,
                } => {
                    self.signals_out.insert(
                        seq,
                        OutSignal {
                            workflow_id: workflow_id.clone(),
                            name: name.clone(),
                            input: input.clone(),
                        },
                    );
                    to_signal.push(seq);
                    kinds.push(EventKind::ExternalSignalScheduled {
                        seq,
                        workflow_id,
                        name,
                        input,
                    });
                }
                Command::CompleteWorkflow { output } => {
                    kinds.push(EventKind::WorkflowCompleted { output });
                }
                Command::FailWorkflow { failure } => {
                    kinds.push(EventKind::WorkflowFailed { failure });
                }
                Command::ContinueAsNew { input } => {
                    let new_run_id = uuid::Uuid::new_v4().simple().to_string();
                    continue_as_new = Some((new_run_id.clone(), input.clone()));
                    kinds.push(EventKind::WorkflowContinuedAsNew { new_run_id, input });
                }
            }
        }
        if kinds.is_empty() && self.unstarted.is_none() {
            return Ok(());
        }
        let events: Vec<Event> = kinds
            .into_iter()
            .enumerate()
            .map(|(i, kind)| Event {
                id: self.next_event_id + i as u32,
                at_ms,
                kind,
            })
            .collect();
        let close = events.iter().find(|e| e.kind.is_close()).cloned();
        // Continue-as-new: the next run is created in the same transaction, with the
        // signals this run received and did not consume.
        let successor = continue_as_new.map(|(new_run_id, input)| {
            let mut first = vec![Event {
                id: 1,
                at_ms,
                kind: EventKind::WorkflowStarted {
                    workflow_type: self.run.workflow_type.clone(),
                    workflow_id: self.run.workflow_id.clone(),
                    input,
                },
            }];
            for (name, input) in self.exec.unconsumed_signals() {
                first.push(Event {
                    id: first.len() as u32 + 1,
                    at_ms,
                    kind: EventKind::SignalReceived {
                        name,
                        input,
                        request_id: None,
                    },
                });
            }
            let record = RunRecord {
                workflow_id: self.run.workflow_id.clone(),
                run_id: new_run_id,
                workflow_type: self.run.workflow_type.clone(),
                status: RunStatus::Running,
                started_ms: at_ms,
                closed_ms: None,
                last_event_id: first.len() as u32,
                parent: self.run.parent.clone(),
                deadline_ms: self.run.deadline_ms,
            };
            (record, first)
        });
        if !self.commit(&events, successor.clone(), myself).await? {
            return Ok(());
        }
        self.next_event_id += events.len() as u32;
        self.run.last_event_id = self.next_event_id - 1;
        if close.is_some() {
            self.run.closed_ms = Some(at_ms);
        }
        for e in &events[given..] {
            if !e.kind.is_close() {
                self.exec.apply(e)?;
            }
        }
        for (seq, duration_ms) in timers {
            self.arm(myself, Duration::from_millis(duration_ms), move || {
                ExecMsg::TimerDue { seq }
            });
        }
        for &seq in &to_dispatch {
            if let Some(d) = self
                .pending
                .get(&seq)
                .and_then(|p| p.options.schedule_to_close_ms)
            {
                self.arm(myself, Duration::from_millis(d), move || {
                    ExecMsg::Deadline { seq }
                });
            }
        }
        self.dispatch(&to_dispatch, false, myself).await?;
        // Children start before this step's signals leave, so a signal the code sends a
        // child it has just started finds it.
        for seq in to_start {
            Box::pin(self.start_child(seq, myself)).await?;
        }
        for seq in to_signal {
            self.send_external_signal(seq, myself);
        }
        if let Some(close) = close {
            tracing::info!(workflow_id = %self.run.workflow_id, run_id = %self.run.run_id,
                outcome = close.kind.name(), "workflow closed");
            stage!("workflow.closed", workflow = %self.run.workflow_id, run = %self.run.run_id);
            if let Some((record, first)) = successor {
                tracing::info!(workflow_id = %record.workflow_id, run_id = %record.run_id, "continued as new");
                self.rt.spawn_run(record, first);
            }
            if let (Some(parent), Some(outcome)) =
                (self.run.parent.clone(), ChildOutcome::of_close(&close.kind))
            {
                let rt = self.rt.clone();
                let run_id = self.run.run_id.clone();
                tokio::spawn(async move {
                    if let Some(actor) = rt.find_execution(&parent.run_id).await {
                        let _ = actor.send_message(ExecMsg::ChildClosed {
                            seq: parent.seq,
                            run_id,
                            outcome,
                        });
                    }
                });
            }
            let _ = self.rt.closed.send(self.run.workflow_id.clone());
            myself.stop(Some("closed".into()));
        }
        Ok(())
    }

    /// Makes `events` durable: appends them to the run, or, for a run the journal does not
    /// hold yet, creates it with its first events and these in one commit (unless these
    /// close the run at once: then the start is committed first, on its own, as the
    /// journal's start takes no close). Returns false when the start was a duplicate: the
    /// execution then stops, having let nothing out.
    async fn commit(
        &mut self,
        events: &[Event],
        successor: Option<(RunRecord, Vec<Event>)>,
        myself: &ActorRef<ExecMsg>,
    ) -> Result<bool, ActorProcessingErr> {
        if let Some((first, gate)) = self.unstarted.take() {
            let fuse = successor.is_none() && !events.iter().any(|e| e.kind.is_close());
            let mut all = first;
            if fuse {
                all.extend_from_slice(events);
            }
            let mut record = self.run.clone();
            record.last_event_id = all.len() as u32;
            let outcome = self.rt.journal.start_with(record, all, gate.policies).await;
            let failed = outcome.as_ref().err().cloned();
            let started = matches!(outcome, Ok(StartOutcome::Started));
            let _ = gate.reply.send(outcome);
            if let Some(e) = failed {
                // The supervisor restarts the run from the journal if the commit held.
                return Err(e.into());
            }
            if !started {
                self.discarded = true;
                myself.stop(Some("duplicate start".into()));
                return Ok(false);
            }
            tracing::info!(workflow_id = %self.run.workflow_id, run_id = %self.run.run_id, "workflow started");
            stage!("start.committed", workflow = %self.run.workflow_id, run = %self.run.run_id);
            if fuse || events.is_empty() {
                return Ok(true);
            }
        }
        stage!("journal.append", run = %self.run.run_id, events = events.len());
        self.rt
            .journal
            .append_with(&self.run.run_id, events.to_vec(), successor)
            .await?;
        stage!("journal.appended", run = %self.run.run_id);
        Ok(true)
    }

    /// Publishes the current attempt of each activity. With `check_queued`, an attempt whose
    /// task JetStream still holds is left alone (after a restart).
    async fn dispatch(
        &mut self,
        seqs: &[u32],
        check_queued: bool,
        myself: &ActorRef<ExecMsg>,
    ) -> Result<(), ActorProcessingErr> {
        let mut acks = Vec::with_capacity(seqs.len());
        let now = now_ms();
        for seq in seqs {
            let Some(p) = self.pending.get_mut(seq) else {
                continue;
            };
            // Schedule-to-start and heartbeat timeouts are watched from now (after a
            // restart too: never earlier than they were due).
            p.dispatched_ms = now;
            if let Some(first) = first_check(&p.options) {
                let (seq, attempt) = (*seq, p.attempt);
                self.arm(myself, first, move || ExecMsg::AttemptCheck {
                    seq,
                    attempt,
                });
            }
            let p = &self.pending[seq];
            let task_subject =
                subject::task(&p.options.task_queue, &self.run.run_id, *seq, p.attempt);
            if check_queued && self.rt.streams.task_is_queued(&task_subject).await? {
                continue;
            }
            let task = ActivityTask {
                workflow_id: self.run.workflow_id.clone(),
                run_id: self.run.run_id.clone(),
                seq: *seq,
                attempt: p.attempt,
                activity: p.activity.clone(),
                queue: p.options.task_queue.clone(),
                input: p.input.clone(),
                start_to_close_ms: p.options.start_to_close_ms,
                heartbeat_timeout_ms: p.options.heartbeat_timeout_ms,
                liveness: p.options.schedule_to_start_ms.is_some(),
            };
            let mut headers = HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                task_msg_id(&self.run.run_id, *seq, p.attempt).as_str(),
            );
            let bytes = codec::encode(&task)?;
            tracing::debug!(run_id = %self.run.run_id, seq, attempt = p.attempt, activity = %p.activity, "dispatching task");
            stage!("task.dispatch", run = %self.run.run_id, seq = *seq, attempt = p.attempt, activity = %p.activity);
            let publish =
                self.rt
                    .streams
                    .js
                    .publish_with_headers(task_subject, headers, bytes.into());
            acks.push(baton_transport::faults::call("task publish", publish).await?);
        }
        for ack in acks {
            baton_transport::faults::call("task publish ack", ack).await?;
        }
        Ok(())
    }
}

/// Spawns and restarts execution actors.
pub(crate) struct Supervisor;

/// Messages of the supervisor.
pub(crate) enum SupervisorMsg {
    /// Start an execution actor.
    Spawn(ExecArgs),
    /// Restart a failed execution from its journal.
    Restart { run_id: String },
    /// An execution left memory; bring it back at `wake_at_ms` if nothing does earlier.
    Evicted {
        run_id: String,
        actor: ActorId,
        wake_at_ms: Option<u64>,
    },
    /// Bring an evicted execution back (a message for it, or its wake-up time).
    Rehydrate { run_id: String },
    /// Check the cache's size again (it was over).
    EnforceCache,
    /// Have every execution in memory republish the tasks of its in-flight attempts that
    /// the task queue lacks (the end of recovery).
    RedispatchAll,
    /// Answered once every message sent before it was handled (recovery keeps its pace).
    Barrier(tokio::sync::oneshot::Sender<()>),
}

pub(crate) struct SupervisorState {
    rt: Arc<Runtime>,
    by_actor: HashMap<ActorId, String>,
    /// Failures in a row of each run's execution (see [`count_failure`]).
    restarts: HashMap<String, (u32, std::time::Instant)>,
    /// Run IDs in the order their executions came into memory (some since gone): the
    /// candidates for eviction when the cache is over its size.
    resident: std::collections::VecDeque<String>,
    /// An `EnforceCache` is on its way.
    enforce_armed: bool,
}

/// Executions asked to leave per spawn while the cache is over its size (each busy one
/// goes back to the end of the line).
const EVICTIONS_PER_SPAWN: usize = 4;

/// Keeps the executions in memory at most `max_cached`: asks the longest-resident ones to
/// leave if they only wait (a busy one stays and goes to the back of the line); while the
/// cache is still over its size, looks again shortly.
fn enforce_cache_size(myself: &ActorRef<SupervisorMsg>, state: &mut SupervisorState) {
    let executions = state.rt.executions.lock().expect("executions lock");
    let over = executions.len().saturating_sub(state.rt.max_cached);
    if over > 0 && !state.enforce_armed {
        state.enforce_armed = true;
        myself.send_after(Duration::from_millis(500), || SupervisorMsg::EnforceCache);
    }
    let mut asked = 0;
    while asked < over.min(EVICTIONS_PER_SPAWN) {
        let Some(run_id) = state.resident.pop_front() else {
            break;
        };
        if let Some(actor) = executions.get(&run_id) {
            let _ = actor.send_message(ExecMsg::EvictNow);
            state.resident.push_back(run_id);
            asked += 1;
        }
    }
    // Entries of runs that left memory by themselves are dropped now and then.
    if state.resident.len() > 2 * executions.len() + 1024 {
        state.resident.retain(|id| executions.contains_key(id));
    }
}

/// Restarts after which a failing execution is reported as an error at each further one.
const MAX_RESTARTS: u32 = 10;

/// How long before the `n`-th restart of a failing execution: doubling from 200 ms, capped
/// at 30 s, never giving up (a full disk or a lost NATS connection ends; the run goes on).
/// A run's failures in a row, this one counted: the count starts again after
/// [`RESTART_COUNT_RESET`] without one, so a run that failed in a past incident (a disk
/// full for a while) is restarted promptly in the next, not after the longest backoff.
fn count_failure(restarts: &mut HashMap<String, (u32, std::time::Instant)>, run_id: &str) -> u32 {
    let now = std::time::Instant::now();
    let (n, last) = restarts.entry(run_id.to_string()).or_insert((0, now));
    if now.duration_since(*last) > RESTART_COUNT_RESET {
        *n = 0;
    }
    *last = now;
    *n += 1;
    *n
}

/// How long without a failure before a run's failure count starts again.
const RESTART_COUNT_RESET: Duration = Duration::from_secs(60);

fn restart_delay(n: u32) -> Duration {
    Duration::from_millis((100u64 << n.min(9)).min(30_000))
}

/// How long before the `n`-th restart of a failing execution, given the journal's state:
/// while the journal fails its writes (a full disk, the mirror unreachable) the failure is
/// not the run's, and it is retried at least every [`JOURNAL_FAILING_RETRY`], so that it
/// goes on soon after the journal does instead of waiting out a backoff grown during the
/// incident.
fn restart_backoff(rt: &Runtime, n: u32) -> Duration {
    let backoff = restart_delay(n);
    if rt.journal.failing() {
        backoff.min(JOURNAL_FAILING_RETRY)
    } else {
        backoff
    }
}

/// The longest restart backoff while the journal fails its writes.
const JOURNAL_FAILING_RETRY: Duration = Duration::from_secs(1);

impl Actor for Supervisor {
    type Msg = SupervisorMsg;
    type State = SupervisorState;
    type Arguments = Arc<Runtime>;

    async fn pre_start(
        &self,
        _: ActorRef<SupervisorMsg>,
        rt: Arc<Runtime>,
    ) -> Result<SupervisorState, ActorProcessingErr> {
        Ok(SupervisorState {
            rt,
            by_actor: HashMap::new(),
            restarts: HashMap::new(),
            resident: Default::default(),
            enforce_armed: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Spawn(args) => spawn(&myself, state, args).await,
            SupervisorMsg::Barrier(reply) => {
                let _ = reply.send(());
                Ok(())
            }
            SupervisorMsg::EnforceCache => {
                state.enforce_armed = false;
                enforce_cache_size(&myself, state);
                Ok(())
            }
            SupervisorMsg::RedispatchAll => {
                let executions: Vec<ActorRef<ExecMsg>> = state
                    .rt
                    .executions
                    .lock()
                    .expect("executions lock")
                    .values()
                    .cloned()
                    .collect();
                for e in executions {
                    let _ = e.send_message(ExecMsg::Redispatch);
                }
                tracing::info!("recovery complete");
                Ok(())
            }
            SupervisorMsg::Evicted {
                run_id,
                actor,
                wake_at_ms,
            } => {
                // From now on the run is not in memory: messages for it rehydrate it.
                {
                    let mut executions = state.rt.executions.lock().expect("executions lock");
                    if executions.get(&run_id).is_some_and(|a| a.get_id() == actor) {
                        executions.remove(&run_id);
                    }
                }
                if let Some(at) = wake_at_ms {
                    let wait = Duration::from_millis(at.saturating_sub(now_ms()));
                    myself.send_after(wait, move || SupervisorMsg::Rehydrate { run_id });
                }
                Ok(())
            }
            SupervisorMsg::Rehydrate { run_id } => {
                if state
                    .rt
                    .executions
                    .lock()
                    .expect("executions lock")
                    .contains_key(&run_id)
                {
                    return Ok(());
                }
                // After a failed write the two stores may differ (the mirror ahead of a
                // failed commit, or redb ahead of a failed publish): they are reconciled
                // first, as a restart does: a report answered quickly can bring a run of
                // that write back before its restart's backoff is over.
                if state.rt.journal.unreconciled()
                    && let Err(e) = state.rt.journal.reconcile_mirror().await
                {
                    tracing::warn!(%run_id, error = %e, "mirror not reconciled yet; rehydrating later");
                    myself.send_after(Duration::from_secs(1), move || SupervisorMsg::Rehydrate {
                        run_id,
                    });
                    return Ok(());
                }
                let (run, history) = match read_open_run(&state.rt, &run_id) {
                    Ok(Some(x)) => x,
                    Ok(None) => {
                        announce_closed(&state.rt, &run_id);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(%run_id, error = %e, "journal unreadable; rehydrating later");
                        myself.send_after(Duration::from_secs(1), move || {
                            SupervisorMsg::Rehydrate { run_id }
                        });
                        return Ok(());
                    }
                };
                let args = ExecArgs {
                    rt: state.rt.clone(),
                    run,
                    history,
                    mode: StartMode::Rehydrating,
                    start: None,
                };
                state
                    .rt
                    .rehydrations
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                spawn(&myself, state, args).await
            }
            SupervisorMsg::Restart { run_id } => {
                // Already back (a message rehydrated it during the restart's backoff): its
                // stores were reconciled then; never reconcile under a live writer. It
                // only checks its in-flight tasks.
                let live = state
                    .rt
                    .executions
                    .lock()
                    .expect("executions lock")
                    .get(&run_id)
                    .cloned();
                if let Some(actor) = live {
                    let _ = actor.send_message(ExecMsg::Redispatch);
                    return Ok(());
                }
                // The journal may be failing (a full disk): retry later, never fail here.
                let retry = |myself: &ActorRef<SupervisorMsg>, run_id: String| {
                    myself.send_after(Duration::from_secs(1), move || SupervisorMsg::Restart {
                        run_id,
                    });
                };
                // Closed or open, the mirror first: a commit that failed may have held (its
                // close included), leaving redb ahead of the mirror.
                if let Err(e) = state.rt.journal.reconcile_mirror().await {
                    tracing::warn!(%run_id, error = %e, "mirror not repaired yet; retrying the restart");
                    retry(&myself, run_id);
                    return Ok(());
                }
                let (run, history) = match read_open_run(&state.rt, &run_id) {
                    Ok(Some(x)) => x,
                    Ok(None) => {
                        announce_closed(&state.rt, &run_id);
                        return Ok(());
                    }
                    Err(e) => {
                        tracing::warn!(%run_id, error = %e, "journal unreadable; retrying the restart");
                        retry(&myself, run_id);
                        return Ok(());
                    }
                };
                let args = ExecArgs {
                    rt: state.rt.clone(),
                    run,
                    history,
                    mode: StartMode::Recovering,
                    start: None,
                };
                spawn(&myself, state, args).await?;
                if let Some(actor) = state
                    .rt
                    .executions
                    .lock()
                    .expect("executions lock")
                    .get(&run_id)
                {
                    let _ = actor.send_message(ExecMsg::Redispatch);
                }
                Ok(())
            }
        }
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        state: &mut SupervisorState,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => {
                forget(state, &cell);
            }
            SupervisionEvent::ActorFailed(cell, error) => {
                if let Some(run_id) = forget(state, &cell) {
                    let n = count_failure(&mut state.restarts, &run_id);
                    let backoff = restart_backoff(&state.rt, n);
                    if n > MAX_RESTARTS {
                        tracing::error!(%run_id, %error, restarts = n, restart_in_ms = backoff.as_millis() as u64, "execution keeps failing; restarting from its journal");
                    } else {
                        tracing::warn!(%run_id, %error, restart_in_ms = backoff.as_millis() as u64, "execution failed; restarting from its journal");
                    }
                    myself.send_after(backoff, move || SupervisorMsg::Restart { run_id });
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// Wakes whoever waits for the result of `run_id` if it is closed: perhaps only now, by
/// a close the mirror held and redb adopted while its execution was down.
fn announce_closed(rt: &Runtime, run_id: &str) {
    if let Ok(Some(run)) = rt.journal.run(run_id) {
        let _ = rt.closed.send(run.workflow_id);
    }
}

/// A run and its history, if it is open.
pub(crate) fn read_open_run(
    rt: &Runtime,
    run_id: &str,
) -> Result<Option<(RunRecord, Vec<Event>)>, crate::journal::Error> {
    match rt.journal.run(run_id)? {
        Some(run) if run.closed_ms.is_none() => {
            let history = rt.journal.history(run_id)?;
            Ok(Some((run, history)))
        }
        _ => Ok(None),
    }
}

fn forget(state: &mut SupervisorState, cell: &ActorCell) -> Option<String> {
    let run_id = state.by_actor.remove(&cell.get_id())?;
    let mut executions = state.rt.executions.lock().expect("executions lock");
    if executions
        .get(&run_id)
        .is_some_and(|a| a.get_id() == cell.get_id())
    {
        executions.remove(&run_id);
    }
    Some(run_id)
}

async fn spawn(
    myself: &ActorRef<SupervisorMsg>,
    state: &mut SupervisorState,
    args: ExecArgs,
) -> Result<(), ActorProcessingErr> {
    let run_id = args.run.run_id.clone();
    // One actor per run: a second start of a live run (a rehydration racing a recovery)
    // is dropped.
    if state
        .rt
        .executions
        .lock()
        .expect("executions lock")
        .contains_key(&run_id)
    {
        return Ok(());
    }
    match Actor::spawn_linked(None, ExecutionActor, args, myself.get_cell()).await {
        Ok((actor, _)) => {
            state.by_actor.insert(actor.get_id(), run_id.clone());
            state
                .rt
                .executions
                .lock()
                .expect("executions lock")
                .insert(run_id.clone(), actor);
            state.resident.push_back(run_id);
            enforce_cache_size(myself, state);
        }
        Err(e) => {
            let n = count_failure(&mut state.restarts, &run_id);
            let backoff = restart_backoff(&state.rt, n);
            if n > MAX_RESTARTS {
                tracing::error!(%run_id, error = %e, restarts = n, "execution does not start; retrying");
            } else {
                tracing::warn!(%run_id, error = %e, "execution did not start; retrying");
            }
            myself.send_after(backoff, move || SupervisorMsg::Restart { run_id });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failures_count_in_a_row_and_start_again_after_a_quiet_minute() {
        let mut restarts = HashMap::new();
        assert_eq!(count_failure(&mut restarts, "r"), 1);
        assert_eq!(count_failure(&mut restarts, "r"), 2);
        assert_eq!(count_failure(&mut restarts, "other"), 1);
        assert!(restart_delay(2) > restart_delay(1));
        // The last failure long ago: the next one is the first of a new incident.
        let long_ago = std::time::Instant::now()
            .checked_sub(RESTART_COUNT_RESET + Duration::from_secs(1))
            .expect("the clock is past a minute");
        restarts.insert("r".into(), (7, long_ago));
        assert_eq!(count_failure(&mut restarts, "r"), 1);
        assert_eq!(restart_delay(30), Duration::from_secs(30), "capped");
    }
}
