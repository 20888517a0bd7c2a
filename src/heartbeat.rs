//! The heartbeat: echoes every ping, on its own thread, in libzmq's own loop.
//!
//! A ROUTER proxied onto itself echoes each message back to its sender without the
//! message ever reaching Rust, so the heartbeat keeps beating whatever the kernel is doing.

use crate::tasks::{Tasks, Thread};

/// Makes the heartbeat socket, binds it with `bind` (which returns its port), and starts
/// the echo thread (one of `tasks`'); returns the port and the thread. The thread ends when
/// the ZeroMQ context is terminated.
pub fn start(
    ctx: &zmq::Context,
    tasks: &Tasks,
    bind: impl FnOnce(&zmq::Socket) -> anyhow::Result<u16>,
) -> anyhow::Result<(u16, Thread)> {
    let socket = ctx.socket(zmq::ROUTER)?;
    socket.set_linger(0)?;
    let port = bind(&socket)?;
    let thread = tasks.thread("heartbeat", move || {
        // Returns ETERM when the context is terminated at exit; EINTR (a signal, though
        // this thread blocks them) must not stop the heartbeat.
        while let Err(zmq::Error::EINTR) = zmq::proxy(&socket, &socket) {}
    })?;
    Ok((port, thread))
}
