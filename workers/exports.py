"""Export a finished job's model to a runtime format on request: what
`GET /v1/jobs/{id}/artifacts/onnx` and `bitplan export` run when the job did not export it.

The job's stored spec is made runnable as a worker makes it (`runnable_spec`: uploads linked
into a private folder, every other path checked against the allowed roots), its packed artifact
is read from the store, and `allocator.export.job.export_job` writes the ONNX model and checks
it in ONNX Runtime on the job's evaluation samples. A passed export is stored as the job's
artifact named by the format and its check joins the result's `metrics.exports`; a refused or
failed one raises `ExportRefused` / `ParityFailed` with the one-line reason and stores nothing.

Exports run one at a time in a process (`EXPORTS`): each loads the model and runs the evaluation
set twice, and a tenant asking for many at once must queue rather than exhaust the machine.
Imports torch, onnx and onnxruntime when an export runs, not when this module loads.
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from sqlalchemy.orm import Session, sessionmaker

from allocator.errors import BitplanError, ExportRefused, ParityFailed
from allocator.job import EXPORT_FORMATS, JobStatus, artifact_url, check_export_formats
from allocator.limits import Limits
from allocator.plan import BitPlan
from db import repositories
from db.models import Artifact
from db.store import ArtifactStore
from workers.record import runnable_spec, store_artifacts

EXPORTS = threading.Lock()
"""Held while an export runs in this process."""


class NoSuchJob(BitplanError):
    """The tenant has no job with this id (another tenant's job is indistinguishable)."""


class NotExportable(BitplanError):
    """The job has not succeeded, so it has no model to export."""


def export_artifact(
    sessions: sessionmaker[Session],
    store: ArtifactStore,
    *,
    tenant: str,
    job_id: str,
    fmt: str = "onnx",
    allowed_roots: Sequence[Path] | None = None,
    limits: Limits | None = None,
) -> Artifact:
    """The job's `fmt` artifact, made now unless it exists; `allowed_roots` as a worker
    applies them (None: no path check, for the CLI's own jobs)."""
    check_export_formats((fmt,))
    with sessions() as session:
        found = repositories.get_artifact(session, tenant=tenant, job_id=job_id, name=fmt)
        if found is not None:
            return found
    with EXPORTS, tempfile.TemporaryDirectory(prefix="bitplan-export-") as tmp:
        with sessions() as session:
            found = repositories.get_artifact(session, tenant=tenant, job_id=job_id, name=fmt)
            if found is not None:  # made by the export this one waited for
                return found
            job = repositories.get_job(session, tenant=tenant, job_id=job_id)
            if job is None:
                raise NoSuchJob(f"no job {job_id}")
            if job.status is not JobStatus.SUCCEEDED:
                raise NotExportable(
                    f"job {job_id} is {job.status.value}; only a succeeded job has a model "
                    "to export"
                )
            result = repositories.get_result(session, tenant=tenant, job_id=job_id)
            model = repositories.get_artifact(session, tenant=tenant, job_id=job_id, name="model")
            if result is None or model is None:
                raise NotExportable(f"job {job_id} has no packed model artifact to export")
            spec = runnable_spec(session, store, job, Path(tmp), allowed_roots)
            plan = BitPlan.from_dict(result.bit_plan)
            packed = store.path(model.uri)
        from allocator.export.job import export_job  # loads torch, onnx and onnxruntime

        path, check = export_job(spec, packed, Path(tmp), plan, job_id, limits)
        if path is None:
            error = ParityFailed if check.max_abs_diff is not None else ExportRefused
            raise error(check.error or f"the {fmt} export of job {job_id} failed")
        (record,) = store_artifacts(store, {fmt: str(path)})
        with sessions() as session:
            return repositories.add_export(
                session,
                tenant=tenant,
                job_id=job_id,
                artifact=record,
                check=check.to_dict(),
                url=artifact_url(job_id, fmt),
            )


__all__ = ["EXPORT_FORMATS", "NoSuchJob", "NotExportable", "export_artifact"]
