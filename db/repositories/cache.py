"""The shared cache's rows: which stored object holds the value of which content key.

A row is written after its object is in the store and deleted before its object is, so a
reader may find a row whose object is gone (a concurrent eviction, a bucket emptied by hand)
but never an object that no row will ever remove. Every write tolerates a concurrent writer of
the same key: two workers that computed the same value both succeed.

Never import FastAPI, Celery or torch here.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session

from db.models import CacheEntry, utcnow
from db.repositories.shared import insert_or_existing


def find_cache_entry(session: Session, *, key: str) -> CacheEntry | None:
    return session.get(CacheEntry, key)


def put_cache_entry(
    session: Session, *, key: str, uri: str, size: int, now: datetime | None = None
) -> tuple[CacheEntry, bool]:
    """The row for `key`, and whether it is new. A row already there (another worker stored the
    same key first) is kept and marked used: its object holds the same value, and replacing it
    could delete an object a reader is loading."""
    now = now or utcnow()
    entry, created = insert_or_existing(
        session,
        CacheEntry(key=key, uri=uri, size=size, created_at=now, last_used=now),
        lambda: find_cache_entry(session, key=key),
    )
    if not created:
        touch_cache_entry(session, key=key, now=now)
    return entry, created


def touch_cache_entry(session: Session, *, key: str, now: datetime | None = None) -> None:
    """Mark the entry used now: it moves to the back of the eviction order."""
    session.execute(
        update(CacheEntry).where(CacheEntry.key == key).values(last_used=now or utcnow())
    )
    session.commit()


def drop_cache_entry(session: Session, *, key: str, uri: str) -> bool:
    """Delete the row if it still names `uri` (a concurrent writer may have replaced it since
    it was read); whether this call deleted it."""
    deleted = session.execute(
        delete(CacheEntry).where(CacheEntry.key == key, CacheEntry.uri == uri)
    ).rowcount
    session.commit()
    return bool(deleted)


def cache_uri_in_use(session: Session, *, uri: str) -> bool:
    """Whether any row still names the object: only an object no row names may be deleted."""
    return session.scalar(select(CacheEntry.key).where(CacheEntry.uri == uri).limit(1)) is not None


def cache_bytes(session: Session) -> int:
    """What the cache's rows say it holds, in bytes."""
    return int(session.scalar(select(func.coalesce(func.sum(CacheEntry.size), 0))))


def evict_cache_entries(session: Session, *, max_bytes: int) -> list[str]:
    """Delete the least recently used rows until the rest hold at most `max_bytes`; the URIs
    of the deleted rows that no row names any more, for the caller to delete from the store.
    Several processes may evict at once: each row is deleted by one of them."""
    excess = cache_bytes(session) - max_bytes
    if excess <= 0:
        return []
    oldest = session.execute(
        select(CacheEntry.key, CacheEntry.uri, CacheEntry.size).order_by(
            CacheEntry.last_used, CacheEntry.key
        )
    )
    victims = []
    for key, uri, size in oldest:
        if excess <= 0:
            break
        victims.append((key, uri))
        excess -= size
    session.rollback()
    unused = []
    for key, uri in victims:
        if drop_cache_entry(session, key=key, uri=uri) and not cache_uri_in_use(session, uri=uri):
            unused.append(uri)
    return unused
