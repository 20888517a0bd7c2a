//! The Jupyter wire format (messaging protocol 5.x): identities, `<IDS|MSG>`, signature,
//! four JSON frames, then binary buffers.
//!
//! Incoming JSON frames are kept as the bytes the client sent: only the header is parsed
//! (the supervisor routes on it); content passes through to the worker untouched.

use bytes::Bytes;
use serde::Deserialize;

use crate::signer::Signer;

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
    if !signer.verify(&signature, [&header, &parent, &metadata, &content]) {
        return Err(WireError::BadSignature);
    }
    Ok(Incoming {
        identities: frames,
        header: serde_json::from_slice(&header)?,
        header_bytes: header,
        parent_header: parent,
        metadata,
        content,
        buffers,
    })
}

/// Lays out and signs an outgoing message. `prefix` is the routing identities (ROUTER)
/// or the topic (iopub).
pub fn serialize(
    signer: &Signer,
    prefix: &[Bytes],
    json: [&[u8]; 4],
    buffers: &[Bytes],
) -> Vec<Vec<u8>> {
    let signature = signer.sign(json);
    let mut out = Vec::with_capacity(prefix.len() + 6 + buffers.len());
    out.extend(prefix.iter().map(|p| p.to_vec()));
    out.push(DELIMITER.to_vec());
    out.push(signature.into_bytes());
    out.extend(json.iter().map(|j| j.to_vec()));
    out.extend(buffers.iter().map(|b| b.to_vec()));
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
    fn empty_key_accepts_unsigned() {
        let signer = Signer::new(b"");
        let msg = parse(sample(&signer), &signer).unwrap();
        assert_eq!(msg.header.msg_id, "m1");
    }
}
