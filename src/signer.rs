//! HMAC-SHA256 message signing and constant-time verification, with replayed signatures
//! refused.
//!
//! The keyed HMAC state is computed once and cloned per message, so a signature costs
//! only the hashing of the four JSON frames.

use std::sync::{Mutex, PoisonError};

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::digests::DigestHistory;

type HmacSha256 = Hmac<Sha256>;

/// Signs and verifies Jupyter messages with the connection key.
pub struct Signer {
    /// `None` when the key is empty: signing is disabled, as the spec says.
    mac: Option<HmacSha256>,
    /// Signatures accepted by [`Signer::accept`] (the kernel's task is the only caller;
    /// the lock is never contended).
    accepted: Mutex<DigestHistory>,
}

/// Why [`Signer::accept`] refused a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// The signature does not match the frames.
    #[error("invalid signature")]
    Invalid,
    /// A valid signature that was accepted before: the message is a replay.
    #[error("replayed message (its signature was accepted before)")]
    Replayed,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print key material.
        f.debug_struct("Signer")
            .field("enabled", &self.mac.is_some())
            .finish()
    }
}

impl Signer {
    /// A signer for `key`; an empty key disables signing and verification.
    pub fn new(key: &[u8]) -> Self {
        let mac = (!key.is_empty())
            .then(|| HmacSha256::new_from_slice(key).expect("HMAC accepts any key length"));
        Signer {
            mac,
            accepted: Mutex::default(),
        }
    }

    /// The hex signature of the frames (header, parent, metadata, content); empty when
    /// signing is disabled.
    pub fn sign(&self, parts: [&[u8]; 4]) -> String {
        match &self.mac {
            None => String::new(),
            Some(mac) => {
                let mut mac = mac.clone();
                for part in parts {
                    mac.update(part);
                }
                hex::encode(mac.finalize().into_bytes())
            }
        }
    }

    /// Whether `signature` (hex) is right for the frames, compared in constant time.
    /// With signing disabled every message is accepted.
    #[cfg(test)]
    pub fn verify(&self, signature: &[u8], parts: [&[u8]; 4]) -> bool {
        self.check(signature, parts).is_some()
    }

    /// [`Signer::verify`] for an incoming message, which is also refused if its signature
    /// was accepted before (a replay; the last [`crate::digests::CAPACITY`] are kept).
    /// With signing disabled every message is accepted.
    pub fn accept(&self, signature: &[u8], parts: [&[u8]; 4]) -> Result<(), SignatureError> {
        let mac = self
            .check(signature, parts)
            .ok_or(SignatureError::Invalid)?;
        if mac.is_empty() {
            return Ok(());
        }
        let mut accepted = self.accepted.lock().unwrap_or_else(PoisonError::into_inner);
        if accepted.insert(&mac) {
            Ok(())
        } else {
            Err(SignatureError::Replayed)
        }
    }

    /// The MAC bytes of a valid signature (empty with signing disabled); `None` if invalid.
    fn check(&self, signature: &[u8], parts: [&[u8]; 4]) -> Option<Vec<u8>> {
        let Some(mac) = &self.mac else {
            return Some(Vec::new());
        };
        let expected = hex::decode(signature).ok()?;
        let mut mac = mac.clone();
        for part in parts {
            mac.update(part);
        }
        mac.verify_slice(&expected).ok()?;
        Some(expected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PARTS: [&[u8]; 4] = [b"{\"msg_id\":\"1\"}", b"{}", b"{}", b"{\"code\":\"1\"}"];

    #[test]
    fn known_vector() {
        // Python: hmac.new(b"key", b"".join(PARTS), hashlib.sha256).hexdigest()
        let sig = Signer::new(b"key").sign(PARTS);
        assert_eq!(sig.len(), 64);
        let mut mac = HmacSha256::new_from_slice(b"key").unwrap();
        mac.update(&PARTS.concat());
        assert_eq!(sig, hex::encode(mac.finalize().into_bytes()));
    }

    #[test]
    fn accepts_own_and_rejects_others() {
        let signer = Signer::new(b"secret");
        let sig = signer.sign(PARTS);
        assert!(signer.verify(sig.as_bytes(), PARTS));
        assert!(!Signer::new(b"other").verify(sig.as_bytes(), PARTS));
        let mut tampered = PARTS;
        tampered[3] = b"{\"code\":\"2\"}";
        assert!(!signer.verify(sig.as_bytes(), tampered));
        assert!(!signer.verify(b"", PARTS));
        assert!(!signer.verify(b"zz-not-hex", PARTS));
    }

    #[test]
    fn a_replayed_signature_is_refused() {
        let signer = Signer::new(b"secret");
        let sig = signer.sign(PARTS);
        assert_eq!(signer.accept(sig.as_bytes(), PARTS), Ok(()));
        assert_eq!(
            signer.accept(sig.as_bytes(), PARTS),
            Err(SignatureError::Replayed)
        );
        // The same MAC spelled in capitals is the same signature.
        let upper = sig.to_uppercase();
        assert_eq!(
            signer.accept(upper.as_bytes(), PARTS),
            Err(SignatureError::Replayed)
        );
        let mut other = PARTS;
        other[0] = b"{\"msg_id\":\"2\"}";
        assert_eq!(
            signer.accept(sig.as_bytes(), other),
            Err(SignatureError::Invalid)
        );
        let sig2 = signer.sign(other);
        assert_eq!(signer.accept(sig2.as_bytes(), other), Ok(()));
        // Invalid signatures are not remembered: the valid one is still accepted once.
        let fresh = Signer::new(b"secret");
        assert_eq!(fresh.accept(b"00", PARTS), Err(SignatureError::Invalid));
        assert_eq!(fresh.accept(sig.as_bytes(), PARTS), Ok(()));
    }

    #[test]
    fn empty_key_disables_signing() {
        let signer = Signer::new(b"");
        assert_eq!(signer.sign(PARTS), "");
        assert!(signer.verify(b"", PARTS));
        // Without signatures there is nothing to tell a replay by.
        assert_eq!(signer.accept(b"", PARTS), Ok(()));
        assert_eq!(signer.accept(b"", PARTS), Ok(()));
    }
}
