//! Worker processes: spawning them, accepting their IPC connections, and turning what
//! they do (messages, disconnects, exits) into [`WorkerEvent`]s for the kernel.
//!
//! Every worker runs in its own process group, so a group-wide SIGINT from the client
//! reaches only the supervisor (which forwards it to the busy worker), and dies with the
//! supervisor (`PR_SET_PDEATHSIG`), so none outlives it.
//!
//! Workers are spawned (a Python start-up each), or forked by the template (a spawned
//! process with everything imported that never runs user code): the supervisor sends it
//! `fork` with the new worker's stderr pipe attached, and adopts the worker when it
//! connects (it is reparented to the supervisor, a child subreaper).

use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;

use bytes::Bytes;
use nix::sys::signal::Signal;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::admission::{Admission, Peer, Token};
use crate::backend::Backend;
use crate::ipc;
use crate::ipc_ops::{Hello, Link};
use crate::tasks::Tasks;

/// Identifies a worker for the lifetime of the supervisor.
pub type WorkerId = u64;

/// Frames sent to a worker.
pub type Frames = Vec<Bytes>;

/// How to start workers.
#[derive(Debug, Clone)]
pub struct WorkerConfig {
    /// The Python interpreter that has the `kernelvisor` package.
    pub python: PathBuf,
    /// The supervisor's listening socket.
    pub socket_path: PathBuf,
    /// The event loop of the workers' main thread.
    pub backend: Backend,
}

/// A worker process, owned: signals go through the task that waits for it, so they never
/// reach a pid that was reaped (and maybe reused) since.
#[derive(Debug, Clone)]
pub struct Proc {
    /// Its process id (for logs and `/proc`; never signalled directly).
    pub pid: u32,
    orders: mpsc::UnboundedSender<Order>,
    /// Who reaps the processes it leaves behind (its snapshots, once it is dead).
    pub reaper: Reaper,
}

/// What the task that waits for a process is told.
#[derive(Debug)]
enum Order {
    /// Send it this signal.
    Signal(Signal),
    /// Stop waiting for it, and never kill it: it outlives the supervisor.
    Release,
}

impl Proc {
    /// Sends it a signal, if it has not been reaped yet.
    pub fn signal(&self, sig: Signal) {
        let _ = self.orders.send(Order::Signal(sig));
    }

    /// Lets it go: it is neither waited for nor killed at the stop signal (a template
    /// handed over to the next supervisor, see [`crate::handover`]).
    pub fn release(&self) {
        let _ = self.orders.send(Order::Release);
    }
}

/// Who reaps a process the supervisor did not spawn, and so who knows how it ended.
#[derive(Debug, Clone)]
pub enum Reaper {
    /// The supervisor: the process was reparented to it (a child subreaper).
    Supervisor,
    /// A template handed over by the previous supervisor: its workers are its children,
    /// and it reports how each ended ([`crate::ipc_ops::FromWorker::Exited`]).
    Template(ExitReports),
    /// Nobody we hear from (the handed-over template itself, whose parent is gone).
    Unknown,
}

/// How long a report of a process's end may trail the end itself.
const REPORT_WAIT: Duration = Duration::from_secs(1);

/// Ends of processes reported by a handed-over template, by pid.
#[derive(Debug, Clone, Default)]
pub struct ExitReports(Arc<Reports>);

#[derive(Debug, Default)]
struct Reports {
    /// Wait statuses not taken yet, by pid.
    ends: Mutex<HashMap<u32, i32>>,
    /// Wakes the waiters at each report.
    reported: tokio::sync::Notify,
}

impl ExitReports {
    /// Process `pid` ended with wait status `status`.
    pub fn report(&self, pid: u32, status: i32) {
        self.0
            .ends
            .lock()
            .expect("reports lock")
            .insert(pid, status);
        self.0.reported.notify_waiters();
    }

    /// The wait status of `pid`, once reported (`None` if not within [`REPORT_WAIT`]).
    async fn take(&self, pid: u32) -> Option<i32> {
        let deadline = tokio::time::Instant::now() + REPORT_WAIT;
        loop {
            // Registered before the look, so that a report in between still wakes us.
            let reported = self.0.reported.notified();
            if let Some(status) = self.0.ends.lock().expect("reports lock").remove(&pid) {
                return Some(status);
            }
            if tokio::time::timeout_at(deadline, reported).await.is_err() {
                return None;
            }
        }
    }
}

/// Everything a worker does that the kernel must hear about.
#[derive(Debug)]
pub enum WorkerEvent {
    /// A connection passed the handshake ([`crate::admission`]); `tx` sends on it.
    Connected {
        /// Its greeting.
        hello: Hello,
        /// The peer's pid (`SO_PEERCRED`).
        pid: u32,
        /// The connection's message channel.
        tx: mpsc::UnboundedSender<Frames>,
    },
    /// The template connected (see [`TemplateLink`]).
    TemplateConnected {
        /// The template's worker id.
        id: WorkerId,
        /// Its link: `fork` requests, each with a descriptor.
        link: TemplateLink,
    },
    /// A message from a worker's connection, holding its bytes' share of the connection's
    /// budget until it is handled (or, if it goes to IOPub, published).
    Message(WorkerId, Link, Frames, crate::flow::Credit),
    /// One of its IPC connections ended (the process may still be exiting). Every
    /// message read on that connection was sent as an event before this one. A
    /// snapshot's carries its `seq`.
    Disconnected(WorkerId, Link, Option<u64>),
    /// The process ended; `stderr_tail` is the last of what it wrote to its original
    /// stderr (a Python start-up error, or faulthandler's stack after a crash).
    Exited {
        /// Which worker.
        id: WorkerId,
        /// How it ended.
        status: ExitStatus,
        /// Its last stderr lines.
        stderr_tail: Vec<String>,
    },
}

/// Lines of a worker's stderr kept for crash reports.
const STDERR_TAIL: usize = 200;

/// The fd a worker reads its token from.
const TOKEN_FD: i32 = 3;

/// Starts worker `id` with its secret `token` (read from fd 3, see
/// [`crate::admission`]); as the template (`--template`) if `template`. Its exit is
/// reported as [`WorkerEvent::Exited`]. Its waiter and pipe readers are tracked `tasks`;
/// at their stop signal, a worker still running is killed and reaped.
pub fn spawn(
    cfg: &WorkerConfig,
    id: WorkerId,
    token: &Token,
    template: bool,
    events: mpsc::UnboundedSender<WorkerEvent>,
    tasks: &Tasks,
) -> std::io::Result<Proc> {
    let mut cmd = tokio::process::Command::new(&cfg.python);
    cmd.arg("-m")
        .arg("kernelvisor.worker")
        .arg("--connect")
        .arg(&cfg.socket_path)
        .arg("--worker-id")
        .arg(id.to_string())
        .arg("--token-fd")
        .arg(TOKEN_FD.to_string())
        .arg("--ipc-version")
        .arg(crate::ipc_ops::IPC_VERSION.to_string());
    if cfg.backend != Backend::Asyncio {
        // asyncio is the worker's default; say nothing, so plain command lines stay plain.
        cmd.arg("--backend").arg(cfg.backend.as_str());
    }
    if template {
        cmd.arg("--template");
    }
    // One cell-file directory per kernel, whichever worker writes it (compiler.py).
    cmd.env("KERNELVISOR_SUPERVISOR_PID", std::process::id().to_string());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // The token travels in a pipe the child inherits as fd 3: never in argv or the
    // environment, where user code or `ps` could read it later.
    let (token_rd, token_wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
    nix::unistd::write(&token_wr, token.as_str().as_bytes())?;
    drop(token_wr);
    let token_fd = token_rd.as_raw_fd();
    // SAFETY: only async-signal-safe calls (raw syscalls) between fork and exec.
    unsafe {
        cmd.pre_exec(move || {
            nix::unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0))?;
            #[cfg(target_os = "linux")]
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
            // Immune to SIGINT until the worker installs its own handler (Python keeps an
            // inherited SIG_IGN): VS Code signals every process of the kernel's tree, and a
            // worker still starting must not die of it.
            if libc::signal(libc::SIGINT, libc::SIG_IGN) == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
            // The signals the supervisor reads from a signalfd are blocked in each of its
            // threads (signals.rs), and a child inherits its thread's mask.
            crate::signals::let_in()?;
            if token_fd == TOKEN_FD {
                // dup2 onto itself keeps close-on-exec: clear it instead.
                if libc::fcntl(TOKEN_FD, libc::F_SETFD, 0) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            } else if libc::dup2(token_fd, TOKEN_FD) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    drop(token_rd);
    let pid = child.id().unwrap_or_default();
    info!(worker = id, pid, template, python = %cfg.python.display(), "worker starting");
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    // A grandchild may hold the pipes open after the worker's end: readers stop at the
    // stop signal.
    let out = child.stdout.take().map(|s| {
        tasks.spawn_until_stopped(
            format!("worker {id} stdout reader"),
            log_lines(id, "stdout", s, None),
        )
    });
    let err = child.stderr.take().map(|s| {
        tasks.spawn_until_stopped(
            format!("worker {id} stderr reader"),
            log_lines(id, "stderr", s, Some(tail.clone())),
        )
    });
    let (orders, mut order_rx) = mpsc::unbounded_channel::<Order>();
    let stop = tasks.stopped();
    tasks.spawn(format!("worker {id} waiter"), async move {
        let mut stop = std::pin::pin!(stop);
        let mut stopping = false;
        let status = loop {
            tokio::select! {
                status = child.wait() => break status,
                Some(order) = order_rx.recv() => match order {
                    // Not reaped yet (wait has not returned), so the pid is still ours.
                    Order::Signal(sig) => {
                        if let Some(pid) = child.id() {
                            send_signal(pid, sig);
                        }
                    }
                    Order::Release => {
                        debug!(worker = id, "released: outlives the supervisor");
                        return;
                    }
                },
                () = &mut stop, if !stopping => {
                    // The kernel stops and this worker is still here: kill it, then reap.
                    stopping = true;
                    warn!(worker = id, "worker still running at the stop signal: killed");
                    let _ = child.start_kill();
                }
            }
        };
        let status = match status {
            Ok(status) => status,
            Err(e) => {
                warn!(worker = id, error = %e, "cannot wait for worker");
                return;
            }
        };
        // Let the pipe readers reach EOF so the tail holds the last words (bounded: a
        // grandchild could hold the pipe open).
        for reader in [err, out].into_iter().flatten() {
            let _ = tokio::time::timeout(Duration::from_millis(500), reader).await;
        }
        let stderr_tail = tail.lock().expect("tail lock").drain(..).collect();
        let _ = events.send(WorkerEvent::Exited {
            id,
            status,
            stderr_tail,
        });
    });
    Ok(Proc {
        pid,
        orders,
        reaper: Reaper::Supervisor,
    })
}

/// Where an adopted process's last words are.
pub enum LastWords {
    /// A file it writes its diagnostics to (removed after): a promoted snapshot's, which has
    /// no stderr pipe of ours.
    File(PathBuf),
    /// A stderr pipe of ours ([`Stderr::pipe`]): a worker forked by the template.
    Pipe(Stderr),
}

/// Takes charge of a process that the supervisor did not spawn: a promoted snapshot or a
/// worker forked by the template (reaped by `reaper`), or a handed-over template. Waits
/// for it (its end is seen through a pidfd at once, or by polling where there is none),
/// relays signals to it, and reports its end as worker `id`'s [`WorkerEvent::Exited`],
/// with the tail of its `last_words`. At the stop signal of `tasks`, kills it if it is
/// still running.
pub fn adopt(
    id: WorkerId,
    pid: u32,
    last_words: LastWords,
    reaper: Reaper,
    events: mpsc::UnboundedSender<WorkerEvent>,
    tasks: &Tasks,
) -> Proc {
    let (orders, mut order_rx) = mpsc::unbounded_channel::<Order>();
    let stop = tasks.stopped();
    let waiter_reaper = reaper.clone();
    tasks.spawn(format!("worker {id} waiter (adopted)"), async move {
        let mut stop = std::pin::pin!(stop);
        let mut stopping = false;
        let target = Pid::from_raw(pid as i32);
        let pidfd = pidfd_open(pid);
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let status = loop {
            // Until it is reaped (by `waitpid` below, or by its reaper), the pid is its.
            tokio::select! {
                ready = exited(pidfd.as_ref()) => {
                    if let Ok(mut ready) = ready {
                        ready.clear_ready();
                    }
                }
                _ = tick.tick(), if pidfd.is_none() => {}
                Some(order) = order_rx.recv() => {
                    match order {
                        Order::Signal(sig) => send_signal(pid, sig),
                        Order::Release => {
                            debug!(worker = id, "released: outlives the supervisor");
                            return;
                        }
                    }
                    continue;
                }
                () = &mut stop, if !stopping => {
                    stopping = true;
                    warn!(worker = id, pid, "adopted worker still running at the stop signal: killed");
                    send_signal(pid, Signal::SIGKILL);
                    continue;
                }
            }
            match &waiter_reaper {
                Reaper::Supervisor => match waitpid(target, Some(WaitPidFlag::WNOHANG)) {
                    Ok(WaitStatus::Exited(_, code)) => {
                        break ExitStatus::from_raw((code & 0xff) << 8)
                    }
                    Ok(WaitStatus::Signaled(_, sig, _)) => break ExitStatus::from_raw(sig as i32),
                    Ok(_) => {}
                    // Not our child: gone already, or reaped elsewhere.
                    Err(e) => {
                        debug!(worker = id, pid, error = %e, "adopted worker: waitpid failed");
                        break ExitStatus::from_raw(libc::SIGKILL);
                    }
                },
                // Another process reaps it: its end is known once it is no longer alive.
                Reaper::Template(_) | Reaper::Unknown if crate::proctree::alive(pid) => {}
                Reaper::Template(reports) => {
                    let status = reports.take(pid).await;
                    if status.is_none() {
                        debug!(worker = id, pid, "no report of how it ended");
                    }
                    break ExitStatus::from_raw(status.unwrap_or(libc::SIGKILL));
                }
                Reaper::Unknown => break ExitStatus::from_raw(0),
            }
        };
        let stderr_tail = match last_words {
            LastWords::File(diagnostics) => {
                let tail = file_tail(&diagnostics);
                for line in &tail {
                    debug!(worker = id, stream = "diagnostics", "{line}");
                }
                let _ = std::fs::remove_file(&diagnostics);
                tail
            }
            LastWords::Pipe(stderr) => stderr.last_words().await,
        };
        let _ = events.send(WorkerEvent::Exited {
            id,
            status,
            stderr_tail,
        });
    });
    Proc {
        pid,
        orders,
        reaper,
    }
}

/// A pidfd of `pid`, readable once it exits; `None` if the kernel has none.
fn pidfd_open(pid: u32) -> Option<AsyncFd<OwnedFd>> {
    // SAFETY: pidfd_open takes a pid and flags, and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: a descriptor just returned to us, owned by nothing else.
    let fd = unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd as i32) };
    // SAFETY: an OwnedFd always returns the one descriptor it owns, open until dropped.
    unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }.ok()
}

/// Resolves when the pidfd says its process exited; never without one.
async fn exited(
    pidfd: Option<&AsyncFd<OwnedFd>>,
) -> std::io::Result<tokio::io::unix::AsyncFdReadyGuard<'_, OwnedFd>> {
    match pidfd {
        Some(fd) => fd.readable().await,
        None => std::future::pending().await,
    }
}

/// The stderr pipe of a worker forked by the template: its reader, and the tail kept for
/// the crash report.
#[derive(Debug)]
pub struct Stderr {
    tail: Arc<Mutex<VecDeque<String>>>,
    reader: tokio::task::JoinHandle<Option<()>>,
}

impl Stderr {
    /// A pipe for the stderr of worker `id`: the write end goes to the template with the
    /// `fork` request, the read end is read here (until EOF, or the stop signal of `tasks`).
    pub fn pipe(id: WorkerId, tasks: &Tasks) -> std::io::Result<(OwnedFd, Stderr)> {
        let (rd, wr) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?;
        let rd = tokio::net::unix::pipe::Receiver::from_owned_fd(rd)?;
        let tail = Arc::new(Mutex::new(VecDeque::new()));
        let reader = tasks.spawn_until_stopped(
            format!("worker {id} stderr reader"),
            log_lines(id, "stderr", rd, Some(tail.clone())),
        );
        Ok((wr, Stderr { tail, reader }))
    }

    /// Once the process ended: its last lines, after letting the reader reach EOF
    /// (bounded: a grandchild could hold the pipe open).
    async fn last_words(self) -> Vec<String> {
        let _ = tokio::time::timeout(Duration::from_millis(500), self.reader).await;
        let tail = self.tail.lock().expect("tail lock").drain(..).collect();
        tail
    }
}

/// The last [`STDERR_TAIL`] lines of the file at `path` (at most its last 64 KiB).
fn file_tail(path: &Path) -> Vec<String> {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return Vec::new();
    };
    let len = file.metadata().map_or(0, |m| m.len());
    let start = len.saturating_sub(64 << 10);
    let mut bytes = Vec::new();
    if file.seek(SeekFrom::Start(start)).is_err() || file.read_to_end(&mut bytes).is_err() {
        return Vec::new();
    }
    let text = String::from_utf8_lossy(&bytes);
    let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
    if start > 0 && !lines.is_empty() {
        lines.remove(0); // cut mid-line
    }
    let skip = lines.len().saturating_sub(STDERR_TAIL);
    lines.split_off(skip)
}

fn send_signal(pid: u32, sig: Signal) {
    if let Err(e) = nix::sys::signal::kill(Pid::from_raw(pid as i32), sig) {
        debug!(pid, ?sig, error = %e, "kill failed");
    }
}

async fn log_lines(
    id: WorkerId,
    stream: &'static str,
    pipe: impl AsyncRead + Unpin,
    tail: Option<Arc<Mutex<VecDeque<String>>>>,
) {
    let mut lines = BufReader::new(pipe).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        debug!(worker = id, stream, "{line}");
        if let Some(tail) = &tail {
            let mut tail = tail.lock().expect("tail lock");
            if tail.len() == STDERR_TAIL {
                tail.pop_front();
            }
            tail.push_back(line);
        }
    }
}

/// Accepts worker connections on `listener` until the stop signal of `tasks` (spawn it
/// with [`Tasks::spawn_until_stopped`]); each must pass the handshake of [`Admission`]
/// before anything it says is heard.
pub async fn accept_loop(
    listener: UnixListener,
    admission: Admission,
    events: mpsc::UnboundedSender<WorkerEvent>,
    tasks: Tasks,
) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tasks.spawn_until_stopped(
                    "worker connection reader",
                    serve_connection(stream, admission.clone(), events.clone(), tasks.clone()),
                );
            }
            Err(e) => {
                warn!(error = %e, "worker socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// How long a connection may take to say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(60);

/// Reads and checks the hello, then relays the worker's messages as events; a writer task
/// drains the worker's channel, so the kernel never waits on a worker that does not read.
/// Both end at the stop signal of `tasks`, if the connection has not ended before.
async fn serve_connection(
    stream: UnixStream,
    admission: Admission,
    events: mpsc::UnboundedSender<WorkerEvent>,
    tasks: Tasks,
) {
    let peer = match stream.peer_cred() {
        Ok(c) => Peer {
            uid: c.uid(),
            pid: c.pid().and_then(|p| u32::try_from(p).ok()).unwrap_or(0),
        },
        Err(e) => {
            warn!(error = %e, "worker socket: no peer credentials; connection closed");
            return;
        }
    };
    let (rd, mut wr) = stream.into_split();
    // Buffered: small messages come in few reads; large frames bypass the buffer.
    let mut rd = tokio::io::BufReader::with_capacity(ipc::READ_BUFFER, rd);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, ipc::read_message(&mut rd)).await {
        Ok(Ok(Some(frames))) => match parse_hello(&frames[0]) {
            Ok(hello) => hello,
            Err(e) => {
                warn!(pid = peer.pid, uid = peer.uid, error = %e, "refused a worker connection: no valid hello");
                return;
            }
        },
        other => {
            warn!(
                pid = peer.pid,
                uid = peer.uid,
                ?other,
                "refused a worker connection: closed before hello"
            );
            return;
        }
    };
    if let Err(why) = admission.admit(&hello, peer) {
        warn!(
            pid = peer.pid,
            uid = peer.uid,
            claimed_worker = hello.worker_id,
            role = ?hello.role,
            "refused a worker connection: {why}"
        );
        return;
    }
    let id = hello.worker_id;
    let role = hello.role;
    let seq = hello.seq;
    let connected = if role == Link::Template {
        let (tx, rx) = mpsc::unbounded_channel::<(Frames, OwnedFd)>();
        tasks.spawn_until_stopped(
            format!("worker {id} {role:?} writer"),
            write_with_fds(id, wr, rx),
        );
        WorkerEvent::TemplateConnected {
            id,
            link: TemplateLink(tx),
        }
    } else {
        let (tx, mut rx) = mpsc::unbounded_channel::<Frames>();
        tasks.spawn_until_stopped(format!("worker {id} {role:?} writer"), async move {
            while let Some(frames) = rx.recv().await {
                if let Err(e) = ipc::write_message(&mut wr, &frames).await {
                    debug!(worker = id, error = %e, "worker write failed");
                    break;
                }
            }
        });
        WorkerEvent::Connected {
            hello,
            pid: peer.pid,
            tx,
        }
    };
    if events.send(connected).is_err() {
        return;
    }
    // Flow control (flow.rs): no reading while this connection's output is still queued.
    let budget = crate::flow::Budget::new(crate::flow::CONNECTION_BUDGET);
    loop {
        budget.room().await;
        match ipc::read_message(&mut rd).await {
            Ok(Some(frames)) => {
                let credit = budget.charge(crate::flow::size_of(&frames));
                if events
                    .send(WorkerEvent::Message(id, role, frames, credit))
                    .is_err()
                {
                    return;
                }
            }
            Ok(None) => break,
            // A worker that exits with unread data in its socket resets the connection.
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => {
                warn!(worker = id, error = %e, "worker IPC protocol error; disconnecting");
                break;
            }
        }
    }
    let _ = events.send(WorkerEvent::Disconnected(id, role, seq));
}

/// The template's link: each message goes with a descriptor (`SCM_RIGHTS`), the new
/// worker's stderr. Dropping it closes the link, and the template exits.
#[derive(Debug)]
pub struct TemplateLink(mpsc::UnboundedSender<(Frames, OwnedFd)>);

impl TemplateLink {
    /// Sends `frames` with `fd`; false if the link is gone.
    pub fn send(&self, frames: Frames, fd: OwnedFd) -> bool {
        self.0.send((frames, fd)).is_ok()
    }
}

/// The template link's writer: every message in one `sendmsg` stream, its descriptor
/// attached to its first bytes (the reader collects descriptors in order).
async fn write_with_fds(
    id: WorkerId,
    wr: tokio::net::unix::OwnedWriteHalf,
    mut rx: mpsc::UnboundedReceiver<(Frames, OwnedFd)>,
) {
    while let Some((frames, fd)) = rx.recv().await {
        let bytes = match ipc::encode(&frames) {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(worker = id, error = %e, "template message not sent");
                continue;
            }
        };
        let stream: &UnixStream = wr.as_ref();
        let mut sent = 0;
        while sent < bytes.len() {
            if let Err(e) = stream.writable().await {
                debug!(worker = id, error = %e, "template write failed");
                return;
            }
            let result = stream.try_io(tokio::io::Interest::WRITABLE, || {
                send_with_fd(stream.as_fd(), &bytes, sent, fd.as_fd())
            });
            match result {
                Ok(n) => sent += n,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                Err(e) => {
                    debug!(worker = id, error = %e, "template write failed");
                    return;
                }
            }
        }
        // Our copy of the descriptor closes here: the template holds its own.
    }
}

/// One `sendmsg` of what is left of an encoded message (`bytes[sent..]`), with `fd` attached
/// to the message's first bytes (only when `sent` is 0): the reader collects descriptors
/// in order, one per message. Returns how many bytes went; the caller loops until all did.
pub(crate) fn send_with_fd(
    socket: BorrowedFd,
    bytes: &[u8],
    sent: usize,
    fd: BorrowedFd,
) -> std::io::Result<usize> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags, UnixAddr};
    let fds = [fd.as_raw_fd()];
    let rights = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage] = if sent == 0 { &rights } else { &[] };
    let iov = [std::io::IoSlice::new(&bytes[sent..])];
    Ok(sendmsg::<UnixAddr>(
        socket.as_raw_fd(),
        &iov,
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?)
}

/// A hello: the `hello` op with its fields.
fn parse_hello(frame: &[u8]) -> Result<Hello, String> {
    #[derive(serde::Deserialize)]
    struct Op<'a> {
        op: &'a str,
    }
    match serde_json::from_slice::<Op>(frame) {
        Ok(Op { op: "hello" }) => serde_json::from_slice(frame).map_err(|e| e.to_string()),
        Ok(Op { op }) => Err(format!("first message is {op:?}, not hello")),
        Err(e) => Err(e.to_string()),
    }
}

#[cfg(test)]
impl Proc {
    /// A handle whose signals go nowhere (for bookkeeping tests).
    pub fn detached(pid: u32) -> Proc {
        Proc {
            pid,
            orders: mpsc::unbounded_channel().0,
            reaper: Reaper::Supervisor,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_reported_end_reaches_its_waiter_before_or_after_it_waits() {
        let reports = ExitReports::default();
        reports.report(7, 9);
        assert_eq!(reports.take(7).await, Some(9));
        let waiter = {
            let reports = reports.clone();
            tokio::spawn(async move { reports.take(8).await })
        };
        tokio::task::yield_now().await;
        reports.report(8, 0x100);
        assert_eq!(waiter.await.unwrap(), Some(0x100));
    }

    #[test]
    fn hellos() {
        assert!(
            parse_hello(br#"{"op":"hello","role":"aux","worker_id":3,"pid":9,"token":"t"}"#)
                .is_ok()
        );
        assert!(
            parse_hello(br#"{"op":"iopub","role":"aux","worker_id":3,"pid":9,"token":"t"}"#)
                .is_err()
        );
        assert!(
            parse_hello(br#"{"op":"hello","role":"boss","worker_id":3,"pid":9,"token":"t"}"#)
                .is_err()
        );
        assert!(parse_hello(b"not json").is_err());
    }
}
