"""A worker whose Python cannot start (a wrong --python, no kernelvisor package): the client is
told why instead of waiting forever, the supervisor backs off instead of restarting Pythons in a
loop, and a Python that gets fixed is picked up by the next attempt."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from jupyter_client import BlockingKernelClient
from jupyter_client.connect import write_connection_file
from kvharness import STARTUP_TIMEOUT, TIMEOUT, execute, result_text

BROKEN = '#!/bin/sh\nexec /usr/bin/python3 -I "$@"\n'  # a Python without the worker package
FIXED = f'#!/bin/sh\nexec {sys.executable} "$@"\n'


@contextmanager
def kernel_with_python(
    kv_bin: Path, tmp_path: Path, python: Path
) -> Iterator[tuple[BlockingKernelClient, Path]]:
    conn_file, _ = write_connection_file(
        str(tmp_path / "conn.json"), ip="127.0.0.1", key=os.urandom(16).hex().encode()
    )
    log = tmp_path / "stderr.txt"
    cmd = [str(kv_bin), "-f", conn_file, "--python", str(python), "--log-level", "kernelvisor=info"]
    with log.open("wb") as stderr:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=stderr)
    kc = BlockingKernelClient(connection_file=conn_file)
    kc.load_connection_file()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
        yield kc, log
    finally:
        kc.stop_channels()
        proc.terminate()
        proc.wait(timeout=10)


def start_failure(kc: BlockingKernelClient) -> tuple[str, list[dict]]:
    """Runs `1+1`, which must fail with WorkerStartFailed: its evalue and IOPub."""
    reply, iopub = execute(kc, "1+1")
    content = reply["content"]
    assert content["status"] == "error", content
    assert content["ename"] == "WorkerStartFailed", content
    return content["evalue"], iopub


def starts(log: Path) -> int:
    return log.read_text().count("worker starting")


def test_a_python_that_cannot_start_is_reported_and_backed_off(
    kv_bin: Path, tmp_path: Path
) -> None:
    python = tmp_path / "python"
    python.write_text(BROKEN)
    python.chmod(0o755)
    with kernel_with_python(kv_bin, tmp_path, python) as (kc, log):
        evalue, iopub = start_failure(kc)
        assert "No module named" in evalue and "kernelvisor" in evalue
        assert [m["content"]["execution_state"] for m in iopub if m["msg_type"] == "status"] == [
            "busy",
            "idle",
        ]
        time.sleep(6)
        # Exponential back-off: a handful of attempts, not hundreds (was ~80 in 6 s).
        assert starts(log) <= 8, log.read_text()[-2000:]
        assert log.read_text().count("workers cannot start") == 1, "logged once"

        # Fixed meanwhile: the next attempt picks it up.
        python.write_text(FIXED)
        deadline = time.monotonic() + 40
        while True:
            reply, iopub = execute(kc, "1+1")
            if reply["content"]["status"] == "ok":
                break
            assert time.monotonic() < deadline, reply["content"]
            time.sleep(0.5)
        assert result_text(iopub) == "2"


def test_kernel_info_is_answered_without_a_worker(kv_bin: Path, tmp_path: Path) -> None:
    python = tmp_path / "python"
    python.write_text(BROKEN)
    python.chmod(0o755)
    with kernel_with_python(kv_bin, tmp_path, python) as (kc, _):
        # No --python-version: kernel_info waited for a worker; it is answered regardless.
        msg_id = kc.kernel_info()
        reply = kc.get_shell_msg(timeout=TIMEOUT)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "ok"


def test_a_worker_of_another_build_is_reported(kv_bin: Path, tmp_path: Path) -> None:
    """A binary and a worker package from different builds (another IPC version): the
    first cell says so, instead of each cell failing on a message the other side does not
    understand."""
    python = tmp_path / "python"
    # The worker's own version check, as a supervisor of another build would trip it
    # (argparse keeps the last --ipc-version).
    python.write_text(f'#!/bin/sh\nexec {sys.executable} "$@" --ipc-version 0\n')
    python.chmod(0o755)
    with kernel_with_python(kv_bin, tmp_path, python) as (kc, _log):
        evalue, _ = start_failure(kc)
        assert "passed IPC version 0" in evalue and "different builds" in evalue, evalue
