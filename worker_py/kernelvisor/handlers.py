"""Requests answered off the main thread, so they are served while a cell runs:
complete, inspect, is_complete and history. Each takes the shell and the request
content and returns the reply content."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from IPython.core.completer import provisionalcompleter, rectify_completions
from IPython.core.interactiveshell import InteractiveShell
from IPython.utils.tokenutil import token_at_cursor

Content = dict[str, Any]

_TYPES_KEY = "_jupyter_types_experimental"


def _cursor(content: Content, code: str) -> int:
    pos = content.get("cursor_pos")
    return len(code) if pos is None else int(pos)


def complete(shell: InteractiveShell, content: Content) -> Content:
    code = str(content.get("code", ""))
    cursor_pos = _cursor(content, code)
    # IPython's multi-line completion API (jedi-backed when jedi is installed), which
    # also reports each completion's type and signature, as ipykernel does.
    with provisionalcompleter():
        completions = list(rectify_completions(code, shell.Completer.completions(code, cursor_pos)))
    if completions:
        start, end = completions[0].start, completions[0].end
    else:
        start = end = cursor_pos
    types = [
        {"start": c.start, "end": c.end, "text": c.text, "type": c.type, "signature": c.signature}
        for c in completions
    ]
    return {
        "status": "ok",
        "matches": [c.text for c in completions],
        "cursor_start": start,
        "cursor_end": end,
        "metadata": {_TYPES_KEY: types},
    }


def inspect(shell: InteractiveShell, content: Content) -> Content:
    code = str(content.get("code", ""))
    name = token_at_cursor(code, _cursor(content, code))
    reply: Content = {"status": "ok", "found": False, "data": {}, "metadata": {}}
    try:
        bundle = shell.object_inspect_mime(
            name,
            detail_level=int(content.get("detail_level", 0)),
            omit_sections=tuple(content.get("omit_sections", ())),
        )
    except KeyError:
        return reply
    if not shell.enable_html_pager:
        bundle.pop("text/html", None)
    reply["data"] = bundle
    reply["found"] = True
    return reply


def is_complete(shell: InteractiveShell, content: Content) -> Content:
    status, indent = shell.input_transformer_manager.check_complete(str(content.get("code", "")))
    reply: Content = {"status": status}
    if status == "incomplete":
        reply["indent"] = " " * (indent or 0)
    return reply


def history(shell: InteractiveShell, content: Content) -> Content:
    manager = shell.history_manager
    assert manager is not None  # created in InteractiveShell.__init__
    # Inputs are cached and written when the worker is idle (see shell_config); a range
    # query for this session by its number reads the database, so write the cache first.
    manager.writeout_cache()
    kind = content.get("hist_access_type")
    raw = bool(content.get("raw", True))
    output = bool(content.get("output", False))
    n = content.get("n")
    if kind == "tail":
        entries = manager.get_tail(n, raw=raw, output=output, include_latest=True)
    elif kind == "range":
        entries = manager.get_range(
            content.get("session", 0),
            content.get("start", 0),
            content.get("stop"),
            raw=raw,
            output=output,
        )
    elif kind == "search":
        entries = manager.search(
            content.get("pattern", "*"),
            raw=raw,
            output=output,
            n=n,
            unique=bool(content.get("unique", False)),
        )
    else:
        entries = []
    # IPython labels the current session's entries 0 (relative) in range queries; tail and
    # search give absolute session numbers. Answer absolute ones throughout.
    current = manager.session_number
    return {
        "status": "ok",
        "history": [[current if e[0] == 0 else e[0], *e[1:]] for e in entries],
    }


HANDLERS: dict[str, Callable[[InteractiveShell, Content], Content]] = {
    "complete_request": complete,
    "inspect_request": inspect,
    "is_complete_request": is_complete,
    "history_request": history,
}
