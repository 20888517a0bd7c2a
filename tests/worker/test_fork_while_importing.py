"""A snapshot (or any fork of a worker) is refused while another thread is importing: the copy
would keep that module's import lock held forever, and hang on its next import of it."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from kernelvisor.snapshot import _import_in_progress


def test_an_import_in_another_thread_is_seen(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    release = threading.Event()
    entered = threading.Event()
    (tmp_path / "kv_slow_import.py").write_text(
        "import builtins\nbuiltins._kv_entered.set()\nbuiltins._kv_release.wait(30)\n"
    )
    import builtins

    monkeypatch.setattr(builtins, "_kv_entered", entered, raising=False)
    monkeypatch.setattr(builtins, "_kv_release", release, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert _import_in_progress() is None
    importer = threading.Thread(target=__import__, args=("kv_slow_import",), daemon=True)
    importer.start()
    try:
        assert entered.wait(10), "the import did not start"
        assert _import_in_progress() == "kv_slow_import"
    finally:
        release.set()
        importer.join(10)
    assert _import_in_progress() is None
    sys.modules.pop("kv_slow_import", None)
