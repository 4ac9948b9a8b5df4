//! Tests of the factory, and of the workflows and model activities run in-process: an
//! [`Execution`] driven by a tiny loop that runs each scheduled activity straight from the
//! registry, retrying per its policy without the delays.

use std::{
    path::PathBuf,
    sync::{Arc, Mutex, OnceLock},
    time::Duration,
};

use baton_actors::{
    ActivityContext, ActivityInfo, ActivityOptions, Command, Execution, Registry,
    batching::BatchOptions,
    history::{Event, EventKind},
};
use baton_transport::{Payload, wire::Failure};
use serde_json::json;

use super::*;

/// A context for calling an activity function directly; heartbeats are dropped.
pub(super) fn context(activity: &str) -> ActivityContext {
    probe(activity).0
}

/// A context whose heartbeats are recorded (`None` for a bare heartbeat, else the details
/// as JSON).
fn probe(activity: &str) -> (ActivityContext, Arc<Mutex<Vec<Option<serde_json::Value>>>>) {
    let beats = Arc::new(Mutex::new(Vec::new()));
    let sink = beats.clone();
    let info = ActivityInfo {
        workflow_id: "wf-test".into(),
        run_id: "run-test".into(),
        activity: activity.into(),
        seq: 0,
        attempt: 1,
    };
    let ctx = ActivityContext::new(info, move |details: Option<Payload>| {
        sink.lock().unwrap().push(details.map(|p| p.to_json()));
    });
    (ctx, beats)
}

/// `$BATON_HOME`, or `<workspace>/.baton`.
fn baton_home() -> PathBuf {
    match std::env::var_os("BATON_HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home),
        _ => PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .join(".baton"),
    }
}

/// The process's models, from `baton_home()`. Fails the test (never skips it) when the
/// model files are missing.
fn models() -> Arc<Models> {
    static MODELS: OnceLock<Arc<Models>> = OnceLock::new();
    MODELS
        .get_or_init(|| {
            let models = Models::new(baton_home());
            let cfg = models.config();
            for path in [&cfg.model_path, &cfg.tokenizer_path, &cfg.ort_dylib_path] {
                assert!(
                    path.is_file(),
                    "{} is missing: run `cargo xtask setup` (or set BATON_HOME to a directory it set up)",
                    path.display()
                );
            }
            Arc::new(models)
        })
        .clone()
}

/// Models whose files do not exist: the model activities fail with `ModelUnavailable`.
fn no_models() -> Arc<Models> {
    Arc::new(Models::new("/nonexistent/baton-home"))
}

/// What [`drive`] saw: the run's outcome and every attempt, as (activity, queue, outcome).
struct Run {
    outcome: Result<serde_json::Value, Failure>,
    attempts: Vec<(String, String, Result<serde_json::Value, Failure>)>,
}

impl Run {
    fn activities(&self) -> Vec<&str> {
        self.attempts.iter().map(|(a, _, _)| a.as_str()).collect()
    }
}

/// Runs a workflow to its end in-process.
async fn drive(registry: &Registry, workflow: &str, input: serde_json::Value) -> Run {
    let def = registry
        .workflow_def(workflow)
        .expect("workflow registered");
    let mut exec = Execution::new(
        def.run.clone(),
        "wf-1",
        "run-1",
        registry.policies().clone(),
    );
    let mut next_id = 0u32;
    let mut apply = |exec: &mut Execution, kind: EventKind| {
        next_id += 1;
        exec.apply(&Event {
            id: next_id,
            at_ms: 0,
            kind,
        })
        .expect("deterministic");
    };
    apply(
        &mut exec,
        EventKind::WorkflowStarted {
            workflow_type: workflow.into(),
            workflow_id: "wf-1".into(),
            input: Payload::encode(&input).unwrap(),
        },
    );
    let mut attempts = Vec::new();
    loop {
        let commands = exec.advance().expect("deterministic");
        assert!(!commands.is_empty(), "the workflow is stuck");
        for command in commands {
            match command {
                Command::ScheduleActivity {
                    seq,
                    activity,
                    input,
                    options,
                } => {
                    apply(
                        &mut exec,
                        EventKind::ActivityScheduled {
                            seq,
                            activity: activity.clone(),
                            input: input.clone(),
                            options: options.clone(),
                        },
                    );
                    let f = registry
                        .activity_fn(&activity)
                        .expect("activity registered")
                        .clone();
                    let mut attempt = 1;
                    loop {
                        let (ctx, _) = probe(&activity);
                        let result = f(ctx, input.clone()).await.map_err(Failure::from);
                        attempts.push((
                            activity.clone(),
                            options.task_queue.clone(),
                            result.clone().map(|p| p.to_json()),
                        ));
                        match result {
                            Ok(result) => {
                                let kind = EventKind::ActivityCompleted {
                                    seq,
                                    attempt,
                                    worker: "w".into(),
                                    result,
                                };
                                apply(&mut exec, kind);
                                break;
                            }
                            Err(failure) => {
                                let retry_in_ms = options
                                    .retry
                                    .next_delay(attempt, &failure)
                                    .map(|d| d.as_millis() as u64);
                                let kind = EventKind::ActivityFailed {
                                    seq,
                                    attempt,
                                    worker: "w".into(),
                                    failure,
                                    retry_in_ms,
                                };
                                apply(&mut exec, kind);
                                if retry_in_ms.is_none() {
                                    break;
                                }
                                attempt += 1;
                            }
                        }
                    }
                }
                Command::CompleteWorkflow { output } => {
                    return Run {
                        outcome: Ok(output.to_json()),
                        attempts,
                    };
                }
                Command::FailWorkflow { failure } => {
                    return Run {
                        outcome: Err(failure),
                        attempts,
                    };
                }
                other => panic!("the pipelines issue no {other:?}"),
            }
        }
    }
}

// --- the factory --------------------------------------------------------------------

#[test]
fn the_factory_registers_both_workflows_and_routes_each_activity() {
    let r = factory(no_models()).unwrap();
    // The Mini AI Pipeline's part of the registry (other pipelines test their own).
    let names = r.workflow_names();
    for wf in ["batch_embed", "prepare_and_infer"] {
        assert!(names.contains(&wf), "{wf} not in {names:?}");
    }
    let cpu = r.activities_of_queue(CPU_QUEUE);
    for a in ["preprocess", "preprocess_batch", "validate_input"] {
        assert!(cpu.contains(&a), "{a} not routed to cpu: {cpu:?}");
    }
    let gpu = r.activities_of_queue(GPU_QUEUE);
    for a in ["compute_embeddings", "run_inference"] {
        assert!(gpu.contains(&a), "{a} not routed to gpu: {gpu:?}");
    }
    for name in [
        "validate_input",
        "preprocess",
        "preprocess_batch",
        "run_inference",
        "compute_embeddings",
    ] {
        assert!(
            r.activity_fn(name).is_some(),
            "{name} has no implementation"
        );
    }
    // Every activity with options has an implementation.
    for name in r.policies().keys() {
        assert!(
            r.activity_fn(name).is_some(),
            "{name} has no implementation"
        );
    }
}

#[test]
fn the_factory_applies_the_seed_policies() {
    let r = factory(no_models()).unwrap();
    let p = r.policies();
    let expect = |name: &str, queue: &str, start_to_close_s: u64, heartbeat_s: Option<u64>| {
        let o: &ActivityOptions = &p[name];
        assert_eq!(o.task_queue, queue, "{name}");
        assert_eq!(o.start_to_close_ms, start_to_close_s * 1000, "{name}");
        assert_eq!(
            o.heartbeat_timeout_ms,
            heartbeat_s.map(|s| s * 1000),
            "{name}"
        );
        o.retry.clone()
    };
    for (name, timeout) in [
        ("validate_input", 30),
        ("preprocess", 30),
        ("preprocess_batch", 60),
    ] {
        let retry = expect(name, "cpu", timeout, None);
        assert_eq!(retry, cpu_retry(), "{name}");
    }
    for (name, timeout) in [("run_inference", 120), ("compute_embeddings", 300)] {
        let retry = expect(name, "gpu", timeout, Some(30));
        assert_eq!(retry, gpu_retry(), "{name}");
    }

    let cpu = cpu_retry();
    assert_eq!(
        (
            cpu.initial_interval_ms,
            cpu.backoff_coefficient,
            cpu.maximum_attempts
        ),
        (1_000, 2.0, 3)
    );
    assert_eq!(cpu.non_retryable_error_types, ["ValidationError"]);
    let gpu = gpu_retry();
    assert_eq!(
        (
            gpu.initial_interval_ms,
            gpu.backoff_coefficient,
            gpu.maximum_attempts
        ),
        (2_000, 2.0, 2)
    );
    assert!(gpu.non_retryable_error_types.is_empty());
}

#[test]
fn workflow_inputs_are_checked_at_the_edge() {
    let r = factory(no_models()).unwrap();
    let check = |wf: &str, v: serde_json::Value| {
        r.workflow_def(wf)
            .unwrap()
            .check_input(&Payload::encode(&v).unwrap())
    };
    assert!(check("prepare_and_infer", json!({"text": "hi"})).is_ok());
    assert!(check("prepare_and_infer", json!({"txt": "hi"})).is_err());
    assert!(check("prepare_and_infer", json!("hi")).is_err());
    assert!(check("batch_embed", json!({"texts": ["a", "b"]})).is_ok());
    assert!(check("batch_embed", json!({"texts": "a"})).is_err());
}

// --- workflows without the model ----------------------------------------------------

#[tokio::test]
async fn an_empty_text_fails_validation_once_and_never_reaches_the_gpu() {
    let r = factory(no_models()).unwrap();
    let run = drive(&r, PREPARE_AND_INFER, json!({"text": "  \n "})).await;
    let failure = run.outcome.clone().unwrap_err();
    assert_eq!(
        (failure.kind.as_str(), failure.message.as_str()),
        ("ValidationError", "input text is empty")
    );
    assert_eq!(run.activities(), ["validate_input"]);
}

#[tokio::test]
async fn an_unavailable_model_is_retried_per_the_gpu_policy_then_fails_the_run() {
    let r = factory(no_models()).unwrap();
    let run = drive(&r, BATCH_EMBED, json!({"texts": ["One", "  "]})).await;
    let failure = run.outcome.clone().unwrap_err();
    assert_eq!(failure.kind, "ModelUnavailable");
    assert!(
        failure.message.contains("run `cargo xtask setup`"),
        "{}",
        failure.message
    );
    assert_eq!(
        run.activities(),
        [
            "preprocess_batch",
            "compute_embeddings",
            "compute_embeddings"
        ]
    );
    let queues: Vec<&str> = run.attempts.iter().map(|(_, q, _)| q.as_str()).collect();
    assert_eq!(queues, ["cpu", "gpu", "gpu"]);
}

// --- the model ----------------------------------------------------------------------

#[tokio::test]
async fn run_inference_classifies_sentiment_and_heartbeats() {
    let models = models();
    let embeds = Arc::new(embedding_batcher(models.clone()));
    for (text, expected) in [
        ("I absolutely love this, it is wonderful", "positive"),
        ("this is awful, I hate it and want a refund", "negative"),
    ] {
        let (ctx, beats) = probe("run_inference");
        let out = run_inference(models.clone(), embeds.clone(), ctx, text.to_string())
            .await
            .unwrap();
        assert_eq!(out.input, text);
        assert_eq!(out.label, expected, "{text:?}: {out:?}");
        assert!(out.score > 0.5 && out.score <= 1.0, "{text:?}: {out:?}");
        assert_eq!(
            *beats.lock().unwrap(),
            [None, None],
            "one heartbeat before and one after"
        );
    }
}

/// Attempts running at once share one forward pass, and each gets what it would have got
/// alone (same label; the score to float rounding: padding is masked out).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_inference_in_a_batch_matches_one_at_a_time() {
    let texts = [
        "I absolutely love this, it is wonderful",
        "this is awful, I hate it and want a refund",
        "ok",
        "the delivery was late but the support team sorted it out quickly and politely",
        "best concert I have been to in years",
        "cheap plastic, it fell apart in a week",
    ];
    let infer_all = move |batching: BatchOptions| async move {
        let models = Arc::new(Models::new(baton_home()).with_batching(batching));
        let embeds = Arc::new(embedding_batcher(models.clone()));
        // Load the model first, so the calls below queue up together.
        let m = models.clone();
        tokio::task::spawn_blocking(move || m.sentiment().map(|_| ()))
            .await
            .unwrap()
            .unwrap();
        let calls: Vec<_> = texts
            .into_iter()
            .map(|text| {
                let (models, embeds) = (models.clone(), embeds.clone());
                tokio::spawn(async move {
                    let (ctx, _) = probe("run_inference");
                    run_inference(models, embeds, ctx, text.to_string()).await
                })
            })
            .collect();
        let mut out = Vec::new();
        for c in calls {
            out.push(c.await.unwrap().unwrap());
        }
        (out, embeds.stats())
    };
    let (alone, one_stats) = infer_all(BatchOptions {
        max_batch: 1,
        max_wait: Duration::ZERO,
    })
    .await;
    assert_eq!(one_stats.largest, 1);
    let (batched, stats) = infer_all(BatchOptions {
        max_batch: texts.len(),
        max_wait: Duration::from_secs(2),
    })
    .await;
    assert_eq!(
        (stats.batches, stats.largest),
        (1, texts.len()),
        "one forward pass for all: {stats:?}"
    );
    for ((a, b), text) in alone.iter().zip(&batched).zip(texts) {
        assert_eq!(b.input, text);
        assert_eq!(a.label, b.label, "{text:?}: {a:?} vs {b:?}");
        assert!((a.score - b.score).abs() < 1e-3, "{text:?}: {a:?} vs {b:?}");
    }
}

#[tokio::test]
async fn compute_embeddings_embeds_in_chunks_with_progress() {
    let models = models();
    let texts: Vec<String> = (0..70)
        .map(|i| format!("document number {i} about topic {}", i % 7))
        .collect();
    let (ctx, beats) = probe("compute_embeddings");
    let out = compute_embeddings(models.clone(), ctx, texts.clone())
        .await
        .unwrap();
    assert_eq!(
        (out.model.as_str(), out.dim, out.embeddings.len()),
        (MODEL_NAME, 384, 70)
    );
    for v in &out.embeddings {
        assert_eq!(v.len(), 384);
        let norm = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-3, "{norm}");
    }
    let progress: Vec<serde_json::Value> = beats
        .lock()
        .unwrap()
        .iter()
        .map(|b| b.clone().unwrap())
        .collect();
    assert_eq!(
        progress,
        [0, 32, 64, 70].map(|done| json!({"done": done, "total": 70})),
        "progress after each chunk of {EMBED_CHUNK}"
    );
    // The same vectors as one direct call, in order.
    let embedder = models.embedder().unwrap();
    let tail = texts[60..].to_vec();
    let direct = tokio::task::spawn_blocking(move || {
        let refs: Vec<&str> = tail.iter().map(String::as_str).collect();
        embedder.embed(&refs).unwrap()
    })
    .await
    .unwrap();
    for (a, b) in out.embeddings[60..].iter().zip(&direct) {
        assert!(baton_gpu_kernels::cosine(a, b) > 0.9999);
    }

    let (ctx, _) = probe("compute_embeddings");
    let empty = compute_embeddings(models, ctx, Vec::new()).await.unwrap();
    assert_eq!((empty.dim, empty.embeddings.len()), (384, 0));
}

#[tokio::test]
async fn prepare_and_infer_runs_end_to_end_in_process() {
    let r = factory(models()).unwrap();
    let run = drive(
        &r,
        PREPARE_AND_INFER,
        json!({"text": "  The support team was GREAT and   fixed it fast!  "}),
    )
    .await;
    let out = run.outcome.clone().unwrap();
    assert_eq!(
        out["input"],
        "the support team was great and fixed it fast!"
    );
    assert_eq!(out["label"], "positive", "{out}");
    assert_eq!(
        run.activities(),
        ["validate_input", "preprocess", "run_inference"]
    );
    let queues: Vec<&str> = run.attempts.iter().map(|(_, q, _)| q.as_str()).collect();
    assert_eq!(queues, ["cpu", "cpu", "gpu"]);
}

#[tokio::test]
async fn batch_embed_aligns_embeddings_with_the_kept_texts() {
    let r = factory(models()).unwrap();
    let texts = json!([
        "A happy dog",
        "",
        "a  JOYFUL puppy",
        "   ",
        "quarterly tax filing deadline"
    ]);
    let run = drive(&r, BATCH_EMBED, json!({ "texts": texts })).await;
    let out: BatchOutput = serde_json::from_value(run.outcome.unwrap()).unwrap();
    assert_eq!((out.model.as_str(), out.dim), (MODEL_NAME, 384));
    assert_eq!(out.dropped, [1, 3]);
    assert_eq!(out.embeddings.len(), 3);
    let cos =
        |a: usize, b: usize| baton_gpu_kernels::cosine(&out.embeddings[a], &out.embeddings[b]);
    assert!(
        cos(0, 1) > cos(0, 2) + 0.2,
        "dog/puppy {} vs dog/tax {}",
        cos(0, 1),
        cos(0, 2)
    );
}

/// A small hand-made set beyond the two required sentences: the classifier must get most
/// of it right (zero-shot, so not necessarily all).
#[tokio::test]
async fn the_sentiment_classifier_is_mostly_right_on_unseen_sentences() {
    let models = models();
    let cases = [
        (
            "the hotel room was spotless and the view was breathtaking",
            "positive",
        ),
        (
            "my package never arrived and nobody answers the phone",
            "negative",
        ),
        ("thank you so much, this made my day", "positive"),
        ("the app keeps crashing, it is useless", "negative"),
        ("best concert I have been to in years", "positive"),
        (
            "the waiter ignored us for an hour and the soup was cold",
            "negative",
        ),
        ("super comfortable shoes, I wear them every day", "positive"),
        ("cheap plastic, it fell apart in a week", "negative"),
        ("the tutorial was clear and easy to follow", "positive"),
        ("I was charged twice and they refused to fix it", "negative"),
    ];
    let embeds = Arc::new(embedding_batcher(models.clone()));
    let mut wrong = Vec::new();
    for (text, expected) in cases {
        let (ctx, _) = probe("run_inference");
        let out = run_inference(models.clone(), embeds.clone(), ctx, text.to_string())
            .await
            .unwrap();
        eprintln!("{:>8} {:.3} {text}", out.label, out.score);
        if out.label != expected {
            wrong.push((text, out.label, out.score));
        }
    }
    assert!(wrong.len() <= 1, "misclassified: {wrong:?}");
}
