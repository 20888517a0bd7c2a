"""Requests as the supervisor forwards them (op ``request`` in IPC.md)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from kernelvisor.ipc import ProtocolError


def loads_object(frame: bytes) -> dict[str, Any]:
    """Parse a JSON frame that should hold an object; anything else counts as empty."""
    try:
        value = json.loads(frame) if frame else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass(frozen=True)
class Count:
    """The execution count the supervisor gave an execute_request (IPC.md, "Execution
    counts"): the cell's number, and whether the cell takes it."""

    number: int
    takes_count: bool

    @classmethod
    def from_control(cls, control: dict[str, Any]) -> Count | None:
        number = control.get("count")
        if number is None:
            return None
        takes = control.get("takes_count")
        if not isinstance(number, int) or number < 1 or not isinstance(takes, bool):
            raise ProtocolError(f"bad execution count {number!r} / {takes!r}")
        return cls(number, takes)


@dataclass(frozen=True)
class After:
    """A queue cell sent ahead (IPC.md, "Cells sent ahead"): it starts once request ``id``
    has replied, and is dropped instead if that reply is an error and ``unless_error``."""

    id: int
    unless_error: bool
    # If request ``id`` ran this long (ms) or longer: say ``held``, wait for ``go``.
    within: float | None = None

    @classmethod
    def from_control(cls, control: dict[str, Any]) -> After | None:
        after = control.get("after")
        if after is None:
            return None
        unless_error = control.get("unless_error")
        within = control.get("within")
        if (
            not isinstance(after, int)
            or not isinstance(unless_error, bool)
            or not (within is None or isinstance(within, int | float))
        ):
            raise ProtocolError(f"bad after {after!r} / {unless_error!r} / {within!r}")
        return cls(after, unless_error, None if within is None else float(within))


@dataclass(frozen=True)
class Request:
    """One Jupyter request. Header bytes are kept verbatim: they become the parent
    header of every iopub message the request causes."""

    id: int
    channel: str
    msg_type: str
    header: bytes
    parent_header: bytes
    metadata: bytes
    content: bytes
    buffers: list[bytes]
    # Where an execute_request runs (IPC.md, "Run modes"): queue, task or thread; and
    # for thread, the thread's name and event-loop backend.
    mode: str = "queue"
    thread: str | None = None
    backend: str | None = None
    # An execute_request's number, given by the supervisor.
    count: Count | None = None
    # A queue cell sent ahead: the request it waits for.
    after: After | None = None

    @classmethod
    def from_frames(cls, control: dict[str, Any], frames: list[bytes]) -> Request:
        if len(frames) < 5:
            raise ProtocolError(f"request with {len(frames)} frames, expected at least 5")
        req_id = control.get("id")
        msg_type = control.get("msg_type")
        if not isinstance(req_id, int) or not isinstance(msg_type, str):
            raise ProtocolError("request without an integer id and a msg_type")
        return cls(
            id=req_id,
            channel=str(control.get("channel", "shell")),
            msg_type=msg_type,
            header=frames[1],
            parent_header=frames[2],
            metadata=frames[3],
            content=frames[4],
            buffers=frames[5:],
            mode=str(control.get("mode") or "queue"),
            thread=_optional_str(control.get("thread")),
            backend=_optional_str(control.get("backend")),
            count=Count.from_control(control),
            after=After.from_control(control),
        )

    def content_json(self) -> dict[str, Any]:
        return loads_object(self.content)

    def to_jupyter(self) -> dict[str, Any]:
        """The message as ipykernel-style handlers (comm targets, widgets) expect it."""
        header = loads_object(self.header)
        return {
            "header": header,
            "parent_header": loads_object(self.parent_header),
            "metadata": loads_object(self.metadata),
            "content": self.content_json(),
            "buffers": [memoryview(b) for b in self.buffers],
            "msg_id": header.get("msg_id", ""),
            "msg_type": self.msg_type,
        }


# --- IPC operations ------------------------------------------------------------------
# The mirror of src/ipc_ops.rs (IPC.md has the tables): each op, and the link it travels
# on. "main" is read by the worker's main-thread event loop (in order with cells), "aux"
# by a worker thread (answered while a cell runs), "snapshot" is a paused snapshot's one
# connection.

TO_WORKER: dict[str, tuple[str, ...]] = {
    "request": ("main", "aux"),  # main: queue/task cells, comms; aux: the rest
    "shutdown": ("main", "aux"),
    "interrupt": ("aux",),
    "drop_thread": ("aux",),
    "reset": ("main",),
    "ping": ("aux",),
    "set_count": ("main",),
    "go": ("main",),  # a held cell sent ahead may start
    "snapshot": ("main",),
    "snapshot_info": ("aux",),
    "promote": ("snapshot",),
    "fork": ("template",),
    "credit": ("aux",),  # output credit returned (IPC.md "Flow control")
}
"""Supervisor -> worker ops, and the links they come on."""

FROM_WORKER: dict[str, tuple[str, ...]] = {
    "hello": ("main", "aux", "snapshot", "template"),
    "iopub": ("main",),
    "held": ("main",),  # a cell sent ahead waits for go (the one before ran long)
    "reply": ("main", "aux"),
    "done": ("main", "aux"),
    "stdin": ("main",),
    "pong": ("aux",),
    "reset_done": ("main",),
    "snapshot_taken": ("main",),
    "snapshot_refused": ("main",),
    "snapshot_policy": ("main",),
    "snapshot_query": ("aux",),
    "undo": ("main",),
    "fork_failed": ("template",),
}
"""Worker -> supervisor ops, and the links they go on."""


@dataclass(frozen=True)
class Promote:
    """``promote``: a snapshot becomes worker ``worker_id`` (its worker died)."""

    worker_id: int
    token: str
    execution_count: int

    @classmethod
    def from_control(cls, control: dict[str, Any]) -> Promote:
        worker_id, token = control.get("worker_id"), control.get("token")
        count = control.get("execution_count")
        if not isinstance(worker_id, int) or not isinstance(token, str):
            raise ProtocolError("promote without worker_id and token")
        return cls(worker_id, token, count if isinstance(count, int) else 1)


@dataclass(frozen=True)
class Fork:
    """``fork``: the template forks worker ``worker_id`` (its stderr pipe comes with it)."""

    worker_id: int
    token: str

    @classmethod
    def from_control(cls, control: dict[str, Any]) -> Fork:
        worker_id, token = control.get("worker_id"), control.get("token")
        if not isinstance(worker_id, int) or not isinstance(token, str):
            raise ProtocolError("fork without worker_id and token")
        return cls(worker_id, token)


def hello(role: str, worker_id: int, pid: int, token: str, **extra: Any) -> dict[str, Any]:
    """The first message on each link (``role``: main, aux, snapshot or template)."""
    return {
        "op": "hello",
        "role": role,
        "worker_id": worker_id,
        "pid": pid,
        "token": token,
        **extra,
    }
