//! The models behind the "gpu" activities: the sentence embedder, loaded lazily once per
//! process, the zero-shot sentiment classifier built on it, and the process's handle on the
//! cluster's model store (fine-tuned heads, the latest one cached for `run_inference`).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::{Duration, Instant},
};

use async_nats::jetstream;
use baton_actors::{ActivityError, batching::BatchOptions};
use baton_gpu_kernels::{Embedder, EmbedderConfig, LinearHead, cosine};

use super::model_store::{ModelStore, ModelVersion, StoreError};

/// How long [`Models::latest_head`] trusts what it last read of a model's latest version
/// before asking the model store again.
pub const LATEST_TTL: Duration = Duration::from_secs(2);

/// Temperature of the softmax that turns the two cosine similarities into a score.
///
/// Cosines between MiniLM sentence embeddings live in a narrow band (a clearly positive
/// sentence is typically 0.05-0.20 closer to the positive centroid than to the negative
/// one), so a temperature of 1 would give scores barely above 0.5. Dividing by 0.05 maps a
/// 0.05 margin to a score of about 0.73 and a 0.15 margin to about 0.95.
pub const SOFTMAX_TEMPERATURE: f32 = 0.05;

/// Prototype sentences of the "positive" label: products, service, experiences.
pub const POSITIVE_PROTOTYPES: &[&str] = &[
    "I love this product, it works perfectly.",
    "Excellent quality, I am very happy with my purchase.",
    "The customer service was friendly and helpful.",
    "They solved my problem quickly, great support.",
    "What a wonderful experience, I enjoyed every minute.",
    "This is the best thing I have ever bought, highly recommended.",
    "The staff were kind and the food was delicious.",
    "Fast delivery and it arrived in perfect condition.",
    "I am delighted, it exceeded my expectations.",
    "Great value for the money, I would buy it again.",
];

/// Prototype sentences of the "negative" label: products, service, experiences.
pub const NEGATIVE_PROTOTYPES: &[&str] = &[
    "I hate this product, it broke after one day.",
    "Terrible quality, a complete waste of money.",
    "The customer service was rude and unhelpful.",
    "Nobody answered my complaint, awful support.",
    "What a horrible experience, I regret going there.",
    "This is the worst thing I have ever bought, do not buy it.",
    "The staff were rude and the food was disgusting.",
    "The delivery was late and the package arrived damaged.",
    "I am very disappointed, I want a refund.",
    "It does not work at all and I am angry.",
];

/// The zero-shot sentiment classifier: one centroid per label, the mean of the label's
/// normalised prototype embeddings, renormalised.
#[derive(Debug, Clone)]
pub struct Sentiment {
    labels: Vec<(&'static str, Vec<f32>)>,
}

impl Sentiment {
    /// Builds the classifier from each label's prototype embeddings (unit vectors).
    pub fn from_prototypes(labels: Vec<(&'static str, Vec<Vec<f32>>)>) -> Sentiment {
        let labels = labels
            .into_iter()
            .map(|(label, vectors)| (label, centroid(&vectors)))
            .collect();
        Sentiment { labels }
    }

    /// Embeds [`POSITIVE_PROTOTYPES`] and [`NEGATIVE_PROTOTYPES`] and builds the
    /// classifier. Blocking (runs the model).
    pub fn build(embedder: &Embedder) -> Result<Sentiment, baton_gpu_kernels::Error> {
        let positive = embedder.embed(POSITIVE_PROTOTYPES)?;
        let negative = embedder.embed(NEGATIVE_PROTOTYPES)?;
        Ok(Sentiment::from_prototypes(vec![
            ("positive", positive),
            ("negative", negative),
        ]))
    }

    /// The label whose centroid is most similar to `embedding` (by cosine), and its
    /// probability under a softmax over the cosines at temperature
    /// [`SOFTMAX_TEMPERATURE`]: `exp(c_l / T) / sum_k exp(c_k / T)`.
    pub fn classify(&self, embedding: &[f32]) -> (&'static str, f32) {
        let (best, score) =
            nearest_centroid(self.labels.iter().map(|(_, c)| c.as_slice()), embedding);
        (self.labels[best].0, score)
    }

    /// The labels, in order.
    pub fn labels(&self) -> Vec<&'static str> {
        self.labels.iter().map(|(l, _)| *l).collect()
    }

    /// Each label with its centroid, in order: what [`classify_with_centroids`] needs to
    /// classify exactly as [`Sentiment::classify`] does, without the model.
    pub fn centroids(&self) -> Vec<(String, Vec<f32>)> {
        self.labels
            .iter()
            .map(|(l, c)| (l.to_string(), c.clone()))
            .collect()
    }
}

/// [`Sentiment::classify`] over any `(label, centroid)` list: the index of the centroid most
/// similar to `embedding` and its softmax probability at [`SOFTMAX_TEMPERATURE`].
///
/// # Panics
/// If `centroids` is empty.
pub fn classify_with_centroids(
    centroids: &[(String, Vec<f32>)],
    embedding: &[f32],
) -> (usize, f32) {
    assert!(!centroids.is_empty(), "no centroids to classify with");
    nearest_centroid(centroids.iter().map(|(_, c)| c.as_slice()), embedding)
}

fn nearest_centroid<'a>(
    centroids: impl Iterator<Item = &'a [f32]>,
    embedding: &[f32],
) -> (usize, f32) {
    let logits: Vec<f32> = centroids
        .map(|c| cosine(embedding, c) / SOFTMAX_TEMPERATURE)
        .collect();
    let (best, max) = logits
        .iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |acc, (i, &l)| if l > acc.1 { (i, l) } else { acc },
        );
    let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
    (best, 1.0 / sum)
}

/// Mean of unit vectors, renormalised to unit length.
fn centroid(vectors: &[Vec<f32>]) -> Vec<f32> {
    let dim = vectors.first().map_or(0, Vec::len);
    let mut mean = vec![0.0f32; dim];
    for v in vectors {
        let norm = v
            .iter()
            .map(|x| x * x)
            .sum::<f32>()
            .sqrt()
            .max(f32::EPSILON);
        for (m, x) in mean.iter_mut().zip(v) {
            *m += x / norm;
        }
    }
    let norm = mean.iter().map(|x| x * x).sum::<f32>().sqrt();
    if norm > 0.0 {
        mean.iter_mut().for_each(|m| *m /= norm);
    }
    mean
}

/// The process's models, loaded on first use. Cheap to share behind an `Arc`.
///
/// Loading is retried on the next call after a failure (a missing file may be installed
/// meanwhile); a loaded model is kept for the life of the process.
pub struct Models {
    config: EmbedderConfig,
    embedder: Mutex<Option<Arc<Embedder>>>,
    sentiment: Mutex<Option<Arc<Sentiment>>>,
    /// The cluster's model store (fine-tuned heads), once attached and opened.
    store: ModelStoreSlot,
    /// The vector index this process owns, if it serves the `index` queue.
    index: std::sync::OnceLock<Arc<crate::index::VectorIndex>>,
    /// How `run_inference` attempts running at once share forward passes.
    batching: BatchOptions,
}

impl std::fmt::Debug for Models {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Models")
            .field("model_path", &self.config.model_path)
            .field("loaded", &self.is_loaded())
            .finish_non_exhaustive()
    }
}

impl Models {
    /// Models from the layout `cargo xtask setup` creates under `baton_home`, the embedder
    /// run as [`EmbedderConfig::worker_layout`] says (one single-threaded session per core,
    /// at most 4).
    pub fn new(baton_home: impl AsRef<Path>) -> Models {
        Models::with_config(EmbedderConfig::for_workers(baton_home.as_ref()))
    }

    /// Models from an explicit embedder configuration.
    pub fn with_config(config: EmbedderConfig) -> Models {
        Models {
            config,
            embedder: Mutex::new(None),
            sentiment: Mutex::new(None),
            store: ModelStoreSlot::default(),
            index: std::sync::OnceLock::new(),
            batching: BatchOptions::default(),
        }
    }

    /// The same models, the embedder run as `sessions` ONNX Runtime sessions (model calls
    /// at once) of `intra_threads` threads each.
    pub fn with_sessions(mut self, sessions: usize, intra_threads: usize) -> Models {
        self.config.sessions = sessions.max(1);
        self.config.intra_threads = intra_threads.max(1);
        self
    }

    /// The same models, with `run_inference`'s dynamic batching set to `batching`
    /// (`max_batch` 1: one text per forward pass).
    pub fn with_batching(mut self, batching: BatchOptions) -> Models {
        self.batching = batching;
        self
    }

    /// How concurrent `run_inference` attempts share forward passes.
    pub fn batching(&self) -> BatchOptions {
        self.batching
    }

    /// The embedder configuration.
    pub fn config(&self) -> &EmbedderConfig {
        &self.config
    }

    /// The model file's path.
    pub fn model_path(&self) -> PathBuf {
        self.config.model_path.clone()
    }

    /// Whether the embedder has been loaded.
    pub fn is_loaded(&self) -> bool {
        self.embedder
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    /// The embedder, loading it on first use. Blocking: call it from
    /// `tokio::task::spawn_blocking`. Concurrent first callers wait for one load.
    ///
    /// A load failure is a retryable `ModelUnavailable` activity error.
    pub fn embedder(&self) -> Result<Arc<Embedder>, ActivityError> {
        let mut slot = self.embedder.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(e) = slot.as_ref() {
            return Ok(e.clone());
        }
        let started = Instant::now();
        let embedder = Embedder::load(&self.config).map_err(|e| {
            tracing::warn!(error = %e, "could not load the embedding model");
            ActivityError::retryable("ModelUnavailable", e.to_string())
        })?;
        tracing::info!(
            model = %self.config.model_path.display(),
            dim = embedder.dim(),
            ms = started.elapsed().as_millis() as u64,
            "embedding model loaded"
        );
        let embedder = Arc::new(embedder);
        *slot = Some(embedder.clone());
        Ok(embedder)
    }

    /// The sentiment classifier, built on first use (loads the embedder and embeds the
    /// prototypes). Blocking, like [`Models::embedder`].
    pub fn sentiment(&self) -> Result<Arc<Sentiment>, ActivityError> {
        let mut slot = self
            .sentiment
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if let Some(s) = slot.as_ref() {
            return Ok(s.clone());
        }
        let embedder = self.embedder()?;
        let sentiment = Sentiment::build(&embedder).map_err(|e| {
            ActivityError::retryable(
                "InferenceError",
                format!("embedding the sentiment prototypes: {e}"),
            )
        })?;
        let sentiment = Arc::new(sentiment);
        *slot = Some(sentiment.clone());
        Ok(sentiment)
    }
}

/// The vector index of `document_ingest` and `baton search`: held by the process that
/// serves the `index` queue (see [`crate::index`]).
impl Models {
    /// Gives this process its vector index. Once per process: `false` (and the index
    /// dropped) if one was already set.
    pub fn set_index(&self, index: Arc<crate::index::VectorIndex>) -> bool {
        self.index.set(index).is_ok()
    }

    /// The process's vector index, if it has one.
    pub fn index(&self) -> Option<Arc<crate::index::VectorIndex>> {
        self.index.get().cloned()
    }
}

/// The JetStream connection, the opened model store and the latest-head cache of a
/// [`Models`].
#[derive(Default)]
struct ModelStoreSlot {
    jetstream: OnceLock<jetstream::Context>,
    opened: tokio::sync::OnceCell<Arc<ModelStore>>,
    latest: Mutex<HashMap<String, CachedLatest>>,
}

struct CachedLatest {
    checked: Instant,
    current: Option<Arc<FineTuned>>,
}

/// A registered fine-tuned head, loaded: what `run_inference` classifies with.
#[derive(Debug, Clone, PartialEq)]
pub struct FineTuned {
    /// `<model>.v<N>`, as reported in `Inference::model`.
    pub name: String,
    /// The version's metadata.
    pub version: ModelVersion,
    /// The head.
    pub head: LinearHead,
}

/// The model store: fine-tuned heads registered by `fine_tune` (see
/// [`super::model_store`]).
impl Models {
    /// Gives the models a JetStream connection to the cluster's model store (the
    /// `BATON_MODELS` KV bucket and the `BATON_ARTIFACTS` object store, created on first
    /// use). Call it once, after connecting to NATS and before the pools start; later calls
    /// are ignored. Without it, `run_inference` classifies zero-shot and the fine-tuning and
    /// evaluation activities fail with a retryable `ModelStoreUnavailable`.
    pub fn attach_jetstream(&self, js: jetstream::Context) {
        if self.store.jetstream.set(js).is_err() {
            tracing::debug!("the model store already has a JetStream connection");
        }
    }

    /// Whether [`Models::attach_jetstream`] was called.
    pub fn has_store(&self) -> bool {
        self.store.jetstream.get().is_some()
    }

    /// The model store, opened (its buckets created if need be) on first use.
    ///
    /// No JetStream attached, or the buckets cannot be opened: a retryable
    /// `ModelStoreUnavailable` activity error (opening is tried again on the next call).
    pub async fn store(&self) -> Result<Arc<ModelStore>, ActivityError> {
        let Some(js) = self.store.jetstream.get() else {
            return Err(ActivityError::retryable(
                "ModelStoreUnavailable",
                "this worker has no model store: Models::attach_jetstream was not called",
            ));
        };
        self.store
            .opened
            .get_or_try_init(|| async { ModelStore::open(js).await.map(Arc::new) })
            .await
            .cloned()
            .map_err(StoreError::into_activity_error)
    }

    /// The latest registered fine-tuned head of `model`, or `None` when it has no version
    /// (or no model store is attached: zero-shot, as before fine-tuning existed).
    ///
    /// What was read is trusted for [`LATEST_TTL`], so inference pays the store's round
    /// trips at most once per model every two seconds and picks up a new version within
    /// that time. When the store cannot be read, the head read before is used (with a
    /// warning); with nothing read before, the error (retryable `ModelStoreUnavailable`).
    pub async fn latest_head(&self, model: &str) -> Result<Option<Arc<FineTuned>>, ActivityError> {
        if !self.has_store() {
            return Ok(None);
        }
        let cached = {
            let latest = self
                .store
                .latest
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            match latest.get(model) {
                Some(c) if c.checked.elapsed() < LATEST_TTL => return Ok(c.current.clone()),
                Some(c) => Some(c.current.clone()),
                None => None,
            }
        };
        match self.read_latest(model, cached.clone().flatten()).await {
            Ok(current) => {
                let entry = CachedLatest {
                    checked: Instant::now(),
                    current: current.clone(),
                };
                self.store
                    .latest
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .insert(model.to_string(), entry);
                Ok(current)
            }
            Err(e) => match cached {
                Some(current) => {
                    tracing::warn!(model, error = %e.message, "model store unreadable; using the head read before");
                    Ok(current)
                }
                None => Err(e),
            },
        }
    }

    async fn read_latest(
        &self,
        model: &str,
        cached: Option<Arc<FineTuned>>,
    ) -> Result<Option<Arc<FineTuned>>, ActivityError> {
        let store = self.store().await?;
        let Some(n) = store
            .latest(model)
            .await
            .map_err(StoreError::into_activity_error)?
        else {
            return Ok(None);
        };
        if let Some(c) = cached.filter(|c| c.version.version == n) {
            return Ok(Some(c));
        }
        let version = store
            .version(model, n)
            .await
            .map_err(StoreError::into_activity_error)?
            .ok_or_else(|| {
                StoreError::Corrupt(format!("{model}.latest is {n} but {model}.v{n} is missing"))
                    .into_activity_error()
            })?;
        let head = store
            .head(&version)
            .await
            .map_err(StoreError::into_activity_error)?;
        let fine = FineTuned {
            name: version.name(),
            version,
            head,
        };
        tracing::info!(model = %fine.name, labels = ?fine.head.labels, "fine-tuned head loaded");
        Ok(Some(Arc::new(fine)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(v: &[f32]) -> Vec<f32> {
        let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        v.iter().map(|x| x / n).collect()
    }

    #[test]
    fn centroid_is_the_renormalised_mean() {
        let c = centroid(&[vec![1.0, 0.0], vec![0.0, 2.0]]);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!((c[0] - h).abs() < 1e-6 && (c[1] - h).abs() < 1e-6, "{c:?}");
    }

    #[test]
    fn classify_picks_the_nearest_centroid_with_a_softmax_score() {
        let s = Sentiment::from_prototypes(vec![
            ("positive", vec![unit(&[1.0, 0.1]), unit(&[1.0, -0.1])]),
            ("negative", vec![unit(&[-1.0, 0.1]), unit(&[-1.0, -0.1])]),
        ]);
        let (label, score) = s.classify(&unit(&[1.0, 0.2]));
        assert_eq!(label, "positive");
        assert!(score > 0.99, "{score}");
        let (label, score) = s.classify(&unit(&[-0.2, 1.0]));
        assert_eq!(label, "negative");
        assert!(score > 0.5 && score < 1.0, "{score}");
        // Equidistant: a coin toss.
        let (_, score) = s.classify(&[0.0, 1.0]);
        assert!((score - 0.5).abs() < 1e-6, "{score}");
        // Exactly the temperature's effect: a cosine margin of 0.05 gives e / (1 + e).
        let p = Sentiment {
            labels: vec![("a", vec![1.0, 0.0]), ("b", vec![0.0, 1.0])],
        };
        let (label, score) = p.classify(&[0.30, 0.25]);
        let cos_a = 0.30 / (0.30f32.powi(2) + 0.25f32.powi(2)).sqrt();
        let cos_b = 0.25 / (0.30f32.powi(2) + 0.25f32.powi(2)).sqrt();
        let expected = 1.0 / (1.0 + ((cos_b - cos_a) / SOFTMAX_TEMPERATURE).exp());
        assert_eq!(label, "a");
        assert!((score - expected).abs() < 1e-5, "{score} vs {expected}");
    }

    #[test]
    fn a_missing_model_is_a_retryable_model_unavailable_error() {
        let models = Models::new("/nonexistent/baton-home");
        let err = models.embedder().unwrap_err();
        assert_eq!(err.kind, "ModelUnavailable");
        assert!(err.retryable);
        assert!(
            err.message.contains("model file not found"),
            "{}",
            err.message
        );
        assert!(!models.is_loaded());
        // Retried, not cached.
        assert_eq!(models.sentiment().unwrap_err().kind, "ModelUnavailable");
    }
}
