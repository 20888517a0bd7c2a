"""The client side of test_network_namespaces.py, run inside the client's network namespace:
jupyter_client's BlockingKernelClient on a connection file whose ``ip`` is the kernel's address
in the other namespace. Prints one JSON line per step; after the restart request it prints
``{"step": "restart-sent"}`` and waits for a line on stdin (the kernel's host restarted it)."""

from __future__ import annotations

import json
import sys
import time
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient

TIMEOUT = 60.0


def report(step: str, **fields: Any) -> None:
    print(json.dumps({"step": step, **fields}), flush=True)


def execute(kc: BlockingKernelClient, code: str, interrupt_after: float | None = None) -> dict:
    """Runs ``code``; returns its reply status, error and stdout. With ``interrupt_after``, sends
    an interrupt_request on control that long after the cell started (execute_input)."""
    msg_id = kc.execute(code)
    stdout = ""
    interrupted = interrupt_after is None
    deadline = time.monotonic() + TIMEOUT
    while True:
        msg = kc.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind = msg["msg_type"]
        if kind == "execute_input" and not interrupted:
            time.sleep(interrupt_after or 0)
            kc.control_channel.send(kc.session.msg("interrupt_request", {}))
            reply = kc.get_control_msg(timeout=TIMEOUT)
            assert reply["msg_type"] == "interrupt_reply", reply
            interrupted = True
        elif kind == "stream" and msg["content"]["name"] == "stdout":
            stdout += msg["content"]["text"]
        elif kind == "status" and msg["content"]["execution_state"] == "idle":
            break
    reply = kc.get_shell_msg(timeout=TIMEOUT)
    assert reply["parent_header"]["msg_id"] == msg_id
    content = reply["content"]
    return {
        "status": content["status"],
        "ename": content.get("ename"),
        "evalue": content.get("evalue"),
        "stdout": stdout,
    }


def main(connection_file: str) -> None:
    kc = BlockingKernelClient()
    kc.load_connection_file(connection_file)
    kc.start_channels()
    kc.wait_for_ready(timeout=TIMEOUT)
    report("ready", ip=kc.ip)
    report("hello", **execute(kc, "import socket\nprint('hello', 6 * 7)"))
    report("interrupt", **execute(kc, "n = 0\nwhile True:\n    n += 1", interrupt_after=1.0))
    report("after-interrupt", **execute(kc, "print(n > 0)"))
    report("crash", **execute(kc, "import ctypes\nctypes.string_at(0)"))
    report("after-crash", **execute(kc, "print('alive')"))
    kc.shutdown(restart=True)
    reply = kc.get_control_msg(timeout=TIMEOUT)
    report("restart-sent", reply=reply["msg_type"], restart=reply["content"].get("restart"))
    sys.stdin.readline()  # the kernel's host has started it again, on the same connection file
    kc.wait_for_ready(timeout=TIMEOUT)
    report("after-restart", **execute(kc, "print('n' in globals())"))
    kc.stop_channels()


if __name__ == "__main__":
    main(sys.argv[1])
