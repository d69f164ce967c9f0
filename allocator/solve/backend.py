"""What a solver backend is: given the resource limits of one budget, a plan and what it proved.

Each backend (allocator/solve/highs.py, allocator/solve/cbc.py) is built once per program and
answers many budgets, since only the right-hand sides of the resource rows change between them.
`status` is what the solver proved: "optimal" (gap <= rel_gap), "feasible" (stopped by the time
limit with a plan; the gap says how far from proven), "infeasible" (no plan meets both limits),
"unknown" (stopped before any plan; nothing proven).

Imports numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from allocator.solve.program import Status


@dataclass(frozen=True)
class Outcome:
    """A backend's answer: one column per group (None without a plan) and the proven bound."""

    status: Status
    columns: np.ndarray | None
    bound: float


class SolverError(RuntimeError):
    """The solver failed (not: proved infeasible, or ran out of time); try the other one."""


class Backend(Protocol):
    name: str

    def solve(
        self, limit: np.ndarray, start: np.ndarray | None, rel_gap: float, time_limit: float
    ) -> Outcome: ...


def relative_gap(objective: float, bound: float) -> float:
    """(objective - bound) / max(|objective|, |bound|); 0 when the bound meets the plan."""
    if not math.isfinite(bound):
        return math.inf
    if objective - bound <= 0:
        return 0.0
    return (objective - bound) / max(abs(objective), abs(bound))
