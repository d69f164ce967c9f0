"""The report's pictures, as PNG bytes: quality and predicted loss against size, quality
against bit operations, quality against latency (with a latency table), bits and sensitivity
per layer, predicted against measured degradation.

matplotlib draws through `Figure` objects (Agg canvas), never `pyplot`, because inline workers
run jobs in threads and pyplot's global state is not thread-safe. Imports matplotlib, numpy and
the report's data; never the web, database or queue layers.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

from allocator.job_metrics import LatencyFigures
from allocator.report.model import Point, Report, sensitivities

DPI = 110


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


def latency_png(
    figures: LatencyFigures, uniform_quality: Mapping[int, float], primary: str
) -> bytes:
    """Measured quality against latency on the job's latency table: FP32, the uniform plan
    and the mixed plan at their measured latency (filled) and predicted latency (hollow), every
    evaluated uniform width at its predicted latency, and the budget when it had a latency
    term."""
    figure = Figure(figsize=(7.5, 3.5), layout="constrained", dpi=DPI)
    axes = figure.subplots()
    colors = {"fp32": "0.3", "uniform": "tab:blue", "mixed": "tab:red"}
    markers = {"fp32": "s", "uniform": "o", "mixed": "D"}
    widths = sorted(int(b) for b in figures.uniform_predicted if int(b) in uniform_quality)
    if widths:
        axes.plot(
            [figures.uniform_predicted[str(b)] for b in widths],
            [uniform_quality[b] for b in widths],
            "o",
            mfc="none",
            color="tab:blue",
            label="uniform widths (predicted)",
        )
        for b in widths:
            axes.annotate(
                f"W{b}",
                (figures.uniform_predicted[str(b)], uniform_quality[b]),
                xytext=(4, -12),
                textcoords="offset points",
                fontsize=8,
            )
    for entry in figures.plans:
        if entry.metric is None:
            continue
        name = entry.plan if entry.weight_bits is None else f"uniform W{entry.weight_bits}"
        style = {"color": colors[entry.plan], "markersize": 8}
        axes.plot([entry.predicted_ms], [entry.metric], markers[entry.plan], mfc="none", **style)
        if entry.measured_ms is not None:
            axes.plot([entry.measured_ms], [entry.metric], markers[entry.plan], label=name, **style)
            axes.plot(
                [entry.predicted_ms, entry.measured_ms],
                [entry.metric, entry.metric],
                color=colors[entry.plan],
                linewidth=0.8,
                alpha=0.6,
            )
    if figures.budget_ms is not None:
        axes.axvline(figures.budget_ms, color="tab:green", linestyle=":", label="budget")
    axes.set_xlabel(
        f"ms per run of {'x'.join(map(str, figures.input_shape))} on {figures.runtime} "
        "(filled: measured, hollow: predicted)"
    )
    axes.set_ylabel(f"{primary} (measured)")
    axes.grid(True, alpha=0.3)
    axes.legend(loc="lower right", fontsize=8)
    axes.set_title("Quality against latency")
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
    for method, scores in sensitivities(allocation).items():
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


def _shares(scores: list[float | None]) -> list[float | None]:
    total = sum(abs(s) for s in scores if s is not None)
    return [None if s is None or total == 0 else s / total for s in scores]


def _png(figure: Figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
