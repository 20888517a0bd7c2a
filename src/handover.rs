//! A template that outlives a restart: handed on at a `shutdown_request` with
//! `restart: true` (the `outlive` op), taken over by the next supervisor of the same kernel
//! as it starts (the `adopt` offer). The template's side, and the rules it checks, are in
//! `worker_py/kernelvisor/handover.py`.
//!
//! Who may take part:
//! - the rendezvous is an abstract Unix socket named after the kernel's key and connection
//!   file, so only the next supervisor of this kernel looks there;
//! - each side checks that the other runs as this user (`SO_PEERCRED`), so another user
//!   who took the name first gets nothing, and is offered nothing;
//! - the adopted template then connects to the new supervisor's private socket with the
//!   token in the offer, as a spawned template does ([`crate::admission`]).

use std::io::Read;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::backend::Backend;
use crate::worker::WorkerId;

/// How long the template may take to check an offer (it stats the files it imported).
const ANSWER_WAIT: Duration = Duration::from_secs(2);

/// The abstract socket where an outliving template waits: named by an HMAC of the
/// connection file's path under the kernel's key (a kernel without a key: of the path).
pub fn rendezvous_name(key: &[u8], connection_file: &Path) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(b"kernelvisor handover\0");
    mac.update(connection_file.as_os_str().as_encoded_bytes());
    let digest = hex::encode(mac.finalize().into_bytes());
    format!("kernelvisor-handover-{}", &digest[..32])
}

/// `adopt`: what the new supervisor would start a worker with, and the template's new id,
/// token and socket.
#[derive(Debug, Serialize)]
#[serde(tag = "op", rename = "adopt")]
pub struct Offer<'a> {
    /// The template's worker id under the new supervisor.
    pub worker_id: WorkerId,
    /// Its new secret (hex).
    pub token: &'a str,
    /// The new supervisor's worker socket.
    pub path: &'a Path,
    /// The new supervisor's pid (it names the kernel's cell directory).
    pub supervisor_pid: u32,
    /// The interpreter a spawned worker would run.
    pub python: &'a Path,
    /// The workers' event loop.
    pub backend: Backend,
    /// The working directory a spawned worker would start in.
    pub cwd: String,
    /// The environment a spawned worker would get (invalid UTF-8 replaced).
    pub env: std::collections::BTreeMap<String, String>,
    /// The IPC version the new supervisor speaks ([`crate::ipc_ops::IPC_VERSION`]).
    pub ipc_version: u32,
}

impl Offer<'_> {
    /// This process's working directory and environment, as a spawned worker inherits them.
    pub fn inherited() -> (String, std::collections::BTreeMap<String, String>) {
        let cwd = std::env::current_dir()
            .map(|d| d.to_string_lossy().into_owned())
            .unwrap_or_default();
        let env = std::env::vars_os()
            .map(|(k, v)| {
                (
                    k.to_string_lossy().into_owned(),
                    v.to_string_lossy().into_owned(),
                )
            })
            .collect();
        (cwd, env)
    }
}

/// What came of looking for an outliving template.
#[derive(Debug, PartialEq, Eq)]
pub enum Found {
    /// None is waiting (the usual start).
    Nothing,
    /// Process `pid` took the offer: it connects to our socket as the template next.
    Adopted {
        /// The template's pid.
        pid: u32,
    },
    /// One was there and cannot serve us (it exits); why.
    Refused(String),
}

#[derive(Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
enum Answer {
    Adopted,
    Stale { reason: String },
}

/// Offers `offer` to a template waiting at `name`, with `stderr` (the write end of the
/// pipe its diagnostics go to from now on).
pub fn look_for(name: &str, offer: &Offer, stderr: BorrowedFd) -> Found {
    match try_offer(name, offer, stderr) {
        Ok(found) => found,
        Err(e) => Found::Refused(e.to_string()),
    }
}

fn try_offer(name: &str, offer: &Offer, stderr: BorrowedFd) -> std::io::Result<Found> {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    use std::os::linux::net::SocketAddrExt;

    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes())?;
    let mut stream = match UnixStream::connect_addr(&addr) {
        Ok(s) => s,
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => return Ok(Found::Nothing),
        Err(e) => return Err(e),
    };
    let creds = getsockopt(&stream, PeerCredentials)?;
    let uid = nix::unistd::geteuid().as_raw();
    if creds.uid() != uid {
        return Ok(Found::Refused(format!(
            "pid {} at the rendezvous runs as uid {}, not {uid}",
            creds.pid(),
            creds.uid()
        )));
    }
    stream.set_read_timeout(Some(ANSWER_WAIT))?;
    stream.set_write_timeout(Some(ANSWER_WAIT))?;
    let body = serde_json::to_vec(offer).map_err(std::io::Error::other)?;
    let bytes = crate::ipc::encode(&[body])?;
    let mut sent = 0;
    while sent < bytes.len() {
        sent += crate::worker::send_with_fd(stream.as_fd(), &bytes, sent, stderr)?;
    }
    let mut len = [0u8; 4];
    stream.read_exact(&mut len)?;
    let len = u32::from_be_bytes(len) as usize;
    if len > 64 * 1024 {
        return Err(std::io::Error::other(format!("an answer of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    stream.read_exact(&mut body)?;
    let frames = crate::ipc::decode_body(body.into())?;
    let answer: Answer = serde_json::from_slice(&frames[0]).map_err(std::io::Error::other)?;
    Ok(match answer {
        Answer::Adopted => Found::Adopted {
            pid: creds.pid() as u32,
        },
        Answer::Stale { reason } => Found::Refused(reason),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsFd;

    #[test]
    fn the_name_depends_on_the_key_and_the_file() {
        let a = rendezvous_name(b"key", Path::new("/run/kernel-1.json"));
        assert!(
            a.starts_with("kernelvisor-handover-") && a.len() == 21 + 32,
            "{a}"
        );
        assert_eq!(a, rendezvous_name(b"key", Path::new("/run/kernel-1.json")));
        assert_ne!(
            a,
            rendezvous_name(b"other", Path::new("/run/kernel-1.json"))
        );
        assert_ne!(a, rendezvous_name(b"key", Path::new("/run/kernel-2.json")));
    }

    #[test]
    fn nobody_waiting_is_nothing() {
        let (_, fd) = nix::unistd::pipe().unwrap();
        let (cwd, env) = Offer::inherited();
        let offer = Offer {
            worker_id: 1,
            token: "t",
            path: Path::new("/nowhere"),
            supervisor_pid: 1,
            python: Path::new("python3"),
            backend: Backend::Asyncio,
            cwd,
            env,
            ipc_version: crate::ipc_ops::IPC_VERSION,
        };
        let name = format!("kernelvisor-test-{}", std::process::id());
        assert_eq!(look_for(&name, &offer, fd.as_fd()), Found::Nothing);
    }
}
