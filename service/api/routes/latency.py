"""`/v1/latency-tables`: latency tables measured on a platform's target machines.

A POST stores the request and sends it to the queue it names (one of `BITPLAN_LATENCY_QUEUES`,
`latency` by default), where a worker on the target machine (`bitplan worker --queue latency`)
measures it (`workers.latency.run_request`); with the inline executor the API's own machine
measures it in a thread. GET returns its status and, once measured, the table, whose id a job
names in `latency_table`. A tenant sees only its own tables.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, Response, status
from sqlalchemy.orm import Session

from allocator.errors import BadReference, BadSpec
from allocator.job import UPLOAD_REF_PREFIX
from db import repositories
from db.models import LatencyTableRow
from service.api.deps import (
    UNAUTHORIZED,
    ExecutorDep,
    LatencyTableId,
    ReaderDep,
    SessionDep,
    SettingsDep,
    TenantDep,
)
from service.schemas import ErrorOut, LatencyRequest, LatencyTableOut
from workers.latency import check_request
from workers.record import confined_path

router = APIRouter(prefix="/v1/latency-tables", tags=["latency"], responses=UNAUTHORIZED)

NOT_FOUND = {status.HTTP_404_NOT_FOUND: {"model": ErrorOut, "description": "No such table."}}


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    responses={
        status.HTTP_422_UNPROCESSABLE_CONTENT: {
            "model": ErrorOut,
            "description": "A bad shape, runtime, width, queue or weights reference.",
        }
    },
    summary="Measure a latency table on the machines serving a queue",
)
def request_table(
    request: LatencyRequest,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    executor: ExecutorDep,
) -> LatencyTableOut:
    """202 with `Location: /v1/latency-tables/{id}`; poll it until `succeeded` (or `failed`)."""
    fields = request.model_dump(exclude={"queue"})
    checked = check_request(fields)
    queues = settings.workers.latency_queues
    if request.queue not in queues:
        raise BadSpec(f"queue {request.queue[:64]!r} is not one of {', '.join(queues)}")
    weights = checked["weights"]
    if weights is not None and weights.startswith(UPLOAD_REF_PREFIX):
        upload_id = weights.removeprefix(UPLOAD_REF_PREFIX)
        if repositories.get_upload(session, tenant=tenant, upload_id=upload_id) is None:
            raise BadReference(f"weights {weights[:80]!r} names no upload of yours")
    elif weights is not None:
        confined_path(weights, "weights", settings.allowed_input_roots)
    row = repositories.request_latency_table(
        session, tenant=tenant, request=checked, queue=request.queue
    )
    executor.dispatch_latency(row.id, request.queue)
    response.headers["Location"] = f"/v1/latency-tables/{row.id}"
    return LatencyTableOut.of(row)


@router.get("/{table_id}", responses=NOT_FOUND, summary="A latency table, or its request's state")
async def get_table(
    table_id: LatencyTableId, read: ReaderDep, tenant: TenantDep
) -> LatencyTableOut:
    return await read(lambda session: LatencyTableOut.of(_owned(session, tenant, table_id)))


@router.get("", summary="Latency tables and requests, newest first")
async def list_tables(read: ReaderDep, tenant: TenantDep) -> list[LatencyTableOut]:
    return await read(
        lambda session: [
            LatencyTableOut.of(row)
            for row in repositories.list_latency_tables(session, tenant=tenant)
        ]
    )


def _owned(session: Session, tenant: str, table_id: str) -> LatencyTableRow:
    row = repositories.get_latency_table(session, tenant=tenant, table_id=table_id)
    if row is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no latency table {table_id}")
    return row
