"""Markdown table cells and rows for the service benches' reports (service load, abuse).

One writer, so a row with a missing cell fails the bench instead of shifting a column of the
tables docs/benchmarks.md quotes.

Imports nothing beyond the standard library.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub markdown table; every row must have one cell per header."""
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} headers")
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    """Seconds as a milliseconds cell; "n/a" for a figure that was never measured (nan)."""
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f}"
