//! Forked snapshots of the main worker: when to take one (the policy lives here, and
//! only here), and what the supervisor knows of the one it keeps.
//!
//! The worker forks a paused copy of itself between cells when asked (`snapshot` op);
//! the copy connects back as a `snapshot` link and waits. If the worker dies, the kernel
//! promotes the copy: the namespace is back as it was when the copy was forked. One
//! snapshot is kept: a newer one replaces it once it is connected.
//!
//! **Policy.** A snapshot is taken only at a quiescent point (no cell running in the main
//! worker), and only when cells or comm messages reached the worker since the last one
//! ("dirty"). Then, before the next request is sent to the worker:
//! - always, when the worker has been quiet for at least [`IDLE_GAP`] (the cell follows an
//!   idle period: interactive use, so a crash costs exactly that cell);
//! - during a burst (Run All, pipelined requests), only once the last snapshot is older than
//!   [`BURST_INTERVAL`], or 20 times the last fork's duration if that is longer, which
//!   bounds the fork's share of a burst's time to about 5%.
//!
//! Never before a `%undo` cell (it rolls back to the snapshot before it).

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::worker::Frames;

/// A cell that follows at least this much quiet gets a snapshot before it.
pub const IDLE_GAP: Duration = Duration::from_millis(2);

/// During a burst, snapshots are at least this far apart.
pub const BURST_INTERVAL: Duration = Duration::from_millis(100);

/// How many fork durations a burst runs between two snapshots, at least.
const BURST_FORK_RATIO: f64 = 20.0;

/// Snapshot settings of a kernel run.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotConfig {
    /// Take snapshots at all (`--snapshots on|off`).
    pub enabled: bool,
    /// Private memory (USS) a snapshot may hold before it is dropped.
    pub memory_budget: Option<u64>,
}

/// A snapshot that is ready to be promoted.
#[derive(Debug)]
pub struct Snapshot {
    /// Its `seq`.
    pub seq: u64,
    /// Its process (a child of the live worker until that dies).
    pub pid: u32,
    /// Its connection.
    pub link: mpsc::UnboundedSender<Frames>,
    /// When it was forked.
    pub taken_at: Instant,
    /// The execution count of the last cell before it (`None`: no cell had run).
    pub count: Option<u64>,
    /// How long the fork took the live worker.
    pub fork_ms: f64,
}

/// What is known of a snapshot, for `%snapshot`.
#[derive(Debug, Clone, Copy)]
pub struct SnapshotView {
    /// Its `seq`.
    pub seq: u64,
    /// Its process.
    pub pid: u32,
    /// When it was forked.
    pub taken_at: Instant,
    /// The execution count of the last cell before it.
    pub count: Option<u64>,
    /// How long the fork took.
    pub fork_ms: f64,
}

/// A snapshot taken out for promotion.
#[derive(Debug)]
pub struct Promotable {
    /// Its `seq`.
    pub seq: u64,
    /// Its process.
    pub pid: u32,
    /// The execution count of the last cell before it.
    pub count: Option<u64>,
    /// Its connection; `None` while it has not connected yet.
    pub link: Option<mpsc::UnboundedSender<Frames>>,
}

/// A requested snapshot: its fork report and its connection may come in either order.
#[derive(Debug)]
struct Requested {
    seq: u64,
    at: Instant,
    count: Option<u64>,
    taken: Option<(u32, f64)>,
    link: Option<mpsc::UnboundedSender<Frames>>,
}

/// What the supervisor knows of one worker's snapshots.
#[derive(Debug)]
pub struct SnapshotState {
    current: Option<Snapshot>,
    requested: Option<Requested>,
    /// Requests reached the worker since the last snapshot.
    dirty: bool,
    last_request: Option<Instant>,
    last_fork_ms: f64,
    /// Why the last attempt failed (the worker refused: CUDA, …).
    pub refused: Option<String>,
    /// Why the last snapshot was dropped (memory), if it was.
    pub dropped: Option<String>,
    /// Dropped or replaced snapshots that may not have exited yet (not the worker's
    /// memory, whatever the process tree says).
    lingering: Vec<u32>,
}

impl Default for SnapshotState {
    fn default() -> Self {
        SnapshotState {
            current: None,
            requested: None,
            // A fresh worker has start-up state worth keeping before its first cell.
            dirty: true,
            last_request: None,
            last_fork_ms: 0.0,
            refused: None,
            dropped: None,
            lingering: Vec::new(),
        }
    }
}

impl SnapshotState {
    /// Whether a snapshot should be taken before the next request, the worker having been
    /// quiet for `quiet` (zero while a cell runs: never then).
    pub fn due(&self, now: Instant, quiet: Duration) -> bool {
        if !self.dirty || self.requested.is_some() || quiet.is_zero() {
            return false;
        }
        if quiet >= IDLE_GAP {
            return true;
        }
        let spacing = BURST_INTERVAL.max(Duration::from_secs_f64(
            self.last_fork_ms * BURST_FORK_RATIO / 1000.0,
        ));
        self.last_request
            .is_none_or(|at| now.duration_since(at) >= spacing)
    }

    /// A request reached the worker: its state may change.
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// A `snapshot` op with `seq` was sent; `count` is the last execution count.
    pub fn requested(&mut self, seq: u64, now: Instant, count: Option<u64>) {
        self.dirty = false;
        self.last_request = Some(now);
        self.requested = Some(Requested {
            seq,
            at: now,
            count,
            taken: None,
            link: None,
        });
    }

    /// The worker forked snapshot `seq` as `pid`. Returns the replaced snapshot, if the
    /// new one is now complete.
    pub fn taken(&mut self, seq: u64, pid: u32, fork_ms: f64) -> Option<Snapshot> {
        self.last_fork_ms = fork_ms;
        match &mut self.requested {
            Some(r) if r.seq == seq => r.taken = Some((pid, fork_ms)),
            _ => return None,
        }
        self.complete()
    }

    /// Snapshot `seq` connected. Returns the replaced snapshot if the new one is now
    /// complete; `Err` gives the link back if no such snapshot is expected.
    pub fn connected(
        &mut self,
        seq: u64,
        link: mpsc::UnboundedSender<Frames>,
    ) -> Result<Option<Snapshot>, mpsc::UnboundedSender<Frames>> {
        match &mut self.requested {
            Some(r) if r.seq == seq => r.link = Some(link),
            _ => return Err(link),
        }
        Ok(self.complete())
    }

    fn complete(&mut self) -> Option<Snapshot> {
        let ready = matches!(&self.requested, Some(r) if r.taken.is_some() && r.link.is_some());
        if !ready {
            return None;
        }
        let r = self.requested.take()?;
        let (pid, fork_ms) = r.taken?;
        self.refused = None;
        self.dropped = None;
        self.current.replace(Snapshot {
            seq: r.seq,
            pid,
            link: r.link?,
            taken_at: r.at,
            count: r.count,
            fork_ms,
        })
    }

    /// The worker could not fork snapshot `seq`.
    pub fn refuse(&mut self, seq: u64, reason: String) {
        if self.requested.as_ref().is_some_and(|r| r.seq == seq) {
            self.requested = None;
        }
        self.refused = Some(reason);
    }

    /// Snapshot `seq`'s connection ended (it exited).
    pub fn gone(&mut self, seq: u64) {
        if self.current.as_ref().is_some_and(|s| s.seq == seq) {
            self.current = None;
        }
        if self.requested.as_ref().is_some_and(|r| r.seq == seq) {
            self.requested = None;
        }
    }

    /// Drops the snapshot (its process exits when its link closes), saying why.
    pub fn drop_current(&mut self, why: String) -> Option<Snapshot> {
        let s = self.current.take()?;
        self.dropped = Some(why);
        self.lingering.push(s.pid);
        Some(s)
    }

    /// The snapshot to promote, taken out: the newest one that was forked, even if it
    /// has not connected yet (its worker died right after the fork); else the ready one.
    pub fn take(&mut self) -> Option<Promotable> {
        let current = self.current.take();
        match self.requested.take() {
            Some(Requested {
                seq,
                count,
                taken: Some((pid, _)),
                link,
                ..
            }) => Some(Promotable {
                seq,
                pid,
                count,
                link,
            }),
            _ => current.map(|s| Promotable {
                seq: s.seq,
                pid: s.pid,
                count: s.count,
                link: Some(s.link),
            }),
        }
    }

    /// The pids of its snapshots: ready, being taken, or dropped and still exiting.
    pub fn snapshot_pids(&mut self) -> Vec<u32> {
        self.lingering
            .retain(|pid| std::path::Path::new(&format!("/proc/{pid}")).exists());
        let requested = self
            .requested
            .as_ref()
            .and_then(|r| r.taken)
            .map(|(pid, _)| pid);
        self.current
            .iter()
            .map(|s| s.pid)
            .chain(requested)
            .chain(self.lingering.iter().copied())
            .collect()
    }

    /// Remembers a snapshot that was let go, until it has exited.
    pub fn let_go(&mut self, old: Option<Snapshot>) {
        if let Some(s) = old {
            self.lingering.push(s.pid);
        }
    }

    /// The ready snapshot.
    pub fn current(&self) -> Option<&Snapshot> {
        self.current.as_ref()
    }

    /// The snapshot a crash now would promote: the newest forked one (connected or not),
    /// else the ready one.
    pub fn latest(&self) -> Option<SnapshotView> {
        if let Some(Requested {
            seq,
            at,
            count,
            taken: Some((pid, fork_ms)),
            ..
        }) = &self.requested
        {
            return Some(SnapshotView {
                seq: *seq,
                pid: *pid,
                taken_at: *at,
                count: *count,
                fork_ms: *fork_ms,
            });
        }
        self.current.as_ref().map(|s| SnapshotView {
            seq: s.seq,
            pid: s.pid,
            taken_at: s.taken_at,
            count: s.count,
            fork_ms: s.fork_ms,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn link() -> mpsc::UnboundedSender<Frames> {
        mpsc::unbounded_channel().0
    }

    #[test]
    fn idle_gap_and_burst_spacing() {
        let t0 = Instant::now();
        let mut s = SnapshotState::default();
        assert!(s.due(t0, IDLE_GAP), "a fresh worker: before its first cell");
        assert!(!s.due(t0, Duration::ZERO), "never while a cell runs");
        s.requested(1, t0, None);
        assert!(!s.due(t0, IDLE_GAP), "one at a time");
        assert!(s.taken(1, 10, 2.0).is_none());
        assert!(s.connected(1, link()).unwrap().is_none());
        assert_eq!(s.current().map(|c| c.pid), Some(10));
        assert!(!s.due(t0, IDLE_GAP), "clean: nothing ran since");
        s.touch();
        assert!(s.due(t0, IDLE_GAP), "after an idle period");
        let burst = Duration::from_millis(1);
        assert!(
            !s.due(t0 + Duration::from_millis(50), burst),
            "burst: too soon"
        );
        assert!(s.due(t0 + BURST_INTERVAL, burst), "burst: spaced");
        // A slow fork spaces burst snapshots further apart.
        s.requested(2, t0, None);
        s.taken(2, 11, 20.0);
        let old = s.connected(2, link()).unwrap();
        assert_eq!(
            old.map(|o| o.pid),
            Some(10),
            "the older one is handed back to drop"
        );
        s.touch();
        assert!(!s.due(t0 + Duration::from_millis(300), burst));
        assert!(s.due(t0 + Duration::from_millis(400), burst));
    }

    #[test]
    fn refusals_unexpected_links_and_deaths() {
        let t0 = Instant::now();
        let mut s = SnapshotState::default();
        assert!(s.connected(9, link()).is_err(), "not requested");
        s.requested(1, t0, Some(3));
        s.refuse(1, "CUDA was initialized".into());
        assert_eq!(s.refused.as_deref(), Some("CUDA was initialized"));
        assert!(s.current().is_none());
        s.requested(2, t0, Some(3));
        s.connected(2, link()).unwrap();
        s.taken(2, 12, 1.0);
        assert!(s.refused.is_none());
        s.gone(2);
        assert!(s.take().is_none(), "a dead snapshot is not promoted");
        // Forked but not connected yet: promoted all the same (it connects later).
        s.requested(3, t0, Some(4));
        s.taken(3, 13, 1.0);
        let late = s.take().unwrap();
        assert_eq!(
            (late.pid, late.count, late.link.is_none()),
            (13, Some(4), true)
        );
    }
}
