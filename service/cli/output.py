"""What the `bitplan` commands print: errors a user can fix (one line on stderr, exit 2) and a
finished job's summary, the same for `run` (local) and `wait` (remote).

Imports only `allocator.job` and `allocator.errors` of the allocator: never torch, SQLAlchemy or
the web stack.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import typer
from rich.console import Console

from allocator.errors import BitplanError
from allocator.job_metrics import HIGHER_IS_BETTER, JobMetrics, rounds_text

EXIT_USER_ERROR = 2
err = Console(stderr=True)


@contextmanager
def user_errors() -> Iterator[None]:
    """A `BitplanError` becomes one red line on stderr and exit code 2."""
    try:
        yield
    except BitplanError as exc:
        err.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(EXIT_USER_ERROR) from None


def print_summary(payload: dict) -> None:
    """A finished job's result payload (as `run` records it and the API returns it), in four
    lines, the comparison with uniform when the result has one, and one line per artifact.

    The metrics line names the data the scores come from, when the result says (results from
    before `eval_source` do not)."""
    out = Console()
    metrics = payload["metrics"]
    primary = metrics["primary"]
    typed = JobMetrics.from_dict(metrics)
    source = f"  (on {typed.eval_source_text})" if "eval_source" in metrics else ""
    out.print(f"job {payload['job_id']}  {payload['model']}  budget {payload['budget']}")
    device = payload.get("device") or {}
    if device.get("device", "cpu") != "cpu":  # a CPU job's summary reads as it always did
        gpu = f" ({device['gpu']}, {device['gpu_memory_gb']} GB)" if "gpu" in device else ""
        out.print(
            f"device {device['device']}{gpu}  batch sizes: calibration "
            f"{device.get('calibration_batch_size')}, evaluation "
            f"{device.get('evaluation_batch_size')}",
            soft_wrap=True,
        )
    out.print(
        f"avg weight bits {payload['avg_weight_bits']:.3f}  "
        f"weight bytes {payload['weight_bytes']:.0f}  "
        f"solver {payload['solver']['name']} {payload['solver']['status']}"
    )
    direction = "" if HIGHER_IS_BETTER.get(primary, True) else " (lower is better)"
    out.print(
        f"{primary}{direction}: fp32 {metrics['fp32'][primary]:.2f}  "
        f"mixed {metrics['quantized'][primary]:.2f}  "
        + (
            f"uniform W{metrics['uniform']['bits']} {metrics['uniform'][primary]:.2f}"
            if metrics["uniform"]
            else "uniform: none fits"
        )
        + source,
        soft_wrap=True,
    )
    if typed.comparison is not None and typed.uniform is not None:
        out.print(
            f"mixed vs uniform W{typed.uniform.bits}: {typed.comparison.text()}",
            soft_wrap=True,
            markup=False,
        )
    if reused := payload.get("reused"):
        what = ", ".join(f"{count} {kind}" if count > 1 else kind for kind, count in reused.items())
        out.print(f"reused from earlier jobs on the same content: {what}", soft_wrap=True)
    if typed.fit_check is not None:
        out.print(typed.fit_text, soft_wrap=True, markup=False)
    if text := rounds_text(typed.rounds):
        out.print(f"plan rounds in context: {text}", soft_wrap=True, markup=False)
    if typed.latency is not None:
        table = f"  (table {typed.latency.table_id})" if typed.latency.table_id else ""
        out.print(typed.latency.text() + table, soft_wrap=True, markup=False)
    for name, path in payload["artifacts"].items():
        out.print(f"{name}: {path}", soft_wrap=True)
