//! Per-cell timestamps for profiling the hot path (`scripts/bench --only profile`): with
//! `KERNELVISOR_TIMINGS=DIR`, the supervisor appends a line per execute request to
//! `DIR/supervisor.tsv` (and the Python worker to `DIR/worker-PID.tsv`), in nanoseconds of
//! `CLOCK_MONOTONIC`, the clock of Python's `time.monotonic_ns()` and `perf_counter()`, so
//! the three processes' times compare. Off (one branch per point) without the variable.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::sync::{Mutex, OnceLock};

use nix::time::{clock_gettime, ClockId};

/// The open log, if timings are on.
fn log() -> Option<&'static Mutex<File>> {
    static LOG: OnceLock<Option<Mutex<File>>> = OnceLock::new();
    LOG.get_or_init(|| {
        let dir = std::env::var_os("KERNELVISOR_TIMINGS")?;
        let path = std::path::Path::new(&dir).join("supervisor.tsv");
        match OpenOptions::new().create(true).append(true).open(&path) {
            Ok(f) => Some(Mutex::new(f)),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "KERNELVISOR_TIMINGS: cannot open");
                None
            }
        }
    })
    .as_ref()
}

/// Whether timings are recorded.
pub fn enabled() -> bool {
    log().is_some()
}

/// `CLOCK_MONOTONIC` in nanoseconds if timings are on, else 0 (no clock read).
pub fn now() -> u64 {
    if !enabled() {
        return 0;
    }
    clock_gettime(ClockId::CLOCK_MONOTONIC)
        .map(|t| t.tv_sec() as u64 * 1_000_000_000 + t.tv_nsec() as u64)
        .unwrap_or(0)
}

/// Appends one tab-separated line (`what`, then the fields), if timings are on.
pub fn record(what: &str, fields: &[&dyn std::fmt::Display]) {
    let Some(log) = log() else {
        return;
    };
    let mut line = what.to_string();
    for f in fields {
        line.push('\t');
        line.push_str(&f.to_string());
    }
    line.push('\n');
    if let Ok(mut f) = log.lock() {
        let _ = f.write_all(line.as_bytes());
    }
}
