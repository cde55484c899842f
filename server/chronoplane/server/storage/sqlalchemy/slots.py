"""A job's slots (``max_concurrent``): counted in the database, and given to queued
executions when one frees, oldest first (docs/decisions/0010-execution-queue.md)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from chronoplane.server.storage.sqlalchemy.rows import IS_ACTIVE, IS_QUEUED, IS_READY, IS_WAITING
from chronoplane.server.storage.sqlalchemy.session import WORK_CHANNEL, Session
from chronoplane.server.storage.tables import (
    executions,
    jobs,
)


class Slots(Session):
    """Counting and freeing slots, for every aggregate that ends or queues executions."""

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
                sa.func.count().filter(IS_READY & sa.not_(executions.c.force)),
                sa.func.count().filter(IS_QUEUED),
            )
            .where(self._among(executions.c.job_id, job_ids), IS_ACTIVE)
            .group_by(executions.c.job_id)
        )
        return {
            row[0]: (int(row[1]), int(row[2]), int(row[3])) for row in await conn.execute(query)
        }

    async def _queued_jobs(self, conn: AsyncConnection, job_ids: Iterable[str] | None) -> list[str]:
        """The jobs among ``job_ids`` (None: all) that have queued executions."""
        query = sa.select(executions.c.job_id).where(IS_WAITING).distinct()
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
        chosen = self._promotable(job_ids)
        result = await conn.execute(
            executions.update()
            .where(executions.c.id.in_(sa.select(chosen.c.id)), IS_WAITING)
            .values(ready=True)
            .returning(executions.c.id)  # rowcount is -1 for WITH ... UPDATE on SQLite
        )
        promoted = len(result.all())
        if promoted:
            await self._notify(conn, WORK_CHANNEL, self._instance_id)
        return promoted

    def _promotable(self, job_ids: Sequence[str]) -> Any:
        """The queued executions of these jobs that fit in their free slots, oldest due first,
        as a CTE counted once, before any row changes."""
        counts = (
            sa.select(
                executions.c.job_id,
                sa.func.count().filter(executions.c.holds_slot).label("holding"),
                sa.func.count().filter(IS_READY & sa.not_(executions.c.force)).label("ready"),
            )
            .where(self._among(executions.c.job_id, job_ids), IS_ACTIVE)
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
            .where(self._among(executions.c.job_id, job_ids), IS_WAITING)
            .subquery()
        )
        free = (
            jobs.c.max_concurrent
            - sa.func.coalesce(counts.c.holding, 0)
            - sa.func.coalesce(counts.c.ready, 0)
        )
        return (
            sa.select(ranked.c.id)
            .join(jobs, jobs.c.id == ranked.c.job_id)
            .outerjoin(counts, counts.c.job_id == ranked.c.job_id)
            .where((jobs.c.max_concurrent <= 0) | (ranked.c.rn <= free))
            .cte("chosen")
            .prefix_with("MATERIALIZED")
        )
