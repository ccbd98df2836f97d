"""Coil tracking through a real server (``--coil-db`` on a SQLite file): a simulated coil streamed by the
camera library, ended, read back against the planted truth and against the server's own answers;
resends, late frames, the coil RPCs' errors and ``server coils``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import grpc
import pytest

from tests.server.coil_line import answered_records, grey_bands_onnx, make_coil_line, record_key
from tests.server.conftest import ServerThread, metric_samples, running_server

HEIGHT, WIDTH = 32, 128


@pytest.fixture(scope="module")
def coil_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return grey_bands_onnx(tmp_path_factory.mktemp("grey_bands") / "model.onnx", HEIGHT, WIDTH)


@pytest.fixture(scope="module")
def coil_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One coil of 2 cameras x 200 frames, painted so that the grey-bands model finds the planted defects."""
    folder = tmp_path_factory.mktemp("coil") / "line"
    make_coil_line(folder, frames=200, height=HEIGHT, width=WIDTH)
    return folder


def _line(folder: Path):
    from coils.line import load_line
    from coils.line_folder import LINE_FILE

    return load_line(folder / LINE_FILE)


def _stub(address: str):
    from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc

    return pb_grpc.InspectionServiceStub(grpc.aio.insecure_channel(address))


def _stream(address: str, folder: Path):
    from client.coil_end import coil_lengths
    from client.stream_folder import line_shots, run_cameras

    shots = line_shots(folder)
    run = asyncio.run(run_cameras(address, [], shots=shots, coil_lengths=coil_lengths(folder, shots), fps=0))
    return run, shots


def _get_coil_message(address: str, coil_id: str):
    from protos.inspection.v1 import inspection_pb2 as pb

    async def get():
        async with grpc.aio.insecure_channel(address) as channel:
            from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc

            return await pb_grpc.InspectionServiceStub(channel).GetCoil(pb.GetCoilRequest(coil_id=coil_id))

    return asyncio.run(get())


def _get_coil(address: str, coil_id: str):
    from server.coil_wire import record_from_message, summary_from_message

    coil = _get_coil_message(address, coil_id)
    return summary_from_message(coil.summary), [record_from_message(r) for r in coil.records]


def _assert_matches_truth(records, truth, pixel_mm: float) -> None:
    """Every planted defect is exactly one record at its planted place (within one pixel), and no
    record is left over; crossing defects came from several frames or lanes."""
    assert len(records) == len(truth)
    used = set()
    for planted in truth:
        matches = [i for i, r in enumerate(records) if r.class_id == planted.class_id
                   and abs(r.along_start_mm - planted.along_start_mm) <= pixel_mm
                   and abs(r.along_end_mm - planted.along_end_mm) <= pixel_mm
                   and abs(r.across_start_mm - planted.across_start_mm) <= pixel_mm
                   and abs(r.across_end_mm - planted.across_end_mm) <= pixel_mm]
        assert len(matches) == 1, f"planted {planted}: {len(matches)} records"
        record = records[matches[0]]
        used.add(matches[0])
        assert record.area_mm2 == pytest.approx(planted.area_mm2)
        if planted.kind in ("boundary", "both", "long"):
            assert len({frame for _, frame in record.frames}) > 1, planted
        if planted.kind in ("lane", "both"):
            assert len(record.cameras) == 2, planted
    assert len(used) == len(records)


def test_a_streamed_coil_is_one_record_per_planted_defect(coil_model, coil_folder, tmp_path, capsys):
    """2 cameras x 200 frames through a real server (the grey-bands inspection graph on the real
    backend), EndCoil by the camera side, then GetCoil against the truth and against the records
    the test merges itself from the server's per-frame answers; ``server coils`` reads it back."""
    from prometheus_client import generate_latest

    from coils.line_folder import read_truth
    from server.cli import main
    from server.coil_wire import verdict_from_message

    line = _line(coil_folder)
    truth = read_truth(coil_folder)
    assert {t.kind for t in truth} >= {"boundary", "lane", "both", "long", "roll_mark", "plain"}
    with ServerThread(coil_model, line=line, coil_db=f"sqlite:///{tmp_path}/coils.db") as server:
        run, shots = _stream(server.address, coil_folder)
        assert not run.unanswered and not run.failed and len(run.answers) == 400
        (coil_id,) = {t.coil_id for t in truth}
        assert not run.coils.failed and set(run.coils.summaries) == {coil_id}
        summary, records = _get_coil(server.address, coil_id)
        verdict = verdict_from_message(_get_coil_message(server.address, coil_id))
        status = server.line_status()
        counted = metric_samples(generate_latest(server.metrics.registry).decode())
        cli = {action: main(["coils", action, "--target", server.address, *extra]) for action, extra in (
            ("list", []), ("show", [coil_id]),
            ("export", [coil_id, "--format", "csv", "--out", str(tmp_path / "records.csv")]),
            ("export", [coil_id, "--format", "json", "--out", str(tmp_path / "records.json")]),
            ("map", [coil_id, "--out", str(tmp_path / "map.svg")]))}
    _assert_matches_truth(records, truth, pixel_mm=line.cameras[0].mm_per_px_along)
    # The server's records are the test's own merge of the server's per-frame answers.
    assert sorted(map(record_key, records)) == sorted(map(record_key, answered_records(line, run.answers, shots)))
    assert summary.state == "closed" and summary.close_reason == "end" and summary.frames == 400
    assert summary.length_mm == pytest.approx(200 * HEIGHT * line.cameras[0].mm_per_px_along)
    assert summary.defects_per_class == {k: sum(t.class_id == k for t in truth) for k in {t.class_id for t in truth}}
    assert status.coils.enabled and status.coils.db_state == "ok" and status.coils.frames_stored == 400
    assert status.coils.spool_frames == 0 and status.coils.coils_closed == 1 and status.coils.open_coils == 0
    assert counted[("inspection_coil_frames_stored_total", ())] == 400
    assert counted[("inspection_coil_close_seconds_count", ())] == 1
    assert cli == {"list": 0, "show": 0, "export": 0, "map": 0}
    out = capsys.readouterr().out
    assert coil_id in out and "closed (end)" in out and f"{len(records)} defect records" in out
    exported = (tmp_path / "records.csv").read_text().splitlines()
    assert len(exported) == len(records) + 1 and exported[0].startswith("coil_id,class_id,along_start_mm")
    data = json.loads((tmp_path / "records.json").read_text())
    assert len(data["records"]) == len(records) and data["summary"]["coil_id"] == coil_id
    assert (tmp_path / "map.svg").read_text().lstrip().startswith(("<svg", "<?xml"))
    _assert_roll_mark_found(line, truth, records, verdict)
    assert 'class="periodic"' in (tmp_path / "map.svg").read_text() and "periodic: class 1 every" in out


def _assert_roll_mark_found(line, truth, records, verdict) -> None:
    """GetCoil's periodic defect is the planted roll mark: its records, its roll, its period within 1 %."""
    [mark] = verdict.periodic
    roll = line.rolls[0]
    assert mark.roll == roll.name and abs(mark.period_mm - roll.circumference_mm) < 0.01 * roll.circumference_mm
    planted = sorted(t.along_start_mm for t in truth if t.kind == "roll_mark")
    assert sorted(records[i].along_start_mm for i in mark.records) == pytest.approx(planted, abs=1.0)


def _requests(folder: Path, frames: list[tuple[str, int]] | None = None):
    """InspectRequests of a line folder's frames (all, or the listed ``(camera, frame id)``s), in order."""
    from client.stream_folder import line_shots, make_request

    shots = line_shots(folder)
    return [make_request(camera_id, s.frame_id, s.path, False, s.coil_id, s.position_mm)
            for camera_id, listed in shots.items() for s in listed
            if frames is None or (camera_id, s.frame_id) in frames]


async def _inspect(stub, requests) -> list:
    answers = [a async for a in stub.Inspect(iter(requests))]
    assert all(not a.HasField("error") for a in answers), [a.error.message for a in answers]
    return answers


def test_resent_frames_do_not_double_records_and_late_frames_are_kept(coil_model, tmp_path):
    """A frame sent again (same camera, coil and frame id) changes nothing, before EndCoil and after
    it; a new frame after EndCoil is answered, kept and reported late, the records unchanged."""
    from coils.line_folder import read_truth
    from protos.inspection.v1 import inspection_pb2 as pb

    folder = tmp_path / "line"
    make_coil_line(folder, frames=8, height=HEIGHT, width=WIDTH, seed=3)
    line = _line(folder)
    (coil_id,) = {t.coil_id for t in read_truth(folder)}
    requests = _requests(folder)

    async def main():
        async with running_server(coil_model, line=line, coil_db=f"sqlite:///{tmp_path}/coils.db") as server:
            stub = _stub(server.address)
            await _inspect(stub, requests)
            await _inspect(stub, requests[3:9])  # a camera resending after a reconnect
            before = await stub.GetCoil(pb.GetCoilRequest(coil_id=coil_id))  # open: merged on read
            ended = await stub.EndCoil(pb.EndCoilRequest(coil_id=coil_id))
            again = await stub.EndCoil(pb.EndCoilRequest(coil_id=coil_id, length_mm=1.0))  # idempotent
            await _inspect(stub, requests[:2])  # resent after the end: already stored, nothing changes
            late = pb.InspectRequest()
            late.CopyFrom(requests[0])
            late.frame_id, late.position_mm = 1000, 8 * HEIGHT * 0.5
            await _inspect(stub, [late])
            after = await stub.GetCoil(pb.GetCoilRequest(coil_id=coil_id))
            return before, ended, again, after, server.line_status().coils

    before, ended, again, after, status = asyncio.run(main())
    assert before.summary.state == "open" and before.summary.frames == len(requests) == 16
    assert ended.state == "closed" and ended.frames == 16 and ended.late_frames == 0
    assert again == ended  # closing a closed coil returns its stored summary
    assert after.summary.late_frames == 1 and after.summary.frames == 16
    assert [record_key(r) for r in before.records] == [record_key(r) for r in after.records] != []
    assert status.late_frames == 1


def test_coil_rpc_errors(coil_model, tmp_path):
    """NOT_FOUND for an unknown coil, INVALID_ARGUMENT for a bad request or a camera not on the line,
    FAILED_PRECONDITION on a server without --coil-db; ListCoils pages newest first."""
    from protos.inspection.v1 import inspection_pb2 as pb

    folder = tmp_path / "line"
    make_coil_line(folder, frames=4, height=HEIGHT, width=WIDTH)
    line = _line(folder)
    requests = _requests(folder)

    async def codes(stub) -> dict[str, grpc.StatusCode]:
        found = {}
        for name, call in (("end", stub.EndCoil(pb.EndCoilRequest(coil_id="nope"))),
                           ("get", stub.GetCoil(pb.GetCoilRequest(coil_id="nope"))),
                           ("list", stub.ListCoils(pb.ListCoilsRequest())),
                           ("empty", stub.EndCoil(pb.EndCoilRequest())),
                           ("length", stub.EndCoil(pb.EndCoilRequest(coil_id="c", length_mm=-1))),
                           ("token", stub.ListCoils(pb.ListCoilsRequest(page_token="x")))):
            try:
                await call
                found[name] = grpc.StatusCode.OK
            except grpc.aio.AioRpcError as exc:
                found[name] = exc.code()
        return found

    async def main():
        async with running_server(coil_model, line=line, coil_db=f"sqlite:///{tmp_path}/coils.db") as server:
            stub = _stub(server.address)
            tracked = await codes(stub)
            for n, coil in enumerate(("a", "b", "c")):
                request = pb.InspectRequest()
                request.CopyFrom(requests[0])
                request.coil_id, request.frame_id = coil, n
                await _inspect(stub, [request])
            first = await stub.ListCoils(pb.ListCoilsRequest(page_size=2))
            rest = await stub.ListCoils(pb.ListCoilsRequest(page_size=2, page_token=first.next_page_token))
            stranger = pb.InspectRequest()
            stranger.CopyFrom(requests[0])
            stranger.camera_id = "cam9"
            (unknown,) = [a async for a in stub.Inspect(iter([stranger]))]
        async with running_server(coil_model, line=line) as plain:  # a line, but no --coil-db
            untracked = await codes(_stub(plain.address))
        return tracked, first, rest, unknown, untracked

    tracked, first, rest, unknown, untracked = asyncio.run(main())
    assert tracked == {"end": grpc.StatusCode.NOT_FOUND, "get": grpc.StatusCode.NOT_FOUND, "list": grpc.StatusCode.OK,
                       "empty": grpc.StatusCode.INVALID_ARGUMENT, "length": grpc.StatusCode.INVALID_ARGUMENT,
                       "token": grpc.StatusCode.INVALID_ARGUMENT}
    assert [c.coil_id for c in first.coils] == ["c", "b"] and first.next_page_token
    assert [c.coil_id for c in rest.coils] == ["a"] and not rest.next_page_token
    assert unknown.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "camera 'cam9' is not in the line description" in unknown.error.message
    assert set(untracked.values()) == {grpc.StatusCode.FAILED_PRECONDITION}


def test_serve_refuses_coil_flags_it_cannot_use(tmp_path):
    """``server serve``'s coil flags are checked before anything starts, each error naming its flag."""
    import argparse

    from server.config import add_arguments, config_from_args

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    make_coil_line(tmp_path / "line", frames=4, height=HEIGHT, width=WIDTH)
    line = ["--line", str(tmp_path / "line" / "line.yaml")]
    sqlite = ["--coil-db", f"sqlite:///{tmp_path}/c.db"]
    for flags, message in (
            (sqlite, "--coil-db needs --line"),
            ([*line, "--coil-db", "postgresql://u@127.0.0.1:1/db"], "--coil-spool DIR is needed"),
            ([*line, "--coil-spool", str(tmp_path / "spool")], "--coil-spool needs --coil-db"),
            ([*line, *sqlite, "--coil-silence-s", "0"], "--coil-silence-s"),
            ([*line, *sqlite, "--coil-spool-mb", "-1"], "--coil-spool-mb")):
        with pytest.raises(ValueError, match=message):
            config_from_args(parser.parse_args(flags))
    config = config_from_args(parser.parse_args([*line, *sqlite]))
    assert config.coil_tracking().spool_dir == tmp_path / "c.db.spool"
