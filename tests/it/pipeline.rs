//! The Mini AI Pipeline end to end: both workflows through real processes, with real
//! model output checked against independently computed reference embeddings, and the
//! journal's JetStream mirror checked against redb (I6).

use baton_actors::history::Event;
use baton_transport::wire::{ResultReply, StartStatus};
use serde_json::json;

use crate::cluster::{Cluster, WAIT, events, mirrored_events, of_type};

fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na: f32 = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb: f32 = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    dot / (na * nb)
}

fn completed(r: ResultReply) -> serde_json::Value {
    match r {
        ResultReply::Completed { output } => output,
        other => panic!("expected completed, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn both_workflows_end_to_end() -> anyhow::Result<()> {
    let c = Cluster::start().await?;

    // prepare_and_infer: real zero-shot sentiment with a real score.
    let cases = [
        (
            "pos-1",
            "  I absolutely LOVE this,   it is wonderful!  ",
            "positive",
        ),
        (
            "neg-1",
            "This is awful. I hate it and I want a refund.",
            "negative",
        ),
    ];
    for (id, text, label) in cases {
        let started = c
            .client
            .start("prepare_and_infer", Some(id), json!({ "text": text }))
            .await?
            .into_result()
            .unwrap();
        assert_eq!(started.status, StartStatus::Started);
        let out = completed(c.client.wait_result(id, WAIT).await?);
        assert_eq!(out["label"], label, "{out}");
        let score = out["score"].as_f64().unwrap();
        assert!(score > 0.5 && score <= 1.0, "{out}");
        // validate_input trims; preprocess collapses whitespace and lowercases.
        let expected_input = text
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase();
        assert_eq!(out["input"], expected_input.as_str());
        let evs = events(&c.client, id).await?;
        let types: Vec<&str> = evs.iter().map(|e| e["type"].as_str().unwrap()).collect();
        assert_eq!(
            types,
            [
                "workflow_started",
                "activity_scheduled",
                "activity_completed",
                "activity_scheduled",
                "activity_completed",
                "activity_scheduled",
                "activity_completed",
                "workflow_completed"
            ]
        );
        let queues: Vec<&str> = of_type(&evs, "activity_scheduled")
            .iter()
            .map(|e| e["queue"].as_str().unwrap())
            .collect();
        assert_eq!(
            queues,
            ["cpu", "cpu", "gpu"],
            "validate/preprocess on cpu, inference on gpu"
        );
    }

    // batch_embed: embeddings equal the reference computed in Python (onnxruntime + numpy).
    let fixture: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(
        baton_tests::workspace_root().join("gpu-kernels/tests/fixtures/reference_embeddings.json"),
    )?)?;
    let sentences = fixture["sentences"].as_array().unwrap();
    let mut texts: Vec<String> = sentences
        .iter()
        .map(|s| s["text"].as_str().unwrap().to_string())
        .collect();
    texts.insert(1, "   ".into()); // dropped by preprocess_batch, reported by index
    c.client
        .start("batch_embed", Some("embed-1"), json!({ "texts": texts }))
        .await?
        .into_result()
        .unwrap();
    let out = completed(c.client.wait_result("embed-1", WAIT).await?);
    assert_eq!(out["dim"], 384);
    assert_eq!(out["dropped"], json!([1]));
    let got: Vec<Vec<f32>> = serde_json::from_value(out["embeddings"].clone())?;
    assert_eq!(got.len(), sentences.len());
    for (s, v) in sentences.iter().zip(&got) {
        let reference: Vec<f32> = serde_json::from_value(s["embedding"].clone())?;
        assert_eq!(v.len(), 384);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4, "not L2-normalised: {norm}");
        let cos = cosine(v, &reference);
        assert!(
            cos > 0.999,
            "{:?}: cosine {cos} to the reference",
            s["text"]
        );
    }

    // I6: the JetStream mirror holds exactly the journal's events.
    for id in ["pos-1", "neg-1", "embed-1"] {
        let h = c.client.history(id).await?;
        let run_id = h["run_id"].as_str().unwrap();
        let mirrored: Vec<serde_json::Value> = mirrored_events(c.client.nats(), run_id)
            .await?
            .iter()
            .map(Event::to_json)
            .collect();
        assert_eq!(
            &mirrored,
            h["events"].as_array().unwrap(),
            "mirror of {id} differs from redb"
        );
    }

    // describe and list.
    let d = c.client.describe("embed-1").await?;
    assert_eq!(d["status"], "completed");
    assert_eq!(d["pending_activities"], json!([]));
    let l = c.client.list(Some("completed"), None).await?;
    assert_eq!(l["workflows"].as_array().unwrap().len(), 3);
    Ok(())
}
