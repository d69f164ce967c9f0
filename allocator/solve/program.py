"""The integer program of bit allocation: its columns, resource rows and budget limits.

A cost table (layer x bit-width -> predicted loss) and a budget decide the plan. Choosing one width
per layer to minimise the summed cost under size and BOPs limits is a multiple-choice knapsack; an
integer program solves it to a proven gap (HAWQ-V3, CalibTIP) where greedy rules can only hope.

- Groups: layers that must share a width (tied weights) form one group; their cost rows, storage
  and BOPs add up. A group with a pinned member is fixed at that width (which need not be one of
  `bits`, e.g. 8 or 16) and leaves the program; its storage and BOPs are taken off the budget.
- Choices: option k of a free group is a `Choice` (weight width, activation width) with a storage,
  a BOPs and a latency coefficient (the latency table's entry; 0 without a table): one per entry of `bits` at one activation width (`FixedActs`), or,
  under joint allocation (`JointActs`), one per (weight width, activation width) pair,
  weight-major, and the cost table has a column per pair. Pinned groups run their inputs at the widest
  activation width. A choice is forbidden (no variable) when any member's cost is inf.
- Variables: x[g, k] in {0, 1} for every free group g and allowed choice k.
- Constraints: sum_k x[g, k] = 1 for every g; sum storage[g, k] x[g, k] <= size budget - pinned
  storage; sum bops[g, k] x[g, k] <= BOPs budget - pinned BOPs; sum ms[g, k] x[g, k] <= latency
  budget - pinned layers' ms - the table's `rest_ms` (each only when the budget has it). A
  latency budget is one more knapsack row, so every solve stays exact (the knapsack search
  when it is the only limit, else HiGHS or CBC).
- Objective: minimise sum cost[g, k] x[g, k]. Pinned layers add no cost: `Solution.objective` is
  the summed cost of the free layers at their chosen widths.

Numerics
- Resource rows are divided by the largest storage / BOPs / ms the free groups can use. Storage
  and BOPs are integers, so each row's right-hand side is put half a unit above the budget, less
  twice the feasibility tolerance: a plan the solver accepts never exceeds the exact budget, and
  a plan that fills it exactly stays allowed (see `resource_limits`). Milliseconds are not
  integral: that row's right-hand side is the budget less twice the tolerance.
- Costs are divided by the mean per-group cost range: measured, with raw costs spanning 1e12,
  HiGHS's absolute tolerances let it prove a bound above a feasible plan.

Imports numpy; the layer table only for type hints, so re-solving a cached profile never loads
torch. Never a solver, never services.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

import numpy as np

from allocator.budget import BITS_PER_MB, ResolvedBudget
from allocator.errors import InfeasibleBudget
from allocator.job import ActWidths

if TYPE_CHECKING:
    from allocator.latency_table import LatencyTable
    from allocator.layers import Layer, LayerTable

Status = Literal["optimal", "feasible", "infeasible", "unknown"]
FEASIBILITY_TOL = 1e-9
"""Primal and integrality tolerance given to both solvers, on rows scaled to at most 1."""
STORAGE, BOPS, LATENCY = 0, 1, 2
"""Indices of the three resources in every usage array."""
RESOURCES = 3


@dataclass(frozen=True)
class Choice:
    """One option for a free group: the widths its weights and input activations take."""

    weight_bits: int
    act_bits: int

    def usage(self, layer: Layer, latency: LatencyTable | None = None) -> tuple[int, int, float]:
        """Storage bits, BOPs per sample and (with a latency table) milliseconds of `layer` at
        this choice."""
        ms = 0.0 if latency is None else latency.ms(layer.name, self.weight_bits, self.act_bits)
        return (
            layer.storage_bits(self.weight_bits),
            layer.macs * self.weight_bits * self.act_bits,
            ms,
        )


@dataclass(frozen=True)
class Program:
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
    latency: LatencyTable | None = None
    """The table the latency column is priced on; None: every latency coefficient is 0."""
    min_use: np.ndarray = field(init=False)
    max_use: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        """The smallest and largest use of each resource over all plans of the free groups."""
        heads = self.starts[:-1]
        extremes = (
            (np.minimum.reduceat(self.col_use, heads), np.maximum.reduceat(self.col_use, heads))
            if len(heads)
            else (np.zeros((0, RESOURCES)), np.zeros((0, RESOURCES)))
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


def build_program(
    table: LayerTable,
    bits: Sequence[int],
    cost: np.ndarray,
    acts: ActWidths,
    latency: LatencyTable | None = None,
) -> Program:
    """Sum tied layers into groups, fix pinned groups, and keep one column per allowed choice;
    with `latency`, each column's latency is its layers' entries and the pinned layers' entries
    plus the table's `rest_ms` are the fixed part."""
    choices = choices_of(bits, acts)
    cost = np.asarray(cost, dtype=float)
    if cost.shape != (len(table), len(choices)):
        raise ValueError(f"cost has shape {cost.shape}, expected {(len(table), len(choices))}")
    if np.isnan(cost).any() or np.isneginf(cost).any():
        raise ValueError("cost must not hold NaN or -inf (np.inf forbids a choice)")
    fixed = table.pinned_widths()
    fixed_use = np.zeros(RESOURCES)
    if latency is not None:
        fixed_use[LATENCY] = latency.rest_ms
    rows: list[int] = []
    names: dict[str, list[str]] = {}
    for index, layer in enumerate(table.layers):
        if layer.name in fixed:
            fixed_use += Choice(fixed[layer.name], acts.widest).usage(layer, latency)
        else:
            rows.append(index)
            names.setdefault(layer.group, []).append(layer.name)
    group_index = {group: g for g, group in enumerate(names)}
    row_group = np.array([group_index[table.layers[row].group] for row in rows], dtype=np.intp)
    layer_use = np.array(
        [[choice.usage(table.layers[row], latency) for choice in choices] for row in rows],
        dtype=float,
    ).reshape(len(rows), len(choices), RESOURCES)
    group_cost = np.zeros((len(names), len(choices)))
    np.add.at(group_cost, row_group, cost[rows])
    group_use = np.zeros((len(names), len(choices), RESOURCES))
    np.add.at(group_use, row_group, layer_use)
    allowed = np.isfinite(group_cost)
    closed = [group for group, ok in zip(names, allowed.any(axis=1), strict=True) if not ok]
    if closed:
        raise ValueError(f"every width is forbidden (cost inf) for layer groups {closed}")
    col_group, col_choice = np.nonzero(allowed)
    col_cost = group_cost[col_group, col_choice]
    return Program(
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
        latency=latency,
    )


def choices_of(bits: Sequence[int], acts: ActWidths) -> tuple[Choice, ...]:
    """Every (weight width, activation width) option, weight-major: the cost table's columns."""
    widths = [int(b) for b in bits]
    act_widths = [int(a) for a in acts.choices]
    for name, values in (("bits", widths), ("activation widths", act_widths)):
        if not values or len(set(values)) != len(values) or min(values) < 1:
            raise ValueError(f"{name} must be distinct positive widths, got {values}")
    return tuple(Choice(width, act) for width in widths for act in act_widths)


def plan_usage(
    table: LayerTable, plan: dict[str, int], act_bits: int | Mapping[str, int]
) -> tuple[int, int]:
    """Total storage bits and BOPs per sample of a full plan (layer name -> weight width)."""
    storage = bops = 0
    for layer in table:
        act = act_bits if isinstance(act_bits, int) else act_bits[layer.name]
        layer_storage, layer_bops, _ = Choice(plan[layer.name], act).usage(layer)
        storage += layer_storage
        bops += layer_bops
    return storage, bops


def plan_latency(
    plan: Mapping[str, int], act_bits: int | Mapping[str, int], latency: LatencyTable | None
) -> float | None:
    """A full plan's predicted milliseconds on `latency` (None without a table)."""
    return None if latency is None else latency.predict(plan, act_bits)


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


def resource_limits(program: Program, budget: ResolvedBudget) -> np.ndarray:
    """What the free groups may use of each resource (inf: unconstrained or never binding).

    Storage and BOPs are integral, so a plan fits when it uses at most
    `free = floor(budget - pinned)`. The limit sits half a unit above `free`, less twice the
    solver's tolerance in these units: any plan the solver accepts then uses at most `free`,
    and while that tolerance is under a quarter unit every plan using `free` is accepted.
    Milliseconds are not integral: the limit is `budget - fixed` less twice the tolerance, so
    an accepted plan's predicted latency never exceeds the budget. Raises InfeasibleBudget when
    even the smallest plan does not fit.
    """
    if budget.latency_ms is not None and program.latency is None:
        raise ValueError("a latency budget needs the program built on its latency table")
    limits = np.full(RESOURCES, np.inf)
    for resource, total in (
        (STORAGE, budget.size_bits),
        (BOPS, budget.bops),
        (LATENCY, budget.latency_ms),
    ):
        if total is None:
            continue
        tolerance = FEASIBILITY_TOL * program.scale[resource]
        if resource == LATENCY:
            free = total - program.fixed_use[resource]
            if free < program.min_use[resource] - tolerance:
                raise _shortfall(program, resource, total)
            if free < program.max_use[resource]:
                limits[resource] = max(free - 2 * tolerance, program.min_use[resource])
            continue
        free = math.floor(total - program.fixed_use[resource])
        if free < program.min_use[resource]:
            raise _shortfall(program, resource, total)
        if free < program.max_use[resource]:
            limits[resource] = max(free + 0.5 - 2 * tolerance, program.min_use[resource])
    return limits


def _shortfall(program: Program, resource: int, total: float) -> InfeasibleBudget:
    smallest = program.fixed_use + program.min_use
    size = smallest[STORAGE]
    size_text = (
        f"{size / BITS_PER_MB:.6g} MB = {size / program.total_params:.4f} average bits per weight"
    )
    how = "with pinned layers at their widths and every other layer at its smallest allowed width"
    if resource == LATENCY:
        message = (
            f"latency budget {total:.4g} ms is below the smallest feasible "
            f"{smallest[LATENCY]:.4g} ms predicted by the latency table, with pinned layers at "
            "their widths and every other layer at its fastest measured choice (compare the "
            "table's entries with FP32's W32A32: a runtime's quantized kernels are not faster "
            "than float on every machine)"
        )
    elif resource == STORAGE:
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
