"""``trainer export``: a run's fold checkpoints -> one ONNX inspection graph or a .pt bundle (:mod:`trainer.export`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.cli_util import CLIError
from engine.metadata import TTA_MODES
from trainer.config import DEFAULT_DRIFT_FRAMES

HELP = "export a run's folds as one ONNX inspection graph (or a .pt ensemble bundle)"
DESCRIPTION = (
    "Writes the inspection graph: uint8 frames [N,H,W] -> masks uint8 [N,C,H,W], counts int32 [N,C], "
    "present bool [N,C]. The export checks itself against the torch eager reference and fails beyond "
    "tolerance. '--out model.pt' writes the torch backend's ensemble bundle instead. Both carry a drift "
    "reference for the server: line statistics of a sample of the run's training frames and out-of-fold "
    "predicted areas (--drift-frames; the run's data folders must be reachable, or given with --data)."
)


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
    parser.add_argument("--tta", choices=TTA_MODES, default=None,
                        help="flip test-time augmentation inside the graph: none, hflip, or hvflip (frame, "
                             "horizontal and vertical flip); default: the one postprocess.json was searched with")
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
    from trainer.export import export_ensemble, export_onnx

    suffix = args.out.suffix.lower()
    drift = {"drift_frames": args.drift_frames, "drift_data": args.data, "drift_bins": args.drift_bins,
             "device": args.device, "tta": args.tta}
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
