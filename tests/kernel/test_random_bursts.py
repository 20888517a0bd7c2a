"""Random bursts of cells (seeded): quick cells and errors, output, crashes, `%undo`, silent,
unstored and `# process` cells, interrupts at random moments, `stop_on_error` either way.
Whatever the timing, every request is answered once and framed by one busy and one idle,
numbers follow the order of queue cells, an interrupt reaches only cells that had started
when the kernel answered it, and an error (with `stop_on_error`) aborts the
cells queued behind it and nothing else. This is where cells sent ahead, crash recovery and
the queue meet. Runs of it (more seeds than these) found three bugs, each with its own
test in test_snapshots.py: `%undo` aborted the cells queued behind it; `await` failed in a
restored worker; and a crash or `%undo` answered its cells with the number of whatever
cell had started last."""

from __future__ import annotations

import random
import time
from datetime import datetime
from typing import Any

import pytest
from isolation_support import describe, kv_kernel
from kvharness import collect_requests, execute, get_reply, result_text

CELLS: list[tuple[str, dict[str, Any], int]] = [
    # (code, execute options, weight)
    ("pass", {}, 20),
    ("x = {n}", {}, 15),
    ("1/0", {}, 4),
    ("import time; time.sleep(0.03)", {}, 5),
    ("import time; time.sleep(0.002)", {}, 5),
    ("print('o' * 50)", {}, 6),
    ("x", {}, 6),
    ("import os; os._exit(3)", {}, 3),
    ("pass", {"silent": True}, 3),
    ("7", {"store_history": False}, 3),
    ("import time; time.sleep(0.2)", {}, 3),
    ("%undo", {}, 2),
    ("# process\n6*7", {}, 1),
    ("import asyncio\nawait asyncio.sleep(0.002)", {}, 3),
    ("# task\nimport asyncio\nawait asyncio.sleep(0.01)\n6", {}, 2),
]


def queue_cell(code: str, options: dict[str, Any]) -> bool:
    """A cell of the main queue (silent cells run as tasks, `# process` ones elsewhere)."""
    return not options.get("silent") and not code.startswith(("# process", "# task"))


def check_burst(
    sent: list[tuple[str, str, dict[str, Any]]],
    done: dict,  # type: ignore[type-arg]
    stop: bool,
    interrupted_at: datetime | None,
) -> None:
    # An error stops the queue for the cells already there. Cells the client sent after the
    # error's reply was out run, as with ipykernel (its stop_on_error_timeout is 0): a run of
    # aborted cells follows an error, never a cell that ran after it.
    stopped = False
    last_count = 0
    burst = [(code, done[m]["reply"]["status"]) for m, code, _ in sent]
    for msg_id, code, options in sent:
        reply, iopub = done[msg_id]["reply"], done[msg_id]["iopub"]
        status = reply["status"]
        where = f"{(code, options, status, describe(iopub))} in the burst {burst}"
        assert status in ("ok", "error", "aborted"), where
        if status == "aborted":
            assert stop and stopped, ("aborted with no error before it", where)
            continue
        states = [m["content"]["execution_state"] for m in iopub if m["msg_type"] == "status"]
        assert states == ["busy", "idle"], where
        assert iopub[0]["msg_type"] == "status" and iopub[-1]["msg_type"] == "status", where
        if reply.get("ename") == "KeyboardInterrupt":
            # An interrupt is for the cells that had started (their busy was out) when the
            # kernel answered it: never one that started after.
            assert interrupted_at is not None, where
            assert iopub[0]["header"]["date"] <= interrupted_at, (interrupted_at, where)
        inputs = [
            m["content"]["execution_count"] for m in iopub if m["msg_type"] == "execute_input"
        ]
        assert len(inputs) == (0 if options.get("silent") else 1), where
        if queue_cell(code, options) and "store_history" not in options:
            # Queue cells start in the order sent, so take increasing numbers.
            assert reply["execution_count"] == inputs[0] > last_count, (last_count, where)
            last_count = inputs[0]
        crashed = reply.get("ename") == "WorkerCrashed"  # ends whatever ran, silent or not
        if queue_cell(code, options) or crashed:
            stopped = status == "error"


@pytest.mark.parametrize("seed", [1, 2, 7, 10])
def test_random_bursts_answer_everything_in_order(seed: int) -> None:
    rng = random.Random(seed)
    with kv_kernel() as k:
        kc = k.kc
        for _ in range(12):
            stop = rng.random() < 0.7
            sent = []
            for _ in range(rng.randint(1, 20)):
                code, options, _w = rng.choices(CELLS, [w for _, _, w in CELLS])[0]
                code = code.format(n=rng.randint(0, 999))
                sent.append((kc.execute(code, stop_on_error=stop, **options), code, options))
            interrupt = None
            if rng.random() < 0.4:
                time.sleep(rng.random() * 0.05)
                interrupt = kc.session.msg("interrupt_request", {})
                kc.control_channel.send(interrupt)
            done = collect_requests(kc, [msg_id for msg_id, _, _ in sent])
            interrupted_at = None
            if interrupt is not None:
                reply = get_reply(kc, interrupt["header"]["msg_id"], channel="control")
                interrupted_at = reply["header"]["date"]
            check_burst(sent, done, stop, interrupted_at)
        # And the kernel goes on.
        _reply, iopub = execute(kc, "1+1")
        assert result_text(iopub) == "2", describe(iopub)
