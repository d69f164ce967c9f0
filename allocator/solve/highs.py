"""The HiGHS backend (the default): the program as one highspy model, LP shortcut, then MIP.

The model goes to highspy directly as column-wise numpy arrays; budgets only move the resource
rows' bounds, so `solve_budgets` keeps one model. Built this way it costs a small fraction of building
a PuLP model and having PuLP translate it to HiGHS (docs/design.md has the figures).

HiGHS first solves the LP relaxation. Rounding it (each group takes the leanest width the LP
uses, then greedy upgrades while the budget allows), and re-solving the LP with each fractional
group fixed to each width it uses, gives plans; when the best is within `rel_gap` of the LP
bound, that LP bound is the proof and the MIP is skipped. Otherwise the MIP runs, warm-started
from the best plan, with HiGHS's RINS/RENS sub-MIPs off: with a warm start they only cost time
(they more than doubled the re-solve p99; docs/design.md).

HiGHS checks its time limit only between some steps of the MIP root, so one step can run far
past the limit on a large program with both a size and a BOPs budget at a tight gap (upstream
ERGO-Code/HiGHS#885, #2226; docs/design.md). The LP shortcut avoids the MIP in the cases
measured; the warning "overran its time limit" in the log says when it did not.

Imports highspy when a backend is built, so CBC still works without it.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any

import numpy as np

from allocator.solve.backend import Outcome, SolverError, relative_gap
from allocator.solve.heuristics import cheaper, fill, weighted_use
from allocator.solve.program import FEASIBILITY_TOL, RESOURCES, Program

log = logging.getLogger(__name__)


class HighsBackend:
    """The program as one highspy model; budgets only move the resource rows' upper bounds."""

    name = "highs"

    def __init__(self, program: Program) -> None:
        import highspy

        self._hs = highspy
        self.program = program
        status = highspy.HighsModelStatus
        self._infeasible = {status.kInfeasible, status.kUnboundedOrInfeasible}
        self._stopped = {
            status.kTimeLimit,
            status.kIterationLimit,
            status.kSolutionLimit,
            status.kInterrupt,
        }
        self.highs = _quiet_highs(highspy)
        for option, setting in {
            "output_flag": False,
            "primal_feasibility_tolerance": FEASIBILITY_TOL,
            "mip_feasibility_tolerance": FEASIBILITY_TOL,
            "mip_heuristic_run_rins": False,
            "mip_heuristic_run_rens": False,
        }.items():
            self.highs.setOptionValue(option, setting)
        self._check(self.highs.passModel(self._model()), "passModel")

    def _model(self) -> Any:
        """Column-wise: every column has a 1 in its group's row and its resource shares."""
        program, highspy = self.program, self._hs
        groups, columns = len(program.groups), len(program.col_group)
        per_column = 1 + RESOURCES
        index = np.empty((columns, per_column), dtype=np.int32)
        index[:, 0] = program.col_group
        index[:, 1:] = groups + np.arange(RESOURCES, dtype=np.int32)
        value = np.empty((columns, per_column))
        value[:, 0] = 1.0
        value[:, 1:] = program.col_use / program.scale
        lp = highspy.HighsLp()
        lp.num_col_ = columns
        lp.num_row_ = groups + RESOURCES
        lp.col_cost_ = program.col_cost * program.cost_scale
        lp.col_lower_ = np.zeros(columns)
        lp.col_upper_ = np.ones(columns)
        lp.row_lower_ = np.r_[np.ones(groups), np.full(RESOURCES, -np.inf)]
        lp.row_upper_ = np.r_[np.ones(groups), np.full(RESOURCES, np.inf)]
        lp.a_matrix_.format_ = highspy.MatrixFormat.kColwise
        lp.a_matrix_.start_ = np.arange(0, per_column * columns + 1, per_column, dtype=np.int32)
        lp.a_matrix_.index_ = index.ravel()
        lp.a_matrix_.value_ = value.ravel()
        lp.integrality_ = [highspy.HighsVarType.kInteger] * columns
        return lp

    def solve(
        self, limit: np.ndarray, start: np.ndarray | None, rel_gap: float, time_limit: float
    ) -> Outcome:
        program, highs = self.program, self.highs
        deadline = time.perf_counter() + time_limit
        for resource in range(RESOURCES):
            upper = limit[resource] / program.scale[resource]
            highs.changeRowBounds(len(program.groups) + resource, -np.inf, upper)
        relaxation = self._relax(deadline)
        if relaxation in self._infeasible:
            return Outcome("infeasible", None, math.inf)
        if relaxation == self._hs.HighsModelStatus.kOptimal:
            bound = highs.getInfo().objective_function_value / program.cost_scale
            start = cheaper(program, start, self._dive(limit, deadline))
            if start is not None and relative_gap(program.cost(start), bound) <= rel_gap:
                return Outcome("optimal", start, bound)
        return self._mip(start, rel_gap, deadline)

    def _relax(self, deadline: float) -> Any:
        """Solve the LP relaxation (warm from the last basis) and return its model status."""
        self.highs.setOptionValue("solve_relaxation", True)
        self.highs.setOptionValue("time_limit", max(deadline - time.perf_counter(), 0.0))
        self._check(self.highs.run(), "LP relaxation")
        return self.highs.getModelStatus()

    def _dive(self, limit: np.ndarray, deadline: float) -> np.ndarray | None:
        """The best plan rounded from the LP optimum and from one dive per fractional column.

        Rounding a fractional group down can lose one group's cost range; fixing that group to
        each width the LP uses and re-solving the LP (a few warm dual simplex steps) lets the LP
        pay for the rounding elsewhere. Leaves every column bound as it found it.
        """
        program, highs = self.program, self.highs
        x = np.asarray(highs.getSolution().col_value)
        best = fill(program, self._round(limit), limit)
        fractional = np.nonzero((x > FEASIBILITY_TOL) & (x < 1 - FEASIBILITY_TOL))[0]
        for column in fractional:
            group = program.col_group[column]
            others = np.setdiff1d(
                np.arange(program.starts[group], program.starts[group + 1]), column
            ).astype(np.int32)
            zeros = np.zeros(len(others))
            highs.changeColsBounds(len(others), others, zeros, zeros)
            if self._relax(deadline) == self._hs.HighsModelStatus.kOptimal:
                best = cheaper(program, best, fill(program, self._round(limit), limit))
            highs.changeColsBounds(len(others), others, zeros, np.ones(len(others)))
        return best

    def _round(self, limit: np.ndarray) -> np.ndarray:
        """Every group's leanest column among those the current LP solution uses."""
        x = np.asarray(self.highs.getSolution().col_value)
        key = np.where(x > FEASIBILITY_TOL, weighted_use(self.program, limit), np.inf)
        return self.program.best_per_group(key)

    def _mip(self, start: np.ndarray | None, rel_gap: float, deadline: float) -> Outcome:
        program, highs = self.program, self.highs
        highs.setOptionValue("solve_relaxation", False)
        highs.setOptionValue("mip_rel_gap", rel_gap)
        highs.setOptionValue("time_limit", max(deadline - time.perf_counter(), 0.0))
        if start is not None:
            x = np.zeros(len(program.col_group))
            x[start] = 1.0
            highs.setSolution(len(x), np.arange(len(x), dtype=np.int32), x)
        self._check(highs.run(), "MIP")
        if time.perf_counter() > deadline + 1.0:
            log.warning("HiGHS overran its time limit by %.1f s", time.perf_counter() - deadline)
        model_status, info = highs.getModelStatus(), highs.getInfo()
        if model_status in self._infeasible:
            return Outcome("infeasible", None, math.inf)
        found = info.primal_solution_status == self._hs.SolutionStatus.kSolutionStatusFeasible
        optimal = model_status == self._hs.HighsModelStatus.kOptimal
        if not ((optimal and found) or model_status in self._stopped):
            raise SolverError(f"HiGHS MIP ended with {highs.modelStatusToString(model_status)}")
        bound = info.mip_dual_bound / program.cost_scale
        if not found:
            return Outcome("unknown", None, bound)
        x = np.asarray(highs.getSolution().col_value)
        return Outcome("optimal" if optimal else "feasible", program.best_per_group(-x), bound)

    def _check(self, result: Any, step: str) -> None:
        if result == self._hs.HighsStatus.kError:
            raise SolverError(f"HiGHS {step} returned an error")


def _quiet_highs(highspy: Any) -> Any:
    """A Highs instance whose construction prints nothing.

    HiGHS writes a licence banner straight to file descriptor 1 when its first instance is built,
    before any option can be set, which would corrupt `bitplan run --json` on stdout. The banner
    goes to /dev/null instead (Python's own buffered stdout is flushed first and untouched).
    """
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 1)
            return highspy.Highs()
    finally:
        os.dup2(saved, 1)
        os.close(saved)
