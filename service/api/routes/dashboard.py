"""`/`: the dashboard, a read-only page over the API for people who would rather look than curl.

The page and its script are static files shipped in the package (`service/static/`) and served
without a key: they hold no data. The script asks for the API key once, keeps it in the
browser's localStorage and sends it as `Authorization: Bearer` on every call to `/v1`, so the
dashboard sees exactly what the key's tenant may see and nothing here bypasses `TenantDep`.

The Content-Security-Policy allows only this origin's script and API, inline styles and data:
images (reports embed their pictures), and blob: frames (a report is fetched with the key and
shown from a blob URL, which inherits this policy): a stored key is only as safe as the page.
"""

from __future__ import annotations

from importlib.resources import files

from fastapi import APIRouter, Response

router = APIRouter(include_in_schema=False)

STATIC = files("service") / "static"
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
    "img-src data:; frame-src blob:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}


@router.get("/")
def dashboard() -> Response:
    return _static("dashboard.html", "text/html; charset=utf-8")


@router.get("/dashboard.js")
def dashboard_script() -> Response:
    return _static("dashboard.js", "text/javascript; charset=utf-8")


def _static(name: str, media_type: str) -> Response:
    return Response((STATIC / name).read_bytes(), media_type=media_type, headers=HEADERS)
