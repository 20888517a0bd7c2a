"""Messages that fail HMAC verification or framing must be dropped without a reply."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest
import zmq
from jupyter_client.session import Session
from kvharness import BOTH_KERNELS, Kernel, execute, result_text

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
