//! `baton`: Baton's command-line interface and node roles.
//!
//! - `baton dev`: a local nats-server child, an orchestrator, a CPU, a GPU and an index
//!   worker pool and the search service, in one process, until Ctrl-C.
//! - `baton orchestrator` / `baton worker`: the same roles as separate processes
//!   (`baton worker --queue index` owns the vector index and serves `baton.api.search`).
//! - `baton start | result | describe | history | list | search`: a client of the edge.
//! - `baton demo`: `baton dev` plus the Mini AI Pipeline, printing both results.

mod client;
mod demo;
mod nats_server;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use baton_actors::{
    Registry,
    batching::BatchOptions,
    node::{NodeOptions, Orchestrator},
    worker::{PoolHandle, PoolOptions, start_pool},
};
use baton_orchestrator::{
    faults,
    index::VectorIndex,
    pipelines::{
        self, Models,
        ingest::{self, SearchService},
    },
};
use baton_transport::{jetstream::Streams, wire::ResultReply};
use clap::{Parser, Subcommand};
use client::EdgeClient;

/// Baton: durable workflow orchestration for ML pipelines.
#[derive(Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Clone)]
struct NatsArgs {
    /// NATS server URL.
    #[arg(long, env = "BATON_NATS_URL", default_value = "nats://127.0.0.1:4222")]
    nats_url: String,
}

#[derive(Subcommand)]
enum Cmd {
    /// One process: a local nats-server, an orchestrator, a CPU, a GPU and an index worker
    /// pool, and the search service.
    Dev(DevArgs),
    /// An orchestrator node.
    Orchestrator {
        #[command(flatten)]
        nats: NatsArgs,
        /// Directory of the journal.
        #[arg(long, env = "BATON_DATA_DIR", default_value = "baton-data")]
        data_dir: PathBuf,
        #[command(flatten)]
        cache: CacheArgs,
    },
    /// A worker pool serving one task queue.
    Worker {
        #[command(flatten)]
        nats: NatsArgs,
        /// The task queue (`cpu`, `gpu`, or any named queue).
        #[arg(long)]
        queue: String,
        /// Most activities run at once.
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        /// With `--queue index`: directory of the vector index (default:
        /// `$BATON_DATA_DIR/index`, else `./baton-index`). Ignored for other queues.
        #[arg(long, env = "BATON_INDEX_DIR")]
        index_dir: Option<PathBuf>,
        /// On SIGINT/SIGTERM, start no new activities and let the running ones finish for
        /// up to this many milliseconds; then stop (their tasks go to other workers).
        #[arg(long, default_value_t = 10_000)]
        shutdown_grace_ms: u64,
        #[command(flatten)]
        model: ModelArgs,
    },
    /// Start a workflow.
    Start {
        #[command(flatten)]
        nats: NatsArgs,
        /// The workflow type.
        workflow: String,
        /// The input, as JSON, or `@path` to read it from a file.
        #[arg(long, default_value = "null")]
        input: String,
        /// The workflow ID (generated if absent).
        #[arg(long)]
        id: Option<String>,
        /// Wait for the result and print it.
        #[arg(long)]
        wait: bool,
        /// Signal-with-start: deliver this signal to the ID's running run, or start a run
        /// with it.
        #[arg(long)]
        signal: Option<String>,
        /// The signal's payload, as JSON.
        #[arg(long, default_value = "null", requires = "signal")]
        signal_input: String,
        /// Close the workflow as timed out after this many milliseconds.
        #[arg(long)]
        execution_timeout_ms: Option<u64>,
    },
    /// Request cancellation of a workflow: its code sees it and decides how to end.
    Cancel {
        #[command(flatten)]
        nats: NatsArgs,
        /// The workflow ID.
        id: String,
        /// Why (recorded in its history).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Terminate a workflow: close it at once without running its code.
    Terminate {
        #[command(flatten)]
        nats: NatsArgs,
        /// The workflow ID.
        id: String,
        /// Why (recorded in its history).
        #[arg(long)]
        reason: Option<String>,
    },
    /// Print a workflow's result.
    Result {
        #[command(flatten)]
        nats: NatsArgs,
        /// The workflow ID.
        id: String,
        /// Wait until it closes.
        #[arg(long)]
        wait: bool,
    },
    /// Describe a workflow: status, run, pending activities.
    Describe {
        #[command(flatten)]
        nats: NatsArgs,
        /// The workflow ID.
        id: String,
    },
    /// Print a workflow's journal, one event per line.
    History {
        #[command(flatten)]
        nats: NatsArgs,
        /// The workflow ID.
        id: String,
        /// Print the whole reply as one JSON document (what `baton replay` reads).
        #[arg(long)]
        json: bool,
    },
    /// Send a signal to a running workflow (journaled before the reply).
    Signal {
        #[command(flatten)]
        nats: NatsArgs,
        /// The workflow ID.
        id: String,
        /// The signal's name.
        name: String,
        /// Its payload, as JSON.
        #[arg(long, default_value = "null")]
        input: String,
    },
    /// Ask a workflow a query its code answers from its state.
    Query {
        #[command(flatten)]
        nats: NatsArgs,
        /// The workflow ID.
        id: String,
        /// The query's name.
        name: String,
    },
    /// Replay a recorded history (`baton history --json`, or one event per line) against
    /// this build's workflows; a non-determinism is reported and exits with 1.
    Replay {
        /// The history file.
        file: PathBuf,
    },
    /// List workflows.
    List {
        #[command(flatten)]
        nats: NatsArgs,
        /// Only this status: running, completed, failed, cancelled, terminated, timed_out,
        /// continued_as_new.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// Search the document index (`document_ingest`): the chunks nearest to a query.
    Search {
        #[command(flatten)]
        nats: NatsArgs,
        /// The query.
        query: String,
        /// How many hits (1 to 100).
        #[arg(long, short, default_value_t = ingest::DEFAULT_K)]
        k: usize,
        /// Print the reply as JSON, chunk texts in full.
        #[arg(long)]
        json: bool,
    },
    /// `baton dev` plus the Mini AI Pipeline: runs both workflows and prints their results.
    Demo(DevArgs),
}

/// How the orchestrator keeps executions in memory.
#[derive(clap::Args, Clone, Debug)]
struct CacheArgs {
    /// Evict an execution idle this many milliseconds (it is rebuilt by replaying its
    /// journal when needed); 0 evicts after every step, so every step replays.
    #[arg(long, env = "BATON_EVICT_IDLE_MS", default_value_t = baton_actors::node::DEFAULT_EVICT_IDLE.as_millis() as u64)]
    evict_idle_ms: u64,
    /// Keep at most this many executions in memory: beyond it, the longest-resident ones
    /// that only wait are evicted (rebuilt by replay when needed).
    #[arg(long, env = "BATON_MAX_CACHED_EXECUTIONS", default_value_t = baton_actors::node::DEFAULT_MAX_CACHED)]
    max_cached_executions: usize,
}

impl CacheArgs {
    fn node_options(&self, data_dir: PathBuf) -> NodeOptions {
        NodeOptions {
            evict_idle: Some(Duration::from_millis(self.evict_idle_ms)),
            max_cached: self.max_cached_executions,
            ..NodeOptions::new(data_dir)
        }
    }
}

/// How a worker runs the model: its sessions and threads, and how its `run_inference`
/// attempts share forward passes.
#[derive(clap::Args, Clone, Debug)]
struct ModelArgs {
    /// ONNX Runtime sessions of the embedding model: how many model calls (a batch of
    /// `run_inference`, a chunk of `compute_embeddings`) run at once in this worker; a
    /// lone call is spread over the free sessions. Default: one per core, at most 4.
    #[arg(long, env = "BATON_MODEL_SESSIONS", default_value_t = default_layout().0,
          value_parser = clap::value_parser!(u16).range(1..=64))]
    model_sessions: u16,
    /// Intra-op threads of each session. Default: the cores shared out among the sessions
    /// (1 on up to 4 cores): single-threaded sessions keep the threads of one call from
    /// waiting, spinning, for each other (BENCHMARKS.md, "Embedding throughput").
    #[arg(long, env = "BATON_MODEL_THREADS", default_value_t = default_layout().1,
          value_parser = clap::value_parser!(u16).range(1..=256))]
    model_threads: u16,
    /// Most `run_inference` texts embedded in one forward pass (1: one at a time). The
    /// attempts running at once in this worker (up to its concurrency) form the batches.
    #[arg(long, env = "BATON_GPU_MAX_BATCH", default_value_t = BatchOptions::default().max_batch)]
    gpu_max_batch: usize,
    /// How long a batch that is not full waits for more attempts, in milliseconds (0: it
    /// takes the attempts waiting and goes; batches still grow under load, while the
    /// model runs the one before).
    #[arg(long, env = "BATON_GPU_BATCH_WAIT_MS", default_value_t = 0)]
    gpu_batch_wait_ms: u64,
}

impl ModelArgs {
    fn batching(&self) -> BatchOptions {
        BatchOptions {
            max_batch: self.gpu_max_batch,
            max_wait: Duration::from_millis(self.gpu_batch_wait_ms),
        }
    }
}

/// Arguments of `baton dev` and `baton demo`.
#[derive(clap::Args, Clone)]
pub struct DevArgs {
    /// Port of the local nats-server (0: a free port).
    #[arg(long, conflicts_with = "nats_url")]
    nats_port: Option<u16>,
    /// Use this NATS server instead of starting one.
    #[arg(long)]
    nats_url: Option<String>,
    /// Directory of the journal and the local JetStream store.
    #[arg(long, env = "BATON_DATA_DIR")]
    data_dir: Option<PathBuf>,
    /// The nats-server binary (default: the one `cargo xtask setup` installed).
    #[arg(long)]
    nats_server_bin: Option<PathBuf>,
    /// Concurrency of the CPU pool.
    #[arg(long, default_value_t = 16)]
    cpu_concurrency: usize,
    /// Concurrency of the GPU pool.
    #[arg(long, default_value_t = 2)]
    gpu_concurrency: usize,
    /// Directory of the vector index (default: `<data-dir>/index`).
    #[arg(long)]
    index_dir: Option<PathBuf>,
    #[command(flatten)]
    cache: CacheArgs,
    #[command(flatten)]
    model: ModelArgs,
    /// `baton demo` only: sequential runs of each workflow for the latency figures (0: none).
    #[arg(long, default_value_t = 20)]
    latency_runs: usize,
}

/// Where `cargo xtask setup` put nats-server, ONNX Runtime and the model: `$BATON_HOME`,
/// else a `.baton` folder in the current directory or beside an ancestor of the binary.
pub fn baton_home() -> PathBuf {
    if let Some(home) = std::env::var_os("BATON_HOME") {
        return PathBuf::from(home);
    }
    let cwd = PathBuf::from(".baton");
    if cwd.is_dir() {
        return cwd;
    }
    if let Ok(exe) = std::env::current_exe() {
        for dir in exe.ancestors().skip(1) {
            let candidate = dir.join(".baton");
            if candidate.is_dir() {
                return candidate;
            }
        }
    }
    cwd
}

/// The default of `--model-sessions` and `--model-threads`: [`EmbedderConfig::worker_layout`].
fn default_layout() -> (u16, u16) {
    let (sessions, threads) = baton_gpu_kernels::EmbedderConfig::worker_layout();
    (
        u16::try_from(sessions.min(64)).unwrap_or(1),
        u16::try_from(threads.min(256)).unwrap_or(1),
    )
}

/// The process's models (loaded lazily) and, once [`open_index`] set it, its vector index.
fn models(args: &ModelArgs) -> Arc<Models> {
    Arc::new(
        Models::new(baton_home())
            .with_sessions(args.model_sessions.into(), args.model_threads.into())
            .with_batching(args.batching()),
    )
}

fn registry(models: &Arc<Models>) -> anyhow::Result<Registry> {
    pipelines::factory(models.clone())
}

/// Opens the vector index in `dir` and hands it to `models`, for the index activities and
/// the search service of this process.
async fn open_index(models: &Arc<Models>, dir: PathBuf) -> anyhow::Result<()> {
    let shown = dir.display().to_string();
    let index = tokio::task::spawn_blocking(move || VectorIndex::open_dir(&dir))
        .await?
        .with_context(|| format!("opening the vector index in {shown}"))?;
    let stats = index.stats();
    tracing::info!(path = %index.path().display(), documents = stats.documents, chunks = stats.chunks, "vector index open");
    if !models.set_index(Arc::new(index)) {
        bail!("this process already has a vector index");
    }
    Ok(())
}

/// The index directory of `baton worker --queue index`: `--index-dir`, else
/// `$BATON_DATA_DIR/index`, else `./baton-index`.
fn worker_index_dir(flag: Option<PathBuf>) -> PathBuf {
    flag.or_else(|| {
        std::env::var_os("BATON_DATA_DIR")
            .filter(|d| !d.is_empty())
            .map(|d| PathBuf::from(d).join("index"))
    })
    .unwrap_or_else(|| PathBuf::from("baton-index"))
}

fn worker_id(queue: &str) -> String {
    let host =
        std::fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_else(|_| "host".into());
    format!("{queue}-{}-{}", host.trim(), std::process::id())
}

async fn connect(url: &str) -> anyhow::Result<async_nats::Client> {
    async_nats::ConnectOptions::new()
        .name("baton")
        .retry_on_initial_connect()
        .connect(url)
        .await
        .with_context(|| format!("connecting to NATS at {url}"))
}

async fn pool(
    client: &async_nats::Client,
    registry: Arc<Registry>,
    queue: &str,
    concurrency: usize,
) -> anyhow::Result<PoolHandle> {
    let streams = Streams::ensure(client).await?;
    start_pool(
        streams,
        registry,
        PoolOptions {
            queue: queue.into(),
            concurrency,
            worker_id: worker_id(queue),
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("starting the {queue} pool: {e}"))
}

/// The roles of `baton dev`, running; dropped in reverse order on stop.
pub struct Dev {
    /// URL of the NATS server in use.
    pub url: String,
    orchestrator: Orchestrator,
    pools: Vec<PoolHandle>,
    search: SearchService,
    _server: Option<nats_server::NatsServer>,
}

impl Dev {
    /// Starts the local server (unless `--nats-url`), the orchestrator, the CPU, GPU and
    /// index pools and the search service.
    pub async fn start(args: &DevArgs) -> anyhow::Result<Dev> {
        let home = baton_home();
        let data_dir = args
            .data_dir
            .clone()
            .unwrap_or_else(|| home.join("dev-data"));
        let (server, url) = match &args.nats_url {
            Some(url) => (None, url.clone()),
            None => {
                let bin = args
                    .nats_server_bin
                    .clone()
                    .unwrap_or_else(|| nats_server::default_binary(&home));
                let s =
                    nats_server::NatsServer::start(&bin, &data_dir, args.nats_port.unwrap_or(0))?;
                let url = s.url();
                (Some(s), url)
            }
        };
        let client = connect(&url).await?;
        let models = models(&args.model);
        // Fine-tuned heads, checkpoints and datasets live in JetStream (KV + object store).
        models.attach_jetstream(async_nats::jetstream::new(client.clone()));
        let index_dir = args
            .index_dir
            .clone()
            .unwrap_or_else(|| data_dir.join("index"));
        open_index(&models, index_dir).await?;
        let registry = Arc::new(registry(&models)?);
        let orchestrator = Orchestrator::start(
            client.clone(),
            (*registry).clone(),
            args.cache.node_options(data_dir.clone()),
        )
        .await?;
        let pools = vec![
            pool(
                &client,
                registry.clone(),
                pipelines::CPU_QUEUE,
                args.cpu_concurrency,
            )
            .await?,
            pool(
                &client,
                registry.clone(),
                pipelines::GPU_QUEUE,
                args.gpu_concurrency,
            )
            .await?,
            // One writer at a time: upserts are serialised by the index anyway.
            pool(&client, registry.clone(), ingest::INDEX_QUEUE, 1).await?,
        ];
        let search = ingest::serve_search(client.clone(), models).await?;
        tracing::info!(%url, data_dir = %data_dir.display(), "baton dev is up");
        Ok(Dev {
            url,
            orchestrator,
            pools,
            search,
            _server: server,
        })
    }

    /// Stops the search service, the pools, the orchestrator, then the server.
    pub async fn stop(self) {
        self.search.stop();
        for p in self.pools {
            p.stop().await;
        }
        self.orchestrator.stop().await;
    }
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn api_error(e: baton_transport::wire::ApiError) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code, e.message)
}

async fn ctrl_c() {
    let _ = tokio::signal::ctrl_c().await;
}

/// SIGINT or SIGTERM.
async fn shutdown_signal() {
    let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return ctrl_c().await,
    };
    tokio::select! {
        _ = ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `baton cancel` and `baton terminate`.
async fn close(
    nats: &NatsArgs,
    verb: &str,
    id: &str,
    reason: Option<String>,
) -> anyhow::Result<()> {
    let c = EdgeClient::connect(&nats.nats_url).await?;
    print_json(
        &c.api(
            verb,
            serde_json::json!({"workflow_id": id, "reason": reason}),
        )
        .await?
        .map_err(api_error)?,
    )
}

#[tokio::main]
async fn main() {
    if let Err(e) = run(Cli::parse()).await {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let quiet_client = !matches!(
        cli.command,
        Cmd::Dev(_) | Cmd::Orchestrator { .. } | Cmd::Worker { .. }
    );
    let default_filter = if quiet_client { "warn" } else { "info" };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| default_filter.into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match cli.command {
        Cmd::Dev(args) => {
            let dev = Dev::start(&args).await?;
            println!("baton dev: NATS at {} — Ctrl-C to stop", dev.url);
            ctrl_c().await;
            dev.stop().await;
        }
        Cmd::Orchestrator {
            nats,
            data_dir,
            cache,
        } => {
            let client = connect(&nats.nats_url).await?;
            let mut options = cache.node_options(data_dir);
            // The chaos suite's fault-injection hook (journal storage faults, NATS
            // failures, power loss); off unless BATON_CHAOS_FAULTS=1.
            let storage_faults = faults::enabled().then(faults::orchestrator_storage_faults);
            options.storage_faults = storage_faults.clone();
            let node = Orchestrator::start(
                client.clone(),
                registry(&Arc::new(Models::new(baton_home())))?,
                options,
            )
            .await?;
            let faults_hook = match storage_faults {
                Some(f) => Some(faults::serve_orchestrator(client, f).await?),
                None => None,
            };
            ctrl_c().await;
            if let Some(hook) = faults_hook {
                hook.abort();
            }
            node.stop().await;
        }
        Cmd::Worker {
            nats,
            queue,
            concurrency,
            index_dir,
            shutdown_grace_ms,
            model,
        } => {
            let client = connect(&nats.nats_url).await?;
            let models = models(&model);
            models.attach_jetstream(async_nats::jetstream::new(client.clone()));
            let mut search = None;
            if queue == ingest::INDEX_QUEUE {
                open_index(&models, worker_index_dir(index_dir)).await?;
                search = Some(ingest::serve_search(client.clone(), models.clone()).await?);
            } else if let Some(dir) = index_dir {
                tracing::warn!(index_dir = %dir.display(), %queue, "--index-dir ignored: only `--queue index` holds the vector index");
            }
            let pool = pool(&client, Arc::new(registry(&models)?), &queue, concurrency).await?;
            // The chaos suite's fault-injection hook; off unless BATON_CHAOS_FAULTS=1.
            let faults_hook = if faults::enabled() {
                Some(faults::serve(client.clone(), &queue, &pool).await?)
            } else {
                None
            };
            shutdown_signal().await;
            if let Some(hook) = faults_hook {
                hook.abort();
            }
            tracing::info!(grace_ms = shutdown_grace_ms, "shutting down");
            let abandoned = pool
                .shutdown(Duration::from_millis(shutdown_grace_ms))
                .await;
            if let Some(s) = search {
                s.stop();
            }
            tracing::info!(abandoned, "worker stopped");
        }
        Cmd::Start {
            nats,
            workflow,
            input,
            id,
            wait,
            signal,
            signal_input,
            execution_timeout_ms,
        } => {
            let input = match input.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("reading --input {input}"))?,
                None => input,
            };
            let input: serde_json::Value =
                serde_json::from_str(&input).context("--input is not valid JSON")?;
            let signal = match signal {
                Some(name) => Some(baton_transport::wire::StartSignal {
                    name,
                    input: serde_json::from_str(&signal_input)
                        .context("--signal-input is not valid JSON")?,
                }),
                None => None,
            };
            let request = baton_transport::wire::StartRequest {
                workflow_id: id,
                input,
                signal,
                execution_timeout_ms,
                ..Default::default()
            };
            let c = EdgeClient::connect(&nats.nats_url).await?;
            let started = c
                .start_with(&workflow, &request)
                .await?
                .map_err(api_error)?;
            print_json(&started)?;
            if wait {
                print_result(
                    c.wait_result(&started.workflow_id)
                        .await?
                        .map_err(api_error)?,
                )?;
            }
        }
        Cmd::Result { nats, id, wait } => {
            let c = EdgeClient::connect(&nats.nats_url).await?;
            let r = if wait {
                c.wait_result(&id).await?
            } else {
                c.result(&id, Duration::ZERO).await?
            };
            print_result(r.map_err(api_error)?)?;
        }
        Cmd::Describe { nats, id } => {
            let c = EdgeClient::connect(&nats.nats_url).await?;
            print_json(
                &c.api("describe", serde_json::json!({"workflow_id": id}))
                    .await?
                    .map_err(api_error)?,
            )?;
        }
        Cmd::History { nats, id, json } => {
            let c = EdgeClient::connect(&nats.nats_url).await?;
            let h = c.history(&id).await?.map_err(api_error)?;
            if json {
                print_json(&h)?;
            } else {
                for e in h["events"].as_array().into_iter().flatten() {
                    println!("{e}");
                }
            }
        }
        Cmd::Signal {
            nats,
            id,
            name,
            input,
        } => {
            let input: serde_json::Value =
                serde_json::from_str(&input).context("--input is not valid JSON")?;
            let c = EdgeClient::connect(&nats.nats_url).await?;
            print_json(
                &c.api(
                    "signal",
                    serde_json::json!({"workflow_id": id, "name": name, "input": input}),
                )
                .await?
                .map_err(api_error)?,
            )?;
        }
        Cmd::Cancel { nats, id, reason } => close(&nats, "cancel", &id, reason).await?,
        Cmd::Terminate { nats, id, reason } => close(&nats, "terminate", &id, reason).await?,
        Cmd::Query { nats, id, name } => {
            let c = EdgeClient::connect(&nats.nats_url).await?;
            let r = c
                .api(
                    "query",
                    serde_json::json!({"workflow_id": id, "name": name}),
                )
                .await?
                .map_err(api_error)?;
            print_json(&r["result"])?;
        }
        Cmd::Replay { file } => {
            let report = baton_orchestrator::replay_check::replay_file(
                &registry(&Arc::new(Models::new(baton_home())))?,
                &file,
            )?;
            println!(
                "{}: {} events of {} replayed against this build: deterministic; {}",
                file.display(),
                report.events,
                report.workflow_type,
                if report.closed {
                    "the run closed the same way".to_string()
                } else if report.next.is_empty() {
                    "the code waits, as recorded".to_string()
                } else {
                    format!("next the code would: {}", report.next.join(", "))
                }
            );
        }
        Cmd::List {
            nats,
            status,
            limit,
        } => {
            let c = EdgeClient::connect(&nats.nats_url).await?;
            let l = c
                .api(
                    "list",
                    serde_json::json!({"status": status, "limit": limit}),
                )
                .await?
                .map_err(api_error)?;
            for w in l["workflows"].as_array().into_iter().flatten() {
                println!(
                    "{}\t{}\t{}\t{}",
                    w["workflow_id"].as_str().unwrap_or(""),
                    w["workflow_type"].as_str().unwrap_or(""),
                    w["status"].as_str().unwrap_or(""),
                    w["run_id"].as_str().unwrap_or("")
                );
            }
        }
        Cmd::Search {
            nats,
            query,
            k,
            json,
        } => {
            let c = EdgeClient::connect(&nats.nats_url).await?;
            let reply: ingest::SearchReply = c
                .request(
                    ingest::SEARCH_SUBJECT.into(),
                    &ingest::SearchRequest { query, k },
                    Duration::from_secs(30),
                )
                .await
                .context(
                    "no search service answered: is `baton dev` or `baton worker --queue index` running?",
                )?
                .map_err(api_error)?;
            if json {
                print_json(&reply)?;
            } else {
                print_hits(&reply);
            }
        }
        Cmd::Demo(args) => demo::run(&args).await?,
    }
    Ok(())
}

/// One hit per paragraph: rank, score, source and chunk ordinal, then the chunk's text
/// abridged to about 160 characters.
fn print_hits(reply: &ingest::SearchReply) {
    if reply.hits.is_empty() {
        println!(
            "no hits ({} documents, {} chunks indexed)",
            reply.index.documents, reply.index.chunks
        );
        return;
    }
    for (i, h) in reply.hits.iter().enumerate() {
        // The document ID, when it says more than the source (an explicit `id`).
        let id = if h.source.ends_with(h.doc_id.as_str()) {
            String::new()
        } else {
            format!("  [{}]", h.doc_id)
        };
        println!(
            "{:>2}. {:.3}  {} #{}{id}",
            i + 1,
            h.score,
            h.source,
            h.ordinal
        );
        println!("    {}", abridge(&h.text, 160));
    }
}

/// `text` on one line, cut to at most `max` characters (at a word boundary when one is
/// near) with an ellipsis.
fn abridge(text: &str, max: usize) -> String {
    let flat = text.split_whitespace().collect::<Vec<_>>().join(" ");
    if flat.chars().count() <= max {
        return flat;
    }
    let cut: String = flat.chars().take(max.saturating_sub(1)).collect();
    let cut = match cut.rfind(' ') {
        Some(i) if i > max / 2 => &cut[..i],
        _ => cut.as_str(),
    };
    format!("{}…", cut.trim_end())
}

fn print_result(r: ResultReply) -> anyhow::Result<()> {
    print_json(&r)?;
    if let ResultReply::Failed { .. } = r {
        bail!("workflow failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::{Cli, Cmd, abridge, default_layout};

    fn worker_model(args: &[&str]) -> Result<(u16, u16), clap::Error> {
        let argv = ["baton", "worker", "--queue", "gpu"].iter().chain(args);
        match Cli::try_parse_from(argv)?.command {
            Cmd::Worker { model, .. } => Ok((model.model_sessions, model.model_threads)),
            _ => unreachable!("parsed a worker"),
        }
    }

    #[test]
    fn model_sessions_and_threads_default_and_bounds() {
        let (sessions, threads) = worker_model(&[]).unwrap();
        assert_eq!((sessions, threads), default_layout());
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert!(sessions >= 1 && usize::from(sessions) <= cores.min(4));
        assert!(usize::from(sessions) * usize::from(threads) <= cores.max(1));
        assert_eq!(
            worker_model(&["--model-sessions", "2", "--model-threads", "1"]).unwrap(),
            (2, 1)
        );
        for bad in [["--model-sessions", "0"], ["--model-threads", "0"]] {
            let e = worker_model(&bad).unwrap_err().to_string();
            assert!(e.contains("0 is not in"), "{e}");
        }
    }

    #[test]
    fn abridge_flattens_and_cuts_at_a_word() {
        assert_eq!(abridge("  a\n b  ", 160), "a b");
        let long = "word ".repeat(100);
        let short = abridge(&long, 22);
        assert_eq!(short, "word word word word…");
        assert!(short.chars().count() <= 22);
        let unbroken = "x".repeat(50);
        assert_eq!(abridge(&unbroken, 10), format!("{}…", "x".repeat(9)));
    }
}
