"""Bench models: U-Net ensembles of the product's architecture exported like trained ones, cached by their settings.

Dense speed does not depend on the weights, but whether a reduced precision stays within tolerance
does. A randomly initialised U-Net puts every probability near 0.5, so its masks are a threshold on
noise that any rounding flips (its int8 IR fails parity at mask Dice 0.79, benchmarks/RESULTS.md),
which says nothing about a trained model. So the default bench model is *fitted*: its weights are
trained for :data:`FIT_STEPS` steps on synthetic strips (``trainer.synth``), enough for a trained
model's confident probabilities (thresholds at 0.5), at the same architecture and FLOPs;
``fit_steps=0`` keeps random weights, with thresholds calibrated to a defect fraction.

The bench writes the folds' checkpoints into a run directory the way training does and exports it
with the product's own exporters (``trainer.export``): an ONNX inspection graph (fp32, optionally
fp16) and the ``.pt`` ensemble bundle the torch backend and the naive pipeline load. A cache
directory keyed by the settings (and by the source of the model, the fit and the exporter) is
reused while both match.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from engine.metadata import DEFAULT_CLASS_NAMES

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CACHE = REPO_ROOT / "benchmarks" / "results" / "models"
# A cached model is rebuilt when any of these change: they define what the files contain.
SOURCES = ("network/config.py", "network/build.py", "network/processing.py", "network/inspection.py",
           "network/checkpoint.py", "engine/metadata.py", "trainer/export.py", "trainer/synth.py", "trainer/losses.py",
           "benchmarks/fit.py")
#: Training steps of the default bench model (:func:`benchmarks.fit.fit_unet`).
FIT_STEPS = 300


@dataclass(frozen=True)
class BenchModelSpec:
    """What to build. The default is the small model ``bench throughput`` uses with no arguments:
    a ResNet-18 U-Net with a slim decoder, one fold, at the thesis geometry (camera frames 256x1600,
    U-Net at 128x800)."""

    encoder: str = "resnet18"
    folds: int = 1
    decoder_channels: tuple[int, ...] = (128, 64, 32, 16, 8)
    height: int = 256
    width: int = 1600
    train_height: int = 128
    train_width: int = 800
    fp16: bool = False  # also export the FP16 graph (TensorRT / ORT CUDA fp16)
    seed: int = 0
    # Training steps on synthetic strips (see the module's doc); 0: random weights.
    fit_steps: int = FIT_STEPS
    # Random weights only (fit_steps 0): they put every probability near 0.5, so at the thesis
    # threshold about half of each frame would be "defect" and RLE would cost far more than on a
    # line. Thresholds are set per class at the probability quantile that leaves this fraction of
    # pixels above it on synthetic strip frames. A fitted model uses the thesis' 0.5. Minimum areas
    # are the 1st-place Kaggle solution's (full resolution).
    defect_fraction: float = 0.003
    min_areas: tuple[int, ...] = field(default=(600, 600, 900, 2000))

    def __post_init__(self) -> None:
        if not 0.0 < self.defect_fraction < 1.0:
            raise ValueError(f"defect_fraction must lie in (0, 1), got {self.defect_fraction}")
        if self.folds < 1:
            raise ValueError(f"folds must be >= 1, got {self.folds}")
        if self.fit_steps < 0:
            raise ValueError(f"fit_steps must be >= 0, got {self.fit_steps}")
        for name in ("height", "width", "train_height", "train_width"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    @property
    def name(self) -> str:
        return (
            f"{self.encoder}-d{'-'.join(map(str, self.decoder_channels))}-f{self.folds}-"
            f"{self.height}x{self.width}-t{self.train_height}x{self.train_width}"
            + (f"-fit{self.fit_steps}" if self.fit_steps else "")
        )

    def key(self) -> dict[str, Any]:
        sources = hashlib.sha256()
        for rel in SOURCES:
            path = REPO_ROOT / rel
            sources.update(path.read_bytes() if path.is_file() else b"")
        return {**asdict(self), "decoder_channels": list(self.decoder_channels), "sources": sources.hexdigest()}


@dataclass
class BenchModel:
    """The files of one bench model."""

    spec: BenchModelSpec
    directory: Path
    onnx: Path
    pt: Path
    onnx_fp16: Path | None

    def files(self) -> list[Path]:
        return [p for p in (self.onnx, self.pt, self.onnx_fp16) if p is not None]


def calibrated_thresholds(folds: list[Any], spec: BenchModelSpec, frames: int = 2) -> list[float]:
    """Per-class thresholds leaving ``spec.defect_fraction`` of pixels above them (see the spec)."""
    import numpy as np
    import torch

    from engine.metadata import ModelMetadata
    from network.inspection import InspectionModel
    from toolchain.parity import synthetic_frames

    meta = ModelMetadata(
        input_height=spec.height,
        input_width=spec.width,
        train_height=spec.train_height,
        train_width=spec.train_width,
        folds=len(folds),
        encoder=spec.encoder,
    )
    model = InspectionModel(folds, meta).eval()
    images = torch.from_numpy(synthetic_frames(frames, spec.height, spec.width, seed=spec.seed + 1))
    with torch.inference_mode():
        probs = model.probabilities(images).numpy()
    quantiles = [float(np.quantile(probs[:, k], 1.0 - spec.defect_fraction)) for k in range(probs.shape[1])]
    # Strictly inside (0, 1), as ModelMetadata requires, and short enough to read in a table.
    return [min(max(round(q, 4), 1e-4), 1 - 1e-4) for q in quantiles]


def _write_run(spec: BenchModelSpec, run_dir: Path) -> None:
    import torch

    from benchmarks.fit import fit_unet
    from network.build import build_unet
    from network.checkpoint import FoldFacts, save_fold_checkpoint
    from network.config import UNetConfig

    cfg = UNetConfig(
        encoder=spec.encoder,
        encoder_depth=len(spec.decoder_channels),
        decoder_channels=tuple(spec.decoder_channels),
    )
    torch.manual_seed(spec.seed)
    class_names = list(DEFAULT_CLASS_NAMES)
    folds = [build_unet(cfg).eval() for _ in range(spec.folds)]
    for fold, unet in enumerate(folds):
        if spec.fit_steps:
            fit_unet(unet, spec.fit_steps, (spec.height, spec.width), (spec.train_height, spec.train_width),
                     seed=spec.seed + fold)
        (run_dir / f"fold{fold}").mkdir(parents=True, exist_ok=True)
        save_fold_checkpoint(
            run_dir / f"fold{fold}" / "best.pt",
            cfg,
            unet,
            FoldFacts(fold=fold, epoch=0, input_size=(spec.height, spec.width),
                      train_size=(spec.train_height, spec.train_width), class_names=tuple(class_names), mean=0.0,
                      std=1.0),
        )
    thresholds = [0.5] * len(class_names) if spec.fit_steps else calibrated_thresholds(folds, spec)
    postprocess = {"thresholds": thresholds, "min_areas": list(spec.min_areas)}
    (run_dir / "postprocess.json").write_text(json.dumps(postprocess, indent=2))


def ensure_model(
    spec: BenchModelSpec | None = None, cache_dir: str | Path | None = None, parity_frames: int = 2
) -> BenchModel:
    """Returns the bench model for ``spec``, building and exporting it unless a matching one is cached.

    ``parity_frames`` is the export's self-check size (fewer frames: a quicker build of big models).
    """
    from trainer.export import export_ensemble, export_onnx

    spec = spec or BenchModelSpec()
    directory = Path(cache_dir or DEFAULT_CACHE) / spec.name
    model = BenchModel(
        spec=spec,
        directory=directory,
        onnx=directory / "model.onnx",
        pt=directory / "model.pt",
        onnx_fp16=directory / "model-fp16.onnx" if spec.fp16 else None,
    )
    key_path = directory / "settings.json"
    key = json.loads(json.dumps(spec.key()))  # as it reads back: tuples become lists
    if key_path.is_file() and all(p.is_file() for p in model.files()):
        try:
            if json.loads(key_path.read_text()) == key:
                log.info("reusing the bench model in %s", directory)
                return model
        except json.JSONDecodeError:
            pass
    log.info("building the bench model %s (%s) in %s", spec.name,
             f"weights fitted in {spec.fit_steps} steps" if spec.fit_steps else "random weights", directory)
    directory.mkdir(parents=True, exist_ok=True)
    key_path.unlink(missing_ok=True)  # a half-built directory must not look reusable
    run_dir = directory / "run"
    _write_run(spec, run_dir)
    export_onnx(run_dir, model.onnx, precision="fp32", parity_frames=parity_frames)
    export_ensemble(run_dir, model.pt)
    if model.onnx_fp16 is not None:
        export_onnx(run_dir, model.onnx_fp16, precision="fp16", parity_frames=parity_frames)
    key_path.write_text(json.dumps(key, indent=2))
    return model


# --------------------------------------------------------------------------- CLI: bench model

HELP = "build (or reuse) a bench model: fp32 ONNX, optional fp16 ONNX, and the .pt bundle"
DESCRIPTION = (
    "Writes fold checkpoints of U-Nets fitted briefly to synthetic strips (--fit-steps; 0: random weights) as a "
    "training run would, then exports them with 'trainer export' (ONNX inspection graph, optionally its FP16 "
    "twin, and the .pt ensemble bundle). Dense speed does not depend on the weights; whether int8 stays within "
    "tolerance does, and random weights fail it whatever the quantisation. Reused while the settings and the "
    "model/fit/export code are unchanged. Prints the files, one per line."
)


def _ints(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(tok) for tok in text.split(",") if tok.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return values


def add_arguments(parser: Any) -> None:
    defaults = BenchModelSpec()
    parser.add_argument("--encoder", default=defaults.encoder, help="U-Net encoder (default %(default)s)")
    parser.add_argument("--folds", type=int, default=defaults.folds, help="folds in the ensemble (default %(default)s)")
    parser.add_argument("--decoder-channels", default=",".join(map(str, defaults.decoder_channels)),
                        help="decoder widths; their count is the encoder depth (default %(default)s)")
    parser.add_argument("--height", type=int, default=defaults.height, help="camera frame height (default %(default)s)")
    parser.add_argument("--width", type=int, default=defaults.width, help="camera frame width (default %(default)s)")
    parser.add_argument("--train-height", type=int, default=None, help="U-Net input height (default height / 2)")
    parser.add_argument("--train-width", type=int, default=None, help="U-Net input width (default width / 2)")
    parser.add_argument("--fp16", action="store_true", help="also export the FP16 graph (TensorRT, ORT CUDA fp16)")
    parser.add_argument("--fit-steps", type=int, default=defaults.fit_steps,
                        help="training steps on synthetic strips (default %(default)s; 0: random weights)")
    parser.add_argument("--parity-frames", type=int, default=2,
                        help="frames of the export's self-check against torch eager (default %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default {DEFAULT_CACHE}")


def run(args: Any) -> int:
    spec = BenchModelSpec(
        encoder=args.encoder,
        folds=args.folds,
        decoder_channels=_ints(args.decoder_channels, "--decoder-channels"),
        height=args.height,
        width=args.width,
        train_height=args.train_height or args.height // 2,
        train_width=args.train_width or args.width // 2,
        fp16=args.fp16,
        fit_steps=args.fit_steps,
    )
    model = ensure_model(spec, args.cache_dir, parity_frames=args.parity_frames)
    for path in model.files():
        print(path)
    return 0


def ensure_int8_ir(onnx_path: Path, calibration_frames: int = 32, parity_frames: int = 16) -> tuple[Path | None, str]:
    """The int8 OpenVINO IR of a bench model (beside it, where engine.backends.int8 looks), built once
    with ``engine build``'s own code, calibrated on synthetic strip frames; (None, why) when NNCF is
    missing or the build is refused for parity (its message says by how much)."""
    import importlib.util

    from engine.backends.int8 import int8_ir_path

    ir = int8_ir_path(onnx_path)
    refused = ir.with_suffix(".refused.txt")
    if ir.is_file() and ir.with_suffix(".bin").is_file() and ir.stat().st_mtime >= onnx_path.stat().st_mtime:
        return ir, "cached"
    if refused.is_file() and refused.stat().st_mtime >= onnx_path.stat().st_mtime:
        return None, refused.read_text(encoding="utf-8").strip() + f" (cached in {refused.name})"
    if importlib.util.find_spec("nncf") is None:
        return None, "NNCF is not installed (pip install 'strip-inspection[build]') to build the int8 IR"
    from engine.metadata import read_onnx_metadata
    from toolchain.build_openvino import BuildParityError, build_openvino
    from toolchain.parity import synthetic_frames

    meta = read_onnx_metadata(str(onnx_path))
    frames = synthetic_frames(calibration_frames + parity_frames, *meta.input_size, seed=99)
    log.info("building the int8 OpenVINO IR of %s (NNCF, %d calibration frames)", onnx_path, calibration_frames)
    try:
        build_openvino(onnx_path, ir, "int8", calibration=frames, calibration_frames=calibration_frames,
                       parity_frames=parity_frames)
    except BuildParityError as exc:
        refused.write_text(f"the int8 IR was refused: {exc}\n", encoding="utf-8")
        return None, f"the int8 IR was refused: {exc}"
    refused.unlink(missing_ok=True)  # an older graph's refusal
    return ir, "built"
