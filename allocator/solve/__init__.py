"""The integer program of bit allocation, and the solvers that answer it.

A cost table (layer x bit-width -> predicted loss) and a budget decide the plan: one width per
layer, the least summed cost within the size and BOPs limits. One module per concern:

- `program`: the program itself (groups, choices, resource rows, budget limits, numerics).
- `solver`: `solve` (one budget), `solve_budgets` (many budgets, one model), `check_budget`,
  `fixed_plan`, `uniform_bits_for` and the `Solution` they return; picks a backend per budget.
- `knapsack`: the exact multiple-choice knapsack search, used when one resource binds.
- `highs`, `cbc`: the two integer-program backends behind `backend.Backend`.
- `heuristics`: the greedy plans the backends warm-start from.

Imports numpy, PuLP and highspy (lazily); the layer table only for type hints, so re-solving a
cached profile never loads torch. Never services.
"""

from allocator.solve.program import Choice, Status
from allocator.solve.solver import (
    SOLVERS,
    Solution,
    check_budget,
    fixed_plan,
    solve,
    solve_budgets,
    uniform_bits_for,
)

__all__ = [
    "SOLVERS",
    "Choice",
    "Solution",
    "Status",
    "check_budget",
    "fixed_plan",
    "solve",
    "solve_budgets",
    "uniform_bits_for",
]
