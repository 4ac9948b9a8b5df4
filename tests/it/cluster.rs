//! A Baton cluster of real processes on loopback: a nats-server, an orchestrator, a CPU and
//! a GPU worker, each its own `baton` process.

use std::time::Duration;

use anyhow::{Result, anyhow};
use baton_actors::history::Event;
use baton_tests::{BatonProcess, Client, NatsServer};

/// Long enough for the slowest step of a debug build on 2 shared cores.
pub const WAIT: Duration = Duration::from_secs(120);

pub struct Cluster {
    pub nats: NatsServer,
    /// The orchestrator's journal directory (kept alive across restarts).
    pub _data_dir: tempfile::TempDir,
    pub orchestrator: BatonProcess,
    pub cpu: BatonProcess,
    pub gpu: BatonProcess,
    pub client: Client,
}

impl Cluster {
    pub async fn start() -> Result<Cluster> {
        let nats = NatsServer::start().await?;
        let data_dir = tempfile::Builder::new().prefix("baton-orch-").tempdir()?;
        let mut orchestrator = BatonProcess::spawn(orchestrator_args(&nats, &data_dir))?;
        orchestrator
            .wait_for_log("orchestrator started", WAIT)
            .await?;
        let mut cpu = BatonProcess::spawn(worker_args(&nats, "cpu", 4))?;
        let mut gpu = BatonProcess::spawn(worker_args(&nats, "gpu", 1))?;
        cpu.wait_for_log("worker pool started", WAIT).await?;
        gpu.wait_for_log("worker pool started", WAIT).await?;
        let client = Client::connect(&nats.url()).await?;
        Ok(Cluster {
            nats,
            _data_dir: data_dir,
            orchestrator,
            cpu,
            gpu,
            client,
        })
    }
}

pub fn orchestrator_args(nats: &NatsServer, data_dir: &tempfile::TempDir) -> Vec<String> {
    vec![
        "orchestrator".into(),
        "--nats-url".into(),
        nats.url(),
        "--data-dir".into(),
        data_dir.path().display().to_string(),
    ]
}

pub fn worker_args(nats: &NatsServer, queue: &str, concurrency: usize) -> Vec<String> {
    vec![
        "worker".into(),
        "--nats-url".into(),
        nats.url(),
        "--queue".into(),
        queue.into(),
        "--concurrency".into(),
        concurrency.to_string(),
    ]
}

/// Arguments of `baton worker --queue index`, the owner of the vector index in
/// `index_dir` and of the search service.
pub fn index_worker_args(nats: &NatsServer, index_dir: &std::path::Path) -> Vec<String> {
    let mut args = worker_args(nats, "index", 1);
    args.extend(["--index-dir".into(), index_dir.display().to_string()]);
    args
}

/// Texts of about 250 tokens each: slow enough to kill a process mid-embedding.
pub fn long_texts(n: usize) -> Vec<String> {
    let base = "the orchestrator journals every event before its effect leaves the node and replays the journal after a crash";
    (0..n)
        .map(|i| format!("{} document {i}", vec![base; 14].join(" ")))
        .collect()
}

/// The history events of a workflow, from the orchestrator's journal (redb).
pub async fn events(client: &Client, workflow_id: &str) -> Result<Vec<serde_json::Value>> {
    let h = client.history(workflow_id).await?;
    h["events"]
        .as_array()
        .cloned()
        .ok_or_else(|| anyhow!("no events in {h}"))
}

/// The events of one run read back from the journal's JetStream mirror.
pub async fn mirrored_events(nats: &async_nats::Client, run_id: &str) -> Result<Vec<Event>> {
    Ok(baton_tests::read_mirror(nats)
        .await?
        .remove(run_id)
        .unwrap_or_default())
}

/// Events of one type, in order.
pub fn of_type<'a>(events: &'a [serde_json::Value], ty: &str) -> Vec<&'a serde_json::Value> {
    events.iter().filter(|e| e["type"] == ty).collect()
}
