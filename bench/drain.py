"""The drain of the service load bench: queued jobs run by Celery worker processes, counted
from the database for lost and duplicated runs, the delivery guarantees the figures are about.

Imports SQLAlchemy and bitplan's db models when a drain runs; never tests.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

from bench.deploy import Deployment

DRAIN_HEADERS = (
    "jobs",
    "workers",
    "worker start s",
    "drain s",
    "jobs/s",
    "jobs/s once ready",
    "succeeded",
    "lost (target 0)",
    "duplicated (target 0)",
)


@dataclass(frozen=True)
class DrainResult:
    """How a queue of jobs ended: counts by outcome and the seconds it took."""

    jobs: int
    workers: int
    worker_start_seconds: float
    seconds: float
    succeeded: int
    ended_other: int
    unfinished: int
    duplicated: int

    @property
    def lost(self) -> int:
        return self.jobs - self.succeeded

    @property
    def jobs_per_second(self) -> float:
        return self.succeeded / self.seconds if self.seconds > 0 else math.nan

    @property
    def jobs_per_second_ready(self) -> float:
        """Counting from both workers ready (a few jobs may already have run by then)."""
        running = self.seconds - self.worker_start_seconds
        return self.succeeded / running if running > 0 else math.nan


def drain_row(result: DrainResult) -> list:
    """`result` as one row under `DRAIN_HEADERS`."""
    return [
        result.jobs,
        result.workers,
        f"{result.worker_start_seconds:.1f}",
        f"{result.seconds:.1f}",
        f"{result.jobs_per_second:.1f}",
        f"{result.jobs_per_second_ready:.1f}",
        result.succeeded,
        f"{result.lost} ({result.ended_other} failed/cancelled, {result.unfinished} unfinished)",
        result.duplicated,
    ]


def drain(
    deployment: Deployment, database_url: str, job_ids: list[str], workers: int, timeout: float
) -> DrainResult:
    """Start `workers` on `deployment` and wait (up to `timeout` seconds) until every one of
    `job_ids` has ended; then count how each ended and which ran more than once."""
    from sqlalchemy import func, select

    from allocator.job import TERMINAL_STATUSES, JobStatus
    from db.models import Job, Result
    from db.session import make_engine, make_session_factory

    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    try:
        started = time.perf_counter()
        deployment.start_workers(workers)
        worker_start = time.perf_counter() - started

        def ended() -> int:
            with sessions() as session:
                return (
                    session.scalar(
                        select(func.count())
                        .select_from(Job)
                        .where(Job.id.in_(job_ids), Job.status.in_(TERMINAL_STATUSES))
                    )
                    or 0
                )

        deadline = started + timeout
        while ended() < len(job_ids) and time.perf_counter() < deadline:
            time.sleep(0.5)
        seconds = time.perf_counter() - started
        time.sleep(2.0)  # a late duplicate run would show up as a second attempt by now
        with sessions() as session:
            rows = session.execute(
                select(Job.status, Job.attempts).where(Job.id.in_(job_ids))
            ).all()
            multi_results = session.scalar(
                select(func.count()).select_from(
                    select(Result.job_id)
                    .where(Result.job_id.in_(job_ids))
                    .group_by(Result.job_id)
                    .having(func.count() > 1)
                    .subquery()
                )
            )
            ran_twice = sum(attempts > 1 for _, attempts in rows)
    finally:
        engine.dispose()
    succeeded = sum(status is JobStatus.SUCCEEDED for status, _ in rows)
    unfinished = sum(status not in TERMINAL_STATUSES for status, _ in rows)
    return DrainResult(
        jobs=len(job_ids),
        workers=workers,
        worker_start_seconds=worker_start,
        seconds=seconds,
        succeeded=succeeded,
        ended_other=len(job_ids) - succeeded - unfinished,
        unfinished=unfinished,
        duplicated=ran_twice + (multi_results or 0),
    )
