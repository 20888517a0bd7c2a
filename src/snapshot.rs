//! Forked snapshots of the main worker: when to take one (the policy lives here, and
//! only here), and what the supervisor knows of the one it keeps.
//!
//! The worker forks a paused copy of itself between cells when asked (`snapshot` op);
//! the copy connects back as a `snapshot` link and waits. If the worker dies, the kernel
//! promotes the copy: the namespace is back as it was when the copy was forked. Two
//! snapshots are kept: the newest (what a crash restores) and the one before it, so that
//! `%undo` can go back to before the last cell even when the newest was taken after it.
//!
//! **Policy.** A snapshot is taken only at a quiescent point (no cell running in the main
//! worker), and only when cells or comm messages reached the worker since the last one
//! ("dirty"):
//! - when the worker has been quiet for [`IDLE_GAP`] after its last reply (the kernel
//!   arms a timer for it: [`SnapshotState::idle_due_at`]), or at once after a cell that
//!   ran at least 10 fork durations. At human pace the fork and the copy's start-up are
//!   over long before the next cell arrives, so they cost that cell nothing, and a crash
//!   costs exactly that cell;
//! - before a cell that arrives after [`IDLE_GAP`] of quiet if the timer has not fired yet;
//! - during a burst (Run All, pipelined requests), before a cell only once the last
//!   snapshot is older than [`BURST_INTERVAL`], or 20 times the last fork's duration if
//!   that is longer, which bounds the fork's share of a burst's time to about 5%.
//!
//! A cell sent ahead (kernel/ahead.rs) is not sent when a burst's snapshot is due, and
//! waits in the worker for the supervisor's word after a long cell, so both rules above
//! hold for it too.
//!
//! A cell tagged `snapshot` always gets one right before it (if something ran since the
//! last one), burst or not. Never before a `%undo` cell. `%undo` promotes the newest snapshot taken before the last
//! cell ran (see [`SnapshotState::take`]).

use std::time::{Duration, Instant};

use tokio::sync::mpsc;

use crate::worker::Frames;

/// A cell that follows at least this much quiet gets a snapshot before it.
pub const IDLE_GAP: Duration = Duration::from_millis(2);

/// During a burst, snapshots are at least this far apart.
pub const BURST_INTERVAL: Duration = Duration::from_millis(100);

/// How many fork durations a burst runs between two snapshots, at least.
const BURST_FORK_RATIO: f64 = 20.0;

/// A cell that ran at least this many fork durations (of at least [`MIN_FORK_COST`] each)
/// gets its idle snapshot as soon as it is done, not after [`IDLE_GAP`]: the fork then costs
/// at most a tenth of that cell, and a client that sends the next cell within 2 ms of the
/// reply (nbclient, papermill) still gets one between the two.
const LONG_CELL_FORKS: f64 = 10.0;

/// What a fork costs at least, counting the copy-on-write faults after it.
const MIN_FORK_COST: Duration = Duration::from_millis(1);

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
    /// The one before `current`, kept for `%undo`.
    previous: Option<Snapshot>,
    requested: Option<Requested>,
    /// Requests reached the worker since the last snapshot.
    dirty: bool,
    last_request: Option<Instant>,
    last_fork_ms: f64,
    /// How long the worker's last busy period (cells running, back to back) lasted.
    last_busy: Duration,
    /// Why the last attempt failed (the worker refused: CUDA, …).
    pub refused: Option<String>,
    /// Why the last snapshot was dropped (memory), if none was taken since.
    pub dropped: Option<String>,
    /// Why a snapshot was last dropped, even if a newer one was taken since.
    pub last_drop: Option<String>,
    /// Dropped or replaced snapshots that may not have exited yet (not the worker's
    /// memory, whatever the process tree says).
    lingering: Vec<u32>,
}

impl Default for SnapshotState {
    fn default() -> Self {
        SnapshotState {
            current: None,
            previous: None,
            requested: None,
            // A fresh worker has start-up state worth keeping before its first cell.
            dirty: true,
            last_request: None,
            last_fork_ms: 0.0,
            last_busy: Duration::ZERO,
            refused: None,
            dropped: None,
            last_drop: None,
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
        self.burst_spacing_elapsed(now)
    }

    /// Whether a cell of a burst starting at `now` would get a snapshot before it (the
    /// burst rule of [`Self::due`]): a cell is not sent ahead then (kernel/ahead.rs), so
    /// that the snapshot can come between it and the cell before.
    pub fn burst_due(&self, now: Instant) -> bool {
        self.wanted() && self.burst_spacing_elapsed(now)
    }

    fn burst_spacing_elapsed(&self, now: Instant) -> bool {
        let spacing = BURST_INTERVAL.max(Duration::from_secs_f64(
            self.last_fork_ms * BURST_FORK_RATIO / 1000.0,
        ));
        self.last_request
            .is_none_or(|at| now.duration_since(at) >= spacing)
    }

    /// When the idle snapshot is due, for a worker quiet since `quiet_since` (`None`: a cell
    /// runs): [`IDLE_GAP`] after it, or at once after a long cell (see
    /// [`LONG_CELL_FORKS`]), if anything reached the worker since the last one.
    pub fn idle_due_at(&self, quiet_since: Option<Instant>) -> Option<Instant> {
        if !self.dirty || self.requested.is_some() {
            return None;
        }
        let gap = if self.last_busy >= self.long_cell() {
            Duration::ZERO
        } else {
            IDLE_GAP
        };
        quiet_since.map(|since| since + gap)
    }

    /// How long a cell runs at least to get its snapshot right after it (see
    /// [`LONG_CELL_FORKS`]): a cell sent ahead waits for it then (kernel/ahead.rs).
    pub fn long_cell(&self) -> Duration {
        MIN_FORK_COST
            .max(Duration::from_secs_f64(self.last_fork_ms / 1000.0))
            .mul_f64(LONG_CELL_FORKS)
    }

    /// Whether a snapshot may be asked for now: something reached the worker since the
    /// last one, and none is on its way.
    pub fn wanted(&self) -> bool {
        self.dirty && self.requested.is_none()
    }

    /// The worker was busy for `busy` (cells running back to back) and is quiet now.
    pub fn was_busy(&mut self, busy: Duration) {
        self.last_busy = busy;
    }

    /// A request reached the worker: its state may change.
    pub fn touch(&mut self) {
        self.dirty = true;
    }

    /// Whether a cell tagged `snapshot` needs one before it: something reached the worker
    /// since the last one was requested (one in flight may be replaced, see
    /// [`SnapshotState::requested`]).
    pub fn due_for_tagged_cell(&self) -> bool {
        self.dirty
    }

    /// A `snapshot` op with `seq` was sent; `count` is the last execution count. A request
    /// still in flight is replaced: its process, if forked, is let go (it exits when its
    /// link closes, or is refused one when it connects late).
    pub fn requested(&mut self, seq: u64, now: Instant, count: Option<u64>) {
        if let Some(old) = self.requested.take() {
            if let Some((pid, _)) = old.taken {
                self.lingering.push(pid);
            }
        }
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

    /// The worker forked snapshot `seq` as `pid`. Returns the snapshot to let go (the one
    /// before the replaced one), if the new one is now complete.
    pub fn taken(&mut self, seq: u64, pid: u32, fork_ms: f64) -> Option<Snapshot> {
        self.last_fork_ms = fork_ms;
        match &mut self.requested {
            Some(r) if r.seq == seq => r.taken = Some((pid, fork_ms)),
            _ => {
                // Replaced while in flight: it exits once its link is refused.
                self.lingering.push(pid);
                return None;
            }
        }
        self.complete()
    }

    /// Snapshot `seq` connected. Returns the snapshot to let go if the new one is now
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
        let replaced = self.current.replace(Snapshot {
            seq: r.seq,
            pid,
            link: r.link?,
            taken_at: r.at,
            count: r.count,
            fork_ms,
        });
        // Two of the same cell would be one too many: the newer one is enough.
        match replaced {
            Some(old) if old.count == r.count => Some(old),
            old => std::mem::replace(&mut self.previous, old),
        }
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
        if self.previous.as_ref().is_some_and(|s| s.seq == seq) {
            self.previous = None;
        }
        if self.requested.as_ref().is_some_and(|r| r.seq == seq) {
            self.requested = None;
        }
    }

    /// Drops both snapshots (their processes exit when their links close), saying why.
    pub fn drop_all(&mut self, why: String) {
        let dropped = [self.current.take(), self.previous.take()];
        for s in dropped.into_iter().flatten() {
            self.dropped = Some(why.clone());
            self.last_drop = Some(why.clone());
            self.lingering.push(s.pid);
        }
    }

    /// Drops the ready snapshot `pid`, saying why.
    pub fn drop_pid(&mut self, pid: u32, why: String) {
        let s = if self.previous.as_ref().is_some_and(|s| s.pid == pid) {
            self.previous.take()
        } else if self.current.as_ref().is_some_and(|s| s.pid == pid) {
            self.current.take()
        } else {
            None
        };
        if let Some(s) = s {
            self.lingering.push(s.pid);
            self.last_drop = Some(why.clone());
            if self.current.is_none() {
                self.dropped = Some(why);
            }
        }
    }

    /// The snapshot to promote, taken out; the others are dropped with this state.
    /// - After a crash (`undo_of` is `None`): the newest one that was forked, even if it
    ///   has not connected yet (its worker died right after the fork).
    /// - For `%undo` of the cell numbered `undo_of`: the newest one taken before that cell
    ///   ran (its count is below it).
    pub fn take(&mut self, undo_of: Option<u64>) -> Option<Promotable> {
        let forked = match self.requested.take() {
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
            _ => None,
        };
        let ready = [self.current.take(), self.previous.take()]
            .into_iter()
            .flatten()
            .map(|s| Promotable {
                seq: s.seq,
                pid: s.pid,
                count: s.count,
                link: Some(s.link),
            });
        let mut newest_first = forked.into_iter().chain(ready);
        match undo_of {
            None => newest_first.next(),
            Some(cell) => newest_first.find(|s| s.count.unwrap_or(0) < cell),
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
            .chain(self.previous.iter())
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

    /// The ready snapshots, newest first.
    pub fn ready(&self) -> impl Iterator<Item = &Snapshot> {
        self.current.iter().chain(self.previous.iter())
    }

    /// The snapshot `%undo` of the cell numbered `cell` would promote.
    pub fn undo_target(&self, cell: u64) -> Option<SnapshotView> {
        self.latest()
            .into_iter()
            .chain(self.ready().map(Snapshot::view))
            .find(|s| s.count.unwrap_or(0) < cell)
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
        self.current.as_ref().map(Snapshot::view)
    }
}

impl Snapshot {
    fn view(&self) -> SnapshotView {
        SnapshotView {
            seq: self.seq,
            pid: self.pid,
            taken_at: self.taken_at,
            count: self.count,
            fork_ms: self.fork_ms,
        }
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
        assert_eq!(s.ready().next().map(|c| c.pid), Some(10));
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
        s.requested(2, t0, Some(1));
        s.taken(2, 11, 20.0);
        assert!(
            s.connected(2, link()).unwrap().is_none(),
            "the older one is kept"
        );
        s.touch();
        assert!(!s.due(t0 + Duration::from_millis(300), burst));
        assert!(s.due(t0 + Duration::from_millis(400), burst));
        s.requested(3, t0, Some(2));
        s.taken(3, 12, 1.0);
        let old = s.connected(3, link()).unwrap();
        assert_eq!(
            old.map(|o| o.pid),
            Some(10),
            "the third hands the first back to drop"
        );
        assert_eq!(s.ready().map(|r| r.pid).collect::<Vec<_>>(), [12, 11]);
    }

    #[test]
    fn a_long_cell_gets_its_idle_snapshot_at_once() {
        let t0 = Instant::now();
        let mut s = SnapshotState::default();
        s.was_busy(Duration::from_millis(5));
        assert_eq!(s.idle_due_at(Some(t0)), Some(t0 + IDLE_GAP), "short: 10 ms");
        s.was_busy(Duration::from_millis(10));
        assert_eq!(s.idle_due_at(Some(t0)), Some(t0), "10 forks of 1 ms");
        s.requested(1, t0, None);
        s.taken(1, 10, 4.0);
        s.connected(1, link()).unwrap();
        s.touch();
        assert_eq!(
            s.idle_due_at(Some(t0)),
            Some(t0 + IDLE_GAP),
            "forks take 4 ms"
        );
        s.was_busy(Duration::from_millis(40));
        assert_eq!(s.idle_due_at(Some(t0)), Some(t0));
    }

    #[test]
    fn a_replaced_request_lets_its_process_go() {
        let t0 = Instant::now();
        let mut s = SnapshotState::default();
        s.requested(1, t0, None);
        s.taken(1, 10, 1.0);
        s.touch();
        assert!(s.due_for_tagged_cell());
        s.requested(2, t0, Some(1));
        assert!(!s.due_for_tagged_cell());
        assert!(
            s.connected(1, link()).is_err(),
            "the replaced one is refused its link"
        );
        assert!(s.taken(2, 11, 1.0).is_none());
        assert!(s.connected(2, link()).unwrap().is_none());
        assert_eq!(s.ready().map(|r| r.pid).collect::<Vec<_>>(), [11]);
        assert!(s.lingering.contains(&10));
    }

    #[test]
    fn idle_timer_is_armed_only_when_dirty_and_quiet() {
        let t0 = Instant::now();
        let mut s = SnapshotState::default();
        assert_eq!(s.idle_due_at(Some(t0)), Some(t0 + IDLE_GAP));
        assert_eq!(s.idle_due_at(None), None, "a cell runs");
        s.requested(1, t0, None);
        assert_eq!(s.idle_due_at(Some(t0)), None, "one at a time");
        s.taken(1, 10, 1.0);
        s.connected(1, link()).unwrap();
        assert_eq!(s.idle_due_at(Some(t0)), None, "nothing ran since");
        s.touch();
        assert!(s.idle_due_at(Some(t0)).is_some());
    }

    #[test]
    fn undo_goes_before_the_last_cell_and_a_crash_to_the_newest() {
        let t0 = Instant::now();
        let mut s = SnapshotState::default();
        // Before cell 1 (count None), then after cell 1 at idle (count 1).
        for (seq, pid, count) in [(1, 10, None), (2, 11, Some(1))] {
            s.requested(seq, t0, count);
            s.taken(seq, pid, 1.0);
            s.connected(seq, link()).unwrap();
        }
        // `%undo` runs as cell 2 and undoes cell 1: the snapshot from before it.
        assert_eq!(s.undo_target(1).map(|v| v.pid), Some(10));
        assert_eq!(s.undo_target(2).map(|v| v.pid), Some(11));
        let mut crash = SnapshotState::default();
        std::mem::swap(&mut crash, &mut s);
        let mut undo = SnapshotState::default();
        for (seq, pid, count) in [(1, 10, None), (2, 11, Some(1))] {
            undo.requested(seq, t0, count);
            undo.taken(seq, pid, 1.0);
            undo.connected(seq, link()).unwrap();
        }
        assert_eq!(crash.take(None).map(|p| p.pid), Some(11));
        assert_eq!(undo.take(Some(1)).map(|p| p.pid), Some(10));
        // Two of the same count: the newer replaces it, the older one stays for %undo.
        let mut same = SnapshotState::default();
        for (seq, pid, count) in [(1, 10, None), (2, 11, Some(1)), (3, 12, Some(1))] {
            same.requested(seq, t0, count);
            same.taken(seq, pid, 1.0);
            let old = same.connected(seq, link()).unwrap();
            assert_eq!(old.map(|o| o.pid), (seq == 3).then_some(11));
        }
        assert_eq!(same.ready().map(|r| r.pid).collect::<Vec<_>>(), [12, 10]);
        same.drop_pid(10, "tight".into());
        assert_eq!(same.ready().map(|r| r.pid).collect::<Vec<_>>(), [12]);
        assert!(same.dropped.is_none(), "the newest is still there");
        assert_eq!(same.last_drop.as_deref(), Some("tight"));
        same.drop_pid(12, "budget".into());
        assert_eq!(same.dropped.as_deref(), Some("budget"));
    }

    #[test]
    fn refusals_unexpected_links_and_deaths() {
        let t0 = Instant::now();
        let mut s = SnapshotState::default();
        assert!(s.connected(9, link()).is_err(), "not requested");
        s.requested(1, t0, Some(3));
        s.refuse(1, "CUDA was initialized".into());
        assert_eq!(s.refused.as_deref(), Some("CUDA was initialized"));
        assert!(s.ready().next().is_none());
        s.requested(2, t0, Some(3));
        s.connected(2, link()).unwrap();
        s.taken(2, 12, 1.0);
        assert!(s.refused.is_none());
        s.gone(2);
        assert!(s.take(None).is_none(), "a dead snapshot is not promoted");
        // Forked but not connected yet: promoted all the same (it connects later).
        s.requested(3, t0, Some(4));
        s.taken(3, 13, 1.0);
        let late = s.take(None).unwrap();
        assert_eq!(
            (late.pid, late.count, late.link.is_none()),
            (13, Some(4), true)
        );
    }
}
