//! `baton-embedbench`: throughput of the bare `baton_gpu_kernels::Embedder` (tokenize + run +
//! pool + normalise), the Rust side of `cargo xtask bench --embedder`, which runs it
//! interleaved with its Python onnxruntime twin (`benches/python/embed_bench.py`) on the
//! same inputs, model and thread settings.
//!
//! Reads one text per line from `--inputs`, embeds them in batches of `--batch` after a
//! warm-up pass, and prints on stdout:
//!
//! ```text
//! first4 impl=rust case=CASE [d0, d1, d2, d3]      the first text's first 4 dims
//! STAGES impl=rust case=CASE batches=.. tokenize_ms=.. run_ms=.. pool_ms=.. ...  (--stages)
//! RESULT impl=rust case=CASE texts=N seconds=S texts_per_s=R
//! ```
//!
//! `--stages` runs, instead of the `Embedder`, a replica of `Embedder::embed_chunk` built from
//! the same pieces (the tokenizer with the same truncation and padding, an ONNX Runtime
//! session with the same thread settings, [`baton_gpu_kernels::mean_pool_normalize`]) and
//! times each stage per batch. (ONNX Runtime allows one environment per process and the
//! `Embedder` keeps its own private, so the two cannot share a process.) With
//! `--check-against` (a `--dump` of the `Embedder`'s vectors) it first checks that the
//! replica computes the same vectors.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use baton_gpu_kernels::{Embedder, EmbedderConfig, mean_pool_normalize};
use clap::Parser;
use ort::session::{Session, SessionInputValue};
use ort::value::TensorRef;
use tokenizers::{
    PaddingParams, PaddingStrategy, Tokenizer, TruncationDirection, TruncationParams,
    TruncationStrategy,
};

/// Throughput of the bare `Embedder` on a file of texts.
#[derive(Parser, Debug)]
struct Args {
    /// One text per line (empty lines are skipped).
    #[arg(long)]
    inputs: PathBuf,
    /// A name for the inputs, echoed in the output lines.
    #[arg(long, default_value = "inputs")]
    case: String,
    /// Where `cargo xtask setup` put the model and ONNX Runtime.
    #[arg(long, env = "BATON_HOME", default_value = ".baton")]
    baton_home: PathBuf,
    /// Texts per `embed` call.
    #[arg(long, default_value_t = 32)]
    batch: usize,
    /// ONNX Runtime intra-op threads (one session).
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Timed passes over the inputs.
    #[arg(long, default_value_t = 3)]
    passes: usize,
    /// Untimed passes first.
    #[arg(long, default_value_t = 1)]
    warmup_passes: usize,
    /// Write the vectors of the first `--dump-count` texts here, as JSON `{"vectors": [...]}`.
    #[arg(long)]
    dump: Option<PathBuf>,
    /// How many vectors `--dump` writes.
    #[arg(long, default_value_t = 4)]
    dump_count: usize,
    /// Time tokenization, the ONNX Runtime run and pooling apart (per batch), with a replica
    /// of the `Embedder`'s steps.
    #[arg(long)]
    stages: bool,
    /// With `--stages`: a `--dump` of the `Embedder`'s vectors of the first texts, which the
    /// replica must reproduce (max abs difference 1e-5).
    #[arg(long, requires = "stages")]
    check_against: Option<PathBuf>,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    if args.batch == 0 || args.passes == 0 {
        bail!("--batch and --passes must be at least 1");
    }
    let texts: Vec<String> = std::fs::read_to_string(&args.inputs)
        .with_context(|| format!("reading {}", args.inputs.display()))?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    if texts.is_empty() {
        bail!("{} holds no texts", args.inputs.display());
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let cfg = EmbedderConfig {
        intra_threads: args.threads,
        sessions: 1,
        ..EmbedderConfig::from_home(&args.baton_home)
    };
    let tag = format!("impl=rust case={}", args.case);
    if args.stages {
        return stages(&args, &cfg, &refs, &tag);
    }
    let embedder = Embedder::load(&cfg).context("loading the embedder")?;

    let first = embedder.embed(&refs[..args.batch.min(refs.len())])?;
    println!("first4 {tag} {}", fmt_dims(&first[0][..4]));
    if let Some(path) = &args.dump {
        let n = args.dump_count.min(refs.len());
        let vectors = embedder.embed(&refs[..n])?;
        std::fs::write(
            path,
            serde_json::to_vec(&serde_json::json!({ "vectors": vectors }))?,
        )
        .with_context(|| format!("writing {}", path.display()))?;
    }

    for _ in 0..args.warmup_passes {
        for chunk in refs.chunks(args.batch) {
            embedder.embed(chunk)?;
        }
    }

    let start = Instant::now();
    for _ in 0..args.passes {
        for chunk in refs.chunks(args.batch) {
            let out = embedder.embed(chunk)?;
            assert_eq!(out.len(), chunk.len());
        }
    }
    let seconds = start.elapsed().as_secs_f64();
    let n = refs.len() * args.passes;
    println!(
        "RESULT {tag} texts={n} seconds={seconds:.4} texts_per_s={:.2}",
        n as f64 / seconds
    );
    Ok(())
}

fn fmt_dims(v: &[f32]) -> String {
    let dims: Vec<String> = v.iter().map(|x| format!("{x:.6}")).collect();
    format!("[{}]", dims.join(", "))
}

/// The tokenizer configured as `Embedder::load` configures it: truncation to `max_tokens`
/// (longest first), padding to the longest text of each batch.
fn load_tokenizer(path: &Path, max_tokens: usize) -> anyhow::Result<Tokenizer> {
    let mut tok = Tokenizer::from_file(path).map_err(|e| anyhow!("{}: {e}", path.display()))?;
    let padding = tok.get_padding().cloned().unwrap_or_default();
    tok.with_truncation(Some(TruncationParams {
        direction: TruncationDirection::Right,
        max_length: max_tokens,
        strategy: TruncationStrategy::LongestFirst,
        stride: 0,
    }))
    .map_err(|e| anyhow!("{e}"))?;
    tok.with_padding(Some(PaddingParams {
        strategy: PaddingStrategy::BatchLongest,
        pad_to_multiple_of: None,
        ..padding
    }));
    Ok(tok)
}

/// One session, built as `Embedder::load` builds its CPU sessions. ONNX Runtime is already
/// loaded by the `Embedder` (the same library; the environment is process-wide).
fn build_session(cfg: &EmbedderConfig) -> ort::Result<Session> {
    let env = ort::init_from(&cfg.ort_dylib_path)
        .map_err(|e| ort::Error::new(e.to_string()))?
        .with_name("baton-embedbench")
        .build()?;
    Session::builder(&env)?
        .with_intra_threads(cfg.intra_threads)?
        .commit_from_file(&cfg.model_path)
}

/// Per-stage times of one batch.
#[derive(Default, Clone, Copy)]
struct StageTimes {
    tokenize: Duration,
    run: Duration,
    pool: Duration,
}

/// `Embedder::embed_chunk`, stage by stage: tokenize (encode + building the i64 tensors),
/// run (the ONNX Runtime session), pool (mean pooling + L2 normalisation).
fn replica_chunk(
    tok: &Tokenizer,
    session: &mut Session,
    token_type_ids: bool,
    texts: &[&str],
    times: &mut StageTimes,
) -> anyhow::Result<Vec<Vec<f32>>> {
    let t0 = Instant::now();
    let encodings = tok
        .encode_batch_fast(texts.to_vec(), true)
        .map_err(|e| anyhow!("{e}"))?;
    let batch = encodings.len();
    let seq = encodings.first().map_or(0, |e| e.len());
    let mut ids = Vec::with_capacity(batch * seq);
    let mut mask = Vec::with_capacity(batch * seq);
    let mut types = Vec::with_capacity(batch * seq);
    for e in &encodings {
        ids.extend(e.get_ids().iter().map(|&x| i64::from(x)));
        mask.extend(e.get_attention_mask().iter().map(|&x| i64::from(x)));
        types.extend(e.get_type_ids().iter().map(|&x| i64::from(x)));
    }
    let t1 = Instant::now();
    let shape = [batch, seq];
    let mut inputs: Vec<(Cow<'_, str>, SessionInputValue<'_>)> = ort::inputs![
        "input_ids" => TensorRef::from_array_view((shape, ids.as_slice()))?,
        "attention_mask" => TensorRef::from_array_view((shape, mask.as_slice()))?,
    ];
    if token_type_ids {
        inputs.push((
            "token_type_ids".into(),
            TensorRef::from_array_view((shape, types.as_slice()))?.into(),
        ));
    }
    let outputs = session.run(inputs)?;
    let (_, hidden) = outputs
        .get("last_hidden_state")
        .context("no last_hidden_state output")?
        .try_extract_tensor::<f32>()?;
    let dim = hidden.len() / (batch * seq);
    let t2 = Instant::now();
    let vectors = mean_pool_normalize(hidden, &mask, batch, seq, dim);
    let t3 = Instant::now();
    times.tokenize += t1 - t0;
    times.run += t2 - t1;
    times.pool += t3 - t2;
    Ok(vectors)
}

/// Times each stage of the replica over `--passes` passes (after a warm-up pass and, with
/// `--check-against`, a check of its vectors against the `Embedder`'s).
fn stages(args: &Args, cfg: &EmbedderConfig, refs: &[&str], tag: &str) -> anyhow::Result<()> {
    let tok = load_tokenizer(&cfg.tokenizer_path, cfg.max_tokens)?;
    let mut session = build_session(cfg).map_err(|e| anyhow!("building a session: {e}"))?;
    let token_type_ids = session
        .inputs()
        .iter()
        .any(|i| i.name() == "token_type_ids");
    let mut scratch = StageTimes::default();

    let head = &refs[..args.batch.min(refs.len())];
    let first = replica_chunk(&tok, &mut session, token_type_ids, head, &mut scratch)?;
    println!("first4 {tag} {} (stage replica)", fmt_dims(&first[0][..4]));
    let mut max_diff = f32::NAN;
    if let Some(path) = &args.check_against {
        let dump: serde_json::Value = serde_json::from_slice(
            &std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
        )?;
        let theirs: Vec<Vec<f32>> = serde_json::from_value(dump["vectors"].clone())?;
        let n = theirs.len().min(refs.len());
        let ours = replica_chunk(&tok, &mut session, token_type_ids, &refs[..n], &mut scratch)?;
        max_diff = ours
            .iter()
            .flatten()
            .zip(theirs.iter().flatten())
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        if max_diff.is_nan() || max_diff > 1e-5 {
            bail!("the stage replica differs from the Embedder by {max_diff}");
        }
    }
    for _ in 0..args.warmup_passes {
        for chunk in refs.chunks(args.batch) {
            replica_chunk(&tok, &mut session, token_type_ids, chunk, &mut scratch)?;
        }
    }

    let mut times = StageTimes::default();
    let mut batches = 0usize;
    for _ in 0..args.passes {
        for chunk in refs.chunks(args.batch) {
            replica_chunk(&tok, &mut session, token_type_ids, chunk, &mut times)?;
            batches += 1;
        }
    }
    let ms = |d: Duration| d.as_secs_f64() * 1e3 / batches as f64;
    let total = (times.tokenize + times.run + times.pool).as_secs_f64();
    println!(
        "STAGES {tag} batches={batches} tokenize_ms={:.3} run_ms={:.3} pool_ms={:.3} \
         texts_per_s={:.1} max_abs_diff_vs_embedder={max_diff:.1e}",
        ms(times.tokenize),
        ms(times.run),
        ms(times.pool),
        (refs.len() * args.passes) as f64 / total,
    );
    Ok(())
}
