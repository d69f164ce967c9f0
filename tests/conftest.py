"""Shared database fixtures: a throwaway PostgreSQL database for integration tests.

Tests that need PostgreSQL take `postgres_url`; it skips them with the reason when no server is
reachable, so the default run stays green on a laptop without one.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator

import psycopg
import pytest
from psycopg import sql
from sqlalchemy import make_url

POSTGRES_ADMIN_URL_ENV = "BITPLAN_TEST_POSTGRES_URL"
DEFAULT_POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture(scope="session")
def postgres_url() -> Iterator[str]:
    """A fresh `bitplan_test_<random>` database for this test session, dropped afterwards, so
    runs never see each other's rows or leave any behind."""
    admin_url = os.environ.get(POSTGRES_ADMIN_URL_ENV, DEFAULT_POSTGRES_ADMIN_URL)
    try:
        admin = psycopg.connect(admin_url, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as error:
        pytest.skip(
            f"PostgreSQL unreachable at {admin_url} (set {POSTGRES_ADMIN_URL_ENV}): {error}"
        )
    name = f"bitplan_test_{secrets.token_hex(4)}"
    with admin:
        admin.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        try:
            yield make_url(admin_url).set(database=name).render_as_string(hide_password=False)
        finally:
            admin.execute(sql.SQL("DROP DATABASE {} WITH (FORCE)").format(sql.Identifier(name)))
