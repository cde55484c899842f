"""Jobs: created, read, paged, changed with compare-and-swap on their version, deleted with
their executions; each change an event, and a NOTIFY to the leader."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from chronoplane.server.aio import GroupCommit
from chronoplane.server.errors import (
    EtagMismatch,
    JobAlreadyExists,
    JobNotFound,
)
from chronoplane.server.models import (
    EventKind,
    EventResource,
    ExecutionSource,
    Job,
    JobPage,
)
from chronoplane.server.storage.abc import (
    DueKey,
    JobStore,
)
from chronoplane.server.storage.sqlalchemy.changes import (
    Changes,
    encode_row,
)
from chronoplane.server.storage.sqlalchemy.rows import (
    JOB_WITH_SUMMARY,
    PG_JOB_WITH_SUMMARY,
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


class SqlJobStore(Slots, JobStore):
    """The jobs aggregate."""

    @translate_errors
    async def create_jobs(
        self, new: Sequence[Job], *, request_ids: Sequence[str | None]
    ) -> list[Job]:
        if not new:
            return []
        now = datetime.now(UTC)
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
            for job, request_id in zip(new, request_ids, strict=True)
        ]
        ids = [job.id for job in new]
        # One statement for them all (executemany, batched into multi-row INSERTs), the rows
        # back in the order given.
        insert = jobs.insert().returning(*jobs.c, sort_by_parameter_order=True)
        try:
            async with self._write() as conn:
                inserted = (await conn.execute(insert, rows)).all()
                self._changed(conn, EventResource.JOB, ids, EventKind.ADDED)
                await self._notify_jobs(conn, ids)
        except exc.IntegrityError as error:
            raise JobAlreadyExists(await self._first_taken(new, request_ids)) from error
        return [job_from_row(row) for row in inserted]  # after the commit: no lock held

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
            .where(jobs.c.paused.is_(False), due.is_not(None), due <= until)
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
    async def update_job(self, job: Job, *, expected_version: int) -> Job:
        values = job_values(job) | {
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

    @translate_errors
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
        await self._notify_jobs(conn, [job_id])

    async def _notify_jobs(self, conn: AsyncConnection, job_ids: Sequence[str]) -> None:
        """Wakes the leader of a cluster, to read the jobs now rather than at the next resync
        (unless it made the change itself: each payload starts with the writer's id). One
        notification per job, all in one statement."""
        if self._dialect == "postgresql":
            payloads = [f"{self._instance_id} {job_id}" for job_id in job_ids]
            await conn.execute(_NOTIFY_EACH, {"channel": JOBS_CHANNEL, "payloads": payloads})

    async def _raise_missing_or_moved(
        self, conn: AsyncConnection, job_id: str, expected_version: int | None
    ) -> None:
        version = (
            await conn.execute(sa.select(jobs.c.version).where(jobs.c.id == job_id))
        ).scalar()
        if version is None:
            raise JobNotFound(job_id)
        raise EtagMismatch(job_id, str(expected_version), str(version))

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
