//! `document_ingest` and `baton.api.search` end to end: files read by the CPU worker,
//! embedded by the GPU worker, indexed by the index worker (which owns the redb vector
//! index and answers searches); idempotent re-ingest, a changed document replaced, and
//! bad documents failing with clear errors.

use std::{path::Path, time::Duration};

use baton_tests::{BatonProcess, baton_bin};
use baton_transport::wire::ResultReply;
use serde_json::{Value, json};

use crate::cluster::{Cluster, WAIT, events, index_worker_args, of_type};

const COOKING: &str = "# Baking bread at home

Good bread needs only flour, water, salt and yeast. Mix the dough, then knead it for ten
minutes until it is smooth and elastic: kneading develops the gluten that traps the gas
the yeast makes. Let the dough rise in a warm kitchen until it has doubled in size.

Shape the loaf, let it proof a second time, and bake it in a very hot oven, ideally on a
preheated baking stone with a tray of water for steam. The crust turns golden brown and
the loaf sounds hollow when you tap its bottom. Let it cool before slicing.
";

const ASTRONOMY: &str = "Telescopes and the night sky

Astronomers study planets, stars and galaxies with telescopes on mountains and in orbit.
A planet orbiting a distant star is found when it passes in front of the star and dims its
light a little: thousands of exoplanets have been discovered this way.

The Milky Way is a spiral galaxy of hundreds of billions of stars. Light from the nearest
large galaxy, Andromeda, travels for two and a half million years before it reaches our
telescopes. Black holes sit at the centre of most galaxies.
";

const RUST: &str = "# Ownership in Rust

```rust
fn longest<'a>(x: &'a str, y: &'a str) -> &'a str { if x.len() > y.len() { x } else { y } }
```

Rust is a systems programming language without a garbage collector. Every value has a
single owner, and the borrow checker verifies at compile time that references never
outlive the data they point to. Lifetimes name how long a reference is valid.

Traits describe shared behaviour, generics are compiled to fast specialised code, and
cargo builds the crates of a project and runs its tests.
";

const CHUNKING: (usize, usize) = (40, 10);

fn completed(r: ResultReply) -> Value {
    match r {
        ResultReply::Completed { output } => output,
        other => panic!("expected completed, got {other:?}"),
    }
}

fn failure(r: ResultReply) -> (String, String) {
    match r {
        ResultReply::Failed { error } => (
            error["kind"].as_str().unwrap_or_default().to_string(),
            error["message"].as_str().unwrap_or_default().to_string(),
        ),
        other => panic!("expected failed, got {other:?}"),
    }
}

fn ingest_input(paths: &[&Path]) -> Value {
    let documents: Vec<Value> = paths
        .iter()
        .map(|p| json!({"path": p.display().to_string()}))
        .collect();
    json!({"documents": documents, "chunk_words": CHUNKING.0, "overlap_words": CHUNKING.1})
}

async fn ingest(c: &Cluster, id: &str, input: Value) -> anyhow::Result<ResultReply> {
    c.client
        .start("document_ingest", Some(id), input)
        .await?
        .into_result()
        .map_err(|e| anyhow::anyhow!("start refused: {e:?}"))?;
    c.client.wait_result(id, WAIT).await
}

async fn search(c: &Cluster, body: Value) -> anyhow::Result<Value> {
    // The first search loads the model in the index worker.
    c.client
        .request_json("baton.api.search", &body, Duration::from_secs(60))
        .await
}

fn sources(reply: &Value) -> Vec<String> {
    reply["hits"]
        .as_array()
        .unwrap_or_else(|| panic!("no hits in {reply}"))
        .iter()
        .map(|h| h["source"].as_str().unwrap().to_string())
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn ingest_search_reingest_and_bad_documents() -> anyhow::Result<()> {
    let c = Cluster::start().await?;
    let index_dir = tempfile::Builder::new().prefix("baton-index-").tempdir()?;
    let mut index = BatonProcess::spawn(index_worker_args(&c.nats, index_dir.path()))?;
    index.wait_for_log("search service started", WAIT).await?;
    index.wait_for_log("worker pool started", WAIT).await?;

    let docs = tempfile::Builder::new().prefix("baton-docs-").tempdir()?;
    let cooking = docs.path().join("cooking.md");
    let astronomy = docs.path().join("astronomy.txt");
    let rust = docs.path().join("rust.md");
    std::fs::write(&cooking, COOKING)?;
    std::fs::write(&astronomy, ASTRONOMY)?;
    std::fs::write(&rust, RUST)?;
    let all = [cooking.as_path(), astronomy.as_path(), rust.as_path()];

    // Ingest: read and chunk on cpu, embed on gpu, index on the index queue.
    let out = completed(ingest(&c, "ingest-1", ingest_input(&all)).await?);
    let chunks = out["chunks"].as_u64().unwrap();
    assert_eq!(out["documents"], 3, "{out}");
    assert!(chunks >= 6, "40-word chunks of ~90-word documents: {out}");
    assert_eq!(out["chunks_indexed"], chunks, "{out}");
    assert_eq!(out["unchanged_documents"], 0, "{out}");
    assert_eq!(out["truncated_chunks"], 0, "{out}");
    let evs = events(&c.client, "ingest-1").await?;
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
            ("read_documents", "cpu"),
            ("chunk_documents", "cpu"),
            ("embed_chunks", "gpu"),
            ("index_chunks", "index")
        ]
    );

    // Topical queries find their document first; hits carry scores, best first.
    let canonical = |p: &Path| std::fs::canonicalize(p).unwrap().display().to_string();
    for (query, expected) in [
        (
            "how long should I knead the dough before baking a loaf",
            &cooking,
        ),
        (
            "discovering exoplanets around distant stars with a telescope",
            &astronomy,
        ),
        ("the borrow checker, references and lifetimes", &rust),
    ] {
        let reply = search(&c, json!({"query": query, "k": 3})).await?;
        let hits = reply["hits"].as_array().unwrap();
        assert_eq!(hits.len(), 3, "{reply}");
        assert_eq!(
            sources(&reply)[0],
            canonical(expected),
            "{query:?}: {reply:#}"
        );
        let scores: Vec<f64> = hits.iter().map(|h| h["score"].as_f64().unwrap()).collect();
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
        assert!(scores[0] > 0.2 && scores[0] <= 1.0, "{scores:?}");
        let first = &hits[0];
        assert_eq!(first["doc_id"], expected.display().to_string());
        assert!(first["ordinal"].is_u64() && !first["text"].as_str().unwrap().is_empty());
        assert_eq!(reply["index"]["documents"], 3);
        assert_eq!(reply["index"]["chunks"], chunks);
    }
    // Markdown was cleaned: no heading hashes, no code fences in the chunks.
    let rust_hits = search(&c, json!({"query": "Ownership in Rust", "k": 100})).await?;
    for h in rust_hits["hits"].as_array().unwrap() {
        let text = h["text"].as_str().unwrap();
        assert!(!text.contains("```") && !text.starts_with('#'), "{text:?}");
    }

    // Re-ingesting the same documents (a new workflow ID): all unchanged, nothing written.
    let again = completed(ingest(&c, "ingest-2", ingest_input(&all)).await?);
    assert_eq!(again["documents"], 3, "{again}");
    assert_eq!(again["unchanged_documents"], 3, "{again}");
    assert_eq!(again["chunks_indexed"], 0, "{again}");
    assert_eq!(again["chunks"], chunks, "{again}");
    let reply = search(&c, json!({"query": "bread"})).await?;
    assert_eq!(
        reply["index"]["chunks"], chunks,
        "the chunk count stays the same"
    );
    assert_eq!(
        reply["hits"].as_array().unwrap().len(),
        5,
        "k defaults to 5"
    );

    // A changed document is replaced as a whole; the others stay.
    std::fs::write(
        &rust,
        "# Async Rust\n\nFutures are polled by an executor such as tokio; async functions return them.\n",
    )?;
    let changed = completed(ingest(&c, "ingest-3", ingest_input(&all)).await?);
    assert_eq!(changed["unchanged_documents"], 2, "{changed}");
    assert_eq!(changed["chunks_indexed"], 1, "{changed}");
    let reply = search(
        &c,
        json!({"query": "lifetimes and the borrow checker", "k": 100}),
    )
    .await?;
    let rust_chunks: Vec<&Value> = reply["hits"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|h| h["source"] == canonical(&rust))
        .collect();
    assert_eq!(rust_chunks.len(), 1, "old chunks gone: {reply:#}");
    assert!(rust_chunks[0]["text"].as_str().unwrap().contains("tokio"));

    // The CLI prints the hits with their scores and sources.
    let cli = std::process::Command::new(baton_bin())
        .args(["search", "kneading bread dough", "--k", "2", "--nats-url"])
        .arg(c.nats.url())
        .output()?;
    let stdout = String::from_utf8_lossy(&cli.stdout);
    assert!(
        cli.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&cli.stderr)
    );
    let first_line = stdout.lines().next().unwrap_or_default();
    assert!(
        first_line.starts_with(" 1. 0.") && first_line.contains(&canonical(&cooking)),
        "{stdout}"
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with(" 2. ")).count(),
        1,
        "{stdout}"
    );

    // A missing file: a non-retryable DocumentError naming the path, read once.
    let missing = docs.path().join("missing.md");
    let (kind, message) = failure(
        ingest(
            &c,
            "ingest-missing",
            ingest_input(&[cooking.as_path(), missing.as_path()]),
        )
        .await?,
    );
    assert_eq!(kind, "DocumentError", "{message}");
    assert!(
        message.contains(&missing.display().to_string()),
        "{message}"
    );
    let evs = events(&c.client, "ingest-missing").await?;
    assert_eq!(
        of_type(&evs, "activity_scheduled").len(),
        1,
        "never retried"
    );

    // An oversized file: a ValidationError naming it, before anything is embedded.
    let big = docs.path().join("big.txt");
    std::fs::write(&big, "word ".repeat(500_000))?;
    let (kind, message) = failure(ingest(&c, "ingest-big", ingest_input(&[big.as_path()])).await?);
    assert_eq!(kind, "ValidationError", "{message}");
    assert!(
        message.contains("big.txt") && message.contains("2 MiB"),
        "{message}"
    );

    // Malformed workflow input is refused at the edge.
    let refused = c
        .client
        .start(
            "document_ingest",
            None,
            json!({"documents": [{"file": "a.md"}]}),
        )
        .await?
        .into_result()
        .unwrap_err();
    assert_eq!(
        serde_json::to_value(refused.code)?,
        "bad_request",
        "{}",
        refused.message
    );

    // Bad search requests get the edge's error shape.
    for body in [
        json!({"query": "bread", "k": 0}),
        json!({"query": "bread", "k": 101}),
        json!({"query": "   "}),
        json!({"q": "bread"}),
    ] {
        let reply = search(&c, body.clone()).await?;
        assert_eq!(reply["error"]["code"], "bad_request", "{body}: {reply}");
        assert!(
            reply["error"]["message"]
                .as_str()
                .is_some_and(|m| !m.is_empty())
        );
    }
    // The index is untouched by the failures.
    let reply = search(&c, json!({"query": "bread", "k": 1})).await?;
    assert_eq!(reply["index"]["documents"], 3);
    Ok(())
}
