//! The Jupyter connection file: where to bind the five sockets, and the signing key.

use std::path::Path;

use anyhow::{bail, Context};
use serde::Deserialize;

/// The parsed contents of a connection file (as written by jupyter_client).
#[derive(Debug, Clone, Deserialize)]
pub struct ConnectionInfo {
    /// `tcp` or `ipc`.
    #[serde(default = "default_transport")]
    pub transport: String,
    /// The address to bind: an IP (tcp) or a path prefix (ipc).
    #[serde(default = "default_ip")]
    pub ip: String,
    /// Port (tcp) or path suffix (ipc) of each channel.
    pub shell_port: u16,
    /// See `shell_port`.
    pub iopub_port: u16,
    /// See `shell_port`.
    pub stdin_port: u16,
    /// See `shell_port`.
    pub control_port: u16,
    /// See `shell_port`.
    pub hb_port: u16,
    /// The HMAC key; empty disables signing.
    #[serde(default)]
    pub key: String,
    /// Only `hmac-sha256` is supported (and the empty scheme with an empty key).
    #[serde(default = "default_scheme")]
    pub signature_scheme: String,
}

fn default_transport() -> String {
    "tcp".into()
}
fn default_ip() -> String {
    "127.0.0.1".into()
}
fn default_scheme() -> String {
    "hmac-sha256".into()
}

impl ConnectionInfo {
    /// Reads and validates a connection file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read connection file {}", path.display()))?;
        Self::parse(&text).with_context(|| format!("invalid connection file {}", path.display()))
    }

    /// Parses and validates the JSON text of a connection file.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let info: ConnectionInfo = serde_json::from_str(text)?;
        match info.transport.as_str() {
            "tcp" | "ipc" => {}
            other => bail!("unsupported transport {other:?} (expected \"tcp\" or \"ipc\")"),
        }
        if info.ip.is_empty() {
            bail!("\"ip\" is empty");
        }
        if !info.key.is_empty() && info.signature_scheme != "hmac-sha256" {
            bail!(
                "unsupported signature_scheme {:?} (only \"hmac-sha256\")",
                info.signature_scheme
            );
        }
        Ok(info)
    }

    /// The ZeroMQ endpoint for a port, as jupyter_client spells it:
    /// `tcp://IP:PORT`, or `ipc://IP-PORT` for the ipc transport.
    pub fn endpoint(&self, port: u16) -> String {
        match self.transport.as_str() {
            "ipc" => format!("ipc://{}-{}", self.ip, port),
            _ if self.ip.contains(':') && !self.ip.starts_with('[') => {
                format!("tcp://[{}]:{}", self.ip, port)
            }
            _ => format!("tcp://{}:{}", self.ip, port),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"{"shell_port": 5001, "iopub_port": 5002, "stdin_port": 5003,
        "control_port": 5004, "hb_port": 5005, "ip": "0.0.0.0", "key": "abc",
        "transport": "tcp", "signature_scheme": "hmac-sha256", "kernel_name": "x"}"#;

    #[test]
    fn parses_a_jupyter_client_file() {
        let info = ConnectionInfo::parse(SAMPLE).unwrap();
        assert_eq!(info.shell_port, 5001);
        assert_eq!(info.key, "abc");
        assert_eq!(info.endpoint(info.hb_port), "tcp://0.0.0.0:5005");
    }

    #[test]
    fn ipc_and_ipv6_endpoints() {
        let mut info = ConnectionInfo::parse(SAMPLE).unwrap();
        info.ip = "::1".into();
        assert_eq!(info.endpoint(1), "tcp://[::1]:1");
        info.transport = "ipc".into();
        info.ip = "/tmp/kernel".into();
        assert_eq!(info.endpoint(3), "ipc:///tmp/kernel-3");
    }

    #[test]
    fn rejects_bad_files() {
        assert!(ConnectionInfo::parse("not json").is_err());
        assert!(ConnectionInfo::parse("{}").is_err(), "ports are required");
        let bad = SAMPLE.replace("\"tcp\"", "\"udp\"");
        assert!(ConnectionInfo::parse(&bad).is_err());
        let bad = SAMPLE.replace("hmac-sha256", "hmac-md5");
        assert!(ConnectionInfo::parse(&bad).is_err());
        let bad = SAMPLE.replace("5001", "70000");
        assert!(ConnectionInfo::parse(&bad).is_err(), "port out of range");
        assert!(ConnectionInfo::load(Path::new("/nonexistent/kv.json")).is_err());
    }
}
