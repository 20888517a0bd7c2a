"""stdout/stderr of the worker: text goes into one ordered buffer, a flusher sends it.

Both streams, and the file-descriptor capture (capture.py), append to one
``OutputBuffer``. Writes are the hot path (a 200k-line print loop is 400k calls), so a
write appends one ``(key, text)`` pair to a list and takes no lock: ``list.append`` and
the consumer's ``del items[:n]`` are atomic, the list object is never replaced, and so
nothing is lost or reordered whichever threads write. Joining and sending happen at
flush time, on the flusher thread or synchronously before any other message (outbox.py).

The buffer is bounded: once it holds more than ``OUTPUT_CAP`` characters, a write waits
until the flusher has taken them, as a write to a full pipe does. Nothing is dropped, and
the order stays that of the writes.

The flusher hands the output to its request's flow (flows.py, outbox.py), which sends it
on credit and holds what it cannot send yet. While any flow holds output, every write
takes the slow path, which makes a writer wait while its own request holds too much
(``flow_gate``): only the requests whose output is not being read wait.
"""

from __future__ import annotations

import codecs
import io
import itertools
import logging
import operator
import threading
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any, NamedTuple

log = logging.getLogger(__name__)

STDOUT = "stdout"
STDERR = "stderr"

OUTPUT_CAP = 16 << 20
"""Characters buffered before writers wait for the flusher."""

# Threads that must never wait for room: the ones the flusher depends on (itself, the fd
# reader). A finalizer that prints, run by the GC on one of them, must not deadlock.
_thread_state = threading.local()


def never_wait_here() -> None:
    """Writes from the calling thread never wait for room in an OutputBuffer."""
    _thread_state.never_wait = True


def may_wait_here(buffer: OutputBuffer) -> bool:
    """Whether the calling thread may wait for ``buffer``'s output to go (not a thread the
    flusher depends on, nor one inside a send)."""
    return not getattr(_thread_state, "never_wait", False) and buffer.may_wait()


Key = tuple[bytes | None, str]
"""(parent header bytes or None, stream name) of a piece of output."""


def _nothing() -> None:
    pass


def _always() -> bool:
    return True


def _never() -> bool:
    return False


def _open_gate(parent: bytes | None) -> None:
    pass


class Run(NamedTuple):
    """Consecutive output of one stream for one parent request."""

    parent: bytes | None
    name: str
    text: str


_key = operator.itemgetter(0)
_text = operator.itemgetter(1)


class OutputBuffer:
    """Output not yet sent, in write order.

    ``parent_var`` holds the header bytes of the request whose code is running in the
    current context; ``fallback_parent`` (the latest execute request) covers threads
    started by user code and bytes read from the captured file descriptors.
    """

    def __init__(self, parent_var: ContextVar[bytes | None], cap: int = OUTPUT_CAP) -> None:
        self.parent_var = parent_var
        self.fallback_parent: bytes | None = None
        self.items: list[tuple[Key, str]] = []
        # Characters appended (by writers) and taken (by the consumer): what the buffer
        # holds is the difference. Writers racing on ``written`` may lose an update, and
        # take() resynchronizes when it empties the buffer, so the cap is approximate by
        # at most a write per thread.
        self.cap = cap
        self.written = 0
        self.taken = 0
        self._room = threading.Condition(threading.Lock())
        # Wired by the worker: flush now (the buffer is full); whether this thread may
        # wait (not while it holds what the flusher needs, e.g. the outbox's lock).
        self.on_full: Callable[[], None] = _nothing
        self.may_wait: Callable[[], bool] = _always
        # True from the first write after a take() until the next take(): a write that
        # finds it False wakes the flusher (checked after appending, so no wake is lost).
        self.pending = False
        # What ``written`` may reach before a write takes the slow path (one comparison
        # on the hot path covers both cases): -1 while not pending (the next write wakes
        # the flusher), else the point where the buffer holds ``cap``.
        self.limit = -1
        # Wired by the worker: wake the flusher, drain the fd pipes.
        self.on_first_write: Callable[[], None] = _nothing
        self.before_first_write: Callable[[], None] = _nothing
        # Wired by the outbox. Set while some request holds output it may not send yet
        # (then every write takes the slow path, and ``limit`` stays -1).
        self.check_flows = False
        # Waits while the request of ``parent`` holds too much (a writer of its output).
        self.flow_gate: Callable[[bytes | None], None] = _open_gate
        # Whether the fd pipes' request holds too much: then they are not drained.
        self.fd_held_up: Callable[[], bool] = _never

    def current_parent(self) -> bytes | None:
        return self.parent_var.get() or self.fallback_parent

    def write(self, key: Key, text: str) -> None:
        """Appends ``text``; never waits (the fd reader and the flush path use it)."""
        self.items.append((key, text))
        self.written += len(text)
        if self.written > self.limit:
            self._noted()

    def _noted(self) -> None:
        """A write passed ``limit``: the first one after a take, or one that filled the
        buffer."""
        if not self.pending:
            self.pending = True
            self.limit = -1 if self.check_flows else self.taken + self.cap
            self.on_first_write()

    def written_past_limit(self, key: Key) -> None:
        """What a stream's write does once it passes ``limit``: wake the flusher if it was
        the first write since a take, wait while the writer's request holds too much, and
        wait if the buffer is full."""
        self._noted()
        if self.check_flows and self._may_wait():
            self.flow_gate(key[0])
        if self.written - self.taken > self.cap:
            self.wait_for_room()

    def drain_fds(self) -> None:
        """What a write into an empty buffer does first: take in what the fd pipes hold
        (written before it), unless their request holds too much already."""
        if not (self.check_flows and self.fd_held_up()):
            self.before_first_write()

    def _may_wait(self) -> bool:
        return not getattr(_thread_state, "never_wait", False) and self.may_wait()

    def write_fd(self, name: str, text: str) -> None:
        self.write((self.fallback_parent, name), text)

    @property
    def size(self) -> int:
        """Characters held (approximately, see ``written``)."""
        return self.written - self.taken

    def wait_for_room(self) -> None:
        """While more than ``cap`` characters are held, have them flushed and wait, as a
        writer to a full pipe does (interruptible: SIGINT raises KeyboardInterrupt here).
        Returns at once on threads that must not wait (``never_wait_here``, ``may_wait``)."""
        if self.written - self.taken <= self.cap:
            return
        if not self._may_wait():
            return
        self.wait_until_room()

    def wait_until_room(self) -> None:
        """Waits until at most ``cap`` characters are held, and the fd pipes' request
        does not hold too much, whatever the thread (the fd reader calls it, holding
        nothing, before it reads more)."""
        with self._room:
            while self.written - self.taken > self.cap:
                self.on_full()
                # A timeout, so that a notify lost to take()'s non-blocking acquire (or
                # an approximate count) costs at most this long.
                self._room.wait(0.1)
        if self.check_flows:
            self.flow_gate(self.fallback_parent)

    def take(self) -> list[Run]:
        """Remove everything buffered; return it grouped into runs."""
        self.pending = False
        self.limit = -1
        items = self.items
        n = len(items)
        if not n:
            return []
        taken = items[:n]
        del items[:n]  # items appended meanwhile stay, in order
        # groupby/itemgetter keep the per-item work in C (200k prints are 400k items).
        runs = [
            Run(key[0], key[1], "".join(map(_text, group)))
            for key, group in itertools.groupby(taken, _key)
        ]
        del taken
        self.taken += sum(len(run.text) for run in runs)
        if not items:
            self.taken = self.written
        # Never blocks: take() also runs inside a fatal signal's handler (crash.py), maybe
        # on a thread that holds this lock; waiters then see the room at their timeout.
        if self._room.acquire(blocking=False):
            self._room.notify_all()
            self._room.release()
        return runs


class Flusher:
    """Sends buffered output: the first bytes at once, then at most once per interval.

    The thread sleeps on an event that the buffer sets when a write lands in an empty
    buffer, so an idle worker does not wake up.
    """

    def __init__(self, flush: Callable[[], None], interval: float = 0.05) -> None:
        self._flush = flush
        self._interval = interval
        self._event = threading.Event()
        # Set by wake_now: skip the interval (writers wait on a full buffer).
        self._urgent = threading.Event()
        self._last = 0.0

    def start(self) -> None:
        threading.Thread(target=self._loop, name="kernelvisor-flusher", daemon=True).start()

    def wake(self) -> None:
        self._event.set()

    def wake_now(self) -> None:
        """Flush as soon as possible, without waiting for the interval: the buffer is full."""
        self._urgent.set()
        self._event.set()

    def flush_requested(self) -> None:
        """A stream's flush(): send now unless we just did, else let the thread do it.

        Sending at once keeps output that precedes a crash; the rate limit keeps
        ``print(..., flush=True)`` in a tight loop from becoming one message a line.
        """
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._flush()
        else:
            self._event.set()

    def _loop(self) -> None:
        never_wait_here()
        while True:
            self._event.wait()
            self._event.clear()
            delay = self._last + self._interval - time.monotonic()
            if delay > 0:
                self._urgent.wait(delay)
            self._urgent.clear()
            self._last = time.monotonic()
            try:
                self._flush()
            except Exception:
                log.exception("flushing output failed")


class _WriteOnly:
    """What a captured output stream says about itself (to ``print``, libraries, ``!cmd``)."""

    def isatty(self) -> bool:
        return False

    def readable(self) -> bool:
        return False

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


class OutStream(_WriteOnly, io.TextIOBase):
    """``sys.stdout`` / ``sys.stderr`` replacement writing into an OutputBuffer."""

    encoding = "utf-8"  # type: ignore[assignment]
    errors = "strict"  # type: ignore[assignment]
    newlines = None
    line_buffering = False

    def __init__(self, buffer: OutputBuffer, flusher: Flusher, name: str, fd: int) -> None:
        super().__init__()
        self._buffer = buffer
        self._parent_var = buffer.parent_var
        self._flusher = flusher
        self._name = name
        self._fd = fd
        self._key_cache: tuple[bytes | None, Key] = (None, (None, name))
        self._binary: BinaryWriter | None = None

    @property
    def name(self) -> str:  # type: ignore[override]
        return f"<{self._name}>"

    def write(self, text: str) -> int:
        if text.__class__ is not str and not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        buf = self._buffer
        parent = self._parent_var.get() or buf.fallback_parent
        cache = self._key_cache  # (parent, key): one attribute, so threads see a pair
        if cache[0] is not parent:
            cache = (parent, (parent, self._name))
            self._key_cache = cache
        items = buf.items
        if not items:
            # Bytes already in the fd pipes were written before this text: queue them first.
            buf.drain_fds()
        key = cache[1]
        items.append((key, text))
        n = len(text)
        written = buf.written + n
        buf.written = written
        if written > buf.limit:
            buf.written_past_limit(key)
        return n

    def flush(self) -> None:
        self._flusher.flush_requested()

    def close(self) -> None:
        # Closing the process's stdout from a cell would silence every later cell.
        self.flush()

    def fileno(self) -> int:
        return self._fd

    def reconfigure(self, **kwargs: Any) -> None:
        """Accepted and ignored: the stream is always UTF-8 text (scripts often call it)."""

    @property
    def buffer(self) -> BinaryWriter:  # type: ignore[override]
        if self._binary is None:
            self._binary = BinaryWriter(self)
        return self._binary


class BinaryWriter(_WriteOnly, io.BufferedIOBase):
    """``sys.stdout.buffer``: bytes are decoded as UTF-8 and written as text."""

    def __init__(self, stream: OutStream) -> None:
        super().__init__()
        self._stream = stream
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._lock = threading.Lock()

    def write(self, data: Any) -> int:
        view = memoryview(data)
        with self._lock:
            text = self._decoder.decode(view.tobytes())
        if text:
            self._stream.write(text)
        return view.nbytes

    def flush(self) -> None:
        self._stream.flush()

    def close(self) -> None:
        self.flush()

    def fileno(self) -> int:
        return self._stream.fileno()
