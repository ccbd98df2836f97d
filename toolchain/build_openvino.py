"""``engine build --target openvino``: an exported ONNX inspection graph -> an OpenVINO IR (``.xml`` + ``.bin``).

- ``fp32`` / ``bf16``: the graph converted as it is (weights fp32); the precision is how
  :class:`~engine.backends.openvino.OpenVinoBackend` runs its U-Nets (bf16 needs native bf16).
- ``int8``: NNCF post-training quantisation of the U-Nets, calibrated on frames of the run's own
  data (``--calibration DIR``: a Severstal-format folder or a folder of images). Every node outside
  the U-Nets (cast, normalise, resizes, sigmoid, fold mean, threshold, counts) is in NNCF's ignored
  scope: a plain quantisation also quantised the threshold and gave empty masks. So are each
  U-Net's first and last weighted layers (:func:`edge_layers`: the stem convolution and the
  segmentation head), the classic recipe: the stem's input is the normalised, average-pooled frame,
  whose fine grey levels 8-bit activations round away (on the trained ``make demo`` model that
  quantisation alone took mask Dice from 0.976 to 0.857 and invented stains), and the head's output
  is the logit the threshold decides on. Both are a few percent of the U-Net's multiply-adds.

The model metadata travels inside the IR (rt_info section ``inspection``, one JSON value per field,
as in the ONNX ``metadata_props``), with the build facts and the parity report (``inspection_build``).
Every build measures parity against the fp32 graph on held-out frames (mask Dice, label agreement,
max count difference, probabilities) with :func:`toolchain.parity.tolerance_for` and writes nothing
beyond it, saying by how much.
"""

from __future__ import annotations

import datetime
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine import graph
from engine.metadata import ModelMetadata
from toolchain.parity import ParityReport, Tolerance, compare_outputs, synthetic_frames, tolerance_for

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


class BuildParityError(ValueError):
    """The built IR disagrees with the fp32 graph beyond tolerance; nothing was written."""


@dataclass
class OpenVinoBuildReport:
    out_path: Path
    precision: str
    metadata: ModelMetadata
    parity: ParityReport
    seconds: float
    calibration: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        source = self.calibration.get("source", "synthetic frames")
        return (
            f"wrote {self.out_path} and {self.out_path.with_suffix('.bin').name} ({self.precision}, "
            f"{self.out_path.with_suffix('.bin').stat().st_size / 1e6:.1f} MB weights) in {self.seconds:.1f} s; "
            f"parity on {self.parity.frames} held-out frames of {source}: {self.parity.summary()}"
        )


def image_files(directory: Path, flag: str = "--calibration") -> list[Path]:
    """The images of a Severstal-format folder (``train_images/``) or of a plain folder, sorted; errors
    name the folder after ``flag``, the option that gave it."""
    folder = directory / "train_images" if (directory / "train_images").is_dir() else directory
    if not folder.is_dir():
        raise FileNotFoundError(f"{flag} {directory}: no such folder")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
    if not files:
        raise ValueError(f"{flag} {directory}: no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def read_frames(files: list[Path], size: tuple[int, int]) -> np.ndarray:
    """Grayscale uint8 frames ``[N, H, W]`` of ``size`` ``(H, W)``, the model's input size; ValueError naming
    a file that is unreadable or of another size."""
    import cv2

    height, width = size
    frames = np.empty((len(files), height, width), dtype=np.uint8)
    for i, path in enumerate(files):
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        if image is None:
            raise ValueError(f"{path}: not a readable image")
        if image.shape != (height, width):
            raise ValueError(f"{path}: {image.shape[0]}x{image.shape[1]} frame, the model takes {height}x{width}")
        frames[i] = image
    return frames


def split_frames(
    directory: Path | np.ndarray | None, meta: ModelMetadata, calibration_count: int, parity_count: int, seed: int = 0
) -> tuple[np.ndarray | None, np.ndarray, dict[str, Any]]:
    """(calibration frames, held-out parity frames, description): disjoint, drawn by a seeded shuffle.

    ``directory`` may also be the frames themselves (uint8 ``[N, H, W]``, e.g. bench's synthetic strips).
    """
    if directory is None:
        return None, synthetic_frames(parity_count, *meta.input_size, seed=1234), {"source": "synthetic frames"}
    if isinstance(directory, np.ndarray):
        if directory.shape[1:] != meta.input_size or len(directory) <= parity_count:
            raise ValueError(f"calibration frames {list(directory.shape)}: need more than {parity_count} frames of "
                             f"{meta.input_height}x{meta.input_width}")
        order = np.random.default_rng(seed).permutation(len(directory))
        held, calib = directory[order[:parity_count]], directory[order[parity_count:parity_count + calibration_count]]
        return calib, held, {"source": "given frames", "calibration_frames": len(calib), "parity_frames": len(held)}
    files = image_files(directory)
    if len(files) < parity_count + 1:
        raise ValueError(f"--calibration {directory}: {len(files)} images, need more than --parity-frames {parity_count}")
    order = np.random.default_rng(seed).permutation(len(files))
    held = [files[i] for i in order[:parity_count]]
    calib = [files[i] for i in order[parity_count:parity_count + calibration_count]]
    info = {"source": str(directory), "calibration_frames": len(calib), "parity_frames": len(held), "seed": seed}
    return read_frames(calib, meta.input_size), read_frames(held, meta.input_size), info


#: OpenVINO operations that carry weights (what "first/last layer" counts).
WEIGHTED_OPS = ("Convolution", "GroupConvolution", "ConvolutionBackpropData", "GroupConvolutionBackpropData", "MatMul")


def edge_layers(model: Any, stages: dict[str, str]) -> list[str]:
    """The U-Nets' weighted layers that no other weighted layer feeds (each fold's stem) or follows
    (each fold's head, and a gate's last layer): kept in fp32 by :func:`quantize_int8`."""
    ops = [op for op in model.get_ordered_ops() if stages.get(op.get_friendly_name()) == "net"]
    weighted = {op.get_friendly_name() for op in ops if op.get_type_name() in WEIGHTED_OPS}

    def reached(order: list[Any], neighbours: Any) -> set[str]:
        """Nodes with a weighted layer strictly on their side of ``order`` (upstream or downstream)."""
        seen: set[str] = set()
        for op in order:
            if any(n in weighted or n in seen for n in neighbours(op)):
                seen.add(op.get_friendly_name())
        return seen

    fed = reached(ops, lambda op: [i.get_source_output().get_node().get_friendly_name() for i in op.inputs()])
    feeding = reached(ops[::-1], lambda op: [t.get_node().get_friendly_name() for o in op.outputs()
                                              for t in o.get_target_inputs()])
    return [name for name in sorted(weighted) if name not in fed or name not in feeding]


def quantize_int8(model: Any, frames: np.ndarray) -> tuple[Any, dict[str, int]]:
    """NNCF PTQ of the U-Nets' inner layers; returns the quantised model and how many nodes were kept
    out of it (outside the U-Nets; the U-Nets' first and last layers)."""
    try:
        import nncf
    except ImportError as exc:
        raise RuntimeError(f"int8 needs NNCF ({exc}): pip install 'strip-inspection[build]'") from exc
    from engine.backends.openvino import classify_nodes

    stages = classify_nodes(model)
    outside = [name for name, stage in stages.items() if stage != "net"]
    edges = edge_layers(model, stages)
    dataset = nncf.Dataset([frames[i:i + 1] for i in range(len(frames))])
    quantized = nncf.quantize(
        model,
        dataset,
        preset=nncf.QuantizationPreset.MIXED,
        subset_size=len(frames),
        ignored_scope=nncf.IgnoredScope(names=outside + edges, validate=False),
    )
    return quantized, {"ignored_nodes": len(outside), "fp32_layers": len(edges)}


#: Frames per inference call of the parity runs: full-resolution probabilities of a few dozen frames in
#: one call cost the runtime hundreds of MB of scratch memory for nothing.
PARITY_BATCH = 8


def _infer_in_batches(backend: Any, frames: np.ndarray) -> dict[str, np.ndarray]:
    """``backend``'s masks, counts, present and probabilities for ``frames``, run :data:`PARITY_BATCH` at a time."""
    parts = [backend.infer(frames[i:i + PARITY_BATCH]) for i in range(0, len(frames), PARITY_BATCH)]
    names = (graph.MASKS.name, graph.COUNTS.name, graph.PRESENT.name, graph.PROBS_NAME)
    return {name: np.concatenate([getattr(part, name) for part in parts]) for name in names}


def _parity(reference_path: Path, candidate_path: Path, precision: str, frames: np.ndarray,
            tolerance: Tolerance, threads: int) -> ParityReport:
    from engine.backends.openvino import OpenVinoBackend

    reference = OpenVinoBackend(reference_path, precision="fp32", with_probs=True, threads=threads)
    candidate = OpenVinoBackend(candidate_path, precision=precision, with_probs=True, threads=threads)
    meta = reference.metadata
    return compare_outputs(_infer_in_batches(reference, frames), _infer_in_batches(candidate, frames),
                           meta.thresholds, meta.min_areas, tolerance, "openvino fp32 graph",
                           f"openvino {precision} IR", gated=meta.gate_thresholds is not None)


def _check_request(onnx_path: Path, out_path: Path, precision: str, calibration: Any, calibration_frames: int,
                   parity_frames: int) -> None:
    """Raises ValueError / FileNotFoundError naming the bad flag or file."""
    if precision not in PRECISIONS:
        raise ValueError(f"--precision for --target openvino must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if out_path.suffix.lower() != ".xml":
        raise ValueError(f"--out {out_path}: an OpenVINO IR ends in .xml (its weights go beside it in .bin)")
    if not onnx_path.is_file():
        raise FileNotFoundError(f"--onnx {onnx_path}: no such file")
    if precision == "int8" and calibration is None:
        raise ValueError("--precision int8 needs --calibration DIR: frames of the run's own data to calibrate on")
    if calibration_frames < 1 or parity_frames < 1:
        raise ValueError("--calibration-frames and --parity-frames must be >= 1")


def _save_if_within(model: Any, meta: ModelMetadata, build: dict[str, Any], onnx_path: Path, out_path: Path,
                    held: np.ndarray, tolerance: Tolerance, threads: int) -> ParityReport:
    """Saves a trial IR, compares it with the fp32 graph on ``held``, and writes ``out_path`` only
    when it is within ``tolerance`` (raises :class:`BuildParityError` otherwise)."""
    import openvino as ov

    from engine.backends.openvino_ir import write_metadata

    precision = meta.precision
    out_path.parent.mkdir(parents=True, exist_ok=True)
    trial = out_path.with_name(out_path.stem + ".trial.xml")
    write_metadata(model, meta, build)
    ov.save_model(model, str(trial), compress_to_fp16=False)
    try:
        report = _parity(onnx_path, trial, precision, held, tolerance, threads)
        log.info("parity: %s", report.summary())
        if not report.passed:
            raise BuildParityError(
                f"{out_path}: not written: the {precision} IR disagrees with the fp32 graph beyond tolerance: "
                + "; ".join(report.failures) + f" ({report.summary()})"
            )
        write_metadata(model, meta, {**build, "parity": report.to_dict()})
        ov.save_model(model, str(out_path), compress_to_fp16=False)
    finally:
        trial.unlink(missing_ok=True)
        trial.with_suffix(".bin").unlink(missing_ok=True)
    return report


def build_openvino(
    onnx_path: str | Path,
    out_path: str | Path,
    precision: str = "bf16",
    calibration: str | Path | np.ndarray | None = None,
    calibration_frames: int = 300,
    parity_frames: int = 16,
    tolerance: Tolerance | None = None,
    threads: int = 0,
) -> OpenVinoBuildReport:
    """Builds the IR (see the module docstring).

    Raises:
        BuildParityError: beyond tolerance (nothing written).
        ValueError / FileNotFoundError: a bad flag, file or calibration folder, named.
        BackendUnavailable: openvino missing, or bf16 asked for on a CPU without it.
    """
    import openvino as ov

    from engine.backends.openvino import check_precision
    from engine.backends.openvino_ir import model_metadata, read_model
    from engine.hashing import file_sha256

    started = time.perf_counter()
    onnx_path, out_path = Path(onnx_path), Path(out_path)
    _check_request(onnx_path, out_path, precision, calibration, calibration_frames, parity_frames)
    model = read_model(onnx_path)
    source_meta = model_metadata(model, str(onnx_path))
    if source_meta.precision != "fp32":
        raise ValueError(f"{onnx_path} is a {source_meta.precision} graph: build OpenVINO IRs from the fp32 export")
    meta = ModelMetadata.from_dict({**source_meta.to_dict(), "precision": precision})
    check_precision(precision if precision != "int8" else "fp32", source_meta, str(onnx_path))
    if isinstance(calibration, (str, Path)):
        calibration = Path(calibration)
    calib, held, info = split_frames(calibration, meta, calibration_frames, parity_frames)
    if precision == "int8":
        log.info("quantising the U-Nets to int8 on %d calibration frames (NNCF)", len(calib))
        model, kept = quantize_int8(model, calib)
        info.update(kept)
    tolerance = tolerance or tolerance_for(precision)
    build = {"precision": precision, "onnx": str(onnx_path.resolve()), "onnx_sha256": file_sha256(onnx_path),
             "openvino_version": ov.get_version(), "calibration": info,
             "default_tolerance": tolerance == tolerance_for(precision),
             "built_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    report = _save_if_within(model, meta, build, onnx_path, out_path, held, tolerance, threads)
    return OpenVinoBuildReport(out_path, precision, meta, report, time.perf_counter() - started, info)


# --------------------------------------------------------------------------- CLI (engine build dispatches here)


def add_arguments(parser: Any) -> None:
    group = parser.add_argument_group("--target openvino (an OpenVINO IR .xml + .bin for the CPU)")
    group.add_argument("--calibration", type=Path, default=None, metavar="DIR",
                       help="int8: frames of the run's data (Severstal folder or image folder) to calibrate "
                       "on; also where the held-out parity frames come from (default: synthetic frames)")
    group.add_argument("--calibration-frames", type=int, default=300, metavar="N",
                       help="int8: calibration frames (default %(default)s)")
    group.add_argument("--parity-frames", type=int, default=16, metavar="N",
                       help="held-out frames the IR is compared with the fp32 graph on (default %(default)s)")
    group.add_argument("--tolerance", action="append", default=[], metavar="KEY=VALUE",
                       help="override a parity limit (keys of toolchain.parity.Tolerance, e.g. min_mask_dice=0.95)")
    group.add_argument("--threads", type=int, default=0, help="CPU threads for the parity runs (default: all)")


def parse_overrides(items: list[str]) -> dict[str, float]:
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        try:
            overrides[key.strip()] = float(value)
        except ValueError:
            sep = ""
        if not sep:
            raise ValueError(f"--tolerance {item!r}: expected KEY=NUMBER, e.g. min_mask_dice=0.95")
    return overrides


def run(args: Any) -> int:
    precision = args.precision or "bf16"
    tolerance = tolerance_for(precision).with_overrides(parse_overrides(args.tolerance)) if precision in PRECISIONS \
        else None
    report = build_openvino(args.onnx, args.out, precision, args.calibration, args.calibration_frames,
                            args.parity_frames, tolerance, args.threads)
    print(report.summary())
    return 0
