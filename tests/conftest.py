"""Markers: ``gpu`` (CUDA), ``trt`` (TensorRT + CUDA), ``slow`` (only with --runslow).

Each is skipped with the reason printed (``-ra``) when its requirement is missing.
"""

from __future__ import annotations

import functools
import os

import pytest

# Precision is picked from the CPU (engine.cpu), and the machines that run this suite differ (with and
# without native bf16). Every test runs fp32 unless it asks for bf16 (the ``bf16_on`` and
# ``native_bf16`` fixtures), so no outcome depends on the machine; servers and CLIs started in
# subprocesses inherit it. ``STRIP_CPU_BF16=1 make test`` runs the whole suite on the bf16 paths.
# Likewise no int8 IR is chosen automatically unless a test forces ``STRIP_CPU_INT8=1``.
os.environ.setdefault("STRIP_CPU_BF16", "0")
os.environ.setdefault("STRIP_CPU_INT8", "0")

pytest_plugins = ["tests.fixtures", "tests.defect_model", "tests.postgres"]


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
