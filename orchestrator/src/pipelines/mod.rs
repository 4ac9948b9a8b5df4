//! The "Mini AI Pipeline": two workflows over two task queues, assembled by one factory.
//!
//! | workflow | steps (queue) |
//! |---|---|
//! | [`PREPARE_AND_INFER`] | [`VALIDATE_INPUT`] (cpu) -> [`PREPROCESS`] (cpu) -> [`RUN_INFERENCE`] (gpu) |
//! | [`BATCH_EMBED`] | [`PREPROCESS_BATCH`] (cpu) -> [`COMPUTE_EMBEDDINGS`] (gpu) |
//!
//! [`factory`] is the single place where workflows are registered (name -> function),
//! activities are routed (activity -> queue) and the timeouts and retry policies are set:
//! adding a workflow or changing a policy is an edit here, not in the runtime.
//!
//! The "gpu" activities embed with all-MiniLM-L6-v2 (int8, ONNX Runtime); the model is
//! loaded lazily, once per process, by [`Models`].

mod activities;
pub mod bench;
pub mod chaos;
pub mod eval;
pub mod finetune;
pub mod ingest;
pub mod model_store;
mod models;
mod workflows;

use std::{sync::Arc, time::Duration};

use anyhow::Context as _;
use baton_actors::{ActivityOptions, Registry, RetryPolicy};

pub use activities::{
    COMPUTE_EMBEDDINGS, EMBED_CHUNK, Embeddings, Inference, MAX_BATCH_TEXTS, MAX_TEXT_CHARS,
    MODEL_NAME, PREPROCESS, PREPROCESS_BATCH, PreprocessedBatch, Progress, RUN_INFERENCE,
    VALIDATE_INPUT, compute_embeddings, embedding_batcher, normalize, preprocess, preprocess_batch,
    preprocess_batch_texts, run_inference, validate_input, validate_text,
};
pub use models::{
    Models, NEGATIVE_PROTOTYPES, POSITIVE_PROTOTYPES, SOFTMAX_TEMPERATURE, Sentiment,
};
pub use workflows::{
    BATCH_EMBED, BatchInput, BatchOutput, PREPARE_AND_INFER, PrepareInput, batch_embed,
    prepare_and_infer,
};

/// The queue of CPU-bound activities (validation, preprocessing).
pub const CPU_QUEUE: &str = "cpu";
/// The queue of model activities (inference, embeddings).
pub const GPU_QUEUE: &str = "gpu";

/// Retry policy of the CPU activities: 1 s, then x2, 3 attempts in all; a
/// `ValidationError` is never retried.
pub fn cpu_retry() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_secs(1), 2.0, 3).non_retryable(&["ValidationError"])
}

/// Retry policy of the GPU activities: 2 s, then x2, 2 attempts in all.
pub fn gpu_retry() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_secs(2), 2.0, 2)
}

/// The options of every pipeline activity: queue, start-to-close and heartbeat timeouts,
/// retry policy. The central policy table.
pub fn activity_options() -> Vec<(&'static str, ActivityOptions)> {
    let secs = Duration::from_secs;
    vec![
        (
            VALIDATE_INPUT.name,
            ActivityOptions::new(CPU_QUEUE, secs(30), cpu_retry()),
        ),
        (
            PREPROCESS.name,
            ActivityOptions::new(CPU_QUEUE, secs(30), cpu_retry()),
        ),
        (
            PREPROCESS_BATCH.name,
            ActivityOptions::new(CPU_QUEUE, secs(60), cpu_retry()),
        ),
        (
            RUN_INFERENCE.name,
            ActivityOptions::new(GPU_QUEUE, secs(120), gpu_retry()).heartbeat_timeout(secs(30)),
        ),
        (
            COMPUTE_EMBEDDINGS.name,
            ActivityOptions::new(GPU_QUEUE, secs(300), gpu_retry()).heartbeat_timeout(secs(30)),
        ),
    ]
}

fn options_of(name: &str) -> ActivityOptions {
    activity_options()
        .into_iter()
        .find(|(n, _)| *n == name)
        .map(|(_, o)| o)
        .unwrap_or_else(|| panic!("no options declared for activity {name:?}"))
}

/// The factory: a [`Registry`] holding both workflows, every activity with its options
/// (routing and policies) and its implementation. The model activities share `models`.
///
/// Fails only on a registration error (an invalid or duplicate name): a bug.
pub fn factory(models: Arc<Models>) -> anyhow::Result<Registry> {
    let mut r = Registry::new();
    r.workflow(PREPARE_AND_INFER, prepare_and_infer)
        .and_then(|r| r.workflow(BATCH_EMBED, batch_embed))
        .and_then(|r| {
            r.activity(
                &VALIDATE_INPUT,
                options_of(VALIDATE_INPUT.name),
                validate_input,
            )
        })
        .and_then(|r| r.activity(&PREPROCESS, options_of(PREPROCESS.name), preprocess))
        .and_then(|r| {
            r.activity(
                &PREPROCESS_BATCH,
                options_of(PREPROCESS_BATCH.name),
                preprocess_batch,
            )
        })
        .context("registering the pipeline workflows")?;
    ingest::register(&mut r, models.clone()).context("registering document_ingest")?;
    finetune::register(&mut r, models.clone()).context("registering fine_tune and eval")?;
    let m = models.clone();
    let embeds = Arc::new(embedding_batcher(models.clone()));
    r.activity(
        &RUN_INFERENCE,
        options_of(RUN_INFERENCE.name),
        move |ctx, text| run_inference(m.clone(), embeds.clone(), ctx, text),
    )
    .context("registering run_inference")?;
    let m = models;
    r.activity(
        &COMPUTE_EMBEDDINGS,
        options_of(COMPUTE_EMBEDDINGS.name),
        move |ctx, texts| compute_embeddings(m.clone(), ctx, texts),
    )
    .context("registering compute_embeddings")?;
    bench::register(&mut r).context("registering bench_pipeline")?;
    chaos::register(&mut r).context("registering chaos_pipeline")?;
    Ok(r)
}

#[cfg(test)]
mod tests;
