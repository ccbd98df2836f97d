"""``bench stream``: the gRPC server end to end, driven by concurrent camera streams.

Starts ``server serve`` on the model (a subprocess on free local ports; ``--in-process`` runs
the library server on a thread of this process instead) or uses a running server
(``--target HOST:PORT``), then, for each stream count, streams JPEG strip frames through the
project's own camera client (client.stream_folder.run_cameras): as fast as the server takes them
(``--fps 0``), or at a fixed rate per camera for latency under a production-like load.

Per stream count it reports frames/sec, p50/p95/p99 end-to-end latency (frame handed to gRPC ->
its answer back), errors, the mean batch size the server's batcher formed (from the responses'
timings, and from its Prometheus ``/metrics`` when reachable), the server's own time split, and
the serving overhead: end-to-end frames/sec over the same backend's raw pipeline throughput
(decode -> inference -> RLE, benchmarks.pipeline) at the same batch size.

``--coil-db URL --line FILE`` runs every stream count a second time through a server that tracks
coils (:mod:`benchmarks.stream_coils`): coil tracking on against off, in one run.

``--console`` opens the server's live console (``server serve --console-port``) with one viewer
connected for the whole measurement, as a browser would: it follows the server-sent events and
fetches every image they name. Run once with and once without it to see what an open console
costs the inspection.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

HELP = "end-to-end frames/sec and latency of the gRPC server under concurrent camera streams"
DESCRIPTION = __doc__.split("\n\n", 1)[1] if __doc__ else HELP

REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"


@dataclass
class StreamConfig:
    """Settings of one ``bench stream`` run (filled from the CLI flags)."""

    model: Path | None = None
    target: str | None = None
    metrics_url: str | None = None
    streams: tuple[int, ...] = (1, 4, 16)
    fps: float = 0.0
    frames: int = 32
    max_batch: int = 16
    max_delay_ms: float = 5.0
    device: str = "cpu"
    threads: int = 0
    in_process: bool = False
    raw_repeats: int = 3
    warmup_frames: int = 2
    start_timeout: float = 300.0
    connect_timeout: float = 30.0
    cache_dir: Path | None = None
    console: bool = False
    coil_db: str | None = None
    line: Path | None = None
    line_actions: Path | None = None
    coil_repeats: int = 1
    images: Path | None = None  # stream these frames (a folder) instead of the synthetic strips

    def __post_init__(self) -> None:
        if not self.streams or any(s < 1 for s in self.streams):
            raise ValueError(f"--streams must be positive integers, got {list(self.streams)}")
        if self.fps < 0:
            raise ValueError(f"--fps must be >= 0 (0 = as fast as the server takes them), got {self.fps}")
        if self.frames < 1:
            raise ValueError(f"--frames must be >= 1, got {self.frames}")
        if self.connect_timeout <= 0:
            raise ValueError(f"--connect-timeout must be positive, got {self.connect_timeout}")
        if self.max_batch < 1 or self.max_delay_ms < 0 or self.threads < 0 or self.raw_repeats < 1:
            raise ValueError("--max-batch and --raw-repeats must be >= 1; --max-delay-ms and --threads >= 0")
        if self.model is not None and not self.model.is_file():
            raise FileNotFoundError(f"--model {self.model}: no such file")
        if self.images is not None and not self.images.is_dir():
            raise FileNotFoundError(f"--images {self.images}: no such folder")
        if self.target is not None and self.in_process:
            raise ValueError("--in-process starts a server; it contradicts --target (a running server)")
        if self.console and self.target is not None:
            raise ValueError("--console opens the console of a server bench stream starts; it contradicts --target")
        from benchmarks.stream_coils import check_coil_settings

        check_coil_settings(self.coil_db, self.line, self.target, self.streams)
        if self.line_actions is not None and self.coil_db is None:
            raise ValueError("--line-actions runs beside coil tracking: it needs --coil-db and --line")
        if self.coil_repeats < 1 or (self.coil_repeats > 1 and self.coil_db is None):
            raise ValueError(f"--coil-repeats must be >= 1 and goes with --coil-db, got {self.coil_repeats}")
        if self.target is not None and (":" not in self.target or not self.target.rsplit(":", 1)[1].isdigit()):
            raise ValueError(f"--target must be HOST:PORT, got {self.target!r}")


# --------------------------------------------------------------------------- servers


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(target: str, timeout: float, alive: Any = None) -> None:
    """Blocks until the server's health service says SERVING.

    Raises:
        RuntimeError: ``alive()`` turned False (the server process died) or ``timeout`` passed.
    """
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if alive is not None and not alive():
                raise RuntimeError(f"the server at {target} exited before it served")
            try:
                status = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=2.0).status
                if status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.2)
    raise RuntimeError(f"the server at {target} did not report SERVING within {timeout:g} s")


class SubprocessServer:
    """``server serve`` in its own process on free local ports (a deployed server's situation)."""

    def __init__(self, cfg: StreamConfig, model: Path, coil_spool: Path | None = None, actions: bool = False) -> None:
        from benchmarks.stream_coils import coil_server_flags

        self.port = free_port()
        self.metrics_port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.metrics_url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        command = [
            sys.executable, "-m", "server.cli", "serve", "--model", str(model), "--bind", "127.0.0.1",
            "--port", str(self.port), "--metrics-port", str(self.metrics_port), "--max-batch", str(cfg.max_batch),
            "--max-delay-ms", str(cfg.max_delay_ms), "--device", cfg.device, "--grace", "10",
        ]
        if cfg.threads and model.suffix.lower() == ".onnx":
            command += ["--threads", str(cfg.threads)]
        if coil_spool is not None:
            command += coil_server_flags(cfg.coil_db, cfg.line, coil_spool, cfg.line_actions if actions else None)
        self.console_url = None
        if cfg.console:
            console_port = free_port()
            command += ["--console-port", str(console_port)]
            self.console_url = f"http://127.0.0.1:{console_port}/"
        self.log_file = tempfile.TemporaryFile(mode="w+")
        log.info("starting %s", " ".join(command))
        self.process = subprocess.Popen(command, stdout=self.log_file, stderr=subprocess.STDOUT, cwd=REPO_ROOT)
        try:
            wait_serving(self.target, cfg.start_timeout, alive=lambda: self.process.poll() is None)
        except BaseException:
            self.close()
            raise

    def server_log(self) -> str:
        self.log_file.seek(0)
        return self.log_file.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()  # SIGTERM: the server drains and exits 0
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        code = self.process.returncode
        if code not in (0, -15):
            tail = self.server_log()[-3000:]
            self.log_file.close()
            raise RuntimeError(f"the server exited with status {code}; its log ends:\n{tail}")
        self.log_file.close()


class InProcessServer:
    """The library server (:class:`server.service.InspectionServer`) on its own event-loop thread."""

    def __init__(self, cfg: StreamConfig, model: Path, coil_spool: Path | None = None, actions: bool = False) -> None:
        from benchmarks.stream_coils import free_port
        from coils.line import load_line
        from engine.backends import load_backend
        from server.config import ServerConfig
        from server.service import InspectionServer

        options = {"threads": cfg.threads} if cfg.threads and model.suffix.lower() == ".onnx" else {}
        coils = {} if coil_spool is None else {"line": load_line(cfg.line), "coil_db": cfg.coil_db,
                                               "coil_spool": coil_spool}
        if actions:
            coils |= {"grading": cfg.line_actions, "opcua_endpoint": f"opc.tcp://127.0.0.1:{free_port()}",
                      "opcua_anonymous": True}
        config = ServerConfig(port=0, metrics_port=0, max_batch=cfg.max_batch, max_delay_ms=cfg.max_delay_ms, **coils)
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="bench-server", daemon=True)
        self.thread.start()
        self.server = InspectionServer(lambda: load_backend(model, device=cfg.device, **options), config)
        try:
            self._call(self.server.start(), cfg.start_timeout)
        except BaseException:
            self._shutdown_loop()
            raise
        self.target = f"127.0.0.1:{self.server.port}"
        self.metrics_url = f"http://127.0.0.1:{self.server.metrics_port}/metrics"
        self.console = None
        self.console_url = None
        if cfg.console:
            from server.console import Console

            self.console = Console(self.server)
            self._call(self.console.start(), 30)
            self.console_url = self.console.url

    def _call(self, coro: Any, timeout: float) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def _shutdown_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=30)
        self.loop.close()

    def close(self) -> None:
        try:
            if self.console is not None:
                self._call(self.console.stop(), 30)
            self._call(self.server.stop(grace=10), 60)
        finally:
            self._shutdown_loop()


class ConsoleViewer:
    """One console viewer on its own thread, doing what the page does: follow ``/events`` and fetch
    each image a state names (once: a browser caches them)."""

    def __init__(self, url: str, timeout: float = 60.0) -> None:
        self.url = url
        self.updates = 0
        self.images = 0
        self.image_bytes = 0
        self.failure: BaseException | None = None
        self._seen: set[str] = set()
        self._stop = threading.Event()
        self._first = threading.Event()
        self._response: Any = None
        self._thread = threading.Thread(target=self._follow, name="console-viewer", daemon=True)
        self._thread.start()
        if not self._first.wait(timeout) or self.failure is not None:
            self.close()
            raise RuntimeError(f"the console at {url} sent no state within {timeout:g} s: {self.failure}")

    def _follow(self) -> None:
        import json

        try:
            self._response = urllib.request.urlopen(self.url + "events", timeout=30)  # noqa: S310 - local
            for line in self._response:
                if self._stop.is_set():
                    return
                if line.startswith(b"data: "):
                    self.updates += 1
                    self._fetch_images(json.loads(line[6:]))
                    self._first.set()
        except Exception as exc:  # noqa: BLE001 - reported by close()
            if not self._stop.is_set():
                self.failure = exc
        finally:
            self._first.set()

    def _fetch_images(self, state: dict[str, Any]) -> None:
        for camera in state["cameras"]:
            urls = [camera["latest"]["image"]] if camera["latest"] else []
            urls += [t["thumb"] for t in camera["thumbnails"]]
            for url in urls:
                if url not in self._seen:
                    self._seen.add(url)
                    with urllib.request.urlopen(self.url.rstrip("/") + url, timeout=30) as reply:  # noqa: S310
                        self.image_bytes += len(reply.read())
                    self.images += 1

    def close(self) -> dict[str, Any]:
        """Disconnects; returns what the viewer received."""
        self._stop.set()
        if self._response is not None:
            self._response.close()
        self._thread.join(timeout=30)
        return {"updates": self.updates, "images": self.images, "image_bytes": self.image_bytes,
                "failure": None if self.failure is None else repr(self.failure)}


# --------------------------------------------------------------------------- metrics


def scrape_batches(url: str | None) -> tuple[float, float] | None:
    """(sum, count) of the server's ``inspection_batch_size`` histogram, or None when unreachable."""
    if not url:
        return None
    from prometheus_client.parser import text_string_to_metric_families

    try:
        with urllib.request.urlopen(url, timeout=5) as reply:  # noqa: S310 - a local metrics URL
            text = reply.read().decode()
    except OSError as exc:
        log.warning("cannot read the server's metrics at %s: %s", url, exc)
        return None
    total = count = None
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "inspection_batch_size_sum":
                total = sample.value
            elif sample.name == "inspection_batch_size_count":
                count = sample.value
    return None if total is None or count is None else (total, count)


# --------------------------------------------------------------------------- one stream setting


def _ms(values: list[float], q: float) -> float | None:
    return 1000.0 * float(np.percentile(values, q)) if values else None


def summarise(run: Any, streams: int, fps: float, frames: int, metrics: tuple[float, float] | None) -> dict[str, Any]:
    """Figures of one client run (a :class:`client.stream_folder.CameraRun`)."""
    ok = [a for a in run.answers if a.ok]
    latencies = [a.latency_s for a in ok]
    batch_sizes = [a.response.timings.batch_size for a in ok if a.response.timings.batch_size]
    timings = {
        name: statistics.median([getattr(a.response.timings, f"{name}_us") / 1000.0 for a in ok]) if ok else None
        for name in ("decode", "queue", "inference", "postprocess", "total")
    }
    # A batch of b frames answers b frames that each report b: frames / sum(1/b) counts batches.
    from_responses = len(batch_sizes) / sum(1.0 / b for b in batch_sizes) if batch_sizes else None
    from_metrics = metrics[0] / metrics[1] if metrics and metrics[1] else None
    return {
        "streams": streams,
        "fps_per_stream": fps,
        "offered_fps": streams * fps if fps > 0 else None,
        "frames": frames,
        "answered": len(run.answers),
        "errors": len(run.failed),
        "unanswered": len(run.unanswered),
        "error_messages": sorted({a.response.error.message for a in run.failed})[:5],
        "elapsed_s": run.elapsed_s,
        "frames_per_s": len(ok) / run.elapsed_s if run.elapsed_s > 0 else None,
        "latency_ms": {"p50": _ms(latencies, 50), "p95": _ms(latencies, 95), "p99": _ms(latencies, 99),
                       "mean": 1000.0 * statistics.fmean(latencies) if latencies else None},
        "mean_batch_size": from_metrics if from_metrics is not None else from_responses,
        "mean_batch_size_from_responses": from_responses,
        "mean_batch_size_from_metrics": from_metrics,
        "batches_from_metrics": metrics[1] if metrics else None,
        "server_ms_median": timings,
    }


def run_setting(
    target: str, images: list[Path], streams: int, fps: float, metrics_url: str | None, connect_timeout: float,
    shots: dict[str, list] | None = None, coil_lengths: dict[str, float | None] | None = None,
) -> dict[str, Any]:
    """One stream count; ``shots`` (camera -> frames with their coils) instead of dealing ``images`` round-robin."""
    from client.stream_folder import run_cameras

    before = scrape_batches(metrics_url)
    run = asyncio.run(run_cameras(target, images, streams=streams, fps=fps, connect_timeout=connect_timeout,
                                  shots=shots, coil_lengths=coil_lengths))
    after = scrape_batches(metrics_url)
    delta = (after[0] - before[0], after[1] - before[1]) if before and after else None
    return summarise(run, streams, fps, len(images), delta)


def raw_throughput(model: Path, cfg: StreamConfig, pool: list[bytes], batch_sizes: set[int]) -> dict[int, dict]:
    """The backend's own pipeline (decode -> inference -> RLE) at each batch size, as ``bench throughput``."""
    from benchmarks.pipeline import time_backend
    from engine.backends import load_backend

    options = {"threads": cfg.threads} if cfg.threads and model.suffix.lower() in (".onnx", ".pt") else {}
    out = {}
    with load_backend(model, device=cfg.device, **options) as backend:
        for batch_size in sorted(batch_sizes):
            log.info("raw pipeline of %s at batch %d", model.name, batch_size)
            m = time_backend(backend, pool, batch_size, cfg.raw_repeats, warmup=1, model=model.name)
            out[batch_size] = {"images_per_s": m.images_per_s, "ms_per_batch_median": 1000 * float(
                np.median(m.total_seconds)), "repeats": m.repeats, "backend": m.backend,
                "precision": m.precision, "device": m.device}
    return out


#: Distinct frames streamed over and over: the synthetic strips made, or the most taken of an ``--images`` folder.
SYNTHETIC_FRAMES = 16
FOLDER_FRAMES = 64


def frame_pool(cfg: StreamConfig, height: int, width: int, tmp: Path) -> tuple[list[Path], list[bytes]]:
    """The files the cameras stream (cycled to ``cfg.frames``) and the bytes the raw pipeline times: the first
    frames of ``cfg.images``, else synthetic strips written to ``tmp``."""
    from benchmarks.pipeline import folder_frames, jpeg_frames

    if cfg.images is not None:
        paths = folder_frames(cfg.images, min(cfg.frames, FOLDER_FRAMES), height, width)
        return paths, [p.read_bytes() for p in paths]
    pool = jpeg_frames(min(cfg.frames, SYNTHETIC_FRAMES), height, width)
    paths = []
    for i, data in enumerate(pool):
        path = tmp / f"frame{i:03d}.jpg"
        path.write_bytes(data)
        paths.append(path)
    return paths, pool


def run_stream(cfg: StreamConfig) -> dict[str, Any]:
    """Starts (or reaches) the server, drives every stream setting, measures the raw pipeline, reports."""
    from benchmarks.machine import describe_machine
    from benchmarks.stream_coils import coil_ratio_note

    model = cfg.model
    if model is None and cfg.target is None:
        from benchmarks.models import BenchModelSpec, ensure_model

        model = ensure_model(BenchModelSpec(), cfg.cache_dir).onnx
    machine = describe_machine()
    server: SubprocessServer | InProcessServer | None = None
    info = None
    settings = []
    pool: list[bytes] = []
    viewer: ConsoleViewer | None = None
    console: dict[str, Any] | None = None
    with tempfile.TemporaryDirectory(prefix="bench-stream-") as tmp:
        try:
            if cfg.target is None:
                assert model is not None
                server = InProcessServer(cfg, model) if cfg.in_process else SubprocessServer(cfg, model)
                target, metrics_url = server.target, server.metrics_url
            else:
                target, metrics_url = cfg.target, cfg.metrics_url
            info = asyncio.run(_model_info(target, cfg.connect_timeout))
            h, w = info.input_height, info.input_width
            paths, pool = frame_pool(cfg, h, w, Path(tmp))
            images = [paths[i % len(paths)] for i in range(cfg.frames)]
            if cfg.warmup_frames:
                # First calls pay for channel set-up and lazy allocations; keep them out of the figures.
                run_setting(target, images[: cfg.warmup_frames], 1, 0.0, None, cfg.connect_timeout)
            if cfg.console:
                assert server is not None and server.console_url is not None
                viewer = ConsoleViewer(server.console_url, cfg.connect_timeout)
            for streams in cfg.streams:
                log.info("streaming %d frames over %d stream(s) at %s", cfg.frames, streams,
                         f"{cfg.fps:g} fps each" if cfg.fps else "full speed")
                settings.append(run_setting(target, images, streams, cfg.fps, metrics_url, cfg.connect_timeout))
        finally:
            if viewer is not None:
                console = {"open": True, "url": server.console_url if server else None, **viewer.close()}
            if server is not None:
                server.close()
        if cfg.coil_db is not None:
            from benchmarks.stream_coils import run_repeated_coil_settings

            assert model is not None
            for setting in settings:
                setting["coils"] = "off"
            factory = InProcessServer if cfg.in_process else SubprocessServer
            kinds = {"on": factory}
            if cfg.line_actions is not None:
                kinds["on+actions"] = partial(factory, actions=True)
            settings += run_repeated_coil_settings(cfg, model, images, kinds, run_setting)
    raw: dict[int, dict] = {}
    notes = []
    if model is not None:
        wanted = {
            min(max(1, round(s["mean_batch_size"])), cfg.max_batch) for s in settings if s["mean_batch_size"]
        }
        raw = raw_throughput(model, cfg, pool, wanted)
        for s in settings:
            if not s["mean_batch_size"] or not s["frames_per_s"]:
                continue
            b = min(max(1, round(s["mean_batch_size"])), cfg.max_batch)
            s["raw_batch_size"] = b
            s["raw_images_per_s"] = raw[b]["images_per_s"]
            # At a fixed rate the throughput is the offered load, not what serving can reach.
            s["serving_ratio"] = None if s["offered_fps"] else s["frames_per_s"] / raw[b]["images_per_s"]
    else:
        notes.append("serving overhead n/a: give --model (the file the server runs) to measure the raw pipeline")
    notes += [
        "frames/s: answered frames over the wall time from the first frame sent to the last answer",
        "latency: frame handed to gRPC by the camera client -> its answer received (p50/p95/p99 over frames)",
        "mean batch: frames per inference batch formed by the server's batcher (Prometheus histogram delta; "
        "from the responses' timings when the metrics endpoint is not reachable)",
        "server ms: medians of the responses' timings (decode, queue wait, batch inference, RLE, total in server)",
        "e2e/raw: frames/s end to end over the raw pipeline (decode -> inference -> RLE in one process, no "
        "gRPC) at the mean batch size rounded; 1.0 = no serving overhead, above 1: the server overlaps "
        "decode and RLE (worker threads) with inference, which the sequential raw pipeline does not; "
        "rate-limited at a fixed --fps (throughput = offered load)",
        "client and server share this machine's CPUs",
        f"frames: the first {len(pool)} images of --images {cfg.images}, cycled" if cfg.images is not None else
        f"frames: {len(pool)} synthetic strips (benchmarks.pipeline.jpeg_frames), cycled; give --images DIR for "
        "frames of the model's own kind (a trained model may mark far more of a synthetic strip than of a real one)",
        *([note] if (note := coil_ratio_note(settings)) else []),
        "console: " + (f"open, one viewer following its events for the whole run ({console['updates']} states, "
                       f"{console['images']} images fetched)" if console else "closed (no --console)"),
    ]
    return {
        "kind": "stream",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
        "model": str(model) if model else None,
        "server": {
            "mode": "target" if cfg.target else ("in-process" if cfg.in_process else "subprocess"),
            "backend": info.backend if info else None,
            "precision": info.precision if info else None,
            "device": info.device if info else None,
            "max_batch": info.max_batch if info else None,
            "model_version": info.model_version if info else None,
            "input_size": [info.input_height, info.input_width] if info else None,
        },
        "console": console or {"open": False},
        "machine": machine,
        "machine_after": {"load_average": describe_machine()["load_average"]},
        "settings": settings,
        "raw": {str(k): v for k, v in raw.items()},
        "notes": notes,
    }


async def _model_info(target: str, timeout: float) -> Any:
    import grpc

    from client.stream_folder import model_info

    async with grpc.aio.insecure_channel(target) as channel:
        return await model_info(channel, target, timeout)


# --------------------------------------------------------------------------- report and CLI


def stream_markdown(report: dict[str, Any]) -> str:
    from benchmarks.machine import machine_summary
    from benchmarks.report import fmt, fmt_ms, markdown_table

    srv = report["server"]
    out = [
        f"### bench stream: {machine_summary(report['machine'])}",
        "",
        f"- server ({srv['mode']}): {srv['backend']} {srv['precision']} on {srv['device']}, max batch "
        f"{srv['max_batch']}, max delay {report['config']['max_delay_ms']} ms; model "
        f"{Path(report['model']).name if report['model'] else srv['model_version']}, frames "
        f"{srv['input_size'][0]}x{srv['input_size'][1]} JPEG; console "
        f"{'open, one viewer' if report.get('console', {}).get('open') else 'closed'}",
        "",
    ]
    coils = any("coils" in s for s in report["settings"])
    headers = [*(["coils"] if coils else []), "streams", "fps/stream", "frames", "errors", "frames/s", "p50 ms", "p95 ms", "p99 ms",
               "mean batch", "decode", "queue", "infer", "RLE", "in server", "raw img/s @batch", "e2e/raw"]
    rows = []
    for s in report["settings"]:
        server_ms = s["server_ms_median"]
        raw = s.get("raw_images_per_s")
        rows.append([
            *([s.get("coils", "off") + (f" #{s['repeat'] + 1}" if s.get("repeats", 1) > 1 else "")] if coils else []),
            str(s["streams"]),
            "max" if not s["fps_per_stream"] else f"{s['fps_per_stream']:g} ({s['offered_fps']:g} total)",
            str(s["frames"]),
            str(s["errors"] + s["unanswered"]),
            fmt(s["frames_per_s"], 2),
            fmt_ms(s["latency_ms"]["p50"]),
            fmt_ms(s["latency_ms"]["p95"]),
            fmt_ms(s["latency_ms"]["p99"]),
            fmt(s["mean_batch_size"], 2),
            *(fmt_ms(server_ms[k]) for k in ("decode", "queue", "inference", "postprocess", "total")),
            "n/a" if raw is None else f"{raw:.2f} @{s['raw_batch_size']}",
            ratio_text(s),
        ])
    out.append(markdown_table(headers, rows))
    out.append("")
    out += [f"- {note}" for note in report["notes"]]
    return "\n".join(out)


def ratio_text(setting: dict[str, Any]) -> str:
    if setting.get("serving_ratio") is not None:
        return f"{setting['serving_ratio']:.2f}"
    return "rate-limited" if setting["offered_fps"] else "n/a"


def parse_streams(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(tok) for tok in text.split(",") if tok.strip())
    except ValueError:
        raise ValueError(f"--streams must be comma-separated integers like 1,4,16, got {text!r}") from None
    if not values:
        raise ValueError("--streams is empty")
    return values


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None, metavar="FILE",
                        help="model file the server runs (default: the small bench model's .onnx); with "
                        "--target, the file the running server serves, for the raw-pipeline comparison")
    parser.add_argument("--target", default=None, metavar="HOST:PORT", help="use this running server")
    parser.add_argument("--metrics-url", default=None,
                        help="the running server's Prometheus URL, e.g. http://HOST:9100/metrics (with --target)")
    parser.add_argument("--streams", default="1,4,16", help="stream counts to run (default %(default)s)")
    parser.add_argument("--images", type=Path, default=None, metavar="DIR",
                        help=f"stream the first images (up to {FOLDER_FRAMES}) of this folder, cycled, instead of synthetic strips: "
                        "a Severstal-format folder (train_images/) or a folder of images of the model's input size; "
                        "frames of the model's own kind give its real defect density")
    parser.add_argument("--fps", type=float, default=0.0,
                        help="frames per second per stream; 0 = as fast as the server takes them (default)")
    parser.add_argument("--frames", type=int, default=32, help="frames per stream count, over all streams "
                        "(default %(default)s)")
    parser.add_argument("--max-batch", type=int, default=16, help="server --max-batch (default %(default)s)")
    parser.add_argument("--max-delay-ms", type=float, default=5.0, help="server --max-delay-ms (default %(default)s)")
    parser.add_argument("--device", default="cpu", help="server and raw-pipeline device (default %(default)s)")
    parser.add_argument("--threads", type=int, default=0,
                        help="ONNX Runtime / torch CPU threads (default 0 = the backend's default)")
    parser.add_argument("--in-process", action="store_true",
                        help="run the server on a thread of this process instead of a subprocess")
    parser.add_argument("--connect-timeout", type=float, default=30.0,
                        help="seconds to wait for a --target server to answer (default %(default)s)")
    parser.add_argument("--raw-repeats", type=int, default=3,
                        help="timed batches of the raw pipeline per batch size (default %(default)s)")
    parser.add_argument("--markdown", type=Path, default=None, metavar="OUT.md",
                        help="also append the table to this Markdown file (e.g. a results log)")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "stream.json", metavar="OUT",
                        help="write every figure and the machine description here (default %(default)s)")
    parser.add_argument("--console", action="store_true",
                        help="open the server's live console with one viewer connected during the measurement "
                        "(compare with a run without it)")
    parser.add_argument("--coil-db", default=None, metavar="URL",
                        help="also run every stream count through a server tracking coils in this database "
                        "(sqlite:///coils.db, postgresql://...): coil tracking on against off (needs --line); a "
                        "SQLite file gives each kind of setting a fresh file beside it (coils-on.db, "
                        "coils-on-actions.db), so none writes into tables another filled")
    parser.add_argument("--line", type=Path, default=None, metavar="FILE",
                        help="the line description for --coil-db, with at least as many cameras as --streams' "
                        "largest count (trainer synth-line --cameras 16 writes one)")
    parser.add_argument("--line-actions", type=Path, default=None, metavar="RULES",
                        help="also run every stream count through a coil-tracking server with grades and alarms "
                        "from this rule file and the OPC UA server on (against coil tracking alone)")
    parser.add_argument("--coil-repeats", type=int, default=1, metavar="N",
                        help="run the coil settings (on, and on+actions with --line-actions) N times, alternating "
                        "which goes first (ABBA), each on a fresh server and database: the ratios are given per "
                        "pair and as their median, which a slow drift of the machine's speed does not bias "
                        "(default %(default)s)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the default model is built (default benchmarks/results/models)")


def run(args: argparse.Namespace) -> int:
    from benchmarks.report import append_markdown, write_json

    cfg = StreamConfig(
        model=args.model,
        target=args.target,
        metrics_url=args.metrics_url,
        streams=parse_streams(args.streams),
        fps=args.fps,
        frames=args.frames,
        max_batch=args.max_batch,
        max_delay_ms=args.max_delay_ms,
        device=args.device,
        threads=args.threads,
        in_process=args.in_process,
        raw_repeats=args.raw_repeats,
        connect_timeout=args.connect_timeout,
        cache_dir=args.cache_dir,
        console=args.console,
        coil_db=args.coil_db,
        line=args.line,
        line_actions=args.line_actions,
        coil_repeats=args.coil_repeats,
        images=args.images,
    )
    report = run_stream(cfg)
    table = stream_markdown(report)
    print(table)
    if args.markdown:
        append_markdown(args.markdown, table)
    if args.json:
        print(f"\nJSON: {write_json(args.json, report)}")
    failed = sum(s["errors"] + s["unanswered"] for s in report["settings"])
    if failed:
        print(f"bench stream: {failed} frames failed or went unanswered", file=sys.stderr)
    return 1 if failed else 0

