//! Temporal's semantics, scenario by scenario (adapted from its cross-SDK feature suite),
//! against a real nats-server and a real redb journal with the runtime in this process:
//! cancellation in its three modes, timers fired and cancelled, signal-with-start and
//! signals between workflows, continue-as-new, child workflows (result, retry, duplicate
//! ID, timeout, termination, cancellation, signals), terminate and execution timeouts,
//! activity retries and heartbeat timeouts. Every recorded history is replayed against
//! the code at the end of its test: none may be non-deterministic.

use std::{
    collections::HashMap,
    sync::{LazyLock, Mutex},
    time::Duration,
};

use baton_actors::{
    ActivityContext, ActivityDef, ActivityError, ActivityOptions, CancellationType, ChildOptions,
    Execution, Registry, RetryPolicy, WorkflowContext, WorkflowError,
    history::Event,
    node::{NodeOptions, Orchestrator},
};
use baton_tests::{Client, NatsServer, REQUEST_TIMEOUT};
use baton_transport::wire::ResultReply;
use serde_json::{Value, json};

use crate::{
    cluster::{WAIT, events, of_type},
    runtime::{start_node_with, start_test_pool, wait_for_events},
};

const QUEUE: &str = "sem-cpu";
const LONG: ActivityDef<u64, String> = ActivityDef::new("sem_long");
const ECHO: ActivityDef<String, String> = ActivityDef::new("sem_echo");
/// Upper-cases its input after 100 ms.
const SHOUT: ActivityDef<String, String> = ActivityDef::new("sem_shout");
const ALWAYS_FAILS: ActivityDef<String, String> = ActivityDef::new("sem_always_fails");
const HANGS_ONCE: ActivityDef<u32, u32> = ActivityDef::new("sem_hangs_once");
const CHECKPOINTS_THEN_FAILS: ActivityDef<u32, u32> =
    ActivityDef::new("sem_checkpoints_then_fails");
const FLAKY_CHILD_STEP: ActivityDef<String, String> = ActivityDef::new("sem_flaky_child_step");
const UNPOLLED: ActivityDef<String, String> = ActivityDef::new("sem_unpolled");
const GRACEFUL: ActivityDef<u64, String> = ActivityDef::new("sem_graceful");
/// The queue of the graceful-shutdown scenario.
const GRACE: &str = "sem-grace";
const WATCHED: ActivityDef<String, String> = ActivityDef::new("sem_watched");
/// A queue no worker polls.
const NOBODY: &str = "sem-nobody";
/// A queue whose first worker freezes (played by the test).
const FROZEN: &str = "sem-frozen";

/// What the activities saw, by workflow ID (tests run in parallel; IDs are unique).
static SEEN: LazyLock<Mutex<HashMap<String, Vec<String>>>> = LazyLock::new(Default::default);

fn saw(workflow_id: &str, what: impl Into<String>) {
    SEEN.lock()
        .unwrap()
        .entry(workflow_id.into())
        .or_default()
        .push(what.into());
}

fn seen(workflow_id: &str) -> Vec<String> {
    SEEN.lock()
        .unwrap()
        .get(workflow_id)
        .cloned()
        .unwrap_or_default()
}

fn mode_of(mode: &str) -> CancellationType {
    match mode {
        "wait" => CancellationType::WaitCancellationCompleted,
        "abandon" => CancellationType::Abandon,
        _ => CancellationType::TryCancel,
    }
}

fn quick_retry(attempts: u32) -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_millis(50), 1.5, attempts)
}

/// Waits on a long heartbeating activity with the cancellation type named by its input,
/// then runs a clean-up activity and closes as cancelled.
async fn cancel_me(ctx: WorkflowContext, mode: String) -> Result<String, WorkflowError> {
    let ms: u64 = if mode == "abandon" { 1_500 } else { 20_000 };
    let options = ActivityOptions::new(QUEUE, Duration::from_secs(60), quick_retry(3))
        .heartbeat_timeout(Duration::from_secs(5))
        .cancellation(mode_of(&mode));
    let outcome = match ctx.activity_with(&LONG, &ms, options).await {
        Ok(_) => "completed".to_string(),
        Err(e) => e.kind,
    };
    // Scheduled after the cancellation: not cancelled.
    let cleanup = ctx
        .activity(&ECHO, &format!("cleanup after {outcome}"))
        .await?;
    Err(WorkflowError::new(ActivityError::CANCELLED, cleanup))
}

/// Fires a short timer and cancels a long one.
async fn timers(ctx: WorkflowContext, _: ()) -> Result<String, WorkflowError> {
    let short = ctx.sleep(Duration::from_millis(200));
    let long = ctx.sleep(Duration::from_secs(3600));
    let long_id = long.id();
    short.await?;
    ctx.cancel_timer(long_id);
    let long = long.await;
    Ok(format!("short fired; long {:?}", long.map_err(|e| e.kind)))
}

/// Collects `item` signals until one says "stop"; answers the query `items`.
async fn collector(ctx: WorkflowContext, _: ()) -> Result<Vec<String>, WorkflowError> {
    let items = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
    let it = items.clone();
    ctx.on_query("items", move || it.lock().unwrap().clone());
    loop {
        let item: String = ctx.signal("item").await?;
        if item == "stop" {
            break;
        }
        items.lock().unwrap().push(item);
    }
    let out = items.lock().unwrap().clone();
    Ok(out)
}

/// Handles every `item` signal with an activity, concurrently with its main code, which
/// waits for `done`; returns the handlers' results once every handler has finished.
async fn handler_activities(ctx: WorkflowContext, _: ()) -> Result<Vec<String>, WorkflowError> {
    let handled = std::sync::Arc::new(Mutex::new(Vec::<String>::new()));
    let (c, h) = (ctx.clone(), handled.clone());
    ctx.with_signal_handler(
        "item",
        move |item: String| {
            let (c, h) = (c.clone(), h.clone());
            async move {
                let out = c.activity(&SHOUT, &item).await?;
                h.lock().unwrap().push(out);
                Ok(())
            }
        },
        async { ctx.signal::<()>("done").await.map_err(WorkflowError::from) },
    )
    .await?;
    let out = handled.lock().unwrap().clone();
    Ok(out)
}

/// Signals `target` twice from the workflow, and a workflow that does not exist.
async fn signaller(ctx: WorkflowContext, target: String) -> Result<String, WorkflowError> {
    ctx.signal_workflow(&target, "item", &"from-workflow")
        .await?;
    ctx.signal_workflow(&target, "item", &"stop").await?;
    let missing = ctx.signal_workflow("no-such-workflow", "item", &"x").await;
    Ok(format!("missing: {:?}", missing.map_err(|e| e.kind)))
}

/// Adds one `add` signal per run and continues as new until three were added.
async fn rolling(ctx: WorkflowContext, state: (u32, i64)) -> Result<i64, WorkflowError> {
    let (runs, total) = state;
    if runs == 3 {
        return Ok(total);
    }
    let n: i64 = ctx.signal("add").await?;
    Err(ctx.continue_as_new(&(runs + 1, total + n)))
}

/// Doubles its input.
async fn double(_: WorkflowContext, n: i64) -> Result<i64, WorkflowError> {
    Ok(n * 2)
}

/// Fails unless this is its workflow ID's third run (counted by its activity).
async fn flaky_child(ctx: WorkflowContext, _: ()) -> Result<String, WorkflowError> {
    Ok(ctx
        .activity(&FLAKY_CHILD_STEP, &ctx.workflow_id().to_string())
        .await?)
}

/// Sleeps an hour unless cancelled.
async fn sleepy(ctx: WorkflowContext, _: ()) -> Result<String, WorkflowError> {
    ctx.sleep(Duration::from_secs(3600)).await?;
    Ok("woke".into())
}

/// Runs one child scenario named by its input and reports how the child ended.
async fn parent(ctx: WorkflowContext, scenario: String) -> Result<String, WorkflowError> {
    let id = format!("{}-kid", ctx.workflow_id());
    let describe = |r: Result<Value, ActivityError>| match r {
        Ok(v) => format!("ok {v}"),
        Err(e) => format!("err {}", e.kind),
    };
    Ok(match scenario.as_str() {
        "result" => describe(
            ctx.child_workflow("sem_double", &21, ChildOptions::default().workflow_id(&id))
                .await,
        ),
        "retry" => describe(
            ctx.child_workflow(
                "sem_flaky_child",
                &(),
                ChildOptions::default()
                    .workflow_id(&id)
                    .retry(quick_retry(3)),
            )
            .await,
        ),
        "duplicate" => describe(
            ctx.child_workflow(
                "sem_collector",
                &(),
                ChildOptions::default().workflow_id("sem-taken"),
            )
            .await,
        ),
        "timeout" => describe(
            ctx.child_workflow(
                "sem_sleepy",
                &(),
                ChildOptions::default()
                    .workflow_id(&id)
                    .execution_timeout(Duration::from_millis(500)),
            )
            .await,
        ),
        "terminated" | "cancel" => describe(
            ctx.child_workflow("sem_sleepy", &(), ChildOptions::default().workflow_id(&id))
                .await,
        ),
        "signal" => {
            let child = ctx.child_workflow(
                "sem_collector",
                &(),
                ChildOptions::default().workflow_id(&id),
            );
            ctx.signal_workflow(&id, "item", &"hello child").await?;
            ctx.signal_workflow(&id, "item", &"stop").await?;
            describe(child.await)
        }
        other => return Err(WorkflowError::new("BadScenario", other)),
    })
}

/// An activity that records heartbeat details slow to store and fails at once on its first
/// attempt.
async fn checkpoints(ctx: WorkflowContext, n: u32) -> Result<u32, WorkflowError> {
    Ok(ctx.activity(&CHECKPOINTS_THEN_FAILS, &n).await?)
}

/// Calls an activity that always fails; reports the final error.
async fn give_up(ctx: WorkflowContext, _: ()) -> Result<String, WorkflowError> {
    match ctx.activity(&ALWAYS_FAILS, &"x".to_string()).await {
        Ok(_) => Ok("succeeded?".into()),
        Err(e) => Ok(format!("gave up: {}: {}", e.kind, e.message)),
    }
}

/// An activity that stops heartbeating on its first attempt.
async fn heartbeats(ctx: WorkflowContext, _: ()) -> Result<u32, WorkflowError> {
    Ok(ctx.activity(&HANGS_ONCE, &7).await?)
}

/// Calls an activity of a queue nobody polls; reports its error.
async fn unpolled(ctx: WorkflowContext, _: ()) -> Result<String, WorkflowError> {
    match ctx.activity(&UNPOLLED, &"x".to_string()).await {
        Ok(v) => Ok(v),
        Err(e) => Ok(format!("fallback after {}", e.kind)),
    }
}

/// Calls an activity with a heartbeat timeout, watched by the orchestrator.
async fn watched(ctx: WorkflowContext, _: ()) -> Result<String, WorkflowError> {
    Ok(ctx.activity(&WATCHED, &"x".to_string()).await?)
}

/// One activity of `ms` on the `sem-grace` queue.
async fn graceful(ctx: WorkflowContext, ms: u64) -> Result<String, WorkflowError> {
    Ok(ctx.activity(&GRACEFUL, &ms).await?)
}

fn registry() -> Registry {
    let mut r = Registry::new();
    r.workflow("sem_graceful", graceful).unwrap();
    r.activity(
        &GRACEFUL,
        ActivityOptions::new(GRACE, Duration::from_secs(60), quick_retry(3)),
        |ctx: ActivityContext, ms: u64| async move {
            let wf = ctx.info().workflow_id.clone();
            saw(&wf, "started");
            tokio::time::sleep(Duration::from_millis(ms)).await;
            saw(&wf, "finished");
            Ok(format!("slept {ms} ms"))
        },
    )
    .unwrap();
    r.workflow("sem_unpolled", unpolled).unwrap();
    r.workflow("sem_watched", watched).unwrap();
    r.activity(
        &UNPOLLED,
        ActivityOptions::new(NOBODY, Duration::from_secs(10), quick_retry(3))
            .schedule_to_start(Duration::from_millis(300)),
        |_, s: String| async move { Ok(s) },
    )
    .unwrap();
    r.activity(
        &WATCHED,
        ActivityOptions::new(FROZEN, Duration::from_secs(30), quick_retry(3))
            .heartbeat_timeout(Duration::from_millis(300)),
        |ctx: ActivityContext, _: String| async move {
            ctx.heartbeat();
            Ok(format!("attempt {}", ctx.info().attempt))
        },
    )
    .unwrap();
    r.workflow("sem_cancel_me", cancel_me).unwrap();
    r.workflow("sem_timers", timers).unwrap();
    r.workflow("sem_collector", collector).unwrap();
    r.workflow("sem_signaller", signaller).unwrap();
    r.workflow("sem_handler_activities", handler_activities)
        .unwrap();
    r.workflow("sem_rolling", rolling).unwrap();
    r.workflow("sem_double", double).unwrap();
    r.workflow("sem_flaky_child", flaky_child).unwrap();
    r.workflow("sem_sleepy", sleepy).unwrap();
    r.workflow("sem_parent", parent).unwrap();
    r.workflow("sem_give_up", give_up).unwrap();
    r.workflow("sem_heartbeats", heartbeats).unwrap();
    r.workflow("sem_checkpoints", checkpoints).unwrap();
    let options = ActivityOptions::new(QUEUE, Duration::from_secs(60), quick_retry(3));
    // Heartbeats every 50 ms for `ms`; stops at the first heartbeat after a cancellation.
    r.activity(
        &LONG,
        options.clone(),
        |ctx: ActivityContext, ms: u64| async move {
            let wf = ctx.info().workflow_id.clone();
            saw(&wf, "started");
            let start = std::time::Instant::now();
            while start.elapsed() < Duration::from_millis(ms) {
                ctx.heartbeat();
                if ctx.is_cancelled() {
                    saw(&wf, "cancelled at a heartbeat");
                    return Err(ActivityError::cancelled("stopped at a heartbeat"));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            saw(&wf, "ran to the end");
            Ok("done".into())
        },
    )
    .unwrap();
    r.activity(&ECHO, options.clone(), |_, s: String| async move { Ok(s) })
        .unwrap();
    r.activity(&SHOUT, options.clone(), |_, s: String| async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok(s.to_uppercase())
    })
    .unwrap();
    r.activity(
        &ALWAYS_FAILS,
        ActivityOptions::new(QUEUE, Duration::from_secs(10), quick_retry(5)),
        |ctx: ActivityContext, _: String| async move {
            Err::<String, _>(ActivityError::retryable(
                "Flaky",
                format!("attempt {} failed", ctx.info().attempt),
            ))
        },
    )
    .unwrap();
    r.activity(
        &HANGS_ONCE,
        ActivityOptions::new(QUEUE, Duration::from_secs(30), quick_retry(3))
            .heartbeat_timeout(Duration::from_millis(500)),
        |ctx: ActivityContext, n: u32| async move {
            if let Some(resumed) = ctx.heartbeat_details::<u32>() {
                return Ok(resumed * 10 + ctx.info().attempt);
            }
            ctx.heartbeat_with(&n);
            // Silent past the heartbeat timeout: the pool kills this attempt.
            tokio::time::sleep(Duration::from_secs(20)).await;
            Ok(0)
        },
    )
    .unwrap();
    r.activity(
        &CHECKPOINTS_THEN_FAILS,
        // Retried after 1 ms: sooner than the details' puts take.
        ActivityOptions::new(
            QUEUE,
            Duration::from_secs(30),
            RetryPolicy::exponential(Duration::from_millis(1), 1.0, 3),
        )
        .heartbeat_timeout(Duration::from_secs(10)),
        |ctx: ActivityContext, n: u32| async move {
            if let Some((resumed, _)) = ctx.heartbeat_details::<(u32, String)>() {
                return Ok(resumed * 10 + ctx.info().attempt);
            }
            // Details 1..=n of 6 MiB each, slow to store: each sent while the one before
            // is being stored, the last one followed at once by an error. The retry must
            // see the last one.
            let bulk = "x".repeat(6 << 20);
            for i in 1..=n {
                if i > 1 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                ctx.heartbeat_with(&(i, &bulk));
            }
            Err(ActivityError::retryable(
                "Checkpointed",
                "fails after its checkpoints",
            ))
        },
    )
    .unwrap();
    // Fails (one attempt per run) until its workflow ID has run it three times.
    r.activity(
        &FLAKY_CHILD_STEP,
        ActivityOptions::new(QUEUE, Duration::from_secs(10), quick_retry(1)),
        |_, wf: String| async move {
            saw(&wf, "run");
            let runs = seen(&wf).len();
            if runs < 3 {
                Err(ActivityError::non_retryable(
                    "ChildBoom",
                    format!("run {runs} fails"),
                ))
            } else {
                Ok(format!("succeeded on run {runs}"))
            }
        },
    )
    .unwrap();
    r
}

/// A node, a pool and a client on a fresh nats-server.
struct Env {
    _nats: NatsServer,
    evict_idle: Option<Duration>,
    nc: async_nats::Client,
    dir: tempfile::TempDir,
    node: Option<Orchestrator>,
    pool: baton_actors::worker::PoolHandle,
    client: Client,
}

impl Env {
    async fn start() -> anyhow::Result<Env> {
        Env::start_with(NodeOptions::new("").evict_idle).await
    }

    /// With this idle-eviction setting (`Some(ZERO)`: every step replays).
    async fn start_with(evict_idle: Option<Duration>) -> anyhow::Result<Env> {
        Env::start_full(evict_idle, |o| o).await
    }

    /// With the node's options adjusted by `adjust` (faults injected into the journal's
    /// storage, a cache size).
    async fn start_full(
        evict_idle: Option<Duration>,
        adjust: impl FnOnce(NodeOptions) -> NodeOptions,
    ) -> anyhow::Result<Env> {
        let nats = NatsServer::start().await?;
        let nc = nats.connect().await?;
        let dir = tempfile::tempdir()?;
        let options = adjust(Env::options(&dir, evict_idle));
        let node = start_node_with(&nc, options, registry).await;
        let pool = start_test_pool(&nc, registry(), QUEUE, 8).await?;
        Ok(Env {
            _nats: nats,
            evict_idle,
            nc: nc.clone(),
            dir,
            node: Some(node),
            pool,
            client: Client::new(nc),
        })
    }

    /// Stops the orchestrator node and starts a new one on the same journal; returns how
    /// many open runs it recovered.
    async fn restart_node(&mut self) -> usize {
        if let Some(node) = self.node.take() {
            node.stop().await;
        }
        let node =
            start_node_with(&self.nc, Env::options(&self.dir, self.evict_idle), registry).await;
        let recovered = node.recovered();
        self.node = Some(node);
        recovered
    }

    fn options(dir: &tempfile::TempDir, evict_idle: Option<Duration>) -> NodeOptions {
        NodeOptions {
            evict_idle,
            ..NodeOptions::new(dir.path())
        }
    }

    fn rehydrations(&self) -> u64 {
        self.node.as_ref().map_or(0, |n| n.rehydrations())
    }

    async fn stop(self) {
        if let Some(node) = self.node {
            node.stop().await;
        }
        self.pool.stop().await;
    }

    async fn start_wf(&self, ty: &str, id: &str, input: Value) -> anyhow::Result<()> {
        self.client
            .start(ty, Some(id), input)
            .await?
            .into_result()
            .map_err(|e| anyhow::anyhow!("start {id}: {e:?}"))?;
        Ok(())
    }

    async fn api(&self, subject: &str, body: Value) -> anyhow::Result<Value> {
        self.client
            .request_json(subject, &body, REQUEST_TIMEOUT)
            .await
    }

    /// The closed workflow's output, or its error's kind prefixed with `error:`.
    async fn outcome(&self, id: &str) -> anyhow::Result<Value> {
        Ok(match self.client.wait_result(id, WAIT).await? {
            ResultReply::Completed { output } => output,
            ResultReply::Failed { error } => json!(format!("error:{}", error["kind"])),
            ResultReply::Running => anyhow::bail!("{id} still running"),
        })
    }

    async fn status(&self, id: &str) -> anyhow::Result<String> {
        let d = self.client.describe(id).await?;
        Ok(d["status"].as_str().unwrap_or_default().to_string())
    }

    /// Replays the workflow's recorded history against the code: it must match.
    async fn assert_replays(&self, id: &str) -> anyhow::Result<Vec<Value>> {
        let evs = events(&self.client, id).await?;
        let history: Vec<Event> = evs
            .iter()
            .map(Event::from_json)
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!(e))?;
        let ty = evs[0]["workflow_type"].as_str().unwrap().to_string();
        let r = registry();
        let mut exec = Execution::new(
            r.workflow_def(&ty).unwrap().run.clone(),
            id,
            "replay",
            r.policies().clone(),
        );
        let ahead = exec
            .replay(&history)
            .map_err(|e| anyhow::anyhow!("{id}: {e}"))?;
        if history.last().is_some_and(|e| e.kind.is_close()) {
            anyhow::ensure!(
                ahead.is_empty(),
                "{id}: closed, yet replay issues {ahead:?}"
            );
        }
        Ok(evs)
    }
}

fn seq_events<'a>(evs: &'a [Value], ty: &str, seq: u64) -> Vec<&'a Value> {
    of_type(evs, ty)
        .into_iter()
        .filter(|e| e["seq"] == seq)
        .collect()
}

fn position(evs: &[Value], ty: &str) -> usize {
    evs.iter()
        .position(|e| e["type"] == ty)
        .unwrap_or_else(|| panic!("no {ty} in {evs:#?}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn cancellation_try_wait_and_abandon() -> anyhow::Result<()> {
    let env = Env::start().await?;
    for mode in ["try", "wait", "abandon"] {
        let id = format!("cancel-{mode}");
        env.start_wf("sem_cancel_me", &id, json!(mode)).await?;
        wait_for_events(&env.client, &id, "activity_scheduled", 1).await?;
        // Cancel once the attempt runs.
        wait_until(|| seen(&id).contains(&"started".into())).await?;
        let reply = env
            .api(
                "baton.api.cancel",
                json!({"workflow_id": id, "reason": "test"}),
            )
            .await?;
        assert_eq!(reply["workflow_id"], id, "{reply}");
        assert_eq!(
            env.outcome(&id).await?,
            json!("error:\"Cancelled\""),
            "{mode}"
        );
        assert_eq!(env.status(&id).await?, "cancelled");
        let evs = env.assert_replays(&id).await?;
        let cancel_at = position(&evs, "workflow_cancel_requested");
        let cleanup_at = evs
            .iter()
            .position(|e| e["type"] == "activity_scheduled" && e["seq"] == 1)
            .expect("cleanup scheduled");
        match mode {
            // The workflow went on at once; the activity stopped at its next heartbeat and
            // its late report was dropped.
            "try" => {
                assert_eq!(cleanup_at, cancel_at + 1, "{evs:#?}");
                assert!(seq_events(&evs, "activity_failed", 0).is_empty());
                wait_until(|| seen(&id).contains(&"cancelled at a heartbeat".into())).await?;
            }
            // The workflow waited for the activity to report how it ended.
            "wait" => {
                let failed = seq_events(&evs, "activity_failed", 0);
                assert_eq!(failed.len(), 1, "{evs:#?}");
                assert_eq!(failed[0]["failure"]["kind"], "Cancelled");
                assert_eq!(failed[0]["worker"], "sem-cpu-worker");
                assert!(cleanup_at > cancel_at + 1, "{evs:#?}");
                assert_eq!(seen(&id), vec!["started", "cancelled at a heartbeat"]);
            }
            // The workflow went on at once; the activity was never told and ran to its end,
            // and its result was dropped.
            _ => {
                assert_eq!(cleanup_at, cancel_at + 1, "{evs:#?}");
                wait_until(|| seen(&id).contains(&"ran to the end".into())).await?;
                assert_eq!(seen(&id), vec!["started", "ran to the end"]);
                let evs = events(&env.client, &id).await?;
                assert!(seq_events(&evs, "activity_completed", 0).is_empty());
            }
        }
        // Asking again is harmless; the run is closed.
        let again = env
            .api("baton.api.cancel", json!({"workflow_id": id}))
            .await?;
        assert_eq!(again["error"]["code"], "workflow_closed", "{again}");
    }
    let missing = env
        .api("baton.api.cancel", json!({"workflow_id": "nobody"}))
        .await?;
    assert_eq!(missing["error"]["code"], "not_found", "{missing}");
    env.stop().await;
    Ok(())
}

async fn wait_until(cond: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond() {
        anyhow::ensure!(std::time::Instant::now() < deadline, "condition not met");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn timers_fire_and_cancel_and_signals_with_start() -> anyhow::Result<()> {
    let env = Env::start().await?;
    // timer: fire and cancel.
    env.start_wf("sem_timers", "timers-1", json!(null)).await?;
    assert_eq!(
        env.outcome("timers-1").await?,
        json!("short fired; long Err(\"Cancelled\")")
    );
    let evs = env.assert_replays("timers-1").await?;
    assert_eq!(seq_events(&evs, "timer_fired", 0).len(), 1);
    assert_eq!(seq_events(&evs, "timer_cancelled", 1).len(), 1);
    assert!(seq_events(&evs, "timer_fired", 1).is_empty());

    // signal-with-start: the first starts the run with its signal, the second signals it.
    let sws = |item: &str| json!({"workflow_id": "coll-1", "input": null, "signal": {"name": "item", "input": item}});
    let first = env.api("baton.start.sem_collector", sws("a")).await?;
    assert_eq!(first["status"], "started", "{first}");
    let second = env.api("baton.start.sem_collector", sws("b")).await?;
    assert_eq!(second["status"], "signaled", "{second}");
    assert_eq!(second["run_id"], first["run_id"]);
    let q = env
        .api(
            "baton.api.query",
            json!({"workflow_id": "coll-1", "name": "items"}),
        )
        .await?;
    assert_eq!(q["result"], json!(["a", "b"]), "{q}");
    // signal: a retried signal with the same request ID is recorded once.
    for _ in 0..2 {
        let r = env
            .api(
                "baton.api.signal",
                json!({"workflow_id": "coll-1", "name": "item", "input": "c", "request_id": "once"}),
            )
            .await?;
        assert_eq!(r["workflow_id"], "coll-1", "{r}");
    }
    // signal: activities from a handler. `done` arrives while the handlers' activities
    // run; the workflow still waits for all three.
    env.start_wf("sem_handler_activities", "handlers-1", json!(null))
        .await?;
    for (name, input) in [
        ("item", json!("a")),
        ("item", json!("b")),
        ("item", json!("c")),
    ]
    .into_iter()
    .chain([("done", json!(null))])
    {
        let r = env
            .api(
                "baton.api.signal",
                json!({"workflow_id": "handlers-1", "name": name, "input": input}),
            )
            .await?;
        assert_eq!(r["workflow_id"], "handlers-1", "{r}");
    }
    let mut shouted: Vec<String> = serde_json::from_value(env.outcome("handlers-1").await?)?;
    shouted.sort();
    assert_eq!(shouted, ["A", "B", "C"]);
    let evs = env.assert_replays("handlers-1").await?;
    assert_eq!(of_type(&evs, "activity_completed").len(), 3);
    assert!(
        position(&evs, "signal_received") < position(&evs, "activity_scheduled"),
        "a handler's activity is scheduled after its signal"
    );
    // History in pages: the same events, whatever the page size; a run of another
    // workflow is not found.
    let whole = env.client.history("handlers-1").await?;
    let paged = env.client.history_in_pages("handlers-1", Some(300)).await?;
    assert!(paged["pages"].as_u64() > Some(4), "{}", paged["pages"]);
    assert_eq!(paged["events"], whole["events"]);
    assert_eq!(whole["pages"], 1);
    let past_end = env
        .api(
            "baton.api.history",
            json!({"workflow_id": "handlers-1", "from_event": 1000}),
        )
        .await?;
    assert_eq!(past_end["events"], json!([]), "{past_end}");
    assert!(past_end.get("next_event").is_none(), "{past_end}");
    let wrong_run = env
        .api(
            "baton.api.history",
            json!({"workflow_id": "coll-1", "run_id": whole["run_id"]}),
        )
        .await?;
    assert_eq!(wrong_run["error"]["code"], "not_found", "{wrong_run}");
    // signal: external, from a workflow; an unknown target is an error to the workflow.
    env.start_wf("sem_signaller", "signaller-1", json!("coll-1"))
        .await?;
    assert_eq!(
        env.outcome("signaller-1").await?,
        json!("missing: Err(\"NotFound\")")
    );
    assert_eq!(
        env.outcome("coll-1").await?,
        json!(["a", "b", "c", "from-workflow"])
    );
    env.assert_replays("coll-1").await?;
    env.assert_replays("signaller-1").await?;
    // signal: a closed workflow takes none.
    let closed = env
        .api(
            "baton.api.signal",
            json!({"workflow_id": "coll-1", "name": "item", "input": "late"}),
        )
        .await?;
    assert_eq!(closed["error"]["code"], "workflow_closed", "{closed}");
    // signal-with-start on that closed ID (reuse rejected by default): an error, not a
    // silent duplicate that drops the signal.
    let late = env.api("baton.start.sem_collector", sws("late")).await?;
    assert_eq!(late["error"]["code"], "workflow_closed", "{late}");

    // Terminate and execution timeout close a run from outside its code.
    env.start_wf("sem_collector", "coll-term", json!(null))
        .await?;
    let t = env
        .api(
            "baton.api.terminate",
            json!({"workflow_id": "coll-term", "reason": "test"}),
        )
        .await?;
    assert_eq!(t["workflow_id"], "coll-term", "{t}");
    assert_eq!(
        env.outcome("coll-term").await?,
        json!("error:\"Terminated\"")
    );
    assert_eq!(env.status("coll-term").await?, "terminated");
    let timed = env
        .api(
            "baton.start.sem_collector",
            json!({"workflow_id": "coll-timeout", "input": null, "execution_timeout_ms": 300}),
        )
        .await?;
    assert_eq!(timed["status"], "started", "{timed}");
    assert_eq!(
        env.outcome("coll-timeout").await?,
        json!("error:\"TimedOut\"")
    );
    assert_eq!(env.status("coll-timeout").await?, "timed_out");
    env.assert_replays("coll-term").await?;
    env.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn continue_as_new_carries_arguments_and_loses_no_signal() -> anyhow::Result<()> {
    let env = Env::start().await?;
    env.start_wf("sem_rolling", "roll-1", json!([0, 0])).await?;
    // Three signals at once: some reach a run that is about to hand over, some its
    // successor; each is consumed exactly once.
    let sends = [5, 7, 11].map(|n| {
        env.api(
            "baton.api.signal",
            json!({"workflow_id": "roll-1", "name": "add", "input": n}),
        )
    });
    for r in futures::future::join_all(sends).await {
        let r = r?;
        assert_eq!(r["workflow_id"], "roll-1", "{r}");
    }
    assert_eq!(env.outcome("roll-1").await?, json!(23));
    let list = env
        .api(
            "baton.api.list",
            json!({"status": "continued_as_new", "limit": 100}),
        )
        .await?;
    let runs: Vec<&Value> = list["workflows"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|w| w["workflow_id"] == "roll-1")
        .collect();
    assert_eq!(runs.len(), 3, "{list}");
    // The final run started from the carried arguments.
    let evs = env.assert_replays("roll-1").await?;
    assert_eq!(evs[0]["input"], json!([3, 23]), "{evs:#?}");
    env.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn child_workflows() -> anyhow::Result<()> {
    let env = Env::start().await?;
    // result
    env.start_wf("sem_parent", "p-result", json!("result"))
        .await?;
    assert_eq!(env.outcome("p-result").await?, json!("ok 42"));
    assert_eq!(env.outcome("p-result-kid").await?, json!(42));
    let evs = env.assert_replays("p-result").await?;
    for ty in [
        "child_workflow_scheduled",
        "child_workflow_started",
        "child_workflow_completed",
    ] {
        assert_eq!(of_type(&evs, ty).len(), 1, "{ty}: {evs:#?}");
    }
    // retry: two failed runs, the third succeeds.
    env.start_wf("sem_parent", "p-retry", json!("retry"))
        .await?;
    assert_eq!(
        env.outcome("p-retry").await?,
        json!("ok \"succeeded on run 3\"")
    );
    let evs = env.assert_replays("p-retry").await?;
    assert_eq!(of_type(&evs, "child_workflow_failed").len(), 2, "{evs:#?}");
    assert_eq!(of_type(&evs, "child_workflow_started").len(), 3);
    // signal: the parent signals its child.
    env.start_wf("sem_parent", "p-signal", json!("signal"))
        .await?;
    assert_eq!(
        env.outcome("p-signal").await?,
        json!("ok [\"hello child\"]")
    );
    env.assert_replays("p-signal").await?;
    // throws on start: the child's workflow ID is running.
    env.start_wf("sem_collector", "sem-taken", json!(null))
        .await?;
    env.start_wf("sem_parent", "p-dup", json!("duplicate"))
        .await?;
    assert_eq!(
        env.outcome("p-dup").await?,
        json!("err WorkflowAlreadyStarted")
    );
    env.assert_replays("p-dup").await?;
    // throws on timeout.
    env.start_wf("sem_parent", "p-timeout", json!("timeout"))
        .await?;
    assert_eq!(env.outcome("p-timeout").await?, json!("err TimedOut"));
    assert_eq!(env.status("p-timeout-kid").await?, "timed_out");
    // throws on termination.
    env.start_wf("sem_parent", "p-term", json!("terminated"))
        .await?;
    wait_for_events(&env.client, "p-term", "child_workflow_started", 1).await?;
    env.api("baton.api.terminate", json!({"workflow_id": "p-term-kid"}))
        .await?;
    assert_eq!(env.outcome("p-term").await?, json!("err Terminated"));
    // cancel: cancelling the parent cancels the child (try_cancel).
    env.start_wf("sem_parent", "p-cancel", json!("cancel"))
        .await?;
    wait_for_events(&env.client, "p-cancel", "child_workflow_started", 1).await?;
    env.api("baton.api.cancel", json!({"workflow_id": "p-cancel"}))
        .await?;
    assert_eq!(env.outcome("p-cancel").await?, json!("err Cancelled"));
    assert_eq!(
        env.outcome("p-cancel-kid").await?,
        json!("error:\"Cancelled\"")
    );
    assert_eq!(env.status("p-cancel-kid").await?, "cancelled");
    for id in ["p-timeout", "p-term", "p-cancel", "p-cancel-kid"] {
        env.assert_replays(id).await?;
    }
    env.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn activity_retries_and_heartbeat_timeouts() -> anyhow::Result<()> {
    let env = Env::start().await?;
    // retry_on_error: five attempts; the fifth error reaches the workflow.
    env.start_wf("sem_give_up", "give-up-1", json!(null))
        .await?;
    assert_eq!(
        env.outcome("give-up-1").await?,
        json!("gave up: Flaky: attempt 5 failed")
    );
    let evs = env.assert_replays("give-up-1").await?;
    let failed = of_type(&evs, "activity_failed");
    assert_eq!(failed.len(), 5, "{evs:#?}");
    assert!(failed[..4].iter().all(|e| e["retry_in_ms"].is_u64()));
    assert!(failed[4]["retry_in_ms"].is_null());
    // heartbeat timeout: the silent first attempt is killed; the second resumes from its
    // heartbeat details.
    env.start_wf("sem_heartbeats", "hb-1", json!(null)).await?;
    assert_eq!(env.outcome("hb-1").await?, json!(72));
    let evs = env.assert_replays("hb-1").await?;
    let failed = of_type(&evs, "activity_failed");
    assert_eq!(failed.len(), 1, "{evs:#?}");
    assert_eq!(failed[0]["failure"]["kind"], "HeartbeatTimeout");
    // Heartbeat details are stored in order, before the attempt's outcome is reported: an
    // attempt that records 3 and fails at once is retried from the 3rd.
    env.start_wf("sem_checkpoints", "ckpt-1", json!(3)).await?;
    assert_eq!(env.outcome("ckpt-1").await?, json!(32));
    let evs = env.assert_replays("ckpt-1").await?;
    assert_eq!(of_type(&evs, "activity_failed").len(), 1, "{evs:#?}");
    env.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn children_continue_as_new_and_cancellation_survive_an_orchestrator_restart()
-> anyhow::Result<()> {
    let mut env = Env::start().await?;
    // A parent waiting on a child that sleeps an hour; a rolling workflow half-way.
    env.start_wf("sem_parent", "pr-cancel", json!("cancel"))
        .await?;
    wait_for_events(&env.client, "pr-cancel", "child_workflow_started", 1).await?;
    env.start_wf("sem_rolling", "roll-r", json!([0, 0])).await?;
    env.api(
        "baton.api.signal",
        json!({"workflow_id": "roll-r", "name": "add", "input": 2}),
    )
    .await?;
    // The signal closed run 1; wait until run 2 is the ID's run.
    wait_until_async(|| async {
        env.client
            .describe("roll-r")
            .await
            .is_ok_and(|d| d["events"] == 1 && d["status"] == "running")
    })
    .await?;
    // parent + child + rolling run 2.
    assert_eq!(env.restart_node().await, 3);
    // The rebuilt parent cancels the rebuilt child.
    env.api("baton.api.cancel", json!({"workflow_id": "pr-cancel"}))
        .await?;
    assert_eq!(env.outcome("pr-cancel").await?, json!("err Cancelled"));
    assert_eq!(
        env.outcome("pr-cancel-kid").await?,
        json!("error:\"Cancelled\"")
    );
    for n in [3, 4] {
        env.api(
            "baton.api.signal",
            json!({"workflow_id": "roll-r", "name": "add", "input": n}),
        )
        .await?;
    }
    assert_eq!(env.outcome("roll-r").await?, json!(9));
    for id in ["pr-cancel", "pr-cancel-kid", "roll-r"] {
        env.assert_replays(id).await?;
    }
    env.stop().await;
    Ok(())
}

async fn wait_until_async<F, Fut>(cond: F) -> anyhow::Result<()>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !cond().await {
        anyhow::ensure!(std::time::Instant::now() < deadline, "condition not met");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn schedule_to_start_and_the_orchestrators_heartbeat_timeout() -> anyhow::Result<()> {
    let env = Env::start().await?;
    // schedule-to-start: nobody polls the queue.
    env.start_wf("sem_unpolled", "sts-1", json!(null)).await?;
    assert_eq!(
        env.outcome("sts-1").await?,
        json!("fallback after ScheduleToStartTimeout")
    );
    let evs = env.assert_replays("sts-1").await?;
    let failed = of_type(&evs, "activity_failed");
    assert_eq!(failed.len(), 1, "{evs:#?}");
    assert_eq!(failed[0]["worker"], "orchestrator");
    assert!(failed[0]["retry_in_ms"].is_null(), "not retried");

    // A worker takes attempt 1, says it started, then freezes (the test plays it).
    env.start_wf("sem_watched", "frozen-1", json!(null)).await?;
    let streams = baton_transport::jetstream::Streams::ensure(&env.nc).await?;
    let consumer = streams.queue_consumer(FROZEN).await?;
    let task = {
        use futures::StreamExt;
        let mut batch = consumer
            .batch()
            .max_messages(1)
            .expires(Duration::from_secs(10))
            .messages()
            .await?;
        batch
            .next()
            .await
            .expect("attempt 1's task")
            .map_err(|e| anyhow::anyhow!("{e}"))?
    };
    let task: baton_transport::wire::ActivityTask = baton_transport::codec::decode(&task.payload)?;
    assert_eq!(task.attempt, 1);
    let live = baton_transport::wire::Liveness {
        attempt: 1,
        worker: "frozen".into(),
    };
    streams
        .liveness
        .put(
            format!("{}.{}", task.run_id, task.seq),
            baton_transport::codec::encode(&live)?.into(),
        )
        .await?;
    // The orchestrator hears nothing more and fails the attempt; attempt 2 is dispatched.
    wait_for_events(&env.client, "frozen-1", "activity_failed", 1).await?;
    let evs = events(&env.client, "frozen-1").await?;
    let failed = of_type(&evs, "activity_failed");
    assert_eq!(failed[0]["failure"]["kind"], "HeartbeatTimeout", "{evs:#?}");
    assert_eq!(failed[0]["attempt"], 1);
    assert!(failed[0]["retry_in_ms"].is_u64());
    // The frozen worker wakes up and reports attempt 1: dropped, never recorded.
    let late = baton_transport::wire::ActivityReport {
        workflow_id: "frozen-1".into(),
        run_id: task.run_id.clone(),
        seq: task.seq,
        attempt: 1,
        worker: "frozen".into(),
        outcome: baton_transport::wire::ActivityOutcome::Completed {
            result: baton_transport::Payload::encode(&"late")?,
        },
    };
    let answer = env
        .nc
        .request(
            baton_transport::subject::report(&task.run_id),
            baton_transport::codec::encode(&late)?.into(),
        )
        .await?;
    let answer: baton_transport::wire::ReportAck = baton_transport::codec::decode(&answer.payload)?;
    // Settled (the worker may ack its task) and not recorded (checked below).
    assert_eq!(
        answer,
        baton_transport::wire::ReportAck {
            settled: true,
            error: None
        }
    );
    // A healthy worker runs attempt 2.
    let pool = start_test_pool(&env.nc, registry(), FROZEN, 2).await?;
    assert_eq!(env.outcome("frozen-1").await?, json!("attempt 2"));
    let evs = env.assert_replays("frozen-1").await?;
    let completed = of_type(&evs, "activity_completed");
    assert_eq!(completed.len(), 1, "{evs:#?}");
    assert_eq!(completed[0]["attempt"], 2);
    pool.stop().await;
    env.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn zero_cache_replays_every_step_and_changes_no_outcome() -> anyhow::Result<()> {
    // Every execution leaves memory after each step: each signal, report, timer and child
    // notice rebuilds it from its journal.
    let env = Env::start_with(Some(Duration::ZERO)).await?;
    env.start_wf("sem_timers", "z-timers", json!(null)).await?;
    env.start_wf("sem_parent", "z-parent", json!("result"))
        .await?;
    env.start_wf("sem_parent", "z-retry", json!("retry"))
        .await?;
    env.start_wf("sem_give_up", "z-give-up", json!(null))
        .await?;
    env.start_wf("sem_rolling", "z-roll", json!([0, 0])).await?;
    for n in [1, 2, 3] {
        let r = env
            .api(
                "baton.api.signal",
                json!({"workflow_id": "z-roll", "name": "add", "input": n}),
            )
            .await?;
        assert_eq!(r["workflow_id"], "z-roll", "{r}");
    }
    env.start_wf("sem_cancel_me", "z-cancel", json!("wait"))
        .await?;
    wait_until(|| seen("z-cancel").contains(&"started".into())).await?;
    env.api("baton.api.cancel", json!({"workflow_id": "z-cancel"}))
        .await?;
    assert_eq!(
        env.outcome("z-timers").await?,
        json!("short fired; long Err(\"Cancelled\")")
    );
    assert_eq!(env.outcome("z-parent").await?, json!("ok 42"));
    assert_eq!(
        env.outcome("z-retry").await?,
        json!("ok \"succeeded on run 3\"")
    );
    assert_eq!(
        env.outcome("z-give-up").await?,
        json!("gave up: Flaky: attempt 5 failed")
    );
    assert_eq!(env.outcome("z-roll").await?, json!(6));
    assert_eq!(env.outcome("z-cancel").await?, json!("error:\"Cancelled\""));
    for id in [
        "z-timers",
        "z-parent",
        "z-retry",
        "z-give-up",
        "z-roll",
        "z-cancel",
    ] {
        env.assert_replays(id).await?;
    }
    // About 18 waits end with the run out of memory: the timer, the child's result, three
    // child runs and the parent between them, five activity reports, three signals, the
    // cancellation and its report. A message that lands while its run is still mid-step
    // finds it in memory, so allow a few.
    let n = env.rehydrations();
    assert!(
        n >= 15,
        "only {n} rehydrations: executions were not evicted"
    );
    env.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn an_idle_execution_is_evicted_and_its_timer_brings_it_back() -> anyhow::Result<()> {
    let env = Env::start_with(Some(Duration::from_millis(100))).await?;
    // Idle on a 200 ms timer and an hour-long one: evicted, woken by the first.
    env.start_wf("sem_timers", "idle-timers", json!(null))
        .await?;
    assert_eq!(
        env.outcome("idle-timers").await?,
        json!("short fired; long Err(\"Cancelled\")")
    );
    // Idle waiting for a signal (no wake-up time at all): the signal brings it back.
    env.start_wf("sem_collector", "idle-coll", json!(null))
        .await?;
    wait_until_async(|| async { env.rehydrations() >= 1 }).await?;
    tokio::time::sleep(Duration::from_millis(300)).await;
    for item in ["x", "stop"] {
        env.api(
            "baton.api.signal",
            json!({"workflow_id": "idle-coll", "name": "item", "input": item}),
        )
        .await?;
    }
    assert_eq!(env.outcome("idle-coll").await?, json!(["x"]));
    assert!(env.rehydrations() >= 2, "{}", env.rehydrations());
    env.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_cache_evicts_the_longest_resident_executions() -> anyhow::Result<()> {
    // No idle eviction: only the cache's size (2) sends executions out of memory.
    let env = Env::start_full(None, |o| NodeOptions { max_cached: 2, ..o }).await?;
    let ids: Vec<String> = (0..6).map(|i| format!("cache-{i}")).collect();
    for id in &ids {
        env.start_wf("sem_collector", id, json!(null)).await?;
    }
    let node = env.node.as_ref().expect("node");
    wait_until(|| node.executions_in_memory() <= 2).await?;
    // Each signal brings its run back (and sends another out); every run ends right.
    for id in &ids {
        for item in [id.as_str(), "stop"] {
            let r = env
                .api(
                    "baton.api.signal",
                    json!({"workflow_id": id, "name": "item", "input": item}),
                )
                .await?;
            assert_eq!(r["workflow_id"], id.as_str(), "{r}");
        }
    }
    for id in &ids {
        assert_eq!(env.outcome(id).await?, json!([id]));
        env.assert_replays(id).await?;
    }
    assert!(env.rehydrations() >= 4, "{}", env.rehydrations());
    env.stop().await;
    Ok(())
}

/// A pool on the grace queue with its own worker ID.
async fn grace_pool(env: &Env, worker: &str) -> anyhow::Result<baton_actors::worker::PoolHandle> {
    baton_actors::worker::start_pool(
        baton_transport::jetstream::Streams::ensure(&env.nc).await?,
        std::sync::Arc::new(registry()),
        baton_actors::worker::PoolOptions {
            queue: GRACE.into(),
            concurrency: 2,
            worker_id: worker.into(),
        },
    )
    .await
    .map_err(|e| anyhow::anyhow!("{e}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_shutdown_with_a_grace_period() -> anyhow::Result<()> {
    let env = Env::start().await?;
    // The grace period covers the running activity: it finishes and reports.
    let a = grace_pool(&env, "grace-a").await?;
    env.start_wf("sem_graceful", "grace-1", json!(800)).await?;
    wait_until(|| seen("grace-1").contains(&"started".into())).await?;
    assert_eq!(a.shutdown(Duration::from_secs(10)).await, 0);
    assert_eq!(seen("grace-1"), vec!["started", "finished"]);
    assert_eq!(env.outcome("grace-1").await?, json!("slept 800 ms"));
    let evs = env.assert_replays("grace-1").await?;
    let done = of_type(&evs, "activity_completed");
    assert_eq!(done[0]["worker"], "grace-a");
    assert_eq!(done[0]["attempt"], 1);
    // Too short a grace period: the activity is abandoned, its task goes to another worker.
    let b = grace_pool(&env, "grace-b").await?;
    env.start_wf("sem_graceful", "grace-2", json!(3_000))
        .await?;
    wait_until(|| seen("grace-2").contains(&"started".into())).await?;
    assert_eq!(b.shutdown(Duration::from_millis(200)).await, 1);
    let c = grace_pool(&env, "grace-c").await?;
    assert_eq!(env.outcome("grace-2").await?, json!("slept 3000 ms"));
    let evs = env.assert_replays("grace-2").await?;
    let done = of_type(&evs, "activity_completed");
    assert_eq!(done.len(), 1);
    assert_eq!(done[0]["worker"], "grace-c");
    c.stop().await;
    env.stop().await;
    Ok(())
}

/// A report that an orchestrator node took and never answered (it died with it) is asked
/// again as soon as a node announces its start, not after the worker's answer wait.
#[tokio::test(flavor = "multi_thread")]
async fn a_report_a_dead_node_took_is_asked_again_when_a_node_starts() -> anyhow::Result<()> {
    use futures::StreamExt;
    let mut env = Env::start().await?;
    let pool = grace_pool(&env, "grace-lost").await?;
    env.start_wf("sem_graceful", "lost-report", json!(2_000))
        .await?;
    wait_until(|| seen("lost-report").contains(&"started".into())).await?;
    // The node stops; in its place a subscriber takes the report and never answers.
    if let Some(node) = env.node.take() {
        node.stop().await;
    }
    // (A plain subscription, outside the nodes' queue group: it gets the report even
    // if the stopped node's subscription is still being torn down.)
    let mut hole = env
        .nc
        .subscribe(baton_transport::subject::REPORT_ALL)
        .await?;
    env.nc.flush().await?;
    let taken = tokio::time::timeout(Duration::from_secs(30), hole.next())
        .await?
        .ok_or_else(|| anyhow::anyhow!("the subscription ended"))?;
    let taken_at = std::time::Instant::now();
    assert!(taken.subject.starts_with("baton.report.") && taken.reply.is_some());
    hole.unsubscribe().await?;
    env.nc.flush().await?;
    env.restart_node().await;
    assert_eq!(env.outcome("lost-report").await?, json!("slept 2000 ms"));
    let waited = taken_at.elapsed();
    assert!(
        waited < baton_actors::worker::REPORT_ANSWER_WAIT / 2,
        "recorded {waited:?} after the dead node took the report: asked again only after the answer wait"
    );
    let evs = env.assert_replays("lost-report").await?;
    assert_eq!(of_type(&evs, "activity_completed").len(), 1, "{evs:#?}");
    assert_eq!(seen("lost-report"), vec!["started", "finished"]);
    pool.stop().await;
    env.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_disk_under_the_orchestrator_loses_no_acknowledged_workflow() -> anyhow::Result<()> {
    let faults = baton_actors::storage::StorageFaults::none();
    let env = Env::start_full(NodeOptions::new("").evict_idle, |o| NodeOptions {
        storage_faults: Some(faults.clone()),
        ..o
    })
    .await?;
    let mut acknowledged = Vec::new();
    let mut refused = Vec::new();
    for i in 0..24 {
        // The disk fills up for a while in the middle of the workload.
        if i == 8 {
            faults.set_full(true);
        }
        if i == 16 {
            faults.set_full(false);
        }
        let (id, ty, input) = match i % 3 {
            0 => (format!("full-parent-{i}"), "sem_parent", json!("result")),
            1 => (format!("full-retry-{i}"), "sem_give_up", json!(null)),
            _ => (format!("full-timers-{i}"), "sem_timers", json!(null)),
        };
        let reply = env
            .api(
                &format!("baton.start.{ty}"),
                json!({"workflow_id": id, "input": input}),
            )
            .await?;
        match reply["status"].as_str() {
            Some("started") => acknowledged.push((id, i % 3)),
            _ => {
                assert_eq!(reply["error"]["code"], "unavailable", "{reply}");
                refused.push(id);
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        !refused.is_empty() && faults.injected() > 0,
        "the disk was never full"
    );
    let expected = |kind: &usize| match kind {
        0 => json!("ok 42"),
        1 => json!("gave up: Flaky: attempt 5 failed"),
        _ => json!("short fired; long Err(\"Cancelled\")"),
    };
    for (id, kind) in &acknowledged {
        assert_eq!(&env.outcome(id).await?, &expected(kind), "{id}");
        env.assert_replays(id).await?;
    }
    // A refused start left nothing (its client was told `unavailable`): no run appears
    // for it once the disk has room and the stores are reconciled.
    for id in &refused {
        let described = env.client.describe(id).await?;
        assert_eq!(described["error"]["code"], "not_found", "{id}: {described}");
    }
    env.stop().await;
    Ok(())
}
