"""Bounds on what one job may make a machine do: the operator's, never the tenant's.

A job spec says what a tenant wants; these say what the machine running it will allow. They are
plain values so the worker (from its environment, `workers.settings`), the API (checking an
upload before storing it) and a benchmark can hand the same bounds to the readers and the
pipeline. `bitplan run` on a user's own machine uses the defaults, which only stop inputs no
real job has (a decompression bomb, a model that cannot fit).

Never imports torch, the web, database or queue layers.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30


@dataclass(frozen=True)
class Limits:
    """`max_dataset_bytes` bounds the decompressed size of one dataset file (what reading it
    would allocate); `max_job_memory_bytes` bounds a job's estimated peak memory."""

    max_dataset_bytes: int = 2 * GIB
    max_job_memory_bytes: int = 16 * GIB
