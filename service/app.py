"""`create_app(settings)`: the FastAPI application, with everything it owns made once.

The database is migrated and the artifact store, executor, webhook notifier and metrics
registry are built here and hung on `app.state`; routes reach them through `service.api.deps`.
The executor's threads (inline) start and stop with the app's lifespan, so `bitplan serve` is
one process that serves and works, and a test's `TestClient` block is a whole deployment.
"""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from importlib.metadata import version

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry

from allocator.zoo import known_prefixes
from db.session import (
    default_url,
    init_db,
    make_read_session_factory,
    make_session_factory,
)
from service.api.deps import Reader
from service.api.routes import ROUTERS
from service.auth import KeyCache
from service.errors import STATUS_BY_ERROR, error_body, status_for
from service.middleware import BodyLimit, Metrics
from service.quotas import FailedAuthentications, RequestRate
from service.settings import Settings
from service.webhooks import JobNotifier
from workers.executor import make_executor

UPLOAD_PATHS = frozenset({"/v1/models", "/v1/datasets"})
DESCRIPTION = """\
Mixed-precision bit allocation as a service. Upload weights and data, submit a job with a size
budget, and collect the bit plan, the quantized model and its metrics; re-solve new budgets from
the cached cost table (a *profile*) in milliseconds.

Authenticate with `Authorization: Bearer <key>` (`bitplan keys create --tenant T`).
"""


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    engine = init_db(settings.database_url or default_url(settings.home))
    sessions = make_session_factory(engine)
    store = settings.open_store()
    notifier = JobNotifier.from_settings(settings, sessions)
    executor = make_executor(settings.workers, sessions, store, on_ended=notifier.notify_ended)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        # Model sources import timm and torchvision; done here, the first submission does not
        # pay seconds for it. Then freeze what start-up made: torch, timm and matplotlib are
        # millions of objects a full collection would otherwise walk mid-request (a collapse
        # from 200 to 85 status polls/s once a submission had imported them, seen here).
        known_prefixes()
        gc.collect()
        gc.freeze()
        executor.start()
        try:
            yield
        finally:
            executor.stop()
            notifier.close()
            engine.dispose()
            gc.unfreeze()  # a process that builds many apps (tests) may collect them again

    app = FastAPI(
        title="bitplan",
        version=version("bitplan"),
        summary="Mixed-precision bit-allocation search for PyTorch models",
        description=DESCRIPTION,
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.engine = engine
    app.state.session_factory = sessions
    app.state.reader = Reader(make_read_session_factory(engine))
    app.state.store = store
    app.state.executor = executor
    app.state.notifier = notifier
    app.state.key_cache = KeyCache(settings.key_cache_seconds)
    app.state.request_rate = RequestRate(settings.rate_limit_per_second, settings.rate_limit_burst)
    app.state.failed_authentications = FailedAuthentications(settings.auth_failures_per_minute)
    app.state.registry = CollectorRegistry()

    for error_class in STATUS_BY_ERROR:
        app.add_exception_handler(error_class, _error_response)
    app.add_exception_handler(RequestValidationError, _invalid_request)
    app.add_middleware(BodyLimit, limit_for=_body_limit(settings))
    app.add_middleware(Metrics, registry=app.state.registry)
    for router in ROUTERS:
        app.include_router(router)
    return app


async def _error_response(_request: Request, error: Exception) -> JSONResponse:
    # An error may carry response headers (Retry-After), as Starlette's HTTPException does.
    return JSONResponse(
        error_body(error), status_code=status_for(error), headers=getattr(error, "headers", None)
    )


MAX_PROBLEMS = 10


async def _invalid_request(_request: Request, error: RequestValidationError) -> JSONResponse:
    """422 naming each field that failed and why, one line, without echoing the input.

    FastAPI's own answer repeats every input value: a NaN or Infinity it then cannot write as
    JSON (a 500, and the connection dropped), and a tenant's 5,000-character string sent back.
    """
    problems = [
        f"{'.'.join(str(part) for part in problem['loc'] if part != 'body') or 'body'}: "
        f"{problem['msg']}"
        for problem in error.errors()
    ]
    more = f" (and {len(problems) - MAX_PROBLEMS} more)" if len(problems) > MAX_PROBLEMS else ""
    detail = "; ".join(problems[:MAX_PROBLEMS]) + more
    return JSONResponse(
        {"detail": f"invalid request: {detail}", "error": "InvalidRequest"},
        status_code=422,
    )


def _body_limit(settings: Settings) -> Callable[[str], int]:
    def limit_for(path: str) -> int:
        return settings.max_upload_bytes if path in UPLOAD_PATHS else settings.max_request_bytes

    return limit_for
