"""What routes receive instead of reaching for globals: settings, a session, the store, the
executor, the webhook notifier and the caller's tenant, as `Annotated` aliases so a route signature reads like prose.

Everything comes from `app.state`, filled once by `service.app.create_app`, so two apps in one
process (tests) never share state. Authentication lives here: a route that takes `TenantDep`
is closed to callers without a valid key, and every repository call it makes is scoped to that
tenant, which is what keeps tenants from seeing each other's objects.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session

from db import repositories
from db.store import ArtifactStore
from service.auth import KeyCache
from service.schemas import ID_PATTERN, ErrorOut
from service.settings import Settings
from service.webhooks import JobNotifier
from workers.executor import Executor

bearer = HTTPBearer(
    auto_error=False,
    description="An API key from `bitplan keys create --tenant T`: `Authorization: Bearer bp_...`",
)


def get_settings(request: Request) -> Settings:
    return request.app.state.settings


def get_session(request: Request) -> Iterator[Session]:
    with request.app.state.session_factory() as session:
        yield session


def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


def get_executor(request: Request) -> Executor:
    return request.app.state.executor


def get_notifier(request: Request) -> JobNotifier:
    return request.app.state.notifier


SessionDep = Annotated[Session, Depends(get_session)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
ExecutorDep = Annotated[Executor, Depends(get_executor)]
NotifierDep = Annotated[JobNotifier, Depends(get_notifier)]


def get_tenant(
    request: Request,
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The tenant of the presented key; 401 for a missing, malformed, unknown or revoked one."""
    tenant = None
    if credentials is not None:
        cache: KeyCache = request.app.state.key_cache
        tenant = cache.get(credentials.credentials)
        if tenant is None:
            tenant = repositories.verify_api_key(session, credentials.credentials)
            if tenant is not None:
                cache.put(credentials.credentials, tenant)
    if tenant is None:
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            detail="missing or invalid API key; send 'Authorization: Bearer <key>'",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]
UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    status.HTTP_401_UNAUTHORIZED: {"model": ErrorOut, "description": "Missing or invalid API key."}
}
"""Documented on every router whose routes take `TenantDep`."""

JobId = Annotated[str, Path(pattern=ID_PATTERN, description="A job id (UUID).")]
ProfileId = Annotated[str, Path(pattern=ID_PATTERN, description="A profile id (UUID).")]
ArtifactName = Annotated[
    str,
    Path(pattern=r"^[A-Za-z0-9._-]{1,255}$", description="model, bitplan, profile, ..."),
]
