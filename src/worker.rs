//! Worker processes: spawning them, accepting their IPC connections, and turning what
//! they do (messages, disconnects, exits) into [`WorkerEvent`]s for the kernel.
//!
//! Every worker runs in its own process group, so a group-wide SIGINT from the client
//! reaches only the supervisor (which forwards it to the busy worker), and dies with the
//! supervisor (`PR_SET_PDEATHSIG`), so none outlives it.

use std::collections::VecDeque;
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::ipc;

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
    pub backend: crate::install::Backend,
}

/// What a worker says first, on each of its two connections.
#[derive(Debug, Clone, Deserialize)]
pub struct Hello {
    /// `main` (cells; the full hello, once ready) or `aux` (introspection, stdin).
    pub role: Role,
    /// The `--worker-id` it was started with.
    pub worker_id: WorkerId,
    /// Its pid (checked against the spawned child).
    pub pid: u32,
    /// `language_info` for `kernel_info_reply`, as JSON (on `main`).
    #[serde(default)]
    pub language_info: serde_json::Value,
    /// Whether it can import debugpy (on `main`).
    #[serde(default)]
    pub debugger: Option<bool>,
}

/// Which of a worker's two connections (see `worker_py/IPC.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Read by the worker's event loop: cells, comms, shutdown.
    Main,
    /// Read by a worker thread: answered while a cell blocks the main thread.
    Aux,
}

/// Everything a worker does that the kernel must hear about.
#[derive(Debug)]
pub enum WorkerEvent {
    /// A worker connected (`aux` first; `main` once it is ready); `tx` sends on that
    /// connection.
    Connected {
        /// Its greeting.
        hello: Hello,
        /// The connection's message channel.
        tx: mpsc::UnboundedSender<Frames>,
    },
    /// A message from the worker, holding its bytes' share of the connection's budget
    /// until it is handled (or, if it goes to IOPub, published).
    Message(WorkerId, Frames, crate::flow::Credit),
    /// One of its IPC connections ended (the process may still be exiting). Every
    /// message read on that connection was sent as an event before this one.
    Disconnected(WorkerId, Role),
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

/// Starts worker `id`. Its exit is reported as [`WorkerEvent::Exited`].
pub fn spawn(
    cfg: &WorkerConfig,
    id: WorkerId,
    events: mpsc::UnboundedSender<WorkerEvent>,
) -> std::io::Result<u32> {
    let mut cmd = tokio::process::Command::new(&cfg.python);
    cmd.arg("-m")
        .arg("kernelvisor.worker")
        .arg("--connect")
        .arg(&cfg.socket_path)
        .arg("--worker-id")
        .arg(id.to_string());
    if cfg.backend != crate::install::Backend::Asyncio {
        // asyncio is the worker's default; say nothing, so plain command lines stay plain.
        cmd.arg("--backend").arg(cfg.backend.as_str());
    }
    // One cell-file directory per kernel, whichever worker writes it (compiler.py).
    cmd.env("KERNELVISOR_SUPERVISOR_PID", std::process::id().to_string());
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setpgid(0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            #[cfg(target_os = "linux")]
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            // Immune to SIGINT until the worker installs its own handler (Python keeps an
            // inherited SIG_IGN): VS Code signals every process of the kernel's tree, and a
            // worker still starting must not die of it.
            if libc::signal(libc::SIGINT, libc::SIG_IGN) == libc::SIG_ERR {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn()?;
    let pid = child.id().unwrap_or_default();
    info!(worker = id, pid, python = %cfg.python.display(), "worker starting");
    let tail = Arc::new(Mutex::new(VecDeque::new()));
    let out = child
        .stdout
        .take()
        .map(|s| tokio::spawn(log_lines(id, "stdout", s, None)));
    let err = child
        .stderr
        .take()
        .map(|s| tokio::spawn(log_lines(id, "stderr", s, Some(tail.clone()))));
    tokio::spawn(async move {
        let status = match child.wait().await {
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
    Ok(pid)
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

/// Accepts worker connections on `listener` for as long as the supervisor runs.
pub async fn accept_loop(listener: UnixListener, events: mpsc::UnboundedSender<WorkerEvent>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_connection(stream, events.clone()));
            }
            Err(e) => {
                warn!(error = %e, "worker socket accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// Reads the hello, then relays the worker's messages as events; a writer task drains
/// the worker's channel, so the kernel never waits on a worker that does not read.
async fn serve_connection(stream: UnixStream, events: mpsc::UnboundedSender<WorkerEvent>) {
    let (mut rd, mut wr) = stream.into_split();
    let hello =
        match tokio::time::timeout(Duration::from_secs(60), ipc::read_message(&mut rd)).await {
            Ok(Ok(Some(frames))) => match serde_json::from_slice::<Hello>(&frames[0]) {
                Ok(hello) => hello,
                Err(e) => {
                    warn!(error = %e, "worker connection without a valid hello");
                    return;
                }
            },
            other => {
                warn!(?other, "worker connection closed before hello");
                return;
            }
        };
    let id = hello.worker_id;
    let role = hello.role;
    let (tx, mut rx) = mpsc::unbounded_channel::<Frames>();
    tokio::spawn(async move {
        while let Some(frames) = rx.recv().await {
            if let Err(e) = ipc::write_message(&mut wr, &frames).await {
                debug!(worker = id, error = %e, "worker write failed");
                break;
            }
        }
    });
    if events.send(WorkerEvent::Connected { hello, tx }).is_err() {
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
                    .send(WorkerEvent::Message(id, frames, credit))
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
    let _ = events.send(WorkerEvent::Disconnected(id, role));
}

/// Sends a signal to a worker process.
pub fn signal(pid: u32, sig: libc::c_int) {
    if pid > 0 {
        // SAFETY: plain syscall; a stale pid at worst gets a signal meant for a dead child.
        unsafe {
            libc::kill(pid as libc::pid_t, sig);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hello_roles() {
        let aux: Hello =
            serde_json::from_str(r#"{"op":"hello","role":"aux","worker_id":3,"pid":9}"#).unwrap();
        assert_eq!(aux.role, Role::Aux);
        assert!(aux.language_info.is_null());
        assert!(serde_json::from_str::<Hello>(r#"{"op":"hello","worker_id":3,"pid":9}"#).is_err());
    }
}
