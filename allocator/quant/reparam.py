"""RepQ-ViT's scale reparameterization: per-channel activation ranges after a pre-LayerNorm
folded into the LayerNorm affine and the next layers' weights, so one per-tensor scale serves.

Why: hardware quantizes a tensor with one scale; post-LayerNorm activations need one per channel.
With channel c's scale s_c and zero point z_c, pick a common scale s~ (the mean of s_c in
RepQ-ViT; the median in DopQ-ViT, which is less pulled by outlier channels) and zero point z~,
then r_c = s_c / s~ and k_c = z_c - z~. Dividing the LayerNorm output by r_c and adding
k_c s~ (in its gamma and beta), and multiplying the consumers' input columns by r_c (and taking
W (r k s~) off their bias) leaves the float function unchanged, and per-tensor quantization of
the folded output gives exactly the per-channel quantization of the original. `fold` does this
in place for pre-LN blocks (timm ViT/DeiT/Swin: norm1 -> attn.qkv, norm2 -> mlp.fc1). Post-LN
models (BERT) also feed the LayerNorm output to the residual, so they cannot be folded; bitplan
simulates them with the equivalent `channel` quantizer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from allocator.quant.activation import ActQuantizer

TARGETS = ("mean", "median")


@torch.no_grad()
def fold(
    norm: nn.LayerNorm,
    consumers: Sequence[nn.Linear],
    channel: ActQuantizer,
    target: str = "mean",
) -> ActQuantizer:
    """Fold `channel` (a calibrated `channel` quantizer of `norm`'s output) into `norm` and
    `consumers`; returns the per-tensor quantizer for the folded output."""
    if target not in TARGETS:
        raise ValueError(f"unknown reparameterization target {target!r}; use one of {TARGETS}")
    levels = 2**channel.bits - 1
    scale = (channel.hi - channel.lo) / levels
    zero = torch.round(-channel.lo / scale)
    common = scale.mean() if target == "mean" else scale.median()
    common_zero = torch.round(zero.mean() if target == "mean" else zero.median())
    ratio = scale / common
    offset = (zero - common_zero) * common
    norm.weight.div_(ratio)
    norm.bias.div_(ratio).add_(offset)
    for layer in consumers:
        shift = layer.weight @ (ratio * offset)
        layer.weight.mul_(ratio)
        if layer.bias is None:
            layer.bias = nn.Parameter(-shift)
        else:
            layer.bias.sub_(shift)
    lo = -common_zero * common
    return ActQuantizer("minmax", channel.bits, lo, lo + levels * common)
