"""A client that reconnects in the middle of a cell, as JupyterLab does when the page reloads
(new ZeroMQ sockets, the same session and key), sees the rest of the cell's output and its reply.

jupyter_client gives its shell, control and stdin DEALERs the session id as their identity, so
the new sockets have the old identity. Two cases: the old sockets were closed (the kernel saw
them go), and the old connection is still open as far as the kernel knows (a dropped network
path, a browser tab not yet torn down): the new connection must take the identity over.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from jupyter_client.blocking.client import BlockingKernelClient
from kvharness import (
    STARTUP_TIMEOUT,
    Kernel,
    collect_iopub,
    get_reply,
    iopub_until,
    parent_id,
    result_text,
    stream_text,
)


def paused_cell(flag: Path) -> str:
    """A cell that prints, waits until ``flag`` exists, prints again and returns a value."""
    return (
        "import os, time\n"
        "print('before', flush=True)\n"
        f"while not os.path.exists({str(flag)!r}):\n"
        "    time.sleep(0.02)\n"
        "print('after', flush=True)\n"
        "'result'\n"
    )


@pytest.mark.parametrize("old_sockets", ["closed", "still open"])
def test_a_client_that_reconnects_mid_cell_gets_the_rest(
    kernel: Kernel, tmp_path: Path, old_sockets: str
) -> None:
    flag = tmp_path / "go"
    first = kernel.kc
    msg_id = first.execute(paused_cell(flag))
    seen: list[dict] = []
    iopub_until(
        first,
        msg_id,
        lambda m: m["msg_type"] == "stream" and "before" in m["content"]["text"],
        seen,
    )
    if old_sockets == "closed":
        first.stop_channels()
    # A new client of the same kernel manager: new sockets, the same session id and key.
    second: BlockingKernelClient = kernel.km.client()
    assert second.session.session == first.session.session
    second.start_channels()
    try:
        second.wait_for_ready(timeout=STARTUP_TIMEOUT)
        flag.touch()
        reply = get_reply(second, msg_id)
        assert reply["content"]["status"] == "ok"
        rest = collect_iopub(second, msg_id)
        assert stream_text(rest) == "after\n"
        assert result_text(rest) == "'result'"
        # And the kernel goes on with the new client.
        again = second.execute("1 + 1")
        assert get_reply(second, again)["content"]["status"] == "ok"
        assert result_text(collect_iopub(second, again)) == "2"
    finally:
        second.stop_channels()
        if old_sockets == "still open":
            first.stop_channels()
    assert all(parent_id(m) == msg_id for m in seen)
