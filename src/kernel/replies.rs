//! Replies the supervisor makes itself, built in one place as children of their request
//! (the reply's type derived from the request's, its parent header the request's header),
//! wrapped in busy/idle; and the sends to client sockets.

use futures::SinkExt;
use serde_json::json;
use tracing::warn;

use super::*;
use crate::msg_type::MsgType;
use crate::wire::Part;

impl Kernel {
    /// Answers a request with an error reply; messages that have no reply get only the
    /// log line their caller wrote.
    pub(super) async fn refuse(
        &mut self,
        channel: Channel,
        msg: &Incoming,
        ename: &str,
        evalue: String,
    ) {
        let reply = json!({"status": "error", "ename": ename, "evalue": evalue, "traceback": []});
        self.answer_with(
            channel,
            msg,
            br#"{"status":"error"}"#,
            reply.to_string().as_bytes(),
        )
        .await;
    }

    /// Sends a reply the supervisor made itself, wrapped in busy/idle.
    pub(super) async fn answer(&mut self, channel: Channel, msg: &Incoming, content: &[u8]) {
        self.answer_with(channel, msg, b"{}", content).await;
    }

    /// [`Self::answer`], with reply metadata. Nothing is sent for a message that has no
    /// reply type.
    pub(super) async fn answer_with(
        &mut self,
        channel: Channel,
        msg: &Incoming,
        metadata: &[u8],
        content: &[u8],
    ) {
        let Some(reply_type) = MsgType::parse(&msg.header.msg_type).reply_type() else {
            return;
        };
        self.publish_status(&msg.header_bytes, "busy");
        let frames = self.outbox.to_peer(
            &msg.identities,
            &reply_type,
            &msg.header_bytes,
            metadata,
            content,
            &[],
        );
        self.send(channel, frames).await;
        self.publish_status(&msg.header_bytes, "idle");
    }

    /// Sends a reply to a request handed to a worker (`p`), as its child: the reply type
    /// is derived from the request's, whatever the worker says.
    pub(super) async fn reply_to(
        &mut self,
        p: &Pending,
        metadata: &[u8],
        content: &[u8],
        buffers: &[Bytes],
    ) {
        let buffers = buffers.iter().map(|b| Part::Slice(b));
        self.reply_to_parts((0, p), [metadata.into(), content.into()], buffers)
            .await;
    }

    /// [`Self::reply_to`] with the worker's own frames, moved in (large ones reach ZeroMQ
    /// without a copy).
    pub(super) async fn reply_to_parts<'a>(
        &mut self,
        (id, p): (u64, &Pending),
        [metadata, content]: [Part<'a>; 2],
        buffers: impl IntoIterator<Item = Part<'a>>,
    ) {
        let heard = crate::timings::now();
        if let Some(reply_type) = p.msg_type.reply_type() {
            let frames = self.outbox.to_peer_parts(
                &p.identities,
                &reply_type,
                [Part::Shared(p.header.clone()), metadata, content],
                buffers,
            );
            self.send(p.channel, frames).await;
        }
        self.publish_status(&p.header, "idle");
        if heard != 0 {
            crate::timings::record("reply", &[&id, &heard, &crate::timings::now()]);
        }
    }

    pub(super) async fn send(&mut self, channel: Channel, frames: Vec<Vec<u8>>) {
        let socket = match channel {
            Channel::Shell => &mut self.shell,
            Channel::Control => &mut self.control,
            Channel::Stdin => &mut self.stdin,
        };
        if let Err(e) = socket.send(tmq::Multipart::from(frames)).await {
            warn!(channel = channel.name(), error = %e, "send failed");
        }
    }

    pub(super) fn publish_status(&self, parent: &[u8], state: &str) {
        self.iopub.send(self.outbox.status(parent, state));
    }

    /// Publishes a `stream` message under `parent`.
    pub(super) fn publish_stream(&self, parent: &[u8], name: &str, text: &str) {
        let content = json!({"name": name, "text": text});
        let msg = self
            .outbox
            .iopub("stream", parent, b"{}", content.to_string().as_bytes(), &[]);
        self.iopub.send(msg);
    }

    /// Answers execute requests with `status: aborted`, as ipykernel does to the requests
    /// queued behind an error (with `stop_on_error`).
    pub(super) async fn abort(&mut self, queued: Vec<Queued>) {
        for Queued { msg, .. } in queued {
            tracing::debug!(msg_id = %msg.header.msg_id, "aborting queued execute");
            self.answer_with(
                Channel::Shell,
                &msg,
                br#"{"status":"aborted"}"#,
                br#"{"status":"aborted","execution_count":null}"#,
            )
            .await;
        }
    }
}
