//! Support for the workspace integration tests: real `nats-server` and `baton` processes.
//!
//! - [`NatsServer`]: a private nats-server (JetStream on, `sync_interval: always`, 8 MB
//!   payloads) on a free port, with its store in a temporary directory; SIGKILLed on drop.
//! - [`BatonProcess`]: a `baton` process whose output goes to a log file the test can wait
//!   on and count in; SIGKILLed on drop, its log tail printed when the test is failing.
//! - [`Client`]: the edge API (start, result, describe, history, list) over NATS, retrying
//!   while nobody answers yet (the orchestrator is still starting).
//!
//! Files come from `cargo xtask setup` ([`baton_home`]) and the `baton` binary from
//! `cargo build` ([`baton_bin`]); `cargo xtask test` does both and sets the variables.

use std::{
    collections::HashMap,
    fs::{File, OpenOptions},
    io::Write as _,
    net::{SocketAddr, TcpListener, TcpStream},
    path::{Path, PathBuf},
    process::{Child, Command, ExitStatus, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, anyhow, bail};
use async_nats::{HeaderMap, RequestErrorKind};
use baton_actors::{history::Event, journal::MirrorGroup};
use baton_transport::{
    codec::{self, CONTENT_TYPE, JSON},
    jetstream::local_server_config,
    subject,
    wire::{HistoryPages, HistoryRequest, Reply, ResultReply, StartReply, StartRequest},
};
use bytes::Bytes;
use futures::StreamExt;
use serde_json::json;
use tempfile::TempDir;

/// The workspace root (the parent of this crate's directory).
pub fn workspace_root() -> PathBuf {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().unwrap_or(manifest).to_path_buf()
}

/// `$BATON_HOME`, or `<workspace>/.baton`: where `cargo xtask setup` put nats-server, ONNX
/// Runtime and the model.
pub fn baton_home() -> PathBuf {
    match std::env::var_os("BATON_HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home),
        _ => workspace_root().join(".baton"),
    }
}

/// `$BATON_BIN`, or `<workspace>/target/debug/baton`.
///
/// # Panics
/// When the binary does not exist, telling how to build it.
pub fn baton_bin() -> PathBuf {
    let bin = match std::env::var_os("BATON_BIN") {
        Some(bin) if !bin.is_empty() => PathBuf::from(bin),
        _ => workspace_root().join("target").join("debug").join("baton"),
    };
    assert!(
        bin.is_file(),
        "the baton binary is missing at {}: run `cargo xtask test` (or `cargo build --bins` and set BATON_BIN)",
        bin.display()
    );
    bin
}

/// `<baton_home>/bin/nats-server`.
///
/// # Panics
/// When it does not exist, telling how to fetch it.
pub fn nats_server_bin() -> PathBuf {
    let bin = baton_home().join("bin").join("nats-server");
    assert!(
        bin.is_file(),
        "nats-server is missing at {}: run `cargo xtask setup` (or set BATON_HOME to a directory it set up)",
        bin.display()
    );
    bin
}

/// A TCP port that was free a moment ago on 127.0.0.1 (bound to port 0, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding 127.0.0.1:0")
}

/// Opens `path` for appending, creating it.
fn append(path: &Path) -> Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))
}

/// The file's text, ANSI colour codes removed; empty if unreadable.
fn read_log(path: &Path) -> String {
    let bytes = std::fs::read(path).unwrap_or_default();
    strip_ansi(&String::from_utf8_lossy(&bytes))
}

/// Removes ANSI escape sequences (`ESC [ ... letter`).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// SIGKILLs a child and reaps it; nothing if it has already exited.
fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

// --- nats-server ----------------------------------------------------------------------

/// A private nats-server with JetStream, killed (SIGKILL) and reaped on drop.
///
/// Config: `listen: 127.0.0.1:<port>`, `max_payload: 8MB`,
/// `jetstream { store_dir: "<tmp>/js", sync_interval: always }`: every JetStream write is
/// fsynced, so a SIGKILL loses nothing that was acknowledged.
pub struct NatsServer {
    child: Option<Child>,
    port: u16,
    config: PathBuf,
    log: PathBuf,
    dir: TempDir,
}

impl NatsServer {
    /// Starts a server on a free port and waits until it accepts clients.
    pub async fn start() -> Result<NatsServer> {
        let dir = tempfile::Builder::new().prefix("baton-nats-").tempdir()?;
        let port = free_port();
        let store = dir.path().join("js");
        let config = dir.path().join("nats.conf");
        std::fs::write(&config, local_server_config(port, &store))?;
        let log = dir.path().join("nats.log");
        let mut server = NatsServer {
            child: None,
            port,
            config,
            log,
            dir,
        };
        server.launch().await?;
        Ok(server)
    }

    /// Spawns the process on the configured port and waits until a client can connect.
    async fn launch(&mut self) -> Result<()> {
        let out = append(&self.log)?;
        let child = Command::new(nats_server_bin())
            .arg("-c")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out)
            .spawn()
            .context("spawning nats-server")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(15);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.port));
        loop {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                bail!(
                    "nats-server exited with {status} before accepting clients; its log:\n{}",
                    self.log_contents()
                );
            }
            if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
                let connect = async_nats::ConnectOptions::new()
                    .connection_timeout(Duration::from_secs(2))
                    .connect(self.url());
                if let Ok(client) = connect.await {
                    drop(client);
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server did not accept clients on port {} in 15 s; its log:\n{}",
                    self.port,
                    self.log_contents()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The JetStream store directory (kept across [`restart`](Self::restart)).
    pub fn store_dir(&self) -> PathBuf {
        self.dir.path().join("js")
    }

    /// The server's log file.
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The server's log so far.
    pub fn log_contents(&self) -> String {
        read_log(&self.log)
    }

    /// The process ID, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// A new client connection.
    pub async fn connect(&self) -> Result<async_nats::Client> {
        async_nats::connect(self.url())
            .await
            .with_context(|| format!("connecting to {}", self.url()))
    }

    /// SIGKILLs the server and reaps it (no clean shutdown).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            kill_and_reap(&mut child);
        }
    }

    /// SIGKILLs the server and starts it again on the same port with the same store.
    pub async fn restart(&mut self) -> Result<()> {
        self.kill();
        let mut log = append(&self.log)?;
        writeln!(log, "===== restarted by the test harness =====")?;
        self.launch().await
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!(
                "----- nats-server log tail ({}) -----\n{}\n-----",
                self.log.display(),
                tail(&self.log_contents(), 20)
            );
        }
    }
}

// --- baton processes ------------------------------------------------------------------

/// A child process (normally `baton`) whose stdout and stderr are appended to a log file.
/// SIGKILLed and reaped on drop; when the test is panicking its log tail is printed and
/// its temporary directory kept.
pub struct BatonProcess {
    child: Option<Child>,
    program: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    log: PathBuf,
    dir: Option<TempDir>,
}

impl BatonProcess {
    /// Spawns [`baton_bin`] with `args`, `BATON_HOME` set to [`baton_home`] and
    /// `RUST_LOG=info`.
    pub fn spawn<I, S>(args: I) -> Result<BatonProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::spawn_with_env(args, &[])
    }

    /// Like [`spawn`](Self::spawn), with more environment variables (which may override
    /// `RUST_LOG`).
    pub fn spawn_with_env<I, S>(args: I, envs: &[(&str, &str)]) -> Result<BatonProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::spawn_program(&baton_bin(), args, envs)
    }

    /// Spawns any program the same way (the harness's own tests use a shell).
    pub fn spawn_program<I, S>(
        program: &Path,
        args: I,
        envs: &[(&str, &str)],
    ) -> Result<BatonProcess>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        let dir = tempfile::Builder::new().prefix("baton-proc-").tempdir()?;
        let name = program
            .file_name()
            .map_or("process".into(), |n| n.to_string_lossy().into_owned());
        let mut p = BatonProcess {
            child: None,
            program: program.to_path_buf(),
            args: args.into_iter().map(|a| a.as_ref().to_string()).collect(),
            envs: envs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            log: dir.path().join(format!("{name}.log")),
            dir: Some(dir),
        };
        p.launch()?;
        Ok(p)
    }

    fn launch(&mut self) -> Result<()> {
        let out = append(&self.log)?;
        let mut cmd = Command::new(&self.program);
        cmd.args(&self.args)
            .env("BATON_HOME", baton_home())
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .envs(self.envs.iter().map(|(k, v)| (k, v)))
            .stdin(Stdio::null())
            .stdout(out.try_clone()?)
            .stderr(out);
        let child = cmd
            .spawn()
            .with_context(|| format!("spawning {} {:?}", self.program.display(), self.args))?;
        self.child = Some(child);
        Ok(())
    }

    /// The process ID of the current (or last) child.
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map_or(0, Child::id)
    }

    /// The log file (stdout and stderr of every life of the process).
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// The log so far, ANSI colour codes removed.
    pub fn log_contents(&self) -> String {
        read_log(&self.log)
    }

    /// How many times `pattern` occurs in the log.
    pub fn count_in_log(&self, pattern: &str) -> usize {
        self.log_contents().matches(pattern).count()
    }

    /// Waits until `pattern` appears in the log. Fails on timeout, or as soon as the
    /// process has exited without logging it; the error carries the log tail.
    pub async fn wait_for_log(&mut self, pattern: &str, timeout: Duration) -> Result<()> {
        self.wait_for_log_count(pattern, 1, timeout).await
    }

    /// Waits until `pattern` occurs at least `count` times in the log.
    pub async fn wait_for_log_count(
        &mut self,
        pattern: &str,
        count: usize,
        timeout: Duration,
    ) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            let exited = self.try_status();
            let log = self.log_contents();
            let seen = log.matches(pattern).count();
            if seen >= count {
                return Ok(());
            }
            if let Some(status) = exited {
                bail!(
                    "{} exited with {status} having logged {pattern:?} {seen} of {count} times; log tail:\n{}",
                    self.program.display(),
                    tail(&log, 40)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "{pattern:?} logged {seen} of {count} times within {timeout:?}; log tail:\n{}",
                    tail(&log, 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The exit status if the process has exited (and is reaped), else `None`.
    pub fn try_status(&mut self) -> Option<ExitStatus> {
        self.child
            .as_mut()
            .and_then(|c| c.try_wait().ok().flatten())
    }

    /// Whether the process is still running.
    pub fn is_running(&mut self) -> bool {
        self.child.is_some() && self.try_status().is_none()
    }

    /// Waits for the process to exit on its own, up to `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if self.child.is_none() {
                bail!("no process is running");
            }
            if let Some(status) = self.try_status() {
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!(
                    "the process did not exit within {timeout:?}; log tail:\n{}",
                    tail(&self.log_contents(), 40)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// SIGKILLs the process and reaps it: a crash, no shutdown code runs.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_and_reap(child);
        }
    }

    /// Kills the process if it runs, then starts it again with the same program, arguments
    /// and environment, appending to the same log (after a marker line).
    pub fn restart(&mut self) -> Result<()> {
        self.kill();
        let mut log = append(&self.log)?;
        writeln!(log, "===== restarted by the test harness =====")?;
        self.launch()
    }
}

impl Drop for BatonProcess {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            // Keep the log for a post-mortem.
            if let Some(dir) = self.dir.take() {
                let _ = dir.keep();
            }
            eprintln!(
                "----- {} {:?} log tail ({}) -----\n{}\n-----",
                self.program.display(),
                self.args,
                self.log.display(),
                tail(&self.log_contents(), 60)
            );
        }
    }
}

// --- the edge client ------------------------------------------------------------------

/// How long one request waits for its reply.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How long requests keep being retried while nobody answers on their subject.
pub const NO_RESPONDERS_GRACE: Duration = Duration::from_secs(30);

/// A client of Baton's edge API (JSON bodies).
#[derive(Clone)]
pub struct Client {
    nats: async_nats::Client,
}

impl Client {
    /// Connects to a NATS server.
    pub async fn connect(url: &str) -> Result<Client> {
        let nats = async_nats::connect(url)
            .await
            .with_context(|| format!("connecting to {url}"))?;
        Ok(Client { nats })
    }

    /// Wraps an existing connection.
    pub fn new(nats: async_nats::Client) -> Client {
        Client { nats }
    }

    /// The NATS connection.
    pub fn nats(&self) -> &async_nats::Client {
        &self.nats
    }

    /// Sends a request and returns the reply message. Retried for up to
    /// [`NO_RESPONDERS_GRACE`] while no one is subscribed to the subject; each attempt waits
    /// `timeout` for the reply (a timeout is not retried).
    pub async fn request_raw(
        &self,
        subject: &str,
        headers: HeaderMap,
        body: Bytes,
        timeout: Duration,
    ) -> Result<async_nats::Message> {
        let deadline = Instant::now() + NO_RESPONDERS_GRACE;
        loop {
            let request = async_nats::Request::new()
                .headers(headers.clone())
                .payload(body.clone())
                .timeout(Some(timeout));
            match self.nats.send_request(subject.to_string(), request).await {
                Ok(message) => return Ok(message),
                Err(e)
                    if e.kind() == RequestErrorKind::NoResponders && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                Err(e) => return Err(anyhow!("request to {subject}: {e}")),
            }
        }
    }

    /// A JSON request: `body` as JSON with `Content-Type: application/json`, the reply
    /// parsed as JSON.
    pub async fn request_json(
        &self,
        subject: &str,
        body: &serde_json::Value,
        timeout: Duration,
    ) -> Result<serde_json::Value> {
        let bytes = Bytes::from(serde_json::to_vec(body)?);
        let message = self
            .request_raw(subject, json_headers(), bytes, timeout)
            .await?;
        parse_json(subject, &message.payload)
    }

    /// Starts a workflow: `{"workflow_id"?, "input"}` to `baton.start.<workflow_type>`.
    /// A refusal is `Ok(Reply::Err(..))`; transport failures are `Err`.
    pub async fn start(
        &self,
        workflow_type: &str,
        workflow_id: Option<&str>,
        input: serde_json::Value,
    ) -> Result<Reply<StartReply>> {
        let request = StartRequest {
            workflow_id: workflow_id.map(str::to_string),
            input,
            ..Default::default()
        };
        let reply = self
            .request_json(
                &subject::start(workflow_type),
                &serde_json::to_value(&request)?,
                REQUEST_TIMEOUT,
            )
            .await?;
        serde_json::from_value(reply.clone())
            .with_context(|| format!("decoding the start reply {reply}"))
    }

    /// Sends any body with any headers to any subject (e.g. malformed starts, MessagePack);
    /// the reply parsed as JSON.
    pub async fn start_raw(
        &self,
        subject: &str,
        headers: HeaderMap,
        body: impl Into<Bytes>,
    ) -> Result<serde_json::Value> {
        let message = self
            .request_raw(subject, headers, body.into(), REQUEST_TIMEOUT)
            .await?;
        parse_json(subject, &message.payload)
    }

    /// The workflow's result, the orchestrator waiting up to `wait_ms` for it to close.
    /// An error reply (e.g. `not_found`) is an `Err` naming its code.
    pub async fn result(&self, workflow_id: &str, wait_ms: u64) -> Result<ResultReply> {
        let body = json!({"workflow_id": workflow_id, "wait_ms": wait_ms});
        let timeout = REQUEST_TIMEOUT + Duration::from_millis(wait_ms);
        let reply = self
            .request_json(subject::API_RESULT, &body, timeout)
            .await?;
        decode_reply(subject::API_RESULT, reply)
    }

    /// Waits until the workflow closes (asking with `wait_ms` of up to 5 s at a time),
    /// failing after `timeout`.
    pub async fn wait_result(&self, workflow_id: &str, timeout: Duration) -> Result<ResultReply> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let wait = left.min(Duration::from_secs(5)).as_millis() as u64;
            match self.result(workflow_id, wait).await? {
                ResultReply::Running if Instant::now() < deadline => {}
                ResultReply::Running => {
                    bail!("workflow {workflow_id} still running after {timeout:?}")
                }
                closed => return Ok(closed),
            }
        }
    }

    /// `baton.api.describe` for one workflow: the raw JSON reply (a `WorkflowInfo` or an
    /// error reply).
    pub async fn describe(&self, workflow_id: &str) -> Result<serde_json::Value> {
        self.request_json(
            subject::API_DESCRIBE,
            &json!({"workflow_id": workflow_id}),
            REQUEST_TIMEOUT,
        )
        .await
    }

    /// `baton.api.history` for one workflow, every page of it: `{workflow_id, run_id,
    /// events, pages}`, or the first error reply.
    pub async fn history(&self, workflow_id: &str) -> Result<serde_json::Value> {
        self.history_in_pages(workflow_id, None).await
    }

    /// Like [`Self::history`], asking for pages of at most `max_bytes` of events.
    pub async fn history_in_pages(
        &self,
        workflow_id: &str,
        max_bytes: Option<u64>,
    ) -> Result<serde_json::Value> {
        let mut pages = HistoryPages::new(HistoryRequest {
            workflow_id: workflow_id.into(),
            max_bytes,
            ..Default::default()
        });
        while let Some(request) = pages.next_request() {
            let page = self
                .request_json(
                    subject::API_HISTORY,
                    &serde_json::to_value(request)?,
                    REQUEST_TIMEOUT,
                )
                .await?;
            if page.get("error").is_some() {
                return Ok(page);
            }
            pages.add(page)?;
        }
        Ok(pages.into_whole().expect("at least one page"))
    }

    /// The `type`s of the workflow's history events, in order.
    pub async fn history_types(&self, workflow_id: &str) -> Result<Vec<String>> {
        let h = self.history(workflow_id).await?;
        let events = h["events"]
            .as_array()
            .ok_or_else(|| anyhow!("no events in the history reply {h}"))?;
        Ok(events
            .iter()
            .map(|e| e["type"].as_str().unwrap_or("?").to_string())
            .collect())
    }

    /// `baton.api.list`: the raw JSON reply.
    pub async fn list(
        &self,
        status: Option<&str>,
        limit: Option<usize>,
    ) -> Result<serde_json::Value> {
        let mut body = json!({});
        if let Some(s) = status {
            body["status"] = json!(s);
        }
        if let Some(l) = limit {
            body["limit"] = json!(l);
        }
        self.request_json(subject::API_LIST, &body, REQUEST_TIMEOUT)
            .await
    }
}

/// `Content-Type: application/json`.
pub fn json_headers() -> HeaderMap {
    let mut h = HeaderMap::new();
    h.insert(CONTENT_TYPE, JSON);
    h
}

fn parse_json(subject: &str, payload: &[u8]) -> Result<serde_json::Value> {
    serde_json::from_slice(payload).with_context(|| {
        format!(
            "the reply on {subject} is not JSON: {:?}",
            String::from_utf8_lossy(payload)
        )
    })
}

fn decode_reply<T: serde::de::DeserializeOwned>(
    subject: &str,
    reply: serde_json::Value,
) -> Result<T> {
    let decoded: Reply<T> = serde_json::from_value(reply.clone())
        .with_context(|| format!("decoding the reply on {subject}: {reply}"))?;
    decoded
        .into_result()
        .map_err(|e| anyhow!("{subject} refused: {:?}: {}", e.code, e.message))
}

/// Every message of the journal's JetStream mirror (`BATON_HISTORY`): group commits, in
/// the order they were stored.
pub async fn mirror_groups(nats: &async_nats::Client) -> Result<Vec<MirrorGroup>> {
    let js = async_nats::jetstream::new(nats.clone());
    let mut stream = js.get_stream(subject::HISTORY_STREAM).await?;
    let total = stream.info().await?.state.messages;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: subject::HISTORY_ALL.into(),
            ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
            inactive_threshold: std::time::Duration::from_secs(60),
            ..Default::default()
        })
        .await?;
    let mut out = Vec::new();
    // Pulls of a bounded size: a default pull (200 messages) of large mirror messages (up
    // to the 8 MB server limit each) overflows the client's pending buffer, and the
    // messages it drops are not delivered again (no acks).
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(64)
        .max_bytes_per_batch(16 << 20)
        .messages()
        .await?;
    while (out.len() as u64) < total {
        let read = out.len();
        let m = tokio::time::timeout(std::time::Duration::from_secs(30), messages.next())
            .await
            .map_err(|_| anyhow!("the mirror stopped after {read} of {total} messages"))?
            .ok_or_else(|| anyhow!("the mirror ended after {read} of {total} messages"))?
            .map_err(|e| anyhow!("reading the mirror: {e}"))?;
        out.push(codec::decode(&m.payload)?);
    }
    Ok(out)
}

/// Every event of the journal's JetStream mirror, by run.
pub async fn read_mirror(nats: &async_nats::Client) -> Result<HashMap<String, Vec<Event>>> {
    let mut out: HashMap<String, Vec<Event>> = HashMap::new();
    for group in mirror_groups(nats).await? {
        for run in group.runs {
            out.entry(run.record.run_id).or_default().extend(run.events);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ansi_codes_are_stripped() {
        assert_eq!(
            strip_ansi("\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m ready"),
            "2026  INFO ready"
        );
        assert_eq!(strip_ansi("plain"), "plain");
    }

    #[test]
    fn tail_keeps_the_last_lines() {
        assert_eq!(tail("a\nb\nc", 2), "b\nc");
        assert_eq!(tail("a", 5), "a");
    }
}
