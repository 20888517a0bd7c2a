"""kernelvisor under Jupyter Enterprise Gateway 3.3 (``jupyter enterprisegateway`` on loopback),
launched by its DistributedProcessProxy through ``python -m kernelvisor.eg_launcher``, from the
template in kernelspec/enterprise-gateway/. Nothing of EG is imitated: its own process proxy and
response manager receive and decrypt the launcher's connection info, interrupt through the
communication port, and shut the launcher down through it; nbclient drives the kernel through
jupyter_server's gateway client.

EG pins jupyter_server 1 and jupyter_client 6, so it runs from its own virtualenv (made on first
use in ~/.cache/kernelvisor-tests, or $KERNELVISOR_EG_VENV); the kernel runs from this one, as a kernel on a remote host
runs from that host's environment. The distributed proxy starts a kernel on the gateway's own host
without ssh, which is what happens here ("localhost"); across hosts only the transport differs.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import sys
from pathlib import Path

import nbformat
import psutil
import pytest
from jupyter_server.gateway.managers import GatewayKernelManager
from kvharness import kernelvisor_bin
from nbclient import NotebookClient
from nbformat import NotebookNode
from pkgharness import REPO, code_cell, error_of, make_venv, result_of, run, stdout_of
from remoteharness import (
    LOOPBACK,
    base_env,
    free_port,
    gateway_client,
    get_json,
    jupyter_dirs,
    server,
)

pytestmark = pytest.mark.timeout(900)

EG_REQUIREMENT = "jupyter_enterprise_gateway==3.3.0"
# A cache outside the repository, so that a fresh clone (CI) does not build it again.
EG_VENV = Path(
    os.environ.get("KERNELVISOR_EG_VENV")
    or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    / f"kernelvisor-tests/eg-3.3.0-py{sys.version_info[0]}.{sys.version_info[1]}"
)
TEMPLATE = REPO / "kernelspec/enterprise-gateway/kernelvisor_distributed/kernel.json"
PORT_RANGE = (41000, 42999)
RUNAWAY_TIMEOUT = 5  # as in test_kernel_gateway.py


@pytest.fixture(scope="module")
def eg_command() -> Path:
    """``jupyter-enterprisegateway`` of EG's own virtualenv (made once, reused after)."""
    stamp = EG_VENV / "kernelvisor-stamp"
    if not (stamp.is_file() and stamp.read_text() == EG_REQUIREMENT):
        shutil.rmtree(EG_VENV, ignore_errors=True)
        make_venv(EG_VENV)
        pip = [EG_VENV / "bin/python", "-m", "pip", "install", "-q", "--disable-pip-version-check"]
        run([*pip, EG_REQUIREMENT])
        stamp.write_text(EG_REQUIREMENT)
    return EG_VENV / "bin/jupyter-enterprisegateway"


def install_specs(kernels: Path) -> None:
    """The distributed template, pointed at this python and binary, and a variant that passes
    EG's values as environment variables, as a kernel image's entry point gets them."""
    spec = json.loads(TEMPLATE.read_text())
    spec["argv"][0] = sys.executable
    spec["env"] = {"KERNELVISOR_BIN": str(kernelvisor_bin())}
    (kernels / "kernelvisor_distributed").mkdir(parents=True)
    (kernels / "kernelvisor_distributed/kernel.json").write_text(json.dumps(spec))
    env_form = dict(spec, display_name="kernelvisor (launcher configured by environment)")
    env_form["argv"] = [
        "/usr/bin/env",
        "KERNEL_ID={kernel_id}",
        "RESPONSE_ADDRESS={response_address}",
        "PUBLIC_KEY={public_key}",
        "PORT_RANGE={port_range}",
        sys.executable,
        "-m",
        "kernelvisor.eg_launcher",
    ]
    (kernels / "kernelvisor_env").mkdir()
    (kernels / "kernelvisor_env/kernel.json").write_text(json.dumps(env_form))


async def run_notebook(nb: NotebookNode, km: GatewayKernelManager, kernel_name: str) -> None:
    client = NotebookClient(
        nb,
        km=km,
        kernel_name=kernel_name,
        timeout_func=lambda cell: RUNAWAY_TIMEOUT if "while True" in cell.source else 90,
        interrupt_on_timeout=True,
        startup_timeout=120,
    )
    await client.async_execute(kernel_name=kernel_name, cleanup_kc=False)
    if client.kc is not None:
        client.kc.stop_channels()


async def debugger_through_gateway(km: GatewayKernelManager) -> tuple[dict, dict]:  # type: ignore[type-arg]
    """kernel_info and a DAP ``initialize``, through the gateway's websocket as JupyterLab's
    debugger panel sends them (control channel)."""
    kc = km.client()
    await kc.start_channels()
    try:
        replies = []
        for msg_type, content in [
            ("kernel_info_request", {}),
            (
                "debug_request",
                {
                    "type": "request",
                    "seq": 1,
                    "command": "initialize",
                    "arguments": {"clientID": "kv-test", "adapterID": "python"},
                },
            ),
        ]:
            msg = kc.session.msg(msg_type, content)
            # As JupyterLab's websocket messages say it (the queue does not add it).
            msg["channel"] = "control"
            kc.control_channel.send(msg)
            while True:
                reply = await kc.control_channel.get_msg(timeout=60)
                if reply["parent_header"].get("msg_id") == msg["header"]["msg_id"]:
                    replies.append(reply["content"])
                    break
        return replies[0], replies[1]
    finally:
        kc.stop_channels()


def listening_ports(proc: psutil.Process) -> set[int]:
    return {c.laddr.port for c in proc.net_connections("tcp") if c.status == psutil.CONN_LISTEN}


def in_range(port: int) -> bool:
    return PORT_RANGE[0] <= port <= PORT_RANGE[1]


def assert_gone(*procs: psutil.Process) -> None:
    _, alive = psutil.wait_procs(procs, timeout=30)
    assert not alive, f"still running: {alive}"


def test_enterprise_gateway(
    eg_command: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # EG refuses to start kernels for root (EG_UNAUTHORIZED_USERS); CI runs as root. The
    # gateway client sends KERNEL_* variables of its environment with the start request.
    monkeypatch.setenv("KERNEL_USERNAME", "kernelvisor-test")
    prefix = tmp_path / "prefix"
    install_specs(prefix / "share/jupyter/kernels")
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    log_dir = tmp_path / "kernel-logs"
    log_dir.mkdir()
    env = (
        base_env()
        | jupyter_dirs(tmp_path)
        | {
            "JUPYTER_PATH": str(prefix / "share/jupyter"),
            # EG's response socket on loopback (it would bind the host's public address).
            "EG_RESPONSE_IP": LOOPBACK,
            "EG_RESPONSE_PORT": str(free_port()),
            "EG_KERNEL_LOG_DIR": str(log_dir),
            "EG_KERNEL_LAUNCH_TIMEOUT": "120",
        }
    )
    argv = [
        str(eg_command),
        f"--ip={LOOPBACK}",
        f"--port={port}",
        "--EnterpriseGatewayApp.default_kernel_name=kernelvisor_distributed",
        f"--EnterpriseGatewayApp.port_range={PORT_RANGE[0]}..{PORT_RANGE[1]}",
        "--EnterpriseGatewayApp.list_kernels=True",
        "--debug",
    ]
    eg_log = tmp_path / "eg.log"
    with server(argv, url, env, eg_log), gateway_client(url):
        specs = get_json(f"{url}/api/kernelspecs")
        assert specs["default"] == "kernelvisor_distributed"
        spec = specs["kernelspecs"]["kernelvisor_distributed"]["spec"]
        assert spec["metadata"]["debugger"] is True, "JupyterLab offers its debugger"

        km = GatewayKernelManager(owns_kernel=False)  # see test_kernel_gateway.py
        nb = nbformat.v4.new_notebook()
        nb.cells = [
            code_cell("import os\nprint(os.getppid())"),
            code_cell("n = 0\nwhile True:\n    n += 1", "raises-exception"),
            code_cell("print('interrupted, namespace kept:', n > 0)"),
            code_cell("import ctypes\nctypes.string_at(0)", "raises-exception"),
            code_cell("import os\nprint('alive', os.getppid())"),
        ]
        asyncio.run(run_notebook(nb, km, "kernelvisor_distributed"))
        supervisor = psutil.Process(int(stdout_of(nb.cells[0])))
        assert supervisor.name() == "kernelvisor"
        launcher = supervisor.parent()
        assert launcher is not None and "kernelvisor.eg_launcher" in launcher.cmdline()
        interrupted = error_of(nb.cells[1])
        assert interrupted is not None and interrupted["ename"] == "KeyboardInterrupt"
        assert stdout_of(nb.cells[2]) == "interrupted, namespace kept: True\n"
        crash = error_of(nb.cells[3])
        assert crash is not None and crash["ename"] == "WorkerCrashed"
        assert stdout_of(nb.cells[4]) == f"alive {supervisor.pid}\n"

        # The debugger answers through the gateway (debugpy is a dependency of the wheel, so
        # the template's metadata.debugger is true).
        info, initialized = asyncio.run(debugger_through_gateway(km))
        assert info["debugger"] is True, info
        assert initialized["success"] is True, initialized
        assert initialized["command"] == "initialize", initialized

        # The five kernel ports and the communication port were picked in EG's port range.
        kernel_ports = listening_ports(supervisor)
        assert len(kernel_ports) == 5 and all(map(in_range, kernel_ports)), kernel_ports
        (comm_port,) = listening_ports(launcher)
        assert in_range(comm_port), comm_port

        # EG's restart: a new launcher and supervisor; the old ones are gone.
        asyncio.run(km.restart_kernel())
        nb2 = nbformat.v4.new_notebook()
        nb2.cells = [code_cell("import os\nprint(os.getppid(), 'n' in globals())")]
        asyncio.run(run_notebook(nb2, km, "kernelvisor_distributed"))
        new_pid, has_n = stdout_of(nb2.cells[0]).split()
        assert has_n == "False"
        assert int(new_pid) != supervisor.pid
        assert_gone(supervisor, launcher)
        new_supervisor = psutil.Process(int(new_pid))
        new_launcher = new_supervisor.parent()
        assert new_launcher is not None

        kernel_id = km.kernel_id
        asyncio.run(km.shutdown_kernel())
        assert_gone(new_supervisor, new_launcher)

        # The entry point of a kernel image: the same contract, values from the environment.
        km_env = GatewayKernelManager(owns_kernel=False)
        nb3 = nbformat.v4.new_notebook()
        nb3.cells = [code_cell("6 * 7")]
        asyncio.run(run_notebook(nb3, km_env, "kernelvisor_env"))
        assert result_of(nb3.cells[0]) == "42"
        asyncio.run(km_env.shutdown_kernel())
        assert get_json(f"{url}/api/kernels") == []

    # What EG's own code did with the launcher (its debug log) ...
    text = eg_log.read_text()
    assert re.search(r"Received connection info for KernelID '[^']+' from host", text)
    assert "Signal (2) sent via gateway communication port." in text
    assert "Shutdown request sent to listener via gateway communication port." in text
    # ... and what the launcher did with EG's requests (EG writes its output to a log file).
    launcher_log = (log_dir / f"kernel-{kernel_id}.log").read_text()
    assert "signal 2 for the kernel (communication port)" in launcher_log
    assert "shutdown requested (communication port)" in launcher_log


def test_comm_port_liveness_and_death(eg_command: Path, tmp_path: Path) -> None:
    """EG's liveness poll (``{"signum": 0}``) leaves the kernel alone; when the supervisor dies,
    the launcher exits and its communication port refuses connections, which EG's process
    proxy reads as "no process". The launcher's payload is received by EG's ResponseManager."""
    driver = tmp_path / "receive.py"
    driver.write_text(RECEIVER)
    env = base_env() | {"EG_RESPONSE_IP": LOOPBACK, "EG_RESPONSE_PORT": str(free_port())}
    receiver = psutil.Popen(
        [EG_VENV / "bin/python", driver], env=env, stdout=-1, stderr=-1, text=True
    )
    try:
        assert receiver.stdout is not None
        hello = json.loads(receiver.stdout.readline())
        launcher = psutil.Popen(
            [
                sys.executable,
                "-m",
                "kernelvisor.eg_launcher",
                "--RemoteProcessProxy.kernel-id",
                hello["kernel_id"],
                "--RemoteProcessProxy.response-address",
                hello["response_address"],
                "--RemoteProcessProxy.public-key",
                hello["public_key"],
                "--ip",
                LOOPBACK,
            ],
            env=base_env() | {"KERNELVISOR_BIN": str(kernelvisor_bin())},
        )
        info = json.loads(receiver.stdout.readline())
        assert info["pid"] == launcher.pid
        assert info["kernel_id"] == hello["kernel_id"]
        assert info["ip"] == LOOPBACK and info["key"]
        comm = (LOOPBACK, int(info["comm_port"]))
        for _ in range(3):  # as EG polls: connect, send, close
            with socket.create_connection(comm, timeout=10) as s:
                s.sendall(json.dumps({"signum": 0}).encode())
        (supervisor,) = launcher.children()
        assert supervisor.is_running() and launcher.is_running()

        supervisor.kill()
        launcher.wait(30)  # the launcher ends with its supervisor
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(comm, timeout=10).close()
    finally:
        receiver.kill()
        receiver.wait(10)


# Runs in EG's virtualenv: EG's ResponseManager makes the key pair and the response socket,
# then waits for the launcher's payload and prints what it decrypted.
RECEIVER = """
import asyncio, json, uuid
from tornado.ioloop import IOLoop
from enterprise_gateway.services.processproxies.processproxy import ResponseManager

async def main():
    manager = ResponseManager.instance()
    kernel_id = str(uuid.uuid4())
    manager.register_event(kernel_id)
    print(json.dumps({"kernel_id": kernel_id, "response_address": manager.response_address,
                      "public_key": manager.public_key}), flush=True)
    while True:
        try:
            info = await manager.get_connection_info(kernel_id)
            break
        except asyncio.TimeoutError:
            continue
    print(json.dumps(info), flush=True)

IOLoop.current().run_sync(main, timeout=120)
"""
