//! The processes under test, on loopback: one nats-server, one `baton orchestrator` (its
//! fault hook on for scenarios 17-19), and `baton worker` processes for the `cpu` and
//! `gpu` queues (fault hook on), plus what the driver reads from their logs: which
//! activity attempts a worker process has in flight.

use std::{
    collections::BTreeSet,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use baton_tests::{BatonProcess, Client, NatsServer};

/// How long a process may take to come up (debug builds on 2 shared cores).
pub const READY: Duration = Duration::from_secs(60);

/// The line a `baton` process logs at the start of each of its lives.
const RESTART_MARKER: &str = "===== restarted by the test harness =====";

/// One worker process.
pub struct Worker {
    /// Its queue.
    pub queue: &'static str,
    /// Its pool's concurrency.
    pub concurrency: usize,
    /// The process.
    pub process: BatonProcess,
    /// Lives so far (1 + restarts).
    pub lives: usize,
}

impl Worker {
    /// The process ID of its current life.
    pub fn pid(&self) -> u32 {
        self.process.pid()
    }

    /// Whether a worker name in a report (`<queue>-<host>-<pid>`) is this life's.
    pub fn is(&self, worker: &str) -> bool {
        worker.starts_with(self.queue) && worker.ends_with(&format!("-{}", self.pid()))
    }

    /// The fault hook's subject of this life.
    pub fn hook_subject(&self) -> String {
        baton_orchestrator::faults::subject(self.queue, self.pid())
    }

    /// A short name: `cpu#1 (pid 123)`.
    pub fn name(&self, index: usize) -> String {
        format!("{}#{index} (pid {})", self.queue, self.pid())
    }

    /// The log of the current life.
    pub fn current_log(&self) -> String {
        current_life(&self.process.log_contents()).to_string()
    }

    /// SIGKILLs the worker and starts it again (a new pid, a new worker name); waits until
    /// its pool runs.
    pub async fn restart(&mut self) -> Result<()> {
        self.process.restart()?;
        self.lives += 1;
        self.process
            .wait_for_log_count("worker pool started", self.lives, READY)
            .await
    }
}

/// The part of a log after the last restart marker.
pub fn current_life(log: &str) -> &str {
    match log.rfind(RESTART_MARKER) {
        Some(i) => &log[i..],
        None => log,
    }
}

/// One activity attempt as the worker logs name it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Attempt {
    /// The run.
    pub run_id: String,
    /// The activity's sequence number.
    pub seq: u32,
    /// The attempt.
    pub attempt: u32,
    /// The workflow ID.
    pub workflow_id: String,
    /// The activity (in `activity started` lines).
    pub activity: String,
}

/// `key=value` of a tracing log line (values unquoted).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let needle = format!(" {key}=");
    let start = line.find(&needle)? + needle.len();
    let rest = &line[start..];
    let end = rest.find(' ').unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

fn attempt_of(line: &str) -> Option<Attempt> {
    Some(Attempt {
        run_id: field(line, "run_id")?.to_string(),
        seq: field(line, "seq")?.parse().ok()?,
        attempt: field(line, "attempt")?.parse().ok()?,
        workflow_id: field(line, "workflow_id").unwrap_or("").to_string(),
        activity: field(line, "activity").unwrap_or("").to_string(),
    })
}

/// The attempts a worker log started and did not finish (nor fail in the worker): those
/// the process holds.
pub fn in_flight(log: &str) -> Vec<Attempt> {
    let mut started = Vec::new();
    let mut done = BTreeSet::new();
    for line in log.lines() {
        if line.contains("activity started") {
            if let Some(a) = attempt_of(line) {
                started.push(a);
            }
        } else if (line.contains("activity finished")
            || line.contains("activity attempt failed in the worker"))
            && let Some(a) = attempt_of(line)
        {
            done.insert((a.run_id, a.seq, a.attempt));
        }
    }
    started
        .into_iter()
        .filter(|a| !done.contains(&(a.run_id.clone(), a.seq, a.attempt)))
        .collect()
}

/// The attempts a worker log reports failed in the worker (runner killed or panicked),
/// their workflow IDs taken from the `activity started` lines (the failure line has none).
pub fn failed_in_worker(log: &str) -> Vec<Attempt> {
    let workflows: std::collections::HashMap<String, String> = log
        .lines()
        .filter(|l| l.contains("activity started"))
        .filter_map(attempt_of)
        .map(|a| (a.run_id, a.workflow_id))
        .collect();
    log.lines()
        .filter(|l| l.contains("activity attempt failed in the worker"))
        .filter_map(attempt_of)
        .map(|mut a| {
            a.workflow_id = workflows.get(&a.run_id).cloned().unwrap_or_default();
            a
        })
        .collect()
}

/// How many attempts a log shows delivered more than once (JetStream redeliveries).
pub fn redeliveries(log: &str) -> usize {
    log.lines()
        .filter(|l| l.contains("activity started"))
        .filter(|l| field(l, "delivered").is_some_and(|d| d != "1"))
        .count()
}

/// The cluster.
pub struct Cluster {
    /// The nats-server.
    pub nats: NatsServer,
    /// The orchestrator's journal directory (kept across its restarts).
    _data_dir: tempfile::TempDir,
    /// The orchestrator.
    pub orchestrator: BatonProcess,
    /// Lives of the orchestrator so far.
    pub orchestrator_lives: usize,
    /// Whether the orchestrator runs with its fault hook on (journal storage faults).
    pub orchestrator_hook: bool,
    /// The workers, `cpu` ones first.
    pub workers: Vec<Worker>,
    /// An edge client.
    pub client: Client,
}

/// How many workers of each queue, and their concurrency.
#[derive(Debug, Clone, Copy)]
pub struct Shape {
    /// `cpu` workers.
    pub cpu_workers: usize,
    /// `gpu` workers.
    pub gpu_workers: usize,
    /// Each pool's concurrency.
    pub concurrency: usize,
    /// The orchestrator's `--evict-idle-ms` (0: zero cache, every step replays).
    pub evict_idle_ms: Option<u64>,
    /// Start the orchestrator with its fault hook on (`BATON_CHAOS_FAULTS=1`: its journal
    /// over the faulty storage backend; scenarios 17-19).
    pub orchestrator_hook: bool,
}

impl Cluster {
    /// Starts everything and waits until each process is ready.
    pub async fn start(shape: Shape) -> Result<Cluster> {
        let nats = NatsServer::start().await?;
        let data_dir = tempfile::Builder::new().prefix("baton-chaos-").tempdir()?;
        let mut args = vec![
            "orchestrator".to_string(),
            "--nats-url".into(),
            nats.url(),
            "--data-dir".into(),
            data_dir.path().display().to_string(),
        ];
        // Scenario 5: the orchestrator's workflow cache (0: every step replays).
        if let Some(ms) = shape.evict_idle_ms {
            args.extend(["--evict-idle-ms".to_string(), ms.to_string()]);
        }
        let env: &[(&str, &str)] = if shape.orchestrator_hook {
            &[(baton_orchestrator::faults::ENV, "1")]
        } else {
            &[]
        };
        let mut orchestrator = BatonProcess::spawn_with_env(args, env)?;
        orchestrator
            .wait_for_log("orchestrator started", READY)
            .await?;
        if shape.orchestrator_hook {
            orchestrator
                .wait_for_log("fault injection hook on", READY)
                .await?;
        }
        let mut workers = Vec::new();
        for (queue, n) in [("cpu", shape.cpu_workers), ("gpu", shape.gpu_workers)] {
            for _ in 0..n {
                let process = BatonProcess::spawn_with_env(
                    [
                        "worker".to_string(),
                        "--nats-url".into(),
                        nats.url(),
                        "--queue".into(),
                        queue.into(),
                        "--concurrency".into(),
                        shape.concurrency.to_string(),
                    ],
                    &[(baton_orchestrator::faults::ENV, "1")],
                )?;
                workers.push(Worker {
                    queue,
                    concurrency: shape.concurrency,
                    process,
                    lives: 1,
                });
            }
        }
        for w in &mut workers {
            w.process
                .wait_for_log("fault injection hook on", READY)
                .await?;
        }
        let client = Client::connect(&nats.url()).await?;
        Ok(Cluster {
            nats,
            _data_dir: data_dir,
            orchestrator,
            orchestrator_lives: 1,
            orchestrator_hook: shape.orchestrator_hook,
            workers,
            client,
        })
    }

    /// SIGKILLs the orchestrator and starts it again on the same journal; waits until it
    /// serves.
    pub async fn restart_orchestrator(&mut self) -> Result<()> {
        self.orchestrator.restart()?;
        self.orchestrator_lives += 1;
        self.orchestrator
            .wait_for_log_count("orchestrator started", self.orchestrator_lives, READY)
            .await?;
        if self.orchestrator_hook {
            self.orchestrator
                .wait_for_log_count("fault injection hook on", self.orchestrator_lives, READY)
                .await?;
        }
        Ok(())
    }

    /// Asks a worker's fault hook to inject `fault`; `Ok(Some(detail))` if it did.
    pub async fn inject(&self, worker: usize, fault: &str) -> Result<Option<String>> {
        let v = self
            .hook(&self.workers[worker].hook_subject(), fault)
            .await?;
        let detail = v["detail"].as_str().unwrap_or("").to_string();
        Ok(v["injected"].as_bool().unwrap_or(false).then_some(detail))
    }

    /// Sends `command` to the fault hook on `subject`; its JSON reply.
    pub async fn hook(&self, subject: &str, command: &str) -> Result<serde_json::Value> {
        let reply = tokio::time::timeout(
            Duration::from_secs(10),
            self.client
                .nats()
                .request(subject.to_string(), command.to_string().into()),
        )
        .await
        .with_context(|| format!("the fault hook on {subject} did not answer"))?
        .with_context(|| format!("fault request to {subject}"))?;
        Ok(serde_json::from_slice(&reply.payload)?)
    }

    /// Sends `command` to the orchestrator's fault hook; fails unless it was injected.
    pub async fn orchestrator_fault(&self, command: &str) -> Result<serde_json::Value> {
        let subject = baton_orchestrator::faults::orchestrator_subject(self.orchestrator.pid());
        let v = self.hook(&subject, command).await?;
        if v["injected"] != true {
            bail!("the orchestrator's hook did not inject {command:?}: {v}");
        }
        Ok(v)
    }

    /// Cuts the orchestrator's power (`tear`: its last journal write torn): armed in the
    /// middle of its `at_write`-th journal write from now when given, else at once (also
    /// when the armed write does not come within 15 s). Waits for the process to end, and
    /// starts it again on the same journal. Returns how the power went, and when the
    /// process was seen gone (Unix ms).
    pub async fn orchestrator_power_loss(
        &mut self,
        at_write: Option<u64>,
        tear: bool,
    ) -> Result<(String, u64)> {
        let how = if tear { "tear" } else { "clean" };
        let mut armed = false;
        if let Some(n) = at_write {
            self.orchestrator_fault(&format!("power_loss_at {n} {how}"))
                .await?;
            armed = self
                .orchestrator
                .wait_exit(Duration::from_secs(15))
                .await
                .is_ok();
        }
        if !armed {
            // No reply comes: the process ends inside the request.
            let subject = baton_orchestrator::faults::orchestrator_subject(self.orchestrator.pid());
            let _ = tokio::time::timeout(
                Duration::from_secs(5),
                self.client
                    .nats()
                    .request(subject, format!("power_loss {how}").into()),
            )
            .await;
            self.orchestrator
                .wait_exit(Duration::from_secs(15))
                .await
                .context("the orchestrator did not end at its power loss")?;
        }
        let gone_ms = crate::workload::now_ms();
        self.restart_orchestrator().await?;
        let how = match (armed, at_write) {
            (true, Some(n)) => format!("in journal write {n} ({how})"),
            _ => format!("at once ({how})"),
        };
        Ok((how, gone_ms))
    }

    /// Which processes are not running (a crash, unless the driver killed them).
    pub fn dead(&mut self) -> Vec<String> {
        let mut dead = Vec::new();
        if !self.orchestrator.is_running() {
            dead.push("orchestrator".to_string());
        }
        for (i, w) in self.workers.iter_mut().enumerate() {
            if !w.process.is_running() {
                dead.push(format!("{}#{i}", w.queue));
            }
        }
        dead
    }
}

/// Sends a real signal to a process (`kill -STOP`, `kill -CONT`).
pub fn signal(pid: u32, sig: &str) -> Result<()> {
    let st = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .context("running kill")?;
    if !st.success() {
        bail!("kill -{sig} {pid} failed ({st})");
    }
    Ok(())
}

/// Waits until `f` returns `Some`, polling every 50 ms, up to `timeout`.
pub async fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(t) = f() {
            return Some(t);
        }
        if Instant::now() > deadline {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn in_flight_attempts_from_a_log() {
        let log = "\
x INFO baton_actors::worker: activity started activity=chaos_compute_cpu workflow_id=w1 run_id=r1 seq=0 attempt=1 delivered=1
x INFO baton_actors::worker: activity started activity=chaos_heartbeat_cpu workflow_id=w2 run_id=r2 seq=3 attempt=2 delivered=2
x INFO baton_actors::worker: activity finished activity=chaos_compute_cpu run_id=r1 seq=0 attempt=1 outcome=\"completed\" ms=1
";
        let f = in_flight(log);
        assert_eq!(f.len(), 1);
        assert_eq!((f[0].run_id.as_str(), f[0].seq, f[0].attempt), ("r2", 3, 2));
        assert_eq!(f[0].workflow_id, "w2");
        assert_eq!(redeliveries(log), 1);
        let failed = format!(
            "{log}x WARN baton_actors::worker: activity attempt failed in the worker activity=chaos_heartbeat_cpu run_id=r2 seq=3 attempt=2 kind=RunnerStopped\n"
        );
        let f = failed_in_worker(&failed);
        assert_eq!((f.len(), f[0].workflow_id.as_str()), (1, "w2"));
        assert!(in_flight(&failed).is_empty());
    }
}
