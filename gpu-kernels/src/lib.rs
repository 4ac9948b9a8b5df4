//! Compute kernels for Baton: the sentence embedder (ONNX Runtime + a Hugging Face
//! tokenizer running all-MiniLM-L6-v2, int8) and the small numeric kernels around it.
//!
//! This crate knows nothing of workflows. The model, tokenizer and ONNX Runtime shared
//! library are fetched by `cargo xtask setup` into `<repo>/.baton/`;
//! [`EmbedderConfig::from_home`] knows that layout.
//!
//! ```no_run
//! use baton_gpu_kernels::{Embedder, EmbedderConfig, cosine};
//! # fn main() -> Result<(), baton_gpu_kernels::Error> {
//! let embedder = Embedder::load(&EmbedderConfig::from_home(std::path::Path::new(".baton")))?;
//! let v = embedder.embed(&["a happy dog", "a joyful puppy"])?;
//! assert!(cosine(&v[0], &v[1]) > 0.5);
//! # Ok(())
//! # }
//! ```

mod embedder;
mod error;
mod pooling;

pub use embedder::{Embedder, EmbedderConfig};
pub use error::Error;
pub use pooling::{cosine, mean_pool_normalize};
