"""Which threads the debugger may see, and whether a thread is held at a breakpoint.

The worker's service threads (IPC readers, the output flusher, fd capture, the debugger's
own) must never be traced or suspended by pydevd: a breakpoint suspends every traced
thread, and these must go on serving the supervisor while the main thread is stopped.
pydevd skips a thread whose ``threading.Thread`` has ``pydev_do_not_trace`` and lists none
with ``is_pydev_daemon_thread`` (the marks debugpy puts on its own threads). Threads that
run cells (the main thread, ``Caller`` threads, subshells) stay visible.
"""

from __future__ import annotations

import threading
from types import FrameType

# Threads the worker starts for itself (links.py, router.py, wiring.py, streams.py,
# capture.py, caller_pool.py, interrupts.py, debugger*.py), and IPython's history writer.
SERVICE_THREAD_NAMES = frozenset(
    {
        "kernelvisor-aux-reader",
        "kernelvisor-aux",
        "kernelvisor-flusher",
        "kernelvisor-fd-capture",
        "kernelvisor-exit",
        "kernelvisor-caller-reaper",
        "kernelvisor-signals",
        "kernelvisor-debugger",
        "kernelvisor-dap-reader",
        "kernelvisor-dap-events",
        "IPythonHistorySavingThread",
    }
)

# pydevd's loop that holds a thread at a breakpoint (pydevd.py).
_WAIT_SUSPEND = frozenset({"_do_wait_suspend", "do_wait_suspend"})


def hide(thread: threading.Thread) -> None:
    """Make ``thread`` invisible to pydevd: never traced, suspended or listed."""
    thread.pydev_do_not_trace = True  # type: ignore[attr-defined]
    thread.is_pydev_daemon_thread = True  # type: ignore[attr-defined]


def hide_if_service(thread: threading.Thread) -> None:
    """``hide`` a thread about to start if it is one of the worker's service threads."""
    if thread.name in SERVICE_THREAD_NAMES:
        hide(thread)


def hide_service_threads() -> None:
    """``hide`` the service threads already running (before pydevd starts tracing)."""
    for thread in threading.enumerate():
        hide_if_service(thread)


def held_at_breakpoint(frame: FrameType | None) -> bool:
    """Whether the stack from ``frame`` outwards is inside pydevd's wait at a breakpoint (or
    after a step): the thread is suspended by the debugger."""
    while frame is not None:
        code = frame.f_code
        if code.co_name in _WAIT_SUSPEND and code.co_filename.endswith("pydevd.py"):
            return True
        frame = frame.f_back
    return False
