"""Jobs: created, read, paged, changed with compare-and-swap on their version, deleted with
their executions; each change an event, and a NOTIFY to the leader."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.ext.asyncio import AsyncConnection

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
    JobStore,
)
from chronoplane.server.storage.sqlalchemy.changes import (
    Changes,
    encode_row,
)
from chronoplane.server.storage.sqlalchemy.rows import (
    JOB_WITH_SUMMARY,
    job_from_row,
    job_values,
    job_with_summary,
    missed_from_json,
)
from chronoplane.server.storage.sqlalchemy.session import JOBS_CHANNEL, translate_errors
from chronoplane.server.storage.sqlalchemy.slots import Slots
from chronoplane.server.storage.tables import (
    executions,
    jobs,
)

# Built once: a statement's cache key is computed once per object, and these run per call.
_JOB_BY_ID = JOB_WITH_SUMMARY.where(jobs.c.id == sa.bindparam("job_id"))


_JOB_BY_REQUEST_ID = JOB_WITH_SUMMARY.where(jobs.c.request_id == sa.bindparam("request_id"))


class SqlJobStore(Slots, JobStore):
    """The jobs aggregate."""

    @translate_errors
    async def create_job(self, job: Job, *, request_id: str | None) -> Job:
        now = job.create_time or datetime.now(UTC)
        values = job_values(job) | {
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

    @translate_errors
    async def get_job(self, job_id: str) -> Job:
        async with self._read() as conn:
            row = (await conn.execute(_JOB_BY_ID, {"job_id": job_id})).first()
        if row is None:
            raise JobNotFound(job_id)
        return job_with_summary(row)

    @translate_errors
    async def get_job_by_request_id(self, request_id: str) -> Job | None:
        async with self._read() as conn:
            row = (await conn.execute(_JOB_BY_REQUEST_ID, {"request_id": request_id})).first()
        return None if row is None else job_with_summary(row)

    @translate_errors
    async def list_jobs(self, *, after: str | None, limit: int) -> JobPage:
        query = JOB_WITH_SUMMARY.order_by(jobs.c.id).limit(limit + 1)
        if after is not None:
            query = query.where(jobs.c.id > after)
        async with self._read() as conn:
            rows = (await conn.execute(query)).all()
        page = [job_with_summary(row) for row in rows[:limit]]
        return JobPage(jobs=page, next_after=page[-1].id if len(rows) > limit else None)

    @translate_errors
    async def list_schedulable_jobs(self) -> list[Job]:
        async with self._begin() as conn:
            rows = await conn.execute(sa.select(jobs).where(jobs.c.paused.is_(False)))
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
