"""Scaled dot-product attention in its math form, with the probabilities exposed.

LRP (constant attention probabilities in the backward pass) and activation quantization
(post-Softmax quantizers) both need the probabilities that fused attention never materialises.
timm and Hugging Face call `torch.nn.functional.scaled_dot_product_attention` by attribute, so
both replace that function while they are active and compute it here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

ORIGINAL_SDPA = F.scaled_dot_product_attention

Combine = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""(probabilities, v) -> attention output; `probs @ v` with something done to either."""


def attention_probs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T * scale + mask) and v (heads repeated for grouped-query attention); the
    attention output is `probs @ v`. Dropout is not applied: both users run in eval mode."""
    if enable_gqa and k.shape[-3] != q.shape[-3]:
        repeat = q.shape[-3] // k.shape[-3]
        k = k.repeat_interleave(repeat, dim=-3)
        v = v.repeat_interleave(repeat, dim=-3)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale
    if is_causal:
        n, m = scores.shape[-2:]
        causal = torch.ones(n, m, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, float("-inf"))
        else:
            scores = scores + attn_mask
    return scores.softmax(dim=-1), v


def sdpa_replacement(
    fallback: Callable[..., torch.Tensor], active: Callable[[], Combine | None]
) -> Callable[..., torch.Tensor]:
    """A drop-in for `F.scaled_dot_product_attention`: while `active()` returns a combine
    function, attention is computed in math form and combined by it; otherwise `fallback` runs."""

    def attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
        dropout_p: float = 0.0,
        is_causal: bool = False,
        scale: float | None = None,
        enable_gqa: bool = False,
    ) -> torch.Tensor:
        combine = active()
        if combine is None:
            return fallback(
                q,
                k,
                v,
                attn_mask=attn_mask,
                dropout_p=dropout_p,
                is_causal=is_causal,
                scale=scale,
                enable_gqa=enable_gqa,
            )
        probs, v = attention_probs(q, k, v, attn_mask, is_causal, scale, enable_gqa)
        return combine(probs, v)

    return attention
