//! The Jupyter connection file: where to bind the five sockets, and the signing key; the
//! ports the system chose for port 0, written back.

use std::io::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use serde::Deserialize;

use crate::curve::CurveKeys;

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
    /// CurveZMQ server public key (Z85), with `curve_secretkey`: all five sockets are
    /// then CURVE servers.
    #[serde(default)]
    curve_publickey: Option<String>,
    /// CurveZMQ server secret key (Z85).
    #[serde(default)]
    curve_secretkey: Option<String>,
    /// The CURVE keys, when the file has them.
    #[serde(skip)]
    pub curve: Option<CurveKeys>,
    /// The file it was read from (where chosen ports are written back).
    #[serde(skip)]
    pub file: Option<PathBuf>,
}

/// The five ports (tcp) or path suffixes (ipc); 0 lets the kernel choose.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ports {
    /// `shell_port`.
    pub shell: u16,
    /// `iopub_port`.
    pub iopub: u16,
    /// `stdin_port`.
    pub stdin: u16,
    /// `control_port`.
    pub control: u16,
    /// `hb_port`.
    pub hb: u16,
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
        let mut info = Self::parse(&text)
            .with_context(|| format!("invalid connection file {}", path.display()))?;
        info.file = Some(path.to_path_buf());
        Ok(info)
    }

    /// Parses and validates the JSON text of a connection file.
    pub fn parse(text: &str) -> anyhow::Result<Self> {
        let mut info: ConnectionInfo = serde_json::from_str(text)?;
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
        info.curve = match (info.curve_publickey.take(), info.curve_secretkey.take()) {
            (None, None) => None,
            (Some(public), Some(secret)) => Some(CurveKeys::from_z85(&public, &secret)?),
            _ => bail!("\"curve_publickey\" and \"curve_secretkey\" come together (CurveZMQ)"),
        };
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

    /// The ports as the file gives them.
    pub fn ports(&self) -> Ports {
        Ports {
            shell: self.shell_port,
            iopub: self.iopub_port,
            stdin: self.stdin_port,
            control: self.control_port,
            hb: self.hb_port,
        }
    }

    /// Writes the ports actually bound into the connection file, keeping its other fields,
    /// when they differ from the file's (it asked for port 0), as ipykernel does: clients
    /// learn the ports there. The file is replaced atomically, readable by its owner only.
    pub fn write_back(&self, bound: Ports) -> anyhow::Result<()> {
        if bound == self.ports() {
            return Ok(());
        }
        let Some(path) = &self.file else {
            return Ok(());
        };
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read connection file {}", path.display()))?;
        let mut fields: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&text)
            .with_context(|| format!("invalid connection file {}", path.display()))?;
        for (key, port) in [
            ("shell_port", bound.shell),
            ("iopub_port", bound.iopub),
            ("stdin_port", bound.stdin),
            ("control_port", bound.control),
            ("hb_port", bound.hb),
        ] {
            fields.insert(key.into(), port.into());
        }
        let mut json = serde_json::to_vec_pretty(&fields).expect("a JSON map encodes");
        json.push(b'\n');
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        let write = || -> std::io::Result<()> {
            // A temp file (mode 0600) in the same directory, renamed over the original.
            let mut tmp = tempfile::NamedTempFile::new_in(dir.unwrap_or(Path::new(".")))?;
            tmp.write_all(&json)?;
            tmp.as_file().sync_all()?;
            tmp.persist(path).map_err(|e| e.error)?;
            Ok(())
        };
        write().with_context(|| {
            format!(
                "cannot write the chosen ports into connection file {}",
                path.display()
            )
        })
    }

    /// What to bind for `port`: port 0 becomes a port the system chooses (tcp), or the
    /// first free path `IP-N` (ipc, N from 1), as ipykernel does.
    pub fn bind_endpoint(&self, port: u16) -> (String, u16) {
        if port != 0 || self.transport != "ipc" {
            return (self.endpoint(port), port);
        }
        let free = (1..=u16::MAX)
            .find(|n| !Path::new(&format!("{}-{n}", self.ip)).exists())
            .unwrap_or(u16::MAX);
        (self.endpoint(free), free)
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

    #[test]
    fn curve_keys() {
        assert_eq!(ConnectionInfo::parse(SAMPLE).unwrap().curve, None);
        let pair = zmq::CurveKeyPair::new().unwrap();
        let public = zmq::z85_encode(&pair.public_key).unwrap();
        let secret = zmq::z85_encode(&pair.secret_key).unwrap();
        let with = |fields: &str| SAMPLE.replace("\"key\"", &format!("{fields}, \"key\""));
        let both = with(&format!(
            r#""curve_publickey": "{public}", "curve_secretkey": "{secret}""#
        ));
        let info = ConnectionInfo::parse(&both).unwrap();
        assert_eq!(
            info.curve,
            Some(CurveKeys::from_z85(&public, &secret).unwrap())
        );
        let one = with(&format!(r#""curve_publickey": "{public}""#));
        assert!(ConnectionInfo::parse(&one).is_err());
        let bad = with(r#""curve_publickey": "x", "curve_secretkey": "y""#);
        assert!(ConnectionInfo::parse(&bad).is_err());
    }

    #[test]
    fn chosen_ports_are_written_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("kernel.json");
        std::fs::write(&path, SAMPLE.replace("5002", "0")).unwrap();
        let info = ConnectionInfo::load(&path).unwrap();
        assert_eq!(info.ports().iopub, 0);
        info.write_back(info.ports()).unwrap();
        assert_eq!(
            std::fs::read_to_string(&path).unwrap(),
            SAMPLE.replace("5002", "0")
        );
        let bound = Ports {
            iopub: 40000,
            ..info.ports()
        };
        info.write_back(bound).unwrap();
        let again = ConnectionInfo::load(&path).unwrap();
        assert_eq!(again.ports(), bound);
        assert_eq!(again.key, "abc");
        let fields: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        assert_eq!(fields["kernel_name"], "x", "other fields are kept");
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o077, 0, "owner only");
    }

    #[test]
    fn ipc_port_zero_takes_the_first_free_path() {
        let dir = tempfile::tempdir().unwrap();
        let mut info = ConnectionInfo::parse(SAMPLE).unwrap();
        info.transport = "ipc".into();
        info.ip = dir.path().join("k").display().to_string();
        std::fs::write(format!("{}-1", info.ip), "").unwrap();
        let (ep, port) = info.bind_endpoint(0);
        assert_eq!(port, 2);
        assert_eq!(ep, format!("ipc://{}-2", info.ip));
        assert_eq!(info.bind_endpoint(7).1, 7);
    }
}
