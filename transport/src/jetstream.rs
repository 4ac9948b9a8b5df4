//! JetStream streams and consumers, created idempotently by whoever starts first.
//!
//! - `BATON_TASKS` (work queue, file storage): activity tasks, one subject per attempt, so
//!   a task's presence can be checked after a crash. Workers ack a task only after their
//!   report is stored, so a worker that dies mid-activity leaves the task to be redelivered.
//! - `BATON_REPORTS` (work queue, file storage): activity reports; the orchestrator acks one
//!   only after the journal has recorded it (or recognised it as stale).
//! - `BATON_HISTORY` (limits retention, file storage): the mirror of every run's journal.
//!
//! Durability of each write comes from the server's `sync_interval` (Baton's dev server
//! uses `always`) and, in production, from R3 replication.

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
/// How long the orchestrator may hold a report before JetStream redelivers it.
pub const REPORT_ACK_WAIT: Duration = Duration::from_secs(30);
/// Window in which `Nats-Msg-Id` deduplicates republished tasks and history entries.
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
    /// `BATON_REPORTS`.
    pub reports: stream::Stream,
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
        let tasks = js
            .get_or_create_stream(stream::Config {
                name: subject::TASKS_STREAM.into(),
                subjects: vec!["baton.task.>".into()],
                retention: RetentionPolicy::WorkQueue,
                storage: StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                max_message_size: max_msg,
                num_replicas: DEFAULT_REPLICAS,
                ..Default::default()
            })
            .await
            .map_err(Error::nats)?;
        let reports = js
            .get_or_create_stream(stream::Config {
                name: subject::REPORTS_STREAM.into(),
                subjects: vec!["baton.report.>".into()],
                retention: RetentionPolicy::WorkQueue,
                storage: StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                max_message_size: max_msg,
                num_replicas: DEFAULT_REPLICAS,
                ..Default::default()
            })
            .await
            .map_err(Error::nats)?;
        let history = js
            .get_or_create_stream(stream::Config {
                name: subject::HISTORY_STREAM.into(),
                subjects: vec!["baton.history.>".into()],
                retention: RetentionPolicy::Limits,
                storage: StorageType::File,
                duplicate_window: DUPLICATE_WINDOW,
                max_message_size: max_msg,
                num_replicas: DEFAULT_REPLICAS,
                ..Default::default()
            })
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
            reports,
            history,
            heartbeats,
            cancels,
            liveness,
            max_payload: client.server_info().max_payload,
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

    /// The orchestrator's durable pull consumer of reports, created afresh: the consumer a
    /// killed orchestrator held is deleted first, so the reports it had been delivered and
    /// never acked are delivered again at once instead of after [`REPORT_ACK_WAIT`]. The
    /// stream has work-queue retention, so what was acked is gone and everything else is
    /// delivered to the new consumer. Only the cluster's one orchestrator calls this, at
    /// start-up.
    pub async fn report_consumer(&self) -> Result<jetstream::consumer::PullConsumer, Error> {
        if let Err(e) = self
            .reports
            .delete_consumer(subject::REPORTS_CONSUMER)
            .await
        {
            // Not found on a fresh cluster; anything else, `get_or_create` below reports.
            tracing::debug!(error = %e, "no previous report consumer deleted");
        }
        self.reports
            .get_or_create_consumer(
                subject::REPORTS_CONSUMER,
                pull::Config {
                    durable_name: Some(subject::REPORTS_CONSUMER.into()),
                    ack_policy: AckPolicy::Explicit,
                    deliver_policy: DeliverPolicy::All,
                    ack_wait: REPORT_ACK_WAIT,
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
