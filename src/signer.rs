//! HMAC-SHA256 message signing and constant-time verification.
//!
//! The keyed HMAC state is computed once and cloned per message, so a signature costs
//! only the hashing of the four JSON frames.

use hmac::{Hmac, Mac};
use sha2::Sha256;

type HmacSha256 = Hmac<Sha256>;

/// Signs and verifies Jupyter messages with the connection key.
#[derive(Clone)]
pub struct Signer {
    /// `None` when the key is empty: signing is disabled, as the spec says.
    mac: Option<HmacSha256>,
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
        Signer { mac }
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
    pub fn verify(&self, signature: &[u8], parts: [&[u8]; 4]) -> bool {
        let Some(mac) = &self.mac else {
            return true;
        };
        let Ok(expected) = hex::decode(signature) else {
            return false;
        };
        let mut mac = mac.clone();
        for part in parts {
            mac.update(part);
        }
        mac.verify_slice(&expected).is_ok()
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
    fn empty_key_disables_signing() {
        let signer = Signer::new(b"");
        assert_eq!(signer.sign(PARTS), "");
        assert!(signer.verify(b"", PARTS));
    }
}
