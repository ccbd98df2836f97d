"""The U-Net registry, fold checkpoints, and the inspection model.

``InspectionModel`` is the whole inspection computation as one torch module: uint8 camera
frames in; cast, normalise, resize to the training resolution, every fold's U-Net, mean of the
folds' sigmoid probabilities, resize back, then :func:`postprocess`. ``trainer export`` traces
it into the ONNX inspection graph and the torch backend runs it eagerly as the reference, so
the two cannot drift apart. torch is imported here: import this module only where torch is wanted.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from engine.checkpoint import ENSEMBLE_FORMAT, FOLD_FORMAT, FORMATS, FoldCheckpoint, FoldFacts
from engine.decision import default_min_areas, default_thresholds
from engine.hashing import file_sha256
from engine.metadata import ARCHS, GATE_POOLING, ModelMetadata

# Encoders the product supports, by the name users type. The thesis' set (ResNet-34/50/101,
# EfficientNet-B0..B7) plus ResNet-18, MobileNetV2 and timm's MobileNetV3-small (width 0.5 and
# 1.0): the MobileNetV3-small U-Nets cost 0.2-0.25 GFLOP per 64x400 input with a narrow decoder,
# about a hundredth of the thesis' ResNet-34 at 128x800, which makes CPU training practical.
ENCODERS: dict[str, str] = {
    "resnet18": "resnet18",
    "resnet34": "resnet34",
    "resnet50": "resnet50",
    "resnet101": "resnet101",
    "mobilenet_v2": "mobilenet_v2",
    "mobilenetv3_small_050": "tu-mobilenetv3_small_050",
    "mobilenetv3_small_100": "tu-mobilenetv3_small_100",
    **{f"efficientnet-b{i}": f"efficientnet-b{i}" for i in range(8)},
}


@dataclass(frozen=True)
class UNetConfig:
    """Everything needed to rebuild a fold's network from its state dict.

    ``arch`` ``fpn`` (smp's FPN) reads ``decoder_channels[0]`` as its pyramid width and
    ``decoder_channels[1]`` (else the same) as its segmentation width; it needs 3..5 encoder stages.
    ``gate`` adds smp's classification head on the encoder (``aux_params``): one presence logit per
    class, and the network returns ``(mask logits, class logits)``. ``gate_pooling`` is how that head
    pools the encoder's last features over the frame: ``max`` (a defect's evidence counts the same
    in a crop and in a whole frame; what ``trainer fit --gate`` builds) or ``avg`` (smp's default,
    which dilutes a small defect over the frame's area; checkpoints made before the setting existed).
    """

    encoder: str = "resnet34"
    in_channels: int = 1
    num_classes: int = 4
    encoder_depth: int = 5
    decoder_channels: tuple[int, ...] = (256, 128, 64, 32, 16)
    arch: str = "unet"
    gate: bool = False
    gate_pooling: str = "avg"

    def __post_init__(self) -> None:
        if self.gate_pooling not in GATE_POOLING:
            raise ValueError(f"unknown gate pooling {self.gate_pooling!r}; choose one of {', '.join(GATE_POOLING)}")
        if self.encoder not in ENCODERS:
            raise ValueError(f"unknown encoder {self.encoder!r}; choose one of {', '.join(ENCODERS)}")
        if self.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.arch!r}; choose one of {', '.join(ARCHS)}")
        if self.arch == "fpn" and not 3 <= self.encoder_depth <= 5:
            raise ValueError(f"an FPN needs encoder_depth 3..5, got {self.encoder_depth}")
        if self.arch == "fpn" and self.decoder_channels[min(1, len(self.decoder_channels) - 1)] % 32:
            raise ValueError(f"an FPN's segmentation width (decoder_channels[1]) must be a multiple of 32 (its "
                             f"GroupNorm has 32 groups), got decoder_channels {list(self.decoder_channels)}")
        if len(self.decoder_channels) != self.encoder_depth:
            raise ValueError(
                f"decoder_channels has {len(self.decoder_channels)} entries, expected encoder_depth="
                f"{self.encoder_depth}"
            )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> UNetConfig:
        data = dict(data)
        if "decoder_channels" in data:
            data["decoder_channels"] = tuple(data["decoder_channels"])
        return cls(**data)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["decoder_channels"] = list(self.decoder_channels)
        return d


def build_unet(cfg: UNetConfig, encoder_weights: str | None = None) -> nn.Module:
    """Builds a segmentation-models-pytorch U-Net with raw logits as output.

    With ``encoder_depth`` < 5 the encoder stages the forward pass never runs are dropped (see
    :func:`drop_unused_encoder_stages`), so checkpoints and bundles hold only weights that are used.
    """
    import segmentation_models_pytorch as smp

    common = dict(encoder_name=ENCODERS[cfg.encoder], encoder_weights=encoder_weights,
                  encoder_depth=cfg.encoder_depth, in_channels=cfg.in_channels, classes=cfg.num_classes,
                  activation=None, aux_params={"classes": cfg.num_classes, "activation": None, "pooling": cfg.gate_pooling}
                  if cfg.gate else None)
    if cfg.arch == "fpn":
        widths = cfg.decoder_channels
        # smp 0.6's FPN decoder ends at stride 2**(depth - 3): upsample by that to the input's size.
        unet = smp.FPN(decoder_pyramid_channels=widths[0], decoder_segmentation_channels=widths[min(1, len(widths) - 1)],
                       upsampling=2 ** (cfg.encoder_depth - 3), **common)
    else:
        unet = smp.Unet(decoder_channels=list(cfg.decoder_channels), **common)
    if cfg.encoder_depth < 5:
        drop_unused_encoder_stages(unet, cfg.in_channels)
    return unet


class UnusedStage(nn.Module):
    """Stands in for an encoder stage beyond ``encoder_depth``: holds no weights, never runs."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("an encoder stage dropped as unused (beyond encoder_depth) was called")


def drop_unused_encoder_stages(unet: nn.Module, in_channels: int) -> int:
    """Replaces the encoder modules a forward pass never calls by weightless :class:`UnusedStage`.

    smp builds every stage of an encoder and runs only the first ``encoder_depth`` of them: a
    ResNet-18 cut to 3 stages carries 11.2 M parameters of which 0.7 M are used, and its
    checkpoints are 15 times larger than they need to be. A module is dropped when a probe forward
    pass calls neither it nor anything inside it and gives none of its parameters a gradient (a
    weight read directly, without calling its module, still counts as used). The output of the
    probe must be unchanged afterwards, else nothing is dropped.

    Returns:
        how many parameters were dropped.
    """
    encoder = getattr(unet, "encoder", None)
    if encoder is None:
        return 0
    was_training = unet.training
    called, used, expected, probe = probe_usage(unet, in_channels)
    unet.eval()

    def unused(module: nn.Module) -> bool:
        weights = list(module.parameters()) + list(module.buffers())
        return bool(weights) and id(module) not in called and not any(id(p) in used for p in module.parameters())

    replaced: list[tuple[nn.Module, str, nn.Module]] = []

    def visit(parent: nn.Module) -> None:
        for name, child in list(parent.named_children()):
            # Containers (ModuleList/ModuleDict) are never called themselves: look inside them.
            if not isinstance(child, (nn.ModuleList, nn.ModuleDict)) and unused(child):
                replaced.append((parent, name, child))
                setattr(parent, name, UnusedStage())
            else:
                visit(child)

    visit(encoder)
    dropped = sum(p.numel() for _, _, child in replaced for p in child.parameters())
    with torch.no_grad():
        try:
            same = torch.equal(_mask_logits(unet(probe)), expected)
        except RuntimeError:
            same = False
    if not same:
        for parent, name, child in replaced:
            setattr(parent, name, child)
        dropped = 0
    unet.train(was_training)
    return dropped


def _mask_logits(out: Any) -> torch.Tensor:
    """The mask logits of a network's output (a gated network returns them with class logits)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def probe_usage(unet: nn.Module, in_channels: int) -> tuple[set[int], set[int], torch.Tensor, torch.Tensor]:
    """What one forward and backward pass of a small probe reaches.

    Runs in eval mode, so no BatchNorm statistic moves, and leaves no gradient behind. 64x64 suits
    every encoder depth (both sides divisible by 2**5).

    Returns:
        ids of the modules called, ids of the parameters given a gradient, the output (detached),
        and the probe input.
    """
    was_training = unet.training
    unet.eval()
    called: set[int] = set()
    hooks = [m.register_forward_pre_hook(lambda mod, _: called.add(id(mod))) for m in unet.modules()]
    probe = torch.linspace(-1.0, 1.0, 64 * 64).reshape(1, 1, 64, 64).expand(1, in_channels, 64, 64).contiguous()
    try:
        unet.zero_grad(set_to_none=True)
        output = _mask_logits(unet(probe))
        output.sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
    used = {id(p) for p in unet.parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    unet.train(was_training)
    return called, used, output.detach(), probe


# --------------------------------------------------------------------------- pre/post-processing


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
        p = torch.sigmoid(_mask_logits(out).to(torch.float32))
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
        gate_thresholds = meta.gate_thresholds if meta.gate_thresholds is not None else [0.5] * meta.num_classes
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


# --------------------------------------------------------------------------- checkpoints


def save_fold_checkpoint(
    path: str | Path, cfg: UNetConfig, unet: nn.Module, facts: FoldFacts, training: dict[str, Any] | None = None
) -> None:
    """Writes a fold checkpoint (see :mod:`engine.checkpoint`): the U-Net config, its state dict, the
    fold's facts, and the trainer's resume state (``last.pt`` only)."""
    if not isinstance(facts, FoldFacts):
        raise TypeError(f"facts must be a FoldFacts record, got {type(facts).__name__}")
    state = {k: v.detach().cpu() for k, v in unet.state_dict().items()}
    payload = FoldCheckpoint(cfg.to_dict(), state, facts, training).to_payload()
    tmp = Path(f"{path}.{os.getpid()}.tmp")
    torch.save(payload, tmp)
    tmp.replace(path)  # atomic: an interrupted save never leaves a half-written checkpoint


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Loads a fold checkpoint or ensemble bundle, with a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt files
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict) or payload.get("format") not in FORMATS:
        raise ValueError(f"{path}: not a strip-inspection checkpoint (expected format {FOLD_FORMAT} or {ENSEMBLE_FORMAT})")
    return payload


def read_fold_checkpoint(path: str | Path) -> FoldCheckpoint:
    """A fold checkpoint, typed; raises ValueError for an ensemble bundle or missing/unknown facts."""
    payload = load_checkpoint(path)
    if payload["format"] == ENSEMBLE_FORMAT:
        raise ValueError(f"{path}: is an ensemble bundle, not a fold checkpoint")
    return FoldCheckpoint.from_payload(payload, source=str(path))


def load_fold(path: str | Path) -> tuple[nn.Module, UNetConfig, FoldFacts]:
    """Rebuilds a fold's U-Net (eval mode, CPU) from its checkpoint; returns it, its config and facts."""
    checkpoint = read_fold_checkpoint(path)
    cfg = UNetConfig.from_dict(checkpoint.unet)
    unet = build_unet(cfg)
    unet.load_state_dict(checkpoint.state_dict)
    return unet.eval(), cfg, checkpoint.facts


def save_ensemble(path: str | Path, cfg: UNetConfig, folds: Sequence[nn.Module], meta: ModelMetadata) -> None:
    """Writes the ``.pt`` ensemble bundle the torch backend loads: config, metadata, every fold."""
    payload = {
        "format": ENSEMBLE_FORMAT,
        "unet": cfg.to_dict(),
        "metadata": meta.to_dict(),
        "folds": [{k: v.detach().cpu() for k, v in f.state_dict().items()} for f in folds],
    }
    tmp = Path(str(path) + ".tmp")
    torch.save(payload, tmp)
    tmp.replace(path)


def load_ensemble(path: str | Path) -> tuple[list[nn.Module], UNetConfig, ModelMetadata]:
    """Loads a ``.pt`` ensemble bundle (or a single fold checkpoint as a one-fold ensemble)."""
    payload = load_checkpoint(path)
    cfg = UNetConfig.from_dict(payload["unet"])
    if payload["format"] == ENSEMBLE_FORMAT:
        meta = ModelMetadata.from_dict(payload["metadata"])
        states = payload["folds"]
    else:
        checkpoint = FoldCheckpoint.from_payload(payload, source=str(path))
        meta = fold_metadata(checkpoint.facts, cfg, checkpoint_sha256=[file_sha256(path)])
        states = [checkpoint.state_dict]
    folds = []
    for state in states:
        unet = build_unet(cfg)
        unet.load_state_dict(state)
        folds.append(unet.eval())
    return folds, cfg, meta


def fold_metadata(facts: FoldFacts, cfg: UNetConfig, **overrides: Any) -> ModelMetadata:
    """Metadata for a model made of folds trained like this one (thesis post-processing defaults
    unless ``overrides`` says otherwise)."""
    c = cfg.num_classes
    input_h, input_w = facts.input_size
    train_h, train_w = facts.train_size
    fields: dict[str, Any] = dict(
        num_classes=c,
        class_names=list(facts.class_names),
        input_height=int(input_h),
        input_width=int(input_w),
        train_height=int(train_h),
        train_width=int(train_w),
        thresholds=default_thresholds(c),
        min_areas=default_min_areas(c),
        folds=1,
        encoder=cfg.encoder,
        arch=cfg.arch,
        in_channels=cfg.in_channels,
        mean=float(facts.mean),
        std=float(facts.std),
    )
    fields.update(overrides)
    return ModelMetadata(**fields)
