//! The IPC operations between supervisor and worker, typed on this side (their mirror is
//! `worker_py/kernelvisor/messages.py`; the layout is in `worker_py/IPC.md`). Frame 0 of
//! every IPC message is one of these, as JSON with an `"op"` tag; the Jupyter frames that
//! follow it are passed through as bytes.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::worker::WorkerId;

/// The IPC's version. The supervisor passes it to every worker it starts
/// (`--ipc-version`); a worker whose own differs refuses to start, saying so
/// (IPC.md "Handshake"), and an outliving template will not be adopted across it. Bump it
/// with the Python worker's `kernelvisor.ipc.IPC_VERSION` whenever either side changes
/// what it sends or expects. (2: the user's interrupt is the `interrupt` op, without a
/// `timeout`, and no SIGINT.)
pub const IPC_VERSION: u32 = 2;

/// Which of a worker's connections a message travels on (see `worker_py/IPC.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Link {
    /// Read by the worker's main-thread event loop: cells, comms, shutdown, snapshots.
    Main,
    /// Read by a worker thread: answered while a cell blocks the main thread.
    Aux,
    /// The one connection of a paused snapshot (a forked copy of a worker).
    Snapshot,
    /// The one connection of the template: the warm process workers are forked from.
    Template,
}

/// Where an `execute_request` runs in the worker (IPC.md "Run modes"); absent: the main
/// thread, one cell after another (`queue`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum RunMode {
    /// A concurrent task on the main thread's event loop.
    Task,
    /// Another thread, with its own event loop.
    Thread,
}

/// The execution count the supervisor gives an `execute_request` (IPC.md, "Execution
/// counts"): flattened into the request's control frame.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct Count {
    /// The cell's number: the one it takes, or (if it takes none) the next cell's.
    #[serde(rename = "count")]
    pub number: u64,
    /// Whether the cell takes the number (stored in history, not silent, not blank).
    pub takes_count: bool,
}

/// What a queue cell sent ahead waits for (IPC.md, "Cells sent ahead"): flattened into
/// the request's control frame.
#[derive(Debug, Clone, Copy, Serialize, PartialEq)]
pub struct After {
    /// The request (the running queue cell) it waits for.
    #[serde(rename = "after")]
    pub id: u64,
    /// An error reply of that request aborts this one: the worker then drops it, and the
    /// supervisor answers it `aborted`.
    pub unless_error: bool,
    /// If that request ran this long (ms) or longer, the worker does not start this one
    /// but says `held` and waits for `go` (a snapshot goes between them). Absent: no limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub within: Option<f64>,
}

/// Supervisor → worker.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum ToWorker<'a> {
    /// A Jupyter request; its frames follow.
    Request {
        /// Unique per supervisor; the worker's `reply`/`done` names it.
        id: u64,
        /// The client channel it came on: `shell`, `control` or `stdin`.
        channel: &'a str,
        /// Its `msg_type`.
        msg_type: &'a str,
        /// Run mode of an `execute_request` (absent: `queue`).
        #[serde(skip_serializing_if = "Option::is_none")]
        mode: Option<RunMode>,
        /// With `mode: thread`: the thread's name (absent: the `to_thread` pool).
        #[serde(skip_serializing_if = "Option::is_none")]
        thread: Option<&'a str>,
        /// With `mode: thread`: the event loop of a thread created for it.
        #[serde(skip_serializing_if = "Option::is_none")]
        backend: Option<Backend>,
        /// Of an `execute_request`: the cell's execution count (the supervisor numbers
        /// cells, and has published its `execute_input`), and whether the cell takes it
        /// (if not, the next cell gets the same number).
        #[serde(flatten)]
        count: Option<Count>,
        /// Of a queue cell sent ahead (kernel/ahead.rs): the request it waits for; it
        /// starts once that one's reply is sent.
        #[serde(flatten)]
        after: Option<After>,
    },
    /// Finish, flush and exit 0.
    Shutdown,
    /// Interrupt one cell: the user's interrupt (it has started as far as the client
    /// knows; if the worker has not started it yet, it stops as soon as it does), or its
    /// `timeout=` tag expired.
    Interrupt {
        /// The cell's request id.
        id: u64,
        /// Of a `timeout=` tag: its seconds, for the error message. Absent: the user's.
        #[serde(skip_serializing_if = "Option::is_none")]
        timeout: Option<f64>,
    },
    /// Stop a named thread once its cells are done (a deleted subshell).
    DropThread {
        /// Its name.
        name: &'a str,
    },
    /// Reset the namespace (a borrowed worker going back to the pool).
    Reset,
    /// Liveness: answered with `pong` by the worker's `aux` reader.
    Ping {
        /// Echoed back.
        seq: u64,
    },
    /// The execution count of the next cell (a worker taking over the namespace's
    /// numbering after a crash).
    SetCount {
        /// The next cell's number.
        execution_count: u64,
    },
    /// Start the cell sent ahead that the worker holds (it said `held`; on `main`).
    Go {
        /// Its request id.
        id: u64,
    },
    /// Fork a paused snapshot now (on `main`: between cells).
    Snapshot {
        /// Names the snapshot in its `hello` and in `snapshot_taken`.
        seq: u64,
    },
    /// The answer to `snapshot_query` (on `aux`).
    SnapshotInfo {
        /// What `%snapshot` shows (see `kernelvisor_info_request`'s `snapshot`).
        info: serde_json::Value,
    },
    /// Output credit returned (on `aux`): bytes of each flow's IOPub messages that were
    /// published (IPC.md "Flow control").
    Credit {
        /// `(flow, bytes)` pairs.
        flows: Vec<(u64, usize)>,
    },
    /// To a snapshot: become a worker (the live one died), as worker `worker_id`,
    /// authenticating its new connections with `token`.
    Promote {
        /// Its id from now on.
        worker_id: WorkerId,
        /// Its new secret (hex).
        token: &'a str,
        /// The next cell's number.
        execution_count: u64,
    },
    /// To the template: fork worker `worker_id`, which authenticates its connections
    /// with `token`. Sent with the new worker's stderr pipe attached (`SCM_RIGHTS`).
    Fork {
        /// The new worker's id.
        worker_id: WorkerId,
        /// Its secret (hex).
        token: &'a str,
    },
    /// A restart: outlive this supervisor, and wait for the next one on the abstract
    /// socket `name` (on `template`; see `worker_py/kernelvisor/handover.py`).
    Outlive {
        /// The abstract socket's name ([`crate::handover::rendezvous_name`]).
        name: &'a str,
    },
}

impl ToWorker<'_> {
    /// The control frame.
    pub fn frame(&self) -> Bytes {
        Bytes::from(serde_json::to_vec(self).expect("IPC ops serialize"))
    }

    /// This op alone, as a message.
    pub fn message(&self) -> Vec<Bytes> {
        vec![self.frame()]
    }
}

/// What a connection says first.
#[derive(Debug, Clone, Deserialize)]
pub struct Hello {
    /// Which connection this is.
    pub role: Link,
    /// The `--worker-id` it was started with (a snapshot: its live worker's).
    pub worker_id: WorkerId,
    /// The worker's secret (hex), read from the fd it was started with.
    pub token: String,
    /// A snapshot's `seq` (from the `snapshot` op).
    #[serde(default)]
    pub seq: Option<u64>,
    /// `language_info` for `kernel_info_reply`, as JSON (on `main`).
    #[serde(default)]
    pub language_info: serde_json::Value,
    /// Whether it can import debugpy (on `main`).
    #[serde(default)]
    pub debugger: Option<bool>,
}

/// Worker → supervisor (after `hello`).
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum FromWorker<'a> {
    /// Publish on IOPub; frames: parent_header, metadata, content, buffers….
    Iopub {
        /// Its `msg_type`.
        #[serde(borrow)]
        msg_type: &'a str,
        /// The output flow it is charged to (one per parent request, numbered by the
        /// worker); its bytes are returned in a `credit` op once published.
        #[serde(default)]
        flow: Option<u64>,
    },
    /// The reply to request `id` (its type is derived from the request's by the
    /// supervisor); frames: metadata, content, buffers….
    Reply {
        /// The request.
        id: u64,
        /// `ok`, `error` or `aborted`.
        #[serde(borrow)]
        status: &'a str,
    },
    /// Request `id` is finished and has no reply (comm messages, `input_reply`).
    Done {
        /// The request.
        id: u64,
    },
    /// An `input_request` for execute request `id`; frames: parent_header, metadata, content.
    Stdin {
        /// The asking cell's request.
        id: u64,
        /// `input_request`.
        #[serde(borrow)]
        msg_type: &'a str,
    },
    /// The answer to `ping`.
    Pong {},
    /// The `reset` is done.
    ResetDone,
    /// A snapshot was forked (from the live worker, on `main`).
    SnapshotTaken {
        /// The `snapshot` op's.
        seq: u64,
        /// The snapshot's pid.
        pid: u32,
        /// How long the fork took the live worker, in milliseconds.
        fork_ms: f64,
    },
    /// `%snapshot on|off`: switch snapshots.
    SnapshotPolicy {
        /// On or off.
        enabled: bool,
    },
    /// `%snapshot`: the supervisor answers `snapshot_info` on `aux`.
    SnapshotQuery,
    /// `%undo`: kill this worker and promote its snapshot (if there is none, the worker
    /// says so itself and never sends this).
    Undo,
    /// The cell sent ahead `id` waits for `go`: the cell before it ran `within` or longer
    /// (on `main`).
    Held {
        /// Its request id.
        id: u64,
    },
    /// No snapshot could be taken (from the live worker, on `main`).
    SnapshotRefused {
        /// The `snapshot` op's.
        seq: u64,
        /// Why, for the user ("CUDA was initialized").
        #[serde(borrow)]
        reason: std::borrow::Cow<'a, str>,
    },
    /// The template could not fork worker `worker_id` (on `template`).
    ForkFailed {
        /// The `fork` op's.
        worker_id: WorkerId,
        /// Why (the OS error).
        #[serde(borrow)]
        reason: std::borrow::Cow<'a, str>,
    },
    /// The template will outlive this supervisor (the answer to `outlive`).
    Outliving,
    /// A process the adopted template reaps for the supervisor ended (on `template`).
    Exited {
        /// Its pid.
        pid: u32,
        /// Its wait status, as `waitpid` returned it.
        status: i32,
    },
}

impl<'a> FromWorker<'a> {
    /// Parses a control frame.
    pub fn parse(frame: &'a [u8]) -> serde_json::Result<Self> {
        serde_json::from_slice(frame)
    }
}

/// A message type fit to be written into a header (ASCII letters, digits, `_`).
pub fn is_identifier(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_alphanumeric() || c == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_serialize_as_ipc_md_says() {
        let req = ToWorker::Request {
            id: 7,
            channel: "shell",
            msg_type: "execute_request",
            mode: Some(RunMode::Thread),
            thread: Some("w"),
            backend: Some(Backend::Trio),
            count: Some(Count {
                number: 4,
                takes_count: true,
            }),
            after: Some(After {
                id: 6,
                unless_error: true,
                within: Some(10.0),
            }),
        };
        assert_eq!(
            serde_json::to_value(&req).unwrap(),
            serde_json::json!({"op": "request", "id": 7, "channel": "shell",
                "msg_type": "execute_request", "mode": "thread", "thread": "w", "backend": "trio",
                "count": 4, "takes_count": true, "after": 6, "unless_error": true,
                "within": 10.0})
        );
        let plain = ToWorker::Request {
            id: 1,
            channel: "shell",
            msg_type: "x",
            mode: None,
            thread: None,
            backend: None,
            count: None,
            after: None,
        };
        assert_eq!(
            serde_json::to_value(&plain).unwrap(),
            serde_json::json!({"op": "request", "id": 1, "channel": "shell", "msg_type": "x"})
        );
        assert_eq!(&ToWorker::Shutdown.frame()[..], br#"{"op":"shutdown"}"#);
        assert_eq!(
            &ToWorker::DropThread { name: "t" }.frame()[..],
            br#"{"op":"drop_thread","name":"t"}"#
        );
        assert_eq!(
            &ToWorker::Credit {
                flows: vec![(3, 10), (4, 1 << 20)]
            }
            .frame()[..],
            br#"{"op":"credit","flows":[[3,10],[4,1048576]]}"#
        );
    }

    #[test]
    fn worker_ops_parse() {
        let r = FromWorker::parse(br#"{"op":"reply","id":3,"status":"ok"}"#).unwrap();
        assert!(matches!(
            r,
            FromWorker::Reply {
                id: 3,
                status: "ok"
            }
        ));
        assert!(matches!(
            FromWorker::parse(br#"{"op":"pong","seq":4}"#).unwrap(),
            FromWorker::Pong {}
        ));
        assert!(matches!(
            FromWorker::parse(br#"{"op":"reset_done"}"#).unwrap(),
            FromWorker::ResetDone
        ));
        assert!(matches!(
            FromWorker::parse(br#"{"op":"iopub","msg_type":"stream","flow":12}"#).unwrap(),
            FromWorker::Iopub {
                msg_type: "stream",
                flow: Some(12)
            }
        ));
        assert!(matches!(
            FromWorker::parse(br#"{"op":"iopub","msg_type":"debug_event"}"#).unwrap(),
            FromWorker::Iopub { flow: None, .. }
        ));
        assert!(FromWorker::parse(br#"{"op":"iopub","msg_type":"x","flow":-1}"#).is_err());
        assert!(FromWorker::parse(br#"{"op":"reply","id":"x"}"#).is_err());
        assert!(FromWorker::parse(br#"{"op":"nope"}"#).is_err());
        let refused =
            FromWorker::parse(br#"{"op":"snapshot_refused","seq":2,"reason":"CUDA \"x\""}"#)
                .unwrap();
        assert!(
            matches!(refused, FromWorker::SnapshotRefused { seq: 2, reason } if reason == "CUDA \"x\"")
        );
    }

    #[test]
    fn hello_needs_a_token_and_a_role() {
        let aux: Hello = serde_json::from_str(
            r#"{"op":"hello","role":"aux","worker_id":3,"pid":9,"token":"ab"}"#,
        )
        .unwrap();
        assert_eq!(aux.role, Link::Aux);
        assert!(serde_json::from_str::<Hello>(
            r#"{"op":"hello","role":"aux","worker_id":3,"pid":9}"#
        )
        .is_err());
        assert!(serde_json::from_str::<Hello>(
            r#"{"op":"hello","worker_id":3,"pid":9,"token":"x"}"#
        )
        .is_err());
    }

    #[test]
    fn identifiers() {
        assert!(is_identifier("execute_reply"));
        assert!(!is_identifier("bad\"type"));
        assert!(!is_identifier(""));
    }
}
