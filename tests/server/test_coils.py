"""The coil fields of a frame (``coil_id``, ``position_mm``), ``GetLine`` and ``server serve --line``."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path

import grpc

from coils.line import Line, write_line
from protos.inspection.v1 import inspection_pb2 as pb
from server.config import MAX_COIL_ID_BYTES
from tests.server.conftest import FRAME_SIZE, metric_samples, running_server
from tests.server.test_hardening import raw_inspect
from tests.server.test_service import assert_equals_direct, make_request, stub_for

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT.value[0]


def tiny_line() -> Line:
    """Two cameras of the tiny model's 64 x 320 frames at 1 mm/px, overlapping by 32 mm, and one roll."""
    height, width = FRAME_SIZE
    cameras = [{"camera_id": f"cam{c}", "lane_start_mm": c * (width - 32.0), "mm_per_px_across": 1.0,
                "mm_per_px_along": 1.0, "along_axis": "y", "frame_width_px": width, "frame_height_px": height}
               for c in range(2)]
    return Line.from_dict({"name": "tiny", "strip_width_mm": 2 * width - 32.0, "cameras": cameras,
                           "rolls": [{"name": "work-roll", "diameter_mm": 100.0}]})


def test_get_line_returns_the_line_and_says_when_there_is_none(defect_onnx) -> None:
    async def main():
        answers = []
        for line in (tiny_line(), None):
            async with running_server(defect_onnx, line=line) as server:
                channel, stub = stub_for(server)
                async with channel:
                    try:
                        answers.append(await stub.GetLine(pb.GetLineRequest()))
                    except grpc.aio.AioRpcError as exc:
                        answers.append(exc)
        return answers

    given, missing = asyncio.run(main())
    assert given.name == "tiny" and given.strip_width_mm == 608
    assert [(c.camera_id, c.lane_start_mm, c.along_axis, c.frame_width_px, c.frame_height_px)
            for c in given.cameras] == [("cam0", 0, "y", 320, 64), ("cam1", 288, "y", 320, 64)]
    assert [(r.name, r.diameter_mm) for r in given.rolls] == [("work-roll", 100)]
    assert missing.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "started without a line description (server serve --line" in missing.details()


def coil_request(frame_id: int, frame, coil_id: str | None = None, position_mm: float | None = None):
    request = make_request("cam0", frame_id, frame, "gray8")
    if coil_id is not None:
        request.coil_id = coil_id
    if position_mm is not None:
        request.position_mm = position_mm
    return request


def test_coil_fields_are_checked_per_frame_and_change_no_answer(defect_onnx, camera_frames, direct_output) -> None:
    cases = [  # (coil_id, position_mm, what the error says; None: answered as without them)
        (None, None, None), ("C-1", 0.0, None), ("C-1", 64.0, None),
        ("C-1", None, "coil_id 'C-1' is given without position_mm"),
        (None, 12.5, "position_mm (12.5) is given without a coil_id"),
        ("C-1", -1.0, "position_mm must be a finite number of millimetres >= 0"),
        ("C-1", math.nan, "position_mm must be a finite number"),
        ("x" * (MAX_COIL_ID_BYTES + 1), 0.0, f"is over {MAX_COIL_ID_BYTES} bytes of UTF-8"),
    ]
    requests = [coil_request(i, camera_frames[i], coil, position) for i, (coil, position, _) in enumerate(cases)]

    async def main():
        async with running_server(defect_onnx, metrics_port=0) as server:
            channel, stub = stub_for(server)
            async with channel:
                answers = [a async for a in stub.Inspect(iter(requests))]
            import urllib.request

            text = urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics", timeout=10).read()
            return answers, metric_samples(text.decode())

    answers, metrics = asyncio.run(main())
    assert [a.frame_id for a in answers] == list(range(len(cases)))
    for i, (answer, (_, _, problem)) in enumerate(zip(answers, cases)):
        if problem is None:
            assert_equals_direct(answer, direct_output, i)
        else:
            assert answer.error.code == INVALID_ARGUMENT and answer.camera_id == "cam0"
            assert problem in answer.error.message and answer.error.message.startswith(f"camera 'cam0' frame {i}: ")
    assert metrics[("inspection_coil_frames_total", ())] == 2


def test_a_coil_id_that_is_not_utf8_fails_its_frame_and_the_stream_goes_on(defect_onnx, camera_frames,
                                                                           direct_output) -> None:
    bad = coil_request(1, camera_frames[1], "coil", 5.0).SerializeToString()
    bad = bad.replace(b"\x32\x04coil", b"\x32\x05\xff\xfecoi", 1)  # field 6: not UTF-8
    messages = [coil_request(0, camera_frames[0], "coil", 0.0).SerializeToString(), bad,
                coil_request(2, camera_frames[2], "coil", 128.0).SerializeToString()]

    async def main():
        async with running_server(defect_onnx) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                async def frames():
                    for data in messages:
                        yield data

                return [r async for r in raw_inspect(channel)(frames())]

    answers = asyncio.run(main())
    assert [a.frame_id for a in answers] == [0, 1, 2]
    assert_equals_direct(answers[0], direct_output, 0)
    assert_equals_direct(answers[2], direct_output, 2)
    refused = answers[1]
    assert refused.error.code == INVALID_ARGUMENT and refused.camera_id == "cam0"  # the camera's own id: it is valid
    assert "coil_id b'\\xff\\xfecoi' is not valid UTF-8" in refused.error.message, refused.error.message


def test_serve_refuses_a_bad_line_file_before_it_listens(defect_onnx, tmp_path: Path, capsys) -> None:
    from server.cli import main

    good = write_line(tmp_path / "line.yaml", tiny_line())
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("along_axis: y", "along_axis: z", 1))
    for line, expected in ((bad, f"{bad}: cameras[0] (camera 'cam0'): along_axis must be 'x' or 'y', got 'z'"),
                           (tmp_path / "missing.yaml", "no such line description file")):
        code = main(["serve", "--model", str(defect_onnx), "--port", "0", "--metrics-port", "-1", "--line", str(line)])
        err = capsys.readouterr().err
        assert code == 2 and "server serve: error: " in err and expected in err, err
        assert "Traceback" not in err


def test_the_line_flag_loads_the_file_into_the_config(tmp_path: Path) -> None:
    import argparse

    from server.config import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    path = write_line(tmp_path / "line.yaml", tiny_line())
    assert config_from_args(parser.parse_args(["--line", str(path)])).line == tiny_line()
    assert config_from_args(parser.parse_args([])).line is None


def test_the_proto_names_the_coil_id_bound() -> None:
    text = (Path(__file__).resolve().parents[2] / "protos/inspection/v1/inspection.proto").read_text()
    assert f"At most {MAX_COIL_ID_BYTES} bytes of UTF-8\n  // (client.wire.MAX_COIL_ID_BYTES)" in text
