"""``trainer export``: a training run's fold checkpoints -> one ONNX inspection graph (or a .pt bundle).

The graph takes uint8 camera frames ``[N, H, W]`` and returns masks, exact counts and present
labels (see :class:`network.inspection.InspectionModel`); thresholds and minimum areas from the run's
``postprocess.json`` and everything else a consumer needs travel in its ``metadata_props``.

Before the file is written the export checks itself: ``onnx.checker``, then ONNX Runtime against
the torch eager reference on synthetic frames (:mod:`toolchain.parity`); it fails when the outputs
differ beyond the stated tolerance. An FP16 graph is compared with the FP32 reference.

The export also builds the model's drift reference (``ModelMetadata.drift_reference``, see
:mod:`engine.drift`): the line statistics of a seeded sample of the run's non-holdout training
frames, read at the camera's resolution, and their per-class predicted areas from out-of-fold
predictions (each frame by the fold model that did not train on it, with the export's thresholds).
The run's ``config.json`` names its data folders and ``folds.csv`` its split; a run copied away
from its data exports without a reference (with a warning) unless ``--data`` points at the data.
"""

from __future__ import annotations

import copy
import hashlib
import io
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx
import torch

from engine import graph
from engine.files import atomic_write
from engine.hashing import file_sha256
from engine.metadata import ModelMetadata
from network.checkpoint import save_ensemble
from network.inspection import InspectionModel
from toolchain.parity import compare_outputs, synthetic_frames, tolerance_for
from trainer.config import DEFAULT_DRIFT_FRAMES
from trainer.drift_reference import DriftSummary, build_drift_reference
from trainer.rundir import RunModel, load_run

if TYPE_CHECKING:

    from toolchain.parity import ParityReport

log = logging.getLogger(__name__)


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
            f"{self.metadata.arch} networks at {self.metadata.train_height}x{self.metadata.train_width}, TTA "
            f"{self.metadata.tta}, thresholds {self.metadata.thresholds}, min areas {self.metadata.min_areas}",
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


# --------------------------------------------------------------------------- export


def _check_request(out_path: Path, precision: str, parity_frames: int) -> None:
    if precision not in ("fp32", "fp16"):
        raise ValueError(f"--precision must be fp32 or fp16, got {precision!r}")
    if out_path.suffix.lower() != ".onnx":
        raise ValueError(f"{out_path}: an ONNX export must end in .onnx")
    if parity_frames < 0:
        raise ValueError(f"--parity-frames must be >= 0, got {parity_frames}")


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
    tta: str | None = None,
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
            where the out-of-fold predictions run (see :func:`trainer.drift_reference.build_drift_reference`).
        tta: flip TTA in the graph (``none``, ``hflip``, ``hvflip``); default the one ``postprocess.json``
            was searched with.

    Raises:
        ExportParityError: the exported graph differs from the eager reference beyond tolerance.
        FileNotFoundError: ``drift_data`` given but unusable.
    """
    out_path = Path(out_path)
    _check_request(out_path, precision, parity_frames)
    run = load_run(run_dir, folds, tta)
    meta, drift = _with_drift_reference(
        run, ModelMetadata.from_dict({**run.metadata.to_dict(), "precision": precision}),
        drift_frames, drift_data, drift_bins, device)
    frames = synthetic_frames(max(parity_frames, 1), meta.input_height, meta.input_width, seed=1234)
    eager_model = InspectionModel(list(run.folds), meta, with_probs=True).eval()
    eager_outputs = _eager_outputs(eager_model, frames) if parity_frames else None
    graph_model = eager_model
    if precision == "fp16":
        halves = [copy.deepcopy(f).half() for f in eager_model.folds]
        graph_model = InspectionModel(halves, meta, with_probs=True, compute_dtype=torch.float16).eval()
    model = _trace(graph_model, frames, meta, opset)
    reports = []
    if eager_outputs is not None:
        reports.append(_check_parity(model, frames, eager_outputs, meta, out_path))
    else:
        log.warning("parity check skipped (--parity-frames 0): the graph is not compared with the reference")
    data = _serialise(model, with_probs)
    atomic_write(out_path, data, make_parents=True)
    log.info("wrote %s (%d bytes)", out_path, len(data))
    return ExportReport(out_path=out_path, precision=precision, fold_ids=run.fold_ids, metadata=meta,
                        sha256=hashlib.sha256(data).hexdigest(), size_bytes=len(data), opset=opset, parity=reports,
                        drift=drift)


def _with_drift_reference(
    run: RunModel, meta: ModelMetadata, frames: int, data_dirs: Sequence[str | Path] | None, bins: int | None,
    device: str,
) -> tuple[ModelMetadata, DriftSummary]:
    """``meta`` with the run's drift reference in it (when one could be built), and how it was built."""
    drift_reference, summary = build_drift_reference(run.run_dir, run.fold_ids, run.folds, meta, frames, data_dirs,
                                                     bins, device=device)
    if drift_reference is not None:
        meta = ModelMetadata.from_dict({**meta.to_dict(), "drift_reference": drift_reference.to_dict()})
    return meta, summary


def _eager_outputs(eager_model: Any, frames: Any) -> dict[str, Any]:
    """The torch eager fp32 outputs the exported graph is compared with (probabilities included)."""
    with torch.no_grad():
        masks, counts, present, probs = eager_model(torch.from_numpy(frames))
    return {graph.MASKS.name: masks.numpy(), graph.COUNTS.name: counts.numpy(), graph.PRESENT.name: present.numpy(),
            graph.PROBS_NAME: probs.numpy()}


def _trace(graph_model: Any, frames: Any, meta: ModelMetadata, opset: int) -> Any:
    """The traced ONNX model (with ``probs`` among its outputs), its signature and metadata set, checked."""
    output_names = [*graph.OUTPUT_NAMES, graph.PROBS_NAME]
    buffer = io.BytesIO()
    log.info("tracing the %s inspection graph (%d folds, opset %d)", meta.precision, len(graph_model.folds), opset)
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
    model.doc_string = f"strip-inspection graph: {meta.folds} x {meta.encoder} {meta.arch}, {meta.precision}"
    del model.metadata_props[:]
    for key, value in meta.to_onnx_props().items():
        model.metadata_props.add(key=key, value=value)
    onnx.checker.check_model(model)
    return model


def _check_parity(model: Any, frames: Any, eager_outputs: dict[str, Any], meta: ModelMetadata,
                  out_path: Path) -> ParityReport:
    """ONNX Runtime on the graph against the eager outputs; raises ExportParityError beyond tolerance."""
    outputs = _run_onnxruntime(model.SerializeToString(), frames, [*graph.OUTPUT_NAMES, graph.PROBS_NAME])
    report = compare_outputs(eager_outputs, outputs, meta.thresholds, meta.min_areas, tolerance_for(meta.precision),
                             reference_name="torch eager fp32", candidate_name=f"onnxruntime cpu {meta.precision}",
                             gated=meta.gate_thresholds is not None)
    log.info("parity: %s", report.summary())
    if not report.passed:
        raise ExportParityError(
            f"{out_path}: not written: the exported graph disagrees with the reference: {report.summary()}"
        )
    return report


def _serialise(model: Any, with_probs: bool) -> bytes:
    """The model's bytes; without ``probs`` among the outputs unless asked for."""
    if not with_probs:
        # The probabilities feed the threshold node, so dropping the graph output leaves no dead nodes.
        keep = [o for o in model.graph.output if o.name != graph.PROBS_NAME]
        del model.graph.output[:]
        model.graph.output.extend(keep)
        onnx.checker.check_model(model)
    return model.SerializeToString()


def _set_signature(model: Any, meta: ModelMetadata) -> None:
    """Writes the static dimensions of the inputs/outputs (the tracer names them symbolically)."""
    shapes = graph.static_dims(meta.num_classes, meta.input_height, meta.input_width)
    for value in [*model.graph.input, *model.graph.output]:
        dims = value.type.tensor_type.shape.dim
        dims[0].dim_param = "N"
        for dim, size in zip(dims[1:], shapes[value.name]):
            dim.dim_value = size


def _run_onnxruntime(model_bytes: bytes, frames: Any, output_names: Sequence[str]) -> dict[str, Any]:
    import onnxruntime as ort  # an extra, in one of two packages (cpu or gpu): imported where it runs

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
    tta: str | None = None,
) -> ExportReport:
    """Writes the torch backend's ``.pt`` ensemble bundle (every selected fold + metadata, drift
    reference included; the drift arguments as in :func:`export_onnx`)."""
    out_path = Path(out_path)
    if out_path.suffix.lower() != ".pt":
        raise ValueError(f"{out_path}: an ensemble bundle must end in .pt")
    run = load_run(run_dir, folds, tta)
    meta, drift = _with_drift_reference(run, run.metadata, drift_frames, drift_data, drift_bins, device)
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


