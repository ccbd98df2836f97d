"""``trainer export``: a training run's fold checkpoints -> one ONNX inspection graph (or a .pt bundle).

The graph takes uint8 camera frames ``[N, H, W]`` and returns masks, exact counts and present
labels (see :class:`engine.model.InspectionModel`); thresholds and minimum areas from the run's
``postprocess.json`` and everything else a consumer needs travel in its ``metadata_props``.

Before the file is written the export checks itself: ``onnx.checker``, then ONNX Runtime against
the torch eager reference on synthetic frames (:mod:`engine.parity`); it fails when the outputs
differ beyond the stated tolerance. An FP16 graph is compared with the FP32 reference.

The export also builds the model's drift reference (``ModelMetadata.drift_reference``, see
:mod:`engine.drift`): the line statistics of a seeded sample of the run's non-holdout training
frames, read at the camera's resolution, and their per-class predicted areas from out-of-fold
predictions (each frame by the fold model that did not train on it, with the export's thresholds).
The run's ``config.json`` names its data folders and ``folds.csv`` its split; a run copied away
from its data exports without a reference (with a warning) unless ``--data`` points at the data.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from engine import devices, graph
from engine.cli_util import CLIError
from engine.decision import DEFAULT_MIN_AREA, DEFAULT_THRESHOLD, default_min_areas, default_thresholds
from engine.devices import parse_device
from engine.metadata import ModelMetadata
from trainer import run as rundir

if TYPE_CHECKING:
    from torch import nn

    from engine.drift import DriftReference
    from engine.model import UNetConfig
    from engine.parity import ParityReport

log = logging.getLogger(__name__)

HELP = "export a run's folds as one ONNX inspection graph (or a .pt ensemble bundle)"
DESCRIPTION = (
    "Writes the inspection graph: uint8 frames [N,H,W] -> masks uint8 [N,C,H,W], counts int32 [N,C], "
    "present bool [N,C]. The export checks itself against the torch eager reference and fails beyond "
    "tolerance. '--out model.pt' writes the torch backend's ensemble bundle instead. Both carry a drift "
    "reference for the server: line statistics of a sample of the run's training frames and out-of-fold "
    "predicted areas (--drift-frames; the run's data folders must be reachable, or given with --data)."
)


#: Training frames sampled for the drift reference (0 = none).
DEFAULT_DRIFT_FRAMES = 256
#: Seeds the choice of frames, so re-exporting a run gives the same reference.
DRIFT_SEED = 0
#: Full-resolution frames per out-of-fold prediction batch (8 x 256 x 1600 frames hold ~50 MB of
#: probabilities per class on the device).
DRIFT_BATCH = 8


@dataclass
class RunModel:
    """A run's selected folds, rebuilt, with the metadata of the model they make together."""

    run_dir: Path
    folds: list[nn.Module]
    fold_ids: list[int]
    checkpoints: list[Path]
    config: UNetConfig
    metadata: ModelMetadata


@dataclass
class DriftSummary:
    """How the drift reference was built, or why there is none.

    Attributes:
        frames: training frames in the reference (0 = no reference).
        seconds: time spent reading frames, predicting and binning.
        image_ids: the sampled images, in the order their statistics were taken.
        frames_per_fold: ``{fold: frames}`` predicted by each fold model (out of fold).
        data: the data folders the frames came from.
        skipped: why no reference was written (``--drift-frames 0``, data not found, ...).
    """

    frames: int = 0
    seconds: float = 0.0
    image_ids: list[str] = field(default_factory=list)
    frames_per_fold: dict[int, int] = field(default_factory=dict)
    data: list[str] = field(default_factory=list)
    skipped: str | None = None

    def summary(self) -> str:
        if self.skipped is not None:
            return f"none ({self.skipped})"
        folds = ", ".join(f"fold {k}: {n}" for k, n in self.frames_per_fold.items())
        return f"{self.frames} training frames, areas out of fold ({folds}), built in {self.seconds:.1f} s"

    def to_dict(self) -> dict[str, Any]:
        return {
            "frames": self.frames,
            "seconds": round(self.seconds, 3),
            "image_ids": list(self.image_ids),
            "frames_per_fold": {str(k): n for k, n in self.frames_per_fold.items()},
            "data": list(self.data),
            "skipped": self.skipped,
        }


@dataclass
class ExportReport:
    """What ``export_onnx``/``export_ensemble`` wrote and how it compared with the reference."""

    out_path: Path
    precision: str
    fold_ids: list[int]
    metadata: ModelMetadata
    sha256: str
    size_bytes: int
    opset: int | None = None
    parity: list[ParityReport] = field(default_factory=list)
    drift: DriftSummary | None = None

    def summary(self) -> str:
        lines = [
            f"wrote {self.out_path} ({self.size_bytes / 1e6:.1f} MB, {self.precision}, folds "
            f"{','.join(map(str, self.fold_ids))}, sha256 {self.sha256[:12]})",
            f"  input frames uint8 [N, {self.metadata.input_height}, {self.metadata.input_width}], "
            f"U-Nets at {self.metadata.train_height}x{self.metadata.train_width}, thresholds "
            f"{self.metadata.thresholds}, min areas {self.metadata.min_areas}",
        ]
        lines += [f"  parity: {p.summary()}" for p in self.parity]
        if self.drift is not None:
            lines.append(f"  drift reference: {self.drift.summary()}")
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        return {
            "out_path": str(self.out_path),
            "precision": self.precision,
            "fold_ids": self.fold_ids,
            "metadata": self.metadata.to_dict(),
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "opset": self.opset,
            "parity": [p.to_dict() for p in self.parity],
            "drift": None if self.drift is None else self.drift.to_dict(),
        }


class ExportParityError(ValueError):
    """The exported graph's outputs differ from the reference beyond tolerance."""


# --------------------------------------------------------------------------- reading a run


def parse_folds(folds: str | Sequence[int]) -> list[int] | None:
    """``"all"`` -> None (every fold found); ``"0,2"`` or ``[0, 2]`` -> ``[0, 2]``."""
    if isinstance(folds, str):
        if folds.strip().lower() == "all":
            return None
        try:
            ids = [int(tok) for tok in folds.split(",") if tok.strip()]
        except ValueError:
            raise ValueError(f"--folds must be 'all' or comma-separated fold numbers like 0,1,2; got {folds!r}") from None
    else:
        ids = [int(f) for f in folds]
    if not ids:
        raise ValueError("--folds selects no fold")
    if len(set(ids)) != len(ids):
        raise ValueError(f"--folds lists a fold twice: {ids}")
    return ids


def read_postprocess(run_dir: Path, num_classes: int) -> tuple[list[float], list[int]]:
    """Thresholds and minimum areas from ``RUN/postprocess.json`` (thesis 0.5 / 200 when absent)."""
    path = run_dir / rundir.POSTPROCESS
    if not path.is_file():
        log.info("%s absent: using the thesis defaults (threshold %s, min area %d)", path, DEFAULT_THRESHOLD,
                 DEFAULT_MIN_AREA)
        return default_thresholds(num_classes), default_min_areas(num_classes)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object with 'thresholds' and 'min_areas'")
    thresholds = data.get("thresholds", default_thresholds(num_classes))
    min_areas = data.get("min_areas", default_min_areas(num_classes))
    for name, values in (("thresholds", thresholds), ("min_areas", min_areas)):
        if not isinstance(values, list) or len(values) != num_classes:
            raise ValueError(f"{path}: '{name}' must be a list of {num_classes} values (one per class), got {values!r}")
    try:
        return [float(t) for t in thresholds], [int(a) for a in min_areas]
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: thresholds must be numbers and min_areas integers ({exc})") from exc


# Facts every fold of one model must share; a mismatch means the folds come from different runs.
_SHARED_FACTS = ("input_size", "train_size", "class_names", "mean", "std")


def load_run(run_dir: str | Path, folds: str | Sequence[int] = "all") -> RunModel:
    """Rebuilds a run's selected folds (eval mode, CPU) and the metadata of their ensemble.

    Raises:
        FileNotFoundError: no run directory, or a selected fold has no ``best.pt``.
        ValueError: folds that disagree on architecture or data facts, a bad postprocess.json.
    """
    from engine.hashing import file_sha256
    from engine.model import fold_metadata, load_fold

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    available = rundir.best_checkpoints(run_dir)
    wanted = parse_folds(folds)
    if wanted is None:
        if not available:
            raise FileNotFoundError(f"{run_dir}: no fold checkpoints (expected {run_dir}/fold<k>/best.pt)")
        wanted = sorted(available)
    missing = [k for k in wanted if k not in available]
    if missing:
        raise FileNotFoundError(
            f"{run_dir}: no checkpoint for fold(s) {missing} (expected {run_dir}/fold<k>/best.pt; "
            f"found folds {sorted(available) or 'none'})"
        )
    nets, facts, checkpoints = [], [], []
    config = None
    for k in wanted:
        unet, cfg, fold_facts = load_fold(available[k])
        if config is None:
            config = cfg
        elif cfg != config:
            raise ValueError(f"{available[k]}: U-Net {cfg} differs from fold {wanted[0]}'s {config}")
        first = facts[0] if facts else fold_facts
        for fact in _SHARED_FACTS:
            if getattr(fold_facts, fact) != getattr(first, fact):
                raise ValueError(
                    f"{available[k]}: {fact} {getattr(fold_facts, fact)!r} differs from fold {wanted[0]}'s "
                    f"{getattr(first, fact)!r}; all folds of one model must share it"
                )
        nets.append(unet)
        facts.append(fold_facts)
        checkpoints.append(available[k])
    assert config is not None
    thresholds, min_areas = read_postprocess(run_dir, config.num_classes)
    shas = [file_sha256(p) for p in checkpoints]
    combined = hashlib.sha256("".join(shas).encode()).hexdigest()[:12]
    meta = fold_metadata(
        facts[0],
        config,
        thresholds=thresholds,
        min_areas=min_areas,
        folds=len(nets),
        checkpoint_sha256=shas,
        model_version=f"{run_dir.resolve().name}-{combined}",
    )
    return RunModel(run_dir, nets, list(wanted), checkpoints, config, meta)


# --------------------------------------------------------------------------- drift reference


class _NoDriftData(Exception):
    """The run's training frames cannot be found: export goes on without a drift reference."""


def _recorded_data(run_dir: Path) -> list[Path]:
    """The data folders ``trainer fit`` recorded in ``RUN/config.json``."""
    path = run_dir / rundir.CONFIG
    if not path.is_file():
        raise _NoDriftData(f"{path} does not exist, so the run's data folders are unknown")
    try:
        recorded = json.loads(path.read_text(encoding="utf-8")).get("data")
    except (json.JSONDecodeError, AttributeError):
        raise _NoDriftData(f"{path} is not the JSON object 'trainer fit' writes") from None
    if not recorded or not isinstance(recorded, list):
        raise _NoDriftData(f"{path} records no data folders")
    return [Path(d) for d in recorded]


def drift_sample(
    run_dir: str | Path, fold_ids: Sequence[int], meta: ModelMetadata, frames: int,
    data_dirs: Sequence[str | Path] | None = None, seed: int = DRIFT_SEED,
) -> tuple[list[Any], dict[str, int], list[Path]]:
    """The training images a drift reference is built from, and the fold that did not train on each.

    Up to ``frames`` images, drawn with ``seed`` from the non-holdout images of ``RUN/folds.csv``
    whose fold is among ``fold_ids`` (a fold model was not trained on its own fold's images), in
    image-id order.

    Args:
        run_dir: the training run.
        fold_ids: the folds whose models predict the sample.
        meta: the model's metadata (class count and frame size of the data).
        frames: the most images to draw.
        data_dirs: the run's data folders; None = those recorded in ``RUN/config.json``.
        seed: seeds the draw.

    Returns:
        (samples, ``{image id: fold}``, the data folders).

    Raises:
        FileNotFoundError: ``data_dirs`` given but a folder, ``folds.csv`` or the images are missing.
        _NoDriftData: the same problems with the recorded data folders (the run was copied away).
    """
    import numpy as np

    from trainer.data import DataConfig, load_samples
    from trainer.splits import HOLDOUT, read_folds

    run_dir = Path(run_dir)
    explicit = data_dirs is not None
    missing_error = FileNotFoundError if explicit else _NoDriftData
    dirs = [Path(d) for d in data_dirs] if explicit else _recorded_data(run_dir)
    absent = ", ".join(str(d) for d in dirs if not d.is_dir())
    if absent and explicit:
        raise FileNotFoundError(f"--data {absent}: no such data folder")
    if absent:
        raise _NoDriftData(f"{run_dir / 'config.json'} names the data folder {absent}, which is not on this machine "
                           "(was the run copied away from its data?)")
    folds_path = run_dir / rundir.FOLDS
    if not folds_path.is_file():
        raise missing_error(f"{folds_path} does not exist, so which fold did not train on an image is unknown")
    assignment = read_folds(folds_path)
    data_cfg = DataConfig(num_classes=meta.num_classes, height=meta.input_height, width=meta.input_width,
                          class_names=tuple(meta.class_names))
    by_id = {s.image_id: s for s in load_samples(dirs, data_cfg)}
    wanted = set(fold_ids)
    eligible = sorted(k for k, f in assignment.items() if f != HOLDOUT and f in wanted)
    found = [k for k in eligible if k in by_id]
    if not found:
        raise missing_error(
            f"none of the {len(eligible)} training images of folds {sorted(wanted)} in {folds_path} is in "
            f"{', '.join(map(str, dirs))}: not the run's data?"
        )
    if len(found) < len(eligible):
        log.warning("%d of the %d training images of folds %s in %s are not in %s; the drift reference samples "
                    "the other %d", len(eligible) - len(found), len(eligible), sorted(wanted), folds_path,
                    ", ".join(map(str, dirs)), len(found))
    rng = np.random.default_rng(seed)
    chosen = np.sort(rng.choice(len(found), size=min(frames, len(found)), replace=False))
    ids = [found[i] for i in chosen]
    return [by_id[k] for k in ids], {k: assignment[k] for k in ids}, dirs


def build_drift_reference(
    run: RunModel,
    meta: ModelMetadata,
    frames: int = DEFAULT_DRIFT_FRAMES,
    data_dirs: Sequence[str | Path] | None = None,
    bins: int | None = None,
    seed: int = DRIFT_SEED,
    batch_size: int = DRIFT_BATCH,
    device: str = "cpu",
) -> tuple[DriftReference | None, DriftSummary]:
    """The drift reference of a run's training frames and out-of-fold predicted areas.

    Each sampled frame (see :func:`drift_sample`) is read at the camera's resolution and predicted
    by ``InspectionModel([its fold's U-Net], meta)``, batched per fold; the frame statistics and the
    predicted pixel counts go to :func:`engine.drift.build_reference`.

    Args:
        run: the loaded run (its ``folds`` predict; they are returned to the CPU afterwards).
        meta: the exported model's metadata: thresholds, minimum areas, sizes, normalisation.
        frames: the most frames to sample; 0 builds nothing.
        data_dirs: the run's data folders when they are not where ``config.json`` says; given,
            a missing folder or split is an error instead of a warning.
        bins: histogram bins per statistic (default :data:`engine.drift.DEFAULT_BINS`).
        seed: seeds the sample.
        batch_size: frames per prediction batch.
        device: where the fold models predict (``cpu``, ``cuda``, ``cuda:N``, ``auto``).

    Returns:
        (the reference or None, how it was built or why not).

    Raises:
        FileNotFoundError: ``data_dirs`` given but unusable (see :func:`drift_sample`).
        ValueError: ``frames`` between 1 and ``bins - 1``, or bad training data.
    """
    import numpy as np
    import torch

    from engine.drift import DEFAULT_BINS, build_reference
    from engine.model import InspectionModel
    from trainer.data import DataConfig, read_image

    bins = DEFAULT_BINS if bins is None else bins
    if frames < 0 or 0 < frames < bins:
        raise ValueError(f"--drift-frames must be 0 (no drift reference) or at least {bins} (one per histogram "
                         f"bin), got {frames}")
    if batch_size < 1:
        raise ValueError(f"drift batch size must be >= 1, got {batch_size}")
    if frames == 0:
        return None, DriftSummary(skipped="--drift-frames 0")
    torch_device = devices.torch_device(parse_device(device, "--device"))
    started = time.perf_counter()
    try:
        samples, fold_of, dirs = drift_sample(run.run_dir, run.fold_ids, meta, frames, data_dirs, seed)
    except _NoDriftData as exc:
        message = (f"{exc}; export goes on without a drift reference (the server will not monitor drift): "
                   "pass --data DIR to point at the run's data, or --drift-frames 0 to say so")
        log.warning("%s", message)
        return None, DriftSummary(skipped=str(exc))
    if len(samples) < bins:
        message = f"only {len(samples)} training images to sample, fewer than the {bins} histogram bins"
        log.warning("%s; export goes on without a drift reference", message)
        return None, DriftSummary(skipped=message, data=[str(d) for d in dirs])
    data_cfg = DataConfig(num_classes=meta.num_classes, height=meta.input_height, width=meta.input_width,
                          class_names=tuple(meta.class_names))
    # The frames are kept for build_reference (256 full-resolution frames are ~100 MB): reading the
    # JPEGs twice would cost more than holding them.
    batches: list[np.ndarray] = []
    counts: list[np.ndarray] = []
    order: list[str] = []
    per_fold: dict[int, int] = {}
    for index, k in enumerate(run.fold_ids):
        group = [s for s in samples if fold_of[s.image_id] == k]
        if not group:
            continue
        unet = run.folds[index]
        model = InspectionModel([unet], meta).eval().to(torch_device)
        try:
            for start in range(0, len(group), batch_size):
                chunk = group[start: start + batch_size]
                batch = np.stack([read_image(s.path, data_cfg) for s in chunk])
                with torch.inference_mode():
                    _, batch_counts, _ = model(torch.from_numpy(batch).to(torch_device))
                batches.append(batch)
                counts.append(batch_counts.cpu().numpy())
                order += [s.image_id for s in chunk]
        finally:
            unet.to("cpu")  # the export traces the folds on the CPU
        per_fold[k] = len(group)
        log.info("drift reference: %d frames predicted by fold %d (out of fold)", len(group), k)
    reference = build_reference(batches, np.concatenate(counts), bins=bins)
    summary = DriftSummary(frames=reference.frames, seconds=time.perf_counter() - started, image_ids=order,
                           frames_per_fold=per_fold, data=[str(d) for d in dirs])
    log.info("drift reference: %s", summary.summary())
    return reference, summary


# --------------------------------------------------------------------------- export


def export_onnx(
    run_dir: str | Path,
    out_path: str | Path,
    folds: str | Sequence[int] = "all",
    precision: str = "fp32",
    opset: int = 17,
    with_probs: bool = False,
    parity_frames: int = 2,
    drift_frames: int = DEFAULT_DRIFT_FRAMES,
    drift_data: Sequence[str | Path] | None = None,
    drift_bins: int | None = None,
    device: str = "cpu",
) -> ExportReport:
    """Exports a run's folds as one ONNX inspection graph and checks it.

    Args:
        run_dir: training run directory (``fold<k>/best.pt``, optional ``postprocess.json``).
        out_path: the ``.onnx`` file to write (replaced atomically, only after the checks pass).
        folds: ``"all"``, ``"0,1"`` or a list of fold numbers.
        precision: ``fp32``, or ``fp16`` (U-Nets in half precision; uint8 input, fp32/int32/bool
            outputs and the pre/post-processing stay as they are).
        opset: ONNX opset.
        with_probs: also output the mean probabilities (``probs``), for debugging.
        parity_frames: synthetic frames for the ONNX Runtime vs torch check; 0 skips it (not advised).
        drift_frames, drift_data, drift_bins, device: the drift reference's sample size (0 = no
            reference), the run's data folders when not where it recorded them, histogram bins, and
            where the out-of-fold predictions run (see :func:`build_drift_reference`).

    Raises:
        ExportParityError: the exported graph differs from the reference beyond tolerance.
        FileNotFoundError: ``drift_data`` given but unusable.
    """
    import onnx
    import torch

    from engine.model import InspectionModel
    from engine.parity import compare_outputs, synthetic_frames, tolerance_for

    if precision not in ("fp32", "fp16"):
        raise ValueError(f"--precision must be fp32 or fp16, got {precision!r}")
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".onnx":
        raise ValueError(f"{out_path}: an ONNX export must end in .onnx")
    if parity_frames < 0:
        raise ValueError(f"--parity-frames must be >= 0, got {parity_frames}")
    run = load_run(run_dir, folds)
    meta = ModelMetadata.from_dict({**run.metadata.to_dict(), "precision": precision})
    reference, drift = build_drift_reference(run, meta, drift_frames, drift_data, drift_bins, device=device)
    if reference is not None:
        meta = ModelMetadata.from_dict({**meta.to_dict(), "drift_reference": reference.to_dict()})
    frames = synthetic_frames(max(parity_frames, 1), meta.input_height, meta.input_width, seed=1234)

    reference_model = InspectionModel(list(run.folds), meta, with_probs=True).eval()
    reference = None
    if parity_frames:
        with torch.no_grad():
            masks, counts, present, probs = reference_model(torch.from_numpy(frames))
        reference = {"masks": masks.numpy(), "counts": counts.numpy(), "present": present.numpy(), "probs": probs.numpy()}

    if precision == "fp16":
        import copy

        halves = [copy.deepcopy(f).half() for f in reference_model.folds]
        graph_model = InspectionModel(halves, meta, with_probs=True, compute_dtype=torch.float16).eval()
    else:
        graph_model = reference_model

    output_names = [*graph.OUTPUT_NAMES, graph.PROBS_NAME]
    buffer = io.BytesIO()
    log.info("tracing the %s inspection graph (%d folds, opset %d)", precision, len(run.folds), opset)
    with torch.no_grad(), warnings.catch_warnings():
        # The legacy (TorchScript) exporter is chosen on purpose: it is verified on this graph.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="Constant folding - Only steps=1")  # EfficientNet's padding
        torch.onnx.export(
            graph_model,
            (torch.from_numpy(frames[:1]),),
            buffer,
            input_names=[graph.INPUT_NAME],
            output_names=output_names,
            dynamic_axes={name: {0: "N"} for name in [graph.INPUT_NAME, *output_names]},
            opset_version=opset,
            do_constant_folding=True,
            dynamo=False,
        )
    model = onnx.load_from_string(buffer.getvalue())
    _set_signature(model, meta)
    model.doc_string = f"strip-inspection graph: {meta.folds} x {meta.encoder} U-Net, {precision}"
    del model.metadata_props[:]
    for key, value in meta.to_onnx_props().items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)

    reports = []
    if reference is not None:
        outputs = _run_onnxruntime(model.SerializeToString(), frames, output_names)
        report = compare_outputs(
            reference,
            outputs,
            meta.thresholds,
            meta.min_areas,
            tolerance_for(precision),
            reference_name="torch eager fp32",
            candidate_name=f"onnxruntime cpu {precision}",
        )
        log.info("parity: %s", report.summary())
        reports.append(report)
        if not report.passed:
            raise ExportParityError(
                f"{out_path}: not written: the exported graph disagrees with the reference: {report.summary()}"
            )
    else:
        log.warning("parity check skipped (--parity-frames 0): the graph is not compared with the reference")

    if not with_probs:
        # The probabilities feed the threshold node, so dropping the graph output leaves no dead nodes.
        keep = [o for o in model.graph.output if o.name != graph.PROBS_NAME]
        del model.graph.output[:]
        model.graph.output.extend(keep)
        onnx.checker.check_model(model)
    data = model.SerializeToString()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp")
    tmp.write_bytes(data)
    tmp.replace(out_path)
    report = ExportReport(
        out_path=out_path,
        precision=precision,
        fold_ids=run.fold_ids,
        metadata=meta,
        sha256=hashlib.sha256(data).hexdigest(),
        size_bytes=len(data),
        opset=opset,
        parity=reports,
        drift=drift,
    )
    log.info("wrote %s (%d bytes)", out_path, len(data))
    return report


def _set_signature(model: Any, meta: ModelMetadata) -> None:
    """Writes the static dimensions of the inputs/outputs (the tracer names them symbolically)."""
    shapes = graph.static_dims(meta.num_classes, meta.input_height, meta.input_width)
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_param = "N"
        for dim, size in zip(dims[1:], shapes[value.name]):
            dim.dim_value = size


def _run_onnxruntime(model_bytes: bytes, frames: Any, output_names: Sequence[str]) -> dict[str, Any]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
    values = session.run(list(output_names), {graph.INPUT_NAME: frames})
    return dict(zip(output_names, values))


def export_ensemble(
    run_dir: str | Path,
    out_path: str | Path,
    folds: str | Sequence[int] = "all",
    drift_frames: int = DEFAULT_DRIFT_FRAMES,
    drift_data: Sequence[str | Path] | None = None,
    drift_bins: int | None = None,
    device: str = "cpu",
) -> ExportReport:
    """Writes the torch backend's ``.pt`` ensemble bundle (every selected fold + metadata, drift
    reference included; the drift arguments as in :func:`export_onnx`)."""
    from engine.hashing import file_sha256
    from engine.model import save_ensemble

    out_path = Path(out_path)
    if out_path.suffix.lower() != ".pt":
        raise ValueError(f"{out_path}: an ensemble bundle must end in .pt")
    run = load_run(run_dir, folds)
    meta = run.metadata
    reference, drift = build_drift_reference(run, meta, drift_frames, drift_data, drift_bins, device=device)
    if reference is not None:
        meta = ModelMetadata.from_dict({**meta.to_dict(), "drift_reference": reference.to_dict()})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_ensemble(out_path, run.config, run.folds, meta)
    return ExportReport(
        out_path=out_path,
        precision="fp32",
        fold_ids=run.fold_ids,
        metadata=meta,
        sha256=file_sha256(out_path),
        size_bytes=out_path.stat().st_size,
        drift=drift,
    )


# --------------------------------------------------------------------------- CLI


def add_arguments(parser: Any) -> None:
    parser.add_argument("--run", required=True, type=Path, help="training run directory (fold<k>/best.pt)")
    parser.add_argument("--out", required=True, type=Path, help="model.onnx (inspection graph) or model.pt (bundle)")
    parser.add_argument("--folds", default="all", help="'all' or comma-separated fold numbers (default: all)")
    parser.add_argument("--precision", choices=("fp32", "fp16"), default="fp32", help="U-Net precision (ONNX only)")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--with-probs", action="store_true", help="also output the mean probabilities (debugging)")
    parser.add_argument(
        "--parity-frames", type=int, default=2, help="synthetic frames for the parity check (0 skips it; default 2)"
    )
    parser.add_argument("--report", type=Path, help="also write the export report as JSON here")
    drift = parser.add_argument_group("drift reference (server drift monitoring)")
    drift.add_argument(
        "--drift-frames", type=int, default=DEFAULT_DRIFT_FRAMES, metavar="N",
        help=f"non-holdout training frames sampled for the drift reference (0 = none; default {DEFAULT_DRIFT_FRAMES})",
    )
    drift.add_argument(
        "--data", action="append", type=Path, metavar="DIR",
        help="the run's data folder(s), when not where its config.json says (repeat for several)",
    )
    drift.add_argument("--drift-bins", type=int, default=None, metavar="B",
                       help="histogram bins per statistic (default 10)")
    drift.add_argument("--device", default="cpu",
                       help="where the out-of-fold predictions run: cpu, cuda, cuda:N or auto (default cpu)")


def run(args: Any) -> int:
    suffix = args.out.suffix.lower()
    drift = {"drift_frames": args.drift_frames, "drift_data": args.data, "drift_bins": args.drift_bins,
             "device": args.device}
    if suffix == ".onnx":
        report = export_onnx(
            args.run,
            args.out,
            folds=args.folds,
            precision=args.precision,
            opset=args.opset,
            with_probs=args.with_probs,
            parity_frames=args.parity_frames,
            **drift,
        )
    elif suffix == ".pt":
        if args.precision != "fp32" or args.with_probs:
            raise CLIError("--precision fp16 and --with-probs apply to ONNX exports only; a .pt bundle is fp32")
        report = export_ensemble(args.run, args.out, folds=args.folds, **drift)
    else:
        raise CLIError(f"--out {args.out}: expected a .onnx (inspection graph) or .pt (ensemble bundle) file")
    print(report.summary())
    if args.report:
        args.report.write_text(json.dumps(report.to_dict(), indent=2))
    return 0
