//! Flow control of worker output: credit per request, and a byte cap per connection.
//!
//! **Credit per request** (IPC.md "Flow control"). The worker tags each IOPub message
//! with a *flow* (one per parent request) and sends a flow's messages only while less
//! than its window is outstanding, i.e. sent and not yet given back. The supervisor
//! charges each such message to its flow in [`Flows`]; once the IOPub task has put
//! the message into the XPUB socket (the [`Credit`] is dropped), its bytes are returned
//! to the worker in a `credit` op on `aux` (read by a worker thread, so it arrives while
//! a cell blocks the main thread). So a request whose output IOPub cannot take waits
//! alone: the supervisor keeps reading the connection, and other requests' output, their
//! replies and `input_request`s pass.
//!
//! **A cap per connection** ([`Budget`]), the safety net: the connection reader charges
//! every message it reads, and stops reading while [`CONNECTION_BUDGET`] bytes are in
//! flight. A worker that follows the credit rules stays well below it (its windows add
//! up to less), so this only bounds a worker that does not.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, Notify};

use crate::ipc_ops::ToWorker;
use crate::worker::Frames;

/// Bytes of one worker connection's messages that may be read and not yet handed to the
/// XPUB socket (or handled). Beyond it, the reader stops reading that connection. It is
/// above what the worker's credit rules let it have outstanding (IPC.md: 24 MiB over all
/// flows, plus an 8 MiB reserve, plus one message), so a worker that keeps them is never
/// stopped by it.
pub const CONNECTION_BUDGET: usize = 64 << 20;

/// Published bytes of a flow given back at once, without waiting for the rest of the
/// flow's queued messages (a quarter of the worker's 8 MiB window: a writer waiting for
/// credit gets it in steps, while the rest is still being published).
pub const RETURN_AT: usize = 2 << 20;

/// How long an urgent return (a flow with [`RETURN_AT`] published: its writer may be
/// waiting) waits for more to go with it.
const RETURN_DELAY: Duration = Duration::from_millis(2);

/// How long the rest waits: a flow whose messages are all published gets its last bytes
/// back within this, together with every other flow's. Nothing waits for them (they are
/// below every window), and fewer `credit` ops mean fewer wake-ups of the worker's aux
/// thread: one that lands while a cell's main thread is heading into a blocking call can
/// delay it past a SIGINT, which Python then handles only when the call returns.
const IDLE_RETURN_DELAY: Duration = Duration::from_millis(50);

/// The bytes in flight from one connection, and a wake-up for its reader.
#[derive(Debug)]
pub struct Budget {
    cap: usize,
    used: AtomicUsize,
    room: Notify,
}

impl Budget {
    /// A budget of `cap` bytes.
    pub fn new(cap: usize) -> Arc<Self> {
        Arc::new(Budget {
            cap,
            used: AtomicUsize::new(0),
            room: Notify::new(),
        })
    }

    /// Bytes charged and not yet given back.
    pub fn used(&self) -> usize {
        self.used.load(Ordering::Acquire)
    }

    /// Waits until less than the cap is in flight. A message read then may take the
    /// total past the cap (by at most its own size): the reader cannot know a message's
    /// size before reading it, and one message larger than the cap must still pass.
    pub async fn room(&self) {
        while self.used() >= self.cap {
            // `notify_one` keeps a permit when nobody waits yet, so a release between
            // the check and this await is not lost.
            self.room.notified().await;
        }
    }

    /// Charges `bytes`; the returned credit gives them back when dropped.
    pub fn charge(self: &Arc<Self>, bytes: usize) -> Credit {
        self.used.fetch_add(bytes, Ordering::AcqRel);
        Credit {
            budget: Some(self.clone()),
            flow: None,
            bytes,
        }
    }

    fn release(&self, bytes: usize) {
        let before = self.used.fetch_sub(bytes, Ordering::AcqRel);
        if before >= self.cap && before - bytes < self.cap {
            self.room.notify_one();
        }
    }
}

/// Bytes charged to a budget (and maybe to a flow), given back on drop (from any
/// thread).
#[derive(Debug)]
#[must_use = "dropping a credit gives its bytes back at once"]
pub struct Credit {
    budget: Option<Arc<Budget>>,
    /// The flow the bytes are returned to, once the message is published.
    flow: Option<(Arc<Flows>, u64)>,
    bytes: usize,
}

impl Credit {
    /// A credit charged to nothing (for messages the supervisor makes itself).
    pub fn none() -> Self {
        Credit {
            budget: None,
            flow: None,
            bytes: 0,
        }
    }
}

impl Drop for Credit {
    fn drop(&mut self) {
        if let Some(budget) = self.budget.take() {
            budget.release(self.bytes);
        }
        if let Some((flows, id)) = self.flow.take() {
            flows.published(id, self.bytes);
        }
    }
}

/// The output flows of one worker: for each flow (the worker's id for one parent
/// request), the bytes charged and not yet published, and those published and not yet
/// returned to the worker.
#[derive(Debug, Default)]
pub struct Flows {
    counts: Mutex<HashMap<u64, FlowCount>>,
    /// Wakes the task that sends `credit` ops.
    due: Notify,
    /// A wake-up is on its way (so that a burst of publications rings once).
    scheduled: AtomicBool,
    /// Some flow has [`RETURN_AT`] published: return without the idle delay.
    urgent: AtomicBool,
    /// Rung when `urgent` is set.
    urgent_rung: Notify,
}

#[derive(Debug, Default)]
struct FlowCount {
    /// Charged, not yet published.
    queued: usize,
    /// Published, not yet returned.
    published: usize,
}

impl Flows {
    /// No flows yet.
    pub fn new() -> Arc<Self> {
        Arc::new(Flows::default())
    }

    /// Charges `credit`'s message to flow `id` too: its bytes go back to the worker once
    /// the credit is dropped (the message is published, or was not publishable).
    pub fn charge(self: &Arc<Self>, id: u64, mut credit: Credit) -> Credit {
        self.lock().entry(id).or_default().queued += credit.bytes;
        credit.flow = Some((self.clone(), id));
        credit
    }

    /// Whether no flow has bytes queued or not yet returned.
    #[cfg(test)]
    fn is_idle(&self) -> bool {
        self.lock().is_empty()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, FlowCount>> {
        // A panic elsewhere while holding it leaves plain counters: still usable.
        self.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `bytes` of flow `id` were published (by the IOPub task).
    fn published(&self, id: u64, bytes: usize) {
        let due = {
            let mut counts = self.lock();
            let Some(c) = counts.get_mut(&id) else {
                return;
            };
            c.queued = c.queued.saturating_sub(bytes);
            c.published += bytes;
            let urgent = c.published >= RETURN_AT;
            (c.queued == 0 || urgent, urgent)
        };
        let (due, urgent) = due;
        if urgent && !self.urgent.swap(true, Ordering::AcqRel) {
            self.urgent_rung.notify_one();
        }
        if due && !self.scheduled.swap(true, Ordering::AcqRel) {
            self.due.notify_one();
        }
    }

    /// Takes every flow's published bytes, as `(flow, bytes)`; forgets flows with
    /// nothing left.
    fn take_returns(&self) -> Vec<(u64, usize)> {
        // Cleared first: a publication from now on rings again.
        self.scheduled.store(false, Ordering::Release);
        self.urgent.store(false, Ordering::Release);
        let mut counts = self.lock();
        let mut out = Vec::new();
        counts.retain(|&id, c| {
            if c.published > 0 {
                out.push((id, std::mem::take(&mut c.published)));
            }
            c.queued > 0
        });
        out.sort_unstable();
        out
    }

    /// Sends the worker its returns on `aux`, as they fall due, until `aux` closes (or
    /// the kernel stops): a task of `tasks`, named `name`.
    pub fn start_returns(
        self: &Arc<Self>,
        tasks: &crate::tasks::Tasks,
        name: String,
        aux: mpsc::UnboundedSender<Frames>,
    ) {
        let flows = self.clone();
        tasks.spawn_until_stopped(name, async move {
            loop {
                tokio::select! {
                    () = aux.closed() => return,
                    () = flows.due.notified() => {}
                }
                if !flows.urgent.load(Ordering::Acquire) {
                    tokio::select! {
                        () = aux.closed() => return,
                        () = tokio::time::sleep(IDLE_RETURN_DELAY) => {}
                        () = flows.urgent_rung.notified() => {}
                    }
                }
                tokio::time::sleep(RETURN_DELAY).await;
                let returns = flows.take_returns();
                if returns.is_empty() {
                    continue;
                }
                if aux
                    .send(ToWorker::Credit { flows: returns }.message())
                    .is_err()
                {
                    return;
                }
            }
        });
    }
}

/// Bytes of a message's frames, as charged to a budget.
pub fn size_of<F: AsRef<[u8]>>(frames: &[F]) -> usize {
    frames.iter().map(|f| f.as_ref().len()).sum()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn reader_waits_until_credits_come_back() {
        let budget = Budget::new(100);
        budget.room().await;
        let a = budget.charge(60);
        budget.room().await; // 60 < 100: room left
        let b = budget.charge(60);
        assert_eq!(budget.used(), 120);
        let waiter = {
            let budget = budget.clone();
            tokio::spawn(async move { budget.room().await })
        };
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            !waiter.is_finished(),
            "the budget is spent: the reader must wait"
        );
        // Given back from another thread, as the IOPub thread does.
        std::thread::spawn(move || drop(a)).join().unwrap();
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("room after a release")
            .unwrap();
        drop(b);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_release_before_the_wait_is_not_lost() {
        let budget = Budget::new(10);
        let a = budget.charge(10);
        drop(a);
        tokio::time::timeout(Duration::from_secs(1), budget.room())
            .await
            .expect("room");
    }

    #[tokio::test]
    async fn published_bytes_go_back_to_their_flow() {
        let flows = Flows::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        flows.start_returns(&crate::tasks::Tasks::new(), "returns".into(), tx);
        let budget = Budget::new(1 << 30);
        let a1 = flows.charge(1, budget.charge(100));
        let a2 = flows.charge(1, budget.charge(50));
        let b = flows.charge(2, budget.charge(7));
        drop(b); // flow 2 is all published: due
        let op = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a credit op")
            .unwrap();
        assert_eq!(&op[0][..], br#"{"op":"credit","flows":[[2,7]]}"#);
        drop(a1); // 100 of flow 1's 150: not due yet (below RETURN_AT, more queued)
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err(), "returned before it was due");
        assert!(!flows.is_idle());
        drop(a2);
        let op = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a credit op")
            .unwrap();
        assert_eq!(&op[0][..], br#"{"op":"credit","flows":[[1,150]]}"#);
        assert!(flows.is_idle(), "returned flows are forgotten");
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test]
    async fn a_big_flow_gets_credit_back_while_it_is_still_queued() {
        let flows = Flows::new();
        let (tx, mut rx) = mpsc::unbounded_channel();
        flows.start_returns(&crate::tasks::Tasks::new(), "returns".into(), tx);
        let budget = Budget::new(1 << 30);
        let first = flows.charge(9, budget.charge(RETURN_AT));
        let _rest = flows.charge(9, budget.charge(RETURN_AT));
        // Dropped on another thread, as the IOPub thread does.
        std::thread::spawn(move || drop(first)).join().unwrap();
        let op = tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("a credit op")
            .unwrap();
        let text = String::from_utf8(op[0].to_vec()).unwrap();
        assert_eq!(
            text,
            format!(r#"{{"op":"credit","flows":[[9,{RETURN_AT}]]}}"#)
        );
    }

    #[tokio::test]
    async fn returns_stop_when_aux_closes() {
        let flows = Flows::new();
        let (tx, rx) = mpsc::unbounded_channel();
        flows.start_returns(&crate::tasks::Tasks::new(), "returns".into(), tx);
        assert_eq!(Arc::strong_count(&flows), 2, "the task holds the flows");
        drop(rx);
        // The task lets go of them: it does not outlive the worker's connection.
        tokio::time::timeout(Duration::from_secs(5), async {
            while Arc::strong_count(&flows) > 1 {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the returns task ended");
        drop(flows.charge(1, Credit::none())); // nobody to tell: no panic
    }

    #[test]
    fn an_unbudgeted_credit_holds_nothing() {
        let c = Credit::none();
        assert_eq!(c.bytes, 0);
        assert_eq!(size_of(&[b"ab".as_slice(), b"cde".as_slice()]), 5);
    }
}
