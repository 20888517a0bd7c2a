"""The one ordered way out to the supervisor.

Every message the worker sends goes through ``Outbox`` under one lock, and buffered
stream output (including bytes still in the fd pipes) is flushed first, so a client
sees output in the order it was produced and all of a request's output before its
reply or ``done`` (IPC.md, "Ordering").
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any

from kernelvisor.interrupts import SigintGate
from kernelvisor.ipc import BytesLike, Connection
from kernelvisor.jsonutil import dumps
from kernelvisor.streams import OutputBuffer

log = logging.getLogger(__name__)

EMPTY = b"{}"
# Caps one stream message; a longer run is sent as several (a body must stay < 1 GiB).
STREAM_CHUNK_CHARS = 8 << 20

JsonLike = bytes | dict[str, Any]


def _json(value: JsonLike | None) -> bytes:
    if value is None:
        return EMPTY
    return value if isinstance(value, bytes) else dumps(value)


def _control(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, separators=(",", ":")).encode()


class Outbox:
    def __init__(
        self,
        conn: Connection,
        buffer: OutputBuffer,
        gate: SigintGate,
        drain: Callable[[], None],
        orphan_output: Callable[[str, str], None],
    ) -> None:
        self._conn = conn
        self._buffer = buffer
        self._gate = gate
        self._drain = drain
        # Output with no request to attribute it to (before the first execute).
        self._orphan_output = orphan_output
        # Reentrant: a finalizer run by the GC during a send may publish (e.g. a comm close).
        self._lock = threading.RLock()
        self._iopub_controls: dict[str, bytes] = {}
        self._broken = False

    def _send(self, frames: Sequence[BytesLike], flush: bool = True) -> None:
        # hold(): a SIGINT arriving mid-send is raised once the message is out whole.
        with self._gate.hold(), self._lock:
            if flush:
                self._flush_locked()
            self._write(frames)

    def _write(self, frames: Sequence[BytesLike]) -> None:
        if self._broken:
            return
        try:
            self._conn.send(frames)
        except OSError:
            # The supervisor is gone; the reader thread sees EOF and ends the worker.
            self._broken = True
            log.exception("sending to the supervisor failed")

    def flush_streams(self) -> None:
        with self._gate.hold(), self._lock:
            self._flush_locked()

    def _flush_locked(self) -> None:
        self._drain()
        runs = self._buffer.take()
        if not runs:
            return
        for run in runs:
            text = run.text
            if run.parent is None:
                self._orphan_output(run.name, text)
                continue
            for start in range(0, len(text), STREAM_CHUNK_CHARS):
                chunk = text[start : start + STREAM_CHUNK_CHARS]
                content = dumps({"name": run.name, "text": chunk})
                self._write([self._iopub_control("stream"), run.parent, EMPTY, content])

    def _iopub_control(self, msg_type: str) -> bytes:
        control = self._iopub_controls.get(msg_type)
        if control is None:
            control = _control({"op": "iopub", "msg_type": msg_type})
            self._iopub_controls[msg_type] = control
        return control

    def hello(self, fields: dict[str, Any]) -> None:
        self._send([_control({"op": "hello", **fields})], flush=False)

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

    def reply(
        self,
        req_id: int,
        msg_type: str,
        content: JsonLike,
        metadata: JsonLike | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        status = content.get("status", "ok") if isinstance(content, dict) else "ok"
        control = {"op": "reply", "id": req_id, "msg_type": msg_type, "status": status}
        if extra:
            control.update(extra)
        self._send([_control(control), _json(metadata), _json(content)])

    def done(self, req_id: int) -> None:
        self._send([_control({"op": "done", "id": req_id})])

    def stdin_request(self, req_id: int, parent: bytes, content: JsonLike) -> None:
        control = {"op": "stdin", "id": req_id, "msg_type": "input_request"}
        self._send([_control(control), parent, EMPTY, _json(content)])
