"""Forked snapshots: a crash costs one cell, not the namespace. Every crash kind restores the
names defined before the crashing cell (a value, a function, a class, a module, a 50 MB array),
the numbering goes on, and the cases without a snapshot say why. Real binary, jupyter_client."""

from __future__ import annotations

import os
import re
import signal
import time
from collections.abc import Iterator

import psutil
import pytest
from isolation_support import (
    RESTORED,
    STUBBORN,
    assert_crashed,
    describe,
    finish_cell,
    kill_pid,
    kv_kernel,
    main_worker,
    start_cell_marked,
    supervisor_pid,
    wait_dead,
    wait_for_output,
    wait_until,
)
from kvharness import (
    TIMEOUT,
    Kernel,
    collect_iopub,
    collect_requests,
    execute,
    get_reply,
    result_text,
    send_execute,
    stream_text,
)

# A user's pause before the next cell: longer than the supervisor's idle gap (2 ms), so a
# snapshot is taken right before that cell (README "Snapshots": the policy).
PAUSE = 0.05

SETUP = [
    "a = 41",
    "def twice(x):\n    return 2 * x",
    "class Box:\n    def __init__(self, v):\n        self.v = v",
    "import json",
    "import numpy as np\narr = np.arange(50 * (1 << 20) // 8, dtype=np.int64)",
]
CHECK = "(a + 1, twice(21), Box(42).v, json.dumps([42]), bool((arr == np.arange(arr.size)).all()))"
CHECK_RESULT = "(42, 42, 42, '[42]', True)"

SEGFAULT = "import ctypes; ctypes.string_at(0)"


def define(kc) -> None:  # type: ignore[no-untyped-def]
    for code in SETUP:
        reply, iopub = execute(kc, code)
        assert reply["content"]["status"] == "ok", describe(iopub)


def crash_then_check(kc, crash: str, cause: str) -> None:  # type: ignore[no-untyped-def]
    """Pause, run a crashing cell, then: the message says the namespace was restored, every
    name defined before works, and the numbering goes on."""
    time.sleep(PAUSE)
    reply, iopub = execute(kc, crash)
    assert_crashed(reply, iopub, cause, restored=True)
    crashed_count = reply["content"]["execution_count"]
    reply, iopub = execute(kc, CHECK)
    assert reply["content"]["status"] == "ok", describe(iopub)
    assert result_text(iopub) == CHECK_RESULT
    assert reply["content"]["execution_count"] == crashed_count + 1, "the numbering goes on"
    # In/Out history goes on too: Out[n] of the check cell is its result.
    reply, iopub = execute(kc, f"Out[{crashed_count + 1}][0]")
    assert result_text(iopub) == "42", describe(iopub)


@pytest.fixture(scope="module")
def snap_kernel() -> Iterator[Kernel]:
    with kv_kernel() as k:
        define(k.kc)
        yield k


@pytest.mark.parametrize(
    ("code", "cause"),
    [
        (SEGFAULT, "killed by SIGSEGV"),
        ("import os; os.abort()", "killed by SIGABRT"),
        ("import os; os._exit(3)", "exit code 3"),
    ],
    ids=["segfault", "abort", "os_exit"],
)
def test_crash_restores_the_namespace(snap_kernel: Kernel, code: str, cause: str) -> None:
    crash_then_check(snap_kernel.kc, code, cause)


ASYNC_CELLS = [
    ("import asyncio\nawait asyncio.sleep(0.01)\n'slept'", "'slept'"),
    ("# task\nimport asyncio\nawait asyncio.sleep(0.01)\n'task slept'", "'task slept'"),
    ("import asyncio\nasyncio.get_running_loop().is_running()", "True"),
    (
        (
            "import threading\nfrom kernelvisor import Caller\nawait Caller().to_thread("
            "lambda: threading.current_thread() is not threading.main_thread())"
        ),
        "True",
    ),
]


def test_a_restored_worker_runs_async_cells(snap_kernel: Kernel) -> None:
    """asyncio knows a running loop by the pid that started it. A promoted snapshot goes on
    inside the loop its parent was running, so every `await` failed there ("no running
    event loop") until the loop was registered again for the new process."""
    kc = snap_kernel.kc
    time.sleep(PAUSE)
    reply, iopub = execute(kc, "import os; os._exit(3)")
    assert_crashed(reply, iopub, "exit code 3", restored=True)
    for code, expected in ASYNC_CELLS:
        reply, iopub = execute(kc, code)
        assert reply["content"]["status"] == "ok", (code, describe(iopub))
        assert result_text(iopub) == expected, (code, describe(iopub))


def test_sigkill_from_outside_restores(snap_kernel: Kernel) -> None:
    kc = snap_kernel.kc
    time.sleep(PAUSE)
    msg_id, seen = start_cell_marked(
        kc, 'import time\nprint("in", flush=True)\ntime.sleep(60)', "in"
    )
    _, pid = main_worker(kc)
    kill_pid(pid)
    reply, iopub = finish_cell(kc, msg_id, seen)
    assert_crashed(reply, iopub, "SIGKILL", restored=True)
    reply, iopub = execute(kc, CHECK)
    assert result_text(iopub) == CHECK_RESULT, describe(iopub)


def test_second_interrupt_restores(snap_kernel: Kernel) -> None:
    kc = snap_kernel.kc
    time.sleep(PAUSE)
    msg_id, seen = start_cell_marked(kc, STUBBORN, "looping")
    snap_kernel.km.interrupt_kernel()
    wait_for_output(kc, msg_id, "caught", seen)
    snap_kernel.km.interrupt_kernel()
    reply, iopub = finish_cell(kc, msg_id, seen)
    assert_crashed(reply, iopub, "interrupted again", restored=True)
    reply, iopub = execute(kc, CHECK)
    assert result_text(iopub) == CHECK_RESULT, describe(iopub)


def test_timeout_escalation_restores(snap_kernel: Kernel) -> None:
    kc = snap_kernel.kc
    time.sleep(PAUSE)
    stubborn = (
        "import time\nwhile True:\n    try:\n        time.sleep(60)\n"
        "    except BaseException:\n        pass"
    )
    msg_id = send_execute(kc, stubborn, tags=["timeout=0.5"])
    reply = get_reply(kc, msg_id, TIMEOUT)
    iopub = collect_iopub(kc, msg_id)
    assert_crashed(reply, iopub, "timeout=0.5", restored=True)
    reply, iopub = execute(kc, CHECK)
    assert result_text(iopub) == CHECK_RESULT, describe(iopub)


def test_mutating_an_array_in_place_then_crashing_keeps_the_old_content(
    snap_kernel: Kernel,
) -> None:
    kc = snap_kernel.kc
    time.sleep(PAUSE)
    reply, iopub = execute(kc, f"arr[:] = 7\n{SEGFAULT}")
    assert_crashed(reply, iopub, "SIGSEGV", restored=True)
    reply, iopub = execute(kc, "int(arr[:3].sum()), int(arr[-1])")
    assert result_text(iopub) == f"(3, {arr_size() - 1})", describe(iopub)


def arr_size() -> int:
    return 50 * (1 << 20) // 8


def test_run_all_restores_the_state_before_the_crashing_cell() -> None:
    """All cells sent at once (as JupyterLab's Run All): cells that take a while are
    snapshotted before the next (the burst rule), so the restore is to just before the crash."""
    with kv_kernel() as k:
        kc = k.kc
        cells = [
            "import time\nimport numpy as np\nx = np.zeros(1 << 20)\nstep = 1",
            # Past the burst spacing: 100 ms, or 20 forks (a fresh worker's first fork can
            # take 15 ms on a loaded machine).
            "time.sleep(0.6)\nstep = 2",
            f"x[:] = 7\nstep = 3\n{SEGFAULT}",
            "step = 4",
        ]
        ids = [send_execute(kc, code) for code in cells]
        replies = [get_reply(kc, i, TIMEOUT) for i in ids]
        assert [r["content"]["status"] for r in replies] == ["ok", "ok", "error", "aborted"]
        iopub = collect_iopub(kc, ids[2])
        assert_crashed(replies[2], iopub, "SIGSEGV", restored=True)
        _reply, iopub = execute(kc, "step, float(x.max())")
        assert result_text(iopub) == "(2, 0.0)", describe(iopub)


def test_snapshot_off_is_todays_behaviour_and_on_again() -> None:
    with kv_kernel() as k:
        kc = k.kc
        execute(kc, "a = 1")
        reply, iopub = execute(kc, "%snapshot off")
        assert stream_text(iopub) == "Snapshots are off.\n"
        reply, iopub = execute(kc, "%snapshot")
        assert "Snapshots are off" in stream_text(iopub)
        time.sleep(PAUSE)
        reply, iopub = execute(kc, SEGFAULT)
        assert_crashed(reply, iopub, "SIGSEGV", restored=False)
        assert "no snapshot: snapshots are off" in reply["content"]["evalue"]
        reply, iopub = execute(kc, "a")
        assert reply["content"]["ename"] == "NameError"
        execute(kc, "%snapshot on")
        execute(kc, "a = 2")
        time.sleep(PAUSE)
        reply, iopub = execute(kc, SEGFAULT)
        assert_crashed(reply, iopub, "SIGSEGV", restored=True)
        reply, iopub = execute(kc, "a")
        assert result_text(iopub) == "2"


def test_snapshots_off_in_the_kernelspec_env() -> None:
    with kv_kernel(snapshots="off") as k:
        execute(k.kc, "a = 1")
        time.sleep(PAUSE)
        reply, iopub = execute(k.kc, SEGFAULT)
        assert_crashed(reply, iopub, "SIGSEGV", restored=False)


def test_a_fork_unsafe_module_stops_snapshots_and_says_why() -> None:
    """CUDA cannot be tested without a GPU; a module that marks itself fork-unsafe takes the
    same path (the worker refuses to fork, and the message names the reason)."""
    mark = (
        "import sys, types\nm = types.ModuleType('fakecuda')\n"
        "m.__kernelvisor_fork_unsafe__ = 'CUDA was initialized'\nsys.modules['fakecuda'] = m"
    )
    with kv_kernel() as k:
        kc = k.kc
        execute(kc, mark)
        time.sleep(PAUSE)
        execute(kc, "a = 1")
        reply, iopub = execute(kc, "%snapshot")
        assert "fakecuda is not fork-safe (CUDA was initialized)" in stream_text(iopub), describe(
            iopub
        )
        time.sleep(PAUSE)
        reply, iopub = execute(kc, SEGFAULT)
        assert_crashed(reply, iopub, "SIGSEGV", restored=False)
        assert "no snapshot: fakecuda is not fork-safe" in reply["content"]["evalue"]


def two_cells(kc) -> None:  # type: ignore[no-untyped-def]
    """``a = 1``, a pause, ``a = 2``: a snapshot holds ``a == 1``."""
    execute(kc, "a = 1")
    time.sleep(PAUSE)
    execute(kc, "a = 2")


def snapshot_state(kc) -> dict:  # type: ignore[no-untyped-def,type-arg]
    msg = kc.session.msg("kernelvisor_info_request", {})
    kc.control_channel.send(msg)
    reply = get_reply(kc, msg["header"]["msg_id"], TIMEOUT, channel="control")
    return dict(reply["content"]["snapshot"])


def test_snapshot_state_and_undo() -> None:
    with kv_kernel() as k:
        kc = k.kc
        two_cells(kc)
        state = snapshot_state(kc)
        assert state["ready"] and state["enabled"], state
        assert state["before_cell"] == 2 and state["age_cells"] == 1, state
        assert state["private_bytes"] > 0 and state["fork_ms"] > 0, state
        time.sleep(PAUSE)
        # %undo rolls back the cell before it (no snapshot is taken before an %undo cell).
        reply, iopub = execute(kc, "%undo")
        assert reply["content"]["status"] == "ok", reply["content"]
        assert "rolled back to before cell [2]" in stream_text(iopub), describe(iopub)
        _reply, iopub = execute(kc, "a")
        assert result_text(iopub) == "1", describe(iopub)
        time.sleep(PAUSE)
        # %snapshot is a cell too: the snapshot before it holds what the cells above made.
        _reply, iopub = execute(kc, "%snapshot")
        text = stream_text(iopub)
        assert "Snapshots are on." in text and "private memory" in text, text
        assert "before cell [5]" in text, text


def test_cells_queued_behind_undo_run_in_the_restored_namespace() -> None:
    """%undo answers ok, so the cells queued behind it (Run All) run, on the namespace it
    restored; they are not aborted as after an error (they were: %undo replaces the worker
    the way a crash does, and the queue went with it)."""
    with kv_kernel() as k:
        kc = k.kc
        execute(kc, "a = 1")
        time.sleep(PAUSE)
        cells = [kc.execute(code) for code in ("a = 2", "%undo", "b = a", "b")]
        done = collect_requests(kc, cells)
        statuses = [done[c]["reply"]["status"] for c in cells]
        assert statuses == ["ok"] * 4, [done[c]["reply"] for c in cells]
        assert "rolled back to before cell [2]" in stream_text(done[cells[1]]["iopub"])
        assert result_text(done[cells[3]]["iopub"]) == "1", describe(done[cells[3]]["iopub"])


def test_undo_beside_a_task_cell() -> None:
    """A task cell still running when %undo replaces the worker was cut short: it gets the
    crash error, not %undo's "rolled back". %undo's own reply carries its own number, not
    the task's (which started after it)."""
    with kv_kernel() as k:
        kc = k.kc
        execute(kc, "a = 1")
        time.sleep(PAUSE)
        execute(kc, "a = 2")
        time.sleep(PAUSE)
        undo = kc.execute("import time; time.sleep(0.3)\n%undo")
        task = kc.execute("# task\nimport asyncio\nawait asyncio.sleep(5)")
        done = collect_requests(kc, [undo, task])
        reply, iopub = done[undo]["reply"], done[undo]["iopub"]
        assert reply["status"] == "ok", reply
        assert "rolled back" in stream_text(iopub), describe(iopub)
        [number] = [
            m["content"]["execution_count"] for m in iopub if m["msg_type"] == "execute_input"
        ]
        assert reply["execution_count"] == number, (reply, describe(iopub))
        cut = done[task]["reply"]
        assert cut["status"] == "error" and cut["ename"] == "WorkerCrashed", cut
        assert "%undo" in cut["evalue"], cut


def test_undo_without_a_snapshot_says_so() -> None:
    with kv_kernel(snapshots="off") as k:
        execute(k.kc, "a = 1")
        _reply, iopub = execute(k.kc, "%undo")
        assert "Nothing to undo: no snapshot: snapshots are off." in stream_text(iopub)
        _reply, iopub = execute(k.kc, "a")
        assert result_text(iopub) == "1"


@pytest.mark.parametrize(
    ("settings", "why"),
    [
        ({"memory_limit": "4G", "snapshot_memory": "100M"}, "over the --snapshot-memory budget"),
        ({"memory_limit": "330M"}, "memory was tight"),
    ],
    ids=["budget", "tight"],
)
def test_memory_hungry_snapshot_is_dropped_not_the_worker(settings: dict, why: str) -> None:  # type: ignore[type-arg]
    """Rewriting a 150 MiB array after the fork makes the snapshot's copy of it private memory
    (copy-on-write). Over its budget, or when the worker and its snapshots together pass the
    memory limit, that snapshot goes and the live worker stays; the next one, taken once the
    worker is idle again, shares the new array with it."""
    with kv_kernel(**settings) as k:
        kc = k.kc
        execute(kc, "import numpy as np\nbig = np.ones(150 << 17)")  # 150 MiB
        wait_until(
            lambda: snapshot_state(kc)["before_cell"] == 2, "a snapshot that holds the array"
        )
        hungry = snapshot_state(kc)["pid"]
        _, pid = main_worker(kc)
        _reply, iopub = execute(kc, "big[:] = 2.0\nfloat(big[0])")
        assert result_text(iopub) == "2.0", describe(iopub)
        wait_until(
            lambda: hungry not in [s["pid"] for s in snapshot_state(kc)["kept"]],
            "the memory-hungry snapshot to be dropped",
        )
        wait_dead({hungry}, "the dropped snapshot to exit")
        state = snapshot_state(kc)
        assert why in (state["last_dropped"] or ""), state
        assert main_worker(kc)[1] == pid, "the worker was not killed"
        for kept in state["kept"]:
            assert kept["private_bytes"] < 100 << 20, state
        _reply, iopub = execute(kc, "float(big.sum()) / big.size")
        assert result_text(iopub) == "2.0"


@pytest.mark.parametrize("how", ["shutdown", "sigkill"])
def test_no_snapshot_outlives_the_kernel(how: str) -> None:
    with kv_kernel() as k:
        kc = k.kc
        two_cells(kc)
        state = snapshot_state(kc)
        snap = state["pid"]
        assert snap and psutil.pid_exists(snap), state
        if how == "sigkill":
            sup = supervisor_pid(k)
            os.kill(sup, signal.SIGKILL)
            wait_dead({snap}, "the snapshot to die with the supervisor", timeout=15)
    wait_dead({snap}, "the snapshot to be gone after shutdown", timeout=15)


def test_restart_leaves_no_snapshot() -> None:
    with kv_kernel() as k:
        kc = k.kc
        two_cells(kc)
        snap = snapshot_state(kc)["pid"]
        k.km.restart_kernel(now=False)
        kc.wait_for_ready(timeout=TIMEOUT)
        wait_dead({snap}, "the old snapshot to be gone after a restart", timeout=15)
        _reply, iopub = execute(kc, "1+1")
        assert result_text(iopub) == "2"


def test_memory_limit_and_unresponsive_kills_restore() -> None:
    grow = (
        "import time\nchunks = []\nwhile True:\n"
        '    chunks.append(b"x" * (20 << 20))\n    time.sleep(0.02)'
    )
    with kv_kernel(memory_limit="300M") as k:
        define_small(k.kc)
        time.sleep(PAUSE)
        reply, iopub = execute(k.kc, grow)
        assert_crashed(reply, iopub, "out of memory", restored=True)
        reply, iopub = execute(k.kc, "a + 1")
        assert result_text(iopub) == "42"
    deadlock = (
        "import ctypes\nlibc = ctypes.PyDLL(None)\nm = ctypes.create_string_buffer(64)\n"
        "libc.pthread_mutex_init(m, None)\nlibc.pthread_mutex_lock(m)\nlibc.pthread_mutex_lock(m)"
    )
    with kv_kernel(unresponsive_timeout=2) as k:
        define_small(k.kc)
        time.sleep(PAUSE)
        reply, iopub = execute(k.kc, deadlock)
        assert_crashed(reply, iopub, "unresponsive", restored=True)
        reply, iopub = execute(k.kc, "a + 1")
        assert result_text(iopub) == "42"


def define_small(kc) -> None:  # type: ignore[no-untyped-def]
    reply, iopub = execute(kc, "a = 41")
    assert reply["content"]["status"] == "ok", describe(iopub)


def test_the_snapshot_takes_over_and_the_spare_stays_warm() -> None:
    """With a snapshot, the crash promotes it (a new worker id, the snapshot's pid); the warm
    spare is not used, and nothing is left behind: no zombie, no second snapshot."""
    from isolation_support import (
        idle_workers,
        kv_info,
        kv_snapshot_pid,
        kv_snapshot_pids,
        settled,
        wait_pool,
    )

    with kv_kernel(warm_workers=1) as k:
        kc = k.kc
        execute(kc, "a = 1")
        pool = wait_pool(kc, lambda p: settled(p, 1), "a main and one idle worker")
        spare = idle_workers(pool)
        time.sleep(PAUSE)
        execute(kc, "a = 2")
        old_id, old_pid = main_worker(kc)
        time.sleep(PAUSE)
        kept = kv_snapshot_pids(kc)
        # The snapshot taken once the last cell was done is the one promoted.
        reply, iopub = execute(kc, f"print(__import__('os').getpid())\n{SEGFAULT}")
        assert_crashed(reply, iopub, "SIGSEGV", restored=True)
        new_id, new_pid = main_worker(kc)
        assert new_pid != old_pid and new_id > old_id
        assert new_pid in kept, (new_pid, kept)
        assert psutil.Process(new_pid).ppid() == supervisor_pid(k), "adopted by the supervisor"
        # The dead worker's other snapshot goes; the heir's own is its child.
        wait_dead(kept - {new_pid}, "the dead worker's older snapshot to exit")
        heirs = kv_snapshot_pid(kc)
        assert heirs is None or psutil.Process(heirs).ppid() == new_pid
        assert idle_workers(kv_info(kc)) == spare, "the spare stays idle"
        wait_dead({old_pid}, "the dead worker to be reaped")
        sup = psutil.Process(supervisor_pid(k))
        wait_until(
            lambda: not [c for c in sup.children() if c.status() == psutil.STATUS_ZOMBIE],
            "no zombie children",
        )
        reply, iopub = execute(kc, "a")
        assert result_text(iopub) == "2"


def test_a_crash_tagged_raises_exception_does_not_stop_run_all() -> None:
    """Run All with the crashing cell tagged ``raises-exception`` (as JupyterLab sends it): the
    cells after it run, in the restored namespace."""
    with kv_kernel() as k:
        kc = k.kc
        # Long enough for the burst rule to snapshot before the next cell (100 ms, or 20
        # forks: a fresh worker's first fork can take 15 ms on a loaded machine).
        first = send_execute(kc, "import time\ntime.sleep(0.6)\na = 1")
        crash = send_execute(kc, f"a = 99\n{SEGFAULT}", tags=["raises-exception"])
        after = send_execute(kc, "a + 1")
        assert get_reply(kc, first, TIMEOUT)["content"]["status"] == "ok"
        crashed = get_reply(kc, crash, TIMEOUT)["content"]
        assert crashed["ename"] == "WorkerCrashed"
        assert RESTORED in crashed["evalue"], crashed["evalue"]
        reply = get_reply(kc, after, TIMEOUT)
        assert reply["content"]["status"] == "ok", (crashed["evalue"], reply["content"])
        assert result_text(collect_iopub(kc, after)) == "2"


@pytest.mark.parametrize("tagged", [True, False], ids=["tagged", "untagged"])
def test_a_cell_tagged_snapshot_gets_one_even_in_a_fast_burst(tagged: bool) -> None:
    """Run All of quick cells: the burst rule skips the snapshots between them, so a crash
    goes back past them, and says so. Tagged ``snapshot``, the crashing cell gets one right
    before it: the crash costs exactly that cell."""
    with kv_kernel() as k:
        kc = k.kc
        reply, iopub = execute(kc, "a = 1")
        assert reply["content"]["status"] == "ok", describe(iopub)
        # The idle snapshot (2 ms after the reply) keeps `a = 1`; the rest follow at once,
        # well within the burst spacing (100 ms) after it.
        time.sleep(0.01)
        quick = [send_execute(kc, f"a = {n}") for n in (2, 3)]
        tags = ["raises-exception", "snapshot"] if tagged else ["raises-exception"]
        crash = send_execute(kc, f"a = 99\n{SEGFAULT}", tags=tags)
        after = send_execute(kc, "a")
        for i in quick:
            assert get_reply(kc, i, TIMEOUT)["content"]["status"] == "ok"
        crashed = get_reply(kc, crash, TIMEOUT)["content"]
        assert crashed["ename"] == "WorkerCrashed", crashed
        reply = get_reply(kc, after, TIMEOUT)
        assert reply["content"]["status"] == "ok", (crashed["evalue"], reply["content"])
        value = result_text(collect_iopub(kc, after))
        if tagged:
            assert RESTORED in crashed["evalue"], crashed["evalue"]
            assert value == "3"
        else:
            # Usually restored to before a quick cell (cell [k] set `a = k`): the message names
            # the first cell it undid, and the namespace is as that cell found it. (On a loaded
            # machine a quick cell may run long enough to get a snapshot after it.)
            undone = re.search(r"restored to before cell \[(\d+)\]", crashed["evalue"])
            first_lost = int(undone.group(1)) if undone else 4
            assert undone or RESTORED in crashed["evalue"], crashed["evalue"]
            assert value == str(first_lost - 1), (value, crashed["evalue"])
