//! IOPub: an XPUB socket on its own thread.
//!
//! tmq has no XPUB socket, so the thread owns a plain `zmq` XPUB and a PULL bound to an
//! inproc endpoint. The kernel pushes finished (signed) messages into that PULL without
//! ever blocking; the thread forwards them in order, and answers each new subscription
//! with `iopub_welcome` (JEP 65) so a client knows its subscription is live.

use std::thread::JoinHandle;

use anyhow::Context as _;
use tracing::{debug, warn};

/// Builds the signed frames of an `iopub_welcome` for a subscription topic.
pub type WelcomeFn = Box<dyn Fn(&[u8]) -> Vec<Vec<u8>> + Send>;

/// Messages queued per subscriber before libzmq drops: high, since a flood is coalesced
/// into few large messages and dropping output is the one thing we must not do.
const SNDHWM: i32 = 100_000;

/// The sending side of IOPub, owned by the kernel.
pub struct Iopub {
    push: zmq::Socket,
    thread: Option<JoinHandle<()>>,
}

impl Iopub {
    /// Binds `endpoint` and starts the forwarding thread.
    pub fn start(ctx: &zmq::Context, endpoint: &str, welcome: WelcomeFn) -> anyhow::Result<Self> {
        let inproc = format!("inproc://iopub-{}", uuid::Uuid::new_v4().simple());
        let xpub = ctx.socket(zmq::XPUB)?;
        xpub.set_xpub_verbose(true)?;
        xpub.set_sndhwm(SNDHWM)?;
        xpub.set_linger(1000)?;
        xpub.bind(endpoint)
            .with_context(|| format!("cannot bind iopub to {endpoint}"))?;
        let pull = ctx.socket(zmq::PULL)?;
        pull.set_rcvhwm(0)?;
        pull.bind(&inproc)?;
        let push = ctx.socket(zmq::PUSH)?;
        push.set_sndhwm(0)?;
        push.set_linger(-1)?;
        push.connect(&inproc)?;
        let thread = std::thread::Builder::new()
            .name("iopub".into())
            .spawn(move || forward(xpub, pull, welcome))?;
        Ok(Iopub {
            push,
            thread: Some(thread),
        })
    }

    /// Queues a signed message for publication. Never blocks (unbounded inproc queue).
    pub fn send(&self, frames: Vec<Vec<u8>>) {
        if let Err(e) = self.push.send_multipart(frames, 0) {
            warn!(error = %e, "iopub: cannot queue message");
        }
    }

    /// Publishes everything queued, then stops the thread.
    pub fn shutdown(mut self) {
        // A lone empty frame is the stop marker: real messages always carry several frames.
        let _ = self.push.send(Vec::<u8>::new(), 0);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn forward(xpub: zmq::Socket, pull: zmq::Socket, welcome: WelcomeFn) {
    loop {
        let mut items = [
            pull.as_poll_item(zmq::POLLIN),
            xpub.as_poll_item(zmq::POLLIN),
        ];
        if let Err(e) = zmq::poll(&mut items, -1) {
            if e == zmq::Error::ETERM {
                return;
            }
            continue;
        }
        if items[1].is_readable() {
            while let Ok(sub) = xpub.recv_bytes(zmq::DONTWAIT) {
                // XPUB delivers subscriptions as 0x01 + topic (0x00 + topic to unsubscribe).
                if sub.first() == Some(&1) {
                    debug!("iopub: new subscription, sending iopub_welcome");
                    let _ = xpub.send_multipart(welcome(&sub[1..]), 0);
                }
            }
        }
        if items[0].is_readable() {
            while let Ok(frames) = pull.recv_multipart(zmq::DONTWAIT) {
                if frames.len() == 1 && frames[0].is_empty() {
                    return;
                }
                if let Err(e) = xpub.send_multipart(frames, 0) {
                    warn!(error = %e, "iopub: publish failed");
                }
            }
        }
    }
}
