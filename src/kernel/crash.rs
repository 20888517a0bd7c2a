//! A worker's death: what it owed the clients (an error reply for its running cell, and
//! for every request it had), and who takes over the namespace — its snapshot, promoted,
//! or a warm spare with a fresh namespace.

use serde_json::json;
use tracing::{debug, info, warn};

use super::*;
use crate::exit::{describe_exit, last_words};
use crate::pool::{KillReason, WorkerRole, WorkerSlot};
use crate::snapshot::Promotable;
use lanes::LaneId;

/// A crash answer held back until the promoted snapshot is up (or given up): only then is
/// it known whether the namespace was restored.
#[derive(Debug)]
pub(super) struct Owed {
    /// The request's id.
    id: u64,
    pending: Pending,
    count: Option<u64>,
    cause: String,
    words: Vec<String>,
    /// The snapshot's age, for the message: the count of the last cell it includes.
    snapshot_count: Option<u64>,
    /// It is the `%undo` cell itself (the main lane's running cell when the worker asked
    /// for the undo), answered ok; cells running beside it were cut short.
    undo: bool,
    /// Why no snapshot could be used, if none is promoted.
    lost: String,
}

/// How long a promoted snapshot may take to say hello before it is given up.
pub(super) const HEIR_TIMEOUT: Duration = Duration::from_secs(5);

impl Kernel {
    pub(super) async fn worker_exited(
        &mut self,
        id: WorkerId,
        status: std::process::ExitStatus,
        tail: Vec<String>,
    ) {
        let Some(mut slot) = self.pool.remove(id) else {
            self.admission.forget(id);
            return;
        };
        // A main worker's snapshot may still connect (as this worker's) before it is
        // promoted: forgotten once it has.
        if slot.role != WorkerRole::Main || self.exiting {
            self.admission.forget(id);
        }
        if self.exiting {
            return;
        }
        let reason = slot.kill_reason.take();
        let cause = match &reason {
            Some(KillReason::Crash(why)) => why.clone(),
            Some(KillReason::Undo) => "%undo".to_string(),
            None => describe_exit(status),
        };
        match slot.role {
            WorkerRole::Main => {}
            WorkerRole::Borrowed => {
                warn!(
                    worker = id,
                    cause, "a borrowed worker died; the main namespace is intact"
                );
                let owed = self.take_owed(id);
                for (_, p) in owed {
                    self.answer_crash(
                        &p,
                        slot.execution_count,
                        &cause,
                        &last_words(&tail),
                        Fate::Borrowed,
                    )
                    .await;
                }
                self.dispatch_process();
                self.refill_pool();
                return;
            }
            WorkerRole::Retiring => {
                debug!(worker = id, %status, "retired worker exited");
                return;
            }
            WorkerRole::Starting { heir: true } => {
                warn!(worker = id, %status, "the promoted snapshot died before it was ready");
                self.heir_failed().await;
                return;
            }
            WorkerRole::Starting { heir: false } => {
                self.start_failed(id, status, &tail);
                self.dispatch_process();
                self.refill_pool();
                return;
            }
            WorkerRole::Template { ready } => {
                self.template_exited(id, ready, status, &tail);
                return;
            }
            WorkerRole::Idle(_) => {
                warn!(worker = id, %status, "a spare worker exited: {}", last_words(&tail).join("\n"));
                self.dispatch_process();
                self.refill_pool();
                return;
            }
        }
        // The main worker is gone.
        let undo = reason == Some(KillReason::Undo);
        if undo {
            info!(worker = id, "%undo: promoting the snapshot");
        } else {
            warn!(worker = id, cause, "main worker died");
        }
        let words = last_words(&tail);
        let lost = self.no_snapshot_reason(&slot.snapshots);
        let snapshot = self.promote_snapshot(&mut slot, undo);
        let snapshot_count = snapshot.as_ref().and_then(|s| s.count);
        let count = slot.execution_count;
        // A cell sent ahead did not start: it is not owed, it waits (or is aborted) again.
        self.forget_ahead_request();
        let owed = self.take_owed(id);
        // As after any error: the queued cells are aborted, unless the crashed cells' plans
        // say errors do not stop the queue (`raises-exception`, `stop_on_error: false`).
        // `%undo` is no error (its cell answers ok): what is queued runs on the heir.
        let abort = !undo
            && owed
                .iter()
                .filter_map(|(_, p)| p.exec.as_ref())
                .any(|e| e.abort_on_error);
        for (id, pending) in owed {
            // A counted cell's reply carries the number its execute_input did; the others,
            // the worker's last (as the worker's own reply would).
            let count = match &pending.exec {
                Some(e) if e.count.takes_count => Some(e.count.number),
                _ => count,
            };
            let the_undo_cell = undo
                && pending
                    .exec
                    .as_ref()
                    .is_some_and(|e| e.holds_lane && e.lane == Some(LaneId::Main));
            self.owed_to_heir.push(Owed {
                id,
                pending,
                count,
                cause: cause.clone(),
                words: words.clone(),
                snapshot_count,
                undo: the_undo_cell,
                lost: lost.clone(),
            });
        }
        // Aborted after the crashed cell's own reply (subshells stay).
        if abort {
            let queued = self.lanes.reset_all();
            for count in queued.iter().rev().filter_map(|q| q.count) {
                self.give_back_count(count);
            }
            self.abort_after_owed.extend(queued);
        } else {
            self.lanes.release_running();
        }
        if snapshot.is_none() {
            self.settle_owed(false).await;
            self.take_over_with_spare().await;
        }
        self.refill_pool();
    }

    /// The heir could not take over: answer with "namespace lost", and let a spare do it.
    pub(super) async fn heir_failed(&mut self) {
        self.heir_deadline = None;
        if let Some(late) = self.late_heir.take() {
            self.admission.forget(late.dead);
        }
        self.settle_owed(false).await;
        self.take_over_with_spare().await;
        self.refill_pool();
    }

    /// A warm spare becomes the main worker (fresh namespace).
    async fn take_over_with_spare(&mut self) {
        if self.pool.main().is_none() && self.pool.promote_idle().is_some() {
            info!(worker = ?self.pool.main().map(|w| w.id), "a warm worker took over");
            self.main_ready().await;
        }
    }

    /// Answers what a dead main worker owed, now that the namespace's fate is known.
    pub(super) async fn settle_owed(&mut self, restored: bool) {
        let queued = std::mem::take(&mut self.abort_after_owed);
        for o in std::mem::take(&mut self.owed_to_heir) {
            if o.pending.msg_type == crate::msg_type::MsgType::DebugRequest {
                self.debug_crash_reply(o.id, &o.pending, &o.cause).await;
                continue;
            }
            let fate = if restored {
                Fate::Restored {
                    snapshot_count: o.snapshot_count,
                    undo: o.undo,
                }
            } else {
                Fate::Lost(o.lost.clone())
            };
            self.answer_crash(&o.pending, o.count, &o.cause, &o.words, fate)
                .await;
        }
        self.abort(queued).await;
    }

    /// Everything a dead worker owed, oldest first (the running cell first).
    fn take_owed(&mut self, id: WorkerId) -> Vec<(u64, Pending)> {
        let mut owed: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.worker == id)
            .map(|(k, _)| *k)
            .collect();
        owed.sort_unstable();
        owed.into_iter()
            .filter_map(|k| self.pending.remove(&k).map(|p| (k, p)))
            .collect()
    }

    async fn answer_crash(
        &mut self,
        p: &Pending,
        count: Option<u64>,
        cause: &str,
        words: &[String],
        fate: Fate,
    ) {
        if let Fate::Restored {
            undo: true,
            snapshot_count,
        } = fate
        {
            // `%undo` asked for this: a plain result, not an error.
            if p.exec.is_some() {
                let text = format!(
                    "The namespace was rolled back to {}.\nFiles written, network calls and other processes are not undone.\n",
                    before_cell(snapshot_count)
                );
                self.publish_stream(&p.header, "stdout", &text);
                let reply = json!({"status": "ok", "execution_count": count, "payload": [], "user_expressions": {}});
                self.reply_to(p, br#"{"status":"ok"}"#, reply.to_string().as_bytes(), &[])
                    .await;
            } else {
                self.publish_status(&p.header, "idle");
            }
            return;
        }
        let evalue = match &fate {
            Fate::Borrowed => {
                format!("the `# process` worker died ({cause}); the main namespace is intact")
            }
            Fate::Restored { snapshot_count, .. } => {
                let this = count.is_some_and(|n| snapshot_count.map_or(n <= 1, |s| s + 1 >= n));
                if this {
                    format!("the worker process died ({cause}); the namespace was restored to before this cell: names defined by earlier cells are kept; this cell's changes are lost")
                } else {
                    format!("the worker process died ({cause}); the namespace was restored to {}: names defined before it are kept; the changes of later cells, this one included, are lost", before_cell(*snapshot_count))
                }
            }
            Fate::Lost(why) => {
                format!("the worker process died ({cause}); its namespace was lost ({why})")
            }
        };
        let mut traceback = vec![format!("\x1b[0;31mWorkerCrashed\x1b[0m: {evalue}")];
        traceback.extend(words.iter().cloned());
        if matches!(fate, Fate::Lost(_)) {
            traceback.push(
                "The next cell runs in a fresh worker: re-run the cells it needs.".to_string(),
            );
        }
        let error = json!({"ename": "WorkerCrashed", "evalue": evalue, "traceback": traceback});
        let is_execute = p.exec.is_some();
        if is_execute {
            let msg =
                self.outbox
                    .iopub("error", &p.header, b"{}", error.to_string().as_bytes(), &[]);
            self.iopub.send(msg);
        }
        let mut reply = error;
        reply["status"] = json!("error");
        if is_execute {
            reply["execution_count"] = json!(count);
        }
        self.reply_to(
            p,
            br#"{"status":"error"}"#,
            reply.to_string().as_bytes(),
            &[],
        )
        .await;
    }

    /// Promotes the dead main worker's snapshot (for `%undo`: the one from before the cell
    /// it undoes), if it has one and snapshots are on: returns it (the heir is on its way).
    fn promote_snapshot(&mut self, slot: &mut WorkerSlot, undo: bool) -> Option<Promotable> {
        let dead = slot.id;
        // `%undo` runs as the cell after the one it undoes.
        let undo_of = undo.then(|| self.last_count.unwrap_or(0).saturating_sub(1));
        let snapshot = self
            .snapshots_on
            .then(|| slot.snapshots.take(undo_of))
            .flatten();
        let Some(mut snapshot) = snapshot else {
            self.admission.forget(dead);
            return None;
        };
        let token = match crate::admission::Token::random() {
            Ok(t) => t,
            Err(e) => {
                warn!(error = %e, "no random token for the heir");
                return None;
            }
        };
        self.next_worker += 1;
        let id = self.next_worker;
        // Its worker is dead, so the kernel has reparented it to the worker's reaper: us
        // (a child subreaper), or the handed-over template that forked the worker.
        // Same name as the worker's `heir_diagnostics_path`.
        let diagnostics = self
            .worker_cfg
            .socket_path
            .with_file_name(format!("diag-{id}.log"));
        let proc = worker::adopt(
            id,
            snapshot.pid,
            worker::LastWords::File(diagnostics),
            slot.proc.reaper.clone(),
            self.events_tx.clone(),
            &self.tasks,
        );
        self.admission.expect(id, snapshot.pid, token.clone());
        self.pool.started(id, proc, true);
        if let Some(heir) = self.pool.get_mut(id) {
            heir.snapshots.refused = slot.snapshots.refused.take();
        }
        let next = self.last_count.map_or(1, |n| n + 1);
        let op = crate::ipc_ops::ToWorker::Promote {
            worker_id: id,
            token: token.as_str(),
            execution_count: next,
        }
        .message();
        info!(
            worker = id,
            pid = snapshot.pid,
            seq = snapshot.seq,
            "promoting the snapshot"
        );
        // Given up (killed, its answers "lost") if it is not up in time.
        self.heir_deadline = Some(Instant::now() + HEIR_TIMEOUT);
        match snapshot.link.take() {
            Some(link) => {
                self.admission.forget(dead);
                // A closed link means it died: its exit gives the heir up.
                let _ = link.send(op);
            }
            // Forked just before the worker died, not connected yet: sent when it does.
            None => {
                self.late_heir = Some(LateHeir {
                    dead,
                    seq: snapshot.seq,
                    promote: op,
                })
            }
        }
        Some(snapshot)
    }
}

/// A promoted snapshot that had not connected yet when its worker died: `promote` is sent
/// when it does.
#[derive(Debug)]
pub(super) struct LateHeir {
    /// The dead worker it is a snapshot of.
    pub dead: WorkerId,
    /// Its `seq`.
    pub seq: u64,
    /// The `promote` message.
    pub promote: worker::Frames,
}

/// What became of the namespace of a dead worker.
#[derive(Debug, Clone)]
enum Fate {
    /// A `# process` worker: the main namespace was never at risk.
    Borrowed,
    /// The snapshot was promoted.
    Restored {
        snapshot_count: Option<u64>,
        undo: bool,
    },
    /// No snapshot could be used, for this reason.
    Lost(String),
}

/// "before cell [n]", naming the first cell the snapshot does not include.
fn before_cell(snapshot_count: Option<u64>) -> String {
    match snapshot_count {
        Some(n) => format!("before cell [{}]", n + 1),
        None => "before the first cell".to_string(),
    }
}
