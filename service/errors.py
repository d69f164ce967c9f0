"""Errors a caller can act on, mapped once to HTTP status codes.

`allocator/` raises typed `BitplanError`s and `db.repositories` raises its own few; this module is
the one place that decides which status each of them becomes, so every route answers the same
problem the same way and the body always carries the library's message, which says what to
change. Routes raise these types (or FastAPI's `HTTPException` for a plain 404) and never build
error responses themselves; `service.app` installs one handler for all of them.

Never imports FastAPI: webhooks and the client share these types outside the app.
"""

from __future__ import annotations

from http import HTTPStatus
from typing import Any

from allocator.data.readers import DatasetTooLarge
from allocator.errors import (
    BadBudget,
    BadDataset,
    BadReference,
    BadSpec,
    BitplanError,
    InfeasibleBudget,
    JobCancelled,
    UnknownMethod,
    UnknownModel,
    UnsafeWeights,
    WeightsMismatch,
)
from db.repositories import IdempotencyConflict, InvalidCursor
from db.store import StoreUnavailable
from service.quotas import StoredBytesQuotaExceeded, Throttled
from workers.exports import NoSuchJob, NotExportable


class UnsupportedFormat(BitplanError):
    """An upload whose file type bitplan does not read."""


class NotReady(BitplanError):
    """The job exists but has not (or not successfully) produced what was asked for."""


STATUS_BY_ERROR: dict[type[Exception], HTTPStatus] = {
    # A pickle that needs code is a format we refuse to read, not a malformed request.
    UnsafeWeights: HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    UnsupportedFormat: HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
    WeightsMismatch: HTTPStatus.UNPROCESSABLE_ENTITY,
    DatasetTooLarge: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    BadDataset: HTTPStatus.UNPROCESSABLE_ENTITY,
    BadBudget: HTTPStatus.UNPROCESSABLE_ENTITY,
    BadSpec: HTTPStatus.UNPROCESSABLE_ENTITY,
    InfeasibleBudget: HTTPStatus.UNPROCESSABLE_ENTITY,
    UnknownModel: HTTPStatus.UNPROCESSABLE_ENTITY,
    UnknownMethod: HTTPStatus.UNPROCESSABLE_ENTITY,
    JobCancelled: HTTPStatus.CONFLICT,
    BadReference: HTTPStatus.UNPROCESSABLE_ENTITY,
    NotReady: HTTPStatus.CONFLICT,
    NoSuchJob: HTTPStatus.NOT_FOUND,
    NotExportable: HTTPStatus.CONFLICT,
    BitplanError: HTTPStatus.UNPROCESSABLE_ENTITY,
    IdempotencyConflict: HTTPStatus.CONFLICT,
    InvalidCursor: HTTPStatus.BAD_REQUEST,
    # Rate limits and the job quota pass with time (Retry-After); stored bytes do not.
    Throttled: HTTPStatus.TOO_MANY_REQUESTS,
    StoredBytesQuotaExceeded: HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
    # The bucket behind the artifact store is down or refusing: the request may work later.
    StoreUnavailable: HTTPStatus.SERVICE_UNAVAILABLE,
}


def status_for(error: Exception) -> HTTPStatus:
    """The status of the most specific mapped class: subclasses inherit their base's status."""
    for cls in type(error).__mro__:
        if cls in STATUS_BY_ERROR:
            return STATUS_BY_ERROR[cls]
    raise LookupError(f"{type(error).__name__} has no HTTP status")


def error_body(error: Exception) -> dict[str, Any]:
    """`detail` is the message; `error` names the type so clients can branch without parsing."""
    body: dict[str, Any] = {"detail": str(error), "error": type(error).__name__}
    if isinstance(error, InfeasibleBudget):
        body["smallest_feasible_bits"] = error.smallest_feasible_bits
    return body
