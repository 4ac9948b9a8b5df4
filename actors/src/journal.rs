//! The journal: every run's events, committed to redb and mirrored to JetStream
//! (`baton.history.<run_id>`) before the caller is told they are durable.
//!
//! One writer task owns all writes and commits them in groups: whatever requests are
//! waiting when a commit starts go into one redb transaction (one fsync), then their
//! mirror messages (one per run, chained with `Nats-Expected-Last-Subject-Sequence` so
//! that a stale writer cannot append) are published to JetStream as one atomic batch
//! (all stored or none; one per run, pipelined, where the batch was refused or a run's
//! events need several messages), and only then is each caller answered. Workflow-ID uniqueness is a compare-and-set inside that
//! transaction: the first start of an ID wins, whatever the timing.
//!
//! Tables: `runs` (run_id -> [`RunRecord`]), `ids` (workflow_id -> run_id), `events`
//! ((run_id, event id) -> [`Event`]), `open` (run_id -> 0, the runs to recover).

use std::{
    collections::{HashMap, HashSet},
    path::{Path, PathBuf},
    sync::Arc,
};

use async_nats::{HeaderMap, jetstream::context::PublishAckFuture};
use baton_transport::{codec, jetstream::Streams, subject};
use redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};

use baton_transport::wire::{IdConflictPolicy, IdReusePolicy};

use crate::{
    history::{Event, EventKind},
    storage::{FaultyBackend, StorageFaults},
};

const RUNS: TableDefinition<&str, &[u8]> = TableDefinition::new("runs");
const IDS: TableDefinition<&str, &str> = TableDefinition::new("ids");
const EVENTS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("events");
const OPEN: TableDefinition<&str, u8> = TableDefinition::new("open");

/// Most requests committed in one transaction.
const MAX_GROUP: usize = 512;

/// Errors of the journal.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// redb failed (I/O error, disk full). Nothing of the failed group was acknowledged.
    #[error("journal storage: {0}")]
    Storage(String),
    /// The JetStream mirror refused or did not answer. The events are in redb; the mirror
    /// is repaired by [`Journal::reconcile_mirror`].
    #[error("journal mirror: {0}")]
    Mirror(String),
    /// A stored record could not be decoded.
    #[error("journal corrupt: {0}")]
    Corrupt(String),
    /// An append named a run the journal does not hold, or broke its numbering.
    #[error("journal: {0}")]
    Invalid(String),
    /// The writer task has stopped.
    #[error("journal closed")]
    Closed,
}

fn storage(e: impl std::fmt::Display) -> Error {
    Error::Storage(e.to_string())
}

/// A run's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunStatus {
    /// Not closed yet.
    Running,
    /// Closed with an output.
    Completed,
    /// Closed with a failure.
    Failed,
    /// Closed by its code after its cancellation was requested (it returned `Cancelled`).
    Cancelled,
    /// Closed from outside its code.
    Terminated,
    /// Closed past its execution timeout.
    TimedOut,
    /// Closed by continue-as-new; the workflow ID goes on in a new run.
    ContinuedAsNew,
}

impl RunStatus {
    /// The status as shown at the edge.
    pub fn as_str(self) -> &'static str {
        match self {
            RunStatus::Running => "running",
            RunStatus::Completed => "completed",
            RunStatus::Failed => "failed",
            RunStatus::Cancelled => "cancelled",
            RunStatus::Terminated => "terminated",
            RunStatus::TimedOut => "timed_out",
            RunStatus::ContinuedAsNew => "continued_as_new",
        }
    }

    /// The status a close event gives a run (None for other events).
    pub fn of_close(kind: &EventKind) -> Option<RunStatus> {
        Some(match kind {
            EventKind::WorkflowCompleted { .. } => RunStatus::Completed,
            EventKind::WorkflowFailed { failure } if failure.kind == "Cancelled" => {
                RunStatus::Cancelled
            }
            EventKind::WorkflowFailed { .. } => RunStatus::Failed,
            EventKind::WorkflowTerminated { kind, .. } if kind == "TimedOut" => RunStatus::TimedOut,
            EventKind::WorkflowTerminated { .. } => RunStatus::Terminated,
            EventKind::WorkflowContinuedAsNew { .. } => RunStatus::ContinuedAsNew,
            _ => return None,
        })
    }

    /// Parses a status as shown at the edge.
    pub fn parse(s: &str) -> Option<RunStatus> {
        [
            RunStatus::Running,
            RunStatus::Completed,
            RunStatus::Failed,
            RunStatus::Cancelled,
            RunStatus::Terminated,
            RunStatus::TimedOut,
            RunStatus::ContinuedAsNew,
        ]
        .into_iter()
        .find(|r| r.as_str() == s)
    }
}

/// The parent of a child workflow's run: whom to tell when it closes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// The parent's workflow ID.
    pub workflow_id: String,
    /// The parent's run ID.
    pub run_id: String,
    /// The child's sequence number in the parent.
    pub seq: u32,
}

/// What the journal keeps of each run besides its events.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The workflow ID.
    pub workflow_id: String,
    /// The run ID.
    pub run_id: String,
    /// The workflow type.
    pub workflow_type: String,
    /// Running or closed.
    pub status: RunStatus,
    /// Start time, Unix milliseconds.
    pub started_ms: u64,
    /// Close time, Unix milliseconds.
    pub closed_ms: Option<u64>,
    /// The id of the last event.
    pub last_event_id: u32,
    /// The parent, for a child workflow's run.
    #[serde(default)]
    pub parent: Option<ParentRef>,
    /// When the workflow times out (Unix ms), if it has an execution timeout.
    #[serde(default)]
    pub deadline_ms: Option<u64>,
}

/// The result of a start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartOutcome {
    /// The run was created and is durable.
    Started,
    /// The workflow ID already has this run; nothing was written.
    Duplicate(RunRecord),
    /// The ID's run is running and the conflict policy is `fail`; nothing was written.
    AlreadyRunning(RunRecord),
}

/// How a start treats an ID that already has a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct IdPolicies {
    /// When the ID's last run is closed.
    pub reuse: IdReusePolicy,
    /// When the ID's run is running.
    pub conflict: IdConflictPolicy,
}

impl IdPolicies {
    /// Whether a start may create a new run given the ID's current run (`None`), else the
    /// outcome.
    fn decide(self, existing: RunRecord) -> Option<StartOutcome> {
        match existing.status {
            RunStatus::Running => match self.conflict {
                IdConflictPolicy::UseExisting => Some(StartOutcome::Duplicate(existing)),
                IdConflictPolicy::Fail => Some(StartOutcome::AlreadyRunning(existing)),
            },
            closed => match self.reuse {
                IdReusePolicy::AllowDuplicate => None,
                IdReusePolicy::AllowDuplicateFailedOnly
                    if matches!(
                        closed,
                        RunStatus::Failed
                            | RunStatus::Cancelled
                            | RunStatus::Terminated
                            | RunStatus::TimedOut
                    ) =>
                {
                    None
                }
                _ => Some(StartOutcome::Duplicate(existing)),
            },
        }
    }
}

/// What the JetStream mirror carries per append.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MirrorBatch {
    /// The workflow ID.
    pub workflow_id: String,
    /// The run ID.
    pub run_id: String,
    /// Consecutive events of the run.
    pub events: Vec<Event>,
}

/// A run created by a continue-as-new, with its first events.
type Successor = Box<(RunRecord, Vec<Event>)>;

enum Request {
    Start {
        record: Box<RunRecord>,
        events: Vec<Event>,
        policies: IdPolicies,
        reply: oneshot::Sender<Result<StartOutcome, Error>>,
    },
    Append {
        run_id: String,
        events: Vec<Event>,
        successor: Option<Successor>,
        /// False for events adopted from the mirror (already there): redb only.
        mirror: bool,
        reply: oneshot::Sender<Result<(), Error>>,
    },
}

/// redb's page cache. Its default (1 GiB) would grow with the journal up to that much
/// RSS; the journal's reads are of recent runs (hot in this cache) or recoveries and
/// rehydrations (served by the OS page cache), so a small cache costs little.
const JOURNAL_CACHE_BYTES: usize = 64 << 20;

/// The redb database behind the journal, reopened after an I/O error: redb refuses further
/// use of a database that failed a write (`PreviousIo`) until it is opened again, and
/// opening it repairs it.
struct Store {
    path: PathBuf,
    faults: Option<Arc<StorageFaults>>,
    db: std::sync::RwLock<Option<Arc<Database>>>,
    /// Opened once already (a later open is a reopen after an I/O error).
    opened: std::sync::atomic::AtomicBool,
}

impl Store {
    fn open_db(&self) -> Result<Database, Error> {
        let mut builder = Database::builder();
        builder.set_cache_size(JOURNAL_CACHE_BYTES);
        let db = match &self.faults {
            None => builder.create(&self.path).map_err(storage)?,
            Some(faults) => {
                let backend = FaultyBackend::open(&self.path, faults.clone()).map_err(storage)?;
                builder.create_with_backend(backend).map_err(storage)?
            }
        };
        let txn = db.begin_write().map_err(storage)?;
        {
            txn.open_table(RUNS).map_err(storage)?;
            txn.open_table(IDS).map_err(storage)?;
            txn.open_table(EVENTS).map_err(storage)?;
            txn.open_table(OPEN).map_err(storage)?;
        }
        txn.commit().map_err(storage)?;
        Ok(db)
    }

    /// The open database, reopening it if an I/O error closed it.
    fn get(&self) -> Result<Arc<Database>, Error> {
        if let Some(db) = self.db.read().expect("journal store lock").as_ref() {
            return Ok(db.clone());
        }
        let mut slot = self.db.write().expect("journal store lock");
        if let Some(db) = slot.as_ref() {
            return Ok(db.clone());
        }
        // Readers may hold the old database a moment longer; its file lock goes with it.
        let mut last = Error::Storage("journal not open".into());
        let began = std::time::Instant::now();
        for _ in 0..10 {
            match self.open_db() {
                Ok(db) => {
                    let ms = began.elapsed().as_millis() as u64;
                    if self.opened.swap(true, std::sync::atomic::Ordering::Relaxed) {
                        tracing::warn!(path = %self.path.display(), ms, "journal reopened");
                    } else {
                        // After a crash this includes redb's repair of the file.
                        tracing::info!(path = %self.path.display(), ms, "journal opened");
                    }
                    let db = Arc::new(db);
                    *slot = Some(db.clone());
                    return Ok(db);
                }
                Err(e) => last = e,
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        Err(last)
    }

    /// Closes the database after an I/O error; the next use reopens it.
    fn invalidate(&self) {
        self.db.write().expect("journal store lock").take();
    }
}

/// Handle on the journal. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    db: Arc<Store>,
    tx: mpsc::Sender<Request>,
    mirror: Option<Streams>,
    chain: Arc<tokio::sync::Mutex<HashMap<String, u64>>>,
    /// See [`Writer::unreconciled`].
    unreconciled: Arc<std::sync::Mutex<HashSet<String>>>,
}

impl Journal {
    /// Opens (or creates) the journal file and starts its writer. With `mirror`, every
    /// commit is also published to JetStream.
    pub fn open(path: &Path, mirror: Option<Streams>) -> Result<Journal, Error> {
        Journal::open_with(path, mirror, None)
    }

    /// As [`Journal::open`], with `faults` injected into its storage (chaos tests).
    pub fn open_with(
        path: &Path,
        mirror: Option<Streams>,
        faults: Option<Arc<StorageFaults>>,
    ) -> Result<Journal, Error> {
        let store = Store {
            path: path.to_path_buf(),
            faults,
            db: std::sync::RwLock::new(None),
            opened: Default::default(),
        };
        store.get()?;
        let (tx, rx) = mpsc::channel(4096);
        let writer = Writer {
            db: Arc::new(store),
            mirror,
            chain: Arc::default(),
            known: HashMap::new(),
            unreconciled: Arc::default(),
        };
        let journal = Journal {
            db: writer.db.clone(),
            tx,
            mirror: writer.mirror.clone(),
            chain: writer.chain.clone(),
            unreconciled: writer.unreconciled.clone(),
        };
        tokio::spawn(writer.run(rx));
        Ok(journal)
    }

    /// Creates a run unless its workflow ID already has one (compare-and-set), with the
    /// default policies: a closed ID is not reused, a running one is answered as duplicate.
    pub async fn start(&self, record: RunRecord, event: Event) -> Result<StartOutcome, Error> {
        self.start_with(record, vec![event], IdPolicies::default())
            .await
    }

    /// Creates a run, deciding on an ID that already has one by `policies`, atomically.
    /// `events` are the run's first events (`WorkflowStarted`, then e.g. the signal of a
    /// signal-with-start). A start naming the run ID the workflow ID already has is a
    /// duplicate whatever the policies (a retried start of the same run).
    pub async fn start_with(
        &self,
        record: RunRecord,
        events: Vec<Event>,
        policies: IdPolicies,
    ) -> Result<StartOutcome, Error> {
        if events.first().map(|e| e.id) != Some(1) || record.last_event_id as usize != events.len()
        {
            return Err(Error::Invalid(format!(
                "start of run {} must carry events 1..={}",
                record.run_id, record.last_event_id
            )));
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Start {
                record: Box::new(record),
                events,
                policies,
                reply,
            })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// Appends events to a run; a close event closes it.
    pub async fn append(&self, run_id: &str, events: Vec<Event>) -> Result<(), Error> {
        self.append_with(run_id, events, None).await
    }

    /// Appends events that close a run by continue-as-new and creates the run that
    /// follows it (same workflow ID), in one transaction.
    pub async fn append_with(
        &self,
        run_id: &str,
        events: Vec<Event>,
        successor: Option<(RunRecord, Vec<Event>)>,
    ) -> Result<(), Error> {
        if events.is_empty() {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Append {
                run_id: run_id.into(),
                events,
                successor: successor.map(Box::new),
                mirror: true,
                reply,
            })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }

    /// The current run of a workflow ID.
    pub fn run_of(&self, workflow_id: &str) -> Result<Option<RunRecord>, Error> {
        let txn = self.db.get()?.begin_read().map_err(storage)?;
        let ids = txn.open_table(IDS).map_err(storage)?;
        let Some(run_id) = ids.get(workflow_id).map_err(storage)? else {
            return Ok(None);
        };
        let run_id = run_id.value().to_string();
        let runs = txn.open_table(RUNS).map_err(storage)?;
        read_run(&runs, &run_id)
    }

    /// A run by run ID.
    pub fn run(&self, run_id: &str) -> Result<Option<RunRecord>, Error> {
        let txn = self.db.get()?.begin_read().map_err(storage)?;
        let runs = txn.open_table(RUNS).map_err(storage)?;
        read_run(&runs, run_id)
    }

    /// A run's events, in order.
    pub fn history(&self, run_id: &str) -> Result<Vec<Event>, Error> {
        let txn = self.db.get()?.begin_read().map_err(storage)?;
        let events = txn.open_table(EVENTS).map_err(storage)?;
        let mut out = Vec::new();
        for item in events
            .range((run_id, 0)..=(run_id, u32::MAX))
            .map_err(storage)?
        {
            let (_, v) = item.map_err(storage)?;
            out.push(codec::decode::<Event>(v.value()).map_err(|e| Error::Corrupt(e.to_string()))?);
        }
        Ok(out)
    }

    /// The runs not closed yet (to recover after a restart).
    pub fn open_runs(&self) -> Result<Vec<RunRecord>, Error> {
        let txn = self.db.get()?.begin_read().map_err(storage)?;
        let open = txn.open_table(OPEN).map_err(storage)?;
        let runs = txn.open_table(RUNS).map_err(storage)?;
        let mut out = Vec::new();
        for item in open.iter().map_err(storage)? {
            let (k, _) = item.map_err(storage)?;
            if let Some(r) = read_run(&runs, k.value())? {
                out.push(r);
            }
        }
        Ok(out)
    }

    /// Runs, most recently started first, optionally of one status.
    pub fn list(&self, status: Option<RunStatus>, limit: usize) -> Result<Vec<RunRecord>, Error> {
        let txn = self.db.get()?.begin_read().map_err(storage)?;
        let runs = txn.open_table(RUNS).map_err(storage)?;
        let mut out = Vec::new();
        for item in runs.iter().map_err(storage)? {
            let (_, v) = item.map_err(storage)?;
            let r: RunRecord =
                codec::decode(v.value()).map_err(|e| Error::Corrupt(e.to_string()))?;
            if status.is_none_or(|s| s == r.status) {
                out.push(r);
            }
        }
        out.sort_by(|a, b| {
            b.started_ms
                .cmp(&a.started_ms)
                .then_with(|| a.workflow_id.cmp(&b.workflow_id))
        });
        out.truncate(limit);
        Ok(out)
    }

    /// Whether the run's two stores may differ after a failed write (a commit that failed
    /// after the mirror stored the append, or that reported failure and may have held; a
    /// mirror publish that failed): [`Journal::reconcile_mirror`] it before rebuilding the
    /// run from redb.
    pub fn unreconciled(&self, run_id: &str) -> bool {
        self.unreconciled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(run_id)
    }

    /// Makes the two stores of a run agree, after a crash or a failed write between them,
    /// and learns the mirror's chain head. redb ahead (its commit held, the mirror publish
    /// did not): the missing events are published. The mirror ahead by its last message
    /// (a lone append's publish overlaps its commit, and the commit failed): that
    /// message's events are adopted into redb. They were never acknowledged, and nothing
    /// they caused left the node; adopting them is what a successful commit would have
    /// done. Call it before an execution is rebuilt from redb.
    pub async fn reconcile_mirror(&self, run_id: &str) -> Result<(), Error> {
        self.reconcile(run_id).await?;
        self.unreconciled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(run_id);
        Ok(())
    }

    async fn reconcile(&self, run_id: &str) -> Result<(), Error> {
        let Some(streams) = &self.mirror else {
            return Ok(());
        };
        let subject = subject::history(run_id);
        let (last_batch, head) = match streams
            .history
            .get_last_raw_message_by_subject(&subject)
            .await
        {
            Ok(m) => {
                let batch: MirrorBatch = codec::decode(&m.payload)
                    .map_err(|e| Error::Corrupt(format!("mirror of {run_id}: {e}")))?;
                (Some(batch), m.sequence)
            }
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                (None, 0)
            }
            Err(e) => return Err(Error::Mirror(e.to_string())),
        };
        let mirrored = last_batch
            .as_ref()
            .and_then(|b| b.events.last())
            .map_or(0, |e| e.id);
        let history = self.history(run_id)?;
        let recorded = history.last().map_or(0, |e| e.id);
        if mirrored > recorded
            && let Some(batch) = last_batch
        {
            if batch.events.first().map(|e| e.id) != Some(recorded + 1) {
                return Err(Error::Corrupt(format!(
                    "the mirror of run {run_id} holds events up to {mirrored} that redb (up to \
                     {recorded}) lacks, beyond its last message"
                )));
            }
            tracing::warn!(
                run_id,
                from = recorded + 1,
                count = batch.events.len(),
                "adopting the mirror's last append into redb"
            );
            let closes = batch.events.last().is_some_and(|e| e.kind.is_close());
            let (reply, rx) = oneshot::channel();
            self.tx
                .send(Request::Append {
                    run_id: run_id.into(),
                    events: batch.events,
                    successor: None,
                    mirror: false,
                    reply,
                })
                .await
                .map_err(|_| Error::Closed)?;
            rx.await.map_err(|_| Error::Closed)??;
            advance_chain(&mut *self.chain.lock().await, run_id, closes, Ok(head));
            return Ok(());
        }
        let missing: Vec<Event> = history.into_iter().filter(|e| e.id > mirrored).collect();
        let mut chain = self.chain.lock().await;
        chain.insert(run_id.into(), head);
        if missing.is_empty() {
            return Ok(());
        }
        let record = self
            .run(run_id)?
            .ok_or_else(|| Error::Invalid(format!("unknown run {run_id}")))?;
        tracing::warn!(
            run_id,
            from = missing[0].id,
            count = missing.len(),
            "repairing journal mirror"
        );
        let seq = publish_mirror_chain(streams, &record.workflow_id, run_id, &missing, Some(head))
            .await?;
        chain.insert(run_id.into(), seq);
        Ok(())
    }
}

/// The single writer: owns the commit loop. Holds no sender, so it ends (and releases the
/// file) when the last [`Journal`] handle is dropped.
struct Writer {
    db: Arc<Store>,
    mirror: Option<Streams>,
    chain: Arc<tokio::sync::Mutex<HashMap<String, u64>>>,
    /// Open runs whose last write this writer made in both stores: run ID -> (workflow
    /// ID, last event ID). An append that follows on is known to be valid before redb
    /// checks it, so its mirror publish may overlap its commit (see [`Writer::overlap`]).
    known: HashMap<String, (String, u32)>,
    /// Runs whose two stores may differ after a failed write, until
    /// [`Journal::reconcile_mirror`] makes them agree (see [`Journal::unreconciled`]).
    unreconciled: Arc<std::sync::Mutex<HashSet<String>>>,
}

/// The mirror messages of a group's appends, made before its commit so that the publishes
/// and the commit can run at once (see [`Writer::overlap`]).
struct Overlap {
    streams: Streams,
    /// One per overlapped append, in group order.
    messages: Vec<OverlapMessage>,
}

struct OverlapMessage {
    run_id: String,
    headers: HeaderMap,
    bytes: Vec<u8>,
    /// The append closes its run (no chain head to keep).
    closes: bool,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(first) = rx.recv().await {
            let mut group = vec![first];
            while group.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(r) => group.push(r),
                    Err(_) => break,
                }
            }
            if let Some(overlap) = self.overlap(&group) {
                self.commit_overlapped(group, overlap).await;
                continue;
            }
            let store = self.db.clone();
            let committed = tokio::task::spawn_blocking(move || match store.get() {
                Ok(db) => commit(&db, group),
                Err(e) => Err((group, e)),
            })
            .await;
            let (group, outcomes) = match committed {
                Ok(Ok(x)) => x,
                Ok(Err((group, e))) => {
                    // Nothing of the group was acknowledged. The database is reopened
                    // before the next commit (which repairs it).
                    tracing::error!(error = %e, "journal commit failed");
                    self.db.invalidate();
                    // It may have held (a sync that failed after the data landed): redb
                    // ahead of the mirror until reconciled.
                    self.mark_group(&group);
                    fail_all(group, e);
                    continue;
                }
                Err(join) => {
                    tracing::error!(error = %join, "journal commit task panicked");
                    continue;
                }
            };
            let mirrored = self.mirror_group(&group, &outcomes, &HashSet::new()).await;
            for run_id in mirrored.keys() {
                self.mark_unreconciled(run_id);
            }
            self.learn(&group, &outcomes, &mirrored);
            answer(group, outcomes, mirrored);
        }
    }

    /// Whether a group's appends can have their mirror publishes overlap its redb commit,
    /// and their messages if so: every append follows on what this writer last wrote of
    /// its run in both stores (so redb will not refuse it), with a known chain head, and
    /// fits one message. Starts may be in the group: redb's compare-and-set decides them,
    /// so they are mirrored after the commit, as before. Anything else (continue-as-new,
    /// adoptions from the mirror, large events, an append that does not follow on) makes
    /// the whole group commit to redb first, then mirror.
    ///
    /// Why it is safe: every request is answered only when both stores hold it, as
    /// always. If the commit fails and a publish held, that run's mirror is one append
    /// ahead of redb: the run is marked, its execution fails and is rebuilt from the
    /// journal only after [`Journal::reconcile_mirror`] has adopted that message into redb.
    fn overlap(&self, group: &[Request]) -> Option<Overlap> {
        let streams = self.mirror.as_ref()?;
        let chain = self.chain.try_lock().ok()?;
        let mut messages: Vec<OverlapMessage> = Vec::new();
        let mut size = 0;
        for req in group {
            let (run_id, events) = match req {
                Request::Start { .. } => continue,
                Request::Append {
                    run_id,
                    events,
                    successor: None,
                    mirror: true,
                    ..
                } => (run_id, events),
                Request::Append { .. } => return None,
            };
            let (workflow_id, last) = self.known.get(run_id)?;
            if events.first()?.id != last + 1
                || events.windows(2).any(|w| w[1].id != w[0].id + 1)
                || messages.iter().any(|m| &m.run_id == run_id)
            {
                return None;
            }
            let head = *chain.get(run_id)?;
            let (headers, bytes) =
                mirror_message(streams, workflow_id, run_id, events, Some(head)).ok()??;
            size += bytes.len();
            messages.push(OverlapMessage {
                run_id: run_id.clone(),
                headers,
                bytes,
                closes: events.last().is_some_and(|e| e.kind.is_close()),
            });
        }
        if messages.is_empty() || messages.len() > MAX_BATCH_MESSAGES || size > MAX_BATCH_BYTES {
            return None;
        }
        Some(Overlap {
            streams: streams.clone(),
            messages,
        })
    }

    /// Commits a group to redb while the mirror messages of its appends are published (see
    /// [`Writer::overlap`]); then mirrors its starts, and answers each request once both
    /// stores hold it.
    async fn commit_overlapped(&mut self, group: Vec<Request>, overlap: Overlap) {
        let Overlap { streams, messages } = overlap;
        let runs: Vec<(String, bool)> = messages
            .iter()
            .map(|m| (m.run_id.clone(), m.closes))
            .collect();
        let mut chain = self.chain.lock().await;
        let store = self.db.clone();
        let committing = tokio::task::spawn_blocking(move || match store.get() {
            Ok(db) => commit(&db, group),
            Err(e) => Err((group, e)),
        });
        let (committed, published) =
            tokio::join!(committing, publish_overlapped(&streams, messages));
        // Runs whose mirror append is settled here (stored, or refused on its own); the
        // rest (a refused batch) go again one message each once redb has committed.
        let mut settled: HashSet<String> = HashSet::new();
        let mut failed = HashMap::new();
        if let Some(results) = published {
            for ((run_id, closes), r) in runs.iter().zip(results) {
                if let Some(e) = advance_chain(&mut chain, run_id, *closes, r) {
                    failed.insert(run_id.clone(), e);
                }
                settled.insert(run_id.clone());
            }
        }
        drop(chain);
        match committed {
            Ok(Ok((group, outcomes))) => {
                for (req, outcome) in group.iter().zip(&outcomes) {
                    if let Request::Append { run_id, .. } = req
                        && settled.contains(run_id)
                        && !failed.contains_key(run_id)
                        && !matches!(outcome, Outcome::Written(_))
                    {
                        // `overlap` predicted the commit; a refusal here is a bug, and the
                        // mirror now holds events redb refused.
                        tracing::error!(%run_id, "redb refused an append the mirror stored");
                        self.chain.lock().await.remove(run_id);
                        self.mark_unreconciled(run_id);
                    }
                }
                // The starts (and any append whose batch was refused), now that redb has
                // decided them.
                failed.extend(self.mirror_group(&group, &outcomes, &settled).await);
                for run_id in failed.keys() {
                    self.mark_unreconciled(run_id);
                }
                self.learn(&group, &outcomes, &failed);
                answer(group, outcomes, failed);
            }
            Ok(Err((group, e))) => {
                tracing::error!(error = %e, runs = runs.len(), "journal commit failed (mirror publishes overlapped)");
                // A publish that held left its run's mirror ahead; one that failed may
                // have held too (a lost ack); the commit may have held (a sync that
                // failed after the data landed): reconcile every run of the group.
                for (run_id, _) in &runs {
                    self.known.remove(run_id);
                }
                self.mark_group(&group);
                self.db.invalidate();
                fail_all(group, e);
            }
            Err(join) => {
                tracing::error!(error = %join, "journal commit task panicked");
                for (run_id, _) in &runs {
                    self.mark_unreconciled(run_id);
                    self.known.remove(run_id);
                }
            }
        }
    }

    /// Marks every run a group wrote or tried to write as unreconciled.
    fn mark_group(&self, group: &[Request]) {
        for req in group {
            match req {
                Request::Start { record, .. } => self.mark_unreconciled(&record.run_id),
                Request::Append {
                    run_id, successor, ..
                } => {
                    self.mark_unreconciled(run_id);
                    if let Some(next) = successor {
                        self.mark_unreconciled(&next.0.run_id);
                    }
                }
            }
        }
    }

    fn mark_unreconciled(&self, run_id: &str) {
        self.unreconciled
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(run_id.to_string());
    }

    /// Remembers what the group wrote to both stores, for [`Writer::overlap`].
    fn learn(&mut self, group: &[Request], outcomes: &[Outcome], failed: &HashMap<String, Error>) {
        if self.mirror.is_none() {
            return;
        }
        for (req, outcome) in group.iter().zip(outcomes) {
            let mut written: Vec<(&String, &[Event])> = Vec::with_capacity(2);
            let workflow_id = match outcome {
                Outcome::Written(w) => Some(w),
                _ => None,
            };
            match req {
                Request::Start { record, events, .. } => written.push((&record.run_id, events)),
                Request::Append {
                    run_id,
                    events,
                    successor,
                    mirror,
                    ..
                } => {
                    if !mirror {
                        self.known.remove(run_id);
                        continue;
                    }
                    written.push((run_id, events));
                    if let Some(next) = successor {
                        written.push((&next.0.run_id, &next.1));
                    }
                }
            }
            for (run_id, events) in written {
                let last = events.last();
                match (workflow_id, last) {
                    (Some(w), Some(e)) if !e.kind.is_close() && !failed.contains_key(run_id) => {
                        self.known.insert(run_id.clone(), (w.clone(), e.id));
                    }
                    _ => {
                        self.known.remove(run_id);
                    }
                }
            }
        }
    }

    /// Publishes the committed part of a group to JetStream, one message per run, and
    /// waits for every ack. Returns the runs whose mirror append failed, with the error:
    /// only their requests are answered with it.
    async fn mirror_group(
        &self,
        group: &[Request],
        outcomes: &[Outcome],
        done: &HashSet<String>,
    ) -> HashMap<String, Error> {
        let mut failed = HashMap::new();
        let Some(streams) = &self.mirror else {
            return failed;
        };
        // run_id -> (workflow_id, events), in group order.
        let mut per_run: Vec<(String, String, Vec<Event>)> = Vec::new();
        for (req, outcome) in group.iter().zip(outcomes) {
            let Outcome::Written(workflow_id) = outcome else {
                continue;
            };
            let mut parts: Vec<(&String, &[Event])> = Vec::with_capacity(2);
            match req {
                Request::Start { record, events, .. } => {
                    parts.push((&record.run_id, events.as_slice()))
                }
                Request::Append { mirror: false, .. } => continue,
                Request::Append {
                    run_id,
                    events,
                    successor,
                    ..
                } => {
                    parts.push((run_id, events.as_slice()));
                    if let Some(next) = successor {
                        parts.push((&next.0.run_id, next.1.as_slice()));
                    }
                }
            };
            for (run_id, events) in parts {
                if done.contains(run_id) {
                    continue;
                }
                match per_run.iter_mut().find(|(r, _, _)| r == run_id) {
                    Some((_, _, evs)) => evs.extend_from_slice(events),
                    None => per_run.push((run_id.clone(), workflow_id.clone(), events.to_vec())),
                }
            }
        }
        let mut chain = self.chain.lock().await;
        // A large group's messages in one atomic batch, which the server stores at a fixed
        // cost; a run the batch did not store (a large one, or a batch refused) goes one
        // message per run below, as do the runs of a small group.
        let batched = if streams.history_takes_batches() && per_run.len() >= BATCH_MIN_MESSAGES {
            publish_mirror_batches(streams, &per_run, &chain).await
        } else {
            Vec::new()
        };
        let mut acks = Vec::with_capacity(per_run.len());
        for (i, (run_id, workflow_id, events)) in per_run.iter().enumerate() {
            let closes = events.last().is_some_and(|e| e.kind.is_close());
            if let Some(seq) = batched.get(i).copied().flatten() {
                advance_chain(&mut chain, run_id, closes, Ok(seq));
                continue;
            }
            let expected = expected_head(&chain, run_id, events);
            let stored = match publish_mirror(streams, workflow_id, run_id, events, expected).await
            {
                // The common case: one message per run, acks awaited together below.
                Ok(Some(ack)) => {
                    acks.push((run_id, closes, ack));
                    continue;
                }
                // Over the server's message limit (large payloads): several messages, chained.
                Ok(None) => {
                    publish_mirror_chain(streams, workflow_id, run_id, events, expected).await
                }
                Err(e) => Err(e),
            };
            if let Some(e) = advance_chain(&mut chain, run_id, closes, stored) {
                failed.insert(run_id.clone(), e);
            }
        }
        for (run_id, closes, ack) in acks {
            let stored = mirror_acked(run_id, ack).await;
            if let Some(e) = advance_chain(&mut chain, run_id, closes, stored) {
                failed.insert(run_id.clone(), e);
            }
        }
        failed
    }
}

/// Room left in a mirror message for its envelope (IDs, framing).
const MIRROR_ENVELOPE: usize = 1024;

/// Most messages in one atomic mirror batch (the server takes up to 1,000).
const MAX_BATCH_MESSAGES: usize = 500;
/// Fewest messages sent as an atomic batch. nats-server stages a batch before it stores
/// it: 2.4-3.2 ms whatever its size (1 to 32 messages of 300 bytes, with `sync_interval:
/// always`, on the 2-core machine of BENCHMARKS.md: `baton-mirrorcost`), where a plain
/// message, fsync'd, costs about 0.35 ms alone and about 0.2 ms more for each one
/// pipelined after it. Below this, one message per run, pipelined, is cheaper.
const BATCH_MIN_MESSAGES: usize = 12;
/// Most bytes in one atomic mirror batch (the server holds a batch in memory until its
/// commit).
const MAX_BATCH_BYTES: usize = 8 << 20;

/// The sequence a run's next mirror message must follow: 0 for a run's first events, the
/// last one mirrored otherwise (unknown: no check).
fn expected_head(chain: &HashMap<String, u64>, run_id: &str, events: &[Event]) -> Option<u64> {
    if events.first().is_some_and(|e| e.id == 1) {
        Some(0)
    } else {
        chain.get(run_id).copied()
    }
}

/// A run's mirror message, ready for an atomic batch: (index of the run, subject,
/// headers, body).
type BatchMessage = (usize, String, HeaderMap, Vec<u8>);

/// Publishes the overlapped appends' messages: one atomic batch if there are enough of
/// them, else one message each, pipelined. Returns each one's stored sequence or error;
/// `None` if the batch was not stored (the caller mirrors those runs again after the
/// commit, one message each: a batch is refused whole for one stale run).
async fn publish_overlapped(
    streams: &Streams,
    messages: Vec<OverlapMessage>,
) -> Option<Vec<Result<u64, Error>>> {
    let n = messages.len();
    if n >= BATCH_MIN_MESSAGES && streams.history_takes_batches() {
        let batch = messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| (i, subject::history(&m.run_id), m.headers, m.bytes))
            .collect();
        return match publish_atomic(streams, batch).await {
            Ok(last) => {
                let first = last + 1 - n as u64;
                Some((0..n as u64).map(|k| Ok(first + k)).collect())
            }
            Err(e) => {
                tracing::debug!(error = %e, messages = n, "overlapped mirror batch not stored; its runs go one message each after the commit");
                None
            }
        };
    }
    let mut sent = Vec::with_capacity(n);
    for m in messages {
        let ack = send_mirror(streams, &m.run_id, m.headers, m.bytes).await;
        sent.push((m.run_id, ack));
    }
    let mut out = Vec::with_capacity(n);
    for (run_id, ack) in sent {
        out.push(match ack {
            Ok(ack) => mirror_acked(&run_id, ack).await,
            Err(e) => Err(e),
        });
    }
    Some(out)
}

/// Publishes one message per run (`per_run`: run ID, workflow ID, events) in atomic batches
/// (ADR-50): all of a batch is stored, or none of it. Each message keeps its own
/// `Nats-Msg-Id` and `Nats-Expected-Last-Subject-Sequence`, so a stale writer's append is
/// still refused, with its whole batch. Returns, for each run, the sequence of its stored
/// message; `None` for a run whose events do not fit one message or whose batch was not
/// stored (the caller sends those one at a time, where each run's outcome is its own).
async fn publish_mirror_batches(
    streams: &Streams,
    per_run: &[(String, String, Vec<Event>)],
    chain: &HashMap<String, u64>,
) -> Vec<Option<u64>> {
    let mut stored = vec![None; per_run.len()];
    let mut batch: Vec<BatchMessage> = Vec::new();
    let mut size = 0;
    for (i, (run_id, workflow_id, events)) in per_run.iter().enumerate() {
        let expected = expected_head(chain, run_id, events);
        let Ok(Some((headers, bytes))) =
            mirror_message(streams, workflow_id, run_id, events, expected)
        else {
            continue;
        };
        if !batch.is_empty()
            && (batch.len() == MAX_BATCH_MESSAGES || size + bytes.len() > MAX_BATCH_BYTES)
        {
            store_batch(streams, std::mem::take(&mut batch), &mut stored).await;
            size = 0;
        }
        size += bytes.len();
        batch.push((i, subject::history(run_id), headers, bytes));
    }
    store_batch(streams, batch, &mut stored).await;
    stored
}

/// Publishes one atomic batch and records where each message was stored: a batch takes
/// consecutive sequences, ending at the one its commit is acknowledged with.
async fn store_batch(streams: &Streams, batch: Vec<BatchMessage>, stored: &mut [Option<u64>]) {
    if batch.is_empty() {
        return;
    }
    let runs: Vec<usize> = batch.iter().map(|m| m.0).collect();
    match publish_atomic(streams, batch).await {
        Ok(last) => {
            let first = last + 1 - runs.len() as u64;
            for (k, i) in runs.into_iter().enumerate() {
                stored[i] = Some(first + k as u64);
            }
        }
        Err(e) => {
            tracing::debug!(error = %e, messages = runs.len(), "mirror batch not stored; its runs go one message each");
        }
    }
}

/// Sends a batch's messages in order (the last one commits it) and returns the sequence
/// of the last.
async fn publish_atomic(streams: &Streams, batch: Vec<BatchMessage>) -> Result<u64, Error> {
    let id = uuid::Uuid::new_v4().simple().to_string();
    let n = batch.len();
    let client = streams.js.client();
    let mirror = |e: baton_transport::Error| Error::Mirror(e.to_string());
    for (k, (_, subject, mut headers, bytes)) in batch.into_iter().enumerate() {
        headers.insert(async_nats::header::NATS_BATCH_ID, id.as_str());
        headers.insert(
            async_nats::header::NATS_BATCH_SEQUENCE,
            (k + 1).to_string().as_str(),
        );
        if k + 1 < n {
            let publish = client.publish_with_headers(subject, headers, bytes.into());
            baton_transport::faults::call("mirror publish", publish)
                .await
                .map_err(mirror)?;
            continue;
        }
        headers.insert(
            async_nats::header::NATS_BATCH_COMMIT,
            async_nats::header::NATS_BATCH_COMMIT_FINAL,
        );
        let publish = streams
            .js
            .publish_with_headers(subject, headers, bytes.into());
        let ack = baton_transport::faults::call("mirror publish", publish)
            .await
            .map_err(mirror)?;
        let ack = baton_transport::faults::call("mirror ack", ack)
            .await
            .map_err(mirror)?;
        if ack.batch_size != Some(n as u64) {
            return Err(Error::Mirror(format!(
                "a batch of {n} messages was acknowledged with count {:?}",
                ack.batch_size
            )));
        }
        return Ok(ack.sequence);
    }
    Err(Error::Mirror("an empty batch".into()))
}

/// Publishes a run's events as as many mirror messages as the server's limit needs (an
/// event each at worst), each chained to the one before; returns the last one's sequence.
async fn publish_mirror_chain(
    streams: &Streams,
    workflow_id: &str,
    run_id: &str,
    events: &[Event],
    expected_last_subject_seq: Option<u64>,
) -> Result<u64, Error> {
    let limit = streams.js_max_payload();
    let mut expected = expected_last_subject_seq;
    let mut start = 0;
    let mut last = 0;
    while start < events.len() {
        let mut end = start;
        let mut size = MIRROR_ENVELOPE;
        while end < events.len() {
            let n = codec::encode(&events[end])
                .map_err(|e| Error::Mirror(e.to_string()))?
                .len();
            if end > start && size + n > limit {
                break;
            }
            size += n;
            end += 1;
        }
        if size > limit {
            return Err(Error::Mirror(format!(
                "run {run_id}: event {} is {size} bytes, over the server's message limit of {limit}",
                events[start].id
            )));
        }
        let ack = publish_mirror(streams, workflow_id, run_id, &events[start..end], expected)
            .await?
            .ok_or_else(|| {
                Error::Mirror(format!(
                    "run {run_id}: events {}-{} do not fit one message",
                    events[start].id,
                    events[end - 1].id
                ))
            })?;
        last = ack
            .await
            .map_err(|e| Error::Mirror(e.to_string()))?
            .sequence;
        expected = Some(last);
        start = end;
    }
    Ok(last)
}

/// Publishes a run's events as one mirror message; `None` (nothing sent) when they do not
/// fit the server's message limit.
async fn publish_mirror(
    streams: &Streams,
    workflow_id: &str,
    run_id: &str,
    events: &[Event],
    expected_last_subject_seq: Option<u64>,
) -> Result<Option<PublishAckFuture>, Error> {
    let Some((headers, bytes)) = mirror_message(
        streams,
        workflow_id,
        run_id,
        events,
        expected_last_subject_seq,
    )?
    else {
        return Ok(None);
    };
    send_mirror(streams, run_id, headers, bytes).await.map(Some)
}

/// Awaits a run's mirror message's acknowledgement: the sequence it was stored at.
async fn mirror_acked(run_id: &str, ack: PublishAckFuture) -> Result<u64, Error> {
    baton_transport::faults::call("mirror ack", ack)
        .await
        .map(|a| a.sequence)
        .map_err(|e| Error::Mirror(format!("run {run_id}: {e}")))
}

/// Moves a run's chain head after a mirror append: to the message stored, or off the
/// chain when the append closed the run or failed. Returns the failure.
fn advance_chain(
    chain: &mut HashMap<String, u64>,
    run_id: &str,
    closes: bool,
    stored: Result<u64, Error>,
) -> Option<Error> {
    match stored {
        Ok(seq) if !closes => {
            chain.insert(run_id.to_string(), seq);
            None
        }
        Ok(_) => {
            chain.remove(run_id);
            None
        }
        Err(e) => {
            chain.remove(run_id);
            Some(e)
        }
    }
}

/// Publishes one mirror message of a run; the ack is awaited by the caller.
async fn send_mirror(
    streams: &Streams,
    run_id: &str,
    headers: HeaderMap,
    bytes: Vec<u8>,
) -> Result<PublishAckFuture, Error> {
    let publish = streams
        .js
        .publish_with_headers(subject::history(run_id), headers, bytes.into());
    baton_transport::faults::call("mirror publish", publish)
        .await
        .map_err(|e| Error::Mirror(e.to_string()))
}

/// A run's events as one mirror message (headers and body); `None` when they do not fit
/// the server's message limit.
fn mirror_message(
    streams: &Streams,
    workflow_id: &str,
    run_id: &str,
    events: &[Event],
    expected_last_subject_seq: Option<u64>,
) -> Result<Option<(HeaderMap, Vec<u8>)>, Error> {
    let batch = MirrorBatch {
        workflow_id: workflow_id.into(),
        run_id: run_id.into(),
        events: events.to_vec(),
    };
    let bytes = codec::encode(&batch).map_err(|e| Error::Mirror(e.to_string()))?;
    if bytes.len() + MIRROR_ENVELOPE > streams.js_max_payload() {
        return Ok(None);
    }
    let mut headers = HeaderMap::new();
    let (first, last) = (events[0].id, events[events.len() - 1].id);
    headers.insert(
        async_nats::header::NATS_MESSAGE_ID,
        format!("{run_id}:{first}-{last}").as_str(),
    );
    if let Some(seq) = expected_last_subject_seq {
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            seq.to_string().as_str(),
        );
    }
    Ok(Some((headers, bytes)))
}

fn read_run(
    runs: &impl ReadableTable<&'static str, &'static [u8]>,
    run_id: &str,
) -> Result<Option<RunRecord>, Error> {
    match runs.get(run_id).map_err(storage)? {
        Some(v) => codec::decode(v.value())
            .map(Some)
            .map_err(|e| Error::Corrupt(e.to_string())),
        None => Ok(None),
    }
}

/// What a committed group did with each request.
enum Outcome {
    /// Written; the run belongs to this workflow ID.
    Written(String),
    /// A start whose workflow ID already has a run it may not replace; nothing written.
    Existing(StartOutcome),
    /// Refused (the rest of the group still commits).
    Refused(Error),
}

type Committed = (Vec<Request>, Vec<Outcome>);

/// Commits a group in one transaction.
fn commit(db: &Database, group: Vec<Request>) -> Result<Committed, (Vec<Request>, Error)> {
    let run = || -> Result<Vec<Outcome>, Error> {
        // Without redb's quick-repair: it would spare the walk of the file when opening
        // after a crash (0.4 s for 100k runs) at the price of a second fsync in every
        // commit (+0.3 ms; measured in BENCHMARKS.md).
        let txn = db.begin_write().map_err(storage)?;
        let mut outcomes = Vec::with_capacity(group.len());
        {
            let mut runs = txn.open_table(RUNS).map_err(storage)?;
            let mut ids = txn.open_table(IDS).map_err(storage)?;
            let mut events_t = txn.open_table(EVENTS).map_err(storage)?;
            let mut open = txn.open_table(OPEN).map_err(storage)?;
            for req in &group {
                match req {
                    Request::Start {
                        record,
                        events,
                        policies,
                        ..
                    } => {
                        let existing = ids
                            .get(record.workflow_id.as_str())
                            .map_err(storage)?
                            .map(|v| v.value().to_string());
                        if let Some(existing) = existing {
                            match read_run(&runs, &existing)? {
                                Some(r) if r.run_id == record.run_id => {
                                    outcomes.push(Outcome::Existing(StartOutcome::Duplicate(r)));
                                    continue;
                                }
                                Some(r) => {
                                    if let Some(outcome) = policies.decide(r) {
                                        outcomes.push(Outcome::Existing(outcome));
                                        continue;
                                    }
                                }
                                None => {
                                    outcomes.push(Outcome::Refused(Error::Corrupt(format!(
                                        "id {} names missing run {existing}",
                                        record.workflow_id
                                    ))));
                                    continue;
                                }
                            }
                        }
                        // A run ID is never reused: a start that would overwrite another
                        // workflow's run is refused.
                        if runs.get(record.run_id.as_str()).map_err(storage)?.is_some() {
                            outcomes.push(Outcome::Refused(Error::Invalid(format!(
                                "run {} exists under another workflow ID",
                                record.run_id
                            ))));
                            continue;
                        }
                        insert_run(
                            &mut runs,
                            &mut ids,
                            &mut events_t,
                            &mut open,
                            record,
                            events,
                        )?;
                        outcomes.push(Outcome::Written(record.workflow_id.clone()));
                    }
                    Request::Append {
                        run_id,
                        events,
                        successor,
                        ..
                    } => {
                        let mut record = match read_run(&runs, run_id)? {
                            Some(r) => r,
                            None => {
                                outcomes.push(Outcome::Refused(Error::Invalid(format!(
                                    "append to unknown run {run_id}"
                                ))));
                                continue;
                            }
                        };
                        if record.status != RunStatus::Running {
                            outcomes.push(Outcome::Refused(Error::Invalid(format!(
                                "append to closed run {run_id}"
                            ))));
                            continue;
                        }
                        if let Some(next) = successor {
                            let continues = events.last().is_some_and(|e| {
                                matches!(e.kind, EventKind::WorkflowContinuedAsNew { .. })
                            });
                            if !continues
                                || next.0.workflow_id != record.workflow_id
                                || runs.get(next.0.run_id.as_str()).map_err(storage)?.is_some()
                            {
                                outcomes.push(Outcome::Refused(Error::Invalid(format!(
                                    "run {run_id}: a successor run needs a continue-as-new close of the same workflow ID and a new run ID"
                                ))));
                                continue;
                            }
                        }
                        if events.first().map(|e| e.id) != Some(record.last_event_id + 1)
                            || events.windows(2).any(|w| w[1].id != w[0].id + 1)
                        {
                            outcomes.push(Outcome::Refused(Error::Invalid(format!(
                                "append to run {run_id} breaks numbering after event {}",
                                record.last_event_id
                            ))));
                            continue;
                        }
                        for e in events {
                            let ev = codec::encode(e).map_err(storage)?;
                            events_t
                                .insert((run_id.as_str(), e.id), ev.as_slice())
                                .map_err(storage)?;
                            if let Some(status) = RunStatus::of_close(&e.kind) {
                                record.status = status;
                                record.closed_ms = Some(e.at_ms);
                            }
                            record.last_event_id = e.id;
                        }
                        if record.status != RunStatus::Running {
                            open.remove(run_id.as_str()).map_err(storage)?;
                        }
                        let bytes = codec::encode(&record).map_err(storage)?;
                        runs.insert(run_id.as_str(), bytes.as_slice())
                            .map_err(storage)?;
                        if let Some(next) = successor {
                            let (next_record, next_events) = next.as_ref();
                            insert_run(
                                &mut runs,
                                &mut ids,
                                &mut events_t,
                                &mut open,
                                next_record,
                                next_events,
                            )?;
                        }
                        outcomes.push(Outcome::Written(record.workflow_id.clone()));
                    }
                }
            }
        }
        txn.commit().map_err(storage)?;
        Ok(outcomes)
    };
    match run() {
        Ok(outcomes) => Ok((group, outcomes)),
        Err(e) => Err((group, e)),
    }
}

type Table<'t, K, V> = redb::Table<'t, K, V>;

/// Writes a new run: its record, its first events, its ID, its open mark.
fn insert_run(
    runs: &mut Table<'_, &'static str, &'static [u8]>,
    ids: &mut Table<'_, &'static str, &'static str>,
    events_t: &mut Table<'_, (&'static str, u32), &'static [u8]>,
    open: &mut Table<'_, &'static str, u8>,
    record: &RunRecord,
    events: &[Event],
) -> Result<(), Error> {
    ids.insert(record.workflow_id.as_str(), record.run_id.as_str())
        .map_err(storage)?;
    let bytes = codec::encode(record).map_err(storage)?;
    runs.insert(record.run_id.as_str(), bytes.as_slice())
        .map_err(storage)?;
    for event in events {
        let ev = codec::encode(event).map_err(storage)?;
        events_t
            .insert((record.run_id.as_str(), event.id), ev.as_slice())
            .map_err(storage)?;
    }
    open.insert(record.run_id.as_str(), 0).map_err(storage)?;
    Ok(())
}

fn fail_all(group: Vec<Request>, e: Error) {
    for req in group {
        match req {
            Request::Start { reply, .. } => drop(reply.send(Err(e.clone()))),
            Request::Append { reply, .. } => drop(reply.send(Err(e.clone()))),
        }
    }
}

fn answer(group: Vec<Request>, outcomes: Vec<Outcome>, failed: HashMap<String, Error>) {
    // A request's mirror append failed if that of its run (or of the run it continued as)
    // did.
    let mirrored = |runs: &[&String]| match runs.iter().find_map(|r| failed.get(*r)) {
        Some(e) => Err(e.clone()),
        None => Ok(()),
    };
    for (req, outcome) in group.into_iter().zip(outcomes) {
        match req {
            Request::Start { reply, record, .. } => {
                let r = match outcome {
                    Outcome::Written(_) => {
                        mirrored(&[&record.run_id]).map(|_| StartOutcome::Started)
                    }
                    Outcome::Existing(outcome) => Ok(outcome),
                    Outcome::Refused(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Request::Append {
                reply,
                run_id,
                successor,
                ..
            } => {
                let r = match outcome {
                    Outcome::Written(_) => match &successor {
                        Some(next) => mirrored(&[&run_id, &next.0.run_id]),
                        None => mirrored(&[&run_id]),
                    },
                    Outcome::Existing(_) => {
                        Err(Error::Invalid("append answered as a start".into()))
                    }
                    Outcome::Refused(e) => Err(e),
                };
                let _ = reply.send(r);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_transport::Payload;

    fn record(wf: &str, run: &str) -> RunRecord {
        RunRecord {
            workflow_id: wf.into(),
            run_id: run.into(),
            workflow_type: "t".into(),
            status: RunStatus::Running,
            started_ms: 1,
            closed_ms: None,
            last_event_id: 1,
            parent: None,
            deadline_ms: None,
        }
    }

    fn started(wf: &str) -> Event {
        Event {
            id: 1,
            at_ms: 1,
            kind: EventKind::WorkflowStarted {
                workflow_type: "t".into(),
                workflow_id: wf.into(),
                input: Payload::encode(&1).unwrap(),
            },
        }
    }

    #[tokio::test]
    async fn first_start_wins_and_duplicates_get_the_existing_run() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb"), None).unwrap();
        let starts = (0..16).map(|i| {
            let j = j.clone();
            async move {
                j.start(record("same", &format!("run-{i}")), started("same"))
                    .await
                    .unwrap()
            }
        });
        let outcomes = futures::future::join_all(starts).await;
        let winners = outcomes
            .iter()
            .filter(|o| **o == StartOutcome::Started)
            .count();
        assert_eq!(winners, 1, "{outcomes:?}");
        let run = j.run_of("same").unwrap().unwrap();
        for o in outcomes {
            if let StartOutcome::Duplicate(existing) = o {
                assert_eq!(existing.run_id, run.run_id);
            }
        }
    }

    #[tokio::test]
    async fn id_reuse_and_conflict_policies() {
        use baton_transport::wire::{IdConflictPolicy as C, IdReusePolicy as R};
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb"), None).unwrap();
        let pol = |reuse, conflict| IdPolicies { reuse, conflict };
        let close = |failed: bool| Event {
            id: 2,
            at_ms: 2,
            kind: if failed {
                EventKind::WorkflowFailed {
                    failure: baton_transport::wire::Failure {
                        kind: "x".into(),
                        message: "x".into(),
                        retryable: false,
                    },
                }
            } else {
                EventKind::WorkflowCompleted {
                    output: Payload::encode(&1).unwrap(),
                }
            },
        };
        assert_eq!(
            j.start(record("w", "r1"), started("w")).await.unwrap(),
            StartOutcome::Started
        );
        // Running: use existing, or fail.
        assert!(
            matches!(j.start_with(record("w", "r2"), vec![started("w")], pol(R::AllowDuplicate, C::UseExisting)).await.unwrap(), StartOutcome::Duplicate(r) if r.run_id == "r1")
        );
        assert!(
            matches!(j.start_with(record("w", "r2"), vec![started("w")], pol(R::AllowDuplicate, C::Fail)).await.unwrap(), StartOutcome::AlreadyRunning(r) if r.run_id == "r1")
        );
        // Failed: reused only by the policies that allow it.
        j.append("r1", vec![close(true)]).await.unwrap();
        assert!(
            matches!(j.start(record("w", "r2"), started("w")).await.unwrap(), StartOutcome::Duplicate(r) if r.run_id == "r1")
        );
        assert_eq!(
            j.start_with(
                record("w", "r2"),
                vec![started("w")],
                pol(R::AllowDuplicateFailedOnly, C::UseExisting)
            )
            .await
            .unwrap(),
            StartOutcome::Started
        );
        assert_eq!(
            j.run_of("w").unwrap().unwrap().run_id,
            "r2",
            "the ID names its new run"
        );
        assert_eq!(
            j.run("r1").unwrap().unwrap().status,
            RunStatus::Failed,
            "the old run is kept"
        );
        // Completed: not reused after failure only; reused by allow_duplicate.
        j.append("r2", vec![close(false)]).await.unwrap();
        assert!(
            matches!(j.start_with(record("w", "r3"), vec![started("w")], pol(R::AllowDuplicateFailedOnly, C::UseExisting)).await.unwrap(), StartOutcome::Duplicate(r) if r.run_id == "r2")
        );
        assert_eq!(
            j.start_with(
                record("w", "r3"),
                vec![started("w")],
                pol(R::AllowDuplicate, C::UseExisting)
            )
            .await
            .unwrap(),
            StartOutcome::Started
        );
    }

    #[tokio::test]
    async fn continue_as_new_closes_and_creates_in_one_commit_and_run_ids_are_never_reused() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::open(&dir.path().join("j.redb"), None).unwrap();
        j.start(record("w", "r1"), started("w")).await.unwrap();
        let can = |input: i32| Event {
            id: 2,
            at_ms: 2,
            kind: EventKind::WorkflowContinuedAsNew {
                new_run_id: "r2".into(),
                input: Payload::encode(&input).unwrap(),
            },
        };
        // A successor without a continue-as-new close is refused, and nothing commits.
        let not_closed = Event {
            id: 2,
            at_ms: 2,
            kind: EventKind::TimerFired { seq: 0 },
        };
        assert!(
            j.append_with(
                "r1",
                vec![not_closed],
                Some((record("w", "r2"), vec![started("w")]))
            )
            .await
            .is_err()
        );
        assert_eq!(j.run("r1").unwrap().unwrap().last_event_id, 1);
        assert!(j.run("r2").unwrap().is_none());
        // The close and the next run commit together; the ID names the new run.
        j.append_with(
            "r1",
            vec![can(5)],
            Some((record("w", "r2"), vec![started("w")])),
        )
        .await
        .unwrap();
        assert_eq!(
            j.run("r1").unwrap().unwrap().status,
            RunStatus::ContinuedAsNew
        );
        assert_eq!(j.run_of("w").unwrap().unwrap().run_id, "r2");
        assert_eq!(j.open_runs().unwrap().len(), 1);
        // Starting the run the ID already has is a duplicate whatever the policies.
        let allow = IdPolicies {
            reuse: IdReusePolicy::AllowDuplicate,
            conflict: IdConflictPolicy::Fail,
        };
        assert!(matches!(
            j.start_with(record("w", "r2"), vec![started("w")], allow).await.unwrap(),
            StartOutcome::Duplicate(r) if r.run_id == "r2"
        ));
        // A run ID of another workflow is never overwritten.
        assert!(
            j.start_with(record("other", "r1"), vec![started("other")], allow)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn appends_close_runs_and_survive_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("j.redb");
        {
            let j = Journal::open(&path, None).unwrap();
            j.start(record("a", "ra"), started("a")).await.unwrap();
            j.start(record("b", "rb"), started("b")).await.unwrap();
            let done = Event {
                id: 2,
                at_ms: 5,
                kind: EventKind::WorkflowCompleted {
                    output: Payload::encode("ok").unwrap(),
                },
            };
            j.append("ra", vec![done]).await.unwrap();
            // Numbering gaps are refused.
            let gap = Event {
                id: 7,
                at_ms: 5,
                kind: EventKind::WorkflowCompleted {
                    output: Payload::default(),
                },
            };
            assert!(matches!(
                j.append("rb", vec![gap]).await,
                Err(Error::Invalid(_))
            ));
        }
        // The writer ends once the last handle is gone, releasing the file.
        let j = loop {
            match Journal::open(&path, None) {
                Ok(j) => break j,
                Err(_) => tokio::time::sleep(std::time::Duration::from_millis(10)).await,
            }
        };
        let a = j.run("ra").unwrap().unwrap();
        assert_eq!(a.status, RunStatus::Completed);
        assert_eq!(j.history("ra").unwrap().len(), 2);
        let open: Vec<String> = j
            .open_runs()
            .unwrap()
            .into_iter()
            .map(|r| r.run_id)
            .collect();
        assert_eq!(open, vec!["rb".to_string()]);
        assert!(matches!(
            j.append("ra", vec![started("a")]).await,
            Err(Error::Invalid(_))
        ));
    }
}
