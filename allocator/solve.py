"""The integer program of bit allocation, and the solvers that answer it.

A cost table (layer x bit-width -> predicted loss) and a budget decide the plan. Choosing one width
per layer to minimise the summed cost under size and BOPs limits is a multiple-choice knapsack; an
integer program solves it to a proven gap (HAWQ-V3, CalibTIP) where greedy rules can only hope.

The program
- Groups: layers that must share a width (tied weights) form one group; their cost rows, storage
  and BOPs add up. A group with a pinned member is fixed at that width (which need not be one of
  `bits`, e.g. 8 or 16) and leaves the program; its storage and BOPs are taken off the budget.
- Choices: option k of a free group is a `Choice` (weight width, activation width) with a storage
  and a BOPs coefficient: one per entry of `bits` at one activation width, or, when `act_bits`
  is a sequence (joint allocation), one per (weight width, activation width) pair, weight-major,
  and the cost table has a column per pair. Pinned groups run their inputs at the widest
  activation width. A choice is forbidden (no variable) when any member's cost is inf.
- Variables: x[g, k] in {0, 1} for every free group g and allowed choice k.
- Constraints: sum_k x[g, k] = 1 for every g; sum storage[g, k] x[g, k] <= size budget - pinned
  storage; sum bops[g, k] x[g, k] <= BOPs budget - pinned BOPs (each only when the budget has it).
- Objective: minimise sum cost[g, k] x[g, k]. Pinned layers add no cost: `Solution.objective` is
  the summed cost of the free layers at their chosen widths.

How it is solved
- Frontier (default when at most one resource binds and there are <= 400 groups): the exact
  multiple-choice knapsack search of allocator/frontier.py. It answers a 100-layer re-solve in a
  few ms where HiGHS's MIP root took up to 250 ms; it hands over to HiGHS when its frontier grows
  too large or its bound misses `rel_gap`. `Solution.solver` is then "frontier".
- HiGHS (default otherwise): the model goes to highspy directly as column-wise numpy arrays; budgets only
  move two row bounds, so `pareto` keeps one model. Measured at 10,000 layers x 6 widths: ~25 ms
  to build this way, against ~0.9 s to build the PuLP model plus ~0.8 s for PuLP's own
  translation to HiGHS. HiGHS first solves the LP relaxation. Rounding it (each group takes the
  leanest width the LP uses, then greedy upgrades while the budget allows), and re-solving the LP
  with each fractional group fixed to each width it uses, gives plans; when the best is within
  `rel_gap` of the LP bound, that LP bound is the proof and the MIP is skipped. Otherwise the MIP
  runs, warm-started from the best plan, with HiGHS's RINS/RENS sub-MIPs off: with a warm start
  they only cost time (100 layers: p99 ~440 ms with them, ~180 ms without).
- CBC (fallback, or `solver="cbc"`): the same columns as a PuLP model through `PULP_CBC_CMD`,
  warm-started from the greedy plan. PuLP reports "Optimal" for a run stopped by its time limit,
  so the status comes from `prob.sol_status` and the bound from CBC's log. CBC's Cgl
  preprocessing is off: on a 3-layer program it fixed the optimal column to zero and still
  reported "Optimal" (regression case in tests/test_solve.py).
- `status` is what the solver proved: "optimal" (gap <= rel_gap), "feasible" (stopped by the time
  limit with a plan; `gap` says how far from proven), "infeasible" (no plan meets both limits),
  "unknown" (stopped before any plan; nothing proven).
- HiGHS checks its time limit only between some steps of the MIP root: on 10,000 layers with a
  size and a BOPs budget at rel_gap 1e-4 one step ran ~40 s past a 10 s limit (upstream
  ERGO-Code/HiGHS#885, #2226). The LP shortcut avoids the MIP in the cases measured; the warning
  "overran its time limit" in the log says when it did not.

Numerics
- Resource rows are divided by the largest storage / BOPs the free groups can use. Storage and
  BOPs are integers, so each row's right-hand side is put half a unit above the budget, less
  twice the feasibility tolerance: a plan the solver accepts never exceeds the exact budget, and
  a plan that fills it exactly stays allowed (see `_limit`).
- Costs are divided by the mean per-group cost range: measured, with raw costs spanning 1e12,
  HiGHS's absolute tolerances let it prove a bound above a feasible plan.

Imports numpy, PuLP and highspy (lazily, so CBC still works without it); the layer table only for
type hints, so re-solving a cached profile never loads torch. Never services.
"""

from __future__ import annotations

import logging
import math
import os
import re
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Protocol

import numpy as np
import pulp

from allocator.budget import BITS_PER_MB, ResolvedBudget
from allocator.errors import InfeasibleBudget
from allocator.frontier import MAX_GROUPS, Knapsack

if TYPE_CHECKING:
    from allocator.layers import Layer, LayerTable

log = logging.getLogger(__name__)

Status = Literal["optimal", "feasible", "infeasible", "unknown"]
SOLVERS = ("highs", "cbc")
FEASIBILITY_TOL = 1e-9
"""Primal and integrality tolerance given to both solvers, on rows scaled to at most 1."""
ActBits = int | Sequence[int]
"""One activation width for every layer, or the widths joint allocation chooses from."""
STORAGE, BOPS = 0, 1
"""Indices of the two resources in every usage array."""
_UNBOUNDED = 2.0
"""Right-hand side of a scaled resource row with no limit: every plan uses at most 1."""


@dataclass(frozen=True)
class Choice:
    """One option for a free group: the widths its weights and input activations take."""

    weight_bits: int
    act_bits: int

    def usage(self, layer: Layer) -> tuple[int, int]:
        """Storage bits and BOPs per sample of `layer` at this choice."""
        return layer.storage_bits(self.weight_bits), layer.macs * self.weight_bits * self.act_bits


@dataclass(frozen=True)
class Solution:
    """One plan and what the solver proved about it.

    With status "infeasible" or "unknown" there is no plan: `bits` is empty, `objective` and
    `gap` are inf.
    """

    bits: dict[str, int]
    objective: float
    storage_bits: int
    bops: float
    solver: str
    status: Status
    gap: float
    seconds: float
    act_bits: dict[str, int] = field(default_factory=dict)
    """Each layer's input activation width (every layer at the one width unless joint)."""

    def to_dict(self) -> dict[str, Any]:
        """The strict-JSON form results store: the solver's name under "name", and None for an
        objective or gap that is inf (no plan, or no bound), which JSON cannot carry."""
        data = asdict(self)
        data.pop("act_bits")  # per layer; results report it as the activation allocation
        data["name"] = data.pop("solver")
        return {
            key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in data.items()
        }


@dataclass(frozen=True)
class _Program:
    """The budget-independent data of the program, one column per (free group, allowed choice).

    Columns are sorted by group, so group g owns columns starts[g]:starts[g + 1].
    """

    choices: tuple[Choice, ...]
    groups: tuple[tuple[str, ...], ...]
    fixed_bits: dict[str, int]
    col_group: np.ndarray
    col_choice: np.ndarray
    col_cost: np.ndarray
    col_use: np.ndarray
    starts: np.ndarray
    fixed_use: np.ndarray
    total_params: int
    cost_scale: float
    min_use: np.ndarray = field(init=False)
    max_use: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        """The smallest and largest use of each resource over all plans of the free groups."""
        heads = self.starts[:-1]
        extremes = (
            (np.minimum.reduceat(self.col_use, heads), np.maximum.reduceat(self.col_use, heads))
            if len(heads)
            else (np.zeros((0, 2)), np.zeros((0, 2)))
        )
        object.__setattr__(self, "min_use", extremes[0].sum(axis=0))
        object.__setattr__(self, "max_use", extremes[1].sum(axis=0))

    @property
    def scale(self) -> np.ndarray:
        """Per-resource divisor that brings every row coefficient into [0, 1]."""
        return np.maximum(self.max_use, 1.0)

    def best_per_group(self, key: np.ndarray) -> np.ndarray:
        """The column with the smallest `key` in every group (the first on ties)."""
        order = np.lexsort((key, self.col_group))
        return order[self.starts[:-1]]

    def usage(self, columns: np.ndarray) -> np.ndarray:
        return self.col_use[columns].sum(axis=0)

    def cost(self, columns: np.ndarray) -> float:
        return float(self.col_cost[columns].sum())


@dataclass(frozen=True)
class _Outcome:
    """A backend's answer: one column per group (None without a plan) and the proven bound."""

    status: Status
    columns: np.ndarray | None
    bound: float


class _SolverError(RuntimeError):
    """The solver failed (not: proved infeasible, or ran out of time); try the other one."""


class _Backend(Protocol):
    name: str

    def solve(
        self, limit: np.ndarray, start: np.ndarray | None, rel_gap: float, time_limit: float
    ) -> _Outcome: ...


def solve(
    table: LayerTable,
    bits: Sequence[int],
    cost: np.ndarray,
    budget: ResolvedBudget,
    *,
    act_bits: ActBits = 32,
    time_limit: float = 10.0,
    rel_gap: float = 1e-3,
    solver: str = "highs",
) -> Solution:
    """The cheapest plan within `budget`; see the module docstring for the program.

    `cost[i, j]` is the cost of `table.layers[i]` at `bits[j]` (np.inf forbids it). Raises
    InfeasibleBudget when the budget is below the smallest plan that meets each of its limits.
    """
    return pareto(
        table,
        bits,
        cost,
        [budget],
        act_bits=act_bits,
        time_limit=time_limit,
        rel_gap=rel_gap,
        solver=solver,
    )[0]


def check_budget(
    table: LayerTable, bits: Sequence[int], budget: ResolvedBudget, *, act_bits: ActBits = 32
) -> None:
    """Raise InfeasibleBudget now if no plan can fit, before any cost is computed.

    Feasibility depends on sizes only, so a job checks its budget right after the layer table
    is known instead of after minutes of calibration.
    """
    columns = len(_choices(bits, act_bits))
    _limit(_build_program(table, bits, np.zeros((len(table), columns)), act_bits), budget)


def pareto(
    table: LayerTable,
    bits: Sequence[int],
    cost: np.ndarray,
    budgets: Sequence[ResolvedBudget],
    *,
    act_bits: ActBits = 32,
    time_limit: float = 10.0,
    rel_gap: float = 1e-3,
    solver: str = "highs",
) -> list[Solution]:
    """Solve one cost table at many budgets, building the program and solver model once.

    Only the right-hand sides change between budgets, so HiGHS also warm-starts each LP from the
    last basis. `time_limit` applies to each budget. Every budget is checked before any is
    solved: one below the smallest plan raises InfeasibleBudget.
    """
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; use one of {SOLVERS}")
    program = _build_program(table, bits, cost, act_bits)
    limits = [_limit(program, budget) for budget in budgets]
    backend: _Backend | None = None
    knapsacks: dict[int, Knapsack] = {}
    solutions = []
    for limit in limits:
        started = time.perf_counter()
        if not program.groups:
            outcome = _Outcome("optimal", np.zeros(0, dtype=np.intp), 0.0)
            name = solver
        elif (
            outcome := _frontier(program, limit, rel_gap, solver, knapsacks, started + time_limit)
        ) is not None:
            name = "frontier"
        else:
            backend = backend or _open_backend(program, solver)
            try:
                outcome = backend.solve(limit, _greedy_start(program, limit), rel_gap, time_limit)
            except _SolverError as error:
                log.warning("HiGHS failed (%s); solving with CBC", error)
                backend = _Cbc(program)
                outcome = backend.solve(limit, _greedy_start(program, limit), rel_gap, time_limit)
            name = backend.name
        solutions.append(
            _solution(table, program, outcome, name, act_bits, time.perf_counter() - started)
        )
    return solutions


def fixed_plan(
    table: LayerTable,
    widths: Mapping[str, int],
    bits: Sequence[int],
    cost: np.ndarray,
    like: Solution,
    *,
    act_bits: int = 32,
    act_choices: Sequence[int] | None = None,
) -> Solution:
    """A full plan chosen outside the program (the uniform one, when the held-out check in
    allocator.pipeline prefers it), every layer's input at `act_bits`, priced as the program
    prices its own plans; the solver's report (name, status, gap, time) stays `like`'s.

    `act_choices`: the activation widths of a joint cost table (columns weight-major over
    `bits` x `act_choices`); the plan then records `act_bits` as every layer's choice."""
    plan = dict(widths)
    storage, bops = _plan_usage(table, plan, act_bits)
    columns = list(bits)
    pinned = table.pinned_widths()

    def column(width: int) -> int:
        index = columns.index(width)
        if act_choices is None:
            return index
        return index * len(act_choices) + list(act_choices).index(act_bits)

    objective = sum(
        float(cost[i, column(plan[layer.name])])
        for i, layer in enumerate(table)
        if layer.name not in pinned and plan[layer.name] in columns
    )
    acts = like.act_bits if act_choices is None else dict.fromkeys(plan, act_bits)
    return replace(
        like, bits=plan, act_bits=acts, objective=objective, storage_bits=storage, bops=bops
    )


def uniform_bits_for(
    table: LayerTable, bits: Sequence[int], budget: ResolvedBudget, *, act_bits: ActBits = 32
) -> int | None:
    """The widest single width of `bits` that fits `budget` on every unpinned layer, or None.

    This is the baseline a mixed plan is compared with at the same size.
    """
    fixed = table.pinned_widths()
    for width in sorted(set(bits), reverse=True):
        plan = {layer.name: fixed.get(layer.name, width) for layer in table}
        storage, bops = _plan_usage(table, plan, _widest(act_bits))
        if (budget.size_bits is None or storage <= budget.size_bits) and (
            budget.bops is None or bops <= budget.bops
        ):
            return width
    return None


def _plan_usage(
    table: LayerTable, plan: dict[str, int], act_bits: int | Mapping[str, int]
) -> tuple[int, int]:
    """Total storage bits and BOPs per sample of a full plan (layer name -> weight width)."""
    storage = bops = 0
    for layer in table:
        act = act_bits if isinstance(act_bits, int) else act_bits[layer.name]
        layer_storage, layer_bops = Choice(plan[layer.name], act).usage(layer)
        storage += layer_storage
        bops += layer_bops
    return storage, bops


def _build_program(
    table: LayerTable, bits: Sequence[int], cost: np.ndarray, act_bits: ActBits
) -> _Program:
    """Sum tied layers into groups, fix pinned groups, and keep one column per allowed choice."""
    choices = _choices(bits, act_bits)
    cost = np.asarray(cost, dtype=float)
    if cost.shape != (len(table), len(choices)):
        raise ValueError(f"cost has shape {cost.shape}, expected {(len(table), len(choices))}")
    if np.isnan(cost).any() or np.isneginf(cost).any():
        raise ValueError("cost must not hold NaN or -inf (np.inf forbids a choice)")
    fixed = table.pinned_widths()
    fixed_use = np.zeros(2)
    rows: list[int] = []
    names: dict[str, list[str]] = {}
    for index, layer in enumerate(table.layers):
        if layer.name in fixed:
            fixed_use += Choice(fixed[layer.name], _widest(act_bits)).usage(layer)
        else:
            rows.append(index)
            names.setdefault(layer.group, []).append(layer.name)
    group_index = {group: g for g, group in enumerate(names)}
    row_group = np.array([group_index[table.layers[row].group] for row in rows], dtype=np.intp)
    layer_use = np.array(
        [[choice.usage(table.layers[row]) for choice in choices] for row in rows], dtype=float
    ).reshape(len(rows), len(choices), 2)
    group_cost = np.zeros((len(names), len(choices)))
    np.add.at(group_cost, row_group, cost[rows])
    group_use = np.zeros((len(names), len(choices), 2))
    np.add.at(group_use, row_group, layer_use)
    allowed = np.isfinite(group_cost)
    closed = [group for group, ok in zip(names, allowed.any(axis=1), strict=True) if not ok]
    if closed:
        raise ValueError(f"every width is forbidden (cost inf) for layer groups {closed}")
    col_group, col_choice = np.nonzero(allowed)
    col_cost = group_cost[col_group, col_choice]
    return _Program(
        choices=choices,
        groups=tuple(tuple(members) for members in names.values()),
        fixed_bits=fixed,
        col_group=col_group,
        col_choice=col_choice,
        col_cost=col_cost,
        col_use=group_use[col_group, col_choice],
        starts=np.searchsorted(col_group, np.arange(len(names) + 1)),
        fixed_use=fixed_use,
        total_params=table.total_params,
        cost_scale=_cost_scale(col_cost, col_group, len(names)),
    )


def _choices(bits: Sequence[int], act_bits: ActBits) -> tuple[Choice, ...]:
    widths = [int(b) for b in bits]
    acts = [act_bits] if isinstance(act_bits, int) else [int(a) for a in act_bits]
    for name, values in (("bits", widths), ("act_bits", acts)):
        if not values or len(set(values)) != len(values) or min(values) < 1:
            raise ValueError(f"{name} must be distinct positive widths, got {values}")
    return tuple(Choice(width, act) for width in widths for act in acts)


def _widest(act_bits: ActBits) -> int:
    return act_bits if isinstance(act_bits, int) else max(act_bits)


def _cost_scale(col_cost: np.ndarray, col_group: np.ndarray, groups: int) -> float:
    """1 / the mean over groups of (dearest - cheapest allowed cost), capped so no cost exceeds 1e9.

    Flat costs fall back to 1 / the largest cost; all-zero or subnormal costs to 1.
    """
    largest = float(np.abs(col_cost).max()) if len(col_cost) else 0.0
    if largest == 0:
        return 1.0
    dearest = np.full(groups, -np.inf)
    cheapest = np.full(groups, np.inf)
    np.maximum.at(dearest, col_group, col_cost)
    np.minimum.at(cheapest, col_group, col_cost)
    span = float((dearest - cheapest).mean())
    scale = min(1.0 / span if span > 0 else 1.0 / largest, 1e9 / largest)
    return scale if math.isfinite(scale) else 1.0


def _limit(program: _Program, budget: ResolvedBudget) -> np.ndarray:
    """What the free groups may use of each resource (inf: unconstrained or never binding).

    Usage is integral, so a plan fits when it uses at most `free = floor(budget - pinned)`. The
    limit sits half a unit above `free`, less twice the solver's tolerance in these units: any
    plan the solver accepts then uses at most `free`, and while that tolerance is under a quarter
    unit every plan using `free` is accepted. Raises InfeasibleBudget when even the smallest plan
    does not fit.
    """
    limit = np.full(2, np.inf)
    for resource, total in ((STORAGE, budget.size_bits), (BOPS, budget.bops)):
        if total is None:
            continue
        free = math.floor(total - program.fixed_use[resource])
        if free < program.min_use[resource]:
            raise _shortfall(program, resource, total)
        if free < program.max_use[resource]:
            tolerance = FEASIBILITY_TOL * program.scale[resource]
            limit[resource] = max(free + 0.5 - 2 * tolerance, program.min_use[resource])
    return limit


def _shortfall(program: _Program, resource: int, total: float) -> InfeasibleBudget:
    smallest = program.fixed_use + program.min_use
    size = smallest[STORAGE]
    size_text = (
        f"{size / BITS_PER_MB:.6g} MB = {size / program.total_params:.4f} average bits per weight"
    )
    how = "with pinned layers at their widths and every other layer at its smallest allowed width"
    if resource == STORAGE:
        message = (
            f"size budget {total / BITS_PER_MB:.6g} MB ({total / program.total_params:.4f} "
            f"average bits) is below the smallest feasible size {size_text}, {how}"
        )
    else:
        message = (
            f"BOPs budget {total:.6g} is below the smallest feasible {smallest[BOPS]:.6g} BOPs "
            f"per sample, {how} (that plan's size is {size_text})"
        )
    return InfeasibleBudget(message, smallest_feasible_bits=float(size))


def _greedy_start(program: _Program, limit: np.ndarray) -> np.ndarray | None:
    """A plan to warm-start from: the leanest width in every group, then greedy upgrades."""
    return _fill(program, program.best_per_group(_weighted_use(program, limit)), limit)


def _weighted_use(program: _Program, limit: np.ndarray) -> np.ndarray:
    """Each column's use of the budget: its summed shares of the limited resources."""
    return program.col_use @ _shares(limit)


def _shares(limit: np.ndarray) -> np.ndarray:
    """1 / limit per resource, 0 for an unlimited one."""
    finite = np.isfinite(limit)
    return np.where(finite, 1.0 / np.where(finite, limit, 1.0), 0.0)


def _fill(program: _Program, start: np.ndarray, limit: np.ndarray) -> np.ndarray | None:
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


def _relative_gap(objective: float, bound: float) -> float:
    """(objective - bound) / max(|objective|, |bound|); 0 when the bound meets the plan."""
    if not math.isfinite(bound):
        return math.inf
    if objective - bound <= 0:
        return 0.0
    return (objective - bound) / max(abs(objective), abs(bound))


def _frontier(
    program: _Program,
    limit: np.ndarray,
    rel_gap: float,
    solver: str,
    knapsacks: dict[int, Knapsack],
    deadline: float,
) -> _Outcome | None:
    """The dominance-frontier answer when at most one resource binds and the program is small
    (see allocator/frontier.py); None when it does not apply, gives up, or misses `rel_gap`.
    `knapsacks` keeps each resource's budget-independent part across a sweep."""
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
    start = _cheaper(
        program,
        _greedy_start(program, limit),
        None if rounded is None else _fill(program, rounded, limit),
    )
    answer = knapsack.solve(capacity, start, rel_gap, deadline)
    if answer is None or _relative_gap(program.cost(answer.columns), answer.bound) > rel_gap:
        return None
    return _Outcome("optimal", answer.columns, answer.bound)


def _open_backend(program: _Program, solver: str) -> _Backend:
    if solver == "highs":
        try:
            return _Highs(program)
        except (ImportError, _SolverError) as error:
            log.warning("HiGHS unavailable (%s); solving with CBC", error)
    return _Cbc(program)


class _Highs:
    """The program as one highspy model; budgets only move the resource rows' upper bounds."""

    name = "highs"

    def __init__(self, program: _Program) -> None:
        import highspy

        self._hs = highspy
        self.program = program
        status = highspy.HighsModelStatus
        self._infeasible = {status.kInfeasible, status.kUnboundedOrInfeasible}
        self._stopped = {
            status.kTimeLimit,
            status.kIterationLimit,
            status.kSolutionLimit,
            status.kInterrupt,
        }
        self.highs = _quiet_highs(highspy)
        for option, setting in {
            "output_flag": False,
            "primal_feasibility_tolerance": FEASIBILITY_TOL,
            "mip_feasibility_tolerance": FEASIBILITY_TOL,
            "mip_heuristic_run_rins": False,
            "mip_heuristic_run_rens": False,
        }.items():
            self.highs.setOptionValue(option, setting)
        self._check(self.highs.passModel(self._model()), "passModel")

    def _model(self) -> Any:
        """Column-wise: every column has a 1 in its group's row and its two resource shares."""
        program, highspy = self.program, self._hs
        groups, columns = len(program.groups), len(program.col_group)
        index = np.empty((columns, 3), dtype=np.int32)
        index[:, 0] = program.col_group
        index[:, 1] = groups + STORAGE
        index[:, 2] = groups + BOPS
        value = np.empty((columns, 3))
        value[:, 0] = 1.0
        value[:, 1:] = program.col_use / program.scale
        lp = highspy.HighsLp()
        lp.num_col_ = columns
        lp.num_row_ = groups + 2
        lp.col_cost_ = program.col_cost * program.cost_scale
        lp.col_lower_ = np.zeros(columns)
        lp.col_upper_ = np.ones(columns)
        lp.row_lower_ = np.r_[np.ones(groups), -np.inf, -np.inf]
        lp.row_upper_ = np.r_[np.ones(groups), np.inf, np.inf]
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.arange(0, 3 * columns + 1, 3, dtype=np.int32)
        lp.a_matrix_.index_ = index.ravel()
        lp.a_matrix_.value_ = value.ravel()
        lp.integrality_ = [highspy.HighsVarType.kInteger] * columns
        return lp

    def solve(
        self, limit: np.ndarray, start: np.ndarray | None, rel_gap: float, time_limit: float
    ) -> _Outcome:
        program, highs = self.program, self.highs
        deadline = time.perf_counter() + time_limit
        for resource in (STORAGE, BOPS):
            upper = limit[resource] / program.scale[resource]
            highs.changeRowBounds(len(program.groups) + resource, -np.inf, upper)
        relaxation = self._relax(deadline)
        if relaxation in self._infeasible:
            return _Outcome("infeasible", None, math.inf)
        if relaxation == self._hs.HighsModelStatus.kOptimal:
            bound = highs.getInfo().objective_function_value / program.cost_scale
            start = _cheaper(program, start, self._dive(limit, deadline))
            if start is not None and _relative_gap(program.cost(start), bound) <= rel_gap:
                return _Outcome("optimal", start, bound)
        return self._mip(start, rel_gap, deadline)

    def _relax(self, deadline: float) -> Any:
        """Solve the LP relaxation (warm from the last basis) and return its model status."""
        self.highs.setOptionValue("solve_relaxation", True)
        self.highs.setOptionValue("time_limit", max(deadline - time.perf_counter(), 0.0))
        self._check(self.highs.run(), "LP relaxation")
        return self.highs.getModelStatus()

    def _dive(self, limit: np.ndarray, deadline: float) -> np.ndarray | None:
        """The best plan rounded from the LP optimum and from one dive per fractional column.

        Rounding a fractional group down can lose one group's cost range; fixing that group to
        each width the LP uses and re-solving the LP (a few warm dual simplex steps) lets the LP
        pay for the rounding elsewhere. Leaves every column bound as it found it.
        """
        program, highs = self.program, self.highs
        x = np.asarray(highs.getSolution().col_value)
        best = _fill(program, self._round(limit), limit)
        fractional = np.nonzero((x > FEASIBILITY_TOL) & (x < 1 - FEASIBILITY_TOL))[0]
        for column in fractional:
            group = program.col_group[column]
            others = np.setdiff1d(
                np.arange(program.starts[group], program.starts[group + 1]), column
            ).astype(np.int32)
            zeros = np.zeros(len(others))
            highs.changeColsBounds(len(others), others, zeros, zeros)
            if self._relax(deadline) == self._hs.HighsModelStatus.kOptimal:
                best = _cheaper(program, best, _fill(program, self._round(limit), limit))
            highs.changeColsBounds(len(others), others, zeros, np.ones(len(others)))
        return best

    def _round(self, limit: np.ndarray) -> np.ndarray:
        """Every group's leanest column among those the current LP solution uses."""
        x = np.asarray(self.highs.getSolution().col_value)
        key = np.where(x > FEASIBILITY_TOL, _weighted_use(self.program, limit), np.inf)
        return self.program.best_per_group(key)

    def _mip(self, start: np.ndarray | None, rel_gap: float, deadline: float) -> _Outcome:
        program, highs = self.program, self.highs
        highs.setOptionValue("solve_relaxation", False)
        highs.setOptionValue("mip_rel_gap", rel_gap)
        highs.setOptionValue("time_limit", max(deadline - time.perf_counter(), 0.0))
        if start is not None:
            x = np.zeros(len(program.col_group))
            x[start] = 1.0
            highs.setSolution(len(x), np.arange(len(x), dtype=np.int32), x)
        self._check(highs.run(), "MIP")
        if time.perf_counter() > deadline + 1.0:
            log.warning("HiGHS overran its time limit by %.1f s", time.perf_counter() - deadline)
        model_status, info = highs.getModelStatus(), highs.getInfo()
        if model_status in self._infeasible:
            return _Outcome("infeasible", None, math.inf)
        found = info.primal_solution_status == self._hs.SolutionStatus.kSolutionStatusFeasible
        optimal = model_status == self._hs.HighsModelStatus.kOptimal
        if not ((optimal and found) or model_status in self._stopped):
            raise _SolverError(f"HiGHS MIP ended with {highs.modelStatusToString(model_status)}")
        bound = info.mip_dual_bound / program.cost_scale
        if not found:
            return _Outcome("unknown", None, bound)
        x = np.asarray(highs.getSolution().col_value)
        return _Outcome("optimal" if optimal else "feasible", program.best_per_group(-x), bound)

    def _check(self, result: Any, step: str) -> None:
        if result == self._hs.HighsStatus.kError:
            raise _SolverError(f"HiGHS {step} returned an error")


def _cheaper(
    program: _Program, first: np.ndarray | None, second: np.ndarray | None
) -> np.ndarray | None:
    """The cheaper of two plans, either of which may be missing."""
    plans = [plan for plan in (first, second) if plan is not None]
    return min(plans, key=program.cost, default=None)


class _Cbc:
    """The program as a PuLP model solved by the bundled CBC; bounds come from CBC's log."""

    name = "cbc"
    _PARTIAL = re.compile(r"best possible (\S+)\)")
    _GAP_EXIT = re.compile(r"Exiting as integer gap of (\S+)")

    def __init__(self, program: _Program) -> None:
        self.program = program
        self.prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
        self.x = [
            self.prob.add_variable(f"x{i}", cat=pulp.LpBinary)
            for i in range(len(program.col_group))
        ]
        self.prob += pulp.LpAffineExpression(
            zip(self.x, (program.col_cost * program.cost_scale).tolist(), strict=True)
        )
        for group, (lo, hi) in enumerate(zip(program.starts[:-1], program.starts[1:], strict=True)):
            self.prob += pulp.lpSum(self.x[lo:hi]) == 1, f"group{group}"
        self.rows = []
        for resource, coefficients in enumerate((program.col_use / program.scale).T.tolist()):
            row = pulp.LpAffineExpression(zip(self.x, coefficients, strict=True)) <= _UNBOUNDED
            self.prob += row, f"resource{resource}"
            self.rows.append(row)

    def solve(
        self, limit: np.ndarray, start: np.ndarray | None, rel_gap: float, time_limit: float
    ) -> _Outcome:
        program = self.program
        for resource, row in enumerate(self.rows):
            finite = math.isfinite(limit[resource])
            row.changeRHS(limit[resource] / program.scale[resource] if finite else _UNBOUNDED)
        chosen = set() if start is None else set(start.tolist())
        for i, variable in enumerate(self.x):
            variable.setInitialValue(1 if i in chosen else 0)
        with tempfile.TemporaryDirectory() as folder:
            log_path = Path(folder) / "cbc.log"
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "PULP_CBC_CMD is deprecated", DeprecationWarning)
                command = pulp.PULP_CBC_CMD(
                    msg=False,
                    timeLimit=time_limit,
                    gapRel=rel_gap,
                    warmStart=start is not None,
                    logPath=str(log_path),
                    timeMode="elapsed",
                    options=[
                        "preprocess off",
                        f"primalTolerance {FEASIBILITY_TOL}",
                        f"integerTolerance {FEASIBILITY_TOL}",
                    ],
                )
            self.prob.solve(command)
            cbc_log = log_path.read_text() if log_path.exists() else ""
        if self.prob.sol_status == pulp.LpSolutionInfeasible:
            return _Outcome("infeasible", None, math.inf)
        if self.prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            return _Outcome("unknown", None, -math.inf)
        x = np.array([variable.value() or 0.0 for variable in self.x])
        columns = program.best_per_group(-x)
        objective = program.cost(columns)
        proven: Status = "optimal" if self.prob.sol_status == pulp.LpSolutionOptimal else "feasible"
        return _Outcome(proven, columns, self._bound(cbc_log, objective, proven))

    def _bound(self, cbc_log: str, objective: float, proven: Status) -> float:
        """CBC's best bound: from a stopped search, from a gap-tolerance exit, or the optimum."""
        scale = self.program.cost_scale
        partial = self._PARTIAL.findall(cbc_log)
        if partial:
            return float(partial[-1]) / scale
        gap_exit = self._GAP_EXIT.findall(cbc_log)
        if gap_exit:
            return objective - float(gap_exit[-1]) / scale
        return objective if proven == "optimal" else -math.inf


def _solution(
    table: LayerTable,
    program: _Program,
    outcome: _Outcome,
    solver: str,
    act_bits: ActBits,
    seconds: float,
) -> Solution:
    if outcome.columns is None:
        return Solution({}, math.inf, 0, 0.0, solver, outcome.status, math.inf, seconds)
    chosen = dict(program.fixed_bits)
    acts = dict.fromkeys(program.fixed_bits, _widest(act_bits))
    for column in outcome.columns:
        choice = program.choices[program.col_choice[column]]
        members = program.groups[program.col_group[column]]
        chosen.update(dict.fromkeys(members, choice.weight_bits))
        acts.update(dict.fromkeys(members, choice.act_bits))
    plan = {layer.name: chosen[layer.name] for layer in table}
    act_plan = {layer.name: acts[layer.name] for layer in table}
    storage, bops = _plan_usage(table, plan, act_plan)
    objective = program.cost(outcome.columns)
    return Solution(
        bits=plan,
        objective=objective,
        storage_bits=storage,
        bops=float(bops),
        solver=solver,
        status=outcome.status,
        gap=_relative_gap(objective, outcome.bound),
        seconds=seconds,
        act_bits=act_plan,
    )


def _quiet_highs(highspy: Any) -> Any:
    """A Highs instance whose construction prints nothing.

    HiGHS writes a licence banner straight to file descriptor 1 when its first instance is built,
    before any option can be set, which would corrupt `bitplan run --json` on stdout. The banner
    goes to /dev/null instead (Python's own buffered stdout is flushed first and untouched).
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
