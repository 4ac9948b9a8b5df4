//! `baton-timerbench`: many open executions waiting on durable timers, an orchestrator
//! `kill -9` while they wait, and their recovery (the performance issue's goal: 100,000
//! open executions in at most 1 GiB of orchestrator RSS; after `kill -9` and a restart,
//! all resume and complete, the first within 1 s).
//!
//! 1. Starts a nats-server (`sync_interval: always`) and `baton orchestrator` as child
//!    processes (no workers: `bench_timer` runs no activity).
//! 2. Starts N `bench_timer` workflows (C start requests in flight), each sleeping on a
//!    durable timer due at one common time, far enough ahead that none fires before the
//!    kill. Every start is acknowledged once durable.
//! 3. Samples the orchestrator's RSS once all N wait, and again after its idle-eviction
//!    window (`--evict-idle-ms`, the orchestrator's default 60 s unless given).
//! 4. `kill -9`s the orchestrator, waits until the timers are due, restarts it on the same
//!    journal, waits until no run is open, and samples the orchestrator's RSS and peak RSS
//!    during the recovery.
//! 5. Reads back every result and checks it (`fired_ms >= wake_at_ms`), and every run's
//!    close time (`closed_ms`, from `baton.api.describe`): the time from the restart (the
//!    moment the process is spawned) to the first, the median and the last close.
//!
//! `TIMERBENCH_LOG` overrides the orchestrator's `RUST_LOG` (its log is
//! `orchestrator-<n>.log` in the data directory).

use std::{
    path::PathBuf,
    process::{Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, bail};
use baton_benches::{KillOnDrop, proc_stats};
use baton_transport::jetstream::local_server_config;
use clap::Parser;
use futures::StreamExt;
use serde_json::{Value, json};

/// Open executions waiting on durable timers, across an orchestrator `kill -9`.
#[derive(Parser, Debug)]
struct Args {
    /// Workflows started (each one open execution waiting on a timer).
    #[arg(long, default_value_t = 100_000)]
    workflows: usize,
    /// Start requests in flight.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// The orchestrator's `--evict-idle-ms` (default: the orchestrator's own default).
    #[arg(long)]
    evict_idle_ms: Option<u64>,
    /// How long after the last start to sample the RSS again (let eviction work), seconds.
    #[arg(long, default_value_t = 70)]
    settle_s: u64,
    /// The `baton` binary (default: beside this binary).
    #[arg(long)]
    baton_bin: Option<PathBuf>,
    /// Keep the journal, the JetStream store and the logs in this directory (default: a
    /// temporary one, removed at the end).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Where `cargo xtask setup` put nats-server.
    #[arg(long, env = "BATON_HOME", default_value = ".baton")]
    baton_home: PathBuf,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

fn spawn_nats(
    home: &std::path::Path,
    dir: &std::path::Path,
) -> anyhow::Result<(KillOnDrop, String)> {
    let bin = home.join("bin").join("nats-server");
    if !bin.exists() {
        bail!(
            "nats-server not found at {}: run `cargo xtask setup`",
            bin.display()
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let config = dir.join("nats.conf");
    std::fs::write(&config, local_server_config(port, &dir.join("jetstream")))?;
    let child = Command::new(&bin)
        .arg("-c")
        .arg(&config)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("nats.log"))?)
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nats-server did not listen in 20 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok((KillOnDrop(child), format!("nats://127.0.0.1:{port}")))
}

fn spawn_orchestrator(
    args: &Args,
    url: &str,
    dir: &std::path::Path,
    n: u32,
) -> anyhow::Result<KillOnDrop> {
    let bin = match &args.baton_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("baton"),
    };
    let mut cmd = Command::new(&bin);
    cmd.args(["orchestrator", "--nats-url", url, "--data-dir"])
        .arg(dir.join("journal"));
    if let Some(ms) = args.evict_idle_ms {
        cmd.args(["--evict-idle-ms", &ms.to_string()]);
    }
    let child = cmd
        .env(
            "RUST_LOG",
            std::env::var("TIMERBENCH_LOG").unwrap_or_else(|_| {
                "warn,baton_actors::node=info,baton_actors::journal=info".into()
            }),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(
            dir.join(format!("orchestrator-{n}.log")),
        )?)
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    Ok(KillOnDrop(child))
}

async fn request(nc: &async_nats::Client, subject: &str, body: &Value) -> anyhow::Result<Value> {
    let reply = tokio::time::timeout(
        Duration::from_secs(60),
        nc.request(subject.to_string(), body.to_string().into()),
    )
    .await
    .context("no reply in 60 s")??;
    Ok(serde_json::from_slice(&reply.payload)?)
}

/// How many runs `baton.api.list` returns with `status` (at most `limit`).
async fn listed(nc: &async_nats::Client, status: &str, limit: usize) -> anyhow::Result<Vec<Value>> {
    let r = request(
        nc,
        "baton.api.list",
        &json!({"status": status, "limit": limit}),
    )
    .await?;
    if let Some(e) = r.get("error") {
        bail!("list: {e}");
    }
    Ok(r["workflows"].as_array().cloned().unwrap_or_default())
}

/// Waits until the orchestrator answers the API.
async fn wait_ready(nc: &async_nats::Client, within: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + within;
    loop {
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(2), listed(nc, "completed", 1)).await
        {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("the orchestrator did not answer in {within:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let temp = tempfile::Builder::new()
        .prefix("baton-timerbench-")
        .tempdir()?;
    let dir = match &args.data_dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => temp.path().to_path_buf(),
    };
    let dir = dir.as_path();
    let (_nats, url) = spawn_nats(&args.baton_home, dir)?;
    let nc = async_nats::connect(&url).await?;
    let mut orch = spawn_orchestrator(&args, &url, dir, 1)?;
    wait_ready(&nc, Duration::from_secs(60)).await?;
    let pid = orch.0.id();
    let n = args.workflows;
    println!(
        "timerbench: {n} bench_timer workflows, {} start requests in flight, evict-idle {}",
        args.concurrency,
        args.evict_idle_ms
            .map_or("default".to_string(), |ms| format!("{ms} ms"))
    );

    // Phase 1: start them all, each waiting on a timer due well after the last start.
    // The due time is set from a first measured rate, so no timer fires before the kill.
    let t0 = Instant::now();
    let probe = n.min(2_000);
    start_range(&nc, 0..probe, u64::MAX / 2, args.concurrency).await?;
    let rate = probe as f64 / t0.elapsed().as_secs_f64();
    let rest_s = (n - probe) as f64 / rate;
    let wake_at_ms = now_ms() + ((rest_s * 2.0 + 30.0 + args.settle_s as f64) * 1e3) as u64;
    start_range(&nc, probe..n, wake_at_ms, args.concurrency).await?;
    let start_s = t0.elapsed().as_secs_f64();
    // The probe's runs wait "forever": terminate them, so every remaining run is due at
    // `wake_at_ms`.
    let terminated = futures::stream::iter(0..probe)
        .map(|i| {
            let nc = nc.clone();
            async move {
                request(
                    &nc,
                    "baton.api.terminate",
                    &json!({"workflow_id": format!("timer-{i}"), "reason": "probe"}),
                )
                .await
            }
        })
        .buffer_unordered(args.concurrency)
        .filter_map(|r| {
            futures::future::ready(match r {
                Ok(v) if v.get("error").is_none() => None,
                other => Some(format!("{other:?}")),
            })
        })
        .collect::<Vec<_>>()
        .await;
    if let Some(e) = terminated.first() {
        bail!(
            "{} of the {probe} probe runs not terminated, e.g. {e}",
            terminated.len()
        );
    }
    let waiting = n - probe;
    let started = proc_stats(pid).context("orchestrator gone")?;
    println!(
        "started {n} in {start_s:.1} s ({:.0}/s); {waiting} wait on timers due in {:.0} s; orchestrator RSS {:.0} MiB (peak {:.0} MiB)",
        n as f64 / start_s,
        (wake_at_ms.saturating_sub(now_ms())) as f64 / 1e3,
        mib(started.rss),
        mib(started.peak_rss)
    );
    tokio::time::sleep(Duration::from_secs(args.settle_s)).await;
    let settled = proc_stats(pid).context("orchestrator gone")?;
    if !listed(&nc, "completed", 1).await?.is_empty() {
        bail!("a run completed before the kill: the timers were due too early");
    }
    println!(
        "after {} s: orchestrator RSS {:.0} MiB (peak {:.0} MiB)",
        args.settle_s,
        mib(settled.rss),
        mib(settled.peak_rss)
    );

    // Phase 2: kill -9, let the timers fall due, restart.
    orch.0.kill()?;
    orch.0.wait()?;
    drop(orch);
    let due_in = wake_at_ms.saturating_sub(now_ms()) + 500;
    println!(
        "orchestrator killed (SIGKILL); restarting {due_in} ms from now, once every timer is due"
    );
    tokio::time::sleep(Duration::from_millis(due_in)).await;
    let restart_ms = now_ms();
    let t_restart = Instant::now();
    let orch = spawn_orchestrator(&args, &url, dir, 2)?;
    let pid = orch.0.id();
    let mut peak_rss = 0u64;
    // Polled only to know when to go on: the figures are the runs' own close times.
    loop {
        if let Some(s) = proc_stats(pid) {
            peak_rss = peak_rss.max(s.peak_rss);
        }
        if let Ok(Ok(open)) =
            tokio::time::timeout(Duration::from_secs(5), listed(&nc, "running", 1)).await
            && open.is_empty()
        {
            break;
        }
        if t_restart.elapsed() > Duration::from_secs(1800) {
            bail!("not every run completed within 30 min of the restart");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let after = proc_stats(pid).context("orchestrator gone")?;
    peak_rss = peak_rss.max(after.peak_rss);

    // Phase 3: every result, checked, and every run's close time.
    let checked = futures::stream::iter(probe..n)
        .map(|i| {
            let nc = nc.clone();
            async move {
                let id = format!("timer-{i}");
                let r = request(&nc, "baton.api.result", &json!({"workflow_id": id})).await;
                match r {
                    Ok(v)
                        if v["status"] == "completed"
                            && v["output"]["wake_at_ms"] == json!(wake_at_ms)
                            && v["output"]["fired_ms"]
                                .as_u64()
                                .is_some_and(|f| f >= wake_at_ms) => {}
                    other => return Err(format!("{id}: {other:?}")),
                }
                match request(&nc, "baton.api.describe", &json!({"workflow_id": id})).await {
                    Ok(v) if v["closed_ms"].is_u64() => {
                        Ok(v["closed_ms"].as_u64().expect("checked"))
                    }
                    other => Err(format!("{id}: no close time: {other:?}")),
                }
            }
        })
        .buffer_unordered(args.concurrency)
        .collect::<Vec<_>>()
        .await;
    let (mut closed, mut bad) = (Vec::new(), Vec::new());
    for r in checked {
        match r {
            Ok(closed_ms) => closed.push(closed_ms),
            Err(e) => bad.push(e),
        }
    }
    if let Some(b) = bad.first() {
        bail!("{} of {waiting} results wrong, e.g. {b}", bad.len());
    }
    closed.sort_unstable();
    let since_restart = |ms: u64| ms.saturating_sub(restart_ms) as f64;
    let (first, median, last) = (
        since_restart(closed[0]),
        since_restart(closed[closed.len() / 2]),
        since_restart(closed[closed.len() - 1]),
    );
    println!(
        "after the restart: first run completed {first:.0} ms after the restart, half by {:.1} s, all {waiting} by {:.1} s; every result checked",
        median / 1e3,
        last / 1e3
    );
    println!(
        "orchestrator after recovery: RSS {:.0} MiB, peak {:.0} MiB",
        mib(after.rss),
        mib(peak_rss)
    );
    println!(
        "| open executions | starts/s | RSS all waiting | RSS after {} s | restart -> first completed | half completed | all completed | peak RSS in recovery |",
        args.settle_s
    );
    println!("|---|---|---|---|---|---|---|---|");
    println!(
        "| {waiting} | {:.0} | {:.0} MiB | {:.0} MiB | {first:.0} ms | {:.1} s | {:.1} s | {:.0} MiB |",
        n as f64 / start_s,
        mib(started.rss),
        mib(settled.rss),
        median / 1e3,
        last / 1e3,
        mib(peak_rss)
    );
    drop(orch);
    Ok(())
}

/// Starts `timer-<i>` for every `i` in `range`, due at `wake_at_ms`; every start must be
/// acknowledged as started.
async fn start_range(
    nc: &async_nats::Client,
    range: std::ops::Range<usize>,
    wake_at_ms: u64,
    concurrency: usize,
) -> anyhow::Result<()> {
    let failures = futures::stream::iter(range)
        .map(|i| {
            let nc = nc.clone();
            async move {
                let body = json!({"workflow_id": format!("timer-{i}"), "input": {"wake_at_ms": wake_at_ms}});
                match request(&nc, "baton.start.bench_timer", &body).await {
                    Ok(v) if v["status"] == "started" => None,
                    other => Some(format!("timer-{i}: {other:?}")),
                }
            }
        })
        .buffer_unordered(concurrency)
        .filter_map(futures::future::ready)
        .collect::<Vec<_>>()
        .await;
    if let Some(f) = failures.first() {
        bail!("{} starts failed, e.g. {f}", failures.len());
    }
    Ok(())
}
