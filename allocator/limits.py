"""Bounds on what one job may make a machine do: the operator's, never the tenant's.

A job spec says what a tenant wants; these say what the machine running it will allow. They are
plain values so the worker (from its environment, `workers.settings`), the API (checking a spec
or an upload before storing it) and a benchmark hand the same bounds to the readers and the
pipeline. `bitplan run` on a user's own machine uses the defaults, which only stop inputs no real
job has (a decompression bomb, a model that cannot fit, a solver limit of a day).

Never imports torch, the web, database or queue layers.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """Each field is read by the workers and the API from `BITPLAN_<FIELD>` (upper case)."""

    max_dataset_bytes: int = 2 * GIB
    """Decompressed size of one dataset file: what reading it would allocate."""
    max_job_memory: int = 16 * GIB
    """Bytes a job's estimated peak memory may reach (`allocator.memory`)."""
    max_calib_samples: int = 50_000
    max_eval_samples: int = 1_000_000
    max_batch_size: int = 1024
    max_solver_seconds: float = 3600.0
    """A job's `time_limit`: the solver's, per solve."""
