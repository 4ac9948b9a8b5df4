//! Replaying recorded histories against the current code: `baton replay <file>` and the
//! test that replays the histories shipped in `orchestrator/tests/histories/`, so a change
//! that breaks running executions of a shipped workflow fails CI instead of production.

use std::path::Path;

use anyhow::{Context, bail};
use baton_actors::{Command, Execution, Registry, history::Event};

/// What a replay found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReplayReport {
    /// The workflow type replayed.
    pub workflow_type: String,
    /// Events replayed.
    pub events: usize,
    /// Whether the history is closed (the code reached the same end).
    pub closed: bool,
    /// What the code would do next, for an open history.
    pub next: Vec<String>,
}

/// Parses a recorded history: the JSON object of `baton.api.history` /
/// `baton history --json` (`{"events": [...]}`), or one event per line as `baton history`
/// prints them.
pub fn parse_history(text: &str) -> anyhow::Result<Vec<Event>> {
    let trimmed = text.trim_start();
    let values: Vec<serde_json::Value> = if trimmed.starts_with('{')
        && serde_json::from_str::<serde_json::Value>(trimmed)
            .is_ok_and(|v| v.get("events").is_some())
    {
        let v: serde_json::Value = serde_json::from_str(trimmed)?;
        v["events"].as_array().cloned().unwrap_or_default()
    } else {
        trimmed
            .lines()
            .filter(|l| !l.trim().is_empty())
            .map(serde_json::from_str)
            .collect::<Result<_, _>>()
            .context("one JSON event per line")?
    };
    values
        .iter()
        .map(|v| Event::from_json(v).map_err(anyhow::Error::msg))
        .collect()
}

/// Replays `history` against the workflows of `registry`. A non-determinism is an `Err`.
pub fn replay(registry: &Registry, history: &[Event]) -> anyhow::Result<ReplayReport> {
    let Some(first) = history.first() else {
        bail!("the history is empty")
    };
    let (workflow_type, workflow_id) = match &first.kind {
        baton_actors::history::EventKind::WorkflowStarted {
            workflow_type,
            workflow_id,
            ..
        } => (workflow_type.clone(), workflow_id.clone()),
        other => bail!(
            "the history starts with {} instead of workflow_started",
            other.name()
        ),
    };
    let def = registry
        .workflow_def(&workflow_type)
        .with_context(|| format!("workflow type {workflow_type:?} is not registered"))?;
    let mut exec = Execution::new(
        def.run.clone(),
        &workflow_id,
        "replay",
        registry.policies().clone(),
    );
    let ahead = exec.replay(history).map_err(|e| anyhow::anyhow!("{e}"))?;
    let closed = history.last().is_some_and(|e| e.kind.is_close());
    let next = ahead
        .iter()
        .map(|c| match c {
            Command::ScheduleActivity { seq, activity, .. } => {
                format!("schedule {activity} (seq {seq})")
            }
            Command::StartTimer { seq, duration_ms } => {
                format!("sleep {duration_ms} ms (seq {seq})")
            }
            Command::CancelTimer { seq } => format!("cancel the timer (seq {seq})"),
            Command::RecordMarker { patch } => format!("record patch {patch}"),
            Command::StartChild {
                seq,
                workflow_type,
                workflow_id,
                ..
            } => format!("start child {workflow_type} {workflow_id} (seq {seq})"),
            Command::SignalExternal {
                seq,
                workflow_id,
                name,
                ..
            } => format!("signal {name} to {workflow_id} (seq {seq})"),
            Command::CompleteWorkflow { .. } => "complete".into(),
            Command::FailWorkflow { failure } => format!("fail with {}", failure.kind),
            Command::ContinueAsNew { .. } => "continue as new".into(),
        })
        .collect();
    Ok(ReplayReport {
        workflow_type,
        events: history.len(),
        closed,
        next,
    })
}

/// Reads and replays a history file.
pub fn replay_file(registry: &Registry, path: &Path) -> anyhow::Result<ReplayReport> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let history = parse_history(&text).with_context(|| format!("parsing {}", path.display()))?;
    replay(registry, &history).with_context(|| format!("replaying {}", path.display()))
}
