"""The solver benchmark runs end to end at toy sizes, so `bench/solver_speed.py` cannot rot."""

from __future__ import annotations

from bench.solver_speed import markdown, measure, measure_resolves, targets


def test_solver_speed_bench_at_ten_layers() -> None:
    rows = measure(sizes=(10,), solvers=("highs", "cbc"), rel_gaps=(1e-3,))
    resolves = measure_resolves(layers=10, count=3)
    assert {(row.constraints, row.solution.solver) for row in rows} == {
        ("size", "frontier"),  # one binding resource: the exact knapsack search answers
        ("size", "cbc"),
        ("size+bops", "highs"),
        ("size+bops", "cbc"),
    }
    assert all(row.solution.status == "optimal" for row in rows)
    assert all(r.statuses == {"optimal"} and len(r.times_ms) == 3 for r in resolves)
    table = markdown(rows, resolves)
    assert table.count("| 10 |") == len(rows) + len(resolves)
    assert len(targets(rows, resolves)) == 2 * len(resolves)
