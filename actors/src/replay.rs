//! The deterministic replay core: an [`Execution`] runs a workflow function against its
//! journal. It does no I/O: feed it events with [`Execution::apply`], run the code with
//! [`Execution::advance`], and get back the [`Command`]s the journal does not hold yet.
//!
//! The same two calls serve a live execution (apply one new event, advance) and a rebuilt
//! one (apply the whole history, advance once): recorded results are handed to the code
//! without running any activity again, and a command that differs from the journal is a
//! [`Nondeterminism`] error.

use std::{
    collections::BTreeMap,
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
    context::{Command, WorkflowContext},
    error::{Nondeterminism, WorkflowError},
    history::{Event, EventKind},
    registry::{Policies, WorkflowFn},
};

/// The name a timer takes in the determinism check (not a valid activity name).
const TIMER: &str = "@timer";

fn describe(c: &Command) -> String {
    match c {
        Command::ScheduleActivity { seq, activity, .. } => {
            format!("schedules seq {seq} {activity:?}")
        }
        Command::StartTimer { seq, .. } => format!("starts a timer at seq {seq}"),
        Command::CompleteWorkflow { .. } => "returns".into(),
        Command::FailWorkflow { .. } => "fails".into(),
    }
}

type WorkflowFuture = Pin<Box<dyn Future<Output = Result<Payload, WorkflowError>> + Send>>;

struct Flag(AtomicBool);

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.0.store(true, Ordering::Release);
    }
}

/// One workflow execution's state, rebuilt from its journal.
pub struct Execution {
    ctx: WorkflowContext,
    run: WorkflowFn,
    future: Option<WorkflowFuture>,
    woken: Arc<Flag>,
    waker: Waker,
    /// Activities the journal says were scheduled: seq -> name.
    recorded: BTreeMap<u32, String>,
    /// How many activities the code has scheduled so far.
    emitted: u32,
    /// The journal holds a close event.
    recorded_close: bool,
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
            emitted: 0,
            recorded_close: false,
            finished: false,
        }
    }

    /// Whether the workflow code has returned.
    pub fn is_finished(&self) -> bool {
        self.finished || self.recorded_close
    }

    /// Rebuilds the execution from its journal, the way it ran live: after each event that
    /// woke the workflow (its start, an activity's outcome, a timer firing) the code runs on,
    /// and the commands it issues must be the events that follow in the journal. Returns
    /// the commands the journal does not hold yet (the code ran ahead of a crash).
    pub fn replay(&mut self, history: &[Event]) -> Result<Vec<Command>, Nondeterminism> {
        let mut expected: std::collections::VecDeque<Command> = Default::default();
        for event in history {
            let recorded = match &event.kind {
                EventKind::ActivityScheduled { seq, activity, .. } => {
                    Some((*seq, activity.as_str()))
                }
                EventKind::TimerStarted { seq, .. } => Some((*seq, TIMER)),
                _ => None,
            };
            if let Some((seq, name)) = recorded {
                match expected.pop_front() {
                    Some(Command::ScheduleActivity {
                        seq: s,
                        ref activity,
                        ..
                    }) if s == seq && activity == name => {}
                    Some(Command::StartTimer { seq: s, .. }) if s == seq && name == TIMER => {}
                    Some(other) => {
                        return Err(Nondeterminism(format!(
                            "event {}: the journal has seq {seq} {name:?} but the code {}",
                            event.id,
                            describe(&other)
                        )));
                    }
                    None => {
                        return Err(Nondeterminism(format!(
                            "event {}: the journal has seq {seq} {name:?} but the code did not issue it",
                            event.id
                        )));
                    }
                }
            }
            if event.kind.is_close() {
                match (expected.pop_front(), &event.kind) {
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
                    }
                    (other, _)
                        if matches!(
                            other,
                            Some(Command::CompleteWorkflow { .. } | Command::FailWorkflow { .. })
                        ) =>
                    {
                        return Err(Nondeterminism(format!(
                            "event {}: the journal closed the run as {} but the code {}",
                            event.id,
                            event.kind.name(),
                            other.as_ref().map_or(String::new(), describe)
                        )));
                    }
                    (other, _) => {
                        return Err(Nondeterminism(format!(
                            "event {}: the journal says the workflow closed but the code {}",
                            event.id,
                            other
                                .as_ref()
                                .map_or("has not returned".to_string(), describe)
                        )));
                    }
                }
            }
            self.apply(event)?;
            let wakes = matches!(
                event.kind,
                EventKind::WorkflowStarted { .. }
                    | EventKind::ActivityCompleted { .. }
                    | EventKind::ActivityFailed {
                        retry_in_ms: None,
                        ..
                    }
                    | EventKind::TimerFired { .. }
                    | EventKind::SignalReceived { .. }
            );
            if wakes {
                expected.extend(self.advance()?);
            }
        }
        Ok(expected.into())
    }

    /// Feeds one journal event.
    pub fn apply(&mut self, event: &Event) -> Result<(), Nondeterminism> {
        {
            let mut shared = self.ctx.shared.lock().expect("workflow context lock");
            shared.now_ms = shared.now_ms.max(event.at_ms);
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
            EventKind::ActivityScheduled { seq, activity, .. } => {
                self.recorded.insert(*seq, activity.clone());
            }
            EventKind::ActivityCompleted { seq, result, .. } => {
                self.resolve(*seq, Ok(result.clone()))
            }
            EventKind::ActivityFailed {
                seq,
                failure,
                retry_in_ms: None,
                ..
            } => self.resolve(*seq, Err(failure.clone())),
            EventKind::ActivityFailed { .. } => {}
            EventKind::TimerStarted { seq, .. } => {
                self.recorded.insert(*seq, TIMER.into());
            }
            EventKind::TimerFired { seq } => self.resolve(*seq, Ok(Payload::default())),
            EventKind::SignalReceived { name, input } => {
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
            EventKind::WorkflowCompleted { .. } | EventKind::WorkflowFailed { .. } => {
                self.recorded_close = true
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
        let mut shared = self.ctx.shared.lock().expect("workflow context lock");
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
            let scheduled = match &command {
                Command::ScheduleActivity { seq, activity, .. } => Some((*seq, activity.clone())),
                Command::StartTimer { seq, .. } => Some((*seq, TIMER.to_string())),
                _ => None,
            };
            if let Some((seq, activity)) = scheduled {
                let seq = &seq;
                self.emitted = self.emitted.max(seq + 1);
                match self.recorded.get(seq) {
                    Some(recorded) if *recorded == activity => continue,
                    Some(recorded) => {
                        return Err(Nondeterminism(format!(
                            "activity seq {seq}: the journal scheduled {recorded:?} but the code schedules {activity:?}"
                        )));
                    }
                    None => out.push(command),
                }
            }
        }
        if let Some((&seq, name)) = self.recorded.range(self.emitted..).next() {
            return Err(Nondeterminism(format!(
                "activity seq {seq} ({name:?}) is in the journal but the code did not schedule it"
            )));
        }
        match returned {
            Some(_) if self.recorded_close => {}
            Some(Ok(output)) => out.push(Command::CompleteWorkflow { output }),
            Some(Err(e)) => out.push(Command::FailWorkflow { failure: e.into() }),
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{ActivityDef, ActivityOptions, Registry, RetryPolicy, WorkflowContext};
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
        ctx.sleep(Duration::from_secs(60)).await;
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
}
