"""What the store contract tests share: a job, an execution, a claim, a final state."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

from chronoplane.server.ids import new_execution_id
from chronoplane.server.models import (
    CronTrigger,
    Execution,
    ExecutionSource,
    ExecutionState,
    Instance,
    Job,
)
from chronoplane.server.storage.abc import ExecutionFinish
from chronoplane.server.storage.sqlalchemy import SqlAlchemyStore

T0 = datetime(2026, 3, 8, 6, 30, tzinfo=UTC)


TASK = "chronoplane.echo"


def a_job(job_id: str = "j1", **changes: object) -> Job:
    job = Job(
        id=job_id,
        task="chronoplane.echo",
        trigger=CronTrigger(expression="30 2 * * *", time_zone="America/New_York"),
        args={"nested": {"list": [1, 2.5, "three", None, True]}},
        labels={"team": "data"},
        next_run_time=T0,
    )
    return replace(job, **changes)  # type: ignore[arg-type]


def an_execution(job_id: str = "j1", **changes: object) -> Execution:
    execution = Execution(
        id=new_execution_id(),
        job_id=job_id,
        state=ExecutionState.PENDING,
        source=ExecutionSource.SCHEDULE,
        scheduled_time=T0,
        create_time=datetime.now(UTC),
        task="chronoplane.echo",
        args={},
        instance_id="inst-test",
    )
    return replace(execution, **changes)  # type: ignore[arg-type]


async def claimed_ids(
    store: SqlAlchemyStore, instance: str = "inst-a", limit: int = 100
) -> list[str]:
    claim = await store.claim_executions(instance_id=instance, limit=limit, tasks=[TASK])
    return [e.id for e, _ in claim.executions]


def finish(execution: Execution, *, keeps_slot: bool = False) -> ExecutionFinish:
    """A final state for ``execution`` (SUCCEEDED, or TIMED_OUT with its thread running)."""
    now = datetime.now(UTC)
    return ExecutionFinish(
        id=execution.id,
        job_id=execution.job_id,
        state=ExecutionState.TIMED_OUT if keeps_slot else ExecutionState.SUCCEEDED,
        start_time=now,
        end_time=now,
        keeps_slot=keeps_slot,
    )


def an_instance(instance_id: str) -> Instance:
    return Instance(
        id=instance_id,
        name="node",
        host="host",
        pid=1,
        version="0",
        address="127.0.0.1:1",
        insecure=False,
        start_time=datetime.now(UTC),
        max_running=10,
    )


async def beat(store: SqlAlchemyStore, instance_id: str) -> int:
    return await store.heartbeat_instance(instance_id, running=0, live_after=timedelta(seconds=10))
