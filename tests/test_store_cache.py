"""The cache shared through the database and the store (`db.cache.StoreCache`), on SQLite and
PostgreSQL, over a folder and an S3 bucket: what it keeps, what it refuses to load, how it
forgets, and two writers of one key.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from sqlalchemy import Engine, select
from sqlalchemy.orm import Session, sessionmaker

from allocator.cache import cached, digest
from db import repositories as repo
from db.cache import StoreCache
from db.models import CacheEntry
from db.session import make_session_factory
from db.store import ArtifactStore, FolderStore, StoreConfig, open_store
from tests.s3_server import Bucket
from tests.test_cache import check_round_trip
from tests.test_db import in_threads


@pytest.fixture
def sessions(engine: Engine) -> sessionmaker[Session]:
    return make_session_factory(engine)


def folder_cache(sessions: sessionmaker[Session], tmp_path: Path, **options: int) -> StoreCache:
    return StoreCache(
        sessions, FolderStore(tmp_path / "artifacts"), temp_dir=tmp_path / "tmp", **options
    )


def rows(sessions: sessionmaker[Session]) -> dict[str, CacheEntry]:
    with sessions() as session:
        return {entry.key: entry for entry in session.scalars(select(CacheEntry))}


def stored_size(sessions: sessionmaker[Session], tmp_path: Path, value: object) -> int:
    """How many bytes one entry of `value` takes in the store."""
    probe = folder_cache(sessions, tmp_path / "probe")
    probe.put(digest("probe"), value)
    size = rows(sessions)[digest("probe")].size
    with sessions() as session:
        repo.drop_cache_entry(session, key=digest("probe"), uri=rows(sessions)[digest("probe")].uri)
    return size


def test_an_entry_reads_back_as_it_was_written(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    cache = folder_cache(sessions, tmp_path)
    key = check_round_trip(cache)
    (entry,) = rows(sessions).values()
    assert entry.key == key and entry.last_used >= entry.created_at
    # In the store's cache namespace, apart from artifacts, under its content digest.
    sha256 = entry.uri.removeprefix("cas://sha256/")
    assert (tmp_path / "artifacts" / "cache" / sha256[:2] / sha256).stat().st_size == entry.size
    assert not list((tmp_path / "tmp").iterdir()), "the serialised temporary file is removed"
    with pytest.raises(ValueError, match="not a cache key"):
        cache.get("../../etc/passwd")


def test_two_workers_storing_one_key_both_succeed(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    key = digest("raced")
    caches = [folder_cache(sessions, tmp_path / f"worker-{index}") for index in range(2)]

    in_threads(2, lambda index: caches[index].put(key, {"x": torch.full((64,), 3.0)}))

    assert list(rows(sessions)) == [key]
    for cache in caches:
        assert torch.equal(cache.get(key)["x"], torch.full((64,), 3.0))


def test_an_entry_whose_object_is_gone_is_forgotten_and_recomputed(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    cache = folder_cache(sessions, tmp_path)
    key = digest("gone")
    cache.put(key, {"x": torch.ones(3)})
    cache.store.delete(rows(sessions)[key].uri)

    assert cache.get(key) is None
    assert rows(sessions) == {}
    assert cached(cache, key, lambda: 7) == (7, False)
    assert cached(cache, key, lambda: 8) == (7, True)


def test_an_object_that_would_run_code_is_never_loaded(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    """Objects are read with `weights_only`: one naming a callable is refused, row and object
    deleted, and nothing it names is ever called."""
    cache = folder_cache(sessions, tmp_path)
    key = digest("hostile")
    hostile = tmp_path / "hostile.pt"
    marker = tmp_path / "pwned"
    torch.save({"key": key, "value": _Exploit(str(marker))}, hostile)
    stored = cache.store.put_file(hostile)
    with sessions() as session:
        repo.put_cache_entry(session, key=key, uri=stored.uri, size=stored.size)

    assert cache.get(key) is None
    assert not marker.exists()
    assert rows(sessions) == {}
    assert not (tmp_path / "artifacts" / "cache" / stored.sha256[:2] / stored.sha256).exists()


class _Exploit:
    """Unpickling this would create a file (with `weights_only=False`)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.mkdir, (self.path,))


def test_an_object_holding_another_key_is_refused(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    cache = folder_cache(sessions, tmp_path)
    cache.put(digest("a"), {"x": torch.ones(2)})
    with sessions() as session:
        repo.put_cache_entry(session, key=digest("b"), uri=rows(sessions)[digest("a")].uri, size=1)

    assert cache.get(digest("b")) is None
    assert set(rows(sessions)) == {digest("a")}
    assert torch.equal(cache.get(digest("a"))["x"], torch.ones(2)), "a's object is kept"


def test_the_least_recently_used_entries_go_first_over_the_bound(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    size = stored_size(sessions, tmp_path, torch.zeros(900))
    cache = folder_cache(sessions, tmp_path, max_bytes=int(size * 2.5))
    first, second, third = (digest(name) for name in ("first", "second", "third"))
    cache.put(first, torch.zeros(900))
    cache.put(second, torch.ones(900))
    second_uri = rows(sessions)[second].uri
    assert cache.get(first) is not None  # first is now the most recently used
    cache.put(third, torch.full((900,), 2.0))

    assert set(rows(sessions)) == {first, third}
    assert cache.get(second) is None
    with pytest.raises(LookupError):
        cache.store.path(second_uri)
    with sessions() as session:
        assert repo.cache_bytes(session) <= cache.max_bytes


def test_an_entry_above_the_bound_is_not_kept(
    sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    cache = folder_cache(sessions, tmp_path, max_bytes=1000)
    cache.put(digest("big"), torch.zeros(1000))
    assert rows(sessions) == {}
    assert cache.get(digest("big")) is None


def test_two_machines_share_entries_through_the_bucket(
    sessions: sessionmaker[Session], s3_bucket: Bucket, tmp_path: Path
) -> None:
    """Separate homes, one database and one bucket: what one computed, the other reads; an
    evicted entry's object leaves the bucket; artifacts' keys are never touched."""

    def machine(name: str, max_bytes: int) -> StoreCache:
        home = tmp_path / name
        store = open_store(StoreConfig(s3_bucket.url, s3_bucket.endpoint), home=home)
        return StoreCache(sessions, store, max_bytes=max_bytes, temp_dir=home / "tmp")

    artifacts: ArtifactStore = open_store(
        StoreConfig(s3_bucket.url, s3_bucket.endpoint), home=tmp_path / "api"
    )
    artifact = artifacts.put_bytes(b"a packed model")
    size = stored_size(sessions, tmp_path, torch.zeros(900))
    one, two = machine("one", int(size * 1.5)), machine("two", int(size * 1.5))
    first, second = digest("first"), digest("second")

    one.put(first, torch.zeros(900))
    assert torch.equal(two.get(first), torch.zeros(900))
    objects = s3_bucket.keys()
    assert len([name for name in objects if name.startswith("artifacts/cache/sha256/")]) == 1

    two.put(second, torch.ones(900))
    assert set(rows(sessions)) == {second}
    assert torch.equal(one.get(second), torch.ones(900))
    assert one.get(first) is None
    assert set(s3_bucket.keys()) == {
        f"artifacts/sha256/{artifact.sha256}",
        f"artifacts/cache/sha256/{rows(sessions)[second].uri.removeprefix('cas://sha256/')}",
    }
