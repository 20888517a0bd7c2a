"""Output credit per request, the worker's side (IPC.md "Flow control").

Every IOPub message belongs to a *flow*: one per parent request (the header bytes its
output is attributed to), numbered here and named in the message's ``iopub`` control
frame. A flow may send while less than ``WINDOW`` bytes of it are *outstanding* (sent,
and not yet returned by the supervisor's ``credit`` op, which it sends on ``aux`` once
IOPub has taken them), and while the worker's flows together have less than ``TOTAL``
outstanding; past ``TOTAL``, a flow with less than ``SMALL`` outstanding may still send
until ``TOTAL + RESERVE``, so that a request printing little is not held up by others
flooding. One message may take a flow past these (it is checked before, not after).

Stream output a flow may not send yet is *held* here, in order (``Flow.held``); once a
flow holds more than ``HOLD`` characters, or all flows more than ``HOLD_TOTAL``, its
writers wait (OutputBuffer.flow_gate).
Other flows' output, and every request's reply, go on meanwhile: the supervisor keeps
reading the connection.

Locks: ``Flows.lock`` guards the outstanding counts, taken briefly by the sender and by
the aux reader (``returned``); it is never held while sending. ``held`` is touched only
under the outbox's lock. A forked child (a snapshot) gets fresh locks: the aux reader may
have held one at the fork.
"""

from __future__ import annotations

import collections
import itertools
import os
import threading
import weakref
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from kernelvisor.ipc import BytesLike

WINDOW = 8 << 20
"""Bytes one flow may have outstanding."""
TOTAL = 24 << 20
"""Bytes all flows together may have outstanding."""
SMALL = 256 << 10
"""A flow with less than this outstanding may use the reserve."""
RESERVE = 8 << 20
"""Beyond ``TOTAL``, for flows with less than ``SMALL`` outstanding."""
HOLD = 8 << 20
"""Characters of a flow's stream output held in the worker before its writers wait."""
HOLD_TOTAL = 16 << 20
"""Characters held over all flows before the writers of every flow holding any wait."""

# Written into each iopub control frame: cheaper than encoding JSON per message (msg_type
# is an identifier, the flow an int).
_CONTROL = '{{"op":"iopub","msg_type":"{}","flow":{}}}'


def message_size(frames: Iterable[BytesLike]) -> int:
    """The bytes the supervisor charges for a message: the sum of its frames' lengths."""
    size = 0
    for frame in frames:
        size += len(frame) if frame.__class__ is bytes else memoryview(frame).nbytes
    return size


class Flow:
    """One parent request's output."""

    __slots__ = ("held", "held_chars", "id", "outstanding", "parent")

    def __init__(self, flow_id: int, parent: bytes) -> None:
        self.id = flow_id
        self.parent = parent
        self.outstanding = 0
        # Stream output not sent yet, in write order: [stream name, text, start], of which
        # text[start:] is still to go (a partly sent run is not copied).
        self.held: collections.deque[list[Any]] = collections.deque()
        self.held_chars = 0

    def control(self, msg_type: str) -> bytes:
        """The ``iopub`` control frame of a message of this flow."""
        return _CONTROL.format(msg_type, self.id).encode()


class Flows:
    """The worker's flows and their credit."""

    def __init__(self) -> None:
        self._new_locks()
        _ALL.add(self)
        self.by_parent: dict[bytes, Flow] = {}
        self._by_id: dict[int, Flow] = {}
        self.total = 0
        # Characters held over all flows (changed under the outbox's lock).
        self.held_chars = 0
        # Flows holding output, in the order they started holding.
        self.holding: dict[int, Flow] = {}
        self._ids = itertools.count(1)

    def _new_locks(self) -> None:
        self.lock = threading.Lock()
        # Notified when credit comes back or held output goes out.
        self.changed = threading.Condition(self.lock)

    def get(self, parent: bytes) -> Flow:
        """The flow of ``parent`` (made on first use). Under the outbox's lock."""
        flow = self.by_parent.get(parent)
        if flow is None:
            with self.lock:
                flow = Flow(next(self._ids), parent)
                self.by_parent[parent] = flow
                self._by_id[flow.id] = flow
        return flow

    def stalled(self, flow: Flow) -> bool:
        """Whether ``flow``'s writers wait: it holds too much, or all flows together do."""
        held = flow.held_chars
        return held > HOLD or (held > 0 and self.held_chars > HOLD_TOTAL)

    def may_send(self, flow: Flow) -> bool:
        """Whether ``flow`` may send a message now."""
        outstanding = flow.outstanding
        if outstanding >= WINDOW:
            return False
        total = self.total
        return total < TOTAL or (outstanding < SMALL and total < TOTAL + RESERVE)

    def sent(self, flow: Flow, size: int) -> None:
        """``size`` bytes of ``flow`` went to the supervisor."""
        with self.lock:
            flow.outstanding += size
            self.total += size

    def returned(self, pairs: Sequence[Any]) -> bool:
        """The supervisor's ``credit`` op: ``[flow, bytes]`` pairs published. Returns
        whether any flow got credit (held output may go now). From the aux reader."""
        got = False
        with self.lock:
            for pair in pairs:
                if not (isinstance(pair, list | tuple) and len(pair) == 2):
                    continue
                flow_id, size = pair
                flow = self._by_id.get(flow_id) if isinstance(flow_id, int) else None
                if flow is None or not isinstance(size, int) or size <= 0:
                    continue
                size = min(size, flow.outstanding)
                flow.outstanding -= size
                self.total -= size
                got = True
            if got:
                self.changed.notify_all()
        return got

    def notify(self) -> None:
        """Held output went out: wake the writers waiting for their flow."""
        with self.lock:
            self.changed.notify_all()

    def wait(self, ready: Callable[[], bool], wake: Callable[[], None]) -> None:
        """Waits until ``ready()``, calling ``wake()`` (flush now) before each wait.
        Interruptible (SIGINT raises KeyboardInterrupt here, on the main thread)."""
        with self.changed:
            while not ready():
                wake()
                # A timeout: a notification lost between the check and the wait costs
                # at most this long.
                self.changed.wait(0.1)

    def sweep(self) -> None:
        """Forgets flows with nothing outstanding or held. Under the outbox's lock (so
        nothing is being sent for them meanwhile)."""
        if len(self.by_parent) < 16:
            return
        with self.lock:
            for parent, flow in list(self.by_parent.items()):
                if flow.outstanding == 0 and not flow.held:
                    del self.by_parent[parent]
                    del self._by_id[flow.id]


_ALL: weakref.WeakSet[Flows] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for flows in list(_ALL):
        flows._new_locks()


os.register_at_fork(after_in_child=_after_fork_in_child)
