//! The chaos suite, short: the driver (`tests/chaos/`, `cargo xtask chaos` for the long
//! run) with a few workflows and two faults per kind, every scenario it has (17-19, the
//! storage faults, in a test of their own). It exits 0 only if no invariant (I1-I8) and no
//! scenario check was violated; its output (the table, and the IDs and histories of any
//! violation) is shown when this fails.

use std::process::Command;

/// Runs the driver with `args`; fails with its output unless it exits 0.
fn chaos(args: &[&str]) {
    let out = Command::new(env!("CARGO_BIN_EXE_baton-chaos"))
        .args(args)
        .env("BATON_BIN", baton_tests::baton_bin())
        .env("BATON_HOME", baton_tests::baton_home())
        .current_dir(baton_tests::workspace_root())
        .output()
        .expect("running baton-chaos");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    assert!(
        out.status.success(),
        "baton-chaos failed ({}):\n{text}",
        out.status
    );
}

#[test]
fn chaos_short_all_scenarios() {
    chaos(&[
        "--scenarios",
        "2,3,4,5,9,12,13,14,15",
        "--workflows",
        "10",
        "--faults",
        "2",
        "--concurrency",
        "6",
        // The 5 MiB echoed case runs on its own (below): it needs a longer drain.
        "--oversize",
        "2,3e,9",
    ]);
}

/// Scenario 12, strictly: a worker paused past its heartbeat timeout holds an attempt; the
/// orchestrator, hearing nothing of it for the timeout plus 1.5 s, fails it and dispatches
/// the next attempt before JetStream's ack wait hands the task to another worker under the
/// same attempt number, so the paused worker's late report is dropped by attempt number.
#[test]
fn chaos_paused_worker_late_report_dropped() {
    chaos(&["--scenarios", "12", "--workflows", "20", "--faults", "6"]);
}

/// A 5 MiB activity result handed to the next activity. The journal splits a mirror
/// append over the server's 8 MiB `max_payload` into chained messages, so these runs close
/// with the right result, and their history (two 5 MiB payloads as JSON, over one message)
/// is read back in pages (`next_event`), so the driver checks every invariant on them.
#[test]
fn chaos_oversize_result_journaled_twice() {
    chaos(&[
        "--scenarios",
        "15",
        "--workflows",
        "4",
        "--oversize",
        "5e",
        "--drain-s",
        "60",
    ]);
}

/// Scenarios 17-19 (the orchestrator's fault hook): its journal's disk full for a few
/// seconds, power losses inside commits (unsynced writes undone, the last torn) with a
/// restart on the same journal, and 0.5% of its journal storage calls and of every
/// process's NATS calls failing. Short: about a minute and a half.
#[test]
fn chaos_storage_faults() {
    chaos(&[
        "--scenarios",
        "17,18,19",
        "--workflows",
        "10",
        "--faults",
        "2",
        "--concurrency",
        "6",
    ]);
}
