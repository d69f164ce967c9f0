"""Latency budgets: parsing, resolution on a latency table, and the third resource of the
integer program solved exactly (knapsack alone, HiGHS and CBC with a size term) against brute
force on small random tables."""

from __future__ import annotations

import itertools
import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from allocator.budget import ResolvedBudget, parse_budget
from allocator.errors import BadBudget, BadSpec, InfeasibleBudget
from allocator.latency_table import FLOAT_WIDTH, LatencyTable, choice_key, parse_shape
from allocator.layers import Layer, LayerTable
from allocator.solve import fixed_plan, solve, solve_budgets, uniform_bits_for

BITS = (2, 4, 8)


def layer(name: str, params: int = 1000, pinned: int | None = None, group: str = "") -> Layer:
    return Layer(name, "linear", params, 4, 10_000, group or name, pinned)


def latency_table(rows: dict[str, dict[int, float]], rest: float = 0.1) -> LatencyTable:
    """Float activations only: per layer, ms at each weight width (32 = FP32)."""
    entries = {
        name: {choice_key(w, FLOAT_WIDTH): ms for w, ms in row.items()}
        for name, row in rows.items()
    }
    return LatencyTable(
        model_sha256="0" * 64,
        input_shape=(1, 3, 8, 8),
        runtime="onnxruntime-cpu",
        runtime_version="test",
        machine={"cpu": "test", "cores": 1, "flags": [], "threads": 1},
        entries=entries,
        rest_ms=rest,
    )


def test_parse_and_print_latency_terms() -> None:
    assert parse_budget("latency-ms=3.2").latency_ms == 3.2
    both = parse_budget("avg-bits=4,latency=0.7x")
    assert (both.size_form, both.size_value, both.latency_ratio) == ("avg-bits", 4.0, 0.7)
    assert str(both) == "avg-bits=4,latency=0.7x" and both.needs_latency
    assert not parse_budget("avg-bits=4").needs_latency
    for bad, words in (
        ("latency=0.6", "with an x"),
        ("latency=0.6x,latency-ms=2", "two latency terms"),
        ("latency-ms=0", "positive"),
        ("latency=abcx", "not a number"),
    ):
        with pytest.raises(BadBudget, match=words):
            parse_budget(bad)


def test_a_measured_rest_at_8_bit_activations_is_shared_among_the_layers() -> None:
    """A plan with every site at 8 bits is predicted the rest measured at 8 bits; one with
    half its layers' inputs at 8 bits moves half the way; float plans keep FP32's rest."""
    entries = {
        name: {choice_key(8, FLOAT_WIDTH): 1.0, choice_key(8, 8): 0.25} for name in ("a", "b")
    }
    lat = replace(latency_table({}, rest=2.0), entries=entries, act_rest_ms={"8": 0.8})
    assert lat.predict({"a": 8, "b": 8}, FLOAT_WIDTH) == pytest.approx(2.0 + 2.0)
    assert lat.predict({"a": 8, "b": 8}, 8) == pytest.approx(0.8 + 0.5)
    assert lat.predict({"a": 8, "b": 8}, {"a": 8, "b": FLOAT_WIDTH}) == pytest.approx(
        2.0 - 0.6 + 0.25 + 1.0
    )
    assert LatencyTable.from_dict(lat.to_dict()).act_rest_ms == {"8": 0.8}


def test_resolve_is_relative_to_fp32_on_the_same_table() -> None:
    table = LayerTable((layer("a"), layer("b")))
    lat = latency_table({"a": {32: 1.0, 8: 0.5}, "b": {32: 2.0, 8: 1.0}}, rest=0.5)
    assert lat.fp32_ms() == pytest.approx(3.5)
    resolved = parse_budget("latency=0.6x").resolve(table, latency=lat)
    assert resolved.latency_ms == pytest.approx(0.6 * 3.5) and resolved.latency is lat
    assert parse_budget("latency-ms=3").resolve(table, latency=lat).latency_ms == 3.0
    # Without a table the latency term is left out: a size check before the table exists.
    assert parse_budget("avg-bits=4,latency=0.5x").resolve(table).latency_ms is None


def test_missing_entries_are_named() -> None:
    lat = latency_table({"a": {8: 1.0}})
    with pytest.raises(BadSpec, match="no entry for layer b"):
        lat.ms("b", 8, 32)
    with pytest.raises(BadSpec, match="W4A32"):
        lat.ms("a", 4, 32)
    assert parse_shape("1,3,32,32") == parse_shape("1x3x32x32") == (1, 3, 32, 32)
    with pytest.raises(BadSpec):
        parse_shape("1,0,3")
    assert LatencyTable.from_dict(lat.to_dict()) == lat


def brute_force(
    table: LayerTable, cost: np.ndarray, budget: ResolvedBudget, lat: LatencyTable
) -> float | None:
    free = [entry for entry in table if entry.pinned_bits is None]
    best = None
    for combo in itertools.product(range(len(BITS)), repeat=len(free)):
        plan = {e.name: e.pinned_bits for e in table if e.pinned_bits}
        objective = 0.0
        for entry, k in zip(free, combo, strict=True):
            plan[entry.name] = BITS[k]
            objective += cost[table.names.index(entry.name), k]
        storage = sum(entry.storage_bits(plan[entry.name]) for entry in table)
        ms = lat.predict(plan, FLOAT_WIDTH)
        if budget.size_bits is not None and storage > budget.size_bits:
            continue
        if budget.latency_ms is not None and ms > budget.latency_ms:
            continue
        if best is None or objective < best:
            best = objective
    return best


@st.composite
def instances(draw: st.DrawFn) -> tuple[LayerTable, np.ndarray, LatencyTable, float, bool]:
    count = draw(st.integers(1, 6))
    layers = [
        layer(
            f"l{i}",
            params=draw(st.integers(1, 4000)),
            pinned=draw(st.sampled_from([None] * 4 + [8])),
        )
        for i in range(count)
    ]
    table = LayerTable(tuple(layers))
    ms = st.floats(0.001, 5.0)
    lat = latency_table(
        {e.name: {w: draw(ms) for w in (*BITS, 32)} for e in layers}, rest=draw(st.floats(0, 1))
    )
    cost = np.array(draw(st.lists(st.floats(0, 100), min_size=3 * count, max_size=3 * count)))
    ratio = draw(st.floats(0.05, 1.5))
    with_size = draw(st.booleans())
    return table, cost.reshape(count, 3), lat, ratio, with_size


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(instances(), st.sampled_from(["highs", "cbc"]))
def test_latency_budget_is_exact(instance: tuple, solver: str) -> None:
    table, cost, lat, ratio, with_size = instance
    text = f"latency={ratio}x" + (",avg-bits=4" if with_size else "")
    budget = parse_budget(text).resolve(table, latency=lat)
    best = brute_force(table, cost, budget, lat)
    if best is None:  # each limit alone may fit: the program then proves them jointly infeasible
        try:
            found = solve(table, BITS, cost, budget, solver=solver, rel_gap=1e-9)
        except InfeasibleBudget:
            return
        assert found.bits == {} and found.status in ("infeasible", "unknown")  # CBC: unknown
        return
    solution = solve(table, BITS, cost, budget, solver=solver, rel_gap=1e-9)
    assert solution.status == "optimal"
    assert solution.objective == pytest.approx(best, abs=1e-6)
    assert solution.latency_ms == pytest.approx(lat.predict(solution.bits, FLOAT_WIDTH))
    assert solution.latency_ms <= budget.latency_ms
    assert solution.to_dict()["latency_ms"] == solution.latency_ms


def test_latency_alone_uses_the_knapsack_and_size_plus_latency_highs() -> None:
    table = LayerTable(tuple(layer(f"l{i}", params=1000 + 100 * i) for i in range(8)))
    rng = np.random.default_rng(0)
    lat = latency_table({f"l{i}": {2: 0.2, 4: 0.3, 8: 0.6, 32: 1.0} for i in range(8)})
    cost = rng.uniform(0, 1, (8, 3)) * np.array([4.0, 2.0, 1.0])
    alone = solve(table, BITS, cost, parse_budget("latency=0.5x").resolve(table, latency=lat))
    assert alone.solver == "knapsack" and alone.latency_ms <= 0.5 * lat.fp32_ms()
    both = solve(
        table, BITS, cost, parse_budget("avg-bits=3,latency=0.5x").resolve(table, latency=lat)
    )
    assert both.solver == "highs" and both.status == "optimal"


def test_infeasible_latency_names_the_fastest_plan() -> None:
    table = LayerTable((layer("a", pinned=8), layer("b")))
    lat = latency_table({"a": {8: 1.0, 32: 1.0}, "b": {2: 1.0, 4: 1.0, 8: 1.0, 32: 1.0}})
    budget = parse_budget("latency=0.5x").resolve(table, latency=lat)
    with pytest.raises(InfeasibleBudget, match=r"smallest feasible 2\.1 ms"):
        solve(table, BITS, np.zeros((2, 3)), budget)


def test_uniform_and_fixed_plans_are_priced_on_the_table() -> None:
    table = LayerTable((layer("a"), layer("b")))
    lat = latency_table({n: {2: 0.2, 4: 0.4, 8: 0.8, 32: 1.0} for n in "ab"}, rest=0.0)
    budget = parse_budget("latency-ms=0.9").resolve(table, latency=lat)
    assert uniform_bits_for(table, BITS, budget) == 4
    cost = np.array([[3.0, 1.0, 0.0], [3.0, 1.0, 0.0]])
    solved = solve(table, BITS, cost, budget)
    uniform = fixed_plan(table, table.uniform(2), BITS, cost, solved)
    assert uniform.latency_ms == pytest.approx(0.4)
    assert not math.isnan(solved.latency_ms)


def test_a_sweep_shares_one_table() -> None:
    table = LayerTable((layer("a"),))
    one = latency_table({"a": {2: 0.2, 4: 0.4, 8: 0.8, 32: 1.0}})
    other = latency_table({"a": {2: 0.1, 4: 0.4, 8: 0.8, 32: 1.0}})
    budgets = [
        parse_budget("latency=0.9x").resolve(table, latency=one),
        parse_budget("latency=0.9x").resolve(table, latency=other),
    ]
    with pytest.raises(ValueError, match="share one latency table"):
        solve_budgets(table, BITS, np.zeros((1, 3)), budgets)
