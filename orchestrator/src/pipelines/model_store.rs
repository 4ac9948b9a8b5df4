//! The model store: registered model versions and their artifacts, in JetStream, so that
//! every process of a cluster (any worker, on any host) sees the same models.
//!
//! - KV bucket [`MODELS_BUCKET`] (`BATON_MODELS`), JSON values:
//!   - `<model>.v<N>` -> [`ModelVersion`] (labels, metrics, dataset hash, timestamp, the
//!     head's artifact name), written once with a KV *create*, so two concurrent
//!     registrations can never share a number;
//!   - `<model>.latest` -> `N`, advanced by compare-and-set and never moved backwards;
//!   - `<model>.run.<run_id>` -> `N`: the version a `fine_tune` run registered, so a retried
//!     registration returns it instead of registering again.
//! - Object store [`ARTIFACTS_BUCKET`] (`BATON_ARTIFACTS`), MessagePack values: trained
//!   heads (`heads/<run_id>/<seq>`), training checkpoints
//!   (`checkpoints/<run_id>/<seq>/epoch-<E>`) and embedding sets
//!   (`embeddings/<run_id>/<seq>`), the bulky data that stays out of workflow journals.
//!
//! Model names follow Baton's name rules (letters, digits, `-_`, at most 64), so a name is
//! always one KV key token.

use std::time::{SystemTime, UNIX_EPOCH};

use async_nats::jetstream::{
    self,
    kv::{self, CreateErrorKind, Operation, UpdateErrorKind},
    object_store::{self, GetErrorKind, ObjectStore},
    stream::StorageType,
};
use baton_actors::ActivityError;
use baton_gpu_kernels::LinearHead;
use baton_transport::{codec, jetstream as js_setup};
use serde::{Deserialize, Serialize, de::DeserializeOwned};
use tokio::io::AsyncReadExt;

use super::eval::Metrics;

/// The KV bucket of model versions.
pub const MODELS_BUCKET: &str = "BATON_MODELS";
/// The object store of heads, checkpoints and embedding sets.
pub const ARTIFACTS_BUCKET: &str = "BATON_ARTIFACTS";

/// One registered version of a model: the value of `<model>.v<N>`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelVersion {
    /// The model's name (`sentiment`).
    pub model: String,
    /// The version, from 1.
    pub version: u64,
    /// The head's classes, in the head's order.
    pub labels: Vec<String>,
    /// Metrics on the held-out split of the training dataset.
    pub metrics: Metrics,
    /// SHA-256 (hex) of the training dataset's validated rows.
    pub dataset_sha256: String,
    /// When it was registered, in milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The object holding the head ([`LinearHead`], MessagePack).
    pub artifact: String,
    /// The embedding model the head was trained on.
    pub embedder: String,
    /// The embedding dimension.
    pub dim: usize,
    /// The `fine_tune` workflow that trained it.
    pub workflow_id: String,
    /// Its run.
    pub run_id: String,
    /// How it was trained.
    pub training: TrainingSummary,
}

/// How a version was trained.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainingSummary {
    /// Epochs.
    pub epochs: u32,
    /// SGD step size.
    pub learning_rate: f32,
    /// Mini-batch size.
    pub batch_size: usize,
    /// L2 pull toward the initial head.
    pub weight_decay: f32,
    /// Whether training started from the zero-shot prototypes.
    pub warm_start: bool,
    /// Seed of the split and the epoch orders.
    pub seed: u64,
    /// Rows trained on.
    pub train_rows: usize,
    /// Rows held out (the metrics' rows).
    pub holdout_rows: usize,
    /// Mean loss of the last epoch.
    pub final_loss: f32,
    /// The checkpoint epoch training resumed from, if an attempt was cut short.
    pub resumed_from_epoch: Option<u32>,
    /// Where the epochs ran: `cpu` or `cuda`.
    pub compute: String,
}

impl ModelVersion {
    /// `<model>.v<N>`.
    pub fn name(&self) -> String {
        format!("{}.v{}", self.model, self.version)
    }
}

/// Errors of the model store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// NATS or JetStream failed (not connected, timed out, no JetStream): worth retrying.
    #[error("model store unavailable: {0}")]
    Unavailable(String),
    /// Something stored cannot be read back as what it should be.
    #[error("model store corrupt: {0}")]
    Corrupt(String),
}

impl StoreError {
    fn nats(e: impl std::fmt::Display) -> StoreError {
        StoreError::Unavailable(e.to_string())
    }

    /// As an activity error: `Unavailable` is a retryable `ModelStoreUnavailable`,
    /// `Corrupt` a non-retryable `ModelStoreCorrupt`.
    pub fn into_activity_error(self) -> ActivityError {
        match self {
            StoreError::Unavailable(_) => {
                ActivityError::retryable("ModelStoreUnavailable", self.to_string())
            }
            StoreError::Corrupt(_) => {
                ActivityError::non_retryable("ModelStoreCorrupt", self.to_string())
            }
        }
    }
}

impl From<StoreError> for ActivityError {
    fn from(e: StoreError) -> Self {
        e.into_activity_error()
    }
}

/// `<model>.v<N>`.
pub fn version_key(model: &str, version: u64) -> String {
    format!("{model}.v{version}")
}

/// `<model>.latest`.
pub fn latest_key(model: &str) -> String {
    format!("{model}.latest")
}

/// `<model>.run.<run_id>`.
pub fn run_key(model: &str, run_id: &str) -> String {
    format!("{model}.run.{run_id}")
}

/// The trained head of an activity: `heads/<run_id>/<seq>`.
pub fn head_artifact(run_id: &str, seq: u32) -> String {
    format!("heads/{run_id}/{seq}")
}

/// A training checkpoint: `checkpoints/<run_id>/<seq>/epoch-<epoch>`.
pub fn checkpoint_artifact(run_id: &str, seq: u32, epoch: u32) -> String {
    format!("checkpoints/{run_id}/{seq}/epoch-{epoch}")
}

/// The embedding set an activity computed: `embeddings/<run_id>/<seq>`.
pub fn embeddings_artifact(run_id: &str, seq: u32) -> String {
    format!("embeddings/{run_id}/{seq}")
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Handles on the KV bucket and the object store. Cheap to clone.
#[derive(Clone)]
pub struct ModelStore {
    kv: kv::Store,
    objects: ObjectStore,
}

impl std::fmt::Debug for ModelStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelStore")
            .field("kv", &MODELS_BUCKET)
            .field("objects", &ARTIFACTS_BUCKET)
            .finish()
    }
}

impl ModelStore {
    /// Opens the bucket and the object store, creating them (file storage) if absent.
    pub async fn open(js: &jetstream::Context) -> Result<ModelStore, StoreError> {
        let kv = js_setup::key_value_bucket(
            js,
            kv::Config {
                bucket: MODELS_BUCKET.into(),
                description: "Baton model versions".into(),
                history: 5,
                storage: StorageType::File,
                num_replicas: js_setup::DEFAULT_REPLICAS,
                ..Default::default()
            },
        )
        .await
        .map_err(StoreError::nats)?;
        let objects = js_setup::object_store_bucket(
            js,
            object_store::Config {
                bucket: ARTIFACTS_BUCKET.into(),
                description: Some("Baton model artifacts: heads, checkpoints, embeddings".into()),
                storage: StorageType::File,
                num_replicas: js_setup::DEFAULT_REPLICAS,
                ..Default::default()
            },
        )
        .await
        .map_err(StoreError::nats)?;
        Ok(ModelStore { kv, objects })
    }

    // --- artifacts ----------------------------------------------------------------------

    /// Stores (or replaces) an artifact. A reader sees the old or the new value, never a
    /// mix: the object's metadata is swapped only once all its chunks are stored.
    pub async fn put_bytes(&self, name: &str, bytes: &[u8]) -> Result<(), StoreError> {
        let mut reader = bytes;
        self.objects
            .put(name, &mut reader)
            .await
            .map(|_| ())
            .map_err(|e| StoreError::Unavailable(format!("storing {name}: {e}")))
    }

    /// An artifact's bytes, or `None` if there is no such artifact.
    pub async fn get_bytes(&self, name: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut object = match self.objects.get(name).await {
            Ok(o) => o,
            Err(e) if e.kind() == GetErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(StoreError::Unavailable(format!("reading {name}: {e}"))),
        };
        let mut bytes = Vec::new();
        object
            .read_to_end(&mut bytes)
            .await
            .map_err(|e| StoreError::Unavailable(format!("reading {name}: {e}")))?;
        Ok(Some(bytes))
    }

    /// Deletes an artifact; deleting one that does not exist is not an error.
    pub async fn delete(&self, name: &str) -> Result<(), StoreError> {
        match self.objects.delete(name).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == object_store::DeleteErrorKind::NotFound => Ok(()),
            Err(e) => Err(StoreError::Unavailable(format!("deleting {name}: {e}"))),
        }
    }

    /// Stores a value as MessagePack.
    pub async fn put_value<T: Serialize>(&self, name: &str, value: &T) -> Result<(), StoreError> {
        let bytes = codec::encode(value)
            .map_err(|e| StoreError::Corrupt(format!("encoding {name}: {e}")))?;
        self.put_bytes(name, &bytes).await
    }

    /// A MessagePack value, or `None` if there is no such artifact.
    pub async fn get_value<T: DeserializeOwned>(
        &self,
        name: &str,
    ) -> Result<Option<T>, StoreError> {
        match self.get_bytes(name).await? {
            None => Ok(None),
            Some(bytes) => codec::decode(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("decoding {name}: {e}"))),
        }
    }

    /// The head of a version, checked against its metadata (labels, dimension).
    pub async fn head(&self, version: &ModelVersion) -> Result<LinearHead, StoreError> {
        let head: LinearHead = self.get_value(&version.artifact).await?.ok_or_else(|| {
            StoreError::Corrupt(format!(
                "{} names the artifact {}, which does not exist",
                version.name(),
                version.artifact
            ))
        })?;
        if head.labels != version.labels
            || head.dim != version.dim
            || head.weights.len() != head.labels.len() * head.dim
            || head.bias.len() != head.labels.len()
        {
            return Err(StoreError::Corrupt(format!(
                "the head {} does not match {} (labels {:?}, dim {})",
                version.artifact,
                version.name(),
                version.labels,
                version.dim
            )));
        }
        Ok(head)
    }

    // --- versions -----------------------------------------------------------------------

    /// The latest version number of `model`, or `None` when it has none.
    pub async fn latest(&self, model: &str) -> Result<Option<u64>, StoreError> {
        match self
            .kv
            .get(latest_key(model))
            .await
            .map_err(StoreError::nats)?
        {
            None => Ok(None),
            Some(bytes) => parse_version(model, &bytes).map(Some),
        }
    }

    /// A version's metadata, or `None` if it is not registered.
    pub async fn version(
        &self,
        model: &str,
        version: u64,
    ) -> Result<Option<ModelVersion>, StoreError> {
        let key = version_key(model, version);
        match self.kv.get(key.as_str()).await.map_err(StoreError::nats)? {
            None => Ok(None),
            Some(bytes) => serde_json::from_slice(&bytes)
                .map(Some)
                .map_err(|e| StoreError::Corrupt(format!("{key}: {e}"))),
        }
    }

    /// Registers `draft` as the next version of `draft.model` and makes it the latest.
    /// `draft.version` and `draft.created_ms` are assigned here.
    ///
    /// - The number comes from a KV create of `<model>.v<N>`, from `latest + 1` upwards: a
    ///   registration that loses a race for `N` takes `N + 1`, so no two share a number.
    /// - `<model>.latest` is then advanced by compare-and-set, never backwards.
    /// - Idempotent per run: when `<model>.run.<run_id>` exists (a retry after the version
    ///   was written), the version it names is returned and nothing is written.
    pub async fn register(&self, mut draft: ModelVersion) -> Result<ModelVersion, StoreError> {
        let model = draft.model.clone();
        let marker = run_key(&model, &draft.run_id);
        if let Some(bytes) = self
            .kv
            .get(marker.as_str())
            .await
            .map_err(StoreError::nats)?
        {
            let n = parse_version(&model, &bytes)?;
            if let Some(v) = self.version(&model, n).await? {
                self.advance_latest(&model, n).await?;
                return Ok(v);
            }
        }
        let mut n = self.latest(&model).await?.unwrap_or(0) + 1;
        loop {
            draft.version = n;
            draft.created_ms = now_ms();
            let value = serde_json::to_vec(&draft)
                .map_err(|e| StoreError::Corrupt(format!("encoding {}: {e}", draft.name())))?;
            match self.kv.create(version_key(&model, n), value.into()).await {
                Ok(_) => break,
                Err(e) if e.kind() == CreateErrorKind::AlreadyExists => n += 1,
                Err(e) => return Err(StoreError::nats(e)),
            }
        }
        self.kv
            .put(marker, n.to_string().into())
            .await
            .map_err(StoreError::nats)?;
        self.advance_latest(&model, n).await?;
        Ok(draft)
    }

    /// Sets `<model>.latest` to `n` unless it already names `n` or a later version
    /// (compare-and-set, retried on conflict).
    async fn advance_latest(&self, model: &str, n: u64) -> Result<(), StoreError> {
        let key = latest_key(model);
        loop {
            let entry = self
                .kv
                .entry(key.as_str())
                .await
                .map_err(StoreError::nats)?;
            let written = match entry.filter(|e| e.operation == Operation::Put) {
                Some(e) => {
                    if parse_version(model, &e.value)? >= n {
                        return Ok(());
                    }
                    match self
                        .kv
                        .update(key.as_str(), n.to_string().into(), e.revision)
                        .await
                    {
                        Ok(_) => true,
                        Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => false,
                        Err(e) => return Err(StoreError::nats(e)),
                    }
                }
                None => match self.kv.create(key.as_str(), n.to_string().into()).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == CreateErrorKind::AlreadyExists => false,
                    Err(e) => return Err(StoreError::nats(e)),
                },
            };
            if written {
                return Ok(());
            }
        }
    }
}

fn parse_version(model: &str, bytes: &[u8]) -> Result<u64, StoreError> {
    std::str::from_utf8(bytes)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            StoreError::Corrupt(format!(
                "a version number of {model} is {:?}",
                String::from_utf8_lossy(bytes)
            ))
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_artifact_names() {
        assert_eq!(version_key("sentiment", 3), "sentiment.v3");
        assert_eq!(latest_key("sentiment"), "sentiment.latest");
        assert_eq!(run_key("sentiment", "abc"), "sentiment.run.abc");
        assert_eq!(head_artifact("r1", 2), "heads/r1/2");
        assert_eq!(
            checkpoint_artifact("r1", 2, 40),
            "checkpoints/r1/2/epoch-40"
        );
        assert_eq!(embeddings_artifact("r1", 1), "embeddings/r1/1");
    }

    #[test]
    fn version_numbers_parse_strictly() {
        assert_eq!(parse_version("m", b"12").unwrap(), 12);
        assert_eq!(parse_version("m", b" 7\n").unwrap(), 7);
        assert!(matches!(
            parse_version("m", b"seven"),
            Err(StoreError::Corrupt(_))
        ));
    }

    #[test]
    fn store_errors_map_to_activity_errors() {
        let e = StoreError::Unavailable("timed out".into()).into_activity_error();
        assert_eq!(
            (e.kind.as_str(), e.retryable),
            ("ModelStoreUnavailable", true)
        );
        let e = StoreError::Corrupt("bad".into()).into_activity_error();
        assert_eq!((e.kind.as_str(), e.retryable), ("ModelStoreCorrupt", false));
    }
}
