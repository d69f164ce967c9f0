"""The README's ResNet20 job exported to ONNX (QDQ) and checked in ONNX Runtime.

    python bench/export.py                 # the README job, weights only and with W/A8 (minutes)
    python bench/export.py --plans weights # only the README job itself

Runs the README's `bitplan run ...` command (`bench/readme_example.py` reads it) with
`--export onnx` in a fresh BITPLAN_HOME, once as written and once with 8-bit activations
(`--act-bits 8 --act-quantizers baseline`), and prints per plan: the parity the job recorded
(max / mean absolute output difference of ONNX Runtime against bitplan's quantized model on
the 10,000 test images, and the same under ONNX Runtime's default session), top-1 of both, the
ONNX file and packed artifact sizes, and the median latency of ONNX Runtime and of bitplan's
torch model (and FP32 torch) on this CPU at batch 1 and batch 256, with as many threads as
torch uses. Needs `../shared/data` (see its README).
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
from allocator.export.onnx_qdq import check_exportable, read_metadata, replace_module  # noqa: E402
from allocator.export.parity import bitplan_forward, runtime_forward, session  # noqa: E402
from allocator.plan import BitPlan  # noqa: E402
from allocator.zoo import load_model  # noqa: E402
from bench.readme_example import README, readme_command, run_job  # noqa: E402

PLANS = {"weights": [], "w-a8": ["--act-bits", "8", "--act-quantizers", "baseline"]}
BATCHES = {1: 200, 256: 10}
"""Batch size -> timed repeats (after 3 warm-up runs); the median is printed."""


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def measure(args: list[str], name: str, home: Path) -> dict[str, object]:
    """Run the job with `--export onnx`, then time its two models."""
    _lines, result = run_job([*args, *PLANS[name], "--export", "onnx"], home / name)
    check = result["metrics"]["exports"]["onnx"]
    row: dict[str, object] = {"plan": name, "job": result["job_id"], **check}
    if not check["passed"]:
        return row
    artifacts = result["artifacts"]
    onnx_path, packed = Path(artifacts["onnx"]), Path(artifacts["model"])
    model_ref = args[args.index("--model") + 1]
    weights = args[args.index("--weights") + 1]
    fp32 = load_model(model_ref, weights)
    quantized, plan = load_packed(packed, load_model(model_ref, weights).module)
    assert plan == BitPlan.from_dict(json.loads(read_metadata(onnx_path)["bitplan.plan"]))
    quantized = quantized.eval()
    runtime = runtime_forward(session(onnx_path), ("input",))
    row["onnx_bytes"] = onnx_path.stat().st_size
    row["packed_bytes"] = packed.stat().st_size
    quantizers = check_exportable(plan.activations)
    for batch, repeats in BATCHES.items():
        x = torch.randn(batch, 3, 32, 32)
        with torch.inference_mode():
            row[f"ort_ms_{batch}"] = median_ms(lambda x=x: runtime(x), repeats)
            with bitplan_forward(replace_module(fp32, quantized), quantizers) as ours:
                row[f"torch_ms_{batch}"] = median_ms(lambda x=x: ours(x), repeats)
            row[f"fp32_ms_{batch}"] = median_ms(lambda x=x: fp32(x), repeats)
    return row


def table(rows: list[dict[str, object]]) -> str:
    lines = [
        "| plan | max abs diff (of range) | mean abs diff | samples beyond | codes site by site"
        " | ORT defaults max abs diff | top-1 bitplan | top-1 ONNX | .onnx bytes | packed bytes"
        " | ORT ms b1 / b256 | bitplan torch ms b1 / b256 | FP32 torch ms b1 / b256 |",
        "|" + "---|" * 13,
    ]
    for r in rows:
        if not r["passed"]:
            lines.append(f"| {r['plan']} | failed: {r['error']} |" + " |" * 11)
            continue
        rel = r["max_abs_diff"] / r["output_range"]
        defaults = (r.get("runtime_defaults") or {}).get("max_abs_diff", float("nan"))
        lines.append(
            f"| {r['plan']} | {r['max_abs_diff']:.2e} ({rel:.1e}) | {r['mean_abs_diff']:.2e} | "
            f"{r['over_tolerance']} of {r['samples']} | {_codes(r.get('site_codes'))} | "
            f"{defaults:.2e} | "
            f"{r['bitplan_metric']:.2f} | {r['runtime_metric']:.2f} | {r['onnx_bytes']:,} | "
            f"{r['packed_bytes']:,} | {r['ort_ms_1']:.2f} / {r['ort_ms_256']:.1f} | "
            f"{r['torch_ms_1']:.2f} / {r['torch_ms_256']:.1f} | "
            f"{r['fp32_ms_1']:.2f} / {r['fp32_ms_256']:.1f} |"
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
    parser.add_argument("--plans", default=",".join(PLANS), help="weights, w-a8 or both")
    options = parser.parse_args()
    args = readme_command(README.read_text())
    rows = []
    with tempfile.TemporaryDirectory(prefix="bitplan-export-bench-") as home:
        for name in options.plans.split(","):
            rows.append(measure(args, name, Path(home)))
            print(table(rows[-1:]), flush=True)
    print(f"\ntorch threads {torch.get_num_threads()}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
