"""Building a fold's network: smp's registry, construction, and dropping the encoder stages it never runs."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from network.config import ENCODERS, UNetConfig


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

    smp builds every stage of an encoder and runs only the first ``encoder_depth`` of them, so a
    shallow network would carry (and checkpoint) mostly unused weights. A module is dropped when a probe forward
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
            same = torch.equal(mask_logits(unet(probe)), expected)
        except RuntimeError:
            same = False
    if not same:
        for parent, name, child in replaced:
            setattr(parent, name, child)
        dropped = 0
    unet.train(was_training)
    return dropped


def mask_logits(out: Any) -> torch.Tensor:
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
        output = mask_logits(unet(probe))
        output.sum().backward()
    finally:
        for hook in hooks:
            hook.remove()
    used = {id(p) for p in unet.parameters() if p.grad is not None}
    unet.zero_grad(set_to_none=True)
    unet.train(was_training)
    return called, used, output.detach(), probe

