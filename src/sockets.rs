//! Binding the kernel's five client sockets where the connection file says: clear errors
//! when an address cannot be bound, ports chosen by the system for port 0 (written back to
//! the connection file, as ipykernel does), and ROUTER handover, so that a client that
//! reconnects under the same identity (jupyter_client uses its session id) gets the replies
//! to the requests it sent before. With CURVE keys in the connection file, every socket is
//! a CURVE server.

use anyhow::{anyhow, Context as _};
use tracing::{info, warn};

use crate::connection::{ConnectionInfo, Ports};
use crate::heartbeat;
use crate::iopub::{Iopub, WelcomeFn};
use crate::tasks::{Tasks, Thread};

/// The client-facing sockets, bound; the heartbeat thread and the IOPub task are running.
pub struct ClientSockets {
    /// The shell ROUTER.
    pub shell: tmq::router::Router,
    /// The control ROUTER.
    pub control: tmq::router::Router,
    /// The stdin ROUTER.
    pub stdin: tmq::router::Router,
    /// IOPub (XPUB, on its own thread).
    pub iopub: Iopub,
    /// The heartbeat's thread (it ends when the context is terminated).
    pub heartbeat: Thread,
}

/// Binds all five sockets, starts the heartbeat thread and the IOPub task, and writes the ports
/// the system chose back to the connection file.
pub fn bind(
    ctx: &zmq::Context,
    conn: &ConnectionInfo,
    welcome: WelcomeFn,
    tasks: &Tasks,
) -> anyhow::Result<ClientSockets> {
    check_protection(conn)?;
    let asked = conn.ports();
    let (shell, shell_port) = router(ctx, conn, "shell", asked.shell)?;
    let (control, control_port) = router(ctx, conn, "control", asked.control)?;
    let (stdin, stdin_port) = router(ctx, conn, "stdin", asked.stdin)?;
    let (hb_port, heartbeat) =
        heartbeat::start(ctx, tasks, |s| bind_socket(s, conn, "heartbeat", asked.hb))?;
    let (iopub, iopub_port) = Iopub::start(
        ctx,
        tasks,
        |s| bind_socket(s, conn, "iopub", asked.iopub),
        welcome,
    )?;
    let bound = Ports {
        shell: shell_port,
        iopub: iopub_port,
        stdin: stdin_port,
        control: control_port,
        hb: hb_port,
    };
    info!(?bound, transport = %conn.transport, ip = %conn.ip, "sockets bound");
    conn.write_back(bound)?;
    Ok(ClientSockets {
        shell,
        control,
        stdin,
        iopub,
        heartbeat,
    })
}

/// Checks that CURVE keys can be used; warns when the kernel listens unprotected: beyond
/// loopback without CURVE (readable on the network), or with an empty key (unsigned).
fn check_protection(conn: &ConnectionInfo) -> anyhow::Result<()> {
    if conn.curve.is_some() {
        anyhow::ensure!(
            crate::curve::available(),
            "the connection file has CURVE keys, but this kernelvisor's libzmq has no CURVE"
        );
        info!("CurveZMQ: the five sockets are CURVE servers (transport encryption)");
    } else if conn.transport == "tcp" && !is_loopback(&conn.ip) {
        warn!(
            ip = %conn.ip,
            "listening on the network over TCP without encryption: code and outputs travel \
             in plain text (messages are signed, not hidden). Ask the client for CurveZMQ \
             (kernelvisor install --encryption curve; jupyter_client's transport_encryption)"
        );
    }
    if conn.key.is_empty() {
        warn!(
            "the connection file has an empty key: messages are not signed, so anyone who \
             can connect to the shell socket can run code"
        );
    }
    Ok(())
}

/// Binds a ROUTER for `channel`; returns it and its port.
fn router(
    ctx: &zmq::Context,
    conn: &ConnectionInfo,
    channel: &str,
    port: u16,
) -> anyhow::Result<(tmq::router::Router, u16)> {
    let (endpoint, port) = conn.bind_endpoint(port);
    let bind = || {
        let mut builder = tmq::router(ctx).set_linger(1000);
        if let Some(keys) = &conn.curve {
            builder = keys.serve_router(builder);
        }
        builder.bind(&endpoint)
    };
    let socket = retry_interrupted(bind, |e| matches!(e, tmq::TmqError::Zmq(zmq::Error::EINTR)))
        .map_err(|e| match e {
            tmq::TmqError::Zmq(e) => bind_error(conn, channel, &endpoint, port, e),
            other => anyhow!("cannot bind the {channel} socket to {endpoint}: {other}"),
        })?;
    // A reconnecting client's new connection takes its identity over from the old one,
    // which libzmq may not have noticed is dead yet (as ipykernel sets it).
    use tmq::AsZmqSocket as _;
    socket
        .get_socket()
        .set_router_handover(true)
        .context("cannot set ZMQ_ROUTER_HANDOVER")?;
    let port = bound_port(conn, socket.get_socket(), port)?;
    Ok((socket, port))
}

/// Binds a plain `zmq` socket for `channel` (heartbeat, IOPub); returns its port.
pub fn bind_socket(
    socket: &zmq::Socket,
    conn: &ConnectionInfo,
    channel: &str,
    port: u16,
) -> anyhow::Result<u16> {
    let (endpoint, port) = conn.bind_endpoint(port);
    if let Some(keys) = &conn.curve {
        keys.serve(socket)
            .with_context(|| format!("cannot make the {channel} socket a CURVE server"))?;
    }
    retry_interrupted(|| socket.bind(&endpoint), |e| *e == zmq::Error::EINTR)
        .map_err(|e| bind_error(conn, channel, &endpoint, port, e))?;
    bound_port(conn, socket, port)
}

/// Runs a libzmq call again while a signal interrupts it: `zmq_bind` first processes the
/// socket's pending commands and returns EINTR there, before it binds anything, when a
/// signal lands (VS Code signals the whole process group, also while the kernel starts).
fn retry_interrupted<T, E>(
    mut call: impl FnMut() -> Result<T, E>,
    interrupted: impl Fn(&E) -> bool,
) -> Result<T, E> {
    loop {
        match call() {
            Err(e) if interrupted(&e) => tracing::debug!("a signal interrupted a bind: again"),
            done => return done,
        }
    }
}

/// The port a socket is bound to: the one asked for, or the one the system chose for 0.
fn bound_port(conn: &ConnectionInfo, socket: &zmq::Socket, asked: u16) -> anyhow::Result<u16> {
    if asked != 0 || conn.transport == "ipc" {
        return Ok(asked);
    }
    let endpoint = socket
        .get_last_endpoint()
        .context("cannot read the bound endpoint")?
        .map_err(|_| anyhow!("the bound endpoint is not UTF-8"))?;
    endpoint
        .rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .filter(|&p| p != 0)
        .ok_or_else(|| anyhow!("no port in the bound endpoint {endpoint:?}"))
}

/// Whether `ip` (as the connection file gives it) is a loopback address.
fn is_loopback(ip: &str) -> bool {
    ip == "localhost"
        || ip
            .trim_matches(['[', ']'])
            .parse::<std::net::IpAddr>()
            .is_ok_and(|a| a.is_loopback())
}

/// Says why `endpoint` could not be bound, in the terms of the connection file.
fn bind_error(
    conn: &ConnectionInfo,
    channel: &str,
    endpoint: &str,
    port: u16,
    e: zmq::Error,
) -> anyhow::Error {
    let ip = &conn.ip;
    let why = match (conn.transport.as_str(), e) {
        ("ipc", zmq::Error::EADDRINUSE) => format!("{ip}-{port} is in use by another process"),
        ("ipc", zmq::Error::ENOENT) => format!("the directory of {ip}-{port} does not exist"),
        ("ipc", zmq::Error::EACCES) => format!("no permission to create {ip}-{port}"),
        (_, zmq::Error::EADDRINUSE) => {
            format!("port {port} is already in use (by another kernel, or one that is still exiting)")
        }
        (_, zmq::Error::EADDRNOTAVAIL) => {
            format!("{ip} is not an address of this machine (\"ip\" in the connection file)")
        }
        (_, zmq::Error::ENODEV) => format!(
            "{ip:?} is neither an IP address nor a network interface of this machine (\"ip\" in the connection file)"
        ),
        (_, zmq::Error::EACCES) => format!("no permission to bind port {port}"),
        (_, other) => other.to_string(),
    };
    anyhow!("cannot bind the {channel} socket to {endpoint}: {why}")
}
