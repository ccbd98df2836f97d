"""``engine.devices``: the one device-string parser."""

from __future__ import annotations

import pytest

from engine.devices import BackendUnavailable, Device, parse_device, resolve_torch_device


@pytest.mark.parametrize(
    ("text", "expected", "shown"),
    [
        ("auto", Device("auto"), "auto"),
        ("CPU", Device("cpu"), "cpu"),
        (" cuda ", Device("cuda"), "cuda:0"),
        ("cuda:2", Device("cuda", 2, explicit_index=True), "cuda:2"),
    ],
)
def test_parse(text: str, expected: Device, shown: str) -> None:
    parsed = parse_device(text)
    assert parsed == expected and str(parsed) == shown
    assert parse_device(parsed) is parsed


@pytest.mark.parametrize("text", ["gpu", "cuda:", "cuda:x", "cuda:-1", "cpu:0", ""])
def test_bad_strings_are_refused_naming_the_flag(text: str) -> None:
    with pytest.raises(ValueError, match=r"--device must be auto, cpu, cuda or cuda:N, got"):
        parse_device(text, "--device")


def test_torch_resolution() -> None:
    assert resolve_torch_device("auto", cuda_available=False) == "cpu"
    assert resolve_torch_device("cuda", cuda_available=True) == "cuda:0"
    with pytest.raises(BackendUnavailable, match="sees no CUDA GPU"):
        resolve_torch_device("cuda:0", cuda_available=False)
    with pytest.raises(ValueError, match="device must be"):
        resolve_torch_device("tpu", cuda_available=True)
