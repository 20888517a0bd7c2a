//! `ipc::decode_body` on arbitrary bodies: it never panics, and what it accepts encodes
//! back to exactly the same bytes.
#![no_main]

use bytes::Bytes;
use kernelvisor_fuzz::ipc;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(frames) = ipc::decode_body(Bytes::copy_from_slice(data)) {
        let encoded = ipc::encode(&frames).expect("a decoded body is within the limit");
        assert_eq!(&encoded[4..], data);
        assert_eq!(
            u32::from_be_bytes(encoded[..4].try_into().unwrap()) as usize,
            data.len()
        );
    }
});
