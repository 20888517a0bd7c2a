"""Writes the fuzz targets' seed corpus (fuzz/seeds/<target>/) from real messages.

- wire_parse: the messages jupyter_client's KernelClient builds (execute with JupyterLab's
  metadata and cell tags, complete, inspect, history, kernel_info, comm_open/comm_msg with
  binary buffers, input_reply, interrupt, shutdown, subshell requests), serialized by
  jupyter_client's Session with a ROUTER identity, unsigned (the targets parse unkeyed).
- ipc_decode: the IPC traffic of a real worker (tests/worker's stand-in supervisor, with the
  supervisor's request layout) in both directions, and the shared test vector.
- cell_plan: the content and metadata of the execute requests above.

Run from the repo with the dev venv: .venv/bin/python fuzz/seeds.py
Frames of a wire or cell_plan input are separated by two NUL bytes (see fuzz/src/lib.rs).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import struct
import sys
from pathlib import Path
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.session import Session

ROOT = Path(__file__).resolve().parents[1]
SEEDS = ROOT / "fuzz" / "seeds"
SEP = b"\0\0"


class Recorder:
    """Stands in for a client channel: keeps what the client would send."""

    def __init__(self, sent: list[dict[str, Any]]) -> None:
        self.sent = sent

    def send(self, msg: dict[str, Any]) -> None:
        self.sent.append(msg)

    def is_alive(self) -> bool:
        return True


JUPYTERLAB_METADATA = {
    "cellId": "4f1c0b3e-8a7d-4c51-9d5e-2b0e6a9c1d10",
    "deletedCells": [],
    "recordTiming": False,
}

CELLS = [
    ("print('hello')", {}),
    ("1 + 1", JUPYTERLAB_METADATA),
    ("# task\nawait asyncio.sleep(1)", {}),
    ("##thread name='w' backend=trio\nimport trio", {}),
    ('# thread name="my worker" backend=asyncio\nx = 1', {}),
    ("# process\nimport os; os.getpid()", {}),
    ("raise ValueError", {**JUPYTERLAB_METADATA, "tags": ["raises-exception"]}),
    ("x", {**JUPYTERLAB_METADATA, "tags": ["stop-on-error=false", "timeout=2.5"]}),
    ("y", {"tags": ["thread", "stop-on-error", 3, None]}),
    ("é = '☃'\n" * 3, {"tags": []}),
]


def client_messages() -> list[dict[str, Any]]:
    sent: list[dict[str, Any]] = []
    kc = BlockingKernelClient(session=Session(key=b""))
    kc._shell_channel = Recorder(sent)  # the client's own send path
    kc._control_channel = Recorder(sent)
    kc._stdin_channel = Recorder(sent)
    for code, metadata in CELLS:
        msg = kc.session.msg(
            "execute_request",
            {
                "code": code,
                "silent": False,
                "store_history": True,
                "user_expressions": {},
                "allow_stdin": True,
                "stop_on_error": True,
            },
            metadata=metadata,
        )
        sent.append(msg)
    kc.execute("", silent=True, store_history=False)
    kc.complete("import o", 8)
    kc.inspect("print", 5, detail_level=1)
    kc.history(hist_access_type="tail", n=10)
    kc.is_complete("for i in range(3):")
    kc.comm_info(target_name="jupyter.widget")
    kc.kernel_info()
    kc.input("typed text")
    kc.shutdown(restart=True)
    session = kc.session
    sent.append(session.msg("interrupt_request", {}))
    sent.append(session.msg("create_subshell_request", {}))
    sub = session.msg("execute_request", {"code": "1", "silent": False})
    sub["header"]["subshell_id"] = "0b9a3f4c"
    sent.append(sub)
    sent.append(session.msg("list_subshell_request", {}))
    sent.append(session.msg("delete_subshell_request", {"subshell_id": "0b9a3f4c"}))
    sent.append(
        session.msg(
            "comm_open",
            {"comm_id": "c1", "target_name": "jupyter.widget", "data": {"state": {}}},
        )
    )
    comm = session.msg(
        "comm_msg",
        {"comm_id": "c1", "data": {"method": "update", "buffer_paths": [["value"]]}},
    )
    comm["buffers"] = [bytes(range(256)), b"\0\0\0" + b"x" * 40]
    sent.append(comm)
    return sent


def wire_frames(session: Session, msg: dict[str, Any]) -> list[bytes]:
    frames = session.serialize(msg, ident=[b"\x00\x80\x00\x41\xa7"])
    return [bytes(f) for f in frames] + [bytes(b) for b in msg.get("buffers", [])]


def ipc_body(frames: list[bytes]) -> bytes:
    """An IPC body (IPC.md, without the leading body_len)."""
    out = struct.pack("!I", len(frames))
    for f in frames:
        out += struct.pack("!I", len(f)) + f
    return out


def worker_traffic(requests: list[list[bytes]]) -> list[list[bytes]]:
    """Requests as the supervisor frames them, and what a real worker sends back."""
    sys.path.insert(0, str(ROOT / "tests" / "worker"))
    from ipc_client import WorkerProcess  # a test helper, used only here

    traffic: list[list[bytes]] = list(requests)
    worker = WorkerProcess()
    try:
        traffic.append(worker.hello.frames)
        for code in ["print('out'); 1 + 1", "import sys; sys.stderr.write('e')", "1/0", "%who"]:
            req = worker.send_request("execute_request", {"code": code, "silent": False})
            traffic.extend(m.frames for m in worker.collect(req).messages)
        req = worker.send_request("complete_request", {"code": "pri", "cursor_pos": 3})
        traffic.extend(m.frames for m in worker.collect(req).messages)
    finally:
        worker.proc.kill()
        worker.proc.wait()
    return traffic


def write(target: str, data: list[bytes]) -> None:
    out = SEEDS / target
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for item in data:
        (out / hashlib.sha1(item).hexdigest()).write_bytes(item)
    print(f"{target}: {len(data)} seeds in {out.relative_to(ROOT)}")


def main() -> None:
    session = Session(key=b"")
    msgs = client_messages()
    wire = [wire_frames(session, m) for m in msgs]
    write("wire_parse", [SEP.join(f) for f in wire])
    executes = [m for m in msgs if m["header"]["msg_type"] == "execute_request"]
    write(
        "cell_plan",
        [
            json.dumps(m["content"]).encode() + SEP + json.dumps(m["metadata"]).encode()
            for m in executes
        ],
    )
    requests = []
    for frames in wire:
        at = frames.index(b"<IDS|MSG>")
        header = json.loads(frames[at + 2])
        control = {"op": "request", "id": len(requests) + 1, "channel": "shell"}
        control["msg_type"] = header["msg_type"]
        requests.append([json.dumps(control).encode(), *frames[at + 2 :]])
    vector = json.loads((ROOT / "tests" / "data" / "ipc_vector.json").read_text())
    bodies = [ipc_body(f) for f in worker_traffic(requests)]
    bodies.append(bytes.fromhex(vector["encoded_hex"])[4:])
    write("ipc_decode", bodies)


if __name__ == "__main__":
    main()
