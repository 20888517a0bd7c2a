//! The kernel's side of snapshots (design in [`crate::snapshot`]): asking the main worker
//! to fork one when the policy says so (at idle, on a timer, or before a cell), keeping
//! the newest two, dropping them when memory is tight, `%snapshot` and `%undo`.

use serde_json::json;
use tracing::{info, warn};

use super::*;
use crate::ipc_ops::ToWorker;
use crate::pool::KillReason;

/// When a snapshot may be taken: at idle (the timer), before a cell with this plan, or
/// before a cell sent ahead that the worker holds after a long cell (with the execution
/// count of the cell before it).
pub(super) enum Before<'a> {
    Idle,
    Cell(&'a crate::cell_plan::CellPlan),
    Held {
        /// The held cell's request id.
        id: u64,
        /// The execution count of the cell before it.
        count: Option<u64>,
    },
}

/// Snapshots holding less than `limit / SMALL_SNAPSHOT_DIVISOR` of their own are not
/// dropped for a tight `--memory-limit`.
const SMALL_SNAPSHOT_DIVISOR: u64 = 16;

impl Kernel {
    /// When the idle snapshot's timer should fire: the main worker is quiet and something
    /// reached it since its last snapshot (`None`: no timer).
    pub(super) fn idle_snapshot_at(&self) -> Option<Instant> {
        if !self.snapshots_on || self.cfg.backend != Backend::Asyncio {
            return None;
        }
        let at = self.pool.main()?.snapshots.idle_due_at(self.quiet_since)?;
        // Fired once for this quiet period already (declined): not again.
        (self.idle_snapshot_fired != Some(at)).then_some(at)
    }

    /// The idle snapshot's timer fired.
    pub(super) fn idle_snapshot(&mut self, at: Instant) {
        self.idle_snapshot_fired = Some(at);
        self.maybe_snapshot(&Before::Idle);
    }

    /// Before a cell is sent to the main worker, or when it has been quiet for a while:
    /// fork a snapshot if the policy says so (never before an `%undo` cell, which goes
    /// back to the snapshot before the cell it undoes; always before a cell tagged
    /// `snapshot`).
    pub(super) fn maybe_snapshot(&mut self, before: &Before) {
        // A held cell counts as running, but has not started: the worker is between cells
        // unless others (task or thread cells) run.
        let busy = match before {
            Before::Held { id, .. } => self.main_busy_besides(*id),
            _ => self.main_busy(),
        };
        if !self.snapshots_on
            || matches!(before, Before::Cell(plan) if plan.undo)
            || busy
            || self.cfg.backend != Backend::Asyncio
        {
            return;
        }
        let now = Instant::now();
        let quiet = self.quiet_since.map_or(Duration::ZERO, |since| {
            now.duration_since(since).max(Duration::from_nanos(1))
        });
        let count = match before {
            Before::Held { count, .. } => *count,
            _ => self.last_count,
        };
        let Some(w) = self.pool.main_mut() else {
            return;
        };
        let due = match before {
            // The timer's time was `idle_due_at`'s, which may be sooner than the idle gap.
            Before::Idle => w
                .snapshots
                .idle_due_at(self.quiet_since)
                .is_some_and(|at| at <= now),
            Before::Cell(plan) if plan.tags.snapshot => w.snapshots.due_for_tagged_cell(),
            Before::Cell(_) => w.snapshots.due(now, quiet),
            Before::Held { .. } => w.snapshots.wanted(),
        };
        if !due {
            tracing::trace!(
                quiet_us = quiet.as_micros() as u64,
                "no snapshot before this cell"
            );
            return;
        }
        self.next_snapshot += 1;
        let seq = self.next_snapshot;
        w.snapshots.requested(seq, now, count);
        w.send_main(ToWorker::Snapshot { seq }.message());
    }

    /// A snapshot connected (the handshake checked it is the worker's child).
    pub(super) fn snapshot_connected(
        &mut self,
        id: WorkerId,
        seq: u64,
        link: mpsc::UnboundedSender<worker::Frames>,
    ) {
        if self
            .late_heir
            .as_ref()
            .is_some_and(|l| l.dead == id && l.seq == seq)
        {
            let late = self.late_heir.take().expect("checked");
            self.admission.forget(id);
            let _ = link.send(late.promote);
            return;
        }
        let Some(w) = self.pool.get_mut(id) else {
            return;
        };
        tracing::debug!(worker = id, seq, "snapshot connected");
        match w.snapshots.connected(seq, link) {
            Ok(old) => w.snapshots.let_go(old),
            // Not expected (late, or replaced): dropping the link ends it.
            Err(link) => drop(link),
        }
    }

    pub(super) fn snapshot_taken(&mut self, id: WorkerId, seq: u64, pid: u32, fork_ms: f64) {
        self.admission.expect_snapshot(id, pid);
        if let Some(w) = self.pool.get_mut(id) {
            tracing::debug!(worker = id, seq, pid, fork_ms, "snapshot taken");
            // The replaced one exits when its link closes.
            let old = w.snapshots.taken(seq, pid, fork_ms);
            w.snapshots.let_go(old);
        }
    }

    pub(super) fn snapshot_refused(&mut self, id: WorkerId, seq: u64, reason: String) {
        if let Some(w) = self.pool.get_mut(id) {
            if w.snapshots.refused.as_deref() != Some(reason.as_str()) {
                warn!(worker = id, reason, "no snapshot");
            }
            // Without a snapshot of the current state, the old ones would restore
            // too far back without saying so: drop them.
            w.snapshots.drop_all(reason.clone());
            w.snapshots.refuse(seq, reason);
        }
    }

    /// `%snapshot on|off`.
    pub(super) fn set_snapshots(&mut self, enabled: bool) {
        info!(enabled, "snapshots switched");
        self.snapshots_on = enabled;
        if !enabled {
            if let Some(w) = self.pool.main_mut() {
                w.snapshots.drop_all("snapshots are off".into());
            }
        }
    }

    /// Why a crash of the worker whose snapshots these are would lose the namespace.
    pub(super) fn no_snapshot_reason(&self, state: &crate::snapshot::SnapshotState) -> String {
        if !self.snapshots_on {
            return "no snapshot: snapshots are off".into();
        }
        if self.cfg.backend != Backend::Asyncio {
            return "no snapshot: not supported with the trio backend yet".into();
        }
        if let Some(why) = &state.refused {
            return format!("no snapshot: {why}");
        }
        if let Some(why) = &state.dropped {
            return format!("no snapshot: it was dropped ({why})");
        }
        "no snapshot was ready".into()
    }

    /// The cell `%undo` would undo: the one before the `%undo` cell, which is running.
    fn undo_of(&self) -> u64 {
        self.last_count.unwrap_or(0).saturating_sub(1)
    }

    /// The snapshot's state, for `%snapshot` and `kernelvisor_info_request`.
    pub(super) fn snapshot_info(&self) -> Value {
        let w = self.pool.main();
        let current = w.and_then(|w| w.snapshots.latest());
        let undo = w.and_then(|w| w.snapshots.undo_target(self.undo_of()));
        json!({
            "enabled": self.snapshots_on,
            "ready": current.is_some(),
            "pid": current.map(|s| s.pid),
            "seq": current.map(|s| s.seq),
            "age_seconds": current.as_ref().map(|s| s.taken_at.elapsed().as_secs_f64()),
            "age_cells": current.map(|s| self.last_count.unwrap_or(0).saturating_sub(s.count.unwrap_or(0))),
            "before_cell": current.map(|s| s.count.unwrap_or(0) + 1),
            "private_bytes": current.and_then(|s| crate::proctree::uss(s.pid)),
            "fork_ms": current.map(|s| s.fork_ms),
            "undo_ready": undo.is_some(),
            "undo_before_cell": undo.map(|s| s.count.unwrap_or(0) + 1),
            "kept": w.map_or(Vec::new(), |w| w.snapshots.ready().map(|s| json!({
                "pid": s.pid,
                "before_cell": s.count.unwrap_or(0) + 1,
                "private_bytes": crate::proctree::uss(s.pid),
            })).collect()),
            "last_dropped": w.and_then(|w| w.snapshots.last_drop.clone()),
            "memory_budget": self.cfg.snapshots.memory_budget,
            "why_not": match (current, w) {
                (None, Some(w)) => Some(self.no_snapshot_reason(&w.snapshots)),
                (None, None) => Some("no worker is up".to_string()),
                _ => None,
            },
        })
    }

    pub(super) fn answer_snapshot_query(&self, id: WorkerId) {
        if let Some(w) = self.pool.get(id) {
            w.send_aux(
                ToWorker::SnapshotInfo {
                    info: self.snapshot_info(),
                }
                .message(),
            );
        }
    }

    /// `%undo`: the worker is killed and its snapshot promoted; the `%undo` cell's reply
    /// says so.
    pub(super) fn undo(&mut self, id: WorkerId) {
        let ready = self
            .pool
            .main()
            .is_some_and(|w| w.id == id && w.snapshots.undo_target(self.undo_of()).is_some());
        if ready && self.snapshots_on {
            self.kill_worker(id, KillReason::Undo);
        } else {
            warn!(worker = id, "%undo without a snapshot; ignored");
        }
    }

    /// Memory: a snapshot over its budget is dropped; when the worker's tree and its
    /// snapshots together pass the memory limit, the snapshots go first (the older one
    /// first), so that the live worker is not killed for their sake, unless they hold
    /// little of their own (see [`SMALL_SNAPSHOT_DIVISOR`]). Says whether any was
    /// dropped.
    pub(super) fn check_snapshot_memory(&mut self, worker_bytes: u64) -> bool {
        let budget = self.cfg.snapshots.memory_budget;
        let limit = self.cfg.memory_limit;
        if budget.is_none() && limit.is_none() {
            // Nothing to check against: no need to read the snapshots' smaps every tick.
            return false;
        }
        let Some(w) = self.pool.main_mut() else {
            return false;
        };
        // Oldest first: the one kept only for `%undo` goes before the one a crash needs.
        let mut kept: Vec<(u32, u64)> = w
            .snapshots
            .ready()
            .filter_map(|s| Some((s.pid, crate::proctree::uss(s.pid)?)))
            .collect();
        kept.reverse();
        let total: u64 = kept.iter().map(|(_, uss)| uss).sum();
        let over_budget = kept
            .iter()
            .find(|(_, uss)| budget.is_some_and(|b| *uss > b));
        let (pid, why) = if let Some((pid, uss)) = over_budget {
            (
                *pid,
                format!(
                    "its private memory reached {} MiB, over the --snapshot-memory budget",
                    uss >> 20
                ),
            )
        } else if let (Some(l), Some((pid, _))) = (limit, kept.first()) {
            // Snapshots that hold little of their own (under 1/16 of the limit) stay: a
            // worker that grows toward the limit would otherwise lose its snapshot just
            // before it is killed for its own growth, when the snapshot matters most.
            if worker_bytes > l || worker_bytes + total <= l || total < l / SMALL_SNAPSHOT_DIVISOR {
                return false;
            }
            (
                *pid,
                format!(
                    "memory was tight: the worker ({} MiB) and its snapshots ({} MiB) together passed the memory limit",
                    worker_bytes >> 20,
                    total >> 20
                ),
            )
        } else {
            return false;
        };
        warn!(worker = w.id, pid, why, "snapshot dropped");
        w.snapshots.drop_pid(pid, why);
        true
    }
}
