"""Exact multiple-choice knapsack with one limited resource, by pruned dominance over states.

Why it exists: a profile re-solve (a new size budget on a cached cost table of ~100 layers)
should answer in milliseconds. HiGHS answers most budgets that fast but spends far longer in its
MIP root on the budgets where rounding the LP leaves a gap, which put the p99 over the target
(docs/benchmarks.md, `python bench/solver_speed.py`). With a single limited resource the
program is a plain multiple-choice knapsack, and a dynamic program over (use, cost) pairs solves
it to a proven gap in milliseconds on those budgets.

How: groups are taken one at a time (widest cost range first, so decisions that matter prune
early). A state is a partial plan's (use, cost); a state is dropped when another uses no more and
costs no more, or less than rel_gap x incumbent / (2 x groups) more (dominance, with a slack
whose summed loss is taken off the proven bound), when even the leanest completion does not fit, or when its cost plus
the LP bound of the groups still open cannot beat the incumbent by more than `rel_gap`. The LP
bound of a suffix of groups at a capacity is the classic MCKP relaxation (Sinha & Zoltners 1979):
start every group at its leanest width and buy the convex-hull increments with the best cost
saved per unit of use first. The proven bound is the smaller of the answer and the best bound of
any pruned state, so the reported gap is honest. When the kept states outgrow `max_states` the
caller falls back to the integer program solver.

In the solver (`knapsack_outcome`): the default when at most one resource binds and there are at
most MAX_GROUPS groups; `Solution.solver` is then "knapsack". It hands over to HiGHS when its
kept states grow too many or its bound misses `rel_gap`.

Imports numpy only.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np

from allocator.solve.backend import Outcome, relative_gap
from allocator.solve.heuristics import cheaper, fill, greedy_start
from allocator.solve.program import Program

MAX_GROUPS = 400
"""Above this the suffix bounds cost more than they save; HiGHS's LP shortcut does well there."""
MAX_STATES = 20_000
"""Kept states at which the search gives up and the caller uses the integer program."""


@dataclass(frozen=True)
class KnapsackAnswer:
    """One column per group (in program order) and a proven lower bound on the optimum."""

    columns: np.ndarray
    bound: float


@dataclass(frozen=True)
class _SuffixBound:
    """The LP relaxation of groups order[s:], for every suffix s, as a function of capacity."""

    suffixes: tuple[_Relaxation, ...]

    @classmethod
    def of(cls, hulls: list[_Hull]) -> _SuffixBound:
        return cls(tuple(_Relaxation.of(hulls[s:]) for s in range(len(hulls) + 1)))

    def __call__(self, suffix: int, capacity: np.ndarray) -> np.ndarray:
        return self.suffixes[suffix].value(capacity)


class Knapsack:
    """One multiple-choice knapsack (group g owns columns starts[g]:starts[g + 1]); its hulls
    and LP relaxation depend on no budget, so a sweep builds them once."""

    def __init__(self, starts: np.ndarray, use: np.ndarray, cost: np.ndarray) -> None:
        self.use, self.cost = use, cost
        self.spans = [np.arange(starts[g], starts[g + 1]) for g in range(len(starts) - 1)]
        self.hulls = [_hull(columns, use, cost) for columns in self.spans]
        self.relaxation = _Relaxation.of(self.hulls)
        self.owner = np.repeat(np.arange(len(self.hulls)), [len(h.increments) for h in self.hulls])

    def lp_round(self, limit: float) -> np.ndarray | None:
        """The LP relaxation's plan with its one fractional group rounded down: within one
        group's cost range of the optimum (None when even the leanest plan does not fit)."""
        relaxation = self.relaxation
        if relaxation.base_use > limit:
            return None
        bought = relaxation.order[relaxation.cum_use <= limit - relaxation.base_use]
        steps = np.bincount(self.owner[bought], minlength=len(self.hulls))
        return np.array([h.columns[k] for h, k in zip(self.hulls, steps, strict=True)])

    def solve(
        self,
        limit: float,
        incumbent: np.ndarray | None,
        rel_gap: float,
        deadline: float = math.inf,
        max_states: int = MAX_STATES,
    ) -> KnapsackAnswer | None:
        """The cheapest plan with summed use <= `limit`, within `rel_gap` of optimal.

        `incumbent` is a known plan that fits (one column per group) or None. Returns None when
        no plan fits, the kept states outgrow `max_states` or `time.perf_counter()` passes
        `deadline`.
        """
        use, cost = self.use, self.cost
        groups = len(self.spans)
        known = float(cost[incumbent].sum()) if incumbent is not None else np.inf
        threshold = known - rel_gap * abs(known) if incumbent is not None else np.inf
        slack = rel_gap * abs(known) / (2 * groups) if incumbent is not None else 0.0
        spans, pruned_bound = self._fix_by_reduced_cost(limit, threshold)
        if not all(len(columns) for columns in spans):
            return KnapsackAnswer(incumbent, pruned_bound) if incumbent is not None else None
        settled = np.array([columns[0] for columns in spans if len(columns) == 1], dtype=np.intp)
        open_groups = [g for g in range(groups) if len(spans[g]) > 1]
        order = sorted(open_groups, key=lambda g: -float(np.ptp(cost[spans[g]])))
        bound = _SuffixBound.of([_hull(spans[g], use, cost) for g in order])
        state_use, state_cost = np.array([use[settled].sum()]), np.array([cost[settled].sum()])
        parents: list[np.ndarray] = []
        picks: list[np.ndarray] = []
        for step, g in enumerate(order):
            columns = spans[g]
            new_use = (state_use[:, None] + use[columns][None, :]).ravel()
            new_cost = (state_cost[:, None] + cost[columns][None, :]).ravel()
            optimistic = new_cost + bound(step + 1, limit - new_use)
            keep = optimistic < threshold
            hopeless = np.isfinite(optimistic) & ~keep
            if hopeless.any():
                pruned_bound = min(pruned_bound, float(optimistic[hopeless].min()))
            survivors = np.nonzero(keep)[0]
            survivors = survivors[_undominated(new_use[survivors], new_cost[survivors], slack)]
            if len(survivors) > max_states or time.perf_counter() > deadline:
                return None
            parents.append(survivors // len(columns))
            picks.append(columns[survivors % len(columns)])
            state_use, state_cost = new_use[survivors], new_cost[survivors]
        if len(state_cost) == 0 or state_cost.min() >= known:
            if incumbent is None:
                return None
            return KnapsackAnswer(incumbent, min(known - groups * slack, pruned_bound))
        best = int(np.argmin(state_cost))
        chosen = np.array([columns[0] for columns in spans], dtype=np.intp)
        for step in range(len(order) - 1, -1, -1):
            chosen[order[step]] = picks[step][best]
            best = int(parents[step][best])
        return KnapsackAnswer(chosen, min(float(cost[chosen].sum()) - groups * slack, pruned_bound))

    def _fix_by_reduced_cost(
        self, limit: float, threshold: float
    ) -> tuple[list[np.ndarray], float]:
        """Drop every column that cannot be in a plan cheaper than `threshold`; returns the kept
        columns per group and the least bound of a dropped one (inf if none).

        With the LP's price of the budget, lam, any plan costs at least
        L = sum_g min_c (cost_c + lam use_c) - lam limit plus the reduced cost
        rc_c = cost_c + lam use_c - min_g of each column it uses (Lagrangian bound). Near the
        LP optimum most columns have L + rc_c >= threshold, so the search that follows is small.
        """
        if not np.isfinite(threshold):
            return self.spans, np.inf
        lam = self.relaxation.price(limit)
        priced = self.cost + lam * self.use
        floors = np.array([priced[c].min() for c in self.spans])
        lagrangian = float(floors.sum() - (lam * limit if lam > 0 else 0.0))
        kept, dropped_bound = [], np.inf
        for columns, floor in zip(self.spans, floors, strict=True):
            bound = lagrangian + priced[columns] - floor
            kept.append(columns[bound < threshold])
            if (bound >= threshold).any():
                dropped_bound = min(dropped_bound, float(bound[bound >= threshold].min()))
        return kept, dropped_bound


def _undominated(use: np.ndarray, cost: np.ndarray, slack: float) -> np.ndarray:
    """Indices of the states no other state beats on use while costing less than `slack` more.

    Costs are floored to multiples of `slack`, so a dropped state has a kept one that uses no
    more and costs under `slack` more; over all steps the answer loses less than
    groups x slack, which the caller takes off the proven bound. slack 0: exact dominance.
    """
    key = np.floor(cost / slack) if slack > 0 else cost
    order = np.lexsort((key, use))
    sorted_key = key[order]
    best_before = np.minimum.accumulate(np.r_[np.inf, sorted_key[:-1]])
    return order[sorted_key < best_before]


def _hull(columns: np.ndarray, use: np.ndarray, cost: np.ndarray) -> _Hull:
    """A group's leanest (use, cost) point, its convex-hull increments (use added, cost saved)
    and the columns on the hull, from the lower-left convex hull."""
    on_hull = columns[_lower_hull(use[columns], cost[columns])]
    points = np.stack([use[on_hull], cost[on_hull]], axis=1)
    steps = points[1:] - points[:-1]
    steps[:, 1] *= -1
    return _Hull(points[0], steps, on_hull)


@dataclass(frozen=True)
class _Hull:
    lean: np.ndarray
    increments: np.ndarray
    columns: np.ndarray


@dataclass(frozen=True)
class _Relaxation:
    """The MCKP LP relaxation of a set of groups: leanest points, then hull increments bought
    best saving per unit use first."""

    base_use: float
    base_cost: float
    order: np.ndarray
    cum_use: np.ndarray
    cum_saving: np.ndarray
    slope: np.ndarray

    @classmethod
    def of(cls, hulls: list[_Hull]) -> _Relaxation:
        base = np.sum([h.lean for h in hulls], axis=0) if hulls else np.zeros(2)
        steps = np.concatenate([h.increments for h in hulls] or [np.zeros((0, 2))])
        rate = steps[:, 1] / steps[:, 0]
        ranked = np.argsort(-rate, kind="stable")
        return cls(
            float(base[0]),
            float(base[1]),
            ranked,
            np.cumsum(steps[ranked, 0]),
            np.cumsum(steps[ranked, 1]),
            rate[ranked],
        )

    def price(self, capacity: float) -> float:
        """The LP's saving per unit of use at `capacity` (its dual price; 0 when slack)."""
        index = int(np.searchsorted(self.cum_use, capacity - self.base_use, side="right"))
        return float(self.slope[index]) if index < len(self.slope) else 0.0

    def value(self, capacity: np.ndarray) -> np.ndarray:
        """The LP optimum at each capacity (inf where even the leanest plan does not fit)."""
        extra = capacity - self.base_use
        if len(self.cum_use) == 0:
            return np.where(extra >= 0, self.base_cost, np.inf)
        index = np.searchsorted(self.cum_use, extra, side="right")
        before = np.maximum(index - 1, 0)
        before_use = np.where(index > 0, self.cum_use[before], 0.0)
        before_saving = np.where(index > 0, self.cum_saving[before], 0.0)
        rate = np.where(
            index < len(self.slope), self.slope[np.minimum(index, len(self.slope) - 1)], 0.0
        )
        value = self.base_cost - before_saving - rate * (extra - before_use)
        return np.where(extra >= 0, value, np.inf)


def _lower_hull(use: np.ndarray, cost: np.ndarray) -> list[int]:
    """Positions of the lower-left convex hull's points, leanest first, cost falling."""
    hull: list[int] = []
    for i in np.lexsort((cost, use)).tolist():
        if hull and cost[i] >= cost[hull[-1]]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            if (cost[b] - cost[a]) * (use[i] - use[a]) >= (cost[i] - cost[a]) * (use[b] - use[a]):
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def knapsack_outcome(
    program: Program,
    limit: np.ndarray,
    rel_gap: float,
    solver: str,
    knapsacks: dict[int, Knapsack],
    deadline: float,
) -> Outcome | None:
    """The knapsack search's answer when at most one resource binds and the program is small;
    None when it does not apply, gives up, or misses `rel_gap`. `knapsacks` keeps each
    resource's budget-independent part across a sweep."""
    limited = np.isfinite(limit)
    if solver != "highs" or limited.sum() > 1 or len(program.groups) > MAX_GROUPS:
        return None
    resource = int(np.argmax(limited))
    if resource not in knapsacks:
        knapsacks[resource] = Knapsack(
            program.starts, program.col_use[:, resource], program.col_cost
        )
    knapsack, capacity = knapsacks[resource], float(limit[resource])
    rounded = knapsack.lp_round(capacity)
    start = cheaper(
        program,
        greedy_start(program, limit),
        None if rounded is None else fill(program, rounded, limit),
    )
    answer = knapsack.solve(capacity, start, rel_gap, deadline)
    if answer is None or relative_gap(program.cost(answer.columns), answer.bound) > rel_gap:
        return None
    return Outcome("optimal", answer.columns, answer.bound)
