"""The report's data: every measured plan priced with the job's cost table, the predicted
frontier, and how well the predicted loss ranked the measured plans.

Quality against size for every plan that was measured (FP32, the uniform widths, the chosen mixed
plan) next to the frontier the cost table predicts, and whether the predicted loss ranked the
measured plans the way the measurements did (Spearman's rank correlation: the solver only needs
the ranking to be right, not the scale). Computed once from a `Result`; `allocator.report.plots`
draws it and `allocator.report.html` lays it out. Imports numpy, scipy, the cost-table reader and
the solver; never matplotlib, the web, database or queue layers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import spearmanr

from allocator.budget import BITS_PER_MB, FP32_BITS, ResolvedBudget
from allocator.errors import InfeasibleBudget
from allocator.job import Result
from allocator.job_metrics import HIGHER_IS_BETTER, Scores
from allocator.layers import LayerTable
from allocator.profile import CostTable
from allocator.solve import solve_budgets

SWEEP_POINTS = 25
"""Budgets in the predicted frontier, evenly spaced in size between the narrowest and widest
uniform plan: enough for a smooth curve, and each is one warm-started re-solve."""
SWEEP_TIME_LIMIT = 1.0
"""Solver seconds per frontier budget: the frontier is an illustration, not the job's answer."""
MIN_RANK_POINTS = 3
"""Fewer measured plans than this give no meaningful rank correlation."""


@dataclass(frozen=True)
class Point:
    """One plan on the quality / size plane.

    `quality` is the measured primary metric (None for a predicted frontier point); `predicted`
    is the summed cost-table loss of the plan (0 for FP32, inf when the table forbids a width).
    """

    label: str
    kind: str
    weight_mb: float
    avg_bits: float
    predicted: float
    quality: float | None = None
    scores: Scores | None = None
    """Every metric measured on the plan (None for a predicted point)."""
    bops: float | None = None
    """Bit operations per sample, for jobs that quantize activations (None otherwise)."""


@dataclass(frozen=True)
class Report:
    """Everything the page and the pictures show, computed once from a `Result`."""

    primary: str
    measured: list[Point]
    frontier: list[Point]
    rank_correlation: float | None

    @property
    def fp32(self) -> Point:
        return self.measured[0]

    def degradation(self, point: Point) -> float | None:
        return degradation(self.primary, self.fp32, point)


def degradation(primary: str, fp32: Point, point: Point) -> float | None:
    """How much worse than FP32 a plan measured, in metric units, positive when worse whichever
    way the metric runs (top-1 drops, KL rises)."""
    if point.quality is None or fp32.quality is None:
        return None
    loss = fp32.quality - point.quality
    return loss if HIGHER_IS_BETTER.get(primary, True) else -loss


def build(result: Result) -> Report:
    """Price every measured plan with the job's cost table and solve the predicted frontier."""
    costs = CostTable.from_dict(result.profile)
    primary = result.metrics.primary
    measured = measured_points(result, costs)
    compared = [p for p in measured[1:] if math.isfinite(p.predicted)]
    correlation = rank_correlation(
        [p.predicted for p in compared],
        [degradation(primary, measured[0], p) or 0.0 for p in compared],
    )
    return Report(primary, measured, predicted_frontier(costs), correlation)


def measured_points(result: Result, costs: CostTable) -> list[Point]:
    """FP32 first, then the uniform widths from narrow to wide, then the chosen mixed plan."""
    metrics = result.metrics
    primary = metrics.primary
    table = costs.table
    fp32_mb = FP32_BITS * table.total_params / BITS_PER_MB
    with_acts = result.act_allocation is not None
    macs = sum(layer.macs for layer in table)
    fp32_bops = float(macs * FP32_BITS * FP32_BITS) if with_acts else None
    fp32 = metrics.fp32
    points = [Point("FP32", "fp32", fp32_mb, FP32_BITS, 0.0, fp32[primary], fp32, fp32_bops)]
    for uniform in sorted(metrics.measured_uniform(), key=lambda entry: entry.bits):
        plan = costs.uniform_plan(uniform.bits)
        scores = {k: uniform.scores[k] for k in fp32 if k in uniform.scores}
        act = uniform.act_bits
        label = f"W{uniform.bits}" + (f"A{act}" if act else "")
        bops = _bops(table, plan, act) if with_acts and act else None
        points.append(_point(label, "uniform", costs, plan, scores, primary, bops))
    mixed = {entry["layer"]: entry["weight_bits"] for entry in result.allocation}
    mixed_bops = result.bops if with_acts else None
    points.append(_point("mixed", "mixed", costs, mixed, metrics.quantized, primary, mixed_bops))
    return points


def _bops(table: LayerTable, plan: Mapping[str, int], act_bits: int) -> float:
    return float(sum(layer.macs * plan[layer.name] * act_bits for layer in table))


def _point(
    label: str,
    kind: str,
    costs: CostTable,
    plan: Mapping[str, int],
    scores: Scores,
    primary: str,
    bops: float | None = None,
) -> Point:
    table = costs.table
    return Point(
        label=label,
        kind=kind,
        weight_mb=table.storage_bits(plan) / BITS_PER_MB,
        avg_bits=_avg_bits(table, plan),
        predicted=costs.plan_cost(plan),
        quality=scores[primary],
        scores=scores,
        bops=bops,
    )


def predicted_frontier(costs: CostTable, points: int = SWEEP_POINTS) -> list[Point]:
    """The cheapest predicted plan at sizes from the narrowest to the widest uniform plan (at
    most 8 bits): what the cost table says each size can buy, without measuring any of it.

    Empty when the narrowest uniform size admits no plan (the table forbids that width on some
    layer): the frontier illustrates the job and must never fail it.
    """
    widths = [b for b in costs.bits if b <= 8] or list(costs.bits)
    table = costs.table
    low, high = (table.storage_bits(costs.uniform_plan(b)) for b in (min(widths), max(widths)))
    budgets = [ResolvedBudget(size_bits=float(s)) for s in np.linspace(low, high, points)]
    try:
        solutions = solve_budgets(
            table, costs.bits, costs.cost, budgets, time_limit=SWEEP_TIME_LIMIT
        )
    except InfeasibleBudget:
        return []
    return [
        Point(
            label=f"{solution.storage_bits / BITS_PER_MB:.4g} MB",
            kind="predicted",
            weight_mb=solution.storage_bits / BITS_PER_MB,
            avg_bits=_avg_bits(table, solution.bits),
            predicted=solution.objective,
        )
        for solution in solutions
        if solution.bits
    ]


def _avg_bits(table: LayerTable, plan: Mapping[str, int]) -> float:
    return sum(layer.params * plan[layer.name] for layer in table) / table.total_params


def rank_correlation(predicted: Sequence[float], measured: Sequence[float]) -> float | None:
    """Spearman's rho between predicted cost and measured degradation over the same plans.

    None when it says nothing: fewer than `MIN_RANK_POINTS` plans, or one side constant.
    """
    if len(predicted) < MIN_RANK_POINTS or len(set(predicted)) < 2 or len(set(measured)) < 2:
        return None
    return float(spearmanr(predicted, measured).statistic)


def sensitivities(allocation: Sequence[Mapping[str, Any]]) -> dict[str, list[float | None]]:
    """Each method's sensitivity of every layer, in network order (None where it has none)."""
    methods = dict.fromkeys(m for entry in allocation for m in entry.get("sensitivity") or {})
    return {m: [(entry.get("sensitivity") or {}).get(m) for entry in allocation] for m in methods}
