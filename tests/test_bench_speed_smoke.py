"""`bench/speed.py --quick` runs end to end on a tiny ViT, so the speed bench cannot rot.

Slow-marked: it starts one fresh interpreter per workload (seven), as the real bench does, which
is most of its time.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from bench.speed import WORKLOADS, main


def _method_rows(report: str) -> list[list[str]]:
    """Cells of the sensitivity table's body rows (the one that follows the model's heading)."""
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("### timm:"))
    body = []
    for line in lines[start + 4 :]:
        if not line.startswith("|"):
            break
        body.append([cell.strip() for cell in line.strip("|").split("|")])
    return body


@pytest.mark.slow
def test_quick_speed_bench_reports_every_workload(tmp_path: Path) -> None:
    out = tmp_path / "speed.md"
    report = main(["--quick", "--threads", "1", "--out", str(out)])
    assert out.read_text() == report
    rows = _method_rows(report)
    assert [row[0] for row in rows] == list(WORKLOADS)
    for workload, seconds, baseline, ratio, peak, *_rest in rows:
        assert math.isfinite(float(ratio)) and float(ratio) > 0, workload
        assert float(seconds) > 0 and float(baseline) > 0 and float(peak) > 0, workload
    assert rows[0][3] == "1.00"
    assert "target <= 2x" in rows[list(WORKLOADS).index("lrp+fisher")][-1]
    assert "torch.set_num_threads(1) on" in report.splitlines()[2]
    assert "## Integer program (bench/solver_speed.py)" in report
    assert "| 10 | size+bops | highs |" in report
