"""OpenVINO backend: the inspection graph on the CPU, from the ``.onnx`` file or an OpenVINO IR
(``.xml`` + ``.bin``, written by ``engine build --target openvino``).

Precision. ``fp32`` compiles the whole graph with ``hint.inference_precision`` f32 (OpenVINO's
CPU default on a bf16 machine is bf16, so it is always set). ``bf16`` and ``int8`` must not reach
the pre- and post-processing: OpenVINO's bf16 hint would also run the cast, normalisation, resizes,
fold mean and sigmoid in bf16 and move the pixel counts. The CPU plugin's per-node opt-out
(``disable_fp16_compression``) cannot be set from Python, so the graph is split instead:

- ``pre``: every node fed by ``frames`` before the first U-Net node (cast, normalise, resize);
- ``net``: the fold U-Nets (nodes named :data:`engine.graph.UNET_LAYER_MARK`) and the glue
  between them, up to their logits;
- ``post``: everything after (sigmoid, fold mean, resize back, threshold, counts, present).

``pre`` and ``post`` are compiled in f32, ``net`` in bf16 (or, for a quantised IR, with its int8
convolutions and the rest in f32). The split is computed from the graph at load time, so the
post-processing is still the one defined in the exported graph. Counts stay exact integers.

By default the last stage ends at the low-resolution mean probabilities (the resize's input) and
:class:`engine.fastpost.FastPostprocess` makes the masks, counts and present from them in fp32, as
the graph does (``postprocess="graph"`` keeps the graph's own; see :mod:`engine.lowres`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engine import graph
from engine.backends.base import (
    Backend,
    InspectionResult,
    check_frames,
    result_from_outputs,
)
from engine.backends.int8 import build_command
from engine.backends.openvino_ir import build_info, import_openvino, model_metadata, read_model
from engine.devices import BackendUnavailable, parse_device
from engine.fastpost import FastPostprocess, check_choice, fast_or_graph
from engine.lowres import GATE_KEY, LOWRES_KEY, OpenVinoView, find_post_cut
from engine.metadata import ModelMetadata

log = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "int8")
_OV_PRECISION = {"fp32": "f32", "bf16": "bf16"}
STAGES = ("pre", "net", "post")


# --------------------------------------------------------------------------- the pre / net / post split


def _data_nodes(model: Any) -> list[Any]:
    """Nodes that depend on the frames, in topological order."""
    dependent: set[str] = set()
    ordered = []
    for op in model.get_ordered_ops():
        name = op.get_friendly_name()
        if op.get_type_name() == "Parameter" or any(
            i.get_source_output().get_node().get_friendly_name() in dependent for i in op.inputs()
        ):
            dependent.add(name)
            ordered.append(op)
    return ordered


def classify_nodes(model: Any) -> dict[str, str]:
    """friendly name -> ``pre``/``net``/``post`` for every node that depends on the frames.

    ``net``: U-Net nodes, and nodes that both follow and feed a U-Net node (shape glue inside a
    fold); ``pre``: nodes before any U-Net node; ``post``: nodes after, feeding none.
    """
    nodes = _data_nodes(model)
    is_net = {op.get_friendly_name(): graph.UNET_LAYER_MARK in op.get_friendly_name() for op in nodes}
    if not any(is_net.values()):
        raise ValueError(f"no U-Net nodes (named '{graph.UNET_LAYER_MARK}...') in this graph: not an inspection graph?")
    after: set[str] = set()
    for op in nodes:
        name = op.get_friendly_name()
        if is_net[name] or any(i.get_source_output().get_node().get_friendly_name() in after for i in op.inputs()):
            after.add(name)
    before: set[str] = set()
    for op in reversed(nodes):
        name = op.get_friendly_name()
        if is_net[name] or any(t.get_node().get_friendly_name() in before for o in op.outputs() for t in o.get_target_inputs()):
            before.add(name)
    stages = {}
    for op in nodes:
        name = op.get_friendly_name()
        if op.get_type_name() == "Parameter":
            stages[name] = "pre"
        elif is_net[name] or (name in after and name in before):
            stages[name] = "net"
        else:
            stages[name] = "post" if name in after else "pre"
    return stages


def probs_output(model: Any, stages: dict[str, str]) -> Any:
    """The mean-probability tensor the threshold compares (the float input of the post stage's
    GreaterEqual): what ``with_probs`` returns and parity measures."""
    for op in model.get_ordered_ops():
        if stages.get(op.get_friendly_name()) == "post" and op.get_type_name() == "GreaterEqual":
            source = op.input(0).get_source_output()
            if source.get_element_type().is_real():
                return source
    raise ValueError("no threshold (GreaterEqual on probabilities) found after the U-Nets")


def skip_mask_float_round_trip(model: Any) -> int:
    """Feeds a ``Convert(uint8)`` of a ``Convert(float)`` of a boolean straight from the boolean.

    The graph makes masks as ``(p >= t)`` -> float (what the count sums) -> uint8; from a boolean
    (0 or 1) the two casts equal one, exactly. OpenVINO's CPU plugin runs those casts with reference
    kernels and a layout reorder on full-resolution float masks (about a third of the post stage);
    the count still sums the float. Returns how many casts were rewired.
    """
    import openvino as ov

    rewired = 0
    for op in model.get_ordered_ops():
        if op.get_type_name() != "Convert" or op.get_output_element_type(0) != ov.Type.u8:
            continue
        source = op.input_value(0).get_node()
        if source.get_type_name() == "Convert" and source.input_value(0).get_element_type() == ov.Type.boolean:
            op.input(0).replace_source_output(source.input_value(0))
            rewired += 1
    return rewired


def _key(output: Any) -> str:
    return f"{output.get_node().get_friendly_name()}#{output.get_index()}"


@dataclass
class Stage:
    """One piece of the split graph: an ``ov.Model`` whose inputs are keyed by the tensors they replace."""

    name: str
    model: Any
    inputs: list[str]
    outputs: list[str]


def split_stages(path: str | Path, with_probs: bool = False) -> list[Stage]:
    """Reads the graph once per stage and cuts it into :data:`STAGES` (see the module docstring)."""
    ov = import_openvino()
    base = read_model(path)
    stages = classify_nodes(base)
    order = {s: i for i, s in enumerate(STAGES)}
    pieces = []
    for stage in STAGES:
        model = base.clone()
        ops = {op.get_friendly_name(): op for op in model.get_ordered_ops()}
        params, keys, results, out_keys = [], [], [], []
        for name, op in ops.items():
            if stages.get(name) != stage:
                continue
            for port in op.inputs():
                src = port.get_source_output()
                src_stage = stages.get(src.get_node().get_friendly_name())
                if src_stage is None or src_stage == stage:
                    continue
                key = _key(src)
                if key not in keys:
                    keys.append(key)
                    params.append(ov.opset13.parameter(src.get_partial_shape(), src.get_element_type(), name=key))
                port.replace_source_output(params[keys.index(key)].output(0))
            for out in op.outputs():
                later = [t for t in out.get_target_inputs()
                         if order.get(stages.get(t.get_node().get_friendly_name(), ""), -1) > order[stage]]
                if later and _key(out) not in out_keys:
                    out_keys.append(_key(out))
                    results.append(out)
        if stage == "pre":
            params = list(model.get_parameters())
            keys = [graph.INPUT_NAME]
        if stage == "post":
            for result in model.get_results():
                out_keys.append(result.output(0).get_any_name())
                results.append(result.input_value(0))
            if with_probs:
                out_keys.append(graph.PROBS_NAME)
                results.append(probs_output(model, stages))
            skip_mask_float_round_trip(model)
        pieces.append(Stage(stage, ov.Model(results, params, f"inspection-{stage}"), keys, out_keys))
    return pieces


def cut_stage(stage: Stage, meta: ModelMetadata) -> tuple[FastPostprocess, Stage]:
    """The last stage cut where the graph's decision starts (:func:`engine.lowres.find_post_cut`): it
    outputs the low-resolution probabilities (and the gate's), and the fast path decides from them."""
    ov = import_openvino()
    cut = find_post_cut(OpenVinoView(stage.model), meta)
    outputs, keys = [cut.probs], [LOWRES_KEY]
    if cut.gate is not None:
        outputs.append(cut.gate)
        keys.append(GATE_KEY)
    fast = FastPostprocess(meta)
    model = ov.Model(outputs, list(stage.model.get_parameters()), f"inspection-{stage.name}-lowres")
    return fast, Stage(stage.name, model, stage.inputs, keys)


# --------------------------------------------------------------------------- the backend


def default_precision(meta: ModelMetadata, is_ir: bool) -> str:
    """An IR runs in the precision it was built for (a bf16 IR in fp32 where the CPU lacks bf16); an
    ``.onnx`` graph in bf16 where the CPU has native bf16, else fp32."""
    from engine.cpu import no_bf16_reason, supports_bf16

    if is_ir and meta.precision in ("fp32", "int8"):
        return meta.precision
    if supports_bf16():
        return "bf16"
    if is_ir:
        log.warning("a bf16 IR on a CPU without bf16 (%s): running it in fp32", no_bf16_reason())
    return "fp32"


def check_precision(precision: str, meta: ModelMetadata, source: str) -> None:
    from engine.cpu import no_bf16_reason, supports_bf16

    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    if (precision == "int8") != (meta.precision == "int8"):
        raise ValueError(
            f"{source} is {'an int8' if meta.precision == 'int8' else 'a ' + meta.precision} model: "
            + ("it runs as int8 only" if meta.precision == "int8" else
               f"int8 needs a quantised IR: {build_command(Path(source))}")
        )
    if precision == "bf16" and not supports_bf16():
        raise BackendUnavailable(f"precision bf16 asked for, but {no_bf16_reason()}; use precision fp32")


class OpenVinoBackend(Backend):
    """Runs an inspection graph (``.onnx``, or an IR ``.xml``) with OpenVINO on the CPU.

    Args:
        path: ``.onnx`` (``trainer export``) or ``.xml`` (``engine build --target openvino``).
        device: ``auto`` or ``cpu`` (OpenVINO's GPU plugin is not used here).
        precision: ``fp32``, ``bf16`` or ``int8`` (int8 needs a quantised IR); default: an IR's own
            precision, for ``.onnx`` bf16 where the CPU has native bf16, else fp32.
        threads: ``INFERENCE_NUM_THREADS`` (0 = OpenVINO's default, one per core).
        with_probs: also return the mean probabilities (parity checks); the whole graph runs.
        postprocess: ``auto`` (default) runs the graph up to its low-resolution probabilities and
            decides with :class:`engine.fastpost.FastPostprocess` where the graph allows it, ``fast``
            insists on that, ``graph`` runs the graph's own post-processing (see :mod:`engine.lowres`).
    """

    name = "openvino"

    def __init__(
        self,
        path: str | Path,
        device: str = "auto",
        precision: str | None = None,
        threads: int = 0,
        with_probs: bool = False,
        postprocess: str = "auto",
    ) -> None:
        ov = import_openvino()
        self.path = Path(path)
        if parse_device(device).kind not in ("auto", "cpu"):
            raise BackendUnavailable(
                f"the OpenVINO backend runs on the CPU here, not on {device!r}: use device='cpu', or a TensorRT "
                "engine / ONNX Runtime CUDA for a GPU"
            )
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        model = read_model(self.path)
        self.metadata = model_metadata(model, str(self.path))
        graph.check_io([i.get_any_name() for i in model.inputs], [o.get_any_name() for o in model.outputs],
                       str(self.path))
        self.precision = precision or default_precision(self.metadata, self.path.suffix.lower() == ".xml")
        check_precision(self.precision, self.metadata, str(self.path))
        self.device, self.threads, self.with_probs = "cpu", threads, with_probs
        self.build = build_info(model)
        core = ov.Core()

        def config(prec: str) -> dict[str, Any]:
            props: dict[str, Any] = {
                ov.properties.hint.inference_precision: ov.Type.bf16 if prec == "bf16" else ov.Type.f32,
                ov.properties.hint.performance_mode: ov.properties.hint.PerformanceMode.LATENCY,
            }
            if threads:
                props[ov.properties.inference_num_threads] = int(threads)
            return props

        if self.precision == "fp32" and not with_probs:
            skip_mask_float_round_trip(model)
            self.stages = [Stage("all", model, [graph.INPUT_NAME], [o.get_any_name() for o in model.outputs])]
            precisions = ["fp32"]
        else:
            self.stages = split_stages(self.path, with_probs=with_probs)
            net = "bf16" if self.precision == "bf16" else "fp32"
            precisions = ["fp32", net, "fp32"]
        self._choose_postprocess(postprocess, with_probs)
        self.requests = []
        for stage, prec in zip(self.stages, precisions):
            compiled = core.compile_model(stage.model, "CPU", config(prec))
            self.requests.append((stage, compiled.create_infer_request(), compiled.outputs))
        log.info("loaded %s with OpenVINO %s on the CPU (%s; %s; post-processing: %s)", self.path, ov.get_version(),
                 self.precision, " | ".join(f"{s.name} {p}" for s, p in zip(self.stages, precisions)), self.postprocess)

    def _choose_postprocess(self, postprocess: str, with_probs: bool) -> None:
        """Cuts the last stage for the fast path (:attr:`fast`) unless the graph must post-process."""
        self.fast: FastPostprocess | None = None
        check_choice(postprocess)
        if with_probs:
            self.postprocess = "graph (probabilities asked for)"
            return
        built, self.postprocess = fast_or_graph(postprocess, str(self.path),
                                                lambda: cut_stage(self.stages[-1], self.metadata))
        if built is not None:
            self.fast, self.stages[-1] = built
            self.fast.warmup(self.metadata.train_size)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "threads": self.threads, "stages": [s.name for s in self.stages],
                "postprocess": self.postprocess}

    def infer(self, frames: Any) -> InspectionResult:
        check_frames(frames, self.metadata)
        if not isinstance(frames, np.ndarray):
            frames = frames.detach().cpu().numpy()
        tensors = self._run_stages(frames)
        if self.fast is None:
            return result_from_outputs(tensors)
        return self.fast.result(tensors)

    def lowres(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """The graph up to where its decision starts (the fast path's network part, which ``bench``
        times alone): the low-resolution mean probabilities and the gate's, by :mod:`engine.lowres` key."""
        if self.fast is None:
            raise ValueError(f"{self.path}: this backend post-processes in the graph ({self.postprocess})")
        tensors = self._run_stages(frames)
        return {k: tensors[k] for k in (LOWRES_KEY, GATE_KEY) if k in tensors}

    def _run_stages(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        tensors: dict[str, np.ndarray] = {graph.INPUT_NAME: np.ascontiguousarray(frames)}
        for stage, request, outputs in self.requests:
            values = request.infer([tensors[k] for k in stage.inputs])
            # Copies: the request reuses its output buffers on the next call.
            tensors.update({k: np.array(values[o]) for k, o in zip(stage.outputs, outputs)})
        return tensors

    def close(self) -> None:
        self.requests = []
