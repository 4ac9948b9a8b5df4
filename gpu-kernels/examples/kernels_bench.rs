//! Times each CUDA kernel against its CPU twin and prints the speed-up, for GPU sessions:
//!
//! ```text
//! cargo run --release -p baton-gpu-kernels --example kernels_bench [-- --quick]
//! ```
//!
//! GPU times are end to end through the host API (upload, kernels, download), which is what
//! a caller pays; CPU twins run single-threaded. Each figure is the median of several runs
//! after one warm-up (which also absorbs the one-time NVRTC compile). Also prints the largest
//! absolute difference between the two results. With no GPU it says so and exits 0.

use std::time::{Duration, Instant};

use baton_gpu_kernels::{
    Gpu, LinearHead, cosine_topk_cpu, head_forward_cpu, mean_pool_normalize, probe, sgd_epoch_cpu,
    softmax_rows_cpu,
};

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
}

/// Median wall time of `runs` calls of `f`, after one warm-up call; and the last result.
fn time<T>(runs: usize, mut f: impl FnMut() -> T) -> (Duration, T) {
    let mut out = f();
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        out = f();
        times.push(t.elapsed());
    }
    times.sort();
    (times[times.len() / 2], out)
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max)
}

fn report(name: &str, shape: &str, cpu: Duration, gpu: Duration, diff: f32) {
    println!(
        "{name:<20} {shape:<28} cpu {:>10.3} ms  gpu {:>9.3} ms  speed-up {:>7.1}x  max|diff| {diff:.1e}",
        cpu.as_secs_f64() * 1e3,
        gpu.as_secs_f64() * 1e3,
        cpu.as_secs_f64() / gpu.as_secs_f64().max(1e-12),
    );
}

fn main() {
    let info = probe();
    if !info.present {
        println!(
            "no GPU present ({}): nothing to benchmark",
            info.reason.as_deref().unwrap_or("unknown")
        );
        return;
    }
    let t = Instant::now();
    let gpu = match Gpu::new(0) {
        Ok(gpu) => gpu,
        Err(e) => {
            println!("a GPU is present but the kernels did not load: {e}");
            std::process::exit(1);
        }
    };
    println!(
        "{} (compute capability {:?}), {:.1} / {:.1} GiB free; NVRTC {:?}; kernels compiled and loaded in {:.0} ms",
        gpu.name(),
        gpu.compute_capability(),
        info.memory_free as f64 / (1u64 << 30) as f64,
        info.memory_total as f64 / (1u64 << 30) as f64,
        baton_gpu_kernels::nvrtc_version(),
        t.elapsed().as_secs_f64() * 1e3
    );
    let quick = std::env::args().any(|a| a == "--quick");
    let (runs, scale) = if quick { (3, 4) } else { (7, 1) };
    let mut r = Lcg(42);

    // Masked mean pooling: one embedder batch of all-MiniLM-L6-v2 output.
    let (b, s, d) = (128, 128, 384);
    let hidden = r.vec(b * s * d);
    let mask: Vec<i64> = (0..b * s)
        .map(|i| i64::from(i % s < 40 + (i / s) % 88))
        .collect();
    let (c, cpu_out) = time(runs, || mean_pool_normalize(&hidden, &mask, b, s, d));
    let (g, gpu_out) = time(runs, || {
        gpu.mean_pool_normalize(&hidden, &mask, b, s, d).unwrap()
    });
    report(
        "mean_pool_normalize",
        &format!("{b}x{s}x{d}"),
        c,
        g,
        max_abs_diff(&gpu_out.concat(), &cpu_out.concat()),
    );

    // Cosine top-k: queries against a corpus of embeddings.
    let (q, n, k) = (256 / scale, 50_000 / scale, 10);
    let queries = r.vec(q * d);
    let corpus = r.vec(n * d);
    let (c, cpu_out) = time(runs.min(3), || cosine_topk_cpu(&queries, &corpus, d, k));
    let (g, gpu_out) = time(runs, || gpu.cosine_topk(&queries, &corpus, d, k).unwrap());
    let vals = |v: &Vec<Vec<(usize, f32)>>| v.iter().flatten().map(|p| p.1).collect::<Vec<_>>();
    report(
        "cosine_topk",
        &format!("q{q} n{n} d{d} k{k}"),
        c,
        g,
        max_abs_diff(&vals(&gpu_out), &vals(&cpu_out)),
    );

    // Row softmax.
    let (rows, cols) = (4096, 1000);
    let x: Vec<f32> = r.vec(rows * cols).into_iter().map(|v| v * 20.0).collect();
    let (c, cpu_out) = time(runs, || softmax_rows_cpu(&x, rows, cols));
    let (g, gpu_out) = time(runs, || gpu.softmax_rows(&x, rows, cols).unwrap());
    report(
        "softmax_rows",
        &format!("{rows}x{cols}"),
        c,
        g,
        max_abs_diff(&gpu_out, &cpu_out),
    );

    // Linear head: forward pass and one SGD epoch.
    let (n, classes, batch) = (10_000 / scale, 20, 64);
    let mut head = LinearHead::new((0..classes).map(|i| format!("c{i}")).collect(), d);
    head.weights = r.vec(classes * d).into_iter().map(|v| v * 0.05).collect();
    let xs = r.vec(n * d);
    let ys: Vec<usize> = (0..n).map(|i| (i * 7) % classes).collect();
    let order: Vec<usize> = (0..n).map(|i| (i * 7919) % n).collect();
    let (c, cpu_out) = time(runs, || head_forward_cpu(&head, &xs, n));
    let (g, gpu_out) = time(runs, || gpu.head_forward(&head, &xs, n).unwrap());
    report(
        "head_forward",
        &format!("n{n} c{classes} d{d}"),
        c,
        g,
        max_abs_diff(&gpu_out, &cpu_out),
    );
    let (c, cpu_head) = time(runs.min(3), || {
        let mut h = head.clone();
        sgd_epoch_cpu(&mut h, &xs, &ys, &order, 0.1, batch);
        h
    });
    let (g, gpu_head) = time(runs, || {
        let mut h = head.clone();
        gpu.sgd_epoch(&mut h, &xs, &ys, &order, 0.1, batch).unwrap();
        h
    });
    report(
        "sgd_epoch",
        &format!("n{n} c{classes} d{d} b{batch}"),
        c,
        g,
        max_abs_diff(&gpu_head.weights, &cpu_head.weights),
    );
}
