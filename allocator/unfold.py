"""What a weight layer multiplies: its input as rows, one block per weight group.

Input statistics, GPTQ, bias correction and the layer table's check all need the vectors each
output channel's weights are multiplied by. For `nn.Linear` that is each token. For `nn.Conv2d`
it is the receptive field of each output position, channel-major as the weight flattens
(`c * kh * kw + i * kw + j`); a grouped convolution with G groups multiplies only its group's
`Cin / G` input channels by the weights of its `Cout / G` output channels, so its rows are
`(positions, G, Cin / G * kh * kw)`. A depthwise 3x3 layer (G = Cin) thus reads one 9-wide row
per channel and position, never the `Cin * 9`-wide patch of an ungrouped view.

Patches are gathered at the sampled output positions only, from the input padded the way the
layer's forward pads it, so memory follows the sample, not the feature map times the kernel.
Classes pad in more ways than `nn.Conv2d.padding` says: timm's `Conv2dSame` and the
`Conv2dStaticSamePadding` / `Conv2dDynamicSamePadding` of the EfficientNet ports pad like
TensorFlow's 'SAME' in their own forward, with `padding` left at 0. So the rule is not taken from
the class but matched on a real forward (`match_padding`): the first rule in `PADDINGS` under
which the rows times the weight give the layer's output is the layer's, and a layer no rule
explains (a forward that standardises its weight, pads another way) is not quantized.

Imports torch only.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Padding = Callable[[nn.Conv2d, Tensor], tuple[int, int, int, int]]
"""(layer, input) -> the (left, right, top, bottom) padding its forward applies."""

LINEAR = ""
"""The padding rule name of a layer that is not a convolution."""
MISMATCH_TOLERANCE = 1e-3
"""Relative Frobenius gap between the rows' product and the layer's output that still counts as
the same computation (float32 summation order differs between a convolution and a matmul)."""
CHECKED_POSITIONS = 16


class Unreadable(Exception):
    """A layer whose output bitplan cannot reproduce from its input rows; the message says why."""


def _static_padding(layer: nn.Conv2d, _x: Tensor) -> tuple[int, int, int, int]:
    """nn.Conv2d's own: symmetric integers, 'valid', or 'same' (the odd extra on the right)."""
    if layer.padding == "valid":
        return (0, 0, 0, 0)
    if layer.padding == "same":
        sides = []
        for k, d in zip(reversed(layer.kernel_size), reversed(layer.dilation), strict=True):
            total = d * (k - 1)
            sides += [total // 2, total - total // 2]
        return (sides[0], sides[1], sides[2], sides[3])
    ph, pw = layer.padding  # type: ignore[misc]
    return (pw, pw, ph, ph)


def _tf_same_padding(layer: nn.Conv2d, x: Tensor) -> tuple[int, int, int, int]:
    """TensorFlow 'SAME' from the input size: the output has ceil(size / stride) positions."""
    sides = []
    for size, k, s, d in zip(
        reversed(x.shape[-2:]),
        reversed(layer.kernel_size),
        reversed(layer.stride),
        reversed(layer.dilation),
        strict=True,
    ):
        total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
        sides += [total // 2, total - total // 2]
    return (sides[0], sides[1], sides[2], sides[3])


PADDINGS: dict[str, Padding] = {"conv2d": _static_padding, "tf-same": _tf_same_padding}
"""The ways a convolution's forward may pad its input, tried in this order."""


def groups(layer: nn.Module) -> int:
    """How many independent weight groups the layer has (1 for Linear and ungrouped convs)."""
    return layer.groups if isinstance(layer, nn.Conv2d) else 1


def grouped_weight(weight: Tensor, count: int) -> Tensor:
    """`weight` (output channel = dim 0) as (groups, Cout / groups, row width)."""
    return weight.reshape(count, weight.shape[0] // count, -1)


def positions(layer: nn.Module, x: Tensor, padding: str) -> int:
    """How many rows the layer's forward multiplies on input `x` (per group)."""
    if isinstance(layer, nn.Conv2d):
        height, width = _out_size(layer, x, padding)
        return x.shape[0] * height * width
    return x.numel() // x.shape[-1]


def rows(layer: nn.Module, x: Tensor, padding: str, pick: Tensor | None = None) -> Tensor:
    """The rows at positions `pick` (all when None) as (rows, groups, row width), the input
    padded by the rule named `padding` (`match_padding`'s answer for this layer)."""
    if not isinstance(layer, nn.Conv2d):
        flat = x.reshape(-1, x.shape[-1])
        return (flat if pick is None else flat[pick.to(x.device)])[:, None, :]
    # Positions may be drawn on the CPU (the same rows on every device); they index `x` there.
    pick = (
        torch.arange(positions(layer, x, padding), device=x.device)
        if pick is None
        else pick.to(x.device)
    )
    height, width = _out_size(layer, x, padding)
    sample, place = pick // (height * width), pick % (height * width)
    kh, kw = layer.kernel_size
    ky = (torch.arange(kh, device=x.device) * layer.dilation[0]).repeat_interleave(kw)
    kx = (torch.arange(kw, device=x.device) * layer.dilation[1]).repeat(kh)
    ys = (place // width)[:, None] * layer.stride[0] + ky[None, :]
    xs = (place % width)[:, None] * layer.stride[1] + kx[None, :]
    channels_last = _padded(layer, x, padding).permute(0, 2, 3, 1)
    patches = channels_last[sample[:, None], ys, xs]  # (rows, kh * kw, channels)
    return patches.transpose(1, 2).reshape(len(pick), groups(layer), -1)


def output_rows(layer: nn.Module, out: Tensor, pick: Tensor) -> Tensor:
    """The layer's output at positions `pick`, as (rows, output channels)."""
    if isinstance(layer, nn.Conv2d):
        out = out.permute(0, 2, 3, 1)
    return out.reshape(-1, out.shape[-1])[pick.to(out.device)]


def match_padding(layer: nn.Module, x: object, out: object) -> str:
    """The padding rule under which `layer`'s output on `x` is its weight times `rows` plus its
    bias (`LINEAR` for a Linear layer); raises `Unreadable` when none is.

    Checked at a few spread positions of one real forward, so a class whose forward computes
    something else is caught whatever it overrides.
    """
    kind = type(layer).__name__
    if not isinstance(x, Tensor) or not isinstance(out, Tensor):
        raise Unreadable(f"{kind} is not called with one input tensor and one output tensor")
    if not isinstance(layer, nn.Conv2d):
        if _reproduces(layer, x, out, LINEAR):
            return LINEAR
    else:
        shaped = [
            name
            for name in PADDINGS
            if tuple(out.shape) == (x.shape[0], layer.out_channels, *_out_size(layer, x, name))
        ]
        if not shaped:
            raise Unreadable(
                f"{kind} gives outputs of shape {tuple(out.shape)}, which neither nn.Conv2d's "
                "padding nor TensorFlow's 'SAME' gives: its forward pads in its own way"
            )
        for name in shaped:
            if _reproduces(layer, x, out, name):
                return name
    raise Unreadable(
        f"{kind}'s forward does not compute its weight times its input (it transforms the "
        "weight or the input first)"
    )


def _reproduces(layer: nn.Module, x: Tensor, out: Tensor, padding: str) -> bool:
    total = positions(layer, x, padding)
    pick = (
        torch.linspace(0, total - 1, min(total, CHECKED_POSITIONS), device=x.device).round().long()
    )
    count = groups(layer)
    weight = grouped_weight(layer.weight.detach(), count)
    product = torch.einsum("rgd,gcd->rgc", rows(layer, x.detach(), padding, pick), weight)
    product = product.reshape(len(pick), -1)
    if layer.bias is not None:
        product = product + layer.bias.detach()
    target = output_rows(layer, out.detach(), pick)
    return float((product - target).norm()) <= MISMATCH_TOLERANCE * float(target.norm()) + 1e-6


def _out_size(layer: nn.Conv2d, x: Tensor, padding: str) -> tuple[int, int]:
    left, right, top, bottom = PADDINGS[padding](layer, x)
    padded = (x.shape[-2] + top + bottom, x.shape[-1] + left + right)
    height, width = (
        (size - d * (k - 1) - 1) // s + 1
        for size, k, s, d in zip(
            padded, layer.kernel_size, layer.stride, layer.dilation, strict=True
        )
    )
    return height, width


def _padded(layer: nn.Conv2d, x: Tensor, padding: str) -> Tensor:
    pad = PADDINGS[padding](layer, x)
    if not any(pad):
        return x
    mode = "constant" if layer.padding_mode == "zeros" else layer.padding_mode
    return F.pad(x, pad, mode=mode)
