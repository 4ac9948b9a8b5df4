//! Injected NATS failures, for the chaos suite only (RELIABILITY.md scenario 19): a
//! process-wide share of the JetStream and NATS calls Baton's runtime makes (publishing
//! tasks, reports and journal mirror batches, KV puts, acks) fail as a real NATS error
//! would: the call returns an error. Off (rate 0) unless a process turns it on; `baton`
//! does so only when started with `BATON_CHAOS_FAULTS=1` (rate from [`RATE_ENV`], then
//! changed through its fault hook).
//!
//! A failure is injected either before the call (nothing was sent) or after it (the call
//! was made and its outcome is thrown away: the message may be stored, the ack may have
//! reached the server), one or the other at random, so callers meet both kinds of
//! ambiguity a lost connection causes.

use std::{
    collections::BTreeMap,
    future::IntoFuture,
    sync::{
        Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
};

use crate::Error;

/// The environment variable with the failure rate a process starts with, in calls per
/// million (read only by a process whose chaos hook is on).
pub const RATE_ENV: &str = "BATON_CHAOS_NATS_FAIL_PPM";

static RATE: AtomicU32 = AtomicU32::new(0);
static RNG: AtomicU64 = AtomicU64::new(0x2545_F491_4F6C_DD1D);
static INJECTED: Mutex<BTreeMap<&'static str, u64>> = Mutex::new(BTreeMap::new());

/// Sets the rate from [`RATE_ENV`] (unset or unparsable: 0).
pub fn init_from_env() {
    let ppm = std::env::var(RATE_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    set_rate(ppm);
}

/// `per_million` calls in a million fail from now on (0: none).
pub fn set_rate(per_million: u32) {
    RATE.store(per_million.min(1_000_000), Ordering::SeqCst);
}

/// The current rate, in calls per million.
pub fn rate() -> u32 {
    RATE.load(Ordering::SeqCst)
}

/// Failures injected so far, by call point.
pub fn injected() -> BTreeMap<&'static str, u64> {
    INJECTED.lock().expect("injected failures").clone()
}

/// Failures injected so far, in all.
pub fn injected_total() -> u64 {
    injected().values().sum()
}

/// `None`: let the call through; `Some(after)`: fail it, after making it if `after`.
fn draw(point: &'static str) -> Option<bool> {
    let rate = RATE.load(Ordering::Relaxed);
    if rate == 0 {
        return None;
    }
    // xorshift64: a cheap, lock-free stream of numbers.
    let mut x = RNG.load(Ordering::Relaxed);
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    RNG.store(x, Ordering::Relaxed);
    if x % 1_000_000 >= u64::from(rate) {
        return None;
    }
    *INJECTED
        .lock()
        .expect("injected failures")
        .entry(point)
        .or_default() += 1;
    Some((x >> 32) & 1 == 1)
}

/// Makes the NATS call `call` (a publish, its ack, a KV put, a message ack, ...) named
/// `point`, or fails it by injection. Its own error becomes [`Error::Nats`].
pub async fn call<T, E: std::fmt::Display>(
    point: &'static str,
    call: impl IntoFuture<Output = Result<T, E>>,
) -> Result<T, Error> {
    match draw(point) {
        None => call.into_future().await.map_err(Error::nats),
        Some(after) => {
            if after {
                let _ = call.into_future().await;
            }
            Err(Error::Nats(format!(
                "{point} failed (injected{})",
                if after { ", after the call" } else { "" }
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn fails_the_share_asked_for_and_counts_it() {
        set_rate(0);
        for _ in 0..1000 {
            call("test point", async { Ok::<_, Error>(()) })
                .await
                .unwrap();
        }
        set_rate(100_000);
        let mut failed = 0;
        for _ in 0..10_000 {
            if call("test point", async { Ok::<_, Error>(()) })
                .await
                .is_err()
            {
                failed += 1;
            }
        }
        set_rate(0);
        assert!((700..1300).contains(&failed), "{failed} of 10000 failed");
        assert_eq!(injected()["test point"], failed);
    }
}
