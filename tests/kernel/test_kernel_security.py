"""The client side of the wire: messages that fail HMAC verification or framing, and replayed
messages, are dropped without a reply (and logged); a signed request whose content is not a JSON
object, or whose type needs escaping, gets an error reply."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import pytest
import zmq
from jupyter_client.manager import KernelManager
from jupyter_client.session import Session
from kvharness import (
    BOTH_KERNELS,
    KERNELVISOR,
    STARTUP_TIMEOUT,
    Kernel,
    execute,
    result_text,
)

DELIM = b"<IDS|MSG>"


def header(msg_type: str, session: Session) -> bytes:
    return json.dumps(
        {
            "msg_id": uuid.uuid4().hex,
            "msg_type": msg_type,
            "session": session.session,
            "username": "test",
            "date": datetime.now(UTC).isoformat(),
            "version": "5.3",
        }
    ).encode()


def execute_parts(session: Session, code: str) -> list[bytes]:
    content = {"code": code, "silent": False, "store_history": True, "allow_stdin": False}
    return [header("execute_request", session), b"{}", b"{}", json.dumps(content).encode()]


def bad_messages(session: Session) -> dict[str, list[bytes]]:
    """Each case would set a global kv_bad_<case> if the kernel ran it."""

    def parts(case: str) -> list[bytes]:
        return execute_parts(session, f"kv_bad_{case} = 1")

    wrong = parts("wrong")
    flipped = parts("flipped")
    sig = session.sign(flipped)
    flipped_sig = sig[:-1] + (b"0" if sig[-1:] != b"0" else b"1")
    replayed = parts("replayed")
    other_sig = session.sign(execute_parts(session, "pass"))
    nosig = parts("nosig")
    short = parts("short")
    nodelim = parts("nodelim")
    bad_json = [b"{not json", b"{}", b"{}", b"{}"]
    not_object = [b"[1, 2]", b"{}", b"{}", b"{}"]
    return {
        "wrong signature": [DELIM, b"0" * 64, *wrong],
        "one hex digit off": [DELIM, flipped_sig, *flipped],
        "signature of another message": [DELIM, other_sig, *replayed],
        "empty signature": [DELIM, b"", *parts("empty")],
        "no signature frame": [DELIM, *nosig],
        "fewer than 5 frames": [DELIM, session.sign(short[:1]), short[0]],
        "no delimiter": [session.sign(nodelim), *nodelim],
        "malformed JSON header": [DELIM, session.sign(bad_json), *bad_json],
        "header not an object": [DELIM, session.sign(not_object), *not_object],
    }


@BOTH_KERNELS
def test_bad_messages_are_ignored(kernel: Kernel) -> None:
    info = kernel.km.get_connection_info()
    session = Session(key=kernel.km.session.key, signature_scheme="hmac-sha256")
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"{info['transport']}://{info['ip']}:{info['shell_port']}")
    try:
        for frames in bad_messages(session).values():
            sock.send_multipart(frames)
        # Nothing may come back for any of them.
        if sock.poll(1000):
            pytest.fail(f"kernel replied to an invalid message: {sock.recv_multipart()!r}")
        # Positive control: the same socket with a correct signature does get a reply, so the
        # silence above means "rejected", not "never arrived".
        good = execute_parts(session, "kv_good = 1")
        sock.send_multipart([DELIM, session.sign(good), *good])
        assert sock.poll(30_000), "no reply to a correctly signed request"
        frames = sock.recv_multipart()
        idx = frames.index(DELIM)
        assert frames[idx + 1] == session.sign(frames[idx + 2 : idx + 6])
        reply = json.loads(frames[idx + 5])
        assert reply["status"] == "ok"
    finally:
        sock.close()
    reply, iopub = execute(kernel.kc, "sorted(k for k in globals() if k.startswith('kv_'))")
    assert reply["content"]["status"] == "ok"
    assert result_text(iopub) == "['kv_good']"


@contextmanager
def shell_socket(km: KernelManager) -> Iterator[tuple[zmq.Socket, Session]]:
    """A raw DEALER on the kernel's shell, and a Session with the kernel's key to sign with."""
    info = km.get_connection_info()
    session = Session(key=km.session.key, signature_scheme="hmac-sha256")
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.linger = 0
    sock.connect(f"{info['transport']}://{info['ip']}:{info['shell_port']}")
    try:
        yield sock, session
    finally:
        sock.close()


def recv_reply(sock: zmq.Socket, session: Session, timeout_ms: int = 30_000) -> dict:
    """The next message on a raw socket, verified and parsed (every frame must be JSON)."""
    assert sock.poll(timeout_ms), "no reply"
    frames = sock.recv_multipart()
    idx = frames.index(DELIM)
    assert frames[idx + 1] == session.sign(frames[idx + 2 : idx + 6])
    header, parent, _metadata, content = (json.loads(f) for f in frames[idx + 2 : idx + 6])
    return {"header": header, "parent_header": parent, "content": content}


@contextmanager
def logged_kernel(tmp_path: Path) -> Iterator[tuple[Kernel, Path]]:
    """A kernelvisor whose stderr (its log) goes to a file."""
    log = tmp_path / "kernel.log"
    km = KernelManager(kernel_name=KERNELVISOR)
    with log.open("w") as err:
        km.start_kernel(stderr=err)
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=STARTUP_TIMEOUT)
        yield Kernel(KERNELVISOR, km, kc), log
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=False)


def wait_for_log(log: Path, text: str, timeout: float = 10) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = log.read_text()
        if text in content:
            return content
        time.sleep(0.05)
    raise AssertionError(f"{text!r} not in the kernel log:\n{log.read_text()}")


def counter_parts(session: Session) -> list[bytes]:
    return execute_parts(session, "kv_runs = globals().get('kv_runs', 0) + 1")


@BOTH_KERNELS
def test_a_replayed_message_runs_once(kernel: Kernel) -> None:
    """The same signed message sent twice, even from another socket, runs once (jupyter_client's
    Session refuses duplicate signatures; so do both kernels)."""
    with shell_socket(kernel.km) as (sock, session):
        parts = counter_parts(session)
        signed = [DELIM, session.sign(parts), *parts]
        sock.send_multipart(signed)
        assert recv_reply(sock, session)["content"]["status"] == "ok"
        sock.send_multipart(signed)
        with shell_socket(kernel.km) as (other, _):
            other.send_multipart(signed)
            if sock.poll(1000) or other.poll(100):
                pytest.fail("the kernel answered a replayed message")
    reply, iopub = execute(kernel.kc, "kv_runs")
    assert reply["content"]["status"] == "ok"
    assert result_text(iopub) == "1"


def test_a_replay_is_logged(tmp_path: Path) -> None:
    with logged_kernel(tmp_path) as (kernel, log), shell_socket(kernel.km) as (sock, session):
        parts = counter_parts(session)
        signed = [DELIM, session.sign(parts), *parts]
        sock.send_multipart(signed)
        recv_reply(sock, session)
        sock.send_multipart(signed)
        text = wait_for_log(log, "replayed message")
        assert "refused a client message" in text


NOT_OBJECTS = {
    "list": b"[1, 2]",
    "number": b"3",
    "string": b'"code"',
    "invalid JSON": b'{"code": "kv_ran = 1"',
    "trailing garbage": b'{"code": "kv_ran = 1"} x',
}


@pytest.mark.parametrize("content", NOT_OBJECTS.values(), ids=NOT_OBJECTS.keys())
def test_content_that_is_not_an_object_gets_an_error_reply(kernel: Kernel, content: bytes) -> None:
    with shell_socket(kernel.km) as (sock, session):
        parts = [header("execute_request", session), b"{}", b"{}", content]
        sock.send_multipart([DELIM, session.sign(parts), *parts])
        reply = recv_reply(sock, session)
    assert reply["header"]["msg_type"] == "execute_reply"
    assert reply["parent_header"]["msg_type"] == "execute_request"
    assert reply["content"]["status"] == "error"
    assert reply["content"]["ename"] == "InvalidContent"
    assert "content of this execute_request is not a JSON object" in reply["content"]["evalue"]
    # Nothing ran, and the kernel goes on.
    reply2, iopub = execute(kernel.kc, "'kv_ran' in globals()")
    assert reply2["content"]["status"] == "ok"
    assert result_text(iopub) == "False"


def test_metadata_that_is_not_an_object_gets_an_error_reply(kernel: Kernel) -> None:
    with shell_socket(kernel.km) as (sock, session):
        parts = [header("kernel_info_request", session), b"{}", b"[]", b"{}"]
        sock.send_multipart([DELIM, session.sign(parts), *parts])
        reply = recv_reply(sock, session)
    assert reply["header"]["msg_type"] == "kernel_info_reply"
    assert reply["content"]["ename"] == "InvalidMessage"
    assert "metadata" in reply["content"]["evalue"]


def test_invalid_content_of_a_non_request_is_logged(tmp_path: Path) -> None:
    """A message that is not a request has no reply to carry the error: it is logged."""
    with logged_kernel(tmp_path) as (kernel, log), shell_socket(kernel.km) as (sock, session):
        parts = [header("comm_msg", session), b"{}", b"{}", b"[1]"]
        sock.send_multipart([DELIM, session.sign(parts), *parts])
        text = wait_for_log(log, "refused a message with invalid JSON")
        assert "comm_msg is not a JSON object" in text
        assert not sock.poll(500), "a reply to a message that is not a request"


def test_a_msg_type_that_needs_escaping_gets_a_valid_reply(kernel: Kernel) -> None:
    """The reply type is derived from the client's request type; it must be JSON-escaped."""
    msg_type = 'bad"type\\\n_request'
    with shell_socket(kernel.km) as (sock, session):
        parts = [header(msg_type, session), b"{}", b"{}", b"{}"]
        sock.send_multipart([DELIM, session.sign(parts), *parts])
        reply = recv_reply(sock, session)
    assert reply["header"]["msg_type"] == 'bad"type\\\n_reply'
    assert reply["content"]["ename"] == "UnknownMessageType"
