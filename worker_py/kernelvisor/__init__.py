"""kernelvisor's Python worker: runs cells for the Rust supervisor over a Unix socket.

Importing the package must stay cheap: the supervisor imports nothing, but tools and
tests do, and IPython is only loaded by ``kernelvisor.worker`` when a worker starts.
``Caller`` and ``Pending`` (``from kernelvisor import Caller``) are loaded, with anyio, on
first access.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

__all__ = ["Caller", "InvalidStateError", "Pending", "PendingCancelled", "__version__"]

if TYPE_CHECKING:
    from kernelvisor.caller import Caller, InvalidStateError, Pending, PendingCancelled

_LAZY = {
    "Caller": "kernelvisor.caller",
    "Pending": "kernelvisor._pending",
    "PendingCancelled": "kernelvisor._pending",
    "InvalidStateError": "kernelvisor._pending",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'kernelvisor' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})
