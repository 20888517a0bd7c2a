"""Large binary buffers and outputs, both ways, through jupyter_client: exact bytes, in the
frames the protocol gives them (the supervisor hands large frames on without copying them:
ipc.rs `read_message` / `owned`, wire.rs `Part`, client.rs `frame_bytes`)."""

from __future__ import annotations

import hashlib

from kvharness import BOTH_KERNELS, Kernel, collect_iopub, execute, of_type, stream_text

# Larger than the supervisor's LARGE_FRAME (64 KiB) and than a Unix socket's buffer.
SIZE = 3 << 20

ECHO = """
import hashlib
import comm
def _echo_target(c, open_msg):
    @c.on_msg
    def _(msg):
        buf = bytes(msg["buffers"][0])
        c.send(
            data={"n": len(buf), "sha": hashlib.sha256(buf).hexdigest()},
            buffers=[buf[::-1], b"small", buf],
        )
comm.get_comm_manager().register_target("kv-echo", _echo_target)
"""


def payload() -> bytes:
    return bytes(range(256)) * (SIZE // 256) + b"tail"


@BOTH_KERNELS
def test_large_comm_buffers_both_ways(kernel: Kernel) -> None:
    kc = kernel.kc
    reply, _ = execute(kc, ECHO)
    assert reply["content"]["status"] == "ok"
    comm_id = "kv-echo-1"
    opened = kc.session.msg("comm_open", {"comm_id": comm_id, "target_name": "kv-echo", "data": {}})
    kc.shell_channel.send(opened)
    collect_iopub(kc, opened["header"]["msg_id"])
    buf = payload()
    msg = kc.session.msg("comm_msg", {"comm_id": comm_id, "data": {}})
    kc.session.send(kc.shell_channel.socket, msg, buffers=[buf])
    [echo] = of_type(collect_iopub(kc, msg["header"]["msg_id"]), "comm_msg")
    assert echo["content"]["data"] == {"n": len(buf), "sha": hashlib.sha256(buf).hexdigest()}
    got = [bytes(b) for b in echo["buffers"]]
    assert got == [buf[::-1], b"small", buf]


@BOTH_KERNELS
def test_large_display_and_print_arrive_whole(kernel: Kernel) -> None:
    code = (
        "from IPython.display import display\n"
        f"blob = 'ab' * {SIZE // 2}\n"
        "display({'text/plain': blob}, raw=True)\n"
        f"print('xy' * {SIZE // 2}, end='')"
    )
    reply, iopub = execute(kernel.kc, code)
    assert reply["content"]["status"] == "ok"
    [shown] = of_type(iopub, "display_data")
    assert shown["content"]["data"]["text/plain"] == "ab" * (SIZE // 2)
    assert stream_text(iopub) == "xy" * (SIZE // 2)
