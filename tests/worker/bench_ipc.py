"""Round-trip benchmark of the worker at the IPC level (not collected by pytest).

    python tests/worker/bench_ipc.py [-n 2000] [--repeat 3] [--code pass] [--worker-py DIR]
                                     [--cpu N]

Starts a worker against a listening socket like the fake supervisor in ipc_client.py
(accepting ``aux`` then ``main``; a worker that opens only one connection is accepted
too, so older workers can be compared with ``--worker-py``), then runs ``-n`` execute
requests one after another and prints, per request: the round trip (send to reply, as
this client sees it), the worker's CPU time (utime + stime of all its threads, from
/proc/PID/stat) and its context switches (all threads, /proc/PID/task/*/status).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import NamedTuple

WORKER_PY = Path(__file__).resolve().parents[2] / "worker_py"
sys.path.insert(0, str(WORKER_PY))

from ipc_client import worker_command
from kernelvisor.ipc import Connection

TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of all the process's threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of stat(5); fields[0] here is field 3 (state).
    return int(fields[11]) / TICKS, int(fields[12]) / TICKS


def cpu_ns(pid: int) -> int:
    """CPU time of all the process's threads in ns (schedstat: precise, unlike stat's
    clock ticks), of those alive now (the worker's threads live as long as it does)."""
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        except FileNotFoundError:
            pass
    return total


def context_switches(pid: int) -> int:
    total = 0
    for task in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{task}/status") as f:
                for line in f:
                    if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total


def ipc_version(worker_py: Path) -> int | None:
    """The IPC version of the worker package in ``worker_py`` (None: older than versions)."""
    source = (worker_py / "kernelvisor" / "ipc.py").read_text()
    found = re.search(r"^IPC_VERSION = (\d+)$", source, re.MULTILINE)
    return int(found.group(1)) if found else None


class Bench:
    def __init__(self, worker_py: Path) -> None:
        self.dir = tempfile.mkdtemp(prefix="kv-bench-")
        path = os.path.join(self.dir, "ipc.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(2)
        listener.settimeout(60)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(worker_py), env.get("PYTHONPATH")) if p)
        env["IPYTHONDIR"] = os.path.join(self.dir, "ipython")
        self.proc = subprocess.Popen(
            worker_command(path, ipc_version=ipc_version(worker_py)),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            env=env,
            cwd=self.dir,
        )
        try:
            first = self._accept(listener)
            hello = self._recv(first)
            self.aux: Connection | None = None
            if hello.get("role") == "aux":
                self.aux = first
                self.main = self._accept(listener)
                hello = self._recv(self.main)
                assert hello.get("role") == "main", hello
            else:
                self.main = first
        finally:
            listener.close()
        self.session = uuid.uuid4().hex
        self.next_id = 1

    @staticmethod
    def _accept(listener: socket.socket) -> Connection:
        sock, _ = listener.accept()
        sock.settimeout(None)
        return Connection(sock)

    @staticmethod
    def _recv(conn: Connection) -> dict[str, object]:
        control = json.loads(conn.recv()[0])
        assert isinstance(control, dict)
        return control

    def execute(self, code: str) -> None:
        req_id = self.next_id
        self.next_id += 1
        header = {
            "msg_id": uuid.uuid4().hex,
            "msg_type": "execute_request",
            "session": self.session,
            "username": "bench",
            "date": "2024-01-01T00:00:00.000000Z",
            "version": "5.3",
        }
        control = {
            "op": "request",
            "id": req_id,
            "channel": "shell",
            "msg_type": "execute_request",
            "count": req_id,
            "takes_count": True,
        }
        self.main.send(
            [
                json.dumps(control).encode(),
                json.dumps(header).encode(),
                b"{}",
                b"{}",
                json.dumps({"code": code, "silent": False}).encode(),
            ]
        )
        while True:
            reply = json.loads(self.main.recv()[0])
            if reply["op"] == "reply" and reply["id"] == req_id:
                assert reply["status"] == "ok", reply
                return

    def close(self) -> None:
        self.main.send([b'{"op":"shutdown"}'])
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.main.close()
        if self.aux is not None:
            self.aux.close()
        shutil.rmtree(self.dir, ignore_errors=True)


class Result(NamedTuple):
    times: list[float]  # round trips, seconds
    cpu: float  # worker CPU per request, seconds (schedstat)
    user: float  # the same split by clock ticks (coarse): user...
    system: float  # ...and system
    switches: float  # worker context switches per request


def run(bench: Bench, n: int, code: str) -> Result:
    pid = bench.proc.pid
    times: list[float] = []
    (user0, sys0), ns0, cs0 = cpu_seconds(pid), cpu_ns(pid), context_switches(pid)
    for _ in range(n):
        t0 = time.perf_counter()
        bench.execute(code)
        times.append(time.perf_counter() - t0)
    (user1, sys1), ns1, cs1 = cpu_seconds(pid), cpu_ns(pid), context_switches(pid)
    return Result(
        times, (ns1 - ns0) / 1e9 / n, (user1 - user0) / n, (sys1 - sys0) / n, (cs1 - cs0) / n
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--code", default="pass")
    parser.add_argument("--worker-py", type=Path, default=WORKER_PY)
    parser.add_argument(
        "--cpu",
        type=int,
        help="pin this client and the worker to one CPU (steadier numbers: no cross-CPU "
        "wake-ups, so mostly CPU cost)",
    )
    args = parser.parse_args()
    if args.cpu is not None:
        os.sched_setaffinity(0, {args.cpu})  # the worker inherits it

    bench = Bench(args.worker_py)
    try:
        pinned = "" if args.cpu is None else f", pinned to CPU {args.cpu}"
        print(f"worker {args.worker_py} ({'two' if bench.aux else 'one'} connection(s){pinned})")
        run(bench, 200, args.code)  # warm up
        for i in range(args.repeat):
            r = run(bench, args.n, args.code)
            us = [t * 1e6 for t in r.times]
            print(
                f"run {i + 1}: {args.n} x {args.code!r}: "
                f"mean {statistics.fmean(us):.0f} us, median {statistics.median(us):.0f} us, "
                f"p99 {sorted(us)[int(len(us) * 0.99)]:.0f} us per round trip; "
                f"worker CPU {r.cpu * 1e6:.0f} us "
                f"(ticks: user {r.user * 1e6:.0f}, sys {r.system * 1e6:.0f}), "
                f"{r.switches:.1f} context switches per request"
            )
    finally:
        bench.close()


if __name__ == "__main__":
    main()
