//! The checker: after a scenario healed and drained, it reads back everything Baton
//! recorded (results, the redb journal through `baton.api.history`, the JetStream mirror
//! `BATON_HISTORY`, the run list) and checks the invariants of RELIABILITY.md against the
//! ledger of what the workload was acknowledged:
//!
//! - **I1 lost**: an acknowledged start whose run is not closed (or not found) after the
//!   drain.
//! - **I2 duplicate**: an ID with more than one run (in the list, in `started` answers,
//!   in answers naming different runs, or in `workflow_started` events).
//! - **I3 wrong**: a closed run whose result differs from the model's; also an activity
//!   result whose value differs from the model's value for that step.
//! - **I4 recorded once**: an activity with more than one outcome recorded, an event
//!   after its outcome, or (in a completed run) an activity without a result.
//! - **I5 attempts**: an attempt number above the activity's `maximum_attempts`.
//! - **I6 journal = mirror**: the redb history differs from the JetStream mirror, or
//!   replaying either (up to the close) does not give the recorded close.
//! - **I7 live**: a process that died without being killed; a probe after the heal that
//!   did not complete, a worker that served none of them, or probes that could not all
//!   run at once (a leaked slot).
//! - **I8 unexpected**: a run the driver never started, an outcome for an activity never
//!   scheduled.
//!
//! Figures: re-executed attempts (attempt > 1 in the histories; redeliveries of the same
//! attempt from the worker logs) and recovery: for each fault and each workflow it hit (an
//! attempt in flight on the faulted worker or actor; for an orchestrator kill, every run
//! open then), the time from the fault to the workflow's next event in the journal.

use std::collections::{BTreeMap, HashMap};

use anyhow::Result;
use baton_actors::{Command, Execution, Registry, history::Event};
use baton_tests::Client;
use baton_transport::wire::ResultReply;
use serde_json::Value;

use crate::{
    faults::{Affected, Fault},
    model::Expected,
    workload::{Entry, StartAnswer},
};

/// One violation of an invariant.
#[derive(Debug, Clone)]
pub struct Violation {
    /// `I1 lost`, `I2 duplicate`, ..., or a scenario check (`S12 late result`).
    pub invariant: &'static str,
    /// The workflow it concerns ("" for none).
    pub workflow_id: String,
    /// What was seen.
    pub detail: String,
}

/// What the checker read back from the cluster.
pub struct Readback {
    /// `baton.api.history` replies by workflow ID (or the error).
    pub histories: BTreeMap<String, Result<Value, String>>,
    /// The latest result of each acknowledged workflow.
    pub results: BTreeMap<String, Option<ResultReply>>,
    /// Runs per workflow ID in `baton.api.list`.
    pub listed: BTreeMap<String, usize>,
    /// The JetStream mirror, events by run ID.
    pub mirror: HashMap<String, Vec<Event>>,
}

/// Reads back every workflow of the ledger.
pub async fn read_back(
    client: &Client,
    nats: &async_nats::Client,
    ledger: &BTreeMap<String, Entry>,
) -> Result<Readback> {
    let mut histories = BTreeMap::new();
    let mut results = BTreeMap::new();
    for (id, e) in ledger {
        let h = match client.history(id).await {
            Ok(v) if v.get("error").is_some() => Err(v["error"].to_string()),
            Ok(v) => Ok(v),
            Err(err) => Err(format!("{err:#}")),
        };
        histories.insert(id.clone(), h);
        if e.acked {
            let r = match &e.result {
                Some(r) if !matches!(r, ResultReply::Running) => Some(r.clone()),
                _ => client.result(id, 0).await.ok(),
            };
            results.insert(id.clone(), r);
        }
    }
    let list = client.list(None, Some(10_000)).await?;
    let mut listed = BTreeMap::new();
    for w in list["workflows"].as_array().into_iter().flatten() {
        *listed
            .entry(w["workflow_id"].as_str().unwrap_or("").to_string())
            .or_insert(0) += 1;
    }
    Ok(Readback {
        histories,
        results,
        listed,
        mirror: baton_tests::read_mirror(nats).await?,
    })
}

/// The figures of one scenario.
#[derive(Debug, Clone, Default)]
pub struct Figures {
    /// Workflows in the ledger (probes included).
    pub workflows: usize,
    /// Faults injected.
    pub faults: usize,
    /// Violations per invariant name.
    pub counts: BTreeMap<&'static str, usize>,
    /// Activity attempts numbered above 1 in the histories.
    pub reexecuted: usize,
    /// Attempts JetStream delivered again (worker logs).
    pub redelivered: usize,
    /// Recovery times, seconds.
    pub recovery: Vec<f64>,
}

/// Names of the invariants, in table order.
pub const INVARIANTS: [&str; 8] = [
    "I1 lost",
    "I2 duplicate",
    "I3 wrong",
    "I4 recorded once",
    "I5 attempts",
    "I6 journal = mirror",
    "I7 live",
    "I8 unexpected",
];

fn events_of(h: &Value) -> Vec<Value> {
    h["events"].as_array().cloned().unwrap_or_default()
}

fn result_value(e: &Value) -> Option<u64> {
    e["result"]["value"].as_u64()
}

/// Checks I1-I6 and I8 for every workflow of the ledger. A refused start is an I7
/// violation unless `refusal_ok(code, when)` (Unix ms): scenarios 17-19 allow `unavailable`
/// while their storage faults last.
pub fn check_workflows(
    ledger: &BTreeMap<String, Entry>,
    rb: &Readback,
    registry: &Registry,
    refusal_ok: &dyn Fn(&str, u64) -> bool,
    v: &mut Vec<Violation>,
) {
    let mut push = |inv: &'static str, id: &str, detail: String| {
        v.push(Violation {
            invariant: inv,
            workflow_id: id.to_string(),
            detail,
        })
    };
    for (id, e) in ledger {
        let history = rb.histories.get(id);
        // I1: every acknowledged start reaches a terminal state.
        if e.acked {
            match rb.results.get(id).cloned().flatten() {
                Some(ResultReply::Completed { .. } | ResultReply::Failed { .. }) => {}
                other => push(
                    "I1 lost",
                    id,
                    format!("acknowledged, not closed after the drain: {other:?}"),
                ),
            }
        }
        // I2: one run per ID.
        let started = e
            .answers
            .iter()
            .filter(|a| matches!(a, StartAnswer::Started(_)))
            .count();
        let mut runs: Vec<&String> = e
            .answers
            .iter()
            .filter_map(|a| match a {
                StartAnswer::Started(r) | StartAnswer::Duplicate(r) => Some(r),
                StartAnswer::Refused(_) => None,
            })
            .collect();
        runs.sort();
        runs.dedup();
        if started > 1 || runs.len() > 1 {
            push(
                "I2 duplicate",
                id,
                format!(
                    "{started} `started` answers naming {} runs: {:?}",
                    runs.len(),
                    e.answers
                ),
            );
        }
        if let Some(n) = rb.listed.get(id).filter(|n| **n > 1) {
            push("I2 duplicate", id, format!("{n} runs listed"));
        }
        let refusals = e.answers.iter().filter_map(|a| match a {
            StartAnswer::Refused(code) => Some(code),
            _ => None,
        });
        for (code, at) in refusals.zip(e.refused_at_ms.iter().copied()) {
            if !refusal_ok(code, at) {
                push(
                    "I7 live",
                    id,
                    format!("a valid start was refused with {code} at {at}"),
                );
            }
        }
        let Some(Ok(h)) = history else {
            if e.acked {
                push(
                    "I1 lost",
                    id,
                    format!("no history: {:?}", history.map(|r| r.as_ref().err())),
                );
            }
            continue;
        };
        let evs = events_of(h);
        let run_id = h["run_id"].as_str().unwrap_or("");
        if runs.first().is_some_and(|r| r.as_str() != run_id) {
            push(
                "I2 duplicate",
                id,
                format!("answered run {:?}, the ID names run {run_id}", runs[0]),
            );
        }
        let n_started = evs
            .iter()
            .filter(|x| x["type"] == "workflow_started")
            .count();
        if n_started != 1 {
            push(
                "I2 duplicate",
                id,
                format!("{n_started} workflow_started events"),
            );
        }
        // I3: the result is the model's.
        if let Some(Some(r)) = rb.results.get(id) {
            let ok = match (&e.expected, r) {
                (Expected::Completed { output, .. }, ResultReply::Completed { output: o }) => {
                    o == output
                }
                (Expected::Failed { kind, .. }, ResultReply::Failed { error }) => {
                    error["kind"] == kind.as_str()
                }
                (
                    Expected::CompletedOrFailed { output, kind, .. },
                    ResultReply::Completed { output: o },
                ) => o == output || error_kind_is(r, kind),
                (Expected::CompletedOrFailed { kind, .. }, ResultReply::Failed { error }) => {
                    error["kind"] == kind.as_str()
                }
                (_, ResultReply::Running) => true,
                _ => false,
            };
            if !ok {
                push(
                    "I3 wrong",
                    id,
                    format!("expected {}, got {r:?}", e.expected.name()),
                );
            }
        }
        check_activities(id, e, &evs, &mut push);
        // I6: the redb journal and the JetStream mirror agree; replaying either gives
        // the recorded close.
        match rb.mirror.get(run_id) {
            None => push(
                "I6 journal = mirror",
                id,
                format!("run {run_id} has no mirror"),
            ),
            Some(mirrored) => {
                let m: Vec<Value> = mirrored.iter().map(Event::to_json).collect();
                if m != evs {
                    push(
                        "I6 journal = mirror",
                        id,
                        format!(
                            "redb has {} events, the mirror {}; first difference at index {:?}",
                            evs.len(),
                            m.len(),
                            m.iter().zip(&evs).position(|(a, b)| a != b)
                        ),
                    );
                }
                if let Err(why) = replay_closes(registry, id, run_id, mirrored) {
                    push("I6 journal = mirror", id, format!("mirror replay: {why}"));
                }
                let parsed: Result<Vec<Event>, String> = evs.iter().map(Event::from_json).collect();
                match parsed {
                    Ok(journal) => {
                        if let Err(why) = replay_closes(registry, id, run_id, &journal) {
                            push("I6 journal = mirror", id, format!("journal replay: {why}"));
                        }
                    }
                    Err(why) => push("I6 journal = mirror", id, format!("unreadable: {why}")),
                }
            }
        }
    }
    // I8: nothing the driver did not start.
    for (id, n) in &rb.listed {
        if !ledger.contains_key(id) {
            push("I8 unexpected", id, format!("{n} runs nobody started"));
        }
    }
}

fn error_kind_is(r: &ResultReply, kind: &str) -> bool {
    matches!(r, ResultReply::Failed { error } if error["kind"] == kind)
}

/// I3 (step values), I4, I5, I8 (outcomes of unscheduled activities) over one history.
fn check_activities(
    id: &str,
    e: &Entry,
    evs: &[Value],
    push: &mut impl FnMut(&'static str, &str, String),
) {
    let expected = e.expected.activities();
    let mut scheduled: BTreeMap<u64, (String, u64)> = BTreeMap::new();
    let mut resolved: BTreeMap<u64, u64> = BTreeMap::new(); // seq -> event_id of its outcome
    for x in evs {
        let seq = x["seq"].as_u64().unwrap_or(u64::MAX);
        match x["type"].as_str().unwrap_or("") {
            "activity_scheduled" => {
                let name = x["activity"].as_str().unwrap_or("").to_string();
                let max = x["maximum_attempts"].as_u64().unwrap_or(0);
                match expected.get(seq as usize) {
                    Some((want, _)) if *want == name => {}
                    other => push(
                        "I3 wrong",
                        id,
                        format!("seq {seq} scheduled {name}, the model has {other:?}"),
                    ),
                }
                scheduled.insert(seq, (name, max));
            }
            ty @ ("activity_completed" | "activity_failed") => {
                let attempt = x["attempt"].as_u64().unwrap_or(0);
                let Some((_, max)) = scheduled.get(&seq) else {
                    push(
                        "I8 unexpected",
                        id,
                        format!("{ty} for seq {seq}, never scheduled: {x}"),
                    );
                    continue;
                };
                if *max != 0 && attempt > *max {
                    push(
                        "I5 attempts",
                        id,
                        format!("seq {seq} attempt {attempt} > maximum {max}"),
                    );
                }
                if let Some(first) = resolved.get(&seq) {
                    push(
                        "I4 recorded once",
                        id,
                        format!(
                            "seq {seq}: {ty} (attempt {attempt}, event {}) after its outcome (event {first})",
                            x["event_id"]
                        ),
                    );
                    continue;
                }
                let final_failure = ty == "activity_failed" && x["retry_in_ms"].is_null();
                if ty == "activity_completed" || final_failure {
                    resolved.insert(seq, x["event_id"].as_u64().unwrap_or(0));
                }
                if ty == "activity_completed" {
                    let want = expected.get(seq as usize).map(|(_, v)| *v);
                    if result_value(x) != want {
                        push(
                            "I3 wrong",
                            id,
                            format!(
                                "seq {seq} result {:?}, the model's {want:?}",
                                result_value(x)
                            ),
                        );
                    }
                }
            }
            _ => {}
        }
    }
    if evs.iter().any(|x| x["type"] == "workflow_completed") {
        for seq in scheduled.keys() {
            if !resolved.contains_key(seq) {
                push(
                    "I4 recorded once",
                    id,
                    format!("seq {seq} has no outcome in a completed run"),
                );
            }
        }
    }
}

/// Replays `events` up to (not including) their close event and checks that the code
/// closes the run the same way.
fn replay_closes(
    registry: &Registry,
    workflow_id: &str,
    run_id: &str,
    events: &[Event],
) -> std::result::Result<(), String> {
    let Some(last) = events.last() else {
        return Err("no events".into());
    };
    if !last.kind.is_close() {
        return Ok(()); // not closed: I1 reports it
    }
    let Some(baton_actors::history::EventKind::WorkflowStarted { workflow_type, .. }) =
        events.first().map(|e| &e.kind)
    else {
        return Err("the first event is not workflow_started".into());
    };
    let def = registry
        .workflow_def(workflow_type)
        .ok_or_else(|| format!("workflow type {workflow_type} not registered"))?;
    let mut exec = Execution::new(
        def.run.clone(),
        workflow_id,
        run_id,
        registry.policies().clone(),
    );
    let ahead = exec
        .replay(&events[..events.len() - 1])
        .map_err(|e| e.to_string())?;
    let same = match (&last.kind, ahead.as_slice()) {
        (
            baton_actors::history::EventKind::WorkflowCompleted { output },
            [Command::CompleteWorkflow { output: o }],
        ) => o.to_json() == output.to_json(),
        (
            baton_actors::history::EventKind::WorkflowFailed { failure },
            [Command::FailWorkflow { failure: f }],
        ) => f.kind == failure.kind,
        _ => false,
    };
    if same {
        Ok(())
    } else {
        Err(format!(
            "replayed to {ahead:?}, the journal closed with {:?}",
            last.kind.name()
        ))
    }
}

/// One recovery: a workflow a fault hit, and how long until its next event.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// Seconds from the fault to the workflow's next event.
    pub seconds: f64,
    /// The workflow.
    pub workflow_id: String,
    /// Which fault (index in the scenario's list, from 0).
    pub fault: usize,
}

/// Recovery times: for each fault, each workflow it hit, from the fault to that
/// workflow's next event in the journal.
pub fn recovery(faults: &[Fault], rb: &Readback) -> Vec<Recovery> {
    // workflow ID -> event times; run ID -> workflow ID.
    let mut times: HashMap<String, Vec<u64>> = HashMap::new();
    let mut spans: Vec<(String, u64, Option<u64>)> = Vec::new();
    for (id, h) in &rb.histories {
        let Ok(h) = h else { continue };
        let evs = events_of(h);
        let at: Vec<u64> = evs.iter().filter_map(|e| e["at_ms"].as_u64()).collect();
        let closed = evs
            .iter()
            .find(|e| e["type"] == "workflow_completed" || e["type"] == "workflow_failed")
            .and_then(|e| e["at_ms"].as_u64());
        if let Some(first) = at.first() {
            spans.push((id.clone(), *first, closed));
        }
        times.insert(id.clone(), at);
    }
    let mut out = Vec::new();
    for (k, f) in faults.iter().enumerate() {
        let hit: Vec<String> = match &f.affected {
            Affected::Attempts(a) => {
                let mut ids: Vec<String> = a.iter().map(|a| a.workflow_id.clone()).collect();
                ids.sort();
                ids.dedup();
                ids
            }
            Affected::AllOpen | Affected::AllOpenUntilHeal => spans
                .iter()
                .filter(|(_, start, closed)| {
                    *start <= f.at_ms && closed.is_none_or(|c| c > f.at_ms)
                })
                .map(|(id, _, _)| id.clone())
                .collect(),
        };
        // A full disk: nothing can commit until it is freed, so from the heal.
        let from = match f.affected {
            Affected::AllOpenUntilHeal => f.healed_ms,
            _ => f.at_ms,
        };
        for id in hit {
            if let Some(next) = times.get(&id).and_then(|t| t.iter().find(|t| **t >= from)) {
                out.push(Recovery {
                    seconds: (next - from) as f64 / 1000.0,
                    workflow_id: id,
                    fault: k,
                });
            }
        }
    }
    out
}

/// Attempts numbered above 1 recorded in the histories.
pub fn reexecuted(rb: &Readback) -> usize {
    let mut n = 0;
    for h in rb.histories.values().flatten() {
        let mut seen = std::collections::BTreeSet::new();
        for e in events_of(h) {
            let a = e["attempt"].as_u64().unwrap_or(0);
            if a > 1 {
                seen.insert((e["seq"].as_u64(), a));
            }
        }
        n += seen.len();
    }
    n
}

/// Scenario 12: a paused worker's report for an attempt it held when paused, recorded
/// after the resume (a frozen process sends nothing, so what is recorded during the pause
/// was on the wire before it) for an attempt that had timed out by then (its activity
/// heartbeats with a timeout shorter than the pause, or the attempt already has an
/// outcome), is a late result that should have been dropped. Returns
/// (held attempts, late results recorded, held attempts completed by another worker or
/// attempt).
pub fn late_results(
    faults: &[Fault],
    rb: &Readback,
    v: &mut Vec<Violation>,
) -> (usize, usize, usize) {
    let (mut held, mut late, mut elsewhere) = (0, 0, 0);
    for f in faults {
        let (Affected::Attempts(attempts), Some((queue, pid))) = (&f.affected, &f.worker) else {
            continue;
        };
        let is_paused = |w: &str| w.starts_with(queue.as_str()) && w.ends_with(&format!("-{pid}"));
        for a in attempts {
            held += 1;
            let Some(Ok(h)) = rb.histories.get(&a.workflow_id) else {
                continue;
            };
            let pause = f.healed_ms.saturating_sub(f.at_ms);
            let mut timed_out = false;
            for x in events_of(h) {
                if x["seq"].as_u64() != Some(u64::from(a.seq)) {
                    continue;
                }
                if x["type"] == "activity_scheduled" {
                    timed_out = x["heartbeat_timeout_ms"]
                        .as_u64()
                        .is_some_and(|hb| hb < pause);
                }
                let outcome = x["type"] == "activity_completed" || x["type"] == "activity_failed";
                if !outcome {
                    continue;
                }
                let worker = x["worker"].as_str().unwrap_or("");
                let at = x["at_ms"].as_u64().unwrap_or(0);
                let this_attempt = x["attempt"].as_u64() == Some(u64::from(a.attempt));
                if this_attempt && is_paused(worker) && at >= f.healed_ms && timed_out {
                    late += 1;
                    v.push(Violation {
                        invariant: "S12 late result dropped",
                        workflow_id: a.workflow_id.clone(),
                        detail: format!(
                            "seq {} attempt {} held by {} when paused at {}, its {} recorded at {at} (resumed at {})",
                            a.seq, a.attempt, worker, f.at_ms, x["type"], f.healed_ms
                        ),
                    });
                } else if x["type"] == "activity_completed" && !is_paused(worker) {
                    elsewhere += 1;
                }
                if this_attempt {
                    // Any later report for this attempt is late: it already has an outcome.
                    timed_out = true;
                }
            }
        }
    }
    (held, late, elsewhere)
}

/// `p`-th percentile (nearest rank) of `xs`, or 0.
pub fn percentile(xs: &[f64], p: f64) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    let mut s = xs.to_vec();
    s.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * s.len() as f64).ceil() as usize;
    s[rank.clamp(1, s.len()) - 1]
}

/// A history for a violation report: one event per line, long strings shortened.
pub fn show_history(h: &Value) -> String {
    fn shorten(v: &Value) -> Value {
        match v {
            Value::String(s) if s.len() > 120 => Value::from(format!("<{} bytes>", s.len())),
            Value::Array(a) => Value::Array(a.iter().map(shorten).collect()),
            Value::Object(o) => {
                Value::Object(o.iter().map(|(k, v)| (k.clone(), shorten(v))).collect())
            }
            other => other.clone(),
        }
    }
    events_of(h)
        .iter()
        .map(|e| format!("    {}", shorten(e)))
        .collect::<Vec<_>>()
        .join("\n")
}

/// A history in short: one line per event with its time, type, activity sequence, attempt
/// and worker.
pub fn compact_history(h: &Value) -> String {
    events_of(h)
        .iter()
        .map(|e| {
            let mut line = format!(
                "    {} #{} {}",
                e["at_ms"],
                e["event_id"],
                e["type"].as_str().unwrap_or("?")
            );
            for k in ["seq", "activity", "attempt", "worker"] {
                if let Some(v) = e.get(k).filter(|v| !v.is_null()) {
                    line.push_str(&format!(
                        " {k}={}",
                        v.as_str().map_or(v.to_string(), str::to_string)
                    ));
                }
            }
            if let Some(kind) = e["failure"]["kind"].as_str() {
                line.push_str(&format!(" failure={kind}"));
            }
            line
        })
        .collect::<Vec<_>>()
        .join("\n")
}
