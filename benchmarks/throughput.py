"""``bench throughput``: images/sec per backend and batch size, stage by stage, against the naive pipeline.

With no arguments it builds (or reuses) the small default bench model (a one-fold ResNet-18 U-Net
with a slim decoder at the thesis geometry: 256x1600 camera frames, U-Net at 128x800; random
weights, see benchmarks.models) and measures ONNX Runtime and torch eager on the CPU, and
the naive pipeline, in about a minute on a 2-core machine.

A timed batch runs JPEG decode -> (upload) -> backend inference -> RLE (see
benchmarks.pipeline). The model's FLOPs per image are counted (see benchmarks.flops)
and the achieved FLOP/s of the inference stage is compared with the peak a large matrix product
reaches on the same device in the same run.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.pipeline import STAGES

log = logging.getLogger(__name__)

HELP = "images/sec per backend and batch size (decode, H2D, inference, RLE, D2H) vs the naive pipeline"
DESCRIPTION = __doc__.split("\n\n", 1)[1] if __doc__ else HELP

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


@dataclass(frozen=True)
class Variant:
    """One way of running a model file: backend options and the device kind it needs."""

    suffixes: tuple[str, ...]
    device: str
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""


VARIANTS: dict[str, Variant] = {
    "onnxruntime": Variant((".onnx",), "cpu", {}, "ONNX Runtime, CPU provider"),
    "onnxruntime-cuda": Variant((".onnx",), "cuda", {"provider": "cuda"}, "ONNX Runtime, CUDA provider, IO binding"),
    "torch": Variant((".pt",), "cpu", {"precision": "fp32"}, "torch eager fp32 on the CPU"),
    "torch-cuda-fp32": Variant((".pt",), "cuda", {"precision": "fp32"}, "torch eager fp32 on CUDA"),
    "torch-cuda-fp16": Variant((".pt",), "cuda", {"precision": "fp16"}, "torch eager fp16, channels_last, CUDA"),
    "tensorrt": Variant((".engine", ".plan"), "cuda", {}, "TensorRT engine"),
    "tensorrt-graphs": Variant((".engine", ".plan"), "cuda", {"cuda_graphs": True}, "TensorRT, CUDA graphs"),
    "naive": Variant((".pt",), "cpu", {}, "naive pipeline on the CPU (per image, numpy post-processing)"),
    "naive-cuda": Variant((".pt",), "cuda", {}, "naive pipeline with the U-Nets on CUDA"),
}
DEFAULT_BACKENDS = ("onnxruntime", "torch", "naive")


@dataclass
class ThroughputConfig:
    """Settings of one ``bench throughput`` run (filled from the CLI flags)."""

    models: list[Path] = field(default_factory=list)
    backends: tuple[str, ...] = DEFAULT_BACKENDS
    batch_sizes: tuple[int, ...] = (1, 2, 4)
    frames: int = 8
    min_repeats: int = 3
    warmup: int = 1
    naive_frames: int = 3
    height: int | None = None
    width: int | None = None
    threads: int = 0
    reference: Path | None = None
    check_frames: int = 2
    peak_seconds: float = 2.0
    peak_size: int | None = None
    cache_dir: Path | None = None
    encoder: str = "resnet18"
    folds: int = 1

    def __post_init__(self) -> None:
        unknown = [b for b in self.backends if b not in VARIANTS]
        if unknown:
            raise ValueError(f"--backends: unknown backend(s) {unknown}; choose from {', '.join(VARIANTS)}")
        if not self.backends:
            raise ValueError("--backends selects no backend")
        if not self.batch_sizes or any(b < 1 for b in self.batch_sizes):
            raise ValueError(f"--batch-sizes must be positive integers, got {list(self.batch_sizes)}")
        for name in ("frames", "min_repeats", "naive_frames"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0 or self.threads < 0 or self.check_frames < 0 or self.peak_seconds < 0:
            raise ValueError("--warmup, --threads, --check-frames and --peak-seconds must be >= 0")
        if self.peak_size is not None and self.peak_size < 1:
            raise ValueError(f"--peak-size must be >= 1, got {self.peak_size}")
        for path in self.models:
            if not path.is_file():
                raise FileNotFoundError(f"--model {path}: no such file")
        if (self.height is None) != (self.width is None):
            raise ValueError("--height and --width go together")


def parse_int_list(text: str, flag: str) -> tuple[int, ...]:
    try:
        values = tuple(int(tok) for tok in text.split(",") if tok.strip())
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated integers like 1,4,8, got {text!r}") from None
    if not values:
        raise ValueError(f"{flag} is empty")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, action="append", default=[], metavar="FILE",
                        help="model file (.onnx, .pt, .engine); repeat for several. Default: build or reuse "
                        "the small bench model (random weights) and use its .onnx and .pt")
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS),
                        help=f"comma-separated, from: {', '.join(VARIANTS)} (default %(default)s); each runs "
                        "on every --model file of its kind")
    parser.add_argument("--batch-sizes", default="1,2,4", help="comma-separated batch sizes (default %(default)s)")
    parser.add_argument("--frames", type=int, default=8,
                        help="images timed per backend and batch size (default %(default)s)")
    parser.add_argument("--min-repeats", type=int, default=3, help="timed batches at least (default %(default)s)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed batches first (default %(default)s)")
    parser.add_argument("--naive-frames", type=int, default=3,
                        help="images timed through the naive pipeline (default %(default)s)")
    parser.add_argument("--height", type=int, default=None, help="frame height of the default model (256)")
    parser.add_argument("--width", type=int, default=None, help="frame width of the default model (1600)")
    parser.add_argument("--encoder", default="resnet18", help="encoder of the default model (default %(default)s)")
    parser.add_argument("--folds", type=int, default=1, help="folds of the default model (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch and ONNX Runtime (default 0 = one per usable CPU)")
    parser.add_argument("--reference", type=Path, default=None, metavar="FILE.pt",
                        help="the .pt the naive pipeline runs (default: a .pt among --model, or the .pt "
                        "beside an .onnx)")
    parser.add_argument("--check-frames", type=int, default=2,
                        help="frames on which every backend's outputs are compared with the naive "
                        "pipeline's (0 = no check; default %(default)s)")
    parser.add_argument("--peak-seconds", type=float, default=2.0,
                        help="time spent measuring each matmul peak (default %(default)s)")
    parser.add_argument("--peak-size", type=int, default=None,
                        help="matrix size of the peak measurement (default 2048 on the CPU, 8192 on CUDA)")
    parser.add_argument("--markdown", type=Path, default=None, metavar="OUT.md",
                        help="also append the table to this Markdown file (e.g. a results log)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "throughput.json", metavar="OUT",
                        help="write every figure and the machine description here (default %(default)s)")
    parser.add_argument("--plot", type=Path, default=RESULTS_DIR / "throughput.png", metavar="OUT.png",
                        help="images/sec vs batch size plot (default %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the default model is built (default benchmarks/results/models)")


def config_from_args(args: argparse.Namespace) -> ThroughputConfig:
    return ThroughputConfig(
        models=list(args.model),
        backends=tuple(b.strip() for b in args.backends.split(",") if b.strip()),
        batch_sizes=parse_int_list(args.batch_sizes, "--batch-sizes"),
        frames=args.frames,
        min_repeats=args.min_repeats,
        warmup=args.warmup,
        naive_frames=args.naive_frames,
        height=args.height,
        width=args.width,
        threads=args.threads,
        reference=args.reference,
        check_frames=args.check_frames,
        peak_seconds=args.peak_seconds,
        peak_size=args.peak_size,
        cache_dir=args.cache_dir,
        encoder=args.encoder,
        folds=args.folds,
    )


def resolve_models(cfg: ThroughputConfig) -> tuple[list[Path], Path | None, dict[str, Any] | None]:
    """The model files to measure, the naive pipeline's ``.pt``, and the default model's spec (if built)."""
    if cfg.models:
        models = list(cfg.models)
        reference = cfg.reference
        if reference is None:
            reference = next((m for m in models if m.suffix.lower() == ".pt"), None)
        if reference is None:
            reference = next((m.with_suffix(".pt") for m in models if m.with_suffix(".pt").is_file()), None)
        return models, reference, None
    from benchmarks.models import BenchModelSpec, ensure_model

    spec = BenchModelSpec(
        encoder=cfg.encoder,
        folds=cfg.folds,
        height=cfg.height or 256,
        width=cfg.width or 1600,
        train_height=(cfg.height or 256) // 2,
        train_width=(cfg.width or 1600) // 2,
    )
    built = ensure_model(spec, cfg.cache_dir)
    return [built.onnx, built.pt], cfg.reference or built.pt, {"name": spec.name, **spec.key()}


def model_summary(meta: Any) -> str:
    return (
        f"{meta.folds} x {meta.encoder} U-Net, frames {meta.input_height}x{meta.input_width}, U-Net at "
        f"{meta.train_height}x{meta.train_width}, {meta.precision}"
    )


def read_metadata(path: Path) -> Any:
    """The metadata of an ``.onnx`` or ``.pt`` model without building a backend (None for others)."""
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        from engine.metadata import read_onnx_metadata

        return read_onnx_metadata(str(path))
    if suffix == ".pt":
        from engine.model import load_ensemble

        return load_ensemble(path)[2]
    return None


def peak_key(device: str, precision: str) -> tuple[str, str]:
    """Which measured peak a row is compared with: fp16 rows with the fp16 matmul peak; fp32 rows on
    CUDA with the TF32 one (their convolutions run in TF32 by default), on the CPU with FP32."""
    if not device.startswith("cuda"):
        return ("cpu", "float32")
    return ("cuda", "float16" if precision == "fp16" else "tf32")


def run_throughput(cfg: ThroughputConfig) -> dict[str, Any]:
    """Runs the measurements and returns the report (rows, models, peaks, machine, notes).

    torch's thread count is process-wide: it is set for the run and restored after it.
    """
    import torch

    threads_before = torch.get_num_threads()
    try:
        return _run_throughput(cfg)
    finally:
        torch.set_num_threads(threads_before)


def _run_throughput(cfg: ThroughputConfig) -> dict[str, Any]:
    import torch

    from benchmarks.flops import measure_peak_flops, model_flops
    from benchmarks.machine import describe_machine, usable_cpus
    from benchmarks.naive import NaivePipeline, agreement, agreement_band
    from benchmarks.pipeline import decode_frames, jpeg_frames, repeats_for, time_backend, time_naive
    from engine.backends import load_backend

    threads = cfg.threads or usable_cpus()
    torch.set_num_threads(threads)
    wants_cuda = any(VARIANTS[b].device == "cuda" for b in cfg.backends)
    if wants_cuda and not torch.cuda.is_available():
        raise ValueError(
            f"--backends {','.join(cfg.backends)} includes CUDA backends, but torch sees no CUDA GPU here; "
            f"use CPU backends ({', '.join(b for b, v in VARIANTS.items() if v.device == 'cpu')})"
        )
    models, reference, default_spec = resolve_models(cfg)
    runnable = [
        b for b in cfg.backends
        if (reference is not None if b.startswith("naive") else any(
            p.suffix.lower() in VARIANTS[b].suffixes for p in models))
    ]
    if not runnable:
        raise ValueError(
            f"nothing to measure: no model file suits --backends {','.join(cfg.backends)} (models: "
            f"{', '.join(p.name for p in models)}; the naive pipeline needs a .pt)"
        )
    notes: list[str] = []
    machine_before = describe_machine()

    # Peaks first, on an idle process: the ceiling each row is compared with.
    peaks: dict[tuple[str, str], Any] = {}
    kinds = {VARIANTS[b].device for b in cfg.backends}
    for kind in sorted(kinds):
        device = "cuda:0" if kind == "cuda" else "cpu"
        dtypes = ("tf32", "float16") if kind == "cuda" else ("float32",)
        for dtype in dtypes:
            log.info("measuring the %s %s matmul peak", device, dtype)
            peaks[(kind, dtype)] = measure_peak_flops(device, dtype, size=cfg.peak_size, seconds=cfg.peak_seconds)

    model_info: list[dict[str, Any]] = []
    flops_by_model: dict[Path, int | None] = {}
    for path in models:
        count = model_flops(path)
        flops_by_model[path] = count.flops_per_image if count else None
        info = {"file": path.name, "path": str(path), "flops": count.to_dict() if count else None}
        meta = read_metadata(path)
        if meta is not None:
            info["summary"] = model_summary(meta)
        model_info.append(info)

    rows = []
    naive_row = None
    naive_check = None
    pool: list[bytes] | None = None
    size: tuple[int, int] | None = None

    def frames_pool(meta: Any) -> list[bytes]:
        nonlocal pool, size
        if size is not None and size != meta.input_size:
            raise ValueError(
                f"models take different frame sizes ({size[0]}x{size[1]} and {meta.input_height}x"
                f"{meta.input_width}); bench them in separate runs"
            )
        if cfg.height is not None and (cfg.height, cfg.width) != meta.input_size:
            raise ValueError(
                f"--height/--width {cfg.height}x{cfg.width} differ from the model's input size "
                f"{meta.input_height}x{meta.input_width}"
            )
        if pool is None:
            size = meta.input_size
            distinct = max(max(cfg.batch_sizes), cfg.naive_frames, cfg.check_frames, 8)
            pool = jpeg_frames(min(distinct, 64), *size)
        return pool

    naive_variants = [b for b in cfg.backends if b.startswith("naive")]
    for name in naive_variants:
        if reference is None:
            notes.append(f"{name}: skipped, no .pt model for it (give --reference FILE.pt)")
            continue
        device = "cuda:0" if VARIANTS[name].device == "cuda" else "cpu"
        naive = NaivePipeline.from_file(reference, device=device)
        frames = frames_pool(naive.metadata)
        log.info("timing the naive pipeline (%s, %d images)", device, cfg.naive_frames)
        m = time_naive(naive, frames, cfg.naive_frames, model=reference.name, warmup=min(cfg.warmup, 1))
        if reference not in flops_by_model:
            count = model_flops(reference)
            flops_by_model[reference] = count.flops_per_image if count else None
        m.flops_per_image = flops_by_model[reference]
        peak = peaks.get(peak_key(device, "fp32"))
        m.peak_flops_per_s = peak.flops_per_s if peak else None
        if naive_row is None:
            naive_row = m
            if cfg.check_frames:
                check = decode_frames(frames[: cfg.check_frames], *naive.metadata.input_size)
                naive_check = (check, naive.run(check), naive.metadata)
        rows.append(m)
        del naive

    checks: list[dict[str, Any]] = []
    for name in cfg.backends:
        if name.startswith("naive"):
            continue
        variant = VARIANTS[name]
        targets = [p for p in models if p.suffix.lower() in variant.suffixes]
        if not targets:
            notes.append(f"{name}: skipped, no {'/'.join(variant.suffixes)} model given")
            continue
        for path in targets:
            options = dict(variant.options)
            if name in ("onnxruntime", "torch"):
                options["threads"] = threads
            device = "cuda" if variant.device == "cuda" else "cpu"
            log.info("loading %s with %s", path.name, name)
            backend = load_backend(path, device=device, **options)
            try:
                frames = frames_pool(backend.metadata)
                info = next(i for i in model_info if i["path"] == str(path))
                info.setdefault("summary", model_summary(backend.metadata))
                peak = peaks.get(peak_key(str(backend.device), str(backend.precision)))
                for batch_size in cfg.batch_sizes:
                    if backend.max_batch_size is not None and batch_size > backend.max_batch_size:
                        notes.append(f"{name} {path.name}: batch {batch_size} skipped, above the engine's "
                                     f"max batch {backend.max_batch_size}")
                        continue
                    repeats = repeats_for(cfg.frames, batch_size, cfg.min_repeats)
                    log.info("timing %s %s batch %d (%d runs)", name, path.name, batch_size, repeats)
                    m = time_backend(backend, frames, batch_size, repeats, cfg.warmup, model=path.name, label=name)
                    m.flops_per_image = flops_by_model.get(path)
                    m.peak_flops_per_s = peak.flops_per_s if peak else None
                    rows.append(m)
                if naive_check is not None:
                    check_batch, naive_result, meta = naive_check
                    if backend.max_batch_size is not None and len(check_batch) > backend.max_batch_size:
                        notes.append(f"{name} {path.name}: not compared with the naive pipeline "
                                     f"(--check-frames above the max batch {backend.max_batch_size})")
                        continue
                    result = backend.infer(check_batch)
                    band = agreement_band(str(backend.precision), str(backend.device))
                    a = agreement(naive_result, result, meta.thresholds, meta.min_areas, band)
                    checks.append({"backend": name, "model": path.name, "frames": len(check_batch), **a.to_dict()})
                    if not a.equal:
                        notes.append(
                            f"{name} {path.name}: outputs DIFFER from the naive pipeline's beyond tolerance "
                            f"({a.differing_pixels} mask pixels outside the +-{band} band, "
                            f"{a.count_violations} counts, {a.present_violations} labels)"
                        )
            finally:
                backend.close()
    for info in model_info:
        info.setdefault("summary", "")

    if any(m.rle_in_inference for m in rows):
        notes.append("post+RLE+: the backend found the RLE runs on the GPU inside infer; post+RLE only formats them")
    row_dicts = []
    for m in rows:
        d = m.to_dict()
        d["speedup_vs_naive"] = (m.images_per_s / naive_row.images_per_s) if naive_row is not None else None
        row_dicts.append(d)

    notes += [
        "img/s and ms/batch: the whole batch, JPEG decode to RLE strings, median (and p95) over the timed runs "
        "after warm-up; x naive: img/s over the naive pipeline's",
        "infer: the backend's call, thresholds and exact counts included (they are in the graph); "
        "post+RLE: RLE of the returned masks (the naive pipeline: its numpy sigmoid/threshold/count and RLE)",
        "H2D/D2H: n/a on the CPU (no device copies); on CUDA, H2D uploads the decoded frames, and D2H* is a "
        "separately timed copy of the outputs' bytes, already inside infer (backends return host arrays)",
        "GFLOP/s: counted FLOPs per image x images/s of the infer stage; % peak: of the matmul peak above "
        "(above 100 %: the machine was busier while the peak was measured than during that row)",
        f"threads: {threads} (torch and ONNX Runtime); CPU shared with other work: see load average "
        f"{machine_before.get('load_average')} before and the JSON's machine_after",
    ]
    return {
        "kind": "throughput",
        "config": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items() if k != "models"},
            "models": [str(p) for p in models],
            "reference": str(reference) if reference else None,
            "threads": threads,
            "default_model": default_spec,
        },
        "machine": machine_before,
        "machine_after": {"load_average": describe_machine()["load_average"]},
        "models": model_info,
        "peaks": [p.to_dict() for p in peaks.values()],
        "rows": row_dicts,
        "naive_agreement": checks,
        "notes": notes,
        "stages": list(STAGES),
    }


def run(args: argparse.Namespace) -> int:
    from benchmarks.report import append_markdown, throughput_markdown, throughput_plot, write_json

    cfg = config_from_args(args)
    report = run_throughput(cfg)
    table = throughput_markdown(report)
    print(table)
    if args.markdown:
        append_markdown(args.markdown, table)
    if args.json:
        print(f"\nJSON: {write_json(args.json, report)}")
    if args.plot:
        print(f"plot: {throughput_plot(args.plot, report)}")
    return 0 if all(c["equal"] for c in report["naive_agreement"]) else 1

