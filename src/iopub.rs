//! IOPub: an XPUB socket on its own thread.
//!
//! tmq has no XPUB socket, so the thread owns a plain `zmq` XPUB. The kernel hands it
//! finished (signed) messages through a channel, never blocking, and rings an inproc
//! doorbell so that the thread, which also waits for subscriptions, wakes up. The thread
//! publishes them in order, and answers each new subscription with `iopub_welcome`
//! (JEP 65) so a client knows its subscription is live.
//!
//! Nothing is dropped: the socket is `XPUB_NODROP`, so when a subscriber's queue is full
//! (a client that reads slowly, or not at all) the thread keeps the messages and retries.
//! What it holds is bounded by the worker connections' byte budgets (flow.rs): a
//! message's [`Credit`] is given back only once the message is in the XPUB socket, whose
//! own queue holds at most `SNDHWM` messages per subscriber.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tracing::{debug, warn};

use crate::flow::Credit;
use crate::tasks::{Tasks, Thread};

/// Builds the signed frames of an `iopub_welcome` for a subscription topic.
pub type WelcomeFn = Box<dyn Fn(&[u8]) -> Vec<Vec<u8>> + Send>;

/// Messages queued per subscriber inside libzmq. Small, since its queue is counted in
/// messages, not bytes (worker output comes in messages of at most ~1 MiB of text);
/// the operating system's socket buffers absorb bursts of small messages beyond it.
const SNDHWM: i32 = 32;

/// First and longest wait before retrying a publication that found a queue full.
const RETRY_FIRST: Duration = Duration::from_millis(1);
const RETRY_MAX: Duration = Duration::from_millis(16);

/// How long shutdown keeps trying to publish what is queued (a client that does not
/// read must not keep the kernel from exiting).
const STOP_WAIT: Duration = Duration::from_secs(2);

/// How long shutdown waits for the thread beyond `STOP_WAIT` before leaving it.
const JOIN_MARGIN: Duration = Duration::from_millis(500);

/// What the kernel hands to the thread.
enum Outgoing {
    /// Signed frames, and the budget they hold until published.
    Message(Vec<Vec<u8>>, Credit),
    /// Publish what is queued (for at most `STOP_WAIT`), then end.
    Stop,
}

/// The sending side of IOPub, owned by the kernel.
pub struct Iopub {
    queue: mpsc::Sender<Outgoing>,
    bell: zmq::Socket,
    /// Set while a ring is on its way, so that a burst of messages rings once.
    rung: Arc<AtomicBool>,
    thread: Thread,
}

impl Iopub {
    /// Makes the XPUB socket, binds it with `bind` (which returns its port), and starts the
    /// forwarding thread (one of `tasks`'); returns the IOPub and its port.
    pub fn start(
        ctx: &zmq::Context,
        tasks: &Tasks,
        bind: impl FnOnce(&zmq::Socket) -> anyhow::Result<u16>,
        welcome: WelcomeFn,
    ) -> anyhow::Result<(Self, u16)> {
        let inproc = format!("inproc://iopub-{}", uuid::Uuid::new_v4().simple());
        let mut xpub = ctx.socket(zmq::XPUB)?;
        xpub.set_xpub_verbose(true)?;
        set_xpub_nodrop(&mut xpub)?;
        xpub.set_sndhwm(SNDHWM)?;
        xpub.set_linger(1000)?;
        let port = bind(&xpub)?;
        let door = ctx.socket(zmq::PULL)?;
        door.set_rcvhwm(0)?;
        door.bind(&inproc)?;
        let bell = ctx.socket(zmq::PUSH)?;
        bell.set_sndhwm(0)?;
        bell.set_linger(0)?;
        bell.connect(&inproc)?;
        let (queue, rx) = mpsc::channel();
        let rung = Arc::new(AtomicBool::new(false));
        let thread_rung = rung.clone();
        let thread = tasks.thread("iopub", move || {
            Forwarder {
                xpub,
                door,
                queue: rx,
                rung: thread_rung,
                welcome,
                pending: VecDeque::new(),
            }
            .run()
        })?;
        Ok((
            Iopub {
                queue,
                bell,
                rung,
                thread,
            },
            port,
        ))
    }

    /// Queues a signed message of the supervisor's own for publication. Never blocks.
    pub fn send(&self, frames: Vec<Vec<u8>>) {
        self.send_credited(frames, Credit::none());
    }

    /// Queues a signed message holding `credit` (a worker's output) until it is
    /// published. Never blocks.
    pub fn send_credited(&self, frames: Vec<Vec<u8>>, credit: Credit) {
        if self.queue.send(Outgoing::Message(frames, credit)).is_err() {
            warn!("iopub: the publishing thread is gone; message dropped");
            return;
        }
        self.ring();
    }

    fn ring(&self) {
        if self.rung.swap(true, Ordering::AcqRel) {
            return;
        }
        loop {
            match self.bell.send(Vec::<u8>::new(), zmq::DONTWAIT) {
                Ok(()) => return,
                // A signal (a worker's SIGCHLD, say) interrupted the send: ring again. Left
                // unrung, the thread would sleep on while `rung` stops every later ring.
                Err(zmq::Error::EINTR) => {}
                Err(e) => {
                    warn!(error = %e, "iopub: cannot wake the publishing thread");
                    // Let the next message try again.
                    self.rung.store(false, Ordering::Release);
                    return;
                }
            }
        }
    }

    /// Publishes everything queued (waiting at most `STOP_WAIT` for slow subscribers),
    /// then stops the thread, which closes the XPUB socket. Returns whether the thread
    /// ended in time (if not, its socket stays open and the context cannot be terminated).
    pub fn shutdown(self) -> bool {
        let _ = self.queue.send(Outgoing::Stop);
        self.rung.store(false, Ordering::Release);
        self.ring();
        self.thread.join(STOP_WAIT + JOIN_MARGIN)
    }
}

/// The thread's state.
struct Forwarder {
    xpub: zmq::Socket,
    door: zmq::Socket,
    queue: mpsc::Receiver<Outgoing>,
    rung: Arc<AtomicBool>,
    welcome: WelcomeFn,
    /// Messages taken from the queue, not yet published (a subscriber's queue is full).
    pending: VecDeque<(Vec<Vec<u8>>, Credit)>,
}

impl Forwarder {
    fn run(mut self) {
        let mut stop_by: Option<Instant> = None;
        let mut retry = RETRY_FIRST;
        let mut backoff = Backoff::default();
        loop {
            // Blocked on a full queue: wait a little and retry (libzmq signals no
            // writability for XPUB_NODROP). Else sleep until a ring or a subscription.
            let timeout = if self.pending.is_empty() {
                -1
            } else {
                i64::try_from(retry.as_millis()).unwrap_or(16)
            };
            let (door_ready, xpub_ready) = {
                let mut items = [
                    self.door.as_poll_item(zmq::POLLIN),
                    self.xpub.as_poll_item(zmq::POLLIN),
                ];
                match zmq::poll(&mut items, timeout) {
                    Ok(_) => {
                        backoff.reset();
                        (items[0].is_readable(), items[1].is_readable())
                    }
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
            };
            if xpub_ready {
                self.subscriptions();
            }
            if door_ready {
                while self.door.recv_bytes(zmq::DONTWAIT).is_ok() {}
            }
            // Cleared before the queue is read: a message queued after this rings again.
            self.rung.store(false, Ordering::Release);
            loop {
                match self.queue.try_recv() {
                    Ok(Outgoing::Message(frames, credit)) => {
                        self.pending.push_back((frames, credit))
                    }
                    Ok(Outgoing::Stop) | Err(mpsc::TryRecvError::Disconnected) => {
                        stop_by.get_or_insert_with(|| Instant::now() + STOP_WAIT);
                        break;
                    }
                    Err(mpsc::TryRecvError::Empty) => break,
                }
            }
            let before = self.pending.len();
            self.publish_pending();
            if self.pending.len() < before {
                retry = RETRY_FIRST;
            } else if !self.pending.is_empty() {
                retry = (retry * 2).min(RETRY_MAX);
            }
            if let Some(by) = stop_by {
                if self.pending.is_empty() || Instant::now() >= by {
                    if !self.pending.is_empty() {
                        warn!(
                            messages = self.pending.len(),
                            "iopub: a subscriber did not read; unpublished messages dropped at exit"
                        );
                    }
                    return;
                }
            }
        }
    }

    /// Answers new subscriptions with `iopub_welcome`, ahead of what is pending.
    fn subscriptions(&mut self) {
        while let Ok(sub) = self.xpub.recv_bytes(zmq::DONTWAIT) {
            // XPUB delivers subscriptions as 0x01 + topic (0x00 + topic to unsubscribe).
            if sub.first() == Some(&1) {
                debug!("iopub: new subscription, sending iopub_welcome");
                self.pending
                    .push_front(((self.welcome)(&sub[1..]), Credit::none()));
            }
        }
    }

    /// Publishes pending messages in order until one finds a subscriber's queue full.
    fn publish_pending(&mut self) {
        while let Some((frames, _)) = self.pending.front_mut() {
            match publish(&self.xpub, frames) {
                Ok(true) => {}
                Ok(false) => return,
                Err(e) => warn!(error = %e, "iopub: publish failed; message dropped"),
            }
            // Dropping the credit gives the worker's budget back.
            self.pending.pop_front();
        }
    }
}

/// Sends one multipart message: `Ok(false)`, with nothing sent, if a subscriber's queue
/// is full. libzmq checks the queues on each frame against whole messages, so once the
/// first frame is accepted the others are too; they are sent blocking all the same, so
/// that a message is never left half-sent.
fn publish(xpub: &zmq::Socket, frames: &mut Vec<Vec<u8>>) -> zmq::Result<bool> {
    let Some(first) = frames.first() else {
        return Ok(true);
    };
    let more = if frames.len() > 1 { zmq::SNDMORE } else { 0 };
    match xpub.send(first.as_slice(), zmq::DONTWAIT | more) {
        Ok(()) => {}
        Err(zmq::Error::EAGAIN) => return Ok(false),
        Err(e) => return Err(e),
    }
    let last = frames.len() - 1;
    for (i, frame) in frames.drain(..).enumerate().skip(1) {
        let flags = if i < last { zmq::SNDMORE } else { 0 };
        xpub.send(frame, flags)?;
    }
    Ok(true)
}

/// Sets `ZMQ_XPUB_NODROP` (the `zmq` crate has no setter for it): a full subscriber queue
/// then makes a send fail with `EAGAIN` instead of dropping the message for that
/// subscriber.
fn set_xpub_nodrop(xpub: &mut zmq::Socket) -> zmq::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: `xpub` is a live socket for the duration of the call, and the option value
    // is a C int passed by pointer with its size, as zmq_setsockopt(3) specifies.
    let rc = unsafe {
        zmq_sys::zmq_setsockopt(
            xpub.as_mut_ptr(),
            zmq_sys::ZMQ_XPUB_NODROP as libc::c_int,
            std::ptr::from_ref(&on).cast(),
            std::mem::size_of::<libc::c_int>(),
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        // SAFETY: reads the calling thread's libzmq errno; no preconditions.
        Err(zmq::Error::from_raw(unsafe { zmq_sys::zmq_errno() }))
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
