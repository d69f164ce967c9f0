"""`/healthz`, `/readyz` and `/metrics`: what orchestrators and Prometheus poll.

The probes are open; `/metrics` tells every tenant's traffic, so it takes a bearer token: the
operator's `BITPLAN_METRICS_TOKEN` if set, else any valid API key.

`/healthz` says the process answers (restart it if not); `/readyz` says it can do its work, so a
load balancer sends traffic only while the database, the artifact store (a bucket, when one is
configured) and, distributed, the broker answer.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

import redis
from fastapi import APIRouter, Depends, Request, Response, status
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import Engine

from service.api.deps import UNAUTHORIZED, SettingsDep, require_metrics_reader
from workers.settings import ExecutorKind

router = APIRouter(tags=["health"])

PROBE_TIMEOUT_SECONDS = 2.0
T = TypeVar("T")


@router.get("/healthz", summary="The process is up")
def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="The database, the artifact store and the broker answer",
    responses={status.HTTP_503_SERVICE_UNAVAILABLE: {"description": "A dependency is down."}},
)
def readyz(request: Request, response: Response, settings: SettingsDep) -> dict[str, Any]:
    checks = {"database": _probe(_ping_database, request.app.state.engine)}
    if settings.store.url:
        checks["store"] = _probe(lambda store: store.check(), request.app.state.store)
    if settings.workers.executor == ExecutorKind.CELERY:
        checks["broker"] = _probe(_ping_broker, settings.workers.broker_url)
    ready = all(value == "ok" for value in checks.values())
    if not ready:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return {"status": "ok" if ready else "unavailable", "checks": checks}


@router.get(
    "/metrics",
    response_class=Response,
    dependencies=[Depends(require_metrics_reader)],
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}}, **UNAUTHORIZED},
    summary="Prometheus metrics",
)
def metrics(request: Request) -> Response:
    return Response(generate_latest(request.app.state.registry), media_type=CONTENT_TYPE_LATEST)


def _probe(ping: Callable[[T], None], target: T) -> str:
    """ "ok", or the error in one line: readiness must answer, never raise."""
    try:
        ping(target)
    except Exception as error:
        return f"{type(error).__name__}: {error}".splitlines()[0]
    return "ok"


def _ping_database(engine: Engine) -> None:
    """The pool's own liveness check, the one `pool_pre_ping` uses: no query of ours."""
    with engine.connect() as connection:
        if not engine.dialect.do_ping(connection.connection.dbapi_connection):
            raise ConnectionError("the database did not answer a ping")


def _ping_broker(url: str) -> None:
    client = redis.Redis.from_url(
        url, socket_connect_timeout=PROBE_TIMEOUT_SECONDS, socket_timeout=PROBE_TIMEOUT_SECONDS
    )
    try:
        client.ping()
    finally:
        client.close()
