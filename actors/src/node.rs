//! The orchestrator node: it answers start and API requests at the edge, feeds workers'
//! reports to the execution actors, and on start-up recovers every open run from the
//! journal.
//!
//! Recovery: open runs are rebuilt first (replay, no activity runs again), then reports
//! are answered again (workers held them while the node was down and ask again), and the
//! tasks of in-flight attempts that JetStream no longer holds are republished. A worker
//! acks a task only once its report was answered, i.e. journaled: a task missing from the
//! queue is either recorded in the journal or was lost with a NATS server, never both.

use std::{
    collections::HashMap,
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use async_nats::{Client, HeaderMap};
use baton_transport::{
    Format, Payload,
    codec::{self, CONTENT_TYPE, MAX_EDGE_BODY},
    ids,
    jetstream::{QueuesCreated, Streams},
    subject,
    wire::{
        ActivityReport, CloseRequest, ErrorCode, ErrorReply, HistoryReply, HistoryRequest,
        IdConflictPolicy, ListReply, ListRequest, QueryReply, QueryRequest, ReportAck, ResultReply,
        ResultRequest, SignalReply, SignalRequest, StartReply, StartRequest, StartStatus,
        WorkflowInfo, WorkflowRef,
    },
};
use futures::StreamExt;
use ractor::{Actor, ActorRef};
use tokio::{sync::broadcast, task::JoinHandle};

use crate::{
    Execution, Registry,
    execution::{
        DeliveryError, ExecArgs, ExecMsg, Runtime, StartMode, Supervisor, SupervisorMsg, deliver,
        read_open_run,
    },
    history::{Event, EventKind},
    journal::{self, IdPolicies, Journal, RunRecord, RunStatus, StartOutcome},
    now_ms,
};

/// Longest a result request may wait.
const MAX_RESULT_WAIT: Duration = Duration::from_secs(300);
/// Queue group of the orchestrators' edge subscriptions.
const EDGE_QUEUE_GROUP: &str = "baton-orchestrators";

/// How an orchestrator node is set up.
#[derive(Clone)]
pub struct NodeOptions {
    /// Where the journal file lives (`<data_dir>/journal.redb`).
    pub data_dir: PathBuf,
    /// Evict an open execution from memory once it has been idle this long; it is rebuilt
    /// by replaying its journal when a message for it or one of its timers comes. Zero
    /// evicts after every step (every step replays: a determinism check under load);
    /// `None` keeps every open execution in memory.
    pub evict_idle: Option<Duration>,
    /// Most executions kept in memory: beyond it, the longest-resident ones that only wait
    /// are evicted (rebuilt by replay when needed), so memory stays bounded however many
    /// runs are open.
    pub max_cached: usize,
    /// Faults injected into the journal's storage (chaos tests only).
    pub storage_faults: Option<Arc<crate::storage::StorageFaults>>,
}

impl NodeOptions {
    /// A node keeping its journal in `data_dir`, evicting executions idle for a minute.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        NodeOptions {
            data_dir: data_dir.into(),
            evict_idle: Some(DEFAULT_EVICT_IDLE),
            max_cached: DEFAULT_MAX_CACHED,
            storage_faults: None,
        }
    }
}

/// How long an execution stays in memory idle, by default.
pub const DEFAULT_EVICT_IDLE: Duration = Duration::from_secs(60);
/// How many executions stay in memory at most, by default (about 20 KiB each).
pub const DEFAULT_MAX_CACHED: usize = 10_000;

/// Errors starting a node.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// NATS / JetStream setup failed.
    #[error(transparent)]
    Transport(#[from] baton_transport::Error),
    /// The journal could not be opened or read.
    #[error(transparent)]
    Journal(#[from] journal::Error),
    /// An actor could not be spawned.
    #[error("actor: {0}")]
    Actor(String),
    /// I/O on the data directory.
    #[error("data dir: {0}")]
    Io(#[from] std::io::Error),
}

/// A running orchestrator node.
pub struct Orchestrator {
    rt: Arc<Runtime>,
    supervisor: ActorRef<SupervisorMsg>,
    tasks: Vec<JoinHandle<()>>,
    recovered: usize,
}

impl Orchestrator {
    /// Starts a node on `client` serving the workflows of `registry`.
    pub async fn start(
        client: Client,
        registry: Registry,
        options: NodeOptions,
    ) -> Result<Orchestrator, Error> {
        let began = std::time::Instant::now();
        std::fs::create_dir_all(&options.data_dir)?;
        let streams = Streams::ensure(&client).await?;
        let queues = streams.ensure_queues().await?;
        let journal = Journal::open_with(
            &options.data_dir.join("journal.redb"),
            Some(streams.clone()),
            options.storage_faults.clone(),
        )?;
        let (closed, _) = broadcast::channel(4096);
        let rt = Arc::new(Runtime {
            journal,
            streams: streams.clone(),
            registry: Arc::new(registry),
            closed,
            executions: Mutex::new(HashMap::new()),
            supervisor: OnceLock::new(),
            evict_idle: options.evict_idle,
            max_cached: options.max_cached.max(1),
            rehydrations: Default::default(),
        });
        let (supervisor, _) = Actor::spawn(None, Supervisor, rt.clone())
            .await
            .map_err(|e| Error::Actor(e.to_string()))?;
        let _ = rt.supervisor.set(supervisor.clone());

        // 1. Rebuild every open run from the journal, once its two stores agree (they
        // differ by at most its last group commit: one JetStream read, a republish or an
        // adoption if they do). Each run is handed to the supervisor as soon as it is
        // read: the first runs resume while the others are still being read, never more
        // than `RECOVERY_AHEAD` ahead of the supervisor (each one's history waits in its
        // mailbox).
        rt.journal.reconcile_mirror().await?;
        let open = rt.journal.open_runs()?;
        let recovered = open.len();
        tracing::info!(
            recovered,
            ms = began.elapsed().as_millis() as u64,
            "open runs read"
        );
        for (n, run) in open.into_iter().enumerate() {
            if n % RECOVERY_AHEAD == RECOVERY_AHEAD - 1 {
                let (reply, caught_up) = tokio::sync::oneshot::channel();
                supervisor
                    .send_message(SupervisorMsg::Barrier(reply))
                    .map_err(|e| Error::Actor(e.to_string()))?;
                let _ = caught_up.await;
            }
            let Some((run, history)) = read_open_run(&rt, &run.run_id)? else {
                continue;
            };
            // One line per run, unless there are so many that they would drown the log.
            if recovered <= RECOVERY_LOG_EACH {
                tracing::info!(workflow_id = %run.workflow_id, run_id = %run.run_id, events = history.len(), "recovering run");
            } else {
                tracing::debug!(workflow_id = %run.workflow_id, run_id = %run.run_id, events = history.len(), "recovering run");
            }
            supervisor
                .send_message(SupervisorMsg::Spawn(ExecArgs {
                    rt: rt.clone(),
                    run,
                    history,
                    mode: StartMode::Recovering,
                    start: None,
                }))
                .map_err(|e| Error::Actor(e.to_string()))?;
        }
        tracing::info!(
            recovered,
            ms = began.elapsed().as_millis() as u64,
            "open runs handed to their executions"
        );

        // 2. Answer reports (workers held theirs while the node was down).
        let reports = client
            .queue_subscribe(subject::REPORT_ALL, EDGE_QUEUE_GROUP.into())
            .await
            .map_err(|e| Error::Transport(baton_transport::Error::Nats(e.to_string())))?;
        let mut tasks = vec![
            tokio::spawn(report_feed(rt.clone(), client.clone(), reports)),
            tokio::spawn(watch_queues(rt.clone(), queues)),
        ];
        // Workers still waiting for a dead node's answer ask this one now. (Best effort:
        // without it they ask again after their answer wait.)
        let me = rt.journal.mirror_subject().unwrap_or_default().to_string();
        if let Err(e) = client
            .publish(subject::ORCHESTRATOR_STARTED, me.into())
            .await
        {
            tracing::warn!(error = %e, "start not announced to the workers");
        }
        if recovered > 0 {
            // 3. Republish the tasks JetStream no longer holds (behind the spawns above in
            // the supervisor's mailbox, so every recovered execution is asked).
            supervisor
                .send_message(SupervisorMsg::RedispatchAll)
                .map_err(|e| Error::Actor(e.to_string()))?;
        }

        let starts = client
            .queue_subscribe(subject::START_ALL, EDGE_QUEUE_GROUP.into())
            .await
            .map_err(|e| Error::Transport(baton_transport::Error::Nats(e.to_string())))?;
        let api = client
            .queue_subscribe(subject::API_ALL, EDGE_QUEUE_GROUP.into())
            .await
            .map_err(|e| Error::Transport(baton_transport::Error::Nats(e.to_string())))?;
        tasks.push(tokio::spawn(edge(
            rt.clone(),
            client.clone(),
            starts,
            handle_start,
        )));
        tasks.push(tokio::spawn(edge(
            rt.clone(),
            client.clone(),
            api,
            handle_api,
        )));
        tracing::info!(recovered, workflows = ?rt.registry.workflow_names(), "orchestrator started");
        Ok(Orchestrator {
            rt,
            supervisor,
            tasks,
            recovered,
        })
    }

    /// How many executions are in memory now.
    pub fn executions_in_memory(&self) -> usize {
        self.rt.executions.lock().expect("executions lock").len()
    }

    /// How many times an evicted execution was brought back into memory.
    pub fn rehydrations(&self) -> u64 {
        self.rt
            .rehydrations
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// How many open runs were recovered at start-up.
    pub fn recovered(&self) -> usize {
        self.recovered
    }

    /// Stops serving. Open runs stay in the journal and resume at the next start.
    pub async fn stop(self) {
        for t in &self.tasks {
            t.abort();
        }
        let executions: Vec<ActorRef<ExecMsg>> = self
            .rt
            .executions
            .lock()
            .expect("executions lock")
            .drain()
            .map(|(_, a)| a)
            .collect();
        for e in executions {
            let _ = e.stop_and_wait(None, Some(Duration::from_secs(5))).await;
        }
        let _ = self
            .supervisor
            .stop_and_wait(None, Some(Duration::from_secs(5)))
            .await;
    }
}

/// How often the orchestrator checks that the task queue is the one it knows.
const QUEUE_CHECK_INTERVAL: Duration = Duration::from_secs(1);

/// Watches the task queue (a memory stream): when the server lost it (it restarted),
/// recreates it, then has every open run republish the tasks of its in-flight attempts
/// that the new queue lacks (`SupervisorMsg::Restart`: a live execution checks its tasks,
/// an evicted one is rebuilt from its journal first). Workers still running or reporting
/// an attempt go on (their report is answered; the republished task's, dropped as stale).
/// Nothing durable was lost: the journal holds every attempt.
async fn watch_queues(rt: Arc<Runtime>, mut known: QueuesCreated) {
    loop {
        tokio::time::sleep(QUEUE_CHECK_INTERVAL).await;
        let now = match rt.streams.ensure_queues().await {
            Ok(now) => now,
            Err(e) => {
                tracing::debug!(error = %e, "task queue not checked");
                continue;
            }
        };
        if now == known {
            continue;
        }
        let open = match rt.journal.open_runs() {
            Ok(open) => open,
            Err(e) => {
                tracing::warn!(error = %e, "open runs unreadable; checking the queues again");
                continue;
            }
        };
        tracing::warn!(
            open = open.len(),
            "the task queue was recreated (the NATS server lost it): republishing the in-flight tasks"
        );
        let Some(supervisor) = rt.supervisor.get() else {
            continue;
        };
        for run in open {
            let _ = supervisor.send_message(SupervisorMsg::Restart { run_id: run.run_id });
        }
        known = now;
    }
}

/// Answers workers' reports (requests on `baton.report.<run_id>`): each is handed to its
/// run's execution and answered once the journal holds it, or it is known stale.
async fn report_feed(rt: Arc<Runtime>, client: Client, mut sub: async_nats::Subscriber) {
    while let Some(message) = sub.next().await {
        let (rt, client) = (rt.clone(), client.clone());
        tokio::spawn(async move { on_report(rt, client, message).await });
    }
    tracing::warn!("report subscription ended");
}

async fn on_report(rt: Arc<Runtime>, client: Client, message: async_nats::Message) {
    let Some(reply_to) = message.reply.clone() else {
        tracing::warn!(subject = %message.subject, "report without a reply subject ignored");
        return;
    };
    let answer = match codec::decode::<ActivityReport>(&message.payload) {
        Ok(report) => {
            stage!("report.received", run = %report.run_id, seq = report.seq, attempt = report.attempt);
            let answer = apply_report(&rt, &report).await;
            stage!("report.answered", run = %report.run_id, seq = report.seq, attempt = report.attempt);
            answer
        }
        Err(e) => {
            // Nothing to record: settled, so the worker does not ask again for ever.
            tracing::error!(subject = %message.subject, error = %e, "malformed report dropped");
            ReportAck {
                settled: true,
                error: Some(format!("malformed report: {e}")),
            }
        }
    };
    let bytes = match codec::encode(&answer) {
        Ok(b) => b,
        Err(e) => {
            tracing::error!(error = %e, "report answer not encodable");
            return;
        }
    };
    // A lost answer only makes the worker ask again: the report is then known stale.
    let publish = client.publish(reply_to, bytes.into());
    if let Err(e) = baton_transport::faults::call("report answer", publish).await {
        tracing::warn!(error = %e, "report answer failed; the worker asks again");
    }
}

/// Hands a report to its run's execution; settled once journaled or known stale.
async fn apply_report(rt: &Arc<Runtime>, report: &ActivityReport) -> ReportAck {
    let outcome = match rt.find_execution(&report.run_id).await {
        Some(actor) => match ractor::call_t!(actor, ExecMsg::Report, 30_000, report.clone()) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(e),
            Err(e) => Err(e.to_string()),
        },
        None => match rt.journal.run(&report.run_id) {
            Ok(Some(run)) if run.status == RunStatus::Running => {
                Err("run not in memory yet".into())
            }
            Ok(_) => {
                tracing::info!(run_id = %report.run_id, seq = report.seq, attempt = report.attempt, "dropped report of a closed or unknown run");
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        },
    };
    match outcome {
        Ok(()) => ReportAck {
            settled: true,
            error: None,
        },
        Err(e) => {
            tracing::warn!(run_id = %report.run_id, seq = report.seq, error = %e, "report not applied; the worker asks again");
            ReportAck {
                settled: false,
                error: Some(e),
            }
        }
    }
}

type Handler = fn(Arc<Runtime>, async_nats::Message) -> futures::future::BoxFuture<'static, Reply>;

/// A reply body and its format.
struct Reply {
    format: Format,
    body: Result<serde_json::Value, ErrorReply>,
}

impl Reply {
    fn err(format: Format, code: ErrorCode, message: impl Into<String>) -> Reply {
        Reply {
            format,
            body: Err(ErrorReply::new(code, message)),
        }
    }
    fn ok<T: serde::Serialize>(format: Format, value: &T) -> Reply {
        match serde_json::to_value(value) {
            Ok(v) => Reply {
                format,
                body: Ok(v),
            },
            Err(e) => Reply::err(format, ErrorCode::Internal, e.to_string()),
        }
    }
}

async fn edge(rt: Arc<Runtime>, client: Client, mut sub: async_nats::Subscriber, handler: Handler) {
    while let Some(message) = sub.next().await {
        let (rt, client) = (rt.clone(), client.clone());
        tokio::spawn(async move {
            let Some(reply_to) = message.reply.clone() else {
                tracing::warn!(subject = %message.subject, "edge request without a reply subject ignored");
                return;
            };
            // Under `baton.api.*` but served by another role (the vector index's owner): an
            // answer from here would race the real one.
            if message.subject.as_str() == subject::API_SEARCH {
                return;
            }
            let subject = message.subject.clone();
            let reply = handler(rt, message).await;
            let (mut bytes, content_type) = match (&reply.body, reply.format) {
                (Ok(v), f) => (f.encode(v), f),
                (Err(e), f) => (f.encode(e), f),
            };
            // A reply over the server's message limit (a history of large payloads) would
            // never arrive: the client gets a clear error instead of a timeout.
            let limit = client.server_info().max_payload.saturating_sub(4096);
            if let Ok(b) = &bytes
                && b.len() > limit
            {
                let size = b.len();
                tracing::warn!(%subject, size, "edge reply over the message limit");
                bytes = content_type.encode(&ErrorReply::new(
                    ErrorCode::PayloadTooLarge,
                    format!("the reply is {size} bytes; the server's message limit is {limit}"),
                ));
            }
            let mut headers = HeaderMap::new();
            headers.insert(
                CONTENT_TYPE,
                if content_type == Format::Msgpack {
                    codec::MSGPACK
                } else {
                    codec::JSON
                },
            );
            match bytes {
                Ok(b) => {
                    let publish = client.publish_with_headers(reply_to, headers, b.into());
                    if let Err(e) = baton_transport::faults::call("edge reply", publish).await {
                        tracing::warn!(error = %e, "edge reply failed");
                    }
                }
                Err(e) => tracing::error!(error = %e, "edge reply not encodable"),
            }
        });
    }
}

/// Decodes an edge request body, refusing oversize and malformed ones.
fn decode_edge<T: serde::de::DeserializeOwned>(
    message: &async_nats::Message,
) -> Result<(T, Format), Reply> {
    let format = Format::of_message(message)
        .map_err(|e| Reply::err(Format::Json, ErrorCode::BadRequest, e.to_string()))?;
    if message.payload.len() > MAX_EDGE_BODY {
        return Err(Reply::err(
            format,
            ErrorCode::PayloadTooLarge,
            format!(
                "body is {} bytes; the limit is {MAX_EDGE_BODY}",
                message.payload.len()
            ),
        ));
    }
    let value = format.decode::<T>(&message.payload).map_err(|e| {
        Reply::err(
            format,
            ErrorCode::BadRequest,
            format!("malformed body: {e}"),
        )
    })?;
    Ok((value, format))
}

fn handle_start(
    rt: Arc<Runtime>,
    message: async_nats::Message,
) -> futures::future::BoxFuture<'static, Reply> {
    Box::pin(async move {
        let (request, format) = match decode_edge::<StartRequest>(&message) {
            Ok(x) => x,
            Err(reply) => return reply,
        };
        let workflow_type = subject::workflow_type_of_start(&message.subject)
            .unwrap_or_default()
            .to_string();
        let Some(def) = rt.registry.workflow_def(&workflow_type) else {
            return Reply::err(
                format,
                ErrorCode::UnknownWorkflowType,
                format!(
                    "no workflow type {workflow_type:?}; registered: {}",
                    rt.registry.workflow_names().join(", ")
                ),
            );
        };
        let workflow_id = match request.workflow_id {
            Some(id) => {
                if let Err(e) = ids::validate_workflow_id(&id) {
                    return Reply::err(format, ErrorCode::InvalidWorkflowId, e.to_string());
                }
                id
            }
            None => format!("{workflow_type}-{}", uuid::Uuid::new_v4().simple()),
        };
        stage!("start.received", workflow = %workflow_id);
        let input = match Payload::encode(&request.input) {
            Ok(p) => p,
            Err(e) => return Reply::err(format, ErrorCode::BadRequest, e.to_string()),
        };
        if let Err(e) = def.check_input(&input) {
            return Reply::err(
                format,
                ErrorCode::BadRequest,
                format!("input does not fit workflow {workflow_type:?}: {e}"),
            );
        }
        let signal = match &request.signal {
            Some(sig) => {
                if let Err(e) = ids::validate_name("signal name", &sig.name) {
                    return Reply::err(format, ErrorCode::BadRequest, e.to_string());
                }
                match Payload::encode(&sig.input) {
                    Ok(p) => Some((sig.name.clone(), p)),
                    Err(e) => return Reply::err(format, ErrorCode::BadRequest, e.to_string()),
                }
            }
            None => None,
        };
        let run_id = uuid::Uuid::new_v4().simple().to_string();
        let at_ms = now_ms();
        let mut events = vec![Event {
            id: 1,
            at_ms,
            kind: EventKind::WorkflowStarted {
                workflow_type: workflow_type.clone(),
                workflow_id: workflow_id.clone(),
                input,
            },
        }];
        if let Some((name, input)) = signal.clone() {
            events.push(Event {
                id: 2,
                at_ms,
                kind: EventKind::SignalReceived {
                    name,
                    input,
                    request_id: None,
                },
            });
        }
        let record = RunRecord {
            workflow_id: workflow_id.clone(),
            run_id: run_id.clone(),
            workflow_type,
            status: RunStatus::Running,
            started_ms: at_ms,
            closed_ms: None,
            last_event_id: events.len() as u32,
            parent: None,
            deadline_ms: request.execution_timeout_ms.map(|t| at_ms + t),
        };
        let mut policies = IdPolicies {
            reuse: request.id_reuse_policy.unwrap_or_default(),
            conflict: request.id_conflict_policy.unwrap_or_default(),
        };
        if signal.is_some() {
            // Signal-with-start: a running run takes the signal.
            policies.conflict = IdConflictPolicy::UseExisting;
        }
        // The run's execution creates it in the journal with its first step, in one commit.
        match rt.start_run(record, events, policies).await {
            Ok(StartOutcome::Started) => Reply::ok(
                format,
                &StartReply {
                    workflow_id,
                    run_id,
                    status: StartStatus::Started,
                },
            ),
            Ok(StartOutcome::Duplicate(existing)) => match signal {
                Some((name, input)) if existing.status == RunStatus::Running => {
                    match deliver(&rt, &workflow_id, |reply| ExecMsg::Signal {
                        name: name.clone(),
                        input: input.clone(),
                        request_id: None,
                        reply,
                    })
                    .await
                    {
                        Ok(run) => Reply::ok(
                            format,
                            &StartReply {
                                workflow_id,
                                run_id: run.run_id,
                                status: StartStatus::Signaled,
                            },
                        ),
                        Err(e) => delivery_error(format, e),
                    }
                }
                // The signal would be lost on a closed run the policy does not replace.
                Some(_) => Reply::err(
                    format,
                    ErrorCode::WorkflowClosed,
                    format!(
                        "workflow {workflow_id:?} is {} (run {}) and its id_reuse_policy starts no new run: the signal was not delivered",
                        existing.status.as_str(),
                        existing.run_id
                    ),
                ),
                None => Reply::ok(
                    format,
                    &StartReply {
                        workflow_id,
                        run_id: existing.run_id,
                        status: StartStatus::Duplicate,
                    },
                ),
            },
            Ok(StartOutcome::AlreadyRunning(existing)) => Reply::err(
                format,
                ErrorCode::AlreadyRunning,
                format!(
                    "workflow {workflow_id:?} is running (run {}); the start asked to fail in that case",
                    existing.run_id
                ),
            ),
            Err(e) => {
                // The commit may have held all the same (its mirror publish, or a sync after
                // the data landed, failed): the execution failed, and its supervisor
                // restarts it if redb has the run.
                tracing::error!(error = %e, %workflow_id, "start not made durable");
                Reply::err(
                    format,
                    ErrorCode::Unavailable,
                    format!("the start was not made durable: {e}"),
                )
            }
        }
    })
}

/// The reply to a message that could not be delivered to a workflow.
fn delivery_error(f: Format, e: DeliveryError) -> Reply {
    match e {
        DeliveryError::NotFound(m) => Reply::err(f, ErrorCode::NotFound, m),
        DeliveryError::Closed(m) => Reply::err(f, ErrorCode::WorkflowClosed, m),
        DeliveryError::Unavailable(m) => Reply::err(f, ErrorCode::Unavailable, m),
    }
}

fn handle_api(
    rt: Arc<Runtime>,
    message: async_nats::Message,
) -> futures::future::BoxFuture<'static, Reply> {
    Box::pin(async move {
        match message.subject.as_str() {
            subject::API_RESULT => match decode_edge::<ResultRequest>(&message) {
                Ok((req, f)) => result(&rt, req, f).await,
                Err(r) => r,
            },
            subject::API_DESCRIBE => match decode_edge::<WorkflowRef>(&message) {
                Ok((req, f)) => with_run(&rt, &req.workflow_id, f, |run, history| {
                    Reply::ok(f, &info(run, history))
                }),
                Err(r) => r,
            },
            subject::API_HISTORY => match decode_edge::<HistoryRequest>(&message) {
                Ok((req, f)) => history_page(&rt, req, f),
                Err(r) => r,
            },
            subject::API_SIGNAL => match decode_edge::<SignalRequest>(&message) {
                Ok((req, f)) => signal(&rt, req, f).await,
                Err(r) => r,
            },
            subject::API_QUERY => match decode_edge::<QueryRequest>(&message) {
                Ok((req, f)) => query(&rt, req, f).await,
                Err(r) => r,
            },
            subject::API_CANCEL | subject::API_TERMINATE => {
                match decode_edge::<CloseRequest>(&message) {
                    Ok((req, f)) => close(&rt, req, message.subject.as_str(), f).await,
                    Err(r) => r,
                }
            }
            subject::API_LIST => match decode_edge::<ListRequest>(&message) {
                Ok((req, f)) => list(&rt, req, f),
                Err(r) => r,
            },
            other => Reply::err(
                Format::Json,
                ErrorCode::BadRequest,
                format!("unknown API subject {other:?}"),
            ),
        }
    })
}

/// The current run of a workflow ID, or the error reply (`not_found`, `unavailable`).
fn current_run(rt: &Runtime, workflow_id: &str, f: Format) -> Result<RunRecord, Reply> {
    match rt.journal.run_of(workflow_id) {
        Ok(Some(run)) => Ok(run),
        Ok(None) => Err(Reply::err(
            f,
            ErrorCode::NotFound,
            format!("no workflow {workflow_id:?}"),
        )),
        Err(e) => Err(Reply::err(f, ErrorCode::Unavailable, e.to_string())),
    }
}

async fn signal(rt: &Runtime, req: SignalRequest, f: Format) -> Reply {
    if let Err(e) = ids::validate_workflow_id(&req.workflow_id) {
        return Reply::err(f, ErrorCode::InvalidWorkflowId, e.to_string());
    }
    if let Err(e) = ids::validate_name("signal name", &req.name) {
        return Reply::err(f, ErrorCode::BadRequest, e.to_string());
    }
    let input = match Payload::encode(&req.input) {
        Ok(p) => p,
        Err(e) => return Reply::err(f, ErrorCode::BadRequest, e.to_string()),
    };
    match deliver(rt, &req.workflow_id, |reply| ExecMsg::Signal {
        name: req.name.clone(),
        input: input.clone(),
        request_id: req.request_id.clone(),
        reply,
    })
    .await
    {
        Ok(run) => Reply::ok(
            f,
            &SignalReply {
                workflow_id: run.workflow_id,
                run_id: run.run_id,
            },
        ),
        Err(DeliveryError::Closed(m)) => Reply::err(
            f,
            ErrorCode::WorkflowClosed,
            format!("{m}: it takes no signals"),
        ),
        Err(e) => delivery_error(f, e),
    }
}

/// `baton.api.cancel` and `baton.api.terminate`.
async fn close(rt: &Runtime, req: CloseRequest, subject: &str, f: Format) -> Reply {
    if let Err(e) = ids::validate_workflow_id(&req.workflow_id) {
        return Reply::err(f, ErrorCode::InvalidWorkflowId, e.to_string());
    }
    let terminate = subject == subject::API_TERMINATE;
    let reason = req.reason.clone().unwrap_or_else(|| {
        if terminate {
            "terminated by request".into()
        } else {
            "cancelled by request".into()
        }
    });
    let r = deliver(rt, &req.workflow_id, |reply| {
        if terminate {
            ExecMsg::Terminate {
                kind: "Terminated".into(),
                reason: reason.clone(),
                reply: Some(reply),
            }
        } else {
            ExecMsg::Cancel {
                reason: reason.clone(),
                reply,
            }
        }
    })
    .await;
    match r {
        Ok(run) => Reply::ok(
            f,
            &SignalReply {
                workflow_id: run.workflow_id,
                run_id: run.run_id,
            },
        ),
        Err(e) => delivery_error(f, e),
    }
}

async fn query(rt: &Runtime, req: QueryRequest, f: Format) -> Reply {
    let run = match current_run(rt, &req.workflow_id, f) {
        Ok(run) => run,
        Err(reply) => return reply,
    };
    let live = match run.status {
        RunStatus::Running => rt.find_execution(&run.run_id).await,
        _ => None,
    };
    let answer = match live {
        Some(actor) => match ractor::call_t!(
            actor,
            |reply| ExecMsg::Query {
                name: req.name.clone(),
                reply
            },
            10_000
        ) {
            Ok(a) => a,
            Err(e) => return Reply::err(f, ErrorCode::Unavailable, e.to_string()),
        },
        // A closed run (or one not in memory) answers from its state rebuilt by replay.
        None => {
            let Some(def) = rt.registry.workflow_def(&run.workflow_type) else {
                return Reply::err(
                    f,
                    ErrorCode::Internal,
                    format!("workflow type {:?} is not registered", run.workflow_type),
                );
            };
            let history = match rt.journal.history(&run.run_id) {
                Ok(h) => h,
                Err(e) => return Reply::err(f, ErrorCode::Unavailable, e.to_string()),
            };
            let mut exec = Execution::new(
                def.run.clone(),
                &run.workflow_id,
                &run.run_id,
                rt.registry.policies().clone(),
            );
            if let Err(e) = exec.replay(&history) {
                return Reply::err(f, ErrorCode::Internal, e.to_string());
            }
            exec.query(&req.name)
        }
    };
    match answer {
        Ok(payload) => Reply::ok(
            f,
            &QueryReply {
                result: payload.to_json(),
            },
        ),
        Err(e) => Reply::err(f, ErrorCode::UnknownQuery, e),
    }
}

/// Open runs recovery reads ahead of the supervisor that spawns their executions.
const RECOVERY_AHEAD: usize = 64;
/// Up to this many open runs, recovery logs each at info level (beyond it, at debug).
const RECOVERY_LOG_EACH: usize = 1_000;

/// Room left in a history page's message for the reply's envelope and headers.
const HISTORY_PAGE_ENVELOPE: usize = 64 * 1024;

/// One page of a run's history: the events from `req.from_event` on, as many as fit in
/// `req.max_bytes` and in one message (at least one).
fn history_page(rt: &Runtime, req: HistoryRequest, f: Format) -> Reply {
    let run = match &req.run_id {
        None => match current_run(rt, &req.workflow_id, f) {
            Ok(run) => run,
            Err(reply) => return reply,
        },
        Some(run_id) => match rt.journal.run(run_id) {
            Ok(Some(run)) if run.workflow_id == req.workflow_id => run,
            Ok(_) => {
                return Reply::err(
                    f,
                    ErrorCode::NotFound,
                    format!("workflow {} has no run {run_id}", req.workflow_id),
                );
            }
            Err(e) => return Reply::err(f, ErrorCode::Unavailable, e.to_string()),
        },
    };
    let history = match rt.journal.history(&run.run_id) {
        Ok(h) => h,
        Err(e) => return Reply::err(f, ErrorCode::Unavailable, e.to_string()),
    };
    let limit = rt
        .streams
        .js_max_payload()
        .saturating_sub(HISTORY_PAGE_ENVELOPE)
        .min(req.max_bytes.map_or(usize::MAX, |b| b as usize));
    let from = req.from_event.unwrap_or(1).max(1);
    let (mut events, mut size, mut next_event) = (Vec::new(), 0usize, None);
    for e in history.iter().filter(|e| u64::from(e.id) >= from) {
        let json = e.to_json();
        // The JSON text's length: the MessagePack form of the same value is no longer.
        let len = json.to_string().len();
        if !events.is_empty() && size + len > limit {
            next_event = Some(u64::from(e.id));
            break;
        }
        size += len;
        events.push(json);
    }
    Reply::ok(
        f,
        &HistoryReply {
            workflow_id: run.workflow_id.clone(),
            run_id: run.run_id.clone(),
            events,
            next_event,
        },
    )
}

fn with_run(
    rt: &Runtime,
    workflow_id: &str,
    f: Format,
    then: impl FnOnce(&RunRecord, &[Event]) -> Reply,
) -> Reply {
    match current_run(rt, workflow_id, f) {
        Ok(run) => match rt.journal.history(&run.run_id) {
            Ok(history) => then(&run, &history),
            Err(e) => Reply::err(f, ErrorCode::Unavailable, e.to_string()),
        },
        Err(reply) => reply,
    }
}

fn closed_result(run: &RunRecord, history: &[Event]) -> Option<ResultReply> {
    match history.last().map(|e| &e.kind) {
        Some(EventKind::WorkflowCompleted { output }) => Some(ResultReply::Completed {
            output: output.to_json(),
        }),
        Some(EventKind::WorkflowFailed { failure }) => Some(ResultReply::Failed {
            error: serde_json::to_value(failure).unwrap_or_default(),
        }),
        Some(EventKind::WorkflowTerminated { kind, reason }) => Some(ResultReply::Failed {
            error: serde_json::json!({"kind": kind, "message": reason, "retryable": false}),
        }),
        _ if run.status == RunStatus::Running => None,
        _ => Some(ResultReply::Failed {
            error: serde_json::json!({"kind": "Corrupt", "message": "closed run without a close event"}),
        }),
    }
}

async fn result(rt: &Runtime, req: ResultRequest, f: Format) -> Reply {
    let mut closed = rt.closed.subscribe();
    let deadline =
        tokio::time::Instant::now() + Duration::from_millis(req.wait_ms).min(MAX_RESULT_WAIT);
    loop {
        let reply = with_run(rt, &req.workflow_id, f, |run, history| match closed_result(
            run, history,
        ) {
            Some(r) => Reply::ok(f, &r),
            None => Reply::ok(f, &ResultReply::Running),
        });
        let running = matches!(&reply.body, Ok(v) if v.get("status").and_then(|s| s.as_str()) == Some("running"));
        if !running {
            stage!("result.sent", workflow = %req.workflow_id);
            return reply;
        }
        // Wait for this workflow to close, or the deadline.
        loop {
            match tokio::time::timeout_at(deadline, closed.recv()).await {
                Err(_) => return reply,
                Ok(Ok(id)) if id == req.workflow_id => break,
                Ok(Ok(_)) => continue,
                Ok(Err(broadcast::error::RecvError::Lagged(_))) => break,
                Ok(Err(broadcast::error::RecvError::Closed)) => return reply,
            }
        }
    }
}

fn info(run: &RunRecord, history: &[Event]) -> WorkflowInfo {
    let mut pending: std::collections::BTreeMap<u32, serde_json::Value> = Default::default();
    for e in history {
        match &e.kind {
            EventKind::ActivityScheduled {
                seq,
                activity,
                options,
                ..
            } => {
                pending.insert(*seq, serde_json::json!({"seq": seq, "activity": activity, "queue": options.task_queue, "attempt": 1}));
            }
            EventKind::ActivityFailed {
                seq,
                attempt,
                retry_in_ms: Some(_),
                ..
            } => {
                if let Some(p) = pending.get_mut(seq) {
                    p["attempt"] = serde_json::json!(attempt + 1);
                }
            }
            EventKind::ActivityCompleted { seq, .. } | EventKind::ActivityFailed { seq, .. } => {
                pending.remove(seq);
            }
            _ => {}
        }
    }
    WorkflowInfo {
        workflow_id: run.workflow_id.clone(),
        run_id: run.run_id.clone(),
        workflow_type: run.workflow_type.clone(),
        status: run.status.as_str().into(),
        started_ms: run.started_ms,
        closed_ms: run.closed_ms,
        events: run.last_event_id,
        pending_activities: pending.into_values().collect(),
    }
}

fn list(rt: &Runtime, req: ListRequest, f: Format) -> Reply {
    let status = match req.status.as_deref() {
        None => None,
        Some(s) => match RunStatus::parse(s) {
            Some(status) => Some(status),
            None => {
                return Reply::err(f, ErrorCode::BadRequest, format!("unknown status {s:?}"));
            }
        },
    };
    let limit = req.limit.unwrap_or(100).min(10_000);
    match rt.journal.list(status, limit) {
        Ok(runs) => Reply::ok(
            f,
            &ListReply {
                workflows: runs.iter().map(|r| info(r, &[])).collect(),
            },
        ),
        Err(e) => Reply::err(f, ErrorCode::Unavailable, e.to_string()),
    }
}
