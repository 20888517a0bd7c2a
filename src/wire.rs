//! The Jupyter wire format (messaging protocol 5.x): identities, `<IDS|MSG>`, signature,
//! four JSON frames, then binary buffers.
//!
//! Incoming JSON frames are kept as the bytes the client sent: only the header is parsed
//! (the supervisor routes on it); content passes through to the worker untouched, once
//! [`Incoming::check_json`] has checked that it is a JSON object.

use std::fmt;

use bytes::Bytes;
use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer};

use crate::signer::{SignatureError, Signer};

/// The frame that separates routing identities from the message.
pub const DELIMITER: &[u8] = b"<IDS|MSG>";

/// Why an incoming multipart message was refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// No `<IDS|MSG>` frame.
    #[error("no <IDS|MSG> delimiter")]
    NoDelimiter,
    /// Fewer than the five frames (signature + four JSON) after the delimiter.
    #[error("{0} frames after the delimiter, expected at least 5")]
    TooFewFrames(usize),
    /// The HMAC signature does not match.
    #[error("invalid signature")]
    BadSignature,
    /// A valid signature seen before: the same message sent again.
    #[error("replayed message: its signature was accepted before")]
    Replayed,
    /// The header is not the JSON object the protocol requires.
    #[error("malformed header: {0}")]
    BadHeader(#[from] serde_json::Error),
}

/// The header fields the supervisor routes on.
#[derive(Debug, Clone, Deserialize)]
pub struct Header {
    /// Unique id of the message.
    pub msg_id: String,
    /// E.g. `execute_request`.
    pub msg_type: String,
    /// ISO 8601 creation time, when the client sets it (see [`lenient_date`]).
    #[serde(default, deserialize_with = "lenient_date")]
    pub date: Option<String>,
    /// The subshell (JEP 91) the request is for; `None`: the main shell.
    #[serde(default)]
    pub subshell_id: Option<String>,
}

/// `date` as clients send it: the protocol's ISO 8601 string, or anything else as unknown.
/// jupyter_server's gateway client (behind Kernel Gateway) sends a float timestamp, which
/// ipykernel accepts too; refusing the whole message for it would make the kernel deaf there.
fn lenient_date<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::String(date) => Some(date),
        _ => None,
    })
}

/// A verified message from a client.
#[derive(Debug, Clone)]
pub struct Incoming {
    /// ROUTER identities, to address the reply.
    pub identities: Vec<Bytes>,
    /// Parsed view of `header_bytes`.
    pub header: Header,
    /// The header exactly as sent: it becomes the parent header of everything in reply.
    pub header_bytes: Bytes,
    /// Parent header as sent.
    pub parent_header: Bytes,
    /// Metadata as sent.
    pub metadata: Bytes,
    /// Content as sent.
    pub content: Bytes,
    /// Binary buffers.
    pub buffers: Vec<Bytes>,
    /// When it was parsed ([`crate::timings::now`]: 0 unless timings are on).
    pub received: u64,
}

/// Splits, verifies and parses a multipart message.
pub fn parse(mut frames: Vec<Bytes>, signer: &Signer) -> Result<Incoming, WireError> {
    let split = frames
        .iter()
        .position(|f| f.as_ref() == DELIMITER)
        .ok_or(WireError::NoDelimiter)?;
    let after = frames.len() - split - 1;
    if after < 5 {
        return Err(WireError::TooFewFrames(after));
    }
    let mut rest = frames.split_off(split + 1);
    frames.truncate(split);
    let buffers = rest.split_off(5);
    let [signature, header, parent, metadata, content]: [Bytes; 5] =
        rest.try_into().expect("exactly five frames");
    // Nothing unauthenticated is parsed.
    match signer.accept(&signature, [&header, &parent, &metadata, &content]) {
        Ok(()) => {}
        Err(SignatureError::Invalid) => return Err(WireError::BadSignature),
        Err(SignatureError::Replayed) => return Err(WireError::Replayed),
    }
    Ok(Incoming {
        identities: frames,
        header: serde_json::from_slice(&header)?,
        header_bytes: header,
        parent_header: parent,
        metadata,
        content,
        buffers,
        received: crate::timings::now(),
    })
}

impl Incoming {
    /// Bytes of all its frames after the signature (what a worker would be handed).
    pub fn size(&self) -> usize {
        [
            &self.header_bytes,
            &self.parent_header,
            &self.metadata,
            &self.content,
        ]
        .into_iter()
        .chain(&self.buffers)
        .map(Bytes::len)
        .sum()
    }

    /// Checks that the parent header, metadata and content are JSON objects, as the
    /// protocol requires (the header already is one).
    pub fn check_json(&self) -> Result<(), InvalidJson> {
        for (frame, bytes) in [
            ("content", &self.content),
            ("metadata", &self.metadata),
            ("parent header", &self.parent_header),
        ] {
            if let Err(e) = serde_json::from_slice::<AnObject>(bytes) {
                return Err(InvalidJson {
                    frame,
                    msg_type: self.header.msg_type.clone(),
                    why: e.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// A JSON frame of a message that is not a JSON object.
#[derive(Debug, thiserror::Error)]
#[error("the {frame} of this {msg_type} is not a JSON object: {why}")]
pub struct InvalidJson {
    /// Which frame: `content`, `metadata` or `parent header`.
    pub frame: &'static str,
    /// The message's type.
    pub msg_type: String,
    /// What the JSON parser said.
    pub why: String,
}

impl InvalidJson {
    /// The `ename` of the error reply.
    pub fn ename(&self) -> &'static str {
        match self.frame {
            "content" => "InvalidContent",
            _ => "InvalidMessage",
        }
    }
}

/// Deserializes from any JSON object, and from nothing else, without keeping anything.
struct AnObject;

impl<'de> Deserialize<'de> for AnObject {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor;
        impl<'de> Visitor<'de> for ObjectVisitor {
            type Value = AnObject;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<AnObject, A::Error> {
                while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
                Ok(AnObject)
            }
        }
        d.deserialize_map(ObjectVisitor)
    }
}

/// A frame of an outgoing message: borrowed (copied into the message) or shared (moved in:
/// a large frame that nothing else holds, as the worker IPC reader makes them, becomes the
/// message's frame without a copy; see [`crate::ipc::owned`]).
#[derive(Debug, Clone)]
pub enum Part<'a> {
    /// Copied.
    Slice(&'a [u8]),
    /// Moved in.
    Shared(Bytes),
    /// Moved in (made here, e.g. a header).
    Owned(Vec<u8>),
}

impl Part<'_> {
    /// The frame's bytes.
    pub fn bytes(&self) -> &[u8] {
        match self {
            Part::Slice(s) => s,
            Part::Shared(b) => b,
            Part::Owned(v) => v,
        }
    }

    /// The frame as ZeroMQ takes it (`zmq::Message::from(Vec<u8>)` keeps the allocation).
    fn into_vec(self) -> Vec<u8> {
        match self {
            Part::Slice(s) => s.to_vec(),
            Part::Shared(b) => crate::ipc::owned(b),
            Part::Owned(v) => v,
        }
    }
}

impl<'a> From<&'a [u8]> for Part<'a> {
    fn from(s: &'a [u8]) -> Self {
        Part::Slice(s)
    }
}

impl From<Bytes> for Part<'_> {
    fn from(b: Bytes) -> Self {
        Part::Shared(b)
    }
}

/// Lays out and signs an outgoing message. `prefix` is the routing identities (ROUTER)
/// or the topic (iopub).
pub fn serialize(
    signer: &Signer,
    prefix: &[Bytes],
    json: [&[u8]; 4],
    buffers: &[Bytes],
) -> Vec<Vec<u8>> {
    serialize_parts(
        signer,
        prefix,
        json.map(Part::Slice),
        buffers.iter().map(|b| Part::Slice(b)),
    )
}

/// [`serialize`] from parts that may be moved into the message rather than copied.
pub fn serialize_parts<'a>(
    signer: &Signer,
    prefix: &[Bytes],
    json: [Part<'a>; 4],
    buffers: impl IntoIterator<Item = Part<'a>>,
) -> Vec<Vec<u8>> {
    let signature = signer.sign([
        json[0].bytes(),
        json[1].bytes(),
        json[2].bytes(),
        json[3].bytes(),
    ]);
    let buffers = buffers.into_iter();
    let mut out = Vec::with_capacity(prefix.len() + 6 + buffers.size_hint().0);
    out.extend(prefix.iter().map(|p| p.to_vec()));
    out.push(DELIMITER.to_vec());
    out.push(signature.into_bytes());
    out.extend(json.into_iter().map(Part::into_vec));
    out.extend(buffers.map(Part::into_vec));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    fn sample(signer: &Signer) -> Vec<Bytes> {
        let header = r#"{"msg_id":"m1","msg_type":"execute_request","session":"s","username":"u","date":"2026-11-25T12:00:00Z","version":"5.4"}"#;
        serialize(
            signer,
            &[b("client-id")],
            [header.as_bytes(), b"{}", b"{}", br#"{"code":"1+1"}"#],
            &[Bytes::from_static(&[0, 159, 255])],
        )
        .into_iter()
        .map(Bytes::from)
        .collect()
    }

    #[test]
    fn a_date_that_is_not_a_string_is_unknown() {
        let h: Header =
            serde_json::from_str(r#"{"msg_id":"m","msg_type":"t","date":1796575553.4}"#).unwrap();
        assert_eq!(h.date, None);
        let h: Header =
            serde_json::from_str(r#"{"msg_id":"m","msg_type":"t","date":"2026-11-25T12:00:00Z"}"#)
                .unwrap();
        assert_eq!(h.date.as_deref(), Some("2026-11-25T12:00:00Z"));
        let h: Header = serde_json::from_str(r#"{"msg_id":"m","msg_type":"t"}"#).unwrap();
        assert_eq!(h.date, None);
    }

    #[test]
    fn round_trip_with_buffers() {
        let signer = Signer::new(b"k");
        let msg = parse(sample(&signer), &signer).unwrap();
        assert_eq!(msg.identities, vec![b("client-id")]);
        assert_eq!(msg.header.msg_type, "execute_request");
        assert_eq!(msg.header.msg_id, "m1");
        assert_eq!(msg.header.subshell_id, None);
        assert_eq!(msg.content.as_ref(), br#"{"code":"1+1"}"#);
        assert_eq!(msg.buffers, vec![Bytes::from_static(&[0, 159, 255])]);
    }

    #[test]
    fn buffers_are_not_signed() {
        // jupyter_client signs only the four JSON frames; changing a buffer keeps it valid.
        let signer = Signer::new(b"k");
        let mut frames = sample(&signer);
        *frames.last_mut().unwrap() = b("other buffer");
        assert!(parse(frames, &signer).is_ok());
    }

    #[test]
    fn rejects_wrong_signature_and_tampering() {
        let frames = sample(&Signer::new(b"k"));
        assert!(matches!(
            parse(frames.clone(), &Signer::new(b"other")),
            Err(WireError::BadSignature)
        ));
        let mut tampered = frames;
        tampered[6] = b(r#"{"code":"evil()"}"#);
        assert!(matches!(
            parse(tampered, &Signer::new(b"k")),
            Err(WireError::BadSignature)
        ));
    }

    #[test]
    fn rejects_malformed_frames() {
        let signer = Signer::new(b"");
        assert!(matches!(
            parse(vec![b("id"), b("{}")], &signer),
            Err(WireError::NoDelimiter)
        ));
        let short = vec![
            b("id"),
            Bytes::from_static(DELIMITER),
            b(""),
            b("{}"),
            b("{}"),
        ];
        assert!(matches!(
            parse(short, &signer),
            Err(WireError::TooFewFrames(3))
        ));
        let bad_json = vec![
            Bytes::from_static(DELIMITER),
            b(""),
            b("{not json"),
            b("{}"),
            b("{}"),
            b("{}"),
        ];
        assert!(matches!(
            parse(bad_json, &signer),
            Err(WireError::BadHeader(_))
        ));
        let missing_type = vec![
            Bytes::from_static(DELIMITER),
            b(""),
            b(r#"{"msg_id":"x"}"#),
            b("{}"),
            b("{}"),
            b("{}"),
        ];
        assert!(parse(missing_type, &signer).is_err());
    }

    #[test]
    fn a_replay_is_refused() {
        let signer = Signer::new(b"k");
        let frames = sample(&signer);
        assert!(parse(frames.clone(), &signer).is_ok());
        assert!(matches!(
            parse(frames.clone(), &signer),
            Err(WireError::Replayed)
        ));
        // Other identities (another socket) make no difference: the signed frames are the same.
        let mut other = frames;
        other[0] = b("another-client");
        assert!(matches!(parse(other, &signer), Err(WireError::Replayed)));
    }

    fn with_content(content: &str, metadata: &str, parent: &str) -> Incoming {
        let signer = Signer::new(b"");
        let header = r#"{"msg_id":"m","msg_type":"execute_request"}"#;
        let frames = serialize(
            &signer,
            &[],
            [
                header.as_bytes(),
                parent.as_bytes(),
                metadata.as_bytes(),
                content.as_bytes(),
            ],
            &[Bytes::from_static(b"buffer")],
        );
        parse(frames.into_iter().map(Bytes::from).collect(), &signer).unwrap()
    }

    #[test]
    fn json_frames_must_be_objects() {
        let ok = with_content(r#"{"code": "1", "nested": {"a": [1, 2]}}"#, "{}", " {} ");
        ok.check_json().unwrap();
        for (content, found) in [
            ("[1, 2]", "sequence"),
            ("3", "integer"),
            ("\"text\"", "string"),
            ("null", "null"),
            ("{not json", "key must be a string"),
            ("{\"a\": 1} trailing", "trailing characters"),
            ("{\"a\": 1", "EOF"),
            ("", "EOF"),
        ] {
            let e = with_content(content, "{}", "{}").check_json().unwrap_err();
            assert_eq!(e.frame, "content");
            assert_eq!(e.ename(), "InvalidContent");
            let text = e.to_string();
            assert!(text.contains(found), "{content:?}: {text}");
            assert!(
                text.contains("execute_request is not a JSON object"),
                "{text}"
            );
        }
        let e = with_content("{}", "[]", "{}").check_json().unwrap_err();
        assert_eq!((e.frame, e.ename()), ("metadata", "InvalidMessage"));
        let e = with_content("{}", "{}", "7").check_json().unwrap_err();
        assert_eq!(e.frame, "parent header");
    }

    #[test]
    fn size_counts_every_frame() {
        let msg = with_content(r#"{"code":"1"}"#, r#"{"m":1}"#, r#"{"p":2}"#);
        let header = msg.header_bytes.len();
        assert_eq!(msg.size(), header + 12 + 7 + 7 + 6);
    }

    #[test]
    fn empty_key_accepts_unsigned() {
        let signer = Signer::new(b"");
        let msg = parse(sample(&signer), &signer).unwrap();
        assert_eq!(msg.header.msg_id, "m1");
    }
}
