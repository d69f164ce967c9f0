"""A migrated, empty database on each backend, as fixtures for every test module that needs
one (registered by `pytest_plugins` in conftest): `engine` runs its test on SQLite and, under
`-m integration`, on PostgreSQL, because the two enforce concurrency differently (row locks with
SKIP LOCKED versus one database write lock).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import Engine, text

from db.models import Base
from db.session import init_db


@pytest.fixture(scope="session")
def postgres_engine(postgres_url: str) -> Iterator[Engine]:
    engine = init_db(postgres_url)
    yield engine
    engine.dispose()


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.integration)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A migrated, empty database on each backend."""
    if request.param == "sqlite":
        engine = init_db(f"sqlite:///{tmp_path / 'bitplan.db'}")
        yield engine
        engine.dispose()
        return
    engine = request.getfixturevalue("postgres_engine")
    tables = ", ".join(table.name for table in Base.metadata.sorted_tables)
    with engine.begin() as connection:
        connection.execute(text(f"TRUNCATE {tables} CASCADE"))
    yield engine
