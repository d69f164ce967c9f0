"""One forward, up to two backward passes: per-sample Fisher and LRP relevance per layer.

Both methods need the same forward values but different backward graphs (true gradients of a
loss for Fisher, LRP-modified gradients of the explained output for relevance). The forward runs
once under `relevance_rules`; each backward asks `torch.autograd.grad` for the gradients at the
weight layers' *outputs* only, so no weight gradient is ever formed. Samples in a batch are
independent and the loss is summed, so the gradient at sample s's outputs is that sample's own
gradient: squaring and summing it per output channel gives the per-sample empirical Fisher of
the layer's outputs with no per-sample backward.

What is explained and what the loss is:
- classifiers: the logit of the FP32 top-1 class (LRP), cross-entropy against it (Fisher);
- embedding models: `e . e_fp32.detach()` (LRP), and `e . r` with r ~ N(0, I) for Fisher: the
  Monte-Carlo Fisher of a Gaussian likelihood on the embedding, since the gradient of any
  distance to the FP32 embedding is zero at the FP32 point;
- causal LMs: the LM loss, the cross-entropy of each true next token of the window (Fisher),
  and, summed over positions, the log-probability of the true next token linearised at the
  logits (LRP): `z_y - sum_j p_j z_j` with the probabilities p detached. Its gradient at the
  logits is exactly that of `log p(y)`, so relevance follows what perplexity measures; and it
  is linear in the logits, so the rules conserve it as they conserve a classifier's logit
  (`log p(y)` itself is not). The raw true-token logit would be linear too, but would also
  credit the part shared by all logits, which the softmax ignores.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from allocator.layers import LayerTable
from allocator.sensitivity.rules import relevance_rules
from allocator.zoo.base import Inputs, LoadedModel


@dataclass
class GradientStats:
    """Per-layer results of the shared pass, averaged over calibration samples."""

    fisher_out: dict[str, torch.Tensor] = field(default_factory=dict)
    """Per output channel: sum over positions of the squared per-sample output gradient."""
    relevance: dict[str, float] = field(default_factory=dict)
    explained: float = 0.0
    samples: int = 0
    seconds: float = 0.0


def _batch_size(inputs: Inputs) -> int:
    if isinstance(inputs, torch.Tensor):
        return inputs.shape[0]
    return next(iter(inputs.values())).shape[0]


class _Capture:
    """Forward hooks that keep each weight layer's (graph-attached) output."""

    def __init__(self, module: nn.Module, names: Sequence[str]) -> None:
        self.layers = dict(module.named_modules())
        self.outputs: dict[str, list[torch.Tensor]] = {n: [] for n in names}
        self.handles = [self.layers[n].register_forward_hook(self._hook(n)) for n in names]

    def _hook(self, name: str) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: torch.Tensor) -> None:
            self.outputs[name].append(out)

        return hook

    def clear(self) -> None:
        for name in self.outputs:
            self.outputs[name].clear()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def next_token_loss(logits: torch.Tensor, inputs: Inputs, reduction: str) -> torch.Tensor:
    """The LM loss: cross-entropy of each window's token t + 1 under its logits at t."""
    targets = inputs["input_ids"][:, 1:]
    return F.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction=reduction
    )


def _objectives(
    model: LoadedModel, inputs: Inputs, out: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(Fisher loss summed over samples, explained quantity per sample)."""
    if model.task == "causal-lm":
        logits = out[:, :-1]
        probs = logits.detach().softmax(dim=-1)
        true = logits.gather(-1, inputs["input_ids"][:, 1:, None]).squeeze(-1)
        explained = (true - (probs * logits).sum(dim=-1)).sum(dim=-1)
        return next_token_loss(out, inputs, "sum"), explained
    if model.task == "classification":
        target = out.detach().argmax(dim=-1)
        loss = F.cross_entropy(out, target, reduction="sum")
        explained = out.gather(-1, target[:, None]).squeeze(-1)
        return loss, explained
    # Drawn on the CPU, whatever the device: the same probe on every machine.
    noise = torch.randn(out.shape, generator=generator, device="cpu").to(out.device)
    return (out * noise).sum(), (out * out.detach()).sum(-1)


def gradient_stats(
    model: LoadedModel,
    batches: Sequence[Inputs],
    table: LayerTable,
    fisher: bool = True,
    lrp: bool = True,
    seed: int = 0,
    on_batch: Callable[[int], None] | None = None,
) -> GradientStats:
    """Run the shared pass over `batches`; each backward is skipped when its method is off."""
    names = table.names
    stats = GradientStats()
    generator = torch.Generator().manual_seed(seed)
    capture = _Capture(model.module, names)
    started = time.perf_counter()
    try:
        with relevance_rules(model.module, build_lrp=lrp) as state:
            for index, batch in enumerate(batches):
                capture.clear()
                inputs = model.inputs(batch)  # the loss reads token ids beside the outputs
                out = model(inputs)
                loss, explained = _objectives(model, inputs, out, generator)
                stats.samples += _batch_size(inputs)
                stats.explained += float(explained.detach().sum())
                outs = [y for n in names for y in capture.outputs[n]]
                if fisher:
                    state.backward = "true"
                    grads = torch.autograd.grad(loss, outs, retain_graph=lrp, allow_unused=True)
                    _add_fisher(stats, capture, names, grads)
                if lrp:
                    state.backward = "lrp"
                    grads = torch.autograd.grad(explained.sum(), outs, allow_unused=True)
                    _add_relevance(stats, capture, names, grads)
                if on_batch is not None:
                    on_batch(index)
    finally:
        capture.remove()
    for name in stats.fisher_out:
        stats.fisher_out[name] /= stats.samples
    for name in stats.relevance:
        stats.relevance[name] /= stats.samples
    stats.seconds = time.perf_counter() - started
    return stats


def _per_output(
    capture: _Capture, names: Sequence[str], grads: Sequence[torch.Tensor | None]
) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """Pair every captured call of every layer with its gradient: (name, y, g)."""
    pairs = []
    flat = iter(grads)
    for name in names:
        for y in capture.outputs[name]:
            g = next(flat)
            if g is not None:
                pairs.append((name, y, g))
    return pairs


def _add_fisher(stats: GradientStats, capture: _Capture, names, grads) -> None:
    for name, _y, g in _per_output(capture, names, grads):
        squared = g.detach() ** 2
        if isinstance(capture.layers[name], nn.Conv2d):
            per_channel = squared.sum(dim=(0, 2, 3))
        else:
            per_channel = squared.reshape(-1, squared.shape[-1]).sum(0)
        stats.fisher_out[name] = stats.fisher_out.get(name, 0) + per_channel


def _add_relevance(stats: GradientStats, capture: _Capture, names, grads) -> None:
    """Relevance carried by a layer's weights: |(y - bias) * g| summed over its outputs."""
    for name, y, g in _per_output(capture, names, grads):
        layer = capture.layers[name]
        y = y.detach()
        if layer.bias is not None:
            shape = [1] * y.dim()
            shape[1 if isinstance(layer, nn.Conv2d) else -1] = -1
            y = y - layer.bias.detach().view(shape)
        stats.relevance[name] = stats.relevance.get(name, 0.0) + float((y * g).abs().sum())
