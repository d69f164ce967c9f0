"""Error-feedback rounding (GPTQ / OBQ) on the same per-channel grid as round-to-nearest.

Round-to-nearest treats every weight alone. With the second moment of the layer's inputs,
C = E[x x^T], the output error of a row is dw^T C dw; GPTQ quantizes the input columns one at a
time and lets each later column compensate for the rounding errors of the columns before it.
The grid (per-channel float16 scale from the clipping rule) is unchanged, so codes pack and
reload exactly as before: only which grid point each weight takes differs. Columns go in order
of decreasing C_ii ("act order"), the standard recipe, with a small dampening of C for numerical
stability.

It runs in the LDL form that QuIP (Chee et al., 2023) proves equivalent to GPTQ: with the
dampened C = (I + M) D (I + M)^T, M strictly upper triangular, column k is rounded from
w_k + sum_{j<k} (w_j - q_j) M_jk. That needs one Cholesky of C, where GPTQ's own form needs
the factor of C^-1 (a Cholesky and a triangular inverse, twice the work); and the output error
comes out of the loop for free, as sum_k D_k r_k^2 over the rounding residuals r_k, so no
candidate pays a (rows x width x width) product to be scored.

A grouped convolution's groups read disjoint input channels, so each group has its own C (see
`allocator.unfold`) and its own compensation; all groups run together, batched, which keeps a
depthwise layer (one 9x9 C per channel) at nine column steps. The factor depends only on the
statistics, so it is computed once per layer (`hessian_factor`); the widths and clipping rules
differ only in their grids, so they run as one batch of rows through a single column loop
(`gptq_quantize`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from allocator.quant.weight import QuantizedWeight
from allocator.unfold import grouped_weight

DAMPENING = 0.01
"""Fraction of mean(diag C) added to the diagonal before factoring."""
DAMPENING_GROWTH = 10.0
DAMPENING_TRIES = 6
"""A group whose dampened C is still not positive definite (a nearly flat covariance) is retried
with `DAMPENING_GROWTH` times more, up to this many times; heavy dampening tends to plain
rounding, never to a failed job."""
BLOCK = 32
"""Columns per lazy-update block: small enough that a block's rank-1 updates stay in cache."""


@dataclass(frozen=True)
class HessianFactor:
    """What GPTQ reads from one layer's statistics, per weight group: the column order, the
    columns no input ever reaches, and the LDL factors of the dampened C in that order."""

    order: Tensor
    """(groups, width) column indices, largest C_ii first."""
    dead: Tensor
    """(groups, width) True where C_ii = 0."""
    feedback: Tensor
    """(groups, width, width) float64 M, strictly upper: column j's rounding error moves
    column k by M_jk times it."""
    pivots: Tensor
    """(groups, width) float64 D, what each column's squared residual costs at the output."""
    dampening: Tensor
    """(groups,) float64, what was added to the diagonal of C (subtracted again from the
    output errors, which are on C itself)."""


@dataclass(frozen=True)
class Rounded:
    """One grid's GPTQ codes, and their output error, E[(dW x)_o^2] per output channel o on the
    undampened C (None for a float16 grid, which GPTQ leaves alone)."""

    quantized: QuantizedWeight
    channel_error: Tensor | None


def hessian_factor(second_moment: Tensor) -> HessianFactor:
    """The factor for stacked per-group second moments (groups, width, width)."""
    diagonal = second_moment.diagonal(dim1=1, dim2=2)
    dead = diagonal == 0
    order = torch.argsort(diagonal.masked_fill(dead, 1.0), dim=1, descending=True)
    # C in reversed act order, for `_upper_factor`: one gather per side, no separate flip.
    backwards = order.flip(1)
    hessian = second_moment.gather(1, backwards[:, :, None].expand_as(second_moment))
    hessian = hessian.gather(2, backwards[:, None, :].expand_as(second_moment)).double()
    hessian.diagonal(dim1=1, dim2=2).masked_fill_(dead.gather(1, backwards), 1.0)
    upper, dampening = _upper_factor(hessian)
    root = upper.diagonal(dim1=1, dim2=2)
    feedback = upper / root[:, None, :]
    feedback.diagonal(dim1=1, dim2=2).zero_()
    return HessianFactor(order, dead, feedback, root.square(), dampening)


def _upper_factor(backwards: Tensor) -> tuple[Tensor, Tensor]:
    """U upper with U U^T = the dampened C, more dampening where needed, and the dampening;
    `backwards` is C with its rows and columns reversed (J C J), dampened in place.

    J C J = L L^T gives C = (J L J)(J L J)^T: one Cholesky."""
    diagonal = backwards.diagonal(dim1=1, dim2=2)
    base = diagonal.mean(1)
    dampening = torch.full_like(base, DAMPENING)
    diagonal.add_((dampening * base)[:, None])
    for attempt in range(DAMPENING_TRIES + 1):
        lower, info = torch.linalg.cholesky_ex(backwards)
        failed = info != 0
        if not failed.any() or attempt == DAMPENING_TRIES:
            break
        grown = torch.where(failed, dampening * DAMPENING_GROWTH, dampening)
        diagonal.add_(((grown - dampening) * base)[:, None])
        dampening = grown
    if failed.any():
        lower = torch.linalg.cholesky(backwards)  # raises, naming the failure
    return lower.flip(-2, -1), dampening * base


def gptq_quantize(
    w: Tensor, factor: HessianFactor, grids: Sequence[QuantizedWeight]
) -> list[Rounded]:
    """Error-feedback codes for `w` on the grid of each round-to-nearest `grids[k]` (output
    channel = dim 0; inputs flattened as the layer unfolds them), with their output errors.

    The grids share the factor and the column order, so they run as one batch: the column steps
    are paid once per layer, not once per width and clipping rule. A float16 grid (no scale)
    comes back as it is.
    """
    scaled = [k for k, grid in enumerate(grids) if grid.scale is not None]
    result = [Rounded(grid, None) for grid in grids]
    if not scaled:
        return result
    count = factor.order.shape[0]
    single = grouped_weight(w.detach().double(), count)
    single = single.masked_fill(factor.dead[:, None, :], 0.0)
    rows = single.shape[1]
    # (groups, columns, rows): a column is contiguous, in act order (see `_feedback`).
    order = factor.order[:, :, None]
    columns = single.transpose(1, 2).gather(1, order.expand(-1, -1, rows)).contiguous()
    scale = torch.cat(
        [grouped_weight(grids[k].scale.double(), count) for k in scaled],
        dim=1,  # type: ignore[union-attr]
    ).squeeze(-1)
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale)
    qmax = torch.cat(
        [torch.full((rows,), 2.0 ** (grids[k].bits - 1) - 1, device=w.device) for k in scaled]
    ).double()
    codes, residual, shift = _feedback(columns, len(scaled), divisor, qmax, factor)
    error = residual - factor.dampening[:, None] * shift
    restored = torch.empty_like(codes).scatter_(1, order.expand_as(codes), codes)
    for position, k in enumerate(scaled):
        part = slice(position * rows, (position + 1) * rows)
        quantized = QuantizedWeight(
            codes=restored[:, :, part].transpose(1, 2).reshape(w.shape),
            scale=grids[k].scale,
            bits=grids[k].bits,
            clip=grids[k].clip,
        )
        result[k] = Rounded(quantized, error[:, part].reshape(-1))
    return result


def _feedback(
    columns: Tensor, grids: int, divisor: Tensor, qmax: Tensor, factor: HessianFactor
) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ's column loop over (groups, columns, rows) weights in act order, for `grids` grids
    at once (rows x grids wide): the int8 codes in that layout, and per (group, row x grid) the
    dampened output error sum_k D_k r_k^2 and the squared weight error sum_k (w_k - q_k)^2.

    Columns-first, a column is one contiguous vector and each step's feedback into the block's
    later columns is one in-place rank-1 `baddbmm_`; blocks of `BLOCK` columns keep that update
    in cache, and the later blocks take the block's errors in one matrix product. The
    arithmetic is GPTQ's; only the memory traffic differs from a rows-first loop.
    """
    groups, width, rows = columns.shape
    target = columns.repeat(1, 1, grids)
    codes = torch.empty(target.shape, dtype=torch.int8, device=target.device)
    residual = torch.zeros(groups, rows * grids, dtype=target.dtype, device=target.device)
    shift = torch.zeros_like(residual)
    feedback, pivots = factor.feedback, factor.pivots
    for start in range(0, width, BLOCK):
        end = min(start + BLOCK, width)
        block = target[:, start:end, :]
        errors = torch.empty_like(block)
        for i in range(end - start):
            column = block[:, i, :]
            code = torch.maximum(torch.minimum(torch.round(column / divisor), qmax), -qmax - 1)
            codes[:, start + i, :] = code
            grid_point = code * divisor
            residual.addcmul_(pivots[:, start + i, None], (column - grid_point).square())
            error = (columns[:, start + i, None, :] - grid_point.view(groups, grids, rows)).view(
                groups, -1
            )
            shift.add_(error.square())
            block[:, i + 1 :, :].baddbmm_(
                feedback[:, start + i, start + i + 1 : end, None], error[:, None, :]
            )
            errors[:, i, :] = error
        target[:, end:, :].baddbmm_(feedback[:, start:end, end:].transpose(1, 2), errors)
    return codes, residual, shift
