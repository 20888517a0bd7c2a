//! Client messages: parsed and verified on arrival, then routed by channel and message
//! type — answered here (kernel info, shutdown, interrupt, subshells, pool state), or
//! scheduled (execute), or handed to the main worker.

use bytes::Bytes;
use serde_json::json;
use tracing::{debug, info, warn};

use super::*;
use crate::ipc_ops::ToWorker;
use crate::msg_type::MsgType;
use crate::wire;

/// Largest client message (all its frames) handed to a worker: the IPC frame limit
/// (1 GiB) less room for the control frame.
const MAX_REQUEST_BYTES: usize = crate::ipc::MAX_BODY - (1 << 20);

/// A received frame as `Bytes`: a large one keeps ZeroMQ's buffer (no copy on its way to
/// the worker), a small one is copied out of it.
fn frame_bytes(frame: zmq::Message) -> Bytes {
    /// Owns a received ZeroMQ frame for `Bytes::from_owner`.
    struct Received(zmq::Message);
    impl AsRef<[u8]> for Received {
        fn as_ref(&self) -> &[u8] {
            &self.0
        }
    }
    if frame.len() < crate::ipc::LARGE_FRAME {
        Bytes::copy_from_slice(&frame)
    } else {
        Bytes::from_owner(Received(frame))
    }
}

impl Kernel {
    pub(super) async fn on_client(
        &mut self,
        channel: Channel,
        frames: tmq::Result<tmq::Multipart>,
    ) {
        let frames = match frames {
            Ok(m) => m.into_iter().map(frame_bytes).collect(),
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
        let msg_type = MsgType::parse(&msg.header.msg_type);
        debug!(channel = channel.name(), msg_type = msg_type.as_str(), msg_id = %msg.header.msg_id, "received");
        let size = msg.size();
        if size > MAX_REQUEST_BYTES {
            warn!(
                channel = channel.name(),
                msg_type = msg_type.as_str(),
                size,
                "refused an oversized message"
            );
            let evalue = format!(
                "{} of {} MiB exceeds the {} MiB limit",
                msg_type.as_str(),
                size >> 20,
                MAX_REQUEST_BYTES >> 20
            );
            self.refuse(channel, &msg, "MessageTooLarge", evalue).await;
            return;
        }
        // Content, metadata and parent header must be JSON objects.
        if let Err(e) = msg.check_json() {
            warn!(channel = channel.name(), msg_id = %msg.header.msg_id, error = %e, "refused a message with invalid JSON");
            self.refuse(channel, &msg, e.ename(), e.to_string()).await;
            return;
        }
        use Channel::{Control, Shell, Stdin};
        match (channel, &msg_type) {
            (Shell | Control, MsgType::KernelInfoRequest) => self.kernel_info(channel, msg).await,
            (Shell | Control, MsgType::ShutdownRequest) => {
                self.shutdown_request(channel, msg).await
            }
            (Control, MsgType::InterruptRequest) => {
                self.interrupt("interrupt_request");
                self.answer(channel, &msg, br#"{"status":"ok"}"#).await;
            }
            (Control, MsgType::KernelvisorInfoRequest) => {
                let content = json!({
                    "status": "ok",
                    "pool": self.pool.describe(Instant::now()),
                    "snapshot": self.snapshot_info(),
                    "sent_ahead": self.sent_ahead,
                });
                self.answer(channel, &msg, content.to_string().as_bytes())
                    .await;
            }
            (Control, MsgType::CreateSubshellRequest) => self.create_subshell(msg).await,
            (Control, MsgType::DeleteSubshellRequest) => self.delete_subshell(msg).await,
            (Control, MsgType::ListSubshellRequest) => self.list_subshells(msg).await,
            (Control, MsgType::DebugRequest) => self.debug_request(msg),
            (Shell, MsgType::ExecuteRequest) => self.execute_request(msg).await,
            (Shell, t) if t.is_aux_request() || t.is_comm() => {
                self.forward(channel, msg, msg_type).await
            }
            (Stdin, MsgType::InputReply) => self.input_reply(msg),
            (_, t) => {
                warn!(
                    channel = channel.name(),
                    msg_type = t.as_str(),
                    "unknown message type"
                );
                let evalue = format!(
                    "kernelvisor does not handle {} on {}",
                    t.as_str(),
                    channel.name()
                );
                self.refuse(channel, &msg, "UnknownMessageType", evalue)
                    .await;
            }
        }
    }

    pub(super) async fn kernel_info(&mut self, channel: Channel, msg: Incoming) {
        let Some(info) = &self.language_info else {
            // No version recorded at install: answer when the first worker says hello.
            self.deferred_kernel_info.push((channel, msg));
            return;
        };
        let content = kernel_info::reply_content(info, self.debug.available);
        self.answer(channel, &msg, &content).await;
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
        self.answer(channel, &msg, reply.to_string().as_bytes())
            .await;
        self.exiting = true;
        self.restarting = restart;
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

    /// An `input_reply` goes to the worker whose cell asked (the main one, or the
    /// borrowed worker of a `# process` cell).
    fn input_reply(&mut self, msg: Incoming) {
        let asking = self
            .pending
            .values()
            .filter(|p| p.awaiting_input)
            .map(|p| p.worker)
            .next()
            .or_else(|| self.pool.main().map(|w| w.id));
        let Some(w) = asking.and_then(|id| self.pool.get(id)) else {
            warn!("input_reply with no worker asking for input");
            return;
        };
        let ctrl = ToWorker::Request {
            id: INPUT_REPLY_ID,
            channel: Channel::Stdin.name(),
            msg_type: MsgType::InputReply.as_str(),
            mode: None,
            thread: None,
            backend: None,
            count: None,
            after: None,
        };
        w.send_aux(request_frames(ctrl.frame(), &msg));
        for p in self.pending.values_mut().filter(|p| p.worker == w.id) {
            p.awaiting_input = false;
        }
    }

    /// Hands a request the worker answers (introspection, comms, debug) to the main
    /// worker: comm messages on `main` (in order with cells), the rest on `aux`. Without a
    /// main worker it waits for one.
    pub(super) async fn forward(&mut self, channel: Channel, msg: Incoming, msg_type: MsgType) {
        let Some(wid) = self.pool.main().map(|w| w.id) else {
            if let Some(why) = self.start_failure.clone() {
                self.refuse(channel, &msg, "WorkerStartFailed", why).await;
                return;
            }
            self.waiting_for_worker.push_back((channel, msg));
            return;
        };
        let id = self.register(channel, &msg, wid, None);
        self.publish_status(&msg.header_bytes, "busy");
        let ctrl = ToWorker::Request {
            id,
            channel: channel.name(),
            msg_type: msg_type.as_str(),
            mode: None,
            thread: None,
            backend: None,
            count: None,
            after: None,
        };
        let frames = request_frames(ctrl.frame(), &msg);
        if let Some(w) = self.pool.main_mut() {
            if msg_type.is_comm() {
                w.snapshots.touch();
                w.send_main(frames);
            } else {
                w.send_aux(frames);
            }
        }
    }
}
