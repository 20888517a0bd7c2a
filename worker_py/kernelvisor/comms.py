"""Jupyter comms (widgets and friends) through the ``comm`` package.

Notebook code creates comms with ``comm.create_comm`` and finds the manager with
``comm.get_comm_manager``; both are pointed at objects that publish through the IPC
outbox. Binary buffers go out as raw frames.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import comm
from comm.base_comm import BaseComm, BuffersType, CommManager, MaybeDict

from kernelvisor.outbox import Outbox


class IpcComm(BaseComm):
    def __init__(
        self, *args: Any, outbox: Outbox, parent: Callable[[], bytes | None], **kwargs: Any
    ) -> None:
        # Set before BaseComm.__init__, which may already publish comm_open.
        self._outbox = outbox
        self._parent = parent
        super().__init__(*args, **kwargs)

    def publish_msg(
        self,
        msg_type: str,
        data: MaybeDict = None,
        metadata: MaybeDict = None,
        buffers: BuffersType = None,
        **keys: Any,
    ) -> None:
        content = {"data": {} if data is None else data, "comm_id": self.comm_id, **keys}
        self._outbox.iopub(msg_type, self._parent(), content, metadata or {}, buffers or ())


def install(outbox: Outbox, parent: Callable[[], bytes | None]) -> CommManager:
    """Make the ``comm`` package create IpcComms and use one manager; return it."""
    manager = CommManager()

    def create_comm(*args: Any, **kwargs: Any) -> BaseComm:
        return IpcComm(*args, outbox=outbox, parent=parent, **kwargs)

    def get_comm_manager() -> CommManager:
        return manager

    comm.create_comm = create_comm
    comm.get_comm_manager = get_comm_manager
    return manager


def comm_info(manager: CommManager, target_name: str | None) -> dict[str, Any]:
    comms = list(manager.comms.items())  # a copy: the main thread may open or close comms
    return {
        "status": "ok",
        "comms": {
            comm_id: {"target_name": c.target_name}
            for comm_id, c in comms
            if target_name is None or c.target_name == target_name
        },
    }
