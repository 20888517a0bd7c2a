"""Nothing a dying worker printed is lost (IPC.md, "Dying"): every byte it wrote reaches
the supervisor as ``stream`` messages of the cell, before ``main`` closes, and the
process still dies the way it was killed."""

from __future__ import annotations

import os
import signal
import time

import pytest
from ipc_client import Message, WorkerProcess

SEGFAULT = "import ctypes\nctypes.string_at(0)\n"


def _run_until_death(worker: WorkerProcess, code: str) -> tuple[list[Message], int]:
    """Run a cell that ends the worker: the messages up to the close, the exit status."""
    req = worker.send_request("execute_request", {"code": code})
    messages = worker.recv_until_closed()
    assert not [m for m in messages if m.op in ("reply", "done") and m.control["id"] == req]
    return messages, worker.proc.wait(10)


def _cell_streams(messages: list[Message], name: str = "stdout") -> str:
    """The text of the cell's streams, checking every message belongs to the cell."""
    streams = [m for m in messages if m.msg_type == "stream"]
    for msg in streams:
        assert msg.via == "main"
        assert msg.parent == streams[0].parent  # the one cell's
        assert msg.parent["msg_type"] == "execute_request"
    return "".join(m.content["text"] for m in streams if m.content["name"] == name)


def _assert_fault_dump(worker: WorkerProcess, name: str) -> None:
    stderr = worker.stderr()
    assert f"Fatal Python error: {name}" in stderr, stderr
    assert '  File "' in stderr, stderr


def test_segfault(fresh_worker: WorkerProcess) -> None:
    messages, status = _run_until_death(fresh_worker, "print('before')\n" + SEGFAULT)
    assert _cell_streams(messages) == "before\n"
    assert status == -signal.SIGSEGV
    _assert_fault_dump(fresh_worker, "Segmentation fault")


def test_abort(fresh_worker: WorkerProcess) -> None:
    messages, status = _run_until_death(fresh_worker, "import os\nprint('before')\nos.abort()")
    assert _cell_streams(messages) == "before\n"
    assert status == -signal.SIGABRT
    _assert_fault_dump(fresh_worker, "Aborted")


def test_os_exit(fresh_worker: WorkerProcess) -> None:
    code = "import os, sys\nprint('before')\nprint('err', file=sys.stderr)\nos._exit(3)"
    messages, status = _run_until_death(fresh_worker, code)
    assert _cell_streams(messages) == "before\n"
    assert _cell_streams(messages, "stderr") == "err\n"
    assert status == 3
    assert "Fatal Python error" not in fresh_worker.stderr()


def test_print_loop_then_segfault(fresh_worker: WorkerProcess) -> None:
    code = "for i in range(10):\n    print('line', i)\n" + SEGFAULT
    messages, status = _run_until_death(fresh_worker, code)
    assert _cell_streams(messages) == "".join(f"line {i}\n" for i in range(10))
    assert status == -signal.SIGSEGV


def test_fd_output_then_segfault(fresh_worker: WorkerProcess) -> None:
    code = "import os\nprint('py')\nos.write(1, b'fd out\\n')\nos.write(2, b'fd err\\n')\n"
    messages, status = _run_until_death(fresh_worker, code + SEGFAULT)
    assert _cell_streams(messages) == "py\nfd out\n"
    assert _cell_streams(messages, "stderr") == "fd err\n"
    assert status == -signal.SIGSEGV


def test_os_exit_drains_fd_and_c_stdio(fresh_worker: WorkerProcess) -> None:
    code = (
        "import ctypes, os\n"
        "os.write(1, b'fd\\n')\n"
        "ctypes.CDLL(None).printf(b'from C')\n"  # no newline: still in libc's buffer
        "os._exit(0)"
    )
    messages, status = _run_until_death(fresh_worker, code)
    assert _cell_streams(messages) == "fd\nfrom C"
    assert status == 0


def test_segfault_in_c_code_without_the_gil(fresh_worker: WorkerProcess) -> None:
    # A CDLL call releases the GIL: the handler must take it back before flushing.
    code = "import ctypes\nprint('before')\nctypes.CDLL(None).strlen(ctypes.c_void_p(0))"
    messages, status = _run_until_death(fresh_worker, code)
    assert _cell_streams(messages) == "before\n"
    assert status == -signal.SIGSEGV
    _assert_fault_dump(fresh_worker, "Segmentation fault")


def test_segfault_in_a_thread(fresh_worker: WorkerProcess) -> None:
    code = (
        "import ctypes, threading, time\n"
        "print('before')\n"
        "threading.Thread(target=ctypes.string_at, args=(0,)).start()\n"
        "time.sleep(10)"
    )
    messages, status = _run_until_death(fresh_worker, code)
    assert _cell_streams(messages) == "before\n"
    assert status == -signal.SIGSEGV


# The worker's FatalSignalFlush, from a cell.
_HANDLER = (
    "import gc\n"
    "(W,) = [o for o in gc.get_objects() if type(o).__name__ == 'Worker']\n"
    "handler = W.fatal_signals\n"
)


def test_a_hung_flush_still_dies_of_the_signal(fresh_worker: WorkerProcess) -> None:
    # A flush that never returns (e.g. malloc deadlocked after heap corruption): the
    # watchdog timer delivers the signal again, with its default action.
    code = _HANDLER + (
        "import threading\n"
        "handler._last_words = lambda deadline: threading.Event().wait()\n"
        "print('before')\n"
    )
    start = time.monotonic()
    _messages, status = _run_until_death(fresh_worker, code + SEGFAULT)
    assert status == -signal.SIGSEGV
    assert 1 < time.monotonic() - start < 8  # WATCHDOG_SECONDS (2) after the fault
    _assert_fault_dump(fresh_worker, "Segmentation fault")


def test_a_fault_inside_the_flush_dies_of_the_first_signal(fresh_worker: WorkerProcess) -> None:
    code = _HANDLER + "import ctypes, os\n"
    code += "handler._last_words = lambda deadline: ctypes.string_at(0)\n"
    code += "os.abort()"
    _messages, status = _run_until_death(fresh_worker, code)
    assert status == -signal.SIGABRT


def test_sigkill_loses_at_most_the_coalescing_window(fresh_worker: WorkerProcess) -> None:
    """SIGKILL cannot be caught: output is sent within ~50 ms of being printed."""
    marker = os.path.join(fresh_worker.dir, "printed")
    code = (
        "import pathlib, time\n"
        "for i in range(10000):\n"
        "    print(i)\n"
        f"pathlib.Path({marker!r}).touch()\n"
        "time.sleep(30)"
    )
    fresh_worker.send_request("execute_request", {"code": code})
    deadline = time.monotonic() + 10
    while not os.path.exists(marker):
        assert time.monotonic() < deadline, "the cell did not print"
        time.sleep(0.01)
    time.sleep(0.3)  # a few coalescing windows, and slack for a slow machine
    fresh_worker.proc.send_signal(signal.SIGKILL)
    messages = fresh_worker.recv_until_closed()
    assert _cell_streams(messages) == "".join(f"{i}\n" for i in range(10000))
    assert fresh_worker.proc.wait(10) == -signal.SIGKILL


def test_forked_child_os_exit_leaves_the_connection_alone(worker: WorkerProcess) -> None:
    code = (
        "import os\n"
        "print('a')\n"
        "pid = os.fork()\n"
        "if pid == 0:\n"
        "    print('child')\n"
        "    os._exit(0)\n"
        "os.waitpid(pid, 0)\n"
        "print('b')"
    )
    ex = worker.execute(code)
    assert ex.reply.content["status"] == "ok", ex.reply.content
    assert ex.stream_text("stdout") == "a\nb\n"
    assert worker.execute("print('next')").stream_text() == "next\n"


@pytest.mark.parametrize("code", ["exit()", "quit()", "exit"])
def test_exit_and_quit_ask_the_frontend(worker: WorkerProcess, code: str) -> None:
    ex = worker.execute(code)
    assert ex.reply.content["status"] == "ok", ex.reply.content
    assert {"source": "ask_exit", "keepkernel": False} in ex.reply.content["payload"]
    assert worker.proc.poll() is None


def test_raise_system_exit_does_not_end_worker(worker: WorkerProcess) -> None:
    ex = worker.execute("raise SystemExit(4)")
    assert ex.reply.content["ename"] == "SystemExit"
    assert worker.execute("print('alive')").stream_text() == "alive\n"
    assert worker.proc.poll() is None
