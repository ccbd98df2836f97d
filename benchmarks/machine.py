"""What a measurement ran on: CPU, GPU, memory, library versions, commit and load.

Every figure ``bench`` writes carries this description, so a table in RESULTS.md can be traced
to the machine, the code and how busy the machine was when it was taken.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from engine.cpu import usable_cpus

REPO_ROOT = Path(__file__).resolve().parent.parent

# Libraries whose version changes the figures -> the distributions that provide them (first
# installed one wins). Read from package metadata: importing torch just to print its version would
# cost seconds.
LIBRARIES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "onnxruntime": ("onnxruntime", "onnxruntime-gpu"),
    "tensorrt": ("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-libs"),
    "numpy": ("numpy",),
    "opencv": ("opencv-python-headless", "opencv-python"),
    "segmentation_models_pytorch": ("segmentation-models-pytorch", "segmentation_models_pytorch"),
    "onnx": ("onnx",),
    "grpcio": ("grpcio",),
}


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux, else ``platform.processor()``)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except (OSError, ValueError):
        pass
    return None


def load_average() -> list[float] | None:
    """1, 5 and 15 minute load averages: how busy the (shared) machine was."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return None


def library_versions() -> dict[str, str | None]:
    """``{library: version}``; None for a library that is not installed."""
    versions: dict[str, str | None] = {}
    for name, distributions in LIBRARIES.items():
        versions[name] = None
        for dist in distributions:
            try:
                version = metadata.version(dist)
            except metadata.PackageNotFoundError:
                continue
            # Say which distribution when it is not the usual one (onnxruntime-gpu, tensorrt-cu12...).
            versions[name] = version if dist == distributions[0] else f"{version} ({dist})"
            break
    return versions


def _nvidia_smi_gpus() -> list[dict[str, Any]]:
    try:
        done = subprocess.run(
            ["nvidia-smi", "--query-gpu=index,name,compute_cap,memory.total", "--format=csv,noheader,nounits"],
            capture_output=True, text=True, timeout=20, check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return []
    out = []
    for line in done.stdout.strip().splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4:
            memory = float(parts[3]) / 1024 if parts[3].replace(".", "").isdigit() else None
            out.append({"index": int(parts[0]), "name": parts[1], "compute_capability": parts[2],
                        "memory_gib": None if memory is None else round(memory, 1)})
    return out


def gpus() -> list[dict[str, Any]]:
    """CUDA devices (name, compute capability, memory); empty without CUDA.

    Asks torch when this process has already imported it, else ``nvidia-smi``, so describing the
    machine never costs a torch import.
    """
    torch = sys.modules.get("torch")
    if torch is None:
        return _nvidia_smi_gpus()
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(i)
        out.append(
            {
                "index": i,
                "name": props.name,
                "compute_capability": f"{props.major}.{props.minor}",
                "memory_gib": round(props.total_memory / 2**30, 1),
                "multiprocessors": props.multi_processor_count,
            }
        )
    return out


def git_commit(repo: Path = REPO_ROOT) -> dict[str, Any]:
    """The checked-out commit and whether the working tree differs from it."""

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "-C", str(repo), *args], capture_output=True, text=True, timeout=10, check=True
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def describe_machine() -> dict[str, Any]:
    """The machine description stored with every benchmark result."""
    return {
        "date_utc": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cpus_usable": usable_cpus(),
        "cpus_total": os.cpu_count(),
        "memory_gib": memory_gib(),
        "load_average": load_average(),
        "gpus": gpus(),
        "libraries": library_versions(),
        "git": git_commit(),
    }


def machine_summary(machine: dict[str, Any]) -> str:
    """One line for a report heading: CPU, cores, GPU, commit."""
    gpu = ", ".join(g["name"] for g in machine.get("gpus") or []) or "no GPU"
    git = machine.get("git") or {}
    commit = (git.get("commit") or "unknown")[:10] + ("+dirty" if git.get("dirty") else "")
    load = machine.get("load_average")
    load_text = f", load {load[0]:.2f}" if load else ""
    return (
        f"{machine.get('cpu')} ({machine.get('cpus_usable')} CPUs usable{load_text}), {gpu}, "
        f"commit {commit}, {machine.get('date_utc')}"
    )
