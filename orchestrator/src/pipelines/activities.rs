//! The pipeline's activities: typed declarations, the pure logic they run, and the
//! activity functions the workers call.

use std::sync::Arc;

use baton_actors::{ActivityContext, ActivityDef, ActivityError, batching::Batcher};
use serde::{Deserialize, Serialize};

use super::models::Models;

/// Longest text accepted, in characters (Unicode scalar values, not bytes).
pub const MAX_TEXT_CHARS: usize = 10_000;
/// Most texts accepted in one batch.
pub const MAX_BATCH_TEXTS: usize = 1_000;
/// Texts per model call in [`compute_embeddings`]; a heartbeat follows each chunk.
pub const EMBED_CHUNK: usize = 32;
/// The embedding model's name, as reported in [`Embeddings::model`].
pub const MODEL_NAME: &str = "all-MiniLM-L6-v2-int8";

/// `validate_input(text) -> text` (cpu): refuses empty and over-long texts, trims.
pub const VALIDATE_INPUT: ActivityDef<String, String> = ActivityDef::new("validate_input");
/// `preprocess(text) -> text` (cpu): collapses whitespace, lowercases.
pub const PREPROCESS: ActivityDef<String, String> = ActivityDef::new("preprocess");
/// `preprocess_batch(texts) -> PreprocessedBatch` (cpu): [`PREPROCESS`] over a batch,
/// dropping the texts left empty.
pub const PREPROCESS_BATCH: ActivityDef<Vec<String>, PreprocessedBatch> =
    ActivityDef::new("preprocess_batch");
/// `run_inference(text) -> Inference` (gpu): sentiment with the embedding model and the
/// latest fine-tuned head of the `sentiment` model, or the zero-shot prototypes.
pub const RUN_INFERENCE: ActivityDef<String, Inference> = ActivityDef::new("run_inference");
/// `compute_embeddings(texts) -> Embeddings` (gpu): one unit vector per text.
pub const COMPUTE_EMBEDDINGS: ActivityDef<Vec<String>, Embeddings> =
    ActivityDef::new("compute_embeddings");

/// The result of [`PREPROCESS_BATCH`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PreprocessedBatch {
    /// The normalised texts that were kept, in input order.
    pub texts: Vec<String>,
    /// Indices (into the input) of the texts dropped because they were empty.
    pub dropped: Vec<usize>,
}

/// The result of [`RUN_INFERENCE`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Inference {
    /// The text classified.
    pub input: String,
    /// `positive` or `negative` (or another class of the fine-tuned head).
    pub label: String,
    /// The label's probability: in [0.5, 1] with two classes (zero-shot: see
    /// [`SOFTMAX_TEMPERATURE`](super::SOFTMAX_TEMPERATURE); fine-tuned: the head's softmax).
    pub score: f32,
    /// What classified it: `<model>.v<N>` (the latest registered fine-tuned head of the
    /// `sentiment` model) or `zero-shot` (the prototypes). Empty in results recorded before
    /// the field existed.
    #[serde(default)]
    pub model: String,
}

/// The result of [`COMPUTE_EMBEDDINGS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Embeddings {
    /// The model ([`MODEL_NAME`]).
    pub model: String,
    /// Length of each vector (384).
    pub dim: usize,
    /// One unit-length vector per input text, in order.
    pub embeddings: Vec<Vec<f32>>,
}

/// Heartbeat details of [`COMPUTE_EMBEDDINGS`]: texts embedded so far, out of `total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Texts embedded.
    pub done: usize,
    /// Texts in all.
    pub total: usize,
}

fn validation(message: impl Into<String>) -> ActivityError {
    ActivityError::non_retryable("ValidationError", message)
}

/// The logic of [`VALIDATE_INPUT`]: an empty or whitespace-only text, or one over
/// [`MAX_TEXT_CHARS`] characters, is a non-retryable `ValidationError`; otherwise the text,
/// trimmed.
pub fn validate_text(text: &str) -> Result<String, ActivityError> {
    let trimmed = text.trim();
    if trimmed.is_empty() {
        return Err(validation("input text is empty"));
    }
    let chars = text.chars().count();
    if chars > MAX_TEXT_CHARS {
        return Err(validation(format!(
            "input text is {chars} characters long; the limit is {MAX_TEXT_CHARS}"
        )));
    }
    Ok(trimmed.to_string())
}

/// The logic of [`PREPROCESS`]: runs of whitespace become one space, the ends are trimmed,
/// the text is lowercased.
pub fn normalize(text: &str) -> String {
    text.split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

/// The logic of [`PREPROCESS_BATCH`]: more than [`MAX_BATCH_TEXTS`] texts, or a text over
/// [`MAX_TEXT_CHARS`] characters, is a non-retryable `ValidationError`; each text is
/// [`normalize`]d and those left empty are dropped, their indices listed.
pub fn preprocess_batch_texts(texts: &[String]) -> Result<PreprocessedBatch, ActivityError> {
    if texts.len() > MAX_BATCH_TEXTS {
        return Err(validation(format!(
            "the batch has {} texts; the limit is {MAX_BATCH_TEXTS}",
            texts.len()
        )));
    }
    let mut batch = PreprocessedBatch {
        texts: Vec::with_capacity(texts.len()),
        dropped: Vec::new(),
    };
    for (i, text) in texts.iter().enumerate() {
        let chars = text.chars().count();
        if chars > MAX_TEXT_CHARS {
            return Err(validation(format!(
                "text {i} is {chars} characters long; the limit is {MAX_TEXT_CHARS}"
            )));
        }
        let clean = normalize(text);
        if clean.is_empty() {
            batch.dropped.push(i);
        } else {
            batch.texts.push(clean);
        }
    }
    Ok(batch)
}

/// [`VALIDATE_INPUT`]'s implementation.
pub async fn validate_input(_ctx: ActivityContext, text: String) -> Result<String, ActivityError> {
    validate_text(&text)
}

/// [`PREPROCESS`]'s implementation.
pub async fn preprocess(_ctx: ActivityContext, text: String) -> Result<String, ActivityError> {
    Ok(normalize(&text))
}

/// [`PREPROCESS_BATCH`]'s implementation.
pub async fn preprocess_batch(
    _ctx: ActivityContext,
    texts: Vec<String>,
) -> Result<PreprocessedBatch, ActivityError> {
    preprocess_batch_texts(&texts)
}

/// A model failure: retryable (another attempt, or another worker, may succeed).
pub(crate) fn inference_error(e: impl std::fmt::Display) -> ActivityError {
    ActivityError::retryable("InferenceError", e.to_string())
}

/// Runs blocking work (tokenizing, the model, file reads) off the async threads; shared by
/// every pipeline's activities.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ActivityError> + Send + 'static,
) -> Result<T, ActivityError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| inference_error(format!("the blocking task did not finish: {e}")))?
}

/// The forward passes behind [`RUN_INFERENCE`]: the texts of the attempts running at once
/// in this worker (from many workflows) are embedded together, up to
/// [`Models::batching`]'s batch size a pass. Each attempt stays its own activity.
pub fn embedding_batcher(models: Arc<Models>) -> Batcher<String, Vec<f32>> {
    Batcher::new(models.batching(), move |texts: Vec<String>| {
        let embedder = models.embedder()?;
        let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
        embedder.embed(&refs).map_err(inference_error)
    })
}

/// [`RUN_INFERENCE`]'s implementation: embeds the text (in a batch with the other attempts
/// running at once, through `embeds`) and classifies it with the latest registered
/// fine-tuned head of the `sentiment` model ([`Models::latest_head`], cached for two
/// seconds) when there is one, else against the sentiment prototypes
/// ([`Sentiment`](super::Sentiment), `model: "zero-shot"`). Heartbeats before and after the
/// model runs. The first call in a process loads the model.
pub async fn run_inference(
    models: Arc<Models>,
    embeds: Arc<Batcher<String, Vec<f32>>>,
    ctx: ActivityContext,
    text: String,
) -> Result<Inference, ActivityError> {
    ctx.heartbeat();
    let fine = models.latest_head(super::finetune::SENTIMENT_MODEL).await?;
    let vector = embeds.call(text.clone()).await?;
    let inference = blocking(move || {
        let vector = &vector;
        let (label, score, model) = match fine.as_deref() {
            Some(f) if f.head.dim == vector.len() => {
                let (class, p) = f.head.predict(vector);
                (f.head.labels[class].clone(), p, f.name.clone())
            }
            other => {
                if let Some(f) = other {
                    tracing::warn!(model = %f.name, dim = f.head.dim, got = vector.len(),
                        "the fine-tuned head does not fit this embedder; classifying zero-shot");
                }
                let (label, score) = models.sentiment()?.classify(vector);
                (label.to_string(), score, super::eval::ZERO_SHOT.to_string())
            }
        };
        Ok(Inference {
            input: text,
            label,
            score,
            model,
        })
    })
    .await?;
    ctx.heartbeat();
    Ok(inference)
}

/// [`COMPUTE_EMBEDDINGS`]'s implementation: embeds in chunks of [`EMBED_CHUNK`], each on
/// a blocking thread, heartbeating [`Progress`] after each chunk. More than
/// [`MAX_BATCH_TEXTS`] texts is a non-retryable `ValidationError`.
pub async fn compute_embeddings(
    models: Arc<Models>,
    ctx: ActivityContext,
    texts: Vec<String>,
) -> Result<Embeddings, ActivityError> {
    let total = texts.len();
    if total > MAX_BATCH_TEXTS {
        return Err(validation(format!(
            "{total} texts to embed; the limit is {MAX_BATCH_TEXTS}"
        )));
    }
    ctx.heartbeat_with(&Progress { done: 0, total });
    let embedder = blocking(move || models.embedder()).await?;
    let texts = Arc::new(texts);
    let mut embeddings = Vec::with_capacity(total);
    for start in (0..total).step_by(EMBED_CHUNK) {
        let end = (start + EMBED_CHUNK).min(total);
        let (embedder, texts) = (embedder.clone(), texts.clone());
        let vectors = blocking(move || {
            let chunk: Vec<&str> = texts[start..end].iter().map(String::as_str).collect();
            embedder.embed(&chunk).map_err(inference_error)
        })
        .await?;
        embeddings.extend(vectors);
        ctx.heartbeat_with(&Progress { done: end, total });
    }
    Ok(Embeddings {
        model: MODEL_NAME.to_string(),
        dim: embedder.dim(),
        embeddings,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn is_validation(e: &ActivityError) -> bool {
        e.kind == "ValidationError" && !e.retryable
    }

    #[test]
    fn validate_refuses_empty_and_whitespace_only_text() {
        for text in ["", " ", "\n\t  \r\n", "\u{3000}"] {
            let e = validate_text(text).unwrap_err();
            assert!(is_validation(&e), "{text:?}: {e:?}");
            assert_eq!(e.message, "input text is empty");
        }
    }

    #[test]
    fn validate_trims_and_counts_characters_not_bytes() {
        assert_eq!(validate_text("  Hello world!  \n").unwrap(), "Hello world!");
        // 10,000 two-byte characters: 20,000 bytes but within the limit.
        let at_limit = "é".repeat(MAX_TEXT_CHARS);
        assert_eq!(validate_text(&at_limit).unwrap(), at_limit);
        let over = "é".repeat(MAX_TEXT_CHARS + 1);
        let e = validate_text(&over).unwrap_err();
        assert!(is_validation(&e));
        assert!(e.message.contains("10001"), "{}", e.message);
    }

    #[test]
    fn normalize_collapses_whitespace_and_lowercases() {
        assert_eq!(
            normalize("  Hello \t\n  WORLD,  this is\u{a0}A Test!  "),
            "hello world, this is a test!"
        );
        assert_eq!(normalize("   "), "");
        assert_eq!(normalize("ÉCOLE Straße"), "école straße");
    }

    #[test]
    fn preprocess_batch_drops_empty_texts_and_lists_their_indices() {
        let texts: Vec<String> = [
            "  First  Document ",
            "",
            "second\tdocument",
            " \n ",
            "THIRD",
        ]
        .map(String::from)
        .to_vec();
        let b = preprocess_batch_texts(&texts).unwrap();
        assert_eq!(b.texts, ["first document", "second document", "third"]);
        assert_eq!(b.dropped, [1, 3]);
        let empty = preprocess_batch_texts(&[]).unwrap();
        assert!(empty.texts.is_empty() && empty.dropped.is_empty());
    }

    #[test]
    fn preprocess_batch_enforces_its_limits() {
        let many = vec!["x".to_string(); MAX_BATCH_TEXTS + 1];
        let e = preprocess_batch_texts(&many).unwrap_err();
        assert!(is_validation(&e) && e.message.contains("1001"), "{e:?}");
        assert!(preprocess_batch_texts(&many[..MAX_BATCH_TEXTS]).is_ok());

        let texts = vec![
            "ok".to_string(),
            "fine".to_string(),
            "y".repeat(MAX_TEXT_CHARS + 1),
        ];
        let e = preprocess_batch_texts(&texts).unwrap_err();
        assert!(
            is_validation(&e) && e.message.starts_with("text 2 "),
            "{e:?}"
        );
    }

    #[tokio::test]
    async fn cpu_activities_wrap_the_pure_functions() {
        let ctx = super::super::tests::context("validate_input");
        assert_eq!(
            validate_input(ctx.clone(), " a ".into()).await.unwrap(),
            "a"
        );
        assert_eq!(
            preprocess(ctx.clone(), " A  B ".into()).await.unwrap(),
            "a b"
        );
        let b = preprocess_batch(ctx, vec!["".into(), "X".into()])
            .await
            .unwrap();
        assert_eq!((b.texts, b.dropped), (vec!["x".to_string()], vec![0]));
    }
}
