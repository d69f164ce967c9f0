"""Error-feedback rounding (GPTQ / OBQ) on the same per-channel grid as round-to-nearest.

Round-to-nearest treats every weight alone. With the second moment of the layer's inputs,
C = E[x x^T], the output error of a row is dw^T C dw; GPTQ quantizes the input columns one at a
time and spreads each column's rounding error over the columns not yet quantized, along C^-1,
so later columns compensate for earlier ones. The grid (per-channel float16 scale from the
clipping rule) is unchanged, so codes pack and reload exactly as before: only which grid point
each weight takes differs. Columns go in order of decreasing C_ii ("act order"), the standard
recipe, with a small dampening of C for numerical stability.
"""

from __future__ import annotations

import torch
from torch import Tensor

from allocator.quant.weight import FLOAT_BITS, QuantizedWeight, quantize_weight

DAMPENING = 0.01
"""Fraction of mean(diag C) added to the diagonal before inversion."""
BLOCK = 128


def gptq_quantize(w: Tensor, second_moment: Tensor, bits: int, clip: str) -> QuantizedWeight:
    """Codes for `w` (output channel = dim 0; inputs flattened as the layer unfolds them)."""
    nearest = quantize_weight(w, bits, clip)
    if bits >= FLOAT_BITS or nearest.scale is None:
        return nearest
    scale = nearest.scale.float()
    qmax = 2 ** (bits - 1) - 1
    weight = w.detach().reshape(w.shape[0], -1).double().clone()
    hessian = second_moment.double().clone()
    dead = torch.diag(hessian) == 0
    hessian[dead, dead] = 1.0
    weight[:, dead] = 0.0
    order = torch.argsort(torch.diag(hessian), descending=True)
    weight = weight[:, order]
    hessian = hessian[order][:, order]
    hessian += DAMPENING * torch.diag(hessian).mean() * torch.eye(len(hessian), dtype=torch.float64)
    inverse = torch.linalg.cholesky(
        torch.cholesky_inverse(torch.linalg.cholesky(hessian)), upper=True
    )
    divisor = torch.where(scale == 0, torch.ones_like(scale), scale).double()
    codes = torch.zeros_like(weight)
    columns = weight.shape[1]
    for start in range(0, columns, BLOCK):
        end = min(start + BLOCK, columns)
        block = weight[:, start:end].clone()
        errors = torch.zeros_like(block)
        inv = inverse[start:end, start:end]
        for i in range(end - start):
            column = block[:, i]
            code = torch.clamp(torch.round(column / divisor), -qmax - 1, qmax)
            codes[:, start + i] = code
            error = (column - code * divisor) / inv[i, i]
            block[:, i:] -= error[:, None] * inv[i, i:][None, :]
            errors[:, i] = error
        weight[:, end:] -= errors @ inverse[start:end, end:]
    restored = torch.empty_like(codes)
    restored[:, order] = codes
    return QuantizedWeight(
        codes=restored.to(torch.int8).reshape(w.shape), scale=nearest.scale, bits=bits, clip=clip
    )
