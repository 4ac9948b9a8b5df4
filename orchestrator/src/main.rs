//! `baton`: Baton's command-line interface and node roles.
//!
//! - `baton dev`: a local nats-server child, an orchestrator, a CPU and a GPU worker pool,
//!   in one process, until Ctrl-C.
//! - `baton orchestrator` / `baton worker`: the same roles as separate processes.
//! - `baton start | result | describe | history | list`: a client of the edge.
//! - `baton demo`: `baton dev` plus the Mini AI Pipeline, printing both results.

mod client;
mod demo;
mod nats_server;

use std::{path::PathBuf, sync::Arc, time::Duration};

use anyhow::{Context, bail};
use baton_actors::{
    Registry,
    node::{NodeOptions, Orchestrator},
    worker::{PoolHandle, PoolOptions, start_pool},
};
use baton_orchestrator::pipelines::{self, Models};
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
    /// One process: a local nats-server, an orchestrator, a CPU and a GPU worker pool.
    Dev(DevArgs),
    /// An orchestrator node.
    Orchestrator {
        #[command(flatten)]
        nats: NatsArgs,
        /// Directory of the journal.
        #[arg(long, env = "BATON_DATA_DIR", default_value = "baton-data")]
        data_dir: PathBuf,
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
    },
    /// List workflows.
    List {
        #[command(flatten)]
        nats: NatsArgs,
        /// Only this status: running, completed, failed.
        #[arg(long)]
        status: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 50)]
        limit: usize,
    },
    /// `baton dev` plus the Mini AI Pipeline: runs both workflows and prints their results.
    Demo(DevArgs),
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

fn registry() -> anyhow::Result<Registry> {
    pipelines::factory(Arc::new(Models::new(baton_home())))
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
    _server: Option<nats_server::NatsServer>,
}

impl Dev {
    /// Starts the local server (unless `--nats-url`), the orchestrator and both pools.
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
        let registry = Arc::new(registry()?);
        let orchestrator = Orchestrator::start(
            client.clone(),
            (*registry).clone(),
            NodeOptions {
                data_dir: data_dir.clone(),
            },
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
        ];
        tracing::info!(%url, data_dir = %data_dir.display(), "baton dev is up");
        Ok(Dev {
            url,
            orchestrator,
            pools,
            _server: server,
        })
    }

    /// Stops the pools, the orchestrator, then the server.
    pub async fn stop(self) {
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
        Cmd::Orchestrator { nats, data_dir } => {
            let client = connect(&nats.nats_url).await?;
            let node = Orchestrator::start(client, registry()?, NodeOptions { data_dir }).await?;
            ctrl_c().await;
            node.stop().await;
        }
        Cmd::Worker {
            nats,
            queue,
            concurrency,
        } => {
            let client = connect(&nats.nats_url).await?;
            let pool = pool(&client, Arc::new(registry()?), &queue, concurrency).await?;
            ctrl_c().await;
            pool.stop().await;
        }
        Cmd::Start {
            nats,
            workflow,
            input,
            id,
            wait,
        } => {
            let input = match input.strip_prefix('@') {
                Some(path) => std::fs::read_to_string(path)
                    .with_context(|| format!("reading --input {input}"))?,
                None => input,
            };
            let input: serde_json::Value =
                serde_json::from_str(&input).context("--input is not valid JSON")?;
            let c = EdgeClient::connect(&nats.nats_url).await?;
            let started = c.start(&workflow, id, input).await?.map_err(api_error)?;
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
        Cmd::History { nats, id } => {
            let c = EdgeClient::connect(&nats.nats_url).await?;
            let h = c
                .api("history", serde_json::json!({"workflow_id": id}))
                .await?
                .map_err(api_error)?;
            for e in h["events"].as_array().into_iter().flatten() {
                println!("{e}");
            }
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
        Cmd::Demo(args) => demo::run(&args).await?,
    }
    Ok(())
}

fn print_result(r: ResultReply) -> anyhow::Result<()> {
    print_json(&r)?;
    if let ResultReply::Failed { .. } = r {
        bail!("workflow failed");
    }
    Ok(())
}
