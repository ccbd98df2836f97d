"""Bench results as a Markdown table, a JSON file and a PNG plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from benchmarks.machine import machine_summary
from benchmarks.naivecheck import SYNTHETIC_POOL
from benchmarks.pipeline import STAGE_TITLES, STAGES


def fmt(value: float | None, digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def fmt_ms(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def throughput_markdown(report: dict[str, Any]) -> str:
    """The ``bench throughput`` table with a heading that says what, where and how it was measured."""
    rows = report["rows"]
    out = [f"### bench throughput: {machine_summary(report['machine'])}", ""]
    for model in report["models"]:
        flops = model.get("flops")
        flops_text = f"{flops['flops_per_image'] / 1e9:.2f} GFLOP/image ({flops['method']})" if flops else "FLOPs n/a"
        out.append(f"- model `{model['file']}`: {model['summary']}; {flops_text}")
        floor = model.get("post_floor")
        if floor:
            out.append(f"  - post-processing floor: {floor['multiply_adds'] / 1e6:.1f} M multiply-adds, "
                       f"{floor['compares'] / 1e6:.2f} M compares and adds, {floor['bytes_moved'] / 1e6:.2f} MB "
                       f"moved per image: {1000 * floor['seconds']:.3f} ms")
    if report.get("cpu_features"):
        out.append(f"- {report['cpu_features']['line']}")
    for peak in report["peaks"]:
        out.append(
            f"- peak {peak['dtype']}: {peak['flops_per_s'] / 1e9:,.1f} G{'OP' if peak['dtype'] == 'int8' else 'FLOP'}/s "
            f"({peak['size']}x{peak['size']} {peak['dtype']} matmul on {peak['device']}, "
            f"{peak.get('method', 'torch.matmul')}, best of {peak['repeats']}"
            + (f", {peak['threads']} threads" if peak.get("threads") else "")
            + ")"
        )
    bandwidth = report.get("memory_bandwidth")
    if bandwidth:
        out.append(f"- memory bandwidth: {bandwidth['bytes_per_s'] / 1e9:,.1f} GB/s ({bandwidth['method']} of "
                   f"{bandwidth['size_bytes'] >> 20} MiB, read + write, best of {bandwidth['repeats']})")
    out.append("")
    headers = ["backend", "model", "device", "prec", "batch", "img/s", "ms/batch p50", "p95", "runs"]
    headers += [f"{STAGE_TITLES[s]} ms" for s in STAGES]
    headers += ["U-Net ms", "post % infer", "post floor ms", "GFLOP/s", "% peak", "x naive"]
    table = []
    for r in rows:
        stages = []
        for s in STAGES:
            text = fmt_ms(r["stage_ms_median"][s])
            if s == "d2h" and r["d2h_in_inference"] and r["stage_ms_median"][s] is not None:
                text += "*"
            if s == "postprocess_rle" and r.get("rle_in_inference"):
                text += "+"
            stages.append(text)
        achieved = r.get("achieved_flops_per_s")
        fraction = r.get("peak_fraction")
        speedup = r.get("speedup_vs_naive")
        table.append(
            [
                r["backend"],
                r["model"],
                r["device"],
                r["precision"],
                str(r["batch_size"]) + (" (per image)" if r["backend"] == "naive" else ""),
                fmt(r["images_per_s"], 2),
                fmt_ms(r["ms_per_batch_median"]),
                fmt_ms(r["ms_per_batch_p95"]),
                str(r["repeats"]),
                *stages,
                fmt_ms(r.get("network_ms")),
                fmt(None if r.get("post_share") is None else 100 * r["post_share"], 1),
                "n/a" if r.get("post_floor_ms") is None else f"{r['post_floor_ms']:.3f}",
                fmt(None if achieved is None else achieved / 1e9, 1),
                fmt(None if fraction is None else 100 * fraction, 1),
                "n/a" if speedup is None else f"{speedup:.2f}x",
            ]
        )
    out.append(markdown_table(headers, table))
    out.append("")
    for check in report.get("naive_agreement", []):
        loose = check.get("allowed_fraction")
        verdict = ("within tolerance of" if loose else "equal to") if check["equal"] else "DIFFERENT from"
        out.append(
            f"- {check['backend']} ({check['model']}): outputs {verdict} the naive pipeline's on "
            f"{check['frames']} frames of {_check_source(check)} (masks outside +-{check['band']:g} of the threshold: "
            f"{check['differing_pixels']} differ; max count difference {check['max_count_difference']})"
        )
    out += [f"- {note}" for note in report.get("notes", [])]
    return "\n".join(out)


def _check_source(check: dict[str, Any]) -> str:
    """Where a naive check's frames came from: the synthetic pool, or the ``--check-data`` folder."""
    source = check.get("source", SYNTHETIC_POOL)
    return f"the {source}" if source == SYNTHETIC_POOL else f"--check-data {source}"


def append_markdown(path: str | Path, text: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(text.rstrip() + "\n\n")
    return path


def write_json(path: str | Path, report: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2, default=str) + "\n")
    return path


def throughput_plot(path: str | Path, report: dict[str, Any]) -> Path:
    """Images/sec vs batch size, one line per backend (and model), the naive pipeline as a level line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8, 5))
    series: dict[str, list[tuple[int, float]]] = {}
    for r in report["rows"]:
        if r["backend"] == "naive":
            ax.axhline(r["images_per_s"], linestyle="--", color="grey", label=f"naive ({r['device']})")
            continue
        label = f"{r['backend']} {r['precision']} ({r['model']})"
        series.setdefault(label, []).append((r["batch_size"], r["images_per_s"]))
    for label, points in series.items():
        points.sort()
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch size (frames)")
    ax.set_ylabel("images / second (decode to RLE)")
    ax.set_title(machine_summary(report["machine"]), fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
