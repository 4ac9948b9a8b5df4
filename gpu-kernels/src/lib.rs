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
//!
//! # Numeric kernels, CPU or GPU
//!
//! Every kernel has a CPU twin ([`mean_pool_normalize`], [`cosine_topk_cpu`],
//! [`softmax_rows_cpu`], [`head_forward_cpu`], [`sgd_epoch_cpu`]) and a CUDA version on
//! [`Gpu`]; [`Compute`] dispatches to either, so callers write backend-agnostic code:
//!
//! ```no_run
//! use baton_gpu_kernels::{Compute, LinearHead};
//! # fn main() -> Result<(), baton_gpu_kernels::Error> {
//! let compute = Compute::best(); // the GPU if one is usable, else the CPU (logged)
//! let mut head = LinearHead::new(vec!["neg".into(), "pos".into()], 2);
//! let (xs, ys) = ([1.0, 0.0, 0.0, 1.0], [0, 1]);
//! let loss = compute.sgd_epoch(&mut head, &xs, &ys, &[1, 0], 0.5, 2)?;
//! let logits = compute.head_forward(&head, &xs, 2)?;
//! # let _ = (loss, logits);
//! # Ok(())
//! # }
//! ```
//!
//! CUDA is never linked: cudarc loads the driver (`libcuda.so`, from the NVIDIA driver) and
//! NVRTC (`libnvrtc.so.13`) at run time, and the kernels (`src/kernels.cu`) are compiled by
//! NVRTC for the device's compute capability the first time a [`Gpu`] opens. Without them
//! the crate builds and runs: [`probe`] reports `present: false` with the reason,
//! [`Gpu::new`] returns `Err(Error::NoGpu(..))`, and [`Compute::best`] picks the CPU. NVRTC
//! must be no newer than the driver (NVRTC 13.0.x with driver 580; PyPI's
//! `nvidia-cuda-nvrtc==13.0.88` ships `nvidia/cu13/lib/libnvrtc.so.13`: put that directory on
//! `LD_LIBRARY_PATH`). [`DeviceInfo::admits`] is the GPU-memory-aware admission check.

mod compute;
pub mod device;
mod embedder;
mod error;
mod gpu;
mod head;
mod pooling;

pub use compute::Compute;
pub use device::{DeviceInfo, probe};
pub use embedder::{Embedder, EmbedderConfig, MAX_WORKER_SESSIONS};
pub use error::Error;
pub use gpu::{Gpu, KERNELS_SOURCE, MAX_COSINE_DIM, kernels_ptx, nvrtc_version};
pub use head::{LinearHead, head_forward_cpu, sgd_epoch_cpu, softmax, softmax_rows_cpu};
pub use pooling::{cosine, cosine_topk_cpu, mean_pool_normalize};
