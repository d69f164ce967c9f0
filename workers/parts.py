"""Other Celery workers computing parts of a running job's statistics (`allocator.split`).

A job with `statistics_parts` above 1 asks for help with one `bitplan.statistics_part` message
per part on its own queue (last part first: the job itself starts from the first), then works
through the parts itself. Whoever computes a part holds its claim: a Redis key on the broker,
set only if absent and expiring `lease_seconds` after its last renewal, so the claim of a
helper that died lapses and the job takes the part back. Parts are handed over through the
deployment's shared cache (`db.cache.StoreCache`), under keys of the job's content.

A helper does nothing for a job that is no longer running (a message that arrives late, a job
that ended or was cancelled) or for a part someone holds; a helper that fails gives its claim
back at once and logs why: the job computes that part itself. Nothing here ends or fails the
job, whose row only its own worker writes.
"""

from __future__ import annotations

import logging
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import redis
from sqlalchemy.orm import Session, sessionmaker

from allocator.cache import Cache
from allocator.job import JobStatus
from allocator.prepare import help_with_part
from db import repositories
from db.store import ArtifactStore
from workers.record import runnable_spec
from workers.runner import job_status
from workers.settings import WorkerSettings

log = logging.getLogger(__name__)

CLAIM_PREFIX = "bitplan:statistics-part"


class RedisBoard:
    """`allocator.split.Board` for one job, with its claims in Redis."""

    def __init__(
        self,
        client: redis.Redis,
        cache: Cache,
        job_id: str,
        holder: str,
        lease_seconds: float,
        send: Callable[[int, int], None] = lambda _part, _parts: None,
    ) -> None:
        """`send(part, parts)` posts one help request to other workers; `holder` names this
        process in the claims it takes."""
        self.client = client
        self.cache = cache
        self.scope = job_id
        self.holder = holder
        self.lease = max(1, math.ceil(lease_seconds))
        self.send = send
        self._renewed: dict[int, float] = {}

    def dispatch(self, parts: int) -> None:
        try:
            for part in reversed(range(parts)):
                self.send(part, parts)
        except Exception as error:  # no helpers then: the job computes every part itself
            log.warning("job %s: could not ask for help with its statistics: %s", self.scope, error)

    def claim(self, part: int, parts: int) -> bool:
        taken = bool(self.client.set(self._key(part, parts), self.holder, nx=True, ex=self.lease))
        if taken:
            self._renewed[part] = time.monotonic()
        return taken

    def renew(self, part: int, parts: int) -> None:
        """Push the claim's expiry back, at most every third of a lease (called per layer).
        Read-then-extend is not atomic: if the claim had lapsed and another worker took it,
        both compute the same part and write the same value, which is harmless."""
        if time.monotonic() - self._renewed.get(part, 0.0) < self.lease / 3:
            return
        key = self._key(part, parts)
        if self.client.get(key) == self.holder.encode():
            self.client.expire(key, self.lease)
        self._renewed[part] = time.monotonic()

    def release(self, part: int, parts: int) -> None:
        """Give a claim back before its lease runs out (a helper that failed)."""
        key = self._key(part, parts)
        if self.client.get(key) == self.holder.encode():
            self.client.delete(key)

    def _key(self, part: int, parts: int) -> str:
        return f"{CLAIM_PREFIX}:{self.scope}:{parts}:{part}"


def help_job(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    board: RedisBoard,
    part: int,
    parts: int,
    settings: WorkerSettings,
) -> str:
    """Compute one part of a running job's statistics if nobody has; what happened, for the
    worker's log."""
    job_id = board.scope
    if job_status(sessions, job_id) != JobStatus.RUNNING:
        return "job not running"
    if not board.claim(part, parts):
        return "taken"
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix=f"bitplan-{job_id}-part-") as workdir:
            with sessions() as session:
                job = repositories.job_by_id(session, job_id=job_id)
                if job is None:
                    return "job gone"
                spec = runnable_spec(
                    session, store, job, Path(workdir), settings.allowed_input_roots
                )
            if spec.device is None:
                spec = replace(spec, device=settings.device)
            computed = help_with_part(spec, part, board, settings.limits)
    except Exception:
        board.release(part, parts)
        log.exception("job %s: statistics part %d/%d failed here", job_id, part + 1, parts)
        return "failed"
    outcome = "computed" if computed else "already done"
    log.info(
        "job %s: statistics part %d/%d %s in %.1f s",
        job_id,
        part + 1,
        parts,
        outcome,
        time.perf_counter() - started,
    )
    return outcome
