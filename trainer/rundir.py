"""The training run directory: its file names (defined here only), its shared-file writes, its
config and split, the searched post-processing (:class:`engine.decision.PostProcess`), the
trainer's typed resume state, and loading a run's folds as one model (:func:`load_run`).

Layout::

    RUN/config.json        the resolved fit settings (pins the run: another fit with other settings is refused)
    RUN/folds.csv          the split (fold -1 = holdout)
    RUN/postprocess.json   thresholds / minimum areas searched out of fold (trainer evaluate --split oof)
    RUN/report.md, .json   the run report
    RUN/evaluations/       one JSON per evaluation
    RUN/renders/<name>/    overlay PNGs
    RUN/fold<k>/           best.pt, last.pt, metrics.csv, curves.png, config.json

Several ``trainer fit --fold K`` processes (on one machine or several sharing the directory) may
write one run at the same time: the run-level files are written under an exclusive lock on
``RUN/.lock`` (POSIX ``fcntl`` record locks, which NFS v4 and most cluster filesystems honour),
and every write goes to a uniquely named temporary file first, then is renamed into place, so a
reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import re
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from engine.decision import (
    DEFAULT_MIN_AREA,
    DEFAULT_THRESHOLD,
    PostProcess,
    default_gate_thresholds,
    default_min_areas,
    default_thresholds,
)
from engine.files import atomic_write
from engine.hashing import file_sha256
from engine.metadata import TTA_MODES, ModelMetadata, class_ids
from network.checkpoint import fold_metadata, load_fold
from network.config import UNetConfig
from trainer.config import PLANNED_KEY, FitConfig, differences
from trainer.samples import Sample
from trainer.splits import load_or_make_folds

log = logging.getLogger(__name__)

CONFIG = "config.json"
FOLDS = "folds.csv"
POSTPROCESS = "postprocess.json"
REPORT_MD = "report.md"
REPORT_JSON = "report.json"
EVALUATIONS = "evaluations"
RENDERS = "renders"
LOCK = ".lock"
#: What ``--restart`` deletes from a run directory (with the fold folders): everything fit and
#: evaluate write, nothing else.
OUTPUTS = (CONFIG, FOLDS, POSTPROCESS, REPORT_MD, REPORT_JSON, EVALUATIONS, RENDERS)

BEST = "best.pt"
LAST = "last.pt"
METRICS = "metrics.csv"
CURVES = "curves.png"
FOLD_CONFIG = "config.json"
FOLD_DIR = re.compile(r"^fold(\d+)$")


def fold_dir(run_dir: str | Path, fold: int) -> Path:
    return Path(run_dir) / f"fold{fold}"


@dataclass(frozen=True)
class FoldPaths:
    """A fold's files in the run directory."""

    dir: Path
    best: Path
    last: Path
    metrics: Path
    curves: Path
    config: Path

    @classmethod
    def of(cls, run_dir: str | Path, fold: int) -> FoldPaths:
        d = fold_dir(run_dir, fold)
        return cls(d, d / BEST, d / LAST, d / METRICS, d / CURVES, d / FOLD_CONFIG)


def fold_dirs(run_dir: str | Path) -> dict[int, Path]:
    """``{fold: RUN/fold<k>}`` for every fold folder, in fold order."""
    found = {}
    for child in Path(run_dir).iterdir():
        m = FOLD_DIR.match(child.name)
        if m and child.is_dir():
            found[int(m.group(1))] = child
    return dict(sorted(found.items()))


def best_checkpoints(run_dir: str | Path) -> dict[int, Path]:
    """``{fold: RUN/fold<k>/best.pt}`` for every fold folder holding a best checkpoint."""
    return {k: d / BEST for k, d in fold_dirs(run_dir).items() if (d / BEST).is_file()}


# --------------------------------------------------------------------------- writing shared files


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replaces ``path`` with ``text`` through :func:`engine.files.atomic_write` (the one atomic write)."""
    atomic_write(path, text)


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


@contextlib.contextmanager
def locked(run_dir: str | Path) -> Iterator[None]:
    """Holds the run directory's exclusive lock (blocking until other writers release it)."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / LOCK, "a+b") as handle:
        try:
            fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("waiting for %s: another trainer process is writing this run's shared files", run_dir / LOCK)
            fcntl.lockf(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.lockf(handle, fcntl.LOCK_UN)


# --------------------------------------------------------------------------- config.json and folds.csv


def remove_outputs(run_dir: str | Path) -> None:
    """Deletes what fit and evaluate write (:data:`OUTPUTS` and the fold folders), nothing else."""
    out = Path(run_dir)
    for name in OUTPUTS:
        path = out / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    for folder in fold_dirs(out).values():
        shutil.rmtree(folder)


def check_or_write_config(run_dir: str | Path, cfg: FitConfig, restart: bool,
                          planned: dict[str, Any] | None = None) -> None:
    """Writes ``RUN/config.json`` (with ``planned``, the planner's choices and reasons, under
    :data:`trainer.config.PLANNED_KEY`), or checks that the run it pins has ``cfg``'s settings.

    Raises:
        ValueError: the run directory holds a run with other settings (and no ``restart``), or
            training outputs without a config.
    """
    out = Path(run_dir)
    config_path = out / CONFIG
    if restart:
        log.info("--restart: deleting the previous results in %s", out)
        remove_outputs(out)
    elif config_path.exists():
        try:
            saved = json.loads(config_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise ValueError(f"{config_path} is not valid JSON ({exc}); use --restart to start the run over") from None
        changed = differences(saved, cfg)
        if changed:
            raise ValueError(
                f"{out} holds a run with other settings:\n  " + "\n  ".join(changed)
                + "\nuse --restart to delete its results and start over, or choose another --out"
            )
        return
    elif fold_dirs(out):
        raise ValueError(f"{out} has fold folders but no {CONFIG}; use --restart to start over there")
    write_json(config_path, cfg.to_dict() | ({PLANNED_KEY: planned} if planned else {}))


def fix_split(run_dir: str | Path, cfg: FitConfig, samples: Sequence[Sample]) -> dict[str, int]:
    """``RUN/folds.csv``'s split of ``samples`` (made, or copied from ``cfg.folds_file``, when absent)."""
    run_folds = Path(run_dir) / FOLDS
    source = run_folds if run_folds.exists() or cfg.folds_file is None else Path(cfg.folds_file)
    assignment = load_or_make_folds(source, samples, cfg.frames.num_classes, cfg.folds, cfg.holdout_count_or_fraction,
                                    cfg.seed)
    if source != run_folds:
        atomic_write_text(run_folds, source.read_text(encoding="utf-8"))
    return assignment


# --------------------------------------------------------------------------- postprocess.json


def postprocess_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / POSTPROCESS


def read_postprocess(run_dir: str | Path, num_classes: int) -> PostProcess | None:
    """The run's searched decision rule, checked for ``num_classes``; None before ``evaluate --split oof``.

    Raises:
        ValueError: a malformed file (named), see :meth:`engine.decision.PostProcess.from_json`.
    """
    path = postprocess_path(run_dir)
    if not path.is_file():
        return None
    return PostProcess.from_json(path.read_text(encoding="utf-8"), str(path)).check(num_classes, TTA_MODES, str(path))


def write_postprocess(run_dir: str | Path, post: PostProcess) -> Path:
    """Writes ``RUN/postprocess.json`` (atomically); returns its path."""
    path = postprocess_path(run_dir)
    atomic_write_text(path, post.to_json())
    return path


# --------------------------------------------------------------------------- metrics.csv


def metrics_columns(num_classes: int) -> list[str]:
    """``metrics.csv`` header: overall columns, then per-class Dice (class ids 1..C)."""
    per_class = [f"{split}_dice_{k}" for split in ("train", "val") for k in class_ids(num_classes)]
    return ["epoch", "train_loss", "val_loss", "train_dice", "val_dice", *per_class, "lr", "seconds"]


def read_metrics(path: Path) -> list[dict[str, str]]:
    if not path.exists():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def write_metrics(path: Path, rows: Sequence[dict[str, Any]], columns: list[str]) -> None:
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, text.getvalue())


# --------------------------------------------------------------------------- resume state


@dataclass
class TrainingState:
    """What ``last.pt`` carries beyond the fold's facts, to resume training after its epoch.

    Attributes:
        optimizer, scheduler, scaler: torch state dicts (scheduler/scaler None when unused).
        early_stopping: ``{"best_val_loss", "best_epoch", "bad_epochs"}``.
        rng: torch/numpy/python (and CUDA) random states.
        seconds: training time so far.
        finished: the fold is done (early-stopped or at its last epoch).
        best_epoch, best_val_loss: the best epoch so far.
        budget: ``--budget-min``'s fitted schedule (:meth:`trainer.budget.EpochBudget.state`); None without
            a budget. States written before budgets existed lack the key: they had none.
    """

    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    scaler: dict[str, Any] | None
    early_stopping: dict[str, Any]
    rng: dict[str, Any]
    seconds: float
    finished: bool
    best_epoch: int
    best_val_loss: float
    budget: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The state's keys; ``budget`` only when there is one (a fold without a budget writes what it wrote
        before budgets existed)."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        if d["budget"] is None:
            del d["budget"]
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None, source: str = "last.pt") -> TrainingState:
        """Raises ValueError naming missing or unknown keys (a ``best.pt`` has no resume state)."""
        if data is None:
            raise ValueError(f"{source}: holds no training state to resume from (is it a best.pt?)")
        names = {f.name for f in dataclasses.fields(cls)}
        missing, unknown = sorted(names - set(data) - {"budget"}), sorted(set(data) - names)
        if missing or unknown:
            raise ValueError(f"{source}: training state lacks {missing or 'nothing'} and has unknown keys "
                             f"{unknown or 'none'}; use --restart to start the fold over")
        return cls(**data)


# --------------------------------------------------------------------------- loading a run


@dataclass
class RunModel:
    """A run's selected folds, rebuilt, with the metadata of the model they make together."""

    run_dir: Path
    folds: list[nn.Module]
    fold_ids: list[int]
    checkpoints: list[Path]
    config: UNetConfig
    metadata: ModelMetadata


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


def resolve_tta(tta: str | None, post: PostProcess | None, source: Path) -> str:
    """``tta``, or the searched rule's when None; warns when it differs from the one the thresholds were
    searched with (``source``, the run's ``postprocess.json``)."""
    searched = "none" if post is None else post.tta
    if tta is None:
        return searched
    if tta != searched and post is not None:
        log.warning("--tta %s, but %s was searched with --tta %s: its thresholds may not suit", tta, source, searched)
    return tta


def _decision(run_dir: Path, num_classes: int, gate: bool, tta: str | None) -> dict[str, Any]:
    """The run's decision rule for :func:`network.checkpoint.fold_metadata`: its ``postprocess.json``, else
    the thesis defaults (0.5 per class for a gate head)."""
    post = read_postprocess(run_dir, num_classes)
    if post is None:
        log.info("%s absent: using the thesis defaults (threshold %s, min area %d)", postprocess_path(run_dir),
                 DEFAULT_THRESHOLD, DEFAULT_MIN_AREA)
    gate_thresholds = None
    if gate:
        gate_thresholds = post.gate_thresholds if post is not None and post.gate_thresholds is not None \
            else default_gate_thresholds(num_classes)
    return {
        "thresholds": default_thresholds(num_classes) if post is None else post.thresholds,
        "min_areas": default_min_areas(num_classes) if post is None else post.min_areas,
        "tta": resolve_tta(tta, post, postprocess_path(run_dir)),
        "gate_thresholds": gate_thresholds,
    }


# Facts every fold of one model must share; a mismatch means the folds come from different runs.
_SHARED_FACTS = ("input_size", "train_size", "class_names", "mean", "std")


def load_run(run_dir: str | Path, folds: str | Sequence[int] = "all", tta: str | None = None) -> RunModel:
    """Rebuilds a run's selected folds (eval mode, CPU) and the metadata of their ensemble (flip
    TTA ``tta``, default the run's: see :func:`resolve_tta`).

    Raises:
        FileNotFoundError: no run directory, or a selected fold has no ``best.pt``.
        ValueError: folds that disagree on architecture or data facts, a bad postprocess.json.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run directory")
    available = best_checkpoints(run_dir)
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
    shas = [file_sha256(p) for p in checkpoints]
    combined = hashlib.sha256("".join(shas).encode()).hexdigest()[:12]
    meta = fold_metadata(
        facts[0],
        config,
        folds=len(nets),
        checkpoint_sha256=shas,
        model_version=f"{run_dir.resolve().name}-{combined}",
        **_decision(run_dir, config.num_classes, config.gate, tta),
    )
    return RunModel(run_dir, nets, list(wanted), checkpoints, config, meta)
