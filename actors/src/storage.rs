//! The journal's storage: redb's file backend, with faults that can be injected for the
//! chaos tests (RELIABILITY.md scenarios 17-19): a full disk, a share of calls failing, and
//! a power loss that throws away every write since the last sync and tears the last one.
//!
//! Without faults ([`StorageFaults::none`]) it is redb's `FileBackend`, call for call.

use std::{
    fmt,
    fs::OpenOptions,
    io,
    ops::Bound,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering},
    },
};

use redb::{BackendError, StorageBackend, backends::FileBackend};

/// Faults to inject into a journal's storage; shared by the test and the backend, and kept
/// across the journal's reopenings.
#[derive(Default)]
pub struct StorageFaults {
    /// Writes, length changes and syncs fail with `StorageFull` (ENOSPC).
    full: AtomicBool,
    /// This many calls in a million fail with an I/O error.
    fail_per_million: AtomicU32,
    /// xorshift state for the failing calls.
    rng: AtomicU64,
    /// After a power loss nothing reaches the file any more (the machine is off).
    dead: AtomicBool,
    /// What the file held before each write since the last sync, to undo on power loss.
    unsynced: Mutex<Vec<Undo>>,
    /// Calls failed so far.
    injected: AtomicU64,
    /// The file of the backend opened last, for the power loss.
    file: Mutex<Option<Arc<FileBackend>>>,
    /// Cut the power when this many more writes have been made (0: not armed), tearing
    /// the last one if `tear_armed`.
    writes_left: AtomicU64,
    tear_armed: AtomicBool,
    /// Writes and resizes undone by power losses.
    undone: AtomicU64,
    /// Called once the power is cut, with the writes and resizes undone and whether the
    /// last was torn (a chaos hook ends its process there: a machine without power does
    /// nothing more).
    on_power_loss: Mutex<Option<PowerLossHook>>,
}

type PowerLossHook = Box<dyn Fn(usize, bool) + Send + Sync>;

enum Undo {
    /// Bytes at `offset` before a write (`old`), and the file length then.
    Write { offset: u64, old: Vec<u8>, len: u64 },
    /// The length before a `set_len`, and the bytes a shrink cut off (from the new length).
    Len { len: u64, from: u64, cut: Vec<u8> },
}

impl StorageFaults {
    /// No faults (yet): the test turns them on.
    pub fn none() -> Arc<StorageFaults> {
        Arc::new(StorageFaults {
            rng: AtomicU64::new(0x9E37_79B9_7F4A_7C15),
            ..Default::default()
        })
    }

    /// The disk is full (or not any more).
    pub fn set_full(&self, full: bool) {
        self.full.store(full, Ordering::SeqCst);
    }

    /// `per_million` calls in a million fail (0: none).
    pub fn set_failure_rate(&self, per_million: u32) {
        self.fail_per_million.store(per_million, Ordering::SeqCst);
    }

    /// Cuts the power in the middle of the `writes`-th write from now (that write is torn
    /// if `tear`): a crash at an exact point inside a commit.
    pub fn power_loss_at_write(&self, writes: u64, tear: bool) {
        self.tear_armed.store(tear, Ordering::SeqCst);
        self.writes_left.store(writes.max(1), Ordering::SeqCst);
    }

    /// Calls `hook` (writes and resizes undone, last write torn) right after the power is
    /// cut, still inside the storage call that cut it.
    pub fn on_power_loss(&self, hook: impl Fn(usize, bool) + Send + Sync + 'static) {
        *self.on_power_loss.lock().expect("power loss hook") = Some(Box::new(hook));
    }

    /// Whether the power has been cut.
    pub fn is_dead(&self) -> bool {
        self.dead.load(Ordering::SeqCst)
    }

    /// How many unsynced writes and resizes power losses have undone.
    pub fn undone(&self) -> u64 {
        self.undone.load(Ordering::SeqCst)
    }

    /// How many calls have failed by injection.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::SeqCst)
    }

    fn check(&self, mutating: bool) -> io::Result<()> {
        if self.dead.load(Ordering::SeqCst) {
            return Err(io::Error::other("power lost"));
        }
        if mutating && self.full.load(Ordering::SeqCst) {
            self.injected.fetch_add(1, Ordering::SeqCst);
            return Err(io::Error::new(
                io::ErrorKind::StorageFull,
                "no space left on device (injected)",
            ));
        }
        let rate = self.fail_per_million.load(Ordering::SeqCst);
        if rate > 0 {
            // xorshift64: a cheap, lock-free stream of numbers.
            let mut x = self.rng.load(Ordering::Relaxed);
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.rng.store(x, Ordering::Relaxed);
            if x % 1_000_000 < u64::from(rate) {
                self.injected.fetch_add(1, Ordering::SeqCst);
                return Err(io::Error::other("I/O error (injected)"));
            }
        }
        Ok(())
    }
}

/// A redb storage backend over a file, with [`StorageFaults`].
pub struct FaultyBackend {
    inner: Arc<FileBackend>,
    faults: Arc<StorageFaults>,
}

impl fmt::Debug for FaultyBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FaultyBackend").finish_non_exhaustive()
    }
}

impl FaultyBackend {
    /// Opens (or creates) the file at `path`.
    pub fn open(path: &Path, faults: Arc<StorageFaults>) -> io::Result<FaultyBackend> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        let inner = Arc::new(FileBackend::new(file).map_err(|e| io::Error::other(e.to_string()))?);
        let mut undo = faults.unsynced.lock().expect("undo log");
        if !faults.dead.load(Ordering::SeqCst) {
            // A reopening starts from what is on disk.
            undo.clear();
            *faults.file.lock().expect("faults file") = Some(inner.clone());
        }
        drop(undo);
        Ok(FaultyBackend { inner, faults })
    }
}

impl StorageFaults {
    /// Cuts the power: from now on nothing reaches the file, and every write since the last
    /// successful sync is undone, except that with `tear` the first half of the last one
    /// stays (a torn write). What was synced (acknowledged) is untouched. Open the file
    /// again with other faults (or none) to see what survived. Returns how many unsynced
    /// writes and resizes were undone.
    pub fn power_loss(&self, tear: bool) -> io::Result<usize> {
        let mut undo = self.unsynced.lock().expect("undo log");
        self.cut_power(&mut undo, tear)
    }

    fn cut_power(&self, undo: &mut Vec<Undo>, tear: bool) -> io::Result<usize> {
        self.dead.store(true, Ordering::SeqCst);
        let Some(file) = self.file.lock().expect("faults file").clone() else {
            return Ok(0);
        };
        let log = std::mem::take(undo);
        let undone = log.len();
        // Newest first, so that overlapping writes end as they were before all of them.
        for (i, u) in log.into_iter().rev().enumerate() {
            match u {
                Undo::Write { offset, old, .. } if tear && i == 0 => {
                    // The last write is torn: its first half landed, its second did not.
                    let half = old.len() / 2;
                    file.write(offset + half as u64, &old[half..])?;
                }
                Undo::Write { offset, old, len } => {
                    file.write(offset, &old)?;
                    file.set_len(len)?;
                }
                Undo::Len { len, from, cut } => {
                    file.set_len(len)?;
                    if !cut.is_empty() {
                        file.write(from, &cut)?;
                    }
                }
            }
        }
        file.sync_data()?;
        self.undone.fetch_add(undone as u64, Ordering::SeqCst);
        if let Some(hook) = self.on_power_loss.lock().expect("power loss hook").as_ref() {
            hook(undone, tear && undone > 0);
        }
        Ok(undone)
    }
}

impl StorageBackend for FaultyBackend {
    fn len(&self) -> Result<u64, io::Error> {
        self.inner.len()
    }

    fn read(&self, offset: u64, out: &mut [u8]) -> Result<(), io::Error> {
        self.faults.check(false)?;
        self.inner.read(offset, out)
    }

    // Mutations and syncs hold the undo log's lock throughout, as the power loss does: a
    // sync either finished before the power went (its data stays) or fails.

    fn set_len(&self, len: u64) -> Result<(), io::Error> {
        let mut undo = self.faults.unsynced.lock().expect("undo log");
        self.faults.check(true)?;
        let old = self.inner.len()?;
        // A shrink that never reached the disk leaves the cut bytes where they were.
        let mut cut = vec![0u8; old.saturating_sub(len) as usize];
        if !cut.is_empty() {
            self.inner.read(len, &mut cut)?;
        }
        undo.push(Undo::Len {
            len: old,
            from: len,
            cut,
        });
        self.inner.set_len(len)
    }

    fn sync_data(&self) -> Result<(), io::Error> {
        let mut undo = self.faults.unsynced.lock().expect("undo log");
        self.faults.check(true)?;
        self.inner.sync_data()?;
        undo.clear();
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8]) -> Result<(), io::Error> {
        let mut undo = self.faults.unsynced.lock().expect("undo log");
        self.faults.check(true)?;
        let len = self.inner.len()?;
        let mut old = vec![0u8; data.len()];
        let readable = len.saturating_sub(offset).min(data.len() as u64) as usize;
        if readable > 0 {
            self.inner.read(offset, &mut old[..readable])?;
        }
        undo.push(Undo::Write { offset, old, len });
        self.inner.write(offset, data)?;
        let armed = self.faults.writes_left.load(Ordering::SeqCst);
        if armed > 0 {
            self.faults.writes_left.store(armed - 1, Ordering::SeqCst);
            if armed == 1 {
                let tear = self.faults.tear_armed.load(Ordering::SeqCst);
                self.faults.cut_power(&mut undo, tear)?;
                return Err(io::Error::other("power lost mid-write"));
            }
        }
        Ok(())
    }

    fn close(&self) -> Result<(), io::Error> {
        self.inner.close()
    }

    fn try_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.try_lock_range(start, end)
    }

    fn try_lock_shared_range(
        &self,
        start: Bound<u64>,
        end: Bound<u64>,
    ) -> Result<bool, BackendError> {
        self.inner.try_lock_shared_range(start, end)
    }

    fn lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_range(start, end)
    }

    fn lock_shared_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.lock_shared_range(start, end)
    }

    fn unlock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<(), BackendError> {
        self.inner.unlock_range(start, end)
    }

    fn query_lock_range(&self, start: Bound<u64>, end: Bound<u64>) -> Result<bool, BackendError> {
        self.inner.query_lock_range(start, end)
    }
}
