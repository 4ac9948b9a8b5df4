//! `document_ingest`: documents in, searchable chunks out.
//!
//! | step | queue | what |
//! |---|---|---|
//! | [`READ_DOCUMENTS`] | cpu | validates the input, reads files (or takes inline texts), lightly cleans markdown, hashes each text |
//! | [`CHUNK_DOCUMENTS`] | cpu | word windows with overlap, within the model's 256 tokens ([`chunk_text`]) |
//! | [`EMBED_CHUNKS`] | gpu | one embedding per chunk, in batches of [`EMBED_CHUNK`], heartbeating [`Progress`] |
//! | [`INDEX_CHUNKS`] | index | upserts each document into the [`VectorIndex`] of the process serving [`INDEX_QUEUE`] |
//!
//! Input: `{"documents": [{"path": "notes/a.md"} | {"id": "doc-1", "text": "..."}, ...],
//! "chunk_words": 120, "overlap_words": 20}`. A document's ID is its `id`, else its path
//! as given. Output: `{"documents", "chunks", "chunks_indexed", "unchanged_documents",
//! "truncated_chunks"}`.
//!
//! **Paths are read by the CPU worker that runs [`READ_DOCUMENTS`]**, not by the client
//! or the orchestrator: give absolute paths on a filesystem every CPU worker sees (a
//! shared mount), or run `baton dev`. Relative paths resolve against the worker's working
//! directory.
//!
//! **Idempotent.** The index stores a version per document: a SHA-256 fingerprint of its
//! text, its source, the chunking parameters and the model ([`fingerprint`]). Ingesting an
//! unchanged document again leaves it alone (`unchanged_documents`); a changed one has all
//! of its old chunks replaced in one redb transaction.
//!
//! **Model limit.** The embedder truncates a text at 256 tokens ([CLS] and [SEP]
//! included). Chunks are at most `chunk_words` words (≤ [`MAX_CHUNK_WORDS`], about 250
//! tokens of plain English) *and* at most 254 tokens as the model's own tokenizer counts
//! them, so a chunk of dense text (markdown tables, code, identifiers: 2 to 3 characters a
//! token, where 120 words can be 300 tokens) ends early instead of being truncated. The
//! CPU workers load the tokenizer (`tokenizer.json`), not the model. Long documents are
//! therefore chunked, never truncated; if the model still truncates a chunk (a single
//! word over the budget), the chunk is embedded from its first 256 tokens, stored whole
//! and counted in `truncated_chunks`: never silently dropped.
//!
//! **Limits** (a non-retryable `ValidationError` naming the document): at most
//! [`MAX_DOCUMENTS`] documents, each at most [`MAX_DOCUMENT_BYTES`] and all together at
//! most [`MAX_TOTAL_BYTES`] (every step's payload must fit in one JetStream message), at
//! most [`MAX_CHUNKS`] chunks per workflow. A missing or unreadable file, a directory or a
//! non-UTF-8 file is a non-retryable `DocumentError` naming the path.

use std::{
    collections::{HashMap, HashSet},
    io::Read as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use baton_actors::{
    ActivityContext, ActivityDef, ActivityError, ActivityOptions, Registry, RetryPolicy,
    WorkflowContext, WorkflowError,
};
use baton_transport::{
    codec::{CONTENT_TYPE, Format, JSON, MAX_EDGE_BODY, MSGPACK},
    wire::{ErrorCode, ErrorReply},
};
use futures::StreamExt as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokenizers::Tokenizer;

use super::{
    CPU_QUEUE, EMBED_CHUNK, GPU_QUEUE, MODEL_NAME, Models, Progress,
    activities::{blocking, inference_error},
    cpu_retry, gpu_retry,
};
use crate::index::{DocumentUpsert, Hit, IndexChunk, IndexError, IndexStats, Upsert, VectorIndex};

/// Name of the workflow [`document_ingest`].
pub const DOCUMENT_INGEST: &str = "document_ingest";
/// The queue of the index step, served by the one process that owns the vector index.
pub const INDEX_QUEUE: &str = "index";
/// The subject of the search service (NATS core request/reply, JSON or MessagePack).
pub const SEARCH_SUBJECT: &str = baton_transport::subject::API_SEARCH;
/// The queue group of the search service.
pub const SEARCH_QUEUE_GROUP: &str = "baton-index";

/// Most documents in one workflow.
pub const MAX_DOCUMENTS: usize = 200;
/// Largest document, in bytes (of the file, or of the inline text).
pub const MAX_DOCUMENT_BYTES: usize = 2 * 1024 * 1024;
/// Largest total of the documents of one workflow, in bytes: the texts travel as one
/// activity result, and chunks with their vectors as one task.
pub const MAX_TOTAL_BYTES: usize = 4 * 1024 * 1024;
/// Most chunks in one workflow.
pub const MAX_CHUNKS: usize = 2_000;
/// Default words per chunk.
pub const DEFAULT_CHUNK_WORDS: usize = 120;
/// Default words shared by consecutive chunks.
pub const DEFAULT_OVERLAP_WORDS: usize = 20;
/// Most words per chunk (about 250 tokens of typical English: under the model's 256).
pub const MAX_CHUNK_WORDS: usize = 200;
/// Most characters per chunk: a chunk ends early rather than grow past this.
pub const MAX_CHUNK_CHARS: usize = 1_500;
/// A run of non-space characters longer than this (CJK text, a base64 blob) counts as
/// one word per this many characters, so that it is still chunked.
pub const MAX_WORD_CHARS: usize = 100;
/// Longest document ID, in characters.
pub const MAX_ID_CHARS: usize = 256;
/// Longest search query, in characters.
pub const MAX_QUERY_CHARS: usize = 10_000;
/// Most hits one search returns.
pub const MAX_K: usize = 100;
/// Hits a search returns by default.
pub const DEFAULT_K: usize = 5;

/// `read_documents(input) -> [Document]` (cpu).
pub const READ_DOCUMENTS: ActivityDef<IngestInput, Vec<Document>> =
    ActivityDef::new("read_documents");
/// `chunk_documents({documents, chunk_words, overlap_words}) -> [Chunk]` (cpu).
pub const CHUNK_DOCUMENTS: ActivityDef<ChunkRequest, Vec<Chunk>> =
    ActivityDef::new("chunk_documents");
/// `embed_chunks(texts) -> ChunkVectors` (gpu).
pub const EMBED_CHUNKS: ActivityDef<Vec<String>, ChunkVectors> = ActivityDef::new("embed_chunks");
/// `index_chunks({documents, chunks, vectors}) -> IndexReport` (index).
pub const INDEX_CHUNKS: ActivityDef<IndexRequest, IndexReport> = ActivityDef::new("index_chunks");

// --- types ----------------------------------------------------------------------------

fn default_chunk_words() -> usize {
    DEFAULT_CHUNK_WORDS
}

fn default_overlap_words() -> usize {
    DEFAULT_OVERLAP_WORDS
}

/// Input of [`document_ingest`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IngestInput {
    /// The documents, 1 to [`MAX_DOCUMENTS`].
    pub documents: Vec<DocumentSpec>,
    /// Words per chunk, 1 to [`MAX_CHUNK_WORDS`] (default [`DEFAULT_CHUNK_WORDS`]).
    #[serde(default = "default_chunk_words")]
    pub chunk_words: usize,
    /// Words shared by consecutive chunks, less than `chunk_words` (default
    /// [`DEFAULT_OVERLAP_WORDS`]).
    #[serde(default = "default_overlap_words")]
    pub overlap_words: usize,
}

/// One document of the input: `{"path": ...}` (and optionally `"id"`), or
/// `{"id": ..., "text": ...}`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DocumentSpec {
    /// The document ID (default: the path as given; required with `text`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// A text or markdown file (`.md`, `.markdown`, `.mdx`), read by the CPU worker.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The text itself, taken as plain text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub text: Option<String>,
}

/// A document read ([`READ_DOCUMENTS`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Document {
    /// The document ID.
    pub id: String,
    /// Where it came from: the file's canonical path, or `inline:<id>`.
    pub source: String,
    /// Its text (markdown lightly cleaned, see [`clean_markdown`]).
    pub text: String,
    /// SHA-256 of `text`, lowercase hex.
    pub sha256: String,
}

/// Input of [`CHUNK_DOCUMENTS`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChunkRequest {
    /// The documents read.
    pub documents: Vec<Document>,
    /// Words per chunk.
    pub chunk_words: usize,
    /// Words shared by consecutive chunks.
    pub overlap_words: usize,
}

/// A chunk of a document ([`CHUNK_DOCUMENTS`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    /// The document ID.
    pub doc_id: String,
    /// The document's source.
    pub source: String,
    /// Position in the document, from 0.
    pub ordinal: u32,
    /// The chunk's words, joined by single spaces.
    pub text: String,
    /// The document's [`Document::sha256`].
    pub doc_sha256: String,
}

/// The result of [`EMBED_CHUNKS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChunkVectors {
    /// The model ([`MODEL_NAME`]).
    pub model: String,
    /// Length of each vector.
    pub dim: usize,
    /// One unit vector per chunk, in order.
    pub vectors: Vec<Vec<f32>>,
    /// Indices of the chunks the model truncated (over its token limit).
    pub truncated: Vec<usize>,
}

/// A document as the index step sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexedDocument {
    /// The document ID.
    pub id: String,
    /// Its source.
    pub source: String,
    /// Its version in the index ([`fingerprint`]).
    pub version: String,
}

/// Input of [`INDEX_CHUNKS`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IndexRequest {
    /// Every document of the workflow, those without chunks included.
    pub documents: Vec<IndexedDocument>,
    /// Every chunk.
    pub chunks: Vec<Chunk>,
    /// One vector per chunk.
    pub vectors: Vec<Vec<f32>>,
}

/// The result of [`INDEX_CHUNKS`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IndexReport {
    /// Documents upserted.
    pub documents: usize,
    /// Chunks written (those of the changed documents).
    pub chunks_indexed: usize,
    /// Documents already indexed with the same version: left alone.
    pub unchanged_documents: usize,
}

/// Output of [`document_ingest`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct IngestOutput {
    /// Documents ingested.
    pub documents: usize,
    /// Chunks cut from them.
    pub chunks: usize,
    /// Chunks written to the index (0 when every document was unchanged).
    pub chunks_indexed: usize,
    /// Documents already indexed with the same content and chunking.
    pub unchanged_documents: usize,
    /// Chunks the model embedded from their first 256 tokens only.
    pub truncated_chunks: usize,
}

// --- the workflow ---------------------------------------------------------------------

/// `document_ingest`: read_documents (cpu) -> chunk_documents (cpu) -> embed_chunks (gpu)
/// -> index_chunks (index).
pub async fn document_ingest(
    ctx: WorkflowContext,
    input: IngestInput,
) -> Result<IngestOutput, WorkflowError> {
    let (chunk_words, overlap_words) = (input.chunk_words, input.overlap_words);
    let documents = ctx.activity(&READ_DOCUMENTS, &input).await?;
    let request = ChunkRequest {
        documents,
        chunk_words,
        overlap_words,
    };
    let chunks = ctx.activity(&CHUNK_DOCUMENTS, &request).await?;
    let texts: Vec<String> = chunks.iter().map(|c| c.text.clone()).collect();
    let embedded = ctx.activity(&EMBED_CHUNKS, &texts).await?;
    if embedded.vectors.len() != chunks.len() {
        return Err(WorkflowError::new(
            "InternalError",
            format!(
                "{} vectors for {} chunks",
                embedded.vectors.len(),
                chunks.len()
            ),
        ));
    }
    let documents: Vec<IndexedDocument> = request
        .documents
        .iter()
        .map(|d| IndexedDocument {
            id: d.id.clone(),
            source: d.source.clone(),
            version: fingerprint(d, chunk_words, overlap_words, &embedded.model),
        })
        .collect();
    let n_chunks = chunks.len();
    let report = ctx
        .activity(
            &INDEX_CHUNKS,
            &IndexRequest {
                documents,
                chunks,
                vectors: embedded.vectors,
            },
        )
        .await?;
    Ok(IngestOutput {
        documents: report.documents,
        chunks: n_chunks,
        chunks_indexed: report.chunks_indexed,
        unchanged_documents: report.unchanged_documents,
        truncated_chunks: embedded.truncated.len(),
    })
}

/// A document's version in the index: SHA-256 over its text's hash, its source, the
/// chunking parameters (and the chunker's own bounds) and the embedding model, so that any
/// change to what would be stored makes a new version.
pub fn fingerprint(
    doc: &Document,
    chunk_words: usize,
    overlap_words: usize,
    model: &str,
) -> String {
    let key = format!(
        "baton-ingest-v2\0{model}\0{chunk_words}\0{overlap_words}\0{MAX_CHUNK_CHARS}\0{MAX_WORD_CHARS}\0{}\0{}",
        doc.source, doc.sha256
    );
    sha256_hex(key.as_bytes())
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

// --- registration ---------------------------------------------------------------------

/// Retry policy of the index step: 1 s, then x2, 5 attempts in all (an attempt that landed
/// on a worker without the index, `IndexUnavailable`, gets another chance elsewhere);
/// `ValidationError` is never retried.
pub fn index_retry() -> RetryPolicy {
    RetryPolicy::exponential(Duration::from_secs(1), 2.0, 5).non_retryable(&["ValidationError"])
}

/// The options of the ingest activities: queue, timeouts, retry policy.
pub fn ingest_activity_options() -> Vec<(&'static str, ActivityOptions)> {
    let secs = Duration::from_secs;
    vec![
        (
            READ_DOCUMENTS.name,
            ActivityOptions::new(CPU_QUEUE, secs(60), cpu_retry()),
        ),
        (
            CHUNK_DOCUMENTS.name,
            ActivityOptions::new(CPU_QUEUE, secs(60), cpu_retry()),
        ),
        (
            EMBED_CHUNKS.name,
            ActivityOptions::new(GPU_QUEUE, secs(600), gpu_retry()).heartbeat_timeout(secs(30)),
        ),
        (
            INDEX_CHUNKS.name,
            ActivityOptions::new(INDEX_QUEUE, secs(120), index_retry()),
        ),
    ]
}

/// Registers [`document_ingest`] and its four activities. The model and index steps use
/// `models` (the index is the one set with [`Models::set_index`] in the process that
/// serves [`INDEX_QUEUE`]).
pub fn register(r: &mut Registry, models: Arc<Models>) -> anyhow::Result<()> {
    let options = |name: &str| {
        ingest_activity_options()
            .into_iter()
            .find(|(n, _)| *n == name)
            .map(|(_, o)| o)
            .unwrap_or_else(|| panic!("no options declared for activity {name:?}"))
    };
    r.workflow(DOCUMENT_INGEST, document_ingest)?.activity(
        &READ_DOCUMENTS,
        options(READ_DOCUMENTS.name),
        read_documents,
    )?;
    let m = models.clone();
    r.activity(
        &CHUNK_DOCUMENTS,
        options(CHUNK_DOCUMENTS.name),
        move |ctx, request| chunk_documents(m.clone(), ctx, request),
    )?;
    let m = models.clone();
    r.activity(
        &EMBED_CHUNKS,
        options(EMBED_CHUNKS.name),
        move |ctx, texts| embed_chunks(m.clone(), ctx, texts),
    )?;
    let m = models;
    r.activity(
        &INDEX_CHUNKS,
        options(INDEX_CHUNKS.name),
        move |ctx, req| index_chunks(m.clone(), ctx, req),
    )
    .context("registering the document_ingest activities")?;
    Ok(())
}

// --- read_documents -------------------------------------------------------------------

fn validation(message: impl Into<String>) -> ActivityError {
    ActivityError::non_retryable("ValidationError", message)
}

fn document_error(message: impl Into<String>) -> ActivityError {
    ActivityError::non_retryable("DocumentError", message)
}

/// Checks the chunking parameters: `chunk_words` in 1..=[`MAX_CHUNK_WORDS`],
/// `overlap_words` below it.
pub fn check_chunking(chunk_words: usize, overlap_words: usize) -> Result<(), ActivityError> {
    if chunk_words == 0 || chunk_words > MAX_CHUNK_WORDS {
        return Err(validation(format!(
            "chunk_words is {chunk_words}; it must be 1 to {MAX_CHUNK_WORDS} (the model reads at most 256 tokens)"
        )));
    }
    if overlap_words >= chunk_words {
        return Err(validation(format!(
            "overlap_words ({overlap_words}) must be less than chunk_words ({chunk_words})"
        )));
    }
    Ok(())
}

/// What to read for one document, after validation.
enum Origin {
    File(String),
    Inline(String),
}

/// The input's checks that need no I/O: counts, chunking parameters, each document's
/// shape, IDs unique. Returns each document's ID and origin.
fn plan(input: &IngestInput) -> Result<Vec<(String, Origin)>, ActivityError> {
    if input.documents.is_empty() {
        return Err(validation("no documents to ingest"));
    }
    if input.documents.len() > MAX_DOCUMENTS {
        return Err(validation(format!(
            "{} documents; the limit is {MAX_DOCUMENTS} per workflow (start several workflows)",
            input.documents.len()
        )));
    }
    check_chunking(input.chunk_words, input.overlap_words)?;
    let mut seen = HashSet::new();
    let mut plan = Vec::with_capacity(input.documents.len());
    for (i, d) in input.documents.iter().enumerate() {
        let (id, origin) = match (&d.id, &d.path, &d.text) {
            (_, Some(_), Some(_)) => {
                return Err(validation(format!(
                    "document {i}: give either \"path\" or \"text\", not both"
                )));
            }
            (_, None, None) => {
                return Err(validation(format!(
                    "document {i}: give \"path\" (a file) or \"id\" and \"text\""
                )));
            }
            (None, None, Some(_)) => {
                return Err(validation(format!(
                    "document {i}: an inline \"text\" needs an \"id\""
                )));
            }
            (Some(id), None, Some(text)) => (id.clone(), Origin::Inline(text.clone())),
            (id, Some(path), None) => {
                if path.trim().is_empty() {
                    return Err(validation(format!("document {i}: the path is empty")));
                }
                (
                    id.clone().unwrap_or_else(|| path.clone()),
                    Origin::File(path.clone()),
                )
            }
        };
        if id.trim().is_empty() {
            return Err(validation(format!("document {i}: the id is empty")));
        }
        let chars = id.chars().count();
        if chars > MAX_ID_CHARS || id.chars().any(char::is_control) {
            return Err(validation(format!(
                "document {i}: the id must be at most {MAX_ID_CHARS} characters, without control characters ({chars} given)"
            )));
        }
        if !seen.insert(id.clone()) {
            return Err(validation(format!(
                "document {i}: the id {id:?} is used twice in this workflow"
            )));
        }
        if let Origin::Inline(text) = &origin
            && text.len() > MAX_DOCUMENT_BYTES
        {
            return Err(validation(format!(
                "document {id:?} is {} bytes; the limit is {MAX_DOCUMENT_BYTES} bytes (2 MiB)",
                text.len()
            )));
        }
        plan.push((id, origin));
    }
    Ok(plan)
}

/// Whether a path names a markdown file, by its extension.
fn is_markdown(path: &str) -> bool {
    Path::new(path)
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "md" | "markdown" | "mdx"))
}

/// Reads one file: its size checked before and while reading, UTF-8, no NUL bytes.
/// Returns its text and canonical path.
fn read_file(id: &str, path: &str) -> Result<(String, String), ActivityError> {
    let unreadable =
        |e: std::io::Error| document_error(format!("document {id:?}: cannot read {path:?}: {e}"));
    let meta = std::fs::metadata(path).map_err(unreadable)?;
    if meta.is_dir() {
        return Err(document_error(format!(
            "document {id:?}: {path:?} is a directory, not a file"
        )));
    }
    let too_big = |size: u64| {
        validation(format!(
            "document {id:?} ({path}) is {size} bytes; the limit is {MAX_DOCUMENT_BYTES} bytes (2 MiB): split it"
        ))
    };
    if meta.len() > MAX_DOCUMENT_BYTES as u64 {
        return Err(too_big(meta.len()));
    }
    let mut bytes = Vec::with_capacity(meta.len() as usize);
    std::fs::File::open(path)
        .and_then(|f| {
            f.take(MAX_DOCUMENT_BYTES as u64 + 1)
                .read_to_end(&mut bytes)
        })
        .map_err(unreadable)?;
    if bytes.len() > MAX_DOCUMENT_BYTES {
        return Err(too_big(bytes.len() as u64));
    }
    let text = String::from_utf8(bytes).map_err(|e| {
        document_error(format!(
            "document {id:?}: {path:?} is not UTF-8 text (invalid byte at offset {})",
            e.utf8_error().valid_up_to()
        ))
    })?;
    if text.contains('\0') {
        return Err(document_error(format!(
            "document {id:?}: {path:?} looks binary (it holds NUL bytes)"
        )));
    }
    let source = std::fs::canonicalize(path)
        .map(|p| p.display().to_string())
        .unwrap_or_else(|_| path.to_string());
    Ok((text, source))
}

/// The logic of [`READ_DOCUMENTS`] (blocking: reads files). Checks the whole input first
/// (see [`plan`] and the module's limits), then reads each document in order.
pub fn read_all(input: &IngestInput) -> Result<Vec<Document>, ActivityError> {
    let plan = plan(input)?;
    let mut total = 0usize;
    let mut documents = Vec::with_capacity(plan.len());
    for (id, origin) in plan {
        let (text, source) = match origin {
            Origin::Inline(text) => (text, format!("inline:{id}")),
            Origin::File(path) => {
                let (text, source) = read_file(&id, &path)?;
                let text = if is_markdown(&path) {
                    clean_markdown(&text)
                } else {
                    text
                };
                (text, source)
            }
        };
        total += text.len();
        if total > MAX_TOTAL_BYTES {
            return Err(validation(format!(
                "the documents up to {id:?} total {total} bytes; the limit is {MAX_TOTAL_BYTES} bytes (4 MiB) per workflow: split the ingest into several workflows"
            )));
        }
        documents.push(Document {
            sha256: sha256_hex(text.as_bytes()),
            id,
            source,
            text,
        });
    }
    Ok(documents)
}

/// Light markdown cleaning, line by line: code-fence marker lines (```` ``` ```` or `~~~`,
/// with their language tag) are removed, the code between them is kept as it is; a
/// heading's leading hashes (`#` to `######` then a space) and closing hashes are
/// removed, its text kept. Everything else (emphasis, links, lists, tables) is left: the
/// model reads it well enough.
pub fn clean_markdown(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut fence: Option<&str> = None;
    for line in text.lines() {
        let t = line.trim_start();
        let marker = ["```", "~~~"].into_iter().find(|m| t.starts_with(m));
        match (fence, marker) {
            (None, Some(m)) => {
                fence = Some(m);
                continue;
            }
            (Some(open), Some(m)) if open == m => {
                fence = None;
                continue;
            }
            (Some(_), _) => {}
            (None, None) => {
                let hashes = t.chars().take_while(|c| *c == '#').count();
                let rest = &t[hashes..];
                if (1..=6).contains(&hashes) && (rest.is_empty() || rest.starts_with([' ', '\t'])) {
                    out.push_str(rest.trim().trim_end_matches('#').trim_end());
                    out.push('\n');
                    continue;
                }
            }
        }
        out.push_str(line);
        out.push('\n');
    }
    out
}

/// [`READ_DOCUMENTS`]'s implementation: [`read_all`] on a blocking thread.
pub async fn read_documents(
    _ctx: ActivityContext,
    input: IngestInput,
) -> Result<Vec<Document>, ActivityError> {
    tokio::task::spawn_blocking(move || read_all(&input))
        .await
        .map_err(|e| ActivityError::retryable("InternalError", e.to_string()))?
}

// --- chunk_documents ------------------------------------------------------------------

/// The words of `text` (split on whitespace), each run of more than [`MAX_WORD_CHARS`]
/// characters split into pieces of that many.
fn words(text: &str) -> Vec<&str> {
    let mut out = Vec::new();
    for w in text.split_whitespace() {
        let mut rest = w;
        while let Some((cut, _)) = rest.char_indices().nth(MAX_WORD_CHARS) {
            out.push(&rest[..cut]);
            rest = &rest[cut..];
        }
        out.push(rest);
    }
    out
}

/// Cuts `text` into windows of at most `chunk_words` words, `token_budget` tokens (each
/// word costing `tokens(word)`) and [`MAX_CHUNK_CHARS`] characters: a window ends at the
/// first bound it would cross (it always takes at least one word). Each window starts
/// `chunk_words - overlap_words` words after the previous one, so consecutive full windows
/// share `overlap_words` words; a window ended early by the token or character bound
/// shares proportionally fewer. The last window ends at the last word. Words are joined
/// by single spaces. An empty or whitespace-only text has no chunks.
///
/// Expects [`check_chunking`] to hold.
pub fn chunk_text(
    text: &str,
    chunk_words: usize,
    overlap_words: usize,
    token_budget: usize,
    tokens: &dyn Fn(&str) -> usize,
) -> Vec<String> {
    let words = words(text);
    let n = words.len();
    let mut chunks = Vec::new();
    let mut start = 0;
    while start < n {
        let mut end = start;
        let (mut chars, mut used) = (0, 0);
        while end < n && end - start < chunk_words {
            let len = words[end].chars().count() + usize::from(end > start);
            let cost = tokens(words[end]);
            if end > start && (chars + len > MAX_CHUNK_CHARS || used + cost > token_budget) {
                break;
            }
            chars += len;
            used += cost;
            end += 1;
        }
        chunks.push(words[start..end].join(" "));
        if end == n {
            break;
        }
        let keep = overlap_words * (end - start) / chunk_words;
        start = (end - keep).max(start + 1);
    }
    chunks
}

/// Counts the model's tokens of each word, special tokens excluded.
pub type WordTokens<'a> = &'a dyn Fn(&[&str]) -> Result<Vec<usize>, ActivityError>;

/// The logic of [`CHUNK_DOCUMENTS`]: [`chunk_text`] over each document, ordinals from 0
/// per document, each chunk within `token_budget` tokens as `count` counts them (once per
/// distinct word). More than [`MAX_CHUNKS`] chunks in all is a `ValidationError` naming
/// the document that crossed the limit.
pub fn chunk_all(
    request: &ChunkRequest,
    token_budget: usize,
    count: WordTokens<'_>,
) -> Result<Vec<Chunk>, ActivityError> {
    check_chunking(request.chunk_words, request.overlap_words)?;
    let mut chunks = Vec::new();
    for d in &request.documents {
        let mut distinct: Vec<&str> = words(&d.text);
        distinct.sort_unstable();
        distinct.dedup();
        let counts = count(&distinct)?;
        if counts.len() != distinct.len() {
            return Err(ActivityError::retryable(
                "InternalError",
                format!("{} token counts for {} words", counts.len(), distinct.len()),
            ));
        }
        let cost: HashMap<&str, usize> = distinct.into_iter().zip(counts).collect();
        let texts = chunk_text(
            &d.text,
            request.chunk_words,
            request.overlap_words,
            token_budget,
            &|w| cost.get(w).copied().unwrap_or(1),
        );
        if chunks.len() + texts.len() > MAX_CHUNKS {
            return Err(validation(format!(
                "document {:?} brings the workflow to {} chunks; the limit is {MAX_CHUNKS} per workflow: split the ingest, or raise chunk_words",
                d.id,
                chunks.len() + texts.len()
            )));
        }
        chunks.extend(texts.into_iter().enumerate().map(|(i, text)| Chunk {
            doc_id: d.id.clone(),
            source: d.source.clone(),
            ordinal: i as u32,
            text,
            doc_sha256: d.sha256.clone(),
        }));
    }
    Ok(chunks)
}

/// The model's tokenizer (`tokenizer.json`), without truncation or padding, loaded once
/// per process (the CPU workers need the tokenizer only, not the model).
fn word_tokenizer(path: &Path) -> Result<Arc<Tokenizer>, ActivityError> {
    static CACHE: Mutex<Option<(PathBuf, Arc<Tokenizer>)>> = Mutex::new(None);
    let mut slot = CACHE.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((p, t)) = slot.as_ref()
        && p == path
    {
        return Ok(t.clone());
    }
    let unavailable = |e: String| {
        ActivityError::retryable(
            "ModelUnavailable",
            format!(
                "loading the tokenizer {}: {e}; run `cargo xtask setup` (or set BATON_HOME)",
                path.display()
            ),
        )
    };
    let mut t = Tokenizer::from_file(path).map_err(|e| unavailable(e.to_string()))?;
    t.with_truncation(None)
        .map_err(|e| unavailable(e.to_string()))?;
    t.with_padding(None);
    let t = Arc::new(t);
    *slot = Some((path.to_path_buf(), t.clone()));
    Ok(t)
}

/// Tokens per chunk: the model's limit less `[CLS]` and `[SEP]`. The tokenizer splits on
/// whitespace before anything else, so a chunk's tokens are the sum of its words'.
pub fn token_budget(models: &Models) -> usize {
    models.config().max_tokens.saturating_sub(2).max(1)
}

/// [`CHUNK_DOCUMENTS`]'s implementation: [`chunk_all`] on a blocking thread, counting
/// tokens with the model's tokenizer (a retryable `ModelUnavailable` when it cannot be
/// loaded).
pub async fn chunk_documents(
    models: Arc<Models>,
    _ctx: ActivityContext,
    request: ChunkRequest,
) -> Result<Vec<Chunk>, ActivityError> {
    tokio::task::spawn_blocking(move || {
        let tokenizer = word_tokenizer(&models.config().tokenizer_path)?;
        let count = |words: &[&str]| {
            tokenizer
                .encode_batch_fast(words.to_vec(), false)
                .map(|encodings| encodings.iter().map(|e| e.len()).collect())
                .map_err(|e| ActivityError::retryable("InternalError", format!("tokenizing: {e}")))
        };
        chunk_all(&request, token_budget(&models), &count)
    })
    .await
    .map_err(|e| ActivityError::retryable("InternalError", e.to_string()))?
}

// --- embed_chunks ---------------------------------------------------------------------

/// [`EMBED_CHUNKS`]'s implementation: embeds in batches of [`EMBED_CHUNK`] on a blocking
/// thread, heartbeating [`Progress`] after each, and lists the chunks the model truncated
/// (over `max_tokens`). More than [`MAX_CHUNKS`] texts is a `ValidationError`.
pub async fn embed_chunks(
    models: Arc<Models>,
    ctx: ActivityContext,
    texts: Vec<String>,
) -> Result<ChunkVectors, ActivityError> {
    let total = texts.len();
    if total > MAX_CHUNKS {
        return Err(validation(format!(
            "{total} chunks to embed; the limit is {MAX_CHUNKS}"
        )));
    }
    ctx.heartbeat_with(&Progress { done: 0, total });
    let max_tokens = models.config().max_tokens;
    let embedder = blocking(move || models.embedder()).await?;
    let texts = Arc::new(texts);
    let mut vectors = Vec::with_capacity(total);
    let mut truncated = Vec::new();
    for start in (0..total).step_by(EMBED_CHUNK) {
        let end = (start + EMBED_CHUNK).min(total);
        let (embedder, texts) = (embedder.clone(), texts.clone());
        let (batch, long) = blocking(move || {
            let batch: Vec<&str> = texts[start..end].iter().map(String::as_str).collect();
            let mut long = Vec::new();
            for (i, t) in batch.iter().enumerate() {
                if embedder.token_count(t).map_err(inference_error)? > max_tokens {
                    long.push(start + i);
                }
            }
            Ok((embedder.embed(&batch).map_err(inference_error)?, long))
        })
        .await?;
        vectors.extend(batch);
        truncated.extend(long);
        ctx.heartbeat_with(&Progress { done: end, total });
    }
    if !truncated.is_empty() {
        tracing::warn!(
            truncated = truncated.len(),
            total,
            max_tokens,
            "chunks over the model's token limit were embedded from their first tokens"
        );
    }
    Ok(ChunkVectors {
        model: MODEL_NAME.to_string(),
        dim: embedder.dim(),
        vectors,
        truncated,
    })
}

// --- index_chunks ---------------------------------------------------------------------

fn index_activity_error(e: IndexError) -> ActivityError {
    match e {
        IndexError::Storage(m) => ActivityError::retryable("IndexError", m),
        other => ActivityError::non_retryable(
            "IndexError",
            format!(
                "{other} (an index built with another embedding model needs its own --index-dir)"
            ),
        ),
    }
}

/// The logic of [`INDEX_CHUNKS`] (blocking: writes the index): groups the chunks by
/// document and upserts every document in one transaction.
pub fn index_all(index: &VectorIndex, request: IndexRequest) -> Result<IndexReport, ActivityError> {
    let IndexRequest {
        documents,
        chunks,
        vectors,
    } = request;
    if chunks.len() != vectors.len() {
        return Err(validation(format!(
            "{} vectors for {} chunks",
            vectors.len(),
            chunks.len()
        )));
    }
    let mut upserts: Vec<DocumentUpsert> = documents
        .iter()
        .map(|d| DocumentUpsert {
            doc_id: d.id.clone(),
            version: d.version.clone(),
            chunks: Vec::new(),
        })
        .collect();
    let position: std::collections::HashMap<&str, usize> = documents
        .iter()
        .enumerate()
        .map(|(i, d)| (d.id.as_str(), i))
        .collect();
    if position.len() != documents.len() {
        return Err(validation("a document ID is listed twice"));
    }
    for (c, vector) in chunks.into_iter().zip(vectors) {
        let Some(&i) = position.get(c.doc_id.as_str()) else {
            return Err(validation(format!(
                "chunk {} belongs to document {:?}, which is not listed",
                c.ordinal, c.doc_id
            )));
        };
        upserts[i].chunks.push(IndexChunk {
            ordinal: c.ordinal,
            text: c.text,
            source: c.source,
            vector,
        });
    }
    let outcomes = index
        .upsert_documents(upserts)
        .map_err(index_activity_error)?;
    let mut report = IndexReport {
        documents: outcomes.len(),
        chunks_indexed: 0,
        unchanged_documents: 0,
    };
    for o in outcomes {
        match o {
            Upsert::Unchanged => report.unchanged_documents += 1,
            Upsert::Replaced { n } => report.chunks_indexed += n,
        }
    }
    Ok(report)
}

/// [`INDEX_CHUNKS`]'s implementation. A worker whose process has no index (see
/// [`Models::set_index`]) fails the attempt with a retryable `IndexUnavailable`, so that a
/// later attempt can land on the worker that has it.
pub async fn index_chunks(
    models: Arc<Models>,
    ctx: ActivityContext,
    request: IndexRequest,
) -> Result<IndexReport, ActivityError> {
    let Some(index) = models.index() else {
        return Err(ActivityError::retryable(
            "IndexUnavailable",
            format!(
                "worker for workflow {} has no vector index: the index queue must be served by `baton worker --queue index` (or `baton dev`)",
                ctx.info().workflow_id
            ),
        ));
    };
    let started = Instant::now();
    let report = tokio::task::spawn_blocking(move || index_all(&index, request))
        .await
        .map_err(|e| ActivityError::retryable("IndexError", e.to_string()))??;
    tracing::info!(
        documents = report.documents,
        chunks_indexed = report.chunks_indexed,
        unchanged = report.unchanged_documents,
        ms = started.elapsed().as_millis() as u64,
        "documents indexed"
    );
    Ok(report)
}

// --- the search service ---------------------------------------------------------------

/// A request to `baton.api.search`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SearchRequest {
    /// The query text (1 to [`MAX_QUERY_CHARS`] characters).
    pub query: String,
    /// How many hits, 1 to [`MAX_K`] (default [`DEFAULT_K`]).
    #[serde(default = "default_k")]
    pub k: usize,
}

fn default_k() -> usize {
    DEFAULT_K
}

/// The reply of `baton.api.search`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SearchReply {
    /// The nearest chunks, best first.
    pub hits: Vec<Hit>,
    /// The index's size when it was searched.
    pub index: IndexStats,
}

/// Answers one search: embeds the query (on a blocking thread) and searches the index
/// exactly. Refusals are edge errors: `bad_request` for an empty or over-long query or a
/// `k` out of 1..=[`MAX_K`], `unavailable` when the model or the index is.
pub async fn search(
    models: Arc<Models>,
    request: SearchRequest,
) -> Result<SearchReply, ErrorReply> {
    let query = request.query.trim().to_string();
    if query.is_empty() {
        return Err(ErrorReply::new(ErrorCode::BadRequest, "the query is empty"));
    }
    let chars = query.chars().count();
    if chars > MAX_QUERY_CHARS {
        return Err(ErrorReply::new(
            ErrorCode::BadRequest,
            format!("the query is {chars} characters long; the limit is {MAX_QUERY_CHARS}"),
        ));
    }
    if request.k == 0 || request.k > MAX_K {
        return Err(ErrorReply::new(
            ErrorCode::BadRequest,
            format!("k is {}; it must be 1 to {MAX_K}", request.k),
        ));
    }
    let Some(index) = models.index() else {
        return Err(ErrorReply::new(
            ErrorCode::Unavailable,
            "this process has no vector index",
        ));
    };
    let k = request.k;
    tokio::task::spawn_blocking(move || {
        let embedder = models
            .embedder()
            .map_err(|e| ErrorReply::new(ErrorCode::Unavailable, e.message))?;
        let vector = embedder
            .embed(&[query.as_str()])
            .map_err(|e| ErrorReply::new(ErrorCode::Internal, format!("embedding the query: {e}")))?
            .pop()
            .ok_or_else(|| ErrorReply::new(ErrorCode::Internal, "the model returned no vector"))?;
        let hits = index.search(&vector, k).map_err(|e| match e {
            IndexError::Storage(m) => ErrorReply::new(ErrorCode::Unavailable, m),
            other => ErrorReply::new(ErrorCode::Internal, other.to_string()),
        })?;
        Ok(SearchReply {
            hits,
            index: index.stats(),
        })
    })
    .await
    .map_err(|e| ErrorReply::new(ErrorCode::Internal, e.to_string()))?
}

/// The search service, running; stops when dropped or [`stop`](SearchService::stop)ped.
pub struct SearchService {
    task: tokio::task::JoinHandle<()>,
}

impl SearchService {
    /// Stops serving.
    pub fn stop(self) {
        self.task.abort();
    }
}

impl Drop for SearchService {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Decodes a search request in the format its `Content-Type` names, and encodes the reply
/// (or refusal) in the same format.
async fn answer(models: Arc<Models>, message: &async_nats::Message) -> (Format, Vec<u8>) {
    let outcome = async {
        let format = Format::of_message(message).map_err(|e| {
            (
                Format::Json,
                ErrorReply::new(ErrorCode::BadRequest, e.to_string()),
            )
        })?;
        if message.payload.len() > MAX_EDGE_BODY {
            return Err((
                format,
                ErrorReply::new(
                    ErrorCode::PayloadTooLarge,
                    format!(
                        "body is {} bytes; the limit is {MAX_EDGE_BODY}",
                        message.payload.len()
                    ),
                ),
            ));
        }
        let request: SearchRequest = format.decode(&message.payload).map_err(|e| {
            (
                format,
                ErrorReply::new(
                    ErrorCode::BadRequest,
                    format!("expected {{\"query\": \"...\", \"k\": 1-{MAX_K}}}: {e}"),
                ),
            )
        })?;
        search(models, request)
            .await
            .map(|reply| (format, reply))
            .map_err(|e| (format, e))
    }
    .await;
    match outcome {
        Ok((format, reply)) => (format, format.encode(&reply).unwrap_or_default()),
        Err((format, error)) => (format, format.encode(&error).unwrap_or_default()),
    }
}

/// Serves `baton.api.search` (queue group [`SEARCH_QUEUE_GROUP`]) from `models`' index
/// until stopped. Call it in the process that owns the index.
pub async fn serve_search(
    client: async_nats::Client,
    models: Arc<Models>,
) -> anyhow::Result<SearchService> {
    let mut sub = client
        .queue_subscribe(SEARCH_SUBJECT, SEARCH_QUEUE_GROUP.into())
        .await
        .with_context(|| format!("subscribing to {SEARCH_SUBJECT}"))?;
    // The subscription is registered once the server has seen it: flush, so that a
    // request sent right after this returns finds a responder.
    client
        .flush()
        .await
        .context("flushing the search subscription")?;
    let task = tokio::spawn(async move {
        while let Some(message) = sub.next().await {
            let (client, models) = (client.clone(), models.clone());
            tokio::spawn(async move {
                let Some(reply_to) = message.reply.clone() else {
                    return;
                };
                let started = Instant::now();
                let (format, body) = answer(models, &message).await;
                let mut headers = async_nats::HeaderMap::new();
                headers.insert(
                    CONTENT_TYPE,
                    if format == Format::Msgpack {
                        MSGPACK
                    } else {
                        JSON
                    },
                );
                if let Err(e) = client
                    .publish_with_headers(reply_to, headers, body.into())
                    .await
                {
                    tracing::warn!(error = %e, "search reply failed");
                }
                tracing::debug!(ms = started.elapsed().as_millis() as u64, "search answered");
            });
        }
    });
    tracing::info!(subject = SEARCH_SUBJECT, "search service started");
    Ok(SearchService { task })
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_actors::ActivityInfo;

    fn is_kind(e: &ActivityError, kind: &str) -> bool {
        e.kind == kind && !e.retryable
    }

    fn ctx() -> ActivityContext {
        ActivityContext::new(
            ActivityInfo {
                workflow_id: "wf-test".into(),
                run_id: "run-test".into(),
                activity: "test".into(),
                seq: 0,
                attempt: 1,
            },
            |_| {},
        )
    }

    fn numbered(n: usize) -> String {
        (0..n)
            .map(|i| format!("w{i}"))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// [`chunk_text`] bounded by words and characters only.
    fn by_words(text: &str, chunk_words: usize, overlap_words: usize) -> Vec<String> {
        chunk_text(text, chunk_words, overlap_words, usize::MAX, &|_| 1)
    }

    fn one_each(words: &[&str]) -> Result<Vec<usize>, ActivityError> {
        Ok(vec![1; words.len()])
    }

    fn inline(id: &str, text: &str) -> DocumentSpec {
        DocumentSpec {
            id: Some(id.into()),
            text: Some(text.into()),
            path: None,
        }
    }

    fn file(path: &Path) -> DocumentSpec {
        DocumentSpec {
            path: Some(path.display().to_string()),
            ..DocumentSpec::default()
        }
    }

    fn input(documents: Vec<DocumentSpec>) -> IngestInput {
        IngestInput {
            documents,
            chunk_words: DEFAULT_CHUNK_WORDS,
            overlap_words: DEFAULT_OVERLAP_WORDS,
        }
    }

    // --- chunking ---

    #[test]
    fn consecutive_chunks_share_the_overlap() {
        let chunks = by_words(&numbered(25), 10, 3);
        assert_eq!(
            chunks,
            [
                "w0 w1 w2 w3 w4 w5 w6 w7 w8 w9",
                "w7 w8 w9 w10 w11 w12 w13 w14 w15 w16",
                "w14 w15 w16 w17 w18 w19 w20 w21 w22 w23",
                "w21 w22 w23 w24",
            ]
        );
        // No overlap: a partition.
        let chunks = by_words(&numbered(25), 10, 0);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks.join(" "), numbered(25));
    }

    #[test]
    fn chunk_boundaries() {
        // Exactly one window: one chunk; one word more: a second, short chunk.
        assert_eq!(by_words(&numbered(10), 10, 3), [numbered(10)]);
        assert_eq!(by_words(&numbered(11), 10, 3).len(), 2);
        assert_eq!(by_words(&numbered(11), 10, 3)[1], "w7 w8 w9 w10");
        // Fewer words than a window, and whitespace is normalised.
        assert_eq!(by_words("  a \n\n b\tc  ", 10, 3), ["a b c"]);
        assert_eq!(by_words("one", 1, 0), ["one"]);
        // The largest overlap still advances one word a window.
        assert_eq!(by_words("a b c d", 2, 1), ["a b", "b c", "c d"]);
    }

    #[test]
    fn empty_documents_have_no_chunks() {
        assert!(by_words("", 10, 3).is_empty());
        assert!(by_words(" \n\t ", 10, 3).is_empty());
        let request = ChunkRequest {
            documents: vec![
                Document {
                    id: "empty".into(),
                    source: "inline:empty".into(),
                    text: "  ".into(),
                    sha256: "e".into(),
                },
                Document {
                    id: "full".into(),
                    source: "inline:full".into(),
                    text: numbered(15),
                    sha256: "f".into(),
                },
            ],
            chunk_words: 10,
            overlap_words: 2,
        };
        let chunks = chunk_all(&request, 254, &one_each).unwrap();
        let keys: Vec<(&str, u32)> = chunks
            .iter()
            .map(|c| (c.doc_id.as_str(), c.ordinal))
            .collect();
        assert_eq!(keys, [("full", 0), ("full", 1)]);
        assert_eq!(chunks[1].source, "inline:full");
        assert_eq!(chunks[1].doc_sha256, "f");
    }

    #[test]
    fn chunks_stay_within_200_words_and_the_character_bound() {
        assert!(check_chunking(MAX_CHUNK_WORDS, 0).is_ok());
        let e = check_chunking(MAX_CHUNK_WORDS + 1, 0).unwrap_err();
        assert!(
            is_kind(&e, "ValidationError") && e.message.contains("201"),
            "{e:?}"
        );
        assert!(is_kind(
            &check_chunking(0, 0).unwrap_err(),
            "ValidationError"
        ));
        let e = check_chunking(10, 10).unwrap_err();
        assert!(e.message.contains("overlap_words (10)"), "{e:?}");

        let text = numbered(1_000);
        for c in by_words(&text, MAX_CHUNK_WORDS, 50) {
            assert!(c.split(' ').count() <= MAX_CHUNK_WORDS);
        }
        // Long words: a window ends before MAX_CHUNK_CHARS characters.
        let long = vec!["abcdefghij".repeat(5); 400].join(" ");
        let chunks = by_words(&long, 200, 20);
        assert!(chunks.len() > 1);
        for c in &chunks {
            assert!(c.chars().count() <= MAX_CHUNK_CHARS, "{}", c.len());
        }
        // A run without spaces (e.g. CJK) is split into words of MAX_WORD_CHARS.
        let cjk = "字".repeat(MAX_WORD_CHARS * 3 + 7);
        let chunks = by_words(&cjk, 2, 0);
        assert_eq!(chunks.len(), 2);
        assert_eq!(chunks[0].chars().count(), 2 * MAX_WORD_CHARS + 1);
        assert_eq!(chunks[1].chars().count(), MAX_WORD_CHARS + 1 + 7);
        assert_eq!(chunks.join(" ").replace(' ', ""), cjk, "nothing is lost");
    }

    #[test]
    fn chunks_end_at_the_token_budget() {
        // Words cost their length in tokens: "aaaa" is 4.
        let text = ["aaaa", "bb", "cccccc", "d", "eee", "ff", "g", "hhhhh"].join(" ");
        let cost = |w: &str| w.len();
        let chunks = chunk_text(&text, 10, 0, 8, &cost);
        assert_eq!(chunks, ["aaaa bb", "cccccc d", "eee ff g", "hhhhh"]);
        for c in &chunks {
            assert!(c.split(' ').map(cost).sum::<usize>() <= 8, "{c}");
        }
        // A window cut short (2 words of a 4-word target) carries over half the overlap.
        let chunks = chunk_text(&text, 4, 2, 8, &cost);
        assert_eq!(chunks[0], "aaaa bb");
        assert_eq!(chunks[1], "bb cccccc", "one word carried over");
        // A single word over the budget is a chunk of its own (the model truncates it).
        assert_eq!(
            chunk_text("x yyyyyyyyyy z", 10, 0, 5, &cost),
            ["x", "yyyyyyyyyy", "z"]
        );

        // chunk_all counts each distinct word once, with the given counter.
        let request = ChunkRequest {
            documents: vec![Document {
                id: "d".into(),
                source: "inline:d".into(),
                text: "to be or not to be".into(),
                sha256: String::new(),
            }],
            chunk_words: 100,
            overlap_words: 0,
        };
        let asked = std::sync::Mutex::new(Vec::new());
        let count = |ws: &[&str]| {
            asked
                .lock()
                .unwrap()
                .extend(ws.iter().map(|w| w.to_string()));
            Ok(ws.iter().map(|w| w.len()).collect())
        };
        let chunks = chunk_all(&request, 6, &count).unwrap();
        let texts: Vec<&str> = chunks.iter().map(|c| c.text.as_str()).collect();
        assert_eq!(texts, ["to be or", "not to", "be"]);
        assert_eq!(*asked.lock().unwrap(), ["be", "not", "or", "to"]);
        let failing =
            |_: &[&str]| Err(ActivityError::retryable("ModelUnavailable", "no tokenizer"));
        assert_eq!(
            chunk_all(&request, 6, &failing).unwrap_err().kind,
            "ModelUnavailable"
        );
    }

    #[test]
    fn too_many_chunks_is_a_validation_error_naming_the_document() {
        let documents = (0..3)
            .map(|i| Document {
                id: format!("doc-{i}"),
                source: format!("inline:doc-{i}"),
                text: numbered(800 * 10),
                sha256: String::new(),
            })
            .collect();
        let e = chunk_all(
            &ChunkRequest {
                documents,
                chunk_words: 10,
                overlap_words: 0,
            },
            254,
            &one_each,
        )
        .unwrap_err();
        assert!(is_kind(&e, "ValidationError"), "{e:?}");
        assert!(
            e.message.contains("\"doc-2\"") && e.message.contains("2400"),
            "{}",
            e.message
        );
    }

    // --- reading ---

    #[test]
    fn reads_files_and_inline_texts() {
        let dir = tempfile::tempdir().unwrap();
        let txt = dir.path().join("plain.txt");
        std::fs::write(&txt, "# not a heading in a .txt\nplain text").unwrap();
        let md = dir.path().join("notes.md");
        std::fs::write(
            &md,
            "# Title #\nSome *text*.\n\n```rust\n# [derive(Debug)]\nfn main() {}\n```\n#hashtag stays\n",
        )
        .unwrap();
        let mut named = file(&md);
        named.id = Some("notes".into());
        let docs = read_all(&input(vec![file(&txt), named, inline("memo", "hello")])).unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(
            docs[0].id,
            txt.display().to_string(),
            "the path is the default id"
        );
        assert_eq!(docs[0].text, "# not a heading in a .txt\nplain text");
        assert_eq!(
            docs[0].source,
            std::fs::canonicalize(&txt).unwrap().display().to_string()
        );
        assert_eq!(docs[1].id, "notes");
        assert_eq!(
            docs[1].text,
            "Title\nSome *text*.\n\n# [derive(Debug)]\nfn main() {}\n#hashtag stays\n"
        );
        assert_eq!(
            (docs[2].id.as_str(), docs[2].source.as_str()),
            ("memo", "inline:memo")
        );
        assert_eq!(
            docs[2].sha256,
            "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
        );
    }

    #[test]
    fn a_missing_file_is_a_document_error_naming_the_path() {
        let missing = "/nonexistent/baton/notes.md";
        let e = read_all(&input(vec![
            inline("ok", "fine"),
            DocumentSpec {
                path: Some(missing.into()),
                ..DocumentSpec::default()
            },
        ]))
        .unwrap_err();
        assert!(is_kind(&e, "DocumentError"), "{e:?}");
        assert!(e.message.contains(missing), "{}", e.message);

        let dir = tempfile::tempdir().unwrap();
        let e = read_all(&input(vec![file(dir.path())])).unwrap_err();
        assert!(
            is_kind(&e, "DocumentError") && e.message.contains("directory"),
            "{e:?}"
        );

        let bin = dir.path().join("blob.txt");
        std::fs::write(&bin, [0x66, 0x6f, 0xff, 0xfe]).unwrap();
        let e = read_all(&input(vec![file(&bin)])).unwrap_err();
        assert!(
            is_kind(&e, "DocumentError") && e.message.contains("not UTF-8"),
            "{e:?}"
        );
    }

    #[test]
    fn size_limits_are_validation_errors_naming_the_document() {
        let dir = tempfile::tempdir().unwrap();
        let big = dir.path().join("big.txt");
        std::fs::write(&big, "a ".repeat(MAX_DOCUMENT_BYTES / 2 + 1)).unwrap();
        let e = read_all(&input(vec![file(&big)])).unwrap_err();
        assert!(is_kind(&e, "ValidationError"), "{e:?}");
        assert!(
            e.message.contains("big.txt") && e.message.contains("2097154 bytes"),
            "{}",
            e.message
        );
        let e = read_all(&input(vec![inline(
            "huge",
            &"b".repeat(MAX_DOCUMENT_BYTES + 1),
        )]))
        .unwrap_err();
        assert!(
            is_kind(&e, "ValidationError") && e.message.contains("\"huge\""),
            "{e:?}"
        );
        // Each within the limit, together over it.
        let each = "c".repeat(MAX_DOCUMENT_BYTES);
        let e = read_all(&input(vec![
            inline("one", &each),
            inline("two", &each),
            inline("three", &each),
        ]))
        .unwrap_err();
        assert!(
            is_kind(&e, "ValidationError") && e.message.contains("\"three\""),
            "{e:?}"
        );
        // Too many documents.
        let many = (0..=MAX_DOCUMENTS)
            .map(|i| inline(&format!("d{i}"), "x"))
            .collect();
        let e = read_all(&input(many)).unwrap_err();
        assert!(
            is_kind(&e, "ValidationError") && e.message.contains("201 documents"),
            "{e:?}"
        );
    }

    #[test]
    fn malformed_inputs_are_validation_errors() {
        let cases: Vec<(Vec<DocumentSpec>, &str)> = vec![
            (vec![], "no documents"),
            (
                vec![DocumentSpec {
                    text: Some("t".into()),
                    ..DocumentSpec::default()
                }],
                "needs an \"id\"",
            ),
            (vec![DocumentSpec::default()], "give \"path\""),
            (
                vec![DocumentSpec {
                    id: Some("x".into()),
                    path: Some("a.md".into()),
                    text: Some("t".into()),
                }],
                "not both",
            ),
            (vec![inline("a", "x"), inline("a", "y")], "used twice"),
            (vec![inline(" ", "x")], "id is empty"),
        ];
        for (docs, expected) in cases {
            let e = read_all(&input(docs)).unwrap_err();
            assert!(is_kind(&e, "ValidationError"), "{e:?}");
            assert!(
                e.message.contains(expected),
                "{expected:?} in {}",
                e.message
            );
        }
        let mut bad = input(vec![inline("a", "x")]);
        bad.chunk_words = 500;
        assert!(read_all(&bad).unwrap_err().message.contains("chunk_words"));
    }

    #[test]
    fn the_input_decodes_with_defaults_and_refuses_unknown_fields() {
        let i: IngestInput = serde_json::from_value(serde_json::json!({
            "documents": [{"path": "a.md"}, {"id": "b", "text": "hi"}]
        }))
        .unwrap();
        assert_eq!((i.chunk_words, i.overlap_words), (120, 20));
        assert_eq!(i.documents[0].path.as_deref(), Some("a.md"));
        assert!(
            serde_json::from_value::<IngestInput>(serde_json::json!({
                "documents": [{"file": "a.md"}]
            }))
            .is_err()
        );
    }

    #[test]
    fn fingerprints_change_with_content_chunking_and_source() {
        let doc = Document {
            id: "d".into(),
            source: "/a.md".into(),
            text: "t".into(),
            sha256: "abc".into(),
        };
        let f = fingerprint(&doc, 120, 20, MODEL_NAME);
        assert_eq!(f, fingerprint(&doc.clone(), 120, 20, MODEL_NAME));
        assert_eq!(f.len(), 64);
        assert_ne!(f, fingerprint(&doc, 100, 20, MODEL_NAME));
        assert_ne!(f, fingerprint(&doc, 120, 10, MODEL_NAME));
        assert_ne!(f, fingerprint(&doc, 120, 20, "other-model"));
        let moved = Document {
            source: "/b.md".into(),
            ..doc.clone()
        };
        assert_ne!(f, fingerprint(&moved, 120, 20, MODEL_NAME));
        let edited = Document {
            sha256: "abd".into(),
            ..doc
        };
        assert_ne!(f, fingerprint(&edited, 120, 20, MODEL_NAME));
    }

    // --- indexing, with made-up vectors ---

    fn request(version: &str, texts: &[&str]) -> IndexRequest {
        IndexRequest {
            documents: vec![
                IndexedDocument {
                    id: "a".into(),
                    source: "inline:a".into(),
                    version: version.into(),
                },
                IndexedDocument {
                    id: "empty".into(),
                    source: "inline:empty".into(),
                    version: "e".into(),
                },
            ],
            chunks: texts
                .iter()
                .enumerate()
                .map(|(i, t)| Chunk {
                    doc_id: "a".into(),
                    source: "inline:a".into(),
                    ordinal: i as u32,
                    text: t.to_string(),
                    doc_sha256: "s".into(),
                })
                .collect(),
            vectors: (0..texts.len()).map(|i| vec![1.0, i as f32]).collect(),
        }
    }

    #[tokio::test]
    async fn index_chunks_upserts_idempotently_and_needs_an_index() {
        let no_index = Arc::new(Models::new("/nonexistent/baton-home"));
        let e = index_chunks(no_index, ctx(), request("v1", &["x"]))
            .await
            .unwrap_err();
        assert_eq!(e.kind, "IndexUnavailable");
        assert!(e.retryable);

        let dir = tempfile::tempdir().unwrap();
        let models = Arc::new(Models::new("/nonexistent/baton-home"));
        assert!(models.set_index(Arc::new(VectorIndex::open_dir(dir.path()).unwrap())));
        let r = index_chunks(models.clone(), ctx(), request("v1", &["x", "y"]))
            .await
            .unwrap();
        assert_eq!(
            r,
            IndexReport {
                documents: 2,
                chunks_indexed: 2,
                unchanged_documents: 0
            }
        );
        let r = index_chunks(models.clone(), ctx(), request("v1", &["x", "y"]))
            .await
            .unwrap();
        assert_eq!(
            r,
            IndexReport {
                documents: 2,
                chunks_indexed: 0,
                unchanged_documents: 2
            }
        );
        let r = index_chunks(models.clone(), ctx(), request("v2", &["z"]))
            .await
            .unwrap();
        assert_eq!((r.chunks_indexed, r.unchanged_documents), (1, 1));
        let index = models.index().unwrap();
        assert_eq!((index.stats().documents, index.stats().chunks), (2, 1));

        let mut bad = request("v3", &["x"]);
        bad.vectors.clear();
        let e = index_chunks(models, ctx(), bad).await.unwrap_err();
        assert!(is_kind(&e, "ValidationError"), "{e:?}");
    }

    #[test]
    fn the_factory_registers_document_ingest_and_routes_its_steps() {
        let r = super::super::factory(Arc::new(Models::new("/nonexistent/baton-home"))).unwrap();
        assert!(r.workflow_def(DOCUMENT_INGEST).is_some());
        assert_eq!(r.activities_of_queue(INDEX_QUEUE), ["index_chunks"]);
        let p = r.policies();
        let secs = |s: u64| s * 1000;
        for (name, queue, start_to_close_ms, heartbeat_ms, retry) in [
            ("read_documents", CPU_QUEUE, secs(60), None, cpu_retry()),
            ("chunk_documents", CPU_QUEUE, secs(60), None, cpu_retry()),
            (
                "embed_chunks",
                GPU_QUEUE,
                secs(600),
                Some(secs(30)),
                gpu_retry(),
            ),
            ("index_chunks", INDEX_QUEUE, secs(120), None, index_retry()),
        ] {
            let o = &p[name];
            assert!(r.activity_fn(name).is_some(), "{name}");
            assert_eq!(
                (
                    o.task_queue.as_str(),
                    o.start_to_close_ms,
                    o.heartbeat_timeout_ms,
                    &o.retry
                ),
                (queue, start_to_close_ms, heartbeat_ms, &retry),
                "{name}"
            );
        }
        let def = r.workflow_def(DOCUMENT_INGEST).unwrap();
        let check =
            |v: serde_json::Value| def.check_input(&baton_transport::Payload::encode(&v).unwrap());
        assert!(check(serde_json::json!({"documents": [{"path": "a.md"}]})).is_ok());
        assert!(check(serde_json::json!({"documents": [{"path": "a.md", "tags": []}]})).is_err());
        assert!(check(serde_json::json!({"docs": []})).is_err());
    }

    /// `$BATON_HOME`, or `<workspace>/.baton`; fails (never skips) without the model.
    fn real_models() -> Arc<Models> {
        let home = match std::env::var_os("BATON_HOME") {
            Some(h) if !h.is_empty() => std::path::PathBuf::from(h),
            _ => Path::new(env!("CARGO_MANIFEST_DIR"))
                .parent()
                .expect("workspace root")
                .join(".baton"),
        };
        let models = Models::new(&home);
        assert!(
            models.model_path().is_file(),
            "{} is missing: run `cargo xtask setup` (or set BATON_HOME)",
            models.model_path().display()
        );
        Arc::new(models)
    }

    /// A context whose heartbeat details are recorded as JSON.
    fn probe() -> (
        ActivityContext,
        Arc<std::sync::Mutex<Vec<serde_json::Value>>>,
    ) {
        let beats = Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = beats.clone();
        let ctx = ActivityContext::new(
            ActivityInfo {
                workflow_id: "wf-test".into(),
                run_id: "run-test".into(),
                activity: "embed_chunks".into(),
                seq: 2,
                attempt: 1,
            },
            move |d: Option<baton_transport::Payload>| {
                if let Some(d) = d {
                    sink.lock().unwrap().push(d.to_json());
                }
            },
        );
        (ctx, beats)
    }

    #[tokio::test]
    async fn embed_chunks_heartbeats_progress_and_reports_truncation() {
        let models = real_models();
        let mut texts: Vec<String> = (0..40).map(|i| format!("chunk number {i}")).collect();
        // Far over 256 tokens: embedded from its start, and reported.
        texts[33] = "antidisestablishmentarianism ".repeat(200);
        let (probe_ctx, beats) = probe();
        let out = embed_chunks(models, probe_ctx, texts).await.unwrap();
        assert_eq!(
            (out.model.as_str(), out.dim, out.vectors.len()),
            (MODEL_NAME, 384, 40)
        );
        assert_eq!(out.truncated, [33]);
        assert_eq!(
            *beats.lock().unwrap(),
            [0, 32, 40].map(|done| serde_json::json!({"done": done, "total": 40}))
        );
        let e = embed_chunks(
            Arc::new(Models::new("/nonexistent/baton-home")),
            ctx(),
            vec!["x".into(); MAX_CHUNKS + 1],
        )
        .await
        .unwrap_err();
        assert!(is_kind(&e, "ValidationError"), "{e:?}");
    }

    /// The four steps by hand, with the real model: topical queries find their document.
    #[tokio::test]
    async fn ingest_then_search_in_process_with_the_model() {
        let models = real_models();
        let dir = tempfile::tempdir().unwrap();
        assert!(models.set_index(Arc::new(VectorIndex::open_dir(dir.path()).unwrap())));
        let input = IngestInput {
            documents: vec![
                inline(
                    "bread",
                    "Knead the dough for ten minutes, let it rise until doubled, then bake \
                     the loaf in a hot oven until the crust is golden.",
                ),
                inline(
                    "stars",
                    "Astronomers use telescopes to find exoplanets orbiting distant stars \
                     in other galaxies.",
                ),
                inline(
                    "rust",
                    "The Rust borrow checker enforces ownership and lifetimes of references \
                     at compile time.",
                ),
                inline("blank", "   "),
            ],
            chunk_words: 12,
            overlap_words: 4,
        };
        let run = |input: IngestInput| {
            let models = models.clone();
            async move {
                let docs = read_documents(ctx(), input.clone()).await.unwrap();
                let request = ChunkRequest {
                    documents: docs,
                    chunk_words: input.chunk_words,
                    overlap_words: input.overlap_words,
                };
                let chunks = chunk_documents(models.clone(), ctx(), request.clone())
                    .await
                    .unwrap();
                let texts = chunks.iter().map(|c| c.text.clone()).collect();
                let embedded = embed_chunks(models.clone(), ctx(), texts).await.unwrap();
                let documents = request
                    .documents
                    .iter()
                    .map(|d| IndexedDocument {
                        id: d.id.clone(),
                        source: d.source.clone(),
                        version: fingerprint(
                            d,
                            input.chunk_words,
                            input.overlap_words,
                            &embedded.model,
                        ),
                    })
                    .collect();
                let n = chunks.len();
                assert_eq!(
                    embedded.truncated,
                    Vec::<usize>::new(),
                    "chunked, not truncated"
                );
                let report = index_chunks(
                    models,
                    ctx(),
                    IndexRequest {
                        documents,
                        chunks,
                        vectors: embedded.vectors,
                    },
                )
                .await
                .unwrap();
                (n, report)
            }
        };
        let (n, report) = run(input.clone()).await;
        assert!(n >= 4, "{n}");
        assert_eq!(
            report,
            IndexReport {
                documents: 4,
                chunks_indexed: n,
                unchanged_documents: 0
            }
        );
        for (query, doc) in [
            ("how do I bake bread", "bread"),
            ("planets around other suns", "stars"),
            ("memory safety in a systems programming language", "rust"),
        ] {
            let reply = search(
                models.clone(),
                SearchRequest {
                    query: query.into(),
                    k: 3,
                },
            )
            .await
            .unwrap();
            assert_eq!(reply.hits[0].doc_id, doc, "{query:?}: {:#?}", reply.hits);
            assert_eq!(reply.hits[0].source, format!("inline:{doc}"));
            assert!(reply.hits[0].score > reply.hits[2].score);
            assert_eq!(reply.index.chunks, n);
        }
        let (_, again) = run(input.clone()).await;
        assert_eq!(
            again,
            IndexReport {
                documents: 4,
                chunks_indexed: 0,
                unchanged_documents: 4
            }
        );
        // Dense text (a markdown table of identifiers, ~2 characters a token): 200-word
        // windows would be ~500 tokens; the tokenizer's count ends them early instead.
        let row = "| `PR_SET_PDEATHSIG` | `Nats-Expected-Last-Subject-Sequence` | 0x7f3a_9c21 |";
        let dense = IngestInput {
            documents: vec![inline("table", &vec![row; 60].join("\n"))],
            chunk_words: MAX_CHUNK_WORDS,
            overlap_words: 20,
        };
        let (n_dense, report) = run(dense).await;
        assert!(n_dense > 60 * 10 / MAX_CHUNK_WORDS + 1, "{n_dense} chunks");
        assert_eq!(report.chunks_indexed, n_dense);
    }

    #[tokio::test]
    async fn search_refuses_bad_requests() {
        let dir = tempfile::tempdir().unwrap();
        let models = Arc::new(Models::new("/nonexistent/baton-home"));
        let code = |r: Result<SearchReply, ErrorReply>| r.unwrap_err().error.code;
        let req = |query: &str, k: usize| SearchRequest {
            query: query.into(),
            k,
        };
        assert_eq!(
            code(search(models.clone(), req("rust", 5)).await),
            ErrorCode::Unavailable,
            "no index"
        );
        models.set_index(Arc::new(VectorIndex::open_dir(dir.path()).unwrap()));
        assert_eq!(
            code(search(models.clone(), req("  ", 5)).await),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(search(models.clone(), req("rust", 0)).await),
            ErrorCode::BadRequest
        );
        assert_eq!(
            code(search(models.clone(), req("rust", MAX_K + 1)).await),
            ErrorCode::BadRequest
        );
        let long = "x".repeat(MAX_QUERY_CHARS + 1);
        assert_eq!(
            code(search(models.clone(), req(&long, 5)).await),
            ErrorCode::BadRequest
        );
        // No model files: unavailable, not a crash.
        assert_eq!(
            code(search(models, req("rust", 5)).await),
            ErrorCode::Unavailable
        );
        let r: SearchRequest = serde_json::from_str(r#"{"query": "q"}"#).unwrap();
        assert_eq!(r.k, DEFAULT_K);
        assert!(serde_json::from_str::<SearchRequest>(r#"{"q": "q"}"#).is_err());
    }
}
