"""``trainer evaluate``: score a run's fold ensemble (or an exported model file) and tune post-processing.

Splits:

- ``holdout`` (default): the images ``folds.csv`` kept out of every fold, scored by the ensemble of
  every fold's ``best.pt`` (built by :func:`trainer.rundir.load_run`, exactly what export ships,
  and run through :class:`network.inspection.InspectionModel`, the eager twin of the exported graph), or
  by ``--model FILE`` through its engine backend, so the exported artifact itself is scored.
- ``oof``: every non-holdout image, each predicted by the one fold model that did not train on
  it. The per-class threshold and minimum area maximising the Kaggle metric are searched on these
  predictions (:mod:`trainer.postsearch`) and written to ``RUN/postprocess.json`` for export.
- ``all``: every image of ``--data`` (e.g. a separate labelled test folder).

Masks are scored at the frame's full resolution. The result goes to
``RUN/evaluations/<name>.json`` (and ``--json OUT``), the run report is rebuilt, and ``--render N``
writes N overlays to ``RUN/renders/<name>/``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader

from engine.backends import load_backend
from engine.backends.base import InspectionResult
from engine.cli_util import progress_bar
from engine.decision import PostProcess, default_min_areas, default_thresholds
from engine.devices import parse_device
from engine.devices import torch_device as torch_device_for
from engine.overlay import render_evaluation, write_png
from trainer import rundir
from trainer.config import FitConfig
from trainer.data import SeverstalDataset, load_samples, loader_context, read_annotations
from trainer.losses import SegmentationLoss, logits_from_probs
from trainer.metrics import PixelStats, mask_stats, score
from trainer.postsearch import (
    DEFAULT_THRESHOLDS,
    ThresholdStats,
    default_min_area_grid,
    search,
    search_gate,
    threshold_stats,
)
from trainer.predictors import PredictionsFile, Predictor
from trainer.report import write_report
from trainer.rundir import resolve_tta
from trainer.splits import HOLDOUT, SPLITS, read_folds

if TYPE_CHECKING:
    from engine.metadata import ModelMetadata
    from trainer.samples import Sample

log = logging.getLogger(__name__)



# --------------------------------------------------------------------------- evaluation


def _load_config(run_dir: Path) -> FitConfig:
    path = run_dir / rundir.CONFIG
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a training run: {path} does not exist")
    try:
        return FitConfig.from_dict(json.loads(path.read_text(encoding="utf-8")), str(path))
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON ({exc})") from None


def _split_groups(
    split: str, samples: Sequence[Sample], run_dir: Path, cfg: FitConfig
) -> list[tuple[int | None, list[Sample]]]:
    """``[(fold or None, samples)]``: one group for holdout/all, one per fold for oof."""
    if split == "all":
        return [(None, list(samples))]
    folds_path = run_dir / rundir.FOLDS
    if not folds_path.is_file():
        raise FileNotFoundError(f"{folds_path} does not exist: the run's split is unknown")
    assignment = read_folds(folds_path)
    by_id = {s.image_id: s for s in samples}
    wanted = sorted(k for k, f in assignment.items() if (f == HOLDOUT) == (split == "holdout"))
    missing = [k for k in wanted if k not in by_id]
    if missing:
        raise FileNotFoundError(
            f"{len(missing)} {split} images of {folds_path} are not in the data (e.g. {', '.join(missing[:3])}); "
            "give the run's data folders with --data"
        )
    if not wanted:
        raise ValueError(f"{folds_path} has no {split} images")
    if split == "holdout":
        return [(None, [by_id[k] for k in wanted])]
    trained = [k for k in range(cfg.folds) if k in rundir.best_checkpoints(run_dir)]
    if not trained:
        raise FileNotFoundError(f"{run_dir}: no fold checkpoints (expected {run_dir}/fold<k>/best.pt); "
                                "train a fold first ('trainer fit ... --fold 0')")
    if len(trained) < cfg.folds:
        log.warning("only %d of the run's %d folds have a best.pt; scoring out of fold on the images of folds %s",
                    len(trained), cfg.folds, trained)
    return [(k, [by_id[i] for i in wanted if assignment[i] == k]) for k in trained]


def _render_choice(samples: Sequence[Sample], count: int) -> set[str]:
    """``count`` images to draw: defective ones taking each class in turn (so every class shows up),
    then defect-free ones if there are too few."""
    by_class: dict[int, list[str]] = {}
    for s in samples:
        for k in s.labels:
            by_class.setdefault(k, []).append(s.image_id)
    chosen: list[str] = []
    queues = [list(reversed(by_class[k])) for k in sorted(by_class)]
    while len(chosen) < count and any(queues):
        for queue in queues:
            while queue and queue[-1] in chosen:
                queue.pop()
            if queue and len(chosen) < count:
                chosen.append(queue.pop())
    chosen += [s.image_id for s in samples if not s.labels][: max(0, count - len(chosen))]
    return set(chosen)


def evaluate_run(
    run_dir: Path,
    data_dirs: Sequence[str | Path] | None = None,
    split: str = "holdout",
    model_path: str | Path | None = None,
    predictions_path: str | Path | None = None,
    render: int = 0,
    batch_size: int = 8,
    device: str = "auto",
    workers: int = 0,
    threshold_grid: Sequence[float] | None = None,
    min_area_grid: Sequence[int] | None = None,
    progress: bool | None = False,
    tta: str | None = None,
    backend_name: str | None = None,
) -> dict[str, Any]:
    """Scores a split; for ``oof`` also searches and writes ``RUN/postprocess.json``. Returns the result dict.

    ``--model`` runs on the backend :func:`engine.backends.load_backend` chooses (``backend_name`` forces one).

    Raises:
        FileNotFoundError: run files, checkpoints, data images or the model file are missing.
        ValueError: a combination that cannot be scored (``--model`` with ``oof``, a model whose
            classes or frame size differ from the data).
    """
    started = time.perf_counter()
    run_dir = Path(run_dir)
    _check_request(split, model_path, predictions_path)
    cfg = _load_config(run_dir)
    dirs = [Path(d) for d in (data_dirs or cfg.data)]
    groups = _split_groups(split, load_samples(dirs, cfg.frames), run_dir, cfg)
    scoring = _Scoring(cfg, cfg.frames, split, torch_device_for(parse_device(device, "--device")), threshold_grid)
    post = rundir.read_postprocess(run_dir, cfg.frames.num_classes)
    scoring.tta = resolve_tta(tta, post, rundir.postprocess_path(run_dir))
    backend = None if model_path is None else _open_model(model_path, device, cfg.frames, backend_name)
    if backend is not None and backend.max_batch_size is not None:
        batch_size = min(batch_size, backend.max_batch_size)
    predictions = None if predictions_path is None else _read_predictions(Path(predictions_path), groups, split,
                                                                          cfg.frames.num_classes)
    name = _evaluation_name(split, model_path or predictions_path)
    scoring.prepare_renders(run_dir / rundir.RENDERS / name, [s for _, group in groups for s in group], render)
    try:
        for fold, group in groups:
            predictor = (Predictor.of_predictions(predictions) if predictions is not None
                         else Predictor.of_backend(model_path, backend) if backend is not None
                         else _run_predictor(run_dir, fold, cfg, scoring))
            scoring.score_group(predictor, fold, group, batch_size, workers, progress)
    finally:
        if backend is not None:
            backend.close()
    result = scoring.result(dirs)
    if scoring.grid_parts:
        _compare_and_search(result, scoring, run_dir, min_area_grid)
    elif split == "oof":
        raise AssertionError("the fold ensemble always returns probabilities")
    result["seconds"] = round(time.perf_counter() - started, 2)
    _write_evaluation(run_dir, name, result)
    return result


def _write_evaluation(run_dir: Path, name: str, result: dict[str, Any]) -> None:
    """``RUN/evaluations/<name>.json``, then the run report that lists it."""
    eval_dir = run_dir / rundir.EVALUATIONS
    eval_dir.mkdir(exist_ok=True)
    rundir.atomic_write_text(eval_dir / f"{name}.json", json.dumps(result, indent=2) + "\n")
    write_report(run_dir)


def _check_request(split: str, model_path: Any, predictions_path: Any) -> None:
    if split not in SPLITS:
        raise ValueError(f"--split must be one of {', '.join(SPLITS)}, got {split!r}")
    if model_path is not None and predictions_path is not None:
        raise ValueError("give --model or --predictions, not both")
    if predictions_path is not None and split == "oof":
        raise ValueError("--split oof tunes post-processing on probabilities, which a predictions CSV does not have")
    if model_path is not None and split == "oof":
        raise ValueError("--split oof scores each image with the fold model that did not train on it; an exported "
                         "model averages every fold (each saw those images), so drop --model for oof")


def _open_model(model_path: str | Path, device: str, data_cfg: Any, backend_name: str | None = None) -> Any:
    """The exported model through its engine backend, checked against the data."""
    backend = load_backend(model_path, device=device, backend=backend_name)
    meta = backend.metadata
    if meta.num_classes != data_cfg.num_classes or meta.input_size != data_cfg.size:
        backend.close()
        raise ValueError(f"{model_path} takes {meta.input_height}x{meta.input_width} frames with {meta.num_classes} "
                         f"classes; the data has {data_cfg.height}x{data_cfg.width} frames with "
                         f"{data_cfg.num_classes} classes")
    return backend


def _read_predictions(path: Path, groups: list[tuple[int | None, list[Sample]]], split: str,
                      num_classes: int) -> PredictionsFile:

    rles = read_annotations(path, num_classes)
    scored = [s.image_id for _, group in groups for s in group]
    absent = [i for i in scored if i not in rles]
    if absent:
        raise ValueError(f"{path} has no rows for {len(absent)} of the {len(scored)} {split} images "
                         f"(e.g. {', '.join(absent[:3])}): every scored image must appear, even defect-free ones")
    return PredictionsFile(path, rles)


def _loss_kind(cfg: FitConfig) -> str:
    optim = cfg.optim
    return optim.loss + ("" if optim.pos_weight is None else f" pos_weight {list(optim.pos_weight)}")


def _run_predictor(run_dir: Path, fold: int | None, cfg: FitConfig, scoring: _Scoring) -> Predictor:
    """The run's ensemble (holdout, all), or the one fold that did not train on ``fold`` (oof)."""
    if fold is not None:
        return Predictor.of_run(run_dir, [fold], scoring.device,
                                override={**scoring.baseline, "tta": scoring.tta, "gate_thresholds": None},
                                amp=cfg.optim.amp)
    predictor = Predictor.of_run(run_dir, "all", scoring.device, override={"tta": scoring.tta}, amp=cfg.optim.amp)
    if predictor.metadata.folds < cfg.folds:
        log.warning("only %d of the run's %d folds have a best.pt; scoring their ensemble",
                    predictor.metadata.folds, cfg.folds)
    return predictor


class _Scoring:
    """The statistics an evaluation gathers, group by group, and the result built from them."""

    def __init__(self, cfg: FitConfig, data_cfg: Any, split: str, device: Any,
                 threshold_grid: Sequence[float] | None) -> None:

        c = cfg.frames.num_classes
        self.cfg, self.data_cfg, self.split, self.device = cfg, data_cfg, split, device
        self.threshold_grid = threshold_grid
        self.tta = "none"
        self.baseline = {"thresholds": default_thresholds(c), "min_areas": default_min_areas(c)}
        self.criterion = SegmentationLoss(cfg.optim.loss, cfg.optim.pos_weight).to(device)
        self.stats_parts: list[Any] = []
        self.grid_parts: list[Any] = []
        self.loss_sum, self.loss_count = 0.0, 0
        self.renders: list[str] = []
        self.model_names: list[str] = []
        self.folds: list[int | None] = []
        self.metas: list[ModelMetadata | None] = []
        self.render_dir: Path | None = None
        self.rendered_ids: set[str] = set()

    def prepare_renders(self, render_dir: Path, samples: Sequence[Sample], count: int) -> None:
        self.render_dir, self.rendered_ids = render_dir, _render_choice(samples, count)
        if count and render_dir.is_dir():
            for stale in render_dir.glob("*.png"):  # from an earlier evaluation of this name
                stale.unlink()

    def score_group(self, predictor: Predictor, fold: int | None, group: list[Sample], batch_size: int,
                    workers: int, progress: bool | None) -> None:


        self.model_names.append(predictor.name)
        self.metas.append(predictor.metadata)
        self.folds.append(fold)
        self.grid = sorted(set(self.threshold_grid or DEFAULT_THRESHOLDS) | set(self.baseline["thresholds"])
                           | set(predictor.metadata.thresholds if predictor.metadata else []))
        loader = DataLoader(SeverstalDataset(group, self.data_cfg, scale=1.0), batch_size=batch_size,
                            num_workers=workers, pin_memory=self.device.type == "cuda",
                            multiprocessing_context=loader_context(workers))
        position = 0
        bar = progress_bar(loader, desc=f"{self.split}{'' if fold is None else f' fold {fold}'}",
                           show=progress, leave=False, dynamic_ncols=True)
        for frames, truth in bar:
            chunk = group[position:position + frames.shape[0]]
            result = predictor.predict(frames.numpy(), [s.image_id for s in chunk])
            self.add_batch(frames, truth, result)
            self.render_batch(chunk, frames, truth, result)
            position += frames.shape[0]
        bar.close()

    def add_batch(self, frames: Any, truth: Any, result: InspectionResult) -> None:
        masks, present = torch.from_numpy(result.masks), torch.from_numpy(result.present)
        self.stats_parts.append(mask_stats(masks, truth, present=present))
        if result.probs is None:
            return
        probs = torch.from_numpy(result.probs).to(self.device)
        truth_dev = truth.to(self.device, non_blocking=True)
        part = threshold_stats(probs, truth_dev, self.grid)
        part.gate = result.gate
        self.grid_parts.append(part)
        with torch.inference_mode():
            loss = self.criterion(logits_from_probs(probs), truth_dev)
        self.loss_sum += float(loss) * frames.shape[0]
        self.loss_count += frames.shape[0]

    def render_batch(self, chunk: Sequence[Sample], frames: Any, truth: Any, result: InspectionResult) -> None:
        meta = self.metas[-1]  # the predictor of this group (None for a predictions CSV)
        for i, sample in enumerate(chunk):
            if sample.image_id not in self.rendered_ids or self.render_dir is None:
                continue
            self.render_dir.mkdir(parents=True, exist_ok=True)
            rendering = render_evaluation(
                frames[i].numpy(), truth[i].numpy(), result.masks[i], result.counts[i].tolist(),
                result.present[i].tolist(), list(self.cfg.frames.class_names or (meta.class_names if meta else [])),
                min_areas=meta.min_areas if meta else None, title=f"{sample.image_id} ({self.split})")
            # The outcomes in the name: ..._TP4-FN3.png reads "class 4 found, class 3 missed".
            path = self.render_dir / f"{Path(sample.image_id).stem}_{rendering.outcome_tag}.png"
            write_png(path, rendering.image)
            self.renders.append(str(path))

    def result(self, dirs: Sequence[Path]) -> dict[str, Any]:
        self.stats = PixelStats.concatenate(self.stats_parts)
        meta = self.metas[0]
        model_rule = "thesis" if self.split == "oof" else "model"
        rules: dict[str, Any] = {model_rule: {
            "thresholds": None if meta is None else list(meta.thresholds),
            "min_areas": None if meta is None else list(meta.min_areas),
            "scores": score(self.stats).to_dict()}}
        cfg = self.cfg
        names = self.model_names
        return {
            "split": self.split,
            "model": names[0] if len(names) == 1 else f"each image by its out-of-fold model ({len(names)} folds)",
            "data": [str(d) for d in dirs],
            "images": len(self.stats),
            "primary": model_rule,
            "loss": self.loss_sum / self.loss_count if self.loss_count else None,
            "loss_kind": _loss_kind(cfg),
            "empty_kaggle": float((self.stats.truth == 0).mean()),
            "empty_kaggle_per_class": (self.stats.truth == 0).mean(axis=0).tolist(),
            "metadata": None if meta is None else {
                "thresholds": list(meta.thresholds), "min_areas": list(meta.min_areas),
                "model_version": meta.model_version, "folds": meta.folds, "tta": meta.tta},
            "rules": rules,
            "renders": self.renders,
        }


def _compare_and_search(result: dict[str, Any], scoring: _Scoring, run_dir: Path,
                        min_area_grid: Sequence[int] | None) -> None:
    """Adds the baseline rule's scores (when the model's rule differs) and, for oof, the searched rule,
    writing ``RUN/postprocess.json``."""
    grid_stats = ThresholdStats.concatenate(scoring.grid_parts)
    baseline, meta, rules = scoring.baseline, scoring.metas[0], result["rules"]
    if scoring.split != "oof":
        if list(meta.thresholds) + list(meta.min_areas) != baseline["thresholds"] + baseline["min_areas"]:
            baseline_stats = grid_stats.pixel_stats(baseline["thresholds"], baseline["min_areas"])
            rules["baseline"] = {**baseline, "scores": score(baseline_stats).to_dict()}
        return
    data_cfg, cfg = scoring.data_cfg, scoring.cfg
    areas = sorted(set(min_area_grid or default_min_area_grid(data_cfg.height, data_cfg.width))
                   | set(baseline["min_areas"]))
    found = search(grid_stats, areas, baseline["thresholds"], baseline["min_areas"])
    gate = None
    if grid_stats.gate is not None:  # folds with a gate head: its thresholds, given the pixel rule's
        gate, _ = search_gate(grid_stats, found.thresholds, found.min_areas)
    searched = grid_stats.pixel_stats(found.thresholds, found.min_areas, gate)
    rules["searched"] = {"thresholds": found.thresholds, "min_areas": found.min_areas, "gate_thresholds": gate,
                         "scores": score(searched).to_dict()}
    result["primary"] = "searched"
    postprocess = PostProcess(
        **found.to_dict(), split="oof", folds=cfg.folds, scored_folds=scoring.folds, tta=scoring.tta,
        gate_thresholds=gate, run=str(run_dir),
        checkpoint_sha256=[m.checkpoint_sha256[0] if m.checkpoint_sha256 else None for m in scoring.metas],
        written_by="trainer evaluate --split oof",
        kaggle_after_gate=None if gate is None else rules["searched"]["scores"]["kaggle"],
    )
    path = rundir.write_postprocess(run_dir, postprocess)
    result["postprocess"] = postprocess.to_dict()
    result["postprocess_written"] = str(path)
    log.info("wrote %s: thresholds %s, min areas %s; Kaggle metric %.4f -> %.4f", path, found.thresholds,
             found.min_areas, found.baseline_kaggle, found.kaggle)


# The figures of an evaluation that depend only on what the product answers per (image, class):
# the presence decision and the masks of present classes. A Kaggle-format predictions CSV (what the
# server's client writes) carries exactly that, so these agree between a model run directly and its
# answers streamed through the server; the thesis Dice also scores absent classes' raw masks.
DECISION_SCORES = ("kaggle", "kaggle_per_class", "label_accuracy", "per_class_accuracy", "mean_class_accuracy",
                   "confusion")


def decision_scores(result: dict[str, Any]) -> dict[str, Any]:
    """The :data:`DECISION_SCORES` of an :func:`evaluate_run` result (or its ``--json`` file), for its
    primary rule.

    Raises:
        ValueError: ``result`` is not an evaluation, or lacks one of the figures.
    """
    try:
        scores = result["rules"][result["primary"]]["scores"]
    except (KeyError, TypeError) as exc:
        raise ValueError(f"not a 'trainer evaluate' result: no scores for its primary rule ({exc!r})") from None
    missing = [k for k in DECISION_SCORES if k not in scores]
    if missing:
        raise ValueError(f"evaluation scores lack {', '.join(missing)}")
    return {k: scores[k] for k in DECISION_SCORES}


def _evaluation_name(split: str, model_path: str | Path | None) -> str:
    return split if model_path is None else f"{split}-{Path(model_path).name}"
