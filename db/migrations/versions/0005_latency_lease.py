"""Latency-table requests hold a lease while a worker measures them.

A request a worker started is `running`; `lease_expires_at` is pushed back by the worker's
heartbeat, and a sweep fails a running request whose lease ran out (its worker died), so no
request stays running forever.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("latency_tables") as batch:
        batch.add_column(sa.Column("lease_expires_at", sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("latency_tables") as batch:
        batch.drop_column("lease_expires_at")
