"""Markers: ``gpu`` (CUDA), ``trt`` (TensorRT + CUDA), ``slow`` (only with --runslow).

Each is skipped with the reason printed (``-ra``) when its requirement is missing.
"""

from __future__ import annotations

import functools

import pytest

pytest_plugins = ["tests.fixtures"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


@functools.cache
def cuda_missing_reason() -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed"
    if not torch.cuda.is_available():
        return "no CUDA GPU on this machine (torch.cuda.is_available() is False)"
    return None


@functools.cache
def tensorrt_missing_reason() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except ImportError as exc:
        return f"TensorRT is not installed ({exc}); install the '.[gpu]' extra on a CUDA machine"
    return cuda_missing_reason()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    runslow = config.getoption("--runslow")
    for item in items:
        # get_closest_marker, not `in item.keywords`: a parametrize id such as "gpu" is a keyword too.
        if item.get_closest_marker("slow") and not runslow:
            item.add_marker(pytest.mark.skip(reason="slow test: run with --runslow"))
        if item.get_closest_marker("gpu") and (reason := cuda_missing_reason()):
            item.add_marker(pytest.mark.skip(reason=reason))
        if item.get_closest_marker("trt") and (reason := tensorrt_missing_reason()):
            item.add_marker(pytest.mark.skip(reason=reason))
