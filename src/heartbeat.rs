//! The heartbeat: echoes every ping, on its own thread, in libzmq's own loop.
//!
//! A ROUTER proxied onto itself echoes each message back to its sender without the
//! message ever reaching Rust, so the heartbeat keeps beating whatever the kernel is doing.

/// Makes the heartbeat socket, binds it with `bind` (which returns its port), and starts
/// the echo thread; returns the port. The thread ends when the ZeroMQ context is terminated.
pub fn start(
    ctx: &zmq::Context,
    bind: impl FnOnce(&zmq::Socket) -> anyhow::Result<u16>,
) -> anyhow::Result<u16> {
    let socket = ctx.socket(zmq::ROUTER)?;
    socket.set_linger(0)?;
    let port = bind(&socket)?;
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            // Returns ETERM when the context is terminated at exit.
            let _ = zmq::proxy(&socket, &socket);
        })?;
    Ok(port)
}
