"""The fault test: 8 cameras x 300 frames through real nginx and three real ``server serve`` replicas
while replica 1 drains (SIGTERM), replica 2 dies (SIGKILL), replica 3 is alone for a few seconds, and
both come back. Every frame answered exactly once, in order, as a direct run answers it."""

from __future__ import annotations

import json

import pytest

from deploy.balanced import nginx_missing_reason


@pytest.mark.skipif(nginx_missing_reason() is not None, reason=str(nginx_missing_reason()))
def test_cameras_lose_nothing_while_replicas_drain_die_and_return(tiny_onnx, tmp_path):
    from benchmarks.failover import run_failover, summary_lines

    report = run_failover(tiny_onnx, cameras=8, per_camera=300, fps=25.0, alone_s=2.5, workdir=tmp_path)
    print("\n".join(summary_lines(report)))  # the figures, with -s or on failure
    (tmp_path / "failover.json").write_text(json.dumps(report, indent=2))
    f = report["failover"]
    assert f["fault_error"] is None, (f["fault_error"], report["replica_log_tail"])
    assert f["problem_count"] == 0 and f["lost"] == 0, (f["problems"], report["replica_log_tail"])
    assert f["answered"] == f["expected"] == 2400
    # The faults really happened during the run, with frames still to answer after them.
    events = [what for _, what in f["events"]]
    assert events[0].startswith("SIGTERM replica1") and events[-1].startswith("replica1 and replica2 ready")
    answered_at_return = int(events[-1].split(" at ")[1].split()[0])
    assert answered_at_return < f["expected"], "the run ended before the replicas came back"
    assert f["reconnects"] > 0 and f["sent"] == f["expected"] + f["resent"]
    assert f["drain_exit"] == 0 and f["final_exits"] == [0, 0, 0]
    assert report["direct"]["exit"] == 0 and report["balanced"]["problem_count"] == 0
    # nginx spread the streams over the replicas (per-call balancing) and saw the failures.
    access = (tmp_path / "nginx" / "access.log").read_text()
    assert len({line.split("upstream=")[1].split()[0] for line in access.splitlines() if "Inspect" in line}) >= 3
