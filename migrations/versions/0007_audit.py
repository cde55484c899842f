"""Who changed what: actors on jobs and executions, and the audit log

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01

created_by and updated_by on jobs, triggered_by and cancelled_by on executions, written in
the transaction of the change; audit_events holds one row per call of a mutating RPC, allowed
or refused (see docs/decisions/0013-audit.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("created_by", sa.String(256), nullable=False, server_default=""))
        batch.add_column(sa.Column("updated_by", sa.String(256), nullable=False, server_default=""))
    with op.batch_alter_table("executions") as batch:
        batch.add_column(
            sa.Column("triggered_by", sa.String(256), nullable=False, server_default="")
        )
        batch.add_column(
            sa.Column("cancelled_by", sa.String(256), nullable=False, server_default="")
        )
    op.create_table(
        "audit_events",
        sa.Column(
            "id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            autoincrement=True,
            nullable=False,
        ),
        sa.Column("time", sa.DateTime(timezone=True), nullable=False),
        sa.Column("principal", sa.String(256), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("rpc", sa.String(64), nullable=False),
        sa.Column("job_id", sa.String(128), nullable=False),
        sa.Column("execution_id", sa.String(32), nullable=False),
        sa.Column("code", sa.String(32), nullable=False),
        sa.Column("message", sa.Text, nullable=False),
        sa.Column("request", sa.JSON, nullable=False),
        sa.Column("instance_id", sa.String(32), nullable=False),
        sa.Column("peer", sa.String(256), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_audit_events")),
    )
    op.create_index(op.f("ix_audit_events_time"), "audit_events", ["time"])
    op.create_index(op.f("ix_audit_events_job_id_id"), "audit_events", ["job_id", "id"])
    op.create_index(op.f("ix_audit_events_principal_id"), "audit_events", ["principal", "id"])


def downgrade() -> None:
    op.drop_table("audit_events")
    with op.batch_alter_table("executions") as batch:
        batch.drop_column("cancelled_by")
        batch.drop_column("triggered_by")
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("updated_by")
        batch.drop_column("created_by")
