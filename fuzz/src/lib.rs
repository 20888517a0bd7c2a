//! The supervisor's decoders, compiled from their source files for the fuzz targets.
//!
//! The supervisor is a binary crate; rather than split it into a library for the fuzzer,
//! this crate includes the files that decode untrusted input (they depend only on each
//! other and on the crates in `Cargo.toml`), so the fuzzer runs exactly the kernel's code.
#![allow(dead_code)]

#[path = "../../src/cell_plan.rs"]
pub mod cell_plan;
#[path = "../../src/digests.rs"]
pub mod digests;
#[path = "../../src/ipc.rs"]
pub mod ipc;
#[path = "../../src/signer.rs"]
pub mod signer;
#[path = "../../src/wire.rs"]
pub mod wire;

/// `cell_plan.rs` names the worker backend enum from `install.rs` (which needs the CLI and
/// the file system); a copy of that two-value enum stands in for it, under that path and
/// under `backend`, where the kernel is moving it.
pub mod backend {
    /// Event-loop library the worker runs user code under.
    #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
    pub enum Backend {
        /// asyncio.
        #[default]
        Asyncio,
        /// Trio.
        Trio,
    }
}

/// `wire.rs` stamps each parsed message with [`crate::timings::now`] (the profile split,
/// `KERNELVISOR_TIMINGS`); the fuzzer runs without timings, so the stamp is always 0, as
/// the kernel's is when they are off (the real module reads the clock through `nix`).
pub mod timings {
    /// Timings are off here.
    pub fn now() -> u64 {
        0
    }
}

/// See [`backend`].
pub mod install {
    pub use crate::backend::Backend;
}

/// Splits a fuzz input into frames at each [`SEP`]; the corpus files are written this way.
pub fn frames(data: &[u8]) -> Vec<bytes::Bytes> {
    let mut out = Vec::new();
    let mut rest = data;
    while let Some(at) = rest.windows(SEP.len()).position(|w| w == SEP) {
        out.push(bytes::Bytes::copy_from_slice(&rest[..at]));
        rest = &rest[at + SEP.len()..];
    }
    out.push(bytes::Bytes::copy_from_slice(rest));
    out
}

/// The frame separator of fuzz inputs (JSON and hex never hold a NUL).
pub const SEP: &[u8] = b"\0\0";
