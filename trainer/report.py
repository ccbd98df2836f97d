"""The run report: ``RUN/report.md`` and ``RUN/report.json``, like the thesis' figures 61, 62 and 65.

Built from what the run directory already holds, so it can be rewritten at any time: the run
config, each fold's ``metrics.csv`` and ``config.json`` (best epoch, losses, Dice, time,
parameters), ``postprocess.json``, and every evaluation ``trainer evaluate`` stored under
``RUN/evaluations/``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from network.checkpoint import read_fold_checkpoint
from trainer import rundir

log = logging.getLogger(__name__)

# The thesis' holdout results for the encoders it trained (THESIS.md), for the comparison line.
THESIS_RESULTS: dict[str, dict[str, float]] = {
    "resnet34": {"val_dice": 0.904, "test_dice": 0.692, "label_accuracy": 0.700, "class_accuracy": 0.915},
    "resnet50": {"val_dice": 0.938, "test_dice": 0.701, "label_accuracy": 0.764, "class_accuracy": 0.933},
    "resnet101": {"val_dice": 0.928, "test_dice": 0.701, "label_accuracy": 0.756, "class_accuracy": 0.927},
    "efficientnet-b0": {"val_dice": 0.926, "test_dice": 0.668, "label_accuracy": 0.748, "class_accuracy": 0.928},
    "efficientnet-b1": {"val_dice": 0.927, "test_dice": 0.696, "label_accuracy": 0.772, "class_accuracy": 0.933},
    "efficientnet-b3": {"val_dice": 0.927, "test_dice": 0.714, "label_accuracy": 0.804, "class_accuracy": 0.943},
    "efficientnet-b5": {"val_dice": 0.940, "test_dice": 0.711, "label_accuracy": 0.820, "class_accuracy": 0.949},
    "efficientnet-b7": {"val_dice": 0.925, "test_dice": 0.714, "label_accuracy": 0.804, "class_accuracy": 0.943},
}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path} cannot be read as JSON ({exc})") from None


def _finished(fold_dir: Path, config: dict[str, Any], last_epoch: int, best_epoch: int) -> bool:
    """Whether the fold is done: at its epoch limit or out of patience; under ``--budget-min`` (which ends a
    fold at a time, not an epoch) what its ``last.pt`` says."""
    if config.get("budget_min") is not None and (fold_dir / rundir.LAST).exists():
        return bool((read_fold_checkpoint(fold_dir / rundir.LAST).training or {}).get("finished", False))
    return last_epoch >= int(config.get("epochs", 0)) or last_epoch - best_epoch >= int(config.get("patience", 0))


def fold_summaries(run_dir: Path, config: dict[str, Any]) -> list[dict[str, Any]]:
    """Per fold: epochs run, the best epoch's losses and Dice, minutes, finished, parameters."""
    out = []
    for fold, fold_dir in rundir.fold_dirs(run_dir).items():
        rows = rundir.read_metrics(fold_dir / rundir.METRICS)
        if not rows:
            continue
        best = min(rows, key=lambda r: float(r["val_loss"]))
        last_epoch, best_epoch = int(rows[-1]["epoch"]), int(best["epoch"])
        fold_config_path = fold_dir / rundir.FOLD_CONFIG
        fold_config = _read_json(fold_config_path) if fold_config_path.exists() else {}
        out.append({
            "fold": fold,
            "epochs_run": last_epoch,
            "best_epoch": best_epoch,
            "train_loss": float(best["train_loss"]),
            "val_loss": float(best["val_loss"]),
            "train_dice": float(best["train_dice"]),
            "val_dice": float(best["val_dice"]),
            "minutes": sum(float(r["seconds"]) for r in rows) / 60,
            "finished": _finished(fold_dir, config, last_epoch, best_epoch),
            "best_checkpoint": (fold_dir / rundir.BEST).exists(),
            **fold_config.get("model", {}),
        })
    return out


def build_report(run_dir: Path) -> dict[str, Any]:
    run_dir = Path(run_dir)
    config_path = run_dir / rundir.CONFIG
    config = _read_json(config_path) if config_path.exists() else {}
    folds = fold_summaries(run_dir, config)
    training: dict[str, Any] = {"folds": folds}
    if folds:
        keys = ("train_loss", "val_loss", "train_dice", "val_dice")
        training["mean"] = {k: sum(f[k] for f in folds) / len(folds) for k in keys}
        training["minutes_total"] = sum(f["minutes"] for f in folds)
        training["params_total"] = folds[0].get("params_total")
        training["params_trainable"] = folds[0].get("params_trainable")
    evaluations = {}
    eval_dir = run_dir / rundir.EVALUATIONS
    if eval_dir.is_dir():
        for path in sorted(eval_dir.glob("*.json")):
            evaluations[path.stem] = _read_json(path)
    post = rundir.read_postprocess(run_dir, int(config["num_classes"])) if "num_classes" in config else None
    return {
        "run": str(run_dir),
        "config": config,
        "training": training,
        "postprocess": None if post is None else post.to_dict(),
        "evaluations": evaluations,
        "thesis": THESIS_RESULTS.get(str(config.get("encoder"))),
    }


def _f(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _count(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def render_markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    names = config.get("class_names") or []
    lines = [f"# Training report: {report['run']}", ""]
    if config:
        lines += [
            f"U-Net with a **{config.get('encoder')}** encoder ({config.get('encoder_weights')} weights"
            f"{', frozen' if config.get('freeze_encoder') else ''}, depth {config.get('encoder_depth')}, decoder "
            f"{config.get('decoder_channels')}), frames {config.get('height')}x{config.get('width')} trained at scale "
            f"{config.get('scale')}, loss {config.get('loss')}, Adam lr {config.get('lr')}, batch "
            f"{config.get('batch_size')}, {config.get('folds')} folds, up to {config.get('epochs')} epochs "
            f"(patience {config.get('patience')}), class balancing {'on' if config.get('balance') else 'off'}, "
            f"pos_weight {config.get('pos_weight')}, output prior init {'on' if config.get('prior_init') else 'off'}.",
            "",
        ]
    training = report["training"]
    if training["folds"]:
        lines += ["## Folds (best epoch by validation loss; Dice = the thesis' soft Dice at training resolution)", "",
                  "| fold | epochs | best epoch | train loss | val loss | train Dice | val Dice | minutes |",
                  "|---|---|---|---|---|---|---|---|"]
        for f in training["folds"]:
            lines.append(f"| {f['fold']}{'' if f['finished'] else ' (unfinished)'} | {f['epochs_run']} | "
                         f"{f['best_epoch']} | {_f(f['train_loss'])} | {_f(f['val_loss'])} | {_f(f['train_dice'])} | "
                         f"{_f(f['val_dice'])} | {_f(f['minutes'], 1)} |")
        m = training["mean"]
        lines += [f"| mean | | | {_f(m['train_loss'])} | {_f(m['val_loss'])} | {_f(m['train_dice'])} | "
                  f"{_f(m['val_dice'])} | {_f(training['minutes_total'], 1)} total |", "",
                  f"Parameters: {_count(training.get('params_total'))} total, "
                  f"{_count(training.get('params_trainable'))} trainable. "
                  f"Training time: {_f(training['minutes_total'], 1)} min.", ""]
    post = report.get("postprocess")
    if post:
        lines += ["## Post-processing (searched on out-of-fold predictions)", "",
                  "| class | threshold | min area |", "|---|---|---|"]
        for k, (t, a) in enumerate(zip(post["thresholds"], post["min_areas"])):
            lines.append(f"| {k + 1} {names[k] if k < len(names) else ''} | {t} | {a} |")
        lines += ["", f"Kaggle metric on {post.get('images')} out-of-fold images: {_f(post.get('kaggle_before'))} with "
                  f"the baseline rule -> {_f(post.get('kaggle_after'))} searched.", ""]
    for name, ev in report["evaluations"].items():
        lines += _evaluation_markdown(name, ev, names)
    thesis = report.get("thesis")
    if thesis:
        lines += [f"Thesis ({config.get('encoder')}, real Severstal holdout of 250 images): val Dice "
                  f"{thesis['val_dice']}, test Dice {thesis['test_dice']}, label accuracy {thesis['label_accuracy']}, "
                  f"per-class accuracy {thesis['class_accuracy']}.", ""]
    return "\n".join(lines)


def _evaluation_markdown(name: str, ev: dict[str, Any], names: list[str]) -> list[str]:
    lines = [f"## Evaluation: {name}", "", f"{ev.get('images')} images of the {ev.get('split')} split, model: "
             f"{ev.get('model')}.", ""]
    lines += ["| post-processing | thresholds | min areas | loss | thesis Dice | Kaggle metric | label accuracy | "
              "per-class accuracy |", "|---|---|---|---|---|---|---|---|"]
    for rule_name, rule in ev.get("rules", {}).items():
        s = rule["scores"]
        lines.append(f"| {rule_name} | {rule['thresholds']} | {rule['min_areas']} | {_f(ev.get('loss'))} | "
                     f"{_f(s['thesis_dice'])} | {_f(s['kaggle'])} | {_f(s['label_accuracy'])} | "
                     f"{_f(s['mean_class_accuracy'])} |")
    if "empty_kaggle" in ev:
        lines += ["", f"All-empty prediction on the same images: Kaggle metric {_f(ev['empty_kaggle'])}."]
    primary = ev.get("rules", {}).get(ev.get("primary", ""))
    if primary:
        s = primary["scores"]
        lines += ["", f"Per class ({ev.get('primary')}); confusion `[TN FP FN TP]` of the presence decision:", "",
                  "| class | thesis Dice | Kaggle | accuracy | TN | FP | FN | TP |", "|---|---|---|---|---|---|---|---|"]
        for k, row in enumerate(s["confusion"]["per_class"]):
            label = f"{k + 1} {names[k] if k < len(names) else ''}"
            lines.append(f"| {label} | {_f(s['thesis_dice_per_class'][k])} | {_f(s['kaggle_per_class'][k])} | "
                         f"{_f(s['per_class_accuracy'][k])} | " + " | ".join(str(v) for v in row) + " |")
    lines.append("")
    return lines


def write_report(run_dir: Path) -> dict[str, Any]:
    """Rebuilds ``RUN/report.json`` and ``RUN/report.md`` from the run directory; returns the report."""
    run_dir = Path(run_dir)
    report = build_report(run_dir)
    for name, text in ((rundir.REPORT_JSON, json.dumps(report, indent=2) + "\n"),
                       (rundir.REPORT_MD, render_markdown(report))):
        rundir.atomic_write_text(run_dir / name, text)
    log.info("wrote %s and %s", run_dir / rundir.REPORT_MD, run_dir / rundir.REPORT_JSON)
    return report
