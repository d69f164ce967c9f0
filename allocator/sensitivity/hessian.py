"""Hutchinson estimate of each layer's Hessian trace (HAWQ-V2), stopped on a tolerance.

`E[v^T H v] = Tr(H)` for Rademacher v; each probe costs a Hessian-vector product (a double
backward). The estimate is noisy on small or random-weight models (traces can come out negative
after 20 probes), so probes continue until the running mean of the total trace moves by less than
`tol` (relative) between probes, and negative traces are clamped to zero. The graph is kept from
one forward and reused for every probe. Attention goes through the math formulation installed by
`relevance_rules` (fused CPU attention has no double backward). Convolutions run channels-first
(see `layout.py`: oneDNN's AVX2 weight-gradient kernel corrupts the heap on some channels-last
1x1 convolutions, FastViT's stem among them).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from allocator.layers import LayerTable
from allocator.sensitivity.gradients import next_token_loss
from allocator.sensitivity.layout import channels_first_convolutions
from allocator.sensitivity.rules import relevance_rules
from allocator.zoo.base import Inputs, LoadedModel


@dataclass(frozen=True)
class HessianTraces:
    trace: dict[str, float]
    """Mean Hessian diagonal per layer: Tr(H_l) / n_l, clamped at zero."""
    probes: int
    converged: bool
    seconds: float


def _loss(model: LoadedModel, inputs: Inputs) -> torch.Tensor:
    out = model(inputs)
    if model.task == "causal-lm":
        return next_token_loss(out, inputs, "mean")
    if model.task == "classification":
        return F.cross_entropy(out, out.detach().argmax(-1))
    # Zero-residual squared distance to the FP32 embedding: its Hessian is the Gauss-Newton 2 J^T J.
    return ((out - out.detach()) ** 2).sum(-1).mean()


def hessian_traces(
    model: LoadedModel,
    batches: Sequence[Inputs],
    table: LayerTable,
    tol: float = 1e-2,
    min_probes: int = 8,
    max_probes: int = 100,
    seed: int = 0,
    on_probe: Callable[[int], None] | None = None,
) -> HessianTraces:
    """Hutchinson traces on the first calibration batch (HAWQ uses one batch as well)."""
    started = time.perf_counter()
    modules = dict(model.module.named_modules())
    weights = [modules[name].weight for name in table.names]
    generator = torch.Generator().manual_seed(seed)
    sums = torch.zeros(len(weights), dtype=torch.float64, device="cpu")  # summed from floats
    previous = None
    converged = False
    probes = 0
    with (
        relevance_rules(model.module, build_lrp=False),
        _twice_differentiable(model.module),
        channels_first_convolutions(model.module),
    ):
        loss = _loss(model, model.inputs(batches[0]))
        # A layer the loss does not reach (a BERT pooler a sentence embedding skips) has no
        # gradient, hence a zero trace: it costs nothing to quantize as far as the loss knows.
        every = torch.autograd.grad(loss, weights, create_graph=True, allow_unused=True)
        used = [i for i, g in enumerate(every) if g is not None and g.requires_grad]
        grads = [every[i] for i in used]
        for probes in range(1, max_probes + 1):
            # Probes are drawn on the CPU, whatever the device: the same ones on every machine.
            vs = [
                (
                    torch.randint(0, 2, w.shape, generator=generator, device="cpu").float() * 2 - 1
                ).to(w.device)
                for w in weights
            ]
            hvs = torch.autograd.grad(
                grads,
                [weights[i] for i in used],
                grad_outputs=[vs[i] for i in used],
                retain_graph=True,
                allow_unused=True,
            )
            for i, hv in zip(used, hvs, strict=True):
                if hv is not None:
                    sums[i] += float((vs[i] * hv).sum())
            if on_probe is not None:
                on_probe(probes)
            total = float(sums.sum()) / probes
            settled = previous is not None and abs(total - previous) <= tol * max(abs(total), 1e-12)
            if settled and probes >= min_probes:
                converged = True
                break
            previous = total
    means = sums / probes
    trace = {
        name: max(float(means[i]), 0.0) / weights[i].numel() for i, name in enumerate(table.names)
    }
    return HessianTraces(trace, probes, converged, time.perf_counter() - started)


TWICE_DIFFERENTIABLE: dict[type[nn.Module], Callable[[torch.Tensor], torch.Tensor]] = {
    nn.Hardsigmoid: lambda x: torch.clamp(x / 6 + 0.5, 0.0, 1.0),
    nn.Hardswish: lambda x: x * torch.clamp(x / 6 + 0.5, 0.0, 1.0),
}
"""The same functions written with ops whose backward has a backward: torch's fused
`hardsigmoid_backward` has none, and MobileNetV3's squeeze-excite gates use it."""


@contextmanager
def _twice_differentiable(module: nn.Module) -> Iterator[None]:
    """Recompute the outputs of activations whose backward cannot be differentiated with an
    equivalent expression that can, for Hutchinson's Hessian-vector products."""
    handles = [
        child.register_forward_hook(lambda _m, args, _out, f=formula: f(args[0]))
        for child in module.modules()
        for kind, formula in TWICE_DIFFERENTIABLE.items()
        if isinstance(child, kind)
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
