"""Executions, read and purged: one by id or request id, pages of a job's or all, and the
history limits by age and count."""

from __future__ import annotations

from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from chronoplane.server.errors import (
    ExecutionNotFound,
)
from chronoplane.server.models import (
    Execution,
    ExecutionPage,
    ExecutionQuery,
)
from chronoplane.server.storage.sqlalchemy.rows import UNFINISHED_STATES, execution_from_row
from chronoplane.server.storage.sqlalchemy.session import Session, translate_errors
from chronoplane.server.storage.tables import (
    executions,
    jobs,
)

# Jobs whose history limit one purge transaction applies.
PURGE_PAGE = 500


class History(Session):
    """The record of executions, newest first, and its purges."""

    @translate_errors
    async def get_execution(self, execution_id: str) -> Execution:
        async with self._begin() as conn:
            query = sa.select(executions).where(executions.c.id == execution_id)
            row = (await conn.execute(query)).first()
        if row is None:
            raise ExecutionNotFound(execution_id)
        return execution_from_row(row)

    @translate_errors
    async def get_execution_by_request_id(self, job_id: str, request_id: str) -> Execution | None:
        async with self._begin() as conn:
            query = sa.select(executions).where(
                executions.c.job_id == job_id, executions.c.dedupe_key == "r:" + request_id
            )
            row = (await conn.execute(query)).first()
        return None if row is None else execution_from_row(row)

    @translate_errors
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
        page = [execution_from_row(row) for row in rows[:limit]]
        return ExecutionPage(
            executions=page, next_before=page[-1].id if len(rows) > limit else None
        )

    @translate_errors
    async def purge_executions(
        self, *, job_id: str | None, ended_before: datetime | None, keep_last: int
    ) -> int:
        final = sa.not_(executions.c.state.in_(UNFINISHED_STATES))
        purged = 0
        if ended_before is not None:
            condition = final & (executions.c.end_time < ended_before)
            if job_id is not None:
                condition &= executions.c.job_id == job_id
            async with self._write() as conn:
                purged += (await conn.execute(executions.delete().where(condition))).rowcount
        if keep_last > 0:
            if job_id is not None:
                async with self._write() as conn:
                    return purged + await self._keep_last(conn, job_id, keep_last, final)
            purged += await self._keep_last_of_each(sa.literal(keep_last), sa.true())
        return purged

    @translate_errors
    async def purge_history_limits(self) -> int:
        return await self._keep_last_of_each(jobs.c.history_limit, jobs.c.history_limit > 0)

    async def _keep_last_of_each(
        self, limit: sa.ColumnElement[int], which: sa.ColumnElement[bool]
    ) -> int:
        """Applies a history limit to each job ``which`` selects, a page of jobs per
        transaction: with 100,000 jobs, one transaction would hold its locks for minutes."""
        final = sa.not_(executions.c.state.in_(UNFINISHED_STATES))
        purged, after = 0, ""
        while True:
            query = (
                sa.select(jobs.c.id, limit)
                .where(which, jobs.c.id > after)
                .order_by(jobs.c.id)
                .limit(PURGE_PAGE)
            )
            async with self._write() as conn:
                page = (await conn.execute(query)).all()
                for job_id, keep in page:
                    purged += await self._keep_last(conn, job_id, keep, final)
            if len(page) < PURGE_PAGE:
                return purged
            after = page[-1][0]

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
