"""The debugger through jupyter_client, as JupyterLab drives it: DAP in ``debug_request`` on
control, ``debug_event`` on IOPub, debugpy in the main worker. Also Jupyter's additions
answered without debugpy, an interrupt while stopped at a breakpoint, a worker crash during a
session (the session goes on in the new worker), and debugpy's adapter process not outliving
the kernel."""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from dap_client import Dap
from isolation_support import main_worker
from jupyter_client.kernelspec import KernelSpecManager
from kvharness import (
    KERNELVISOR,
    TIMEOUT,
    Kernel,
    execute,
    get_reply,
    kernel_process,
    result_text,
    running_kernel,
    stream_text,
)

# A cell with a function whose local is seen at a breakpoint (line 3), and output after it.
CELL = "def double(x):\n    y = x * 2\n    return y\n\nz = double(21)\nprint('z is', z)\n"
BREAK_IN_DOUBLE = 3
# A loop that runs for a second when not stopped: stopped at line 4, interrupted there.
LOOP = "import time\nfor i in range(100):\n    time.sleep(0.01)\n    last = i\nprint('done')\n"
BREAK_IN_LOOP = 4


@pytest.fixture
def session(kernel: Kernel) -> Iterator[tuple[Kernel, Dap]]:
    """A kernel whose debugger is on (initialize, attach), as JupyterLab turns it on."""
    dap = Dap(kernel.kc)
    dap.start()
    yield kernel, dap


def set_breakpoint(dap: Dap, code: str, line: int) -> str:
    """dumpCell, setBreakpoints, configurationDone; returns the cell's file."""
    path = str(dap.ok("dumpCell", {"code": code})["sourcePath"])
    placed = dap.ok("setBreakpoints", {"source": {"path": path}, "breakpoints": [{"line": line}]})
    assert [b["line"] for b in placed["breakpoints"]] == [line], placed
    assert placed["breakpoints"][0]["verified"] is True, placed
    dap.ok("configurationDone")
    return path


def adapters(tag: str) -> list[psutil.Process]:
    """debugpy adapter processes started by a kernel whose environment has ``tag``."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(proc.info["cmdline"] or [])
            if (
                "debugpy" in cmdline
                and "adapter" in cmdline
                and proc.environ().get("KV_DEBUG_TEST_TAG") == tag
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def test_kernelspec_and_kernel_info_advertise_the_debugger(kernel: Kernel) -> None:
    spec = KernelSpecManager().get_kernel_spec(KERNELVISOR)
    # JupyterLab shows its debugger for a kernel whose spec says so (debugpy is installed).
    assert spec.metadata["debugger"] is True, spec.metadata
    assert "--debugger" in spec.argv
    reply = get_reply(kernel.kc, kernel.kc.kernel_info())
    assert reply["content"]["debugger"] is True
    assert "debugger" in reply["content"]["supported_features"]
    assert "kernel subshells" in reply["content"]["supported_features"]


def test_a_dap_session_stops_at_a_breakpoint_and_steps(session: tuple[Kernel, Dap]) -> None:
    kernel, dap = session
    kc = kernel.kc
    info = dap.ok("debugInfo")
    assert info["isStarted"] is True
    assert info["hashMethod"] == "Murmur2" and info["hashSeed"] == 0xC70F6907
    assert info["tmpFileSuffix"] == ".py"
    assert info["richRendering"] is True and info["exceptionPaths"] == ["Python Exceptions"]
    # One directory per kernel (the supervisor's pid), whichever worker writes it.
    supervisor = kernel_process(kernel.km)
    assert supervisor is not None
    prefix = os.path.join(tempfile.gettempdir(), f"kernelvisor_{supervisor.pid}") + os.sep
    assert info["tmpFilePrefix"] == prefix

    path = set_breakpoint(dap, CELL, BREAK_IN_DOUBLE)
    assert path.startswith(prefix) and Path(path).read_text(encoding="utf-8") == CELL
    assert dap.ok("debugInfo")["breakpoints"] == [
        {"source": path, "breakpoints": [{"line": BREAK_IN_DOUBLE}]}
    ]

    msg_id = kc.execute(CELL)
    thread, frames = dap.stop_at()
    assert [(f["name"], f["line"]) for f in frames[:2]] == [
        ("double", BREAK_IN_DOUBLE),
        ("<module>", 5),
    ]
    assert frames[0]["source"]["path"] == path
    assert dap.locals_of(frames[0]["id"]) == {"x": "21", "y": "42"}
    # Only the cell's thread: the worker's own threads are invisible to the debugger.
    threads = dap.ok("threads")["threads"]
    assert [t["name"] for t in threads] == ["MainThread"], threads
    assert dap.ok("debugInfo")["stoppedThreads"] == [thread]
    # Stopped, and the kernel still answers on control and shell.
    for channel in ("control", "shell"):
        msg = kc.session.msg("kernel_info_request", {})
        getattr(kc, f"{channel}_channel").send(msg)
        reply = get_reply(kc, msg["header"]["msg_id"], channel=channel)
        assert reply["content"]["status"] == "ok"
    # Rich view of a local in the stopped frame (JupyterLab's variable renderer).
    rich = dap.ok("richInspectVariables", {"variableName": "y", "frameId": frames[0]["id"]})
    assert rich["data"] == {"text/plain": "42"}, rich

    dap.ok("next", {"threadId": thread})
    thread, frames = dap.stop_at()
    assert frames[0]["name"] == "<module>" and frames[0]["line"] == 6
    assert dap.locals_of(frames[0]["id"])["z"] == "42"
    dap.ok("continue", {"threadId": thread})
    dap.event("continued")

    reply = get_reply(kc, msg_id)
    assert reply["content"]["status"] == "ok", reply["content"]
    assert stream_text(dap.cell_iopub(msg_id)) == "z is 42\n"
    assert dap.ok("debugInfo")["stoppedThreads"] == []
    # Without breakpoints, cells run through.
    dap.ok("setBreakpoints", {"source": {"path": path}, "breakpoints": []})
    reply, iopub = execute(kc, CELL)
    assert reply["content"]["status"] == "ok" and stream_text(iopub) == "z is 42\n"
    assert dap.ok("debugInfo")["breakpoints"] == []


def test_copy_to_globals_and_source_while_stopped(session: tuple[Kernel, Dap]) -> None:
    kernel, dap = session
    path = set_breakpoint(dap, CELL, BREAK_IN_DOUBLE)
    msg_id = kernel.kc.execute(CELL)
    thread, frames = dap.stop_at()
    source = dap.ok("source", {"source": {"path": path}})
    assert source["content"] == CELL
    dap.ok(
        "copyToGlobals",
        {"srcVariableName": "y", "dstVariableName": "copied", "srcFrameId": frames[0]["id"]},
    )
    dap.ok("continue", {"threadId": thread})
    assert get_reply(kernel.kc, msg_id)["content"]["status"] == "ok"
    assert result_text(execute(kernel.kc, "copied")[1]) == "42"


def test_jupyter_requests_work_without_the_debugger(kernel: Kernel) -> None:
    kc = kernel.kc
    code = (
        "numbers = [1, 2, 3]\n"
        "table = {'a': 1}\n"
        "class Html:\n"
        "    def _repr_html_(self):\n"
        "        return '<b>bold</b>'\n"
        "page = Html()\n"
    )
    assert execute(kc, code)[0]["content"]["status"] == "ok"
    dap = Dap(kc)
    variables = {v["name"]: v for v in dap.ok("inspectVariables")["variables"]}
    # The user's names only: not IPython's history (In, Out, _i1...) or its helpers.
    assert set(variables) == {"numbers", "table", "Html", "page"}, sorted(variables)
    assert variables["numbers"]["value"] == "[1, 2, 3]"
    assert variables["numbers"]["type"] == "list"
    children = dap.ok(
        "variables", {"variablesReference": variables["numbers"]["variablesReference"]}
    )["variables"]
    assert [(c["name"], c["value"], c["evaluateName"]) for c in children] == [
        ("0", "1", "numbers[0]"),
        ("1", "2", "numbers[1]"),
        ("2", "3", "numbers[2]"),
    ]
    rich = dap.ok("richInspectVariables", {"variableName": "page"})
    assert rich["data"]["text/html"] == "<b>bold</b>", rich
    assert "text/plain" in rich["data"]
    assert dap.ok("richInspectVariables", {"variableName": "special variables"})["data"] == {}
    modules = dap.ok("modules", {"startModule": 0, "moduleCount": 0})
    assert modules["totalModules"] > 10
    assert any(m["name"] == "json" for m in modules["modules"])
    info = dap.ok("debugInfo")
    assert info["isStarted"] is False and info["breakpoints"] == []
    # A request that needs debugpy gets a failed response, not silence.
    refused = dap.request("stackTrace", {"threadId": 1})
    assert refused["success"] is False and "not started" in refused["message"], refused
    # No debugpy was started for any of it: no adapter process.
    assert not [
        p
        for p in psutil.Process(main_worker(kc)[1]).children(recursive=True)
        if "debugpy" in " ".join(p.cmdline())
    ]


def test_variables_panel_while_nothing_is_stopped(session: tuple[Kernel, Dap]) -> None:
    kernel, dap = session
    assert execute(kernel.kc, "nested = {'k': [10, 20]}")[0]["content"]["status"] == "ok"
    variables = {v["name"]: v for v in dap.ok("inspectVariables")["variables"]}
    ref = variables["nested"]["variablesReference"]
    assert ref > 0
    (child,) = dap.ok("variables", {"variablesReference": ref})["variables"]
    assert (child["name"], child["value"]) == ("'k'", "[10, 20]")
    grandchildren = dap.ok("variables", {"variablesReference": child["variablesReference"]})
    assert [v["value"] for v in grandchildren["variables"]] == ["10", "20"]


def test_interrupt_while_stopped_ends_the_cell_and_debugging_goes_on(
    session: tuple[Kernel, Dap],
) -> None:
    kernel, dap = session
    kc = kernel.kc
    set_breakpoint(dap, LOOP, BREAK_IN_LOOP)
    before = main_worker(kc)
    for _ in range(2):  # and again: the thread is still traced after the interrupt
        msg_id = kc.execute(LOOP)
        _, frames = dap.stop_at()
        assert frames[0]["line"] == BREAK_IN_LOOP
        kernel.km.interrupt_kernel()
        reply = get_reply(kc, msg_id)
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
        # The frontends are told the thread runs again; nothing is left stopped.
        dap.event("continued")
        assert dap.ok("debugInfo")["stoppedThreads"] == []
    # The same worker: the namespace survived.
    assert main_worker(kc) == before
    assert result_text(execute(kc, "i")[1]) == "0"


def test_a_crash_while_debugging_keeps_the_session(session: tuple[Kernel, Dap]) -> None:
    kernel, dap = session
    kc = kernel.kc
    info = dap.ok("debugInfo")
    path = set_breakpoint(dap, LOOP, BREAK_IN_LOOP)
    _, pid = main_worker(kc)

    # Stopped at the breakpoint, evaluating something slow there, when the worker dies: the
    # cell's crash is reported like any crash, the request gets a failed response.
    msg_id = kc.execute(LOOP)
    _, frames = dap.stop_at()
    slow = dap.send(
        "evaluate",
        {"expression": "__import__('time').sleep(60)", "frameId": frames[0]["id"]},
    )
    time.sleep(0.5)  # let the evaluation start (not required: the reply is owed either way)
    psutil.Process(pid).kill()
    reply = get_reply(kc, msg_id)
    assert reply["content"]["ename"] == "WorkerCrashed", reply["content"]
    failed = dap.reply(slow)
    assert failed["success"] is False and failed["command"] == "evaluate", failed
    assert "worker process died" in failed["message"], failed
    # The stopped thread died with it: the frontends are told.
    dap.event("continued")

    # The session goes on in the new worker: same cell files, breakpoints set again.
    assert main_worker(kc)[1] != pid
    again = dap.ok("debugInfo")
    assert again["isStarted"] is True
    assert again["tmpFilePrefix"] == info["tmpFilePrefix"]
    assert again["breakpoints"] == [{"source": path, "breakpoints": [{"line": BREAK_IN_LOOP}]}]
    msg_id = kc.execute(LOOP)
    thread, frames = dap.stop_at()
    assert frames[0]["line"] == BREAK_IN_LOOP and frames[0]["source"]["path"] == path
    dap.ok("setBreakpoints", {"source": {"path": path}, "breakpoints": []})
    dap.ok("continue", {"threadId": thread})
    assert get_reply(kc, msg_id)["content"]["status"] == "ok"


def test_disconnect_ends_the_session(session: tuple[Kernel, Dap]) -> None:
    kernel, dap = session
    path = set_breakpoint(dap, CELL, BREAK_IN_DOUBLE)
    dap.ok("disconnect", {"restart": False, "terminateDebuggee": False})
    info = dap.ok("debugInfo")
    assert info["isStarted"] is False and info["breakpoints"] == []
    reply, iopub = execute(kernel.kc, CELL)
    assert reply["content"]["status"] == "ok" and stream_text(iopub) == "z is 42\n"
    # On again (JupyterLab's toggle): a new session with the same adapter.
    dap.start()
    set_breakpoint(dap, CELL, BREAK_IN_DOUBLE)
    msg_id = kernel.kc.execute(CELL)
    thread, frames = dap.stop_at()
    assert frames[0]["source"]["path"] == path
    dap.ok("continue", {"threadId": thread})
    assert get_reply(kernel.kc, msg_id)["content"]["status"] == "ok"


@pytest.mark.parametrize("how", ["shutdown_request", "SIGKILL to the kernel"])
def test_the_adapter_does_not_outlive_the_kernel(how: str) -> None:
    tag = uuid.uuid4().hex
    with running_kernel(KERNELVISOR, env={**os.environ, "KV_DEBUG_TEST_TAG": tag}) as k:
        dap = Dap(k.kc)
        dap.start()
        assert len(adapters(tag)) == 1
        cell_dir = Path(dap.ok("dumpCell", {"code": "1"})["sourcePath"]).parent
        if how != "shutdown_request":
            proc = kernel_process(k.km)
            assert proc is not None
            proc.kill()
            proc.wait(TIMEOUT)
    deadline = time.monotonic() + TIMEOUT
    while adapters(tag):
        assert time.monotonic() < deadline, f"adapter left running after {how}"
        time.sleep(0.1)
    if how == "shutdown_request":
        # The kernel's cell files go with it (a killed kernel cannot clean up).
        assert not cell_dir.exists()


def test_debug_requests_wait_for_a_worker() -> None:
    """A debugger turned on before the first worker is up (JupyterLab reopening a notebook)."""
    with running_kernel(KERNELVISOR) as k:
        dap = Dap(k.kc)
        msg_ids = [dap.send("debugInfo"), dap.send("inspectVariables")]
        replies = [dap.reply(m) for m in msg_ids]
        assert [r["command"] for r in replies] == ["debugInfo", "inspectVariables"]
        assert all(r["success"] for r in replies), json.dumps(replies)


def test_a_thread_cell_stops_at_its_breakpoint(session: tuple[Kernel, Dap]) -> None:
    """`# thread` cells (and subshells) run in threads of the worker; those are debugged too,
    and interrupted there like the main thread."""
    kernel, dap = session
    kc = kernel.kc
    code = (
        "# thread\nimport threading, time\nname = threading.current_thread().name\n"
        "for n in range(100):\n    time.sleep(0.01)\n"
    )
    path = set_breakpoint(dap, code, 5)
    for _ in range(2):  # and again: that thread is still traced after the interrupt
        msg_id = kc.execute(code)
        _, frames = dap.stop_at()
        assert frames[0]["line"] == 5 and frames[0]["source"]["path"] == path
        assert dap.locals_of(frames[0]["id"])["name"] != "'MainThread'"
        names = [t["name"] for t in dap.ok("threads")["threads"]]
        assert "MainThread" in names and len(names) == 2, names
        kernel.km.interrupt_kernel()
        reply = get_reply(kc, msg_id)
        assert reply["content"]["ename"] == "KeyboardInterrupt", reply["content"]
        dap.event("continued")
    dap.ok("setBreakpoints", {"source": {"path": path}, "breakpoints": []})
    reply, _ = execute(kc, code)
    assert reply["content"]["status"] == "ok", reply["content"]
    assert result_text(execute(kc, "n")[1]) == "99"


@pytest.mark.parametrize("just_my_code", [True, False])
def test_the_worker_serves_while_a_cell_is_stopped(kernel: Kernel, just_my_code: bool) -> None:
    """Stopped at a breakpoint, the worker's own threads go on: output printed before the
    breakpoint is delivered (the flusher), completion is answered (the aux thread). Also when
    the standard library is debugged too (justMyCode false), where those threads run."""
    kc = kernel.kc
    dap = Dap(kc)
    dap.start(just_my_code=just_my_code)
    code = "print('before the breakpoint')\nimportant_value = 1\nimportant_value += 1\n"
    set_breakpoint(dap, code, 3)
    msg_id = kc.execute(code)
    thread, _ = dap.stop_at()
    deadline = time.monotonic() + TIMEOUT
    while "before the breakpoint\n" not in stream_text(
        [m for m in dap.iopub if m["parent_header"].get("msg_id") == msg_id]
    ):
        assert time.monotonic() < deadline, "output printed before the breakpoint never came"
        dap.drain(0.1)
    complete = kc.complete("important_v")
    reply = get_reply(kc, complete)
    assert reply["content"]["matches"] == ["important_value"], reply["content"]
    dap.ok("continue", {"threadId": thread})
    assert get_reply(kc, msg_id)["content"]["status"] == "ok"
