//! The journal's JetStream mirror against a real nats-server: each group commit is one
//! message on the writer's subject, chained to the one before (a stale writer is refused),
//! and the two stores, which differ by at most the last group after a failed write, are
//! reconciled both ways.

use std::path::Path;

use baton_actors::{
    history::{Event, EventKind},
    journal::{Error, Journal, RunRecord, RunStatus, StartOutcome},
    storage::StorageFaults,
};
use baton_tests::{NatsServer, mirror_groups};
use baton_transport::{Payload, jetstream::Streams};
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

/// A signal whose input is about `mb` MiB.
fn large_signal(id: u32, mb: usize) -> Event {
    Event {
        id,
        at_ms: u64::from(id),
        kind: EventKind::SignalReceived {
            name: "s".into(),
            input: Payload::encode(&"x".repeat(mb << 20)).unwrap(),
            request_id: None,
        },
    }
}

/// Opens the journal at `path` once the previous writer has released the file.
async fn reopen(path: &Path, streams: &Streams) -> anyhow::Result<Journal> {
    for _ in 0..200 {
        if let Ok(j) = Journal::open(path, Some(streams.clone())) {
            return Ok(j);
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    Ok(Journal::open(path, Some(streams.clone()))?)
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
async fn each_group_commit_is_one_mirror_message_and_a_stale_writer_is_refused()
-> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let client = nats.connect().await?;
    let streams = Streams::ensure(&client).await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("journal.redb");
    let journal = Journal::open(&path, Some(streams.clone()))?;

    // 64 starts and then 64 appends at once: they commit in a few groups.
    let runs: Vec<String> = (0..64).map(|i| format!("run{i:02}")).collect();
    let starts = join_all(runs.iter().map(|r| journal.start(record(r), started(r)))).await;
    for s in starts {
        assert!(matches!(s?, StartOutcome::Started));
    }
    for r in join_all(runs.iter().map(|r| journal.append(r, vec![signal(2)]))).await {
        r?;
    }
    for run in &runs {
        assert_eq!(mirrored_events(&client, run).await?, journal.history(run)?);
    }
    let groups = mirror_groups(&client).await?;
    assert!(
        groups.len() < 128,
        "{} mirror messages for 128 writes: groups share one",
        groups.len()
    );
    assert!(groups.iter().any(|g| g.runs.len() > 1));
    for (k, g) in groups.iter().enumerate() {
        assert_eq!(g.group, k as u64 + 1, "groups are numbered in order");
        assert_eq!((g.part, g.parts), (1, 1));
    }

    // Reopened, the writer goes on from its last group, on the same subject.
    let subject = journal.mirror_subject().expect("mirrored").to_string();
    drop(journal);
    let journal = reopen(&path, &streams).await?;
    assert_eq!(journal.mirror_subject(), Some(subject.as_str()));
    journal.append("run00", vec![signal(3)]).await?;
    let last = mirror_groups(&client).await?.pop().expect("a group");
    assert_eq!(last.group, groups.len() as u64 + 1);
    assert_eq!(
        mirrored_events(&client, "run00").await?,
        journal.history("run00")?
    );

    // Another writer appended to this journal's subject: the next write is refused by the
    // chain check, and so is every later one, since the stores cannot be reconciled.
    streams
        .js
        .publish(subject, "from a stale writer".into())
        .await?
        .await?;
    let e = journal
        .append("run01", vec![signal(3)])
        .await
        .expect_err("the stale append is refused");
    assert!(matches!(e, Error::Mirror(_)), "{e}");
    assert!(journal.unreconciled());
    let e = journal
        .reconcile_mirror()
        .await
        .expect_err("a foreign message cannot be reconciled");
    assert!(e.to_string().contains("another writer"), "{e}");
    assert!(journal.append("run02", vec![signal(3)]).await.is_err());
    Ok(())
}

/// A group's mirror publish overlaps its redb commit. When the commit fails (a full disk)
/// and the publish held, the mirror is one group ahead: the append is refused, and the
/// reconciliation adopts the mirror's message into redb, after which the two stores agree
/// and the run goes on.
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
    assert!(journal.unreconciled());

    journal.reconcile_mirror().await?;
    assert!(!journal.unreconciled());
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

/// A start whose commit fails (a full disk) leaves nothing anywhere: its caller is told
/// `unavailable`, so its run must never appear. Unlike an append's, a start's mirror message
/// is published only once redb has committed it; published while redb commits (a version
/// that measured 5-12% faster), the reconciliation adopted the refused run and it ran.
#[tokio::test(flavor = "multi_thread")]
async fn a_start_refused_on_a_full_disk_leaves_nothing_in_either_store() -> anyhow::Result<()> {
    let (_nats, client, _dir, faults, journal) = journal_with_faults().await?;
    faults.set_full(true);
    let refused = journal.start(record("solo"), started("solo")).await;
    faults.set_full(false);
    assert!(refused.is_err(), "a full disk refuses the start");
    assert!(
        mirrored_events(&client, "solo").await?.is_empty(),
        "nothing was published"
    );
    journal.reconcile_mirror().await?;
    assert!(journal.run("solo")?.is_none(), "nothing was adopted");
    assert!(journal.open_runs()?.is_empty());
    // The ID is free: the start sent again creates the run, in both stores.
    assert!(matches!(
        journal.start(record("solo"), started("solo")).await?,
        StartOutcome::Started
    ));
    journal.append("solo", vec![signal(2)]).await?;
    assert_eq!(
        mirrored_events(&client, "solo").await?,
        journal.history("solo")?
    );
    assert_eq!(journal.history("solo")?.len(), 2);
    Ok(())
}

/// Starts and appends of many runs committed together: when the commit fails (a full
/// disk), the appends whose publish held are adopted, while the starts (mirrored only once
/// redb has committed them) leave nothing in either store; every run goes on.
#[tokio::test(flavor = "multi_thread")]
async fn a_group_of_starts_and_appends_whose_commit_failed_is_adopted() -> anyhow::Result<()> {
    let (_nats, client, _dir, faults, journal) = journal_with_faults().await?;
    let runs: Vec<String> = (0..20).map(|i| format!("g{i:02}")).collect();
    for s in join_all(runs.iter().map(|r| journal.start(record(r), started(r)))).await {
        assert!(matches!(s?, StartOutcome::Started));
    }
    for r in join_all(runs.iter().map(|r| journal.append(r, vec![signal(2)]))).await {
        r?;
    }

    faults.set_full(true);
    let late: Vec<String> = (0..3).map(|i| format!("late{i}")).collect();
    let (appended, starts) = futures::join!(
        join_all(runs.iter().map(|r| journal.append(r, vec![signal(3)]))),
        join_all(late.iter().map(|r| journal.start(record(r), started(r)))),
    );
    faults.set_full(false);
    assert!(
        appended.iter().all(Result::is_err),
        "a full disk refuses them"
    );
    assert!(
        starts.iter().all(Result::is_err),
        "a full disk refuses them"
    );
    // The first group failed with its publish held; any later one was refused before it
    // was written anywhere (the stores are reconciled first, which failed too).
    let ahead: Vec<&String> = {
        let mirror = baton_tests::read_mirror(&client).await?;
        runs.iter()
            .chain(&late)
            .filter(|r| {
                mirror
                    .get(*r)
                    .is_some_and(|e| e.len() > journal.history(r).unwrap().len())
            })
            .collect()
    };
    assert!(!ahead.is_empty(), "the mirror holds the failed group");

    journal.reconcile_mirror().await?;
    for run in runs.iter().chain(&late) {
        assert_eq!(
            mirrored_events(&client, run).await?,
            journal.history(run)?,
            "{run}"
        );
    }
    for run in &ahead {
        let record = journal.run(run)?.expect("adopted");
        assert_eq!(record.status, RunStatus::Running);
        assert_eq!(record.last_event_id, 3);
    }
    for run in &late {
        assert!(
            journal.run(run)?.is_none(),
            "{run}: a refused start is not in redb"
        );
        assert!(
            mirrored_events(&client, run).await?.is_empty(),
            "{run}: nor in the mirror"
        );
    }
    assert_eq!(journal.open_runs()?.len(), runs.len());

    // The runs go on, in both stores.
    for run in &runs {
        let next = journal.run(run)?.unwrap().last_event_id + 1;
        journal.append(run, vec![signal(next)]).await?;
        assert_eq!(mirrored_events(&client, run).await?, journal.history(run)?);
    }
    Ok(())
}

/// A group whose mirror publish failed (the NATS server down) is in redb only: the
/// reconciliation publishes it again once the server is back.
#[tokio::test(flavor = "multi_thread")]
async fn redb_ahead_of_a_failed_publish_is_published_again() -> anyhow::Result<()> {
    let (mut nats, client, _dir, _faults, journal) = journal_with_faults().await?;
    let run = "behind";
    journal.start(record(run), started(run)).await?;
    journal.append(run, vec![signal(2)]).await?;

    nats.kill();
    let e = journal
        .append(run, vec![signal(3)])
        .await
        .expect_err("no mirror, no acknowledgement");
    assert!(matches!(e, Error::Mirror(_)), "{e}");
    assert_eq!(journal.history(run)?.len(), 3, "redb committed");
    assert!(journal.unreconciled());
    assert!(
        journal.reconcile_mirror().await.is_err(),
        "the server is down"
    );

    nats.restart().await?;
    let mut reconciled = journal.reconcile_mirror().await;
    for _ in 0..100 {
        if reconciled.is_ok() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        reconciled = journal.reconcile_mirror().await;
    }
    reconciled?;
    assert_eq!(mirrored_events(&client, run).await?, journal.history(run)?);
    journal.append(run, vec![signal(4)]).await?;
    assert_eq!(mirrored_events(&client, run).await?, journal.history(run)?);
    Ok(())
}

/// A group too large for one message is mirrored in parts (a run's events split between
/// them); an event too large for any message is refused before anything is written.
#[tokio::test(flavor = "multi_thread")]
async fn a_large_group_is_mirrored_in_parts_and_an_oversize_event_is_refused() -> anyhow::Result<()>
{
    let (_nats, client, _dir, _faults, journal) = journal_with_faults().await?;
    let run = "large";
    journal.start(record(run), started(run)).await?;
    // Two events of 5 MiB: over the server's 8 MB message limit together.
    journal
        .append(run, vec![large_signal(2, 5), large_signal(3, 5)])
        .await?;
    let last = mirror_groups(&client).await?.pop().expect("a group");
    assert_eq!((last.part, last.parts), (2, 2), "one group in two parts");
    assert_eq!(mirrored_events(&client, run).await?, journal.history(run)?);

    let e = journal
        .append(run, vec![signal(4), large_signal(5, 9)])
        .await
        .expect_err("over the message limit");
    assert!(matches!(e, Error::Invalid(_)), "{e}");
    assert!(e.to_string().contains("message limit"), "{e}");
    assert_eq!(journal.history(run)?.len(), 3, "nothing of it was written");
    journal.append(run, vec![signal(4)]).await?;
    assert_eq!(mirrored_events(&client, run).await?, journal.history(run)?);
    Ok(())
}

/// A publish whose commit failed can reach the server late: after the reconciliation that
/// followed the failure found the stores equal, and before the next group, which then
/// takes the same number in redb and is refused by the chain check. The next
/// reconciliation tells the late message from redb's group by the transaction's nonce,
/// takes it out, and publishes redb's group in its place.
#[tokio::test(flavor = "multi_thread")]
async fn a_late_message_of_a_failed_commit_is_replaced_by_the_group_redb_holds()
-> anyhow::Result<()> {
    let (_nats, client, _dir, faults, journal) = journal_with_faults().await?;
    let subject = journal.mirror_subject().expect("mirrored").to_string();
    let js = async_nats::jetstream::new(client.clone());
    let stream = js
        .get_stream(baton_transport::subject::HISTORY_STREAM)
        .await?;
    let run = "late";
    journal.start(record(run), started(run)).await?;
    journal.append(run, vec![signal(2)]).await?;

    // A commit fails; its publish is held back (taken out of the stream here, to land
    // later).
    faults.set_full(true);
    assert!(journal.append(run, vec![signal(3)]).await.is_err());
    faults.set_full(false);
    let late = stream.get_last_raw_message_by_subject(&subject).await?;
    stream.delete_message(late.sequence).await?;
    journal.reconcile_mirror().await?;
    assert_eq!(journal.history(run)?.len(), 2, "nothing to adopt");

    // It lands now, chained to the mirror's last message, before the next group.
    let head = stream.get_last_raw_message_by_subject(&subject).await?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(
        async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
        head.sequence.to_string().as_str(),
    );
    js.publish_with_headers(subject.clone(), headers, late.payload.clone())
        .await?
        .await?;
    let timer = Event {
        id: 3,
        at_ms: 3,
        kind: EventKind::TimerFired { seq: 9 },
    };
    let e = journal
        .append(run, vec![timer.clone()])
        .await
        .expect_err("the chain check refuses the group after the late message");
    assert!(matches!(e, Error::Mirror(_)), "{e}");
    assert_eq!(
        journal.history(run)?.last(),
        Some(&timer),
        "redb committed it"
    );

    journal.reconcile_mirror().await?;
    assert_eq!(mirrored_events(&client, run).await?, journal.history(run)?);
    journal.append(run, vec![signal(4)]).await?;
    assert_eq!(mirrored_events(&client, run).await?, journal.history(run)?);
    assert_eq!(journal.history(run)?.len(), 4);
    Ok(())
}
