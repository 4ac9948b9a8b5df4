//! The runtime in-process with workflows of the test's own, against a real nats-server and
//! a real redb journal: durable timers across an orchestrator restart, the
//! schedule-to-close deadline of an activity no worker serves, and a run whose code changed
//! under it (blocked by non-determinism: refuses signals, can be terminated).

use std::{path::Path, sync::Arc, time::Duration};

use baton_actors::{
    ActivityDef, ActivityOptions, Registry, RetryPolicy, WorkflowContext, WorkflowError,
    node::{NodeOptions, Orchestrator},
    worker::{PoolOptions, start_pool},
};
use baton_tests::{Client, NatsServer};
use baton_transport::{jetstream::Streams, wire::ResultReply};
use serde_json::json;

use crate::cluster::{WAIT, events, of_type};

const ECHO: ActivityDef<String, String> = ActivityDef::new("echo");
const UNSERVED: ActivityDef<String, String> = ActivityDef::new("unserved");
const PANICKY: ActivityDef<String, u32> = ActivityDef::new("panicky");
const SLOW: ActivityDef<u64, u64> = ActivityDef::new("slow");

/// Sleeps on a durable timer between two activities; returns how long it slept by
/// workflow time.
async fn nap(ctx: WorkflowContext, ms: u64) -> Result<u64, WorkflowError> {
    ctx.activity(&ECHO, &"before".to_string()).await?;
    let t0 = ctx.now_ms();
    ctx.sleep(Duration::from_millis(ms)).await?;
    let slept = ctx.now_ms() - t0;
    ctx.activity(&ECHO, &"after".to_string()).await?;
    Ok(slept)
}

/// Calls an activity on a queue no worker serves; handles its deadline.
async fn deadline(ctx: WorkflowContext, _: ()) -> Result<String, WorkflowError> {
    match ctx.activity(&UNSERVED, &"x".to_string()).await {
        Ok(_) => Ok("served?".into()),
        Err(e) => Ok(format!("fallback after {}", e.kind)),
    }
}

/// Adds the `add` signals until one of 0; answers the query `total`.
async fn counter(ctx: WorkflowContext, _: ()) -> Result<i64, WorkflowError> {
    let total = Arc::new(std::sync::Mutex::new(0i64));
    let t = total.clone();
    ctx.on_query("total", move || *t.lock().unwrap());
    loop {
        let n: i64 = ctx.signal("add").await?;
        if n == 0 {
            break;
        }
        *total.lock().unwrap() += n;
    }
    let v = *total.lock().unwrap();
    Ok(v)
}

/// One activity that panics on its first attempt, then one that takes a while.
async fn rough(ctx: WorkflowContext, ms: u64) -> Result<(u32, u64), WorkflowError> {
    let attempt = ctx.activity(&PANICKY, &"x".to_string()).await?;
    let slept = ctx.activity(&SLOW, &ms).await?;
    Ok((attempt, slept))
}

/// Waits on a long durable timer: the code of `patient` before a change.
async fn patient(ctx: WorkflowContext, _: ()) -> Result<u32, WorkflowError> {
    ctx.sleep(Duration::from_secs(600)).await?;
    Ok(1)
}

/// `patient` after a change its running executions cannot replay: an activity where the
/// timer was.
async fn patient_changed(ctx: WorkflowContext, _: ()) -> Result<u32, WorkflowError> {
    ctx.activity(&ECHO, &"x".to_string()).await?;
    Ok(2)
}

fn registry() -> Registry {
    let mut r = common_registry();
    r.workflow("patient", patient).unwrap();
    r
}

/// The test registry with `patient` changed.
fn registry_changed() -> Registry {
    let mut r = common_registry();
    r.workflow("patient", patient_changed).unwrap();
    r
}

fn common_registry() -> Registry {
    let retry = RetryPolicy::exponential(Duration::from_millis(200), 2.0, 5);
    let mut r = Registry::new();
    r.workflow("nap", nap).unwrap();
    r.workflow("deadline", deadline).unwrap();
    r.workflow("counter", counter).unwrap();
    r.workflow("rough", rough).unwrap();
    let quick = RetryPolicy::exponential(Duration::from_millis(100), 2.0, 3);
    r.activity(
        &PANICKY,
        ActivityOptions::new("rt-cpu", Duration::from_secs(10), quick.clone()),
        |ctx: baton_actors::ActivityContext, _: String| async move {
            let attempt = ctx.info().attempt;
            if attempt == 1 {
                panic!("deliberate panic in attempt 1");
            }
            Ok(attempt)
        },
    )
    .unwrap();
    // Waits `ms` while heartbeating: a long activity, for killing its pool mid-way.
    r.activity(
        &SLOW,
        ActivityOptions::new("rt-cpu", Duration::from_secs(30), quick),
        |ctx: baton_actors::ActivityContext, ms: u64| async move {
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_millis(ms) {
                ctx.heartbeat();
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            Ok(start.elapsed().as_millis() as u64)
        },
    )
    .unwrap();
    r.activity(
        &ECHO,
        ActivityOptions::new("rt-cpu", Duration::from_secs(10), retry.clone()),
        |_, s: String| async move { Ok(s) },
    )
    .unwrap();
    r.activity(
        &UNSERVED,
        ActivityOptions::new("nobody", Duration::from_secs(10), retry)
            .schedule_to_close(Duration::from_millis(1500)),
        |_, s: String| async move { Ok(s) },
    )
    .unwrap();
    r
}

async fn orchestrator(client: &async_nats::Client, dir: &Path) -> Orchestrator {
    start_node(client, dir, registry).await
}

/// An orchestrator node in this process serving the workflows of `registry`.
pub(crate) async fn start_node(
    client: &async_nats::Client,
    dir: &Path,
    registry: fn() -> Registry,
) -> Orchestrator {
    start_node_with(client, NodeOptions::new(dir), registry).await
}

/// An orchestrator node in this process with `options`.
pub(crate) async fn start_node_with(
    client: &async_nats::Client,
    options: NodeOptions,
    registry: fn() -> Registry,
) -> Orchestrator {
    // The previous node of this process may still be releasing the journal file.
    for _ in 0..100 {
        match Orchestrator::start(client.clone(), registry(), options.clone()).await {
            Ok(o) => return o,
            Err(e) => {
                eprintln!("orchestrator not started yet: {e}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
    panic!("the orchestrator did not start");
}

/// A worker pool of the test registry on the `rt-cpu` queue.
async fn rt_pool(
    nc: &async_nats::Client,
    concurrency: usize,
) -> anyhow::Result<baton_actors::worker::PoolHandle> {
    start_test_pool(nc, registry(), "rt-cpu", concurrency).await
}

/// A worker pool in this process serving `queue` with the activities of `registry`.
pub(crate) async fn start_test_pool(
    nc: &async_nats::Client,
    registry: Registry,
    queue: &str,
    concurrency: usize,
) -> anyhow::Result<baton_actors::worker::PoolHandle> {
    let streams = Streams::ensure(nc).await?;
    start_pool(
        streams,
        Arc::new(registry),
        PoolOptions {
            queue: queue.into(),
            concurrency,
            worker_id: format!("{queue}-worker"),
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
}

/// Waits until the workflow's journal holds at least `count` events of type `ty`.
pub(crate) async fn wait_for_events(
    client: &Client,
    workflow_id: &str,
    ty: &str,
    count: usize,
) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + WAIT;
    while of_type(&events(client, workflow_id).await?, ty).len() < count {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "{workflow_id}: {count} {ty} events never journaled"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn durable_timers_fire_after_an_orchestrator_restart() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let nc = nats.connect().await?;
    let dir = tempfile::tempdir()?;
    let pool = rt_pool(&nc, 4).await?;
    let client = Client::new(nc.clone());

    let node = orchestrator(&nc, dir.path()).await;
    client
        .start("nap", Some("nap-1"), json!(2000))
        .await?
        .into_result()
        .unwrap();
    // Wait until the timer is journaled, then stop the node mid-sleep.
    wait_for_events(&client, "nap-1", "timer_started", 1).await?;
    node.stop().await;
    let node = orchestrator(&nc, dir.path()).await;
    assert_eq!(node.recovered(), 1);

    let slept = match client.wait_result("nap-1", WAIT).await? {
        ResultReply::Completed { output } => output.as_u64().unwrap(),
        other => panic!("{other:?}"),
    };
    assert!(slept >= 2000, "woke after {slept} ms of a 2000 ms sleep");
    let evs = events(&client, "nap-1").await?;
    assert_eq!(of_type(&evs, "timer_started").len(), 1);
    assert_eq!(of_type(&evs, "timer_fired").len(), 1);
    let fire_at = of_type(&evs, "timer_started")[0]["fire_at_ms"]
        .as_u64()
        .unwrap();
    let fired = of_type(&evs, "timer_fired")[0]["at_ms"].as_u64().unwrap();
    assert!(
        fired >= fire_at,
        "fired at {fired}, due at {fire_at}: never early"
    );
    node.stop().await;
    pool.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn schedule_to_close_fails_an_activity_no_worker_serves() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let nc = nats.connect().await?;
    let dir = tempfile::tempdir()?;
    let node = orchestrator(&nc, dir.path()).await;
    let client = Client::new(nc.clone());
    client
        .start("deadline", Some("dl-1"), json!(null))
        .await?
        .into_result()
        .unwrap();
    match client.wait_result("dl-1", WAIT).await? {
        ResultReply::Completed { output } => {
            assert_eq!(output, "fallback after ScheduleToCloseTimeout")
        }
        other => panic!("{other:?}"),
    }
    let evs = events(&client, "dl-1").await?;
    let failed = of_type(&evs, "activity_failed");
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["worker"], "orchestrator");
    let scheduled_at = of_type(&evs, "activity_scheduled")[0]["at_ms"]
        .as_u64()
        .unwrap();
    assert!(
        failed[0]["at_ms"].as_u64().unwrap() >= scheduled_at + 1500,
        "not before the deadline"
    );
    node.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn signals_and_queries_survive_a_restart() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let nc = nats.connect().await?;
    let dir = tempfile::tempdir()?;
    let client = Client::new(nc.clone());
    let node = orchestrator(&nc, dir.path()).await;
    let signal = |n: i64| {
        let c = client.clone();
        async move {
            let body = json!({"workflow_id": "count-1", "name": "add", "input": n});
            c.request_json("baton.api.signal", &body, baton_tests::REQUEST_TIMEOUT)
                .await
        }
    };
    let query = |name: &'static str| {
        let c = client.clone();
        async move {
            let body = json!({"workflow_id": "count-1", "name": name});
            c.request_json("baton.api.query", &body, baton_tests::REQUEST_TIMEOUT)
                .await
        }
    };

    let missing = signal(1).await?;
    assert_eq!(missing["error"]["code"], "not_found", "{missing}");
    client
        .start("counter", Some("count-1"), json!(null))
        .await?
        .into_result()
        .unwrap();
    for n in [3, 4] {
        let r = signal(n).await?;
        assert!(r["run_id"].is_string(), "{r}");
    }
    assert_eq!(query("total").await?["result"], 7);
    let unknown = query("average").await?;
    assert_eq!(unknown["error"]["code"], "unknown_query", "{unknown}");

    // Signals are journaled: a restarted node has them.
    node.stop().await;
    let node = orchestrator(&nc, dir.path()).await;
    assert_eq!(query("total").await?["result"], 7);
    signal(5).await?;
    signal(0).await?;
    match client.wait_result("count-1", WAIT).await? {
        ResultReply::Completed { output } => assert_eq!(output, 12),
        other => panic!("{other:?}"),
    }
    // A closed run answers queries from its replayed state, and takes no more signals.
    assert_eq!(query("total").await?["result"], 12);
    let closed = signal(1).await?;
    assert_eq!(closed["error"]["code"], "workflow_closed", "{closed}");
    assert_eq!(
        of_type(&events(&client, "count-1").await?, "signal_received").len(),
        4
    );
    node.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_blocked_by_changed_code_refuses_signals_and_can_be_terminated() -> anyhow::Result<()>
{
    let nats = NatsServer::start().await?;
    let nc = nats.connect().await?;
    let dir = tempfile::tempdir()?;
    let client = Client::new(nc.clone());
    let node = orchestrator(&nc, dir.path()).await;
    client
        .start("patient", Some("patient-1"), json!(null))
        .await?
        .into_result()
        .unwrap();
    wait_for_events(&client, "patient-1", "timer_started", 1).await?;
    node.stop().await;

    // The code changes under the waiting run: its replay no longer matches the journal.
    let node = start_node(&nc, dir.path(), registry_changed).await;
    assert_eq!(node.recovered(), 1);
    let signal = json!({"workflow_id": "patient-1", "name": "poke", "input": 1});
    let refused = client
        .request_json("baton.api.signal", &signal, baton_tests::REQUEST_TIMEOUT)
        .await?;
    assert!(
        refused["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("non-determinism")),
        "{refused}"
    );
    // Nothing was recorded for the refused signal; a terminate still closes the run.
    let terminate = json!({"workflow_id": "patient-1", "reason": "code changed"});
    let closed = client
        .request_json(
            "baton.api.terminate",
            &terminate,
            baton_tests::REQUEST_TIMEOUT,
        )
        .await?;
    assert!(closed.get("error").is_none(), "{closed}");
    assert_eq!(
        client.history_types("patient-1").await?,
        ["workflow_started", "timer_started", "workflow_terminated"]
    );
    node.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn panicking_runners_and_killed_pools_lose_nothing() -> anyhow::Result<()> {
    let nats = NatsServer::start().await?;
    let nc = nats.connect().await?;
    let dir = tempfile::tempdir()?;
    let pool = rt_pool(&nc, 2).await?;
    let client = Client::new(nc.clone());
    let node = orchestrator(&nc, dir.path()).await;
    client
        .start("rough", Some("rough-1"), json!(1500))
        .await?
        .into_result()
        .unwrap();

    // Wait until the slow activity runs, then kill the pool actor under it.
    wait_for_events(&client, "rough-1", "activity_scheduled", 2).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    pool.pool().await.expect("a pool runs").kill();

    let (attempt, slept): (u32, u64) = match client.wait_result("rough-1", WAIT).await? {
        ResultReply::Completed { output } => serde_json::from_value(output)?,
        other => panic!("{other:?}"),
    };
    assert_eq!(attempt, 2, "the panicking attempt was retried");
    assert!(slept >= 1500);
    assert_eq!(pool.restarts().await, 1, "the killed pool was replaced");
    let evs = events(&client, "rough-1").await?;
    let failed = of_type(&evs, "activity_failed");
    assert_eq!(failed.len(), 1, "{failed:?}");
    assert_eq!(failed[0]["failure"]["kind"], "ActivityPanic");
    assert_eq!(
        of_type(&evs, "activity_completed").len(),
        2,
        "each result recorded once"
    );
    node.stop().await;
    pool.stop().await;
    Ok(())
}
