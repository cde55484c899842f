"""Executions keep the trace of the RPC that asked for them

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-07

With OpenTelemetry traces on (tracing.py), an execution's span is the child of the RPC
that asked for it (TriggerJob, BackfillJob). The instance that runs it, or the Celery
worker, may be another process than the one that served the RPC: the W3C traceparent goes
with the execution's row. Empty for scheduled fires and when traces are off. A constant
default: PostgreSQL adds the column without rewriting the table.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "executions",
        sa.Column("trace_parent", sa.String(64), nullable=False, server_default=""),
    )


def downgrade() -> None:
    op.drop_column("executions", "trace_parent")
