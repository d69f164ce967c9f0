"""Jobs as a tenant sees them: submit (idempotently), read, list by page, ask to cancel, results.

Every function takes the caller's `tenant` and never sees another tenant's rows. What workers
do to a job (claim, heartbeat, finish) is `db.repositories.job_leases`.

Never import FastAPI, Celery or torch here.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.orm import Session

from allocator.job import JobStatus
from db.models import Artifact, Job, ResultRow, utcnow
from db.repositories.job_leases import ArtifactRecord
from db.repositories.shared import LIVE_STATUSES, canonical_json, insert_or_existing

DEFAULT_QUEUE = "batch"
DEFAULT_MAX_ATTEMPTS = 3
MAX_PAGE_SIZE = 200


class IdempotencyConflict(Exception):
    """An idempotency key reused for a different job spec: the caller's retry logic is wrong,
    and silently returning the other job would hand it results for a request it did not make."""

    def __init__(self, job: Job) -> None:
        super().__init__(
            f"idempotency key {job.idempotency_key!r} was already used for job {job.id} "
            "with a different spec; use a new key for a new job"
        )
        self.job = job


class InvalidCursor(ValueError):
    """A pagination cursor that list_jobs did not produce."""


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    next_cursor: str | None


def create_job(
    session: Session,
    *,
    tenant: str,
    spec: Mapping[str, Any],
    queue: str = DEFAULT_QUEUE,
    priority: int = 0,
    not_before: datetime | None = None,
    idempotency_key: str | None = None,
    max_attempts: int = DEFAULT_MAX_ATTEMPTS,
    callback_url: str | None = None,
) -> tuple[Job, bool]:
    """A queued job, and whether it is new.

    With an idempotency key already used by this tenant, the earlier job comes back instead (a
    client retrying a timed-out POST must not start the work twice); a different spec under the
    same key raises IdempotencyConflict.
    """
    job = Job(
        tenant=tenant,
        spec=dict(spec),
        queue=queue,
        priority=priority,
        not_before=not_before,
        idempotency_key=idempotency_key,
        max_attempts=max_attempts,
        callback_url=callback_url,
    )
    if idempotency_key is None:
        session.add(job)
        session.commit()
        return job, True
    stored, created = insert_or_existing(
        session,
        job,
        lambda: session.scalar(
            select(Job).where(Job.tenant == tenant, Job.idempotency_key == idempotency_key)
        ),
    )
    if not created and canonical_json(stored.spec) != canonical_json(spec):
        raise IdempotencyConflict(stored)
    return stored, created


def get_job(session: Session, *, tenant: str, job_id: str) -> Job | None:
    return session.scalar(
        select(Job)
        .where(Job.id == job_id, Job.tenant == tenant)
        .execution_options(populate_existing=True)
    )


def job_by_id(session: Session, *, job_id: str) -> Job | None:
    """Any tenant's job: for the worker side, which only ever holds a job id."""
    return session.get(Job, job_id)


def list_jobs(
    session: Session,
    *,
    tenant: str,
    status: JobStatus | None = None,
    limit: int = 50,
    cursor: str | None = None,
) -> JobPage:
    """Newest first, by keyset on (created_at, id): pages stay stable while jobs are added, and
    the cost does not grow with the page number as OFFSET would."""
    limit = max(1, min(limit, MAX_PAGE_SIZE))
    query = select(Job).where(Job.tenant == tenant)
    if status is not None:
        query = query.where(Job.status == status)
    if cursor is not None:
        created_at, job_id = _decode_cursor(cursor)
        query = query.where(
            or_(Job.created_at < created_at, and_(Job.created_at == created_at, Job.id < job_id))
        )
    query = query.order_by(Job.created_at.desc(), Job.id.desc()).limit(limit + 1)
    jobs = list(session.scalars(query.execution_options(populate_existing=True)))
    if len(jobs) <= limit:
        return JobPage(jobs, None)
    last = jobs[limit - 1]
    return JobPage(jobs[:limit], _encode_cursor(last.created_at, last.id))


def request_cancel(session: Session, *, tenant: str, job_id: str) -> Job | None:
    """Cancel a queued job at once; flag a running one for its worker to stop at the next check.

    The flag is set first, in the same transaction, so a worker claiming the job concurrently
    either never gets it or sees the flag; a finished job is returned unchanged.
    """
    owned = and_(Job.id == job_id, Job.tenant == tenant)
    session.execute(
        update(Job)
        .where(owned, Job.status.in_(LIVE_STATUSES))
        .values(cancel_requested=True)
        .execution_options(synchronize_session=False)
    )
    session.execute(
        update(Job)
        .where(owned, Job.status == JobStatus.QUEUED)
        .values(status=JobStatus.CANCELLED, finished_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    session.commit()
    return get_job(session, tenant=tenant, job_id=job_id)


def get_result(session: Session, *, tenant: str, job_id: str) -> ResultRow | None:
    return session.scalar(
        select(ResultRow).join(Job, Job.id == ResultRow.job_id).where(*_owned_job(tenant, job_id))
    )


def list_artifacts(session: Session, *, tenant: str, job_id: str) -> list[Artifact]:
    return list(
        session.scalars(
            select(Artifact)
            .join(Job, Job.id == Artifact.job_id)
            .where(*_owned_job(tenant, job_id))
            .order_by(Artifact.name)
        )
    )


def get_artifact(session: Session, *, tenant: str, job_id: str, name: str) -> Artifact | None:
    return session.scalar(
        select(Artifact)
        .join(Job, Job.id == Artifact.job_id)
        .where(*_owned_job(tenant, job_id), Artifact.name == name)
    )


def add_export(
    session: Session,
    *,
    tenant: str,
    job_id: str,
    artifact: ArtifactRecord,
    check: Mapping[str, Any],
    url: str,
) -> Artifact:
    """Record an export of a succeeded job made after it finished: its artifact (named as its
    format) and its check under `metrics.exports` of the result, so the result reads as if the
    job had exported it. A concurrent export of the same job and format wins once; the loser
    gets the winner's artifact and writes nothing."""
    row = artifact.row(job_id)
    stored, created = insert_or_existing(
        session,
        row,
        lambda: get_artifact(session, tenant=tenant, job_id=job_id, name=artifact.name),
    )
    result = get_result(session, tenant=tenant, job_id=job_id)
    if created and result is not None:
        exports = {**(result.metrics.get("exports") or {}), artifact.name: dict(check)}
        result.metrics = {**result.metrics, "exports": exports}
        payload = dict(result.result)
        payload["metrics"] = {**payload.get("metrics", {}), "exports": exports}
        payload["artifacts"] = {**payload.get("artifacts", {}), artifact.name: url}
        result.result = payload
        session.commit()
    return stored


def _owned_job(tenant: str, job_id: str) -> tuple[ColumnElement[bool], ...]:
    return (Job.id == job_id, Job.tenant == tenant)


def _encode_cursor(created_at: datetime, job_id: str) -> str:
    raw = json.dumps([created_at.isoformat(), job_id]).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str) -> tuple[datetime, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        created_at, job_id = json.loads(raw)
        parsed = datetime.fromisoformat(created_at)
    except (binascii.Error, ValueError, TypeError) as error:
        raise InvalidCursor(f"not a cursor from a job listing: {cursor!r}") from error
    if parsed.tzinfo is None or not isinstance(job_id, str):
        raise InvalidCursor(f"not a cursor from a job listing: {cursor!r}")
    return parsed, job_id
