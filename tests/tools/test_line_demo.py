"""``tools/line_demo.py`` (``make line``) end to end: a painted simulated coil through a real ``server serve``
process whose model finds the planted defects; the grade, the rule and the roll found are printed and
the map and report written."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from tests.server.coil_line import grey_bands_onnx, make_coil_line

SCRIPT = Path(__file__).resolve().parents[2] / "tools" / "line_demo.py"
HEIGHT, WIDTH = 32, 128


def test_the_line_demo_grades_the_coil_and_names_the_roll(tmp_path: Path, capsys) -> None:
    spec = importlib.util.spec_from_file_location("line_demo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = grey_bands_onnx(tmp_path / "model.onnx", HEIGHT, WIDTH)
    make_coil_line(tmp_path / "line", frames=80, height=HEIGHT, width=WIDTH)
    out = tmp_path / "out"
    assert module.main(["--model", str(model), "--out", str(out), "--line-folder", str(tmp_path / "line")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((out / "coil-report.json").read_text())
    [mark] = report["periodic"]
    assert mark["roll"] == "work-roll" and report["grade"] == "B"
    assert report["grade_rule"].startswith("B: not A: ")
    assert f"grade B ({report['grade_rule']})" in printed and "roll work-roll (confidence" in printed
    assert (out / "coil-map.png").stat().st_size > 1000 and report["summary"]["state"] == "closed"
