"""CurveZMQ transport encryption, as jupyter_client 8.10 provisions it: a kernelspec installed
with ``kernelvisor install --encryption curve`` declares ``metadata.supported_encryption``, a
KernelManager with ``transport_encryption="required"`` writes server keys into the connection
file, and every socket of the kernel is then a CURVE server. A client without the keys, or
with the wrong server key, gets nothing."""

from __future__ import annotations

import json
import queue
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq
from jupyter_client.blocking.client import BlockingKernelClient
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.session import Session
from kvharness import (
    STARTUP_TIMEOUT,
    Kernel,
    execute,
    install_kernelspec,
    result_text,
    running_kernel,
    stream_text,
)

CURVE_SPEC = "kv-curve"
CHANNELS = ("shell", "control", "stdin", "iopub", "hb")


@pytest.fixture(scope="module")
def curve_spec(kv_bin: Path, kernelspecs: Path) -> str:
    """The kernelspec, installed beside the session's others (``kernelspecs`` is their
    share/jupyter)."""
    install_kernelspec(
        kv_bin, kernelspecs.parents[1], "--name", CURVE_SPEC, "--encryption", "curve"
    )
    return CURVE_SPEC


@pytest.fixture
def curve_kernel(curve_spec: str) -> Iterator[Kernel]:
    with running_kernel(curve_spec, transport_encryption="required") as k:
        yield k


def test_install_declares_curve(curve_spec: str) -> None:
    spec = KernelSpecManager().get_kernel_spec(curve_spec)
    assert spec.metadata["supported_encryption"] == "curve"


def test_required_encryption_runs_cells(curve_kernel: Kernel) -> None:
    info = curve_kernel.km.get_connection_info()
    assert info.get("curve_publickey") and info.get("curve_secretkey"), info.keys()
    conn = json.loads(Path(curve_kernel.km.connection_file).read_text())
    assert len(conn["curve_publickey"]) == 40
    reply, iopub = execute(curve_kernel.kc, "print('over curve'); 6 * 7")
    assert reply["content"]["status"] == "ok"
    assert stream_text(iopub) == "over curve\n"
    assert result_text(iopub) == "42"
    # The heartbeat channel connects with its own ephemeral keypair and the server key.
    deadline = time.monotonic() + 15
    while not curve_kernel.kc.hb_channel.is_beating():
        assert time.monotonic() < deadline, "no heartbeat over CURVE"
        time.sleep(0.1)


def plain_client(info: dict[str, object]) -> BlockingKernelClient:
    """A client of the same kernel (same ports, same HMAC key) without the CURVE keys."""
    plain = {k: v for k, v in info.items() if not str(k).startswith("curve_")}
    kc = BlockingKernelClient()
    kc.load_connection_info(plain)
    return kc


def test_a_client_without_the_keys_gets_nothing(curve_kernel: Kernel) -> None:
    kc = plain_client(curve_kernel.km.get_connection_info())
    kc.start_channels()
    try:
        kc.kernel_info()
        with pytest.raises(queue.Empty):
            kc.get_shell_msg(timeout=3)
        with pytest.raises(queue.Empty):
            kc.get_iopub_msg(timeout=1)
    finally:
        kc.stop_channels()
    # The kernel is unharmed, for the client that has the keys.
    reply, iopub = execute(curve_kernel.kc, "1 + 1")
    assert reply["content"]["status"] == "ok"
    assert result_text(iopub) == "2"


@pytest.mark.parametrize("channel", CHANNELS)
def test_every_socket_is_a_curve_server(curve_kernel: Kernel, channel: str) -> None:
    """Each of the five sockets answers a CURVE client that has the server key (as
    jupyter_client connects), and never completes the handshake with a NULL-mechanism client
    or with a CURVE client that expects another server key (nothing comes back)."""
    info = curve_kernel.km.get_connection_info()
    url = f"{info['transport']}://{info['ip']}:{info[f'{channel}_port']}"
    server_public = info["curve_publickey"]
    if isinstance(server_public, str):
        server_public = server_public.encode()
    session = Session(key=curve_kernel.km.session.key)
    ctx = zmq.Context.instance()
    wrong_public, _ = zmq.curve_keypair()
    for server_key, expect_answer in ((server_public, True), (None, False), (wrong_public, False)):
        kind = {"iopub": zmq.SUB, "hb": zmq.REQ}.get(channel, zmq.DEALER)
        sock = ctx.socket(kind)
        sock.linger = 0
        if server_key is not None:
            public, secret = zmq.curve_keypair()
            sock.curve_publickey, sock.curve_secretkey = public, secret
            sock.curve_serverkey = server_key
        wait_ms = 10_000 if expect_answer else 2000
        # A refused handshake can drop the pipe between the poll below and the send
        # (libzmq's race, in this client): a send must not then block for good.
        sock.sndtimeo = wait_ms
        sock.connect(url)
        try:
            if kind == zmq.SUB:
                sock.setsockopt(zmq.SUBSCRIBE, b"")  # answered by an iopub_welcome
                answered = bool(sock.poll(wait_ms))
            # REQ and DEALER sends block while no connection is up, which is for good
            # after a refused handshake (ZeroMQ drops the pipe): wait to be writable first.
            elif not sock.poll(wait_ms, zmq.POLLOUT):
                answered = False
            else:
                try:
                    if kind == zmq.REQ:
                        sock.send(b"ping", zmq.NOBLOCK)
                    else:
                        session.send(sock, session.msg("kernel_info_request", {}))
                    answered = bool(sock.poll(wait_ms))
                except zmq.Again:
                    answered = False
            assert answered == expect_answer, (channel, server_key, answered)
        finally:
            sock.close()


def test_auto_uses_curve_when_the_spec_declares_it(curve_spec: str) -> None:
    with running_kernel(curve_spec, transport_encryption="auto") as k:
        assert k.km.get_connection_info().get("curve_publickey")
        reply, _ = execute(k.kc, "pass")
        assert reply["content"]["status"] == "ok"


def test_required_encryption_starts_within_the_usual_time(curve_spec: str) -> None:
    start = time.monotonic()
    with running_kernel(curve_spec, transport_encryption="required") as k:
        reply, _ = execute(k.kc, "pass")
        assert reply["content"]["status"] == "ok"
    assert time.monotonic() - start < STARTUP_TIMEOUT
