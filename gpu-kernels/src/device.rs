//! Device facts for the worker: is there a usable CUDA GPU, and how much of its memory is
//! free, so that the pool can refuse work that would not fit (GPU-memory-aware admission).
//!
//! CUDA is loaded at run time (cudarc's `dynamic-loading`): on a machine without the driver
//! library [`probe`] says so in [`DeviceInfo::reason`] and never panics. cudarc panics when
//! a library or symbol is missing, so every first touch of the driver is guarded twice:
//! `is_culib_present()` before any call, and `catch_unwind` around the calls.

// The driver library check is an `unsafe fn` in cudarc (it dlopens a library); see the
// SAFETY note at its one use.
#![allow(unsafe_code)]

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::{Arc, Mutex, PoisonError};

use cudarc::driver::CudaContext;

/// Bytes always kept free on top of a job's estimate (see [`DeviceInfo::admission_margin`]).
pub const MIN_ADMISSION_MARGIN: u64 = 512 << 20;

/// What a worker knows about its GPU (ordinal 0 unless asked otherwise).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    /// A CUDA device could be opened.
    pub present: bool,
    /// The device's name ("NVIDIA H100 80GB HBM3"), when present.
    pub name: Option<String>,
    /// Free device memory in bytes at probe time (0 when absent).
    pub memory_free: u64,
    /// Total device memory in bytes (0 when absent).
    pub memory_total: u64,
    /// Why no device is present (no driver library, no device, driver error...).
    pub reason: Option<String>,
}

impl DeviceInfo {
    /// A `DeviceInfo` for "no usable GPU", with the reason.
    pub fn absent(reason: impl Into<String>) -> DeviceInfo {
        DeviceInfo {
            present: false,
            name: None,
            memory_free: 0,
            memory_total: 0,
            reason: Some(reason.into()),
        }
    }

    /// Memory held back from admission: the larger of [`MIN_ADMISSION_MARGIN`] (512 MiB) and
    /// 2% of the device's total memory. It covers the CUDA context, NVRTC modules, allocator
    /// rounding and other processes' small allocations between probe and use.
    pub fn admission_margin(&self) -> u64 {
        MIN_ADMISSION_MARGIN.max(self.memory_total / 50)
    }

    /// GPU-memory-aware admission: would a job needing `bytes` of device memory fit now?
    /// True iff a device is present and `bytes + admission_margin() <= memory_free`.
    /// The answer is only as fresh as the probe: re-[`probe`] before each admission decision.
    pub fn admits(&self, bytes: u64) -> bool {
        self.present && bytes.saturating_add(self.admission_margin()) <= self.memory_free
    }
}

/// Probes device 0. Never panics; with no driver library or no device the answer has
/// `present: false` and the reason.
pub fn probe() -> DeviceInfo {
    probe_ordinal(0)
}

/// Probes device `ordinal`; see [`probe`].
pub fn probe_ordinal(ordinal: usize) -> DeviceInfo {
    let ctx = match context(ordinal) {
        Ok(ctx) => ctx,
        Err(reason) => return DeviceInfo::absent(reason),
    };
    let facts = guarded("querying the device", || {
        let name = ctx.name().map_err(|e| format!("device name: {e:?}"))?;
        let (free, total) = ctx
            .mem_get_info()
            .map_err(|e| format!("device memory: {e:?}"))?;
        Ok((name, free as u64, total as u64))
    });
    match facts {
        Ok((name, memory_free, memory_total)) => DeviceInfo {
            present: true,
            name: Some(name),
            memory_free,
            memory_total,
            reason: None,
        },
        Err(reason) => DeviceInfo::absent(reason),
    }
}

/// Runs `f`, turning a panic (cudarc's answer to a missing library or symbol) into `Err`.
pub(crate) fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(result) => result,
        Err(payload) => {
            let msg = payload
                .downcast_ref::<String>()
                .map(String::as_str)
                .or_else(|| payload.downcast_ref::<&str>().copied())
                .unwrap_or("unknown panic");
            Err(format!("{what} panicked: {msg}"))
        }
    }
}

/// Is the CUDA driver library (libcuda.so) loadable?
pub(crate) fn driver_library_present() -> bool {
    // SAFETY: `is_culib_present` only tries to dlopen the driver library under its usual
    // names and closes it again; the library's initialisers are NVIDIA's and are run by any
    // CUDA program. It is wrapped in `guarded` in case loading panics.
    guarded("looking for libcuda", || {
        Ok(unsafe { cudarc::driver::sys::is_culib_present() })
    })
    .unwrap_or(false)
}

/// The primary context of each device opened so far. Contexts are kept for the life of the
/// process: creating one costs tens to hundreds of milliseconds and some device memory.
static CONTEXTS: Mutex<Vec<(usize, Arc<CudaContext>)>> = Mutex::new(Vec::new());

/// The (cached) primary context of device `ordinal`, or why there is none.
pub(crate) fn context(ordinal: usize) -> Result<Arc<CudaContext>, String> {
    let mut contexts = CONTEXTS.lock().unwrap_or_else(PoisonError::into_inner);
    if let Some((_, ctx)) = contexts.iter().find(|(o, _)| *o == ordinal) {
        return Ok(ctx.clone());
    }
    if !driver_library_present() {
        return Err("the CUDA driver library (libcuda.so) is not installed or not loadable".into());
    }
    let ctx = guarded("creating a CUDA context", || {
        let count = CudaContext::device_count()
            .map_err(|e| format!("CUDA driver initialisation failed: {e:?}"))?;
        if count <= 0 {
            return Err("the CUDA driver reports no devices".into());
        }
        if ordinal >= count as usize {
            return Err(format!(
                "no CUDA device {ordinal} (the driver reports {count})"
            ));
        }
        CudaContext::new(ordinal)
            .map_err(|e| format!("creating a context on CUDA device {ordinal} failed: {e:?}"))
    })?;
    contexts.push((ordinal, ctx.clone()));
    Ok(ctx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(free: u64, total: u64) -> DeviceInfo {
        DeviceInfo {
            present: true,
            name: Some("test".into()),
            memory_free: free,
            memory_total: total,
            reason: None,
        }
    }

    #[test]
    fn admission_keeps_a_margin() {
        const GIB: u64 = 1 << 30;
        let small = info(2 * GIB, 4 * GIB);
        assert_eq!(small.admission_margin(), 512 << 20);
        assert!(small.admits(GIB));
        assert!(small.admits(2 * GIB - (512 << 20)));
        assert!(!small.admits(2 * GIB - (512 << 20) + 1));
        let big = info(70 * GIB, 80 * GIB);
        assert_eq!(big.admission_margin(), 80 * GIB / 50);
        assert!(big.admits(68 * GIB));
        assert!(!big.admits(69 * GIB));
        assert!(!big.admits(u64::MAX));
        let absent = DeviceInfo::absent("none");
        assert!(!absent.admits(0));
    }

    #[test]
    fn guarded_turns_panics_into_errors() {
        let r: Result<(), String> = guarded("x", || panic!("boom"));
        assert_eq!(r.unwrap_err(), "x panicked: boom");
        assert_eq!(guarded("x", || Ok(3)), Ok(3));
    }
}
