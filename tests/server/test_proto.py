"""The committed gRPC code is what `make proto` generates, and the contract's names hold."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTOS = ("protos/inspection/v1/inspection.proto", "protos/inspection/v1/model_control.proto")
GENERATED = tuple(f"{Path(proto).stem}{end}" for proto in PROTOS for end in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"))
# The generator's own version stamps: a fresh install may bring a newer grpcio-tools patch release
# than the one that generated the committed code, which changes nothing in the contract.
STAMPS = (re.compile(r"GRPC_GENERATED_VERSION = '[^']*'"), re.compile(r"# Protobuf Python Version: \S+"),
          re.compile(r"(ValidateProtobufRuntimeVersion\(\s*_runtime_version\.Domain\.PUBLIC,)[\s\d,]*"))


def without_stamps(code: str) -> str:
    for stamp in STAMPS:
        code = stamp.sub(lambda m: (m.group(1) if m.groups() else "") + "<stamp>", code)
    return code


def test_generated_code_is_up_to_date(tmp_path: Path) -> None:
    # The same command as the Makefile's `proto` target, writing into a temporary tree.
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "-I", ".", f"--python_out={tmp_path}",
         f"--pyi_out={tmp_path}", f"--grpc_python_out={tmp_path}", *PROTOS],
        cwd=REPO, check=True, capture_output=True, text=True,
    )
    for name in GENERATED:
        fresh = (tmp_path / "protos/inspection/v1" / name).read_text()
        committed = (REPO / "protos/inspection/v1" / name).read_text()
        assert without_stamps(fresh) == without_stamps(committed), \
            f"protos/inspection/v1/{name} is stale: run `make proto` and commit the result"


def test_only_the_generator_stamps_are_ignored() -> None:
    committed = (REPO / "protos/inspection/v1/inspection_pb2_grpc.py").read_text()
    newer = committed.replace("GRPC_GENERATED_VERSION = '", "GRPC_GENERATED_VERSION = '9")
    assert newer != committed and without_stamps(newer) == without_stamps(committed)
    assert without_stamps(committed.replace("InspectOne", "InspectTwo")) != without_stamps(committed)


def test_contract_names_and_field_numbers() -> None:
    from protos.inspection.v1 import inspection_pb2 as pb

    service = pb.DESCRIPTOR.services_by_name["InspectionService"]
    assert pb.DESCRIPTOR.package == "inspection.v1"
    methods = {m.name: (m.client_streaming, m.server_streaming) for m in service.methods}
    assert methods == {
        "Inspect": (True, True), "InspectOne": (False, False), "GetModelInfo": (False, False),
        "GetLineStatus": (False, False), "GetLine": (False, False), "EndCoil": (False, False),
        "ListCoils": (False, False), "GetCoil": (False, False),
    }

    def numbers(message: type) -> dict[str, int]:
        return {f.name: f.number for f in message.DESCRIPTOR.fields}

    assert numbers(pb.RawImage) == {"width": 1, "height": 2, "channels": 3, "data": 4}
    assert numbers(pb.InspectRequest) == {
        "camera_id": 1, "frame_id": 2, "encoded_image": 3, "raw_image": 4, "captured_at_unix_ns": 5,
        "coil_id": 6, "position_mm": 7,
    }
    assert pb.InspectRequest.DESCRIPTOR.fields_by_name["position_mm"].has_presence  # 0 is the coil's head
    assert [f.name for f in pb.InspectRequest.DESCRIPTOR.oneofs_by_name["image"].fields] == [
        "encoded_image", "raw_image",
    ]
    assert numbers(pb.FrameError) == {"code": 1, "message": 2}
    assert numbers(pb.DefectResult) == {"class_id": 1, "present": 2, "pixel_count": 3, "rle": 4}
    response = numbers(pb.InspectResponse)
    assert response == {
        "camera_id": 1, "frame_id": 2, "error": 3, "defects": 4, "model_version": 5, "timings": 6,
    }
    assert numbers(pb.GetLineStatusRequest) == {"camera_id": 1}
    assert numbers(pb.DriftScore) == {
        "statistic": 1, "psi": 2, "ks": 3, "psi_over_threshold": 4, "ks_over_threshold": 5,
    }
    assert pb.DriftScore.DESCRIPTOR.fields_by_name["ks"].has_presence  # unset where KS does not fit
    assert numbers(pb.CameraDrift) == {
        "camera_id": 1, "frames_seen": 2, "window_fill": 3, "scored": 4, "scores": 5, "over_threshold": 6,
    }
    assert numbers(pb.CaptureStatus) == {
        "enabled": 1, "directory": 2, "policy": 3, "offered": 4, "selected": 5, "written": 6,
        "skipped_queue_full": 7, "skipped_quota": 8, "skipped_error": 9, "bytes_used": 10, "quota_bytes": 11,
        "queued": 12,
    }
    assert numbers(pb.LineStatus) == {
        "drift_enabled": 1, "drift_state": 2, "psi_threshold": 3, "ks_threshold": 4, "drift_window": 5,
        "drift_min_frames": 6, "statistics": 7, "cameras": 8, "capture": 9, "model_version": 10,
        "feedback_skipped_batches": 11, "cameras_tracked": 12, "cameras_omitted": 13, "coils": 14,
    }
    assert numbers(pb.CoilTrackingStatus) == {
        "enabled": 1, "db_state": 2, "spool_frames": 3, "spool_bytes": 4, "open_coils": 5, "frames_stored": 6,
        "late_frames": 7, "refused_frames": 8, "coils_closed": 9,
    }
    assert numbers(pb.EndCoilRequest) == {"coil_id": 1, "length_mm": 2}
    assert pb.EndCoilRequest.DESCRIPTOR.fields_by_name["length_mm"].has_presence
    assert numbers(pb.ListCoilsRequest) == {"page_size": 1, "page_token": 2}
    assert numbers(pb.ListCoilsResponse) == {"coils": 1, "next_page_token": 2}
    assert numbers(pb.GetCoilRequest) == {"coil_id": 1}
    assert numbers(pb.FrameRef) == {"camera_id": 1, "frame_id": 2}
    assert numbers(pb.DefectRecord) == {
        "coil_id": 1, "class_id": 2, "along_start_mm": 3, "along_end_mm": 4, "across_start_mm": 5,
        "across_end_mm": 6, "area_mm2": 7, "max_probability": 8, "frames": 9, "cameras": 10,
    }
    assert numbers(pb.ClassDefects) == {"class_id": 1, "defects": 2, "per_100m": 3}
    assert numbers(pb.CoilSummary) == {
        "coil_id": 1, "state": 2, "opened_unix_s": 3, "last_frame_unix_s": 4, "closed_unix_s": 5,
        "close_reason": 6, "length_mm": 7, "frames": 8, "late_frames": 9, "classes": 10, "largest": 11,
    }
    assert numbers(pb.Coil) == {"summary": 1, "records": 2, "periodic": 3, "grade": 4, "grade_rule": 5}
    assert numbers(pb.PeriodicDefect) == {
        "class_id": 1, "across_start_mm": 2, "across_end_mm": 3, "period_mm": 4, "confidence": 5, "first_mm": 6,
        "last_mm": 7, "count": 8, "roll": 9, "records": 10,
    }
    assert numbers(pb.Line) == {"name": 1, "strip_width_mm": 2, "cameras": 3, "rolls": 4}
    assert numbers(pb.CameraGeometry) == {
        "camera_id": 1, "lane_start_mm": 2, "mm_per_px_across": 3, "mm_per_px_along": 4, "along_axis": 5,
        "frame_width_px": 6, "frame_height_px": 7,
    }
    assert numbers(pb.Roll) == {"name": 1, "diameter_mm": 2}


@pytest.mark.parametrize("module", ["inspection_pb2", "inspection_pb2_grpc"])
def test_generated_modules_import_from_the_repo_package(module: str) -> None:
    # grpc_tools writes `from protos.inspection.v1 import inspection_pb2`; it must resolve to this repo.
    imported = __import__(f"protos.inspection.v1.{module}", fromlist=[module])
    assert Path(imported.__file__).resolve().parent == REPO / "protos/inspection/v1"


def test_proto_names_the_limits_a_camera_must_respect() -> None:
    # The bound and the size limit are server.config's; the proto comments name them and their values.
    from server.config import MAX_CAMERA_ID_BYTES, MAX_MESSAGE_BYTES

    text = (REPO / PROTOS[0]).read_text()
    assert f"At most {MAX_CAMERA_ID_BYTES} bytes of UTF-8 (server.config.MAX_CAMERA_ID_BYTES)" in text
    assert MAX_MESSAGE_BYTES == 16 * 1024 * 1024
    assert "server.config.MAX_MESSAGE_BYTES" in text and "16 MiB" in text
    assert "WHOLE STREAM ends" in text
