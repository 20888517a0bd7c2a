//! The kernel: one task that owns the client sockets and the workers, and decides
//! everything about order — the sequential execute queue, busy/idle, replies.
//!
//! Client messages come in on the three ROUTERs; worker messages come in as
//! [`WorkerEvent`]s. Both are handled here, one at a time, so ordering needs no locks.
//! Nothing here waits on a worker: writes to workers go through per-worker channels.

use std::collections::{HashMap, VecDeque};
use std::process::ExitStatus;
use std::time::Duration;

use anyhow::Context as _;
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::connection::ConnectionInfo;
use crate::heartbeat;
use crate::iopub::Iopub;
use crate::kernel_info;
use crate::outbox::Outbox;
use crate::signer::Signer;
use crate::wire::{self, Incoming};
use crate::worker::{self, Frames, WorkerConfig, WorkerEvent, WorkerId};

/// Settings of a kernel run.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    /// Where to bind, and the key.
    pub connection: ConnectionInfo,
    /// The workers' Python.
    pub python: std::path::PathBuf,
    /// The workers' Python version, if known before the first worker is up
    /// (recorded by `kernelvisor install`), so `kernel_info` needs no worker.
    pub python_version: Option<String>,
}

/// Which client socket a message came on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Channel {
    Shell,
    Control,
    Stdin,
}

impl Channel {
    fn name(self) -> &'static str {
        match self {
            Channel::Shell => "shell",
            Channel::Control => "control",
            Channel::Stdin => "stdin",
        }
    }
}

/// Shell requests a worker answers (besides `execute_request`, which is queued).
const WORKER_REQUESTS: &[&str] = &[
    "complete_request",
    "inspect_request",
    "is_complete_request",
    "history_request",
    "comm_info_request",
    "comm_open",
    "comm_msg",
    "comm_close",
];

/// A request handed to a worker, waiting for its reply.
#[derive(Debug)]
struct Pending {
    channel: Channel,
    identities: Vec<Bytes>,
    header: Bytes,
    msg_type: String,
    worker: WorkerId,
    is_execute: bool,
}

/// The control frame of a worker message (see `worker_py/IPC.md`).
#[derive(Debug, Deserialize)]
struct WorkerCtrl<'a> {
    op: &'a str,
    #[serde(default)]
    id: Option<u64>,
    #[serde(default)]
    msg_type: Option<&'a str>,
    #[serde(default)]
    status: Option<&'a str>,
    #[serde(default)]
    stop_on_error: Option<bool>,
}

/// A worker that said hello.
#[derive(Debug)]
struct LiveWorker {
    id: WorkerId,
    pid: u32,
    tx: mpsc::UnboundedSender<Frames>,
}

/// How long workers get to exit after a `shutdown` before they are killed.
const WORKER_EXIT_GRACE: Duration = Duration::from_millis(300);

/// Runs the kernel until a shutdown request or SIGTERM.
pub async fn run(cfg: KernelConfig) -> anyhow::Result<()> {
    let conn = &cfg.connection;
    let ctx = zmq::Context::new();
    let outbox = std::sync::Arc::new(Outbox::new(
        Signer::new(conn.key.as_bytes()),
        &std::env::var("USER").unwrap_or_else(|_| "kernel".into()),
    ));
    let bind = |port: u16| {
        let ep = conn.endpoint(port);
        tmq::router(&ctx)
            .set_linger(1000)
            .bind(&ep)
            .with_context(|| format!("cannot bind {ep}"))
    };
    let shell = bind(conn.shell_port)?;
    let control = bind(conn.control_port)?;
    let stdin = bind(conn.stdin_port)?;
    heartbeat::start(&ctx, &conn.endpoint(conn.hb_port))?;
    let welcome_outbox = outbox.clone();
    let iopub = Iopub::start(
        &ctx,
        &conn.endpoint(conn.iopub_port),
        Box::new(move |sub| welcome_outbox.welcome(sub)),
    )?;

    // The workers' socket lives in a private (0700) directory, removed at exit.
    let ipc_dir = tempfile::Builder::new()
        .prefix("kernelvisor-")
        .tempdir()
        .context("cannot create the worker socket directory")?;
    let socket_path = ipc_dir.path().join("ipc.sock");
    let listener = tokio::net::UnixListener::bind(&socket_path)
        .with_context(|| format!("cannot listen on {}", socket_path.display()))?;
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    tokio::spawn(worker::accept_loop(listener, events_tx.clone()));

    let mut kernel = Kernel {
        worker_cfg: WorkerConfig {
            python: cfg.python.clone(),
            socket_path,
        },
        language_info: cfg
            .python_version
            .as_deref()
            .map(kernel_info::language_info),
        outbox,
        iopub,
        shell,
        control,
        stdin,
        events_tx,
        events_rx,
        started_at: chrono::Utc::now(),
        next_worker: 0,
        next_request: 0,
        main: None,
        starting: HashMap::new(),
        pending: HashMap::new(),
        execute_queue: VecDeque::new(),
        waiting_for_worker: VecDeque::new(),
        running: None,
        deferred_kernel_info: Vec::new(),
        exiting: false,
    };
    info!(
        transport = %conn.transport,
        ip = %conn.ip,
        shell = conn.shell_port,
        "kernelvisor {} ready",
        env!("CARGO_PKG_VERSION")
    );
    kernel.spawn_worker();
    kernel.serve().await;
    kernel.stop_workers().await;
    let Kernel {
        iopub,
        shell,
        control,
        stdin,
        ..
    } = kernel;
    iopub.shutdown();
    drop((shell, control, stdin));
    drop(ipc_dir);
    // Terminating the context flushes what is queued (bounded by linger) and stops the
    // heartbeat thread.
    let mut ctx = ctx;
    let _ = ctx.destroy();
    Ok(())
}

struct Kernel {
    worker_cfg: WorkerConfig,
    language_info: Option<Value>,
    outbox: std::sync::Arc<Outbox>,
    iopub: Iopub,
    shell: tmq::router::Router,
    control: tmq::router::Router,
    stdin: tmq::router::Router,
    events_tx: mpsc::UnboundedSender<WorkerEvent>,
    events_rx: mpsc::UnboundedReceiver<WorkerEvent>,
    started_at: chrono::DateTime<chrono::Utc>,
    next_worker: WorkerId,
    next_request: u64,
    /// The worker that runs cells (the namespace).
    main: Option<LiveWorker>,
    /// Spawned, not yet connected: id → pid.
    starting: HashMap<WorkerId, u32>,
    pending: HashMap<u64, Pending>,
    execute_queue: VecDeque<Incoming>,
    /// Non-execute requests that arrived while no worker was connected.
    waiting_for_worker: VecDeque<Incoming>,
    /// The request id of the execute running in the main worker.
    running: Option<u64>,
    /// `kernel_info` requests that arrived before the Python version was known.
    deferred_kernel_info: Vec<(Channel, Incoming)>,
    exiting: bool,
}

impl Kernel {
    async fn serve(&mut self) {
        let mut sigint = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut sigterm = signal(SignalKind::terminate()).expect("SIGTERM handler");
        while !self.exiting {
            tokio::select! {
                Some(m) = self.shell.next() => self.on_client(Channel::Shell, m).await,
                Some(m) = self.control.next() => self.on_client(Channel::Control, m).await,
                Some(m) = self.stdin.next() => self.on_client(Channel::Stdin, m).await,
                Some(ev) = self.events_rx.recv() => self.on_worker_event(ev).await,
                _ = sigint.recv() => self.interrupt("SIGINT"),
                _ = sigterm.recv() => {
                    info!("SIGTERM: shutting down");
                    self.exiting = true;
                }
            }
        }
    }

    // ---- client messages ----

    async fn on_client(&mut self, channel: Channel, frames: tmq::Result<tmq::Multipart>) {
        let frames = match frames {
            Ok(m) => m.into_iter().map(|f| Bytes::copy_from_slice(&f)).collect(),
            Err(e) => {
                warn!(channel = channel.name(), error = %e, "socket receive failed");
                return;
            }
        };
        let msg = match wire::parse(frames, self.outbox_signer()) {
            Ok(msg) => msg,
            Err(e) => {
                warn!(channel = channel.name(), error = %e, "refused a client message");
                return;
            }
        };
        debug!(channel = channel.name(), msg_type = %msg.header.msg_type, msg_id = %msg.header.msg_id, "received");
        match (channel, msg.header.msg_type.as_str()) {
            (Channel::Shell | Channel::Control, "kernel_info_request") => {
                self.kernel_info(channel, msg).await
            }
            (Channel::Shell | Channel::Control, "shutdown_request") => {
                self.shutdown_request(channel, msg).await
            }
            (Channel::Control, "interrupt_request") => {
                self.interrupt("interrupt_request");
                self.answer(channel, &msg, "interrupt_reply", br#"{"status":"ok"}"#)
                    .await;
            }
            (Channel::Shell, "execute_request") => {
                self.execute_queue.push_back(msg);
                self.dispatch_execute();
            }
            (Channel::Shell, t) if WORKER_REQUESTS.contains(&t) => self.forward(msg),
            (Channel::Stdin, "input_reply") => {
                if let Some(w) = &self.main {
                    let _ = w.tx.send(request_frames(0, Channel::Stdin, &msg));
                }
            }
            (_, t) => self.unknown(channel, t.to_string(), msg).await,
        }
    }

    fn outbox_signer(&self) -> &Signer {
        self.outbox.signer()
    }

    async fn kernel_info(&mut self, channel: Channel, msg: Incoming) {
        let Some(info) = &self.language_info else {
            // No version recorded at install: answer when the first worker says hello.
            self.deferred_kernel_info.push((channel, msg));
            return;
        };
        let content = kernel_info::reply_content(info);
        self.answer(channel, &msg, "kernel_info_reply", &content)
            .await;
    }

    async fn shutdown_request(&mut self, channel: Channel, msg: Incoming) {
        let content: Value = serde_json::from_slice(&msg.content).unwrap_or(Value::Null);
        let restart = content["restart"].as_bool().unwrap_or(false);
        if self.is_stale(&msg) {
            // A request older than this process was meant for the kernel we replaced
            // (jupyter_client can deliver it to a fast restart on the same ports).
            warn!(msg_id = %msg.header.msg_id, "ignored a shutdown_request sent before this kernel started");
            let reply = json!({"status": "error", "ename": "StaleShutdown",
                "evalue": "shutdown_request predates this kernel; ignored", "traceback": []});
            self.answer(
                channel,
                &msg,
                "shutdown_reply",
                reply.to_string().as_bytes(),
            )
            .await;
            return;
        }
        info!(restart, "shutdown requested");
        let reply = json!({"status": "ok", "restart": restart});
        self.answer(
            channel,
            &msg,
            "shutdown_reply",
            reply.to_string().as_bytes(),
        )
        .await;
        self.exiting = true;
    }

    /// Whether a shutdown request was created before this supervisor started. Only
    /// trusted in the first seconds, so a client whose clock lags ours can still stop us.
    fn is_stale(&self, msg: &Incoming) -> bool {
        let Some(date) = msg.header.date.as_deref() else {
            return false;
        };
        let Ok(date) = chrono::DateTime::parse_from_rfc3339(date) else {
            return false;
        };
        let age = chrono::Utc::now() - self.started_at;
        date < self.started_at && age < chrono::Duration::seconds(5)
    }

    async fn unknown(&mut self, channel: Channel, msg_type: String, msg: Incoming) {
        warn!(channel = channel.name(), %msg_type, "unknown message type");
        if let Some(prefix) = msg_type.strip_suffix("_request") {
            let reply = json!({"status": "error", "ename": "UnknownMessageType",
                "evalue": format!("kernelvisor does not handle {msg_type} on {}", channel.name()),
                "traceback": []});
            self.answer(
                channel,
                &msg,
                &format!("{prefix}_reply"),
                reply.to_string().as_bytes(),
            )
            .await;
        }
    }

    /// Sends a reply the supervisor made itself, wrapped in busy/idle.
    async fn answer(&mut self, channel: Channel, msg: &Incoming, reply_type: &str, content: &[u8]) {
        self.publish_status(&msg.header_bytes, "busy");
        let frames = self.outbox.to_peer(
            &msg.identities,
            reply_type,
            &msg.header_bytes,
            b"{}",
            content,
            &[],
        );
        self.send(channel, frames).await;
        self.publish_status(&msg.header_bytes, "idle");
    }

    async fn send(&mut self, channel: Channel, frames: Vec<Vec<u8>>) {
        let socket = match channel {
            Channel::Shell => &mut self.shell,
            Channel::Control => &mut self.control,
            Channel::Stdin => &mut self.stdin,
        };
        if let Err(e) = socket.send(tmq::Multipart::from(frames)).await {
            warn!(channel = channel.name(), error = %e, "send failed");
        }
    }

    fn publish_status(&self, parent: &[u8], state: &str) {
        self.iopub.send(self.outbox.status(parent, state));
    }

    fn interrupt(&self, why: &str) {
        match (&self.main, self.running) {
            (Some(w), Some(_)) => {
                info!(worker = w.id, why, "interrupting the running cell");
                signal_pid(w.pid, libc::SIGINT);
            }
            _ => debug!(why, "interrupt while idle: nothing to do"),
        }
    }

    // ---- requests handed to workers ----

    fn register(&mut self, channel: Channel, msg: &Incoming, worker: WorkerId) -> u64 {
        self.next_request += 1;
        let id = self.next_request;
        self.pending.insert(
            id,
            Pending {
                channel,
                identities: msg.identities.clone(),
                header: msg.header_bytes.clone(),
                msg_type: msg.header.msg_type.clone(),
                worker,
                is_execute: msg.header.msg_type == "execute_request",
            },
        );
        id
    }

    fn dispatch_execute(&mut self) {
        if self.running.is_some() {
            return;
        }
        let Some(wid) = self.main.as_ref().map(|w| w.id) else {
            return;
        };
        let Some(msg) = self.execute_queue.pop_front() else {
            return;
        };
        let id = self.register(Channel::Shell, &msg, wid);
        self.publish_status(&msg.header_bytes, "busy");
        self.running = Some(id);
        self.to_main(request_frames(id, Channel::Shell, &msg));
    }

    fn forward(&mut self, msg: Incoming) {
        let Some(wid) = self.main.as_ref().map(|w| w.id) else {
            self.waiting_for_worker.push_back(msg);
            return;
        };
        let id = self.register(Channel::Shell, &msg, wid);
        self.publish_status(&msg.header_bytes, "busy");
        self.to_main(request_frames(id, Channel::Shell, &msg));
    }

    fn to_main(&self, frames: Frames) {
        if let Some(w) = &self.main {
            // A closed channel means the worker is gone; its exit event cleans up.
            let _ = w.tx.send(frames);
        }
    }

    // ---- worker events ----

    async fn on_worker_event(&mut self, ev: WorkerEvent) {
        match ev {
            WorkerEvent::Ready { hello, tx } => self.worker_ready(hello, tx).await,
            WorkerEvent::Message(id, frames) => self.worker_message(id, frames).await,
            WorkerEvent::Disconnected(id) => {
                debug!(worker = id, "worker disconnected");
                if self.main.as_ref().is_some_and(|w| w.id == id) {
                    let pid = self.main.as_ref().map(|w| w.pid).unwrap_or_default();
                    // It should exit on its own; make sure it does.
                    tokio::spawn(async move {
                        tokio::time::sleep(Duration::from_secs(2)).await;
                        signal_pid(pid, libc::SIGKILL);
                    });
                }
            }
            WorkerEvent::Exited {
                id,
                status,
                stderr_tail,
            } => self.worker_exited(id, status, stderr_tail).await,
        }
    }

    async fn worker_ready(&mut self, hello: worker::Hello, tx: mpsc::UnboundedSender<Frames>) {
        let Some(pid) = self.starting.remove(&hello.worker_id) else {
            warn!(
                worker = hello.worker_id,
                "hello from a worker we did not start; ignored"
            );
            return;
        };
        if pid != hello.pid {
            warn!(
                worker = hello.worker_id,
                pid,
                claimed = hello.pid,
                "worker pid mismatch"
            );
        }
        info!(worker = hello.worker_id, pid, "worker ready");
        self.language_info = Some(hello.language_info.clone());
        self.main = Some(LiveWorker {
            id: hello.worker_id,
            pid,
            tx,
        });
        for (channel, msg) in std::mem::take(&mut self.deferred_kernel_info) {
            self.kernel_info(channel, msg).await;
        }
        while let Some(msg) = self.waiting_for_worker.pop_front() {
            self.forward(msg);
        }
        self.dispatch_execute();
    }

    async fn worker_message(&mut self, wid: WorkerId, frames: Frames) {
        let ctrl: WorkerCtrl = match serde_json::from_slice(&frames[0]) {
            Ok(c) => c,
            Err(e) => {
                warn!(worker = wid, error = %e, "bad control frame from worker");
                return;
            }
        };
        let rest = &frames[1..];
        debug!(op = ctrl.op, msg_type = ?ctrl.msg_type, "from worker");
        match (ctrl.op, ctrl.msg_type) {
            ("iopub", Some(msg_type)) if rest.len() >= 3 && is_identifier(msg_type) => {
                let msg = self
                    .outbox
                    .iopub(msg_type, &rest[0], &rest[1], &rest[2], &rest[3..]);
                self.iopub.send(msg);
            }
            ("reply", Some(msg_type)) if rest.len() >= 2 && is_identifier(msg_type) => {
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
                if p.is_execute {
                    let failed = ctrl.status == Some("error");
                    self.execute_done(failed && ctrl.stop_on_error.unwrap_or(true))
                        .await;
                }
            }
            ("done", _) => {
                let Some(p) = ctrl.id.and_then(|id| self.pending.remove(&id)) else {
                    return;
                };
                self.publish_status(&p.header, "idle");
                if p.is_execute {
                    self.execute_done(false).await;
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

    /// The running execute finished; abort the queue after an error if asked, then run
    /// the next one.
    async fn execute_done(&mut self, abort_queue: bool) {
        self.running = None;
        if abort_queue {
            self.abort_queue().await;
        }
        self.dispatch_execute();
    }

    /// Answers every queued execute request with `status: aborted`, as ipykernel does
    /// after an error with `stop_on_error`.
    async fn abort_queue(&mut self) {
        let queued: Vec<Incoming> = self.execute_queue.drain(..).collect();
        for msg in queued {
            debug!(msg_id = %msg.header.msg_id, "aborting queued execute");
            let frames = self.outbox.to_peer(
                &msg.identities,
                "execute_reply",
                &msg.header_bytes,
                br#"{"status":"aborted"}"#,
                br#"{"status":"aborted","execution_count":null}"#,
                &[],
            );
            self.publish_status(&msg.header_bytes, "busy");
            self.send(Channel::Shell, frames).await;
            self.publish_status(&msg.header_bytes, "idle");
        }
    }

    async fn worker_exited(&mut self, id: WorkerId, status: ExitStatus, tail: Vec<String>) {
        self.starting.remove(&id);
        let was_main = self.main.as_ref().is_some_and(|w| w.id == id);
        if !was_main {
            if !self.exiting {
                warn!(worker = id, %status, "a starting worker exited: {}", tail.join("\n"));
            }
            return;
        }
        self.main = None;
        if self.exiting {
            return;
        }
        let cause = describe_exit(status);
        error!(worker = id, cause, "worker died");
        // Answer everything that worker owed, the running cell first.
        let owed: Vec<u64> = self
            .pending
            .iter()
            .filter(|(_, p)| p.worker == id)
            .map(|(k, _)| *k)
            .collect();
        let mut owed: Vec<(u64, Pending)> = owed
            .into_iter()
            .filter_map(|k| self.pending.remove(&k).map(|p| (k, p)))
            .collect();
        owed.sort_by_key(|(k, _)| *k);
        for (_, p) in owed {
            self.answer_crash(&p, &cause, &tail).await;
        }
        if self.running.take().is_some() {
            self.abort_queue().await;
        }
        self.spawn_worker();
    }

    async fn answer_crash(&mut self, p: &Pending, cause: &str, tail: &[String]) {
        let evalue = format!("the worker process died ({cause}); its namespace was lost");
        let mut traceback = vec![format!("\x1b[0;31mWorkerCrashed\x1b[0m: {evalue}")];
        traceback.extend(tail.iter().cloned());
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
            reply["execution_count"] = Value::Null;
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

    // ---- worker lifecycle ----

    fn spawn_worker(&mut self) {
        self.next_worker += 1;
        let id = self.next_worker;
        match worker::spawn(&self.worker_cfg, id, self.events_tx.clone()) {
            Ok(pid) => {
                self.starting.insert(id, pid);
            }
            Err(e) => error!(
                python = %self.worker_cfg.python.display(),
                error = %e,
                "cannot start a worker"
            ),
        }
    }

    /// Asks every worker to exit, waits briefly, then kills what is left.
    async fn stop_workers(&mut self) {
        let mut alive: HashMap<WorkerId, u32> = self.starting.drain().collect();
        if let Some(w) = self.main.take() {
            let _ = w.tx.send(vec![Bytes::from_static(br#"{"op":"shutdown"}"#)]);
            alive.insert(w.id, w.pid);
        }
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
            signal_pid(pid, libc::SIGKILL);
        }
    }
}

/// The frames of a `request` to a worker.
fn request_frames(id: u64, channel: Channel, msg: &Incoming) -> Frames {
    let ctrl = json!({"op": "request", "id": id, "channel": channel.name(),
        "msg_type": msg.header.msg_type});
    let mut frames = Vec::with_capacity(5 + msg.buffers.len());
    frames.push(Bytes::from(ctrl.to_string()));
    frames.push(msg.header_bytes.clone());
    frames.push(msg.parent_header.clone());
    frames.push(msg.metadata.clone());
    frames.push(msg.content.clone());
    frames.extend(msg.buffers.iter().cloned());
    frames
}

/// Message types from workers go into headers unescaped: only accept identifiers.
fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

fn signal_pid(pid: u32, sig: libc::c_int) {
    if pid > 0 {
        // SAFETY: plain syscall; a stale pid at worst gets a signal meant for a dead child.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

/// Says how a worker ended: "killed by SIGSEGV (signal 11)", "exit code 3".
pub fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        let name = match sig {
            libc::SIGSEGV => "SIGSEGV",
            libc::SIGABRT => "SIGABRT",
            libc::SIGKILL => "SIGKILL",
            libc::SIGBUS => "SIGBUS",
            libc::SIGFPE => "SIGFPE",
            libc::SIGILL => "SIGILL",
            libc::SIGTERM => "SIGTERM",
            libc::SIGINT => "SIGINT",
            _ => "signal",
        };
        format!("killed by {name} (signal {sig})")
    } else {
        format!("exit code {}", status.code().unwrap_or(-1))
    }
}
