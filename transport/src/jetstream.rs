//! JetStream streams and consumers, created idempotently by whoever starts first.
//!
//! - `BATON_TASKS` (work queue, **memory** storage): activity tasks, one subject per
//!   attempt, so a task's presence can be checked after a crash. Workers ack a task only
//!   after the orchestrator answered its report (a core NATS request on
//!   `baton.report.<run_id>`, answered once the journal holds the outcome), so a worker
//!   that dies mid-activity leaves the task to be redelivered.
//! - `BATON_HISTORY` (limits retention, file storage): the mirror of the journal, one
//!   message per group commit on each journal writer's subject.
//!
//! Durability of each file-stored write comes from the server's `sync_interval` (Baton's
//! dev server uses `always`) and, in production, from R3 replication. Tasks and reports are
//! not durable in NATS, and need not be: every task can be regenerated from the journal
//! (the attempt is recorded as scheduled before its task is published), and a report is
//! held by its worker, which asks again until the orchestrator answers (a worker that dies
//! first leaves its task unacked: the attempt runs again; activities are at-least-once).
//! A server that restarts comes back without the task queue (a memory stream is gone,
//! config and all); whoever notices first recreates it ([`Streams::ensure_queues`]), and
//! the orchestrator, which watches its creation time, republishes every in-flight task the
//! new queue lacks. What this buys: a fsync'd JetStream write costs about 0.35 ms and
//! JetStream does not group-commit, so each workflow step no longer pays for four of them
//! (a task, a report and their two deletions); and a report costs two core messages
//! instead of a stored message, its publish acknowledgement, its delivery and its ack.

use std::{path::Path, time::Duration};

use async_nats::jetstream::{
    self,
    consumer::{AckPolicy, DeliverPolicy, pull},
    stream::{self, RetentionPolicy, StorageType},
};

use crate::{Error, subject};

/// The configuration of a local nats-server as `baton dev`, the tests and the benchmarks
/// run it: loopback on `port`, messages up to 8 MB, JetStream stored under `store_dir` with
/// `sync_interval: always` (every write fsync'd before it is acknowledged, so a SIGKILL of
/// the server loses nothing it acknowledged).
pub fn local_server_config(port: u16, store_dir: &Path) -> String {
    format!(
        "listen: 127.0.0.1:{port}\nmax_payload: 8MB\njetstream {{\n  store_dir: {:?}\n  sync_interval: always\n}}\n",
        store_dir.display().to_string()
    )
}

/// How long a worker may hold a task without acking or signalling progress before JetStream
/// redelivers it to another worker. Pools signal progress for running tasks every second,
/// so this is the time to detect a dead worker process.
pub const TASK_ACK_WAIT: Duration = Duration::from_secs(5);
/// How many times JetStream delivers one task before giving up on it.
pub const TASK_MAX_DELIVER: i64 = 20;
/// Window in which `Nats-Msg-Id` deduplicates republished tasks.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(120);
/// The replica count used for Baton's streams (1 on a single server).
pub const DEFAULT_REPLICAS: usize = 1;

/// Name of the KV bucket holding the latest heartbeat details of each activity.
pub const HEARTBEATS_BUCKET: &str = "BATON_HEARTBEATS";
/// How long heartbeat details are kept after their last update.
pub const HEARTBEATS_MAX_AGE: Duration = Duration::from_secs(7 * 24 * 3600);

/// Name of the KV bucket marking the activities whose workflow asked them to stop.
pub const CANCELS_BUCKET: &str = "BATON_CANCELS";
/// How long a cancellation mark is kept.
pub const CANCELS_MAX_AGE: Duration = Duration::from_secs(24 * 3600);

/// Name of the KV bucket where workers record that an attempt started and is alive.
pub const LIVENESS_BUCKET: &str = "BATON_LIVENESS";

/// Handles to Baton's streams.
#[derive(Clone)]
pub struct Streams {
    /// The JetStream context.
    pub js: jetstream::Context,
    /// `BATON_TASKS`.
    pub tasks: stream::Stream,
    /// `BATON_HISTORY`.
    pub history: stream::Stream,
    /// `BATON_HEARTBEATS`: key `<run_id>.<seq>` -> the activity's latest heartbeat
    /// details, so any later attempt or redelivery resumes from them.
    pub heartbeats: jetstream::kv::Store,
    /// `BATON_CANCELS`: key `<run_id>.<seq>` present once the activity's cancellation was
    /// requested; workers watch it and tell the activity at its next heartbeat.
    pub cancels: jetstream::kv::Store,
    /// `BATON_LIVENESS`: key `<run_id>.<seq>` -> [`crate::wire::Liveness`], written when a
    /// watched attempt starts and as it heartbeats; the orchestrator's schedule-to-start
    /// and heartbeat timers read it.
    pub liveness: jetstream::kv::Store,
    max_payload: usize,
}

impl Streams {
    /// Creates (or opens) Baton's streams on the server behind `client`.
    pub async fn ensure(client: &async_nats::Client) -> Result<Streams, Error> {
        let js = jetstream::new(client.clone());
        let max_msg = client.server_info().max_payload as i32;
        let tasks = task_stream(&js, max_msg).await?;
        let info = tasks.cached_info();
        if info.config.storage != StorageType::Memory {
            tracing::warn!(
                stream = %info.config.name,
                "stream uses {:?} storage (created by an older Baton): every task is fsync'd; delete it while no run is open to get memory storage",
                info.config.storage
            );
        }
        // An older Baton's report queue would capture the report requests and answer them
        // with its publish acknowledgements: reports are requests to the orchestrator now.
        if js
            .delete_stream(subject::LEGACY_REPORTS_STREAM)
            .await
            .is_ok()
        {
            tracing::warn!(
                stream = subject::LEGACY_REPORTS_STREAM,
                "deleted the report queue of an older Baton (reports are requests to the orchestrator now)"
            );
        }
        let history_config = stream::Config {
            name: subject::HISTORY_STREAM.into(),
            subjects: vec![subject::HISTORY_ALL.into()],
            retention: RetentionPolicy::Limits,
            storage: StorageType::File,
            duplicate_window: DUPLICATE_WINDOW,
            max_message_size: max_msg,
            num_replicas: DEFAULT_REPLICAS,
            ..Default::default()
        };
        let history = js
            .get_or_create_stream(history_config)
            .await
            .map_err(Error::nats)?;
        let heartbeats = match js.get_key_value(HEARTBEATS_BUCKET).await {
            Ok(kv) => kv,
            Err(_) => js
                .create_key_value(jetstream::kv::Config {
                    bucket: HEARTBEATS_BUCKET.into(),
                    history: 1,
                    max_age: HEARTBEATS_MAX_AGE,
                    max_value_size: max_msg,
                    storage: StorageType::File,
                    num_replicas: DEFAULT_REPLICAS,
                    ..Default::default()
                })
                .await
                .map_err(Error::nats)?,
        };
        let cancels = key_value_bucket(
            &js,
            jetstream::kv::Config {
                bucket: CANCELS_BUCKET.into(),
                history: 1,
                max_age: CANCELS_MAX_AGE,
                storage: StorageType::File,
                num_replicas: DEFAULT_REPLICAS,
                ..Default::default()
            },
        )
        .await?;
        let liveness = key_value_bucket(
            &js,
            jetstream::kv::Config {
                bucket: LIVENESS_BUCKET.into(),
                history: 1,
                max_age: CANCELS_MAX_AGE,
                storage: StorageType::File,
                num_replicas: DEFAULT_REPLICAS,
                ..Default::default()
            },
        )
        .await?;
        Ok(Streams {
            js,
            tasks,
            history,
            heartbeats,
            cancels,
            liveness,
            max_payload: client.server_info().max_payload,
        })
    }

    /// Creates the task stream if it is missing (a server restart lost it: memory streams
    /// do not survive one), and returns its creation time: a change from one call to the
    /// next means every task queued before was lost.
    pub async fn ensure_queues(&self) -> Result<QueuesCreated, Error> {
        let tasks = task_stream(&self.js, self.max_payload as i32).await?;
        Ok(QueuesCreated {
            tasks_ns: tasks.cached_info().created.unix_timestamp_nanos(),
        })
    }

    /// The largest message the server accepts, in bytes.
    pub fn js_max_payload(&self) -> usize {
        // Headers and the envelope around a payload need room too.
        self.max_payload.saturating_sub(4096)
    }

    /// The durable pull consumer of a task queue (shared by every worker of that queue).
    pub async fn queue_consumer(
        &self,
        queue: &str,
    ) -> Result<jetstream::consumer::PullConsumer, Error> {
        self.tasks
            .get_or_create_consumer(
                &subject::queue_consumer(queue),
                pull::Config {
                    durable_name: Some(subject::queue_consumer(queue)),
                    filter_subject: subject::task_filter(queue),
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy: DeliverPolicy::All,
                    ack_wait: TASK_ACK_WAIT,
                    max_deliver: TASK_MAX_DELIVER,
                    max_ack_pending: 10_000,
                    ..Default::default()
                },
            )
            .await
            .map_err(Error::nats)
    }

    /// Whether a task message is still queued (published and not yet acked by a worker).
    pub async fn task_is_queued(&self, task_subject: &str) -> Result<bool, Error> {
        match self
            .tasks
            .get_last_raw_message_by_subject(task_subject)
            .await
        {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => Ok(false),
            Err(e) => Err(Error::nats(e)),
        }
    }
}

/// When the task stream was created (Unix ns); see [`Streams::ensure_queues`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueuesCreated {
    /// `BATON_TASKS`.
    pub tasks_ns: i128,
}

/// Opens (or creates) `BATON_TASKS`: a work queue in memory.
async fn task_stream(js: &jetstream::Context, max_msg: i32) -> Result<stream::Stream, Error> {
    let config = stream::Config {
        name: subject::TASKS_STREAM.into(),
        subjects: vec!["baton.task.>".into()],
        retention: RetentionPolicy::WorkQueue,
        storage: StorageType::Memory,
        duplicate_window: DUPLICATE_WINDOW,
        max_message_size: max_msg,
        num_replicas: DEFAULT_REPLICAS,
        ..Default::default()
    };
    js.get_or_create_stream(config).await.map_err(Error::nats)
}

/// Opens the KV bucket `config.bucket`, creating it with `config` when it does not exist.
/// Safe to call from many processes at once: a creation that loses the race opens the
/// bucket the winner created.
pub async fn key_value_bucket(
    js: &jetstream::Context,
    config: jetstream::kv::Config,
) -> Result<jetstream::kv::Store, Error> {
    if let Ok(kv) = js.get_key_value(config.bucket.clone()).await {
        return Ok(kv);
    }
    let bucket = config.bucket.clone();
    match js.create_key_value(config).await {
        Ok(kv) => Ok(kv),
        Err(created) => js
            .get_key_value(bucket)
            .await
            .map_err(|_| Error::nats(created)),
    }
}

/// Opens the object store `config.bucket`, creating it with `config` when it does not
/// exist; like [`key_value_bucket`], safe to call from many processes at once.
pub async fn object_store_bucket(
    js: &jetstream::Context,
    config: jetstream::object_store::Config,
) -> Result<jetstream::object_store::ObjectStore, Error> {
    if let Ok(store) = js.get_object_store(&config.bucket).await {
        return Ok(store);
    }
    let bucket = config.bucket.clone();
    match js.create_object_store(config).await {
        Ok(store) => Ok(store),
        Err(created) => js
            .get_object_store(&bucket)
            .await
            .map_err(|_| Error::nats(created)),
    }
}

/// The heartbeat-details key of an activity.
pub fn heartbeat_key(run_id: &str, seq: u32) -> String {
    format!("{run_id}.{seq}")
}

/// The `Nats-Msg-Id` of a task attempt, so republishing it inside the duplicate window is
/// a no-op.
pub fn task_msg_id(run_id: &str, seq: u32, attempt: u32) -> String {
    format!("{run_id}:{seq}:{attempt}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_server_config_fsyncs_every_write_under_the_store() {
        let config = local_server_config(4222, Path::new("/data/my js"));
        assert_eq!(
            config,
            "listen: 127.0.0.1:4222\nmax_payload: 8MB\njetstream {\n  store_dir: \"/data/my js\"\n  sync_interval: always\n}\n"
        );
    }
}
