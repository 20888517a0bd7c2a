"""Framing of the supervisor <-> worker socket, as specified in IPC.md.

A message is a list of byte frames: ``u32 body_len, u32 n_frames, (u32 len, bytes)*``,
all integers big-endian.
"""

from __future__ import annotations

import contextlib
import io
import os
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Sequence

IPC_VERSION = 2
"""The IPC's version: the supervisor passes its own (``--ipc-version``), and a worker
refuses to start on any other (IPC.md "Handshake"). Bump it with the supervisor's
``ipc_ops::IPC_VERSION`` whenever either side changes what it sends or expects."""

MAX_BODY = 1 << 30
"""Largest body either side accepts (1 GiB)."""

BytesLike = bytes | bytearray | memoryview

_U32 = struct.Struct("!I")
_HEAD = struct.Struct("!II")
# Frames this large are handed to sendmsg as they are; smaller ones are copied into
# one contiguous chunk together with the length prefixes (fewer iovecs, fewer syscalls).
_ZERO_COPY_MIN = 64 * 1024
# What one non-blocking read asks for: every request of a cell fits many times over.
_RECV_SIZE = 64 * 1024
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


def _encode_small(frames: Sequence[BytesLike]) -> bytes | None:
    """The wire bytes of a message of a few small ``bytes`` frames (the usual message),
    in one piece; None for anything else."""
    parts: list[BytesLike] = [b""]
    body_len = 4
    pack = _U32.pack
    for frame in frames:
        if frame.__class__ is not bytes:
            return None
        n = len(frame)
        body_len += 4 + n
        parts.append(pack(n))
        parts.append(frame)
    if body_len >= _ZERO_COPY_MIN or len(parts) == 1:
        return None
    parts[0] = _HEAD.pack(body_len, len(frames))
    return b"".join(parts)


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


class Decoder:
    """Incremental decoding of a byte stream: feed bytes as they arrive, in pieces of
    any size; each call returns the messages those bytes complete, in order.

    A ``ProtocolError`` leaves the decoder unusable (the stream cannot be resynchronized).
    """

    def __init__(self) -> None:
        # Bytes of an incomplete message (only ever the start of one message).
        self._partial = bytearray()

    @property
    def pending(self) -> int:
        """Bytes held of a message not yet complete (0 at a message boundary)."""
        return len(self._partial)

    def feed(self, data: BytesLike) -> list[list[bytes]]:
        partial = self._partial
        if partial:
            partial += data
            src: BytesLike = partial
        else:
            # The usual case: a read that starts at a message boundary is decoded where
            # it lies, and only an incomplete tail is copied.
            src = _view(data)
        size = len(src)
        messages: list[list[bytes]] = []
        pos = 0
        while size - pos >= 4:
            (body_len,) = _U32.unpack_from(src, pos)
            if body_len > MAX_BODY:
                raise ProtocolError(f"body_len {body_len} exceeds {MAX_BODY}")
            end = pos + 4 + body_len
            if end > size:
                break
            messages.append(decode_body(memoryview(src)[pos + 4 : end]))
            pos = end
        if src is partial:
            if pos:
                del partial[:pos]
        elif pos < size:
            partial += src[pos:]
        return messages


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

    ``send`` may be called from any thread (a lock keeps messages whole). A connection is
    read in one of two ways, by one reader: ``recv`` blocks for the next message (a
    reader thread), ``recv_nowait`` returns what has arrived (an event loop callback,
    registered on ``fileno()``). The socket itself stays blocking, so that senders block
    normally when the peer is slow to read.
    """

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._send_lock = threading.Lock()
        self._reader: io.BufferedReader | None = None
        self._decoder = Decoder()
        self._scratch: memoryview | None = None

    def fileno(self) -> int:
        return self._sock.fileno()

    def abandon(self) -> None:
        """In a forked child: close this process's copy of the socket without a shutdown
        (the parent's connection goes on) and never touch it again."""
        try:
            fd = self._sock.detach()
        except OSError:
            return
        if fd >= 0:
            os.close(fd)

    def forget(self) -> None:
        """In a forked child whose copy of the socket was closed already (by its number,
        snapshot.py's pause): never touch it, nor close it again (its number may be
        another descriptor's by now)."""
        with contextlib.suppress(OSError):
            self._sock.detach()

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
        data = _encode_small(frames)
        pieces: list[BytesLike] = _pieces(frames) if data is None else [data]
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

    def send_before(self, frames: Sequence[BytesLike], deadline: float) -> bool:
        """Send one message, or give up at ``deadline`` (``time.monotonic()``); True if
        it went out whole. Never blocks past the deadline, neither on the send lock (which
        another thread may hold mid-send) nor on a full socket: for a process about to
        end, which must not hang. A message cut off by the deadline is left incomplete
        (the peer sees the connection close inside it)."""
        if not self._send_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        try:
            view = memoryview(encode(frames))
            poller: select.poll | None = None
            while view.nbytes:
                try:
                    sent = self._sock.send(view, socket.MSG_DONTWAIT)
                except (BlockingIOError, InterruptedError):
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        return False
                    if poller is None:
                        poller = select.poll()
                        poller.register(self._sock.fileno(), select.POLLOUT)
                    poller.poll(max(1, int(remaining * 1000)))
                    continue
                view = view[sent:]
            return True
        except OSError:
            return False
        finally:
            self._send_lock.release()

    def recv_nowait(self) -> list[list[bytes]]:
        """The messages completed by what the socket holds now, without blocking (maybe
        none). Raises EOFError on a clean close between messages, once the messages
        before it have been returned; ProtocolError on a close inside a message.

        A read that does not fill the buffer ends the call without the extra read that
        would only report EAGAIN: a level-triggered reader is called again if more came.
        The socket must have no timeout (Python would wait for data before reading).
        """
        if self._scratch is None:
            if self._sock.gettimeout() is not None:
                raise ValueError("recv_nowait needs a socket without a timeout")
            self._scratch = memoryview(bytearray(_RECV_SIZE))
        scratch = self._scratch
        messages: list[list[bytes]] = []
        while True:
            try:
                n = self._sock.recv_into(scratch, _RECV_SIZE, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return messages
            if n == 0:
                if messages:
                    return messages  # the next call sees the end again
                if self._decoder.pending:
                    raise ProtocolError(
                        f"connection closed inside a message ({self._decoder.pending} bytes)"
                    )
                raise EOFError("connection closed")
            messages += self._decoder.feed(scratch[:n])
            if n < _RECV_SIZE:
                return messages

    def recv_with_fds(self, maxfds: int = 8) -> tuple[list[list[bytes]], list[int]]:
        """Block for what arrives next: the messages it completes (maybe none) and the
        descriptors that came with it (``SCM_RIGHTS``), in order. Raises EOFError on a
        clean close between messages. A connection read this way is read only this way
        (the template's link, template.py)."""
        data, fds, _flags, _addr = socket.recv_fds(self._sock, _RECV_SIZE, maxfds)
        if not data:
            for fd in fds:
                os.close(fd)
            if self._decoder.pending:
                raise ProtocolError(
                    f"connection closed inside a message ({self._decoder.pending} bytes)"
                )
            raise EOFError("connection closed")
        return self._decoder.feed(data), fds

    def recv(self) -> list[bytes]:
        """Read one message. Raises EOFError on a clean close between messages."""
        head = self._read_exact(4, eof_ok=True)
        (body_len,) = _U32.unpack(head)
        if body_len > MAX_BODY:
            raise ProtocolError(f"body_len {body_len} exceeds {MAX_BODY}")
        return decode_body(self._read_exact(body_len))

    def _read_exact(self, n: int, eof_ok: bool = False) -> bytes:
        if self._reader is None:
            self._reader = self._sock.makefile("rb")
        data = self._reader.read(n)
        if len(data) == n:
            return data
        if eof_ok and not data:
            raise EOFError("connection closed")
        raise ProtocolError(f"connection closed inside a message ({len(data)} of {n} bytes)")

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
        self._sock.close()
