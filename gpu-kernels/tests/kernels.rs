//! The numeric kernels: CPU twins against hand-computed cases (always), and the CUDA kernels
//! against their CPU twins where a GPU is present (otherwise those tests print
//! `skipped: no GPU (<reason>)` and pass).
//!
//! Stated tolerances (absolute): 1e-4 for pooling, softmax, cosine top-k and head logits;
//! 1e-3 for the SGD-updated weights after one epoch.

use std::sync::Arc;

use baton_gpu_kernels::{
    Compute, Error, Gpu, LinearHead, cosine, cosine_topk_cpu, head_forward_cpu, kernels_ptx,
    mean_pool_normalize, nvrtc_version, probe, sgd_epoch_cpu, softmax, softmax_rows_cpu,
};

const TOL: f32 = 1e-4;
const SGD_TOL: f32 = 1e-3;

/// A small deterministic generator (no rand dependency): uniform in [-1, 1).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f32 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.next()).collect()
    }
    fn below(&mut self, n: usize) -> usize {
        (((self.next() + 1.0) / 2.0) * n as f32) as usize % n
    }
}

fn labels(n: usize) -> Vec<String> {
    (0..n).map(|i| format!("class-{i}")).collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

fn assert_close(what: &str, a: &[f32], b: &[f32], tol: f32) {
    let d = max_abs_diff(a, b);
    assert!(d <= tol, "{what}: max abs diff {d:e} > {tol:e}");
    eprintln!("{what}: max abs diff {d:.2e} (tolerance {tol:e})");
}

/// The GPU, or `None` after printing why the calling test is skipped.
fn gpu() -> Option<Arc<Gpu>> {
    let info = probe();
    if !info.present {
        println!(
            "skipped: no GPU ({})",
            info.reason.as_deref().unwrap_or("unknown")
        );
        return None;
    }
    match Gpu::shared(0) {
        Ok(gpu) => Some(gpu),
        // A GPU is present, so its kernels must load: that is what these tests check.
        Err(e) => panic!(
            "a GPU is present ({:?}) but the kernels did not load: {e}",
            info.name
        ),
    }
}

// ---------------------------------------------------------------- CPU twins, hand-computed

#[test]
fn cosine_topk_orders_by_similarity_then_index() {
    let h = std::f32::consts::FRAC_1_SQRT_2;
    // corpus rows: e1, e2, (1,1), -e1, 2*e1
    let corpus = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.0, 2.0, 0.0];
    let queries = [1.0, 0.0, 0.0, 3.0];
    let top = cosine_topk_cpu(&queries, &corpus, 2, 3);
    assert_eq!(top.len(), 2);
    // Query e1: cosines 1, 0, h, -1, 1 -> rows 0 and 4 tie at 1 (lower index first), then 2.
    let idx: Vec<usize> = top[0].iter().map(|p| p.0).collect();
    assert_eq!(idx, vec![0, 4, 2]);
    assert!((top[0][0].1 - 1.0).abs() < 1e-6 && (top[0][2].1 - h).abs() < 1e-6);
    // Query 3*e2: cosines 0, 1, h, 0, 0 -> 1, 2, then the lowest-index zero (row 0).
    let idx: Vec<usize> = top[1].iter().map(|p| p.0).collect();
    assert_eq!(idx, vec![1, 2, 0]);
    // k larger than the corpus is clamped: every row, fully ordered.
    let all = cosine_topk_cpu(&queries[..2], &corpus, 2, 99);
    let idx: Vec<usize> = all[0].iter().map(|p| p.0).collect();
    assert_eq!(idx, vec![0, 4, 2, 1, 3]);
    assert!((all[0][4].1 + 1.0).abs() < 1e-6);
    // k = 0, and no queries.
    assert_eq!(
        cosine_topk_cpu(&queries, &corpus, 2, 0),
        vec![vec![], vec![]]
    );
    assert!(cosine_topk_cpu(&[], &corpus, 2, 3).is_empty());
    // Every value is `cosine`'s.
    for (i, s) in &all[0] {
        assert_eq!(*s, cosine(&queries[..2], &corpus[i * 2..i * 2 + 2]));
    }
}

#[test]
fn cosine_topk_zero_vectors_and_nan() {
    // A zero query has cosine 0 with everything: ties all the way, so index order.
    let corpus = [1.0, 0.0, 0.0, 1.0, -1.0, -1.0];
    let top = cosine_topk_cpu(&[0.0, 0.0], &corpus, 2, 3);
    assert_eq!(top, vec![vec![(0, 0.0), (1, 0.0), (2, 0.0)]]);
    // A NaN similarity ranks below every number, even -1.
    let corpus = [f32::NAN, 0.0, -1.0, 0.0, 1.0, 0.0];
    let top = cosine_topk_cpu(&[1.0, 0.0], &corpus, 2, 3);
    let idx: Vec<usize> = top[0].iter().map(|p| p.0).collect();
    assert_eq!(idx, vec![2, 1, 0]);
    assert!(top[0][2].1.is_nan());
}

#[test]
fn softmax_rows_hand_computed() {
    let x = [
        0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 1000.0, 1000.0, 1000.0, -5.0, 0.0, 5.0,
    ];
    let y = softmax_rows_cpu(&x, 4, 3);
    let third = 1.0 / 3.0;
    let s = 1.0 + 1f32.exp() + 2f32.exp();
    let expected_row1 = [1.0 / s, 1f32.exp() / s, 2f32.exp() / s];
    assert_close("uniform row", &y[0..3], &[third; 3], 1e-6);
    assert_close("0,1,2 row", &y[3..6], &expected_row1, 1e-6);
    assert_close("large logits", &y[6..9], &[third; 3], 1e-6);
    for row in y.chunks(3) {
        assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
    }
    assert_eq!(&y[9..12], softmax(&x[9..12]).as_slice());
    assert!(softmax_rows_cpu(&[], 0, 7).is_empty());
    assert!(softmax_rows_cpu(&[], 3, 0).is_empty());
}

#[test]
fn head_forward_hand_computed() {
    let mut head = LinearHead::new(labels(3), 2);
    head.weights = vec![1.0, 0.0, 0.0, 1.0, 1.0, -1.0];
    head.bias = vec![0.0, 0.5, -0.5];
    let xs = [2.0, 3.0, -1.0, 1.0];
    let logits = head_forward_cpu(&head, &xs, 2);
    assert_eq!(logits, vec![2.0, 3.5, -1.5, -1.0, 1.5, -2.5]);
    assert!(head_forward_cpu(&head, &[], 0).is_empty());
    assert_eq!(head.predict(&xs[..2]).0, 1);
}

#[test]
fn compute_cpu_matches_the_twins_and_rejects_bad_shapes() {
    let cpu = Compute::Cpu;
    assert_eq!(cpu.name(), "cpu");
    assert!(!cpu.is_gpu());
    let mut r = Lcg(7);
    let (b, s, d) = (3, 5, 8);
    let hidden = r.vec(b * s * d);
    let mask: Vec<i64> = (0..b * s).map(|i| i64::from(i % 4 != 3)).collect();
    assert_eq!(
        cpu.mean_pool_normalize(&hidden, &mask, b, s, d).unwrap(),
        mean_pool_normalize(&hidden, &mask, b, s, d)
    );
    let (q, n) = (4, 20);
    let queries = r.vec(q * d);
    let corpus = r.vec(n * d);
    assert_eq!(
        cpu.cosine_topk(&queries, &corpus, d, 5).unwrap(),
        cosine_topk_cpu(&queries, &corpus, d, 5)
    );
    let x = r.vec(6 * 4);
    assert_eq!(
        cpu.softmax_rows(&x, 6, 4).unwrap(),
        softmax_rows_cpu(&x, 6, 4)
    );

    // Bad shapes are errors, not panics.
    let shape = |r: Result<_, Error>| matches!(r, Err(Error::Shape(_)));
    assert!(shape(
        cpu.mean_pool_normalize(&hidden, &mask, b, s, d + 1)
            .map(|_| ())
    ));
    assert!(shape(
        cpu.mean_pool_normalize(&hidden, &mask[1..], b, s, d)
            .map(|_| ())
    ));
    assert!(shape(cpu.cosine_topk(&queries, &corpus, 0, 5).map(|_| ())));
    assert!(shape(
        cpu.cosine_topk(&queries[1..], &corpus, d, 5).map(|_| ())
    ));
    assert!(shape(cpu.softmax_rows(&x, 5, 4).map(|_| ())));
    let mut head = LinearHead::new(labels(2), d);
    assert!(shape(cpu.head_forward(&head, &queries, q + 1).map(|_| ())));
    let xs = r.vec(4 * d);
    let before = head.clone();
    for (ys, order, batch) in [
        (vec![0, 1, 2, 0], vec![0, 1, 2, 3], 2), // class 2 out of range
        (vec![0, 1, 1, 0], vec![0, 1, 1, 3], 2), // not a permutation
        (vec![0, 1, 1, 0], vec![0, 1, 2], 2),    // order too short
        (vec![0, 1, 1, 0], vec![0, 1, 2, 3], 0), // batch 0
    ] {
        assert!(shape(
            cpu.sgd_epoch(&mut head, &xs, &ys, &order, 0.1, batch)
                .map(|_| ())
        ));
    }
    assert_eq!(head, before, "a rejected epoch leaves the head unchanged");
    let loss = cpu
        .sgd_epoch(&mut head, &xs, &[0, 1, 1, 0], &[3, 1, 0, 2], 0.1, 4)
        .unwrap();
    // One batch, evaluated at the zero head: every sample's loss is ln 2.
    assert!(
        (loss - std::f32::consts::LN_2).abs() < 1e-6,
        "zero head: loss ln 2, got {loss}"
    );
    assert_ne!(head, before, "the epoch moved the head");
}

// ---------------------------------------------------------------- device and fallback

#[test]
fn no_gpu_is_a_clean_error_and_the_cpu_is_chosen() {
    let info = probe();
    println!("probe: {info:?}");
    let best = Compute::best();
    if info.present {
        assert!(info.name.is_some() && info.memory_total > 0 && info.reason.is_none());
        assert!(info.memory_free <= info.memory_total);
        let gpu = Gpu::new(0).expect("a present GPU opens");
        println!("{gpu:?}");
        assert_eq!(best.name(), "cuda");
        assert!(!info.admits(info.memory_free), "the margin is kept");
    } else {
        assert!(info.reason.is_some());
        assert_eq!((info.memory_free, info.memory_total), (0, 0));
        assert!(!info.admits(0));
        let err = Gpu::new(0).expect_err("no GPU here");
        assert!(matches!(err, Error::NoGpu(_)), "{err:?}");
        println!("Gpu::new(0): {err}");
        assert!(matches!(best, Compute::Cpu));
        assert_eq!(best.name(), "cpu");
        // Asking twice is just as clean (nothing cached a panic or a half-open context).
        assert!(matches!(Gpu::shared(0), Err(Error::NoGpu(_))));
        assert!(matches!(Gpu::new(3), Err(Error::NoGpu(_))));
        assert!(!baton_gpu_kernels::device::probe_ordinal(1).present);
    }
}

#[test]
fn kernels_compile_with_nvrtc_when_it_is_installed() {
    let Some(version) = nvrtc_version() else {
        println!("skipped: NVRTC (libnvrtc.so) not loadable");
        return;
    };
    println!("NVRTC {version:?}");
    for arch in [Some("compute_90"), None] {
        let ptx = kernels_ptx(arch).expect("the kernels compile");
        for name in [
            "mean_pool_normalize",
            "cosine_sims",
            "topk_rows",
            "softmax_rows",
            "head_forward",
            "sgd_batch_delta",
            "sgd_apply",
        ] {
            assert!(
                ptx.contains(&format!(".entry {name}(")),
                "{arch:?}: no entry {name} in the PTX"
            );
        }
        if let Some(arch) = arch {
            let target = arch.replace("compute_", "sm_");
            assert!(ptx.contains(&format!(".target {target}")), "{arch}");
        }
    }
}

// ---------------------------------------------------------------- GPU vs CPU twins

#[test]
fn gpu_mean_pool_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut r = Lcg(1);
    // Odd sizes: dim not a multiple of the block, a fully masked row, seq 1.
    for (b, s, d) in [(5, 17, 384), (3, 1, 7), (2, 300, 1000)] {
        let hidden = r.vec(b * s * d);
        let mut mask: Vec<i64> = (0..b * s).map(|_| i64::from(r.next() > -0.5)).collect();
        mask[..s].iter_mut().for_each(|m| *m = 0); // row 0 fully masked -> zeros
        let cpu = mean_pool_normalize(&hidden, &mask, b, s, d);
        let got = gpu.mean_pool_normalize(&hidden, &mask, b, s, d).unwrap();
        assert_eq!(got.len(), b);
        assert!(got[0].iter().all(|&v| v == 0.0));
        assert_close(
            &format!("pool {b}x{s}x{d}"),
            &got.concat(),
            &cpu.concat(),
            TOL,
        );
    }
    assert!(
        gpu.mean_pool_normalize(&[], &[], 0, 4, 3)
            .unwrap()
            .is_empty()
    );
    assert_eq!(
        gpu.mean_pool_normalize(&[], &[], 2, 0, 3).unwrap(),
        vec![vec![0.0; 3]; 2]
    );
}

#[test]
fn gpu_cosine_topk_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut r = Lcg(2);
    for (q, n, d, k) in [
        (7, 1000, 384, 10),
        (3, 5, 16, 9),
        (2, 70_000, 32, 3),
        (1, 300, 3, 300),
        // More queries than one launch's grid.y (65,535): two chunks.
        (70_000, 3, 2, 2),
    ] {
        let queries = r.vec(q * d);
        let corpus = r.vec(n * d);
        let cpu = cosine_topk_cpu(&queries, &corpus, d, k);
        let got = gpu.cosine_topk(&queries, &corpus, d, k).unwrap();
        assert_eq!(got.len(), q);
        let mut worst = 0.0f32;
        for (qi, (g, c)) in got.iter().zip(&cpu).enumerate() {
            assert_eq!(g.len(), c.len());
            for (rank, ((gi, gv), (_, cv))) in g.iter().zip(c).enumerate() {
                // Same similarity at each rank; the GPU's pick really has that similarity
                // (indices may differ only between near-ties).
                let true_sim = cosine(&queries[qi * d..][..d], &corpus[gi * d..][..d]);
                worst = worst.max((gv - cv).abs()).max((gv - true_sim).abs());
                assert!(
                    (gv - cv).abs() <= TOL && (gv - true_sim).abs() <= TOL,
                    "q{qi} rank {rank}: gpu ({gi}, {gv}) cpu {cv} true {true_sim}"
                );
            }
            let mut idx: Vec<usize> = g.iter().map(|p| p.0).collect();
            idx.sort_unstable();
            idx.dedup();
            assert_eq!(idx.len(), g.len(), "no index twice");
        }
        eprintln!("cosine top-{k} {q}x{n}x{d}: max abs diff {worst:.2e}");
    }
    // Exact ties and zero vectors: the order must be the CPU's exactly.
    let corpus = [1.0, 0.0, 0.0, 1.0, 1.0, 1.0, -1.0, 0.0, 2.0, 0.0, 0.0, 0.0];
    let queries = [1.0, 0.0, 0.0, 0.0];
    let cpu = cosine_topk_cpu(&queries, &corpus, 2, 6);
    let got = gpu.cosine_topk(&queries, &corpus, 2, 6).unwrap();
    let ids = |v: &Vec<Vec<(usize, f32)>>| -> Vec<Vec<usize>> {
        v.iter().map(|r| r.iter().map(|p| p.0).collect()).collect()
    };
    assert_eq!(ids(&got), ids(&cpu));
    assert_eq!(
        gpu.cosine_topk(&queries, &corpus, 2, 0).unwrap(),
        vec![vec![], vec![]]
    );
}

#[test]
fn gpu_softmax_rows_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut r = Lcg(3);
    for (rows, cols) in [(1, 1), (33, 10), (4, 5000), (1000, 3)] {
        let x: Vec<f32> = r.vec(rows * cols).into_iter().map(|v| v * 30.0).collect();
        let cpu = softmax_rows_cpu(&x, rows, cols);
        let got = gpu.softmax_rows(&x, rows, cols).unwrap();
        assert_close(&format!("softmax {rows}x{cols}"), &got, &cpu, TOL);
    }
    let big = [1000.0, 1001.0, 1002.0, -1e30, 0.0, 1e30];
    assert_close(
        "softmax large",
        &gpu.softmax_rows(&big, 2, 3).unwrap(),
        &softmax_rows_cpu(&big, 2, 3),
        TOL,
    );
}

#[test]
fn gpu_head_forward_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut r = Lcg(4);
    for (n, classes, d) in [(50, 3, 384), (1, 1, 5), (300, 40, 64)] {
        let mut head = LinearHead::new(labels(classes), d);
        head.weights = r.vec(classes * d).into_iter().map(|v| v * 0.1).collect();
        head.bias = r.vec(classes);
        let xs = r.vec(n * d);
        let cpu = head_forward_cpu(&head, &xs, n);
        let got = gpu.head_forward(&head, &xs, n).unwrap();
        assert_close(&format!("head {n}x{classes}x{d}"), &got, &cpu, TOL);
    }
}

#[test]
fn gpu_sgd_epoch_matches_cpu() {
    let Some(gpu) = gpu() else { return };
    let mut r = Lcg(5);
    // Batches that do and do not divide n, batch 1, and a batch larger than n.
    for (n, classes, d, batch) in [
        (200, 3, 384, 16),
        (37, 5, 20, 8),
        (10, 2, 7, 1),
        (9, 4, 12, 64),
    ] {
        let mut head = LinearHead::new(labels(classes), d);
        head.weights = r.vec(classes * d).into_iter().map(|v| v * 0.05).collect();
        head.bias = r.vec(classes).into_iter().map(|v| v * 0.1).collect();
        let xs = r.vec(n * d);
        let ys: Vec<usize> = (0..n).map(|_| r.below(classes)).collect();
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            order.swap(i, r.below(i + 1));
        }
        let mut cpu_head = head.clone();
        let mut gpu_head = head.clone();
        let cpu_loss = sgd_epoch_cpu(&mut cpu_head, &xs, &ys, &order, 0.5, batch);
        let gpu_loss = gpu
            .sgd_epoch(&mut gpu_head, &xs, &ys, &order, 0.5, batch)
            .unwrap();
        let what = format!("sgd n{n} c{classes} d{d} b{batch}");
        assert!(
            (cpu_loss - gpu_loss).abs() <= TOL,
            "{what}: loss cpu {cpu_loss} gpu {gpu_loss}"
        );
        assert_close(
            &format!("{what} weights"),
            &gpu_head.weights,
            &cpu_head.weights,
            SGD_TOL,
        );
        assert_close(
            &format!("{what} bias"),
            &gpu_head.bias,
            &cpu_head.bias,
            SGD_TOL,
        );
        assert_ne!(
            gpu_head.weights, head.weights,
            "{what}: the epoch moved the weights"
        );
    }
    // A rejected call leaves the head unchanged, on the GPU too.
    let mut head = LinearHead::new(labels(2), 3);
    let err = gpu
        .sgd_epoch(&mut head, &[0.0; 6], &[0, 5], &[0, 1], 0.1, 1)
        .unwrap_err();
    assert!(matches!(err, Error::Shape(_)), "{err:?}");
    assert_eq!(head, LinearHead::new(labels(2), 3));
}

#[test]
fn gpu_compute_trains_a_separable_set_like_the_cpu() {
    let Some(gpu) = gpu() else { return };
    let compute = Compute::Cuda(gpu);
    let mut r = Lcg(6);
    let (n, d, classes) = (120, 16, 3);
    // Class c: a centre at 3 * e_c plus noise.
    let mut xs = Vec::with_capacity(n * d);
    let mut ys = Vec::with_capacity(n);
    for i in 0..n {
        let c = i % classes;
        let mut x = r.vec(d);
        x[c] += 3.0;
        xs.extend(x);
        ys.push(c);
    }
    let mut head = LinearHead::new(labels(classes), d);
    let order: Vec<usize> = (0..n).rev().collect();
    for _ in 0..30 {
        compute
            .sgd_epoch(&mut head, &xs, &ys, &order, 0.3, 10)
            .unwrap();
    }
    let logits = compute.head_forward(&head, &xs, n).unwrap();
    let probs = compute.softmax_rows(&logits, n, classes).unwrap();
    let correct = (0..n)
        .filter(|&i| {
            let row = &probs[i * classes..][..classes];
            let best = (0..classes)
                .max_by(|&a, &b| row[a].total_cmp(&row[b]))
                .unwrap();
            best == ys[i] && best == head.predict(&xs[i * d..][..d]).0
        })
        .count();
    assert_eq!(correct, n);
}
