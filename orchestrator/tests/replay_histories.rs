//! Replays the histories recorded from real runs of the shipped workflows (in
//! `tests/histories/`) against the current code. A change to a shipped workflow that would
//! break its running executions fails here, in CI, not in production.

use std::{path::PathBuf, sync::Arc};

use baton_actors::history::EventKind;
use baton_orchestrator::{
    pipelines::{Models, factory},
    replay_check::{parse_history, replay, replay_file},
};

fn histories() -> Vec<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/histories");
    let mut v: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    v.sort();
    v
}

fn registry() -> baton_actors::Registry {
    // Replay runs no activity: the model is never loaded.
    factory(Arc::new(Models::new("/nonexistent-baton-home"))).unwrap()
}

#[test]
fn every_recorded_history_replays_against_the_current_code() {
    let registry = registry();
    let files = histories();
    assert!(files.len() >= 3, "recorded histories missing: {files:?}");
    for path in files {
        let report = replay_file(&registry, &path).unwrap_or_else(|e| panic!("{e:#}"));
        assert!(report.closed, "{}: recorded closed", path.display());
        assert!(
            report.next.is_empty(),
            "{}: the code would do more: {:?}",
            path.display(),
            report.next
        );
    }
}

#[test]
fn a_changed_workflow_is_caught_as_non_determinism() {
    let registry = registry();
    let path = histories()
        .into_iter()
        .find(|p| p.ends_with("hist-infer.jsonl"))
        .unwrap();
    let mut history = parse_history(&std::fs::read_to_string(path).unwrap()).unwrap();
    // As if the code had scheduled preprocess before validate_input.
    if let EventKind::ActivityScheduled { activity, .. } = &mut history[1].kind {
        *activity = "preprocess".into();
    }
    let err = replay(&registry, &history).unwrap_err().to_string();
    assert!(
        err.contains("non-determinism") && err.contains("validate_input"),
        "{err}"
    );

    // As if the code returned something else from the same recorded results.
    let path = histories()
        .into_iter()
        .find(|p| p.ends_with("hist-embed.jsonl"))
        .unwrap();
    let mut history = parse_history(&std::fs::read_to_string(path).unwrap()).unwrap();
    let last = history.len() - 1;
    history[last].kind = EventKind::WorkflowCompleted {
        output: baton_transport::Payload::encode(&serde_json::json!({"dim": 3})).unwrap(),
    };
    let err = replay(&registry, &history).unwrap_err().to_string();
    assert!(err.contains("output"), "{err}");
}

#[test]
fn an_open_history_reports_what_the_code_does_next() {
    let registry = registry();
    let path = histories()
        .into_iter()
        .find(|p| p.ends_with("hist-infer.jsonl"))
        .unwrap();
    let history = parse_history(&std::fs::read_to_string(path).unwrap()).unwrap();
    // Cut after validate_input completed (events 1-3).
    let report = replay(&registry, &history[..3]).unwrap();
    assert!(!report.closed);
    assert_eq!(report.next, vec!["schedule preprocess (seq 1)".to_string()]);
}
