//! Framing of the supervisor ⇄ worker socket (layout in `worker_py/IPC.md`):
//! `u32 body_len, u32 n_frames, (u32 len, bytes)*`, all big-endian.

use std::io::{self, IoSlice};

use bytes::{Buf, BufMut, Bytes, BytesMut};
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

/// Frames of at least this many bytes are read into allocations of their own and written
/// from where they lie (no copy in user space); smaller ones are copied through the reader's
/// buffer and coalesced into one write with the length prefixes.
pub const LARGE_FRAME: usize = 64 << 10;

/// A reader's buffer: large enough for a cell's usual messages in one read.
pub const READ_BUFFER: usize = 64 << 10;

/// Reads one message; `Ok(None)` on a clean end of stream between messages.
///
/// `r` should be buffered ([`READ_BUFFER`]; tokio's `BufReader` hands large reads straight
/// to the socket). A small message is read whole and split into frames that share its
/// buffer; a larger one is read frame by frame, each large frame into an allocation of
/// exactly its size that nothing else shares, filled without being zeroed first, so that
/// it can be handed on (to ZeroMQ) without a copy: see [`owned`].
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
    if len < LARGE_FRAME {
        let mut body = BytesMut::zeroed(len);
        r.read_exact(&mut body).await?;
        return decode_body(body.freeze()).map(Some);
    }
    read_large_body(r, len).await.map(Some)
}

/// Reads a body of `len` bytes frame by frame, checking it as [`decode_body`] does.
async fn read_large_body<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> io::Result<Vec<Bytes>> {
    let bad = |why: &str| io::Error::new(io::ErrorKind::InvalidData, why.to_string());
    let mut left = len;
    let n = take_u32(r, &mut left, "body shorter than its frame count").await?;
    if n == 0 {
        return Err(bad("message with no frames"));
    }
    if n > left / 4 {
        return Err(bad("frame count larger than the body"));
    }
    let mut frames = Vec::with_capacity(n);
    for _ in 0..n {
        let len = take_u32(r, &mut left, "truncated frame length").await?;
        if len > left {
            return Err(bad("frame longer than the body"));
        }
        left -= len;
        frames.push(read_frame(r, len).await?);
    }
    if left != 0 {
        return Err(bad("bytes left over after the last frame"));
    }
    Ok(frames)
}

/// Reads a u32 counted against the `left` bytes of a body (`why` when they are too few).
async fn take_u32<R: AsyncRead + Unpin>(
    r: &mut R,
    left: &mut usize,
    why: &str,
) -> io::Result<usize> {
    if *left < 4 {
        return Err(io::Error::new(io::ErrorKind::InvalidData, why.to_string()));
    }
    *left -= 4;
    Ok(r.read_u32().await? as usize)
}

/// Reads one frame of `len` bytes: a large one into an allocation of exactly that size.
async fn read_frame<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> io::Result<Bytes> {
    if len < LARGE_FRAME {
        let mut frame = BytesMut::zeroed(len);
        r.read_exact(&mut frame).await?;
        return Ok(frame.freeze());
    }
    let mut frame = Vec::with_capacity(len);
    prefault(&mut frame);
    while frame.len() < len {
        let want = len - frame.len();
        if r.read_buf(&mut (&mut frame).limit(want)).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    // `Bytes::from` a vector whose length is its capacity keeps the allocation as it is.
    debug_assert_eq!(frame.len(), frame.capacity());
    Ok(Bytes::from(frame))
}

/// Frames from this size on have their allocation's pages faulted in at once.
const PREFAULT_MIN: usize = 1 << 20;

/// Faults in the pages of `frame`'s unused capacity, writable, in one call
/// (`MADV_POPULATE_WRITE`, Linux 5.14+), before a large frame is read into it: the reads
/// would otherwise take a page fault per 4 KiB, one at a time (a 50 MiB comm buffer came
/// 5–10% sooner). Only advice: an older kernel's refusal changes nothing.
#[cfg(target_os = "linux")]
fn prefault(frame: &mut Vec<u8>) {
    let spare = frame.spare_capacity_mut();
    if spare.len() < PREFAULT_MIN {
        return;
    }
    let page = 4096;
    let start = (spare.as_mut_ptr() as usize).next_multiple_of(page);
    let end = (spare.as_mut_ptr() as usize + spare.len()) / page * page;
    let Some(addr) = std::ptr::NonNull::new(start as *mut std::ffi::c_void) else {
        return;
    };
    use nix::sys::mman::{madvise, MmapAdvise};
    // SAFETY: advice on whole pages inside memory this vector owns and nothing else uses;
    // populating them does not make their contents initialized (nothing reads them).
    let _ = unsafe { madvise(addr, end - start, MmapAdvise::MADV_POPULATE_WRITE) };
}

#[cfg(not(target_os = "linux"))]
fn prefault(_frame: &mut Vec<u8>) {}

/// A frame as an owned vector, without a copy when it can be had: when `frame` is the only
/// handle to an allocation of exactly its bytes, as [`read_message`] makes for large frames.
/// Otherwise (small frames, shared or offset ones) its bytes are copied. ZeroMQ takes a
/// vector whose length is its capacity without copying (`zmq::Message::from(Vec<u8>)`).
pub fn owned(frame: Bytes) -> Vec<u8> {
    if frame.len() < LARGE_FRAME {
        return frame.to_vec();
    }
    match frame.try_into_mut() {
        Ok(unique) => {
            let v = Vec::from(unique);
            if v.len() == v.capacity() {
                v
            } else {
                v.into_boxed_slice().into_vec()
            }
        }
        Err(shared) => shared.to_vec(),
    }
}

/// Writes one message: a small one as one buffer, a larger one with its large frames
/// written from where they lie (vectored writes), not copied into a buffer first.
pub async fn write_message<W: AsyncWrite + Unpin, F: AsRef<[u8]>>(
    w: &mut W,
    frames: &[F],
) -> io::Result<()> {
    let body_len = body_len(frames.iter().map(|f| f.as_ref().len()))?;
    if (body_len as usize) < LARGE_FRAME {
        return w.write_all(&encode(frames)?).await;
    }
    // Pieces: runs of prefixes and small frames, copied into `chunks`, between large frames.
    enum Piece {
        Chunk(usize),
        Frame(usize),
    }
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut pieces = Vec::new();
    let mut chunk = Vec::with_capacity(256);
    chunk.extend_from_slice(&body_len.to_be_bytes());
    chunk.extend_from_slice(&(frames.len() as u32).to_be_bytes());
    for (i, f) in frames.iter().enumerate() {
        let f = f.as_ref();
        chunk.extend_from_slice(&(f.len() as u32).to_be_bytes());
        if f.len() >= LARGE_FRAME {
            pieces.push(Piece::Chunk(chunks.len()));
            chunks.push(std::mem::take(&mut chunk));
            pieces.push(Piece::Frame(i));
        } else {
            chunk.extend_from_slice(f);
        }
    }
    if !chunk.is_empty() {
        pieces.push(Piece::Chunk(chunks.len()));
        chunks.push(chunk);
    }
    let mut slices: Vec<IoSlice> = pieces
        .iter()
        .map(|p| match *p {
            Piece::Chunk(c) => IoSlice::new(&chunks[c]),
            Piece::Frame(f) => IoSlice::new(frames[f].as_ref()),
        })
        .collect();
    let mut rest = &mut slices[..];
    while !rest.is_empty() {
        let n = w.write_vectored(rest).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut rest, n);
    }
    Ok(())
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

    /// Large frames: read into their own allocations, handed on without a copy, written
    /// from where they lie; the bytes on the wire are those of `encode`.
    #[tokio::test]
    async fn large_frames_are_neither_zeroed_nor_copied() {
        let big: Vec<u8> = (0..(5 << 20)).map(|i| (i % 251) as u8).collect();
        let frames: Vec<Bytes> = vec![
            Bytes::from_static(br#"{"op":"iopub"}"#),
            Bytes::from_static(b"{}"),
            Bytes::from(vec![3u8; LARGE_FRAME - 1]),
            Bytes::from(big.clone()),
        ];
        let expected = encode(&frames).unwrap();
        // What `write_message` puts on the wire is `encode`'s layout.
        let (a, mut b) = tokio::net::UnixStream::pair().unwrap();
        let writer = {
            let frames = frames.clone();
            tokio::spawn(async move {
                let mut a = a;
                write_message(&mut a, &frames).await.unwrap();
            })
        };
        let mut wire = Vec::new();
        b.read_to_end(&mut wire).await.unwrap();
        writer.await.unwrap();
        assert!(wire == expected, "vectored write differs from encode");
        // Read back through a buffered reader, as the supervisor reads workers.
        let (mut a, b) = tokio::net::UnixStream::pair().unwrap();
        tokio::spawn(async move { a.write_all(&expected).await.unwrap() });
        let mut rd = tokio::io::BufReader::with_capacity(READ_BUFFER, b);
        let got = read_message(&mut rd).await.unwrap().unwrap();
        assert_eq!(got, frames);
        let large = got.into_iter().nth(3).unwrap();
        let at = large.as_ptr();
        let v = owned(large);
        assert_eq!(v.as_ptr(), at, "the large frame's allocation is handed on");
        assert_eq!(v.len(), v.capacity(), "exact: ZeroMQ takes it as it is");
        assert!(v == big);
        // A frame something else still holds is copied, not stolen.
        let shared = Bytes::from(big.clone());
        let keep = shared.clone();
        let copied = owned(shared);
        assert_ne!(copied.as_ptr(), keep.as_ptr());
    }

    #[tokio::test]
    async fn rejects_malformed_large_bodies() {
        let good = encode(&[vec![1u8; LARGE_FRAME], vec![2u8; 10]]).unwrap();
        let body_len = good.len() - 4;
        let with_body = |body: &[u8], len: usize| {
            let mut m = (len as u32).to_be_bytes().to_vec();
            m.extend_from_slice(body);
            m
        };
        let body = &good[4..];
        let mut zero_frames = body.to_vec();
        zero_frames[..4].copy_from_slice(&0u32.to_be_bytes());
        let mut too_many = body.to_vec();
        too_many[..4].copy_from_slice(&u32::MAX.to_be_bytes());
        let mut extra = body.to_vec();
        extra.extend_from_slice(&[0; 8]);
        for (name, msg) in [
            ("good", good.clone()),
            ("no frames", with_body(&zero_frames, body_len)),
            ("count too large", with_body(&too_many, body_len)),
            ("left over", with_body(&extra, body_len + 8)),
            ("frame past the body", with_body(body, body_len - 1)),
            ("truncated stream", good[..good.len() - 1].to_vec()),
        ] {
            let (mut a, b) = tokio::net::UnixStream::pair().unwrap();
            tokio::spawn(async move {
                let _ = a.write_all(&msg).await;
            });
            let mut rd = tokio::io::BufReader::new(b);
            let got = read_message(&mut rd).await;
            if name == "good" {
                assert_eq!(got.unwrap().unwrap().len(), 2);
            } else {
                assert!(got.is_err(), "accepted: {name}");
            }
        }
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
