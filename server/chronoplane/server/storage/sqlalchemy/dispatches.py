"""Celery dispatches: executions claimed to be sent to a broker, their conditional start on
a worker, and the leases of the workers running them (docs/decisions/0014-celery-dispatch.md)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from chronoplane.server.models import (
    ABANDONED_ERROR_TYPE,
    EventKind,
    Execution,
    ExecutionState,
    RunPolicy,
)
from chronoplane.server.storage.abc import (
    Dispatch,
    DispatchClaim,
    DispatchStore,
)
from chronoplane.server.storage.sqlalchemy.changes import (
    PG_NOTIFY_APPENDED,
    pg_modified_executions,
)
from chronoplane.server.storage.sqlalchemy.rows import (
    IS_CELERY,
    IS_READY,
    STATE_PENDING,
    STATE_RUNNING,
    celery_from_json,
    delta,
    execution_from_mapping,
    execution_from_row,
    pg_state_of_one,
    run_policy,
    state_of_one,
)
from chronoplane.server.storage.sqlalchemy.session import WORK_CHANNEL, translate_errors
from chronoplane.server.storage.sqlalchemy.slots import Slots
from chronoplane.server.storage.tables import (
    executions,
    jobs,
)

# Sends recorded in one statement on PostgreSQL (a batch is up to 500): a sent execution
# belongs to no instance from now on, unless a worker has started it already.
# (The ids twice: joined for their values, and as ANY for the primary key; decision 0031.)
_PG_SENT = sa.text(
    "UPDATE executions SET dispatch_time = s.sent_at, instance_id = CASE "
    "WHEN executions.instance_id = :instance_id THEN '' ELSE executions.instance_id END "
    "FROM unnest(CAST(:ids AS varchar[]), CAST(:times AS timestamptz[])) AS s(id, sent_at) "
    "WHERE executions.id = s.id AND executions.id = ANY(CAST(:ids AS varchar[])) "
    "AND executions.dispatch_time IS NULL "
    "RETURNING executions.*"
)

# A worker's conditional start on PostgreSQL, in one statement and one round trip (the
# worker's own transaction: no BEGIN and COMMIT around it): the claim, the job's run policy,
# and the execution's event, appended as every writer appends them (changes.py).
_PG_START = (
    "WITH claimed AS (UPDATE executions SET state = 'running', start_time = now(), "
    "worker = $2, instance_id = '', ready = false, holds_slot = true, "
    "lease_expire_time = $3, pending_reason = '' FROM jobs "
    f"WHERE executions.id = $1 AND {pg_state_of_one('pending')} "
    "AND executions.executor = 'celery' AND jobs.id = executions.job_id "
    "RETURNING executions.*, jobs.timeout_seconds AS job_timeout_seconds, "
    f"jobs.retry AS job_retry), {pg_modified_executions('claimed')} "
    f"SELECT claimed.*, {PG_NOTIFY_APPENDED} AS notified FROM claimed"
)

# The claim above, if it was this call's: RUNNING on this worker with the lease it wrote.
_PG_STARTED_BY = (
    "SELECT executions.*, jobs.timeout_seconds AS job_timeout_seconds, "
    "jobs.retry AS job_retry FROM executions JOIN jobs ON jobs.id = executions.job_id "
    f"WHERE executions.id = $1 AND {pg_state_of_one('running')} AND executions.worker = $2 "
    "AND executions.lease_expire_time = $3"
)

# What a worker needs of the job to run an execution, beside the claim.
_RUN_POLICY = (jobs.c.timeout_seconds.label("job_timeout_seconds"), jobs.c.retry.label("job_retry"))


class SqlDispatchStore(Slots, DispatchStore):
    """What an instance sends to Celery and what the workers report of it."""

    @translate_errors
    async def claim_dispatches(self, *, instance_id: str, limit: int) -> DispatchClaim:
        claimed: list[Dispatch] = []
        next_due_in = None
        async with self._write() as conn:
            if await self._fenced(conn, instance_id):
                return DispatchClaim(dispatches=[], next_due_in=None, fenced=True)
            query = (
                sa.select(
                    executions,
                    jobs.c.celery.label("job_celery"),
                    jobs.c.timeout_seconds,
                    self._now().label("db_now"),
                )
                .join(jobs, jobs.c.id == executions.c.job_id)
                .where(IS_READY, IS_CELERY)
                .order_by(executions.c.due_time, executions.c.id)
                .limit(limit)
                .with_for_update(skip_locked=True, of=executions)
            )
            for row in await conn.execute(query):
                if row.due_time > row.db_now:
                    next_due_in = row.due_time - row.db_now
                    break
                execution = replace(
                    execution_from_row(row), instance_id=instance_id, celery_task_id=row.id
                )
                claimed.append(
                    Dispatch(
                        execution=execution,
                        options=celery_from_json(row.job_celery),
                        timeout=delta(row.timeout_seconds),
                    )
                )
            if claimed:
                # The slot is taken now; the row is this instance's until it is sent.
                await conn.execute(
                    executions.update()
                    .where(self._among(executions.c.id, [d.execution.id for d in claimed]))
                    .values(
                        ready=False,
                        holds_slot=True,
                        instance_id=instance_id,
                        celery_task_id=executions.c.id,
                    )
                )
        return DispatchClaim(dispatches=claimed, next_due_in=next_due_in)

    @translate_errors
    async def record_dispatches(
        self,
        *,
        instance_id: str,
        sent: Sequence[tuple[str, datetime]],
        failed: Sequence[tuple[str, str, datetime]],
    ) -> None:
        """Sent ones belong to no instance from now on (a worker will start them); those the
        broker did not take are ready again at their retry time, with the reason."""
        mine = (executions.c.state == STATE_PENDING) & (executions.c.instance_id == instance_id)
        async with self._write() as conn:
            if sent and self._dialect == "postgresql":
                ordered = sorted(sent)  # rows locked in id order, as every batch writer
                changed = await conn.execute(
                    _PG_SENT,
                    {
                        "instance_id": instance_id,
                        "ids": [execution_id for execution_id, _ in ordered],
                        "times": [when for _, when in ordered],
                    },
                )
                self._changed_rows(conn, changed.mappings(), EventKind.MODIFIED)
                sent = ()
            for execution_id, when in sent:
                # A worker may have started it already (and made it no instance's).
                changed = await conn.execute(
                    executions.update()
                    .where(executions.c.id == execution_id, executions.c.dispatch_time.is_(None))
                    .values(
                        instance_id=sa.case(
                            (executions.c.instance_id == instance_id, ""),
                            else_=executions.c.instance_id,
                        ),
                        dispatch_time=when,
                    )
                    .returning(*executions.c)
                )
                self._changed_rows(conn, changed.mappings(), EventKind.MODIFIED)
            for execution_id, reason, retry_at in failed:
                changed = await conn.execute(
                    executions.update()
                    .where(executions.c.id == execution_id, mine)
                    .values(
                        instance_id="",
                        ready=True,
                        holds_slot=False,
                        due_time=retry_at,
                        pending_reason=reason,
                    )
                    .returning(*executions.c)
                )
                self._changed_rows(conn, changed.mappings(), EventKind.MODIFIED)
            if failed:
                await self._notify(conn, WORK_CHANNEL, self._instance_id)

    @translate_errors
    async def start_dispatched(
        self, execution_id: str, *, worker: str, lease_until: datetime
    ) -> tuple[Execution, RunPolicy] | None:
        """The conditional claim of a worker: RUNNING on ``worker`` if it is still PENDING;
        None when it was started before (a redelivered message), cancelled or finished."""
        started: dict[str, Any] | None
        if self._dialect == "postgresql":
            records = await self._fetch(_PG_START, execution_id, worker, lease_until)
            if not records:
                # Run again on a dead connection, the claim may have committed the first
                # time, unseen: the lease it wrote, this call's own time, tells.
                records = await self._fetch(_PG_STARTED_BY, execution_id, worker, lease_until)
            started = dict(records[0]) if records else None
            if started is not None and self.on_events is not None:
                self.on_events()
        else:
            started = await self._start_dispatched(execution_id, worker, lease_until)
        if started is None:
            return None
        policy = run_policy(started["job_timeout_seconds"], started["job_retry"])
        return execution_from_mapping(started), policy

    async def _start_dispatched(
        self, execution_id: str, worker: str, lease_until: datetime
    ) -> dict[str, Any] | None:
        """SQLite's: a transaction (its RETURNING cannot name the tables of UPDATE ... FROM)."""
        claim = (
            executions.update()
            .where(executions.c.id == execution_id, executions.c.state == STATE_PENDING, IS_CELERY)
            .values(
                state=ExecutionState.RUNNING.value,
                start_time=self._now(),
                worker=worker,
                instance_id="",
                ready=False,
                holds_slot=True,
                lease_expire_time=lease_until,
                pending_reason="",
            )
            .returning(*executions.c)
        )
        async with self._write() as conn:
            rows = list((await conn.execute(claim)).mappings())
            if not rows:
                return None
            self._changed_rows(conn, rows, EventKind.MODIFIED)
            started = dict(rows[0])
            of_job = sa.select(*_RUN_POLICY).where(jobs.c.id == started["job_id"])
            job = (await conn.execute(of_job)).first()
        started.update(job._mapping if job else dict.fromkeys(c.name for c in _RUN_POLICY))
        return started

    @translate_errors
    async def renew_lease(self, execution_id: str, *, worker: str, until: datetime) -> bool:
        async with self._write() as conn:
            renewed = await conn.execute(
                executions.update()
                .where(
                    executions.c.id == execution_id,
                    state_of_one(ExecutionState.RUNNING.value),
                    executions.c.worker == worker,
                )
                .values(lease_expire_time=until)
            )
            return bool(renewed.rowcount)

    @translate_errors
    async def abandon_expired_leases(self, *, message: str) -> list[Execution]:
        async with self._write() as conn:
            expired = (
                (executions.c.state == STATE_RUNNING)
                & IS_CELERY
                & (executions.c.lease_expire_time < self._now())
            )
            abandoned = await conn.execute(
                executions.update()
                .where(expired)
                .values(
                    state=ExecutionState.ABANDONED.value,
                    end_time=self._now(),
                    error_message=sa.literal(f"{message}: worker ") + executions.c.worker,
                    error_type=ABANDONED_ERROR_TYPE,
                    holds_slot=False,
                )
                .returning(*executions.c)
            )
            rows = list(abandoned.mappings())
            self._changed_rows(conn, rows, EventKind.MODIFIED)
            if rows:
                jobs_freed = sorted({row["job_id"] for row in rows})
                await self._promote(conn, await self._queued_jobs(conn, jobs_freed))
        return [execution_from_mapping(row) for row in rows]
