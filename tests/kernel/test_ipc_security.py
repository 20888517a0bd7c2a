"""The worker socket is no door: a local process that connects to it cannot kill a worker,
publish on IOPub or answer a client's request, whatever its hello claims. Each attack connects
to the real supervisor's socket itself; the namespace stays intact and nothing is published."""

from __future__ import annotations

import json
import os
import socket
import stat
import time
from collections.abc import Iterator

import psutil
import pytest
from isolation_support import is_running, kv_kernel, main_worker, start_cell_marked
from kernelvisor.ipc import encode
from kvharness import TIMEOUT, Kernel, collect_iopub, execute, get_reply, result_text

FORGED = "FORGED OUTPUT"


@pytest.fixture(scope="module")
def kernel() -> Iterator[Kernel]:
    with kv_kernel() as k:
        execute(k.kc, "survivor = 42")
        yield k


def socket_path(kc) -> str:  # type: ignore[no-untyped-def]
    """The supervisor's worker socket, as the main worker was told (its --connect)."""
    _, pid = main_worker(kc)
    cmd = psutil.Process(pid).cmdline()
    return cmd[cmd.index("--connect") + 1]


def attack(path: str, *messages: list[bytes], linger: float = 0.3) -> bytes:
    """Connects, sends ``messages`` (frames each), waits, and returns what the supervisor sent
    back before it closed the connection (nothing, for a refused one)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    got = b""
    try:
        for frames in messages:
            try:
                sock.sendall(encode(frames))
            except (BrokenPipeError, ConnectionResetError):
                break
        sock.settimeout(linger)
        try:
            while chunk := sock.recv(65536):
                got += chunk
        except (TimeoutError, ConnectionResetError):
            pass
    finally:
        sock.close()
    return got


def op(**fields: object) -> bytes:
    return json.dumps(fields).encode()


def forged_stream(parent: bytes = b"{}") -> list[bytes]:
    content = json.dumps({"name": "stdout", "text": FORGED}).encode()
    return [op(op="iopub", msg_type="stream"), parent, b"{}", content]


def assert_intact(k: Kernel, worker_pid: int) -> None:
    assert is_running(worker_pid), "the worker was killed"
    assert main_worker(k.kc)[1] == worker_pid, "the worker was replaced"
    _, iopub = execute(k.kc, "survivor")
    assert result_text(iopub) == "42", iopub
    assert FORGED not in str(iopub)


def test_socket_dir_and_socket_are_private_under_umask_000() -> None:
    old = os.umask(0)
    try:
        ctx = kv_kernel()
        k = ctx.__enter__()
    finally:
        os.umask(old)
    try:
        path = socket_path(k.kc)
        assert stat.S_IMODE(os.stat(os.path.dirname(path)).st_mode) == 0o700
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    finally:
        ctx.__exit__(None, None, None)


def test_hello_claiming_the_main_worker_kills_nothing(kernel: Kernel) -> None:
    kc = kernel.kc
    wid, pid = main_worker(kc)
    path = socket_path(kc)
    for role in ("main", "aux", "snapshot"):
        hello = op(op="hello", role=role, worker_id=wid, pid=pid, token="0" * 64, seq=1)
        got = attack(path, [hello], forged_stream())
        assert got == b"", "a refused connection is sent nothing"
    assert_intact(kernel, pid)


def test_unknown_worker_cannot_publish_or_answer(kernel: Kernel) -> None:
    kc = kernel.kc
    _, pid = main_worker(kc)
    path = socket_path(kc)
    msg_id, seen = start_cell_marked(
        kc, 'import time\nprint("running", flush=True)\ntime.sleep(1.5)\n"real"', "running"
    )
    hello = op(op="hello", role="main", worker_id=999, pid=os.getpid(), token="ab" * 32)
    parent = json.dumps({"msg_id": msg_id, "msg_type": "execute_request"}).encode()
    forged_replies = [
        [op(op="reply", id=n, status="ok"), b"{}", op(status="ok", execution_count=7)]
        for n in range(1, 60)
    ]
    attack(path, [hello], forged_stream(parent), *forged_replies)
    reply = get_reply(kc, msg_id, TIMEOUT)
    iopub = [*seen, *collect_iopub(kc, msg_id)]
    assert reply["content"]["status"] == "ok" and reply["content"]["execution_count"] != 7
    assert result_text(iopub) == "'real'", "the real cell answered"
    assert FORGED not in str(iopub)
    assert_intact(kernel, pid)


def test_garbage_and_silence_are_refused(kernel: Kernel) -> None:
    kc = kernel.kc
    _, pid = main_worker(kc)
    path = socket_path(kc)
    attack(path, [b"not json"], forged_stream())
    attack(path, [op(op="iopub", msg_type="stream")], forged_stream())
    # Raw bytes that are no framing at all.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(path)
    sock.sendall(b"\xff" * 64)
    time.sleep(0.2)
    sock.close()
    assert_intact(kernel, pid)
