"""Helpers for the crash-isolation, interrupt and pool tests: kernels started with
KERNELVISOR_* settings, the supervisor's pool state (kernelvisor_info_request), process checks."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

import psutil
from jupyter_client.blocking.client import BlockingKernelClient
from kvharness import (
    KERNELVISOR,
    TIMEOUT,
    Kernel,
    Msg,
    collect_iopub,
    execute,
    get_reply,
    iopub_until,
    is_idle,
    kernel_process,
    of_type,
    result_text,
    running_kernel,
)

# How long the pool may take to start a (cold) spare worker on a loaded 2-core box. Only a
# bound against hangs: nothing is asserted about how fast it is.
POOL_TIMEOUT = 60.0

Pool = dict[str, Any]


def kv_env(**settings: str | float) -> dict[str, str]:
    """This process's environment plus ``KERNELVISOR_<NAME>`` settings for the kernel."""
    env = dict(os.environ)
    for name, value in settings.items():
        env[f"KERNELVISOR_{name.upper()}"] = str(value)
    return env


def kv_kernel(**settings: str | float) -> AbstractContextManager[Kernel]:
    """A started kernelvisor kernel whose supervisor runs with the given KERNELVISOR_* settings
    (e.g. ``memory_limit="300M"``), with a ready client; checked for leftovers on exit."""
    return running_kernel(KERNELVISOR, env=kv_env(**settings))


def supervisor_pid(kernel: Kernel) -> int:
    proc = kernel_process(kernel.km)
    assert proc is not None, "no kernel process"
    return proc.pid


# ---- the pool, as the supervisor reports it ----


def kv_info(kc: BlockingKernelClient, timeout: float = TIMEOUT) -> Pool:
    """The supervisor's pool state: ``{"main": {"id", "pid"} | None, "idle": [...], ...}``."""
    msg = kc.session.msg("kernelvisor_info_request", {})
    kc.control_channel.send(msg)
    reply = get_reply(kc, msg["header"]["msg_id"], timeout, channel="control")
    assert reply["msg_type"] == "kernelvisor_info_reply", reply
    content = reply["content"]
    assert content["status"] == "ok", content
    pool: Pool = content["pool"]
    return pool


def kv_snapshot_pid(kc: BlockingKernelClient, timeout: float = TIMEOUT) -> int | None:
    """The pid of the main worker's snapshot, if one is ready (kernelvisor_info_request)."""
    msg = kc.session.msg("kernelvisor_info_request", {})
    kc.control_channel.send(msg)
    reply = get_reply(kc, msg["header"]["msg_id"], timeout, channel="control")
    pid = reply["content"]["snapshot"]["pid"]
    return int(pid) if pid else None


def kv_snapshot_pids(kc: BlockingKernelClient, timeout: float = TIMEOUT) -> set[int]:
    """The pids of every snapshot the supervisor keeps of the main worker (the newest, and
    the one before it that ``%undo`` may need)."""
    msg = kc.session.msg("kernelvisor_info_request", {})
    kc.control_channel.send(msg)
    reply = get_reply(kc, msg["header"]["msg_id"], timeout, channel="control")
    return {int(s["pid"]) for s in reply["content"]["snapshot"]["kept"]}


def wait_pool(
    kc: BlockingKernelClient,
    predicate: Callable[[Pool], bool],
    what: str,
    timeout: float = POOL_TIMEOUT,
) -> Pool:
    """Polls the pool state until ``predicate`` holds; fails with the last state seen."""
    deadline = time.monotonic() + timeout
    while True:
        pool = kv_info(kc)
        if predicate(pool):
            return pool
        if time.monotonic() > deadline:
            raise AssertionError(f"pool never reached: {what}; last state {pool}")
        time.sleep(0.1)


def main_worker(kc: BlockingKernelClient) -> tuple[int, int]:
    """(id, pid) of the worker holding the namespace; waits for one to be up."""
    pool = wait_pool(kc, lambda p: p["main"] is not None, "a main worker")
    return int(pool["main"]["id"]), int(pool["main"]["pid"])


def idle_workers(pool: Pool) -> list[tuple[int, int]]:
    return [(int(w["id"]), int(w["pid"])) for w in pool["idle"]]


def all_worker_pids(pool: Pool) -> set[int]:
    """Every worker process of the pool, the template workers are forked from included."""
    pids = {int(w["pid"]) for key in ("idle", "starting", "retiring") for w in pool[key]}
    for key in ("main", "template"):
        if pool.get(key) is not None:
            pids.add(int(pool[key]["pid"]))
    return pids


def settled(pool: Pool, idle: int) -> bool:
    """A main worker, exactly ``idle`` idle ones, and nothing starting or retiring."""
    return (
        pool["main"] is not None
        and len(pool["idle"]) == idle
        and not pool["starting"]
        and not pool["retiring"]
    )


# ---- processes ----


def is_running(pid: int) -> bool:
    """Whether pid is a live process (a zombie is not)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def wait_until(predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for: {what}")
        time.sleep(0.05)


def wait_dead(pids: set[int], what: str, timeout: float = TIMEOUT) -> None:
    wait_until(lambda: not [p for p in pids if is_running(p)], what, timeout)


def zombie_children(pid: int) -> list[int]:
    try:
        children = psutil.Process(pid).children()
    except psutil.NoSuchProcess:
        return []
    zombies = []
    for child in children:
        try:
            if child.status() == psutil.STATUS_ZOMBIE:
                zombies.append(child.pid)
        except psutil.NoSuchProcess:
            pass
    return zombies


def kill_pid(pid: int, sig: int = signal.SIGKILL) -> None:
    os.kill(pid, sig)


# ---- cells ----

# A cell that swallows every KeyboardInterrupt, saying so each time. Its marker is printed inside
# the try: a SIGINT landing while print() sends it is raised when print() returns.
STUBBORN = """\
import time
caught = 0
started = False
while True:
    try:
        if not started:
            started = True
            print("looping", flush=True)
        time.sleep(0.1)
    except KeyboardInterrupt:
        caught += 1
        print("caught", caught, flush=True)
"""


def start_cell(kc: BlockingKernelClient, code: str, **kwargs: Any) -> str:
    """Sends a cell and waits until it is running (its execute_input is on iopub)."""
    msg_id: str = kc.execute(code, **kwargs)
    iopub_until(kc, msg_id, lambda msg: msg["msg_type"] == "execute_input", [])
    return msg_id


def wait_for_output(kc: BlockingKernelClient, msg_id: str, text: str, seen: list[Msg]) -> None:
    """Waits for ``text`` on the cell's stdout (appending what arrives to ``seen``), failing if
    the cell ends first."""

    def printed_or_ended(msg: Msg) -> bool:
        return is_idle(msg) or (msg["msg_type"] == "stream" and text in msg["content"]["text"])

    if is_idle(iopub_until(kc, msg_id, printed_or_ended, seen)):
        raise AssertionError(f"cell {msg_id} ended before printing {text!r}: {seen}")


def start_cell_marked(kc: BlockingKernelClient, code: str, marker: str) -> tuple[str, list[Msg]]:
    """Sends a cell whose code prints ``marker`` once it is inside the part to interrupt/kill, and
    waits for that output; returns the msg_id and the iopub messages seen so far."""
    msg_id: str = kc.execute(code)
    seen: list[Msg] = []
    wait_for_output(kc, msg_id, marker, seen)
    return msg_id, seen


def finish_cell(
    kc: BlockingKernelClient, msg_id: str, seen: list[Msg] | None = None, timeout: float = TIMEOUT
) -> tuple[Msg, list[Msg]]:
    """The reply to a started cell and all its iopub messages (``seen`` first) through idle."""
    reply = get_reply(kc, msg_id, timeout)
    return reply, [*(seen or []), *collect_iopub(kc, msg_id, timeout)]


def describe(msgs: list[Msg]) -> list[str]:
    """A compact view of a message sequence for assertion messages."""
    out = []
    for m in msgs:
        c = m["content"]
        if m["msg_type"] == "status":
            out.append(f"status:{c['execution_state']}")
        elif m["msg_type"] == "stream":
            out.append(f"stream:{c['name']}:{c['text']!r}")
        elif m["msg_type"] == "error":
            out.append(f"error:{c['ename']}:{c['evalue']!r}")
        else:
            out.append(m["msg_type"])
    return out


RESTORED = "the namespace was restored to before this cell"


def assert_crashed(reply: Msg, iopub: list[Msg], cause: str, restored: bool | None = None) -> Msg:
    """The cell ended with a WorkerCrashed error naming ``cause``: one iopub error before idle, an
    error reply with the same ename/evalue. ``restored``: the message says the namespace was
    restored to before this cell (True), or lost (False); None: either. Returns the iopub error's
    content."""
    content = reply["content"]
    assert content["status"] == "error", content
    assert content["ename"] == "WorkerCrashed", content
    assert cause in content["evalue"], content["evalue"]
    evalue = content["evalue"]
    if restored is True:
        assert RESTORED in evalue, evalue
    elif restored is False:
        assert "namespace was lost" in evalue, evalue
    else:
        assert "namespace was lost" in evalue or "namespace was restored" in evalue, evalue
    errors = of_type(iopub, "error")
    assert len(errors) == 1, describe(iopub)
    error = errors[0]["content"]
    assert error["ename"] == "WorkerCrashed", error
    assert error["evalue"] == content["evalue"]
    assert isinstance(error["traceback"], list) and error["traceback"], error
    assert iopub[-1]["msg_type"] == "status", describe(iopub)
    assert iopub[-1]["content"]["execution_state"] == "idle", describe(iopub)
    return dict(error)


def assert_healthy(kc: BlockingKernelClient, code: str = "1+1", expect: str = "2") -> None:
    """The kernel runs a cell normally."""
    reply, iopub = execute(kc, code)
    assert reply["content"]["status"] == "ok", (reply["content"], describe(iopub))
    assert result_text(iopub) == expect, describe(iopub)


def assert_name_lost(kc: BlockingKernelClient, name: str) -> None:
    reply, iopub = execute(kc, name)
    assert reply["content"]["status"] == "error", (reply["content"], describe(iopub))
    assert reply["content"]["ename"] == "NameError", reply["content"]


def assert_namespace_as_reported(kc: BlockingKernelClient, crash_reply: Msg, name: str) -> None:
    """After a crash, ``name`` (defined before the crashing cell) is there if the crash message
    said the namespace was restored (a snapshot), and gone if it said it was lost."""
    evalue = crash_reply["content"]["evalue"]
    reply, _ = execute(kc, name)
    if RESTORED in evalue:
        assert reply["content"]["status"] == "ok", (evalue, reply["content"])
    elif "namespace was restored" in evalue:
        # To an older snapshot (a burst of cells, README "Snapshots"): names of the cells
        # after it are gone, as the message says.
        assert "the changes of later cells" in evalue, evalue
    else:
        assert "namespace was lost" in evalue, evalue
        assert reply["content"]["ename"] == "NameError", reply["content"]


def assert_heartbeat(kc: BlockingKernelClient) -> None:
    assert kc.is_alive()
    wait_until(kc.hb_channel.is_beating, "the heartbeat to beat", timeout=10)
