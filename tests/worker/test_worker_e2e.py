"""The worker process end to end at the IPC level (IPC.md), with a fake supervisor."""

from __future__ import annotations

import ast
import os
import signal
import time
from pathlib import Path

import pytest
from ipc_client import Exchange, WorkerProcess


def _result(ex: Exchange) -> str:
    (msg,) = ex.iopub("execute_result")
    return str(msg.content["data"]["text/plain"])


def _ok(ex: Exchange) -> None:
    assert ex.reply.op == "reply", ex.messages
    assert ex.reply.content["status"] == "ok", ex.reply.content


def test_hello(worker: WorkerProcess) -> None:
    assert worker.aux_hello.control == {
        "op": "hello",
        "role": "aux",
        "worker_id": 1,
        "pid": worker.proc.pid,
        "token": worker.token,
    }
    hello = worker.hello.control
    assert hello["op"] == "hello"
    assert hello["role"] == "main"
    assert hello["worker_id"] == 1
    assert hello["pid"] == worker.proc.pid
    assert hello["token"] == worker.token
    assert hello["language_info"]["name"] == "python"
    assert hello["language_info"]["codemirror_mode"] == {"name": "ipython", "version": 3}
    assert hello["implementation_version"] == "0.1.0"
    assert "IPython" in hello["banner"]


def test_streams_in_order_under_the_given_count(worker: WorkerProcess) -> None:
    code = "import sys\nprint('a')\nprint('b', file=sys.stderr)\nprint('c')"
    req = worker.send_request("execute_request", {"code": code})
    ex = worker.collect(req)
    _ok(ex)
    # The supervisor numbers the cell and publishes its execute_input, not the worker.
    assert ex.iopub("execute_input") == []
    assert ex.reply.content["execution_count"] == worker.counts[req]
    streams = [(m.content["name"], m.content["text"]) for m in ex.iopub("stream")]
    assert streams == [("stdout", "a\n"), ("stderr", "b\n"), ("stdout", "c\n")]
    for msg in ex.iopub():
        assert msg.parent["msg_type"] == "execute_request"
    assert {m.via for m in ex.messages} == {"main"}  # everything of a cell, in order


def test_an_execute_request_without_its_count_is_an_error(worker: WorkerProcess) -> None:
    req = worker.send_request(
        "execute_request", {"code": "x = 1"}, control_extra={"count": None, "takes_count": None}
    )
    ex = worker.collect(req)
    assert ex.reply.content["status"] == "error"
    assert ex.reply.content["ename"] == "ProtocolError"
    assert "execution count" in ex.reply.content["evalue"]
    assert worker.execute("'x' in globals()").iopub("execute_result")[0].content["data"] == {
        "text/plain": "False"
    }


def test_counts_are_the_supervisors(worker: WorkerProcess) -> None:
    """Numbers taken elsewhere (a `# process` cell's) are skipped, In and Out included;
    a cell that takes no number shows the last one."""
    worker.execute("a = 'first'")
    worker.next_count += 3  # three numbers taken by other workers
    ex = worker.execute("'jumped'")
    n = ex.reply.content["execution_count"]
    assert (
        n == worker.next_count - 1 and ex.iopub("execute_result")[0].content["execution_count"] == n
    )
    quiet = worker.execute("y = 1", store_history=False)
    assert quiet.reply.content["execution_count"] == n
    ex = worker.execute(f"len(In), In[{n}], Out[{n}], In[{n - 1}]")
    (res,) = ex.iopub("execute_result")
    assert res.content["data"]["text/plain"] == f"({n + 2}, \"'jumped'\", 'jumped', '')"


def test_reply_control_and_metadata(worker: WorkerProcess) -> None:
    ex = worker.execute("pass", stop_on_error=False)
    control = ex.reply.control
    # The reply's name and what an error aborts are the supervisor's: only id and status.
    assert set(control) == {"op", "id", "status"}, control
    assert control["status"] == "ok"
    metadata = ex.reply.metadata
    assert metadata["status"] == "ok" and metadata["dependencies_met"] is True
    assert metadata["engine"] and metadata["started"].endswith("Z")
    assert ex.reply.content["payload"] == [] and ex.reply.content["user_expressions"] == {}


def test_execute_result(worker: WorkerProcess) -> None:
    ex = worker.execute("1+1")
    _ok(ex)
    (result,) = ex.iopub("execute_result")
    assert result.content["data"] == {"text/plain": "2"}
    assert result.content["execution_count"] == ex.reply.content["execution_count"]
    assert ex.stream_text() == ""  # no Out[N] prompt
    assert worker.execute("1+1;").iopub("execute_result") == []


def test_display_update_and_clear(worker: WorkerProcess) -> None:
    ex = worker.execute(
        "from IPython.display import display, clear_output, HTML\n"
        "h = display(HTML('<b>x</b>'), display_id='d1')\n"
        "h.update('y')\n"
        "clear_output(wait=True)"
    )
    _ok(ex)
    kinds = [m.msg_type for m in ex.iopub()]
    assert kinds == ["display_data", "update_display_data", "clear_output"]
    display, update, clear = ex.iopub()
    assert display.content["data"]["text/html"] == "<b>x</b>"
    assert display.content["transient"] == {"display_id": "d1"}
    assert update.content["data"] == {"text/plain": "'y'"}
    assert clear.content == {"wait": True}


def test_output_before_display_keeps_order(worker: WorkerProcess) -> None:
    ex = worker.execute("print('before'); display('mid'); print('after')")
    kinds = [(m.msg_type, m.content.get("text")) for m in ex.iopub()]
    assert kinds == [("stream", "before\n"), ("display_data", None), ("stream", "after\n")]


def test_error(worker: WorkerProcess) -> None:
    ex = worker.execute("1/0")
    (error,) = ex.iopub("error")
    assert error.content["ename"] == "ZeroDivisionError"
    assert error.content["evalue"] == "division by zero"
    assert any("ZeroDivisionError" in line for line in error.content["traceback"])
    reply = ex.reply
    assert reply.control["status"] == "error"
    assert reply.content["status"] == "error"
    assert reply.content["ename"] == "ZeroDivisionError"
    assert reply.content["traceback"] == error.content["traceback"]
    assert reply.metadata["status"] == "error"


def test_fd_output_arrives_before_reply(worker: WorkerProcess) -> None:
    ex = worker.execute("import os\nos.write(1, b'x\\n')\nos.system('echo hi; echo err >&2')\n")
    _ok(ex)
    assert ex.stream_text("stdout") == "x\nhi\n"
    assert ex.stream_text("stderr") == "err\n"
    ex = worker.execute("!echo bang\nprint('after')")
    assert ex.stream_text("stdout") == "bang\nafter\n"


def test_lower_level_buffers_arrive_before_reply(worker: WorkerProcess) -> None:
    ex = worker.execute(
        "import ctypes, sys\n"
        "ctypes.CDLL(None).printf(b'from C')\n"  # no newline: stays in libc's buffer
        "sys.__stdout__.write('from the original stdout')"
    )
    text = ex.stream_text("stdout")
    assert "from C" in text and "from the original stdout" in text


def test_first_output_is_sent_at_once(worker: WorkerProcess) -> None:
    req = worker.send_request(
        "execute_request", {"code": "import time\nprint('early')\ntime.sleep(1)"}
    )
    start = time.perf_counter()
    msg = worker.recv()
    while msg.msg_type != "stream":
        msg = worker.recv()
    assert time.perf_counter() - start < 0.5
    assert msg.content["text"] == "early\n"
    _ok(worker.collect(req))


def test_thread_output_after_the_cell_goes_to_its_execute(worker: WorkerProcess) -> None:
    ex = worker.execute("import threading\nthreading.Timer(0.2, print, ['late']).start()")
    _ok(ex)
    msg = worker.recv()
    assert msg.msg_type == "stream" and msg.content["text"] == "late\n"
    assert msg.parent["msg_id"] == worker.msg_ids[ex.reply.control["id"]]


def test_200k_lines_exact(worker: WorkerProcess) -> None:
    start = time.perf_counter()
    ex = worker.execute("for i in range(200000): print(i)")
    elapsed = time.perf_counter() - start
    _ok(ex)
    assert ex.stream_text("stdout") == "".join(f"{i}\n" for i in range(200000))
    print(f"200k lines: {elapsed:.3f}s in {len(ex.iopub('stream'))} stream messages")
    assert elapsed < 3  # generous for slow CI; ~0.2s on a 2-core dev box


def test_sys_exit_does_not_end_worker(worker: WorkerProcess) -> None:
    ex = worker.execute("import sys; sys.exit(3)")
    assert ex.reply.content["ename"] == "SystemExit"
    _ok(worker.execute("pass"))
    assert worker.proc.poll() is None


def test_magics_and_get_ipython(worker: WorkerProcess) -> None:
    ex = worker.execute("%time x = sum(range(10))")
    _ok(ex)
    assert "Wall time" in ex.stream_text("stdout")
    ex = worker.execute("%%capture cap\nprint('hidden')")
    assert ex.stream_text() == ""
    assert _result(worker.execute("cap.stdout")) == "'hidden\\n'"
    ex = worker.execute("%%timeit -n1 -r1\npass")
    _ok(ex)
    assert "loop" in ex.stream_text("stdout")
    assert _result(worker.execute("get_ipython() is not None")) == "True"


def test_top_level_await(worker: WorkerProcess) -> None:
    ex = worker.execute("import asyncio\nawait asyncio.sleep(0.01)\n'awaited'")
    _ok(ex)
    assert _result(ex) == "'awaited'"


def test_the_worker_keeps_no_queue(worker: WorkerProcess) -> None:
    """A cell starts when the worker gets it: that queue cells wait for the one before
    them is the supervisor's doing (IPC.md "Run modes"; tests/kernel/test_concurrent_cells)."""
    _ok(worker.execute("import asyncio\norder = []"))
    first = worker.send_request(
        "execute_request", {"code": "await asyncio.sleep(0.5)\norder.append(1)"}
    )
    second = worker.send_request("execute_request", {"code": "order.append(2)"})
    replies = worker.collect_replies(first, second)
    assert [replies[i].content["status"] for i in (first, second)] == ["ok", "ok"]
    assert _result(worker.execute("order")) == "[2, 1]"


def test_top_level_async_with_and_for(worker: WorkerProcess) -> None:
    _ok(
        worker.execute(
            "import asyncio, contextlib\n"
            "@contextlib.asynccontextmanager\n"
            "async def cm():\n"
            "    await asyncio.sleep(0)\n"
            "    yield 'entered'\n"
            "async def gen():\n"
            "    for i in range(3):\n"
            "        await asyncio.sleep(0)\n"
            "        yield i"
        )
    )
    assert _result(worker.execute("async with cm() as v:\n    pass\nv")) == "'entered'"
    assert _result(worker.execute("got = []\nasync for i in gen():\n    got.append(i)\ngot")) == (
        "[0, 1, 2]"
    )
    # Top-level await inside a line magic's argument, and a string mentioning await.
    assert _result(worker.execute("x = 'await'\nx")) == "'await'"


def test_user_expressions_and_pager_payload(worker: WorkerProcess) -> None:
    ex = worker.execute("y = 20", user_expressions={"z": "y + 1", "bad": "1/0"})
    exprs = ex.reply.content["user_expressions"]
    assert exprs["z"]["data"]["text/plain"] == "21"
    assert exprs["bad"]["status"] == "error"
    ex = worker.execute("len?")
    (payload,) = ex.reply.content["payload"]
    assert payload["source"] == "page" and "text/plain" in payload["data"]


def test_sigint(worker: WorkerProcess) -> None:
    os.kill(worker.proc.pid, signal.SIGINT)  # idle: harmless
    time.sleep(0.1)
    assert worker.proc.poll() is None
    for code in ("import time\ntime.sleep(30)", "while True: pass"):
        req = worker.send_request("execute_request", {"code": code})
        time.sleep(0.3)
        os.kill(worker.proc.pid, signal.SIGINT)
        ex = worker.collect(req)
        assert ex.reply.content["ename"] == "KeyboardInterrupt"
        assert ex.iopub("error")
    _ok(worker.execute("pass"))


def test_sigint_in_async_cell(worker: WorkerProcess) -> None:
    for code in (
        "import asyncio\nawait asyncio.sleep(30)",
        "await asyncio.sleep(0)\nwhile 1: pass",
    ):
        req = worker.send_request("execute_request", {"code": code})
        time.sleep(0.3)
        os.kill(worker.proc.pid, signal.SIGINT)
        ex = worker.collect(req)
        assert ex.reply.content["status"] == "error"
        assert ex.reply.content["ename"] in ("CancelledError", "KeyboardInterrupt")
    _ok(worker.execute("await asyncio.sleep(0)"))


def test_input_without_stdin(worker: WorkerProcess) -> None:
    ex = worker.execute("input('?')", allow_stdin=False)
    assert ex.reply.content["ename"] == "StdinNotImplementedError"


def test_input_and_getpass(worker: WorkerProcess) -> None:
    req = worker.send_request(
        "execute_request",
        {
            "code": "import getpass\nprint('pre')\na = input('name? ')\nb = getpass.getpass()\n"
            "print(a, b)",
            "allow_stdin": True,
        },
    )
    seen = []
    dones = []
    for prompt, password, value in (("name? ", False, "bob"), ("Password: ", True, "pw")):
        msg = worker.recv()
        while msg.op != "stdin":
            seen.append(msg)
            msg = worker.recv()
        assert msg.control == {"op": "stdin", "id": req, "msg_type": "input_request"}
        assert msg.content == {"prompt": prompt, "password": password}
        assert msg.via == "main"  # after the cell's output, in order
        dones.append(worker.send_request("input_reply", {"value": value}, channel="stdin"))
    assert [m.content.get("text") for m in seen if m.msg_type == "stream"] == ["pre\n"]
    ex = worker.collect(req)
    _ok(ex)
    assert ex.stream_text() == "bob pw\n"
    assert ex.reply.via == "main"
    # Each input_reply is done on aux (in no particular order with main's messages).
    done = {m.control["id"]: m for m in seen + ex.messages if m.op == "done"}
    done.update(worker.collect_replies(*(d for d in dones if d not in done)))
    assert {i: (m.op, m.via) for i, m in done.items()} == {d: ("done", "aux") for d in dones}


@pytest.mark.parametrize("how", ["op", "sigint"])
def test_interrupt_while_waiting_for_input(worker: WorkerProcess, how: str) -> None:
    """The supervisor's interrupt op, and a SIGINT from outside (VS Code's)."""
    req = worker.send_request("execute_request", {"code": "input()", "allow_stdin": True})
    msg = worker.recv()
    while msg.op != "stdin":
        msg = worker.recv()
    if how == "op":
        worker.send_op("interrupt", id=req)
    else:
        os.kill(worker.proc.pid, signal.SIGINT)
    assert worker.collect(req).reply.content["ename"] == "KeyboardInterrupt"


def test_complete_is_answered_while_a_cell_runs(worker: WorkerProcess) -> None:
    req = worker.send_request("execute_request", {"code": "import time; time.sleep(2)"})
    time.sleep(0.2)
    start = time.perf_counter()
    complete = worker.send_request("complete_request", {"code": "import o", "cursor_pos": 8})
    msg = worker.recv()
    while msg.op != "reply":
        msg = worker.recv()
    assert msg.control["id"] == complete, "the execute reply came first"
    assert msg.via == "aux"
    assert time.perf_counter() - start < 1.0
    assert "os" in msg.content["matches"]
    assert msg.content["cursor_start"] == 7 and msg.content["cursor_end"] == 8
    _ok(worker.collect(req))


def test_inspect_is_complete_history(worker: WorkerProcess, ipython_dir: str) -> None:
    ex = worker.request("inspect_request", {"code": "len", "cursor_pos": 3, "detail_level": 0})
    assert ex.reply.content["found"] is True
    assert "text/plain" in ex.reply.content["data"]
    ex = worker.request("inspect_request", {"code": "no_such_name", "cursor_pos": 3})
    assert ex.reply.content["found"] is False
    for code, status in (("x = 1", "complete"), ("for i in x:", "incomplete"), ("1 +)", "invalid")):
        ex = worker.request("is_complete_request", {"code": code})
        assert ex.reply.content["status"] == status
    assert worker.request("is_complete_request", {"code": "if 1:"}).reply.content["indent"]
    worker.execute("history_marker = 1")
    ex = worker.request(
        "history_request", {"hist_access_type": "tail", "n": 2, "output": False, "raw": True}
    )
    assert ex.reply.content["history"][-1][2] == "history_marker = 1"
    # IPython < 9 mistakes a cross-thread sqlite error for corruption and moves the file.
    assert not list(Path(ipython_dir).glob("**/*corrupt*"))


def test_unknown_request(worker: WorkerProcess) -> None:
    ex = worker.request("frobnicate_request", {})
    assert ex.reply.control["status"] == "error"
    assert ex.reply.content["ename"] == "UnknownMessageType"


def test_comms(worker: WorkerProcess) -> None:
    ex = worker.execute(
        "import comm\n"
        "received = []\n"
        "c = comm.create_comm(target_name='t1', data={'a': 1}, buffers=[b'\\x00\\x01'])\n"
        "c.on_msg(lambda m: (received.append((m['content']['data'], bytes(m['buffers'][0]))),"
        " print('got it')))\n"
        "c.send({'b': 2})\n"
        "c.comm_id"
    )
    _ok(ex)
    comm_id = ast.literal_eval(_result(ex))
    opened, sent = ex.iopub("comm_open")[0], ex.iopub("comm_msg")[0]
    assert opened.content["target_name"] == "t1" and opened.content["data"] == {"a": 1}
    assert opened.frames[4:] == [b"\x00\x01"]
    assert sent.content == {"data": {"b": 2}, "comm_id": comm_id}

    info = worker.request("comm_info_request", {"target_name": "t1"}).reply.content
    assert info["comms"] == {comm_id: {"target_name": "t1"}}

    ex = worker.request("comm_msg", {"comm_id": comm_id, "data": {"x": 1}}, buffers=(b"\x05",))
    assert ex.reply.op == "done"
    (out,) = ex.iopub("stream")
    assert out.content["text"] == "got it\n"
    assert out.parent["msg_type"] == "comm_msg"
    assert _result(worker.execute("received")) == "[({'x': 1}, b'\\x05')]"

    assert worker.request("comm_close", {"comm_id": comm_id, "data": {}}).reply.op == "done"
    info = worker.request("comm_info_request", {}).reply.content
    assert comm_id not in info["comms"]


def test_comm_open_from_the_client(worker: WorkerProcess) -> None:
    _ok(
        worker.execute(
            "import comm\n"
            "def target(c, msg):\n"
            "    c.send({'echo': msg['content']['data']})\n"
            "comm.get_comm_manager().register_target('echo', target)"
        )
    )
    ex = worker.request("comm_open", {"comm_id": "abc", "target_name": "echo", "data": {"v": 7}})
    assert ex.reply.op == "done"
    (echo,) = ex.iopub("comm_msg")
    assert echo.content == {"data": {"echo": {"v": 7}}, "comm_id": "abc"}


def test_shutdown_exits_promptly(fresh_worker: WorkerProcess) -> None:
    _ok(fresh_worker.execute("print('x')"))
    start = time.perf_counter()
    assert fresh_worker.shutdown() == 0
    assert time.perf_counter() - start < 3


def test_shutdown_while_a_cell_runs(fresh_worker: WorkerProcess) -> None:
    # The main thread is busy, so it does not read main: a shutdown on aux is seen.
    fresh_worker.send_request("execute_request", {"code": "import time; time.sleep(60)"})
    time.sleep(0.2)
    start = time.perf_counter()
    assert fresh_worker.shutdown(via="aux") == 0
    assert time.perf_counter() - start < 5


def test_shutdown_on_aux_when_idle(fresh_worker: WorkerProcess) -> None:
    _ok(fresh_worker.execute("pass"))
    assert fresh_worker.shutdown(via="aux") == 0


def test_eof_ends_worker(fresh_worker: WorkerProcess) -> None:
    fresh_worker.conn.close()  # main only
    assert fresh_worker.proc.wait(5) == 0


def test_eof_on_aux_ends_worker(fresh_worker: WorkerProcess) -> None:
    fresh_worker.aux.close()
    assert fresh_worker.proc.wait(5) == 0


def test_eof_while_a_cell_runs(fresh_worker: WorkerProcess) -> None:
    fresh_worker.send_request("execute_request", {"code": "import time; time.sleep(60)"})
    time.sleep(0.2)
    start = time.perf_counter()
    fresh_worker.close_connections()
    assert fresh_worker.proc.wait(5) == 0
    assert time.perf_counter() - start < 5


def test_protocol_error_on_main_exits_1(fresh_worker: WorkerProcess) -> None:
    fresh_worker.send_raw(bytes.fromhex("0000000400000000"))  # zero frames
    assert fresh_worker.proc.wait(5) == 1
    assert "IPC connection broken (main)" in fresh_worker.stderr()


# --- requests on the "wrong" connection are still handled where they belong -------------


def test_execute_and_comm_on_aux(worker: WorkerProcess) -> None:
    ex = worker.collect(worker.send_request("execute_request", {"code": "6*7"}, via="aux"))
    _ok(ex)
    assert _result(ex) == "42"
    assert {m.via for m in ex.messages} == {"main"}
    ex = worker.collect(worker.send_request("comm_msg", {"comm_id": "nope", "data": {}}, via="aux"))
    assert ex.reply.op == "done" and ex.reply.via == "main"


def test_aux_requests_on_main(worker: WorkerProcess) -> None:
    for msg_type, content in (
        ("complete_request", {"code": "import o", "cursor_pos": 8}),
        ("is_complete_request", {"code": "x = 1"}),
        ("comm_info_request", {}),
        ("frobnicate_request", {}),
    ):
        ex = worker.collect(worker.send_request(msg_type, content, via="main"))
        assert ex.reply.op == "reply" and ex.reply.via == "aux"
    assert (
        "os"
        in worker.request(
            "complete_request", {"code": "import o", "cursor_pos": 8}, via="main"
        ).reply.content["matches"]
    )


def test_complete_on_main_while_a_cell_runs_waits_for_it(worker: WorkerProcess) -> None:
    # Nothing reads main while a cell runs: the request is answered after the cell.
    req = worker.send_request("execute_request", {"code": "import time; time.sleep(0.5)"})
    complete = worker.send_request("is_complete_request", {"code": "x"}, via="main")
    replies = worker.collect_replies(req, complete)
    assert replies[req].content["status"] == "ok"
    assert replies[complete].content["status"] == "complete"


def test_input_reply_on_main(worker: WorkerProcess) -> None:
    # While input() waits, the main thread reads main itself.
    req = worker.send_request(
        "execute_request", {"code": "print(input('?') * 2)", "allow_stdin": True}
    )
    msg = worker.recv()
    while msg.op != "stdin":
        msg = worker.recv()
    done = worker.send_request("input_reply", {"value": "ab"}, channel="stdin", via="main")
    replies = worker.collect_replies(req, done)
    assert replies[req].content["status"] == "ok"
    assert replies[done].op == "done" and replies[done].via == "aux"
    _ok(worker.execute("pass"))


def test_comm_msg_during_input_runs_after_the_cell(worker: WorkerProcess) -> None:
    # A message read early by a waiting input() still runs on the main thread, in order.
    _ok(
        worker.execute(
            "import comm\n"
            "log = []\n"
            "def target(c, msg):\n"
            "    log.append('open')\n"
            "comm.get_comm_manager().register_target('late', target)"
        )
    )
    req = worker.send_request(
        "execute_request", {"code": "log.append(input())", "allow_stdin": True}
    )
    msg = worker.recv()
    while msg.op != "stdin":
        msg = worker.recv()
    opened = worker.send_request("comm_open", {"comm_id": "l1", "target_name": "late", "data": {}})
    time.sleep(0.2)  # the waiting input() reads it now
    answered = worker.send_request("input_reply", {"value": "answer"}, channel="stdin")
    replies = worker.collect_replies(req, opened, answered)
    assert replies[req].content["status"] == "ok"
    assert replies[opened].op == "done"
    assert _result(worker.execute("log")) == "['answer', 'open']"


def test_cells_keep_their_order_across_a_waiting_input(worker: WorkerProcess) -> None:
    # B may arrive with A (read before A runs); C arrives while A waits in input(), and
    # is read by that wait: C must still run after B.
    a = worker.send_request("execute_request", {"code": "seq = [input()]", "allow_stdin": True})
    b = worker.send_request("execute_request", {"code": "seq.append('B')"})
    msg = worker.recv()
    while msg.op != "stdin":
        msg = worker.recv()
    c = worker.send_request("execute_request", {"code": "seq.append('C')"})
    time.sleep(0.2)
    worker.send_request("input_reply", {"value": "A"}, channel="stdin")
    replies = worker.collect_replies(a, b, c)
    assert all(r.content["status"] == "ok" for r in replies.values())
    assert _result(worker.execute("seq")) == "['A', 'B', 'C']"


def test_sigint_while_input_waits_with_main_traffic(worker: WorkerProcess) -> None:
    req = worker.send_request("execute_request", {"code": "input()", "allow_stdin": True})
    msg = worker.recv()
    while msg.op != "stdin":
        msg = worker.recv()
    closed = worker.send_request("comm_close", {"comm_id": "none", "data": {}})
    time.sleep(0.1)
    os.kill(worker.proc.pid, signal.SIGINT)
    replies = worker.collect_replies(req, closed)
    assert replies[req].content["ename"] == "KeyboardInterrupt"
    assert replies[closed].op == "done"
    _ok(worker.execute("pass"))


def test_logs_go_to_original_stderr(ipython_dir: str) -> None:
    proc = WorkerProcess(env={"IPYTHONDIR": ipython_dir, "KERNELVISOR_WORKER_LOG": "debug"})
    try:
        _ok(proc.execute("print('to the client')"))
        proc.conn.close()
        proc.proc.wait(5)
        log = proc.stderr()
        assert "kernelvisor-worker[" in log
        assert "to the client" not in log
    finally:
        proc.close()
