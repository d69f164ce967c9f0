"""Costs measured around the plan: re-solve with what moving each layer costs in its context.

The cost table prices each layer alone, around the FP32 network. Once the other layers are
quantized (whether the plan is fitted in the network, `allocator.in_network`, or each layer on
FP32 inputs), a layer's width matters differently: errors add up and interact. So after the first solve, each free layer is moved one
width down and one width up in the fitted plan, the rest unchanged, and the change of the
held-out divergence from FP32 is measured (two forward passes over the held-out samples per
layer). Those two measurements anchor the layer's row of a new cost table; widths further away
keep the old row's shape, scaled to the anchor. The new table is solved exactly, as before; the
new plan is fitted (in-network fits; FP32-input choices need none) and kept only when its
held-out divergence is lower. Rounds stop when a
round changes nothing, fails to improve, or `rounds` is reached.

Measured moves, not a first-order estimate at the quantized point: `bench/move_estimates.py`
shows the gradient ranking moves up well and moves down poorly on CIFAR ResNet20 at 2.5-3 bits
(docs/benchmarks.md), and the re-solve trades exactly those against each other; the forward
passes are cheap next to fitting a plan.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

from allocator.budget import ResolvedBudget
from allocator.job import ActWidths
from allocator.job_metrics import PlanRound
from allocator.quant.activation import ActQuantizer
from allocator.solve import Solution, fixed_plan, solve

if TYPE_CHECKING:
    from allocator.workbench import Workbench


def refine(
    bench: Workbench,
    solution: Solution,
    cost: np.ndarray,
    budget: ResolvedBudget,
    acts: ActWidths,
    rounds: int,
    activations: Mapping[str, ActQuantizer] | None = None,
    tick: Callable[[float, str], None] = lambda _f, _m: None,
) -> tuple[Solution, tuple[PlanRound, ...]]:
    """The best plan over up to `rounds` re-solves with in-context costs, and what each round
    measured (round 0: the first plan)."""
    bits = list(bench.spec.bits)
    best, best_cost = solution, cost
    # Each plan is fitted once, with the neighbouring widths a round moves to (same passes).
    bench.fitted(best.bits, activations, neighbours=True)
    divergence = bench.holdout_divergence(best.bits, activations)
    history = [PlanRound(0, divergence, 0, True)]
    for number in range(1, rounds + 1):
        tick((number - 1) / rounds, f"round {number}: measuring moves")
        measured = context_table(bench, best.bits, best_cost, bits, divergence, activations)
        candidate = solve(
            bench.table,
            bits,
            measured,
            budget,
            acts=acts,
            time_limit=bench.spec.time_limit,
        )
        changed = sum(candidate.bits[name] != width for name, width in best.bits.items())
        if changed == 0:
            history.append(PlanRound(number, divergence, 0, False))
            break
        tick((number - 0.5) / rounds, f"round {number}: fitting {changed} moved layers")
        bench.fitted(candidate.bits, activations, neighbours=number < rounds)
        moved = bench.holdout_divergence(candidate.bits, activations)
        kept = moved < divergence
        history.append(PlanRound(number, moved, changed, kept))
        if not kept:
            break
        best, best_cost, divergence = candidate, measured, moved
    if best is not solution:
        # Priced on the method's table, so the plan's predicted loss compares with the others.
        best = fixed_plan(bench.table, best.bits, bits, cost, best, acts=acts)
    return best, tuple(history)


def context_table(
    bench: Workbench,
    plan: Mapping[str, int],
    cost: np.ndarray,
    bits: Sequence[int],
    divergence: float,
    activations: Mapping[str, ActQuantizer] | None = None,
) -> np.ndarray:
    """A cost table in held-out divergence around `plan` (whose divergence is `divergence`):
    each free layer's one-width moves measured, further widths scaled from `cost`'s row, more
    bits never costlier, each row's least entry 0 (one width per layer, so a row's offset
    changes nothing)."""
    table = np.zeros_like(cost)
    for row, layer in enumerate(bench.table):
        if layer.pinned_bits is not None:
            continue
        at = bits.index(plan[layer.name])
        moves = {
            j: bench.holdout_divergence(plan, activations, {layer.name: bits[j]}) - divergence
            for j in (at - 1, at + 1)
            if 0 <= j < len(bits)
        }
        table[row] = _row(cost[row], at, moves)
    return table


def _row(old: np.ndarray, at: int, moves: Mapping[int, float]) -> np.ndarray:
    """One layer's row: 0 at its width `at`, the measured `moves` beside it, the old row's
    shape (scaled to the measured neighbour) beyond, then made non-increasing in width."""
    row = np.zeros(len(old))
    for step in (-1, 1):
        near = at + step
        if near not in moves:
            continue
        span = old[near] - old[at]
        for j in range(near, len(old) if step > 0 else -1, step):
            shape = (old[j] - old[at]) / span if span != 0 else 1.0
            row[j] = moves[near] * shape
    row = np.maximum.accumulate(row[::-1])[::-1]
    return row - row.min()
