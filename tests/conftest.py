"""Fixtures for the whole suite: every kernel the tests start keeps its IPython state in a
directory of the session's own."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest


@pytest.fixture(scope="session", autouse=True)
def own_ipython_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """``IPYTHONDIR`` for the session (kernels inherit it), not the user's ``~/.ipython``.

    The suite runs many kernels at once. When IPython cannot lock the history database, it
    moves the file aside as "corrupt", and that would happen to the user's own history. Some
    tests also search the history, so rows from an earlier run or another program would
    change their results. Tests that need a profile of their own still set ``IPYTHONDIR``."""
    before = os.environ.get("IPYTHONDIR")
    os.environ["IPYTHONDIR"] = str(tmp_path_factory.mktemp("ipython"))
    yield
    if before is None:
        del os.environ["IPYTHONDIR"]
    else:
        os.environ["IPYTHONDIR"] = before
