"""Faults: draining and fenced instances, event cursors without a shared row lock

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-03

instances.draining (the instance stops: it runs what it has, takes nothing new) and
instances.fenced_at (the leader judged it dead and ABANDONED its executions; it may not claim
or heartbeat until it registers again). On PostgreSQL, event cursors come from the sequence
events_cursor_seq and writers hold the shared advisory lock 0x43504C4E00000003 until they
commit, instead of taking turns on event_log's row; chronoplane_event_watermark() tells a
reader how far every cursor is decided. The leader's fenced writes read the epoch FOR KEY
SHARE (only a new leader's FOR UPDATE waits for them, not the leader's own heartbeat). See
docs/decisions/0015-faults.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_ADMISSION_JOBS = """
CREATE OR REPLACE FUNCTION chronoplane_admission_jobs(job_ids varchar[], fenced boolean)
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
        SELECT l.epoch INTO current_epoch FROM leadership l WHERE l.id = 1 FOR {lock};
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

# How far every cursor is decided: the last cursor handed out, read first, then the
# transactions that still hold the event writers' lock (key 3 of decision 0002). Once those
# have ended, no cursor up to that last one can still appear. Statements of a function run in
# order; one statement with two subqueries would not promise it.
_WATERMARK = """
CREATE FUNCTION chronoplane_event_watermark(OUT last_cursor bigint, OUT writers text[])
LANGUAGE plpgsql VOLATILE
AS $$
BEGIN
    SELECT CASE WHEN s.is_called THEN s.last_value ELSE s.last_value - 1 END
        INTO last_cursor FROM events_cursor_seq s;
    SELECT coalesce(array_agg(l.virtualtransaction), '{}') INTO writers
        FROM pg_locks l
        WHERE l.locktype = 'advisory' AND l.classid = 1129335886 AND l.objid = 3
          AND l.objsubid = 1 AND l.granted
          AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database());
END
$$
"""


def upgrade() -> None:
    with op.batch_alter_table("instances") as batch:
        batch.add_column(
            sa.Column("draining", sa.Boolean(), nullable=False, server_default=sa.false())
        )
        batch.add_column(sa.Column("fenced_at", sa.DateTime(timezone=True), nullable=True))
    if op.get_bind().dialect.name != "postgresql":
        return
    # CACHE 1: a value another session has cached but not used would be missed by
    # chronoplane_event_watermark(), which reads the sequence's last value.
    op.execute("CREATE SEQUENCE events_cursor_seq AS bigint CACHE 1")
    op.execute(
        "SELECT setval('events_cursor_seq', greatest(last_cursor, 1), last_cursor > 0) "
        "FROM event_log WHERE id = 1"
    )
    op.execute(_ADMISSION_JOBS.format(lock="KEY SHARE"))
    op.execute(_WATERMARK)


def downgrade() -> None:
    if op.get_bind().dialect.name == "postgresql":
        op.execute("DROP FUNCTION chronoplane_event_watermark()")
        op.execute(_ADMISSION_JOBS.format(lock="SHARE"))
        op.execute(
            "UPDATE event_log SET last_cursor = greatest(last_cursor, "
            "(SELECT coalesce(max(cursor), 0) FROM events)) WHERE id = 1"
        )
        op.execute("DROP SEQUENCE events_cursor_seq")
    with op.batch_alter_table("instances") as batch:
        batch.drop_column("fenced_at")
        batch.drop_column("draining")
