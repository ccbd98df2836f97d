"""``trainer evaluate``: score a run's fold ensemble, an exported model or a predictions CSV
(:mod:`trainer.evaluate`), and tune post-processing on out-of-fold predictions."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from engine.backends import BACKEND_CHOICES
from engine.metadata import TTA_MODES
from trainer.splits import SPLITS

HELP = "score a run's fold ensemble or an exported model (holdout / out-of-fold) and tune post-processing"
DESCRIPTION = "score a run's fold ensemble (or an exported model file) and tune post-processing."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, metavar="RUN", help="training run directory")
    parser.add_argument("--data", action="append", metavar="DIR",
                        help="data folder(s); default: the run's training data")
    parser.add_argument("--split", choices=SPLITS, default="holdout", help="which images to score (default holdout)")
    parser.add_argument("--model", metavar="FILE", help="score this exported model (.onnx/.pt/.engine) instead of "
                        "the run's fold checkpoints")
    parser.add_argument("--backend", default="auto", choices=BACKEND_CHOICES,
                        help="runtime for --model (default auto: for .onnx on a CPU OpenVINO bf16 where the CPU has "
                        "native bf16 and openvino is installed, else ONNX Runtime fp32)")
    parser.add_argument("--predictions", metavar="CSV", help="score this Kaggle-format predictions CSV "
                        "(ImageId,ClassId,EncodedPixels; e.g. from 'server client') instead of running a model; "
                        "every scored image must appear in it")
    parser.add_argument("--json", metavar="OUT", help="also write the evaluation JSON here")
    parser.add_argument("--render", type=int, default=0, metavar="N", help="write N overlay PNGs")
    parser.add_argument("--batch-size", type=int, default=8, help="frames per inference batch (default 8)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    parser.add_argument("--workers", type=int, default=2, help="image-decoding worker processes (default 2)")
    parser.add_argument("--thresholds", metavar="T1,T2,..", help="threshold grid of the oof search "
                        "(default 0.10..0.95 step 0.05)")
    parser.add_argument("--min-areas", metavar="A1,A2,..", help="minimum-area grid of the oof search "
                        "(default scaled from 1..10000 for 256x1600 frames)")
    parser.add_argument("--tta", choices=TTA_MODES, default=None,
                        help="flip TTA of the run's folds (none, hflip, hvflip); the oof search records it in "
                             "postprocess.json for export; default: the one postprocess.json was searched with")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                        help="draw progress bars (default: only when the output is a terminal)")


def run(args: argparse.Namespace) -> int:
    def numbers(text: str | None, kind: type, flag: str) -> list | None:
        if text is None:
            return None
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise ValueError(f"{flag} must be comma-separated numbers, got {text!r}") from None

    if args.render < 0 or args.batch_size < 1 or args.workers < 0:
        raise ValueError("--render and --workers must be >= 0, --batch-size >= 1")
    from trainer.evaluate import evaluate_run

    result = evaluate_run(
        Path(args.run), data_dirs=args.data, split=args.split, model_path=args.model,
        predictions_path=args.predictions, render=args.render,
        batch_size=args.batch_size, device=args.device, workers=args.workers,
        threshold_grid=numbers(args.thresholds, float, "--thresholds"),
        min_area_grid=numbers(args.min_areas, int, "--min-areas"), progress=args.progress, tta=args.tta,
        backend_name=args.backend,
    )
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(summary(result))
    return 0


def summary(result: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = [f"{result['split']}: {result['images']} images, {result['model']}"]
    for name, rule in result["rules"].items():
        s = rule["scores"]
        rule_text = ("as in the predictions" if rule["thresholds"] is None
                     else f"thresholds {rule['thresholds']} min areas {rule['min_areas']}")
        lines.append(f"  {name:9s} {rule_text}: Kaggle "
                     f"{s['kaggle']:.4f}  thesis Dice {s['thesis_dice']:.4f}  label acc {s['label_accuracy']:.4f}  "
                     f"per-class acc {s['mean_class_accuracy']:.4f}")
    lines.append(f"  all-empty prediction: Kaggle {result['empty_kaggle']:.4f}")
    if result.get("loss") is not None:
        lines.append(f"  loss ({result['loss_kind']}, full resolution): {result['loss']:.4f}")
    if result.get("postprocess_written"):
        lines.append(f"  wrote {result['postprocess_written']}")
    return "\n".join(lines)
