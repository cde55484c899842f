"""Executions, claimed: ready ones taken from the queue by an instance with room, and the
requests to cancel a running one."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from chronoplane.server.errors import (
    ExecutionFinished,
    ExecutionNotFound,
)
from chronoplane.server.models import (
    EventKind,
    EventResource,
    Execution,
    ExecutionState,
    ExecutorKind,
    RunPolicy,
)
from chronoplane.server.storage.abc import (
    CancelRequest,
    Claim,
)
from chronoplane.server.storage.sqlalchemy.rows import (
    IS_INLINE,
    IS_READY,
    STATE_RUNNING,
    cancelled_now,
    execution_from_row,
    run_policy,
)
from chronoplane.server.storage.sqlalchemy.session import CANCEL_CHANNEL, translate_errors
from chronoplane.server.storage.sqlalchemy.slots import Slots
from chronoplane.server.storage.tables import (
    UtcDateTime,
    executions,
    jobs,
)

# The ids twice: joined for their values, and as ANY so that the primary key finds the rows
# whatever the planner's statistics say (decision 0031).
_PG_CLAIM = sa.text(
    "UPDATE executions SET state = :state, instance_id = :instance_id, ready = :ready, "
    "holds_slot = :holds_slot, start_time = :start_time "
    "FROM unnest(CAST(:ids AS varchar[])) AS claimed(id) WHERE executions.id = claimed.id "
    "AND executions.id = ANY(CAST(:ids AS varchar[])) "
    "RETURNING executions.*"
).bindparams(sa.bindparam("start_time", type_=UtcDateTime()))


class Claims(Slots):
    """Takes due, ready executions for an instance (``FOR UPDATE SKIP LOCKED``), and
    carries cancel requests to the instance running an execution."""

    @translate_errors
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
                    .where(IS_READY, IS_INLINE, executions.c.task.in_(names))
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
                        execution_from_row(row),
                        state=ExecutionState.RUNNING,
                        instance_id=instance_id,
                        start_time=started,
                    )
                    claimed.append((execution, run_policy(row.timeout_seconds, row.job_retry)))
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

    @translate_errors
    async def promote_waiting(self) -> int:
        async with self._write() as conn:
            return await self._promote(conn, await self._queued_jobs(conn, None))

    @translate_errors
    async def request_cancel(
        self, execution_id: str, *, message: str, now: datetime, by: str = ""
    ) -> CancelRequest:
        query = sa.select(executions).where(executions.c.id == execution_id)
        async with self._write() as conn:
            row = (await conn.execute(query.with_for_update())).first()
            if row is None:
                raise ExecutionNotFound(execution_id)
            current = execution_from_row(row)
            # A Celery execution ends here and now: its worker, if it has one, is told to
            # stop (revoked), and whatever it reports later no longer counts.
            celery = current.executor is ExecutorKind.CELERY
            if current.state is ExecutionState.PENDING or (
                celery and current.state is ExecutionState.RUNNING
            ):
                values: dict[str, Any] = cancelled_now(now, message, by=by)
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
        return CancelRequest(execution=execution_from_row(after), done=done)

    @translate_errors
    async def cancel_requests(self, execution_ids: Sequence[str]) -> dict[str, str]:
        if not execution_ids:
            return {}
        async with self._begin() as conn:
            rows = await conn.execute(
                sa.select(executions.c.id, executions.c.cancel_reason).where(
                    self._among(executions.c.id, execution_ids),
                    executions.c.state == STATE_RUNNING,
                    executions.c.cancel_reason.is_not(None),
                )
            )
            return {row.id: row.cancel_reason for row in rows}
