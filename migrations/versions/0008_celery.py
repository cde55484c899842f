"""Celery dispatch: a job's executor, and what a dispatched execution needs

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-01

jobs.executor ('inline' or 'celery') and jobs.celery (queue, routing key, priority);
executions.executor, celery_task_id, worker, pending_reason, dispatch_time and
lease_expire_time (see docs/decisions/0014-celery-dispatch.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(
            sa.Column("executor", sa.String(16), nullable=False, server_default="inline")
        )
        batch.add_column(sa.Column("celery", sa.JSON(none_as_null=True), nullable=True))
    with op.batch_alter_table("executions") as batch:
        batch.add_column(
            sa.Column("executor", sa.String(16), nullable=False, server_default="inline")
        )
        batch.add_column(sa.Column("celery_task_id", sa.String(64), nullable=True))
        batch.add_column(sa.Column("worker", sa.String(256), nullable=False, server_default=""))
        batch.add_column(sa.Column("pending_reason", sa.Text, nullable=False, server_default=""))
        batch.add_column(sa.Column("dispatch_time", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(sa.Column("lease_expire_time", sa.DateTime(timezone=True), nullable=True))
    op.create_index(
        "ix_executions_leased",
        "executions",
        ["lease_expire_time"],
        postgresql_where=sa.text("state = 'running' AND executor = 'celery'"),
        sqlite_where=sa.text("state = 'running' AND executor = 'celery'"),
    )


def downgrade() -> None:
    op.drop_index("ix_executions_leased", table_name="executions")
    with op.batch_alter_table("executions") as batch:
        for column in (
            "lease_expire_time",
            "dispatch_time",
            "pending_reason",
            "worker",
            "celery_task_id",
            "executor",
        ):
            batch.drop_column(column)
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("celery")
        batch.drop_column("executor")
