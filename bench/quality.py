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
import functools
import importlib
import math
import os
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

from train_digits_vit import MODEL_REF as DIGITS_REF  # noqa: E402
from train_digits_vit import train as train_digits  # noqa: E402
from train_tiny_lm import OUT as TINY_LM  # noqa: E402
from train_tiny_lm import train as train_tiny_lm  # noqa: E402

from allocator.activation_bench import (  # noqa: E402
    ACT_QUANTIZERS,
    CANDIDATES,
    PER_SITE,
    quantizers,
)
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
from allocator.job import ACT_BITS, FixedActs, JointActs  # noqa: E402
from allocator.job_metrics import rounds_text  # noqa: E402
from allocator.pipeline import JobSpec, Workbench, prepare  # noqa: E402
from allocator.plan import BitPlan  # noqa: E402
from allocator.solve import Solution, solve, uniform_bits_for  # noqa: E402
from allocator.zoo import register_source  # noqa: E402

DATA = Path(os.environ.get("BITPLAN_SHARED_DATA", ROOT.parent / "shared" / "data"))
METHODS = ("lrp", "fisher", "hessian", "measured", "lrp+fisher")
UNIFORM_BITS = (8, 6, 5, 4, 3, 2)
IN_NETWORK_UNIFORM_BITS = (4, 3, 2)
"""Uniform widths also fitted in the network (a fit is a pass per layer): the ones the budgets
compare with, and 2 bits, which only in-network fitting keeps usable."""
SWEEP = (2.25, 2.5, 3.0, 3.5, 4.0, 5.0)
UNIFORM_WA = ((8, 8), (6, 6), (4, 8), (4, 4))
MATCHED = ("W4A8", "W4A4")
DIGITS = ROOT / "bench" / "out" / "digits"
IMAGENET = DATA / "imagenet-sample" / "dev500_224.npz"
IMAGENET_SPLIT = ROOT / "bench" / "out" / "imagenet-split"
IMAGENET_CALIB_IMAGES = 256
SPLIT_SEED = 0
EXAMPLE_SOURCE = ROOT / "examples" / "bitplan-efficientnet-lite"
BOOTSTRAP_RESAMPLES = 10_000
COLUMNS = {
    "top1": "top1",
    "perplexity": "perplexity",
    "agreement": "agreement with FP32",
    "kl": "KL to FP32",
}
"""Column headings of the metrics a model's table may show."""


@dataclass(frozen=True)
class BenchModel:
    """A model of this bench: its job, the methods it runs by default, the metrics its table
    shows (the primary one when empty), a line saying which data it is measured on, and whether
    mixed is compared with uniform image by image (for evaluation sets too small to trust a
    difference of two top-1 figures)."""

    spec: JobSpec
    methods: tuple[str, ...] = METHODS
    metrics: tuple[str, ...] = ()
    note: str = ""
    paired: bool = False


def model_specs(eval_samples: int | None) -> dict[str, BenchModel]:
    cifar = DATA / "cifar10"
    stsb = DATA / "stsb"
    common = {"eval_samples": eval_samples}
    specs = {
        "digits": JobSpec(
            model=DIGITS_REF,
            weights=str(DIGITS / "vit.safetensors"),
            calib=str(DIGITS / "train.npz"),
            eval=str(DIGITS / "test.npz"),
            calib_samples=256,
            **common,
        ),
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
    models = {name: BenchModel(spec) for name, spec in specs.items()}
    for name in ("resnet20", "resnet56"):
        models[name] = BenchModel(specs[name], metrics=("top1", "agreement", "kl"), paired=True)
    models["effnetlite1"] = BenchModel(
        JobSpec(
            model="effnetlite:lite1",
            calib=str(IMAGENET_SPLIT / "calib.npz"),
            eval=str(IMAGENET_SPLIT / "eval.npz"),
            calib_samples=IMAGENET_CALIB_IMAGES // 2,
            batch_size=32,
            **common,
        ),
        # `measured` costs one calibration pass per layer and width: hours on this model.
        methods=tuple(m for m in METHODS if m != "measured"),
        metrics=("top1", "agreement", "kl"),
        paired=True,
        note=(
            f"dev500_224.npz split by a permutation with seed {SPLIT_SEED}: its first "
            f"{IMAGENET_CALIB_IMAGES} images calibrate ({IMAGENET_CALIB_IMAGES // 2} for the "
            f"statistics, the others held out for the rule and plan checks), the other "
            f"{500 - IMAGENET_CALIB_IMAGES} evaluate (one image is "
            f"{100 / (500 - IMAGENET_CALIB_IMAGES):.2f} top-1 points)."
        ),
    )
    models["tinylm"] = BenchModel(
        JobSpec(
            model=f"hf:{TINY_LM / 'model'}",
            calib=str(TINY_LM / "train.txt"),
            eval=str(TINY_LM / "dev.txt"),
            **common,
        ),
        # Every row scores vocabulary-wide logits at every position: the cheaper methods keep
        # the whole model within minutes.
        methods=("lrp", "fisher", "lrp+fisher"),
        metrics=("perplexity", "agreement", "kl"),
        paired=True,
        note=(
            "Llama-style causal LM trained by bench/train_tiny_lm.py on the STS-B training "
            "sentences; calibrated on windows of those sentences (train.txt), evaluated on the "
            "dev sentences (dev.txt), cut into consecutive windows of 128 tokens. Perplexity: "
            "lower is better; agreement and KL with FP32 per predicted position."
        ),
    )
    return models


def split_imagenet(folder: Path) -> None:
    """The shared ImageNet sample as calibration and evaluation files a job can name: one image
    per class leaves no spare images, so the two sets are disjoint halves of a fixed shuffle."""
    with np.load(IMAGENET) as data:
        images, labels = data["images"], data["labels"]
    order = np.random.default_rng(SPLIT_SEED).permutation(len(images))
    folder.mkdir(parents=True, exist_ok=True)
    for name, picked in (
        ("calib", order[:IMAGENET_CALIB_IMAGES]),
        ("eval", order[IMAGENET_CALIB_IMAGES:]),
    ):
        np.savez(folder / f"{name}.npz", images=images[picked], labels=labels[picked])


def register_example_source() -> None:
    """The `effnetlite:` source of examples/, registered as its entry point would register it
    once installed: the bench extra brings its dependencies, not the example itself."""
    sys.path.insert(0, str(EXAMPLE_SOURCE))
    example = importlib.import_module("bitplan_efficientnet_lite")
    register_source(example.PREFIX)(example.load)


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


def avg_bits(bench: Workbench, bits: dict[str, int]) -> float:
    return sum(layer.params * bits[layer.name] for layer in bench.table) / bench.table.total_params


def uniform_label(bits: int) -> str:
    return f"uniform W{bits} bitplan quantizer"


def fp32_inputs(bench: Workbench) -> Workbench:
    """The same workbench fitting every plan on FP32 inputs (the statistics phase's choices),
    as jobs did before in-network calibration: the bench shows both."""
    return replace(bench, spec=replace(bench.spec, calibration="fp32"))


def uniform_rows(bench: Workbench) -> list[Row]:
    """Plain round-to-nearest (max clip, no bias correction) and bitplan's quantizer fitted on
    FP32 inputs and in the network, per width."""
    rows = []
    plain_bench = fp32_inputs(bench)
    for b in UNIFORM_BITS:
        widths = {layer.name: layer.pinned_bits or b for layer in bench.table}
        plain = BitPlan.from_bits(widths, clip="max")
        size = avg_bits(bench, widths)
        rows += [
            Row(f"uniform W{b} max-clip", size, metric_of(bench, plain, plain=True)),
            Row(
                f"{uniform_label(b)}, FP32-input fit",
                size,
                metric_of(plain_bench, plain_bench.uniform_plan(b)),
            ),
        ]
        if bench.spec.calibration == "in-network" and b in IN_NETWORK_UNIFORM_BITS:
            rows.append(Row(uniform_label(b), size, metric_of(bench, bench.uniform_plan(b))))
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
    plain_bench = fp32_inputs(bench)
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
        if bench.spec.calibration != "in-network":
            continue
        solution, rounds, check = bench.choose_plan(cost, resolved, uniform_bits)
        kept = " (uniform kept)" if check and check.kept == "uniform" else ""
        rows.append(
            Row(
                f"mixed {method} @ avg {b}{kept}"
                + (f", {text}" if (text := rounds_text(rounds)) else ""),
                avg_bits(bench, solution.bits),
                metric_of(bench, bench.plan(solution.bits, {"method": method})),
                solution.objective,
                budget=b,
                bits=solution.bits,
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
    """Each mixed row minus the uniform row of the same size and quantizer, image by image (a
    causal LM: window by window, in perplexity)."""
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
        if row.budget is None or row.budget != int(row.budget):
            continue
        uniform = by_label.get(uniform_label(int(row.budget)))
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


def act_options() -> list[str]:
    """`auto`'s options for a role: per-site, then every candidate kind of any role."""
    return [PER_SITE, *sorted({k for kinds in CANDIDATES.values() for k in kinds})]


def act_section(name: str, spec: JobSpec, method: str) -> str:
    """Uniform WxAy per activation-quantizer preset, mixed weights at matched size and BOPs,
    and which quantizer `auto` picks per role."""
    started = time.perf_counter()
    # Weights fitted on FP32 inputs: this table compares activation quantizers, many plans each.
    spec = replace(spec, calibration="fp32")
    bench = prepare(spec, budget=parse_budget("match=W4A8"))
    acts = bench.activations
    primary = bench.evalset.primary_metric
    fp32 = bench.evaluate()[primary]
    presets = list(ACT_QUANTIZERS)
    lines = [
        f"### {name} activations ({spec.model}, {primary} on {bench.evalset.size} eval samples, "
        f"{len(acts.sites)} activation sites), FP32 {fp32:.2f}",
        "",
        "| weights / activations | " + " | ".join(presets) + " |",
        "|---|" + "---|" * len(presets),
    ]
    uniform_wa: dict[tuple[int, int, str], float] = {}
    for w, a in UNIFORM_WA:
        module = bench.quantize(bench.uniform_plan(w))
        for preset in presets:
            activations = quantizers(acts.assign(a, preset))
            uniform_wa[w, a, preset] = bench.evaluate(module, activations)[primary]
        cells = " | ".join(f"{uniform_wa[w, a, preset]:.2f}" for preset in presets)
        lines.append(f"| uniform W{w}A{a} | {cells} |")
    cost, _sens, _timings = bench.cost_table(method)
    errors = {key: choice.output_error for key, choice in bench.choices.items()}

    def checked(
        solution: Solution, table_cost: np.ndarray, match: str, preset: str, joint_table: bool
    ) -> tuple[float, dict[str, int], int | dict[str, int], str]:
        """What a job returns for `solution`: it or, when the held-out check prefers it, the
        uniform plan it matches; the metric, weight widths, site widths and a row label."""
        budget = parse_budget(f"match={match}")
        a = budget.match[1]
        resolved = budget.resolve(bench.table)
        uniform_w = uniform_bits_for(bench.table, bench.spec.bits, resolved, act_bits=a)
        widths_of = JointActs(ACT_BITS, baseline_bits=a) if joint_table else FixedActs(a)
        solution, check = bench.check_against_uniform(
            solution, table_cost, uniform_w, widths_of, preset
        )
        widths = bench.site_widths(solution, widths_of)
        module = bench.quantize(bench.plan(solution.bits, {}))
        metric = bench.evaluate(module, quantizers(acts.assign(widths, preset)))[primary]
        kept = check is not None and check.kept == "uniform"
        return metric, solution.bits, widths, " (uniform kept)" if kept else ""

    @functools.cache
    def joint(preset: str, match: str) -> tuple[float, dict[str, int], int | dict[str, int], str]:
        """The joint W/A plan at the size and BOPs of uniform `match` with `preset`'s
        quantizers, as a job returns it (see `checked`)."""
        budget = parse_budget(f"match={match}")
        joint_acts = JointActs(ACT_BITS, baseline_bits=budget.match[1])
        joint_cost = acts.joint_cost(cost, bench.spec.bits, errors, joint_acts, preset)
        resolved = budget.resolve(bench.table)
        solution = solve(bench.table, bench.spec.bits, joint_cost, resolved, acts=joint_acts)
        return checked(solution, joint_cost, match, preset, joint_table=True)

    lines += [
        "",
        f"| budget ({method}, auto quantizers) | uniform | mixed weights, fixed A "
        "| joint W/A | joint avg weight bits | joint activation widths (sites) |",
        "|---|---|---|---|---|---|",
    ]
    for match in MATCHED:
        budget = parse_budget(f"match={match}")
        act_bits = budget.match[1]
        resolved = budget.resolve(bench.table)
        fixed_acts = quantizers(acts.assign(act_bits, "auto"))
        uniform_w = uniform_bits_for(bench.table, bench.spec.bits, resolved, act_bits=act_bits)
        uniform = bench.evaluate(bench.quantize(bench.uniform_plan(uniform_w)), fixed_acts)
        fixed = solve(bench.table, bench.spec.bits, cost, resolved, acts=FixedActs(act_bits))
        mixed, _bits, _widths, mixed_kept = checked(fixed, cost, match, "auto", joint_table=False)
        joint_metric, joint_bits, widths, joint_kept = joint("auto", match)
        counts = ", ".join(
            f"A{a}: {list(widths.values()).count(a)}" for a in sorted(set(widths.values()))
        )
        lines.append(
            f"| match={match} | {uniform[primary]:.2f} (W{uniform_w}A{act_bits}) | "
            f"{mixed:.2f}{mixed_kept} | {joint_metric:.2f}{joint_kept} | "
            f"{avg_bits(bench, joint_bits):.2f} | {counts} |"
        )
    lines += [
        "",
        f"Joint W/A at the size and BOPs of uniform W4A4, each preset's quantizers on both sides "
        f"({method}):",
        "",
        "| quantizers | uniform W4A4 | joint W/A | gain |",
        "|---|---|---|---|",
    ]
    for preset in presets:
        metric, _bits, _widths, kept = joint(preset, "W4A4")
        base = uniform_wa[4, 4, preset]
        gain = metric - base if HIGHER_IS_BETTER[primary] else base - metric
        lines.append(f"| {preset} | {base:.2f} | {metric:.2f}{kept} | {gain:+.2f} |")
    lines += [
        "",
        "`auto`, per width and role: held-out divergence from FP32 of each option (all sites at "
        "that width; roles in order, each measured with the earlier ones at their choice):",
        "",
        "| act bits | role | chosen | " + " | ".join(f"{k}" for k in act_options()) + " |",
        "|---|---|---|" + "---|" * len(act_options()),
    ]
    for b, rules in sorted(acts.rules_to_dict().items(), key=lambda item: -int(item[0])):
        for role, measured in rules["divergence"].items():
            cells = " | ".join(f"{measured[k]:.3g}" if k in measured else "" for k in act_options())
            lines.append(f"| {b} | {role} | {rules['chosen'][role]} | {cells} |")
    lines += [
        "",
        "Quantizer `auto` picks per role (sites):",
        "",
    ]
    kinds = act_options()[1:]
    lines += ["| act bits | role | " + " | ".join(kinds) + " |", "|---|---|" + "---|" * len(kinds)]
    for a in sorted({a for _, a in UNIFORM_WA}, reverse=True):
        chosen = acts.assign(a, "auto")
        for role in CANDIDATES:
            picked = [
                x.quantizer.kind for x in chosen if x.site.role == role and x.quantizer.bits == a
            ]
            if picked:
                lines.append(
                    f"| {a} | {role} | " + " | ".join(str(picked.count(k)) for k in kinds) + " |"
                )
    lines += ["", f"_{time.perf_counter() - started:.0f} s in all_", ""]
    return "\n".join(lines)


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
