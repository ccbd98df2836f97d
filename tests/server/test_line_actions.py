"""What the line acts on, through a real server: a streamed coil with a roll mark is graded by the
server's rule file at close (grade and deciding rule in GetCoil), re-graded by another file with
``server coils grade``; a wrong rule file stops the start, naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.server.conftest import ServerThread, running_server
from tests.server.test_coil_tracking import _get_coil_message, _line, _stream, coil_folder, coil_model  # noqa: F401

MILL = """
grades:
  - name: A
    max_periodic: {all: 0}
  - name: B
    max_per_100m: {all: 10000}
  - name: reject
"""
CUSTOMER = """
grades:
  - name: prime
    max_count: {1: 1000}
    zones: [{name: edges, edge_mm: 1, max_count: {all: 0}}]
  - name: second
"""


def test_a_coil_is_graded_at_close_and_regraded_by_another_file(coil_model, coil_folder, tmp_path,  # noqa: F811
                                                                capsys) -> None:
    from coils.line_folder import read_truth
    from server.cli import main
    from server.coil_wire import verdict_from_message

    (tmp_path / "mill.yaml").write_text(MILL)
    (tmp_path / "customer.yaml").write_text(CUSTOMER)
    (coil_id,) = {t.coil_id for t in read_truth(coil_folder)}
    with ServerThread(coil_model, line=_line(coil_folder), coil_db=f"sqlite:///{tmp_path}/coils.db",
                      grading=tmp_path / "mill.yaml") as server:
        run, _ = _stream(server.address, coil_folder)
        assert not run.coils.failed
        verdict = verdict_from_message(_get_coil_message(server.address, coil_id))
        capsys.readouterr()
        code = main(["coils", "grade", coil_id, "--grading", str(tmp_path / "customer.yaml"),
                     "--target", server.address])
    assert (verdict.grade, verdict.grade_rule) == ("B", "B: not A: all 1 periodic > 0")
    assert [p.roll for p in verdict.periodic] == ["work-roll"]
    out = capsys.readouterr().out
    assert code == 0
    assert f"coil {coil_id}: grade second by rule 'second: not prime: edges: all" in out
    assert "stored grade: B (B: not A: all 1 periodic > 0)" in out


def test_a_wrong_rule_file_stops_the_start_naming_the_key(coil_model, coil_folder, tmp_path) -> None:  # noqa: F811
    import asyncio

    from coils.grading import RuleError

    rules = tmp_path / "rules.yaml"
    rules.write_text("grades:\n  - {name: A, max_count: {rust: 0}}\n")

    async def start() -> None:
        async with running_server(coil_model, line=_line(coil_folder), grading=rules):
            pass

    with pytest.raises(RuleError, match=r"grades\[0\] \(A\)\.max_count\.rust: unknown class 'rust'"):
        asyncio.run(start())


def test_grading_and_opcua_flags_are_checked_before_the_start(tmp_path: Path) -> None:
    import argparse

    from server.config import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    (tmp_path / "rules.yaml").write_text("grades: [{name: A}]\n")
    with pytest.raises(ValueError, match="--grading needs --line"):
        config_from_args(parser.parse_args(["--grading", str(tmp_path / "rules.yaml")]))
    (tmp_path / "bad.yaml").write_text("grads: []\n")
    with pytest.raises(ValueError, match="unknown key 'grads'"):
        config_from_args(parser.parse_args(["--grading", str(tmp_path / "bad.yaml")]))
    line = tmp_path / "line.yaml"
    line.write_text("name: l\nstrip_width_mm: 100\ncameras:\n  - {camera_id: c, lane_start_mm: 0, mm_per_px_across: 1, "
                    "mm_per_px_along: 1, along_axis: y, frame_width_px: 100, frame_height_px: 10}\n")
    for flags, message in ((["--opcua-endpoint", "opc.tcp://127.0.0.1:4840"], "--opcua-endpoint needs --line"),
                           (["--line", str(line), "--opcua-endpoint", "http://x"], "must be an opc.tcp://"),
                           (["--line", str(line), "--opcua-endpoint", "opc.tcp://127.0.0.1:4840"],
                            "needs --opcua-users FILE"),
                           (["--line", str(line), "--opcua-endpoint", "opc.tcp://127.0.0.1:4840", "--opcua-anonymous",
                             "--opcua-cert", str(line)], "needs both a certificate"),
                           (["--line", str(line), "--opcua-endpoint", "opc.tcp://127.0.0.1:4840",
                             "--opcua-trusted-certs", str(tmp_path)], "--opcua-trusted-certs needs an encrypted"),
                           (["--line", str(line), "--opcua-endpoint", "opc.tcp://127.0.0.1:4840", "--opcua-cert",
                             str(line), "--opcua-key", str(line), "--opcua-trusted-certs", str(tmp_path / "none")],
                            "no such folder")):
        with pytest.raises(ValueError, match=message):
            config_from_args(parser.parse_args(flags))
    config = config_from_args(parser.parse_args(["--line", str(line), "--opcua-endpoint", "opc.tcp://127.0.0.1:4840",
                                                 "--opcua-anonymous"]))
    assert config.opcua_anonymous and config.opcua_users is None
