"""The product's trainer against a plain baseline, with the same wall-clock budget and the same holdout.

    python tools/compare_training.py --data ../shared/data/neu-det --classes 6 --budget-min 20 --out compare

- baseline: what a first attempt does: smp U-Net (the same encoder, depth, decoder and training
  resolution), BCE, Adam, best epoch by validation loss, threshold 0.5 and the thesis' minimum
  area; no balancing, no output-prior initialisation, no augmentation, no crops, no TTA;
- product: the same network budget with the product's options (``--product`` overrides them:
  ``--product augment=strong --product loss=bce+dice``), then the out-of-fold search of thresholds
  and minimum areas on the fold it trained (a partial run) and the TTA it names;
- or, with ``--product-plan``, the product is what ``trainer fit --budget-min M`` plans and trains when
  given nothing but the data, classes, seed and the shared split (its own network, scale, crop, batch
  and epochs fitted to the budget: :mod:`trainer.plan`), searched and scored the same way.

``--seeds N`` trains each model N times (seeds 0..N-1, every seed on the first seed's split) and
reports each seed, the mean and standard deviation, and whether the product beat the baseline in
every seed. Each trains fold 0 of one split (written once, used by both) until its budget is spent (checked
after every epoch, so one epoch always runs) or its epochs run out, then both are scored on the
same holdout. Writes ``OUT/comparison.md`` (Kaggle metric, per-class Dice, label accuracy, epochs,
minutes) and ``OUT/comparison.json``. Figures mean something only on a quiet machine.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trainer.config import FitOptions, FitSettings, resolve  # noqa: E402

log = logging.getLogger("compare_training")

#: Settings both share (the network and the resolution; the budget decides the epochs).
NETWORK = {"encoder": "resnet18", "encoder_weights": "none", "encoder_depth": 3, "decoder_channels": (32, 16, 8),
           "scale": 0.5, "batch_size": 8, "lr": 0.002, "folds": 5, "holdout": 0.15, "epochs": 1000,
           "patience": 1000}
#: The plain baseline: every product option off.
BASELINE = {"arch": "unet", "loss": "bce", "pos_weight": None, "balance": False, "prior_init": False,
            "augment": "none", "crop": None, "lr_schedule": "none"}
#: The product's preset (to be tuned by measurement; ``tta`` is the evaluation's and export's).
PRODUCT = {"loss": "bce+dice", "pos_weight": None, "balance": True, "prior_init": True, "augment": "light",
           "tta": "hflip"}


class BudgetSpent(Exception):
    """Raised after the epoch that used up a run's wall-clock budget."""


def _value(text: str) -> Any:
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    if text.lower() in ("none", "null"):
        return None
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    return tuple(_value(v) for v in text.split(",")) if "," in text else text


def overrides(pairs: list[str], flag: str) -> dict[str, Any]:
    out = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep:
            raise SystemExit(f"{flag} {pair!r}: expected key=value, e.g. augment=strong")
        out[key.replace("-", "_")] = _value(text)
    return out


def train(name: str, values: dict[str, Any], out: Path, budget_s: float, workers: int) -> dict[str, Any]:
    """Trains fold 0 of ``values`` into ``out / name`` until the budget is spent; returns what happened."""
    from trainer.fit import run_fit

    cfg = resolve(FitSettings(**values))
    started = time.monotonic()
    epochs: list[int] = []

    def stop_when_spent(event: Any) -> None:
        epochs.append(event.epoch)
        if time.monotonic() - started >= budget_s:
            raise BudgetSpent

    try:
        run_fit(cfg, FitOptions(out=str(out / name), fold=0, device="cpu", workers=workers, progress=False,
                                restart=True), on_epoch_end=stop_when_spent)
    except BudgetSpent:
        log.info("%s: budget of %.1f min spent after epoch %d", name, budget_s / 60, epochs[-1])
    return {"epochs": len(epochs), "minutes": round((time.monotonic() - started) / 60, 2),
            "config": cfg.to_dict()}


def train_planned(values: dict[str, Any], out: Path, budget_s: float, workers: int) -> dict[str, Any]:
    """Trains what ``trainer fit --budget-min`` plans from ``values`` (the data, classes, seed and split) into
    ``out / "product"``; the trainer's own budget ends it."""
    from trainer.fit import run_fit
    from trainer.plan import plan_fit

    given = {**values, "budget_min": budget_s / 60}
    settings = FitSettings(**given)
    options = FitOptions(out=str(out / "product"), device="cpu", workers=workers, progress=False, restart=True)
    settings, options, plan = plan_fit(settings, options, given)
    log.info("product plan:\n%s", "\n".join(plan.lines()))
    cfg = resolve(settings)
    started = time.monotonic()
    [outcome] = run_fit(cfg, options, planned=plan.to_dict())
    return {"epochs": outcome.epochs_run, "minutes": round((time.monotonic() - started) / 60, 2),
            "config": cfg.to_dict()}


def score(name: str, run: Path, tta: str | None, search: bool) -> dict[str, Any]:
    from trainer.evaluate import evaluate_run

    if search:
        evaluate_run(run, split="oof", device="cpu", tta=tta)
    result = evaluate_run(run, split="holdout", device="cpu", tta=tta)
    scores = result["rules"][result["primary"]]["scores"]
    return {"name": name, "images": result["images"], "kaggle": scores["kaggle"],
            "kaggle_per_class": scores["kaggle_per_class"], "label_accuracy": scores["label_accuracy"],
            "empty_kaggle": result["empty_kaggle"], "thresholds": result["metadata"]["thresholds"],
            "min_areas": result["metadata"]["min_areas"], "tta": result["metadata"]["tta"]}


def table(rows: list[dict[str, Any]], class_names: list[str]) -> str:
    head = ["model", "seed", "epochs", "minutes", "Kaggle metric",
            *[f"Dice {k + 1} {n}" for k, n in enumerate(class_names)], "label accuracy"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["name"], str(r["seed"]), str(r["epochs"]), f"{r['minutes']:.1f}", f"{r['kaggle']:.4f}",
                 *[f"{v:.4f}" for v in r["kaggle_per_class"]], f"{r['label_accuracy']:.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append(f"\nholdout: {rows[0]['images']} images; predicting nothing scores Kaggle {rows[0]['empty_kaggle']:.4f}. "
                 "Per-class Dice is the Kaggle metric of each class (1 for a pair both empty).")
    return "\n".join(lines) + "\n"


def summary(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per model: mean and standard deviation (n-1; 0 for one seed) of its seeds' scores, and whether
    the product beat the baseline in every seed."""
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        mine = [r for r in rows if r["name"] == name]
        stats: dict[str, Any] = {"seeds": len(mine)}
        for key in ("kaggle", "label_accuracy", "minutes", "epochs"):
            values = np.array([r[key] for r in mine], dtype=np.float64)
            stats[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1)) if len(values) > 1 else 0.0}
        out[name] = stats
    base, product = (list(out) + [None, None])[:2]
    if base is not None and product is not None:
        pairs = [(b, p) for b in rows if b["name"] == base for p in rows if p["name"] == product and p["seed"] == b["seed"]]
        for key in ("kaggle", "label_accuracy"):
            out[product][f"{key}_above_baseline_every_seed"] = all(p[key] > b[key] for b, p in pairs)
    return out


def summary_table(stats: dict[str, dict[str, Any]]) -> str:
    lines = ["| model | seeds | Kaggle metric (mean ± std) | label accuracy (mean ± std) | epochs | minutes |",
             "|---|---|---|---|---|---|"]
    for name, s in stats.items():
        lines.append(f"| {name} | {s['seeds']} | {s['kaggle']['mean']:.4f} ± {s['kaggle']['std']:.4f} | "
                     f"{s['label_accuracy']['mean']:.4f} ± {s['label_accuracy']['std']:.4f} | "
                     f"{s['epochs']['mean']:.1f} | {s['minutes']['mean']:.1f} |")
    for name, s in stats.items():
        for key in ("kaggle", "label_accuracy"):
            if f"{key}_above_baseline_every_seed" in s:
                verdict = "yes" if s[f"{key}_above_baseline_every_seed"] else "no"
                lines.append(f"\n{name}: {key.replace('_', ' ')} above the baseline in every seed: {verdict}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", action="append", required=True, metavar="DIR", help="Severstal-format data folder")
    parser.add_argument("--out", type=Path, default=Path("compare"), help="output folder (default compare/)")
    parser.add_argument("--budget-min", type=float, required=True, help="wall-clock minutes of training per model")
    parser.add_argument("--classes", type=int, default=4, help="defect classes (NEU-DET: 6)")
    parser.add_argument("--seeds", type=int, default=1,
                        help="training seeds per model (default 1); every seed uses the first seed's split")
    parser.add_argument("--network", action="append", default=[], metavar="KEY=VALUE",
                        help="override a shared setting, e.g. encoder=resnet34 or scale=1.0")
    parser.add_argument("--product", action="append", default=[], metavar="KEY=VALUE",
                        help="override a product setting, e.g. augment=strong, crop=64,64 or tta=none")
    parser.add_argument("--product-plan", action="store_true",
                        help="the product is trainer fit's own plan for the budget (only data, classes, seed and "
                             "split given); --network and --product then apply to the baseline alone")
    parser.add_argument("--workers", type=int, default=0, help="data-loader workers (default 0)")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds {args.seeds}: expected at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    network = {**NETWORK, **overrides(args.network, "--network"), "data": args.data, "num_classes": args.classes}
    product = {**PRODUCT, **overrides(args.product, "--product")}
    tta = product.pop("tta", "none")
    budget_s = args.budget_min * 60
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict[str, Any]] = []
    folds_file: str | None = None
    for seed in range(args.seeds):
        out = args.out if args.seeds == 1 else args.out / f"seed{seed}"
        split = {"seed": seed} if folds_file is None else {"seed": seed, "folds_file": folds_file}
        baseline_run = train("baseline", {**network, **BASELINE, **split}, out, budget_s, args.workers)
        # Every run trains on the first baseline's split, so all are scored on the same holdout.
        folds_file = folds_file or str(out / "baseline" / "folds.csv")
        if args.product_plan:
            given = {"data": args.data, "num_classes": args.classes, "seed": seed, "folds_file": folds_file,
                     "folds": network["folds"], "holdout": network["holdout"]}
            product_run = train_planned(given, out, budget_s, args.workers)
        else:
            product_run = train("product", {**network, **BASELINE, **product, "seed": seed, "folds_file": folds_file},
                                out, budget_s, args.workers)
        rows += [{**score("baseline (U-Net, BCE, Adam, 0.5)", out / "baseline", "none", search=False),
                  **baseline_run, "seed": seed},
                 {**score(f"product (oof search, TTA {tta})", out / "product", tta, search=True), **product_run,
                  "seed": seed}]
    names = list(resolve(FitSettings(**network)).frames.class_names)
    stats = summary(rows)
    markdown = table(rows, names) + "\n" + summary_table(stats)
    (args.out / "comparison.md").write_text(markdown, encoding="utf-8")
    (args.out / "comparison.json").write_text(json.dumps({"runs": rows, "summary": stats}, indent=2, default=_json)
                                              + "\n", encoding="utf-8")
    print(markdown)
    return 0


def _json(value: Any) -> Any:
    return dataclasses.asdict(value) if dataclasses.is_dataclass(value) else str(value)


if __name__ == "__main__":
    sys.exit(main())
