"""``bench failover``: cameras through nginx and three replicas while replicas drain, die and return.

The same cameras x frames (raw GRAY8 synthetic strips at the model's input size), three ways:

1. ``direct``: one ``server serve`` replica, cameras connected to it, no balancer, no faults;
2. ``balanced``: nginx (``deploy/nginx/grpc-balancer.conf``) in front of three replicas, no faults;
   each of these once unpaced (frames/s) and once with a third of the frames paced at ``--fps``
   per camera (latency below saturation);
3. ``failover``: balanced, paced at ``--fps`` per camera, while replica 1 is SIGTERMed (drain; it
   must exit 0), replica 2 SIGKILLed at once after, ``--alone`` seconds with replica 3 alone, then
   both started again on their ports; at the end every replica is SIGTERMed and must exit 0.

Every camera must get every frame answered exactly once, in order, equal to the direct run's
answer (zero lost). The report has frames/s and p50/p99 latency (camera ``send`` to answer,
resends included) of each run, and the counters of the fault run: sent, answered, resent,
duplicates dropped, reconnects, lost.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

HELP = "frames through nginx + 3 replicas while replicas drain, die and return; against direct"
DESCRIPTION = __doc__.split("\n\n", 1)[1] if __doc__ else HELP
SERVE_FLAGS = ("--device", "cpu", "--threads", "1", "--max-delay-ms", "2")


def camera_frames(model: Path, count: int = 50, seed: int = 11) -> np.ndarray:
    """``count`` synthetic strip frames at ``model``'s input size."""
    from toolchain.info import describe_model
    from toolchain.parity import synthetic_frames

    meta = describe_model(model)["metadata"]
    return synthetic_frames(count, meta["input_height"], meta["input_width"], seed=seed)


def request(frames: np.ndarray, camera: int, frame_id: int) -> Any:
    from protos.inspection.v1 import inspection_pb2 as pb

    frame = frames[(7 * camera + frame_id) % len(frames)]
    return pb.InspectRequest(frame_id=frame_id, raw_image=pb.RawImage(
        width=frame.shape[1], height=frame.shape[0], channels=1, data=frame.tobytes()))


async def stream_cameras(target: str, frames: np.ndarray, cameras: int, per_camera: int, fps: float = 0.0,
                         on_answer: Callable[[], None] | None = None) -> dict[str, Any]:
    """``cameras`` CameraStreams on one channel; returns answers and counters per camera, elapsed s."""
    from client.camera import Backoff, CameraStream, open_channel

    async def camera(channel: Any, index: int) -> tuple[list, Any]:
        async with CameraStream(channel, f"cam{index}", backoff=Backoff(give_up_s=60)) as cam:
            async def produce() -> None:
                t0 = time.perf_counter()
                for frame_id in range(per_camera):
                    if fps > 0 and (delay := t0 + frame_id / fps - time.perf_counter()) > 0:
                        await asyncio.sleep(delay)
                    await cam.send(request(frames, index, frame_id))
                await cam.close()

            producer = asyncio.get_running_loop().create_task(produce())
            answers = []
            async for answer in cam.answers():
                answers.append(answer)
                if on_answer is not None:
                    on_answer()
            await producer
            return answers, cam.counters

    async with open_channel(target) as channel:
        started = time.perf_counter()
        results = await asyncio.gather(*(camera(channel, i) for i in range(cameras)))
        elapsed = time.perf_counter() - started
    return {"answers": [a for a, _ in results], "counters": [c for _, c in results], "elapsed_s": elapsed}


def figures(run: dict[str, Any]) -> dict[str, Any]:
    latencies = np.array([a.latency_s for answers in run["answers"] for a in answers]) * 1000
    answered = int(latencies.size)
    return {
        "frames": answered,
        "elapsed_s": round(run["elapsed_s"], 3),
        "frames_per_s": round(answered / run["elapsed_s"], 1) if run["elapsed_s"] > 0 else 0.0,
        "p50_ms": round(float(np.percentile(latencies, 50)), 2) if answered else None,
        "p99_ms": round(float(np.percentile(latencies, 99)), 2) if answered else None,
    }


def result_key(response: Any) -> tuple:
    return tuple((d.class_id, d.present, d.pixel_count, d.rle) for d in response.defects)


def check_answers(run: dict[str, Any], reference: dict[str, Any], per_camera: int) -> dict[str, Any]:
    """Exactly once, in order, equal to the reference run: the problems found (empty lists when none)."""
    problems: list[str] = []
    lost = 0
    for index, (answers, expected) in enumerate(zip(run["answers"], reference["answers"])):
        ids = [a.frame_id for a in answers]
        if ids != list(range(per_camera)):
            problems.append(f"cam{index}: answered frames are not 0..{per_camera - 1} once each in order")
        lost += per_camera - len(set(ids) & set(range(per_camera)))
        for answer, want in zip(answers, expected):
            if not answer.ok:
                problems.append(f"cam{index} frame {answer.frame_id}: {answer.error_message}")
            elif result_key(answer.response) != result_key(want.response):
                problems.append(f"cam{index} frame {answer.frame_id}: differs from the direct run")
    return {"lost": lost, "problems": problems[:20], "problem_count": len(problems)}


class FaultSchedule(threading.Thread):
    """Drain replica 1, kill replica 2, leave replica 3 alone, bring both back: on answered-frame counts."""

    def __init__(self, setup: Any, total: int, alone_s: float) -> None:
        super().__init__(name="faults", daemon=True)
        self.setup, self.total, self.alone_s = setup, total, alone_s
        self.answered = 0
        self.events: list[tuple[float, str]] = []
        self.drain_exit: int | None = None
        self.error: BaseException | None = None
        self._t0 = time.perf_counter()

    def note(self, what: str) -> None:
        self.events.append((round(time.perf_counter() - self._t0, 3), what))

    def run(self) -> None:
        try:
            r1, r2, _ = self.setup.replicas
            while self.answered < 0.15 * self.total:
                time.sleep(0.01)
            self.note(f"SIGTERM replica1 at {self.answered} answered")
            self.drain_exit = r1.terminate()
            self.note(f"replica1 exited {self.drain_exit}; SIGKILL replica2 at {self.answered} answered")
            r2.kill()
            time.sleep(self.alone_s)
            self.note(f"starting replica1 and replica2 at {self.answered} answered")
            r1.start(), r2.start()
            r1.wait_ready(), r2.wait_ready()
            self.note(f"replica1 and replica2 ready at {self.answered} answered")
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.error = exc


def measure(target: str, frames: np.ndarray, cameras: int, per_camera: int, fps: float) -> tuple[dict, dict]:
    """Throughput (unpaced, every frame) and latency (paced at ``fps``, a third of the frames) on ``target``:
    the unpaced run (the reference answers) and the figures."""
    unpaced = asyncio.run(stream_cameras(target, frames, cameras, per_camera))
    paced = asyncio.run(stream_cameras(target, frames, cameras, max(1, per_camera // 3), fps))
    f, p = figures(unpaced), figures(paced)
    return unpaced, {"frames": f["frames"], "frames_per_s": f["frames_per_s"], "saturated_p50_ms": f["p50_ms"],
                     "saturated_p99_ms": f["p99_ms"], "paced_fps_per_camera": fps, "p50_ms": p["p50_ms"],
                     "p99_ms": p["p99_ms"]}


def run_failover(model: Path, cameras: int = 8, per_camera: int = 300, fps: float = 25.0, alone_s: float = 2.5,
                 workdir: Path | None = None) -> dict[str, Any]:
    """The runs and their checks (see the module docstring)."""
    from deploy.balanced import BalancedSetup, Replica, free_port

    frames = camera_frames(model)
    replica = Replica("direct", model, free_port(), flags=SERVE_FLAGS).start()
    try:
        replica.wait_ready()
        direct, direct_figures = measure(replica.address, frames, cameras, per_camera, fps)
    finally:
        direct_exit = replica.terminate() if replica.running else None
    report: dict[str, Any] = {"model": str(model), "cameras": cameras, "frames_per_camera": per_camera,
                              "fps_per_camera": fps, "direct": {**direct_figures, "exit": direct_exit}}
    with tempfile.TemporaryDirectory(prefix="failover-") as tmp:
        with BalancedSetup(model, workdir or Path(tmp), flags=SERVE_FLAGS) as setup:
            balanced, report["balanced"] = measure(setup.target, frames, cameras, per_camera, fps)
            faults = FaultSchedule(setup, cameras * per_camera, alone_s)

            def on_answer() -> None:
                faults.answered += 1

            faults.start()
            failover = asyncio.run(stream_cameras(setup.target, frames, cameras, per_camera, fps, on_answer))
            faults.join(timeout=180)
            exits = setup.stop_replicas()
            logs = "".join(r.log for r in setup.replicas)
    report["balanced"]["problem_count"] = check_answers(balanced, direct, per_camera)["problem_count"]
    report["failover"] = fault_figures(failover, direct, per_camera, faults, exits)
    report["replica_log_tail"] = logs[-4000:] if report["failover"]["problem_count"] or faults.error else ""
    return report


def fault_figures(failover: dict, direct: dict, per_camera: int, faults: FaultSchedule, exits: list) -> dict:
    counters = [asdict(c) for c in failover["counters"]]
    return {
        **figures(failover),
        **{name: sum(c[name] for c in counters) for name in counters[0]},
        **check_answers(failover, direct, per_camera),
        "expected": len(counters) * per_camera,
        "drain_exit": faults.drain_exit,
        "final_exits": exits,
        "fault_error": repr(faults.error) if faults.error else None,
        "events": faults.events,
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", type=Path, default=None,
                        help="model the replicas serve (default: a small random-weight bench model, 64x320 frames)")
    parser.add_argument("--cameras", type=int, default=8, help="concurrent camera streams (default: 8)")
    parser.add_argument("--frames", type=int, default=300, help="frames per camera (default: 300)")
    parser.add_argument("--fps", type=float, default=25.0,
                        help="frames/s per camera in the paced runs and the fault run (default: 25)")
    parser.add_argument("--alone", type=float, default=2.5, help="seconds with one replica up (default: 2.5)")
    parser.add_argument("--report", "--json", type=Path, default=None, help="write the report as JSON here")
    parser.add_argument("--markdown", type=Path, default=None, metavar="OUT.md",
                        help="append the table to this file (e.g. benchmarks/RESULTS.md)")


def small_model() -> Path:
    """The default: a random-weight bench model (``bench model``, cached) with 64x320 frames, quick on a CPU."""
    from benchmarks.models import BenchModelSpec, ensure_model

    spec = BenchModelSpec(decoder_channels=(32, 16, 8), height=64, width=320, train_height=32, train_width=160,
                          fit_steps=0)  # failover measures the serving, not the weights
    return ensure_model(spec).onnx


def summary_lines(report: dict[str, Any]) -> list[str]:
    f = report["failover"]
    lines = [f"{report['cameras']} cameras x {report['frames_per_camera']} frames"]
    for name in ("direct", "balanced"):
        r = report[name]
        lines.append(f"  {name:9s} {r['frames_per_s']:7.1f} frames/s unpaced; at {r['paced_fps_per_camera']:g} fps per "
                     f"camera p50 {r['p50_ms']:7.2f} ms p99 {r['p99_ms']:7.2f} ms")
    lines.append(f"  failover  {f['frames_per_s']:7.1f} frames/s at {report['fps_per_camera']:g} fps per camera, p50 "
                 f"{f['p50_ms']:7.2f} ms p99 {f['p99_ms']:7.2f} ms (resends included)")
    lines.append(f"  fault run: sent {f['sent']}, answered {f['answered']} of {f['expected']}, resent {f['resent']}, "
                 f"duplicates dropped {f['duplicates']}, reconnects {f['reconnects']}, lost {f['lost']}, "
                 f"problems {f['problem_count']}; drain exit {f['drain_exit']}, final exits {f['final_exits']}")
    lines.extend(f"    t={t:7.3f} s  {what}" for t, what in f["events"])
    return lines


def failover_markdown(report: dict[str, Any]) -> str:
    from benchmarks.machine import machine_summary
    from benchmarks.report import fmt, fmt_ms, markdown_table

    f = report["failover"]
    out = [f"### bench failover: {machine_summary(report['machine'])}", "",
           f"- {report['cameras']} cameras x {report['frames_per_camera']} frames (raw GRAY8), model "
           f"{Path(report['model']).name}; replicas `server serve {' '.join(SERVE_FLAGS)}`; latency = camera "
           f"send() to answer, resends included; paced runs at {report['fps_per_camera']:g} frames/s per camera", ""]
    rows = []
    for name, label in (("direct", "direct, one replica"), ("balanced", "nginx + 3 replicas")):
        r = report[name]
        rows.append([label, "none", fmt(r["frames_per_s"]), fmt_ms(r["saturated_p99_ms"]), fmt_ms(r["p50_ms"]),
                     fmt_ms(r["p99_ms"])])
    rows.append(["nginx + 3 replicas", "drain r1, kill r2, r3 alone, both back", f"({fmt(f['frames_per_s'])} paced)",
                 "", fmt_ms(f["p50_ms"]), fmt_ms(f["p99_ms"])])
    out.append(markdown_table(["path", "faults", "frames/s unpaced", "p99 ms unpaced", "p50 ms paced",
                               "p99 ms paced"], rows))
    out += ["", f"- fault run: frames {f['expected']}, sent {f['sent']}, answered {f['answered']}, resent "
            f"{f['resent']}, duplicates dropped {f['duplicates']}, reconnects {f['reconnects']}, lost {f['lost']}, "
            f"wrong or out of order {f['problem_count']}; replica 1 drained and exited {f['drain_exit']}, final "
            f"SIGTERM exits {f['final_exits']}",
            "- " + "; ".join(f"t={t:.1f} s {what}" for t, what in f["events"])]
    return "\n".join(out)


def run(args: argparse.Namespace) -> int:
    from deploy.balanced import nginx_missing_reason

    if reason := nginx_missing_reason():
        raise FileNotFoundError(reason)
    report = run_failover(args.model or small_model(), args.cameras, args.frames, args.fps, args.alone)
    from benchmarks.machine import describe_machine
    from benchmarks.report import append_markdown, write_json

    report["machine"] = describe_machine()
    print("\n".join(summary_lines(report)), file=sys.stderr)
    table = failover_markdown(report)
    print(table)
    if args.markdown is not None:
        append_markdown(args.markdown, table)
    if args.report is not None:
        write_json(args.report, report)
    f = report["failover"]
    ok = f["lost"] == 0 and not f["problem_count"] and f["drain_exit"] == 0 and all(c == 0 for c in f["final_exits"])
    return 0 if ok else 1
