//! SIGINT while the kernel starts. VS Code (and a terminal's Ctrl-C) sends SIGINT to the
//! kernel's whole process group; one that arrives before the kernel's handler exists would
//! kill the supervisor, as SIGINT's default action does. So `main` holds it back first
//! thing (blocks it: a pending SIGINT waits), and the kernel lets it in once its handler
//! is installed. Blocking, not ignoring, needs no `unsafe` and loses nothing; workers do
//! not inherit it (the standard library clears a child's signal mask before `exec`).

use nix::sys::signal::{SigSet, Signal};

fn sigint() -> SigSet {
    let mut set = SigSet::empty();
    set.add(Signal::SIGINT);
    set
}

/// Holds SIGINT back on the calling thread (call it first in `main`, before any thread
/// exists, so that every thread started later inherits it).
pub fn hold() -> nix::Result<()> {
    sigint().thread_block()
}

/// Lets SIGINT in on the calling thread: a held one is delivered now. Threads started
/// while it was held keep it blocked, so it always reaches this one.
pub fn let_in() -> nix::Result<()> {
    sigint().thread_unblock()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_held_sigint_waits_until_let_in() {
        // The mask is per thread: on a thread of its own, the harness's are untouched.
        std::thread::spawn(|| {
            hold().unwrap();
            assert!(SigSet::thread_get_mask().unwrap().contains(Signal::SIGINT));
            let_in().unwrap();
            assert!(!SigSet::thread_get_mask().unwrap().contains(Signal::SIGINT));
        })
        .join()
        .unwrap();
    }
}
