//! Flow control of worker output: a byte budget per worker connection.
//!
//! The connection reader charges each message it reads to its connection's [`Budget`] and
//! stops reading while the budget is spent, so a worker whose output IOPub cannot take
//! fast enough waits on its socket (and its `print` on its full buffer), as a writer to a
//! full pipe does. The charge travels with the message as a [`Credit`] and is given back
//! when the credit is dropped: by the IOPub thread once the message is in the XPUB socket,
//! or by the kernel once it has handled a message that does not go to IOPub.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::sync::Notify;

/// Bytes of one worker connection's messages that may be read and not yet handed to the
/// XPUB socket (or handled). Beyond it, the reader stops reading that connection.
pub const CONNECTION_BUDGET: usize = 32 << 20;

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

/// Bytes charged to a budget, given back on drop (from any thread).
#[derive(Debug)]
#[must_use = "dropping a credit gives its bytes back at once"]
pub struct Credit {
    budget: Option<Arc<Budget>>,
    bytes: usize,
}

impl Credit {
    /// A credit charged to nothing (for messages the supervisor makes itself).
    pub fn none() -> Self {
        Credit {
            budget: None,
            bytes: 0,
        }
    }
}

impl Drop for Credit {
    fn drop(&mut self) {
        if let Some(budget) = self.budget.take() {
            budget.release(self.bytes);
        }
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

    #[test]
    fn an_unbudgeted_credit_holds_nothing() {
        let c = Credit::none();
        assert_eq!(c.bytes, 0);
        assert_eq!(size_of(&[b"ab".as_slice(), b"cde".as_slice()]), 5);
    }
}
