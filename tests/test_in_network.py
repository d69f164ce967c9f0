"""In-network calibration and the in-context cost rounds (allocator.in_network, context_costs)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import replace

import numpy as np
import pytest
import torch
from torch import nn

from allocator import costs, in_network
from allocator.activations import collect, find_sites, quantized_activations
from allocator.budget import ResolvedBudget
from allocator.context_costs import _row, refine
from allocator.job import FLOAT_ACTS, JobSpec
from allocator.job_metrics import JobMetrics
from allocator.layers import build_layer_table
from allocator.pipeline import Workbench
from allocator.quant.activation import calibrate
from allocator.sensitivity.measured import quantized_layers
from allocator.solve import solve
from allocator.weight_rules import fp32_outputs
from allocator.zoo import load_model
from allocator.zoo.base import LoadedModel

BITS = (2, 3, 4, 8)


class Backwards(nn.Module):
    """Registers its layers in the opposite order to the one its forward calls them in."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(32, 5)
        self.body = nn.Conv2d(8, 8, 3, padding=1)
        self.stem = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        x = torch.relu(self.body(x))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


def _model() -> LoadedModel:
    torch.manual_seed(0)
    return LoadedModel(
        ref="backwards", module=Backwards().eval(), task="classification", input_kind="image"
    )


def _bench(calibration: str = "in-network", rounds: int = 2) -> Workbench:
    model = _model()
    batches = [torch.randn(16, 3, 8, 8) for _ in range(2)]
    table = build_layer_table(model, batches[0][:1], pin_first_last=False)
    stats = costs.input_stats(model, batches, table)
    choices = costs.quant_choices(model, table, stats, BITS)
    spec = JobSpec(
        model="backwards", calib="none", bits=BITS, calibration=calibration, context_rounds=rounds
    )
    holdout = [torch.randn(32, 3, 8, 8)]
    return Workbench(
        spec,
        model,
        batches,
        None,  # type: ignore[arg-type]  # nothing here evaluates
        table,
        choices,
        holdout=holdout,
        holdout_reference=fp32_outputs(model, holdout),
    )


def test_layers_are_fitted_in_the_order_the_network_runs_them() -> None:
    model = _model()
    order = in_network.execution_order(model, torch.randn(1, 3, 8, 8), ["head", "body", "stem"])
    assert order == ["stem", "body", "head"]


def _output_error(bench: Workbench, choices: in_network.Choices, widths: dict[str, int]) -> float:
    reference = fp32_outputs(bench.model, bench.batches)
    layers = {name: choices[(name, b)] for name, b in widths.items()}
    with quantized_layers(bench.model.module, layers), torch.no_grad():
        return sum(
            float(((bench.model(x) - ref) ** 2).sum())
            for x, ref in zip(bench.batches, reference, strict=True)
        )


@pytest.mark.parametrize("bits", [2, 3])
def test_in_network_fit_keeps_outputs_closer_to_fp32_than_fp32_input_fits(bits: int) -> None:
    bench = _bench()
    widths = bench.table.uniform(bits)
    fitted = bench.fitted(widths)
    assert _output_error(bench, fitted, widths) < _output_error(bench, bench.choices, widths)


def test_fitted_codes_stay_on_the_planned_grid_with_a_bias_correction_per_channel() -> None:
    bench = _bench()
    widths = bench.table.uniform(3)
    fitted = bench.fitted(widths, neighbours=True)
    for layer in bench.table:
        for b in (2, 3, 4):
            choice = fitted[(layer.name, b)]
            assert choice.quantized.bits == b
            assert int(choice.quantized.codes.min()) >= -(2 ** (b - 1))
            assert int(choice.quantized.codes.max()) <= 2 ** (b - 1) - 1
            assert choice.bias_correction is not None
            assert choice.bias_correction.shape == (layer.out_channels,)
    # Only the neighbours of the plan's width are fitted; 8 bits is two steps away.
    assert all((layer.name, 8) not in fitted for layer in bench.table)


def test_plain_sequential_gptq_target_fits_too() -> None:
    bench = _bench()
    widths = bench.table.uniform(3)
    fitted = in_network.calibrate(
        bench.model, bench.batches, bench.table, widths, bench.choices, target="quantized"
    )
    assert _output_error(bench, fitted, widths) < _output_error(bench, bench.choices, widths)
    with pytest.raises(ValueError, match="target must be one of"):
        in_network.calibrate(
            bench.model, bench.batches, bench.table, widths, bench.choices, target="other"
        )


def test_fp32_calibration_uses_the_statistics_phase_choices() -> None:
    bench = _bench(calibration="fp32")
    widths = bench.table.uniform(3)
    assert bench.fitted(widths) is bench.choices


def test_quantizing_a_plan_uses_its_fitted_codes() -> None:
    bench = _bench()
    plan = bench.uniform_plan(3)
    module = bench.quantize(plan)
    fitted = bench.fitted(bench.table.uniform(3))
    for layer in bench.table:
        expected = fitted[(layer.name, 3)].quantized.dequantize()
        torch.testing.assert_close(dict(module.named_modules())[layer.name].weight, expected)


def test_a_context_row_is_zero_at_the_plan_width_and_never_costlier_with_more_bits() -> None:
    old = np.array([4.0, 2.0, 1.0, 0.0])
    row = _row(old, 1, {0: 0.3, 2: -0.1})
    # Relative to the width the layer has: down costs 0.3, up saves 0.1, 8 bits saves 0.2
    # (the old row's shape scaled to the measured step up), then shifted so the least is 0.
    np.testing.assert_allclose(row, np.array([0.5, 0.2, 0.1, 0.0]))
    noisy = _row(old, 1, {0: 0.3, 2: 0.05})  # one step up measured slightly worse
    assert all(noisy[j] >= noisy[j + 1] for j in range(3))
    assert noisy.min() == 0.0


def test_rounds_never_return_a_plan_worse_on_held_out_samples_than_the_first() -> None:
    bench = _bench()
    budget = ResolvedBudget(size_bits=bench.table.uniform_storage_bits(3))
    cost = np.array([[1.0, 0.6, 0.3, 0.0]] * len(bench.table))
    first = solve(bench.table, BITS, cost, budget)
    best, rounds = refine(bench, first, cost, budget, FLOAT_ACTS, 2)
    assert rounds[0].round == 0 and rounds[0].kept
    assert rounds[0].divergence == pytest.approx(bench.holdout_divergence(first.bits))
    kept = [r.divergence for r in rounds if r.kept]
    assert kept == sorted(kept, reverse=True)
    assert bench.holdout_divergence(best.bits) == pytest.approx(kept[-1])
    assert bench.table.storage_bits(best.bits) <= budget.size_bits
    assert len(rounds) <= 3


def test_the_spec_bounds_calibration_and_rounds() -> None:
    from allocator.errors import BadSpec

    spec = JobSpec(model="m", calib="c")
    with pytest.raises(BadSpec, match="calibration"):
        replace(spec, calibration="magic").validate()
    with pytest.raises(BadSpec, match="context_rounds"):
        replace(spec, context_rounds=99).validate()


def test_a_kept_round_prices_its_plan_on_the_methods_table(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = _bench()
    budget = ResolvedBudget(size_bits=bench.table.uniform_storage_bits(3))
    names = [layer.name for layer in bench.table]
    # The method's table wants the stem wide; the held-out samples (stood in for by a divergence
    # that wants the head wide) disagree, so the first round moves the plan and keeps it.
    cost = np.array([[1.0, 0.6, 0.3, 0.0]] * len(names))
    cost[0] = [5.0, 1.0, 0.5, 0.0]
    wants = {name: (8 if name == names[-1] else 2) for name in names}

    def divergence(bits, _activations=None, swap=None) -> float:
        widths = {**bits, **(swap or {})}
        return float(sum(abs(widths[n] - wants[n]) for n in names))

    monkeypatch.setattr(bench, "holdout_divergence", divergence)
    first = solve(bench.table, BITS, cost, budget)
    best, rounds = refine(bench, first, cost, budget, FLOAT_ACTS, 2)
    assert rounds[1].kept and best.bits != first.bits
    columns = {b: j for j, b in enumerate(BITS)}
    expected = sum(cost[i, columns[best.bits[name]]] for i, name in enumerate(names))
    assert best.objective == pytest.approx(expected)


def test_rounds_fit_each_plan_once(monkeypatch: pytest.MonkeyPatch) -> None:
    bench = _bench()
    budget = ResolvedBudget(size_bits=bench.table.uniform_storage_bits(3))
    cost = np.array([[1.0, 0.6, 0.3, 0.0]] * len(bench.table))
    first = solve(bench.table, BITS, cost, budget)
    fits: list[tuple[tuple[str, int], ...]] = []
    calibrate = in_network.calibrate

    def counted(model, batches, table, plan, *args, **kwargs):
        fits.append(tuple(sorted(plan.items())))
        return calibrate(model, batches, table, plan, *args, **kwargs)

    monkeypatch.setattr(in_network, "calibrate", counted)
    refine(bench, first, cost, budget, FLOAT_ACTS, 2)
    assert len(fits) == len(set(fits))


def test_the_damped_inverse_is_exact_for_each_group_and_finite_for_a_degenerate_one() -> None:
    torch.manual_seed(0)
    rows = torch.randn(4, 64, 12, dtype=torch.float64)
    moments = rows.mT @ rows / 64
    moments[2] = 0.0
    moments[3] = -moments[3]
    inverse = in_network._damped_inverse(moments)
    damped = moments[0] + in_network.DAMPENING * moments[0].diagonal().mean() * torch.eye(12)
    assert torch.allclose(inverse[0] @ damped, torch.eye(12, dtype=torch.float64), atol=1e-8)
    assert inverse.isfinite().all()


def _auto_bench(batches: int, rows: int) -> Workbench:
    bench = _bench(calibration="auto")
    torch.manual_seed(1)
    bench.batches = [torch.randn(rows, 3, 8, 8) for _ in range(batches)]
    return bench


def _divergence(bench: Workbench, calibration: str, bits: int) -> float:
    fixed = replace(bench, spec=replace(bench.spec, calibration=calibration), _fitted={})
    return fixed.holdout_divergence(bench.table.uniform(bits))


@pytest.mark.parametrize(
    ("batches", "rows", "chosen"),
    # 32 images leave the least-squares fit too few rows and it overfits; 256 do not.
    [(2, 16, "fp32"), (4, 64, "in-network")],
)
def test_auto_keeps_the_fit_closer_to_fp32_on_held_out_samples(
    batches: int, rows: int, chosen: str
) -> None:
    bench = _auto_bench(batches, rows)
    check = bench.choose_fit(3)
    assert check is not None and check.chose == chosen == bench.calibration
    assert check.in_network == pytest.approx(_divergence(bench, "in-network", 3))
    assert check.fp32 == pytest.approx(_divergence(bench, "fp32", 3))
    fitted = bench.fitted(bench.table.uniform(3))
    assert (fitted is bench.choices) == (chosen == "fp32")
    assert bench.choose_fit(2) is check  # chosen once per job
    assert "uniform W3" in check.text()


def test_auto_without_held_out_samples_fits_in_the_network_unchecked() -> None:
    bench = replace(_bench(calibration="auto"), holdout=[], holdout_reference=[])
    assert bench.choose_fit(3) is None
    assert bench.calibration == "in-network"


def test_a_chosen_fit_is_in_the_metrics_and_their_json() -> None:
    bench = _auto_bench(2, 16)
    check = bench.choose_fit(None)
    assert check is not None and check.bits == min(BITS)
    metrics = JobMetrics(
        primary="top1", fp32={}, quantized={}, calibration=bench.calibration, fit_check=check
    )
    again = JobMetrics.from_dict(metrics.to_dict())
    assert again.fit_check == check
    assert again.fit_text.startswith("weights fitted on FP32 inputs (chosen by held-out")


def test_plans_fitted_on_fp32_inputs_are_refined_too() -> None:
    """Rounds run whatever the fit: FP32-input choices need no refit, but their errors still
    add up in the network. A kept round is never worse on held-out samples than the first."""
    bench = _bench(calibration="fp32")
    budget = ResolvedBudget(size_bits=bench.table.uniform_storage_bits(3))
    cost = np.array([[1.0, 0.6, 0.3, 0.0]] * len(bench.table))
    first = solve(bench.table, BITS, cost, budget)
    solution, rounds, _check = bench.choose_plan(cost, budget, None)
    assert rounds and rounds[0].divergence == pytest.approx(bench.holdout_divergence(first.bits))
    assert bench.holdout_divergence(solution.bits) <= rounds[0].divergence
    assert not bench._fitted  # nothing was fitted in the network


def _fit_both(
    model: LoadedModel,
    batches: list[torch.Tensor],
    context: Callable[[], AbstractContextManager[object]] | None = None,
) -> tuple:
    """The same W3 plan fitted in lockstep and layer by layer (`_Lockstep` switched off)."""
    table = build_layer_table(model, batches[0][:1], pin_first_last=False)
    stats = costs.input_stats(model, batches, table)
    choices = costs.quant_choices(model, table, stats, BITS)
    plan = {layer.name: 3 for layer in table}
    together = in_network.calibrate(model, batches, table, plan, choices, context=context)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(in_network._Lockstep, "run", lambda *_args, **_kw: None)
        apart = in_network.calibrate(model, batches, table, plan, choices, context=context)
    return together, apart


def _assert_same_fits(together: dict, apart: dict) -> None:
    assert together.keys() == apart.keys()
    for key, choice in together.items():
        assert torch.equal(choice.quantized.codes, apart[key].quantized.codes), key
        assert choice.output_error == pytest.approx(apart[key].output_error, rel=1e-6)


@pytest.mark.parametrize("rows_kept", [True, False])
def test_lockstep_fits_are_the_layer_by_layer_fits(
    rows_kept: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """All batches meeting before each layer fit what one partial pass per layer fits, with
    the FP32 rows kept from one pass or, where they would not fit, from an FP32 twin running
    in lockstep beside them."""
    if not rows_kept:
        monkeypatch.setattr(in_network, "FP32_ROWS_BYTES", 0)
    model = _model()
    batches = [
        torch.randn(8, 3, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(3)
    ]
    _assert_same_fits(*_fit_both(model, batches))


def test_a_model_too_large_to_copy_is_fitted_layer_by_layer(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Without kept FP32 rows the lockstep needs an FP32 copy of the model: above
    `TWIN_MAX_BYTES` it is not made, and the fit is the layer-by-layer one."""
    monkeypatch.setattr(in_network, "FP32_ROWS_BYTES", 0)
    monkeypatch.setattr(in_network, "TWIN_MAX_BYTES", 0)
    made: list[object] = []
    monkeypatch.setattr(in_network._Lockstep, "__init__", lambda *_a, **_k: made.append(1) or None)
    model = _model()
    batches = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    table = build_layer_table(model, batches[0][:1], pin_first_last=False)
    choices = costs.quant_choices(model, table, costs.input_stats(model, batches, table), BITS)
    plan = {layer.name: 3 for layer in table}
    fitted = in_network.calibrate(model, batches, table, plan, choices)
    assert not made and set(fitted) >= {(name, 3) for name in plan}


def test_lockstep_fits_run_the_activation_quantizers_in_every_thread() -> None:
    """With 4-bit activations (layer inputs and attention probabilities, whose transform lives
    in per-thread state) the threads fit what the layer-by-layer passes fit."""
    torch.manual_seed(0)
    model = load_model(
        "timm:vit_tiny_patch16_224?img_size=16&patch_size=8&embed_dim=32&depth=1&num_heads=2"
    )
    batches = [torch.randn(4, 3, 16, 16) for _ in range(3)]
    table = build_layer_table(model, batches[0][:1], pin_first_last=False)
    sites = find_sites(model, batches[0], table)
    samples = collect(model, batches, sites)
    quantizers = {site.name: calibrate("minmax", samples[site.name], 4) for site in sites}
    assert any(name.endswith(".probs") for name in quantizers)
    together, apart = _fit_both(
        model, batches, lambda: quantized_activations(model.module, sites, quantizers)
    )
    _assert_same_fits(together, apart)
    without, _ = _fit_both(model, batches)
    assert any(
        not torch.equal(without[key].quantized.codes, choice.quantized.codes)
        for key, choice in together.items()
    )


class Branchy(Backwards):
    """Skips its middle layer on batches whose mean is negative: batches part ways."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        positive = float(x.mean()) > 0
        x = torch.relu(self.stem(x))
        if positive:
            x = torch.relu(self.body(x))
        return self.head(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


def test_batches_that_part_ways_break_the_lockstep_and_leave_the_model_as_it_was() -> None:
    """A batch that skips a layer would leave the others waiting for it: the barrier breaks,
    `run` answers None (the caller fits layer by layer) and no weight stays swapped."""
    torch.manual_seed(0)
    model = LoadedModel(
        ref="branchy", module=Branchy().eval(), task="classification", input_kind="image"
    )
    high = torch.full((4, 3, 8, 8), 3.0) + torch.randn(4, 3, 8, 8)
    low = torch.full((4, 3, 8, 8), -3.0) + torch.randn(4, 3, 8, 8)
    table = build_layer_table(model, high[:1], pin_first_last=False)
    choices = costs.quant_choices(model, table, costs.input_stats(model, [high], table), BITS)
    modules = dict(model.module.named_modules())
    by_name = {layer.name: layer for layer in table}
    order = in_network.execution_order(model, high, by_name)
    fp32 = in_network._fp32_rows(model, [high, low], [by_name[n] for n in order], modules)
    before = {name: modules[name].weight.detach().clone() for name in order}
    plan = dict.fromkeys(order, 3)
    fitted = {(name, 3): choices[(name, 3)] for name in order}
    lockstep = in_network._Lockstep(model, [high, low], order, by_name, modules, fp32)
    assert lockstep.run(plan, fitted, choices, None, "fp32", None, None) is None
    assert all(torch.equal(modules[name].weight, before[name]) for name in order)
