//! A bounded history of the signatures the kernel has accepted, so that a replayed message
//! (the same signed frames sent again) is refused, as jupyter_client's `Session` does.

use std::collections::{HashSet, VecDeque};

/// Signatures remembered: jupyter_client's `Session.digest_history_size`.
pub const CAPACITY: usize = 1 << 16;

/// The most recent [`CAPACITY`] signatures, oldest evicted first.
///
/// Each is kept as its first 128 bits: HMAC output is uniform, so two different messages
/// share them with a probability of 2^-112 per pair in a full history.
#[derive(Debug)]
pub struct DigestHistory {
    capacity: usize,
    seen: HashSet<u128>,
    order: VecDeque<u128>,
}

impl Default for DigestHistory {
    fn default() -> Self {
        Self::with_capacity(CAPACITY)
    }
}

impl DigestHistory {
    /// An empty history remembering at most `capacity` signatures.
    pub fn with_capacity(capacity: usize) -> Self {
        DigestHistory {
            capacity: capacity.max(1),
            seen: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Records a signature (raw MAC bytes); `false` if it was seen already (a replay).
    pub fn insert(&mut self, mac: &[u8]) -> bool {
        let mut prefix = [0u8; 16];
        let n = mac.len().min(16);
        prefix[..n].copy_from_slice(&mac[..n]);
        let key = u128::from_be_bytes(prefix);
        if !self.seen.insert(key) {
            return false;
        }
        self.order.push_back(key);
        if self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
        true
    }

    /// How many signatures are remembered.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.order.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mac(n: u32) -> [u8; 32] {
        let mut m = [0u8; 32];
        m[..4].copy_from_slice(&n.to_be_bytes());
        m
    }

    #[test]
    fn a_signature_is_accepted_once() {
        let mut h = DigestHistory::default();
        assert!(h.insert(&mac(1)));
        assert!(h.insert(&mac(2)));
        assert!(!h.insert(&mac(1)), "replay");
        assert!(!h.insert(&mac(2)), "replay");
    }

    #[test]
    fn bounded_oldest_first() {
        let mut h = DigestHistory::with_capacity(3);
        for n in 0..3 {
            assert!(h.insert(&mac(n)));
        }
        assert!(h.insert(&mac(3)), "evicts 0");
        assert_eq!(h.len(), 3);
        assert!(!h.insert(&mac(1)), "1 is still remembered");
        assert!(!h.insert(&mac(3)));
        assert!(h.insert(&mac(0)), "0 was forgotten");
        let mut full = DigestHistory::default();
        for n in 0..(CAPACITY as u32 + 10) {
            full.insert(&mac(n));
        }
        assert_eq!(full.len(), CAPACITY);
    }
}
