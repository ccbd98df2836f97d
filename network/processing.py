"""Pre- and post-processing around the fold networks: the torch mirror of the exported graph's.

Normalisation, resizing, padding to the network's stride, flip TTA and :func:`postprocess`
(threshold, exact pixel count, minimum area). Training, the eager reference and the traced
ONNX graph all call these, so they see identical inputs and make identical decisions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.metadata import ModelMetadata
from network.build import mask_logits


def resize(x: torch.Tensor, size: tuple[int, int], src_size: tuple[int, int] | None = None) -> torch.Tensor:
    """Resizes ``[N, C, H, W]`` float images or probabilities to ``size``.

    ``src_size`` gives the input's (H, W) as plain ints; pass it when tracing for export so the
    pooling kernel is a constant rather than a function of a traced shape.

    An exact integer downscale is a box filter (average pooling), which is what area
    interpolation does and exports to one ONNX AveragePool; anything else is bilinear.
    Training and the exported graph both call this, so they see identical inputs.
    """
    h, w = (int(v) for v in (src_size if src_size is not None else x.shape[-2:]))
    th, tw = size
    if (h, w) == (th, tw):
        return x
    if h % th == 0 and w % tw == 0 and h >= th and w >= tw:
        kh, kw = h // th, w // tw
        return F.avg_pool2d(x, kernel_size=(kh, kw), stride=(kh, kw))
    return F.interpolate(x, size=(th, tw), mode="bilinear", align_corners=False)


def preprocess(frames: torch.Tensor, meta: ModelMetadata, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 frames ``[N, H, W]`` -> normalised network input ``[N, in_channels, th, tw]``."""
    # Cast first: TensorRT accepts a uint8 network input only as the input of a cast to float.
    x = _standardise(frames.to(torch.float32).unsqueeze(1) * (1.0 / 255.0), meta)
    x = resize(x, meta.train_size, src_size=meta.input_size)
    return _expand(x, meta).to(dtype)


def scaled_input(frames01: torch.Tensor, meta: ModelMetadata) -> torch.Tensor:
    """Frames already at the training size, float ``[N, th, tw]`` in [0, 1] (a frame's
    ``resize(x / 255)``) -> the network input :func:`preprocess` makes of the full frame: the same
    normalisation and channels, applied after the resize instead of before (both are linear, so
    the two agree to float rounding, about 1e-7)."""
    return _expand(_standardise(frames01.to(torch.float32).unsqueeze(1), meta), meta)


def _standardise(x: torch.Tensor, meta: ModelMetadata) -> torch.Tensor:
    return (x - meta.mean) / meta.std if meta.mean != 0.0 or meta.std != 1.0 else x


def _expand(x: torch.Tensor, meta: ModelMetadata) -> torch.Tensor:
    return x.expand(-1, meta.in_channels, -1, -1) if meta.in_channels != 1 else x


def downscale_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """0/1 masks ``[N, C, H, W]`` -> training resolution: a pixel is set when >= half its area is."""
    if tuple(masks.shape[-2:]) == tuple(size):
        return masks.to(torch.float32)
    return (resize(masks.to(torch.float32), size) >= 0.5).to(torch.float32)


def network_stride(net: nn.Module) -> int:
    """What both sides of a network's input must be multiples of: 2**(encoder stages run).

    smp encoders say it (``output_stride``, else one ``out_channels`` entry per stage plus the input);
    a U-Net or FPN downsamples by 2 per stage and joins the stages back, so any other size breaks them.
    """
    encoder = getattr(net, "encoder", None)
    stride = getattr(encoder, "output_stride", None)
    if stride is not None:
        return int(stride)
    channels = getattr(encoder, "out_channels", None)
    return 1 if channels is None else 2 ** (len(channels) - 1)


def padded_logits(net: nn.Module, x: torch.Tensor, size: tuple[int, int], stride: int) -> Any:
    """``net(x)`` for inputs of any size: pads ``x`` ``[N, C, H, W]`` (``size`` = (H, W) as plain ints)
    to multiples of ``stride`` by repeating its edge pixels, then crops the masks' logits back.

    Training and the exported graph both call this, so a 200x200 frame trains, exports and serves
    with the same padding. A network with a classification head returns ``(mask logits, class
    logits)``; the class logits need no crop.
    """
    h, w = (int(v) for v in size)
    pad_h, pad_w = (-h) % stride, (-w) % stride
    if pad_h or pad_w:
        top, left = pad_h // 2, pad_w // 2
        x = F.pad(x, (left, pad_w - left, top, pad_h - top), mode="replicate")
    out = net(x)
    if not (pad_h or pad_w):
        return out
    masks = out[0] if isinstance(out, (tuple, list)) else out
    masks = masks[..., top:top + h, left:left + w]
    return (masks, *out[1:]) if isinstance(out, (tuple, list)) else masks


#: The flips (tensor dims of ``[N, C, H, W]``) each TTA mode averages over; ``()`` is the frame itself.
TTA_VIEWS: dict[str, tuple[tuple[int, ...], ...]] = {"none": ((),), "hflip": ((), (3,)), "hvflip": ((), (3,), (2,))}


def fold_probabilities(net: nn.Module, x: torch.Tensor, size: tuple[int, int], stride: int,
                       tta: str = "none") -> torch.Tensor:
    """One network's mask probabilities (float32) on ``x``, averaged over the ``tta`` flips, each
    flipped back; see :func:`padded_logits` for ``size`` and ``stride``."""
    return fold_outputs(net, x, size, stride, tta)[0]


def fold_outputs(net: nn.Module, x: torch.Tensor, size: tuple[int, int], stride: int,
                 tta: str = "none") -> tuple[torch.Tensor, torch.Tensor | None]:
    """(mask probabilities ``[N, C, h, w]``, class probabilities ``[N, C]`` of a gate head or None),
    float32, each averaged over the ``tta`` flips."""
    masks, gates = None, None
    views = TTA_VIEWS[tta]
    for dims in views:
        out = padded_logits(net, x.flip(dims) if dims else x, size, stride)
        # Sigmoid in float32: fp16 would quantise probabilities near 0.5 to steps of 2**-11.
        p = torch.sigmoid(mask_logits(out).to(torch.float32))
        p = p.flip(dims) if dims else p
        masks = p if masks is None else masks + p
        if isinstance(out, (tuple, list)):
            g = torch.sigmoid(out[1].to(torch.float32))
            gates = g if gates is None else gates + g
    if len(views) > 1:
        masks = masks * (1.0 / len(views))
        gates = None if gates is None else gates * (1.0 / len(views))
    return masks, gates


def postprocess(
    probs: torch.Tensor, thresholds: torch.Tensor, min_areas: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Probabilities ``[N, C, H, W]`` -> (masks uint8, counts int32 ``[N, C]``, present bool ``[N, C]``).

    A pixel is a defect when ``p >= threshold[c]``; a class is present when its exact pixel count
    is ``>= min_area[c]``. Counting sums 0/1 values in float32, exact while H*W < 2**24, then
    casts to int32 (a sum of ones in fp16 would stop being exact past 2048 pixels).
    """
    c = probs.shape[1]
    hits = (probs.to(torch.float32) >= thresholds.to(torch.float32).view(1, c, 1, 1)).to(torch.float32)
    counts = hits.sum(dim=(2, 3)).to(torch.int32)
    present = counts >= min_areas.to(torch.int32).view(1, c)
    # uint8 from float, not from bool: TensorRT converts uint8 only to and from float types.
    return hits.to(torch.uint8), counts, present

