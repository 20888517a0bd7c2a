"""Start-up from a connection file: port 0 is bound to a port the system chooses and written
back to the file (as ipykernel does), bind failures say what is wrong, and a parent that dies
while the kernel starts stops the kernel."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from kvharness import STARTUP_TIMEOUT, execute, kernelvisor_bin, result_text

PORTS = ("shell_port", "iopub_port", "stdin_port", "control_port", "hb_port")


def connection(ip: str, transport: str = "tcp", **ports: int) -> dict[str, object]:
    return {
        **dict.fromkeys(PORTS, 0),
        **ports,
        "ip": ip,
        "key": "a-key",
        "transport": transport,
        "signature_scheme": "hmac-sha256",
        "kernel_name": "kv-test",
    }


def start(conn_file: Path, **popen: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [str(kernelvisor_bin()), "-f", str(conn_file), "--python", sys.executable],
        stdin=subprocess.DEVNULL,
        text=True,
        **popen,  # type: ignore[call-overload]
    )


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("transport", ["tcp", "ipc"])
def test_port_zero_is_chosen_and_written_back(tmp_path: Path, transport: str) -> None:
    ip = "127.0.0.1" if transport == "tcp" else str(tmp_path / "kv")
    conn_file = tmp_path / "kernel.json"
    conn_file.write_text(json.dumps(connection(ip, transport)))
    proc = start(conn_file)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            assert proc.poll() is None, "the kernel exited"
            info = json.loads(conn_file.read_text() or "{}")
            if all(info.get(p) for p in PORTS):
                break
            assert time.monotonic() < deadline, f"ports never written back: {info}"
            time.sleep(0.05)
        assert len({info[p] for p in PORTS}) == 5, info
        assert {k: v for k, v in info.items() if k not in PORTS} == {
            k: v for k, v in connection(ip, transport).items() if k not in PORTS
        }, "the other fields are kept"
        assert conn_file.stat().st_mode & 0o077 == 0, "the key stays private"
        if transport == "ipc":
            assert sorted(info[p] for p in PORTS) == [1, 2, 3, 4, 5]
        kc = BlockingKernelClient(connection_file=str(conn_file))
        kc.load_connection_file()
        kc.start_channels()
        try:
            kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
            reply, iopub = execute(kc, "1 + 1")
            assert reply["content"]["status"] == "ok"
            assert result_text(iopub) == "2"
            kc.shutdown()
            proc.wait(timeout=30)
        finally:
            kc.stop_channels()
    finally:
        stop(proc)


def failed_start(tmp_path: Path, conn: dict[str, object]) -> str:
    conn_file = tmp_path / "kernel.json"
    conn_file.write_text(json.dumps(conn))
    proc = start(conn_file, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=30)
    finally:
        stop(proc)
    assert proc.returncode not in (0, None), err
    assert "panicked" not in err, err
    return err


def test_a_port_in_use_is_named(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        err = failed_start(tmp_path, connection("127.0.0.1", control_port=port))
    assert f"cannot bind the control socket to tcp://127.0.0.1:{port}" in err, err
    assert f"port {port} is already in use" in err, err
    assert "Address already in use: Address already in use" not in err, err


@pytest.mark.parametrize(
    ("ip", "expected"),
    [
        # TEST-NET-1 (RFC 5737): never an address of this machine.
        ("192.0.2.1", "192.0.2.1 is not an address of this machine"),
        ("no-such-nic0", '"no-such-nic0" is neither an IP address nor a network interface'),
    ],
)
def test_an_ip_that_cannot_be_bound_is_named(tmp_path: Path, ip: str, expected: str) -> None:
    err = failed_start(tmp_path, connection(ip))
    assert expected in err, err
    assert '"ip" in the connection file' in err, err
    assert not err.strip().endswith("No such device"), err


@pytest.mark.parametrize(
    ("ip", "key", "warning"),
    [
        ("127.0.0.1", "", "empty key: messages are not signed"),
        ("0.0.0.0", "a-key", "over TCP without encryption"),
    ],
    ids=["empty key", "network without CURVE"],
)
def test_an_unprotected_kernel_warns_at_start(
    tmp_path: Path, ip: str, key: str, warning: str
) -> None:
    conn_file = tmp_path / "kernel.json"
    conn_file.write_text(json.dumps({**connection(ip), "key": key}))
    log = tmp_path / "kernel.log"
    with log.open("w") as err:
        proc = start(conn_file, stderr=err)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while warning not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.05)
    finally:
        stop(proc)


def test_a_protected_local_kernel_does_not_warn(tmp_path: Path) -> None:
    conn_file = tmp_path / "kernel.json"
    conn_file.write_text(json.dumps(connection("127.0.0.1")))
    proc = start(conn_file, stderr=subprocess.PIPE)
    try:
        # Ports written back: the checks and the binding are done.
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not json.loads(conn_file.read_text())["shell_port"]:
            assert time.monotonic() < deadline
            time.sleep(0.05)
    finally:
        stop(proc)
    assert proc.stderr is not None
    assert "WARN" not in proc.stderr.read()


def has_open(pid: int, path: Path) -> bool:
    """Whether process ``pid`` has ``path`` open (psutil lists regular files only, not FIFOs)."""
    fds = Path(f"/proc/{pid}/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) == str(path):
                return True
        except OSError:
            continue
    return False


def test_a_parent_that_dies_during_start_up_stops_the_kernel(tmp_path: Path) -> None:
    """The kernel reads its parent first thing: a parent that dies while the kernel is still
    reading its connection file (a FIFO here, held open until the parent is gone) is noticed."""
    fifo = tmp_path / "kernel.json"
    os.mkfifo(fifo)
    # Held open read-write, so the kernel's open does not block and its read waits for EOF.
    hold = os.open(fifo, os.O_RDWR)
    launcher = (
        "import subprocess, sys; "
        "p = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL); "
        "print(p.pid, flush=True); sys.stdin.read()"
    )
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            launcher,
            str(kernelvisor_bin()),
            "-f",
            str(fifo),
            "--python",
            sys.executable,
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    kernel_pid = 0
    try:
        assert parent.stdout is not None
        kernel_pid = int(parent.stdout.readline())
        kernel = psutil.Process(kernel_pid)
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not has_open(kernel_pid, fifo):
            assert time.monotonic() < deadline, "the kernel never opened its connection file"
            time.sleep(0.02)
        parent.kill()
        parent.wait(timeout=10)
        while kernel.ppid() == parent.pid:
            time.sleep(0.01)
        os.write(hold, json.dumps(connection("127.0.0.1")).encode())
        os.close(hold)
        hold = -1
        try:
            gone = kernel.wait(timeout=20) is not None or not kernel.is_running()
        except psutil.TimeoutExpired:
            gone = kernel.status() == psutil.STATUS_ZOMBIE
        assert gone, "the kernel outlived the parent that started it"
    finally:
        if hold >= 0:
            os.close(hold)
        parent.kill()
        parent.wait()
        if kernel_pid:
            try:
                os.kill(kernel_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
