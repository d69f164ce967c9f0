"""A job's plan is checked against the uniform plan of its budget on held-out samples."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from allocator import costs
from allocator.activation_bench import ActivationBench, quantizers
from allocator.budget import ResolvedBudget
from allocator.job import JobSpec, JointActs
from allocator.layers import build_layer_table
from allocator.pipeline import Workbench
from allocator.solve import solve, uniform_bits_for
from allocator.weight_rules import fp32_outputs
from allocator.zoo.base import LoadedModel

BITS = (2, 4, 8)


def _bench() -> Workbench:
    torch.manual_seed(0)
    module = nn.Sequential(
        nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 5)
    )
    model = LoadedModel(ref="mlp", module=module.eval(), task="classification", input_kind="image")
    batches = [torch.randn(64, 16)]
    table = build_layer_table(model, batches[0][:1], pin_first_last=False)
    stats = costs.input_stats(model, batches, table)
    choices = costs.quant_choices(model, table, stats, BITS)
    spec = JobSpec(model="mlp", calib="none", bits=BITS)
    holdout = [torch.randn(64, 16)]
    return Workbench(
        spec,
        model,
        batches,
        None,  # type: ignore[arg-type]  # no evaluation set: nothing here evaluates
        table,
        choices,
        holdout=holdout,
        holdout_reference=fp32_outputs(model, holdout),
    )


def test_a_plan_worse_than_uniform_on_held_out_samples_gives_way_to_it() -> None:
    bench = _bench()
    budget = ResolvedBudget(size_bits=bench.table.uniform_storage_bits(4))
    # A cost table that calls the widest layer free to crush: the program sends it to 2 bits.
    cost = np.array([[1.0, 0.5, 0.0]] * len(bench.table))
    cost[bench.table.names.index("2")] = [0.0, 0.0, 0.0]
    solution = solve(bench.table, BITS, cost, budget)
    assert solution.bits != bench.table.uniform(4)

    checked, check = bench.check_against_uniform(solution, cost, 4)

    assert check is not None
    uniform = bench.table.uniform(4)
    assert check.mixed == bench.holdout_divergence(solution.bits)
    assert check.uniform == bench.holdout_divergence(uniform)
    best = "uniform" if check.uniform < check.mixed else "mixed"
    assert check.kept == best == "uniform"  # 2-bit weights in the widest layer hurt most
    assert checked.bits == (uniform if best == "uniform" else solution.bits)
    assert checked.storage_bits <= budget.size_bits


def test_nothing_is_checked_without_holdout_or_a_uniform_plan() -> None:
    bench = _bench()
    budget = ResolvedBudget(size_bits=bench.table.uniform_storage_bits(3))
    cost = np.tile([1.0, 0.5, 0.0], (len(bench.table), 1))
    solution = solve(bench.table, BITS, cost, budget)
    assert bench.check_against_uniform(solution, cost, None) == (solution, None)
    assert uniform_bits_for(bench.table, BITS, budget) == 2
    bench.holdout = []
    assert bench.check_against_uniform(solution, cost, 2) == (solution, None)


def test_with_activations_each_plan_is_checked_with_its_own_and_uniform_takes_its_width() -> None:
    """Joint W/A: the mixed plan (a layer crushed to 2 bits, inputs at 4 bits) against uniform
    W4 with 8-bit inputs; the uniform plan wins and comes back with its activation width."""
    bench = _bench()
    acts = ActivationBench(
        bench.model, bench.batches, bench.table, bench.holdout, bench.holdout_reference
    )
    bench.activations = acts
    widths = JointActs((4, 8), baseline_bits=8)
    budget = ResolvedBudget(size_bits=bench.table.uniform_storage_bits(4))
    # Columns (w, a) weight-major: 8-bit inputs cost a little more, layer "2" is free to crush.
    cost = np.tile([1.0, 1.1, 0.5, 0.6, 0.0, 0.1], (len(bench.table), 1))
    cost[bench.table.names.index("2")] = [0.0, 0.1, 0.0, 0.1, 0.0, 0.1]
    solution = solve(bench.table, BITS, cost, budget, acts=widths)
    assert set(solution.act_bits.values()) == {4}
    mixed = quantizers(acts.assign(4, "baseline"))
    uniform = quantizers(acts.assign(8, "baseline"))

    checked, check = bench.check_against_uniform(solution, cost, 4, widths, "baseline")

    assert check is not None
    assert check.mixed == bench.holdout_divergence(solution.bits, mixed)
    assert check.uniform == bench.holdout_divergence(bench.table.uniform(4), uniform)
    assert check.uniform != bench.holdout_divergence(bench.table.uniform(4))  # acts applied
    assert check.kept == "uniform"
    assert checked.bits == bench.table.uniform(4)
    assert set(checked.act_bits.values()) == {8}
