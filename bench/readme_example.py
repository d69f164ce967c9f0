"""Regenerate the README's worked example from the command the README opens with.

    python bench/readme_example.py            # runs the job (minutes), rewrites README.md

Takes the `bitplan run ...` part of the README's first command, runs it as a user would (a fresh
BITPLAN_HOME in a temporary folder, so the machine's own jobs are untouched), and writes between
the README's `<!-- example:begin -->` / `<!-- example:end -->` markers what it printed, and the
job's pareto.png to docs/. The figures in the paragraph that follows are read from the same run
(`--json` of the same job, re-read from its stored result), so none is pasted by hand.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from allocator.job_metrics import JobMetrics  # noqa: E402
from service.cli.output import print_summary  # noqa: E402

README = ROOT / "README.md"
PICTURE = ROOT / "docs" / "worked-example-pareto.png"
BEGIN, END = "<!-- example:begin -->", "<!-- example:end -->"


def readme_command(readme: str) -> list[str]:
    """The arguments of `bitplan run` in the README's first bash block."""
    block = re.search(r"```bash\n(.*?)\n```", readme, re.S)
    if block is None or "bitplan run" not in block.group(1):
        raise SystemExit("README.md's first bash block has no `bitplan run` command")
    return shlex.split(block.group(1).split("bitplan run", 1)[1])


def run_job(args: list[str], home: Path) -> tuple[str, dict]:
    """The result of `bitplan run ARGS --json`, and the lines `bitplan run ARGS` prints for it
    (the CLI's own `print_summary` of that result)."""
    env = {**os.environ, "BITPLAN_HOME": str(home)}
    os.environ["COLUMNS"] = "200"  # print_summary's lines unwrapped, as in a wide terminal
    bitplan = str(Path(sys.executable).with_name("bitplan"))
    done = subprocess.run(
        [bitplan, "run", *args, "--json"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the README's command failed:\n{done.stderr[-2000:]}")
    result = json.loads(done.stdout)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        print_summary(result)
    return printed.getvalue(), result


def example_block(printed: str, result: dict, home: Path) -> str:
    """The README text between the markers: the printed lines and what they say."""
    metrics = result["metrics"]
    primary = metrics["primary"]
    shown = printed.replace(str(home), "./bitplan-data").rstrip()
    uniform = metrics["uniform"]
    comparison = metrics.get("comparison") or {}
    difference = comparison.get("primary", {})
    rounds = metrics.get("rounds") or []
    kept_rounds = sum(1 for r in rounds[1:] if r["kept"])
    fp32, mixed = metrics["fp32"][primary], metrics["quantized"][primary]
    lines = [
        "```",
        shown,
        "```",
        "",
        f"FP32 scores {fp32:.2f} {primary}. At this budget the widest uniform plan that fits is "
        f"W{uniform['bits']} ({uniform[primary]:.2f}); the allocation gives wider layers where "
        f"they matter and reaches {mixed:.2f}, a difference of {difference.get('value', 0):+.2f} "
        f"points [{difference.get('low', 0):+.2f}, {difference.get('high', 0):+.2f}] "
        f"({comparison.get('verdict', 'not compared')}, paired bootstrap over the "
        f"{comparison.get('samples', 0):,} test images). Both plans are fitted the same way: "
        f"{JobMetrics.from_dict(metrics).fit_text} (`calibration: auto`, the default); "
        f"{len(rounds) - 1 if rounds else 0} round(s) of costs re-measured around the plan ran, "
        f"{kept_rounds} kept.",
        "",
        "The job's `pareto.png` (from its report): measured top-1 against weight size for FP32, "
        "the uniform plans and the mixed plan (top), and the loss the cost table predicts for "
        "the cheapest plan at each size, with the measured plans on it (bottom).",
        "",
        f"![The worked example: quality and predicted loss against weight size]"
        f"({PICTURE.relative_to(ROOT)})",
    ]
    return "\n".join(lines)


def main() -> None:
    readme = README.read_text()
    if BEGIN not in readme or END not in readme:
        raise SystemExit(f"README.md lacks the {BEGIN} / {END} markers")
    with tempfile.TemporaryDirectory() as folder:
        home = Path(folder) / "bitplan-data"
        printed, result = run_job(readme_command(readme), home)
        pareto = result["artifacts"].get("pareto")
        if pareto:
            shutil.copyfile(pareto, PICTURE)
        block = example_block(printed, result, home)
    head, rest = readme.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    README.write_text(f"{head}{BEGIN}\n{block}\n{END}{tail}")
    print(block)


if __name__ == "__main__":
    main()
