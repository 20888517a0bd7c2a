"""Execution counts are the namespace's, across crashes and `# process` cells (no second `[1]`),
and `input()` works in a `# process` cell (its answer goes to the worker that asked)."""

from __future__ import annotations

import time

from isolation_support import assert_crashed, kv_kernel
from kvharness import TIMEOUT, collect_iopub, execute, get_reply, result_text

SEGFAULT = "import ctypes; ctypes.string_at(0)"


def test_counts_continue_after_a_crash_without_a_snapshot() -> None:
    with kv_kernel(snapshots="off") as k:
        kc = k.kc
        counts = [execute(kc, f"{i}")[0]["content"]["execution_count"] for i in range(3)]
        reply, iopub = execute(kc, SEGFAULT)
        assert_crashed(reply, iopub, "SIGSEGV", restored=False)
        crashed = reply["content"]["execution_count"]
        after = execute(kc, "1")[0]["content"]["execution_count"]
        assert counts + [crashed, after] == [1, 2, 3, 4, 5], (counts, crashed, after)


def test_process_cells_share_the_numbering() -> None:
    with kv_kernel() as k:
        kc = k.kc
        execute(kc, "1")
        execute(kc, "2")
        reply, _ = execute(kc, "# process\n3")
        assert reply["content"]["execution_count"] == 3, reply["content"]
        reply, _ = execute(kc, "# process\n4")
        assert reply["content"]["execution_count"] == 4, reply["content"]
        reply, _ = execute(kc, "5")
        assert reply["content"]["execution_count"] == 5, "the main worker goes on after them"


def test_input_in_a_process_cell() -> None:
    with kv_kernel() as k:
        kc = k.kc
        msg_id = kc.execute(
            '# process\nanswer = input("q? ")\nprint("got", answer)', allow_stdin=True
        )
        request = kc.get_stdin_msg(timeout=TIMEOUT)
        assert request["msg_type"] == "input_request"
        assert request["content"]["prompt"] == "q? "
        kc.input("forty-two")
        reply = get_reply(kc, msg_id, TIMEOUT)
        assert reply["content"]["status"] == "ok", reply["content"]
        iopub = collect_iopub(kc, msg_id)
        assert "got forty-two" in "".join(
            m["content"]["text"] for m in iopub if m["msg_type"] == "stream"
        )
        # The main worker never saw it, and still works.
        time.sleep(0.1)
        assert result_text(execute(kc, "1+1")[1]) == "2"
