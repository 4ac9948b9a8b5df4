//! One ractor actor per workflow execution, under a supervisor that restarts a failed
//! execution by replaying its journal.
//!
//! The actor owns its run's state: the replay core ([`Execution`]), the activities in
//! flight and their attempts. Every change goes through the same steps: build the events,
//! append them to the journal (group commit, redb + JetStream), and only then let the
//! effects leave the node (tasks published, waiters woken). Reports of attempts that are
//! no longer current are recognised by attempt number and dropped.

use std::{
    collections::{BTreeMap, HashMap},
    sync::{Arc, Mutex},
    time::Duration,
};

use async_nats::HeaderMap;
use baton_transport::{
    Payload, codec,
    jetstream::{Streams, task_msg_id},
    subject,
    wire::{ActivityOutcome, ActivityReport, ActivityTask},
};
use ractor::{
    Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent,
};
use tokio::sync::broadcast;

use crate::{
    Registry,
    context::Command,
    history::{Event, EventKind},
    journal::{Journal, RunRecord},
    now_ms,
    options::ActivityOptions,
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
    /// A signal: answered once it is journaled.
    Signal {
        name: String,
        input: Payload,
        reply: RpcReplyPort<Result<(), String>>,
    },
    /// A query, answered from the workflow's state.
    Query {
        name: String,
        reply: RpcReplyPort<Result<Payload, String>>,
    },
    /// An activity's schedule-to-close deadline is due.
    Deadline { seq: u32 },
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
}

pub(crate) struct ExecState {
    rt: Arc<Runtime>,
    run: RunRecord,
    exec: Execution,
    next_event_id: u32,
    pending: BTreeMap<u32, Pending>,
    /// Durable timers started and not fired: seq -> fire time (Unix ms).
    timers: BTreeMap<u32, u64>,
    /// Set when the code no longer matches the journal: the run stays open, untouched.
    blocked: Option<String>,
}

pub(crate) struct ExecutionActor;

/// What an execution actor starts from: its run and its journal so far.
pub(crate) struct ExecArgs {
    pub(crate) rt: Arc<Runtime>,
    pub(crate) run: RunRecord,
    pub(crate) history: Vec<Event>,
    /// Rebuilt after a restart (in-flight tasks are checked, not blindly republished).
    pub(crate) recovering: bool,
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
            recovering,
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
                        Pending {
                            activity: activity.clone(),
                            input: input.clone(),
                            options: options.clone(),
                            attempt: 1,
                            due_ms: 0,
                            deadline_ms: options.schedule_to_close_ms.map(|d| event.at_ms + d),
                        },
                    );
                }
                EventKind::TimerStarted { seq, fire_at_ms } => {
                    timers.insert(*seq, *fire_at_ms);
                }
                EventKind::TimerFired { seq } => {
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
                _ => {}
            }
        }
        let next_event_id = history.last().map_or(1, |e| e.id + 1);
        // Durable timers and deadlines of the journal resume where they were.
        let now = now_ms();
        for (&seq, &fire_at) in &timers {
            myself.send_after(
                Duration::from_millis(fire_at.saturating_sub(now)),
                move || ExecMsg::TimerDue { seq },
            );
        }
        for (&seq, p) in &pending {
            if let Some(deadline) = p.deadline_ms {
                myself.send_after(
                    Duration::from_millis(deadline.saturating_sub(now)),
                    move || ExecMsg::Deadline { seq },
                );
            }
        }
        let mut state = ExecState {
            rt,
            run,
            exec,
            next_event_id,
            pending,
            timers,
            blocked,
        };
        if state.blocked.is_none() {
            state.record(now_ms(), Vec::new(), ahead, &myself).await?;
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
                myself.send_after(Duration::from_millis(p.due_ms - now), move || {
                    ExecMsg::RetryDue { seq, attempt }
                });
            } else if !recovering && p.due_ms > 0 {
                myself.send_message(ExecMsg::RetryDue {
                    seq: *seq,
                    attempt: p.attempt,
                })?;
            }
        }
        Ok(state)
    }

    async fn handle(
        &self,
        myself: ActorRef<ExecMsg>,
        msg: ExecMsg,
        state: &mut ExecState,
    ) -> Result<(), ActorProcessingErr> {
        if state.blocked.is_some() {
            if let ExecMsg::Report(_, reply) = msg {
                let _ = reply.send(Err("execution blocked by non-determinism".into()));
            }
            return Ok(());
        }
        match msg {
            ExecMsg::Report(report, reply) => {
                let r = state.on_report(report, &myself).await;
                let _ = reply.send(r.as_ref().map(|_| ()).map_err(|e| e.to_string()));
                r?;
            }
            ExecMsg::RetryDue { seq, attempt } => {
                if state
                    .pending
                    .get(&seq)
                    .is_some_and(|p| p.attempt == attempt)
                {
                    state.dispatch(&[seq], false).await?;
                }
            }
            ExecMsg::Signal { name, input, reply } => {
                let r = state
                    .resolve(EventKind::SignalReceived { name, input }, &myself)
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
                    let failure = baton_transport::wire::Failure {
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
                    .filter(|(_, p)| p.due_ms <= now)
                    .map(|(s, _)| *s)
                    .collect();
                state.dispatch(&due, true).await?;
            }
        }
        Ok(())
    }
}

impl ExecState {
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
                // No retry whose backoff would run past the schedule-to-close deadline.
                let now = now_ms();
                let retry = p.options.retry.next_delay(attempt, &failure).filter(|d| {
                    p.deadline_ms
                        .is_none_or(|dl| now + (d.as_millis() as u64) < dl)
                });
                match retry {
                    Some(delay) => {
                        p.attempt += 1;
                        p.due_ms = now + delay.as_millis() as u64;
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
                        myself.send_after(delay, move || ExecMsg::RetryDue { seq, attempt: next });
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
        let mut kinds = kinds;
        let mut to_dispatch = Vec::new();
        let mut timers = Vec::new();
        let mut close = false;
        for command in commands {
            match command {
                Command::ScheduleActivity {
                    seq,
                    activity,
                    input,
                    options,
                } => {
                    self.pending.insert(
                        seq,
                        Pending {
                            activity: activity.clone(),
                            input: input.clone(),
                            options: options.clone(),
                            attempt: 1,
                            due_ms: 0,
                            deadline_ms: options.schedule_to_close_ms.map(|d| at_ms + d),
                        },
                    );
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
                Command::CompleteWorkflow { output } => {
                    close = true;
                    kinds.push(EventKind::WorkflowCompleted { output });
                }
                Command::FailWorkflow { failure } => {
                    close = true;
                    kinds.push(EventKind::WorkflowFailed { failure });
                }
            }
        }
        if kinds.is_empty() {
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
        self.rt
            .journal
            .append(&self.run.run_id, events.clone())
            .await?;
        self.next_event_id += events.len() as u32;
        self.run.last_event_id = self.next_event_id - 1;
        for e in &events {
            if matches!(
                e.kind,
                EventKind::ActivityScheduled { .. } | EventKind::TimerStarted { .. }
            ) {
                self.exec.apply(e)?;
            }
        }
        for (seq, duration_ms) in timers {
            myself.send_after(Duration::from_millis(duration_ms), move || {
                ExecMsg::TimerDue { seq }
            });
        }
        for &seq in &to_dispatch {
            if let Some(d) = self
                .pending
                .get(&seq)
                .and_then(|p| p.options.schedule_to_close_ms)
            {
                myself.send_after(Duration::from_millis(d), move || ExecMsg::Deadline { seq });
            }
        }
        self.dispatch(&to_dispatch, false).await?;
        if close {
            self.run.closed_ms = Some(at_ms);
            tracing::info!(workflow_id = %self.run.workflow_id, run_id = %self.run.run_id,
                outcome = events.last().map_or("", |e| e.kind.name()), "workflow closed");
            let _ = self.rt.closed.send(self.run.workflow_id.clone());
            myself.stop(Some("closed".into()));
        }
        Ok(())
    }

    /// Publishes the current attempt of each activity. With `check_queued`, an attempt whose
    /// task JetStream still holds is left alone (after a restart).
    async fn dispatch(
        &mut self,
        seqs: &[u32],
        check_queued: bool,
    ) -> Result<(), ActorProcessingErr> {
        let mut acks = Vec::with_capacity(seqs.len());
        for seq in seqs {
            let Some(p) = self.pending.get(seq) else {
                continue;
            };
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
            };
            let mut headers = HeaderMap::new();
            headers.insert(
                async_nats::header::NATS_MESSAGE_ID,
                task_msg_id(&self.run.run_id, *seq, p.attempt).as_str(),
            );
            let bytes = codec::encode(&task)?;
            tracing::debug!(run_id = %self.run.run_id, seq, attempt = p.attempt, activity = %p.activity, "dispatching task");
            acks.push(
                self.rt
                    .streams
                    .js
                    .publish_with_headers(task_subject, headers, bytes.into())
                    .await?,
            );
        }
        for ack in acks {
            ack.await?;
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
}

pub(crate) struct SupervisorState {
    rt: Arc<Runtime>,
    by_actor: HashMap<ActorId, String>,
    restarts: HashMap<String, u32>,
}

/// Restarts in a row after which a failing execution is left for the next node restart.
const MAX_RESTARTS: u32 = 10;

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
            SupervisorMsg::Restart { run_id } => {
                let Some(run) = state.rt.journal.run(&run_id)? else {
                    return Ok(());
                };
                if run.closed_ms.is_some() {
                    return Ok(());
                }
                if let Err(e) = state.rt.journal.reconcile_mirror(&run_id).await {
                    tracing::warn!(%run_id, error = %e, "mirror not repaired yet; retrying the restart");
                    myself.send_after(Duration::from_secs(1), move || SupervisorMsg::Restart {
                        run_id,
                    });
                    return Ok(());
                }
                let history = state.rt.journal.history(&run_id)?;
                let args = ExecArgs {
                    rt: state.rt.clone(),
                    run,
                    history,
                    recovering: true,
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
                    let n = state.restarts.entry(run_id.clone()).or_default();
                    *n += 1;
                    if *n > MAX_RESTARTS {
                        tracing::error!(%run_id, %error, "execution failed {MAX_RESTARTS} times in a row; left for the next node restart");
                        return Ok(());
                    }
                    let backoff = Duration::from_millis(100 * 2u64.pow((*n).min(6)));
                    tracing::warn!(%run_id, %error, restart_in_ms = backoff.as_millis() as u64, "execution failed; restarting from its journal");
                    myself.send_after(backoff, move || SupervisorMsg::Restart { run_id });
                }
            }
            _ => {}
        }
        Ok(())
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
    match Actor::spawn_linked(None, ExecutionActor, args, myself.get_cell()).await {
        Ok((actor, _)) => {
            state.by_actor.insert(actor.get_id(), run_id.clone());
            state
                .rt
                .executions
                .lock()
                .expect("executions lock")
                .insert(run_id, actor);
        }
        Err(e) => {
            let n = state.restarts.entry(run_id.clone()).or_default();
            *n += 1;
            if *n <= MAX_RESTARTS {
                tracing::warn!(%run_id, error = %e, "execution did not start; retrying");
                myself.send_after(Duration::from_millis(200 * u64::from(*n)), move || {
                    SupervisorMsg::Restart { run_id }
                });
            } else {
                tracing::error!(%run_id, error = %e, "execution did not start; left for the next node restart");
            }
        }
    }
    Ok(())
}
