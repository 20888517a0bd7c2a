//! IOPub: an XPUB socket on its own thread.
//!
//! tmq has no XPUB socket, so the thread owns a plain `zmq` XPUB and a PULL bound to an
//! inproc endpoint. The kernel pushes finished (signed) messages into that PULL without
//! ever blocking; the thread forwards them in order, and answers each new subscription
//! with `iopub_welcome` (JEP 65) so a client knows its subscription is live.

use std::thread::JoinHandle;
use std::time::Duration;

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
    /// Makes the XPUB socket, binds it with `bind` (which returns its port), and starts the
    /// forwarding thread; returns the IOPub and its port.
    pub fn start(
        ctx: &zmq::Context,
        bind: impl FnOnce(&zmq::Socket) -> anyhow::Result<u16>,
        welcome: WelcomeFn,
    ) -> anyhow::Result<(Self, u16)> {
        let inproc = format!("inproc://iopub-{}", uuid::Uuid::new_v4().simple());
        let xpub = ctx.socket(zmq::XPUB)?;
        xpub.set_xpub_verbose(true)?;
        xpub.set_sndhwm(SNDHWM)?;
        xpub.set_linger(1000)?;
        let port = bind(&xpub)?;
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
        Ok((
            Iopub {
                push,
                thread: Some(thread),
            },
            port,
        ))
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
    let mut backoff = Backoff::default();
    loop {
        let mut items = [
            pull.as_poll_item(zmq::POLLIN),
            xpub.as_poll_item(zmq::POLLIN),
        ];
        match zmq::poll(&mut items, -1) {
            Ok(_) => backoff.reset(),
            Err(zmq::Error::ETERM) => return,
            // A signal delivered to this thread: poll again.
            Err(zmq::Error::EINTR) => continue,
            Err(e) => {
                let pause = backoff.failed();
                if backoff.failures == 1 {
                    warn!(error = %e, "iopub: poll failed; retrying with back-off (logged once)");
                }
                std::thread::sleep(pause);
                continue;
            }
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

/// Back-off after failed polls: a persistent error must not spin the thread.
#[derive(Debug, Default)]
struct Backoff {
    /// Failures since the last success.
    failures: u32,
}

impl Backoff {
    /// First pause after a failure; it doubles with each one, up to `MAX`.
    const FIRST: Duration = Duration::from_millis(1);
    /// Longest pause.
    const MAX: Duration = Duration::from_secs(1);

    /// Counts a failure; returns how long to wait before the next try.
    fn failed(&mut self) -> Duration {
        self.failures = self.failures.saturating_add(1);
        Self::FIRST
            .saturating_mul(1 << (self.failures - 1).min(20))
            .min(Self::MAX)
    }

    /// A poll succeeded.
    fn reset(&mut self) {
        self.failures = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn persistent_poll_errors_back_off() {
        let mut b = Backoff::default();
        let pauses: Vec<_> = (0..15).map(|_| b.failed()).collect();
        assert_eq!(pauses[0], Duration::from_millis(1));
        assert_eq!(pauses[1], Duration::from_millis(2));
        assert!(pauses.windows(2).all(|w| w[0] <= w[1]));
        assert_eq!(*pauses.last().unwrap(), Backoff::MAX);
        let total: Duration = pauses.iter().sum();
        assert!(
            total > Duration::from_secs(3),
            "15 failures take seconds, not a spin"
        );
        b.reset();
        assert_eq!(b.failed(), Duration::from_millis(1));
    }
}
