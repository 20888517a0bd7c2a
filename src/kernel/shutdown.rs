//! Stopping the kernel, in order, each step bounded so that nothing wedged can keep the
//! supervisor from exiting (what did not finish is named in the log):
//!
//! 1. workers are asked to exit; those whose main thread runs a cell (they would finish
//!    it first) or still starting are killed; what they still send is handled as usual (output
//!    published, replies sent); those left after a grace are killed; all are reaped, and so
//!    are their snapshots; then the processes their cells started and left running in
//!    their process groups end, as ipykernel ends its own group's at shutdown;
//! 2. every request still waiting gets its reply;
//! 3. what is queued for IOPub is published (bounded), and its socket closed;
//! 4. the stop signal: the worker-socket acceptor, connection readers and writers and
//!    timers end, and the kernel waits for them.
//!
//! `run` then closes the client sockets, removes the worker socket's directory and
//! terminates the ZeroMQ context (which ends the heartbeat thread).

use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde_json::json;
use tracing::{debug, warn};

use super::*;
use crate::msg_type::MsgType;
use crate::pool::WorkerRole;

/// How long workers get to exit after the `shutdown` op before they are killed.
const WORKER_EXIT_GRACE: Duration = Duration::from_millis(300);

/// How long killed workers may take to be reaped (their waiter also gives their stderr
/// pipe up to 500 ms to close).
const REAP_WAIT: Duration = Duration::from_secs(1);

/// How long the snapshots of stopped workers may take to exit (they exit as soon as
/// their link closes) before they are killed.
const SNAPSHOT_EXIT_WAIT: Duration = Duration::from_millis(500);

/// How long a killed snapshot may take to be reaped.
const SNAPSHOT_KILL_WAIT: Duration = Duration::from_millis(200);

/// How long what the cells started may take to end after SIGTERM before SIGKILL.
const ORPHAN_TERM_WAIT: Duration = Duration::from_millis(300);

/// How long the template may take to answer `outlive` at a restart.
const OUTLIVE_WAIT: Duration = Duration::from_millis(300);

/// How long the tasks get to end after the stop signal.
const TASKS_WAIT: Duration = Duration::from_millis(500);

impl Kernel {
    /// Steps 1–4 above.
    pub(super) async fn shut_down(&mut self) {
        let started = Instant::now();
        self.stop_workers().await;
        debug!(elapsed = ?started.elapsed(), "shutdown: workers stopped");
        self.answer_unfinished().await;
        self.iopub.shutdown().await;
        debug!(elapsed = ?started.elapsed(), "shutdown: IOPub flushed");
        self.tasks.stop();
        let left = self.tasks.wait(TASKS_WAIT).await;
        if !left.is_empty() {
            warn!(tasks = ?left, "tasks still running at exit (left to end with the process)");
        }
        debug!(elapsed = ?started.elapsed(), "shutdown: tasks ended");
    }

    /// Asks every worker to exit (its exit hooks run: IPython's history, the user's
    /// `atexit`); kills at once those that cannot exit soon: a worker whose main thread runs
    /// a cell (a main-lane queue cell, a `# process` cell) would first finish it (an
    /// interrupt would make it format a traceback that nobody will read, hundreds of ms the
    /// first time), and one still starting cannot be asked yet. Workers whose cells run
    /// beside the main thread (`# task`, `# thread`, subshells) exit as idle ones do. Kills
    /// what is left after a grace; reaps all of them and their snapshots. The cells that
    /// did not finish are answered `aborted` (by `answer_unfinished`).
    async fn stop_workers(&mut self) {
        if self.restarting {
            self.hand_over_template().await;
        }
        let mut kill_now: Vec<WorkerId> = self
            .pool
            .all()
            .filter(|w| {
                matches!(
                    w.role,
                    WorkerRole::Starting { .. } | WorkerRole::Template { ready: false }
                )
            })
            .map(|w| w.id)
            .collect();
        let ids: Vec<WorkerId> = self.pool.all().map(|w| w.id).collect();
        // Each worker leads a process group of its own (worker.rs).
        let groups: Vec<u32> = self.pool.all().map(|w| w.pid()).collect();
        let mut snapshots: Vec<u32> = Vec::new();
        for id in ids {
            if let Some(w) = self.pool.get_mut(id) {
                snapshots.extend(w.snapshots.snapshot_pids());
            }
        }
        kill_now.extend(
            self.pending
                .values()
                .filter(|p| holds_main_thread(p))
                .map(|p| p.worker),
        );
        self.pool.shutdown_all();
        for id in kill_now {
            if let Some(w) = self.pool.get(id) {
                debug!(
                    worker = id,
                    "killing a worker that runs a cell or is starting"
                );
                w.signal(Signal::SIGKILL);
            }
        }
        if !self.until_workers_exit(WORKER_EXIT_GRACE).await {
            for w in self.pool.all() {
                debug!(worker = w.id, pid = w.pid(), "killing worker at exit");
                w.signal(Signal::SIGKILL);
            }
            if !self.until_workers_exit(REAP_WAIT).await {
                let left: Vec<u32> = self.pool.all().map(|w| w.pid()).collect();
                warn!(pids = ?left, "workers not reaped at exit");
            }
        }
        reap_snapshots(snapshots).await;
        end_orphans(&groups).await;
    }

    /// At a restart: asks the ready template to outlive us, for the next supervisor to take
    /// over ([`crate::handover`]), and lets it go once it says it will. A template that
    /// does not answer in time is stopped with the workers.
    async fn hand_over_template(&mut self) {
        let Some(template) = self
            .pool
            .template()
            .filter(|t| t.role == WorkerRole::Template { ready: true })
        else {
            return;
        };
        let id = template.id;
        let name = self.handover_name();
        // Every message on the template's link carries a descriptor; this one, none
        // that matters.
        let sent = std::fs::File::open("/dev/null").is_ok_and(|null| {
            let op = crate::ipc_ops::ToWorker::Outlive { name: &name }.message();
            self.pool
                .template_link()
                .is_some_and(|l| l.send(op, null.into()))
        });
        if !sent {
            return;
        }
        if !self
            .handle_events_until(OUTLIVE_WAIT, |k| k.template_outliving)
            .await
        {
            warn!(
                worker = id,
                "the template did not answer outlive in time: stopped"
            );
            return;
        }
        if let Some(template) = self.pool.remove(id) {
            template.proc.release();
            self.admission.forget(id);
            debug!(
                worker = id,
                pid = template.pid(),
                "template handed over to the next supervisor"
            );
        }
    }

    /// Handles worker events until every worker has exited (`true`) or `limit` passes.
    async fn until_workers_exit(&mut self, limit: Duration) -> bool {
        self.handle_events_until(limit, |k| k.pool.all().next().is_none())
            .await
    }

    /// Handles worker events until `done` holds (`true`) or `limit` passes.
    async fn handle_events_until(&mut self, limit: Duration, done: impl Fn(&Self) -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while !done(self) {
            match tokio::time::timeout_at(deadline, self.events_rx.recv()).await {
                Ok(Some(ev)) => self.on_worker_event(ev).await,
                Ok(None) | Err(_) => return false,
            }
        }
        true
    }

    /// Answers every request still waiting (running in a worker that is gone, queued, or
    /// waiting for a worker): execute requests `aborted`, as ipykernel answers the cells it
    /// will not run; others with a `KernelShutdown` error.
    async fn answer_unfinished(&mut self) {
        if !self.owed_to_heir.is_empty() {
            self.settle_owed(false).await;
        }
        // A cell sent ahead is pending too: answered `aborted` with the pending requests.
        let _ = self.lanes.take_ahead(&super::lanes::LaneId::Main);
        let mut pending: Vec<(u64, Pending)> = self.pending.drain().collect();
        pending.sort_unstable_by_key(|(id, _)| *id);
        for (_, p) in pending {
            debug!(
                msg_type = p.msg_type.as_str(),
                "answering a request at shutdown"
            );
            if p.exec.is_some() {
                self.reply_to(&p, ABORTED_METADATA, ABORTED, &[]).await;
            } else {
                let content = shutdown_error().to_string();
                self.reply_to(&p, ERROR_METADATA, content.as_bytes(), &[])
                    .await;
            }
        }
        let mut queued = self.lanes.reset_all();
        queued.extend(self.process_queue.drain(..));
        queued.extend(std::mem::take(&mut self.abort_after_owed));
        queued.sort_unstable_by_key(|q| q.seq);
        self.abort(queued).await;
        self.send_refusals().await;
        self.language_info
            .get_or_insert_with(|| kernel_info::language_info(""));
        for (channel, msg) in std::mem::take(&mut self.deferred_kernel_info) {
            self.kernel_info(channel, msg).await;
        }
        for (channel, msg) in std::mem::take(&mut self.waiting_for_worker) {
            if MsgType::parse(&msg.header.msg_type) == MsgType::ExecuteRequest {
                self.answer_with(channel, &msg, ABORTED_METADATA, ABORTED)
                    .await;
            } else {
                let content = shutdown_error().to_string();
                self.answer_with(channel, &msg, ERROR_METADATA, content.as_bytes())
                    .await;
            }
        }
    }
}

/// Whether a request is a cell that runs on its worker's main thread, which serves the
/// `shutdown` op only once the cell has finished.
fn holds_main_thread(p: &Pending) -> bool {
    p.exec
        .as_ref()
        .is_some_and(|e| p.borrowed || (e.holds_lane && e.lane == Some(super::lanes::LaneId::Main)))
}

const ABORTED_METADATA: &[u8] = br#"{"status":"aborted"}"#;
const ABORTED: &[u8] = br#"{"status":"aborted","execution_count":null}"#;
const ERROR_METADATA: &[u8] = br#"{"status":"error"}"#;

fn shutdown_error() -> Value {
    json!({
        "status": "error",
        "ename": "KernelShutdown",
        "evalue": "the kernel is shutting down",
        "traceback": [],
    })
}

/// Waits for the snapshots of stopped workers to exit (each exits once its link is
/// closed) and reaps them: a dead worker's snapshots are the supervisor's children (it is
/// their subreaper). One still running after [`SNAPSHOT_EXIT_WAIT`] is killed.
async fn reap_snapshots(mut pids: Vec<u32>) {
    if !reaped_within(&mut pids, SNAPSHOT_EXIT_WAIT).await {
        for &pid in &pids {
            // Still our unreaped child (just checked), so the pid cannot have been reused.
            warn!(pid, "a snapshot did not exit at shutdown: killed");
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), Signal::SIGKILL);
        }
        if !reaped_within(&mut pids, SNAPSHOT_KILL_WAIT).await {
            warn!(pids = ?pids, "killed snapshots not reaped at exit");
        }
    }
}

/// Ends what the workers' cells started and left running (`subprocess.Popen`, `!cmd &`),
/// as ipykernel ends its process group's children at shutdown. Orphaned by their worker,
/// they are the supervisor's children (a child subreaper), so their pids are safe to
/// signal until reaped. Those in a worker's process group get SIGTERM, then SIGKILL if
/// still running after [`ORPHAN_TERM_WAIT`]; those that left it (`setsid`, a daemon) are
/// left alone, as ipykernel leaves them.
async fn end_orphans(groups: &[u32]) {
    let mut orphans: Vec<u32> = crate::proctree::children(std::process::id())
        .into_iter()
        .filter(|&pid| {
            nix::unistd::getpgid(Some(Pid::from_raw(pid as i32)))
                .is_ok_and(|g| groups.contains(&(g.as_raw() as u32)))
        })
        .collect();
    if orphans.is_empty() {
        return;
    }
    debug!(pids = ?orphans, "ending what the cells left running");
    for sig in [Signal::SIGTERM, Signal::SIGKILL] {
        for &pid in &orphans {
            let _ = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig);
        }
        let wait = if sig == Signal::SIGTERM {
            ORPHAN_TERM_WAIT
        } else {
            SNAPSHOT_KILL_WAIT
        };
        if reaped_within(&mut orphans, wait).await {
            return;
        }
    }
    warn!(pids = ?orphans, "processes started by cells not reaped at exit");
}

/// Reaps the `pids` that exit within `limit` (never blocking); `true` once none is left.
async fn reaped_within(pids: &mut Vec<u32>, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_micros(500);
    loop {
        pids.retain(|&pid| still_ours(pid));
        if pids.is_empty() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(20));
    }
}

/// Reaps `pid` if it has exited; `true` while it is our child and still running. Once its
/// worker is reaped, a snapshot (or a process a cell started) is our child; one that is
/// not (`ECHILD`) was reaped already, by its worker or by us.
fn still_ours(pid: u32) -> bool {
    match waitpid(Pid::from_raw(pid as i32), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => true,
        Ok(status) => {
            debug!(pid, ?status, "reaped at shutdown");
            false
        }
        Err(_) => false,
    }
}
