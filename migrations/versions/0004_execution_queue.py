"""the execution queue: due times, slots, cancel requests; instances' limits

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01

Every instance now claims PENDING executions from the table (see
docs/decisions/0010-execution-queue.md). PENDING rows written before this revision were held
by the instance that wrote them; they become unclaimed and ready, due at their scheduled
time, so any instance may run them. RUNNING ones keep their instance and hold their job's
slot.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

# One round trip for what an admission needs (PostgreSQL): fencing, the jobs' rows locked in
# id order, then their slots counted by a later statement, which sees what the lock's
# previous holders committed. See docs/decisions/0010-execution-queue.md.
ADMISSION_JOBS = """
CREATE FUNCTION chronoplane_admission_jobs(job_ids varchar[], fenced boolean)
RETURNS TABLE (
    id varchar, max_concurrent integer, timeout_seconds double precision, retry json,
    holding bigint, ready bigint, queued bigint, epoch bigint
)
LANGUAGE plpgsql VOLATILE
-- Per job, a plain index scan of its active executions: it marks the index entries of rows
-- that have since ended (dead until a vacuum) so that the next scan skips them; a bitmap
-- scan would visit each of them again, every time.
SET enable_bitmapscan = off
AS $$
DECLARE
    current_epoch bigint;
BEGIN
    IF fenced THEN
        SELECT l.epoch INTO current_epoch FROM leadership l WHERE l.id = 1 FOR SHARE;
    END IF;
    PERFORM 1 FROM jobs j WHERE j.id = ANY(job_ids) ORDER BY j.id FOR NO KEY UPDATE;
    RETURN QUERY
        SELECT j.id, j.max_concurrent, j.timeout_seconds, j.retry,
               c.holding, c.ready, c.queued, current_epoch
        FROM jobs j
        CROSS JOIN LATERAL (
            SELECT count(*) FILTER (WHERE e.holds_slot) AS holding,
                   count(*) FILTER (WHERE e.state = 'pending' AND e.ready AND NOT e.force)
                       AS ready,
                   count(*) FILTER (WHERE e.state = 'pending' AND NOT e.ready) AS queued
            FROM executions e
            WHERE e.job_id = j.id AND (e.state IN ('pending', 'running') OR e.holds_slot)
        ) c
        WHERE j.id = ANY(job_ids);
END
$$
"""

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    with op.batch_alter_table("executions") as batch:
        batch.add_column(sa.Column("due_time", sa.DateTime(timezone=True), nullable=True))
        batch.add_column(
            sa.Column("ready", sa.Boolean(), nullable=False, server_default=sa.false())
        )
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
        "ready = (state = 'pending'), "
        "instance_id = CASE WHEN state = 'pending' THEN '' ELSE instance_id END"
    )
    with op.batch_alter_table("executions") as batch:
        batch.alter_column("due_time", existing_type=sa.DateTime(timezone=True), nullable=False)
        # Every write of an execution changes its state; the partial indexes below serve
        # what looked rows up by state.
        batch.drop_index("ix_executions_state")
        batch.alter_column("ready", server_default=None)
        batch.alter_column("holds_slot", server_default=None)
        batch.alter_column("force", server_default=None)
        batch.create_index(
            "ix_executions_ready",
            ["due_time", "id"],
            postgresql_where=sa.text("state = 'pending' AND ready"),
            sqlite_where=sa.text("state = 'pending' AND ready = 1"),
        )
        batch.create_index(
            "ix_executions_queued",
            ["job_id", "due_time"],
            postgresql_where=sa.text("state = 'pending' AND NOT ready"),
            sqlite_where=sa.text("state = 'pending' AND ready = 0"),
        )
        batch.create_index(
            "ix_executions_owned",
            ["instance_id"],
            postgresql_where=sa.text("state = 'running' OR holds_slot"),
            sqlite_where=sa.text("state = 'running' OR holds_slot = 1"),
        )
        batch.create_index(
            "ix_executions_active",
            ["job_id"],
            postgresql_where=sa.text("state IN ('pending', 'running') OR holds_slot"),
            sqlite_where=sa.text("state IN ('pending', 'running') OR holds_slot = 1"),
        )
    if op.get_bind().dialect.name == "postgresql":
        op.execute(ADMISSION_JOBS)
    with op.batch_alter_table("instances") as batch:
        batch.add_column(sa.Column("max_running", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("running", sa.Integer(), nullable=False, server_default="0"))
    with op.batch_alter_table("instances") as batch:
        batch.alter_column("max_running", server_default=None)
        batch.alter_column("running", server_default=None)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION chronoplane_admission_jobs(varchar[], boolean)")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("running")
        batch.drop_column("max_running")
    with op.batch_alter_table("executions") as batch:
        batch.drop_index("ix_executions_active")
        batch.drop_index("ix_executions_owned")
        batch.create_index("ix_executions_state", ["state"])
        batch.drop_index("ix_executions_queued")
        batch.drop_index("ix_executions_ready")
        for name in ("epoch", "cancel_reason", "force", "holds_slot", "ready", "due_time"):
            batch.drop_column(name)
