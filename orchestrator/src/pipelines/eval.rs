//! Evaluation: the classification metrics shared by `fine_tune` (holdout) and `eval`, and
//! the `eval` workflow, which runs a labelled test set through a model version and a
//! baseline and reports both and the difference.
//!
//! `eval`: validate_dataset (cpu) -> embed_texts (gpu) -> [`EVALUATE_MODELS`] (cpu).

use std::sync::Arc;

use baton_actors::{ActivityContext, ActivityDef, ActivityError, WorkflowContext, WorkflowError};
use baton_gpu_kernels::LinearHead;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{
    activities::blocking,
    finetune::{
        DatasetRequest, DatasetSource, EMBED_TEXTS, EmbedRequest, EmbeddingSet, Row,
        SENTIMENT_MODEL, VALIDATE_DATASET, load_embeddings,
    },
    model_store::ModelStore,
    models::{Models, classify_with_centroids},
};

/// Name of the workflow [`eval`].
pub const EVAL: &str = "eval";
/// How the zero-shot prototype classifier is named in inputs and outputs.
pub const ZERO_SHOT: &str = "zero-shot";

/// `evaluate_models(CompareRequest) -> Comparison` (cpu).
pub const EVALUATE_MODELS: ActivityDef<CompareRequest, Comparison> =
    ActivityDef::new("evaluate_models");

// --- metrics -------------------------------------------------------------------------

/// The figures of one class.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassMetrics {
    /// The class.
    pub label: String,
    /// Of the rows predicted as this class, the fraction that are (0 when none is).
    pub precision: f64,
    /// Of the rows of this class, the fraction predicted as it (0 when there are none).
    pub recall: f64,
    /// Harmonic mean of precision and recall (0 when both are 0).
    pub f1: f64,
    /// Rows of this class.
    pub support: usize,
    /// Rows predicted as this class.
    pub predicted: usize,
}

/// Classification metrics over a labelled set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    /// Rows evaluated.
    pub rows: usize,
    /// Fraction of rows predicted right.
    pub accuracy: f64,
    /// Unweighted mean of the classes' F1.
    pub macro_f1: f64,
    /// One entry per class, in `labels` order.
    pub per_class: Vec<ClassMetrics>,
    /// The classes: every label that is true or predicted at least once, sorted.
    pub labels: Vec<String>,
    /// `confusion[t][p]`: rows of class `labels[t]` predicted as `labels[p]`.
    pub confusion: Vec<Vec<usize>>,
}

/// The difference `version - baseline`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Delta {
    /// Accuracy difference.
    pub accuracy: f64,
    /// Macro-F1 difference.
    pub macro_f1: f64,
}

impl Delta {
    /// `a - b`.
    pub fn between(a: &Metrics, b: &Metrics) -> Delta {
        Delta {
            accuracy: a.accuracy - b.accuracy,
            macro_f1: a.macro_f1 - b.macro_f1,
        }
    }
}

/// Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix of
/// `predicted` against `truth` (same length, one label per row).
///
/// The classes are the labels that occur in either list, so a class the model never
/// predicts still counts (with F1 0) and one that occurs nowhere is not averaged in.
///
/// # Panics
/// If the lists differ in length.
pub fn classification_metrics(truth: &[&str], predicted: &[&str]) -> Metrics {
    assert_eq!(truth.len(), predicted.len(), "one prediction per row");
    let mut labels: Vec<String> = truth
        .iter()
        .chain(predicted)
        .map(|l| l.to_string())
        .collect();
    labels.sort_unstable();
    labels.dedup();
    let index = |l: &str| labels.binary_search_by(|x| x.as_str().cmp(l)).unwrap_or(0);
    let k = labels.len();
    let mut confusion = vec![vec![0usize; k]; k];
    for (t, p) in truth.iter().zip(predicted) {
        confusion[index(t)][index(p)] += 1;
    }
    let ratio = |a: usize, b: usize| if b == 0 { 0.0 } else { a as f64 / b as f64 };
    let per_class: Vec<ClassMetrics> = (0..k)
        .map(|c| {
            let tp = confusion[c][c];
            let support: usize = confusion[c].iter().sum();
            let predicted: usize = confusion.iter().map(|row| row[c]).sum();
            let precision = ratio(tp, predicted);
            let recall = ratio(tp, support);
            let f1 = if precision + recall == 0.0 {
                0.0
            } else {
                2.0 * precision * recall / (precision + recall)
            };
            ClassMetrics {
                label: labels[c].clone(),
                precision,
                recall,
                f1,
                support,
                predicted,
            }
        })
        .collect();
    let correct: usize = (0..k).map(|c| confusion[c][c]).sum();
    let macro_f1 = if k == 0 {
        0.0
    } else {
        per_class.iter().map(|c| c.f1).sum::<f64>() / k as f64
    };
    Metrics {
        rows: truth.len(),
        accuracy: ratio(correct, truth.len()),
        macro_f1,
        per_class,
        labels,
        confusion,
    }
}

// --- which model ---------------------------------------------------------------------

/// A model version to evaluate: `N`, `"latest"` or `"zero-shot"` (the prototypes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VersionRef {
    /// A registered version.
    Number(u64),
    /// The latest registered version, when the activity runs.
    Latest,
    /// The zero-shot prototype classifier.
    ZeroShot,
}

impl Serialize for VersionRef {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            VersionRef::Number(n) => s.serialize_u64(*n),
            VersionRef::Latest => s.serialize_str("latest"),
            VersionRef::ZeroShot => s.serialize_str(ZERO_SHOT),
        }
    }
}

impl<'de> Deserialize<'de> for VersionRef {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Number(u64),
            Name(String),
        }
        match Raw::deserialize(d)? {
            Raw::Number(0) => Err(serde::de::Error::custom("versions are numbered from 1")),
            Raw::Number(n) => Ok(VersionRef::Number(n)),
            Raw::Name(s) if s == "latest" => Ok(VersionRef::Latest),
            Raw::Name(s) if s == ZERO_SHOT => Ok(VersionRef::ZeroShot),
            Raw::Name(s) => Err(serde::de::Error::custom(format!(
                "version {s:?}: expected a number, \"latest\" or \"zero-shot\""
            ))),
        }
    }
}

/// A classifier ready to run over embeddings.
#[derive(Debug, Clone)]
pub enum Classifier {
    /// The zero-shot prototypes: (label, centroid).
    ZeroShot(Vec<(String, Vec<f32>)>),
    /// A registered head.
    Head {
        /// `<model>.v<N>`.
        name: String,
        /// The head.
        head: LinearHead,
    },
}

impl Classifier {
    /// `zero-shot` or `<model>.v<N>`.
    pub fn name(&self) -> String {
        match self {
            Classifier::ZeroShot(_) => ZERO_SHOT.to_string(),
            Classifier::Head { name, .. } => name.clone(),
        }
    }

    /// The predicted label of one embedding.
    pub fn predict(&self, x: &[f32]) -> &str {
        match self {
            Classifier::ZeroShot(c) => &c[classify_with_centroids(c, x).0].0,
            Classifier::Head { head, .. } => &head.labels[head.predict(x).0],
        }
    }

    /// Resolves a [`VersionRef`] of `model` against the store, for vectors of `set`.
    /// A version that does not exist, or was trained on other embeddings, is a
    /// `ValidationError`.
    pub async fn resolve(
        store: &ModelStore,
        model: &str,
        r: VersionRef,
        set: &EmbeddingSet,
    ) -> Result<Classifier, ActivityError> {
        let refuse = |m: String| ActivityError::non_retryable("ValidationError", m);
        let n = match r {
            VersionRef::ZeroShot if set.zero_shot.is_empty() => {
                return Err(refuse(
                    "the embedding set has no zero-shot centroids".into(),
                ));
            }
            VersionRef::ZeroShot => return Ok(Classifier::ZeroShot(set.zero_shot.clone())),
            VersionRef::Number(n) => n,
            VersionRef::Latest => store
                .latest(model)
                .await?
                .ok_or_else(|| refuse(format!("model {model:?} has no registered version")))?,
        };
        let version = store
            .version(model, n)
            .await?
            .ok_or_else(|| refuse(format!("{model}.v{n} is not registered")))?;
        if version.embedder != set.embedder || version.dim != set.dim {
            return Err(refuse(format!(
                "{} was trained on {} ({} dimensions), the test set is embedded with {} ({})",
                version.name(),
                version.embedder,
                version.dim,
                set.embedder,
                set.dim
            )));
        }
        let head = store.head(&version).await?;
        Ok(Classifier::Head {
            name: version.name(),
            head,
        })
    }
}

// --- the activity and the workflow ---------------------------------------------------

/// Input of [`EVALUATE_MODELS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareRequest {
    /// The model's name.
    pub model: String,
    /// The version evaluated.
    pub version: VersionRef,
    /// The version compared with.
    pub baseline: VersionRef,
    /// The test set's embedding set.
    pub embeddings: String,
    /// The true label of each test row, in order.
    pub truth: Vec<String>,
}

/// Result of [`EVALUATE_MODELS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Comparison {
    /// The version evaluated, resolved: `<model>.v<N>` or `zero-shot`.
    pub version: String,
    /// The baseline, resolved.
    pub baseline: String,
    /// The version's metrics.
    pub metrics: Metrics,
    /// The baseline's metrics.
    pub baseline_metrics: Metrics,
    /// `metrics - baseline_metrics`.
    pub delta: Delta,
}

/// [`EVALUATE_MODELS`]'s implementation: resolves both versions (`latest` is read now and
/// the result records which version it was), classifies every test row with each and
/// computes their [`classification_metrics`].
pub async fn evaluate_models(
    models: Arc<Models>,
    _ctx: ActivityContext,
    req: CompareRequest,
) -> Result<Comparison, ActivityError> {
    let store = models.store().await?;
    let set = load_embeddings(&store, &req.embeddings, req.truth.len()).await?;
    let version = Classifier::resolve(&store, &req.model, req.version, &set).await?;
    let baseline = Classifier::resolve(&store, &req.model, req.baseline, &set).await?;
    blocking(move || {
        let truth: Vec<&str> = req.truth.iter().map(String::as_str).collect();
        let run = |c: &Classifier| {
            let predicted: Vec<&str> = (0..truth.len()).map(|i| c.predict(set.row(i))).collect();
            classification_metrics(&truth, &predicted)
        };
        let metrics = run(&version);
        let baseline_metrics = run(&baseline);
        Ok(Comparison {
            version: version.name(),
            baseline: baseline.name(),
            delta: Delta::between(&metrics, &baseline_metrics),
            metrics,
            baseline_metrics,
        })
    })
    .await
}

fn default_model() -> String {
    SENTIMENT_MODEL.to_string()
}

fn default_version() -> VersionRef {
    VersionRef::Latest
}

fn default_baseline() -> VersionRef {
    VersionRef::ZeroShot
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct EvalInputRaw {
    dataset: Option<String>,
    rows: Option<Vec<Row>>,
    #[serde(default = "default_model")]
    model: String,
    #[serde(default = "default_version")]
    version: VersionRef,
    #[serde(default = "default_baseline")]
    baseline: VersionRef,
}

/// Input of [`eval`]: `{"dataset": "<path>" | "rows": [...], "model": "sentiment",
/// "version": N | "latest" | "zero-shot" (default "latest"), "baseline": N | "latest" |
/// "zero-shot" (default "zero-shot")}`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(try_from = "EvalInputRaw")]
pub struct EvalInput {
    /// The labelled test set.
    pub source: DatasetSource,
    /// The model's name.
    pub model: String,
    /// The version evaluated.
    pub version: VersionRef,
    /// The version compared with.
    pub baseline: VersionRef,
}

impl TryFrom<EvalInputRaw> for EvalInput {
    type Error = String;

    fn try_from(r: EvalInputRaw) -> Result<Self, String> {
        let source = match (r.dataset, r.rows) {
            (Some(path), None) => DatasetSource::Path(path),
            (None, Some(rows)) => DatasetSource::Rows(rows),
            _ => return Err("give exactly one of `dataset` (a JSONL path) and `rows`".into()),
        };
        baton_transport::ids::validate_name("model name", &r.model).map_err(|e| e.to_string())?;
        Ok(EvalInput {
            source,
            model: r.model,
            version: r.version,
            baseline: r.baseline,
        })
    }
}

/// Output of [`eval`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EvalOutput {
    /// The model's name.
    pub model: String,
    /// The version evaluated: `<model>.v<N>` or `zero-shot`.
    pub version: String,
    /// The baseline: `<model>.v<N>` or `zero-shot`.
    pub baseline: String,
    /// The version's metrics.
    pub metrics: Metrics,
    /// The baseline's metrics.
    pub baseline_metrics: Metrics,
    /// `metrics - baseline_metrics` (accuracy, macro-F1).
    pub delta: Delta,
    /// SHA-256 of the test set's validated rows.
    pub dataset_sha256: String,
}

/// `eval`: validate_dataset (cpu, every row is a test row) -> embed_texts (gpu) ->
/// evaluate_models (cpu).
pub async fn eval(ctx: WorkflowContext, input: EvalInput) -> Result<EvalOutput, WorkflowError> {
    let split = ctx
        .activity(
            &VALIDATE_DATASET,
            &DatasetRequest {
                source: input.source.clone(),
                labels: None,
                holdout: 1.0,
                seed: 0,
                min_labels: 1,
                min_rows_per_label: 1,
            },
        )
        .await?;
    let texts = split.holdout.iter().map(|r| r.text.clone()).collect();
    let embeddings = ctx.activity(&EMBED_TEXTS, &EmbedRequest { texts }).await?;
    let cmp = ctx
        .activity(
            &EVALUATE_MODELS,
            &CompareRequest {
                model: input.model.clone(),
                version: input.version,
                baseline: input.baseline,
                embeddings: embeddings.artifact,
                truth: split.holdout.iter().map(|r| r.label.clone()).collect(),
            },
        )
        .await?;
    Ok(EvalOutput {
        model: input.model,
        version: cmp.version,
        baseline: cmp.baseline,
        metrics: cmp.metrics,
        baseline_metrics: cmp.baseline_metrics,
        delta: cmp.delta,
        dataset_sha256: split.dataset_sha256,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn metrics_match_a_hand_computed_confusion_matrix() {
        let truth = ["a", "a", "a", "b", "b", "c"];
        let predicted = ["a", "a", "b", "b", "c", "c"];
        let m = classification_metrics(&truth, &predicted);
        assert_eq!(m.labels, ["a", "b", "c"]);
        assert_eq!(m.confusion, [[2, 1, 0], [0, 1, 1], [0, 0, 1]]);
        assert_eq!(m.rows, 6);
        assert!(close(m.accuracy, 4.0 / 6.0));
        // a: P 2/2, R 2/3, F1 0.8; b: P 1/2, R 1/2, F1 0.5; c: P 1/2, R 1/1, F1 2/3.
        let expect = [
            ("a", 1.0, 2.0 / 3.0, 0.8, 3, 2),
            ("b", 0.5, 0.5, 0.5, 2, 2),
            ("c", 0.5, 1.0, 2.0 / 3.0, 1, 2),
        ];
        for (c, (label, p, r, f1, support, predicted)) in m.per_class.iter().zip(expect) {
            assert_eq!(
                (c.label.as_str(), c.support, c.predicted),
                (label, support, predicted)
            );
            assert!(
                close(c.precision, p) && close(c.recall, r) && close(c.f1, f1),
                "{c:?}"
            );
        }
        assert!(
            close(m.macro_f1, (0.8 + 0.5 + 2.0 / 3.0) / 3.0),
            "{}",
            m.macro_f1
        );
    }

    #[test]
    fn a_label_only_predicted_counts_with_f1_zero() {
        let m = classification_metrics(&["a", "a"], &["a", "d"]);
        assert_eq!(m.labels, ["a", "d"]);
        assert!(close(m.accuracy, 0.5));
        assert!(close(m.per_class[0].f1, 2.0 / 3.0));
        assert_eq!(
            (
                m.per_class[1].precision,
                m.per_class[1].recall,
                m.per_class[1].f1
            ),
            (0.0, 0.0, 0.0)
        );
        assert!(close(m.macro_f1, 1.0 / 3.0));
        let perfect = classification_metrics(&["x", "y"], &["x", "y"]);
        assert_eq!((perfect.accuracy, perfect.macro_f1), (1.0, 1.0));
        let empty = classification_metrics(&[], &[]);
        assert_eq!((empty.rows, empty.accuracy, empty.macro_f1), (0, 0.0, 0.0));
        let d = Delta::between(&perfect, &m);
        assert!(close(d.accuracy, 0.5) && close(d.macro_f1, 2.0 / 3.0));
    }

    #[test]
    fn version_refs_parse_from_numbers_and_names() {
        let parse = |v: serde_json::Value| {
            serde_json::from_value::<VersionRef>(v).map_err(|e| e.to_string())
        };
        assert_eq!(parse(json!(3)).unwrap(), VersionRef::Number(3));
        assert_eq!(parse(json!("latest")).unwrap(), VersionRef::Latest);
        assert_eq!(parse(json!("zero-shot")).unwrap(), VersionRef::ZeroShot);
        assert!(parse(json!(0)).unwrap_err().contains("from 1"));
        assert!(parse(json!("newest")).unwrap_err().contains("\"newest\""));
        for r in [
            VersionRef::Number(7),
            VersionRef::Latest,
            VersionRef::ZeroShot,
        ] {
            let p = baton_transport::Payload::encode(&r).unwrap();
            assert_eq!(p.decode::<VersionRef>().unwrap(), r);
        }
        assert_eq!(
            serde_json::to_value(VersionRef::ZeroShot).unwrap(),
            json!("zero-shot")
        );
    }

    #[test]
    fn eval_inputs_default_to_latest_against_zero_shot() {
        let i: EvalInput = serde_json::from_value(json!({"dataset": "t.jsonl"})).unwrap();
        assert_eq!(
            (i.model.as_str(), i.version, i.baseline),
            ("sentiment", VersionRef::Latest, VersionRef::ZeroShot)
        );
        let i: EvalInput = serde_json::from_value(
            json!({"rows": [{"text": "a", "label": "b"}], "version": 2, "baseline": "latest"}),
        )
        .unwrap();
        assert_eq!(
            (i.version, i.baseline),
            (VersionRef::Number(2), VersionRef::Latest)
        );
        assert!(serde_json::from_value::<EvalInput>(json!({})).is_err());
        assert!(serde_json::from_value::<EvalInput>(json!({"dataset": "t", "versio": 1})).is_err());
    }

    #[test]
    fn classifiers_predict_labels() {
        let zero = Classifier::ZeroShot(vec![
            ("positive".into(), vec![1.0, 0.0]),
            ("negative".into(), vec![0.0, 1.0]),
        ]);
        assert_eq!(
            (zero.name().as_str(), zero.predict(&[0.9, 0.1])),
            ("zero-shot", "positive")
        );
        let mut head = LinearHead::new(vec!["neg".into(), "pos".into()], 2);
        head.weights = vec![0.0, 1.0, 1.0, 0.0];
        let head = Classifier::Head {
            name: "sentiment.v2".into(),
            head,
        };
        assert_eq!(
            (head.name().as_str(), head.predict(&[0.9, 0.1])),
            ("sentiment.v2", "pos")
        );
    }
}
