"""deploy/grafana/inspection-dashboard.json and deploy/prometheus/alerts.yml against a running server.

Every metric name their PromQL uses must be a series on a real server's ``/metrics`` (one serving
the tiny drift-monitored model with capture on, after frames of two cameras, an error among them,
so that every labelled family has samples). Histogram and counter series are named as PromQL sees
them (``_bucket``/``_sum``/``_count``, ``_total``). The rules also go through ``promtool check rules``.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from protos.inspection.v1 import inspection_pb2 as pb
from tests.server.conftest import running_server, wait_until
from tests.server.test_console import stream_camera

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "inspection-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
#: Series Prometheus makes itself, not the server.
PROMETHEUS_SERIES = {"up"}
PROMQL_FUNCTIONS = {"rate", "increase", "sum", "max", "min", "avg", "by", "histogram_quantile", "and", "or",
                    "on", "without", "le", "instance", "job", "status", "camera", "statistic", "score", "outcome"}


def dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    queries += [v["query"]["query"] for v in dashboard["templating"]["list"] if isinstance(v.get("query"), dict)]
    return queries


def alert_queries() -> list[str]:
    rules = yaml.safe_load(ALERTS.read_text())
    return [rule["expr"] for group in rules["groups"] for rule in group["rules"]]


def metric_names(query: str) -> set[str]:
    """The series names a PromQL expression selects: identifiers outside strings, braces and
    grouping clauses, that are not functions or keywords."""
    text = re.sub(r'"[^"]*"', '""', query)  # label values
    text = re.sub(r"\{[^}]*\}", "", text)  # label matchers
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)  # range selectors
    names = set(re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", text))
    return {n for n in names if n not in PROMQL_FUNCTIONS and not n.startswith("label_values")}


def test_metric_name_extraction() -> None:
    assert metric_names('sum by (le) (rate(inspection_total_seconds_bucket{instance=~"$i"}[5m]))') == {
        "inspection_total_seconds_bucket"}
    assert metric_names("inspection_capture_quota_bytes > 0 and inspection_capture_bytes / x_y > 0.9") == {
        "inspection_capture_quota_bytes", "inspection_capture_bytes", "x_y"}


def served_series(model: Path, capture_dir: Path, camera_frames) -> set[str]:
    """Sample names on the /metrics of a server that has answered frames of two cameras and a bad one."""
    from server.capture import CaptureConfig, CapturePolicy

    async def main() -> str:
        config = {"metrics_port": 0, "max_batch": 4, "drift_window": 10, "drift_min_frames": 5,
                  "capture": CaptureConfig(capture_dir, policy=CapturePolicy.parse("sample:1.0"))}
        async with running_server(model, **config) as server:
            for camera in ("cam-a", "cam-b"):
                await stream_camera(server, camera, camera_frames[:8])
            import grpc

            from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc

            async with grpc.aio.insecure_channel(server.address) as channel:
                bad = pb.InspectRequest(camera_id="cam-a", frame_id=99, encoded_image=b"not an image")
                answer = await pb_grpc.InspectionServiceStub(channel).InspectOne(bad)
                assert answer.HasField("error")
            await wait_until(lambda: server.line_status().capture.written == 16, timeout=30,
                             what="the capture writer to save the frames")
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            return await asyncio.get_running_loop().run_in_executor(
                None, lambda: urllib.request.urlopen(url, timeout=10).read().decode())

    text = asyncio.run(main())
    samples = {sample.name: sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if not sample.labels}
    # The two gauges the alerts add: health SERVING, and the in-flight bound (ServerConfig's default).
    assert samples["inspection_serving"] == 1 and samples["inspection_inflight_limit"] == 256
    return {sample.name for family in text_string_to_metric_families(text) for sample in family.samples}


def test_dashboard_and_alerts_use_only_served_metrics(drift_onnx, camera_frames, tmp_path) -> None:
    served = served_series(drift_onnx, tmp_path / "captures", camera_frames)
    used: dict[str, set[str]] = {}
    for source, queries in (("dashboard", dashboard_queries()), ("alerts", alert_queries())):
        for query in queries:
            for name in metric_names(query):
                used.setdefault(name, set()).add(source)
    missing = {name: sorted(sources) for name, sources in used.items()
               if name not in served and name not in PROMETHEUS_SERIES}
    assert not missing, f"metrics used but not on a running server's /metrics: {missing}"
    # What the issue asks the two files to cover, by the series they must read.
    for name in ("inspection_frames_total", "inspection_total_seconds_bucket", "inspection_batch_size_bucket",
                 "inspection_inflight_frames", "inspection_drift_score", "inspection_capture_total"):
        assert "dashboard" in used.get(name, set()), name
    for name in ("inspection_drift_over_threshold", "inspection_frames_total", "inspection_inflight_limit",
                 "inspection_serving", "inspection_capture_bytes", "inspection_capture_quota_bytes"):
        assert "alerts" in used.get(name, set()), name


@pytest.mark.skipif(shutil.which("promtool") is None,
                    reason="promtool is not installed (Debian package prometheus; .ci/run installs it)")
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(["promtool", "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_queries())} rules found" in result.stdout


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"])
        assert panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
