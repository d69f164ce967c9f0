"""Answering a budget from a cached cost table: the integer program alone, no model pass.

A profile row holds what `allocator.pipeline.profile_dict` wrote (layers, candidate widths, the
cost matrix); this module rebuilds the solver's inputs from it and shapes the solver's answer
for the API. The science stays in `allocator.solve` and `allocator.budget`; nothing here reads a
model or the database.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from allocator.budget import parse_budget
from allocator.layers import Layer, LayerTable
from allocator.solve import Solution, pareto
from service.schemas import LayerBits, SolveOut


def solve_budgets(
    cost_table: Mapping[str, Any], budgets: Sequence[str], time_limit: float
) -> list[SolveOut]:
    """One plan per budget; raises BadBudget or InfeasibleBudget naming what to change."""
    table = LayerTable(
        layers=tuple(Layer(**layer) for layer in cost_table["layers"]),
        attention_macs=cost_table.get("attention_macs", 0),
    )
    bits = tuple(cost_table["bits"])
    cost = np.asarray(cost_table["cost"], dtype=float)
    resolved = [parse_budget(budget).resolve(table) for budget in budgets]
    solutions = pareto(table, bits, cost, resolved, time_limit=time_limit)
    return [
        _answer(table, budget, solution)
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
