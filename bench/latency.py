"""Jobs under latency budgets: the per-layer latency table of this machine (ONNX Runtime CPU,
batch 1) and predicted against measured end-to-end latency of FP32, uniform and mixed plans.

    python bench/latency.py                       # the README job's settings (many minutes)
    python bench/latency.py --quick               # 1,000 test images, 64 calibration, fisher
    python bench/latency.py --budgets avg-bits=4,latency=2.3x latency=2.5x
    python bench/latency.py --model minilm        # MiniLM with 8-bit activations, 1x32 tokens

`--model minilm` runs MiniLM on 200 STS-B dev pairs (32 calibration sentences, fisher, FP32-input
fits) with every activation at 8 bits (`--act-bits 8 --act-quantizers baseline`), weights at 4
or 8 bits, timed on one sentence of 32 tokens; its budgets are uniform W8A8's size and latency
budgets below FP32's.

Measures the table once with `bitplan profile-latency` in a fresh BITPLAN_HOME, prints its sum
over layers per choice (FP32, float16, INT8 and INT4 weights with float, 8-bit and 4-bit
activations), then runs the README's `bitplan run ...` command (`bench/readme_example.py`
reads it) with each budget and `--latency-table` naming the table, and prints per plan the
top-1, the latency the table predicts (sum of the plan's layer entries plus `rest_ms`) and the
latency measured end to end on the exported ONNX model (median), and their ratio. FP32 and the
uniform plan are the jobs' own rows. Nothing is asserted: on a CPU without fast int4/int8
paths ONNX Runtime's QDQ kernels are slower than float, and the table shows it. Needs
`../shared/data` (see its README).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from allocator.latency_table import FLOAT_WIDTH, LatencyTable, choice_key  # noqa: E402
from bench.quality_models import DATA  # noqa: E402
from bench.readme_example import README, readme_command, run_job  # noqa: E402

MINILM_BUDGETS = ("avg-bits=8", "latency=0.8x", "latency=0.6x", "avg-bits=6,latency=0.8x")
"""W8A8's size (the uniform comparison is W8A8 itself), then latency below FP32's."""
BUDGETS = ("avg-bits=4", "avg-bits=4,latency=2.2x", "avg-bits=4,latency=2.1x", "latency=2.1x")
"""Size alone, then size with latency budgets relative to FP32 on the same table (on the CPU
the figures in docs/benchmarks.md come from, every quantized kernel is slower than float, so
a budget below 1x is infeasible and the interesting budgets lie between W8's and W4's)."""
QUICK = [
    "--eval-samples", "1000", "--calib-samples", "64", "--method", "fisher",
    "--context-rounds", "0", "--no-report-widths",
]  # fmt: skip
SHOWN = ((32, 32), (16, 32), (8, 32), (4, 32), (8, 8), (4, 8), (4, 4))


def option(args: list[str], name: str) -> str:
    return args[args.index(name) + 1]


def with_option(args: list[str], name: str, value: str) -> list[str]:
    """`args` with `name value` set (replaced when present)."""
    if name in args:
        index = args.index(name)
        return [*args[:index], name, value, *args[index + 2 :]]
    return [*args, name, value]


def minilm_command() -> list[str]:
    """The MiniLM job of `--model minilm` (see the module docstring)."""
    stsb = DATA / "stsb"
    return [
        *("--model", "hf:minilm", "--calib", str(stsb / "sts-train.csv")),
        *("--eval", str(stsb / "sts-dev.csv"), "--calib-samples", "32", "--eval-samples", "200"),
        *("--method", "fisher", "--bits", "4,8", "--calibration", "fp32", "--context-rounds", "0"),
        *("--no-report-widths", "--act-bits", "8", "--act-quantizers", "baseline"),
    ]


def profile(
    args: list[str], home: Path, repeats: int, shape: str, bits: str | None = None
) -> LatencyTable:
    """The latency table of the job's model on this machine at input `shape`, stored in
    `home`; `bits` restricts the weight widths timed."""
    bitplan = str(Path(sys.executable).with_name("bitplan"))
    command = [
        bitplan, "profile-latency", "--model", option(args, "--model"), "--input-shape", shape,
        "--repeats", str(repeats), "--json",
    ]  # fmt: skip
    if "--weights" in args:
        command += ["--weights", option(args, "--weights")]
    if bits is not None:
        command += ["--bits", f"{bits},16", "--act-bits", "8"]
    done = subprocess.run(
        command,
        cwd=ROOT,
        env={**os.environ, "BITPLAN_HOME": str(home)},
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"bitplan profile-latency failed:\n{done.stderr[-2000:]}")
    return LatencyTable.from_dict(json.loads(done.stdout))


def table_summary(table: LatencyTable) -> list[str]:
    """The table's totals over layers per choice, as a markdown table."""
    lines = [
        f"{table.runtime_version}, {table.machine.get('cpu')}, {table.machine.get('threads')} "
        f"thread(s), input {'x'.join(map(str, table.input_shape))}, {len(table.entries)} layers, median of "
        f"{table.settings.get('repeats')} runs; rest (not in any layer entry) "
        f"{table.rest_ms:.3f} ms"
        + "".join(
            f", with every activation at {bits} bits {ms:.3f} ms"
            for bits, ms in sorted(table.act_rest_ms.items())
        )
        + f"; FP32 measured end to end {table.fp32_measured_ms:.3f} ms",
        "",
        "| choice | sum over layers (ms) | x FP32 layers |",
        "|---|---:|---:|",
    ]
    fp32 = sum(row[choice_key(FLOAT_WIDTH, FLOAT_WIDTH)] for row in table.entries.values())
    for weight, act in SHOWN:
        if not all(choice_key(weight, act) in row for row in table.entries.values()):
            continue  # not timed (the job's widths only)
        total = sum(row[choice_key(weight, act)] for row in table.entries.values())
        lines.append(f"| {choice_key(weight, act)} | {total:.3f} | {total / fp32:.2f} |")
    return lines


def plans_table(rows: list[dict], metric: str) -> list[str]:
    lines = [
        f"| plan | budget | avg bits | {metric} | predicted ms | measured ms | measured / predicted |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        measured = row["measured_ms"]
        ratio = "-" if measured is None else f"{measured / row['predicted_ms']:.2f}"
        lines.append(
            f"| {row['plan']} | {row['budget']} | {row['bits']} | {row['top1']} | "
            f"{row['predicted_ms']:.3f} | {'-' if measured is None else f'{measured:.3f}'} | "
            f"{ratio} |"
        )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("resnet20", "minilm"), default="resnet20")
    parser.add_argument("--budgets", nargs="+", default=None)
    parser.add_argument("--quick", action="store_true", help="a smaller job, same model")
    parser.add_argument("--repeats", type=int, default=50, help="timed runs per measurement")
    options = parser.parse_args()
    if options.model == "minilm":
        args, shape, bits = minilm_command(), "1,32", "4,8"
        budgets = options.budgets or list(MINILM_BUDGETS)
    else:
        args, shape, bits = readme_command(README.read_text()), "1,3,32,32", None
        budgets = options.budgets or list(BUDGETS)
        if options.quick:
            args = [*args, *QUICK]
    metric = "top-1"
    with tempfile.TemporaryDirectory(prefix="bitplan-bench-latency-") as tmp:
        home = Path(tmp) / "home"
        table = profile(args, home, options.repeats, shape, bits)
        print("\n".join(table_summary(table)), end="\n\n")
        rows: list[dict] = []
        for budget in budgets:
            job = with_option(args, "--budget", budget)
            job = with_option(job, "--latency-table", str(table.table_id))
            try:
                _printed, result = run_job(job, home)
            except SystemExit as failed:
                print(f"{budget}: {str(failed).splitlines()[-1]}", file=sys.stderr)
                continue
            figures = result["metrics"]["latency"]
            metric = result["metrics"]["primary"]
            for entry in figures["plans"]:
                if entry["plan"] == "mixed":
                    name, bits = "mixed", f"{result['avg_weight_bits']:.2f}"
                elif entry["plan"] == "uniform":
                    name, bits = f"uniform W{entry['weight_bits']}", str(entry["weight_bits"])
                else:
                    name, bits = "FP32", "32"
                if name != "mixed" and any(r["plan"] == name for r in rows):
                    continue
                rows.append(
                    {
                        "plan": name,
                        "budget": budget if name == "mixed" else "-",
                        "bits": bits,
                        "top1": f"{entry['metric']:.2f}" if entry["metric"] is not None else "-",
                        "predicted_ms": entry["predicted_ms"],
                        "measured_ms": entry["measured_ms"],
                    }
                )
        print("\n".join(plans_table(rows, metric)))


if __name__ == "__main__":
    main()
