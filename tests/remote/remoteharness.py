"""Helpers for the remote-kernel tests: free loopback ports, a gateway server process that is
always stopped, and jupyter_server's gateway client pointed at it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from jupyter_server.gateway.gateway_client import GatewayClient

LOOPBACK = "127.0.0.1"
SERVER_START_TIMEOUT = 90.0


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that was free on ``host`` a moment ago."""
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def get_json(url: str, timeout: float = 10.0) -> Any:
    """GET ``url`` and decode its JSON body."""
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.load(response)


@contextmanager
def server(
    argv: list[str], url: str, env: Mapping[str, str], log: Path
) -> Iterator[subprocess.Popen[bytes]]:
    """Runs a gateway server (``argv``, output to ``log``) until ``url``/api answers; stops it
    (SIGTERM, then SIGKILL) on exit, whatever happened."""
    with log.open("wb") as out:
        proc = subprocess.Popen(argv, env=dict(env), stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            assert proc.poll() is None, f"{argv[0]} exited {proc.returncode}:\n{log.read_text()}"
            try:
                get_json(f"{url}/api", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, f"{url} never answered:\n{log.read_text()}"
                time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextmanager
def gateway_client(url: str) -> Iterator[GatewayClient]:
    """jupyter_server's GatewayClient singleton, pointed at ``url`` (and reset on exit)."""
    GatewayClient.clear_instance()
    try:
        yield GatewayClient.instance(url=url, request_timeout=120.0, connect_timeout=60.0)
    finally:
        GatewayClient.clear_instance()


def without(env: Mapping[str, str], *prefixes: str) -> dict[str, str]:
    """``env`` less the variables whose names start with one of ``prefixes``."""
    return {k: v for k, v in env.items() if not k.startswith(prefixes)}


def jupyter_dirs(tmp: Path) -> dict[str, str]:
    """Jupyter's config, data and runtime dirs in ``tmp`` (nothing of the user's is read)."""
    dirs = {
        "JUPYTER_CONFIG_DIR": tmp / "config",
        "JUPYTER_DATA_DIR": tmp / "data",
        "JUPYTER_RUNTIME_DIR": tmp / "runtime",
        "IPYTHONDIR": tmp / "ipython",
    }
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    return {k: str(v) for k, v in dirs.items()}


def base_env() -> dict[str, str]:
    """This process's environment, less Jupyter's and kernelvisor's own settings."""
    return without(os.environ, "JUPYTER_", "KERNELVISOR_", "KERNEL_", "IPYTHONDIR")
