"""Executions, written: the overlap policy decided against the job's slots as the database
counts them, what the writer may run itself claimed in the same insert (docs/decisions/
0010-execution-queue.md)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy import exc
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from chronoplane.server.errors import (
    NotLeader,
)
from chronoplane.server.models import (
    EventKind,
    EventResource,
    Execution,
    ExecutionState,
    ExecutorKind,
    OverlapPolicy,
    RunPolicy,
    evolve,
)
from chronoplane.server.scheduling import admit
from chronoplane.server.storage.abc import (
    DISPLACED,
    Admission,
    Admitted,
)
from chronoplane.server.storage.sqlalchemy.rows import (
    EXECUTION_COLUMNS,
    PG_ARRAY_TYPES,
    STATE_RUNNING,
    cancelled_now,
    execution_from_row,
    execution_values,
    run_policy,
)
from chronoplane.server.storage.sqlalchemy.session import (
    CANCEL_CHANNEL,
    WORK_CHANNEL,
    translate_errors,
)
from chronoplane.server.storage.sqlalchemy.slots import Slots
from chronoplane.server.storage.tables import (
    executions,
    jobs,
)

_PG_INSERT_EXECUTIONS = sa.text(
    f"INSERT INTO executions ({', '.join(EXECUTION_COLUMNS)}) "
    "SELECT * FROM unnest("
    + ", ".join(
        f"CAST(:{name} AS {PG_ARRAY_TYPES.get(name, 'varchar')}[])" for name in EXECUTION_COLUMNS
    )
    + ") ON CONFLICT (job_id, dedupe_key) DO NOTHING RETURNING id"
)


_PG_ADMISSION_JOBS = sa.text("SELECT * FROM chronoplane_admission_jobs(:ids, :fenced)").bindparams(
    sa.bindparam("ids", type_=postgresql.ARRAY(sa.String)),
    sa.bindparam("fenced", type_=sa.Boolean),
)


class Admissions(Slots):
    """Writes new executions (scheduled fires, manual runs, backfills, retries, MISSED and
    SKIPPED records) and asks for runs displaced by newer ones to stop."""

    @translate_errors
    async def admit_executions(
        self,
        admissions: Sequence[Admission],
        *,
        epoch: int | None = None,
        claim_for: str = "",
        claim_limit: int = 0,
    ) -> Admitted:
        if not admissions:
            return Admitted(inserted=[], displace=[], claimed=[])
        for attempt in range(3):
            try:
                async with self._write() as conn:
                    return await self._admit(conn, admissions, epoch, claim_for, claim_limit)
            except exc.IntegrityError:
                # A job deleted between our check and our insert (foreign key): check again.
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    async def _admit(
        self,
        conn: AsyncConnection,
        admissions: Sequence[Admission],
        epoch: int | None,
        claim_for: str,
        claim_limit: int,
    ) -> Admitted:
        # Before any job is locked: a fence takes the instance's row first, then the jobs.
        fenced = claim_limit > 0 and await self._fenced(conn, claim_for)
        if fenced:
            claim_limit = 0
        queueing = {
            a.execution.job_id for a in admissions if a.execution.state is ExecutionState.PENDING
        }
        found, slots = await self._admitted_jobs(
            conn, {a.execution.job_id for a in admissions}, lock=bool(queueing), epoch=epoch
        )
        chosen: list[_Chosen] = []
        cancel_for: list[tuple[str, str]] = []
        for admission in admissions:
            if admission.execution.job_id in found:
                chosen.append(_decide(admission, found, slots, cancel_for))
        if not chosen:
            return Admitted(inserted=[], displace=[], claimed=[], fenced=fenced)
        claimed, rows = _claim_in_insert(chosen, found, claim_for, claim_limit)
        inserted = await self._insert_rows(conn, [values for _, values in rows])
        if any(values["ready"] and e.id in inserted for e, values in rows):
            await self._notify(conn, WORK_CHANNEL, self._instance_id)
        return Admitted(
            # As stored: a queued execution has no instance yet.
            inserted=[
                evolve(e, instance_id=values["instance_id"])
                for e, values in rows
                if e.id in inserted
            ],
            displace=sorted({job_id for eid, job_id in cancel_for if eid in inserted}),
            claimed=[(e, p) for e, p in claimed if e.id in inserted],
            fenced=fenced,
        )

    async def _admitted_jobs(
        self, conn: AsyncConnection, job_ids: set[str], *, lock: bool, epoch: int | None
    ) -> tuple[dict[str, Any], dict[str, tuple[int, int, int]]]:
        """The jobs that exist (rows by id, with what admission needs of them) and, when
        ``lock``, their slots (``_slot_counts``), counted after their rows were locked: two
        writers of one job's slots take turns, in id order (no deadlock), and the count
        sees what the one before committed. With ``epoch``, fenced as ``_check_epoch``.
        On PostgreSQL one call of a function (migration 0004) does it all."""
        if lock and self._dialect == "postgresql":
            rows = (
                await conn.execute(
                    _PG_ADMISSION_JOBS,
                    {"ids": sorted(job_ids), "fenced": epoch is not None},
                )
            ).all()
            if epoch is not None:
                if not rows:
                    await self._check_epoch(conn, epoch)
                elif rows[0].epoch != epoch:
                    raise NotLeader(epoch, rows[0].epoch)
            slots = {
                r.id: (r.holding, r.ready, r.queued)
                for r in rows
                if r.holding or r.ready or r.queued
            }
            return {row.id: row for row in rows}, slots
        if epoch is not None:
            await self._check_epoch(conn, epoch)
        query = (
            sa.select(jobs.c.id, jobs.c.max_concurrent, jobs.c.timeout_seconds, jobs.c.retry)
            .where(self._among(jobs.c.id, job_ids))
            .order_by(jobs.c.id)
        )
        if lock:
            query = query.with_for_update(key_share=True)
        found = {row.id: row for row in await conn.execute(query)}
        counted = await self._slot_counts(conn, sorted(found)) if lock else {}
        return found, counted

    async def _insert_rows(self, conn: AsyncConnection, rows: list[dict[str, Any]]) -> set[str]:
        if self._dialect == "postgresql":
            # One statement over arrays: a tenth of the CPU of a many-row VALUES list.
            columns = {name: [row[name] for row in rows] for name in EXECUTION_COLUMNS}
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
        inserted = set(result.scalars())
        self._changed_rows(conn, (r for r in rows if r["id"] in inserted), EventKind.ADDED)
        return inserted

    @translate_errors
    async def displace_oldest(self, job_ids: Sequence[str], *, now: datetime) -> list[Execution]:
        asked: list[str] = []
        ended: list[str] = []
        freed: list[str] = []  # the jobs of those ended
        async with self._write() as conn:
            for job_id in job_ids:
                oldest = (
                    await conn.execute(
                        sa.select(executions.c.id, executions.c.executor)
                        .where(
                            executions.c.job_id == job_id,
                            executions.c.state == STATE_RUNNING,
                            executions.c.cancel_reason.is_(None),
                        )
                        .order_by(executions.c.id)
                        .limit(1)
                        .with_for_update()
                    )
                ).first()
                if oldest is None:
                    continue
                if oldest.executor == ExecutorKind.CELERY.value:
                    # Its worker is not ours to ask: it ends here, its slot goes to the newer
                    # run, and the caller revokes its task (as CancelExecution does).
                    values = cancelled_now(now, DISPLACED) | {"cancel_reason": DISPLACED}
                    ended.append(oldest.id)
                    freed.append(job_id)
                else:
                    values = {"cancel_reason": DISPLACED}
                    asked.append(oldest.id)
                await conn.execute(
                    executions.update().where(executions.c.id == oldest.id).values(**values)
                )
            for execution_id in asked:
                await self._notify(conn, CANCEL_CHANNEL, execution_id)
            if ended:
                self._changed(conn, EventResource.EXECUTION, ended, EventKind.MODIFIED)
                await self._promote(conn, await self._queued_jobs(conn, freed))
            rows = (
                await conn.execute(
                    sa.select(executions)
                    .where(self._among(executions.c.id, [*asked, *ended]))
                    .order_by(executions.c.id)
                )
            ).all()
        return [execution_from_row(row) for row in rows]


# An admission, the execution it will write (SKIPPED, if the policy says so), and whether it
# is ready (holds a slot).
_Chosen = tuple[Admission, Execution, bool]


def _decide(
    admission: Admission,
    found: dict[str, Any],
    slots: dict[str, tuple[int, int, int]],
    cancel_for: list[tuple[str, str]],
) -> _Chosen:
    """The overlap policy's decision for one admission, against the job's slots as counted
    (and as the admissions before it in this batch took them)."""
    execution = admission.execution
    if execution.state is not ExecutionState.PENDING:
        return admission, execution, False
    limit = found[execution.job_id].max_concurrent
    holding, ready_n, queued_n = slots.get(execution.job_id, (0, 0, 0))
    decision = admit(
        admission.policy or OverlapPolicy.BUFFER_ALL,
        0 if admission.force else limit,
        running=holding,
        waiting=ready_n + queued_n,
    )
    if admission.force:
        return admission, execution, True
    if not decision.waits:
        skipped = replace(
            execution,
            state=ExecutionState.SKIPPED,
            end_time=execution.create_time,
            error_message=decision.reason,
        )
        return admission, skipped, False
    ready = limit <= 0 or holding + ready_n < limit
    slots[execution.job_id] = (holding, ready_n + ready, queued_n + (not ready))
    if decision.cancel_oldest:
        cancel_for.append((execution.id, execution.job_id))
    return admission, execution, ready


def _claim_in_insert(
    chosen: list[_Chosen], found: dict[str, Any], claim_for: str, claim_limit: int
) -> tuple[list[tuple[Execution, RunPolicy]], list[tuple[Execution, dict[str, Any]]]]:
    """The rows to insert; what is ready and due now, the writer may run itself, up to
    ``claim_limit``: claimed in the insert (no other instance can see these rows before it
    commits)."""
    claimed: list[tuple[Execution, RunPolicy]] = []
    rows: list[tuple[Execution, dict[str, Any]]] = []
    for admission, execution, ready in chosen:
        due = admission.due_time or execution.scheduled_time
        if (
            ready
            and execution.executor is ExecutorKind.INLINE
            and len(claimed) < claim_limit
            and due <= execution.create_time
        ):
            execution = evolve(
                execution,
                state=ExecutionState.RUNNING,
                instance_id=claim_for,
                start_time=execution.create_time,
            )
            job = found[execution.job_id]
            claimed.append((execution, run_policy(job.timeout_seconds, job.retry)))
        rows.append((execution, execution_values(execution, admission, ready=ready)))
    return claimed, rows
