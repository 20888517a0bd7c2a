//! CurveZMQ transport encryption: the kernel's server keypair from the connection file
//! (`curve_publickey` / `curve_secretkey`, Z85, as jupyter_client writes them), and the
//! options that make a socket a CURVE server. The vendored libzmq is built with libsodium
//! for this (vendor/zmq-sys).

use std::fmt;

use anyhow::{bail, ensure};

/// A transport encryption mechanism a kernelspec can declare
/// (`metadata.supported_encryption`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Encryption {
    /// CurveZMQ: the client provisions server keys in the connection file.
    Curve,
}

impl Encryption {
    /// The name in `metadata.supported_encryption`.
    pub fn as_str(self) -> &'static str {
        match self {
            Encryption::Curve => "curve",
        }
    }
}

/// Whether this build's libzmq supports CURVE.
pub fn available() -> bool {
    zmq::has("curve") == Some(true)
}

/// The kernel's CURVE server keys. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub struct CurveKeys {
    public: [u8; 32],
    secret: [u8; 32],
}

impl fmt::Debug for CurveKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CurveKeys")
            .field("public", &hex::encode(self.public))
            .finish_non_exhaustive()
    }
}

impl CurveKeys {
    /// Keys from their Z85 text (40 characters each).
    pub fn from_z85(public: &str, secret: &str) -> anyhow::Result<Self> {
        Ok(CurveKeys {
            public: z85_key(public, "curve_publickey")?,
            secret: z85_key(secret, "curve_secretkey")?,
        })
    }

    /// Makes `socket` a CURVE server with these keys (before it is bound).
    pub fn serve(&self, socket: &zmq::Socket) -> zmq::Result<()> {
        socket.set_curve_server(true)?;
        socket.set_curve_secretkey(&self.secret)?;
        socket.set_curve_publickey(&self.public)
    }

    /// [`Self::serve`] for a tmq ROUTER builder.
    pub fn serve_router(
        &self,
        builder: tmq::SocketBuilder<tmq::router::Router>,
    ) -> tmq::SocketBuilder<tmq::router::Router> {
        builder
            .set_curve_server(true)
            .set_curve_secretkey(&self.secret)
            .set_curve_publickey(&self.public)
    }
}

/// The Z85 alphabet (ZeroMQ RFC 32).
const Z85: &[u8; 85] =
    b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#";

/// A 32-byte key from its 40-character Z85 text.
fn z85_key(text: &str, field: &str) -> anyhow::Result<[u8; 32]> {
    ensure!(
        text.len() == 40,
        "{field} must be 40 Z85 characters (a CURVE key), not {}",
        text.len()
    );
    let mut key = [0u8; 32];
    for (chunk, out) in text.as_bytes().chunks(5).zip(key.chunks_mut(4)) {
        let mut value: u64 = 0;
        for &c in chunk {
            let Some(digit) = Z85.iter().position(|&z| z == c) else {
                bail!("{field} is not Z85: {:?} is not in its alphabet", c as char);
            };
            value = value * 85 + digit as u64;
        }
        let Ok(word) = u32::try_from(value) else {
            bail!("{field} is not Z85: a group is out of range");
        };
        out.copy_from_slice(&word.to_be_bytes());
    }
    Ok(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn z85_decodes_the_rfc_vector_and_libzmq_keys() {
        // ZeroMQ RFC 32's example: "HelloWorld" is 86 4F D2 6F B5 59 F7 5B.
        let mut eight = [0u8; 32];
        eight[..8].copy_from_slice(&[0x86, 0x4F, 0xD2, 0x6F, 0xB5, 0x59, 0xF7, 0x5B]);
        let text = format!("HelloWorld{}", "0".repeat(30));
        assert_eq!(z85_key(&text, "k").unwrap(), eight);
        // Against libzmq's own encoder, on a fresh keypair.
        let pair = zmq::CurveKeyPair::new().unwrap();
        let public = zmq::z85_encode(&pair.public_key).unwrap();
        let secret = zmq::z85_encode(&pair.secret_key).unwrap();
        let keys = CurveKeys::from_z85(&public, &secret).unwrap();
        assert_eq!(keys.public, pair.public_key);
        assert_eq!(keys.secret, pair.secret_key);
        assert!(!format!("{keys:?}").contains(&hex::encode(pair.secret_key)));
    }

    #[test]
    fn bad_keys_are_refused() {
        assert!(z85_key("short", "k").is_err());
        let bad_char = format!("{}~", "0".repeat(39));
        assert!(z85_key(&bad_char, "k")
            .unwrap_err()
            .to_string()
            .contains("alphabet"));
        // "#####" is 85^5 - 1, more than a u32.
        let too_big = format!("#####{}", "0".repeat(35));
        assert!(z85_key(&too_big, "k").is_err());
    }

    #[test]
    fn this_build_has_curve() {
        assert!(
            available(),
            "libzmq was built without CURVE (vendor/zmq-sys)"
        );
    }
}
