//! Interrupts: SIGINT (the client's, to the kernel's process group) and
//! `interrupt_request` reach the workers running cells; a second interrupt of a cell that
//! ignored the first kills its worker (and, with a snapshot, promotes the snapshot).

use nix::sys::signal::Signal;
use tracing::{debug, info, warn};

use super::lanes::LaneId;
use super::*;
use crate::ipc_ops::ToWorker;
use crate::pool::{KillReason, WorkerSlot};

impl Kernel {
    /// Interrupts the cells that have started, as far as the client knows: those running in
    /// the main worker (queue, task, thread and subshell cells alike) and in borrowed
    /// workers. If a main-worker cell that a previous interrupt reached is still running
    /// (it ignored SIGINT, or sits in C code), the worker is killed and replaced instead.
    ///
    /// Each worker is told which cells the interrupt is for (the `interrupt` op, on `aux`),
    /// not signalled: the op makes the interrupt exact. A cell the worker has not started
    /// yet (its main thread was busy) stops as soon as it starts; a cell that had already
    /// ended there passes nothing on, neither to the next cell nor to one that started in
    /// the worker meanwhile (a signal would have interrupted whatever ran). The worker
    /// signals its own main thread where that is what stops the cell.
    pub(super) fn interrupt(&mut self, why: &str) {
        // `# process` cells are interrupted too (once per interrupt; no escalation: a stuck
        // one costs only its own worker, which the user can kill by restarting).
        let lent: Vec<(u64, WorkerId)> = self
            .pending
            .iter()
            .filter(|(_, p)| p.borrowed && p.exec.is_some())
            .map(|(id, p)| (*id, p.worker))
            .collect();
        for (id, wid) in lent {
            if let Some(w) = self.pool.borrowed(wid) {
                interrupt_cells(w, &[id]);
            }
        }
        let Some(wid) = self.pool.main().map(|w| w.id) else {
            return;
        };
        // A cell sent ahead has not started for the client: the interrupt is not for it.
        let ahead = self.lanes.ahead_id(&LaneId::Main);
        let now = Instant::now();
        let mut started = Vec::new();
        let mut again = false;
        for (id, exec) in self.main_executions(wid) {
            if Some(id) != ahead {
                again |= exec.interrupted.is_some();
                exec.interrupted.get_or_insert(now);
                started.push(id);
            }
        }
        if started.is_empty() {
            debug!(why, "no cell running in the main worker");
            return;
        }
        if again {
            self.kill_worker(
                wid,
                KillReason::Crash("killed: the cell did not stop when interrupted (it ignored SIGINT or is stuck in C code), so it was interrupted again".into()),
            );
        } else if let Some(w) = self.pool.main() {
            info!(worker = wid, why, cells = ?started, "interrupting the running cells");
            interrupt_cells(w, &started);
        }
    }

    /// Kills a worker (through its owned process handle), remembering why.
    pub(super) fn kill_worker(&mut self, id: WorkerId, reason: KillReason) {
        let Some(w) = self.pool.get_mut(id) else {
            return;
        };
        warn!(worker = id, pid = w.pid(), ?reason, "killing worker");
        w.kill_reason.get_or_insert(reason);
        w.signal(Signal::SIGKILL);
    }
}

/// Tells worker `w` which cells an interrupt is for.
fn interrupt_cells(w: &WorkerSlot, ids: &[u64]) {
    for &id in ids {
        w.send_aux(ToWorker::Interrupt { id, timeout: None }.message());
    }
}
