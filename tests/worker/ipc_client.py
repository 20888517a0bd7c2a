"""A tiny stand-in for the supervisor: listens, starts a worker, speaks IPC.md."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kernelvisor.ipc import Connection

WORKER_PY = Path(__file__).resolve().parents[2] / "worker_py"


@dataclass
class Message:
    op: str
    control: dict[str, Any]
    frames: list[bytes]

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
    def __init__(self, env: dict[str, str] | None = None, timeout: float = 30.0) -> None:
        self.dir = tempfile.mkdtemp(prefix="kv-test-")
        path = os.path.join(self.dir, "ipc.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(1)
        listener.settimeout(timeout)
        full_env = dict(os.environ)
        full_env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(WORKER_PY), full_env.get("PYTHONPATH")) if p
        )
        full_env.update(env or {})
        self.stderr_path = os.path.join(self.dir, "stderr.log")
        with open(self.stderr_path, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kernelvisor.worker", "--connect", path, "--worker-id", "1"],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=stderr,
                env=full_env,
                cwd=self.dir,
            )
        try:
            sock, _ = listener.accept()
        finally:
            listener.close()
        sock.settimeout(timeout)
        self.conn = Connection(sock)
        self.hello = self.recv()
        self.session = uuid.uuid4().hex
        self._next_id = 1

    def stderr(self) -> str:
        with open(self.stderr_path, encoding="utf-8", errors="replace") as f:
            return f.read()

    def recv(self) -> Message:
        frames = self.conn.recv()
        control = json.loads(frames[0])
        return Message(control["op"], control, frames)

    def send_request(
        self,
        msg_type: str,
        content: dict[str, Any],
        channel: str = "shell",
        buffers: tuple[bytes, ...] = (),
    ) -> int:
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
        control = {"op": "request", "id": req_id, "channel": channel, "msg_type": msg_type}
        self.conn.send(
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

    def collect(self, req_id: int) -> Exchange:
        """Messages up to and including the reply (or done) of req_id."""
        exchange = Exchange()
        while True:
            msg = self.recv()
            exchange.messages.append(msg)
            if msg.op in ("reply", "done") and msg.control.get("id") == req_id:
                return exchange

    def request(self, msg_type: str, content: dict[str, Any], **kw: Any) -> Exchange:
        return self.collect(self.send_request(msg_type, content, **kw))

    def execute(self, code: str, **options: Any) -> Exchange:
        return self.request("execute_request", {"code": code, **options})

    def shutdown(self) -> int:
        self.conn.send([b'{"op":"shutdown"}'])
        try:
            return self.proc.wait(10)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()
        shutil.rmtree(self.dir, ignore_errors=True)
