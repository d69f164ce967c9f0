"""Which ranks one-width moves around a plan better: measuring them, or a first-order estimate?

Why: `allocator/context_costs.py` re-prices a plan in its context by moving each free layer
one width down and one up and measuring the held-out divergence from FP32 (two forward passes
over the held-out samples per layer). A first-order estimate at the quantized point would cost
one forward and backward pass for all layers: the gradient g of the held-out divergence with
respect to each layer's weights (and, through a zero per-channel shift, its bias correction),
dotted with the change a move makes to them (both widths are fitted in the plan's context, so
the change is exact). Issue 13 asks for whichever ranks the moves better.

For each model and budget: the plan a job would solve first (`lrp+fisher`), fitted in the
network with its neighbouring widths; every move measured as a job's rounds measure it, and
estimated; the Spearman rank correlation of the estimates with the measured changes over all
moves, over the moves down and over the moves up (what the re-solve trades against each
other), and the seconds of each way. Held-out samples are the calibration images the
statistics did not use (976 of 2,000 for the CIFAR models).

Run: `.venv/bin/python bench/move_estimates.py [--models resnet20 --budgets 3,2.5]`; the table
is printed and written to bench/out/move_estimates.md.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch
from scipy.stats import spearmanr
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality_models import model_specs  # noqa: E402

from allocator.budget import parse_budget  # noqa: E402
from allocator.costs import QuantChoice  # noqa: E402
from allocator.pipeline import Workbench, prepare  # noqa: E402
from allocator.sensitivity.measured import divergence, quantized_layers  # noqa: E402
from allocator.solve import solve  # noqa: E402

METHOD = "lrp+fisher"


@contextmanager
def output_shifts(modules: Mapping[str, nn.Module]) -> Iterator[dict[str, torch.Tensor]]:
    """A zero per-output-channel shift added to each layer's output, whose gradient is what a
    change of the layer's bias correction does to first order."""
    shifts: dict[str, torch.Tensor] = {}
    with ExitStack() as stack:
        for name, module in modules.items():
            shift = torch.zeros(module.weight.shape[0], requires_grad=True)
            shifts[name] = shift
            channel = 1 if isinstance(module, nn.Conv2d) else -1

            def hook(
                _m: nn.Module,
                _a: tuple,
                out: torch.Tensor,
                s: torch.Tensor = shift,
                c: int = channel,
            ) -> torch.Tensor:
                shape = [1] * out.dim()
                shape[c] = -1
                return out + s.view(shape)

            stack.callback(module.register_forward_hook(hook).remove)
        yield shifts


def gradients(
    bench: Workbench, layers: Mapping[str, QuantChoice]
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The gradient of the mean held-out divergence at the quantized point, per layer: with
    respect to its weight and to a shift of its output channels."""
    modules = dict(bench.model.module.named_modules())
    chosen = {name: modules[name] for name in layers}
    for module in chosen.values():
        module.weight.grad = None
    samples = sum(ref.shape[0] for ref in bench.holdout_reference)
    with quantized_layers(bench.model.module, layers), output_shifts(chosen) as shifts:
        for inputs, ref in zip(bench.holdout, bench.holdout_reference, strict=True):
            out = bench.model(inputs)
            (divergence(bench.model.task, ref, out).sum() / samples).backward()
        grads = {
            name: (module.weight.grad.detach().clone(), shifts[name].grad.detach().clone())
            for name, module in chosen.items()
        }
    for module in chosen.values():
        module.weight.grad = None
    return grads


def estimate(
    grads: tuple[torch.Tensor, torch.Tensor], here: QuantChoice, there: QuantChoice
) -> float:
    """First-order change of the divergence when a layer moves from `here` to `there`."""
    weight, shift = grads
    change = float((weight * (there.weight_error - here.weight_error)).sum())
    if here.bias_correction is not None and there.bias_correction is not None:
        change += float((shift * (there.bias_correction - here.bias_correction)).sum())
    return change


def compare(bench: Workbench, budget: float) -> str:
    bits = list(bench.spec.bits)
    cost, _sens, _timings = bench.cost_table(METHOD)
    plan = solve(bench.table, bits, cost, parse_budget(f"avg-bits={budget}").resolve(bench.table))
    choices = bench.fitted(plan.bits, neighbours=True)
    base = bench.holdout_divergence(plan.bits)
    started = time.perf_counter()
    measured: dict[tuple[str, int], float] = {}
    for layer in bench.table:
        if layer.pinned_bits is not None:
            continue
        at = bits.index(plan.bits[layer.name])
        for j in (at - 1, at + 1):
            if 0 <= j < len(bits):
                swap = {layer.name: bits[j]}
                measured[(layer.name, j - at)] = (
                    bench.holdout_divergence(plan.bits, None, swap) - base
                )
    measure_seconds = time.perf_counter() - started
    started = time.perf_counter()
    layers = {name: choices[(name, b)] for name, b in plan.bits.items()}
    grads = gradients(bench, layers)
    estimated = {
        (name, step): estimate(
            grads[name],
            choices[(name, plan.bits[name])],
            choices[(name, bits[bits.index(plan.bits[name]) + step])],
        )
        for name, step in measured
    }
    estimate_seconds = time.perf_counter() - started

    def rho(step: int | None) -> str:
        keys = [k for k in measured if step is None or k[1] == step]
        if len(keys) < 3:
            return "n/a"
        value = spearmanr([measured[k] for k in keys], [estimated[k] for k in keys]).statistic
        return f"{value:.3f} ({len(keys)})"

    return (
        f"| avg {budget} | {base:.4f} | {rho(None)} | {rho(-1)} | {rho(1)} "
        f"| {measure_seconds:.1f} | {estimate_seconds:.1f} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet20")
    parser.add_argument("--budgets", default="3,2.5")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "move_estimates.md"))
    args = parser.parse_args()
    specs = model_specs(None)
    lines = []
    for name in args.models.split(","):
        bench = prepare(specs[name].spec)
        lines += [
            f"### {name}: one-width moves around the first plan ({METHOD}), fitted in the network",
            "",
            "| budget | plan's held-out divergence | Spearman, all moves (n) | moves down (n) "
            "| moves up (n) | measuring s | estimating s |",
            "|---|---|---|---|---|---|---|",
        ]
        for budget in (float(b) for b in args.budgets.split(",")):
            lines.append(compare(bench, budget))
            print(lines[-1], flush=True)
        lines.append("")
    text = "\n".join(lines)
    print(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
