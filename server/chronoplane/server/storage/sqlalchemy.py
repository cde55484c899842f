"""The store on SQLAlchemy 2 async Core: SQLite through aiosqlite, PostgreSQL through asyncpg."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import random
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from types import SimpleNamespace
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from chronoplane.server.errors import (
    AlreadyExists,
    EtagMismatch,
    ExecutionFinished,
    ExecutionNotFound,
    JobAlreadyExists,
    JobNotFound,
    NotLeader,
    StorageConflict,
    StorageUnavailable,
)
from chronoplane.server.models import (
    ABANDONED_ERROR_TYPE,
    AuditEvent,
    AuditPage,
    AuditQuery,
    CeleryOptions,
    CronTrigger,
    DateTrigger,
    Event,
    EventKind,
    EventResource,
    EventWindow,
    Execution,
    ExecutionPage,
    ExecutionQuery,
    ExecutionSource,
    ExecutionState,
    ExecutionSummary,
    ExecutorKind,
    Instance,
    IntervalTrigger,
    Job,
    JobPage,
    MisfirePolicy,
    MissedFires,
    OverlapPolicy,
    RetryPolicy,
    Role,
    RunPolicy,
    SnapshotPoint,
    StoredToken,
    Trigger,
)
from chronoplane.server.scheduling import admit
from chronoplane.server.storage.abc import (
    DISPLACED,
    Admission,
    Admitted,
    CancelRequest,
    Claim,
    Dispatch,
    DispatchClaim,
    ExecutionFinish,
    NextRun,
    Progress,
    SlotRelease,
    Store,
)
from chronoplane.server.storage.events import (
    EVENT_WRITERS_KEY,
    Changes,
    Watermark,
    decode_body,
    encode_row,
)
from chronoplane.server.storage.tables import (
    UtcDateTime,
    audit_events,
    event_log,
    events,
    executions,
    instances,
    jobs,
    leadership,
    secrets,
    tokens,
)

__all__ = [
    "CANCEL_CHANNEL",
    "JOBS_CHANNEL",
    "KEEPALIVES",
    "WORK_CHANNEL",
    "SessionLimits",
    "SqlAlchemyStore",
    "create_engine",
    "trigger_from_json",
    "trigger_to_json",
]

# NOTIFY channels (PostgreSQL): job changes (the writing instance's id, a space, the job id);
# executions made ready, so claimers look again (the writing instance's id); a RUNNING
# execution asked to stop (its id).
JOBS_CHANNEL = "chronoplane_jobs"
WORK_CHANNEL = "chronoplane_work"
CANCEL_CHANNEL = "chronoplane_cancel"
# Events were appended (payload: the last cursor); every instance's watch hub reads them.
EVENTS_CHANNEL = "chronoplane_events"

P = ParamSpec("P")
R = TypeVar("R")

_UNFINISHED = (ExecutionState.PENDING.value, ExecutionState.RUNNING.value)
# Spelled as in the partial indexes of tables.executions (literals, not parameters), so that
# PostgreSQL can use them with generic plans too.
_PENDING: sa.ColumnElement[str] = sa.literal_column("'pending'")
_RUNNING: sa.ColumnElement[str] = sa.literal_column("'running'")
# A PENDING execution is ready (it has a slot: any instance may claim it once it is due)
# or queued (waiting for a slot of its job).
_READY = (executions.c.state == _PENDING) & executions.c.ready
_QUEUED = (executions.c.state == _PENDING) & sa.not_(executions.c.ready)
# What waits for a slot: queued and not holding one (a Celery execution sent to the broker is
# PENDING and not ready, but has its slot until it ends).
_WAITING = _QUEUED & sa.not_(executions.c.holds_slot)
_ACTIVE = executions.c.state.in_([_PENDING, _RUNNING]) | executions.c.holds_slot
_INLINE = executions.c.executor == ExecutorKind.INLINE.value
_CELERY = executions.c.executor == ExecutorKind.CELERY.value


@dataclass(frozen=True, kw_only=True)
class SessionLimits:
    """What bounds every pooled PostgreSQL session (docs/decisions/0015-faults.md): a
    transaction waits for a lock at most ``lock_timeout`` and may idle between statements at
    most ``idle_in_transaction`` (the server then ends the session and its locks: a stopped
    or cut-off writer holds no one up for longer), a statement runs at most ``statement``,
    and keepalives tell the server within seconds that a client's host has vanished. Times in
    seconds."""

    lock_timeout: float = 5.0
    idle_in_transaction: float = 5.0
    statement: float = 60.0

    def server_settings(self) -> dict[str, str]:
        return {
            "lock_timeout": str(int(self.lock_timeout * 1000)),
            "idle_in_transaction_session_timeout": str(int(self.idle_in_transaction * 1000)),
            "statement_timeout": str(int(self.statement * 1000)),
            **KEEPALIVES,
        }


# TCP keepalives, server side: a vanished client's session (and its locks) ends in ~11 s.
KEEPALIVES = {
    "tcp_keepalives_idle": "5",
    "tcp_keepalives_interval": "2",
    "tcp_keepalives_count": "3",
}
# Seconds a connection attempt may take.
CONNECT_TIMEOUT = 5.0


def create_engine(
    url: str,
    *,
    pool_size: int = 10,
    application_name: str = "chronoplane",
    limits: SessionLimits | None = None,
) -> AsyncEngine:
    """An engine with the settings each database needs: WAL and busy timeout on SQLite; on
    PostgreSQL the session limits, and ``application_name`` (a server's ends with its instance
    id, so that a new leader can end the sessions of a stale one)."""
    if url.startswith("sqlite"):
        engine = create_async_engine(url, pool_size=pool_size, max_overflow=0)

        @event.listens_for(engine.sync_engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cursor = dbapi_conn.cursor()
            for pragma in (
                "journal_mode=WAL",
                "synchronous=NORMAL",
                "busy_timeout=10000",
                "foreign_keys=ON",
            ):
                cursor.execute(f"PRAGMA {pragma}")
            cursor.close()

        return engine
    limits = limits or SessionLimits()
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=5,
        pool_pre_ping=True,
        connect_args={
            "server_settings": {"application_name": application_name[:63]}
            | limits.server_settings(),
            "timeout": CONNECT_TIMEOUT,
            # The client's own bound, should the server not answer at all (a partition).
            "command_timeout": limits.statement + 10,
        },
    )


# SQLSTATEs of a transaction that the database rolled back because of another one: nothing
# was written, and the whole transaction may simply run again.
_CONFLICTS = {
    "40001": "a serialization failure",
    "40P01": "a deadlock",
    "55P03": "a lock not granted within lock_timeout",
}
# Classes of SQLSTATE that say the database, not the request, is the trouble: 08 connection
# exception, 53 insufficient resources (too many connections), 57 operator intervention
# (shutting down, starting up, session terminated, statement_timeout), and 25P03, a session
# ended for idling in a transaction.
_UNAVAILABLE_CLASSES = ("08", "53", "57")
CONFLICT_ATTEMPTS = 4


def _sqlstate(error: exc.DBAPIError) -> str:
    return str(getattr(error.orig, "sqlstate", "") or "")


def _said(error: Exception) -> str:
    """What the driver said, in a line: not the statement or its parameters (a job's args)
    that SQLAlchemy's message goes on with."""
    said = error.orig if isinstance(error, exc.DBAPIError) and error.orig else error
    text = str(said).strip().splitlines()
    return f"{type(said).__name__}: {text[0] if text else ''}"


def _unavailable(error: Exception) -> StorageUnavailable | None:
    """The domain error for a driver error that means the database cannot be used now."""
    if isinstance(error, exc.PendingRollbackError):
        # The connection died inside a transaction (SQLAlchemy says so on its next use).
        return StorageUnavailable(f"database connection lost in a transaction: {_said(error)}")
    if isinstance(error, exc.TimeoutError):
        return StorageUnavailable(f"no database connection free in time: {_said(error)}")
    if isinstance(error, exc.OperationalError | exc.InterfaceError | OSError):
        return StorageUnavailable(f"database unavailable: {_said(error)}")
    if isinstance(error, exc.DBAPIError):
        state = _sqlstate(error)
        if error.connection_invalidated:
            return StorageUnavailable(f"database connection lost: {_said(error)}")
        if state[:2] in _UNAVAILABLE_CLASSES or state == "25P03":
            return StorageUnavailable(f"database unavailable: {_said(error)}")
    return None


def _translate_errors(
    func: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Driver errors become domain errors here, once, at the storage edge. A transaction the
    database rolled back for another's sake (deadlock, lock timeout, serialization failure)
    is run again a few times first: each method is one transaction, or several that each
    stand alone, and side effects (wake-ups) happen only after a commit."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        for attempt in range(1, CONFLICT_ATTEMPTS + 1):
            try:
                return await func(*args, **kwargs)
            except exc.DBAPIError as error:
                state = _sqlstate(error)
                if state not in _CONFLICTS or error.connection_invalidated:
                    translated = _unavailable(error)
                    if translated is None:
                        raise
                    raise translated from error
                if attempt == CONFLICT_ATTEMPTS:
                    raise StorageConflict(
                        f"the database rolled the transaction back after {_CONFLICTS[state]} "
                        f"({attempt} attempts); nothing was written: {_said(error)}"
                    ) from error
                await asyncio.sleep(random.uniform(0.005, 0.02) * 2**attempt)
            except (exc.SQLAlchemyError, OSError) as error:
                translated = _unavailable(error)
                if translated is None:
                    raise
                raise translated from error
        raise AssertionError("unreachable")

    return wrapper


# -- row <-> domain -------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _parse(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def _seconds(value: timedelta | None) -> float | None:
    return None if value is None else value.total_seconds()


def _delta(value: float | None) -> timedelta | None:
    return None if value is None else timedelta(seconds=value)


def trigger_to_json(trigger: Trigger) -> dict[str, Any]:
    """The stored form; jitter is written only when set, so older rows read the same."""
    spec: dict[str, Any]
    if isinstance(trigger, CronTrigger):
        kind = "cron"
        spec = {"expression": trigger.expression, "time_zone": trigger.time_zone}
        if trigger.start_time or trigger.end_time:
            spec |= {"start_time": _iso(trigger.start_time), "end_time": _iso(trigger.end_time)}
    elif isinstance(trigger, IntervalTrigger):
        kind = "interval"
        spec = {
            "every_seconds": trigger.every.total_seconds(),
            "start_time": _iso(trigger.start_time),
            "end_time": _iso(trigger.end_time),
        }
    else:
        kind = "date"
        spec = {"run_time": _iso(trigger.run_time)}
    if trigger.jitter:
        spec["jitter_seconds"] = trigger.jitter.total_seconds()
    return {kind: spec}


def trigger_from_json(data: dict[str, Any]) -> Trigger:
    kind, spec = next(iter(data.items()))
    jitter = timedelta(seconds=spec.get("jitter_seconds", 0))
    if kind == "cron":
        return CronTrigger(
            expression=spec["expression"],
            time_zone=spec["time_zone"],
            start_time=_parse(spec.get("start_time")),
            end_time=_parse(spec.get("end_time")),
            jitter=jitter,
        )
    if kind == "interval":
        return IntervalTrigger(
            every=timedelta(seconds=spec["every_seconds"]),
            start_time=_parse(spec["start_time"]),
            end_time=_parse(spec["end_time"]),
            jitter=jitter,
        )
    run_time = _parse(spec["run_time"])
    assert run_time is not None
    return DateTrigger(run_time=run_time, jitter=jitter)


def _retry_to_json(retry: RetryPolicy) -> dict[str, Any] | None:
    if retry.max_attempts <= 1:
        return None
    return {
        "max_attempts": retry.max_attempts,
        "initial_backoff_seconds": retry.initial_backoff.total_seconds(),
        "multiplier": retry.multiplier,
        "max_backoff_seconds": retry.max_backoff.total_seconds(),
        "retry_on": list(retry.retry_on),
    }


def _retry_from_json(data: dict[str, Any] | None) -> RetryPolicy:
    if data is None:
        return RetryPolicy()
    return RetryPolicy(
        max_attempts=data["max_attempts"],
        initial_backoff=timedelta(seconds=data["initial_backoff_seconds"]),
        multiplier=data["multiplier"],
        max_backoff=timedelta(seconds=data["max_backoff_seconds"]),
        retry_on=tuple(data["retry_on"]),
    )


def _run_policy(timeout_seconds: float | None, retry: dict[str, Any] | None) -> RunPolicy:
    """A job's timeout and retry policy, from its columns."""
    return RunPolicy(timeout=_delta(timeout_seconds), retry=_retry_from_json(retry))


def _cancelled_now(now: datetime, message: str, *, by: str = "") -> dict[str, Any]:
    """The columns of an execution the server ends as CANCELLED at once (one that has not
    started, or runs on a Celery worker): its slot goes to the next."""
    return {
        "state": ExecutionState.CANCELLED.value,
        "end_time": now,
        "error_message": message,
        "ready": False,
        "holds_slot": False,
        "cancelled_by": by,
    }


def _missed_to_json(missed: MissedFires | None) -> dict[str, Any] | None:
    if missed is None:
        return None
    return {
        "count": missed.count,
        "count_is_lower_bound": missed.count_is_lower_bound,
        "first_time": _iso(missed.first_time),
        "last_time": _iso(missed.last_time),
    }


def _missed_from_json(data: dict[str, Any] | None) -> MissedFires | None:
    if data is None:
        return None
    first, last = _parse(data["first_time"]), _parse(data["last_time"])
    assert first is not None and last is not None
    return MissedFires(
        count=data["count"],
        count_is_lower_bound=data["count_is_lower_bound"],
        first_time=first,
        last_time=last,
    )


def _job_values(job: Job) -> dict[str, Any]:
    return {
        "display_name": job.display_name,
        "description": job.description,
        "task": job.task,
        "args": job.args,
        "trigger": trigger_to_json(job.trigger),
        "paused": job.paused,
        "misfire_grace_seconds": job.misfire_grace.total_seconds(),
        "max_concurrent": job.max_concurrent,
        "labels": job.labels,
        "misfire_policy": job.misfire_policy.value,
        "catchup_window_seconds": _seconds(job.catchup_window),
        "catchup_limit": job.catchup_limit,
        "overlap_policy": job.overlap_policy.value,
        "retry": _retry_to_json(job.retry),
        "timeout_seconds": _seconds(job.timeout),
        "history_limit": job.history_limit,
        "next_run_time": job.next_run_time,
        "updated_by": job.updated_by,
        "executor": job.executor.value,
        "celery": _celery_to_json(job.celery) if job.executor is ExecutorKind.CELERY else None,
    }


def _celery_to_json(options: CeleryOptions) -> dict[str, Any]:
    return {
        "queue": options.queue,
        "routing_key": options.routing_key,
        "priority": options.priority,
    }


def _celery_from_json(data: dict[str, Any] | None) -> CeleryOptions:
    if not data:
        return CeleryOptions()
    return CeleryOptions(
        queue=data.get("queue", ""),
        routing_key=data.get("routing_key", ""),
        priority=data.get("priority"),
    )


def _job_from_row(row: sa.Row[Any], summary: ExecutionSummary | None = None) -> Job:
    return Job(
        id=row.id,
        display_name=row.display_name,
        description=row.description,
        task=row.task,
        args=row.args,
        trigger=trigger_from_json(row.trigger),
        paused=row.paused,
        misfire_grace=timedelta(seconds=row.misfire_grace_seconds),
        max_concurrent=row.max_concurrent,
        labels=row.labels,
        misfire_policy=MisfirePolicy(row.misfire_policy),
        catchup_window=_delta(row.catchup_window_seconds),
        catchup_limit=row.catchup_limit,
        overlap_policy=OverlapPolicy(row.overlap_policy),
        retry=_retry_from_json(row.retry),
        timeout=_delta(row.timeout_seconds),
        history_limit=row.history_limit,
        version=row.version,
        create_time=row.create_time,
        update_time=row.update_time,
        next_run_time=row.next_run_time,
        last_execution=summary,
        # Rows of events written before migration 0007 lack them.
        created_by=getattr(row, "created_by", ""),
        updated_by=getattr(row, "updated_by", ""),
        executor=ExecutorKind(getattr(row, "executor", "inline")),
        celery=_celery_from_json(getattr(row, "celery", None)),
    )


def _execution_from_row(row: sa.Row[Any]) -> Execution:
    return Execution(
        id=row.id,
        job_id=row.job_id,
        state=ExecutionState(row.state),
        source=ExecutionSource(row.source),
        scheduled_time=row.scheduled_time,
        create_time=row.create_time,
        start_time=row.start_time,
        end_time=row.end_time,
        task=row.task,
        args=row.args,
        result=row.result,
        error_message=row.error_message,
        error_traceback=row.error_traceback,
        instance_id=row.instance_id,
        request_id=row.request_id or "",
        attempt=row.attempt,
        first_execution_id=row.first_execution_id or "",
        error_type=row.error_type,
        missed=_missed_from_json(row.missed),
        note=row.note,
        triggered_by=getattr(row, "triggered_by", ""),
        cancelled_by=getattr(row, "cancelled_by", ""),
        executor=ExecutorKind(getattr(row, "executor", "inline")),
        celery_task_id=getattr(row, "celery_task_id", None) or "",
        worker=getattr(row, "worker", ""),
        pending_reason=getattr(row, "pending_reason", ""),
        dispatch_time=getattr(row, "dispatch_time", None),
    )


def _execution_from_mapping(values: Any) -> Execution:
    """An execution from a RETURNING row's mapping."""
    return _execution_from_row(SimpleNamespace(**values))  # type: ignore[arg-type]


def _token_from_row(row: sa.Row[Any]) -> StoredToken:
    return StoredToken(
        id=row.id,
        name=row.name,
        role=Role.parse(row.role),
        secret_hash=row.secret_hash,
        create_time=row.create_time,
        expire_time=row.expire_time,
        revoke_time=row.revoke_time,
    )


# The audit columns are the event's fields, id aside (the database numbers them).
_AUDIT_COLUMNS = [column.name for column in audit_events.columns if column.name != "id"]


def _audit_from_row(row: sa.Row[Any]) -> AuditEvent:
    return AuditEvent(id=row.id, **{name: getattr(row, name) for name in _AUDIT_COLUMNS})


def _event_from_row(row: sa.Row[Any]) -> Event:
    # The closure keeps the body's text, not the row: the hub keeps thousands of recent
    # events, and each object they hold is one more for every full garbage collection.
    text = row.body_text
    resource = EventResource(row.resource)

    def decode() -> Execution | Job:
        body = decode_body(json.loads(text))
        if resource is EventResource.EXECUTION:
            return _execution_from_row(body)
        return _job_from_row(body)

    labels = row.labels if isinstance(row.labels, dict) else json.loads(row.labels)
    return Event(
        cursor=row.cursor,
        kind=EventKind(row.kind),
        job_id=row.job_id,
        labels=labels,
        resource=resource,
        decode=decode,
    )


# Events as read: the body as text, parsed only if a watcher needs the resource.
_EVENT_COLUMNS = (
    events.c.cursor,
    events.c.resource,
    events.c.kind,
    events.c.job_id,
    events.c.labels,
    sa.cast(events.c.body, sa.Text).label("body_text"),
)


def _dedupe_key(execution: Execution) -> str | None:
    """What makes an execution unique within its job (see tables.executions): one per
    scheduled fire (a MISSED record takes the key of the first fire it stands for), one per
    backfilled fire, one per retry attempt, one per TriggerJob request_id."""
    scheduled = execution.scheduled_time.astimezone(UTC).isoformat()
    if execution.source is ExecutionSource.SCHEDULE:
        return "s:" + scheduled
    if execution.source is ExecutionSource.BACKFILL:
        return "b:" + scheduled
    if execution.source is ExecutionSource.RETRY:
        return f"a:{execution.first_execution_id}:{execution.attempt}"
    if execution.request_id:
        return "r:" + execution.request_id
    return None


def _execution_values(
    execution: Execution, admission: Admission | None = None, *, ready: bool = False
) -> dict[str, Any]:
    queued = execution.state is ExecutionState.PENDING
    claimed = execution.state is ExecutionState.RUNNING
    due = admission.due_time if admission is not None else None
    return {
        "id": execution.id,
        "job_id": execution.job_id,
        "state": execution.state.value,
        "source": execution.source.value,
        "dedupe_key": _dedupe_key(execution),
        "scheduled_time": execution.scheduled_time,
        "create_time": execution.create_time,
        "start_time": execution.start_time,
        "end_time": execution.end_time,
        "task": execution.task,
        "args": execution.args,
        "result": execution.result,
        "error_message": execution.error_message,
        "error_traceback": execution.error_traceback,
        # Unclaimed while queued: any instance may take it.
        "instance_id": "" if queued else execution.instance_id,
        "request_id": execution.request_id or None,
        "attempt": execution.attempt,
        "first_execution_id": execution.first_execution_id or None,
        "error_type": execution.error_type,
        "missed": _missed_to_json(execution.missed),
        "note": execution.note,
        "due_time": due or execution.scheduled_time,
        "ready": queued and ready,
        "holds_slot": claimed,
        "force": bool(admission and admission.force),
        "cancel_reason": None,
        "epoch": admission.epoch if admission is not None else None,
        "triggered_by": execution.triggered_by,
        "cancelled_by": execution.cancelled_by,
        "executor": execution.executor.value,
        "celery_task_id": execution.celery_task_id or None,
        "worker": execution.worker,
        "pending_reason": execution.pending_reason,
        "dispatch_time": execution.dispatch_time,
        "lease_expire_time": None,
    }


_EXECUTION_COLUMNS = [column.name for column in executions.columns]
_PG_ARRAY_TYPES = {
    "scheduled_time": "timestamptz",
    "create_time": "timestamptz",
    "start_time": "timestamptz",
    "end_time": "timestamptz",
    "args": "json",
    "result": "json",
    "missed": "json",
    "attempt": "int",
    "due_time": "timestamptz",
    "ready": "boolean",
    "holds_slot": "boolean",
    "force": "boolean",
    "cancel_reason": "text",
    "epoch": "bigint",
    "pending_reason": "text",
    "dispatch_time": "timestamptz",
    "lease_expire_time": "timestamptz",
}
_PG_INSERT_EXECUTIONS = sa.text(
    f"INSERT INTO executions ({', '.join(_EXECUTION_COLUMNS)}) "
    "SELECT * FROM unnest("
    + ", ".join(
        f"CAST(:{name} AS {_PG_ARRAY_TYPES.get(name, 'varchar')}[])" for name in _EXECUTION_COLUMNS
    )
    + ") ON CONFLICT (job_id, dedupe_key) DO NOTHING RETURNING id"
)

_PG_CLAIM = sa.text(
    "UPDATE executions SET state = :state, instance_id = :instance_id, ready = :ready, "
    "holds_slot = :holds_slot, start_time = :start_time "
    "FROM unnest(CAST(:ids AS varchar[])) AS claimed(id) WHERE executions.id = claimed.id "
    "RETURNING executions.*"
).bindparams(sa.bindparam("start_time", type_=UtcDateTime()))
_PG_NEXT_RUNS = sa.text(
    "UPDATE jobs SET next_run_time = n.next_run_time "
    "FROM unnest(CAST(:ids AS varchar[]), CAST(:versions AS int[]), "
    "CAST(:times AS timestamptz[])) AS n(id, version, next_run_time) "
    "WHERE jobs.id = n.id AND jobs.version = n.version"
)
_PG_FINISH = sa.text(
    "UPDATE executions SET state = f.state, start_time = f.start_time, end_time = f.end_time, "
    "result = CAST(f.result AS json), error_message = f.message, error_traceback = f.traceback, "
    "error_type = f.type, holds_slot = f.keeps, cancelled_by = CASE WHEN f.state = 'cancelled' "
    "THEN COALESCE(NULLIF(f.by, ''), executions.cancelled_by) ELSE '' END "
    "FROM unnest(CAST(:ids AS varchar[]), CAST(:states AS varchar[]), "
    "CAST(:starts AS timestamptz[]), CAST(:ends AS timestamptz[]), CAST(:results AS text[]), "
    "CAST(:messages AS text[]), CAST(:tracebacks AS text[]), CAST(:types AS varchar[]), "
    "CAST(:keeps AS boolean[]), CAST(:bys AS varchar[])) AS f(id, state, start_time, end_time, "
    "result, message, traceback, type, keeps, by) "
    "WHERE executions.id = f.id AND executions.state IN ('pending', 'running') "
    "RETURNING executions.*"
)
# One round trip: the writers' lock (shared, held to the commit), the cursors from the
# sequence (each row's nextval comes after the lock: no row exists before the lock's), the
# rows, and the notification.
_PG_APPEND_EVENTS = sa.text(
    "WITH writer AS (SELECT pg_advisory_xact_lock_shared(CAST(:key AS bigint))), "
    "appended AS (INSERT INTO events (cursor, resource, kind, job_id, body, labels, create_time) "
    "SELECT nextval('events_cursor_seq'), e.resource, e.kind, e.job_id, CAST(e.body AS json), "
    "CAST(e.labels AS json), :now "
    "FROM writer, unnest(CAST(:resources AS varchar[]), CAST(:kinds AS varchar[]), "
    "CAST(:job_ids AS varchar[]), CAST(:bodies AS text[]), CAST(:labels AS text[])) "
    "AS e(resource, kind, job_id, body, labels) RETURNING 1) "
    f"SELECT pg_notify('{EVENTS_CHANNEL}', '') FROM (SELECT count(*) FROM appended) AS done"
).bindparams(sa.bindparam("now", type_=UtcDateTime()), key=EVENT_WRITERS_KEY)
_PG_WATERMARK = sa.text("SELECT last_cursor, writers FROM chronoplane_event_watermark()")
# How long a reader that needs the watermark as of now waits for the writers in flight (a
# writer stopped inside its transaction is ended by idle_in_transaction_session_timeout).
SETTLE_SECONDS = 30.0
_PG_ADMISSION_JOBS = sa.text("SELECT * FROM chronoplane_admission_jobs(:ids, :fenced)").bindparams(
    sa.bindparam("ids", type_=postgresql.ARRAY(sa.String)),
    sa.bindparam("fenced", type_=sa.Boolean),
)

_last_execution = (
    sa.select(executions.c.id)
    .where(executions.c.job_id == jobs.c.id)
    .order_by(executions.c.id.desc())
    .limit(1)
    .correlate(jobs)
    .scalar_subquery()
)

_summary = executions.alias("last_execution")

_JOB_WITH_SUMMARY = sa.select(
    jobs,
    _summary.c.id.label("x_id"),
    _summary.c.state.label("x_state"),
    _summary.c.source.label("x_source"),
    _summary.c.scheduled_time.label("x_scheduled_time"),
    _summary.c.start_time.label("x_start_time"),
    _summary.c.end_time.label("x_end_time"),
    _summary.c.attempt.label("x_attempt"),
).select_from(jobs.outerjoin(_summary, _summary.c.id == _last_execution))


def _job_with_summary(row: sa.Row[Any]) -> Job:
    summary = None
    if row.x_id is not None:
        summary = ExecutionSummary(
            id=row.x_id,
            state=ExecutionState(row.x_state),
            source=ExecutionSource(row.x_source),
            scheduled_time=row.x_scheduled_time,
            start_time=row.x_start_time,
            end_time=row.x_end_time,
            attempt=row.x_attempt,
        )
    return _job_from_row(row, summary)


class SqlAlchemyStore(Store):
    def __init__(self, engine: AsyncEngine, *, instance_id: str = "") -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        # Sent with work notifications, so that this instance's listener can ignore its own.
        self._instance_id = instance_id
        # SQLite has one writer at a time, and a transaction that read before another one
        # wrote cannot write (SQLITE_BUSY, not waited for). One process uses the file (the
        # file lock), so its write transactions take turns here instead.
        self._write_lock = asyncio.Lock() if self._dialect == "sqlite" else None
        # Called after a transaction that appended events commits (the watch hub's wake-up).
        self.on_events: Callable[[], None] | None = None
        self._watermark = Watermark()

    @classmethod
    def from_url(cls, url: str) -> SqlAlchemyStore:
        return cls(create_engine(url))

    @property
    def engine(self) -> AsyncEngine:
        return self._engine

    async def close(self) -> None:
        await self._engine.dispose()

    @asynccontextmanager
    async def _begin(self) -> AsyncIterator[AsyncConnection]:
        """A read transaction."""
        async with self._engine.begin() as conn:
            yield conn

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[AsyncConnection]:
        """A transaction that writes; what it noted as changed (``_changed``) becomes events
        just before it commits."""
        appended = False
        async with contextlib.AsyncExitStack() as stack:
            if self._write_lock is not None:
                await stack.enter_async_context(self._write_lock)
            conn = await stack.enter_async_context(self._engine.begin())
            # The dict itself, kept: on a connection that died, conn.info would raise
            # PendingRollbackError and hide the error that killed it.
            info = conn.info
            changes = info["chronoplane_changes"] = Changes()
            try:
                yield conn
                if changes:
                    await self._append_events(conn, changes)
                    appended = True
            finally:
                info.pop("chronoplane_changes", None)
        if appended and self.on_events is not None:
            self.on_events()

    @staticmethod
    def _changed(
        conn: AsyncConnection, resource: EventResource, ids: Iterable[str], kind: EventKind
    ) -> None:
        changes: Changes | None = conn.info.get("chronoplane_changes")
        if changes is not None:
            changes.note(resource, ids, kind)

    @staticmethod
    def _changed_rows(conn: AsyncConnection, rows: Iterable[Any], kind: EventKind) -> None:
        changes: Changes | None = conn.info.get("chronoplane_changes")
        if changes is not None:
            changes.note_rows(rows, kind)

    async def _append_events(self, conn: AsyncConnection, changes: Changes) -> None:
        """One event per resource changed, as it now is, with the next cursors (storage/
        events.py: from the sequence on PostgreSQL, from the ``event_log`` row, which stays
        locked until the commit, on SQLite)."""
        bodies: dict[tuple[EventResource, str], tuple[str, dict[str, Any], Any]] = {}
        execution_ids = [i for i in changes.ids(EventResource.EXECUTION) if i not in changes.known]
        if changes.known:
            # Rows known as written: only their jobs' labels are read.
            job_of = {i: body["job_id"] for i, body in changes.known.items()}
            labels = dict(
                (
                    await conn.execute(
                        sa.select(jobs.c.id, jobs.c.labels).where(
                            self._among(jobs.c.id, sorted(set(job_of.values())))
                        )
                    )
                ).all()
            )
            for execution_id, body in changes.known.items():
                job_id = job_of[execution_id]
                bodies[(EventResource.EXECUTION, execution_id)] = (
                    job_id,
                    body,
                    labels.get(job_id) or {},
                )
        if execution_ids:
            query = (
                sa.select(executions, jobs.c.labels.label("job_labels"))
                .outerjoin(jobs, jobs.c.id == executions.c.job_id)
                .where(self._among(executions.c.id, execution_ids))
            )
            for row in await conn.execute(query):
                bodies[(EventResource.EXECUTION, row.id)] = (
                    row.job_id,
                    encode_row(row),
                    row.job_labels or {},
                )
        job_ids = changes.ids(EventResource.JOB)
        if job_ids:
            for row in await conn.execute(sa.select(jobs).where(self._among(jobs.c.id, job_ids))):
                bodies[(EventResource.JOB, row.id)] = (row.id, encode_row(row), row.labels or {})
        for job_id, body in changes.deleted.items():
            bodies[(EventResource.JOB, job_id)] = (job_id, body, body.get("labels") or {})
        ordered = [(key, kind) for key, kind in changes.kinds.items() if key in bodies]
        if not ordered:
            return
        now = datetime.now(UTC)
        if self._dialect == "postgresql":
            await conn.execute(
                _PG_APPEND_EVENTS,
                {
                    "resources": [resource for (resource, _), _ in ordered],
                    "kinds": [kind.value for _, kind in ordered],
                    "job_ids": [bodies[key][0] for key, _ in ordered],
                    "bodies": [json.dumps(bodies[key][1]) for key, _ in ordered],
                    "labels": [json.dumps(bodies[key][2]) for key, _ in ordered],
                    "now": now,
                },
            )
            return
        last = (
            await conn.execute(
                event_log.update()
                .where(event_log.c.id == 1)
                .values(last_cursor=event_log.c.last_cursor + len(ordered))
                .returning(event_log.c.last_cursor)
            )
        ).scalar_one()
        first = last - len(ordered) + 1
        await conn.execute(
            events.insert(),
            [
                {
                    "cursor": first + n,
                    "resource": resource,
                    "kind": kind.value,
                    "job_id": bodies[(resource, rid)][0],
                    "body": bodies[(resource, rid)][1],
                    "labels": bodies[(resource, rid)][2],
                    "create_time": now,
                }
                for n, ((resource, rid), kind) in enumerate(ordered)
            ],
        )

    def _among(self, column: sa.ColumnElement[str], values: Iterable[str]) -> Any:
        """``column IN values``; on PostgreSQL ``= ANY(array)``, one statement for any number
        of values (asyncpg prepares each distinct text: a list of n parameters would be a new
        statement for every n, and the statement cache would churn)."""
        listed = list(values)
        if self._dialect == "postgresql":
            return column == sa.any_(sa.bindparam(None, listed, type_=postgresql.ARRAY(sa.String)))
        return column.in_(listed)

    def _insert(self, table: sa.Table) -> Any:
        module = postgresql if self._dialect == "postgresql" else sqlite
        return module.insert(table)

    # -- jobs ---------------------------------------------------------------------------------

    @_translate_errors
    async def create_job(self, job: Job, *, request_id: str | None) -> Job:
        now = job.create_time or datetime.now(UTC)
        values = _job_values(job) | {
            "id": job.id,
            "created_by": job.created_by,
            "version": 1,
            "request_id": request_id,
            "create_time": now,
            "update_time": now,
        }
        try:
            async with self._write() as conn:
                await conn.execute(jobs.insert().values(**values))
                self._changed(conn, EventResource.JOB, [job.id], EventKind.ADDED)
                await self._notify_job(conn, job.id)
        except exc.IntegrityError as error:
            raise JobAlreadyExists(job.id) from error
        return await self.get_job(job.id)

    @_translate_errors
    async def get_job(self, job_id: str) -> Job:
        async with self._begin() as conn:
            row = (await conn.execute(_JOB_WITH_SUMMARY.where(jobs.c.id == job_id))).first()
        if row is None:
            raise JobNotFound(job_id)
        return _job_with_summary(row)

    @_translate_errors
    async def get_job_by_request_id(self, request_id: str) -> Job | None:
        async with self._begin() as conn:
            query = _JOB_WITH_SUMMARY.where(jobs.c.request_id == request_id)
            row = (await conn.execute(query)).first()
        return None if row is None else _job_with_summary(row)

    @_translate_errors
    async def list_jobs(self, *, after: str | None, limit: int) -> JobPage:
        query = _JOB_WITH_SUMMARY.order_by(jobs.c.id).limit(limit + 1)
        if after is not None:
            query = query.where(jobs.c.id > after)
        async with self._begin() as conn:
            rows = (await conn.execute(query)).all()
        page = [_job_with_summary(row) for row in rows[:limit]]
        return JobPage(jobs=page, next_after=page[-1].id if len(rows) > limit else None)

    @_translate_errors
    async def list_schedulable_jobs(self) -> list[Job]:
        async with self._begin() as conn:
            rows = await conn.execute(sa.select(jobs).where(jobs.c.paused.is_(False)))
            return [_job_from_row(row) for row in rows]

    @_translate_errors
    async def update_job(self, job: Job, *, expected_version: int) -> Job:
        values = _job_values(job) | {
            "version": expected_version + 1,
            "update_time": datetime.now(UTC),
        }
        async with self._write() as conn:
            result = await conn.execute(
                jobs.update()
                .where(jobs.c.id == job.id, jobs.c.version == expected_version)
                .values(**values)
            )
            if result.rowcount == 0:
                await self._raise_missing_or_moved(conn, job.id, expected_version)
            self._changed(conn, EventResource.JOB, [job.id], EventKind.MODIFIED)
            # A larger max_concurrent lets queued executions go.
            await self._promote(conn, await self._queued_jobs(conn, [job.id]))
            await self._notify_job(conn, job.id)
        return await self.get_job(job.id)

    @_translate_errors
    async def delete_job(self, job_id: str, *, expected_version: int | None) -> None:
        condition = jobs.c.id == job_id
        if expected_version is not None:
            condition = condition & (jobs.c.version == expected_version)
        async with self._write() as conn:
            # Children first: the foreign key cascade is not relied on (SQLite needs a pragma).
            exists = sa.select(jobs.c.id).where(condition)
            await conn.execute(executions.delete().where(executions.c.job_id.in_(exists)))
            result = await conn.execute(jobs.delete().where(condition).returning(*jobs.c))
            row = result.first()
            if row is None:
                await self._raise_missing_or_moved(conn, job_id, expected_version)
            else:
                changes: Changes | None = conn.info.get("chronoplane_changes")
                if changes is not None:
                    changes.deleted[job_id] = encode_row(row)
                self._changed(conn, EventResource.JOB, [job_id], EventKind.DELETED)
            await self._notify_job(conn, job_id)

    async def _notify_job(self, conn: AsyncConnection, job_id: str) -> None:
        """Wakes the leader of a cluster, to read the job now rather than at the next resync
        (unless it made the change itself: the payload starts with the writer's id)."""
        await self._notify(conn, JOBS_CHANNEL, f"{self._instance_id} {job_id}")

    async def _raise_missing_or_moved(
        self, conn: AsyncConnection, job_id: str, expected_version: int | None
    ) -> None:
        version = (
            await conn.execute(sa.select(jobs.c.version).where(jobs.c.id == job_id))
        ).scalar()
        if version is None:
            raise JobNotFound(job_id)
        raise EtagMismatch(job_id, str(expected_version), str(version))

    # -- executions ---------------------------------------------------------------------------

    @_translate_errors
    async def admit_executions(
        self,
        admissions: Sequence[Admission],
        *,
        epoch: int | None = None,
        claim_for: str = "",
        claim_limit: int = 0,
    ) -> Admitted:
        if not admissions:
            return Admitted(inserted=[], displace=[], claimed=[])
        for attempt in range(3):
            try:
                async with self._write() as conn:
                    return await self._admit(conn, admissions, epoch, claim_for, claim_limit)
            except exc.IntegrityError:
                # A job deleted between our check and our insert (foreign key): check again.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _admit(
        self,
        conn: AsyncConnection,
        admissions: Sequence[Admission],
        epoch: int | None,
        claim_for: str,
        claim_limit: int,
    ) -> Admitted:
        # Before any job is locked: a fence takes the instance's row first, then the jobs.
        fenced = claim_limit > 0 and await self._fenced(conn, claim_for)
        if fenced:
            claim_limit = 0
        queueing = {
            a.execution.job_id for a in admissions if a.execution.state is ExecutionState.PENDING
        }
        found, slots = await self._admitted_jobs(
            conn, {a.execution.job_id for a in admissions}, lock=bool(queueing), epoch=epoch
        )
        chosen: list[tuple[Admission, Execution, bool]] = []
        cancel_for: list[tuple[str, str]] = []
        for admission in admissions:
            execution = admission.execution
            if execution.job_id not in found:
                continue
            ready = False
            if execution.state is ExecutionState.PENDING:
                limit = found[execution.job_id].max_concurrent
                holding, ready_n, queued_n = slots.get(execution.job_id, (0, 0, 0))
                decision = admit(
                    admission.policy or OverlapPolicy.BUFFER_ALL,
                    0 if admission.force else limit,
                    running=holding,
                    waiting=ready_n + queued_n,
                )
                if admission.force:
                    ready = True
                elif decision.waits:
                    ready = limit <= 0 or holding + ready_n < limit
                    slots[execution.job_id] = (
                        holding,
                        ready_n + ready,
                        queued_n + (not ready),
                    )
                    if decision.cancel_oldest:
                        cancel_for.append((execution.id, execution.job_id))
                else:
                    execution = replace(
                        execution,
                        state=ExecutionState.SKIPPED,
                        end_time=execution.create_time,
                        error_message=decision.reason,
                    )
            chosen.append((admission, execution, ready))
        if not chosen:
            return Admitted(inserted=[], displace=[], claimed=[], fenced=fenced)
        # What is ready and due now, the writer may run itself, up to claim_limit: claimed in
        # the insert (no other instance can see these rows before it commits).
        claimed: list[tuple[Execution, RunPolicy]] = []
        rows: list[tuple[Execution, dict[str, Any]]] = []
        for admission, execution, ready in chosen:
            due = admission.due_time or execution.scheduled_time
            if (
                ready
                and execution.executor is ExecutorKind.INLINE
                and len(claimed) < claim_limit
                and due <= execution.create_time
            ):
                execution = replace(
                    execution,
                    state=ExecutionState.RUNNING,
                    instance_id=claim_for,
                    start_time=execution.create_time,
                )
                job = found[execution.job_id]
                claimed.append((execution, _run_policy(job.timeout_seconds, job.retry)))
            rows.append((execution, _execution_values(execution, admission, ready=ready)))
        inserted = await self._insert_rows(conn, [values for _, values in rows])
        if any(values["ready"] and e.id in inserted for e, values in rows):
            await self._notify(conn, WORK_CHANNEL, self._instance_id)
        return Admitted(
            # As stored: a queued execution has no instance yet.
            inserted=[
                replace(e, instance_id=values["instance_id"])
                for e, values in rows
                if e.id in inserted
            ],
            displace=sorted({job_id for eid, job_id in cancel_for if eid in inserted}),
            claimed=[(e, p) for e, p in claimed if e.id in inserted],
            fenced=fenced,
        )

    async def _admitted_jobs(
        self, conn: AsyncConnection, job_ids: set[str], *, lock: bool, epoch: int | None
    ) -> tuple[dict[str, Any], dict[str, tuple[int, int, int]]]:
        """The jobs that exist (rows by id, with what admission needs of them) and, when
        ``lock``, their slots (``_slot_counts``), counted after their rows were locked: two
        writers of one job's slots take turns, in id order (no deadlock), and the count
        sees what the one before committed. With ``epoch``, fenced as ``_check_epoch``.
        On PostgreSQL one call of a function (migration 0004) does it all."""
        if lock and self._dialect == "postgresql":
            rows = (
                await conn.execute(
                    _PG_ADMISSION_JOBS,
                    {"ids": sorted(job_ids), "fenced": epoch is not None},
                )
            ).all()
            if epoch is not None:
                if not rows:
                    await self._check_epoch(conn, epoch)
                elif rows[0].epoch != epoch:
                    raise NotLeader(epoch, rows[0].epoch)
            slots = {
                r.id: (r.holding, r.ready, r.queued)
                for r in rows
                if r.holding or r.ready or r.queued
            }
            return {row.id: row for row in rows}, slots
        if epoch is not None:
            await self._check_epoch(conn, epoch)
        query = (
            sa.select(jobs.c.id, jobs.c.max_concurrent, jobs.c.timeout_seconds, jobs.c.retry)
            .where(self._among(jobs.c.id, job_ids))
            .order_by(jobs.c.id)
        )
        if lock:
            query = query.with_for_update(key_share=True)
        found = {row.id: row for row in await conn.execute(query)}
        counted = await self._slot_counts(conn, sorted(found)) if lock else {}
        return found, counted

    async def _slot_counts(
        self, conn: AsyncConnection, job_ids: Sequence[str]
    ) -> dict[str, tuple[int, int, int]]:
        """Per job: executions holding a slot, ready ones (forced ones aside), queued ones."""
        if not job_ids:
            return {}
        query = (
            sa.select(
                executions.c.job_id,
                sa.func.count().filter(executions.c.holds_slot),
                sa.func.count().filter(_READY & sa.not_(executions.c.force)),
                sa.func.count().filter(_QUEUED),
            )
            .where(self._among(executions.c.job_id, job_ids), _ACTIVE)
            .group_by(executions.c.job_id)
        )
        return {
            row[0]: (int(row[1]), int(row[2]), int(row[3])) for row in await conn.execute(query)
        }

    async def _queued_jobs(self, conn: AsyncConnection, job_ids: Iterable[str] | None) -> list[str]:
        """The jobs among ``job_ids`` (None: all) that have queued executions."""
        query = sa.select(executions.c.job_id).where(_WAITING).distinct()
        if job_ids is not None:
            wanted = sorted(set(job_ids))
            if not wanted:
                return []
            query = query.where(self._among(executions.c.job_id, wanted))
        return sorted(set((await conn.execute(query)).scalars()))

    async def _promote(self, conn: AsyncConnection, job_ids: Sequence[str]) -> int:
        """Makes queued executions of these jobs ready, oldest due first, as many as each
        job's free slots; returns how many, and wakes the claimers if any.

        Locks the jobs first, in id order, as admissions do: two writers never count one
        job's slots at once, and the count (a later statement) sees what they committed. A
        transaction calls it after its own execution rows are written (admissions write no
        existing execution rows, so the two orders cannot deadlock)."""
        if not job_ids:
            return 0
        await conn.execute(
            sa.select(jobs.c.id)
            .where(self._among(jobs.c.id, sorted(job_ids)))
            .order_by(jobs.c.id)
            .with_for_update(key_share=True)
        )
        counts = (
            sa.select(
                executions.c.job_id,
                sa.func.count().filter(executions.c.holds_slot).label("holding"),
                sa.func.count().filter(_READY & sa.not_(executions.c.force)).label("ready"),
            )
            .where(self._among(executions.c.job_id, job_ids), _ACTIVE)
            .group_by(executions.c.job_id)
            .subquery()
        )
        ranked = (
            sa.select(
                executions.c.id,
                executions.c.job_id,
                sa.func.row_number()
                .over(
                    partition_by=executions.c.job_id,
                    order_by=(executions.c.due_time, executions.c.id),
                )
                .label("rn"),
            )
            .where(self._among(executions.c.job_id, job_ids), _WAITING)
            .subquery()
        )
        free = (
            jobs.c.max_concurrent
            - sa.func.coalesce(counts.c.holding, 0)
            - sa.func.coalesce(counts.c.ready, 0)
        )
        chosen = (
            sa.select(ranked.c.id)
            .join(jobs, jobs.c.id == ranked.c.job_id)
            .outerjoin(counts, counts.c.job_id == ranked.c.job_id)
            .where((jobs.c.max_concurrent <= 0) | (ranked.c.rn <= free))
            .cte("chosen")
            .prefix_with("MATERIALIZED")  # counted once, before any row changes
        )
        result = await conn.execute(
            executions.update()
            .where(executions.c.id.in_(sa.select(chosen.c.id)), _WAITING)
            .values(ready=True)
            .returning(executions.c.id)  # rowcount is -1 for WITH ... UPDATE on SQLite
        )
        promoted = len(result.all())
        if promoted:
            await self._notify(conn, WORK_CHANNEL, self._instance_id)
        return promoted

    @_translate_errors
    async def displace_oldest(self, job_ids: Sequence[str], *, now: datetime) -> list[Execution]:
        asked: list[str] = []
        ended: list[str] = []
        freed: list[str] = []  # the jobs of those ended
        async with self._write() as conn:
            for job_id in job_ids:
                oldest = (
                    await conn.execute(
                        sa.select(executions.c.id, executions.c.executor)
                        .where(
                            executions.c.job_id == job_id,
                            executions.c.state == _RUNNING,
                            executions.c.cancel_reason.is_(None),
                        )
                        .order_by(executions.c.id)
                        .limit(1)
                        .with_for_update()
                    )
                ).first()
                if oldest is None:
                    continue
                if oldest.executor == ExecutorKind.CELERY.value:
                    # Its worker is not ours to ask: it ends here, its slot goes to the newer
                    # run, and the caller revokes its task (as CancelExecution does).
                    values = _cancelled_now(now, DISPLACED) | {"cancel_reason": DISPLACED}
                    ended.append(oldest.id)
                    freed.append(job_id)
                else:
                    values = {"cancel_reason": DISPLACED}
                    asked.append(oldest.id)
                await conn.execute(
                    executions.update().where(executions.c.id == oldest.id).values(**values)
                )
            for execution_id in asked:
                await self._notify(conn, CANCEL_CHANNEL, execution_id)
            if ended:
                self._changed(conn, EventResource.EXECUTION, ended, EventKind.MODIFIED)
                await self._promote(conn, await self._queued_jobs(conn, freed))
            rows = (
                await conn.execute(
                    sa.select(executions)
                    .where(self._among(executions.c.id, [*asked, *ended]))
                    .order_by(executions.c.id)
                )
            ).all()
        return [_execution_from_row(row) for row in rows]

    async def _insert_rows(self, conn: AsyncConnection, rows: list[dict[str, Any]]) -> set[str]:
        if self._dialect == "postgresql":
            # One statement over arrays: a tenth of the CPU of a many-row VALUES list.
            columns = {name: [row[name] for row in rows] for name in _EXECUTION_COLUMNS}
            for name in ("args", "result", "missed"):
                columns[name] = [None if v is None else json.dumps(v) for v in columns[name]]
            result = await conn.execute(_PG_INSERT_EXECUTIONS, columns)
        else:
            statement = (
                self._insert(executions)
                .on_conflict_do_nothing(index_elements=["job_id", "dedupe_key"])
                .returning(executions.c.id)
            )
            result = await conn.execute(statement, rows)
        inserted = set(result.scalars())
        self._changed_rows(conn, (r for r in rows if r["id"] in inserted), EventKind.ADDED)
        return inserted

    @_translate_errors
    async def claim_executions(
        self, *, instance_id: str, limit: int, tasks: Sequence[str]
    ) -> Claim:
        names = list(tasks)
        claimed: list[tuple[Execution, RunPolicy]] = []
        next_due_in = None
        async with self._write() as conn:
            if limit > 0 and await self._fenced(conn, instance_id):
                return Claim(executions=[], next_due_in=None, fenced=True)
            if limit > 0:
                # The first ``limit`` ready rows by due time: those due now are claimed, the
                # first one not due yet says when to look again.
                first = (
                    sa.select(
                        executions,
                        jobs.c.timeout_seconds,
                        jobs.c.retry.label("job_retry"),
                        self._now().label("db_now"),
                    )
                    .join(jobs, jobs.c.id == executions.c.job_id)
                    .where(_READY, _INLINE, executions.c.task.in_(names))
                    .order_by(executions.c.due_time, executions.c.id)
                    .limit(limit)
                    .with_for_update(skip_locked=True, of=executions)
                )
                # Two statements, not UPDATE ... WHERE id IN (this): as a subquery PostgreSQL
                # may run it again for each row it updates (and take more than the limit).
                started = datetime.now(UTC)
                for row in await conn.execute(first):
                    if row.due_time > row.db_now:
                        next_due_in = row.due_time - row.db_now
                        break
                    execution = replace(
                        _execution_from_row(row),
                        state=ExecutionState.RUNNING,
                        instance_id=instance_id,
                        start_time=started,
                    )
                    claimed.append((execution, _run_policy(row.timeout_seconds, row.job_retry)))
            if claimed:
                await self._mark_claimed(conn, [e.id for e, _ in claimed], instance_id, started)
        return Claim(executions=claimed, next_due_in=next_due_in)

    async def _mark_claimed(
        self, conn: AsyncConnection, ids: list[str], instance_id: str, started: datetime
    ) -> None:
        """RUNNING for ``instance_id``, the rows (locked, so still ready) by their key: on
        PostgreSQL one statement joined with the ids (a nested loop over the primary key,
        even while the table's statistics lag behind its growth); on SQLite one each."""
        values = {
            "state": ExecutionState.RUNNING.value,
            "instance_id": instance_id,
            "ready": False,
            "holds_slot": True,
            "start_time": started,
        }
        if self._dialect == "postgresql":
            claimed = await conn.execute(_PG_CLAIM, {"ids": ids} | values)
            self._changed_rows(conn, claimed.mappings(), EventKind.MODIFIED)
            return
        self._changed(conn, EventResource.EXECUTION, ids, EventKind.MODIFIED)
        await conn.execute(
            executions.update().where(executions.c.id == sa.bindparam("b_id")).values(**values),
            [{"b_id": execution_id} for execution_id in ids],
        )

    async def _write_next_runs(self, conn: AsyncConnection, next_runs: list[NextRun]) -> None:
        """Next run times, each applied only while its job is at the version it was computed
        for; in id order, as every writer that locks several jobs."""
        if self._dialect == "postgresql":
            await conn.execute(
                _PG_NEXT_RUNS,
                {
                    "ids": [n.job_id for n in next_runs],
                    "versions": [n.version for n in next_runs],
                    "times": [n.next_run_time for n in next_runs],
                },
            )
            return
        await conn.execute(
            jobs.update()
            .where(
                jobs.c.id == sa.bindparam("b_job_id"),
                jobs.c.version == sa.bindparam("b_version"),
            )
            .values(next_run_time=sa.bindparam("b_next_run_time")),
            [
                {"b_job_id": n.job_id, "b_version": n.version, "b_next_run_time": n.next_run_time}
                for n in next_runs
            ],
        )

    async def _write_finishes(
        self, conn: AsyncConnection, finishes: Sequence[ExecutionFinish]
    ) -> None:
        """Final states, of executions not final yet (the first final state wins)."""
        if self._dialect == "postgresql":
            finished = await conn.execute(
                _PG_FINISH,
                {
                    "ids": [f.id for f in finishes],
                    "states": [f.state.value for f in finishes],
                    "starts": [f.start_time for f in finishes],
                    "ends": [f.end_time for f in finishes],
                    "results": [
                        None if f.result is None else json.dumps(f.result) for f in finishes
                    ],
                    "messages": [f.error_message for f in finishes],
                    "tracebacks": [f.error_traceback for f in finishes],
                    "types": [f.error_type for f in finishes],
                    "keeps": [f.keeps_slot for f in finishes],
                    "bys": [f.cancelled_by for f in finishes],
                },
            )
            self._changed_rows(conn, finished.mappings(), EventKind.MODIFIED)
            return
        # One writer at a time on SQLite: what is unfinished now is what the update changes.
        unfinished = await conn.execute(
            sa.select(executions.c.id).where(
                executions.c.id.in_([f.id for f in finishes]), executions.c.state.in_(_UNFINISHED)
            )
        )
        self._changed(conn, EventResource.EXECUTION, unfinished.scalars(), EventKind.MODIFIED)
        await conn.execute(
            executions.update()
            .where(
                executions.c.id == sa.bindparam("b_id"),
                # Not IN (...): expanding parameters cannot go into an executemany.
                sa.or_(*(executions.c.state == state for state in _UNFINISHED)),
            )
            .values(
                state=sa.bindparam("b_state"),
                start_time=sa.bindparam("b_start_time"),
                end_time=sa.bindparam("b_end_time"),
                result=sa.bindparam("b_result", type_=executions.c.result.type),
                error_message=sa.bindparam("b_error_message"),
                error_traceback=sa.bindparam("b_error_traceback"),
                error_type=sa.bindparam("b_error_type"),
                holds_slot=sa.bindparam("b_keeps_slot"),
                # Who cancelled it: said here, or when the cancel was requested.
                cancelled_by=sa.case(
                    (
                        sa.bindparam("b_state") == ExecutionState.CANCELLED.value,
                        sa.func.coalesce(
                            sa.func.nullif(sa.bindparam("b_cancelled_by"), ""),
                            executions.c.cancelled_by,
                        ),
                    ),
                    else_="",
                ),
            ),
            [
                {
                    "b_id": f.id,
                    "b_state": f.state.value,
                    "b_start_time": f.start_time,
                    "b_end_time": f.end_time,
                    "b_result": f.result,
                    "b_error_message": f.error_message,
                    "b_error_traceback": f.error_traceback,
                    "b_error_type": f.error_type,
                    "b_keeps_slot": f.keeps_slot,
                    "b_cancelled_by": f.cancelled_by,
                }
                for f in finishes
            ],
        )

    @_translate_errors
    async def record_progress(
        self,
        finishes: Sequence[ExecutionFinish],
        releases: Sequence[SlotRelease] = (),
        next_runs: Sequence[NextRun] = (),
        *,
        epoch: int | None = None,
    ) -> Progress:
        moved = True
        async with self._write() as conn:
            if next_runs and epoch is not None:
                try:
                    await self._check_epoch(conn, epoch)
                except NotLeader:
                    next_runs, moved = (), False
            if next_runs:
                await self._write_next_runs(conn, sorted(next_runs, key=lambda n: n.job_id))
            if finishes:
                await self._write_finishes(conn, finishes)
            if releases:
                await conn.execute(
                    executions.update()
                    .where(executions.c.id == sa.bindparam("b_id"))
                    .values(holds_slot=False, note=sa.bindparam("b_note")),
                    [{"b_id": r.id, "b_note": r.note} for r in releases],
                )
                noted = (r.id for r in releases if r.note is not None)
                self._changed(conn, EventResource.EXECUTION, noted, EventKind.MODIFIED)
            freeing = {f.job_id for f in finishes if not f.keeps_slot} | {
                r.job_id for r in releases
            }
            readied = await self._promote(conn, await self._queued_jobs(conn, freeing))
        return Progress(moved=moved, readied=readied)

    @_translate_errors
    async def request_cancel(
        self, execution_id: str, *, message: str, now: datetime, by: str = ""
    ) -> CancelRequest:
        query = sa.select(executions).where(executions.c.id == execution_id)
        async with self._write() as conn:
            row = (await conn.execute(query.with_for_update())).first()
            if row is None:
                raise ExecutionNotFound(execution_id)
            current = _execution_from_row(row)
            # A Celery execution ends here and now: its worker, if it has one, is told to
            # stop (revoked), and whatever it reports later no longer counts.
            celery = current.executor is ExecutorKind.CELERY
            if current.state is ExecutionState.PENDING or (
                celery and current.state is ExecutionState.RUNNING
            ):
                values: dict[str, Any] = _cancelled_now(now, message, by=by)
                done = True
            elif current.state is ExecutionState.RUNNING:
                values = {"cancel_reason": message, "cancelled_by": by}
                done = False
                await self._notify(conn, CANCEL_CHANNEL, execution_id)
            else:
                raise ExecutionFinished(execution_id, current.state.value)
            await conn.execute(
                executions.update().where(executions.c.id == execution_id).values(**values)
            )
            if done:
                self._changed(conn, EventResource.EXECUTION, [execution_id], EventKind.MODIFIED)
            if done and (row.ready or row.holds_slot):
                await self._promote(conn, await self._queued_jobs(conn, [current.job_id]))
            after = (await conn.execute(query)).one()
        return CancelRequest(execution=_execution_from_row(after), done=done)

    # -- Celery dispatch (docs/decisions/0014-celery-dispatch.md) ----------------------------

    @_translate_errors
    async def claim_dispatches(self, *, instance_id: str, limit: int) -> DispatchClaim:
        claimed: list[Dispatch] = []
        next_due_in = None
        async with self._write() as conn:
            if await self._fenced(conn, instance_id):
                return DispatchClaim(dispatches=[], next_due_in=None, fenced=True)
            query = (
                sa.select(
                    executions,
                    jobs.c.celery.label("job_celery"),
                    jobs.c.timeout_seconds,
                    self._now().label("db_now"),
                )
                .join(jobs, jobs.c.id == executions.c.job_id)
                .where(_READY, _CELERY)
                .order_by(executions.c.due_time, executions.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True, of=executions)
            )
            for row in await conn.execute(query):
                if row.due_time > row.db_now:
                    next_due_in = row.due_time - row.db_now
                    break
                execution = replace(
                    _execution_from_row(row), instance_id=instance_id, celery_task_id=row.id
                )
                claimed.append(
                    Dispatch(
                        execution=execution,
                        options=_celery_from_json(row.job_celery),
                        timeout=_delta(row.timeout_seconds),
                    )
                )
            if claimed:
                # The slot is taken now; the row is this instance's until it is sent.
                await conn.execute(
                    executions.update()
                    .where(self._among(executions.c.id, [d.execution.id for d in claimed]))
                    .values(
                        ready=False,
                        holds_slot=True,
                        instance_id=instance_id,
                        celery_task_id=executions.c.id,
                    )
                )
        return DispatchClaim(dispatches=claimed, next_due_in=next_due_in)

    @_translate_errors
    async def record_dispatches(
        self,
        *,
        instance_id: str,
        sent: Sequence[tuple[str, datetime]],
        failed: Sequence[tuple[str, str, datetime]],
    ) -> None:
        """Sent ones belong to no instance from now on (a worker will start them); those the
        broker did not take are ready again at their retry time, with the reason."""
        mine = (executions.c.state == _PENDING) & (executions.c.instance_id == instance_id)
        async with self._write() as conn:
            for execution_id, when in sent:
                # A worker may have started it already (and made it no instance's).
                changed = await conn.execute(
                    executions.update()
                    .where(executions.c.id == execution_id, executions.c.dispatch_time.is_(None))
                    .values(
                        instance_id=sa.case(
                            (executions.c.instance_id == instance_id, ""),
                            else_=executions.c.instance_id,
                        ),
                        dispatch_time=when,
                    )
                    .returning(*executions.c)
                )
                self._changed_rows(conn, changed.mappings(), EventKind.MODIFIED)
            for execution_id, reason, retry_at in failed:
                changed = await conn.execute(
                    executions.update()
                    .where(executions.c.id == execution_id, mine)
                    .values(
                        instance_id="",
                        ready=True,
                        holds_slot=False,
                        due_time=retry_at,
                        pending_reason=reason,
                    )
                    .returning(*executions.c)
                )
                self._changed_rows(conn, changed.mappings(), EventKind.MODIFIED)
            if failed:
                await self._notify(conn, WORK_CHANNEL, self._instance_id)

    @_translate_errors
    async def start_dispatched(
        self, execution_id: str, *, worker: str, lease_until: datetime
    ) -> tuple[Execution, RunPolicy] | None:
        """The conditional claim of a worker: RUNNING on ``worker`` if it is still PENDING;
        None when it was started before (a redelivered message), cancelled or finished."""
        async with self._write() as conn:
            started = await conn.execute(
                executions.update()
                .where(executions.c.id == execution_id, executions.c.state == _PENDING, _CELERY)
                .values(
                    state=ExecutionState.RUNNING.value,
                    start_time=self._now(),
                    worker=worker,
                    instance_id="",
                    ready=False,
                    holds_slot=True,
                    lease_expire_time=lease_until,
                    pending_reason="",
                )
                .returning(*executions.c)
            )
            rows = list(started.mappings())
            if not rows:
                return None
            self._changed_rows(conn, rows, EventKind.MODIFIED)
            job = (
                await conn.execute(
                    sa.select(jobs.c.timeout_seconds, jobs.c.retry).where(
                        jobs.c.id == rows[0]["job_id"]
                    )
                )
            ).first()
        policy = _run_policy(job.timeout_seconds, job.retry) if job else RunPolicy()
        return _execution_from_mapping(rows[0]), policy

    @_translate_errors
    async def renew_lease(self, execution_id: str, *, worker: str, until: datetime) -> bool:
        async with self._write() as conn:
            renewed = await conn.execute(
                executions.update()
                .where(
                    executions.c.id == execution_id,
                    executions.c.state == _RUNNING,
                    executions.c.worker == worker,
                )
                .values(lease_expire_time=until)
            )
            return bool(renewed.rowcount)

    @_translate_errors
    async def abandon_expired_leases(self, *, message: str) -> list[Execution]:
        async with self._write() as conn:
            expired = (
                (executions.c.state == _RUNNING)
                & _CELERY
                & (executions.c.lease_expire_time < self._now())
            )
            abandoned = await conn.execute(
                executions.update()
                .where(expired)
                .values(
                    state=ExecutionState.ABANDONED.value,
                    end_time=self._now(),
                    error_message=sa.literal(f"{message}: worker ") + executions.c.worker,
                    error_type=ABANDONED_ERROR_TYPE,
                    holds_slot=False,
                )
                .returning(*executions.c)
            )
            rows = list(abandoned.mappings())
            self._changed_rows(conn, rows, EventKind.MODIFIED)
            if rows:
                jobs_freed = sorted({row["job_id"] for row in rows})
                await self._promote(conn, await self._queued_jobs(conn, jobs_freed))
        return [_execution_from_mapping(row) for row in rows]

    @_translate_errors
    async def promote_waiting(self) -> int:
        async with self._write() as conn:
            return await self._promote(conn, await self._queued_jobs(conn, None))

    @_translate_errors
    async def cancel_requests(self, execution_ids: Sequence[str]) -> dict[str, str]:
        if not execution_ids:
            return {}
        async with self._begin() as conn:
            rows = await conn.execute(
                sa.select(executions.c.id, executions.c.cancel_reason).where(
                    self._among(executions.c.id, execution_ids),
                    executions.c.state == _RUNNING,
                    executions.c.cancel_reason.is_not(None),
                )
            )
            return {row.id: row.cancel_reason for row in rows}

    async def _notify(self, conn: AsyncConnection, channel: str, payload: str) -> None:
        """Delivered at commit, only if it commits: a hint to read the table now; the table
        is the truth. PostgreSQL only (SQLite serves one process, which knows)."""
        if self._dialect == "postgresql":
            await conn.execute(sa.select(sa.func.pg_notify(channel, payload)))

    async def _check_epoch(self, conn: AsyncConnection, epoch: int) -> None:
        """Fencing: the leadership row is read FOR KEY SHARE, so a new leader's bump (which
        locks it FOR UPDATE first) waits for this transaction, and this one sees the bump if
        it came first; the leader's heartbeat, a plain UPDATE, waits for neither."""
        query = sa.select(leadership.c.epoch).where(leadership.c.id == 1)
        if self._dialect == "postgresql":
            query = query.with_for_update(read=True, key_share=True)
        current = (await conn.execute(query)).scalar_one()
        if current != epoch:
            raise NotLeader(epoch, current)

    @_translate_errors
    async def get_execution(self, execution_id: str) -> Execution:
        async with self._begin() as conn:
            query = sa.select(executions).where(executions.c.id == execution_id)
            row = (await conn.execute(query)).first()
        if row is None:
            raise ExecutionNotFound(execution_id)
        return _execution_from_row(row)

    @_translate_errors
    async def get_execution_by_request_id(self, job_id: str, request_id: str) -> Execution | None:
        async with self._begin() as conn:
            query = sa.select(executions).where(
                executions.c.job_id == job_id, executions.c.dedupe_key == "r:" + request_id
            )
            row = (await conn.execute(query)).first()
        return None if row is None else _execution_from_row(row)

    @_translate_errors
    async def list_executions(
        self, query: ExecutionQuery, *, before: str | None, limit: int
    ) -> ExecutionPage:
        select = sa.select(executions).order_by(executions.c.id.desc()).limit(limit + 1)
        if query.job_id is not None:
            select = select.where(executions.c.job_id == query.job_id)
        if query.states:
            select = select.where(executions.c.state.in_(sorted(s.value for s in query.states)))
        if query.scheduled_after is not None:
            select = select.where(executions.c.scheduled_time >= query.scheduled_after)
        if query.scheduled_before is not None:
            select = select.where(executions.c.scheduled_time < query.scheduled_before)
        if before is not None:
            select = select.where(executions.c.id < before)
        async with self._begin() as conn:
            rows = (await conn.execute(select)).all()
        page = [_execution_from_row(row) for row in rows[:limit]]
        return ExecutionPage(
            executions=page, next_before=page[-1].id if len(rows) > limit else None
        )

    @_translate_errors
    async def interrupt_unfinished(self, *, message: str, now: datetime) -> int:
        async with self._write() as conn:
            result = await conn.execute(
                executions.update()
                .where(executions.c.state == _RUNNING, _INLINE)
                .values(
                    state=ExecutionState.INTERRUPTED.value,
                    end_time=now,
                    error_message=message,
                    holds_slot=False,
                )
                .returning(executions.c.id)
            )
            interrupted = list(result.scalars())
            self._changed(conn, EventResource.EXECUTION, interrupted, EventKind.MODIFIED)
            # Slots held here: those of inline runs, and of Celery executions being sent.
            held = executions.c.holds_slot & (_INLINE | (executions.c.state == _PENDING))
            await conn.execute(executions.update().where(held).values(holds_slot=False))
            await self._promote(conn, await self._queued_jobs(conn, None))
            return len(interrupted)

    @_translate_errors
    async def purge_executions(
        self, *, job_id: str | None, ended_before: datetime | None, keep_last: int
    ) -> int:
        final = sa.not_(executions.c.state.in_(_UNFINISHED))
        purged = 0
        async with self._write() as conn:
            if ended_before is not None:
                condition = final & (executions.c.end_time < ended_before)
                if job_id is not None:
                    condition &= executions.c.job_id == job_id
                purged += (await conn.execute(executions.delete().where(condition))).rowcount
            if keep_last > 0:
                job_ids = (
                    [job_id]
                    if job_id is not None
                    else list((await conn.execute(sa.select(jobs.c.id))).scalars())
                )
                for one in job_ids:
                    purged += await self._keep_last(conn, one, keep_last, final)
        return purged

    @_translate_errors
    async def purge_history_limits(self) -> int:
        purged = 0
        final = sa.not_(executions.c.state.in_(_UNFINISHED))
        async with self._write() as conn:
            limits = (
                await conn.execute(
                    sa.select(jobs.c.id, jobs.c.history_limit).where(jobs.c.history_limit > 0)
                )
            ).all()
            for job_id, limit in limits:
                purged += await self._keep_last(conn, job_id, limit, final)
        return purged

    @staticmethod
    async def _keep_last(
        conn: AsyncConnection, job_id: str, keep: int, final: sa.ColumnElement[bool]
    ) -> int:
        """Deletes the job's final executions older than its newest ``keep``."""
        boundary = (
            sa.select(executions.c.id)
            .where(executions.c.job_id == job_id)
            .order_by(executions.c.id.desc())
            .offset(keep - 1)
            .limit(1)
            .scalar_subquery()
        )
        result = await conn.execute(
            executions.delete().where(
                executions.c.job_id == job_id, executions.c.id < boundary, final
            )
        )
        return int(result.rowcount)

    @_translate_errors
    async def last_fires(self, job_ids: Sequence[str]) -> dict[str, datetime]:
        inner = executions.alias("inner_executions")
        latest = (
            sa.select(inner.c.id)
            .where(
                inner.c.job_id == jobs.c.id,
                inner.c.source == ExecutionSource.SCHEDULE.value,
            )
            .order_by(inner.c.id.desc())
            .limit(1)
            .correlate(jobs)
            .scalar_subquery()
        )
        query = (
            sa.select(executions.c.job_id, executions.c.scheduled_time, executions.c.missed)
            .select_from(jobs)
            .join(executions, executions.c.id == latest)
            .where(self._among(jobs.c.id, job_ids))
        )
        found: dict[str, datetime] = {}
        async with self._begin() as conn:
            for row in await conn.execute(query):
                missed = _missed_from_json(row.missed)
                found[row.job_id] = missed.last_time if missed else row.scheduled_time
        return found

    # -- instances and leadership -------------------------------------------------------------

    def _now(self) -> Any:
        """Now by the database's clock on PostgreSQL (one clock for every instance); SQLite
        serves one process, whose clock it uses."""
        if self._dialect == "postgresql":
            return sa.func.now()
        return sa.literal(datetime.now(UTC), UtcDateTime())

    def _seen_since(self, stale_after: timedelta) -> Any:
        if self._dialect == "postgresql":
            return sa.func.now() - sa.literal(stale_after, sa.Interval())
        return sa.literal(datetime.now(UTC) - stale_after, UtcDateTime())

    @_translate_errors
    async def register_instance(self, instance: Instance) -> None:
        values = {
            "id": instance.id,
            "name": instance.name,
            "host": instance.host,
            "pid": instance.pid,
            "version": instance.version,
            "address": instance.address,
            "insecure": instance.insecure,
            "start_time": instance.start_time,
            "last_seen": self._now(),
            "max_running": instance.max_running,
            "running": instance.running,
            "draining": instance.draining,
            "fenced_at": None,
        }
        async with self._write() as conn:
            await conn.execute(
                self._insert(instances)
                .values(**values)
                .on_conflict_do_update(
                    index_elements=["id"], set_={k: v for k, v in values.items() if k != "id"}
                )
            )

    @_translate_errors
    async def heartbeat_instance(
        self, instance_id: str, *, running: int, live_after: timedelta, draining: bool = False
    ) -> int:
        async with self._write() as conn:
            result = await conn.execute(
                instances.update()
                .where(instances.c.id == instance_id, instances.c.fenced_at.is_(None))
                .values(last_seen=self._now(), running=running, draining=draining)
            )
            if not result.rowcount:
                return 0
            live = sa.select(sa.func.count()).where(
                instances.c.last_seen >= self._seen_since(live_after),
                instances.c.fenced_at.is_(None),
            )
            return max(1, int((await conn.execute(live)).scalar_one()))

    @_translate_errors
    async def remove_instance(self, instance_id: str) -> None:
        async with self._write() as conn:
            await conn.execute(instances.delete().where(instances.c.id == instance_id))

    @_translate_errors
    async def list_instances(self, *, leader_timeout: timedelta) -> list[Instance]:
        # The one elected last, while it is heard from: its own heartbeat, which every
        # instance sends, SQLite's lone one too.
        leader_id = sa.select(leadership.c.leader_id).where(leadership.c.id == 1)
        leads = (instances.c.id == leader_id.scalar_subquery()) & (
            instances.c.last_seen >= self._seen_since(leader_timeout)
        )
        query = sa.select(instances, leads.label("leader")).order_by(
            instances.c.start_time, instances.c.id
        )
        async with self._begin() as conn:
            rows = await conn.execute(query)
            return [
                Instance(
                    id=row.id,
                    name=row.name,
                    host=row.host,
                    pid=row.pid,
                    version=row.version,
                    address=row.address,
                    insecure=row.insecure,
                    start_time=row.start_time,
                    max_running=row.max_running,
                    running=row.running,
                    last_seen_time=row.last_seen,
                    leader=bool(row.leader) and row.fenced_at is None,
                    draining=row.draining,
                )
                for row in rows
            ]

    @_translate_errors
    async def remove_stale_instances(self, *, stale_after: timedelta) -> list[str]:
        async with self._write() as conn:
            result = await conn.execute(
                instances.delete()
                .where(instances.c.last_seen < self._seen_since(stale_after))
                .returning(instances.c.id)
            )
            return list(result.scalars())

    @_translate_errors
    async def instance_heartbeats(self) -> dict[str, datetime]:
        async with self._begin() as conn:
            rows = await conn.execute(
                sa.select(instances.c.id, instances.c.last_seen).where(
                    instances.c.fenced_at.is_(None)
                )
            )
            return {row.id: row.last_seen for row in rows}

    @_translate_errors
    async def execution_owners(self) -> set[str]:
        owned = (executions.c.state == _RUNNING) | executions.c.holds_slot  # ix_executions_owned
        async with self._begin() as conn:
            query = sa.select(executions.c.instance_id).where(owned).distinct()
            # "" owns what a Celery worker runs: its lease decides (abandon_expired_leases).
            return set((await conn.execute(query)).scalars()) - {""}

    @_translate_errors
    async def abandon_instances(
        self,
        silent: Mapping[str, datetime | None],
        *,
        message: str,
        now: datetime,
        epoch: int | None = None,
    ) -> list[Execution]:
        async with self._write() as conn:
            if epoch is not None:
                await self._check_epoch(conn, epoch)
            fenced = [i for i, seen in sorted(silent.items()) if await self._fence(conn, i, seen)]
            # And whatever fenced instances still hold (claimed in a race with the fence).
            fenced_rows = sa.select(instances.c.id).where(instances.c.fenced_at.is_not(None))
            dead = sorted(set(fenced) | set((await conn.execute(fenced_rows)).scalars()))
            owned = (executions.c.state == _RUNNING) | executions.c.holds_slot
            of_dead = owned & self._among(executions.c.instance_id, dead)
            affected = sa.select(executions.c.job_id).where(of_dead).distinct()
            freeing = list((await conn.execute(affected)).scalars())
            if not freeing:
                return []
            abandoned = await conn.execute(
                executions.update()
                .where(executions.c.state == _RUNNING, self._among(executions.c.instance_id, dead))
                .values(
                    state=ExecutionState.ABANDONED.value,
                    end_time=now,
                    error_message=sa.literal(f"{message}: instance ") + executions.c.instance_id,
                    error_type=ABANDONED_ERROR_TYPE,
                    holds_slot=False,
                )
                .returning(*executions.c)
            )
            rows = list(abandoned.mappings())
            self._changed_rows(conn, rows, EventKind.MODIFIED)
            # Slots of synchronous tasks that outlived their final state there, and of Celery
            # executions it was sending.
            await conn.execute(executions.update().where(of_dead).values(holds_slot=False))
            await self._promote(conn, await self._queued_jobs(conn, freeing))
        return [_execution_from_mapping(row) for row in rows]

    async def _fence(self, conn: AsyncConnection, instance_id: str, seen: datetime | None) -> bool:
        """Fences the instance if it is still as silent as observed: its last heartbeat is
        still ``seen``, or (None) it is still not registered (a row that says so takes its
        place, and stops a registration racing with this). Its own heartbeat, claim or
        registration takes the row's lock too: whichever comes first wins."""
        if seen is None:
            now = self._now()
            values = {
                "id": instance_id,
                "name": "",
                "host": "",
                "pid": 0,
                "version": "",
                "address": "",
                "insecure": False,
                "start_time": now,
                "last_seen": now,
                "max_running": 0,
                "running": 0,
                "draining": False,
                "fenced_at": now,
            }
            statement = (
                self._insert(instances)
                .values(**values)
                .on_conflict_do_nothing(index_elements=["id"])
                .returning(instances.c.id)
            )
        else:
            statement = (
                instances.update()
                .where(
                    instances.c.id == instance_id,
                    instances.c.last_seen == seen,
                    instances.c.fenced_at.is_(None),
                )
                .values(fenced_at=self._now())
                .returning(instances.c.id)
            )
        return (await conn.execute(statement)).first() is not None

    async def _fenced(self, conn: AsyncConnection, instance_id: str) -> bool:
        """Whether the instance was fenced (judged dead): it may claim nothing then. Its row
        is locked FOR SHARE to the commit, so a fence waits for this claim, and the claim
        sees a fence that came first. An instance with no row at all is not fenced (a store
        used on its own, as in the tests)."""
        query = sa.select(instances.c.fenced_at).where(instances.c.id == instance_id)
        if self._dialect == "postgresql":
            query = query.with_for_update(read=True)
        row = (await conn.execute(query)).first()
        return row is not None and row.fenced_at is not None

    @_translate_errors
    async def take_leadership(self, instance_id: str) -> int:
        async with self._write() as conn:
            result = await conn.execute(
                leadership.update()
                .where(leadership.c.id == 1)
                .values(
                    epoch=leadership.c.epoch + 1,
                    leader_id=instance_id,
                    elected_at=self._now(),
                    heartbeat_at=self._now(),
                )
                .returning(leadership.c.epoch)
            )
            return int(result.scalar_one())

    # -- the watch history --------------------------------------------------------------------

    @_translate_errors
    async def events_after(
        self, cursor: int, *, limit: int, job_ids: Sequence[str] = ()
    ) -> tuple[list[Event], EventWindow]:
        async with self._begin() as conn:
            newest = await self._decided(conn)
            rows = (
                (await conn.execute(self._events_query(cursor, newest, limit, job_ids))).all()
                if newest > cursor
                else []
            )
            # Read after the events: a purge that committed before them is seen here.
            purged = await self._purged_through(conn)
        return [_event_from_row(row) for row in rows], EventWindow(
            purged_through=purged, newest=newest
        )

    @_translate_errors
    async def newest_events(self, cursor: int, *, limit: int) -> list[Event]:
        async with self._engine.connect() as conn:  # statements that need no transaction
            newest = await self._decided(conn)
            if newest <= cursor:
                return []
            rows = (await conn.execute(self._events_query(cursor, newest, limit, ()))).all()
        return [_event_from_row(row) for row in rows]

    def _events_query(self, cursor: int, newest: int, limit: int, job_ids: Sequence[str]) -> Any:
        query = sa.select(*_EVENT_COLUMNS).where(
            events.c.cursor > cursor, events.c.cursor <= newest
        )
        if job_ids:
            query = query.where(self._among(events.c.job_id, job_ids))
        return query.order_by(events.c.cursor).limit(limit)

    @property
    def events_behind(self) -> bool:
        """Whether cursors were handed out past the last watermark read by writers still in
        flight then (PostgreSQL): a reader should look again soon."""
        return self._watermark.behind

    async def _decided(self, conn: AsyncConnection, *, settle: bool = False) -> int:
        """The cursor up to which every event is committed or gone for good (storage/
        events.py). With ``settle``, as of now: waits for the writers in flight (ms)."""
        if self._dialect != "postgresql":
            return int(
                (
                    await conn.execute(
                        sa.select(event_log.c.last_cursor).where(event_log.c.id == 1)
                    )
                ).scalar_one()
            )
        row = (await conn.execute(_PG_WATERMARK)).one()
        decided = self._watermark.observe(row.last_cursor, row.writers)
        target = int(row.last_cursor)
        deadline = asyncio.get_running_loop().time() + SETTLE_SECONDS
        while settle and decided < target and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.005)
            row = (await conn.execute(_PG_WATERMARK)).one()
            decided = self._watermark.observe(row.last_cursor, row.writers)
        return decided

    @_translate_errors
    async def event_window(self) -> EventWindow:
        async with self._engine.connect() as conn:
            newest = await self._decided(conn, settle=True)
            return EventWindow(purged_through=await self._purged_through(conn), newest=newest)

    @staticmethod
    async def _purged_through(conn: AsyncConnection) -> int:
        query = sa.select(event_log.c.purged_through).where(event_log.c.id == 1)
        return int((await conn.execute(query)).scalar_one())

    @asynccontextmanager
    async def _snapshot(self) -> AsyncIterator[tuple[AsyncConnection, SnapshotPoint]]:
        """A read transaction that sees one instant, and the point of the event history it
        is consistent with. On PostgreSQL REPEATABLE READ, after a watermark settled before
        it began (every event up to it is in the snapshot), with the events past it that
        the snapshot shows too; on SQLite the writers' turn, so that nothing commits between
        its statements."""
        async with contextlib.AsyncExitStack() as stack:
            if self._write_lock is not None:
                await stack.enter_async_context(self._write_lock)
                conn = await stack.enter_async_context(self._engine.begin())
                yield conn, SnapshotPoint(cursor=await self._decided(conn))
                return
            plain = await stack.enter_async_context(self._engine.connect())
            decided = await self._decided(plain, settle=True)
            await plain.commit()
            conn = await plain.execution_options(isolation_level="REPEATABLE READ")
            await stack.enter_async_context(conn.begin())
            shown = await conn.execute(sa.select(events.c.cursor).where(events.c.cursor > decided))
            yield conn, SnapshotPoint(cursor=decided, included=frozenset(shown.scalars()))

    @_translate_errors
    async def snapshot_executions(
        self, job_ids: Sequence[str] = ()
    ) -> tuple[SnapshotPoint, list[tuple[Execution, dict[str, str]]]]:
        query = (
            sa.select(executions, jobs.c.labels.label("job_labels"))
            .join(jobs, jobs.c.id == executions.c.job_id)
            .where(executions.c.state.in_(_UNFINISHED))
            .order_by(executions.c.id)
        )
        if job_ids:
            query = query.where(self._among(executions.c.job_id, job_ids))
        async with self._snapshot() as (conn, point):
            rows = (await conn.execute(query)).all()
        return point, [(_execution_from_row(row), row.job_labels or {}) for row in rows]

    @_translate_errors
    async def snapshot_jobs(self, job_ids: Sequence[str] = ()) -> tuple[SnapshotPoint, list[Job]]:
        query = sa.select(jobs).order_by(jobs.c.id)
        if job_ids:
            query = query.where(self._among(jobs.c.id, job_ids))
        async with self._snapshot() as (conn, point):
            rows = (await conn.execute(query)).all()
        return point, [_job_from_row(row) for row in rows]

    @_translate_errors
    async def purge_events(self, *, before: datetime) -> int:
        async with self._write() as conn:
            through = (
                await conn.execute(
                    sa.select(sa.func.max(events.c.cursor)).where(events.c.create_time < before)
                )
            ).scalar()
            if through is None:
                return 0
            result = await conn.execute(events.delete().where(events.c.cursor <= through))
            # Last, so that the event_log row is locked only for the commit.
            await conn.execute(
                event_log.update()
                .where(event_log.c.id == 1, event_log.c.purged_through < through)
                .values(purged_through=through)
            )
            return int(result.rowcount)

    # -- API tokens ---------------------------------------------------------------------------

    @_translate_errors
    async def create_token(self, token: StoredToken) -> None:
        values = {
            "id": token.id,
            "name": token.name,
            "role": token.role.name.lower(),
            "secret_hash": token.secret_hash,
            "create_time": token.create_time,
            "expire_time": token.expire_time,
            "revoke_time": token.revoke_time,
        }
        try:
            async with self._write() as conn:
                await conn.execute(tokens.insert().values(**values))
        except exc.IntegrityError as error:
            raise AlreadyExists(f"a token named {token.name!r} exists") from error

    @_translate_errors
    async def get_token(self, token_id: str) -> StoredToken | None:
        async with self._begin() as conn:
            row = (await conn.execute(sa.select(tokens).where(tokens.c.id == token_id))).first()
        return None if row is None else _token_from_row(row)

    @_translate_errors
    async def list_tokens(self) -> list[StoredToken]:
        async with self._begin() as conn:
            rows = await conn.execute(sa.select(tokens).order_by(tokens.c.name))
            return [_token_from_row(row) for row in rows]

    @_translate_errors
    async def revoke_token(self, name: str, *, now: datetime) -> StoredToken | None:
        async with self._write() as conn:
            await conn.execute(
                tokens.update()
                .where(tokens.c.name == name, tokens.c.revoke_time.is_(None))
                .values(revoke_time=now)
            )
            row = (await conn.execute(sa.select(tokens).where(tokens.c.name == name))).first()
        return None if row is None else _token_from_row(row)

    # -- the audit log ------------------------------------------------------------------------

    @_translate_errors
    async def record_audit(self, event: AuditEvent) -> None:
        async with self._write() as conn:
            values = {name: getattr(event, name) for name in _AUDIT_COLUMNS}
            await conn.execute(audit_events.insert().values(**values))

    @_translate_errors
    async def list_audit_events(
        self, query: AuditQuery, *, before: int | None, limit: int
    ) -> AuditPage:
        select = sa.select(audit_events).order_by(audit_events.c.id.desc()).limit(limit + 1)
        for column, value in (
            (audit_events.c.principal, query.principal),
            (audit_events.c.rpc, query.rpc),
            (audit_events.c.job_id, query.job_id),
            (audit_events.c.execution_id, query.execution_id),
        ):
            if value:
                select = select.where(column == value)
        if query.after is not None:
            select = select.where(audit_events.c.time >= query.after)
        if query.before is not None:
            select = select.where(audit_events.c.time < query.before)
        if before is not None:
            select = select.where(audit_events.c.id < before)
        async with self._begin() as conn:
            rows = (await conn.execute(select)).all()
        page = [_audit_from_row(row) for row in rows[:limit]]
        return AuditPage(events=page, next_before=page[-1].id if len(rows) > limit else None)

    @_translate_errors
    async def purge_audit_events(self, *, before: datetime) -> int:
        async with self._write() as conn:
            result = await conn.execute(audit_events.delete().where(audit_events.c.time < before))
            return int(result.rowcount)

    # -- server -------------------------------------------------------------------------------

    @_translate_errors
    async def get_or_create_secret(self, name: str, value: bytes) -> bytes:
        async with self._write() as conn:
            await conn.execute(
                self._insert(secrets)
                .values(name=name, value=value)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            stored = (
                await conn.execute(sa.select(secrets.c.value).where(secrets.c.name == name))
            ).scalar_one()
        return bytes(stored)
