//! Builds the vendored libzmq (zeromq-src) with CURVE, against the libsodium that
//! libsodium-sys-stable built. (Upstream zmq-sys 0.12 passes `with_libsodium(None)`,
//! which leaves CURVE out.)

use std::env;

fn main() {
    println!("cargo:rerun-if-changed=build/main.rs");
    println!("cargo:rerun-if-env-changed=PROFILE");
    let dep = |key: &str| {
        env::var(key).unwrap_or_else(|_| {
            panic!("{} is not set: libsodium-sys-stable did not report its build", key)
        })
    };
    let libsodium = zeromq_src::LibLocation::new(dep("DEP_SODIUM_LIB"), dep("DEP_SODIUM_INCLUDE"));
    zeromq_src::Build::new()
        .with_libsodium(Some(libsodium))
        .build();
}
