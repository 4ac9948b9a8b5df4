//! Dynamic batching inside a worker: concurrent activity attempts that need the same
//! computation (one forward pass of a model, say), arriving from many workflows, are
//! coalesced into one call of a batch function, and each attempt gets its own result back.
//!
//! Batching changes nothing durable. Every attempt is still its own task, with its own
//! runner, heartbeat and timeouts; its task is acked only after its own report is stored,
//! and its workflow's history records its own activity. A worker that dies mid-batch loses
//! the whole batch's tasks to redelivery, as it would lose them one by one.
//!
//! The batcher runs one batch at a time: a batch takes every call queued when it starts (up
//! to `max_batch`), waiting up to `max_wait` for more if it is not full. While a batch
//! runs, the calls that arrive queue up and form the next one, so under load batches grow
//! by themselves even with `max_wait` zero, and a lone call waits for nothing.

use std::{
    sync::{Arc, Mutex, OnceLock, PoisonError},
    time::Duration,
};

use tokio::sync::{mpsc, oneshot};

use crate::error::ActivityError;

/// How a [`Batcher`] forms batches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchOptions {
    /// Most calls in one batch (1: no batching, one call at a time).
    pub max_batch: usize,
    /// How long a batch that is not full waits for more calls (zero: it takes what is
    /// queued and goes).
    pub max_wait: Duration,
}

impl Default for BatchOptions {
    /// Up to 32 calls a batch, no waiting.
    fn default() -> Self {
        BatchOptions {
            max_batch: 32,
            max_wait: Duration::ZERO,
        }
    }
}

/// Counters of a [`Batcher`], for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BatchStats {
    /// Batches run.
    pub batches: u64,
    /// Calls answered by them.
    pub calls: u64,
    /// The largest batch.
    pub largest: usize,
}

/// The batch function: inputs in, one output per input, in order; blocking (it runs on
/// tokio's blocking threads).
type BatchFn<I, O> = dyn Fn(Vec<I>) -> Result<Vec<O>, ActivityError> + Send + Sync;

struct Call<I, O> {
    input: I,
    reply: oneshot::Sender<Result<O, ActivityError>>,
}

/// Coalesces concurrent calls into batches of a blocking batch function. Cheap to share
/// behind an `Arc`; its task starts with the first call (so it may be built outside a
/// tokio runtime) and ends when the batcher is dropped.
pub struct Batcher<I, O> {
    options: BatchOptions,
    run: Arc<BatchFn<I, O>>,
    tx: OnceLock<mpsc::UnboundedSender<Call<I, O>>>,
    stats: Arc<Mutex<BatchStats>>,
}

impl<I: Send + 'static, O: Send + 'static> Batcher<I, O> {
    /// A batcher of `run`, which must return one output per input, in order.
    pub fn new(
        options: BatchOptions,
        run: impl Fn(Vec<I>) -> Result<Vec<O>, ActivityError> + Send + Sync + 'static,
    ) -> Self {
        Batcher {
            options: BatchOptions {
                max_batch: options.max_batch.max(1),
                ..options
            },
            run: Arc::new(run),
            tx: OnceLock::new(),
            stats: Arc::default(),
        }
    }

    /// The options it batches with.
    pub fn options(&self) -> BatchOptions {
        self.options
    }

    /// The counters so far.
    pub fn stats(&self) -> BatchStats {
        *self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Runs `input` in the next batch and returns its output. A batch function that fails
    /// (or panics, or answers the wrong number of outputs) fails every call of the batch,
    /// retryably unless its error says otherwise. A caller that goes away (its attempt
    /// was killed) is left out of the batch if it has not started yet.
    pub async fn call(&self, input: I) -> Result<O, ActivityError> {
        let tx = self.tx.get_or_init(|| {
            let (tx, rx) = mpsc::unbounded_channel();
            tokio::spawn(batch_loop(
                self.options,
                self.run.clone(),
                rx,
                self.stats.clone(),
            ));
            tx
        });
        let (reply, answer) = oneshot::channel();
        tx.send(Call { input, reply })
            .map_err(|_| ActivityError::retryable("BatcherStopped", "the batcher has stopped"))?;
        answer.await.map_err(|_| {
            ActivityError::retryable("BatcherStopped", "the batch ended without an answer")
        })?
    }
}

async fn batch_loop<I: Send + 'static, O: Send + 'static>(
    options: BatchOptions,
    run: Arc<BatchFn<I, O>>,
    mut rx: mpsc::UnboundedReceiver<Call<I, O>>,
    stats: Arc<Mutex<BatchStats>>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = vec![first];
        while batch.len() < options.max_batch {
            match rx.try_recv() {
                Ok(call) => batch.push(call),
                Err(_) => break,
            }
        }
        if batch.len() < options.max_batch && !options.max_wait.is_zero() {
            let deadline = tokio::time::Instant::now() + options.max_wait;
            while batch.len() < options.max_batch {
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(call)) => batch.push(call),
                    _ => break,
                }
            }
        }
        // Callers whose attempt was killed meanwhile need no computation.
        batch.retain(|call| !call.reply.is_closed());
        if batch.is_empty() {
            continue;
        }
        let n = batch.len();
        let (inputs, replies): (Vec<I>, Vec<_>) =
            batch.into_iter().map(|c| (c.input, c.reply)).unzip();
        let run = run.clone();
        let outputs = match tokio::task::spawn_blocking(move || run(inputs)).await {
            Ok(Ok(outputs)) if outputs.len() == n => Ok(outputs),
            Ok(Ok(outputs)) => Err(ActivityError::retryable(
                "BatchMismatch",
                format!(
                    "the batch function answered {} outputs for {n} inputs",
                    outputs.len()
                ),
            )),
            Ok(Err(e)) => Err(e),
            Err(join) => Err(ActivityError::retryable(
                "BatchPanic",
                format!("the batch function did not finish: {join}"),
            )),
        };
        {
            let mut s = stats.lock().unwrap_or_else(PoisonError::into_inner);
            s.batches += 1;
            s.calls += n as u64;
            s.largest = s.largest.max(n);
        }
        match outputs {
            Ok(outputs) => {
                for (reply, output) in replies.into_iter().zip(outputs) {
                    let _ = reply.send(Ok(output));
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The size of each batch a test batcher ran.
    type Sizes = Arc<Mutex<Vec<usize>>>;

    /// A batcher whose function doubles its inputs after `ms`, and the size of each batch
    /// it ran.
    fn doubler(options: BatchOptions, ms: u64) -> (Arc<Batcher<u32, u32>>, Sizes) {
        let sizes = Arc::new(Mutex::new(Vec::new()));
        let s = sizes.clone();
        let batcher = Batcher::new(options, move |inputs: Vec<u32>| {
            s.lock().unwrap().push(inputs.len());
            std::thread::sleep(Duration::from_millis(ms));
            Ok(inputs.into_iter().map(|x| x * 2).collect())
        });
        (Arc::new(batcher), sizes)
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_calls_share_batches_and_each_gets_its_own_output() {
        let (batcher, sizes) = doubler(
            BatchOptions {
                max_batch: 8,
                max_wait: Duration::ZERO,
            },
            100,
        );
        let calls: Vec<_> = (0..20u32)
            .map(|i| {
                let b = batcher.clone();
                tokio::spawn(async move { (i, b.call(i).await) })
            })
            .collect();
        for call in calls {
            let (i, out) = call.await.unwrap();
            assert_eq!(out.unwrap(), i * 2);
        }
        let sizes = sizes.lock().unwrap().clone();
        assert_eq!(sizes.iter().sum::<usize>(), 20);
        assert!(sizes.iter().all(|&s| (1..=8).contains(&s)), "{sizes:?}");
        // The first call starts a batch alone; the 19 that queue behind it need at most 3
        // more batches of 8.
        assert!(
            sizes.len() <= 4,
            "20 calls took {} batches: {sizes:?}",
            sizes.len()
        );
        let stats = batcher.stats();
        assert_eq!((stats.calls, stats.batches), (20, sizes.len() as u64));
        assert_eq!(stats.largest, *sizes.iter().max().unwrap());
    }

    #[tokio::test]
    async fn a_lone_call_waits_for_no_batch_and_max_batch_one_runs_one_at_a_time() {
        let (one, sizes) = doubler(
            BatchOptions {
                max_batch: 1,
                max_wait: Duration::from_secs(60),
            },
            0,
        );
        // A full batch (of one) does not wait `max_wait`.
        let out = tokio::time::timeout(Duration::from_secs(5), one.call(7)).await;
        assert_eq!(out.unwrap().unwrap(), 14);
        assert_eq!(*sizes.lock().unwrap(), [1]);
    }

    #[tokio::test]
    async fn a_failing_or_miscounting_batch_fails_each_call() {
        let failing: Batcher<u32, u32> = Batcher::new(BatchOptions::default(), |_| {
            Err(ActivityError::non_retryable("Bad", "no"))
        });
        let e = failing.call(1).await.unwrap_err();
        assert_eq!((e.kind.as_str(), e.retryable), ("Bad", false));

        let short: Batcher<u32, u32> = Batcher::new(BatchOptions::default(), |_| Ok(vec![]));
        let e = short.call(1).await.unwrap_err();
        assert_eq!((e.kind.as_str(), e.retryable), ("BatchMismatch", true));

        let panics: Batcher<u32, u32> =
            Batcher::new(BatchOptions::default(), |_| panic!("deliberate"));
        let e = panics.call(1).await.unwrap_err();
        assert_eq!((e.kind.as_str(), e.retryable), ("BatchPanic", true));
        // The batcher survives a panicking batch.
        let e = panics.call(2).await.unwrap_err();
        assert_eq!(e.kind, "BatchPanic");
    }

    #[tokio::test]
    async fn max_wait_gathers_calls_that_arrive_a_little_later() {
        let (batcher, sizes) = doubler(
            BatchOptions {
                max_batch: 4,
                max_wait: Duration::from_millis(500),
            },
            0,
        );
        let mut calls = Vec::new();
        for i in 0..4u32 {
            let b = batcher.clone();
            calls.push(tokio::spawn(async move { b.call(i).await }));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        for (i, c) in calls.into_iter().enumerate() {
            assert_eq!(c.await.unwrap().unwrap(), 2 * i as u32);
        }
        // Full at 4 well before the 500 ms: one batch.
        assert_eq!(*sizes.lock().unwrap(), [4]);
    }
}
