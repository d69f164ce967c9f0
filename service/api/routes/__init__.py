"""One router per resource, each carrying its full path (`/v1/...`), so a route's template is
its whole URL path: metrics label series by it."""

from __future__ import annotations

from fastapi import APIRouter

from service.api.routes import dashboard, health, jobs, latency, profiles, sweeps, uploads

ROUTERS: tuple[APIRouter, ...] = tuple(
    module.router for module in (uploads, jobs, profiles, latency, sweeps, health, dashboard)
)
