"""the watch history: events, and the row that hands out their cursors

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01

Every change of an execution or a job appends an event in the same transaction (see
docs/decisions/0011-watch-events.md). History before this revision has no events: cursors
start at 1.
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
    op.create_table(
        "events",
        sa.Column("cursor", sa.BigInteger(), autoincrement=False, nullable=False),
        sa.Column("resource", sa.String(16), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("job_id", sa.String(64), nullable=False),
        sa.Column("body", sa.JSON(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=False),
        sa.Column("create_time", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("cursor", name=op.f("pk_events")),
    )
    op.create_index(op.f("ix_events_create_time"), "events", ["create_time"])
    event_log = op.create_table(
        "event_log",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("last_cursor", sa.BigInteger(), nullable=False),
        sa.Column("purged_through", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_log")),
    )
    op.bulk_insert(event_log, [{"id": 1, "last_cursor": 0, "purged_through": 0}])


def downgrade() -> None:
    op.drop_table("event_log")
    op.drop_index(op.f("ix_events_create_time"), table_name="events")
    op.drop_table("events")
