//! Sending the main lane's next queue cell ahead (IPC.md, "Cells sent ahead").
//!
//! A queue cell waits for the one before it. Sent only once that one's reply is back, each
//! cell of a burst (Run All, pipelined requests) costs a round of supervisor → worker →
//! supervisor between two cells, in which the worker waits. So while a queue cell runs in
//! the main worker, the next queue cell of the main lane is sent already, marked `after`
//! the running one: the worker starts it right after that one's reply, unless
//! - that reply is an error that aborts the queue (`unless_error`, the running cell's
//!   plan): the worker drops it, and the supervisor answers it `aborted` with the rest of
//!   the queue, and gives its number back;
//! - that cell ran long (`within`: the snapshot policy's long cell): the worker says `held`,
//!   the supervisor takes the snapshot due after a long cell, then says `go`.
//!
//! For the client nothing changes: the cell's `busy` and `execute_input` are published when
//! the reply before it is handled, as if it had been sent then. The lane keeps the cell
//! (lanes.rs) until it starts, so nothing passes it. At most one cell is ahead, and only a
//! plain one: not tagged `snapshot` or `timeout=`, not `%undo`, not while a debugger session
//! is on, and not when a burst's snapshot is due before it. If the worker dies first, the
//! cell did not start: it waits in the lane again, with the number it was given.

use std::time::Instant;

use tracing::{debug, warn};

use super::execute::{execute_op, Execution, Queued};
use super::lanes::LaneId;
use super::snapshots::Before;
use super::{Backend, Channel, Kernel};
use crate::cell_plan::Mode;
use crate::ipc_ops::{After, Count, ToWorker};
use crate::worker::WorkerId;

/// Whether a cell may be sent ahead: a plain queue cell, not one given back by a dead
/// worker (it keeps its number; it goes the usual way).
fn plain(queued: &Queued) -> bool {
    let plan = &queued.plan;
    plan.mode == Mode::Queue
        && !plan.undo
        && !plan.tags.snapshot
        && plan.tags.timeout.is_none()
        && queued.count.is_none()
}

impl Kernel {
    /// Sends the main lane's next queue cell ahead, if one waits and may go.
    pub(super) fn send_ahead(&mut self) {
        if self.debug.is_on() {
            return;
        }
        let lane = LaneId::Main;
        let Some(running) = self.lanes.running(&lane) else {
            return;
        };
        let Some(main) = self.pool.main() else {
            return;
        };
        let wid = main.id;
        // The running cell must be the main worker's (not a dead one's, being answered).
        let Some(unless_error) = self
            .pending
            .get(&running)
            .filter(|p| p.worker == wid && !p.borrowed)
            .and_then(|p| p.exec.as_ref())
            .map(|e| e.abort_on_error)
        else {
            return;
        };
        if self.snapshots_on && main.snapshots.burst_due(Instant::now()) {
            return; // sent after the running cell, with the snapshot before it
        }
        let Some((msg, plan)) = self
            .lanes
            .next_for_ahead(&lane)
            .filter(|q| plain(q))
            .map(|q| (q.msg.clone(), q.plan.clone()))
        else {
            return;
        };
        // After a long cell the worker waits for a word (`held` … `go`), so that the
        // snapshot that follows a long cell can come before this one.
        let within = (self.snapshots_on && self.cfg.backend == Backend::Asyncio)
            .then(|| main.snapshots.long_cell().as_secs_f64() * 1000.0);
        let count = self.take_count(&plan);
        let exec = Execution::new(Some(lane.clone()), true, &plan, count);
        let id = self.register(Channel::Shell, &msg, wid, Some(exec));
        let after = After {
            id: running,
            unless_error,
            within,
        };
        let ctrl = execute_op(id, count, (None, None, None), Some(after));
        let frames = super::request_frames(ctrl.frame(), &msg);
        if let Some(q) = self.lanes.send_ahead(&lane, id) {
            q.count = Some(count);
        }
        if let Some(w) = self.pool.main_mut() {
            w.snapshots.touch();
            w.send_main(frames);
        }
        debug!(id, after = running, "queue cell sent ahead");
        self.sent_ahead += 1;
    }

    /// The main lane's running cell finished; its reply was an error that aborts the queue
    /// if `aborts`. The cell sent ahead after it (if any) starts now, as it did in the
    /// worker; or, aborted (the worker dropped it), it is returned, to be answered first.
    pub(super) fn ahead_after(&mut self, aborts: bool) -> Option<Queued> {
        let lane = LaneId::Main;
        if aborts {
            let (id, queued) = self.lanes.take_ahead(&lane)?;
            self.pending.remove(&id);
            if let Some(count) = queued.count {
                self.give_back_count(count);
            }
            return Some(queued);
        }
        let (id, queued) = self.lanes.start_ahead(&lane)?;
        if let Some(exec) = self.pending.get_mut(&id).and_then(|p| p.exec.as_mut()) {
            exec.started = Instant::now();
        }
        let count = queued.count.expect("a cell sent ahead has its number");
        if let Some(wid) = self.pool.main().map(|w| w.id) {
            self.cell_starts(wid, &queued.msg, &queued.plan, count);
        }
        None
    }

    /// The main worker holds cell `id`, sent ahead: the cell before it ran long. The
    /// snapshot due after a long cell is taken (the worker is between the two), then the
    /// cell may start.
    pub(super) fn ahead_held(&mut self, wid: WorkerId, id: u64) {
        if self.pool.main().map(|w| w.id) != Some(wid)
            || self.lanes.running(&LaneId::Main) != Some(id)
        {
            warn!(worker = wid, id, "`held` for no cell sent ahead; ignored");
            return;
        }
        let count = self.last_count_before(id);
        self.maybe_snapshot(&Before::Held { id, count });
        if let Some(w) = self.pool.main_mut() {
            // It reaches the worker's namespace only now, after that snapshot: the next
            // one must not think nothing happened since (it was touched when sent).
            w.snapshots.touch();
            w.send_main(ToWorker::Go { id }.message());
        }
    }

    /// The execution count of the last cell before cell `id` (the number before its own).
    fn last_count_before(&self, id: u64) -> Option<u64> {
        let number = self.pending.get(&id)?.exec.as_ref()?.count.number;
        number.checked_sub(1).filter(|n| *n > 0)
    }

    /// The main worker died: the cell sent ahead did not start there (the one it waited
    /// for had no reply), so it is not owed by that worker. It stays in the lane (see
    /// [`super::lanes::Lanes::release_running`]) with the number it was given.
    pub(super) fn forget_ahead_request(&mut self) {
        if let Some(id) = self.lanes.ahead_id(&LaneId::Main) {
            self.pending.remove(&id);
        }
    }

    /// The number of a cell that will not run goes back, if no cell took one since.
    pub(super) fn give_back_count(&mut self, count: Count) {
        if count.takes_count && self.last_count == Some(count.number) {
            self.last_count = count.number.checked_sub(1).filter(|n| *n > 0);
        }
    }
}
