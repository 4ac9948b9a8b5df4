//! `bench_pipeline`: the seed's three-step shape (two cpu steps, one gpu-queue step) with
//! trivial compute, so a benchmark measures the orchestration machinery itself: journal
//! appends, dispatch, pulls, reports, replay. Every step is as durable as in the real
//! pipelines.

use std::time::Duration;

use baton_actors::{
    ActivityDef, ActivityError, ActivityOptions, Registry, WorkflowContext, WorkflowError,
};
use serde::{Deserialize, Serialize};

use super::{CPU_QUEUE, GPU_QUEUE, cpu_retry, gpu_retry};

/// The workflow's registered name.
pub const BENCH_PIPELINE: &str = "bench_pipeline";

/// First cpu step: checks the input is non-empty.
pub const BENCH_VALIDATE: ActivityDef<String, String> = ActivityDef::new("bench_validate");
/// Second cpu step: lowercases.
pub const BENCH_PREPROCESS: ActivityDef<String, String> = ActivityDef::new("bench_preprocess");
/// The gpu-queue step: a checksum of the text, standing in for inference.
pub const BENCH_INFER: ActivityDef<String, BenchOutput> = ActivityDef::new("bench_infer");

/// Input of `bench_pipeline`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BenchInput {
    /// Any non-empty text.
    pub text: String,
}

/// Output of `bench_pipeline`: deterministic, so a benchmark can check every result.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BenchOutput {
    /// The lowercased text.
    pub text: String,
    /// FNV-1a hash of it.
    pub checksum: u64,
}

/// FNV-1a, the "inference" of the benchmark.
pub fn checksum(text: &str) -> u64 {
    text.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    })
}

async fn bench_pipeline(
    ctx: WorkflowContext,
    input: BenchInput,
) -> Result<BenchOutput, WorkflowError> {
    let valid = ctx.activity(&BENCH_VALIDATE, &input.text).await?;
    let clean = ctx.activity(&BENCH_PREPROCESS, &valid).await?;
    Ok(ctx.activity(&BENCH_INFER, &clean).await?)
}

/// The timer benchmark's workflow (`baton-timerbench`): one durable timer, nothing else.
pub const BENCH_TIMER: &str = "bench_timer";

/// Input of `bench_timer`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TimerInput {
    /// Unix milliseconds the timer is due at.
    pub wake_at_ms: u64,
}

/// Output of `bench_timer`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimerOutput {
    /// The input's due time.
    pub wake_at_ms: u64,
    /// Workflow time when the timer's firing was recorded (never before `wake_at_ms`).
    pub fired_ms: u64,
}

/// Sleeps on a durable timer until `wake_at_ms`, then returns when it fired.
async fn bench_timer(
    ctx: WorkflowContext,
    input: TimerInput,
) -> Result<TimerOutput, WorkflowError> {
    let wait = input.wake_at_ms.saturating_sub(ctx.now_ms());
    ctx.sleep(Duration::from_millis(wait)).await?;
    Ok(TimerOutput {
        wake_at_ms: input.wake_at_ms,
        fired_ms: ctx.now_ms(),
    })
}

/// Registers `bench_pipeline`, `bench_timer` and their activities.
pub fn register(r: &mut Registry) -> anyhow::Result<()> {
    let secs = Duration::from_secs;
    r.workflow(BENCH_PIPELINE, bench_pipeline)?;
    r.workflow(BENCH_TIMER, bench_timer)?;
    r.activity(
        &BENCH_VALIDATE,
        ActivityOptions::new(CPU_QUEUE, secs(30), cpu_retry()),
        |_, t: String| async move {
            if t.is_empty() {
                return Err(ActivityError::non_retryable(
                    "ValidationError",
                    "empty text",
                ));
            }
            Ok(t)
        },
    )?;
    r.activity(
        &BENCH_PREPROCESS,
        ActivityOptions::new(CPU_QUEUE, secs(30), cpu_retry()),
        |_, t: String| async move { Ok(t.to_lowercase()) },
    )?;
    r.activity(
        &BENCH_INFER,
        ActivityOptions::new(GPU_QUEUE, secs(120), gpu_retry()),
        |_, t: String| async move {
            let checksum = checksum(&t);
            Ok(BenchOutput { text: t, checksum })
        },
    )?;
    Ok(())
}
