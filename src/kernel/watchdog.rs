//! The periodic watchdog: overdue exits, memory limit, liveness, interrupt grace,
//! `timeout=` tags, and the idle pool's reaper.

use super::*;

impl Kernel {
    /// Runs every `TICK`: overdue exits, memory limit, `timeout=` tags, liveness,
    /// interrupt grace, idle reaping.
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
                // The worker and whatever it started (proctree.rs).
                if let Some(over) = crate::proctree::over_limit(pid, limit) {
                    self.kill_worker(id, pid, over.reason());
                    over.kill_descendants();
                }
            }
        }
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
            if self.kill_reasons.contains_key(&worker.id) {
                continue;
            }
            match exec.timed_out {
                None if now.duration_since(exec.started) > timeout => {
                    info!(
                        worker = worker.id,
                        id, "a cell ran past its timeout= tag; interrupting it"
                    );
                    exec.timed_out = Some(now);
                    let op = json!({"op": "interrupt", "id": id, "timeout": timeout.as_secs_f64()});
                    worker.send_aux(vec![Bytes::from(op.to_string())]);
                }
                Some(at) if now.duration_since(at) > grace => {
                    kill = Some((worker.id, worker.pid, timeout));
                    break;
                }
                _ => {}
            }
        }
        let Some((wid, pid, timeout)) = kill else {
            return false;
        };
        self.kill_worker(
            wid,
            pid,
            format!(
                "killed: the cell ran past its timeout={} tag and did not stop when interrupted",
                seconds(timeout)
            ),
        );
        true
    }

    /// Interrupt grace and liveness of a busy main worker. Says whether it was killed.
    fn check_main(&mut self, now: Instant) -> bool {
        let Some((wid, pid)) = self.pool.main().map(|w| (w.id, w.pid)) else {
            return false;
        };
        if self.kill_reasons.contains_key(&wid) || !self.main_busy() {
            return false;
        }
        if let Some(grace) = self.cfg.interrupt_grace {
            let first = self
                .main_executions(wid)
                .filter_map(|e| e.interrupted)
                .min();
            if first.is_some_and(|first| now.duration_since(first) > grace) {
                self.kill_worker(
                    wid,
                    pid,
                    format!(
                        "killed: the cell was still running {:.1} s after an interrupt",
                        grace.as_secs_f64()
                    ),
                );
                return true;
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
                return true;
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
