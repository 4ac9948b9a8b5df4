//! The crate's error type.

use std::path::PathBuf;

/// Everything that can go wrong loading or running the [`Embedder`](crate::Embedder) or
/// the compute kernels ([`Gpu`](crate::Gpu), [`Compute`](crate::Compute)).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The ONNX Runtime shared library is not at the configured path.
    #[error("onnx runtime library not found at {0} (run `cargo xtask setup`)")]
    OrtLibraryNotFound(PathBuf),
    /// The ONNX Runtime shared library exists but could not be loaded (wrong file, wrong version).
    #[error("could not load the onnx runtime library at {path}: {message}")]
    OrtLibraryLoad {
        /// The library path that failed.
        path: PathBuf,
        /// What `ort` reported.
        message: String,
    },
    /// The ONNX model file is not at the configured path.
    #[error("model file not found at {0} (run `cargo xtask setup`)")]
    ModelNotFound(PathBuf),
    /// The tokenizer file is not at the configured path.
    #[error("tokenizer file not found at {0} (run `cargo xtask setup`)")]
    TokenizerNotFound(PathBuf),
    /// The tokenizer could not be loaded or configured, or failed to encode a text.
    #[error("tokenizer error: {0}")]
    Tokenizer(String),
    /// The configuration is unusable (zero sessions, zero max tokens...).
    #[error("invalid embedder configuration: {0}")]
    Config(String),
    /// Creating an ONNX Runtime session from the model failed.
    #[error("could not create an inference session from {path}: {source}")]
    Session {
        /// The model path.
        path: PathBuf,
        /// The underlying ONNX Runtime error.
        #[source]
        source: ort::Error,
    },
    /// The model does not have the inputs or outputs the embedder needs.
    #[error("unexpected model signature: {0}")]
    ModelSignature(String),
    /// Running the model failed, or its output had an unexpected shape.
    #[error("inference error: {0}")]
    Inference(String),
    /// No usable CUDA GPU: no driver library, no device, no NVRTC, or the driver failed to
    /// open it. The reason says which; the CPU twins remain available.
    #[error("no usable GPU: {0}")]
    NoGpu(String),
    /// NVRTC could not compile the CUDA kernels (the message carries NVRTC's log).
    #[error("could not compile the CUDA kernels: {0}")]
    KernelCompile(String),
    /// A CUDA driver call (allocation, copy, launch, module load) failed.
    #[error("CUDA error: {0}")]
    Gpu(String),
    /// The arguments of a kernel call do not fit together (lengths, dimensions, indices).
    #[error("invalid kernel arguments: {0}")]
    Shape(String),
}

impl From<ort::Error> for Error {
    fn from(e: ort::Error) -> Self {
        Error::Inference(e.to_string())
    }
}
