//! What workers say: connections that passed the handshake, their messages (IOPub, replies,
//! stdin, snapshot reports), and their ends. Only registered workers are heard, and a
//! worker may answer only the requests it was given.

use nix::sys::signal::Signal;
use tracing::{debug, info, warn};

use super::*;
use crate::ipc_ops::{FromWorker, Hello, Link};
use crate::pool::{Placement, WorkerRole};
use crate::wire::Part;
use crate::worker::Frames;

/// How long a worker that closed its connection gets to exit before it is killed.
const EXIT_AFTER_DISCONNECT: Duration = Duration::from_secs(2);

impl Kernel {
    pub(super) async fn on_worker_event(&mut self, ev: WorkerEvent) {
        match ev {
            WorkerEvent::Connected { hello, pid, tx } => {
                self.worker_connected(hello, pid, tx).await
            }
            WorkerEvent::TemplateConnected { id, link } => {
                if self.pool.template_ready(id, link) {
                    info!(worker = id, "template ready");
                    self.spawn_failures = 0;
                    self.start_failure = None;
                    self.dispatch_process();
                    self.refill_pool();
                }
            }
            WorkerEvent::Message(id, link, frames, credit) => {
                self.worker_message(id, link, frames, credit).await
            }
            WorkerEvent::Disconnected(id, Link::Snapshot, seq) => {
                if let (Some(w), Some(seq)) = (self.pool.get_mut(id), seq) {
                    w.snapshots.gone(seq);
                }
            }
            WorkerEvent::Disconnected(id, link, _) => self.worker_disconnected(id, link).await,
            WorkerEvent::Exited {
                id,
                status,
                stderr_tail,
            } => {
                // Handle the death once everything it sent on `main` (its last output) is
                // through, so the crash error comes after it. A worker that never
                // connected `main` has nothing to drain.
                let Some(w) = self.pool.get_mut(id) else {
                    debug!(worker = id, "exit of a worker already handled");
                    return;
                };
                if w.has_main() && !w.drained {
                    w.exit = Some((status, stderr_tail, Instant::now()));
                } else {
                    self.worker_exited(id, status, stderr_tail).await;
                }
            }
        }
    }

    async fn worker_disconnected(&mut self, id: WorkerId, link: Link) {
        debug!(worker = id, ?link, "worker disconnected");
        let Some(w) = self.pool.get_mut(id) else {
            return;
        };
        if link == Link::Main {
            w.drained = true;
            if let Some((status, tail, _)) = w.exit.take() {
                self.worker_exited(id, status, tail).await;
                return;
            }
        }
        // It should exit on its own; make sure it does.
        let proc = w.proc.clone();
        self.tasks
            .spawn_until_stopped(format!("worker {id} kill timer"), async move {
                tokio::time::sleep(EXIT_AFTER_DISCONNECT).await;
                proc.signal(Signal::SIGKILL);
            });
    }

    async fn worker_connected(
        &mut self,
        hello: Hello,
        pid: u32,
        tx: mpsc::UnboundedSender<Frames>,
    ) {
        let id = hello.worker_id;
        if hello.role != Link::Snapshot {
            self.fork_connected(id, pid);
        }
        match hello.role {
            Link::Template => return,
            Link::Snapshot => {
                self.snapshot_connected(id, hello.seq.unwrap_or_default(), tx);
                return;
            }
            Link::Aux => {
                if let Some(w) = self.pool.get(id) {
                    // Output credit goes back on aux (flow.rs).
                    w.flows
                        .start_returns(&self.tasks, format!("worker {id} credit"), tx.clone());
                }
                if !self.pool.aux_connected(id, tx) {
                    warn!(
                        worker = id,
                        pid, "aux connection from a worker not starting; ignored"
                    );
                    return;
                }
                if let Some((hello, main)) = self.pool.get_mut(id).and_then(|w| w.early_main.take())
                {
                    self.main_connected(hello, pid, main).await;
                }
                return;
            }
            Link::Main => {}
        }
        if let Some(w) = self.pool.get_mut(id).filter(|w| w.awaiting_aux()) {
            debug!(
                worker = id,
                pid, "main hello before aux: placed once aux is there"
            );
            w.early_main = Some((hello, tx));
            return;
        }
        self.main_connected(hello, pid, tx).await;
    }

    /// A worker's `main` link said hello, its `aux` link too: it becomes the main worker
    /// or joins the idle pool.
    async fn main_connected(&mut self, hello: Hello, pid: u32, tx: mpsc::UnboundedSender<Frames>) {
        let id = hello.worker_id;
        let placement = self.pool.ready(id, tx);
        info!(worker = id, pid, ?placement, "worker ready");
        self.spawn_failures = 0;
        self.start_failure = None;
        match placement {
            Placement::Unknown => {
                warn!(
                    worker = id,
                    "main hello from a worker not starting; ignored"
                );
                return;
            }
            Placement::Main => self.main_ready().await,
            Placement::Idle | Placement::Retired => {}
        }
        // An idle worker takes a waiting `# process` cell; with none (this one became
        // the main worker), one is started for it now that no other is starting.
        self.dispatch_process();
        if !hello.language_info.is_null() {
            self.language_info = Some(hello.language_info);
        }
        if let Some(debugger) = hello.debugger {
            self.debug.available = debugger;
        }
        for (channel, msg) in std::mem::take(&mut self.deferred_kernel_info) {
            self.kernel_info(channel, msg).await;
        }
        self.refill_pool();
    }

    /// A (new) main worker is up: it continues the numbering, answers what a promotion
    /// owed, then gets what waited.
    pub(super) async fn main_ready(&mut self) {
        self.heir_deadline = None;
        let now = Instant::now();
        self.quiet_since = Some(now);
        self.busy_since = None;
        if let (Some(w), Some(n)) = (self.pool.main_mut(), self.last_count) {
            w.last_heard = now;
            w.execution_count = Some(n);
            w.send_main(
                crate::ipc_ops::ToWorker::SetCount {
                    execution_count: n + 1,
                }
                .message(),
            );
        }
        self.settle_owed(true).await;
        if self.debug_replay_started() {
            return; // cells wait until the debugger session is restored (debug.rs)
        }
        while let Some((channel, msg)) = self.waiting_for_worker.pop_front() {
            let t = crate::msg_type::MsgType::parse(&msg.header.msg_type);
            if channel == Channel::Shell && t == crate::msg_type::MsgType::ExecuteRequest {
                self.execute_request(msg).await;
            } else {
                self.forward(channel, msg, t).await;
            }
        }
        self.dispatch_execute();
    }

    async fn worker_message(
        &mut self,
        wid: WorkerId,
        link: Link,
        mut frames: Frames,
        credit: crate::flow::Credit,
    ) {
        // Owned, so that large frames are moved on to the client, not copied.
        let rest = frames.split_off(1.min(frames.len()));
        if link == Link::Template {
            // The template says why a fork failed, that it outlives us (a restart), and,
            // handed over to us, how the workers it reaps ended (also once it is let go at a
            // restart: the workers it forked for us end after that).
            match FromWorker::parse(&frames[0]) {
                Ok(FromWorker::ForkFailed { worker_id, reason }) => {
                    self.fork_failed(worker_id, &reason)
                }
                Ok(FromWorker::Outliving) => self.template_outliving = true,
                Ok(FromWorker::Exited { pid, status }) => match &self.handed_over {
                    Some((template, reports)) if *template == wid => reports.report(pid, status),
                    _ => debug!(
                        worker = wid,
                        pid, "an end reported by a template that reaps nothing"
                    ),
                },
                _ => debug!(worker = wid, "message from the template ignored"),
            }
            return;
        }
        let Some(w) = self.pool.get_mut(wid) else {
            return;
        };
        if link == Link::Snapshot {
            debug!(worker = wid, "message from a paused snapshot ignored");
            return;
        }
        w.last_heard = Instant::now();
        let op = match FromWorker::parse(&frames[0]) {
            Ok(op) => op,
            Err(e) => {
                warn!(worker = wid, error = %e, "bad control frame from worker; ignored");
                return;
            }
        };
        match op {
            FromWorker::Iopub { msg_type, flow } if rest.len() >= 3 && is_identifier(msg_type) => {
                if msg_type == "debug_event" {
                    self.debug.observe_event(&rest[2]);
                }
                let mut parts = rest.into_iter().map(Part::Shared);
                let json = [(); 3].map(|()| parts.next().expect("three JSON frames"));
                let msg = self.outbox.iopub_parts(msg_type, json, parts);
                let credit = match flow {
                    Some(flow) => w.flows.charge(flow, credit),
                    None => credit,
                };
                self.iopub.send_credited(msg, credit);
            }
            FromWorker::Reply { id, status, .. } if rest.len() >= 2 => {
                if self.debug_replayed(Some(id)).await {
                    return;
                }
                let Some(p) = self.take_pending(wid, id) else {
                    return;
                };
                let mut parts = rest.into_iter().map(Part::Shared);
                let json = [(); 2].map(|()| parts.next().expect("two JSON frames"));
                self.reply_to_parts((id, &p), json, parts).await;
                if p.borrowed {
                    // A fresh namespace before it goes back to the pool.
                    if let Some(w) = self.pool.borrowed(wid) {
                        w.send_main(crate::ipc_ops::ToWorker::Reset.message());
                    }
                } else if let Some(exec) = p.exec {
                    self.execute_done(id, exec, status == "error").await;
                }
            }
            // The `done` of an `input_reply` (sent as request 0, not pending: client.rs).
            FromWorker::Done { id: INPUT_REPLY_ID } => {}
            FromWorker::Done { id } => {
                let Some(p) = self.take_pending(wid, id) else {
                    return;
                };
                self.publish_status(&p.header, "idle");
                if let (Some(exec), false) = (p.exec, p.borrowed) {
                    self.execute_done(id, exec, false).await;
                }
            }
            FromWorker::Stdin { id, msg_type } if rest.len() >= 3 && is_identifier(msg_type) => {
                let Some(p) = self.pending.get_mut(&id).filter(|p| p.worker == wid) else {
                    warn!(
                        worker = wid,
                        id, "input_request for no request of this worker"
                    );
                    return;
                };
                p.awaiting_input = true;
                let msg =
                    self.outbox
                        .to_peer(&p.identities, msg_type, &rest[0], &rest[1], &rest[2], &[]);
                self.send(Channel::Stdin, msg).await;
            }
            FromWorker::Pong {} => {}
            FromWorker::ResetDone => {
                if let Some(placement) = self.pool.give_back(wid) {
                    debug!(worker = wid, ?placement, "borrowed worker returned");
                }
                self.dispatch_process();
            }
            FromWorker::SnapshotTaken { seq, pid, fork_ms } => {
                self.snapshot_taken(wid, seq, pid, fork_ms)
            }
            FromWorker::SnapshotRefused { seq, reason } => {
                self.snapshot_refused(wid, seq, reason.into_owned())
            }
            FromWorker::SnapshotPolicy { enabled } => self.set_snapshots(enabled),
            FromWorker::SnapshotQuery => self.answer_snapshot_query(wid),
            FromWorker::Undo => self.undo(wid),
            FromWorker::Held { id } => self.ahead_held(wid, id),
            other => {
                warn!(worker = wid, op = ?other, frames = 1 + rest.len(), "malformed worker message")
            }
        }
    }

    /// The pending request `id`, if worker `wid` was given it: nobody answers for another.
    fn take_pending(&mut self, wid: WorkerId, id: u64) -> Option<Pending> {
        match self.pending.get(&id) {
            Some(p) if p.worker == wid => self.pending.remove(&id),
            Some(p) => {
                warn!(
                    worker = wid,
                    id,
                    owner = p.worker,
                    "reply to another worker's request; refused"
                );
                None
            }
            None => {
                warn!(worker = wid, id, "reply to no pending request");
                None
            }
        }
    }

    /// Whether the main worker is an heir still coming up.
    pub(super) fn awaiting_heir(&self) -> bool {
        self.pool
            .all()
            .any(|w| w.role == WorkerRole::Starting { heir: true })
    }
}

use crate::ipc_ops::is_identifier;
