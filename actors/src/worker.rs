//! Worker pools. A [`Pool`] actor serves one task queue: it pulls tasks from the queue's
//! durable JetStream consumer, never more than it has free slots, and supervises one
//! [`Runner`] actor per running activity.
//!
//! - A runner heartbeats to its pool through its [`ActivityContext`]; the pool kills a
//!   runner that misses its heartbeat deadline or overruns its start-to-close timeout and
//!   reports the attempt failed. A runner that panics is reported failed at once.
//! - While a task runs, the pool tells JetStream every second that it is in progress.
//! - The pool actor awaits no KV write: heartbeat details go through a writer task per
//!   attempt ([`DetailsWriter`], flushed before the attempt reports), liveness puts are
//!   spawned, and the runner reads an earlier attempt's details. A pool that awaited these
//!   fsync'd writes held every slot's start, heartbeat and result behind each of them.
//! - A finished attempt's report is a request to the orchestrator (`baton.report.<run_id>`),
//!   answered once the journal holds its outcome; a reporter task asks until it is
//!   answered, still telling JetStream that the task is in progress, and only then acks the
//!   task. So if the worker process dies before that, the task is redelivered to another
//!   worker once `TASK_ACK_WAIT` passes. The slot is free as soon as the activity returns.

use std::{
    collections::{HashMap, HashSet},
    sync::{
        Arc,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use async_nats::jetstream::{self, AckKind, consumer::PullConsumer};
use baton_transport::{
    Payload, codec, faults,
    jetstream::{Streams, heartbeat_key},
    subject,
    wire::{ActivityOutcome, ActivityReport, ActivityTask, Failure, Liveness, ReportAck},
};
use futures::StreamExt;
use ractor::{Actor, ActorCell, ActorId, ActorProcessingErr, ActorRef, SupervisionEvent};

use crate::{
    activity::{ActivityContext, ActivityInfo},
    error::ActivityError,
    registry::{ActivityFn, Registry},
};

/// How a pool is set up.
#[derive(Debug, Clone)]
pub struct PoolOptions {
    /// The task queue served.
    pub queue: String,
    /// Most activities run at once.
    pub concurrency: usize,
    /// This worker's name in reports.
    pub worker_id: String,
}

/// Handle on a running pool.
pub struct PoolHandle {
    /// The supervisor that keeps a pool actor running.
    pub supervisor: ActorRef<SupervisorMsg>,
    join: tokio::task::JoinHandle<()>,
    /// The watches of cancellations and of orchestrator starts.
    watch: tokio::task::JoinHandle<()>,
}

impl PoolHandle {
    /// The pool actor running now (a new one after each restart).
    pub async fn pool(&self) -> Option<ActorRef<PoolMsg>> {
        ractor::call_t!(self.supervisor, SupervisorMsg::Current, 5_000)
            .ok()
            .flatten()
    }

    /// How many times the pool actor was restarted.
    pub async fn restarts(&self) -> u64 {
        ractor::call_t!(self.supervisor, SupervisorMsg::Restarts, 5_000).unwrap_or(0)
    }

    /// Graceful shutdown: starts no more tasks, lets the running activities finish and
    /// report for up to `grace`, then stops (what still runs is abandoned and its tasks are
    /// redelivered to other workers). Returns how many were abandoned.
    pub async fn shutdown(self, grace: Duration) -> usize {
        let deadline = Instant::now() + grace;
        let mut running = 0;
        // Reports on their way count: a shutdown waits for their answers too.
        if let Some(pool) = self.pool().await {
            let _ = pool.send_message(PoolMsg::Drain);
            loop {
                running = ractor::call_t!(pool, PoolMsg::Running, 5_000).unwrap_or(0);
                if running == 0 || Instant::now() >= deadline {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        if running > 0
            && let Some(pool) = self.pool().await
        {
            tracing::warn!(
                running,
                "grace period over; handing running activities back"
            );
            running = ractor::call_t!(pool, PoolMsg::Abandon, 5_000).unwrap_or(running);
        }
        self.stop().await;
        running
    }

    /// Stops the pool (running activities are abandoned; their tasks are redelivered).
    pub async fn stop(self) {
        self.watch.abort();
        self.supervisor.stop(None);
        let _ = self.join.await;
    }
}

/// Messages of a pool's supervisor.
pub enum SupervisorMsg {
    /// The pool actor running now.
    Current(ractor::RpcReplyPort<Option<ActorRef<PoolMsg>>>),
    /// How many restarts so far.
    Restarts(ractor::RpcReplyPort<u64>),
    /// Start a pool actor (at start-up, and after one died).
    Spawn,
}

/// Keeps one pool actor running: a pool that panics or is killed is replaced. Its running
/// tasks are not acked, so JetStream redelivers them to the new pool (or another worker).
pub struct PoolSupervisor;

/// The supervisor's state.
pub struct PoolSupervisorState {
    args: PoolArgs,
    pool: Option<ActorRef<PoolMsg>>,
    restarts: u64,
}

impl Actor for PoolSupervisor {
    type Msg = SupervisorMsg;
    type State = PoolSupervisorState;
    type Arguments = PoolArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<SupervisorMsg>,
        args: PoolArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_message(SupervisorMsg::Spawn)?;
        Ok(PoolSupervisorState {
            args,
            pool: None,
            restarts: 0,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Current(reply) => {
                let _ = reply.send(state.pool.clone());
            }
            SupervisorMsg::Restarts(reply) => {
                let _ = reply.send(state.restarts);
            }
            SupervisorMsg::Spawn => {
                if state.pool.is_none() {
                    match Actor::spawn_linked(None, Pool, state.args.clone(), myself.get_cell())
                        .await
                    {
                        Ok((pool, _)) => state.pool = Some(pool),
                        Err(e) => {
                            tracing::error!(error = %e, queue = %state.args.options.queue, "pool did not start; retrying");
                            myself.send_after(Duration::from_secs(1), || SupervisorMsg::Spawn);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, why) = match evt {
            SupervisionEvent::ActorFailed(cell, e) => (cell, format!("failed: {e}")),
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                (cell, format!("stopped: {reason:?}"))
            }
            _ => return Ok(()),
        };
        if state
            .pool
            .as_ref()
            .is_some_and(|p| p.get_id() == cell.get_id())
        {
            state.pool = None;
            state.restarts += 1;
            tracing::warn!(queue = %state.args.options.queue, restarts = state.restarts, %why, "pool actor died; restarting it");
            myself.send_after(Duration::from_millis(100), || SupervisorMsg::Spawn);
        }
        Ok(())
    }
}

/// Starts a pool for `options.queue`.
pub async fn start_pool(
    streams: Streams,
    registry: Arc<Registry>,
    options: PoolOptions,
) -> Result<PoolHandle, ActorProcessingErr> {
    baton_transport::ids::validate_name("task queue", &options.queue)?;
    let consumer = streams.queue_consumer(&options.queue).await?;
    let cancels = Arc::new(std::sync::Mutex::new(HashSet::new()));
    // Subscribed before the pool runs, so no announcement is missed once reports are sent.
    let started = streams
        .js
        .client()
        .subscribe(subject::ORCHESTRATOR_STARTED)
        .await?;
    let (starts, orchestrator_starts) = tokio::sync::watch::channel(0u64);
    let watch = tokio::spawn({
        let cancels = watch_cancels(streams.cancels.clone(), cancels.clone());
        async move {
            tokio::join!(cancels, count_orchestrator_starts(started, starts));
        }
    });
    let args = PoolArgs {
        streams,
        consumer,
        registry,
        options,
        cancels,
        reporting: Arc::new(AtomicUsize::new(0)),
        orchestrator_starts,
    };
    let (supervisor, join) = Actor::spawn(None, PoolSupervisor, args).await?;
    Ok(PoolHandle {
        supervisor,
        join,
        watch,
    })
}

/// Keeps `set` equal to the keys of the cancellation bucket (marks already there, then each
/// new one), re-watching after an error.
async fn watch_cancels(kv: jetstream::kv::Store, set: Arc<std::sync::Mutex<HashSet<String>>>) {
    loop {
        match kv.watch_with_history(">").await {
            Ok(mut watch) => {
                while let Some(entry) = watch.next().await {
                    match entry {
                        Ok(e) if e.operation == jetstream::kv::Operation::Put => {
                            set.lock().expect("cancels lock").insert(e.key);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "cancellation watch failed");
                            break;
                        }
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e, "cancellation watch not started"),
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

/// Counts the orchestrator nodes' start announcements (`subject::ORCHESTRATOR_STARTED`):
/// each one makes the reporters waiting for an answer ask again (see [`report_and_ack`]).
async fn count_orchestrator_starts(
    mut started: async_nats::Subscriber,
    starts: tokio::sync::watch::Sender<u64>,
) {
    while started.next().await.is_some() {
        starts.send_modify(|n| *n += 1);
    }
}

/// Messages of a pool.
pub enum PoolMsg {
    /// Pull more tasks if slots are free.
    Fetch,
    /// Start no more tasks (graceful shutdown): tasks still delivered go back to the queue.
    Drain,
    /// How many activities are running or have reports on their way to the orchestrator.
    Running(ractor::RpcReplyPort<usize>),
    /// End of a graceful shutdown's grace period: hand the running tasks back to the queue
    /// at once (for other workers) and stop their runners; answered when done.
    Abandon(ractor::RpcReplyPort<usize>),
    /// A task pulled from JetStream.
    Delivered(Box<jetstream::Message>),
    /// A pull request ended.
    FetchDone {
        /// Slots it had reserved.
        requested: usize,
        /// Tasks it delivered.
        received: usize,
    },
    /// A runner's heartbeat.
    Heartbeat {
        /// The running task's key.
        key: u64,
        /// Progress details.
        details: Option<Payload>,
    },
    /// A runner finished its activity.
    Finished {
        /// The running task's key.
        key: u64,
        /// What the activity returned.
        result: Result<Payload, ActivityError>,
    },
    /// Periodic: progress acks and deadline checks.
    Tick,
    /// Fault injection only (the chaos suite): the pool panics in its handler, as a bug
    /// would, and its supervisor must replace it. Sent by nothing but the fault hook of a
    /// worker started with `BATON_CHAOS_FAULTS=1` (`baton_orchestrator::faults`).
    InjectPanic,
}

/// What a pool is started with.
#[derive(Clone)]
pub struct PoolArgs {
    streams: Streams,
    consumer: PullConsumer,
    registry: Arc<Registry>,
    options: PoolOptions,
    /// Activities (`<run_id>.<seq>`) whose workflow asked them to stop, fed by a watch on
    /// the `BATON_CANCELS` bucket.
    cancels: Arc<std::sync::Mutex<HashSet<String>>>,
    /// Reports on their way to the orchestrator (their tasks not acked yet), across the
    /// pool actor's restarts.
    reporting: Arc<AtomicUsize>,
    /// How many orchestrator starts were announced since the pool started.
    orchestrator_starts: tokio::sync::watch::Receiver<u64>,
}

struct Running {
    task: ActivityTask,
    message: jetstream::Message,
    runner: ActorRef<RunnerMsg>,
    started: Instant,
    last_heartbeat: Instant,
    /// When the orchestrator was last told this attempt is alive (`BATON_LIVENESS`), for
    /// attempts it watches.
    liveness_written: Option<Instant>,
    /// Set when the pool killed the runner, with the failure to report.
    killed: Option<Failure>,
    /// Stores the attempt's heartbeat details, once it sends some.
    details: Option<DetailsWriter>,
}

/// Stores an attempt's heartbeat details in `BATON_HEARTBEATS` in the order the activity
/// sent them, off the pool actor: a put is an fsync'd JetStream write, and a pool that
/// awaited it would hold every other slot's start, heartbeat and result behind it. Details
/// sent while a put is under way are coalesced to the latest (only the last one is ever
/// read: by a later attempt, to resume). A failed attempt's report waits for
/// [`Self::flush`], so its details are durable before the orchestrator learns it failed
/// and can start another.
struct DetailsWriter {
    tx: tokio::sync::mpsc::UnboundedSender<Payload>,
    done: tokio::task::JoinHandle<()>,
}

impl DetailsWriter {
    fn spawn(kv: jetstream::kv::Store, task: &ActivityTask) -> Self {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Payload>();
        let key = heartbeat_key(&task.run_id, task.seq);
        let (run_id, seq) = (task.run_id.clone(), task.seq);
        let done = tokio::spawn(async move {
            while let Some(mut details) = rx.recv().await {
                while let Ok(newer) = rx.try_recv() {
                    details = newer;
                }
                let put = kv.put(key.clone(), details.0.into());
                if let Err(e) = faults::call("heartbeat details put", put).await {
                    tracing::warn!(error = %e, %run_id, seq, "heartbeat details not stored");
                }
            }
        });
        DetailsWriter { tx, done }
    }

    fn send(&self, details: Payload) {
        // The writer ends only once this sender is dropped.
        let _ = self.tx.send(details);
    }

    /// Waits until every detail sent is stored (or failed to be).
    async fn flush(self) {
        drop(self.tx);
        let _ = self.done.await;
    }
}

/// The pool actor.
pub struct Pool;

/// The pool's state.
pub struct PoolState {
    args: PoolArgs,
    running: HashMap<u64, Running>,
    by_actor: HashMap<ActorId, u64>,
    reserved: usize,
    fetching: bool,
    next_key: u64,
    /// Shutting down: no new tasks.
    draining: bool,
}

impl PoolState {
    fn free(&self) -> usize {
        self.args
            .options
            .concurrency
            .saturating_sub(self.running.len() + self.reserved)
    }
}

impl Actor for Pool {
    type Msg = PoolMsg;
    type State = PoolState;
    type Arguments = PoolArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<PoolMsg>,
        args: PoolArgs,
    ) -> Result<PoolState, ActorProcessingErr> {
        myself.send_interval(Duration::from_secs(1), || PoolMsg::Tick);
        myself.send_message(PoolMsg::Fetch)?;
        tracing::info!(queue = %args.options.queue, concurrency = args.options.concurrency, worker = %args.options.worker_id, "worker pool started");
        Ok(PoolState {
            args,
            running: HashMap::new(),
            by_actor: HashMap::new(),
            reserved: 0,
            fetching: false,
            next_key: 0,
            draining: false,
        })
    }

    async fn handle(
        &self,
        myself: ActorRef<PoolMsg>,
        msg: PoolMsg,
        state: &mut PoolState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            PoolMsg::Fetch => fetch(&myself, state),
            PoolMsg::Drain => state.draining = true,
            PoolMsg::Running(reply) => {
                let _ =
                    reply.send(state.running.len() + state.args.reporting.load(Ordering::Acquire));
            }
            PoolMsg::Abandon(reply) => {
                let n = state.running.len();
                for (_, r) in state.running.drain() {
                    r.runner.kill();
                    if let Err(e) = r.message.ack_with(AckKind::Nak(None)).await {
                        tracing::warn!(error = %e, run_id = %r.task.run_id, seq = r.task.seq, "task not handed back; it is redelivered after its ack wait");
                    }
                }
                let _ = reply.send(n);
            }
            PoolMsg::Delivered(message) => {
                state.reserved = state.reserved.saturating_sub(1);
                if state.draining {
                    // Back to the queue at once, for another worker.
                    let _ = message.ack_with(AckKind::Nak(None)).await;
                } else {
                    start_task(&myself, state, *message).await?;
                }
            }
            PoolMsg::FetchDone {
                requested,
                received,
            } => {
                state.reserved = state
                    .reserved
                    .saturating_sub(requested.saturating_sub(received));
                state.fetching = false;
                fetch(&myself, state);
            }
            PoolMsg::Heartbeat { key, details } => {
                if let Some(r) = state.running.get_mut(&key) {
                    r.last_heartbeat = Instant::now();
                    if let Some(details) = details {
                        // Stored before the attempt is reported (a later attempt resumes
                        // here), without holding the pool.
                        r.details
                            .get_or_insert_with(|| {
                                DetailsWriter::spawn(state.args.streams.heartbeats.clone(), &r.task)
                            })
                            .send(details);
                    }
                }
            }
            PoolMsg::Finished { key, result } => {
                if let Some(r) = state.running.remove(&key) {
                    // The pool stops the runner once it holds the result, so a termination
                    // event can never overtake the result.
                    state.by_actor.remove(&r.runner.get_id());
                    r.runner.stop(None);
                    let outcome = match result {
                        Ok(result) => ActivityOutcome::Completed { result },
                        Err(e) => ActivityOutcome::Failed { failure: e.into() },
                    };
                    finish(state, r.task, r.message, r.started, outcome, r.details);
                    fetch(&myself, state);
                }
            }
            PoolMsg::Tick => tick(state).await,
            PoolMsg::InjectPanic => panic!("fault injection: pool panic requested"),
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        myself: ActorRef<PoolMsg>,
        evt: SupervisionEvent,
        state: &mut PoolState,
    ) -> Result<(), ActorProcessingErr> {
        let (cell, failure): (ActorCell, Option<Failure>) = match evt {
            SupervisionEvent::ActorTerminated(cell, _, _) => (cell, None),
            SupervisionEvent::ActorFailed(cell, error) => (
                cell,
                Some(Failure {
                    kind: "ActivityPanic".into(),
                    message: format!("the activity panicked: {error}"),
                    retryable: true,
                }),
            ),
            _ => return Ok(()),
        };
        let Some(key) = state.by_actor.remove(&cell.get_id()) else {
            return Ok(());
        };
        let Some(mut r) = state.running.remove(&key) else {
            return Ok(());
        };
        // Killed by the pool (deadline) or died on its own (panic): report it failed.
        let failure = r.killed.take().or(failure).unwrap_or(Failure {
            kind: "RunnerStopped".into(),
            message: "the runner stopped without a result".into(),
            retryable: true,
        });
        tracing::warn!(activity = %r.task.activity, run_id = %r.task.run_id, seq = r.task.seq, attempt = r.task.attempt,
            kind = %failure.kind, "activity attempt failed in the worker");
        finish(
            state,
            r.task,
            r.message,
            r.started,
            ActivityOutcome::Failed { failure },
            r.details,
        );
        fetch(&myself, state);
        Ok(())
    }
}

/// How long one pull for tasks waits on the server for them.
const PULL_EXPIRES: Duration = Duration::from_secs(5);
/// How often a pull under way checks that the connection it was sent on still stands.
const RECONNECT_CHECK: Duration = Duration::from_millis(100);

/// Starts a pull for as many tasks as there are free slots, unless one is under way.
fn fetch(myself: &ActorRef<PoolMsg>, state: &mut PoolState) {
    let free = state.free();
    if state.fetching || free == 0 || state.draining {
        return;
    }
    state.fetching = true;
    state.reserved += free;
    let consumer = state.args.consumer.clone();
    let streams = state.args.streams.clone();
    let queue = state.args.options.queue.clone();
    let pool = myself.clone();
    tokio::spawn(async move {
        let mut received = 0;
        let mut failed = false;
        // A pull request lives on the server it was sent to: after a reconnect (the server
        // restarted, or the connection broke) nothing will answer it.
        let connection = streams.js.client().statistics();
        let connects = connection
            .connects
            .load(std::sync::atomic::Ordering::Relaxed);
        match consumer
            .batch()
            .max_messages(free)
            .expires(PULL_EXPIRES)
            .messages()
            .await
        {
            Ok(mut batch) => {
                let mut check = tokio::time::interval(RECONNECT_CHECK);
                loop {
                    let item = tokio::select! {
                        item = batch.next() => match item {
                            Some(item) => item,
                            None => break,
                        },
                        _ = check.tick() => {
                            if connection.connects.load(std::sync::atomic::Ordering::Relaxed) != connects {
                                tracing::warn!("reconnected to NATS during a pull; pulling again");
                                failed = true;
                                break;
                            }
                            continue;
                        }
                    };
                    match item {
                        Ok(m) => {
                            received += 1;
                            let _ = pool.send_message(PoolMsg::Delivered(Box::new(m)));
                        }
                        Err(e) => {
                            // A pull cut off because the pool or the server is stopping is
                            // not worth a warning.
                            if pool.get_status() == ractor::ActorStatus::Running {
                                tracing::warn!(error = %e, "pull failed");
                                failed = true;
                            } else {
                                tracing::debug!(error = %e, "pull ended with the pool");
                            }
                            break;
                        }
                    }
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "pull request failed");
                tokio::time::sleep(Duration::from_millis(500)).await;
                failed = true;
            }
        }
        if failed {
            // The server may have restarted without the task queue (a memory stream) and
            // with it this queue's consumer: recreate both (the consumer is named, so the
            // pool's handle works again).
            let rebound = async {
                streams.ensure_queues().await?;
                streams.queue_consumer(&queue).await
            };
            if let Err(e) = rebound.await {
                tracing::debug!(error = %e, "task queue not rebound yet");
            }
        }
        let _ = pool.send_message(PoolMsg::FetchDone {
            requested: free,
            received,
        });
    });
}

async fn start_task(
    myself: &ActorRef<PoolMsg>,
    state: &mut PoolState,
    message: jetstream::Message,
) -> Result<(), ActorProcessingErr> {
    let task: ActivityTask = match codec::decode(&message.payload) {
        Ok(t) => t,
        Err(e) => {
            tracing::error!(subject = %message.subject, error = %e, "poison task terminated");
            let _ = message.ack_with(AckKind::Term).await;
            return Ok(());
        }
    };
    stage!("task.received", run = %task.run_id, seq = task.seq, attempt = task.attempt);
    let Some(f): Option<ActivityFn> = state.args.registry.activity_fn(&task.activity).cloned()
    else {
        tracing::error!(activity = %task.activity, "task for an activity this worker does not have");
        let failure = Failure {
            kind: "UnknownActivity".into(),
            message: format!(
                "worker {} has no activity {:?}",
                state.args.options.worker_id, task.activity
            ),
            retryable: false,
        };
        finish(
            state,
            task,
            message,
            Instant::now(),
            ActivityOutcome::Failed { failure },
            None,
        );
        return Ok(());
    };
    let key = state.next_key;
    state.next_key += 1;
    let info = ActivityInfo {
        workflow_id: task.workflow_id.clone(),
        run_id: task.run_id.clone(),
        activity: task.activity.clone(),
        seq: task.seq,
        attempt: task.attempt,
    };
    let pool = myself.clone();
    // The workflow's cancellation reaches the activity at its heartbeats (and at once when
    // it was requested before this attempt started).
    let cancel_key = heartbeat_key(&task.run_id, task.seq);
    let cancels = state.args.cancels.clone();
    let cancelled = Arc::new(AtomicBool::new(
        cancels.lock().expect("cancels lock").contains(&cancel_key),
    ));
    let flag = cancelled.clone();
    let ctx = ActivityContext::new(info, move |details| {
        if cancels.lock().expect("cancels lock").contains(&cancel_key) {
            flag.store(true, Ordering::Release);
        }
        let _ = pool.send_message(PoolMsg::Heartbeat { key, details });
    })
    .with_cancel_flag(cancelled);
    let delivered = message.info().map(|i| i.delivered).unwrap_or(1);
    tracing::info!(activity = %task.activity, workflow_id = %task.workflow_id, run_id = %task.run_id, seq = task.seq,
        attempt = task.attempt, delivered, "activity started");
    let args = RunnerArgs {
        f,
        ctx,
        input: task.input.clone(),
        key,
        pool: myself.clone(),
        // Activities that heartbeat may resume from the details an earlier attempt stored;
        // the runner reads them, so the pool does not wait on the read. A first attempt
        // delivered for the first time has none to read (unless a NATS server restart lost
        // its task while it ran and the orchestrator published it again: it then starts
        // over, which an activity must allow; resuming only saves work).
        resume: task
            .heartbeat_timeout_ms
            .filter(|_| task.attempt > 1 || delivered > 1)
            .map(|_| {
                (
                    state.args.streams.heartbeats.clone(),
                    heartbeat_key(&task.run_id, task.seq),
                )
            }),
    };
    // The orchestrator watches this attempt's start and heartbeats: tell it it started.
    let watched = task.liveness || task.heartbeat_timeout_ms.is_some();
    if watched {
        write_liveness(&state.args, &task);
    }
    let (runner, _) = Actor::spawn_linked(None, Runner, args, myself.get_cell()).await?;
    let now = Instant::now();
    state.by_actor.insert(runner.get_id(), key);
    state.running.insert(
        key,
        Running {
            task,
            message,
            runner,
            started: now,
            last_heartbeat: now,
            liveness_written: watched.then_some(now),
            killed: None,
            details: None,
        },
    );
    Ok(())
}

/// Records in `BATON_LIVENESS` that this worker runs the task's attempt (the entry's server
/// time says when). The put (an fsync'd JetStream write) runs on its own task: the pool
/// does not wait for it. Puts of one attempt carry the same value, so their order does not
/// matter; one that fails only makes the orchestrator's view of the attempt older, which
/// the next heartbeat's put refreshes.
fn write_liveness(args: &PoolArgs, task: &ActivityTask) {
    let live = Liveness {
        attempt: task.attempt,
        worker: args.options.worker_id.clone(),
    };
    let bytes = match codec::encode(&live) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "liveness not encodable");
            return;
        }
    };
    let key = heartbeat_key(&task.run_id, task.seq);
    let kv = args.streams.liveness.clone();
    let (run_id, seq) = (task.run_id.clone(), task.seq);
    tokio::spawn(async move {
        if let Err(e) = faults::call("liveness put", kv.put(key, bytes.into())).await {
            tracing::warn!(error = %e, %run_id, seq, "liveness not stored");
        }
    });
}

/// How long a reporter waits for the orchestrator's answer before asking again, unless an
/// orchestrator node announces its start meanwhile (the one asked may have died with the
/// report): then it asks again at once.
pub const REPORT_ANSWER_WAIT: Duration = Duration::from_secs(10);
/// The first and the longest pause between two tries of a report.
const REPORT_RETRY_FIRST: Duration = Duration::from_millis(50);
const REPORT_RETRY_MAX: Duration = Duration::from_secs(2);
/// How often a task whose report is on its way is said to be in progress (well inside
/// `TASK_ACK_WAIT`).
const REPORT_PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// Hands an attempt's outcome to a reporter task, which (for a failed attempt) waits until
/// the attempt's heartbeat details are stored, asks the orchestrator to record the outcome
/// and then acks the task (see [`report_and_ack`]). The pool goes on at once: the slot is
/// free.
fn finish(
    state: &PoolState,
    task: ActivityTask,
    message: jetstream::Message,
    started: Instant,
    outcome: ActivityOutcome,
    details: Option<DetailsWriter>,
) {
    let mut report = ActivityReport {
        workflow_id: task.workflow_id.clone(),
        run_id: task.run_id.clone(),
        seq: task.seq,
        attempt: task.attempt,
        worker: state.args.options.worker_id.clone(),
        outcome,
    };
    let limit = state.args.streams.js_max_payload();
    let mut bytes = match codec::encode(&report) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "report not encodable");
            return;
        }
    };
    if bytes.len() > limit {
        let size = bytes.len();
        report.outcome = ActivityOutcome::Failed {
            failure: Failure {
                kind: "PayloadTooLarge".into(),
                message: format!("the activity's result is {size} bytes; the limit is {limit}"),
                retryable: false,
            },
        };
        bytes = codec::encode(&report).unwrap_or_default();
    }
    let outcome = match &report.outcome {
        ActivityOutcome::Completed { .. } => "completed",
        ActivityOutcome::Failed { .. } => "failed",
    };
    // Only a failed attempt's details are read again (its retry resumes from them): the
    // report of a completed one does not wait for them (their writer finishes alone).
    let details = details.filter(|_| matches!(report.outcome, ActivityOutcome::Failed { .. }));
    let client = state.args.streams.js.client();
    let reporting = state.args.reporting.clone();
    let mut starts = state.args.orchestrator_starts.clone();
    starts.mark_unchanged();
    reporting.fetch_add(1, Ordering::AcqRel);
    tokio::spawn(async move {
        report_and_ack(&client, &task, &message, bytes.into(), starts, details).await;
        reporting.fetch_sub(1, Ordering::AcqRel);
        tracing::info!(activity = %task.activity, run_id = %task.run_id, seq = task.seq, attempt = task.attempt, outcome,
            ms = started.elapsed().as_millis() as u64, "activity finished");
    });
}

/// Asks the orchestrator to record a report (a request on `baton.report.<run_id>`, answered
/// once its journal holds the outcome, or knows it stale), again until it is answered,
/// telling JetStream every second meanwhile that the task is in progress; then acks the
/// task. While the orchestrator is down (no responders) or its journal fails, the report
/// waits here, held in memory: if this process dies first, the unacked task is redelivered
/// and the attempt runs again. A node that took the request and died never answers: when
/// `starts` says an orchestrator node started meanwhile, the report is asked again at once
/// (asking twice is harmless: a recorded report is answered settled). First, given a failed
/// attempt's `details`, it waits until they are stored, so the retry resumes from the last.
async fn report_and_ack(
    client: &async_nats::Client,
    task: &ActivityTask,
    message: &jetstream::Message,
    bytes: bytes::Bytes,
    mut starts: tokio::sync::watch::Receiver<u64>,
    details: Option<DetailsWriter>,
) {
    let subject = subject::report(&task.run_id);
    let mut delay = REPORT_RETRY_FIRST;
    let mut progress = tokio::time::interval_at(
        tokio::time::Instant::now() + REPORT_PROGRESS_EVERY,
        REPORT_PROGRESS_EVERY,
    );
    if let Some(details) = details {
        with_progress(details.flush(), message, &mut progress).await;
    }
    for tries in 1u32.. {
        stage!("report.sent", run = %task.run_id, seq = task.seq, attempt = task.attempt);
        let mut node_started = false;
        let ask = faults::call("report request", async {
            let request = tokio::time::timeout(
                REPORT_ANSWER_WAIT,
                client.request(subject.clone(), bytes.clone()),
            );
            let answer = tokio::select! {
                answer = request => answer,
                () = announced(&mut starts) => {
                    node_started = true;
                    return Err("an orchestrator node started".to_string());
                }
            }
            .map_err(|_| "no answer in time".to_string())?
            .map_err(|e| e.to_string())?;
            let ack: ReportAck =
                codec::decode(&answer.payload).map_err(|e| format!("answer not readable: {e}"))?;
            match (ack.settled, ack.error) {
                (true, None) => Ok(()),
                (true, Some(e)) => {
                    tracing::error!(error = %e, run_id = %task.run_id, seq = task.seq, "report dropped by the orchestrator");
                    Ok(())
                }
                (false, e) => Err(e.unwrap_or_else(|| "not recorded".into())),
            }
        });
        let asked = with_progress(ask, message, &mut progress).await;
        match asked {
            Ok(()) => break,
            Err(_) if node_started => {
                tracing::info!(run_id = %task.run_id, seq = task.seq, attempt = task.attempt,
                    "an orchestrator node started while the report waited for an answer; asking again");
                delay = REPORT_RETRY_FIRST;
            }
            Err(e) => {
                if tries == 1 || tries.is_multiple_of(20) {
                    tracing::warn!(error = %e, run_id = %task.run_id, seq = task.seq, attempt = task.attempt, tries,
                        "report not recorded yet; asking again");
                }
                with_progress(tokio::time::sleep(delay), message, &mut progress).await;
                delay = (delay * 2).min(REPORT_RETRY_MAX);
            }
        }
    }
    // A plain ack, not a double one: waiting for the server's answer would cost a round
    // trip per task, and 5 s per task after a reconnect (the answer never comes from a
    // server that lost the queue). If the ack is lost the task is redelivered and its
    // second report dropped as stale: the recorded report is what counts.
    if let Err(e) = faults::call("task ack", message.ack()).await {
        tracing::warn!(error = %e, "task ack failed (it may be redelivered; its report is recorded)");
    }
}

/// Resolves when an orchestrator node announces its start; never once the pool stops (the
/// announcements' watch is gone).
async fn announced(starts: &mut tokio::sync::watch::Receiver<u64>) {
    if starts.changed().await.is_err() {
        std::future::pending::<()>().await;
    }
}

/// Awaits `f`, telling JetStream at each tick of `progress` meanwhile that the task is in
/// progress.
async fn with_progress<T>(
    f: impl std::future::Future<Output = T>,
    message: &jetstream::Message,
    progress: &mut tokio::time::Interval,
) -> T {
    tokio::pin!(f);
    loop {
        tokio::select! {
            r = &mut f => return r,
            _ = progress.tick() => progress_ack(message).await,
        }
    }
}

async fn progress_ack(message: &jetstream::Message) {
    if let Err(e) = faults::call("progress ack", message.ack_with(AckKind::Progress)).await {
        tracing::debug!(error = %e, "progress ack of a reported task failed");
    }
}

async fn tick(state: &mut PoolState) {
    let now = Instant::now();
    for r in state.running.values_mut() {
        if r.killed.is_some() {
            continue;
        }
        let over_time =
            now.duration_since(r.started) > Duration::from_millis(r.task.start_to_close_ms);
        let silent = r
            .task
            .heartbeat_timeout_ms
            .is_some_and(|hb| now.duration_since(r.last_heartbeat) > Duration::from_millis(hb));
        if over_time || silent {
            let (kind, message) = if over_time {
                (
                    "StartToCloseTimeout",
                    format!("ran longer than {} ms", r.task.start_to_close_ms),
                )
            } else {
                (
                    "HeartbeatTimeout",
                    format!(
                        "no heartbeat for {} ms",
                        r.task.heartbeat_timeout_ms.unwrap_or(0)
                    ),
                )
            };
            tracing::warn!(activity = %r.task.activity, run_id = %r.task.run_id, seq = r.task.seq, kind, "killing runner");
            r.killed = Some(Failure {
                kind: kind.into(),
                message,
                retryable: true,
            });
            r.runner.kill();
            continue;
        }
        if let Err(e) = faults::call("progress ack", r.message.ack_with(AckKind::Progress)).await {
            tracing::warn!(error = %e, "progress ack failed");
        }
    }
    // Heartbeats since the last tick reach the orchestrator (at most one write a second
    // per watched attempt).
    for r in state.running.values_mut() {
        if r.killed.is_none() && r.liveness_written.is_some_and(|w| r.last_heartbeat > w) {
            write_liveness(&state.args, &r.task);
            r.liveness_written = Some(now);
        }
    }
}

/// Messages of a runner.
pub enum RunnerMsg {
    /// Run the activity.
    Run,
}

/// Runs one activity attempt; the pool stops it once it has the result.
pub struct Runner;

/// What a runner runs.
pub struct RunnerArgs {
    f: ActivityFn,
    ctx: ActivityContext,
    input: Payload,
    key: u64,
    pool: ActorRef<PoolMsg>,
    /// Where an earlier attempt's heartbeat details may be stored, for an activity that
    /// heartbeats.
    resume: Option<(jetstream::kv::Store, String)>,
}

impl Actor for Runner {
    type Msg = RunnerMsg;
    type State = Option<RunnerArgs>;
    type Arguments = RunnerArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<RunnerMsg>,
        args: RunnerArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        myself.send_message(RunnerMsg::Run)?;
        Ok(Some(args))
    }

    async fn handle(
        &self,
        _: ActorRef<RunnerMsg>,
        _: RunnerMsg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        let Some(args) = state.take() else {
            return Ok(());
        };
        let ctx = match args.resume {
            Some((kv, key)) => {
                let details = match kv.get(key).await {
                    Ok(d) => d.map(|b| Payload(b.to_vec())),
                    Err(e) => {
                        tracing::warn!(error = %e, "heartbeat details not readable; starting from scratch");
                        None
                    }
                };
                args.ctx.with_details(details)
            }
            None => args.ctx,
        };
        // The step's key, copied only when stage timings are on.
        let step = tracing::enabled!(target: "baton::stage", tracing::Level::TRACE).then(|| {
            let info = ctx.info();
            (info.run_id.clone(), info.seq, info.attempt)
        });
        if let Some((run, seq, attempt)) = &step {
            stage!("activity.start", run = %run, seq = *seq, attempt = *attempt);
        }
        let result = (args.f)(ctx, args.input).await;
        if let Some((run, seq, attempt)) = &step {
            stage!("activity.end", run = %run, seq = *seq, attempt = *attempt);
        }
        let _ = args.pool.send_message(PoolMsg::Finished {
            key: args.key,
            result,
        });
        Ok(())
    }
}
