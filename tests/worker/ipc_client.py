"""A tiny stand-in for the supervisor: listens, starts a worker, accepts its two
connections (aux, then main) and speaks IPC.md on them."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import select
import selectors
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernelvisor.ipc import IPC_VERSION, Connection

WORKER_PY = Path(__file__).resolve().parents[2] / "worker_py"

# Requests the supervisor sends on aux (answered while a cell runs); the rest go on main.
AUX_REQUESTS = frozenset(
    {
        "complete_request",
        "inspect_request",
        "is_complete_request",
        "history_request",
        "comm_info_request",
    }
)


def worker_command(path: str, *args: str, ipc_version: int | None = IPC_VERSION) -> list[str]:
    """The command line a supervisor starts worker 1 with (src/worker.rs), connecting to
    ``path``; ``ipc_version`` None leaves out ``--ipc-version`` (a worker package older
    than it)."""
    version = [] if ipc_version is None else ["--ipc-version", str(ipc_version)]
    cmd = [sys.executable, "-m", "kernelvisor.worker", "--connect", path, "--worker-id", "1"]
    return [*cmd, *version, *args]


@dataclass
class Message:
    op: str
    control: dict[str, Any]
    frames: list[bytes]
    via: str = "main"  # the connection it came on

    @property
    def msg_type(self) -> str:
        return str(self.control.get("msg_type", ""))

    @property
    def parent(self) -> dict[str, Any]:
        return json.loads(self.frames[1])

    @property
    def content(self) -> dict[str, Any]:
        # iopub/stdin: parent, metadata, content; reply: metadata, content
        index = 3 if self.op in ("iopub", "stdin") else 2
        return json.loads(self.frames[index]) if len(self.frames) > index else {}

    @property
    def metadata(self) -> dict[str, Any]:
        index = 2 if self.op in ("iopub", "stdin") else 1
        return json.loads(self.frames[index]) if len(self.frames) > index else {}


@dataclass
class Exchange:
    """Everything that came back for one request, in arrival order."""

    messages: list[Message] = field(default_factory=list)

    @property
    def reply(self) -> Message:
        return self.messages[-1]

    def iopub(self, msg_type: str | None = None) -> list[Message]:
        return [
            m
            for m in self.messages
            if m.op == "iopub" and (msg_type is None or m.msg_type == msg_type)
        ]

    def stream_text(self, name: str | None = None) -> str:
        return "".join(
            m.content["text"]
            for m in self.iopub("stream")
            if name is None or m.content["name"] == name
        )


class WorkerProcess:
    def __init__(
        self,
        env: dict[str, str] | None = None,
        timeout: float = 30.0,
        args: tuple[str, ...] = (),
    ) -> None:
        self.dir = tempfile.mkdtemp(prefix="kv-test-")
        path = os.path.join(self.dir, "ipc.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(2)
        listener.settimeout(timeout)
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(WORKER_PY), full_env.get("PYTHONPATH")) if p
        )
        full_env.update(env or {})
        self.stderr_path = os.path.join(self.dir, "stderr.log")
        # The secret, as the supervisor hands it over: in a pipe the worker inherits.
        self.token = os.urandom(32).hex()
        token_r, token_w = os.pipe()
        os.write(token_w, self.token.encode())
        os.close(token_w)
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                worker_command(path, "--token-fd", str(token_r), *args),
                pass_fds=(token_r,),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=full_env,
                cwd=self.dir,
            )
        os.close(token_r)
        self._timeout = timeout
        self._queue: collections.deque[Message] = collections.deque()
        try:
            self.aux = self._accept(listener)
            self.aux_hello = self._recv_hello(self.aux, "aux")
            self.conn = self._accept(listener)  # main
            self.hello = self._recv_hello(self.conn, "main")
        finally:
            listener.close()
        self._selector = selectors.DefaultSelector()
        for role, conn in (("main", self.conn), ("aux", self.aux)):
            self._selector.register(conn.fileno(), selectors.EVENT_READ, role)
        self._socks = {"main": self.conn, "aux": self.aux}
        self.session = uuid.uuid4().hex
        self._next_id = 1
        # The msg_id in each request's header, by request id.
        self.msg_ids: dict[int, str] = {}
        # Execution counts, numbered here as the supervisor numbers them (IPC.md,
        # "Execution counts"): the next one, and each execute_request's.
        self.next_count = 1
        self.counts: dict[int, int] = {}

    @staticmethod
    def _accept(listener: socket.socket) -> Connection:
        sock, _ = listener.accept()
        # Blocking (no timeout), as recv_nowait needs: waits are bounded by recv's select.
        sock.settimeout(None)
        return Connection(sock)

    def _recv_hello(self, conn: Connection, role: str) -> Message:
        messages: list[list[bytes]] = []
        while not messages:
            if not select.select([conn], [], [], self._timeout)[0]:
                raise TimeoutError(f"no hello on {role}")
            messages = conn.recv_nowait()
        control = json.loads(messages[0][0])
        assert control["op"] == "hello" and control["role"] == role, control
        for frames in messages[1:]:
            later = json.loads(frames[0])
            self._queue.append(Message(later["op"], later, frames, role))
        return Message("hello", control, messages[0], role)

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def recv(self, timeout: float | None = None) -> Message:
        """The next message from either connection (in arrival order per connection)."""
        while not self._queue:
            ready = self._selector.select(self._timeout if timeout is None else timeout)
            if not ready:
                raise TimeoutError("no message from the worker")
            for key, _ in ready:
                role = key.data
                for frames in self._socks[role].recv_nowait():
                    control = json.loads(frames[0])
                    self._return_credit(control, frames)
                    self._queue.append(Message(control["op"], control, frames, role))
        return self._queue.popleft()

    def _return_credit(self, control: dict[str, Any], frames: list[bytes]) -> None:
        """As the supervisor does once it has published an iopub message (here: at once),
        return its bytes to its flow (IPC.md "Flow control")."""
        flow = control.get("flow")
        if control["op"] == "iopub" and isinstance(flow, int):
            size = sum(len(f) for f in frames)
            credit = json.dumps({"op": "credit", "flows": [[flow, size]]}).encode()
            with contextlib.suppress(OSError):  # the worker may be exiting
                self._socks["aux"].send([credit])

    def recv_until_closed(self, timeout: float | None = None) -> list[Message]:
        """Every message (queued ones first) until the worker closes ``main``: it exited
        or died. A message cut off by the close raises ProtocolError."""
        messages = list(self._queue)
        self._queue.clear()
        deadline = time.monotonic() + (self._timeout if timeout is None else timeout)
        open_roles = {"main", "aux"}
        while "main" in open_roles:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("the worker did not close main")
            for key, _ in self._selector.select(remaining):
                role = key.data
                if role not in open_roles:
                    continue
                try:
                    batch = self._socks[role].recv_nowait()
                except EOFError:
                    open_roles.discard(role)
                    self._selector.unregister(key.fd)
                    continue
                except ConnectionResetError:
                    # Credit we returned on aux was unread when the worker ended: its
                    # kernel resets aux (as the supervisor, take it as the end).
                    if role != "aux":
                        raise
                    open_roles.discard(role)
                    self._selector.unregister(key.fd)
                    continue
                for frames in batch:
                    control = json.loads(frames[0])
                    if "aux" in open_roles:
                        self._return_credit(control, frames)
                    messages.append(Message(control["op"], control, frames, role))
        return messages

    def send_request(
        self,
        msg_type: str,
        content: dict[str, Any],
        channel: str = "shell",
        buffers: tuple[bytes, ...] = (),
        via: str | None = None,
        control_extra: dict[str, Any] | None = None,
    ) -> int:
        """Send a request on ``via`` (by default where the supervisor sends it), with
        ``control_extra`` in its control frame (e.g. a run mode)."""
        req_id = self._next_id
        self._next_id += 1
        header = {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "session": self.session,
            "username": "test",
            "date": "2024-01-01T00:00:00.000000Z",
            "version": "5.3",
        }
        self.msg_ids[req_id] = header["msg_id"]
        control: dict[str, Any] = {
            "op": "request",
            "id": req_id,
            "channel": channel,
            "msg_type": msg_type,
        }
        if msg_type == "execute_request":
            control.update(self._number(content))
            self.counts[req_id] = control["count"]
        control.update(control_extra or {})
        if via is None:
            via = "aux" if msg_type in AUX_REQUESTS or channel == "stdin" else "main"
        self._socks[via].send(
            [
                json.dumps(control).encode(),
                json.dumps(header).encode(),
                b"{}",
                b"{}",
                json.dumps(content).encode(),
                *buffers,
            ]
        )
        return req_id

    def _number(self, content: dict[str, Any]) -> dict[str, Any]:
        """An execute_request's count, as the supervisor gives it: the next number, taken
        by a cell stored in history, not silent and not blank."""
        silent = bool(content.get("silent", False))
        code = content.get("code", "")
        takes = (
            bool(content.get("store_history", not silent))
            and not silent
            and isinstance(code, str)
            and not code.isspace()
            and code != ""
        )
        number = self.next_count
        if takes:
            self.next_count += 1
        return {"count": number, "takes_count": takes}

    def collect(self, req_id: int) -> Exchange:
        """Messages up to and including the reply (or done) of req_id."""
        exchange = Exchange()
        while True:
            msg = self.recv()
            exchange.messages.append(msg)
            if msg.op in ("reply", "done") and msg.control.get("id") == req_id:
                return exchange

    def collect_replies(self, *req_ids: int) -> dict[int, Message]:
        """The reply (or done) of each request, whatever order they come in (on two
        connections, a reader may see a later message on one before an earlier one on
        the other)."""
        replies: dict[int, Message] = {}
        while len(replies) < len(req_ids):
            msg = self.recv()
            req_id = msg.control.get("id")
            if msg.op in ("reply", "done") and req_id in req_ids:
                replies[req_id] = msg
        return replies

    def request(self, msg_type: str, content: dict[str, Any], **kw: Any) -> Exchange:
        return self.collect(self.send_request(msg_type, content, **kw))

    def execute(self, code: str, **options: Any) -> Exchange:
        return self.request("execute_request", {"code": code, **options})

    def send_cell(self, code: str, mode: str = "queue", **control: Any) -> int:
        """An execute_request in a run mode (IPC.md, "Run modes"); returns its id."""
        content = {"code": code, "allow_stdin": True}
        return self.send_request(
            "execute_request",
            content,
            via="aux" if mode == "thread" else "main",  # as the supervisor sends them
            control_extra={"mode": mode, **control},
        )

    def send_op(self, op: str, via: str = "aux", **fields: Any) -> None:
        """A control-only message (e.g. ``interrupt``)."""
        self._socks[via].send([json.dumps({"op": op, **fields}).encode()])

    def send_raw(self, data: bytes, via: str = "main") -> None:
        """Bytes as they are (e.g. a framing error)."""
        self._socks[via]._sock.sendall(data)

    def shutdown(self, via: str = "main") -> int:
        self._socks[via].send([b'{"op":"shutdown"}'])
        try:
            return self.proc.wait(10)
        finally:
            self.close()

    def close_connections(self) -> None:
        self._selector.close()
        self.conn.close()
        self.aux.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.close_connections()
        shutil.rmtree(self.dir, ignore_errors=True)
