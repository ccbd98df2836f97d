"""Timing one backend on batches of camera frames, stage by stage.

A timed batch is the serving path without the network: JPEG-encoded strip frames are decoded
(the server's job), uploaded to the device when the backend runs on a GPU, inspected by the
backend (graph inference with the in-graph thresholds and counts, masks back on the host), and
run-length encoded. ``bench throughput`` and ``bench stream`` both use these functions, so the
serving overhead compares the same work.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from engine.devices import is_cuda

log = logging.getLogger(__name__)

#: Stage names, in pipeline order.
STAGES = ("decode", "h2d", "inference", "postprocess_rle", "d2h")
STAGE_TITLES = {
    "decode": "decode",
    "h2d": "H2D",
    "inference": "infer",
    "postprocess_rle": "post+RLE",
    "d2h": "D2H",
}


def jpeg_frames(count: int, height: int, width: int, seed: int = 0, quality: int = 90) -> list[bytes]:
    """``count`` distinct strip-like grayscale frames, JPEG-encoded as a camera would send them."""
    import cv2

    from toolchain.parity import synthetic_frames

    out = []
    for i in range(count):
        frame = synthetic_frames(1, height, width, seed=seed + i)[0]
        ok, buf = cv2.imencode(".jpg", frame, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:
            raise RuntimeError(f"cv2 could not JPEG-encode a {height}x{width} frame")
        out.append(buf.tobytes())
    return out


def folder_frames(directory: Path, count: int, height: int, width: int, flag: str = "--images") -> list[Path]:
    """The first ``count`` images (fewer where the folder has fewer) of ``directory``, a Severstal-format
    folder (``train_images/``) or a plain one, each checked to be a readable frame of ``height`` x ``width``
    (:func:`read_sized`).

    Raises:
        FileNotFoundError, ValueError: no such folder, no images, or an image unreadable or of another size.
    """
    from toolchain.build_openvino import image_files

    files = image_files(directory, flag=flag)[:count]
    read_sized(files, (height, width), flag, directory)
    return files


def read_sized(files: list[Path], size: tuple[int, int], flag: str, directory: Path) -> np.ndarray:
    """``engine build --calibration``'s reader (:func:`toolchain.build_openvino.read_frames`) for a bench flag's
    folder: its error names the flag and the folder, and says that frames are not resized."""
    from toolchain.build_openvino import read_frames

    try:
        return read_frames(files, size)
    except ValueError as exc:
        raise ValueError(f"{flag} {directory}: {exc} (frames are not resized: the server takes the model's input "
                         "size only)") from None


def decode_frames(jpegs: list[bytes], height: int, width: int) -> np.ndarray:
    """JPEG bytes -> uint8 frames ``[N, height, width]`` (grayscale decode, as the server does)."""
    import cv2

    frames = np.empty((len(jpegs), height, width), dtype=np.uint8)
    for i, data in enumerate(jpegs):
        image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_GRAYSCALE)
        if image is None or image.shape != (height, width):
            got = None if image is None else image.shape
            raise ValueError(f"frame {i}: expected a {height}x{width} JPEG, decoded {got}")
        frames[i] = image
    return frames


def batches(pool: list[bytes], batch_size: int, count: int) -> list[list[bytes]]:
    """``count`` batches cycling through ``pool``, so consecutive batches hold different frames."""
    out, start = [], 0
    for _ in range(count):
        out.append([pool[(start + j) % len(pool)] for j in range(batch_size)])
        start = (start + batch_size) % len(pool)
    return out


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


@dataclass
class Measurement:
    """Repeated timed batches of one backend at one batch size; all times in seconds.

    ``stage_seconds[stage]`` is None where the stage does not apply (no device copies on the
    CPU). ``d2h_in_inference`` says the D2H figure is a separately timed copy of the outputs'
    bytes, already contained in ``inference`` (the backend returns host arrays).
    ``rle_in_inference``: the backend found the RLE runs on the device inside its call, so
    ``postprocess_rle`` only formats what it returned.
    ``network_seconds``: the network part alone (the graph up to its low-resolution probabilities,
    see :mod:`benchmarks.postshare`), where the row has one; the rest of ``inference`` is
    post-processing, compared with ``post_floor_seconds`` (its counted floor for the batch).
    """

    backend: str
    model: str
    device: str
    precision: str
    batch_size: int
    total_seconds: list[float]
    stage_seconds: dict[str, list[float] | None]
    d2h_in_inference: bool = False
    rle_in_inference: bool = False
    flops_per_image: int | None = None
    peak_flops_per_s: float | None = None
    notes: list[str] = field(default_factory=list)
    network_seconds: list[float] | None = None
    post_floor_seconds: float | None = None

    @property
    def repeats(self) -> int:
        return len(self.total_seconds)

    @property
    def images_per_s(self) -> float:
        return self.batch_size / float(np.median(self.total_seconds))

    @property
    def inference_images_per_s(self) -> float:
        return self.batch_size / float(np.median(self.stage_seconds["inference"]))

    def stage_ms(self, stage: str) -> float | None:
        values = self.stage_seconds.get(stage)
        return None if values is None else 1000.0 * float(np.median(values))

    @property
    def achieved_flops_per_s(self) -> float | None:
        if self.flops_per_image is None:
            return None
        return self.flops_per_image * self.inference_images_per_s

    @property
    def peak_fraction(self) -> float | None:
        achieved = self.achieved_flops_per_s
        if achieved is None or not self.peak_flops_per_s:
            return None
        return achieved / self.peak_flops_per_s

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.update(
            repeats=self.repeats,
            images_per_s=self.images_per_s,
            inference_images_per_s=self.inference_images_per_s,
            ms_per_batch_median=1000.0 * float(np.median(self.total_seconds)),
            ms_per_batch_p95=1000.0 * percentile(self.total_seconds, 95),
            stage_ms_median={s: self.stage_ms(s) for s in STAGES},
            achieved_flops_per_s=self.achieved_flops_per_s,
            peak_fraction=self.peak_fraction,
            **self._post_share(),
        )
        return d

    def _post_share(self) -> dict[str, float | None]:
        """Network part, post-processing (inference minus it), its share of inference and its floor, in ms."""
        if not self.network_seconds:
            return {"network_ms": None, "post_ms": None, "post_share": None,
                    "post_floor_ms": None if self.post_floor_seconds is None else 1000.0 * self.post_floor_seconds}
        infer = 1000.0 * float(np.median(self.stage_seconds["inference"]))
        network = 1000.0 * float(np.median(self.network_seconds))
        post = max(0.0, infer - network)
        return {"network_ms": network, "post_ms": post, "post_share": post / infer if infer else None,
                "post_floor_ms": None if self.post_floor_seconds is None else 1000.0 * self.post_floor_seconds}


def repeats_for(frames: int, batch_size: int, min_repeats: int) -> int:
    """Timed batches so that about ``frames`` images are timed, and never fewer than ``min_repeats``."""
    return max(min_repeats, math.ceil(frames / batch_size))


def _sync(device: str) -> None:
    if is_cuda(device):
        import torch

        torch.cuda.synchronize(device)


def measure_d2h(result: Any, device: str, repeats: int = 5) -> float:
    """Seconds to copy tensors the size of ``result``'s outputs from ``device`` to (pageable) host memory."""
    import torch

    buffers = [
        torch.empty(tuple(a.shape), dtype=getattr(torch, str(a.dtype).replace("bool_", "bool")), device=device)
        for a in (result.masks, result.counts, result.present)
    ]
    times = []
    for _ in range(repeats + 1):
        _sync(device)
        start = time.perf_counter()
        for b in buffers:
            b.cpu()
        _sync(device)
        times.append(time.perf_counter() - start)
    return float(np.median(times[1:]))


def time_backend(
    backend: Any,
    pool: list[bytes],
    batch_size: int,
    repeats: int,
    warmup: int = 1,
    model: str = "",
    label: str | None = None,
) -> Measurement:
    """Times ``repeats`` batches of ``batch_size`` frames from ``pool`` through ``backend``."""
    h, w = backend.metadata.input_size
    device = str(backend.device)
    on_gpu = is_cuda(device)
    if on_gpu:
        import torch
    work = batches(pool, batch_size, warmup + repeats)
    totals: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    result = None
    for i, jpegs in enumerate(work):
        t0 = time.perf_counter()
        frames = decode_frames(jpegs, h, w)
        t1 = time.perf_counter()
        if on_gpu:
            frames = torch.from_numpy(frames).to(device)
            _sync(device)
        t2 = time.perf_counter()
        result = backend.infer(frames)
        t3 = time.perf_counter()
        result.rle()
        t4 = time.perf_counter()
        if i < warmup:
            continue
        totals.append(t4 - t0)
        stages["decode"].append(t1 - t0)
        stages["h2d"].append(t2 - t1)
        stages["inference"].append(t3 - t2)
        stages["postprocess_rle"].append(t4 - t3)
    stage_seconds: dict[str, list[float] | None] = dict(stages)
    if on_gpu:
        stage_seconds["d2h"] = [measure_d2h(result, device)]
    else:
        stage_seconds["h2d"] = None
        stage_seconds["d2h"] = None
    return Measurement(
        backend=label or backend.name,
        model=model,
        device=device,
        precision=str(backend.precision),
        batch_size=batch_size,
        total_seconds=totals,
        stage_seconds=stage_seconds,
        d2h_in_inference=on_gpu,
        rle_in_inference=getattr(result, "encoded", None) is not None,
    )


def time_naive(naive: Any, pool: list[bytes], images: int, model: str = "", warmup: int = 1) -> Measurement:
    """Times the naive pipeline image by image; each image is one 'batch' of 1."""
    h, w = naive.metadata.input_size
    on_gpu = is_cuda(naive.device)
    totals: list[float] = []
    stages: dict[str, list[float]] = {s: [] for s in STAGES}
    for i, jpegs in enumerate(batches(pool, 1, warmup + images)):
        t0 = time.perf_counter()
        frames = decode_frames(jpegs, h, w)
        t1 = time.perf_counter()
        result = naive.run(frames)
        t2 = time.perf_counter()
        if i < warmup:
            continue
        totals.append(t2 - t0)
        stages["decode"].append(t1 - t0)
        for stage, seconds in result.stage_seconds.items():
            stages[stage].append(seconds)
    stage_seconds: dict[str, list[float] | None] = dict(stages)
    if not on_gpu:
        stage_seconds["h2d"] = None
        stage_seconds["d2h"] = None
    return Measurement(
        backend="naive",
        model=model,
        device=naive.device,
        precision="fp32",
        batch_size=1,
        total_seconds=totals,
        stage_seconds=stage_seconds,
        notes=["per image: torch eager fp32 per fold, outputs copied to host, numpy post-processing, RLE per class"],
    )
