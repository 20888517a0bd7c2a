"""A Debug Adapter Protocol client: the worker's connection to debugpy's adapter.

DAP messages are JSON objects, each preceded by a ``Content-Length: N`` header and a blank
line, over TCP on loopback. Requests are numbered by this client (``seq``), so that a
response is matched to its request by ``request_seq`` whoever asked (the debugger's request
thread, its event thread, or an interrupt); events are handed, in arrival order, to one
callback on a thread of their own.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import queue
import socket
import threading
from collections.abc import Callable
from typing import Any

from kernelvisor.debugger_threads import hide

log = logging.getLogger(__name__)

Message = dict[str, Any]

_HEADER = b"Content-Length:"
_SEPARATOR = b"\r\n\r\n"
# A DAP message larger than this is a broken peer, not a big variable.
_MAX_MESSAGE = 256 << 20


class DapError(RuntimeError):
    """The adapter cannot be reached, went away, or did not answer in time."""


def encode(message: Message) -> bytes:
    """One DAP message, framed."""
    body = json.dumps(message, ensure_ascii=False, allow_nan=False, default=repr).encode()
    return b"Content-Length: %d\r\n\r\n%s" % (len(body), body)


class FrameReader:
    """Splits a byte stream into DAP message bodies."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        self._buffer += data
        bodies: list[bytes] = []
        while True:
            end = self._buffer.find(_SEPARATOR)
            if end < 0:
                return bodies
            length = None
            for line in bytes(self._buffer[:end]).split(b"\r\n"):
                if line[: len(_HEADER)].lower() == _HEADER.lower():
                    length = int(line[len(_HEADER) :].strip())
            if length is None or not 0 <= length <= _MAX_MESSAGE:
                raise ValueError(f"bad DAP header {bytes(self._buffer[:end])!r}")
            start = end + len(_SEPARATOR)
            if len(self._buffer) < start + length:
                return bodies
            bodies.append(bytes(self._buffer[start : start + length]))
            del self._buffer[: start + length]


class Pending:
    """A request sent to the adapter, waiting for its response."""

    def __init__(self, client: DapClient, seq: int, command: str) -> None:
        self._client = client
        self.seq = seq
        self.command = command
        self.answer: queue.SimpleQueue[Message | None] = queue.SimpleQueue()

    def result(self, timeout: float = 30.0) -> Message:
        """The response (``DapError`` if the connection ends or ``timeout`` passes first)."""
        try:
            response = self.answer.get(timeout=timeout)
        except queue.Empty:
            raise DapError(f"debugpy did not answer {self.command!r} in {timeout:g}s") from None
        finally:
            self._client._forget(self.seq)
        if response is None:
            raise DapError("debugpy's adapter closed the connection")
        return response


class DapClient:
    """One client session with the adapter (connect, requests, events, close)."""

    def __init__(self, host: str, port: int, on_event: Callable[[Message], None]) -> None:
        try:
            self._sock = socket.create_connection((host, port), timeout=10)
        except OSError as exc:
            raise DapError(f"cannot connect to debugpy's adapter at {host}:{port}: {exc}") from exc
        self._sock.settimeout(None)
        self._send_lock = threading.Lock()
        self._seq = itertools.count(1)
        self._lock = threading.Lock()
        self._waiting: dict[int, queue.SimpleQueue[Message | None]] = {}
        self._closed = False
        self._on_event = on_event
        self._events: queue.SimpleQueue[Message | None] = queue.SimpleQueue()
        for target, name in (
            (self._read_loop, "kernelvisor-dap-reader"),
            (self._event_loop, "kernelvisor-dap-events"),
        ):
            thread = threading.Thread(target=target, name=name, daemon=True)
            hide(thread)
            thread.start()

    @property
    def closed(self) -> bool:
        return self._closed

    def request(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = 30.0
    ) -> Message:
        """Send a request and wait for its response (``DapError`` if none comes)."""
        return self.send(command, arguments).result(timeout)

    def send(self, command: str, arguments: dict[str, Any] | None = None) -> Pending:
        """Send a request; its response is the result of the returned ``Pending``."""
        seq = next(self._seq)
        message: Message = {"type": "request", "seq": seq, "command": command}
        if arguments is not None:
            message["arguments"] = arguments
        pending = Pending(self, seq, command)
        with self._lock:
            if self._closed:
                raise DapError("the connection to debugpy's adapter is closed")
            self._waiting[seq] = pending.answer
        try:
            self._send(message)
        except DapError:
            self._forget(seq)
            raise
        return pending

    def _forget(self, seq: int) -> None:
        with self._lock:
            self._waiting.pop(seq, None)

    def _send(self, message: Message) -> None:
        data = encode(message)
        try:
            with self._send_lock:
                self._sock.sendall(data)
        except OSError as exc:
            self.close()
            raise DapError(f"cannot send to debugpy's adapter: {exc}") from exc

    def close(self) -> None:
        """End the session (a blocked ``request`` gets ``DapError``)."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            waiting = list(self._waiting.values())
        for answer in waiting:
            answer.put(None)
        self._events.put(None)
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)
        self._sock.close()

    def _read_loop(self) -> None:
        reader = FrameReader()
        try:
            while True:
                data = self._sock.recv(1 << 16)
                if not data:
                    break
                for body in reader.feed(data):
                    self._dispatch(json.loads(body))
        except (OSError, ValueError) as exc:
            if not self._closed:
                log.warning("DAP connection to debugpy broken: %s", exc)
        finally:
            self.close()

    def _dispatch(self, message: Message) -> None:
        kind = message.get("type")
        if kind == "response":
            with self._lock:
                answer = self._waiting.get(message.get("request_seq", -1))
            if answer is not None:
                answer.put(message)
            else:
                log.debug("DAP response to no waiting request: %s", message.get("command"))
        elif kind == "event":
            self._events.put(message)
        else:
            # A reverse request (e.g. runInTerminal): not supported, say so.
            log.warning("ignoring a DAP %s from debugpy: %s", kind, message.get("command"))

    def _event_loop(self) -> None:
        while True:
            event = self._events.get()
            if event is None:
                return
            try:
                self._on_event(event)
            except Exception:
                log.exception("handling DAP event %s failed", event.get("event"))
