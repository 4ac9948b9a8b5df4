//! The deterministic replay core: an [`Execution`] runs a workflow function against its
//! journal. It does no I/O: feed it events with [`Execution::apply`], run the code with
//! [`Execution::advance`], and get back the [`Command`]s the journal does not hold yet.
//!
//! The same two calls serve a live execution (apply one new event, advance) and a rebuilt
//! one (apply the whole history, advance once): recorded results are handed to the code
//! without running any activity again, and a command that differs from the journal is a
//! [`Nondeterminism`] error.

use std::{
    collections::{BTreeMap, BTreeSet},
    future::Future,
    pin::Pin,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, Wake, Waker},
};

use baton_transport::{Payload, wire::Failure};

use crate::{
    context::{CONTINUE_AS_NEW, Command, WorkflowContext},
    error::{ActivityError, Nondeterminism, WorkflowError},
    history::{Event, EventKind},
    options::CancellationType,
    registry::{Policies, WorkflowFn},
};

/// The name a timer takes in the determinism check (not a valid activity name).
const TIMER: &str = "@timer";
/// The name an external signal takes in the determinism check.
const SIGNAL: &str = "@signal";

/// What the determinism check compares between a command and the event that recorded it.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Key {
    /// Something scheduled under a sequence number: an activity (by name), a timer, a child
    /// workflow (`@child:<type>`), an external signal.
    Seq(u32, String),
    /// A timer cancelled.
    CancelTimer(u32),
    /// A patch marker.
    Marker(String),
}

fn command_key(c: &Command) -> Option<Key> {
    Some(match c {
        Command::ScheduleActivity { seq, activity, .. } => Key::Seq(*seq, activity.clone()),
        Command::StartTimer { seq, .. } => Key::Seq(*seq, TIMER.into()),
        Command::StartChild {
            seq, workflow_type, ..
        } => Key::Seq(*seq, format!("@child:{workflow_type}")),
        Command::SignalExternal { seq, .. } => Key::Seq(*seq, SIGNAL.into()),
        Command::CancelTimer { seq } => Key::CancelTimer(*seq),
        Command::RecordMarker { patch } => Key::Marker(patch.clone()),
        Command::CompleteWorkflow { .. }
        | Command::FailWorkflow { .. }
        | Command::ContinueAsNew { .. } => return None,
    })
}

fn event_key(k: &EventKind) -> Option<Key> {
    Some(match k {
        EventKind::ActivityScheduled { seq, activity, .. } => Key::Seq(*seq, activity.clone()),
        EventKind::TimerStarted { seq, .. } => Key::Seq(*seq, TIMER.into()),
        EventKind::ChildWorkflowScheduled {
            seq, workflow_type, ..
        } => Key::Seq(*seq, format!("@child:{workflow_type}")),
        EventKind::ExternalSignalScheduled { seq, .. } => Key::Seq(*seq, SIGNAL.into()),
        EventKind::TimerCancelled { seq } => Key::CancelTimer(*seq),
        EventKind::MarkerRecorded { patch } => Key::Marker(patch.clone()),
        _ => return None,
    })
}

fn describe(c: &Command) -> String {
    match c {
        Command::ScheduleActivity { seq, activity, .. } => {
            format!("schedules seq {seq} {activity:?}")
        }
        Command::StartTimer { seq, .. } => format!("starts a timer at seq {seq}"),
        Command::CancelTimer { seq } => format!("cancels the timer of seq {seq}"),
        Command::RecordMarker { patch } => format!("records patch {patch:?}"),
        Command::StartChild {
            seq, workflow_type, ..
        } => format!("starts child workflow {workflow_type:?} at seq {seq}"),
        Command::SignalExternal {
            seq, workflow_id, ..
        } => format!("signals {workflow_id:?} at seq {seq}"),
        Command::CompleteWorkflow { .. } => "returns".into(),
        Command::FailWorkflow { .. } => "fails".into(),
        Command::ContinueAsNew { .. } => "continues as new".into(),
    }
}

/// Whether an event hands the code something new (so the code runs on after it).
fn wakes(kind: &EventKind) -> bool {
    matches!(
        kind,
        EventKind::WorkflowStarted { .. }
            | EventKind::ActivityCompleted { .. }
            | EventKind::ActivityFailed {
                retry_in_ms: None,
                ..
            }
            | EventKind::TimerFired { .. }
            | EventKind::SignalReceived { .. }
            | EventKind::WorkflowCancelRequested { .. }
            | EventKind::ChildWorkflowCompleted { .. }
            | EventKind::ChildWorkflowFailed {
                retry_in_ms: None,
                ..
            }
            | EventKind::ExternalSignalResolved { .. }
    )
}

type WorkflowFuture = Pin<Box<dyn Future<Output = Result<Payload, WorkflowError>> + Send>>;

struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

/// Something the code waits on that the run's cancellation may resolve.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Open {
    Timer,
    Cancellable(CancellationType),
    Uncancellable,
}

/// One workflow execution's state, rebuilt from its journal.
pub struct Execution {
    ctx: WorkflowContext,
    run: WorkflowFn,
    future: Option<WorkflowFuture>,
    woken: Arc<Flag>,
    waker: Waker,
    /// What the journal says was scheduled: seq -> name (activity, `@timer`, ...).
    recorded: BTreeMap<u32, String>,
    /// Timers the journal says were cancelled.
    cancelled_timers: BTreeSet<u32>,
    /// Patch markers the journal holds.
    recorded_markers: BTreeSet<String>,
    /// Scheduled and not resolved yet.
    open: BTreeMap<u32, Open>,
    /// How many seqs the code has used so far.
    emitted: u32,
    /// The journal holds a close event.
    recorded_close: bool,
    /// The journal says the run was closed from outside (terminated, timed out).
    terminated: bool,
    /// The code has returned.
    finished: bool,
}

impl Execution {
    /// An execution of `run`, before its `WorkflowStarted` event is applied.
    pub fn new(run: WorkflowFn, workflow_id: &str, run_id: &str, policies: Arc<Policies>) -> Self {
        let woken = Arc::new(Flag(AtomicBool::new(true)));
        Execution {
            ctx: WorkflowContext::new(workflow_id, run_id, policies),
            run,
            future: None,
            waker: Waker::from(woken.clone()),
            woken,
            recorded: BTreeMap::new(),
            cancelled_timers: BTreeSet::new(),
            recorded_markers: BTreeSet::new(),
            open: BTreeMap::new(),
            emitted: 0,
            recorded_close: false,
            terminated: false,
            finished: false,
        }
    }

    /// Whether the workflow code has returned (or the run was closed from outside).
    pub fn is_finished(&self) -> bool {
        self.finished || self.recorded_close
    }

    /// Signals the run received that the code has not consumed, in order (carried to the
    /// next run on continue-as-new).
    pub fn unconsumed_signals(&self) -> Vec<(String, Payload)> {
        let shared = self.ctx.shared.lock().expect("workflow context lock");
        let mut names: Vec<&String> = shared.signals.keys().collect();
        names.sort();
        names
            .into_iter()
            .flat_map(|n| {
                shared.signals[n]
                    .iter()
                    .map(move |p| (n.clone(), p.clone()))
            })
            .collect()
    }

    /// Rebuilds the execution from its journal, the way it ran live: after each event that
    /// woke the workflow (its start, an activity's outcome, a timer firing) the code runs on,
    /// and the commands it issues must be the events that follow in the journal. Returns
    /// the commands the journal does not hold yet (the code ran ahead of a crash).
    pub fn replay(&mut self, history: &[Event]) -> Result<Vec<Command>, Nondeterminism> {
        {
            let mut shared = self.ctx.shared.lock().expect("workflow context lock");
            shared.history_markers = history
                .iter()
                .filter_map(|e| match &e.kind {
                    EventKind::MarkerRecorded { patch } => Some(patch.clone()),
                    _ => None,
                })
                .collect();
        }
        let mut expected: std::collections::VecDeque<Command> = Default::default();
        for (i, event) in history.iter().enumerate() {
            match event_key(&event.kind) {
                // A marker the code no longer asks for (the patch was retired) is allowed.
                Some(Key::Marker(patch)) => {
                    if matches!(expected.front(), Some(Command::RecordMarker { patch: p }) if *p == patch)
                    {
                        expected.pop_front();
                    }
                }
                Some(key) => {
                    while matches!(expected.front(), Some(Command::RecordMarker { .. })) {
                        expected.pop_front();
                    }
                    match expected.pop_front() {
                        Some(c) if command_key(&c).as_ref() == Some(&key) => {}
                        Some(other) => {
                            return Err(Nondeterminism(format!(
                                "event {}: the journal has {} but the code {}",
                                event.id,
                                event_desc(&key),
                                describe(&other)
                            )));
                        }
                        None => {
                            return Err(Nondeterminism(format!(
                                "event {}: the journal has {} but the code did not issue it",
                                event.id,
                                event_desc(&key)
                            )));
                        }
                    }
                }
                None => {}
            }
            if let EventKind::WorkflowTerminated { .. } = event.kind {
                // Closed from outside: the code's own ending is not expected.
                self.apply(event)?;
                return Ok(Vec::new());
            }
            if event.kind.is_close() {
                while matches!(expected.front(), Some(Command::RecordMarker { .. })) {
                    expected.pop_front();
                }
                check_close(event, expected.pop_front())?;
            }
            self.apply(event)?;
            if wakes(&event.kind) {
                self.ctx
                    .shared
                    .lock()
                    .expect("workflow context lock")
                    .replaying = i + 1 < history.len();
                expected.extend(self.advance()?);
            }
        }
        self.ctx
            .shared
            .lock()
            .expect("workflow context lock")
            .replaying = false;
        Ok(expected.into())
    }

    /// Feeds one journal event.
    pub fn apply(&mut self, event: &Event) -> Result<(), Nondeterminism> {
        {
            let mut shared = self.ctx.shared.lock().expect("workflow context lock");
            shared.now_ms = shared.now_ms.max(event.at_ms);
        }
        // What the code scheduled, by seq, for the determinism check.
        if let Some(Key::Seq(seq, name)) = event_key(&event.kind) {
            self.recorded.insert(seq, name);
        }
        match &event.kind {
            EventKind::WorkflowStarted { input, .. } => {
                if self.future.is_some() {
                    return Err(Nondeterminism(format!(
                        "event {}: a second workflow_started",
                        event.id
                    )));
                }
                self.future = Some((self.run)(self.ctx.clone(), input.clone()));
            }
            EventKind::ActivityScheduled { seq, options, .. } => {
                self.open
                    .insert(*seq, Open::Cancellable(options.cancellation));
            }
            EventKind::ChildWorkflowScheduled { seq, options, .. } => {
                self.open
                    .insert(*seq, Open::Cancellable(options.cancellation));
            }
            EventKind::ActivityCompleted { seq, result, .. }
            | EventKind::ChildWorkflowCompleted { seq, result, .. } => {
                self.resolve(*seq, Ok(result.clone()))
            }
            EventKind::ActivityFailed {
                seq,
                failure,
                retry_in_ms: None,
                ..
            }
            | EventKind::ChildWorkflowFailed {
                seq,
                failure,
                retry_in_ms: None,
                ..
            } => self.resolve(*seq, Err(failure.clone())),
            EventKind::ActivityFailed { .. }
            | EventKind::ChildWorkflowFailed { .. }
            | EventKind::ChildWorkflowStarted { .. } => {}
            EventKind::TimerStarted { seq, .. } => {
                self.open.insert(*seq, Open::Timer);
            }
            EventKind::TimerFired { seq } => self.resolve(*seq, Ok(Payload::default())),
            EventKind::TimerCancelled { seq } => {
                // The code's future was resolved when it cancelled the timer.
                self.cancelled_timers.insert(*seq);
                self.open.remove(seq);
            }
            EventKind::SignalReceived { name, input, .. } => {
                let mut shared = self.ctx.shared.lock().expect("workflow context lock");
                shared
                    .signals
                    .entry(name.clone())
                    .or_default()
                    .push_back(input.clone());
                for w in shared.signal_wakers.remove(name).unwrap_or_default() {
                    w.wake();
                }
            }
            EventKind::WorkflowCancelRequested { .. } => {
                {
                    let mut shared = self.ctx.shared.lock().expect("workflow context lock");
                    shared.cancel_requested = true;
                    for w in std::mem::take(&mut shared.cancel_wakers) {
                        w.wake();
                    }
                }
                let open: Vec<(u32, Open)> = self.open.iter().map(|(s, o)| (*s, *o)).collect();
                for (seq, o) in open {
                    let now = match o {
                        Open::Timer => true,
                        Open::Cancellable(c) => c != CancellationType::WaitCancellationCompleted,
                        Open::Uncancellable => false,
                    };
                    if now {
                        self.resolve(
                            seq,
                            Err(ActivityError::cancelled("the workflow was cancelled").into()),
                        );
                    }
                }
            }
            EventKind::MarkerRecorded { patch } => {
                self.recorded_markers.insert(patch.clone());
            }
            EventKind::ExternalSignalScheduled { seq, .. } => {
                self.open.insert(*seq, Open::Uncancellable);
            }
            EventKind::ExternalSignalResolved { seq, failure } => match failure {
                None => self.resolve(
                    *seq,
                    Ok(Payload::encode(&()).map_err(|e| Nondeterminism(e.to_string()))?),
                ),
                Some(f) => self.resolve(*seq, Err(f.clone())),
            },
            EventKind::WorkflowCompleted { .. }
            | EventKind::WorkflowFailed { .. }
            | EventKind::WorkflowContinuedAsNew { .. } => self.recorded_close = true,
            EventKind::WorkflowTerminated { .. } => {
                self.recorded_close = true;
                self.terminated = true;
            }
        }
        Ok(())
    }

    /// Answers a query from the workflow's current state, with the handler its code
    /// registered.
    pub fn query(&self, name: &str) -> Result<Payload, String> {
        let shared = self.ctx.shared.lock().expect("workflow context lock");
        match shared.queries.get(name).cloned() {
            Some(handler) => {
                // Called without the context's lock: a handler may read the context.
                drop(shared);
                handler()
            }
            None => {
                let mut known: Vec<&str> = shared.queries.keys().map(String::as_str).collect();
                known.sort_unstable();
                Err(format!(
                    "unknown query {name:?}; this workflow answers: [{}]",
                    known.join(", ")
                ))
            }
        }
    }

    fn resolve(&mut self, seq: u32, result: Result<Payload, Failure>) {
        // Resolved once: an outcome of something the cancellation already resolved is
        // not handed to the code again.
        if self.open.remove(&seq).is_none() {
            return;
        }
        let mut shared = self.ctx.shared.lock().expect("workflow context lock");
        shared.open_timers.remove(&seq);
        shared.results.insert(seq, result);
        if let Some(w) = shared.wakers.remove(&seq) {
            w.wake();
        }
    }

    /// Runs the workflow code as far as the results it has allow, and returns the commands
    /// the journal does not hold yet, in order.
    pub fn advance(&mut self) -> Result<Vec<Command>, Nondeterminism> {
        let mut out = Vec::new();
        let Some(future) = self.future.as_mut() else {
            return Ok(out);
        };
        let mut cx = Context::from_waker(&self.waker);
        let mut returned = None;
        while !self.finished && self.woken.0.swap(false, Ordering::AcqRel) {
            if let Poll::Ready(r) = future.as_mut().poll(&mut cx) {
                self.finished = true;
                returned = Some(r);
            }
        }
        let commands = std::mem::take(
            &mut self
                .ctx
                .shared
                .lock()
                .expect("workflow context lock")
                .commands,
        );
        for command in commands {
            match command_key(&command) {
                Some(Key::Seq(seq, name)) => {
                    self.emitted = self.emitted.max(seq + 1);
                    match self.recorded.get(&seq) {
                        Some(recorded) if *recorded == name => continue,
                        Some(recorded) => {
                            return Err(Nondeterminism(format!(
                                "seq {seq}: the journal scheduled {recorded:?} but the code schedules {name:?}"
                            )));
                        }
                        None => out.push(command),
                    }
                }
                Some(Key::CancelTimer(seq)) if !self.cancelled_timers.contains(&seq) => {
                    out.push(command)
                }
                Some(Key::Marker(patch)) if !self.recorded_markers.contains(&patch) => {
                    out.push(command)
                }
                _ => {}
            }
        }
        if let Some((&seq, name)) = self.recorded.range(self.emitted..).next() {
            return Err(Nondeterminism(format!(
                "seq {seq} ({name:?}) is in the journal but the code did not schedule it"
            )));
        }
        if self.terminated {
            return Ok(out);
        }
        match returned {
            Some(_) if self.recorded_close => {}
            Some(Ok(output)) => out.push(Command::CompleteWorkflow { output }),
            Some(Err(e)) => {
                let next = self
                    .ctx
                    .shared
                    .lock()
                    .expect("workflow context lock")
                    .continue_as_new
                    .take();
                match next {
                    Some(input) if e.kind == CONTINUE_AS_NEW => {
                        out.push(Command::ContinueAsNew { input })
                    }
                    _ => out.push(Command::FailWorkflow { failure: e.into() }),
                }
            }
            None if self.recorded_close && !self.finished => {
                return Err(Nondeterminism(
                    "the journal says the workflow closed but the code has not returned".into(),
                ));
            }
            None => {}
        }
        Ok(out)
    }
}

fn event_desc(key: &Key) -> String {
    match key {
        Key::Seq(seq, name) => format!("seq {seq} {name:?}"),
        Key::CancelTimer(seq) => format!("the timer of seq {seq} cancelled"),
        Key::Marker(patch) => format!("patch {patch:?}"),
    }
}

/// Checks the code's ending against the journal's close event.
fn check_close(event: &Event, command: Option<Command>) -> Result<(), Nondeterminism> {
    match (command, &event.kind) {
        (
            Some(Command::CompleteWorkflow { output }),
            EventKind::WorkflowCompleted { output: recorded },
        ) => {
            if output.to_json() != recorded.to_json() {
                return Err(Nondeterminism(format!(
                    "event {}: the journal's output is {} but the code returns {}",
                    event.id,
                    recorded.to_json(),
                    output.to_json()
                )));
            }
            Ok(())
        }
        (
            Some(Command::FailWorkflow { failure }),
            EventKind::WorkflowFailed { failure: recorded },
        ) => {
            if failure.kind != recorded.kind {
                return Err(Nondeterminism(format!(
                    "event {}: the journal's failure is {:?} but the code fails with {:?}",
                    event.id, recorded.kind, failure.kind
                )));
            }
            Ok(())
        }
        (
            Some(Command::ContinueAsNew { input }),
            EventKind::WorkflowContinuedAsNew {
                input: recorded, ..
            },
        ) => {
            if input.to_json() != recorded.to_json() {
                return Err(Nondeterminism(format!(
                    "event {}: the journal continued as new with {} but the code with {}",
                    event.id,
                    recorded.to_json(),
                    input.to_json()
                )));
            }
            Ok(())
        }
        (
            Some(
                other @ (Command::CompleteWorkflow { .. }
                | Command::FailWorkflow { .. }
                | Command::ContinueAsNew { .. }),
            ),
            _,
        ) => Err(Nondeterminism(format!(
            "event {}: the journal closed the run as {} but the code {}",
            event.id,
            event.kind.name(),
            describe(&other)
        ))),
        (other, _) => Err(Nondeterminism(format!(
            "event {}: the journal says the workflow closed but the code {}",
            event.id,
            other
                .as_ref()
                .map_or("has not returned".to_string(), describe)
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        ActivityDef, ActivityOptions, CancellationType, Registry, RetryPolicy, WorkflowContext,
    };
    use std::time::Duration;

    const UPPER: ActivityDef<String, String> = ActivityDef::new("upper");
    const COUNT: ActivityDef<String, usize> = ActivityDef::new("count");

    fn opts() -> ActivityOptions {
        ActivityOptions::new(
            "cpu",
            Duration::from_secs(5),
            RetryPolicy::exponential(Duration::from_secs(1), 2.0, 3),
        )
    }

    /// upper(text) -> count(upper) -> "<upper>:<count>"; falls back to "fallback" when
    /// upper fails for good.
    async fn two_steps(ctx: WorkflowContext, text: String) -> Result<String, WorkflowError> {
        let up = match ctx.activity(&UPPER, &text).await {
            Ok(up) => up,
            Err(_) => return Ok("fallback".into()),
        };
        let n = ctx.activity(&COUNT, &up).await?;
        Ok(format!("{up}:{n}"))
    }

    /// Both activities at once, joined.
    async fn parallel(ctx: WorkflowContext, text: String) -> Result<String, WorkflowError> {
        let (a, b) = futures::join!(ctx.activity(&UPPER, &text), ctx.activity(&COUNT, &text));
        Ok(format!("{}:{}", a?, b?))
    }

    /// Changed code: counts first.
    async fn reordered(ctx: WorkflowContext, text: String) -> Result<String, WorkflowError> {
        let n = ctx.activity(&COUNT, &text).await?;
        let up = ctx.activity(&UPPER, &text).await?;
        Ok(format!("{up}:{n}"))
    }

    fn registry() -> Registry {
        let mut r = Registry::new();
        r.workflow("two_steps", two_steps).unwrap();
        r.workflow("parallel", parallel).unwrap();
        r.workflow("reordered", reordered).unwrap();
        r.activity(&UPPER, opts(), |_, s: String| async move {
            Ok(s.to_uppercase())
        })
        .unwrap();
        r.activity(&COUNT, opts(), |_, s: String| async move { Ok(s.len()) })
            .unwrap();
        r
    }

    fn execution(r: &Registry, name: &str) -> Execution {
        Execution::new(
            r.workflow_def(name).unwrap().run.clone(),
            "wf-1",
            "run-1",
            r.policies().clone(),
        )
    }

    /// Builds canned histories event by event.
    #[derive(Default)]
    struct HistoryBuilder(Vec<Event>);

    impl HistoryBuilder {
        fn push(mut self, kind: EventKind) -> Self {
            let id = self.0.len() as u32 + 1;
            self.0.push(Event {
                id,
                at_ms: 1_000 + id as u64,
                kind,
            });
            self
        }
        fn started(self, wf: &str, input: &str) -> Self {
            self.push(EventKind::WorkflowStarted {
                workflow_type: wf.into(),
                workflow_id: "wf-1".into(),
                input: Payload::encode(input).unwrap(),
            })
        }
        fn scheduled(self, seq: u32, activity: &str, input: &str) -> Self {
            self.push(EventKind::ActivityScheduled {
                seq,
                activity: activity.into(),
                input: Payload::encode(input).unwrap(),
                options: opts(),
            })
        }
        fn completed<T: serde::Serialize>(self, seq: u32, result: T) -> Self {
            self.push(EventKind::ActivityCompleted {
                seq,
                attempt: 1,
                worker: "w".into(),
                result: Payload::encode(&result).unwrap(),
            })
        }
        fn failed(self, seq: u32, attempt: u32, retry_in_ms: Option<u64>) -> Self {
            self.push(EventKind::ActivityFailed {
                seq,
                attempt,
                worker: "w".into(),
                failure: Failure {
                    kind: "Boom".into(),
                    message: "boom".into(),
                    retryable: true,
                },
                retry_in_ms,
            })
        }
        fn build(self) -> Vec<Event> {
            self.0
        }
    }

    fn replay(exec: &mut Execution, history: &[Event]) -> Result<Vec<Command>, Nondeterminism> {
        exec.replay(history)
    }

    fn scheduled_names(commands: &[Command]) -> Vec<(u32, String)> {
        commands
            .iter()
            .filter_map(|c| match c {
                Command::ScheduleActivity { seq, activity, .. } => Some((*seq, activity.clone())),
                _ => None,
            })
            .collect()
    }

    fn output(commands: &[Command]) -> Option<String> {
        commands.iter().find_map(|c| match c {
            Command::CompleteWorkflow { output } => Some(output.decode().unwrap()),
            _ => None,
        })
    }

    #[test]
    fn a_new_execution_schedules_its_first_activity() {
        let r = registry();
        let mut exec = execution(&r, "two_steps");
        let cmds = replay(
            &mut exec,
            &HistoryBuilder::default().started("two_steps", "hi").build(),
        )
        .unwrap();
        assert_eq!(scheduled_names(&cmds), vec![(0, "upper".into())]);
        match &cmds[0] {
            Command::ScheduleActivity { input, options, .. } => {
                assert_eq!(input.decode::<String>().unwrap(), "hi");
                assert_eq!(options.task_queue, "cpu");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn replay_returns_recorded_results_without_rescheduling() {
        let r = registry();
        let h = HistoryBuilder::default()
            .started("two_steps", "hi")
            .scheduled(0, "upper", "hi")
            .completed(0, "HI")
            .build();
        let mut exec = execution(&r, "two_steps");
        let cmds = replay(&mut exec, &h).unwrap();
        // upper is not scheduled again; only the next step is new.
        assert_eq!(scheduled_names(&cmds), vec![(1, "count".into())]);
    }

    #[test]
    fn a_full_history_completes_with_the_same_output() {
        let r = registry();
        let h = HistoryBuilder::default()
            .started("two_steps", "hi")
            .scheduled(0, "upper", "hi")
            .completed(0, "HI")
            .scheduled(1, "count", "HI")
            .completed(1, 2usize)
            .build();
        let mut exec = execution(&r, "two_steps");
        let cmds = replay(&mut exec, &h).unwrap();
        assert_eq!(output(&cmds).as_deref(), Some("HI:2"));
        assert!(exec.is_finished());
    }

    #[test]
    fn live_events_advance_step_by_step() {
        let r = registry();
        let mut exec = execution(&r, "two_steps");
        let h = HistoryBuilder::default()
            .started("two_steps", "abc")
            .scheduled(0, "upper", "abc")
            .completed(0, "ABC")
            .scheduled(1, "count", "ABC")
            .completed(1, 3usize)
            .build();
        exec.apply(&h[0]).unwrap();
        assert_eq!(
            scheduled_names(&exec.advance().unwrap()),
            vec![(0, "upper".into())]
        );
        exec.apply(&h[1]).unwrap();
        assert!(
            exec.advance().unwrap().is_empty(),
            "nothing new until the result arrives"
        );
        exec.apply(&h[2]).unwrap();
        assert_eq!(
            scheduled_names(&exec.advance().unwrap()),
            vec![(1, "count".into())]
        );
        exec.apply(&h[3]).unwrap();
        exec.apply(&h[4]).unwrap();
        assert_eq!(output(&exec.advance().unwrap()).as_deref(), Some("ABC:3"));
    }

    #[test]
    fn retried_failures_are_invisible_and_final_ones_reach_the_workflow() {
        let r = registry();
        let retrying = HistoryBuilder::default()
            .started("two_steps", "hi")
            .scheduled(0, "upper", "hi")
            .failed(0, 1, Some(1000))
            .build();
        let mut exec = execution(&r, "two_steps");
        assert!(
            replay(&mut exec, &retrying).unwrap().is_empty(),
            "still waiting on attempt 2"
        );

        let given_up = HistoryBuilder::default()
            .started("two_steps", "hi")
            .scheduled(0, "upper", "hi")
            .failed(0, 1, Some(1000))
            .failed(0, 2, None)
            .build();
        let mut exec = execution(&r, "two_steps");
        let cmds = replay(&mut exec, &given_up).unwrap();
        assert_eq!(
            output(&cmds).as_deref(),
            Some("fallback"),
            "the workflow handled the final error"
        );
    }

    #[test]
    fn concurrent_activities_are_scheduled_together_and_joined() {
        let r = registry();
        let mut exec = execution(&r, "parallel");
        let cmds = replay(
            &mut exec,
            &HistoryBuilder::default().started("parallel", "ab").build(),
        )
        .unwrap();
        assert_eq!(
            scheduled_names(&cmds),
            vec![(0, "upper".into()), (1, "count".into())]
        );
        let h = HistoryBuilder::default()
            .started("parallel", "ab")
            .scheduled(0, "upper", "ab")
            .scheduled(1, "count", "ab")
            .completed(1, 2usize)
            .completed(0, "AB")
            .build();
        let mut exec = execution(&r, "parallel");
        assert_eq!(
            output(&replay(&mut exec, &h).unwrap()).as_deref(),
            Some("AB:2")
        );
    }

    #[test]
    fn changed_code_is_a_nondeterminism_error() {
        let r = registry();
        let h = HistoryBuilder::default()
            .started("reordered", "hi")
            .scheduled(0, "upper", "hi")
            .completed(0, "HI")
            .build();
        let mut exec = execution(&r, "reordered");
        let err = replay(&mut exec, &h).unwrap_err();
        assert!(
            err.0.contains("\"upper\"") && err.0.contains("\"count\""),
            "{err}"
        );
    }

    #[test]
    fn a_journal_with_more_activities_than_the_code_is_a_nondeterminism_error() {
        let r = registry();
        // two_steps falls back after a final failure and never schedules seq 1 — but this
        // journal says it did.
        let h = HistoryBuilder::default()
            .started("two_steps", "hi")
            .scheduled(0, "upper", "hi")
            .failed(0, 1, None)
            .scheduled(1, "count", "HI")
            .build();
        let mut exec = execution(&r, "two_steps");
        let err = replay(&mut exec, &h).unwrap_err();
        assert!(err.0.contains("seq 1"), "{err}");
    }

    #[test]
    fn a_closed_journal_with_code_still_waiting_is_a_nondeterminism_error() {
        let r = registry();
        let h = HistoryBuilder::default()
            .started("two_steps", "hi")
            .scheduled(0, "upper", "hi")
            .push(EventKind::WorkflowCompleted {
                output: Payload::encode("HI:2").unwrap(),
            })
            .build();
        let mut exec = execution(&r, "two_steps");
        assert!(replay(&mut exec, &h).is_err());
    }

    /// Workflow time at each step, and a durable timer between the steps.
    async fn timed(ctx: WorkflowContext, text: String) -> Result<(u64, u64, u64), WorkflowError> {
        let up = ctx.activity(&UPPER, &text).await?;
        let t1 = ctx.now_ms();
        ctx.sleep(Duration::from_secs(60)).await?;
        let t2 = ctx.now_ms();
        ctx.activity(&COUNT, &up).await?;
        Ok((t1, t2, ctx.now_ms()))
    }

    fn at(mut h: Vec<Event>, times: &[u64]) -> Vec<Event> {
        for (e, t) in h.iter_mut().zip(times) {
            e.at_ms = *t;
        }
        h
    }

    #[test]
    fn workflow_time_is_the_time_of_each_step_in_replay_too() {
        let mut r = registry();
        r.workflow("timed", timed).unwrap();
        let h = HistoryBuilder::default()
            .started("timed", "ab")
            .scheduled(0, "upper", "ab")
            .completed(0, "AB")
            .push(EventKind::TimerStarted {
                seq: 1,
                fire_at_ms: 60_300,
            })
            .push(EventKind::TimerFired { seq: 1 })
            .scheduled(2, "count", "AB")
            .completed(2, 2usize)
            .build();
        let h = at(h, &[100, 100, 300, 300, 60_310, 60_310, 60_500]);
        let mut exec = execution(&r, "timed");
        let cmds = replay(&mut exec, &h).unwrap();
        let out = cmds.iter().find_map(|c| match c {
            Command::CompleteWorkflow { output } => {
                Some(output.decode::<(u64, u64, u64)>().unwrap())
            }
            _ => None,
        });
        // Each value is the time of the event that woke the code, not the last event's.
        assert_eq!(out, Some((300, 60_310, 60_500)));
    }

    #[test]
    fn a_sleeping_workflow_waits_for_its_timer() {
        let mut r = registry();
        r.workflow("timed", timed).unwrap();
        let h = HistoryBuilder::default()
            .started("timed", "ab")
            .scheduled(0, "upper", "ab")
            .completed(0, "AB")
            .build();
        let mut exec = execution(&r, "timed");
        let cmds = replay(&mut exec, &h).unwrap();
        assert!(
            matches!(
                cmds[..],
                [Command::StartTimer {
                    seq: 1,
                    duration_ms: 60_000
                }]
            ),
            "{cmds:?}"
        );
        // Recorded but not fired: nothing new.
        let h = HistoryBuilder::default()
            .started("timed", "ab")
            .scheduled(0, "upper", "ab")
            .completed(0, "AB")
            .push(EventKind::TimerStarted {
                seq: 1,
                fire_at_ms: 61_000,
            })
            .build();
        let mut exec = execution(&r, "timed");
        assert!(replay(&mut exec, &h).unwrap().is_empty());
        // A timer where the journal has an activity is a non-determinism error.
        let h = HistoryBuilder::default()
            .started("timed", "ab")
            .scheduled(0, "upper", "ab")
            .completed(0, "AB")
            .scheduled(1, "count", "AB")
            .build();
        let mut exec = execution(&r, "timed");
        let err = replay(&mut exec, &h).unwrap_err();
        assert!(err.0.contains("timer"), "{err}");
    }

    /// Adds the `add` signals until a `done` signal; answers the query `total`.
    async fn counter(ctx: WorkflowContext, _: ()) -> Result<i64, WorkflowError> {
        let total = std::sync::Arc::new(std::sync::Mutex::new(0i64));
        let t = total.clone();
        ctx.on_query("total", move || *t.lock().unwrap());
        loop {
            let n: i64 = ctx.signal("add").await?;
            if n == 0 {
                break;
            }
            *total.lock().unwrap() += n;
        }
        let v = *total.lock().unwrap();
        Ok(v)
    }

    #[test]
    fn signals_are_taken_in_journal_order_and_queries_read_state() {
        let mut r = registry();
        r.workflow("counter", counter).unwrap();
        let sig = |n: i64| EventKind::SignalReceived {
            name: "add".into(),
            input: Payload::encode(&n).unwrap(),
            request_id: None,
        };
        let h = HistoryBuilder::default()
            .push(EventKind::WorkflowStarted {
                workflow_type: "counter".into(),
                workflow_id: "wf-1".into(),
                input: Payload::encode(&()).unwrap(),
            })
            .push(sig(2))
            .push(sig(5))
            .build();
        let mut exec = execution(&r, "counter");
        assert!(replay(&mut exec, &h).unwrap().is_empty(), "still waiting");
        assert_eq!(exec.query("total").unwrap().decode::<i64>().unwrap(), 7);
        assert!(
            exec.query("nope").unwrap_err().contains("total"),
            "the error lists the known queries"
        );
        // Live: a signal that ends the loop completes the workflow.
        exec.apply(&Event {
            id: 4,
            at_ms: 5,
            kind: sig(0),
        })
        .unwrap();
        assert_eq!(output_i64(&exec.advance().unwrap()), Some(7));
    }

    fn output_i64(commands: &[Command]) -> Option<i64> {
        commands.iter().find_map(|c| match c {
            Command::CompleteWorkflow { output } => Some(output.decode().unwrap()),
            _ => None,
        })
    }

    #[test]
    fn unregistered_activities_fail_inside_the_workflow() {
        const NOPE: ActivityDef<String, String> = ActivityDef::new("nope");
        let mut r = Registry::new();
        r.workflow("uses_nope", |ctx: WorkflowContext, s: String| async move {
            Ok::<_, WorkflowError>(ctx.activity(&NOPE, &s).await?)
        })
        .unwrap();
        let mut exec = execution(&r, "uses_nope");
        let cmds = replay(
            &mut exec,
            &HistoryBuilder::default().started("uses_nope", "x").build(),
        )
        .unwrap();
        match &cmds[..] {
            [Command::FailWorkflow { failure }] => assert_eq!(failure.kind, "UnregisteredActivity"),
            other => panic!("unexpected {other:?}"),
        }
    }

    /// v1 of a versioned workflow: upper only.
    async fn versioned_v1(ctx: WorkflowContext, text: String) -> Result<String, WorkflowError> {
        Ok(ctx.activity(&UPPER, &text).await?)
    }

    /// v2: counts instead, for runs that reach this point after the patch.
    async fn versioned_v2(ctx: WorkflowContext, text: String) -> Result<String, WorkflowError> {
        if ctx.patched("count-instead") {
            Ok(ctx.activity(&COUNT, &text).await?.to_string())
        } else {
            Ok(ctx.activity(&UPPER, &text).await?)
        }
    }

    #[test]
    fn patched_keeps_old_runs_on_the_old_path_and_new_runs_on_the_new() {
        let mut r = registry();
        r.workflow("versioned", versioned_v2).unwrap();
        r.workflow("versioned_v1", versioned_v1).unwrap();
        // A run recorded by v1 (no marker) replays under v2 on the old path.
        let old = HistoryBuilder::default()
            .started("versioned", "ab")
            .scheduled(0, "upper", "ab")
            .completed(0, "AB")
            .push(EventKind::WorkflowCompleted {
                output: Payload::encode("AB").unwrap(),
            })
            .build();
        let mut exec = execution(&r, "versioned");
        assert_eq!(exec.replay(&old).unwrap(), vec![]);
        // A run in flight under v1 (the activity scheduled, not completed) also stays on it.
        let in_flight = HistoryBuilder::default()
            .started("versioned", "ab")
            .scheduled(0, "upper", "ab")
            .build();
        let mut exec = execution(&r, "versioned");
        assert_eq!(exec.replay(&in_flight).unwrap(), vec![]);
        // A new run takes the new path and records the marker before the activity.
        let mut exec = execution(&r, "versioned");
        let fresh = HistoryBuilder::default().started("versioned", "ab").build();
        let cmds = exec.replay(&fresh).unwrap();
        assert!(
            matches!(&cmds[..], [Command::RecordMarker { patch }, Command::ScheduleActivity { activity, .. }] if patch == "count-instead" && activity == "count"),
            "{cmds:?}"
        );
        // Its history replays under v2 with nothing new to do.
        let new = HistoryBuilder::default()
            .started("versioned", "ab")
            .push(EventKind::MarkerRecorded {
                patch: "count-instead".into(),
            })
            .scheduled(0, "count", "ab")
            .completed(0, 2)
            .push(EventKind::WorkflowCompleted {
                output: Payload::encode("2").unwrap(),
            })
            .build();
        let mut exec = execution(&r, "versioned");
        assert_eq!(exec.replay(&new).unwrap(), vec![]);
        // The same history under v1 is caught: v1 would upper where the journal counted.
        let mut exec = execution(&r, "versioned_v1");
        assert!(exec.replay(&new).is_err());
    }

    /// Sleeps on two timers; cancels the long one when the short one fires.
    async fn two_timers(ctx: WorkflowContext, _: String) -> Result<String, WorkflowError> {
        let short = ctx.sleep(Duration::from_secs(1));
        let long = ctx.sleep(Duration::from_secs(3600));
        let long_id = long.id();
        short.await?;
        ctx.cancel_timer(long_id);
        let long = long.await;
        // Cancelling again does nothing.
        ctx.cancel_timer(long_id);
        Ok(format!("long: {:?}", long.map_err(|e| e.kind)))
    }

    #[test]
    fn a_cancelled_timer_resolves_at_once_and_is_journaled() {
        let mut r = registry();
        r.workflow("two_timers", two_timers).unwrap();
        let timer = |seq| EventKind::TimerStarted {
            seq,
            fire_at_ms: 5_000,
        };
        let h = HistoryBuilder::default()
            .started("two_timers", "x")
            .push(timer(0))
            .push(timer(1))
            .push(EventKind::TimerFired { seq: 0 })
            .build();
        let mut exec = execution(&r, "two_timers");
        let cmds = exec.replay(&h).unwrap();
        assert!(
            matches!(&cmds[..], [Command::CancelTimer { seq: 1 }, Command::CompleteWorkflow { output }] if output.to_json() == "long: Err(\"Cancelled\")"),
            "{cmds:?}"
        );
        // Recorded, the history replays with nothing left to do.
        let mut full = HistoryBuilder(h);
        full = full
            .push(EventKind::TimerCancelled { seq: 1 })
            .push(EventKind::WorkflowCompleted {
                output: Payload::encode("long: Err(\"Cancelled\")").unwrap(),
            });
        let mut exec = execution(&r, "two_timers");
        assert_eq!(exec.replay(&full.build()).unwrap(), vec![]);
    }

    /// Waits on an activity of the given cancellation type; reports how it ended.
    async fn cancellable(ctx: WorkflowContext, mode: String) -> Result<String, WorkflowError> {
        let c = match mode.as_str() {
            "wait" => CancellationType::WaitCancellationCompleted,
            "abandon" => CancellationType::Abandon,
            _ => CancellationType::TryCancel,
        };
        let r = ctx
            .activity_with(&UPPER, &mode, opts().cancellation(c))
            .await;
        let cancelled = ctx.is_cancel_requested();
        Ok(format!("{:?} {cancelled}", r.map_err(|e| e.kind)))
    }

    #[test]
    fn cancellation_resolves_by_the_activity_cancellation_type() {
        let mut r = registry();
        r.workflow("cancellable", cancellable).unwrap();
        for (mode, expect) in [
            ("try", Some("Err(\"Cancelled\") true")),
            ("abandon", Some("Err(\"Cancelled\") true")),
            ("wait", None),
        ] {
            let h = HistoryBuilder::default()
                .started("cancellable", mode)
                .push(EventKind::ActivityScheduled {
                    seq: 0,
                    activity: "upper".into(),
                    input: Payload::encode(mode).unwrap(),
                    options: opts(),
                })
                .push(EventKind::WorkflowCancelRequested {
                    reason: "test".into(),
                })
                .build();
            // The recorded options decide, as they did live.
            let mut h = h;
            if let EventKind::ActivityScheduled { options, .. } = &mut h[1].kind {
                options.cancellation = match mode {
                    "wait" => CancellationType::WaitCancellationCompleted,
                    "abandon" => CancellationType::Abandon,
                    _ => CancellationType::TryCancel,
                };
            }
            let mut exec = execution(&r, "cancellable");
            let cmds = exec.replay(&h).unwrap();
            match expect {
                Some(out) => assert!(
                    matches!(&cmds[..], [Command::CompleteWorkflow { output }] if output.to_json() == out),
                    "{mode}: {cmds:?}"
                ),
                // wait_cancellation_completed: nothing until the activity reports.
                None => assert!(cmds.is_empty(), "{mode}: {cmds:?}"),
            }
        }
    }

    /// Continues as new until the count reaches 3, adding the `add` signals.
    async fn rolling(ctx: WorkflowContext, count: u32) -> Result<u32, WorkflowError> {
        if count >= 3 {
            return Ok(count);
        }
        let _: i64 = ctx.signal("add").await?;
        Err(ctx.continue_as_new(&(count + 1)))
    }

    #[test]
    fn continue_as_new_is_a_close_command_with_the_new_input_and_keeps_unread_signals() {
        let mut r = registry();
        r.workflow("rolling", rolling).unwrap();
        let sig = |n: i64| EventKind::SignalReceived {
            name: "add".into(),
            input: Payload::encode(&n).unwrap(),
            request_id: None,
        };
        let h = HistoryBuilder::default()
            .push(EventKind::WorkflowStarted {
                workflow_type: "rolling".into(),
                workflow_id: "wf-1".into(),
                input: Payload::encode(&1u32).unwrap(),
            })
            .push(sig(5))
            .build();
        let mut exec = execution(&r, "rolling");
        let cmds = exec.replay(&h).unwrap();
        assert!(
            matches!(&cmds[..], [Command::ContinueAsNew { input }] if input.to_json() == 2),
            "{cmds:?}"
        );
        // A second signal arrived with the first: it is not consumed, so it is carried.
        let mut exec = execution(&r, "rolling");
        let mut h2 = HistoryBuilder(h.clone());
        h2 = h2.push(sig(6));
        let _ = exec.replay(&h2.build()).unwrap();
        let left = exec.unconsumed_signals();
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].1.to_json(), 6);
        // The recorded close replays; a different input is non-determinism.
        let closed = HistoryBuilder(h.clone())
            .push(EventKind::WorkflowContinuedAsNew {
                new_run_id: "r2".into(),
                input: Payload::encode(&2u32).unwrap(),
            })
            .build();
        assert_eq!(execution(&r, "rolling").replay(&closed).unwrap(), vec![]);
        let wrong = HistoryBuilder(h)
            .push(EventKind::WorkflowContinuedAsNew {
                new_run_id: "r2".into(),
                input: Payload::encode(&7u32).unwrap(),
            })
            .build();
        assert!(execution(&r, "rolling").replay(&wrong).is_err());
    }
}
