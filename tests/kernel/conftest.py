"""Fixtures: kernelspecs in a temp dir (nothing is written to ~/.local) and running kernels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from ipykernel.kernelspec import install as install_ipykernel_spec
from kvharness import KERNELVISOR, Kernel, install_kernelspec, kernelvisor_bin, running_kernel


@pytest.fixture(scope="session")
def kv_bin() -> Path:
    path = kernelvisor_bin()
    if not path.is_file():
        pytest.fail(
            f"kernelvisor binary not found at {path}: run scripts/install or set KERNELVISOR_BIN"
        )
    return path


@pytest.fixture(scope="session", autouse=True)
def kernelspecs(kv_bin: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Install both kernelspecs under a temp prefix and point Jupyter at it for the session."""
    prefix = tmp_path_factory.mktemp("jupyter-prefix")
    install_kernelspec(kv_bin, prefix)
    install_kernelspec(kv_bin, prefix, "--backend", "trio")
    # ipykernel's spec too, pinned to this interpreter: a user-level "python3" spec could
    # otherwise point the side-by-side tests at some other Python.
    install_ipykernel_spec(prefix=str(prefix))
    data = prefix / "share" / "jupyter"
    assert (data / "kernels" / KERNELVISOR / "kernel.json").is_file()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("JUPYTER_PATH", str(data))
        mp.setenv("JUPYTER_RUNTIME_DIR", str(tmp_path_factory.mktemp("jupyter-runtime")))
        yield data


@pytest.fixture
def kernel(request: pytest.FixtureRequest) -> Iterator[Kernel]:
    """A started kernel (kernelvisor unless parametrized indirectly) with a ready client."""
    name = getattr(request, "param", KERNELVISOR)
    with running_kernel(name) as k:
        yield k
