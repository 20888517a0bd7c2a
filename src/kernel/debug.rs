//! `debug_request` (Jupyter's debugger: the Debug Adapter Protocol over control), served by
//! debugpy in the main worker (`worker_py/kernelvisor/debugger.py`).
//!
//! The supervisor routes each request to the main worker's `aux` connection (a worker thread
//! answers it, even while the main thread is stopped at a breakpoint), and the reply back on
//! control; the worker publishes `debug_event`s on IOPub itself. Requests that arrive while no
//! worker is up wait for one.
//!
//! The session lives here too, so that it survives a worker replacement: the last
//! `initialize`, `attach`, `setBreakpoints` per source and exception/function breakpoints.
//! When a new main worker takes over from a crashed one, they are replayed to it (their
//! replies dropped) before it gets any cell, and a `continued` event tells the frontends that
//! the threads they saw stopped are gone. A `disconnect` ends the session.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::time::{Duration, Instant};

use bytes::Bytes;
use serde_json::{json, Value};
use tracing::{debug, info, warn};

use super::execute::Pending;
use super::{request_frames, Channel, Kernel};
use crate::ipc_ops::ToWorker;
use crate::msg_type::MsgType;
use crate::wire::Incoming;
use crate::worker::WorkerId;

/// Cells wait at most this long for a replay to finish (the worker answers every request, with
/// its own timeouts; this only guards against a worker that never does).
const REPLAY_LIMIT: Duration = Duration::from_secs(60);

/// Marks a replayed request for the worker (in its metadata frame).
const REPLAY_METADATA: &[u8] = br#"{"kernelvisor_replay":true}"#;

/// A request kept for replay: its header (the parent of the events it causes) and content.
#[derive(Debug, Clone)]
struct Kept {
    header: Bytes,
    content: Bytes,
}

/// A replay under way.
#[derive(Debug)]
struct Replay {
    worker: WorkerId,
    unanswered: BTreeSet<u64>,
    started: Instant,
}

/// The debugger's session, as the supervisor keeps it.
#[derive(Debug, Default)]
pub(super) struct DebugState {
    /// Whether the workers' Python can import debugpy: recorded by `kernelvisor install`
    /// (`--debugger`), then as each worker says in its hello.
    pub(super) available: bool,
    /// Requests that arrived while no worker could take them.
    waiting: VecDeque<Incoming>,
    initialize: Option<Kept>,
    attach: Option<Kept>,
    /// The last `setBreakpoints` per source path.
    breakpoints: BTreeMap<String, Kept>,
    /// The last `setExceptionBreakpoints` / `setFunctionBreakpoints`.
    other_breakpoints: BTreeMap<String, Kept>,
    /// Requests handed to a worker: id → (DAP `seq`, `command`), for a crash reply.
    in_flight: HashMap<u64, (Value, String)>,
    replay: Option<Replay>,
    /// The worker the session is with.
    session_worker: Option<WorkerId>,
    /// Threads the frontends were told are stopped (from `debug_event`s).
    stopped: BTreeSet<i64>,
    /// The header of the latest debug request: the parent of events the supervisor makes.
    last_header: Option<Bytes>,
}

/// What the supervisor reads of a DAP request.
struct DapRequest {
    seq: Value,
    command: String,
    arguments: Value,
}

fn parse_request(content: &[u8]) -> DapRequest {
    let v: Value = serde_json::from_slice(content).unwrap_or(Value::Null);
    DapRequest {
        seq: v.get("seq").cloned().unwrap_or(json!(0)),
        command: v["command"].as_str().unwrap_or_default().to_string(),
        arguments: v.get("arguments").cloned().unwrap_or(Value::Null),
    }
}

impl DebugState {
    /// No session yet; `available` as recorded at install.
    pub(super) fn new(available: bool) -> Self {
        Self {
            available,
            ..Self::default()
        }
    }

    /// Remembers what a request changes in the session.
    fn record(&mut self, msg: &Incoming, request: &DapRequest) {
        self.last_header = Some(msg.header_bytes.clone());
        let kept = || Kept {
            header: msg.header_bytes.clone(),
            content: msg.content.clone(),
        };
        match request.command.as_str() {
            "initialize" => self.initialize = Some(kept()),
            "attach" => self.attach = Some(kept()),
            "setBreakpoints" => {
                let Some(path) = request.arguments["source"]["path"].as_str() else {
                    return;
                };
                let any = request.arguments["breakpoints"]
                    .as_array()
                    .is_some_and(|b| !b.is_empty());
                if any {
                    self.breakpoints.insert(path.to_string(), kept());
                } else {
                    self.breakpoints.remove(path);
                }
            }
            "setExceptionBreakpoints" | "setFunctionBreakpoints" => {
                self.other_breakpoints
                    .insert(request.command.clone(), kept());
            }
            "disconnect" => {
                self.initialize = None;
                self.attach = None;
                self.breakpoints.clear();
                self.other_breakpoints.clear();
                self.stopped.clear();
            }
            _ => {}
        }
    }

    /// Whether a debugger session is on (a frontend initialized one and has not
    /// disconnected): cells may stop at breakpoints, and none is sent ahead.
    pub(super) fn is_on(&self) -> bool {
        self.initialize.is_some() || self.replay.is_some()
    }

    /// Follows the stopped threads the frontends were told about.
    pub(super) fn observe_event(&mut self, content: &[u8]) {
        let Ok(event) = serde_json::from_slice::<Value>(content) else {
            return;
        };
        let body = &event["body"];
        match event["event"].as_str() {
            Some("stopped") => {
                if let Some(id) = body["threadId"].as_i64() {
                    self.stopped.insert(id);
                }
            }
            Some("continued") => {
                if body["allThreadsContinued"].as_bool().unwrap_or(true) {
                    self.stopped.clear();
                } else if let Some(id) = body["threadId"].as_i64() {
                    self.stopped.remove(&id);
                }
            }
            _ => {}
        }
    }

    /// Whether cells must wait: a session is being replayed to a new worker.
    pub(super) fn replaying(&mut self) -> bool {
        match &self.replay {
            Some(r) if r.started.elapsed() > REPLAY_LIMIT => {
                warn!(
                    worker = r.worker,
                    "the debugger session replay did not finish; running cells anyway"
                );
                self.replay = None;
                false
            }
            Some(_) => true,
            None => false,
        }
    }

    /// The requests that rebuild the session, in order.
    fn script(&self) -> Vec<Kept> {
        let mut script: Vec<Kept> = self.initialize.iter().cloned().collect();
        if self.initialize.is_some() {
            script.extend(self.attach.iter().cloned());
            script.extend(self.breakpoints.values().cloned());
            script.extend(self.other_breakpoints.values().cloned());
        }
        script
    }
}

impl Kernel {
    /// A `debug_request` on control: to the main worker (or wait for one).
    pub(super) fn debug_request(&mut self, msg: Incoming) {
        debug!(command = %parse_request(&msg.content).command, "debug_request");
        let ready = self.pool.main().is_some() && self.debug.replay.is_none();
        if !ready || !self.debug.waiting.is_empty() {
            self.debug.waiting.push_back(msg);
            return;
        }
        self.send_debug_request(msg);
    }

    /// Hands a request to the main worker, and remembers what it changes in the session
    /// (only now: one that waited must not be replayed and then sent again).
    fn send_debug_request(&mut self, msg: Incoming) {
        let Some(wid) = self.pool.main().map(|w| w.id) else {
            self.debug.waiting.push_front(msg);
            return;
        };
        let request = parse_request(&msg.content);
        self.debug.record(&msg, &request);
        let id = self.register(Channel::Control, &msg, wid, None);
        self.debug
            .in_flight
            .insert(id, (request.seq, request.command));
        self.publish_status(&msg.header_bytes, "busy");
        let ctrl = debug_op(id);
        let frames = request_frames(ctrl.frame(), &msg);
        if let Some(w) = self.pool.main() {
            w.send_aux(frames);
        }
    }

    /// Called when a main worker is ready, before it gets anything: true while the session
    /// is being replayed to it (the caller then waits; [`Self::debug_replayed`] resumes it).
    pub(super) fn debug_replay_started(&mut self) -> bool {
        let Some(wid) = self.pool.main().map(|w| w.id) else {
            return false;
        };
        match &self.debug.replay {
            Some(r) if r.worker == wid => return true,
            Some(r) => {
                debug!(
                    worker = r.worker,
                    "replay target gone; replaying to the new main worker"
                );
                self.debug.replay = None;
            }
            None => {}
        }
        let script = self.debug.script();
        let new_worker = self.debug.session_worker.is_some_and(|w| w != wid);
        self.debug.session_worker = Some(wid);
        if !new_worker || script.is_empty() {
            self.send_waiting_debug_requests();
            return false;
        }
        self.announce_threads_gone();
        info!(
            worker = wid,
            requests = script.len(),
            "replaying the debugger session to the new main worker"
        );
        let mut unanswered = BTreeSet::new();
        for kept in script {
            self.next_request += 1;
            let id = self.next_request;
            let ctrl = debug_op(id);
            let frames = vec![
                ctrl.frame(),
                kept.header,
                Bytes::from_static(b"{}"),
                Bytes::from_static(REPLAY_METADATA),
                kept.content,
            ];
            if let Some(w) = self.pool.main() {
                w.send_aux(frames);
            }
            unanswered.insert(id);
        }
        self.debug.replay = Some(Replay {
            worker: wid,
            unanswered,
            started: Instant::now(),
        });
        true
    }

    /// A worker's reply `id`: true if it answered a replayed request (dropped here; the last
    /// one lets the worker's cells run). Also forgets the request's crash-reply data.
    pub(super) async fn debug_replayed(&mut self, id: Option<u64>) -> bool {
        let Some(id) = id else {
            return false;
        };
        self.debug.in_flight.remove(&id);
        let Some(replay) = &mut self.debug.replay else {
            return false;
        };
        if !replay.unanswered.remove(&id) {
            return false;
        }
        if replay.unanswered.is_empty() {
            info!(worker = replay.worker, "debugger session replayed");
            self.debug.replay = None;
            self.main_ready().await;
        }
        true
    }

    fn send_waiting_debug_requests(&mut self) {
        while let Some(msg) = self.debug.waiting.pop_front() {
            self.send_debug_request(msg);
        }
    }

    /// Tells the frontends that the threads they saw stopped went with the dead worker.
    fn announce_threads_gone(&mut self) {
        let Some(&thread) = self.debug.stopped.iter().next() else {
            return;
        };
        self.debug.stopped.clear();
        let parent = self.debug.last_header.clone().unwrap_or_default();
        let event = json!({"type": "event", "seq": 0, "event": "continued",
            "body": {"threadId": thread, "allThreadsContinued": true}});
        let msg = self.outbox.iopub(
            "debug_event",
            &parent,
            b"{}",
            event.to_string().as_bytes(),
            &[],
        );
        self.iopub.send(msg);
    }

    /// Answers a debug request its worker died with: a failed DAP response.
    pub(super) async fn debug_crash_reply(&mut self, id: u64, p: &Pending, cause: &str) {
        let (seq, command) = self
            .debug
            .in_flight
            .remove(&id)
            .unwrap_or((json!(0), String::new()));
        let response = json!({
            "type": "response", "seq": 0, "request_seq": seq, "command": command,
            "success": false, "body": {},
            "message": format!("the worker process died ({cause}); the debugger session is restored in the new worker"),
        });
        let frames = self.outbox.to_peer(
            &p.identities,
            "debug_reply",
            &p.header,
            b"{}",
            response.to_string().as_bytes(),
            &[],
        );
        self.send(p.channel, frames).await;
        self.publish_status(&p.header, "idle");
    }
}

/// Removes the kernel's cell-file directory (`<tmp>/kernelvisor_<supervisor pid>`, where
/// the workers' `dumpCell` writes; see `worker_py/kernelvisor/compiler.py`) at exit.
pub(super) fn remove_cell_dir() {
    let dir = std::env::temp_dir().join(format!("kernelvisor_{}", std::process::id()));
    let Ok(meta) = std::fs::symlink_metadata(&dir) else {
        return;
    };
    if meta.is_dir() {
        if let Err(e) = std::fs::remove_dir_all(&dir) {
            warn!(dir = %dir.display(), error = %e, "cannot remove the cell-file directory");
        }
    }
}

/// The control frame of `debug_request` `id` to a worker (on `aux`).
fn debug_op(id: u64) -> ToWorker<'static> {
    ToWorker::Request {
        id,
        channel: Channel::Control.name(),
        msg_type: MsgType::DebugRequest.as_str(),
        mode: None,
        thread: None,
        backend: None,
        count: None,
        after: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn incoming(content: &str) -> Incoming {
        Incoming {
            identities: vec![],
            header_bytes: Bytes::from_static(b"{}"),
            header: serde_json::from_str(
                r#"{"msg_id":"m","msg_type":"debug_request","session":"s","username":"u","version":"5.4"}"#,
            )
            .unwrap(),
            parent_header: Bytes::from_static(b"{}"),
            metadata: Bytes::from_static(b"{}"),
            content: Bytes::from(content.to_string()),
            buffers: vec![],
            received: 0,
        }
    }

    fn record(state: &mut DebugState, content: &str) {
        let msg = incoming(content);
        let request = parse_request(&msg.content);
        state.record(&msg, &request);
    }

    fn commands(state: &DebugState) -> Vec<String> {
        state
            .script()
            .iter()
            .map(|k| parse_request(&k.content).command)
            .collect()
    }

    #[test]
    fn session_script_follows_the_requests() {
        let mut s = DebugState::default();
        assert!(s.script().is_empty());
        record(&mut s, r#"{"seq":1,"command":"initialize","arguments":{}}"#);
        record(&mut s, r#"{"seq":2,"command":"attach","arguments":{}}"#);
        let bp = |path: &str, lines: &str| {
            format!(
                r#"{{"seq":3,"command":"setBreakpoints","arguments":{{"source":{{"path":"{path}"}},"breakpoints":{lines}}}}}"#
            )
        };
        record(&mut s, &bp("/a.py", r#"[{"line":1}]"#));
        record(&mut s, &bp("/b.py", r#"[{"line":2}]"#));
        record(&mut s, &bp("/a.py", "[]"));
        record(
            &mut s,
            r#"{"seq":4,"command":"setExceptionBreakpoints","arguments":{"filters":["raised"]}}"#,
        );
        record(&mut s, r#"{"seq":5,"command":"stackTrace","arguments":{}}"#);
        assert_eq!(
            commands(&s),
            [
                "initialize",
                "attach",
                "setBreakpoints",
                "setExceptionBreakpoints"
            ]
        );
        assert!(s.breakpoints.contains_key("/b.py") && !s.breakpoints.contains_key("/a.py"));
        record(&mut s, r#"{"seq":6,"command":"disconnect","arguments":{}}"#);
        assert!(s.script().is_empty());
    }

    #[test]
    fn stopped_threads_follow_events() {
        let mut s = DebugState::default();
        s.observe_event(br#"{"event":"stopped","body":{"threadId":7,"allThreadsStopped":true}}"#);
        assert_eq!(s.stopped.iter().copied().collect::<Vec<_>>(), [7]);
        s.observe_event(br#"{"event":"continued","body":{"threadId":7}}"#);
        assert!(s.stopped.is_empty());
        s.observe_event(b"not json");
    }
}
