"""Helpers for the Jupyter-level tests: start real kernels, run code, collect what they send."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

REPO = Path(__file__).resolve().parents[2]
KERNELVISOR = "kernelvisor"
IPYKERNEL = "python3"
# Generous: a cold worker import of IPython on a loaded 2-core CI box can take seconds.
STARTUP_TIMEOUT = 60.0
TIMEOUT = 30.0

Msg = dict[str, Any]


def both_kernels(ipykernel_differs: str | None = None) -> pytest.MarkDecorator:
    """Run a test against kernelvisor and ipykernel, for behaviour meant to equal ipykernel's, so a
    difference shows as one failing id. Where kernelvisor deliberately does better than ipykernel,
    pass the reason: ipykernel's case is then an expected failure, still listed in the summary."""
    ipy: Any = IPYKERNEL
    if ipykernel_differs:
        ipy = pytest.param(IPYKERNEL, marks=pytest.mark.xfail(reason=ipykernel_differs))
    return pytest.mark.parametrize("kernel", [KERNELVISOR, ipy], indirect=True)


BOTH_KERNELS = both_kernels()


def kernelvisor_bin() -> Path:
    return Path(os.environ.get("KERNELVISOR_BIN") or REPO / "target/release/kernelvisor")


@dataclass
class Kernel:
    name: str
    km: KernelManager
    kc: BlockingKernelClient


@contextmanager
def running_kernel(
    name: str, env: dict[str, str] | None = None, **km_kwargs: Any
) -> Iterator[Kernel]:
    """A started kernel (with ``env`` as its environment, if given) and a ready client; on exit,
    shut it down and check that neither its process nor any child of it is left running."""
    km = KernelManager(kernel_name=name, **km_kwargs)
    km.start_kernel(**({"env": env} if env is not None else {}))
    first = kernel_process(km)
    assert first is not None
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
        yield Kernel(name, km, kc)
    finally:
        kc.stop_channels()
        # After a restart the process is a new one: look it up now.
        proc = kernel_process(km) or first
        tree = process_tree(proc.pid)
        if km.has_kernel:  # a test may have shut it down through the manager already
            km.shutdown_kernel(now=False)
        assert proc.poll() is not None, f"{name} kernel process {proc.pid} still running"
        # Workers must not outlive the supervisor.
        _, alive = psutil.wait_procs(tree, timeout=10)
        assert not alive, f"{name}: processes left after shutdown: {[p.pid for p in alive]}"


def kernel_process(km: KernelManager) -> subprocess.Popen[bytes] | None:
    """The kernel's process, as jupyter_client's local provisioner launched it (after a restart,
    the new one)."""
    proc: subprocess.Popen[bytes] | None = getattr(km.provisioner, "process", None)
    return proc


def process_tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def parent_id(msg: Msg) -> str:
    return str(msg.get("parent_header", {}).get("msg_id", ""))


def is_idle(msg: Msg) -> bool:
    return msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"


def iopub_until(
    kc: BlockingKernelClient,
    msg_id: str,
    stop: Callable[[Msg], bool],
    seen: list[Msg],
    timeout: float = TIMEOUT,
) -> Msg:
    """Reads iopub, appending the messages whose parent is msg_id to ``seen``, until one of them
    satisfies ``stop`` (returned); fails after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            types = [m["msg_type"] for m in seen]
            raise AssertionError(f"iopub for {msg_id}: nothing awaited came in {timeout}s; {types}")
        try:
            msg = kc.get_iopub_msg(timeout=remaining)
        except queue.Empty:
            continue
        if parent_id(msg) != msg_id:
            continue
        seen.append(msg)
        if stop(msg):
            return msg


def collect_iopub(kc: BlockingKernelClient, msg_id: str, timeout: float = TIMEOUT) -> list[Msg]:
    """Every iopub message whose parent is msg_id, up to and including its status: idle."""
    got: list[Msg] = []
    iopub_until(kc, msg_id, is_idle, got, timeout)
    return got


def get_reply(
    kc: BlockingKernelClient, msg_id: str, timeout: float = TIMEOUT, channel: str = "shell"
) -> Msg:
    """The reply to msg_id on shell or control; replies to other requests are dropped."""
    get = kc.get_shell_msg if channel == "shell" else kc.get_control_msg
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"no {channel} reply to {msg_id} in {timeout}s")
        try:
            msg = get(timeout=remaining)
        except queue.Empty:
            continue
        if parent_id(msg) == msg_id:
            return msg


def get_replies(
    kc: BlockingKernelClient, msg_ids: list[str], timeout: float = TIMEOUT
) -> dict[str, Msg]:
    """Replies to several pipelined requests, keyed by request msg_id."""
    wanted = set(msg_ids)
    got: dict[str, Msg] = {}
    deadline = time.monotonic() + timeout
    while wanted - got.keys():
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"missing replies after {timeout}s: {sorted(wanted - got.keys())}")
        try:
            msg = kc.get_shell_msg(timeout=remaining)
        except queue.Empty:
            continue
        if parent_id(msg) in wanted:
            got[parent_id(msg)] = msg
    return got


def execute(
    kc: BlockingKernelClient, code: str, timeout: float = TIMEOUT, **kwargs: Any
) -> tuple[Msg, list[Msg]]:
    """Run one cell: its execute_reply and its iopub messages through idle."""
    msg_id = kc.execute(code, **kwargs)
    reply = get_reply(kc, msg_id, timeout)
    return reply, collect_iopub(kc, msg_id, timeout)


def of_type(msgs: list[Msg], msg_type: str) -> list[Msg]:
    return [m for m in msgs if m["msg_type"] == msg_type]


def stream_chunks(msgs: list[Msg]) -> list[tuple[str, str]]:
    """(name, text) of stream output in order, adjacent chunks of one stream merged: how a
    notebook shows it, independent of how the kernel batched the writes."""
    chunks: list[tuple[str, str]] = []
    for m in of_type(msgs, "stream"):
        name, text = m["content"]["name"], m["content"]["text"]
        if chunks and chunks[-1][0] == name:
            chunks[-1] = (name, chunks[-1][1] + text)
        else:
            chunks.append((name, text))
    return chunks


def stream_text(msgs: list[Msg], name: str = "stdout") -> str:
    return "".join(
        m["content"]["text"] for m in of_type(msgs, "stream") if m["content"]["name"] == name
    )


def result_text(msgs: list[Msg]) -> str | None:
    results = of_type(msgs, "execute_result")
    assert len(results) <= 1, results
    return results[0]["content"]["data"]["text/plain"] if results else None


def statuses(msgs: list[Msg]) -> list[str]:
    return [m["content"]["execution_state"] for m in of_type(msgs, "status")]


def collect_requests(
    kc: BlockingKernelClient,
    msg_ids: list[str],
    on_reply: Callable[[str], object] | None = None,
) -> dict[str, dict[str, Any]]:
    """Replies and iopub of several concurrent requests, until each has replied and gone
    idle; ``on_reply`` gets each msg_id as its reply arrives."""
    cells: dict[str, dict[str, Any]] = {
        m: {"reply": None, "iopub": [], "idle": False} for m in msg_ids
    }
    deadline = time.monotonic() + TIMEOUT
    while not all(c["reply"] is not None and c["idle"] for c in cells.values()):
        assert time.monotonic() < deadline, "requests unfinished"
        if kc.shell_channel.msg_ready():
            reply = kc.get_shell_msg(timeout=1)
            cells[reply["parent_header"]["msg_id"]]["reply"] = reply["content"]
            if on_reply is not None:
                on_reply(reply["parent_header"]["msg_id"])
        if kc.iopub_channel.msg_ready():
            msg = kc.get_iopub_msg(timeout=1)
            cell = cells.get(msg["parent_header"].get("msg_id", ""))
            if cell is not None:
                cell["iopub"].append(msg)
                if msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle":
                    cell["idle"] = True
        time.sleep(0.002)
    return cells


def cell_stdout(cell: dict[str, Any]) -> str:
    return "".join(m["content"]["text"] for m in cell["iopub"] if m["msg_type"] == "stream")


def send_execute(
    kc: BlockingKernelClient,
    code: str,
    *,
    tags: list[str] | None = None,
    subshell_id: str | None = None,
    **content: Any,
) -> str:
    """Sends an execute_request without waiting: with ``tags`` in its metadata, to the
    subshell ``subshell_id`` (in its header), ``content`` overriding the defaults; returns
    its msg_id."""
    full = {
        "code": code,
        "silent": False,
        "store_history": True,
        "user_expressions": {},
        "allow_stdin": False,
        "stop_on_error": True,
        **content,
    }
    msg = kc.session.msg("execute_request", full, metadata={"tags": tags} if tags else {})
    if subshell_id is not None:
        msg["header"]["subshell_id"] = subshell_id
    kc.shell_channel.send(msg)
    return str(msg["header"]["msg_id"])


def install_kernelspec(kv_bin: Path, prefix: Path, *args: str) -> None:
    """``kernelvisor install --prefix PREFIX`` for this interpreter, with ``args``."""
    proc = subprocess.run(
        [str(kv_bin), "install", "--prefix", str(prefix), "--python", sys.executable, *args],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, (
        f"kernelvisor install {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}"
    )


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def plain(text: str) -> str:
    """``text`` without its ANSI colour codes (what a terminal shows of a traceback)."""
    return _ANSI.sub("", text)
