"""The store on SQLAlchemy 2 async Core: SQLite through aiosqlite, PostgreSQL through asyncpg."""

from __future__ import annotations

import asyncio
import functools
import json
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from chronoplane.server.errors import (
    EtagMismatch,
    ExecutionFinished,
    ExecutionNotFound,
    JobAlreadyExists,
    JobNotFound,
    NotLeader,
    StorageUnavailable,
)
from chronoplane.server.models import (
    ABANDONED_ERROR_TYPE,
    CronTrigger,
    DateTrigger,
    Execution,
    ExecutionPage,
    ExecutionQuery,
    ExecutionSource,
    ExecutionState,
    ExecutionSummary,
    Instance,
    IntervalTrigger,
    Job,
    JobPage,
    MisfirePolicy,
    MissedFires,
    OverlapPolicy,
    RetryPolicy,
    Trigger,
)
from chronoplane.server.scheduling import admit
from chronoplane.server.storage.abc import (
    Admission,
    Admitted,
    CancelRequest,
    Claim,
    ExecutionFinish,
    NextRun,
    SlotRelease,
    Store,
)
from chronoplane.server.storage.tables import (
    UtcDateTime,
    executions,
    instances,
    jobs,
    leadership,
    secrets,
)

__all__ = [
    "CANCEL_CHANNEL",
    "JOBS_CHANNEL",
    "WORK_CHANNEL",
    "SqlAlchemyStore",
    "create_engine",
    "trigger_from_json",
    "trigger_to_json",
]

# NOTIFY channels (PostgreSQL): job changes (the payload is the job id); executions queued or
# slots freed, so claimers look again (no payload); a RUNNING execution asked to stop (its id).
JOBS_CHANNEL = "chronoplane_jobs"
WORK_CHANNEL = "chronoplane_work"
CANCEL_CHANNEL = "chronoplane_cancel"

P = ParamSpec("P")
R = TypeVar("R")

_UNFINISHED = (ExecutionState.PENDING.value, ExecutionState.RUNNING.value)
# Spelled as in the partial indexes of tables.executions (literals, not parameters), so that
# PostgreSQL can use them with generic plans too.
_PENDING: sa.ColumnElement[str] = sa.literal_column("'pending'")
_RUNNING: sa.ColumnElement[str] = sa.literal_column("'running'")
_UNCLAIMED: sa.ColumnElement[str] = sa.literal_column("''")
_CLAIMABLE = (executions.c.state == _PENDING) & (executions.c.instance_id == _UNCLAIMED)
_ACTIVE = executions.c.state.in_([_PENDING, _RUNNING]) | executions.c.holds_slot


def create_engine(url: str, *, pool_size: int = 10) -> AsyncEngine:
    """An engine with the settings each database needs (WAL and busy timeout on SQLite)."""
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
    return create_async_engine(url, pool_size=pool_size, max_overflow=5, pool_pre_ping=True)


def _translate_errors(
    func: Callable[P, Coroutine[Any, Any, R]],
) -> Callable[P, Coroutine[Any, Any, R]]:
    """Driver errors become domain errors here, once, at the storage edge."""

    @functools.wraps(func)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await func(*args, **kwargs)
        except (exc.OperationalError, exc.InterfaceError, OSError) as error:
            raise StorageUnavailable(f"database unavailable: {error}") from error
        except exc.DBAPIError as error:
            if error.connection_invalidated:
                raise StorageUnavailable(f"database connection lost: {error}") from error
            # Class 08 (connection exception), 57 (operator intervention: shutting down,
            # starting up, session terminated): the database, not the request.
            if str(getattr(error.orig, "sqlstate", "") or "")[:2] in ("08", "57"):
                raise StorageUnavailable(f"database unavailable: {error}") from error
            raise

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
    }


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


def _execution_values(execution: Execution, admission: Admission | None = None) -> dict[str, Any]:
    queued = execution.state is ExecutionState.PENDING
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
        "holds_slot": False,
        "force": bool(admission and admission.force),
        "cancel_reason": None,
        "epoch": admission.epoch if admission is not None else None,
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
    "holds_slot": "boolean",
    "force": "boolean",
    "cancel_reason": "text",
    "epoch": "bigint",
}
_PG_INSERT_EXECUTIONS = sa.text(
    f"INSERT INTO executions ({', '.join(_EXECUTION_COLUMNS)}) "
    "SELECT * FROM unnest("
    + ", ".join(
        f"CAST(:{name} AS {_PG_ARRAY_TYPES.get(name, 'varchar')}[])" for name in _EXECUTION_COLUMNS
    )
    + ") ON CONFLICT (job_id, dedupe_key) DO NOTHING RETURNING id"
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
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name
        # SQLite has one writer at a time, and a transaction that read before another one
        # wrote cannot write (SQLITE_BUSY, not waited for). One process uses the file (the
        # file lock), so its write transactions take turns here instead.
        self._write_lock = asyncio.Lock() if self._dialect == "sqlite" else None

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
        """A transaction that writes."""
        if self._write_lock is None:
            async with self._engine.begin() as conn:
                yield conn
            return
        async with self._write_lock, self._engine.begin() as conn:
            yield conn

    def _insert(self, table: sa.Table) -> Any:
        module = postgresql if self._dialect == "postgresql" else sqlite
        return module.insert(table)

    # -- jobs ---------------------------------------------------------------------------------

    @_translate_errors
    async def create_job(self, job: Job, *, request_id: str | None) -> Job:
        now = job.create_time or datetime.now(UTC)
        values = _job_values(job) | {
            "id": job.id,
            "version": 1,
            "request_id": request_id,
            "create_time": now,
            "update_time": now,
        }
        try:
            async with self._write() as conn:
                await conn.execute(jobs.insert().values(**values))
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
            result = await conn.execute(jobs.delete().where(condition))
            if result.rowcount == 0:
                await self._raise_missing_or_moved(conn, job_id, expected_version)
            await self._notify_job(conn, job_id)

    async def _notify_job(self, conn: AsyncConnection, job_id: str) -> None:
        """Wakes the leader of a cluster, to read the job now rather than at the next resync."""
        await self._notify(conn, JOBS_CHANNEL, job_id)

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
        self, admissions: Sequence[Admission], *, epoch: int | None = None
    ) -> Admitted:
        if not admissions:
            return Admitted(inserted=[], cancel_requested=[])
        for attempt in range(3):
            try:
                async with self._write() as conn:
                    if epoch is not None:
                        await self._check_epoch(conn, epoch)
                    return await self._admit(conn, admissions)
            except exc.IntegrityError:
                # A job deleted between our check and our insert (foreign key): check again.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _admit(self, conn: AsyncConnection, admissions: Sequence[Admission]) -> Admitted:
        deciding = {
            a.execution.job_id
            for a in admissions
            if a.policy is not None and a.execution.state is ExecutionState.PENDING
        }
        query = (
            sa.select(jobs.c.id, jobs.c.max_concurrent)
            .where(jobs.c.id.in_({a.execution.job_id for a in admissions}))
            .order_by(jobs.c.id)
        )
        if deciding:
            # Claims skip these jobs meanwhile, and two admissions of one job take turns.
            query = query.with_for_update(key_share=True)
        limits: dict[str, int] = {row.id: row.max_concurrent for row in await conn.execute(query)}
        counts = await self._slot_counts(conn, sorted(deciding & set(limits)))
        chosen: list[tuple[Admission, Execution]] = []
        cancel_for: list[tuple[str, str]] = []
        for admission in admissions:
            execution = admission.execution
            if execution.job_id not in limits:
                continue
            if execution.job_id in deciding and admission.policy is not None:
                running, waiting = counts.get(execution.job_id, (0, 0))
                decision = admit(
                    admission.policy,
                    0 if admission.force else limits[execution.job_id],
                    running=running,
                    waiting=waiting,
                )
                if decision.waits:
                    counts[execution.job_id] = (running, waiting + 1)
                    if decision.cancel_oldest:
                        cancel_for.append((execution.id, execution.job_id))
                else:
                    execution = replace(
                        execution,
                        state=ExecutionState.SKIPPED,
                        end_time=execution.create_time,
                        error_message=decision.reason,
                    )
            chosen.append((admission, execution))
        if not chosen:
            return Admitted(inserted=[], cancel_requested=[])
        inserted = await self._insert_rows(conn, [_execution_values(e, a) for a, e in chosen])
        cancelled: list[str] = []
        for execution_id, job_id in cancel_for:
            if execution_id in inserted:
                cancelled += await self._ask_oldest_to_stop(conn, job_id)
        written = [e for _, e in chosen if e.id in inserted]
        if any(e.state is ExecutionState.PENDING for e in written):
            await self._notify(conn, WORK_CHANNEL, "")
        for execution_id in cancelled:
            await self._notify(conn, CANCEL_CHANNEL, execution_id)
        return Admitted(inserted=written, cancel_requested=cancelled)

    async def _slot_counts(
        self, conn: AsyncConnection, job_ids: Sequence[str]
    ) -> dict[str, tuple[int, int]]:
        """Per job: executions holding a slot, and executions queued for one (a retry still
        waiting out its backoff is not queued yet)."""
        if not job_ids:
            return {}
        waiting = _CLAIMABLE & ~(
            (executions.c.source == ExecutionSource.RETRY.value)
            & (executions.c.due_time > self._now())
        )
        query = (
            sa.select(
                executions.c.job_id,
                sa.func.count().filter(executions.c.holds_slot),
                sa.func.count().filter(waiting),
            )
            .where(executions.c.job_id.in_(job_ids), _ACTIVE)
            .group_by(executions.c.job_id)
        )
        return {row[0]: (int(row[1]), int(row[2])) for row in await conn.execute(query)}

    async def _ask_oldest_to_stop(self, conn: AsyncConnection, job_id: str) -> list[str]:
        oldest = (
            sa.select(executions.c.id)
            .where(
                executions.c.job_id == job_id,
                executions.c.state == _RUNNING,
                executions.c.cancel_reason.is_(None),
            )
            .order_by(executions.c.id)
            .limit(1)
            .scalar_subquery()
        )
        result = await conn.execute(
            executions.update()
            .where(executions.c.id == oldest)
            .values(cancel_reason="cancelled for a newer run (overlap policy cancel_running)")
            .returning(executions.c.id)
        )
        return list(result.scalars())

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
        return set(result.scalars())

    @_translate_errors
    async def claim_executions(
        self, *, instance_id: str, limit: int, tasks: Sequence[str]
    ) -> Claim:
        due = _CLAIMABLE & (executions.c.due_time <= self._now())
        due = due & executions.c.task.in_(list(tasks))
        claimed: list[Execution] = []
        async with self._write() as conn:
            job_ids = await self._lock_claimable_jobs(conn, due, limit) if limit > 0 else []
            if job_ids:
                claimed = await self._claim_for(conn, due, job_ids, instance_id, limit)
            found: dict[str, Job] = {}
            if claimed:
                query = sa.select(jobs).where(jobs.c.id.in_({e.job_id for e in claimed}))
                found = {row.id: _job_from_row(row) for row in await conn.execute(query)}
            later = (
                sa.select(sa.func.min(executions.c.due_time), self._now())
                .where(_CLAIMABLE, executions.c.due_time > self._now())
                .where(executions.c.task.in_(list(tasks)))
            )
            first, now = (await conn.execute(later)).one()
        next_due_in = None
        if first is not None:
            now = now if isinstance(now, datetime) else datetime.now(UTC)
            next_due_in = first.astimezone(UTC) - now.astimezone(UTC)
        return Claim(
            executions=[(e, found[e.job_id]) for e in claimed if e.job_id in found],
            next_due_in=next_due_in,
        )

    async def _lock_claimable_jobs(
        self, conn: AsyncConnection, due: sa.ColumnElement[bool], limit: int
    ) -> list[str]:
        """The jobs with due executions and (as far as this snapshot knows) a free slot,
        earliest due first, locked; those another claimer or admission holds are skipped."""
        heads = (
            sa.select(
                executions.c.job_id,
                sa.func.min(executions.c.due_time).label("due"),
                sa.func.max(sa.cast(executions.c.force, sa.Integer)).label("forced"),
            )
            .where(due)
            .group_by(executions.c.job_id)
            .subquery()
        )
        held = (
            sa.select(sa.func.count())
            .where(executions.c.job_id == jobs.c.id, executions.c.holds_slot)
            .correlate(jobs)
            .scalar_subquery()
        )
        query = (
            sa.select(jobs.c.id)
            .join(heads, heads.c.job_id == jobs.c.id)
            .where(
                (jobs.c.max_concurrent <= 0) | (heads.c.forced > 0) | (held < jobs.c.max_concurrent)
            )
            .order_by(heads.c.due, jobs.c.id)
            .limit(limit)
            .with_for_update(key_share=True, skip_locked=True, of=jobs)
        )
        return list((await conn.execute(query)).scalars())

    async def _claim_for(
        self,
        conn: AsyncConnection,
        due: sa.ColumnElement[bool],
        job_ids: list[str],
        instance_id: str,
        limit: int,
    ) -> list[Execution]:
        """Claims, for the locked jobs, what their free slots allow. A statement after the
        locks were taken: it sees every claim committed before."""
        held = (
            sa.select(executions.c.job_id, sa.func.count().label("n"))
            .where(executions.c.job_id.in_(job_ids), executions.c.holds_slot)
            .group_by(executions.c.job_id)
            .subquery()
        )
        ranked = (
            sa.select(
                executions.c.id,
                executions.c.job_id,
                executions.c.due_time,
                executions.c.force,
                sa.func.row_number()
                .over(
                    partition_by=(executions.c.job_id, executions.c.force),
                    order_by=(executions.c.due_time, executions.c.id),
                )
                .label("rn"),
            )
            .where(due, executions.c.job_id.in_(job_ids))
            .subquery()
        )
        free = jobs.c.max_concurrent - sa.func.coalesce(held.c.n, 0)
        chosen = (
            sa.select(ranked.c.id)
            .join(jobs, jobs.c.id == ranked.c.job_id)
            .outerjoin(held, held.c.job_id == ranked.c.job_id)
            .where(ranked.c.force | (jobs.c.max_concurrent <= 0) | (ranked.c.rn <= free))
            .order_by(ranked.c.due_time, ranked.c.id)
            .limit(limit)
        )
        result = await conn.execute(
            executions.update()
            .where(executions.c.id.in_(chosen.scalar_subquery()), _CLAIMABLE)
            .values(
                state=ExecutionState.RUNNING.value,
                instance_id=instance_id,
                holds_slot=True,
                start_time=datetime.now(UTC),
            )
            .returning(*executions.c)
        )
        return sorted(
            (_execution_from_row(row) for row in result), key=lambda e: (e.scheduled_time, e.id)
        )

    @_translate_errors
    async def record_progress(
        self,
        finishes: Sequence[ExecutionFinish],
        releases: Sequence[SlotRelease] = (),
        next_runs: Sequence[NextRun] = (),
        *,
        epoch: int | None = None,
    ) -> bool:
        moved = True
        async with self._write() as conn:
            if next_runs and epoch is not None:
                try:
                    await self._check_epoch(conn, epoch)
                except NotLeader:
                    next_runs, moved = (), False
            if next_runs:
                await conn.execute(
                    jobs.update()
                    .where(
                        jobs.c.id == sa.bindparam("b_job_id"),
                        jobs.c.version == sa.bindparam("b_version"),
                    )
                    .values(next_run_time=sa.bindparam("b_next_run_time")),
                    [
                        {
                            "b_job_id": n.job_id,
                            "b_version": n.version,
                            "b_next_run_time": n.next_run_time,
                        }
                        # In id order, as admissions lock jobs: no deadlock between the two.
                        for n in sorted(next_runs, key=lambda n: n.job_id)
                    ],
                )
            if finishes:
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
                        }
                        for f in finishes
                    ],
                )
            if releases:
                await conn.execute(
                    executions.update()
                    .where(executions.c.id == sa.bindparam("b_id"))
                    .values(holds_slot=False, note=sa.bindparam("b_note")),
                    [{"b_id": r.id, "b_note": r.note} for r in releases],
                )
            if finishes or releases:
                await self._notify(conn, WORK_CHANNEL, "")
        return moved

    @_translate_errors
    async def request_cancel(
        self, execution_id: str, *, message: str, now: datetime
    ) -> CancelRequest:
        async with self._write() as conn:
            query = sa.select(executions).where(executions.c.id == execution_id)
            row = (await conn.execute(query.with_for_update())).first()
            if row is None:
                raise ExecutionNotFound(execution_id)
            current = _execution_from_row(row)
            if current.state is ExecutionState.PENDING:
                values: dict[str, Any] = {
                    "state": ExecutionState.CANCELLED.value,
                    "end_time": now,
                    "error_message": message,
                }
                done = True
            elif current.state is ExecutionState.RUNNING:
                values = {"cancel_reason": message}
                done = False
                await self._notify(conn, CANCEL_CHANNEL, execution_id)
            else:
                raise ExecutionFinished(execution_id, current.state.value)
            await conn.execute(
                executions.update().where(executions.c.id == execution_id).values(**values)
            )
            after = (await conn.execute(query)).one()
        return CancelRequest(execution=_execution_from_row(after), done=done)

    @_translate_errors
    async def cancel_requests(self, instance_id: str) -> dict[str, str]:
        async with self._begin() as conn:
            rows = await conn.execute(
                sa.select(executions.c.id, executions.c.cancel_reason).where(
                    executions.c.instance_id == instance_id,
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
        """Fencing: the leadership row is read FOR SHARE, so a new leader's bump waits for
        this transaction, and this one sees the bump if it came first."""
        query = sa.select(leadership.c.epoch).where(leadership.c.id == 1)
        if self._dialect == "postgresql":
            query = query.with_for_update(read=True)
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
                .where(executions.c.state == _RUNNING)
                .values(
                    state=ExecutionState.INTERRUPTED.value,
                    end_time=now,
                    error_message=message,
                    holds_slot=False,
                )
            )
            await conn.execute(
                executions.update().where(executions.c.holds_slot).values(holds_slot=False)
            )
            return int(result.rowcount)

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
            .where(jobs.c.id.in_(list(job_ids)))
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
        }
        async with self._write() as conn:
            await conn.execute(
                self._insert(instances)
                .values(**values)
                .on_conflict_do_update(
                    index_elements=["id"],
                    set_={"address": instance.address, "last_seen": self._now()},
                )
            )

    @_translate_errors
    async def heartbeat_instance(self, instance_id: str, *, running: int) -> bool:
        async with self._write() as conn:
            result = await conn.execute(
                instances.update()
                .where(instances.c.id == instance_id)
                .values(last_seen=self._now(), running=running)
            )
            return bool(result.rowcount)

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
                    leader=bool(row.leader),
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
    async def abandon_orphans(
        self, *, stale_after: timedelta, message: str, now: datetime
    ) -> list[Execution]:
        live = sa.select(instances.c.id).where(
            instances.c.last_seen >= self._seen_since(stale_after)
        )
        orphaned = (executions.c.state == _RUNNING) & executions.c.instance_id.not_in(live)
        abandoned_rows: list[Execution] = []
        async with self._write() as conn:
            owners = list(
                (
                    await conn.execute(
                        sa.select(executions.c.instance_id).where(orphaned).distinct()
                    )
                ).scalars()
            )
            for instance_id in owners:
                seen = (
                    await conn.execute(
                        sa.select(instances.c.last_seen).where(instances.c.id == instance_id)
                    )
                ).scalar()
                last = f"last seen {seen.isoformat()}" if seen else "no longer registered"
                abandoned = await conn.execute(
                    executions.update()
                    .where(orphaned, executions.c.instance_id == instance_id)
                    .values(
                        state=ExecutionState.ABANDONED.value,
                        end_time=now,
                        error_message=f"{message}: instance {instance_id} ({last})",
                        error_type=ABANDONED_ERROR_TYPE,
                        holds_slot=False,
                    )
                    .returning(*executions.c)
                )
                abandoned_rows.extend(_execution_from_row(row) for row in abandoned)
            # Slots of synchronous tasks that outlived their final state there.
            freed = await conn.execute(
                executions.update()
                .where(executions.c.holds_slot, executions.c.instance_id.not_in(live))
                .values(holds_slot=False)
            )
            if abandoned_rows or freed.rowcount:
                await self._notify(conn, WORK_CHANNEL, "")
        return abandoned_rows

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
