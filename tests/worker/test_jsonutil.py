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


def test_large_strings_are_spliced_in_as_json_would_write_them() -> None:
    from kernelvisor.jsonutil import VERBATIM_MIN

    b64 = "iVBORw0KGgo" * (VERBATIM_MIN // 11 + 1)  # spliced in as it is
    text = "a line\n" * (VERBATIM_MIN // 7 + 1)  # escaped by the encoder
    quoted = 'say "hi" \\ ' * (VERBATIM_MIN // 11 + 1)
    data = {"image/png": b64, "text/plain": text, "text/html": quoted, "x": "kvraw-0"}
    content = {"data": data, "metadata": {"image/png": {"width": 2}}, "b64": b64}
    before = json.dumps(content)
    out = dumps(content)
    # Byte for byte what the encoder alone writes, and the message is left as it was.
    assert out == json.dumps(content, ensure_ascii=False, separators=(",", ":")).encode()
    assert json.dumps(content) == before
    assert json.loads(out)["data"]["image/png"] == b64
