//! Interrupts: SIGINT (the client's, to the kernel's process group) and
//! `interrupt_request` reach the workers running cells; a second interrupt of a cell that
//! ignored the first kills its worker (and, with a snapshot, promotes the snapshot).

use nix::sys::signal::Signal;
use tracing::{debug, info, warn};

use super::*;
use crate::pool::KillReason;

impl Kernel {
    /// Interrupts the cells running in the main worker (queue, task, thread and subshell
    /// cells alike: SIGINT reaches them all) and in borrowed workers. If a main-worker cell
    /// that a previous interrupt reached is still running (it ignored SIGINT, or sits in C
    /// code), the worker is killed and replaced instead.
    pub(super) fn interrupt(&mut self, why: &str) {
        // `# process` cells are interrupted too (once per interrupt; no escalation: a stuck
        // one costs only its own worker, which the user can kill by restarting).
        let lent: Vec<WorkerId> = self
            .pending
            .values()
            .filter(|p| p.borrowed && p.exec.is_some())
            .map(|p| p.worker)
            .collect();
        for id in lent {
            if let Some(w) = self.pool.borrowed(id) {
                w.signal(Signal::SIGINT);
            }
        }
        let Some(wid) = self.pool.main().map(|w| w.id) else {
            return;
        };
        let now = Instant::now();
        let mut running = self.main_executions(wid).peekable();
        if running.peek().is_none() {
            debug!(why, "no cell running in the main worker");
            return;
        }
        let mut again = false;
        for exec in running {
            again |= exec.interrupted.is_some();
            exec.interrupted.get_or_insert(now);
        }
        if again {
            self.kill_worker(
                wid,
                KillReason::Crash("killed: the cell did not stop when interrupted (it ignored SIGINT or is stuck in C code), so it was interrupted again".into()),
            );
        } else {
            info!(worker = wid, why, "interrupting the running cells");
            if let Some(w) = self.pool.main() {
                w.signal(Signal::SIGINT);
            }
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
