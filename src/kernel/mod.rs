//! The kernel: one task that owns the client sockets and the workers, and decides
//! everything about order — the execute lanes (main shell and subshells), busy/idle,
//! replies.
//!
//! Client messages come in on the three ROUTERs; worker messages come in as
//! [`WorkerEvent`]s. Both are handled here, one at a time, so ordering needs no locks.
//! Nothing here waits on a worker: writes to workers go through per-worker channels.

mod debug;
mod lanes;
mod lifecycle;
mod subshells;
mod watchdog;
mod workers;

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

use crate::cell_plan::{CellPlan, Mode};
use crate::connection::ConnectionInfo;
use crate::exit::{describe_exit, last_words};
use crate::iopub::Iopub;
use crate::kernel_info;
use crate::outbox::Outbox;
use crate::pool::{Placement, Pool, PoolPolicy, Role};
use crate::signer::Signer;
use crate::sockets::{self, ClientSockets};
use crate::wire::{self, Incoming};
use crate::worker::{self, Frames, WorkerConfig, WorkerEvent, WorkerId};
use lanes::{Kind, LaneId, Lanes};

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
    /// The workers' event-loop backend.
    pub backend: crate::install::Backend,
    /// Whether the workers' Python has debugpy (recorded by `kernelvisor install`), until a
    /// worker says.
    pub debugger: bool,
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
    /// For an execute request: its lane, interrupts and timeout.
    exec: Option<Execution>,
}

/// What the supervisor tracks of a running execute request.
#[derive(Debug)]
struct Execution {
    /// The lane whose queue an error aborts (`None`: a `# process` cell aborts nothing).
    lane: Option<LaneId>,
    /// It is its lane's running cell (a queue cell), not a task/thread cell beside it.
    holds_lane: bool,
    /// An error reply aborts its lane's queue (decided here; the worker's
    /// `stop_on_error` is not consulted).
    abort_on_error: bool,
    /// Its `timeout=` tag.
    timeout: Option<Duration>,
    /// When it was sent to the worker.
    started: Instant,
    /// When an interrupt (signal) first reached it.
    interrupted: Option<Instant>,
    /// When its `timeout=` tag made us send it the `interrupt` op.
    timed_out: Option<Instant>,
}

/// An execute request waiting for its turn (or for a worker), with its plan.
#[derive(Debug)]
struct Queued {
    msg: Incoming,
    plan: CellPlan,
    /// Arrival order: what waited for a worker is sent in it.
    seq: u64,
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
}

/// How long workers get to exit after a `shutdown` before they are killed.
const WORKER_EXIT_GRACE: Duration = Duration::from_millis(300);

/// How often the watchdog checks memory, liveness, grace periods and the idle pool.
const TICK: Duration = Duration::from_millis(100);

/// Largest client message (all its frames) handed to a worker: the IPC frame limit
/// (1 GiB) less room for the control frame.
const MAX_REQUEST_BYTES: usize = crate::ipc::MAX_BODY - (1 << 20);

/// How long a dead worker's exit waits for its `main` connection to be drained.
const DRAIN_WAIT: Duration = Duration::from_millis(500);

/// How often a busy worker is pinged when an unresponsive timeout is set.
const PING_EVERY: Duration = Duration::from_secs(1);

/// How long a cell interrupted for its `timeout=` tag may take to stop before its worker
/// is killed, unless `--interrupt-grace` says otherwise.
const TIMEOUT_GRACE: Duration = Duration::from_secs(2);

/// Runs the kernel until a shutdown request or SIGTERM.
pub async fn run(cfg: KernelConfig) -> anyhow::Result<()> {
    let conn = &cfg.connection;
    let ctx = zmq::Context::new();
    let outbox = std::sync::Arc::new(Outbox::new(
        Signer::new(conn.key.as_bytes()),
        &std::env::var("USER").unwrap_or_else(|_| "kernel".into()),
    ));
    let welcome_outbox = outbox.clone();
    let ClientSockets {
        shell,
        control,
        stdin,
        iopub,
    } = sockets::bind(&ctx, conn, Box::new(move |sub| welcome_outbox.welcome(sub)))?;

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

    let cfg_debugger = cfg.debugger;
    let mut kernel = Kernel {
        worker_cfg: WorkerConfig {
            python: cfg.python.clone(),
            socket_path,
            backend: cfg.backend,
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
        next_arrival: 0,
        pending: HashMap::new(),
        lanes: Lanes::default(),
        process_queue: VecDeque::new(),
        waiting_for_worker: VecDeque::new(),
        deferred_kernel_info: Vec::new(),
        kill_reasons: HashMap::new(),
        execution_counts: HashMap::new(),
        drained: Default::default(),
        exits: HashMap::new(),
        last_heard: Instant::now(),
        last_ping: Instant::now(),
        ping_seq: 0,
        exiting: false,
        debug: debug::DebugState::new(cfg_debugger),
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
    debug::remove_cell_dir();
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
    /// Counts execute requests as they arrive (their `Queued::seq`).
    next_arrival: u64,
    pool: Pool,
    pending: HashMap<u64, Pending>,
    /// Execute requests waiting for their turn, per lane (main shell, subshells).
    lanes: Lanes<Queued>,
    /// `# process` cells waiting for a worker to borrow.
    process_queue: VecDeque<Queued>,
    /// Shell requests that arrived while no worker was connected.
    waiting_for_worker: VecDeque<Incoming>,
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
    /// The debugger's session and routing (debug.rs).
    debug: debug::DebugState,
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
        let size = msg.size();
        if size > MAX_REQUEST_BYTES {
            self.too_large(channel, msg, size).await;
            return;
        }
        // -- wire: content, metadata and parent header must be JSON objects.
        if let Err(e) = msg.check_json() {
            warn!(channel = channel.name(), msg_id = %msg.header.msg_id, error = %e, "refused a message with invalid JSON");
            self.refuse(channel, &msg, e.ename(), e.to_string()).await;
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
            (Channel::Control, "debug_request") => self.debug_request(msg),
            (Channel::Control, "create_subshell_request") => self.create_subshell(msg).await,
            (Channel::Control, "delete_subshell_request") => self.delete_subshell(msg).await,
            (Channel::Control, "list_subshell_request") => self.list_subshells(msg).await,
            (Channel::Shell, "execute_request") => self.execute_request(msg).await,
            (Channel::Shell, t) if AUX_REQUESTS.contains(&t) || MAIN_MESSAGES.contains(&t) => {
                self.forward(msg)
            }
            (Channel::Stdin, "input_reply") => {
                if let Some(w) = self.pool.main() {
                    w.send_aux(request_frames(&request_ctrl(0, Channel::Stdin, &msg), &msg));
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
        let content = kernel_info::reply_content(info, self.debug.available);
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
        self.answer_with(channel, msg, reply_type, b"{}", content)
            .await;
    }

    /// [`Self::answer`], with reply metadata.
    async fn answer_with(
        &mut self,
        channel: Channel,
        msg: &Incoming,
        reply_type: &str,
        metadata: &[u8],
        content: &[u8],
    ) {
        self.publish_status(&msg.header_bytes, "busy");
        let frames = self.outbox.to_peer(
            &msg.identities,
            reply_type,
            &msg.header_bytes,
            metadata,
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

    /// Interrupts the cells running in the main worker (queue, task, thread and subshell
    /// cells alike: SIGINT reaches them all) and in borrowed workers. If a main-worker cell
    /// that a previous interrupt reached is still running (it ignored SIGINT, or sits in C
    /// code), the worker is killed and replaced instead.
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
            worker::signal(pid, libc::SIGINT);
        }
        let Some((wid, pid)) = self.pool.main().map(|w| (w.id, w.pid)) else {
            return;
        };
        let now = Instant::now();
        let mut running = self.main_executions(wid).peekable();
        if running.peek().is_none() {
            debug!(why, "no cell running in the main worker");
            return;
        }
        let mut again = false;
        for exec in running {
            again |= exec.interrupted.is_some();
            exec.interrupted.get_or_insert(now);
        }
        if again {
            self.kill_worker(
                wid,
                pid,
                "killed: the cell did not stop when interrupted (it ignored SIGINT or is stuck in C code), so it was interrupted again".into(),
            );
        } else {
            info!(worker = wid, why, "interrupting the running cells");
            worker::signal(pid, libc::SIGINT);
        }
    }

    /// The execute requests running in worker `wid` (the main one).
    fn main_executions(&mut self, wid: WorkerId) -> impl Iterator<Item = &mut Execution> {
        self.pending
            .values_mut()
            .filter(move |p| p.worker == wid && !p.borrowed)
            .filter_map(|p| p.exec.as_mut())
    }

    /// Whether an execute request is running in the main worker.
    fn main_busy(&self) -> bool {
        let Some(wid) = self.pool.main().map(|w| w.id) else {
            return false;
        };
        self.pending
            .values()
            .any(|p| p.worker == wid && !p.borrowed && p.exec.is_some())
    }

    fn kill_worker(&mut self, id: WorkerId, pid: u32, reason: String) {
        warn!(worker = id, pid, reason, "killing worker");
        self.kill_reasons.insert(id, reason);
        worker::signal(pid, libc::SIGKILL);
    }

    // ---- requests handed to workers ----

    fn register(
        &mut self,
        channel: Channel,
        msg: &Incoming,
        worker: WorkerId,
        exec: Option<Execution>,
    ) -> u64 {
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
                exec,
            },
        );
        id
    }

    /// An `execute_request` arrived: refuse it if it names an unknown subshell, else
    /// queue it or run it by its plan.
    async fn execute_request(&mut self, msg: Incoming) {
        let lane = LaneId::of(msg.header.subshell_id.as_deref());
        if !self.lanes.exists(&lane) {
            let id = msg.header.subshell_id.clone().unwrap_or_default();
            warn!(subshell_id = %id, "execute_request for an unknown subshell");
            let evalue = format!("no subshell with id {id:?} (it was deleted, or never created)");
            self.refuse(Channel::Shell, &msg, "UnknownSubshellError", evalue)
                .await;
            return;
        }
        let plan = CellPlan::parse(&msg.content, &msg.metadata);
        self.next_arrival += 1;
        let queued = Queued {
            msg,
            plan,
            seq: self.next_arrival,
        };
        match queued.plan.mode {
            Mode::Process => {
                self.process_queue.push_back(queued);
                self.dispatch_process();
            }
            Mode::Queue | Mode::Task | Mode::Thread { .. } => {
                let kind = match queued.plan.mode {
                    Mode::Queue => Kind::Queue,
                    _ => Kind::Beside,
                };
                if self.lanes.push(&lane, kind, queued).is_err() {
                    unreachable!("the lane exists");
                }
                self.dispatch_execute();
            }
        }
    }

    /// Sends the main worker what may start now (see [`lanes`]), in arrival order across
    /// lanes, so cells that waited for a worker start as they would have on a ready one.
    fn dispatch_execute(&mut self) {
        if self.pool.main().is_none() || self.debug.replaying() {
            return;
        }
        while let Some((lane, _)) = self.lanes.first_ready(|q| q.seq) {
            let (kind, queued) = self.lanes.pop_front(&lane).expect("a ready front");
            let holds_lane = kind == Kind::Queue;
            let id = self.start_execute(lane.clone(), queued, holds_lane);
            if holds_lane {
                self.lanes.start(&lane, id);
            }
        }
    }

    /// Hands one execute request to the main worker, with its run mode; returns its id.
    fn start_execute(&mut self, lane: LaneId, queued: Queued, holds_lane: bool) -> u64 {
        let Queued { msg, plan, .. } = queued;
        let wid = self.pool.main().map(|w| w.id).expect("a main worker");
        let now = Instant::now();
        let exec = Execution {
            holds_lane,
            abort_on_error: plan.abort_on_error(),
            timeout: plan.tags.timeout,
            started: now,
            interrupted: None,
            timed_out: None,
            lane: Some(lane.clone()),
        };
        if !self.main_busy() {
            // Liveness is measured from when the worker became busy.
            self.last_heard = now;
        }
        let id = self.register(Channel::Shell, &msg, wid, Some(exec));
        self.publish_status(&msg.header_bytes, "busy");
        let mut ctrl = request_ctrl(id, Channel::Shell, &msg);
        match (&plan.mode, &lane) {
            (Mode::Task, _) => ctrl["mode"] = json!("task"),
            (Mode::Thread { name, backend }, _) => {
                ctrl["mode"] = json!("thread");
                if let Some(name) = name {
                    ctrl["thread"] = json!(name);
                }
                if let Some(backend) = backend {
                    ctrl["backend"] = json!(backend.as_str());
                }
            }
            (_, LaneId::Subshell(sub)) => {
                ctrl["mode"] = json!("thread");
                ctrl["thread"] = json!(subshell_thread(sub));
            }
            (_, LaneId::Main) => {}
        }
        if let Some(w) = self.pool.main() {
            let frames = request_frames(&ctrl, &msg);
            if ctrl["mode"] == "thread" {
                // `aux` is read by a worker thread: a cell blocking the main thread (which
                // reads `main`) must not hold up cells that run elsewhere.
                w.send_aux(frames);
            } else {
                w.send_main(frames);
            }
        }
        id
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
            let Queued { msg, plan, .. } = self.process_queue.pop_front().expect("not empty");
            let exec = Execution {
                lane: None,
                holds_lane: false,
                abort_on_error: false,
                timeout: plan.tags.timeout,
                started: Instant::now(),
                interrupted: None,
                timed_out: None,
            };
            let id = self.register(Channel::Shell, &msg, wid, Some(exec));
            info!(
                worker = wid,
                "running a `# process` cell in a borrowed worker"
            );
            self.publish_status(&msg.header_bytes, "busy");
            if let Some(w) = self.pool.borrowed(wid) {
                let ctrl = request_ctrl(id, Channel::Shell, &msg);
                w.send_main(request_frames(&ctrl, &msg));
            }
        }
    }

    fn forward(&mut self, msg: Incoming) {
        let Some(wid) = self.pool.main().map(|w| w.id) else {
            self.waiting_for_worker.push_back(msg);
            return;
        };
        let id = self.register(Channel::Shell, &msg, wid, None);
        self.publish_status(&msg.header_bytes, "busy");
        let ctrl = request_ctrl(id, Channel::Shell, &msg);
        let frames = request_frames(&ctrl, &msg);
        if let Some(w) = self.pool.main() {
            if MAIN_MESSAGES.contains(&msg.header.msg_type.as_str()) {
                w.send_main(frames);
            } else {
                w.send_aux(frames);
            }
        }
    }
}

/// The worker thread that runs a subshell's cells.
fn subshell_thread(subshell_id: &str) -> String {
    format!("subshell-{subshell_id}")
}

/// The control object of a `request` to a worker (run-mode fields are added to it).
fn request_ctrl(id: u64, channel: Channel, msg: &Incoming) -> Value {
    json!({"op": "request", "id": id, "channel": channel.name(),
        "msg_type": msg.header.msg_type})
}

/// The frames of a `request` to a worker.
fn request_frames(ctrl: &Value, msg: &Incoming) -> Frames {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn identifiers() {
        assert!(is_identifier("execute_reply"));
        assert!(!is_identifier("bad\"type"));
        assert!(!is_identifier(""));
    }
}
