"""SIGINT handling: the supervisor interrupts a cell by signalling the worker's pid.

A signal must only become a KeyboardInterrupt while a cell runs (an idle worker ignores
it), must not tear an IPC message in half, and must cancel rather than raise while an
asyncio task is being awaited (raising there would break out of the event loop).
"""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from types import FrameType

Action = Callable[[FrameType | None], None]
"""What a SIGINT does; gets the frame the main thread was executing."""


def _raise_keyboard_interrupt(frame: FrameType | None) -> None:
    raise KeyboardInterrupt


class SigintGate:
    """The SIGINT handler and the state that decides what a signal does.

    Python runs signal handlers in the main thread only, so all state here is touched by
    the main thread (the context managers are no-ops in other threads).
    """

    def __init__(self) -> None:
        self._main_ident = threading.main_thread().ident
        self._action: Action | None = None
        self._holds = 0
        self._pending = False
        self._hold = _Hold(self)

    def install(self) -> None:
        signal.signal(signal.SIGINT, self._on_sigint)

    def _on_sigint(self, signum: int, frame: FrameType | None) -> None:
        action = self._action
        if action is None:
            return
        if self._holds:
            self._pending = True
            return
        action(frame)

    @contextmanager
    def _acting(self, action: Action) -> Iterator[None]:
        if threading.get_ident() != self._main_ident:
            yield  # a signal never interrupts other threads
            return
        previous = self._action
        self._action = action
        try:
            yield
        finally:
            self._action = previous
            if previous is None:
                self._pending = False

    def raising(self) -> AbstractContextManager[None]:
        """While inside, SIGINT raises KeyboardInterrupt in the main thread."""
        return self._acting(_raise_keyboard_interrupt)

    def calling(self, action: Action) -> AbstractContextManager[None]:
        """While inside, SIGINT calls ``action`` (e.g. to cancel an awaited task)."""
        return self._acting(action)

    def hold(self) -> AbstractContextManager[None]:
        """Defer SIGINT until the block ends (used around IPC sends)."""
        return self._hold

    def _release(self) -> None:
        self._holds -= 1
        if not self._holds and self._pending:
            self._pending = False
            action = self._action
            if action is not None:
                action(sys._getframe(2))  # its callers lead to the interrupted code


class _Hold:
    """``SigintGate.hold()``: one reusable object (it runs around every send), its state
    kept in the gate."""

    __slots__ = ("_gate",)

    def __init__(self, gate: SigintGate) -> None:
        self._gate = gate

    def __enter__(self) -> None:
        gate = self._gate
        if threading.get_ident() == gate._main_ident:
            gate._holds += 1

    def __exit__(self, *exc: object) -> None:
        gate = self._gate
        if threading.get_ident() == gate._main_ident:
            gate._release()
