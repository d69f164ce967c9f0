"""The CBC backend (the fallback, or `solver="cbc"`): the program as a PuLP model.

The same columns as the HiGHS model, through `PULP_CBC_CMD`, warm-started from the greedy plan.
PuLP reports "Optimal" for a run stopped by its time limit, so the status comes from
`prob.sol_status` and the bound from CBC's log. CBC's Cgl preprocessing is off: on a 3-layer
program it fixed the optimal column to zero and still reported "Optimal" (regression case in
tests/test_solve.py).

Imports PuLP (which bundles CBC).
"""

from __future__ import annotations

import math
import re
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pulp

from allocator.solve.backend import Outcome
from allocator.solve.program import FEASIBILITY_TOL, Program, Status

_UNBOUNDED = 2.0
"""Right-hand side of a scaled resource row with no limit: every plan uses at most 1."""


class CbcBackend:
    """The program as a PuLP model solved by the bundled CBC; bounds come from CBC's log."""

    name = "cbc"
    _PARTIAL = re.compile(r"best possible (\S+)\)")
    _GAP_EXIT = re.compile(r"Exiting as integer gap of (\S+)")

    def __init__(self, program: Program) -> None:
        self.program = program
        self.prob = pulp.LpProblem("bit_allocation", pulp.LpMinimize)
        self.x = [
            self.prob.add_variable(f"x{i}", cat=pulp.LpBinary)
            for i in range(len(program.col_group))
        ]
        self.prob += pulp.LpAffineExpression(
            zip(self.x, (program.col_cost * program.cost_scale).tolist(), strict=True)
        )
        for group, (lo, hi) in enumerate(zip(program.starts[:-1], program.starts[1:], strict=True)):
            self.prob += pulp.lpSum(self.x[lo:hi]) == 1, f"group{group}"
        self.rows = []
        for resource, coefficients in enumerate((program.col_use / program.scale).T.tolist()):
            row = pulp.LpAffineExpression(zip(self.x, coefficients, strict=True)) <= _UNBOUNDED
            self.prob += row, f"resource{resource}"
            self.rows.append(row)

    def solve(
        self, limit: np.ndarray, start: np.ndarray | None, rel_gap: float, time_limit: float
    ) -> Outcome:
        program = self.program
        for resource, row in enumerate(self.rows):
            finite = math.isfinite(limit[resource])
            row.changeRHS(limit[resource] / program.scale[resource] if finite else _UNBOUNDED)
        chosen = set() if start is None else set(start.tolist())
        for i, variable in enumerate(self.x):
            variable.setInitialValue(1 if i in chosen else 0)
        with tempfile.TemporaryDirectory() as folder:
            log_path = Path(folder) / "cbc.log"
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", "PULP_CBC_CMD is deprecated", DeprecationWarning)
                command = pulp.PULP_CBC_CMD(
                    msg=False,
                    timeLimit=time_limit,
                    gapRel=rel_gap,
                    warmStart=start is not None,
                    logPath=str(log_path),
                    timeMode="elapsed",
                    options=[
                        "preprocess off",
                        f"primalTolerance {FEASIBILITY_TOL}",
                        f"integerTolerance {FEASIBILITY_TOL}",
                    ],
                )
            self.prob.solve(command)
            cbc_log = log_path.read_text() if log_path.exists() else ""
        if self.prob.sol_status == pulp.LpSolutionInfeasible:
            return Outcome("infeasible", None, math.inf)
        if self.prob.sol_status not in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible):
            return Outcome("unknown", None, -math.inf)
        x = np.array([variable.value() or 0.0 for variable in self.x])
        columns = program.best_per_group(-x)
        objective = program.cost(columns)
        proven: Status = "optimal" if self.prob.sol_status == pulp.LpSolutionOptimal else "feasible"
        return Outcome(proven, columns, self._bound(cbc_log, objective, proven))

    def _bound(self, cbc_log: str, objective: float, proven: Status) -> float:
        """CBC's best bound: from a stopped search, from a gap-tolerance exit, or the optimum."""
        scale = self.program.cost_scale
        partial = self._PARTIAL.findall(cbc_log)
        if partial:
            return float(partial[-1]) / scale
        gap_exit = self._GAP_EXIT.findall(cbc_log)
        if gap_exit:
            return objective - float(gap_exit[-1]) / scale
        return objective if proven == "optimal" else -math.inf
