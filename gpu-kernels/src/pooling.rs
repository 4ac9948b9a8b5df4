//! Pure numeric kernels: masked mean pooling with L2 normalisation, cosine similarity and
//! batched cosine top-k.
//!
//! [`mean_pool_normalize`] and [`cosine_topk_cpu`] are the CPU twins of CUDA kernels
//! ([`Gpu`](crate::Gpu)): both must agree.

/// Masked mean pooling over the sequence axis, then L2 normalisation of each row.
///
/// `hidden` is a row-major `[batch, seq, dim]` tensor, `mask` a row-major `[batch, seq]`
/// attention mask (non-zero = real token). Each output row is the mean of the `hidden`
/// vectors whose mask is non-zero, scaled to unit length; this is what
/// sentence-transformers does for all-MiniLM-L6-v2. A row with no unmasked token, or whose
/// mean is the zero vector, comes out as all zeros.
///
/// # Panics
/// If `hidden.len() != batch * seq * dim` or `mask.len() != batch * seq`.
pub fn mean_pool_normalize(
    hidden: &[f32],
    mask: &[i64],
    batch: usize,
    seq: usize,
    dim: usize,
) -> Vec<Vec<f32>> {
    assert_eq!(
        hidden.len(),
        batch * seq * dim,
        "hidden is not [batch, seq, dim]"
    );
    assert_eq!(mask.len(), batch * seq, "mask is not [batch, seq]");
    (0..batch)
        .map(|b| {
            let mut acc = vec![0.0f32; dim];
            let mut count = 0usize;
            for s in 0..seq {
                if mask[b * seq + s] == 0 {
                    continue;
                }
                count += 1;
                let row = &hidden[(b * seq + s) * dim..][..dim];
                for (a, h) in acc.iter_mut().zip(row) {
                    *a += h;
                }
            }
            if count > 0 {
                let inv = 1.0 / count as f32;
                acc.iter_mut().for_each(|a| *a *= inv);
            }
            let norm = acc.iter().map(|a| a * a).sum::<f32>().sqrt();
            if norm > 0.0 {
                acc.iter_mut().for_each(|a| *a /= norm);
            }
            acc
        })
        .collect()
}

/// Cosine similarity of two vectors; 0.0 when either has zero length (norm).
///
/// For the unit vectors [`Embedder::embed`](crate::Embedder::embed) returns this is the
/// dot product.
///
/// # Panics
/// If the slices differ in length.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "cosine of vectors of different lengths");
    let (mut dot, mut na, mut nb) = (0.0f32, 0.0f32, 0.0f32);
    for (x, y) in a.iter().zip(b) {
        dot += x * y;
        na += x * x;
        nb += y * y;
    }
    if na == 0.0 || nb == 0.0 {
        0.0
    } else {
        dot / (na.sqrt() * nb.sqrt())
    }
}

/// The ranking key of a similarity: NaN ranks below every number.
fn rank_key(s: f32) -> f32 {
    if s.is_nan() { f32::NEG_INFINITY } else { s }
}

/// Batched cosine similarity with top-k: for each query row, the `k` corpus rows most similar
/// to it as `(corpus index, cosine)`, most similar first; ties (equal cosines, `-0.0 == 0.0`)
/// go to the lower index, and a NaN cosine ranks below every number. `k` is clamped to the
/// corpus size. The cosine is [`cosine`]'s (0 against a zero vector).
///
/// `queries` is `q × dim` and `corpus` `n × dim`, row-major.
///
/// # Panics
/// If `dim == 0` or either slice's length is not a multiple of `dim`.
pub fn cosine_topk_cpu(
    queries: &[f32],
    corpus: &[f32],
    dim: usize,
    k: usize,
) -> Vec<Vec<(usize, f32)>> {
    assert!(dim > 0, "dim must be at least 1");
    assert_eq!(queries.len() % dim, 0, "queries is not q × dim");
    assert_eq!(corpus.len() % dim, 0, "corpus is not n × dim");
    let n = corpus.len() / dim;
    let k = k.min(n);
    let order = |a: &(usize, f32), b: &(usize, f32)| {
        rank_key(b.1)
            .partial_cmp(&rank_key(a.1))
            .unwrap_or(std::cmp::Ordering::Equal)
            .then(a.0.cmp(&b.0))
    };
    queries
        .chunks_exact(dim)
        .map(|q| {
            if k == 0 {
                return Vec::new();
            }
            let mut sims: Vec<(usize, f32)> = corpus
                .chunks_exact(dim)
                .map(|c| cosine(q, c))
                .enumerate()
                .collect();
            if k < n {
                sims.select_nth_unstable_by(k - 1, order);
                sims.truncate(k);
            }
            sims.sort_unstable_by(order);
            sims
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: &[f32], b: &[f32]) -> bool {
        a.len() == b.len() && a.iter().zip(b).all(|(x, y)| (x - y).abs() < 1e-6)
    }

    #[test]
    fn pools_only_unmasked_tokens_and_normalises() {
        // batch 1, seq 3, dim 2; the third token is padding and must be ignored.
        let hidden = [1.0, 2.0, 3.0, 2.0, 100.0, -100.0];
        let mask = [1, 1, 0];
        let out = mean_pool_normalize(&hidden, &mask, 1, 3, 2);
        // mean = (2, 2) -> normalised (1/sqrt2, 1/sqrt2)
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert_eq!(out.len(), 1);
        assert!(close(&out[0], &[h, h]), "{out:?}");
    }

    #[test]
    fn pools_each_row_of_a_batch_independently() {
        // batch 2, seq 2, dim 3.
        let hidden = [
            3.0, 0.0, 4.0, /* */ 9.0, 9.0, 9.0, // row 0: second token masked
            0.0, 1.0, 0.0, /* */ 0.0, 3.0, 0.0, // row 1: mean (0, 2, 0)
        ];
        let mask = [1, 0, 1, 1];
        let out = mean_pool_normalize(&hidden, &mask, 2, 2, 3);
        assert!(close(&out[0], &[0.6, 0.0, 0.8]), "{out:?}");
        assert!(close(&out[1], &[0.0, 1.0, 0.0]), "{out:?}");
    }

    #[test]
    fn fully_masked_or_zero_rows_give_zero_vectors() {
        let hidden = [1.0, 1.0, 0.0, 0.0];
        let out = mean_pool_normalize(&hidden, &[0, 0], 2, 1, 2);
        assert_eq!(out, vec![vec![0.0, 0.0], vec![0.0, 0.0]]);
        let out = mean_pool_normalize(&hidden, &[1, 1], 2, 1, 2);
        let h = std::f32::consts::FRAC_1_SQRT_2;
        assert!(close(&out[0], &[h, h]));
        assert_eq!(out[1], vec![0.0, 0.0]);
    }

    #[test]
    fn empty_batch_gives_empty_output() {
        assert!(mean_pool_normalize(&[], &[], 0, 5, 384).is_empty());
    }

    #[test]
    #[should_panic(expected = "hidden is not")]
    fn rejects_mismatched_shapes() {
        mean_pool_normalize(&[0.0; 5], &[1, 1], 1, 2, 3);
    }

    #[test]
    fn cosine_basics() {
        assert!((cosine(&[1.0, 0.0], &[1.0, 0.0]) - 1.0).abs() < 1e-6);
        assert!(cosine(&[1.0, 0.0], &[0.0, 2.0]).abs() < 1e-6);
        assert!((cosine(&[1.0, 1.0], &[-2.0, -2.0]) + 1.0).abs() < 1e-6);
        assert!((cosine(&[3.0, 4.0], &[4.0, 3.0]) - 0.96).abs() < 1e-6);
        assert_eq!(cosine(&[0.0, 0.0], &[1.0, 2.0]), 0.0);
    }
}
