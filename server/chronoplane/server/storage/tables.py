"""The schema, as SQLAlchemy Core tables. Alembic migrations must match it (tests check)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

__all__ = [
    "UtcDateTime",
    "audit_events",
    "event_log",
    "events",
    "executions",
    "instances",
    "jobs",
    "leadership",
    "metadata",
    "secrets",
    "tokens",
]

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
    }
)


class UtcDateTime(sa.TypeDecorator[datetime]):
    """Aware UTC datetimes in, aware UTC datetimes out, on SQLite (naive text) and Postgres."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to the database")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: Any, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        assert isinstance(value, datetime)
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.String(128), primary_key=True),
    sa.Column("display_name", sa.String(256), nullable=False),
    sa.Column("description", sa.Text, nullable=False),
    sa.Column("task", sa.String(256), nullable=False),
    sa.Column("args", sa.JSON, nullable=False),
    sa.Column("trigger", sa.JSON, nullable=False),
    sa.Column("paused", sa.Boolean, nullable=False),
    sa.Column("misfire_grace_seconds", sa.Float, nullable=False),
    sa.Column("max_concurrent", sa.Integer, nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("misfire_policy", sa.String(16), nullable=False),
    sa.Column("catchup_window_seconds", sa.Float, nullable=True),
    sa.Column("catchup_limit", sa.Integer, nullable=False),
    sa.Column("overlap_policy", sa.String(16), nullable=False),
    # {"max_attempts", "initial_backoff_seconds", "multiplier", "max_backoff_seconds",
    #  "retry_on"}; NULL when the job is never retried.
    sa.Column("retry", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("timeout_seconds", sa.Float, nullable=True),
    sa.Column("history_limit", sa.Integer, nullable=False),
    sa.Column("version", sa.Integer, nullable=False),
    sa.Column("request_id", sa.String(128), nullable=True, unique=True),
    sa.Column("create_time", UtcDateTime, nullable=False),
    sa.Column("update_time", UtcDateTime, nullable=False),
    sa.Column("next_run_time", UtcDateTime, nullable=True),
    # Who created the job, and who last changed it through the API (an audit principal).
    sa.Column("created_by", sa.String(256), nullable=False, server_default=""),
    sa.Column("updated_by", sa.String(256), nullable=False, server_default=""),
    # Where its executions run: "inline" (on a server) or "celery" (on a Celery worker, with
    # {"queue", "routing_key", "priority"}); docs/decisions/0014-celery-dispatch.md.
    sa.Column("executor", sa.String(16), nullable=False, server_default="inline"),
    sa.Column("celery", sa.JSON(none_as_null=True), nullable=True),
    # The jobs due soon, soonest first: what the leader's timer is filled from.
    sa.Index(
        "ix_jobs_due",
        "next_run_time",
        "id",
        postgresql_where=sa.text("NOT paused AND next_run_time IS NOT NULL"),
        sqlite_where=sa.text("paused = 0 AND next_run_time IS NOT NULL"),
    ),
)

executions = sa.Table(
    "executions",
    metadata,
    # Time-ordered ids (see ids.py): ordering by id is ordering by creation.
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column(
        "job_id",
        sa.String(128),
        sa.ForeignKey("jobs.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("source", sa.String(16), nullable=False),
    # One execution per (job, scheduled fire) and per (job, TriggerJob request_id): the
    # database refuses the second, whoever tries. NULL for manual runs without a request_id.
    sa.Column("dedupe_key", sa.String(160), nullable=True),
    sa.Column("scheduled_time", UtcDateTime, nullable=False),
    sa.Column("create_time", UtcDateTime, nullable=False),
    sa.Column("start_time", UtcDateTime, nullable=True),
    sa.Column("end_time", UtcDateTime, nullable=True),
    sa.Column("task", sa.String(256), nullable=False),
    sa.Column("args", sa.JSON, nullable=False),
    sa.Column("result", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("error_message", sa.Text, nullable=False),
    sa.Column("error_traceback", sa.Text, nullable=False),
    sa.Column("instance_id", sa.String(128), nullable=False),
    sa.Column("request_id", sa.String(128), nullable=True),
    sa.Column("attempt", sa.Integer, nullable=False),
    sa.Column("first_execution_id", sa.String(32), nullable=True),
    sa.Column("error_type", sa.String(256), nullable=False),
    # {"count", "count_is_lower_bound", "first_time", "last_time"} on a MISSED execution.
    sa.Column("missed", sa.JSON(none_as_null=True), nullable=True),
    sa.Column("note", sa.Text, nullable=False),
    # The queue (docs/decisions/0010-execution-queue.md). A PENDING execution is *ready* when
    # it has one of its job's max_concurrent slots: any instance may claim it from
    # due_time on; otherwise it is *queued* until a slot frees. A claim sets holds_slot,
    # which holds the slot until the task has really ended. A forced execution (TriggerJob
    # with overlap ALLOW) is ready at once, beyond max_concurrent.
    sa.Column("due_time", UtcDateTime, nullable=False),
    sa.Column("ready", sa.Boolean, nullable=False),
    sa.Column("holds_slot", sa.Boolean, nullable=False),
    sa.Column("force", sa.Boolean, nullable=False),
    # Set when someone asked the instance running it to stop it (the error message to record).
    sa.Column("cancel_reason", sa.Text, nullable=True),
    # The leadership term whose leader wrote a scheduled fire (fencing can be checked).
    sa.Column("epoch", sa.BigInteger, nullable=True),
    # Who asked for the run (system:schedule for a scheduled fire; a retry keeps its first
    # attempt's), and who cancelled it.
    sa.Column("triggered_by", sa.String(256), nullable=False, server_default=""),
    sa.Column("cancelled_by", sa.String(256), nullable=False, server_default=""),
    # Celery dispatch: a celery execution is claimed by an instance, sent (task id = the
    # execution id) and, once sent, owned by no instance (instance_id ""); the worker that
    # starts it holds a lease it renews, which the leader lets expire into ABANDONED.
    sa.Column("executor", sa.String(16), nullable=False, server_default="inline"),
    sa.Column("celery_task_id", sa.String(64), nullable=True),
    sa.Column("worker", sa.String(256), nullable=False, server_default=""),
    # Why a PENDING execution is still pending (the broker could not be reached, say).
    sa.Column("pending_reason", sa.Text, nullable=False, server_default=""),
    sa.Column("dispatch_time", UtcDateTime, nullable=True),
    sa.Column("lease_expire_time", UtcDateTime, nullable=True),
    # Created late: its id (its creation, ids.py) is more than rows.CREATED_LATE_MS after its
    # scheduled time (a backfill, a catch-up, a late fire), or is not of ids.py's form. Time
    # ranges of ListExecutions find these through their own index, the others by walking ids
    # back from the range's end (history.py, migration 0012). Unknown counts as late.
    sa.Column("created_late", sa.Boolean, nullable=False, server_default=sa.true()),
    # The W3C traceparent of the RPC that asked for it (tracing.py), or empty.
    sa.Column("trace_parent", sa.String(64), nullable=False, server_default=""),
    sa.UniqueConstraint("job_id", "dedupe_key"),
    sa.Index(None, "job_id", "id"),
    # ListExecutions' filters, each read newest first (by id) from its index, or from the
    # time index and sorted when the time range is narrow (history.py, migration 0010).
    sa.Index(None, "state", "id"),
    sa.Index(None, "job_id", "state", "id"),
    sa.Index(None, "scheduled_time", "id"),
    sa.Index(None, "job_id", "scheduled_time", "id"),
    sa.Index(
        "ix_executions_created_late",
        "scheduled_time",
        "id",
        postgresql_where=sa.text("created_late"),
        sqlite_where=sa.text("created_late = 1"),
    ),
    # The age-based purge.
    sa.Index(None, "end_time"),
    # What a claim looks for; what waits for a slot, per job; whose runs and slots an
    # instance holds (the sweep of dead instances); what admission counts.
    sa.Index(
        "ix_executions_ready",
        "due_time",
        "id",
        postgresql_where=sa.text("state = 'pending' AND ready"),
        sqlite_where=sa.text("state = 'pending' AND ready = 1"),
    ),
    sa.Index(
        "ix_executions_queued",
        "job_id",
        "due_time",
        postgresql_where=sa.text("state = 'pending' AND NOT ready"),
        sqlite_where=sa.text("state = 'pending' AND ready = 0"),
    ),
    sa.Index(
        "ix_executions_owned",
        "instance_id",
        postgresql_where=sa.text("state = 'running' OR holds_slot"),
        sqlite_where=sa.text("state = 'running' OR holds_slot = 1"),
    ),
    sa.Index(
        "ix_executions_leased",
        "lease_expire_time",
        postgresql_where=sa.text("state = 'running' AND executor = 'celery'"),
        sqlite_where=sa.text("state = 'running' AND executor = 'celery'"),
    ),
    sa.Index(
        "ix_executions_active",
        "job_id",
        postgresql_where=sa.text("state IN ('pending', 'running') OR holds_slot"),
        sqlite_where=sa.text("state IN ('pending', 'running') OR holds_slot = 1"),
    ),
)

# Server-wide secrets (the page-token signing key), shared by every instance.
secrets = sa.Table(
    "secrets",
    metadata,
    sa.Column("name", sa.String(64), primary_key=True),
    sa.Column("value", sa.LargeBinary, nullable=False),
)

# One row per server process start (see docs/decisions/0009-cluster-mode.md); last_seen is
# database time on PostgreSQL.
instances = sa.Table(
    "instances",
    metadata,
    sa.Column("id", sa.String(32), primary_key=True),
    sa.Column("name", sa.String(256), nullable=False),
    sa.Column("host", sa.String(256), nullable=False),
    sa.Column("pid", sa.Integer, nullable=False),
    sa.Column("version", sa.String(64), nullable=False),
    sa.Column("address", sa.String(256), nullable=False),
    sa.Column("insecure", sa.Boolean, nullable=False),
    sa.Column("start_time", UtcDateTime, nullable=False),
    sa.Column("last_seen", UtcDateTime, nullable=False),
    # Its limit of executions at once, and how many it ran at its last heartbeat.
    sa.Column("max_running", sa.Integer, nullable=False),
    sa.Column("running", sa.Integer, nullable=False),
    # Stopping: it runs what it has to its end, and claims nothing new.
    sa.Column("draining", sa.Boolean, nullable=False, server_default=sa.false()),
    # When the leader judged it dead (silent for instance_timeout) and ABANDONED what it ran:
    # until it registers again it may neither heartbeat nor claim (its fencing token).
    sa.Column("fenced_at", UtcDateTime, nullable=True),
)

# One row (id 1): the current leadership term. Every write the leader makes as leader reads
# the epoch FOR SHARE and aborts unless it is its own; a new leader bumps it.
leadership = sa.Table(
    "leadership",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("epoch", sa.BigInteger, nullable=False),
    sa.Column("leader_id", sa.String(32), nullable=True),
    sa.Column("elected_at", UtcDateTime, nullable=True),
    sa.Column("heartbeat_at", UtcDateTime, nullable=True),
)

# The watch history (see docs/decisions/0011-watch-events.md and 0015-faults.md): one row per
# change of an execution or a job, appended in the transaction that made the change. On
# PostgreSQL cursors come from the sequence events_cursor_seq (made by migration 0009) and a
# reader reads only up to the watermark below which every cursor is decided; on SQLite, whose
# writers take turns, from event_log's row.
events = sa.Table(
    "events",
    metadata,
    sa.Column("cursor", sa.BigInteger, primary_key=True, autoincrement=False),
    sa.Column("resource", sa.String(16), nullable=False),  # "execution" or "job"
    sa.Column("kind", sa.String(16), nullable=False),  # ADDED, MODIFIED, DELETED
    sa.Column("job_id", sa.String(64), nullable=False),
    # The resource as it is after the change (as it was, for DELETED), and for an execution
    # its job's labels, which watch filters match.
    sa.Column("body", sa.JSON, nullable=False),
    sa.Column("labels", sa.JSON, nullable=False),
    sa.Column("create_time", UtcDateTime, nullable=False),
    sa.Index(None, "create_time"),
)

# One row (id 1): the last cursor handed out (SQLite), and the newest one purged (0: none).
event_log = sa.Table(
    "event_log",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("last_cursor", sa.BigInteger, nullable=False),
    sa.Column("purged_through", sa.BigInteger, nullable=False),
)

# API tokens (see docs/decisions/0012-authentication.md): only a SHA-256 of the secret part is
# kept; the token itself is shown once, when it is created.
tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.String(16), primary_key=True),
    sa.Column("name", sa.String(128), nullable=False, unique=True),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("secret_hash", sa.String(64), nullable=False),
    sa.Column("create_time", UtcDateTime, nullable=False),
    sa.Column("expire_time", UtcDateTime, nullable=True),
    sa.Column("revoke_time", UtcDateTime, nullable=True),
)

# One row per call of a mutating RPC, allowed or refused (docs/decisions/0013-audit.md).
audit_events = sa.Table(
    "audit_events",
    metadata,
    sa.Column(
        "id",
        sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
        primary_key=True,
        autoincrement=True,
    ),
    sa.Column("time", UtcDateTime, nullable=False),
    sa.Column("principal", sa.String(256), nullable=False),
    sa.Column("role", sa.String(16), nullable=False),
    sa.Column("rpc", sa.String(64), nullable=False),
    sa.Column("job_id", sa.String(128), nullable=False),
    sa.Column("execution_id", sa.String(32), nullable=False),
    # The gRPC status code's name: OK, PERMISSION_DENIED, NOT_FOUND, ...
    sa.Column("code", sa.String(32), nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    # The request as proto3 JSON (truncated past 16 KiB).
    sa.Column("request", sa.JSON, nullable=False),
    sa.Column("instance_id", sa.String(32), nullable=False),
    sa.Column("peer", sa.String(256), nullable=False),
    sa.Index(None, "time"),
    sa.Index(None, "job_id", "id"),
    sa.Index(None, "principal", "id"),
)
