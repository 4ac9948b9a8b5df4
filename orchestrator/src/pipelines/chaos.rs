//! `chaos_pipeline`: the workload of the chaos suite (`cargo xtask chaos`,
//! `tests/chaos/`). A run is a chain of 1 to 8 steps over the `cpu` and `gpu` queues, each
//! taking the previous step's value; the steps are cheap but exercise what faults hit:
//! plain compute, heartbeating for seconds with progress details (resumed from on the next
//! attempt), failing the first attempts, and results of any size.
//!
//! The output is a pure function of the input, whatever the attempts, redeliveries and
//! restarts, so a driver can compute it in advance and count wrong results. The model
//! (which the driver re-implements on its own, `tests/chaos/model.rs`):
//!
//! - `mix(a, b) = splitmix64(a.rotate_left(17) ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15))`;
//! - step `i` (from 0) with input value `v` starts from `s = mix(v, i + 1)`;
//! - `compute`: `rounds` times `s = mix(s, r)` for `r` in `0..rounds`;
//! - `heartbeat`: `beats` times, each after sleeping `beat_ms`: `s = mix(s, b)` for `b` in
//!   `0..beats`, then a heartbeat with `{done: b + 1, value: s}`; a later attempt (or a
//!   redelivery of this one) resumes after the last recorded beat;
//! - `flaky`: fails attempts `1..=fail_first` with a retryable `ChaosFlaky` error, then
//!   returns `mix(s, fail_first)`;
//! - `blob`: returns `mix(s, bytes)` and a string of `bytes` bytes; with `echo`, the
//!   workflow hands that string to a second activity (`chaos_echo_<queue>`), which
//!   returns `mix(value, len)`. A result too large for JetStream fails the step with
//!   `PayloadTooLarge` (not retried), and the run with it;
//! - the output is `{"value": <the last step's value>, "steps": <number of steps>}`.
//!
//! Fault injection: [`request_panic`] hands out a token that the next chaos activity to
//! poll takes, panicking its runner actor. Only the worker's fault hook
//! (`BATON_CHAOS_FAULTS=1`, see `crate::faults`) calls it.

use std::{
    sync::atomic::{AtomicU32, Ordering},
    time::Duration,
};

use baton_actors::{
    ActivityContext, ActivityDef, ActivityError, ActivityOptions, Registry, RetryPolicy,
    WorkflowContext, WorkflowError,
};
use serde::{Deserialize, Serialize};

use super::{CPU_QUEUE, GPU_QUEUE};

/// The workflow's registered name.
pub const CHAOS_PIPELINE: &str = "chaos_pipeline";

/// Most steps in one run.
pub const MAX_STEPS: usize = 8;

/// What a step does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// A hash chain of `rounds` rounds.
    Compute,
    /// `beats` beats of `beat_ms`, heartbeating progress details after each.
    Heartbeat,
    /// Fails its first `fail_first` attempts.
    Flaky,
    /// A result of `bytes` bytes (and, with `echo`, a next activity taking it as input).
    Blob,
}

/// One step of a run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosStep {
    /// What it does.
    pub kind: StepKind,
    /// `cpu` or `gpu`.
    pub queue: String,
    /// `compute`: rounds of the hash chain (at most 1,000,000).
    #[serde(default)]
    pub rounds: u32,
    /// `heartbeat`: beats (at most 100).
    #[serde(default)]
    pub beats: u32,
    /// `heartbeat`: milliseconds between beats (at most 2,000).
    #[serde(default)]
    pub beat_ms: u64,
    /// `flaky`: attempts that fail before one succeeds (at most 5).
    #[serde(default)]
    pub fail_first: u32,
    /// `blob`: size of the result's string (at most 64 MiB).
    #[serde(default)]
    pub bytes: u64,
    /// `blob`: hand the string to a second activity.
    #[serde(default)]
    pub echo: bool,
}

/// Input of `chaos_pipeline`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChaosInput {
    /// The value the chain starts from.
    pub seed: u64,
    /// 1 to [`MAX_STEPS`] steps, run in order.
    pub steps: Vec<ChaosStep>,
}

/// Output of `chaos_pipeline`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChaosOutput {
    /// The last step's value.
    pub value: u64,
    /// How many steps ran.
    pub steps: u32,
}

/// Input of one step's activity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepInput {
    /// The step's index, from 0.
    pub step: u32,
    /// The previous step's value (the seed for step 0).
    pub value: u64,
    /// The step.
    pub spec: ChaosStep,
}

/// Output of one step's activity.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StepOutput {
    /// The step's value.
    pub value: u64,
    /// `heartbeat`: the beats an earlier attempt or delivery had done (from its heartbeat
    /// details), if this attempt resumed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resumed_from: Option<u32>,
    /// `blob`: the string.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blob: Option<String>,
}

/// Input of `chaos_echo_<queue>`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EchoInput {
    /// The blob step's value.
    pub value: u64,
    /// The blob step's string.
    pub blob: String,
}

/// Heartbeat details of a `heartbeat` step: where the next attempt resumes.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Progress {
    /// Beats done.
    pub done: u32,
    /// The value after them.
    pub value: u64,
}

type StepDef = ActivityDef<StepInput, StepOutput>;

/// `compute` on the cpu queue.
pub const COMPUTE_CPU: StepDef = ActivityDef::new("chaos_compute_cpu");
/// `compute` on the gpu queue.
pub const COMPUTE_GPU: StepDef = ActivityDef::new("chaos_compute_gpu");
/// `heartbeat` on the cpu queue.
pub const HEARTBEAT_CPU: StepDef = ActivityDef::new("chaos_heartbeat_cpu");
/// `heartbeat` on the gpu queue.
pub const HEARTBEAT_GPU: StepDef = ActivityDef::new("chaos_heartbeat_gpu");
/// `flaky` on the cpu queue.
pub const FLAKY_CPU: StepDef = ActivityDef::new("chaos_flaky_cpu");
/// `flaky` on the gpu queue.
pub const FLAKY_GPU: StepDef = ActivityDef::new("chaos_flaky_gpu");
/// `blob` on the cpu queue.
pub const BLOB_CPU: StepDef = ActivityDef::new("chaos_blob_cpu");
/// `blob` on the gpu queue.
pub const BLOB_GPU: StepDef = ActivityDef::new("chaos_blob_gpu");
/// The echo of a `blob` step on the cpu queue.
pub const ECHO_CPU: ActivityDef<EchoInput, StepOutput> = ActivityDef::new("chaos_echo_cpu");
/// The echo of a `blob` step on the gpu queue.
pub const ECHO_GPU: ActivityDef<EchoInput, StepOutput> = ActivityDef::new("chaos_echo_gpu");

/// The heartbeat timeout of `heartbeat` steps.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(3);

/// Retry policy of every chaos activity: 200 ms, x2, at most 2 s apart, 8 attempts (room
/// for `fail_first` failures and for the faults the suite injects).
pub fn chaos_retry() -> RetryPolicy {
    let mut p = RetryPolicy::exponential(Duration::from_millis(200), 2.0, 8);
    p.maximum_interval_ms = 2_000;
    p
}

/// splitmix64's finaliser.
pub fn splitmix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The chain's mixing function.
pub fn mix(a: u64, b: u64) -> u64 {
    splitmix64(a.rotate_left(17) ^ b.wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

static PANIC_TOKENS: AtomicU32 = AtomicU32::new(0);

/// Fault injection: the next chaos activity to poll (at its start, or between two beats)
/// panics, failing its runner actor.
pub fn request_panic() {
    PANIC_TOKENS.fetch_add(1, Ordering::SeqCst);
}

/// Fault injection: withdraws a token no activity took; `true` if there was one.
pub fn withdraw_panic() -> bool {
    take_panic_token()
}

/// Panic tokens handed out and not taken yet.
pub fn pending_panics() -> u32 {
    PANIC_TOKENS.load(Ordering::SeqCst)
}

fn take_panic_token() -> bool {
    PANIC_TOKENS
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

fn maybe_panic(ctx: &ActivityContext) {
    if take_panic_token() {
        let i = ctx.info();
        panic!(
            "chaos: panic injected into {} (run {} seq {} attempt {})",
            i.activity, i.run_id, i.seq, i.attempt
        );
    }
}

fn validation(message: String) -> WorkflowError {
    WorkflowError::new("ValidationError", message)
}

/// Checks the input's limits (the edge checks only its shape).
pub fn validate(input: &ChaosInput) -> Result<(), WorkflowError> {
    if input.steps.is_empty() || input.steps.len() > MAX_STEPS {
        return Err(validation(format!(
            "{} steps; 1 to {MAX_STEPS} allowed",
            input.steps.len()
        )));
    }
    for (i, s) in input.steps.iter().enumerate() {
        if s.queue != CPU_QUEUE && s.queue != GPU_QUEUE {
            return Err(validation(format!(
                "step {i}: queue {:?}; cpu or gpu",
                s.queue
            )));
        }
        let ok = s.rounds <= 1_000_000
            && s.beats <= 100
            && s.beat_ms <= 2_000
            && s.fail_first <= 5
            && s.bytes <= 64 << 20;
        if !ok {
            return Err(validation(format!("step {i}: a parameter is out of range")));
        }
    }
    Ok(())
}

fn step_def(kind: StepKind, queue: &str) -> &'static StepDef {
    let gpu = queue == GPU_QUEUE;
    match (kind, gpu) {
        (StepKind::Compute, false) => &COMPUTE_CPU,
        (StepKind::Compute, true) => &COMPUTE_GPU,
        (StepKind::Heartbeat, false) => &HEARTBEAT_CPU,
        (StepKind::Heartbeat, true) => &HEARTBEAT_GPU,
        (StepKind::Flaky, false) => &FLAKY_CPU,
        (StepKind::Flaky, true) => &FLAKY_GPU,
        (StepKind::Blob, false) => &BLOB_CPU,
        (StepKind::Blob, true) => &BLOB_GPU,
    }
}

async fn chaos_pipeline(
    ctx: WorkflowContext,
    input: ChaosInput,
) -> Result<ChaosOutput, WorkflowError> {
    validate(&input)?;
    let mut value = input.seed;
    for (i, spec) in input.steps.iter().enumerate() {
        let def = step_def(spec.kind, &spec.queue);
        let step = StepInput {
            step: i as u32,
            value,
            spec: spec.clone(),
        };
        let out = ctx.activity(def, &step).await?;
        value = out.value;
        if spec.kind == StepKind::Blob && spec.echo {
            let echo = if spec.queue == GPU_QUEUE {
                &ECHO_GPU
            } else {
                &ECHO_CPU
            };
            let input = EchoInput {
                value,
                blob: out.blob.unwrap_or_default(),
            };
            value = ctx.activity(echo, &input).await?.value;
        }
    }
    Ok(ChaosOutput {
        value,
        steps: input.steps.len() as u32,
    })
}

fn plain(value: u64) -> StepOutput {
    StepOutput {
        value,
        resumed_from: None,
        blob: None,
    }
}

async fn compute(ctx: ActivityContext, input: StepInput) -> Result<StepOutput, ActivityError> {
    maybe_panic(&ctx);
    let mut v = mix(input.value, u64::from(input.step) + 1);
    for r in 0..input.spec.rounds {
        v = mix(v, u64::from(r));
    }
    Ok(plain(v))
}

async fn heartbeat(ctx: ActivityContext, input: StepInput) -> Result<StepOutput, ActivityError> {
    maybe_panic(&ctx);
    let (mut done, mut v, resumed_from) = match ctx.heartbeat_details::<Progress>() {
        Some(p) => (p.done, p.value, Some(p.done)),
        None => (0, mix(input.value, u64::from(input.step) + 1), None),
    };
    while done < input.spec.beats {
        tokio::time::sleep(Duration::from_millis(input.spec.beat_ms)).await;
        maybe_panic(&ctx);
        v = mix(v, u64::from(done));
        done += 1;
        ctx.heartbeat_with(&Progress { done, value: v });
    }
    Ok(StepOutput {
        value: v,
        resumed_from,
        blob: None,
    })
}

async fn flaky(ctx: ActivityContext, input: StepInput) -> Result<StepOutput, ActivityError> {
    maybe_panic(&ctx);
    let attempt = ctx.info().attempt;
    if attempt <= input.spec.fail_first {
        return Err(ActivityError::retryable(
            "ChaosFlaky",
            format!(
                "attempt {attempt} fails on purpose (the first {} do)",
                input.spec.fail_first
            ),
        ));
    }
    let s = mix(input.value, u64::from(input.step) + 1);
    Ok(plain(mix(s, u64::from(input.spec.fail_first))))
}

async fn blob(ctx: ActivityContext, input: StepInput) -> Result<StepOutput, ActivityError> {
    maybe_panic(&ctx);
    let s = mix(input.value, u64::from(input.step) + 1);
    Ok(StepOutput {
        value: mix(s, input.spec.bytes),
        resumed_from: None,
        blob: Some("x".repeat(input.spec.bytes as usize)),
    })
}

async fn echo(ctx: ActivityContext, input: EchoInput) -> Result<StepOutput, ActivityError> {
    maybe_panic(&ctx);
    Ok(plain(mix(input.value, input.blob.len() as u64)))
}

/// The options of every chaos activity (the central policy table of this workflow).
pub fn activity_options() -> Vec<(&'static str, ActivityOptions)> {
    let secs = Duration::from_secs;
    let mut out = Vec::new();
    for (queue, defs) in [
        (
            CPU_QUEUE,
            [&COMPUTE_CPU, &HEARTBEAT_CPU, &FLAKY_CPU, &BLOB_CPU],
        ),
        (
            GPU_QUEUE,
            [&COMPUTE_GPU, &HEARTBEAT_GPU, &FLAKY_GPU, &BLOB_GPU],
        ),
    ] {
        for def in defs {
            let options = if def.name.starts_with("chaos_heartbeat") {
                ActivityOptions::new(queue, secs(120), chaos_retry())
                    .heartbeat_timeout(HEARTBEAT_TIMEOUT)
            } else {
                ActivityOptions::new(queue, secs(30), chaos_retry())
            };
            out.push((def.name, options));
        }
    }
    out.push((
        ECHO_CPU.name,
        ActivityOptions::new(CPU_QUEUE, secs(30), chaos_retry()),
    ));
    out.push((
        ECHO_GPU.name,
        ActivityOptions::new(GPU_QUEUE, secs(30), chaos_retry()),
    ));
    out
}

/// Registers `chaos_pipeline` and its activities.
pub fn register(r: &mut Registry) -> anyhow::Result<()> {
    r.workflow(CHAOS_PIPELINE, chaos_pipeline)?;
    let options = activity_options();
    let of = |name: &str| {
        options
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, o)| o.clone())
            .expect("chaos options declared")
    };
    for def in [&COMPUTE_CPU, &COMPUTE_GPU] {
        r.activity(def, of(def.name), compute)?;
    }
    for def in [&HEARTBEAT_CPU, &HEARTBEAT_GPU] {
        r.activity(def, of(def.name), heartbeat)?;
    }
    for def in [&FLAKY_CPU, &FLAKY_GPU] {
        r.activity(def, of(def.name), flaky)?;
    }
    for def in [&BLOB_CPU, &BLOB_GPU] {
        r.activity(def, of(def.name), blob)?;
    }
    for def in [&ECHO_CPU, &ECHO_GPU] {
        r.activity(def, of(def.name), echo)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mix_is_the_documented_function() {
        assert_eq!(splitmix64(0), 0xE220_A839_7B1D_CDAF);
        assert_ne!(mix(1, 2), mix(2, 1));
    }

    #[test]
    fn panic_tokens_are_taken_once() {
        request_panic();
        assert_eq!(pending_panics(), 1);
        assert!(withdraw_panic());
        assert!(!withdraw_panic());
    }

    #[test]
    fn limits_are_checked() {
        let step = |queue: &str| ChaosStep {
            kind: StepKind::Compute,
            queue: queue.into(),
            rounds: 1,
            beats: 0,
            beat_ms: 0,
            fail_first: 0,
            bytes: 0,
            echo: false,
        };
        let ok = ChaosInput {
            seed: 1,
            steps: vec![step("cpu"), step("gpu")],
        };
        assert!(validate(&ok).is_ok());
        let bad_queue = ChaosInput {
            seed: 1,
            steps: vec![step("index")],
        };
        assert!(validate(&bad_queue).is_err());
        let none = ChaosInput {
            seed: 1,
            steps: vec![],
        };
        assert!(validate(&none).is_err());
    }
}
