"""Answering a budget from a cached cost table: the integer program alone, no model pass.

A profile row holds what `allocator.profile.profile_dict` wrote (layers, candidate widths, the
cost matrix); `allocator.profile.CostTable` reads it back and this module shapes the solver's
answer for the API. The science stays in `allocator.solve` and `allocator.budget`; nothing here reads a
model or the database.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from allocator.budget import parse_budget
from allocator.errors import BadBudget
from allocator.latency_table import LatencyTable
from allocator.layers import LayerTable
from allocator.profile import CostTable
from allocator.solve import Solution, solve_budgets
from service.schemas import LayerBits, SolveOut


def answer_budgets(
    cost_table: Mapping[str, Any],
    budgets: Sequence[str],
    time_limit: float,
    latency: LatencyTable | None = None,
    require_latency: bool = True,
) -> list[SolveOut]:
    """One plan per budget; raises BadBudget or InfeasibleBudget naming what to change.

    A latency term is priced on `latency`; without one it is refused, unless
    `require_latency` is off (a size check at submit, before the job measures its table)."""
    profile = CostTable.from_dict(cost_table)
    parsed = [parse_budget(budget) for budget in budgets]
    if require_latency and latency is None and any(b.needs_latency for b in parsed):
        raise BadBudget(
            "a latency budget needs a latency table: name one of yours (latency_table, from "
            "bitplan profile-latency or POST /v1/latency-tables)"
        )
    resolved = [budget.resolve(profile.table, latency=latency) for budget in parsed]
    solutions = solve_budgets(
        profile.table, profile.bits, profile.cost, resolved, time_limit=time_limit
    )
    return [
        _answer(profile.table, budget, solution)
        for budget, solution in zip(budgets, solutions, strict=True)
    ]


def _answer(table: LayerTable, budget: str, solution: Solution) -> SolveOut:
    """Without a plan (status "unknown") the allocation is empty and the solver report says why."""
    allocation = [
        LayerBits(
            layer=layer.name,
            weight_bits=solution.bits[layer.name],
            params=layer.params,
            pinned=layer.pinned_bits is not None,
        )
        for layer in table
        if layer.name in solution.bits
    ]
    planned_bits = sum(entry.weight_bits * entry.params for entry in allocation)
    return SolveOut(
        budget=budget,
        allocation=allocation,
        avg_weight_bits=round(planned_bits / max(table.total_params, 1), 4),
        weight_bytes=solution.storage_bits / 8,
        solver=solution.to_dict(),
    )
