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

    /// A header for a new message of `msg_type` (a protocol identifier: no escaping needed).
    pub fn make(&self, msg_type: &str) -> Vec<u8> {
        debug_assert!(msg_type
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_'));
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let date = chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ");
        format!(
            r#"{{"msg_id":"{s}_{n}","msg_type":"{msg_type}","session":"{s}","username":{u},"date":"{date}","version":"{PROTOCOL_VERSION}"}}"#,
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
}
