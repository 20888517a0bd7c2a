"""Threads started by a cell belong to that cell.

A new ``threading.Thread`` runs in a copy of the context that was current when it was
started, as asyncio tasks do: what it prints (or displays) later, even while another
cell runs, goes to the cell that started it (its parent header is a context variable).
"""

from __future__ import annotations

import contextvars
import threading
from typing import Any

from kernelvisor.debugger_threads import hide_if_service

_ORIGINAL_START = threading.Thread.start


def _start_in_context(self: threading.Thread) -> None:
    context = contextvars.copy_context()
    run = self.run

    def run_in_context() -> Any:
        return context.run(run)

    self.run = run_in_context  # type: ignore[method-assign]
    hide_if_service(self)  # the worker's own threads are never traced by a debugger
    _ORIGINAL_START(self)


def inherit_context() -> None:
    """Make every thread started from now on inherit its starter's context."""
    threading.Thread.start = _start_in_context  # type: ignore[method-assign]
