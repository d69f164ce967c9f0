"""What routes receive instead of reaching for globals: settings, a session, the store, the
executor, the webhook notifier and the caller's tenant, as `Annotated` aliases so a route signature reads like prose.

Everything comes from `app.state`, filled once by `service.app.create_app`, so two apps in one
process (tests) never share state. Authentication lives here: a route that takes `TenantDep`
is closed to callers without a valid key, and every repository call it makes is scoped to that
tenant, which is what keeps tenants from seeing each other's objects. The per-key rate limit and
the failed-key throttle per client address (`service.quotas`) are applied here too, so every
authenticated route has them.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Annotated, Any, TypeVar

from fastapi import Depends, HTTPException, Path, Request, status
from fastapi.concurrency import run_in_threadpool
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy.orm import Session, sessionmaker

from db import repositories
from db.store import ArtifactStore
from service.auth import KeyCache
from service.quotas import FailedAuthentications, RequestRate
from service.schemas import ID_PATTERN, ErrorOut
from service.settings import Settings
from service.webhooks import JobNotifier
from workers.executor import Executor

T = TypeVar("T")

bearer = HTTPBearer(
    auto_error=False,
    description="An API key from `bitplan keys create --tenant T`: `Authorization: Bearer bp_...`",
)


async def get_settings(request: Request) -> Settings:
    return request.app.state.settings


async def get_session(request: Request) -> AsyncIterator[Session]:
    """A session for one request, closed on the event loop rather than in the thread pool.

    A sync teardown needs a free pool thread while its session still holds a connection; under
    load every thread can be a request waiting for a connection, and nothing is released until
    the connection pool times out (30 s). Seen at 200 status polls per second: p99 in seconds,
    read timeouts.
    """
    session = request.app.state.session_factory()
    try:
        yield session
    finally:
        session.close()


class Reader:
    """Read-only database work, run in one pool thread with a session opened and closed there.

    A sync route keeps its session's connection while FastAPI validates the response in a
    second pool thread; when every thread is a request waiting for a connection, that is a
    deadlock until the pool times out (seen at 200 status polls per second: read timeouts).
    Work handed to a Reader returns its connection before the thread is let go, and its
    sessions autocommit (`make_read_session_factory`), so closing them costs no round trip.
    """

    def __init__(self, sessions: sessionmaker[Session]) -> None:
        self.sessions = sessions

    async def __call__(self, work: Callable[[Session], T]) -> T:
        def in_thread() -> T:
            with self.sessions() as session:
                return work(session)

        return await run_in_threadpool(in_thread)


async def get_reader(request: Request) -> Reader:
    return request.app.state.reader


async def get_store(request: Request) -> ArtifactStore:
    return request.app.state.store


async def get_executor(request: Request) -> Executor:
    return request.app.state.executor


async def get_notifier(request: Request) -> JobNotifier:
    return request.app.state.notifier


SessionDep = Annotated[Session, Depends(get_session)]
ReaderDep = Annotated[Reader, Depends(get_reader)]
SettingsDep = Annotated[Settings, Depends(get_settings)]
StoreDep = Annotated[ArtifactStore, Depends(get_store)]
ExecutorDep = Annotated[Executor, Depends(get_executor)]
NotifierDep = Annotated[JobNotifier, Depends(get_notifier)]


async def get_tenant(
    request: Request,
    read: ReaderDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> str:
    """The tenant of the presented key; 401 for a missing, malformed, unknown or revoked one,
    429 for a key over its request rate or an address with too many failed keys.

    A key verified moments ago is answered on the event loop, its rate check a dictionary
    update; only a miss goes to a pool thread for the database (each thread hop costs about as
    much as the status query itself), and not at all from an address that keeps failing."""
    if credentials is None:
        raise _unauthorized()
    key = credentials.credentials
    cache: KeyCache = request.app.state.key_cache
    tenant = cache.get(key)
    if tenant is None:
        tenant = await _authenticated(
            request, key, lambda: read(lambda session: repositories.verify_api_key(session, key))
        )
        cache.put(key, tenant)
    rate: RequestRate = request.app.state.request_rate
    rate.take(tenant, key)
    return tenant


TenantDep = Annotated[str, Depends(get_tenant)]


async def require_metrics_reader(
    request: Request,
    read: ReaderDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> None:
    """/metrics shows every tenant's traffic: with `metrics_token` set only that token opens
    it (tenants' keys do not), else any valid API key does."""
    token = request.app.state.settings.metrics_token.get_secret_value()
    if not token:
        await get_tenant(request, read, credentials)
        return
    if credentials is None:
        raise _unauthorized()
    presented = credentials.credentials

    async def matches() -> bool | None:
        return hmac.compare_digest(presented.encode(), token.encode()) or None

    await _authenticated(request, presented, matches)


async def _authenticated(
    request: Request, key: str, verify: Callable[[], Awaitable[T | None]]
) -> T:
    """What `verify()` finds for a presented key, 401 if nothing; failures are counted per
    client address, and an address over its limit is refused before `verify` runs."""
    failures: FailedAuthentications = request.app.state.failed_authentications
    address = request.client.host if request.client else "unknown"
    failures.check(address, key)
    found = await verify()
    if found is None:
        failures.failed(address, key)
        raise _unauthorized()
    failures.succeeded(key)
    return found


def _unauthorized() -> HTTPException:
    return HTTPException(
        status.HTTP_401_UNAUTHORIZED,
        detail="missing or invalid API key; send 'Authorization: Bearer <key>'",
        headers={"WWW-Authenticate": "Bearer"},
    )


UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    status.HTTP_401_UNAUTHORIZED: {"model": ErrorOut, "description": "Missing or invalid API key."},
    status.HTTP_429_TOO_MANY_REQUESTS: {
        "model": ErrorOut,
        "description": "The key is over its request rate, the address has sent too many bad "
        "keys, or the tenant has too many active jobs; retry after `Retry-After` seconds.",
    },
}
"""Documented on every router whose routes take `TenantDep` (and on `/metrics`)."""

JobId = Annotated[str, Path(pattern=ID_PATTERN, description="A job id (UUID).")]
ProfileId = Annotated[str, Path(pattern=ID_PATTERN, description="A profile id (UUID).")]
LatencyTableId = Annotated[str, Path(pattern=ID_PATTERN, description="A latency table id (UUID).")]
ArtifactName = Annotated[
    str,
    Path(pattern=r"^[A-Za-z0-9._-]{1,255}$", description="model, bitplan, profile, ..."),
]
