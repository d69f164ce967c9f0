"""Jobs as workers see them: claim, keep the lease, record progress, end, requeue, dispatch.

Workers are trusted and address jobs by id. Every state change is a guarded UPDATE
(`... WHERE status = 'queued'`): whoever changes the row first wins, everyone else sees that
nothing matched. On PostgreSQL the claim also takes the row with `FOR UPDATE SKIP LOCKED` so
workers never queue up behind each other; SQLite has no row locks (the clause is omitted there)
and serialises writers on its database lock instead.

Never import FastAPI, Celery or torch here.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import (
    ColumnElement,
    String,
    and_,
    case,
    cast,
    func,
    literal,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.orm import Session

from allocator.job import JobStatus
from db.models import Artifact, Job, ResultRow, UTCDateTime, utcnow
from db.repositories.shared import LIVE_STATUSES, execute_guarded


@dataclass(frozen=True)
class ArtifactRecord:
    """A file a job produced, already in the ArtifactStore (its `put_*` gives sha256, size, uri)."""

    name: str
    kind: str
    sha256: str
    size: int
    uri: str

    def row(self, job_id: str) -> Artifact:
        """The `artifacts` row that records this file for job `job_id`."""
        return Artifact(
            job_id=job_id,
            name=self.name,
            kind=self.kind,
            sha256=self.sha256,
            size=self.size,
            uri=self.uri,
        )


@dataclass(frozen=True)
class LeaseSweep:
    """Job ids whose lease expired, by where they went; requeued ones need dispatching again."""

    requeued: list[str]
    failed: list[str]
    cancelled: list[str]


@dataclass(frozen=True)
class PendingDispatch:
    """A queued job to send to the broker, with its attempt count when it was read."""

    id: str
    queue: str
    attempts: int


def claim_next_job(
    session: Session,
    *,
    worker_id: str,
    lease_seconds: float,
    queues: Collection[str] | None = None,
    now: datetime | None = None,
) -> Job | None:
    """Take the best runnable job (highest priority, then oldest) for this worker, or None.

    Exclusive on both backends: PostgreSQL locks the candidate row and skips rows other workers
    hold; on SQLite the guarded UPDATE decides, and a worker that lost the race tries the next.
    """
    now = now or utcnow()
    runnable = [
        Job.status == JobStatus.QUEUED,
        Job.cancel_requested.is_(False),
        or_(Job.not_before.is_(None), Job.not_before <= now),
    ]
    if queues is not None:
        runnable.append(Job.queue.in_(list(queues)))
    candidate_query = (
        select(Job.id)
        .where(*runnable)
        .order_by(Job.priority.desc(), Job.created_at, Job.id)
        .limit(1)
        .with_for_update(skip_locked=True)
    )
    while (candidate := session.scalar(candidate_query)) is not None:
        job = _take_lease(session, candidate, worker_id, lease_seconds, now)
        if job is not None:
            return job
    session.rollback()
    return None


def claim_job(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> Job | None:
    """Take one named job (a Celery task carries its id), or None if it is not queued any more:
    a redelivered broker message must not run a job twice."""
    now = now or utcnow()
    job = _take_lease(session, job_id, worker_id, lease_seconds, now)
    if job is None:
        session.rollback()
    return job


def heartbeat(
    session: Session,
    *,
    job_id: str,
    worker_id: str,
    lease_seconds: float,
    now: datetime | None = None,
) -> bool:
    """Extend this worker's lease; False means the lease was lost (expired and the job requeued,
    or the job ended) and the worker should stop working on it."""
    now = now or utcnow()
    extended = _update_job(
        session,
        and_(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.lease_owner == worker_id),
        lease_expires_at=now + timedelta(seconds=lease_seconds),
        heartbeat_at=now,
    )
    return bool(extended)


def update_progress(session: Session, *, job_id: str, phase: str, progress: float) -> bool:
    """Record where a running job is; False if it is not running any more.

    Progress is clamped into [0, 1] because fractions summed over layers drift past 1.0 by a
    rounding error, and that must not crash a job that is otherwise fine.
    """
    updated = _update_job(
        session,
        and_(Job.id == job_id, Job.status == JobStatus.RUNNING),
        phase=phase,
        progress=min(max(progress, 0.0), 1.0),
    )
    return bool(updated)


def is_cancel_requested(session: Session, *, job_id: str) -> bool:
    return bool(session.scalar(select(Job.cancel_requested).where(Job.id == job_id)))


def finish_job(
    session: Session,
    *,
    job_id: str,
    bit_plan: Mapping[str, Any],
    metrics: Mapping[str, Any],
    solver: Mapping[str, Any],
    result: Mapping[str, Any],
    artifacts: Sequence[ArtifactRecord] = (),
    timings: Mapping[str, Any] | None = None,
) -> bool:
    """Mark the job succeeded and store its result and artifacts, all or nothing.

    Idempotent: only a queued or running job can finish, so a second finish (a redelivered task,
    a worker whose lease expired but that completed anyway) returns False and writes nothing.
    The first complete result wins, even from a worker that lost its lease.
    """
    values = _terminal_values(JobStatus.SUCCEEDED, utcnow()) | {"progress": 1.0, "error": None}
    if timings is not None:
        values["timings"] = dict(timings)
    if _update_live_job(session, job_id, values) is None:
        session.rollback()
        return False
    session.add(
        ResultRow(
            job_id=job_id,
            bit_plan=dict(bit_plan),
            metrics=dict(metrics),
            solver=dict(solver),
            result=dict(result),
        )
    )
    session.add_all(artifact.row(job_id) for artifact in artifacts)
    session.commit()
    return True


def fail_job(
    session: Session, *, job_id: str, error: str, retryable: bool = False
) -> JobStatus | None:
    """Record a failed attempt; returns the job's new status, or None if it had already ended.

    A retryable error (a lost connection, not a bad input) queues the job again while attempts
    remain, exactly as an expired lease does; the error text is kept either way.
    """
    values = (
        _end_attempt_values(literal(error), utcnow())
        if retryable
        else _terminal_values(JobStatus.FAILED, utcnow()) | {"error": error}
    )
    status = _update_live_job(session, job_id, values)
    session.commit()
    return None if status is None else JobStatus(status)


def cancel_job(session: Session, *, job_id: str) -> bool:
    """The worker's acknowledgement that it stopped a job whose cancel flag it saw."""
    cancelled = _update_job(
        session,
        and_(Job.id == job_id, Job.status.in_(LIVE_STATUSES)),
        **_terminal_values(JobStatus.CANCELLED, utcnow()),
    )
    return bool(cancelled)


def requeue_expired_leases(session: Session, *, now: datetime | None = None) -> LeaseSweep:
    """Recover jobs whose worker stopped heartbeating (killed, lost its machine).

    Each goes back to the queue while it has attempts left, else to `failed`, so a job that
    crashes every worker it touches ends instead of looping; a job flagged for cancellation is
    cancelled. Safe to run from every worker at once: the guarded UPDATE moves each job once.
    """
    now = now or utcnow()
    error = (
        literal("lease expired: worker ")
        + func.coalesce(Job.lease_owner, "?")
        + literal(" stopped heartbeating during attempt ")
        + cast(Job.attempts, String)
    )
    rows = session.execute(
        update(Job)
        .where(Job.status == JobStatus.RUNNING, Job.lease_expires_at < now)
        .values(**_end_attempt_values(error, now))
        .returning(Job.id, Job.status)
        .execution_options(synchronize_session=False)
    ).all()
    session.commit()
    by_status: dict[JobStatus, list[str]] = {status: [] for status in JobStatus}
    for row in rows:
        by_status[JobStatus(row.status)].append(row.id)
    return LeaseSweep(
        requeued=sorted(by_status[JobStatus.QUEUED]),
        failed=sorted(by_status[JobStatus.FAILED]),
        cancelled=sorted(by_status[JobStatus.CANCELLED]),
    )


def release_job(session: Session, *, job_id: str, worker_id: str) -> bool:
    """Give a claimed job back to the queue without charging the attempt: its worker is
    shutting down on purpose, which says nothing about the job. False if this worker no longer
    holds it (the lease expired and someone else requeued or took it)."""
    released = _update_job(
        session,
        and_(Job.id == job_id, Job.status == JobStatus.RUNNING, Job.lease_owner == worker_id),
        status=JobStatus.QUEUED,
        attempts=Job.attempts - 1,
        lease_owner=None,
        lease_expires_at=None,
        dispatched_attempt=None,
    )
    return bool(released)


def jobs_to_dispatch(
    session: Session,
    *,
    queues: Collection[str],
    include_dispatched: bool = False,
    limit: int | None = 1000,
    now: datetime | None = None,
) -> list[PendingDispatch]:
    """Due queued jobs that have no broker message waiting, best priority first.

    `include_dispatched` also returns those that should have one: after the broker lost its
    data every queued job must be sent again (a job sent twice runs once, claim_job sees to it).
    """
    now = now or utcnow()
    query = select(Job.id, Job.queue, Job.attempts).where(
        Job.status == JobStatus.QUEUED,
        Job.cancel_requested.is_(False),
        Job.queue.in_(list(queues)),
        or_(Job.not_before.is_(None), Job.not_before <= now),
    )
    if not include_dispatched:
        query = query.where(
            or_(Job.dispatched_attempt.is_(None), Job.dispatched_attempt < Job.attempts)
        )
    rows = session.execute(
        query.order_by(Job.priority.desc(), Job.created_at, Job.id).limit(limit)
    ).all()
    session.rollback()
    return [PendingDispatch(row.id, row.queue, row.attempts) for row in rows]


def mark_dispatched(session: Session, *, sent: Sequence[PendingDispatch]) -> None:
    """Record that a message was sent for each job at the attempt count read before sending.

    Using the count read before the send, not the current one, keeps a job that a worker took
    and that was requeued in between marked as needing another message; the guard keeps the
    marker from moving backwards.
    """
    for job in sent:
        session.execute(
            update(Job)
            .where(
                Job.id == job.id,
                or_(Job.dispatched_attempt.is_(None), Job.dispatched_attempt < job.attempts),
            )
            .values(dispatched_attempt=job.attempts)
            .execution_options(synchronize_session=False)
        )
    session.commit()


def _take_lease(
    session: Session, job_id: str, worker_id: str, lease_seconds: float, now: datetime
) -> Job | None:
    """The guarded UPDATE at the heart of claiming: it only matches a job still queued, so of
    two workers racing for one job exactly one gets a row back."""
    job = session.scalar(
        update(Job)
        .where(Job.id == job_id, Job.status == JobStatus.QUEUED, Job.cancel_requested.is_(False))
        .values(
            status=JobStatus.RUNNING,
            lease_owner=worker_id,
            lease_expires_at=now + timedelta(seconds=lease_seconds),
            heartbeat_at=now,
            started_at=now,
            attempts=Job.attempts + 1,
            phase=None,
            progress=0.0,
        )
        .returning(Job)
        .execution_options(populate_existing=True, synchronize_session=False)
    )
    if job is not None:
        session.commit()
    return job


def _update_job(session: Session, where: ColumnElement[bool], **values: Any) -> int:
    return execute_guarded(session, update(Job).where(where).values(**values))


def _update_live_job(session: Session, job_id: str, values: Mapping[str, Any]) -> str | None:
    """Update a job only while it is queued or running; its new status, or None if it had ended.

    The status guard in the same statement is what makes finishing and failing idempotent against
    a racing worker or sweeper."""
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(LIVE_STATUSES))
        .values(**values)
        .returning(Job.status)
        .execution_options(synchronize_session=False)
    ).first()
    return None if row is None else row.status


def _terminal_values(status: JobStatus, now: datetime) -> dict[str, Any]:
    return {
        "status": status,
        "finished_at": now,
        "lease_owner": None,
        "lease_expires_at": None,
    }


def _end_attempt_values(error: ColumnElement[str], now: datetime) -> dict[str, Any]:
    """Where a job goes when an attempt ends without a result: cancelled if that was asked for,
    failed once attempts are used up, else back to the queue. Evaluated in SQL, per row, so one
    statement can sweep many jobs."""
    exhausted = Job.attempts >= Job.max_attempts
    ends = or_(Job.cancel_requested.is_(True), exhausted)
    status_type = Job.__table__.c.status.type
    return {
        "status": case(
            (Job.cancel_requested.is_(True), literal(JobStatus.CANCELLED, status_type)),
            (exhausted, literal(JobStatus.FAILED, status_type)),
            else_=literal(JobStatus.QUEUED, status_type),
        ),
        "finished_at": case((ends, literal(now, UTCDateTime())), else_=null()),
        "lease_owner": None,
        "lease_expires_at": None,
        "error": error,
    }
