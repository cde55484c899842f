"""Executions, ended: final states (the first one wins), slots freed and given to queued
executions, next run times written by the leader with its epoch."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection

from chronoplane.server.errors import (
    NotLeader,
)
from chronoplane.server.models import (
    EventKind,
    EventResource,
    ExecutionState,
)
from chronoplane.server.storage.abc import (
    ExecutionFinish,
    NextRun,
    Progress,
    SlotRelease,
)
from chronoplane.server.storage.sqlalchemy.changes import (
    PG_NOTIFY_APPENDED,
    pg_modified_executions,
)
from chronoplane.server.storage.sqlalchemy.rows import (
    IS_INLINE,
    STATE_PENDING,
    STATE_RUNNING,
    UNFINISHED_STATES,
    pg_state_of_one,
)
from chronoplane.server.storage.sqlalchemy.session import translate_errors
from chronoplane.server.storage.sqlalchemy.slots import Slots
from chronoplane.server.storage.tables import (
    executions,
    jobs,
)

_PG_NEXT_RUNS = sa.text(
    "UPDATE jobs SET next_run_time = n.next_run_time "
    "FROM unnest(CAST(:ids AS varchar[]), CAST(:versions AS int[]), "
    "CAST(:times AS timestamptz[])) AS n(id, version, next_run_time) "
    "WHERE jobs.id = n.id AND jobs.version = n.version"
)


# The arrays a batch of final states is given in, in the order the statements unnest them:
# the parameter's name (``_pg_finish_arrays``), its SQL type, the column it becomes.
_FINISH_ARRAYS = (
    ("ids", "varchar", "id"),
    ("states", "varchar", "state"),
    ("starts", "timestamptz", "start_time"),
    ("ends", "timestamptz", "end_time"),
    ("results", "text", "result"),
    ("messages", "text", "message"),
    ("tracebacks", "text", "traceback"),
    ("types", "varchar", "type"),
    ("keeps", "boolean", "keeps"),
    ("bys", "varchar", "by"),
)


def _finish_update(placeholders: list[str], returning: str) -> str:
    """The UPDATE of final states from the arrays (one placeholder each, in order), of
    executions not final yet: the first final state wins. The ids are given twice, joined
    for their values and as ANY, so that the primary key finds the rows whatever the
    planner's statistics say (decision 0031)."""
    arrays = ", ".join(
        f"CAST({placeholder} AS {kind}[])"
        for placeholder, (_, kind, _) in zip(placeholders, _FINISH_ARRAYS, strict=True)
    )
    columns = ", ".join(column for _, _, column in _FINISH_ARRAYS)
    return (
        "UPDATE executions SET state = f.state, start_time = f.start_time, "
        "end_time = f.end_time, result = CAST(f.result AS json), error_message = f.message, "
        "error_traceback = f.traceback, error_type = f.type, holds_slot = f.keeps, "
        "cancelled_by = CASE WHEN f.state = 'cancelled' "
        "THEN COALESCE(NULLIF(f.by, ''), executions.cancelled_by) ELSE '' END "
        f"FROM unnest({arrays}) AS f({columns}) "
        f"WHERE executions.id = f.id AND executions.id = ANY(CAST({placeholders[0]} AS varchar[])) "
        f"AND {pg_state_of_one(*UNFINISHED_STATES)} RETURNING {returning}"
    )


# In a transaction (SQLAlchemy's parameters), its events appended at the commit.
_PG_FINISH = sa.text(_finish_update([f":{name}" for name, _, _ in _FINISH_ARRAYS], "executions.*"))

# Final states alone (no next run times, no slots released): one statement that is its own
# transaction (asyncpg's parameters), with the events and the notification; for each
# execution that ended and freed its slot, whether its job has executions waiting for one.
# Only a job with a max_concurrent has (admission.py; UpdateJob lets them go when it drops
# the limit), and asking its row first spares a burst of a job without one the search among
# the burst's pending executions, which stale statistics send through ix_executions_state_id.
_PG_FINISH_ALONE = (
    "WITH finished AS ("
    + _finish_update(
        [f"${n}" for n in range(1, len(_FINISH_ARRAYS) + 1)], "executions.*, f.keeps AS kept"
    )
    + f"), {pg_modified_executions('finished')} "
    "SELECT finished.job_id, NOT finished.kept AND EXISTS (SELECT FROM jobs AS limited "
    "WHERE limited.id = finished.job_id AND limited.max_concurrent > 0) "
    "AND EXISTS (SELECT FROM executions AS w "
    "WHERE w.job_id = finished.job_id AND w.state = 'pending' AND NOT w.ready "
    f"AND NOT w.holds_slot) AS waiting, {PG_NOTIFY_APPENDED} AS notified FROM finished"
)


class Outcomes(Slots):
    """Records how executions ended, in batches, and what that frees."""

    @translate_errors
    async def record_progress(
        self,
        finishes: Sequence[ExecutionFinish],
        releases: Sequence[SlotRelease] = (),
        next_runs: Sequence[NextRun] = (),
        *,
        epoch: int | None = None,
    ) -> Progress:
        if self._dialect == "postgresql" and finishes and not releases and not next_runs:
            return await self._finish_alone(finishes)
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

    async def _finish_alone(self, finishes: Sequence[ExecutionFinish]) -> Progress:
        """Final states in one round trip (PostgreSQL); then, only if a job of theirs has
        executions waiting for the slots they freed, a transaction that promotes them. Should
        this process stop between the two, every instance's ``promote_waiting`` does it."""
        arrays = _pg_finish_arrays(finishes)
        args = [arrays[name] for name, _, _ in _FINISH_ARRAYS]
        # Without the pre-ping: run again on a dead connection, a final state written the
        # first time stays as it is (the first one wins) and no second event is appended.
        records = await self._fetch(_PG_FINISH_ALONE, *args)
        if records and self.on_events is not None:
            self.on_events()
        waiting = sorted({record["job_id"] for record in records if record["waiting"]})
        readied = 0
        if waiting:
            async with self._write() as conn:
                readied = await self._promote(conn, await self._queued_jobs(conn, waiting))
        return Progress(moved=True, readied=readied)

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
            finished = await conn.execute(_PG_FINISH, _pg_finish_arrays(finishes))
            self._changed_rows(conn, finished.mappings(), EventKind.MODIFIED)
            return
        # One writer at a time on SQLite: what is unfinished now is what the update changes.
        unfinished = await conn.execute(
            sa.select(executions.c.id).where(
                executions.c.id.in_([f.id for f in finishes]),
                executions.c.state.in_(UNFINISHED_STATES),
            )
        )
        self._changed(conn, EventResource.EXECUTION, unfinished.scalars(), EventKind.MODIFIED)
        await conn.execute(_SQLITE_FINISH, [_sqlite_finish_row(f) for f in finishes])

    @translate_errors
    async def interrupt_unfinished(self, *, message: str, now: datetime) -> int:
        async with self._write() as conn:
            result = await conn.execute(
                executions.update()
                .where(executions.c.state == STATE_RUNNING, IS_INLINE)
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
            held = executions.c.holds_slot & (IS_INLINE | (executions.c.state == STATE_PENDING))
            await conn.execute(executions.update().where(held).values(holds_slot=False))
            await self._promote(conn, await self._queued_jobs(conn, None))
            return len(interrupted)


def _pg_finish_arrays(finishes: Sequence[ExecutionFinish]) -> dict[str, list[Any]]:
    return {
        "ids": [f.id for f in finishes],
        "states": [f.state.value for f in finishes],
        "starts": [f.start_time for f in finishes],
        "ends": [f.end_time for f in finishes],
        "results": [None if f.result is None else json.dumps(f.result) for f in finishes],
        "messages": [f.error_message for f in finishes],
        "tracebacks": [f.error_traceback for f in finishes],
        "types": [f.error_type for f in finishes],
        "keeps": [f.keeps_slot for f in finishes],
        "bys": [f.cancelled_by for f in finishes],
    }


# One row at a time (SQLite): not IN (...), since expanding parameters cannot go into an
# executemany.
_SQLITE_FINISH = (
    executions.update()
    .where(
        executions.c.id == sa.bindparam("b_id"),
        sa.or_(*(executions.c.state == state for state in UNFINISHED_STATES)),
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
    )
)


def _sqlite_finish_row(finish: ExecutionFinish) -> dict[str, Any]:
    return {
        "b_id": finish.id,
        "b_state": finish.state.value,
        "b_start_time": finish.start_time,
        "b_end_time": finish.end_time,
        "b_result": finish.result,
        "b_error_message": finish.error_message,
        "b_error_traceback": finish.error_traceback,
        "b_error_type": finish.error_type,
        "b_keeps_slot": finish.keeps_slot,
        "b_cancelled_by": finish.cancelled_by,
    }
