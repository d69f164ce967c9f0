"""The solver's front: one budget or a list of budgets in, a `Solution` per budget out.

For each budget, the knapsack search (allocator/solve/knapsack.py) answers when it applies; else
the HiGHS backend (allocator/solve/highs.py), built once per program; CBC
(allocator/solve/cbc.py) when asked for or when HiGHS fails or is missing. Pinned groups and
the program itself are allocator/solve/program.py; `Solution.status` is what the solver proved
(see allocator/solve/backend.py).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from allocator.budget import ResolvedBudget
from allocator.job import FLOAT_ACT_BITS, FLOAT_ACTS, ActWidths
from allocator.solve.backend import Backend, Outcome, SolverError, relative_gap
from allocator.solve.cbc import CbcBackend
from allocator.solve.heuristics import greedy_start
from allocator.solve.highs import HighsBackend
from allocator.solve.knapsack import Knapsack, knapsack_outcome
from allocator.solve.program import (
    Program,
    Status,
    build_program,
    choices_of,
    plan_latency,
    plan_usage,
    resource_limits,
)

if TYPE_CHECKING:
    from allocator.latency_table import LatencyTable
    from allocator.layers import LayerTable

log = logging.getLogger(__name__)

SOLVERS = ("highs", "cbc")


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
    latency_ms: float | None = None
    """The plan's predicted milliseconds on the budget's latency table (None without one)."""
    latency_table: LatencyTable | None = field(default=None, compare=False, repr=False)
    """That table, so a plan chosen outside the program (`fixed_plan`) is priced on it too."""

    def to_dict(self) -> dict[str, Any]:
        """The strict-JSON form results store: the solver's name under "name", and None for an
        objective or gap that is inf (no plan, or no bound), which JSON cannot carry; the
        predicted latency only when the budget had a latency term."""
        data = asdict(self)
        data.pop("act_bits")  # per layer; results report it as the activation allocation
        data.pop("latency_table")
        if data["latency_ms"] is None:
            data.pop("latency_ms")
        data["name"] = data.pop("solver")
        return {
            key: None if isinstance(value, float) and not math.isfinite(value) else value
            for key, value in data.items()
        }


def solve(
    table: LayerTable,
    bits: Sequence[int],
    cost: np.ndarray,
    budget: ResolvedBudget,
    *,
    acts: ActWidths = FLOAT_ACTS,
    time_limit: float = 10.0,
    rel_gap: float = 1e-3,
    solver: str = "highs",
) -> Solution:
    """The cheapest plan within `budget`; allocator/solve/program.py describes the program.

    `cost[i, j]` is the cost of `table.layers[i]` at `bits[j]` (np.inf forbids it). Raises
    InfeasibleBudget when the budget is below the smallest plan that meets each of its limits.
    """
    return solve_budgets(
        table,
        bits,
        cost,
        [budget],
        acts=acts,
        time_limit=time_limit,
        rel_gap=rel_gap,
        solver=solver,
    )[0]


def check_budget(
    table: LayerTable,
    bits: Sequence[int],
    budget: ResolvedBudget,
    *,
    acts: ActWidths = FLOAT_ACTS,
) -> None:
    """Raise InfeasibleBudget now if no plan can fit, before any cost is computed.

    Feasibility depends on sizes only, so a job checks its budget right after the layer table
    is known instead of after minutes of calibration.
    """
    columns = len(choices_of(bits, acts))
    zeros = np.zeros((len(table), columns))
    resource_limits(build_program(table, bits, zeros, acts, _latency_table([budget])), budget)


def solve_budgets(
    table: LayerTable,
    bits: Sequence[int],
    cost: np.ndarray,
    budgets: Sequence[ResolvedBudget],
    *,
    acts: ActWidths = FLOAT_ACTS,
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
    program = build_program(table, bits, cost, acts, _latency_table(budgets))
    limits = [resource_limits(program, budget) for budget in budgets]
    backend: Backend | None = None
    knapsacks: dict[int, Knapsack] = {}
    solutions = []
    for limit in limits:
        started = time.perf_counter()
        if not program.groups:
            outcome = Outcome("optimal", np.zeros(0, dtype=np.intp), 0.0)
            name = solver
        elif (
            outcome := knapsack_outcome(
                program, limit, rel_gap, solver, knapsacks, started + time_limit
            )
        ) is not None:
            name = "knapsack"
        else:
            backend = backend or open_backend(program, solver)
            try:
                outcome = backend.solve(limit, greedy_start(program, limit), rel_gap, time_limit)
            except SolverError as error:
                log.warning("HiGHS failed (%s); solving with CBC", error)
                backend = CbcBackend(program)
                outcome = backend.solve(limit, greedy_start(program, limit), rel_gap, time_limit)
            name = backend.name
        solutions.append(
            to_solution(table, program, outcome, name, acts, time.perf_counter() - started)
        )
    return solutions


def _latency_table(budgets: Sequence[ResolvedBudget]) -> LatencyTable | None:
    """The one latency table the budgets' latency terms are priced on (a sweep shares one)."""
    tables = [b.latency for b in budgets if b.latency_ms is not None and b.latency is not None]
    if any(b.latency_ms is not None and b.latency is None for b in budgets):
        raise ValueError("a resolved latency budget must carry its latency table")
    if any(t != tables[0] for t in tables[1:]):
        raise ValueError("budgets solved together must share one latency table")
    return tables[0] if tables else None


def fixed_plan(
    table: LayerTable,
    widths: Mapping[str, int],
    bits: Sequence[int],
    cost: np.ndarray,
    like: Solution,
    *,
    acts: ActWidths = FLOAT_ACTS,
) -> Solution:
    """A full plan chosen outside the program (the uniform one, when the held-out check in
    allocator.workbench prefers it), every layer's input at `acts.baseline_bits`, priced as
    the program prices its own plans on `cost` (columns weight-major over `bits` x
    `acts.choices`); the solver's report (name, status, gap, time) stays `like`'s."""
    plan = dict(widths)
    act_bits = acts.baseline_bits
    storage, bops = plan_usage(table, plan, act_bits)
    columns = list(bits)
    pinned = table.pinned_widths()

    def column(width: int) -> int:
        return columns.index(width) * len(acts.choices) + acts.choices.index(act_bits)

    objective = sum(
        float(cost[i, column(plan[layer.name])])
        for i, layer in enumerate(table)
        if layer.name not in pinned and plan[layer.name] in columns
    )
    return replace(
        like,
        bits=plan,
        act_bits=dict.fromkeys(plan, act_bits),
        objective=objective,
        storage_bits=storage,
        bops=bops,
        latency_ms=plan_latency(plan, act_bits, like.latency_table),
    )


def uniform_bits_for(
    table: LayerTable,
    bits: Sequence[int],
    budget: ResolvedBudget,
    *,
    act_bits: int = FLOAT_ACT_BITS,
) -> int | None:
    """The widest single width of `bits` that fits `budget` (size, BOPs and predicted latency)
    on every unpinned layer, with every activation at `act_bits`, or None.

    This is the baseline a mixed plan is compared with at the same size.
    """
    fixed = table.pinned_widths()
    for width in sorted(set(bits), reverse=True):
        plan = {layer.name: fixed.get(layer.name, width) for layer in table}
        storage, bops = plan_usage(table, plan, act_bits)
        latency = plan_latency(plan, act_bits, budget.latency)
        if (
            (budget.size_bits is None or storage <= budget.size_bits)
            and (budget.bops is None or bops <= budget.bops)
            and (
                budget.latency_ms is None or (latency is not None and latency <= budget.latency_ms)
            )
        ):
            return width
    return None


def open_backend(program: Program, solver: str) -> Backend:
    """HiGHS when asked for and it can be built, else CBC."""
    if solver == "highs":
        try:
            return HighsBackend(program)
        except (ImportError, SolverError) as error:
            log.warning("HiGHS unavailable (%s); solving with CBC", error)
    return CbcBackend(program)


def to_solution(
    table: LayerTable,
    program: Program,
    outcome: Outcome,
    solver: str,
    acts: ActWidths,
    seconds: float,
) -> Solution:
    """A backend's outcome as a plan over every layer, pinned ones included, with its usage."""
    if outcome.columns is None:
        return Solution(
            {},
            math.inf,
            0,
            0.0,
            solver,
            outcome.status,
            math.inf,
            seconds,
            latency_table=program.latency,
        )
    chosen = dict(program.fixed_bits)
    chosen_acts = dict.fromkeys(program.fixed_bits, acts.widest)
    for column in outcome.columns:
        choice = program.choices[program.col_choice[column]]
        members = program.groups[program.col_group[column]]
        chosen.update(dict.fromkeys(members, choice.weight_bits))
        chosen_acts.update(dict.fromkeys(members, choice.act_bits))
    plan = {layer.name: chosen[layer.name] for layer in table}
    layer_acts = {layer.name: chosen_acts[layer.name] for layer in table}
    storage, bops = plan_usage(table, plan, layer_acts)
    objective = program.cost(outcome.columns)
    return Solution(
        bits=plan,
        objective=objective,
        storage_bits=storage,
        bops=float(bops),
        solver=solver,
        status=outcome.status,
        gap=relative_gap(objective, outcome.bound),
        seconds=seconds,
        act_bits=layer_acts,
        latency_ms=plan_latency(plan, layer_acts, program.latency),
        latency_table=program.latency,
    )
