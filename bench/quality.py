"""Quality benchmark: FP32, uniform and mixed precision per sensitivity method, on real models.

    python bench/quality.py                       # ResNet20, ResNet56, MiniLM (minutes)
    python bench/quality.py --models resnet20 --methods lrp+fisher --budgets 4,3

For each model one `Workbench` is prepared (load, layer table, calibration statistics), each
method's cost table is computed once, and every budget is a re-solve of that table. Prints
markdown tables and writes them to bench/out/quality.md. Needs ../shared/data (and the `bench`
extra for MiniLM).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from scipy.stats import spearmanr

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from allocator.apply import apply  # noqa: E402
from allocator.budget import parse_budget  # noqa: E402
from allocator.pipeline import JobSpec, Workbench, prepare  # noqa: E402
from allocator.plan import BitPlan  # noqa: E402
from allocator.solve import solve  # noqa: E402

DATA = Path(os.environ.get("BITPLAN_SHARED_DATA", ROOT.parent / "shared" / "data"))
METHODS = ("lrp", "fisher", "hessian", "measured", "lrp+fisher")
UNIFORM_BITS = (8, 6, 5, 4, 3)
SWEEP = (2.25, 2.5, 3.0, 3.5, 4.0, 5.0)


def model_specs(eval_samples: int | None) -> dict[str, JobSpec]:
    cifar = DATA / "cifar10"
    stsb = DATA / "stsb"
    common = {"eval_samples": eval_samples}
    return {
        "resnet20": JobSpec(
            model="zoo:cifar_resnet20",
            weights=str(cifar / "resnet20-12fca82f.th"),
            calib=str(cifar / "calib_train_jpeg.npz"),
            eval=str(cifar / "test_jpeg.npz"),
            **common,
        ),
        "resnet56": JobSpec(
            model="zoo:cifar_resnet56",
            weights=str(cifar / "resnet56-4bfd9763.th"),
            calib=str(cifar / "calib_train_jpeg.npz"),
            eval=str(cifar / "test_jpeg.npz"),
            **common,
        ),
        "minilm": JobSpec(
            model="hf:minilm",
            calib=str(stsb / "sts-train.csv"),
            eval=str(stsb / "sts-dev.csv"),
            **common,
        ),
    }


@dataclass
class Row:
    label: str
    avg_bits: float
    metric: float
    predicted: float | None = None


def metric_of(bench: Workbench, plan: BitPlan, plain: bool = False) -> float:
    """`plain`: round-to-nearest straight from the plan, ignoring the workbench's choices."""
    module = apply(bench.model.module, plan) if plain else bench.quantize(plan)
    return bench.evaluate(module)[bench.evalset.primary_metric]


def avg_bits(bench: Workbench, bits: dict[str, int]) -> float:
    return sum(layer.params * bits[layer.name] for layer in bench.table) / bench.table.total_params


def uniform_rows(bench: Workbench) -> list[Row]:
    """Plain round-to-nearest (max clip, no bias correction) and bitplan's quantizer, per width."""
    rows = []
    for b in UNIFORM_BITS:
        widths = {layer.name: layer.pinned_bits or b for layer in bench.table}
        plain = BitPlan.from_bits(widths, clip="max")
        rows.append(
            Row(
                f"uniform W{b} max-clip",
                avg_bits(bench, widths),
                metric_of(bench, plain, plain=True),
            )
        )
        ours = bench.uniform_plan(b)
        rows.append(
            Row(f"uniform W{b} bitplan quantizer", avg_bits(bench, widths), metric_of(bench, ours))
        )
    return rows


def mixed_rows(
    bench: Workbench, method: str, budgets: list[float], sweep: bool
) -> tuple[list[Row], float, float | None]:
    """Mixed precision at each budget; also predicted-vs-measured Spearman over a sweep."""
    started = time.perf_counter()
    cost, _sens, _timings = bench.cost_table(method)
    seconds = time.perf_counter() - started
    fp32 = bench.evaluate()[bench.evalset.primary_metric]
    rows, points = [], []
    for b in sorted(set(budgets) | (set(SWEEP) if sweep else set()), reverse=True):
        resolved = parse_budget(f"avg-bits={b}").resolve(bench.table)
        solution = solve(bench.table, bench.spec.bits, cost, resolved)
        metric = metric_of(bench, bench.plan(solution.bits, {"method": method}))
        points.append((solution.objective, fp32 - metric))
        if b in budgets:
            rows.append(
                Row(
                    f"mixed {method} @ avg {b}",
                    avg_bits(bench, solution.bits),
                    metric,
                    solution.objective,
                )
            )
    rho = spearmanr([p for p, _ in points], [m for _, m in points]).statistic if sweep else None
    return rows, seconds, rho


def clip_table(bench: Workbench) -> str:
    """How often each clipping and rounding rule won, by width (least output error on calibration
    data)."""
    lines = ["| bits | max | mse | nearest | gptq |", "|---|---|---|---|---|"]
    for b in bench.spec.bits:
        won = [bench.choices[(layer.name, b)] for layer in bench.table]
        clips = [c.clip for c in won]
        rounding = [c.rounding for c in won]
        lines.append(
            f"| {b} | {clips.count('max')} | {clips.count('mse')} | "
            f"{rounding.count('nearest')} | {rounding.count('gptq')} |"
        )
    return "\n".join(lines)


def run_model(name: str, spec: JobSpec, methods: list[str], budgets: list[float]) -> str:
    started = time.perf_counter()
    bench = prepare(spec)
    primary = bench.evalset.primary_metric
    fp32 = bench.evaluate()[primary]
    rows = [Row("FP32", 32.0, fp32), *uniform_rows(bench)]
    method_lines = [
        "| method | cost table seconds | predicted-vs-measured Spearman |",
        "|---|---|---|",
    ]
    for method in methods:
        mixed, seconds, rho = mixed_rows(bench, method, budgets, sweep=True)
        rows.extend(mixed)
        method_lines.append(f"| {method} | {seconds:.1f} | {rho:.3f} |")
    out = [
        f"### {name} ({spec.model}, {primary} on {bench.evalset.size} eval samples, "
        f"{len(bench.table)} layers)",
        "",
        f"| configuration | avg weight bits | {primary} | predicted cost |",
        "|---|---|---|---|",
    ]
    for row in rows:
        predicted = "" if row.predicted is None else f"{row.predicted:.4g}"
        out.append(f"| {row.label} | {row.avg_bits:.2f} | {row.metric:.2f} | {predicted} |")
    out += [
        "",
        *method_lines,
        "",
        "Clipping rule chosen per layer (by output error):",
        "",
        clip_table(bench),
        "",
        f"_{time.perf_counter() - started:.0f} s in all_",
        "",
    ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet20,resnet56,minilm")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--budgets", default="4,3,2.5")
    parser.add_argument("--eval-samples", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "quality.md"))
    args = parser.parse_args()
    specs = model_specs(args.eval_samples)
    budgets = [float(b) for b in args.budgets.split(",")]
    sections = []
    for name in args.models.split(","):
        section = run_model(name, specs[name], args.methods.split(","), budgets)
        print(section, flush=True)
        sections.append(section)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(sections))


if __name__ == "__main__":
    main()
