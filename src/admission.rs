//! Who may speak for a worker on the IPC socket: the handshake rules.
//!
//! The socket lives in a 0700 directory and is itself 0600, so only the kernel's user can
//! connect. On top of that, a connection's `hello` must carry its worker's secret token
//! (handed to the worker at spawn through an inherited pipe, never argv or the
//! environment), and the kernel (`SO_PEERCRED`) must see the right process at the other
//! end:
//!
//! - `main` and `aux`: the peer's pid is the pid the supervisor spawned (or promoted), and
//!   each of the two is accepted once per worker;
//! - `snapshot`: the peer is a child of that worker (it forked the snapshot), with the
//!   worker's token. A snapshot that is promoted gets a new token and becomes the expected
//!   pid of a new worker id, so its own `main` and `aux` pass the first rule.
//! - `template`: the peer is the spawned template process (or the one a previous
//!   supervisor handed over, whose pid the rendezvous showed, [`crate::handover`]),
//!   accepted once.
//! - a worker forked from the template (its pid is not known in advance): its first
//!   connection must come from a child of the supervisor (the template double-forks, so
//!   the worker is reparented to the supervisor, a child subreaper, before it connects),
//!   or of the handed-over template, with the token the supervisor gave the template for
//!   it; that pid is then the worker's, and its other link must come from it.
//!
//! A connection that fails is closed and logged, and affects no worker.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use subtle::ConstantTimeEq;

use crate::ipc_ops::{Hello, Link};
use crate::worker::WorkerId;

/// A worker's secret: 32 random bytes, sent as hex.
#[derive(Clone, PartialEq, Eq)]
pub struct Token(String);

impl Token {
    /// A fresh token from the OS's random source.
    pub fn random() -> std::io::Result<Token> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes).map_err(std::io::Error::other)?;
        Ok(Token(hex::encode(bytes)))
    }

    /// Its hex form (what the worker is given and sends back).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn matches(&self, other: &str) -> bool {
        self.0.as_bytes().ct_eq(other.as_bytes()).into()
    }
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(..)")
    }
}

/// What the supervisor expects of a worker's connections.
#[derive(Debug)]
struct Expected {
    /// Zero for a worker forked from the template, until its first connection.
    pid: u32,
    /// For a worker forked from the template: the process it must be a child of when it
    /// first connects (the supervisor, or a handed-over template).
    parent: u32,
    token: Token,
    main: bool,
    aux: bool,
    template: bool,
    /// Snapshots it reported forking (they may connect after it died).
    snapshots: Vec<u32>,
}

/// The peer of a connection, as the kernel sees it (`SO_PEERCRED`).
#[derive(Debug, Clone, Copy)]
pub struct Peer {
    /// Its user id.
    pub uid: u32,
    /// Its process id.
    pub pid: u32,
}

/// The expected workers, shared by the kernel (which registers them) and the socket's
/// accept loop (which checks each hello).
#[derive(Debug, Clone)]
pub struct Admission {
    uid: u32,
    expected: Arc<Mutex<HashMap<WorkerId, Expected>>>,
}

impl Default for Admission {
    fn default() -> Self {
        Admission {
            uid: nix::unistd::geteuid().as_raw(),
            expected: Arc::default(),
        }
    }
}

impl Admission {
    /// Worker `id` is process `pid` and knows `token`.
    pub fn expect(&self, id: WorkerId, pid: u32, token: Token) {
        self.lock().insert(
            id,
            Expected {
                pid,
                parent: std::process::id(),
                token,
                main: false,
                aux: false,
                template: false,
                snapshots: Vec::new(),
            },
        );
    }

    /// Worker `id` is being forked by the template and knows `token`; its pid is the
    /// pid of its first connection, which must be a child of `parent` (the supervisor,
    /// or a template handed over to it, which reaps its workers itself).
    pub fn expect_fork(&self, id: WorkerId, token: Token, parent: u32) {
        self.expect(id, 0, token);
        if let Some(e) = self.lock().get_mut(&id) {
            e.parent = parent;
        }
    }

    /// Worker `id` reported forking snapshot `pid`: it may connect as `id`'s snapshot even
    /// once `id` is dead (and the snapshot reparented).
    pub fn expect_snapshot(&self, id: WorkerId, pid: u32) {
        if let Some(e) = self.lock().get_mut(&id) {
            e.snapshots.push(pid);
        }
    }

    /// Worker `id` is gone: nothing may connect for it any more.
    pub fn forget(&self, id: WorkerId) {
        self.lock().remove(&id);
    }

    /// Checks a hello against the rules above; the error says why it was refused.
    pub fn admit(&self, hello: &Hello, peer: Peer) -> Result<(), String> {
        if peer.uid != self.uid {
            return Err(format!("peer uid {} is not the kernel's", peer.uid));
        }
        let mut expected = self.lock();
        let Some(e) = expected.get_mut(&hello.worker_id) else {
            return Err(format!("no worker {} is expected", hello.worker_id));
        };
        if !e.token.matches(&hello.token) {
            return Err(format!("wrong token for worker {}", hello.worker_id));
        }
        match hello.role {
            Link::Main | Link::Aux | Link::Template => {
                if e.pid == 0 && hello.role != Link::Template {
                    // Forked by the template, reparented to us before it connects (or
                    // the child of a handed-over template).
                    let parent = crate::proctree::parent(peer.pid);
                    if parent != Some(e.parent) {
                        return Err(format!(
                            "pid {} (parent {parent:?}) is not a worker forked for {}",
                            peer.pid, hello.worker_id
                        ));
                    }
                    e.pid = peer.pid;
                }
                if peer.pid != e.pid {
                    return Err(format!(
                        "pid {} is not worker {}'s ({})",
                        peer.pid, hello.worker_id, e.pid
                    ));
                }
                let seen = match hello.role {
                    Link::Main => &mut e.main,
                    Link::Aux => &mut e.aux,
                    _ => &mut e.template,
                };
                if std::mem::replace(seen, true) {
                    return Err(format!(
                        "worker {} already has its {:?} connection",
                        hello.worker_id, hello.role
                    ));
                }
            }
            Link::Snapshot => {
                if hello.seq.is_none() {
                    return Err("a snapshot hello without seq".into());
                }
                let parent = crate::proctree::parent(peer.pid);
                if parent != Some(e.pid) && !e.snapshots.contains(&peer.pid) {
                    return Err(format!(
                        "pid {} (parent {parent:?}) is not a child of worker {} ({})",
                        peer.pid, hello.worker_id, e.pid
                    ));
                }
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<WorkerId, Expected>> {
        self.expected.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello(role: Link, id: WorkerId, token: &str, seq: Option<u64>) -> Hello {
        Hello {
            role,
            worker_id: id,
            token: token.into(),
            seq,
            language_info: serde_json::Value::Null,
            debugger: None,
        }
    }

    #[test]
    fn main_and_aux_need_the_pid_and_the_token_once() {
        let a = Admission::default();
        let t = Token::random().unwrap();
        let me = Peer {
            uid: a.uid,
            pid: 4242,
        };
        a.expect(1, 4242, t.clone());
        assert!(
            a.admit(&hello(Link::Aux, 1, "00", None), me).is_err(),
            "token"
        );
        assert!(a.admit(&hello(Link::Aux, 2, t.as_str(), None), me).is_err());
        let other = Peer { uid: a.uid, pid: 1 };
        assert!(a
            .admit(&hello(Link::Aux, 1, t.as_str(), None), other)
            .is_err());
        let stranger = Peer {
            uid: a.uid + 1,
            pid: 4242,
        };
        assert!(a
            .admit(&hello(Link::Aux, 1, t.as_str(), None), stranger)
            .is_err());
        assert!(a.admit(&hello(Link::Aux, 1, t.as_str(), None), me).is_ok());
        assert!(
            a.admit(&hello(Link::Aux, 1, t.as_str(), None), me).is_err(),
            "only once"
        );
        assert!(a.admit(&hello(Link::Main, 1, t.as_str(), None), me).is_ok());
        a.forget(1);
        assert!(a
            .admit(&hello(Link::Main, 1, t.as_str(), None), me)
            .is_err());
    }

    #[test]
    fn a_snapshot_must_be_the_workers_child() {
        let a = Admission::default();
        let t = Token::random().unwrap();
        let me = std::process::id();
        // This test process plays the snapshot: its parent is the "worker".
        let parent = crate::proctree::parent(me).unwrap();
        a.expect(1, parent, t.clone());
        let peer = Peer {
            uid: a.uid,
            pid: me,
        };
        assert!(a
            .admit(&hello(Link::Snapshot, 1, t.as_str(), Some(1)), peer)
            .is_ok());
        assert!(a
            .admit(&hello(Link::Snapshot, 1, t.as_str(), None), peer)
            .is_err());
        a.expect(2, me, t.clone());
        assert!(
            a.admit(&hello(Link::Snapshot, 2, t.as_str(), Some(1)), peer)
                .is_err(),
            "not its own child"
        );
    }

    /// A child of this process, and how it would appear as a peer.
    fn sleeping_child(a: &Admission) -> (std::process::Child, Peer) {
        let child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let peer = Peer {
            uid: a.uid,
            pid: child.id(),
        };
        (child, peer)
    }

    #[test]
    fn a_forked_worker_is_a_child_of_the_supervisor_and_keeps_its_pid() {
        let a = Admission::default();
        let t = Token::random().unwrap();
        a.expect_fork(1, t.clone(), std::process::id());
        // This test process is not its own child: refused, and nothing is pinned.
        let me = Peer {
            uid: a.uid,
            pid: std::process::id(),
        };
        assert!(a.admit(&hello(Link::Aux, 1, t.as_str(), None), me).is_err());
        let (mut child, kid) = sleeping_child(&a);
        assert!(
            a.admit(&hello(Link::Aux, 1, "00", None), kid).is_err(),
            "token"
        );
        assert!(a.admit(&hello(Link::Aux, 1, t.as_str(), None), kid).is_ok());
        assert!(
            a.admit(&hello(Link::Main, 1, t.as_str(), None), me)
                .is_err(),
            "pinned to the first connection's pid"
        );
        assert!(a
            .admit(&hello(Link::Main, 1, t.as_str(), None), kid)
            .is_ok());
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn a_worker_forked_by_a_handed_over_template_is_its_child() {
        let a = Admission::default();
        let t = Token::random().unwrap();
        let (mut child, kid) = sleeping_child(&a);
        // Expected as the child of another process (the template): our child is refused.
        a.expect_fork(1, t.clone(), 1);
        assert!(a
            .admit(&hello(Link::Aux, 1, t.as_str(), None), kid)
            .is_err());
        // Expected as the child of this process, standing in for the template: admitted.
        a.expect_fork(2, t.clone(), std::process::id());
        assert!(a.admit(&hello(Link::Aux, 2, t.as_str(), None), kid).is_ok());
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn the_template_link_is_the_spawned_process_once() {
        let a = Admission::default();
        let t = Token::random().unwrap();
        let me = Peer {
            uid: a.uid,
            pid: 77,
        };
        a.expect(3, 77, t.clone());
        let other = Peer {
            uid: a.uid,
            pid: 78,
        };
        assert!(a
            .admit(&hello(Link::Template, 3, t.as_str(), None), other)
            .is_err());
        assert!(a
            .admit(&hello(Link::Template, 3, t.as_str(), None), me)
            .is_ok());
        assert!(a
            .admit(&hello(Link::Template, 3, t.as_str(), None), me)
            .is_err());
    }
}
