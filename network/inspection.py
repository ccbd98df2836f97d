"""The inspection model: the whole inspection computation as one torch module.

uint8 camera frames in; cast, normalise, resize to the training resolution, every fold's network,
mean of the folds' sigmoid probabilities, resize back, then :func:`network.processing.postprocess`
(and the empty-frame gate). ``trainer export`` traces it into the ONNX inspection graph and the
torch backend runs it eagerly as the reference, so the two cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from engine.decision import default_gate_thresholds
from engine.metadata import ModelMetadata
from network.processing import fold_outputs, network_stride, postprocess, preprocess, resize


class InspectionModel(nn.Module):
    """The inspection graph: uint8 frames ``[N, H, W]`` -> masks, counts, present (and probs).

    Args:
        folds: the fold U-Nets (logit outputs), averaged after the sigmoid.
        meta: model metadata; input/train sizes, normalisation, thresholds and minimum areas.
        with_probs: also return the mean probabilities ``[N, C, H, W]`` (float32), for debugging.
        compute_dtype: dtype the U-Nets run in (float16 for the FP16 graph); pre- and
            post-processing stay in float32.
        autocast: run the U-Nets (only them) under ``torch.autocast`` in this dtype (bfloat16 on a
            CPU with native bf16); None for none. Never used for export.
    """

    def __init__(
        self,
        folds: Sequence[nn.Module],
        meta: ModelMetadata,
        with_probs: bool = False,
        compute_dtype: torch.dtype = torch.float32,
        autocast: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not folds:
            raise ValueError("an inspection model needs at least one fold")
        if meta.input_height * meta.input_width >= 2**24:
            raise ValueError("frames of 2**24 pixels or more cannot be counted exactly in float32")
        self.folds = nn.ModuleList(folds)
        self.strides = [network_stride(f) for f in folds]
        self.meta = meta
        self.with_probs = with_probs
        self.compute_dtype = compute_dtype
        self.autocast = autocast
        self.register_buffer("thresholds", torch.tensor(meta.thresholds, dtype=torch.float32), persistent=False)
        self.register_buffer("min_areas", torch.tensor(meta.min_areas, dtype=torch.int32), persistent=False)
        gate_thresholds = meta.gate_thresholds if meta.gate_thresholds is not None else default_gate_thresholds(meta.num_classes)
        self.register_buffer("gate_thresholds", torch.tensor(gate_thresholds, dtype=torch.float32), persistent=False)

    def probabilities(self, frames: torch.Tensor) -> torch.Tensor:
        """Mean fold probabilities at input resolution, float32 ``[N, C, H, W]`` (over the TTA views too)."""
        return self.outputs(frames)[0]

    def decide(self, probs: torch.Tensor, gate: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(masks, counts, present) from :meth:`outputs`: :func:`postprocess`, then the gate if set."""
        masks, counts, present = postprocess(probs, self.thresholds, self.min_areas)
        if self.meta.gate_thresholds is not None:
            if gate is None:
                raise ValueError("the metadata has gate thresholds, but the folds have no gate head")
            # The empty-frame gate: present only when the class head agrees as well as the pixel count.
            present = present & (gate >= self.gate_thresholds.view(1, -1))
        return masks, counts, present

    def outputs(self, frames: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Mean fold mask probabilities at input resolution and mean gate probabilities ``[N, C]``
        (None unless every fold has a gate head)."""
        x = preprocess(frames, self.meta, self.compute_dtype)
        total, gates = None, []
        for fold, stride in zip(self.folds, self.strides):
            if self.autocast is None:
                p, g = fold_outputs(fold, x, self.meta.train_size, stride, self.meta.tta)
            else:
                with torch.autocast(x.device.type, dtype=self.autocast):
                    p, g = fold_outputs(fold, x, self.meta.train_size, stride, self.meta.tta)
            total = p if total is None else total + p
            gates.append(g)
        probs = total * (1.0 / len(self.folds))
        gate = None if any(g is None for g in gates) else sum(gates[1:], gates[0]) * (1.0 / len(gates))
        return resize(probs, self.meta.input_size, src_size=self.meta.train_size), gate

    def forward(self, frames: torch.Tensor):  # noqa: D102 - see class docstring
        probs, gate = self.outputs(frames)
        masks, counts, present = self.decide(probs, gate)
        if self.with_probs:
            return masks, counts, present, probs
        return masks, counts, present

