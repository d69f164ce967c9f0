"""API keys: issue one (shown once, stored as its sha256), verify, revoke, list for operators.

Never import FastAPI, Celery or torch here.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from db.models import ApiKey, utcnow
from db.repositories.shared import execute_guarded

API_KEY_SCHEME = "bp"


def create_api_key(session: Session, *, tenant: str, name: str | None = None) -> str:
    """A new key for `tenant`, returned in clear this once; only its sha256 is stored.

    The key is `bp_<prefix>_<secret>`: the prefix finds the row and identifies the key in
    listings and revocations without revealing it. Plain sha256 suffices for 256 random bits;
    slow password hashes exist for guessable secrets.
    """
    prefix = secrets.token_hex(4)
    key = f"{API_KEY_SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"
    session.add(ApiKey(tenant=tenant, name=name, prefix=prefix, key_sha256=_sha256_hex(key)))
    session.commit()
    return key


def verify_api_key(session: Session, key: str) -> str | None:
    """The tenant a presented key belongs to, or None if it is unknown, malformed or revoked."""
    scheme, _, rest = key.partition("_")
    prefix, _, secret = rest.partition("_")
    if scheme != API_KEY_SCHEME or not prefix or not secret:
        return None
    digest = _sha256_hex(key)
    candidates = session.scalars(
        select(ApiKey).where(ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
    )
    for candidate in candidates:
        if hmac.compare_digest(candidate.key_sha256, digest):
            return candidate.tenant
    return None


def revoke_api_key(session: Session, *, tenant: str, prefix: str) -> bool:
    revoked = execute_guarded(
        session,
        update(ApiKey)
        .where(ApiKey.tenant == tenant, ApiKey.prefix == prefix, ApiKey.revoked_at.is_(None))
        .values(revoked_at=utcnow()),
    )
    return bool(revoked)


def list_api_keys(
    session: Session, *, tenant: str | None = None, prefix: str | None = None
) -> list[ApiKey]:
    """Keys oldest first, revoked ones included, optionally of one tenant or with one prefix:
    for operators, who identify a key by its prefix (the row holds no key, only its hash)."""
    query = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if tenant is not None:
        query = query.where(ApiKey.tenant == tenant)
    if prefix is not None:
        query = query.where(ApiKey.prefix == prefix)
    return list(session.scalars(query))


def _sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()
