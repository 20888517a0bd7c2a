"""kernelvisor.eg_launcher's inputs: EG's arguments in both spellings, the environment of a kernel
image, port ranges, and refusals with a clear message."""

from __future__ import annotations

import pytest
from kernelvisor.eg_launcher import PortRange, parse_args

EG = {"kernel_id": "k1", "response_address": "127.0.0.1:8877", "public_key": "KEY"}


def test_remote_process_proxy_spelling_and_extra_args() -> None:
    args = parse_args(
        [
            "--RemoteProcessProxy.kernel-id",
            "k1",
            "--RemoteProcessProxy.response-address",
            "127.0.0.1:8877",
            "--RemoteProcessProxy.public-key",
            "KEY",
            "--RemoteProcessProxy.port-range",
            "40000..41999",
            "--RemoteProcessProxy.spark-context-initialization-mode",
            "none",
            "--",
            "--backend",
            "trio",
        ],
        {},
    )
    assert {k: getattr(args, k) for k in EG} == EG
    assert args.port_range == "40000..41999"
    assert args.kernelvisor_args == ["--backend", "trio"]
    assert args.ip == "0.0.0.0"


def test_plain_spelling_and_environment() -> None:
    args = parse_args(
        ["--kernel-id", "k1"], {"RESPONSE_ADDRESS": "127.0.0.1:8877", "EG_PUBLIC_KEY": "KEY"}
    )
    assert {k: getattr(args, k) for k in EG} == EG
    env = {
        "KERNEL_ID": "k1",
        "RESPONSE_ADDRESS": "127.0.0.1:8877",
        "PUBLIC_KEY": "KEY",
        "PORT_RANGE": "0..0",
    }
    args = parse_args([], env)
    assert {k: getattr(args, k) for k in EG} == EG and args.port_range == "0..0"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--kernel-id", "k1", "--public-key", "K"], "--response-address is required"),
        (
            [
                "--kernel-id",
                "k",
                "--public-key",
                "K",
                "--response-address",
                "h:1",
                "--spark-context-initialization-mode",
                "lazy",
            ],
            "no Spark context",
        ),
    ],
)
def test_refusals(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv, {})
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_port_ranges() -> None:
    assert PortRange.parse(None, 1000) == PortRange(0, 0)
    assert PortRange.parse("0..0", 1000).candidate() == 0
    r = PortRange.parse("40000..41000", 1000)
    assert all(40000 <= r.candidate() <= 41000 for _ in range(100))
    for bad in ("40000..40010", "x..y", "5", "2..1", "1..70000"):
        with pytest.raises(ValueError):
            PortRange.parse(bad, 1000)
