"""Capture of file descriptors 1 and 2.

Output written below Python (C extensions, ``os.write``, ``os.system``, ``!ls``,
subprocesses) goes to fds 1 and 2, which become the write ends of pipes. A reader thread
decodes what arrives into the OutputBuffer; the read ends are non-blocking so that a
flush can also drain them, under the same lock, before a reply goes out.

While the OutputBuffer is full, the reader thread stops reading: the pipes fill up, and
whoever writes to fds 1 and 2 waits, as with any full pipe (a flush still drains what
the pipes hold, so that nothing written before a message is left behind).
"""

from __future__ import annotations

import codecs
import contextlib
import fcntl
import logging
import os
import select
import sys
import threading
import time
from dataclasses import dataclass, field

from kernelvisor.streams import STDERR, STDOUT, OutputBuffer, never_wait_here

log = logging.getLogger(__name__)

PIPE_SIZE = 1 << 20
_READ_SIZE = 1 << 20
# Linux value, for Pythons whose fcntl module does not name it.
_F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)


def _utf8_decoder() -> codecs.IncrementalDecoder:
    return codecs.getincrementaldecoder("utf-8")(errors="replace")


@dataclass
class _Pipe:
    fd: int  # read end
    name: str
    capacity: int = 64 << 10  # bytes the pipe holds (Linux's default until set)
    decoder: codecs.IncrementalDecoder = field(default_factory=_utf8_decoder)
    open: bool = True


class FdCapture:
    def __init__(self, buffer: OutputBuffer) -> None:
        self._buffer = buffer
        # Reentrant: a finalizer run by the GC inside a drain may print, and the first
        # write after a flush drains (OutStream.write).
        self._lock = threading.RLock()
        self._pipes: list[_Pipe] = []
        # drain() asks "anything there?" with one poll() of both pipes rather than a
        # read() of each: it runs before every message the worker sends.
        self._drain_poller = select.poll()

    def start(self) -> None:
        """Point fds 1 and 2 at new pipes and start reading them."""
        for target, name in ((1, STDOUT), (2, STDERR)):
            read_fd, write_fd = os.pipe()
            capacity = 64 << 10
            if sys.platform.startswith("linux"):
                # Fails above /proc/sys/fs/pipe-max-size: then the default size stays.
                with contextlib.suppress(OSError):
                    capacity = fcntl.fcntl(write_fd, _F_SETPIPE_SZ, PIPE_SIZE)
            os.set_blocking(read_fd, False)
            os.dup2(write_fd, target)  # inheritable: child processes write here too
            os.close(write_fd)
            self._pipes.append(_Pipe(read_fd, name, capacity))
            self._drain_poller.register(read_fd, select.POLLIN)
        threading.Thread(target=self._loop, name="kernelvisor-fd-capture", daemon=True).start()

    def restart_after_fork(self) -> None:
        """In a promoted snapshot: new pipes on fds 1 and 2 and a new reader thread. The
        old pipes were shared with the dead worker (and its reader did not survive the
        fork)."""
        self._lock = threading.RLock()
        for pipe in self._pipes:
            with contextlib.suppress(OSError):
                os.close(pipe.fd)
        self._pipes = []
        self._drain_poller = select.poll()
        self.start()

    def _loop(self) -> None:
        # Prints from this thread (a finalizer run by the GC) must not wait: it may hold
        # the lock that the flusher needs. It waits here instead, holding nothing.
        never_wait_here()
        poller = select.poll()
        by_fd = {p.fd: p for p in self._pipes}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        while by_fd:
            self._buffer.wait_until_room()
            for fd, _events in poller.poll():
                pipe = by_fd[fd]
                with self._lock:
                    self._read_once(pipe)
                if not pipe.open:
                    poller.unregister(fd)
                    del by_fd[fd]

    def _read_once(self, pipe: _Pipe) -> int:
        """Move one chunk from the pipe into the buffer; the bytes read (0 when nothing
        was there, or at the end)."""
        if not pipe.open:
            return 0
        try:
            data = os.read(pipe.fd, _READ_SIZE)
        except BlockingIOError:
            return 0
        except OSError:
            log.exception("reading captured %s failed", pipe.name)
            pipe.open = False
            return 0
        if not data:
            # Every write end is closed (the user closed fd 1/2 and no child keeps it).
            pipe.open = False
            data = b""
            text = pipe.decoder.decode(data, final=True)
        else:
            text = pipe.decoder.decode(data)
        if text:
            self._buffer.write_fd(pipe.name, text)
        return len(data)

    def drain(self) -> None:
        """Move everything already written to fds 1 and 2 into the buffer."""
        with self._lock:
            self._drain_locked()

    def drain_before(self, deadline: float) -> bool:
        """``drain`` for a process about to end: waits for the lock (the reader thread
        may hold it) no later than ``deadline``, and not at all if this very thread holds
        it (it was stopped inside a read: its state cannot be trusted). True if drained."""
        lock = self._lock
        if lock._is_owned():  # type: ignore[attr-defined]
            return False
        if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return False
        try:
            self._drain_locked()
        finally:
            lock.release()
        return True

    def _drain_locked(self) -> None:
        ready = self._drain_poller.poll(0)
        if not ready:
            return
        fds = {fd for fd, _events in ready}
        for pipe in self._pipes:  # stdout first, as written
            if pipe.fd in fds:
                # What the pipe held when the drain started fits in its capacity; more
                # was written since (a writer still running), and reading on would let
                # it fill the OutputBuffer past its cap.
                read = 0
                while read < pipe.capacity:
                    n = self._read_once(pipe)
                    if not n:
                        break
                    read += n
                if not pipe.open:  # at EOF a pipe stays readable: stop asking
                    self._drain_poller.unregister(pipe.fd)


class CStdio:
    """Buffers below our streams: libc's stdio and Python's original ``sys.__stdout__``.

    With fd 1 a pipe, both would fully buffer (e.g. ``printf`` in a C extension); making
    them line buffered, and flushing them at cell end, keeps that output inside its cell.
    """

    def __init__(self) -> None:
        for original in (sys.__stdout__, sys.__stderr__):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                original.reconfigure(line_buffering=True)  # type: ignore[union-attr]
        self._fflush = None
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            self._fflush = libc.fflush
            self._fflush.argtypes = [ctypes.c_void_p]
            if sys.platform.startswith("linux"):
                stdout = ctypes.c_void_p.in_dll(libc, "stdout")
                libc.setvbuf(stdout, None, 1, 0)  # _IOLBF, before any C-level output
        except (OSError, AttributeError, ValueError):
            log.debug("C stdio not reachable", exc_info=True)

    def flush(self) -> None:
        # Once per cell: plain try/except is cheaper than contextlib.suppress.
        for original in (sys.__stdout__, sys.__stderr__):
            try:  # noqa: SIM105
                original.flush()  # type: ignore[union-attr]
            except (AttributeError, ValueError, OSError):
                pass
        if self._fflush is not None:
            self._fflush(None)
