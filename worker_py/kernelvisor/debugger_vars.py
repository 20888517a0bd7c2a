"""Variables for the debugger panel while no thread is stopped: the user namespace as DAP
``Variable`` objects (``inspectVariables``), with children for ``variables`` requests, and
the rich (MIME bundle) view of one name (``richInspectVariables``).

While a thread is stopped, debugpy answers ``variables`` about its frames instead.
"""

from __future__ import annotations

import itertools
import re
import reprlib
from collections.abc import Iterator, Mapping
from typing import Any

Variable = dict[str, Any]

# Names IPython and the kernel put in the namespace, not the user's (as ipykernel hides them).
_HIDDEN = frozenset(
    {
        "__name__",
        "__doc__",
        "__package__",
        "__loader__",
        "__spec__",
        "__annotations__",
        "__builtins__",
        "__builtin__",
        "__display__",
        "get_ipython",
        "debugpy",
        "exit",
        "quit",
        "In",
        "Out",
        "_oh",
        "_dh",
        "_ih",
        "_",
        "__",
        "___",
    }
)
_HISTORY_NAME = re.compile(r"^_(\d+|i\d*|ii+|i)$")

# Children listed per variable at most (a DAP client pages with start/count).
MAX_CHILDREN = 1000
_REPR = reprlib.Repr()
_REPR.maxstring = 200
_REPR.maxother = 200
_REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxdict = 20


def is_user_name(name: str) -> bool:
    """Whether a namespace entry is the user's (not IPython's history or the kernel's)."""
    return name not in _HIDDEN and not _HISTORY_NAME.match(name)


def _value(obj: Any) -> str:
    try:
        return _REPR.repr(obj)
    except Exception as exc:  # a broken __repr__ must not break the panel
        return f"<repr failed: {type(exc).__name__}: {exc}>"


def _children(obj: Any) -> Iterator[tuple[str, str, Any]]:
    """(name, evaluate suffix, value) of what ``obj`` holds."""
    if isinstance(obj, Mapping):
        for key, value in obj.items():
            yield _value(key), f"[{key!r}]", value
    elif isinstance(obj, list | tuple):
        for i, value in enumerate(obj):
            yield str(i), f"[{i}]", value
    elif isinstance(obj, set | frozenset):
        for i, value in enumerate(obj):
            yield str(i), "", value
    else:
        attrs = getattr(obj, "__dict__", None)
        if isinstance(attrs, Mapping):
            for key, value in attrs.items():
                if isinstance(key, str) and not key.startswith("__"):
                    yield key, f".{key}", value


def _expandable(obj: Any) -> bool:
    if isinstance(obj, str | bytes | bytearray | int | float | complex | bool) or obj is None:
        return False
    if isinstance(obj, Mapping | list | tuple | set | frozenset):
        return len(obj) > 0
    attrs = getattr(obj, "__dict__", None)
    return isinstance(attrs, Mapping) and any(
        isinstance(k, str) and not k.startswith("__") for k in attrs
    )


class VariableExplorer:
    """DAP variables over live objects; references stay valid until the next ``reset``."""

    def __init__(self) -> None:
        self._refs: dict[int, tuple[Any, str]] = {}
        self._next = itertools.count(1)

    def reset(self) -> None:
        self._refs.clear()

    def _variable(self, name: str, evaluate: str, value: Any) -> Variable:
        reference = 0
        if _expandable(value):
            reference = next(self._next)
            self._refs[reference] = (value, evaluate)
        return {
            "name": name,
            "value": _value(value),
            "type": type(value).__name__,
            "evaluateName": evaluate,
            "variablesReference": reference,
        }

    def namespace(
        self, ns: Mapping[str, Any], hidden: Mapping[str, Any] | None = None
    ) -> list[Variable]:
        """The user's variables in ``ns`` (forgets earlier references); a name in ``hidden``
        (IPython's ``user_ns_hidden``) still bound to the same object is not the user's."""
        hidden = hidden or {}
        self.reset()
        for _ in range(5):
            try:
                items = list(ns.items())  # a cell running in another thread may add names
                break
            except RuntimeError:
                continue
        else:
            items = []
        return [
            self._variable(k, k, v)
            for k, v in items
            if is_user_name(k) and not (k in hidden and hidden[k] is v)
        ]

    def children(self, reference: int, start: int = 0, count: int = 0) -> list[Variable] | None:
        """The children of a variable listed before; None for an unknown reference."""
        entry = self._refs.get(reference)
        if entry is None:
            return None
        obj, evaluate = entry
        stop = start + (count if count > 0 else MAX_CHILDREN)
        try:
            listed = list(itertools.islice(_children(obj), start, stop))
        except Exception:
            listed = []
        return [
            self._variable(name, f"{evaluate}{suffix}" if suffix else "", value)
            for name, suffix, value in listed
        ]
