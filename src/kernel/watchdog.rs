//! The periodic watchdog (every 100 ms while anything is in motion, else every second):
//! overdue exits, memory limit, liveness, interrupt grace, `timeout=` tags, and the idle
//! pool's reaper.

use tracing::{info, warn};

use super::*;
use crate::ipc_ops::ToWorker;
use crate::pool::KillReason;

impl Kernel {
    /// Whether anything is in motion that the watchdog must look at every [`TICK`]: a
    /// request in flight on any worker (its cell's memory, its `timeout=` tag, an
    /// interrupt's grace, liveness), a worker starting, exiting or being killed, an heir
    /// coming, a pool or a template to replace, a shutdown. Otherwise it looks every
    /// [`IDLE_TICK`]: memory that a user's thread grows between cells is then caught
    /// within a second.
    pub(super) fn watch_closely(&self) -> bool {
        !self.pending.is_empty()
            || self.exiting
            || self.heir_deadline.is_some()
            || self.pool.any_starting()
            || self.pool.missing() > 0
            || (self.pool.forks_from_template() && self.pool.template().is_none())
            || self
                .pool
                .all()
                .any(|w| w.exit.is_some() || w.kill_reason.is_some())
    }

    /// Runs every `TICK` (or `IDLE_TICK`): overdue exits, memory limit, `timeout=` tags,
    /// liveness, interrupt grace, idle reaping.
    pub(super) async fn watchdog(&mut self) {
        let now = Instant::now();
        let overdue: Vec<WorkerId> = self
            .pool
            .all()
            .filter(|w| {
                w.exit
                    .as_ref()
                    .is_some_and(|(_, _, at)| now.duration_since(*at) > DRAIN_WAIT)
            })
            .map(|w| w.id)
            .collect();
        for id in overdue {
            if let Some((status, tail, _)) = self.pool.get_mut(id).and_then(|w| w.exit.take()) {
                warn!(worker = id, "its connection did not close after it exited");
                self.worker_exited(id, status, tail).await;
            }
        }
        if self.heir_deadline.is_some_and(|d| now > d) {
            warn!("the promoted snapshot did not come up in time; giving it up");
            self.heir_deadline = None;
            let heirs: Vec<WorkerId> = self
                .pool
                .all()
                .filter(|w| w.role == crate::pool::WorkerRole::Starting { heir: true })
                .map(|w| w.id)
                .collect();
            for id in heirs {
                // Its exit answers what it owed (as "namespace lost").
                self.kill_worker(id, KillReason::Crash("the snapshot did not come up".into()));
            }
        }
        self.check_memory();
        self.reap_strays();
        if self.check_timeouts(now) || self.check_main(now) {
            return;
        }
        for id in self.pool.reap(now) {
            info!(
                worker = id,
                "retired an idle worker (IDLE_WORKER_SHUTDOWN_DURATION)"
            );
        }
        self.refill_pool();
    }

    /// The memory limit: a worker over it is killed, its snapshot dropped first if that
    /// is what tips it over (see [`Self::check_snapshot_memory`]).
    fn check_memory(&mut self) {
        let main = self
            .pool
            .main_mut()
            .map(|w| (w.pid(), w.snapshots.snapshot_pids()));
        if let Some((pid, snapshots)) = main {
            // The worker and whatever it started, not its snapshot (counted on its own).
            let used = crate::proctree::resident(pid, &snapshots);
            self.check_snapshot_memory(used);
        }
        let Some(limit) = self.cfg.memory_limit else {
            return;
        };
        let ids: Vec<WorkerId> = self.pool.all().map(|w| w.id).collect();
        let mut over: Vec<(WorkerId, crate::proctree::OverLimit)> = Vec::new();
        for id in ids {
            let Some(w) = self.pool.get_mut(id).filter(|w| w.kill_reason.is_none()) else {
                continue;
            };
            // Not its snapshots (counted on their own), even those still exiting.
            let snapshots = w.snapshots.snapshot_pids();
            if let Some(o) = crate::proctree::over_limit(w.pid(), limit, &snapshots) {
                over.push((id, o));
            }
        }
        for (id, over) in over {
            // The worker and whatever it started (proctree.rs); its snapshot survives it.
            self.kill_worker(id, KillReason::Crash(over.reason()));
            over.kill_descendants();
        }
    }

    /// Cells past their `timeout=` tag get the `interrupt` op (once); those still running
    /// a grace period later get their worker killed. Says whether a worker was killed.
    fn check_timeouts(&mut self, now: Instant) -> bool {
        let grace = self.cfg.interrupt_grace.unwrap_or(TIMEOUT_GRACE);
        let mut kill = None;
        for (id, p) in self.pending.iter_mut() {
            let Some(exec) = p.exec.as_mut() else {
                continue;
            };
            let Some(timeout) = exec.timeout else {
                continue;
            };
            let worker = if p.borrowed {
                self.pool.borrowed(p.worker)
            } else {
                self.pool.main().filter(|w| w.id == p.worker)
            };
            let Some(worker) = worker else {
                continue;
            };
            if worker.kill_reason.is_some() {
                continue;
            }
            match exec.timed_out {
                None if now.duration_since(exec.started) > timeout => {
                    info!(
                        worker = worker.id,
                        id, "a cell ran past its timeout= tag; interrupting it"
                    );
                    exec.timed_out = Some(now);
                    worker.send_aux(
                        ToWorker::Interrupt {
                            id: *id,
                            timeout: Some(timeout.as_secs_f64()),
                        }
                        .message(),
                    );
                }
                Some(at) if now.duration_since(at) > grace => {
                    kill = Some((worker.id, timeout));
                    break;
                }
                _ => {}
            }
        }
        let Some((wid, timeout)) = kill else {
            return false;
        };
        self.kill_worker(
            wid,
            KillReason::Crash(format!(
                "killed: the cell ran past its timeout={} tag and did not stop when interrupted",
                seconds(timeout)
            )),
        );
        true
    }

    /// Interrupt grace and liveness of a busy main worker. Says whether it was killed.
    fn check_main(&mut self, now: Instant) -> bool {
        let Some((wid, killed, last_heard)) = self
            .pool
            .main()
            .map(|w| (w.id, w.kill_reason.is_some(), w.last_heard))
        else {
            return false;
        };
        if killed || !self.main_busy() {
            return false;
        }
        if let Some(grace) = self.cfg.interrupt_grace {
            let first = self
                .main_executions(wid)
                .filter_map(|(_, e)| e.interrupted)
                .min();
            if first.is_some_and(|first| now.duration_since(first) > grace) {
                self.kill_worker(
                    wid,
                    KillReason::Crash(format!(
                        "killed: the cell was still running {:.1} s after an interrupt",
                        grace.as_secs_f64()
                    )),
                );
                return true;
            }
        }
        if let Some(timeout) = self.cfg.unresponsive_timeout {
            if now.duration_since(last_heard) > timeout {
                self.kill_worker(
                    wid,
                    KillReason::Crash(format!(
                        "killed: unresponsive for {:.1} s (not even its I/O thread answered: a deadlock in C code holding the GIL?)",
                        timeout.as_secs_f64()
                    )),
                );
                return true;
            }
            if now.duration_since(self.last_ping) >= PING_EVERY {
                self.last_ping = now;
                self.ping_seq += 1;
                if let Some(w) = self.pool.main() {
                    w.send_aux(ToWorker::Ping { seq: self.ping_seq }.message());
                }
            }
        }
        false
    }
}

/// Seconds as a tag would write them: `1`, `2.5`.
fn seconds(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0}")
    } else {
        format!("{s}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tag_seconds() {
        assert_eq!(seconds(Duration::from_secs(1)), "1");
        assert_eq!(seconds(Duration::from_millis(2500)), "2.5");
    }
}
