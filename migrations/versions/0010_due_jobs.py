"""The jobs due soon: an index on next run times, for the leader's moving horizon

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06

The leader keeps in its timer only the jobs due within a horizon, filled a page at a time,
soonest first, from this index (docs/decisions/0018-horizon.md).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_jobs_due",
        "jobs",
        ["next_run_time", "id"],
        postgresql_where=sa.text("NOT paused AND next_run_time IS NOT NULL"),
        sqlite_where=sa.text("paused = 0 AND next_run_time IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_jobs_due", table_name="jobs")
