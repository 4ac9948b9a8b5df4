//! The journal: every run's events, committed to redb and mirrored to JetStream before the
//! caller is told they are durable.
//!
//! One writer task owns all writes and commits them in groups: whatever requests are
//! waiting when a commit starts go into one redb transaction (one fsync). What the group
//! appended is mirrored as one JetStream message on the writer's subject
//! (`baton.history.log.<writer>`), published while redb syncs; the runs it started, as one
//! more once redb has decided them (a refused start leaves nothing in the mirror). Each
//! caller is answered only once both stores hold its write. The messages form a log of group
//! commits, numbered in redb in the same transaction and chained with
//! `Nats-Expected-Last-Subject-Sequence`, so that a stale writer cannot append and the two
//! stores differ by at most the last group, which [`Journal::reconcile_mirror`] settles.
//! Workflow-ID uniqueness is a compare-and-set inside the transaction: the first start of
//! an ID wins, whatever the timing.
//!
//! Tables: `runs` (run_id -> [`RunRecord`]), `ids` (workflow_id -> run_id), `events`
//! ((run_id, event id) -> [`Event`]), `open` (run_id -> 0, the runs to recover), `meta`
//! (the writer's ID and its last group commit).

use std::{
    borrow::Cow,
    path::{Path, PathBuf},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
};

use async_nats::HeaderMap;
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
const META: TableDefinition<&str, &[u8]> = TableDefinition::new("meta");
/// `meta` key of the writer's ID (made when the file is created).
const META_WRITER: &str = "writer";
/// `meta` key of the groups of the writer's last transaction ([`LastCommit`]).
const META_GROUP: &str = "group";

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

/// One message of the JetStream mirror: one group commit of a journal writer (or a part of
/// one too large for a message), on the writer's subject (`baton.history.log.<writer>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MirrorGroup {
    /// The journal writer (its ID, kept in its redb file).
    pub writer: String,
    /// The group's number: one more than the writer's previous group.
    pub group: u64,
    /// This message's part of the group, from 1.
    pub part: u32,
    /// The group's number of parts (1 unless it was too large for one message).
    pub parts: u32,
    /// Drawn at random for each redb transaction, and kept with its groups in redb: tells
    /// this group from one numbered the same whose commit failed, if that one's publish
    /// reached the server only later (see [`Journal::reconcile_mirror`]).
    #[serde(default)]
    pub nonce: u64,
    /// What the group wrote of each run, in commit order.
    pub runs: Vec<MirrorRun>,
}

/// What a group commit wrote of one run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MirrorRun {
    /// The run's record once the group committed.
    pub record: RunRecord,
    /// The run's events the group appended (consecutive; from 1 for a new run).
    pub events: Vec<Event>,
}

/// [`MirrorRun`] as encoded, borrowing what it can.
#[derive(Debug, Clone, Serialize)]
struct RunEntry<'a> {
    record: Cow<'a, RunRecord>,
    events: Cow<'a, [Event]>,
}

/// [`MirrorGroup`] as encoded.
#[derive(Serialize)]
struct GroupMessage<'a> {
    writer: &'a str,
    group: u64,
    part: u32,
    parts: u32,
    nonce: u64,
    runs: &'a [RunEntry<'a>],
}

/// What redb keeps of a group in the writer's last transaction: its number and, per run in
/// order, the first event it wrote (the rest are the run's events up to its last), so that
/// the group's mirror message can be made again from redb.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LastGroup {
    group: u64,
    runs: Vec<(String, u32)>,
}

/// The groups of the writer's last transaction, in order: its appends (mirrored while redb
/// syncs), then its starts (mirrored once redb has committed them). Empty before the
/// first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct LastCommit {
    groups: Vec<LastGroup>,
    /// The transaction's nonce (see [`MirrorGroup::nonce`]).
    #[serde(default)]
    nonce: u64,
}

impl LastCommit {
    /// The number of the last group written (0 for none).
    fn last(&self) -> u64 {
        self.groups.last().map_or(0, |g| g.group)
    }

    fn of(entries: &[(u64, &[RunEntry<'_>])], nonce: u64) -> LastCommit {
        LastCommit {
            nonce,
            groups: entries
                .iter()
                .map(|(group, runs)| LastGroup {
                    group: *group,
                    runs: runs
                        .iter()
                        .map(|e| {
                            let first = e.events.first().map_or(0, |e| e.id);
                            (e.record.run_id.clone(), first)
                        })
                        .collect(),
                })
                .collect(),
        }
    }
}

/// A run created by a continue-as-new, with its first events.
type Successor = Box<(RunRecord, Vec<Event>)>;

/// What the journal's writer is asked.
enum Request {
    /// A write, committed in a group with the others waiting.
    Write(Write),
    /// Answered once the two stores agree (see [`Journal::reconcile_mirror`]); taken out
    /// of its group before the commit.
    Reconcile {
        reply: oneshot::Sender<Result<(), Error>>,
    },
}

/// A write of a commit group.
enum Write {
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
            let mut meta = txn.open_table(META).map_err(storage)?;
            if meta.get(META_WRITER).map_err(storage)?.is_none() {
                let id = uuid::Uuid::new_v4().simple().to_string();
                meta.insert(META_WRITER, id.as_bytes()).map_err(storage)?;
            }
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

    /// The writer's ID and the groups of its last transaction.
    fn meta(&self) -> Result<(String, LastCommit), Error> {
        let txn = self.get()?.begin_read().map_err(storage)?;
        let meta = txn.open_table(META).map_err(storage)?;
        let writer = match meta.get(META_WRITER).map_err(storage)? {
            Some(v) => String::from_utf8(v.value().to_vec())
                .map_err(|e| Error::Corrupt(format!("journal writer ID: {e}")))?,
            None => return Err(Error::Corrupt("journal without a writer ID".into())),
        };
        let last = match meta.get(META_GROUP).map_err(storage)? {
            Some(v) => codec::decode(v.value()).map_err(|e| Error::Corrupt(e.to_string()))?,
            None => LastCommit::default(),
        };
        Ok((writer, last))
    }
}

/// Handle on the journal. Cheap to clone.
#[derive(Clone)]
pub struct Journal {
    db: Arc<Store>,
    tx: mpsc::Sender<Request>,
    mirror_subject: Option<String>,
    /// See [`Journal::unreconciled`].
    dirty: Arc<AtomicBool>,
    /// See [`Journal::failing`].
    failing: Arc<AtomicBool>,
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
        let (writer_id, last) = store.meta()?;
        let (tx, rx) = mpsc::channel(4096);
        let mirror = mirror.map(|streams| Mirror {
            subject: subject::journal_log(&writer_id),
            streams,
            head: 0,
        });
        // With a mirror, the two stores are compared before the first write.
        let dirty = Arc::new(AtomicBool::new(mirror.is_some()));
        let journal = Journal {
            db: Arc::new(store),
            tx,
            mirror_subject: mirror.as_ref().map(|m| m.subject.clone()),
            dirty: dirty.clone(),
            failing: Arc::default(),
        };
        let writer = Writer {
            db: journal.db.clone(),
            id: writer_id,
            mirror,
            dirty,
            failing: journal.failing.clone(),
            next_group: last.last() + 1,
        };
        tokio::spawn(writer.run(rx));
        Ok(journal)
    }

    /// The subject of this journal's mirror (`baton.history.log.<writer>`), if mirrored.
    pub fn mirror_subject(&self) -> Option<&str> {
        self.mirror_subject.as_deref()
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
            .send(Request::Write(Write::Start {
                record: Box::new(record),
                events,
                policies,
                reply,
            }))
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
            .send(Request::Write(Write::Append {
                run_id: run_id.into(),
                events,
                successor: successor.map(Box::new),
                reply,
            }))
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
        read_events(&events, run_id, 0)
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

    /// Whether the two stores may differ: a write failed (in redb or in the mirror) and the
    /// writer has not compared them since, or it has not started yet. Rebuild a run from
    /// redb only after [`Journal::reconcile_mirror`] then.
    pub fn unreconciled(&self) -> bool {
        self.dirty.load(Ordering::Acquire)
    }

    /// Whether the journal's last write failed (a full disk, an I/O error, the mirror
    /// unreachable or refusing): writes fail until a group commits in both stores again.
    pub fn failing(&self) -> bool {
        self.failing.load(Ordering::Acquire)
    }

    /// Makes the two stores agree, after a crash or a failed write between them; returns
    /// at once when they do. They differ by at most the writer's last group commit: redb
    /// ahead (its commit held, the mirror's publish did not), the group is published
    /// again from redb; the mirror ahead (the publish held, the commit did not), the
    /// group's message is adopted into redb. Its requests were never acknowledged, and
    /// nothing they caused left the node; adopting them is what a successful commit would
    /// have done. Call it before an execution is rebuilt from redb.
    pub async fn reconcile_mirror(&self) -> Result<(), Error> {
        if !self.unreconciled() {
            return Ok(());
        }
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Request::Reconcile { reply })
            .await
            .map_err(|_| Error::Closed)?;
        rx.await.map_err(|_| Error::Closed)?
    }
}

/// The writer's mirror: its subject on `BATON_HISTORY` and the sequence of the last
/// message there (the chain head its next message must follow).
struct Mirror {
    streams: Streams,
    subject: String,
    head: u64,
}

/// The single writer: owns the commit loop. Holds no sender, so it ends (and releases the
/// file) when the last [`Journal`] handle is dropped.
struct Writer {
    db: Arc<Store>,
    /// The writer's ID (kept in redb): names its mirror subject.
    id: String,
    mirror: Option<Mirror>,
    /// Set when a write failed (or before the first one): the stores are compared before
    /// the next group.
    dirty: Arc<AtomicBool>,
    /// Set when a write failed, cleared when a group commits in both stores.
    failing: Arc<AtomicBool>,
    /// The number the next group commit that writes anything takes.
    next_group: u64,
}

/// What a transaction leaves to publish to the mirror: the group of its appends, then the
/// group of its starts (either may be absent).
#[derive(Default)]
struct Mirrored {
    /// Group numbers used.
    groups: u64,
    /// The appends' group was one message, handed to the publisher before redb's commit
    /// (it overlaps the commit).
    early: bool,
    /// The appends' group's parts, when it is too large for one message: published in
    /// order after the commit.
    appends: Vec<Vec<u8>>,
    /// The starts' group's messages, published once redb has decided them: a start
    /// refused (its commit failed) must leave nothing in the mirror.
    starts: Vec<Vec<u8>>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>) {
        while let Some(first) = rx.recv().await {
            let mut requests = vec![first];
            while requests.len() < MAX_GROUP {
                match rx.try_recv() {
                    Ok(r) => requests.push(r),
                    Err(_) => break,
                }
            }
            let mut reconciles = Vec::new();
            let mut group = Vec::with_capacity(requests.len());
            for req in requests {
                match req {
                    Request::Reconcile { reply } => reconciles.push(reply),
                    Request::Write(write) => group.push(write),
                }
            }
            let reconciled = if self.dirty.load(Ordering::Acquire) {
                self.reconcile().await
            } else {
                Ok(())
            };
            for reply in reconciles {
                let _ = reply.send(reconciled.clone());
            }
            if let Err(e) = reconciled {
                self.failing.store(true, Ordering::Release);
                tracing::warn!(error = %e, "journal stores not reconciled; writes refused until they are");
                fail_all(group, e);
                continue;
            }
            if !group.is_empty() {
                self.commit_group(group).await;
            }
        }
    }

    fn set_dirty(&self) {
        self.failing.store(true, Ordering::Release);
        self.dirty.store(true, Ordering::Release);
    }

    /// Commits a group to redb in one transaction and mirrors what it wrote as one message
    /// published while redb syncs (see [`commit`]), then answers each request: written
    /// requests only once both stores hold them.
    async fn commit_group(&mut self, group: Vec<Write>) {
        let began = std::time::Instant::now();
        let writes = group.len();
        let store = self.db.clone();
        let number = self.next_group;
        let framing = self.mirror.as_ref().map(|m| Framing {
            writer: self.id.clone(),
            limit: m.streams.js_max_payload(),
        });
        let (early_tx, early_rx) = oneshot::channel::<Vec<u8>>();
        let committing = async {
            let committed = tokio::task::spawn_blocking(move || match store.get() {
                Ok(db) => commit(&db, group, number, framing.as_ref(), early_tx),
                Err(e) => Err((group, e)),
            })
            .await;
            (committed, began.elapsed())
        };
        let publishing = async {
            let bytes = early_rx.await.ok()?;
            let m = self.mirror.as_ref()?;
            let sent = std::time::Instant::now();
            let stored = publish_part(&m.streams, &m.subject, bytes, m.head).await;
            Some((stored, sent - began, sent.elapsed()))
        };
        let ((committed, redb), early) = tokio::join!(committing, publishing);
        // Where a group's time goes: redb's transaction (with its fsync) and the mirror's
        // publish (from when the transaction handed it over), which overlap.
        if let Some((_, handed, mirror)) = &early {
            stage!(
                "journal.group",
                writes,
                redb_us = redb.as_micros() as u64,
                mirror_after_us = handed.as_micros() as u64,
                mirror_us = mirror.as_micros() as u64
            );
        }
        let early = early.map(|(stored, _, _)| stored);
        let (group, outcomes, mirrored) = match committed {
            Ok(Ok(x)) => x,
            Ok(Err((group, e))) => {
                // Nothing of the group was acknowledged. The database is reopened before
                // the next commit (which repairs it). The commit may have held (a sync
                // that failed after the data landed) and its message may be in the
                // mirror: the stores are compared before the next write.
                tracing::error!(error = %e, "journal commit failed");
                self.db.invalidate();
                self.set_dirty();
                fail_all(group, e);
                return;
            }
            Err(join) => {
                tracing::error!(error = %join, "journal commit task panicked");
                self.db.invalidate();
                self.set_dirty();
                return;
            }
        };
        // The appends first: answered as soon as both stores hold them.
        let mut stored = Ok(());
        if mirrored.early {
            stored = match early {
                Some(stored) => stored.map(|seq| self.advance(seq)),
                None => Err(Error::Mirror(
                    "the group's message was not published".into(),
                )),
            };
        }
        if stored.is_ok() && !mirrored.appends.is_empty() {
            stored = self.publish_parts(mirrored.appends).await;
        }
        self.next_group += mirrored.groups;
        let (starts, appends): (Vec<_>, Vec<_>) = group
            .into_iter()
            .zip(outcomes)
            .partition(|(req, _)| matches!(req, Write::Start { .. }));
        // Marked before anyone is answered: a run is rebuilt from redb only once the stores
        // agree.
        if let Err(e) = &stored {
            self.mirror_failed(e, number);
        }
        answer(appends, stored.as_ref().err().cloned());
        // Then the starts, now that redb has decided them.
        if stored.is_ok() && !mirrored.starts.is_empty() {
            let sent = std::time::Instant::now();
            stored = self.publish_parts(mirrored.starts).await;
            stage!(
                "journal.starts",
                redb_us = redb.as_micros() as u64,
                mirror_us = sent.elapsed().as_micros() as u64
            );
            if let Err(e) = &stored {
                self.mirror_failed(e, number);
            }
        }
        if stored.is_ok() {
            self.failing.store(false, Ordering::Release);
        }
        answer(starts, stored.err());
    }

    /// A mirror publish of group `number` failed: logged, and the stores marked to be
    /// compared before the next write.
    fn mirror_failed(&self, e: &Error, number: u64) {
        tracing::error!(error = %e, group = number, "journal mirror publish failed");
        self.set_dirty();
    }

    fn advance(&mut self, seq: u64) {
        if let Some(m) = &mut self.mirror {
            m.head = seq;
        }
    }

    /// Publishes mirror messages in order, each chained to the one before.
    async fn publish_parts(&mut self, parts: Vec<Vec<u8>>) -> Result<(), Error> {
        let Some(m) = &mut self.mirror else {
            return Ok(());
        };
        for bytes in parts {
            m.head = publish_part(&m.streams, &m.subject, bytes, m.head).await?;
        }
        Ok(())
    }

    /// Compares the last group commit in redb with the mirror's last message and makes
    /// them agree (see [`Journal::reconcile_mirror`]); learns the chain head.
    async fn reconcile(&mut self) -> Result<(), Error> {
        // A late message taken out makes the mirror's last message another one: look again.
        for _ in 0..LATE_MESSAGES_TAKEN_OUT {
            if self.reconcile_once().await? {
                self.dirty.store(false, Ordering::Release);
                return Ok(());
            }
        }
        Err(Error::Mirror(format!(
            "the journal mirror {} kept getting late messages of failed commits",
            self.mirror_subject()
        )))
    }

    /// One comparison of the two stores, and the repair it calls for; false when it took
    /// a late message out of the mirror and they must be compared again.
    async fn reconcile_once(&mut self) -> Result<bool, Error> {
        let Some(m) = &self.mirror else {
            return Ok(true);
        };
        let (_, last) = self.db.meta()?;
        let (head, mirrored) = match m
            .streams
            .history
            .get_last_raw_message_by_subject(&m.subject)
            .await
        {
            Ok(msg) => {
                let group: MirrorGroup = codec::decode(&msg.payload).map_err(|e| {
                    Error::Corrupt(format!(
                        "the journal mirror's last message (sequence {} on {}) is not a group \
                         commit of this journal: {e}; another writer wrote to it?",
                        msg.sequence, m.subject
                    ))
                })?;
                (msg.sequence, Some(group))
            }
            Err(e)
                if e.kind()
                    == async_nats::jetstream::stream::LastRawMessageErrorKind::NoMessageFound =>
            {
                (0, None)
            }
            Err(e) => return Err(Error::Mirror(e.to_string())),
        };
        let (g_m, part, parts) = mirrored
            .as_ref()
            .map_or((0, 1, 1), |g| (g.group, g.part, g.parts));
        let g_r = last.last();
        self.advance(head);
        if mirrored.as_ref().is_some_and(|g| g.writer != self.id) {
            return Err(Error::Corrupt(format!(
                "the journal mirror {} holds a message of writer {}",
                self.mirror_subject(),
                mirrored.map(|g| g.writer).unwrap_or_default()
            )));
        }
        if let Some(late) = mirrored
            .as_ref()
            .filter(|g| last.groups.iter().any(|l| l.group == g.group) && g.nonce != last.nonce)
        {
            // The mirror's last message has the number of a group redb holds, but another
            // transaction's nonce: it is the publish of a commit that failed, which reached
            // the server only after the reconciliation that followed the failure (the
            // group's number was then taken by the next commit, redb's). Its requests
            // were refused; it goes, and redb's group is published in its place.
            tracing::warn!(
                group = late.group,
                sequence = head,
                "taking a late message of a failed commit out of the journal mirror"
            );
            let m = self.mirror.as_ref().expect("a mirror");
            m.streams
                .history
                .delete_message(head)
                .await
                .map_err(|e| Error::Mirror(e.to_string()))?;
            return Ok(false);
        }
        let first_r = last.groups.first().map_or(0, |g| g.group);
        if g_m == g_r && part == parts {
            // They agree.
        } else if g_m < g_r && (part == parts || g_m >= first_r) {
            // redb ahead: the publish of its last transaction's groups failed, from the
            // mirror's last message on (or the mirror lost groups).
            if part == parts && g_m + 1 < first_r {
                tracing::error!(
                    redb = g_r,
                    mirror = g_m,
                    "the journal mirror lacks group commits; publishing the last transaction's again (the earlier ones are in redb only)"
                );
            } else {
                tracing::warn!(
                    mirror = g_m,
                    redb = g_r,
                    "publishing the journal's last group commits again"
                );
            }
            let mut messages = Vec::new();
            for group in &last.groups {
                if group.group < g_m || (group.group == g_m && part == parts) {
                    continue;
                }
                let made = self.group_parts(group, last.nonce)?;
                let from = if group.group == g_m { part as usize } else { 0 };
                messages.extend(made.into_iter().skip(from));
            }
            self.publish_parts(messages).await?;
        } else if g_m == g_r && part < parts {
            tracing::warn!(
                group = g_r,
                from = part + 1,
                parts,
                "publishing the rest of the journal's last group commit"
            );
            let last_group = last.groups.last().expect("a group");
            let messages = self
                .group_parts(last_group, last.nonce)?
                .into_iter()
                .skip(part as usize);
            self.publish_parts(messages.collect()).await?;
        } else if g_m == g_r + 1 && parts == 1 {
            // The mirror ahead: the group's publish held, its commit did not.
            let group = mirrored.expect("a mirrored group");
            tracing::warn!(
                group = g_m,
                runs = group.runs.len(),
                "adopting the mirror's last group commit into redb"
            );
            let store = self.db.clone();
            tokio::task::spawn_blocking(move || {
                let db = store.get()?;
                adopt(&db, &group).inspect_err(|_| store.invalidate())
            })
            .await
            .map_err(|e| Error::Storage(e.to_string()))??;
        } else {
            return Err(Error::Corrupt(format!(
                "the journal mirror {} is at group {g_m} (part {part} of {parts}) and redb at \
                 group {g_r}: they cannot be reconciled (another writer with this journal's ID?)",
                self.mirror_subject()
            )));
        }
        self.next_group = g_r.max(g_m) + 1;
        Ok(true)
    }

    fn mirror_subject(&self) -> &str {
        self.mirror.as_ref().map_or("", |m| m.subject.as_str())
    }

    /// The mirror messages of redb's last group commit, made again from redb.
    fn group_parts(&self, last: &LastGroup, nonce: u64) -> Result<Vec<Vec<u8>>, Error> {
        let m = self.mirror.as_ref().expect("a mirror");
        let txn = self.db.get()?.begin_read().map_err(storage)?;
        let runs = txn.open_table(RUNS).map_err(storage)?;
        let events_t = txn.open_table(EVENTS).map_err(storage)?;
        let mut entries = Vec::with_capacity(last.runs.len());
        for (run_id, first) in &last.runs {
            let record = read_run(&runs, run_id)?.ok_or_else(|| {
                Error::Corrupt(format!("the last group commit names missing run {run_id}"))
            })?;
            let events = read_events(&events_t, run_id, *first)?;
            entries.push(RunEntry {
                record: Cow::Owned(record),
                events: Cow::Owned(events),
            });
        }
        let framing = Framing {
            writer: self.id.clone(),
            limit: m.streams.js_max_payload(),
        };
        encode_parts(&framing, (last.group, nonce), &entries)
    }
}

/// What a mirror message is framed with: the writer's ID and the server's message limit.
struct Framing {
    writer: String,
    limit: usize,
}

/// Most late messages one reconciliation takes out of the mirror before it gives up.
const LATE_MESSAGES_TAKEN_OUT: usize = 4;

/// Room a run's entry in a mirror message takes beyond its encoded record and events:
/// `fits_mirror` refuses an event that `encode_parts` could not place in any part.
const MIRROR_RUN_FRAMING: usize = 16;

/// Room left in a mirror message for its envelope (writer ID, numbers, framing, headers).
const MIRROR_ENVELOPE: usize = 1024;

/// A group's mirror messages: one if it fits the server's message limit, else as many
/// parts as it needs (runs packed in order, a run too large for one split between its
/// events). The same entries always give the same parts.
fn encode_parts(
    framing: &Framing,
    (group, nonce): (u64, u64),
    entries: &[RunEntry<'_>],
) -> Result<Vec<Vec<u8>>, Error> {
    let mirror = |e: baton_transport::Error| Error::Mirror(e.to_string());
    let message = |part: u32, parts: u32, runs: &[RunEntry<'_>]| {
        codec::encode(&GroupMessage {
            writer: &framing.writer,
            group,
            part,
            parts,
            nonce,
            runs,
        })
        .map_err(mirror)
    };
    let whole = message(1, 1, entries)?;
    let room = framing.limit.saturating_sub(MIRROR_ENVELOPE);
    if whole.len() <= room {
        return Ok(vec![whole]);
    }
    // Pieces that fit one message each: whole runs, or a large run's events split.
    let mut pieces: Vec<(RunEntry<'_>, usize)> = Vec::new();
    for entry in entries {
        let n = codec::encode(entry).map_err(mirror)?.len();
        if n <= room {
            pieces.push((entry.clone(), n));
            continue;
        }
        let record_len = codec::encode(&entry.record).map_err(mirror)?.len() + MIRROR_RUN_FRAMING;
        let mut start = 0;
        while start < entry.events.len() {
            let mut end = start;
            let mut n = record_len;
            while end < entry.events.len() {
                let e = codec::encode(&entry.events[end]).map_err(mirror)?.len();
                if end > start && n + e > room {
                    break;
                }
                n += e;
                end += 1;
            }
            if n > room {
                return Err(Error::Mirror(format!(
                    "run {}: event {} is over the server's message limit of {}",
                    entry.record.run_id, entry.events[start].id, framing.limit
                )));
            }
            let piece = RunEntry {
                record: Cow::Borrowed(entry.record.as_ref()),
                events: Cow::Borrowed(&entry.events[start..end]),
            };
            pieces.push((piece, n));
            start = end;
        }
    }
    // Packed in order, as many to a message as fit.
    let mut chunks: Vec<Vec<RunEntry<'_>>> = vec![Vec::new()];
    let mut size = 0;
    for (piece, n) in pieces {
        let current = chunks.last_mut().expect("a chunk");
        if !current.is_empty() && size + n > room {
            chunks.push(Vec::new());
            size = 0;
        }
        size += n;
        chunks.last_mut().expect("a chunk").push(piece);
    }
    let parts = chunks.len() as u32;
    chunks
        .iter()
        .enumerate()
        .map(|(k, runs)| message(k as u32 + 1, parts, runs))
        .collect()
}

/// Publishes one mirror message, chained to the writer's last (`expected`: its sequence,
/// 0 for none), and returns the sequence it was stored at. A stale writer's message, or
/// one sent twice, is refused by the chain check.
async fn publish_part(
    streams: &Streams,
    subject: &str,
    bytes: Vec<u8>,
    expected: u64,
) -> Result<u64, Error> {
    let mirror = |e: baton_transport::Error| Error::Mirror(e.to_string());
    let mut headers = HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        expected.to_string().as_str(),
    );
    let publish = streams
        .js
        .publish_with_headers(subject.to_string(), headers, bytes.into());
    let ack = baton_transport::faults::call("mirror publish", publish)
        .await
        .map_err(mirror)?;
    let ack = baton_transport::faults::call("mirror ack", ack)
        .await
        .map_err(mirror)?;
    Ok(ack.sequence)
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

/// A run's events from `from` on.
fn read_events(
    events: &impl ReadableTable<(&'static str, u32), &'static [u8]>,
    run_id: &str,
    from: u32,
) -> Result<Vec<Event>, Error> {
    let mut out = Vec::new();
    for item in events
        .range((run_id, from)..=(run_id, u32::MAX))
        .map_err(storage)?
    {
        let (_, v) = item.map_err(storage)?;
        out.push(codec::decode::<Event>(v.value()).map_err(|e| Error::Corrupt(e.to_string()))?);
    }
    Ok(out)
}

/// What a committed group did with each request.
enum Outcome {
    /// Written.
    Written,
    /// A start whose workflow ID already has a run it may not replace; nothing written.
    Existing(StartOutcome),
    /// Refused (the rest of the group still commits).
    Refused(Error),
}

type Committed = (Vec<Write>, Vec<Outcome>, Mirrored);

/// Adds what a request wrote of a run to the group's mirror entries.
fn add_entry<'g>(entries: &mut Vec<RunEntry<'g>>, record: RunRecord, events: &'g [Event]) {
    match entries
        .iter_mut()
        .find(|e| e.record.run_id == record.run_id)
    {
        Some(entry) => {
            entry.record = Cow::Owned(record);
            entry.events.to_mut().extend_from_slice(events);
        }
        None => entries.push(RunEntry {
            record: Cow::Owned(record),
            events: Cow::Borrowed(events),
        }),
    }
}

/// Whether a run's record and events, encoded, fit the mirror: each event must fit one
/// message with the record (a group too large for one message is split between events).
fn fits_mirror(framing: Option<&Framing>, record: &[u8], events: &[Vec<u8>]) -> Result<(), Error> {
    let Some(framing) = framing else {
        return Ok(());
    };
    let room = framing
        .limit
        .saturating_sub(MIRROR_ENVELOPE + MIRROR_RUN_FRAMING + record.len());
    match events.iter().position(|e| e.len() > room) {
        None => Ok(()),
        Some(i) => Err(Error::Invalid(format!(
            "an event of {} bytes is over the journal mirror's message limit of {} bytes \
             (event {} of the append)",
            events[i].len(),
            framing.limit,
            i + 1
        ))),
    }
}

/// Commits a group in one transaction. With a mirror (`framing`), what the group wrote is
/// encoded as two mirror groups, numbered from `number` in redb (see [`LastCommit`]): its
/// appends, handed over `early` before the transaction commits so that the publish runs
/// while redb syncs (returned to be published after if too large for one message), and
/// its starts, returned to be published once redb has decided them.
fn commit(
    db: &Database,
    group: Vec<Write>,
    number: u64,
    framing: Option<&Framing>,
    early: oneshot::Sender<Vec<u8>>,
) -> Result<Committed, (Vec<Write>, Error)> {
    let run = || -> Result<(Vec<Outcome>, Mirrored), Error> {
        // Without redb's quick-repair: it would spare the walk of the file when opening
        // after a crash (0.4 s for 100k runs) at the price of a second fsync in every
        // commit (+0.3 ms; measured in BENCHMARKS.md).
        let txn = db.begin_write().map_err(storage)?;
        let mut outcomes = Vec::with_capacity(group.len());
        // What the group wrote, in two mirror groups: its appends, then its starts.
        let mut appended: Vec<RunEntry<'_>> = Vec::new();
        let mut started: Vec<RunEntry<'_>> = Vec::new();
        {
            let mut runs = txn.open_table(RUNS).map_err(storage)?;
            let mut ids = txn.open_table(IDS).map_err(storage)?;
            let mut events_t = txn.open_table(EVENTS).map_err(storage)?;
            let mut open = txn.open_table(OPEN).map_err(storage)?;
            for req in &group {
                match req {
                    Write::Start {
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
                        let encoded = NewRun::encode(record, events)?;
                        if let Err(e) = fits_mirror(framing, &encoded.record, &encoded.events) {
                            outcomes.push(Outcome::Refused(e));
                            continue;
                        }
                        encoded.insert(&mut runs, &mut ids, &mut events_t, &mut open)?;
                        add_entry(&mut started, (**record).clone(), events);
                        outcomes.push(Outcome::Written);
                    }
                    Write::Append {
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
                        let mut encoded = Vec::with_capacity(events.len());
                        for e in events {
                            encoded.push(codec::encode(e).map_err(storage)?);
                            if let Some(status) = RunStatus::of_close(&e.kind) {
                                record.status = status;
                                record.closed_ms = Some(e.at_ms);
                            }
                            record.last_event_id = e.id;
                        }
                        let bytes = codec::encode(&record).map_err(storage)?;
                        let next = match successor {
                            Some(next) => Some(NewRun::encode(&next.0, &next.1)?),
                            None => None,
                        };
                        let fits =
                            fits_mirror(framing, &bytes, &encoded).and_then(|()| match &next {
                                Some(n) => fits_mirror(framing, &n.record, &n.events),
                                None => Ok(()),
                            });
                        if let Err(e) = fits {
                            outcomes.push(Outcome::Refused(e));
                            continue;
                        }
                        for (e, ev) in events.iter().zip(&encoded) {
                            events_t
                                .insert((run_id.as_str(), e.id), ev.as_slice())
                                .map_err(storage)?;
                        }
                        if record.status != RunStatus::Running {
                            open.remove(run_id.as_str()).map_err(storage)?;
                        }
                        runs.insert(run_id.as_str(), bytes.as_slice())
                            .map_err(storage)?;
                        add_entry(&mut appended, record, events);
                        if let (Some(next), Some(encoded)) = (successor, next) {
                            encoded.insert(&mut runs, &mut ids, &mut events_t, &mut open)?;
                            add_entry(&mut appended, next.0.clone(), &next.1);
                        }
                        outcomes.push(Outcome::Written);
                    }
                }
            }
        }
        let mut mirrored = Mirrored::default();
        if let Some(framing) = framing {
            let mut numbered: Vec<(u64, &[RunEntry<'_>])> = Vec::with_capacity(2);
            for entries in [&appended, &started] {
                if !entries.is_empty() {
                    numbered.push((number + numbered.len() as u64, entries));
                }
            }
            if !numbered.is_empty() {
                let nonce = uuid::Uuid::new_v4().as_u64_pair().0;
                let last = LastCommit::of(&numbered, nonce);
                let mut meta = txn.open_table(META).map_err(storage)?;
                let bytes = codec::encode(&last).map_err(storage)?;
                meta.insert(META_GROUP, bytes.as_slice()).map_err(storage)?;
                drop(meta);
                mirrored.groups = numbered.len() as u64;
                if !appended.is_empty() {
                    let mut parts = encode_parts(framing, (number, nonce), &appended)?;
                    if parts.len() == 1 {
                        // Published while redb syncs (the commit below).
                        let _ = early.send(parts.pop().expect("one part"));
                        mirrored.early = true;
                    } else {
                        mirrored.appends = parts;
                    }
                }
                if !started.is_empty() {
                    let (group, _) = numbered[numbered.len() - 1];
                    mirrored.starts = encode_parts(framing, (group, nonce), &started)?;
                }
            }
        }
        txn.commit().map_err(storage)?;
        Ok((outcomes, mirrored))
    };
    match run() {
        Ok((outcomes, mirrored)) => Ok((group, outcomes, mirrored)),
        Err(e) => Err((group, e)),
    }
}

/// Writes the mirror's message of a group commit that redb lacks (its commit failed after
/// the publish held), as that commit would have: each run's events after its last one in
/// redb, its record, its ID and open mark for a new run; and the group's number.
fn adopt(db: &Database, group: &MirrorGroup) -> Result<(), Error> {
    let txn = db.begin_write().map_err(storage)?;
    {
        let mut runs = txn.open_table(RUNS).map_err(storage)?;
        let mut ids = txn.open_table(IDS).map_err(storage)?;
        let mut events_t = txn.open_table(EVENTS).map_err(storage)?;
        let mut open = txn.open_table(OPEN).map_err(storage)?;
        for run in &group.runs {
            let run_id = run.record.run_id.as_str();
            let after = match read_run(&runs, run_id)? {
                Some(r) if r.status == RunStatus::Running => r.last_event_id,
                Some(_) => {
                    return Err(Error::Corrupt(format!(
                        "the mirror's group {} appends to closed run {run_id}",
                        group.group
                    )));
                }
                None => {
                    ids.insert(run.record.workflow_id.as_str(), run_id)
                        .map_err(storage)?;
                    0
                }
            };
            let numbered = run
                .events
                .iter()
                .enumerate()
                .all(|(k, e)| e.id == after + 1 + k as u32);
            if !numbered || run.events.last().map(|e| e.id) != Some(run.record.last_event_id) {
                return Err(Error::Corrupt(format!(
                    "the mirror's group {} does not follow on redb's run {run_id} (at event {after})",
                    group.group
                )));
            }
            for e in &run.events {
                let ev = codec::encode(e).map_err(storage)?;
                events_t
                    .insert((run_id, e.id), ev.as_slice())
                    .map_err(storage)?;
            }
            let bytes = codec::encode(&run.record).map_err(storage)?;
            runs.insert(run_id, bytes.as_slice()).map_err(storage)?;
            if run.record.status == RunStatus::Running {
                open.insert(run_id, 0).map_err(storage)?;
            } else {
                open.remove(run_id).map_err(storage)?;
            }
        }
        let entries: Vec<RunEntry<'_>> = group
            .runs
            .iter()
            .map(|r| RunEntry {
                record: Cow::Borrowed(&r.record),
                events: Cow::Borrowed(&r.events),
            })
            .collect();
        let last = LastCommit::of(&[(group.group, &entries)], group.nonce);
        let mut meta = txn.open_table(META).map_err(storage)?;
        let bytes = codec::encode(&last).map_err(storage)?;
        meta.insert(META_GROUP, bytes.as_slice()).map_err(storage)?;
    }
    txn.commit().map_err(storage)?;
    Ok(())
}

type Table<'t, K, V> = redb::Table<'t, K, V>;

/// A new run, encoded: its record and first events.
struct NewRun<'a> {
    run: &'a RunRecord,
    record: Vec<u8>,
    events: Vec<Vec<u8>>,
    ids: Vec<u32>,
}

impl<'a> NewRun<'a> {
    fn encode(record: &'a RunRecord, events: &[Event]) -> Result<NewRun<'a>, Error> {
        Ok(NewRun {
            run: record,
            record: codec::encode(record).map_err(storage)?,
            events: events
                .iter()
                .map(|e| codec::encode(e).map_err(storage))
                .collect::<Result<_, _>>()?,
            ids: events.iter().map(|e| e.id).collect(),
        })
    }

    /// Writes the run: its record, its first events, its ID, its open mark.
    fn insert(
        &self,
        runs: &mut Table<'_, &'static str, &'static [u8]>,
        ids: &mut Table<'_, &'static str, &'static str>,
        events_t: &mut Table<'_, (&'static str, u32), &'static [u8]>,
        open: &mut Table<'_, &'static str, u8>,
    ) -> Result<(), Error> {
        let run_id = self.run.run_id.as_str();
        ids.insert(self.run.workflow_id.as_str(), run_id)
            .map_err(storage)?;
        runs.insert(run_id, self.record.as_slice())
            .map_err(storage)?;
        for (id, ev) in self.ids.iter().zip(&self.events) {
            events_t
                .insert((run_id, *id), ev.as_slice())
                .map_err(storage)?;
        }
        open.insert(run_id, 0).map_err(storage)?;
        Ok(())
    }
}

fn fail_all(group: Vec<Write>, e: Error) {
    for req in group {
        match req {
            Write::Start { reply, .. } => drop(reply.send(Err(e.clone()))),
            Write::Append { reply, .. } => drop(reply.send(Err(e.clone()))),
        }
    }
}

/// Answers a committed group's requests; `mirror`: the failure of their mirror publish, if
/// it failed (every written request is answered with it).
fn answer(group: Vec<(Write, Outcome)>, mirror: Option<Error>) {
    let written = || match &mirror {
        Some(e) => Err(e.clone()),
        None => Ok(()),
    };
    for (req, outcome) in group {
        match req {
            Write::Start { reply, .. } => {
                let r = match outcome {
                    Outcome::Written => written().map(|()| StartOutcome::Started),
                    Outcome::Existing(outcome) => Ok(outcome),
                    Outcome::Refused(e) => Err(e),
                };
                let _ = reply.send(r);
            }
            Write::Append { reply, .. } => {
                let r = match outcome {
                    Outcome::Written => written(),
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
