"""What every repository module shares: idempotent inserts, guarded updates, canonical hashes.

A write that may race another (two retries of one POST, two workers on one job) is either an
insert of a row with a unique key, settled by `insert_or_existing`, or an UPDATE guarded by the
state it expects, settled by `execute_guarded`'s matched row count.

Never import FastAPI, Celery or torch here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from sqlalchemy import Update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from allocator.job import JobStatus
from db.models import Base

LIVE_STATUSES = (JobStatus.QUEUED, JobStatus.RUNNING)
_Row = TypeVar("_Row", bound=Base)


def canonical_sha256(value: Mapping[str, Any]) -> str:
    """A hash of JSON content that ignores key order and formatting, so equal options (or specs)
    written by different clients hash alike."""
    return hashlib.sha256(canonical_json(value).encode()).hexdigest()


def canonical_json(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def insert_or_existing(
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


def execute_guarded(session: Session, statement: Update) -> int:
    """Run one guarded UPDATE and commit; the matched row count says whether the guard held."""
    matched = session.execute(statement.execution_options(synchronize_session=False)).rowcount
    session.commit()
    return matched
