//! The heartbeat: echoes every ping, on its own thread, in libzmq's own loop.
//!
//! A ROUTER proxied onto itself echoes each message back to its sender without the
//! message ever reaching Rust, so the heartbeat keeps beating whatever the kernel is doing.

use anyhow::Context as _;

/// Binds the heartbeat socket and starts the echo thread. It ends when the ZeroMQ
/// context is terminated.
pub fn start(ctx: &zmq::Context, endpoint: &str) -> anyhow::Result<()> {
    let socket = ctx.socket(zmq::ROUTER)?;
    socket.set_linger(0)?;
    socket
        .bind(endpoint)
        .with_context(|| format!("cannot bind heartbeat to {endpoint}"))?;
    std::thread::Builder::new()
        .name("heartbeat".into())
        .spawn(move || {
            // Returns ETERM when the context is terminated at exit.
            let _ = zmq::proxy(&socket, &socket);
        })?;
    Ok(())
}
