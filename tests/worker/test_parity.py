"""Where the worker behaves as ipykernel does: cell file names (and so tracebacks and
warnings), `!cmd` under %%capture and redirect_stdout, and the errors of input() and
getpass() without stdin."""

from __future__ import annotations

import os
import re
import stat
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from ipc_client import Exchange, WorkerProcess
from kernelvisor import compiler
from kernelvisor.compiler import CELL_HASH_SEED, cell_filename, cell_hash, dump_cell, murmur2_x86

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")

HASH_SAMPLES = [
    "",
    "a",
    "ab",
    "abc",
    "abcd",
    "abcde",
    'print("hello")\n',
    "héllo wörld ✓",  # multi-byte UTF-8, and a tail of 1 to 3 bytes
    "x = 1\n" * 1000,
    "\x00\xff\U0001f600",
]


def _ok(ex: Exchange) -> None:
    assert ex.reply.op == "reply", ex.messages
    assert ex.reply.content["status"] == "ok", ex.reply.content


def _result(ex: Exchange) -> str:
    (msg,) = ex.iopub("execute_result")
    return str(msg.content["data"]["text/plain"])


def _plain(lines: list[str]) -> list[str]:
    return [ANSI.sub("", line) for line in lines]


@pytest.fixture(scope="module")
def tmpdir_worker(
    ipython_dir: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[WorkerProcess, Path]]:
    """A worker whose temp dir (TMPDIR) is a directory of this test's own."""
    tmp = tmp_path_factory.mktemp("worker-tmp")
    proc = WorkerProcess(env={"IPYTHONDIR": ipython_dir, "TMPDIR": str(tmp)})
    try:
        yield proc, tmp
    finally:
        proc.close()


# --- cell file names --------------------------------------------------------------------------


@pytest.mark.parametrize("source", HASH_SAMPLES)
def test_hash_is_ipykernels(source: str) -> None:
    ipykernel_compiler = pytest.importorskip("ipykernel.compiler")
    expected = ipykernel_compiler.murmur2_x86(source, ipykernel_compiler.get_tmp_hash_seed())
    assert cell_hash(source) == expected
    assert murmur2_x86(source.encode(), CELL_HASH_SEED) == expected


def test_hash_vectors() -> None:
    # Computed with ipykernel.compiler.murmur2_x86 (checked against it above when installed).
    assert CELL_HASH_SEED == 0xC70F6907
    assert murmur2_x86(b"", CELL_HASH_SEED) == 3990065800
    assert murmur2_x86(b"a", CELL_HASH_SEED) == 2167009006
    assert murmur2_x86(b"abc", CELL_HASH_SEED) == 3350977461
    assert murmur2_x86(b"abcd", CELL_HASH_SEED) == 804720481
    assert murmur2_x86(b"abc", 0) == 324500635
    assert cell_hash('print("hello")\n') == 1717977610
    assert cell_hash("héllo wörld ✓") == 146620064


def test_cell_filename() -> None:
    name = cell_filename("1 + 1", pid=1234)
    assert name == os.path.join(
        tempfile.gettempdir(), "kernelvisor_1234", f"{cell_hash('1 + 1')}.py"
    )
    assert cell_filename("1 + 1") == cell_filename("1 + 1", pid=os.getpid())


def test_compiler_names_cells_without_writing_them(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    cc = compiler.CellCompiler()
    name = cc.cache("x = 1\n", 3, raw_code="x = 1")
    assert name == str(tmp_path / f"kernelvisor_{os.getpid()}" / f"{cell_hash('x = 1')}.py")
    assert cc.format_code_name(name) == ("Cell", "In[3]")
    assert list(tmp_path.iterdir()) == []  # as ipykernel: only a debugger dumps cells


def test_dump_cell(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    source = "print('é')\n"
    name = Path(dump_cell(source))
    assert name == tmp_path / f"kernelvisor_{os.getpid()}" / f"{cell_hash(source)}.py"
    assert stat.S_IMODE(name.parent.stat().st_mode) == 0o700
    assert stat.S_IMODE(name.stat().st_mode) == 0o600
    assert name.read_text(encoding="utf-8") == source
    # Written only if absent: the name is the source's hash.
    name.write_text("changed", encoding="utf-8")
    assert dump_cell(source) == str(name)
    assert name.read_text(encoding="utf-8") == "changed"


def test_dump_cell_refuses_a_directory_others_can_use(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shared = tmp_path / f"kernelvisor_{os.getpid()}"
    shared.mkdir(mode=0o777)
    shared.chmod(0o777)
    with pytest.raises(PermissionError):
        dump_cell("x")
    assert list(shared.iterdir()) == []


def test_code_filename_warnings_and_tracebacks_name_the_cell(
    tmpdir_worker: tuple[WorkerProcess, Path],
) -> None:
    worker, tmp = tmpdir_worker
    source = "import warnings\n\n\ndef f():\n    warnings.warn('careful')\n    return 1 / 0\n"
    _ok(worker.execute(source))
    cell_file = tmp / f"kernelvisor_{worker.proc.pid}" / f"{cell_hash(source)}.py"
    assert _result(worker.execute("f.__code__.co_filename")) == repr(str(cell_file))
    assert not cell_file.exists()

    ex = worker.execute("f()")
    assert (
        ex.stream_text("stderr")
        == f"{cell_file}:5: UserWarning: careful\n  warnings.warn('careful')\n"
    )
    (error,) = ex.iopub("error")
    # Rendered as ipykernel renders it: every line of context, blank ones too.
    assert _plain(error.content["traceback"])[2:] == [
        "Cell In[3], line 1\n----> 1 f()\n",
        (
            "Cell In[1], line 6, in f()\n"
            "      4 def f():\n"
            "      5     warnings.warn('careful')\n"
            "----> 6     return 1 / 0\n"
        ),
        "ZeroDivisionError: division by zero",
    ]

    # The name hashes the cell as sent; the line counts from the code run, which IPython
    # strips of leading blank lines.
    source = "\n\nreturn 5"
    ex = worker.execute(source)
    assert ex.reply.content["ename"] == "SyntaxError"
    expected = f"'return' outside function ({cell_hash(source)}.py, line 1)"
    assert ex.reply.content["evalue"] == expected


def test_inspect_knows_a_cells_module(worker: WorkerProcess) -> None:
    # What every traceback asks of each frame: a cell's is __main__'s (the module cells run
    # in), as a script's frames are, found without a look through every loaded module.
    _ok(worker.execute("import inspect, sys"))
    same = "inspect.getmodule(sys._getframe()) is sys.modules['__main__']"
    assert _result(worker.execute(same)) == "True"


def test_traceback_context_keeps_blank_lines(worker: WorkerProcess) -> None:
    ex = worker.execute("def inner():\n    return 1 / 0\n\n\ninner()")
    (error,) = ex.iopub("error")
    frames = _plain(error.content["traceback"])
    assert re.fullmatch(
        r"Cell In\[\d+\], line 5\n"
        r"      1 def inner\(\):\n"
        r"      2     return 1 / 0\n"
        r"      3 \n"
        r"      4 \n"
        r"----> 5 inner\(\)\n",
        frames[2],
    ), frames


# --- `!cmd` -----------------------------------------------------------------------------------


def test_shell_output_is_a_stream(worker: WorkerProcess) -> None:
    ex = worker.execute("!echo out; echo err >&2\nprint('after')")
    _ok(ex)
    # The child wrote to the captured fds: no pty, so "\n" stays "\n", stderr stays apart.
    assert ex.stream_text("stdout") == "out\nafter\n"
    assert ex.stream_text("stderr") == "err\n"


def test_capture_magic_captures_shell_output(worker: WorkerProcess) -> None:
    ex = worker.execute("%%capture cap\nprint('printed')\n!echo from the shell")
    _ok(ex)
    assert ex.iopub("stream") == []
    ex = worker.execute("cap.stdout.splitlines()")
    assert _result(ex) == "['printed', 'from the shell']"


def test_redirect_stdout_captures_shell_output(worker: WorkerProcess) -> None:
    ex = worker.execute(
        "import contextlib, io\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf):\n"
        "    !echo redirected\n"
        "print('not redirected')"
    )
    _ok(ex)
    assert ex.stream_text() == "not redirected\n"
    assert _result(worker.execute("buf.getvalue().splitlines()")) == "['redirected']"
    # Back on the worker's stdout, a command writes to the captured fd again.
    assert worker.execute("!echo again").stream_text("stdout") == "again\n"


@pytest.mark.parametrize("redirected", [False, True])
def test_shell_expands_the_callers_locals(worker: WorkerProcess, redirected: bool) -> None:
    code = "def f():\n    word = 'local'\n    !echo {word} $word\n"
    if redirected:
        code += "buf = io.StringIO()\nwith contextlib.redirect_stdout(buf):\n    f()\n"
        code += "print(buf.getvalue().strip())"
    else:
        code += "f()"
    ex = worker.execute("import contextlib, io\n" + code)
    _ok(ex)
    assert ex.stream_text("stdout") == "local local\n"


@pytest.mark.parametrize("redirected", [False, True])
def test_shell_exit_code(worker: WorkerProcess, redirected: bool) -> None:
    prefix = "import contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()):\n    "
    run = (prefix if redirected else "") + "!exit 3"
    _ok(worker.execute(run))
    assert _result(worker.execute("_exit_code")) == "3"
    try:
        _ok(worker.execute("get_ipython().system_raise_on_error = True"))
        ex = worker.execute(run)
        assert ex.reply.content["ename"] == "CalledProcessError"
        assert ex.reply.content["evalue"] == "Command 'exit 3' returned non-zero exit status 3."
    finally:
        _ok(worker.execute("get_ipython().system_raise_on_error = False"))


def test_background_command_only_when_not_redirected(worker: WorkerProcess) -> None:
    ex = worker.execute(
        "import contextlib, io\nwith contextlib.redirect_stdout(io.StringIO()):\n    !true &"
    )
    assert ex.reply.content["ename"] == "OSError"
    assert ex.reply.content["evalue"] == "Background processes not supported."
    _ok(worker.execute("!true &"))


# --- input() and getpass() without stdin ------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "what"),
    [("input('name? ')", "raw_input"), ("import getpass\ngetpass.getpass()", "getpass")],
)
def test_stdin_not_implemented_message(worker: WorkerProcess, code: str, what: str) -> None:
    ex = worker.execute(code, allow_stdin=False)
    assert ex.reply.content["ename"] == "StdinNotImplementedError"
    message = f"{what} was called, but this frontend does not support input requests."
    assert ex.reply.content["evalue"] == message
    (error,) = ex.iopub("error")
    assert _plain(error.content["traceback"])[-1] == f"StdinNotImplementedError: {message}"


def test_getpass_warns_about_arguments_it_ignores(worker: WorkerProcess) -> None:
    req = worker.send_request(
        "execute_request",
        {
            "code": "import getpass, sys\nsecret = getpass.getpass('pw? ', stream=sys.stderr)",
            "allow_stdin": True,
        },
    )
    seen = []
    msg = worker.recv()
    while msg.op != "stdin":
        seen.append(msg)
        msg = worker.recv()
    assert msg.content == {"prompt": "pw? ", "password": True}
    worker.send_request("input_reply", {"value": "s3cret"}, channel="stdin")
    ex = worker.collect(req)
    _ok(ex)
    warning = "".join(
        m.content["text"]
        for m in seen + ex.messages
        if m.msg_type == "stream" and m.content["name"] == "stderr"
    )
    assert (
        "UserWarning: The `stream` parameter of `getpass.getpass` will have no effect"
        " when using kernelvisor" in warning
    )
    assert _result(worker.execute("secret")) == "'s3cret'"
