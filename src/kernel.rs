//! The kernel: one task that owns the client sockets and the workers, and decides
//! everything about order — the sequential execute queue, busy/idle, replies.
//!
//! Client messages come in on the three ROUTERs; worker messages come in as
//! [`WorkerEvent`]s. Both are handled here, one at a time, so ordering needs no locks.
//! Nothing here waits on a worker: writes to workers go through per-worker channels.

use std::collections::{HashMap, VecDeque};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

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
use crate::pool::{Placement, Pool, PoolPolicy, Role};
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
    /// The worker pool's idle policy.
    pub pool: PoolPolicy,
    /// Resident memory a worker may use before it is killed ("out of memory").
    pub memory_limit: Option<u64>,
    /// A busy worker that has not been heard from (not even a `pong` on `aux`) for this
    /// long is killed as unresponsive (a deadlock in C code holding the GIL).
    pub unresponsive_timeout: Option<Duration>,
    /// After an interrupt, a cell still running after this long gets its worker killed.
    /// (A second interrupt of the same cell always does.)
    pub interrupt_grace: Option<Duration>,
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

/// Shell requests a worker answers on its `aux` connection, even while a cell runs.
const AUX_REQUESTS: &[&str] = &[
    "complete_request",
    "inspect_request",
    "is_complete_request",
    "history_request",
    "comm_info_request",
];

/// Shell messages for the worker's event loop (`main` connection), in order with cells.
const MAIN_MESSAGES: &[&str] = &["comm_open", "comm_msg", "comm_close"];

/// A request handed to a worker, waiting for its reply.
#[derive(Debug)]
struct Pending {
    channel: Channel,
    identities: Vec<Bytes>,
    header: Bytes,
    msg_type: String,
    worker: WorkerId,
    is_execute: bool,
    /// Runs in a worker lent from the pool (a `# process` cell), not in the main one.
    borrowed: bool,
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

/// The execute request running in the main worker.
#[derive(Debug)]
struct Running {
    id: u64,
    worker: WorkerId,
    /// Interrupts sent to it so far, and when the first one was.
    interrupts: u32,
    first_interrupt: Option<Instant>,
}

/// How long workers get to exit after a `shutdown` before they are killed.
const WORKER_EXIT_GRACE: Duration = Duration::from_millis(300);

/// How often the watchdog checks memory, liveness, grace periods and the idle pool.
const TICK: Duration = Duration::from_millis(100);

/// Largest content + buffers of a client message handed to a worker: the IPC frame limit
/// (1 GiB) less room for the headers.
const MAX_REQUEST_BYTES: usize = crate::ipc::MAX_BODY - (1 << 20);

/// How long a dead worker's exit waits for its `main` connection to be drained.
const DRAIN_WAIT: Duration = Duration::from_millis(500);

/// How often a busy worker is pinged when an unresponsive timeout is set.
const PING_EVERY: Duration = Duration::from_secs(1);

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
        pool: Pool::new(cfg.pool),
        cfg,
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
        pending: HashMap::new(),
        execute_queue: VecDeque::new(),
        process_queue: VecDeque::new(),
        waiting_for_worker: VecDeque::new(),
        running: None,
        deferred_kernel_info: Vec::new(),
        kill_reasons: HashMap::new(),
        execution_counts: HashMap::new(),
        drained: Default::default(),
        exits: HashMap::new(),
        last_heard: Instant::now(),
        last_ping: Instant::now(),
        ping_seq: 0,
        exiting: false,
    };
    info!(
        transport = %kernel.cfg.connection.transport,
        ip = %kernel.cfg.connection.ip,
        shell = kernel.cfg.connection.shell_port,
        "kernelvisor {} ready",
        env!("CARGO_PKG_VERSION")
    );
    // Only the main worker at first: spares start once it is ready, so they do not
    // compete with it for the CPU during start-up.
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
    cfg: KernelConfig,
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
    pool: Pool,
    pending: HashMap<u64, Pending>,
    execute_queue: VecDeque<Incoming>,
    /// `# process` cells waiting for a worker to borrow.
    process_queue: VecDeque<Incoming>,
    /// Shell requests that arrived while no worker was connected.
    waiting_for_worker: VecDeque<Incoming>,
    running: Option<Running>,
    /// `kernel_info` requests that arrived before the Python version was known.
    deferred_kernel_info: Vec<(Channel, Incoming)>,
    /// The execution count each worker announced last (`execute_input`).
    execution_counts: HashMap<WorkerId, u64>,
    /// Why we killed a worker, for its crash report.
    kill_reasons: HashMap<WorkerId, String>,
    /// Workers whose `main` connection has ended (all its messages handled).
    drained: std::collections::HashSet<WorkerId>,
    /// Exits waiting for their `main` connection to drain (bounded by `DRAIN_WAIT`).
    exits: HashMap<WorkerId, (ExitStatus, Vec<String>, Instant)>,
    /// When the main worker last sent anything (liveness).
    last_heard: Instant,
    last_ping: Instant,
    ping_seq: u64,
    exiting: bool,
}

impl Kernel {
    async fn serve(&mut self) {
        let mut sigint = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let mut sigterm = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !self.exiting {
            tokio::select! {
                Some(m) = self.shell.next() => self.on_client(Channel::Shell, m).await,
                Some(m) = self.control.next() => self.on_client(Channel::Control, m).await,
                Some(m) = self.stdin.next() => self.on_client(Channel::Stdin, m).await,
                Some(ev) = self.events_rx.recv() => self.on_worker_event(ev).await,
                _ = tick.tick() => self.watchdog().await,
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
        let msg = match wire::parse(frames, self.outbox.signer()) {
            Ok(msg) => msg,
            Err(e) => {
                warn!(channel = channel.name(), error = %e, "refused a client message");
                return;
            }
        };
        debug!(channel = channel.name(), msg_type = %msg.header.msg_type, msg_id = %msg.header.msg_id, "received");
        let size = msg.content.len() + msg.buffers.iter().map(Bytes::len).sum::<usize>();
        if size > MAX_REQUEST_BYTES {
            self.too_large(channel, msg, size).await;
            return;
        }
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
            (Channel::Control, "kernelvisor_info_request") => {
                let content = json!({"status": "ok", "pool": self.pool.describe(Instant::now())});
                self.answer(
                    channel,
                    &msg,
                    "kernelvisor_info_reply",
                    content.to_string().as_bytes(),
                )
                .await;
            }
            (Channel::Shell, "execute_request") if run_mode(&msg.content) == RunMode::Process => {
                self.process_queue.push_back(msg);
                self.dispatch_process();
            }
            (Channel::Shell, "execute_request") => {
                self.execute_queue.push_back(msg);
                self.dispatch_execute();
            }
            (Channel::Shell, t) if AUX_REQUESTS.contains(&t) || MAIN_MESSAGES.contains(&t) => {
                self.forward(msg)
            }
            (Channel::Stdin, "input_reply") => {
                if let Some(w) = self.pool.main() {
                    w.send_aux(request_frames(0, Channel::Stdin, &msg));
                }
            }
            (_, t) => self.unknown(channel, t.to_string(), msg).await,
        }
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
            let evalue = "shutdown_request predates this kernel; ignored".to_string();
            self.refuse(channel, &msg, "StaleShutdown", evalue).await;
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

    /// Refuses a message too large to hand to a worker (the IPC carries at most 1 GiB).
    async fn too_large(&mut self, channel: Channel, msg: Incoming, size: usize) {
        warn!(channel = channel.name(), msg_type = %msg.header.msg_type, size, "refused an oversized message");
        let evalue = format!(
            "{} of {} MiB exceeds the {} MiB limit",
            msg.header.msg_type,
            size >> 20,
            MAX_REQUEST_BYTES >> 20
        );
        self.refuse(channel, &msg, "MessageTooLarge", evalue).await;
    }

    async fn unknown(&mut self, channel: Channel, msg_type: String, msg: Incoming) {
        warn!(channel = channel.name(), %msg_type, "unknown message type");
        let evalue = format!(
            "kernelvisor does not handle {msg_type} on {}",
            channel.name()
        );
        self.refuse(channel, &msg, "UnknownMessageType", evalue)
            .await;
    }

    /// Answers a request (`<x>_request`) with an error `<x>_reply`; other messages have no
    /// reply, so the log line is all they get.
    async fn refuse(&mut self, channel: Channel, msg: &Incoming, ename: &str, evalue: String) {
        let Some(prefix) = msg.header.msg_type.strip_suffix("_request") else {
            return;
        };
        let reply_type = format!("{prefix}_reply");
        let reply = json!({"status": "error", "ename": ename, "evalue": evalue, "traceback": []});
        self.answer(channel, msg, &reply_type, reply.to_string().as_bytes())
            .await;
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

    /// Interrupts the running cell: SIGINT to its worker the first time; the second time
    /// (the cell ignored it, or sits in C code), the worker is killed and replaced.
    fn interrupt(&mut self, why: &str) {
        // `# process` cells are interrupted too (once per interrupt; no escalation: a stuck
        // one costs only its own worker, which the user can kill by restarting).
        let lent: Vec<u32> = self
            .pending
            .values()
            .filter(|p| p.borrowed && p.is_execute)
            .filter_map(|p| self.pool.borrowed(p.worker).map(|w| w.pid))
            .collect();
        for pid in lent {
            signal_pid(pid, libc::SIGINT);
        }
        let Some(running) = self.running.as_mut() else {
            debug!(why, "no cell running in the main worker");
            return;
        };
        let Some(pid) = self
            .pool
            .main()
            .filter(|w| w.id == running.worker)
            .map(|w| w.pid)
        else {
            return;
        };
        running.interrupts += 1;
        if running.interrupts == 1 {
            info!(
                worker = running.worker,
                why, "interrupting the running cell"
            );
            running.first_interrupt = Some(Instant::now());
            signal_pid(pid, libc::SIGINT);
        } else {
            let worker = running.worker;
            self.kill_worker(
                worker,
                pid,
                "killed: the cell did not stop when interrupted (it ignored SIGINT or is stuck in C code), so it was interrupted again".into(),
            );
        }
    }

    fn kill_worker(&mut self, id: WorkerId, pid: u32, reason: String) {
        warn!(worker = id, pid, reason, "killing worker");
        self.kill_reasons.insert(id, reason);
        signal_pid(pid, libc::SIGKILL);
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
                borrowed: self.pool.borrowed(worker).is_some(),
            },
        );
        id
    }

    fn dispatch_execute(&mut self) {
        if self.running.is_some() {
            return;
        }
        let Some(wid) = self.pool.main().map(|w| w.id) else {
            return;
        };
        let Some(msg) = self.execute_queue.pop_front() else {
            return;
        };
        let id = self.register(Channel::Shell, &msg, wid);
        self.publish_status(&msg.header_bytes, "busy");
        self.running = Some(Running {
            id,
            worker: wid,
            interrupts: 0,
            first_interrupt: None,
        });
        self.last_heard = Instant::now();
        if let Some(w) = self.pool.main() {
            w.send_main(request_frames(id, Channel::Shell, &msg));
        }
    }

    /// Runs waiting `# process` cells, each in a worker borrowed from the idle pool; starts
    /// a worker when none is idle (and none is on its way).
    fn dispatch_process(&mut self) {
        while !self.process_queue.is_empty() {
            let Some(wid) = self.pool.borrow().map(|w| w.id) else {
                if !self.pool.any_starting() {
                    self.spawn_worker();
                }
                return;
            };
            let msg = self.process_queue.pop_front().expect("not empty");
            let id = self.register(Channel::Shell, &msg, wid);
            info!(
                worker = wid,
                "running a `# process` cell in a borrowed worker"
            );
            self.publish_status(&msg.header_bytes, "busy");
            if let Some(w) = self.pool.borrowed(wid) {
                w.send_main(request_frames(id, Channel::Shell, &msg));
            }
        }
    }

    fn forward(&mut self, msg: Incoming) {
        let Some(wid) = self.pool.main().map(|w| w.id) else {
            self.waiting_for_worker.push_back(msg);
            return;
        };
        let id = self.register(Channel::Shell, &msg, wid);
        self.publish_status(&msg.header_bytes, "busy");
        let frames = request_frames(id, Channel::Shell, &msg);
        if let Some(w) = self.pool.main() {
            if MAIN_MESSAGES.contains(&msg.header.msg_type.as_str()) {
                w.send_main(frames);
            } else {
                w.send_aux(frames);
            }
        }
    }

    // ---- worker events ----

    async fn on_worker_event(&mut self, ev: WorkerEvent) {
        match ev {
            WorkerEvent::Connected { hello, tx } => self.worker_connected(hello, tx).await,
            WorkerEvent::Message(id, frames) => self.worker_message(id, frames).await,
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
                        signal_pid(pid, libc::SIGKILL);
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

    async fn worker_connected(&mut self, hello: worker::Hello, tx: mpsc::UnboundedSender<Frames>) {
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
        for (channel, msg) in std::mem::take(&mut self.deferred_kernel_info) {
            self.kernel_info(channel, msg).await;
        }
        self.refill_pool();
    }

    /// A (new) main worker is up: hand it what waited.
    async fn main_ready(&mut self) {
        self.last_heard = Instant::now();
        while let Some(msg) = self.waiting_for_worker.pop_front() {
            self.forward(msg);
        }
        self.dispatch_execute();
    }

    async fn worker_message(&mut self, wid: WorkerId, frames: Frames) {
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
                if msg_type == "execute_input" {
                    // Remembered for a crash reply: the spec wants the cell's count there.
                    if let Some(n) = execution_count(&rest[2]) {
                        self.execution_counts.insert(wid, n);
                    }
                }
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
                if p.borrowed {
                    // A fresh namespace before it goes back to the pool.
                    if let Some(w) = self.pool.borrowed(wid) {
                        w.send_main(vec![Bytes::from_static(br#"{"op":"reset"}"#)]);
                    }
                } else if p.is_execute {
                    let failed = ctrl.status == Some("error");
                    self.execute_done(ctrl.id, failed && ctrl.stop_on_error.unwrap_or(true))
                        .await;
                }
            }
            ("done", _) => {
                let Some(p) = ctrl.id.and_then(|id| self.pending.remove(&id)) else {
                    return;
                };
                self.publish_status(&p.header, "idle");
                if p.is_execute {
                    self.execute_done(ctrl.id, false).await;
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

    /// The running execute finished; abort the queue after an error if asked, then run
    /// the next one.
    async fn execute_done(&mut self, id: Option<u64>, abort_queue: bool) {
        if self.running.as_ref().map(|r| r.id) != id {
            warn!(?id, "execute finished that was not the running one");
            return;
        }
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
                error!(
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
        error!(worker = id, cause, "main worker died");
        self.answer_owed(id, count, &cause, &last_words(&tail), true)
            .await;
        if self.running.take().is_some() {
            self.abort_queue().await;
        }
        // A warm spare takes over at once; the pool refills behind it.
        if self.pool.promote_idle().is_some() {
            info!(worker = ?self.pool.main().map(|w| w.id), "a warm worker took over");
            self.main_ready().await;
        }
        self.refill_pool();
    }

    /// Answers everything a dead worker owed, oldest first (the running cell first).
    async fn answer_owed(
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
                self.answer_crash(&p, count, cause, words, main).await;
            }
        }
    }

    async fn answer_crash(
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

    // ---- the watchdog ----

    /// Runs every `TICK`: overdue exits, memory limit, liveness, interrupt grace, idle
    /// reaping.
    async fn watchdog(&mut self) {
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

    // ---- worker lifecycle ----

    /// Starts workers until the pool has its main worker and warm spares. A missing main
    /// worker starts at once; spares only while no cell runs or waits, so that warming
    /// them (a Python start-up each) never competes with a cell for the CPU. The watchdog
    /// tick calls this too, so spares follow within a tick of the kernel going quiet.
    fn refill_pool(&mut self) {
        let missing = self.pool.missing();
        let quiet = self.running.is_none() && self.execute_queue.is_empty();
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

    fn spawn_worker(&mut self) {
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
    async fn stop_workers(&mut self) {
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
            signal_pid(pid, libc::SIGKILL);
        }
    }
}

/// The part of a dead worker's stderr worth showing: from the last fatal-error report
/// (faulthandler's "Fatal Python error" and the stacks after it) if there is one, else
/// the last few lines.
fn last_words(tail: &[String]) -> Vec<String> {
    let start = tail
        .iter()
        .rposition(|l| l.starts_with("Fatal Python error"))
        .unwrap_or(tail.len().saturating_sub(20));
    tail[start..].to_vec()
}

/// Where an execute request runs, from its code's first line (async-kernel's run-mode
/// comments: `# queue` (default), `# task`, `# thread …`, and kernelvisor's `# process`;
/// `##process` too). Only `process` changes anything in the supervisor so far.
#[derive(Debug, PartialEq, Eq)]
enum RunMode {
    Queue,
    Process,
}

fn run_mode(content: &[u8]) -> RunMode {
    #[derive(Deserialize)]
    struct Code<'a> {
        #[serde(borrow)]
        code: std::borrow::Cow<'a, str>,
    }
    let Ok(Code { code }) = serde_json::from_slice::<Code>(content) else {
        return RunMode::Queue;
    };
    let first = code.lines().next().unwrap_or("").trim();
    let Some(comment) = first.strip_prefix('#') else {
        return RunMode::Queue;
    };
    match comment.trim_start_matches('#').split_whitespace().next() {
        Some("process") => RunMode::Process,
        _ => RunMode::Queue,
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

/// The `execution_count` of an `execute_input` content.
fn execution_count(content: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Input {
        execution_count: u64,
    }
    serde_json::from_slice::<Input>(content)
        .ok()
        .map(|i| i.execution_count)
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
        let hint = if sig == libc::SIGKILL {
            " — by someone else, e.g. the system's out-of-memory killer"
        } else {
            ""
        };
        format!("killed by {name} (signal {sig}){hint}")
    } else {
        format!("exit code {}", status.code().unwrap_or(-1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;

    #[test]
    fn exit_descriptions() {
        assert_eq!(
            describe_exit(ExitStatus::from_raw(libc::SIGSEGV)),
            "killed by SIGSEGV (signal 11)"
        );
        assert_eq!(describe_exit(ExitStatus::from_raw(3 << 8)), "exit code 3");
        assert!(describe_exit(ExitStatus::from_raw(libc::SIGKILL)).contains("out-of-memory"));
    }

    #[test]
    fn last_words_start_at_the_fatal_error() {
        let tail: Vec<String> = [
            "log",
            "Fatal Python error: Segmentation fault",
            "",
            "  File x",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        assert_eq!(
            last_words(&tail)[0],
            "Fatal Python error: Segmentation fault"
        );
        let many: Vec<String> = (0..50).map(|i| i.to_string()).collect();
        assert_eq!(last_words(&many).len(), 20);
    }

    #[test]
    fn run_modes() {
        let mode = |code: &str| run_mode(json!({"code": code}).to_string().as_bytes());
        assert_eq!(mode("# process\nx = 1"), RunMode::Process);
        assert_eq!(mode("##process"), RunMode::Process);
        assert_eq!(mode("  #  process  \n"), RunMode::Process);
        assert_eq!(mode("# processing\n"), RunMode::Queue);
        assert_eq!(mode("x = 1 # process"), RunMode::Queue);
        assert_eq!(mode("# thread name='w'"), RunMode::Queue);
        assert_eq!(run_mode(b"not json"), RunMode::Queue);
    }

    #[test]
    fn identifiers() {
        assert!(is_identifier("execute_reply"));
        assert!(!is_identifier("bad\"type"));
        assert!(!is_identifier(""));
    }
}
