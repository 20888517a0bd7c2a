"""KERNELVISOR_TIMINGS (the bench's profile split): the supervisor and the worker write a
line per execute request on one clock, and the points of each cell come in causal order."""

from __future__ import annotations

import os
from pathlib import Path

from kvharness import execute, running_kernel


def test_timestamps_of_each_cell_are_in_causal_order(tmp_path: Path) -> None:
    env = {**os.environ, "KERNELVISOR_TIMINGS": str(tmp_path)}
    msg_ids = []
    with running_kernel("kernelvisor", env=env) as k:
        for code in ("pass", "x = 1", "x + 1"):
            reply, _ = execute(k.kc, code)
            assert reply["content"]["status"] == "ok"
            msg_ids.append(reply["parent_header"]["msg_id"])
    sup = [line.split("\t") for line in (tmp_path / "supervisor.tsv").read_text().splitlines()]
    execs = {f[2]: (f[1], int(f[3]), int(f[4])) for f in sup if f[0] == "exec"}
    replies = {f[1]: (int(f[2]), int(f[3])) for f in sup if f[0] == "reply"}
    cells = {}
    for worker in tmp_path.glob("worker-*.tsv"):
        for line in worker.read_text().splitlines():
            f = line.split("\t")
            cells[f[1]] = [int(t) for t in f[2:]]
    for msg_id in msg_ids:
        sid, received, sent = execs[msg_id]
        heard, out = replies[sid]
        w_in, ipy0, ipy1, reply0, w_out = cells[sid]
        # Received, handed to the worker, run, replied, heard, sent on: one clock, in order.
        assert received <= sent < w_in <= ipy0 < ipy1 <= reply0 < w_out, cells[sid]
        assert reply0 <= heard <= out
