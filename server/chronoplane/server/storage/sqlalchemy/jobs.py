"""Jobs: created, read, paged, changed with compare-and-swap on their version, deleted with
their executions; each change an event, and a NOTIFY to the leader."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from chronoplane.server.aio import GroupCommit, in_turns
from chronoplane.server.errors import (
    EtagMismatch,
    JobAlreadyExists,
    JobNotFound,
)
from chronoplane.server.models import (
    EventKind,
    EventResource,
    ExecutionSource,
    ExecutionSummary,
    Job,
    JobPage,
)
from chronoplane.server.storage.abc import (
    DueKey,
    JobChange,
    JobDeletion,
    JobRefusal,
    JobStore,
    JobUpdate,
)
from chronoplane.server.storage.sqlalchemy.changes import (
    Changes,
    encode_row,
)
from chronoplane.server.storage.sqlalchemy.rows import (
    JOB_SUMMARIES,
    JOB_WITH_SUMMARY,
    PG_JOB_WITH_SUMMARY,
    execution_summary,
    job_from_row,
    job_values,
    job_with_summary,
    missed_from_json,
    rows_from_records,
)
from chronoplane.server.storage.sqlalchemy.session import (
    JOBS_CHANNEL,
    PgStatement,
    translate_errors,
)
from chronoplane.server.storage.sqlalchemy.slots import Slots
from chronoplane.server.storage.tables import (
    executions,
    jobs,
)

# One NOTIFY per payload, in one round trip.
_NOTIFY_EACH = sa.text(
    "SELECT count(pg_notify(:channel, payload)) FROM unnest(CAST(:payloads AS text[])) AS payload"
)
# PostgreSQL: compiled once, run on the driver (Session._fetch).
_PG_JOBS_BY_ID = PgStatement(
    PG_JOB_WITH_SUMMARY.where(
        jobs.c.id == sa.any_(sa.bindparam("job_ids", type_=postgresql.ARRAY(sa.String)))
    )
)
_PG_JOBS_PAGE = PgStatement(
    PG_JOB_WITH_SUMMARY.where(jobs.c.id > sa.bindparam("after"))
    .order_by(jobs.c.id)
    .limit(sa.bindparam("limit"))
)


@functools.cache
def _update_statement(names: tuple[str, ...]) -> Any:
    """The UPDATE of these columns of a job at a version, returning its row: built once (a
    statement built per call costs more CPU than its round trip)."""
    return (
        jobs.update()
        .where(
            jobs.c.id == sa.bindparam("match_id"),
            jobs.c.version == sa.bindparam("match_version"),
        )
        .values({name: sa.bindparam(f"new_{name}", type_=jobs.c[name].type) for name in names})
        .returning(*jobs.c)
    )


@functools.cache
def _delete_statements(versioned: bool) -> tuple[Any, Any]:
    """The DELETEs of a job's executions and of the job (at a version, if ``versioned``),
    returning its row; built once."""
    condition = jobs.c.id == sa.bindparam("match_id")
    if versioned:
        condition = condition & (jobs.c.version == sa.bindparam("match_version"))
    chosen = sa.select(jobs.c.id).where(condition)
    return (
        executions.delete().where(executions.c.job_id.in_(chosen)),
        jobs.delete().where(condition).returning(*jobs.c),
    )


class SqlJobStore(Slots, JobStore):
    """The jobs aggregate."""

    @translate_errors
    async def create_jobs(
        self, new: Sequence[Job], *, request_ids: Sequence[str | None]
    ) -> list[Job]:
        if not new:
            return []
        now = datetime.now(UTC)
        # In turns (aio.in_turns), here and below: a thousand jobs' rows take a few hundred
        # ms to encode and decode, which would hold the loop.
        rows = [
            job_values(job)
            | {
                "id": job.id,
                "created_by": job.created_by,
                "version": 1,
                "request_id": request_id,
                "create_time": job.create_time or now,
                "update_time": job.create_time or now,
            }
            async for job, request_id in in_turns(zip(new, request_ids, strict=True))
        ]
        ids = [job.id for job in new]
        # One statement for them all (executemany, batched into multi-row INSERTs), the rows
        # back in the order given.
        insert = jobs.insert().returning(*jobs.c, sort_by_parameter_order=True)
        try:
            async with self._write() as conn:
                result = await conn.execute(insert, rows)
                inserted = [row async for part in in_turns(result.partitions(50)) for row in part]
                self._changed(conn, EventResource.JOB, ids, EventKind.ADDED)
                await self._notify_jobs(conn, ids)
        except exc.IntegrityError as error:
            raise JobAlreadyExists(await self._first_taken(new, request_ids)) from error
        return [job_from_row(row) async for row in in_turns(inserted)]  # no lock held now

    async def _first_taken(self, new: Sequence[Job], request_ids: Sequence[str | None]) -> str:
        """The id of the first of ``new`` whose id or request_id a stored job has."""
        given = [r for r in request_ids if r]
        query = sa.select(jobs.c.id, jobs.c.request_id).where(
            sa.or_(
                self._among(jobs.c.id, [job.id for job in new]),
                self._among(jobs.c.request_id, given),
            )
        )
        async with self._begin() as conn:
            rows = (await conn.execute(query)).all()
        taken = {row.id for row in rows} | {row.request_id for row in rows if row.request_id}
        pairs = zip(new, request_ids, strict=True)
        return next((job.id for job, r in pairs if job.id in taken or r in taken), new[0].id)

    async def get_job(self, job_id: str) -> Job:
        job = await self._job_reads.submit(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    @functools.cached_property
    def _job_reads(self) -> GroupCommit[str, Job | None]:
        """Concurrent GetJobs share one statement: the ids asked for while one runs go
        together in the next (a read that arrives sees a snapshot taken after it arrived).
        On a loop that also serves gRPC, a round trip to the database costs more CPU than
        the rows it brings (decision 0019). An error fails every read of the group."""
        return GroupCommit(self._read_jobs, name="job-reads", alone=())

    @translate_errors
    async def _read_jobs(self, job_ids: list[str]) -> list[Job | None]:
        rows: Sequence[Any]
        wanted = sorted(set(job_ids))
        if self._dialect == "postgresql":
            args = _PG_JOBS_BY_ID.args(job_ids=wanted)
            rows = rows_from_records(await self._fetch(_PG_JOBS_BY_ID.sql, *args))
        else:
            rows = await self._rows(JOB_WITH_SUMMARY.where(self._among(jobs.c.id, wanted)))
        found = {row.id: job_with_summary(row) for row in rows}
        return [found.get(job_id) for job_id in job_ids]

    @translate_errors
    async def get_jobs_by_request_ids(self, request_ids: Sequence[str]) -> dict[str, Job]:
        if not request_ids:
            return {}
        query = self._job_with_summary().where(self._among(jobs.c.request_id, request_ids))
        rows = await self._rows(query)
        return {row.request_id: job_with_summary(row) for row in rows}

    @translate_errors
    async def list_jobs(self, *, after: str | None, limit: int) -> JobPage:
        rows: Sequence[Any]
        if self._dialect == "postgresql":
            args = _PG_JOBS_PAGE.args(after=after or "", limit=limit + 1)
            rows = rows_from_records(await self._fetch(_PG_JOBS_PAGE.sql, *args))
        else:
            query = JOB_WITH_SUMMARY.order_by(jobs.c.id).limit(limit + 1)
            if after is not None:
                query = query.where(jobs.c.id > after)
            rows = await self._rows(query)
        page = [job_with_summary(row) for row in rows[:limit]]
        return JobPage(jobs=page, next_after=page[-1].id if len(rows) > limit else None)

    def _job_with_summary(self) -> sa.Select[Any]:
        return PG_JOB_WITH_SUMMARY if self._dialect == "postgresql" else JOB_WITH_SUMMARY

    @translate_errors
    async def due_jobs(
        self,
        *,
        since: datetime | None,
        until: datetime,
        after: DueKey | None,
        limit: int,
    ) -> list[Job]:
        due = jobs.c.next_run_time
        query = (
            sa.select(jobs)
            # NOT paused, as ix_jobs_due's predicate says it: PostgreSQL does not match
            # "paused IS false" to that index, and scans the whole table instead.
            .where(sa.not_(jobs.c.paused), due.is_not(None), due <= until)
            .order_by(due, jobs.c.id)
            .limit(limit)
        )
        if since is not None:
            query = query.where(due > since)
        if after is not None:
            key = sa.tuple_(
                sa.bindparam(None, after[0], type_=due.type),
                sa.bindparam(None, after[1], type_=jobs.c.id.type),
            )
            query = query.where(sa.tuple_(due, jobs.c.id) > key)
        async with self._begin() as conn:
            return [job_from_row(row) for row in await conn.execute(query)]

    @translate_errors
    async def get_jobs(self, job_ids: Sequence[str]) -> list[Job]:
        async with self._begin() as conn:
            rows = await conn.execute(sa.select(jobs).where(self._among(jobs.c.id, job_ids)))
            return [job_from_row(row) for row in rows]

    @translate_errors
    async def change_jobs(self, changes: Sequence[JobChange]) -> list[Job | JobRefusal]:
        ids = [change.job_id for change in changes]
        if len(set(ids)) != len(ids):
            raise ValueError("change_jobs: each job may change once per call")
        outcomes: dict[str, Job | JobRefusal] = {}
        async with self._write() as conn:
            # In id order, as admissions lock jobs: two writers never wait for each other's
            # rows in opposite orders.
            for change in sorted(changes, key=lambda change: change.job_id):
                if isinstance(change, JobUpdate):
                    outcomes[change.job_id] = await self._update(conn, change)
                else:
                    outcomes[change.job_id] = await self._delete(conn, change)
            updated = [
                change.job_id
                for change in changes
                if isinstance(change, JobUpdate) and isinstance(outcomes[change.job_id], Job)
            ]
            if updated:
                # A larger max_concurrent lets queued executions go.
                await self._promote(conn, await self._queued_jobs(conn, updated))
                summaries = await self._summaries(conn, updated)
                for job_id in updated:
                    job = outcomes[job_id]
                    assert isinstance(job, Job)
                    outcomes[job_id] = replace(job, last_execution=summaries.get(job_id))
            changed = [job_id for job_id in ids if isinstance(outcomes[job_id], Job)]
            if changed:
                await self._notify_jobs(conn, changed)
        return [outcomes[job_id] for job_id in ids]

    async def _update(self, conn: AsyncConnection, change: JobUpdate) -> Job | JobRefusal:
        job, expected = change.job, change.expected_version
        values = job_values(job) | {"version": expected + 1, "update_time": datetime.now(UTC)}
        parameters = {f"new_{name}": value for name, value in values.items()}
        parameters |= {"match_id": job.id, "match_version": expected}
        row = (await conn.execute(_update_statement(tuple(values)), parameters)).first()
        if row is None:
            return await self._missing_or_moved(conn, job.id, expected)
        self._changed(conn, EventResource.JOB, [job.id], EventKind.MODIFIED)
        return job_from_row(row)

    async def _delete(self, conn: AsyncConnection, change: JobDeletion) -> Job | JobRefusal:
        job_id, expected = change.job_id, change.expected_version
        delete_executions, delete_job = _delete_statements(expected is not None)
        parameters = {"match_id": job_id, "match_version": expected}
        # Children first: the foreign key cascade is not relied on (SQLite needs a pragma).
        await conn.execute(delete_executions, parameters)
        row = (await conn.execute(delete_job, parameters)).first()
        if row is None:
            return await self._missing_or_moved(conn, job_id, expected)
        changes: Changes | None = conn.info.get("chronoplane_changes")
        if changes is not None:
            changes.deleted[job_id] = encode_row(row)
        self._changed(conn, EventResource.JOB, [job_id], EventKind.DELETED)
        return job_from_row(row)

    async def _summaries(
        self, conn: AsyncConnection, job_ids: Sequence[str]
    ) -> dict[str, ExecutionSummary]:
        """The last execution of each of the jobs that have one, as ``get_job`` gives it,
        read in the transaction that changed the jobs."""
        query = JOB_SUMMARIES.where(self._among(jobs.c.id, job_ids))
        rows = (await conn.execute(query)).all()
        return {row.id: summary for row in rows if (summary := execution_summary(row)) is not None}

    async def _notify_jobs(self, conn: AsyncConnection, job_ids: Sequence[str]) -> None:
        """Wakes the leader of a cluster, to read the jobs now rather than at the next resync
        (unless it made the change itself: each payload starts with the writer's id). One
        notification per job, all in one statement."""
        if self._dialect == "postgresql":
            payloads = [f"{self._instance_id} {job_id}" for job_id in job_ids]
            await conn.execute(_NOTIFY_EACH, {"channel": JOBS_CHANNEL, "payloads": payloads})

    async def _missing_or_moved(
        self, conn: AsyncConnection, job_id: str, expected_version: int | None
    ) -> JobRefusal:
        """Why a change of the job changed nothing: it is gone, or at another version."""
        version = (
            await conn.execute(sa.select(jobs.c.version).where(jobs.c.id == job_id))
        ).scalar()
        if version is None:
            return JobNotFound(job_id)
        return EtagMismatch(job_id, str(expected_version), str(version))

    @translate_errors
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
                missed = missed_from_json(row.missed)
                found[row.job_id] = missed.last_time if missed else row.scheduled_time
        return found
