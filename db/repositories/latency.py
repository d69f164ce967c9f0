"""Measured latency tables, per tenant, keyed by what determines the timings (model content,
input shape, runtime and version, machine fingerprint); and requests to measure one on a target
machine's queue, which a worker there starts and finishes.

A table measured in a job, by `bitplan profile-latency` or by a worker is stored whole (the
JSON of `allocator.latency_table.LatencyTable`); `find_latency_table` hands the newest one of
a key to the next job or request that would measure the same thing.

Never import FastAPI, Celery or torch here.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, select, update
from sqlalchemy.orm import Session

from allocator.errors import BadReference
from allocator.latency_table import LatencyStatus
from db.models import LatencyTableRow, utcnow
from db.repositories.shared import execute_guarded

MAX_LISTED = 100


def put_latency_table(
    session: Session, *, tenant: str, table: Mapping[str, Any], request: Mapping[str, Any]
) -> LatencyTableRow:
    """Store a table measured in this process (a job, the CLI); its row id names it from now."""
    row = LatencyTableRow(
        tenant=tenant,
        status=LatencyStatus.SUCCEEDED,
        request=dict(request),
        finished_at=utcnow(),
        **_columns(table),
    )
    session.add(row)
    session.commit()
    return row


def request_latency_table(
    session: Session, *, tenant: str, request: Mapping[str, Any], queue: str
) -> LatencyTableRow:
    """A queued request to measure a table on the machines that serve `queue`."""
    row = LatencyTableRow(
        tenant=tenant,
        status=LatencyStatus.QUEUED,
        request=dict(request),
        input_shape=str(request["input_shape"]),
        runtime=str(request["runtime"]),
        queue=queue,
    )
    session.add(row)
    session.commit()
    return row


def start_latency_table(
    session: Session, *, table_id: str, lease_seconds: float
) -> LatencyTableRow | None:
    """Mark a queued request running under a lease of `lease_seconds`; None when it is not
    queued (a redelivered message, or another worker took it), so it is measured once."""
    matched = execute_guarded(
        session,
        update(LatencyTableRow)
        .where(LatencyTableRow.id == table_id, LatencyTableRow.status == LatencyStatus.QUEUED)
        .values(
            status=LatencyStatus.RUNNING,
            lease_expires_at=utcnow() + timedelta(seconds=lease_seconds),
        ),
    )
    return session.get(LatencyTableRow, table_id, populate_existing=True) if matched else None


def renew_latency_lease(session: Session, *, table_id: str, lease_seconds: float) -> bool:
    """Push a running request's lease back (the measuring worker's heartbeat); False once it
    is not running any more."""
    renewed = execute_guarded(
        session,
        update(LatencyTableRow)
        .where(LatencyTableRow.id == table_id, LatencyTableRow.status == LatencyStatus.RUNNING)
        .values(lease_expires_at=utcnow() + timedelta(seconds=lease_seconds)),
    )
    return bool(renewed)


def finish_latency_table(session: Session, *, table_id: str, table: Mapping[str, Any]) -> None:
    _end(session, table_id, LatencyStatus.SUCCEEDED, **_columns(table))


def fail_latency_table(session: Session, *, table_id: str, error: str) -> None:
    _end(session, table_id, LatencyStatus.FAILED, error=error[:2000])


def fail_expired_latency_tables(session: Session, *, now: datetime | None = None) -> list[str]:
    """Fail the running requests whose worker stopped renewing its lease (it died or lost the
    database): measuring restarts only when the tenant asks again, on a machine of its choice.
    Their ids."""
    now = now or utcnow()
    running = (
        LatencyTableRow.status == LatencyStatus.RUNNING,
        LatencyTableRow.lease_expires_at < now,
    )
    expired = list(session.scalars(select(LatencyTableRow.id).where(*running)))
    error = "the worker measuring this table stopped before it finished; request the table again"
    return [
        table_id
        for table_id in expired
        if _end(session, table_id, LatencyStatus.FAILED, *running, finished_at=now, error=error)
    ]


def _end(
    session: Session,
    table_id: str,
    status: LatencyStatus,
    *guards: ColumnElement[bool],
    finished_at: datetime | None = None,
    **values: Any,
) -> bool:
    """Record how a request ended (under `guards`, when given); its lease ends with it."""
    return bool(
        execute_guarded(
            session,
            update(LatencyTableRow)
            .where(LatencyTableRow.id == table_id, *guards)
            .values(
                status=status,
                finished_at=finished_at or utcnow(),
                lease_expires_at=None,
                **values,
            ),
        )
    )


def get_latency_table(session: Session, *, tenant: str, table_id: str) -> LatencyTableRow | None:
    return session.scalar(
        select(LatencyTableRow).where(
            LatencyTableRow.id == table_id, LatencyTableRow.tenant == tenant
        )
    )


def measured_latency_table(session: Session, *, tenant: str, table_id: str) -> LatencyTableRow:
    """The tenant's measured table `table_id`, for a job to plan with; one that is not the
    tenant's, or not measured (yet), is refused in a line that says what to do."""
    row = get_latency_table(session, tenant=tenant, table_id=table_id)
    if row is None or row.table is None:
        state = "" if row is None else f" (it is {row.status.value})"
        raise BadReference(
            f"latency_table {table_id[:40]!r} is not a measured latency table of yours{state}; "
            "measure one (bitplan profile-latency, POST /v1/latency-tables)"
        )
    return row


def find_latency_table(
    session: Session, *, tenant: str, key: tuple[str, str, str, str, str]
) -> LatencyTableRow | None:
    """The newest succeeded table of `key` (`LatencyTable.key`), for reuse."""
    model_sha256, input_shape, runtime, version, machine_sha256 = key
    return session.scalar(
        select(LatencyTableRow)
        .where(
            LatencyTableRow.tenant == tenant,
            LatencyTableRow.model_sha256 == model_sha256,
            LatencyTableRow.input_shape == input_shape,
            LatencyTableRow.runtime == runtime,
            LatencyTableRow.runtime_version == version,
            LatencyTableRow.machine_sha256 == machine_sha256,
            LatencyTableRow.status == LatencyStatus.SUCCEEDED,
        )
        .order_by(LatencyTableRow.created_at.desc())
        .limit(1)
    )


def list_latency_tables(session: Session, *, tenant: str) -> list[LatencyTableRow]:
    """The tenant's newest tables and requests, newest first."""
    return list(
        session.scalars(
            select(LatencyTableRow)
            .where(LatencyTableRow.tenant == tenant)
            .order_by(LatencyTableRow.created_at.desc(), LatencyTableRow.id)
            .limit(MAX_LISTED)
        )
    )


def _columns(table: Mapping[str, Any]) -> dict[str, Any]:
    """The key columns of a table's JSON, and the JSON itself."""
    return {
        "model_sha256": table["model_sha256"],
        "input_shape": "x".join(str(v) for v in table["input_shape"]),
        "runtime": table["runtime"],
        "runtime_version": table["runtime_version"],
        "machine_sha256": table["machine_sha256"],
        "table": dict(table),
    }
