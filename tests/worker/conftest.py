"""Fixtures for the worker's tests. They run against worker_py/ directly, so the
package does not have to be installed (its dependencies do: IPython, comm)."""

from __future__ import annotations

import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

WORKER_PY = Path(__file__).resolve().parents[2] / "worker_py"
if str(WORKER_PY) not in sys.path:
    sys.path.insert(0, str(WORKER_PY))

from ipc_client import WorkerProcess


@pytest.fixture(scope="session")
def ipython_dir() -> Iterator[str]:
    # Keeps the workers' history databases out of the user's ~/.ipython.
    with tempfile.TemporaryDirectory(prefix="kv-ipython-") as path:
        yield path


@pytest.fixture(scope="module")
def worker(ipython_dir: str) -> Iterator[WorkerProcess]:
    """One worker shared by a module's tests (starting one costs IPython's import)."""
    proc = WorkerProcess(env={"IPYTHONDIR": ipython_dir})
    try:
        yield proc
    finally:
        proc.close()


@pytest.fixture
def fresh_worker(ipython_dir: str) -> Iterator[WorkerProcess]:
    proc = WorkerProcess(env={"IPYTHONDIR": ipython_dir})
    try:
        yield proc
    finally:
        proc.close()
