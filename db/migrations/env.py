"""Alembic environment for bitplan's schema, run by `db.session.migrate` and by the alembic CLI.

Migrations are serialised across processes (an advisory lock on PostgreSQL, an immediate write
transaction on SQLite) because every API and worker process calls `init_db` on start, and a fleet
starting together would otherwise race to create the same tables.

Never import FastAPI, Celery or torch here.
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection, func, select

from db.models import Base
from db.session import make_engine

# Any constant shared by every bitplan process; it names the lock, nothing else.
POSTGRES_MIGRATION_LOCK = 0x6269_7470_6C61_6E  # "bitplan"


def _lock_for_migrations(connection: Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.execute(select(func.pg_advisory_xact_lock(POSTGRES_MIGRATION_LOCK)))
    elif connection.dialect.name == "sqlite":
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def _run(connection: Connection) -> None:
    _lock_for_migrations(connection)
    context.configure(
        connection=connection,
        target_metadata=Base.metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    # The lock opened the transaction, so Alembic leaves committing to us.
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()


def run_migrations() -> None:
    engine = context.config.attributes.get("engine")
    if engine is not None:
        with engine.connect() as connection:
            _run(connection)
        return
    owned = make_engine(context.config.get_main_option("sqlalchemy.url") or None)
    try:
        with owned.connect() as connection:
            _run(connection)
    finally:
        owned.dispose()


if context.is_offline_mode():
    raise SystemExit("bitplan migrations run against a live database; --sql is not supported")
run_migrations()
