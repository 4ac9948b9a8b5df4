//! The fault injectors, one per scenario (numbering from RELIABILITY.md). Each injects
//! its faults at a steady rate while the workload runs and records, for each, when it
//! happened and which workflows it hit, so recovery can be measured afterwards.

use std::{collections::BTreeMap, sync::Arc, time::Duration};

use anyhow::{Result, bail};
use async_nats::HeaderMap;
use baton_tests::json_headers;
use baton_transport::{
    codec::{self, CONTENT_TYPE, MSGPACK},
    wire::{ActivityOutcome, ActivityReport, ActivityTask, Failure, ReportAck},
};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::{
    cluster::{self, Attempt, Cluster, wait_for},
    model::Rng,
    workload::{StartAnswer, WORKFLOW, Workload, now_ms},
};

/// Which workflows a fault hit.
#[derive(Debug, Clone)]
pub enum Affected {
    /// These attempts (in flight on the faulted worker or actor).
    Attempts(Vec<Attempt>),
    /// Every run open at the time (the orchestrator died).
    AllOpen,
    /// Every run open when the fault began, recovering from the heal (the journal's disk
    /// was full: nothing could commit until it was freed).
    AllOpenUntilHeal,
}

/// One injected fault.
#[derive(Debug, Clone)]
pub struct Fault {
    /// What was done: `worker SIGKILL`, `kill_runner`, `orchestrator SIGKILL`, ...
    pub kind: String,
    /// To whom.
    pub target: String,
    /// When (Unix ms).
    pub at_ms: u64,
    /// When it was healed (process restarted or resumed), Unix ms.
    pub healed_ms: u64,
    /// Which workflows it hit.
    pub affected: Affected,
    /// For a paused or killed worker: its queue and pid (its name in reports).
    pub worker: Option<(String, u32)>,
}

/// What the edge-fuzzing scenarios (14, 15) saw.
#[derive(Debug, Clone, Default)]
pub struct EdgeStats {
    /// Messages sent.
    pub sent: usize,
    /// Requests answered with a well-formed error (`{"error": {"code", "message"}}`).
    pub clear_errors: usize,
    /// Requests answered otherwise, or not at all: (what was sent, what came back).
    pub unclear: Vec<(String, String)>,
}

/// Prints a fault as it is injected (the driver's progress) and keeps it.
fn record(out: &mut Vec<Fault>, fault: Fault) {
    let hit = match &fault.affected {
        Affected::Attempts(a) => format!("{} attempts in flight", a.len()),
        Affected::AllOpen | Affected::AllOpenUntilHeal => "every open run".into(),
    };
    println!(
        "  fault {}: {} on {} ({hit}; healed after {} ms)",
        out.len() + 1,
        fault.kind,
        fault.target,
        fault.healed_ms.saturating_sub(fault.at_ms)
    );
    out.push(fault);
}

fn jitter(rng: &mut Rng, lo_ms: u64, hi_ms: u64) -> Duration {
    Duration::from_millis(rng.range(lo_ms, hi_ms))
}

/// Waits (up to 15 s) for a worker, trying them round robin from `start`, that holds at
/// least one attempt (`heartbeat_only`: of a heartbeating activity). Returns its index.
async fn busy_worker(c: &Cluster, start: usize, heartbeat_only: bool) -> Option<usize> {
    let n = c.workers.len();
    wait_for(Duration::from_secs(15), || {
        (0..n).map(|k| (start + k) % n).find(|&i| {
            let log = c.workers[i].current_log();
            cluster::in_flight(&log)
                .iter()
                .any(|a| !heartbeat_only || a.activity.starts_with("chaos_heartbeat"))
        })
    })
    .await
}

/// Scenario 2: SIGKILL a worker that has an activity in flight, then start it again;
/// `count` times, one every 1.5-4 s.
pub async fn worker_kills(c: &mut Cluster, count: usize, rng: &mut Rng) -> Result<Vec<Fault>> {
    let mut out = Vec::new();
    for i in 0..count {
        tokio::time::sleep(jitter(rng, 1_500, 4_000)).await;
        let Some(w) = busy_worker(c, i, false).await else {
            bail!("no worker had an activity in flight for 15 s");
        };
        let worker = &mut c.workers[w];
        let (queue, pid, target) = (worker.queue.to_string(), worker.pid(), worker.name(w));
        let at_ms = now_ms();
        worker.process.kill();
        let affected = cluster::in_flight(&worker.current_log());
        worker.restart().await?;
        record(
            &mut out,
            Fault {
                kind: "worker SIGKILL".into(),
                target,
                at_ms,
                healed_ms: now_ms(),
                affected: Affected::Attempts(affected),
                worker: Some((queue, pid)),
            },
        );
    }
    Ok(out)
}

/// The actor faults of scenario 3, in turn.
pub const ACTOR_FAULTS: [&str; 4] = ["kill_runner", "panic_runner", "kill_pool", "panic_pool"];

/// Scenario 3: kill or panic a runner or a pool actor inside a worker through its fault
/// hook, one every 0.5-1.5 s, cycling through [`ACTOR_FAULTS`] and the workers.
pub async fn actor_faults(c: &mut Cluster, count: usize, rng: &mut Rng) -> Result<Vec<Fault>> {
    let mut out = Vec::new();
    let mut i = 0;
    let mut misses = 0;
    while out.len() < count {
        tokio::time::sleep(jitter(rng, 500, 1_500)).await;
        let fault = ACTOR_FAULTS[out.len() % ACTOR_FAULTS.len()];
        let runner = fault.ends_with("runner");
        // A runner fault needs a running activity; a panic, one that polls (heartbeats).
        let Some(w) = busy_worker(c, i, fault == "panic_runner").await else {
            bail!("no worker had an activity in flight for 15 s");
        };
        i += 1;
        let before = cluster::failed_in_worker(&c.workers[w].current_log()).len();
        let held = cluster::in_flight(&c.workers[w].current_log());
        let at_ms = now_ms();
        let Some(detail) = c.inject(w, fault).await? else {
            // Nothing to hit at that moment (the activity had just finished): try again.
            misses += 1;
            if misses > 10 * count {
                bail!("the fault hooks found nothing to hit {misses} times");
            }
            continue;
        };
        let affected = if runner {
            // The pool reports the killed or panicked runner's attempt failed at once.
            let worker = &c.workers[w];
            wait_for(Duration::from_secs(10), || {
                let failed = cluster::failed_in_worker(&worker.current_log());
                (failed.len() > before).then(|| failed[before..].to_vec())
            })
            .await
            .unwrap_or_default()
        } else {
            held
        };
        record(
            &mut out,
            Fault {
                kind: fault.into(),
                target: format!("{}: {detail}", c.workers[w].name(w)),
                at_ms,
                healed_ms: at_ms,
                affected: Affected::Attempts(affected),
                worker: Some((c.workers[w].queue.to_string(), c.workers[w].pid())),
            },
        );
    }
    Ok(out)
}

/// Scenario 4: SIGKILL the orchestrator mid-workflow and start it again, `count` times,
/// 2-5 s of progress apart.
pub async fn orchestrator_kills(
    c: &mut Cluster,
    count: usize,
    rng: &mut Rng,
) -> Result<Vec<Fault>> {
    let mut out = Vec::new();
    for _ in 0..count {
        tokio::time::sleep(jitter(rng, 2_000, 5_000)).await;
        let at_ms = now_ms();
        c.orchestrator.kill();
        c.restart_orchestrator().await?;
        record(
            &mut out,
            Fault {
                kind: "orchestrator SIGKILL".into(),
                target: format!("orchestrator (now pid {})", c.orchestrator.pid()),
                at_ms,
                healed_ms: now_ms(),
                affected: Affected::AllOpen,
                worker: None,
            },
        );
    }
    Ok(out)
}

/// Scenario 9: SIGKILL the nats-server mid-workflow and start it again on the same port
/// and store, `count` times, 2-5 s of progress apart. What it kept on disk (the history
/// mirror, the KV buckets) comes back; the task and report queues (memory streams) do
/// not, and every node must recreate them and the orchestrator republish what was lost.
pub async fn nats_kills(c: &mut Cluster, count: usize, rng: &mut Rng) -> Result<Vec<Fault>> {
    let mut out = Vec::new();
    for _ in 0..count {
        tokio::time::sleep(jitter(rng, 2_000, 5_000)).await;
        let at_ms = now_ms();
        c.nats.restart().await?;
        record(
            &mut out,
            Fault {
                kind: "nats-server SIGKILL".into(),
                target: format!("nats-server (now pid {})", c.nats.pid().unwrap_or(0)),
                at_ms,
                healed_ms: now_ms(),
                affected: Affected::AllOpen,
                worker: None,
            },
        );
    }
    Ok(out)
}

/// Scenario 12: SIGSTOP a worker that holds a heartbeating attempt for 6-9 s (past the
/// 3 s heartbeat timeout and JetStream's 5 s ack wait, so the attempt is redelivered to
/// another worker), then SIGCONT it; `count` times, 1-3 s apart.
pub async fn worker_pauses(c: &mut Cluster, count: usize, rng: &mut Rng) -> Result<Vec<Fault>> {
    let mut out = Vec::new();
    for i in 0..count {
        tokio::time::sleep(jitter(rng, 1_000, 3_000)).await;
        let Some(w) = busy_worker(c, i, true).await else {
            bail!("no worker had a heartbeating activity in flight for 15 s");
        };
        let worker = &c.workers[w];
        let pid = worker.pid();
        cluster::signal(pid, "STOP")?;
        let at_ms = now_ms();
        // Frozen now: what it logged as started and not finished, it holds.
        let held = cluster::in_flight(&worker.current_log());
        tokio::time::sleep(jitter(rng, 6_000, 9_000)).await;
        // Taken before the resume: whatever the worker sends after it is recorded later.
        let healed_ms = now_ms();
        cluster::signal(pid, "CONT")?;
        record(
            &mut out,
            Fault {
                kind: "worker SIGSTOP".into(),
                target: worker.name(w),
                at_ms,
                healed_ms,
                affected: Affected::Attempts(held),
                worker: Some((worker.queue.to_string(), pid)),
            },
        );
    }
    Ok(out)
}

/// Whether a reply is a well-formed error reply (with code `want`, if given), in JSON or,
/// answering a MessagePack request, in MessagePack.
fn clear_error(m: &async_nats::Message, want: Option<&str>) -> bool {
    let msgpack = m
        .headers
        .as_ref()
        .and_then(|h| h.get(CONTENT_TYPE))
        .is_some_and(|v| v.as_str() == MSGPACK);
    let decoded = if msgpack {
        codec::decode::<Value>(&m.payload).ok()
    } else {
        serde_json::from_slice::<Value>(&m.payload).ok()
    };
    decoded.is_some_and(|v| {
        v["error"]["code"]
            .as_str()
            .is_some_and(|c| !c.is_empty() && want.is_none_or(|w| w == c))
            && v["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
    })
}

/// Sends a request that must be refused with a clear error, and counts the answer.
async fn expect_error(
    c: &Cluster,
    stats: &mut EdgeStats,
    subject: &str,
    headers: HeaderMap,
    body: Vec<u8>,
) {
    expect_code(c, stats, subject, headers, body, None).await
}

/// Like [`expect_error`], the error's code being `want` if given.
async fn expect_code(
    c: &Cluster,
    stats: &mut EdgeStats,
    subject: &str,
    headers: HeaderMap,
    body: Vec<u8>,
    want: Option<&str>,
) {
    let shown = format!(
        "{subject} {:?}",
        String::from_utf8_lossy(&body[..body.len().min(80)])
    );
    match ask(c, stats, subject, headers, body, &shown).await {
        Some(m) if clear_error(&m, want) => stats.clear_errors += 1,
        Some(m) => stats.unclear.push((
            shown,
            String::from_utf8_lossy(&m.payload[..m.payload.len().min(200)]).into(),
        )),
        None => {}
    }
}

/// Sends one request of a volley (counted) and returns its answer; no answer within 10 s
/// is recorded as unclear.
async fn ask(
    c: &Cluster,
    stats: &mut EdgeStats,
    subject: &str,
    headers: HeaderMap,
    body: Vec<u8>,
    shown: &str,
) -> Option<async_nats::Message> {
    stats.sent += 1;
    let request = async_nats::Request::new()
        .headers(headers)
        .payload(Bytes::from(body))
        .timeout(Some(Duration::from_secs(10)));
    match c
        .client
        .nats()
        .send_request(subject.to_string(), request)
        .await
    {
        Ok(m) => Some(m),
        Err(e) => {
            stats
                .unclear
                .push((shown.to_string(), format!("no answer: {e}")));
            None
        }
    }
}

fn random_bytes(rng: &mut Rng, max: u64) -> Vec<u8> {
    let n = rng.below(max + 1);
    (0..n).map(|_| rng.next_u64() as u8).collect()
}

/// A valid input, so that only the part under test is wrong.
fn valid_input() -> Value {
    json!({"seed": 1, "steps": [{"kind": "compute", "queue": "cpu", "rounds": 1}]})
}

/// Scenario 14: one volley of poison on every subject Baton consumes — fuzzed bytes, bad
/// UTF-8, unknown types and fields, `. * >` in IDs, deep nesting on `baton.start.*` and
/// `baton.api.*` (each must be refused with a clear error); undecodable and unknown tasks
/// on `baton.task.<queue>.*` (terminated) and reports on `baton.report.*` (answered
/// settled and never applied: the undecodable ones with the reason), including stale
/// reports naming real running runs.
pub async fn poison_volley(c: &Cluster, w: &Workload, rng: &mut Rng, stats: &mut EdgeStats) {
    let start = "baton.start.chaos_pipeline";
    let fuzz = random_bytes(rng, 300);
    expect_error(c, stats, start, json_headers(), fuzz).await;
    let bad_utf8 = b"{\"workflow_id\": \"ok-\xff\xfe\", \"input\": {}}".to_vec();
    expect_error(c, stats, start, json_headers(), bad_utf8).await;
    for id in [
        "a.b",
        "a*",
        "x.>",
        ">",
        "*",
        "with space",
        "",
        &"y".repeat(256),
    ] {
        let body = json!({"workflow_id": id, "input": valid_input()});
        expect_error(
            c,
            stats,
            start,
            json_headers(),
            serde_json::to_vec(&body).unwrap(),
        )
        .await;
    }
    let unknown =
        json!({"workflow_id": "poison-unknown-field", "input": valid_input(), "extra": 1});
    expect_error(
        c,
        stats,
        start,
        json_headers(),
        serde_json::to_vec(&unknown).unwrap(),
    )
    .await;
    let deep = format!(
        r#"{{"workflow_id": "poison-deep", "input": {}{}}}"#,
        "[".repeat(5_000),
        "]".repeat(5_000)
    );
    expect_error(c, stats, start, json_headers(), deep.into_bytes()).await;
    let wrong_shape = json!({"workflow_id": "poison-shape", "input": {"seed": "x", "steps": 3}});
    expect_error(
        c,
        stats,
        start,
        json_headers(),
        serde_json::to_vec(&wrong_shape).unwrap(),
    )
    .await;
    let mut mp = HeaderMap::new();
    mp.insert(CONTENT_TYPE, MSGPACK);
    expect_error(c, stats, start, mp, vec![0xc1, 0xff, 0x00]).await;
    let mut xml = HeaderMap::new();
    xml.insert(CONTENT_TYPE, "text/xml");
    expect_error(c, stats, start, xml, b"<x/>".to_vec()).await;
    for ty in ["no_such_workflow", "x*y", "a>b"] {
        let body = json!({"input": valid_input()});
        expect_error(
            c,
            stats,
            &format!("baton.start.{ty}"),
            json_headers(),
            serde_json::to_vec(&body).unwrap(),
        )
        .await;
    }
    for verb in [
        "result", "describe", "history", "signal", "query", "list", "nope",
    ] {
        let subject = format!("baton.api.{verb}");
        let fuzz = random_bytes(rng, 200);
        expect_error(c, stats, &subject, json_headers(), fuzz).await;
        if verb != "list" {
            let body = json!({"workflow_id": "no.such*id>", "name": "x", "wait_ms": 0});
            expect_error(
                c,
                stats,
                &subject,
                json_headers(),
                serde_json::to_vec(&body).unwrap(),
            )
            .await;
        }
    }
    // Fire-and-forget: a start without a reply subject is ignored.
    let _ = c
        .client
        .nats()
        .publish(
            start,
            serde_json::to_vec(&json!({"workflow_id": "poison-noreply", "input": valid_input()}))
                .unwrap()
                .into(),
        )
        .await;
    stats.sent += 1;

    // JetStream: tasks.
    let js = async_nats::jetstream::new(c.client.nats().clone());
    let n = rng.next_u64() % 1_000_000;
    let publish = |subject: String, body: Vec<u8>| {
        let js = js.clone();
        async move {
            if let Ok(ack) = js.publish(subject, body.into()).await {
                let _ = ack.await;
            }
        }
    };
    for queue in ["cpu", "gpu"] {
        publish(
            format!("baton.task.{queue}.poison{n}.0.1"),
            random_bytes(rng, 200),
        )
        .await;
        let task = ActivityTask {
            workflow_id: format!("poison-{n}"),
            run_id: format!("poison{n}"),
            seq: 0,
            attempt: 1,
            activity: "no_such_activity".into(),
            queue: queue.into(),
            input: baton_transport::Payload(vec![0xc0]),
            start_to_close_ms: 1_000,
            heartbeat_timeout_ms: None,
            liveness: false,
        };
        publish(
            format!("baton.task.{queue}.poison{n}.0.1"),
            codec::encode(&task).unwrap_or_default(),
        )
        .await;
        stats.sent += 2;
    }
    // Reports: requests to the orchestrator.
    expect_report_settled(
        c,
        stats,
        &format!("baton.report.poison{n}"),
        random_bytes(rng, 200),
        true,
    )
    .await;
    expect_report_settled(
        c,
        stats,
        &format!("baton.report.poison{n}"),
        vec![0xc1, 0xff],
        true,
    )
    .await;
    // Well-formed reports: of an unknown run, and stale ones of a real running run (an
    // activity it never scheduled; an attempt it never dispatched). All must be dropped.
    let report = |run_id: &str, workflow_id: &str, seq: u32, attempt: u32| ActivityReport {
        workflow_id: workflow_id.into(),
        run_id: run_id.into(),
        seq,
        attempt,
        worker: "poisoner".into(),
        outcome: ActivityOutcome::Completed {
            result: baton_transport::Payload::encode(&json!({"value": 666})).unwrap(),
        },
    };
    let real: Option<(String, String)> = w.ledger.snapshot().iter().rev().find_map(|(id, e)| {
        e.answers.iter().find_map(|a| match a {
            StartAnswer::Started(r) | StartAnswer::Duplicate(r) if e.result.is_none() => {
                Some((id.clone(), r.clone()))
            }
            _ => None,
        })
    });
    let mut reports = vec![report(&format!("poison{n}"), "poison", 0, 1)];
    if let Some((id, run)) = real {
        reports.push(report(&run, &id, 999, 1));
        reports.push(report(&run, &id, 0, 999));
        let mut failed = report(&run, &id, 0, 777);
        failed.outcome = ActivityOutcome::Failed {
            failure: Failure {
                kind: "Poison".into(),
                message: "stale".into(),
                retryable: true,
            },
        };
        reports.push(failed);
    }
    for r in reports {
        expect_report_settled(
            c,
            stats,
            &format!("baton.report.{}", r.run_id),
            codec::encode(&r).unwrap_or_default(),
            false,
        )
        .await;
    }
}

/// Sends a report request that must be answered settled (the worker may ack its task):
/// with the reason when it is `malformed`, without one when it is well-formed but stale.
/// A malformed one answered so counts as a clear error.
async fn expect_report_settled(
    c: &Cluster,
    stats: &mut EdgeStats,
    subject: &str,
    body: Vec<u8>,
    malformed: bool,
) {
    let shown = format!("{subject} ({} bytes)", body.len());
    let Some(answer) = ask(c, stats, subject, HeaderMap::new(), body, &shown).await else {
        return;
    };
    match codec::decode::<ReportAck>(&answer.payload) {
        Ok(ack) if ack.settled && ack.error.is_some() == malformed => {
            if malformed {
                stats.clear_errors += 1;
            }
        }
        Ok(ack) => stats.unclear.push((shown, format!("{ack:?}"))),
        Err(e) => stats
            .unclear
            .push((shown, format!("answer not a report ack: {e}"))),
    }
}

/// Scenario 14: `volleys` poison volleys, 0.2-0.6 s apart.
pub async fn poison(c: &Cluster, w: Arc<Workload>, volleys: usize, rng: &mut Rng) -> EdgeStats {
    let mut stats = EdgeStats::default();
    for _ in 0..volleys {
        tokio::time::sleep(jitter(rng, 200, 600)).await;
        poison_volley(c, &w, rng, &mut stats).await;
    }
    stats
}

/// Scenario 15 at the edge: start bodies over the 1 MiB limit (1.5 MiB, 7.5 MiB) must be
/// refused with `payload_too_large`; `volleys` of them, 0.5-1 s apart.
pub async fn oversize_starts(c: &Cluster, volleys: usize, rng: &mut Rng) -> EdgeStats {
    let mut stats = EdgeStats::default();
    for i in 0..volleys {
        tokio::time::sleep(jitter(rng, 500, 1_000)).await;
        let size = if i % 2 == 0 { 3 << 19 } else { 15 << 19 };
        let mut input = valid_input();
        input["pad"] = Value::from("p".repeat(size));
        let body = json!({"workflow_id": format!("oversize-start-{i}"), "input": input});
        expect_code(
            c,
            &mut stats,
            "baton.start.chaos_pipeline",
            json_headers(),
            serde_json::to_vec(&body).unwrap(),
            Some("payload_too_large"),
        )
        .await;
    }
    stats
}

/// What scenarios 17-19 saw of the orchestrator's storage faults and of the NATS failures.
#[derive(Debug, Clone, Default)]
pub struct StorageStats {
    /// Journal storage calls failed by injection (ENOSPC, I/O errors), per the hook.
    pub storage_failed: u64,
    /// NATS calls failed by injection in the orchestrator, per call point.
    pub nats_orchestrator: BTreeMap<String, u64>,
    /// NATS calls failed by injection in the workers, in all.
    pub nats_workers: u64,
    /// Scenario 17: starts sent while the disk was full: (workflow ID, the answer).
    pub full_disk_starts: Vec<(String, String)>,
    /// Scenario 18: unsynced journal writes undone by the power losses, and how many
    /// losses tore the last write.
    pub undone_writes: u64,
    /// Power losses that tore a write.
    pub torn: usize,
}

/// Scenario 17: the orchestrator's journal disk fills (every write, resize and sync fails
/// with ENOSPC) for 2-4 s, then has room again; `count` times, 1.5-3.5 s of progress
/// apart. In each window one more start is sent: it must be refused with `unavailable`
/// and never exist.
pub async fn disk_full_windows(
    c: &mut Cluster,
    count: usize,
    rng: &mut Rng,
    stats: &mut StorageStats,
) -> Result<Vec<Fault>> {
    let mut out = Vec::new();
    for k in 0..count {
        tokio::time::sleep(jitter(rng, 1_500, 3_500)).await;
        c.orchestrator_fault("disk_full on").await?;
        let at_ms = now_ms();
        let id = format!("s17-full-disk-{k}-{at_ms}");
        let answer = match c.client.start(WORKFLOW, Some(&id), valid_input()).await {
            Ok(baton_transport::wire::Reply::Err(e)) => serde_json::to_value(e.error.code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
            Ok(baton_transport::wire::Reply::Ok(r)) => format!("{:?}", r.status),
            Err(e) => format!("no answer: {e:#}"),
        };
        stats.full_disk_starts.push((id, answer));
        // The disk stays full this long, whatever the load does meanwhile.
        tokio::time::sleep(jitter(rng, 2_000, 4_000)).await;
        let v = c.orchestrator_fault("disk_full off").await?;
        let healed_ms = now_ms();
        let failed = v["storage_injected"].as_u64().unwrap_or(0);
        record(
            &mut out,
            Fault {
                kind: "disk full".into(),
                target: format!(
                    "orchestrator journal ({} storage calls refused)",
                    failed - stats.storage_failed
                ),
                at_ms,
                healed_ms,
                affected: Affected::AllOpenUntilHeal,
                worker: None,
            },
        );
        stats.storage_failed = failed;
    }
    Ok(out)
}

/// Scenario 18: the orchestrator's machine loses power: every journal write since the
/// last sync is undone, the last one torn in every second loss, and the process ends at
/// once; the driver starts it again on the same journal. Three losses in four are armed
/// in the middle of the 1st-40th journal write from then (inside a commit under load),
/// the fourth is at once; `count` times, 2-5 s of progress apart.
pub async fn power_losses(
    c: &mut Cluster,
    count: usize,
    rng: &mut Rng,
    stats: &mut StorageStats,
) -> Result<Vec<Fault>> {
    let mut out = Vec::new();
    for k in 0..count {
        tokio::time::sleep(jitter(rng, 2_000, 5_000)).await;
        let tear = k % 2 == 0;
        let at_write = (k % 4 != 3).then(|| rng.range(1, 40));
        let before = c.orchestrator.count_in_log("chaos: power lost");
        let (how, at_ms) = c.orchestrator_power_loss(at_write, tear).await?;
        let log = c.orchestrator.log_contents();
        let losses: Vec<&str> = log
            .lines()
            .filter(|l| l.starts_with("chaos: power lost"))
            .collect();
        if losses.len() != before + 1 {
            bail!("the orchestrator ended without its power loss (log: {losses:?})");
        }
        let line = losses[before];
        // `chaos: power lost (N unsynced journal writes undone, last torn: B); ...`
        let undone: u64 = line
            .split_once('(')
            .and_then(|(_, r)| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        stats.undone_writes += undone;
        if line.contains("last torn: true") {
            stats.torn += 1;
        }
        record(
            &mut out,
            Fault {
                kind: format!("power loss {how}"),
                target: format!(
                    "orchestrator ({undone} writes undone; now pid {})",
                    c.orchestrator.pid()
                ),
                at_ms,
                healed_ms: now_ms(),
                affected: Affected::AllOpen,
                worker: None,
            },
        );
    }
    Ok(out)
}

/// Scenario 19: from now `per_million` of the orchestrator's journal storage calls and of
/// the NATS calls of every process (orchestrator and workers) fail, until
/// [`failing_calls_off`] (after the drain: every run of the load runs through them). One
/// "fault" spanning the window.
pub async fn failing_calls_on(c: &mut Cluster, per_million: u32) -> Result<Vec<Fault>> {
    c.orchestrator_fault(&format!("io_failures {per_million}"))
        .await?;
    c.orchestrator_fault(&format!("nats_failures {per_million}"))
        .await?;
    for i in 0..c.workers.len() {
        let v = c
            .hook(
                &c.workers[i].hook_subject(),
                &format!("nats_failures {per_million}"),
            )
            .await?;
        if v["injected"] != true {
            bail!(
                "worker {} did not take the NATS failure rate: {v}",
                c.workers[i].name(i)
            );
        }
    }
    let at_ms = now_ms();
    println!("  failing calls on: {per_million} in a million (journal storage, NATS)");
    Ok(vec![Fault {
        kind: format!("{per_million} in a million calls failing"),
        target: "orchestrator journal, every process's NATS calls".into(),
        at_ms,
        healed_ms: u64::MAX,
        affected: Affected::Attempts(Vec::new()),
        worker: None,
    }])
}

/// Scenario 19's heal: every failure rate back to 0; the counts of what was injected.
pub async fn failing_calls_off(
    c: &mut Cluster,
    fault: &mut Fault,
    stats: &mut StorageStats,
) -> Result<()> {
    let v = c.orchestrator_fault("io_failures 0").await?;
    stats.storage_failed = v["storage_injected"].as_u64().unwrap_or(0);
    let v = c.orchestrator_fault("nats_failures 0").await?;
    stats.nats_orchestrator =
        serde_json::from_value(v["nats_by_point"].clone()).unwrap_or_default();
    for i in 0..c.workers.len() {
        let v = c
            .hook(&c.workers[i].hook_subject(), "nats_failures 0")
            .await?;
        stats.nats_workers += v["nats_injected"].as_u64().unwrap_or(0);
    }
    fault.healed_ms = now_ms();
    let nats: u64 = stats.nats_orchestrator.values().sum::<u64>() + stats.nats_workers;
    println!(
        "  failing calls off after {:.1} s: {} journal storage calls and {nats} NATS calls failed",
        (fault.healed_ms - fault.at_ms) as f64 / 1000.0,
        stats.storage_failed
    );
    Ok(())
}
