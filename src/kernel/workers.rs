//! The kernel's side of its workers: what they send, and what their deaths owe the clients.

use super::*;

impl Kernel {
    pub(super) async fn on_worker_event(&mut self, ev: WorkerEvent) {
        match ev {
            WorkerEvent::Connected { hello, tx } => self.worker_connected(hello, tx).await,
            WorkerEvent::Message(id, frames, credit) => {
                self.worker_message(id, frames, credit).await
            }
            WorkerEvent::Disconnected(id, role) => {
                debug!(worker = id, ?role, "worker disconnected");
                if role == worker::Role::Main {
                    match self.exits.remove(&id) {
                        Some((status, tail, _)) => self.worker_exited(id, status, tail).await,
                        None => {
                            self.drained.insert(id);
                        }
                    }
                }
                // It should exit on its own; make sure it does.
                if let Some((_, pid)) = self.pool.all_pids().into_iter().find(|(w, _)| *w == id) {
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        worker::signal(pid, libc::SIGKILL);
                    });
                }
            }
            WorkerEvent::Exited {
                id,
                status,
                stderr_tail,
            } => {
                // Handle the death once everything it sent on `main` (its last output) is
                // through, so the crash error comes after it. A worker that never
                // connected has nothing to drain.
                let connected = self.pool.main().is_some_and(|w| w.id == id);
                if connected && !self.drained.remove(&id) {
                    self.exits.insert(id, (status, stderr_tail, Instant::now()));
                } else {
                    self.drained.remove(&id);
                    self.worker_exited(id, status, stderr_tail).await;
                }
            }
        }
    }

    pub(super) async fn worker_connected(
        &mut self,
        hello: worker::Hello,
        tx: mpsc::UnboundedSender<Frames>,
    ) {
        let id = hello.worker_id;
        if hello.role == worker::Role::Aux {
            if !self.pool.aux_connected(id, tx) {
                warn!(
                    worker = id,
                    "aux connection from a worker we did not start; ignored"
                );
            }
            return;
        }
        let placement = self.pool.ready(id, tx);
        info!(worker = id, pid = hello.pid, ?placement, "worker ready");
        match placement {
            Placement::Unknown => {
                warn!(
                    worker = id,
                    "hello from a worker we did not start (or without aux)"
                );
                return;
            }
            Placement::Main => self.main_ready().await,
            Placement::Idle => self.dispatch_process(),
            Placement::Retired => {}
        }
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

    /// A (new) main worker is up: hand it what waited.
    pub(super) async fn main_ready(&mut self) {
        self.last_heard = Instant::now();
        if self.debug_replay_started() {
            return; // cells wait until the debugger session is restored (debug.rs)
        }
        while let Some(msg) = self.waiting_for_worker.pop_front() {
            self.forward(msg);
        }
        self.dispatch_execute();
    }

    pub(super) async fn worker_message(
        &mut self,
        wid: WorkerId,
        frames: Frames,
        credit: crate::flow::Credit,
    ) {
        if self.pool.main().is_some_and(|w| w.id == wid) {
            self.last_heard = Instant::now();
        }
        let ctrl: WorkerCtrl = match serde_json::from_slice(&frames[0]) {
            Ok(c) => c,
            Err(e) => {
                warn!(worker = wid, error = %e, "bad control frame from worker");
                return;
            }
        };
        let rest = &frames[1..];
        match (ctrl.op, ctrl.msg_type) {
            ("iopub", Some(msg_type)) if rest.len() >= 3 && is_identifier(msg_type) => {
                if msg_type == "debug_event" {
                    self.debug.observe_event(&rest[2]);
                }
                if msg_type == "execute_input" {
                    // Remembered for a crash reply: the spec wants the cell's count there.
                    if let Some(n) = execution_count(&rest[2]) {
                        self.execution_counts.insert(wid, n);
                    }
                }
                let msg = self
                    .outbox
                    .iopub(msg_type, &rest[0], &rest[1], &rest[2], &rest[3..]);
                self.iopub.send_credited(msg, credit);
            }
            ("reply", Some(msg_type)) if rest.len() >= 2 && is_identifier(msg_type) => {
                if self.debug_replayed(ctrl.id).await {
                    return;
                }
                let Some(p) = ctrl.id.and_then(|id| self.pending.remove(&id)) else {
                    warn!(worker = wid, id = ?ctrl.id, "reply to no pending request");
                    return;
                };
                let reply = self.outbox.to_peer(
                    &p.identities,
                    msg_type,
                    &p.header,
                    &rest[0],
                    &rest[1],
                    &rest[2..],
                );
                self.send(p.channel, reply).await;
                self.publish_status(&p.header, "idle");
                if p.borrowed {
                    // A fresh namespace before it goes back to the pool.
                    if let Some(w) = self.pool.borrowed(wid) {
                        w.send_main(vec![Bytes::from_static(br#"{"op":"reset"}"#)]);
                    }
                } else if let (Some(id), Some(exec)) = (ctrl.id, p.exec) {
                    self.execute_done(id, exec, ctrl.status == Some("error"))
                        .await;
                }
            }
            ("done", _) => {
                let Some(p) = ctrl.id.and_then(|id| self.pending.remove(&id)) else {
                    return;
                };
                self.publish_status(&p.header, "idle");
                if let (Some(id), Some(exec), false) = (ctrl.id, p.exec, p.borrowed) {
                    self.execute_done(id, exec, false).await;
                }
            }
            ("stdin", Some(msg_type)) if rest.len() >= 3 && is_identifier(msg_type) => {
                let Some(p) = ctrl.id.and_then(|id| self.pending.get(&id)) else {
                    warn!(worker = wid, "input_request for no pending request");
                    return;
                };
                let msg =
                    self.outbox
                        .to_peer(&p.identities, msg_type, &rest[0], &rest[1], &rest[2], &[]);
                self.send(Channel::Stdin, msg).await;
            }
            ("pong", _) => {}
            ("reset_done", _) => {
                if let Some(placement) = self.pool.give_back(wid) {
                    debug!(worker = wid, ?placement, "borrowed worker returned");
                }
                self.dispatch_process();
            }
            (op, msg_type) => {
                warn!(
                    worker = wid,
                    op,
                    ?msg_type,
                    frames = frames.len(),
                    "malformed worker message"
                )
            }
        }
    }

    /// An execute request of the main worker finished: free its lane, abort the lane's
    /// queue after an error if its plan says so, then run what may run now.
    pub(super) async fn execute_done(&mut self, id: u64, exec: Execution, failed: bool) {
        if let (true, Some(lane)) = (exec.holds_lane, &exec.lane) {
            if !self.lanes.finish(lane, id) {
                debug!(id, ?lane, "a cell of a deleted subshell finished");
            }
        }
        if failed && exec.abort_on_error {
            if let Some(lane) = &exec.lane {
                let queued = self.lanes.drain(lane);
                self.abort(queued).await;
            }
        }
        self.dispatch_execute();
    }

    /// Answers execute requests with `status: aborted`, as ipykernel does to the requests
    /// queued behind an error (with `stop_on_error`).
    pub(super) async fn abort(&mut self, queued: Vec<Queued>) {
        for Queued { msg, .. } in queued {
            debug!(msg_id = %msg.header.msg_id, "aborting queued execute");
            self.answer_with(
                Channel::Shell,
                &msg,
                "execute_reply",
                br#"{"status":"aborted"}"#,
                br#"{"status":"aborted","execution_count":null}"#,
            )
            .await;
        }
    }

    pub(super) async fn worker_exited(
        &mut self,
        id: WorkerId,
        status: ExitStatus,
        tail: Vec<String>,
    ) {
        let reason = self.kill_reasons.remove(&id);
        let count = self.execution_counts.remove(&id);
        let role = self.pool.remove(id);
        if self.exiting {
            return;
        }
        match role {
            Some(Role::Main) => {}
            Some(Role::Borrowed) => {
                let cause = reason.unwrap_or_else(|| describe_exit(status));
                warn!(
                    worker = id,
                    cause, "a borrowed worker died; the main namespace is intact"
                );
                self.answer_owed(id, count, &cause, &last_words(&tail), false)
                    .await;
                self.dispatch_process();
                self.refill_pool();
                return;
            }
            Some(Role::Retiring) => {
                debug!(worker = id, %status, "retired worker exited");
                return;
            }
            other => {
                warn!(worker = id, %status, role = ?other, "a spare worker exited: {}", last_words(&tail).join("\n"));
                self.dispatch_process();
                self.refill_pool();
                return;
            }
        }
        let cause = reason.unwrap_or_else(|| describe_exit(status));
        // An expected event the client is told about: not an error of the kernel's.
        warn!(worker = id, cause, "main worker died");
        self.answer_owed(id, count, &cause, &last_words(&tail), true)
            .await;
        // Its cells are answered; what queued behind them is aborted (subshells stay).
        let queued = self.lanes.reset_all();
        self.abort(queued).await;
        // A warm spare takes over at once; the pool refills behind it.
        if self.pool.promote_idle().is_some() {
            info!(worker = ?self.pool.main().map(|w| w.id), "a warm worker took over");
            self.main_ready().await;
        }
        self.refill_pool();
    }

    /// Answers everything a dead worker owed, oldest first (the running cell first).
    pub(super) async fn answer_owed(
        &mut self,
        id: WorkerId,
        count: Option<u64>,
        cause: &str,
        words: &[String],
        main: bool,
    ) {
        let mut owed: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.worker == id)
            .map(|(k, _)| *k)
            .collect();
        owed.sort_unstable();
        for k in owed {
            if let Some(p) = self.pending.remove(&k) {
                if p.msg_type == "debug_request" {
                    self.debug_crash_reply(k, &p, cause).await;
                    continue;
                }
                self.answer_crash(&p, count, cause, words, main).await;
            }
        }
    }

    pub(super) async fn answer_crash(
        &mut self,
        p: &Pending,
        count: Option<u64>,
        cause: &str,
        words: &[String],
        main: bool,
    ) {
        let evalue = if main {
            format!("the worker process died ({cause}); its namespace was lost")
        } else {
            format!("the `# process` worker died ({cause}); the main namespace is intact")
        };
        let mut traceback = vec![format!("\x1b[0;31mWorkerCrashed\x1b[0m: {evalue}")];
        traceback.extend(words.iter().cloned());
        if main {
            traceback.push(
                "The next cell runs in a fresh worker: re-run the cells it needs.".to_string(),
            );
        }
        let error = json!({"ename": "WorkerCrashed", "evalue": evalue, "traceback": traceback});
        if p.is_execute {
            let msg =
                self.outbox
                    .iopub("error", &p.header, b"{}", error.to_string().as_bytes(), &[]);
            self.iopub.send(msg);
        }
        let mut reply = error;
        reply["status"] = json!("error");
        if p.is_execute {
            reply["execution_count"] = json!(count);
        }
        let reply_type = match p.msg_type.strip_suffix("_request") {
            Some(prefix) => format!("{prefix}_reply"),
            // comm messages have no reply: just end their busy.
            None => {
                self.publish_status(&p.header, "idle");
                return;
            }
        };
        let frames = self.outbox.to_peer(
            &p.identities,
            &reply_type,
            &p.header,
            br#"{"status":"error"}"#,
            reply.to_string().as_bytes(),
            &[],
        );
        self.send(p.channel, frames).await;
        self.publish_status(&p.header, "idle");
    }
}
