"""kernelvisor across a network: the kernel in one network namespace, bound to a non-loopback
address; a jupyter_client client (tests/remote/netns_client.py) in another, reaching it over a veth
pair. Executes, an interrupt (interrupt_request: a remote client cannot signal the kernel), a
segfaulting cell and a restart (the client asks, the kernel's host starts it again on the same
connection file, the client carries on) all work across it.

The test creates both namespaces and the veth pair, with private addresses that exist only inside
them, and removes them at the end. Needs root (CI runs as root) and iproute2.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from kvharness import kernelvisor_bin

pytestmark = pytest.mark.timeout(240)

KERNEL_ADDR = "10.231.77.1"
CLIENT_ADDR = "10.231.77.2"
CLIENT = Path(__file__).with_name("netns_client.py")


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True, timeout=30)


@contextmanager
def two_namespaces() -> Iterator[tuple[str, str]]:
    """Network namespaces for the kernel and the client, joined by a veth pair."""
    assert os.geteuid() == 0, "creating network namespaces needs root (CI runs as root)"
    tag = f"{os.getpid() % 100000}"
    kernel_ns, client_ns = f"kvk{tag}", f"kvc{tag}"
    ip("netns", "add", kernel_ns)
    try:
        ip("netns", "add", client_ns)
        ends = ((kernel_ns, f"kvk{tag}v", KERNEL_ADDR), (client_ns, f"kvc{tag}v", CLIENT_ADDR))
        (_, kernel_dev, _), (_, client_dev, _) = ends
        veth = f"link add {kernel_dev} netns {kernel_ns} type veth peer name {client_dev}"
        ip(*veth.split(), "netns", client_ns)
        for ns, dev, addr in ends:
            ip("-n", ns, "addr", "add", f"{addr}/30", "dev", dev)
            ip("-n", ns, "link", "set", dev, "up")
            ip("-n", ns, "link", "set", "lo", "up")
        yield kernel_ns, client_ns
    finally:
        for ns in (client_ns, kernel_ns):  # deleting a namespace deletes its end of the veth
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30, check=False)


def start_kernel(ns: str, connection_file: Path, log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, str(kernelvisor_bin()), "-f", str(connection_file)]
            + ["--python", sys.executable],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def next_step(client: subprocess.Popen[str]) -> dict[str, Any]:
    assert client.stdout is not None
    line = client.stdout.readline()
    assert line, (
        f"the client ended early ({client.poll()}): {client.stderr and client.stderr.read()}"
    )
    return json.loads(line)


def test_kernel_and_client_in_two_network_namespaces(tmp_path: Path) -> None:
    connection_file = tmp_path / "kernel.json"
    connection_file.write_text(
        json.dumps(
            {
                "ip": KERNEL_ADDR,
                "transport": "tcp",
                "shell_port": 47101,
                "iopub_port": 47102,
                "stdin_port": 47103,
                "control_port": 47104,
                "hb_port": 47105,
                "key": secrets.token_hex(16),
                "signature_scheme": "hmac-sha256",
                "kernel_name": "kernelvisor",
            }
        )
    )
    kernel_log = tmp_path / "kernel.log"
    with two_namespaces() as (kernel_ns, client_ns):
        kernel = start_kernel(kernel_ns, connection_file, kernel_log)
        client = subprocess.Popen(
            ["ip", "netns", "exec", client_ns, sys.executable, str(CLIENT), str(connection_file)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        restarted: subprocess.Popen[bytes] | None = None
        try:
            steps: dict[str, dict[str, Any]] = {}
            while "restart-sent" not in steps:
                step = next_step(client)
                steps[step.pop("step")] = step
            # The kernel honours the shutdown; its host starts it again on the same file.
            assert kernel.wait(timeout=30) == 0
            restarted = start_kernel(kernel_ns, connection_file, kernel_log)
            assert client.stdin is not None
            client.stdin.write("go\n")
            client.stdin.flush()
            step = next_step(client)
            steps[step.pop("step")] = step
            assert client.wait(timeout=60) == 0, client.stderr and client.stderr.read()
        finally:
            for proc in (client, kernel, restarted):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait(timeout=10)

    log = kernel_log.read_text()
    assert steps["ready"]["ip"] == KERNEL_ADDR
    assert steps["hello"] == {"status": "ok", "ename": None, "evalue": None, "stdout": "hello 42\n"}
    assert steps["interrupt"]["status"] == "error", log
    assert steps["interrupt"]["ename"] == "KeyboardInterrupt"
    assert steps["after-interrupt"]["stdout"] == "True\n"
    assert steps["crash"]["ename"] == "WorkerCrashed"
    assert "SIGSEGV" in steps["crash"]["evalue"]
    assert steps["after-crash"]["stdout"] == "alive\n"
    assert steps["restart-sent"] == {"reply": "shutdown_reply", "restart": True}
    assert steps["after-restart"]["status"] == "ok"
    assert steps["after-restart"]["stdout"] == "False\n"
