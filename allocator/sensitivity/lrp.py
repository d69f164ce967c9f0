"""Relevance conservation: the check that keeps our LRP rules honest on every model family.

With the rules of `rules.py`, the explained output is a sum of contributions of everything that
enters the network additively: the input (pixels, or the token/position/type embeddings of a
text model), biases, position embeddings and class tokens, the effective bias of each
eval-mode BatchNorm (beta - gamma * mean / std), and the offset f(0) of each activation the
identity rule passes relevance through. If a rule is wrong for some block, relevance is
created or destroyed there and the sum stops matching.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from allocator.sensitivity.gradients import _objectives
from allocator.sensitivity.layout import channels_first_convolutions
from allocator.sensitivity.rules import relevance_rules
from allocator.zoo.base import Inputs, LoadedModel

ADDITIVE_PARAMETERS = (
    "bias",
    "pos_embed",
    "cls_token",
    "reg_token",
    "absolute_pos_embed",
    "position_embeddings",  # Hugging Face ViT's (a parameter there, an nn.Embedding in BERT)
)
BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
"""Their channels are dim 1 whatever the rank (LeViT's BatchNorm1d sees (tokens, channels))."""


@dataclass(frozen=True)
class Conservation:
    explained: float
    input_relevance: float
    absorbed: float

    @property
    def total(self) -> float:
        return self.input_relevance + self.absorbed

    @property
    def relative_error(self) -> float:
        return abs(self.total - self.explained) / max(abs(self.explained), 1e-12)


def conservation(model: LoadedModel, inputs: Inputs, seed: int = 0) -> Conservation:
    """Relevance reaching the input plus what additive terms absorbed, against the explained sum."""
    module = model.module
    sources: list[torch.Tensor] = []
    bn_terms: list[tuple[torch.Tensor, torch.Tensor]] = []
    handles = []
    inputs = model.inputs(inputs)
    if isinstance(inputs, torch.Tensor):
        inputs = inputs.clone().requires_grad_(True)
        sources.append(inputs)
    for child in module.modules():
        if isinstance(child, nn.Embedding):
            handles.append(child.register_forward_hook(lambda _m, _a, out: sources.append(out)))
        elif isinstance(child, BATCH_NORMS):
            handles.append(_bn_hook(child, bn_terms))
    params = [
        p
        for name, p in module.named_parameters()
        if name.split(".")[-1] in ADDITIVE_PARAMETERS and p.requires_grad
    ]
    try:
        # Bias gradients take the weight-gradient kernel `layout.py` keeps off channels-last data.
        with channels_first_convolutions(module), relevance_rules(module, build_lrp=True) as state:
            offsets: list[torch.Tensor] = []
            state.offsets = offsets
            out = model(inputs)
            _loss, explained = _objectives(model, inputs, out, torch.Generator().manual_seed(seed))
            state.backward = "lrp"
            absorbing = params + offsets
            targets = sources + absorbing + [y for y, _ in bn_terms]
            grads = torch.autograd.grad(explained.sum(), targets, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
    n_src, n_abs = len(sources), len(absorbing)
    input_rel = sum(_dot(t, g) for t, g in zip(sources, grads[:n_src], strict=True))
    absorbed = sum(_dot(c, g) for c, g in zip(absorbing, grads[n_src : n_src + n_abs], strict=True))
    for (_y, bias), g in zip(bn_terms, grads[n_src + n_abs :], strict=True):
        if g is not None:
            absorbed += float((g * bias.view(1, -1, *(1,) * (g.dim() - 2))).sum())
    return Conservation(float(explained.detach().sum()), float(input_rel), float(absorbed))


def _dot(t: torch.Tensor, g: torch.Tensor | None) -> float:
    return 0.0 if g is None else float((t.detach() * g).sum())


def _bn_hook(
    norm: nn.modules.batchnorm._BatchNorm, terms: list
) -> torch.utils.hooks.RemovableHandle:
    """Record the batch norm's output and the constant it adds besides its `bias` parameter
    (which `conservation` already counts as a parameter when it is trainable): the shift
    `-gamma * mean / std` of eval-mode normalisation. timm's BatchNormAct2d applies
    its activation inside its own forward: its module output is past the activation, so the
    norm's output is read where it enters the activation instead (`relevance_rules` runs
    activations out of place while it builds the LRP graph, so that input is still the norm's
    output)."""

    def record(y: torch.Tensor) -> None:
        std = torch.sqrt(norm.running_var + norm.eps)
        weight = norm.weight if norm.weight is not None else 1
        shift = -weight * norm.running_mean / std
        if norm.bias is not None and not norm.bias.requires_grad:
            shift = shift + norm.bias
        terms.append((y, shift.detach()))

    act = getattr(norm, "act", None)
    if isinstance(act, nn.Module) and not isinstance(act, nn.Identity):
        return act.register_forward_pre_hook(lambda _m, args: record(args[0]))
    return norm.register_forward_hook(lambda _m, _args, out: record(out))
