"""the execution queue: due times, slots, cancel requests; instances' limits

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Every instance now claims PENDING executions from the table (see
docs/decisions/0010-execution-queue.md). PENDING rows written before this revision were held
by the instance that wrote them; they become unclaimed, due at their scheduled time, so any
instance may run them. RUNNING ones keep their instance and hold their job's slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("due_time", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("holds_slot", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(
            sa.Column("force", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("cancel_reason", sa.Text(), nullable=True))
        batch.add_column(sa.Column("epoch", sa.BigInteger(), nullable=True))
    op.execute(
        "UPDATE executions SET due_time = scheduled_time, holds_slot = (state = 'running'), "
        "instance_id = CASE WHEN state = 'pending' THEN '' ELSE instance_id END"
    )
    with op.batch_alter_table("executions") as batch:
        batch.alter_column("due_time", existing_type=sa.DateTime(timezone=True), nullable=False)
        batch.alter_column("holds_slot", server_default=None)
        batch.alter_column("force", server_default=None)
        batch.create_index(
            "ix_executions_claimable",
            ["due_time"],
            postgresql_where=sa.text("state = 'pending' AND instance_id = ''"),
            sqlite_where=sa.text("state = 'pending' AND instance_id = ''"),
        )
        batch.create_index(
            "ix_executions_active",
            ["job_id"],
            postgresql_where=sa.text("state IN ('pending', 'running') OR holds_slot"),
            sqlite_where=sa.text("state IN ('pending', 'running') OR holds_slot"),
        )
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("max_running", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("running", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("instances") as batch:
        batch.alter_column("max_running", server_default=None)
        batch.alter_column("running", server_default=None)


def downgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("running")
        batch.drop_column("max_running")
    with op.batch_alter_table("executions") as batch:
        batch.drop_index("ix_executions_active")
        batch.drop_index("ix_executions_claimable")
        for name in ("epoch", "cancel_reason", "force", "holds_slot", "due_time"):
            batch.drop_column(name)
