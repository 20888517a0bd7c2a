"""Startup, shutdown and transports of the real kernel process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from kvharness import (
    BOTH_KERNELS,
    KERNELVISOR,
    STARTUP_TIMEOUT,
    Kernel,
    execute,
    get_reply,
    process_tree,
    result_text,
    running_kernel,
)


def wait_gone(procs: list[psutil.Process], timeout: float) -> list[psutil.Process]:
    _, alive = psutil.wait_procs(procs, timeout=timeout)
    return alive


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
        _, iopub = execute(kc, "1+1")
        assert result_text(iopub) == "2"
        msg_id = kc.shutdown()
        assert get_reply(kc, msg_id, channel="control")["content"]["status"] == "ok"
        assert proc.wait(timeout=30) == 0
    finally:
        kc.stop_channels()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
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
