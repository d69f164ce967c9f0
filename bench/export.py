"""Jobs exported to ONNX (QDQ) and checked in ONNX Runtime, weight-only and with W/A8.

    python bench/export.py                          # every model, every plan (~45 min)
    python bench/export.py --models resnet20 --plans weights   # only the README job itself

Each model's job runs with `--export onnx` in a fresh BITPLAN_HOME, once as written, once
with 8-bit activations (`--act-bits 8 --act-quantizers baseline`), and once with every weight
and activation at 8 bits (`w8a8`):

- `resnet20`: the README's `bitplan run ...` command (`bench/readme_example.py` reads it), on
  the 10,000 CIFAR-10 test images; its rows also time ONNX Runtime, bitplan's torch model and
  FP32 torch on this CPU at batch 1 and batch 256 (as many threads as torch uses);
- `digits`: the small ViT of bench/train_digits_vit.py (trained first if missing), 450 test
  digits;
- `minilm`: MiniLM sentence embeddings on 200 STS-B dev pairs (Spearman);
- `effnetlite1`: the example plugin's EfficientNet-Lite1 on the 244 held-out ImageNet images
  of bench/quality.py's split, a quick job (32 calibration images, widths 4 and 8), through
  the installed example package (`pip install -e examples/bitplan-efficientnet-lite`).

Per job it prints the parity the job recorded (max / mean absolute output difference of ONNX
Runtime against bitplan's quantized model on the evaluation samples, the samples beyond the
output bound, the site-by-site code check when activations are quantized, the same under ONNX
Runtime's default session), the primary metric of both, the ONNX file and packed artifact
sizes, and the exported plan's latency in ONNX Runtime at batch 1 against the FP32 model's,
timed in alternating rounds in the same process. Needs `../shared/data` (see its README).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from allocator.apply import load_packed  # noqa: E402
from allocator.export.latency import example_input, export_float  # noqa: E402
from allocator.export.onnx_qdq import (  # noqa: E402
    check_exportable,
    feeds,
    read_metadata,
    replace_module,
)
from allocator.export.parity import bitplan_forward  # noqa: E402
from allocator.export.runtime import runtime_forward, session  # noqa: E402
from allocator.plan import BitPlan  # noqa: E402
from allocator.zoo import load_model  # noqa: E402
from allocator.zoo.base import LoadedModel  # noqa: E402
from bench.quality_models import (  # noqa: E402
    DATA,
    DIGITS,
    DIGITS_REF,
    IMAGENET_SPLIT,
    split_imagenet,
)
from bench.readme_example import README, readme_command, run_job  # noqa: E402
from bench.train_digits_vit import train as train_digits_vit  # noqa: E402

ACTS_8 = ["--act-bits", "8", "--act-quantizers", "baseline"]
PLANS = {
    "weights": [],
    "w-a8": ACTS_8,
    # Every weight at 8 bits too: the plan a deployment on int8 kernels runs.
    "w8a8": [*ACTS_8, "--bits", "8", "--budget", "avg-bits=8"],
}
MODELS = ("resnet20", "digits", "minilm", "effnetlite1")
BATCHES = {1: 200, 256: 10}
"""Batch size -> timed repeats (after 3 warm-up runs); the median is printed."""
ROUNDS, PER_ROUND = 8, 10
"""The exported plan against FP32 in ONNX Runtime: alternating rounds of timed runs."""


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def quick(model: str, calib: Path, evaluation: Path, *extra: str) -> list[str]:
    """A job that only needs to produce a plan to export: FP32-input fits, one solve."""
    return [
        *("--model", model, "--calib", str(calib), "--eval", str(evaluation)),
        *("--budget", "avg-bits=6", "--method", "fisher", "--bits", "4,8"),
        *("--calibration", "fp32", "--context-rounds", "0", "--no-report-widths", "--no-report"),
        *extra,
    ]


def model_args(name: str) -> list[str]:
    """The `bitplan run` arguments of one model's job (see the module docstring)."""
    if name == "resnet20":
        return readme_command(README.read_text())
    if name == "digits":
        if not (DIGITS / "vit.safetensors").exists():
            train_digits_vit(DIGITS)
        weights = ("--weights", str(DIGITS / "vit.safetensors"), "--calib-samples", "256")
        return quick(DIGITS_REF, DIGITS / "train.npz", DIGITS / "test.npz", *weights)
    if name == "minilm":
        stsb = DATA / "stsb"
        samples = ("--calib-samples", "32", "--eval-samples", "200")
        return quick("hf:minilm", stsb / "sts-train.csv", stsb / "sts-dev.csv", *samples)
    if name == "effnetlite1":
        split_imagenet(IMAGENET_SPLIT)
        calib, evaluation = IMAGENET_SPLIT / "calib.npz", IMAGENET_SPLIT / "eval.npz"
        samples = ("--calib-samples", "32", "--batch-size", "32")
        return quick("effnetlite:lite1", calib, evaluation, *samples)
    raise SystemExit(f"unknown model {name!r}: choose from {', '.join(MODELS)}")


def measure(model: str, args: list[str], name: str, home: Path) -> dict[str, object]:
    """Run the job with `--export onnx`; for the README model, time its two models."""
    _lines, result = run_job([*args, *PLANS[name], "--export", "onnx"], home / f"{model}-{name}")
    check = result["metrics"]["exports"]["onnx"]
    artifacts = result["artifacts"]
    row: dict[str, object] = {"model": model, "plan": name, "job": result["job_id"], **check}
    if not check["passed"]:
        return row
    onnx_path, packed = Path(artifacts["onnx"]), Path(artifacts["model"])
    row["onnx_bytes"] = onnx_path.stat().st_size
    row["packed_bytes"] = packed.stat().st_size
    model_ref = args[args.index("--model") + 1]
    weights = args[args.index("--weights") + 1] if "--weights" in args else None
    row.update(against_fp32(load_model(model_ref, weights), onnx_path, home))
    if model != "resnet20":
        return row
    fp32 = load_model(model_ref, weights)
    quantized, plan = load_packed(packed, load_model(model_ref, weights).module)
    assert plan == BitPlan.from_dict(json.loads(read_metadata(onnx_path)["bitplan.plan"]))
    quantized = quantized.eval()
    runtime = runtime_forward(session(onnx_path), ("input",))
    quantizers = check_exportable(plan.activations)
    for batch, repeats in BATCHES.items():
        x = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            row[f"ort_ms_{batch}"] = median_ms(lambda x=x: runtime(x), repeats)
            with bitplan_forward(replace_module(fp32, quantized), quantizers) as ours:
                row[f"torch_ms_{batch}"] = median_ms(lambda x=x: ours(x), repeats)
            row[f"fp32_ms_{batch}"] = median_ms(lambda x=x: fp32(x), repeats)
    return row


def against_fp32(model: LoadedModel, onnx_path: Path, home: Path) -> dict[str, float]:
    """The exported plan and the FP32 model exported plainly, each in ONNX Runtime at batch 1
    (one image at the model's size, or one sentence of 32 tokens) with the checks' session
    settings, timed in alternating rounds so a busy machine slows both alike: the medians of
    the rounds' medians."""
    shape = (1, 3, model.image_size, model.image_size) if model.input_kind == "image" else (1, 32)
    batch = example_input(model, shape)
    names = export_float(model, batch, home / "fp32.onnx")
    runs = {
        "fp32": session(home / "fp32.onnx").run,
        "plan": session(onnx_path).run,
    }
    feed = feeds(names, batch)
    rounds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(ROUNDS):
        for name, run in runs.items():
            rounds[name].append(median_ms(lambda run=run: run(None, feed), PER_ROUND))
    plan, fp32 = statistics.median(rounds["plan"]), statistics.median(rounds["fp32"])
    return {"e2e_ms": plan, "e2e_fp32_ms": fp32}


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| model | plan | max abs diff (of range) | mean abs diff | samples beyond"
        " | codes site by site | ORT defaults max abs diff | metric | bitplan | ONNX"
        " | .onnx bytes | packed bytes | ONNX ms b1 (FP32 ONNX ms, ratio)"
        " | ORT ms b1 / b256 | bitplan torch ms b1 / b256 | FP32 torch ms b1 / b256 |",
        "|" + "---|" * 16,
    ]
    for r in rows:
        if not r["passed"]:
            lines.append(f"| {r['model']} | {r['plan']} | failed: {r['error']} |" + " |" * 13)
            continue
        rel = r["max_abs_diff"] / r["output_range"]
        defaults = (r.get("runtime_defaults") or {}).get("max_abs_diff", float("nan"))
        e2e = (
            f" {r['e2e_ms']:.2f} ({r['e2e_fp32_ms']:.2f}, {r['e2e_ms'] / r['e2e_fp32_ms']:.2f}x) |"
        )
        timings = " - | - | - |"
        if "ort_ms_1" in r:
            timings = (
                f" {r['ort_ms_1']:.2f} / {r['ort_ms_256']:.1f} |"
                f" {r['torch_ms_1']:.2f} / {r['torch_ms_256']:.1f} |"
                f" {r['fp32_ms_1']:.2f} / {r['fp32_ms_256']:.1f} |"
            )
        lines.append(
            f"| {r['model']} | {r['plan']} | {r['max_abs_diff']:.2e} ({rel:.1e}) | "
            f"{r['mean_abs_diff']:.2e} | {r['over_tolerance']} of {r['samples']} | "
            f"{_codes(r.get('site_codes'))} | {defaults:.2e} | {r['metric']} | "
            f"{r['bitplan_metric']:.2f} | {r['runtime_metric']:.2f} | {r['onnx_bytes']:,} | "
            f"{r['packed_bytes']:,} |{e2e}{timings}"
        )
    return "\n".join(lines)


def _codes(codes: dict[str, object] | None) -> str:
    """The site-by-site check in one cell; "-" when the outputs alone passed."""
    if not codes:
        return "-"
    return (
        f"{codes['one_step']:,} of {codes['codes']:,} one step off, {codes['beyond']} further; "
        f"worst site {codes['worst_share']:.1e}; outputs {codes['output_max_abs_diff']:.1e}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated")
    parser.add_argument("--plans", default=",".join(PLANS), help="weights, w-a8 or both")
    options = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="bitplan-export-bench-") as home:
        for model in options.models.split(","):
            args = model_args(model)
            for name in options.plans.split(","):
                rows.append(measure(model, args, name, Path(home)))
                print(table(rows[-1:]), flush=True)
    print(f"\ntorch threads {torch.get_num_threads()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
