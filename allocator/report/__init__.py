"""The per-job report: the pictures and the one page people choose a bit plan by.

People decide by looking: quality against size for every measured plan next to the frontier the
cost table predicts, which layers kept their bits and how sensitive each one is, and whether the
predicted loss ranked the measured plans the way the measurements did. One module per concern:
`model` (the data, computed once from a `Result`), `plots` (the PNGs), `html` (the standalone
page); `write_report` puts the three together into a job's folder.

Never imports the web, database or queue layers.
"""

from __future__ import annotations

from pathlib import Path

from allocator.job import Result
from allocator.report.html import render_html
from allocator.report.model import (
    Point,
    Report,
    build,
    degradation,
    measured_points,
    predicted_frontier,
    rank_correlation,
)
from allocator.report.plots import (
    bops_png,
    degradation_png,
    latency_png,
    layers_png,
    pareto_png,
)

__all__ = [
    "PARETO_FILE",
    "REPORT_FILE",
    "Point",
    "Report",
    "bops_png",
    "build",
    "degradation",
    "degradation_png",
    "latency_png",
    "layers_png",
    "measured_points",
    "pareto_png",
    "predicted_frontier",
    "rank_correlation",
    "render_html",
    "write_report",
]

REPORT_FILE = "report.html"
PARETO_FILE = "pareto.png"


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
    latency = result.metrics.latency
    if latency is not None:
        quality = {
            u.bits: u.scores[report.primary]
            for u in result.metrics.measured_uniform()
            if report.primary in u.scores
        }
        images["latency"] = latency_png(latency, quality, report.primary)
    workdir.mkdir(parents=True, exist_ok=True)
    pareto_path = workdir / PARETO_FILE
    pareto_path.write_bytes(images["pareto"])
    report_path = workdir / REPORT_FILE
    report_path.write_text(render_html(result, report, images), encoding="utf-8")
    return {"report": str(report_path), "pareto": str(pareto_path)}
