//! The harness itself: nats-server with JetStream and the generated config, the process
//! guard and its log, the client's retries. No baton binary needed.

use std::{path::Path, time::Duration};

use async_nats::jetstream::{self, stream};
use baton_tests::{BatonProcess, Client, NatsServer, json_headers};
use baton_transport::wire::{Reply, StartStatus};
use futures::StreamExt as _;
use serde_json::json;

#[tokio::test]
async fn nats_server_runs_jetstream_with_synced_storage_and_survives_a_kill() {
    let mut server = NatsServer::start().await.unwrap();
    let client = server.connect().await.unwrap();
    assert_eq!(
        client.server_info().max_payload,
        8 * 1024 * 1024,
        "max_payload: 8MB"
    );
    assert!(client.server_info().jetstream, "JetStream is on");
    let log = server.log_contents();
    assert!(log.contains("Server is ready"), "{log}");
    assert!(
        log.contains(&server.store_dir().display().to_string()),
        "store dir in use: {log}"
    );

    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "SMOKE".into(),
        subjects: vec!["smoke.>".into()],
        storage: stream::StorageType::File,
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..3 {
        // The second await is the server's acknowledgement: the message is stored (and,
        // with `sync_interval: always`, fsynced).
        let ack = js
            .publish(format!("smoke.{i}"), format!("m{i}").into())
            .await
            .unwrap()
            .await
            .unwrap();
        assert_eq!(ack.stream, "SMOKE");
        assert_eq!(ack.sequence, i + 1);
    }
    drop(client);

    // SIGKILL, restart on the same port and store: the acknowledged messages are there.
    let port = server.port();
    server.restart().await.unwrap();
    assert_eq!(server.port(), port);
    let js = jetstream::new(server.connect().await.unwrap());
    let mut s = js.get_stream("SMOKE").await.unwrap();
    assert_eq!(s.info().await.unwrap().state.messages, 3);
    let m = s.get_raw_message(2).await.unwrap();
    assert_eq!(
        (m.subject.as_str(), &m.payload[..]),
        ("smoke.1", &b"m1"[..])
    );

    let pid = server.pid().unwrap();
    drop(server);
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "nats-server {pid} was killed and reaped"
    );
}

#[tokio::test]
async fn process_guard_logs_waits_counts_and_kills() {
    let script = "echo starting; echo \"home=$BATON_HOME log=$RUST_LOG extra=$EXTRA\"; \
                  sleep 0.3; echo ready; echo ready >&2; exec sleep 30";
    let mut p =
        BatonProcess::spawn_program(Path::new("/bin/sh"), ["-c", script], &[("EXTRA", "x")])
            .unwrap();
    p.wait_for_log("ready", Duration::from_secs(5))
        .await
        .unwrap();
    p.wait_for_log_count("ready", 2, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(p.count_in_log("ready"), 2, "stdout and stderr both logged");
    let log = p.log_contents();
    let home = baton_tests::baton_home();
    assert!(
        log.contains(&format!("home={} log=info extra=x", home.display())),
        "{log}"
    );
    let err = p
        .wait_for_log("never", Duration::from_millis(200))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("within"), "{err}");

    let pid = p.pid();
    assert!(p.is_running());
    p.kill();
    assert!(!p.is_running());
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "{pid} was killed and reaped"
    );

    // A restart appends to the same log.
    p.restart().unwrap();
    p.wait_for_log_count("ready", 4, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(p.count_in_log("starting"), 2);
    assert_ne!(p.pid(), pid);

    // A process that exits without logging the pattern fails the wait at once.
    let mut q =
        BatonProcess::spawn_program(Path::new("/bin/sh"), ["-c", "echo bye; exit 3"], &[]).unwrap();
    let err = q
        .wait_for_log("ready", Duration::from_secs(30))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("exited"), "{err}");
    assert_eq!(q.try_status().and_then(|s| s.code()), Some(3));
}

#[tokio::test]
async fn client_retries_while_nobody_answers_then_decodes_replies() {
    let server = NatsServer::start().await.unwrap();
    let client = Client::connect(&server.url()).await.unwrap();

    // A fake orchestrator that only subscribes after a second: the start is retried.
    let nats = server.connect().await.unwrap();
    let responder = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let mut sub = nats.subscribe("baton.start.*").await.unwrap();
        nats.flush().await.unwrap();
        while let Some(msg) = sub.next().await {
            let ct = msg
                .headers
                .as_ref()
                .and_then(|h| h.get("Content-Type"))
                .map(|v| v.to_string());
            let body: serde_json::Value =
                serde_json::from_slice(&msg.payload).unwrap_or(json!(null));
            let reply = if msg.subject.as_str() == "baton.start.nope" {
                json!({"error": {"code": "unknown_workflow_type", "message": "no workflow \"nope\""}})
            } else {
                json!({"workflow_id": body["workflow_id"].as_str().unwrap_or("generated"),
                       "run_id": format!("run-{}", ct.unwrap_or_default()), "status": "started"})
            };
            nats.publish(
                msg.reply.unwrap(),
                serde_json::to_vec(&reply).unwrap().into(),
            )
            .await
            .unwrap();
            nats.flush().await.unwrap();
        }
    });

    let started = std::time::Instant::now();
    let reply = client
        .start("echo", Some("wf-1"), json!({"text": "hi"}))
        .await
        .unwrap();
    assert!(
        started.elapsed() >= Duration::from_millis(900),
        "retried until the responder came"
    );
    let ok = reply.into_result().unwrap();
    assert_eq!(
        (ok.workflow_id.as_str(), ok.run_id.as_str(), ok.status),
        ("wf-1", "run-application/json", StartStatus::Started)
    );

    match client.start("nope", None, json!({})).await.unwrap() {
        Reply::Err(e) => assert_eq!(e.error.message, "no workflow \"nope\""),
        Reply::Ok(r) => panic!("expected a refusal, got {r:?}"),
    }

    let raw = client
        .start_raw("baton.start.echo", json_headers(), "{\"input\": 1}")
        .await
        .unwrap();
    assert_eq!(raw["workflow_id"], "generated");
    responder.abort();
}
