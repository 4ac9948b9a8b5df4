//! `baton-loadgen`: Baton's end-to-end load generator (`cargo xtask bench` runs it).
//!
//! Closed loop: C clients each start a workflow through the edge (a JSON request to
//! `baton.start.<type>`, acknowledged once durable), wait for its result, check it, and
//! start the next, until N workflows have completed (after a warm-up). By default it
//! spawns `baton dev` as a child process (a local nats-server with `sync_interval: always`,
//! an orchestrator, the CPU and GPU pools), so the CPU time and peak RSS of Baton and its
//! nats-server are measured apart from the load generator's own. In the same run it
//! measures the raw JetStream dispatch round trip (task -> pull -> result -> ack) on the
//! same server, so Baton's overhead can be reported as a ratio to that limit.
//!
//! With `--compare-bare-embedder`, each measured run of `batch_embed` is followed by a run of
//! a bare `baton_gpu_kernels::Embedder` loaded in this process (the same model and settings
//! as the GPU pool's: `EmbedderConfig::worker_layout`, one single-threaded session per
//! core, at most 4, a lone call spread over them) on the same texts in batches of 32, one
//! call at a time, while Baton is idle: texts/s through the workflow vs texts/s of the bare
//! embedder, as a ratio measured in one run.
//!
//! With `--stages`, the spawned dev logs its `baton::stage` events and, per workload and
//! concurrency, the load generator prints where a step's time goes (task queue, worker,
//! activity, report, journal, next dispatch; the start and the result; the journal's
//! group commits), median and p90 over the measured workflows ([`baton_benches::stages`]).

use std::{
    collections::HashMap,
    path::PathBuf,
    process::{Command, Stdio},
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use async_nats::jetstream::{self, consumer::pull, stream};
use baton_benches::{
    KillOnDrop, children, median, percentile, proc_stats,
    stages::{self, Stage},
};
use baton_gpu_kernels::{Embedder, EmbedderConfig};
use clap::Parser;
use futures::StreamExt;
use serde_json::{Value, json};

/// Baton's end-to-end load generator.
#[derive(Parser, Debug)]
struct Args {
    /// Workloads: bench_pipeline, prepare_and_infer, batch_embed (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "bench_pipeline")]
    workload: Vec<String>,
    /// Concurrency levels (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "1,64")]
    concurrency: Vec<usize>,
    /// Workflows measured per run.
    #[arg(long, default_value_t = 1000)]
    workflows: usize,
    /// Workflows run before measuring, per run.
    #[arg(long, default_value_t = 100)]
    warmup: usize,
    /// Runs per (workload, concurrency); the median is reported with min-max.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Use this NATS server (and the Baton nodes behind it) instead of spawning `baton dev`.
    #[arg(long)]
    nats_url: Option<String>,
    /// The `baton` binary to spawn (default: beside this binary).
    #[arg(long)]
    baton_bin: Option<PathBuf>,
    /// Concurrency of the spawned dev's CPU pool.
    #[arg(long, default_value_t = 64)]
    cpu_concurrency: usize,
    /// Concurrency of the spawned dev's GPU pool.
    #[arg(long, default_value_t = 64)]
    gpu_concurrency: usize,
    /// The spawned dev's `--gpu-max-batch` (most `run_inference` texts per forward pass);
    /// several (comma-separated) measure everything once per value, each on a fresh dev,
    /// and compare their throughputs (e.g. `1,32`: one at a time against batches of 32).
    #[arg(long, value_delimiter = ',')]
    gpu_max_batch: Vec<usize>,
    /// Raw JetStream round trips measured per concurrency level (0: skip).
    #[arg(long, default_value_t = 2000)]
    raw: usize,
    /// Also write the results as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// For `batch_embed`: after each measured run, embed the same texts with a bare
    /// `Embedder` in this process (the GPU pool's model settings, batches of 32) while
    /// Baton is idle, and report both in texts/s with their ratio.
    #[arg(long)]
    compare_bare_embedder: bool,
    /// Where `cargo xtask setup` put the model and ONNX Runtime (for
    /// `--compare-bare-embedder`).
    #[arg(long, env = "BATON_HOME", default_value = ".baton")]
    baton_home: PathBuf,
    /// Have the spawned dev log its per-stage timing events (`baton::stage`) and print,
    /// per workload and concurrency, where a step's time goes (median and p90 of each
    /// stage over the measured workflows). Logging them slows the dev a little.
    #[arg(long)]
    stages: bool,
}

/// One concurrency level of `--compare-bare-embedder`: per run, in run order.
struct Comparison {
    c: usize,
    /// Texts/s through the workflow (workflows/s x 32).
    workflow: Vec<f64>,
    /// CPU ms of Baton (`baton dev` + its nats-server) per workflow.
    baton_cpu: Vec<f64>,
    /// Of which the nats-server's.
    nats_cpu: Vec<f64>,
    /// CPU ms of this process (the clients) per workflow.
    client_cpu: Vec<f64>,
    /// Texts/s of the bare embedder on the same texts, right after.
    bare: Vec<f64>,
    /// CPU ms of this process per bare `embed` call of 32 texts.
    bare_cpu: Vec<f64>,
    /// workflow / bare, per run.
    ratio: Vec<f64>,
}

/// User + system CPU seconds of this process so far.
fn own_cpu_s() -> f64 {
    proc_stats(std::process::id()).map_or(0.0, |s| s.cpu_s)
}

/// Texts per `batch_embed` workflow (see [`input`]).
const BATCH_TEXTS: usize = 32;

/// The bare embedder of `--compare-bare-embedder`, configured as Baton's GPU pool
/// configures its own (`EmbedderConfig::for_workers`, or `BATON_MODEL_SESSIONS` /
/// `BATON_MODEL_THREADS` when set: the spawned dev inherits them), and warmed up.
fn load_bare_embedder(home: &std::path::Path) -> anyhow::Result<Arc<Embedder>> {
    let (sessions, threads) = EmbedderConfig::worker_layout();
    let setting = |name: &str, default: usize| -> anyhow::Result<usize> {
        match std::env::var(name) {
            Ok(v) => v.parse().with_context(|| format!("{name}={v:?}")),
            Err(_) => Ok(default),
        }
    };
    let cfg = EmbedderConfig {
        sessions: setting("BATON_MODEL_SESSIONS", sessions)?,
        intra_threads: setting("BATON_MODEL_THREADS", threads)?,
        ..EmbedderConfig::from_home(home)
    };
    eprintln!(
        "bare embedder: {} session(s) x {} intra-op thread(s)",
        cfg.sessions, cfg.intra_threads
    );
    let embedder = Embedder::load(&cfg)
        .with_context(|| format!("loading the bare embedder from {}", home.display()))?;
    for i in 0..4 {
        let texts = batch_texts(i);
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        embedder.embed(&refs)?;
    }
    Ok(Arc::new(embedder))
}

/// The texts of `batch_embed` workflow `i` (what [`input`] sends).
fn batch_texts(i: usize) -> Vec<String> {
    (0..BATCH_TEXTS)
        .map(|j| format!("document {i} sentence {j} about orchestration"))
        .collect()
}

/// The bare embedder on the texts of workflows `0..n`, one `embed` call of 32 texts per
/// workflow. Returns (texts/s, this process's CPU ms per 32 texts).
async fn bare_run(embedder: &Arc<Embedder>, n: usize) -> anyhow::Result<(f64, f64)> {
    let embedder = embedder.clone();
    tokio::task::spawn_blocking(move || {
        let batches: Vec<Vec<String>> = (0..n).map(batch_texts).collect();
        let cpu0 = own_cpu_s();
        let t = Instant::now();
        for texts in &batches {
            let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
            let v = embedder.embed(&refs)?;
            if v.len() != BATCH_TEXTS || v.iter().any(|v| v.len() != 384) {
                bail!("the bare embedder returned {} vectors", v.len());
            }
        }
        let elapsed = t.elapsed().as_secs_f64();
        let cpu1 = own_cpu_s();
        Ok((
            (n * BATCH_TEXTS) as f64 / elapsed,
            (cpu1 - cpu0) * 1e3 / n as f64,
        ))
    })
    .await?
}

struct Dev {
    child: KillOnDrop,
    _dir: tempfile::TempDir,
    url: String,
    /// The dev's log (its stderr).
    log: PathBuf,
}

fn spawn_dev(args: &Args, gpu_max_batch: Option<usize>) -> anyhow::Result<Dev> {
    let bin = match &args.baton_bin {
        Some(b) => b.clone(),
        None => std::env::current_exe()?.with_file_name("baton"),
    };
    let dir = tempfile::Builder::new().prefix("baton-bench-").tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let mut command = Command::new(&bin);
    command
        .args(["dev", "--nats-port", &port.to_string(), "--data-dir"])
        .arg(dir.path())
        .args(["--cpu-concurrency", &args.cpu_concurrency.to_string()])
        .args(["--gpu-concurrency", &args.gpu_concurrency.to_string()]);
    if let Some(b) = gpu_max_batch {
        command.args(["--gpu-max-batch", &b.to_string()]);
    }
    let filter = if args.stages {
        "warn,baton::stage=trace"
    } else {
        "warn"
    };
    let log = dir.path().join("dev.log");
    let child = command
        .env("RUST_LOG", filter)
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()
        .with_context(|| format!("spawning {}", bin.display()))?;
    Ok(Dev {
        child: KillOnDrop(child),
        _dir: dir,
        url: format!("nats://127.0.0.1:{port}"),
        log,
    })
}

/// Input and result check of a workload.
fn input(workload: &str, i: usize) -> Value {
    match workload {
        "bench_pipeline" => json!({"text": format!("Hello Bench {i}")}),
        "prepare_and_infer" => {
            let texts = [
                "I really enjoyed this, great work",
                "This was a waste of money",
                "Fast delivery and friendly support",
                "The app keeps crashing, awful",
            ];
            json!({"text": texts[i % texts.len()]})
        }
        "batch_embed" => json!({ "texts": batch_texts(i) }),
        _ => Value::Null,
    }
}

fn check(workload: &str, i: usize, output: &Value) -> bool {
    match workload {
        "bench_pipeline" => {
            let text = format!("hello bench {i}");
            let sum = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            });
            output["text"] == text.as_str() && output["checksum"].as_u64() == Some(sum)
        }
        "prepare_and_infer" => {
            output["label"].is_string()
                && output["score"]
                    .as_f64()
                    .is_some_and(|s| (0.0..=1.0).contains(&s))
        }
        "batch_embed" => output["embeddings"].as_array().is_some_and(|a| {
            a.len() == 32
                && a.iter()
                    .all(|v| v.as_array().is_some_and(|v| v.len() == 384))
        }),
        _ => false,
    }
}

async fn request(
    nc: &async_nats::Client,
    subject: String,
    body: &Value,
    timeout: Duration,
) -> anyhow::Result<Value> {
    let mut headers = async_nats::HeaderMap::new();
    headers.insert("Content-Type", "application/json");
    let req = async_nats::Request::new()
        .headers(headers)
        .payload(serde_json::to_vec(body)?.into())
        .timeout(Some(timeout));
    let m = nc.send_request(subject, req).await?;
    Ok(serde_json::from_slice(&m.payload)?)
}

/// One workflow, start to result. Returns the latency.
async fn one(
    nc: &async_nats::Client,
    workload: &str,
    prefix: &str,
    i: usize,
) -> anyhow::Result<Duration> {
    let id = format!("{prefix}-{i}");
    let t = Instant::now();
    let started = request(
        nc,
        format!("baton.start.{workload}"),
        &json!({"workflow_id": id, "input": input(workload, i)}),
        Duration::from_secs(30),
    )
    .await?;
    if started["status"] != "started" {
        bail!("start of {id}: {started}");
    }
    let result = request(
        nc,
        "baton.api.result".into(),
        &json!({"workflow_id": id, "wait_ms": 120_000}),
        Duration::from_secs(130),
    )
    .await?;
    if result["status"] != "completed" {
        bail!("{id}: {result}");
    }
    if !check(workload, i, &result["output"]) {
        bail!("{id}: wrong result {}", result["output"]);
    }
    Ok(t.elapsed())
}

/// Runs `n` workflows at concurrency `c`; returns (elapsed, sorted latencies in ms).
async fn closed_loop(
    nc: &async_nats::Client,
    workload: &str,
    prefix: &str,
    c: usize,
    n: usize,
) -> anyhow::Result<(Duration, Vec<f64>)> {
    let next = Arc::new(AtomicUsize::new(0));
    let lat = Arc::new(Mutex::new(Vec::with_capacity(n)));
    let t = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..c {
        let (nc, next, lat, workload, prefix) = (
            nc.clone(),
            next.clone(),
            lat.clone(),
            workload.to_string(),
            prefix.to_string(),
        );
        clients.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                let d = one(&nc, &workload, &prefix, i).await?;
                lat.lock().unwrap().push(d.as_secs_f64() * 1e3);
            }
        }));
    }
    for c in clients {
        c.await??;
    }
    let elapsed = t.elapsed();
    let mut l = std::mem::take(&mut *lat.lock().unwrap());
    l.sort_by(f64::total_cmp);
    Ok((elapsed, l))
}

fn baton_cpu(pids: &[u32]) -> (f64, u64) {
    pids.iter()
        .filter_map(|p| proc_stats(*p))
        .fold((0.0, 0), |(c, r), s| (c + s.cpu_s, r + s.peak_rss))
}

/// Raw JetStream dispatch round trip at concurrency `c`: publish a task (acked), a worker
/// pulls it, publishes a result (acked) and acks the task; the driver pulls the result and
/// acks it. Returns (round trips/s, p50 ms, p99 ms).
async fn raw_round_trip(
    nc: &async_nats::Client,
    c: usize,
    n: usize,
) -> anyhow::Result<(f64, f64, f64)> {
    let js = jetstream::new(nc.clone());
    let tag = format!("{}", std::process::id());
    for (name, subj) in [
        ("BENCH_RAW_TASKS", "benchraw.task.>"),
        ("BENCH_RAW_RESULTS", "benchraw.result.>"),
    ] {
        let _ = js.delete_stream(name).await;
        js.create_stream(stream::Config {
            name: name.into(),
            subjects: vec![subj.into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    }
    let tasks = js
        .get_stream("BENCH_RAW_TASKS")
        .await?
        .create_consumer(pull::Config {
            durable_name: Some(format!("w{tag}")),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let results = js
        .get_stream("BENCH_RAW_RESULTS")
        .await?
        .create_consumer(pull::Config {
            durable_name: Some(format!("d{tag}")),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ..Default::default()
        })
        .await?;
    let worker_js = js.clone();
    let worker = tokio::spawn(async move {
        let mut msgs = tasks.messages().await?;
        while let Some(m) = msgs.next().await {
            let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
            let js = worker_js.clone();
            tokio::spawn(async move {
                let id = m.subject.rsplit('.').next().unwrap_or("0").to_string();
                if let Ok(ack) = js
                    .publish(format!("benchraw.result.{id}"), m.payload.clone())
                    .await
                {
                    let _ = ack.await;
                }
                let _ = m.ack().await;
            });
        }
        Ok::<_, anyhow::Error>(())
    });
    let waiters: Arc<Mutex<HashMap<usize, tokio::sync::oneshot::Sender<()>>>> = Arc::default();
    let w2 = waiters.clone();
    let driver = tokio::spawn(async move {
        let mut msgs = results.messages().await?;
        while let Some(m) = msgs.next().await {
            let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
            let id: usize = m
                .subject
                .rsplit('.')
                .next()
                .unwrap_or("0")
                .parse()
                .unwrap_or(0);
            let _ = m.ack().await;
            if let Some(tx) = w2.lock().unwrap().remove(&id) {
                let _ = tx.send(());
            }
        }
        Ok::<_, anyhow::Error>(())
    });
    let next = Arc::new(AtomicUsize::new(0));
    let lat = Arc::new(Mutex::new(Vec::new()));
    let t = Instant::now();
    let mut clients = Vec::new();
    for _ in 0..c {
        let (js, next, lat, waiters) = (js.clone(), next.clone(), lat.clone(), waiters.clone());
        clients.push(tokio::spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(());
                }
                let (tx, rx) = tokio::sync::oneshot::channel();
                waiters.lock().unwrap().insert(i, tx);
                let s = Instant::now();
                js.publish(
                    format!("benchraw.task.{i}"),
                    bytes::Bytes::from_static(b"task"),
                )
                .await?
                .await?;
                tokio::time::timeout(Duration::from_secs(30), rx).await??;
                lat.lock().unwrap().push(s.elapsed().as_secs_f64() * 1e3);
            }
        }));
    }
    for c in clients {
        c.await??;
    }
    let elapsed = t.elapsed().as_secs_f64();
    worker.abort();
    driver.abort();
    for name in ["BENCH_RAW_TASKS", "BENCH_RAW_RESULTS"] {
        let _ = js.delete_stream(name).await;
    }
    let mut l = std::mem::take(&mut *lat.lock().unwrap());
    l.sort_by(f64::total_cmp);
    Ok((
        n as f64 / elapsed,
        percentile(&l, 0.5),
        percentile(&l, 0.99),
    ))
}

/// Microseconds since the Unix epoch, the clock of the dev's log lines.
fn now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros() as i64)
}

/// The stages of the steps dispatched within `windows`, from the dev's log.
fn read_stages(log: &std::path::Path, windows: &[(i64, i64)]) -> anyhow::Result<Vec<Stage>> {
    let text =
        std::fs::read_to_string(log).with_context(|| format!("reading {}", log.display()))?;
    let events: Vec<_> = text.lines().filter_map(stages::parse_line).collect();
    if events.is_empty() {
        bail!(
            "no baton::stage events in {}: is the baton binary older than --stages?",
            log.display()
        );
    }
    Ok(stages::analyze(&events, windows))
}

fn stages_json(stages: &[Stage]) -> Value {
    Value::Array(
        stages
            .iter()
            .filter_map(|s| {
                let (p50, p90) = s.summary()?;
                Some(json!({"stage": s.name.trim(), "covers": s.covers, "n": s.us.len(), "p50_us": p50, "p90_us": p90}))
            })
            .collect(),
    )
}

fn print_stages(workload: &str, c: usize, stages: &[Stage]) {
    println!(
        "\nwhere the time goes: {workload} at C={c} (µs; the measured workflows of every run)"
    );
    println!(
        "{:<36} {:>7} {:>9} {:>9}  covers",
        "stage", "n", "p50", "p90"
    );
    for s in stages {
        if let Some((p50, p90)) = s.summary() {
            println!(
                "{:<36} {:>7} {:>9.0} {:>9.0}  {}",
                s.name,
                s.us.len(),
                p50,
                p90,
                s.covers
            );
        }
    }
}

fn fmt_range(values: &[f64], digits: usize) -> String {
    let min = values.iter().copied().fold(f64::INFINITY, f64::min);
    let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!(
        "{:.d$} ({:.d$}-{:.d$})",
        median(values),
        min,
        max,
        d = digits
    )
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let bare = if args.compare_bare_embedder {
        if !args.workload.iter().any(|w| w == "batch_embed") {
            bail!(
                "--compare-bare-embedder needs the batch_embed workload (--workload batch_embed)"
            );
        }
        Some(load_bare_embedder(&args.baton_home)?)
    } else {
        None
    };
    if args.nats_url.is_some() && !args.gpu_max_batch.is_empty() {
        bail!("--gpu-max-batch sets up the spawned dev; with --nats-url set it on the workers");
    }
    let batches: Vec<Option<usize>> = if args.gpu_max_batch.is_empty() {
        vec![None]
    } else {
        args.gpu_max_batch.iter().copied().map(Some).collect()
    };
    let mut reports = Vec::new();
    for &gpu_max_batch in &batches {
        if let Some(b) = gpu_max_batch {
            println!("\n=== baton dev --gpu-max-batch {b} ===");
        }
        let mut report = measure(&args, bare.as_ref(), gpu_max_batch).await?;
        report["gpu_max_batch"] = json!(gpu_max_batch);
        reports.push(report);
    }
    if reports.len() > 1 {
        print_batch_comparison(&reports);
    }
    if let Some(path) = &args.json {
        let all = if reports.len() == 1 {
            reports.pop().expect("one")
        } else {
            json!({ "by_gpu_max_batch": reports })
        };
        std::fs::write(path, serde_json::to_vec_pretty(&all)?)?;
    }
    Ok(())
}

/// Throughput per workload and concurrency for each `--gpu-max-batch`, as a ratio to the
/// first value's (each the median of its runs).
fn print_batch_comparison(reports: &[Value]) {
    println!("\nthroughput by --gpu-max-batch (median workflows/s; ratio to the first):");
    let points = |r: &Value| -> Vec<(String, u64, f64)> {
        r["results"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|p| {
                let t: Vec<f64> = p["workflows_per_s"]
                    .as_array()?
                    .iter()
                    .filter_map(Value::as_f64)
                    .collect();
                Some((
                    p["workload"].as_str()?.to_string(),
                    p["concurrency"].as_u64()?,
                    median(&t),
                ))
            })
            .collect()
    };
    let base = points(&reports[0]);
    for r in reports {
        let b = r["gpu_max_batch"].as_u64().unwrap_or(0);
        for ((w, c, t), (_, _, t0)) in points(r).iter().zip(&base) {
            println!(
                "  gpu-max-batch {b:<4} {w:<18} C={c:<4} {t:>8.1}/s   x{:.2}",
                t / t0
            );
        }
    }
}

/// Measures every workload and concurrency against a fresh `baton dev` (or `--nats-url`),
/// printing the figures; returns them as JSON.
async fn measure(
    args: &Args,
    bare: Option<&Arc<Embedder>>,
    gpu_max_batch: Option<usize>,
) -> anyhow::Result<Value> {
    if args.stages && args.nats_url.is_some() {
        bail!("--stages reads the log of the dev it spawns: leave out --nats-url");
    }
    let dev = match &args.nats_url {
        Some(_) => None,
        None => Some(spawn_dev(args, gpu_max_batch)?),
    };
    let url = args
        .nats_url
        .clone()
        .or_else(|| dev.as_ref().map(|d| d.url.clone()))
        .expect("a url");
    let nc = loop {
        match async_nats::ConnectOptions::new().connect(&url).await {
            Ok(nc) => break nc,
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    };
    // Wait until the orchestrator answers.
    let t0 = Instant::now();
    while request(
        &nc,
        "baton.api.list".into(),
        &json!({"limit": 1}),
        Duration::from_secs(2),
    )
    .await
    .is_err()
    {
        if t0.elapsed() > Duration::from_secs(60) {
            bail!("Baton did not answer within 60 s");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pids: Vec<u32> = match &dev {
        Some(d) => {
            let mut p = vec![d.child.0.id()];
            p.extend(children(d.child.0.id()));
            p
        }
        None => Vec::new(),
    };
    let machine = format!(
        "{} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    println!(
        "baton-loadgen: {machine}, {} runs of {} workflows (+{} warm-up) per point; Baton = `baton dev` (pids {pids:?})",
        args.runs, args.workflows, args.warmup
    );
    let mut report = Vec::new();
    let prefix_base = format!(
        "lg{}",
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .as_millis()
    );
    println!(
        "\n{:<18} {:>4} {:>22} {:>20} {:>20} {:>20} {:>16} {:>18}",
        "workload",
        "C",
        "workflows/s",
        "p50 ms",
        "p90 ms",
        "p99 ms",
        "CPU ms/wf",
        "of it nats-server"
    );
    let mut comparisons = Vec::new();
    let mut stage_tables = Vec::new();
    for workload in &args.workload {
        let bare = bare.filter(|_| workload == "batch_embed");
        for &c in &args.concurrency {
            let (mut tput, mut p50, mut p90, mut p99, mut cpu) =
                (vec![], vec![], vec![], vec![], vec![]);
            let (mut bare_tput, mut bare_cpu, mut client_cpu, mut nats_cpu) =
                (vec![], vec![], vec![], vec![]);
            let mut windows = Vec::new();
            for run in 0..args.runs {
                let prefix = format!("{prefix_base}-{workload}-{c}-{run}");
                closed_loop(&nc, workload, &format!("{prefix}-w"), c, args.warmup).await?;
                let (cpu0, _) = baton_cpu(&pids);
                let (nats0, _) = baton_cpu(pids.get(1..).unwrap_or_default());
                let own0 = own_cpu_s();
                let began = now_us();
                let (elapsed, lat) = closed_loop(&nc, workload, &prefix, c, args.workflows).await?;
                windows.push((began, now_us()));
                let own1 = own_cpu_s();
                let (cpu1, _) = baton_cpu(&pids);
                let (nats1, _) = baton_cpu(pids.get(1..).unwrap_or_default());
                nats_cpu.push((nats1 - nats0) * 1e3 / args.workflows as f64);
                client_cpu.push((own1 - own0) * 1e3 / args.workflows as f64);
                tput.push(args.workflows as f64 / elapsed.as_secs_f64());
                p50.push(percentile(&lat, 0.5));
                p90.push(percentile(&lat, 0.9));
                p99.push(percentile(&lat, 0.99));
                cpu.push((cpu1 - cpu0) * 1e3 / args.workflows as f64);
                if let Some(embedder) = bare {
                    // Baton is idle now: the same texts through the bare embedder.
                    let (rate, cpu_ms) = bare_run(embedder, args.workflows).await?;
                    bare_tput.push(rate);
                    bare_cpu.push(cpu_ms);
                }
            }
            if bare.is_some() {
                let workflow: Vec<f64> = tput.iter().map(|t| t * BATCH_TEXTS as f64).collect();
                let ratio = workflow
                    .iter()
                    .zip(&bare_tput)
                    .map(|(w, b)| w / b)
                    .collect();
                comparisons.push(Comparison {
                    c,
                    workflow,
                    baton_cpu: cpu.clone(),
                    nats_cpu: nats_cpu.clone(),
                    client_cpu,
                    bare: bare_tput,
                    bare_cpu,
                    ratio,
                });
            }
            let (cpu_s, nats_s) = if pids.is_empty() {
                ("n/a".to_string(), "n/a".to_string())
            } else {
                (fmt_range(&cpu, 2), fmt_range(&nats_cpu, 2))
            };
            println!(
                "{workload:<18} {c:>4} {:>22} {:>20} {:>20} {:>20} {:>16} {:>18}",
                fmt_range(&tput, 0),
                fmt_range(&p50, 2),
                fmt_range(&p90, 2),
                fmt_range(&p99, 2),
                cpu_s,
                nats_s
            );
            let mut point = json!({"workload": workload, "concurrency": c, "workflows_per_s": tput, "p50_ms": p50, "p90_ms": p90, "p99_ms": p99, "cpu_ms_per_workflow": cpu, "nats_server_cpu_ms_per_workflow": nats_cpu});
            if let Some(d) = dev.as_ref().filter(|_| args.stages) {
                // The dev writes its events as they happen: give the last ones a moment.
                tokio::time::sleep(Duration::from_millis(200)).await;
                let stages = read_stages(&d.log, &windows)?;
                point["stages"] = stages_json(&stages);
                stage_tables.push((workload.clone(), c, stages));
            }
            report.push(point);
        }
    }
    if !comparisons.is_empty() {
        println!(
            "\nbatch_embed through the workflow vs the bare Embedder in this process \
             ({BATCH_TEXTS} texts per workflow and per embed call; runs alternate workflow, bare; \
             CPU in ms per {BATCH_TEXTS} texts):"
        );
        println!(
            "{:>4} {:>22} {:>20} {:>18} {:>18} {:>22} {:>18} {:>22}",
            "C",
            "workflow texts/s",
            "Baton CPU",
            "of it nats-server",
            "loadgen CPU",
            "bare texts/s",
            "bare CPU",
            "workflow / bare"
        );
        let mut comparison_report = Vec::new();
        for k in &comparisons {
            println!(
                "{:>4} {:>22} {:>20} {:>18} {:>18} {:>22} {:>18} {:>22}",
                k.c,
                fmt_range(&k.workflow, 0),
                fmt_range(&k.baton_cpu, 1),
                fmt_range(&k.nats_cpu, 1),
                fmt_range(&k.client_cpu, 1),
                fmt_range(&k.bare, 0),
                fmt_range(&k.bare_cpu, 1),
                fmt_range(&k.ratio, 3)
            );
            comparison_report.push(json!({
                "concurrency": k.c,
                "workflow_texts_per_s": k.workflow,
                "baton_cpu_ms_per_workflow": k.baton_cpu,
                "nats_server_cpu_ms_per_workflow": k.nats_cpu,
                "loadgen_cpu_ms_per_workflow": k.client_cpu,
                "bare_texts_per_s": k.bare,
                "bare_cpu_ms_per_batch": k.bare_cpu,
                "workflow_over_bare": k.ratio,
            }));
        }
        report.push(
            json!({"workload": "batch_embed", "bare_embedder_comparison": comparison_report}),
        );
    }
    for (workload, c, stages) in &stage_tables {
        print_stages(workload, *c, stages);
    }
    let (_, rss) = baton_cpu(&pids);
    if !pids.is_empty() {
        println!(
            "\npeak RSS of Baton + nats-server: {:.0} MiB",
            rss as f64 / 1048576.0
        );
    }
    let mut raw_report = Vec::new();
    if args.raw > 0 {
        println!(
            "\nraw JetStream dispatch round trip on the same server (task -> pull -> result -> ack):"
        );
        for &c in &args.concurrency {
            let (rate, p50, p99) = raw_round_trip(&nc, c, args.raw).await?;
            println!("  C={c:<4} {rate:>8.0} round trips/s   p50 {p50:.2} ms   p99 {p99:.2} ms");
            raw_report.push(
                json!({"concurrency": c, "round_trips_per_s": rate, "p50_ms": p50, "p99_ms": p99}),
            );
        }
    }
    Ok(
        json!({"machine": machine, "results": report, "raw_jetstream": raw_report, "peak_rss_bytes": rss}),
    )
}
