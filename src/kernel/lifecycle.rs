//! Starting and stopping worker processes.

use super::*;

impl Kernel {
    /// Starts workers until the pool has its main worker and warm spares. A missing main
    /// worker starts at once; spares only while no cell runs or waits, so that warming
    /// them (a Python start-up each) never competes with a cell for the CPU. The watchdog
    /// tick calls this too, so spares follow within a tick of the kernel going quiet.
    pub(super) fn refill_pool(&mut self) {
        let missing = self.pool.missing();
        let quiet = !self.main_busy() && self.lanes.is_quiet();
        let allowed = if self.pool.main().is_none() {
            missing.min(1)
        } else if quiet {
            missing
        } else {
            0
        };
        for _ in 0..allowed {
            self.spawn_worker();
        }
    }

    pub(super) fn spawn_worker(&mut self) {
        self.next_worker += 1;
        let id = self.next_worker;
        match worker::spawn(&self.worker_cfg, id, self.events_tx.clone()) {
            Ok(pid) => self.pool.started(id, pid),
            Err(e) => error!(
                python = %self.worker_cfg.python.display(),
                error = %e,
                "cannot start a worker"
            ),
        }
    }

    /// Asks every worker to exit, waits briefly, then kills what is left.
    pub(super) async fn stop_workers(&mut self) {
        let mut alive: HashMap<WorkerId, u32> = self.pool.shutdown_all().into_iter().collect();
        let deadline = tokio::time::Instant::now() + WORKER_EXIT_GRACE;
        while !alive.is_empty() {
            match tokio::time::timeout_at(deadline, self.events_rx.recv()).await {
                Ok(Some(WorkerEvent::Exited { id, .. })) => {
                    alive.remove(&id);
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(_) => break,
            }
        }
        for (id, pid) in alive {
            debug!(worker = id, pid, "killing worker at exit");
            worker::signal(pid, libc::SIGKILL);
        }
    }
}
