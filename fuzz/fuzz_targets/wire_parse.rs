//! `wire::parse` on arbitrary multipart messages (frames separated by `\0\0`), keyed and
//! unkeyed, and the checks the kernel then runs; a message that parses must re-serialize
//! to one that parses the same, and its replay must be refused.
#![no_main]

use bytes::Bytes;
use kernelvisor_fuzz::signer::Signer;
use kernelvisor_fuzz::wire::{self, WireError, DELIMITER};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let frames = kernelvisor_fuzz::frames(data);
    // With a key, the fuzzer cannot forge signatures: this exercises framing and the
    // signature check itself.
    let keyed = Signer::new(b"fuzz-key");
    let _ = wire::parse(frames.clone(), &keyed);
    // Without one (signing disabled) every frame is parsed.
    let open = Signer::new(b"");
    if let Ok(msg) = wire::parse(frames.clone(), &open) {
        let _ = msg.check_json();
        let after_signature: usize = frames
            .iter()
            .skip_while(|f| f.as_ref() != DELIMITER)
            .skip(2)
            .map(Bytes::len)
            .sum();
        assert_eq!(msg.size(), after_signature);
        // Signed for real, it parses the same, once.
        let signed: Vec<Bytes> = wire::serialize(
            &keyed,
            &msg.identities,
            [
                &msg.header_bytes,
                &msg.parent_header,
                &msg.metadata,
                &msg.content,
            ],
            &msg.buffers,
        )
        .into_iter()
        .map(Bytes::from)
        .collect();
        let signer = Signer::new(b"fuzz-key");
        let again = wire::parse(signed.clone(), &signer).expect("a re-signed message parses");
        assert_eq!(again.header.msg_id, msg.header.msg_id);
        assert_eq!(again.header.msg_type, msg.header.msg_type);
        assert_eq!(again.content, msg.content);
        assert_eq!(again.buffers, msg.buffers);
        assert_eq!(again.identities, msg.identities);
        assert!(matches!(
            wire::parse(signed, &signer),
            Err(WireError::Replayed)
        ));
    }
});
