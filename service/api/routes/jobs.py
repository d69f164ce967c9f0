"""`/v1/jobs`: submit, list, read, cancel, and collect results and artifacts.

Submitting writes the row and commits before it dispatches, so a job exists before any worker
can look for it, and a crash between the two leaves a queued job the executor's sweeper finds
instead of a message about a job that does not exist.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Header, HTTPException, Query, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse
from sqlalchemy.orm import Session

from allocator.job import JobSpec, JobStatus
from db import repositories
from db.models import Artifact, Job
from db.repositories import IdempotencyConflict
from db.store import ArtifactStore, UnknownObject
from service.api.deps import (
    UNAUTHORIZED,
    ArtifactName,
    ExecutorDep,
    JobId,
    NotifierDep,
    ReaderDep,
    SessionDep,
    SettingsDep,
    StoreDep,
    TenantDep,
)
from service.errors import NotReady
from service.inputs import check_spec
from service.quotas import check_active_jobs
from service.schemas import (
    RESULT_EXAMPLE,
    ArtifactOut,
    ErrorOut,
    JobOut,
    JobPageOut,
    JobRequest,
)
from service.settings import Settings
from service.webhooks import check_callback_url
from workers.executor import Executor
from workers.exports import export_artifact

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], responses=UNAUTHORIZED)

ARTIFACT_MEDIA = {
    "packed-safetensors": ("application/octet-stream", ".safetensors"),
    "bitplan-json": ("application/json", ".json"),
    "profile-json": ("application/json", ".json"),
    "report-html": ("text/html", ".html"),
    "pareto-png": ("image/png", ".png"),
    "onnx-model": ("application/octet-stream", ".onnx"),
}
"""Artifact kind -> (media type, file suffix) for downloads."""

NOT_FOUND = {status.HTTP_404_NOT_FOUND: {"model": ErrorOut, "description": "No such job."}}
REJECTED = {
    status.HTTP_409_CONFLICT: {
        "model": ErrorOut,
        "description": "The Idempotency-Key was used for a different request.",
    },
    status.HTTP_422_UNPROCESSABLE_CONTENT: {
        "model": ErrorOut,
        "description": "A bad budget, method, model or file reference; the detail says what "
        "to change. An infeasible budget names the smallest feasible size.",
    },
}

IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=200,
        description="Retrying with the same key and body returns the first job, not a new one.",
    ),
]


def check_request(
    session: Session, tenant: str, settings: Settings, spec: JobSpec, callback_url: str | None
) -> None:
    """Everything that can be refused before a row is written; shared with /v1/sweeps."""
    check_spec(session, tenant, spec, settings.allowed_input_roots, settings.workers.limits)
    if callback_url is not None:
        check_callback_url(callback_url, settings)


def enqueue(
    session: Session,
    tenant: str,
    executor: Executor,
    spec: JobSpec,
    *,
    queue: str,
    priority: int,
    not_before: datetime | None,
    callback_url: str | None,
    idempotency_key: str | None,
) -> tuple[Job, bool]:
    """Write and commit the job, then dispatch it; with a reused idempotency key, the earlier
    job (409 if it was asked for with other options)."""
    job, created = repositories.create_job(
        session,
        tenant=tenant,
        spec=spec.to_dict(),
        queue=queue,
        priority=priority,
        not_before=not_before,
        idempotency_key=idempotency_key,
        callback_url=callback_url,
    )
    options = (job.queue, job.priority, job.not_before, job.callback_url)
    if not created and options != (queue, priority, not_before, callback_url):
        raise IdempotencyConflict(job)
    if created:
        executor.dispatch(job)
    return job, created


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        status.HTTP_200_OK: {"model": JobOut, "description": "An idempotent retry."},
        **REJECTED,
    },
    summary="Submit a job",
)
def create_job(
    request: JobRequest,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    executor: ExecutorDep,
    idempotency_key: IdempotencyKey = None,
) -> JobOut:
    """202 with `Location: /v1/jobs/{id}`; poll that, or give a `callback_url`."""
    callback_url = str(request.callback_url) if request.callback_url else None
    check_active_jobs(session, tenant, settings, adding=1)
    check_request(session, tenant, settings, request.spec, callback_url)
    job, created = enqueue(
        session,
        tenant,
        executor,
        request.spec,
        queue=request.queue,
        priority=request.priority,
        not_before=request.not_before,
        callback_url=callback_url,
        idempotency_key=idempotency_key,
    )
    response.status_code = status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK
    response.headers["Location"] = f"/v1/jobs/{job.id}"
    return JobOut.of(job)


@router.get("", summary="List jobs, newest first")
async def list_jobs(
    read: ReaderDep,
    tenant: TenantDep,
    status_filter: Annotated[JobStatus | None, Query(alias="status")] = None,
    limit: Annotated[int, Query(ge=1, le=repositories.MAX_PAGE_SIZE)] = 50,
    cursor: Annotated[str | None, Query(max_length=512)] = None,
) -> JobPageOut:
    def page(session: Session) -> JobPageOut:
        found = repositories.list_jobs(
            session, tenant=tenant, status=status_filter, limit=limit, cursor=cursor
        )
        return JobPageOut(
            jobs=[JobOut.of(job) for job in found.jobs], next_cursor=found.next_cursor
        )

    return await read(page)


@router.get("/{job_id}", responses=NOT_FOUND, summary="A job's status, phase and progress")
async def get_job(job_id: JobId, read: ReaderDep, tenant: TenantDep) -> JobOut:
    return await read(lambda session: JobOut.of(_owned(session, tenant, job_id)))


@router.post(
    "/{job_id}/cancel",
    status_code=status.HTTP_202_ACCEPTED,
    responses=NOT_FOUND,
    summary="Cancel a job",
)
def cancel_job(
    job_id: JobId, session: SessionDep, tenant: TenantDep, notifier: NotifierDep
) -> JobOut:
    """A queued job is cancelled at once (and its callback called); a running one stops at its
    next phase or layer (`cancel_requested` is true until then); a finished one is returned
    unchanged."""
    before = _owned(session, tenant, job_id).status
    job = repositories.request_cancel(session, tenant=tenant, job_id=job_id)
    if job is None:
        raise _no_job(job_id)
    if before is JobStatus.QUEUED and job.status is JobStatus.CANCELLED:
        notifier.notify(job)
    return JobOut.of(job)


@router.get(
    "/{job_id}/result",
    responses={
        200: {"content": {"application/json": {"example": RESULT_EXAMPLE}}},
        **NOT_FOUND,
        status.HTTP_409_CONFLICT: {"model": ErrorOut, "description": "Not succeeded (yet)."},
    },
    summary="The result: the object `bitplan run --json` prints",
)
async def get_result(job_id: JobId, read: ReaderDep, tenant: TenantDep) -> dict[str, Any]:
    def result(session: Session) -> dict[str, Any]:
        found = repositories.get_result(session, tenant=tenant, job_id=job_id)
        if found is None:
            raise NotReady(_not_ready(_owned(session, tenant, job_id)))
        return {key: value for key, value in found.result.items() if key != "profile"}

    return await read(result)


@router.get("/{job_id}/artifacts", responses=NOT_FOUND, summary="The files a job produced")
async def list_artifacts(job_id: JobId, read: ReaderDep, tenant: TenantDep) -> list[ArtifactOut]:
    def artifacts(session: Session) -> list[ArtifactOut]:
        _owned(session, tenant, job_id)
        found = repositories.list_artifacts(session, tenant=tenant, job_id=job_id)
        return [ArtifactOut.of(artifact) for artifact in found]

    return await read(artifacts)


@router.get(
    "/{job_id}/artifacts/onnx",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The ONNX model."},
        **NOT_FOUND,
        status.HTTP_409_CONFLICT: {"model": ErrorOut, "description": "Not succeeded (yet)."},
        status.HTTP_410_GONE: {"model": ErrorOut, "description": "The file is gone."},
        status.HTTP_422_UNPROCESSABLE_CONTENT: {
            "model": ErrorOut,
            "description": "The plan has a quantizer ONNX cannot express, or ONNX Runtime did "
            "not reproduce bitplan's model (the detail names the first diverging layer).",
        },
    },
    summary="The model as ONNX (QDQ), exported and checked in ONNX Runtime on first request",
)
async def get_onnx(
    job_id: JobId, request: Request, tenant: TenantDep, settings: SettingsDep, store: StoreDep
) -> FileResponse:
    """The job's model in the standard QDQ layout (INT4/INT8 weight codes, UINT8 activations),
    with the plan, the job id and the ONNX Runtime session settings in its metadata. A job that
    did not export it (`export: ["onnx"]`) exports it now: seconds to minutes, one export at a
    time per server; its parity figures then appear under the result's `metrics.exports`."""
    artifact = await run_in_threadpool(
        export_artifact,
        request.app.state.session_factory,
        store,
        tenant=tenant,
        job_id=job_id,
        fmt="onnx",
        allowed_roots=settings.allowed_input_roots,
        limits=settings.workers.limits,
    )
    return await _download(artifact, store, job_id)


@router.get(
    "/{job_id}/artifacts/{name}",
    response_class=FileResponse,
    responses={
        200: {"content": {"application/octet-stream": {}}, "description": "The file."},
        **NOT_FOUND,
        status.HTTP_410_GONE: {"model": ErrorOut, "description": "The file is gone."},
    },
    summary="Download one artifact (model, bitplan, profile, ...)",
)
async def get_artifact(
    job_id: JobId, name: ArtifactName, read: ReaderDep, tenant: TenantDep, store: StoreDep
) -> FileResponse:
    artifact = await read(
        lambda session: repositories.get_artifact(session, tenant=tenant, job_id=job_id, name=name)
    )
    if artifact is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"job {job_id} has no artifact {name!r}")
    return await _download(artifact, store, job_id)


async def _download(artifact: Artifact, store: ArtifactStore, job_id: str) -> FileResponse:
    """The stored file of `artifact`, or 410 when the store no longer has it."""
    name = artifact.name
    try:
        # A bucket-backed store may download the file first: never on the event loop.
        path = await run_in_threadpool(store.path, artifact.uri)
    except UnknownObject:
        raise HTTPException(
            status.HTTP_410_GONE,
            f"artifact {name!r} of job {job_id} is no longer stored; submit the job again",
        ) from None
    media_type, suffix = ARTIFACT_MEDIA.get(artifact.kind, ("application/octet-stream", ""))
    return FileResponse(
        path,
        media_type=media_type,
        filename=f"{artifact.name}{suffix}",
        headers={"ETag": f'"{artifact.sha256}"'},
    )


def _owned(session: Session, tenant: str, job_id: str) -> Job:
    """The tenant's job, or 404: another tenant's job is indistinguishable from none."""
    job = repositories.get_job(session, tenant=tenant, job_id=job_id)
    if job is None:
        raise _no_job(job_id)
    return job


def _no_job(job_id: str) -> HTTPException:
    return HTTPException(status.HTTP_404_NOT_FOUND, f"no job {job_id}")


def _not_ready(job: Job) -> str:
    if job.status is JobStatus.FAILED:
        return f"job {job.id} failed: {job.error}"
    if job.status is JobStatus.CANCELLED:
        return f"job {job.id} was cancelled; it has no result"
    return f"job {job.id} is {job.status.value}; the result exists once it has succeeded"
