"""Framing of the supervisor <-> worker socket, as specified in IPC.md.

A message is a list of byte frames: ``u32 body_len, u32 n_frames, (u32 len, bytes)*``,
all integers big-endian.
"""

from __future__ import annotations

import os
import socket
import struct
import threading
from collections.abc import Iterable, Sequence

MAX_BODY = 1 << 30
"""Largest body either side accepts (1 GiB)."""

BytesLike = bytes | bytearray | memoryview

_U32 = struct.Struct("!I")
_HEAD = struct.Struct("!II")
# Frames this large are handed to sendmsg as they are; smaller ones are copied into
# one contiguous chunk together with the length prefixes (fewer iovecs, fewer syscalls).
_ZERO_COPY_MIN = 64 * 1024
_IOV_MAX = min(os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") else 1024, 1024)


class ProtocolError(Exception):
    """The peer broke the framing rules; the connection cannot be trusted any more."""


def _view(frame: BytesLike) -> memoryview:
    view = memoryview(frame)
    if not view.c_contiguous:
        view = memoryview(view.tobytes())
    return view.cast("B") if view.format != "B" or view.ndim != 1 else view


def _pieces(frames: Iterable[BytesLike]) -> list[BytesLike]:
    """The wire bytes of one message, as few pieces as possible without copying big frames."""
    views = [_view(f) for f in frames]
    if not views:
        raise ProtocolError("a message needs at least one frame")
    body_len = 4 + sum(4 + v.nbytes for v in views)
    if body_len > MAX_BODY:
        raise ProtocolError(f"message body of {body_len} bytes exceeds {MAX_BODY}")
    pieces: list[BytesLike] = []
    chunk = bytearray(_HEAD.pack(body_len, len(views)))
    for v in views:
        chunk += _U32.pack(v.nbytes)
        if v.nbytes >= _ZERO_COPY_MIN:
            pieces.append(chunk)
            pieces.append(v)
            chunk = bytearray()
        else:
            chunk += v
    if chunk:
        pieces.append(chunk)
    return pieces


def encode(frames: Sequence[BytesLike]) -> bytes:
    """The complete wire encoding of one message (length prefix included)."""
    return b"".join(_pieces(frames))


def decode_body(body: BytesLike) -> list[bytes]:
    """Split a message body (the bytes after ``body_len``) into its frames."""
    view = _view(body)
    size = view.nbytes
    if size < 4:
        raise ProtocolError("message body shorter than its frame count")
    (n_frames,) = _U32.unpack_from(view, 0)
    if n_frames == 0:
        raise ProtocolError("message has zero frames")
    if n_frames > (size - 4) // 4:
        raise ProtocolError(f"{n_frames} frames cannot fit in a {size}-byte body")
    frames: list[bytes] = []
    offset = 4
    for _ in range(n_frames):
        if offset + 4 > size:
            raise ProtocolError("frames do not add up to body_len")
        (length,) = _U32.unpack_from(view, offset)
        offset += 4
        end = offset + length
        if end > size:
            raise ProtocolError("frames do not add up to body_len")
        frames.append(bytes(view[offset:end]))
        offset = end
    if offset != size:
        raise ProtocolError("frames do not add up to body_len")
    return frames


def decode(message: BytesLike) -> list[bytes]:
    """Decode one complete message (length prefix included)."""
    view = _view(message)
    if view.nbytes < 4:
        raise ProtocolError("truncated message")
    (body_len,) = _U32.unpack_from(view, 0)
    if body_len > MAX_BODY:
        raise ProtocolError(f"body_len {body_len} exceeds {MAX_BODY}")
    if view.nbytes != 4 + body_len:
        raise ProtocolError(f"message of {view.nbytes} bytes does not match body_len {body_len}")
    return decode_body(view[4:])


class Connection:
    """A connected stream socket speaking the framing above.

    ``send`` may be called from any thread (a lock keeps messages whole); ``recv`` is
    meant for a single reader thread.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._reader = sock.makefile("rb")

    @classmethod
    def connect(cls, path: str) -> Connection:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
        except BaseException:
            sock.close()
            raise
        return cls(sock)

    def send(self, frames: Sequence[BytesLike]) -> None:
        pieces = _pieces(frames)
        with self._send_lock:
            self._send_all(pieces)

    def _send_all(self, pieces: list[BytesLike]) -> None:
        views = [memoryview(p) for p in pieces]
        interrupted: BaseException | None = None
        i = 0
        while i < len(views):
            try:
                sent = self._sock.sendmsg(views[i : i + _IOV_MAX])
            except KeyboardInterrupt as exc:
                # A SIGINT handler raised inside sendmsg: nothing of this call went out,
                # but earlier bytes did, so finish the message before letting it through.
                interrupted = exc
                continue
            while sent:
                n = views[i].nbytes
                if sent >= n:
                    sent -= n
                    i += 1
                else:
                    views[i] = views[i][sent:]
                    sent = 0
            while i < len(views) and views[i].nbytes == 0:
                i += 1
        if interrupted is not None:
            raise interrupted

    def recv(self) -> list[bytes]:
        """Read one message. Raises EOFError on a clean close between messages."""
        head = self._read_exact(4, eof_ok=True)
        (body_len,) = _U32.unpack(head)
        if body_len > MAX_BODY:
            raise ProtocolError(f"body_len {body_len} exceeds {MAX_BODY}")
        return decode_body(self._read_exact(body_len))

    def _read_exact(self, n: int, eof_ok: bool = False) -> bytes:
        data = self._reader.read(n)
        if len(data) == n:
            return data
        if eof_ok and not data:
            raise EOFError("connection closed")
        raise ProtocolError(f"connection closed inside a message ({len(data)} of {n} bytes)")

    def close(self) -> None:
        self._reader.close()
        self._sock.close()
