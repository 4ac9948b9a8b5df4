//! The edge contract: duplicate starts, and bad input that gets a clear error and crashes
//! nothing.

use baton_tests::json_headers;
use baton_transport::{
    codec::{self, CONTENT_TYPE, MSGPACK},
    wire::{ReportAck, ResultReply, StartStatus},
};
use serde_json::json;

use crate::cluster::{Cluster, WAIT, events, of_type};

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_starts_never_run_twice() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    // Concurrent starts of one ID: exactly one run.
    let starts = (0..8).map(|_| {
        c.client
            .start("prepare_and_infer", Some("dup-1"), json!({"text": "hello"}))
    });
    let replies: Vec<_> = futures::future::join_all(starts)
        .await
        .into_iter()
        .map(|r| r.unwrap().into_result().unwrap())
        .collect();
    assert_eq!(
        replies
            .iter()
            .filter(|r| r.status == StartStatus::Started)
            .count(),
        1,
        "{replies:?}"
    );
    assert!(
        replies.iter().all(|r| r.run_id == replies[0].run_id),
        "all point at one run"
    );
    assert!(matches!(
        c.client.wait_result("dup-1", WAIT).await?,
        ResultReply::Completed { .. }
    ));

    // After completion, and with another input: still the same run.
    let again = c
        .client
        .start("prepare_and_infer", Some("dup-1"), json!({"text": "other"}))
        .await?
        .into_result()
        .unwrap();
    assert_eq!(again.status, StartStatus::Duplicate);
    assert_eq!(again.run_id, replies[0].run_id);
    let evs = events(&c.client, "dup-1").await?;
    assert_eq!(of_type(&evs, "workflow_started").len(), 1);
    assert_eq!(of_type(&evs, "activity_completed").len(), 3, "ran once");
    let listed = c.client.list(None, None).await?;
    assert_eq!(
        listed["workflows"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|w| w["workflow_id"] == "dup-1")
            .count(),
        1
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn id_reuse_and_conflict_policies_at_the_edge() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let start = |id: &'static str,
                 text: &'static str,
                 reuse: &'static str,
                 conflict: &'static str| {
        let body = json!({"workflow_id": id, "input": {"text": text}, "id_reuse_policy": reuse, "id_conflict_policy": conflict});
        c.client.start_raw(
            "baton.start.prepare_and_infer",
            json_headers(),
            serde_json::to_vec(&body).unwrap(),
        )
    };
    // A failed run (empty text) may be retried under allow_duplicate_failed_only.
    let first = start("reuse-1", " ", "reject_duplicate", "use_existing").await?;
    assert_eq!(first["status"], "started", "{first}");
    assert!(matches!(
        c.client.wait_result("reuse-1", WAIT).await?,
        ResultReply::Failed { .. }
    ));
    let again = start(
        "reuse-1",
        "now with text",
        "reject_duplicate",
        "use_existing",
    )
    .await?;
    assert_eq!(
        (again["status"].as_str(), again["run_id"].as_str()),
        (Some("duplicate"), first["run_id"].as_str())
    );
    let retry = start(
        "reuse-1",
        "now with text",
        "allow_duplicate_failed_only",
        "use_existing",
    )
    .await?;
    assert_eq!(retry["status"], "started", "{retry}");
    assert_ne!(retry["run_id"], first["run_id"], "a new run");
    assert!(matches!(
        c.client.wait_result("reuse-1", WAIT).await?,
        ResultReply::Completed { .. }
    ));

    // While a run is running (a batch that takes seconds), a start that asks to fail on
    // conflict is refused, and one that uses the existing run gets it.
    let slow =
        json!({"workflow_id": "conflict-1", "input": {"texts": crate::cluster::long_texts(40)}});
    let running = c
        .client
        .start_raw(
            "baton.start.batch_embed",
            json_headers(),
            serde_json::to_vec(&slow)?,
        )
        .await?;
    assert_eq!(running["status"], "started", "{running}");
    let mut fail = slow.clone();
    fail["id_conflict_policy"] = json!("fail");
    let refused = c
        .client
        .start_raw(
            "baton.start.batch_embed",
            json_headers(),
            serde_json::to_vec(&fail)?,
        )
        .await?;
    assert_eq!(refused["error"]["code"], "already_running", "{refused}");
    let existing = c
        .client
        .start_raw(
            "baton.start.batch_embed",
            json_headers(),
            serde_json::to_vec(&slow)?,
        )
        .await?;
    assert_eq!(
        (existing["status"].as_str(), existing["run_id"].as_str()),
        (Some("duplicate"), running["run_id"].as_str())
    );
    assert!(matches!(
        c.client.wait_result("conflict-1", WAIT).await?,
        ResultReply::Completed { .. }
    ));
    let bad = start("reuse-2", "x", "sometimes", "use_existing").await?;
    assert_eq!(bad["error"]["code"], "bad_request", "{bad}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn bad_input_gets_clear_errors_and_crashes_nothing() -> anyhow::Result<()> {
    let mut c = Cluster::start().await?;
    let code = |v: &serde_json::Value| v["error"]["code"].as_str().unwrap_or("").to_string();

    let r = c
        .client
        .start_raw(
            "baton.start.no_such_workflow",
            json_headers(),
            r#"{"input": 1}"#,
        )
        .await?;
    assert_eq!(code(&r), "unknown_workflow_type", "{r}");
    assert!(
        r["error"]["message"]
            .as_str()
            .unwrap()
            .contains("prepare_and_infer"),
        "lists the registered types: {r}"
    );

    for body in [
        &b"{not json"[..],
        b"",
        b"\xff\xfe\x00",
        br#"{"input": {"text": "x"}, "extra": 1}"#,
    ] {
        let r = c
            .client
            .start_raw(
                "baton.start.prepare_and_infer",
                json_headers(),
                body.to_vec(),
            )
            .await?;
        assert_eq!(code(&r), "bad_request", "{r}");
    }
    let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
    let r = c
        .client
        .start_raw(
            "baton.start.prepare_and_infer",
            json_headers(),
            format!(r#"{{"input": {deep}}}"#),
        )
        .await?;
    assert_eq!(code(&r), "bad_request", "deeply nested JSON: {r}");
    let r = c
        .client
        .start_raw(
            "baton.start.batch_embed",
            json_headers(),
            r#"{"input": {"texts": 5}}"#,
        )
        .await?;
    assert_eq!(code(&r), "bad_request", "input of the wrong shape: {r}");

    for id in ["a.b", "a*", "a>", "with space", "ünïcode", &"x".repeat(256)] {
        let r = c
            .client
            .start("prepare_and_infer", Some(id), json!({"text": "x"}))
            .await?;
        let e = r.into_result().unwrap_err();
        assert_eq!(
            serde_json::to_value(e.code)?,
            "invalid_workflow_id",
            "{id:?}"
        );
    }

    let big = "x".repeat(2 * 1024 * 1024);
    let r = c
        .client
        .start_raw(
            "baton.start.prepare_and_infer",
            json_headers(),
            format!(r#"{{"input": {{"text": "{big}"}}}}"#),
        )
        .await?;
    assert_eq!(code(&r), "payload_too_large", "{r}");

    let mut headers = async_nats::HeaderMap::new();
    headers.insert(CONTENT_TYPE, "text/xml");
    let r = c
        .client
        .start_raw("baton.start.prepare_and_infer", headers, "<x/>")
        .await?;
    assert_eq!(code(&r), "bad_request", "{r}");

    // MessagePack is accepted at the edge and answered in MessagePack.
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(CONTENT_TYPE, MSGPACK);
    let body = codec::encode(&json!({"workflow_id": "mp-1", "input": {"text": "lovely"}}))?;
    let m = c
        .client
        .request_raw(
            "baton.start.prepare_and_infer",
            headers,
            body.into(),
            baton_tests::REQUEST_TIMEOUT,
        )
        .await?;
    let reply: serde_json::Value = codec::decode(&m.payload)?;
    assert_eq!(reply["status"], "started", "{reply}");

    // Poison messages on the subjects Baton consumes: terminated, not redelivered for ever.
    let js = async_nats::jetstream::new(c.client.nats().clone());
    js.publish("baton.task.cpu.poison.0.1", "garbage".into())
        .await?
        .await?;
    // A malformed report is answered settled, with the reason (its sender must not ask
    // again for ever: there is nothing to record).
    let answer = c
        .client
        .nats()
        .request("baton.report.poison", vec![0xc1u8, 0xff].into())
        .await?;
    let answer: ReportAck = codec::decode(&answer.payload)?;
    assert!(answer.settled, "{answer:?}");
    assert!(
        answer
            .error
            .as_deref()
            .is_some_and(|e| e.starts_with("malformed report")),
        "{answer:?}"
    );

    // A validation error is not retried: one attempt, and the workflow fails with it.
    c.client
        .start("prepare_and_infer", Some("empty-1"), json!({"text": "   "}))
        .await?
        .into_result()
        .unwrap();
    match c.client.wait_result("empty-1", WAIT).await? {
        ResultReply::Failed { error } => assert_eq!(error["kind"], "ValidationError", "{error}"),
        other => panic!("expected failed, got {other:?}"),
    }
    let evs = events(&c.client, "empty-1").await?;
    assert_eq!(
        of_type(&evs, "activity_failed").len(),
        1,
        "non-retryable: one attempt"
    );
    assert!(
        of_type(&evs, "activity_scheduled")
            .iter()
            .all(|e| e["queue"] == "cpu"),
        "never reached the gpu queue"
    );

    let r = c.client.result("no-such-id", 0).await;
    let e = r.unwrap_err().to_string();
    assert!(e.contains("NotFound"), "{e}");

    // Everything still serves.
    assert!(matches!(
        c.client.wait_result("mp-1", WAIT).await?,
        ResultReply::Completed { .. }
    ));
    c.client
        .start(
            "prepare_and_infer",
            Some("after-poison"),
            json!({"text": "fine"}),
        )
        .await?
        .into_result()
        .unwrap();
    assert!(matches!(
        c.client.wait_result("after-poison", WAIT).await?,
        ResultReply::Completed { .. }
    ));
    assert!(c.orchestrator.is_running() && c.cpu.is_running() && c.gpu.is_running());
    assert!(c.cpu.log_contents().contains("poison task terminated"));
    assert!(
        c.orchestrator
            .log_contents()
            .contains("malformed report dropped")
    );
    Ok(())
}
