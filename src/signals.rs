//! The kernel's signals (SIGINT, SIGTERM, SIGCHLD), read from a signalfd instead of caught
//! by handlers.
//!
//! `main` blocks them first thing, before any thread exists, so every thread inherits the
//! block and none of them ever runs a handler. That matters twice:
//! - **While the kernel starts.** VS Code (and a terminal's Ctrl-C) sends SIGINT to the
//!   kernel's whole process group; one that arrives before the kernel reads its signals
//!   waits, pending, instead of killing the supervisor (SIGINT's default action). So does a
//!   SIGTERM. Blocking, not ignoring, loses nothing.
//! - **Always.** A handler that runs on the runtime's thread makes the system call it
//!   interrupts fail with EINTR, and libzmq passes that on from inside a message: tmq
//!   drops the frames of a multipart message it had already received, and stops a send
//!   in the middle of one. With no handler, no call of ours is interrupted. (A worker's
//!   death, and so a SIGCHLD, came during a client's message in a test run.)
//!
//! A child inherits the mask of the thread that forks it: the worker spawn ([`let_in`] in
//! its `pre_exec`) unblocks them again.

use nix::sys::signal::{SigSet, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use tokio::io::unix::AsyncFd;

/// The signals the kernel reads.
fn handled() -> SigSet {
    let mut set = SigSet::empty();
    for sig in [Signal::SIGINT, Signal::SIGTERM, Signal::SIGCHLD] {
        set.add(sig);
    }
    set
}

/// Blocks the kernel's signals on the calling thread (call it first in `main`, before any
/// thread exists, so that every thread started later inherits the block).
pub fn hold() -> nix::Result<()> {
    handled().thread_block()
}

/// Unblocks them on the calling thread: for a command that is not a kernel (`install`:
/// Ctrl-C stops it), and in a child between fork and exec (`pthread_sigmask` is
/// async-signal-safe).
pub fn let_in() -> nix::Result<()> {
    handled().thread_unblock()
}

/// The kernel's signals as they come, in the runtime: one that came while they were
/// held is read first.
pub struct Signals {
    fd: AsyncFd<SignalFd>,
}

impl Signals {
    /// Opens the signalfd (non-blocking). The signals must be held (see [`hold`]).
    pub fn open() -> std::io::Result<Self> {
        let fd = SignalFd::with_flags(&handled(), SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC)?;
        // SAFETY: the SignalFd owns its descriptor, which stays open and the same until
        // the AsyncFd (its only owner) is dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(std::io::Error::from)?;
        Ok(Signals { fd })
    }

    /// The signals that came since the last call, each kind once (as with handlers, several
    /// of one kind are one), waiting for at least one. At most [`DRAIN`] are read per call,
    /// so that a storm of them cannot keep the caller here.
    pub async fn recv(&mut self) -> std::io::Result<Received> {
        loop {
            let mut ready = self.fd.readable().await?;
            let mut got = Received::default();
            for _ in 0..DRAIN {
                match ready.get_inner().read_signal() {
                    Ok(Some(info)) => got.add(info.ssi_signo),
                    Ok(None) => {
                        ready.clear_ready();
                        break;
                    }
                    Err(e) => return Err(e.into()),
                }
            }
            if got != Received::default() {
                return Ok(got);
            }
        }
    }
}

/// How many signals one [`Signals::recv`] reads at most.
const DRAIN: usize = 32;

/// The kinds of signal one [`Signals::recv`] read.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Received {
    /// SIGINT: interrupt the running cells.
    pub interrupt: bool,
    /// SIGTERM: shut down.
    pub terminate: bool,
    /// SIGCHLD: a child (an orphan of a worker, since we are a subreaper) may be waiting.
    pub child: bool,
}

impl Received {
    fn add(&mut self, signo: u32) {
        match Signal::try_from(signo as i32) {
            Ok(Signal::SIGINT) => self.interrupt = true,
            Ok(Signal::SIGTERM) => self.terminate = true,
            Ok(Signal::SIGCHLD) => self.child = true,
            _ => tracing::warn!(signo, "an unexpected signal; ignored"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn held_signals_wait_for_the_reader_and_interrupt_nothing() {
        // The mask is per thread: on a thread of its own, the harness's are untouched. A
        // signal sent to this thread only (pthread_kill) is pending for it, and its signalfd reads it.
        std::thread::spawn(|| {
            hold().unwrap();
            let mask = SigSet::thread_get_mask().unwrap();
            assert!([Signal::SIGINT, Signal::SIGTERM, Signal::SIGCHLD]
                .iter()
                .all(|s| mask.contains(*s)));
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let mut signals = Signals::open().unwrap();
                let me = nix::sys::pthread::pthread_self();
                for sig in [Signal::SIGINT, Signal::SIGTERM] {
                    nix::sys::pthread::pthread_kill(me, sig).unwrap();
                    // No handler ran (the default action would have ended the test
                    // process); the signal is read instead.
                    let got =
                        tokio::time::timeout(std::time::Duration::from_secs(5), signals.recv())
                            .await
                            .expect("the signal within 5 s")
                            .unwrap();
                    let want = Received {
                        interrupt: sig == Signal::SIGINT,
                        terminate: sig == Signal::SIGTERM,
                        child: false,
                    };
                    assert_eq!(got, want);
                }
                // Several at once are read in one call, each kind once.
                for sig in [Signal::SIGCHLD, Signal::SIGINT] {
                    nix::sys::pthread::pthread_kill(me, sig).unwrap();
                }
                let got = signals.recv().await.unwrap();
                assert_eq!(
                    got,
                    Received {
                        interrupt: true,
                        terminate: false,
                        child: true
                    }
                );
            });
            let_in().unwrap();
            assert!(!SigSet::thread_get_mask().unwrap().contains(Signal::SIGINT));
        })
        .join()
        .unwrap();
    }
}
