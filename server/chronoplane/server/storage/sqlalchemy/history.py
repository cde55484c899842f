"""Executions, read and purged: one by id or request id, pages of a job's or all, and the
history limits by age and count."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from chronoplane.server.errors import (
    ExecutionNotFound,
)
from chronoplane.server.models import (
    Execution,
    ExecutionPage,
    ExecutionQuery,
    ExecutionState,
    ExecutorKind,
)
from chronoplane.server.storage.abc import EndedCount, QueueDepth
from chronoplane.server.storage.sqlalchemy.rows import (
    IS_QUEUED,
    IS_READY,
    STATE_PENDING,
    STATE_RUNNING,
    UNFINISHED_STATES,
    execution_from_row,
    late_id_bound,
)
from chronoplane.server.storage.sqlalchemy.session import Session, named_rows, translate_errors
from chronoplane.server.storage.tables import (
    executions,
    jobs,
)

# Jobs whose history limit one purge transaction applies.
PURGE_PAGE = 500
_EXECUTION_BY_ID = sa.select(executions).where(executions.c.id == sa.bindparam("execution_id"))


class History(Session):
    """The record of executions, newest first, and its purges."""

    @translate_errors
    async def get_execution(self, execution_id: str) -> Execution:
        rows = await self._rows(_EXECUTION_BY_ID, {"execution_id": execution_id})
        if not rows:
            raise ExecutionNotFound(execution_id)
        return execution_from_row(rows[0])

    @translate_errors
    async def get_execution_by_request_id(self, job_id: str, request_id: str) -> Execution | None:
        query = sa.select(executions).where(
            executions.c.job_id == job_id, executions.c.dedupe_key == "r:" + request_id
        )
        rows = await self._rows(query)
        return execution_from_row(rows[0]) if rows else None

    @translate_errors
    async def list_executions(
        self, query: ExecutionQuery, *, before: str | None, limit: int
    ) -> ExecutionPage:
        conditions: list[sa.ColumnElement[bool]] = []
        if query.job_id is not None:
            conditions.append(executions.c.job_id == query.job_id)
        if query.states:
            conditions.append(executions.c.state.in_(sorted(s.value for s in query.states)))
        if before is not None:
            conditions.append(executions.c.id < before)
        if query.scheduled_after is not None or query.scheduled_before is not None:

            async def in_range(conn: AsyncConnection) -> Sequence[sa.Row[Any]]:
                return await _newest_in_range(conn, conditions, query, limit + 1)

            rows = await self._read(in_range)
        else:
            select = sa.select(executions).where(*conditions)
            rows = await self._rows(select.order_by(executions.c.id.desc()).limit(limit + 1))
        page = [execution_from_row(row) for row in rows[:limit]]
        return ExecutionPage(
            executions=page, next_before=page[-1].id if len(rows) > limit else None
        )

    @translate_errors
    async def queue_depth(self, *, now: datetime) -> QueueDepth:
        count = sa.func.count()
        pending = sa.select(count).where(executions.c.state == STATE_PENDING)  # (state, id)
        running = sa.select(count).where(executions.c.state == STATE_RUNNING)
        # The ready ones by ix_executions_ready (its first entry), the queued ones (waiting
        # for a slot, or sent to Celery) by ix_executions_queued.
        due = executions.c.due_time <= now
        oldest = [
            sa.select(sa.func.min(executions.c.due_time)).where(which, due)
            for which in (IS_READY, IS_QUEUED)
        ]

        async def read(conn: AsyncConnection) -> QueueDepth:
            values = [(await conn.execute(query)).scalar() for query in (pending, running)]
            dues = [(await conn.execute(query)).scalar() for query in oldest]
            return QueueDepth(
                pending=int(values[0] or 0),
                running=int(values[1] or 0),
                oldest_due=min((d for d in dues if d is not None), default=None),
            )

        return await self._read(read)

    @translate_errors
    async def count_ended(
        self, *, executor: ExecutorKind, after: datetime, until: datetime
    ) -> list[EndedCount]:
        query = (
            sa.select(executions.c.state, executions.c.task, sa.func.count().label("ended"))
            .where(
                executions.c.end_time > after,
                executions.c.end_time <= until,
                executions.c.executor == executor.value,
            )
            .group_by(executions.c.state, executions.c.task)
        )
        return [
            EndedCount(state=ExecutionState(row.state), task=row.task, count=int(row.ended))
            for row in await self._rows(query)
        ]

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


# The first window of newest executions a time range is looked for in; each next is this
# many times larger.
_FIRST_WINDOW = 1_000


_WINDOW_GROWTH = 8


async def _newest_in_range(
    conn: AsyncConnection,
    conditions: list[sa.ColumnElement[bool]],
    query: ExecutionQuery,
    limit: int,
) -> Sequence[Any]:
    """The newest ``limit`` executions matching ``conditions`` and the time range of
    ``query``.

    Ids follow creation, which follows scheduled time closely but not exactly (backfills,
    retries, missed fires), so no index gives a time range newest first. Instead,
    alternately: the matches among the ``window`` executions walked back by id from the
    range's end (exact once it finds ``limit``), and whether the range holds fewer than
    ``window`` executions (then all of them are read through the time index and sorted);
    the window grows until one answers. A range with an end walks from the largest id an
    execution of the range can have unless it was created late (rows.late_id_bound), and
    adds the range's late ones, which have their own index. Each statement is exact on its
    own; the cost follows the smaller of the two ways.
    """
    window = _FIRST_WINDOW
    times = _in_range(executions.c.scheduled_time, query)
    walked, late = list(conditions), []
    if query.scheduled_before is not None:
        bound = late_id_bound(query.scheduled_before)
        walked.append(executions.c.id < bound)
        late = [
            *conditions,
            *times,
            executions.c.created_late == sa.true(),
            executions.c.id >= bound,
        ]
    while True:
        newest = (
            sa.select(executions)
            .where(*walked)
            .order_by(executions.c.id.desc())
            .limit(window)
            .subquery()
        )
        matched = sa.select(newest).where(*_in_range(newest.c.scheduled_time, query))
        found = named_rows(await conn.execute(matched.order_by(newest.c.id.desc()).limit(limit)))
        if len(found) == limit:
            if late:
                select = sa.select(executions).where(*late).order_by(executions.c.id.desc())
                found += named_rows(await conn.execute(select.limit(limit)))
                found.sort(key=lambda row: row.id, reverse=True)
            return found[:limit]
        every = sa.select(sa.literal(1)).where(*conditions, *times).limit(window).subquery()
        count = (await conn.execute(sa.select(sa.func.count()).select_from(every))).scalar()
        if (count or 0) < window:
            # The ids from the time index alone (sorted by an expression, so that the
            # planner does not walk the history by id instead), then their rows.
            by_id = executions.c.id.concat("").desc()
            ids = sa.select(executions.c.id).where(*conditions, *times).order_by(by_id)
            select = sa.select(executions).where(executions.c.id.in_(ids.limit(limit)))
            return named_rows(await conn.execute(select.order_by(executions.c.id.desc())))
        window *= _WINDOW_GROWTH


def _in_range(column: Any, query: ExecutionQuery) -> list[sa.ColumnElement[bool]]:
    """The time range of ``query`` on ``column`` (the table's, or a subquery's)."""
    conditions = []
    if query.scheduled_after is not None:
        conditions.append(column >= query.scheduled_after)
    if query.scheduled_before is not None:
        conditions.append(column < query.scheduled_before)
    return conditions
