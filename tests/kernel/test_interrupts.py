"""Interrupts: SIGINT to the kernel's process group (signal mode, what jupyter_client does) and
interrupt_request on control; escalation for cells that ignore them; idle workers untouched."""

from __future__ import annotations

import os
import queue
import signal
import time

import pytest
from isolation_support import (
    STUBBORN,
    assert_crashed,
    assert_healthy,
    assert_heartbeat,
    assert_namespace_as_reported,
    describe,
    finish_cell,
    idle_workers,
    is_running,
    kv_info,
    kv_kernel,
    main_worker,
    settled,
    start_cell_marked,
    supervisor_pid,
    wait_for_output,
    wait_pool,
)
from jupyter_client.blocking.client import BlockingKernelClient
from kvharness import Kernel, execute, get_reply, parent_id, plain, result_text

SLEEP_MARKED = 'import time\nprint("sleeping", flush=True)\ntime.sleep(30)'
SLEEP_ONE_STATEMENT = (
    'for t in [__import__("time")]:\n    print("sleeping", flush=True)\n    t.sleep(30)'
)


# An interrupt is asynchronous (a signal, or a message handled by the supervisor in its own
# time); this pause lets one sent while idle be handled before the next cell is sent. It only
# orders events, nothing is asserted about durations.
SETTLE = 0.5


def interrupt_by_signal(k: Kernel) -> None:
    """What a frontend does with interrupt_mode "signal": SIGINT to the kernel's process group."""
    assert k.km.kernel_spec is not None
    assert k.km.kernel_spec.interrupt_mode == "signal"
    k.km.interrupt_kernel()


def interrupt_by_message(k: Kernel) -> None:
    """interrupt_request on the control channel; the supervisor acknowledges it at once."""
    msg = k.kc.session.msg("interrupt_request", {})
    k.kc.control_channel.send(msg)
    reply = get_reply(k.kc, msg["header"]["msg_id"], channel="control")
    assert reply["msg_type"] == "interrupt_reply"
    assert reply["content"]["status"] == "ok", reply["content"]


INTERRUPTS = {"signal": interrupt_by_signal, "message": interrupt_by_message}


def no_reply_yet(kc: BlockingKernelClient, msg_id: str) -> bool:
    try:
        msg = kc.get_shell_msg(timeout=0.2)
    except queue.Empty:
        return True
    raise AssertionError(
        f"unexpected shell message while the cell runs: {msg['msg_type']} "
        f"(parent {parent_id(msg)}, cell {msg_id}): {msg['content']}"
    )


@pytest.mark.parametrize("how", list(INTERRUPTS))
def test_interrupt_raises_keyboard_interrupt_and_keeps_namespace(kernel: Kernel, how: str) -> None:
    kc = kernel.kc
    execute(kc, "survivor = 11")
    before = main_worker(kc)
    # One statement: IPython compiles each top-level statement just before it runs it, and an
    # interrupt during that compile would show no frame of the cell.
    msg_id, seen = start_cell_marked(kc, SLEEP_ONE_STATEMENT, "sleeping")

    INTERRUPTS[how](kernel)

    reply, iopub = finish_cell(kc, msg_id, seen)
    assert reply["content"]["status"] == "error", reply["content"]
    assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
    errors = [m for m in iopub if m["msg_type"] == "error"]
    assert [e["content"]["ename"] for e in errors] == ["KeyboardInterrupt"], describe(iopub)
    # It shows where the cell was interrupted, as ipykernel does, and none of the kernel's own
    # frames (the SIGINT handler that raised it, the output code of the print).
    shown = plain("\n".join(errors[0]["content"]["traceback"]))
    assert "Cell In[" in shown, shown
    assert "kernelvisor" not in shown, shown
    # The same worker, its namespace intact, and it goes on working.
    assert main_worker(kc) == before
    reply, iopub = execute(kc, "survivor")
    assert result_text(iopub) == "11", describe(iopub)


@pytest.mark.parametrize("how", list(INTERRUPTS))
def test_interrupt_while_input_waits(kernel: Kernel, how: str) -> None:
    kc = kernel.kc
    msg_id = kc.execute("input('name? ')", allow_stdin=True)
    request = kc.get_stdin_msg(timeout=10)
    assert request["msg_type"] == "input_request", request
    INTERRUPTS[how](kernel)
    reply, iopub = finish_cell(kc, msg_id)
    assert reply["content"]["ename"] == "KeyboardInterrupt", describe(iopub)
    assert_healthy(kc)


@pytest.mark.parametrize("how", list(INTERRUPTS))
def test_an_interrupt_is_not_for_the_cell_queued_behind(kernel: Kernel, how: str) -> None:
    """The next queue cell is sent to the worker ahead of time (IPC.md, "Cells sent
    ahead"), but it has not started for the client: an interrupt is not for it. With
    stop_on_error off it runs, and the next interrupt stops it like a first one (it used to
    count as a second, and killed the worker)."""
    kc = kernel.kc
    _, pid = main_worker(kc)
    # Its error must not abort the queue: stop_on_error is the failing cell's.
    first = kc.execute(SLEEP_MARKED, stop_on_error=False)
    seen: list = []
    wait_for_output(kc, first, "sleeping", seen)
    second = kc.execute(SLEEP_MARKED.replace("sleeping", "second"))
    time.sleep(SETTLE)  # sent ahead by now
    INTERRUPTS[how](kernel)
    reply, _ = finish_cell(kc, first, seen)
    assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
    seen = []
    wait_for_output(kc, second, "second", seen)
    INTERRUPTS[how](kernel)
    reply, iopub = finish_cell(kc, second, seen)
    assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
    assert main_worker(kc)[1] == pid, describe(iopub)


@pytest.mark.parametrize("how", list(INTERRUPTS))
def test_second_interrupt_kills_a_cell_that_ignores_the_first(kernel: Kernel, how: str) -> None:
    kc = kernel.kc
    execute(kc, "survivor = 1")
    _, pid = main_worker(kc)
    msg_id, seen = start_cell_marked(kc, STUBBORN, "looping")

    INTERRUPTS[how](kernel)
    # The cell caught it and runs on: nothing visible but its own output.
    wait_for_output(kc, msg_id, "caught", seen)
    assert no_reply_yet(kc, msg_id)
    assert is_running(pid)

    INTERRUPTS[how](kernel)

    reply, iopub = finish_cell(kc, msg_id, seen)
    assert_crashed(reply, iopub, "interrupted again")
    assert "did not stop when interrupted" in reply["content"]["evalue"], reply["content"]
    assert not is_running(pid)
    assert_namespace_as_reported(kc, reply, "survivor")
    assert_healthy(kc)


def test_interrupt_grace_kills_after_one_interrupt() -> None:
    with kv_kernel(interrupt_grace=1) as k:
        kc = k.kc
        _, pid = main_worker(kc)
        msg_id, seen = start_cell_marked(kc, STUBBORN, "looping")
        interrupt_by_signal(k)
        wait_for_output(kc, msg_id, "caught", seen)
        # No second interrupt: the grace period runs out.
        reply, iopub = finish_cell(kc, msg_id, seen)
        assert_crashed(reply, iopub, "still running 1.0 s after an interrupt")
        assert not is_running(pid)
        assert_healthy(kc)


def test_interrupt_grace_spares_a_cell_that_stops() -> None:
    """With a grace period, a cell that does stop gets its KeyboardInterrupt and keeps its
    worker, even after the grace period has passed."""
    # A grace period a loaded CI machine cannot overrun by accident while the interrupted
    # cell ends (its KeyboardInterrupt reply has to be sent within it).
    with kv_kernel(interrupt_grace=3) as k:
        kc = k.kc
        execute(kc, "survivor = 3")
        before = main_worker(kc)
        msg_id, seen = start_cell_marked(kc, SLEEP_MARKED, "sleeping")
        interrupt_by_signal(k)
        reply, _ = finish_cell(kc, msg_id, seen)
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
        # Longer than the grace period, then a cell that runs past it without interrupts.
        reply, iopub = execute(kc, "import time; time.sleep(4); survivor")
        assert reply["content"]["status"] == "ok", (reply["content"], describe(iopub))
        assert result_text(iopub) == "3"
        assert main_worker(kc) == before


@pytest.mark.parametrize("how", list(INTERRUPTS))
def test_interrupt_while_idle_is_harmless(kernel: Kernel, how: str) -> None:
    kc = kernel.kc
    execute(kc, "survivor = 2")
    before = main_worker(kc)
    for _ in range(2):  # twice: an idle interrupt must not count towards escalation either
        INTERRUPTS[how](kernel)
        kv_info(kc)
        time.sleep(SETTLE)
    assert main_worker(kc) == before
    assert_healthy(kc)
    _, iopub = execute(kc, "survivor")
    assert result_text(iopub) == "2", describe(iopub)
    assert main_worker(kc) == before


def test_group_sigint_does_not_reach_idle_workers() -> None:
    # Two warm workers, so that more than one idle process is exposed to the signal.
    with kv_kernel(warm_workers=2) as k:
        kc = k.kc
        execute(kc, "survivor = 4")
        pool = wait_pool(kc, lambda p: settled(p, 2), "a main and two idle workers")
        main = main_worker(kc)
        idle = sorted(idle_workers(pool))
        pgid = os.getpgid(supervisor_pid(k))

        # While idle: the whole group gets SIGINT.
        os.killpg(pgid, signal.SIGINT)
        kv_info(kc)
        time.sleep(SETTLE)
        pool = kv_info(kc)
        assert sorted(idle_workers(pool)) == idle, pool
        assert all(is_running(pid) for _, pid in idle)

        # While a cell runs: it is interrupted, the idle workers are not.
        msg_id, seen = start_cell_marked(kc, SLEEP_MARKED, "sleeping")
        os.killpg(pgid, signal.SIGINT)
        reply, _ = finish_cell(kc, msg_id, seen)
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
        pool = kv_info(kc)
        assert sorted(idle_workers(pool)) == idle, pool
        assert all(is_running(pid) for _, pid in idle)
        assert main_worker(kc) == main
        assert result_text(execute(kc, "survivor")[1]) == "4"


# Stuck in C code with the GIL held (see test_isolation.DEADLOCK): SIGINT cannot get through.
# The marker's print may still be finishing its send when the test's first SIGINT lands (the
# interrupt is then raised as print returns): swallowed, so the cell reaches its deadlock either
# way.
DEADLOCK_MARKED = (
    "import ctypes\nlibc = ctypes.PyDLL(None)\nm = ctypes.create_string_buffer(64)\n"
    "libc.pthread_mutex_init(m, None)\nlibc.pthread_mutex_lock(m)\n"
    # One statement after the marker: IPython compiles each top-level statement just before
    # it runs, and an interrupt landing in that compile would end the cell early.
    "printed = False\nwhile True:\n    try:\n        if not printed:\n"
    '            print("stuck", flush=True)\n            printed = True\n'
    "        libc.pthread_mutex_lock(m)\n    except KeyboardInterrupt:\n        pass"
)


def test_second_interrupt_frees_a_worker_stuck_in_c_code(kernel: Kernel) -> None:
    kc = kernel.kc
    execute(kc, "survivor = 1")
    _, pid = main_worker(kc)
    msg_id, seen = start_cell_marked(kc, DEADLOCK_MARKED, "stuck")
    # The kernel itself stays responsive meanwhile.
    info_id = kc.kernel_info()
    assert get_reply(kc, info_id)["content"]["status"] == "ok"
    assert_heartbeat(kc)

    interrupt_by_signal(kernel)
    kv_info(kc)
    assert no_reply_yet(kc, msg_id)
    assert is_running(pid)

    interrupt_by_signal(kernel)

    reply, iopub = finish_cell(kc, msg_id, seen)
    assert_crashed(reply, iopub, "interrupted again")
    assert not is_running(pid)
    assert_namespace_as_reported(kc, reply, "survivor")
    assert_healthy(kc)


@pytest.mark.parametrize(
    "wait", ["await asyncio.sleep(30)", "time.sleep(30)"], ids=["await", "blocking"]
)
def test_a_sigint_caught_by_another_thread_still_ends_the_cell(kernel: Kernel, wait: str) -> None:
    """A process-directed SIGINT (the supervisor's kill, a frontend's) may be caught by any
    thread of the worker, and Python runs its handler on the main thread only: here that
    thread waits in its event loop's select, or in `time.sleep`, for 30 s. The signal must
    still end the cell at once. A thread of the cell signals itself, which makes the case
    certain (a SIGINT landing just before the main thread blocks is the same case, by
    chance)."""
    kc = kernel.kc
    code = (
        "import asyncio, signal, threading, time\n"
        "def from_another_thread():\n"
        "    time.sleep(0.5)\n"
        "    signal.pthread_kill(threading.get_ident(), signal.SIGINT)\n"
        "threading.Thread(target=from_another_thread, daemon=True).start()\n"
        'print("waiting", flush=True)\n'
        f"{wait}"
    )
    msg_id, seen = start_cell_marked(kc, code, "waiting")
    begun = time.monotonic()
    reply, iopub = finish_cell(kc, msg_id, seen)
    assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
    # Anything else that wakes the main thread (the supervisor's pings, every second or so)
    # would end it too, later: well under that.
    assert time.monotonic() - begun < 0.9 + 0.5, describe(iopub)
