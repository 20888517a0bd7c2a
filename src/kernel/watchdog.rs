//! The periodic watchdog: overdue exits, memory limit, liveness, interrupt grace, and
//! the idle pool's reaper.

use super::*;

impl Kernel {
    /// Runs every `TICK`: overdue exits, memory limit, liveness, interrupt grace, idle
    /// reaping.
    pub(super) async fn watchdog(&mut self) {
        let now = Instant::now();
        let overdue: Vec<WorkerId> = self
            .exits
            .iter()
            .filter(|(_, (_, _, at))| now.duration_since(*at) > DRAIN_WAIT)
            .map(|(id, _)| *id)
            .collect();
        for id in overdue {
            if let Some((status, tail, _)) = self.exits.remove(&id) {
                warn!(worker = id, "its connection did not close after it exited");
                self.worker_exited(id, status, tail).await;
            }
        }
        if let Some(limit) = self.cfg.memory_limit {
            for (id, pid) in self.pool.all_pids() {
                if self.kill_reasons.contains_key(&id) {
                    continue;
                }
                if let Some(rss) = worker::rss_bytes(pid).filter(|rss| *rss > limit) {
                    self.kill_worker(
                        id,
                        pid,
                        format!(
                            "killed: out of memory (resident memory reached {} MiB; the limit is {} MiB)",
                            rss >> 20,
                            limit >> 20
                        ),
                    );
                }
            }
        }
        if let (Some(running), Some((wid, pid))) = (
            self.running.as_ref(),
            self.pool.main().map(|w| (w.id, w.pid)),
        ) {
            if running.worker == wid && !self.kill_reasons.contains_key(&wid) {
                if let (Some(grace), Some(first)) =
                    (self.cfg.interrupt_grace, running.first_interrupt)
                {
                    if now.duration_since(first) > grace {
                        self.kill_worker(
                            wid,
                            pid,
                            format!(
                                "killed: the cell was still running {:.1} s after an interrupt",
                                grace.as_secs_f64()
                            ),
                        );
                        return;
                    }
                }
                if let Some(timeout) = self.cfg.unresponsive_timeout {
                    if now.duration_since(self.last_heard) > timeout {
                        self.kill_worker(
                            wid,
                            pid,
                            format!(
                                "killed: unresponsive for {:.1} s (not even its I/O thread answered: a deadlock in C code holding the GIL?)",
                                timeout.as_secs_f64()
                            ),
                        );
                        return;
                    }
                    if now.duration_since(self.last_ping) >= PING_EVERY {
                        self.last_ping = now;
                        self.ping_seq += 1;
                        let ping = format!(r#"{{"op":"ping","seq":{}}}"#, self.ping_seq);
                        if let Some(w) = self.pool.main() {
                            w.send_aux(vec![Bytes::from(ping)]);
                        }
                    }
                }
            }
        }
        for id in self.pool.reap(now) {
            info!(
                worker = id,
                "retired an idle worker (IDLE_WORKER_SHUTDOWN_DURATION)"
            );
        }
        self.refill_pool();
    }
}
