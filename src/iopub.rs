//! IOPub: an XPUB socket, published from a task on the kernel's own thread.
//!
//! tmq has no XPUB socket, so the task owns a plain `zmq` XPUB and waits on its
//! `ZMQ_FD` with tokio. The kernel hands it finished (signed) messages through a channel
//! that never blocks; the task publishes them in order, and answers each new
//! subscription with `iopub_welcome` (JEP 65) so a client knows its subscription is live.
//! The task runs on the kernel's thread (the runtime has one): a message costs no thread
//! hand-off of ours, only libzmq's to its I/O thread (a thread of its own cost the
//! supervisor two wake-ups per message, a fifth of its CPU on a stream of cells).
//!
//! Nothing is dropped: the socket is `XPUB_NODROP`, so when a subscriber's queue is full
//! (a client that reads slowly, or not at all) the task keeps the messages and retries.
//! What it holds is bounded by the worker connections' byte budgets (flow.rs): a
//! message's [`Credit`] is given back only once the message is in the XPUB socket, whose
//! own queue holds at most `SNDHWM` messages per subscriber.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::time::Duration;

use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{debug, warn};

use crate::flow::Credit;
use crate::tasks::Tasks;

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

/// What the kernel hands to the task.
enum Outgoing {
    /// Signed frames, and the budget they hold until published.
    Message(Vec<Vec<u8>>, Credit),
    /// Publish what is queued (for at most `STOP_WAIT`), then end.
    Stop,
}

/// The sending side of IOPub, owned by the kernel.
pub struct Iopub {
    queue: mpsc::UnboundedSender<Outgoing>,
    /// `None` once shut down.
    task: Option<JoinHandle<()>>,
}

impl Iopub {
    /// Makes the XPUB socket, binds it with `bind` (which returns its port), and starts the
    /// publishing task (one of `tasks`'); returns the IOPub and its port. Must be called
    /// on the kernel's runtime.
    pub fn start(
        ctx: &zmq::Context,
        tasks: &Tasks,
        bind: impl FnOnce(&zmq::Socket) -> anyhow::Result<u16>,
        welcome: WelcomeFn,
    ) -> anyhow::Result<(Self, u16)> {
        let mut xpub = ctx.socket(zmq::XPUB)?;
        xpub.set_xpub_verbose(true)?;
        set_xpub_nodrop(&mut xpub)?;
        xpub.set_sndhwm(SNDHWM)?;
        xpub.set_linger(1000)?;
        let port = bind(&xpub)?;
        // SAFETY: `ZMQ_FD` stays open, and the same, as long as its socket; `Publisher`
        // declares `ready` before `xpub`, so it is dropped (deregistered) first.
        let ready =
            unsafe { AsyncFd::register_with_interest(ZmqFd(xpub.get_fd()?), Interest::READABLE) }
                .map_err(std::io::Error::from)?;
        let (queue, rx) = mpsc::unbounded_channel();
        let publisher = Publisher {
            ready,
            xpub,
            queue: rx,
            welcome,
            pending: VecDeque::new(),
        };
        let task = tasks.spawn("iopub", publisher.run());
        Ok((
            Iopub {
                queue,
                task: Some(task),
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
            warn!("iopub: the publishing task is gone; message dropped");
        }
    }

    /// Publishes everything queued (waiting at most `STOP_WAIT` for slow subscribers),
    /// then ends the task, which closes the XPUB socket. A task that does not end in time
    /// (it cannot, short of a bug) is aborted: the socket is closed either way, so the
    /// ZeroMQ context can be terminated after this. What is sent after it is dropped.
    pub async fn shutdown(&mut self) {
        let Some(mut task) = self.task.take() else {
            return;
        };
        let _ = self.queue.send(Outgoing::Stop);
        if tokio::time::timeout(STOP_WAIT + Duration::from_millis(500), &mut task)
            .await
            .is_err()
        {
            warn!("iopub: the publishing task did not end; aborted");
            task.abort();
            let _ = task.await;
        }
    }
}

/// The XPUB socket's `ZMQ_FD`: readable when the socket's state may have changed (a
/// subscription came); the socket itself says what changed. Not the socket itself, which
/// cannot be shared between threads as an AsyncFd's inner value must be.
struct ZmqFd(RawFd);

impl AsRawFd for ZmqFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0
    }
}

/// The task's state.
struct Publisher {
    /// Before `xpub`: dropped first, while its descriptor is still open.
    ready: AsyncFd<ZmqFd>,
    xpub: zmq::Socket,
    queue: mpsc::UnboundedReceiver<Outgoing>,
    welcome: WelcomeFn,
    /// Messages taken from the queue, not yet published (a subscriber's queue is full).
    pending: VecDeque<(Vec<Vec<u8>>, Credit)>,
}

impl Publisher {
    async fn run(mut self) {
        let mut stop_by: Option<Instant> = None;
        let mut retry = RETRY_FIRST;
        loop {
            // libzmq signals `ZMQ_FD` only on a change it has not reported yet, and any
            // call on the socket (a send included) may take that change in: so the
            // socket is asked after every wake-up, whatever woke us.
            self.subscriptions();
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
            // Blocked on a full queue: retry after a little while (libzmq signals no
            // writability for XPUB_NODROP). Else sleep until a message or a subscription.
            tokio::select! {
                biased;
                got = self.queue.recv(), if stop_by.is_none() => match got {
                    Some(Outgoing::Message(frames, credit)) => {
                        self.pending.push_back((frames, credit));
                        self.take_queued(&mut stop_by);
                    }
                    Some(Outgoing::Stop) | None => {
                        stop_by = Some(Instant::now() + STOP_WAIT);
                    }
                },
                ready = self.ready.readable() => match ready {
                    // Cleared before the socket is asked (at the top of the loop), so a
                    // change after that wakes us again.
                    Ok(mut guard) => guard.clear_ready(),
                    Err(e) => {
                        warn!(error = %e, "iopub: cannot wait on the socket; retrying");
                        tokio::time::sleep(RETRY_MAX).await;
                    }
                },
                () = tokio::time::sleep(retry), if !self.pending.is_empty() => {}
            }
        }
    }

    /// Takes everything else already queued, so that a burst is published in one pass.
    fn take_queued(&mut self, stop_by: &mut Option<Instant>) {
        loop {
            match self.queue.try_recv() {
                Ok(Outgoing::Message(frames, credit)) => self.pending.push_back((frames, credit)),
                Ok(Outgoing::Stop) | Err(mpsc::error::TryRecvError::Disconnected) => {
                    *stop_by = Some(Instant::now() + STOP_WAIT);
                    return;
                }
                Err(mpsc::error::TryRecvError::Empty) => return,
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
