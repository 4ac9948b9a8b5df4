//! `baton-chaos`: the chaos driver (issue 3's chaos suite; `cargo xtask chaos` runs it,
//! `tests/it/chaos.rs` a short version in CI).
//!
//! For each scenario (numbering from RELIABILITY.md) it starts a fresh cluster of real
//! processes on loopback (nats-server, `baton orchestrator`, `baton worker`s for the `cpu`
//! and `gpu` queues with the fault hook on), runs a closed-loop workload of
//! `chaos_pipeline` runs whose results the model knows in advance, injects the scenario's
//! faults with real signals (or through the workers' fault hook, or on the wire), heals,
//! drains, probes every node, then checks invariants I1-I8 against the ledger of what was
//! acknowledged ([`check`]). One table row per scenario; the IDs and histories of every
//! violation; exit status 1 on any violation, 2 on an error of the driver itself.
//!
//! | scenario | faults |
//! |---|---|
//! | 2 | SIGKILL a worker with an activity in flight, restart it |
//! | 3 | kill / panic a runner / pool actor through the worker's fault hook |
//! | 4 | SIGKILL the orchestrator mid-workflow, restart it |
//! | 9 | SIGKILL the nats-server mid-workflow, restart it on the same store (the task queue, in memory, is lost) |
//! | 12 | SIGSTOP a worker holding a heartbeating attempt for 6-9 s (past its 3 s heartbeat timeout and the 5 s ack wait), SIGCONT it |
//! | 13 | every ID started 3 times at once, again while running, again after it closed with another input, and once more after the drain |
//! | 14 | poison on `baton.start.*`, `baton.api.*`, `baton.task.*`, `baton.report.*` |
//! | 15 | start bodies over 1 MiB; activity results of 2, 3 (echoed), 9 and 5 (echoed) MiB (`--oversize`) |
//! | 17 | the orchestrator's journal disk full (ENOSPC on every write and sync) for 2-4 s, then freed; a start sent meanwhile must be refused with `unavailable` and never exist |
//! | 18 | the orchestrator's power lost: unsynced journal writes undone (every second time the last one torn), mostly armed inside a commit; the process ends at once and is restarted on the same journal |
//! | 19 | 0.5% (`--fail-ppm`) of the orchestrator's journal storage calls and of every process's NATS calls (publishes, their acks, KV puts, message acks, edge replies) fail while the load runs |
//!
//! Scenarios 17-19 start the orchestrator with its fault hook on (`BATON_CHAOS_FAULTS=1`,
//! `orchestrator/src/faults.rs`): its journal over the faulty storage backend
//! (`actors/src/storage.rs`), NATS failures from `baton_transport::faults`. There, and only
//! while the storage faults last (plus 2 s), a start refused with `unavailable` is not a
//! violation: the client sends it again, and only an acknowledged start counts.
//!
//! Scenario 5 is scenario 4 with the orchestrator's workflow cache at zero
//! (`--evict-idle-ms 0`): every step of every run is rebuilt by replay.

mod check;
mod cluster;
mod faults;
mod model;
mod workload;

use std::{
    collections::BTreeMap,
    path::PathBuf,
    process::ExitCode,
    sync::atomic::Ordering,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use baton_actors::Registry;
use baton_transport::{subject, wire::ResultReply};
use clap::Parser;

use crate::{
    check::{INVARIANTS, Violation},
    cluster::{Cluster, Shape},
    faults::{EdgeStats, Fault},
    model::{Expected, Limits, Rng, Step},
    workload::{Ledger, Profile, Workload, now_ms, start_until_answered, wait_closed},
};

/// The chaos driver: faults under load, then invariants I1-I8.
#[derive(Parser, Debug, Clone)]
#[command(about)]
struct Opts {
    /// Scenarios to run (numbering from RELIABILITY.md): 2,3,4,5,9,12,13,14,15,17,18,19.
    #[arg(long, value_delimiter = ',', default_values_t = [2, 3, 4, 5, 9, 12, 13, 14, 15, 17, 18, 19])]
    scenarios: Vec<u32>,
    /// Workflows per scenario (at least; the load runs until the faults are done).
    #[arg(long, default_value_t = 40)]
    workflows: usize,
    /// Faults per fault scenario (2, 3, 4, 9, 12, 17, 18); scenario 3 cycles kill/panic
    /// runner/pool; for 17 the full-disk windows, for 18 the power losses.
    #[arg(long, default_value_t = 5)]
    faults: usize,
    /// Scenario 19: calls in a million that fail (journal storage, NATS).
    #[arg(long, default_value_t = 5_000)]
    fail_ppm: u32,
    /// Closed-loop clients (runs in flight).
    #[arg(long, default_value_t = 12)]
    concurrency: usize,
    /// Worker processes per queue (`cpu` and `gpu` each).
    #[arg(long, default_value_t = 2)]
    workers: usize,
    /// Concurrency of each worker's pool.
    #[arg(long, default_value_t = 4)]
    worker_concurrency: usize,
    /// Seed of the workload and of the fault timing.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// How long the drain may take after the last fault, seconds.
    #[arg(long, default_value_t = 180)]
    drain_s: u64,
    /// Scenario 15's large activity results, in MiB, `e` when the workflow hands the
    /// result to a next activity (journaled twice in one append).
    #[arg(long, value_delimiter = ',', default_values_t = ["2".to_string(), "3e".into(), "9".into(), "5e".into()])]
    oversize: Vec<String>,
    /// Known gaps of the runtime to report as such instead of failing on them (named in
    /// RELIABILITY.md's findings): `s12-late` (a paused worker's late report of an attempt
    /// JetStream redelivered is recorded; the orchestrator has no heartbeat timeout of its
    /// own to fence it). The violations are still printed, marked KNOWN GAP.
    #[arg(long, value_delimiter = ',')]
    known_gap: Vec<String>,
    /// Where to copy the process logs of a scenario with violations.
    #[arg(long, default_value = "target/chaos-logs")]
    logs: PathBuf,
    /// Copy the process logs of every scenario, not only of those with violations.
    #[arg(long)]
    keep_logs: bool,
}

/// NATS `max_payload` of the test server (8 MB) less the 4 KiB the workers keep for the
/// report's envelope: the largest activity result that can be reported.
const MAX_RESULT: u64 = (8 << 20) - 4096;

/// The probes' heartbeating step: 8 beats of 500 ms.
const PROBE_BEATS: u32 = 8;
const PROBE_BEAT_MS: u64 = 500;
/// A probe's activity must finish within this of its scheduling; with a leaked slot it
/// waits for another probe first (about twice the 4 s).
const PROBE_BOUND: Duration = Duration::from_millis(7_000);

fn scenario_name(s: u32) -> &'static str {
    match s {
        2 => "2 worker SIGKILL",
        3 => "3 actor kill/panic",
        4 => "4 orchestrator SIGKILL",
        5 => "5 orchestrator SIGKILL, zero cache",
        9 => "9 nats-server SIGKILL",
        12 => "12 worker SIGSTOP",
        13 => "13 duplicate starts",
        14 => "14 poison messages",
        15 => "15 oversize payloads",
        17 => "17 disk full",
        18 => "18 power loss, torn writes",
        19 => "19 failing calls",
        _ => "?",
    }
}

/// One scenario's outcome.
struct Outcome {
    scenario: u32,
    figures: check::Figures,
    notes: Vec<String>,
    violations: Vec<Violation>,
}

#[tokio::main]
async fn main() -> ExitCode {
    let opts = Opts::parse();
    match run(opts).await {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("chaos: error: {e:#}");
            ExitCode::from(2)
        }
    }
}

async fn run(opts: Opts) -> Result<bool> {
    for s in &opts.scenarios {
        if scenario_name(*s) == "?" {
            bail!(
                "unknown scenario {s} (this driver runs 2, 3, 4, 5, 9, 12, 13, 14, 15, 17, 18, 19)"
            );
        }
    }
    let mut registry = Registry::new();
    baton_orchestrator::pipelines::chaos::register(&mut registry)?;
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        })
        .unwrap_or_default();
    println!(
        "chaos: {}, {} cores ({cpu}); seed {}, {} clients, {}+{} workers x {} slots, {} workflows and {} faults per scenario",
        baton_tests::baton_bin().display(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
        opts.seed,
        opts.concurrency,
        opts.workers,
        opts.workers,
        opts.worker_concurrency,
        opts.workflows,
        opts.faults
    );
    let started = Instant::now();
    let mut outcomes = Vec::new();
    for &s in &opts.scenarios {
        let t = Instant::now();
        println!("--- scenario {} ---", scenario_name(s));
        let o = scenario(s, &opts, &registry)
            .await
            .with_context(|| format!("scenario {}", scenario_name(s)))?;
        println!("{}", header());
        println!("{}", row(&o));
        for n in &o.notes {
            println!("  {n}");
        }
        println!("  ({:.0} s)", t.elapsed().as_secs_f64());
        outcomes.push(o);
    }
    println!(
        "\n=== chaos: {} scenarios in {:.0} s ===",
        outcomes.len(),
        started.elapsed().as_secs_f64()
    );
    println!("{}", header());
    for o in &outcomes {
        println!("{}", row(o));
    }
    println!(
        "recovery: for each fault and each workflow it hit (an attempt in flight on the killed, paused or faulted worker/actor; every open run for an orchestrator kill), \
         the time from the fault to that workflow's next event in the journal; p50/p99/max in seconds."
    );
    let total: usize = outcomes.iter().map(|o| o.violations.len()).sum();
    if total > 0 {
        println!("\nFAILED: {total} violations");
    } else {
        println!("\nPASSED: 0 violations");
    }
    Ok(total == 0)
}

fn header() -> String {
    format!(
        "| scenario | workflows | faults | {} | scenario checks | re-executed attempts (+redelivered) | recovery p50 / p99 / max (s) |\n|---|---|---|{}---|---|---|",
        INVARIANTS.join(" | "),
        "---|".repeat(INVARIANTS.len())
    )
}

fn row(o: &Outcome) -> String {
    let f = &o.figures;
    let counts: Vec<String> = INVARIANTS
        .iter()
        .map(|i| f.counts.get(i).copied().unwrap_or(0).to_string())
        .collect();
    let rec = if f.recovery.is_empty() {
        "-".to_string()
    } else {
        format!(
            "{:.1} / {:.1} / {:.1} (n={})",
            check::percentile(&f.recovery, 50.0),
            check::percentile(&f.recovery, 99.0),
            check::percentile(&f.recovery, 100.0),
            f.recovery.len()
        )
    };
    let scenario_checks: usize = f
        .counts
        .iter()
        .filter(|(k, _)| k.starts_with('S'))
        .map(|(_, n)| n)
        .sum();
    format!(
        "| {} | {} | {} | {} | {scenario_checks} | {} (+{}) | {} |",
        scenario_name(o.scenario),
        f.workflows,
        f.faults,
        counts.join(" | "),
        f.reexecuted,
        f.redelivered,
        rec
    )
}

async fn scenario(s: u32, opts: &Opts, registry: &Registry) -> Result<Outcome> {
    let shape = Shape {
        cpu_workers: opts.workers,
        gpu_workers: opts.workers,
        concurrency: opts.worker_concurrency,
        evict_idle_ms: (s == 5).then_some(0),
        orchestrator_hook: matches!(s, 17..=19),
    };
    let mut c = Cluster::start(shape).await?;
    let limits = Limits {
        max_result: MAX_RESULT,
        near_limit: 7 << 20,
    };
    let profile = match s {
        13 => Profile::Duplicates,
        15 => Profile::Oversize,
        _ => Profile::Standard,
    };
    let mut rng = Rng::new(opts.seed ^ u64::from(s) << 32);
    let oversize = opts
        .oversize
        .iter()
        .map(|b| b.parse().map_err(anyhow::Error::msg))
        .collect::<Result<Vec<workload::Blob>>>()?;
    let w = Workload::new(
        &format!("chaos-s{s}"),
        opts.seed ^ u64::from(s),
        limits,
        profile,
        oversize,
        Duration::from_secs(opts.drain_s),
    );
    let clients: Vec<_> = (0..opts.concurrency)
        .map(|_| tokio::spawn(w.clone().client(c.client.clone())))
        .collect();

    // Faults, while the workload runs.
    let mut faults: Vec<Fault> = Vec::new();
    let mut edge = EdgeStats::default();
    let mut storage = faults::StorageStats::default();
    match s {
        2 => faults = faults::worker_kills(&mut c, opts.faults, &mut rng).await?,
        3 => faults = faults::actor_faults(&mut c, opts.faults, &mut rng).await?,
        4 | 5 => faults = faults::orchestrator_kills(&mut c, opts.faults, &mut rng).await?,
        9 => faults = faults::nats_kills(&mut c, opts.faults, &mut rng).await?,
        12 => faults = faults::worker_pauses(&mut c, opts.faults, &mut rng).await?,
        14 => {
            let volleys = (opts.workflows / 10).max(3);
            edge = faults::poison(&c, w.clone(), volleys, &mut rng).await;
        }
        15 => edge = faults::oversize_starts(&c, (opts.workflows / 20).max(2), &mut rng).await,
        17 => {
            faults = faults::disk_full_windows(&mut c, opts.faults, &mut rng, &mut storage).await?
        }
        18 => faults = faults::power_losses(&mut c, opts.faults, &mut rng, &mut storage).await?,
        19 => faults = faults::failing_calls_on(&mut c, opts.fail_ppm).await?,
        _ => {}
    }
    // Heal is done (processes restarted or resumed); let the load reach its size, then
    // drain: no new runs, every started one waited for.
    let deadline = Instant::now() + Duration::from_secs(600);
    while w.started() < opts.workflows && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    w.stop.store(true, Ordering::SeqCst);
    *w.drain_until.lock().expect("drain") =
        Some(Instant::now() + Duration::from_secs(opts.drain_s));
    for h in clients {
        h.await?;
    }
    // Runs a client gave up waiting for get the rest of the drain to close.
    let drain_until = w
        .drain_until
        .lock()
        .expect("drain")
        .unwrap_or_else(Instant::now);
    for (id, e) in w.ledger.snapshot() {
        let closed = matches!(
            e.result,
            Some(ResultReply::Completed { .. } | ResultReply::Failed { .. })
        );
        if e.acked && !closed {
            wait_closed(&c.client, &w.ledger, &id, || drain_until).await;
        }
    }
    // Scenario 19 heals after the drain: every run of the load ran through the failures.
    if s == 19 {
        faults::failing_calls_off(&mut c, &mut faults[0], &mut storage).await?;
    }
    let mut notes = Vec::new();
    let mut v: Vec<Violation> = Vec::new();

    // Scenario 13, "minutes later": every ID once more, with another input.
    if s == 13 {
        let ids: Vec<(String, serde_json::Value)> = w
            .ledger
            .snapshot()
            .into_iter()
            .map(|(id, e)| (id, e.input))
            .collect();
        let later = Instant::now() + Duration::from_secs(60);
        for (id, mut input) in ids {
            input["seed"] = serde_json::Value::from(7);
            start_until_answered(&c.client, &w.ledger, &id, &input, later).await;
        }
        let dup = w.duplicate_starts.load(Ordering::SeqCst) + w.ledger.len();
        notes.push(format!(
            "13: {dup} duplicate starts (3 at once, 1 while running, 1 after closing with another input, 1 after the drain per ID)"
        ));
    }

    // I7: every node serves again, at full concurrency.
    probe(&c, &w.ledger, opts, &mut v, &mut notes).await?;
    for p in c.dead() {
        v.push(Violation {
            invariant: "I7 live",
            workflow_id: String::new(),
            detail: format!("{p} is not running (it crashed)"),
        });
    }
    for log in [c.orchestrator.log_contents()]
        .into_iter()
        .chain(c.workers.iter().map(|w| w.process.log_contents()))
    {
        // A panic's message is on the line after `panicked at`.
        let lines: Vec<&str> = log.lines().collect();
        for (i, l) in lines.iter().enumerate() {
            let message = lines.get(i + 1).copied().unwrap_or("");
            let injected = message.contains("chaos: panic injected")
                || message.contains("fault injection: pool panic");
            if l.contains("panicked at") && !injected {
                v.push(Violation {
                    invariant: "I7 live",
                    workflow_id: String::new(),
                    detail: format!("a panic nobody injected: {l} {message}"),
                });
            }
        }
    }
    // No stuck consumer: every task consumed (poison terminated) and acked after its report.
    if let Err(e) = consumers_drained(&c).await {
        v.push(Violation {
            invariant: "I7 live",
            workflow_id: String::new(),
            detail: format!("{e:#}"),
        });
    }

    // Read everything back and check.
    let ledger = w.ledger.snapshot();
    let rb = check::read_back(&c.client, c.client.nats(), &ledger).await?;
    // Scenarios 17 and 19: `unavailable` while the storage faults last (and 2 s after, for
    // a commit under way at the heal) is the clear refusal of a start not made durable.
    let refusal_ok = |code: &str, at: u64| {
        matches!(s, 17 | 19)
            && code == "unavailable"
            && faults
                .iter()
                .any(|f| f.at_ms <= at && at <= f.healed_ms + 2_000)
    };
    check::check_workflows(&ledger, &rb, registry, &refusal_ok, &mut v);
    let mut figures = check::Figures {
        workflows: ledger.len(),
        reexecuted: check::reexecuted(&rb),
        redelivered: c
            .workers
            .iter()
            .map(|w| cluster::redeliveries(&w.process.log_contents()))
            .sum(),
        ..Default::default()
    };
    let recoveries = check::recovery(&faults, &rb);
    figures.recovery = recoveries.iter().map(|r| r.seconds).collect();
    // The slowest recovery, with its fault and history, to see where the time went.
    if let Some(slow) = recoveries
        .iter()
        .max_by(|a, b| a.seconds.total_cmp(&b.seconds))
    {
        let f = &faults[slow.fault];
        notes.push(format!(
            "slowest recovery: {:.1} s, {} after fault {} ({} on {} at {}, healed at {})",
            slow.seconds,
            slow.workflow_id,
            slow.fault + 1,
            f.kind,
            f.target,
            f.at_ms,
            f.healed_ms
        ));
        if let Some(Ok(h)) = rb.histories.get(&slow.workflow_id) {
            notes.push(format!("its history:\n{}", check::compact_history(h)));
        }
    }
    figures.faults = match s {
        13 => w.duplicate_starts.load(Ordering::SeqCst) + ledger.len(),
        14 | 15 => edge.sent,
        19 => {
            (storage.storage_failed
                + storage.nats_orchestrator.values().sum::<u64>()
                + storage.nats_workers) as usize
        }
        _ => faults.len(),
    };
    match s {
        3 => {
            let by: BTreeMap<&str, usize> = faults.iter().fold(BTreeMap::new(), |mut m, f| {
                *m.entry(f.kind.as_str()).or_default() += 1;
                m
            });
            notes.push(format!("3: {by:?}"));
        }
        12 => {
            let mut late_v = Vec::new();
            let (held, late, elsewhere) = check::late_results(&faults, &rb, &mut late_v);
            notes.push(format!(
                "12: {} pauses of 6-9 s held {held} attempts; {late} late results recorded; {elsewhere} completed by another worker",
                faults.len()
            ));
            if opts.known_gap.iter().any(|g| g == "s12-late") {
                for x in late_v {
                    notes.push(format!(
                        "KNOWN GAP (--known-gap s12-late, not counted): {} {}: {}",
                        x.invariant, x.workflow_id, x.detail
                    ));
                }
            } else {
                v.extend(late_v);
            }
        }
        14 | 15 => {
            notes.push(format!(
                "{s}: {} messages sent, {} requests refused with a clear error, {} not",
                edge.sent,
                edge.clear_errors,
                edge.unclear.len()
            ));
            for (sent, got) in &edge.unclear {
                v.push(Violation {
                    invariant: if s == 14 {
                        "S14 clear error"
                    } else {
                        "S15 clear error"
                    },
                    workflow_id: String::new(),
                    detail: format!("sent {sent}, got {got}"),
                });
            }
            if s == 15 {
                oversize_checks(&ledger, &rb, &mut v, &mut notes);
            }
        }
        17..=19 => storage_checks(s, &ledger, &rb, &faults, &storage, &mut v, &mut notes),
        _ => {}
    }
    // Counted per workflow (a lost run is one, whatever checks saw it), and per
    // violation for those that name none.
    let mut seen = std::collections::BTreeSet::new();
    for x in &v {
        if x.workflow_id.is_empty() || seen.insert((x.invariant, x.workflow_id.clone())) {
            *figures.counts.entry(x.invariant).or_default() += 1;
        }
    }
    report_violations(s, &v, &rb, &c, opts)?;
    Ok(Outcome {
        scenario: s,
        figures,
        notes,
        violations: v,
    })
}

/// I7 after the heal: per queue, as many one-step probe runs at once as the queue has
/// slots (a heartbeating step of 4 s). All must complete, every worker must run at least
/// one, and each must finish within [`PROBE_BOUND`] of its scheduling — a leaked slot
/// makes one wait for another.
async fn probe(
    c: &Cluster,
    ledger: &Ledger,
    opts: &Opts,
    v: &mut Vec<Violation>,
    notes: &mut Vec<String>,
) -> Result<()> {
    let limits = Limits {
        max_result: MAX_RESULT,
        near_limit: 7 << 20,
    };
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut ids = Vec::new();
    for queue in ["cpu", "gpu"] {
        let slots: usize = c
            .workers
            .iter()
            .filter(|w| w.queue == queue)
            .map(|w| w.concurrency)
            .sum();
        for i in 0..slots {
            let id = format!("probe-{}-{queue}-{i}", now_ms());
            let steps = vec![Step::heartbeat(queue, PROBE_BEATS, PROBE_BEAT_MS)];
            let input = model::input(i as u64, &steps);
            ledger.add(
                &id,
                input.clone(),
                model::expected(i as u64, &steps, limits),
            );
            ids.push((queue, id, input));
        }
    }
    let starts = ids
        .iter()
        .map(|(_, id, input)| start_until_answered(&c.client, ledger, id, input, deadline));
    futures::future::join_all(starts).await;
    let waits = ids
        .iter()
        .map(|(_, id, _)| wait_closed(&c.client, ledger, id, || deadline));
    let results = futures::future::join_all(waits).await;
    let mut served: BTreeMap<usize, usize> = BTreeMap::new();
    let mut slowest = 0u64;
    for ((queue, id, _), r) in ids.iter().zip(results) {
        if !matches!(r, Some(ResultReply::Completed { .. })) {
            v.push(Violation {
                invariant: "I7 live",
                workflow_id: id.clone(),
                detail: format!("probe on {queue} did not complete: {r:?}"),
            });
            continue;
        }
        let h = c.client.history(id).await?;
        let evs = h["events"].as_array().cloned().unwrap_or_default();
        let at = |ty: &str| {
            evs.iter()
                .find(|e| e["type"] == ty)
                .and_then(|e| e["at_ms"].as_u64())
        };
        if let (Some(s), Some(d)) = (at("activity_scheduled"), at("activity_completed")) {
            slowest = slowest.max(d - s);
            if d - s > PROBE_BOUND.as_millis() as u64 {
                v.push(Violation {
                    invariant: "I7 live",
                    workflow_id: id.clone(),
                    detail: format!(
                        "probe on {queue} took {} ms from scheduling to result (bound {} ms): a slot is leaked or a worker does not serve",
                        d - s,
                        PROBE_BOUND.as_millis()
                    ),
                });
            }
        }
        if let Some(worker) = evs
            .iter()
            .find(|e| e["type"] == "activity_completed")
            .and_then(|e| e["worker"].as_str())
            && let Some(i) = c.workers.iter().position(|w| w.is(worker))
        {
            *served.entry(i).or_default() += 1;
        }
    }
    for (i, w) in c.workers.iter().enumerate() {
        if !served.contains_key(&i) {
            v.push(Violation {
                invariant: "I7 live",
                workflow_id: String::new(),
                detail: format!("worker {} ran none of the probes", w.name(i)),
            });
        }
    }
    notes.push(format!(
        "I7 probes: {} runs at once ({} per queue = its slots), slowest step {:.1} s (bound {:.0} s), per worker {:?}",
        ids.len(),
        opts.workers * opts.worker_concurrency,
        slowest as f64 / 1000.0,
        PROBE_BOUND.as_secs_f64(),
        served.values().collect::<Vec<_>>()
    ));
    Ok(())
}

/// The task consumers hold nothing (poison terminated, nothing stuck; a task is acked
/// only once its report was answered).
async fn consumers_drained(c: &Cluster) -> Result<()> {
    let js = async_nats::jetstream::new(c.client.nats().clone());
    let deadline = Instant::now() + Duration::from_secs(30);
    let names = [
        (subject::TASKS_STREAM, subject::queue_consumer("cpu")),
        (subject::TASKS_STREAM, subject::queue_consumer("gpu")),
    ];
    loop {
        let mut stuck = Vec::new();
        for (stream, name) in &names {
            let mut consumer: async_nats::jetstream::consumer::PullConsumer = js
                .get_stream(stream)
                .await?
                .get_consumer(name)
                .await
                .map_err(|e| anyhow::anyhow!("consumer {name}: {e}"))?;
            let info = consumer.info().await?;
            if info.num_pending > 0 || info.num_ack_pending > 0 {
                stuck.push(format!(
                    "{name}: {} pending, {} unacked",
                    info.num_pending, info.num_ack_pending
                ));
            }
        }
        if stuck.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!(
                "consumers not drained 30 s after the drain: {}",
                stuck.join("; ")
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Scenario 15: a run refused for an oversize result failed it once, not in a loop.
fn oversize_checks(
    ledger: &BTreeMap<String, workload::Entry>,
    rb: &check::Readback,
    v: &mut Vec<Violation>,
    notes: &mut Vec<String>,
) {
    let (mut refused, mut completed_big) = (0, 0);
    for (id, e) in ledger {
        let blob = e.input["steps"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s["kind"] == "blob"));
        if !blob {
            continue;
        }
        let Some(Ok(h)) = rb.histories.get(id) else {
            continue;
        };
        let evs = h["events"].as_array().cloned().unwrap_or_default();
        let too_large: Vec<_> = evs
            .iter()
            .filter(|x| x["type"] == "activity_failed" && x["failure"]["kind"] == "PayloadTooLarge")
            .collect();
        let completed = evs.iter().any(|x| x["type"] == "workflow_completed");
        match too_large.as_slice() {
            [] if completed => completed_big += 1,
            [] => {}
            [one] if one["attempt"] == 1 && one["retry_in_ms"].is_null() => refused += 1,
            more => v.push(Violation {
                invariant: "S15 no retry loop",
                workflow_id: id.clone(),
                detail: format!("{} PayloadTooLarge failures: {more:?}", more.len()),
            }),
        }
        if matches!(e.expected, Expected::Failed { .. }) && too_large.is_empty() {
            v.push(Violation {
                invariant: "S15 clear error",
                workflow_id: id.clone(),
                detail: "an oversize result was not refused with PayloadTooLarge".into(),
            });
        }
    }
    notes.push(format!(
        "15: {completed_big} runs with a large result completed; {refused} refused once with PayloadTooLarge"
    ));
}

/// Scenarios 17-19: what the storage faults and failing calls did, and scenario 17's
/// check that a start sent while the disk was full was refused with `unavailable` and
/// left no run (`S17 refused, absent`).
fn storage_checks(
    s: u32,
    ledger: &BTreeMap<String, workload::Entry>,
    rb: &check::Readback,
    faults: &[Fault],
    storage: &faults::StorageStats,
    v: &mut Vec<Violation>,
    notes: &mut Vec<String>,
) {
    let refused = ledger
        .values()
        .flat_map(|e| &e.answers)
        .filter(|a| matches!(a, workload::StartAnswer::Refused(c) if c == "unavailable"))
        .count();
    let acked_after_refusal = ledger
        .values()
        .filter(|e| e.acked && !e.refused_at_ms.is_empty())
        .count();
    match s {
        17 => {
            for (id, answer) in &storage.full_disk_starts {
                if answer != "unavailable" {
                    v.push(Violation {
                        invariant: "S17 refused, absent",
                        workflow_id: id.clone(),
                        detail: format!(
                            "a start sent while the journal's disk was full was answered {answer}, not refused with unavailable"
                        ),
                    });
                }
                if rb.listed.contains_key(id) {
                    v.push(Violation {
                        invariant: "S17 refused, absent",
                        workflow_id: id.clone(),
                        detail: "a start refused while the disk was full has a run".into(),
                    });
                }
            }
            let held: Vec<String> = faults
                .iter()
                .map(|f| format!("{:.1}", (f.healed_ms - f.at_ms) as f64 / 1000.0))
                .collect();
            notes.push(format!(
                "17: {} full-disk windows (s: {}), {} journal storage calls refused with ENOSPC; {} of {} starts sent in a window refused with unavailable; the load's starts refused {refused} times ({acked_after_refusal} IDs then acknowledged on a later try)",
                faults.len(),
                held.join(", "),
                storage.storage_failed,
                storage
                    .full_disk_starts
                    .iter()
                    .filter(|(_, a)| a == "unavailable")
                    .count(),
                storage.full_disk_starts.len(),
            ));
        }
        18 => notes.push(format!(
            "18: {} power losses ({}), {} torn, {} unsynced journal writes undone; the load's starts refused {refused} times",
            faults.len(),
            faults
                .iter()
                .map(|f| f.kind.trim_start_matches("power loss ").to_string())
                .collect::<Vec<_>>()
                .join(", "),
            storage.torn,
            storage.undone_writes,
        )),
        _ => {
            let window = faults
                .first()
                .map_or(0.0, |f| (f.healed_ms - f.at_ms) as f64 / 1000.0);
            notes.push(format!(
                "19: {window:.1} s of failing calls: {} journal storage calls failed; NATS calls failed: {} in the orchestrator {:?}, {} in the workers; the load's starts refused with unavailable {refused} times ({acked_after_refusal} IDs then acknowledged on a later try)",
                storage.storage_failed,
                storage.nats_orchestrator.values().sum::<u64>(),
                storage.nats_orchestrator,
                storage.nats_workers,
            ));
        }
    }
}

/// Prints every violation (IDs, then the histories of up to 10 workflows), and copies the
/// process logs to `<logs>/s<scenario>-<time>/`.
fn report_violations(
    s: u32,
    v: &[Violation],
    rb: &check::Readback,
    c: &Cluster,
    opts: &Opts,
) -> Result<()> {
    if v.is_empty() {
        return if opts.keep_logs {
            copy_logs(s, c, opts)
        } else {
            Ok(())
        };
    }
    println!("VIOLATIONS in scenario {}:", scenario_name(s));
    for x in v {
        println!("  {} {}: {}", x.invariant, x.workflow_id, x.detail);
    }
    let mut shown = std::collections::BTreeSet::new();
    for x in v.iter().filter(|x| !x.workflow_id.is_empty()) {
        if shown.len() >= 10 || !shown.insert(x.workflow_id.clone()) {
            continue;
        }
        match rb.histories.get(&x.workflow_id) {
            Some(Ok(h)) => println!(
                "  history of {} (run {}):\n{}",
                x.workflow_id,
                h["run_id"].as_str().unwrap_or("?"),
                check::show_history(h)
            ),
            other => println!("  history of {}: {other:?}", x.workflow_id),
        }
    }
    copy_logs(s, c, opts)
}

/// Copies the process logs to `<logs>/s<scenario>-<time>/`.
fn copy_logs(s: u32, c: &Cluster, opts: &Opts) -> Result<()> {
    let dir = opts.logs.join(format!("s{s}-{}", now_ms()));
    std::fs::create_dir_all(&dir)?;
    std::fs::copy(c.nats.log_path(), dir.join("nats.log"))?;
    std::fs::copy(c.orchestrator.log_path(), dir.join("orchestrator.log"))?;
    for (i, w) in c.workers.iter().enumerate() {
        std::fs::copy(
            w.process.log_path(),
            dir.join(format!("worker-{}-{i}.log", w.queue)),
        )?;
    }
    println!("  logs copied to {}", dir.display());
    Ok(())
}
