//! The journal's JetStream mirror against a real nats-server: a group commit's messages go
//! in one atomic batch, each still chained to its run's previous message, so a stale
//! writer's append is refused and the rest of its group is stored.

use baton_actors::{
    history::{Event, EventKind},
    journal::{Journal, RunRecord, RunStatus, StartOutcome},
    storage::StorageFaults,
};
use baton_tests::NatsServer;
use baton_transport::{Payload, jetstream::Streams, subject};
use futures::future::join_all;

use crate::cluster::mirrored_events;

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
            input: Payload::encode(&run).unwrap(),
        },
    }
}

fn signal(id: u32) -> Event {
    Event {
        id,
        at_ms: u64::from(id),
        kind: EventKind::SignalReceived {
            name: "s".into(),
            input: Payload::encode(&id).unwrap(),
            request_id: None,
        },
    }
}

/// A journal mirrored to a fresh nats-server, over storage whose faults the test injects.
/// The server and the directory live as long as the returned guards.
async fn journal_with_faults() -> anyhow::Result<(
    NatsServer,
    async_nats::Client,
    tempfile::TempDir,
    std::sync::Arc<StorageFaults>,
    Journal,
)> {
    let nats = NatsServer::start().await?;
    let client = nats.connect().await?;
    let streams = Streams::ensure(&client).await?;
    let dir = tempfile::tempdir()?;
    let faults = StorageFaults::none();
    let journal = Journal::open_with(
        &dir.path().join("journal.redb"),
        Some(streams),
        Some(faults.clone()),
    )?;
    Ok((nats, client, dir, faults, journal))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_group_commit_is_mirrored_in_atomic_batches_and_a_stale_writer_is_refused()
-> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = nats.connect().await?;
    let streams = Streams::ensure(&client).await?;
    assert!(streams.history_takes_batches());
    let dir = tempfile::tempdir()?;
    let journal = Journal::open(&dir.path().join("journal.redb"), Some(streams.clone()))?;

    // 64 starts and then 64 appends at once: they commit in a few groups.
    let runs: Vec<String> = (0..64).map(|i| format!("run{i:02}")).collect();
    let starts = join_all(runs.iter().map(|r| journal.start(record(r), started(r)))).await;
    for s in starts {
        assert!(matches!(s?, StartOutcome::Started));
    }
    for r in join_all(runs.iter().map(|r| journal.append(r, vec![signal(2)]))).await {
        r?;
    }
    let mut batched = 0;
    for run in &runs {
        assert_eq!(mirrored_events(&client, run).await?, journal.history(run)?);
        let last = streams
            .history
            .get_last_raw_message_by_subject(&subject::history(run))
            .await?;
        if last
            .headers
            .get(async_nats::header::NATS_BATCH_ID)
            .is_some()
        {
            batched += 1;
        }
    }
    // The first append of a group may be alone in it; most share batches.
    assert!(
        batched >= 32,
        "only {batched} of 64 appends went in a batch"
    );

    // Another writer appended to run07's mirror: this journal's next append of run07
    // is stale and refused (its whole batch is, too); the others of its group are stored
    // one message each, and only run07's append reports the failure.
    streams
        .js
        .publish(subject::history("run07"), "from a stale writer".into())
        .await?
        .await?;
    let results = join_all(runs.iter().map(|r| journal.append(r, vec![signal(3)]))).await;
    for (run, r) in runs.iter().zip(results) {
        if run == "run07" {
            let e = r.expect_err("the stale append is refused");
            assert!(e.to_string().contains("run07"), "{e}");
        } else {
            r?;
            assert_eq!(mirrored_events(&client, run).await?, journal.history(run)?);
        }
    }
    Ok(())
}

/// A lone append's mirror publish overlaps its redb commit. When the commit fails (a full
/// disk) and the publish held, the mirror is one append ahead: the append is refused, and
/// reconciling the run adopts the mirror's message into redb, after which the two stores
/// agree and the run goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_mirror_ahead_of_a_failed_commit_is_adopted_by_the_reconciliation() -> anyhow::Result<()>
{
    let (_nats, client, _dir, faults, journal) = journal_with_faults().await?;
    let run = "ahead";
    assert!(matches!(
        journal.start(record(run), started(run)).await?,
        StartOutcome::Started
    ));
    journal.append(run, vec![signal(2)]).await?;
    assert_eq!(mirrored_events(&client, run).await?, journal.history(run)?);

    faults.set_full(true);
    let refused = journal.append(run, vec![signal(3)]).await;
    assert!(refused.is_err(), "a full disk refuses the append");
    faults.set_full(false);
    let mirrored = mirrored_events(&client, run).await?;
    assert_eq!(
        mirrored.iter().map(|e| e.id).collect::<Vec<_>>(),
        [1, 2, 3],
        "the overlapped publish held"
    );
    assert_eq!(journal.history(run)?.len(), 2, "redb did not commit");

    journal.reconcile_mirror(run).await?;
    assert_eq!(
        journal.history(run)?,
        mirrored,
        "redb adopted the mirror's append"
    );
    assert_eq!(journal.run(run)?.unwrap().last_event_id, 3);
    // The chain head was learnt: the run goes on, in both stores.
    journal.append(run, vec![signal(4)]).await?;
    journal.append(run, vec![signal(5)]).await?;
    assert_eq!(mirrored_events(&client, run).await?, journal.history(run)?);
    assert_eq!(journal.history(run)?.len(), 5);
    Ok(())
}

/// Appends of many runs committed together have their mirror publishes overlap the redb
/// commit too (an atomic batch for a large group, pipelined messages for a small one),
/// while starts in the same group are mirrored after redb decided them. When the commit
/// fails (a full disk), every run whose message the mirror stored is one append ahead,
/// and the reconciliation adopts each.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_of_overlapped_appends_whose_commit_failed_is_adopted() -> anyhow::Result<()> {
    let (_nats, client, _dir, faults, journal) = journal_with_faults().await?;
    for n in [20usize, 4] {
        let runs: Vec<String> = (0..n).map(|i| format!("g{n}-{i:02}")).collect();
        for s in join_all(runs.iter().map(|r| journal.start(record(r), started(r)))).await {
            assert!(matches!(s?, StartOutcome::Started));
        }
        // Appends and new starts at once: they share groups.
        let late: Vec<String> = (0..3).map(|i| format!("g{n}-late{i}")).collect();
        let (appended, starts) = futures::join!(
            join_all(runs.iter().map(|r| journal.append(r, vec![signal(2)]))),
            join_all(late.iter().map(|r| journal.start(record(r), started(r)))),
        );
        for r in appended {
            r?;
        }
        for s in starts {
            assert!(matches!(s?, StartOutcome::Started));
        }
        for run in runs.iter().chain(&late) {
            assert_eq!(mirrored_events(&client, run).await?, journal.history(run)?);
        }

        faults.set_full(true);
        let refused = join_all(runs.iter().map(|r| journal.append(r, vec![signal(3)]))).await;
        faults.set_full(false);
        assert!(
            refused.iter().all(Result::is_err),
            "a full disk refuses them"
        );
        for run in &runs {
            let mirrored = mirrored_events(&client, run).await?;
            assert_eq!(
                mirrored.iter().map(|e| e.id).collect::<Vec<_>>(),
                [1, 2, 3],
                "{run}: the overlapped publish held"
            );
            assert_eq!(journal.history(run)?.len(), 2, "{run}: redb did not commit");
            assert!(journal.unreconciled(run), "{run} is marked");
            journal.reconcile_mirror(run).await?;
            assert_eq!(journal.history(run)?, mirrored, "{run}: adopted");
        }
        // The runs go on, in both stores.
        for r in join_all(runs.iter().map(|r| journal.append(r, vec![signal(4)]))).await {
            r?;
        }
        for run in &runs {
            assert_eq!(mirrored_events(&client, run).await?, journal.history(run)?);
            assert_eq!(journal.history(run)?.len(), 4);
        }
    }
    Ok(())
}
