"""Uploaded models and datasets: one row per tenant, kind and content hash.

Never import FastAPI, Celery or torch here.
"""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from allocator.job import UploadKind
from db.models import Upload
from db.repositories.shared import insert_or_existing


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
    return insert_or_existing(
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
