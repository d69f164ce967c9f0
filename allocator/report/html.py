"""The report page: one standalone HTML file people choose a bit plan by.

It shows the pictures, the measured plans, the solver's proof, the layers, the inputs and hashes
to rerun the job, and the timings. `report.html` stands alone: images are base64 data URIs,
styles are inline, there is no script and no external request, so it opens from an artifact
store, a mail or a CI folder alike. Imports the report's data and the file hasher; never
matplotlib, the web, database or queue layers.
"""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from allocator.job import Result
from allocator.job_metrics import FloatLayer, rounds_text
from allocator.profile import file_sha256
from allocator.report.model import MIN_RANK_POINTS, Report, sensitivities

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
        *_comparison(result),
        _image(images["pareto"], "Quality and predicted loss against weight size"),
        *([_image(images["bops"], "Quality against bit operations")] if "bops" in images else []),
        *_latency_section(result, images),
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
        *_float_section(result.metrics.float_layers),
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
    matched = result.metrics.uniform
    baseline = (
        f"uniform W{matched.bits} at the same size {_number(matched.scores[report.primary])}"
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


def _comparison(result: Result) -> list[str]:
    """Under the summary: mixed against uniform sample by sample, with the intervals and the
    verdict, and which data the scores come from."""
    metrics = result.metrics
    lines = []
    comparison, uniform = metrics.comparison, metrics.uniform
    if comparison is not None:
        against = f"uniform W{uniform.bits}" if uniform is not None else "uniform"
        lines.append(
            f"<p class='comparison'>Mixed vs {_e(against)} at the same size, on the same "
            f"samples: <b>{_e(comparison.verdict)}</b>. Mixed minus uniform: "
            f"{_e(comparison.differences_text())} ({_e(comparison.method_text())}).</p>"
        )
    lines.append(f"<p class='eval-source'>Evaluated on: {_e(metrics.eval_source_text)}.</p>")
    rounds = rounds_text(metrics.rounds)
    lines.append(
        f"<p class='calibration'>W{_e(metrics.fit_text[1:])}"
        + (f"; plan re-solved in its context, {_e(rounds)}" if rounds else "")
        + ".</p>"
    )
    return lines


def _latency_section(result: Result, images: Mapping[str, bytes]) -> list[str]:
    """FP32, uniform and mixed: predicted from the latency table against measured end to end,
    with the table's provenance and notes; nothing without a latency table."""
    figures = result.metrics.latency
    if figures is None:
        return []
    shape = "x".join(map(str, figures.input_shape))
    source = "measured in this job" if figures.measured_in_job else "stored"
    intro = (
        f"<p>Latency on {_e(figures.runtime_version)} ({_e(figures.runtime)}), input {shape}, "
        f"from the latency table {_e(figures.table_id or '')} ({source}): predicted is the sum "
        "of the plan's layer entries plus what no layer entry covers; measured is the exported "
        "model run end to end (median).</p>"
    )
    if figures.budget_ms is not None:
        intro += f"<p>Latency budget: {figures.budget_ms:.4f} ms predicted.</p>"
    rows = []
    for entry in figures.plans:
        name = entry.plan if entry.weight_bits is None else f"uniform W{entry.weight_bits}"
        measured = "-" if entry.measured_ms is None else f"{entry.measured_ms:.4f}"
        ratio = (
            "-"
            if entry.measured_ms is None or not entry.predicted_ms
            else f"{entry.measured_ms / entry.predicted_ms:.3f}"
        )
        cells = [name, f"{entry.predicted_ms:.4f}", measured, ratio, _number(entry.metric)]
        rows.append(([*cells, _e(entry.error or "")], "mixed" if entry.plan == "mixed" else ""))
    head = ["plan", "predicted ms", "measured ms", "measured / predicted", "metric", "note"]
    section = ["<h2>Latency</h2>", intro, _table(head, rows, escape=False)]
    section += [f"<p>Note: {_e(note)}</p>" for note in figures.notes]
    if "latency" in images:
        section.append(_image(images["latency"], "Quality against latency"))
    return section


def _points_table(report: Report) -> str:
    keys = list(report.fp32.scores or {})
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
            *(_number((point.scores or {}).get(key)) for key in keys),
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
    methods = list(sensitivities(allocation))
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


def _float_section(floating: Sequence[FloatLayer]) -> list[str]:
    """The weight layers the job left in float and why; nothing when it quantized them all."""
    if not floating:
        return []
    rows = [([layer.name, layer.type, str(layer.params), layer.reason], "") for layer in floating]
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
