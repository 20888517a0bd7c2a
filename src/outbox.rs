//! Builds and signs the messages the kernel sends: replies, IOPub messages, statuses.

use bytes::Bytes;

use crate::header::HeaderFactory;
use crate::signer::Signer;
use crate::wire::{self, Part};

/// Everything needed to turn content into a signed multipart message.
#[derive(Debug)]
pub struct Outbox {
    signer: Signer,
    headers: HeaderFactory,
}

impl Outbox {
    /// An outbox signing with `signer`, for a new session.
    pub fn new(signer: Signer, username: &str) -> Self {
        Outbox {
            signer,
            headers: HeaderFactory::new(username),
        }
    }

    /// The signer, to verify incoming messages with the same key.
    pub fn signer(&self) -> &Signer {
        &self.signer
    }

    /// A message to the peers `identities` (a reply, or an `input_request`).
    pub fn to_peer(
        &self,
        identities: &[Bytes],
        msg_type: &str,
        parent: &[u8],
        metadata: &[u8],
        content: &[u8],
        buffers: &[Bytes],
    ) -> Vec<Vec<u8>> {
        let header = self.headers.make(msg_type);
        wire::serialize(
            &self.signer,
            identities,
            [&header, parent, metadata, content],
            buffers,
        )
    }

    /// [`Self::to_peer`] from parts that may be moved in rather than copied (a worker's
    /// frames: large ones reach ZeroMQ without a copy).
    pub fn to_peer_parts<'a>(
        &self,
        identities: &[Bytes],
        msg_type: &str,
        [parent, metadata, content]: [Part<'a>; 3],
        buffers: impl IntoIterator<Item = Part<'a>>,
    ) -> Vec<Vec<u8>> {
        let header = self.headers.make(msg_type);
        wire::serialize_parts(
            &self.signer,
            identities,
            [Part::Owned(header), parent, metadata, content],
            buffers,
        )
    }

    /// [`Self::iopub`] from parts that may be moved in rather than copied.
    pub fn iopub_parts<'a>(
        &self,
        msg_type: &str,
        json: [Part<'a>; 3],
        buffers: impl IntoIterator<Item = Part<'a>>,
    ) -> Vec<Vec<u8>> {
        let topic = Bytes::from(format!("kernel.{}.{msg_type}", self.headers.session()));
        self.to_peer_parts(&[topic], msg_type, json, buffers)
    }

    /// An IOPub message, under the topic `kernel.<session>.<msg_type>`.
    pub fn iopub(
        &self,
        msg_type: &str,
        parent: &[u8],
        metadata: &[u8],
        content: &[u8],
        buffers: &[Bytes],
    ) -> Vec<Vec<u8>> {
        let topic = Bytes::from(format!("kernel.{}.{msg_type}", self.headers.session()));
        self.to_peer(&[topic], msg_type, parent, metadata, content, buffers)
    }

    /// A `status` message (`busy`, `idle`, `starting`).
    pub fn status(&self, parent: &[u8], state: &str) -> Vec<Vec<u8>> {
        let content = format!(r#"{{"execution_state":"{state}"}}"#);
        self.iopub("status", parent, b"{}", content.as_bytes(), &[])
    }

    /// The `iopub_welcome` (JEP 65) for a new subscription, sent under its own topic so
    /// that the subscriber receives it.
    pub fn welcome(&self, subscription: &[u8]) -> Vec<Vec<u8>> {
        let content = serde_json::json!({
            "subscription": String::from_utf8_lossy(subscription),
        });
        let header = self.headers.make("iopub_welcome");
        let content = content.to_string();
        wire::serialize(
            &self.signer,
            &[Bytes::copy_from_slice(subscription)],
            [&header, b"{}", b"{}", content.as_bytes()],
            &[],
        )
    }
}
