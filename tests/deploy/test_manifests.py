"""Every file under deploy/ parses, and the fields that matter agree with the server itself: probe
port and health service, drain time against the grace period, the model mount, and the metric
names the HPA and Prometheus use against a real server's /metrics."""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest
import tomllib
import yaml

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
DOCKERFILES = sorted((DEPLOY / "docker").glob("Dockerfile.*"))
INSTRUCTIONS = {"FROM", "RUN", "CMD", "LABEL", "EXPOSE", "ENV", "ADD", "COPY", "ENTRYPOINT", "VOLUME", "USER",
                "WORKDIR", "ARG", "ONBUILD", "STOPSIGNAL", "HEALTHCHECK", "SHELL"}


def serve_defaults() -> argparse.Namespace:
    """``server serve``'s own flag defaults (the one source of port, metrics port and drain time)."""
    from server import serve

    parser = argparse.ArgumentParser()
    serve.add_arguments(parser)
    return parser.parse_args(["--model", "m.onnx"])


def k8s_documents() -> dict[str, dict]:
    docs = {}
    for path in sorted((DEPLOY / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert {"apiVersion", "kind", "metadata"} <= doc.keys(), path
            docs[f"{doc['kind']}/{doc['metadata']['name']}"] = doc
    return docs


def container() -> dict:
    (c,) = k8s_documents()["Deployment/strip-inspection"]["spec"]["template"]["spec"]["containers"]
    return c


def flag(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def dockerfile(path: Path) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` per instruction, continuation lines joined."""
    instructions, pending = [], ""
    for line in path.read_text().splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            word, _, rest = pending.strip().partition(" ")
            assert word in INSTRUCTIONS, f"{path.name}: {word!r} is not a Dockerfile instruction"
            instructions.append((word, rest))
            pending = ""
    assert not pending, f"{path.name}: ends in a continuation"
    return instructions


def exec_form(text: str) -> list[str]:
    assert text.startswith("["), f"exec form expected (signals reach the server): {text}"
    return yaml.safe_load(text)


def test_probes_use_the_servers_health_service_and_port():
    from server.service import SERVICE_NAME

    c = container()
    defaults = serve_defaults()
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"grpc": defaults.port, "metrics": defaults.metrics_port}
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        grpc_probe = c[probe]["grpc"]
        assert grpc_probe["port"] == defaults.port, probe
        assert grpc_probe["service"] in ("", SERVICE_NAME), probe  # the two names the server's health sets
    assert c["readinessProbe"]["grpc"]["service"] == SERVICE_NAME


def test_grace_period_covers_prestop_and_the_drain():
    c = container()
    defaults = serve_defaults()
    drain = float(flag(c.get("args", []), "--grace") or defaults.grace)
    pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    pre_stop_s = float(pre_stop[1])
    grace_period = k8s_documents()["Deployment/strip-inspection"]["spec"]["template"]["spec"][
        "terminationGracePeriodSeconds"]
    assert grace_period > pre_stop_s + drain, (grace_period, pre_stop_s, drain)
    live = c["livenessProbe"]
    # NOT_SERVING while draining: liveness must not kill a drain before the grace period ends it.
    assert live["periodSeconds"] * live["failureThreshold"] >= grace_period


def test_selectors_budget_and_autoscaler_point_at_the_deployment():
    docs = k8s_documents()
    labels = docs["Deployment/strip-inspection"]["spec"]["template"]["metadata"]["labels"]
    for name in ("Service/strip-inspection", "Service/strip-inspection-headless"):
        assert docs[name]["spec"]["selector"].items() <= labels.items()
    assert docs["PodDisruptionBudget/strip-inspection"]["spec"]["selector"]["matchLabels"].items() <= labels.items()
    hpa = docs["HorizontalPodAutoscaler/strip-inspection"]["spec"]
    assert hpa["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "strip-inspection"}
    assert hpa["minReplicas"] >= 2  # the budget allows one down at a time


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfiles_serve_the_mounted_model(path: Path):
    defaults = serve_defaults()
    instructions = dockerfile(path)
    assert instructions[0][0] == "FROM"
    if path.name.endswith(".gpu"):
        assert re.fullmatch(r"nvcr\.io/nvidia/tensorrt:\d\d\.\d\d-py3", instructions[0][1])
    for word, rest in instructions:
        if word == "COPY":
            for source in rest.split()[:-1]:
                assert (REPO / source).exists(), f"{path.name}: COPY {source}: no such path"
    entry = exec_form(next(rest for word, rest in instructions if word == "ENTRYPOINT"))
    cmd = exec_form(next(rest for word, rest in instructions if word == "CMD"))
    assert entry[:2] == ["server", "serve"] and flag(entry, "--bind") == "0.0.0.0"
    exposed = {int(p) for word, rest in instructions if word == "EXPOSE" for p in rest.split()}
    assert {int(flag(entry, "--port")), int(flag(entry, "--metrics-port"))} == exposed
    assert int(flag(entry, "--port")) == defaults.port
    mount = next(m["mountPath"] for m in container()["volumeMounts"] if m["name"] == "models")
    assert Path(flag(cmd, "--model")).parent == Path(mount)  # the model is mounted, not baked in
    assert Path(flag(container()["args"], "--model")).parent == Path(mount)


def test_dockerfiles_install_extras_that_exist():
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for path in DOCKERFILES:
        runs = " ".join(rest for word, rest in dockerfile(path) if word == "RUN")
        (spec,) = re.findall(r"'\.\[([a-z,]+)\]'", runs)
        missing = [e for e in spec.split(",") if e not in extras]
        if missing == ["serve"]:
            pytest.skip("pyproject has no 'serve' extra yet: issue 15 (arch branch) splits it out")
        assert not missing, f"{path.name}: pyproject has no extra {missing}"


@pytest.fixture(scope="module")
def live_metric_names(tiny_onnx) -> set[str]:
    """The sample names a real server's /metrics exports, after one answered frame."""
    from prometheus_client.parser import text_string_to_metric_families

    from protos.inspection.v1 import inspection_pb2_grpc as pb_grpc
    from tests.server.conftest import running_server
    from tests.server.test_service import make_request

    async def scrape() -> str:
        import grpc
        import numpy as np

        async with running_server(tiny_onnx, metrics_port=0) as server:
            async with grpc.aio.insecure_channel(server.address) as channel:
                await pb_grpc.InspectionServiceStub(channel).InspectOne(
                    make_request("cam0", 0, np.zeros((64, 320), np.uint8), "gray8"))
            url = f"http://127.0.0.1:{server.metrics_port}/metrics"
            return await asyncio.to_thread(lambda: urllib.request.urlopen(url, timeout=10).read().decode())

    text = asyncio.run(scrape())
    return {s.name for family in text_string_to_metric_families(text) for s in family.samples}


def test_autoscaler_metric_is_exported(live_metric_names):
    docs = k8s_documents()
    (metric,) = docs["HorizontalPodAutoscaler/strip-inspection"]["spec"]["metrics"]
    assert metric["type"] == "Pods"
    name = metric["pods"]["metric"]["name"]
    assert name in live_metric_names, sorted(live_metric_names)
    rules = yaml.safe_load(docs["ConfigMap/prometheus-adapter-strip-inspection"]["data"]["config.yaml"])["rules"]
    (rule,) = [r for r in rules if r["name"]["as"] == name]
    assert re.match(r"[a-z_]+", rule["seriesQuery"]).group(0) in live_metric_names
    assert re.fullmatch(rule["name"]["matches"], rule["seriesQuery"].split("{")[0])


def test_prometheus_configs_keep_every_series_the_server_exports(live_metric_names):
    inspection = {n for n in live_metric_names if n.startswith("inspection_")}
    assert "inspection_inflight_frames" in inspection and "inspection_frames_total" in inspection
    for name in ("prometheus.yml", "prometheus-local.yml"):
        config = yaml.safe_load((DEPLOY / "prometheus" / name).read_text())
        for job in config["scrape_configs"]:
            keeps = [r for r in job.get("metric_relabel_configs", []) if r.get("action") == "keep"]
            for rule in keeps:
                assert rule["source_labels"] == ["__name__"]
                dropped = [n for n in inspection if not re.fullmatch(rule["regex"], n)]
                assert not dropped, (name, job["job_name"], dropped)
        # Both load the alert rules, whose scrape-down alert names the job.
        assert config["rule_files"] == ["alerts.yml"] and (DEPLOY / "prometheus" / "alerts.yml").is_file()
        alert_jobs = set(re.findall(r'job="([^"]+)"', (DEPLOY / "prometheus" / "alerts.yml").read_text()))
        assert alert_jobs and alert_jobs <= {job["job_name"] for job in config["scrape_configs"]}, name
    jobs = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())["scrape_configs"]
    annotations = k8s_documents()["Deployment/strip-inspection"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(serve_defaults().metrics_port)
    assert any(r.get("regex") == "strip-inspection" for r in jobs[0]["relabel_configs"])


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_accepts_the_local_scrape_config():
    path = DEPLOY / "prometheus" / "prometheus-local.yml"
    check = subprocess.run(["promtool", "check", "config", str(path)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    ports = {int(t.rsplit(":", 1)[1]) for job in yaml.safe_load(path.read_text())["scrape_configs"]
             for s in job["static_configs"] for t in s["targets"]}
    from deploy.balanced import build_parser  # the local set-up's metrics ports are the ones scraped

    assert ports == {int(p) for p in build_parser().get_default("metrics_ports").split(",")}
