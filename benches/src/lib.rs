//! Support for Baton's benchmarks: child processes killed on drop, process statistics
//! from `/proc`, percentiles, and the per-stage timings of `baton-loadgen --stages`
//! ([`stages`]).

use std::path::Path;

pub mod stages;

/// A child process killed (SIGKILL) and reaped when dropped: a bench that fails half-way
/// leaves no server behind.
pub struct KillOnDrop(pub std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// CPU time (user + system) of a process and its peak resident set.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct ProcStats {
    /// User + system CPU seconds.
    pub cpu_s: f64,
    /// Peak resident set size (VmHWM), bytes.
    pub peak_rss: u64,
    /// Resident set size now (VmRSS), bytes.
    pub rss: u64,
}

/// Reads the CPU time and peak RSS of `pid` from `/proc` (None if it is gone).
pub fn proc_stats(pid: u32) -> Option<ProcStats> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may hold spaces) start after the last ')'.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = clock_ticks();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |field: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(field))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    Some(ProcStats {
        cpu_s: (utime + stime) / ticks,
        peak_rss: kib("VmHWM:"),
        rss: kib("VmRSS:"),
    })
}

fn clock_ticks() -> f64 {
    // USER_HZ is 100 on every Linux configuration Baton runs on.
    100.0
}

/// The children of `pid` (e.g. the nats-server of `baton dev`).
pub fn children(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for t in tasks.flatten() {
        let p = t.path().join("children");
        if let Ok(s) = std::fs::read_to_string(Path::new(&p)) {
            out.extend(s.split_whitespace().filter_map(|c| c.parse::<u32>().ok()));
        }
    }
    out.sort_unstable();
    out.dedup();
    out
}

/// The `p`-th percentile (0..=1) of sorted values (nearest rank).
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let rank = ((sorted.len() as f64) * p).ceil().max(1.0) as usize;
    sorted[rank.min(sorted.len()) - 1]
}

/// The median of unsorted values.
pub fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    percentile(&v, 0.5)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_use_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }

    #[test]
    fn reads_its_own_process() {
        let s = proc_stats(std::process::id()).unwrap();
        assert!(s.peak_rss > 0);
        assert!(s.cpu_s >= 0.0);
    }
}
