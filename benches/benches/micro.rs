//! Micro-benchmarks of Baton's hot paths: the codec, journal appends (one at a time and
//! grouped), replay of a long history, and an actor message round trip.
//!
//! `cargo bench -p baton-benches` (or `cargo xtask bench --micro`).

use std::{hint::black_box, sync::Arc, time::Duration};

use baton_actors::{
    ActivityDef, ActivityOptions, Execution, Registry, RetryPolicy, WorkflowContext, WorkflowError,
    history::{Event, EventKind},
    journal::{Journal, RunRecord, RunStatus},
};
use baton_transport::{
    Payload, codec,
    wire::{ActivityOutcome, ActivityReport, ActivityTask},
};
use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};

fn task() -> ActivityTask {
    ActivityTask {
        workflow_id: "bench-workflow-000001".into(),
        run_id: "5d0f6c2e9b8d4c0f8a1e7b3c2d4e5f60".into(),
        seq: 2,
        attempt: 1,
        activity: "run_inference".into(),
        queue: "gpu".into(),
        input: Payload::encode("hello world, this is a test input!").unwrap(),
        start_to_close_ms: 120_000,
        heartbeat_timeout_ms: Some(30_000),
        liveness: false,
    }
}

fn codec_benches(c: &mut Criterion) {
    let t = task();
    let bytes = codec::encode(&t).unwrap();
    c.bench_function("codec/encode_task", |b| {
        b.iter(|| codec::encode(black_box(&t)).unwrap())
    });
    c.bench_function("codec/decode_task", |b| {
        b.iter(|| codec::decode::<ActivityTask>(black_box(&bytes)).unwrap())
    });
    let report = ActivityReport {
        workflow_id: t.workflow_id.clone(),
        run_id: t.run_id.clone(),
        seq: 2,
        attempt: 1,
        worker: "gpu-host-1".into(),
        outcome: ActivityOutcome::Completed {
            result: Payload::encode(&vec![0.1f32; 384]).unwrap(),
        },
    };
    c.bench_function("codec/encode_report_384f", |b| {
        b.iter(|| codec::encode(black_box(&report)).unwrap())
    });
}

fn started(wf: &str) -> Event {
    Event {
        id: 1,
        at_ms: 1,
        kind: EventKind::WorkflowStarted {
            workflow_type: "t".into(),
            workflow_id: wf.into(),
            input: Payload::encode("x").unwrap(),
        },
    }
}

fn record(wf: &str) -> RunRecord {
    RunRecord {
        workflow_id: wf.into(),
        run_id: wf.into(),
        workflow_type: "t".into(),
        status: RunStatus::Running,
        started_ms: 1,
        closed_ms: None,
        last_event_id: 1,
        parent: None,
        deadline_ms: None,
    }
}

fn journal_benches(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let journal =
        rt.block_on(async { Journal::open(&dir.path().join("bench.redb"), None).unwrap() });
    let mut n = 0u64;
    // One start at a time: one redb commit (fsync) each.
    c.bench_function("journal/start_single", |b| {
        b.to_async(&rt).iter(|| {
            n += 1;
            let j = journal.clone();
            let id = format!("s{n}");
            async move { j.start(record(&id), started(&id)).await.unwrap() }
        })
    });
    // 64 concurrent starts: grouped into few commits by the writer.
    let mut m = 0u64;
    let mut group = c.benchmark_group("journal");
    group.throughput(criterion::Throughput::Elements(64));
    group.bench_function("start_64_concurrent", |b| {
        b.to_async(&rt).iter(|| {
            m += 1;
            let j = journal.clone();
            let base = m;
            async move {
                let starts = (0..64).map(|i| {
                    let j = j.clone();
                    let id = format!("g{base}-{i}");
                    async move { j.start(record(&id), started(&id)).await.unwrap() }
                });
                futures::future::join_all(starts).await
            }
        })
    });
    group.finish();
}

const STEP: ActivityDef<u32, u32> = ActivityDef::new("step");

async fn long(ctx: WorkflowContext, n: u32) -> Result<u32, WorkflowError> {
    let mut acc = 0;
    for i in 0..n {
        acc += ctx.activity(&STEP, &i).await?;
    }
    Ok(acc)
}

fn replay_benches(c: &mut Criterion) {
    let mut r = Registry::new();
    r.workflow("long", long).unwrap();
    let opts = ActivityOptions::new(
        "cpu",
        Duration::from_secs(5),
        RetryPolicy::exponential(Duration::from_secs(1), 2.0, 3),
    );
    r.activity(&STEP, opts.clone(), |_, i: u32| async move { Ok(i + 1) })
        .unwrap();
    let n = 1000u32;
    let mut history = vec![Event {
        id: 1,
        at_ms: 1,
        kind: EventKind::WorkflowStarted {
            workflow_type: "long".into(),
            workflow_id: "w".into(),
            input: Payload::encode(&n).unwrap(),
        },
    }];
    for i in 0..n {
        let id = history.len() as u32 + 1;
        history.push(Event {
            id,
            at_ms: 1,
            kind: EventKind::ActivityScheduled {
                seq: i,
                activity: "step".into(),
                input: Payload::encode(&i).unwrap(),
                options: opts.clone(),
            },
        });
        history.push(Event {
            id: id + 1,
            at_ms: 1,
            kind: EventKind::ActivityCompleted {
                seq: i,
                attempt: 1,
                worker: "w".into(),
                result: Payload::encode(&(i + 1)).unwrap(),
            },
        });
    }
    let run = r.workflow_def("long").unwrap().run.clone();
    let policies = r.policies().clone();
    c.bench_function("replay/history_of_1000_activities", |b| {
        b.iter_batched(
            || Execution::new(run.clone(), "w", "r", Arc::clone(&policies)),
            |mut exec| {
                for e in &history {
                    exec.apply(e).unwrap();
                }
                black_box(exec.advance().unwrap())
            },
            BatchSize::SmallInput,
        )
    });
}

struct Echo;

impl Actor for Echo {
    type Msg = RpcReplyPort<u64>;
    type State = u64;
    type Arguments = ();
    async fn pre_start(&self, _: ActorRef<Self::Msg>, _: ()) -> Result<u64, ActorProcessingErr> {
        Ok(0)
    }
    async fn handle(
        &self,
        _: ActorRef<Self::Msg>,
        reply: Self::Msg,
        n: &mut u64,
    ) -> Result<(), ActorProcessingErr> {
        *n += 1;
        let _ = reply.send(*n);
        Ok(())
    }
}

fn actor_benches(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let (actor, _) = rt.block_on(Actor::spawn(None, Echo, ())).unwrap();
    c.bench_function("actor/call_round_trip", |b| {
        b.to_async(&rt).iter(|| {
            let a = actor.clone();
            async move { ractor::call!(a, |reply| reply).unwrap() }
        })
    });
    actor.stop(None);
}

criterion_group!(
    benches,
    codec_benches,
    journal_benches,
    replay_benches,
    actor_benches
);
criterion_main!(benches);
