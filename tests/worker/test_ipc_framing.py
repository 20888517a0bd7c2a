from __future__ import annotations

import json
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


def _pair() -> tuple[Connection, socket.socket]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    a.settimeout(10)
    b.settimeout(10)
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
