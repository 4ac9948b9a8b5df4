//! Per-stage timings: where a workflow step's time goes, read from the `baton::stage`
//! events a `baton dev` logs when `RUST_LOG` enables them (`baton-loadgen --stages`).
//!
//! Each event is one log line of tracing's text format,
//! `<RFC 3339 time> TRACE <spans>: baton::stage: <stage> run=<id> seq=<n> attempt=<n> ...`.
//! A step is keyed by its run, activity sequence number and attempt, and followed from its
//! task's dispatch to the next dispatch of its run (or the run's close): through the task
//! queue, the worker, the activity, the report, the journal and back.

use std::collections::HashMap;

use crate::{median, percentile};

/// One `baton::stage` event.
#[derive(Debug, Clone, PartialEq)]
pub struct StageEvent {
    /// Microseconds since the Unix epoch (UTC).
    pub t_us: i64,
    /// The stage's name (`task.dispatch`, `report.sent`, ...).
    pub stage: String,
    /// The event's fields (`run`, `seq`, `attempt`, `workflow`, `redb_us`, ...).
    pub fields: HashMap<String, String>,
}

impl StageEvent {
    fn field(&self, name: &str) -> Option<&str> {
        self.fields.get(name).map(String::as_str)
    }

    fn number(&self, name: &str) -> Option<f64> {
        self.field(name)?.parse().ok()
    }

    /// The step the event concerns: (run, seq, attempt).
    fn step(&self) -> Option<(String, u32, u32)> {
        Some((
            self.field("run")?.to_string(),
            self.field("seq")?.parse().ok()?,
            self.field("attempt")?.parse().ok()?,
        ))
    }
}

/// Microseconds since the Unix epoch of an RFC 3339 UTC time as tracing writes it
/// (`2026-12-07T14:16:12.897796Z`).
pub fn parse_time_us(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z')?;
    let (date, time) = s.split_once('T')?;
    let mut d = date.splitn(3, '-').map(|p| p.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.splitn(3, ':').map(|p| p.parse::<i64>().ok());
    let (hh, mm, ss) = (t.next()??, t.next()??, t.next()??);
    // Fractional seconds to microseconds, whatever their digits.
    let digits: String = frac.chars().take(6).collect();
    let micros = format!("{digits:0<6}").parse::<i64>().ok()?;
    // Days from 1970-01-01 (Howard Hinnant's days_from_civil).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(((days * 86_400 + hh * 3_600 + mm * 60 + ss) * 1_000_000) + micros)
}

/// Parses one log line; `None` for anything but a `baton::stage` event. Terminal colour
/// codes are ignored.
pub fn parse_line(line: &str) -> Option<StageEvent> {
    let line = strip_ansi(line);
    let (head, rest) = line.split_once(" baton::stage: ")?;
    let t_us = parse_time_us(head.split_whitespace().next()?)?;
    let mut words = rest.split_whitespace();
    let stage = words.next()?.to_string();
    let fields = words
        .filter_map(|w| w.split_once('='))
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    Some(StageEvent {
        t_us,
        stage,
        fields,
    })
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            // ESC [ ... final byte in @..~
            for c in chars.by_ref() {
                if ('@'..='~').contains(&c) && c != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// One measured stage: its name, what it covers and its durations in microseconds.
#[derive(Debug, Clone)]
pub struct Stage {
    /// Its name (indented under the one it is part of).
    pub name: String,
    /// What it covers, from which event to which.
    pub covers: &'static str,
    /// The durations measured, in microseconds (a count for a group's requests).
    pub us: Vec<f64>,
}

impl Stage {
    fn new(name: &str, covers: &'static str) -> Stage {
        Stage {
            name: name.to_string(),
            covers,
            us: Vec::new(),
        }
    }

    /// (median, p90) in microseconds; `None` when nothing was measured.
    pub fn summary(&self) -> Option<(f64, f64)> {
        if self.us.is_empty() {
            return None;
        }
        let mut sorted = self.us.clone();
        sorted.sort_by(f64::total_cmp);
        Some((median(&sorted), percentile(&sorted, 0.9)))
    }
}

/// Times of one step's events.
#[derive(Default)]
struct Step {
    activity: Option<String>,
    dispatch: Option<i64>,
    received: Option<i64>,
    start: Option<i64>,
    end: Option<i64>,
    sent: Option<i64>,
    report_in: Option<i64>,
    answered: Option<i64>,
}

fn first(slot: &mut Option<i64>, t: i64) {
    if slot.is_none_or(|s| t < s) {
        *slot = Some(t);
    }
}

fn span(stage: &mut Stage, from: Option<i64>, to: Option<i64>) {
    if let (Some(a), Some(b)) = (from, to)
        && b >= a
    {
        stage.us.push((b - a) as f64);
    }
}

/// The first time in `times` (sorted) at or after `t`.
fn next_at(times: &[i64], t: i64) -> Option<i64> {
    let i = times.partition_point(|&x| x < t);
    times.get(i).copied()
}

/// Where the time of the steps (and of the starts and closes) in `events` goes. Only steps
/// dispatched within one of `windows` (microsecond ranges, e.g. the measured runs) count;
/// every event is used to follow them.
pub fn analyze(events: &[StageEvent], windows: &[(i64, i64)]) -> Vec<Stage> {
    let inside = |t: i64| windows.iter().any(|&(a, b)| t >= a && t <= b);
    let mut steps: HashMap<(String, u32, u32), Step> = HashMap::new();
    // Per run, sorted: journal appends asked and answered, dispatches and closes.
    let mut appends: HashMap<&str, Vec<i64>> = HashMap::new();
    let mut appended: HashMap<&str, Vec<i64>> = HashMap::new();
    let mut next: HashMap<&str, Vec<i64>> = HashMap::new();
    let mut first_dispatch: HashMap<&str, i64> = HashMap::new();
    let mut start_in: HashMap<&str, i64> = HashMap::new();
    let mut committed: HashMap<&str, (i64, &str)> = HashMap::new();
    let mut closed: HashMap<&str, i64> = HashMap::new();
    let mut results: HashMap<&str, Vec<i64>> = HashMap::new();
    let mut groups = [
        Stage::new(
            "journal group: requests",
            "writes per group commit (a count)",
        ),
        Stage::new("journal group: redb", "the redb transaction with its fsync"),
        Stage::new(
            "journal group: mirror handed over",
            "from the group's start until redb handed its message to the publisher",
        ),
        Stage::new(
            "journal group: mirror",
            "the mirror message's publish, stored and acknowledged (overlaps redb's fsync)",
        ),
        Stage::new(
            "journal starts: redb",
            "a group with starts: its redb transaction with its fsync",
        ),
        Stage::new(
            "journal starts: mirror",
            "the starts' message, published once redb has committed them",
        ),
    ];
    for e in events {
        let run = e.field("run");
        match e.stage.as_str() {
            "journal.group" if inside(e.t_us) => {
                for (stage, field) in
                    groups
                        .iter_mut()
                        .zip(["writes", "redb_us", "mirror_after_us", "mirror_us"])
                {
                    if let Some(v) = e.number(field) {
                        stage.us.push(v);
                    }
                }
            }
            "journal.starts" if inside(e.t_us) => {
                for (stage, field) in groups[4..].iter_mut().zip(["redb_us", "mirror_us"]) {
                    if let Some(v) = e.number(field) {
                        stage.us.push(v);
                    }
                }
            }
            "journal.append" => appends.entry(run.unwrap_or("")).or_default().push(e.t_us),
            "journal.appended" => appended.entry(run.unwrap_or("")).or_default().push(e.t_us),
            "workflow.closed" => {
                next.entry(run.unwrap_or("")).or_default().push(e.t_us);
                if let Some(w) = e.field("workflow") {
                    closed.insert(w, e.t_us);
                }
            }
            "start.received" => {
                if let Some(w) = e.field("workflow") {
                    start_in.entry(w).or_insert(e.t_us);
                }
            }
            "start.committed" => {
                if let (Some(w), Some(r)) = (e.field("workflow"), run) {
                    committed.insert(r, (e.t_us, w));
                }
            }
            "result.sent" => {
                if let Some(w) = e.field("workflow") {
                    results.entry(w).or_default().push(e.t_us);
                }
            }
            _ => {}
        }
        let Some(key) = e.step() else { continue };
        let step = steps.entry(key).or_default();
        match e.stage.as_str() {
            "task.dispatch" => {
                first(&mut step.dispatch, e.t_us);
                if let Some(a) = e.field("activity") {
                    step.activity = Some(a.to_string());
                }
                let run = run.unwrap_or("");
                next.entry(run).or_default().push(e.t_us);
                let f = first_dispatch.entry(run).or_insert(e.t_us);
                *f = (*f).min(e.t_us);
            }
            "task.received" => first(&mut step.received, e.t_us),
            "activity.start" => first(&mut step.start, e.t_us),
            "activity.end" => first(&mut step.end, e.t_us),
            "report.sent" => first(&mut step.sent, e.t_us),
            "report.received" => first(&mut step.report_in, e.t_us),
            "report.answered" => first(&mut step.answered, e.t_us),
            _ => {}
        }
    }
    for times in appends
        .values_mut()
        .chain(appended.values_mut())
        .chain(next.values_mut())
        .chain(results.values_mut())
    {
        times.sort_unstable();
    }
    // A step's stages, one set per activity (in the order they were first dispatched).
    const STEP: [(&str, &str); 10] = [
        (
            "step",
            "a task's dispatch to its run's next dispatch (or close)",
        ),
        (
            "  task queue",
            "dispatch (JetStream publish) to the worker's pool holding the task",
        ),
        ("  worker: start", "pool to the runner calling the activity"),
        ("  activity", "the activity's own code"),
        (
            "  worker: report",
            "activity returned to its report sent (a failed attempt's heartbeat details stored first)",
        ),
        (
            "  report",
            "the report request to the orchestrator's handler",
        ),
        (
            "  to the journal",
            "the report's handler to its run's journal append",
        ),
        ("  journal", "the append: redb and the mirror, both durable"),
        (
            "  next dispatch",
            "append answered to the next task's dispatch (or the close)",
        ),
        (
            "  report answered",
            "report received to its answer (journal and next dispatch's ack included)",
        ),
    ];
    let mut by_activity: Vec<(String, i64, Vec<Stage>)> = Vec::new();
    for ((run, _, _), s) in &steps {
        let Some(dispatch) = s.dispatch.filter(|&t| inside(t)) else {
            continue;
        };
        let activity = s.activity.clone().unwrap_or_default();
        let i = match by_activity.iter().position(|(a, _, _)| *a == activity) {
            Some(i) => i,
            None => {
                let set = STEP.iter().map(|(n, c)| Stage::new(n, c)).collect();
                by_activity.push((activity, dispatch, set));
                by_activity.len() - 1
            }
        };
        let (_, first_seen, stages) = &mut by_activity[i];
        *first_seen = (*first_seen).min(dispatch);
        let run = run.as_str();
        let after = |t: Option<i64>, times: Option<&Vec<i64>>| {
            t.and_then(|t| times.and_then(|v| next_at(v, t)))
        };
        let append = after(s.report_in, appends.get(run));
        let appended_at = after(append, appended.get(run));
        // The run's next dispatch (or close) after this step's append.
        let then = appended_at.and_then(|t| next.get(run).and_then(|v| next_at(v, t)));
        span(&mut stages[0], Some(dispatch), then);
        span(&mut stages[1], Some(dispatch), s.received);
        span(&mut stages[2], s.received, s.start);
        span(&mut stages[3], s.start, s.end);
        span(&mut stages[4], s.end, s.sent);
        span(&mut stages[5], s.sent, s.report_in);
        span(&mut stages[6], s.report_in, append);
        span(&mut stages[7], append, appended_at);
        span(&mut stages[8], appended_at, then);
        span(&mut stages[9], s.report_in, s.answered);
    }
    by_activity.sort_by_key(|(_, first_seen, _)| *first_seen);
    let mut stages = vec![
        Stage::new(
            "start",
            "start request to the run committed (first activation, redb, then the starts' mirror message)",
        ),
        Stage::new(
            "start to first dispatch",
            "the run committed to its first task's dispatch",
        ),
    ];
    let mut ends = [
        Stage::new(
            "close to result",
            "the run's close to its result sent to the waiting client",
        ),
        Stage::new(
            "workflow",
            "start request to the result sent (the orchestrator's view)",
        ),
    ];
    for (run, &(t, workflow)) in &committed {
        let Some(&received) = start_in.get(workflow).filter(|&&t| inside(t)) else {
            continue;
        };
        span(&mut stages[0], Some(received), Some(t));
        span(&mut stages[1], Some(t), first_dispatch.get(run).copied());
        let close = closed.get(workflow).copied();
        let result = close.and_then(|c| results.get(workflow).and_then(|v| next_at(v, c)));
        ends[0].us.extend(
            close
                .zip(result)
                .map(|(a, b)| (b - a) as f64)
                .filter(|d| *d >= 0.0),
        );
        ends[1]
            .us
            .extend(result.map(|r| (r - received) as f64).filter(|d| *d >= 0.0));
    }
    for (activity, _, mut set) in by_activity {
        set[0].name = format!("step: {activity}");
        stages.extend(set);
    }
    stages.extend(ends);
    stages.extend(groups);
    stages
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_to_microseconds_since_the_epoch() {
        assert_eq!(parse_time_us("1970-01-01T00:00:00.000001Z"), Some(1));
        assert_eq!(
            parse_time_us("2026-12-07T14:16:12.897796Z"),
            Some(1_796_652_972_897_796)
        );
        assert_eq!(
            parse_time_us("2024-02-29T00:00:01.5Z"),
            Some(1_709_164_801_500_000)
        );
        assert_eq!(parse_time_us("not a time"), None);
    }

    #[test]
    fn a_line_with_colours_and_spans_parses_and_others_do_not() {
        let line = "\u{1b}[2m2026-12-07T14:16:12.000100Z\u{1b}[0m \u{1b}[35mTRACE\u{1b}[0m Actor{id=\"0.15\"}: \u{1b}[2mbaton::stage\u{1b}[0m\u{1b}[2m:\u{1b}[0m task.dispatch \u{1b}[3mrun\u{1b}[0m\u{1b}[2m=\u{1b}[0mr1 \u{1b}[3mseq\u{1b}[0m\u{1b}[2m=\u{1b}[0m2 \u{1b}[3mattempt\u{1b}[0m\u{1b}[2m=\u{1b}[0m1";
        let e = parse_line(line).expect("a stage event");
        assert_eq!(e.stage, "task.dispatch");
        assert_eq!(e.step(), Some(("r1".into(), 2, 1)));
        assert_eq!(e.t_us % 1_000_000, 100);
        assert!(parse_line("2026-12-07T14:16:12.000100Z  WARN baton: something").is_none());
    }

    fn ev(t_us: i64, stage: &str, fields: &[(&str, &str)]) -> StageEvent {
        StageEvent {
            t_us,
            stage: stage.into(),
            fields: fields
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// Two steps of one run, then its close and result: each stage is the gap between the
    /// events that bound it, and a step outside the windows does not count.
    #[test]
    fn stages_are_the_gaps_between_a_steps_events() {
        fn s(seq: &'static str) -> [(&'static str, &'static str); 3] {
            [("run", "r"), ("seq", seq), ("attempt", "1")]
        }
        // A dispatch also names the activity.
        let dispatch = |t, activity, seq| {
            let mut e = ev(t, "task.dispatch", &s(seq));
            e.fields.insert("activity".into(), String::from(activity));
            e
        };
        let w = [("workflow", "w"), ("run", "r")];
        let events = vec![
            ev(0, "start.received", &[("workflow", "w")]),
            ev(900, "start.committed", &w),
            dispatch(1_000, "a", "0"),
            ev(1_200, "task.received", &s("0")),
            ev(1_230, "activity.start", &s("0")),
            ev(1_240, "activity.end", &s("0")),
            ev(1_260, "report.sent", &s("0")),
            ev(1_380, "report.received", &s("0")),
            ev(1_400, "journal.append", &[("run", "r")]),
            ev(
                1_450,
                "journal.group",
                &[
                    ("writes", "1"),
                    ("redb_us", "480"),
                    ("mirror_after_us", "90"),
                    ("mirror_us", "460"),
                ],
            ),
            ev(
                1_460,
                "journal.starts",
                &[("redb_us", "500"), ("mirror_us", "400")],
            ),
            ev(1_980, "journal.appended", &[("run", "r")]),
            dispatch(2_000, "b", "1"),
            ev(2_150, "report.answered", &s("0")),
            ev(2_200, "task.received", &s("1")),
            ev(2_300, "report.received", &s("1")),
            ev(2_310, "journal.append", &[("run", "r")]),
            ev(2_900, "journal.appended", &[("run", "r")]),
            ev(2_950, "workflow.closed", &w),
            ev(3_500, "result.sent", &[("workflow", "w")]),
            ev(
                9_000,
                "task.dispatch",
                &[
                    ("activity", "c"),
                    ("run", "late"),
                    ("seq", "0"),
                    ("attempt", "1"),
                ],
            ),
        ];
        let stages = analyze(&events, &[(0, 2_100)]);
        let get = |name: &str| {
            stages
                .iter()
                .find(|s| s.name.trim() == name)
                .unwrap_or_else(|| panic!("{name}"))
                .us
                .clone()
        };
        // Each activity's steps apart, in the order of their first dispatch; a step
        // dispatched outside the windows is left out.
        let steps: Vec<&str> = stages
            .iter()
            .filter(|s| s.name.starts_with("step: "))
            .map(|s| s.name.as_str())
            .collect();
        assert_eq!(steps, ["step: a", "step: b"]);
        assert_eq!(get("step: a"), [1_000.0]);
        assert_eq!(get("step: b"), [950.0], "from its dispatch to the close");
        let b = stages.iter().position(|s| s.name == "step: b").unwrap();
        assert_eq!(stages[b + 1].us, [200.0], "b's task queue");
        assert_eq!(stages[b + 7].us, [590.0], "b's journal");
        assert!(stages[b + 5].us.is_empty(), "b's report was never sent");
        // Activity a's stages come first (get finds them).
        assert_eq!(get("task queue"), [200.0]);
        assert_eq!(get("worker: start"), [30.0]);
        assert_eq!(get("activity"), [10.0]);
        assert_eq!(get("worker: report"), [20.0]);
        assert_eq!(get("report"), [120.0]);
        assert_eq!(get("to the journal"), [20.0]);
        assert_eq!(get("journal"), [580.0]);
        assert_eq!(get("next dispatch"), [20.0]);
        assert_eq!(get("report answered"), [770.0]);
        assert_eq!(get("start"), [900.0]);
        assert_eq!(get("start to first dispatch"), [100.0]);
        assert_eq!(get("close to result"), [550.0]);
        assert_eq!(get("workflow"), [3_500.0]);
        assert_eq!(get("journal group: redb"), [480.0]);
        assert_eq!(get("journal group: mirror"), [460.0]);
        assert_eq!(get("journal starts: redb"), [500.0]);
        assert_eq!(get("journal starts: mirror"), [400.0]);
        assert_eq!(
            stages
                .iter()
                .find(|s| s.name == "step: a")
                .unwrap()
                .summary(),
            Some((1_000.0, 1_000.0))
        );
    }
}
