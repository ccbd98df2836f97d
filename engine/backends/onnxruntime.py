"""ONNX Runtime backend: the exported inspection graph on the CPU, or on CUDA/TensorRT providers.

The CPU provider is the default and runs everywhere. With ``onnxruntime-gpu`` installed, the
CUDA (or, with ``provider="tensorrt"``, the TensorRT) execution provider runs the graph and IO
binding keeps frames and masks on the device: frames arrive as a CUDA tensor (or are copied up
once), outputs are written into preallocated device tensors and copied to the host once per batch.

On the CPU the graph runs up to its low-resolution mean probabilities and
:class:`engine.fastpost.FastPostprocess` makes the masks, counts and present from them, bit for bit
the graph's (``postprocess="graph"`` runs the whole graph; see :mod:`engine.lowres`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
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
from engine.devices import BackendUnavailable, cuda_index, is_cuda, parse_device
from engine.fastpost import FastPostprocess, check_choice, fast_or_graph
from engine.lowres import GATE_KEY, LOWRES_KEY, FastPathUnavailable, load_onnx_cut
from engine.metadata import ModelMetadata
from engine.rle import encode_batch_torch

log = logging.getLogger(__name__)

PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
}
GPU_HINT = (
    "install onnxruntime-gpu in place of onnxruntime (pip uninstall onnxruntime && pip install "
    "'strip-inspection[gpu]') on a machine with an NVIDIA driver and CUDA"
)


def choose_providers(
    device: str, available: list[str], provider: str | None = None, cache_dir: str | None = None
) -> tuple[str, list[Any]]:
    """Picks the execution providers for ``device`` among ``available`` (pure: testable without a GPU).

    Returns:
        (device string for :attr:`Backend.device`, providers list for ``InferenceSession``).

    Raises:
        BackendUnavailable: a GPU was asked for and this onnxruntime has no such provider.
    """
    parsed = parse_device(device)
    kind, index = parsed.kind, parsed.index
    if provider is not None and provider not in PROVIDERS:
        raise ValueError(f"provider must be one of {', '.join(PROVIDERS)}, got {provider!r}")
    if provider == "cpu" and kind not in ("auto", "cpu"):
        raise ValueError(f"provider 'cpu' contradicts device {device!r}")
    if kind == "cpu" or provider == "cpu":
        return "cpu", ["CPUExecutionProvider"]
    wanted = PROVIDERS[provider or "cuda"]
    if wanted not in available:
        if kind == "auto" and provider is None:
            return "cpu", ["CPUExecutionProvider"]
        raise BackendUnavailable(
            f"onnxruntime here has no {wanted} (available: {', '.join(available)}): {GPU_HINT}"
        )
    chain: list[Any] = []
    if wanted == "TensorrtExecutionProvider":
        # No trt_fp16_enable: precision comes from the graph (an FP16 export), as with strongly typed
        # engines; the flag would let TensorRT count pixels in fp16, which is not exact.
        options: dict[str, Any] = {"device_id": index, "trt_engine_cache_enable": True}
        if cache_dir is not None:
            options["trt_engine_cache_path"] = cache_dir
        chain.append((wanted, options))
    if "CUDAExecutionProvider" in available:
        chain.append(("CUDAExecutionProvider", {"device_id": index}))
    chain.append("CPUExecutionProvider")
    return f"cuda:{index}", chain


def fast_path(path: str, session: Callable[[bytes], Any]) -> tuple[FastPostprocess, Any]:
    """The CPU fast path for an ``.onnx`` graph: its decision, and ``session`` of the graph cut before
    its resize back; FastPathUnavailable where the graph does not allow it or the cut does not load."""
    meta, cut, _ = load_onnx_cut(path)
    try:
        return FastPostprocess(meta), session(cut)
    except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types
        raise FastPathUnavailable(f"ONNX Runtime cannot load the graph cut before its resize ({exc})") from exc


class OnnxRuntimeBackend(Backend):
    """Runs an exported ``.onnx`` inspection graph with ONNX Runtime.

    Args:
        path: the ``.onnx`` file written by ``trainer export``.
        device: ``auto`` (CUDA when onnxruntime-gpu and a GPU are present, else CPU), ``cpu``,
            ``cuda`` or ``cuda:N``.
        threads: CPU intra-op threads (0 = ONNX Runtime's default: one per physical core).
        provider: force ``cpu``, ``cuda`` or ``tensorrt`` (the TensorRT execution provider).
        postprocess: on the CPU, ``auto`` (default) runs the graph up to its low-resolution
            probabilities and decides with :class:`engine.fastpost.FastPostprocess` where the graph
            allows it (the same masks, counts and present), else the whole graph; ``fast`` insists on
            that path, ``graph`` runs the whole graph (as a user running the ``.onnx`` file would).
    """

    name = "onnxruntime"

    def __init__(self, path: str | Path, device: str = "auto", threads: int = 0, provider: str | None = None,
                 postprocess: str = "auto") -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise BackendUnavailable(
                f"onnxruntime is not installed ({exc}): pip install 'strip-inspection[cpu]' (or [gpu] for CUDA)"
            ) from exc
        self.path = Path(path)
        if threads < 0:
            raise ValueError(f"threads must be >= 0, got {threads}")
        check_choice(postprocess)
        cache_dir = str(self.path.with_name(self.path.name + ".ort-trt-cache"))
        self.device, providers = choose_providers(device, ort.get_available_providers(), provider, cache_dir)
        if is_cuda(self.device) and postprocess == "fast":
            raise ValueError("postprocess='fast' runs on the CPU only; on a GPU the graph post-processes")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        options.log_severity_level = 3

        def session(source: str | bytes) -> Any:
            return ort.InferenceSession(source, options, providers=providers)

        built: tuple[FastPostprocess, Any] | None = None
        if not is_cuda(self.device):
            built, self.postprocess = fast_or_graph(postprocess, str(self.path), lambda: fast_path(str(self.path), session))
        else:
            self.postprocess = "graph (GPU device)"
        self.fast, self.session = built if built is not None else (None, None)
        if self.session is None:
            try:
                self.session = session(str(self.path))
            except Exception as exc:  # noqa: BLE001 - ORT raises its own exception types for bad files
                raise ValueError(f"{self.path}: ONNX Runtime cannot load this model ({type(exc).__name__}: {exc})") from exc
        self.metadata = ModelMetadata.from_onnx_props(
            dict(self.session.get_modelmeta().custom_metadata_map), source=str(self.path)
        )
        self.precision = self.metadata.precision
        if self.fast is None:
            inputs = {i.name: graph.ort_dtype(i.type) for i in self.session.get_inputs()}
            outputs = {o.name: graph.ort_dtype(o.type) for o in self.session.get_outputs()}
            graph.check_io(inputs, outputs, str(self.path))
        else:
            self.fast.warmup(self.metadata.train_size)
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.providers = self.session.get_providers()
        self.threads = threads
        log.info("loaded %s on %s (%s; post-processing: %s)", self.path, self.device, ", ".join(self.providers),
                 self.postprocess)

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "providers": self.providers, "threads": self.threads,
                "postprocess": self.postprocess}

    def infer(self, frames: Any) -> InspectionResult:
        check_frames(frames, self.metadata)
        if is_cuda(self.device):
            return self._infer_bound(frames)
        if not isinstance(frames, np.ndarray):
            # A torch tensor (CPU or CUDA) on the CPU provider: one copy to the host.
            frames = frames.detach().cpu().numpy()
        if self.fast is None:
            values = self.session.run(self.output_names, {graph.INPUT_NAME: np.ascontiguousarray(frames)})
            return result_from_outputs(dict(zip(self.output_names, values)))
        return self.fast.result(self.lowres(frames))

    def lowres(self, frames: np.ndarray) -> dict[str, np.ndarray]:
        """The graph up to where its decision starts (the fast path's network part, which ``bench``
        times alone): the low-resolution mean probabilities and the gate's, by :mod:`engine.lowres` key."""
        if self.fast is None:
            raise ValueError(f"{self.path}: this backend post-processes in the graph ({self.postprocess})")
        values = self.session.run(self.output_names, {graph.INPUT_NAME: np.ascontiguousarray(frames)})
        return dict(zip((LOWRES_KEY, GATE_KEY), values))

    def _infer_bound(self, frames: Any) -> InspectionResult:
        """IO-bound run on the GPU: device frames in, outputs into device tensors, one copy out."""
        import torch

        index = cuda_index(self.device)
        gpu = torch.device("cuda", index)
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames)).pin_memory().to(gpu, non_blocking=True)
        else:
            frames = frames.to(gpu).contiguous()
        n = int(frames.shape[0])
        c = self.metadata.num_classes
        h, w = self.metadata.input_size
        outputs = {
            name: torch.empty(graph.shape(name, n, c, h, w), dtype=getattr(torch, graph.SPECS[name].dtype), device=gpu)
            for name in self.output_names
        }
        binding = self.session.io_binding()
        # ORT reads the input on its own stream: the upload must have finished first.
        torch.cuda.current_stream(gpu).synchronize()
        binding.bind_input(graph.INPUT_NAME, "cuda", index, np.dtype(graph.FRAMES.dtype).type, tuple(frames.shape),
                           frames.data_ptr())
        for name, tensor in outputs.items():
            binding.bind_output(name, "cuda", index, np.dtype(graph.SPECS[name].dtype).type, tuple(tensor.shape),
                                tensor.data_ptr())
        self.session.run_with_iobinding(binding)
        binding.synchronize_outputs()
        encoded = encode_batch_torch(outputs[graph.MASKS.name])
        return result_from_outputs({name: tensor.cpu().numpy() for name, tensor in outputs.items()}, encoded)

    def close(self) -> None:
        self.session = None  # type: ignore[assignment]
