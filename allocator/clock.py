"""The phases of a job as they run: each timed, each reported to the caller's `progress`.

`allocator.pipeline.run` and `allocator.prepare.prepare` time their phases with one `Clock`;
a caller that wants to cancel raises from `progress`, which stops the job at the next call.
Imports nothing of the allocator but the job's types.
"""

from __future__ import annotations

import contextlib
import resource
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from allocator.job import Progress

PROC_STATUS = Path("/proc/self/status")
PROC_CLEAR_REFS = Path("/proc/self/clear_refs")


def silent(_phase: str, _fraction: float, _message: str) -> None:
    """A `Progress` that reports nothing."""
    return None


class Clock:
    """Seconds per phase (`timings`), and `progress` called as each starts, ticks and ends.

    `phases` adds, per phase, what the seconds bought: how many times the model ran
    (`forwards`, counted on the module given to `watch`, and on its quantized copies, which
    carry the hook) over how many `samples`, and the process's peak resident memory inside the
    phase (`peak_mb`; Linux resets the peak at each phase start through
    /proc/self/clear_refs, elsewhere it is the peak so far), and on a GPU the peak of memory
    torch allocated there (`gpu_peak_mb`). Seconds alone do not tell a slow machine from a
    phase that runs the model twenty times.
    """

    def __init__(self, progress: Progress = silent) -> None:
        self.timings: dict[str, float] = {}
        self.phases: dict[str, dict[str, float | int | None]] = {}
        self.progress = progress
        self.forwards = 0
        self.samples = 0

    def watch(self, module: Any) -> None:
        """Count every call of `module` (a `torch.nn.Module`) and the samples it was given."""

        # A closure, not a bound method: `copy.deepcopy` (quantized copies of the model) keeps
        # functions as they are but would copy a bound method's clock along with the module.
        def count(_module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            self.forwards += 1
            self.samples += _batch_size([*args, *kwargs.values()])

        module.register_forward_pre_hook(count, with_kwargs=True)

    @contextmanager
    def phase(self, name: str) -> Iterator[Callable[[float, str], None]]:
        """Time the phase `name`; yields `tick(fraction, message)` for progress inside it."""
        self.progress(name, 0.0, "started")
        _reset_peak_memory()
        if (gpu := _gpu()) is not None:
            gpu.reset_peak_memory_stats()
        forwards, samples = self.forwards, self.samples
        started = time.perf_counter()
        yield lambda fraction, message: self.progress(name, fraction, message)
        self.timings[name] = round(time.perf_counter() - started, 3)
        self.phases[name] = {
            "seconds": self.timings[name],
            "forwards": self.forwards - forwards,
            "samples": self.samples - samples,
            "peak_mb": _peak_memory_mb(),
        }
        if (gpu := _gpu()) is not None:
            self.phases[name]["gpu_peak_mb"] = round(gpu.max_memory_allocated() / 2**20, 1)
        self.progress(name, 1.0, "done")


def _batch_size(values: list[Any]) -> int:
    """The leading size of the first tensor among a call's arguments (a dict of tensors
    counts by its first value)."""
    for value in values:
        if isinstance(value, dict):
            value = next(iter(value.values()), None)
        shape = getattr(value, "shape", None)
        if shape is not None and len(shape) > 0:
            return int(shape[0])
    return 0


def _gpu() -> Any | None:
    """`torch.cuda` once this process has put something on a GPU, else None; torch is only
    looked up, never imported here (the job types stay torch-free)."""
    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available() or not torch.cuda.is_initialized():
        return None
    return torch.cuda


def _reset_peak_memory() -> None:
    with contextlib.suppress(OSError):  # not Linux, or not allowed: the peak stays the process's
        PROC_CLEAR_REFS.write_text("5")


def _peak_memory_mb() -> float:
    """VmHWM (peak resident set since the last reset) in MB, else the process's peak."""
    try:
        for line in PROC_STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
