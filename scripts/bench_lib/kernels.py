"""Kernel plumbing for the bench: kernelspecs in a temp dir, launching a kernel through
jupyter_client, and reading its shell, iopub and control replies with deadlines."""

from __future__ import annotations

import hmac
import importlib.util
import json
import os
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.manager import KernelManager

from bench_lib.table import IPYKERNEL, KERNELVISOR, XPYTHON, XPYTHON_RAW, Fail, Missing, Value

Msg = dict[str, Any]

# Display name -> kernel name. ipykernel's "python3" and xeus-python's specs are written to the
# temp dir, pinned to this venv's python; kernelvisor's by `kernelvisor install`.
KERNELS = {
    IPYKERNEL: "python3",
    KERNELVISOR: "kernelvisor",
    XPYTHON: "kv-bench-xpython",
    XPYTHON_RAW: "kv-bench-xpython-raw",
}
STARTUP_TIMEOUT = 60.0
STREAM_TIMEOUT = 180.0


@dataclass(frozen=True)
class Opts:
    quick: bool
    kernels: list[str]
    bin: Path
    sections: list[str]
    python: Path  # runs kernelvisor's workers

    def runs(self, quick: int, full: int) -> int:
        return quick if self.quick else full


def ms(seconds: float) -> float:
    return seconds * 1000


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# --- kernelspecs -------------------------------------------------------------------------------


def install_specs(opts: Opts, tmp: Path) -> dict[str, Value]:
    """Kernelspecs under tmp, found through JUPYTER_PATH. Returns what stands in for the
    results of a kernel that cannot run (not installed, install failed)."""
    from ipykernel.kernelspec import install as install_ipykernel_spec

    errors: dict[str, Value] = {}
    install_ipykernel_spec(prefix=str(tmp))
    try:
        proc = subprocess.run(
            [str(opts.bin), "install", "--prefix", str(tmp), "--python", str(opts.python)],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
        )
        if proc.returncode != 0:
            why = f"install exited {proc.returncode}: {proc.stderr.strip()[:80]}"
            errors[KERNELVISOR] = Fail(why)
    except (OSError, subprocess.SubprocessError) as e:
        errors[KERNELVISOR] = Fail(f"install: {e}")
    # xeus-python's wheel registers `xpython` and `xpython-raw` specs whose argv starts with a
    # bare "python3.X" (whatever PATH finds); ours run `xpython_launcher` with this venv's python.
    if importlib.util.find_spec("xpython_launcher") is None:
        errors[XPYTHON] = errors[XPYTHON_RAW] = Missing("not installed")
    else:
        for name, extra in ((XPYTHON, []), (XPYTHON_RAW, ["--raw"])):
            d = tmp / "share" / "jupyter" / "kernels" / KERNELS[name]
            d.mkdir(parents=True)
            argv = [sys.executable, "-m", "xpython_launcher", "-f", "{connection_file}", *extra]
            spec = {"argv": argv, "display_name": name, "language": "python"}
            (d / "kernel.json").write_text(json.dumps(spec))
    os.environ["JUPYTER_PATH"] = str(tmp / "share" / "jupyter")
    runtime = tmp / "runtime"
    runtime.mkdir()
    os.environ["JUPYTER_RUNTIME_DIR"] = str(runtime)
    return errors


# --- messages ----------------------------------------------------------------------------------


DELIM = b"<IDS|MSG>"


class Pump:
    """Reads shell, iopub and control together, so none fills up while we wait on another."""

    def __init__(self, kc: BlockingKernelClient) -> None:
        self.session = kc.session
        self.names = {
            kc.shell_channel.socket: "shell",
            kc.iopub_channel.socket: "iopub",
            kc.control_channel.socket: "control",
        }
        self.poller = zmq.Poller()
        for sock in self.names:
            self.poller.register(sock, zmq.POLLIN)

    def wait(self, deadline: float) -> list[tuple[str, Msg]]:
        """Messages that arrive before the deadline (at least one unless it passes)."""
        timeout_ms = max(0, int((deadline - time.perf_counter()) * 1000))
        out: list[tuple[str, Msg]] = []
        for sock, _ in self.poller.poll(timeout_ms):
            while True:
                try:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
                except zmq.Again:
                    break
                out.append((self.names[sock], self.decode(frames)))
        return out

    def decode(self, frames: list[bytes]) -> Msg:
        """Verify and parse, leaner than Session.deserialize (no date parsing), so the client's
        own cost caps the measured rates less."""
        sig, *parts = frames[frames.index(DELIM) + 1 :]
        if not hmac.compare_digest(sig, self.session.sign(parts[:4])):
            raise ValueError("message with a bad signature")
        header, parent, metadata, content = (json.loads(p) for p in parts[:4])
        return {
            "header": header,
            "msg_type": header["msg_type"],
            "parent_header": parent,
            "metadata": metadata,
            "content": content,
            "buffers": parts[4:],
        }


def parent_id(msg: Msg) -> str:
    return str((msg.get("parent_header") or {}).get("msg_id", ""))


def is_idle(msg: Msg) -> bool:
    return msg["msg_type"] == "status" and msg["content"]["execution_state"] == "idle"


# --- launching ---------------------------------------------------------------------------------


@dataclass
class Launched:
    km: KernelManager
    kc: BlockingKernelClient
    pump: Pump
    t_start: float
    t_info: float  # first kernel_info_reply
    t_ready: float  # kernel_info_reply and iopub proven subscribed

    @property
    def pid(self) -> int:
        """The kernel's own process (kernelvisor: the supervisor)."""
        proc = self.km.provisioner.process if self.km.provisioner else None
        if proc is None:
            raise RuntimeError("no kernel process")
        return int(proc.pid)


def wait_ready(km: KernelManager, kc: BlockingKernelClient, pump: Pump) -> tuple[float, float]:
    """Times of the first kernel_info_reply, and of readiness: a reply plus proof that our SUB
    is subscribed (else the first outputs could be lost): iopub's idle for the same request, or
    the kernel's `iopub_welcome` (JEP 65), which an XPUB kernel sends when the subscription
    arrives. Without the welcome, a SUB that reconnects just after a restart's first reply was
    published waits for the 200 ms retry."""
    deadline = time.perf_counter() + STARTUP_TIMEOUT
    t_info = 0.0
    while time.perf_counter() < deadline:
        if not km.is_alive():
            raise RuntimeError("kernel died during startup")
        msg_id = kc.kernel_info()
        replied = idle = False
        # Before any reply, one request may wait long (the DEALER queues it until the kernel
        # binds). After one, iopub's idle follows within ms unless our SUB missed it: ask again.
        retry_at = min(deadline, time.perf_counter() + (0.2 if t_info else 2.0))
        while time.perf_counter() < retry_at:
            for chan, msg in pump.wait(retry_at):
                if chan == "shell" and msg["msg_type"] == "kernel_info_reply":
                    t_info = t_info or time.perf_counter()
                    if parent_id(msg) == msg_id:
                        replied = True
                        retry_at = min(retry_at, time.perf_counter() + 0.2)
                elif chan == "iopub" and (
                    msg["msg_type"] == "iopub_welcome"
                    or (parent_id(msg) == msg_id and is_idle(msg))
                ):
                    idle = True
            if replied and idle:
                return t_info, time.perf_counter()
    raise TimeoutError(f"not ready in {STARTUP_TIMEOUT:.0f}s")


@contextmanager
def launched(
    kernel: str, sockopts: dict[int, int] | None = None, env: dict[str, str] | None = None
) -> Iterator[Launched]:
    """A kernel by display name (KERNELS), ready; `env` is added to the kernel's environment."""
    ctx = zmq.Context()
    # Default reconnect interval (100 ms) would quantize launch times if we connect first.
    ctx.setsockopt(zmq.RECONNECT_IVL, 10)
    for opt, val in (sockopts or {}).items():
        # Context-level options apply to the client's sockets as they are created, i.e. before
        # they connect, which is when HWM options must be set to take effect.
        ctx.setsockopt(opt, val)
    # The manager's own control socket (a restart's shutdown_request) too: it connects as the
    # kernel is launched, before it listens, and retries at the reconnect interval.
    km = KernelManager(kernel_name=KERNELS[kernel], context=ctx)
    t_start = time.perf_counter()
    # xeus-python writes a banner, a line per cell (raw) and backtraces: keep them off ours.
    xeus = kernel in (XPYTHON, XPYTHON_RAW)
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if xeus else {}
    km.start_kernel(env={**os.environ, **(env or {})}, **quiet)
    kc = km.client(context=ctx)
    try:
        kc.start_channels(hb=False)
        pump = Pump(kc)
        t_info, t_ready = wait_ready(km, kc, pump)
        yield Launched(km, kc, pump, t_start, t_info, t_ready)
    finally:
        kc.stop_channels()
        try:
            km.shutdown_kernel(now=False)
        except Exception:  # noqa: BLE001  (any failure: still make sure the kernel dies)
            km.shutdown_kernel(now=True)
        ctx.destroy(linger=0)


# --- cells -------------------------------------------------------------------------------------


@dataclass
class Cell:
    msg_id: str
    t_sent: float
    reply: Msg | None = None
    t_reply: float = 0.0
    t_idle: float = 0.0
    iopub: list[Msg] = field(default_factory=list)
    t_first: dict[str, float] = field(default_factory=dict)  # msg_type -> first arrival

    @property
    def done(self) -> bool:
        return self.reply is not None and self.t_idle > 0

    @property
    def t_done(self) -> float:
        return max(self.t_reply, self.t_idle)

    def result_text(self) -> str | None:
        for m in self.iopub:
            if m["msg_type"] == "execute_result":
                return str(m["content"]["data"].get("text/plain"))
        return None

    def stdout(self) -> str:
        return "".join(
            m["content"]["text"]
            for m in self.iopub
            if m["msg_type"] == "stream" and m["content"]["name"] == "stdout"
        )


def run_cells(
    k: Launched, codes: list[str], timeout: float, quiet_after: float = 0.0
) -> list[Cell]:
    """Send every cell without waiting, then collect replies and iopub through each idle.
    quiet_after > 0: once all replies are in, give up on missing idles after that many seconds
    without iopub traffic (the idle itself may have been dropped at a high-water mark)."""
    cells: dict[str, Cell] = {}
    pending = 0
    last_iopub = time.perf_counter()

    def take(batch: list[tuple[str, Msg]]) -> None:
        nonlocal pending, last_iopub
        t = time.perf_counter()
        for chan, msg in batch:
            cell = cells.get(parent_id(msg))
            if cell is None or chan == "control":
                continue
            was_done = cell.done
            if chan == "shell":
                cell.reply, cell.t_reply = msg, t
            else:
                last_iopub = t
                cell.iopub.append(msg)
                cell.t_first.setdefault(msg["msg_type"], t)
                if is_idle(msg):
                    cell.t_idle = t
            if cell.done and not was_done:
                pending -= 1

    order: list[Cell] = []
    for code in codes:
        t = time.perf_counter()
        msg_id = k.kc.execute(code)
        cells[msg_id] = cell = Cell(msg_id, t)
        order.append(cell)
        pending += 1
        # Drain while sending, so iopub cannot overflow before we start reading.
        take(k.pump.wait(0))
    deadline = time.perf_counter() + timeout
    while pending:
        now = time.perf_counter()
        if now > deadline:
            raise TimeoutError(f"{pending} of {len(order)} cells unfinished after {timeout:.0f}s")
        all_replied = all(c.reply is not None for c in order)
        if quiet_after and all_replied and now - last_iopub > quiet_after:
            break
        take(k.pump.wait(min(deadline, now + 0.5)))
    return order


def run_ok(k: Launched, *codes: str, timeout: float = 60) -> list[Cell]:
    """run_cells, then every reply must be ok."""
    cells = run_cells(k, list(codes), timeout=timeout)
    check_ok(cells)
    return cells


def wait_for(k: Launched, pred: Callable[[str, Msg], bool], timeout: float) -> tuple[Msg, float]:
    """The first (channel, message) matching pred, and when it arrived; for probes that time an
    event rather than a cell (an interrupt's KeyboardInterrupt, a restart's kernel_info)."""
    deadline = time.perf_counter() + timeout
    while time.perf_counter() < deadline:
        for chan, msg in k.pump.wait(deadline):
            if pred(chan, msg):
                return msg, time.perf_counter()
    raise TimeoutError(f"event not seen in {timeout:.0f}s")


def check_ok(cells: list[Cell]) -> None:
    bad = [c.reply["content"] for c in cells if c.reply and c.reply["content"]["status"] != "ok"]
    if bad:
        first = bad[0]
        why = f"{first.get('ename', first['status'])}: {first.get('evalue', '')}"
        raise RuntimeError(f"{len(bad)} of {len(cells)} cells failed, first {why}"[:120])


def exit_status(k: Launched) -> str:
    """How the kernel process ended: "exit N" or "killed by SIGNAME"."""
    proc = k.km.provisioner.process if k.km.provisioner else None
    code = proc.poll() if proc is not None else None
    if code is None:
        return "still running"
    if code < 0:
        return f"killed by {signal.Signals(-code).name}"
    return f"exit {code}"


def wait_reply_or_death(k: Launched, cell: Cell, timeout: float) -> bool:
    """Collect the cell until its reply and idle; False if the kernel process died first."""
    deadline = time.perf_counter() + timeout
    while not cell.done:
        if not k.km.is_alive():
            return False
        if time.perf_counter() > deadline:
            raise TimeoutError("neither a reply nor a death")
        for chan, msg in k.pump.wait(min(deadline, time.perf_counter() + 0.05)):
            if parent_id(msg) != cell.msg_id:
                continue
            if chan == "shell":
                cell.reply, cell.t_reply = msg, time.perf_counter()
            elif chan == "iopub":
                cell.iopub.append(msg)
                cell.t_first.setdefault(msg["msg_type"], time.perf_counter())
                if is_idle(msg):
                    cell.t_idle = time.perf_counter()
    return True


def send_cell(k: Launched, code: str) -> Cell:
    return Cell(k.kc.execute(code), time.perf_counter())


def wait_started(k: Launched, cell: Cell, timeout: float = 30) -> None:
    """Until the cell's execute_input came back (it is running, or about to)."""
    wait_for(
        k,
        lambda chan, m: m["msg_type"] == "execute_input" and parent_id(m) == cell.msg_id,
        timeout,
    )


def first_result_after(k: Launched, t0: float, code: str = "1+1") -> tuple[float, Cell]:
    """ms from t0 to the execute_result of `code` run now, and its cell."""
    [cell] = run_cells(k, [code], timeout=60)
    check_ok([cell])
    t_result = cell.t_first.get("execute_result")
    if t_result is None:
        raise RuntimeError(f"no execute_result for {code!r}")
    return ms(t_result - t0), cell


def restart_ready(k: Launched) -> None:
    """restart_kernel(now=True) (the kernel died or must die), then ready again."""
    k.km.restart_kernel(now=True)
    wait_ready(k.km, k.kc, k.pump)


# --- kernelvisor's own state -------------------------------------------------------------------


def kv_info(k: Launched, timeout: float = 10) -> Msg:
    """kernelvisor_info_reply's content: {"pool": …, "snapshot": … (builds with snapshots)}."""
    msg = k.kc.session.msg("kernelvisor_info_request", {})
    k.kc.control_channel.send(msg)
    mid = msg["header"]["msg_id"]
    reply, _ = wait_for(k, lambda chan, m: chan == "control" and parent_id(m) == mid, timeout)
    content: Msg = reply["content"]
    if content.get("status") != "ok":
        raise RuntimeError(f"kernelvisor_info_request: {content}")
    return content


def kv_wait(k: Launched, pred: Callable[[Msg], bool], what: str, timeout: float = 30) -> Msg:
    """Polls kernelvisor_info until pred holds."""
    deadline = time.perf_counter() + timeout
    while True:
        info = kv_info(k)
        if pred(info):
            return info
        if time.perf_counter() > deadline:
            raise TimeoutError(f"{what} not seen in {timeout:.0f}s")
        time.sleep(0.05)


def kv_settled(k: Launched) -> Msg:
    """kernelvisor once no worker is starting (its warm spare is up)."""
    return kv_wait(k, lambda i: not i["pool"]["starting"], "a settled pool")
