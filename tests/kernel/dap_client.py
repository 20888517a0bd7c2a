"""A DAP client over Jupyter's control channel, as JupyterLab and VS Code drive a kernel's
debugger: ``debug_request`` on control, ``debug_reply`` back, ``debug_event`` on IOPub."""

from __future__ import annotations

import itertools
import queue
import time
from typing import Any

from jupyter_client.blocking.client import BlockingKernelClient
from kvharness import TIMEOUT, Msg, get_reply, parent_id

# The seed and file naming JupyterLab computes cell paths with (debugInfo tells it).
MURMUR_SEED = 0xC70F6907


class Dap:
    """Requests and events of one debugger session. IOPub messages read while waiting for
    events are kept in ``iopub`` (in order), so cell output is not lost."""

    def __init__(self, kc: BlockingKernelClient) -> None:
        self.kc = kc
        self._seq = itertools.count(1)
        self.iopub: list[Msg] = []
        self._next_event = 0

    def send(self, command: str, arguments: dict[str, Any] | None = None) -> str:
        """Sends a request; returns its msg_id."""
        content: dict[str, Any] = {"type": "request", "seq": next(self._seq), "command": command}
        if arguments is not None:
            content["arguments"] = arguments
        msg = self.kc.session.msg("debug_request", content)
        self.kc.control_channel.send(msg)
        return str(msg["header"]["msg_id"])

    def reply(self, msg_id: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        reply = get_reply(self.kc, msg_id, timeout, channel="control")
        assert reply["msg_type"] == "debug_reply", reply
        content: dict[str, Any] = reply["content"]
        return content

    def request(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """Sends a request and returns the DAP response (the reply's content)."""
        response = self.reply(self.send(command, arguments), timeout)
        assert response.get("type") == "response", response
        assert response.get("command") == command, response
        return response

    def ok(
        self, command: str, arguments: dict[str, Any] | None = None, timeout: float = TIMEOUT
    ) -> dict[str, Any]:
        """``request``, which must succeed; returns the response body."""
        response = self.request(command, arguments, timeout)
        assert response.get("success") is True, response
        body: dict[str, Any] = response.get("body") or {}
        return body

    def _read_iopub(self, timeout: float) -> bool:
        try:
            self.iopub.append(self.kc.get_iopub_msg(timeout=timeout))
        except queue.Empty:
            return False
        return True

    def event(self, name: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The next ``debug_event`` named ``name`` (events before it are skipped)."""
        deadline = time.monotonic() + timeout
        while True:
            while self._next_event < len(self.iopub):
                msg = self.iopub[self._next_event]
                self._next_event += 1
                if msg["msg_type"] == "debug_event" and msg["content"].get("event") == name:
                    content: dict[str, Any] = msg["content"]
                    return content
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                seen = [
                    m["content"].get("event") for m in self.iopub if m["msg_type"] == "debug_event"
                ]
                raise AssertionError(f"no {name!r} debug_event in {timeout}s; events: {seen}")
            self._read_iopub(min(remaining, 0.5))

    def drain(self, seconds: float = 0.2) -> None:
        """Read what IOPub has for ``seconds``."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._read_iopub(0.05)

    def cell_iopub(self, msg_id: str, timeout: float = TIMEOUT) -> list[Msg]:
        """The IOPub messages of request ``msg_id`` through its idle (reading on as needed)."""
        deadline = time.monotonic() + timeout
        while True:
            mine = [m for m in self.iopub if parent_id(m) == msg_id]
            if any(
                m["msg_type"] == "status" and m["content"]["execution_state"] == "idle"
                for m in mine
            ):
                return mine
            assert time.monotonic() < deadline, f"no idle for {msg_id}: {mine}"
            self._read_iopub(0.5)

    def start(self, just_my_code: bool = True) -> dict[str, Any]:
        """What JupyterLab sends when its debugger is turned on: initialize, attach, then
        debugInfo; returns debugInfo's body."""
        init = self.ok(
            "initialize",
            {
                "clientID": "test",
                "clientName": "kernelvisor-tests",
                "adapterID": "python",
                "pathFormat": "path",
                "linesStartAt1": True,
                "columnsStartAt1": True,
                "supportsVariableType": True,
                "supportsVariablePaging": True,
                "supportsRunInTerminalRequest": False,
                "locale": "en",
            },
        )
        assert init.get("supportsConfigurationDoneRequest") is True, init
        self.ok("attach", {"justMyCode": just_my_code})
        return self.ok("debugInfo")

    def stop_at(self, timeout: float = TIMEOUT) -> tuple[int, list[dict[str, Any]]]:
        """Waits for a ``stopped`` event: (its thread, the thread's stack frames)."""
        stopped = self.event("stopped", timeout)
        thread = stopped["body"]["threadId"]
        frames = self.ok("stackTrace", {"threadId": thread})["stackFrames"]
        return thread, frames

    def locals_of(self, frame_id: int) -> dict[str, str]:
        """name → value of the first scope (locals) of a stopped frame."""
        scopes = self.ok("scopes", {"frameId": frame_id})["scopes"]
        assert scopes, "no scopes"
        ref = scopes[0]["variablesReference"]
        variables = self.ok("variables", {"variablesReference": ref})["variables"]
        return {v["name"]: v["value"] for v in variables}
