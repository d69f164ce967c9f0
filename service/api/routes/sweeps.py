"""`POST /v1/sweeps`: many models x budgets as one batch of jobs, for the overnight queue.

A sweep is not a stored object: it is the jobs it creates, on the `batch` queue so interactive
submissions overtake it. Every job is checked before any is written, so a sweep with one bad
entry creates nothing. With an `Idempotency-Key`, job i of the sweep uses `<key>:<i>`, so a
retried sweep returns the same jobs.
"""

from __future__ import annotations

from dataclasses import replace

from fastapi import APIRouter, Response, status

from allocator.job import JobSpec
from service.api.deps import UNAUTHORIZED, ExecutorDep, SessionDep, SettingsDep, TenantDep
from service.api.routes.jobs import REJECTED, IdempotencyKey, check_request, enqueue
from service.quotas import check_active_jobs
from service.schemas import JobOut, SweepModel, SweepOut, SweepRequest
from workers.settings import BATCH_QUEUE

router = APIRouter(prefix="/v1/sweeps", tags=["sweeps"], responses=UNAUTHORIZED)


@router.post(
    "",
    status_code=status.HTTP_202_ACCEPTED,
    responses={status.HTTP_200_OK: {"model": SweepOut}, **REJECTED},
    summary="Submit a batch of jobs: every model at every budget",
)
def create_sweep(
    request: SweepRequest,
    response: Response,
    session: SessionDep,
    tenant: TenantDep,
    settings: SettingsDep,
    executor: ExecutorDep,
    idempotency_key: IdempotencyKey = None,
) -> SweepOut:
    specs = _specs(request)
    callback_url = str(request.callback_url) if request.callback_url else None
    check_active_jobs(session, tenant, settings, adding=len(specs))
    for spec in specs:
        check_request(session, tenant, settings, spec, callback_url)
    submitted = [
        enqueue(
            session,
            tenant,
            executor,
            spec,
            queue=BATCH_QUEUE,
            priority=request.priority,
            not_before=request.not_before,
            callback_url=callback_url,
            idempotency_key=f"{idempotency_key}:{index}" if idempotency_key else None,
        )
        for index, spec in enumerate(specs)
    ]
    created = any(new for _job, new in submitted)
    response.status_code = status.HTTP_202_ACCEPTED if created else status.HTTP_200_OK
    return SweepOut(jobs=[JobOut.of(job) for job, _new in submitted])


def _specs(request: SweepRequest) -> list[JobSpec]:
    models = request.models or [SweepModel(model=request.spec.model, weights=request.spec.weights)]
    return [
        replace(
            request.spec,
            model=entry.model,
            weights=entry.weights,
            calib=entry.calib or request.spec.calib,
            eval=entry.eval or request.spec.eval,
            budget=budget,
        )
        for entry in models
        for budget in request.budgets
    ]
