"""What the tenant quotas count: live jobs, and bytes kept on the server.

Never import FastAPI, Celery or torch here.
"""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from db.models import Artifact, Job, Upload
from db.repositories.shared import LIVE_STATUSES


def count_active_jobs(session: Session, *, tenant: str) -> int:
    """The tenant's queued and running jobs."""
    live = select(func.count()).where(Job.tenant == tenant, Job.status.in_(LIVE_STATUSES))
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
