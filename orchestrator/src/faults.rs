//! The fault-injection hooks of the worker and of the orchestrator, for the chaos suite
//! only (`tests/chaos/`): off unless the process is started with `BATON_CHAOS_FAULTS=1`.
//!
//! ## The worker's hook
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
//! | `nats_failures <per_million>` | that share of this process's NATS calls fail from now on ([`baton_transport::faults`]) |
//! | `status` | nothing: how many runners run |
//!
//! The reply is JSON: `{"injected": bool, "detail": "...", "nats_injected": n}`;
//! `injected` is false when there was nothing to hit (no runner running, no activity took
//! the panic token); `nats_injected` counts the NATS failures injected so far.
//!
//! ## The orchestrator's hook
//!
//! When on, `baton orchestrator` opens its journal over a storage backend with injectable
//! faults ([`StorageFaults`], RELIABILITY.md scenarios 17-19) and answers requests on
//! `baton.chaos.orchestrator.<pid>` (see [`orchestrator_subject`]):
//!
//! | body | fault |
//! |---|---|
//! | `disk_full on` / `disk_full off` | every journal write, resize and sync fails with ENOSPC / the disk has room again |
//! | `io_failures <per_million>` | that share of the journal's storage calls fail with an I/O error (0: none) |
//! | `nats_failures <per_million>` | that share of this process's NATS calls fail ([`baton_transport::faults`]) |
//! | `power_loss tear` / `power_loss clean` | cut the power now: every journal write since the last sync is undone (`tear`: the first half of the last one stays), then the process ends at once (`_exit(137)`, no reply) |
//! | `power_loss_at <n> tear` / `... clean` | the same, in the middle of the `n`-th journal write from now (inside a commit) |
//! | `status` | nothing |
//!
//! The reply is JSON: `{"injected": bool, "detail": "...", "storage_injected": n,
//! "nats_injected": n, "nats_by_point": {...}}` (failures injected so far). A power loss
//! logs `chaos: power lost` to stderr before the process ends; the test restarts the
//! orchestrator on the same data directory.
//!
//! With `BATON_CHAOS_FAULTS=1`, both processes start with the NATS failure rate of
//! `BATON_CHAOS_NATS_FAIL_PPM` (default 0).

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use baton_actors::{
    storage::StorageFaults,
    worker::{PoolHandle, PoolMsg, SupervisorMsg},
};
use futures::StreamExt;
use ractor::ActorRef;
use serde_json::json;

use crate::pipelines::chaos;

/// The environment variable that turns the hook on (value `1`).
pub const ENV: &str = "BATON_CHAOS_FAULTS";

/// Whether this process was started with the hook on. When it was, the process's NATS
/// failure rate is set from `BATON_CHAOS_NATS_FAIL_PPM` here (the first time).
pub fn enabled() -> bool {
    let on = std::env::var(ENV).is_ok_and(|v| v == "1");
    if on {
        static INIT: std::sync::Once = std::sync::Once::new();
        INIT.call_once(baton_transport::faults::init_from_env);
    }
    on
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
            let (injected, detail) = match nats_failures(command.trim()) {
                Some(set) => set,
                None => inject(&supervisor, command.trim()).await,
            };
            tracing::warn!(command = %command.trim(), injected, %detail, "fault injected");
            let body = json!({
                "injected": injected,
                "detail": detail,
                "nats_injected": baton_transport::faults::injected_total(),
            })
            .to_string();
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

/// `nats_failures <per_million>`, for either hook.
fn nats_failures(command: &str) -> Option<(bool, String)> {
    let rate = command.strip_prefix("nats_failures ")?;
    Some(match rate.trim().parse::<u32>() {
        Ok(ppm) => {
            baton_transport::faults::set_rate(ppm);
            (true, format!("{ppm} NATS calls in a million fail"))
        }
        Err(_) => (false, format!("bad rate {rate:?}")),
    })
}

/// The orchestrator hook's subject for the process with ID `pid`.
pub fn orchestrator_subject(pid: u32) -> String {
    format!("baton.chaos.orchestrator.{pid}")
}

/// The orchestrator's journal storage faults: none until the hook asks; a power loss ends
/// the process at once, from inside the storage call that cut the power, so nothing more
/// is written or sent.
pub fn orchestrator_storage_faults() -> Arc<StorageFaults> {
    let faults = StorageFaults::none();
    faults.on_power_loss(|undone, torn| {
        eprintln!(
            "chaos: power lost ({undone} unsynced journal writes undone, last torn: {torn}); the process ends"
        );
        end_now();
    });
    faults
}

#[allow(unsafe_code)]
fn end_now() -> ! {
    // SAFETY: _exit(2) ends the process without running anything more (no destructors,
    // no atexit handlers, no other thread gets to act): a machine losing power.
    unsafe { libc::_exit(137) }
}

/// Serves the orchestrator's hook over `faults` until the connection closes.
pub async fn serve_orchestrator(
    client: async_nats::Client,
    faults: Arc<StorageFaults>,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    let subject = orchestrator_subject(std::process::id());
    let mut sub = client.subscribe(subject.clone()).await?;
    tracing::warn!(%subject, "fault injection hook on ({ENV}=1): chaos tests only");
    Ok(tokio::spawn(async move {
        while let Some(message) = sub.next().await {
            let Some(reply) = message.reply.clone() else {
                continue;
            };
            let command = String::from_utf8_lossy(&message.payload).trim().to_string();
            tracing::warn!(%command, "fault requested");
            let (injected, detail) = inject_storage(&faults, &command);
            tracing::warn!(%command, injected, %detail, "fault injected");
            let body = json!({
                "injected": injected,
                "detail": detail,
                "storage_injected": faults.injected(),
                "nats_injected": baton_transport::faults::injected_total(),
                "nats_by_point": baton_transport::faults::injected(),
            })
            .to_string();
            let _ = client.publish(reply, body.into()).await;
            let _ = client.flush().await;
        }
    }))
}

fn inject_storage(faults: &StorageFaults, command: &str) -> (bool, String) {
    if let Some(set) = nats_failures(command) {
        return set;
    }
    let mut words = command.split_whitespace();
    let tear = |w: Option<&str>| match w {
        Some("tear") => Some(true),
        Some("clean") => Some(false),
        _ => None,
    };
    match (words.next(), words.next(), words.next()) {
        (Some("status"), None, None) => (true, "status".into()),
        (Some("disk_full"), Some(on @ ("on" | "off")), None) => {
            faults.set_full(on == "on");
            (true, format!("disk full: {on}"))
        }
        (Some("io_failures"), Some(rate), None) => match rate.parse::<u32>() {
            Ok(ppm) => {
                faults.set_failure_rate(ppm);
                (true, format!("{ppm} storage calls in a million fail"))
            }
            Err(_) => (false, format!("bad rate {rate:?}")),
        },
        (Some("power_loss"), t, None) if tear(t).is_some() => {
            // Ends the process from the storage's hook; returns only if it cannot.
            match faults.power_loss(tear(t) == Some(true)) {
                Ok(_) => (false, "the power is off but the process did not end".into()),
                Err(e) => (false, format!("power loss failed: {e}")),
            }
        }
        (Some("power_loss_at"), Some(n), t) if tear(t).is_some() => match n.parse::<u64>() {
            Ok(n) if n > 0 => {
                faults.power_loss_at_write(n, tear(t) == Some(true));
                (
                    true,
                    format!("the power goes in journal write {n} from now"),
                )
            }
            _ => (false, format!("bad write count {n:?}")),
        },
        _ => (false, format!("unknown fault {command:?}")),
    }
}
