from __future__ import annotations

import datetime
import json

from kernelvisor.jsonutil import dumps


def test_compact_utf8() -> None:
    assert dumps({"a": "é", "b": [1, 2]}) == '{"a":"é","b":[1,2]}'.encode()


def test_bytes_become_base64_and_odd_values_survive() -> None:
    out = json.loads(
        dumps(
            {
                "image/png": b"\x89PNG",
                "when": datetime.date(2024, 1, 2),
                "nan": float("nan"),
                "obj": object,
            }
        )
    )
    assert out["image/png"] == "iVBORw=="
    assert out["when"] == "2024-01-02"
    assert out["nan"] is None
    assert out["obj"] == repr(object)


def test_lone_surrogates_do_not_break_encoding() -> None:
    assert json.loads(dumps({"t": "a\udcff"}))["t"].startswith("a")
