"""How the workers are configured: one frozen value read from `BITPLAN_*` environment variables.

The API process, `bitplan serve`, `bitplan worker` and every Celery child read the same
variables, so a deployment is configured once in its environment. The service's own settings
may build a `WorkerSettings` from its fields instead; nothing here reads a file.

Never import FastAPI, torch or Celery here: the service imports this to choose an executor.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from enum import StrEnum
from pathlib import Path
from typing import TypeVar

from allocator.errors import BadSpec
from allocator.job import MAX_DEVICE_INDEX, check_device
from allocator.limits import Limits

INTERACTIVE_QUEUE = "interactive"
BATCH_QUEUE = "batch"
GPU_QUEUE = "gpu"
"""Jobs that want a GPU: served by `bitplan worker --queue gpu --device cuda` on a GPU host."""
QUEUES = (INTERACTIVE_QUEUE, BATCH_QUEUE, GPU_QUEUE)
"""The queues a job may name; a job in any other queue is never sent to a Celery worker."""
CPU_QUEUES = (INTERACTIVE_QUEUE, BATCH_QUEUE)
"""What `bitplan worker` serves unless told otherwise; a worker on a GPU also serves `gpu`."""
LATENCY_QUEUE = "latency"
"""Where latency-table requests go unless they name another of `latency_queues`: a platform
starts `bitplan worker --queue latency` on the machines it wants timings of."""

DEFAULT_CACHE_MAX_BYTES = 20 * 2**30
"""20 GiB, as `allocator.cache.DEFAULT_MAX_BYTES` (not imported: that module loads torch)."""

T = TypeVar("T")


class ExecutorKind(StrEnum):
    INLINE = "inline"
    CELERY = "celery"


@dataclass(frozen=True)
class WorkerSettings:
    """Defaults suit one laptop running `bitplan serve`; a fleet sets the broker and executor.

    The lease is short enough that a killed worker's job is back in the queue within a minute
    and long enough that a busy machine's heartbeat (every third of it) does not miss it. The
    time limit bounds one attempt of the slowest job we expect (a Hessian sweep of a large model
    overnight); the broker's visibility timeout is derived from it.
    """

    executor: ExecutorKind = ExecutorKind.INLINE
    broker_url: str = "redis://127.0.0.1:6379/0"
    inline_workers: int = 1
    lease_seconds: float = 60.0
    sweep_seconds: float = 10.0
    poll_seconds: float = 1.0
    job_time_limit: float = 6 * 3600.0
    limits: Limits = field(default_factory=Limits)
    """What one job may make the machine do (`BITPLAN_MAX_*`), checked by the API at submit
    and again by the worker that runs the job."""
    allowed_input_roots: tuple[Path, ...] = ()
    """Server folders whose files a job may name by path (anything else must be uploaded);
    checked where the file is opened, so a worker refuses what the API would have refused."""
    cache_max_bytes: int = DEFAULT_CACHE_MAX_BYTES
    """The bound of the cache of computed values the service's workers share
    (`BITPLAN_CACHE_MAX_BYTES`, `db.cache.StoreCache`); least recently used entries go first."""
    device: str = "cpu"
    """Where this worker runs the jobs whose spec names no device (`BITPLAN_DEVICE`, `bitplan
    worker --device`): "cpu", "cuda" or "cuda:N" (`allocator.device`)."""
    latency_queues: tuple[str, ...] = (LATENCY_QUEUE,)
    """Queues latency-table requests may name (`BITPLAN_LATENCY_QUEUES`, comma-separated), one
    per kind of target machine (`latency`, `latency-arm`, ...): the API and the workers read
    the same list, so both declare the same queues."""

    @property
    def worker_queues(self) -> tuple[str, ...]:
        """Every queue a worker may serve: the jobs' and the latency requests'."""
        return (*QUEUES, *(q for q in self.latency_queues if q not in QUEUES))

    @property
    def heartbeat_seconds(self) -> float:
        return self.lease_seconds / 3

    @property
    def soft_time_limit(self) -> float:
        """A minute before the hard limit, so the job is failed and recorded, not just killed."""
        return max(self.job_time_limit - 60.0, self.job_time_limit * 0.9)

    @property
    def visibility_timeout(self) -> float:
        """Redis redelivers an unacknowledged message after this; it must outlast any job, or a
        running job's message would be handed to a second worker (which would then do nothing,
        but would hold a slot while waiting for it)."""
        return self.job_time_limit + 3600.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> WorkerSettings:
        defaults = cls()
        return cls(
            executor=_parse(environ, "BITPLAN_EXECUTOR", ExecutorKind, defaults.executor),
            broker_url=environ.get("BITPLAN_BROKER_URL") or defaults.broker_url,
            inline_workers=_parse(
                environ, "BITPLAN_INLINE_WORKERS", _positive_int, defaults.inline_workers
            ),
            lease_seconds=_parse(
                environ, "BITPLAN_LEASE_SECONDS", _positive, defaults.lease_seconds
            ),
            sweep_seconds=_parse(
                environ, "BITPLAN_SWEEP_SECONDS", _positive, defaults.sweep_seconds
            ),
            poll_seconds=_parse(environ, "BITPLAN_POLL_SECONDS", _positive, defaults.poll_seconds),
            job_time_limit=_parse(
                environ, "BITPLAN_JOB_TIME_LIMIT", _positive, defaults.job_time_limit
            ),
            limits=_limits(environ, defaults.limits),
            allowed_input_roots=_parse(
                environ, "BITPLAN_ALLOWED_INPUT_ROOTS", _paths, defaults.allowed_input_roots
            ),
            cache_max_bytes=_parse(
                environ, "BITPLAN_CACHE_MAX_BYTES", _positive_int, defaults.cache_max_bytes
            ),
            device=_parse(environ, "BITPLAN_DEVICE", _device, defaults.device),
            latency_queues=_parse(
                environ, "BITPLAN_LATENCY_QUEUES", _queue_names, defaults.latency_queues
            ),
        )


def _positive(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise ValueError("must be above 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError("must be at least 1")
    return value


def time_limit_error(seconds: float) -> str:
    """Why a job that ran past the workers' wall-clock limit failed, and what to change."""
    return (
        f"the job ran past its time limit of {seconds:g} s (BITPLAN_JOB_TIME_LIMIT on the "
        "workers); lower calib_samples or eval_samples, or use fewer bits or methods"
    )


def _limits(environ: Mapping[str, str], defaults: Limits) -> Limits:
    """Each field of `Limits` from `BITPLAN_<FIELD>`, parsed as its default's type."""
    values = {}
    for limit in fields(Limits):
        default = getattr(defaults, limit.name)
        parse = _positive_int if isinstance(default, int) else _positive
        values[limit.name] = _parse(environ, f"BITPLAN_{limit.name.upper()}", parse, default)
    return Limits(**values)


def _queue_names(text: str) -> tuple[str, ...]:
    """Comma-separated queue names: letters, digits, '-' and '_'."""
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    if not names or not all(
        name.replace("-", "").replace("_", "").isalnum() and len(name) <= 64 for name in names
    ):
        raise ValueError("must be comma-separated queue names of letters, digits, - and _")
    return names


def _device(text: str) -> str:
    """A device a job may run on (`allocator.job.check_device`: cpu, cuda or cuda:N)."""
    try:
        check_device(text)
    except BadSpec:
        raise ValueError(f"must be cpu, cuda or cuda:N with N in 0..{MAX_DEVICE_INDEX}") from None
    return text


def _paths(text: str) -> tuple[Path, ...]:
    """A JSON list of folders (what `bitplan serve --allow-path` writes), or one folder."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = [text]
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise ValueError("must be a JSON list of folders")
    return tuple(Path(item).expanduser().resolve() for item in value)


def _parse(environ: Mapping[str, str], name: str, parse: Callable[[str], T], default: T) -> T:
    """The variable parsed, the default when unset or empty; a bad value names the variable,
    because a worker that silently fell back to a default would run with a config nobody set."""
    text = environ.get(name)
    if not text:
        return default
    try:
        return parse(text)
    except ValueError as error:
        raise ValueError(f"{name}={text!r} is not valid: {error}") from None
