//! `baton demo`: starts `baton dev` in-process and runs the Mini AI Pipeline through the
//! edge, as any client would, printing what a user wants to see.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use baton_transport::wire::{ResultReply, StartStatus};

use crate::{Dev, DevArgs, baton_home, client::EdgeClient};

/// Runs the demo.
pub async fn run(args: &DevArgs) -> anyhow::Result<()> {
    let mut args = args.clone();
    if args.data_dir.is_none() {
        let dir = baton_home().join("demo-data");
        let _ = std::fs::remove_dir_all(&dir);
        args.data_dir = Some(dir);
    }
    let t0 = Instant::now();
    let dev = Dev::start(&args).await?;
    println!(
        "baton dev up in {:.1} s (NATS {}, journal in {})",
        t0.elapsed().as_secs_f64(),
        dev.url,
        args.data_dir
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default()
    );
    let mut result = pipeline(&dev.url).await;
    if result.is_ok() {
        result = ml_pipelines(&dev.url).await;
    }
    if result.is_ok() && args.latency_runs > 0 {
        result = latency(&dev.url, args.latency_runs).await;
    }
    dev.stop().await;
    result
}

/// The other ML pipelines: document ingestion and search, fine-tuning with progress,
/// evaluation against the zero-shot baseline, and inference with the fine-tuned head.
async fn ml_pipelines(url: &str) -> anyhow::Result<()> {
    let c = EdgeClient::connect(url).await?;
    let err = |e: baton_transport::wire::ApiError| anyhow::anyhow!("{:?}: {}", e.code, e.message);
    let cwd = std::env::current_dir()?;

    println!("\n== document_ingest: read, chunk (cpu) -> embed (gpu) -> index (index queue)");
    let docs: Vec<serde_json::Value> = ["README.md", "ARCHITECTURE.md", "PROTOCOL.md"]
        .iter()
        .map(|f| cwd.join(f))
        .filter(|p| p.exists())
        .map(|p| serde_json::json!({"path": p.display().to_string()}))
        .collect();
    if docs.is_empty() {
        println!("  (run from the repository root to ingest its documents)");
    } else {
        for round in ["first ingest", "re-ingest (idempotent)"] {
            let id = format!("demo-ingest-{}", uuid::Uuid::new_v4().simple());
            let out = run_workflow(
                &c,
                "document_ingest",
                &id,
                serde_json::json!({ "documents": docs }),
            )
            .await?;
            println!(
                "    {round}: {} documents, {} chunks, {} indexed, {} unchanged",
                out["documents"], out["chunks"], out["chunks_indexed"], out["unchanged_documents"]
            );
        }
        let query = "what happens when the orchestrator is killed mid-workflow?";
        let reply = c
            .request::<_, serde_json::Value>(
                "baton.api.search".into(),
                &serde_json::json!({"query": query, "k": 3}),
                Duration::from_secs(30),
            )
            .await?
            .map_err(err)?;
        println!("    baton search {query:?} --k 3");
        for h in reply["hits"].as_array().into_iter().flatten() {
            let text: String = h["text"].as_str().unwrap_or("").chars().take(110).collect();
            let source = h["source"]
                .as_str()
                .unwrap_or("")
                .rsplit('/')
                .next()
                .unwrap_or("")
                .to_string();
            println!(
                "      {:.3}  {source} #{}  {text}...",
                h["score"].as_f64().unwrap_or(0.0),
                h["ordinal"]
            );
        }
    }

    println!(
        "\n== fine_tune: validate (cpu) -> embed (gpu) -> train head (gpu, heartbeats with checkpoints) -> evaluate -> register"
    );
    let id = format!("demo-finetune-{}", uuid::Uuid::new_v4().simple());
    let t = Instant::now();
    let started = c
        .start(
            "fine_tune",
            Some(id.clone()),
            serde_json::json!({"dataset": "builtin:sentiment/train", "epochs": 400}),
        )
        .await?
        .map_err(err)?;
    let js = async_nats::jetstream::new(c.nats().clone());
    let kv = js
        .get_key_value(baton_transport::jetstream::HEARTBEATS_BUCKET)
        .await?;
    let mut last_epoch = None;
    let out = loop {
        match c
            .result(&id, Duration::from_millis(500))
            .await?
            .map_err(err)?
        {
            ResultReply::Running => {
                let d = c
                    .api("describe", serde_json::json!({"workflow_id": id}))
                    .await?
                    .map_err(err)?;
                for p in d["pending_activities"].as_array().into_iter().flatten() {
                    if p["activity"] != "train_head" {
                        continue;
                    }
                    let key = format!("{}.{}", started.run_id, p["seq"]);
                    if let Ok(Some(bytes)) = kv.get(key).await {
                        let progress: serde_json::Value =
                            baton_transport::codec::decode(&bytes).unwrap_or_default();
                        if progress["epoch"] != serde_json::Value::Null
                            && last_epoch.as_ref() != Some(&progress["epoch"])
                        {
                            println!(
                                "    training: epoch {} of {}, loss {:.4}",
                                progress["epoch"],
                                progress["epochs"],
                                progress["loss"].as_f64().unwrap_or(0.0)
                            );
                            last_epoch = Some(progress["epoch"].clone());
                        }
                    }
                }
            }
            ResultReply::Completed { output } => break output,
            ResultReply::Failed { error } => bail!("{id}: {error}"),
        }
    };
    println!(
        "    registered {} in {:.1} s; holdout accuracy {:.3} (zero-shot {:.3}), macro-F1 {:.3} (zero-shot {:.3})",
        out["name"].as_str().unwrap_or("?"),
        t.elapsed().as_secs_f64(),
        out["metrics"]["accuracy"].as_f64().unwrap_or(0.0),
        out["zero_shot_metrics"]["accuracy"].as_f64().unwrap_or(0.0),
        out["metrics"]["macro_f1"].as_f64().unwrap_or(0.0),
        out["zero_shot_metrics"]["macro_f1"].as_f64().unwrap_or(0.0),
    );

    println!("\n== eval: the shipped test split, latest version vs the zero-shot baseline");
    let id = format!("demo-eval-{}", uuid::Uuid::new_v4().simple());
    let out = run_workflow(&c, "eval", &id, serde_json::json!({"dataset": "builtin:sentiment/test", "version": "latest", "baseline": "zero-shot"})).await?;
    for (name, m) in [
        (&out["version"], &out["metrics"]),
        (&out["baseline"], &out["baseline_metrics"]),
    ] {
        let per_class: Vec<String> = m["per_class"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|k| {
                format!(
                    "{} F1 {:.3}",
                    k["label"].as_str().unwrap_or("?"),
                    k["f1"].as_f64().unwrap_or(0.0)
                )
            })
            .collect();
        println!(
            "    {:<14} accuracy {:.3}  macro-F1 {:.3}  ({})  on {} rows",
            name.as_str().unwrap_or("?"),
            m["accuracy"].as_f64().unwrap_or(0.0),
            m["macro_f1"].as_f64().unwrap_or(0.0),
            per_class.join(", "),
            m["rows"]
        );
    }
    println!(
        "    delta: accuracy {:+.3}, macro-F1 {:+.3}",
        out["delta"]["accuracy"].as_f64().unwrap_or(0.0),
        out["delta"]["macro_f1"].as_f64().unwrap_or(0.0)
    );

    println!("\n== prepare_and_infer with the fine-tuned head");
    for text in [
        "Not bad at all, I would order again.",
        "I wanted to love it, but it broke in a week.",
    ] {
        let id = format!("demo-tuned-{}", uuid::Uuid::new_v4().simple());
        let out = run_workflow(
            &c,
            "prepare_and_infer",
            &id,
            serde_json::json!({ "text": text }),
        )
        .await?;
        println!(
            "    {text:?} -> {} ({:.3}, model {})",
            out["label"],
            out["score"].as_f64().unwrap_or(0.0),
            out["model"]
        );
    }
    Ok(())
}

/// Sequential end-to-end latency of each workflow through `baton dev`: start request to
/// result, as a client sees it.
async fn latency(url: &str, runs: usize) -> anyhow::Result<()> {
    let c = EdgeClient::connect(url).await?;
    println!(
        "\n== end-to-end latency through baton dev, {runs} sequential runs each (start -> result)"
    );
    let cases = [
        (
            "prepare_and_infer",
            serde_json::json!({"text": "The staff were friendly and the room was spotless."}),
        ),
        (
            "batch_embed",
            serde_json::json!({"texts": ["first document", "second document", "third document"]}),
        ),
    ];
    for (workflow, input) in cases {
        let mut ms = Vec::with_capacity(runs);
        for _ in 0..runs {
            let id = format!("latency-{}", uuid::Uuid::new_v4().simple());
            let t = Instant::now();
            c.start(workflow, Some(id.clone()), input.clone())
                .await?
                .map_err(|e| anyhow::anyhow!("{}", e.message))?;
            match c
                .wait_result(&id)
                .await?
                .map_err(|e| anyhow::anyhow!("{}", e.message))?
            {
                ResultReply::Completed { .. } => ms.push(t.elapsed().as_secs_f64() * 1e3),
                other => bail!("{id}: {other:?}"),
            }
        }
        ms.sort_by(f64::total_cmp);
        let pct = |p: f64| ms[((ms.len() - 1) as f64 * p).round() as usize];
        println!(
            "  {workflow:<18} median {:.1} ms   p90 {:.1} ms   min {:.1} ms   max {:.1} ms",
            pct(0.5),
            pct(0.9),
            ms[0],
            ms[ms.len() - 1]
        );
    }
    Ok(())
}

async fn run_workflow(
    c: &EdgeClient,
    workflow: &str,
    id: &str,
    input: serde_json::Value,
) -> anyhow::Result<serde_json::Value> {
    let t = Instant::now();
    let started = c
        .start(workflow, Some(id.into()), input)
        .await?
        .map_err(|e| anyhow::anyhow!("{:?}: {}", e.code, e.message))?;
    if started.status != StartStatus::Started {
        bail!("{id}: expected a new run, got {:?}", started.status);
    }
    match c
        .wait_result(id)
        .await?
        .map_err(|e| anyhow::anyhow!("{:?}: {}", e.code, e.message))?
    {
        ResultReply::Completed { output } => {
            println!(
                "  {workflow} {id}: completed in {:.0} ms",
                t.elapsed().as_secs_f64() * 1e3
            );
            Ok(output)
        }
        other => bail!("{id}: {other:?}"),
    }
}

async fn pipeline(url: &str) -> anyhow::Result<()> {
    let c = EdgeClient::connect(url).await?;

    println!(
        "\n== prepare_and_infer: validate_input, preprocess (cpu) -> run_inference (gpu queue)"
    );
    let texts = [
        "  Hello world, this is a test input!  ",
        "I absolutely love this product, it works   wonderfully.",
        "The service was slow and the food was AWFUL.",
    ];
    let mut first_id = String::new();
    for (i, text) in texts.iter().enumerate() {
        let id = format!("demo-infer-{i}-{}", uuid::Uuid::new_v4().simple());
        if i == 0 {
            first_id = id.clone();
        }
        let out = run_workflow(
            &c,
            "prepare_and_infer",
            &id,
            serde_json::json!({ "text": text }),
        )
        .await?;
        println!(
            "    input {text:?}\n    -> {}",
            serde_json::to_string(&out)?
        );
    }

    println!("\n== batch_embed: preprocess_batch (cpu) -> compute_embeddings (gpu queue)");
    let docs = [
        "first document",
        "second document",
        "  Third   DOCUMENT ",
        "a cat sat on the mat",
    ];
    let id = format!("demo-embed-{}", uuid::Uuid::new_v4().simple());
    let out = run_workflow(&c, "batch_embed", &id, serde_json::json!({ "texts": docs })).await?;
    let embeddings: Vec<Vec<f32>> =
        serde_json::from_value(out["embeddings"].clone()).context("embeddings")?;
    println!(
        "    model {}, {} vectors of {} dims",
        out["model"],
        embeddings.len(),
        out["dim"]
    );
    for (doc, e) in docs.iter().zip(&embeddings) {
        let norm: f32 = e.iter().map(|x| x * x).sum::<f32>().sqrt();
        println!(
            "    {doc:<24} |v| = {norm:.4}  v[..4] = {:?}",
            &e[..4.min(e.len())]
        );
    }
    println!("    cosine similarities:");
    for (i, a) in embeddings.iter().enumerate() {
        let row: Vec<String> = embeddings
            .iter()
            .map(|b| format!("{:.3}", baton_gpu_kernels::cosine(a, b)))
            .collect();
        println!("      {:<24} {}", docs[i], row.join("  "));
    }

    println!("\n== the journal of {first_id} (baton history {first_id})");
    let h = c
        .history(&first_id)
        .await?
        .map_err(|e| anyhow::anyhow!("{}", e.message))?;
    for e in h["events"].as_array().into_iter().flatten() {
        let detail = match e["type"].as_str().unwrap_or("") {
            "activity_scheduled" => format!("seq {} {} on {}", e["seq"], e["activity"], e["queue"]),
            "activity_completed" => format!(
                "seq {} attempt {} by {}",
                e["seq"], e["attempt"], e["worker"]
            ),
            "workflow_completed" => format!("output {}", e["output"]),
            _ => String::new(),
        };
        println!(
            "    {:>2} {:<20} {detail}",
            e["event_id"],
            e["type"].as_str().unwrap_or("")
        );
    }
    Ok(())
}
