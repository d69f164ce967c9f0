"""Quotas and rate limits: how much of the server one key, one client address or one tenant can
take, each refused before the work it guards is done.

- Requests per second per API key: a token bucket per key, so one busy or runaway client slows
  only itself. Checked on every authenticated request, cheap enough for the status-poll path.
- Failed authentications per client address: once an address has presented too many bad keys
  within a minute, its unknown keys are refused before the database is asked, so guessing keys
  costs the server nothing.
- Per tenant, queued and running jobs and stored bytes (uploads plus job artifacts): checked in
  the routes before anything is written.

The first two are kept in memory by each API process (with N processes a key gets N times the
rate); the tenant quotas are read from the database and hold across processes, give or take the
submissions that race past the check together.

Never imports FastAPI: these errors are mapped to statuses in `service.errors`, like the others.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

from sqlalchemy.orm import Session

from db import repositories
from service.settings import Settings

WINDOW_SECONDS = 60.0
"""The window in which failed authentications of one address are counted."""

QUOTA_RETRY_SECONDS = 60
"""Retry-After for a full job queue: jobs end at their own pace, so this is a polling interval."""


class Throttled(Exception):
    """A refusal that passes with time: 429, with `Retry-After` in whole seconds (at least 1)."""

    def __init__(self, message: str, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = max(1, math.ceil(retry_after))

    @property
    def headers(self) -> dict[str, str]:
        """Response headers, by the convention of Starlette's `HTTPException.headers`."""
        return {"Retry-After": str(self.retry_after)}


class RateLimited(Throttled):
    """One key sent requests faster than its bucket refills."""


class TooManyFailedAuthentications(Throttled):
    """A client address presented too many keys that failed within the window."""


class ActiveJobsQuotaExceeded(Throttled):
    """The request would take a tenant's queued and running jobs over its quota."""


class StoredBytesQuotaExceeded(Exception):
    """A tenant's uploads and artifacts are at (or an upload would take them over) its quota;
    waiting does not help, so this is a 413 without Retry-After."""


class RequestRate:
    """A token bucket per key: `burst` requests at once, refilled at `per_second`.

    Buckets are keyed by tenant and key prefix, never by the key, and kept in a least recently
    used table of at most `size` keys. Used on the event loop only (in `get_tenant`), so it
    takes no lock.
    """

    def __init__(self, per_second: float, burst: int, size: int = 65_536) -> None:
        self.per_second = per_second
        self.burst = burst
        self.size = size
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def take(self, tenant: str, key: str) -> None:
        """Spend one token of the key's bucket; RateLimited if it has none."""
        prefix = key.partition("_")[2].partition("_")[0]
        who = f"{tenant}:{prefix}"
        now = time.monotonic()
        tokens, then = self._buckets.pop(who, (self.burst, now))
        tokens = min(self.burst, tokens + (now - then) * self.per_second)
        if tokens >= 1:
            self._buckets[who] = (tokens - 1, now)
            _bound(self._buckets, self.size)
            return
        self._buckets[who] = (tokens, now)
        raise RateLimited(
            f"key {prefix} of tenant {tenant} is over its rate limit of {self.per_second:g} "
            f"requests/s (bursts of {self.burst}); slow down and retry after the Retry-After "
            "seconds, or ask the operator to raise BITPLAN_RATE_LIMIT_PER_SECOND or "
            "BITPLAN_RATE_LIMIT_BURST",
            (1 - tokens) / self.per_second,
        )


class FailedAuthentications:
    """Failed keys counted per client address, in windows of `WINDOW_SECONDS` from the first.

    An address with `per_minute` failures in its window is refused until the window ends, with
    one exception: a key this process has verified before (remembered by its sha256) is still
    checked, so a legitimate client behind the same address as a guesser keeps working. Both
    tables are least recently used first out beyond `size` entries, so a flood from many
    addresses evicts old entries rather than growing memory. Event loop only, no lock.
    """

    def __init__(self, per_minute: int, size: int = 10_000) -> None:
        self.per_minute = per_minute
        self.size = size
        self._windows: OrderedDict[str, tuple[float, int]] = OrderedDict()
        self._verified: OrderedDict[str, None] = OrderedDict()

    def check(self, address: str, key: str) -> None:
        """TooManyFailedAuthentications if `address` is over its limit and `key` is not one
        verified before; called before the key is looked up."""
        window = self._windows.get(address)
        if window is None:
            return
        started, failures = window
        remaining = started + WINDOW_SECONDS - time.monotonic()
        if remaining <= 0:
            del self._windows[address]
        elif failures >= self.per_minute and _digest(key) not in self._verified:
            raise TooManyFailedAuthentications(
                f"{failures} keys from {address} failed within {WINDOW_SECONDS:g} s; check the "
                "key you send and retry after the Retry-After seconds (the operator sets "
                "BITPLAN_AUTH_FAILURES_PER_MINUTE)",
                remaining,
            )

    def failed(self, address: str, key: str) -> None:
        self._verified.pop(_digest(key), None)  # a revoked key is a guess from now on
        now = time.monotonic()
        started, failures = self._windows.pop(address, (now, 0))
        if now - started >= WINDOW_SECONDS:
            started, failures = now, 0
        self._windows[address] = (started, failures + 1)
        _bound(self._windows, self.size)

    def succeeded(self, key: str) -> None:
        digest = _digest(key)
        self._verified.pop(digest, None)
        self._verified[digest] = None
        _bound(self._verified, self.size)


def check_active_jobs(session: Session, tenant: str, settings: Settings, adding: int) -> None:
    """ActiveJobsQuotaExceeded unless the tenant's queued and running jobs plus `adding` fit
    `max_active_jobs_per_tenant`; a sweep passes all its jobs at once, so it is refused whole."""
    allowed = settings.max_active_jobs_per_tenant
    used = repositories.count_active_jobs(session, tenant=tenant)
    if used + adding > allowed:
        raise ActiveJobsQuotaExceeded(
            f"tenant {tenant} has {used} queued or running jobs of the {allowed} allowed, and "
            f"this request adds {adding}; wait for jobs to end or cancel some, or ask the "
            "operator to raise BITPLAN_MAX_ACTIVE_JOBS_PER_TENANT",
            QUOTA_RETRY_SECONDS,
        )


def check_stored_bytes(session: Session, tenant: str, settings: Settings, incoming: int) -> None:
    """StoredBytesQuotaExceeded if the tenant's stored bytes are at `max_stored_bytes_per_tenant`
    already, or would pass it with `incoming` more (an upload's declared length)."""
    allowed = settings.max_stored_bytes_per_tenant
    used = repositories.stored_bytes(session, tenant=tenant)
    if used >= allowed or used + incoming > allowed:
        raise StoredBytesQuotaExceeded(
            f"tenant {tenant} stores {used:,} bytes of the {allowed:,} allowed, and this upload "
            f"declares {incoming:,} more; ask the operator to raise "
            "BITPLAN_MAX_STORED_BYTES_PER_TENANT"
        )


def declared_bytes(headers: Mapping[str, str]) -> int:
    """The request's Content-Length, 0 when absent or malformed: the body limit middleware
    counts what actually arrives either way."""
    try:
        return max(0, int(headers.get("content-length", "0")))
    except ValueError:
        return 0


def _bound(table: OrderedDict[str, Any], size: int) -> None:
    while len(table) > size:
        table.popitem(last=False)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
