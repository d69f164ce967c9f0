"""Symmetric per-output-channel uniform weight quantization, the one weight quantizer bitplan uses.

The cost table, `apply` and `pack` must all see the same quantized weight, so every path goes
through `quantize_weight`: it fixes the codes, the float16 scales and the exact float32 values a
packed artifact rebuilds. How far each channel is clipped is a named rule in `CLIP_RULES`.

Imports torch only; never anything from the service, database or worker layers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from allocator.errors import UnknownMethod

FLOAT_BITS = 16
"""A layer planned at 16 bits keeps its weight in float16: no codes, no scales."""
SUPPORTED_BITS = (2, 3, 4, 5, 6, 8, FLOAT_BITS)

_FP16 = torch.finfo(torch.float16)
_SMALLEST_FP16 = 2.0**-24
"""The smallest positive float16: a tiny but non-zero channel must not get a zero scale."""

MSE_RATIOS = torch.linspace(0.2, 1.0, 41)
"""Clip ratios (of the channel's absmax) the `mse` rule tries; the last one is exactly 1.0."""
MSE_BLOCK_ELEMENTS = 1 << 20
"""Weight elements the `mse` rule searches at once (4 MiB of float32)."""

ClipRule = Callable[[Tensor, int], Tensor]
"""(weight as (out, rest) float32, bits) -> per-channel clip value, shape (out,)."""


@dataclass(frozen=True, eq=False)
class QuantizedWeight:
    """A quantized weight as it is stored.

    `codes` has the weight's shape: int8 integers in [-2^(b-1), 2^(b-1)-1], or, at 16 bits, the
    float16 weight itself (float16 is then the code). `scale` is float16 per output channel, or
    None at 16 bits.
    """

    codes: Tensor
    scale: Tensor | None
    bits: int
    clip: str

    def dequantize(self) -> Tensor:
        """The float32 weight every consumer sees; computed from the stored float16 scale only."""
        if self.scale is None:
            return self.codes.float()
        view = (-1,) + (1,) * (self.codes.dim() - 1)
        return self.codes.float() * self.scale.float().view(view)


def check_config(bits: int, clip: str) -> None:
    """Reject a bit-width or clip rule early, before any tensor is touched."""
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"weight bits must be one of {SUPPORTED_BITS}, got {bits}")
    if clip not in CLIP_RULES:
        raise UnknownMethod(f"unknown clip rule {clip!r}; known: {sorted(CLIP_RULES)}")


def quantize_weight(w: Tensor, bits: int, clip: str = "max") -> QuantizedWeight:
    """Quantize a Linear / Conv2d weight (output channel = dim 0) at `bits` with rule `clip`."""
    check_config(bits, clip)
    scale = None
    if bits != FLOAT_BITS:
        w2d = w.detach().float().reshape(w.shape[0], -1)
        scale = _float16_scale(CLIP_RULES[clip](w2d, bits), bits)
    return quantize_with_scale(w, scale, bits, clip)


def quantize_with_scale(w: Tensor, scale: Tensor | None, bits: int, clip: str) -> QuantizedWeight:
    """Codes of `w` on a float16 scale already chosen (None at 16 bits).

    This is how an applied weight, which lies on that grid, turns back into its exact codes.
    """
    if scale is None:
        return QuantizedWeight(codes=w.detach().half(), scale=None, bits=bits, clip=clip)
    w2d = w.detach().float().reshape(w.shape[0], -1)
    codes = _round_to_grid(w2d, scale, bits, torch.empty_like(w2d)).to(torch.int8)
    return QuantizedWeight(codes=codes.reshape(w.shape), scale=scale, bits=bits, clip=clip)


def fake_quantize(w: Tensor, bits: int, clip: str = "max") -> Tensor:
    """Quantize and dequantize: the float32 weight a quantized layer computes with."""
    return quantize_weight(w, bits, clip).dequantize()


def _float16_scale(clip: Tensor, bits: int) -> Tensor:
    """The stored scale; rounding it to float16 before the codes are chosen lets the artifact
    reproduce them. A non-zero channel never gets scale 0, however small its clip."""
    scale = (clip / (2 ** (bits - 1) - 1)).clamp(max=_FP16.max)
    return torch.where((clip > 0) & (scale < _SMALLEST_FP16), _SMALLEST_FP16, scale).half()


def _round_to_grid(w2d: Tensor, scale: Tensor, bits: int, out: Tensor) -> Tensor:
    """Integer codes as float32, written into `out`. A zero channel (scale 0) is divided by 1,
    not 0, so its codes are 0 and no NaN appears."""
    qmax = 2 ** (bits - 1) - 1
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale).float()
    return torch.div(w2d, divisor[:, None], out=out).round_().clamp_(-qmax - 1, qmax)


def _absmax_clip(w2d: Tensor, bits: int) -> Tensor:
    """Clip at each channel's largest magnitude: plain round-to-nearest, nothing saturates."""
    return w2d.abs().amax(dim=1)


def _mse_clip(w2d: Tensor, bits: int) -> Tensor:
    """Grid-search the clip ratio that minimises each channel's reconstruction error.

    Channels are independent, so they are searched in blocks of about `MSE_BLOCK_ELEMENTS`: the
    block's buffer stays in cache across the ratios and memory stays flat for any layer size.
    """
    rows = max(1, MSE_BLOCK_ELEMENTS // max(1, w2d.shape[1]))
    return torch.cat([_mse_clip_block(block, bits) for block in w2d.split(rows)])


def _mse_clip_block(w2d: Tensor, bits: int) -> Tensor:
    """Ratios are tried from 1.0 down and only a strictly smaller error wins, so the result is
    never worse than `max` for any channel; the residual is computed exactly as `dequantize`
    computes the weight."""
    absmax = _absmax_clip(w2d, bits)
    best_clip = absmax.clone()
    best_err = torch.full_like(absmax, float("inf"))
    buffer = torch.empty_like(w2d)
    for ratio in MSE_RATIOS.flip(0).tolist():
        clip = absmax * ratio
        scale = _float16_scale(clip, bits)
        residual = _round_to_grid(w2d, scale, bits, buffer).mul_(scale.float()[:, None]).sub_(w2d)
        err = residual.square_().sum(dim=1)
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_clip = torch.where(better, clip, best_clip)
    return best_clip


CLIP_RULES: dict[str, ClipRule] = {"max": _absmax_clip, "mse": _mse_clip}
