"""Sensitivity methods by name, each turning calibration batches into a cost table.

A method is one function in `METHODS`; `+` joins methods (`lrp+fisher`), whose normalised tables
are averaged (see `allocator.costs`). `lrp` and `fisher` read the same forward pass: the shared
`GradientStats` is computed once per job, with only the backward passes the asked methods need.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from allocator import costs
from allocator.costs import QuantChoice
from allocator.layers import LayerTable
from allocator.sensitivity.gradients import GradientStats, gradient_stats
from allocator.sensitivity.hessian import hessian_traces
from allocator.sensitivity.measured import measured_costs
from allocator.zoo.base import Inputs, LoadedModel

Progress = Callable[[float, str], None]


@dataclass
class SensitivityContext:
    """Everything a method may read, plus the shared gradient pass once somebody ran it."""

    model: LoadedModel
    batches: Sequence[Inputs]
    table: LayerTable
    bits: Sequence[int]
    choices: dict[tuple[str, int], QuantChoice]
    methods: tuple[str, ...]
    progress: Progress = lambda _f, _m: None
    gradients: GradientStats | None = None
    timings: dict[str, float] = field(default_factory=dict)

    def shared_gradients(self) -> GradientStats:
        if self.gradients is None:
            n = len(self.batches)
            self.gradients = gradient_stats(
                self.model,
                self.batches,
                self.table,
                fisher="fisher" in self.methods,
                lrp="lrp" in self.methods,
                on_batch=lambda i: self.progress((i + 1) / n, "gradient pass"),
            )
            self.timings["gradients"] = self.gradients.seconds
        return self.gradients


@dataclass(frozen=True)
class Sensitivity:
    method: str
    cost: np.ndarray
    scores: dict[str, float]
    """One number per layer for people to read (relevance share, Fisher mass, trace, ...)."""


QUERY_KEY_SIBLINGS = {"query": "value", "key": "value", "q_proj": "v_proj", "k_proj": "v_proj"}
"""Separate query/key projections and the value projection of the same attention."""


def layer_relevance(names: Sequence[str], relevance: dict[str, float]) -> dict[str, float]:
    """Relevance per layer, with query/key projections given their value projection's share.

    CP-LRP treats attention probabilities as constants, so no relevance reaches a separate query
    or key projection; yet they decide where attention looks and break it when quantized too
    coarsely. They take the share of the value projection beside them (a fused qkv layer
    already carries it). Layers no relevance reached at all count as zero.
    """
    filled = {name: relevance.get(name, 0.0) for name in names}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        sibling = f"{parent}.{QUERY_KEY_SIBLINGS[leaf]}" if leaf in QUERY_KEY_SIBLINGS else None
        if sibling in filled and filled[name] == 0.0:
            filled[name] = filled[sibling]
    return filled


def _lrp(ctx: SensitivityContext) -> Sensitivity:
    relevance = layer_relevance(ctx.table.names, ctx.shared_gradients().relevance)
    total = sum(relevance.values()) or 1.0
    return Sensitivity(
        "lrp",
        costs.lrp_costs(ctx.table, ctx.bits, ctx.choices, relevance),
        {name: value / total for name, value in relevance.items()},
    )


def _fisher(ctx: SensitivityContext) -> Sensitivity:
    fisher = dict(ctx.shared_gradients().fisher_out)
    # A layer no gradient reaches (e.g. BERT's pooler under mean pooling) cannot change the
    # explained output: quantizing it costs nothing.
    modules = dict(ctx.model.module.named_modules())
    for name in ctx.table.names:
        if name not in fisher:
            weight = modules[name].weight
            fisher[name] = torch.zeros(weight.shape[0], device=weight.device)
    return Sensitivity(
        "fisher",
        costs.fisher_costs(ctx.table, ctx.bits, ctx.choices, fisher),
        {name: float(value.sum()) for name, value in fisher.items()},
    )


def _hessian(ctx: SensitivityContext) -> Sensitivity:
    n = 100
    traces = hessian_traces(
        ctx.model,
        ctx.batches,
        ctx.table,
        max_probes=n,
        on_probe=lambda i: ctx.progress(i / n, "Hutchinson probes"),
    )
    ctx.timings["hessian"] = traces.seconds
    return Sensitivity(
        "hessian",
        costs.hessian_costs(ctx.table, ctx.bits, ctx.choices, traces.trace),
        traces.trace,
    )


def _measured(ctx: SensitivityContext) -> Sensitivity:
    cost = measured_costs(
        ctx.model,
        ctx.batches,
        ctx.table,
        ctx.bits,
        ctx.choices,
        on_step=lambda i, n: ctx.progress(i / n, "one layer at a time"),
    )
    column = list(ctx.bits).index(costs.REFERENCE_BITS) if costs.REFERENCE_BITS in ctx.bits else 0
    return Sensitivity(
        "measured", cost, {layer.name: float(cost[i, column]) for i, layer in enumerate(ctx.table)}
    )


METHODS: dict[str, Callable[[SensitivityContext], Sensitivity]] = {
    "lrp": _lrp,
    "fisher": _fisher,
    "hessian": _hessian,
    "measured": _measured,
}
"""One function per name a spec may give (`allocator.job.SENSITIVITY_METHODS`, which
`allocator.job.parse_method` checks a spec's `lrp+fisher` against)."""


def sensitivity_costs(ctx: SensitivityContext) -> tuple[np.ndarray, list[Sensitivity]]:
    """The cost table for `ctx.methods` and each method's own result."""
    results = [METHODS[name](ctx) for name in ctx.methods]
    if len(results) == 1:
        return results[0].cost, results
    return costs.combine([r.cost for r in results], ctx.bits), results
