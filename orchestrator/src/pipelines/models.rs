//! The models behind the "gpu" activities: the sentence embedder, loaded lazily once per
//! process, and the zero-shot sentiment classifier built on it.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::Instant,
};

use baton_actors::ActivityError;
use baton_gpu_kernels::{Embedder, EmbedderConfig, cosine};

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
        let logits: Vec<f32> = self
            .labels
            .iter()
            .map(|(_, c)| cosine(embedding, c) / SOFTMAX_TEMPERATURE)
            .collect();
        let (best, max) = logits
            .iter()
            .enumerate()
            .fold(
                (0, f32::NEG_INFINITY),
                |acc, (i, &l)| if l > acc.1 { (i, l) } else { acc },
            );
        let sum: f32 = logits.iter().map(|l| (l - max).exp()).sum();
        (self.labels[best].0, 1.0 / sum)
    }

    /// The labels, in order.
    pub fn labels(&self) -> Vec<&'static str> {
        self.labels.iter().map(|(l, _)| *l).collect()
    }
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
    /// Models from the layout `cargo xtask setup` creates under `baton_home`, run with 2
    /// intra-op threads and one session.
    pub fn new(baton_home: impl AsRef<Path>) -> Models {
        let config = EmbedderConfig {
            intra_threads: 2,
            ..EmbedderConfig::from_home(baton_home.as_ref())
        };
        Models::with_config(config)
    }

    /// Models from an explicit embedder configuration.
    pub fn with_config(config: EmbedderConfig) -> Models {
        Models {
            config,
            embedder: Mutex::new(None),
            sentiment: Mutex::new(None),
        }
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
