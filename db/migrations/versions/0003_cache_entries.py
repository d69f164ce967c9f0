"""The shared cache of what jobs computed: one row per content key, naming its stored object.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "cache_entries",
        sa.Column("key", sa.String(64), nullable=False),
        sa.Column("uri", sa.String(1024), nullable=False),
        sa.Column("size", sa.BigInteger(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("key", name=op.f("pk_cache_entries")),
    )
    op.create_index("ix_cache_entries_last_used", "cache_entries", ["last_used"])
    op.create_index(op.f("ix_cache_entries_uri"), "cache_entries", ["uri"])


def downgrade() -> None:
    op.drop_index(op.f("ix_cache_entries_uri"), table_name="cache_entries")
    op.drop_index("ix_cache_entries_last_used", table_name="cache_entries")
    op.drop_table("cache_entries")
