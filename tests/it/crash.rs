//! Processes killed with SIGKILL mid-workflow: every acknowledged workflow completes with
//! the right result, and activities that had completed are not executed again.

use std::time::Duration;

use baton_tests::{BatonProcess, free_port};
use baton_transport::wire::ResultReply;
use serde_json::json;

use crate::cluster::{Cluster, WAIT, events, long_texts, of_type, worker_args};

fn embeddings(r: ResultReply) -> Vec<Vec<f32>> {
    match r {
        ResultReply::Completed { output } => {
            serde_json::from_value(output["embeddings"].clone()).unwrap()
        }
        other => panic!("expected completed, got {other:?}"),
    }
}

fn assert_unit_vectors(vs: &[Vec<f32>], n: usize) {
    assert_eq!(vs.len(), n);
    for v in vs {
        assert_eq!(v.len(), 384);
        let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((norm - 1.0).abs() < 1e-4);
    }
}

/// Each activity of the run was completed exactly once, and scheduled once.
fn assert_each_activity_recorded_once(evs: &[serde_json::Value], activities: usize) {
    let scheduled = of_type(evs, "activity_scheduled");
    let completed = of_type(evs, "activity_completed");
    assert_eq!(scheduled.len(), activities, "{evs:#?}");
    assert_eq!(completed.len(), activities, "{evs:#?}");
    for seq in 0..activities as u64 {
        assert_eq!(
            completed.iter().filter(|e| e["seq"] == seq).count(),
            1,
            "seq {seq} recorded once"
        );
    }
    assert_eq!(of_type(evs, "workflow_completed").len(), 1);
}

#[tokio::test(flavor = "multi_thread")]
async fn orchestrator_killed_mid_workflow_resumes_without_rerunning_activities()
-> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    let texts = long_texts(60);
    c.client
        .start("batch_embed", Some("orch-crash"), json!({ "texts": texts }))
        .await?
        .into_result()
        .unwrap();
    // preprocess_batch is done and compute_embeddings is running on the GPU worker.
    c.gpu
        .wait_for_log("activity started activity=compute_embeddings", WAIT)
        .await?;
    c.orchestrator.kill();
    // The GPU worker finishes while the orchestrator is down; its report waits in JetStream.
    c.gpu
        .wait_for_log("outcome=\"completed\"", WAIT)
        .await
        .or_else(|_| Ok::<_, anyhow::Error>(()))?;
    c.orchestrator.restart()?;
    c.orchestrator
        .wait_for_log("recovering run workflow_id=orch-crash", WAIT)
        .await?;

    let vs = embeddings(c.client.wait_result("orch-crash", WAIT).await?);
    assert_unit_vectors(&vs, 60);
    assert_each_activity_recorded_once(&events(&c.client, "orch-crash").await?, 2);
    // Nothing ran twice: each activity started once, on its worker.
    assert_eq!(
        c.cpu
            .count_in_log("activity started activity=preprocess_batch"),
        1
    );
    assert_eq!(
        c.gpu
            .count_in_log("activity started activity=compute_embeddings"),
        1
    );

    // The restarted node serves new work.
    c.client
        .start(
            "prepare_and_infer",
            Some("after-restart"),
            json!({"text": "great"}),
        )
        .await?
        .into_result()
        .unwrap();
    assert!(matches!(
        c.client.wait_result("after-restart", WAIT).await?,
        ResultReply::Completed { .. }
    ));
    Ok(())
}

/// The task queue lives in memory (tasks can be regenerated from the journal; reports are
/// requests that workers hold until the orchestrator answers): a nats-server SIGKILLed
/// mid-activity comes back without it. The nodes recreate it, the orchestrator republishes
/// the in-flight task, and the run completes with each activity recorded once.
#[tokio::test(flavor = "multi_thread")]
async fn nats_server_killed_mid_activity_loses_no_run() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.client
        .start(
            "batch_embed",
            Some("nats-crash"),
            json!({ "texts": long_texts(60) }),
        )
        .await?
        .into_result()
        .unwrap();
    c.gpu
        .wait_for_log("activity started activity=compute_embeddings", WAIT)
        .await?;
    c.nats.restart().await?;
    c.orchestrator
        .wait_for_log("the task queue was recreated", WAIT)
        .await?;

    let vs = embeddings(c.client.wait_result("nats-crash", WAIT).await?);
    assert_unit_vectors(&vs, 60);
    assert_each_activity_recorded_once(&events(&c.client, "nats-crash").await?, 2);
    // The step that had completed before the restart did not run again.
    assert_eq!(
        c.cpu
            .count_in_log("activity started activity=preprocess_batch"),
        1
    );

    // Every node serves new work on the recreated queues.
    c.client
        .start(
            "prepare_and_infer",
            Some("after-nats-restart"),
            json!({"text": "great"}),
        )
        .await?
        .into_result()
        .unwrap();
    assert!(matches!(
        c.client.wait_result("after-nats-restart", WAIT).await?,
        ResultReply::Completed { .. }
    ));
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn worker_killed_mid_activity_is_retried_on_another_worker() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    c.client
        .start(
            "batch_embed",
            Some("worker-crash"),
            json!({ "texts": long_texts(40) }),
        )
        .await?
        .into_result()
        .unwrap();
    c.gpu
        .wait_for_log("activity started activity=compute_embeddings", WAIT)
        .await?;
    c.gpu.kill();
    let mut second = BatonProcess::spawn(worker_args(&c.nats, "gpu", 1))?;
    second
        .wait_for_log("activity started activity=compute_embeddings", WAIT)
        .await?;

    let vs = embeddings(c.client.wait_result("worker-crash", WAIT).await?);
    assert_unit_vectors(&vs, 40);
    let evs = events(&c.client, "worker-crash").await?;
    assert_each_activity_recorded_once(&evs, 2);
    // The result was recorded from the second worker.
    let done = of_type(&evs, "activity_completed");
    let worker = done[1]["worker"].as_str().unwrap();
    assert!(
        worker.ends_with(&format!("-{}", second.pid())),
        "completed by {worker}, second worker is pid {}",
        second.pid()
    );
    assert!(
        second.log_contents().contains("delivered=2"),
        "the task was redelivered"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn baton_dev_killed_and_restarted_completes_acknowledged_workflows() -> anyhow::Result<()> {
    let data = tempfile::Builder::new().prefix("baton-dev-").tempdir()?;
    let port = free_port();
    let args = vec![
        "dev".to_string(),
        "--nats-port".into(),
        port.to_string(),
        "--data-dir".into(),
        data.path().display().to_string(),
    ];
    let mut dev = BatonProcess::spawn(&args)?;
    dev.wait_for_log("baton dev is up", WAIT).await?;
    let client = baton_tests::Client::connect(&format!("nats://127.0.0.1:{port}")).await?;
    client
        .start(
            "batch_embed",
            Some("dev-crash"),
            json!({ "texts": long_texts(40) }),
        )
        .await?
        .into_result()
        .unwrap();
    client
        .start(
            "prepare_and_infer",
            Some("dev-crash-2"),
            json!({ "text": "not bad at all" }),
        )
        .await?
        .into_result()
        .unwrap();
    dev.wait_for_log("activity started activity=compute_embeddings", WAIT)
        .await?;
    dev.kill();
    drop(client);
    // The embedded nats-server dies with its parent (PDEATHSIG); wait for the port.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
        assert!(
            std::time::Instant::now() < deadline,
            "nats-server outlived baton dev"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    dev.restart()?;
    dev.wait_for_log_count("baton dev is up", 2, WAIT).await?;
    let client = baton_tests::Client::connect(&format!("nats://127.0.0.1:{port}")).await?;
    assert_unit_vectors(
        &embeddings(client.wait_result("dev-crash", WAIT).await?),
        40,
    );
    assert!(matches!(
        client.wait_result("dev-crash-2", WAIT).await?,
        ResultReply::Completed { .. }
    ));
    assert_each_activity_recorded_once(&events(&client, "dev-crash").await?, 2);
    Ok(())
}
