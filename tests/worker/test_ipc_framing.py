from __future__ import annotations

import gc
import json
import os
import select
import socket
import struct
import threading
from pathlib import Path

import pytest
from kernelvisor import ipc
from kernelvisor.ipc import Connection, ProtocolError

VECTOR = json.loads((Path(__file__).resolve().parents[1] / "data" / "ipc_vector.json").read_text())


def test_known_vector_encodes_exactly() -> None:
    frames = [bytes.fromhex(h) for h in VECTOR["frames_hex"]]
    assert ipc.encode(frames).hex() == VECTOR["encoded_hex"]


def test_known_vector_decodes() -> None:
    frames = ipc.decode(bytes.fromhex(VECTOR["encoded_hex"]))
    assert frames == [bytes.fromhex(h) for h in VECTOR["frames_hex"]]
    assert frames[0] == b'{"op":"hello"}'
    assert frames[2].decode() == "\u00e9"


@pytest.mark.parametrize(
    "frames",
    [
        [b"x"],
        [b"", b"", b""],
        [b'{"op":"request"}', b"a" * 70_000, b"b", b"c" * 100_000],  # big frames go zero-copy
        [memoryview(b"view"), bytearray(b"array"), b"bytes"],
    ],
)
def test_round_trip(frames: list[ipc.BytesLike]) -> None:
    assert ipc.decode(ipc.encode(frames)) == [bytes(f) for f in frames]


def test_encode_rejects_no_frames() -> None:
    with pytest.raises(ProtocolError):
        ipc.encode([])


@pytest.mark.parametrize("case", VECTOR["invalid"], ids=lambda c: c["name"])
def test_decode_rejects_invalid(case: dict[str, str]) -> None:
    with pytest.raises(ProtocolError):
        ipc.decode(bytes.fromhex(case["hex"]))


def _pair(timeout: float | None = 10) -> tuple[Connection, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(timeout)
    b.settimeout(timeout)
    return Connection(a), b


def test_connection_round_trip_with_large_frame() -> None:
    left, right_sock = _pair()
    right = Connection(right_sock)
    big = bytes(range(256)) * 20_000  # 5 MB: more than a socket buffer, so sends are partial
    messages = [[b'{"op":"a"}'], [b'{"op":"b"}', b"", big, b"tail"]]
    sender = threading.Thread(target=lambda: [left.send(m) for m in messages])
    sender.start()
    assert right.recv() == messages[0]
    assert right.recv() == messages[1]
    sender.join()
    left.close()
    with pytest.raises(EOFError):
        right.recv()
    right.close()


@pytest.mark.parametrize("case", VECTOR["invalid"], ids=lambda c: c["name"])
def test_connection_rejects_invalid(case: dict[str, str]) -> None:
    conn, peer = _pair()
    peer.sendall(bytes.fromhex(case["hex"]))
    peer.close()  # a truncated message then ends in EOF
    with pytest.raises(ProtocolError):
        conn.recv()
    conn.close()


def test_oversize_body_len_is_rejected_without_reading_the_body() -> None:
    conn, peer = _pair()
    peer.sendall(struct.pack("!I", ipc.MAX_BODY + 1))  # and nothing else, connection open
    with pytest.raises(ProtocolError):
        conn.recv()
    conn.close()
    peer.close()


# --- incremental decoding (the main connection is read by an event loop) ----------------

MESSAGES = [
    [b'{"op":"a"}'],
    [b'{"op":"b"}', b"", b"\x00" * 300, b"tail"],
    [b'{"op":"c"}', b"x" * 70_000],
]
STREAM = b"".join(ipc.encode(m) for m in MESSAGES)


def test_decoder_whole_stream_in_one_feed() -> None:
    decoder = ipc.Decoder()
    assert decoder.feed(STREAM) == MESSAGES
    assert decoder.pending == 0


@pytest.mark.parametrize("chunk", [1, 3, 4, 5, 7, 1000, 65536])
def test_decoder_messages_split_across_feeds(chunk: int) -> None:
    decoder = ipc.Decoder()
    got: list[list[bytes]] = []
    for start in range(0, len(STREAM), chunk):
        got += decoder.feed(memoryview(STREAM)[start : start + chunk])
        assert decoder.pending == 0 or len(got) < len(MESSAGES)
    assert got == MESSAGES
    assert decoder.pending == 0


def test_decoder_complete_then_partial_in_one_feed() -> None:
    decoder = ipc.Decoder()
    first, second = ipc.encode(MESSAGES[0]), ipc.encode(MESSAGES[1])
    assert decoder.feed(first + second[:10]) == [MESSAGES[0]]
    assert decoder.pending == 10
    assert decoder.feed(second[10:] + first) == [MESSAGES[1], MESSAGES[0]]
    assert decoder.pending == 0


def test_decoder_feeds_are_copied() -> None:
    decoder = ipc.Decoder()
    buf = bytearray(ipc.encode(MESSAGES[1]))
    half = len(buf) // 2
    assert decoder.feed(memoryview(buf)[:half]) == []
    buf[:half] = bytes(half)  # the reader reuses its buffer
    assert decoder.feed(memoryview(buf)[half:]) == [MESSAGES[1]]


@pytest.mark.parametrize(
    "case", [c for c in VECTOR["invalid"] if c["name"] != "truncated"], ids=lambda c: c["name"]
)
def test_decoder_rejects_invalid(case: dict[str, str]) -> None:
    data = bytes.fromhex(case["hex"])
    with pytest.raises(ProtocolError):
        ipc.Decoder().feed(data)
    # Also when the bad message follows a good one, and arrives byte by byte.
    decoder = ipc.Decoder()
    good = ipc.encode(MESSAGES[0])
    got: list[list[bytes]] = []
    with pytest.raises(ProtocolError):
        for byte in good + data:
            got += decoder.feed(bytes([byte]))
    assert got == [MESSAGES[0]]


def test_decoder_truncated_message_stays_pending() -> None:
    case = next(c for c in VECTOR["invalid"] if c["name"] == "truncated")
    decoder = ipc.Decoder()
    assert decoder.feed(bytes.fromhex(case["hex"])) == []
    assert decoder.pending == len(bytes.fromhex(case["hex"]))


def test_recv_nowait() -> None:
    conn, peer = _pair(timeout=None)
    assert conn.recv_nowait() == []  # nothing there: no blocking
    peer.sendall(STREAM[:5])
    assert _recv_nowait_eventually(conn) == []
    sender = threading.Thread(target=peer.sendall, args=(STREAM[5:],))
    sender.start()  # more than a socket buffer holds
    got: list[list[bytes]] = []
    while len(got) < len(MESSAGES):
        got += _recv_nowait_eventually(conn)
    sender.join()
    assert got == MESSAGES
    peer.sendall(ipc.encode(MESSAGES[0]))
    peer.close()
    assert _recv_nowait_eventually(conn) == [MESSAGES[0]]  # the messages before the end
    with pytest.raises(EOFError):
        conn.recv_nowait()
    conn.close()


def test_recv_nowait_close_inside_a_message() -> None:
    conn, peer = _pair(timeout=None)
    peer.sendall(ipc.encode(MESSAGES[1])[:-1])
    peer.close()
    with pytest.raises(ProtocolError):
        while True:
            conn.recv_nowait()
    conn.close()


def test_recv_nowait_rejects_oversize_body_len() -> None:
    conn, peer = _pair(timeout=None)
    peer.sendall(struct.pack("!I", ipc.MAX_BODY + 1))
    with pytest.raises(ProtocolError):
        _recv_nowait_eventually(conn)
    conn.close()
    peer.close()


def test_recv_nowait_needs_a_socket_without_timeout() -> None:
    conn, peer = _pair(timeout=10)
    with pytest.raises(ValueError):
        conn.recv_nowait()
    conn.close()
    peer.close()


def _recv_nowait_eventually(conn: Connection) -> list[list[bytes]]:
    """recv_nowait once the socket is readable (what an event loop's reader does)."""
    assert select.select([conn], [], [], 10)[0], "nothing arrived"
    return conn.recv_nowait()


@pytest.mark.parametrize(
    "frames",
    [
        [b"x"],
        [b'{"op":"reply"}', b"{}", b'{"status":"ok"}'],  # the one-piece fast path
        [b'{"op":"iopub"}', bytearray(b"not bytes"), b""],
        [b'{"op":"iopub"}', b"y" * 70_000],  # too big for one piece
        [b'{"op":"iopub"}', memoryview(b"abcdefgh").cast("I")],  # not a byte view
    ],
)
def test_connection_sends_the_encoding(frames: list[ipc.BytesLike]) -> None:
    conn, peer = _pair()
    expected = ipc.encode(frames)
    sender = threading.Thread(target=conn.send, args=(frames,))
    sender.start()
    got = b""
    while len(got) < len(expected):
        got += peer.recv(1 << 20)
    sender.join()
    assert got == expected
    assert ipc.decode(got) == [bytes(f) for f in frames]
    conn.close()
    peer.close()


def test_forget_leaves_a_reused_descriptor_number_alone(tmp_path: Path) -> None:
    """A snapshot closes its copy of the worker's links by number right after the fork, and
    forgets the Connection objects once promoted: by then the number may be another open
    file's, which forgetting must not close (``abandon`` would)."""
    a, b = socket.socketpair()
    conn = Connection(a)
    number = conn.fileno()
    with open(tmp_path / "reused", "wb") as reused:
        os.close(number)
        os.dup2(reused.fileno(), number)
        conn.forget()
        del conn, a
        gc.collect()
        os.write(number, b"still open")
        assert os.fstat(reused.fileno()).st_size == len(b"still open")
    os.close(number)
    b.close()
