"""Engines, sessions and schema start-up for both deployments.

Embedded runs on one SQLite file and distributed runs on PostgreSQL; everything that differs
between the two at the connection level is decided here, once, so repositories can stay
backend-neutral. `init_db` applies the Alembic migrations shipped inside this package, so an
installed bitplan upgrades its own schema on start without an alembic.ini or a particular
working directory.

Never import FastAPI, Celery or torch here.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Engine, create_engine, event, make_url
from sqlalchemy.orm import Session, sessionmaker

from db.home import bitplan_home

DATABASE_URL_ENV = "BITPLAN_DATABASE_URL"
MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
# Long enough to ride out another worker's write transaction, short enough to surface a deadlock.
SQLITE_BUSY_TIMEOUT_MS = 30_000
# Alembic's command API swaps module-global proxies (`alembic.context`, `alembic.op`) in and out,
# so two threads migrating at once corrupt each other; processes are serialised in env.py.
_MIGRATION_THREAD_LOCK = threading.Lock()
POOL_SIZE = 20
POOL_OVERFLOW = 20


def default_url(home: Path) -> str:
    """The embedded database: one SQLite file in the bitplan home folder."""
    return URL.create(
        "sqlite", database=str(Path(home).resolve() / "bitplan.db")
    ).render_as_string()


def database_url() -> str:
    """`$BITPLAN_DATABASE_URL`, else the SQLite file under `$BITPLAN_HOME`."""
    return os.environ.get(DATABASE_URL_ENV) or default_url(bitplan_home())


def normalize_url(url: str | URL) -> URL:
    """Route PostgreSQL URLs to psycopg 3, the only PostgreSQL driver bitplan installs.

    Operators paste `postgres://` or `postgresql://` URLs from their platform; SQLAlchemy would
    pick psycopg2 for the second and reject the first.
    """
    if isinstance(url, str) and url.startswith("postgres://"):
        url = "postgresql://" + url.removeprefix("postgres://")
    parsed = make_url(url)
    if parsed.drivername == "postgresql":
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def make_engine(url: str | URL | None = None, *, echo: bool = False) -> Engine:
    """An engine configured for how bitplan uses the backend; `None` means `database_url()`."""
    parsed = normalize_url(url if url is not None else database_url())
    if parsed.get_backend_name() != "sqlite":
        # pool_pre_ping: long-lived workers survive a PostgreSQL restart without a failed job.
        # A connection opened above the pool size is closed again on return, and PostgreSQL
        # forks a backend for each new one: a pool well above the default 5 keeps a burst of
        # status polls from spending its time connecting.
        return create_engine(
            parsed, echo=echo, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW
        )
    database = parsed.database
    if database and database != ":memory:" and not database.startswith("file:"):
        Path(database).parent.mkdir(parents=True, exist_ok=True)
    # API threads and inline worker threads share the pool, hence check_same_thread=False.
    engine = create_engine(parsed, echo=echo, connect_args={"check_same_thread": False})
    event.listen(engine, "connect", _configure_sqlite_connection)
    return engine


def _configure_sqlite_connection(dbapi_connection: Any, _record: Any) -> None:
    """WAL lets API readers proceed while a worker writes; foreign keys are off by default in
    SQLite; the busy timeout makes concurrent writers wait for the lock instead of failing."""
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        cursor.execute("PRAGMA synchronous=NORMAL")
    finally:
        cursor.close()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions whose objects stay readable after commit: repositories commit before returning."""
    return sessionmaker(bind=engine, expire_on_commit=False)


def make_read_session_factory(engine: Engine) -> sessionmaker[Session]:
    """Sessions for requests that only read: each statement commits on its own, so no BEGIN is
    sent and returning the connection to the pool needs no ROLLBACK round trip. Status polls,
    most of the API's traffic, then cost one query (and the pool's ping)."""
    return sessionmaker(
        bind=engine.execution_options(isolation_level="AUTOCOMMIT"), expire_on_commit=False
    )


def alembic_config(engine: Engine | None = None) -> Config:
    """An Alembic config pointing at the migrations inside this package.

    With an engine, migrations run on it; without, `db/migrations/env.py` uses `database_url()`.
    """
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    if engine is not None:
        config.attributes["engine"] = engine
    return config


def migrate(engine: Engine, revision: str = "head") -> None:
    """Bring the schema to `revision`; safe to call from several threads and processes at once."""
    with _MIGRATION_THREAD_LOCK:
        command.upgrade(alembic_config(engine), revision)


def init_db(url: str | URL | None = None) -> Engine:
    """The start-up call: an engine on an up-to-date schema."""
    engine = make_engine(url)
    migrate(engine)
    return engine
