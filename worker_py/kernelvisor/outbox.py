"""The ways out to the supervisor, in order per request.

Everything that belongs to a request running in this worker (iopub of any kind, stream
output, ``stdin`` input requests, the reply or ``done``) goes on the ``main`` connection
under one lock, and buffered stream output (including bytes still in the fd pipes) is
flushed first, so a client sees each request's output in the order it was produced, and
all of it before that request's reply or ``done`` (IPC.md, "Ordering"). Replies to the
requests answered off the main thread go on ``aux``, without that lock: they have no
output to order, and must not wait behind a cell's sends.

IOPub messages are sent on credit, per request (flows.py): a request whose output the
supervisor cannot publish yet (a client not reading IOPub) keeps its stream output here
and its writers wait, while other requests' output and replies go on. Nothing ever waits
for credit holding the lock.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from kernelvisor.flows import Flow, Flows, message_size
from kernelvisor.interrupts import SigintGate
from kernelvisor.ipc import BytesLike, Connection
from kernelvisor.jsonutil import dumps
from kernelvisor.streams import OutputBuffer, Run, may_wait_here

log = logging.getLogger(__name__)

EMPTY = b"{}"
# Caps one stream message; a longer run is sent as several. Small enough that the
# messages the supervisor queues for IOPub (counted in messages there) stay small.
STREAM_CHUNK_CHARS = 1 << 20

JsonLike = bytes | dict[str, Any]


def _json(value: JsonLike | None) -> bytes:
    if value is None:
        return EMPTY
    return value if isinstance(value, bytes) else dumps(value)


_CONTROL_ENCODER = json.JSONEncoder(separators=(",", ":"))


def _nothing() -> None:
    pass


# A stream message charged to no flow (the last words of a process about to end).
_FINAL_STREAM = b'{"op":"iopub","msg_type":"stream"}'


def control_frame(fields: dict[str, Any]) -> bytes:
    """A control frame (frame 0)."""
    return _CONTROL_ENCODER.encode(fields).encode()


class Outbox:
    def __init__(
        self,
        aux: Connection,
        buffer: OutputBuffer,
        gate: SigintGate,
        drain: Callable[[], None],
        orphan_output: Callable[[str, str], None],
    ) -> None:
        self._aux = aux
        # Until attach_main, what belongs on main goes on aux (nothing should: main is
        # connected before any request can arrive).
        self._main = aux
        self._buffer = buffer
        self._gate = gate
        self._drain = drain
        # Output with no request to attribute it to (before the first execute).
        self._orphan_output = orphan_output
        # Reentrant: a finalizer run by the GC during a send may publish (e.g. a comm close).
        self._lock = threading.RLock()
        self._broken: set[Connection] = set()
        self._flows = Flows()
        # Wired by the worker: flush now (held output may go).
        self.wake_flusher: Callable[[], None] = _nothing
        # A thread inside a send or flush (a finalizer that prints) must not wait for the
        # flusher, which needs this lock.
        buffer.may_wait = self._lock_is_free_here
        buffer.flow_gate = self._wait_for_flow
        buffer.fd_held_up = self._fd_held_up

    def _lock_is_free_here(self) -> bool:
        return not self._lock._is_owned()  # type: ignore[attr-defined]

    def attach_main(self, main: Connection) -> None:
        """Send on ``main`` from now on (its hello already sent)."""
        with self._lock:
            self._main = main

    def attach_aux(self, aux: Connection) -> None:
        """Send on a new ``aux`` (a promoted snapshot's), and on it until main is attached.
        Output held for the old connection is the dead worker's: it is dropped, and the
        credit starts afresh."""
        with self._lock:
            self._aux = aux
            self._main = aux
            self._broken.clear()
            self._flows = Flows()
            self._buffer.check_flows = False

    # --- credit -----------------------------------------------------------------------

    def credit(self, pairs: Any) -> None:
        """The supervisor's ``credit`` op (from the aux reader): send what was held. The
        flusher is woken only if something is held: a flush resets its interval, and a
        ``print(..., flush=True)`` within it is left to the flusher thread (which a cell
        holding the GIL in C code right after it would keep from sending it)."""
        flows = self._flows
        if isinstance(pairs, list) and flows.returned(pairs) and flows.holding:
            self.wake_flusher()

    def _wait_for_flow(self, parent: bytes | None) -> None:
        """A writer of ``parent``'s output waits while that request holds too much."""
        flows = self._flows
        flow = flows.by_parent.get(parent or self._buffer.fallback_parent or b"")
        if flow is None or not flows.stalled(flow):
            return
        flows.wait(lambda: not flows.stalled(flow), self.wake_flusher)

    def _fd_held_up(self) -> bool:
        """Whether output on fds 1/2 (the latest execute request's) must stay in the pipes."""
        parent = self._buffer.fallback_parent
        flows = self._flows
        flow = flows.by_parent.get(parent) if parent is not None else None
        return flow is not None and flows.stalled(flow)

    def _wait_to_send(self, parent: bytes | None, ready: Callable[[Flow | None], bool]) -> None:
        """Waits (holding no lock) until ``ready(flow of parent)``, flushing meanwhile."""
        flows = self._flows
        flows.wait(
            lambda: ready(flows.by_parent.get(parent) if parent is not None else None),
            self.wake_flusher,
        )

    # --- sending ----------------------------------------------------------------------

    def _send(self, frames: Sequence[BytesLike], after: bytes | None = None) -> None:
        """Sends ``frames`` (not IOPub: no credit) once ``after``'s held output is out
        (``after=None``: once every request's is)."""
        # Not inside a send or a flush of this thread (a finalizer), nor on the flusher.
        can_wait = may_wait_here(self._buffer)
        while True:
            # hold(): a SIGINT arriving mid-send is raised once the message is out whole.
            with self._gate.hold(), self._lock:
                self._flush_locked(after)
                if self._nothing_held(after) or not can_wait:
                    self._write(self._main, frames)
                    return
            self._wait_to_send(after, lambda _: self._nothing_held(after))

    def _nothing_held(self, parent: bytes | None) -> bool:
        flows = self._flows
        if parent is None:
            return not flows.holding
        flow = flows.by_parent.get(parent)
        return flow is None or not flow.held

    def _send_iopub(self, msg_type: str, parent: bytes, rest: list[BytesLike]) -> None:
        """An IOPub message of ``parent``'s flow, after its held output, on credit."""
        can_wait = may_wait_here(self._buffer)
        while True:
            with self._gate.hold(), self._lock:
                self._flush_locked(parent)
                flows = self._flows
                flow = flows.get(parent)
                if (not flow.held and flows.may_send(flow)) or not can_wait:
                    frames = [flow.control(msg_type), parent, *rest]
                    # Counted before it goes: its credit may come back before the
                    # send returns.
                    flows.sent(flow, message_size(frames))
                    self._write(self._main, frames)
                    return

            def ready(flow: Flow | None) -> bool:
                return flow is None or (not flow.held and self._flows.may_send(flow))

            self._wait_to_send(parent, ready)

    def _write(self, conn: Connection, frames: Sequence[BytesLike]) -> None:
        if conn in self._broken:
            return
        try:
            conn.send(frames)
        except OSError:
            # The supervisor is gone; the readers see EOF and end the worker.
            self._broken.add(conn)
            log.exception("sending to the supervisor failed")

    def flush_streams(self, timeout: float = -1) -> None:
        """Send buffered output as credit allows (not if another send holds the lock
        beyond ``timeout``)."""
        with self._gate.hold():
            if not self._lock.acquire(timeout=timeout):
                log.warning("could not flush output: a send is stuck")
                return
            try:
                self._flush_locked(None)
            finally:
                self._lock.release()

    def _flush_locked(self, parent: bytes | None) -> None:
        """Moves buffered output to its flows and sends what their credit allows. The fd
        pipes are drained first, unless their request holds too much already (then they
        stay full and their writers wait), but always before a message of that request."""
        buffer = self._buffer
        if not self._fd_held_up() or (parent is not None and parent == buffer.fallback_parent):
            self._drain()
        flows = self._flows
        for run in buffer.take():
            if run.parent is None:
                self._orphan_output(run.name, run.text)
                continue
            flow = flows.get(run.parent)
            text = run.text
            stop = 0 if flow.held else self._send_text(flow, run.name, text, 0)
            if stop < len(text):
                self._hold(flow, run.name, text, stop)
        if flows.holding and self._send_held():
            flows.notify()
        buffer.check_flows = bool(flows.holding)
        flows.sweep()

    def _send_text(self, flow: Flow, name: str, text: str, start: int) -> int:
        """Sends ``text[start:]`` as stream messages while ``flow`` has credit; returns
        where it stopped (``len(text)``: all sent). Never copies what is left."""
        flows = self._flows
        parent = flow.parent
        control = flow.control("stream")
        end = len(text)
        while start < end:
            if not flows.may_send(flow):
                return start
            chunk = text[start : start + STREAM_CHUNK_CHARS]
            content = dumps({"name": name, "text": chunk})
            frames = [control, parent, EMPTY, content]
            flows.sent(flow, message_size(frames))  # before: see _send_iopub
            self._write(self._main, frames)
            start += len(chunk)
        return end

    def _hold(self, flow: Flow, name: str, text: str, start: int) -> None:
        """Keeps ``text[start:]`` in ``flow``, after what it holds."""
        if not flow.held:
            self._flows.holding[flow.id] = flow
        flow.held.append([name, text, start])
        flow.held_chars += len(text) - start
        self._flows.held_chars += len(text) - start

    def _send_held(self) -> bool:
        """Sends held output of the flows that have credit again, oldest first; whether
        any went."""
        flows = self._flows
        sent = False
        for flow in list(flows.holding.values()):
            held = flow.held
            while held and flows.may_send(flow):
                entry = held[0]
                name, text, start = entry
                stop = self._send_text(flow, name, text, start)
                flow.held_chars -= stop - start
                flows.held_chars -= stop - start
                sent = True
                if stop < len(text):
                    entry[2] = stop  # the rest stays in place, uncopied
                    break
                held.popleft()
            if not held:
                del flows.holding[flow.id]
        return sent

    def _stream_messages(self, runs: list[Run]) -> Iterator[list[bytes]]:
        """The ``stream`` messages of ``runs``, outside any flow (a process about to end:
        no credit, and no lock but the outbox's); output with no parent goes to the
        orphan channel on the way."""
        for run in runs:
            text = run.text
            if run.parent is None:
                self._orphan_output(run.name, text)
                continue
            for start in range(0, len(text), STREAM_CHUNK_CHARS):
                chunk = text[start : start + STREAM_CHUNK_CHARS]
                content = dumps({"name": run.name, "text": chunk})
                yield [_FINAL_STREAM, run.parent, EMPTY, content]

    def flush_final(self, deadline: float, drain: Callable[[float], object]) -> bool:
        """The last flush of a process about to end (a fatal signal, ``os._exit``): sends
        held and buffered output, after moving what ``drain(deadline)`` finds, without
        waiting for credit, nor past ``deadline`` (``time.monotonic()``) for a lock or the
        socket. Skipped if this very thread is inside a send or a flush (the socket may
        hold half a message, the output it took may be half sent). True if everything
        went out."""
        lock = self._lock
        if lock._is_owned():  # type: ignore[attr-defined]
            return False
        with self._gate.hold():
            if not lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
                return False
            try:
                drain(deadline)
                conn = self._main
                if conn in self._broken:
                    return False
                runs = [
                    Run(flow.parent, name, text[start:])
                    for flow in self._flows.holding.values()
                    for name, text, start in flow.held
                ]
                runs += self._buffer.take()
                for frames in self._stream_messages(runs):
                    if not conn.send_before(frames, deadline):
                        return False
                return True
            finally:
                lock.release()

    def iopub(
        self,
        msg_type: str,
        parent: bytes | None,
        content: JsonLike,
        metadata: JsonLike | None = None,
        buffers: Sequence[BytesLike] = (),
    ) -> None:
        # Encode before taking the lock: encoding may call user code (repr of odd values).
        rest = [_json(metadata), _json(content), *buffers]
        self._send_iopub(msg_type, parent or EMPTY, rest)

    def reply(
        self,
        req_id: int,
        content: JsonLike,
        metadata: JsonLike | None = None,
        parent: bytes | None = None,
    ) -> None:
        """The reply to request ``req_id`` (the supervisor names it after the request),
        after the output of ``parent`` (its header; None: after all output)."""
        status = content.get("status", "ok") if isinstance(content, dict) else "ok"
        control = {"op": "reply", "id": req_id, "status": status}
        self._send([control_frame(control), _json(metadata), _json(content)], parent)

    def done(self, req_id: int, parent: bytes | None = None) -> None:
        """Request ``req_id`` has no reply and is finished (after ``parent``'s output)."""
        self._send([control_frame({"op": "done", "id": req_id})], parent)

    def control(self, control: dict[str, Any]) -> None:
        """A control-only message on main (e.g. ``reset_done``), after buffered output
        that credit lets go (it waits for no request's)."""
        with self._gate.hold(), self._lock:
            self._flush_locked(None)
            self._write(self._main, [control_frame(control)])

    # --- aux: answers computed off the main thread ------------------------------------

    def aux_reply(self, req_id: int, content: dict[str, Any]) -> None:
        status = content.get("status", "ok")
        control = {"op": "reply", "id": req_id, "status": status}
        self._write(self._aux, [control_frame(control), EMPTY, dumps(content)])

    def aux_control(self, control: dict[str, Any]) -> None:
        """A control-only message on aux (e.g. ``snapshot_query``), from any thread."""
        self._write(self._aux, [control_frame(control)])

    def aux_done(self, req_id: int) -> None:
        self._write(self._aux, [control_frame({"op": "done", "id": req_id})])

    def stdin_request(self, req_id: int, parent: bytes, content: JsonLike) -> None:
        control = {"op": "stdin", "id": req_id, "msg_type": "input_request"}
        self._send([control_frame(control), parent, EMPTY, _json(content)], parent)
