"""Crash isolation: a worker that dies, is killed or wedges becomes an error reply, never a dead
kernel. Everything runs against the real binary through jupyter_client."""

from __future__ import annotations

import signal
from pathlib import Path

import pytest
from isolation_support import (
    assert_crashed,
    assert_healthy,
    assert_heartbeat,
    assert_name_lost,
    assert_namespace_as_reported,
    describe,
    finish_cell,
    is_running,
    kernel_process,
    kill_pid,
    kv_kernel,
    main_worker,
    start_cell,
    start_cell_marked,
    supervisor_pid,
    wait_until,
    zombie_children,
)
from kvharness import (
    Kernel,
    collect_iopub,
    execute,
    get_replies,
    get_reply,
    of_type,
    result_text,
    statuses,
    stream_text,
)

SEGFAULT = "import ctypes; ctypes.string_at(0)"
ABORT = "import os; os.abort()"
EXIT_3 = "import os; os._exit(3)"

# (code, what the evalue must name, whether faulthandler reports a fatal error)
CRASHES = {
    "segfault": (SEGFAULT, "killed by SIGSEGV (signal 11)", True),
    "abort": (ABORT, "killed by SIGABRT (signal 6)", True),
    "os_exit": (EXIT_3, "exit code 3", False),
}

SLEEP_MARKED = 'import time\nprint("sleeping", flush=True)\ntime.sleep(30)'


def assert_supervisor_survived(kernel: Kernel, pid: int) -> None:
    proc = kernel_process(kernel.km)
    assert proc is not None and proc.pid == pid
    assert proc.poll() is None, "the kernel process exited"
    assert kernel.km.is_alive()
    assert_heartbeat(kernel.kc)


def assert_reaped(kernel: Kernel, dead_pid: int) -> None:
    """The dead worker is gone for good: not running, and not a zombie child of the supervisor."""
    assert not is_running(dead_pid), f"worker {dead_pid} still running"
    sup = supervisor_pid(kernel)
    assert dead_pid not in zombie_children(sup), f"worker {dead_pid} left as a zombie"
    # A snapshot the crash let go exits on its own, after the reply: it is reaped once it
    # has (SIGCHLD), never left behind.
    wait_until(lambda: zombie_children(sup) == [], "no zombie children of the supervisor", 5)


@pytest.mark.parametrize("case", list(CRASHES))
def test_crash_becomes_worker_crashed_error(kernel: Kernel, case: str) -> None:
    code, cause, fatal_report = CRASHES[case]
    kc = kernel.kc
    sup = supervisor_pid(kernel)
    assert execute(kc, "survivor = 42")[0]["content"]["status"] == "ok"
    _, old_pid = main_worker(kc)

    reply, iopub = execute(kc, code)

    error = assert_crashed(reply, iopub, cause)
    # The message spec wants the cell's count: the one its execute_input announced.
    [announced] = [
        m["content"]["execution_count"] for m in iopub if m["msg_type"] == "execute_input"
    ]
    assert reply["content"]["execution_count"] == announced
    assert statuses(iopub) == ["busy", "idle"], describe(iopub)
    assert [m["msg_type"] for m in iopub] == ["status", "execute_input", "error", "status"], (
        describe(iopub)
    )
    traceback = "\n".join(error["traceback"])
    assert "WorkerCrashed" in error["traceback"][0]
    if fatal_report:
        # faulthandler's report of the main thread, with the cell's own frame in it.
        assert "Fatal Python error" in traceback, traceback
        assert "/kernelvisor_" in traceback or "<ipython-input-" in traceback, traceback
    assert_supervisor_survived(kernel, sup)
    assert_reaped(kernel, old_pid)
    # A fresh worker: the old namespace is gone, and it works.
    assert_namespace_as_reported(kc, reply, "survivor")
    assert_healthy(kc)
    assert main_worker(kc)[1] != old_pid


@pytest.mark.parametrize("case", list(CRASHES))
def test_output_before_crash_arrives_before_error(kernel: Kernel, case: str) -> None:
    code, cause, _ = CRASHES[case]
    reply, iopub = execute(kernel.kc, f'print("before")\n{code}')
    assert_crashed(reply, iopub, cause)
    assert stream_text(iopub) == "before\n", describe(iopub)
    kinds = [m["msg_type"] for m in iopub]
    assert kinds.index("stream") < kinds.index("error"), describe(iopub)


def test_fd_output_before_crash_arrives_before_error(kernel: Kernel) -> None:
    """Output written straight to file descriptor 1 (as C code does), then a hard exit."""
    reply, iopub = execute(kernel.kc, 'import os\nos.write(1, b"fd-before\\n")\nos._exit(3)')
    assert_crashed(reply, iopub, "exit code 3")
    assert stream_text(iopub) == "fd-before\n", describe(iopub)
    kinds = [m["msg_type"] for m in iopub]
    assert kinds.index("stream") < kinds.index("error"), describe(iopub)


def test_requests_queued_behind_a_crash_are_aborted(kernel: Kernel, tmp_path: Path) -> None:
    kc = kernel.kc
    go = tmp_path / "go"
    crash_id = start_cell(
        kc,
        f"import os, time\nwhile not os.path.exists({str(go)!r}):\n    time.sleep(0.01)\n{EXIT_3}",
    )
    queued = [kc.execute("queued_ran = 1"), kc.execute("2+2")]
    # The supervisor answers kernel_info itself, in shell order: once it has, the two
    # execute_requests sent before it are in its queue behind the running cell.
    info_id = kc.kernel_info()
    assert get_reply(kc, info_id)["content"]["status"] == "ok"
    go.touch()

    replies = get_replies(kc, [crash_id, *queued])
    assert replies[crash_id]["content"]["ename"] == "WorkerCrashed", replies[crash_id]
    assert "exit code 3" in replies[crash_id]["content"]["evalue"]
    for msg_id in queued:
        content = replies[msg_id]["content"]
        assert content["status"] == "aborted", content
        assert statuses(collect_iopub(kc, msg_id)) == ["busy", "idle"]
    assert_name_lost(kc, "queued_ran")
    assert_healthy(kc)


def test_sigkill_from_outside(kernel: Kernel) -> None:
    kc = kernel.kc
    sup = supervisor_pid(kernel)
    execute(kc, "survivor = 1")
    _, pid = main_worker(kc)
    msg_id, seen = start_cell_marked(kc, SLEEP_MARKED, "sleeping")

    kill_pid(pid, signal.SIGKILL)

    reply, iopub = finish_cell(kc, msg_id, seen)
    assert_crashed(reply, iopub, "killed by SIGKILL (signal 9)")
    assert_supervisor_survived(kernel, sup)
    assert_reaped(kernel, pid)
    assert_namespace_as_reported(kc, reply, "survivor")
    assert_healthy(kc)


def test_sys_exit_is_an_ordinary_error(kernel: Kernel) -> None:
    kc = kernel.kc
    execute(kc, "survivor = 7")
    before = main_worker(kc)
    reply, iopub = execute(kc, "import sys; sys.exit(3)")
    assert reply["content"]["status"] == "error", reply["content"]
    assert reply["content"]["ename"] == "SystemExit", reply["content"]
    assert reply["content"]["evalue"] == "3"
    errors = of_type(iopub, "error")
    assert [e["content"]["ename"] for e in errors] == ["SystemExit"], describe(iopub)
    # Same worker, namespace intact.
    assert main_worker(kc) == before
    reply, iopub = execute(kc, "survivor")
    assert result_text(iopub) == "7", describe(iopub)


def test_memory_limit_kills_with_out_of_memory() -> None:
    # 20 MiB at a time with a pause: the growth between two of the supervisor's 100 ms checks
    # stays small, so the machine never gets near its own out-of-memory killer.
    grow = (
        "import time\nchunks = []\nwhile True:\n"
        '    chunks.append(b"x" * (20 << 20))\n    time.sleep(0.02)'
    )
    with kv_kernel(memory_limit="300M") as k:
        kc = k.kc
        sup = supervisor_pid(k)
        execute(kc, "survivor = 1")
        _, pid = main_worker(kc)
        reply, iopub = execute(kc, grow)
        assert_crashed(reply, iopub, "killed: out of memory (")
        assert "the limit is 300 MiB" in reply["content"]["evalue"], reply["content"]["evalue"]
        assert_supervisor_survived(k, sup)
        assert_reaped(k, pid)
        assert_namespace_as_reported(kc, reply, "survivor")
        assert_healthy(kc)
        # A modest allocation under the limit is fine in the new worker.
        assert_healthy(kc, 'len(b"x" * (50 << 20))', str(50 << 20))


# A default pthread mutex locked twice by the same thread never returns, and through PyDLL the
# GIL stays held: not even the worker's I/O thread can answer, and SIGINT cannot help.
DEADLOCK = (
    "import ctypes\nlibc = ctypes.PyDLL(None)\nm = ctypes.create_string_buffer(64)\n"
    "libc.pthread_mutex_init(m, None)\nlibc.pthread_mutex_lock(m)\nlibc.pthread_mutex_lock(m)"
)


def test_unresponsive_worker_is_killed() -> None:
    with kv_kernel(unresponsive_timeout=2) as k:
        kc = k.kc
        sup = supervisor_pid(k)
        execute(kc, "survivor = 1")
        _, pid = main_worker(kc)
        reply, iopub = execute(kc, DEADLOCK)
        assert_crashed(reply, iopub, "unresponsive")
        assert_supervisor_survived(k, sup)
        assert_reaped(k, pid)
        assert_namespace_as_reported(kc, reply, "survivor")
        assert_healthy(kc)


def test_busy_worker_that_releases_the_gil_is_not_unresponsive() -> None:
    """Sleeping (GIL released) and pure-Python CPU work (the GIL is shared every few ms) both
    outlast the timeout without being taken for a deadlock."""
    cell = (
        "import time\ntime.sleep(3)\nend = time.monotonic() + 3\n"
        "while time.monotonic() < end:\n    pass\nsurvivor"
    )
    with kv_kernel(unresponsive_timeout=2) as k:
        kc = k.kc
        execute(kc, "survivor = 5")
        before = main_worker(kc)
        reply, iopub = execute(kc, cell)
        assert reply["content"]["status"] == "ok", (reply["content"], describe(iopub))
        assert result_text(iopub) == "5"
        assert main_worker(kc) == before
