"""``bench stream`` against real servers (in-process, subprocess, and a running one) with the tiny model.

No timing is asserted: every frame must be answered, and every figure present and consistent.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from benchmarks import cli


def read_report(path: Path) -> dict:
    return json.loads(path.read_text())


def check_setting(s: dict, frames: int, max_batch: int = 16) -> None:
    assert s["answered"] == frames and s["errors"] == 0 and s["unanswered"] == 0
    lat = s["latency_ms"]
    assert 0 < lat["p50"] <= lat["p95"] <= lat["p99"]
    assert s["frames_per_s"] > 0
    assert 1 <= s["mean_batch_size"] <= max_batch
    assert set(s["server_ms_median"]) == {"decode", "queue", "inference", "postprocess", "total"}
    assert s["server_ms_median"]["inference"] > 0


def test_stream_in_process_server(tiny_onnx: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "stream.json"
    rc = cli.main(["stream", "--model", str(tiny_onnx), "--streams", "1,3", "--frames", "6", "--in-process",
                   "--raw-repeats", "1", "--max-batch", "4", "--json", str(out)])
    assert rc == 0
    stdout = capsys.readouterr().out
    for title in ("frames/s", "p50 ms", "p95 ms", "p99 ms", "mean batch", "raw img/s @batch", "e2e/raw"):
        assert title in stdout
    report = read_report(out)
    from engine.backends import choose_backend

    # The server and the raw pipeline run the backend load_backend picks here (OpenVINO bf16 on a bf16 CPU).
    assert report["server"]["mode"] == "in-process" and report["server"]["backend"] == choose_backend(tiny_onnx, "cpu")[0]
    assert {r["backend"] for r in report["raw"].values()} == {report["server"]["backend"]}
    assert report["machine"]["cpu"] and report["machine"]["git"]["commit"]
    assert [s["streams"] for s in report["settings"]] == [1, 3]
    for s in report["settings"]:
        check_setting(s, 6, max_batch=4)
        # Two independent counts of the batches this run formed: the server's Prometheus histogram
        # and the batch size each response reports. They describe the same batches.
        assert s["mean_batch_size_from_metrics"] == pytest.approx(s["mean_batch_size_from_responses"])
        assert s["raw_batch_size"] == min(max(1, round(s["mean_batch_size"])), 4)
        assert str(s["raw_batch_size"]) in report["raw"]
        assert s["serving_ratio"] == pytest.approx(s["frames_per_s"] / s["raw_images_per_s"])


def test_stream_subprocess_server_at_a_fixed_rate(tiny_onnx: Path, tmp_path: Path) -> None:
    out = tmp_path / "stream.json"
    rc = cli.main(["stream", "--model", str(tiny_onnx), "--streams", "2", "--frames", "4", "--fps", "20",
                   "--raw-repeats", "1", "--json", str(out)])
    assert rc == 0
    report = read_report(out)
    assert report["server"]["mode"] == "subprocess"
    (s,) = report["settings"]
    check_setting(s, 4)
    assert s["fps_per_stream"] == 20 and s["offered_fps"] == 40
    assert s["raw_images_per_s"] > 0 and s["serving_ratio"] is None  # rate-limited: no overhead figure
    assert s["batches_from_metrics"] >= 1


@pytest.mark.parametrize("in_process", [False, True], ids=["subprocess", "in-process"])
def test_stream_with_the_console_open(tiny_onnx: Path, tmp_path: Path, in_process: bool) -> None:
    # server serve --console-port (or the library Console) with one viewer following its events
    # and fetching its images while the frames stream.
    out = tmp_path / "stream.json"
    argv = ["stream", "--model", str(tiny_onnx), "--streams", "2", "--frames", "30", "--fps", "10",
            "--raw-repeats", "1", "--console", "--json", str(out)]
    assert cli.main(argv + (["--in-process"] if in_process else [])) == 0
    report = read_report(out)
    (s,) = report["settings"]
    check_setting(s, 30)
    console = report["console"]
    assert console["open"] and console["failure"] is None
    assert console["updates"] >= 2  # the first state, then 1.5 s of streaming at 2 states a second
    assert console["images"] >= 1 and console["image_bytes"] > 1000
    assert any(note.startswith("console: open") for note in report["notes"])


def test_stream_against_a_running_server(tiny_onnx: Path, tmp_path: Path) -> None:
    from benchmarks.stream import InProcessServer, StreamConfig

    server = InProcessServer(StreamConfig(model=tiny_onnx, in_process=True), tiny_onnx)
    try:
        out = tmp_path / "stream.json"
        assert cli.main(["stream", "--target", server.target, "--streams", "2", "--frames", "4",
                         "--json", str(out)]) == 0
        with_metrics = tmp_path / "stream-metrics.json"
        assert cli.main(["stream", "--target", server.target, "--metrics-url", server.metrics_url,
                         "--streams", "2", "--frames", "4", "--json", str(with_metrics)]) == 0
    finally:
        server.close()
    (s,) = read_report(out)["settings"]
    check_setting(s, 4)
    # No model file given: no raw pipeline to compare with, and no metrics URL to read.
    assert s.get("serving_ratio") is None and s["mean_batch_size_from_metrics"] is None
    assert read_report(out)["server"]["mode"] == "target"
    (m,) = read_report(with_metrics)["settings"]
    assert m["mean_batch_size_from_metrics"] == pytest.approx(m["mean_batch_size_from_responses"])


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--streams", "1,0"], "--streams must be positive integers"),
        (["--streams", "a"], "--streams must be comma-separated integers"),
        (["--target", "localhost"], "--target must be HOST:PORT"),
        (["--target", "127.0.0.1:1", "--in-process"], "--in-process starts a server; it contradicts --target"),
        (["--fps", "-1"], "--fps must be >= 0"),
        (["--target", "127.0.0.1:1", "--console"], "--console opens the console of a server bench stream starts"),
        (["--model", "missing.onnx"], "--model missing.onnx: no such file"),
        (["--coil-db", "sqlite:///c.db"], "--coil-db and --line go together"),
        (["--coil-db", "sqlite:///c.db", "--line", "missing.yaml"], "--line missing.yaml: no such line description"),
        (["--target", "127.0.0.1:1", "--coil-db", "sqlite:///c.db", "--line", "l.yaml"],
         "--coil-db starts a coil-tracking server of its own; it contradicts --target"),
    ],
)
def test_bad_flags_are_clear_errors(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["stream", *argv]) == 2
    assert message in capsys.readouterr().err


def test_unreachable_target_is_a_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks.stream import free_port

    port = free_port()
    assert cli.main(["stream", "--target", f"127.0.0.1:{port}", "--streams", "1", "--frames", "1",
                     "--connect-timeout", "1"]) == 2
    assert f"127.0.0.1:{port}" in capsys.readouterr().err


def test_stream_with_coil_tracking_on_against_off(tiny_onnx: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """``--coil-db --line``: every stream count runs again through a coil-tracking server, the frames
    on one coil per setting, each coil ended and stored; the report compares the two."""
    from coils.line import load_line
    from coils.store import CoilStore
    from trainer.synth_line import LineSpec, synthesize_line

    synthesize_line(tmp_path / "line", LineSpec(cameras=3, frames=4, height=64, width=320, overlap_px=32))
    line = tmp_path / "line" / "line.yaml"
    out, database = tmp_path / "stream.json", tmp_path / "coils.db"
    rules = tmp_path / "rules.yaml"
    rules.write_text("grades: [{name: A}]\nalarms: [{name: roll-mark, kind: periodic}]\n")
    rc = cli.main(["stream", "--model", str(tiny_onnx), "--streams", "1,3", "--frames", "6", "--in-process",
                   "--raw-repeats", "1", "--max-batch", "4", "--json", str(out), "--coil-db", f"sqlite:///{database}",
                   "--line", str(line), "--line-actions", str(rules)])
    assert rc == 0
    report = read_report(out)
    assert [(s["coils"], s["streams"]) for s in report["settings"]] == [
        ("off", 1), ("off", 3), ("on", 1), ("on", 3), ("on+actions", 1), ("on+actions", 3)]
    for s in report["settings"]:
        check_setting(s, 6, max_batch=4)
    assert any(note.startswith("coil tracking: frames/s with it on over off") and
               "line actions (grades, alarms, OPC UA publishing): frames/s with them on" in note
               for note in report["notes"])
    assert not database.exists()  # each kind of setting on a fresh file of its own, named in the report
    for label, name in (("on", "coils-on.db"), ("on+actions", "coils-on-actions.db")):
        assert {s["coil_db"] for s in report["settings"] if s["coils"] == label} == {f"sqlite:///{tmp_path / name}"}
        store = CoilStore.open(f"sqlite:///{tmp_path / name}", load_line(line))
        try:
            coils = store.list_coils(10)
        finally:
            store.close()
        assert sorted(c.frames for c in coils) == [2, 6, 6] and {c.state for c in coils} == {"closed"}  # a warm-up
    assert cli.main(["stream", "--streams", "4", "--coil-db", f"sqlite:///{database}", "--line", str(line)]) == 2
    assert "has 3 cameras, --streams asks for 4" in capsys.readouterr().err


@pytest.mark.parametrize(("url", "label", "expected"), [
    ("sqlite:///coils.db", "on", "sqlite:///coils-on.db"),
    ("sqlite:////data/x/coils.sqlite", "on+actions", "sqlite:////data/x/coils-on-actions.sqlite"),
    ("sqlite://", "on", "sqlite://"),  # in memory: as given
    ("postgresql://bench@db/coils", "on+actions", "postgresql://bench@db/coils"),  # shared, as given
])
def test_each_kind_of_coil_setting_gets_a_fresh_sqlite_file(url: str, label: str, expected: str) -> None:
    from benchmarks.stream_coils import setting_database

    assert setting_database(url, label) == expected


def test_coil_repeats_alternate_the_order_and_give_each_pair_and_the_median(tiny_onnx: Path, tmp_path: Path) -> None:
    """``--coil-repeats 2``: on, on+actions, then on+actions, on (each on a fresh server and database);
    the note gives both pairs' ratios and their median."""
    from trainer.synth_line import LineSpec, synthesize_line

    synthesize_line(tmp_path / "line", LineSpec(cameras=2, frames=4, height=64, width=320, overlap_px=32))
    rules = tmp_path / "rules.yaml"
    rules.write_text("grades: [{name: A}]\nalarms: [{name: roll-mark, kind: periodic}]\n")
    out = tmp_path / "stream.json"
    rc = cli.main(["stream", "--model", str(tiny_onnx), "--streams", "2", "--frames", "4", "--in-process",
                   "--raw-repeats", "1", "--max-batch", "4", "--json", str(out), "--coil-db",
                   f"sqlite:///{tmp_path / 'coils.db'}", "--line", str(tmp_path / "line" / "line.yaml"),
                   "--line-actions", str(rules), "--coil-repeats", "2"])
    assert rc == 0
    report = read_report(out)
    assert [(s["coils"], s.get("repeat")) for s in report["settings"]] == [
        ("off", None), ("on", 0), ("on+actions", 0), ("on+actions", 1), ("on", 1)]
    [note] = [n for n in report["notes"] if n.startswith("coil tracking")]
    assert "line actions" in note and "2 streams" in note and note.count("(median of 2: ") == 2
    assert cli.main(["stream", "--streams", "2", "--coil-repeats", "2"]) == 2  # without --coil-db


def test_the_ratio_note_pairs_each_repeat_and_takes_the_median() -> None:
    from benchmarks.stream_coils import coil_ratio_note

    settings = [{"coils": "off", "streams": 16, "frames_per_s": 100.0}]
    for repeat, (on, acting) in enumerate([(90.0, 81.0), (80.0, 80.0), (100.0, 95.0)]):
        settings += [{"coils": "on", "streams": 16, "frames_per_s": on, "repeat": repeat},
                     {"coils": "on+actions", "streams": 16, "frames_per_s": acting, "repeat": repeat}]
    note = coil_ratio_note(settings)
    assert "over off, same frames and stream counts: 16 streams 0.900 (median of 3: 0.900, 0.800, 1.000)" in note
    assert "coil tracking alone: 16 streams 0.950 (median of 3: 0.900, 1.000, 0.950)" in note


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_the_server_cpu_is_read_for_the_process_and_its_children() -> None:
    import subprocess
    import sys

    from benchmarks.stream_coils import cpu_per_frame, process_cpu_s

    busy = subprocess.Popen([sys.executable, "-c", "import time\nt = time.process_time()\n"
                             "while time.process_time() - t < 0.5: pass\ntime.sleep(30)"])
    try:
        deadline = time.monotonic() + 30
        while (cpu := process_cpu_s(os.getpid())) is not None and cpu[1] < 0.4 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert cpu is not None and cpu[0] > 0 and 0.4 <= cpu[1] < 5  # the child's busy half second, counted
    finally:
        busy.kill()
        busy.wait()
    assert process_cpu_s(None) is None and process_cpu_s(busy.pid) is None  # reaped: nothing to read
    assert cpu_per_frame((1.0, 0.5), (3.0, 1.5), {"frames": 110, "errors": 5, "unanswered": 5}) == {
        "server": 20.0, "children": 10.0}
    assert cpu_per_frame(None, (3.0, 1.5), {"frames": 10}) is None


def test_the_cpu_note_gives_each_kind_of_setting_its_median_cpu_per_frame() -> None:
    from benchmarks.stream_coils import coil_ratio_note

    settings = [{"coils": "off", "streams": 16, "frames_per_s": 100.0}]
    for repeat, (own, child) in enumerate([(6.0, 0.3), (6.4, 0.5), (6.2, 0.4)]):
        settings += [{"coils": "on", "streams": 16, "frames_per_s": 90.0, "repeat": repeat,
                      "server_cpu_ms_per_frame": {"server": own - 0.1, "children": 0.0}},
                     {"coils": "on+actions", "streams": 16, "frames_per_s": 90.0, "repeat": repeat,
                      "server_cpu_ms_per_frame": {"server": own, "children": child}}]
    assert "(its process + its child processes, the line watch; medians over repeats): on 16 streams 6.10 + 0.00, " \
           "on+actions 16 streams 6.20 + 0.40" in coil_ratio_note(settings)


def test_stream_of_a_folders_images(tiny_onnx: Path, tmp_path: Path) -> None:
    """--images: the cameras stream the folder's first images (cycled), the raw pipeline times the same ones."""
    from benchmarks.pipeline import folder_frames
    from tests.fixtures import image_folder

    folder = image_folder(tmp_path / "own", {name: (64, 320) for name in ("b.png", "a.png", "c.png")})
    out = tmp_path / "stream.json"
    rc = cli.main(["stream", "--model", str(tiny_onnx), "--streams", "2", "--frames", "5", "--in-process",
                   "--images", str(folder), "--raw-repeats", "1", "--max-batch", "4", "--json", str(out)])
    assert rc == 0
    report = read_report(out)
    (s,) = report["settings"]
    check_setting(s, 5, max_batch=4)
    assert report["config"]["images"] == str(folder)
    assert f"frames: the first 3 images of --images {folder}, cycled" in report["notes"]
    assert [p.name for p in folder_frames(folder, 2, 64, 320)] == ["a.png", "b.png"]


def test_stream_refuses_a_folder_image_of_another_size(tiny_onnx: Path, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    from tests.fixtures import image_folder

    folder = image_folder(tmp_path / "own", {"a.png": (64, 320), "b.png": (32, 160)})
    assert cli.main(["stream", "--model", str(tiny_onnx), "--streams", "1", "--frames", "4", "--in-process",
                     "--images", str(folder), "--raw-repeats", "1"]) != 0
    assert (f"--images {folder}: {folder / 'train_images' / 'b.png'}: 32x160 frame, the model takes 64x320 (frames "
            "are not resized") in capsys.readouterr().err
    assert cli.main(["stream", "--model", str(tiny_onnx), "--streams", "1", "--images", "missing"]) != 0
    assert "--images missing: no such folder" in capsys.readouterr().err
