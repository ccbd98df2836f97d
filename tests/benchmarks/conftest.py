"""Fixtures of the bench tests: the tiny model as a .pt ensemble bundle beside its .onnx."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path, tiny_onnx: Path) -> tuple[Path, Path]:
    """(model.onnx, model.pt) of ``tiny_run`` in one directory, as ``trainer export`` writes them."""
    from trainer.export import export_ensemble

    directory = tmp_path_factory.mktemp("bench_models")
    onnx = directory / "model.onnx"
    shutil.copy(tiny_onnx, onnx)
    pt = directory / "model.pt"
    export_ensemble(tiny_run, pt)
    return onnx, pt
