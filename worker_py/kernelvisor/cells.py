"""The state of one running cell, kept per cell instead of on the shell.

Cells run concurrently (``task`` cells on the main loop, ``thread`` cells and subshells
in other threads), so what IPython keeps on the shell for "the" running cell (the last
traceback, payloads, the displayhook's message, the execution count) lives here, and
the shell reads it through ``current_cell``: a context variable, so each cell's task
and thread, and whatever those start, see their own cell.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Cell:
    """One execute request while it runs."""

    req_id: int
    header: bytes
    allow_stdin: bool
    # The thread that runs the cell's code, and how to cancel it while it awaits
    # (thread-safe; set once the cell can be suspended).
    thread_ident: int = field(default_factory=threading.get_ident)
    cancel: Callable[[], None] | None = None
    # Why the cell was interrupted: None, "interrupt", or the timeout in seconds.
    interrupted: str | float | None = None

    # The execution count reserved for the cell, and whether IPython has counted it yet
    # (IPython reads the count, then increments it: see ZMQInteractiveShell).
    count: int = 0
    counted: bool = False

    # What the shell reports about the cell (see ZMQInteractiveShell).
    last_traceback: list[str] | None = None
    last_error: tuple[str, str] = ("", "")
    last_shown: BaseException | None = None
    traceback_during_displayhook: bool = False
    payloads: list[dict[str, Any]] = field(default_factory=list)
    # The execute_result being built by the displayhook, and IPython's ExecutionResult.
    display_content: dict[str, Any] | None = None
    exec_result: Any = None

    def interrupt_error(self, exc: BaseException) -> BaseException:
        """What to show for ``exc`` when it ended an interrupted cell: a cancellation
        of an awaiting cell reads as the interrupt it was; a timeout as a TimeoutError."""
        if self.interrupted is None:
            return exc
        if isinstance(self.interrupted, float):
            return TimeoutError(
                f"the cell ran longer than its timeout={self.interrupted:g} tag and was interrupted"
            )
        if isinstance(exc, KeyboardInterrupt):
            return exc
        return KeyboardInterrupt()


current_cell: ContextVar[Cell | None] = ContextVar("kernelvisor_cell", default=None)
"""The cell whose code runs in this context (None outside cells)."""
