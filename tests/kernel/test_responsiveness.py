"""While a cell runs, the kernel keeps answering: the supervisor answers kernel_info, a worker
thread answers introspection, and comm messages reach their handlers while a cell awaits."""

from __future__ import annotations

import time
from typing import Any

import pytest
from kvharness import TIMEOUT, collect_iopub, execute, running_kernel, stream_text


def replies_until(kc: Any, msg_id: str) -> list[dict[str, Any]]:
    """Shell replies in arrival order, up to and including the reply to msg_id."""
    replies = []
    deadline = time.monotonic() + TIMEOUT
    while not replies or replies[-1]["parent_header"]["msg_id"] != msg_id:
        assert time.monotonic() < deadline, [r["msg_type"] for r in replies]
        replies.append(kc.get_shell_msg(timeout=TIMEOUT))
    return replies


def test_requests_are_answered_while_a_sync_cell_runs() -> None:
    with running_kernel("kernelvisor") as k:
        kc = k.kc
        execute(kc, "import time\nzebra = 1")
        cell = kc.execute("time.sleep(3)")
        time.sleep(0.3)  # the cell is running
        asked = {
            kc.kernel_info(): "kernel_info_reply",
            kc.complete("zeb", 3): "complete_reply",
            kc.inspect("zebra", 5): "inspect_reply",
            kc.is_complete("for i in x:"): "is_complete_reply",
        }
        replies = replies_until(kc, cell)
        by_parent = {r["parent_header"]["msg_id"]: r for r in replies}
        # Every one answered before the cell's reply, with its real answer.
        for msg_id, reply_type in asked.items():
            assert by_parent[msg_id]["msg_type"] == reply_type
        complete = next(r for r in replies if r["msg_type"] == "complete_reply")["content"]
        assert "zebra" in complete["matches"]
        inspect = next(r for r in replies if r["msg_type"] == "inspect_reply")["content"]
        assert inspect["found"] and "int" in inspect["data"]["text/plain"]
        is_complete = next(r for r in replies if r["msg_type"] == "is_complete_reply")["content"]
        assert is_complete["status"] == "incomplete"
        assert replies[-1]["content"]["status"] == "ok"


COMM_SETUP = """
seen = []
def target(comm, open_msg):
    @comm.on_msg
    def _(msg):
        seen.append(msg["content"]["data"]["n"])
import comm
comm.get_comm_manager().register_target("probe", target)
"""


@pytest.mark.parametrize(
    ("name", "sleep"),
    [
        ("kernelvisor", "import asyncio\nawait asyncio.sleep(2)"),
        ("kernelvisor-trio", "import trio\nawait trio.sleep(2)"),
    ],
)
def test_comm_messages_are_handled_while_a_cell_awaits(name: str, sleep: str) -> None:
    with running_kernel(name) as k:
        kc = k.kc
        execute(kc, COMM_SETUP)
        comm_id = "probe-comm"
        kc.shell_channel.send(
            kc.session.msg("comm_open", {"comm_id": comm_id, "target_name": "probe", "data": {}})
        )
        # The cell awaits, then reports what its handler saw meanwhile.
        cell = kc.execute(f"{sleep}\nprint(sorted(seen))")
        time.sleep(0.5)
        for n in (1, 2, 3):
            kc.shell_channel.send(
                kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {"n": n}})
            )
        replies_until(kc, cell)
        assert stream_text(collect_iopub(kc, cell, TIMEOUT)) == "[1, 2, 3]\n"
