"""Fixtures for the browser tests: a real JupyterLab (Jupyter Server) on a free localhost port,
isolated in temp dirs, with the kernelvisor kernelspec installed under a temp prefix, and Debian's
headless Chromium driven by Playwright. Nothing is written to ~/.local or ~/.jupyter."""

from __future__ import annotations

import os
import urllib.error
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from kvharness import install_kernelspec, kernelvisor_bin
from labharness import (
    CHROMIUM,
    CHROMIUM_ARGS,
    UI_TIMEOUT_MS,
    Lab,
    start_lab,
    stop_lab,
)
from playwright.sync_api import BrowserContext, Page, sync_playwright
from playwright.sync_api import Error as PlaywrightError


@pytest.fixture(scope="session")
def kernelspec_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The kernelvisor kernelspec, installed under a temp prefix; its share/jupyter dir."""
    kv = kernelvisor_bin()
    if not kv.is_file():
        pytest.fail(
            f"kernelvisor binary not found at {kv}: run scripts/install or set KERNELVISOR_BIN"
        )
    prefix = tmp_path_factory.mktemp("jupyter-prefix")
    install_kernelspec(kv, prefix)
    data = prefix / "share" / "jupyter"
    assert (data / "kernels" / "kernelvisor" / "kernel.json").is_file()
    return data


@pytest.fixture(scope="session")
def lab(kernelspec_path: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Lab]:
    """`jupyter lab`, isolated; at the end it is shut down with its kernels, and no process it
    started may be left."""
    try:
        server = start_lab(tmp_path_factory.mktemp("jupyterlab"), kernelspec_path)
    except RuntimeError as exc:
        pytest.fail(str(exc))
    yield server
    problems = stop_lab(server)
    assert not problems, "\n".join(problems) + f"\nserver log tail:\n{server.log_tail()}"


@pytest.fixture(scope="session")
def browser_context(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    """Debian's Chromium, headless, with a fresh user-data dir."""
    if not CHROMIUM.is_file():
        pytest.fail(f"{CHROMIUM} not found: scripts/test installs Debian's chromium package")
    profile = tmp_path_factory.mktemp("chromium-profile")
    # Its own home too: Chromium (GTK's dconf) writes under ~/.cache otherwise.
    home = tmp_path_factory.mktemp("chromium-home")
    env = {**os.environ, "HOME": str(home), "XDG_CACHE_HOME": str(home / ".cache")}
    env["XDG_CONFIG_HOME"] = str(home / ".config")
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(profile),
            executable_path=str(CHROMIUM),
            headless=True,
            args=CHROMIUM_ARGS,
            env=env,
            viewport={"width": 1400, "height": 2000},
        )
        context.set_default_timeout(UI_TIMEOUT_MS)
        try:
            yield context
        finally:
            context.close()


REPORTS = pytest.StashKey[dict[str, pytest.TestReport]]()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keeps each phase's report on the item, for the page fixture's failure screenshot."""
    report = yield
    item.stash.setdefault(REPORTS, {})[report.when] = report
    return report


@pytest.fixture
def page(
    browser_context: BrowserContext, lab: Lab, request: pytest.FixtureRequest, tmp_path: Path
) -> Iterator[Page]:
    """A new tab. On failure: a screenshot in the test's tmp dir, the browser console and the
    server log's tail (kernel stderr included) in the report. Afterwards, the server's sessions
    (and so their kernels) are shut down."""
    page = browser_context.new_page()
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    try:
        yield page
    finally:
        report = request.node.stash.get(REPORTS, {}).get("call")
        if report is not None and report.failed:
            shot = tmp_path / "failure.png"
            try:
                page.screenshot(path=str(shot), full_page=True)
                print(f"screenshot: {shot}")
            except PlaywrightError as exc:
                print(f"no screenshot: {exc}")
            print("browser console (last 40 lines):\n" + "\n".join(console[-40:]))
            print(f"jupyter lab log ({lab.log}), tail:\n{lab.log_tail()}")
        page.close()
        try:
            for session in lab.api("/api/sessions"):
                lab.api(f"/api/sessions/{session['id']}", method="DELETE")
        except urllib.error.URLError as exc:
            print(f"could not shut the sessions down: {exc}")
