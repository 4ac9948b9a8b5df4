//! Embedding throughput: 256 short sentences, chunks of 32, 2 intra-op threads.
//!
//! ```text
//! cargo xtask setup
//! cargo run --release -p baton-gpu-kernels --example throughput
//! ```
//!
//! Reads the model from `$BATON_HOME` (default `<repo>/.baton`). Reports tokenize + run +
//! pool + normalise, end to end, as sentences per second; also batch 1 for comparison.

use std::path::PathBuf;
use std::time::Instant;

use baton_gpu_kernels::{Embedder, EmbedderConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let home = std::env::var_os("BATON_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.baton"));
    let cfg = EmbedderConfig {
        intra_threads: 2,
        ..EmbedderConfig::from_home(&home)
    };
    let embedder = Embedder::load(&cfg)?;

    let subjects = [
        "the customer",
        "our service",
        "this workflow",
        "the new release",
    ];
    let verbs = [
        "really improved",
        "completely broke",
        "slightly changed",
        "never touched",
    ];
    let objects = [
        "the checkout flow",
        "my daily routine",
        "the quarterly report",
        "support",
    ];
    let texts: Vec<String> = (0..256)
        .map(|i| {
            format!(
                "{} {} {} after update {i} last week",
                subjects[i % 4],
                verbs[(i / 4) % 4],
                objects[(i / 16) % 4]
            )
        })
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();

    embedder.embed(&refs[..64])?; // warm-up
    let mut rates = Vec::new();
    for _ in 0..5 {
        let start = Instant::now();
        let out = embedder.embed(&refs)?; // 8 chunks of 32
        assert_eq!(out.len(), 256);
        rates.push(256.0 / start.elapsed().as_secs_f64());
    }
    rates.sort_by(f64::total_cmp);
    println!(
        "batch 32: median {:.0} sentences/s (min {:.0}, max {:.0}) over 5 runs of 256",
        rates[2], rates[0], rates[4]
    );

    let start = Instant::now();
    for t in &refs {
        embedder.embed(&[t])?;
    }
    println!(
        "batch 1:  {:.0} sentences/s",
        256.0 / start.elapsed().as_secs_f64()
    );
    Ok(())
}
