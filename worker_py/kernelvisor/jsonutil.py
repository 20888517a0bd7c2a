"""JSON encoding of Jupyter content produced in the worker.

Display data and comm payloads come from user code, so they may hold bytes (images),
dates, numpy scalars or NaN; this turns them into what Jupyter clients expect instead
of failing the send.
"""

from __future__ import annotations

import base64
import datetime
import json
import math
import numbers
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


def dumps(obj: Any) -> bytes:
    """Compact UTF-8 JSON for a frame."""
    try:
        text = _ENCODER.encode(obj)
    except ValueError:
        text = _ENCODER.encode(_finite(obj))
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        # Lone surrogates (e.g. from surrogateescape'd file names) are not valid UTF-8.
        return text.encode("utf-8", "replace")
