"""Plans found without a solver: the greedy warm start every backend begins from, and rounding.

The leanest width in every group is the smallest plan; upgrading groups while the plan fits, the
most cost saved per share of the budget first, gives the warm start of HiGHS and CBC and the
incumbent the knapsack search prunes against. HiGHS also completes its rounded LP plans here.

Imports numpy only.
"""

from __future__ import annotations

import numpy as np

from allocator.solve.program import Program


def greedy_start(program: Program, limit: np.ndarray) -> np.ndarray | None:
    """A plan to warm-start from: the leanest width in every group, then greedy upgrades."""
    return fill(program, program.best_per_group(weighted_use(program, limit)), limit)


def weighted_use(program: Program, limit: np.ndarray) -> np.ndarray:
    """Each column's use of the budget: its summed shares of the limited resources."""
    return program.col_use @ _shares(limit)


def _shares(limit: np.ndarray) -> np.ndarray:
    """1 / limit per resource, 0 for an unlimited one."""
    finite = np.isfinite(limit)
    return np.where(finite, 1.0 / np.where(finite, limit, 1.0), 0.0)


def fill(program: Program, start: np.ndarray, limit: np.ndarray) -> np.ndarray | None:
    """Upgrade groups while the plan fits, the most cost saved per share of budget first.

    Returns None when `start` itself does not fit.
    """
    columns = start.copy()
    used = program.usage(columns)
    if (used > limit).any():
        return None
    weight = _shares(limit)
    while True:
        current = columns[program.col_group]
        saving = program.col_cost[current] - program.col_cost
        extra = program.col_use - program.col_use[current]
        share = extra @ weight
        ratio = np.where(
            saving > 0, np.where(share > 0, saving / np.where(share > 0, share, 1.0), np.inf), -1.0
        )
        best = program.best_per_group(-ratio)
        candidates = best[np.argsort(-ratio[best], kind="stable")]
        changed = False
        for column in candidates[ratio[candidates] > 0]:
            trial = used + extra[column]
            if (trial <= limit).all():
                used = trial
                columns[program.col_group[column]] = column
                changed = True
        if not changed:
            return columns


def cheaper(
    program: Program, first: np.ndarray | None, second: np.ndarray | None
) -> np.ndarray | None:
    """The cheaper of two plans, either of which may be missing."""
    plans = [plan for plan in (first, second) if plan is not None]
    return min(plans, key=program.cost, default=None)
