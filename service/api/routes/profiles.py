"""`/v1/profiles/{id}`: new budgets answered from a cached cost table in milliseconds.

A profile is stored when a job succeeds (its id is the result's `profile_id`); re-solving needs
only the integer program, so these routes answer synchronously, in a pool thread.
"""

from __future__ import annotations

from fastapi import APIRouter, HTTPException, status
from sqlalchemy.orm import Session

from allocator.latency_table import LatencyTable
from db import repositories
from db.models import Profile
from service.api.deps import UNAUTHORIZED, ProfileId, ReaderDep, SettingsDep, TenantDep
from service.profiles import answer_budgets
from service.schemas import ErrorOut, ParetoOut, ParetoRequest, ProfileOut, SolveOut, SolveRequest
from service.settings import Settings

router = APIRouter(prefix="/v1/profiles", tags=["profiles"], responses=UNAUTHORIZED)

RESPONSES = {
    status.HTTP_404_NOT_FOUND: {"model": ErrorOut, "description": "No such profile."},
    status.HTTP_422_UNPROCESSABLE_CONTENT: {
        "model": ErrorOut,
        "description": "A bad budget, or one below the smallest feasible size (named).",
    },
}


@router.get("/{profile_id}", responses=RESPONSES, summary="What a cached cost table covers")
async def get_profile(profile_id: ProfileId, read: ReaderDep, tenant: TenantDep) -> ProfileOut:
    return await read(lambda session: ProfileOut.of(_owned(session, tenant, profile_id)))


@router.post("/{profile_id}/solve", responses=RESPONSES, summary="Solve one new budget")
async def solve(
    profile_id: ProfileId,
    request: SolveRequest,
    read: ReaderDep,
    tenant: TenantDep,
    settings: SettingsDep,
) -> SolveOut:
    time_limit = _time_limit(request.time_limit, settings)
    return await read(
        lambda session: answer_budgets(
            _owned(session, tenant, profile_id).cost_table,
            [request.budget],
            time_limit,
            _latency(session, tenant, request.latency_table),
        )[0]
    )


@router.post("/{profile_id}/pareto", responses=RESPONSES, summary="Solve a sweep of budgets")
async def pareto(
    profile_id: ProfileId,
    request: ParetoRequest,
    read: ReaderDep,
    tenant: TenantDep,
    settings: SettingsDep,
) -> ParetoOut:
    """One plan per budget, in the order given; the solver model is built once for all."""
    time_limit = _time_limit(request.time_limit, settings)

    def sweep(session: Session) -> ParetoOut:
        profile = _owned(session, tenant, profile_id)
        latency = _latency(session, tenant, request.latency_table)
        points = answer_budgets(profile.cost_table, request.budgets, time_limit, latency)
        return ParetoOut(profile_id=profile.id, points=points)

    return await read(sweep)


def _owned(session: Session, tenant: str, profile_id: str) -> Profile:
    profile = repositories.get_profile_by_id(session, tenant=tenant, profile_id=profile_id)
    if profile is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no profile {profile_id}")
    return profile


def _latency(session: Session, tenant: str, table_id: str | None) -> LatencyTable | None:
    """The tenant's measured latency table `table_id` (404 when it has none such)."""
    if table_id is None:
        return None
    row = repositories.get_latency_table(session, tenant=tenant, table_id=table_id)
    if row is None or row.table is None:
        raise HTTPException(status.HTTP_404_NOT_FOUND, f"no measured latency table {table_id}")
    return LatencyTable.from_dict({**row.table, "table_id": row.id})


def _time_limit(asked: float | None, settings: Settings) -> float:
    return min(asked or settings.solve_time_limit, settings.solve_time_limit)
