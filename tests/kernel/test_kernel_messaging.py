"""Shell/iopub/stdin/control message behaviour of a running kernel, through jupyter_client."""

from __future__ import annotations

import platform

from kvharness import (
    BOTH_KERNELS,
    Kernel,
    both_kernels,
    collect_iopub,
    execute,
    get_replies,
    get_reply,
    of_type,
    result_text,
    statuses,
    stream_chunks,
    stream_text,
)


def check_kernel_info(content: dict) -> None:
    assert content["status"] == "ok"
    assert content["protocol_version"] in ("5.4", "5.5")
    assert content["implementation"] == "kernelvisor"
    assert isinstance(content["implementation_version"], str) and content["implementation_version"]
    assert isinstance(content["banner"], str)
    info = content["language_info"]
    assert info["name"] == "python"
    # The kernelspec names this interpreter (sys.executable) as the worker's python.
    assert info["version"] == platform.python_version()
    assert info["file_extension"] == ".py"
    assert info["mimetype"] == "text/x-python"


def test_kernel_info_reply(kernel: Kernel) -> None:
    kc = kernel.kc
    msg_id = kc.kernel_info()
    reply = get_reply(kc, msg_id)
    assert reply["msg_type"] == "kernel_info_reply"
    assert reply["header"]["version"].startswith("5.")
    check_kernel_info(reply["content"])
    assert statuses(collect_iopub(kc, msg_id)) == ["busy", "idle"]


def test_kernel_info_on_control(kernel: Kernel) -> None:
    kc = kernel.kc
    msg = kc.session.msg("kernel_info_request")
    kc.control_channel.send(msg)
    reply = get_reply(kc, msg["header"]["msg_id"], channel="control")
    assert reply["msg_type"] == "kernel_info_reply"
    check_kernel_info(reply["content"])


@BOTH_KERNELS
def test_execute_result_and_count(kernel: Kernel) -> None:
    cells = [("1+1", "2"), ("x = 21", None), ("x * 2", "42")]
    for count, (code, expected) in enumerate(cells, start=1):
        reply, iopub = execute(kernel.kc, code)
        assert reply["content"]["status"] == "ok"
        assert reply["content"]["execution_count"] == count
        assert statuses(iopub) == ["busy", "idle"]
        [inp] = of_type(iopub, "execute_input")
        assert inp["content"] == {"code": code, "execution_count": count}
        assert result_text(iopub) == expected
        if expected is not None:
            assert of_type(iopub, "execute_result")[0]["content"]["execution_count"] == count


@BOTH_KERNELS
def test_iopub_order_busy_input_idle(kernel: Kernel) -> None:
    _, iopub = execute(kernel.kc, "1+1")
    types = [m["msg_type"] for m in iopub]
    assert types == ["status", "execute_input", "execute_result", "status"]


@both_kernels(ipykernel_differs="ipykernel buffers stdout and stderr apart and reorders them")
def test_stdout_stderr_order(kernel: Kernel) -> None:
    code = 'print("a")\nimport sys\nprint("b", file=sys.stderr)\nprint("c")'
    reply, iopub = execute(kernel.kc, code)
    assert reply["content"]["status"] == "ok"
    assert stream_chunks(iopub) == [("stdout", "a\n"), ("stderr", "b\n"), ("stdout", "c\n")]


@BOTH_KERNELS
def test_display_data_in_order(kernel: Kernel) -> None:
    code = (
        "from IPython.display import display, HTML\n"
        'print("before")\n'
        'display(HTML("<b>x</b>"))\n'
        'print("after")'
    )
    reply, iopub = execute(kernel.kc, code)
    assert reply["content"]["status"] == "ok"
    outputs = [m for m in iopub if m["msg_type"] in ("stream", "display_data")]
    assert [m["msg_type"] for m in outputs] == ["stream", "display_data", "stream"]
    assert outputs[0]["content"] == {"name": "stdout", "text": "before\n"}
    assert outputs[1]["content"]["data"]["text/html"] == "<b>x</b>"
    assert "text/plain" in outputs[1]["content"]["data"]
    assert outputs[2]["content"] == {"name": "stdout", "text": "after\n"}


@BOTH_KERNELS
def test_error_reply_and_iopub_error(kernel: Kernel) -> None:
    reply, iopub = execute(kernel.kc, "1/0")
    [err] = of_type(iopub, "error")
    assert err["content"]["ename"] == "ZeroDivisionError"
    assert err["content"]["evalue"] == "division by zero"
    tb = err["content"]["traceback"]
    assert tb and all(isinstance(line, str) for line in tb)
    content = reply["content"]
    assert content["status"] == "error"
    assert content["ename"] == "ZeroDivisionError"
    assert content["evalue"] == "division by zero"
    assert isinstance(content["traceback"], list)
    assert content["execution_count"] == 1
    assert statuses(iopub) == ["busy", "idle"]


@BOTH_KERNELS
def test_stop_on_error_aborts_queued(kernel: Kernel) -> None:
    kc = kernel.kc
    ids = [kc.execute("raise ValueError"), kc.execute("ran_b = 1"), kc.execute("ran_c = 1")]
    replies = get_replies(kc, ids)
    assert [replies[i]["content"]["status"] for i in ids] == ["error", "aborted", "aborted"]
    assert replies[ids[0]]["content"]["ename"] == "ValueError"
    reply, iopub = execute(kc, "'ran_b' in globals() or 'ran_c' in globals()")
    assert reply["content"]["status"] == "ok"
    assert result_text(iopub) == "False"


@BOTH_KERNELS
def test_no_stop_on_error_runs_queued(kernel: Kernel) -> None:
    kc = kernel.kc
    ids = [kc.execute("raise ValueError", stop_on_error=False), kc.execute("1"), kc.execute("2")]
    replies = get_replies(kc, ids)
    assert [replies[i]["content"]["status"] for i in ids] == ["error", "ok", "ok"]
    results = [result_text(collect_iopub(kc, i)) for i in ids]
    assert results == [None, "1", "2"]


def test_fd_level_output(kernel: Kernel) -> None:
    # Output that bypasses sys.stdout (C extensions, subprocesses) must still reach the client,
    # and before the cell's idle.
    code = 'import os\nos.write(1, b"fd\\n")\nos.write(2, b"fd2\\n")\nos.system("echo sys")'
    reply, iopub = execute(kernel.kc, code)
    assert reply["content"]["status"] == "ok"
    out = stream_text(iopub, "stdout")
    assert "fd\n" in out
    assert "sys\n" in out
    assert "fd2\n" in stream_text(iopub, "stderr")


def test_unknown_message_type_gets_error_reply(kernel: Kernel) -> None:
    kc = kernel.kc
    msg = kc.session.msg("foo_request", {})
    kc.shell_channel.send(msg)
    reply = get_reply(kc, msg["header"]["msg_id"])
    assert reply["msg_type"] == "foo_reply"
    assert reply["content"]["status"] == "error"
    reply, iopub = execute(kc, "1+1")
    assert result_text(iopub) == "2"


@BOTH_KERNELS
def test_input_roundtrip(kernel: Kernel) -> None:
    kc = kernel.kc
    msg_id = kc.execute('x = input("q? ")', allow_stdin=True)
    req = kc.get_stdin_msg(timeout=30)
    assert req["msg_type"] == "input_request"
    assert req["parent_header"]["msg_id"] == msg_id
    assert req["content"] == {"prompt": "q? ", "password": False}
    kc.input("hello there")
    assert get_reply(kc, msg_id)["content"]["status"] == "ok"
    collect_iopub(kc, msg_id)
    _, iopub = execute(kc, "x")
    assert result_text(iopub) == "'hello there'"


@BOTH_KERNELS
def test_getpass_requests_password(kernel: Kernel) -> None:
    kc = kernel.kc
    msg_id = kc.execute('import getpass\npw = getpass.getpass("pw: ")', allow_stdin=True)
    req = kc.get_stdin_msg(timeout=30)
    assert req["content"] == {"prompt": "pw: ", "password": True}
    kc.input("s3cret")
    assert get_reply(kc, msg_id)["content"]["status"] == "ok"
    _, iopub = execute(kc, "pw")
    assert result_text(iopub) == "'s3cret'"


@BOTH_KERNELS
def test_input_without_stdin_raises(kernel: Kernel) -> None:
    reply, iopub = execute(kernel.kc, "input()", allow_stdin=False)
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "StdinNotImplementedError"
    assert of_type(iopub, "error")[0]["content"]["ename"] == "StdinNotImplementedError"
