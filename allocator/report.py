"""The per-job report: the pictures and the one page people choose a bit plan by.

People decide by looking: quality against size for every plan that was measured (FP32, the
uniform widths, the chosen mixed plan) next to the frontier the cost table predicts, which layers
kept their bits and how sensitive each one is, and whether the predicted loss ranked the measured
plans the way the measurements did (Spearman's rank correlation: the solver only needs the
ranking to be right, not the scale). The page carries the inputs and hashes to rerun the job and
the solver's proof.

`report.html` stands alone: images are base64 data URIs, styles are inline, there is no script
and no external request, so it opens from an artifact store, a mail or a CI folder alike.
matplotlib draws through `Figure` objects (Agg canvas), never `pyplot`, because inline workers
run jobs in threads and pyplot's global state is not thread-safe.

Imports matplotlib, numpy, scipy, the cost-table reader and the solver (for the predicted
frontier); never the web, database or queue layers.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter
from scipy.stats import spearmanr

from allocator.budget import BITS_PER_MB, FP32_BITS, ResolvedBudget
from allocator.errors import InfeasibleBudget
from allocator.job import HIGHER_IS_BETTER, Result
from allocator.layers import LayerTable
from allocator.profile import CostTable, file_sha256
from allocator.solve import pareto

REPORT_FILE = "report.html"
PARETO_FILE = "pareto.png"
SWEEP_POINTS = 25
"""Budgets in the predicted frontier, evenly spaced in size between the narrowest and widest
uniform plan: enough for a smooth curve, and each is one warm-started re-solve."""
SWEEP_TIME_LIMIT = 1.0
"""Solver seconds per frontier budget: the frontier is an illustration, not the job's answer."""
MIN_RANK_POINTS = 3
"""Fewer measured plans than this give no meaningful rank correlation."""
DPI = 110


@dataclass(frozen=True)
class Point:
    """One plan on the quality / size plane.

    `quality` is the measured primary metric (None for a predicted frontier point); `predicted`
    is the summed cost-table loss of the plan (0 for FP32, inf when the table forbids a width).
    """

    label: str
    kind: str
    weight_mb: float
    avg_bits: float
    predicted: float
    quality: float | None = None
    metrics: Mapping[str, float] | None = None
    bops: float | None = None
    """Bit operations per sample, for jobs that quantize activations (None otherwise)."""


@dataclass(frozen=True)
class Report:
    """Everything the page and the pictures show, computed once from a `Result`."""

    primary: str
    measured: list[Point]
    frontier: list[Point]
    rank_correlation: float | None

    @property
    def fp32(self) -> Point:
        return self.measured[0]

    def degradation(self, point: Point) -> float | None:
        return degradation(self.primary, self.fp32, point)


def degradation(primary: str, fp32: Point, point: Point) -> float | None:
    """How much worse than FP32 a plan measured, in metric units, positive when worse whichever
    way the metric runs (top-1 drops, KL rises)."""
    if point.quality is None or fp32.quality is None:
        return None
    loss = fp32.quality - point.quality
    return loss if HIGHER_IS_BETTER.get(primary, True) else -loss


def build(result: Result) -> Report:
    """Price every measured plan with the job's cost table and solve the predicted frontier."""
    costs = CostTable.from_dict(result.profile)
    primary = result.metrics["primary"]
    measured = measured_points(result, costs)
    compared = [p for p in measured[1:] if math.isfinite(p.predicted)]
    correlation = rank_correlation(
        [p.predicted for p in compared],
        [degradation(primary, measured[0], p) or 0.0 for p in compared],
    )
    return Report(primary, measured, predicted_frontier(costs), correlation)


def measured_points(result: Result, costs: CostTable) -> list[Point]:
    """FP32 first, then the uniform widths from narrow to wide, then the chosen mixed plan."""
    metrics = result.metrics
    primary = metrics["primary"]
    table = costs.table
    fp32_mb = FP32_BITS * table.total_params / BITS_PER_MB
    with_acts = result.act_allocation is not None
    macs = sum(layer.macs for layer in table)
    fp32_bops = float(macs * FP32_BITS * FP32_BITS) if with_acts else None
    points = [
        Point(
            "FP32",
            "fp32",
            fp32_mb,
            FP32_BITS,
            0.0,
            metrics["fp32"][primary],
            metrics["fp32"],
            fp32_bops,
        )
    ]
    for uniform in sorted(_uniform_metrics(metrics), key=lambda entry: entry["bits"]):
        plan = costs.uniform_plan(uniform["bits"])
        values = {k: uniform[k] for k in metrics["fp32"] if k in uniform}
        act = uniform.get("act_bits")
        label = f"W{uniform['bits']}" + (f"A{act}" if act else "")
        bops = _bops(table, plan, act) if with_acts and act else None
        points.append(_point(label, "uniform", costs, plan, values, primary, bops))
    mixed = {entry["layer"]: entry["weight_bits"] for entry in result.allocation}
    mixed_bops = result.bops if with_acts else None
    points.append(_point("mixed", "mixed", costs, mixed, metrics["quantized"], primary, mixed_bops))
    return points


def _bops(table: LayerTable, plan: Mapping[str, int], act_bits: int) -> float:
    return float(sum(layer.macs * plan[layer.name] * act_bits for layer in table))


def _uniform_metrics(metrics: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Every evaluated uniform width; a result from before `uniform_widths` existed has one."""
    if metrics.get("uniform_widths"):
        return list(metrics["uniform_widths"])
    return [metrics["uniform"]] if metrics.get("uniform") else []


def _point(
    label: str,
    kind: str,
    costs: CostTable,
    plan: Mapping[str, int],
    metrics: Mapping[str, float],
    primary: str,
    bops: float | None = None,
) -> Point:
    table = costs.table
    return Point(
        label=label,
        kind=kind,
        weight_mb=table.storage_bits(plan) / BITS_PER_MB,
        avg_bits=_avg_bits(table, plan),
        predicted=costs.plan_cost(plan),
        quality=metrics[primary],
        metrics=metrics,
        bops=bops,
    )


def predicted_frontier(costs: CostTable, points: int = SWEEP_POINTS) -> list[Point]:
    """The cheapest predicted plan at sizes from the narrowest to the widest uniform plan (at
    most 8 bits): what the cost table says each size can buy, without measuring any of it.

    Empty when the narrowest uniform size admits no plan (the table forbids that width on some
    layer): the frontier illustrates the job and must never fail it.
    """
    widths = [b for b in costs.bits if b <= 8] or list(costs.bits)
    table = costs.table
    low, high = (table.storage_bits(costs.uniform_plan(b)) for b in (min(widths), max(widths)))
    budgets = [ResolvedBudget(size_bits=float(s)) for s in np.linspace(low, high, points)]
    try:
        solutions = pareto(table, costs.bits, costs.cost, budgets, time_limit=SWEEP_TIME_LIMIT)
    except InfeasibleBudget:
        return []
    return [
        Point(
            label=f"{solution.storage_bits / BITS_PER_MB:.4g} MB",
            kind="predicted",
            weight_mb=solution.storage_bits / BITS_PER_MB,
            avg_bits=_avg_bits(table, solution.bits),
            predicted=solution.objective,
        )
        for solution in solutions
        if solution.bits
    ]


def _avg_bits(table: LayerTable, plan: Mapping[str, int]) -> float:
    return sum(layer.params * plan[layer.name] for layer in table) / table.total_params


def rank_correlation(predicted: Sequence[float], measured: Sequence[float]) -> float | None:
    """Spearman's rho between predicted cost and measured degradation over the same plans.

    None when it says nothing: fewer than `MIN_RANK_POINTS` plans, or one side constant.
    """
    if len(predicted) < MIN_RANK_POINTS or len(set(predicted)) < 2 or len(set(measured)) < 2:
        return None
    return float(spearmanr(predicted, measured).statistic)


# --- pictures ------------------------------------------------------------------------------------


def pareto_png(report: Report) -> bytes:
    """Measured quality against weight size (top) over the predicted loss against size (bottom),
    sharing a log size axis so FP32 and 2-bit plans both stay readable."""
    figure = Figure(figsize=(7.5, 6.5), layout="constrained", dpi=DPI)
    quality, predicted = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    fp32, uniform, mixed = _split(report.measured)
    quality.axhline(fp32.quality, color="0.6", linestyle="--", linewidth=1)
    quality.plot(
        [p.weight_mb for p in uniform],
        [p.quality for p in uniform],
        "o-",
        color="tab:blue",
        label="uniform",
    )
    quality.plot([fp32.weight_mb], [fp32.quality], "*", color="black", markersize=12, label="FP32")
    quality.plot(
        [mixed.weight_mb],
        [mixed.quality],
        "D",
        color="tab:red",
        markersize=8,
        label=f"mixed ({mixed.avg_bits:.2f} bits)",
    )
    for point in uniform:
        quality.annotate(
            point.label,
            (point.weight_mb, point.quality),
            xytext=(4, -12),
            textcoords="offset points",
            fontsize=8,
        )
    quality.margins(y=0.12)  # room for the width labels under the lowest point
    quality.set_ylabel(f"{report.primary} (measured)")
    _log_size_axis(quality)
    quality.grid(True, which="both", alpha=0.3)
    quality.legend(loc="lower right", fontsize=8)
    quality.set_title("Quality against weight size")

    shown = [p for p in report.measured[1:] if math.isfinite(p.predicted)]
    if report.frontier:
        predicted.plot(
            [p.weight_mb for p in report.frontier],
            [p.predicted for p in report.frontier],
            ".-",
            color="tab:green",
            label="predicted frontier (cost table)",
        )
    for kind, marker, color in (("uniform", "o", "tab:blue"), ("mixed", "D", "tab:red")):
        chosen = [p for p in shown if p.kind == kind]
        predicted.plot(
            [p.weight_mb for p in chosen],
            [p.predicted for p in chosen],
            marker,
            color=color,
            linestyle="none",
            label=f"{kind} (predicted)",
        )
    values = [p.predicted for p in (*report.frontier, *shown)]
    if values and min(values) > 0:
        predicted.set_yscale("log")
    predicted.set_xlabel("weight size (MB, codes + scales; log scale)")
    predicted.set_ylabel("predicted loss")
    predicted.grid(True, which="both", alpha=0.3)
    predicted.legend(loc="upper right", fontsize=8)
    return _png(figure)


def bops_png(report: Report) -> bytes:
    """Measured quality against bit operations per sample, for jobs that quantize activations:
    the BOPs budget is the other half of `match=WxAy`."""
    figure = Figure(figsize=(7.5, 3.5), layout="constrained", dpi=DPI)
    axes = figure.subplots()
    fp32, uniform, mixed = _split(report.measured)
    axes.axhline(fp32.quality, color="0.6", linestyle="--", linewidth=1, label="FP32")
    shown = [p for p in uniform if p.bops is not None]
    axes.plot(
        [p.bops / 1e9 for p in shown],
        [p.quality for p in shown],
        "o",
        color="tab:blue",
        label="uniform",
    )
    for point in shown:
        axes.annotate(
            point.label,
            (point.bops / 1e9, point.quality),
            xytext=(4, -12),
            textcoords="offset points",
            fontsize=8,
        )
    if mixed.bops is not None:
        axes.plot(
            [mixed.bops / 1e9], [mixed.quality], "D", color="tab:red", markersize=8, label="mixed"
        )
    axes.set_xscale("log")
    axes.set_xlabel("GBOPs per sample (MACs x weight bits x activation bits; log scale)")
    axes.set_ylabel(f"{report.primary} (measured)")
    axes.grid(True, which="both", alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title("Quality against bit operations")
    return _png(figure)


def layers_png(allocation: Sequence[Mapping[str, Any]]) -> bytes:
    """Chosen bits per layer (bars, pinned layers grey) with each method's sensitivity as a
    share of its total (markers, right axis), in network order."""
    count = len(allocation)
    figure = Figure(figsize=(min(max(7.5, 0.28 * count), 30), 4.5), layout="constrained", dpi=DPI)
    bits = figure.subplots()
    index = np.arange(count)
    colors = ["0.7" if entry.get("pinned") else "tab:blue" for entry in allocation]
    bits.bar(index, [entry["weight_bits"] for entry in allocation], color=colors, width=0.7)
    bits.set_ylabel("weight bits (grey: pinned)")
    bits.set_xticks(index, [entry["layer"] for entry in allocation], rotation=90, fontsize=7)
    bits.set_xlim(-0.6, count - 0.4)
    share = bits.twinx()
    all_shares: list[float] = []
    for method, scores in _sensitivities(allocation).items():
        shares = _shares(scores)
        all_shares += [s for s in shares if s is not None]
        share.plot(
            index,
            [np.nan if s is None else s for s in shares],
            "o",
            markersize=4,
            label=f"{method} sensitivity",
        )
    if all_shares:
        if min(all_shares) > 0:
            share.set_yscale("log")
        share.set_ylabel("sensitivity (share of method total)")
        figure.legend(loc="outside lower center", ncols=4, fontsize=8)
    figure.suptitle("Bits per layer and layer sensitivity")
    return _png(figure)


def degradation_png(report: Report) -> bytes:
    """Predicted loss against measured degradation for each measured plan: a rising cloud means
    the cost table ranks plans as the measurements do."""
    figure = Figure(figsize=(5.5, 4.2), layout="constrained", dpi=DPI)
    axes = figure.subplots()
    for point in report.measured[1:]:
        measured = report.degradation(point)
        if measured is None or not math.isfinite(point.predicted):
            continue
        color = "tab:red" if point.kind == "mixed" else "tab:blue"
        axes.plot([point.predicted], [measured], "o", color=color)
        axes.annotate(
            point.label,
            (point.predicted, measured),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=8,
        )
    if [p.predicted for p in report.measured[1:] if p.predicted > 0]:
        axes.set_xscale("log")
    rho = "n/a" if report.rank_correlation is None else f"{report.rank_correlation:.3f}"
    axes.set_title(f"Predicted vs measured degradation (Spearman {rho})")
    axes.set_xlabel("predicted loss (cost table)")
    axes.set_ylabel(f"measured {report.primary} loss vs FP32")
    axes.grid(True, alpha=0.3)
    return _png(figure)


def _log_size_axis(axes: Axes) -> None:
    """A log axis labelled at 1-2-5 steps in plain numbers: sizes span 2 to 32 bits per weight."""
    axes.set_xscale("log")
    axes.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    axes.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    axes.xaxis.set_minor_formatter(NullFormatter())


def _split(points: list[Point]) -> tuple[Point, list[Point], Point]:
    return points[0], [p for p in points if p.kind == "uniform"], points[-1]


def _sensitivities(allocation: Sequence[Mapping[str, Any]]) -> dict[str, list[float | None]]:
    methods = dict.fromkeys(m for entry in allocation for m in entry.get("sensitivity") or {})
    return {m: [(entry.get("sensitivity") or {}).get(m) for entry in allocation] for m in methods}


def _shares(scores: list[float | None]) -> list[float | None]:
    total = sum(abs(s) for s in scores if s is not None)
    return [None if s is None or total == 0 else s / total for s in scores]


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()


# --- the page ------------------------------------------------------------------------------------

STYLE = """
body { font: 14px/1.45 system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
img { max-width: 100%; }
code { font-size: 90%; }
.mixed { background: #fde8e8; }
"""


def render_html(result: Result, report: Report, images: Mapping[str, bytes]) -> str:
    """The standalone page: every image inline, nothing fetched."""
    spec = result.spec
    title = f"bitplan report: {spec.model} at {spec.budget}"
    sections = [
        f"<h1>{_e(title)}</h1>",
        _summary(result, report),
        _image(images["pareto"], "Quality and predicted loss against weight size"),
        *([_image(images["bops"], "Quality against bit operations")] if "bops" in images else []),
        "<h2>Plans</h2>",
        _points_table(report),
        "<h2>Predicted vs measured degradation</h2>",
        _correlation_text(report),
        _image(images["degradation"], "Predicted loss against measured degradation"),
        "<h2>Solver</h2>",
        _pairs_table(_solver_rows(result.solver)),
        "<h2>Layers</h2>",
        _image(images["layers"], "Bits per layer and sensitivity"),
        _layers_table(result.allocation),
        *_float_section(result.metrics.get("float_layers") or []),
        "<h2>Inputs (to reproduce this run)</h2>",
        _pairs_table(_input_rows(result)),
        "<h2>Timings (seconds)</h2>",
        _pairs_table([(name, f"{seconds:.3f}") for name, seconds in result.timings.items()]),
    ]
    body = "\n".join(sections)
    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body>\n{body}\n</body></html>\n"
    )


def _summary(result: Result, report: Report) -> str:
    fp32, mixed = report.fp32, report.measured[-1]
    matched = result.metrics.get("uniform")
    baseline = (
        f"uniform W{matched['bits']} at the same size {_number(matched[report.primary])}"
        if matched
        else "no uniform width fits this budget"
    )
    job = f"job <code>{_e(result.job_id)}</code> · " if result.job_id else ""
    return (
        f"<p>{job}{_e(report.primary)}: FP32 {_number(fp32.quality)}, mixed "
        f"{_number(mixed.quality)} at {mixed.avg_bits:.3f} bits per weight "
        f"({mixed.weight_mb:.4g} MB), {_e(baseline)}. Solver {_e(result.solver.get('name'))}: "
        f"<b>{_e(result.solver.get('status'))}</b>.</p>"
    )


def _points_table(report: Report) -> str:
    keys = list(report.fp32.metrics or {})
    with_bops = any(p.bops is not None for p in report.measured)
    head = ["plan", "avg bits", "weight MB", *(["GBOPs"] if with_bops else []), *keys]
    head += [f"{report.primary} loss", "predicted loss"]
    rows = []
    for point in report.measured:
        cells = [
            point.label,
            f"{point.avg_bits:.3f}",
            f"{point.weight_mb:.4g}",
            *([_number(None if point.bops is None else point.bops / 1e9)] if with_bops else []),
            *(_number((point.metrics or {}).get(key)) for key in keys),
            _number(report.degradation(point)),
            _number(point.predicted),
        ]
        rows.append((cells, "mixed" if point.kind == "mixed" else ""))
    return _table(head, rows)


def _correlation_text(report: Report) -> str:
    plans = [p for p in report.measured[1:] if math.isfinite(p.predicted)]
    if report.rank_correlation is None:
        return (
            f"<p>Spearman rank correlation: n/a ({len(plans)} measured plans with a finite "
            f"prediction; it needs at least {MIN_RANK_POINTS} that differ).</p>"
        )
    return (
        f"<p>Spearman rank correlation between predicted loss and measured {_e(report.primary)} "
        f"loss over {len(plans)} quantized plans: <b>{report.rank_correlation:.3f}</b> "
        "(1: the cost table orders the plans exactly as measured).</p>"
    )


def _solver_rows(solver: Mapping[str, Any]) -> list[tuple[str, str]]:
    names = ("name", "status", "gap", "seconds", "objective", "storage_bits", "bops")
    return [(name, _number(solver.get(name))) for name in names if name in solver]


def _layers_table(allocation: Sequence[Mapping[str, Any]]) -> str:
    methods = list(_sensitivities(allocation))
    head = ["layer", "kind", "params", "bits", "pinned", "clip"]
    head += [f"{m} sensitivity" for m in methods]
    rows = [
        (
            [
                entry["layer"],
                str(entry.get("kind") or ""),
                str(entry["params"]),
                str(entry["weight_bits"]),
                "yes" if entry.get("pinned") else "",
                str(entry.get("clip") or ""),
                *(_number((entry.get("sensitivity") or {}).get(m)) for m in methods),
            ],
            "",
        )
        for entry in allocation
    ]
    return _table(head, rows)


def _float_section(floating: Sequence[Mapping[str, Any]]) -> list[str]:
    """The weight layers the job left in float and why; nothing when it quantized them all."""
    if not floating:
        return []
    rows = [
        ([entry["name"], entry["type"], str(entry["params"]), entry["reason"]], "")
        for entry in floating
    ]
    return [
        "<h2>Layers left in float</h2>",
        "<p>Not in the plan or the budget: stored as float32 in the artifact.</p>",
        _table(["layer", "type", "params", "reason"], rows),
    ]


def _input_rows(result: Result) -> list[tuple[str, str]]:
    spec = result.spec.to_dict()
    rows = [(key, _e(value)) for key, value in spec.items()]
    for field in ("weights", "calib", "eval"):
        path = spec.get(field)
        if path and Path(path).is_file():
            rows.append((f"{field} sha256", f"<code>{file_sha256(Path(path))}</code>"))
    profile = result.profile
    rows.append(("cost table", _e(f"{profile.get('method')} over bits {profile.get('bits')}")))
    return rows


def _pairs_table(rows: Iterable[tuple[str, str]]) -> str:
    return _table([], [([_e(name), value], "") for name, value in rows], escape=False)


def _table(head: Sequence[str], rows: Iterable[tuple[list[str], str]], escape: bool = True) -> str:
    def cell(text: str) -> str:
        return _e(text) if escape else text

    header = "<thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead>"
    body = "".join(
        f"<tr class='{css}'>" + "".join(f"<td>{cell(c)}</td>" for c in cells) + "</tr>"
        for cells, css in rows
    )
    return f"<table>{header if head else ''}<tbody>{body}</tbody></table>"


def _image(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode("ascii")
    return f"<p><img alt='{_e(alt)}' src='data:image/png;base64,{data}'></p>"


def _number(value: Any) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) else str(value)
    return str(value)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def write_report(workdir: Path, result: Result) -> dict[str, str]:
    """Write `report.html` and `pareto.png` into `workdir`; returns {artifact name: path}."""
    report = build(result)
    images = {
        "pareto": pareto_png(report),
        "layers": layers_png(result.allocation),
        "degradation": degradation_png(report),
    }
    if any(p.bops is not None for p in report.measured):
        images["bops"] = bops_png(report)
    workdir.mkdir(parents=True, exist_ok=True)
    pareto_path = workdir / PARETO_FILE
    pareto_path.write_bytes(images["pareto"])
    report_path = workdir / REPORT_FILE
    report_path.write_text(render_html(result, report, images), encoding="utf-8")
    return {"report": str(report_path), "pareto": str(pareto_path)}
