"""Quality benchmark: FP32, uniform and mixed precision per sensitivity method, on real models.

    python bench/quality.py                       # ResNet20, ResNet56, MiniLM (minutes)
    python bench/quality.py --models resnet20 --methods lrp+fisher --budgets 4,3
    python bench/quality.py --act --models digits,minilm   # activation quantizers, W/A
    python bench/quality.py --models effnetlite1          # EfficientNet-Lite1 on ImageNet images
    python bench/quality.py --models tinylm               # a small causal LM, perplexity

`--act` measures activation quantization instead: uniform WxAy with the baseline and each seed
quantizer preset, and mixed weights at the size and BOPs of uniform W4A8 and W4A4
(`match=W4A8`). `digits` is the small ViT of bench/train_digits_vit.py, trained first if its
weights are missing.

`effnetlite1` is a pretrained depthwise CNN brought the way a user brings one: the model-source
plugin in examples/bitplan-efficientnet-lite (registered here directly, so the example need not be
installed). Its 500 ImageNet images are few, so they are split once into calibration and
evaluation images (bench/out/imagenet-split/), its table adds agreement and KL with FP32, and
mixed is compared with uniform at the same size image by image, with a paired bootstrap interval.

`tinylm` is the Llama-style causal LM of bench/train_tiny_lm.py (trained first if missing),
calibrated on STS-B training sentences and scored on the dev sentences: perplexity, which is
lower-is-better (every comparison here reads the direction from `HIGHER_IS_BETTER`), agreement and
KL with FP32 per position, and mixed against uniform window by window.

For each model one `Workbench` is prepared (load, layer table, calibration statistics), each
method's cost table is computed once, and every budget is a re-solve of that table. Prints
markdown tables and writes them to bench/out/quality.md. Needs ../shared/data (and the `bench`
extra for MiniLM).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from scipy.stats import spearmanr
from torch import nn
from torch.nn import functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality_act import act_section  # noqa: E402
from quality_models import (  # noqa: E402
    DIGITS,
    IMAGENET_SPLIT,
    BenchModel,
    avg_bits,
    model_specs,
    register_example_source,
    split_imagenet,
)
from train_digits_vit import train as train_digits  # noqa: E402
from train_tiny_lm import OUT as TINY_LM  # noqa: E402
from train_tiny_lm import train as train_tiny_lm  # noqa: E402

from allocator.apply import apply  # noqa: E402
from allocator.budget import parse_budget  # noqa: E402
from allocator.data import compare  # noqa: E402
from allocator.data.evaluate import (  # noqa: E402
    FLOAT64_CHUNK,
    HIGHER_IS_BETTER,
    agreement,
    kl_divergence,
    top1,
)
from allocator.job_metrics import rounds_text  # noqa: E402
from allocator.pipeline import Workbench, prepare  # noqa: E402
from allocator.plan import BitPlan  # noqa: E402
from allocator.solve import solve, uniform_bits_for  # noqa: E402

UNIFORM_BITS = (8, 6, 5, 4, 3, 2)
IN_NETWORK_UNIFORM_BITS = (4, 3, 2)
"""Uniform widths also fitted in the network (a fit is a pass per layer): the ones the budgets
compare with, and 2 bits, which only in-network fitting keeps usable."""
SWEEP = (2.25, 2.5, 3.0, 3.5, 4.0, 5.0)
BOOTSTRAP_RESAMPLES = 10_000
COLUMNS = {
    "top1": "top1",
    "perplexity": "perplexity",
    "agreement": "agreement with FP32",
    "kl": "KL to FP32",
}
"""Column headings of the metrics a model's table may show."""


@dataclass
class Scores:
    """One configuration on the evaluation set: its metrics and, for a classifier with labels,
    per image whether it is right and whether it agrees with FP32, so that two configurations
    can be compared image by image."""

    metrics: dict[str, float]
    correct: np.ndarray | None = None
    agrees: np.ndarray | None = None
    window_nll: np.ndarray | None = None
    """A causal LM's mean next-token loss per evaluation window."""


@dataclass
class Row:
    label: str
    avg_bits: float
    scores: Scores
    predicted: float | None = None
    budget: float | None = None
    """The avg-bits budget a mixed row was solved for."""
    bits: dict[str, int] | None = None
    """A mixed row's width per layer."""
    fit: str = "in-network"
    """How a mixed row's weights were fitted: its paired uniform row is fitted the same way."""


def score(bench: Workbench, module: nn.Module | None = None) -> Scores:
    """`module` (FP32 when None) on the evaluation set, in one pass per configuration."""
    tokens, labels = bench.evalset.tokens, bench.evalset.labels
    if labels is None and tokens is None:
        return Scores(bench.evaluate(module))
    reference = bench.reference
    logits = (
        reference if module is None else bench.evalset.outputs(replace(bench.model, module=module))
    )
    closeness = {"agreement": agreement(logits, reference), "kl": kl_divergence(reference, logits)}
    if tokens is not None:
        nll = window_nll(logits, tokens)
        return Scores({"perplexity": math.exp(nll.mean()), **closeness}, window_nll=nll)
    return Scores(
        {"top1": top1(logits, labels), **closeness},
        correct=(logits.argmax(dim=-1) == labels).numpy(),
        agrees=(logits.argmax(dim=-1) == reference.argmax(dim=-1)).numpy(),
    )


def window_nll(logits: torch.Tensor, tokens: torch.Tensor) -> np.ndarray:
    """Each window's mean next-token cross-entropy in nats; every window predicts as many
    tokens, so exp of their mean is the set's perplexity."""
    chunks = []
    for start in range(0, len(tokens), FLOAT64_CHUNK):
        chunk = slice(start, start + FLOAT64_CHUNK)
        loss = F.cross_entropy(
            logits[chunk, :-1].double().transpose(1, 2), tokens[chunk, 1:], reduction="none"
        )
        chunks.append(loss.mean(dim=1).numpy())
    return np.concatenate(chunks)


def metric_of(bench: Workbench, plan: BitPlan, plain: bool = False) -> Scores:
    """`plain`: round-to-nearest straight from the plan, ignoring the workbench's choices."""
    module = apply(bench.model.module, plan) if plain else bench.quantize(plan)
    return score(bench, module)


def uniform_label(bits: int, fit: str = "in-network") -> str:
    label = f"uniform W{bits} bitplan quantizer"
    return label if fit == "in-network" else f"{label}, FP32-input fit"


def fitting(bench: Workbench, calibration: str) -> Workbench:
    """The same workbench fitting every plan one way: "fp32" on FP32 inputs (the statistics
    phase's choices, as jobs did before in-network calibration) or "in-network"; the bench shows
    both, and the plans a job returns with the fit `calibration: "auto"` chooses."""
    return replace(bench, spec=replace(bench.spec, calibration=calibration))


def uniform_rows(bench: Workbench) -> list[Row]:
    """Plain round-to-nearest (max clip, no bias correction) and bitplan's quantizer fitted on
    FP32 inputs and in the network, per width."""
    rows = []
    plain_bench = fitting(bench, "fp32")
    network_bench = fitting(bench, "in-network")
    for b in UNIFORM_BITS:
        widths = {layer.name: layer.pinned_bits or b for layer in bench.table}
        plain = BitPlan.from_bits(widths, clip="max")
        size = avg_bits(bench, widths)
        rows += [
            Row(f"uniform W{b} max-clip", size, metric_of(bench, plain, plain=True)),
            Row(
                uniform_label(b, "fp32"),
                size,
                metric_of(plain_bench, plain_bench.uniform_plan(b)),
            ),
        ]
        if bench.spec.calibration != "fp32" and b in IN_NETWORK_UNIFORM_BITS:
            rows.append(
                Row(uniform_label(b), size, metric_of(network_bench, network_bench.uniform_plan(b)))
            )
    return rows


def mixed_rows(
    bench: Workbench, method: str, budgets: list[float], fp32: float, sweep: bool
) -> tuple[list[Row], float, float | None]:
    """Mixed precision at each budget as a job returns it (solve, rounds in the plan's context,
    check against uniform, in-network fit) and the first solve fitted on FP32 inputs; also
    predicted-vs-measured Spearman over a sweep of FP32-input plans (what the cost table
    predicts) of the primary metric's loss from `fp32` (positive when worse, whichever way the
    metric runs)."""
    started = time.perf_counter()
    cost, _sens, _timings = bench.cost_table(method)
    seconds = time.perf_counter() - started
    primary = bench.evalset.primary_metric
    plain_bench = fitting(bench, "fp32")
    rows, points = [], []
    for b in sorted(set(budgets) | (set(SWEEP) if sweep else set()), reverse=True):
        resolved = parse_budget(f"avg-bits={b}").resolve(bench.table)
        uniform_bits = uniform_bits_for(bench.table, bench.spec.bits, resolved)
        first = solve(bench.table, bench.spec.bits, cost, resolved)
        scores = metric_of(plain_bench, plain_bench.plan(first.bits, {"method": method}))
        loss = fp32 - scores.metrics[primary]
        points.append((first.objective, loss if HIGHER_IS_BETTER[primary] else -loss))
        if b not in budgets:
            continue
        rows.append(
            Row(
                f"mixed {method} @ avg {b}, first solve, FP32-input fit",
                avg_bits(bench, first.bits),
                scores,
                first.objective,
                bits=first.bits,
            )
        )
        if bench.spec.calibration == "fp32":
            continue
        solution, rounds, check = bench.choose_plan(cost, resolved, uniform_bits)
        kept = " (uniform kept)" if check and check.kept == "uniform" else ""
        fit = "" if bench.calibration == "in-network" else ", FP32-input fit chosen"
        rows.append(
            Row(
                f"mixed {method} @ avg {b}{kept}{fit}"
                + (f", {text}" if (text := rounds_text(rounds)) else ""),
                avg_bits(bench, solution.bits),
                metric_of(bench, bench.plan(solution.bits, {"method": method})),
                solution.objective,
                budget=b,
                bits=solution.bits,
                fit=bench.calibration,
            )
        )
    rho = spearmanr([p for p, _ in points], [m for _, m in points]).statistic if sweep else None
    return rows, seconds, rho


def paired_difference(a: np.ndarray, b: np.ndarray) -> str:
    """Mean of `a - b` (0/1 per image) in points with its paired bootstrap 95 % interval: both
    sides are resampled on the same images, so how hard each image is cancels out of the
    difference (`allocator.data.compare`)."""
    return compare.paired_difference("top1", a, b, resamples=BOOTSTRAP_RESAMPLES).text()


def paired_perplexity(a: np.ndarray, b: np.ndarray) -> str:
    """Perplexity from window losses `a` minus that from `b`, with its paired bootstrap 95 %
    interval: both sides are resampled on the same windows, as `paired_difference` does."""
    return compare.paired_difference("perplexity", a, b, resamples=BOOTSTRAP_RESAMPLES).text()


def paired_table(rows: list[Row]) -> str:
    """Each mixed row minus the uniform row of the same quantizer at the same size (between two
    integer widths: the widest uniform plan that fits, which is what the budget buys without
    an allocation), image by image (a causal LM: window by window, in perplexity)."""
    by_label = {row.label: row for row in rows}
    lm = rows[0].scores.window_nll is not None
    lines = (
        ["| mixed | uniform | perplexity difference [95 % interval] |", "|---|---|---|"]
        if lm
        else [
            "| mixed | uniform | top1 difference [95 % interval] "
            "| agreement difference [95 % interval] |",
            "|---|---|---|---|",
        ]
    )
    for row in rows:
        if row.budget is None:
            continue
        uniform = by_label.get(uniform_label(math.floor(row.budget), row.fit))
        if uniform is None:
            continue
        mixed, base = row.scores, uniform.scores
        cells = (
            paired_perplexity(mixed.window_nll, base.window_nll)
            if lm
            else f"{paired_difference(mixed.correct, base.correct)} "
            f"| {paired_difference(mixed.agrees, base.agrees)}"
        )
        lines.append(f"| {row.label} | {uniform.label} | {cells} |")
    return "\n".join(lines)


def rules_table(bench: Workbench) -> str:
    """Each width's rule set and the held-out divergence from FP32 of every set tried."""
    if bench.rules is None or not bench.rules.divergence:
        return "(no held-out samples: per-layer rules everywhere)"
    names = list(next(iter(bench.rules.divergence.values())))
    lines = [
        "| bits | " + " | ".join(f"{n} divergence" for n in names) + " | chosen |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for b, measured in sorted(bench.rules.divergence.items()):
        cells = " | ".join(f"{measured[n]:.4g}" for n in names)
        lines.append(f"| {b} | {cells} | {bench.rules.chosen[b]} |")
    return "\n".join(lines)


def depthwise_table(bench: Workbench, rows: list[Row]) -> str | None:
    """How many depthwise layers each mixed plan puts at each width, and the average width of
    depthwise and other layers: they hold few weights per channel, so low widths hurt them most
    and cost little storage to avoid. None for a model without depthwise layers."""
    modules = dict(bench.model.module.named_modules())
    depthwise = {
        layer.name
        for layer in bench.table
        if isinstance(conv := modules[layer.name], nn.Conv2d)
        and conv.groups > 1
        and conv.groups == conv.in_channels
    }
    if not depthwise:
        return None
    params = {layer.name: layer.params for layer in bench.table}
    widths = sorted(bench.spec.bits)

    def average(bits: dict[str, int], names: set[str]) -> float:
        return sum(params[n] * bits[n] for n in names) / sum(params[n] for n in names)

    others = set(params) - depthwise
    lines = [
        "| plan | " + " | ".join(f"{b}-bit" for b in widths) + " | depthwise avg bits "
        "| other layers avg bits |",
        "|---|" + "---|" * (len(widths) + 2),
    ]
    for row in rows:
        if row.bits is None:
            continue
        counts = " | ".join(str(sum(row.bits[n] == b for n in depthwise)) for b in widths)
        lines.append(
            f"| {row.label} | {counts} | {average(row.bits, depthwise):.2f} "
            f"| {average(row.bits, others):.2f} |"
        )
    share = sum(params[n] for n in depthwise) / bench.table.total_params
    return (
        f"Depthwise layers ({len(depthwise)} of {len(params)}, {share:.1%} of the weights) per "
        f"width in each mixed plan:\n\n" + "\n".join(lines)
    )


def clip_table(bench: Workbench) -> str:
    """How often each clipping and rounding rule is used, by width, once the width's rule set
    is chosen (within a set, the least output error on calibration data wins per layer)."""
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


def run_model(name: str, model: BenchModel, methods: list[str], budgets: list[float]) -> str:
    started = time.perf_counter()
    bench = prepare(model.spec)
    prepared = time.perf_counter()
    primary = bench.evalset.primary_metric
    fp32 = score(bench)
    rows = [Row("FP32", 32.0, fp32), *uniform_rows(bench)]
    uniform_done = time.perf_counter()
    method_lines = [
        "| method | cost table seconds | predicted-vs-measured Spearman |",
        "|---|---|---|",
    ]
    for method in methods:
        mixed, seconds, rho = mixed_rows(bench, method, budgets, fp32.metrics[primary], sweep=True)
        rows.extend(mixed)
        method_lines.append(f"| {method} | {seconds:.1f} | {rho:.3f} |")
    metrics = model.metrics or (primary,)
    out = [
        f"### {name} ({model.spec.model.replace(f'{ROOT}/', '')}, {primary} on {bench.evalset.size} eval samples, "
        f"{len(bench.table)} layers)",
        "",
        *([model.note, ""] if model.note else []),
        "| configuration | avg weight bits | "
        + " | ".join(COLUMNS.get(m, m) for m in metrics)
        + " | predicted cost |",
        "|---|---|" + "---|" * len(metrics) + "---|",
    ]
    for row in rows:
        predicted = "" if row.predicted is None else f"{row.predicted:.4g}"
        cells = " | ".join(
            f"{row.scores.metrics[m]:.4f}" if m == "kl" else f"{row.scores.metrics[m]:.2f}"
            for m in metrics
        )
        out.append(f"| {row.label} | {row.avg_bits:.2f} | {cells} | {predicted} |")
    if model.paired:
        lm = bench.evalset.tokens is not None
        same = (
            f"in perplexity on the same {bench.evalset.size} windows of "
            f"{bench.evalset.tokens.shape[1]} tokens (negative: mixed is better)"
            if lm
            else f"in points on the same {bench.evalset.size} images"
        )
        out += [
            "",
            f"Mixed minus uniform at the same size and quantizer, {same} "
            f"(paired bootstrap, {BOOTSTRAP_RESAMPLES:,} resamples):",
            "",
            paired_table(rows),
        ]
    out += [
        "",
        *method_lines,
        "",
        *(
            [f"Mixed plans fitted {bench.fit_check.chose}, {bench.fit_check.text()}.", ""]
            if bench.fit_check is not None
            else []
        ),
        "Rule set per width, by held-out divergence from FP32 (allocator/weight_rules.py):",
        "",
        rules_table(bench),
        "",
        "Clipping and rounding per layer within the chosen set:",
        "",
        clip_table(bench),
        *(["", depthwise] if (depthwise := depthwise_table(bench, rows)) else []),
        "",
        f"_prepare (load, layer table, statistics, rule sets) {prepared - started:.0f} s, "
        f"FP32 and uniform rows {uniform_done - prepared:.0f} s, "
        f"mixed rows {time.perf_counter() - uniform_done:.0f} s; "
        f"{time.perf_counter() - started:.0f} s in all_",
        "",
    ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet20,resnet56,minilm")
    parser.add_argument(
        "--methods", default=None, help="comma-separated; default: each model's own list"
    )
    parser.add_argument("--budgets", default="4,3,2.5")
    parser.add_argument("--eval-samples", type=int, default=None)
    parser.add_argument("--act", action="store_true", help="activation quantization tables")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    models = model_specs(args.eval_samples)
    names = args.models.split(",")
    budgets = [float(b) for b in args.budgets.split(",")]
    out = args.out or str(ROOT / "bench" / "out" / ("act_quality.md" if args.act else "quality.md"))
    if args.act and "digits" in names and not (DIGITS / "vit.safetensors").exists():
        print(f"training the digits ViT first: {train_digits(DIGITS):.2f} % test top-1")
    if "tinylm" in names and not (TINY_LM / "model").exists():
        print(f"training the tiny LM first: dev perplexity {train_tiny_lm(TINY_LM):.2f}")
    if "effnetlite1" in names:
        register_example_source()
        split_imagenet(IMAGENET_SPLIT)
    sections = []
    for name in names:
        model = models[name]
        if args.act:
            section = act_section(name, model.spec, "lrp+fisher")
        else:
            methods = args.methods.split(",") if args.methods else list(model.methods)
            section = run_model(name, model, methods, budgets)
        print(section, flush=True)
        sections.append(section)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("\n".join(sections))


if __name__ == "__main__":
    main()
