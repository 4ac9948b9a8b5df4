//! The per-stage timing events (`baton::stage`) of a real `baton dev`, read back by the
//! analysis `baton-loadgen --stages` prints: every stage of every step is there.

use baton_benches::stages::{analyze, parse_line};
use baton_tests::{BatonProcess, free_port};
use baton_transport::wire::ResultReply;
use serde_json::json;

use crate::cluster::WAIT;

#[tokio::test(flavor = "multi_thread")]
async fn baton_dev_logs_every_stage_of_every_step_when_asked() -> anyhow::Result<()> {
    let data = tempfile::Builder::new().prefix("baton-stages-").tempdir()?;
    let port = free_port();
    let args = [
        "dev".to_string(),
        "--nats-port".into(),
        port.to_string(),
        "--data-dir".into(),
        data.path().display().to_string(),
    ];
    let mut dev = BatonProcess::spawn_with_env(args, &[("RUST_LOG", "info,baton::stage=trace")])?;
    dev.wait_for_log("baton dev is up", WAIT).await?;
    let client = baton_tests::Client::connect(&format!("nats://127.0.0.1:{port}")).await?;
    const RUNS: usize = 3;
    for i in 0..RUNS {
        let id = format!("stages-{i}");
        client
            .start(
                "bench_pipeline",
                Some(&id),
                json!({ "text": format!("Hello {i}") }),
            )
            .await?
            .into_result()
            .unwrap();
        assert!(matches!(
            client.wait_result(&id, WAIT).await?,
            ResultReply::Completed { .. }
        ));
    }
    // The last report's answer may be logged just after the result.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    let events: Vec<_> = dev.log_contents().lines().filter_map(parse_line).collect();
    let stages = analyze(&events, &[(i64::MIN, i64::MAX)]);
    let count = |name: &str, from: usize| {
        stages[from..]
            .iter()
            .find(|s| s.name.trim() == name)
            .map_or(0, |s| s.us.len())
    };
    for activity in ["bench_validate", "bench_preprocess", "bench_infer"] {
        let at = stages
            .iter()
            .position(|s| s.name == format!("step: {activity}"))
            .unwrap_or_else(|| panic!("no steps of {activity}: {stages:?}"));
        for stage in [
            "step",
            "task queue",
            "worker: start",
            "activity",
            "worker: report",
            "report",
            "to the journal",
            "journal",
            "next dispatch",
            "report answered",
        ] {
            let name = if stage == "step" {
                format!("step: {activity}")
            } else {
                stage.to_string()
            };
            assert_eq!(count(&name, at), RUNS, "{activity}: {stage}");
        }
    }
    for stage in [
        "start",
        "start to first dispatch",
        "close to result",
        "workflow",
        "journal starts: mirror",
    ] {
        assert_eq!(count(stage, 0), RUNS, "{stage}");
    }
    // A journal group per append: each step's outcome (with the next step's scheduling).
    assert_eq!(count("journal group: redb", 0), 3 * RUNS);
    Ok(())
}
