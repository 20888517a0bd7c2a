"""The debugger: Jupyter's ``debug_request`` (Debug Adapter Protocol) served by debugpy.

Requests arrive from the supervisor on ``aux`` and are handled one at a time on a thread of
their own (``kernelvisor-debugger``), so they are answered while the main thread is stopped
at a breakpoint or busy with a cell. Replies go back on ``aux`` as ``debug_reply``; DAP events
go out as ``debug_event`` on IOPub, their parent the latest ``debug_request``.

debugpy is imported and started on the first ``initialize`` (``debugpy.listen`` on loopback:
it spawns debugpy's adapter process, and pydevd in this process connects to it). This
module is a DAP client of that adapter, and adds what Jupyter adds to DAP (messaging 5.5):

- answered here whether or not debugpy runs: ``debugInfo``, ``inspectVariables``,
  ``richInspectVariables``, ``modules``, and ``variables`` while nothing is stopped (the
  children of what ``inspectVariables`` listed);
- answered here once started: ``dumpCell`` (writes a cell's file; compiler.py names it),
  ``configurationDone`` (the attach sequence already sent it), ``source`` (also for cells
  only in linecache); ``setBreakpoints`` and
  ``attach`` are amended and forwarded, ``richInspectVariables`` and ``copyToGlobals`` are
  carried out with ``evaluate`` / ``setExpression`` in the stopped frame;
- everything else goes to debugpy as it is.

The adapter exits by itself once this process and this client are gone.

A request whose metadata has ``kernelvisor_replay: true`` is the supervisor replaying the
session to a new worker after a crash: its ``initialized`` event is not published (the
frontend's session never ended).
"""

from __future__ import annotations

import ast
import contextlib
import importlib.util
import linecache
import logging
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

from kernelvisor import compiler
from kernelvisor.debugger_dap import DapClient, DapError, Message
from kernelvisor.debugger_threads import held_at_breakpoint, hide, hide_service_threads
from kernelvisor.debugger_vars import VariableExplorer, is_user_name
from kernelvisor.ipc import Connection
from kernelvisor.jsonutil import dumps
from kernelvisor.messages import Request, loads_object
from kernelvisor.outbox import EMPTY, Outbox, control_frame

log = logging.getLogger(__name__)

LOCALHOST = "127.0.0.1"
# How long the attach sequence waits for debugpy's ``initialized`` event.
INITIALIZED_TIMEOUT = 10.0
# How long an interrupt waits for debugpy to resume a thread stopped at a breakpoint.
RESUME_TIMEOUT = 5.0

_EVENT_CONTROL = control_frame({"op": "iopub", "msg_type": "debug_event"})


def available() -> bool:
    """Whether debugpy can be imported here (checked without importing it)."""
    try:
        return importlib.util.find_spec("debugpy") is not None
    except (ImportError, ValueError):
        return False


def _response(request: Message, success: bool = True, **fields: Any) -> Message:
    response: Message = {
        "type": "response",
        "seq": 0,
        "request_seq": request.get("seq", 0),
        "command": request.get("command", ""),
        "success": success,
    }
    response.update(fields)
    return response


def _failure(request: Message, message: str) -> Message:
    return _response(request, False, message=message, body={})


class Debugger:
    """One worker's debugger; see the module doc."""

    def __init__(self, shell: Any, outbox: Outbox, aux: Connection) -> None:
        self.shell = shell
        self.outbox = outbox
        self.aux = aux
        self.started = False
        self.client: DapClient | None = None
        self._endpoint: tuple[str, int] | None = None
        self.breakpoints: dict[str, list[dict[str, Any]]] = {}
        self._stopped: set[int] = set()
        self._state_lock = threading.Lock()
        self._initialized = threading.Event()
        self._parent = EMPTY
        self._replaying = False
        self._removed_transforms: list[tuple[int, Callable[..., Any]]] = []
        self._explorer = VariableExplorer()
        self._requests: queue.SimpleQueue[Request] | None = None
        self._retrace_registered = False

    # --- requests ------------------------------------------------------------------------

    def submit(self, req: Request) -> None:
        """Handle a ``debug_request`` on the debugger's thread (from any thread)."""
        if self._requests is None:
            self._requests = queue.SimpleQueue()
            thread = threading.Thread(target=self._serve, name="kernelvisor-debugger", daemon=True)
            hide(thread)
            thread.start()
        self._requests.put(req)

    def _serve(self) -> None:
        assert self._requests is not None
        while True:
            req = self._requests.get()
            request = req.content_json()
            self._parent = req.header
            self._replaying = loads_object(req.metadata).get("kernelvisor_replay") is True
            try:
                response = self.process(request)
            except DapError as exc:
                log.warning("debug_request %s failed: %s", request.get("command"), exc)
                response = _failure(request, str(exc))
            except Exception as exc:
                log.exception("debug_request %s failed", request.get("command"))
                response = _failure(request, f"{type(exc).__name__}: {exc}")
            finally:
                self._replaying = False
            self.outbox.aux_reply(req.id, response)

    def process(self, request: Message) -> Message:
        """The DAP response to ``request``."""
        command = request.get("command")
        if not isinstance(command, str):
            return _failure(request, "a DAP request needs a command")
        static = self._STATIC.get(command)
        if static is not None:
            return static(self, request)
        if command == "initialize":
            self._start()
            return self._forward(request)
        if not self.started:
            return _failure(request, f"the debugger is not started (send initialize): {command}")
        handler = self._STARTED.get(command)
        if handler is not None:
            return handler(self, request)
        return self._forward(request)

    def _forward(self, request: Message, timeout: float = 30.0) -> Message:
        assert self.client is not None
        response = self.client.request(request["command"], request.get("arguments"), timeout)
        response["request_seq"] = request.get("seq", 0)
        return response

    # --- start and stop --------------------------------------------------------------------

    def _start(self) -> None:
        """Start debugpy (once per process) and open a client session with its adapter."""
        if self.started and self.client is not None and not self.client.closed:
            return
        if self._endpoint is None:
            # pydevd warns about (and mis-handles) frozen stdlib modules unless told so.
            os.environ.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")
            import debugpy

            hide_service_threads()
            # Cells' child processes (!cmd, %pip) are not debugged.
            debugpy.configure(subProcess=False)
            host, port = debugpy.listen((LOCALHOST, 0))
            self._endpoint = (str(host), int(port))
            log.info("debugpy is listening on %s:%d", *self._endpoint)
        self._initialized.clear()
        self.client = DapClient(*self._endpoint, self._on_event)
        self._keep_leading_blank_lines()
        if not self._retrace_registered:
            self.shell.events.register("pre_run_cell", self._trace_cell_thread)
            self._retrace_registered = True
        self.started = True

    def _stop(self) -> None:
        if self.client is not None:
            self.client.close()
        self.client = None
        self.started = False
        self.breakpoints.clear()
        with self._state_lock:
            self._stopped.clear()
        self._restore_leading_blank_lines()

    def _keep_leading_blank_lines(self) -> None:
        """Cells keep their leading blank lines while debugging, so that line numbers match
        the cell's file and its breakpoints (IPython strips them otherwise)."""
        from IPython.core.inputtransformer2 import leading_empty_lines

        transforms = self.shell.input_transformer_manager.cleanup_transforms
        if leading_empty_lines in transforms:
            index = transforms.index(leading_empty_lines)
            self._removed_transforms.append((index, transforms.pop(index)))

    def _restore_leading_blank_lines(self) -> None:
        transforms = self.shell.input_transformer_manager.cleanup_transforms
        while self._removed_transforms:
            index, transform = self._removed_transforms.pop()
            transforms.insert(index, transform)

    def _trace_cell_thread(self, *_: Any) -> None:
        """Before a cell, on the thread that runs it: make sure pydevd traces that thread. An
        exception raised out of the trace function (an interrupt at a breakpoint) turns
        tracing off for the thread; Python 3.12+ (sys.monitoring) has no per-thread trace to
        lose."""
        if self.started and sys.version_info < (3, 12) and sys.gettrace() is None:
            import debugpy

            debugpy.debug_this_thread()

    # --- events ----------------------------------------------------------------------------

    def _on_event(self, event: Message) -> None:
        """A DAP event from the adapter (on the client's event thread, in order)."""
        name = event.get("event")
        body = event.get("body") or {}
        if name == "initialized":
            self._initialized.set()
            if self._replaying:
                return
        elif name == "stopped":
            stopped = {body["threadId"]} if isinstance(body.get("threadId"), int) else set()
            if body.get("allThreadsStopped") and self.client is not None:
                with contextlib.suppress(DapError):
                    threads = self.client.request("threads", timeout=10)
                    stopped |= {t["id"] for t in threads.get("body", {}).get("threads", [])}
            with self._state_lock:
                self._stopped |= stopped
        elif name == "continued":
            with self._state_lock:
                if body.get("allThreadsContinued", True):
                    self._stopped.clear()
                else:
                    self._stopped.discard(body.get("threadId"))
        self._publish(event)

    def _publish(self, event: Message) -> None:
        try:
            self.aux.send([_EVENT_CONTROL, self._parent, EMPTY, dumps(event)])
        except OSError:
            log.warning("cannot publish debug_event %s", event.get("event"))

    def stopped_threads(self) -> list[int]:
        with self._state_lock:
            return sorted(self._stopped)

    # --- interrupts ------------------------------------------------------------------------

    def resume_for_interrupt(self, frame: Any, ident: int) -> bool:
        """Called by the SIGINT handler before it raises ``KeyboardInterrupt`` into a cell
        whose stack is ``frame``, on thread ``ident``: if pydevd holds that thread at a
        breakpoint, ask debugpy to continue (all threads, as a frontend's continue would) and
        wait until pydevd has let it go, so that the exception leaves pydevd's wait with its
        state consistent (the frontends get ``continued``). True if it did.

        debugpy answers ``continue`` only once the thread has left its wait, which, for the
        main thread, is after this handler returns: the request is not waited for."""
        client = self.client
        if not self.started or client is None or not held_at_breakpoint(frame):
            return False
        thread = threading._active.get(ident)  # type: ignore[attr-defined]
        try:
            client.send("continue", {"threadId": next(iter(self.stopped_threads()), 0)})
        except DapError as exc:
            log.warning("could not resume the stopped thread before interrupting it: %s", exc)
            return False
        # pydevd's per-thread state (the same internals ipykernel relies on): 2 = suspended.
        from _pydevd_bundle.pydevd_constants import STATE_SUSPEND

        info = getattr(thread, "additional_info", None)
        deadline = time.monotonic() + RESUME_TIMEOUT
        while getattr(info, "pydev_state", None) == STATE_SUSPEND:
            if time.monotonic() > deadline:
                log.warning("debugpy did not resume the stopped thread in time")
                return False
            time.sleep(0.005)
        log.info("interrupt while stopped at a breakpoint: resumed, raising KeyboardInterrupt")
        return True

    # --- Jupyter's requests ------------------------------------------------------------------

    def _debug_info(self, request: Message) -> Message:
        return _response(
            request,
            body={
                "isStarted": self.started,
                "hashMethod": "Murmur2",
                "hashSeed": compiler.CELL_HASH_SEED,
                "tmpFilePrefix": compiler.cell_dir() + os.sep,
                "tmpFileSuffix": ".py",
                "breakpoints": [
                    {"source": source, "breakpoints": breakpoints}
                    for source, breakpoints in self.breakpoints.items()
                ],
                "stoppedThreads": self.stopped_threads(),
                "richRendering": True,
                "exceptionPaths": ["Python Exceptions"],
                "copyToGlobals": True,
            },
        )

    def _inspect_variables(self, request: Message) -> Message:
        variables = self._explorer.namespace(self.shell.user_ns, self.shell.user_ns_hidden)
        return _response(request, body={"variables": variables})

    def _rich_inspect_variables(self, request: Message) -> Message:
        args = request.get("arguments") or {}
        name = args.get("variableName")
        if not isinstance(name, str) or not name.isidentifier():
            # JupyterLab asks about its own group rows too: nothing to render, not an error.
            ok = name in ("special variables", "function variables")
            return _response(request, ok, body={"data": {}, "metadata": {}})
        data: dict[str, Any] = {}
        metadata: dict[str, Any] = {}
        if self.stopped_threads() and self.client is not None and "frameId" in args:
            # In the stopped frame: IPython formats it there; the repr comes back as text.
            reply = self.client.request(
                "evaluate",
                {
                    "expression": f"get_ipython().display_formatter.format({name})",
                    "frameId": args["frameId"],
                    "context": "clipboard",
                },
            )
            if reply.get("success"):
                with contextlib.suppress(ValueError, SyntaxError, TypeError):
                    data, metadata = ast.literal_eval(reply["body"]["result"])
        else:
            result = self.shell.user_expressions({name: name})[name]
            if result.get("status") == "ok":
                data, metadata = result.get("data", {}), result.get("metadata", {})
        metadata = {k: v for k, v in metadata.items() if k in data}
        return _response(request, body={"data": data, "metadata": metadata})

    def _modules(self, request: Message) -> Message:
        args = request.get("arguments") or {}
        modules = list(sys.modules.values())
        start = int(args.get("startModule") or 0)
        count = int(args.get("moduleCount") or 0)
        chosen = modules[start : start + count] if count > 0 else modules[start:]
        listed = []
        for i, module in enumerate(chosen, start):
            origin = getattr(getattr(module, "__spec__", None), "origin", None)
            if isinstance(origin, str) and origin.endswith(".py"):
                listed.append({"id": i, "name": module.__name__, "path": origin})
        return _response(request, body={"modules": listed, "totalModules": len(modules)})

    def _copy_to_globals(self, request: Message) -> Message:
        args = request.get("arguments") or {}
        dst, src = args.get("dstVariableName"), args.get("srcVariableName")
        if not (isinstance(dst, str) and dst.isidentifier()) or not (
            isinstance(src, str) and src.isidentifier()
        ):
            return _failure(request, "dstVariableName and srcVariableName must be identifiers")
        if not self.started or self.client is None:
            return _failure(request, "copyToGlobals needs a stopped frame: the debugger is off")
        reply = self.client.request(
            "setExpression",
            {"expression": f"globals()[{dst!r}]", "value": src, "frameId": args.get("srcFrameId")},
        )
        reply["request_seq"] = request.get("seq", 0)
        reply["command"] = "copyToGlobals"
        return reply

    def _dump_cell(self, request: Message) -> Message:
        code = (request.get("arguments") or {}).get("code")
        if not isinstance(code, str):
            return _failure(request, "dumpCell needs arguments.code")
        return _response(request, body={"sourcePath": compiler.dump_cell(code)})

    def _set_breakpoints(self, request: Message) -> Message:
        args = request.get("arguments") or {}
        path = (args.get("source") or {}).get("path")
        response = self._forward(request)
        if isinstance(path, str):
            if response.get("success"):
                # debugpy may move a breakpoint to the next line with code: keep its lines.
                placed = (response.get("body") or {}).get("breakpoints", [])
                lines = [{"line": b["line"]} for b in placed if "line" in b]
            else:
                lines = list(args.get("breakpoints") or [])
            if lines:
                self.breakpoints[path] = lines
            else:
                self.breakpoints.pop(path, None)
        return response

    def _source(self, request: Message) -> Message:
        path = ((request.get("arguments") or {}).get("source") or {}).get("path")
        if isinstance(path, str):
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as f:
                    return _response(request, body={"content": f.read()})
            lines = linecache.getlines(path)  # a cell never dumped: IPython keeps its source
            if lines:
                return _response(request, body={"content": "".join(lines)})
        return _failure(request, "source unavailable")

    def _attach(self, request: Message) -> Message:
        assert self.client is not None and self._endpoint is not None
        args = dict(request.get("arguments") or {})
        host, port = self._endpoint
        args["connect"] = {"host": host, "port": port}
        # The worker's own code is never stepped into or stopped in.
        package = os.path.dirname(os.path.abspath(compiler.__file__))
        rules = list(args.get("rules") or [])
        rules.append({"path": os.path.join(package, "**"), "include": False})
        args["rules"] = rules
        if args.get("justMyCode") is False:
            args.setdefault("debugOptions", ["DebugStdLib"])
        # debugpy answers attach only once configuration is done: it first says
        # `initialized`, then waits for configurationDone. The frontend's own
        # configurationDone comes later and is answered here.
        pending = self.client.send("attach", args)
        if not self._initialized.wait(INITIALIZED_TIMEOUT):
            log.warning("debugpy sent no initialized event after attach")
        else:
            self.client.request("configurationDone")
        response = pending.result()
        response["request_seq"] = request.get("seq", 0)
        return response

    def _configuration_done(self, request: Message) -> Message:
        return _response(request)

    def _variables(self, request: Message) -> Message:
        if not self.stopped_threads() or self.client is None:
            args = request.get("arguments") or {}
            children = self._explorer.children(
                int(args.get("variablesReference") or 0),
                int(args.get("start") or 0),
                int(args.get("count") or 0),
            )
            if children is None:
                return _failure(request, "unknown variablesReference")
            return _response(request, body={"variables": children})
        response = self._forward(request)
        body = response.get("body") or {}
        if isinstance(body.get("variables"), list):
            body["variables"] = [v for v in body["variables"] if is_user_name(v.get("name", ""))]
        return response

    def _disconnect(self, request: Message) -> Message:
        try:
            response = self._forward(request, timeout=10)
        finally:
            self._stop()
        return response

    _STATIC: ClassVar[dict[str, Callable[[Debugger, Message], Message]]] = {
        "debugInfo": _debug_info,
        "inspectVariables": _inspect_variables,
        "richInspectVariables": _rich_inspect_variables,
        "modules": _modules,
        "copyToGlobals": _copy_to_globals,
        "variables": _variables,
    }
    _STARTED: ClassVar[dict[str, Callable[[Debugger, Message], Message]]] = {
        "dumpCell": _dump_cell,
        "setBreakpoints": _set_breakpoints,
        "source": _source,
        "attach": _attach,
        "configurationDone": _configuration_done,
        "disconnect": _disconnect,
    }
