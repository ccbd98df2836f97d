"""``bench swap``: a model repository served under a camera load while production is swapped on a
schedule, with and without a shadow candidate, and with a share of bad frames (issue 27's soak).

An in-process server (its own event-loop thread) serves a repository of two versions (``--model``
and ``--second``, by default a copy of it); ``--streams`` cameras stream raw frames through the
camera library for ``--duration`` seconds. Every ``--swap-every`` seconds the other version is
promoted. The first half of the run has no candidate; in the second half the version not serving is
loaded as the candidate after each swap and shadowed on ``--shadow-share`` of the frames. The
report: frames/s in each half (the shadow's cost), the worst answer latency of frames in flight
around a swap against p99 elsewhere, errors that were not the bad frames (must be 0), and the
server's resident memory after the first fifth of the run and at its end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HELP = "serve a model repository under camera load while swapping production (and shadowing a candidate)"


@dataclass
class SwapConfig:
    """What ``bench swap`` runs (its flags)."""

    streams: int = 8
    duration_s: float = 60.0
    swap_every_s: float = 15.0
    shadow_share: float = 0.2
    bad_share: float = 0.01
    max_batch: int = 16
    device: str = "cpu"

    def __post_init__(self) -> None:
        if self.streams < 1 or self.duration_s <= 0 or self.swap_every_s <= 0:
            raise ValueError("--streams, --duration and --swap-every must be positive")
        if not (0 <= self.shadow_share <= 1 and 0 <= self.bad_share < 1):
            raise ValueError("--shadow-share must lie in 0..1 and --bad-share in 0..1 (excluded)")


@dataclass
class Record:
    """What the cameras saw: per answer (sent, answered, ok, bad frame); swaps as (began, returned)."""

    answers: list[tuple[float, float, bool, bool]] = field(default_factory=list)
    swaps: list[tuple[float, float]] = field(default_factory=list)
    rss_mb: list[tuple[float, float]] = field(default_factory=list)  # (time, resident MiB)
    shadowed: list[int] = field(default_factory=lambda: [0, 0])  # frames the candidates ran, skipped


def resident_mb() -> float:
    """This process's resident memory (Linux ``/proc``), 0 where it cannot be read."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


class RepoServer:
    """An InspectionServer and its ModelManager for repository ``root``, on an event-loop thread."""

    def __init__(self, root: Path, cfg: SwapConfig) -> None:
        from engine.backends import load_backend
        from server.model_repo import ModelRepository
        from server.models import ModelManager, production_loader
        from server.service import InspectionServer, ServerConfig

        def load(path: Path) -> Any:
            return load_backend(path, device=cfg.device)

        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self.loop.run_forever, name="bench-server", daemon=True).start()
        repository = ModelRepository.open(root)
        config = ServerConfig(port=0, metrics_port=None, max_batch=cfg.max_batch)
        self.server = InspectionServer(production_loader(repository, load), config,
                                       model_version=repository.roles.production)
        self.manager = ModelManager(self.server, repository, load, shadow_share=cfg.shadow_share)
        self.call(self.server.start())

    def call(self, coro: Any, timeout: float = 600.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.call(self.server.stop(grace=30))
        self.call(self.manager.close())
        self.loop.call_soon_threadsafe(self.loop.stop)


def requests_for(shape: tuple[int, int], bad_share: float, seed: int = 0) -> tuple[list[Any], list[bool]]:
    """64 raw frame requests at the model's input size; ``bad_share`` of them with a truncated image."""
    from protos.inspection.v1 import inspection_pb2 as pb
    from toolchain.parity import synthetic_frames

    frames = synthetic_frames(64, *shape, seed=seed)
    rng = np.random.default_rng(seed)
    requests, bad = [], []
    for frame in frames:
        broken = bool(rng.random() < bad_share)
        data = frame.tobytes()[: -1 if broken else None]
        requests.append(pb.RawImage(width=shape[1], height=shape[0], channels=1, data=data))
        bad.append(broken)
    return requests, bad


async def _camera(target: str, camera_id: str, pool: tuple[list[Any], list[bool]], until: float,
                  record: Record) -> None:
    from client.camera import CameraStream, open_channel
    from protos.inspection.v1 import inspection_pb2 as pb

    images, bad = pool
    sent: dict[int, float] = {}
    async with open_channel(target) as channel, CameraStream(channel, camera_id, seed=0) as camera:
        async def produce() -> None:
            i = 0
            while time.perf_counter() < until:
                sent[i] = time.perf_counter()
                await camera.send(pb.InspectRequest(frame_id=i, raw_image=images[i % len(images)]))
                i += 1
            await camera.close()

        producer = asyncio.create_task(produce())
        async for answer in camera.answers():
            k = answer.frame_id
            record.answers.append((sent.pop(k), time.perf_counter(), answer.ok, bad[k % len(bad)]))
        await producer


def _swapper(server: RepoServer, cfg: SwapConfig, start: float, stop: threading.Event, record: Record) -> None:
    versions = ("a", "b")
    k = 0
    while not stop.wait(0.5):
        now = time.perf_counter()
        record.rss_mb.append((now - start, resident_mb()))
        if now - start < (k + 1) * cfg.swap_every_s or now - start > cfg.duration_s - 1:
            continue
        k += 1
        target, other = versions[k % 2], versions[(k + 1) % 2]
        _count_shadow(server, record)
        began = time.perf_counter()
        server.call(server.manager.promote(target, who="bench"))
        record.swaps.append((began, time.perf_counter()))
        if now - start >= cfg.duration_s / 2 and cfg.shadow_share > 0:
            server.call(server.manager.load(other, who="bench"))  # the shadow candidate


def _count_shadow(server: RepoServer, record: Record) -> None:
    """Adds the current candidate's shadow counts (they start afresh with each candidate)."""
    status = server.manager.shadow.status()
    if status is not None:
        record.shadowed[0] += status.frames
        record.shadowed[1] += status.skipped


def summarise(record: Record, cfg: SwapConfig, start: float) -> dict[str, Any]:
    """The report's figures (see the module docstring)."""
    half = start + cfg.duration_s / 2
    answers = np.array(record.answers, dtype=np.float64).reshape(-1, 4)
    latency_ms = (answers[:, 1] - answers[:, 0]) * 1e3
    near = np.zeros(len(answers), dtype=bool)
    for began, returned in record.swaps:  # in flight around the swap: sent before it returned, answered after it began
        near |= (answers[:, 0] <= returned + 0.5) & (answers[:, 1] >= began - 0.5)
    halves = {}
    for name, lo, hi in (("no_shadow", start, half), ("shadow", half, start + cfg.duration_s)):
        answered = ((answers[:, 1] >= lo) & (answers[:, 1] < hi)).sum()
        halves[name] = float(answered / (hi - lo))
    fifth = [mb for t, mb in record.rss_mb if t >= cfg.duration_s / 5]
    errors = answers[:, 2] == 0
    return {
        "config": asdict(cfg), "frames": len(answers), "swaps": len(record.swaps),
        "frames_per_s": halves, "shadow_cost": 1 - halves["shadow"] / halves["no_shadow"] if halves["no_shadow"] else None,
        "worst_ms_around_swaps": float(latency_ms[near].max()) if near.any() else None,
        "p99_ms_elsewhere": float(np.percentile(latency_ms[~near], 99)) if (~near).any() else None,
        "shadow_frames": record.shadowed[0], "shadow_skipped": record.shadowed[1],
        "bad_frames": int(answers[:, 3].sum()), "errors_not_bad": int((errors & (answers[:, 3] == 0)).sum()),
        "rss_mb_after_first_fifth": fifth[0] if fifth else None,
        "rss_mb_end": record.rss_mb[-1][1] if record.rss_mb else None,
    }


def run_swap(model: Path, second: Path | None, cfg: SwapConfig) -> dict[str, Any]:
    """Runs the benchmark (module docstring) and returns its report."""
    with tempfile.TemporaryDirectory(prefix="bench-swap-") as folder:
        root = Path(folder)
        for version, source in (("a", model), ("b", second or model)):
            (root / version).mkdir()
            shutil.copyfile(source, root / version / f"model{source.suffix}")
        (root / "roles.json").write_text(json.dumps({"production": "a", "candidate": None, "history": []}))
        server = RepoServer(root, cfg)
        try:
            info = server.server.info
            pool = requests_for((info.input_height, info.input_width), cfg.bad_share)
            record, stop = Record(), threading.Event()
            start = time.perf_counter()
            swapper = threading.Thread(target=_swapper, args=(server, cfg, start, stop, record), daemon=True)
            swapper.start()

            async def cameras() -> None:
                await asyncio.gather(*(_camera(server.server.address, f"cam{c:02d}", pool,
                                               start + cfg.duration_s, record) for c in range(cfg.streams)))

            try:
                asyncio.run(cameras())
            finally:
                stop.set()
                swapper.join()
                _count_shadow(server, record)
            return summarise(record, cfg, start)
        finally:
            server.close()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, required=True, metavar="FILE", help="the model served (version a)")
    parser.add_argument("--second", type=Path, default=None, metavar="FILE",
                        help="version b (default: a copy of --model)")
    parser.add_argument("--streams", type=int, default=8, help="cameras (default %(default)s)")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of streaming (default %(default)s)")
    parser.add_argument("--swap-every", type=float, default=15.0, help="seconds between swaps (default %(default)s)")
    parser.add_argument("--shadow-share", type=float, default=0.2,
                        help="share shadowed in the second half (default %(default)s)")
    parser.add_argument("--bad-share", type=float, default=0.01, help="share of bad frames (default %(default)s)")
    parser.add_argument("--max-batch", type=int, default=16, help="server --max-batch (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="server device (default %(default)s)")
    parser.add_argument("--json", type=Path, default=None, metavar="OUT", help="write the report here")


def run(args: argparse.Namespace) -> int:
    cfg = SwapConfig(args.streams, args.duration, args.swap_every, args.shadow_share, args.bad_share,
                     args.max_batch, args.device)
    report = run_swap(args.model, args.second, cfg)
    text = json.dumps(report, indent=2)
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0 if report["errors_not_bad"] == 0 else 1
