"""`make demo`: the whole line on a laptop, on the embedded default (the CPU, its fastest backend).

Training runs in fp32 (``trainer fit``'s default on CPUs: bf16 training has not matched fp32's
quality on an independent set yet), and the server and ``trainer evaluate --model`` run the graph on
the backend ``load_backend`` picks (OpenVINO with bf16 U-Nets where the CPU has bf16, else ONNX
Runtime fp32).

Runs the product's own command-line tools, one step after another, exactly as a user would:
synthesise strip images, train fold 0 of 3, evaluate on the holdout, export one ONNX graph, serve
it over gRPC, stream the holdout images to it as cameras, score what came back, build the int8
OpenVINO IR beside the graph (where the automatic backend choice finds it), and measure
throughput. Every output lands under one folder (default ``demo/``); each step's output is shown
live and kept in ``demo/logs/``. A failing step stops the demo with its error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent

# The CPU preset, chosen by measurement on 2 cores (benchmarks/RESULTS.md, "Synthetic strips: the
# trainer's options one at a time" and "one fold trained longer"): a ResNet-18 U-Net cut to 3
# encoder stages with narrow decoders, trained at a quarter of the frame resolution (64x400: a 3-7 px
# scratch is still about a pixel wide, pits 2-5 px) on 64x128 crops centred on rare defects, with
# class balancing, light random augmentation, BCE + Dice and a cosine learning-rate schedule. Whole
# frames at 1/4 cost 1.4 GFLOP per image; the thesis' ResNet-34 at 128x800 costs 24 GFLOP and would
# take hours here. The run has 3 folds but the demo trains only fold 0, for 36 epochs: in the
# 10-minute budget one network trained three times longer beat the ensemble of three 12-epoch folds
# (holdout label accuracy 0.972 against 0.639); the out-of-fold search then runs on fold 0's
# validation images and the exported graph holds that one network.
PRESET = {
    "encoder": "resnet18",
    "encoder-depth": "3",
    "decoder-channels": "32,16,8",
    "scale": "0.25",
    "crop": "64x128",
    "batch-size": "8",
    "lr": "0.004",
    "lr-schedule": "cosine",
    "loss": "bce+dice",
    "augment": "light",
}
FOLDS = 3
#: The folds the demo trains (of FOLDS); the others are left for a longer run (trainer fit resumes).
TRAINED_FOLD = 0


#: The independent test set: frames the run never saw, drawn with another seed (the holdout's few dozen
#: frames cannot rank runs: one frame is about 0.03 of label accuracy there).
INDEPENDENT_FRAMES = 300
INDEPENDENT_SEED = 1
#: Held-out frames (of the training frames; the others calibrate) the int8 IR is compared with the
#: fp32 graph on: 48 frames are 192 (image, class) labels. The build took 12-35 s on 2 cores.
INT8_PARITY_FRAMES = 48
#: Frames of the independent set the bench step checks every row on against the naive pipeline.
BENCH_CHECK_FRAMES = 8


class StepFailed(Exception):
    pass


class Demo:
    def __init__(self, out: Path, steps: int) -> None:
        self.out = out
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.total = steps
        self.index = 0
        self.started = time.monotonic()

    def banner(self, title: str) -> None:
        self.index += 1
        elapsed = time.monotonic() - self.started
        print(f"\n\033[1m[{self.index}/{self.total}] {title}\033[0m  (t={elapsed:.0f}s)", flush=True)

    def run(self, name: str, tool: str, *args: str) -> str:
        """Runs one CLI, showing its output live and keeping it in logs/NAME.log."""
        cmd = [str(BIN / tool), *args]
        print("$ " + " ".join([tool, *args]), flush=True)
        log_path = self.logs / f"{name}.log"
        with open(log_path, "wb") as log:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert proc.stdout is not None
            for chunk in iter(lambda: proc.stdout.read1(4096), b""):
                sys.stdout.buffer.write(chunk)
                sys.stdout.flush()
                log.write(chunk)
            code = proc.wait()
        if code != 0:
            raise StepFailed(f"'{tool} {args[0]}' exited with {code}; its output is in {log_path}")
        return log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(target: str, server: subprocess.Popen, timeout: float = 120.0) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if server.poll() is not None:
                raise StepFailed(f"the server exited with {server.returncode} before serving")
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=1.0)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.3)
    raise StepFailed(f"the server at {target} was not SERVING after {timeout:.0f}s")


def holdout_folder(data: Path, folds_csv: Path, dest: Path) -> int:
    """Links the holdout images into their own Severstal-format folder for the camera client."""
    import csv

    with open(folds_csv, newline="") as f:
        ids = [row["ImageId"] for row in csv.DictReader(f) if int(row["fold"]) == -1]
    images = dest / "train_images"
    if dest.exists():
        shutil.rmtree(dest)
    images.mkdir(parents=True)
    for image_id in ids:
        os.link(data / "train_images" / image_id, images / image_id)
    return len(ids)


def evaluation(path: Path) -> tuple[dict, dict]:
    """A ``trainer evaluate --json`` file: (its whole result, its decision-level figures, see
    trainer.evaluate.decision_scores), read once."""
    from trainer.evaluate import decision_scores

    try:
        result = json.loads(path.read_text())
        return result, decision_scores(result)
    except (OSError, ValueError) as exc:
        raise StepFailed(f"{path}: {exc}") from None


def headline(path: Path) -> dict:
    """The decision-level figures of a ``trainer evaluate --json`` file."""
    return evaluation(path)[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("demo"), help="folder for every output (default demo/)")
    parser.add_argument("--images", type=int, default=240, help="synthetic strip images (default 240)")
    parser.add_argument("--epochs", type=int, default=36, help="epochs of the trained fold (default 36)")
    parser.add_argument("--streams", type=int, default=4, help="camera streams in the client step (default 4)")
    parser.add_argument("--independent", type=int, default=INDEPENDENT_FRAMES,
                        help=f"frames of the independent test set (another synth seed; default {INDEPENDENT_FRAMES})")
    args = parser.parse_args(argv)

    out = args.out.resolve()
    demo = Demo(out, steps=10)
    data, run, model = out / "data", out / "run", out / "model.onnx"
    server: subprocess.Popen | None = None
    try:
        train(demo, data, run, args.images, args.epochs)
        evaluate_and_export(demo, out, run, model)
        target, server = serve(demo, model)
        results = stream_and_score(demo, out, data, run, model, target, args.streams)
        independent = independent_set(demo, out, run, model, args.independent)
        bench(demo, out, model, build_int8(demo, data, model), independent, min(BENCH_CHECK_FRAMES, args.independent))
        demo.banner("stopping the server (SIGTERM: finish accepted frames, exit 0)")
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=60)
        server = None
        if code != 0:
            raise StepFailed(f"the server exited with {code} on SIGTERM")
        print("server stopped cleanly")
    except StepFailed as exc:
        print(f"\n\033[1mdemo failed at step {demo.index}:\033[0m {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ndemo interrupted", file=sys.stderr)
        return 130
    finally:
        if server is not None and server.poll() is None:
            server.terminate()
            server.wait(timeout=30)
    print_outputs(demo, out, run, model, results)
    return 0


def train(demo: Demo, data: Path, run: Path, images: int, epochs: int) -> None:
    """Steps 1-2: the synthetic strips, then one fold on the CPU preset."""
    demo.banner(f"trainer synth: {images} synthetic 1600x256 strip images")
    demo.run("1-synth", "trainer", "synth", "--out", str(data), "--images", str(images), "--seed", "0",
             "--force")
    demo.banner(f"trainer fit: fold {TRAINED_FOLD} of {FOLDS} in fp32 on the CPU preset "
                + ", ".join(f"{k}={v}" for k, v in PRESET.items()))
    preset_flags = [x for k, v in PRESET.items() for x in (f"--{k}", v)]
    demo.run("2-fit", "trainer", "fit", "--data", str(data), "--out", str(run), "--folds", str(FOLDS),
             "--holdout", "0.15", "--fold", str(TRAINED_FOLD), "--epochs", str(epochs),
             "--patience", str(epochs),
             "--encoder-weights", "none", "--device", "cpu", "--workers", "0", *preset_flags)


def evaluate_and_export(demo: Demo, out: Path, run: Path, model: Path) -> None:
    """Steps 3-4: post-processing searched out of fold, the holdout scored, the model exported."""
    demo.banner("trainer evaluate: tune thresholds/min areas out of fold, then score the holdout")
    demo.run("3a-evaluate-oof", "trainer", "evaluate", "--run", str(run), "--split", "oof", "--device", "cpu")
    demo.run("3b-evaluate-holdout", "trainer", "evaluate", "--run", str(run), "--split", "holdout",
             "--render", "4", "--device", "cpu", "--json", str(out / "holdout-folds.json"))

    demo.banner("trainer export: the trained fold(s) and their post-processing as one ONNX graph (and a torch bundle)")
    demo.run("4-export", "trainer", "export", "--run", str(run), "--out", str(model),
             "--report", str(out / "export-report.json"))
    demo.run("4b-bundle", "trainer", "export", "--run", str(run), "--out", str(model.with_suffix(".pt")))
    demo.run("4c-info", "engine", "info", str(model))


def serve(demo: Demo, model: Path) -> tuple[str, subprocess.Popen]:
    """Step 5: the server on a free port, once it answers SERVING; returns (target, process)."""
    from engine.backends import choose_backend

    port = free_port()
    target = f"127.0.0.1:{port}"
    metrics_port = free_port()
    demo.banner(f"server serve: {model.name} on {target} ({choose_backend(model, 'cpu')[1]})")
    server_log = open(demo.logs / "5-serve.log", "wb")
    server = subprocess.Popen(
        [str(BIN / "server"), "serve", "--model", str(model), "--port", str(port),
         "--metrics-port", str(metrics_port), "--device", "cpu"],
        stdout=server_log, stderr=subprocess.STDOUT,
    )
    wait_serving(target, server)
    print(f"health: SERVING (log: {demo.logs / '5-serve.log'}, metrics: http://127.0.0.1:{metrics_port}/metrics)")
    return target, server


def stream_and_score(demo: Demo, out: Path, data: Path, run: Path, model: Path, target: str, streams: int) -> Path:
    """Step 6: the holdout streamed through the server, scored against the exported model run directly."""
    demo.banner(f"server client: the holdout images as {streams} camera streams, then scored")
    holdout = out / "holdout"
    n = holdout_folder(data, run / "folds.csv", holdout)
    print(f"{n} holdout images -> {holdout}")
    results = out / "streamed-results.csv"
    demo.run("6a-client", "server", "client", "--target", target, "--images", str(holdout),
             "--streams", str(streams), "--out", str(results))
    demo.run("6b-score-streamed", "trainer", "evaluate", "--run", str(run), "--split", "holdout",
             "--predictions", str(results), "--json", str(out / "holdout-streamed.json"))
    demo.run("6c-score-exported", "trainer", "evaluate", "--run", str(run), "--split", "holdout",
             "--model", str(model), "--device", "cpu", "--json", str(out / "holdout-onnx.json"))
    streamed = headline(out / "holdout-streamed.json")
    exported = headline(out / "holdout-onnx.json")
    eager = headline(out / "holdout-folds.json")
    print(f"{'holdout':32s} {'Kaggle':>7s} {'labels':>7s} {'per class':>9s}  confusion [TN FP FN TP] per class")
    for name, s in (("streamed through the server", streamed), ("exported ONNX, run directly", exported),
                    ("fold checkpoints, torch eager", eager)):
        print(f"{name:32s} {s['kaggle']:7.4f} {s['label_accuracy']:7.4f} {s['mean_class_accuracy']:9.4f}  "
              f"{s['confusion']['per_class']}")
    if streamed != exported:
        differ = [k for k in streamed if streamed[k] != exported[k]]
        raise StepFailed(f"the streamed results do not score as the exported model run directly ({', '.join(differ)})")
    print("streamed results score exactly as the exported model run directly (Kaggle metric, labels, confusion)")
    return results


def independent_set(demo: Demo, out: Path, run: Path, model: Path, frames: int) -> Path:
    """Step 7: the exported model scored on an independent synthetic set, against predicting nothing;
    returns the set's folder."""
    data = out / "independent"
    demo.banner(f"independent test set: {frames} new strips (synth seed {INDEPENDENT_SEED}), scored with the exported model")
    demo.run("7a-synth-independent", "trainer", "synth", "--out", str(data), "--images", str(frames),
             "--seed", str(INDEPENDENT_SEED), "--force")
    report = out / "independent.json"
    demo.run("7b-score-independent", "trainer", "evaluate", "--run", str(run), "--data", str(data), "--split", "all",
             "--model", str(model), "--device", "cpu", "--json", str(report))
    result, s = evaluation(report)
    empty = result["empty_kaggle_per_class"]
    print(f"independent set ({result['images']} frames): Kaggle {s['kaggle']:.4f} (predicting nothing "
          f"{result['empty_kaggle']:.4f}), label accuracy {s['label_accuracy']:.4f}")
    for k, (kaggle, floor) in enumerate(zip(s["kaggle_per_class"], empty)):
        verdict = "above" if kaggle > floor else "NOT above"
        print(f"  class {k + 1}: Kaggle {kaggle:.4f}, {verdict} predicting nothing ({floor:.4f}); "
              f"confusion [TN FP FN TP] {s['confusion']['per_class'][k]}")
    return data


def build_int8(demo: Demo, data: Path, model: Path) -> bool:
    """Step 8: the int8 OpenVINO IR beside the exported model, calibrated on the training frames and
    compared with the fp32 graph on held-out ones; False (and the command, for later) when it could
    not be built here or its parity refused it: the demo goes on without int8."""
    from engine.backends.int8 import build_command, int8_ir_path

    demo.banner("engine build: the int8 OpenVINO IR beside the graph (NNCF, parity against the fp32 graph)")
    try:
        demo.run("8-int8-build", "engine", "build", "--target", "openvino", "--precision", "int8", "--onnx",
                 str(model), "--calibration", str(data), "--parity-frames", str(INT8_PARITY_FRAMES),
                 "--out", str(int8_ir_path(model)))
    except StepFailed as exc:
        print(f"no int8 IR ({exc}); to build it: {build_command(model, str(data))}")
        return False
    return True


def bench(demo: Demo, out: Path, model: Path, int8: bool, check_data: Path, check_frames: int) -> None:
    """Step 9: the exported model's throughput on every default backend (its int8 IR, beside it, where
    step 8 built one: without it the int8 peak would be measured for nothing). Every row is checked
    against the naive pipeline on ``check_frames`` frames of ``check_data`` (the independent set: frames
    like those the model was trained for, which the run never saw), not on the bench's synthetic frames."""
    from benchmarks.throughput import DEFAULT_BACKENDS

    demo.banner("bench throughput: the exported model, ONNX Runtime vs OpenVINO vs torch eager vs the naive pipeline")
    demo.run("8-bench", "bench", "throughput", "--model", str(model), "--model", str(model.with_suffix(".pt")),
             "--batch-sizes", "1,4,8",
             "--backends", ",".join(b for b in DEFAULT_BACKENDS if int8 or b != "openvino-int8"),
             "--frames", "32", "--check-data", str(check_data), "--check-frames", str(check_frames),
             "--json", str(out / "bench.json"), "--plot", str(out / "bench.png"))


def print_outputs(demo: Demo, out: Path, run: Path, model: Path, results: Path) -> None:
    from engine.backends.int8 import int8_ir_path

    elapsed = time.monotonic() - demo.started
    print(f"\n\033[1mdemo finished in {elapsed / 60:.1f} min.\033[0m Everything is under {out}:")
    for what, path in [
        ("evaluation report (thesis tables)", run / "report.md"),
        ("overlays: truth (top) vs prediction, named by TP/FP/FN per class", run / "renders" / "holdout"),
        ("learning curves per fold", run / "fold0" / "curves.png"),
        ("the inspection graph", model),
        ("int8 OpenVINO IR (auto runs it on VNNI/AMX-INT8)", int8_ir_path(model)),
        ("streamed results (Kaggle CSV)", results),
        ("independent test set scores", out / "independent.json"),
        ("throughput table and plot", out / "bench.png"),
        ("logs of every step", demo.logs),
    ]:
        print(f"  {what:<48} {path}")


if __name__ == "__main__":
    sys.exit(main())
