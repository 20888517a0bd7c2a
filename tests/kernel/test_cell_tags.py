"""Cell tags in the request metadata (where JupyterLab puts the cell's metadata):
`raises-exception` and `stop-on-error[=bool]` decide whether an error aborts the queue,
`timeout=SECONDS` interrupts a cell that runs too long."""

from __future__ import annotations

import time

import pytest
from kvharness import (
    collect_iopub,
    execute,
    get_replies,
    get_reply,
    result_text,
    running_kernel,
    send_execute,
)

# Still running when the next request arrives, so that one waits in the queue behind it.
FAILING = "import time\ntime.sleep(0.5)\nraise ValueError('expected')"


@pytest.mark.parametrize(
    ("tags", "stop_on_error", "next_status"),
    [
        ([], True, "aborted"),
        (["raises-exception"], True, "ok"),
        (["stop-on-error=false"], True, "ok"),
        (["stop-on-error"], False, "aborted"),
        (["stop-on-error=true"], False, "aborted"),
        (["raises-exception", "stop-on-error=true"], True, "aborted"),
        ([], False, "ok"),
    ],
)
def test_tags_decide_whether_an_error_aborts_the_queue(
    tags: list[str], stop_on_error: bool, next_status: str
) -> None:
    with running_kernel("kernelvisor") as k:
        failing = send_execute(k.kc, FAILING, tags=tags, stop_on_error=stop_on_error)
        following = send_execute(k.kc, "print('next ran')")
        replies = get_replies(k.kc, [failing, following])
        assert replies[failing]["content"]["status"] == "error"
        assert replies[failing]["content"]["ename"] == "ValueError"
        assert replies[following]["content"]["status"] == next_status, replies[following]
        ran = "next ran" in "".join(
            m["content"].get("text", "") for m in collect_iopub(k.kc, following)
        )
        assert ran == (next_status == "ok")


@pytest.mark.parametrize(
    "code",
    [
        "import time\ntime.sleep(30)",
        "import asyncio\nawait asyncio.sleep(30)",
    ],
    ids=["sleep", "await"],
)
def test_timeout_tag_interrupts_a_long_cell(code: str) -> None:
    with running_kernel("kernelvisor") as k:
        execute(k.kc, "x = 7")
        begun = time.monotonic()
        msg_id = send_execute(k.kc, code, tags=["timeout=1"])
        reply = get_reply(k.kc, msg_id, timeout=60)
        elapsed = time.monotonic() - begun
        # Well before the 30 s the cell would take on its own.
        assert elapsed < 20, elapsed
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == "TimeoutError", reply["content"]
        # Interrupted, not killed: the namespace is intact and the kernel works.
        assert result_text(execute(k.kc, "x * 6")[1]) == "42"


def test_timeout_tag_does_not_touch_a_quick_cell() -> None:
    with running_kernel("kernelvisor") as k:
        msg_id = send_execute(k.kc, "import time\ntime.sleep(0.2)\n'done'", tags=["timeout=5"])
        reply = get_reply(k.kc, msg_id)
        assert reply["content"]["status"] == "ok"
        assert result_text(collect_iopub(k.kc, msg_id)) == "'done'"


def test_a_cell_that_ignores_its_timeout_loses_its_worker() -> None:
    stubborn = (
        "import time\n"
        "while True:\n"
        "    try:\n"
        "        time.sleep(0.05)\n"
        "    except BaseException:\n"
        "        pass\n"
    )
    with running_kernel("kernelvisor") as k:
        msg_id = send_execute(k.kc, stubborn, tags=["timeout=1"])
        reply = get_reply(k.kc, msg_id, timeout=60)["content"]
        assert reply["status"] == "error"
        assert reply["ename"] == "WorkerCrashed", reply
        assert "timeout=1 tag" in reply["evalue"], reply["evalue"]
        assert result_text(execute(k.kc, "1 + 1")[1]) == "2"
