"""Helpers for the browser tests: the JupyterLab server under test, isolated in temp dirs, and
the Chromium it is viewed in."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
from playwright.sync_api import Page, WebSocket

CHROMIUM = Path(os.environ.get("KERNELVISOR_CHROMIUM") or "/usr/bin/chromium")
# The flags this machine needs: without the background-networking ones Chromium keeps trying
# to reach hosts that the closed network refuses.
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
TOKEN = "kernelvisor-browser-test"
# Upper bounds only (a cold start on a loaded 2-core CI box is slow); nothing waits this long
# when things work.
STARTUP_TIMEOUT = 60.0
UI_TIMEOUT_MS = 60_000

# User settings of the isolated JupyterLab: no news/update prompt (it asks, and would fetch from
# the network), every cell attached to the DOM (no windowing), no autosave.
LAB_USER_SETTINGS: dict[str, dict[str, Any]] = {
    "@jupyterlab/apputils-extension/notification": {"fetchNews": "false", "checkForUpdates": False},
    "@jupyterlab/notebook-extension/tracker": {"windowingMode": "none"},
    "@jupyterlab/docmanager-extension/plugin": {"autosave": False},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Lab:
    """A running `jupyter lab`."""

    url: str
    token: str
    root: Path
    proc: subprocess.Popen[bytes]
    log: Path

    def api(self, path: str, method: str = "GET") -> Any:
        req = urllib.request.Request(
            f"{self.url}{path}", method=method, headers={"Authorization": f"token {self.token}"}
        )
        with urllib.request.urlopen(req, timeout=10) as resp:
            body = resp.read()
        return json.loads(body) if body else None

    def log_tail(self, chars: int = 6000) -> str:
        return self.log.read_text(errors="replace")[-chars:]

    def kernel_processes(self) -> list[psutil.Process]:
        """The kernelvisor supervisors that this server started."""
        try:
            children = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []
        out = []
        for p in children:
            try:
                if p.name() == "kernelvisor":
                    out.append(p)
            except psutil.NoSuchProcess:
                pass
        return out


def start_lab(base: Path, jupyter_path: Path) -> Lab:
    """Starts `jupyter lab` on a free port with a fixed token; its root, config, data, runtime,
    settings and workspaces dirs (and IPython's) all under ``base``. Returns once its API
    answers; raises RuntimeError (with the server's log) if it does not."""
    root = base / "root"
    root.mkdir()
    env = dict(os.environ)
    env["JUPYTER_PATH"] = str(jupyter_path)
    for var in ("JUPYTER_CONFIG_DIR", "JUPYTER_DATA_DIR", "JUPYTER_RUNTIME_DIR", "IPYTHONDIR"):
        d = base / var.lower()
        d.mkdir()
        env[var] = str(d)
    # jupyter_lsp looks for language servers, running `npm prefix -g` (which writes npm's log
    # under ~/.npm): not needed here.
    server_config = {"ServerApp": {"jpserver_extensions": {"jupyter_lsp": False}}}
    (base / "jupyter_config_dir" / "jupyter_server_config.json").write_text(
        json.dumps(server_config)
    )
    settings = base / "lab-user-settings"
    env["JUPYTERLAB_SETTINGS_DIR"] = str(settings)
    env["JUPYTERLAB_WORKSPACES_DIR"] = str(base / "lab-workspaces")
    for plugin, values in LAB_USER_SETTINGS.items():
        path = settings / f"{plugin}.jupyterlab-settings"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(values))

    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "jupyterlab",
        "--no-browser",
        "--ServerApp.ip=127.0.0.1",
        f"--ServerApp.port={port}",
        "--ServerApp.port_retries=0",
        f"--IdentityProvider.token={TOKEN}",
        f"--ServerApp.root_dir={root}",
        # CI runs as root.
        "--ServerApp.allow_root=True",
        "--ServerApp.terminals_enabled=False",
        # Nothing that reaches the network: no news feed, no update check, no PyPI queries.
        "--LabApp.news_url=None",
        "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
        "--LabApp.extension_manager=readonly",
        # window.jupyterapp: the command registry and the session's kernel status.
        "--LabApp.expose_app_in_browser=True",
    ]
    log = base / "jupyterlab.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            env=env,
            cwd=root,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    lab = Lab(f"http://127.0.0.1:{port}", TOKEN, root, proc, log)
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"jupyter lab exited with {proc.returncode}:\n{lab.log_tail()}")
        try:
            lab.api("/api/status")
            return lab
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            stop_lab(lab)
            raise RuntimeError(
                f"jupyter lab did not answer in {STARTUP_TIMEOUT:.0f}s:\n{lab.log_tail()}"
            )
        time.sleep(0.2)


def stop_lab(lab: Lab) -> list[str]:
    """Shuts the server down through its API (which shuts its kernels down). Returns the
    problems: the server not exiting, or processes it started (kernels, their workers) left
    running; those are killed."""
    problems = []
    try:
        tree = [psutil.Process(lab.proc.pid), *psutil.Process(lab.proc.pid).children(True)]
    except psutil.NoSuchProcess:
        tree = []
    try:
        lab.api("/api/shutdown", method="POST")
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        problems.append(f"/api/shutdown failed: {exc}")
    try:
        lab.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        problems.append("jupyter lab did not exit within 30s of /api/shutdown")
        os.killpg(lab.proc.pid, signal.SIGKILL)
        lab.proc.wait(timeout=10)
    _, alive = psutil.wait_procs(tree, timeout=15)
    for p in alive:
        try:
            problems.append(f"process left running: {p.pid} {p.name()} {p.cmdline()}")
            p.kill()
        except psutil.NoSuchProcess:
            pass
    return problems


class KernelTraffic:
    """The kernel messages a page sends over its kernel websockets, decoded (JSON frames, or
    the binary v1.kernel.websocket.jupyter.org frames that JupyterLab 4 prefers)."""

    def __init__(self, page: Page) -> None:
        self.sent: list[dict[str, Any]] = []
        page.on("websocket", self._watch)

    def _watch(self, ws: WebSocket) -> None:
        if "/api/kernels/" in ws.url:
            ws.on("framesent", self._record)

    def _record(self, payload: str | bytes) -> None:
        msg = decode_kernel_frame(payload)
        if msg is not None:
            self.sent.append(msg)

    def execute_requests(self) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["header"].get("msg_type") == "execute_request"]


def decode_kernel_frame(payload: str | bytes) -> dict[str, Any] | None:
    """A kernel websocket frame as a message dict (channel, header, parent_header, metadata,
    content), or None if it is not one."""
    if isinstance(payload, str):
        msg = json.loads(payload)
        return msg if isinstance(msg, dict) and "header" in msg else None
    # v1: the number of offsets, the offsets (u64 LE), then the channel and the JSON parts.
    count = int.from_bytes(payload[:8], "little")
    offsets = [int.from_bytes(payload[8 * (i + 1) : 8 * (i + 2)], "little") for i in range(count)]
    if count < 6:
        return None
    parts = [payload[offsets[i] : offsets[i + 1]] for i in range(count - 1)]
    keys = ("header", "parent_header", "metadata", "content")
    msg = {k: json.loads(part) for k, part in zip(keys, parts[1:5], strict=True)}
    msg["channel"] = parts[0].decode()
    return msg
