//! Framing of the supervisor ⇄ worker socket (layout in `worker_py/IPC.md`):
//! `u32 body_len, u32 n_frames, (u32 len, bytes)*`, all big-endian.

use std::io;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Largest body accepted; larger is a protocol error.
pub const MAX_BODY: usize = 1 << 30;

/// Encodes a message (a list of frames) into one contiguous buffer; a message whose body
/// would exceed [`MAX_BODY`] is an `InvalidInput` error (nothing is encoded).
pub fn encode<F: AsRef<[u8]>>(frames: &[F]) -> io::Result<Vec<u8>> {
    let body_len = body_len(frames.iter().map(|f| f.as_ref().len()))?;
    let mut out = Vec::with_capacity(4 + body_len as usize);
    out.extend_from_slice(&body_len.to_be_bytes());
    // Every count and length below is at most `body_len`, so fits in a u32.
    out.extend_from_slice(&(frames.len() as u32).to_be_bytes());
    for f in frames {
        let f = f.as_ref();
        out.extend_from_slice(&(f.len() as u32).to_be_bytes());
        out.extend_from_slice(f);
    }
    Ok(out)
}

/// The body length of a message whose frames have these lengths, checked against
/// [`MAX_BODY`] (so it, the frame count and each length fit the u32 fields).
fn body_len(mut frame_lens: impl Iterator<Item = usize>) -> io::Result<u32> {
    let total = frame_lens.try_fold(4usize, |sum, len| sum.checked_add(4)?.checked_add(len));
    match total {
        Some(n) if n <= MAX_BODY => Ok(u32::try_from(n).expect("MAX_BODY fits a u32")),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "message body of {} bytes exceeds the 1 GiB IPC limit",
                total.map_or_else(|| "more than usize::MAX".into(), |n| n.to_string())
            ),
        )),
    }
}

/// Splits a body (everything after `body_len`) into frames without copying.
pub fn decode_body(mut body: Bytes) -> io::Result<Vec<Bytes>> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    if body.len() < 4 {
        return Err(bad("body shorter than its frame count"));
    }
    let n = body.get_u32() as usize;
    if n == 0 {
        return Err(bad("message with no frames"));
    }
    if n > body.len() / 4 {
        return Err(bad("frame count larger than the body"));
    }
    let mut frames = Vec::with_capacity(n);
    for _ in 0..n {
        if body.len() < 4 {
            return Err(bad("truncated frame length"));
        }
        let len = body.get_u32() as usize;
        if len > body.len() {
            return Err(bad("frame longer than the body"));
        }
        frames.push(body.split_to(len));
    }
    if !body.is_empty() {
        return Err(bad("bytes left over after the last frame"));
    }
    Ok(frames)
}

/// Reads one message; `Ok(None)` on a clean end of stream between messages.
pub async fn read_message<R: AsyncRead + Unpin>(r: &mut R) -> io::Result<Option<Vec<Bytes>>> {
    let mut len = [0u8; 4];
    match r.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_BODY {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message body of {len} bytes exceeds the 1 GiB limit"),
        ));
    }
    let mut body = BytesMut::zeroed(len);
    r.read_exact(&mut body).await?;
    decode_body(body.freeze()).map(Some)
}

/// Writes one message.
pub async fn write_message<W: AsyncWrite + Unpin, F: AsRef<[u8]>>(
    w: &mut W,
    frames: &[F],
) -> io::Result<()> {
    w.write_all(&encode(frames)?).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_vector() -> serde_json::Value {
        let text = std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/data/ipc_vector.json"
        ))
        .expect("tests/data/ipc_vector.json");
        serde_json::from_str(&text).unwrap()
    }

    fn unhex(v: &serde_json::Value) -> Vec<u8> {
        hex::decode(v.as_str().expect("hex string")).unwrap()
    }

    /// `tests/data/ipc_vector.json` is also checked by the Python worker's tests, so both
    /// sides provably speak the same framing.
    #[test]
    fn matches_the_shared_vector() {
        let v = shared_vector();
        let frames: Vec<Vec<u8>> = v["frames_hex"]
            .as_array()
            .unwrap()
            .iter()
            .map(unhex)
            .collect();
        let encoded = unhex(&v["encoded_hex"]);
        assert_eq!(encode(&frames).unwrap(), encoded);
        let decoded = decode_body(Bytes::from(encoded[4..].to_vec())).unwrap();
        assert_eq!(decoded, frames);
    }

    #[tokio::test]
    async fn rejects_the_shared_invalid_messages() {
        for case in shared_vector()["invalid"].as_array().unwrap() {
            let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
            a.write_all(&unhex(&case["hex"])).await.unwrap();
            drop(a);
            assert!(
                read_message(&mut b).await.is_err(),
                "accepted invalid case {}",
                case["name"]
            );
        }
    }

    #[tokio::test]
    async fn round_trip_over_a_socket() {
        let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let big = vec![7u8; 3 << 20];
        // The socket buffer is smaller than the message: write while the reader reads.
        let writer = tokio::spawn(async move {
            let frames: Vec<&[u8]> = vec![br#"{"op":"x"}"#, b"", &big];
            write_message(&mut a, &frames).await.unwrap();
            write_message(&mut a, &[b"second"]).await.unwrap();
        });
        let got = read_message(&mut b).await.unwrap().unwrap();
        assert_eq!(got.len(), 3);
        assert_eq!(got[2].len(), 3 << 20);
        assert!(got[2].iter().all(|&x| x == 7));
        assert_eq!(
            read_message(&mut b).await.unwrap().unwrap()[0],
            &b"second"[..]
        );
        writer.await.unwrap();
        assert!(read_message(&mut b).await.unwrap().is_none(), "clean EOF");
    }

    #[test]
    fn rejects_malformed_bodies() {
        let ok = encode(&[&b"ab"[..], b"c"]).unwrap();
        let body = |v: &[u8]| decode_body(Bytes::copy_from_slice(v));
        assert!(body(&ok[4..]).is_ok());
        assert!(body(&ok[4..ok.len() - 1]).is_err(), "truncated");
        assert!(body(&[0, 0, 0, 0]).is_err(), "no frames");
        let mut extra = ok[4..].to_vec();
        extra.push(0);
        assert!(body(&extra).is_err(), "left over");
        assert!(body(&[0, 0, 0, 9, 0, 0, 0, 1]).is_err(), "count too large");
    }

    #[test]
    fn lengths_are_checked_before_the_u32_casts() {
        assert_eq!(body_len([2, 1].into_iter()).unwrap(), 4 + 4 + 2 + 4 + 1);
        assert_eq!(body_len(std::iter::empty()).unwrap(), 4);
        assert_eq!(
            body_len([MAX_BODY - 8].into_iter()).unwrap() as usize,
            MAX_BODY
        );
        let too_big = body_len([MAX_BODY - 7].into_iter()).unwrap_err();
        assert_eq!(too_big.kind(), io::ErrorKind::InvalidInput);
        assert!(too_big.to_string().contains("1 GiB"), "{too_big}");
        // 4 GiB + 1 would have wrapped to a small u32 length.
        assert!(body_len([1 << 32, 1].into_iter()).is_err());
        assert!(body_len([usize::MAX, 1].into_iter()).is_err(), "overflow");
    }

    #[tokio::test]
    async fn rejects_oversize_and_truncated_streams() {
        let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
        a.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
        assert!(read_message(&mut b).await.is_err());
        let (mut a, mut b) = tokio::net::UnixStream::pair().unwrap();
        a.write_all(&encode(&[b"abc"]).unwrap()[..6]).await.unwrap();
        drop(a);
        assert!(read_message(&mut b).await.is_err(), "EOF inside a message");
    }
}
