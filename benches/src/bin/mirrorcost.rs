//! `baton-mirrorcost`: what one JetStream write of the journal's mirror costs, on a local
//! nats-server configured as `baton dev` runs it (`sync_interval: always`): an atomic batch
//! (ADR-50) of N messages on N subjects, one plain message carrying N payloads, and N plain
//! messages pipelined (all sent, then every acknowledgement awaited). The journal picks
//! between the batch and pipelined messages by these figures (`BATCH_MIN_MESSAGES`).
//!
//! `cargo run --release -p baton-benches --bin baton-mirrorcost -- [ROUNDS]`, with
//! `BATON_HOME` (default `.baton`) holding the nats-server `cargo xtask setup` fetched.

use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::{
    HeaderMap,
    header::{NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL, NATS_BATCH_ID, NATS_BATCH_SEQUENCE},
    jetstream::{self, stream},
};
use baton_benches::KillOnDrop;

/// Bytes of each message: about one step's events of `bench_pipeline`.
const MESSAGE_BYTES: usize = 300;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rounds: u32 = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()
        .context("ROUNDS must be a number")?
        .unwrap_or(200);
    let home = std::env::var("BATON_HOME").unwrap_or_else(|_| ".baton".into());
    let dir = tempfile::tempdir()?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let conf = dir.path().join("nats.conf");
    std::fs::write(
        &conf,
        baton_transport::jetstream::local_server_config(port, &dir.path().join("js")),
    )?;
    let server = std::path::Path::new(&home).join("bin").join("nats-server");
    let _server = KillOnDrop(
        std::process::Command::new(&server)
            .arg("-c")
            .arg(&conf)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("could not start {}", server.display()))?,
    );
    let url = format!("127.0.0.1:{port}");
    let client = loop {
        match async_nats::connect(&url).await {
            Ok(c) => break c,
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    };
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "MIRRORCOST".into(),
        subjects: vec!["cost.>".into()],
        storage: stream::StorageType::File,
        allow_atomic_publish: true,
        ..Default::default()
    })
    .await?;
    let payload = vec![7u8; MESSAGE_BYTES];
    println!("{rounds} rounds each, {MESSAGE_BYTES}-byte messages; time per round:");
    println!("| N | atomic batch of N | one message of N payloads | N messages pipelined |");
    println!("|---|---|---|---|");
    for n in [1usize, 4, 8, 12, 16, 32] {
        let began = Instant::now();
        for r in 0..rounds {
            let id = format!("b{n}-{r}");
            for k in 0..n {
                let mut h = HeaderMap::new();
                h.insert(NATS_BATCH_ID, id.as_str());
                h.insert(NATS_BATCH_SEQUENCE, (k + 1).to_string().as_str());
                let subject = format!("cost.batch.{n}.{r}.{k}");
                if k + 1 < n {
                    client
                        .publish_with_headers(subject, h, payload.clone().into())
                        .await?;
                } else {
                    h.insert(NATS_BATCH_COMMIT, NATS_BATCH_COMMIT_FINAL);
                    let ack = js
                        .publish_with_headers(subject, h, payload.clone().into())
                        .await?
                        .await?;
                    anyhow::ensure!(ack.batch_size == Some(n as u64), "batch not stored whole");
                }
            }
        }
        let batch = began.elapsed() / rounds;
        let began = Instant::now();
        for r in 0..rounds {
            js.publish(
                format!("cost.one.{n}.{r}"),
                vec![7u8; MESSAGE_BYTES * n].into(),
            )
            .await?
            .await?;
        }
        let one = began.elapsed() / rounds;
        let began = Instant::now();
        for r in 0..rounds {
            let mut acks = Vec::with_capacity(n);
            for k in 0..n {
                acks.push(
                    js.publish(format!("cost.plain.{n}.{r}.{k}"), payload.clone().into())
                        .await?,
                );
            }
            for ack in acks {
                ack.await?;
            }
        }
        let pipelined = began.elapsed() / rounds;
        println!(
            "| {n} | {:.2} ms | {:.2} ms | {:.2} ms |",
            ms(batch),
            ms(one),
            ms(pipelined)
        );
    }
    Ok(())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
