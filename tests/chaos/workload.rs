//! The workload: closed-loop clients that start `chaos_pipeline` runs and wait for their
//! results, through whatever faults are being injected, and the ledger of what was
//! started, acknowledged and answered.
//!
//! A client behaves as a careful user does: a start whose reply is lost (the orchestrator
//! died) is sent again with the same workflow ID until a reply comes, and so is one
//! refused as `unavailable` (the start was not made durable: a full disk, a failed
//! commit); a result request that fails is asked again. Every reply is kept, with the
//! time of each refusal, so duplicates can be counted and refusals judged.

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use baton_tests::Client;
use baton_transport::wire::{Reply, ResultReply, StartStatus};
use serde_json::Value;

use crate::model::{self, Expected, Limits, Rng, Step};

/// The workflow type under test.
pub const WORKFLOW: &str = "chaos_pipeline";

/// One reply to a start request.
#[derive(Debug, Clone, PartialEq)]
pub enum StartAnswer {
    /// `"started"`, naming the run.
    Started(String),
    /// `"duplicate"`, naming the run that holds the ID.
    Duplicate(String),
    /// An error reply, with its code.
    Refused(String),
}

/// What the ledger knows of one workflow ID.
#[derive(Debug, Clone)]
pub struct Entry {
    /// The input of its first start.
    pub input: Value,
    /// What the model expects.
    pub expected: Expected,
    /// Every reply to a start of this ID, in order.
    pub answers: Vec<StartAnswer>,
    /// When each `Refused` answer came (Unix ms), in order.
    pub refused_at_ms: Vec<u64>,
    /// Whether a start was acknowledged (`started` or `duplicate`).
    pub acked: bool,
    /// The closed result, once read.
    pub result: Option<ResultReply>,
}

/// The ledger: workflow ID -> entry.
#[derive(Clone, Default)]
pub struct Ledger(Arc<Mutex<BTreeMap<String, Entry>>>);

impl Ledger {
    /// Adds an ID before its first start.
    pub fn add(&self, id: &str, input: Value, expected: Expected) {
        self.0.lock().expect("ledger").insert(
            id.to_string(),
            Entry {
                input,
                expected,
                answers: Vec::new(),
                refused_at_ms: Vec::new(),
                acked: false,
                result: None,
            },
        );
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut Entry)) {
        if let Some(e) = self.0.lock().expect("ledger").get_mut(id) {
            f(e);
        }
    }

    /// A copy of everything.
    pub fn snapshot(&self) -> BTreeMap<String, Entry> {
        self.0.lock().expect("ledger").clone()
    }

    /// How many IDs.
    pub fn len(&self) -> usize {
        self.0.lock().expect("ledger").len()
    }
}

/// Unix milliseconds.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Sends one start and records its reply; `None` when no reply came (transport error).
pub async fn start_once(
    client: &Client,
    ledger: &Ledger,
    id: &str,
    input: &Value,
) -> Option<StartAnswer> {
    let answer = match client.start(WORKFLOW, Some(id), input.clone()).await {
        Ok(Reply::Ok(r)) => match r.status {
            StartStatus::Started => StartAnswer::Started(r.run_id),
            // The driver sends no signal-with-start; a signaled run exists like a duplicate.
            StartStatus::Duplicate | StartStatus::Signaled => StartAnswer::Duplicate(r.run_id),
        },
        Ok(Reply::Err(e)) => StartAnswer::Refused(
            serde_json::to_value(e.error.code)
                .ok()
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default(),
        ),
        Err(_) => return None,
    };
    let acked = matches!(answer, StartAnswer::Started(_) | StartAnswer::Duplicate(_));
    let a = answer.clone();
    let at = now_ms();
    ledger.update(id, |e| {
        if matches!(a, StartAnswer::Refused(_)) {
            e.refused_at_ms.push(at);
        }
        e.answers.push(a);
        e.acked |= acked;
    });
    Some(answer)
}

/// Like [`start_until_answered`], a refusal as `unavailable` (not made durable) sent
/// again too, 250 ms later: until the start is acknowledged, refused otherwise, or
/// `deadline`.
pub async fn start_until_acked(
    client: &Client,
    ledger: &Ledger,
    id: &str,
    input: &Value,
    deadline: impl Fn() -> Instant,
) -> Option<StartAnswer> {
    loop {
        match start_until_answered(client, ledger, id, input, deadline()).await {
            Some(StartAnswer::Refused(code)) if code == "unavailable" => {
                if Instant::now() > deadline() {
                    return Some(StartAnswer::Refused(code));
                }
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
            other => return other,
        }
    }
}

/// Starts `id` until a reply comes (or `deadline`): the same ID each time, so a start
/// that was made durable before its reply was lost is answered `duplicate`.
pub async fn start_until_answered(
    client: &Client,
    ledger: &Ledger,
    id: &str,
    input: &Value,
    deadline: Instant,
) -> Option<StartAnswer> {
    loop {
        if let Some(a) = start_once(client, ledger, id, input).await {
            return Some(a);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `id` is closed, asking again after errors, until `deadline`; records it.
pub async fn wait_closed(
    client: &Client,
    ledger: &Ledger,
    id: &str,
    deadline: impl Fn() -> Instant,
) -> Option<ResultReply> {
    loop {
        match client.result(id, 5_000).await {
            Ok(ResultReply::Running) => {}
            Ok(closed) => {
                let c = closed.clone();
                ledger.update(id, |e| e.result = Some(c));
                return Some(closed);
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
        if Instant::now() > deadline() {
            return None;
        }
    }
}

/// How runs are generated for a scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Profile {
    /// [`model::standard`] runs.
    Standard,
    /// Scenario 13: each ID started 3 times at once, again while it runs, and again with
    /// another input after it closed.
    Duplicates,
    /// Scenario 15: every second run has one large result, from the [`Workload`]'s
    /// `oversize` cases in turn.
    Oversize,
}

/// A large result of scenario 15: its size, and whether the workflow hands it to a next
/// activity (so the journal records it twice in one append).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Blob {
    /// Size in bytes.
    pub bytes: u64,
    /// Echoed to a next activity.
    pub echo: bool,
}

impl std::str::FromStr for Blob {
    type Err = String;

    /// `<MiB>` or `<MiB>e` (echoed): `2`, `3e`, `9`, `5e`.
    fn from_str(s: &str) -> Result<Blob, String> {
        let (n, echo) = match s.strip_suffix('e') {
            Some(n) => (n, true),
            None => (s, false),
        };
        let mib: u64 = n
            .parse()
            .map_err(|_| format!("{s:?}: a size in MiB, `e` appended to echo it"))?;
        Ok(Blob {
            bytes: mib << 20,
            echo,
        })
    }
}

/// The shared state of a workload.
pub struct Workload {
    /// The ledger.
    pub ledger: Ledger,
    /// Prefix of the workflow IDs.
    pub prefix: String,
    next: AtomicUsize,
    /// Set when no new runs should start.
    pub stop: AtomicBool,
    /// The drain deadline, once set.
    pub drain_until: Mutex<Option<Instant>>,
    seed: u64,
    limits: Limits,
    profile: Profile,
    /// Duplicate starts sent (scenario 13).
    pub duplicate_starts: AtomicUsize,
    oversize: Vec<Blob>,
    /// Longest a client waits for one run before giving up on it and starting the next
    /// (the checker then finds the run lost); keeps a stuck run from stalling the load.
    pub patience: Duration,
}

impl Workload {
    /// A workload of runs named `<prefix>-<n>`.
    pub fn new(
        prefix: &str,
        seed: u64,
        limits: Limits,
        profile: Profile,
        oversize: Vec<Blob>,
        patience: Duration,
    ) -> Arc<Workload> {
        Arc::new(Workload {
            ledger: Ledger::default(),
            prefix: prefix.to_string(),
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
            drain_until: Mutex::new(None),
            seed,
            limits,
            profile,
            duplicate_starts: AtomicUsize::new(0),
            oversize,
            patience,
        })
    }

    fn deadline(&self) -> Instant {
        self.drain_until
            .lock()
            .expect("drain deadline")
            .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
    }

    /// The deadline of a wait begun now: the drain's, or the client's patience.
    fn wait_deadline(&self, since: Instant) -> Instant {
        self.deadline().min(since + self.patience)
    }

    /// The `n`-th run's steps.
    fn steps(&self, n: usize) -> (u64, Vec<Step>) {
        let mut rng = Rng::new(self.seed ^ (n as u64).wrapping_mul(0xA24B_AED4_963E_E407));
        let seed = rng.next_u64();
        let mut steps = model::standard(&mut rng);
        if self.profile == Profile::Oversize && n % 2 == 1 && !self.oversize.is_empty() {
            let queue = if rng.chance(0.5) { "cpu" } else { "gpu" };
            let b = self.oversize[(n / 2) % self.oversize.len()];
            let blob = Step::blob(queue, b.bytes, b.echo);
            let at = rng.below(steps.len() as u64) as usize;
            steps.insert(at, blob);
            steps.truncate(8);
        }
        (seed, steps)
    }

    /// One closed-loop client: start a run, wait for it, repeat until stopped.
    pub async fn client(self: Arc<Self>, client: Client) {
        while !self.stop.load(Ordering::SeqCst) {
            let n = self.next.fetch_add(1, Ordering::SeqCst);
            let id = format!("{}-{n:05}", self.prefix);
            let (seed, steps) = self.steps(n);
            let input = model::input(seed, &steps);
            self.ledger.add(
                &id,
                input.clone(),
                model::expected(seed, &steps, self.limits),
            );
            if self.profile == Profile::Duplicates {
                self.duplicates(&client, &id, &input).await;
                continue;
            }
            if let Some(StartAnswer::Started(_) | StartAnswer::Duplicate(_)) =
                start_until_acked(&client, &self.ledger, &id, &input, || self.deadline()).await
            {
                let since = Instant::now();
                wait_closed(&client, &self.ledger, &id, || self.wait_deadline(since)).await;
            }
        }
    }

    /// Scenario 13's client: 3 concurrent starts, one more while the run runs, one with
    /// another input after it closed. The ledger counts every answer.
    async fn duplicates(&self, client: &Client, id: &str, input: &Value) {
        let deadline = self.deadline();
        let starts =
            (0..3).map(|_| start_until_answered(client, &self.ledger, id, input, deadline));
        futures::future::join_all(starts).await;
        start_until_answered(client, &self.ledger, id, input, deadline).await;
        let since = Instant::now();
        wait_closed(client, &self.ledger, id, || self.wait_deadline(since)).await;
        let mut other = input.clone();
        other["seed"] = Value::from(input["seed"].as_u64().unwrap_or(0) ^ 1);
        start_until_answered(client, &self.ledger, id, &other, deadline).await;
        self.duplicate_starts.fetch_add(4, Ordering::SeqCst);
    }

    /// Runs started so far.
    pub fn started(&self) -> usize {
        self.next.load(Ordering::SeqCst)
    }
}
