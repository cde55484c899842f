"""The store on SQLAlchemy 2 async Core: SQLite through aiosqlite, PostgreSQL through asyncpg."""

from __future__ import annotations

import functools
import json
from collections.abc import AsyncIterator, Callable, Coroutine, Sequence
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import event, exc
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from chronoplane.server.errors import (
    EtagMismatch,
    ExecutionNotFound,
    JobAlreadyExists,
    JobNotFound,
    StorageUnavailable,
)
from chronoplane.server.models import (
    CronTrigger,
    DateTrigger,
    Execution,
    ExecutionPage,
    ExecutionQuery,
    ExecutionSource,
    ExecutionState,
    ExecutionSummary,
    IntervalTrigger,
    Job,
    JobPage,
    Trigger,
)
from chronoplane.server.storage.abc import ExecutionFinish, ExecutionStart, NextRun, Store
from chronoplane.server.storage.tables import executions, jobs, secrets

__all__ = ["SqlAlchemyStore", "create_engine", "trigger_from_json", "trigger_to_json"]

P = ParamSpec("P")
R = TypeVar("R")

_UNFINISHED = (ExecutionState.PENDING.value, ExecutionState.RUNNING.value)


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
            raise

    return wrapper


# -- row <-> domain -------------------------------------------------------------------------------


def _iso(value: datetime | None) -> str | None:
    return None if value is None else value.astimezone(UTC).isoformat()


def _parse(value: str | None) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value)


def trigger_to_json(trigger: Trigger) -> dict[str, Any]:
    if isinstance(trigger, CronTrigger):
        return {"cron": {"expression": trigger.expression, "time_zone": trigger.time_zone}}
    if isinstance(trigger, IntervalTrigger):
        return {
            "interval": {
                "every_seconds": trigger.every.total_seconds(),
                "start_time": _iso(trigger.start_time),
                "end_time": _iso(trigger.end_time),
            }
        }
    return {"date": {"run_time": _iso(trigger.run_time)}}


def trigger_from_json(data: dict[str, Any]) -> Trigger:
    if "cron" in data:
        return CronTrigger(**data["cron"])
    if "interval" in data:
        spec = data["interval"]
        return IntervalTrigger(
            every=timedelta(seconds=spec["every_seconds"]),
            start_time=_parse(spec["start_time"]),
            end_time=_parse(spec["end_time"]),
        )
    run_time = _parse(data["date"]["run_time"])
    assert run_time is not None
    return DateTrigger(run_time=run_time)


def _job_values(job: Job) -> dict[str, Any]:
    return {
        "display_name": job.display_name,
        "description": job.description,
        "task": job.task,
        "args": job.args,
        "trigger": trigger_to_json(job.trigger),
        "paused": job.paused,
        "misfire_grace_seconds": job.misfire_grace.total_seconds(),
        "coalesce": job.coalesce,
        "max_concurrent": job.max_concurrent,
        "labels": job.labels,
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
        coalesce=row.coalesce,
        max_concurrent=row.max_concurrent,
        labels=row.labels,
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
    )


def _dedupe_key(execution: Execution) -> str | None:
    """What makes an execution unique within its job (see tables.executions)."""
    if execution.source is ExecutionSource.SCHEDULE:
        return "s:" + execution.scheduled_time.astimezone(UTC).isoformat()
    if execution.request_id:
        return "r:" + execution.request_id
    return None


def _execution_values(execution: Execution) -> dict[str, Any]:
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
        "instance_id": execution.instance_id,
        "request_id": execution.request_id or None,
    }


_EXECUTION_COLUMNS = [column.name for column in executions.columns]
_PG_ARRAY_TYPES = {
    "scheduled_time": "timestamptz",
    "create_time": "timestamptz",
    "start_time": "timestamptz",
    "end_time": "timestamptz",
    "args": "json",
    "result": "json",
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
        )
    return _job_from_row(row, summary)


class SqlAlchemyStore(Store):
    def __init__(self, engine: AsyncEngine) -> None:
        self._engine = engine
        self._dialect = engine.dialect.name

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
        async with self._engine.begin() as conn:
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
            async with self._begin() as conn:
                await conn.execute(jobs.insert().values(**values))
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
        async with self._begin() as conn:
            result = await conn.execute(
                jobs.update()
                .where(jobs.c.id == job.id, jobs.c.version == expected_version)
                .values(**values)
            )
            if result.rowcount == 0:
                await self._raise_missing_or_moved(conn, job.id, expected_version)
        return await self.get_job(job.id)

    @_translate_errors
    async def delete_job(self, job_id: str, *, expected_version: int | None) -> None:
        condition = jobs.c.id == job_id
        if expected_version is not None:
            condition = condition & (jobs.c.version == expected_version)
        async with self._begin() as conn:
            # Children first: the foreign key cascade is not relied on (SQLite needs a pragma).
            exists = sa.select(jobs.c.id).where(condition)
            await conn.execute(executions.delete().where(executions.c.job_id.in_(exists)))
            result = await conn.execute(jobs.delete().where(condition))
            if result.rowcount == 0:
                await self._raise_missing_or_moved(conn, job_id, expected_version)

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
    async def insert_executions(self, executions_: Sequence[Execution]) -> set[str]:
        if not executions_:
            return set()
        for attempt in range(3):
            try:
                async with self._begin() as conn:
                    return await self._insert_executions(conn, executions_)
            except exc.IntegrityError:
                # A job deleted between our check and our insert (foreign key): check again.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _insert_executions(
        self, conn: AsyncConnection, executions_: Sequence[Execution]
    ) -> set[str]:
        job_ids = {e.job_id for e in executions_}
        query = sa.select(jobs.c.id).where(jobs.c.id.in_(job_ids))
        existing = set((await conn.execute(query)).scalars())
        rows = [_execution_values(e) for e in executions_ if e.job_id in existing]
        if not rows:
            return set()
        if self._dialect == "postgresql":
            # One statement over arrays: a tenth of the CPU of a many-row VALUES list.
            columns = {name: [row[name] for row in rows] for name in _EXECUTION_COLUMNS}
            for name in ("args", "result"):
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
    async def record_progress(
        self,
        starts: Sequence[ExecutionStart],
        finishes: Sequence[ExecutionFinish],
        next_runs: Sequence[NextRun] = (),
    ) -> None:
        async with self._begin() as conn:
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
                        for n in next_runs
                    ],
                )
            if starts:
                await conn.execute(
                    executions.update()
                    .where(
                        executions.c.id == sa.bindparam("b_id"),
                        executions.c.state == ExecutionState.PENDING.value,
                    )
                    .values(
                        state=ExecutionState.RUNNING.value,
                        start_time=sa.bindparam("b_start_time"),
                    ),
                    [{"b_id": s.id, "b_start_time": s.start_time} for s in starts],
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
                        }
                        for f in finishes
                    ],
                )

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
        async with self._begin() as conn:
            result = await conn.execute(
                executions.update()
                .where(executions.c.state.in_(_UNFINISHED))
                .values(state=ExecutionState.INTERRUPTED.value, end_time=now, error_message=message)
            )
            return int(result.rowcount)

    # -- server -------------------------------------------------------------------------------

    @_translate_errors
    async def get_or_create_secret(self, name: str, value: bytes) -> bytes:
        async with self._begin() as conn:
            await conn.execute(
                self._insert(secrets)
                .values(name=name, value=value)
                .on_conflict_do_nothing(index_elements=["name"])
            )
            stored = (
                await conn.execute(sa.select(secrets.c.value).where(secrets.c.name == name))
            ).scalar_one()
        return bytes(stored)
