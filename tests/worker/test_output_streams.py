from __future__ import annotations

import threading
import time
from contextvars import ContextVar, copy_context

import pytest
from kernelvisor.streams import STDERR, STDOUT, Flusher, OutputBuffer, OutStream


class _Recorder:
    """Stands in for Outbox.flush_streams: takes the runs and records them."""

    def __init__(self, buffer: OutputBuffer) -> None:
        self.buffer = buffer
        self.flushes: list[list[tuple[bytes | None, str, str]]] = []
        self.lock = threading.Lock()

    def __call__(self) -> None:
        runs = self.buffer.take()
        with self.lock:
            self.flushes.append([(r.parent, r.name, r.text) for r in runs])

    def text(self) -> str:
        return "".join(t for f in self.flushes for _, _, t in f)


def _streams(interval: float = 0.05) -> tuple[OutputBuffer, Flusher, OutStream, OutStream]:
    buffer = OutputBuffer(ContextVar("parent", default=None))
    flusher = Flusher(lambda: None, interval)
    return (
        buffer,
        flusher,
        OutStream(buffer, flusher, STDOUT, 1),
        OutStream(buffer, flusher, STDERR, 2),
    )


def test_runs_follow_write_order_stream_and_parent() -> None:
    buffer, _, out, err = _streams()
    buffer.parent_var.set(b"P1")
    out.write("a")
    out.write("b")
    err.write("c")
    out.write("d")
    buffer.parent_var.set(b"P2")
    out.write("e")
    runs = buffer.take()
    assert [(r.parent, r.name, r.text) for r in runs] == [
        (b"P1", "stdout", "ab"),
        (b"P1", "stderr", "c"),
        (b"P1", "stdout", "d"),
        (b"P2", "stdout", "e"),
    ]
    assert buffer.take() == []


def test_parent_falls_back_and_fd_output_uses_fallback() -> None:
    buffer, _, out, _ = _streams()
    out.write("orphan")
    buffer.fallback_parent = b"LAST"
    out.write("thread")
    buffer.write_fd("stderr", "fd")
    ctx = copy_context()
    ctx.run(buffer.parent_var.set, b"TASK")
    ctx.run(out.write, "task")
    assert [(r.parent, r.name, r.text) for r in buffer.take()] == [
        (None, "stdout", "orphan"),
        (b"LAST", "stdout", "thread"),
        (b"LAST", "stderr", "fd"),
        (b"TASK", "stdout", "task"),
    ]


def test_textio_surface() -> None:
    _, _, out, err = _streams()
    assert out.write("héllo") == 5
    with pytest.raises(TypeError):
        out.write(b"bytes")  # type: ignore[arg-type]
    assert (out.fileno(), err.fileno()) == (1, 2)
    assert not out.isatty() and out.writable() and not out.readable()
    assert out.encoding == "utf-8" and out.name == "<stdout>"
    out.close()
    assert not out.closed
    print("x", file=out)
    out.writelines(["y", "z"])


def test_binary_buffer_decodes_split_utf8() -> None:
    buffer, _, out, _ = _streams()
    data = "é€".encode()
    for i in range(len(data)):
        out.buffer.write(data[i : i + 1])
    assert "".join(r.text for r in buffer.take()) == "é€"


def test_concurrent_writers_lose_nothing() -> None:
    buffer, _, out, _ = _streams()
    n, threads = 20_000, 4
    taken: list[str] = []
    stop = threading.Event()

    def consume() -> None:
        while not stop.is_set():
            taken.extend(r.text for r in buffer.take())

    def produce(tag: int) -> None:
        for i in range(n):
            out.write(f"{tag}:{i}\n")

    consumer = threading.Thread(target=consume)
    consumer.start()
    producers = [threading.Thread(target=produce, args=(t,)) for t in range(threads)]
    for p in producers:
        p.start()
    for p in producers:
        p.join()
    stop.set()
    consumer.join()
    taken.extend(r.text for r in buffer.take())
    lines = "".join(taken).splitlines()
    assert len(lines) == n * threads
    for t in range(threads):  # each writer's own order is kept
        assert [line for line in lines if line.startswith(f"{t}:")] == [
            f"{t}:{i}" for i in range(n)
        ]


def test_flusher_sends_first_bytes_at_once_then_coalesces() -> None:
    buffer = OutputBuffer(ContextVar("parent", default=b"P"))
    recorder = _Recorder(buffer)
    flusher = Flusher(recorder, interval=0.2)
    buffer.on_first_write = flusher.wake
    out = OutStream(buffer, flusher, STDOUT, 1)
    flusher.start()
    time.sleep(0.25)  # well past an interval: the first write goes out at once

    out.write("first")
    deadline = time.monotonic() + 0.1
    while not recorder.flushes and time.monotonic() < deadline:
        time.sleep(0.002)
    assert recorder.text() == "first"

    for i in range(1000):
        out.write(f"{i},")
    time.sleep(0.05)
    assert recorder.text() == "first"  # coalescing: still inside the interval
    time.sleep(0.3)
    assert recorder.text() == "first" + "".join(f"{i}," for i in range(1000))
    assert len(recorder.flushes) == 2


def test_stream_flush_is_synchronous_unless_just_flushed() -> None:
    buffer = OutputBuffer(ContextVar("parent", default=b"P"))
    recorder = _Recorder(buffer)
    flusher = Flusher(recorder, interval=10.0)  # the thread is not started
    out = OutStream(buffer, flusher, STDOUT, 1)
    out.write("a")
    out.flush()
    assert recorder.text() == "a"
    out.write("b")
    out.flush()  # rate limited: left to the flusher thread
    assert recorder.text() == "a"
