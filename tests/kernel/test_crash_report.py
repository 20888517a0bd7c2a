"""Crash reports (issue 14): a crashed cell's error shows the user's own line first, as
IPython shows a traceback (``Cell In[2], line 3`` and the source around it), with
faulthandler's dump of the crashing thread after a "Details" line and kernelvisor's own
threads left to the kernel's log; the supervisor logs the death at warn, not error."""

from __future__ import annotations

import re
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import IO

import psutil
from jupyter_client.manager import KernelManager
from kvharness import (
    KERNELVISOR,
    STARTUP_TIMEOUT,
    Kernel,
    Msg,
    execute,
    kernel_process,
    of_type,
    plain,
    process_tree,
    result_text,
)


@contextmanager
def kernel_with_stderr() -> Iterator[tuple[Kernel, IO[str]]]:
    """A kernelvisor kernel whose stderr (the supervisor's log, default level) goes to a
    file, as a terminal shows it to `jupyter execute` users."""
    with tempfile.TemporaryFile("w+", encoding="utf-8") as log:
        km = KernelManager(kernel_name=KERNELVISOR)
        km.start_kernel(stderr=log)
        proc = kernel_process(km)
        assert proc is not None
        kc = km.client()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
            yield Kernel(KERNELVISOR, km, kc), log
        finally:
            kc.stop_channels()
            tree = process_tree(proc.pid)
            km.shutdown_kernel(now=False)
            _, alive = psutil.wait_procs(tree, timeout=10)
            assert not alive, f"processes left after shutdown: {[p.pid for p in alive]}"


def crash(kernel: Kernel, code: str) -> tuple[list[str], list[Msg]]:
    """Runs a cell that kills its worker; returns its reply's traceback (plain text) and
    its iopub messages."""
    reply, msgs = execute(kernel.kc, code, timeout=60)
    content = reply["content"]
    assert content["status"] == "error", content
    assert content["ename"] == "WorkerCrashed", content
    [error] = of_type(msgs, "error")
    assert error["content"]["traceback"] == content["traceback"]
    return [plain(line) for line in content["traceback"]], msgs


def test_a_segfault_shows_the_cells_line_first() -> None:
    with kernel_with_stderr() as (kernel, log):
        execute(kernel.kc, "x = 1")
        tb, _ = crash(kernel, "import ctypes\ny = 2\nctypes.string_at(0)\nz = 3")
        assert tb[0].startswith("WorkerCrashed: the worker process died (killed by SIGSEGV")
        # The user's line, as IPython shows a traceback: the cell, its lines up to the
        # one that crashed (and after), then the frame it called.
        assert tb[1:6] == [
            "Cell In[2], line 3",
            "      1 import ctypes",
            "      2 y = 2",
            "----> 3 ctypes.string_at(0)",
            "      4 z = 3",
        ]
        assert re.fullmatch(r"File .*ctypes/__init__\.py:\d+, in string_at\(ptr, size\)", tb[7])
        # Then the details: faulthandler's stack of the crashing thread only.
        details = next(i for i, line in enumerate(tb) if line.startswith("Details ("))
        assert "other threads' stacks are in the kernel's log" in tb[details]
        assert tb[details + 1] == "Fatal Python error: Segmentation fault"
        assert tb[details + 2].startswith("Current thread ")
        assert re.search(r'File "[^"]*/kernelvisor_\d+/\d+\.py", line 3 in <module>', "\n".join(tb))
        assert not [line for line in tb if "kernelvisor/capture.py" in line], tb
        assert len(tb) < 60, len(tb)
        # The kernel goes on, and says on its stderr that the worker died, at warn.
        assert result_text(execute(kernel.kc, "1 + 1")[1]) == "2"
        deadline = time.monotonic() + 10
        while "main worker died" not in read(log) and time.monotonic() < deadline:
            time.sleep(0.1)
        text = read(log)
        died = [line for line in text.splitlines() if "main worker died" in line]
        assert died, text
        assert all(" WARN " in line for line in died), died
        assert " ERROR " not in text, text


def test_an_abort_in_a_thread_cell_shows_that_cell() -> None:
    with kernel_with_stderr() as (kernel, _):
        tb, _ = crash(kernel, "# thread\nimport os\n\nos.abort()")
        assert "killed by SIGABRT" in tb[0]
        assert tb[1] == "Cell In[1], line 4"
        assert tb[2:6] == ["      1 # thread", "      2 import os", "      3", "----> 4 os.abort()"]


def test_a_crash_outside_any_cell_keeps_faulthandlers_stack() -> None:
    """A crash in a thread that runs no cell code (a C function as a thread's target): no
    cell frames to show, so faulthandler's stack of the crashing thread comes first."""
    with kernel_with_stderr() as (kernel, _):
        code = (
            "import faulthandler, threading\n"
            "threading.Thread(target=faulthandler._sigsegv).start()\n"
            "import time; time.sleep(30)"
        )
        tb, _ = crash(kernel, code)
        assert tb[1].startswith("Details (faulthandler"), tb
        assert tb[2] == "Fatal Python error: Segmentation fault"
        assert tb[3].startswith("Current thread ")
        assert any("threading.py" in line for line in tb[4:8]), tb


def read(log: IO[str]) -> str:
    log.flush()
    log.seek(0)
    return log.read()


def test_a_promoted_snapshot_reports_its_own_crash_in_full() -> None:
    """The worker that a snapshot became has no stderr pipe of the supervisor's (the copy must
    not hold the dead worker's): its diagnostics go to a file in the supervisor's private
    directory, so its own crash report still shows the cell's line and faulthandler's stack;
    and it flushes what the crashing cell printed, as a spawned worker does."""
    with kernel_with_stderr() as (kernel, _):
        execute(kernel.kc, "x = 1")
        time.sleep(0.1)  # a pause: the snapshot is taken once the worker is idle
        first, _ = crash(kernel, "import ctypes\nctypes.string_at(0)")
        assert first[1] == "Cell In[2], line 2", first
        reply, iopub = execute(kernel.kc, "x")
        assert result_text(iopub) == "1", (
            reply["content"],
            [(m["msg_type"], m["content"]) for m in iopub],
        )
        tb, msgs = crash(kernel, "import ctypes\nprint('last words', end='')\nctypes.string_at(0)")
        assert tb[0].startswith("WorkerCrashed: the worker process died (killed by SIGSEGV"), tb
        assert tb[1:5] == [
            "Cell In[4], line 3",
            "      1 import ctypes",
            "      2 print('last words', end='')",
            "----> 3 ctypes.string_at(0)",
        ], tb
        details = next(i for i, line in enumerate(tb) if line.startswith("Details ("))
        assert tb[details + 1] == "Fatal Python error: Segmentation fault", tb
        printed = "".join(m["content"]["text"] for m in of_type(msgs, "stream"))
        assert printed == "last words", msgs
