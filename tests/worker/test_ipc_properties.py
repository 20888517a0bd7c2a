"""Property tests (hypothesis) of the worker's IPC framing (kernelvisor.ipc, IPC.md): any
message survives encode/decode and any split of the byte stream, and any byte string is either
decoded into frames that encode back to it or refused with a ProtocolError, never anything else.
"""

from __future__ import annotations

import select
import socket
import struct
import threading

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kernelvisor import ipc

frames_st = st.lists(st.binary(max_size=300), min_size=1, max_size=8)
messages_st = st.lists(frames_st, min_size=1, max_size=6)


def reference_encoding(frames: list[bytes]) -> bytes:
    """IPC.md's layout, written out independently of the module under test."""
    body = struct.pack("!I", len(frames)) + b"".join(struct.pack("!I", len(f)) + f for f in frames)
    return struct.pack("!I", len(body)) + body


@given(frames_st, st.sampled_from([bytes, bytearray, memoryview]))
def test_encode_matches_the_spec_and_decodes_back(frames: list[bytes], kind: type) -> None:
    encoded = ipc.encode([kind(f) for f in frames])
    assert encoded == reference_encoding(frames)
    assert ipc.decode(encoded) == frames
    assert ipc.decode_body(encoded[4:]) == frames


@given(messages_st, st.data())
def test_any_split_of_the_stream_yields_the_same_messages(
    messages: list[list[bytes]], data: st.DataObject
) -> None:
    stream = b"".join(ipc.encode(m) for m in messages)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=20)))
    decoder = ipc.Decoder()
    got: list[list[bytes]] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        got += decoder.feed(stream[start:cut])
        start = cut
    assert got == messages
    assert decoder.pending == 0


@given(frames_st, st.data())
def test_a_truncated_message_is_held_not_returned(frames: list[bytes], data: st.DataObject) -> None:
    encoded = ipc.encode(frames)
    cut = data.draw(st.integers(0, len(encoded) - 1))
    decoder = ipc.Decoder()
    assert decoder.feed(encoded[:cut]) == []
    assert decoder.pending == cut
    with pytest.raises(ipc.ProtocolError):
        ipc.decode(encoded[:cut])
    assert decoder.feed(encoded[cut:]) == [frames]


@given(st.binary(max_size=400))
def test_arbitrary_bodies_decode_exactly_or_are_refused(body: bytes) -> None:
    try:
        frames = ipc.decode_body(body)
    except ipc.ProtocolError:
        return
    assert frames, "a decoded message has at least one frame"
    assert ipc.encode(frames)[4:] == body


@given(st.binary(max_size=400), st.integers(1, 64))
def test_arbitrary_streams_raise_only_protocol_errors(stream: bytes, chunk: int) -> None:
    decoder = ipc.Decoder()
    try:
        for i in range(0, len(stream), chunk):
            for frames in decoder.feed(stream[i : i + chunk]):
                assert frames
    except ipc.ProtocolError:
        pass


@given(st.integers(ipc.MAX_BODY + 1, 2**32 - 1), st.binary(max_size=16))
def test_a_body_len_over_the_limit_is_refused_at_once(body_len: int, rest: bytes) -> None:
    with pytest.raises(ipc.ProtocolError):
        ipc.Decoder().feed(struct.pack("!I", body_len) + rest)


def exchange(messages: list[list[bytes]], reader: str) -> list[list[bytes]]:
    """Sends ``messages`` over a socket pair from a thread, then closes; reads them all with
    ``Connection.recv`` or ``recv_nowait`` until the clean end."""
    a, b = socket.socketpair()
    sender, receiver = ipc.Connection(a), ipc.Connection(b)

    def send() -> None:
        try:
            for m in messages:
                sender.send(m)
        finally:
            sender.close()

    thread = threading.Thread(target=send)
    thread.start()
    got: list[list[bytes]] = []
    try:
        while True:
            try:
                if reader == "recv":
                    got.append(receiver.recv())
                else:
                    assert select.select([receiver], [], [], 30)[0], "nothing to read"
                    got += receiver.recv_nowait()
            except EOFError:
                return got
    finally:
        thread.join(30)
        receiver.close()


# Frames from empty to past the 64 KiB zero-copy threshold, several to a message.
big_messages_st = st.lists(
    st.lists(
        st.one_of(
            st.binary(max_size=100),
            st.builds(
                lambda n, b: bytes([b]) * n, st.integers(60_000, 200_000), st.integers(0, 255)
            ),
        ),
        min_size=1,
        max_size=4,
    ),
    min_size=1,
    max_size=5,
)


@pytest.mark.parametrize("reader", ["recv", "recv_nowait"])
@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(messages=big_messages_st)
def test_messages_cross_a_socket_whole_and_in_order(
    messages: list[list[bytes]], reader: str
) -> None:
    assert exchange(messages, reader) == messages


@given(frames_st, st.data())
@settings(deadline=None)
def test_a_close_inside_a_message_is_a_protocol_error(
    frames: list[bytes], data: st.DataObject
) -> None:
    encoded = ipc.encode(frames)
    cut = data.draw(st.integers(1, len(encoded) - 1))
    a, b = socket.socketpair()
    a.sendall(encoded[:cut])
    a.close()
    receiver = ipc.Connection(b)
    try:
        assert select.select([receiver], [], [], 10)[0]
        with pytest.raises(ipc.ProtocolError):
            while True:
                assert receiver.recv_nowait() == []
    finally:
        receiver.close()
