"""Verified API keys remembered for a few seconds, per API process.

A status poll is most of the API's traffic, and without this every poll costs two queries: the
key, then the job. Remembering the tenant of a verified key for `ttl` seconds makes it one. The
price is that a revoked key keeps working for at most `ttl` seconds in a process that verified
it just before; `BITPLAN_KEY_CACHE_SECONDS=0` turns the cache off. Only a sha256 of the key is
kept, never the key itself, and unknown keys are never remembered, so a guessed key is checked
against the database every time.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections import OrderedDict


class KeyCache:
    """sha256(key) -> (tenant, expiry), least recently used first out beyond `size` entries."""

    def __init__(self, ttl: float, size: int = 4096) -> None:
        self.ttl = ttl
        self.size = size
        self._entries: OrderedDict[str, tuple[str, float]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, key: str) -> str | None:
        if self.ttl <= 0:
            return None
        digest = _digest(key)
        with self._lock:
            entry = self._entries.get(digest)
            if entry is None:
                return None
            tenant, expiry = entry
            if expiry <= time.monotonic():
                del self._entries[digest]
                return None
            self._entries.move_to_end(digest)
            return tenant

    def put(self, key: str, tenant: str) -> None:
        if self.ttl <= 0:
            return
        digest = _digest(key)
        with self._lock:
            self._entries[digest] = (tenant, time.monotonic() + self.ttl)
            self._entries.move_to_end(digest)
            while len(self._entries) > self.size:
                self._entries.popitem(last=False)


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
