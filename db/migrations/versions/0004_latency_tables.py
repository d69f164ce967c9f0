"""Measured latency tables (issue 14): per layer and choice, keyed by model digest, input
shape, runtime, runtime version and machine fingerprint; also the requests to measure one on a
target machine's queue.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

JSON_TYPE = sa.JSON().with_variant(JSONB(), "postgresql")


def upgrade() -> None:
    op.create_table(
        "latency_tables",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("tenant", sa.String(64), nullable=False),
        sa.Column(
            "status",
            sa.Enum(
                "queued",
                "running",
                "succeeded",
                "failed",
                name="latency_status",
                native_enum=False,
                create_constraint=True,
                length=16,
            ),
            nullable=False,
        ),
        sa.Column("request", JSON_TYPE, nullable=False),
        sa.Column("input_shape", sa.String(64), nullable=False),
        sa.Column("runtime", sa.String(32), nullable=False),
        sa.Column("queue", sa.String(64), nullable=True),
        sa.Column("model_sha256", sa.String(64), nullable=True),
        sa.Column("runtime_version", sa.String(64), nullable=True),
        sa.Column("machine_sha256", sa.String(64), nullable=True),
        sa.Column("table", JSON_TYPE, nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_latency_tables")),
    )
    op.create_index(
        "ix_latency_tables_key",
        "latency_tables",
        ["tenant", "model_sha256", "input_shape", "runtime", "runtime_version", "machine_sha256"],
    )
    op.create_index("ix_latency_tables_tenant_created", "latency_tables", ["tenant", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_latency_tables_tenant_created", table_name="latency_tables")
    op.drop_index("ix_latency_tables_key", table_name="latency_tables")
    op.drop_table("latency_tables")
