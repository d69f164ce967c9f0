"""The tables: the one description of what bitplan keeps in its database.

The database row is the truth about a job (status, lease, attempts, cancel flag), so these models
must mean the same on SQLite (embedded) and PostgreSQL (distributed): timestamps are stored as
UTC and always come back timezone-aware, JSON columns use JSONB on PostgreSQL and JSON text on
SQLite, and enumerations are CHECK-constrained strings rather than native enum types so that
migrations stay plain on both. The enumerations themselves (`JobStatus`, `UploadKind`) are
`allocator.job`'s, so a client reads a job's status without SQLAlchemy.

Only `db.repositories` writes these rows. Alembic migrations in `db/migrations/versions/` must
match this module (a test compares them). Never import FastAPI, Celery or torch here.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    CheckConstraint,
    DateTime,
    Dialect,
    Enum,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    TypeDecorator,
    UniqueConstraint,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from allocator.job import JobStatus, UploadKind
from allocator.latency_table import LatencyStatus

# Deterministic constraint names, so Alembic can drop or alter them later on every backend.
NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

SHA256_HEX_LENGTH = 64


def utcnow() -> datetime:
    """The current time as an aware UTC datetime: every timestamp in the database is one."""
    return datetime.now(UTC)


def new_id() -> str:
    """A random UUID as text: ids are exposed in URLs and must not be guessable or sequential."""
    return str(uuid.uuid4())


class UTCDateTime(TypeDecorator[datetime]):
    """A timestamp that is stored as UTC and read back timezone-aware on every backend.

    SQLite has no timezone type: SQLAlchemy writes the wall-clock digits and drops the offset, so
    an aware non-UTC value would be silently shifted and values come back naive. Normalising here
    keeps comparisons (lease expiry, not-before, cursors) correct on both backends.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: pass an aware datetime (UTC)")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value.astimezone(UTC)


# JSONB on PostgreSQL (indexable, compact); JSON text elsewhere.
JSONType = JSON().with_variant(JSONB(), "postgresql")


def _string_enum(enum: type[StrEnum], name: str) -> Enum:
    """A VARCHAR with a CHECK constraint: portable, and a new member is a one-line migration."""
    return Enum(
        enum,
        name=name,
        native_enum=False,
        create_constraint=True,
        length=16,
        values_callable=lambda members: [member.value for member in members],
        validate_strings=True,
    )


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {  # noqa: RUF012 - SQLAlchemy reads this class attribute as is
        datetime: UTCDateTime(),
        dict[str, Any]: JSONType,
    }


class ApiKey(Base):
    """A bearer key; only its sha256 is stored, so a leaked database does not leak keys.

    The prefix is stored in clear to find the row without hashing against every key.
    """

    __tablename__ = "api_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    tenant: Mapped[str] = mapped_column(String(64), index=True)
    name: Mapped[str | None] = mapped_column(String(200))
    prefix: Mapped[str] = mapped_column(String(16), index=True)
    key_sha256: Mapped[str] = mapped_column(String(SHA256_HEX_LENGTH), unique=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None]


class Upload(Base):
    """A model or dataset file a tenant uploaded; the same bytes uploaded twice are one row."""

    __tablename__ = "uploads"
    __table_args__ = (UniqueConstraint("tenant", "sha256", "kind"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64))
    kind: Mapped[UploadKind] = mapped_column(_string_enum(UploadKind, "upload_kind"))
    sha256: Mapped[str] = mapped_column(String(SHA256_HEX_LENGTH))
    size: Mapped[int] = mapped_column(BigInteger)
    filename: Mapped[str | None] = mapped_column(String(255))
    uri: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Profile(Base):
    """A cached per-layer x per-bit cost table: a new budget re-solves from it with no model pass.

    Keyed per tenant (a tenant sees only its own objects, profile ids appear in URLs) by what
    determines the table: model bytes, calibration data bytes, sensitivity method and the hash of
    the remaining options.
    """

    __tablename__ = "profiles"
    __table_args__ = (
        UniqueConstraint(
            "tenant",
            "model_sha256",
            "data_sha256",
            "method",
            "options_sha256",
            name="uq_profiles_key",
        ),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64))
    model_sha256: Mapped[str] = mapped_column(String(SHA256_HEX_LENGTH))
    data_sha256: Mapped[str] = mapped_column(String(SHA256_HEX_LENGTH))
    method: Mapped[str] = mapped_column(String(64))
    options_sha256: Mapped[str] = mapped_column(String(SHA256_HEX_LENGTH))
    cost_table: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Job(Base):
    """One bit-allocation request and everything a worker fleet needs to run it exactly once.

    The lease (`lease_owner`, `lease_expires_at`, `heartbeat_at`) is how a job whose worker died
    is found and queued again; `attempts` bounds how often that happens.
    """

    __tablename__ = "jobs"
    __table_args__ = (
        UniqueConstraint("tenant", "idempotency_key"),
        CheckConstraint("progress >= 0 AND progress <= 1", name="progress_range"),
        CheckConstraint("attempts >= 0 AND max_attempts >= 1", name="attempts_range"),
        # claim_next_job: queued jobs in a queue, best priority first, oldest first.
        Index("ix_jobs_claim", "status", "queue", "priority", "created_at"),
        # list_jobs: a tenant's jobs, newest first.
        Index("ix_jobs_tenant_created", "tenant", "created_at", "id"),
        # requeue_expired_leases: running jobs by lease expiry.
        Index("ix_jobs_lease", "status", "lease_expires_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64))
    spec: Mapped[dict[str, Any]]
    status: Mapped[JobStatus] = mapped_column(
        _string_enum(JobStatus, "job_status"), default=JobStatus.QUEUED
    )
    phase: Mapped[str | None] = mapped_column(String(64))
    progress: Mapped[float] = mapped_column(default=0.0)
    # The queue routes a job to a worker pool ("interactive", "batch"); priority orders within it.
    queue: Mapped[str] = mapped_column(String(32), default="batch")
    priority: Mapped[int] = mapped_column(default=0)
    not_before: Mapped[datetime | None]
    idempotency_key: Mapped[str | None] = mapped_column(String(255))
    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=3)
    lease_owner: Mapped[str | None] = mapped_column(String(255))
    lease_expires_at: Mapped[datetime | None]
    heartbeat_at: Mapped[datetime | None]
    cancel_requested: Mapped[bool] = mapped_column(default=False)
    error: Mapped[str | None] = mapped_column(Text)
    callback_url: Mapped[str | None] = mapped_column(String(2048))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When the current (or last) attempt started: finished_at - started_at is the run that counted.
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]
    timings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # The `attempts` value when a broker message was last sent for this job. A queued job with
    # none, or whose attempts have moved past it (it ran and was requeued), has no message
    # waiting and must be dispatched again. A count, not a time, so clock skew between the
    # machines that send and claim cannot hide a job.
    dispatched_attempt: Mapped[int | None]


class ResultRow(Base):
    """The row of what a succeeded job produced (`allocator.job.Result` as stored); at most one
    per job, which makes finishing idempotent."""

    __tablename__ = "results"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(
        String(36), ForeignKey("jobs.id", ondelete="CASCADE"), unique=True
    )
    bit_plan: Mapped[dict[str, Any]]
    metrics: Mapped[dict[str, Any]]
    solver: Mapped[dict[str, Any]]
    result: Mapped[dict[str, Any]]
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Artifact(Base):
    """A named file a job produced (packed weights, bit plan, report), held in the ArtifactStore."""

    __tablename__ = "artifacts"
    __table_args__ = (UniqueConstraint("job_id", "name"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    job_id: Mapped[str] = mapped_column(String(36), ForeignKey("jobs.id", ondelete="CASCADE"))
    name: Mapped[str] = mapped_column(String(255))
    kind: Mapped[str] = mapped_column(String(64))
    sha256: Mapped[str] = mapped_column(String(SHA256_HEX_LENGTH))
    size: Mapped[int] = mapped_column(BigInteger)
    uri: Mapped[str] = mapped_column(String(1024))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CacheEntry(Base):
    """What a job computed, kept by content key (`allocator.cache`) in the store's cache
    namespace, so that every worker and API process sharing this database finds it.

    Not a tenant's row: the key hashes the weights, the data and the options, so only
    content-identical work is shared, and these bytes count against the cache's own bound
    (`BITPLAN_CACHE_MAX_BYTES`), not a tenant's storage quota. `last_used` orders eviction.
    """

    __tablename__ = "cache_entries"
    __table_args__ = (Index("ix_cache_entries_last_used", "last_used"),)

    key: Mapped[str] = mapped_column(String(SHA256_HEX_LENGTH), primary_key=True)
    uri: Mapped[str] = mapped_column(String(1024), index=True)
    size: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_used: Mapped[datetime] = mapped_column(default=utcnow)


class LatencyTableRow(Base):
    """A measured latency table (`allocator.latency_table.LatencyTable`): milliseconds per
    weight layer and choice on one runtime and machine, or the request to measure one on a
    target machine's queue (`status`).

    Keyed per tenant, like profiles, by what determines the timings: the model's content
    digest, the input shape, the runtime and its version, and the machine's fingerprint (known
    once measured, hence nullable while queued). Jobs with a latency budget name a table by id
    (`latency_table`), or measure one and store it here for later jobs.
    """

    __tablename__ = "latency_tables"
    __table_args__ = (
        Index(
            "ix_latency_tables_key",
            "tenant",
            "model_sha256",
            "input_shape",
            "runtime",
            "runtime_version",
            "machine_sha256",
        ),
        Index("ix_latency_tables_tenant_created", "tenant", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    tenant: Mapped[str] = mapped_column(String(64))
    status: Mapped[LatencyStatus] = mapped_column(
        _string_enum(LatencyStatus, "latency_status"), default=LatencyStatus.SUCCEEDED
    )
    request: Mapped[dict[str, Any]] = mapped_column(default=dict)
    """What was asked: model ref, weights, input shape, runtime, widths, repeats."""
    input_shape: Mapped[str] = mapped_column(String(64))
    runtime: Mapped[str] = mapped_column(String(32))
    queue: Mapped[str | None] = mapped_column(String(64))
    model_sha256: Mapped[str | None] = mapped_column(String(SHA256_HEX_LENGTH))
    runtime_version: Mapped[str | None] = mapped_column(String(64))
    machine_sha256: Mapped[str | None] = mapped_column(String(SHA256_HEX_LENGTH))
    table: Mapped[dict[str, Any] | None] = mapped_column(JSONType)
    error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    finished_at: Mapped[datetime | None]
    lease_expires_at: Mapped[datetime | None]
    """While running: when the measuring worker's heartbeat lapses (a sweep then fails it)."""
