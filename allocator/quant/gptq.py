"""Error-feedback rounding (GPTQ / OBQ) on the same per-channel grid as round-to-nearest.

Round-to-nearest treats every weight alone. With the second moment of the layer's inputs,
C = E[x x^T], the output error of a row is dw^T C dw; GPTQ quantizes the input columns one at a
time and spreads each column's rounding error over the columns not yet quantized, along C^-1,
so later columns compensate for earlier ones. The grid (per-channel float16 scale from the
clipping rule) is unchanged, so codes pack and reload exactly as before: only which grid point
each weight takes differs. Columns go in order of decreasing C_ii ("act order"), the standard
recipe, with a small dampening of C for numerical stability.

A grouped convolution's groups read disjoint input channels, so each group has its own C (see
`allocator.unfold`) and its own compensation; all groups run together, batched, which keeps a
depthwise layer (one 9x9 C per channel) at nine column steps. The factor of C^-1 depends only
on the statistics, so it is computed once per layer (`inverse_factor`); the widths and
clipping rules differ only in their grids, so they run as one batch of rows through a single
column loop (`gptq_quantize`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from allocator.quant.weight import QuantizedWeight
from allocator.unfold import grouped_weight

DAMPENING = 0.01
"""Fraction of mean(diag C) added to the diagonal before inversion."""
DAMPENING_GROWTH = 10.0
DAMPENING_TRIES = 6
"""A group whose dampened C is still not positive definite (a nearly flat covariance) is retried
with `DAMPENING_GROWTH` times more, up to this many times; heavy dampening tends to plain
rounding, never to a failed job."""
BLOCK = 32
"""Columns per lazy-update block: small enough that a block's rank-1 updates stay in cache."""


@dataclass(frozen=True)
class InverseFactor:
    """What GPTQ reads from one layer's statistics, per weight group: the column order, the
    columns no input ever reaches, and the upper Cholesky factor of the dampened C^-1 in that
    order."""

    order: Tensor
    """(groups, width) column indices, largest C_ii first."""
    dead: Tensor
    """(groups, width) True where C_ii = 0."""
    upper: Tensor
    """(groups, width, width) float64."""


def inverse_factor(second_moment: Tensor) -> InverseFactor:
    """The factor for stacked per-group second moments (groups, width, width)."""
    hessian = second_moment.double().clone()
    diagonal = hessian.diagonal(dim1=1, dim2=2)
    dead = diagonal == 0
    diagonal[dead] = 1.0
    order = torch.argsort(diagonal, dim=1, descending=True)
    hessian = hessian.gather(1, order[:, :, None].expand_as(hessian))
    hessian = hessian.gather(2, order[:, None, :].expand_as(hessian))
    return InverseFactor(order, dead, _upper_inverse(hessian))


def _upper_inverse(hessian: Tensor) -> Tensor:
    """Upper Cholesky factor of each group's dampened inverse, more dampening where needed.

    With J the exchange matrix, J H J = L L^T gives H^-1 = U^T U for U = J L^-1 J, upper with
    a positive diagonal: the factor GPTQ needs, from one Cholesky and one triangular inverse
    (half the work of factoring, inverting and factoring the inverse again)."""
    eye = torch.eye(hessian.shape[-1], dtype=hessian.dtype, device=hessian.device)
    base = hessian.diagonal(dim1=1, dim2=2).mean(1)
    dampening = torch.full_like(base, DAMPENING)
    for attempt in range(DAMPENING_TRIES + 1):
        damped = hessian + (dampening * base)[:, None, None] * eye
        lower, info = torch.linalg.cholesky_ex(damped.flip(-2, -1))
        failed = info != 0
        if not failed.any() or attempt == DAMPENING_TRIES:
            break
        dampening = torch.where(failed, dampening * DAMPENING_GROWTH, dampening)
    if failed.any():
        lower = torch.linalg.cholesky(damped.flip(-2, -1))  # raises, naming the failure
    inverse = torch.linalg.solve_triangular(lower, eye.expand_as(lower), upper=False)
    return inverse.flip(-2, -1)


def gptq_quantize(
    w: Tensor, factor: InverseFactor, grids: Sequence[QuantizedWeight]
) -> list[QuantizedWeight]:
    """Error-feedback codes for `w` on the grid of each round-to-nearest `grids[k]` (output
    channel = dim 0; inputs flattened as the layer unfolds them).

    The grids share the factor and the column order, so they run as one batch: the column steps
    are paid once per layer, not once per width and clipping rule. A float16 grid (no scale)
    comes back as it is.
    """
    scaled = [k for k, grid in enumerate(grids) if grid.scale is not None]
    result = list(grids)
    if not scaled:
        return result
    count = factor.order.shape[0]
    single = grouped_weight(w.detach().double(), count)
    single = single.masked_fill(factor.dead[:, None, :], 0.0)
    rows = single.shape[1]
    # (groups, columns, rows x grids): a column is contiguous, in act order (see `_feedback`).
    order = factor.order[:, :, None]
    columns = single.transpose(1, 2).gather(1, order.expand(-1, -1, rows))
    weight = columns.repeat(1, 1, len(scaled))
    scale = torch.cat(
        [grouped_weight(grids[k].scale.double(), count) for k in scaled],
        dim=1,  # type: ignore[union-attr]
    ).squeeze(-1)
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
    qmax = torch.cat(
        [torch.full((rows,), 2.0 ** (grids[k].bits - 1) - 1, device=w.device) for k in scaled]
    ).double()
    codes = _feedback(weight, divisor, qmax, factor.upper)
    restored = torch.empty_like(codes).scatter_(1, order.expand_as(codes), codes)
    for position, k in enumerate(scaled):
        part = restored[:, :, position * rows : (position + 1) * rows].transpose(1, 2)
        result[k] = QuantizedWeight(
            codes=part.reshape(w.shape),
            scale=grids[k].scale,
            bits=grids[k].bits,
            clip=grids[k].clip,
        )
    return result


def _feedback(weight: Tensor, divisor: Tensor, qmax: Tensor, inverse: Tensor) -> Tensor:
    """GPTQ's column loop over (groups, columns, rows) weights, columns in act order: each
    column is rounded on its row's grid and its error spread over the later columns along
    C^-1; `weight` is updated in place and the codes come back in its layout, as int8.

    Columns-first, a column is one contiguous vector and each step's update of the block's
    later columns is one in-place rank-1 `baddbmm_`; blocks of `BLOCK` columns keep that update
    in cache, and the later blocks take the block's errors in one matrix product. The
    arithmetic is GPTQ's; only the memory traffic differs from a rows-first loop (3x faster on
    ViT-S's layers, same codes).
    """
    codes = torch.empty(weight.shape, dtype=torch.int8, device=weight.device)
    columns = weight.shape[1]
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        block = weight[:, start:end, :]
        errors = torch.empty_like(block)
        inv = inverse[:, start:end, start:end]
        for i in range(end - start):
            column = block[:, i, :]
            code = torch.maximum(torch.minimum(torch.round(column / divisor), qmax), -qmax - 1)
            codes[:, start + i, :] = code
            error = (column - code * divisor) / inv[:, i, i][:, None]
            block[:, i:, :].baddbmm_(inv[:, i, i:][:, :, None], error[:, None, :], alpha=-1)
            errors[:, i, :] = error
        weight[:, end:, :].baddbmm_(inverse[:, start:end, end:].transpose(1, 2), errors, alpha=-1)
    return codes
