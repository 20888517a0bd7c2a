"""One IPC version (IPC.md "Handshake"): a worker started by a supervisor of another build
(another `--ipc-version`, or none: an older binary) refuses at once and says why, instead
of failing each cell later; a template waiting to be adopted turns such a supervisor down."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from kernelvisor.handover import Adopt, Handover
from kernelvisor.ipc import IPC_VERSION

WORKER_PY = Path(__file__).resolve().parents[2] / "worker_py"


def start_worker(*version: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(WORKER_PY), env.get("PYTHONPATH")) if p)
    return subprocess.run(
        [sys.executable, "-m", "kernelvisor.worker", "--connect", "/nonexistent/ipc.sock"]
        + ["--worker-id", "1", *version],
        check=False,
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (["--ipc-version", str(IPC_VERSION + 1)], f"passed IPC version {IPC_VERSION + 1}"),
        ([], "passed no IPC version"),
    ],
)
def test_a_worker_refuses_another_ipc_version(args: list[str], said: str) -> None:
    done = start_worker(*args)
    assert done.returncode == 2, done
    assert f"speaks IPC version {IPC_VERSION}" in done.stderr and said in done.stderr, done.stderr
    assert "different builds" in done.stderr


def test_the_same_version_gets_past_the_check() -> None:
    # It goes on to connect (to nothing here): the version is not what stops it.
    done = start_worker("--ipc-version", str(IPC_VERSION))
    assert done.returncode == 1, done
    assert "IPC version" not in done.stderr
    assert "cannot connect to /nonexistent/ipc.sock" in done.stderr, done.stderr


def test_a_template_is_not_adopted_across_versions() -> None:
    handover = Handover.__new__(Handover)  # stale() reads only what the adopt is checked for
    offer = {
        "op": "adopt",
        "worker_id": 2,
        "token": "t",
        "path": "/nowhere",
        "supervisor_pid": 1,
        "python": sys.executable,
        "backend": "asyncio",
        "cwd": "/",
        "env": {},
        "ipc_version": IPC_VERSION + 1,
    }
    reason = handover.stale(Adopt.from_control(offer))
    assert reason == f"the supervisor speaks IPC version {IPC_VERSION + 1}, not {IPC_VERSION}"
