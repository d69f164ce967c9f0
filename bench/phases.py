"""Where a job's time goes, in FP32 forward passes, and what the cache saves on a second run.

Why: seconds depend on the machine and on what else runs on it; a phase that costs twenty
forward passes over the calibration set does on any machine. For each model this runs one job
(`allocator.pipeline.run`, as `bitplan run` does) on an empty cache and prints every phase of
its `phases` record as seconds, model calls, samples, peak resident memory and a ratio to one
FP32 forward pass over the job's calibration samples, timed in the same process right before
(after one warm-up pass). Then it runs the same job again and the same model at another budget
on the cache the first one filled (`allocator.cache`), and prints their wall time as a ratio
to the first run's, with what each reused.

Models (`--models`, comma-separated):
- `resnet20`: the README's worked example (ResNet20, 256 CIFAR-10 calibration images, the
  10,000 test images, avg-bits=2.5; second budget avg-bits=3).
- `minilm`: all-MiniLM-L6-v2 on STS-B (256 calibration sentence pairs, the 1,500 dev pairs,
  avg-bits=4; second budget avg-bits=3).
- `effnetlite1`: EfficientNet-Lite1 (the example plugin) on the shared ImageNet sample split as in
  bench/quality.py (256 calibration, 244 evaluation images, avg-bits=4 with report widths;
  second budget avg-bits=3). Slow on 2 cores.
- `deit_s`: random-init `timm:deit_small_patch16_224` on the same images (avg-bits=4). Slow.

Run: `.venv/bin/python bench/phases.py` (resnet20 and minilm) or `--models ...`; tables are
printed and written to bench/out/phases.md (`--out`).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from quality_models import (  # noqa: E402
    DATA,
    IMAGENET_SPLIT,
    register_example_source,
    split_imagenet,
)

from allocator.cache import FolderCache  # noqa: E402
from allocator.data import calibration_batches, load_dataset  # noqa: E402
from allocator.job import JobSpec, Result  # noqa: E402
from allocator.pipeline import run  # noqa: E402
from allocator.zoo import load_model  # noqa: E402

CIFAR = DATA / "cifar10"
STSB = DATA / "stsb"


def specs() -> dict[str, tuple[JobSpec, str]]:
    """Each model's job and the second budget it is run at."""
    imagenet = {
        "calib": str(IMAGENET_SPLIT / "calib.npz"),
        "eval": str(IMAGENET_SPLIT / "eval.npz"),
        "batch_size": 32,
        "budget": "avg-bits=4",
    }
    return {
        "resnet20": (
            JobSpec(
                model="zoo:cifar_resnet20",
                weights=str(CIFAR / "resnet20-12fca82f.th"),
                calib=str(CIFAR / "calib_train_jpeg.npz"),
                eval=str(CIFAR / "test_jpeg.npz"),
                budget="avg-bits=2.5",
                method="lrp+fisher",
            ),
            "avg-bits=3",
        ),
        "minilm": (
            JobSpec(
                model="hf:minilm",
                calib=str(STSB / "sts-train.csv"),
                eval=str(STSB / "sts-dev.csv"),
                budget="avg-bits=4",
            ),
            "avg-bits=3",
        ),
        "effnetlite1": (JobSpec(model="effnetlite:lite1", **imagenet), "avg-bits=3"),
        "deit_s": (
            JobSpec(model="timm:deit_small_patch16_224", method="fisher", **imagenet),
            "avg-bits=3",
        ),
    }


def fp32_pass_seconds(spec: JobSpec) -> float:
    """One FP32 forward pass over the job's calibration samples, after one warm-up pass."""
    model = load_model(spec.model, spec.weights)
    data = load_dataset(spec.calib)
    batches = calibration_batches(data, model, spec.calib_samples, spec.batch_size, spec.seed)
    seconds = []
    with torch.no_grad():
        for _ in range(2):
            started = time.perf_counter()
            for batch in batches:
                model(batch)
            seconds.append(time.perf_counter() - started)
    return seconds[-1]


def timed(spec: JobSpec, cache: FolderCache) -> tuple[Result, float]:
    started = time.perf_counter()
    result = run(spec, cache=cache)
    return result, time.perf_counter() - started


def section(name: str, spec: JobSpec, other_budget: str) -> str:
    unit = fp32_pass_seconds(spec)
    with tempfile.TemporaryDirectory(prefix="bitplan-phases-") as folder:
        cache = FolderCache(Path(folder))
        first, first_seconds = timed(spec, cache)
        again, again_seconds = timed(spec, cache)
        other, other_seconds = timed(replace(spec, budget=other_budget), cache)
    lines = [
        f"### {name} ({spec.model}, {spec.budget}, {spec.calib_samples} calibration samples)",
        "",
        f"One FP32 forward pass over the calibration samples: {unit:.2f} s.",
        "",
        "| phase | seconds | x FP32 pass | model calls | samples | peak MB |",
        "|---|---|---|---|---|---|",
    ]
    for phase, use in first.phases.items():
        lines.append(
            f"| {phase} | {use['seconds']:.1f} | {use['seconds'] / unit:.1f} | {use['forwards']} "
            f"| {use['samples']} | {use['peak_mb']:.0f} |"
        )
    lines += [
        f"| **job** | {first_seconds:.1f} | {first_seconds / unit:.1f} | | | |",
        "",
        "| run on the cache the first filled | seconds | x first run | reused |",
        "|---|---|---|---|",
        f"| first run (empty cache) | {first_seconds:.1f} | 1.00 | |",
    ]
    for label, result, seconds in (
        ("same job again", again, again_seconds),
        (f"same model at {other_budget}", other, other_seconds),
    ):
        reused = ", ".join(f"{kind} x{count}" for kind, count in result.reused.items())
        lines.append(f"| {label} | {seconds:.1f} | {seconds / first_seconds:.2f} | {reused} |")
    return "\n".join([*lines, ""])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="resnet20,minilm")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "phases.md"))
    args = parser.parse_args()
    known = specs()
    names = args.models.split(",")
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"unknown models {unknown}; choose from {', '.join(known)}")
    if {"effnetlite1", "deit_s"} & set(names):
        register_example_source()
        split_imagenet(IMAGENET_SPLIT)
    sections = []
    for name in names:
        spec, other_budget = known[name]
        text = section(name, spec, other_budget)
        print(text, flush=True)
        sections.append(text)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(sections))


if __name__ == "__main__":
    main()
