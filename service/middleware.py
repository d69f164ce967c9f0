"""ASGI middleware: request body limits and Prometheus metrics.

Both are plain ASGI wrappers rather than `BaseHTTPMiddleware`: the body limit must wrap
`receive` to count bytes as they arrive, which that class cannot do, and neither adds a task per
request to the status polls that make up most of the traffic. An upload over the limit is
refused with 413 after at most the limit has been read, whether or not the client declared a
Content-Length.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

from fastapi import HTTPException, status
from prometheus_client import CollectorRegistry, Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send


class BodyLimit:
    """413 for any request body above `limit_for(path)` bytes."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _send_json(send, status.HTTP_413_CONTENT_TOO_LARGE, _too_large(limit))
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # Raised inside the route's body parsing; FastAPI re-raises HTTPException.
                    raise HTTPException(status.HTTP_413_CONTENT_TOO_LARGE, _too_large(limit))
            return message

        await self.app(scope, counted, send)


class Metrics:
    """Request counts and latencies by method, route template and status.

    The route template (`/v1/jobs/{job_id}`), not the path, labels a series: ids in paths would
    create a series per job.
    """

    def __init__(self, app: ASGIApp, registry: CollectorRegistry) -> None:
        self.app = app
        self.requests = Counter(
            "bitplan_http_requests_total",
            "HTTP requests answered",
            ("method", "route", "status"),
            registry=registry,
        )
        self.latency = Histogram(
            "bitplan_http_request_seconds",
            "Time to answer an HTTP request",
            ("method", "route"),
            registry=registry,
            buckets=(0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status_code = 500

        async def recorded(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recorded)
        finally:
            route = getattr(scope.get("route"), "path", "unmatched")
            method = scope["method"]
            self.requests.labels(method, route, str(status_code)).inc()
            self.latency.labels(method, route).observe(time.perf_counter() - started)


def _content_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _too_large(limit: int) -> str:
    return f"request body above the limit of {limit} bytes; send a smaller file"


async def _send_json(send: Send, status_code: int, detail: str) -> None:
    body = json.dumps({"detail": detail, "error": "TooLarge"}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status_code,
            "headers": [(b"content-type", b"application/json")],
        }
    )
    await send({"type": "http.response.body", "body": body})
