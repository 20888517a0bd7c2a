"""Subshells (JEP 91): created, listed and deleted over control; each runs its cells in order,
beside the main shell's, in the one namespace."""

from __future__ import annotations

from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from kvharness import (
    TIMEOUT,
    Msg,
    collect_iopub,
    execute,
    get_replies,
    get_reply,
    iopub_until,
    of_type,
    result_text,
    running_kernel,
    send_execute,
    statuses,
    stream_text,
)

UNKNOWN = "UnknownSubshellError"


def control(kc: BlockingKernelClient, msg_type: str, **content: Any) -> Msg:
    """Sends a control request and returns its reply."""
    msg = kc.session.msg(msg_type, content)
    kc.control_channel.send(msg)
    return get_reply(kc, msg["header"]["msg_id"], channel="control")


def create(kc: BlockingKernelClient) -> str:
    reply = control(kc, "create_subshell_request")
    assert reply["msg_type"] == "create_subshell_reply"
    assert reply["content"]["status"] == "ok", reply["content"]
    subshell_id = reply["content"]["subshell_id"]
    assert isinstance(subshell_id, str) and subshell_id
    return subshell_id


def listed(kc: BlockingKernelClient) -> list[str]:
    reply = control(kc, "list_subshell_request")
    assert reply["msg_type"] == "list_subshell_reply"
    assert reply["content"]["status"] == "ok", reply["content"]
    ids: list[str] = reply["content"]["subshell_id"]
    return ids


def started(kc: BlockingKernelClient, msg_id: str) -> None:
    """Waits until the cell has printed something (so it is running)."""
    iopub_until(kc, msg_id, lambda m: m["msg_type"] == "stream", [])


def sync_shell(kc: BlockingKernelClient) -> None:
    """Returns once the kernel has read every shell message sent before (it answers
    kernel_info itself, in order with the shell messages it reads)."""
    msg = kc.session.msg("kernel_info_request", {})
    kc.shell_channel.send(msg)
    get_reply(kc, msg["header"]["msg_id"])


def test_kernel_info_advertises_subshells() -> None:
    with running_kernel("kernelvisor") as k:
        k.kc.kernel_info()
        reply = k.kc.get_shell_msg(timeout=TIMEOUT)
        assert "kernel subshells" in reply["content"]["supported_features"]


def test_create_list_delete() -> None:
    with running_kernel("kernelvisor") as k:
        assert listed(k.kc) == []
        first, second, third = create(k.kc), create(k.kc), create(k.kc)
        assert len({first, second, third}) == 3
        assert listed(k.kc) == [first, second, third], "creation order"
        reply = control(k.kc, "delete_subshell_request", subshell_id=second)
        assert reply["msg_type"] == "delete_subshell_reply"
        assert reply["content"]["status"] == "ok", reply["content"]
        assert listed(k.kc) == [first, third]
        again = control(k.kc, "delete_subshell_request", subshell_id=second)["content"]
        assert again["status"] == "error" and again["ename"] == UNKNOWN, again
        assert listed(k.kc) == [first, third]


def test_a_subshell_runs_beside_a_blocking_main_cell() -> None:
    with running_kernel("kernelvisor") as k:
        execute(k.kc, "x = 42")
        sub = create(k.kc)
        main = send_execute(k.kc, "import time\nprint('main start', flush=True)\ntime.sleep(3)")
        started(k.kc, main)
        side = send_execute(
            k.kc, "print(x)\nimport threading\nthreading.current_thread().name", subshell_id=sub
        )
        reply = k.kc.get_shell_msg(timeout=TIMEOUT)
        # The subshell's cell answers while the main cell still sleeps.
        assert reply["parent_header"]["msg_id"] == side, reply
        assert reply["content"]["status"] == "ok", reply["content"]
        side_iopub = collect_iopub(k.kc, side)
        assert stream_text(side_iopub) == "42\n", "it sees the main namespace"
        thread = result_text(side_iopub)
        assert thread is not None and thread != "'MainThread'", "it ran in another thread"
        main_reply = get_reply(k.kc, main)
        assert main_reply["content"]["status"] == "ok", main_reply["content"]


def test_a_subshell_runs_its_cells_in_order() -> None:
    with running_kernel("kernelvisor") as k:
        sub = create(k.kc)
        ids = [
            send_execute(k.kc, "import time\ntime.sleep(0.5)\nseen = ['a']", subshell_id=sub),
            send_execute(k.kc, "seen.append('b')\nseen", subshell_id=sub),
        ]
        replies = get_replies(k.kc, ids)
        assert [replies[m]["content"]["status"] for m in ids] == ["ok", "ok"]
        assert result_text(collect_iopub(k.kc, ids[1])) == "['a', 'b']"


def test_unknown_subshell_gets_an_error_reply() -> None:
    with running_kernel("kernelvisor") as k:
        msg_id = send_execute(k.kc, "print('never')", subshell_id="no-such-subshell")
        reply = get_reply(k.kc, msg_id)
        assert reply["msg_type"] == "execute_reply"
        assert reply["content"]["status"] == "error"
        assert reply["content"]["ename"] == UNKNOWN, reply["content"]
        iopub = collect_iopub(k.kc, msg_id)
        assert statuses(iopub) == ["busy", "idle"]
        assert not of_type(iopub, "stream")
        assert result_text(execute(k.kc, "1 + 1")[1]) == "2"


def test_deleting_a_subshell_aborts_its_queued_cells() -> None:
    with running_kernel("kernelvisor") as k:
        sub = create(k.kc)
        running = send_execute(
            k.kc, "import time\nprint('start', flush=True)\ntime.sleep(1.5)", subshell_id=sub
        )
        started(k.kc, running)
        queued = send_execute(k.kc, "print('never')", subshell_id=sub)
        sync_shell(k.kc)  # the queued cell has reached the kernel
        reply = control(k.kc, "delete_subshell_request", subshell_id=sub)
        assert reply["content"]["status"] == "ok", reply["content"]
        replies = get_replies(k.kc, [running, queued])
        assert replies[queued]["content"]["status"] == "aborted"
        assert replies[running]["content"]["status"] == "ok", "the running cell finishes"
        assert "never" not in stream_text(collect_iopub(k.kc, queued))
        late = get_reply(k.kc, send_execute(k.kc, "1", subshell_id=sub))
        assert late["content"]["ename"] == UNKNOWN


def test_subshells_survive_a_worker_crash() -> None:
    with running_kernel("kernelvisor") as k:
        sub = create(k.kc)
        crash = send_execute(k.kc, "import os\nos._exit(3)")
        assert get_reply(k.kc, crash)["content"]["ename"] == "WorkerCrashed"
        assert listed(k.kc) == [sub]
        msg_id = send_execute(k.kc, "21 * 2", subshell_id=sub)
        reply = get_reply(k.kc, msg_id)
        assert reply["content"]["status"] == "ok", reply["content"]
        assert result_text(collect_iopub(k.kc, msg_id)) == "42"


def test_an_interrupt_reaches_a_subshell_cell() -> None:
    with running_kernel("kernelvisor") as k:
        sub = create(k.kc)
        looping = (
            "import time\nprint('start', flush=True)\nfor _ in range(600):\n    time.sleep(0.05)"
        )
        msg_id = send_execute(k.kc, looping, subshell_id=sub)
        started(k.kc, msg_id)
        k.km.interrupt_kernel()
        reply = get_reply(k.kc, msg_id)["content"]
        assert reply["status"] == "error"
        assert reply["ename"] == "KeyboardInterrupt", reply
        again = send_execute(k.kc, "'still here'", subshell_id=sub)
        assert get_reply(k.kc, again)["content"]["status"] == "ok"
        assert result_text(collect_iopub(k.kc, again)) == "'still here'"
