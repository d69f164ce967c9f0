"""The cache of what jobs computed, shared by every process that shares the database and the
artifact store: a worker on another machine finds what this one computed.

`allocator.cache.FolderCache` keeps entries in one machine's folder; a service's workers run on
machines that share nothing but the database, the broker and the store, so `StoreCache` keeps
each entry as an object in the store's `cache` namespace and a row (`db.models.CacheEntry`)
that names it by its content key. Keys hash the weights, the data, the options and the code
version, never a tenant, so only content-identical work is shared between tenants.

The namespace keeps cache objects apart from uploads and artifacts (a bucket's
`<prefix>/cache/sha256/<hex>`, a folder's `artifacts/cache/`), so evicting an entry may delete
its object once no cache row names it without ever touching bytes a job or an upload refers
to. Each object also holds its own key, so two keys never share an object and an entry read
back under another key (a row edited by hand) is refused.

Values are written with `torch.save` to a temporary file that is streamed into the store, and
read with `torch.load(weights_only=True)`: an object can never run code when it is loaded,
whoever wrote to the bucket. A row whose object is gone or unreadable is deleted and the job
recomputes. Imports torch: only processes that run jobs build one.
"""

from __future__ import annotations

import logging
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from sqlalchemy.orm import Session, sessionmaker

from allocator.cache import DEFAULT_MAX_BYTES, MAX_ENTRY_BYTES
from db import repositories
from db.home import bitplan_home
from db.store import ArtifactStore, StoreUnavailable

log = logging.getLogger(__name__)

NAMESPACE = "cache"
"""The store namespace of cache objects (`ArtifactStore.namespace`)."""


class StoreCache:
    """`allocator.cache.Cache` over the database and the artifact store; at most `max_bytes`
    in all, least recently used entries out first.

    Safe to share between threads and processes: every call opens its own short sessions, and
    concurrent writers of one key both succeed (the first row is kept). A store that fails is
    a miss or an entry not kept, not a failed job: the cache only saves work. A database that
    fails fails the attempt, as it would at the job's next progress write anyway.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        artifacts: ArtifactStore,
        *,
        max_bytes: int = DEFAULT_MAX_BYTES,
        temp_dir: Path | None = None,
    ) -> None:
        """`artifacts` is the deployment's artifact store; entries go to its cache namespace.
        `temp_dir` holds values while they are serialised (default: `$BITPLAN_HOME/tmp`, on
        disk rather than a memory-backed /tmp, since an entry may be a gigabyte)."""
        self.sessions = sessions
        self.store = artifacts.namespace(NAMESPACE)
        self.max_bytes = max_bytes
        self.temp_dir = temp_dir if temp_dir is not None else bitplan_home() / "tmp"

    def get(self, key: str) -> Any | None:
        _check_key(key)
        with self.sessions() as session:
            entry = repositories.find_cache_entry(session, key=key)
            if entry is None:
                return None
            uri = entry.uri
        try:
            stored = torch.load(self.store.path(uri), weights_only=True)
        except StoreUnavailable as error:
            log.warning("cache entry %s: store unavailable, recomputing: %s", key, error)
            return None
        except Exception as error:  # gone (UnknownObject), torn, foreign or hostile
            log.warning("cache entry %s: dropped, its object does not load: %s", key, error)
            self._drop(key, uri)
            return None
        if not (isinstance(stored, dict) and stored.get("key") == key and "value" in stored):
            log.warning("cache entry %s: dropped, its object holds another entry", key)
            self._drop(key, uri)
            return None
        with self.sessions() as session:
            repositories.touch_cache_entry(session, key=key)
        return stored["value"]

    def put(self, key: str, value: Any) -> None:
        _check_key(key)
        self.temp_dir.mkdir(parents=True, exist_ok=True)
        handle, name = tempfile.mkstemp(dir=self.temp_dir, prefix=".cache-")
        temp = Path(name)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save({"key": key, "value": value}, file)
            if temp.stat().st_size > min(MAX_ENTRY_BYTES, self.max_bytes):
                return
            stored = self.store.put_file(temp)
        except StoreUnavailable as error:
            log.warning("cache entry %s: not kept, store unavailable: %s", key, error)
            return
        finally:
            temp.unlink(missing_ok=True)
        with self.sessions() as session:
            repositories.put_cache_entry(session, key=key, uri=stored.uri, size=stored.size)
        self._evict()

    def _drop(self, key: str, uri: str) -> None:
        """Forget an entry whose object failed to load, and the object if nothing names it."""
        with self.sessions() as session:
            unused = repositories.drop_cache_entry(
                session, key=key, uri=uri
            ) and not repositories.cache_uri_in_use(session, uri=uri)
        if unused:
            self._delete(uri)

    def _evict(self) -> None:
        with self.sessions() as session:
            unused = repositories.evict_cache_entries(session, max_bytes=self.max_bytes)
        for uri in unused:
            self._delete(uri)

    def _delete(self, uri: str) -> None:
        """A failed delete leaves an object no row names: wasted space, never a wrong value."""
        try:
            self.store.delete(uri)
        except StoreUnavailable as error:
            log.warning("cache object %s: not deleted: %s", uri, error)


def _check_key(key: str) -> None:
    if len(key) != 64 or not all(c in "0123456789abcdef" for c in key):
        raise ValueError(f"not a cache key: {key[:80]!r}")
