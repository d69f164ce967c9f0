"""Measured sensitivity: quantize one layer at a time and measure how far the outputs move.

This is CalibTIP's per-layer cost and the slowest method (one calibration pass per layer and
width). Accuracy drops on a few hundred samples are too coarse and noisy to add up (many come out
negative), so the divergence from the FP32 outputs is measured instead: KL of the class
distributions for classifiers, of the next-token distributions (averaged over a window's
positions) for causal LMs, 1 - cosine similarity for embedding models (the held-out checks
of whole plans rank an embedding model's pairwise similarities instead, `mean_divergence`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from allocator.costs import QuantChoice
from allocator.layers import LayerTable
from allocator.zoo.base import LOGIT_TASKS, Inputs, LoadedModel


def divergence(task: str, reference: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Per-sample divergence of `output` from the FP32 `reference`."""
    if task in LOGIT_TASKS:
        log_p = F.log_softmax(reference, dim=-1)
        log_q = F.log_softmax(output, dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        return kl.reshape(kl.shape[0], -1).mean(-1)
    return 1.0 - F.cosine_similarity(reference, output, dim=-1)


def mean_divergence(
    model: LoadedModel, batches: Sequence[Inputs], reference: Sequence[torch.Tensor]
) -> float:
    """How far `model`, as it is now (quantized by whatever context the caller entered), is
    from its FP32 `reference` outputs on `batches`: the per-sample divergence averaged over the
    samples, or for an embedding model how far the similarity ranking of its samples moved
    (`similarity_divergence`)."""
    total, weight = 0.0, 0
    with torch.inference_mode():
        for inputs, ref in zip(batches, reference, strict=True):
            out = model(inputs)  # `reference` may be kept on the CPU, `out` on a GPU
            ref = ref.to(out.device)
            if model.task == "embedding" and out.shape[0] >= MIN_SIMILARITY_BATCH:
                pairs = out.shape[0] * (out.shape[0] - 1) // 2
                total += similarity_divergence(ref, out) * pairs
                weight += pairs
            else:
                total += float(divergence(model.task, ref, out).sum())
                weight += ref.shape[0]
    return total / weight


MIN_SIMILARITY_BATCH = 3
"""Fewer samples than this have too few pairs to rank: their cosine divergence is used."""


def similarity_divergence(reference: torch.Tensor, output: torch.Tensor) -> float:
    """1 - Spearman correlation between the pairwise cosine similarities of `output`'s rows and
    those of the FP32 `reference`.

    An embedding is used through its similarities (STS ranks sentence pairs by cosine), so what
    a quantized model must keep is which pairs are more alike, not each vector's direction. On
    MiniLM the per-sentence cosine chose the fit that lowered STS-B Spearman, the similarity
    ranking the one that raised it (docs/design.md has the figures)."""
    rows = torch.triu_indices(len(output), len(output), offset=1, device=output.device)

    def similarities(x: torch.Tensor) -> torch.Tensor:
        unit = F.normalize(x.float().reshape(len(x), -1), dim=-1)
        return (unit @ unit.T)[rows[0], rows[1]]

    ours, theirs = _ranks(similarities(output)), _ranks(similarities(reference))
    ours, theirs = ours - ours.mean(), theirs - theirs.mean()
    return 1.0 - float((ours * theirs).sum() / (ours.norm() * theirs.norm()))


def _ranks(values: torch.Tensor) -> torch.Tensor:
    """Ranks 0..n-1, ties broken by position (similarities of float outputs rarely tie), so
    three or more pairs never have all ranks equal."""
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[values.argsort()] = torch.arange(len(values), dtype=torch.float64, device=values.device)
    return ranks


@contextmanager
def quantized_layer(layer: nn.Module, choice: QuantChoice) -> Iterator[None]:
    """Temporarily give `layer` its quantized weight (and bias correction)."""
    original = layer.weight.data
    layer.weight.data = original + choice.weight_error
    handle = None
    if choice.bias_correction is not None:
        correction = choice.bias_correction

        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> torch.Tensor:
            shape = [1] * out.dim()
            shape[1 if isinstance(layer, nn.Conv2d) else -1] = -1
            return out + correction.view(shape)

        handle = layer.register_forward_hook(hook)
    try:
        yield
    finally:
        layer.weight.data = original
        if handle is not None:
            handle.remove()


@contextmanager
def quantized_layers(model: nn.Module, layers: Mapping[str, QuantChoice]) -> Iterator[None]:
    """`quantized_layer` for each of `layers` (by module name) at once."""
    modules = dict(model.named_modules())
    with ExitStack() as stack:
        for name, choice in layers.items():
            stack.enter_context(quantized_layer(modules[name], choice))
        yield


def measured_costs(
    model: LoadedModel,
    batches: Sequence[Inputs],
    table: LayerTable,
    bits: Sequence[int],
    choices: dict[tuple[str, int], QuantChoice],
    on_step: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """cost[l, b] = mean divergence from FP32 with only layer l at b bits (pinned rows stay 0)."""
    modules = dict(model.module.named_modules())
    with torch.inference_mode():
        reference = [model(inputs) for inputs in batches]
        cost = np.zeros((len(table), len(bits)))
        steps = len(table) * len(bits)
        for i, layer in enumerate(table):
            for j, b in enumerate(bits):
                if layer.pinned_bits is not None:
                    continue
                with quantized_layer(modules[layer.name], choices[(layer.name, b)]):
                    total = sum(
                        float(divergence(model.task, ref, model(inputs)).sum())
                        for inputs, ref in zip(batches, reference, strict=True)
                    )
                cost[i, j] = total / sum(ref.shape[0] for ref in reference)
                if on_step is not None:
                    on_step(i * len(bits) + j + 1, steps)
    return cost
