"""Shared test fixtures (tiny models, synthetic data), loaded by tests/conftest.py."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

# --------------------------------------------------------------------------- tiny models (Task C)
# A "run directory" as the trainer writes it, holding randomly initialised tiny U-Nets, and its
# ONNX export. Camera frames 64x320, U-Nets at 32x160 (exercises the in-graph resize).

TINY_INPUT_SIZE = (64, 320)
TINY_TRAIN_SIZE = (32, 160)
TINY_UNET = {"encoder": "resnet18", "encoder_depth": 3, "decoder_channels": [32, 16, 8]}


def image_folder(root: Path, sizes: dict[str, tuple[int, int]]) -> Path:
    """A Severstal-format folder (``train_images/``) of grayscale PNGs, named and sized as given, each
    with its own content (another synthetic seed than the bench's pool)."""
    import cv2

    from toolchain.parity import synthetic_frames

    images = root / "train_images"
    images.mkdir(parents=True)
    for seed, (name, (height, width)) in enumerate(sizes.items(), start=100):
        cv2.imwrite(str(images / name), synthetic_frames(1, height, width, seed=seed)[0])
    return root


def make_tiny_run(
    run_dir: Path,
    folds: int = 2,
    unet: dict | None = None,
    postprocess: dict | None = None,
    input_size: tuple[int, int] = TINY_INPUT_SIZE,
    train_size: tuple[int, int] = TINY_TRAIN_SIZE,
    seed: int = 0,
) -> Path:
    """Writes ``run_dir/fold<k>/best.pt`` for ``folds`` random U-Nets, config.json and postprocess.json."""
    import torch

    from engine.metadata import DEFAULT_CLASS_NAMES
    from network.build import build_unet
    from network.checkpoint import FoldFacts, save_fold_checkpoint
    from network.config import UNetConfig

    cfg = UNetConfig.from_dict(unet or TINY_UNET)
    run_dir.mkdir(parents=True, exist_ok=True)
    for k in range(folds):
        torch.manual_seed(seed + k)
        (run_dir / f"fold{k}").mkdir(exist_ok=True)
        save_fold_checkpoint(
            run_dir / f"fold{k}" / "best.pt",
            cfg,
            build_unet(cfg).eval(),
            FoldFacts(fold=k, epoch=1, val_loss=0.5, input_size=input_size, train_size=train_size,
                      class_names=tuple(DEFAULT_CLASS_NAMES[: cfg.num_classes]), mean=0.5, std=0.25),
        )
    (run_dir / "config.json").write_text(json.dumps({"unet": cfg.to_dict(), "folds": folds}))
    if postprocess is not None:
        (run_dir / "postprocess.json").write_text(json.dumps(postprocess))
    return run_dir


def tiny_postprocess(run_dir: Path, frames: np.ndarray) -> dict:
    """Thresholds/min areas that make the random U-Nets' outputs non-trivial on ``frames``.

    Random U-Nets output probabilities in a narrow band around 0.5, so the thesis' 0.5/200 would
    make every class present or absent everywhere. Chosen from the ensemble's probabilities:
    class 1 present in some frames only, class 2 present in every frame, class 3 with defect
    pixels but never enough to be present, class 4 with no defect pixel at all.
    """
    import torch

    from network.inspection import InspectionModel
    from trainer.rundir import load_run

    run = load_run(run_dir)
    with torch.no_grad():
        probs = InspectionModel(run.folds, run.metadata).probabilities(torch.from_numpy(frames)).numpy()
    p = [probs[:, k] for k in range(probs.shape[1])]
    thresholds = [
        round(float(np.quantile(p[0], 0.85)), 4),
        round(float(np.quantile(p[1], 0.5)), 4),
        round(float(np.quantile(p[2], 0.998)), 4),
        round(min(0.999, float(p[3].max()) + 0.05), 4),
    ]
    counts0 = (p[0] >= thresholds[0]).sum(axis=(1, 2))
    min_areas = [int(np.median(counts0)) + 1, 50, int(p[2][0].size), 200]
    return {"thresholds": thresholds, "min_areas": min_areas}


@pytest.fixture(scope="session")
def tiny_frames() -> np.ndarray:
    """Six deterministic strip-like uint8 frames [6, 64, 320]."""
    from toolchain.parity import synthetic_frames

    return synthetic_frames(6, *TINY_INPUT_SIZE, seed=7)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, tiny_frames: np.ndarray) -> Path:
    """A 2-fold run of random tiny U-Nets (64x320 frames, 32x160 training) with a postprocess.json
    of non-default thresholds and minimum areas (see :func:`tiny_postprocess`)."""
    run_dir = make_tiny_run(tmp_path_factory.mktemp("tiny_run") / "run")
    postprocess = tiny_postprocess(run_dir, tiny_frames)
    (run_dir / "postprocess.json").write_text(json.dumps(postprocess))
    return run_dir


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path) -> Path:
    """``tiny_run`` exported to an fp32 ONNX inspection graph (parity-checked by the export)."""
    from trainer.export import export_onnx

    out = tmp_path_factory.mktemp("tiny_onnx") / "model.onnx"
    export_onnx(tiny_run, out)
    return out


@pytest.fixture(scope="session")
def tiny_int8(tmp_path_factory: pytest.TempPathFactory, tiny_onnx: Path, synth_dir: Path) -> Path:
    """A copy of ``tiny_onnx`` (``model.onnx``) with its int8 OpenVINO IR built beside it
    (``model.int8.xml``, where the automatic backend choice looks), calibrated on ``synth_dir``;
    returns the ``.onnx``. Skips where openvino or NNCF is missing."""
    import shutil

    pytest.importorskip("openvino", reason="openvino is not installed (pip install 'strip-inspection[cpu]')")
    pytest.importorskip("nncf", reason="nncf is not installed (pip install 'strip-inspection[build]')")
    from engine.backends.int8 import int8_ir_path
    from toolchain.build_openvino import build_openvino

    model = tmp_path_factory.mktemp("tiny_int8") / "model.onnx"
    shutil.copyfile(tiny_onnx, model)
    build_openvino(model, int8_ir_path(model), "int8", calibration=synth_dir, calibration_frames=24, parity_frames=12)
    return model


@pytest.fixture(scope="session")
def tiny_pt(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path) -> Path:
    """``tiny_run`` as the torch backend's ``.pt`` ensemble bundle."""
    from trainer.export import export_ensemble

    out = tmp_path_factory.mktemp("tiny_pt") / "model.pt"
    export_ensemble(tiny_run, out)
    return out


def attach_data(run_dir: Path, data_dirs: list[Path], folds: int = 2, holdout: float = 0.1, seed: int = 0) -> Path:
    """Records training data in a run directory as ``trainer fit`` does: ``config.json`` names the data
    folders, ``folds.csv`` holds a stratified split of their images (what export's drift reference reads)."""
    from trainer.data import DataConfig, load_samples
    from trainer.splits import make_folds, write_folds

    config = json.loads((run_dir / "config.json").read_text())
    num_classes = config["unet"]["num_classes"]
    samples = load_samples(data_dirs, DataConfig(num_classes, *TINY_INPUT_SIZE))
    assignment = make_folds(samples, num_classes, folds=folds, holdout=holdout, seed=seed)
    write_folds(run_dir / "folds.csv", assignment, samples)
    (run_dir / "config.json").write_text(json.dumps({**config, "data": [str(d) for d in data_dirs]}))
    return run_dir


@pytest.fixture(scope="session")
def tiny_data_run(tmp_path_factory: pytest.TempPathFactory, tiny_run: Path) -> Path:
    """``tiny_run`` (same checkpoints and post-processing, so the same graph) with training data: 560
    ``trainer synth`` frames of 64x320 (seed 5) in ``data/`` next to it, named by its config.json, and a
    2-fold folds.csv with a 5 % holdout: each fold holds over 256 images, so a drift reference of fold 0
    alone gets the export's default 256 frames. Its export builds a drift reference."""
    import shutil

    from trainer.synth import synthesize

    root = tmp_path_factory.mktemp("tiny_data_run")
    data = synthesize(root / "data", 560, *TINY_INPUT_SIZE, seed=5)
    run_dir = root / "run"
    shutil.copytree(tiny_run, run_dir)
    return attach_data(run_dir, [data], folds=2, holdout=0.05)


# --------------------------------------------------------------------------- synthetic line data (Task A)
# 48 frames of 64x320 from `trainer synth`, seed 0: 6/3/15/5 images with classes 1/2/3/4, two
# images with two classes, 85 % of (image, class) pairs empty.

SYNTH_SIZE = (64, 320)
SYNTH_IMAGES = 48


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Severstal-format data folder (train_images/ + train.csv) written by ``trainer.synth.synthesize``."""
    from trainer.synth import synthesize

    return synthesize(tmp_path_factory.mktemp("synth") / "data", SYNTH_IMAGES, *SYNTH_SIZE, seed=0)


@pytest.fixture(scope="session")
def synth_cfg():
    """The ``trainer.data.DataConfig`` matching ``synth_dir`` (4 classes, 64x320 frames)."""
    from trainer.data import DataConfig

    return DataConfig(num_classes=4, height=SYNTH_SIZE[0], width=SYNTH_SIZE[1])


def write_engine_with_sidecar(engine_path: Path, onnx_path: Path, **overrides: object) -> Path:
    """A stand-in engine file (opaque bytes; nothing here can run a real one) with the sidecar
    ``engine build`` would write next to it, for the checks that need no TensorRT: sidecar
    reading, file verification, version/GPU compatibility, ``engine info``."""
    import hashlib

    from engine.backends.tensorrt import EngineSidecar, write_sidecar
    from engine.hashing import file_sha256
    from engine.metadata import ModelMetadata, read_onnx_metadata

    data = bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8))
    engine_path.write_bytes(data)
    meta = read_onnx_metadata(str(onnx_path))
    h, w = meta.input_size
    c = meta.num_classes
    fields: dict = dict(
        tensorrt_version="10.8.0.43",
        gpu_name="NVIDIA A10",
        compute_capability="8.6",
        onnx_path=str(onnx_path),
        onnx_sha256=file_sha256(onnx_path),
        precision="fp16",
        typing="fp16-builder-flag",
        profile={"min": [1, h, w], "opt": [8, h, w], "max": [32, h, w]},
        engine_size=len(data),
        engine_sha256=hashlib.sha256(data).hexdigest(),
        metadata=ModelMetadata.from_dict({**meta.to_dict(), "precision": "fp16"}),
        build_seconds=12.5,
        network_layers=120,
        engine_layers=40,
        io=[
            {"name": "frames", "mode": "input", "dtype": "uint8", "shape": [-1, h, w]},
            {"name": "masks", "mode": "output", "dtype": "uint8", "shape": [-1, c, h, w]},
            {"name": "counts", "mode": "output", "dtype": "int32", "shape": [-1, c]},
            {"name": "present", "mode": "output", "dtype": "bool", "shape": [-1, c]},
        ],
    )
    fields.update(overrides)
    write_sidecar(engine_path, EngineSidecar(**fields))
    return engine_path


@pytest.fixture
def bf16_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 forced on (``STRIP_CPU_BF16=1``): the torch bf16 paths, native here or emulated by torch."""
    monkeypatch.setenv("STRIP_CPU_BF16", "1")


@pytest.fixture
def native_bf16(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16 forced on, on a CPU with native bf16 (OpenVINO runs bf16 only there); skips elsewhere."""
    from engine.cpu import cpu_features

    if not cpu_features().bf16:
        pytest.skip(f"this CPU has no native bf16 (neither AVX-512 BF16 nor AMX-BF16): {cpu_features().line()}")
    monkeypatch.setenv("STRIP_CPU_BF16", "1")


# --------------------------------------------------------------------------- camera frames
# The frames the server and client tests stream, and the defect model's own answer for each: every
# answer that comes back through a server is compared with it.


@pytest.fixture(scope="session")
def camera_frames() -> np.ndarray:
    """50 strip-like uint8 frames [50, 64, 320] at the tiny model's input size."""
    from toolchain.parity import synthetic_frames

    return synthetic_frames(50, *TINY_INPUT_SIZE, seed=11)


@pytest.fixture(scope="session")
def direct_backend(defect_onnx: Path):
    """The defect model (tests.defect_model) loaded directly: the reference every server answer is
    compared with."""
    from engine.backends import load_backend

    backend = load_backend(defect_onnx, device="cpu")
    yield backend
    backend.close()


@pytest.fixture(scope="session")
def direct_output(direct_backend, camera_frames: np.ndarray) -> dict[str, list]:
    """The backend's own answer for every camera frame: counts, present and RLE per class."""
    result = direct_backend.infer(camera_frames)
    return {"counts": result.counts.tolist(), "present": result.present.tolist(), "rles": result.rle()}
