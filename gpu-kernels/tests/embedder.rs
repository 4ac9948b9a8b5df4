//! The embedder against the real model (fetched by `cargo xtask setup`) and a reference
//! computed independently in Python (`tests/fixtures/make_reference.py`).

mod common;

use std::path::PathBuf;
use std::sync::OnceLock;

use baton_gpu_kernels::{Compute, Embedder, EmbedderConfig, Error, cosine};

/// One embedder for the whole test binary (loading it takes a while). Two sessions, so
/// the concurrency test exercises the pool.
fn embedder() -> &'static Embedder {
    static EMBEDDER: OnceLock<Embedder> = OnceLock::new();
    EMBEDDER.get_or_init(|| Embedder::load(&common::config(2)).expect("load the embedder"))
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

#[test]
fn matches_the_python_reference() {
    let raw = include_str!("fixtures/reference_embeddings.json");
    let fixture: serde_json::Value = serde_json::from_str(raw).unwrap();
    let sentences = fixture["sentences"].as_array().unwrap();
    let texts: Vec<&str> = sentences
        .iter()
        .map(|s| s["text"].as_str().unwrap())
        .collect();
    assert_eq!(texts.len(), 4);

    let emb = embedder();
    assert_eq!(emb.dim(), 384);
    let got = emb.embed(&texts).unwrap();
    assert_eq!(got.len(), texts.len());

    for ((s, text), rust) in sentences.iter().zip(&texts).zip(&got) {
        let python: Vec<f32> = s["embedding"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_f64().unwrap() as f32)
            .collect();
        assert_eq!(rust.len(), python.len(), "{text}");
        assert!((norm(rust) - 1.0).abs() < 1e-5, "{text}: not unit length");
        let cos = cosine(rust, &python);
        assert!(
            cos > 0.999,
            "{text}: cosine {cos} with the python reference"
        );
        let max_diff = rust
            .iter()
            .zip(&python)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(max_diff < 1e-3, "{text}: max abs diff {max_diff}");
        eprintln!("{text:?}: cosine {cos:.7}, max abs diff {max_diff:.2e}");
        let count = s["token_count"].as_u64().unwrap() as usize;
        assert_eq!(emb.token_count(text).unwrap(), count, "{text}");
    }
    // And the vectors mean something: the two opinions are closer to each other than to the fox.
    assert!(cosine(&got[1], &got[2]) > cosine(&got[0], &got[1]));
}

#[test]
fn long_texts_are_truncated_to_256_tokens() {
    let emb = embedder();
    let long = "the workflow engine retries failed steps with backoff ".repeat(60);
    let count = emb.token_count(&long).unwrap();
    assert!(count > 256, "only {count} tokens");

    // Text beyond the first 256 tokens cannot change the embedding.
    let longer = format!("{long} and then something completely different happens");
    let got = emb.embed(&[&long, &longer]).unwrap();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].len(), 384);
    assert!((norm(&got[0]) - 1.0).abs() < 1e-5);
    let cos = cosine(&got[0], &got[1]);
    assert!(cos > 0.9999, "cosine {cos}: the tail was not truncated");
}

#[test]
fn empty_batch_returns_empty() {
    assert!(embedder().embed(&[]).unwrap().is_empty());
}

#[test]
fn empty_string_still_embeds() {
    let got = embedder().embed(&[""]).unwrap();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].len(), 384);
    assert_eq!(embedder().token_count("").unwrap(), 2); // [CLS] [SEP]
}

#[test]
fn batches_larger_than_a_chunk_keep_their_order() {
    let emb = embedder();
    let texts: Vec<String> = (0..40)
        .map(|i| format!("sentence number {i} about topic {}", i % 7))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let all = emb.embed(&refs).unwrap();
    assert_eq!(all.len(), 40);
    for i in [0, 31, 32, 39] {
        let alone = emb.embed(&[refs[i]]).unwrap();
        let cos = cosine(&all[i], &alone[0]);
        // Not bit-equal: the int8 model quantises over the whole batch.
        assert!(
            cos > 0.999,
            "text {i}: cosine {cos} with its solo embedding"
        );
    }
}

#[test]
fn a_chunk_spread_over_the_free_sessions_matches_it_run_whole() {
    // Two sessions of its own, so both are free: its chunks of 32 and of 8 go in two parts
    // each. A one-session embedder runs them whole.
    let two = Embedder::load(&common::config(2)).expect("load a two-session embedder");
    let whole = Embedder::load(&common::config(1)).expect("load a one-session embedder");
    let texts: Vec<String> = (0..40)
        .map(|i| format!("text {i}: {}", "word ".repeat(i % 9)))
        .collect();
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let spread = two.embed(&refs).unwrap();
    let expected = whole.embed(&refs).unwrap();
    assert_eq!(spread.len(), 40);
    for (i, (s, e)) in spread.iter().zip(&expected).enumerate() {
        // Not bit-equal: the int8 model quantises over the whole batch, and each part
        // pads to its own longest text.
        let cos = cosine(s, e);
        assert!(cos > 0.999, "text {i}: cosine {cos} with the whole chunk's");
    }
    // In order: each vector is nearer its own text's than the next text's.
    for i in 0..39 {
        assert!(cosine(&spread[i], &expected[i]) > cosine(&spread[i], &expected[i + 1]));
    }
}

#[test]
fn concurrent_callers_spreading_their_chunks_neither_block_nor_mix_them_up() {
    // Four callers of 40 texts each on two sessions: each chunk is spread over whichever
    // sessions are free when it starts (a part holds one session at a time, so callers
    // never wait on each other in a cycle), and every caller gets its own texts' vectors.
    let emb = embedder();
    let batches: Vec<Vec<String>> = (0..4)
        .map(|c| {
            (0..40)
                .map(|i| format!("caller {c} asks about topic {i}"))
                .collect()
        })
        .collect();
    let alone: Vec<Vec<Vec<f32>>> = batches
        .iter()
        .map(|b| {
            b.iter()
                .map(|t| emb.embed(&[t.as_str()]).unwrap().remove(0))
                .collect()
        })
        .collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = batches
            .iter()
            .map(|b| {
                s.spawn(move || {
                    let refs: Vec<&str> = b.iter().map(String::as_str).collect();
                    emb.embed(&refs).unwrap()
                })
            })
            .collect();
        for (c, h) in handles.into_iter().enumerate() {
            let got = h.join().unwrap();
            assert_eq!(got.len(), 40);
            for (i, (g, e)) in got.iter().zip(&alone[c]).enumerate() {
                let cos = cosine(g, e);
                assert!(
                    cos > 0.999,
                    "caller {c}, text {i}: cosine {cos} with its solo embedding"
                );
            }
        }
    });
}

#[test]
fn concurrent_callers_share_the_pool() {
    let emb = embedder();
    let texts = ["a cat sat on the mat", "stocks fell sharply today"];
    let expected = emb.embed(&texts).unwrap();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|_| s.spawn(|| emb.embed(&texts).unwrap()))
            .collect();
        for h in handles {
            let got = h.join().unwrap();
            for (g, e) in got.iter().zip(&expected) {
                assert!(cosine(g, e) > 0.99999);
            }
        }
    });
}

#[test]
fn missing_files_are_clean_errors() {
    let good = common::config(1);

    let cfg = EmbedderConfig {
        ort_dylib_path: PathBuf::from("/nonexistent/libonnxruntime.so"),
        ..good.clone()
    };
    let err = Embedder::load(&cfg).unwrap_err();
    assert!(matches!(err, Error::OrtLibraryNotFound(_)), "{err:?}");
    assert!(
        err.to_string()
            .contains("onnx runtime library not found at /nonexistent/libonnxruntime.so"),
        "{err}"
    );

    let cfg = EmbedderConfig {
        model_path: PathBuf::from("/nonexistent/model.onnx"),
        ..good.clone()
    };
    let err = Embedder::load(&cfg).unwrap_err();
    assert!(matches!(err, Error::ModelNotFound(_)), "{err:?}");
    assert!(err.to_string().contains("model file not found at"), "{err}");

    let cfg = EmbedderConfig {
        tokenizer_path: PathBuf::from("/nonexistent/tokenizer.json"),
        ..good.clone()
    };
    assert!(matches!(
        Embedder::load(&cfg).unwrap_err(),
        Error::TokenizerNotFound(_)
    ));

    // A file that is not a tokenizer.
    let cfg = EmbedderConfig {
        tokenizer_path: good.model_path.clone(),
        ..good.clone()
    };
    assert!(matches!(
        Embedder::load(&cfg).unwrap_err(),
        Error::Tokenizer(_)
    ));

    let cfg = EmbedderConfig {
        sessions: 0,
        ..good
    };
    assert!(matches!(
        Embedder::load(&cfg).unwrap_err(),
        Error::Config(_)
    ));
}

#[test]
fn pooling_on_the_best_backend_matches_the_cpu() {
    let compute = Compute::best();
    let texts = ["a happy dog", "a joyful puppy runs in the park", ""];
    let emb = embedder();
    let cpu = emb.embed(&texts).unwrap();
    let got = emb.embed_with(&texts, &compute).unwrap();
    assert_eq!(got.len(), cpu.len());
    for (g, c) in got.iter().zip(&cpu) {
        let d = g
            .iter()
            .zip(c)
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(d <= 1e-4, "{}: max abs diff {d}", compute.name());
    }
    assert_eq!(emb.embed_with(&[], &compute).unwrap().len(), 0);
}

#[test]
fn asking_for_cuda_never_fails_the_load() {
    let cfg = EmbedderConfig {
        cuda: true,
        ..common::config(1)
    };
    let emb = Embedder::load(&cfg).expect("cuda: true loads, on CUDA or on the CPU");
    println!("execution provider: {}", emb.execution_provider());
    // The PyPI CPU wheel has no CUDA execution provider.
    assert!(["cuda", "cpu"].contains(&emb.execution_provider()));
    let v = emb.embed(&["still works"]).unwrap();
    let reference = embedder().embed(&["still works"]).unwrap();
    assert!(cosine(&v[0], &reference[0]) > 0.9999);
    assert_eq!(embedder().execution_provider(), "cpu");
}
