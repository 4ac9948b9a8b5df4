//! Fine-tuning: a labelled JSONL dataset becomes a registered classification head.
//!
//! | step | queue | what |
//! |---|---|---|
//! | [`VALIDATE_DATASET`] | cpu | parse and check the rows (an error names the line), hash them, split train/holdout (seeded, stratified) |
//! | [`EMBED_TEXTS`] | gpu | embed train + holdout; the vectors go to the object store, the journal keeps a reference |
//! | [`TRAIN_HEAD`] | gpu | many SGD epochs as one long heartbeating activity, checkpointing to the object store; a later attempt or redelivery resumes from the last checkpoint |
//! | [`EVALUATE_HEAD`] | cpu | accuracy, macro-F1, per-class figures on the holdout, and the zero-shot prototypes' on the same rows |
//! | [`REGISTER_MODEL`] | cpu | a new version in the model store, with metrics, dataset hash and timestamp |
//!
//! The `eval` workflow ([`super::eval`]) reuses the first two steps. [`register`] adds both
//! workflows and every activity, with its options, to the factory's registry.

use std::{
    collections::{BTreeMap, VecDeque},
    path::Path,
    sync::{Arc, OnceLock},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use baton_actors::{
    ActivityContext, ActivityDef, ActivityError, ActivityOptions, Registry, RetryPolicy,
    WorkflowContext, WorkflowError,
};
use baton_gpu_kernels::{Compute, LinearHead};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{
    CPU_QUEUE, GPU_QUEUE,
    activities::{
        EMBED_CHUNK, MAX_TEXT_CHARS, MODEL_NAME, Progress, blocking, inference_error, normalize,
    },
    cpu_retry,
    eval::{self, EVAL, EVALUATE_MODELS, Metrics, classification_metrics, evaluate_models},
    model_store::{
        ModelStore, ModelVersion, StoreError, TrainingSummary, checkpoint_artifact,
        embeddings_artifact, head_artifact,
    },
    models::{Models, SOFTMAX_TEMPERATURE},
};

/// Name of the workflow [`fine_tune`].
pub const FINE_TUNE: &str = "fine_tune";
/// The model `run_inference` classifies with, and the default of `fine_tune` and `eval`.
pub const SENTIMENT_MODEL: &str = "sentiment";
/// Most rows in a dataset.
pub const MAX_DATASET_ROWS: usize = 20_000;
/// Most distinct labels in a dataset.
pub const MAX_LABELS: usize = 20;
/// Longest label, in characters.
pub const MAX_LABEL_CHARS: usize = 64;
/// Largest dataset file read, in bytes.
pub const MAX_DATASET_BYTES: u64 = 64 << 20;
/// Prefix of the datasets compiled into the binary: `builtin:sentiment/train` and
/// `builtin:sentiment/test` (the shipped split of `orchestrator/data/sentiment`).
pub const BUILTIN_PREFIX: &str = "builtin:";
/// Checkpoints are at most this frequent, whatever `checkpoint_every` says: each is an
/// object-store write and a durable heartbeat.
pub const MIN_CHECKPOINT_INTERVAL: Duration = Duration::from_millis(200);
/// Progress heartbeats (with details) between checkpoints are at most this frequent.
pub const PROGRESS_INTERVAL: Duration = Duration::from_secs(1);

const SENTIMENT_TRAIN: &str = include_str!("../../data/sentiment/train.jsonl");
const SENTIMENT_TEST: &str = include_str!("../../data/sentiment/test.jsonl");

/// `validate_dataset(DatasetRequest) -> DatasetSplit` (cpu).
pub const VALIDATE_DATASET: ActivityDef<DatasetRequest, DatasetSplit> =
    ActivityDef::new("validate_dataset");
/// `embed_texts(EmbedRequest) -> EmbeddingSetRef` (gpu).
pub const EMBED_TEXTS: ActivityDef<EmbedRequest, EmbeddingSetRef> = ActivityDef::new("embed_texts");
/// `train_head(TrainRequest) -> TrainResult` (gpu, heartbeating, resumable).
pub const TRAIN_HEAD: ActivityDef<TrainRequest, TrainResult> = ActivityDef::new("train_head");
/// `evaluate_head(EvaluateRequest) -> Evaluation` (cpu).
pub const EVALUATE_HEAD: ActivityDef<EvaluateRequest, Evaluation> =
    ActivityDef::new("evaluate_head");
/// `register_model(RegisterRequest) -> ModelVersion` (cpu).
pub const REGISTER_MODEL: ActivityDef<RegisterRequest, ModelVersion> =
    ActivityDef::new("register_model");

fn validation(message: impl Into<String>) -> ActivityError {
    ActivityError::non_retryable("ValidationError", message)
}

pub use super::models::{FineTuned, LATEST_TTL, classify_with_centroids};

// --- datasets ------------------------------------------------------------------------

/// One labelled example.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Row {
    /// The text.
    pub text: String,
    /// Its label.
    pub label: String,
}

/// Where a dataset comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DatasetSource {
    /// A JSONL file on the worker (one `{"text", "label"}` object per line), or a
    /// [`BUILTIN_PREFIX`] dataset.
    Path(String),
    /// Rows given inline.
    Rows(Vec<Row>),
}

/// Input of [`VALIDATE_DATASET`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetRequest {
    /// The dataset.
    pub source: DatasetSource,
    /// The labels allowed, if fixed in advance (any other is an error naming its line).
    pub labels: Option<Vec<String>>,
    /// Fraction of each label's rows held out, in [0, 1].
    pub holdout: f64,
    /// Seed of the split.
    pub seed: u64,
    /// Fewest distinct labels accepted.
    pub min_labels: usize,
    /// Fewest rows per label accepted.
    pub min_rows_per_label: usize,
}

/// Result of [`VALIDATE_DATASET`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DatasetSplit {
    /// The distinct labels, sorted: class `i` of a head is `labels[i]`.
    pub labels: Vec<String>,
    /// The training rows, in dataset order.
    pub train: Vec<Row>,
    /// The held-out rows, in dataset order.
    pub holdout: Vec<Row>,
    /// SHA-256 (hex) of the validated rows, see [`dataset_sha256`].
    pub dataset_sha256: String,
}

/// Rows with where each came from (`line 17` of a file, `row 3` of an inline list).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// The rows, in order.
    pub rows: Vec<Row>,
    /// The line (or row) number of each row, from 1.
    pub lines: Vec<usize>,
    /// `"line"` or `"row"`.
    pub unit: &'static str,
}

fn strip_position(e: &serde_json::Error) -> String {
    let s = e.to_string();
    let msg = match s.rfind(" at line ") {
        Some(i) => &s[..i],
        None => &s,
    };
    match e.classify() {
        serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
            format!("{msg} (column {})", e.column())
        }
        _ => msg.to_string(),
    }
}

/// Parses JSONL: one `{"text": "...", "label": "..."}` object per line; blank lines are
/// skipped (but counted). A line that is not such an object, not UTF-8, or past
/// [`MAX_DATASET_ROWS`] rows is a `ValidationError` naming the line.
pub fn parse_jsonl(bytes: &[u8]) -> Result<Dataset, ActivityError> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let mut ds = Dataset {
        rows: Vec::new(),
        lines: Vec::new(),
        unit: "line",
    };
    for (i, raw) in bytes.split(|b| *b == b'\n').enumerate() {
        let n = i + 1;
        let line = std::str::from_utf8(raw)
            .map_err(|e| validation(format!("line {n}: not valid UTF-8 ({e})")))?;
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if ds.rows.len() == MAX_DATASET_ROWS {
            return Err(validation(format!(
                "line {n}: more than {MAX_DATASET_ROWS} rows; the limit is {MAX_DATASET_ROWS}"
            )));
        }
        let row: Row = serde_json::from_str(line)
            .map_err(|e| validation(format!("line {n}: {}", strip_position(&e))))?;
        ds.rows.push(row);
        ds.lines.push(n);
    }
    Ok(ds)
}

/// Inline rows as a [`Dataset`] (numbered `row 1`, `row 2`, ...).
pub fn inline_rows(rows: Vec<Row>) -> Result<Dataset, ActivityError> {
    if rows.len() > MAX_DATASET_ROWS {
        return Err(validation(format!(
            "{} rows; the limit is {MAX_DATASET_ROWS}",
            rows.len()
        )));
    }
    let lines = (1..=rows.len()).collect();
    Ok(Dataset {
        rows,
        lines,
        unit: "row",
    })
}

/// Checks every row and the label set; returns the labels, sorted. Labels are trimmed in
/// place. Each error names the line (or row) at fault:
///
/// - text empty (after trimming) or over [`MAX_TEXT_CHARS`] characters; label empty or
///   over [`MAX_LABEL_CHARS`];
/// - a label outside `allowed` (when given): `line 3: unknown label "neutral" (expected
///   one of "negative", "positive")`;
/// - a label that differs from an earlier one only in case or surrounding whitespace;
/// - a label beyond the [`MAX_LABELS`]th;
/// - then, for the whole set: no rows, fewer than `min_labels` labels, a label with fewer
///   than `min_rows_per_label` rows (naming its first line).
pub fn check_dataset(
    ds: &mut Dataset,
    allowed: Option<&[String]>,
    min_labels: usize,
    min_rows_per_label: usize,
) -> Result<Vec<String>, ActivityError> {
    let unit = ds.unit;
    // label -> (first line, rows)
    let mut seen: BTreeMap<String, (usize, usize)> = BTreeMap::new();
    for (row, &n) in ds.rows.iter_mut().zip(&ds.lines) {
        let at = |msg: String| validation(format!("{unit} {n}: {msg}"));
        if row.text.trim().is_empty() {
            return Err(at("text is empty".into()));
        }
        let chars = row.text.chars().count();
        if chars > MAX_TEXT_CHARS {
            return Err(at(format!(
                "text is {chars} characters long; the limit is {MAX_TEXT_CHARS}"
            )));
        }
        let label = row.label.trim();
        if label.is_empty() {
            return Err(at("label is empty".into()));
        }
        if label.chars().count() > MAX_LABEL_CHARS {
            return Err(at(format!(
                "label is longer than {MAX_LABEL_CHARS} characters"
            )));
        }
        if label.len() != row.label.len() {
            row.label = label.to_string();
        }
        if let Some(entry) = seen.get_mut(&row.label) {
            entry.1 += 1;
            continue;
        }
        if let Some(allowed) = allowed
            && !allowed.contains(&row.label)
        {
            let expected: Vec<String> = allowed.iter().map(|l| format!("{l:?}")).collect();
            return Err(at(format!(
                "unknown label {:?} (expected one of {})",
                row.label,
                expected.join(", ")
            )));
        }
        if let Some((other, (line, _))) = seen
            .iter()
            .find(|(l, _)| l.to_lowercase() == row.label.to_lowercase())
        {
            return Err(at(format!(
                "label {:?} differs from {other:?} ({unit} {line}) only in case",
                row.label
            )));
        }
        if seen.len() == MAX_LABELS {
            return Err(at(format!(
                "label {:?} is one more than the limit of {MAX_LABELS} distinct labels",
                row.label
            )));
        }
        seen.insert(row.label.clone(), (n, 1));
    }
    if ds.rows.is_empty() {
        return Err(validation("the dataset has no rows"));
    }
    if seen.len() < min_labels {
        let names: Vec<String> = seen.keys().map(|l| format!("{l:?}")).collect();
        return Err(validation(format!(
            "the dataset has {} label{} ({}); at least {min_labels} are needed",
            seen.len(),
            if seen.len() == 1 { "" } else { "s" },
            names.join(", ")
        )));
    }
    for (label, (line, count)) in &seen {
        if *count < min_rows_per_label {
            return Err(validation(format!(
                "{unit} {line}: label {label:?} has {count} row{}; each label needs at least {min_rows_per_label}",
                if *count == 1 { "" } else { "s" }
            )));
        }
    }
    Ok(seen.into_keys().collect())
}

/// SHA-256 (hex) of the rows as canonical JSONL: `{"text":...,"label":...}` and a newline
/// per row, in order. The same rows hash the same whether they came from a file (whatever
/// its formatting) or inline.
pub fn dataset_sha256(rows: &[Row]) -> String {
    let mut h = Sha256::new();
    for row in rows {
        h.update(serde_json::to_vec(row).expect("a row serialises"));
        h.update(b"\n");
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// SplitMix64: a small, well-mixed, seedable generator. Deterministic everywhere, which is
/// what the split and the epoch orders need.
#[derive(Debug, Clone)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator from a seed.
    pub fn new(seed: u64) -> SplitMix64 {
        SplitMix64(seed)
    }

    /// The next value.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Fisher-Yates shuffle.
    pub fn shuffle<T>(&mut self, v: &mut [T]) {
        for i in (1..v.len()).rev() {
            let j = (self.next_u64() % (i as u64 + 1)) as usize;
            v.swap(i, j);
        }
    }
}

/// The stratified split: for each label (in sorted order), its rows' indices are shuffled
/// by one generator seeded with `seed`, and the first `round(n × holdout)` are held out,
/// but at least one and at most `n - 1` when `0 < holdout < 1`. Returns (train, holdout)
/// indices, each in dataset order.
pub fn split_indices(rows: &[Row], holdout: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
    let mut by_label: BTreeMap<&str, Vec<usize>> = BTreeMap::new();
    for (i, r) in rows.iter().enumerate() {
        by_label.entry(&r.label).or_default().push(i);
    }
    let mut rng = SplitMix64::new(seed);
    let mut held = vec![false; rows.len()];
    for idx in by_label.values_mut() {
        let n = idx.len();
        let mut k = (n as f64 * holdout).round() as usize;
        if holdout > 0.0 && holdout < 1.0 && n >= 2 {
            k = k.clamp(1, n - 1);
        }
        rng.shuffle(idx);
        for &i in &idx[..k.min(n)] {
            held[i] = true;
        }
    }
    (0..rows.len()).partition(|&i| !held[i])
}

/// The logic of [`VALIDATE_DATASET`] once the dataset is parsed.
pub fn prepare_split(mut ds: Dataset, req: &DatasetRequest) -> Result<DatasetSplit, ActivityError> {
    let labels = check_dataset(
        &mut ds,
        req.labels.as_deref(),
        req.min_labels,
        req.min_rows_per_label,
    )?;
    let dataset_sha256 = dataset_sha256(&ds.rows);
    let (train, holdout) = split_indices(&ds.rows, req.holdout, req.seed);
    let pick = |idx: Vec<usize>| idx.into_iter().map(|i| ds.rows[i].clone()).collect();
    Ok(DatasetSplit {
        labels,
        train: pick(train),
        holdout: pick(holdout),
        dataset_sha256,
    })
}

/// Reads a dataset file (or a builtin one) from this worker.
async fn read_source(path: &str) -> Result<Vec<u8>, ActivityError> {
    if let Some(name) = path.strip_prefix(BUILTIN_PREFIX) {
        return match name {
            "sentiment/train" => Ok(SENTIMENT_TRAIN.as_bytes().to_vec()),
            "sentiment/test" => Ok(SENTIMENT_TEST.as_bytes().to_vec()),
            _ => Err(validation(format!(
                "no builtin dataset {name:?}; there are \"sentiment/train\" and \"sentiment/test\""
            ))),
        };
    }
    let meta = tokio::fs::metadata(Path::new(path))
        .await
        .map_err(|e| validation(format!("dataset {path}: {e}")))?;
    if meta.len() > MAX_DATASET_BYTES {
        return Err(validation(format!(
            "dataset {path} is {} bytes; the limit is {MAX_DATASET_BYTES}",
            meta.len()
        )));
    }
    tokio::fs::read(path)
        .await
        .map_err(|e| validation(format!("dataset {path}: {e}")))
}

/// [`VALIDATE_DATASET`]'s implementation: reads the file on this worker (or takes the
/// inline rows), checks it ([`check_dataset`]), hashes it and splits it. Every refusal is
/// a non-retryable `ValidationError`.
pub async fn validate_dataset(
    _ctx: ActivityContext,
    req: DatasetRequest,
) -> Result<DatasetSplit, ActivityError> {
    if !(0.0..=1.0).contains(&req.holdout) {
        return Err(validation(format!(
            "holdout is {}; it must be within [0, 1]",
            req.holdout
        )));
    }
    let ds = match &req.source {
        DatasetSource::Path(path) => parse_jsonl(&read_source(path).await?)?,
        DatasetSource::Rows(rows) => inline_rows(rows.clone())?,
    };
    prepare_split(ds, &req)
}

// --- embeddings ----------------------------------------------------------------------

/// Input of [`EMBED_TEXTS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbedRequest {
    /// The texts, embedded after [`normalize`] (as `prepare_and_infer` does before
    /// inference).
    pub texts: Vec<String>,
}

/// Result of [`EMBED_TEXTS`]: where the [`EmbeddingSet`] is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EmbeddingSetRef {
    /// Its object in the model store.
    pub artifact: String,
    /// Vectors in it (one per text, in order).
    pub rows: usize,
    /// Their dimension.
    pub dim: usize,
    /// The embedding model.
    pub embedder: String,
}

/// Embeddings of a list of texts, stored as one object, with the zero-shot classifier's
/// centroids computed by the same embedder (so evaluation needs no model).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmbeddingSet {
    /// The embedding model.
    pub embedder: String,
    /// Vector dimension.
    pub dim: usize,
    /// `rows × dim`, row-major, each row a unit vector.
    pub vectors: Vec<f32>,
    /// The zero-shot sentiment centroids: (label, unit vector).
    pub zero_shot: Vec<(String, Vec<f32>)>,
}

impl EmbeddingSet {
    /// Number of vectors.
    pub fn rows(&self) -> usize {
        self.vectors.len().checked_div(self.dim).unwrap_or(0)
    }

    /// Vector `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.vectors[i * self.dim..][..self.dim]
    }

    /// Vectors `start..end`, flat.
    pub fn range(&self, start: usize, end: usize) -> &[f32] {
        &self.vectors[start * self.dim..end * self.dim]
    }
}

/// Loads an embedding set, checking it holds `rows` vectors at least.
pub(crate) async fn load_embeddings(
    store: &ModelStore,
    artifact: &str,
    rows: usize,
) -> Result<Arc<EmbeddingSet>, ActivityError> {
    let set: EmbeddingSet = store
        .get_value(artifact)
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("the embedding set {artifact} is missing")))?;
    if set.dim == 0 || !set.vectors.len().is_multiple_of(set.dim) || set.rows() < rows {
        return Err(StoreError::Corrupt(format!(
            "the embedding set {artifact} has {} values of dimension {}, {rows} vectors expected",
            set.vectors.len(),
            set.dim
        ))
        .into());
    }
    Ok(Arc::new(set))
}

/// [`EMBED_TEXTS`]'s implementation: embeds in chunks of [`EMBED_CHUNK`] on a blocking
/// thread, heartbeating [`Progress`] after each, then stores the [`EmbeddingSet`] as
/// `embeddings/<run_id>/<seq>` and returns a reference to it.
pub async fn embed_texts(
    models: Arc<Models>,
    ctx: ActivityContext,
    req: EmbedRequest,
) -> Result<EmbeddingSetRef, ActivityError> {
    let total = req.texts.len();
    if total > MAX_DATASET_ROWS {
        return Err(validation(format!(
            "{total} texts to embed; the limit is {MAX_DATASET_ROWS}"
        )));
    }
    let store = models.store().await?;
    ctx.heartbeat_with(&Progress { done: 0, total });
    let m = models.clone();
    let (embedder, sentiment) = blocking(move || Ok((m.embedder()?, m.sentiment()?))).await?;
    let texts: Arc<Vec<String>> = Arc::new(req.texts.iter().map(|t| normalize(t)).collect());
    let dim = embedder.dim();
    let mut vectors = Vec::with_capacity(total * dim);
    for start in (0..total).step_by(EMBED_CHUNK) {
        let end = (start + EMBED_CHUNK).min(total);
        let (embedder, texts) = (embedder.clone(), texts.clone());
        let chunk = blocking(move || {
            let chunk: Vec<&str> = texts[start..end].iter().map(String::as_str).collect();
            embedder.embed(&chunk).map_err(inference_error)
        })
        .await?;
        for v in chunk {
            if v.len() != dim {
                return Err(inference_error(format!(
                    "a vector of {} values, not {dim}",
                    v.len()
                )));
            }
            vectors.extend(v);
        }
        ctx.heartbeat_with(&Progress { done: end, total });
    }
    let set = EmbeddingSet {
        embedder: MODEL_NAME.to_string(),
        dim,
        vectors,
        zero_shot: sentiment.centroids(),
    };
    let info = ctx.info();
    let artifact = embeddings_artifact(&info.run_id, info.seq);
    store.put_value(&artifact, &set).await?;
    Ok(EmbeddingSetRef {
        artifact,
        rows: total,
        dim,
        embedder: set.embedder,
    })
}

// --- training ------------------------------------------------------------------------

/// Input of [`TRAIN_HEAD`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRequest {
    /// The embedding set; its first `rows` vectors are the training rows.
    pub embeddings: String,
    /// Training rows.
    pub rows: usize,
    /// The class of each training row (an index into `labels`).
    pub targets: Vec<u32>,
    /// The classes.
    pub labels: Vec<String>,
    /// Epochs in all.
    pub epochs: u32,
    /// SGD step size.
    pub learning_rate: f32,
    /// Mini-batch size.
    pub batch_size: usize,
    /// Seed of the epoch orders.
    pub seed: u64,
    /// A checkpoint every this many epochs (and at most every [`MIN_CHECKPOINT_INTERVAL`]).
    pub checkpoint_every: u32,
    /// L2 pull toward the initial head: after each epoch the weights (not the biases)
    /// move by `min(1, learning_rate × weight_decay)` of their distance to the initial
    /// weights (with a zero initial head, plain weight decay).
    pub weight_decay: f32,
    /// Start from the zero-shot prototypes (each class's centroid over the softmax
    /// temperature, exactly the zero-shot classifier) when the labels are theirs; else, or
    /// when false, from zero.
    pub warm_start: bool,
}

/// Heartbeat details of [`TRAIN_HEAD`]: the last epoch done and the last checkpoint
/// stored. A later attempt (or a redelivery after a worker died) resumes from the
/// checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainProgress {
    /// Epochs done.
    pub epoch: u32,
    /// Epochs in all.
    pub epochs: u32,
    /// Mean loss of the last epoch.
    pub loss: f32,
    /// The newest checkpoint's artifact name, if one was stored.
    pub checkpoint: Option<String>,
}

/// A training checkpoint: the head after `epoch` epochs.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Epochs done.
    pub epoch: u32,
    /// Mean loss of that epoch.
    pub loss: f32,
    /// The head.
    pub head: LinearHead,
}

/// Result of [`TRAIN_HEAD`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainResult {
    /// The trained head's artifact (`heads/<run_id>/<seq>`).
    pub head_artifact: String,
    /// Epochs trained in all (across attempts).
    pub epochs: u32,
    /// Mean loss of the last epoch.
    pub final_loss: f32,
    /// The checkpoint's epoch this attempt resumed from, if it resumed.
    pub resumed_from_epoch: Option<u32>,
    /// Where the epochs ran: `cpu` or `cuda`.
    pub compute: String,
}

/// The sample order of an epoch (from 1): a permutation of `0..n` drawn from
/// `seed` and `epoch` alone, so a resumed run trains exactly as an uninterrupted one.
pub fn epoch_order(n: usize, seed: u64, epoch: u32) -> Vec<usize> {
    let mut rng = SplitMix64::new(seed ^ u64::from(epoch).wrapping_mul(0xD134_2543_DE82_EF95));
    let mut order: Vec<usize> = (0..n).collect();
    rng.shuffle(&mut order);
    order
}

/// The head training starts from: with `warm_start` and labels that are exactly the
/// zero-shot classifier's, its centroids divided by the softmax temperature (for unit
/// vectors this head classifies exactly as the prototypes do); else all zeros.
pub fn initial_head(
    labels: &[String],
    dim: usize,
    zero_shot: &[(String, Vec<f32>)],
    warm_start: bool,
) -> LinearHead {
    let mut head = LinearHead::new(labels.to_vec(), dim);
    let same_labels = zero_shot.len() == labels.len()
        && labels.iter().all(|l| zero_shot.iter().any(|(z, _)| z == l));
    if warm_start && same_labels && zero_shot.iter().all(|(_, c)| c.len() == dim) {
        for (class, label) in labels.iter().enumerate() {
            let (_, centroid) = zero_shot
                .iter()
                .find(|(z, _)| z == label)
                .expect("same labels");
            for (w, c) in head.weights[class * dim..][..dim].iter_mut().zip(centroid) {
                *w = c / SOFTMAX_TEMPERATURE;
            }
        }
    }
    head
}

/// Where the SGD epochs run: the best backend of this process, chosen once.
fn compute() -> &'static Compute {
    static COMPUTE: OnceLock<Compute> = OnceLock::new();
    COMPUTE.get_or_init(Compute::best)
}

/// One training epoch (from 1) on `compute`: SGD over [`epoch_order`], then the weights'
/// L2 pull toward `prior` (the initial head's weights). Returns the epoch's mean loss.
pub fn train_epoch(
    compute: &Compute,
    head: &mut LinearHead,
    prior: &[f32],
    xs: &[f32],
    ys: &[usize],
    req: &TrainRequest,
    epoch: u32,
) -> Result<f32, ActivityError> {
    let order = epoch_order(ys.len(), req.seed, epoch);
    let loss = compute
        .sgd_epoch(head, xs, ys, &order, req.learning_rate, req.batch_size)
        .map_err(|e| ActivityError::non_retryable("TrainingError", e.to_string()))?;
    if req.weight_decay > 0.0 {
        let pull = (req.learning_rate * req.weight_decay).min(1.0);
        for (w, p) in head.weights.iter_mut().zip(prior) {
            *w -= pull * (*w - p);
        }
    }
    let finite = head.weights.iter().chain(&head.bias).all(|w| w.is_finite());
    if !loss.is_finite() || !finite {
        return Err(ActivityError::non_retryable(
            "TrainingDiverged",
            format!(
                "epoch {epoch}: the {} not finite; lower the learning rate",
                if finite { "loss is" } else { "weights are" }
            ),
        ));
    }
    Ok(loss)
}

/// Checks a [`TrainRequest`] against its embedding set.
fn check_train_request(req: &TrainRequest, set: &EmbeddingSet) -> Result<(), ActivityError> {
    let bad = |m: String| Err(validation(m));
    if req.labels.len() < 2 {
        return bad(format!(
            "{} labels; at least 2 are needed",
            req.labels.len()
        ));
    }
    if req.targets.len() != req.rows || req.rows == 0 {
        return bad(format!(
            "{} targets for {} training rows",
            req.targets.len(),
            req.rows
        ));
    }
    if let Some(t) = req
        .targets
        .iter()
        .find(|&&t| t as usize >= req.labels.len())
    {
        return bad(format!("target {t} is not a class of {:?}", req.labels));
    }
    if req.batch_size == 0 || req.checkpoint_every == 0 || req.epochs == 0 {
        return bad("epochs, batch_size and checkpoint_every must be at least 1".into());
    }
    if set.rows() < req.rows {
        return bad(format!(
            "the embedding set has {} vectors, {} training rows expected",
            set.rows(),
            req.rows
        ));
    }
    Ok(())
}

/// Where to start: the checkpoint named in the heartbeat details of an earlier attempt or
/// delivery, if it exists and fits; else the initial head at epoch 0.
async fn resume_point(
    store: &ModelStore,
    ctx: &ActivityContext,
    req: &TrainRequest,
    initial: LinearHead,
) -> (LinearHead, u32, f32, Option<String>) {
    let dim = initial.dim;
    let fresh = move || (initial, 0, f32::NAN, None);
    let Some(progress) = ctx.heartbeat_details::<TrainProgress>() else {
        return fresh();
    };
    let Some(name) = progress.checkpoint else {
        tracing::info!(
            epoch = progress.epoch,
            "an earlier attempt stored no checkpoint; training from epoch 0"
        );
        return fresh();
    };
    match store.get_value::<Checkpoint>(&name).await {
        Ok(Some(c))
            if c.head.labels == req.labels
                && c.head.dim == dim
                && c.head.weights.len() == req.labels.len() * dim
                && c.epoch <= req.epochs =>
        {
            tracing::info!(epoch = c.epoch, checkpoint = %name, "resuming training from checkpoint");
            (c.head, c.epoch, c.loss, Some(name))
        }
        Ok(Some(_)) => {
            tracing::warn!(checkpoint = %name, "the checkpoint does not fit this training; training from epoch 0");
            fresh()
        }
        Ok(None) => {
            tracing::warn!(checkpoint = %name, "the checkpoint is gone; training from epoch 0");
            fresh()
        }
        Err(e) => {
            tracing::warn!(checkpoint = %name, error = %e, "the checkpoint is unreadable; training from epoch 0");
            fresh()
        }
    }
}

/// [`TRAIN_HEAD`]'s implementation: one long activity that runs every epoch.
///
/// - On start, resumes from the checkpoint in the heartbeat details an earlier attempt
///   (or delivery) left, if any: `resuming training from checkpoint epoch=E`.
/// - Each epoch runs on a blocking thread ([`train_epoch`]).
/// - Every `checkpoint_every` epochs (at most every [`MIN_CHECKPOINT_INTERVAL`]) the head
///   is stored as `checkpoints/<run_id>/<seq>/epoch-<E>` and a heartbeat carries
///   [`TrainProgress`] naming it; between checkpoints, progress heartbeats at most every
///   [`PROGRESS_INTERVAL`]. Only the two newest checkpoints are kept while training, and
///   none once the head is stored.
/// - At the end the head is stored as `heads/<run_id>/<seq>`.
pub async fn train_head(
    models: Arc<Models>,
    ctx: ActivityContext,
    req: TrainRequest,
) -> Result<TrainResult, ActivityError> {
    let store = models.store().await?;
    let set = load_embeddings(&store, &req.embeddings, req.rows).await?;
    check_train_request(&req, &set)?;
    let dim = set.dim;
    let initial = initial_head(&req.labels, dim, &set.zero_shot, req.warm_start);
    let xs: Arc<Vec<f32>> = Arc::new(set.range(0, req.rows).to_vec());
    drop(set);
    let ys: Arc<Vec<usize>> = Arc::new(req.targets.iter().map(|&t| t as usize).collect());
    let prior: Arc<Vec<f32>> = Arc::new(initial.weights.clone());
    let req = Arc::new(req);
    let (mut head, start, mut loss, resumed) = resume_point(&store, &ctx, &req, initial).await;
    let resumed_from_epoch = resumed.as_ref().map(|_| start);
    let info = ctx.info().clone();
    let mut kept: VecDeque<String> = resumed.iter().cloned().collect();
    let mut latest = resumed;
    let mut last_beat = Instant::now();
    let mut last_details = Instant::now();
    let mut last_checkpoint: Option<Instant> = None;
    tracing::info!(
        start,
        epochs = req.epochs,
        rows = req.rows,
        compute = compute().name(),
        "training"
    );
    for epoch in start + 1..=req.epochs {
        let (xs, ys, r, prior) = (xs.clone(), ys.clone(), req.clone(), prior.clone());
        let (h, l) = blocking(move || {
            let l = train_epoch(compute(), &mut head, &prior, &xs, &ys, &r, epoch)?;
            Ok((head, l))
        })
        .await?;
        head = h;
        loss = l;
        let due = epoch.is_multiple_of(req.checkpoint_every)
            && epoch < req.epochs
            && last_checkpoint.is_none_or(|t| t.elapsed() >= MIN_CHECKPOINT_INTERVAL);
        if due {
            let name = checkpoint_artifact(&info.run_id, info.seq, epoch);
            let c = Checkpoint {
                epoch,
                loss,
                head: head.clone(),
            };
            store.put_value(&name, &c).await?;
            ctx.heartbeat_with(&TrainProgress {
                epoch,
                epochs: req.epochs,
                loss,
                checkpoint: Some(name.clone()),
            });
            tracing::info!(epoch, loss, checkpoint = %name, "checkpoint stored");
            let now = Instant::now();
            (last_beat, last_details, last_checkpoint) = (now, now, Some(now));
            kept.push_back(name.clone());
            latest = Some(name);
            // The heartbeat naming the previous checkpoint was made durable long ago (at
            // least MIN_CHECKPOINT_INTERVAL); older ones are no longer referenced.
            while kept.len() > 2 {
                if let Some(old) = kept.pop_front()
                    && let Err(e) = store.delete(&old).await
                {
                    tracing::warn!(checkpoint = %old, error = %e, "old checkpoint not deleted");
                }
            }
        } else if last_details.elapsed() >= PROGRESS_INTERVAL {
            ctx.heartbeat_with(&TrainProgress {
                epoch,
                epochs: req.epochs,
                loss,
                checkpoint: latest.clone(),
            });
            (last_beat, last_details) = (Instant::now(), Instant::now());
        } else if last_beat.elapsed() >= Duration::from_millis(100) {
            ctx.heartbeat();
            last_beat = Instant::now();
        }
    }
    let head_artifact = head_artifact(&info.run_id, info.seq);
    store.put_value(&head_artifact, &head).await?;
    for old in kept {
        if let Err(e) = store.delete(&old).await {
            tracing::warn!(checkpoint = %old, error = %e, "checkpoint not deleted");
        }
    }
    tracing::info!(epochs = req.epochs, final_loss = loss, head = %head_artifact, "training done");
    Ok(TrainResult {
        head_artifact,
        epochs: req.epochs,
        final_loss: loss,
        resumed_from_epoch,
        compute: compute().name().to_string(),
    })
}

// --- evaluation and registration -----------------------------------------------------

/// Input of [`EVALUATE_HEAD`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvaluateRequest {
    /// The embedding set.
    pub embeddings: String,
    /// Index of the first held-out vector in it.
    pub offset: usize,
    /// The true label of each held-out row, in order.
    pub truth: Vec<String>,
    /// The trained head's artifact.
    pub head: String,
}

/// Result of [`EVALUATE_HEAD`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Evaluation {
    /// The head's metrics on the holdout.
    pub metrics: Metrics,
    /// The zero-shot prototypes' on the same rows, when the dataset's labels are theirs.
    pub zero_shot_metrics: Option<Metrics>,
}

/// [`EVALUATE_HEAD`]'s implementation.
pub async fn evaluate_head(
    models: Arc<Models>,
    _ctx: ActivityContext,
    req: EvaluateRequest,
) -> Result<Evaluation, ActivityError> {
    let store = models.store().await?;
    let n = req.truth.len();
    let set = load_embeddings(&store, &req.embeddings, req.offset + n).await?;
    let head: LinearHead = store
        .get_value(&req.head)
        .await?
        .ok_or_else(|| StoreError::Corrupt(format!("the head {} is missing", req.head)))?;
    if head.dim != set.dim {
        return Err(StoreError::Corrupt(format!(
            "the head has dimension {}, the embeddings {}",
            head.dim, set.dim
        ))
        .into());
    }
    blocking(move || {
        let truth: Vec<&str> = req.truth.iter().map(String::as_str).collect();
        let rows = || (req.offset..req.offset + n).map(|i| set.row(i));
        let predicted: Vec<&str> = rows()
            .map(|x| head.labels[head.predict(x).0].as_str())
            .collect();
        let metrics = classification_metrics(&truth, &predicted);
        let zero_labels: Vec<&str> = set.zero_shot.iter().map(|(l, _)| l.as_str()).collect();
        let zero_shot_metrics = (!set.zero_shot.is_empty()
            && truth.iter().all(|t| zero_labels.contains(t)))
        .then(|| {
            let predicted: Vec<&str> = rows()
                .map(|x| zero_labels[classify_with_centroids(&set.zero_shot, x).0])
                .collect();
            classification_metrics(&truth, &predicted)
        });
        Ok(Evaluation {
            metrics,
            zero_shot_metrics,
        })
    })
    .await
}

/// Input of [`REGISTER_MODEL`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RegisterRequest {
    /// The model's name.
    pub model: String,
    /// The head's classes.
    pub labels: Vec<String>,
    /// Holdout metrics.
    pub metrics: Metrics,
    /// The dataset's hash.
    pub dataset_sha256: String,
    /// The head's artifact.
    pub artifact: String,
    /// The embedding model.
    pub embedder: String,
    /// The embedding dimension.
    pub dim: usize,
    /// How it was trained.
    pub training: TrainingSummary,
    /// Artifacts no longer needed once the version is registered (the embedding set),
    /// deleted best-effort.
    pub discard: Vec<String>,
}

/// [`REGISTER_MODEL`]'s implementation: see [`ModelStore::register`] (a new number per
/// registration, idempotent per run).
pub async fn register_model(
    models: Arc<Models>,
    ctx: ActivityContext,
    req: RegisterRequest,
) -> Result<ModelVersion, ActivityError> {
    let store = models.store().await?;
    let info = ctx.info();
    let draft = ModelVersion {
        model: req.model,
        version: 0,
        labels: req.labels,
        metrics: req.metrics,
        dataset_sha256: req.dataset_sha256,
        created_ms: 0,
        artifact: req.artifact,
        embedder: req.embedder,
        dim: req.dim,
        workflow_id: info.workflow_id.clone(),
        run_id: info.run_id.clone(),
        training: req.training,
    };
    let version = store.register(draft).await?;
    tracing::info!(model = %version.name(), accuracy = version.metrics.accuracy, macro_f1 = version.metrics.macro_f1, "model version registered");
    for name in req.discard {
        if let Err(e) = store.delete(&name).await {
            tracing::warn!(artifact = %name, error = %e, "artifact not deleted");
        }
    }
    Ok(version)
}

// --- the workflow --------------------------------------------------------------------

fn default_model() -> String {
    SENTIMENT_MODEL.to_string()
}

/// Input of [`fine_tune`], as sent: checked into a [`FineTuneInput`] at the edge.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FineTuneInputRaw {
    dataset: Option<String>,
    rows: Option<Vec<Row>>,
    labels: Option<Vec<String>>,
    #[serde(default = "default_model")]
    model: String,
    #[serde(default = "defaults::epochs")]
    epochs: u32,
    #[serde(default = "defaults::learning_rate")]
    learning_rate: f32,
    #[serde(default = "defaults::batch_size")]
    batch_size: usize,
    #[serde(default = "defaults::holdout")]
    holdout: f64,
    #[serde(default = "defaults::seed")]
    seed: u64,
    #[serde(default = "defaults::checkpoint_every")]
    checkpoint_every: u32,
    #[serde(default = "defaults::weight_decay")]
    weight_decay: f32,
    #[serde(default = "defaults::warm_start")]
    warm_start: bool,
}

/// The defaults of [`FineTuneInput`].
pub mod defaults {
    /// 300 epochs.
    pub fn epochs() -> u32 {
        300
    }
    /// A learning rate of 0.5.
    pub fn learning_rate() -> f32 {
        0.5
    }
    /// Mini-batches of 16.
    pub fn batch_size() -> usize {
        16
    }
    /// 20% of each label held out.
    pub fn holdout() -> f64 {
        0.2
    }
    /// Seed 7.
    pub fn seed() -> u64 {
        7
    }
    /// A checkpoint every 10 epochs.
    pub fn checkpoint_every() -> u32 {
        10
    }
    /// An L2 pull of 0.3 toward the initial head (chosen on the holdout of the shipped
    /// training split, never on its test split).
    pub fn weight_decay() -> f32 {
        0.3
    }
    /// Start from the zero-shot prototypes when the labels are theirs.
    pub fn warm_start() -> bool {
        true
    }
}

/// Input of [`fine_tune`]: `{"dataset": "<path>" | "rows": [{"text", "label"}, ...],
/// "labels"?, "model": "sentiment", "epochs": 300, "learning_rate": 0.5, "batch_size": 16,
/// "holdout": 0.2, "seed": 7, "checkpoint_every": 10, "weight_decay": 0.3, "warm_start": true}`.
/// Ranges are
/// checked when the input is decoded, so a bad one is refused at the edge (`bad_request`).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "FineTuneInputRaw")]
pub struct FineTuneInput {
    /// The dataset.
    pub source: DatasetSource,
    /// The labels allowed, if fixed.
    pub labels: Option<Vec<String>>,
    /// The model's name.
    pub model: String,
    /// Epochs, 1 to 100,000.
    pub epochs: u32,
    /// SGD step size, in (0, 100].
    pub learning_rate: f32,
    /// Mini-batch size, 1 to 4,096.
    pub batch_size: usize,
    /// Fraction of each label held out for evaluation, in [0.05, 0.5].
    pub holdout: f64,
    /// Seed of the split and the epoch orders.
    pub seed: u64,
    /// Checkpoint period in epochs, at least 1.
    pub checkpoint_every: u32,
    /// L2 pull toward the initial head, in [0, 10].
    pub weight_decay: f32,
    /// Start from the zero-shot prototypes (when the labels are theirs).
    pub warm_start: bool,
}

impl TryFrom<FineTuneInputRaw> for FineTuneInput {
    type Error = String;

    fn try_from(r: FineTuneInputRaw) -> Result<Self, String> {
        let source = match (r.dataset, r.rows) {
            (Some(path), None) => DatasetSource::Path(path),
            (None, Some(rows)) => DatasetSource::Rows(rows),
            _ => return Err("give exactly one of `dataset` (a JSONL path) and `rows`".into()),
        };
        baton_transport::ids::validate_name("model name", &r.model).map_err(|e| e.to_string())?;
        if !(1..=100_000).contains(&r.epochs) {
            return Err(format!("epochs is {}; it must be 1 to 100000", r.epochs));
        }
        if !(r.learning_rate > 0.0 && r.learning_rate <= 100.0) {
            return Err(format!(
                "learning_rate is {}; it must be in (0, 100]",
                r.learning_rate
            ));
        }
        if !(1..=4096).contains(&r.batch_size) {
            return Err(format!(
                "batch_size is {}; it must be 1 to 4096",
                r.batch_size
            ));
        }
        if !(0.05..=0.5).contains(&r.holdout) {
            return Err(format!(
                "holdout is {}; it must be in [0.05, 0.5]",
                r.holdout
            ));
        }
        if r.checkpoint_every == 0 {
            return Err("checkpoint_every must be at least 1".into());
        }
        if !(0.0..=10.0).contains(&r.weight_decay) {
            return Err(format!(
                "weight_decay is {}; it must be in [0, 10]",
                r.weight_decay
            ));
        }
        Ok(FineTuneInput {
            source,
            labels: r.labels,
            model: r.model,
            epochs: r.epochs,
            learning_rate: r.learning_rate,
            batch_size: r.batch_size,
            holdout: r.holdout,
            seed: r.seed,
            checkpoint_every: r.checkpoint_every,
            weight_decay: r.weight_decay,
            warm_start: r.warm_start,
        })
    }
}

/// Output of [`fine_tune`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FineTuneOutput {
    /// The model's name.
    pub model: String,
    /// The version registered.
    pub version: u64,
    /// `<model>.v<version>`, as `run_inference` reports it.
    pub name: String,
    /// The head's classes.
    pub labels: Vec<String>,
    /// The head's metrics on the holdout.
    pub metrics: Metrics,
    /// The zero-shot prototypes' metrics on the same holdout (when the labels are theirs).
    pub zero_shot_metrics: Option<Metrics>,
    /// SHA-256 of the dataset's validated rows.
    pub dataset_sha256: String,
    /// Rows trained on.
    pub train_rows: usize,
    /// Rows held out.
    pub holdout_rows: usize,
    /// Epochs trained.
    pub epochs: u32,
    /// Mean loss of the last epoch.
    pub final_loss: f32,
    /// The checkpoint epoch training resumed from after a failed attempt or a dead worker.
    pub resumed_from_epoch: Option<u32>,
}

fn internal(message: String) -> WorkflowError {
    WorkflowError::new("InternalError", message)
}

/// `fine_tune`: validate_dataset (cpu) -> embed_texts (gpu) -> train_head (gpu) ->
/// evaluate_head (cpu) -> register_model (cpu).
pub async fn fine_tune(
    ctx: WorkflowContext,
    input: FineTuneInput,
) -> Result<FineTuneOutput, WorkflowError> {
    let split = ctx
        .activity(
            &VALIDATE_DATASET,
            &DatasetRequest {
                source: input.source.clone(),
                labels: input.labels.clone(),
                holdout: input.holdout,
                seed: input.seed,
                min_labels: 2,
                min_rows_per_label: 2,
            },
        )
        .await?;
    let texts: Vec<String> = split
        .train
        .iter()
        .chain(&split.holdout)
        .map(|r| r.text.clone())
        .collect();
    let embeddings = ctx.activity(&EMBED_TEXTS, &EmbedRequest { texts }).await?;
    if embeddings.rows != split.train.len() + split.holdout.len() {
        return Err(internal(format!(
            "{} embeddings for {} rows",
            embeddings.rows,
            split.train.len() + split.holdout.len()
        )));
    }
    let mut targets = Vec::with_capacity(split.train.len());
    for row in &split.train {
        let class = split
            .labels
            .binary_search(&row.label)
            .map_err(|_| internal(format!("label {:?} is not in the label set", row.label)))?;
        targets.push(class as u32);
    }
    let trained = ctx
        .activity(
            &TRAIN_HEAD,
            &TrainRequest {
                embeddings: embeddings.artifact.clone(),
                rows: split.train.len(),
                targets,
                labels: split.labels.clone(),
                epochs: input.epochs,
                learning_rate: input.learning_rate,
                batch_size: input.batch_size,
                seed: input.seed,
                checkpoint_every: input.checkpoint_every,
                weight_decay: input.weight_decay,
                warm_start: input.warm_start,
            },
        )
        .await?;
    let evaluation = ctx
        .activity(
            &EVALUATE_HEAD,
            &EvaluateRequest {
                embeddings: embeddings.artifact.clone(),
                offset: split.train.len(),
                truth: split.holdout.iter().map(|r| r.label.clone()).collect(),
                head: trained.head_artifact.clone(),
            },
        )
        .await?;
    let training = TrainingSummary {
        epochs: trained.epochs,
        learning_rate: input.learning_rate,
        batch_size: input.batch_size,
        weight_decay: input.weight_decay,
        warm_start: input.warm_start,
        seed: input.seed,
        train_rows: split.train.len(),
        holdout_rows: split.holdout.len(),
        final_loss: trained.final_loss,
        resumed_from_epoch: trained.resumed_from_epoch,
        compute: trained.compute.clone(),
    };
    let version = ctx
        .activity(
            &REGISTER_MODEL,
            &RegisterRequest {
                model: input.model.clone(),
                labels: split.labels.clone(),
                metrics: evaluation.metrics.clone(),
                dataset_sha256: split.dataset_sha256.clone(),
                artifact: trained.head_artifact,
                embedder: embeddings.embedder,
                dim: embeddings.dim,
                training,
                discard: vec![embeddings.artifact],
            },
        )
        .await?;
    Ok(FineTuneOutput {
        name: version.name(),
        model: version.model,
        version: version.version,
        labels: split.labels,
        metrics: evaluation.metrics,
        zero_shot_metrics: evaluation.zero_shot_metrics,
        dataset_sha256: split.dataset_sha256,
        train_rows: split.train.len(),
        holdout_rows: split.holdout.len(),
        epochs: trained.epochs,
        final_loss: trained.final_loss,
        resumed_from_epoch: trained.resumed_from_epoch,
    })
}

// --- registration --------------------------------------------------------------------

/// The options of the fine-tuning and evaluation activities: queue, timeouts, retries.
pub fn activity_options() -> Vec<(&'static str, ActivityOptions)> {
    let secs = Duration::from_secs;
    let gpu = |attempts| {
        RetryPolicy::exponential(secs(2), 2.0, attempts).non_retryable(&[
            "ValidationError",
            "ModelStoreCorrupt",
            "TrainingDiverged",
        ])
    };
    let cpu = || cpu_retry().non_retryable(&["ModelStoreCorrupt"]);
    vec![
        (
            VALIDATE_DATASET.name,
            ActivityOptions::new(CPU_QUEUE, secs(120), cpu()),
        ),
        (
            EMBED_TEXTS.name,
            ActivityOptions::new(GPU_QUEUE, secs(900), gpu(3)).heartbeat_timeout(secs(30)),
        ),
        (
            TRAIN_HEAD.name,
            ActivityOptions::new(GPU_QUEUE, secs(3600), gpu(3)).heartbeat_timeout(secs(30)),
        ),
        (
            EVALUATE_HEAD.name,
            ActivityOptions::new(CPU_QUEUE, secs(120), cpu()),
        ),
        (
            REGISTER_MODEL.name,
            ActivityOptions::new(CPU_QUEUE, secs(60), cpu()),
        ),
        (
            EVALUATE_MODELS.name,
            ActivityOptions::new(CPU_QUEUE, secs(300), cpu()),
        ),
    ]
}

/// Registers `fine_tune` and `eval` and their activities (with [`activity_options`]).
pub fn register(r: &mut Registry, models: Arc<Models>) -> anyhow::Result<()> {
    let options = activity_options();
    let opt = |name: &str| {
        options
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, o)| o.clone())
            .unwrap_or_else(|| panic!("no options declared for activity {name:?}"))
    };
    r.workflow(FINE_TUNE, fine_tune)
        .and_then(|r| r.workflow(EVAL, eval::eval))
        .and_then(|r| {
            r.activity(
                &VALIDATE_DATASET,
                opt(VALIDATE_DATASET.name),
                validate_dataset,
            )
        })
        .context("registering fine_tune and eval")?;
    let m = models.clone();
    r.activity(&EMBED_TEXTS, opt(EMBED_TEXTS.name), move |ctx, req| {
        embed_texts(m.clone(), ctx, req)
    })?;
    let m = models.clone();
    r.activity(&TRAIN_HEAD, opt(TRAIN_HEAD.name), move |ctx, req| {
        train_head(m.clone(), ctx, req)
    })?;
    let m = models.clone();
    r.activity(&EVALUATE_HEAD, opt(EVALUATE_HEAD.name), move |ctx, req| {
        evaluate_head(m.clone(), ctx, req)
    })?;
    let m = models.clone();
    r.activity(
        &REGISTER_MODEL,
        opt(REGISTER_MODEL.name),
        move |ctx, req| register_model(m.clone(), ctx, req),
    )?;
    let m = models;
    r.activity(
        &EVALUATE_MODELS,
        opt(EVALUATE_MODELS.name),
        move |ctx, req| evaluate_models(m.clone(), ctx, req),
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use baton_actors::ActivityInfo;
    use serde_json::json;

    use super::*;
    use crate::pipelines::eval::Metrics;

    fn ctx() -> ActivityContext {
        let info = ActivityInfo {
            workflow_id: "wf".into(),
            run_id: "run".into(),
            activity: "validate_dataset".into(),
            seq: 0,
            attempt: 1,
        };
        ActivityContext::new(info, |_| {})
    }

    fn row(text: &str, label: &str) -> Row {
        Row {
            text: text.into(),
            label: label.into(),
        }
    }

    fn request(source: DatasetSource) -> DatasetRequest {
        DatasetRequest {
            source,
            labels: None,
            holdout: 0.2,
            seed: 7,
            min_labels: 2,
            min_rows_per_label: 2,
        }
    }

    fn err_of(r: Result<impl std::fmt::Debug, ActivityError>) -> String {
        let e = r.unwrap_err();
        assert_eq!(
            (e.kind.as_str(), e.retryable),
            ("ValidationError", false),
            "{e:?}"
        );
        e.message
    }

    fn check(text: &str) -> Result<Vec<String>, ActivityError> {
        let mut ds = parse_jsonl(text.as_bytes())?;
        check_dataset(&mut ds, None, 2, 2)
    }

    #[test]
    fn jsonl_errors_name_the_line() {
        let good = r#"{"text": "good", "label": "positive"}"#;
        let mut lines = vec![good; 16];
        lines.push(r#"{"text": "no label"}"#);
        assert_eq!(
            err_of(parse_jsonl(lines.join("\n").as_bytes())),
            "line 17: missing field `label`"
        );
        assert_eq!(
            err_of(parse_jsonl(
                b"{\"text\": \"a\", \"label\": \"x\"}\n{\"text\": \"b\" \"label\": \"y\"}"
            )),
            "line 2: expected `,` or `}` (column 14)"
        );
        assert_eq!(
            err_of(parse_jsonl(
                b"\n\n{\"text\": \"a\", \"label\": \"x\", \"score\": 1}"
            )),
            "line 3: unknown field `score`, expected `text` or `label`"
        );
        assert_eq!(
            err_of(parse_jsonl(b"{\"text\": \"a\", \"label\": 1}")),
            "line 1: invalid type: integer `1`, expected a string"
        );
        assert!(
            err_of(parse_jsonl(
                b"{\"text\": \"a\", \"label\": \"x\"}\n\xff\xfe"
            ))
            .starts_with("line 2: not valid UTF-8")
        );
        // Blank lines are skipped but counted; CRLF and a BOM are fine.
        let ds = parse_jsonl(
            b"\xEF\xBB\xBF{\"text\": \"a\", \"label\": \"x\"}\r\n\r\n  \n{\"text\": \"b\", \"label\": \"y\"}\r\n",
        )
        .unwrap();
        assert_eq!(ds.lines, [1, 4]);
        assert_eq!(ds.rows, [row("a", "x"), row("b", "y")]);
    }

    #[test]
    fn row_and_label_errors_name_the_line() {
        let rows = |v: &[(&str, &str)]| {
            v.iter()
                .map(|(t, l)| json!({"text": t, "label": l}).to_string())
                .collect::<Vec<_>>()
                .join("\n")
        };
        assert_eq!(
            err_of(check(&rows(&[("a", "pos"), ("  ", "neg")]))),
            "line 2: text is empty"
        );
        assert_eq!(
            err_of(check(&rows(&[("a", "pos"), ("b", " ")]))),
            "line 2: label is empty"
        );
        let long = "x".repeat(MAX_TEXT_CHARS + 1);
        assert_eq!(
            err_of(check(&rows(&[("a", "pos"), (&long, "neg")]))),
            "line 2: text is 10001 characters long; the limit is 10000"
        );
        assert_eq!(
            err_of(check(&rows(&[
                ("a", "positive"),
                ("b", "negative"),
                ("c", "Positive")
            ]))),
            "line 3: label \"Positive\" differs from \"positive\" (line 1) only in case"
        );
        let mut ds =
            parse_jsonl(rows(&[("a", "positive"), ("b", "negative"), ("c", "neutral")]).as_bytes())
                .unwrap();
        let allowed = ["negative".to_string(), "positive".to_string()];
        assert_eq!(
            err_of(check_dataset(&mut ds, Some(&allowed), 2, 2)),
            "line 3: unknown label \"neutral\" (expected one of \"negative\", \"positive\")"
        );
        assert_eq!(
            err_of(check(&rows(&[("a", "pos"), ("b", "pos"), ("c", "neg")]))),
            "line 3: label \"neg\" has 1 row; each label needs at least 2"
        );
        assert_eq!(
            err_of(check(&rows(&[("a", "pos"), ("b", "pos")]))),
            "the dataset has 1 label (\"pos\"); at least 2 are needed"
        );
        assert_eq!(err_of(check("\n\n")), "the dataset has no rows");
        let many: Vec<(String, String)> = (0..=MAX_LABELS)
            .map(|i| (format!("t{i}"), format!("l{i:02}")))
            .collect();
        let many: Vec<(&str, &str)> = many.iter().map(|(t, l)| (t.as_str(), l.as_str())).collect();
        assert_eq!(
            err_of(check(&rows(&many))),
            "line 21: label \"l20\" is one more than the limit of 20 distinct labels"
        );
        // Labels are trimmed and returned sorted.
        let labels = check(&rows(&[("a", " b "), ("b", "a"), ("c", "b"), ("d", "a")])).unwrap();
        assert_eq!(labels, ["a", "b"]);
    }

    #[tokio::test]
    async fn inline_rows_are_numbered_and_files_are_read_on_the_worker() {
        let req = request(DatasetSource::Rows(vec![
            row("a", "x"),
            row("b", "x"),
            row("", "y"),
        ]));
        assert_eq!(
            err_of(validate_dataset(ctx(), req).await),
            "row 3: text is empty"
        );
        let req = request(DatasetSource::Path("/nonexistent/data.jsonl".into()));
        assert!(
            err_of(validate_dataset(ctx(), req).await)
                .starts_with("dataset /nonexistent/data.jsonl: ")
        );
        let req = request(DatasetSource::Path("builtin:nope".into()));
        assert!(
            err_of(validate_dataset(ctx(), req).await).starts_with("no builtin dataset \"nope\"")
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.jsonl");
        std::fs::write(&path, "{\"text\":\"a\",\"label\":\"x\"}\n{\"text\":\"b\",\"label\":\"x\"}\n{\"text\":\"c\",\"label\":\"y\"}\n{\"text\":\"d\",\"label\":\"y\"}\n").unwrap();
        let from_file = validate_dataset(
            ctx(),
            request(DatasetSource::Path(path.display().to_string())),
        )
        .await
        .unwrap();
        let inline = validate_dataset(
            ctx(),
            request(DatasetSource::Rows(vec![
                row("a", "x"),
                row("b", "x"),
                row("c", "y"),
                row("d", "y"),
            ])),
        )
        .await
        .unwrap();
        assert_eq!(from_file, inline, "same rows, same split and hash");
        assert_eq!(from_file.labels, ["x", "y"]);
        assert_eq!((from_file.train.len(), from_file.holdout.len()), (2, 2));
    }

    #[test]
    fn the_dataset_hash_is_sha256_of_canonical_jsonl() {
        // printf '{"text":"a","label":"x"}\n' | sha256sum
        assert_eq!(
            dataset_sha256(&[row("a", "x")]),
            "425791161826f935fa8206da743ff79741c350094c392966d21f3d9233f1d10c"
        );
    }

    #[test]
    fn the_split_is_deterministic_stratified_and_seeded() {
        let rows: Vec<Row> = (0..50)
            .map(|i| row(&format!("t{i}"), if i % 5 == 0 { "rare" } else { "common" }))
            .collect();
        let (train, holdout) = split_indices(&rows, 0.2, 7);
        assert_eq!(
            split_indices(&rows, 0.2, 7),
            (train.clone(), holdout.clone())
        );
        assert_ne!(
            split_indices(&rows, 0.2, 8).1,
            holdout,
            "another seed, another split"
        );
        // 40 common -> 8 held out, 10 rare -> 2 held out; disjoint, complete, in order.
        let count =
            |idx: &[usize], label: &str| idx.iter().filter(|&&i| rows[i].label == label).count();
        assert_eq!((count(&holdout, "common"), count(&holdout, "rare")), (8, 2));
        assert_eq!(train.len() + holdout.len(), 50);
        assert!(train.windows(2).all(|w| w[0] < w[1]) && holdout.windows(2).all(|w| w[0] < w[1]));
        assert!(train.iter().all(|i| !holdout.contains(i)));
        // Each label keeps a row on each side, even when tiny.
        let tiny = vec![row("a", "x"), row("b", "x"), row("c", "y"), row("d", "y")];
        let (t, h) = split_indices(&tiny, 0.05, 1);
        assert_eq!((t.len(), h.len()), (2, 2));
        let (t, h) = split_indices(&tiny, 1.0, 1);
        assert_eq!((t.len(), h.len()), (0, 4));
    }

    #[test]
    fn the_shipped_sentiment_split_is_balanced_and_disjoint() {
        let train = parse_jsonl(SENTIMENT_TRAIN.as_bytes()).unwrap();
        let test = parse_jsonl(SENTIMENT_TEST.as_bytes()).unwrap();
        assert_eq!((train.rows.len(), test.rows.len()), (240, 80));
        for ds in [&train, &test] {
            let mut ds = ds.clone();
            assert_eq!(
                check_dataset(&mut ds, None, 2, 2).unwrap(),
                ["negative", "positive"]
            );
            let positive = ds.rows.iter().filter(|r| r.label == "positive").count();
            assert_eq!(positive * 2, ds.rows.len(), "balanced");
        }
        let all: std::collections::HashSet<&str> = train
            .rows
            .iter()
            .chain(&test.rows)
            .map(|r| r.text.as_str())
            .collect();
        assert_eq!(all.len(), 320, "no text twice, none in both splits");
        // The files on disk are the ones compiled in.
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("data/sentiment");
        assert_eq!(
            std::fs::read_to_string(dir.join("train.jsonl")).unwrap(),
            SENTIMENT_TRAIN
        );
    }

    #[test]
    fn epoch_orders_are_deterministic_permutations() {
        let a = epoch_order(100, 7, 3);
        assert_eq!(a, epoch_order(100, 7, 3));
        assert_ne!(a, epoch_order(100, 7, 4));
        assert_ne!(a, epoch_order(100, 8, 3));
        let mut sorted = a.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
    }

    fn toy_request(epochs: u32) -> (TrainRequest, Vec<f32>, Vec<usize>) {
        let mut rng = SplitMix64::new(3);
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        for i in 0..60 {
            let c = i % 3;
            for d in 0..4 {
                let noise = (rng.next_u64() % 1000) as f32 / 2000.0;
                xs.push(if d == c { 1.0 } else { 0.0 } + noise);
            }
            ys.push(c);
        }
        let req = TrainRequest {
            embeddings: "e".into(),
            rows: 60,
            targets: ys.iter().map(|&y| y as u32).collect(),
            labels: vec!["a".into(), "b".into(), "c".into()],
            epochs,
            learning_rate: 0.5,
            batch_size: 8,
            seed: 11,
            checkpoint_every: 10,
            weight_decay: 1e-3,
            warm_start: false,
        };
        (req, xs, ys)
    }

    #[test]
    fn training_resumed_from_a_checkpoint_ends_exactly_where_an_uninterrupted_run_does() {
        let (req, xs, ys) = toy_request(40);
        let prior = vec![0.0; 12];
        let mut straight = LinearHead::new(req.labels.clone(), 4);
        let mut losses = Vec::new();
        for epoch in 1..=40 {
            losses.push(
                train_epoch(&Compute::Cpu, &mut straight, &prior, &xs, &ys, &req, epoch).unwrap(),
            );
        }
        assert!(losses[39] < losses[0] / 2.0, "it learns: {losses:?}");
        // Interrupted after epoch 20: the checkpoint goes through MessagePack and back.
        let mut head = LinearHead::new(req.labels.clone(), 4);
        for epoch in 1..=20 {
            train_epoch(&Compute::Cpu, &mut head, &prior, &xs, &ys, &req, epoch).unwrap();
        }
        let bytes = baton_transport::codec::encode(&Checkpoint {
            epoch: 20,
            loss: 0.0,
            head,
        })
        .unwrap();
        let resumed: Checkpoint = baton_transport::codec::decode(&bytes).unwrap();
        let mut head = resumed.head;
        for epoch in resumed.epoch + 1..=40 {
            train_epoch(&Compute::Cpu, &mut head, &prior, &xs, &ys, &req, epoch).unwrap();
        }
        assert_eq!(head, straight, "bit-for-bit the same head");
        let correct = (0..60)
            .filter(|&i| head.predict(&xs[i * 4..][..4]).0 == ys[i])
            .count();
        assert_eq!(correct, 60);
    }

    #[test]
    fn a_diverging_loss_is_a_non_retryable_error() {
        let (mut req, xs, ys) = toy_request(1);
        let mut head = LinearHead::new(req.labels.clone(), 4);
        head.weights[0] = f32::NAN;
        req.weight_decay = 0.0;
        let e = train_epoch(&Compute::Cpu, &mut head, &[0.0; 12], &xs, &ys, &req, 1).unwrap_err();
        assert_eq!((e.kind.as_str(), e.retryable), ("TrainingDiverged", false));
        assert_eq!(
            e.message,
            "epoch 1: the weights are not finite; lower the learning rate"
        );
    }

    #[test]
    fn fine_tune_inputs_are_checked_at_decoding() {
        let parse = |v: serde_json::Value| {
            serde_json::from_value::<FineTuneInput>(v).map_err(|e| e.to_string())
        };
        let i = parse(json!({"dataset": "d.jsonl"})).unwrap();
        assert_eq!(i.source, DatasetSource::Path("d.jsonl".into()));
        assert_eq!(
            (
                i.model.as_str(),
                i.epochs,
                i.learning_rate,
                i.batch_size,
                i.holdout,
                i.seed,
                i.checkpoint_every
            ),
            ("sentiment", 300, 0.5, 16, 0.2, 7, 10)
        );
        let rows = parse(json!({"rows": [{"text": "a", "label": "x"}], "epochs": 5})).unwrap();
        assert_eq!(rows.source, DatasetSource::Rows(vec![row("a", "x")]));
        for (bad, why) in [
            (json!({}), "exactly one of"),
            (json!({"dataset": "d", "rows": []}), "exactly one of"),
            (json!({"dataset": "d", "epochs": 0}), "epochs is 0"),
            (
                json!({"dataset": "d", "learning_rate": -1.0}),
                "learning_rate",
            ),
            (json!({"dataset": "d", "holdout": 0.9}), "holdout is 0.9"),
            (json!({"dataset": "d", "batch_size": 0}), "batch_size is 0"),
            (
                json!({"dataset": "d", "checkpoint_every": 0}),
                "checkpoint_every",
            ),
            (json!({"dataset": "d", "model": "a.b"}), "model name"),
            (
                json!({"dataset": "d", "epochz": 3}),
                "unknown field `epochz`",
            ),
            (json!({"rows": [{"text": "a"}]}), "missing field `label`"),
        ] {
            let e = parse(bad.clone()).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
        // As the journal holds it: the MessagePack of the JSON input.
        let p =
            baton_transport::Payload::encode(&json!({"dataset": "d.jsonl", "epochs": 9})).unwrap();
        assert_eq!(p.decode::<FineTuneInput>().unwrap().epochs, 9);
    }

    #[test]
    fn registration_routes_each_activity() {
        let models = Arc::new(Models::new("/nonexistent/baton-home"));
        let mut r = Registry::new();
        register(&mut r, models).unwrap();
        assert_eq!(r.workflow_names(), ["eval", "fine_tune"]);
        assert_eq!(
            r.activities_of_queue(CPU_QUEUE),
            [
                "evaluate_head",
                "evaluate_models",
                "register_model",
                "validate_dataset"
            ]
        );
        assert_eq!(
            r.activities_of_queue(GPU_QUEUE),
            ["embed_texts", "train_head"]
        );
        let train = &r.policies()["train_head"];
        assert_eq!(
            (train.start_to_close_ms, train.heartbeat_timeout_ms),
            (3_600_000, Some(30_000))
        );
        assert!(
            train
                .retry
                .non_retryable_error_types
                .contains(&"ValidationError".to_string())
        );
    }

    #[tokio::test]
    async fn without_a_model_store_the_store_activities_fail_retryably() {
        let models = Arc::new(Models::new("/nonexistent/baton-home"));
        let req = RegisterRequest {
            model: "sentiment".into(),
            labels: vec![],
            metrics: crate::pipelines::eval::classification_metrics(&[], &[]),
            dataset_sha256: String::new(),
            artifact: String::new(),
            embedder: String::new(),
            dim: 0,
            training: TrainingSummary {
                epochs: 1,
                learning_rate: 0.1,
                batch_size: 1,
                weight_decay: 0.0,
                warm_start: false,
                seed: 0,
                train_rows: 0,
                holdout_rows: 0,
                final_loss: 0.0,
                resumed_from_epoch: None,
                compute: "cpu".into(),
            },
            discard: vec![],
        };
        let e = register_model(models.clone(), ctx(), req)
            .await
            .unwrap_err();
        assert_eq!(
            (e.kind.as_str(), e.retryable),
            ("ModelStoreUnavailable", true)
        );
        // Inference falls back to zero-shot instead.
        assert!(models.latest_head(SENTIMENT_MODEL).await.unwrap().is_none());
    }

    /// `$BATON_HOME`, or `<workspace>/.baton`; fails (never skips) without the model.
    fn models() -> Arc<Models> {
        let home = match std::env::var_os("BATON_HOME") {
            Some(h) if !h.is_empty() => PathBuf::from(h),
            _ => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.baton"),
        };
        let models = Models::new(home);
        assert!(
            models.model_path().is_file(),
            "{} is missing: run `cargo xtask setup`",
            models.model_path().display()
        );
        Arc::new(models)
    }

    #[test]
    fn the_warm_start_head_is_the_zero_shot_classifier() {
        let unit = |v: [f32; 3]| {
            let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            v.map(|x| x / n).to_vec()
        };
        let zero_shot = vec![
            ("positive".to_string(), unit([1.0, 0.2, 0.0])),
            ("negative".to_string(), unit([-0.3, 1.0, 0.1])),
        ];
        let labels = vec!["negative".to_string(), "positive".to_string()];
        let head = initial_head(&labels, 3, &zero_shot, true);
        for x in [
            unit([1.0, 0.0, 0.0]),
            unit([0.1, 0.9, 0.3]),
            unit([0.5, 0.5, -0.7]),
        ] {
            let (class, p) = head.predict(&x);
            let (z, q) = classify_with_centroids(&zero_shot, &x);
            assert_eq!(labels[class], zero_shot[z].0);
            assert!((p - q).abs() < 1e-5, "{p} vs {q}");
        }
        // Cold, other labels, or another dimension: zeros.
        let zeros = LinearHead::new(labels.clone(), 3);
        assert_eq!(initial_head(&labels, 3, &zero_shot, false), zeros);
        let other = vec!["a".to_string(), "b".to_string()];
        assert!(
            initial_head(&other, 3, &zero_shot, true)
                .weights
                .iter()
                .all(|w| *w == 0.0)
        );
        assert_eq!(
            initial_head(&labels, 4, &zero_shot, true).weights,
            vec![0.0; 8]
        );
    }

    /// The shipped training split through the real embedder and the workflow's defaults
    /// (20% held out, seed 7): the head must beat the zero-shot prototypes on the shipped
    /// test split, as the `eval` workflow measures it.
    #[tokio::test]
    async fn the_default_head_beats_zero_shot_on_the_shipped_test_split() {
        let models = models();
        let input: FineTuneInput = serde_json::from_value(json!({"dataset": "x"})).unwrap();
        let split = prepare_split(
            parse_jsonl(SENTIMENT_TRAIN.as_bytes()).unwrap(),
            &DatasetRequest {
                source: input.source.clone(),
                labels: None,
                holdout: input.holdout,
                seed: input.seed,
                min_labels: 2,
                min_rows_per_label: 2,
            },
        )
        .unwrap();
        let test = parse_jsonl(SENTIMENT_TEST.as_bytes()).unwrap().rows;
        // Embedded as the workflows do: the split in one request, the test set in another,
        // each in chunks of EMBED_CHUNK.
        let m = models.clone();
        let split_texts: Vec<String> = split
            .train
            .iter()
            .chain(&split.holdout)
            .map(|r| normalize(&r.text))
            .collect();
        let test_texts: Vec<String> = test.iter().map(|r| normalize(&r.text)).collect();
        let (vectors, sentiment) = tokio::task::spawn_blocking(move || {
            let e = m.embedder().unwrap();
            let mut v: Vec<Vec<f32>> = Vec::new();
            for texts in [split_texts, test_texts] {
                let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
                v.extend(refs.chunks(EMBED_CHUNK).flat_map(|c| e.embed(c).unwrap()));
            }
            (v, m.sentiment().unwrap())
        })
        .await
        .unwrap();
        let labels = split.labels.clone();
        let req = TrainRequest {
            embeddings: String::new(),
            rows: split.train.len(),
            targets: split
                .train
                .iter()
                .map(|r| labels.binary_search(&r.label).unwrap() as u32)
                .collect(),
            labels: labels.clone(),
            epochs: input.epochs,
            learning_rate: input.learning_rate,
            batch_size: input.batch_size,
            seed: input.seed,
            checkpoint_every: input.checkpoint_every,
            weight_decay: input.weight_decay,
            warm_start: input.warm_start,
        };
        let xs: Vec<f32> = vectors[..split.train.len()].concat();
        let ys: Vec<usize> = req.targets.iter().map(|&t| t as usize).collect();
        let mut head = initial_head(&labels, 384, &sentiment.centroids(), true);
        let prior = head.weights.clone();
        let started = Instant::now();
        for epoch in 1..=req.epochs {
            train_epoch(&Compute::Cpu, &mut head, &prior, &xs, &ys, &req, epoch).unwrap();
        }
        let per_epoch = started.elapsed() / req.epochs;
        let score = |rows: &[Row], vectors: &[Vec<f32>]| {
            let truth: Vec<&str> = rows.iter().map(|r| r.label.as_str()).collect();
            let fine: Vec<&str> = vectors
                .iter()
                .map(|v| labels[head.predict(v).0].as_str())
                .collect();
            let zero: Vec<&str> = vectors.iter().map(|v| sentiment.classify(v).0).collect();
            (
                classification_metrics(&truth, &fine),
                classification_metrics(&truth, &zero),
            )
        };
        let n = split.train.len() + split.holdout.len();
        let (fine_h, zero_h): (Metrics, Metrics) =
            score(&split.holdout, &vectors[split.train.len()..n]);
        let (fine, zero): (Metrics, Metrics) = score(&test, &vectors[n..]);
        eprintln!(
            "holdout ({} rows): zero-shot accuracy {:.4} macro-F1 {:.4}; fine-tuned accuracy {:.4} macro-F1 {:.4}",
            fine_h.rows, zero_h.accuracy, zero_h.macro_f1, fine_h.accuracy, fine_h.macro_f1
        );
        eprintln!(
            "shipped test split ({} rows): zero-shot accuracy {:.4} macro-F1 {:.4}; fine-tuned accuracy {:.4} macro-F1 {:.4} ({per_epoch:?} per epoch)",
            fine.rows, zero.accuracy, zero.macro_f1, fine.accuracy, fine.macro_f1
        );
        assert!(fine.accuracy > zero.accuracy, "{fine:?} vs {zero:?}");
        assert!(fine.macro_f1 > zero.macro_f1, "{fine:?} vs {zero:?}");
    }
}
