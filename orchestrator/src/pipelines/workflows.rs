//! The pipeline's workflows. Deterministic: they only schedule activities through the
//! context and combine their results.

use baton_actors::{WorkflowContext, WorkflowError};
use serde::{Deserialize, Serialize};

use super::activities::{
    COMPUTE_EMBEDDINGS, Inference, PREPROCESS, PREPROCESS_BATCH, RUN_INFERENCE, VALIDATE_INPUT,
};

/// Name of the workflow [`prepare_and_infer`].
pub const PREPARE_AND_INFER: &str = "prepare_and_infer";
/// Name of the workflow [`batch_embed`].
pub const BATCH_EMBED: &str = "batch_embed";

/// Input of [`prepare_and_infer`]: `{"text": "..."}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrepareInput {
    /// The text to classify.
    pub text: String,
}

/// Input of [`batch_embed`]: `{"texts": ["...", ...]}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchInput {
    /// The texts to embed.
    pub texts: Vec<String>,
}

/// Output of [`batch_embed`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BatchOutput {
    /// The embedding model.
    pub model: String,
    /// Length of each vector.
    pub dim: usize,
    /// One vector per kept text: the inputs in order, minus those listed in `dropped`.
    pub embeddings: Vec<Vec<f32>>,
    /// Indices (into the input) of the texts dropped because they were empty.
    pub dropped: Vec<usize>,
}

/// `prepare_and_infer`: validate_input (cpu) -> preprocess (cpu) -> run_inference (gpu).
pub async fn prepare_and_infer(
    ctx: WorkflowContext,
    input: PrepareInput,
) -> Result<Inference, WorkflowError> {
    let valid = ctx.activity(&VALIDATE_INPUT, &input.text).await?;
    let clean = ctx.activity(&PREPROCESS, &valid).await?;
    Ok(ctx.activity(&RUN_INFERENCE, &clean).await?)
}

/// `batch_embed`: preprocess_batch (cpu) -> compute_embeddings (gpu).
pub async fn batch_embed(
    ctx: WorkflowContext,
    input: BatchInput,
) -> Result<BatchOutput, WorkflowError> {
    let batch = ctx.activity(&PREPROCESS_BATCH, &input.texts).await?;
    let e = ctx.activity(&COMPUTE_EMBEDDINGS, &batch.texts).await?;
    if e.embeddings.len() != batch.texts.len() {
        return Err(WorkflowError::new(
            "InternalError",
            format!(
                "{} embeddings for {} texts",
                e.embeddings.len(),
                batch.texts.len()
            ),
        ));
    }
    Ok(BatchOutput {
        model: e.model,
        dim: e.dim,
        embeddings: e.embeddings,
        dropped: batch.dropped,
    })
}
