"""The phases of a job as they run: each timed, each reported to the caller's `progress`.

`allocator.pipeline.run` and `allocator.prepare.prepare` time their phases with one `Clock`;
a caller that wants to cancel raises from `progress`, which stops the job at the next call.
Imports nothing of the allocator but the job's types.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from allocator.job import Progress


def silent(_phase: str, _fraction: float, _message: str) -> None:
    """A `Progress` that reports nothing."""
    return None


class Clock:
    """Seconds per phase (`timings`), and `progress` called as each starts, ticks and ends."""

    def __init__(self, progress: Progress = silent) -> None:
        self.timings: dict[str, float] = {}
        self.progress = progress

    @contextmanager
    def phase(self, name: str) -> Iterator[Callable[[float, str], None]]:
        """Time the phase `name`; yields `tick(fraction, message)` for progress inside it."""
        self.progress(name, 0.0, "started")
        started = time.perf_counter()
        yield lambda fraction, message: self.progress(name, fraction, message)
        self.timings[name] = round(time.perf_counter() - started, 3)
        self.progress(name, 1.0, "done")
