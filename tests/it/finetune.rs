//! Fine-tuning and evaluation end to end through real processes: `fine_tune` on the shipped
//! sentiment split registers a version that beats the zero-shot prototypes on the shipped
//! test split (`eval`) and that `prepare_and_infer` then uses; a GPU worker SIGKILLed mid
//! training is replaced and training resumes from its last checkpoint; a malformed dataset
//! fails validation once, naming the line; concurrent registrations get distinct versions.
//!
//! The cluster's `baton worker`s attach the JetStream model store
//! (`Models::attach_jetstream`) after connecting to NATS.

use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use baton_tests::{BatonProcess, workspace_root};
use baton_transport::wire::ResultReply;
use serde_json::{Value, json};

use crate::cluster::{Cluster, events, of_type, worker_args};

/// Training runs in debug builds on 2 shared cores, next to other tests' clusters.
const LONG_WAIT: Duration = Duration::from_secs(600);

fn dataset(name: &str) -> String {
    workspace_root()
        .join("orchestrator/data/sentiment")
        .join(name)
        .display()
        .to_string()
}

fn completed(r: ResultReply) -> Value {
    match r {
        ResultReply::Completed { output } => output,
        other => panic!("expected completed, got {other:?}"),
    }
}

async fn run(c: &Cluster, workflow: &str, id: &str, input: Value) -> Result<ResultReply> {
    c.client
        .start(workflow, Some(id), input)
        .await?
        .into_result()
        .map_err(|e| anyhow::anyhow!("{workflow} refused: {e:?}"))?;
    c.client.wait_result(id, LONG_WAIT).await
}

fn figures(m: &Value) -> String {
    format!(
        "accuracy {:.4}, macro-F1 {:.4}",
        m["accuracy"].as_f64().unwrap_or(f64::NAN),
        m["macro_f1"].as_f64().unwrap_or(f64::NAN)
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fine_tuned_head_beats_zero_shot_and_serves_inference() -> Result<()> {
    let c = Cluster::start().await?;

    // Before any fine-tuning: the prototypes.
    let before = completed(
        run(
            &c,
            "prepare_and_infer",
            "infer-before",
            json!({"text": "The staff were lovely and the room was spotless."}),
        )
        .await?,
    );
    assert_eq!(before["model"], "zero-shot", "{before}");

    let out = completed(
        run(
            &c,
            "fine_tune",
            "ft-1",
            json!({"dataset": dataset("train.jsonl"), "epochs": 300}),
        )
        .await?,
    );
    assert_eq!(
        (&out["model"], &out["version"], &out["name"]),
        (&json!("sentiment"), &json!(1), &json!("sentiment.v1")),
        "{out}"
    );
    assert_eq!(out["labels"], json!(["negative", "positive"]));
    assert_eq!(
        (&out["train_rows"], &out["holdout_rows"], &out["epochs"]),
        (&json!(192), &json!(48), &json!(300))
    );
    assert_eq!(out["dataset_sha256"].as_str().unwrap().len(), 64);
    assert_eq!(out["resumed_from_epoch"], Value::Null);
    assert_eq!(out["metrics"]["rows"], 48);
    assert_eq!(out["zero_shot_metrics"]["rows"], 48);
    eprintln!(
        "fine_tune holdout (48 rows): fine-tuned {}; zero-shot {}",
        figures(&out["metrics"]),
        figures(&out["zero_shot_metrics"])
    );
    let evs = events(&c.client, "ft-1").await?;
    let steps: Vec<(&str, &str)> = of_type(&evs, "activity_scheduled")
        .iter()
        .map(|e| {
            (
                e["activity"].as_str().unwrap(),
                e["queue"].as_str().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        steps,
        [
            ("validate_dataset", "cpu"),
            ("embed_texts", "gpu"),
            ("train_head", "gpu"),
            ("evaluate_head", "cpu"),
            ("register_model", "cpu"),
        ]
    );

    // The shipped test split: the new version against the prototypes.
    let e = completed(
        run(
            &c,
            "eval",
            "eval-1",
            json!({"dataset": dataset("test.jsonl"), "version": "latest", "baseline": "zero-shot"}),
        )
        .await?,
    );
    eprintln!(
        "eval on the shipped test split (80 rows): sentiment.v1 {}; zero-shot {}; delta accuracy {:+.4}, macro-F1 {:+.4}",
        figures(&e["metrics"]),
        figures(&e["baseline_metrics"]),
        e["delta"]["accuracy"].as_f64().unwrap(),
        e["delta"]["macro_f1"].as_f64().unwrap()
    );
    assert_eq!(
        (&e["version"], &e["baseline"]),
        (&json!("sentiment.v1"), &json!("zero-shot"))
    );
    assert_eq!(e["metrics"]["rows"], 80);
    assert_eq!(e["metrics"]["per_class"].as_array().unwrap().len(), 2);
    assert!(
        e["delta"]["accuracy"].as_f64().unwrap() > 0.0
            && e["delta"]["macro_f1"].as_f64().unwrap() > 0.0,
        "the fine-tuned head must beat the prototypes: {e}"
    );
    // The same comparison by number, the other way round: the opposite delta.
    let back = completed(
        run(
            &c,
            "eval",
            "eval-2",
            json!({"dataset": dataset("test.jsonl"), "version": "zero-shot", "baseline": 1}),
        )
        .await?,
    );
    assert_eq!(back["baseline"], "sentiment.v1");
    assert!(
        (back["delta"]["accuracy"].as_f64().unwrap() + e["delta"]["accuracy"].as_f64().unwrap())
            .abs()
            < 1e-9
    );

    // Inference now classifies with the registered head.
    let after = completed(
        run(
            &c,
            "prepare_and_infer",
            "infer-after",
            json!({"text": "The staff were lovely and the room was spotless."}),
        )
        .await?,
    );
    assert_eq!(after["model"], "sentiment.v1", "{after}");
    assert_eq!(after["label"], "positive", "{after}");

    // An unknown version is a validation error of the evaluation step.
    match run(
        &c,
        "eval",
        "eval-missing",
        json!({"dataset": dataset("test.jsonl"), "version": 9}),
    )
    .await?
    {
        ResultReply::Failed { error } => {
            assert_eq!(error["kind"], "ValidationError", "{error}");
            assert_eq!(error["message"], "sentiment.v9 is not registered");
        }
        other => panic!("expected failed, got {other:?}"),
    }
    Ok(())
}

/// `checkpoint stored epoch=E` lines of a log, in order.
fn checkpoint_epochs(log: &str) -> Vec<u32> {
    epochs_after(log, "checkpoint stored epoch=")
}

fn epochs_after(log: &str, pattern: &str) -> Vec<u32> {
    log.lines()
        .filter_map(|l| {
            let rest = &l[l.find(pattern)? + pattern.len()..];
            let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
            digits.parse().ok()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_gpu_worker_killed_mid_training_is_resumed_from_its_last_checkpoint() -> Result<()> {
    let mut c = Cluster::start().await?;
    c.client
        .start(
            "fine_tune",
            Some("ft-resume"),
            json!({"dataset": dataset("train.jsonl"), "epochs": 3000, "checkpoint_every": 10}),
        )
        .await?
        .into_result()
        .unwrap();
    c.gpu
        .wait_for_log("activity started activity=train_head", LONG_WAIT)
        .await?;
    // Two checkpoints at epoch 20 or later: the heartbeat naming the first of them was
    // stored at least 200 ms before the second was taken.
    let deadline = Instant::now() + LONG_WAIT;
    loop {
        let late = checkpoint_epochs(&c.gpu.log_contents())
            .into_iter()
            .filter(|&e| e >= 20)
            .count();
        if late >= 2 {
            break;
        }
        if c.gpu.log_contents().contains("training done") || Instant::now() > deadline {
            bail!(
                "training ended or stalled before two checkpoints at epoch >= 20: {:?}",
                checkpoint_epochs(&c.gpu.log_contents())
            );
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    c.gpu.kill();
    let killed_at = checkpoint_epochs(&c.gpu.log_contents());
    let last_before_kill = *killed_at.last().unwrap();

    let mut second = BatonProcess::spawn(worker_args(&c.nats, "gpu", 1))?;
    second
        .wait_for_log("resuming training from checkpoint", LONG_WAIT)
        .await?;
    let resumed = epochs_after(
        &second.log_contents(),
        "resuming training from checkpoint epoch=",
    );
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    let resumed = resumed[0];
    assert!(
        (20..=last_before_kill).contains(&resumed) && killed_at.contains(&resumed),
        "resumed from epoch {resumed}; the first worker stored {killed_at:?}"
    );

    eprintln!(
        "first gpu worker stored checkpoints {killed_at:?} before SIGKILL; the second resumed from epoch {resumed}"
    );
    let out = completed(c.client.wait_result("ft-resume", LONG_WAIT).await?);
    assert_eq!(out["resumed_from_epoch"], resumed, "{out}");
    assert_eq!(out["epochs"], 3000);
    assert_eq!(out["version"], 1);
    // The second worker went on from the checkpoint, never from epoch 0.
    let second_checkpoints = checkpoint_epochs(&second.log_contents());
    assert!(
        second_checkpoints.iter().all(|&e| e > resumed),
        "{second_checkpoints:?}"
    );
    let evs = events(&c.client, "ft-resume").await?;
    let train: Vec<&Value> = of_type(&evs, "activity_completed")
        .into_iter()
        .filter(|e| e["seq"] == 2)
        .collect();
    assert_eq!(train.len(), 1, "train_head recorded once");
    let worker = train[0]["worker"].as_str().unwrap();
    assert!(
        worker.ends_with(&format!("-{}", second.pid())),
        "train_head completed by {worker}, the second worker is pid {}",
        second.pid()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_malformed_dataset_fails_validation_once_naming_the_line_and_versions_never_collide()
-> Result<()> {
    let c = Cluster::start().await?;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("bad.jsonl");
    std::fs::write(
        &path,
        "{\"text\": \"great\", \"label\": \"positive\"}\n{\"text\": \"awful\", \"label\": \"negative\"}\n{\"text\": \"no label here\"}\n",
    )?;
    // The workers run on this machine, so they read the same file.
    match run(
        &c,
        "fine_tune",
        "ft-bad",
        json!({"dataset": path.display().to_string()}),
    )
    .await?
    {
        ResultReply::Failed { error } => {
            assert_eq!(error["kind"], "ValidationError", "{error}");
            assert_eq!(error["message"], "line 3: missing field `label`", "{error}");
        }
        other => panic!("expected failed, got {other:?}"),
    }
    let evs = events(&c.client, "ft-bad").await?;
    let scheduled = of_type(&evs, "activity_scheduled");
    assert_eq!(scheduled.len(), 1, "{evs:#?}");
    assert_eq!(scheduled[0]["activity"], "validate_dataset");
    let failed = of_type(&evs, "activity_failed");
    assert_eq!(failed.len(), 1, "one attempt: {evs:#?}");
    assert_eq!(failed[0]["attempt"], 1);
    assert_eq!(
        c.cpu
            .count_in_log("activity started activity=validate_dataset"),
        1
    );

    // Inline rows are numbered as rows; out-of-range parameters are refused at the edge.
    match run(
        &c,
        "fine_tune",
        "ft-bad-rows",
        json!({"rows": [{"text": "fine", "label": "positive"}, {"text": " ", "label": "negative"}]}),
    )
    .await?
    {
        ResultReply::Failed { error } => {
            assert_eq!(error["message"], "row 2: text is empty", "{error}")
        }
        other => panic!("expected failed, got {other:?}"),
    }
    let refused = c
        .client
        .start(
            "fine_tune",
            Some("ft-bad-epochs"),
            json!({"dataset": "x.jsonl", "epochs": 0}),
        )
        .await?;
    match refused.into_result() {
        Err(e) => assert!(e.message.contains("epochs is 0"), "{}", e.message),
        Ok(r) => panic!("accepted: {r:?}"),
    }

    // Two fine-tunes of one model at once (the builtin test split, few epochs): two
    // distinct version numbers, and `latest` names the higher.
    for id in ["race-a", "race-b"] {
        c.client
            .start(
                "fine_tune",
                Some(id),
                json!({"dataset": "builtin:sentiment/test", "model": "race", "epochs": 20}),
            )
            .await?
            .into_result()
            .unwrap();
    }
    let mut versions = Vec::new();
    for id in ["race-a", "race-b"] {
        let out = completed(c.client.wait_result(id, LONG_WAIT).await?);
        assert_eq!(out["model"], "race");
        versions.push(out["version"].as_u64().unwrap());
    }
    versions.sort_unstable();
    assert_eq!(versions, [1, 2]);
    let latest = completed(
        run(
            &c,
            "eval",
            "race-eval",
            json!({"dataset": "builtin:sentiment/test", "model": "race", "baseline": 1}),
        )
        .await?,
    );
    assert_eq!(
        (&latest["version"], &latest["baseline"]),
        (&json!("race.v2"), &json!("race.v1"))
    );
    Ok(())
}
