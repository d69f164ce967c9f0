"""Cached cost tables (profiles), keyed by what determines them, so a new budget skips the model.

Never import FastAPI, Celery or torch here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import ColumnElement, select
from sqlalchemy.orm import Session

from db.models import Profile
from db.repositories.shared import canonical_sha256, insert_or_existing


@dataclass(frozen=True)
class ProfileKey:
    """What determines a cost table; equal keys mean the cached table can be reused."""

    model_sha256: str
    data_sha256: str
    method: str
    options_sha256: str

    @classmethod
    def of(
        cls, *, model_sha256: str, data_sha256: str, method: str, options: Mapping[str, Any]
    ) -> ProfileKey:
        return cls(model_sha256, data_sha256, method, canonical_sha256(options))


def get_profile(session: Session, *, tenant: str, key: ProfileKey) -> Profile | None:
    return session.scalar(select(Profile).where(Profile.tenant == tenant, *_profile_key(key)))


def get_profile_by_id(session: Session, *, tenant: str, profile_id: str) -> Profile | None:
    return session.scalar(select(Profile).where(Profile.id == profile_id, Profile.tenant == tenant))


def put_profile(
    session: Session, *, tenant: str, key: ProfileKey, cost_table: Mapping[str, Any]
) -> Profile:
    """Cache a cost table; if one is already cached under the key, that one is kept and
    returned (two jobs profiling the same model at once computed the same table)."""
    profile, _created = insert_or_existing(
        session,
        Profile(
            tenant=tenant,
            model_sha256=key.model_sha256,
            data_sha256=key.data_sha256,
            method=key.method,
            options_sha256=key.options_sha256,
            cost_table=dict(cost_table),
        ),
        lambda: get_profile(session, tenant=tenant, key=key),
    )
    return profile


def _profile_key(key: ProfileKey) -> tuple[ColumnElement[bool], ...]:
    return (
        Profile.model_sha256 == key.model_sha256,
        Profile.data_sha256 == key.data_sha256,
        Profile.method == key.method,
        Profile.options_sha256 == key.options_sha256,
    )
