"""What each sensitivity method costs next to one training step, and what the integer program costs.

Why: `lrp+fisher`, the default method, is promised to cost at most 2x one forward+backward over
the calibration set; whoever picks `hessian` or `measured` instead needs their cost in the same
unit, and whoever sizes a worker needs the peak memory. Wall-clock seconds alone mean little on a
shared machine, so every method is also a ratio to an ordinary training step (forward,
cross-entropy on the model's own argmax, `loss.backward()` into the weight gradients) timed in
the same process. The integer program, re-run for every budget, is `bench/solver_speed.py`'s
section, appended as is.

How it measures (random-init timm models, random-normal images):

- One torch thread (`--threads`) everywhere by default: on a shared machine two OpenMP threads
  wait on each other whenever one is descheduled, which made the same training step vary 4x
  between repeats on 2 cores (GPTQ ran 7x slower than on one thread); one thread repeats to a
  few percent. Pass `--threads 2` on a quiet machine.
- Every workload runs in a fresh process (this script re-invoked with `--job`), so that its peak
  RSS (`ru_maxrss`) is its own; "+MB" is that peak minus the peak of the process that ran only the
  baseline (both include the interpreter, torch, the model and the calibration batches).
- The baseline and the three gradient passes (`gradient_stats` with lrp, fisher, both) are timed
  in the baseline's process after a warm-up, interleaved for `--repeats` rounds; seconds are
  medians, a ratio is the median over rounds of (pass / baseline of that round). Their own fresh
  processes run the pass once, for its memory only.
- statistics, hessian and measured are too slow to repeat: each runs once, first in its process
  so the peak is its own, then one warmed-up baseline step right after it gives the ratio.
- The calibration set is 2 batches of 8 by default so that four models fit in ~15 minutes.
  Passes over the calibration set scale with its number of batches, so their ratios hold for
  more; Hutchinson (first batch only) and GPTQ (no model pass) do not, so theirs shrink with more.
  Memory depends on the batch size, not on the number of batches.
- Extrapolated, and labelled so in the table: `quant_choices` (GPTQ dominates it) is timed on one
  layer per distinct (weight shape, widths), whose cost is all it depends on, and scaled by how
  many layers share it; `measured` is timed on a few (layer, width) steps, each one calibration
  forward, and scaled to every free layer x width plus the reference pass. Hutchinson stops at
  `--hessian-probes`.

Run: `.venv/bin/python bench/speed.py` (the four models, ~15 min on 2 cores) or `--quick` (a tiny
ViT, tiny solver tables); tables are printed and written to bench/out/speed.md (`--out`).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from allocator import costs  # noqa: E402
from allocator.costs import QuantChoice  # noqa: E402
from allocator.layers import Layer, LayerTable, build_layer_table  # noqa: E402
from allocator.sensitivity.gradients import gradient_stats  # noqa: E402
from allocator.sensitivity.hessian import hessian_traces  # noqa: E402
from allocator.sensitivity.measured import measured_costs  # noqa: E402
from allocator.zoo import load_model  # noqa: E402
from allocator.zoo.base import LoadedModel  # noqa: E402
from bench import solver_speed  # noqa: E402

MODELS = (
    "deit_tiny_patch16_224",
    "vit_small_patch16_224",
    "swin_tiny_patch4_window7_224",
    "resnet50",
)
QUICK_MODEL = "deit_tiny_patch16_224?img_size=32&patch_size=8&depth=2&embed_dim=32&num_heads=2"
OUT = ROOT / "bench" / "out" / "speed.md"
WIDTHS = solver_speed.BITS
"""(2, 3, 4, 5, 6, 8), also the pipeline's default (not imported from it: it pulls in scipy)."""
BASELINE = "forward+backward"
GRADIENT_PASSES = {"lrp": (False, True), "fisher": (True, False), "lrp+fisher": (True, True)}
"""Name -> (fisher, lrp) flags of `gradient_stats`."""
SINGLE_RUNS = ("statistics", "hessian", "measured")
WORKLOADS = (BASELINE, *GRADIENT_PASSES, *SINGLE_RUNS)
HESSIAN_DEFAULTS = inspect.signature(hessian_traces).parameters
TARGET_RATIO = 2.0
"""LRP + Fisher together at most this many training steps."""


@dataclass(frozen=True)
class Config:
    """Everything a worker process needs to repeat the parent's setup."""

    batches: int
    batch_size: int
    image_size: int
    repeats: int
    threads: int
    hessian_probes: int
    measured_steps: int

    def argv(self) -> list[str]:
        return [f"--{key.replace('_', '-')}={value}" for key, value in asdict(self).items()]


@dataclass
class Bench:
    """A loaded model with its calibration batches and layer table."""

    model: LoadedModel
    batches: list[torch.Tensor]
    table: LayerTable

    @classmethod
    def load(cls, ref: str, config: Config) -> Bench:
        torch.manual_seed(0)
        model = load_model(ref)
        generator = torch.Generator().manual_seed(0)
        shape = (config.batch_size, 3, config.image_size, config.image_size)
        batches = [torch.randn(shape, generator=generator) for _ in range(config.batches)]
        return cls(model, batches, build_layer_table(model, batches[0][:1]))

    def training_step(self, batches: Sequence[torch.Tensor] | None = None) -> None:
        """The baseline: what one optimizer step over the calibration batches computes."""
        for inputs in self.batches if batches is None else batches:
            out = self.model(inputs)
            F.cross_entropy(out, out.detach().argmax(-1)).backward()
        self.model.module.zero_grad(set_to_none=True)

    def gradient_pass(self, name: str, batches: Sequence[torch.Tensor] | None = None) -> None:
        fisher, lrp = GRADIENT_PASSES[name]
        gradient_stats(
            self.model,
            self.batches if batches is None else batches,
            self.table,
            fisher=fisher,
            lrp=lrp,
        )

    def baseline_after(self) -> float:
        """One training step after a one-batch warm-up: the ratio's unit for single runs."""
        self.training_step(self.batches[:1])
        return timed(self.training_step)


@dataclass(frozen=True)
class Row:
    """One workload of one model, as the table shows it."""

    workload: str
    seconds: float
    baseline_seconds: float
    ratio: float
    notes: str
    peak_mb: float = 0.0


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def peak_rss_mb() -> float:
    """This process's peak resident set so far (Linux reports kilobytes)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _baseline_job(bench: Bench, config: Config) -> tuple[float, list[Row]]:
    bench.training_step()
    peak = peak_rss_mb()
    for name in GRADIENT_PASSES:
        bench.gradient_pass(name, bench.batches[:1])
    seconds: dict[str, list[float]] = {name: [] for name in (BASELINE, *GRADIENT_PASSES)}
    for _ in range(config.repeats):
        seconds[BASELINE].append(timed(bench.training_step))
        for name in GRADIENT_PASSES:
            seconds[name].append(timed(lambda name=name: bench.gradient_pass(name)))
    baseline = statistics.median(seconds[BASELINE])
    rows = [Row(BASELINE, baseline, baseline, 1.0, f"median of {config.repeats} after a warm-up")]
    for name in GRADIENT_PASSES:
        ratios = [t / b for t, b in zip(seconds[name], seconds[BASELINE], strict=True)]
        ratio = statistics.median(ratios)
        verdict = "PASS" if ratio <= TARGET_RATIO else "FAIL"
        note = f"target <= {TARGET_RATIO:g}x: {verdict}" if name == "lrp+fisher" else ""
        rows.append(Row(name, statistics.median(seconds[name]), baseline, ratio, note))
    return peak, rows


def _gradient_memory_job(name: str) -> Callable[[Bench, Config], tuple[float, list[Row]]]:
    def job(bench: Bench, _config: Config) -> tuple[float, list[Row]]:
        bench.gradient_pass(name)
        return peak_rss_mb(), []

    return job


def _held_bytes(choice: QuantChoice) -> int:
    """Bytes one (layer, width) choice keeps alive for the rest of a job."""
    tensors = (
        choice.quantized.codes,
        choice.quantized.scale,
        choice.weight_error,
        choice.channel_error,
        choice.bias_correction,
    )
    return sum(t.nbytes for t in tensors if t is not None)


def _statistics_job(bench: Bench, _config: Config) -> tuple[float, list[Row]]:
    model, table = bench.model, bench.table
    started = time.perf_counter()
    stats = costs.input_stats(model, bench.batches, table)
    inputs_seconds = time.perf_counter() - started
    modules = dict(model.module.named_modules())
    alike: dict[tuple, list[Layer]] = {}
    for layer in table:
        widths = frozenset(WIDTHS) | ({layer.pinned_bits} if layer.pinned_bits else set())
        alike.setdefault((tuple(modules[layer.name].weight.shape), widths), []).append(layer)
    timed_layers = LayerTable(tuple(group[0] for group in alike.values()))
    stamps = [time.perf_counter()]
    choices = costs.quant_choices(
        model,
        timed_layers,
        stats,
        WIDTHS,
        on_layer=lambda _i: stamps.append(time.perf_counter()),
    )
    peak = peak_rss_mb()
    counts = [len(group) for group in alike.values()]
    choices_seconds = sum(
        (end - start) * count for (start, end), count in zip(pairwise(stamps), counts, strict=True)
    )
    count_of = {layer.name: n for layer, n in zip(timed_layers, counts, strict=True)}
    held = sum(_held_bytes(choice) * count_of[name] for (name, _b), choice in choices.items())
    seconds = inputs_seconds + choices_seconds
    baseline = bench.baseline_after()
    note = (
        f"extrapolated: input_stats {inputs_seconds:.3g} s (all layers) + quant_choices "
        f"{choices_seconds:.3g} s, timed on {len(timed_layers)} of {len(table)} layers (one per "
        "weight shape, times the layers sharing it); the run held those layers' choices, all "
        f"{len(table)} hold {held / 2**20:.0f} MB"
    )
    return peak, [Row("statistics", seconds, baseline, seconds / baseline, note)]


def _hessian_job(bench: Bench, config: Config) -> tuple[float, list[Row]]:
    stamps: list[float] = []
    traces = hessian_traces(
        bench.model,
        bench.batches,
        bench.table,
        max_probes=config.hessian_probes,
        on_probe=lambda _i: stamps.append(time.perf_counter()),
    )
    peak = peak_rss_mb()
    per_probe = (stamps[-1] - stamps[0]) / (len(stamps) - 1) if len(stamps) > 1 else traces.seconds
    baseline = bench.baseline_after()
    note = (
        f"{traces.probes} probes (cap {config.hessian_probes}), "
        f"{'converged' if traces.converged else 'not converged'}; {per_probe:.3g} s/probe; "
        "on the first batch only"
    )
    return peak, [Row("hessian", traces.seconds, baseline, traces.seconds / baseline, note)]


def _measured_job(bench: Bench, config: Config) -> tuple[float, list[Row]]:
    free = [layer for layer in bench.table if layer.pinned_bits is None]
    step = max(1, len(free) // config.measured_steps)
    timed_layers = LayerTable(tuple(free[::step][: config.measured_steps]))
    widths = (costs.REFERENCE_BITS,)
    # Round-to-nearest choices are enough to time a step: the forward is the same for any weight.
    stats = costs.input_stats(bench.model, bench.batches, timed_layers)
    choices = costs.quant_choices(
        bench.model, timed_layers, stats, widths, clips=("max",), roundings=("nearest",)
    )
    stamps: list[float] = []
    measured_costs(
        bench.model,
        bench.batches,
        timed_layers,
        widths,
        choices,
        on_step=lambda _i, _n: stamps.append(time.perf_counter()),
    )
    peak = peak_rss_mb()
    per_step = (stamps[-1] - stamps[0]) / (len(stamps) - 1)
    steps = len(free) * len(WIDTHS)
    seconds = per_step * (steps + 1)
    baseline = bench.baseline_after()
    note = (
        f"extrapolated: {per_step:.3g} s per (layer, width), timed on {len(stamps)} layers at "
        f"{costs.REFERENCE_BITS} bits, x ({len(free)} free layers x {len(WIDTHS)} widths "
        "+ 1 reference pass)"
    )
    return peak, [Row("measured", seconds, baseline, seconds / baseline, note)]


JOBS: dict[str, Callable[[Bench, Config], tuple[float, list[Row]]]] = {
    BASELINE: _baseline_job,
    **{name: _gradient_memory_job(name) for name in GRADIENT_PASSES},
    "statistics": _statistics_job,
    "hessian": _hessian_job,
    "measured": _measured_job,
}


def run_worker(job: str, name: str, config: Config) -> dict[str, Any]:
    """Run one workload in this (fresh) process: its peak RSS and the rows it timed."""
    torch.set_num_threads(config.threads)
    bench = Bench.load(f"timm:{name}", config)
    peak, rows = JOBS[job](bench, config)
    free = sum(layer.pinned_bits is None for layer in bench.table)
    return {
        "peak_mb": peak,
        "rows": [asdict(row) for row in rows],
        "layers": f"{len(bench.table)} weight layers ({free} free), "
        f"{bench.table.total_params / 1e6:.1f} M weights",
    }


def spawn_worker(job: str, name: str, config: Config) -> dict[str, Any]:
    """`run_worker` in a fresh interpreter; its last line of stdout is the JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--job", job, "--models", name]
    done = subprocess.run([*command, *config.argv()], stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def measure_model(name: str, config: Config) -> tuple[str, list[Row]]:
    """Every workload of one timm model, each in its own process: (layer summary, rows)."""
    results = {}
    for job in WORKLOADS:
        started = time.perf_counter()
        results[job] = spawn_worker(job, name, config)
        print(f"{name} {job}: {time.perf_counter() - started:.0f} s", file=sys.stderr, flush=True)
    timed_rows = [Row(**row) for result in results.values() for row in result["rows"]]
    rows = [
        Row(**{**asdict(row), "peak_mb": results[row.workload]["peak_mb"]}) for row in timed_rows
    ]
    return results[BASELINE]["layers"], rows


def markdown(name: str, layers: str, rows: Sequence[Row]) -> str:
    """One model's table; "+MB" is each peak minus the baseline process's."""
    baseline_peak = next(row.peak_mb for row in rows if row.workload == BASELINE)
    lines = [
        f"### timm:{name}: {layers}",
        "",
        "| workload | seconds | baseline s | ratio | peak RSS MB | +MB over baseline | notes |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row.workload} | {row.seconds:.3g} | {row.baseline_seconds:.3g} "
            f"| {row.ratio:.2f} | {row.peak_mb:.0f} | {row.peak_mb - baseline_peak:+.0f} "
            f"| {row.notes} |"
        )
    return "\n".join(lines) + "\n"


def solver_section(quick: bool) -> str:
    """`bench/solver_speed.py`'s tables: 50, 1,000 and 10,000 layers x 6 widths (tiny if quick)."""
    if quick:
        rows = solver_speed.measure(sizes=(10,), solvers=("highs",), rel_gaps=(1e-3,))
        resolves = solver_speed.measure_resolves(layers=10, count=3)
    else:
        rows = solver_speed.measure()
        resolves = solver_speed.measure_resolves()
    checks = "\n".join(solver_speed.targets(rows, resolves))
    return f"{solver_speed.markdown(rows, resolves)}\n{checks}\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", help=f"comma-separated timm names (default {','.join(MODELS)})")
    parser.add_argument("--batches", type=int, help="calibration batches (default 2)")
    parser.add_argument("--batch-size", type=int, help="images per batch (default 8)")
    parser.add_argument("--image-size", type=int, help="input height and width (default 224)")
    parser.add_argument("--repeats", type=int, help="timed rounds after the warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads, everywhere")
    parser.add_argument("--hessian-probes", type=int, help="Hutchinson probe cap (default 8)")
    parser.add_argument(
        "--measured-steps", type=int, help="(layer, width) steps timed for measured (default 4)"
    )
    parser.add_argument("--quick", action="store_true", help="a tiny ViT and tiny solver tables")
    parser.add_argument("--out", type=Path, default=OUT, help=f"markdown file (default {OUT})")
    parser.add_argument("--job", choices=WORKLOADS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    preset = (
        {"models": QUICK_MODEL, "batches": 2, "batch_size": 2, "image_size": 32, "repeats": 1}
        | {"hessian_probes": 2, "measured_steps": 2}
        if args.quick
        else {"models": ",".join(MODELS), "batches": 2, "batch_size": 8, "image_size": 224}
        | {"repeats": 3, "hessian_probes": 8, "measured_steps": 4}
    )
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.measured_steps < 2 or args.repeats < 1 or args.hessian_probes < 1:
        parser.error("--measured-steps must be at least 2, --repeats and --hessian-probes 1")
    return args


def main(argv: Sequence[str] | None = None) -> str:
    """Run the bench (or, with `--job`, one worker); returns the report it printed."""
    args = parse_args(argv)
    config = Config(
        args.batches,
        args.batch_size,
        args.image_size,
        args.repeats,
        args.threads,
        args.hessian_probes,
        args.measured_steps,
    )
    if args.job is not None:
        result = json.dumps(run_worker(args.job, args.models, config))
        print(result)
        return result
    started = time.perf_counter()
    parts: list[str] = []

    def emit(text: str) -> None:
        print(text, flush=True)
        parts.append(text)

    emit("## Sensitivity methods\n")
    emit(
        f"torch {torch.__version__}, torch.set_num_threads({config.threads}) on "
        f"{os.cpu_count()} CPU cores, 1-minute load average {os.getloadavg()[0]:.1f} at the start. "
        f"Calibration: {config.batches} batches x {config.batch_size} random-normal images at "
        f"{config.image_size}x{config.image_size}; random-init weights. Baseline = one "
        "forward+backward (weight gradients) over all batches; ratio = seconds / baseline. "
        f"Hutchinson capped at {config.hessian_probes} probes (it stops once converged, after "
        f"at least {HESSIAN_DEFAULTS['min_probes'].default} probes, tolerance "
        f"{HESSIAN_DEFAULTS['tol'].default:g}; allocator.sensitivity allows 100).\n"
    )
    for name in args.models.split(","):
        emit(markdown(name, *measure_model(name, config)))
    emit(f"## Integer program (bench/solver_speed.py)\n\n{solver_section(args.quick)}")
    emit(
        f"_{time.perf_counter() - started:.0f} s in all; 1-minute load average "
        f"{os.getloadavg()[0]:.1f} at the end_\n"
    )
    report = "\n".join(parts)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(f"written to {args.out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    main()
