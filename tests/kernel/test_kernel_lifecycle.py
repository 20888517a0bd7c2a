"""Startup, shutdown and transports of the real kernel process."""

from __future__ import annotations

import errno
import json
import os
import queue
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from kvharness import (
    BOTH_KERNELS,
    KERNELVISOR,
    STARTUP_TIMEOUT,
    Kernel,
    execute,
    get_replies,
    get_reply,
    iopub_until,
    is_idle,
    process_tree,
    result_text,
    running_kernel,
    stream_text,
)


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


def shuts_down_promptly(
    kc: BlockingKernelClient,
    proc: subprocess.Popen[bytes],
    procs: list[psutil.Process],
    what: str = "processes left behind",
) -> None:
    """A shutdown_request with cells still running: the reply is ok, the kernel exits with 0
    within 5 s, and every process of ``procs`` is gone soon after. The bound leaves room for
    a loaded machine and for IOPub's flush of printed output (at most 2 s): it is what
    jupyter_client waits in all (shutdown_wait_time) before it kills the kernel. A busy
    worker is killed, not waited for (tens of ms)."""
    started = time.monotonic()
    msg_id = kc.shutdown()
    assert get_reply(kc, msg_id, channel="control")["content"]["status"] == "ok"
    assert proc.wait(timeout=30) == 0
    assert time.monotonic() - started < 5
    assert not wait_gone(procs, timeout=10), what


@BOTH_KERNELS
def test_shutdown_request_exits_by_itself(kernel: Kernel) -> None:
    km, kc = kernel.km, kernel.kc
    assert km.provisioner is not None and km.provisioner.process is not None
    proc = km.provisioner.process
    execute(kc, "1+1")  # workers up
    tree = process_tree(proc.pid)
    msg_id = kc.shutdown()
    reply = get_reply(kc, msg_id, channel="control")
    assert reply["msg_type"] == "shutdown_reply"
    assert reply["content"]["status"] == "ok"
    assert reply["content"]["restart"] is False
    # No signal from us: the kernel must exit on its own, cleanly.
    assert proc.wait(timeout=30) == 0
    assert not km.is_alive()
    # Supervisor and workers alike.
    assert not wait_gone(tree, timeout=15)


@BOTH_KERNELS
def test_manager_shutdown_needs_no_signal(kernel: Kernel) -> None:
    """What Jupyter servers do: shutdown_kernel(now=False) escalates to SIGTERM, then SIGKILL,
    only if the kernel has not exited by itself in time."""
    km = kernel.km
    assert km.provisioner is not None and km.provisioner.process is not None
    proc = km.provisioner.process
    execute(kernel.kc, "1+1")
    km.shutdown_kernel(now=False)
    assert proc.poll() == 0
    # jupyter_client records how far it had to escalate (private, but the only record).
    status = getattr(km, "_shutdown_status", None)
    assert status is None or status.name == "ShutdownRequest", status


# Cells that are running when the shutdown request comes: one keeps the main worker busy
# printing, one sleeps in a borrowed worker while the main worker is idle.
BUSY_CELLS = {
    "printing": "import itertools\nfor i in itertools.count():\n    print(i)",
    "process": "# process\nimport time\nprint('started', flush=True)\ntime.sleep(600)",
}


def worker_socket_dir(supervisor_pid: int) -> Path:
    """The supervisor's private worker-socket directory, from a worker's command line."""
    for child in psutil.Process(supervisor_pid).children():
        cmd = child.cmdline()
        if "--connect" in cmd:
            return Path(cmd[cmd.index("--connect") + 1]).parent
    raise AssertionError("no worker found")


@pytest.mark.parametrize("busy", sorted(BUSY_CELLS))
def test_shutdown_while_a_cell_runs(kernel: Kernel, busy: str) -> None:
    """A cell that would never end does not hold up the exit: every request gets its reply,
    and the supervisor, its workers and their snapshots are gone, with the worker socket's
    directory, in bounded time."""
    km, kc = kernel.km, kernel.kc
    assert km.provisioner is not None and km.provisioner.process is not None
    proc = km.provisioner.process
    execute(kc, "1+1")  # a snapshot is forked before the next cell
    ipc_dir = worker_socket_dir(proc.pid)
    assert ipc_dir.is_dir()
    running = kc.execute(BUSY_CELLS[busy])
    # Behind the printing cell in the main lane; beside the `# process` cell.
    after = kc.execute("after = 1")
    iopub_until(kc, running, lambda m: m["msg_type"] == "stream", [])
    tree = process_tree(proc.pid)
    assert len(tree) >= 3, "supervisor and workers"
    shuts_down_promptly(kc, proc, tree)
    assert not ipc_dir.exists(), "the worker socket's directory is left"
    replies = get_replies(kc, [running, after])
    # The running cell will never finish: it is answered `aborted`, as a cell that will not run.
    assert replies[running]["content"]["status"] == "aborted"
    assert replies[after]["content"]["status"] in ("ok", "aborted")
    # IOPub was flushed before the exit: the cell's end (its idle status) came through.
    iopub_until(kc, running, is_idle, [])


def test_shutdown_beside_a_background_cell_runs_exit_hooks(kernel: Kernel, tmp_path: Path) -> None:
    """A `# thread` cell leaves the main thread free: the worker exits as an idle one does, so
    the user's `atexit` hooks run (what libraries that flush at exit rely on), and the cell,
    which will never finish, is answered `aborted`."""
    km, kc = kernel.km, kernel.kc
    assert km.provisioner is not None and km.provisioner.process is not None
    proc = km.provisioner.process
    marker = tmp_path / "atexit.txt"
    hook = (
        "import atexit\n"
        "@atexit.register\n"
        "def bye():\n"
        f"    with open({str(marker)!r}, 'w') as f:\n"
        "        f.write('bye')"
    )
    reply, _ = execute(kc, hook)
    assert reply["content"]["status"] == "ok", reply["content"]
    running = kc.execute("# thread\nimport time\nprint('started', flush=True)\ntime.sleep(600)")
    iopub_until(kc, running, lambda m: m["msg_type"] == "stream", [])
    shuts_down_promptly(kc, proc, process_tree(proc.pid))
    assert marker.exists() and marker.read_text() == "bye", "the worker's exit hooks did not run"
    assert get_reply(kc, running)["content"]["status"] == "aborted"


def test_shutdown_ends_what_cells_left_running(kernel: Kernel) -> None:
    """Processes a cell started and left running end with the kernel, as ipykernel ends its
    process group's: a child of the worker, and an orphan (a shell's background job)."""
    km, kc = kernel.km, kernel.kc
    assert km.provisioner is not None and km.provisioner.process is not None
    proc = km.provisioner.process
    code = (
        "import subprocess\n"
        "child = subprocess.Popen(['sleep', '600'])\n"
        "job = subprocess.run('sleep 600 >/dev/null 2>&1 & echo $!', shell=True, capture_output=True)\n"
        "print(child.pid, job.stdout.decode().strip())"
    )
    reply, iopub = execute(kc, code)
    assert reply["content"]["status"] == "ok", reply["content"]
    pids = [psutil.Process(int(p)) for p in stream_text(iopub).split()]
    assert len(pids) == 2 and all(p.is_running() for p in pids)
    shuts_down_promptly(kc, proc, pids, "processes started by a cell outlived the kernel")


def test_sigint_while_starting_does_not_kill(kv_bin: Path, tmp_path: Path) -> None:
    """VS Code interrupts a kernel by signalling its whole process group, also while the kernel
    starts. A SIGINT that reaches the supervisor before it has a handler must not kill it: here
    it comes while the supervisor reads its connection file (a FIFO holds it there), then more
    until the kernel answers."""
    conn_file, _ = write_connection_file(
        str(tmp_path / "conn.json"), ip="127.0.0.1", key=os.urandom(16).hex().encode()
    )
    fifo = tmp_path / "fifo.json"
    os.mkfifo(fifo)
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [str(kv_bin), "-f", str(fifo), "--python", sys.executable],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    kc = BlockingKernelClient(connection_file=conn_file)
    kc.load_connection_file()
    try:
        # A non-blocking open for writing succeeds once a reader has the FIFO open: the
        # supervisor's `main` is running, and waits for the file's contents.
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                fd = os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
                break
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
            assert proc.poll() is None, (
                f"exited before reading its connection file: {stderr_path.read_text(errors='replace')}"
            )
            assert time.monotonic() < deadline, "the kernel never opened its connection file"
            time.sleep(0.001)
        os.kill(proc.pid, signal.SIGINT)
        os.write(fd, Path(conn_file).read_bytes())
        os.close(fd)
        kc.start_channels()
        msg_id = kc.kernel_info()
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert proc.poll() is None, (
                f"the kernel died: exit {proc.returncode}; {stderr_path.read_text(errors='replace')}"
            )
            assert time.monotonic() < deadline, "no kernel_info_reply"
            os.kill(proc.pid, signal.SIGINT)
            try:
                reply = kc.get_shell_msg(timeout=0.005)
            except queue.Empty:
                continue
            if reply["parent_header"].get("msg_id") == msg_id:
                break
        # A shell reply does not prove IOPub subscribed yet (the client connected before the
        # kernel bound): without this, the next cell's busy and idle could be lost.
        kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
        works_then_shuts_down(kc, proc)
    finally:
        stop(kc, proc)
    assert "panicked" not in stderr_path.read_text(errors="replace")


def test_direct_launch_and_shutdown(kv_bin: Path, tmp_path: Path) -> None:
    """`kernelvisor -f FILE` as a kernelspec launches it, without jupyter_client's manager."""
    conn_file, _ = write_connection_file(
        str(tmp_path / "conn.json"), ip="127.0.0.1", key=os.urandom(16).hex().encode()
    )
    stderr_path = tmp_path / "stderr.txt"
    with stderr_path.open("wb") as stderr:
        proc = subprocess.Popen(
            [str(kv_bin), "-f", conn_file, "--python", sys.executable],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
    kc = BlockingKernelClient(connection_file=conn_file)
    kc.load_connection_file()
    kc.start_channels()
    try:
        # Not manager-owned: jupyter_client also waits for heartbeats here.
        kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
        works_then_shuts_down(kc, proc)
    finally:
        stop(kc, proc)
    assert "panicked" not in stderr_path.read_text(errors="replace")


def test_ipc_transport(tmp_path: Path) -> None:
    ip = str(tmp_path / "kv")
    with running_kernel(KERNELVISOR, transport="ipc", ip=ip) as k:
        info = json.loads(Path(k.km.connection_file).read_text())
        assert info["transport"] == "ipc"
        # jupyter_client's ipc convention: each "port" is a suffix of the socket path.
        for port_name in ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port"):
            assert Path(f"{ip}-{info[port_name]}").exists(), port_name
        reply, iopub = execute(k.kc, "1+1")
        assert reply["content"]["status"] == "ok"
        assert result_text(iopub) == "2"
        assert k.kc.is_alive()


def test_second_kernel_independent() -> None:
    """Two kernels at once keep separate namespaces and ports."""
    with running_kernel(KERNELVISOR) as a, running_kernel(KERNELVISOR) as b:
        execute(a.kc, "v = 'a'")
        execute(b.kc, "v = 'b'")
        assert result_text(execute(a.kc, "v")[1]) == "'a'"
        assert result_text(execute(b.kc, "v")[1]) == "'b'"


def test_heartbeat_answers(kernel: Kernel) -> None:
    hb = kernel.kc.hb_channel
    deadline = time.monotonic() + 10
    while not hb.is_beating() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert hb.is_beating()


def works_then_shuts_down(kc: BlockingKernelClient, proc: subprocess.Popen[bytes]) -> None:
    """``1+1`` is answered, then a shutdown_request, and the supervisor exits 0."""
    _, iopub = execute(kc, "1+1")
    assert result_text(iopub) == "2"
    msg_id = kc.shutdown()
    assert get_reply(kc, msg_id, channel="control")["content"]["status"] == "ok"
    assert proc.wait(timeout=30) == 0


def stop(kc: BlockingKernelClient, proc: subprocess.Popen[bytes]) -> None:
    kc.stop_channels()
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_the_last_cells_reach_the_history_database_at_shutdown(tmp_path: Path) -> None:
    """The shell's exit hook writes the session out (its last inputs, its end time) on an
    open database: IPython's own finalizer used to close it first ("Cannot operate on a closed
    database"), and the cells run in the last half second were lost."""
    import sqlite3

    env = {**os.environ, "IPYTHONDIR": str(tmp_path)}
    with running_kernel(KERNELVISOR, env=env) as k:
        kc = k.kc
        execute(kc, "first_marker = 1")
        # A history request writes the cache out first: the database is open from here on.
        msg_id = kc.history(hist_access_type="tail", n=5)
        assert get_reply(kc, msg_id)["content"]["status"] == "ok"
        execute(kc, "last_marker = 2")
        k.km.shutdown_kernel(now=False)
    db = sqlite3.connect(tmp_path / "profile_default" / "history.sqlite")
    try:
        inputs = [row[0] for row in db.execute("SELECT source_raw FROM history")]
        ends = [row[0] for row in db.execute("SELECT end FROM sessions")]
    finally:
        db.close()
    assert "last_marker = 2" in inputs, inputs
    assert ends and all(end is not None for end in ends), f"a session never ended: {ends}"
