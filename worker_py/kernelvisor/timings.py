"""Per-cell timestamps for profiling the hot path (``scripts/bench --only profile``).

With ``KERNELVISOR_TIMINGS=DIR`` in its environment, the worker appends a line per
``execute_request`` to ``DIR/worker-PID.tsv``: the supervisor's request id, then
``time.monotonic_ns()`` when the request reached the executor, when IPython started and
finished the cell, and before and after its reply was sent. The supervisor writes its
side to ``DIR/supervisor.tsv`` (src/timings.rs), on the same clock. Off (one test of
``ENABLED`` per point) without the variable.
"""

from __future__ import annotations

import os
import threading
import time

_DIR = os.environ.get("KERNELVISOR_TIMINGS")
ENABLED = bool(_DIR)
_marks: dict[int, list[int]] = {}
_lock = threading.Lock()


def mark(req_id: int) -> None:
    """Notes the time of the request's next point."""
    t = time.monotonic_ns()
    with _lock:
        _marks.setdefault(req_id, []).append(t)


def done(req_id: int) -> None:
    """Notes the last point and writes the request's line."""
    mark(req_id)
    with _lock:
        times = _marks.pop(req_id, [])
    if _DIR:
        line = "\t".join(map(str, ["cell", req_id, *times])) + "\n"
        with open(os.path.join(_DIR, f"worker-{os.getpid()}.tsv"), "a") as f:
            f.write(line)
