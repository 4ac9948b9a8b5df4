//! The sentence embedder: tokenizer + a pool of ONNX Runtime sessions + pooling.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard, PoisonError, TryLockError};

use ort::environment::Environment;
use ort::ep::{CUDA, ExecutionProvider};
use ort::session::builder::SessionBuilder;
use ort::session::{Session, SessionInputValue};
use ort::value::TensorRef;
use tokenizers::{
    PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

use crate::{Compute, Error, mean_pool_normalize};

/// Texts per inference call: [`Embedder::embed`] splits larger inputs into chunks of this size.
const CHUNK: usize = 32;
/// Fewest texts a part of a chunk spread over several sessions gets (see
/// [`Embedder::embed`]): below this a thread and a model call of its own cost more than
/// they save.
const MIN_PART: usize = 4;
/// Name of the model's output tensor, `[batch, seq, dim]`.
const OUTPUT: &str = "last_hidden_state";

/// Where the embedder's files are and how to run it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EmbedderConfig {
    /// The ONNX model (all-MiniLM-L6-v2, int8).
    pub model_path: PathBuf,
    /// The Hugging Face `tokenizer.json` that goes with the model.
    pub tokenizer_path: PathBuf,
    /// The ONNX Runtime shared library, loaded at run time. Only the first library loaded
    /// in a process is used (ONNX Runtime is process-global).
    pub ort_dylib_path: PathBuf,
    /// Intra-op threads per session (0 lets ONNX Runtime choose).
    pub intra_threads: usize,
    /// Texts are truncated to this many tokens, `[CLS]` and `[SEP]` included (256, as
    /// sentence-transformers does for this model).
    pub max_tokens: usize,
    /// Number of sessions in the pool: how many `embed` calls can run at once.
    pub sessions: usize,
    /// Try ONNX Runtime's CUDA execution provider for the encoder. Only used when the loaded
    /// library has it (the PyPI `onnxruntime` CPU wheel does not) and it registers; otherwise
    /// the CPU provider runs the encoder, with a log line saying why. Never fails the load.
    /// See [`Embedder::execution_provider`].
    pub cuda: bool,
}

impl EmbedderConfig {
    /// The layout `cargo xtask setup` creates under `baton_home` (normally `<repo>/.baton`):
    /// `lib/libonnxruntime.so.1.31.1` and `models/all-MiniLM-L6-v2/{model.onnx,tokenizer.json}`.
    /// One session, with as many intra-op threads as the machine has cores.
    pub fn from_home(baton_home: &Path) -> Self {
        let model_dir = baton_home.join("models").join("all-MiniLM-L6-v2");
        EmbedderConfig {
            model_path: model_dir.join("model.onnx"),
            tokenizer_path: model_dir.join("tokenizer.json"),
            ort_dylib_path: baton_home.join("lib").join("libonnxruntime.so.1.31.1"),
            intra_threads: std::thread::available_parallelism().map_or(1, |n| n.get()),
            max_tokens: 256,
            sessions: 1,
            cuda: false,
        }
    }
}

/// Most sessions [`EmbedderConfig::worker_layout`] gives a worker (each holds its own copy
/// of the model's buffers).
pub const MAX_WORKER_SESSIONS: usize = 4;

impl EmbedderConfig {
    /// How a worker runs the model by default, as (sessions, intra-op threads each): one
    /// single-threaded session per core, at most [`MAX_WORKER_SESSIONS`], the cores shared
    /// out among them (2 cores: 2 x 1; 16 cores: 4 x 4). Concurrent calls then never make
    /// the threads of one call wait, spinning, for a partner thread that another call or
    /// the orchestration preempted, and a lone call still uses every core (its chunk is
    /// spread over the free sessions). See BENCHMARKS.md, "Embedding throughput".
    pub fn worker_layout() -> (usize, usize) {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let sessions = cores.min(MAX_WORKER_SESSIONS);
        (sessions, (cores / sessions).max(1))
    }

    /// [`from_home`](Self::from_home) with the [`worker_layout`](Self::worker_layout).
    pub fn for_workers(baton_home: &Path) -> Self {
        let (sessions, intra_threads) = Self::worker_layout();
        EmbedderConfig {
            sessions,
            intra_threads,
            ..Self::from_home(baton_home)
        }
    }
}

/// A sentence embedder: text in, unit-length 384-d vectors out.
///
/// `Send + Sync`: share it behind an `Arc`. Up to [`EmbedderConfig::sessions`] model calls
/// run at once; more wait for a free session. On the CPU a chunk is spread over the
/// sessions free when it starts, so one caller alone uses every session (one
/// single-threaded session per core then loses nothing against one session with a thread
/// per core, and concurrent callers do not make the threads of one call wait, spinning,
/// for each other).
pub struct Embedder {
    /// Truncates to `max_tokens` and pads to the longest text of a batch.
    tokenizer: Tokenizer,
    /// Neither truncates nor pads: for [`Embedder::token_count`].
    counter: Tokenizer,
    sessions: Vec<Mutex<Session>>,
    next: AtomicUsize,
    dim: usize,
    token_type_ids: bool,
    on_cuda: bool,
}

impl std::fmt::Debug for Embedder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Embedder")
            .field("sessions", &self.sessions.len())
            .field("dim", &self.dim)
            .field("execution_provider", &self.execution_provider())
            .finish_non_exhaustive()
    }
}

/// The process's ONNX Runtime environment, with the library path it was loaded from.
///
/// A `Mutex<Option<_>>` rather than a `OnceLock` because initialisation can fail and must
/// be retried (`OnceLock::get_or_try_init` is unstable); a failed `ort::init_from` leaves
/// `ort`'s own global untouched, so a bad path never poisons later loads.
static ORT_ENV: Mutex<Option<(PathBuf, Environment)>> = Mutex::new(None);

/// Loads ONNX Runtime from `dylib` once per process and returns the shared environment.
fn environment(dylib: &Path) -> Result<Environment, Error> {
    // Checked before touching `ort`, so a missing file is a clean error whatever state
    // the process is in.
    if !dylib.is_file() {
        return Err(Error::OrtLibraryNotFound(dylib.to_path_buf()));
    }
    let mut slot = ORT_ENV.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((loaded, env)) = slot.as_ref() {
        if loaded != dylib {
            tracing::warn!(
                loaded = %loaded.display(),
                requested = %dylib.display(),
                "onnx runtime is already loaded in this process; ignoring the requested library"
            );
        }
        return Ok(env.clone());
    }
    let load_err = |message: String| Error::OrtLibraryLoad {
        path: dylib.to_path_buf(),
        message,
    };
    let env = ort::init_from(dylib)
        .map_err(|e| load_err(e.to_string()))?
        .with_name("baton")
        .build()
        .map_err(|e| load_err(e.to_string()))?;
    *slot = Some((dylib.to_path_buf(), env.clone()));
    Ok(env)
}

/// Builds one session. Returns `ort::Result` so that the builder's non-`Send` error type
/// never leaves this function.
fn build_session(env: &Environment, model: &Path, intra_threads: usize) -> ort::Result<Session> {
    Session::builder(env)?
        .with_intra_threads(intra_threads)?
        .commit_from_file(model)
}

/// Registers ONNX Runtime's CUDA execution provider on `builder` if the loaded library has
/// it; false (logged) when it does not or registration fails.
fn register_cuda(builder: &mut SessionBuilder) -> bool {
    match CUDA::is_available() {
        Ok(true) => {}
        Ok(false) => {
            tracing::info!(
                "this onnx runtime library has no CUDA execution provider (CPU build): \
                 the encoder runs on the CPU"
            );
            return false;
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not list onnx runtime's execution providers: the encoder runs on the CPU");
            return false;
        }
    }
    match CUDA::default().register(builder) {
        Ok(()) => true,
        Err(e) => {
            tracing::warn!(error = %e, "the CUDA execution provider did not register: the encoder runs on the CPU");
            false
        }
    }
}

/// Builds one session on ONNX Runtime's CUDA execution provider; `Ok(None)` when the
/// provider is unavailable or fails to register.
fn build_cuda_session(
    env: &Environment,
    model: &Path,
    intra_threads: usize,
) -> ort::Result<Option<Session>> {
    let mut builder = Session::builder(env)?.with_intra_threads(intra_threads)?;
    if !register_cuda(&mut builder) {
        return Ok(None);
    }
    builder.commit_from_file(model).map(Some)
}

/// One session, on the CUDA execution provider when `cuda` asks for it and it works (else on
/// the CPU provider), and whether it is on CUDA.
fn build_any_session(
    env: &Environment,
    model: &Path,
    intra_threads: usize,
    cuda: bool,
) -> ort::Result<(Session, bool)> {
    if cuda {
        match build_cuda_session(env, model, intra_threads) {
            Ok(Some(session)) => return Ok((session, true)),
            Ok(None) => {}
            Err(e) => tracing::warn!(
                error = %e,
                "creating a session on the CUDA execution provider failed: the encoder runs on the CPU"
            ),
        }
    }
    Ok((build_session(env, model, intra_threads)?, false))
}

fn tokenizer_err(e: impl std::fmt::Display) -> Error {
    Error::Tokenizer(e.to_string())
}

/// Loads `tokenizer.json` and returns (embedding tokenizer, counting tokenizer).
fn load_tokenizers(path: &Path, max_tokens: usize) -> Result<(Tokenizer, Tokenizer), Error> {
    let mut counter = Tokenizer::from_file(path)
        .map_err(|e| Error::Tokenizer(format!("loading {}: {e}", path.display())))?;
    counter.with_truncation(None).map_err(tokenizer_err)?;
    let padding = counter.get_padding().cloned().unwrap_or_default();
    counter.with_padding(None);

    // The shipped tokenizer.json pads and truncates to 128; sentence-transformers uses 256
    // (longest first) and pads each batch to its longest text.
    let mut tokenizer = counter.clone();
    tokenizer
        .with_truncation(Some(TruncationParams {
            direction: TruncationDirection::Right,
            max_length: max_tokens,
            strategy: TruncationStrategy::LongestFirst,
            stride: 0,
        }))
        .map_err(tokenizer_err)?;
    tokenizer.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        pad_to_multiple_of: None,
        ..padding
    }));
    Ok((tokenizer, counter))
}

impl Embedder {
    /// Loads ONNX Runtime (once per process), the tokenizer and `cfg.sessions` sessions.
    ///
    /// Missing files and unloadable libraries are errors, never panics.
    pub fn load(cfg: &EmbedderConfig) -> Result<Embedder, Error> {
        if cfg.sessions == 0 {
            return Err(Error::Config("sessions must be at least 1".into()));
        }
        if cfg.max_tokens < 2 {
            return Err(Error::Config(
                "max_tokens must leave room for [CLS] and [SEP]".into(),
            ));
        }
        if !cfg.model_path.is_file() {
            return Err(Error::ModelNotFound(cfg.model_path.clone()));
        }
        if !cfg.tokenizer_path.is_file() {
            return Err(Error::TokenizerNotFound(cfg.tokenizer_path.clone()));
        }
        let (tokenizer, counter) = load_tokenizers(&cfg.tokenizer_path, cfg.max_tokens)?;
        let env = environment(&cfg.ort_dylib_path)?;

        let session_err = |source| Error::Session {
            path: cfg.model_path.clone(),
            source,
        };
        let mut sessions = Vec::with_capacity(cfg.sessions);
        // Once a CUDA attempt has failed, the remaining sessions go straight to the CPU.
        let mut cuda = cfg.cuda;
        let mut any_cuda = false;
        for _ in 0..cfg.sessions {
            let (session, on_cuda) =
                build_any_session(&env, &cfg.model_path, cfg.intra_threads, cuda)
                    .map_err(session_err)?;
            cuda &= on_cuda;
            any_cuda |= on_cuda;
            sessions.push(session);
        }
        // `cuda` is still true iff every session is on CUDA. If a later session fell back
        // after earlier ones registered, rebuild the earlier ones on the CPU too, so that
        // the pool is uniform (and `execution_provider` is true of every session).
        let on_cuda = cuda;
        if any_cuda && !on_cuda {
            for session in &mut sessions {
                *session =
                    build_session(&env, &cfg.model_path, cfg.intra_threads).map_err(session_err)?;
            }
        }
        if cfg.cuda {
            tracing::info!(
                execution_provider = if on_cuda { "cuda" } else { "cpu" },
                "embedder sessions created"
            );
        }

        let first = &sessions[0];
        let has_input = |name: &str| first.inputs().iter().any(|i| i.name() == name);
        for name in ["input_ids", "attention_mask"] {
            if !has_input(name) {
                return Err(Error::ModelSignature(format!("no `{name}` input")));
            }
        }
        let token_type_ids = has_input("token_type_ids");
        let dim = first
            .outputs()
            .iter()
            .find(|o| o.name() == OUTPUT)
            .ok_or_else(|| Error::ModelSignature(format!("no `{OUTPUT}` output")))?
            .dtype()
            .tensor_shape()
            .and_then(|shape| shape.last().copied())
            .filter(|&d| d > 0)
            .ok_or_else(|| {
                Error::ModelSignature(format!("`{OUTPUT}` has no fixed last dimension"))
            })? as usize;

        Ok(Embedder {
            tokenizer,
            counter,
            sessions: sessions.into_iter().map(Mutex::new).collect(),
            next: AtomicUsize::new(0),
            dim,
            token_type_ids,
            on_cuda,
        })
    }

    /// The ONNX Runtime execution provider running the encoder: `"cuda"` or `"cpu"`.
    pub fn execution_provider(&self) -> &'static str {
        if self.on_cuda { "cuda" } else { "cpu" }
    }

    /// Length of the vectors [`embed`](Self::embed) returns (384 for all-MiniLM-L6-v2).
    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Embeds `texts` into unit-length vectors, one per text, in order.
    ///
    /// Texts longer than `max_tokens` tokens are truncated (see
    /// [`token_count`](Self::token_count)). Runs in chunks of 32 texts, each spread over
    /// the sessions free when it starts (on the CPU, in parts of at least 4 texts, one
    /// thread each); an empty slice returns an empty vector without running the model.
    pub fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(CHUNK) {
            out.extend(self.embed_spread(chunk)?);
        }
        Ok(out)
    }

    /// One chunk, in as many parts as sessions are free now (at most one per
    /// [`MIN_PART`] texts; one part on CUDA), run at once, the first on this thread.
    fn embed_spread(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, Error> {
        let parts = if self.on_cuda {
            1
        } else {
            self.free_sessions().min(texts.len() / MIN_PART).max(1)
        };
        if parts == 1 {
            return self.embed_chunk(texts, None);
        }
        let mut pieces = texts.chunks(texts.len().div_ceil(parts));
        let first = pieces.next().unwrap_or_default();
        std::thread::scope(|scope| {
            let others: Vec<_> = pieces
                .map(|piece| scope.spawn(move || self.embed_chunk(piece, None)))
                .collect();
            // Every part joined before any error returns (a scope whose thread panicked
            // unjoined would panic itself).
            let first = self.embed_chunk(first, None);
            let others: Vec<_> = others.into_iter().map(|other| other.join()).collect();
            let mut out = first?;
            for other in others {
                let vectors =
                    other.map_err(|_| Error::Inference("a model call panicked".into()))??;
                out.extend(vectors);
            }
            Ok(out)
        })
    }

    /// How many sessions no call holds at this moment.
    fn free_sessions(&self) -> usize {
        self.sessions
            .iter()
            .filter(|s| !matches!(s.try_lock(), Err(TryLockError::WouldBlock)))
            .count()
    }

    /// [`embed`](Self::embed), with the pooling and normalisation run by `compute` (on the GPU
    /// for [`Compute::Cuda`], whichever provider ran the encoder), each chunk on one session.
    /// Same results within float rounding (1e-4).
    pub fn embed_with(&self, texts: &[&str], compute: &Compute) -> Result<Vec<Vec<f32>>, Error> {
        let mut out = Vec::with_capacity(texts.len());
        for chunk in texts.chunks(CHUNK) {
            out.extend(self.embed_chunk(chunk, Some(compute))?);
        }
        Ok(out)
    }

    /// Number of tokens in `text` before truncation, `[CLS]` and `[SEP]` included:
    /// `embed` truncated the text iff this exceeds `max_tokens`.
    pub fn token_count(&self, text: &str) -> Result<usize, Error> {
        Ok(self
            .counter
            .encode_fast(text, true)
            .map_err(tokenizer_err)?
            .len())
    }

    fn embed_chunk(
        &self,
        texts: &[&str],
        compute: Option<&Compute>,
    ) -> Result<Vec<Vec<f32>>, Error> {
        let encodings = self
            .tokenizer
            .encode_batch_fast(texts.to_vec(), true)
            .map_err(tokenizer_err)?;
        let batch = encodings.len();
        let seq = encodings.first().map_or(0, |e| e.len());
        let mut ids = Vec::with_capacity(batch * seq);
        let mut mask = Vec::with_capacity(batch * seq);
        let mut types = Vec::with_capacity(batch * seq);
        for e in &encodings {
            if e.len() != seq {
                return Err(Error::Tokenizer(
                    "batch was not padded to one length".into(),
                ));
            }
            ids.extend(e.get_ids().iter().map(|&x| i64::from(x)));
            mask.extend(e.get_attention_mask().iter().map(|&x| i64::from(x)));
            types.extend(e.get_type_ids().iter().map(|&x| i64::from(x)));
        }
        if batch == 0 || seq == 0 {
            return Ok(vec![vec![0.0; self.dim]; batch]);
        }

        let shape = [batch, seq];
        let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = ort::inputs![
            "input_ids" => TensorRef::from_array_view((shape, ids.as_slice()))?,
            "attention_mask" => TensorRef::from_array_view((shape, mask.as_slice()))?,
        ];
        if self.token_type_ids {
            inputs.push((
                "token_type_ids".into(),
                TensorRef::from_array_view((shape, types.as_slice()))?.into(),
            ));
        }

        let mut session = self.session();
        let outputs = session.run(inputs)?;
        let (out_shape, hidden) = outputs
            .get(OUTPUT)
            .ok_or_else(|| Error::Inference(format!("no `{OUTPUT}` in the outputs")))?
            .try_extract_tensor::<f32>()?;
        let expected = [batch as i64, seq as i64, self.dim as i64];
        if **out_shape != expected {
            return Err(Error::Inference(format!(
                "`{OUTPUT}` has shape {:?}, expected {expected:?}",
                &**out_shape
            )));
        }
        match compute {
            Some(compute) => compute.mean_pool_normalize(hidden, &mask, batch, seq, self.dim),
            None => Ok(mean_pool_normalize(hidden, &mask, batch, seq, self.dim)),
        }
    }

    /// A free session if there is one, else waits for one (round-robin start).
    fn session(&self) -> MutexGuard<'_, Session> {
        let n = self.sessions.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        for i in 0..n {
            match self.sessions[(start + i) % n].try_lock() {
                Ok(guard) => return guard,
                // A panic elsewhere while holding a session leaves the session itself usable.
                Err(TryLockError::Poisoned(p)) => return p.into_inner(),
                Err(TryLockError::WouldBlock) => {}
            }
        }
        self.sessions[start]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedder_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Embedder>();
        check::<Error>();
    }

    #[test]
    fn from_home_uses_the_setup_layout() {
        let cfg = EmbedderConfig::from_home(Path::new("/x/.baton"));
        assert_eq!(
            cfg.model_path,
            Path::new("/x/.baton/models/all-MiniLM-L6-v2/model.onnx")
        );
        assert_eq!(
            cfg.tokenizer_path,
            Path::new("/x/.baton/models/all-MiniLM-L6-v2/tokenizer.json")
        );
        assert_eq!(
            cfg.ort_dylib_path,
            Path::new("/x/.baton/lib/libonnxruntime.so.1.31.1")
        );
        assert_eq!((cfg.max_tokens, cfg.sessions, cfg.cuda), (256, 1, false));
        assert!(cfg.intra_threads >= 1);
    }
}
