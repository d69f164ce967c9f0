"""The integer program: checked against brute force, and each rule of the program on its own."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocator.budget import BITS_PER_MB, ResolvedBudget
from allocator.errors import InfeasibleBudget
from allocator.job import FLOAT_ACTS, JointActs
from allocator.layers import Layer, LayerTable
from allocator.solve import SOLVERS, Solution, fixed_plan, solve, solve_budgets, uniform_bits_for
from allocator.solve import knapsack as knapsack_module
from allocator.solve.backend import Outcome, SolverError
from allocator.solve.cbc import CbcBackend
from allocator.solve.highs import HighsBackend
from allocator.solve.knapsack import Knapsack
from allocator.solve.program import build_program
from allocator.solve.solver import to_solution

BITS = (2, 4, 8)


def layer(
    name: str,
    params: int = 1000,
    macs: int = 10_000,
    group: str | None = None,
    pinned: int | None = None,
    out_channels: int = 4,
) -> Layer:
    return Layer(name, "linear", params, out_channels, macs, group or name, pinned)


def convex_costs(rows: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    scale = rng.uniform(0.5, 5.0, rows)
    return scale[:, None] * np.exp(-np.array(BITS, dtype=float))[None, :] * 50


def brute_force(
    table: LayerTable, bits: Sequence[int], cost: np.ndarray, budget: ResolvedBudget
) -> tuple[float, dict[str, int]] | None:
    """The cheapest plan by enumerating every width of every free group; None if none fits."""
    groups: dict[str, list[int]] = {}
    for index, entry in enumerate(table.layers):
        groups.setdefault(entry.group, []).append(index)
    pins = {
        group: next(table.layers[i].pinned_bits for i in rows if table.layers[i].pinned_bits)
        for group, rows in groups.items()
        if any(table.layers[i].pinned_bits for i in rows)
    }
    free = [group for group in groups if group not in pins]
    best: tuple[float, dict[str, int]] | None = None
    for combo in itertools.product(range(len(bits)), repeat=len(free)):
        plan = {table.layers[i].name: width for g, width in pins.items() for i in groups[g]}
        objective = 0.0
        for group, k in zip(free, combo, strict=True):
            for i in groups[group]:
                plan[table.layers[i].name] = bits[k]
                objective += cost[i, k]
        if math.isinf(objective):
            continue
        storage = sum(entry.storage_bits(plan[entry.name]) for entry in table)
        bops = sum(entry.macs * plan[entry.name] * 32 for entry in table)
        if budget.size_bits is not None and storage > budget.size_bits:
            continue
        if budget.bops is not None and bops > budget.bops:
            continue
        if best is None or objective < best[0]:
            best = (objective, plan)
    return best


@st.composite
def instances(draw: st.DrawFn) -> tuple[LayerTable, np.ndarray, ResolvedBudget]:
    """<= 6 layers x 3 widths: ties, pins (some outside BITS), inf costs, size and BOPs limits."""
    count = draw(st.integers(1, 6))
    group_pins: dict[str, int | None] = {}
    layers = []
    for i in range(count):
        group = f"g{draw(st.integers(0, i))}"
        if group not in group_pins:
            group_pins[group] = draw(st.sampled_from([None, None, None, 4, 16]))
        pinned = group_pins[group] if draw(st.booleans()) else None
        layers.append(
            layer(
                f"l{i}",
                params=draw(st.integers(1, 5000)),
                macs=draw(st.integers(0, 100_000)),
                group=group,
                pinned=pinned,
                out_channels=draw(st.integers(1, 16)),
            )
        )
    table = LayerTable(tuple(layers))
    entries = st.tuples(st.floats(0, 100), st.integers(0, 9))
    drawn = draw(st.lists(entries, min_size=3 * count, max_size=3 * count))
    cost = np.array([math.inf if roll == 0 else value for value, roll in drawn]).reshape(count, 3)
    lo = sum(entry.storage_bits(entry.pinned_bits or 2) for entry in table)
    hi = sum(entry.storage_bits(entry.pinned_bits or 8) for entry in table)
    size = lo + draw(st.floats(-0.1, 1.1)) * (hi - lo)
    bops_lo = sum(entry.macs * (entry.pinned_bits or 2) * 32 for entry in table)
    bops_hi = sum(entry.macs * (entry.pinned_bits or 8) * 32 for entry in table)
    bops = draw(st.none() | st.floats(0.0, 1.0).map(lambda f: bops_lo + f * (bops_hi - bops_lo)))
    return table, cost, ResolvedBudget(size_bits=size, bops=bops)


def check_against_brute_force(
    table: LayerTable, cost: np.ndarray, budget: ResolvedBudget, solver: str
) -> None:
    groups = {entry.group for entry in table}
    allowed_per_group = {
        g: np.isfinite(
            sum(cost[i] for i, e in enumerate(table.layers) if e.group == g and not e.pinned_bits)
        )
        for g in groups
    }
    pinned_groups = {e.group for e in table if e.pinned_bits}
    if any(not ok.any() for g, ok in allowed_per_group.items() if g not in pinned_groups):
        with pytest.raises(ValueError, match="forbidden"):
            solve(table, BITS, cost, budget, solver=solver)
        return
    best = brute_force(table, BITS, cost, budget)
    if best is None:
        with pytest.raises(InfeasibleBudget):
            solve(table, BITS, cost, budget, solver=solver)
        return
    solution = solve(table, BITS, cost, budget, rel_gap=1e-9, solver=solver)
    assert solution.status == "optimal"
    assert solution.solver in ({solver, "knapsack"} if solver == "highs" else {solver})
    assert math.isclose(solution.objective, best[0], rel_tol=1e-6, abs_tol=1e-4)
    assert solution.storage_bits == table.storage_bits(solution.bits)
    assert budget.size_bits is None or solution.storage_bits <= budget.size_bits
    assert budget.bops is None or solution.bops <= budget.bops
    for i, entry in enumerate(table.layers):
        tied = [e for e in table if e.group == entry.group]
        assert {solution.bits[e.name] for e in tied} == {solution.bits[entry.name]}
        if entry.pinned_bits is None and all(e.pinned_bits is None for e in tied):
            assert math.isfinite(cost[i, BITS.index(solution.bits[entry.name])])


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_highs_matches_brute_force(instance: tuple[LayerTable, np.ndarray, ResolvedBudget]) -> None:
    check_against_brute_force(*instance, solver="highs")


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances())
def test_cbc_matches_brute_force(instance: tuple[LayerTable, np.ndarray, ResolvedBudget]) -> None:
    check_against_brute_force(*instance, solver="cbc")


@pytest.mark.parametrize("seed", range(4))
def test_knapsack_agrees_with_the_integer_program(
    seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The knapsack search and HiGHS's MIP find the same optimum over a sweep of size budgets."""
    rows = 40
    rng = np.random.default_rng(seed)
    table = LayerTable(
        tuple(
            layer(f"l{i}", params=int(p), out_channels=8)
            for i, p in enumerate(rng.integers(100, 50_000, rows))
        )
    )
    cost = convex_costs(rows, seed)
    budgets = [
        ResolvedBudget(size_bits=table.uniform_storage_bits(avg)) for avg in np.linspace(2, 8, 25)
    ]
    fast = solve_budgets(table, BITS, cost, budgets, rel_gap=1e-9)
    monkeypatch.setattr(knapsack_module, "MAX_GROUPS", 0)
    slow = solve_budgets(table, BITS, cost, budgets, rel_gap=1e-9)
    assert {s.solver for s in fast} == {"knapsack"}
    assert {s.solver for s in slow} == {"highs"}
    for quick, proven in zip(fast, slow, strict=True):
        assert quick.status == "optimal"
        assert math.isclose(quick.objective, proven.objective, rel_tol=1e-9, abs_tol=1e-9)
        assert quick.storage_bits <= budgets[fast.index(quick)].size_bits


def test_knapsack_hands_over_when_it_grows_too_large(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Knapsack.solve, "__defaults__", (math.inf, 1))
    table = LayerTable(tuple(layer(f"l{i}", params=1000 + 37 * i) for i in range(12)))
    budget = ResolvedBudget(size_bits=table.uniform_storage_bits(5))
    solution = solve(table, BITS, convex_costs(12), budget, rel_gap=1e-9)
    assert solution.solver == "highs"
    assert solution.status == "optimal"


def test_cbc_preprocessing_does_not_drop_the_optimum() -> None:
    """CBC's Cgl preprocessing once fixed the optimal column to zero here and said "Optimal"."""
    table = LayerTable(
        (
            layer("l0", params=1, out_channels=1),
            layer("l1", params=1, out_channels=1, group="g"),
            layer("l2", params=1, out_channels=1, group="g"),
        )
    )
    cost = np.array([[math.inf, 1.0, 0.0], [1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    for solver in SOLVERS:
        solution = solve(table, BITS, cost, ResolvedBudget(size_bits=63.0), solver=solver)
        assert solution.objective == 1.0
        assert solution.bits == {"l0": 4, "l1": 4, "l2": 4}


def test_tied_layers_share_bits_and_add_their_costs() -> None:
    table = LayerTable((layer("emb", group="tied"), layer("head", group="tied"), layer("mid")))
    cost = np.array([[0.0, 0.0, 0.0], [100.0, 50.0, 0.0], [10.0, 5.0, 0.0]])
    budget = ResolvedBudget(size_bits=table.uniform_storage_bits(4))
    solution = solve(table, BITS, cost, budget)
    assert solution.bits["emb"] == solution.bits["head"]
    assert solution.bits == {"emb": 4, "head": 4, "mid": 4}
    assert solution.objective == 55.0


def test_pins_hold_including_a_width_outside_bits() -> None:
    table = LayerTable(
        (layer("stem", pinned=16), layer("a"), layer("b", group="tied"), layer("c", group="tied"))
    )
    table = table.pin({"c": 8})
    cost = np.tile([10.0, 1.0, 0.0], (4, 1))
    budget = ResolvedBudget(size_bits=1000 * 16 + 3 * (1000 * 8 + 4 * 16))
    solution = solve(table, BITS, cost, budget)
    assert solution.bits == {"stem": 16, "a": 8, "b": 8, "c": 8}
    assert solution.storage_bits == 1000 * 16 + 3 * (1000 * 8 + 4 * 16)
    assert solution.objective == 0.0


def test_a_fixed_plan_is_priced_as_the_program_prices_its_own() -> None:
    table = LayerTable((layer("stem", pinned=8), layer("a"), layer("b")))
    cost = np.array([[0.0, 0.0, 0.0], [9.0, 3.0, 1.0], [7.0, 2.0, 0.5]])
    budget = ResolvedBudget(size_bits=table.uniform_storage_bits(4))
    solved = solve(table, BITS, cost, budget)
    uniform = fixed_plan(table, table.uniform(4), BITS, cost, solved)
    assert uniform.bits == {"stem": 8, "a": 4, "b": 4}
    assert uniform.storage_bits == table.uniform_storage_bits(4)
    assert uniform.objective == 5.0  # the pinned stem adds nothing, as in the program
    assert (uniform.solver, uniform.status, uniform.gap) == (
        solved.solver,
        solved.status,
        solved.gap,
    )


def test_a_fixed_plan_on_a_joint_table_takes_its_activation_width() -> None:
    table = LayerTable((layer("stem", pinned=8), layer("a"), layer("b")))
    acts = JointActs((4, 8))
    # Columns weight-major over BITS x acts: (2,4) (2,8) (4,4) (4,8) (8,4) (8,8).
    cost = np.array([[0.0] * 6, [9.0, 8.0, 3.0, 2.0, 1.0, 0.5], [7.0, 6.0, 2.0, 1.5, 0.5, 0.2]])
    budget = ResolvedBudget(size_bits=table.uniform_storage_bits(4))
    solved = solve(table, BITS, cost, budget, acts=acts)
    uniform = fixed_plan(
        table, table.uniform(4), BITS, cost, solved, acts=replace(acts, baseline_bits=4)
    )
    assert uniform.act_bits == {"stem": 4, "a": 4, "b": 4}
    assert uniform.objective == 5.0  # the (4, 4) column of a and b
    assert uniform.bops == sum(
        entry.macs * width * 4 for entry, width in zip(table, (8, 4, 4), strict=True)
    )


def test_tied_layers_pinned_to_different_widths_are_refused() -> None:
    table = LayerTable((layer("a", group="t", pinned=8), layer("b", group="t", pinned=4)))
    with pytest.raises(ValueError, match="pinned to different widths"):
        solve(table, BITS, np.zeros((2, 3)), ResolvedBudget())


def test_budget_below_smallest_plan_names_the_smallest_size() -> None:
    table = LayerTable((layer("stem", pinned=8), layer("a"), layer("b")))
    smallest = (1000 * 8 + 64) + 2 * (1000 * 2 + 64)
    with pytest.raises(InfeasibleBudget) as caught:
        solve(table, BITS, convex_costs(3), ResolvedBudget(size_bits=smallest - 1))
    message = str(caught.value)
    assert caught.value.smallest_feasible_bits == smallest
    assert f"{smallest / BITS_PER_MB:.6g} MB" in message
    assert f"{smallest / table.total_params:.4f} average bits" in message
    assert solve(table, BITS, convex_costs(3), ResolvedBudget(size_bits=smallest)).bits == {
        "stem": 8,
        "a": 2,
        "b": 2,
    }


def test_smallest_plan_skips_forbidden_widths() -> None:
    table = LayerTable((layer("a"), layer("b")))
    cost = np.array([[math.inf, 1.0, 0.0], [1.0, 0.5, 0.0]])
    smallest = (1000 * 4 + 64) + (1000 * 2 + 64)
    with pytest.raises(InfeasibleBudget) as caught:
        solve(table, BITS, cost, ResolvedBudget(size_bits=smallest - 0.5))
    assert caught.value.smallest_feasible_bits == smallest


def test_bops_budget_below_the_minimum_is_refused() -> None:
    table = LayerTable((layer("a", macs=1000), layer("b", macs=3000)))
    minimum = (1000 + 3000) * 2 * 32
    with pytest.raises(InfeasibleBudget, match=f"{minimum:.6g} BOPs"):
        solve(table, BITS, convex_costs(2), ResolvedBudget(bops=minimum - 1))


def test_bops_constraint_binds() -> None:
    table = LayerTable((layer("light", macs=1_000), layer("heavy", macs=1_000_000)))
    cost = np.array([[9.0, 3.0, 0.0], [10.0, 4.0, 0.0]])
    size_only = solve(table, BITS, cost, ResolvedBudget(size_bits=table.uniform_storage_bits(8)))
    assert size_only.bits == {"light": 8, "heavy": 8}
    budget = ResolvedBudget(size_bits=table.uniform_storage_bits(8), bops=1_000_000 * 4 * 32 * 1.1)
    with_bops = solve(table, BITS, cost, budget)
    assert with_bops.bits == {"light": 8, "heavy": 4}
    assert with_bops.bops == (1_000 * 8 + 1_000_000 * 4) * 32
    assert with_bops.bops <= budget.bops


def test_forbidden_choices_are_never_taken() -> None:
    rng = np.random.default_rng(3)
    table = LayerTable(tuple(layer(f"l{i}") for i in range(40)))
    cost = convex_costs(40, seed=3)
    cost[rng.random(cost.shape) < 0.3] = math.inf
    cost[:, 0] = np.where(np.isinf(cost).all(axis=1), 1.0, cost[:, 0])
    for avg in (3, 5, 8):
        solution = solve(
            table, BITS, cost, ResolvedBudget(size_bits=table.uniform_storage_bits(avg))
        )
        chosen = [cost[i, BITS.index(solution.bits[f"l{i}"])] for i in range(40)]
        assert all(math.isfinite(c) for c in chosen)


def test_budget_above_the_largest_plan_takes_every_best_choice() -> None:
    table = LayerTable(tuple(layer(f"l{i}") for i in range(5)))
    cost = np.array([[3.0, 1.0, 2.0]] * 5)
    solution = solve(table, BITS, cost, ResolvedBudget(size_bits=1e12, bops=1e18))
    assert set(solution.bits.values()) == {4}
    assert (solution.status, solution.gap, solution.objective) == ("optimal", 0.0, 5.0)


def test_every_layer_pinned() -> None:
    table = LayerTable((layer("a", pinned=8), layer("b", pinned=16)))
    solution = solve(table, BITS, np.zeros((2, 3)), ResolvedBudget(size_bits=1e9))
    assert solution.bits == {"a": 8, "b": 16}
    assert (solution.status, solution.objective) == ("optimal", 0.0)


def test_plan_filling_the_budget_exactly_is_allowed() -> None:
    table = LayerTable(tuple(layer(f"l{i}", params=1_000_000 + i) for i in range(3)))
    cost = convex_costs(3)
    budget = ResolvedBudget(size_bits=table.uniform_storage_bits(4))
    for solver in ("highs", "cbc"):
        solution = solve(table, BITS, cost, budget, solver=solver)
        assert solution.bits == {"l0": 4, "l1": 4, "l2": 4}
        assert solution.storage_bits == budget.size_bits


@pytest.mark.parametrize("solver", ["highs", "cbc"])
def test_time_limit_reports_feasible_not_optimal(solver: str) -> None:
    """PuLP calls a CBC run cut by its time limit "Optimal"; the status must say "feasible"."""
    table = LayerTable(tuple(layer(f"l{i}", params=1000 + 37 * i) for i in range(300)))
    rng = np.random.default_rng(0)
    cost = rng.lognormal(0, 2, (300, 1)) * np.exp(-rng.uniform(0.5, 1.5, (300, 1)) * BITS)
    budget = ResolvedBudget(size_bits=table.uniform_storage_bits(3.3))
    solution = solve(table, BITS, cost, budget, time_limit=0.0, rel_gap=0.0, solver=solver)
    assert solution.status in ("feasible", "unknown")
    if solution.status == "feasible":
        assert solution.gap > 0 and len(solution.bits) == 300
        assert solution.storage_bits <= budget.size_bits
    assert solve(table, BITS, cost, budget, rel_gap=0.0, solver=solver).status == "optimal"


def test_status_infeasible_and_unknown_carry_no_plan() -> None:
    table = LayerTable((layer("a"), layer("b")))
    program = build_program(table, BITS, convex_costs(2), FLOAT_ACTS)
    too_small = np.array([program.min_use[0] - 1, np.inf, np.inf])
    for backend in (HighsBackend(program), CbcBackend(program)):
        outcome = backend.solve(too_small, None, 1e-4, 5.0)
        assert (outcome.status, outcome.columns) == ("infeasible", None)
    empty = to_solution(
        table, program, Outcome("unknown", None, -math.inf), "highs", FLOAT_ACTS, 0.1
    )
    assert (empty.bits, empty.objective, empty.gap) == ({}, math.inf, math.inf)


def test_cbc_when_asked_and_as_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    table = LayerTable(tuple(layer(f"l{i}", params=500 + 10 * i) for i in range(12)))
    cost = convex_costs(12)
    budget = ResolvedBudget(size_bits=table.uniform_storage_bits(4.5))
    monkeypatch.setattr(knapsack_module, "MAX_GROUPS", 0)
    highs = solve(table, BITS, cost, budget, rel_gap=1e-9)
    cbc = solve(table, BITS, cost, budget, rel_gap=1e-9, solver="cbc")
    assert (highs.solver, cbc.solver) == ("highs", "cbc")
    assert cbc.status == "optimal"
    assert math.isclose(cbc.objective, highs.objective, rel_tol=1e-6)

    def broken(*_args: object) -> None:
        raise SolverError("simulated")

    monkeypatch.setattr(HighsBackend, "solve", broken)
    fallback = solve(table, BITS, cost, budget, rel_gap=1e-9)
    assert (fallback.solver, fallback.status) == ("cbc", "optimal")
    assert math.isclose(fallback.objective, highs.objective, rel_tol=1e-6)

    def missing(*_args: object) -> None:
        raise ImportError("no highspy")

    monkeypatch.setattr(HighsBackend, "__init__", missing)
    assert solve(table, BITS, cost, budget).solver == "cbc"


def test_solve_budgets_matches_single_solves_and_cost_falls_with_budget() -> None:
    table = LayerTable(tuple(layer(f"l{i}", params=800 + 13 * i) for i in range(20)))
    cost = convex_costs(20, seed=5)
    budgets = [ResolvedBudget(size_bits=table.uniform_storage_bits(b)) for b in (2.5, 4, 6, 8)]
    for solver in ("highs", "cbc"):
        sweep = solve_budgets(table, BITS, cost, budgets, rel_gap=1e-9, solver=solver)
        singles = [solve(table, BITS, cost, b, rel_gap=1e-9, solver=solver) for b in budgets]
        objectives = [s.objective for s in sweep]
        assert objectives == sorted(objectives, reverse=True)
        for swept, single in zip(sweep, singles, strict=True):
            assert math.isclose(swept.objective, single.objective, rel_tol=1e-6)


def test_uniform_bits_for() -> None:
    table = LayerTable((layer("a"), layer("b"), layer("c", macs=50_000)))
    at = table.uniform_storage_bits
    assert uniform_bits_for(table, BITS, ResolvedBudget(size_bits=at(4))) == 4
    assert uniform_bits_for(table, BITS, ResolvedBudget(size_bits=at(4) - 1)) == 2
    assert uniform_bits_for(table, BITS, ResolvedBudget(size_bits=at(2) - 1)) is None
    assert uniform_bits_for(table, BITS, ResolvedBudget()) == 8
    bops_at_4 = 70_000 * 4 * 32
    assert uniform_bits_for(table, BITS, ResolvedBudget(bops=bops_at_4)) == 4
    pinned = table.pin({"a": 16})
    assert uniform_bits_for(pinned, BITS, ResolvedBudget(size_bits=at(8))) == 4
    assert uniform_bits_for(pinned, BITS, ResolvedBudget(size_bits=at(4))) is None


def test_bad_inputs_are_refused() -> None:
    table = LayerTable((layer("a"),))
    with pytest.raises(ValueError, match="shape"):
        solve(table, BITS, np.zeros((2, 3)), ResolvedBudget())
    with pytest.raises(ValueError, match="NaN"):
        solve(table, BITS, np.array([[0.0, math.nan, 1.0]]), ResolvedBudget())
    with pytest.raises(ValueError, match="forbidden"):
        solve(table, BITS, np.full((1, 3), math.inf), ResolvedBudget())
    with pytest.raises(ValueError, match="distinct"):
        solve(table, (4, 4, 8), np.zeros((1, 3)), ResolvedBudget())
    with pytest.raises(ValueError, match="unknown solver"):
        solve(table, BITS, np.zeros((1, 3)), ResolvedBudget(), solver="gurobi")


def test_solution_to_dict_is_strict_json() -> None:
    table = LayerTable((layer("a"),))
    solution = solve(table, BITS, np.array([[2.0, 1.0, 0.0]]), ResolvedBudget())
    data = solution.to_dict()
    assert data["name"] == "knapsack" and data["status"] == "optimal" and data["bits"] == {"a": 8}
    hidden = {"solver", "act_bits", "latency_table", "latency_ms"}  # latency_ms: latency budgets
    assert set(data) == set(Solution.__dataclass_fields__) - hidden | {"name"}
    empty = Solution({}, math.inf, 0, 0.0, "cbc", "unknown", math.inf, 0.5).to_dict()
    assert (empty["objective"], empty["gap"]) == (None, None)
    json.dumps([data, empty], allow_nan=False)


def test_check_budget_refuses_before_any_cost_exists() -> None:
    from allocator.errors import InfeasibleBudget
    from allocator.layers import Layer, LayerTable
    from allocator.solve import check_budget

    table = LayerTable(
        (Layer("a", "linear", 1000, 10, 1000, "a"), Layer("b", "linear", 1000, 10, 1000, "b"))
    )
    check_budget(table, (2, 4, 8), ResolvedBudget(size_bits=table.uniform_storage_bits(2)))
    with pytest.raises(InfeasibleBudget, match="smallest feasible size"):
        check_budget(table, (2, 4, 8), ResolvedBudget(size_bits=table.uniform_storage_bits(1.5)))


def test_joint_allocation_trades_activation_bits_for_weight_bits_under_bops() -> None:
    """Two layers, costs in (weight, activation) pairs, BOPs of uniform W4A8 and room for 6-bit
    weights: the layer whose activations barely matter takes 4-bit inputs and buys 8-bit
    weights with the BOPs saved; the other keeps 8-bit inputs."""
    table = LayerTable((layer("cheap_act", macs=1000), layer("dear_act", macs=1000)))
    acts = JointActs((4, 8))
    weight_cost = convex_costs(2)
    act_cost = np.array([[0.001, 0.0], [50.0, 0.0]])
    cost = (weight_cost[:, :, None] + act_cost[:, None, :]).reshape(2, -1)
    bops = sum(e.macs * 4 * 8 for e in table)
    budget = ResolvedBudget(size_bits=table.uniform_storage_bits(6), bops=bops)
    solution = solve(table, BITS, cost, budget, acts=acts)
    assert solution.act_bits == {"cheap_act": 4, "dear_act": 8}
    assert solution.bits == {"cheap_act": 8, "dear_act": 4}
    assert solution.bops <= bops
    assert solution.storage_bits <= budget.size_bits


def test_a_pin_holds_for_its_whole_tied_group_in_every_uniform_plan() -> None:
    table = LayerTable(
        (layer("emb", group="tied", pinned=8), layer("head", group="tied"), layer("x"))
    )
    assert table.pinned_widths() == {"emb": 8, "head": 8}
    assert table.uniform(3) == {"emb": 8, "head": 8, "x": 3}
    assert table.uniform_storage_bits(3) == table.storage_bits(table.uniform(3))
    budget = ResolvedBudget(size_bits=table.uniform_storage_bits(3))
    assert uniform_bits_for(table, BITS, budget) == 2
    solution = solve(table, BITS, convex_costs(3), budget)
    assert solution.bits["head"] == 8 and solution.storage_bits <= budget.size_bits
