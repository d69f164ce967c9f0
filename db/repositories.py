"""The only code that writes rows: every state change of a job, key, upload or profile is here.

Each write function is one transaction and commits before it returns, so the service, the inline
executor, Celery tasks and the CLI share one definition of what a state change means. Concurrent
writers are made safe by guarded UPDATEs (`... WHERE status = 'queued'`): whoever changes the
row first wins, everyone else sees that nothing matched. On PostgreSQL the claim also takes the
row with `FOR UPDATE SKIP LOCKED` so workers never queue up behind each other; SQLite has no row
locks (the clause is omitted there) and serialises writers on its database lock instead.

Functions that take a `tenant` act for a caller of the API and never see another tenant's rows;
the others act for workers, which are trusted and address jobs by id.

Never import FastAPI, Celery or torch here.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, TypeVar

from sqlalchemy import (
    ColumnElement,
    String,
    Update,
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
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from db.models import (
    ApiKey,
    Artifact,
    Base,
    Job,
    JobStatus,
    Profile,
    Result,
    Upload,
    UploadKind,
    UTCDateTime,
    utcnow,
)

DEFAULT_QUEUE = "batch"
DEFAULT_MAX_ATTEMPTS = 3
MAX_PAGE_SIZE = 200
API_KEY_SCHEME = "bp"

_LIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
_Row = TypeVar("_Row", bound=Base)


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
class ArtifactRecord:
    """A file a job produced, already in the ArtifactStore (its `put_*` gives sha256, size, uri)."""

    name: str
    kind: str
    sha256: str
    size: int
    uri: str


@dataclass(frozen=True)
class JobPage:
    jobs: list[Job]
    next_cursor: str | None


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


@dataclass(frozen=True)
class ProfileKey:
    """What determines a cost table; equal keys mean the cached table can be reused."""

    model_sha256: str
    data_sha256: str
    method: str
    options_sha256: str

    @classmethod
    def of(
        cls, *, model_sha256: str, data_sha256: str, method: str, options: Mapping[str, Any]
    ) -> ProfileKey:
        return cls(model_sha256, data_sha256, method, canonical_sha256(options))


def canonical_sha256(value: Mapping[str, Any]) -> str:
    """A hash of JSON content that ignores key order and formatting, so equal options (or specs)
    written by different clients hash alike."""
    return hashlib.sha256(_canonical_json(value).encode()).hexdigest()


# --- jobs: the API side --------------------------------------------------------------------------


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
    stored, created = _insert_or_existing(
        session,
        job,
        lambda: session.scalar(
            select(Job).where(Job.tenant == tenant, Job.idempotency_key == idempotency_key)
        ),
    )
    if not created and _canonical_json(stored.spec) != _canonical_json(spec):
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
        .where(owned, Job.status.in_(_LIVE_STATUSES))
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


def get_result(session: Session, *, tenant: str, job_id: str) -> Result | None:
    return session.scalar(
        select(Result).join(Job, Job.id == Result.job_id).where(*_owned_job(tenant, job_id))
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


# --- jobs: the worker side -----------------------------------------------------------------------


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
    values: dict[str, Any] = {
        "status": JobStatus.SUCCEEDED,
        "finished_at": utcnow(),
        "progress": 1.0,
        "lease_owner": None,
        "lease_expires_at": None,
        "error": None,
    }
    if timings is not None:
        values["timings"] = dict(timings)
    finished = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(_LIVE_STATUSES))
        .values(**values)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    ).first()
    if finished is None:
        session.rollback()
        return False
    session.add(
        Result(
            job_id=job_id,
            bit_plan=dict(bit_plan),
            metrics=dict(metrics),
            solver=dict(solver),
            result=dict(result),
        )
    )
    session.add_all(
        Artifact(
            job_id=job_id,
            name=artifact.name,
            kind=artifact.kind,
            sha256=artifact.sha256,
            size=artifact.size,
            uri=artifact.uri,
        )
        for artifact in artifacts
    )
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
    row = session.execute(
        update(Job)
        .where(Job.id == job_id, Job.status.in_(_LIVE_STATUSES))
        .values(**values)
        .returning(Job.status)
        .execution_options(synchronize_session=False)
    ).first()
    session.commit()
    return None if row is None else JobStatus(row.status)


def cancel_job(session: Session, *, job_id: str) -> bool:
    """The worker's acknowledgement that it stopped a job whose cancel flag it saw."""
    cancelled = _update_job(
        session,
        and_(Job.id == job_id, Job.status.in_(_LIVE_STATUSES)),
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


# --- api keys ------------------------------------------------------------------------------------


def create_api_key(session: Session, *, tenant: str, name: str | None = None) -> str:
    """A new key for `tenant`, returned in clear this once; only its sha256 is stored.

    The key is `bp_<prefix>_<secret>`: the prefix finds the row and identifies the key in
    listings and revocations without revealing it. Plain sha256 suffices for 256 random bits;
    slow password hashes exist for guessable secrets.
    """
    prefix = secrets.token_hex(4)
    key = f"{API_KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(tenant=tenant, name=name, prefix=prefix, key_sha256=_sha256_hex(key)))
    session.commit()
    return key


def verify_api_key(session: Session, key: str) -> str | None:
    """The tenant a presented key belongs to, or None if it is unknown, malformed or revoked."""
    scheme, _, rest = key.partition("_")
    prefix, _, secret = rest.partition("_")
    if scheme != API_KEY_SCHEME or not prefix or not secret:
        return None
    digest = _sha256_hex(key)
    candidates = session.scalars(
        select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
    )
    for candidate in candidates:
        if hmac.compare_digest(candidate.key_sha256, digest):
            return candidate.tenant
    return None


def revoke_api_key(session: Session, *, tenant: str, prefix: str) -> bool:
    revoked = _execute_guarded(
        session,
        update(ApiKey)
        .where(ApiKey.tenant == tenant, ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow()),
    )
    return bool(revoked)


def list_api_keys(
    session: Session, *, tenant: str | None = None, prefix: str | None = None
) -> list[ApiKey]:
    """Keys oldest first, revoked ones included, optionally of one tenant or with one prefix:
    for operators, who identify a key by its prefix (the row holds no key, only its hash)."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    if prefix is not None:
        query = query.where(ApiKey.prefix == prefix)
    return list(session.scalars(query))


# --- uploads -------------------------------------------------------------------------------------


def add_upload(
    session: Session,
    *,
    tenant: str,
    kind: UploadKind,
    sha256: str,
    size: int,
    uri: str,
    filename: str | None = None,
) -> tuple[Upload, bool]:
    """The tenant's upload row for these bytes, and whether it is new: the same file uploaded
    again (a retried request, a second job on one model) is the same upload."""
    return _insert_or_existing(
        session,
        Upload(tenant=tenant, kind=kind, sha256=sha256, size=size, uri=uri, filename=filename),
        lambda: session.scalar(
            select(Upload).where(
                Upload.tenant == tenant, Upload.kind == kind, Upload.sha256 == sha256
            )
        ),
    )


def get_upload(session: Session, *, tenant: str, upload_id: str) -> Upload | None:
    return session.scalar(select(Upload).where(Upload.id == upload_id, Upload.tenant == tenant))


# --- usage: what the tenant quotas count ---------------------------------------------------------


def count_active_jobs(session: Session, *, tenant: str) -> int:
    """The tenant's queued and running jobs."""
    live = select(func.count()).where(Job.tenant == tenant, Job.status.in_(_LIVE_STATUSES))
    return int(session.scalar(live.select_from(Job)))


def stored_bytes(session: Session, *, tenant: str) -> int:
    """Bytes the tenant keeps on the server: its uploads plus its jobs' artifacts."""
    uploads = select(func.coalesce(func.sum(Upload.size), 0)).where(Upload.tenant == tenant)
    artifacts = (
        select(func.coalesce(func.sum(Artifact.size), 0))
        .join(Job, Job.id == Artifact.job_id)
        .where(Job.tenant == tenant)
    )
    return int(session.scalar(select(uploads.scalar_subquery() + artifacts.scalar_subquery())))


# --- profiles ------------------------------------------------------------------------------------


def get_profile(session: Session, *, tenant: str, key: ProfileKey) -> Profile | None:
    return session.scalar(select(Profile).where(Profile.tenant == tenant, *_profile_key(key)))


def get_profile_by_id(session: Session, *, tenant: str, profile_id: str) -> Profile | None:
    return session.scalar(select(Profile).where(Profile.id == profile_id, Profile.tenant == tenant))


def put_profile(
    session: Session, *, tenant: str, key: ProfileKey, cost_table: Mapping[str, Any]
) -> Profile:
    """Cache a cost table; if one is already cached under the key, that one is kept and
    returned (two jobs profiling the same model at once computed the same table)."""
    profile, _created = _insert_or_existing(
        session,
        Profile(
            tenant=tenant,
            model_sha256=key.model_sha256,
            data_sha256=key.data_sha256,
            method=key.method,
            options_sha256=key.options_sha256,
            cost_table=dict(cost_table),
        ),
        lambda: get_profile(session, tenant=tenant, key=key),
    )
    return profile


# --- helpers -------------------------------------------------------------------------------------


def _insert_or_existing(
    session: Session, row: _Row, existing: Callable[[], _Row | None]
) -> tuple[_Row, bool]:
    """Insert `row` unless a row with its unique key exists; a concurrent insert of the same key
    surfaces as IntegrityError, after which the winner's row is returned."""
    found = existing()
    if found is not None:
        return found, False
    session.add(row)
    try:
        session.commit()
    except IntegrityError:
        session.rollback()
        found = existing()
        if found is None:
            raise
        return found, False
    return row, True


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
    return _execute_guarded(session, update(Job).where(where).values(**values))


def _execute_guarded(session: Session, statement: Update) -> int:
    """Run one guarded UPDATE and commit; the matched row count says whether the guard held."""
    matched = session.execute(statement.execution_options(synchronize_session=False)).rowcount
    session.commit()
    return matched


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


def _owned_job(tenant: str, job_id: str) -> tuple[ColumnElement[bool], ...]:
    return (Job.id == job_id, Job.tenant == tenant)


def _profile_key(key: ProfileKey) -> tuple[ColumnElement[bool], ...]:
    return (
        Profile.model_sha256 == key.model_sha256,
        Profile.data_sha256 == key.data_sha256,
        Profile.method == key.method,
        Profile.options_sha256 == key.options_sha256,
    )


def _canonical_json(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


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
