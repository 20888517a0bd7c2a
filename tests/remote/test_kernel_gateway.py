"""kernelvisor behind Jupyter Kernel Gateway (``jupyter kernelgateway``, on loopback, with
kernelvisor as its default kernel), driven by nbclient through jupyter_server's
GatewayKernelManager / GatewayKernelClient (HTTP + websocket), as a Jupyter server started with
``--gateway-url`` drives it.

Checked through the gateway: output, an interrupt of a runaway loop (nbclient's timeout asks the
gateway to interrupt), a segfaulting cell that leaves the kernel alive, a kernelvisor setting
taken from kernel.json's ``env`` (the gateway passes a client's environment only for ``KERNEL_*``
variables), a restart (a new supervisor process, a fresh namespace) and the shutdown.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import nbformat
import pytest
from jupyter_server.gateway.managers import GatewayKernelManager
from kvharness import install_kernelspec, kernelvisor_bin
from nbclient import NotebookClient
from nbformat import NotebookNode
from pkgharness import code_cell, error_of, result_of, stdout_of
from remoteharness import (
    LOOPBACK,
    base_env,
    free_port,
    gateway_client,
    get_json,
    jupyter_dirs,
    server,
)

pytestmark = pytest.mark.timeout(300)

# Seconds before nbclient asks the gateway to interrupt the runaway cell; nbclient then waits as
# long again for the reply before interrupting a second time (which would kill the worker).
RUNAWAY_TIMEOUT = 5
CELL_TIMEOUT = 90
MEMORY_LIMIT = "400M"


def timeout_for(cell: NotebookNode) -> int:
    return RUNAWAY_TIMEOUT if "while True" in cell.source else CELL_TIMEOUT


def first_notebook() -> NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        code_cell(
            "import os\nprint(os.environ.get('KERNEL_GREETING'), os.getppid())\n'output'",
        ),
        code_cell("n = 0\nwhile True:\n    n += 1", "raises-exception"),
        code_cell("print('interrupted, namespace kept:', n > 0)"),
        code_cell("import ctypes\nctypes.string_at(0)", "raises-exception"),
        # KERNELVISOR_MEMORY_LIMIT comes from kernel.json's env: the supervisor kills the worker.
        code_cell("big = b'x' * (1536 * 2**20)", "raises-exception"),
        code_cell("import os\nprint('alive', os.getppid())"),
    ]
    return nb


def after_restart_notebook() -> NotebookNode:
    nb = nbformat.v4.new_notebook()
    nb.cells = [code_cell("import os\nprint(os.getppid(), 'n' in globals())")]
    return nb


def gateway_kernel_manager() -> GatewayKernelManager:
    """A GatewayKernelManager for nbclient. The gateway owns the kernel process: with
    ``owns_kernel=False`` the client's readiness check does not look for a local process
    (GatewayKernelManager overrides ``is_alive`` but not jupyter_client's ``_async_is_alive``,
    which asserts a local provisioner)."""
    return GatewayKernelManager(owns_kernel=False)


async def run(nb: NotebookNode, km: GatewayKernelManager) -> None:
    client = NotebookClient(
        nb,
        km=km,
        kernel_name="kernelvisor",
        timeout_func=timeout_for,
        interrupt_on_timeout=True,
        startup_timeout=90,
    )
    # The client does not own km: the kernel outlives the run (cleanup_kc=False).
    await client.async_execute(kernel_name="kernelvisor", cleanup_kc=False)
    if client.kc is not None:
        client.kc.stop_channels()


def test_kernel_gateway(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    prefix = tmp_path / "prefix"
    install_kernelspec(
        kernelvisor_bin(), prefix, "--env", f"KERNELVISOR_MEMORY_LIMIT={MEMORY_LIMIT}"
    )
    port = free_port()
    url = f"http://{LOOPBACK}:{port}"
    env = base_env() | jupyter_dirs(tmp_path) | {"JUPYTER_PATH": str(prefix / "share/jupyter")}
    argv = [
        sys.executable,
        "-m",
        "jupyter",
        "kernelgateway",
        f"--ip={LOOPBACK}",
        f"--port={port}",
        "--KernelGatewayApp.default_kernel_name=kernelvisor",
        # GET /api/kernels (checked below) is off by default.
        "--JupyterWebsocketPersonality.list_kernels=True",
    ]
    # A KERNEL_* variable of the client reaches the kernel; others do not (the gateway's rule).
    monkeypatch.setenv("KERNEL_GREETING", "hello-from-the-client")
    with server(argv, url, env, tmp_path / "gateway.log"), gateway_client(url):
        specs = get_json(f"{url}/api/kernelspecs")
        assert specs["default"] == "kernelvisor"
        assert "kernelvisor" in specs["kernelspecs"]

        km = gateway_kernel_manager()
        nb = first_notebook()
        asyncio.run(run(nb, km))
        hello, crash, memory, alive = (nb.cells[0], nb.cells[3], nb.cells[4], nb.cells[5])
        greeting, supervisor = stdout_of(hello).split()
        assert greeting == "hello-from-the-client"
        assert result_of(hello) == "'output'"

        interrupted = error_of(nb.cells[1])
        assert interrupted is not None and interrupted["ename"] == "KeyboardInterrupt"
        assert stdout_of(nb.cells[2]) == "interrupted, namespace kept: True\n"

        err = error_of(crash)
        assert err is not None and err["ename"] == "WorkerCrashed", crash.outputs
        assert "SIGSEGV" in err["evalue"]
        err = error_of(memory)
        assert err is not None and err["ename"] == "WorkerCrashed", memory.outputs
        assert "out of memory" in err["evalue"], err
        # The same supervisor throughout: no gateway-level restart happened.
        assert stdout_of(alive) == f"alive {supervisor}\n"

        kernel_id = km.kernel_id
        assert [k["id"] for k in get_json(f"{url}/api/kernels")] == [kernel_id]

        asyncio.run(km.restart_kernel())
        nb2 = after_restart_notebook()
        asyncio.run(run(nb2, km))
        new_supervisor, has_n = stdout_of(nb2.cells[0]).split()
        assert new_supervisor != supervisor, "restart must start a new kernel process"
        assert has_n == "False"
        assert km.kernel_id == kernel_id

        asyncio.run(km.shutdown_kernel())
        assert get_json(f"{url}/api/kernels") == []
