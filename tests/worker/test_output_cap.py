"""The OutputBuffer's cap: writers wait for the flusher once it holds more than ``cap``
characters (as writers to a full pipe do), lose nothing, and the threads the flusher
depends on never wait."""

from __future__ import annotations

import threading
import time
from contextvars import ContextVar

from kernelvisor.streams import STDOUT, Flusher, OutputBuffer, OutStream, never_wait_here

CAP = 1000


def _capped() -> tuple[OutputBuffer, OutStream, list[str]]:
    buffer = OutputBuffer(ContextVar("parent", default=b"P"), cap=CAP)
    flusher = Flusher(lambda: None, interval=10.0)
    fulls: list[str] = []
    buffer.on_full = lambda: fulls.append("full")
    return buffer, OutStream(buffer, flusher, STDOUT, 1), fulls


def _writer(out: OutStream, texts: list[str]) -> threading.Thread:
    thread = threading.Thread(target=lambda: [out.write(t) for t in texts], daemon=True)
    thread.start()
    return thread


def test_a_writer_waits_at_the_cap_and_resumes_when_taken() -> None:
    buffer, out, fulls = _capped()
    texts = [f"{i:04d}" + "x" * 396 for i in range(10)]  # 400 chars each
    writer = _writer(out, texts)
    time.sleep(0.3)
    assert writer.is_alive(), "the writer should wait once the buffer is over its cap"
    assert fulls, "a full buffer asks for a flush"
    # It waits right after the write that crossed the cap: 3 writes (1200 chars).
    assert buffer.size == 1200
    taken = "".join(r.text for r in buffer.take())
    deadline = time.monotonic() + 5
    while writer.is_alive() and time.monotonic() < deadline:
        taken += "".join(r.text for r in buffer.take())
        time.sleep(0.01)
    assert not writer.is_alive()
    taken += "".join(r.text for r in buffer.take())
    assert taken == "".join(texts)
    assert buffer.size == 0


def test_one_write_larger_than_the_cap_goes_in_whole() -> None:
    buffer, out, _ = _capped()
    big = "y" * (5 * CAP)
    writer = _writer(out, [big])
    time.sleep(0.2)
    assert writer.is_alive()
    assert [r.text for r in buffer.take()] == [big]
    writer.join(5)
    assert not writer.is_alive()


def test_threads_the_flusher_needs_never_wait() -> None:
    buffer, out, _ = _capped()

    def exempt() -> None:
        never_wait_here()
        for _ in range(10):
            out.write("z" * 400)

    thread = threading.Thread(target=exempt, daemon=True)
    thread.start()
    thread.join(5)
    assert not thread.is_alive()
    assert buffer.size == 4000


def test_a_thread_holding_the_outbox_lock_does_not_wait() -> None:
    buffer, out, _ = _capped()
    buffer.may_wait = lambda: False
    for _ in range(10):
        out.write("z" * 400)  # returns: would deadlock if it waited
    assert buffer.size == 4000


def test_fd_writes_never_wait() -> None:
    buffer, _, _ = _capped()
    for _ in range(10):
        buffer.write_fd(STDOUT, "f" * 400)
    assert buffer.size == 4000


def test_a_waiting_writer_is_woken_by_wake_now_despite_the_interval() -> None:
    buffer = OutputBuffer(ContextVar("parent", default=b"P"), cap=CAP)
    flushes: list[float] = []

    def flush() -> None:
        buffer.take()
        flushes.append(time.monotonic())

    flusher = Flusher(flush, interval=30.0)
    buffer.on_first_write = flusher.wake
    buffer.on_full = flusher.wake_now
    out = OutStream(buffer, flusher, STDOUT, 1)
    flusher.start()
    out.write("first")  # the first write of a quiet buffer goes at once
    deadline = time.monotonic() + 5
    while not flushes and time.monotonic() < deadline:
        time.sleep(0.01)
    assert flushes
    start = time.monotonic()
    for _ in range(20):  # 8000 chars: over the cap several times within the interval
        out.write("w" * 400)
    assert time.monotonic() - start < 10, "a full buffer must not wait for the 30 s interval"
    assert len(flushes) >= 2
