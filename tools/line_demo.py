"""The whole line in one command (``make line``): a simulated coil with a roll mark, through a server.

``trainer synth-line`` draws a coil (2 cameras, the roll's mark repeating along it, plain and crossing
defects besides) at the model's frame size; ``server serve`` tracks it (``--coil-db``, grades and alarms
from ``tools/line_rules.yaml``); ``server client --line`` streams it and ends it with EndCoil; then the
coil's grade, the rule that decided it and the roll found are printed beside the roll that was
planted, and its map (``coil-map.png``) and report (``coil-report.json``: summary, records, periodic
defects, grade) are written.

    .venv/bin/python tools/line_demo.py --model demo/model.onnx --out demo/line
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "demo" / "model.onnx", help="the model to serve")
    parser.add_argument("--out", type=Path, default=ROOT / "demo" / "line", help="where everything is written")
    parser.add_argument("--frames", type=int, default=200, help="frames per camera (default %(default)s)")
    parser.add_argument("--rules", type=Path, default=ROOT / "tools" / "line_rules.yaml", help="server serve --grading")
    parser.add_argument("--line-folder", type=Path, default=None,
                        help="stream this line folder instead of drawing one (trainer synth-line's)")
    args = parser.parse_args(argv)
    if not args.model.is_file():
        print(f"line demo: no model {args.model} (make demo trains one, or pass --model)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    folder = args.line_folder or simulate(args.model, args.out / "line", args.frames)
    port = free_port()
    target = f"127.0.0.1:{port}"
    log = open(args.out / "serve.log", "wb")
    server = subprocess.Popen(
        [sys.executable, "-m", "server.cli", "serve", "--model", str(args.model), "--port", str(port),
         "--metrics-port", "-1", "--device", "cpu", "--line", str(folder / "line.yaml"),
         "--coil-db", f"sqlite:///{args.out / 'coils.db'}", "--grading", str(args.rules)],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        wait_serving(target, server)
        run("server", "client", "--target", target, "--line", str(folder), "--out", str(args.out / "results.csv"))
        coil_id = json.loads((folder / "truth.json").read_text())["coils"][0]["coil_id"]
        run("server", "coils", "map", coil_id, "--target", target, "--out", str(args.out / "coil-map.png"))
        report = coil_report(target, coil_id)
    finally:
        server.terminate()
        server.wait(timeout=60)
    (args.out / "coil-report.json").write_text(json.dumps(report, indent=1))
    print(verdict_lines(report, folder))
    print(f"map: {args.out / 'coil-map.png'}, report: {args.out / 'coil-report.json'}")
    return 0


def simulate(model: Path, out: Path, frames: int) -> Path:
    """A synth-line coil at the model's frame size."""
    from engine.metadata import read_onnx_metadata

    meta = read_onnx_metadata(str(model))
    run("trainer", "synth-line", "--out", str(out), "--cameras", "2", "--frames", str(frames), "--height",
        str(meta.input_height), "--width", str(meta.input_width), "--format", "png", "--force")
    return out


def run(tool: str, *args: str) -> None:
    module = {"trainer": "trainer.cli", "server": "server.cli"}[tool]
    print("$", tool, *args, flush=True)
    subprocess.run([sys.executable, "-m", module, *args], check=True, cwd=ROOT)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_serving(target: str, server: subprocess.Popen, timeout: float = 180.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise RuntimeError(f"server serve exited with {server.returncode}; see serve.log")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1.0).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise RuntimeError(f"server serve at {target} was not SERVING after {timeout:.0f} s")


def coil_report(target: str, coil_id: str) -> dict:
    """GetCoil as JSON: summary, records, periodic defects, grade and rule."""
    import grpc

    from protos.inspection.v1 import inspection_pb2 as pb
    from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
    from server.coil_wire import record_from_message, summary_from_message, verdict_from_message

    with grpc.insecure_channel(target) as channel:
        coil = pb_grpc.InspectionServiceStub(channel).GetCoil(pb.GetCoilRequest(coil_id=coil_id), timeout=60)
    return {"summary": summary_from_message(coil.summary).to_dict(),
            "records": [record_from_message(r).to_dict() for r in coil.records],
            **verdict_from_message(coil).to_dict()}


def verdict_lines(report: dict, folder: Path) -> str:
    """The coil's grade and rule, the periodic defects found, and the roll planted."""
    from coils.line import load_line

    roll = load_line(folder / "line.yaml").rolls[0]
    lines = [f"coil {report['summary']['coil_id']}: {len(report['records'])} defect records, grade "
             f"{report['grade'] or '-'} ({report['grade_rule'] or 'no grading'})",
             f"planted: roll {roll.name}, circumference {roll.circumference_mm:.1f} mm"]
    for p in report["periodic"]:
        lines.append(f"found: class {p['class_id']} every {p['period_mm']:.1f} mm, {p['count']}x, "
                     f"roll {p['roll'] or 'none'} (confidence {p['confidence']:.4f})")
    if not report["periodic"]:
        lines.append("found: no periodic defect")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
