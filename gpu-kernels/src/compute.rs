//! [`Compute`]: one backend-agnostic face over the CPU twins and the CUDA kernels, so that
//! callers write the same code whether or not the worker has a GPU.

use std::sync::Arc;

use crate::Error;
use crate::device::probe;
use crate::gpu::Gpu;
use crate::head::{LinearHead, head_forward_cpu, sgd_epoch_cpu, softmax_rows_cpu, validate_sgd};
use crate::pooling::{cosine_topk_cpu, mean_pool_normalize};

/// Where the numeric kernels run.
#[derive(Debug, Clone)]
pub enum Compute {
    /// The CPU twins (always available).
    Cpu,
    /// The CUDA kernels on a GPU.
    Cuda(Arc<Gpu>),
}

impl Compute {
    /// The GPU (device 0) when [`probe`] finds one and its kernels compile and load
    /// ([`Gpu::shared`]), else the CPU; logs which and why at `info`/`warn`. Never panics.
    pub fn best() -> Compute {
        let info = probe();
        if !info.present {
            tracing::info!(
                reason = info.reason.as_deref().unwrap_or("unknown"),
                "no GPU: the numeric kernels run on the CPU"
            );
            return Compute::Cpu;
        }
        match Gpu::shared(0) {
            Ok(gpu) => {
                tracing::info!(
                    device = gpu.name(),
                    memory_free = info.memory_free,
                    memory_total = info.memory_total,
                    "the numeric kernels run on the GPU"
                );
                Compute::Cuda(gpu)
            }
            Err(e) => {
                tracing::warn!(error = %e, "a GPU is present but unusable: the numeric kernels run on the CPU");
                Compute::Cpu
            }
        }
    }

    /// `"cpu"` or `"cuda"`.
    pub fn name(&self) -> &'static str {
        match self {
            Compute::Cpu => "cpu",
            Compute::Cuda(_) => "cuda",
        }
    }

    /// True for [`Compute::Cuda`].
    pub fn is_gpu(&self) -> bool {
        matches!(self, Compute::Cuda(_))
    }

    /// Masked mean pooling + L2 normalisation; see [`mean_pool_normalize`].
    pub fn mean_pool_normalize(
        &self,
        hidden: &[f32],
        mask: &[i64],
        batch: usize,
        seq: usize,
        dim: usize,
    ) -> Result<Vec<Vec<f32>>, Error> {
        match self {
            Compute::Cpu => {
                check_pool(hidden, mask, batch, seq, dim)?;
                Ok(mean_pool_normalize(hidden, mask, batch, seq, dim))
            }
            Compute::Cuda(gpu) => gpu.mean_pool_normalize(hidden, mask, batch, seq, dim),
        }
    }

    /// Batched cosine similarity with top-k; see [`cosine_topk_cpu`].
    pub fn cosine_topk(
        &self,
        queries: &[f32],
        corpus: &[f32],
        dim: usize,
        k: usize,
    ) -> Result<Vec<Vec<(usize, f32)>>, Error> {
        match self {
            Compute::Cpu => {
                check_topk(queries, corpus, dim)?;
                Ok(cosine_topk_cpu(queries, corpus, dim, k))
            }
            Compute::Cuda(gpu) => gpu.cosine_topk(queries, corpus, dim, k),
        }
    }

    /// Row-wise softmax; see [`softmax_rows_cpu`](crate::softmax_rows_cpu).
    pub fn softmax_rows(&self, x: &[f32], rows: usize, cols: usize) -> Result<Vec<f32>, Error> {
        match self {
            Compute::Cpu => {
                check_rows(x, rows, cols)?;
                Ok(softmax_rows_cpu(x, rows, cols))
            }
            Compute::Cuda(gpu) => gpu.softmax_rows(x, rows, cols),
        }
    }

    /// A linear head's logits (`n × classes`); see [`head_forward_cpu`](crate::head_forward_cpu).
    pub fn head_forward(&self, head: &LinearHead, xs: &[f32], n: usize) -> Result<Vec<f32>, Error> {
        match self {
            Compute::Cpu => {
                check_head(head, xs, n)?;
                Ok(head_forward_cpu(head, xs, n))
            }
            Compute::Cuda(gpu) => gpu.head_forward(head, xs, n),
        }
    }

    /// One epoch of mini-batch SGD; see [`sgd_epoch_cpu`](crate::sgd_epoch_cpu). On `Err` the
    /// head is unchanged.
    pub fn sgd_epoch(
        &self,
        head: &mut LinearHead,
        xs: &[f32],
        ys: &[usize],
        order: &[usize],
        lr: f32,
        batch: usize,
    ) -> Result<f32, Error> {
        match self {
            Compute::Cpu => {
                validate_sgd(head, xs, ys, order, batch).map_err(Error::Shape)?;
                Ok(sgd_epoch_cpu(head, xs, ys, order, lr, batch))
            }
            Compute::Cuda(gpu) => gpu.sgd_epoch(head, xs, ys, order, lr, batch),
        }
    }
}

// Argument checks shared by `Compute::Cpu` and `Gpu`: a bad call is an `Err(Error::Shape)`
// on both backends (the CPU twins themselves panic, like `mean_pool_normalize` always has).

pub(crate) fn check_pool(
    hidden: &[f32],
    mask: &[i64],
    batch: usize,
    seq: usize,
    dim: usize,
) -> Result<(), Error> {
    if Some(hidden.len()) != batch.checked_mul(seq).and_then(|v| v.checked_mul(dim)) {
        return Err(Error::Shape(format!(
            "hidden has {} values, expected batch × seq × dim = {batch} × {seq} × {dim}",
            hidden.len()
        )));
    }
    if mask.len() != batch * seq {
        return Err(Error::Shape(format!(
            "mask has {} values, expected batch × seq = {batch} × {seq}",
            mask.len()
        )));
    }
    Ok(())
}

pub(crate) fn check_topk(queries: &[f32], corpus: &[f32], dim: usize) -> Result<(), Error> {
    if dim == 0 {
        return Err(Error::Shape("dim must be at least 1".into()));
    }
    for (what, v) in [("queries", queries), ("corpus", corpus)] {
        if v.len() % dim != 0 {
            return Err(Error::Shape(format!(
                "{what} has {} values, not a multiple of dim = {dim}",
                v.len()
            )));
        }
    }
    Ok(())
}

pub(crate) fn check_rows(x: &[f32], rows: usize, cols: usize) -> Result<(), Error> {
    if Some(x.len()) != rows.checked_mul(cols) {
        return Err(Error::Shape(format!(
            "x has {} values, expected rows × cols = {rows} × {cols}",
            x.len()
        )));
    }
    Ok(())
}

pub(crate) fn check_head(head: &LinearHead, xs: &[f32], n: usize) -> Result<(), Error> {
    let classes = head.classes();
    if head.weights.len() != classes * head.dim || head.bias.len() != classes {
        return Err(Error::Shape(format!(
            "the head's parameters are not classes × dim ({classes} × {}) and classes",
            head.dim
        )));
    }
    if Some(xs.len()) != n.checked_mul(head.dim) {
        return Err(Error::Shape(format!(
            "xs has {} values, expected n × dim = {n} × {}",
            xs.len(),
            head.dim
        )));
    }
    Ok(())
}
