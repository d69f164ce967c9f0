"""Activation quantizers: the per-tensor baseline and the transformer-specific ones of the seed
papers, each a fake-quantizer (quantize, then dequantize) calibrated on sampled activations.

Why each exists
- `minmax`, `percentile`, `mse`: asymmetric uniform per-tensor, the baseline every PTQ paper
  compares with. Post-LayerNorm activations defeat them: a few channels are 10-100x wider than
  the rest, so one scale leaves the narrow channels with one or two levels.
- `channel`: asymmetric uniform with one range per channel. This is exactly what RepQ-ViT's
  scale reparameterization computes: per-channel ranges at calibration, turned into one
  per-tensor scale by dividing channel c by r_c = s_c / s~ in the LayerNorm affine and
  multiplying it back into the next layer's input columns (`allocator.quant.reparam` does that
  fold and its test checks both forms agree). `channel-clip` clips each channel's range to its
  1 % and 99 % quantiles first, LRP-QViT's clipped channel-wise variant; it folds the same way.
  It is calibrated on rows x channels but applied to the site's own tensor, whose channels lie
  along `axis`: the last dimension for a linear layer's input (tokens, or NHWC pixels as ConvNeXt
  and Swin feed their norms' outputs), dimension 1 for a convolution's NCHW input. A tensor with
  another count there is refused, not broadcast: broadcasting ranges along the wrong dimension
  runs silently when the counts agree by chance, and fails deep inside the model when they do not.
- `log2`, `logsqrt2`: for post-Softmax probabilities, which follow a power law (most near 0, a
  few near 1). log2 spends levels on the small ones; log-sqrt2 (RepQ-ViT) halves the step and
  is re-parameterized to log2 with a parity bit (`logsqrt2_by_shifts`, tested equal).
- `sulq`: I&S-ViT's shift-uniform-log2: shift by eta, take log2, quantize that uniformly over
  [log2 eta, 0], undo; eta is calibrated, so the levels cover the whole [0, 1] range smoothly.
- `tanq`: DopQ-ViT's Tan Quantizer, as we read it: levels uniform in tan(pi (x - 1/2)) over
  [-T, T], the two end levels being exactly 0 and 1, so they crowd towards both 0 (the mass of
  the power law) and 1 (the few strong attentions that log2, with levels 1 and 1/2 there,
  rounds coarsely); T is calibrated by least squared error, the way sulq's eta is.
- bits 16: not quantized.

Imports torch only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from allocator.errors import UnknownMethod
from allocator.job import ACT_BITS as ACT_BITS  # the widths a site may take, re-exported

NOT_QUANTIZED = 16
"""The width of `ACT_BITS` (the widths a site may take) that means kept in floating point."""
CHANNEL_KINDS = ("channel", "channel-clip")
UNIFORM_KINDS = ("minmax", "percentile", "mse", *CHANNEL_KINDS)
SOFTMAX_KINDS = ("log2", "logsqrt2", "sulq", "tanq")
KINDS = UNIFORM_KINDS + SOFTMAX_KINDS
CHANNEL_CLIP = 0.99
"""Quantile each channel's range is clipped to by `channel-clip`."""
PERCENTILE_TAIL = 1e-4
"""Fraction of values the `percentile` rule leaves outside the range at each end."""
MSE_RATIOS = torch.linspace(0.3, 1.0, 29)
SULQ_SHIFTS = torch.logspace(-6, -1, 21)
TANQ_RANGES = torch.logspace(0, 4, 25)
"""Candidate T of tanq: |tan(pi (x - 1/2))| <= T keeps x within 1 / (pi T) of 0 and 1."""
SAMPLE_LIMIT = 1 << 18
"""Values (or rows, for `channel`) a calibration looks at; quantile() refuses 16M+ inputs."""


@dataclass(frozen=True, eq=False)
class ActQuantizer:
    """One site's calibrated quantizer; callable on that site's activations."""

    kind: str
    bits: int
    lo: Tensor = field(default_factory=lambda: torch.zeros((), device="cpu"))
    hi: Tensor = field(default_factory=lambda: torch.ones((), device="cpu"))
    shift: float = 0.0
    """sulq's eta; tanq's T."""
    axis: int = -1
    """The dimension of the activation that per-channel ranges run along: -1 (a linear layer's
    input) or 1 (a convolution's NCHW input); rows x channels samples take either."""

    def __call__(self, x: Tensor) -> Tensor:
        if self.bits >= NOT_QUANTIZED:
            return x
        if self.kind in UNIFORM_KINDS:
            return _uniform(x, self._along(self.lo, x), self._along(self.hi, x), self.bits)
        return _SOFTMAX[self.kind](x, self.bits, self.shift)

    def _along(self, bound: Tensor, x: Tensor) -> Tensor:
        """`bound` in `x`'s dtype and on its device (a quantizer read back from a plan is on
        the CPU), shaped to broadcast along `axis` when it is per channel."""
        bound = bound.to(device=x.device, dtype=x.dtype)
        if bound.dim() == 0:
            return bound
        if not -x.dim() <= self.axis < x.dim() or x.shape[self.axis] != bound.numel():
            raise ValueError(
                f"{self.kind} quantizer with {bound.numel()} channels along dimension "
                f"{self.axis} applied to an activation of shape {tuple(x.shape)}"
            )
        shape = [1] * x.dim()
        shape[self.axis] = -1
        return bound.reshape(shape)

    def to_dict(self) -> dict[str, object]:
        """What a runtime needs to reproduce the quantizer (goes into the packed metadata)."""
        return {
            "kind": self.kind,
            "bits": self.bits,
            "lo": self.lo.tolist(),
            "hi": self.hi.tolist(),
            "shift": self.shift,
            "axis": self.axis,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> ActQuantizer:
        """The quantizer `to_dict` described, as a plan's activations carry it (exporters
        rebuild the job's quantizers from the artifact alone)."""
        kind = str(data["kind"])
        if kind not in KINDS:
            raise UnknownMethod(f"unknown activation quantizer {kind!r}")
        return cls(
            kind,
            int(data["bits"]),  # type: ignore[call-overload]
            torch.tensor(data.get("lo", 0.0), dtype=torch.float32, device="cpu"),
            torch.tensor(data.get("hi", 1.0), dtype=torch.float32, device="cpu"),
            float(data.get("shift", 0.0)),  # type: ignore[arg-type]
            int(data.get("axis", -1)),  # type: ignore[call-overload]
        )


def calibrate(kind: str, samples: Tensor, bits: int, axis: int = -1) -> ActQuantizer:
    """A quantizer of `kind` at `bits` fitted to `samples` (rows x channels for `channel`),
    for activations whose channels lie along `axis`."""
    if kind not in KINDS:
        raise UnknownMethod(f"unknown activation quantizer {kind!r}; use one of {', '.join(KINDS)}")
    if bits >= NOT_QUANTIZED:
        return ActQuantizer(kind, NOT_QUANTIZED)
    samples = samples.detach().float()
    if kind in CHANNEL_KINDS:
        rows = samples.reshape(-1, samples.shape[-1])
        rows = rows[_subsample(rows.shape[0], SAMPLE_LIMIT // max(rows.shape[1], 1) + 1, rows)]
        if kind == "channel-clip":
            lo = torch.quantile(rows, 1 - CHANNEL_CLIP, dim=0)
            hi = torch.quantile(rows, CHANNEL_CLIP, dim=0)
        else:
            lo, hi = rows.amin(0), rows.amax(0)
        return ActQuantizer(kind, bits, lo, torch.maximum(hi, lo + 1e-8), axis=axis)
    flat = samples.reshape(-1)
    flat = flat[_subsample(flat.numel(), SAMPLE_LIMIT, flat)]
    if kind in _SEARCHED:
        return _calibrate_searched(kind, flat, bits)
    if kind in SOFTMAX_KINDS:
        return ActQuantizer(kind, bits)
    lo, hi = flat.min(), flat.max()
    if kind == "percentile":
        lo = torch.quantile(flat, PERCENTILE_TAIL)
        hi = torch.quantile(flat, 1 - PERCENTILE_TAIL)
    elif kind == "mse":
        lo, hi = _mse_range(flat, lo, hi, bits)
    return ActQuantizer(kind, bits, torch.clamp(lo, max=0.0), torch.clamp(hi, min=0.0))


def logsqrt2_by_shifts(x: Tensor, bits: int) -> Tensor:
    """log-sqrt2 quantization computed as RepQ-ViT deploys it: a right shift by floor(q / 2) and
    a 1/sqrt2 factor for odd q, so a log2 (shift-only) kernel can run it."""
    q = torch.round(-2 * torch.log2(x.clamp_min(1e-30)))
    shifts = torch.floor(q / 2)
    odd = q - 2 * shifts
    value = torch.pow(2.0, -shifts) * torch.where(odd > 0, 2**-0.5, 1.0)
    return torch.where(q > 2**bits - 1, torch.zeros_like(x), value)


def _uniform(x: Tensor, lo: Tensor, hi: Tensor, bits: int) -> Tensor:
    levels = 2**bits - 1
    scale = torch.clamp((hi - lo) / levels, min=1e-12)
    zero = torch.round(-lo / scale)
    q = torch.clamp(torch.round(x / scale) + zero, 0, levels)
    return (q - zero) * scale


def _log2(x: Tensor, bits: int, _shift: float) -> Tensor:
    q = torch.round(-torch.log2(x.clamp_min(1e-30)))
    return torch.where(q > 2**bits - 1, torch.zeros_like(x), torch.pow(2.0, -q))


def _logsqrt2(x: Tensor, bits: int, _shift: float) -> Tensor:
    q = torch.round(-2 * torch.log2(x.clamp_min(1e-30)))
    return torch.where(q > 2**bits - 1, torch.zeros_like(x), torch.pow(2.0, -q / 2))


def _sulq(x: Tensor, bits: int, shift: float) -> Tensor:
    top = -math.log2(shift)
    step = top / (2**bits - 1)
    t = torch.clamp(-torch.log2(x.clamp_min(0) + shift), 0, top)
    return torch.clamp(torch.pow(2.0, -torch.round(t / step) * step) - shift, min=0.0)


def _tanq(x: Tensor, bits: int, limit: float) -> Tensor:
    # In float64: tan(pi (x - 1/2)) of a float32 x of 1e-8 lands on the wrong side of the pole.
    step = 2 * limit / (2**bits - 1)
    t = torch.clamp(torch.tan(math.pi * (x.double().clamp(0, 1) - 0.5)), -limit, limit)
    level = torch.round((t + limit) / step) * step - limit
    # The end levels stand for everything beyond the range: exactly 0 and exactly 1.
    x_hat = torch.atan(level) / math.pi + 0.5
    x_hat = torch.where(level <= -limit, 0.0, torch.where(level >= limit, 1.0, x_hat))
    return x_hat.to(x.dtype)


_SOFTMAX: dict[str, Callable[[Tensor, int, float], Tensor]] = {
    "log2": _log2,
    "logsqrt2": _logsqrt2,
    "sulq": _sulq,
    "tanq": _tanq,
}
_SEARCHED: dict[str, Tensor] = {"sulq": SULQ_SHIFTS, "tanq": TANQ_RANGES}
"""Softmax quantizers with one calibrated parameter, and the grid it is searched on."""


def _calibrate_searched(kind: str, flat: Tensor, bits: int) -> ActQuantizer:
    grid = _SEARCHED[kind]
    quantize = _SOFTMAX[kind]
    errors = [float(((quantize(flat, bits, float(v)) - flat) ** 2).sum()) for v in grid]
    best = float(grid[min(range(len(errors)), key=errors.__getitem__)])
    return ActQuantizer(kind, bits, shift=best)


def _mse_range(flat: Tensor, lo: Tensor, hi: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """The shrink of [lo, hi] (same ratio both ends) with the least squared error."""
    errors = torch.stack(
        [((_uniform(flat, lo * r, hi * r, bits) - flat) ** 2).sum() for r in MSE_RATIOS]
    )
    ratio = MSE_RATIOS[int(torch.argmin(errors))]
    return lo * ratio, hi * ratio


def _subsample(count: int, limit: int, like: Tensor) -> Tensor:
    """Indices of at most `limit` of `count` values, on `like`'s device; drawn on the CPU,
    whatever the device, so every machine samples the same values."""
    if count <= limit:
        return torch.arange(count, device=like.device)
    generator = torch.Generator().manual_seed(0)
    return torch.randperm(count, generator=generator, device="cpu")[:limit].to(like.device)
