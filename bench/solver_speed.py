"""How fast the integer program answers, on synthetic layer tables; prints a markdown table.

A profile turns a new budget into a re-solve with no model pass, so the solver's speed is what a
user waits for. This script checks the two targets that promise rests on:

- 10,000 layers x 6 widths with a size and a BOPs budget, proven within a 1e-3 gap, in <= 5 s;
- 100 layers re-solved at a new budget in <= 50 ms (p50 and p99 over many budgets).

Tables are synthetic and seeded: log-uniform parameter counts, MACs = parameters x a spatial
factor, first and last layer pinned to 8 bits as the pipeline does, and costs s * exp(-a * bits)
(convex and decreasing in the width, s and a drawn per layer). `model build` is the wall time of
`solve` minus the solver's own `seconds`: grouping the table and building the solver model.

Run: `.venv/bin/python bench/solver_speed.py`; the table also goes to bench/out/solver_speed.md.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from allocator.budget import ResolvedBudget
from allocator.layers import Layer, LayerTable
from allocator.solve import Solution, solve, solve_budgets

BITS = (2, 3, 4, 5, 6, 8)
SIZES = (50, 1_000, 10_000)
SOLVERS = ("highs", "cbc")
REL_GAPS = (1e-3, 1e-4)
RESOLVE_LAYERS = 100
RESOLVES = 50
OUT = Path(__file__).parent / "out" / "solver_speed.md"
TARGET_ROW = (10_000, "size+bops", "highs", 1e-3)
"""(layers, constraints, solver, rel_gap) of the row the 5 s target is about."""


@dataclass(frozen=True)
class Row:
    """One measured solve."""

    layers: int
    constraints: str
    rel_gap: float
    solution: Solution
    build_seconds: float


@dataclass(frozen=True)
class Resolve:
    """Per-budget wall times (ms) for re-solving one cost table."""

    layers: int
    how: str
    times_ms: list[float]
    statuses: set[str]


def synthetic_table(layers: int, seed: int = 0) -> tuple[LayerTable, np.ndarray]:
    """A seeded layer table and its (layers x BITS) cost table."""
    rng = np.random.default_rng(seed)
    params = np.exp(rng.uniform(np.log(1e3), np.log(1e6), layers)).astype(np.int64)
    spatial = rng.choice([1, 4, 16, 49, 196], layers)
    table = LayerTable(
        tuple(
            Layer(
                name=f"layer{i}",
                kind="linear",
                params=int(params[i]),
                out_channels=max(8, int(np.sqrt(params[i]))),
                macs=int(params[i] * spatial[i]),
                group=f"layer{i}",
                pinned_bits=8 if i in (0, layers - 1) else None,
            )
            for i in range(layers)
        )
    )
    scale = np.exp(rng.normal(0.0, 2.0, layers)) * params
    decay = rng.uniform(0.5, 1.5, layers)
    cost = scale[:, None] * np.exp(-decay[:, None] * np.array(BITS, dtype=float)[None, :])
    return table, cost


def budgets_for(table: LayerTable) -> dict[str, ResolvedBudget]:
    """A size budget (4.5 average bits) and the same with BOPs held to uniform 4-bit's."""
    size = table.uniform_storage_bits(4.5)
    bops_at_4 = sum(layer.macs * (layer.pinned_bits or 4) * 32 for layer in table)
    return {
        "size": ResolvedBudget(size_bits=size),
        "size+bops": ResolvedBudget(size_bits=size, bops=float(bops_at_4)),
    }


def measure(
    sizes: Sequence[int] = SIZES,
    solvers: Sequence[str] = SOLVERS,
    rel_gaps: Sequence[float] = REL_GAPS,
) -> list[Row]:
    """Every size x constraint set x solver x gap, CBC only at the loosest gap."""
    rows = []
    for layers in sizes:
        table, cost = synthetic_table(layers)
        for constraints, budget in budgets_for(table).items():
            for solver in solvers:
                for rel_gap in rel_gaps if solver == "highs" else rel_gaps[:1]:
                    started = time.perf_counter()
                    solution = solve(table, BITS, cost, budget, rel_gap=rel_gap, solver=solver)
                    total = time.perf_counter() - started
                    rows.append(
                        Row(layers, constraints, rel_gap, solution, total - solution.seconds)
                    )
    return rows


def measure_resolves(layers: int = RESOLVE_LAYERS, count: int = RESOLVES) -> list[Resolve]:
    """A fresh `solve` per budget (what a request does) and one `solve_budgets` over them all."""
    table, cost = synthetic_table(layers, seed=1)
    budgets = [
        ResolvedBudget(size_bits=table.uniform_storage_bits(avg))
        for avg in np.linspace(2.5, 7.5, count)
    ]
    fresh, statuses = [], set()
    for budget in budgets:
        started = time.perf_counter()
        statuses.add(solve(table, BITS, cost, budget).status)
        fresh.append((time.perf_counter() - started) * 1e3)
    sweep = solve_budgets(table, BITS, cost, budgets)
    return [
        Resolve(layers, "solve() per budget", fresh, statuses),
        Resolve(
            layers,
            "solve_budgets() per budget",
            [s.seconds * 1e3 for s in sweep],
            {s.status for s in sweep},
        ),
    ]


def markdown(rows: Sequence[Row], resolves: Sequence[Resolve]) -> str:
    lines = [
        "| layers | constraints | solver | rel_gap | status | gap | solve s | model build s |",
        "|---:|---|---|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        s = row.solution
        lines.append(
            f"| {row.layers:,} | {row.constraints} | {s.solver} | {row.rel_gap:g} | {s.status} "
            f"| {s.gap:.1e} | {s.seconds:.3f} | {row.build_seconds:.3f} |"
        )
    lines += [
        "",
        "| layers | re-solve | budgets | statuses | p50 ms | p99 ms |",
        "|---:|---|---:|---|---:|---:|",
    ]
    for r in resolves:
        p50, p99 = np.percentile(r.times_ms, [50, 99])
        lines.append(
            f"| {r.layers} | {r.how} | {len(r.times_ms)} | {', '.join(sorted(r.statuses))} "
            f"| {p50:.1f} | {p99:.1f} |"
        )
    return "\n".join(lines) + "\n"


def targets(rows: Sequence[Row], resolves: Sequence[Resolve]) -> list[str]:
    """One line per target: PASS or FAIL with the measured number."""
    lines = []
    for row in rows:
        s = row.solution
        if (row.layers, row.constraints, s.solver, row.rel_gap) != TARGET_ROW:
            continue
        total = s.seconds + row.build_seconds
        ok = s.status == "optimal" and s.gap <= 1e-3 and total <= 5.0
        lines.append(
            f"{'PASS' if ok else 'FAIL'}: 10,000 layers size+bops {s.status}, "
            f"gap {s.gap:.1e}, {total:.2f} s (target <= 5 s, gap <= 1e-3)"
        )
    for r in resolves:
        for name, value in zip(("p50", "p99"), np.percentile(r.times_ms, [50, 99]), strict=True):
            lines.append(
                f"{'PASS' if value <= 50.0 else 'FAIL'}: {r.layers} layers {r.how} {name} "
                f"{value:.1f} ms (target <= 50 ms)"
            )
    return lines


def main() -> None:
    load_before = os.getloadavg()[0]
    rows = measure()
    resolves = measure_resolves()
    machine = (
        f"{os.cpu_count()} CPUs, 1-minute load average {load_before:.1f} before and "
        f"{os.getloadavg()[0]:.1f} after (wall-clock times rise with it)"
    )
    report = f"{machine}\n\n{markdown(rows, resolves)}"
    checks = "\n".join(targets(rows, resolves))
    print(report)
    print(checks)
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(f"{report}\n{checks}\n")
    print(f"written to {OUT}", file=sys.stderr)


if __name__ == "__main__":
    main()
