"""Output credit per request (IPC.md "Flow control"), in the worker's outbox: a request out
of credit keeps its output and its writers wait, while other requests' output and every
request's reply go on; credit returned sends what was held, in order, and a reply never
overtakes its own request's output."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Any

import pytest
from kernelvisor import flows, outbox
from kernelvisor.flows import message_size
from kernelvisor.interrupts import SigintGate
from kernelvisor.outbox import Outbox
from kernelvisor.streams import STDOUT, Flusher, OutputBuffer, OutStream

A = b'{"msg_id":"a"}'
B = b'{"msg_id":"b"}'
WINDOW = 4000


class FakeMain:
    """The supervisor's side of ``main``: records what the worker sends."""

    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []
        self.lock = threading.Lock()

    def send(self, frames: list[Any]) -> None:
        with self.lock:
            self.sent.append([bytes(f) for f in frames])

    def send_before(self, frames: list[Any], deadline: float) -> bool:
        self.send(frames)
        return True

    def taken(self) -> list[list[bytes]]:
        with self.lock:
            sent, self.sent = self.sent, []
        return sent


class Rig:
    def __init__(self) -> None:
        self.main = FakeMain()
        self.parent: ContextVar[bytes | None] = ContextVar("parent", default=None)
        self.buffer = OutputBuffer(self.parent, cap=2000)
        self.outbox = Outbox(self.main, self.buffer, SigintGate(), lambda: None, self._orphan)  # type: ignore[arg-type]
        self.flusher = Flusher(self.outbox.flush_streams, interval=0.01)
        self.buffer.on_first_write = self.flusher.wake
        self.buffer.on_full = self.flusher.wake_now
        self.outbox.wake_flusher = self.flusher.wake_now
        self.flusher.start()
        self.out = OutStream(self.buffer, self.flusher, STDOUT, 1)
        self.outbox.attach_main(self.main)  # type: ignore[arg-type]

    def _orphan(self, name: str, text: str) -> None:
        raise AssertionError(f"orphan output {text!r}")

    def write_as(self, parent: bytes, text: str) -> None:
        token = self.parent.set(parent)
        try:
            self.out.write(text)
        finally:
            self.parent.reset(token)

    def publish(self, sent: list[list[bytes]]) -> None:
        """What the supervisor does once IOPub took them: credit goes back per flow."""
        pairs: dict[int, int] = {}
        for frames in sent:
            control = json.loads(frames[0])
            if control["op"] == "iopub" and "flow" in control:
                pairs[control["flow"]] = pairs.get(control["flow"], 0) + message_size(frames)
        self.outbox.credit([[f, n] for f, n in pairs.items()])


@pytest.fixture
def rig(monkeypatch: pytest.MonkeyPatch) -> Iterator[Rig]:
    # Small windows, so a few writes exhaust them.
    monkeypatch.setattr(flows, "WINDOW", WINDOW)
    monkeypatch.setattr(flows, "TOTAL", 3 * WINDOW)
    monkeypatch.setattr(flows, "SMALL", 500)
    monkeypatch.setattr(flows, "RESERVE", WINDOW)
    monkeypatch.setattr(flows, "HOLD", 2 * WINDOW)
    monkeypatch.setattr(outbox, "STREAM_CHUNK_CHARS", 1000)
    yield Rig()


def texts(sent: list[list[bytes]], parent: bytes) -> str:
    return "".join(
        json.loads(f[3])["text"]
        for f in sent
        if json.loads(f[0]).get("msg_type") == "stream" and f[1] == parent
    )


def ops(sent: list[list[bytes]], parent: bytes | None = None) -> list[str]:
    out = []
    for frames in sent:
        control = json.loads(frames[0])
        if control["op"] == "iopub" and parent is not None and frames[1] != parent:
            continue
        out.append(control.get("msg_type") or control["op"])
    return out


def settle(rig: Rig) -> list[list[bytes]]:
    rig.outbox.flush_streams()
    return rig.main.taken()


def test_iopub_messages_name_their_flow_and_its_size_is_what_the_supervisor_counts(
    rig: Rig,
) -> None:
    rig.outbox.iopub("display_data", A, {"data": {}}, buffers=[memoryview(b"xyz" * 10)])
    rig.outbox.iopub("display_data", B, {"data": {}})
    a, b = rig.main.sent
    ca, cb = json.loads(a[0]), json.loads(b[0])
    assert ca["op"] == "iopub" and ca["msg_type"] == "display_data"
    assert isinstance(ca["flow"], int) and ca["flow"] != cb["flow"]
    assert message_size(a) == sum(len(f) for f in a)
    assert rig.outbox._flows.total == sum(len(f) for f in a) + sum(len(f) for f in b)
    rig.publish(rig.main.taken())
    assert rig.outbox._flows.total == 0


def test_a_request_out_of_credit_holds_its_output_and_others_go_on(rig: Rig) -> None:
    rig.write_as(A, "a" * (3 * WINDOW))
    sent = settle(rig)
    # A sends while it has credit (one message may take it past its window), then holds.
    assert 0 < len(texts(sent, A)) < 3 * WINDOW
    assert rig.outbox._flows.holding
    # B has credit of its own: its output, a display and its reply go at once.
    rig.write_as(B, "b" * 100)
    rig.outbox.iopub("display_data", B, {"data": {"text/plain": "1"}})
    rig.outbox.reply(7, {"status": "ok"}, parent=B)
    sent = rig.main.taken()
    assert texts(sent, B) == "b" * 100
    assert ops(sent, B) == ["stream", "display_data", "reply"]
    assert not texts(sent, A), "A is out of credit"


def test_a_reply_waits_for_its_own_held_output_then_everything_arrives_in_order(
    rig: Rig,
) -> None:
    expected = "".join(f"{i:05d}\n" for i in range(3000))  # 18000 chars: several windows
    rig.write_as(A, expected)
    unpublished = settle(rig)
    assert rig.outbox._flows.holding
    replied = threading.Event()

    def reply_a() -> None:
        rig.outbox.reply(1, {"status": "ok"}, parent=A)
        replied.set()

    thread = threading.Thread(target=reply_a, daemon=True)
    thread.start()
    assert not replied.wait(0.3), "A's reply overtook A's held output"
    unpublished += rig.main.taken()
    sent = list(unpublished)
    deadline = time.monotonic() + 10
    while not replied.is_set():
        assert time.monotonic() < deadline, "credit came back, yet the reply never went"
        rig.publish(unpublished)
        time.sleep(0.02)
        unpublished = rig.main.taken()
        sent += unpublished
    thread.join(5)
    sent += rig.main.taken()
    assert ops(sent)[-1] == "reply"
    assert texts(sent, A) == expected


def test_a_writer_waits_while_its_request_holds_too_much(rig: Rig) -> None:
    done = threading.Event()

    def flood() -> None:
        for _ in range(40):
            rig.write_as(A, "a" * 1000)  # 40000 chars: past the window and HOLD
        done.set()

    writer = threading.Thread(target=flood, daemon=True)
    writer.start()
    assert not done.wait(1.0), "A's writer should wait once A holds more than HOLD"
    held = rig.outbox._flows.by_parent[A].held_chars
    # Past HOLD by at most what the buffer holds (its cap and one write), twice: the
    # writer checks after each write, and a take may race with that check.
    assert held <= flows.HOLD + 2 * (rig.buffer.cap + 1000), held
    # Another request writes, and is sent, meanwhile.
    rig.write_as(B, "b" * 10)
    sent = settle(rig)
    assert texts(sent, B) == "b" * 10
    # Credit back, repeatedly: the writer finishes and all of A arrives, in order.
    got = texts(sent, A)
    rig.publish(sent)
    deadline = time.monotonic() + 10
    while not (done.is_set() and not rig.outbox._flows.holding):
        assert time.monotonic() < deadline, "A never drained"
        time.sleep(0.02)
        more = settle(rig)
        got += texts(more, A)
        rig.publish(more)
    more = settle(rig)
    got += texts(more, A)
    assert got == "a" * 40000


def test_the_last_words_send_held_output_without_credit(rig: Rig) -> None:
    rig.write_as(A, "a" * (3 * WINDOW))
    sent = settle(rig)
    assert rig.outbox._flows.holding
    rig.write_as(A, "z")
    assert rig.outbox.flush_final(time.monotonic() + 2, lambda _deadline: None)
    sent += rig.main.taken()
    assert texts(sent, A) == "a" * (3 * WINDOW) + "z"


def test_credit_for_unknown_flows_or_malformed_pairs_is_ignored(rig: Rig) -> None:
    rig.outbox.iopub("display_data", A, {"data": {}})
    total = rig.outbox._flows.total
    rig.outbox.credit([[999, 10], ["x", 1], [1], "junk", [1, -5]])
    rig.outbox.credit("junk")
    assert rig.outbox._flows.total == total
    # More than was sent is capped at what was sent.
    rig.outbox.credit([[json.loads(rig.main.sent[0][0])["flow"], 10**9]])
    assert rig.outbox._flows.total == 0


def test_writers_of_every_holding_request_wait_once_all_hold_too_much(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(flows, "HOLD", 1000)
    monkeypatch.setattr(flows, "HOLD_TOTAL", 1500)
    f = flows.Flows()
    a, b, c = f.get(A), f.get(B), f.get(b'{"msg_id":"c"}')
    a.held_chars, b.held_chars = 900, 500
    f.held_chars = 1400
    assert not f.stalled(a) and not f.stalled(b), "each below HOLD, all below HOLD_TOTAL"
    a.held_chars, f.held_chars = 1001, 1501
    assert f.stalled(a), "past HOLD"
    assert f.stalled(b), "all together past HOLD_TOTAL: every holding request waits"
    assert not f.stalled(c), "a request holding nothing never waits for others"
