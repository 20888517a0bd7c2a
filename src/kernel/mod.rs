//! The kernel: one task that owns the client sockets and the workers, and decides
//! everything about order — the execute lanes (main shell and subshells), busy/idle,
//! replies, snapshots.
//!
//! Client messages come in on the three ROUTERs; worker messages come in as
//! [`WorkerEvent`]s. Both are handled here, one at a time, so ordering needs no locks.
//! Nothing here waits on a worker: writes to workers go through per-worker channels.
//!
//! One file per job: `client` routes client messages, `replies` builds what the supervisor
//! answers itself, `execute` schedules cells, `interrupts` forwards interrupts, `workers`
//! hears workers, `crash` answers for dead ones, `snapshots` takes and promotes snapshots,
//! `watchdog` and `lifecycle` keep the pool healthy, `shutdown` stops it all in order.

mod ahead;
mod client;
mod crash;
mod debug;
mod execute;
mod interrupts;
mod lanes;
mod lifecycle;
mod replies;
mod shutdown;
mod snapshots;
mod subshells;
mod watchdog;
mod workers;

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use futures::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{debug, error, info, warn};

use crate::admission::Admission;
use crate::backend::Backend;
use crate::connection::ConnectionInfo;
use crate::iopub::Iopub;
use crate::kernel_info;
use crate::outbox::Outbox;
use crate::pool::{Pool, PoolPolicy};
use crate::signals::Signals;
use crate::signer::Signer;
use crate::snapshot::SnapshotConfig;
use crate::sockets::{self, ClientSockets};
use crate::tasks::Tasks;
use crate::wire::Incoming;
use crate::worker::{self, WorkerConfig, WorkerEvent, WorkerId};
use execute::{Pending, Queued};
use lanes::Lanes;

/// Settings of a kernel run.
#[derive(Debug, Clone)]
pub struct KernelConfig {
    /// Where to bind, and the key.
    pub connection: ConnectionInfo,
    /// The connection file it came from (with the key, it names where a template handed
    /// over at a restart waits, [`crate::handover`]).
    pub connection_file: std::path::PathBuf,
    /// The workers' Python.
    pub python: std::path::PathBuf,
    /// The workers' Python version, if known before the first worker is up
    /// (recorded by `kernelvisor install`), so `kernel_info` needs no worker.
    pub python_version: Option<String>,
    /// The worker pool's idle policy.
    pub pool: PoolPolicy,
    /// Memory a worker's process tree (and its snapshot) may use before it is killed
    /// ("out of memory").
    pub memory_limit: Option<u64>,
    /// A busy worker that has not been heard from (not even a `pong` on `aux`) for this
    /// long is killed as unresponsive (a deadlock in C code holding the GIL).
    pub unresponsive_timeout: Option<Duration>,
    /// After an interrupt, a cell still running after this long gets its worker killed.
    /// (A second interrupt of the same cell always does.)
    pub interrupt_grace: Option<Duration>,
    /// The workers' event-loop backend.
    pub backend: Backend,
    /// Forked snapshots of the main worker.
    pub snapshots: SnapshotConfig,
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

/// How often the watchdog checks memory, liveness, grace periods and the idle pool while
/// anything is in motion ([`Kernel::watch_closely`]).
const TICK: Duration = Duration::from_millis(100);

/// How often it looks when nothing is: an idle kernel then wakes about twice a second (tokio's
/// timer wheel wakes once more before a deadline), not twenty times.
const IDLE_TICK: Duration = Duration::from_secs(1);

/// A SIGCHLD looks for orphans to reap at most this often (the watchdog looks at each tick).
const STRAYS_GAP: Duration = Duration::from_millis(10);

/// How long a dead worker's exit waits for its `main` connection to be drained.
const DRAIN_WAIT: Duration = Duration::from_millis(500);

/// The request id of every `input_reply` sent to a worker: nothing waits for its `done`
/// (request ids of pending requests start at 1).
const INPUT_REPLY_ID: u64 = 0;

/// How often a busy worker is pinged when an unresponsive timeout is set.
const PING_EVERY: Duration = Duration::from_secs(1);

/// How long a cell interrupted for its `timeout=` tag may take to stop before its worker
/// is killed, unless `--interrupt-grace` says otherwise.
const TIMEOUT_GRACE: Duration = Duration::from_secs(2);

/// How long terminating the ZeroMQ context may take (it sends what the client sockets
/// still hold, for at most their linger of 1 s).
const CONTEXT_TERM_WAIT: Duration = Duration::from_millis(1500);

/// How long the heartbeat thread may take to end once the context is terminated.
const HEARTBEAT_WAIT: Duration = Duration::from_millis(200);

/// Runs the kernel until a shutdown request or SIGTERM, then stops everything it started
/// (shutdown.rs) and returns.
pub async fn run(cfg: KernelConfig) -> anyhow::Result<()> {
    let signals = Signals::open().context("cannot read the kernel's signals (signalfd)")?;
    let conn = &cfg.connection;
    let ctx = zmq::Context::new();
    let tasks = Tasks::new();
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
        heartbeat,
    } = sockets::bind(
        &ctx,
        conn,
        Box::new(move |sub| welcome_outbox.welcome(sub)),
        &tasks,
    )?;

    let ipc_dir = private_socket_dir()?;
    let socket_path = ipc_dir.path().join("ipc.sock");
    let listener = tokio::net::UnixListener::bind(&socket_path)
        .with_context(|| format!("cannot listen on {}", socket_path.display()))?;
    set_mode(&socket_path, 0o600)?;
    let admission = Admission::default();
    let (events_tx, events_rx) = mpsc::unbounded_channel();
    tasks.spawn_until_stopped(
        "worker socket acceptor",
        worker::accept_loop(
            listener,
            admission.clone(),
            events_tx.clone(),
            tasks.clone(),
        ),
    );

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
        snapshots_on: cfg.snapshots.enabled,
        debug: debug::DebugState::new(cfg.debugger),
        cfg,
        outbox,
        iopub,
        shell,
        control,
        stdin,
        admission,
        events_tx,
        events_rx,
        started_at: chrono::Utc::now(),
        next_worker: 0,
        next_request: 0,
        next_arrival: 0,
        next_snapshot: 0,
        pending: HashMap::new(),
        lanes: Lanes::default(),
        sent_ahead: 0,
        process_queue: VecDeque::new(),
        waiting_for_worker: VecDeque::new(),
        deferred_kernel_info: Vec::new(),
        quiet_since: Some(Instant::now()),
        busy_since: None,
        idle_snapshot_fired: None,
        last_ping: Instant::now(),
        ping_seq: 0,
        last_count: None,
        owed_to_heir: Vec::new(),
        abort_after_owed: Vec::new(),
        heir_deadline: None,
        late_heir: None,
        spawn_failures: 0,
        strays_reaped_at: None,
        next_spawn_at: None,
        start_failure: None,
        refusals: Vec::new(),
        exiting: false,
        restarting: false,
        template_outliving: false,
        handed_over: None,
        tasks,
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
    kernel.take_over_template();
    kernel.spawn_worker();
    kernel.serve(signals).await;
    let stopping = Instant::now();
    kernel.shut_down().await;
    let Kernel {
        iopub,
        shell,
        control,
        stdin,
        tasks,
        ..
    } = kernel;
    drop((iopub, shell, control, stdin));
    if let Err(e) = ipc_dir.close() {
        warn!(error = %e, "cannot remove the worker socket's directory");
    }
    debug::remove_cell_dir();
    terminate_context(ctx, &tasks);
    heartbeat.join(HEARTBEAT_WAIT);
    let left = tasks.still_running();
    if !left.is_empty() {
        warn!(tasks = ?left, "not finished at exit");
    }
    debug!(elapsed = ?stopping.elapsed(), "shutdown complete");
    Ok(())
}

/// Terminates the ZeroMQ context: what the client sockets still hold (the shutdown
/// reply) is sent, for at most their linger, and the heartbeat thread ends. On a thread of
/// its own, so that the wait is bounded even if libzmq's is not.
fn terminate_context(ctx: zmq::Context, tasks: &Tasks) {
    let mut ctx = ctx;
    match tasks.thread("zmq-term", move || {
        if let Err(e) = ctx.destroy() {
            warn!(error = %e, "cannot terminate the ZeroMQ context");
        }
    }) {
        Ok(thread) => {
            thread.join(CONTEXT_TERM_WAIT);
        }
        Err(e) => warn!(error = %e, "cannot start a thread to terminate the ZeroMQ context"),
    }
}

/// The workers' socket directory: private (0700) whatever the umask, removed at exit.
fn private_socket_dir() -> anyhow::Result<tempfile::TempDir> {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::Builder::new()
        .prefix("kernelvisor-")
        .permissions(std::fs::Permissions::from_mode(0o700))
        .tempdir()
        .context("cannot create the worker socket directory")?;
    // tempfile applies the mode through the umask only where it can; make sure.
    set_mode(dir.path(), 0o700)?;
    Ok(dir)
}

fn set_mode(path: &std::path::Path, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("cannot set the mode of {}", path.display()))
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
    /// Who may connect to the worker socket.
    admission: Admission,
    events_tx: mpsc::UnboundedSender<WorkerEvent>,
    events_rx: mpsc::UnboundedReceiver<WorkerEvent>,
    started_at: chrono::DateTime<chrono::Utc>,
    next_worker: WorkerId,
    next_request: u64,
    /// Counts execute requests as they arrive (their `Queued::seq`).
    next_arrival: u64,
    next_snapshot: u64,
    pool: Pool,
    /// Snapshots are on (`--snapshots`, switched by `%snapshot on|off`).
    snapshots_on: bool,
    /// The debugger's session and routing (debug.rs).
    debug: debug::DebugState,
    pending: HashMap<u64, Pending>,
    /// Execute requests waiting for their turn, per lane (main shell, subshells).
    lanes: Lanes<Queued>,
    /// How many cells were sent ahead (for `kernelvisor_info_request`).
    sent_ahead: u64,
    /// `# process` cells waiting for a worker to borrow.
    process_queue: VecDeque<Queued>,
    /// When orphans were last looked for (SIGCHLD, the watchdog): a look reads /proc, and a
    /// flood of SIGCHLD must not make the kernel do nothing else.
    strays_reaped_at: Option<Instant>,
    /// Shell and control requests that arrived while no main worker was up.
    waiting_for_worker: VecDeque<(Channel, Incoming)>,
    /// `kernel_info` requests that arrived before the Python version was known.
    deferred_kernel_info: Vec<(Channel, Incoming)>,
    /// Since when no cell has run in the main worker (`None` while one runs).
    quiet_since: Option<Instant>,
    /// Since when cells have run in the main worker back to back (`None`: quiet).
    busy_since: Option<Instant>,
    /// The idle snapshot timer that last fired (see [`Kernel::idle_snapshot_at`]).
    idle_snapshot_fired: Option<Instant>,
    last_ping: Instant,
    ping_seq: u64,
    /// The last execution count any main worker announced: numbering goes on from it
    /// after a crash.
    last_count: Option<u64>,
    /// Crash answers waiting to know whether the promoted snapshot came up.
    owed_to_heir: Vec<crash::Owed>,
    /// Cells queued behind a crashed one: aborted once its reply is out.
    abort_after_owed: Vec<Queued>,
    /// When a promoted snapshot that has not said hello is given up.
    heir_deadline: Option<Instant>,
    /// A promoted snapshot that has yet to connect.
    late_heir: Option<crash::LateHeir>,
    /// Workers that failed to start in a row (none said hello): start-up backs off.
    spawn_failures: u32,
    /// No worker is started before this (the back-off after failed starts).
    next_spawn_at: Option<Instant>,
    /// Why workers cannot start (their Python's last words), once they repeatedly fail.
    start_failure: Option<String>,
    /// Requests to answer with `start_failure`.
    refusals: Vec<(Channel, Incoming, String)>,
    exiting: bool,
    /// The `shutdown_request` that set `exiting` asked for a restart: the template is
    /// handed over to the next supervisor.
    restarting: bool,
    /// The template answered `outliving` to the handover.
    template_outliving: bool,
    /// The template is one a previous supervisor handed over: it reaps the workers it
    /// forks, and reports their ends here.
    handed_over: Option<(WorkerId, worker::ExitReports)>,
    /// Every task the kernel spawns, and the stop signal they listen to.
    tasks: Tasks,
}

impl Kernel {
    async fn serve(&mut self, mut signals: Signals) {
        // The first look is at once (it starts the first worker), then every TICK or
        // IDLE_TICK after the end of the last one.
        let mut next_watch = Instant::now();
        let watch = tokio::time::sleep_until(next_watch.into());
        tokio::pin!(watch);
        while !self.exiting {
            let idle_snapshot = self.idle_snapshot_at();
            // Something set in motion while the watchdog was looking once a second: it
            // looks within TICK (the deadline moves once, not at each message after).
            let soon = Instant::now() + TICK;
            if next_watch > soon && self.watch_closely() {
                next_watch = soon;
            }
            if watch.deadline() != next_watch.into() {
                watch.as_mut().reset(next_watch.into());
            }
            tokio::select! {
                Some(m) = self.shell.next() => self.on_client(Channel::Shell, m).await,
                Some(m) = self.control.next() => self.on_client(Channel::Control, m).await,
                Some(m) = self.stdin.next() => self.on_client(Channel::Stdin, m).await,
                Some(ev) = self.events_rx.recv() => {
                    self.on_worker_event(ev).await;
                    self.send_refusals().await;
                }
                _ = snapshot_timer(idle_snapshot) => {
                    self.idle_snapshot(idle_snapshot.expect("armed"));
                }
                () = &mut watch => {
                    self.watchdog().await;
                    self.send_refusals().await;
                    let period = if self.watch_closely() { TICK } else { IDLE_TICK };
                    next_watch = Instant::now() + period;
                }
                got = signals.recv() => match got {
                    Ok(got) => {
                        if got.interrupt {
                            self.interrupt("SIGINT");
                        }
                        // Else the watchdog's next tick looks for them.
                        let recent = self
                            .strays_reaped_at
                            .is_some_and(|at| at.elapsed() < STRAYS_GAP);
                        if got.child && !recent {
                            self.reap_strays();
                        }
                        if got.terminate {
                            info!("SIGTERM: shutting down");
                            self.exiting = true;
                        }
                    }
                    Err(e) => {
                        // Not expected of a signalfd; shut down rather than spin on it.
                        error!(error = %e, "cannot read signals: shutting down");
                        self.exiting = true;
                    }
                },
            }
        }
    }
}

/// Sleeps until the idle snapshot is due; never returns when no snapshot is armed.
async fn snapshot_timer(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at.into()).await,
        None => std::future::pending().await,
    }
}

/// The frames of a worker `request`: its control frame, then the client's frames.
fn request_frames(ctrl: Bytes, msg: &Incoming) -> worker::Frames {
    let mut frames = Vec::with_capacity(5 + msg.buffers.len());
    frames.push(ctrl);
    frames.push(msg.header_bytes.clone());
    frames.push(msg.parent_header.clone());
    frames.push(msg.metadata.clone());
    frames.push(msg.content.clone());
    frames.extend(msg.buffers.iter().cloned());
    frames
}
