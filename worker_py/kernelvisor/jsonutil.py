"""JSON encoding of Jupyter content produced in the worker.

Display data and comm payloads come from user code, so they may hold bytes (images),
dates, numpy scalars or NaN; this turns them into what Jupyter clients expect instead
of failing the send.

A large string that JSON writes as it is (a base64 image, most HTML without quotes is not)
is not given to the encoder, which looks at every character of it on its way to a new
string (about 90 ms for a 20 MiB PNG's 26.7 MiB of base64, most of the time of showing
it): ``dumps`` checks it in one pass over its bytes and splices them into the output.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import numbers
import os
from typing import Any


def _default(obj: Any) -> Any:
    if isinstance(obj, (bytes, bytearray, memoryview)):
        # Formatters return raw bytes for image/png and friends: Jupyter wants base64.
        return base64.b64encode(obj).decode("ascii")
    if isinstance(obj, (datetime.datetime, datetime.date, datetime.time)):
        return obj.isoformat()
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    if isinstance(obj, numbers.Integral):
        return int(obj)
    if isinstance(obj, numbers.Real):
        value = float(obj)
        return value if math.isfinite(value) else None
    return repr(obj)


def _finite(obj: Any) -> Any:
    """A copy of obj with NaN and infinities replaced by None (JSON has no such numbers)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


# One encoder for every call: json.dumps with options builds a new one each time.
_ENCODER = json.JSONEncoder(
    ensure_ascii=False, separators=(",", ":"), allow_nan=False, default=_default
)


# A string at least this long is spliced into the output as it is, when JSON allows.
VERBATIM_MIN = 1 << 20

# The bytes JSON writes as they are in a string: printable ASCII but the quote and the
# backslash (DEL too; json.dumps leaves it).
_AS_THEY_ARE = bytes(range(0x20, 0x80)).replace(b'"', b"").replace(b"\\", b"")


def _verbatim(text: str) -> bytes | None:
    """A large string's bytes, if JSON writes them as they are; else None."""
    if len(text) < VERBATIM_MIN or not text.isascii():
        return None
    # Text (a print's chunk) has a line break early: found at memchr's speed, a refusal
    # costs next to nothing.
    if "\n" in text or '"' in text or "\\" in text:
        return None
    raw = text.encode("ascii")
    return None if raw.translate(None, _AS_THEY_ARE) else raw


def _lift(obj: Any, marker: list[str], lifted: list[bytes], depth: int) -> Any:
    """``obj`` with its large verbatim strings (in dicts, at most ``depth`` levels down:
    a message's content, and its mime bundle) replaced by numbered markers; the dicts that
    hold one are copied, never changed. ``marker`` is made on first use (in ``marker[0]``)."""
    if not isinstance(obj, dict):
        return obj
    out = None
    for key, value in obj.items():
        if isinstance(value, str):
            raw = _verbatim(value)
            if raw is None:
                continue
            if not marker:
                # A marker no string of the message can hold: fresh random bytes each
                # time (made only here: most messages hold no such string).
                marker.append(f"kvraw-{os.urandom(8).hex()}-")
            new: Any = f"{marker[0]}{len(lifted)}"
            lifted.append(raw)
        elif isinstance(value, dict) and depth > 1:
            new = _lift(value, marker, lifted, depth - 1)
            if new is value:
                continue
        else:
            continue
        if out is None:
            out = dict(obj)
        out[key] = new
    return obj if out is None else out


def _encode(obj: Any) -> bytes:
    try:
        text = _ENCODER.encode(obj)
    except ValueError:
        text = _ENCODER.encode(_finite(obj))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (e.g. from surrogateescape'd file names) are not valid UTF-8.
        return text.encode("utf-8", "replace")


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON for a frame."""
    lifted: list[bytes] = []
    marker: list[str] = []
    data = _encode(_lift(obj, marker, lifted, 2))
    if not lifted:
        return data
    (mark,) = marker
    parts = []
    start = 0
    for i, raw in enumerate(lifted):
        at = data.index(f'"{mark}{i}"'.encode(), start)
        parts += [data[start : at + 1], raw]
        start = at + 1 + len(f"{mark}{i}")
    parts.append(data[start:])
    return b"".join(parts)
