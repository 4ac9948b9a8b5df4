//! A linear classification head over embeddings (`logits = W x + b`), its softmax, and one
//! epoch of mini-batch SGD with softmax cross-entropy: the CPU reference that the CUDA
//! `head_forward` / `sgd_epoch` kernels must agree with.

use serde::{Deserialize, Serialize};

/// A linear classification head over embeddings: logits = W x + b.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LinearHead {
    /// One label per class; `labels.len()` is the number of classes.
    pub labels: Vec<String>,
    /// The input (embedding) dimension.
    pub dim: usize,
    /// `classes × dim`, row-major: row `c` is class `c`'s weight vector.
    pub weights: Vec<f32>,
    /// One bias per class.
    pub bias: Vec<f32>,
}

impl LinearHead {
    /// A head with all weights and biases zero (every class equally likely).
    pub fn new(labels: Vec<String>, dim: usize) -> LinearHead {
        let classes = labels.len();
        LinearHead {
            labels,
            dim,
            weights: vec![0.0; classes * dim],
            bias: vec![0.0; classes],
        }
    }

    /// The number of classes.
    pub fn classes(&self) -> usize {
        self.labels.len()
    }

    /// `W x + b` for one input `x` of length `dim`.
    ///
    /// # Panics
    /// If `x.len() != self.dim`.
    pub fn logits(&self, x: &[f32]) -> Vec<f32> {
        assert_eq!(x.len(), self.dim, "input is not of the head's dimension");
        (0..self.classes())
            .map(|c| {
                let row = &self.weights[c * self.dim..][..self.dim];
                self.bias[c] + row.iter().zip(x).map(|(w, v)| w * v).sum::<f32>()
            })
            .collect()
    }

    /// The softmax of [`logits`](Self::logits): one probability per class, summing to 1.
    pub fn predict_proba(&self, x: &[f32]) -> Vec<f32> {
        softmax(&self.logits(x))
    }

    /// The most probable class index and its probability (the first one on ties).
    ///
    /// # Panics
    /// If the head has no classes, or `x.len() != self.dim`.
    pub fn predict(&self, x: &[f32]) -> (usize, f32) {
        let p = self.predict_proba(x);
        assert!(!p.is_empty(), "a head with no classes cannot predict");
        let mut best = 0;
        for (i, v) in p.iter().enumerate() {
            if *v > p[best] {
                best = i;
            }
        }
        (best, p[best])
    }
}

/// Numerically stable softmax (the maximum is subtracted before exponentiating).
/// An empty input gives an empty output.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.into_iter().map(|e| e / sum).collect()
}

/// [`softmax`] of each row of `x` (`rows × cols`, row-major), row-major.
///
/// # Panics
/// If `x.len() != rows * cols`.
pub fn softmax_rows_cpu(x: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    assert_eq!(x.len(), rows * cols, "x is not rows × cols");
    if cols == 0 {
        return Vec::new();
    }
    x.chunks_exact(cols).flat_map(softmax).collect()
}

/// The head's logits for `n` inputs `xs` (`n × dim`, row-major): `n × classes`, row-major.
///
/// # Panics
/// If `xs.len() != n * head.dim`.
pub fn head_forward_cpu(head: &LinearHead, xs: &[f32], n: usize) -> Vec<f32> {
    assert_eq!(xs.len(), n * head.dim, "xs is not n × dim");
    if head.dim == 0 {
        return head.bias.repeat(n);
    }
    xs.chunks_exact(head.dim)
        .flat_map(|x| head.logits(x))
        .collect()
}

/// Checks the arguments shared by the CPU and CUDA SGD epochs; the message says what is wrong.
pub(crate) fn validate_sgd(
    head: &LinearHead,
    xs: &[f32],
    ys: &[usize],
    order: &[usize],
    batch: usize,
) -> Result<(), String> {
    let n = ys.len();
    let classes = head.classes();
    if classes == 0 {
        return Err("a head with no classes cannot be trained".into());
    }
    if head.weights.len() != classes * head.dim || head.bias.len() != classes {
        return Err(format!(
            "the head's parameters are not classes × dim ({} × {}) and classes: {} weights, {} biases",
            classes,
            head.dim,
            head.weights.len(),
            head.bias.len()
        ));
    }
    if xs.len() != n * head.dim {
        return Err(format!(
            "xs has {} values, expected n × dim = {n} × {}",
            xs.len(),
            head.dim
        ));
    }
    if batch == 0 {
        return Err("batch must be at least 1".into());
    }
    if let Some(y) = ys.iter().find(|&&y| y >= classes) {
        return Err(format!("class index {y} out of range (classes: {classes})"));
    }
    if order.len() != n {
        return Err(format!(
            "order has {} entries, expected n = {n}",
            order.len()
        ));
    }
    let mut seen = vec![false; n];
    for &i in order {
        if i >= n || std::mem::replace(&mut seen[i], true) {
            return Err(format!("order is not a permutation of 0..{n} (at {i})"));
        }
    }
    Ok(())
}

/// One epoch of mini-batch SGD with softmax cross-entropy over `xs` (n × dim, row-major) and
/// class indices `ys`, in the given sample `order` (a permutation of 0..n the caller draws,
/// so training is deterministic and resumable); returns the mean loss of the epoch.
///
/// The samples are taken in `order`, `batch` at a time (the last batch may be smaller). For
/// each mini-batch the gradient of the *mean* cross-entropy over the batch is computed at the
/// current parameters, then `W -= lr * dW`, `b -= lr * db`. The returned loss is the mean over
/// all n samples of each sample's loss as evaluated before its batch's update (0.0 when n = 0).
///
/// # Panics
/// If the shapes disagree (`xs.len() != n * dim`, the head's parameters), `order` is not a
/// permutation of `0..n`, `batch == 0`, the head has no classes, or a class index is out of
/// range.
pub fn sgd_epoch_cpu(
    head: &mut LinearHead,
    xs: &[f32],
    ys: &[usize],
    order: &[usize],
    lr: f32,
    batch: usize,
) -> f32 {
    if let Err(e) = validate_sgd(head, xs, ys, order, batch) {
        panic!("sgd_epoch_cpu: {e}");
    }
    let n = ys.len();
    if n == 0 {
        return 0.0;
    }
    let (classes, dim) = (head.classes(), head.dim);
    let mut grad_w = vec![0.0f32; classes * dim];
    let mut grad_b = vec![0.0f32; classes];
    let mut total_loss = 0.0f64;
    for chunk in order.chunks(batch) {
        grad_w.iter_mut().for_each(|g| *g = 0.0);
        grad_b.iter_mut().for_each(|g| *g = 0.0);
        let inv = 1.0 / chunk.len() as f32;
        for &i in chunk {
            let x = &xs[i * dim..][..dim];
            let p = head.predict_proba(x);
            let y = ys[i];
            total_loss += f64::from(-p[y].max(f32::MIN_POSITIVE).ln());
            for c in 0..classes {
                // d(loss)/d(logit_c) = p_c - [c == y], averaged over the batch.
                let d = (p[c] - if c == y { 1.0 } else { 0.0 }) * inv;
                grad_b[c] += d;
                for (g, v) in grad_w[c * dim..][..dim].iter_mut().zip(x) {
                    *g += d * v;
                }
            }
        }
        for (w, g) in head.weights.iter_mut().zip(&grad_w) {
            *w -= lr * g;
        }
        for (b, g) in head.bias.iter_mut().zip(&grad_b) {
            *b -= lr * g;
        }
    }
    (total_loss / n as f64) as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Softmax cross-entropy of one sample.
    fn sample_loss(head: &LinearHead, x: &[f32], y: usize) -> f32 {
        -head.predict_proba(x)[y].max(f32::MIN_POSITIVE).ln()
    }

    fn labels(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("c{i}")).collect()
    }

    #[test]
    fn new_head_is_zero_and_uniform() {
        let h = LinearHead::new(labels(4), 3);
        assert_eq!(h.classes(), 4);
        assert_eq!(h.weights, vec![0.0; 12]);
        assert_eq!(h.bias, vec![0.0; 4]);
        let p = h.predict_proba(&[1.0, 2.0, 3.0]);
        assert!(p.iter().all(|v| (v - 0.25).abs() < 1e-7));
        assert_eq!(h.predict(&[1.0, 2.0, 3.0]), (0, 0.25));
    }

    #[test]
    fn logits_are_wx_plus_b() {
        let mut h = LinearHead::new(labels(2), 2);
        h.weights = vec![1.0, 2.0, -1.0, 0.5];
        h.bias = vec![0.5, -0.25];
        assert_eq!(h.logits(&[3.0, 4.0]), vec![11.5, -1.25]);
        assert_eq!(h.predict(&[3.0, 4.0]).0, 0);
    }

    #[test]
    fn softmax_sums_to_one_and_is_stable() {
        let p = softmax(&[1.0, 2.0, 3.0]);
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        // Hand-computed: e^-2, e^-1, 1 over their sum.
        let s = (-2.0f32).exp() + (-1.0f32).exp() + 1.0;
        assert!((p[2] - 1.0 / s).abs() < 1e-6);
        let big = softmax(&[1000.0, 1001.0, 1002.0]);
        assert!(big.iter().all(|v| v.is_finite()));
        for (a, b) in big.iter().zip(&p) {
            assert!((a - b).abs() < 1e-6, "{big:?} vs {p:?}");
        }
        let neg = softmax(&[-1e30, 0.0]);
        assert_eq!(neg, vec![0.0, 1.0]);
        assert!(softmax(&[]).is_empty());
    }

    #[test]
    fn gradients_match_finite_differences() {
        // One full-batch step with lr = 1 moves each parameter by exactly minus its gradient
        // of the mean loss; compare with central differences of that mean loss (in f64 on
        // the sum of f32 losses, step 1e-2 on smooth quantities).
        let mut head = LinearHead::new(labels(3), 2);
        head.weights = vec![0.1, -0.2, 0.3, 0.05, -0.4, 0.2];
        head.bias = vec![0.01, -0.02, 0.03];
        let xs = [0.5, -1.0, 1.5, 0.25, -0.75, 0.8];
        let ys = [0, 2, 1];
        let mean_loss = |h: &LinearHead| -> f64 {
            (0..3)
                .map(|i| f64::from(sample_loss(h, &xs[i * 2..][..2], ys[i])))
                .sum::<f64>()
                / 3.0
        };
        let mut stepped = head.clone();
        let loss = sgd_epoch_cpu(&mut stepped, &xs, &ys, &[0, 1, 2], 1.0, 3);
        assert!((f64::from(loss) - mean_loss(&head)).abs() < 1e-6);
        let eps = 1e-2f32;
        for k in 0..head.weights.len() + head.bias.len() {
            let (mut plus, mut minus) = (head.clone(), head.clone());
            if k < 6 {
                plus.weights[k] += eps;
                minus.weights[k] -= eps;
            } else {
                plus.bias[k - 6] += eps;
                minus.bias[k - 6] -= eps;
            }
            let numeric = (mean_loss(&plus) - mean_loss(&minus)) / (2.0 * f64::from(eps));
            let analytic = if k < 6 {
                head.weights[k] - stepped.weights[k]
            } else {
                head.bias[k - 6] - stepped.bias[k - 6]
            };
            assert!(
                (f64::from(analytic) - numeric).abs() < 1e-3,
                "param {k}: analytic {analytic} numeric {numeric}"
            );
        }
    }

    #[test]
    fn learns_a_linearly_separable_toy_set() {
        // Four classes, one per quadrant, with a margin from the axes.
        let mut xs = Vec::new();
        let mut ys = Vec::new();
        let mut seed = 12345u32;
        let mut rnd = || {
            seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            (seed >> 8) as f32 / (1u32 << 24) as f32
        };
        for i in 0..80 {
            let c = i % 4;
            let (sx, sy) = [(1.0, 1.0), (-1.0, 1.0), (-1.0, -1.0), (1.0, -1.0)][c];
            xs.push(sx * (0.2 + rnd()));
            xs.push(sy * (0.2 + rnd()));
            ys.push(c);
        }
        let mut head = LinearHead::new(labels(4), 2);
        let mut order: Vec<usize> = (0..80).collect();
        let mut first = None;
        let mut last = 0.0;
        for epoch in 0..200 {
            order.rotate_left(7 * (epoch % 3) + 1);
            last = sgd_epoch_cpu(&mut head, &xs, &ys, &order, 0.5, 8);
            first.get_or_insert(last);
        }
        assert!(last < first.unwrap() / 4.0, "loss {first:?} -> {last}");
        let correct = (0..80)
            .filter(|&i| head.predict(&xs[i * 2..][..2]).0 == ys[i])
            .count();
        assert_eq!(correct, 80, "accuracy {correct}/80");
    }

    #[test]
    fn epoch_is_deterministic_and_serde_round_trips() {
        let xs = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0];
        let ys = [0, 1, 0];
        let mut a = LinearHead::new(labels(2), 2);
        let mut b = a.clone();
        let la = sgd_epoch_cpu(&mut a, &xs, &ys, &[2, 0, 1], 0.1, 2);
        let lb = sgd_epoch_cpu(&mut b, &xs, &ys, &[2, 0, 1], 0.1, 2);
        assert_eq!((la, &a), (lb, &b));
        assert!((la - std::f32::consts::LN_2).abs() < 0.05);
        let json = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<LinearHead>(&json).unwrap(), a);
        let mut empty = LinearHead::new(labels(2), 2);
        assert_eq!(sgd_epoch_cpu(&mut empty, &[], &[], &[], 0.1, 4), 0.0);
    }
}
