"""scheduling policies: misfire, overlap, retry, timeout, history; attempts and notes

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23

Jobs created before this revision recorded every missed fire as MISSED and never ran it, so
they get misfire_policy 'skip' (unless coalesce was off, which meant nothing then either).
The coalesce column goes: misfire_policy says the same and more.
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
        batch.add_column(
            sa.Column("misfire_policy", sa.String(16), nullable=False, server_default="skip")
        )
        batch.add_column(sa.Column("catchup_window_seconds", sa.Float(), nullable=True))
        batch.add_column(
            sa.Column("catchup_limit", sa.Integer(), nullable=False, server_default="10")
        )
        batch.add_column(
            sa.Column("overlap_policy", sa.String(16), nullable=False, server_default="skip")
        )
        batch.add_column(sa.Column("retry", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("timeout_seconds", sa.Float(), nullable=True))
        batch.add_column(
            sa.Column("history_limit", sa.Integer(), nullable=False, server_default="0")
        )
        batch.drop_column("coalesce")
    with op.batch_alter_table("jobs") as batch:
        for name in ("misfire_policy", "catchup_limit", "overlap_policy", "history_limit"):
            batch.alter_column(name, server_default=None)

    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("attempt", sa.Integer(), nullable=False, server_default="1"))
        batch.add_column(sa.Column("first_execution_id", sa.String(32), nullable=True))
        batch.add_column(sa.Column("error_type", sa.String(256), nullable=False, server_default=""))
        batch.add_column(sa.Column("missed", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("note", sa.Text(), nullable=False, server_default=""))
        batch.create_index("ix_executions_end_time", ["end_time"])
    with op.batch_alter_table("executions") as batch:
        for name in ("attempt", "error_type", "note"):
            batch.alter_column(name, server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.drop_index("ix_executions_end_time")
        for name in ("note", "missed", "error_type", "first_execution_id", "attempt"):
            batch.drop_column(name)
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("coalesce", sa.Boolean(), nullable=False, server_default=sa.true())
        )
        for name in (
            "history_limit",
            "timeout_seconds",
            "retry",
            "overlap_policy",
            "catchup_limit",
            "catchup_window_seconds",
            "misfire_policy",
        ):
            batch.drop_column(name)
    with op.batch_alter_table("jobs") as batch:
        batch.alter_column("coalesce", server_default=None)
