//! The worker's fault-injection hook, for the chaos suite only (`tests/chaos/`): off
//! unless the worker process is started with `BATON_CHAOS_FAULTS=1`.
//!
//! When on, `baton worker` answers requests on the core-NATS subject
//! `baton.chaos.<queue>.<pid>` (see [`subject`]). The body names one fault, injected into
//! this process's pool:
//!
//! | body | fault |
//! |---|---|
//! | `kill_runner` | `kill()` one running runner actor (the pool reports its attempt failed) |
//! | `panic_runner` | the next chaos activity to poll panics in its runner (`chaos::request_panic`) |
//! | `kill_pool` | `kill()` the pool actor (its supervisor replaces it; running tasks are redelivered) |
//! | `panic_pool` | the pool actor panics in its handler (`PoolMsg::InjectPanic`) |
//! | `status` | nothing: how many runners run |
//!
//! The reply is JSON: `{"injected": bool, "detail": "..."}`; `injected` is false when
//! there was nothing to hit (no runner running, no activity took the panic token).

use std::time::{Duration, Instant};

use baton_actors::worker::{PoolHandle, PoolMsg, SupervisorMsg};
use futures::StreamExt;
use ractor::ActorRef;
use serde_json::json;

use crate::pipelines::chaos;

/// The environment variable that turns the hook on (value `1`).
pub const ENV: &str = "BATON_CHAOS_FAULTS";

/// Whether this process was started with the hook on.
pub fn enabled() -> bool {
    std::env::var(ENV).is_ok_and(|v| v == "1")
}

/// The hook's subject for a worker of `queue` with process ID `pid`.
pub fn subject(queue: &str, pid: u32) -> String {
    format!("baton.chaos.{queue}.{pid}")
}

/// How long a `panic_runner` waits for a chaos activity to take its token.
const PANIC_TAKE_WAIT: Duration = Duration::from_secs(3);

/// Serves the hook for `pool` until the connection closes.
pub async fn serve(
    client: async_nats::Client,
    queue: &str,
    pool: &PoolHandle,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let subject = subject(queue, std::process::id());
    let mut sub = client.subscribe(subject.clone()).await?;
    let supervisor = pool.supervisor.clone();
    tracing::warn!(%subject, "fault injection hook on ({ENV}=1): chaos tests only");
    Ok(tokio::spawn(async move {
        while let Some(message) = sub.next().await {
            let Some(reply) = message.reply.clone() else {
                continue;
            };
            let command = String::from_utf8_lossy(&message.payload).to_string();
            let (injected, detail) = inject(&supervisor, command.trim()).await;
            tracing::warn!(command = %command.trim(), injected, %detail, "fault injected");
            let body = json!({"injected": injected, "detail": detail}).to_string();
            let _ = client.publish(reply, body.into()).await;
        }
    }))
}

async fn current_pool(supervisor: &ActorRef<SupervisorMsg>) -> Option<ActorRef<PoolMsg>> {
    ractor::call_t!(supervisor, SupervisorMsg::Current, 5_000)
        .ok()
        .flatten()
}

async fn inject(supervisor: &ActorRef<SupervisorMsg>, command: &str) -> (bool, String) {
    let Some(pool) = current_pool(supervisor).await else {
        return (false, "no pool actor runs (being restarted)".into());
    };
    let runners = pool.get_cell().get_children();
    match command {
        "status" => (true, format!("{} runners", runners.len())),
        "kill_runner" => match runners.first() {
            Some(r) => {
                r.kill();
                (
                    true,
                    format!("killed runner {} of {}", r.get_id(), runners.len()),
                )
            }
            None => (false, "no runner runs".into()),
        },
        "panic_runner" => {
            chaos::request_panic();
            let deadline = Instant::now() + PANIC_TAKE_WAIT;
            while chaos::pending_panics() > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if chaos::pending_panics() > 0 && chaos::withdraw_panic() {
                (false, "no chaos activity polled in time".into())
            } else {
                (true, "a chaos activity panicked".into())
            }
        }
        "kill_pool" => {
            pool.kill();
            (
                true,
                format!("killed pool {} ({} runners)", pool.get_id(), runners.len()),
            )
        }
        "panic_pool" => match pool.send_message(PoolMsg::InjectPanic) {
            Ok(()) => (
                true,
                format!("pool {} panics ({} runners)", pool.get_id(), runners.len()),
            ),
            Err(e) => (false, format!("pool unreachable: {e}")),
        },
        other => (false, format!("unknown fault {other:?}")),
    }
}
