//! The journal under storage faults (RELIABILITY.md scenarios 17-19), on real redb files:
//! a full disk, a power loss with torn writes, and failing I/O calls. What the journal
//! acknowledged must survive each, and the journal must work again once the fault ends.

use std::{
    path::Path,
    sync::{Arc, Mutex},
    time::Duration,
};

use baton_actors::{
    history::{Event, EventKind},
    journal::{Journal, RunRecord, RunStatus, StartOutcome},
    storage::StorageFaults,
};
use baton_transport::Payload;

fn record(run: &str) -> RunRecord {
    RunRecord {
        workflow_id: format!("wf-{run}"),
        run_id: run.into(),
        workflow_type: "t".into(),
        status: RunStatus::Running,
        started_ms: 1,
        closed_ms: None,
        last_event_id: 1,
        parent: None,
        deadline_ms: None,
    }
}

fn started(run: &str) -> Event {
    Event {
        id: 1,
        at_ms: 1,
        kind: EventKind::WorkflowStarted {
            workflow_type: "t".into(),
            workflow_id: format!("wf-{run}"),
            // Some bulk, so that commits span pages.
            input: Payload::encode(&vec![run.to_string(); 40]).unwrap(),
        },
    }
}

fn completed(run: &str) -> Event {
    Event {
        id: 2,
        at_ms: 2,
        kind: EventKind::WorkflowCompleted {
            output: Payload::encode(&format!("done {run}")).unwrap(),
        },
    }
}

/// Opens the journal file again, waiting for the previous handle's writer to let go of it.
async fn reopen(path: &Path) -> Journal {
    for _ in 0..250 {
        if let Ok(j) = Journal::open(path, None) {
            return j;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    panic!("journal {} does not open again", path.display());
}

/// Every acknowledged start and completion is in the journal, with its events intact.
fn assert_holds(j: &Journal, started_runs: &[String], completed_runs: &[String]) {
    for run in started_runs {
        let r = j
            .run(run)
            .unwrap()
            .unwrap_or_else(|| panic!("acknowledged run {run} lost"));
        let h = j.history(run).unwrap();
        assert_eq!(h[0], started(run), "run {run}: first event");
        assert_eq!(h.len() as u32, r.last_event_id, "run {run}: numbering");
    }
    for run in completed_runs {
        let r = j.run(run).unwrap().unwrap();
        assert_eq!(
            r.status,
            RunStatus::Completed,
            "acknowledged close of {run} lost"
        );
        assert_eq!(j.history(run).unwrap()[1], completed(run));
    }
    // Nothing unreadable anywhere.
    for r in j.list(None, 1_000_000).unwrap() {
        j.history(&r.run_id).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_refuses_writes_and_loses_nothing_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.redb");
    let faults = StorageFaults::none();
    let j = Journal::open_with(&path, None, Some(faults.clone())).unwrap();
    let (mut starts, mut closes, mut refused) = (Vec::new(), Vec::new(), 0);
    for i in 0..140 {
        if i == 60 {
            faults.set_full(true);
        }
        if i == 80 {
            faults.set_full(false);
        }
        let run = format!("r{i}");
        match j.start(record(&run), started(&run)).await {
            Ok(StartOutcome::Started) => starts.push(run.clone()),
            Ok(other) => panic!("{run}: {other:?}"),
            Err(_) => {
                refused += 1;
                continue;
            }
        }
        if j.append(&run, vec![completed(&run)]).await.is_ok() {
            closes.push(run);
        }
    }
    assert_eq!(
        refused, 20,
        "every start while the disk was full is refused"
    );
    assert_eq!(starts.len(), 120);
    assert_eq!(closes.len(), 120);
    assert!(faults.injected() > 0);
    // The journal reopened itself when the disk had room again; reads work.
    assert_holds(&j, &starts, &closes);
    drop(j);
    // And from the file alone.
    let j = reopen(&path).await;
    assert_holds(&j, &starts, &closes);
    assert!(j.run("r70").unwrap().is_none(), "a refused start is absent");
}

#[tokio::test(flavor = "multi_thread")]
async fn power_loss_with_torn_writes_keeps_what_was_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.redb");
    let (mut all_starts, mut all_closes) = (Vec::new(), Vec::new());
    let mut undone = 0u64;
    for round in 0..8u64 {
        let faults = StorageFaults::none();
        let j = Journal::open_with(&path, None, Some(faults.clone())).unwrap();
        let starts = Arc::new(Mutex::new(Vec::new()));
        let closes = Arc::new(Mutex::new(Vec::new()));
        // 32 writers, each starting and closing runs until the power goes.
        let writers: Vec<_> = (0..32)
            .map(|w| {
                let (j, starts, closes) = (j.clone(), starts.clone(), closes.clone());
                tokio::spawn(async move {
                    for k in 0..500 {
                        let run = format!("p{round}-{w}-{k}");
                        match j.start(record(&run), started(&run)).await {
                            Ok(StartOutcome::Started) => starts.lock().unwrap().push(run.clone()),
                            _ => return,
                        }
                        match j.append(&run, vec![completed(&run)]).await {
                            Ok(()) => closes.lock().unwrap().push(run),
                            Err(_) => return,
                        }
                    }
                })
            })
            .collect();
        // The power goes in the middle of a different write each round (so mid-commit),
        // the last write torn in every other round.
        faults.power_loss_at_write(3 + round * 11, round % 2 == 0);
        for w in writers {
            w.await.unwrap();
        }
        assert!(faults.is_dead(), "round {round}: the power never went");
        undone += faults.undone();
        drop(j);
        all_starts.extend(starts.lock().unwrap().drain(..));
        all_closes.extend(closes.lock().unwrap().drain(..));
        let j = reopen(&path).await;
        assert_holds(&j, &all_starts, &all_closes);
        drop(j);
    }
    assert!(undone > 0, "the power never went mid-commit");
    assert!(
        all_closes.len() > 50,
        "too few commits to mean anything: {}",
        all_closes.len()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn failing_io_calls_are_retried_by_the_caller_and_nothing_is_doubled() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("journal.redb");
    let faults = StorageFaults::none();
    // 0.5% of the storage calls fail.
    faults.set_failure_rate(5_000);
    let j = Journal::open_with(&path, None, Some(faults.clone())).unwrap();
    let runs: Vec<String> = (0..200).map(|i| format!("f{i}")).collect();
    let mut retries = 0;
    for run in &runs {
        loop {
            // A start that failed may still have committed: retried, it is a duplicate
            // of the same run, which is success too.
            match j.start(record(run), started(run)).await {
                Ok(StartOutcome::Started) => break,
                Ok(StartOutcome::Duplicate(r)) if r.run_id == *run => break,
                Ok(other) => panic!("{run}: {other:?}"),
                Err(_) => retries += 1,
            }
        }
        loop {
            match j.append(run, vec![completed(run)]).await {
                Ok(()) => break,
                // Committed before the failure reached us: the run is closed already.
                Err(_)
                    if j.run(run).ok().flatten().map(|r| r.status)
                        == Some(RunStatus::Completed) =>
                {
                    break;
                }
                Err(_) => retries += 1,
            }
        }
    }
    assert!(
        faults.injected() > 0 && retries > 0,
        "no fault was injected"
    );
    faults.set_failure_rate(0);
    assert_holds(&j, &runs, &runs);
    drop(j);
    let j = reopen(&path).await;
    assert_holds(&j, &runs, &runs);
    assert_eq!(j.list(None, 1_000_000).unwrap().len(), runs.len());
}
