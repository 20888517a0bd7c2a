//! Headers of the messages the kernel sends: a fresh `msg_id` for every message
//! (jupyter_client drops replayed signatures), the kernel's session, and the time.

use std::sync::atomic::{AtomicU64, Ordering};

/// The protocol version the kernel speaks.
pub const PROTOCOL_VERSION: &str = "5.4";

/// Builds header JSON for outgoing messages.
#[derive(Debug)]
pub struct HeaderFactory {
    session: String,
    /// The username, already JSON-encoded (with quotes).
    username_json: String,
    counter: AtomicU64,
}

impl HeaderFactory {
    /// A factory for a new kernel session.
    pub fn new(username: &str) -> Self {
        HeaderFactory {
            session: uuid::Uuid::new_v4().simple().to_string(),
            username_json: serde_json::to_string(username).expect("a string encodes"),
            counter: AtomicU64::new(0),
        }
    }

    /// The kernel's session id.
    pub fn session(&self) -> &str {
        &self.session
    }

    /// A header for a new message of `msg_type`. The type is JSON-escaped: a reply's type
    /// is derived from the client's request type, which may hold any character.
    pub fn make(&self, msg_type: &str) -> Vec<u8> {
        let msg_type = serde_json::to_string(msg_type).expect("a string encodes");
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let date = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ");
        format!(
            r#"{{"msg_id":"{s}_{n}","msg_type":{msg_type},"session":"{s}","username":{u},"date":"{date}","version":"{PROTOCOL_VERSION}"}}"#,
            s = self.session,
            u = self.username_json,
        )
        .into_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_are_valid_json_with_fresh_ids() {
        let f = HeaderFactory::new("user \"q\"");
        let a: serde_json::Value = serde_json::from_slice(&f.make("status")).unwrap();
        let b: serde_json::Value = serde_json::from_slice(&f.make("status")).unwrap();
        assert_ne!(a["msg_id"], b["msg_id"]);
        assert_eq!(a["msg_type"], "status");
        assert_eq!(a["username"], "user \"q\"");
        assert_eq!(a["version"], PROTOCOL_VERSION);
        assert_eq!(a["session"], f.session());
        chrono::DateTime::parse_from_rfc3339(a["date"].as_str().unwrap()).unwrap();
    }

    #[test]
    fn any_msg_type_is_escaped() {
        // A reply to a client's `bad"type_request` is a `bad"type_reply`.
        let f = HeaderFactory::new("u");
        for t in [
            "bad\"type_reply",
            "back\\slash",
            "new\nline",
            "\u{0}nul",
            "é_reply",
        ] {
            let h: serde_json::Value = serde_json::from_slice(&f.make(t))
                .unwrap_or_else(|e| panic!("header for {t:?} is not JSON: {e}"));
            assert_eq!(h["msg_type"], t);
        }
    }
}
