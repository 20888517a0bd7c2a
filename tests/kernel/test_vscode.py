"""VS Code's habits with a local kernel, each through jupyter_client: how it interrupts (SIGINT
to every process of the kernel's tree, then the kernel), kernel_info on control and shell at
once, the variable viewer's late display updates, restart by killing the processes (no
shutdown_request), `jupyter run`, and the "Debug Cell" DAP flow."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psutil
from dap_client import Dap
from isolation_support import (
    STUBBORN,
    idle_workers,
    kv_kernel,
    main_worker,
    settled,
    start_cell_marked,
    wait_for_output,
    wait_pool,
)
from jupyter_client.manager import KernelManager
from kvharness import (
    KERNELVISOR,
    STARTUP_TIMEOUT,
    TIMEOUT,
    Kernel,
    collect_iopub,
    execute,
    get_reply,
    kernel_process,
    of_type,
    parent_id,
    result_text,
    running_kernel,
    send_execute,
    stream_text,
)

# A cell that catches KeyboardInterrupt and cleans up for a while: a second SIGINT of the same
# click would cut its clean-up short. Its marker is printed inside the try: a SIGINT landing
# while print() sends it is raised when print() returns.
CLEAN_UP = """\
import time
try:
    print("working", flush=True)
    time.sleep(60)
except KeyboardInterrupt:
    print("clean-up starts", flush=True)
    time.sleep(1.5)
    print("clean-up ends", flush=True)
"""


def vscode_interrupt(k: Kernel) -> None:
    """VS Code's interrupt of a local kernel (interrupt_mode "signal"): SIGINT to every
    descendant of the kernel process, one by one, then to the kernel itself."""
    proc = kernel_process(k.km)
    assert proc is not None
    signal_tree(proc.pid)


def signal_tree(pid: int) -> None:
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, signal.SIGINT)
    os.kill(pid, signal.SIGINT)


def test_one_click_is_one_interrupt_and_the_clean_up_runs_to_its_end() -> None:
    # A warm spare, so that an idle worker gets the clicks too.
    with kv_kernel(warm_workers=1) as kernel:
        kc = kernel.kc
        idle_before = idle_workers(wait_pool(kc, lambda pool: len(pool["idle"]) >= 1, "a spare"))
        before = main_worker(kc)
        for _ in range(2):  # a later click is a new interrupt
            msg_id, seen = start_cell_marked(kc, CLEAN_UP, "working")
            vscode_interrupt(kernel)
            reply = get_reply(kc, msg_id)
            # The cell caught the one KeyboardInterrupt and finished its clean-up.
            assert reply["content"]["status"] == "ok", reply["content"]
            out = stream_text(seen + collect_iopub(kc, msg_id))
            assert out == "working\nclean-up starts\nclean-up ends\n", out
        assert main_worker(kc) == before
        # Idle workers got the signal too, and ignored it.
        assert idle_workers(wait_pool(kc, lambda pool: True, "the pool")) == idle_before


def test_a_second_click_still_escalates(kernel: Kernel) -> None:
    kc = kernel.kc
    before = main_worker(kc)
    msg_id, seen = start_cell_marked(kc, STUBBORN, "looping")
    vscode_interrupt(kernel)
    wait_for_output(kc, msg_id, "caught 1", seen)
    # One click, one KeyboardInterrupt; the next click comes a second later.
    deadline = time.monotonic() + 1.0
    while (remaining := deadline - time.monotonic()) > 0:
        try:
            msg = kc.get_iopub_msg(timeout=remaining)
        except queue.Empty:
            break
        if parent_id(msg) == msg_id:
            seen.append(msg)
    assert stream_text(seen) == "looping\ncaught 1\n"
    vscode_interrupt(kernel)
    reply = get_reply(kc, msg_id)
    # The cell ignored the first interrupt: the second one replaced its worker.
    assert reply["content"]["ename"] == "WorkerCrashed", reply["content"]
    assert "interrupted again" in reply["content"]["evalue"]
    assert main_worker(kc) != before
    assert result_text(execute(kc, "1 + 1")[1]) == "2"


def test_clicks_while_the_workers_start_harm_none() -> None:
    """A worker still starting (IPython not imported yet) ignores SIGINT too."""
    km = KernelManager(kernel_name=KERNELVISOR)
    # A spare too: more workers starting while the clicks come.
    km.start_kernel(env={**os.environ, "KERNELVISOR_WARM_WORKERS": "1"})
    kc = km.client()
    try:
        proc = kernel_process(km)
        assert proc is not None
        kc.start_channels()
        # The supervisor answers kernel_info at once; its first worker is still starting.
        kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:  # through the main worker's and a spare's start-up
            signal_tree(proc.pid)
            time.sleep(0.05)
        pool = wait_pool(kc, lambda p: settled(p, 1), "a main worker and a spare")
        # The first two workers started (either may be the main one), not replacements, and
        # the first template they were forked from (README "How it works").
        first = [1, 2] if pool.get("template") is None else [2, 3]
        assert sorted([pool["main"]["id"], *(w["id"] for w in pool["idle"])]) == first, pool
        assert pool.get("template") is None or pool["template"]["id"] == 1, pool
        assert result_text(execute(kc, "1 + 1")[1]) == "2"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_kernel_info_on_control_and_shell_at_once() -> None:
    """VS Code's start-up: both at once, before the kernel has a worker; both answered."""
    km = KernelManager(kernel_name=KERNELVISOR)
    km.start_kernel()
    kc = km.client()
    kc.start_channels()
    try:
        requests = {}
        for channel in ("control", "shell"):
            msg = kc.session.msg("kernel_info_request", {})
            getattr(kc, f"{channel}_channel").send(msg)
            requests[channel] = msg["header"]["msg_id"]
        for channel, msg_id in requests.items():
            reply = get_reply(kc, msg_id, STARTUP_TIMEOUT, channel=channel)
            assert reply["msg_type"] == "kernel_info_reply"
            assert reply["content"]["status"] == "ok"
            assert reply["content"]["language_info"]["name"] == "python"
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def test_variable_viewer_update_after_the_reply(kernel: Kernel) -> None:
    """VS Code's variable viewer helpers: silent false, store_history false; a thread they start
    sends update_display_data after the request has replied. It reaches the client with the
    request as its parent."""
    kc = kernel.kc
    execute(kc, "answer = 42")
    count_before = execute(kc, "1")[0]["content"]["execution_count"]
    display_id = f"vscode-{uuid.uuid4().hex}"
    code = f"""\
import threading, time
from IPython.display import display, update_display
_VSCODE_names = %who_ls
display("names: " + ",".join(_VSCODE_names), display_id={display_id!r})
def _VSCODE_later():
    time.sleep(0.5)
    update_display("updated", display_id={display_id!r})
threading.Thread(target=_VSCODE_later).start()
"""
    msg_id = send_execute(kc, code, silent=False, store_history=False)
    reply = get_reply(kc, msg_id)
    assert reply["content"]["status"] == "ok", reply["content"]
    iopub = collect_iopub(kc, msg_id)
    (shown,) = of_type(iopub, "display_data")
    assert "answer" in shown["content"]["data"]["text/plain"]
    assert shown["content"]["transient"]["display_id"] == display_id
    deadline = time.monotonic() + TIMEOUT
    while True:
        assert time.monotonic() < deadline, "no update_display_data"
        msg = kc.get_iopub_msg(timeout=TIMEOUT)
        if msg["msg_type"] == "update_display_data":
            break
    assert parent_id(msg) == msg_id
    assert msg["content"]["transient"]["display_id"] == display_id
    assert msg["content"]["data"]["text/plain"] == "'updated'"
    # store_history false: no execution count spent.
    assert execute(kc, "1")[0]["content"]["execution_count"] == count_before + 1


def test_restart_by_killing_the_processes_leaves_nothing_behind() -> None:
    """VS Code's restart and close: SIGTERM to the kernel's descendants, then to the kernel, no
    shutdown_request. Nothing of it is left (workers, debugpy's adapter), and the next kernel
    starts clean."""
    tag = uuid.uuid4().hex
    env = {**os.environ, "KV_VSCODE_TEST_TAG": tag, "KERNELVISOR_WARM_WORKERS": "1"}
    km = KernelManager(kernel_name=KERNELVISOR)
    km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
        execute(kc, "before_restart = 1")
        Dap(kc).start()  # debugpy's adapter too
        wait_pool(kc, lambda pool: len(pool["idle"]) >= 1, "a spare")
        proc = kernel_process(km)
        assert proc is not None
        children = psutil.Process(proc.pid).children(recursive=True)
        assert len(children) >= 2
        for child in children:
            child.terminate()
        proc.terminate()
        proc.wait(TIMEOUT)
        _, alive = psutil.wait_procs(children, timeout=TIMEOUT)
        assert not alive, [p.pid for p in alive]
        deadline = time.monotonic() + TIMEOUT
        while tagged(tag):
            assert time.monotonic() < deadline, f"left running: {tagged(tag)}"
            time.sleep(0.1)
    finally:
        kc.stop_channels()
        km.cleanup_resources()
    with running_kernel(KERNELVISOR, env=env) as k:
        reply, _ = execute(k.kc, "before_restart")
        assert reply["content"]["ename"] == "NameError"
    while tagged(tag):  # the second kernel's processes are checked by running_kernel
        assert time.monotonic() < deadline + TIMEOUT
        time.sleep(0.1)


def tagged(tag: str) -> list[int]:
    """Pids of processes whose environment has ``KV_VSCODE_TEST_TAG=tag``."""
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("KV_VSCODE_TEST_TAG") == tag:
                found.append(proc.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


def test_jupyter_run(tmp_path: Path) -> None:
    """`jupyter run --kernel kernelvisor FILE` (jupyter_client passes extra arguments)."""
    script = tmp_path / "hello.py"
    script.write_text("import sys\nprint('hello from', sys.platform)\nx = 6 * 7\nprint(x)\n")
    proc = subprocess.run(
        [sys.executable, "-m", "jupyter", "run", "--kernel", KERNELVISOR, str(script)],
        capture_output=True,
        text=True,
        timeout=STARTUP_TIMEOUT + TIMEOUT,
        check=False,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"hello from {sys.platform}\n42\n" in proc.stdout, (proc.stdout, proc.stderr)


def test_debug_cell_as_vscode_sends_it(kernel: Kernel) -> None:
    """VS Code's "Debug Cell": it checks that ipykernel >= 6 can be imported (hidden code), then
    initialize, attach, debugInfo, dumpCell for every cell, setBreakpoints; on
    configurationDone it runs `debugpy.debug_this_thread()` as hidden code, then runs the
    cell."""
    kc = kernel.kc
    check = "import builtins\nimport ipykernel\nbuiltins.print(ipykernel.__version__)"
    _, iopub = execute(kc, check, silent=True)
    assert int(stream_text(iopub).strip().split(".")[0]) >= 6, stream_text(iopub)

    cells = ["x = 1\n", "def f(a):\n    b = a + 1\n    return b\n\nprint(f(x))\n", "y = 2\n"]
    dap = Dap(kc)
    dap.ok(
        "initialize",
        {
            "clientID": "vscode",
            "clientName": "Visual Studio Code",
            "adapterID": "Python Kernel Debug Adapter",
            "pathFormat": "path",
            "linesStartAt1": True,
            "columnsStartAt1": True,
            "supportsVariableType": True,
            "supportsVariablePaging": True,
            "supportsRunInTerminalRequest": True,
            "locale": "en",
        },
    )
    dap.ok("attach", {"justMyCode": True, "__mode": 1, "__cellIndex": 1})
    assert dap.ok("debugInfo")["stoppedThreads"] == []
    execute(kc, cells[0])
    paths = [dap.ok("dumpCell", {"code": c})["sourcePath"] for c in cells]
    assert len(set(paths)) == 3 and all(Path(p).is_file() for p in paths)
    dap.ok("setBreakpoints", {"source": {"path": paths[1]}, "breakpoints": [{"line": 3}]})
    _, iopub = execute(kc, "import debugpy\ndebugpy.debug_this_thread()", silent=True)
    assert not of_type(iopub, "error"), iopub
    for code in cells:
        dap.ok("dumpCell", {"code": code})
    dap.ok("configurationDone")

    msg_id = kc.execute(cells[1])
    thread, frames = dap.stop_at()
    assert (frames[0]["name"], frames[0]["line"]) == ("f", 3)
    assert frames[0]["source"]["path"] == paths[1]
    assert dap.locals_of(frames[0]["id"]) == {"a": "1", "b": "2"}
    dap.ok("continue", {"threadId": thread})
    assert get_reply(kc, msg_id)["content"]["status"] == "ok"
    assert stream_text(dap.cell_iopub(msg_id)) == "2\n"
    # VS Code ends the session when the cell is done.
    dap.ok("disconnect", {"restart": False})
    reply, iopub = execute(kc, cells[1])
    assert reply["content"]["status"] == "ok" and stream_text(iopub) == "2\n"


def test_pydevd_ipython_compatible_debugging_env() -> None:
    """VS Code sets PYDEVD_IPYTHON_COMPATIBLE_DEBUGGING=1 for Python kernels it launches: a
    session still stops at a breakpoint with it set."""
    env = {**os.environ, "PYDEVD_IPYTHON_COMPATIBLE_DEBUGGING": "1"}
    with running_kernel(KERNELVISOR, env=env) as k:
        dap = Dap(k.kc)
        dap.start()
        code = "total = 0\nfor i in range(3):\n    total += i\n"
        path = dap.ok("dumpCell", {"code": code})["sourcePath"]
        dap.ok("setBreakpoints", {"source": {"path": path}, "breakpoints": [{"line": 3}]})
        dap.ok("configurationDone")
        msg_id = k.kc.execute(code)
        thread, frames = dap.stop_at()
        assert frames[0]["line"] == 3
        dap.ok("setBreakpoints", {"source": {"path": path}, "breakpoints": []})
        dap.ok("continue", {"threadId": thread})
        assert get_reply(k.kc, msg_id)["content"]["status"] == "ok"
        assert result_text(execute(k.kc, "total")[1]) == "3"


def test_run_by_line_as_vscode_sends_it(kernel: Kernel) -> None:
    """VS Code's "Run by Line": a breakpoint on the cell's first line, then stepIn per click;
    stepping past the last line ends the cell."""
    kc = kernel.kc
    dap = Dap(kc)
    dap.start()
    code = "a = 1\n\nb = a + 1\nc = b * 3\n"
    path = dap.ok("dumpCell", {"code": code})["sourcePath"]
    dap.ok("setBreakpoints", {"source": {"path": path}, "breakpoints": [{"line": 1}]})
    dap.ok("configurationDone")
    msg_id = kc.execute(code)
    lines = []
    for _ in range(3):
        thread, frames = dap.stop_at()
        assert frames[0]["source"]["path"] == path
        lines.append(frames[0]["line"])
        dap.ok("stepIn", {"threadId": thread})
    assert lines == [1, 3, 4]
    reply = get_reply(kc, msg_id)
    assert reply["content"]["status"] == "ok", reply["content"]
    dap.ok("disconnect", {"restart": False})
    assert result_text(execute(kc, "c")[1]) == "6"
