"""The ordered ways out to the supervisor.

Everything that belongs to a request running on the main thread (iopub of any kind,
stream output, ``stdin`` input requests, the reply or ``done``) goes on the ``main``
connection under one lock, and buffered stream output (including bytes still in the fd
pipes) is flushed first, so a client sees output in the order it was produced and all
of a request's output before its reply or ``done`` (IPC.md, "Ordering"). Replies to the
requests answered off the main thread go on ``aux``, without that lock: they have no
output to order, and must not wait behind a cell's sends.

Sends on ``main`` block while the supervisor is not reading (its queue towards IOPub is
full): that is the backpressure that makes ``print`` wait once the OutputBuffer is full.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from kernelvisor.interrupts import SigintGate
from kernelvisor.ipc import BytesLike, Connection
from kernelvisor.jsonutil import dumps
from kernelvisor.streams import OutputBuffer, Run

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
        self._iopub_controls: dict[str, bytes] = {}
        self._broken: set[Connection] = set()
        # A thread inside a send or flush (a finalizer that prints) must not wait for the
        # flusher, which needs this lock.
        buffer.may_wait = self._lock_is_free_here

    def _lock_is_free_here(self) -> bool:
        return not self._lock._is_owned()  # type: ignore[attr-defined]

    def attach_main(self, main: Connection) -> None:
        """Send on ``main`` from now on (its hello already sent)."""
        with self._lock:
            self._main = main

    def attach_aux(self, aux: Connection) -> None:
        """Send on a new ``aux`` (a promoted snapshot's), and on it until main is attached."""
        with self._lock:
            self._aux = aux
            self._main = aux
            self._broken.clear()

    def _send(self, frames: Sequence[BytesLike], flush: bool = True) -> None:
        # hold(): a SIGINT arriving mid-send is raised once the message is out whole.
        with self._gate.hold(), self._lock:
            if flush:
                self._flush_locked()
            self._write(self._main, frames)

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
        """Send buffered output (not if another send holds the lock beyond ``timeout``)."""
        with self._gate.hold():
            if not self._lock.acquire(timeout=timeout):
                log.warning("could not flush output: a send is stuck")
                return
            try:
                self._flush_locked()
            finally:
                self._lock.release()

    def _flush_locked(self) -> None:
        self._drain()
        runs = self._buffer.take()
        if not runs:
            return
        for frames in self._stream_messages(runs):
            self._write(self._main, frames)

    def _stream_messages(self, runs: list[Run]) -> Iterator[list[bytes]]:
        """The ``stream`` messages of ``runs``; output with no parent goes to the orphan
        channel on the way."""
        for run in runs:
            text = run.text
            if run.parent is None:
                self._orphan_output(run.name, text)
                continue
            for start in range(0, len(text), STREAM_CHUNK_CHARS):
                chunk = text[start : start + STREAM_CHUNK_CHARS]
                content = dumps({"name": run.name, "text": chunk})
                yield [self._iopub_control("stream"), run.parent, EMPTY, content]

    def flush_final(self, deadline: float, drain: Callable[[float], object]) -> bool:
        """The last flush of a process about to end (a fatal signal, ``os._exit``): sends
        buffered output, after moving what ``drain(deadline)`` finds, without waiting past
        ``deadline`` (``time.monotonic()``) for a lock or the socket. Skipped if this very
        thread is inside a send or a flush (the socket may hold half a message, the output
        it took may be half sent). True if everything went out."""
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
                for frames in self._stream_messages(self._buffer.take()):
                    if not conn.send_before(frames, deadline):
                        return False
                return True
            finally:
                lock.release()

    def _iopub_control(self, msg_type: str) -> bytes:
        control = self._iopub_controls.get(msg_type)
        if control is None:
            control = control_frame({"op": "iopub", "msg_type": msg_type})
            self._iopub_controls[msg_type] = control
        return control

    def iopub(
        self,
        msg_type: str,
        parent: bytes | None,
        content: JsonLike,
        metadata: JsonLike | None = None,
        buffers: Sequence[BytesLike] = (),
    ) -> None:
        # Encode before taking the lock: encoding may call user code (repr of odd values).
        frames = [
            self._iopub_control(msg_type),
            parent or EMPTY,
            _json(metadata),
            _json(content),
            *buffers,
        ]
        self._send(frames)

    def reply(self, req_id: int, content: JsonLike, metadata: JsonLike | None = None) -> None:
        """The reply to request ``req_id`` (the supervisor names it after the request)."""
        status = content.get("status", "ok") if isinstance(content, dict) else "ok"
        control = {"op": "reply", "id": req_id, "status": status}
        self._send([control_frame(control), _json(metadata), _json(content)])

    def done(self, req_id: int) -> None:
        self._send([control_frame({"op": "done", "id": req_id})])

    def control(self, control: dict[str, Any]) -> None:
        """A control-only message on main (e.g. ``reset_done``), after buffered output."""
        self._send([control_frame(control)])

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
        self._send([control_frame(control), parent, EMPTY, _json(content)])
