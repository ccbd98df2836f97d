"""``bench throughput``: images/sec per backend and batch size, stage by stage, against the naive pipeline.

With no arguments it builds (or reuses) the small default bench model (a one-fold ResNet-18 U-Net
with a slim decoder at the thesis geometry: 256x1600 camera frames, U-Net at 128x800; weights fitted
briefly to synthetic strips so that int8 parity means what it means for a trained model, see
benchmarks.models), and its int8 OpenVINO IR, and measures the reference row
(``onnxruntime-graph``: the exported graph whole on ONNX Runtime, fp32, as a user would run it), ONNX
Runtime and OpenVINO fp32/bf16/int8 with their CPU post-processing (engine.fastpost), torch eager
fp32/bf16 on the CPU, and the naive pipeline. Rows that cannot run here
(no openvino, no native bf16) are skipped with the reason in the notes.

A timed batch runs JPEG decode -> (upload) -> backend inference -> RLE (see
benchmarks.pipeline). The model's FLOPs per image are counted (see benchmarks.flops)
and the achieved FLOP/s of the inference stage is compared with the peak a large matrix product
of the row's own precision (fp32, bf16, int8) reaches on the same device in the same run. The
post-processing's share of the inference stage and its floor are in benchmarks.postshare.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.models import FIT_STEPS
from benchmarks.pipeline import STAGES
from engine.devices import is_cuda, parse_device

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
    "onnxruntime-graph": Variant((".onnx",), "cpu", {"backend": "onnxruntime", "postprocess": "graph"},
                                 "the reference: the exported .onnx on ONNX Runtime's CPU provider, whole graph, fp32"),
    "onnxruntime": Variant((".onnx",), "cpu", {"backend": "onnxruntime"},
                           "ONNX Runtime, CPU provider, post-processing by engine.fastpost where the graph allows"),
    "openvino-fp32": Variant((".onnx",), "cpu", {"backend": "openvino", "precision": "fp32"}, "OpenVINO fp32"),
    "openvino-bf16": Variant((".onnx",), "cpu", {"backend": "openvino", "precision": "bf16"},
                             "OpenVINO, U-Nets bf16, pre/post-processing fp32"),
    "openvino-int8": Variant((".xml",), "cpu", {"backend": "openvino", "precision": "int8"},
                             "OpenVINO IR, U-Nets int8 (NNCF), pre/post-processing fp32"),
    "torch-bf16": Variant((".pt",), "cpu", {"precision": "bf16"}, "torch eager, U-Nets bf16 autocast, channels_last"),
    "onnxruntime-cuda": Variant((".onnx",), "cuda", {"backend": "onnxruntime", "provider": "cuda"},
                                "ONNX Runtime, CUDA provider, IO binding"),
    "torch": Variant((".pt",), "cpu", {"precision": "fp32"}, "torch eager fp32 on the CPU"),
    "torch-cuda-fp32": Variant((".pt",), "cuda", {"precision": "fp32"}, "torch eager fp32 on CUDA"),
    "torch-cuda-fp16": Variant((".pt",), "cuda", {"precision": "fp16"}, "torch eager fp16, channels_last, CUDA"),
    "tensorrt": Variant((".engine", ".plan"), "cuda", {}, "TensorRT engine"),
    "tensorrt-graphs": Variant((".engine", ".plan"), "cuda", {"cuda_graphs": True}, "TensorRT, CUDA graphs"),
    "naive": Variant((".pt",), "cpu", {}, "naive pipeline on the CPU (per image, numpy post-processing)"),
    "naive-cuda": Variant((".pt",), "cuda", {}, "naive pipeline with the U-Nets on CUDA"),
}
DEFAULT_BACKENDS = ("onnxruntime-graph", "onnxruntime", "openvino-fp32", "openvino-bf16", "openvino-int8", "torch",
                    "torch-bf16", "naive")


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
    check_data: Path | None = None
    peak_seconds: float = 2.0
    peak_size: int | None = None
    cache_dir: Path | None = None
    encoder: str = "resnet18"
    folds: int = 1
    fit_steps: int = FIT_STEPS

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
        if self.check_data is not None and not self.check_frames:
            raise ValueError("--check-data needs --check-frames >= 1")
        if self.check_data is not None and not self.check_data.is_dir():
            raise FileNotFoundError(f"--check-data {self.check_data}: no such folder")


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
                        "the small bench model (--fit-steps) and use its .onnx and .pt")
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
    parser.add_argument("--fit-steps", type=int, default=FIT_STEPS,
                        help="training steps of the default model on synthetic strips (default %(default)s; 0: "
                        "random weights, whose int8 IR fails parity whatever the quantisation)")
    parser.add_argument("--threads", type=int, default=0,
                        help="CPU threads for torch and ONNX Runtime (default 0 = one per usable CPU)")
    parser.add_argument("--reference", type=Path, default=None, metavar="FILE.pt",
                        help="the .pt the naive pipeline runs (default: a .pt among --model, or the .pt "
                        "beside an .onnx)")
    parser.add_argument("--check-frames", type=int, default=2,
                        help="frames on which every backend's outputs are compared with the naive "
                        "pipeline's (0 = no check; default %(default)s)")
    parser.add_argument("--check-data", type=Path, default=None, metavar="DIR",
                        help="run the check on the first --check-frames images (by name) of this Severstal-format "
                        "folder (train_images/) or folder of images, of the model's input size, instead of the "
                        "synthetic frames; timings stay on the synthetic frames")
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
        check_data=args.check_data,
        peak_seconds=args.peak_seconds,
        peak_size=args.peak_size,
        cache_dir=args.cache_dir,
        encoder=args.encoder,
        folds=args.folds,
        fit_steps=args.fit_steps,
    )


def resolve_models(
    cfg: ThroughputConfig, notes: list[str] | None = None
) -> tuple[list[Path], Path | None, dict[str, Any] | None]:
    """The model files to measure, the naive pipeline's ``.pt``, and the default model's spec (if built).

    When ``openvino-int8`` is asked for, the default model also gets its int8 OpenVINO IR (built once,
    cached beside it; a build refused for parity is a note, and the row is left out), and a given
    ``.onnx`` its IR where one sits beside it (:func:`int8_irs_beside`)."""
    if cfg.models:
        models = list(cfg.models)
        if "openvino-int8" in cfg.backends and variant_unavailable("openvino-int8") is None:
            models += int8_irs_beside(models, notes)
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
        fit_steps=cfg.fit_steps,
    )
    built = ensure_model(spec, cfg.cache_dir)
    models = [built.onnx, built.pt]
    if "openvino-int8" in cfg.backends and variant_unavailable("openvino-int8") is None:
        from benchmarks.models import ensure_int8_ir

        ir, why_not = ensure_int8_ir(built.onnx)
        if ir is not None:
            models.append(ir)
        elif notes is not None:
            notes.append(f"openvino-int8: skipped, {why_not}")
    return models, cfg.reference or built.pt, {"name": spec.name, **spec.key()}


def int8_irs_beside(models: list[Path], notes: list[str] | None) -> list[Path]:
    """The int8 IRs beside the given ``.onnx`` models (``model.int8.xml``, see engine.backends.int8) that
    may run in their place, on any CPU (bench measures int8 where it is slow too); where no IR was
    given either, each ``.onnx`` without one is a note saying why (and how to build it)."""
    from engine.backends.int8 import pick_int8

    found = []
    given_ir = any(m.suffix.lower() == ".xml" for m in models)
    for model in models:
        if model.suffix.lower() != ".onnx":
            continue
        pick = pick_int8(model, asked=True)
        if pick.ir is not None and pick.ir not in models:
            found.append(pick.ir)
        elif pick.ir is None and notes is not None and not given_ir:
            notes.append(f"openvino-int8: no row for {model.name}: {pick.reason}")
    return found


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
    if suffix == ".xml":
        from engine.backends.openvino_ir import model_metadata, read_model

        return model_metadata(read_model(path), str(path))
    if suffix == ".pt":
        from network.checkpoint import load_ensemble

        return load_ensemble(path)[2]
    return None


def peak_key(device: str, precision: str) -> tuple[str, str]:
    """Which measured peak a row is compared with, by its precision: on the CPU fp32 rows with the
    float32 matmul, bf16 rows with the bfloat16 one, int8 rows with the int8 one; on CUDA fp16 rows
    with the fp16 matmul and fp32 rows with TF32 (their convolutions run in TF32 by default)."""
    if not is_cuda(device):
        return ("cpu", {"bf16": "bfloat16", "int8": "int8"}.get(precision, "float32"))
    return ("cuda", "float16" if precision == "fp16" else "tf32")


def variant_unavailable(name: str) -> str | None:
    """Why a CPU variant cannot run here (openvino missing, no native bf16), or None."""
    import importlib.util

    from engine.cpu import no_bf16_reason, supports_bf16

    variant = VARIANTS[name]
    if variant.options.get("backend") == "openvino" and importlib.util.find_spec("openvino") is None:
        return "openvino is not installed (pip install 'strip-inspection[cpu]')"
    if variant.options.get("precision") == "bf16" and parse_device(variant.device).is_cpu and not supports_bf16():
        return no_bf16_reason()
    return None


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


class FramePool:
    """The JPEG frames every backend is timed on (one pool per run: all models must take one size)."""

    def __init__(self, cfg: ThroughputConfig) -> None:
        self.cfg = cfg
        self.pool: list[bytes] | None = None
        self.size: tuple[int, int] | None = None

    def __call__(self, meta: Any) -> list[bytes]:
        from benchmarks.pipeline import jpeg_frames

        cfg = self.cfg
        if self.size is not None and self.size != meta.input_size:
            raise ValueError(
                f"models take different frame sizes ({self.size[0]}x{self.size[1]} and {meta.input_height}x"
                f"{meta.input_width}); bench them in separate runs"
            )
        if cfg.height is not None and (cfg.height, cfg.width) != meta.input_size:
            raise ValueError(
                f"--height/--width {cfg.height}x{cfg.width} differ from the model's input size "
                f"{meta.input_height}x{meta.input_width}"
            )
        if self.pool is None:
            self.size = meta.input_size
            distinct = max(max(cfg.batch_sizes), cfg.naive_frames, cfg.check_frames, 8)
            self.pool = jpeg_frames(min(distinct, 64), *self.size)
        return self.pool


def _runnable(cfg: ThroughputConfig, models: list[Path], reference: Path | None, notes: list[str]) -> list[str]:
    """The chosen backends that have a model file of their kind and can run here (notes say why not)."""
    import torch

    wants_cuda = any(is_cuda(VARIANTS[b].device) for b in cfg.backends)
    if wants_cuda and not torch.cuda.is_available():
        raise ValueError(
            f"--backends {','.join(cfg.backends)} includes CUDA backends, but torch sees no CUDA GPU here; "
            f"use CPU backends ({', '.join(b for b, v in VARIANTS.items() if not is_cuda(v.device))})"
        )
    runnable = []
    for b in cfg.backends:
        has_model = reference is not None if b.startswith("naive") else any(
            p.suffix.lower() in VARIANTS[b].suffixes for p in models)
        why_not = variant_unavailable(b)
        if why_not is not None:
            notes.append(f"{b}: skipped, {why_not}")
        elif has_model:
            runnable.append(b)
    if not runnable:
        raise ValueError(
            f"nothing to measure: no model file suits --backends {','.join(cfg.backends)} (models: "
            f"{', '.join(p.name for p in models)}; the naive pipeline needs a .pt)"
        )
    return runnable


def _measure_peaks(cfg: ThroughputConfig, backends: list[str], threads: int) -> dict[tuple[str, str], Any]:
    """The ceiling of each precision the rows use, measured first, on an idle process."""
    from benchmarks.flops import measure_int8_peak, measure_peak_flops

    wanted: set[tuple[str, str]] = set()
    for b in backends:
        variant = VARIANTS[b]
        if is_cuda(variant.device):
            wanted |= {("cuda", "tf32"), ("cuda", "float16")}
        else:
            precision = variant.options.get("precision", "fp32")
            wanted |= {("cpu", "float32"), peak_key("cpu", precision)}
    peaks: dict[tuple[str, str], Any] = {}
    for kind, dtype in sorted(wanted):
        device = "cuda:0" if kind == "cuda" else "cpu"
        log.info("measuring the %s %s matmul peak", device, dtype)
        if dtype == "int8":
            peaks[(kind, dtype)] = measure_int8_peak(size=cfg.peak_size, seconds=cfg.peak_seconds, threads=threads)
        else:
            peaks[(kind, dtype)] = measure_peak_flops(device, dtype, size=cfg.peak_size, seconds=cfg.peak_seconds)
    return peaks


def _model_info(models: list[Path]) -> tuple[list[dict[str, Any]], dict[Path, int | None]]:
    from benchmarks.flops import model_flops

    model_info, flops_by_model = [], {}
    for path in models:
        count = model_flops(path)
        flops_by_model[path] = count.flops_per_image if count else None
        info = {"file": path.name, "path": str(path), "flops": count.to_dict() if count else None}
        meta = read_metadata(path)
        if meta is not None:
            info["summary"] = model_summary(meta)
        model_info.append(info)
    return model_info, flops_by_model


def _time_naive_variants(cfg, backends, reference, frames_pool, peaks, flops_by_model, notes):
    """Times the naive pipeline(s); returns (rows, the check's frames and naive outputs, or None)."""
    from benchmarks.flops import model_flops
    from benchmarks.naive import NaivePipeline
    from benchmarks.naivecheck import check_frames
    from benchmarks.pipeline import time_naive

    rows, naive_check = [], None
    for name in [b for b in backends if b.startswith("naive")]:
        if reference is None:
            notes.append(f"{name}: skipped, no .pt model for it (give --reference FILE.pt)")
            continue
        device = "cuda:0" if is_cuda(VARIANTS[name].device) else "cpu"
        naive = NaivePipeline.from_file(reference, device=device)
        frames = frames_pool(naive.metadata)
        if naive_check is None and cfg.check_frames:  # first: a bad --check-data folder fails before any timing
            naive_check = check_frames(cfg.check_data, cfg.check_frames, frames, naive.metadata)
            naive_check.run_naive(naive)
        log.info("timing the naive pipeline (%s, %d images)", device, cfg.naive_frames)
        m = time_naive(naive, frames, cfg.naive_frames, model=reference.name, warmup=min(cfg.warmup, 1))
        if reference not in flops_by_model:
            count = model_flops(reference)
            flops_by_model[reference] = count.flops_per_image if count else None
        m.flops_per_image = flops_by_model[reference]
        peak = peaks.get(peak_key(device, "fp32"))
        m.peak_flops_per_s = peak.flops_per_s if peak else None
        rows.append(m)
        del naive
    if naive_check is not None:
        notes.append(naive_check.note())
    elif cfg.check_data is not None:
        notes.append(f"--check-data {cfg.check_data}: not used, no naive pipeline row to check against")
    return rows, naive_check


def _time_one_backend(cfg, name, path, threads, frames_pool, model_info, flops_by_model, peaks, notes, bandwidth=None):
    from benchmarks.pipeline import decode_frames, repeats_for, time_backend
    from benchmarks.postshare import NetworkPart, post_floor
    from engine.backends import load_backend

    options = dict(VARIANTS[name].options)
    if parse_device(VARIANTS[name].device).is_cpu and name != "naive":
        options["threads"] = threads
    device = "cuda" if is_cuda(VARIANTS[name].device) else "cpu"
    log.info("loading %s with %s", path.name, name)
    backend = load_backend(path, device=device, **options)
    rows, network = [], None
    try:
        frames = frames_pool(backend.metadata)
        info = next(i for i in model_info if i["path"] == str(path))
        info.setdefault("summary", model_summary(backend.metadata))
        peak = peaks.get(peak_key(str(backend.device), str(backend.precision)))
        fp32_peak = peaks.get(("cpu", "float32"))
        floor = post_floor(backend.metadata, fp32_peak.flops_per_s if fp32_peak else None, bandwidth)
        if floor is not None:
            info["post_floor"] = floor.to_dict()
        network = NetworkPart(backend, path, device, options)
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
            batch = decode_frames([frames[i % len(frames)] for i in range(batch_size)], *backend.metadata.input_size)
            m.network_seconds = network.time(batch, repeats)
            m.post_floor_seconds = None if floor is None else floor.seconds * batch_size
            rows.append(m)
        return rows, backend
    except BaseException:
        backend.close()
        raise
    finally:
        if network is not None:
            network.close()


def _standard_notes(threads: int, machine_before: dict[str, Any]) -> list[str]:
    return [
        "img/s and ms/batch: the whole batch, JPEG decode to RLE strings, median (and p95) over the timed runs "
        "after warm-up; x naive: img/s over the naive pipeline's",
        "infer: the backend's call, thresholds and exact counts included (in the graph, or engine.fastpost's kernel "
        "from the graph's low-resolution probabilities); post+RLE: RLE of the returned masks (the naive pipeline: "
        "its numpy sigmoid/threshold/count and RLE)",
        "U-Net ms: the row's network part alone (the graph up to its low-resolution probabilities), timed on the "
        "same frames; post % infer: (infer - U-Net) / infer; post floor ms: the resize/threshold/count's counted "
        "work (separable bilinear multiply-adds, a compare and an add per pixel) at the fp32 peak, or its bytes "
        "(masks written, probabilities read) at the measured memory bandwidth, whichever is longer",
        "H2D/D2H: n/a on the CPU (no device copies); on CUDA, H2D uploads the decoded frames, and D2H* is a "
        "separately timed copy of the outputs' bytes, already inside infer (backends return host arrays)",
        "GFLOP/s: counted FLOPs per image x images/s of the infer stage; % peak: of the matmul peak of the row's "
        "own precision (fp32 / bf16 / int8 on the CPU; above 100 %: the machine was busier while the peak was "
        "measured than during that row)",
        "bf16/int8 rows: the U-Nets in reduced precision, pre/post-processing fp32 (engine.backends.openvino); "
        "compared with the naive pipeline with the band their parity tolerance excludes, and as many differing "
        "pixels outside it as that tolerance allows (bf16 and int8 0.5 %)",
        f"threads: {threads} (torch, ONNX Runtime, OpenVINO); CPU shared with other work: see load average "
        f"{machine_before.get('load_average')} before and the JSON's machine_after",
    ]


def _run_throughput(cfg: ThroughputConfig) -> dict[str, Any]:
    import torch

    from benchmarks.machine import describe_machine, usable_cpus
    from benchmarks.naivecheck import check_against_naive
    from benchmarks.postshare import measure_memory_bandwidth
    from engine.cpu import cpu_features

    threads = cfg.threads or usable_cpus()
    torch.set_num_threads(threads)
    notes: list[str] = []
    models, reference, default_spec = resolve_models(cfg, notes)
    backends = _runnable(cfg, models, reference, notes)
    machine_before = describe_machine()
    # Every asked-for CPU precision gets its peak, even where its row could not run (the int8 IR refused).
    peaks = _measure_peaks(cfg, sorted(set(backends) | {b for b in cfg.backends if variant_unavailable(b) is None}),
                           threads)
    model_info, flops_by_model = _model_info(models)
    bandwidth = measure_memory_bandwidth() if any(not is_cuda(VARIANTS[b].device) for b in backends) else None
    frames_pool = FramePool(cfg)
    rows, naive_check = _time_naive_variants(cfg, backends, reference, frames_pool, peaks, flops_by_model, notes)
    naive_row = rows[0] if rows else None
    checks: list[dict[str, Any]] = []
    for name in [b for b in backends if not b.startswith("naive")]:
        for path in [p for p in models if p.suffix.lower() in VARIANTS[name].suffixes]:
            timed, backend = _time_one_backend(cfg, name, path, threads, frames_pool, model_info, flops_by_model,
                                               peaks, notes, bandwidth)
            try:
                rows += timed
                if naive_check is not None:
                    check = check_against_naive(name, path, backend, naive_check, notes)
                    checks += [check] if check else []
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
    features = cpu_features()
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
        "cpu_features": {**features.to_dict(), "line": features.line()},
        "models": model_info,
        "peaks": [p.to_dict() for p in peaks.values()],
        "memory_bandwidth": None if bandwidth is None else bandwidth.to_dict(),
        "rows": row_dicts,
        "naive_agreement": checks,
        "naive_check": None if naive_check is None else naive_check.to_dict(),
        "notes": notes + _standard_notes(threads, machine_before),
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
    # int8 rows are held to their parity report (engine build), not to exact agreement with fp32.
    return 0 if all(c["equal"] for c in report["naive_agreement"] if c.get("precision") != "int8") else 1

