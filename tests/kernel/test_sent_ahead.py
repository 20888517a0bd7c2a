"""Cells sent ahead (IPC.md "Cells sent ahead", src/kernel/ahead.rs): while a queue cell
runs, the next one is already in the worker, which starts it right after the reply. For a
client nothing may change: order, counts, aborts after an error, and a crash's answers."""

from __future__ import annotations

from typing import Any

from kvharness import (
    TIMEOUT,
    collect_requests,
    get_reply,
    result_text,
    running_kernel,
    send_execute,
    statuses,
)

SLOW = "import time\ntime.sleep(0.3)\n"


def sent_ahead(kc: Any) -> int:
    msg = kc.session.msg("kernelvisor_info_request", {})
    kc.control_channel.send(msg)
    reply = get_reply(kc, msg["header"]["msg_id"], TIMEOUT, channel="control")
    return int(reply["content"]["sent_ahead"])


def inputs(cell: dict[str, Any]) -> list[int]:
    return [
        m["content"]["execution_count"] for m in cell["iopub"] if m["msg_type"] == "execute_input"
    ]


def test_a_burst_keeps_its_order_and_counts() -> None:
    with running_kernel("kernelvisor") as k:
        before = sent_ahead(k.kc)
        ids = [send_execute(k.kc, "n = 0")]
        ids += [send_execute(k.kc, "n += 1; n") for _ in range(200)]
        cells = collect_requests(k.kc, ids)
        for i, msg_id in enumerate(ids):
            cell = cells[msg_id]
            assert cell["reply"]["status"] == "ok"
            assert cell["reply"]["execution_count"] == i + 1
            assert inputs(cell) == [i + 1]
            assert statuses(cell["iopub"]) == ["busy", "idle"]
            kinds = [m["msg_type"] for m in cell["iopub"]]
            assert kinds.index("execute_input") == 1, kinds  # right after busy
            if i:
                assert result_text(cell["iopub"]) == str(i)
        # Most of the burst went ahead (a snapshot every 100 ms keeps some back).
        assert sent_ahead(k.kc) - before > 100


def test_an_error_drops_the_cell_sent_ahead_and_its_number() -> None:
    with running_kernel("kernelvisor") as k:
        failing = send_execute(k.kc, SLOW + "raise ValueError('expected')")
        dropped = send_execute(k.kc, "x = 1")
        after = send_execute(k.kc, "x = 2")
        cells = collect_requests(k.kc, [failing, dropped, after])
        assert cells[failing]["reply"]["status"] == "error"
        assert cells[dropped]["reply"]["status"] == "aborted"
        assert cells[after]["reply"]["status"] == "aborted"
        assert inputs(cells[dropped]) == []  # never started
        assert sent_ahead(k.kc) >= 1
        check = send_execute(k.kc, "'x' in globals()")
        cell = collect_requests(k.kc, [check])[check]
        assert result_text(cell["iopub"]) == "False", "the dropped cell ran"
        # The aborted cells took no number.
        assert cell["reply"]["execution_count"] == cells[failing]["reply"]["execution_count"] + 1


def test_an_error_that_does_not_stop_the_queue_lets_it_run() -> None:
    with running_kernel("kernelvisor") as k:
        failing = send_execute(k.kc, SLOW + "raise ValueError('expected')", stop_on_error=False)
        runs = send_execute(k.kc, "'ran'")
        cells = collect_requests(k.kc, [failing, runs])
        assert cells[runs]["reply"]["status"] == "ok"
        assert result_text(cells[runs]["iopub"]) == "'ran'"
        count = cells[failing]["reply"]["execution_count"]
        assert cells[runs]["reply"]["execution_count"] == inputs(cells[runs])[0] == count + 1


def test_a_crash_gives_the_cell_sent_ahead_back() -> None:
    """It did not start in the dead worker: it runs in the restored one, under the number
    it was given, and is answered once."""
    with running_kernel("kernelvisor") as k:
        collect_requests(k.kc, [send_execute(k.kc, "a = 5")])
        crash = send_execute(k.kc, SLOW + "import ctypes\nctypes.string_at(0)", stop_on_error=False)
        later = send_execute(k.kc, "a += 1; a")
        cells = collect_requests(k.kc, [crash, later])
        assert cells[crash]["reply"]["status"] == "error"
        assert cells[later]["reply"]["status"] == "ok"
        assert result_text(cells[later]["iopub"]) == "6", "the namespace was restored"
        assert inputs(cells[later]) == [cells[crash]["reply"]["execution_count"] + 1]
        assert statuses(cells[later]["iopub"]) == ["busy", "idle"]


def test_a_long_cell_still_gets_its_snapshot_before_the_cell_sent_ahead() -> None:
    """The worker holds the cell sent ahead after a long cell until the supervisor has
    taken the snapshot due then: a crash in it restores the long cell's state."""
    with running_kernel("kernelvisor") as k:
        before = sent_ahead(k.kc)
        # Sent at once. The long cell is tagged `snapshot`: its snapshot is asked for as it
        # starts, and while one is on its way no burst snapshot is due, so the crashing cell
        # is sent ahead (the only one: a tagged cell is not) however slow the machine is;
        # only the long cell's end makes a snapshot due before it. Untagged, the long cell
        # let it be sent ahead only if the first cell ended within BURST_INTERVAL of the
        # snapshot before it, which a loaded machine missed (seen in CI, and 1–2 runs in 12
        # with both cores busy, before and after session 11).
        first = send_execute(k.kc, "a = 1")
        long = send_execute(k.kc, SLOW + "a = 2", tags=["snapshot"])
        crash = send_execute(k.kc, "a = 3\nimport ctypes\nctypes.string_at(0)")
        cells = collect_requests(k.kc, [first, long, crash])
        assert cells[long]["reply"]["status"] == "ok"
        assert cells[crash]["reply"]["ename"] == "WorkerCrashed"
        assert sent_ahead(k.kc) - before == 1
        check = send_execute(k.kc, "a")
        assert result_text(collect_requests(k.kc, [check])[check]["iopub"]) == "2"


def test_a_cell_released_after_a_snapshot_counts_for_the_next_one() -> None:
    """Two long cells and a crashing one, sent at once: the second waits for the snapshot
    after the first, and still counts as a change for the snapshot before the third (it was
    sent before the first snapshot was forked)."""
    with running_kernel("kernelvisor") as k:
        first = send_execute(k.kc, SLOW + "a = 1")
        second = send_execute(k.kc, SLOW + "a = 2")
        crash = send_execute(k.kc, "a = 3\nimport ctypes\nctypes.string_at(0)")
        cells = collect_requests(k.kc, [first, second, crash])
        assert cells[second]["reply"]["status"] == "ok"
        assert cells[crash]["reply"]["ename"] == "WorkerCrashed"
        check = send_execute(k.kc, "a")
        assert result_text(collect_requests(k.kc, [check])[check]["iopub"]) == "2"
