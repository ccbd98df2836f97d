"""``engine info FILE``: what a model file is: its metadata, inputs and outputs.

``.onnx``: the inspection metadata from ``metadata_props`` and the graph's inputs/outputs (read
with onnx, weights not run). ``.engine``/``.plan``: the JSON sidecar (TensorRT version, GPU,
profile, precision, ONNX metadata), the engine file checked against it, and the engine's live I/O
when TensorRT and a GPU are present. ``.pt``: the ensemble bundle's or fold checkpoint's metadata.
A corrupt or truncated file gives an error naming the file and what is wrong with it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine import graph
from engine.hashing import file_sha256
from engine.metadata import ModelMetadata

HELP = "show a model file's metadata and inputs/outputs (.onnx, .xml, .engine/.plan, .pt)"


def _onnx_dtype(elem_type: int) -> str:
    import onnx

    return onnx.helper.tensor_dtype_to_np_dtype(elem_type).name if elem_type else "undefined"


def describe_onnx(path: Path) -> dict[str, Any]:
    import onnx
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, OSError, ValueError, RuntimeError) as exc:
        raise ValueError(
            f"{path}: not a readable ONNX model ({type(exc).__name__}: {exc}); the file is corrupt or truncated, "
            "export it again with 'trainer export'"
        ) from exc
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path}: not a valid ONNX model ({first}); export it again with 'trainer export'") from exc
    metadata = ModelMetadata.from_onnx_props({p.key: p.value for p in model.metadata_props}, source=str(path))

    def tensors(values: Any, mode: str) -> list[dict[str, Any]]:
        return [
            {
                "name": v.name,
                "mode": mode,
                "dtype": _onnx_dtype(v.type.tensor_type.elem_type),
                "shape": [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim],
            }
            for v in values
        ]

    weight_types: dict[str, int] = {}
    for init in model.graph.initializer:
        name = _onnx_dtype(init.data_type)
        weight_types[name] = weight_types.get(name, 0) + 1
    return {
        "file": str(path),
        "format": "onnx",
        "size_bytes": path.stat().st_size,
        "sha256": file_sha256(path),
        "opset": max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=None),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "nodes": len(model.graph.node),
        "weights_by_dtype": weight_types,
        "io": tensors(model.graph.input, "input") + tensors(model.graph.output, "output"),
        "metadata": metadata.to_dict(),
    }


def describe_engine(path: Path) -> dict[str, Any]:
    from engine.backends.tensorrt import read_sidecar, sidecar_path, verify_engine_file

    sidecar = read_sidecar(path)
    verify_engine_file(path, sidecar)
    info: dict[str, Any] = {
        "file": str(path),
        "format": "tensorrt",
        "sidecar": str(sidecar_path(path)),
        **{k: v for k, v in sidecar.to_dict().items() if k not in ("metadata", "format", "io")},
        "io": sidecar.io,
        "io_source": "sidecar (as recorded at build time)",
        "metadata": sidecar.metadata.to_dict(),
    }
    live = _live_engine_io(path)
    if isinstance(live, list):
        info["io"], info["io_source"] = live, "engine (deserialized here)"
    else:
        info["io_note"] = live
    return info


def _live_engine_io(path: Path) -> list[dict[str, Any]] | str:
    """The engine's I/O read by TensorRT, or why it could not be (a note, not an error)."""
    try:
        import tensorrt as trt
    except ImportError:
        return "TensorRT is not installed here: inputs/outputs as recorded in the sidecar"
    try:
        import torch

        if not torch.cuda.is_available():
            return "no CUDA GPU here: inputs/outputs as recorded in the sidecar"
    except ImportError:
        return "torch is not installed here: inputs/outputs as recorded in the sidecar"
    runtime = trt.Runtime(trt.Logger(trt.Logger.ERROR))
    engine = runtime.deserialize_cuda_engine(path.read_bytes())
    if engine is None:
        raise ValueError(f"{path}: TensorRT cannot deserialize this engine (built for another TensorRT or GPU?)")
    io = []
    for i in range(engine.num_io_tensors):
        name = engine.get_tensor_name(i)
        entry = {
            "name": name,
            "mode": "input" if engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT else "output",
            "dtype": str(engine.get_tensor_dtype(name)).replace("DataType.", "").lower(),
            "shape": [int(d) for d in engine.get_tensor_shape(name)],
        }
        if entry["mode"] == "input":
            entry["profile"] = [[int(d) for d in s] for s in engine.get_tensor_profile_shape(name, 0)]
        io.append(entry)
    return io


def describe_openvino(path: Path) -> dict[str, Any]:
    """An OpenVINO IR: metadata and build facts from its rt_info, I/O from the model (weights not run)."""
    from engine.backends.openvino_ir import build_info, model_metadata, read_model
    from engine.hashing import file_sha256

    model = read_model(path)
    metadata = model_metadata(model, str(path))
    build = build_info(model)

    def tensors(ports: Any, mode: str) -> list[dict[str, Any]]:
        return [{"name": p.get_any_name(), "mode": mode, "dtype": p.get_element_type().to_dtype().name,
                 "shape": ["N" if d.is_dynamic else d.get_length() for d in p.get_partial_shape()]} for p in ports]

    weights = path.with_suffix(".bin")
    return {
        "file": str(path),
        "format": "openvino",
        "size_bytes": weights.stat().st_size,
        "sha256": file_sha256(weights),
        "nodes": len(model.get_ordered_ops()),
        "build": build,
        "io": tensors(model.inputs, "input") + tensors(model.outputs, "output"),
        "metadata": metadata.to_dict(),
    }


def auto_backend_line(path: Path) -> str:
    """Which backend ``load_backend(path)`` / ``server serve`` would run the file on here, and why."""
    from engine.backends import choose_backend

    try:
        return choose_backend(path)[1]
    except ValueError as exc:
        return f"none ({exc})"


def describe_torch(path: Path) -> dict[str, Any]:
    from network.checkpoint import ENSEMBLE_FORMAT, FoldCheckpoint, fold_metadata, load_checkpoint
    from network.config import UNetConfig

    payload = load_checkpoint(path)
    cfg = UNetConfig.from_dict(payload["unet"])
    if payload["format"] == ENSEMBLE_FORMAT:
        metadata, kind = ModelMetadata.from_dict(payload["metadata"]), "ensemble bundle"
    else:
        facts = FoldCheckpoint.from_payload(payload, source=str(path)).facts
        metadata = fold_metadata(facts, cfg, checkpoint_sha256=[file_sha256(path)])
        kind = f"fold {facts.fold} checkpoint (epoch {facts.epoch})"
    return {
        "file": str(path),
        "format": f"torch {kind}",
        "size_bytes": path.stat().st_size,
        "unet": cfg.to_dict(),
        "io": graph.signature(metadata.num_classes, metadata.input_height, metadata.input_width),
        "metadata": metadata.to_dict(),
    }


def describe_model(path: str | Path) -> dict[str, Any]:
    """Everything ``engine info`` shows about a model file, as a JSON-able dict.

    Raises:
        FileNotFoundError: no such file (or, for an engine, no sidecar).
        ValueError: unknown suffix, corrupt/truncated file, or a file that is not an inspection model.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix == ".onnx":
        return {**describe_onnx(path), "runs_on": auto_backend_line(path)}
    if suffix in (".engine", ".plan"):
        return describe_engine(path)
    if suffix == ".pt":
        info = describe_torch(path)
    elif suffix == ".xml":
        info = describe_openvino(path)
    else:
        raise ValueError(f"{path}: unknown model file type {suffix!r}; expected .onnx, .xml, .engine/.plan or .pt")
    info["runs_on"] = auto_backend_line(path)
    return info


def format_info(info: dict[str, Any]) -> str:
    """A human-readable rendering of :func:`describe_model`'s dict."""
    meta = info["metadata"]
    lines = [f"{info['file']}  ({info['format']})"]
    if "size_bytes" in info or "engine_size" in info:
        size = info.get("size_bytes", info.get("engine_size"))
        sha = info.get("sha256", info.get("engine_sha256"))
        lines.append(f"  file        {size / 1e6:.2f} MB" + (f", sha256 {sha}" if sha else ""))
    if info["format"] == "onnx":
        lines.append(f"  graph       opset {info['opset']}, {info['nodes']} nodes, weights {info['weights_by_dtype']}, by {info['producer']}")
    if info["format"] == "tensorrt":
        lo, opt, hi = (info["profile"][k][0] for k in ("min", "opt", "max"))
        lines += [
            f"  tensorrt    {info['tensorrt_version']} on {info['gpu_name']} (compute capability {info['compute_capability']})",
            f"  build       {info['precision']} ({info['typing']}), batch profile {lo}/{opt}/{hi}, "
            f"{info.get('network_layers')} network -> {info.get('engine_layers')} engine layers, "
            f"{info.get('build_seconds')} s, {info.get('built_at')}",
            f"  onnx        {info['onnx_path']} (sha256 {info['onnx_sha256'][:16]}...)",
        ]
    if info["format"] == "openvino":
        build = info.get("build", {})
        parity = build.get("parity") or {}
        lines.append(f"  openvino    {build.get('precision', '?')} IR, {info['nodes']} nodes, OpenVINO "
                     f"{build.get('openvino_version', '?')}, built {build.get('built_at', '?')} from {build.get('onnx', '?')}")
        if parity:
            lines.append(f"  parity      vs the fp32 graph on {parity['frames']} held-out frames: mask Dice "
                         f"{parity['mask_dice']:.4f}, labels agree {parity['present_agreement']:.3f}, max |dcount| "
                         f"{parity['max_count_diff']}, max |dprob| {parity['max_prob_diff']:.3g}")
    if "runs_on" in info:
        lines.append(f"  runs on     {info['runs_on']}")
    lines.append(
        f"  model       {meta['model_version']}: {meta['folds']} x {meta['encoder']} U-Net, {meta['precision']}, "
        f"written by strip-inspection {meta['project_version']}"
    )
    lines.append(
        f"  sizes       frames {meta['input_height']}x{meta['input_width']}, U-Nets at "
        f"{meta['train_height']}x{meta['train_width']}, normalise (x/255 - {meta['mean']}) / {meta['std']}"
    )
    lines.append("  classes     id  name                threshold  min area")
    for k, name in enumerate(meta["class_names"]):
        lines.append(f"              {k + 1:<3} {name:<19} {meta['thresholds'][k]:<10g} {meta['min_areas'][k]}")
    source = f"  ({info['io_source']})" if "io_source" in info else ""
    lines.append(f"  tensors{source}")
    for t in info["io"]:
        shape = "[" + ", ".join(str(d) for d in t["shape"]) + "]"
        extra = f"  profile {t['profile']}" if "profile" in t else ""
        lines.append(f"    {t['mode']:<7} {t['name']:<8} {t['dtype']:<8} {shape}{extra}")
    if "io_note" in info:
        lines.append(f"  note        {info['io_note']}")
    if meta.get("checkpoint_sha256"):
        lines.append("  checkpoints " + ", ".join(s[:12] for s in meta["checkpoint_sha256"]))
    lines.append(f"  drift       {drift_line(meta.get('drift_reference'))}")
    return "\n".join(lines)


def drift_line(reference: Any) -> str:
    """Whether the model carries a usable drift reference, in one line."""
    from engine.drift import DriftReference

    if reference is None:
        return "no reference: a server will not monitor drift (re-export with 'trainer export --drift-frames N')"
    try:
        loaded = DriftReference.from_dict(reference)
    except ValueError as exc:
        return f"unusable reference ({exc}): a server will not monitor drift"
    ks = [s.name for s in loaded.stats if s.ks_applies]
    return (
        f"reference of {loaded.frames} training frames ({loaded.count_frames} with out-of-fold areas), "
        f"{len(loaded.stats)} statistics, PSI on all, KS on {', '.join(ks) or 'none'}"
    )


def add_arguments(parser: Any) -> None:
    parser.add_argument("file", type=Path, help="model file: .onnx, .engine/.plan (with its .json sidecar) or .pt")
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")


def run(args: Any) -> int:
    info = describe_model(args.file)
    print(json.dumps(info, indent=2) if args.json else format_info(info))
    return 0
