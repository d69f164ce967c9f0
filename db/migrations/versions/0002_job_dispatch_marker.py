"""Jobs remember which attempt their last broker message was sent for.

The Celery sweeper finds queued jobs that have no message in the broker (never sent, requeued
after a lost worker, or lost with a restarted broker) by comparing `dispatched_attempt` with
`attempts`; the embedded executor claims from the table and never reads it.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("dispatched_attempt", sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("dispatched_attempt")
